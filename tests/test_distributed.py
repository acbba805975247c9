"""DDP with 2 gloo processes on CPU agrees with a single process at the same global batch."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from distillkit.config import load_config
from distillkit.engine.checkpoint import load_checkpoint
from distillkit.runner import run
from tests.helpers import cli_env, read_rows

# Default crop augmentation and drop_last=false on a random subset of 1345 digits: 21 batches of 64
# and a last batch of 1, which rank 0 trains on while rank 1 holds a weightless padding row, so
# sharding, per-sample crops and the padded last step are all covered. No BatchNorm: what is left
# is the order of float additions.
AUGMENTED = [
    "model=mlp",
    "epochs=2",
    "batch_size=64",
    "augment=true",
    "subset.method=random",
    "subset.per_class=false",
    "subset.fraction=0.9985",
    "lr=0.05",
    "seed=1",
    "--quiet",
]
# BatchNorm normalises with batch statistics: sync_bn=true makes them global-batch statistics.
# All 1347 digits: the last batch of 3 splits 2 + 1, so the loss weighting of uneven shards counts.
SYNC_BN = ["model=cnn_small", "epochs=1", "batch_size=64", "lr=0.05", "seed=2", "--quiet"]
# KD from a cnn_small teacher (eval mode) to an mlp student, with augmentation on: the teacher is
# asked on each rank's rows only, and its answers must add up to the single-process run's
KD = [
    "method=kd",
    "model=mlp",
    "epochs=1",
    "batch_size=64",
    "augment=true",
    "options.temperature=3",
    "options.alpha=0.2",
    "lr=0.05",
    "seed=4",
    "--quiet",
]
# StableKD leaves the connectors of other stages idle (out_connector=always gives them weights):
# DDP must be told to look for unused parameters, the method adds no zero losses for them
STABLEKD = [
    "method=stablekd",
    "model=cnn_small",
    "epochs=2",
    "batch_size=64",
    "subset.method=random",
    "subset.fraction=0.3",
    "options.blocks_per_stage=[2, 1]",
    "options.stage_epochs=[1, 1]",
    "options.out_connector=always",
    "--quiet",
]


# float32: what is compared is the order of float additions, which bf16 rounding would swamp
# (STABLEKD compares nothing bit for bit: it keeps the default amp, so DDP runs under it too)
for _args in (AUGMENTED, SYNC_BN, KD):
    _args.insert(0, "amp=none")


def torchrun(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += ["-m", "distillkit", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=cli_env(), timeout=180)


def _single_and_ddp(tmp_path, args: list[str]) -> tuple[dict, dict, list[dict], list[dict]]:
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    # the single-process reference runs in this process: a second interpreter start costs seconds
    overrides = [a for a in args if not a.startswith("--")]
    run(load_config(None, [*overrides, "quiet=true", f"out_dir={single}"]))
    proc = torchrun("train", *args, f"out_dir={ddp}")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert "terminate called" not in proc.stderr
    assert json.loads((ddp / "metrics.json").read_text())["world_size"] == 2
    a = load_checkpoint(single / "checkpoints" / "last.pt")
    b = load_checkpoint(ddp / "checkpoints" / "last.pt")
    return a, b, read_rows(single), read_rows(ddp)


def test_two_process_ddp_with_augmentation_matches_single_process(tmp_path):
    a, b, rows_a, rows_b = _single_and_ddp(tmp_path, AUGMENTED)
    assert len(a["train_indices"]) % 64 == 1
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], atol=1e-5, rtol=1e-4)
    assert len(rows_a) == len(rows_b) == 2
    for ra, rb in zip(rows_a, rows_b):
        assert abs(ra["train_loss"] - rb["train_loss"]) < 1e-4
        assert abs(ra["train_acc"] - rb["train_acc"]) < 0.08  # at most one sample
        assert abs(ra["test_acc"] - rb["test_acc"]) < 0.5  # at most one borderline sample flips


def test_two_process_sync_bn_matches_single_process(tmp_path):
    a, b, rows_a, rows_b = _single_and_ddp(tmp_path, [*SYNC_BN, "sync_bn=true"])
    # running statistics included: they are updated from the global batch's mean and variance
    for key in a["model"]:
        torch.testing.assert_close(
            a["model"][key].float(), b["model"][key].float(), atol=1e-5, rtol=1e-4
        )
    for ra, rb in zip(rows_a, rows_b):
        assert abs(ra["train_loss"] - rb["train_loss"]) < 1e-4
        assert abs(ra["test_acc"] - rb["test_acc"]) < 0.5


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    args = ["model=cnn_small", "epochs=1", "augment=false", "subset.method=random"]
    run(load_config(None, [*args, "subset.fraction=0.3", "quiet=true", f"out_dir={out}"]))
    return out


def test_two_process_kd_matches_single_process(tmp_path, teacher_dir):
    a, b, rows_a, rows_b = _single_and_ddp(tmp_path, [*KD, f"teacher={teacher_dir}"])
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], atol=1e-5, rtol=1e-4)
    for ra, rb in zip(rows_a, rows_b, strict=True):
        assert abs(ra["loss_kd"] - rb["loss_kd"]) < 1e-4
        assert abs(ra["loss_ce"] - rb["loss_ce"]) < 1e-4
        assert ra["teacher_queries"] == rb["teacher_queries"]


def test_two_process_stablekd_trains_every_stage(tmp_path, teacher_dir):
    out = tmp_path / "ddp"
    proc = torchrun("distill", *STABLEKD, f"teacher={teacher_dir}", f"out_dir={out}")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert "terminate called" not in proc.stderr
    assert json.loads((out / "metrics.json").read_text())["world_size"] == 2
    rows = read_rows(out)
    assert "loss_s1_b0_feat" in rows[0]
    assert {k for k in rows[1] if k.startswith("loss_")} == {"loss_s2_b0-1_kd", "loss_s2_b0-1_ce"}


def test_ddp_rejects_batch_not_divisible_by_world_size(tmp_path):
    proc = torchrun(
        "train", "model=mlp", "epochs=1", "batch_size=63", f"out_dir={tmp_path / 'x'}", "--quiet"
    )
    assert proc.returncode != 0
    assert "divisible" in proc.stderr
