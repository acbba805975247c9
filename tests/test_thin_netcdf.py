"""`distillkit thin` on ArviZ InferenceData netcdf files: columns, printed names, errors."""

import subprocess
import sys

import numpy as np
import pytest

from tests.test_thin_cli import _run

h5netcdf = pytest.importorskip("h5netcdf")
h5py = pytest.importorskip("h5py")

CHAINS, DRAWS = 3, 40


def _posterior_arrays():
    rng = np.random.default_rng(0)
    return {
        "mu": rng.standard_normal((CHAINS, DRAWS)),
        "theta": rng.standard_normal((CHAINS, DRAWS, 2)),
        "count": rng.integers(0, 9, size=(CHAINS, DRAWS)),
    }


def _write_idata(path, posterior=True, with_label=True):
    """An InferenceData-layout netCDF-4 file, written the way xarray/ArviZ lay it out."""
    arrays = _posterior_arrays()
    with h5netcdf.File(path, "w") as f:
        group = f.create_group("posterior" if posterior else "prior")
        group.dimensions = {"chain": CHAINS, "draw": DRAWS, "theta_dim": 2}
        group.create_variable("chain", ("chain",), data=np.arange(CHAINS))
        group.create_variable("draw", ("draw",), data=np.arange(DRAWS))
        group.create_variable("theta_dim", ("theta_dim",), dtype=h5py.string_dtype())[...] = (
            np.array(["a", "b"], dtype=object)
        )
        group.create_variable("mu", ("chain", "draw"), data=arrays["mu"])
        group.create_variable("theta", ("chain", "draw", "theta_dim"), data=arrays["theta"])
        group.create_variable("count", ("chain", "draw"), data=arrays["count"])
        if with_label:
            lab = group.create_variable("label", ("chain", "draw"), dtype=h5py.string_dtype())
            lab[...] = np.full((CHAINS, DRAWS), "x", dtype=object)
        stats = f.create_group("sample_stats")
        stats.dimensions = {"chain": CHAINS, "draw": DRAWS}
        stats.create_variable("lp", ("chain", "draw"), data=np.zeros((CHAINS, DRAWS)))
    return arrays


def _flat(a):
    # chains x draws -> rows, chain-major (row = chain * DRAWS + draw)
    return a.reshape(CHAINS * DRAWS, -1)


def test_reads_posterior_columns_default_every_numeric_variable(tmp_path):
    from distillkit.thinning.io import read_posterior

    src = tmp_path / "idata.nc"
    arrays = _write_idata(src)
    X, names = read_posterior(str(src))
    assert names == ["mu", "theta[a]", "theta[b]", "count"]
    want = np.hstack([_flat(arrays["mu"]), _flat(arrays["theta"]), _flat(arrays["count"])])
    np.testing.assert_array_equal(X, want)
    assert X.dtype == np.float64


def test_vars_choose_and_order_columns(tmp_path):
    from distillkit.thinning.io import read_posterior

    src = tmp_path / "idata.nc"
    arrays = _write_idata(src)
    X, names = read_posterior(str(src), ["theta", "mu"])
    assert names == ["theta[a]", "theta[b]", "mu"]
    np.testing.assert_array_equal(X, np.hstack([_flat(arrays["theta"]), _flat(arrays["mu"])]))


def test_cli_prints_names_and_writes_them_with_the_indices(tmp_path, capsys):
    src = tmp_path / "idata.nc"
    arrays = _write_idata(src)
    out = tmp_path / "core.npz"
    argv = [str(src), "--vars", "mu,theta", "--size", "11", "--out", str(out)]
    assert _run(argv) == 0
    text = capsys.readouterr().out
    assert "variables: mu, theta[a], theta[b]" in text
    assert f"n={CHAINS * DRAWS}, d=3" in text
    saved = np.load(out)
    assert list(saved["columns"]) == ["mu", "theta[a]", "theta[b]"]
    idx = saved["indices"]
    assert idx.shape == (11,) and idx.dtype == np.int64
    # chain and draw of every coreset row point back at the same posterior draw
    np.testing.assert_array_equal(
        arrays["mu"][saved["chain"], saved["draw"]], _flat(arrays["mu"])[idx, 0]
    )


def test_cli_npy_out_from_netcdf_still_holds_indices(tmp_path, capsys):
    src = tmp_path / "idata.nc"
    _write_idata(src)
    out = tmp_path / "idx.npy"
    assert _run([str(src), "--vars", "mu", "--size", "7", "--out", str(out)]) == 0
    assert np.load(out).shape == (7,)
    assert "variables: mu" in capsys.readouterr().out


def test_vars_rejected_for_npy(tmp_path, capsys):
    src = tmp_path / "pts.npy"
    np.save(src, np.zeros((20, 2)))
    assert _run([str(src), "--vars", "a"]) == 2
    assert "--vars" in capsys.readouterr().err


@pytest.mark.parametrize(
    "case,match",
    [
        ("no_posterior", "no 'posterior' group"),
        ("unknown_var", "unknown variable 'sigma'"),
        ("string_var", "'label' is not numeric"),
        ("not_netcdf", "not a netCDF file"),
        ("netcdf3", "netCDF-3"),
        ("empty_vars", "--vars"),
    ],
)
def test_netcdf_errors_are_one_line_exit_2(tmp_path, capsys, case, match):
    src = tmp_path / "idata.nc"
    argv = [str(src)]
    if case == "no_posterior":
        _write_idata(src, posterior=False)
    elif case == "unknown_var":
        _write_idata(src)
        argv += ["--vars", "mu,sigma"]
    elif case == "string_var":
        _write_idata(src)
        argv += ["--vars", "label"]
    elif case == "not_netcdf":
        src.write_text("chain,draw\n1,2\n")
    elif case == "netcdf3":
        from scipy.io import netcdf_file

        with netcdf_file(src, "w") as f:
            f.createDimension("draw", 4)
            f.createVariable("mu", "d", ("draw",))[:] = np.arange(4.0)
    elif case == "empty_vars":
        _write_idata(src)
        argv += ["--vars", ","]
    assert _run(argv) == 2
    err = capsys.readouterr().err
    assert match in err, err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_reader_imports_no_torch_and_npy_path_needs_no_h5netcdf(tmp_path):
    src = tmp_path / "idata.nc"
    _write_idata(src)
    npy = tmp_path / "pts.npy"
    np.save(npy, np.random.default_rng(0).standard_normal((64, 2)))
    code = (
        "import sys, argparse\n"
        "from distillkit.thinning import command\n"
        "p = argparse.ArgumentParser(); command.add_arguments(p)\n"
        f"assert command.main(p.parse_args([{str(npy)!r}, '--size', '8'])) == 0\n"
        "assert 'h5netcdf' not in sys.modules and 'h5py' not in sys.modules\n"
        f"assert command.main(p.parse_args([{str(src)!r}, '--size', '8'])) == 0\n"
        "assert 'h5netcdf' in sys.modules and 'torch' not in sys.modules\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_posterior_benchmark_chain_file_reads_back_and_is_never_replaced(tmp_path):
    import importlib.util
    from pathlib import Path

    from distillkit.thinning.io import read_posterior_table

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location(
        "thinning_posterior_bench", root / "benchmarks" / "thinning_posterior.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rng = np.random.default_rng(4)
    chain = rng.standard_normal((6, 5, 4))  # emcee's (kept steps, walkers, parameters)
    lp = rng.standard_normal((6, 5))
    data = np.zeros((2, bench.T_OBS.size))
    path = tmp_path / "chain.nc"
    bench.write_inference_data(path, chain, lp, data, {"walkers": 5})
    table = read_posterior_table(str(path), ["log_theta"])
    assert table.columns == [f"log_theta[{v}]" for v in ("alpha", "beta", "gamma", "delta")]
    # walkers are ArviZ chains: row = walker * steps + step
    np.testing.assert_array_equal(table.X, chain.transpose(1, 0, 2).reshape(30, 4))
    assert (table.chains, table.draws) == (5, 6)
    before = path.read_bytes()
    bench.write_inference_data(path, chain + 1.0, lp, data, {"walkers": 5})
    assert path.read_bytes() == before
    assert not list(tmp_path.glob("*.partial"))
