"""DDP with 2 gloo processes on CPU agrees with a single process at the same global batch."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from distillkit.engine.checkpoint import load_checkpoint
from tests.helpers import cli_env, read_rows, run_cli

# no BatchNorm and no augmentation: the only difference left is the order of float additions
COMMON = [
    "model=mlp",
    "epochs=2",
    "batch_size=64",
    "drop_last=true",
    "augment=false",
    "lr=0.05",
    "seed=1",
    "--quiet",
]


def torchrun(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += ["-m", "distillkit", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=cli_env(), timeout=180)


def test_two_process_ddp_matches_single_process(tmp_path):
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    proc = run_cli("train", *COMMON, f"out_dir={single}")
    assert proc.returncode == 0, proc.stderr
    proc = torchrun("train", *COMMON, f"out_dir={ddp}")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert "terminate called" not in proc.stderr

    a = load_checkpoint(single / "checkpoints" / "last.pt")
    b = load_checkpoint(ddp / "checkpoints" / "last.pt")
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], atol=1e-5, rtol=1e-4)
    summary = json.loads((ddp / "metrics.json").read_text())
    assert summary["world_size"] == 2
    rows_a, rows_b = read_rows(single), read_rows(ddp)
    for ra, rb in zip(rows_a, rows_b):
        assert abs(ra["test_acc"] - rb["test_acc"]) < 0.5  # at most one borderline sample flips
        assert abs(ra["train_loss"] - rb["train_loss"]) < 1e-4


def test_ddp_rejects_batch_not_divisible_by_world_size(tmp_path):
    proc = torchrun(
        "train", "model=mlp", "epochs=1", "batch_size=63", f"out_dir={tmp_path / 'x'}", "--quiet"
    )
    assert proc.returncode != 0
    assert "divisible" in proc.stderr
