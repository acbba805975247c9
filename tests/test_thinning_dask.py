"""Compress++ bins as Dask tasks: same seed, same coreset as the single-process run."""

import argparse

import numpy as np
import pytest

from distillkit.thinning import Gaussian, command, compresspp

distributed = pytest.importorskip("dask.distributed")
import distillkit.thinning.distributed as dist_mod  # noqa: E402
from distillkit.thinning.distributed import compresspp_dask  # noqa: E402


@pytest.fixture(scope="module")
def client():
    # threads in this process: starts in about a second, unlike worker processes
    cluster = distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None
    )
    with distributed.Client(cluster) as c:
        yield c
    cluster.close()


def test_dask_same_coreset_as_single_process(client, tmp_path):
    X = np.random.default_rng(0).standard_normal((6000, 2))
    k = Gaussian(2.0)
    want = compresspp(X, k, g=2, seed=3)
    np.testing.assert_array_equal(compresspp_dask(X, k, g=2, seed=3, client=client), want)
    # a memory-mapped file: each task reads its own bin from disk
    np.save(tmp_path / "pts.npy", X)
    mm = np.load(tmp_path / "pts.npy", mmap_mode="r")
    np.testing.assert_array_equal(compresspp_dask(mm, k, g=2, seed=3, client=client), want)


def test_cli_dask_errors(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(dist_mod, "CONNECT_TIMEOUT", "1s")
    p = argparse.ArgumentParser()
    command.add_arguments(p)
    src = tmp_path / "pts.npy"
    np.save(src, np.zeros((50, 2)))
    assert command.main(p.parse_args([str(src), "--dask", "--method", "kt"])) == 2
    assert "need --method compresspp" in capsys.readouterr().err
    X = np.random.default_rng(1).standard_normal((3000, 2))
    np.save(src, X)
    argv = [str(src), "--method", "compresspp", "--scheduler", "tcp://127.0.0.1:9"]
    assert command.main(p.parse_args(argv)) == 2
    assert "Dask scheduler" in capsys.readouterr().err
