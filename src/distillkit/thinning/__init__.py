"""Kernel thinning: kernels, KT / KT+ / power KT, Compress++, baselines and MMD (numpy/scipy)."""

from .compress import compress, compresspp
from .kernels import (
    IMQ,
    KERNELS,
    BSpline,
    Gaussian,
    Kernel,
    Laplace,
    Matern,
    Sinc,
    SumKernel,
    get_kernel,
    median_bandwidth,
)
from .kt import iid, kt, kt_split, kt_swap, split_kernel_for, standard_thin
from .mmd import integration_error, kernel_row_means, mmd, mmd_to_gaussian

__all__ = [
    "Kernel",
    "Gaussian",
    "Laplace",
    "Matern",
    "IMQ",
    "Sinc",
    "BSpline",
    "SumKernel",
    "KERNELS",
    "get_kernel",
    "median_bandwidth",
    "kt",
    "kt_split",
    "kt_swap",
    "split_kernel_for",
    "standard_thin",
    "iid",
    "compress",
    "compresspp",
    "mmd",
    "mmd_to_gaussian",
    "kernel_row_means",
    "integration_error",
]
