"""Kernels for kernel thinning, evaluated blockwise with matrix products (numpy/scipy only).

Conventions
-----------
* Every kernel is normalised so that ``k(x, x) = 1``; the sup-norm is therefore 1 for the
  built-in kernels (``sup_norm`` is still exposed because KT+ divides by it).
* ``sigma`` (``theta`` for sinc) may be the string ``"median"``; ``kernel.fit(X)`` returns a
  copy with a numeric bandwidth (median pairwise distance of a seeded subsample of X).
  The thinning algorithms call ``fit`` themselves.
* Matern follows the kernel-thinning papers: ``nu`` is the exponent of the Fourier
  transform ``(1 + sigma^2 |w|^2)^(-nu)``, so ``nu > d/2`` is required and Laplace is
  ``Matern(nu=(d+1)/2)``. The familiar ML smoothness is ``nu - d/2``.
* Power kernels depend on the dimension for some families, so ``power(alpha, d)`` takes the
  dimension explicitly (the algorithms pass ``X.shape[1]``). Power kernels are returned
  normalised (``k_alpha(x, x) = 1``); KT is invariant to the kernel's scale.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass, field, replace

import numpy as np
from scipy import special
from scipy.spatial.distance import pdist

__all__ = [
    "Kernel",
    "Gaussian",
    "Laplace",
    "Matern",
    "IMQ",
    "Sinc",
    "BSpline",
    "SumKernel",
    "get_kernel",
    "KERNELS",
    "median_bandwidth",
]

Bandwidth = float | str


def single_thread_blas(fn):
    """Run fn with BLAS limited to one thread when threadpoolctl is available.

    The kernel blocks are skinny GEMMs (inner dimension d + 2) that are memory-bound;
    OpenBLAS worker threads gain little there and spin badly when the cores are shared
    (measured 0.8 s vs 9 s for kt at n = 2^14 on a busy 2-core machine). threadpoolctl
    ships with scikit-learn; without it this is a no-op.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:  # optional: numpy/scipy remain the only requirements
            ctx = contextlib.nullcontext()
        else:
            ctx = threadpool_limits(limits=1, user_api="blas")
        with ctx:
            return fn(*args, **kwargs)

    return wrapper


def check_points(X: np.ndarray, name: str = "X") -> np.ndarray:
    """Validate a finite, non-empty 2-D array and return it as float64."""
    try:
        arr = np.asarray(X, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a numeric 2-D array") from exc
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D (n, d), got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{name} must be non-empty, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or inf")
    return arr


def median_bandwidth(X: np.ndarray, max_points: int = 1000, seed: int = 0) -> float:
    """Median pairwise Euclidean distance of (a seeded subsample of) X."""
    if isinstance(X, np.ndarray) and X.ndim == 2 and X.shape[0] > max_points:
        # subsample before converting: a large (memory-mapped) X is never copied whole
        idx = np.random.default_rng(seed).choice(X.shape[0], max_points, replace=False)
        X = X[np.sort(idx)]  # sorted reads; the median does not depend on the order
    X = check_points(X)
    if X.shape[0] > max_points:
        idx = np.random.default_rng(seed).choice(X.shape[0], max_points, replace=False)
        X = X[idx]
    vals = pdist(X)  # direct differences: exact, and the subsample keeps it small
    vals = vals[vals > 0]
    if vals.size == 0:
        return 1.0  # all points identical: any bandwidth gives the same thinning
    return float(np.median(vals))


def _augment(X: np.ndarray, Y: np.ndarray, scale: float = 1.0):
    """Augmented factors with A @ B^T = scale * |x - y|^2 (one GEMM instead of 3 passes)."""
    sx = np.einsum("...i,...i->...", X, X)[..., None]
    sy = np.einsum("...i,...i->...", Y, Y)[..., None]
    A = np.concatenate([X, sx, np.ones_like(sx)], axis=-1)
    B = np.concatenate([-2.0 * Y, np.ones_like(sy), sy], axis=-1)
    if scale != 1.0:
        B *= np.asarray(scale, dtype=B.dtype)
    return A, B


def sqdist(X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances, supporting leading batch dimensions, clipped at 0."""
    if X.shape[-1] <= 8:
        # direct differences: exact at x = y, which matters for kernels with a cusp at 0
        # (Laplace, low-order Matern) in float32; the GEMM form loses ~1e-7 |x|^2 there
        out = None
        for j in range(X.shape[-1]):
            t = X[..., :, None, j] - Y[..., None, :, j]
            np.multiply(t, t, out=t)
            out = t if out is None else np.add(out, t, out=out)
        return out
    A, B = _augment(X, Y)
    D2 = np.matmul(A, np.swapaxes(B, -1, -2))
    np.maximum(D2, 0.0, out=D2)
    return D2


@dataclass(frozen=True)
class Kernel:
    """Base class: translation-invariant kernel normalised to k(x, x) = 1."""

    name = "kernel"
    radial = True  # value depends on |x - y|^2 only (lets KT share distance blocks)

    def __call__(self, X: np.ndarray, Y: np.ndarray | None = None, dtype=np.float64) -> np.ndarray:
        """Kernel matrix k(X, Y) with shape (..., n, m)."""
        self._check_fitted()
        X = np.asarray(X, dtype=dtype)
        Y = X if Y is None else np.asarray(Y, dtype=dtype)
        if X.ndim == 1:
            X = X[None, :]
        if Y.ndim == 1:
            Y = Y[None, :]
        if self.radial:
            return self.profile(sqdist(X, Y), X.shape[-1])
        return self._product(X, Y)

    def factor(self, Y: np.ndarray, dtype=np.float32) -> np.ndarray:
        """Precomputed right-hand operand for repeated evaluations ``eval_factor(X, F)``."""
        self._check_fitted()
        Y = np.asarray(Y, dtype=dtype)
        if not self.radial:
            return Y
        sy = np.einsum("...i,...i->...", Y, Y)[..., None]
        F = np.concatenate([-2.0 * Y, np.ones_like(sy), sy], axis=-1)
        scale = self._factor_scale()
        if scale != 1.0:
            F *= np.asarray(scale, dtype=F.dtype)
        return F

    def eval_factor(
        self, X: np.ndarray, F: np.ndarray, out: np.ndarray | None = None
    ) -> np.ndarray:
        """k(X, Y) for F = factor(Y); X and the result use F's dtype.

        out: a buffer of the result's shape for radial kernels (a fresh array of tens of
        MB is page-faulted anew on every call); same values either way.
        """
        if not self.radial:
            return self(X, F, dtype=F.dtype)
        X = np.asarray(X, dtype=F.dtype)
        sx = np.einsum("...i,...i->...", X, X)[..., None]
        A = np.concatenate([X, sx, np.ones_like(sx)], axis=-1)
        D = np.matmul(A, np.swapaxes(F, -1, -2), out=out)
        return self._finish(D, X.shape[-1])

    def _factor_scale(self) -> float:
        return 1.0

    def _finish(self, D: np.ndarray, d: int) -> np.ndarray:
        np.maximum(D, 0.0, out=D)
        return self.profile(D, d)

    def paired(self, X: np.ndarray, Y: np.ndarray) -> np.ndarray:
        """Row-wise values k(X[i], Y[i])."""
        self._check_fitted()
        X = np.asarray(X, dtype=np.float64)
        Y = np.asarray(Y, dtype=np.float64)
        if self.radial:
            diff = X - Y
            return self.profile(np.einsum("...i,...i->...", diff, diff), X.shape[-1])
        return self._product(X[..., :, None, :], Y[..., :, None, :])[..., 0, 0]

    def diag(self, X: np.ndarray) -> np.ndarray:
        """Diagonal k(x_i, x_i) (all ones for these normalised kernels)."""
        X = np.asarray(X)
        return np.ones(X.shape[:-1]) * self.sup_norm

    @property
    def sup_norm(self) -> float:
        """sup_{x,y} |k(x, y)|."""
        return 1.0

    def profile(self, D2: np.ndarray, d: int) -> np.ndarray:
        """Map squared distances to kernel values (may overwrite D2)."""
        raise NotImplementedError

    def _product(self, X: np.ndarray, Y: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    # bandwidth handling -------------------------------------------------
    _bw_field = "sigma"

    @property
    def is_fitted(self) -> bool:
        """True when the bandwidth is numeric."""
        return not isinstance(getattr(self, self._bw_field), str)

    def _check_fitted(self) -> None:
        if not self.is_fitted:
            raise ValueError(f"{self.name} kernel has bandwidth 'median'; call kernel.fit(X) first")

    def fit(self, X: np.ndarray) -> Kernel:
        """Return a copy with the median-heuristic bandwidth resolved on X."""
        bw = getattr(self, self._bw_field)
        if not isinstance(bw, str):
            return self
        if bw != "median":
            raise ValueError(f"bandwidth must be a positive number or 'median', got {bw!r}")
        med = median_bandwidth(X)
        value = 1.0 / med if self._bw_field == "theta" else med
        return replace(self, **{self._bw_field: value})

    # power kernels --------------------------------------------------------
    def power(self, alpha: float, d: int | None = None) -> Kernel:
        """Power kernel k_alpha (Fourier transform raised to alpha), normalised."""
        raise NotImplementedError

    def sqrt(self, d: int | None = None) -> Kernel:
        """Square-root kernel, i.e. power(1/2)."""
        return self.power(0.5, d)

    def default_alpha(self, d: int) -> float:
        """A valid alpha for power KT / KT+ (1/2 where allowed)."""
        return 0.5


def _check_bw(value: Bandwidth, name: str) -> None:
    if isinstance(value, str):
        if value != "median":
            raise ValueError(f"{name} must be a positive number or 'median', got {value!r}")
        return
    if not (np.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")


def _need_d(d: int | None, kernel: str) -> int:
    if d is None:
        raise ValueError(f"power kernel of {kernel} depends on the dimension: pass d")
    if int(d) < 1:
        raise ValueError(f"d must be >= 1, got {d}")
    return int(d)


def _check_alpha_range(alpha: float, kernel: str, lo: float, lo_open: bool = False) -> None:
    ok = (alpha > lo if lo_open else alpha >= lo) and alpha <= 1.0
    if not ok:
        br = "(" if lo_open else "["
        raise ValueError(
            f"invalid alpha={alpha} for {kernel} power kernel: valid alphas are {br}{lo:.6g}, 1]"
        )


@dataclass(frozen=True)
class Gaussian(Kernel):
    """Gaussian kernel exp(-|x-y|^2 / (2 sigma^2))."""

    sigma: Bandwidth = 1.0
    name = "gaussian"

    def __post_init__(self) -> None:
        _check_bw(self.sigma, "sigma")

    def profile(self, D2: np.ndarray, d: int) -> np.ndarray:
        D2 *= -0.5 / float(self.sigma) ** 2
        return np.exp(D2, out=D2)

    def _factor_scale(self) -> float:
        return -0.5 / float(self.sigma) ** 2

    def _finish(self, D: np.ndarray, d: int) -> np.ndarray:
        np.minimum(D, 0.0, out=D)
        return np.exp(D, out=D)

    def __call__(self, X: np.ndarray, Y: np.ndarray | None = None, dtype=np.float64) -> np.ndarray:
        """Kernel matrix k(X, Y) with shape (..., n, m)."""
        self._check_fitted()
        X = np.atleast_2d(np.asarray(X, dtype=dtype))
        Y = X if Y is None else np.atleast_2d(np.asarray(Y, dtype=dtype))
        # the scale is folded into the GEMM, leaving a single exp pass
        A, B = _augment(X, Y, -0.5 / float(self.sigma) ** 2)
        K = np.matmul(A, np.swapaxes(B, -1, -2))
        np.minimum(K, 0.0, out=K)
        return np.exp(K, out=K)

    def power(self, alpha: float, d: int | None = None) -> Kernel:
        # Fourier transform exp(-sigma^2 w^2/2) to the alpha scales the variance by alpha;
        # any alpha > 0 gives a valid kernel, the theory uses (0, 1].
        if not (0 < alpha <= 1):
            raise ValueError(
                f"invalid alpha={alpha} for gaussian power kernel: valid alphas are (0, 1]"
            )
        self._check_fitted()
        return Gaussian(float(self.sigma) * math.sqrt(alpha))


@dataclass(frozen=True)
class Matern(Kernel):
    """Matern kernel with Fourier transform (1 + sigma^2 w^2)^(-nu); needs nu > d/2."""

    nu: float = 1.5
    sigma: Bandwidth = 1.0
    name = "matern"

    def __post_init__(self) -> None:
        _check_bw(self.sigma, "sigma")
        if not self.nu > 0:
            raise ValueError(f"nu must be positive, got {self.nu}")

    def profile(self, D2: np.ndarray, d: int) -> np.ndarray:
        a = self.nu - d / 2.0
        if a <= 0:
            raise ValueError(f"Matern needs nu > d/2 (paper convention); got nu={self.nu}, d={d}")
        np.sqrt(D2, out=D2)
        D2 /= float(self.sigma)
        z = D2
        # closed forms for half-integer orders avoid the slow Bessel evaluation
        if abs(a - 0.5) < 1e-12:
            return np.exp(-z, out=z)
        if abs(a - 1.5) < 1e-12:
            return (1.0 + z) * np.exp(-z)
        if abs(a - 2.5) < 1e-12:
            return (1.0 + z + z * z / 3.0) * np.exp(-z)
        with np.errstate(invalid="ignore", over="ignore"):
            out = (2.0 ** (1.0 - a) / special.gamma(a)) * np.power(z, a) * special.kv(a, z)
        out[z == 0] = 1.0
        return np.nan_to_num(out, nan=1.0, copy=False).astype(D2.dtype, copy=False)

    def power(self, alpha: float, d: int | None = None) -> Kernel:
        d = _need_d(d, "matern")
        _check_alpha_range(alpha, "matern", d / (2.0 * self.nu), lo_open=True)
        return Matern(alpha * self.nu, self.sigma)

    def default_alpha(self, d: int) -> float:
        lo = d / (2.0 * self.nu)
        return max(0.5, 0.5 * (lo + 1.0)) if lo >= 0.5 else 0.5


@dataclass(frozen=True)
class Laplace(Kernel):
    """Laplace kernel exp(-|x-y| / sigma) = Matern(nu=(d+1)/2)."""

    sigma: Bandwidth = 1.0
    name = "laplace"

    def __post_init__(self) -> None:
        _check_bw(self.sigma, "sigma")

    def profile(self, D2: np.ndarray, d: int) -> np.ndarray:
        np.sqrt(D2, out=D2)
        D2 *= -1.0 / float(self.sigma)
        return np.exp(D2, out=D2)

    def power(self, alpha: float, d: int | None = None) -> Kernel:
        d = _need_d(d, "laplace")
        _check_alpha_range(alpha, "laplace", d / (d + 1.0), lo_open=True)
        return Matern(alpha * (d + 1) / 2.0, self.sigma)

    def default_alpha(self, d: int) -> float:
        return 0.5 * (d / (d + 1.0) + 1.0)


@dataclass(frozen=True)
class IMQ(Kernel):
    """Inverse multiquadric (1 + |x-y|^2 / sigma^2)^(-nu)."""

    nu: float = 0.5
    sigma: Bandwidth = 1.0
    name = "imq"

    def __post_init__(self) -> None:
        _check_bw(self.sigma, "sigma")
        if not self.nu > 0:
            raise ValueError(f"nu must be positive, got {self.nu}")

    def profile(self, D2: np.ndarray, d: int) -> np.ndarray:
        D2 *= 1.0 / float(self.sigma) ** 2
        np.log1p(D2, out=D2)
        D2 *= -self.nu
        return np.exp(D2, out=D2)

    def power(self, alpha: float, d: int | None = None) -> Kernel:
        if alpha == 1:
            return self
        if alpha != 0.5:
            raise ValueError(
                f"invalid alpha={alpha} for imq power kernel: valid alphas are 1/2 and 1"
            )
        d = _need_d(d, "imq")
        # root kernel of the paper's table: Matern with nu' = d/4 + nu/2 (needs nu > d/2)
        nu_rt = d / 4.0 + self.nu / 2.0
        if nu_rt <= d / 2.0:
            raise ValueError(f"imq root kernel needs nu > d/2; got nu={self.nu}, d={d}")
        return Matern(nu_rt, self.sigma)


@dataclass(frozen=True)
class Sinc(Kernel):
    """Product sinc kernel prod_j sin(theta (x_j - y_j)) / (theta (x_j - y_j))."""

    theta: Bandwidth = 1.0
    name = "sinc"
    radial = False
    _bw_field = "theta"

    def __post_init__(self) -> None:
        _check_bw(self.theta, "theta")

    def _product(self, X: np.ndarray, Y: np.ndarray) -> np.ndarray:
        th = float(self.theta) / math.pi  # np.sinc(t) = sin(pi t)/(pi t)
        out = None
        for j in range(X.shape[-1]):
            t = np.sinc(th * (X[..., :, None, j] - Y[..., None, :, j]))
            out = t if out is None else out * t
        return out

    def power(self, alpha: float, d: int | None = None) -> Kernel:
        # the Fourier transform is an indicator, so every power is the kernel itself
        if not (0 < alpha <= 1):
            raise ValueError(
                f"invalid alpha={alpha} for sinc power kernel: valid alphas are (0, 1]"
            )
        return self


def _cardinal_bspline(t: np.ndarray, p: int) -> np.ndarray:
    """Centred cardinal B-spline of order p (p-fold convolution of the unit box)."""
    out = np.zeros_like(t)
    s = t + p / 2.0
    for k in range(p + 1):
        out += (-1) ** k * math.comb(p, k) * np.maximum(s - k, 0.0) ** (p - 1)
    return out / math.factorial(p - 1)


@dataclass(frozen=True)
class BSpline(Kernel):
    """Product B-spline kernel of order 2*beta + 2 with scale sigma, normalised to 1 at 0."""

    beta: int = 1
    sigma: Bandwidth = 1.0
    name = "bspline"
    radial = False

    def __post_init__(self) -> None:
        _check_bw(self.sigma, "sigma")
        if int(self.beta) != self.beta or self.beta < 0:
            raise ValueError(f"beta must be a non-negative integer, got {self.beta}")

    def _product(self, X: np.ndarray, Y: np.ndarray) -> np.ndarray:
        p = 2 * int(self.beta) + 2
        norm = _cardinal_bspline(np.zeros(1), p)[0]
        out = None
        for j in range(X.shape[-1]):
            t = (X[..., :, None, j] - Y[..., None, :, j]) / float(self.sigma)
            v = _cardinal_bspline(t, p) / norm
            out = v if out is None else out * v
        return out

    def _valid_alphas(self) -> list[float]:
        b = int(self.beta)
        return [0.5, 1.0] if b % 2 == 1 else [(b + 2) / (2 * b + 2), 1.0]

    def power(self, alpha: float, d: int | None = None) -> Kernel:
        valid = self._valid_alphas()
        if not any(abs(alpha - v) < 1e-12 for v in valid):
            raise ValueError(
                f"invalid alpha={alpha} for bspline(beta={self.beta}) power kernel: "
                f"valid alphas are {sorted(set(valid))}"
            )
        if abs(alpha - 1.0) < 1e-12:
            return self
        b = int(self.beta)
        # sinc^(2b+2) to the alpha is sinc^(b+1) (odd b) or sinc^(b+2) (even b)
        return BSpline((b - 1) // 2 if b % 2 == 1 else b // 2, self.sigma)

    def sqrt(self, d: int | None = None) -> Kernel:
        return self.power(self._valid_alphas()[0], d)

    def default_alpha(self, d: int) -> float:
        return self._valid_alphas()[0]


@dataclass(frozen=True)
class SumKernel(Kernel):
    """Weighted sum of kernels (used for the KT+ split kernel)."""

    kernels: tuple = field(default_factory=tuple)
    weights: tuple = field(default_factory=tuple)
    name = "sum"

    @property
    def radial(self) -> bool:  # type: ignore[override]
        return all(k.radial for k in self.kernels)

    @property
    def is_fitted(self) -> bool:
        return all(k.is_fitted for k in self.kernels)

    def fit(self, X: np.ndarray) -> Kernel:
        return replace(self, kernels=tuple(k.fit(X) for k in self.kernels))

    def profile(self, D2: np.ndarray, d: int) -> np.ndarray:
        out = None
        for k, w in zip(self.kernels, self.weights):
            v = k.profile(D2.copy(), d) * w
            out = v if out is None else out + v
        return out

    def _product(self, X: np.ndarray, Y: np.ndarray) -> np.ndarray:
        return sum(w * k(X, Y, dtype=X.dtype) for k, w in zip(self.kernels, self.weights))

    def diag(self, X: np.ndarray) -> np.ndarray:
        return sum(w * k.diag(X) for k, w in zip(self.kernels, self.weights))

    @property
    def sup_norm(self) -> float:
        # an upper bound; exact for translation-invariant p.d. kernels (max at x = y)
        return float(sum(abs(w) * k.sup_norm for k, w in zip(self.kernels, self.weights)))

    def power(self, alpha: float, d: int | None = None) -> Kernel:
        raise ValueError("power kernels are not defined for a sum kernel")


KERNELS = {
    "gaussian": Gaussian,
    "laplace": Laplace,
    "matern": Matern,
    "imq": IMQ,
    "sinc": Sinc,
    "bspline": BSpline,
}


def get_kernel(name: str | Kernel, **params) -> Kernel:
    """Kernel by name; ``bandwidth`` is accepted as an alias for sigma (theta for sinc)."""
    if isinstance(name, Kernel):
        return name
    key = str(name).lower().replace("-", "").replace("_", "")
    if key not in KERNELS:
        raise ValueError(f"unknown kernel {name!r}; valid names: {sorted(KERNELS)}")
    cls = KERNELS[key]
    if "bandwidth" in params:
        bw = params.pop("bandwidth")
        params["theta" if cls is Sinc else "sigma"] = bw
    try:
        return cls(**params)
    except TypeError as exc:
        raise ValueError(f"bad parameters for kernel {key!r}: {exc}") from exc
