"""DINO components: loss, centering, EMA, schedules, multi-crop, k-NN and linear probe, DINO runs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from distillkit.config import ConfigError
from distillkit.data.multicrop import MultiCrop, random_resized_crop
from distillkit.engine.evaluation import knn_accuracy, knn_predict, linear_probe_accuracy
from distillkit.methods.dino import DINO, dino_loss, ema_update, updated_center
from distillkit.methods.ssl_heads import (
    DINOHead,
    SSLBackbone,
    SSLMember,
    SSLNetwork,
    WeightNormLinear,
)
from distillkit.methods.ssl_schedules import ema_momentum, teacher_temperature
from distillkit.models import build_model
from distillkit.ssl_train import load_ssl_config, run_ssl, ssl_config_from_dict

torch.set_num_threads(1)

TINY = [
    "dataset=digits",
    "a.name=resnet8",
    "out_dim=64",
    "head_hidden=32",
    "head_bottleneck=16",
    "global_size=8",
    "local_size=4",
    "local_crops_number=2",
    "epochs=2",
    "batch_size=32",
    "max_train_samples=96",
    "warmup_teacher_temp_epochs=1",
    "probe_steps=20",
    "quiet=true",
    "device=cpu",
]


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def test_dino_loss_matches_direct_formula():
    g = torch.Generator().manual_seed(0)
    student = [torch.randn(3, 5, generator=g, dtype=torch.float64) for _ in range(4)]
    teacher = [torch.randn(3, 5, generator=g, dtype=torch.float64) for _ in range(2)]
    center = torch.randn(1, 5, generator=g, dtype=torch.float64)
    ts, tt = 0.1, 0.04
    got = dino_loss(student, teacher, center, ts, tt).item()
    total, terms = 0.0, 0
    for t in range(2):
        p = _softmax((teacher[t].numpy() - center.numpy()) / tt)
        for v in range(4):
            if v == t:
                continue
            log_q = np.log(_softmax(student[v].numpy() / ts))
            total += float(np.mean(np.sum(-p * log_q, axis=1)))
            terms += 1
    assert terms == 6
    assert got == pytest.approx(total / terms, rel=1e-10)


def test_dino_loss_skips_identical_views_only():
    # with two identical global views, a student equal to the teacher on view 0 still pays for
    # the pair (view 0, teacher 1) when teacher 1 differs
    a = torch.tensor([[5.0, 0.0]])
    b = torch.tensor([[0.0, 5.0]])
    loss = dino_loss([a, a], [a, b], torch.zeros(1, 2), 1.0, 1.0)
    p_b = torch.softmax(b, -1)
    expected = 0.5 * (
        -(torch.softmax(a, -1) * torch.log_softmax(a, -1)).sum()
        - (p_b * torch.log_softmax(a, -1)).sum()
    )
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_center_update_hand_computed():
    c = torch.tensor([[1.0, -2.0]])
    batch_mean = torch.tensor([[3.0, 4.0]])
    assert torch.allclose(updated_center(c, batch_mean, 0.9), torch.tensor([[1.2, -1.4]]))


def _member(out_dim: int = 6) -> SSLMember:
    torch.manual_seed(0)
    model = build_model("resnet8", in_channels=1, num_classes=10, image_size=8)
    backbone = SSLBackbone(model, probe_size=8)
    head = DINOHead(backbone.embed_dim, out_dim, hidden_dim=8, bottleneck_dim=4, nlayers=2)
    return SSLMember(SSLNetwork(backbone, head), out_dim)


def test_dino_step_updates_center_with_teacher_batch_mean():
    method = DINO({"a": _member()}, center_momentum=0.9)
    m = method.members["a"]
    m.center_head = torch.arange(6, dtype=torch.float32).view(1, 6)
    g = torch.Generator().manual_seed(1)
    views = [torch.randn(4, 1, 8, 8, generator=g) for _ in range(2)] + [
        torch.randn(4, 1, 4, 4, generator=g)
    ]
    with torch.no_grad():
        t = m.teacher(views[:2])["head"]
    batch_mean = torch.cat(t).mean(0, keepdim=True)
    expected = 0.9 * torch.arange(6.0).view(1, 6) + 0.1 * batch_mean
    method.compute_losses(views, 0.04)
    assert torch.allclose(m.center_head, expected, atol=1e-6)


def test_ema_update_hand_computed_and_momentum_schedule():
    teacher, student = nn.Linear(1, 1), nn.Linear(1, 1)
    with torch.no_grad():
        teacher.weight.fill_(1.0)
        teacher.bias.fill_(-1.0)
        student.weight.fill_(3.0)
        student.bias.fill_(1.0)
    ema_update(teacher, student, 0.9)
    assert teacher.weight.item() == pytest.approx(1.2)
    assert teacher.bias.item() == pytest.approx(-0.8)
    assert ema_momentum(0, 100, 0.996) == pytest.approx(0.996)
    assert ema_momentum(50, 100, 0.996) == pytest.approx(0.998)
    assert ema_momentum(100, 100, 0.996) == pytest.approx(1.0)
    assert ema_momentum(25, 100, 0.9) == pytest.approx(1 - 0.1 * (math.cos(math.pi / 4) + 1) / 2)


def test_teacher_temperature_warmup():
    assert teacher_temperature(0, 0.04, 0.07, 4) == pytest.approx(0.04)
    assert teacher_temperature(1, 0.04, 0.07, 4) == pytest.approx(0.05)
    assert teacher_temperature(3, 0.04, 0.07, 4) == pytest.approx(0.07)
    assert teacher_temperature(10, 0.04, 0.07, 4) == pytest.approx(0.07)


def test_weight_norm_last_layer_has_unit_rows():
    layer = WeightNormLinear(4, 3, norm_last_layer=True)
    assert torch.allclose(layer.weight.norm(dim=1), torch.ones(3))
    assert not layer.weight_g.requires_grad
    assert WeightNormLinear(4, 3, norm_last_layer=False).weight_g.requires_grad


def test_multicrop_shapes_range_and_determinism():
    x = torch.rand(5, 1, 8, 8)
    mc = MultiCrop(8, 4, local_number=3)
    a = mc(x, torch.Generator().manual_seed(3))
    b = mc(x, torch.Generator().manual_seed(3))
    assert [tuple(v.shape) for v in a] == [(5, 1, 8, 8)] * 2 + [(5, 1, 4, 4)] * 3
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert all(v.min() >= 0 and v.max() <= 1 for v in a)
    # the full-image crop at the same size, unflipped, is the image itself
    full = random_resized_crop(
        x, 8, (1.0, 1.0), torch.Generator().manual_seed(0), ratio=(1, 1), flip=False
    )
    assert torch.allclose(full, x, atol=1e-5)


def test_knn_weighted_vote_exact():
    # two class-0 neighbours at cos 0.6 outvote nothing against one class-1 neighbour at cos 1:
    # exp(1/0.07) > 2 exp(0.6/0.07), so the weighted vote picks class 1 where a majority picks 0
    train = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.6, -0.8], [-1.0, 0.0]])
    labels = torch.tensor([1, 0, 0, 2])
    test = torch.tensor([[2.0, 0.0], [-3.0, 0.1]])
    pred = knn_predict(train, labels, test, num_classes=3, k=3, temperature=0.07)
    assert pred.tolist() == [1, 2]
    # with a high temperature the weights are nearly equal and the majority (class 0) wins
    assert knn_predict(train, labels, test[:1], 3, k=3, temperature=100.0).tolist() == [0]
    acc = knn_accuracy(train, labels, test, torch.tensor([1, 0]), 3, k=3, temperature=0.07)
    assert acc == pytest.approx(50.0)


def test_linear_probe_separable_features():
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([[4.0, 0.0], [0.0, 4.0], [-4.0, -4.0]])
    y = torch.arange(3).repeat(30)
    x = centers[y] + 0.3 * torch.randn(90, 2, generator=g)
    assert linear_probe_accuracy(x[:60], y[:60], x[60:], y[60:], 3, steps=50) == pytest.approx(
        100.0
    )


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="a.lrr"):
        ssl_config_from_dict({"a": {"lrr": 0.1}})
    with pytest.raises(ConfigError, match="unknown config key 'epochz'"):
        ssl_config_from_dict({"epochz": 3})
    with pytest.raises(ConfigError, match="set `b`"):
        ssl_config_from_dict({"method": "mokd"})
    with pytest.raises(ConfigError, match="local_crops_scale"):
        ssl_config_from_dict({"local_crops_scale": [0.5, 0.1]})


def test_dino_killed_after_epoch_1_and_resumed_equals_straight_run(tmp_path):
    """DINO end to end: killed by the CLI test hook after epoch 1, resumed with `ssl --resume`."""
    import signal

    from distillkit.cli import main
    from distillkit.engine.checkpoint import load_checkpoint
    from tests.helpers import cli_env, run_cli

    killed = tmp_path / "killed"
    args = ["ssl", *TINY, "method=dino", f"out_dir={killed}"]
    proc = run_cli(*args, env=cli_env(DISTILLKIT_KILL_AFTER_EPOCH="1"))
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not (killed / "metrics.json").exists()
    assert main(["ssl", "--resume", str(killed), "--quiet"]) == 0

    straight = tmp_path / "straight"
    summary = run_ssl(load_ssl_config(None, [*TINY, "method=dino", f"out_dir={straight}"]))
    for name in (
        "config.yaml",
        "metrics.jsonl",
        "metrics.json",
        "checkpoints/last.pt",
        "checkpoints/best.pt",
    ):
        assert (straight / name).is_file(), name
    rows = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert "loss_a_dino" in rows[0] and math.isfinite(rows[0]["loss_a_dino"])
    final = json.loads((straight / "metrics.json").read_text())
    assert final["kind"] == "ssl" and final["method"] == "dino"
    assert 0 <= final["knn_acc_a"] <= 100 and 0 <= final["linear_acc_a"] <= 100
    assert final["knn_acc_a"] == summary["knn_acc_a"]
    a, b = load_checkpoint(straight, "last"), load_checkpoint(killed, "last")
    assert a["epoch"] == b["epoch"] == 2
    for key, value in a["method"].items():
        assert torch.equal(value, b["method"][key]), key
    ja = json.loads((straight / "metrics.json").read_text())
    jb = json.loads((killed / "metrics.json").read_text())
    assert ja["knn_acc_a"] == jb["knn_acc_a"] and ja["linear_acc_a"] == jb["linear_acc_a"]


def test_cli_rejects_unknown_key(tmp_path, capsys):
    from distillkit.cli import main

    assert main(["ssl", "method=dino", "a.lrr=0.1", f"out_dir={tmp_path / 'x'}"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'a.lrr' (did you mean 'a.lr'?)" in err
    assert not (tmp_path / "x").exists()


def test_head_batchnorm_option_separates_samples():
    # post-ReLU backbone features share a large common component; without normalisation the
    # head maps every sample to nearly the same bottleneck direction (the uniform collapse of
    # DINO on digits); BatchNorm in the hidden layers removes the common part
    torch.manual_seed(0)
    x = torch.rand(64, 32) + 2.0
    plain = DINOHead(32, 16, hidden_dim=32, bottleneck_dim=8, nlayers=3)
    with_bn = DINOHead(32, 16, hidden_dim=32, bottleneck_dim=8, nlayers=3, use_bn=True)
    assert sum(isinstance(m, nn.BatchNorm1d) for m in with_bn.mlp) == 2
    assert not any(isinstance(m, nn.BatchNorm1d) for m in plain.mlp)

    def mean_cos(head: DINOHead) -> float:
        with torch.no_grad():
            z = torch.nn.functional.normalize(head.mlp(x), dim=-1)
        return float((z @ z.T).mean())

    assert mean_cos(plain) > 0.95
    assert mean_cos(with_bn) < 0.5
    cfg = load_ssl_config(None, [*TINY, "head_bn=true"])
    assert cfg.head_bn


def test_scale_lr_follows_the_batch_over_256_rule_in_the_trainer(tmp_path):
    # TINY: 96 images / batch 32 = 3 steps per epoch, 2 epochs; lr 0.256 per 256 images -> 0.032
    from distillkit.ssl_train import SSLTrainer

    cfg = load_ssl_config(
        None,
        [
            *TINY,
            "a.lr=0.256",
            "a.min_lr=0.0256",
            "a.scale_lr=true",
            "a.warmup_epochs=1",
            "a.optimizer=adamw",
            "a.weight_decay=0.04",
            "a.weight_decay_end=0.4",
        ],
    )
    assert cfg.a.effective_lr(32) == pytest.approx((0.032, 0.0032))
    assert load_ssl_config(None, TINY).a.effective_lr(32) == (0.03, 0.0)
    trainer = SSLTrainer(cfg, tmp_path, torch.device("cpu"))
    expected = {
        0: 0.032 / 3,  # linear warm-up over the first 3 steps: (step + 1) / 3
        1: 0.032 * 2 / 3,
        2: 0.032,
        # cosine over the 3 steps after warm-up: 0.0032 + 0.0288 * (1 + cos(pi * k / 3)) / 2
        4: 0.0032 + 0.0288 * 0.75,
        5: 0.0032 + 0.0288 * 0.25,
    }
    for step, lr in expected.items():
        trainer.step = step
        assert trainer._set_schedules("a") == pytest.approx(lr)
        groups = trainer.optimizers["a"].param_groups
        assert groups[0]["lr"] == pytest.approx(lr) and groups[1]["lr"] == pytest.approx(lr)
        # weight decay: cosine from 0.04 to 0.4 over all 6 steps, none on biases and norms
        wd = 0.4 + (0.04 - 0.4) * (1 + math.cos(math.pi * step / 6)) / 2
        assert groups[0]["weight_decay"] == pytest.approx(wd) and groups[1]["weight_decay"] == 0


def test_head_bn_per_model_overrides_the_run_setting():
    from distillkit.data.datasets import load_dataset
    from distillkit.ssl_train import build_method

    def n_bn(overrides: list[str]) -> int:
        cfg = load_ssl_config(None, [*TINY, *overrides])
        head = build_method(cfg, load_dataset("digits")).members["a"].student.head
        return sum(isinstance(m, nn.BatchNorm1d) for m in head.modules())

    assert n_bn(["head_bn=true"]) == 2  # head_layers 3: two hidden layers
    assert n_bn(["head_bn=true", "a.head_bn=false"]) == 0
    assert n_bn(["head_bn=false", "a.head_bn=true"]) == 2
    assert n_bn([]) == 0


def test_freeze_last_layer_holds_only_the_last_layer_in_the_first_epochs(tmp_path):
    from distillkit.ssl_train import SSLTrainer

    cfg = load_ssl_config(
        None,
        [*TINY, "a.freeze_last_layer=1", "a.optimizer=adamw", "a.lr=0.001", "a.warmup_epochs=0"],
    )
    trainer = SSLTrainer(cfg, tmp_path, torch.device("cpu"))
    student = trainer.method.members["a"].student

    def snapshot() -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in student.named_parameters() if p.requires_grad}

    before = snapshot()
    trainer.train_epoch()  # epoch 0: frozen (AdamW weight decay included)
    after = snapshot()
    assert torch.equal(before["head.last_layer.weight_v"], after["head.last_layer.weight_v"])
    assert not torch.equal(before["head.mlp.0.weight"], after["head.mlp.0.weight"])
    trainer.epoch = 1
    trainer.train_epoch()
    assert not torch.equal(
        after["head.last_layer.weight_v"], snapshot()["head.last_layer.weight_v"]
    )


def test_ssl_modules_import_only_from_their_layer():
    # the split by responsibility keeps views in the data layer, evaluators in the engine and
    # DINO/MOKD in methods: none of them may reach up to the run loop or the commands
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "src" / "distillkit"
    allowed = {
        "data/multicrop.py": ("distillkit.data",),
        "engine/evaluation.py": ("distillkit.data", "distillkit.engine"),
        "methods/ssl_schedules.py": (),
        "methods/ssl_heads.py": ("distillkit.models",),
        "methods/dino.py": (
            "distillkit.config",
            "distillkit.data",
            "distillkit.models",
            "distillkit.methods",
        ),
        "methods/mokd.py": ("distillkit.data", "distillkit.methods"),
    }
    for path, prefixes in allowed.items():
        tree = ast.parse((root / path).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                if name.startswith("distillkit"):
                    assert name.startswith(prefixes), f"{path} imports {name}"
    assert not (root / "methods" / "ssl.py").exists()
