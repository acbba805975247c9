"""Exact resume of the black-box methods: a run killed after epoch 1 and resumed equals a straight run.

Weights (student, generator, discriminator), every optimizer and scheduler state, the method's
extra state (budget spent, answered pools, transfer set) and the metrics rows must all match. The
killed run is a CLI subprocess (DISTILLKIT_KILL_AFTER_EPOCH=1); the straight run and the resume run
in this process on one thread, as the subprocess does.
"""

from __future__ import annotations

import signal
from typing import Any

import pytest
import torch

from distillkit.cli import main
from distillkit.engine.checkpoint import load_checkpoint
from distillkit.runner import resume
from tests.helpers import cli_env, read_rows, run_cli, without_timing

COMMON = ["model=mlp", "batch_size=128", "seed=3", "lr=0.05", "warmup_epochs=0.5", "--quiet"]

CASES = {
    "blackbox_kd": ["epochs=2", "options.budget=300"],
    "blackbox_hard": ["epochs=2", "options.budget=300"],
    # GAN epochs 1 and 2 (the kill falls between them), distillation in epoch 3; two D/G updates
    # per batch and the IM queries spread over the GAN steps
    "mekd": [
        "epochs=3",
        "options.gan_epochs=2",
        "options.gan_steps_per_batch=2",
        "options.gen_width=16",
        "options.budget=400",
        "options.im_batch=16",
        "augment=false",
    ],
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # the subprocess runs with OMP_NUM_THREADS=1: same kernels
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("bb_teacher")
    args = ["train", "model=mlp", "epochs=1", "batch_size=32", "lr=0.1", "augment=false"]
    assert main([*args, f"out_dir={out}", "--quiet"]) == 0
    return out


def assert_same(a: Any, b: Any, where: str = "") -> None:
    """Tensors bit-equal, containers equal key by key, everything else ==."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), (where, a.keys(), b.keys())
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


@pytest.mark.parametrize("method", list(CASES))
def test_killed_and_resumed_blackbox_run_equals_straight_run(tmp_path, teacher_dir, method):
    args = ["distill", f"method={method}", f"teacher={teacher_dir}", *COMMON, *CASES[method]]
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    assert main([*args, f"out_dir={straight}"]) == 0

    proc = run_cli(*args, f"out_dir={broken}", env=cli_env(DISTILLKIT_KILL_AFTER_EPOCH="1"))
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr)
    assert load_checkpoint(broken / "checkpoints" / "last.pt")["epoch"] == 1
    resume(broken)

    a = load_checkpoint(straight / "checkpoints" / "last.pt")
    b = load_checkpoint(broken / "checkpoints" / "last.pt")
    epochs = int(CASES[method][0].split("=")[1])
    assert a["epoch"] == b["epoch"] == epochs
    expected = ["student", "generator", "discriminator"] if method == "mekd" else ["student"]
    assert sorted(a["optimizers"]) == sorted(expected)
    for key in ("model", "distiller", "optimizers", "schedulers", "scaler", "extra_state"):
        assert_same(a[key], b[key], key)
    assert a["extra_state"]["spent"] == a["teacher_queries"] > 0
    rows_a, rows_b = read_rows(straight), read_rows(broken)
    assert len(rows_a) == epochs
    assert without_timing(rows_a) == without_timing(rows_b)
    if method == "mekd":
        # the kill fell inside the GAN phase and the resumed run reached distillation
        assert "loss_gan_d" in rows_a[1] and "loss_align" in rows_a[2]
        assert not any(k.startswith("loss_anchor") for r in rows_a for k in r)
