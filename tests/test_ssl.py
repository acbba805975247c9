"""DINO components: loss, centering, EMA, schedules, multi-crop, k-NN and linear probe, options."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from distillkit.config import ConfigError, load_config
from distillkit.data.multicrop import MultiCrop, random_resized_crop
from distillkit.data.transforms import BatchShard
from distillkit.methods.dino import DINO, DINOOptions, dino_loss, ema_update, updated_center
from distillkit.methods.ssl_eval import (
    fit_linear_probe,
    knn_accuracy,
    knn_predict,
    linear_probe_accuracy,
)
from distillkit.methods.ssl_heads import (
    DINOHead,
    SSLBackbone,
    SSLMember,
    SSLNetwork,
    WeightNormLinear,
)
from distillkit.methods.ssl_schedules import ema_momentum, teacher_temperature
from distillkit.models import build_model

torch.set_num_threads(1)

# the run's `model` is DINO's model a; everything self-supervised is under options
TINY = [
    "method=dino",
    "dataset=digits",
    "model=resnet8",
    "augment=false",
    "drop_last=true",
    "subset.method=random",
    "subset.per_class=false",
    "subset.fraction=0.0713",
    "epochs=2",
    "batch_size=32",
    "options.out_dim=64",
    "options.head_hidden=32",
    "options.head_bottleneck=16",
    "options.global_size=8",
    "options.local_size=4",
    "options.local_crops_number=2",
    "options.warmup_teacher_temp_epochs=1",
    "options.probe_steps=20",
    "quiet=true",
    "device=cpu",
]


def build(overrides: list[str]):
    """The DINO / MOKD distiller of a config, built as `distillkit train` builds it."""
    from distillkit.data.datasets import load_dataset
    from distillkit.runner import build_distiller, build_student

    cfg = load_config(None, overrides)
    bundle = load_dataset(cfg.dataset)
    torch.manual_seed(cfg.seed)
    return build_distiller(cfg, build_student(cfg, bundle), None, bundle)


def trainer_for(overrides: list[str], run_dir):
    """A Trainer around the config's distiller (nothing trained yet)."""
    from distillkit.engine.trainer import Trainer
    from distillkit.runner import prepare

    p = prepare(load_config(None, [*overrides, f"out_dir={run_dir}"]))
    return Trainer(p.cfg, p.distiller, p.bundle, p.device, p.run_dir, p.ctx, p.train_indices)


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
    method = DINO({"a": _member()}, DINOOptions(center_momentum=0.9))
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


def test_multicrop_of_a_shard_is_that_shard_of_the_global_views():
    # under torchrun each rank crops only its rows, with the draws of the whole global batch: the
    # views then equal the single-process views row for row, whatever the number of processes
    x = torch.rand(6, 3, 8, 8)
    mc = MultiCrop(8, 4, local_number=2)
    whole = mc(x, torch.Generator().manual_seed(5))
    for rank, rows in enumerate((slice(0, 3), slice(3, 6))):
        shard = BatchShard.from_counts((3, 3), rank)
        part = mc(x[rows], torch.Generator().manual_seed(5), shard)
        for v, w in zip(part, whole, strict=True):
            assert torch.allclose(v, w[rows], atol=1e-6)


def test_fit_linear_probe_folds_standardisation_into_the_weights():
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([[4.0, 0.0, 1.0], [0.0, 4.0, 1.0], [-4.0, -4.0, 1.0]])
    y = torch.arange(3).repeat(30)
    x = 3.0 + centers[y] * torch.tensor([1.0, 10.0, 0.1]) + 0.3 * torch.randn(90, 3, generator=g)
    weight, bias = fit_linear_probe(x[:60], y[:60], 3, steps=50, l2=1e-4)
    assert weight.shape == (3, 3) and bias.shape == (3,)
    pred = (x[60:].double() @ weight.T + bias).argmax(1)
    acc = 100.0 * (pred == y[60:]).double().mean().item()
    assert acc == pytest.approx(linear_probe_accuracy(x[:60], y[:60], x[60:], y[60:], 3, 50))
    assert acc == pytest.approx(100.0)


def test_methods_command_lists_dino_and_mokd(capsys):
    from distillkit.cli import main

    assert main(["methods"]) == 0
    names = {line.split()[0] for line in capsys.readouterr().out.splitlines() if line.strip()}
    assert {"dino", "mokd"} <= names


def check(overrides: list[str]) -> None:
    """Validate a config as `distillkit train` does before it builds anything."""
    from distillkit.runner import check_config

    check_config(load_config(None, overrides))


def test_options_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"'options.a.lrr' \(did you mean 'options.a.lr'\?\)"):
        check(["method=dino", "options.a.lrr=0.1"])
    with pytest.raises(ConfigError, match="unknown config key 'options.epochz'"):
        check(["method=dino", "options.epochz=3"])
    with pytest.raises(ConfigError, match="options.b"):
        check(["method=mokd"])
    with pytest.raises(ConfigError, match="options.b"):
        check(["method=dino", "options.b.model=vit_tiny"])
    with pytest.raises(ConfigError, match="options.local_crops_scale"):
        check(["method=dino", "options.local_crops_scale=[0.5, 0.1]"])
    with pytest.raises(ConfigError, match="options.b.model.*vit_tinny"):
        check(["method=mokd", "options.b.model=vit_tinny"])
    with pytest.raises(ConfigError, match="options.a.model"):
        check(["method=dino", "options.a.model=vit_tiny"])
    check(TINY)  # and a good one passes


def test_run_level_optimiser_keys_are_refused_with_their_new_place(tmp_path):
    # each model's optimiser is options.a / options.b: a top-level lr would be silently unused
    from distillkit.cli import main

    for key in ("lr=0.1", "optimizer=adamw", "weight_decay=0.1", "grad_clip=1.0"):
        assert main(["train", *TINY, key, f"out_dir={tmp_path / 'x'}"]) == 2, key
    assert not (tmp_path / "x").exists()


def test_cli_rejects_unknown_option(tmp_path, capsys):
    from distillkit.cli import main

    assert main(["train", "method=dino", "options.a.lrr=0.1", f"out_dir={tmp_path / 'x'}"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'options.a.lrr' (did you mean 'options.a.lr'?)" in err
    assert err.count("\n") == 1
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


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)`")
def test_scale_lr_and_schedules_through_the_trainer(tmp_path):
    # TINY: 96 images / batch 32 = 3 steps per epoch, 2 epochs; lr 0.256 per 256 images -> 0.032
    trainer = trainer_for(
        [
            *TINY,
            "options.a.lr=0.256",
            "options.a.min_lr=0.0256",
            "options.a.scale_lr=true",
            "options.a.warmup_epochs=1",
            "options.a.optimizer=adamw",
            "options.a.weight_decay=0.04",
            "options.a.weight_decay_end=0.4",
        ],
        tmp_path,
    )
    expected = [
        0.032 / 3,  # linear warm-up over the first 3 steps: (step + 1) / 3
        0.032 * 2 / 3,
        0.032,
        # cosine over the 3 steps after warm-up: 0.0032 + 0.0288 * (1 + cos(pi * k / 3)) / 2
        0.032,
        0.0032 + 0.0288 * 0.75,
        0.0032 + 0.0288 * 0.25,
    ]
    (opt,) = trainer.opts
    (sched,) = trainer.schedulers
    method = trainer.distiller
    assert opt.name == "a" and isinstance(opt.optimizer, torch.optim.AdamW)
    for step, lr in enumerate(expected):
        method.apply_weight_decay(opt, step)
        groups = opt.optimizer.param_groups
        assert groups[0]["lr"] == pytest.approx(lr) and groups[1]["lr"] == pytest.approx(lr)
        # weight decay: cosine from 0.04 to 0.4 over all 6 steps, none on biases and norms
        wd = 0.4 + (0.04 - 0.4) * (1 + math.cos(math.pi * step / 6)) / 2
        assert groups[0]["weight_decay"] == pytest.approx(wd) and groups[1]["weight_decay"] == 0
        sched.step()


def test_head_bn_per_model_overrides_the_run_setting():
    def n_bn(overrides: list[str]) -> int:
        head = build([*TINY, *overrides]).members["a"].student.head
        return sum(isinstance(m, nn.BatchNorm1d) for m in head.modules())

    assert n_bn(["options.head_bn=true"]) == 2  # head_layers 3: two hidden layers
    assert n_bn(["options.head_bn=true", "options.a.head_bn=false"]) == 0
    assert n_bn(["options.head_bn=false", "options.a.head_bn=true"]) == 2
    assert n_bn([]) == 0


def test_freeze_last_layer_holds_only_the_last_layer_in_the_first_epochs(tmp_path):
    trainer = trainer_for(
        [
            *TINY,
            "options.a.freeze_last_layer=1",
            "options.a.optimizer=adamw",
            "options.a.lr=0.001",
        ],
        tmp_path,
    )
    student = trainer.distiller.members["a"].student

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
    # views in the data layer, k-NN / probe and DINO/MOKD in methods (below the engine, which
    # only re-exports the evaluators): none of them may reach up to the engine or the commands
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "src" / "distillkit"
    allowed = {
        "data/multicrop.py": ("distillkit.data",),
        "engine/evaluation.py": ("distillkit.data", "distillkit.engine", "distillkit.methods"),
        "methods/ssl_eval.py": ("distillkit.data",),
        "methods/ssl_schedules.py": (),
        "methods/ssl_heads.py": ("distillkit.models", "distillkit.methods"),
        "methods/dino.py": (
            "distillkit.data",
            "distillkit.errors",
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
    assert not (root / "ssl_train.py").exists()


def test_the_old_ssl_commands_are_gone():
    # self-supervised runs are ordinary runs: train, resume and evaluate serve them
    from distillkit.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert {"train", "resume", "evaluate"} <= set(sub.choices)
    assert not {"ssl", "ssl-eval"} & set(sub.choices)


# A model without BatchNorm (LayerNorm is per sample): what is left between one process and two
# is the order of float additions. 64 of the digits, 2 global steps of 32 per epoch.
DDP = [
    "method=dino",
    "model=vit_tiny",
    "model_kwargs={patch_size: 4, dim: 16, depth: 1, heads: 2}",
    "augment=false",
    "drop_last=true",
    "subset.method=random",
    "subset.per_class=false",
    "subset.fraction=0.0476",
    "epochs=2",
    "batch_size=32",
    "options.out_dim=32",
    "options.head_hidden=16",
    "options.head_bottleneck=8",
    "options.local_size=4",
    "options.local_crops_number=2",
    "options.probe_steps=5",
    "options.a.optimizer=adamw",
    "options.a.lr=0.001",
    "options.a.weight_decay=0.04",
    "device=cpu",
    "amp=none",  # float32: the order of additions is compared, bf16 rounding would swamp it
]


@pytest.mark.slow
def test_two_process_dino_matches_single_process(tmp_path):
    import subprocess
    import sys

    from distillkit.engine.checkpoint import load_checkpoint
    from distillkit.runner import run
    from tests.helpers import cli_env, read_rows

    single, ddp = tmp_path / "single", tmp_path / "ddp"
    run(load_config(None, [*DDP, "quiet=true", f"out_dir={single}"]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += ["-m", "distillkit", "train", *DDP, f"out_dir={ddp}", "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=cli_env(), timeout=240)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert "terminate called" not in proc.stderr
    final = json.loads((ddp / "metrics.json").read_text())
    assert final["world_size"] == 2 and final["train_samples"] == 64
    a, b = load_checkpoint(single, "last"), load_checkpoint(ddp, "last")
    assert a["global_step"] == b["global_step"] == 4
    for key, value in a["distiller"].items():
        torch.testing.assert_close(value, b["distiller"][key], atol=1e-5, rtol=1e-4, msg=key)
    for ra, rb in zip(read_rows(single), read_rows(ddp), strict=True):
        assert abs(ra["loss_a_dino"] - rb["loss_a_dino"]) < 1e-4
        assert abs(ra["knn_acc_a"] - rb["knn_acc_a"]) < 0.5
