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
