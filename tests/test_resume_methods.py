"""Exact resume of every supervised method: a run killed after epoch 1 (SIGKILL, through the CLI)
and resumed ends with the same weights, optimizer state and metrics as an uninterrupted run.

Tiny on purpose: 30% of digits (7 steps an epoch), 2 epochs, mlp or cnn_small. The uninterrupted
run and the resume run in this process (one thread, as the child's OMP_NUM_THREADS=1), so only
the killed run pays for an interpreter start.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch

from distillkit.config import load_config
from distillkit.engine.checkpoint import load_checkpoint
from distillkit.runner import resume, run
from tests.helpers import cli_env, read_rows, run_cli, without_timing

# warm-up, cosine, momentum, crop/flip augmentation and a random subset all carry across epochs
COMMON = [
    "epochs=2",
    "batch_size=64",
    "subset.method=random",
    "subset.fraction=0.3",
    "lr=0.05",
    "warmup_epochs=0.5",
    "augment=true",
    "seed=5",
    "device=cpu",
    "quiet=true",
]

METHODS: dict[str, list[str]] = {
    "ce": ["method=ce", "model=mlp"],
    "kd": ["method=kd", "model=mlp", "options.temperature=3", "options.alpha=0.2"],
    "fitnet": ["method=fitnet", "model=cnn_small", "options.hint_weight=1"],
    # mixup draws from the RNG every step: resumed RNG state must continue the same stream
    "kd_da": ["method=kd_da", "model=mlp", "options.augmentation=mixup"],
    # the stage (a buffer) and the anneal share follow the epoch across the kill
    "stablekd": [
        "method=stablekd",
        "model=cnn_small",
        "options.blocks_per_stage=[2, 1]",
        "options.stage_epochs=[1, 1]",
        "options.out_connector=always",
    ],
}


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("teacher")
    args = ["model=cnn_small", "epochs=1", "augment=false", "subset.method=random"]
    args += ["subset.fraction=0.3", "device=cpu", "quiet=true", f"out_dir={out}"]
    run(load_config(None, args))
    return out


def _assert_same_tensors(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for key in a:
        assert torch.equal(a[key], b[key]), (what, key)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_killed_after_epoch_one_and_resumed_equals_straight_run(tmp_path, teacher_dir, method):
    args = [*COMMON, *METHODS[method]]
    if method != "ce":
        args.append(f"teacher={teacher_dir}")
    straight, broken = tmp_path / "straight", tmp_path / "broken"

    run(load_config(None, [*args, f"out_dir={straight}"]))

    env = cli_env(DISTILLKIT_KILL_AFTER_EPOCH="1")
    proc = run_cli("train", *args, f"out_dir={broken}", env=env)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr)
    assert load_checkpoint(broken / "checkpoints" / "last.pt")["epoch"] == 1
    assert not (broken / "metrics.json").exists()  # the killed run never finished
    resume(broken)

    a = load_checkpoint(straight / "checkpoints" / "last.pt")
    b = load_checkpoint(broken / "checkpoints" / "last.pt")
    assert a["epoch"] == b["epoch"] == 2 and a["global_step"] == b["global_step"]
    _assert_same_tensors(a["model"], b["model"], "model")
    _assert_same_tensors(a["distiller"], b["distiller"], "distiller")
    assert a["optimizers"].keys() == b["optimizers"].keys()
    for name in a["optimizers"]:
        states_a = a["optimizers"][name]["state"].values()
        states_b = b["optimizers"][name]["state"].values()
        for sa, sb in zip(states_a, states_b, strict=True):
            _assert_same_tensors(sa, sb, f"optimizer {name}")
    rows_a, rows_b = read_rows(straight), read_rows(broken)
    assert [r["epoch"] for r in rows_a] == [1, 2]
    assert without_timing(rows_a) == without_timing(rows_b)
