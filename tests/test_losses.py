"""Distillation losses against independent numpy formulas: kd_kl, the KD method, FitNet."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from distillkit.methods import KD, FitNet, kd_kl
from distillkit.methods.losses import kd_loss, kd_target
from distillkit.models import build_model
from distillkit.teachers import BlackBoxTeacher, LocalTeacher, TeacherOutput

# --------------------------------------------------------------------------- reference formulas


def np_softmax(z: np.ndarray, t: float = 1.0) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64) / t
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def np_kd(student_logits: np.ndarray, teacher_logits: np.ndarray, t: float) -> float:
    """T^2 * mean over rows of sum_c p_t log(p_t / p_s), softmax at temperature T."""
    p_s = np_softmax(student_logits, t)
    p_t = np_softmax(teacher_logits, t)
    total = 0.0
    for i in range(p_t.shape[0]):
        row = 0.0
        for c in range(p_t.shape[1]):
            if p_t[i, c] > 0:
                row += p_t[i, c] * np.log(p_t[i, c] / p_s[i, c])
        total += row
    return t * t * total / p_t.shape[0]


def np_ce(logits: np.ndarray, labels: np.ndarray) -> float:
    p = np_softmax(logits)
    return float(-np.mean(np.log(p[np.arange(len(labels)), labels])))


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().cpu().numpy()


# --------------------------------------------------------------------------- kd_kl


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_kd_kl_matches_direct_formula(temperature):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(7, 5, generator=g) * 3
    t = torch.randn(7, 5, generator=g) * 3
    got = kd_kl(s, t, temperature)
    assert got.dim() == 0
    assert got.item() == pytest.approx(np_kd(_np(s), _np(t), temperature), rel=1e-5, abs=1e-7)


def test_kd_kl_is_zero_for_identical_and_positive_otherwise():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(4, 6, generator=g)
    assert kd_kl(s, s.clone(), 3.0).item() == pytest.approx(0.0, abs=1e-6)
    assert kd_kl(s, s.flip(1), 3.0).item() > 1e-3


def test_kd_kl_same_for_teacher_log_probs_and_logits():
    g = torch.Generator().manual_seed(2)
    s = torch.randn(6, 10, generator=g) * 2
    t_logits = torch.randn(6, 10, generator=g) * 2 + 5.0  # offset: logits are not log-probs
    from_logits = kd_kl(s, t_logits, 4.0)
    from_log_probs = kd_kl(s, F.log_softmax(t_logits, dim=1), 4.0)
    assert from_log_probs.item() == pytest.approx(from_logits.item(), rel=1e-5)
    assert from_logits.item() == pytest.approx(np_kd(_np(s), _np(t_logits), 4.0), rel=1e-5)


def test_kd_kl_gradient_flows_to_student_only():
    g = torch.Generator().manual_seed(3)
    s = torch.randn(3, 4, generator=g, requires_grad=True)
    t = torch.randn(3, 4, generator=g)
    kd_kl(s, t, 2.0).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0


@pytest.mark.parametrize("t_shape", [(4, 9), (5, 10), (4, 10, 1)])
def test_kd_kl_shape_mismatch(t_shape):
    with pytest.raises(ValueError, match="same shape"):
        kd_kl(torch.zeros(4, 10), torch.zeros(*t_shape), 4.0)


@pytest.mark.parametrize("temperature", [1.0, 4.0, 20.0])
def test_hard_label_target_is_the_exact_one_hot_at_any_temperature(temperature):
    labels = torch.tensor([2, 0, 9])
    target = kd_target(TeacherOutput(labels=labels), temperature, num_classes=10)
    one_hot = np.zeros((3, 10))
    one_hot[np.arange(3), [2, 0, 9]] = 1.0
    assert np.array_equal(_np(target), one_hot)  # exact: no floor re-tempered into mass elsewhere
    # soft answers: softmax(log p / T), the same for logits and for probabilities
    g = torch.Generator().manual_seed(9)
    t_logits = torch.randn(3, 10, generator=g) * 2
    expected = np_softmax(_np(t_logits), temperature)
    for out in (TeacherOutput(logits=t_logits), TeacherOutput(probs=t_logits.softmax(1))):
        np.testing.assert_allclose(_np(kd_target(out, temperature)), expected, rtol=1e-5)
    # the loss against a one-hot target: T^2 * -log softmax(s / T)[label]
    s = torch.randn(3, 10, generator=g) * 2
    z = _np(s) / temperature
    log_p = z - z.max(1, keepdims=True)
    log_p = log_p - np.log(np.exp(log_p).sum(1, keepdims=True))
    expected_loss = temperature**2 * -log_p[np.arange(3), [2, 0, 9]].mean()
    got = kd_loss(s, TeacherOutput(labels=labels), temperature)
    assert got.item() == pytest.approx(expected_loss, rel=1e-5)
    soft = kd_loss(s, TeacherOutput(logits=t_logits), temperature)
    assert soft.item() == pytest.approx(np_kd(_np(s), _np(t_logits), temperature), rel=1e-5)


# --------------------------------------------------------------------------- KD method


NUM_CLASSES = 10


def _models(seed: int = 0):
    torch.manual_seed(seed)
    student = build_model("mlp", in_channels=1, num_classes=NUM_CLASSES, image_size=8, hidden=(16,))
    teacher = build_model(
        "mlp", in_channels=1, num_classes=NUM_CLASSES, image_size=8, hidden=(32, 16)
    )
    # spread the logits: near-uniform outputs make the KL tiny and float32 round-off dominate
    with torch.no_grad():
        student.classifier.weight.normal_(0.0, 1.0)
        teacher.classifier.weight.normal_(0.0, 1.0)
    return student, teacher


def _batch(n: int = 12, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    return x, y, torch.arange(n)


@pytest.mark.parametrize("temperature,alpha", [(4.0, 0.1), (2.0, 0.5), (1.0, 0.0), (3.0, 1.0)])
def test_kd_total_matches_direct_formula(temperature, alpha):
    student, teacher_model = _models()
    x, y, idx = _batch()
    with torch.no_grad():
        s_logits = _np(student(x))
        t_logits = _np(teacher_model(x))
    assert np_kd(s_logits, t_logits, temperature) > 1e-2  # well above float32 round-off
    kd = KD(student, LocalTeacher(teacher_model), temperature, alpha, NUM_CLASSES)
    logits, losses = kd.training_step((x, y, idx))
    assert set(losses) == {"ce", "kd"}
    np.testing.assert_allclose(_np(logits), s_logits, rtol=1e-6, atol=1e-6)
    ce = alpha * np_ce(s_logits, y.numpy())
    kl = (1 - alpha) * np_kd(s_logits, t_logits, temperature)
    assert losses["ce"].item() == pytest.approx(ce, rel=1e-5, abs=1e-7)
    assert losses["kd"].item() == pytest.approx(kl, rel=1e-5, abs=1e-7)
    assert sum(losses.values()).item() == pytest.approx(ce + kl, rel=1e-5, abs=1e-7)


def test_kd_backward_reaches_student_not_teacher():
    student, teacher_model = _models()
    kd = KD(student, LocalTeacher(teacher_model), 4.0, 0.1, NUM_CLASSES)
    _, losses = kd.training_step(_batch())
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in student.parameters())
    assert all(p.grad is None for p in teacher_model.parameters())
    ids = {id(p) for p in kd.trainable_parameters()}
    assert ids == {id(p) for p in student.parameters()}


def test_kd_black_box_soft_equals_white_box():
    student, teacher_model = _models(seed=4)
    batch = _batch(seed=5)
    white = KD(student, LocalTeacher(teacher_model), 4.0, 0.3, NUM_CLASSES)
    _, lw = white.training_step(batch)
    soft_teacher = BlackBoxTeacher(teacher_model, kind="soft")
    black = KD(student, soft_teacher, 4.0, 0.3, NUM_CLASSES)
    _, lb = black.training_step(batch)
    assert lb["ce"].item() == pytest.approx(lw["ce"].item(), rel=1e-6)
    assert lb["kd"].item() == pytest.approx(lw["kd"].item(), rel=1e-4)
    assert soft_teacher.queries == len(batch[0])


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_kd_black_box_hard_uses_one_hot_targets(temperature):
    student, teacher_model = _models(seed=6)
    x, y, idx = _batch(seed=7)
    alpha = 0.2
    with torch.no_grad():
        s_logits = _np(student(x))
        t_labels = teacher_model(x).argmax(1).numpy()
    # direct: KL(one-hot || softmax(s/T)) * T^2 = -T^2 * log softmax(s/T)[teacher label]
    z = s_logits / temperature
    log_p = z - z.max(1, keepdims=True)
    log_p = log_p - np.log(np.exp(log_p).sum(1, keepdims=True))
    nll = -log_p[np.arange(len(t_labels)), t_labels].mean()
    expected_kd = (1 - alpha) * temperature**2 * nll
    kd = KD(student, BlackBoxTeacher(teacher_model, kind="hard"), temperature, alpha, NUM_CLASSES)
    _, losses = kd.training_step((x, y, idx))
    assert losses["kd"].item() == pytest.approx(expected_kd, rel=1e-4)
    assert losses["ce"].item() == pytest.approx(alpha * np_ce(s_logits, y.numpy()), rel=1e-5)
    # and it is not the soft-target loss
    soft = (1 - alpha) * np_kd(s_logits, _np(teacher_model(x)), temperature)
    assert abs(losses["kd"].item() - soft) > 1e-3


# --------------------------------------------------------------------------- FitNet


def _record(module: torch.nn.Module, store: dict, key: str):
    def hook(mod, inputs, output):
        store[key] = output

    return module.register_forward_hook(hook)


@pytest.mark.parametrize(
    "s_layer,t_layer",
    [("layer2", "layer2"), ("layer1", "layer2")],  # second: student map resized 8x8 -> 4x4
)
def test_fitnet_hint_matches_own_hooks(s_layer, t_layer):
    torch.manual_seed(0)
    student = build_model("cnn_small", in_channels=1, num_classes=NUM_CLASSES, image_size=8)
    teacher_model = build_model("cnn_small", in_channels=1, num_classes=NUM_CLASSES, image_size=8)
    teacher = LocalTeacher(teacher_model)
    weight = 7.5
    fit = FitNet(student, teacher, s_layer, t_layer, (1, 8, 8), hint_weight=weight)
    fit.train()
    x, y, idx = _batch(n=16, seed=8)
    store: dict = {}
    handles = [
        _record(student.get_submodule(s_layer), store, "s"),
        _record(teacher_model.get_submodule(t_layer), store, "t"),
    ]
    try:
        logits, losses = fit.training_step((x, y, idx))
        s_feat, t_feat = store["s"], store["t"]
    finally:
        for h in handles:
            h.remove()
    assert set(losses) == {"ce", "hint"}
    assert not t_feat.requires_grad
    with torch.no_grad():
        adapted = fit.adapter(s_feat)
        if adapted.shape[-2:] != t_feat.shape[-2:]:
            adapted = F.interpolate(
                adapted, size=t_feat.shape[-2:], mode="bilinear", align_corners=False
            )
    assert adapted.shape == t_feat.shape
    a, b = _np(adapted), _np(t_feat)
    expected_hint = weight * float(np.mean((a - b) ** 2))
    assert losses["hint"].item() == pytest.approx(expected_hint, rel=1e-5)
    assert losses["ce"].item() == pytest.approx(np_ce(_np(logits), y.numpy()), rel=1e-5)

    sum(losses.values()).backward()
    assert all(p.grad is None for p in teacher_model.parameters())
    assert all(not p.requires_grad for p in teacher_model.parameters())
    assert all(p.grad is not None for p in fit.adapter.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    trainable = {id(p) for p in fit.trainable_parameters()}
    assert {id(p) for p in fit.adapter.parameters()} <= trainable
    assert not trainable & {id(p) for p in teacher_model.parameters()}
    assert not teacher_model.training


def test_fitnet_rank_mismatch_is_an_error():
    torch.manual_seed(0)
    student = build_model("cnn_small", in_channels=1, num_classes=NUM_CLASSES, image_size=8)
    teacher_model = build_model("mlp", in_channels=1, num_classes=NUM_CLASSES, image_size=8)
    with pytest.raises(ValueError, match="same rank"):
        FitNet(student, LocalTeacher(teacher_model), "layer2", "layer1", (1, 8, 8))
