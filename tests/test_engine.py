"""Engine pieces: schedules, optimizer groups, AMP on CPU, device errors, evaluation."""

from __future__ import annotations

import json
import math

import pytest
import torch

from distillkit.cli import main
from distillkit.config import config_from_dict
from distillkit.data.datasets import load_dataset
from distillkit.engine.trainer import build_optimizer, evaluate, lr_factor, resolve_device


def test_warmup_then_cosine_matches_formula():
    cfg = config_from_dict({"epochs": 10, "warmup_epochs": 2, "schedule": "cosine"})
    steps = 7
    total, warm = 70, 14
    for step in range(total):
        if step < warm:
            expected = (step + 1) / warm
        else:
            expected = 0.5 * (1 + math.cos(math.pi * (step - warm) / (total - warm)))
        assert lr_factor(cfg, step, steps) == pytest.approx(expected)


def test_step_schedule_multiplies_by_gamma_at_milestones():
    cfg = config_from_dict({"epochs": 10, "schedule": "step", "milestones": [3, 6], "gamma": 0.5})
    assert [lr_factor(cfg, e * 4, 4) for e in (0, 2, 3, 5, 6, 9)] == [1, 1, 0.5, 0.5, 0.25, 0.25]


def test_adamw_skips_weight_decay_on_biases_and_norms():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    cfg = config_from_dict({"optimizer": "adamw", "weight_decay": 0.1})
    opt = build_optimizer(cfg, list(model.parameters()))
    decay = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decay == {id(model[0].weight)}


def test_bf16_autocast_on_cpu_trains(tmp_path):
    out = tmp_path / "amp"
    assert (
        main(["train", "model=cnn_small", "epochs=1", "amp=bf16", f"out_dir={out}", "--quiet"]) == 0
    )
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["test_acc"] is not None and summary["test_acc"] > 10.0


def test_cuda_request_without_cuda_is_a_clear_error(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    assert main(["train", "model=mlp", "epochs=1", "device=cuda", f"out_dir={tmp_path}"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("tpu")


def test_evaluate_counts_every_test_sample():
    bundle = load_dataset("digits")

    class Constant(torch.nn.Module):
        def forward(self, x):
            out = torch.zeros(x.shape[0], 10)
            out[:, 3] = 1.0
            return out

    result = evaluate(Constant(), bundle.test, bundle, torch.device("cpu"), batch_size=100)
    expected = 100.0 * (bundle.test.labels == 3).float().mean().item()
    assert result["acc"] == pytest.approx(expected)
    # cross-entropy of logits (1 at class 3, 0 elsewhere) for label y, computed directly
    lse = math.log(math.e + 9)
    ce = [lse - (1.0 if y == 3 else 0.0) for y in bundle.test.labels.tolist()]
    assert result["loss"] == pytest.approx(sum(ce) / len(ce))


def test_grad_clip_and_nan_loss_is_reported(tmp_path, capsys):
    out = tmp_path / "clip"
    assert (
        main(["train", "model=mlp", "epochs=1", "grad_clip=1.0", f"out_dir={out}", "--quiet"]) == 0
    )
    capsys.readouterr()
    assert (
        main(
            ["train", "model=mlp", "epochs=1", "lr=1e30", f"out_dir={tmp_path / 'nan'}", "--quiet"]
        )
        == 2
    )
    assert "loss became" in capsys.readouterr().err


def test_exponent_floats_without_a_dot_are_numbers():
    assert config_from_dict({"lr": "1e-3"}).lr == pytest.approx(1e-3)
