"""The worker pool the benchmark scripts share: independent runs, inline or in spawned processes.

Every job runs with `threads_per_worker` torch/OpenMP threads; a job that raises becomes a
`JobError` (a one-line message naming the job, the traceback kept in the record) and the other
jobs go on; results reach the parent's `on_result` as each job finishes, so a script can write its
results file incrementally; Ctrl-C cancels the jobs not yet started and is raised again.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distillkit.runner import RunInterrupted

THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


@dataclass(frozen=True)
class Job:
    """One unit of work: a name for messages and the arguments of the worker function."""

    name: str
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class JobError:
    """A failed job: its name, a one-line message and the full traceback text."""

    name: str
    message: str
    traceback: str

    def line(self) -> str:
        """`NAME FAILED: ExcType: first line of the message`, on one line."""
        return f"{self.name} FAILED: {self.message}"

    def save(self, path: Path) -> Path:
        """Write the traceback to path (its folder is created) and return path."""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.traceback)
        return path


def error_record(name: str, exc: BaseException) -> JobError:
    """The JobError of an exception raised by (or while running) the job called name."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    message = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return JobError(name, message, tb)


def print_error(error: JobError) -> None:
    """The default on_error: the one-line message on stderr."""
    print(error.line(), file=sys.stderr, flush=True)


def set_threads(n: int) -> None:
    """Use n torch intra-op threads here, and tell OpenMP/MKL (and any child process) the same."""
    import torch

    for var in THREAD_VARS:
        os.environ[var] = str(n)
    torch.set_num_threads(n)


@contextmanager
def _threads_set(n: int) -> Iterator[None]:
    """set_threads(n) for the block, then the previous settings again."""
    import torch

    before = torch.get_num_threads()
    env = {var: os.environ.get(var) for var in THREAD_VARS}
    set_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
        for var, value in env.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value


def _init_worker(threads: int, initializer: Callable[..., Any] | None, initargs: tuple) -> None:
    """Worker process set-up: the thread count first, then the script's own initializer."""
    set_threads(threads)
    if initializer is not None:
        initializer(*initargs)


def run_jobs(
    jobs: list[Job],
    worker: Callable[..., Any],
    n_workers: int,
    threads_per_worker: int,
    on_result: Callable[[str, Any], None],
    on_error: Callable[[JobError], None] = print_error,
    initializer: Callable[..., Any] | None = None,
    initargs: tuple[Any, ...] = (),
) -> list[JobError]:
    """Run worker(*job.args, **job.kwargs) for every job; return the errors (also given to on_error).

    n_workers == 1 runs the jobs here, one after another; more starts that many spawned worker
    processes (worker and initializer must then be importable module-level functions).
    `initializer(*initargs)` runs once in each worker process (and once here when inline).
    """
    if n_workers < 1 or threads_per_worker < 1:
        raise ValueError(f"n_workers and threads_per_worker must be >= 1 ({n_workers=})")
    errors: list[JobError] = []

    def failed(error: JobError) -> None:
        errors.append(error)
        on_error(error)

    if n_workers == 1:
        with _threads_set(threads_per_worker):
            if initializer is not None:
                initializer(*initargs)
            for job in jobs:
                try:
                    value = worker(*job.args, **job.kwargs)
                except RunInterrupted as exc:  # Ctrl-C inside a run: stop, as between runs
                    raise KeyboardInterrupt(str(exc)) from exc
                except Exception as exc:  # one failed run must not stop the others
                    failed(error_record(job.name, exc))
                    continue
                on_result(job.name, value)
        return errors

    # spawned workers inherit the environment: OpenMP starts with the right thread count
    with _threads_set(threads_per_worker):
        pool = ProcessPoolExecutor(
            max_workers=n_workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker,
            initargs=(threads_per_worker, initializer, initargs),
        )
        try:
            pending: dict[Future, str] = {
                pool.submit(worker, *job.args, **job.kwargs): job.name for job in jobs
            }
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    try:
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                name = pending.pop(fut)
                try:
                    value = fut.result()
                except Exception as exc:  # the job raised, or its worker died (e.g. out of memory)
                    failed(error_record(name, exc))
                    continue
                on_result(name, value)
    except KeyboardInterrupt:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    return errors
