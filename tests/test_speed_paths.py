"""The fast paths of the engine are honest: same losses as the plain path, same teacher answers."""

from __future__ import annotations

import copy
import sys

import pytest
import torch
from torch import nn

from distillkit.config import ConfigError, RunConfig
from distillkit.data.datasets import DataBundle, Split
from distillkit.engine.optim import build_optimizer
from distillkit.engine.trainer import Trainer
from distillkit.methods.ce import CrossEntropy
from distillkit.methods.kd import KD
from distillkit.models import build_model
from distillkit.teachers import CachedTeacher, LocalTeacher

CL = torch.channels_last


def _bundle(n: int = 192, channels: int = 3, size: int = 12) -> DataBundle:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, channels, size, size), generator=g, dtype=torch.uint8)
    labels = torch.arange(n) % 4
    split = Split(images, labels)
    return DataBundle(
        "synthetic", split, Split(images[:32], labels[:32]), 4, channels, size,
        (0.5,) * channels, (0.25,) * channels, ["a", "b", "c", "d"],
    )  # fmt: skip


def _model(name: str, bundle: DataBundle, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(
        name,
        in_channels=bundle.in_channels,
        num_classes=bundle.num_classes,
        image_size=bundle.image_size,
    )


def _trainer(tmp_path, bundle, student="cnn_small", teacher=None, cache=False, **cfg) -> Trainer:
    # float32 unless a test asks: these tests hold layouts and folding to float32's exact losses
    keys = dict(epochs=2, batch_size=64, lr=0.05, seed=1, quiet=True, device="cpu", amp="none")
    cfg = RunConfig(dataset="synthetic", model=student, **{**keys, **cfg})
    model = _model(student, bundle)
    if teacher is None:
        distiller = CrossEntropy(model)
    else:
        t = LocalTeacher(copy.deepcopy(teacher))
        if cache:
            t = CachedTeacher(t, len(bundle.train))
        distiller = KD(model, t, num_classes=bundle.num_classes)
    return Trainer(cfg, distiller, bundle, torch.device("cpu"), tmp_path)


def _losses_per_step(trainer: Trainer, epochs: int = 2) -> list[float]:
    """Run epochs, recording the summed loss of every step."""
    seen: list[float] = []
    step = trainer.distiller.training_step

    def recording(batch):
        logits, terms = step(batch)
        seen.append(float(sum(v.detach() for v in terms.values())))
        return logits, terms

    trainer.distiller.training_step = recording
    for _ in range(epochs):
        trainer.train_epoch()
        trainer.epoch += 1
    return seen


def _four_dim(module: nn.Module) -> list[torch.Tensor]:
    # weights whose channels_last layout differs from the default one (more than one channel)
    return [p for p in module.parameters() if p.dim() == 4 and p.shape[1] > 1]


def test_conv_student_and_teacher_train_channels_last_by_default_on_cpu(tmp_path):
    bundle = _bundle()
    t = _trainer(tmp_path, bundle, teacher=_model("resnet8", bundle).eval())
    assert _four_dim(t.distiller.student)
    assert all(p.is_contiguous(memory_format=CL) for p in _four_dim(t.distiller.student))
    assert all(p.is_contiguous(memory_format=CL) for p in _four_dim(t.distiller.teacher))
    x, _, _ = next(iter(t.loader))
    assert x.is_contiguous(memory_format=CL) and not x.is_contiguous()


def test_mlp_and_channels_last_false_keep_the_default_layout(tmp_path):
    bundle = _bundle()
    for student, setting in (("mlp", "auto"), ("cnn_small", False)):
        t = _trainer(tmp_path / student, bundle, student=student, channels_last=setting)
        x, _, _ = next(iter(t.loader))
        assert x.is_contiguous()
        assert all(p.is_contiguous() for p in t.distiller.student.parameters())


def test_channels_last_setting_is_checked():
    from distillkit.config import config_from_dict

    for value in ("auto", True, False):
        assert config_from_dict({"channels_last": value}).channels_last == value
    with pytest.raises(ConfigError, match="'channels_last': unknown value 'sometimes'"):
        config_from_dict({"channels_last": "sometimes"})


def test_tuned_path_has_the_loss_trajectory_of_the_plain_path(tmp_path):
    """KD with a conv teacher, crop/flip on: channels_last and folded teacher BN change no loss."""
    bundle = _bundle()
    teacher = _model("resnet8", bundle, seed=5).eval()
    # the teacher's BN statistics are not the identity, so folding them changes the weights
    for m in teacher.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    tuned = _trainer(tmp_path / "b", bundle, teacher=teacher)
    # the plain path: NCHW, and BN left unfolded (a hooked BN is never folded)
    for m in teacher.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.register_forward_hook(lambda *args: None)
    plain = _trainer(tmp_path / "a", bundle, teacher=teacher, channels_last=False)
    assert any(isinstance(m, nn.BatchNorm2d) for m in plain.distiller.teacher.modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in tuned.distiller.teacher.modules())
    a, b = _losses_per_step(plain), _losses_per_step(tuned)
    assert len(a) == len(b) == 6
    torch.testing.assert_close(torch.tensor(b), torch.tensor(a), rtol=1e-4, atol=1e-5)
    for (name, pa), pb in zip(
        plain.distiller.student.named_parameters(), tuned.distiller.student.parameters()
    ):
        torch.testing.assert_close(pb, pa, rtol=1e-3, atol=1e-5, msg=name)


def test_teacher_cache_gives_the_losses_of_an_uncached_teacher(tmp_path):
    bundle = _bundle()
    teacher = _model("resnet8", bundle, seed=5).eval()
    plain = _trainer(tmp_path / "a", bundle, teacher=teacher, augment=False)
    cached = _trainer(tmp_path / "b", bundle, teacher=teacher, cache=True, augment=False)
    a, b = _losses_per_step(plain), _losses_per_step(cached)
    torch.testing.assert_close(torch.tensor(b), torch.tensor(a), rtol=1e-6, atol=1e-7)
    # the cached teacher answered each image once, the plain one once per epoch
    assert plain.distiller.teacher.queries == 2 * len(bundle.train)
    assert cached.distiller.teacher.queries == len(bundle.train)


def test_teacher_cache_auto_caches_deterministic_inputs_only():
    from distillkit.engine.setup import teacher_cache_enabled

    auto = dict(teacher_cache="auto")
    assert teacher_cache_enabled(RunConfig(**auto, augment=False), method_caches=True) is True
    assert teacher_cache_enabled(RunConfig(**auto, augment=True), method_caches=True) is False
    assert teacher_cache_enabled(RunConfig(**auto, augment=False), method_caches=False) is False
    assert teacher_cache_enabled(RunConfig(teacher_cache=False, augment=False), True) is False
    with pytest.raises(ConfigError, match="augment=false"):
        teacher_cache_enabled(RunConfig(teacher_cache=True, augment=True), method_caches=True)
    with pytest.raises(ConfigError, match="teacher_cache"):
        teacher_cache_enabled(RunConfig(teacher_cache=True, augment=False), method_caches=False)


def test_fold_frozen_batchnorm_keeps_outputs_and_hooks():
    from distillkit.engine.setup import fold_frozen_batchnorm

    bundle = _bundle()
    model = _model("resnet8", bundle, seed=2).eval().requires_grad_(False)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(8, 3, 12, 12)
    want = model(x)
    seen = []
    # a hook on a BN (a FitNet hint layer, say) must keep seeing that BN's output
    model.layer1[0].bn2.register_forward_hook(lambda m, i, o: seen.append(o))
    folded = fold_frozen_batchnorm(model)
    assert folded > 0
    assert isinstance(model.layer1[0].bn2, nn.BatchNorm2d)
    assert isinstance(model.bn1, nn.Identity)
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, rtol=1e-4, atol=1e-5)
    assert len(seen) == 1
    # a model in training mode, or one that still learns, is left alone
    train = _model("resnet8", bundle).train()
    assert fold_frozen_batchnorm(train) == 0


class _Branchy(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        return y if y.sum() > 0 else -y


def test_fold_frozen_batchnorm_leaves_untraceable_models_alone():
    from distillkit.engine.setup import fold_frozen_batchnorm

    model = _Branchy().eval().requires_grad_(False)
    assert fold_frozen_batchnorm(model) == 0
    assert isinstance(model.bn, nn.BatchNorm2d)


def test_optimizer_uses_fused_kernels_with_the_for_loop_result():
    bundle = _bundle()
    for opt_name in ("sgd", "adamw"):
        model = _model("cnn_small", bundle)
        ref = copy.deepcopy(model)
        cfg = RunConfig(optimizer=opt_name, lr=0.1 if opt_name == "sgd" else 1e-3)
        fast = build_optimizer(cfg, list(model.parameters()))
        assert all(g["fused"] is True for g in fast.param_groups)
        slow = build_optimizer(cfg, list(ref.parameters()))
        for g in slow.param_groups:  # the single-tensor reference implementation
            g["fused"], g["foreach"] = None, False
        x = torch.randn(16, 3, 12, 12)
        for _ in range(3):
            for m, opt in ((model, fast), (ref, slow)):
                opt.zero_grad()
                m(x).square().mean().backward()
                opt.step()
        for p, q in zip(model.parameters(), ref.parameters()):
            # fused kernels may contract multiply-adds: equal up to float rounding
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


def test_progress_bar_does_not_sync_every_step(tmp_path, monkeypatch):
    bundle = _bundle(n=640)
    t = _trainer(tmp_path, bundle, student="mlp", epochs=1, quiet=False)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    calls = {"n": 0}
    real_float = torch.Tensor.__float__

    def counting(self):
        calls["n"] += 1
        return real_float(self)

    monkeypatch.setattr(torch.Tensor, "__float__", counting)
    t.train_epoch()
    # 10 steps: the epoch summary reads a handful of sums, never one value per step
    assert len(t.loader) == 10
    assert calls["n"] < len(t.loader)


def test_teacher_cache_auto_leaves_out_caches_too_large_to_keep():
    from distillkit.engine.setup import AUTO_CACHE_BYTES, teacher_cache_enabled

    cfg = RunConfig(teacher_cache="auto", augment=False)
    fits, too_big = AUTO_CACHE_BYTES // 4, AUTO_CACHE_BYTES // 4 + 1
    assert teacher_cache_enabled(cfg, method_caches=True, entries=fits) is True
    assert teacher_cache_enabled(cfg, method_caches=True, entries=too_big) is False
    # asked for explicitly, the size is the user's call
    forced = RunConfig(teacher_cache=True, augment=False)
    assert teacher_cache_enabled(forced, method_caches=True, entries=too_big) is True


@pytest.mark.parametrize("augment", [False, True])
def test_default_kd_run_caches_its_teacher_exactly_when_inputs_are_deterministic(tmp_path, augment):
    from distillkit.config import config_from_dict
    from distillkit.runner import run

    common = {"dataset": "digits", "epochs": 1, "quiet": True, "device": "cpu"}
    run(config_from_dict({**common, "name": "t", "model": "mlp", "out_dir": str(tmp_path / "t")}))
    spec = {
        **common,
        "name": "kd",
        "method": "kd",
        "model": "mlp",
        "teacher": str(tmp_path / "t"),
        "augment": augment,
        "epochs": 2,
        "out_dir": str(tmp_path / "kd"),
    }
    assert config_from_dict(spec).teacher_cache == "auto"  # the default, not set here
    run(config_from_dict(spec))
    cached = list((tmp_path / "kd" / "teacher_cache").glob("*.pt"))
    assert bool(cached) is (not augment)


def test_amp_auto_resolves_to_bf16_only_where_the_device_does_it_natively(monkeypatch):
    from distillkit.engine import setup

    cpu = torch.device("cpu")
    for given in ("none", "bf16", "fp16"):
        assert setup.resolve_amp(given, cpu) == given  # explicit settings are kept
    monkeypatch.setattr(setup, "native_bf16", lambda device: True)
    assert setup.resolve_amp("auto", cpu) == "bf16"
    monkeypatch.setattr(setup, "native_bf16", lambda device: False)
    assert setup.resolve_amp("auto", cpu) == "none"
    assert setup.native_bf16(torch.device("meta")) is False


def test_default_run_records_the_amp_it_trained_in(tmp_path):
    import json

    from distillkit.config import config_from_dict
    from distillkit.engine.setup import native_bf16
    from distillkit.runner import run

    spec = {"dataset": "digits", "model": "mlp", "epochs": 1, "quiet": True, "device": "cpu"}
    run(config_from_dict({**spec, "name": "a", "out_dir": str(tmp_path / "a")}))
    summary = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert summary["amp"] == ("bf16" if native_bf16(torch.device("cpu")) else "none")


def test_bf16_path_follows_the_float32_loss_trajectory(tmp_path):
    """amp=bf16 (what auto picks on CPUs with bf16 math) + channels_last vs plain float32 NCHW."""
    bundle = _bundle()
    teacher = _model("resnet8", bundle, seed=5).eval()
    plain = _trainer(tmp_path / "a", bundle, teacher=teacher, channels_last=False)
    fast = _trainer(tmp_path / "b", bundle, teacher=teacher, amp="bf16")
    assert fast.amp_dtype == torch.bfloat16 and plain.amp_dtype is None
    a, b = torch.tensor(_losses_per_step(plain)), torch.tensor(_losses_per_step(fast))
    assert len(a) == len(b) == 6
    assert not torch.equal(a, b)  # bf16 really ran: the float32 path would give the same losses
    # bf16 keeps 8 bits of mantissa: per-step losses agree to a few parts in a hundred
    torch.testing.assert_close(b, a, rtol=3e-2, atol=1e-2)
