"""Compress++ with its bins as Dask tasks (optional ``dask`` extra).

Each bin is compressed by one task with the bin's own seed, exactly as ``compresspp``
does in one process, so the same seed gives the same coreset wherever the bins run. A
memory-mapped input is not shipped: each task opens the file and reads its own bin.
In-memory inputs are sent bin by bin. The final KT runs in the calling process.
"""

from __future__ import annotations

import mmap

import numpy as np

from .compress import compress_bin, finish_compresspp, start_compresspp
from .kernels import Kernel, single_thread_blas

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
    X, kernel, done, setup = start_compresspp(
        X, kernel, g, coreset_size, seed, delta, num_bins, unique
    )
    if done is not None:
        return done
    spec = _file_spec(X)
    own = None
    if client is None:
        client, own = _client(scheduler)
    try:
        futures = []
        for (a, z), bin_args in zip(setup.roots, setup.bin_args):
            src = spec if spec is not None else np.ascontiguousarray(X[a : a + z])
            args = (src, a, z, kernel, *bin_args, swap)
            futures.append(client.submit(_bin_task, *args, pure=False))
        parts = client.gather(futures)
    finally:
        if own is not None:
            client.close()
            own.close()
    return finish_compresspp(X, kernel, parts, setup.size, setup.delta_kt, setup.seed_kt, unique)
