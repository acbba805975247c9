"""Thinning a real MCMC chain: a Lotka-Volterra ODE posterior sampled by emcee; not a test.

Usage (the reported run; one process, one thread):
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/thinning_posterior.py --n 65536 --seeds 0,1 \
        --sizes sqrt,1024 --stein-precon med,sclmed --tag posterior-v2
    .venv/bin/python benchmarks/thinning_posterior.py --report posterior-v2   # table again
Options: [--n 262144] [--sizes 256,1024] [--methods standard,iid,kt,kt+,compresspp,stein]
    [--stein-precon med] [--chain-seed 0] [--walkers 32] [--burn 1000] [--thin-by 4]
    [--threads 1] [--cache-dir bench_results] [--out benchmarks/results/thinning_posterior.jsonl]
    [--tag NAME]
Needs the posterior extra: pip install -c constraints.txt -e '.[posterior]'.

Model. Predator-prey populations u (prey) and v (predator):
    du/dt = alpha u - beta u v,    dv/dt = -gamma v + delta u v,    (u, v)(0) = (1, 1),
solved by scipy.integrate.solve_ivp (DOP853, rtol 1e-8). Data: both populations observed at
40 times in [0.5, 20] with Gaussian noise of known sd 0.2, simulated once (seed 12345) from
theta = (alpha, beta, gamma, delta) = (0.67, 1.33, 1.0, 1.0). Parameters are sampled on the log
scale, x = log theta, prior x_i ~ N(0, 1) truncated to |x_i| < 3 (far outside the posterior;
it keeps the ODE solver away from absurd rates during burn-in).

Sampler. emcee's affine-invariant ensemble (stretch move), ``--walkers`` walkers started in a
small ball around the posterior mode, ``--burn`` burn-in steps discarded, then every
``--thin-by``-th step kept until walkers x kept steps = n draws. emcee evaluates half the
walkers at a time, so the log posterior solves the ODE for the whole half at once: one
solve_ivp call on a stacked system (the step size is shared, the tolerance tight enough that
the shared error control changes no draw visibly). The chain is cached under
``--cache-dir`` as an ArviZ InferenceData netCDF file (posterior: alpha, beta, gamma, delta
and log_theta[4], walkers as chains; sample_stats: lp), so reruns skip sampling and
``distillkit thin FILE --vars log_theta`` runs on it.

Thinning. All methods thin x = log theta (the space the sampler ran in) to coreset_size
points: standard thinning (every k-th draw, counted back from the end of the flattened chain),
iid, distillkit kt, kt+ and compresspp (Gaussian kernel on draws standardised by the chain's
mean and sd, bandwidth by the median heuristic), and Stein thinning (stein_thinning.thin,
its default standardisation; preconditioners from ``--stein-precon``, default 'med'). Stein thinning needs the gradient
of the log posterior at every draw; emcee never computes one, so it is computed afterwards by
solving the forward sensitivity equations dS/dt = J S + df/dtheta alongside the ODE (exact up
to the solver tolerance, checked against central finite differences at a few draws), batched
over draws; its time is reported separately as ``setup_seconds``.

Reported per method and seed: MMD to the full chain (distillkit.thinning.mmd, the same kernel,
on the standardised draws); KSD to the posterior with Stein thinning's IMQ Stein kernel, built
once from the full chain (its scaling and 'med' preconditioner) so every coreset is scored by
the same kernel; integration errors (distillkit.thinning.integration_error;
largest over components, in posterior-sd units) of the posterior mean, the variance (second
moment about the full chain's mean, in sd^2 units) and 5 kernel test functions
f_j(x) = k(x, z_j) at 5 draws z_j picked at random from the chain; and wall and CPU time of
the thinning call. Results are appended as JSON lines; a markdown table is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from scipy.integrate import solve_ivp
from scipy.optimize import minimize

from distillkit.thinning import Kernel

TRUE_THETA = np.array([0.67, 1.33, 1.0, 1.0])
NAMES = ("alpha", "beta", "gamma", "delta")
U0 = (1.0, 1.0)
T_OBS = np.linspace(0.5, 20.0, 40)
NOISE_SD = 0.2
DATA_SEED = 12345
PRIOR_SD, PRIOR_BOUND = 1.0, 3.0
RTOL, ATOL = 1e-8, 1e-10
METHODS = ("standard", "iid", "kt", "kt+", "compresspp", "stein")


# ---------------------------------------------------------------- model


def _lv_rhs(theta: np.ndarray):
    """Right-hand side for B stacked systems; theta is (4, B), the state (2 B,)."""
    a, b, c, d = theta

    def rhs(t, y):
        u, v = y.reshape(2, -1)
        return np.concatenate([a * u - b * u * v, -c * v + d * u * v])

    return rhs


def solve(theta: np.ndarray) -> np.ndarray:
    """Populations at T_OBS for each parameter row: (B, 2, len(T_OBS))."""
    theta = np.atleast_2d(theta).T
    B = theta.shape[1]
    y0 = np.repeat(np.asarray(U0), B)
    sol = solve_ivp(
        _lv_rhs(theta), (0.0, T_OBS[-1]), y0, method="DOP853", t_eval=T_OBS, rtol=RTOL, atol=ATOL
    )
    if not sol.success:
        return np.full((B, 2, T_OBS.size), np.nan)
    return sol.y.reshape(2, B, -1).transpose(1, 0, 2)


def simulate_data() -> np.ndarray:
    """Noisy observations (2, len(T_OBS)) of the true trajectory, from a fixed seed."""
    clean = solve(TRUE_THETA)[0]
    return clean + NOISE_SD * np.random.default_rng(DATA_SEED).standard_normal(clean.shape)


def log_posterior(x: np.ndarray, data: np.ndarray) -> np.ndarray:
    """Unnormalised log posterior of log-parameters x, (B, 4) -> (B,)."""
    x = np.atleast_2d(x)
    out = np.full(x.shape[0], -np.inf)
    ok = np.all(np.abs(x) < PRIOR_BOUND, axis=1)
    if ok.any():
        pred = solve(np.exp(x[ok]))
        resid = (pred - data[None]) / NOISE_SD
        lp = -0.5 * np.sum(resid**2, axis=(1, 2)) - 0.5 * np.sum((x[ok] / PRIOR_SD) ** 2, axis=1)
        out[ok] = np.where(np.isfinite(lp), lp, -np.inf)
    return out


def _sens_rhs(theta: np.ndarray):
    """ODE plus forward sensitivities S = d(u, v)/d theta for B stacked systems (10 B,)."""
    a, b, c, d = theta

    def rhs(t, y):
        Y = y.reshape(10, -1)  # rows: u, v, du/dtheta (4), dv/dtheta (4)
        u, v, su, sv = Y[0], Y[1], Y[2:6], Y[6:10]
        # Jacobian of f in (u, v), then df/dtheta columns for (alpha, beta, gamma, delta)
        j11, j12 = a - b * v, -b * u
        j21, j22 = d * v, -c + d * u
        dsu = j11 * su + j12 * sv
        dsv = j21 * su + j22 * sv
        dsu[0] += u
        dsu[1] -= u * v
        dsv[2] -= v
        dsv[3] += u * v
        return np.concatenate([a * u - b * u * v, -c * v + d * u * v, dsu.ravel(), dsv.ravel()])

    return rhs


def grad_log_posterior(x: np.ndarray, data: np.ndarray, batch: int = 2048) -> np.ndarray:
    """Gradient of log_posterior in x = log theta by the sensitivity equations, (n, 4)."""
    x = np.atleast_2d(x)
    out = np.empty_like(x, dtype=np.float64)
    for s in range(0, x.shape[0], batch):
        xb = x[s : s + batch]
        theta = np.exp(xb).T
        B = theta.shape[1]
        y0 = np.concatenate([np.repeat(np.asarray(U0), B), np.zeros(8 * B)])
        sol = solve_ivp(
            _sens_rhs(theta),
            (0.0, T_OBS[-1]),
            y0,
            method="DOP853",
            t_eval=T_OBS,
            rtol=RTOL,
            atol=ATOL,
        )
        if not sol.success:
            raise RuntimeError(f"sensitivity solve failed: {sol.message}")
        Y = sol.y.reshape(10, B, -1)
        pred, S = Y[:2], Y[2:].reshape(2, 4, B, -1)  # S[species, param, draw, time]
        w = (data[:, None, :] - pred) / NOISE_SD**2  # (2, B, T)
        g_theta = np.einsum("sbt,spbt->bp", w, S)
        out[s : s + batch] = g_theta * theta.T - xb / PRIOR_SD**2  # chain rule to log theta
    return out


def gradient_check(x: np.ndarray, data: np.ndarray, h: float = 1e-5) -> float:
    """Largest relative gap between grad_log_posterior and central finite differences at x."""
    g = grad_log_posterior(x, data)
    fd = np.empty_like(g)
    for j, e in enumerate(np.eye(x.shape[1]) * h):
        fd[:, j] = (log_posterior(x + e, data) - log_posterior(x - e, data)) / (2 * h)
    return float(np.max(np.abs(g - fd)) / np.max(np.abs(fd)))


def posterior_mode(data: np.ndarray) -> np.ndarray:
    """Maximum a posteriori log-parameters (Nelder-Mead from the prior mean)."""
    res = minimize(
        lambda x: -log_posterior(x, data)[0],
        np.zeros(4),
        method="Nelder-Mead",
        options={"xatol": 1e-6, "fatol": 1e-8, "maxiter": 4000},
    )
    return res.x


# ---------------------------------------------------------------- chain and its cache


def _chain_path(cache: Path, n: int, walkers: int, burn: int, thin_by: int, seed: int) -> Path:
    return cache / f"lotka_volterra_n{n}_w{walkers}_b{burn}_t{thin_by}_s{seed}.nc"


def sample_chain(
    n: int, walkers: int, burn: int, thin_by: int, seed: int, data: np.ndarray
) -> tuple[np.ndarray, np.ndarray, dict]:
    """emcee draws (kept steps, walkers, 4) of log theta, their log posterior, and stats."""
    import emcee

    if n % walkers:
        raise ValueError(f"--n ({n}) must be a multiple of --walkers ({walkers})")
    steps = n // walkers
    rng = np.random.default_rng(seed)
    mode = posterior_mode(data)
    p0 = mode + 1e-3 * rng.standard_normal((walkers, 4))
    sampler = emcee.EnsembleSampler(walkers, 4, lambda x: log_posterior(x, data), vectorize=True)
    sampler.random_state = np.random.RandomState(seed).get_state()
    t0 = time.perf_counter()
    state = sampler.run_mcmc(p0, burn, progress=False)
    sampler.reset()
    sampler.run_mcmc(state, steps, thin_by=thin_by, progress=False)  # steps kept
    seconds = time.perf_counter() - t0
    chain = sampler.get_chain()  # (steps, walkers, 4)
    lp = sampler.get_log_prob()
    tau = sampler.get_autocorr_time(quiet=True) * thin_by  # in sampler steps
    stats = {
        "sampler": f"emcee {emcee.__version__} stretch move",
        "walkers": walkers,
        "burn_in_steps": burn,
        "thin_by": thin_by,
        "kept_steps": steps,
        "chain_seed": seed,
        "acceptance": float(np.mean(sampler.acceptance_fraction)),
        "autocorr_steps": [float(t) for t in tau],
        "sampling_seconds": seconds,
        "posterior_mode": [float(v) for v in mode],
    }
    return chain, lp, stats


def write_inference_data(
    path: Path, chain: np.ndarray, lp: np.ndarray, data: np.ndarray, stats: dict
) -> None:
    """The chain as an ArviZ InferenceData netCDF-4 file (walkers are chains), never replacing one."""
    import h5netcdf
    import h5py

    draws = chain.transpose(1, 0, 2)  # (walkers, steps, 4): ArviZ's (chain, draw, ...)
    W, D = draws.shape[:2]
    tmp = path.with_name(path.name + ".partial")
    with h5netcdf.File(tmp, "w") as f:
        f.attrs["inference_library"] = "emcee"
        post = f.create_group("posterior")
        post.dimensions = {"chain": W, "draw": D, "log_theta_dim_0": 4}
        post.create_variable("chain", ("chain",), data=np.arange(W))
        post.create_variable("draw", ("draw",), data=np.arange(D))
        post.create_variable("log_theta_dim_0", ("log_theta_dim_0",), dtype=h5py.string_dtype())[
            ...
        ] = np.array(NAMES, dtype=object)
        post.create_variable(
            "log_theta", ("chain", "draw", "log_theta_dim_0"), data=draws.astype(np.float64)
        )
        for i, name in enumerate(NAMES):
            post.create_variable(name, ("chain", "draw"), data=np.exp(draws[:, :, i]))
        for key, value in stats.items():
            post.attrs[key] = value
        ss = f.create_group("sample_stats")
        ss.dimensions = {"chain": W, "draw": D}
        ss.create_variable("chain", ("chain",), data=np.arange(W))
        ss.create_variable("draw", ("draw",), data=np.arange(D))
        ss.create_variable("lp", ("chain", "draw"), data=lp.T.astype(np.float64))
        obs = f.create_group("observed_data")
        obs.dimensions = {"species": 2, "time": T_OBS.size}
        obs.create_variable("species", ("species",), dtype=h5py.string_dtype())[...] = np.array(
            ["prey", "predator"], dtype=object
        )
        obs.create_variable("time", ("time",), data=T_OBS)
        obs.create_variable("y", ("species", "time"), data=data)
    if path.exists():  # another run finished first: keep its file
        tmp.unlink()
        return
    os.replace(tmp, path)


def load_or_sample(args: argparse.Namespace, data: np.ndarray) -> tuple[np.ndarray, dict, Path]:
    """Draws (n, 4) of log theta, chain-major as `distillkit thin` reads them, and the stats."""
    from distillkit.thinning.io import read_posterior_table

    path = _chain_path(
        args.cache_dir, args.n, args.walkers, args.burn, args.thin_by, args.chain_seed
    )
    if not path.exists():
        print(f"sampling {args.n} draws with emcee ({args.walkers} walkers) ...", flush=True)
        chain, lp, stats = sample_chain(
            args.n, args.walkers, args.burn, args.thin_by, args.chain_seed, data
        )
        args.cache_dir.mkdir(parents=True, exist_ok=True)
        write_inference_data(path, chain, lp, data, stats)
        print(f"chain written to {path} ({stats['sampling_seconds']:.0f} s)", flush=True)
    else:
        print(f"chain read from {path}", flush=True)
    table = read_posterior_table(str(path), ["log_theta"])
    import h5netcdf

    with h5netcdf.File(path, "r") as f:
        stats = {k: _plain(v) for k, v in f.groups["posterior"].attrs.items()}
    return table.X, stats, path


def _plain(value):
    """netCDF attribute values as JSON-friendly Python values."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


# ---------------------------------------------------------------- thinning and scoring


def _machine() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            model = next(line.split(":", 1)[1].strip() for line in fh if "model name" in line)
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    return f"{model}, {os.cpu_count()} cores"


def thin(
    method: str,
    X: np.ndarray,
    Z: np.ndarray,
    kernel: Kernel,
    size: int,
    seed: int,
    grad: np.ndarray,
    precon: str | None = "med",
) -> np.ndarray:
    """Row indices of a coreset of `size` draws chosen by `method`."""
    from distillkit.thinning import compresspp, iid, kt, standard_thin

    if method == "standard":
        return standard_thin(X, coreset_size=size)
    if method == "iid":
        return iid(X, size, seed=seed)
    if method == "kt":
        return kt(Z, kernel, coreset_size=size, seed=seed)
    if method == "kt+":
        return kt(Z, kernel, coreset_size=size, split="plus", seed=seed)
    if method == "compresspp":
        return compresspp(Z, kernel, coreset_size=size, seed=seed)
    if method == "stein":
        from stein_thinning.thinning import thin as stein_thin

        return stein_thin(X, grad, size, preconditioner=precon).astype(np.int64)
    raise ValueError(f"unknown method {method!r}")


def stein_discrepancy(X: np.ndarray, grad: np.ndarray) -> Callable[[np.ndarray], float]:
    """KSD of a coreset to the posterior: Stein thinning's own IMQ Stein kernel, fixed once.

    Draws are standardised by the full chain's mean absolute deviation and the 'med'
    preconditioner is taken from the full chain, so every coreset is scored by one kernel.
    """
    from stein_thinning.kernel import make_imq

    scale = np.mean(np.abs(X - X.mean(axis=0)), axis=0)
    Xs, Gs = X / scale, grad * scale
    k0 = make_imq(Xs, "med")

    def ksd(idx: np.ndarray) -> float:
        A, B = Xs[idx], Gs[idx]
        m, total = len(idx), 0.0
        for s in range(0, m, 256):
            rows = np.repeat(np.arange(s, min(s + 256, m)), m)
            cols = np.tile(np.arange(m), min(s + 256, m) - s)
            total += float(k0(A[rows], A[cols], B[rows], B[cols]).sum())
        return float(np.sqrt(max(total, 0.0)) / m)

    return ksd


def score(Z: np.ndarray, kernel: Kernel, idx: np.ndarray, tests: dict) -> dict:
    """MMD to the full chain and the integration errors of the test functions."""
    from distillkit.thinning import integration_error, mmd

    out = {"mmd": mmd(Z, kernel, indices=idx)}
    for key, values in tests.items():
        err = np.atleast_1d(integration_error(Z, values, idx))
        out[key] = float(err.max())
        out[f"{key}_each"] = [float(e) for e in err]
    return out


def _sizes(text: str, n: int) -> list[int]:
    out = []
    for part in text.split(","):
        part = part.strip()
        out.append(int(round(np.sqrt(n))) if part == "sqrt" else int(part))
    if any(s < 1 or s > n for s in out):
        raise ValueError(f"--sizes must lie in [1, {n}], got {text}")
    return out


def _table(rows: list[dict]) -> str:
    head = "| method | coreset | seeds | MMD | KSD | mean err | var err | kernel err | wall s | CPU s |"
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    keys = []
    for r in rows:
        if (r["method"], r["coreset_size"]) not in keys:
            keys.append((r["method"], r["coreset_size"]))
    for method, size in keys:
        rs = [r for r in rows if r["method"] == method and r["coreset_size"] == size]

        def avg(k, rs=rs):
            vals = [r[k] for r in rs if r.get(k) is not None]
            return float(np.mean(vals)) if vals else float("nan")

        lines.append(
            f"| {method} | {size} | {len(rs)} | {avg('mmd'):.2e} | {avg('ksd'):.3f} | "
            f"{avg('mean_err'):.2e} | "
            f"{avg('var_err'):.2e} | {avg('kernel_err'):.2e} | {avg('seconds'):.2f} | {avg('cpu_seconds'):.2f} |"
        )
    return "\n".join(lines)


def _report(path: Path, tag: str) -> int:
    """Print the table of earlier results with this tag."""
    if not path.is_file():
        print(f"thinning_posterior: error: no results file {path}", file=sys.stderr)
        return 2
    with open(path) as fh:
        rows = [r for r in map(json.loads, fh) if r.get("tag") == tag]
    if not rows:
        print(f"thinning_posterior: error: no rows tagged {tag!r} in {path}", file=sys.stderr)
        return 2
    r = rows[0]
    print(f"n = {r['n']}, {r['machine']}, {r['threads']} thread(s), tag {tag}")
    print(_table(rows))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Sample (or read) the chain, thin it with every method, append results, print a table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1 << 16, help="draws in the chain (<= 2^18)")
    p.add_argument("--sizes", default="sqrt", help="coreset sizes, e.g. sqrt,1024")
    p.add_argument("--seeds", default="0,1", help="thinning seeds (kt, kt+, compresspp, iid)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--chain-seed", type=int, default=0)
    p.add_argument("--walkers", type=int, default=32)
    p.add_argument("--burn", type=int, default=1000, help="burn-in steps per walker")
    p.add_argument("--thin-by", type=int, default=4, help="keep every k-th emcee step")
    p.add_argument(
        "--stein-precon",
        default="med",
        help="stein_thinning preconditioners to run, comma-separated (id, med, sclmed, smpcov)",
    )
    p.add_argument("--threads", type=int, default=1, help="BLAS/OpenMP threads")
    p.add_argument("--cache-dir", type=Path, default=Path("bench_results"))
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/thinning_posterior.jsonl"))
    p.add_argument("--tag", default="")
    p.add_argument(
        "--report",
        metavar="TAG",
        default=None,
        help="print the table of the --out rows with this tag and exit (runs nothing)",
    )
    args = p.parse_args(argv)
    if args.report is not None:
        return _report(args.out, args.report)
    try:
        if not 16 <= args.n <= 1 << 18:
            raise ValueError(f"--n must lie in [16, 2^18], got {args.n}")
        sizes = _sizes(args.sizes, args.n)
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        bad = sorted(set(methods) - set(METHODS))
        if bad or not methods or not seeds:
            raise ValueError(f"--methods from {', '.join(METHODS)}; --seeds non-empty")
    except ValueError as exc:
        print(f"thinning_posterior: error: {exc}", file=sys.stderr)
        return 2
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=args.threads):
        return _run(args, sizes, seeds, methods)


def _run(args: argparse.Namespace, sizes: list[int], seeds: list[int], methods: list[str]) -> int:
    from distillkit.thinning import get_kernel

    data = simulate_data()
    X, stats, path = load_or_sample(args, data)
    n = X.shape[0]
    Z = (X - X.mean(axis=0)) / X.std(axis=0)
    kernel = get_kernel("gaussian", bandwidth="median").fit(Z)
    anchors = Z[np.random.default_rng(777).choice(n, 5, replace=False)]
    tests = {"mean_err": Z, "var_err": Z**2, "kernel_err": kernel(Z, anchors)}
    # gradients: Stein thinning's input, and the KSD column for every method
    t0 = time.perf_counter()
    grad = grad_log_posterior(X, data)
    setup = time.perf_counter() - t0
    check = gradient_check(X[np.random.default_rng(5).choice(n, 3, replace=False)], data)
    print(
        f"log-posterior gradients at {n} draws: {setup:.1f} s "
        f"(relative gap to finite differences at 3 draws: {check:.1e})",
        flush=True,
    )
    ksd = stein_discrepancy(X, grad)
    common = {
        "n": n,
        "d": X.shape[1],
        "chain": str(path),
        "bandwidth": float(kernel.sigma),
        "sampler": stats,
        "machine": _machine(),
        "threads": args.threads,
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "tag": args.tag,
    }
    rows = []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    precons = [v.strip() for v in args.stein_precon.split(",") if v.strip()]
    runs = [(m, None) for m in methods if m != "stein"]
    runs += [("stein", pc) for pc in precons] if "stein" in methods else []
    for size in sizes:
        for method, precon in runs:
            for seed in seeds if method not in ("standard", "stein") else [None]:
                w, c = time.perf_counter(), time.process_time()
                idx = thin(method, X, Z, kernel, size, seed or 0, grad, precon)
                idx = np.asarray(idx, dtype=np.int64)
                seconds, cpu = time.perf_counter() - w, time.process_time() - c
                name = method if precon is None else f"stein ({precon})"
                row = {"method": name, "coreset_size": size, "seed": seed}
                row.update(score(Z, kernel, idx, tests))
                row["ksd"] = ksd(idx)
                row.update(seconds=seconds, cpu_seconds=cpu, distinct=int(np.unique(idx).size))
                if method == "stein":
                    row.update(setup_seconds=setup, preconditioner=precon, grad_fd_gap=check)
                row.update(common)
                rows.append(row)
                with open(args.out, "a") as fh:  # append: earlier results are kept
                    fh.write(json.dumps(row) + "\n")
                print(
                    f"{name:14s} m={size} seed={seed}: MMD {row['mmd']:.3e}, {seconds:.2f} s",
                    flush=True,
                )
    print(f"\nn = {n}, {_machine()}, {args.threads} thread(s); results appended to {args.out}")
    print(_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
