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
    feature_loss,
    stage_of_epoch,
    stage_sizes,
)
from distillkit.models import build_model
from distillkit.models.stagewise import Connector, split_blocks
from distillkit.runner import check_config, resolve_options
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


def _distiller(
    stage_epochs=(1, 1, 1), student: str = "cnn_medium", alpha: float = 0.1, **kwargs
) -> StableKD:
    s, t = _pair(student)
    sizes = stage_sizes([4, 2, 1])
    schedule = build_schedule(sizes, list(stage_epochs), sum(stage_epochs))
    return StableKD(s, t, schedule, SHAPE, temperature=4.0, alpha=alpha, **kwargs)


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


def _checked(data: dict):
    cfg = config_from_dict(data)
    check_config(cfg)
    return cfg


def test_options_are_validated_through_the_config():
    base = {"method": "stablekd", "teacher": "x"}
    cfg = _checked({**base, "options": {"blocks_per_stage": [4, 2, 1]}})
    assert cfg.method == "stablekd"
    with pytest.raises(ConfigError, match="end-to-end"):
        _checked({**base, "options": {"blocks_per_stage": [4, 2]}})
    with pytest.raises(ConfigError, match="stage_epochs has 2 entries"):
        _checked({**base, "options": {"stage_epochs": [1, 1]}})
    with pytest.raises(ConfigError, match="unknown config key 'options.stage_epoch'"):
        _checked({**base, "options": {"stage_epoch": [1, 1, 1]}})
    assert StableKDOptions().blocks_per_stage == [4, 2, 1]
    opts = resolve_options(_checked({**base, "options": {"temperature": 2, "alpha": 0}}))
    assert (opts.temperature, opts.alpha) == (2.0, 0.0)


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
def test_gradients_stay_inside_their_group_on_teacher_inputs(stage, name, owners):
    d = _distiller(block_input="teacher")
    d.on_epoch_start(stage)
    _, losses = d.training_step(_batch())
    d.zero_grad(set_to_none=True)
    losses[name].backward()
    assert _grad_owners(d) == owners


@pytest.mark.parametrize(
    "stage,name,owners",
    [
        (0, "s1_b0_feat", {"block0", "out1"}),
        (0, "s1_b1_feat", {"block1", "out2"}),
        (0, "s1_b2_feat", {"block2", "out3"}),
        (0, "s1_b3_kd", {"block3"}),
        (1, "s2_b0-1_feat", {"block0", "block1", "out2"}),
        (1, "s2_b2-3_kd", {"block2", "block3"}),
        (2, "s3_b0-3_kd", {"block0", "block1", "block2", "block3"}),
    ],
)
def test_gradients_stay_inside_their_group_on_student_inputs(stage, name, owners):
    d = _distiller(block_input="student")
    d.on_epoch_start(stage)
    _, losses = d.training_step(_batch())
    d.zero_grad(set_to_none=True)
    losses[name].backward()
    assert _grad_owners(d) == owners


def test_student_inputs_chain_the_plain_student():
    """On its own features every group sees what it sees in the plain student at test time."""
    d = _distiller(block_input="student")
    x, y, idx = _batch()
    d.eval()  # BN on running statistics: the chained groups must equal one plain forward
    with torch.no_grad():
        plain = d.student(x)
    for stage in range(3):
        d.set_stage(stage)
        with torch.no_grad():
            logits, _ = d.training_step((x, y, idx))
        assert torch.allclose(logits, plain, atol=1e-5), stage
    t = _distiller(block_input="teacher")
    t.eval()
    t.set_stage(0)
    with torch.no_grad():
        logits, _ = t.training_step((x, y, idx))
    assert not torch.allclose(logits, t.student(x), atol=1e-3)


def test_anneal_moves_group_inputs_from_teacher_to_student_features():
    d = _distiller(stage_epochs=(2, 2, 1), block_input="anneal")
    shares = []
    for epoch in range(5):
        d.on_epoch_start(epoch)
        shares.append(d.student_input_share)
    assert shares == [0.0, 0.25, 0.5, 0.75, 1.0]
    d.on_epoch_start(1)  # a quarter of the way: the in-connectors still get gradients
    _, losses = d.training_step(_batch())
    d.zero_grad(set_to_none=True)
    losses["s1_b1_feat"].backward()
    assert _grad_owners(d) == {"in1", "block1", "out2"}
    d.set_stage(0)  # set_stage alone starts the stage at its first epoch
    assert d.student_input_share == 0.0
    assert _distiller(block_input="student").student_input_share == 1.0


def test_inner_feature_losses_in_merged_groups():
    d = _distiller(inner_feat_weight=0.5)
    names = []
    for stage in range(3):
        d.set_stage(stage)
        _, losses = d.training_step(_batch())
        names.append(set(losses))
    assert names[0] == {"s1_b0_feat", "s1_b1_feat", "s1_b2_feat", "s1_b3_kd", "s1_b3_ce"}
    assert names[1] == {
        "s2_b0-1_feat1",
        "s2_b0-1_feat",
        "s2_b2-3_feat3",
        "s2_b2-3_kd",
        "s2_b2-3_ce",
    }
    assert names[2] == {
        "s3_b0-3_feat1",
        "s3_b0-3_feat2",
        "s3_b0-3_feat3",
        "s3_b0-3_kd",
        "s3_b0-3_ce",
    }
    # the inner terms are the weighted feature losses at those boundaries (same weights and BN
    # statistics: fresh distillers in eval mode)
    d, plain = _distiller(inner_feat_weight=0.5), _distiller()
    d.eval()
    plain.eval()
    plain.set_stage(0)
    _, ref = plain.training_step(_batch())
    d.set_stage(2)
    _, got = d.training_step(_batch())
    assert torch.allclose(got["s3_b0-3_feat1"], 0.5 * ref["s1_b0_feat"], atol=1e-6)
    d.zero_grad(set_to_none=True)
    got["s3_b0-3_feat2"].backward()
    assert _grad_owners(d) == {"block0", "block1", "out2"}


def test_feature_loss_is_normalised_per_channel():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(8, 3, 4, 4, generator=g)
    s = torch.randn(8, 3, 4, 4, generator=g)
    scale = torch.tensor([1.0, 3.0, 0.5]).view(1, 3, 1, 1)
    base = feature_loss(s, t)
    # scaling a channel of both sides leaves the normalised loss unchanged, not plain MSE
    assert torch.allclose(feature_loss(s * scale, t * scale), base, rtol=1e-5)
    assert not torch.allclose(feature_loss(s * scale, t * scale, "mse"), feature_loss(s, t, "mse"))
    var = t.var(dim=(0, 2, 3), unbiased=False).view(1, 3, 1, 1)
    assert torch.allclose(base, ((s - t) ** 2 / var).mean(), rtol=1e-5)
    # a channel constant over the batch (a dead ReLU) is bounded, not divided by ~0
    dead = t.clone()
    dead[:, 0] = 0.0
    assert feature_loss(s, dead) < 1e3
    # vectors (N, D) and tokens (N, L, D): the channel is the last dim
    v = torch.randn(16, 5, generator=g)
    assert torch.allclose(feature_loss(v * 3, v * 3 + 3), feature_loss(v, v + 1), rtol=1e-5)
    tok = torch.randn(4, 6, 5, generator=g)
    assert torch.allclose(feature_loss(tok * 2, tok * 2 + 2), feature_loss(tok, tok + 1), rtol=1e-5)
    with pytest.raises(ValueError, match="feature loss"):
        feature_loss(s, t, "l1")


def test_out_connector_always_learns_a_map_at_equal_shapes():
    auto = _distiller(student="cnn_small")  # resnet8 and cnn_small agree at every boundary
    assert all(isinstance(c, torch.nn.Identity) for c in auto.out_connectors.values())
    always = _distiller(student="cnn_small", out_connector="always")
    assert all(isinstance(c, Connector) for c in always.out_connectors.values())
    assert all(isinstance(c, torch.nn.Identity) for c in always.in_connectors.values())


def test_new_options_are_validated():
    base = {"method": "stablekd", "teacher": "x"}
    for key, value in (
        ("block_input", "both"),
        ("feat_loss", "l1"),
        ("out_connector", "never"),
        ("inner_feat_weight", -1.0),
    ):
        with pytest.raises(ConfigError, match=f"options.{key}"):
            _checked({**base, "options": {key: value}})


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


# -- the Fashion-MNIST benchmark's bookkeeping ---------------------------------------------------
def _bench():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "stablekd_fmnist_bench", ROOT / "benchmarks" / "stablekd_fmnist.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_writes_partial_results_as_runs_finish(tmp_path):
    bench = _bench()
    args = bench.parse_args(
        ["--epochs", "6", "--stage-epochs", "1,1,4", "--seeds", "0,1", "--skip-kt", "--jobs", "3"]
    )
    base = {"dataset": "fashion-mnist", "device": args.device}
    methods, runs, notes = bench.build_runs(args, base, tmp_path / "teacher", tmp_path)
    assert [(n, s) for n, s, _, _ in runs][:4] == [
        ("student", 0),
        ("student", 1),
        ("kd", 0),
        ("kd", 1),
    ]
    assert len(runs) == 10 and notes == ["kernel-thinning subsets skipped (--skip-kt)"]
    opts = methods["stablekd"]["options"]
    assert opts["stage_epochs"] == [1, 1, 4]
    curve = {"epochs": [1, 2], "acc": [50.0, 80.0], "seconds": [1.0, 2.0], "final": 80.0}
    results = {"kd": {1: {**curve, "train_samples": 10}}}
    text = bench.report(args, methods, results, 90.0, notes, tmp_path, len(runs))
    assert "partial: 1 of 10 runs finished" in text
    assert (tmp_path / "report.md").read_text() == text + "\n"
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["finished"] == 1 and saved["table"]["kd"]["seeds"] == [1]
    results["stablekd"] = {0: {**curve, "acc": [81.0, 82.0], "final": 82.0, "train_samples": 10}}
    text = bench.report(args, methods, results, 90.0, notes, tmp_path, len(runs))
    assert "| stablekd | 100% | 82.00 +- 0.00 | 1.0 (1/1 seeds) | 1 |" in text
    assert json.loads((tmp_path / "results.json").read_text())["finished"] == 2
    assert not list(tmp_path.glob("*.tmp"))

    only = bench.parse_args(["--only", "kd,stablekd", "--seeds", "0"])
    _, runs, _ = bench.build_runs(only, base, tmp_path / "teacher", tmp_path)
    assert [n for n, _, _, _ in runs] == ["kd", "stablekd"]
    with pytest.raises(SystemExit):
        bench.build_runs(bench.parse_args(["--only", "kdd"]), base, tmp_path, tmp_path)
    with pytest.raises(SystemExit):
        bench.parse_args(["--epochs", "6", "--stage-epochs", "2,2,3"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--stablekd-options", "[1]"])
    # a failing run comes back as text for the parent to report, not as an exception
    bad = bench._run_job({"method": "nope", "out_dir": str(tmp_path / "bad")}, None)
    assert "error" in bad and "nope" in bad["error"]
    assert bench.register_limited(10, 5) == bench.register_limited(10, 5) == bench.LIMITED


def test_idle_connectors_are_left_to_ddp_not_touched_by_zero_losses(tmp_path):
    import torch.distributed as dist

    d = _distiller(student="cnn_small", out_connector="always")
    assert d.ddp_find_unused_parameters  # the trainer's DDP wrapper looks for idle parameters
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        d.on_epoch_start(2)  # end-to-end: no connector takes part
        _, losses = d.training_step(_batch())
        params = list(d.out_connectors.parameters())
        grads = torch.autograd.grad(sum(losses.values()), params, allow_unused=True)
        assert params and all(g is None for g in grads)
    finally:
        dist.destroy_process_group()


def test_teacher_blocks_answer_as_the_teacher_after_the_trainer_folds_its_bn(
    teacher_dir, tmp_path, monkeypatch
):
    """The trainer folds a frozen teacher's BN into its convs; the blocks must follow."""
    from distillkit.runner import run

    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    features = StableKD.teacher_features

    def spy(self, x):
        logits, feats = features(self, x)
        if len(seen) < 2:
            seen.append((x.detach().float().contiguous().clone(), logits.float().clone()))
        return logits, feats

    monkeypatch.setattr(StableKD, "teacher_features", spy)
    cfg = _cfg(teacher_dir, tmp_path / "run", epochs=3, amp="none")
    cfg.options["stage_epochs"] = [1, 1, 1]
    run(cfg)
    teacher, _ = model_from_checkpoint(teacher_dir, which="last")
    teacher.eval()
    assert len(seen) == 2
    for x, logits in seen:
        with torch.no_grad():
            expected = teacher(x)
        assert torch.allclose(logits, expected, atol=1e-4), (logits - expected).abs().max()


def test_benchmark_tables_leave_out_rows_of_an_older_method_revision():
    bench = _bench()
    rows = [
        {"method": "kd", "settings": {"method": "kd", "seed": 0}},
        {"method": "stablekd", "settings": {"method": "stablekd", "seed": 0}},
        {"method": "stablekd", "settings": {"method": "stablekd", "seed": 0, "revision": 2}},
    ]
    assert bench.current_rows(rows) == [rows[0], rows[2]]
    args = bench.parse_args(["--seeds", "0"])
    base = {"dataset": "fashion-mnist", "device": args.device}
    _, runs, _ = bench.build_runs(args, base, Path("teacher.pt"), Path("out"))
    settings = {name: bench.settings_of(args, name, spec, "t.pt") for name, _, spec, _ in runs}
    assert settings["stablekd"]["revision"] == 2 and "revision" not in settings["kd"]
    groups = {bench.shared.group_key(s, bench.PER_RUN) for s in settings.values()}
    assert len(groups) == 1  # one table for all of them
