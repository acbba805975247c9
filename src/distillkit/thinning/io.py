"""Read MCMC draws from an ArviZ InferenceData netCDF file as a 2-D array with named columns.

An InferenceData file is netCDF-4 (HDF5) with one group per stage; the ``posterior`` group
holds variables whose leading dimensions are ``(chain, draw)``. Rows of the returned array
are the draws flattened chain-major (row = chain * n_draws + draw); columns are the chosen
variables, each vector- or matrix-valued variable expanded into one column per element.
The reader uses h5netcdf (on h5py), imported only when a netCDF file is read.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["NETCDF_EXTENSIONS", "PosteriorTable", "is_netcdf_path", "read_posterior"]

NETCDF_EXTENSIONS = (".nc", ".nc4", ".netcdf")
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
_INSTALL_HINT = "pip install 'distillkit[posterior]'"


@dataclass
class PosteriorTable:
    """Draws as rows (chain-major), one named column per scalar element of each variable."""

    X: np.ndarray
    columns: list[str]
    chains: int
    draws: int

    def chain_draw(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The (chain, draw) position of each row index."""
        rows = np.asarray(rows, dtype=np.int64)
        return rows // self.draws, rows % self.draws


def is_netcdf_path(path: str) -> bool:
    """True when path names a netCDF file by its extension."""
    return os.path.splitext(path)[1].lower() in NETCDF_EXTENSIONS


def _open(path: str):
    """The file opened with h5netcdf, or a ValueError saying why it cannot be read."""
    with open(path, "rb") as fh:
        head = fh.read(8)
    if head[:3] == b"CDF":
        raise ValueError(f"{path} is a netCDF-3 file; ArviZ InferenceData is netCDF-4 with groups")
    if head != _HDF5_MAGIC:
        raise ValueError(f"{path} is not a netCDF file (expected netCDF-4/HDF5)")
    try:
        import h5netcdf
        import h5py  # noqa: F401  (h5netcdf's backend; checked here for a clear message)
    except ImportError as exc:
        raise ValueError(f"reading .nc files needs h5netcdf and h5py: {_INSTALL_HINT}") from exc
    try:
        # phony_dims: plain HDF5 datasets without netCDF dimensions still open
        return h5netcdf.File(path, "r", phony_dims="access")
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path} is not a readable netCDF file: {exc}") from exc


def _labels(group, dim: str, size: int) -> list[str]:
    """Coordinate labels of a dimension (its coordinate variable), else 0..size-1."""
    if dim in group.variables:
        values = np.asarray(group.variables[dim][...]).reshape(-1)
        if values.size == size:
            return [v.decode() if isinstance(v, bytes) else str(v) for v in values.tolist()]
    return [str(i) for i in range(size)]


def _column_names(group, name: str, dims: tuple[str, ...], shape: tuple[int, ...]) -> list[str]:
    if len(shape) == 2:
        return [name]
    labels = [_labels(group, d, s) for d, s in zip(dims[2:], shape[2:])]
    return [
        f"{name}[{', '.join(labels[k][i] for k, i in enumerate(pos))}]"
        for pos in np.ndindex(*shape[2:])
    ]


def _is_numeric(var) -> bool:
    try:
        return np.dtype(var.dtype).kind in "fiu"
    except TypeError:  # h5py special types (strings, enums) are not numpy dtypes
        return False


def _has_chain_draw(var) -> bool:
    return tuple(var.dimensions[:2]) == ("chain", "draw")


def read_posterior_table(
    path: str, var_names: Sequence[str] | None = None, group: str = "posterior"
) -> PosteriorTable:
    """Read the chosen variables (default: every numeric one) of an InferenceData group."""
    if not os.path.isfile(path):
        raise ValueError(f"input file not found: {path}")
    with _open(path) as f:
        if group not in f.groups:
            found = ", ".join(sorted(f.groups)) or "none"
            raise ValueError(f"{path} has no '{group}' group (groups: {found})")
        g = f.groups[group]
        data_vars = [v for v in g.variables if v not in g.dimensions]
        if var_names is None:
            chosen = [v for v in data_vars if _is_numeric(g.variables[v])]
            chosen = [v for v in chosen if _has_chain_draw(g.variables[v])]
            if not chosen:
                raise ValueError(f"{path}: '{group}' has no numeric (chain, draw) variables")
        else:
            chosen = list(var_names)
            for v in chosen:
                if v not in data_vars:
                    known = ", ".join(data_vars) or "none"
                    raise ValueError(f"unknown variable '{v}' in '{group}' (variables: {known})")
                if not _is_numeric(g.variables[v]):
                    raise ValueError(f"variable '{v}' is not numeric ({g.variables[v].dtype})")
        blocks, columns, rows = [], [], None
        for v in chosen:
            var = g.variables[v]
            if not _has_chain_draw(var):
                raise ValueError(
                    f"variable '{v}' has dimensions {tuple(var.dimensions)}, "
                    "expected (chain, draw, ...)"
                )
            shape = tuple(var.shape)
            rows = shape[0] * shape[1]
            columns += _column_names(g, v, tuple(var.dimensions), shape)
            blocks.append(np.asarray(var[...], dtype=np.float64).reshape(rows, -1))
        chains, draws = tuple(g.variables[chosen[0]].shape[:2])
    if not rows:
        raise ValueError(f"{path}: '{group}' has no draws")
    return PosteriorTable(np.hstack(blocks), columns, int(chains), int(draws))


def read_posterior(
    path: str, var_names: Sequence[str] | None = None, group: str = "posterior"
) -> tuple[np.ndarray, list[str]]:
    """(draws x columns array, column names) from an ArviZ InferenceData netCDF file."""
    table = read_posterior_table(path, var_names, group)
    return table.X, table.columns
