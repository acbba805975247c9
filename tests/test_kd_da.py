"""KD + data augmentation: the loss against a direct formula, options, teacher reuse, BN safety."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from distillkit.config import ConfigError, RunConfig, config_from_dict
from distillkit.data.augment import CutMixPick, build_augmentation, mixup_batch, student_scorer
from distillkit.data.datasets import DataBundle, Split
from distillkit.methods import get_method
from distillkit.methods.kd import KD
from distillkit.methods.kd_da import KDDA, KDDAOptions
from distillkit.runner import check_config, resolve_options
from distillkit.teachers import BlackBoxTeacher, LocalTeacher

C = 5


def _linear(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, C))


def _direct_kl(s_logits: torch.Tensor, t_logits: torch.Tensor, t: float) -> torch.Tensor:
    p_t = torch.softmax(t_logits.double() / t, 1)
    p_s = torch.softmax(s_logits.double() / t, 1)
    return t * t * (p_t * (p_t.log() - p_s.log())).sum(1).mean()


def _direct_ce(s_logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    p = torch.softmax(s_logits.double(), 1)
    return -p[torch.arange(len(y)), y].log().mean()


def _close(got: torch.Tensor, expected: torch.Tensor) -> None:
    # the method computes in float32; the direct formulas in float64
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)


def _batch(b: int = 12):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, 1, 4, 4, generator=g)
    y = torch.randint(0, C, (b,), generator=g)
    return x, y, torch.arange(b)


def test_loss_matches_direct_formula_with_mixup():
    student, teacher_model = _linear(1), _linear(2)
    t, w_ce, w_kd = 3.0, 0.2, 0.7
    dist = KDDA(
        student,
        LocalTeacher(teacher_model),
        build_augmentation("mixup", alpha=1.0),
        w_ce=w_ce,
        w_kd=w_kd,
        temperature=t,
    )
    x, y, idx = _batch()
    torch.manual_seed(123)
    logits, losses = dist.training_step((x, y, idx))
    torch.manual_seed(123)  # the mixup draws come from the global RNG
    x_aug = mixup_batch(x, 1.0).x
    with torch.no_grad():
        s, s_aug = student(x), student(x_aug)
        tl, tl_aug = teacher_model(x), teacher_model(x_aug)
    torch.testing.assert_close(logits.detach(), s)
    _close(losses["ce"], w_ce * _direct_ce(s, y))
    _close(losses["kd"], w_kd * _direct_kl(s, tl, t))
    _close(losses["kd_aug"], w_kd * _direct_kl(s_aug, tl_aug, t))
    total = sum(losses.values())
    total.backward()
    assert student[1].weight.grad is not None and teacher_model[1].weight.grad is None


def _inputs_of(module: nn.Module) -> list[torch.Tensor]:
    """Record every batch `module` is called on, in order."""
    seen: list[torch.Tensor] = []
    module.register_forward_hook(lambda mod, args, out: seen.append(args[0].detach().clone()))
    return seen


def _direct_entropy(logits: torch.Tensor) -> torch.Tensor:
    p = torch.softmax(logits.double(), 1)
    return -(p * p.log()).sum(1)


def test_cutmixpick_reuses_teacher_outputs_and_matches_formula():
    student, teacher_model = _linear(3), _linear(4)
    teacher = LocalTeacher(teacher_model)
    dist = KDDA(student, teacher, CutMixPick(mix_n_run=2), temperature=4.0)
    t_inputs, s_inputs = _inputs_of(teacher_model), _inputs_of(student)
    x, y, idx = _batch(8)
    torch.manual_seed(7)
    _, losses = dist.training_step((x, y, idx))
    # x (8), the pool of 16; the picked 8 are not asked again
    assert teacher.queries == 8 + 16 and len(t_inputs) == 2
    pool = t_inputs[1]
    assert pool.shape == (16, 1, 4, 4)
    # direct: the 8 pool images of highest teacher entropy at T = 1
    with torch.no_grad():
        top = _direct_entropy(teacher_model(pool)).argsort(descending=True)[:8]
    x_aug = s_inputs[-1]  # the student's last forward is on the picked batch
    matches = [int((pool == row).flatten(1).all(1).nonzero()[0]) for row in x_aug]
    assert sorted(matches) == sorted(top.tolist())
    with torch.no_grad():
        expected = 0.9 * _direct_kl(student(pool[top]), teacher_model(pool[top]), 4.0)
    _close(losses["kd_aug"], expected)


def _direct_hard(s_logits: torch.Tensor, labels: torch.Tensor, t: float) -> torch.Tensor:
    """T^2 KL(one-hot || softmax(s / T)) = -T^2 log softmax(s / T)[label]."""
    p = torch.softmax(s_logits.double() / t, 1)
    return -t * t * p[torch.arange(len(labels)), labels].log().mean()


def test_hard_label_teacher_gets_the_exact_one_hot_target_as_in_kd():
    student, teacher_model = _linear(8), _linear(9)
    t = 4.0
    x, y, idx = _batch()
    kd_da = KDDA(
        student,
        BlackBoxTeacher(teacher_model, kind="hard"),
        build_augmentation("identity"),
        w_ce=0.1,
        w_kd=0.9,
        temperature=t,
        num_classes=C,
    )
    _, l_da = kd_da.training_step((x, y, idx))
    kd = KD(student, BlackBoxTeacher(teacher_model, kind="hard"), t, 0.1, C)
    _, l_kd = kd.training_step((x, y, idx))
    with torch.no_grad():
        expected = 0.9 * _direct_hard(student(x), teacher_model(x).argmax(1), t)
    _close(l_kd["kd"], expected)
    _close(l_da["kd"], expected)
    _close(l_da["kd_aug"], expected)


@pytest.mark.parametrize("aug", ["mixup", "cutmixpick_kl"])
def test_hard_label_teacher_on_the_augmented_batch_uses_the_exact_one_hot(aug):
    student, teacher_model = _linear(10), _linear(11)
    t = 4.0
    # cutmixpick scores with the teacher and hands its answers back; mixup asks again on x'
    if aug == "cutmixpick_kl":
        op = CutMixPick(mix_n_run=2, criterion="kl")
    else:
        op = build_augmentation("mixup", alpha=1.0)
    dist = KDDA(
        student, BlackBoxTeacher(teacher_model, kind="hard"), op, temperature=t, num_classes=C
    )
    s_inputs = _inputs_of(student)
    x, y, idx = _batch(8)
    torch.manual_seed(3)
    _, losses = dist.training_step((x, y, idx))
    x_aug = s_inputs[-1]
    with torch.no_grad():
        expected = 0.9 * _direct_hard(student(x_aug), teacher_model(x_aug).argmax(1), t)
    _close(losses["kd_aug"], expected)


def test_identity_doubles_the_kd_term():
    dist = KDDA(_linear(5), LocalTeacher(_linear(6)), build_augmentation("identity"))
    _, losses = dist.training_step(_batch())
    torch.testing.assert_close(losses["kd_aug"], losses["kd"])


def test_student_scorer_leaves_batchnorm_statistics_alone():
    student = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.BatchNorm1d(8), nn.Linear(8, C))
    student.train()
    before = {k: v.clone() for k, v in student.state_dict().items()}
    student_scorer(student)(torch.randn(10, 1, 4, 4))
    for k, v in student.state_dict().items():
        torch.testing.assert_close(v, before[k])


def _bundle() -> DataBundle:
    s = Split(torch.zeros(4, 1, 4, 4, dtype=torch.uint8), torch.arange(4) % C)
    return DataBundle("toy", s, s, C, 1, 4, (0.5,), (0.25,), [str(i) for i in range(C)])


def test_options_defaults_builder_and_validation():
    opts = KDDAOptions()
    assert (opts.w_ce, opts.w_kd, opts.temperature) == (0.1, 0.9, 4.0)
    spec = get_method("kd_da")
    assert spec.options_cls is KDDAOptions and spec.needs_teacher
    cfg = RunConfig(method="kd_da", options={"augmentation": "cutout", "params": {"length": 2}})
    dist = spec.build(cfg, resolve_options(cfg), _linear(0), LocalTeacher(_linear(1)), _bundle())
    assert dist.temperature == 4.0 and dist.augmentation.length == 2
    assert dist.mean == (0.5,) and dist.std == (0.25,)
    cfg.options["temperature"] = 6.0
    dist = spec.build(cfg, resolve_options(cfg), _linear(0), LocalTeacher(_linear(1)), _bundle())
    assert dist.temperature == 6.0

    base = {"method": "kd_da", "teacher": "runs/t", "model": "mlp"}

    def checked(data):
        cfg = config_from_dict(data)
        check_config(cfg)
        return cfg

    with pytest.raises(ConfigError, match="'bogus'"):
        checked({**base, "options": {"augmentation": "bogus"}})
    with pytest.raises(ConfigError, match="'size'"):
        checked({**base, "options": {"augmentation": "cutout", "params": {"size": 3}}})
    with pytest.raises(ConfigError, match="w_ce"):
        checked({**base, "options": {"w_ce": -0.5}})
    with pytest.raises(ConfigError, match="options.augmenation"):
        checked({**base, "options": {"augmenation": "cutmix"}})
    with pytest.raises(
        ConfigError, match="config key 'temperature' moved to 'options.temperature'"
    ):
        checked({**base, "temperature": 2.0})
    ok = checked({**base, "options": {"augmentation": "mixup", "params": {"alpha": 0.4}}})
    assert resolve_options(ok).params == {"alpha": 0.4}


def test_da_score_students_keep_the_temperature_of_the_config():
    from distillkit.commands.da_score import student_options

    kd = config_from_dict(
        {"method": "kd", "teacher": "t", "options": {"temperature": 2, "alpha": 0.3}}
    )
    opts = student_options(kd, "mixup", {"alpha": 0.4})
    assert opts == {"temperature": 2.0, "augmentation": "mixup", "params": {"alpha": 0.4}}
    kd_da = config_from_dict({"method": "kd_da", "teacher": "t", "options": {"w_ce": 0.2}})
    opts = student_options(kd_da, "cutout", {})
    assert opts == {"w_ce": 0.2, "augmentation": "cutout", "params": {}}
    assert student_options(config_from_dict({"teacher": "t"}), "flip", {}) == {
        "augmentation": "flip",
        "params": {},
    }
