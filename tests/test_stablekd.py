"""StableKD: schedule, gradient isolation, exported student, exact resume, end to end on digits."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from distillkit.config import ConfigError, config_from_dict, load_config
from distillkit.engine.checkpoint import load_checkpoint, model_from_checkpoint
from distillkit.methods.kd import KD
from distillkit.methods.stablekd import (
    StableKD,
    StableKDOptions,
    build_schedule,
    stage_of_epoch,
    stage_sizes,
)
from distillkit.models import build_model
from distillkit.models.stagewise import split_blocks
from distillkit.teachers import LocalTeacher


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one intra-op thread is much faster than two on a busy shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


ROOT = Path(__file__).resolve().parents[1]
SHAPE = (1, 8, 8)


def _pair(student: str = "cnn_medium"):
    torch.manual_seed(0)
    teacher = LocalTeacher(build_model("resnet8", in_channels=1, num_classes=10, image_size=8))
    student_model = build_model(student, in_channels=1, num_classes=10, image_size=8)
    return student_model, teacher


def _distiller(stage_epochs=(1, 1, 1), student: str = "cnn_medium", alpha: float = 0.1):
    s, t = _pair(student)
    sizes = stage_sizes([4, 2, 1])
    schedule = build_schedule(sizes, list(stage_epochs), sum(stage_epochs))
    return StableKD(s, t, schedule, SHAPE, temperature=4.0, alpha=alpha)


def _batch(n: int = 6):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, *SHAPE, generator=g), torch.arange(n) % 10, torch.arange(n)


# -- schedule ----------------------------------------------------------------------------------
def test_schedule_merges_as_configured_and_ends_end_to_end():
    sizes = stage_sizes([4, 2, 1])
    assert sizes == [[1, 1, 1, 1], [2, 2], [4]]
    stages = build_schedule(sizes, [3, 2, 1], 6)
    assert [s.groups for s in stages] == [
        ((0,), (1,), (2,), (3,)),
        ((0, 1), (2, 3)),
        ((0, 1, 2, 3),),
    ]
    assert [s.epochs for s in stages] == [3, 2, 1]
    assert [stage_of_epoch(e, [3, 2, 1]) for e in range(6)] == [0, 0, 0, 1, 1, 2]
    assert stage_sizes(stages=[[1, 1, 1], [2, 1], [3]]) == [[1, 1, 1], [2, 1], [3]]
    assert stage_sizes([6, 3, 1]) == [[1] * 6, [2, 2, 2], [6]]
    # default epochs: split evenly, earlier stages take the remainder
    assert [s.epochs for s in build_schedule(sizes, [], 10)] == [4, 3, 3]
    with pytest.raises(ValueError, match="end-to-end"):
        stage_sizes([4, 2])
    with pytest.raises(ValueError, match="neighbouring"):
        stage_sizes(stages=[[1, 1, 1, 1], [1, 3], [2, 2], [4]])
    with pytest.raises(ValueError, match="sums to 5 but epochs is 6"):
        build_schedule(sizes, [2, 2, 1], 6)


def test_options_are_validated_through_the_config():
    base = {"method": "stablekd", "teacher": "x"}
    cfg = config_from_dict({**base, "options": {"blocks_per_stage": [4, 2, 1]}})
    assert cfg.method == "stablekd"
    with pytest.raises(ConfigError, match="end-to-end"):
        config_from_dict({**base, "options": {"blocks_per_stage": [4, 2]}})
    with pytest.raises(ConfigError, match="stage_epochs has 2 entries"):
        config_from_dict({**base, "options": {"stage_epochs": [1, 1]}})
    with pytest.raises(ConfigError, match="unknown config key 'options.stage_epoch'"):
        config_from_dict({**base, "options": {"stage_epoch": [1, 1, 1]}})
    assert StableKDOptions().blocks_per_stage == [4, 2, 1]


def test_loss_names_follow_the_stage_and_the_last_stage_is_kd():
    d = _distiller()
    x, y, idx = _batch()
    expected = [
        {"s1_b0_feat", "s1_b1_feat", "s1_b2_feat", "s1_b3_kd", "s1_b3_ce"},
        {"s2_b0-1_feat", "s2_b2-3_kd", "s2_b2-3_ce"},
        {"s3_b0-3_kd", "s3_b0-3_ce"},
    ]
    for epoch, names in enumerate(expected):
        d.on_epoch_start(epoch)
        assert int(d.stage) == epoch
        _, losses = d.training_step((x, y, idx))
        assert set(losses) == names
    # the end-to-end stage is exactly Hinton KD on the plain student
    d.eval()
    logits, losses = d.training_step((x, y, idx))
    kd = KD(d.student, d.teacher, temperature=4.0, alpha=0.1)
    kd_logits, kd_losses = kd.training_step((x, y, idx))
    assert torch.equal(logits, kd_logits)
    assert torch.allclose(losses["s3_b0-3_kd"], kd_losses["kd"])
    assert torch.allclose(losses["s3_b0-3_ce"], kd_losses["ce"])


def test_stage_must_be_set():
    with pytest.raises(RuntimeError, match="on_epoch_start"):
        _distiller().training_step(_batch())


# -- gradient isolation --------------------------------------------------------------------------
def _grad_owners(d: StableKD) -> set[str]:
    """Which blocks / connectors received a non-zero gradient."""
    owners = set()
    for i, block in enumerate(split_blocks(d.student, 4)):
        if any(p.grad is not None and p.grad.abs().sum() > 0 for p in block.module.parameters()):
            owners.add(f"block{i}")
    for kind, conns in (("in", d.in_connectors), ("out", d.out_connectors)):
        for k, conn in conns.items():
            if any(p.grad is not None and p.grad.abs().sum() > 0 for p in conn.parameters()):
                owners.add(f"{kind}{k}")
    assert not any(p.grad is not None for p in d.teacher.parameters())
    return owners


@pytest.mark.parametrize(
    "stage,name,owners",
    [
        (0, "s1_b0_feat", {"block0", "out1"}),
        (0, "s1_b1_feat", {"in1", "block1", "out2"}),
        (0, "s1_b2_feat", {"in2", "block2", "out3"}),
        (0, "s1_b3_kd", {"in3", "block3"}),
        (1, "s2_b0-1_feat", {"block0", "block1", "out2"}),
        (1, "s2_b2-3_kd", {"in2", "block2", "block3"}),
        (2, "s3_b0-3_kd", {"block0", "block1", "block2", "block3"}),
    ],
)
def test_gradients_stay_inside_their_group(stage, name, owners):
    d = _distiller()
    d.on_epoch_start(stage)
    _, losses = d.training_step(_batch())
    d.zero_grad(set_to_none=True)
    losses[name].backward()
    assert _grad_owners(d) == owners


# -- runs on digits ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    from distillkit.runner import run

    out = tmp_path_factory.mktemp("teacher")
    cfg = config_from_dict(
        {
            "method": "ce",
            "model": "resnet8",
            "epochs": 2,
            "batch_size": 256,
            "out_dir": str(out),
            "quiet": True,
        }
    )
    cfg.device = "cpu"
    run(cfg)
    return out


def _cfg(teacher_dir: Path, out: Path, **extra):
    data = {
        "method": "stablekd",
        "model": "cnn_small",
        "teacher": str(teacher_dir),
        "epochs": 4,
        "batch_size": 256,
        "options": {"stage_epochs": [1, 2, 1]},
        "out_dir": str(out),
        "device": "cpu",
        "quiet": True,
    }
    data.update(extra)
    return config_from_dict(data)


def test_epochs_must_match_the_stages(teacher_dir, tmp_path):
    from distillkit.runner import run

    with pytest.raises(ConfigError, match=r"stage_epochs \[1, 2, 1\] sums to 4 but epochs is 5"):
        run(_cfg(teacher_dir, tmp_path / "bad", epochs=5))


class _Killed(Exception):
    pass


def test_resume_mid_stage_equals_uninterrupted_run(teacher_dir, tmp_path, monkeypatch):
    from distillkit.engine import checkpoint as ckpt_mod
    from distillkit.runner import resume, run

    run(_cfg(teacher_dir, tmp_path / "full"))

    def fake_kill(pid, sig):
        raise _Killed

    monkeypatch.setattr(ckpt_mod.os, "kill", fake_kill)
    monkeypatch.setenv(ckpt_mod.KILL_ENV, "2")  # after epoch 2: inside stage 2 (epochs 2-3)
    with pytest.raises(_Killed):
        run(_cfg(teacher_dir, tmp_path / "cut"))
    state = load_checkpoint(tmp_path / "cut" / "checkpoints" / "last.pt")
    assert state["epoch"] == 2 and int(state["distiller"]["stage"]) == 1
    monkeypatch.delenv(ckpt_mod.KILL_ENV)
    resume(tmp_path / "cut")

    a = load_checkpoint(tmp_path / "full" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "cut" / "checkpoints" / "last.pt")
    for key in ("model", "distiller"):
        assert a[key].keys() == b[key].keys()
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), (key, k)
    timing = {"epoch_time", "images_per_sec"}
    rows_a = [{k: v for k, v in r.items() if k not in timing} for r in a["history"]]
    rows_b = [{k: v for k, v in r.items() if k not in timing} for r in b["history"]]
    assert rows_a == rows_b
    assert "loss_s2_b0-1_feat" in rows_a[2] and "loss_s3_b0-3_kd" in rows_a[3]


def test_end_to_end_on_digits_with_connectors_left_out_of_the_student(teacher_dir, tmp_path):
    from distillkit.cli import main

    out = tmp_path / "e2e"
    rc = main(
        [
            "distill",
            str(ROOT / "configs" / "digits_stablekd.yaml"),
            f"teacher={teacher_dir}",
            "model=cnn_medium",  # widths differ from the teacher's: connectors at every boundary
            "epochs=3",
            "batch_size=256",
            "options.stage_epochs=[1,1,1]",
            f"out_dir={out}",
            "device=cpu",
            "--quiet",
        ]
    )
    assert rc == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert "loss_s1_b2_feat" in rows[0] and "loss_s2_b0-1_feat" in rows[1]
    assert {k for k in rows[2] if k.startswith("loss_")} == {"loss_s3_b0-3_kd", "loss_s3_b0-3_ce"}
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["method"] == "stablekd" and summary["epochs"] == 3
    assert all(r["test_acc"] is not None for r in rows)

    state = load_checkpoint(out / "checkpoints" / "last.pt")
    plain = build_model("cnn_medium", in_channels=1, num_classes=10, image_size=8)
    assert set(state["model"]) == set(plain.state_dict())
    connector_keys = [k for k in state["distiller"] if "connectors." in k]
    assert connector_keys, "cnn_medium vs resnet8 needs connectors"
    assert not any("connectors" in k for k in state["model"])
    model, _ = model_from_checkpoint(out, which="last")
    assert type(model) is type(plain)
    assert os.path.isfile(out / "config.yaml")
    assert load_config(out / "config.yaml").options["stage_epochs"] == [1, 1, 1]
