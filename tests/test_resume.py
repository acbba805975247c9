"""Exact resume: 4 epochs straight equals 2 epochs, a killed process, and a resume for 2 more."""

from __future__ import annotations

import signal

import pytest
import torch

from distillkit.engine.checkpoint import load_checkpoint
from tests.helpers import cli_env, read_rows, run_cli, without_timing

# augmentation, momentum, weight decay, warm-up + cosine and a teacher all carry state across epochs
COMMON = [
    "model=cnn_small",
    "epochs=4",
    "batch_size=64",
    "lr=0.05",
    "warmup_epochs=1",
    "augment=true",
    "seed=3",
    "--quiet",
]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    proc = run_cli("train", "model=mlp", "epochs=1", f"out_dir={out}", "--quiet")
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.mark.parametrize("method", ["ce", "kd"])
def test_killed_and_resumed_run_equals_straight_run(tmp_path, teacher_dir, method):
    extra = [f"method={method}"] + ([f"teacher={teacher_dir}"] if method == "kd" else [])
    straight, broken = tmp_path / "straight", tmp_path / "broken"

    proc = run_cli("train", *COMMON, *extra, f"out_dir={straight}")
    assert proc.returncode == 0, proc.stderr

    proc = run_cli(
        "train", *COMMON, *extra, f"out_dir={broken}", env=cli_env(DISTILLKIT_KILL_AFTER_EPOCH="2")
    )
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr)
    assert load_checkpoint(broken / "checkpoints" / "last.pt")["epoch"] == 2
    assert not (broken / "metrics.json").exists()  # the killed run never finished

    proc = run_cli("resume", str(broken), "--quiet")
    assert proc.returncode == 0, proc.stderr

    a = load_checkpoint(straight / "checkpoints" / "last.pt")
    b = load_checkpoint(broken / "checkpoints" / "last.pt")
    assert a["epoch"] == b["epoch"] == 4
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert a["optimizers"].keys() == b["optimizers"].keys()
    for name in a["optimizers"]:
        states_a = a["optimizers"][name]["state"].values()
        states_b = b["optimizers"][name]["state"].values()
        for sa, sb in zip(states_a, states_b, strict=True):
            assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    rows_a, rows_b = read_rows(straight), read_rows(broken)
    assert len(rows_a) == len(rows_b) == 4
    assert without_timing(rows_a) == without_timing(rows_b)


def test_resume_can_extend_training(tmp_path):
    run = tmp_path / "run"
    assert run_cli("train", "model=mlp", "epochs=1", f"out_dir={run}", "--quiet").returncode == 0
    proc = run_cli("resume", str(run), "epochs=2", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert [r["epoch"] for r in read_rows(run)] == [1, 2]


def test_resume_of_missing_run_is_a_clear_error(tmp_path):
    proc = run_cli("resume", str(tmp_path / "nope"))
    assert proc.returncode == 2
    assert "checkpoint not found" in proc.stderr or "no checkpoint" in proc.stderr
