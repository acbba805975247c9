"""Compress++ with its bins as Dask tasks (optional ``dask`` extra).

Each bin is compressed by one task with the bin's own seed, exactly as ``compresspp``
does in one process, so the same seed gives the same coreset wherever the bins run. A
memory-mapped input is not shipped: each task opens the file and reads its own bin.
In-memory inputs are sent bin by bin. The final KT runs in the calling process.
"""

from __future__ import annotations

import mmap

import numpy as np

from .compress import (
    _check_g,
    _column_mean,
    _release,
    _stream_points,
    compress_bin,
    compresspp_plan,
    finish_compresspp,
)
from .kernels import Kernel, single_thread_blas
from .kt import _check_delta, _resolve_sizes, kt
from .mmd import resolve_kernel

__all__ = ["compresspp_dask"]

CONNECT_TIMEOUT = "10s"  # how long to try reaching a --scheduler address


def _file_spec(X: np.ndarray):
    """(path, offset, shape, dtype) when X is a whole memory-mapped file, else None."""
    if isinstance(X, np.memmap) and isinstance(X.base, mmap.mmap) and X.flags.c_contiguous:
        return (str(X.filename), int(X.offset), tuple(X.shape), X.dtype.str)
    return None


@single_thread_blas
def _bin_task(source, start, size, kernel, mean, g, delta, load, seed, swap) -> np.ndarray:
    """One Dask task: Compress(g) of one bin, read from a file spec or given as an array."""
    if isinstance(source, tuple):
        path, offset, shape, dtype = source
        X = np.memmap(path, dtype=np.dtype(dtype), mode="r", offset=offset, shape=shape)
        return compress_bin(kernel, X, start, size, mean, g, delta, load, seed, swap)
    return compress_bin(kernel, source, 0, size, mean, g, delta, load, seed, swap) + start


def _client(scheduler: str | None):
    try:
        from dask.distributed import Client, LocalCluster
    except ImportError as exc:
        raise ValueError(
            "Dask is not installed; install the extra: pip install 'distillkit[dask]'"
        ) from exc
    if scheduler:
        try:
            return Client(scheduler, timeout=CONNECT_TIMEOUT), None
        except (OSError, TimeoutError) as exc:
            raise ValueError(f"cannot reach the Dask scheduler at {scheduler}: {exc}") from exc
    cluster = LocalCluster(threads_per_worker=1, dashboard_address=None)
    return Client(cluster), cluster


def compresspp_dask(
    X: np.ndarray,
    kernel: Kernel | str = "gaussian",
    g: int = 4,
    coreset_size: int | None = None,
    seed: int | None = None,
    delta: float = 0.5,
    num_bins: int = 4,
    swap: bool = True,
    unique: bool = False,
    scheduler: str | None = None,
    client=None,
) -> np.ndarray:
    """Compress++ with one Dask task per bin; same seed, same coreset as ``compresspp``.

    Uses ``client`` if given, else connects to ``scheduler`` (an address), else starts a
    ``dask.distributed.LocalCluster`` for the call.
    """
    X = _stream_points(X)
    kernel = resolve_kernel(kernel, X)
    n = X.shape[0]
    g = _check_g(g)
    _check_delta(delta)
    if isinstance(num_bins, bool) or int(num_bins) != num_bins or num_bins < 1:
        raise ValueError(f"num_bins must be a positive integer, got {num_bins!r}")
    size, _ = _resolve_sizes(n, coreset_size, None)
    seeds = np.random.SeedSequence(seed).spawn(2)
    roots, g, load, delta_c, delta_kt = compresspp_plan(n, g, size, delta, num_bins)
    if roots is None:  # Compress would keep every point: plain KT, as compresspp does
        return kt(X, kernel, coreset_size=size, delta=delta, seed=seeds[1], unique=unique)
    mean = _column_mean(X)
    _release(X)
    bin_seeds = seeds[0].spawn(len(roots))
    spec = _file_spec(X)
    own = None
    if client is None:
        client, own = _client(scheduler)
    try:
        futures = []
        for i, (a, z) in enumerate(roots):
            src = spec if spec is not None else np.ascontiguousarray(X[a : a + z])
            args = (src, a, z, kernel, mean, g, delta_c, load, bin_seeds[i], swap)
            futures.append(client.submit(_bin_task, *args, pure=False))
        parts = client.gather(futures)
    finally:
        if own is not None:
            client.close()
            own.close()
    return finish_compresspp(X, kernel, parts, size, delta_kt, seeds[1], unique)
