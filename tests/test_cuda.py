"""The GPU paths: training, AMP, exact resume, one-rank DDP over NCCL and every method on CUDA.

Skipped where no CUDA device is present (CI); run on a GPU machine with `pytest tests/test_cuda.py`.
DISTILLKIT_TEST_DEVICE=cpu runs the same checks on the CPU (NCCL aside), to check the checks.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from distillkit.engine.checkpoint import load_checkpoint, model_from_checkpoint
from tests.helpers import cli_env, read_rows, run_cli, without_timing

DEVICE = os.environ.get("DISTILLKIT_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(
    DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device"
)

CUDA = ["--device", DEVICE, "--quiet"]


def summary(run_dir) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A resnet8 digits teacher trained on the GPU."""
    out = tmp_path_factory.mktemp("cuda") / "teacher"
    proc = run_cli("train", "model=resnet8", "epochs=4", "lr=0.1", f"out_dir={out}", *CUDA)
    assert proc.returncode == 0, proc.stderr
    return out


def test_teacher_trains_on_cuda_and_loads_on_cpu(teacher_dir):
    s = summary(teacher_dir)
    assert s["test_acc"] > 80.0
    model, _ = model_from_checkpoint(teacher_dir)
    assert all(p.device.type == "cpu" for p in model.parameters())


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_kd_with_amp_on_cuda(tmp_path, teacher_dir, amp):
    out = tmp_path / amp
    args = ["method=kd", "model=resnet8", "epochs=3", "lr=0.1", f"amp={amp}"]
    args.append(f"teacher={teacher_dir}")
    proc = run_cli("distill", *args, f"out_dir={out}", *CUDA)
    assert proc.returncode == 0, proc.stderr
    rows = read_rows(out)
    assert all(r["train_loss"] == r["train_loss"] for r in rows)  # no NaN under autocast
    assert summary(out)["test_acc"] > 50.0  # learns under autocast (chance is 10%)
    # the checkpoint's weights give the recorded accuracy on the CPU too
    proc = run_cli("evaluate", str(out), "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert abs(json.loads(proc.stdout)["test_acc"] - summary(out)["best_acc"]) < 0.5


def test_killed_and_resumed_run_on_cuda_equals_straight_run(tmp_path, teacher_dir):
    common = ["method=kd", f"teacher={teacher_dir}", "model=mlp", "epochs=4", "augment=true"]
    common += ["lr=0.05", "seed=5", "deterministic=true"]
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    assert run_cli("distill", *common, f"out_dir={straight}", *CUDA).returncode == 0
    proc = run_cli(
        "distill",
        *common,
        f"out_dir={broken}",
        *CUDA,
        env=cli_env(DISTILLKIT_KILL_AFTER_EPOCH="2"),
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    proc = run_cli("resume", str(broken), "--quiet")
    assert proc.returncode == 0, proc.stderr
    a = load_checkpoint(straight / "checkpoints" / "last.pt")["model"]
    b = load_checkpoint(broken / "checkpoints" / "last.pt")["model"]
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert without_timing(read_rows(straight)) == without_timing(read_rows(broken))


@pytest.mark.skipif(DEVICE != "cuda", reason="NCCL needs CUDA")
def test_one_rank_ddp_over_nccl_exits_cleanly(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1"]
    cmd += ["-m", "distillkit", "train", "model=cnn_small", "epochs=2", "device=cuda"]
    cmd += [f"out_dir={tmp_path}", "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=cli_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "terminate called" not in proc.stderr
    s = summary(tmp_path)
    assert s["world_size"] == 1 and s["test_acc"] > 20.0  # two epochs: above chance (10%)


@pytest.mark.parametrize(
    "method, extra",
    [
        ("kd_da", ["options.augmentation=cutmixpick"]),
        ("stablekd", ["epochs=3", "options.stage_epochs=[1,1,1]"]),
        ("mekd", ["epochs=3", "options.gan_epochs=1", "options.budget=2000", "augment=false"]),
        ("blackbox_kd", ["options.budget=2000"]),
    ],
)
def test_methods_run_on_cuda(tmp_path, teacher_dir, method, extra):
    args = [f"method={method}", "model=cnn_small", "epochs=2", f"teacher={teacher_dir}", *extra]
    proc = run_cli("distill", *args, f"out_dir={tmp_path}", *CUDA)
    assert proc.returncode == 0, proc.stderr
    assert summary(tmp_path)["test_acc"] > 0.0


@pytest.mark.parametrize("config", ["configs/digits_dino.yaml", "configs/digits_mokd.yaml"])
def test_ssl_runs_on_cuda(tmp_path, config):
    args = ["epochs=2", "eval_every=2", "amp=bf16", f"out_dir={tmp_path}"]
    proc = run_cli("train", config, *args, *CUDA)
    assert proc.returncode == 0, proc.stderr
    s = summary(tmp_path)
    assert s["knn_acc_a"] > 20.0 and s["device"].startswith(DEVICE)
    # the checkpoint's model (a's EMA teacher + its linear probe) evaluates on the CPU as trained
    proc = run_cli("evaluate", str(tmp_path), "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert abs(json.loads(proc.stdout)["test_acc"] - s["linear_acc_a"]) < 1.0
