"""Teachers: white-box LocalTeacher, BlackBoxTeacher with budgets, CachedTeacher."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from distillkit.methods import KD
from distillkit.teachers import (
    BlackBoxTeacher,
    BudgetExceededError,
    CachedTeacher,
    LocalTeacher,
    Teacher,
    TeacherOutput,
)


def _net(seed: int = 0, dropout: float = 0.5) -> nn.Module:
    """A model whose output depends on train/eval mode (dropout and batch norm)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(16, 32),
        nn.BatchNorm1d(32),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Linear(32, 5),
    )


def _x(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 1, 4, 4, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- LocalTeacher


def test_local_teacher_stays_in_eval_mode():
    model = _net()
    model.train()
    teacher = LocalTeacher(model)
    assert all(not m.training for m in model.modules())
    teacher.train()
    assert not teacher.training
    assert all(not m.training for m in model.modules())
    # inside a distiller put in train mode
    kd = KD(nn.Linear(16, 5), teacher, 4.0, 0.1, 5)
    kd.train()
    assert kd.student.training
    assert all(not m.training for m in model.modules())
    # eval-mode outputs are deterministic and BN running stats do not move
    stats = model[2].running_mean.clone()
    x = _x(8)
    a, b = teacher(x).logits, teacher(x).logits
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(model[2].running_mean, stats)


@pytest.mark.parametrize(
    "make",
    [
        lambda: LocalTeacher(_net()),
        lambda: BlackBoxTeacher(_net(), kind="soft"),
        lambda: CachedTeacher(LocalTeacher(_net()), 4),
    ],
    ids=["local", "black-box", "cached"],
)
def test_teacher_wrapper_flag_is_eval_after_construction(make):
    assert not make().training


def test_local_teacher_no_grad_and_logits():
    model = _net()
    teacher = LocalTeacher(model)
    assert all(not p.requires_grad for p in model.parameters())
    x = _x(6).requires_grad_(True)
    out = teacher(x)
    assert isinstance(out, TeacherOutput)
    assert out.probs is None and out.labels is None
    assert not out.logits.requires_grad
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(out.logits, model(x))
    assert teacher.kind == "white-box"
    assert isinstance(teacher, Teacher)


def test_local_teacher_counts_queries():
    teacher = LocalTeacher(_net())
    assert teacher.queries == 0
    for n in (3, 5, 1):
        teacher(_x(n))
    assert teacher.queries == 9


# --------------------------------------------------------------------------- BlackBoxTeacher


def test_black_box_soft_probabilities():
    model = _net()
    teacher = BlackBoxTeacher(model, kind="soft")
    x = _x(10)
    out = teacher(x)
    assert out.logits is None and out.labels is None
    assert out.probs.shape == (10, 5)
    torch.testing.assert_close(out.probs.sum(1), torch.ones(10))
    assert (out.probs >= 0).all()
    with torch.no_grad():
        logits = model.eval()(x).double().numpy()
    e = np.exp(logits - logits.max(1, keepdims=True))
    np.testing.assert_allclose(out.probs.numpy(), e / e.sum(1, keepdims=True), rtol=1e-5)
    assert not out.probs.requires_grad


def test_black_box_hard_labels_are_argmax():
    model = _net(seed=1)
    teacher = BlackBoxTeacher(model, kind="hard")
    x = _x(20, seed=1)
    out = teacher(x)
    assert out.logits is None and out.probs is None
    with torch.no_grad():
        expected = model.eval()(x).numpy().argmax(1)
    np.testing.assert_array_equal(out.labels.numpy(), expected)
    assert teacher.kind == "hard"


def test_black_box_counts_queries_exactly():
    teacher = BlackBoxTeacher(_net(), kind="soft")
    sizes = [7, 1, 12, 3]
    for n in sizes:
        teacher(_x(n))
    assert teacher.queries == sum(sizes)
    assert teacher.remaining is None


def test_black_box_budget():
    teacher = BlackBoxTeacher(_net(), kind="hard", budget=10)
    teacher(_x(6))
    assert teacher.queries == 6 and teacher.remaining == 4
    with pytest.raises(BudgetExceededError, match="budget"):
        teacher(_x(5))
    assert teacher.queries == 6  # the refused batch is not spent
    assert teacher.remaining == 4
    teacher(_x(4))  # exactly up to the budget is allowed
    assert teacher.queries == 10 and teacher.remaining == 0
    with pytest.raises(BudgetExceededError):
        teacher(_x(1))
    assert teacher.queries == 10


def test_black_box_budget_zero_refuses_everything():
    teacher = BlackBoxTeacher(_net(), kind="soft", budget=0)
    with pytest.raises(BudgetExceededError):
        teacher(_x(1))
    assert teacher.queries == 0


@pytest.mark.parametrize("kind", ["white-box", "logits", "", "SOFT"])
def test_black_box_invalid_kind(kind):
    with pytest.raises(ValueError, match="kind"):
        BlackBoxTeacher(_net(), kind=kind)


def test_black_box_negative_budget():
    with pytest.raises(ValueError, match="budget"):
        BlackBoxTeacher(_net(), kind="soft", budget=-1)


def test_black_box_stays_in_eval_mode():
    model = _net()
    teacher = BlackBoxTeacher(model, kind="soft")
    teacher.train()
    assert not teacher.training
    assert all(not m.training for m in model.modules())


# --------------------------------------------------------------------------- CachedTeacher


N = 20


def _data(seed: int = 3) -> torch.Tensor:
    return _x(N, seed=seed)


def test_cached_teacher_queries_each_sample_once():
    inner = LocalTeacher(_net())
    cache = CachedTeacher(inner, N)
    data = _data()
    idx = torch.tensor([0, 1, 2, 3, 4])
    first = cache(data[idx], idx)
    assert inner.queries == 5 and cache.queries == 5
    second = cache(data[idx], idx)
    assert inner.queries == 5  # answered from the cache
    torch.testing.assert_close(second.logits, first.logits)
    # a mixed batch queries only the unknown samples
    idx2 = torch.tensor([3, 4, 5, 6])
    third = cache(data[idx2], idx2)
    assert inner.queries == 7
    with torch.no_grad():
        expected = inner.model(data[idx2])
    torch.testing.assert_close(third.logits, expected)
    torch.testing.assert_close(third.logits[:2], first.logits[3:])


def test_cached_teacher_keeps_the_field_of_the_wrapped_teacher():
    inner = BlackBoxTeacher(_net(), kind="hard")
    cache = CachedTeacher(inner, N)
    data = _data()
    idx = torch.tensor([9, 2, 4])
    a = cache(data[idx], idx)
    b = cache(data[idx], idx)
    assert a.labels is not None and a.logits is None and a.probs is None
    torch.testing.assert_close(a.labels, b.labels)
    assert inner.queries == 3
    assert cache.kind == "hard"


def test_cached_teacher_without_idx_passes_through():
    inner = LocalTeacher(_net())
    cache = CachedTeacher(inner, N)
    cache(_data()[:4])
    cache(_data()[:4])
    assert inner.queries == 8


def test_cached_teacher_save_and_reload(tmp_path):
    path = tmp_path / "sub" / "cache.pt"
    model = _net()
    inner = LocalTeacher(model)
    cache = CachedTeacher(inner, N, path)
    data = _data()
    idx = torch.tensor([1, 5, 7, 19])
    first = cache(data[idx], idx)
    cache.save()
    assert path.is_file()
    assert not list(path.parent.glob("*.tmp"))

    fresh_inner = LocalTeacher(model)
    reloaded = CachedTeacher(fresh_inner, N, path)
    again = reloaded(data[idx], idx)
    assert fresh_inner.queries == 0
    torch.testing.assert_close(again.logits, first.logits)
    # samples not in the saved cache are still queried
    idx2 = torch.tensor([0, 1])
    reloaded(data[idx2], idx2)
    assert fresh_inner.queries == 1


def test_cached_teacher_size_mismatch(tmp_path):
    path = tmp_path / "cache.pt"
    cache = CachedTeacher(LocalTeacher(_net()), N, path)
    idx = torch.tensor([0, 1])
    cache(_data()[idx], idx)
    cache.save()
    with pytest.raises(ValueError, match=r"20 samples.*30"):
        CachedTeacher(LocalTeacher(_net()), 30, path)


def test_cached_teacher_stays_in_eval_mode():
    model = _net()
    cache = CachedTeacher(LocalTeacher(model), N)
    cache.train()
    assert not cache.training
    assert all(not m.training for m in model.modules())


def test_kd_with_cached_teacher_uses_indices():
    """KD passes the batch's sample indices to a caching teacher (second epoch: no queries)."""
    torch.manual_seed(0)
    inner = LocalTeacher(_net())
    cache = CachedTeacher(inner, N)
    kd = KD(nn.Sequential(nn.Flatten(), nn.Linear(16, 5)), cache, 4.0, 0.5, 5)
    data, y = _data(), torch.arange(N) % 5
    idx = torch.arange(N)
    _, first = kd.training_step((data, y, idx))
    assert inner.queries == N
    _, second = kd.training_step((data, y, idx))
    assert inner.queries == N
    torch.testing.assert_close(second["kd"], first["kd"])
