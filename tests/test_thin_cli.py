"""`distillkit thin` glue: parse arguments, thin a .npy/.csv file, write indices and plot."""

import argparse

import numpy as np
import pytest

from distillkit.thinning import command


def _parser():
    p = argparse.ArgumentParser()
    command.add_arguments(p)
    return p


def _run(argv):
    return command.main(_parser().parse_args(argv))


@pytest.mark.parametrize("method", ["kt", "kt+", "compresspp", "iid"])
def test_cli_npy(tmp_path, capsys, method):
    X = np.random.default_rng(0).standard_normal((512, 2))
    src = tmp_path / "pts.npy"
    np.save(src, X)
    out = tmp_path / "idx.npy"
    argv = [str(src), "--size", "20", "--method", method, "--seed", "1", "--out", str(out)]
    assert _run(argv) == 0
    idx = np.load(out)
    assert idx.dtype == np.int64 and idx.shape == (20,) and idx.max() < 512
    text = capsys.readouterr().out
    assert "MMD(coreset)" in text and "MMD(iid, same size)" in text


def test_cli_csv_with_header_and_plot(tmp_path, capsys):
    X = np.random.default_rng(1).standard_normal((300, 2))
    src = tmp_path / "pts.csv"
    np.savetxt(src, X, delimiter=",", header="x,y", comments="")
    png = tmp_path / "core.png"
    assert _run([str(src), "--size", "16", "--bandwidth", "1.5", "--plot", str(png)]) == 0
    assert png.stat().st_size > 1000
    assert "coreset size: 16" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv,match",
    [
        (["missing.npy"], "not found"),
        (["{src}", "--size", "1000"], "coreset_size"),
        (["{src}", "--bandwidth", "wide"], "bandwidth"),
        (["{src3}", "--plot", "x.png"], "2-D"),
        (["{txt}"], ".npy or .csv"),
    ],
)
def test_cli_errors(tmp_path, capsys, argv, match):
    src = tmp_path / "pts.npy"
    np.save(src, np.random.default_rng(0).standard_normal((50, 2)))
    src3 = tmp_path / "pts3.npy"
    np.save(src3, np.zeros((50, 3)))
    txt = tmp_path / "pts.txt"
    txt.write_text("1,2\n")
    argv = [a.format(src=src, src3=src3, txt=txt) for a in argv]
    if argv[0] == "missing.npy":
        argv[0] = str(tmp_path / "missing.npy")
    assert _run(argv) != 0
    assert match in capsys.readouterr().err


def test_cli_rejects_unknown_kernel_and_method():
    with pytest.raises(SystemExit):
        _parser().parse_args(["x.npy", "--kernel", "rbf"])
    with pytest.raises(SystemExit):
        _parser().parse_args(["x.npy", "--method", "herding"])


@pytest.mark.parametrize("method", ["kt", "kt+", "compresspp"])
def test_cli_size_n_returns_every_point(tmp_path, method):
    # a coreset as large as the input is the input itself (MMD 0), without repeats
    n = 3000
    src = tmp_path / "pts.npy"
    np.save(src, np.random.default_rng(2).standard_normal((n, 2)))
    out = tmp_path / "idx.npy"
    assert _run([str(src), "--size", str(n), "--method", method, "--out", str(out)]) == 0
    np.testing.assert_array_equal(np.load(out), np.arange(n))


@pytest.mark.parametrize("method", ["kt", "kt+", "compresspp"])
def test_cli_unique(tmp_path, method):
    # a dense cluster plus a few far points: plain KT-SWAP repeats cluster points here
    rng = np.random.default_rng(0)
    X = np.vstack([rng.standard_normal((400, 2)) * 0.05, rng.standard_normal((40, 2)) * 3])
    src = tmp_path / "pts.npy"
    np.save(src, X)
    out = tmp_path / "idx.npy"
    argv = [str(src), "--size", "100", "--method", method, "--bandwidth", "1", "--out", str(out)]
    assert _run(argv + ["--unique"]) == 0
    idx = np.load(out)
    assert idx.size == 100 and np.unique(idx).size == 100


def test_cli_memory_maps_npy_and_estimates_mmd_for_large_inputs(tmp_path, capsys, monkeypatch):
    # .npy inputs are memory-mapped (never read whole); above EXACT_MMD_MAX points the
    # reported MMDs are measured against a uniform sample and say so
    X = np.random.default_rng(3).standard_normal((800, 2))
    src = tmp_path / "pts.npy"
    np.save(src, X)
    assert isinstance(command._load(str(src)), np.memmap)
    monkeypatch.setattr(command, "EXACT_MMD_MAX", 200)
    out = tmp_path / "idx.npy"
    argv = [str(src), "--method", "compresspp", "--workers", "2", "--out", str(out)]
    assert _run(argv) == 0
    text = capsys.readouterr().out
    assert "estimated against 200 uniformly sampled input points" in text
    assert np.load(out).shape == (28,)
    assert _run([str(src), "--method", "compresspp", "--workers", "0"]) == 2
    assert "workers" in capsys.readouterr().err


def test_cli_never_replaces_an_existing_output_unless_forced(tmp_path, capsys):
    X = np.random.default_rng(0).standard_normal((256, 2))
    src = tmp_path / "pts.npy"
    np.save(src, X)
    for flag, name in (("--out", "idx.npy"), ("--plot", "plot.png")):
        target = tmp_path / name
        target.write_bytes(b"earlier result")
        assert _run([str(src), "--size", "16", flag, str(target)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and f"{flag} {target} already exists" in err
        assert target.read_bytes() == b"earlier result"
        assert _run([str(src), "--size", "16", flag, str(target), "--force"]) == 0
        assert target.read_bytes() != b"earlier result"
