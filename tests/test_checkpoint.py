"""Checkpoints: atomic writes, clear errors for corrupt/foreign files, CLI behaviour on them."""

from __future__ import annotations

import os
import threading

import pytest
import torch

from distillkit.cli import main
from distillkit.engine.checkpoint import (
    FORMAT,
    VERSION,
    CheckpointError,
    load_checkpoint,
    model_from_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
)
from distillkit.models import build_model


def _state(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "epoch": 3,
        "model": {"w": torch.randn(4, 3, generator=g), "b": torch.zeros(3)},
        "history": [{"epoch": 1, "test_acc": 50.0}],
        "config": {"name": "x", "lr": 0.1},
        "train_indices": None,
    }


def _mlp_state() -> dict:
    torch.manual_seed(0)
    model = build_model("mlp", in_channels=1, num_classes=10, image_size=8, hidden=(8,))
    meta = {"name": "mlp", "kwargs": {"hidden": [8]}, "in_channels": 1, "num_classes": 10}
    meta.update(image_size=8, dataset="digits")
    return {"epoch": 1, "model": model.state_dict(), "model_meta": meta, "config": {}}


# --------------------------------------------------------------------------- save / load


def test_roundtrip(tmp_path):
    path = tmp_path / "ck" / "last.pt"  # parent is created
    state = _state()
    save_checkpoint(state, path)
    loaded = load_checkpoint(path)
    assert loaded["format"] == FORMAT and loaded["version"] == VERSION
    assert loaded["epoch"] == 3
    assert loaded["history"] == state["history"]
    assert loaded["config"] == state["config"]
    assert loaded["train_indices"] is None
    for k, v in state["model"].items():
        assert torch.equal(loaded["model"][k], v)


def test_overwrite_replaces_content(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(_state(0), path)
    save_checkpoint({**_state(1), "epoch": 9}, path)
    assert load_checkpoint(path)["epoch"] == 9


def test_atomic_write_leaves_no_temp_files(tmp_path):
    path = tmp_path / "checkpoints" / "last.pt"
    for i in range(3):
        save_checkpoint(_state(i), path)
    assert sorted(os.listdir(path.parent)) == ["last.pt"]


def test_failed_write_keeps_previous_file_and_no_temp(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(_state(0), path)
    before = path.read_bytes()
    bad = {**_state(1), "unpicklable": threading.Lock()}
    with pytest.raises(Exception):  # noqa: B017 - whatever pickle raises
        save_checkpoint(bad, path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["last.pt"]
    assert load_checkpoint(path)["epoch"] == 3


def test_model_from_checkpoint(tmp_path):
    state = _mlp_state()
    save_checkpoint(state, tmp_path / "best.pt")
    model, loaded = model_from_checkpoint(tmp_path / "best.pt")
    assert not model.training
    for k, v in state["model"].items():
        assert torch.equal(model.state_dict()[k], v)
    assert loaded["model_meta"]["name"] == "mlp"


# --------------------------------------------------------------------------- bad files


def test_random_bytes_raise_checkpoint_error_naming_file(tmp_path):
    path = tmp_path / "garbage.pt"
    path.write_bytes(os.urandom(2048))
    with pytest.raises(CheckpointError, match="corrupt or unreadable") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


def test_empty_file_raises_checkpoint_error(tmp_path):
    path = tmp_path / "empty.pt"
    path.write_bytes(b"")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.1])
def test_truncated_checkpoint_raises_checkpoint_error(tmp_path, keep):
    good = tmp_path / "good.pt"
    save_checkpoint(_mlp_state(), good)
    data = good.read_bytes()
    bad = tmp_path / "truncated.pt"
    bad.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(bad)
    assert str(bad) in str(info.value)


@pytest.mark.parametrize("payload", [{"a": 1}, [1, 2, 3], {"format": "other", "model": {}}])
def test_foreign_torch_file(tmp_path, payload):
    path = tmp_path / "foreign.pt"
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="not a distillkit checkpoint") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


def test_newer_version_refused(tmp_path):
    path = tmp_path / "future.pt"
    torch.save({"format": FORMAT, "version": VERSION + 1}, path)
    with pytest.raises(CheckpointError, match="newer distillkit"):
        load_checkpoint(path)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found") as info:
        load_checkpoint(tmp_path / "nope.pt")
    assert "nope.pt" in str(info.value)


def test_checkpoint_error_is_value_error():
    assert issubclass(CheckpointError, ValueError)


# --------------------------------------------------------------------------- resolve_checkpoint


def test_resolve_checkpoint_run_dir(tmp_path):
    run = tmp_path / "run"
    ck = run / "checkpoints"
    save_checkpoint(_state(), ck / "last.pt")
    # only last.pt: asked for best, falls back to last
    assert resolve_checkpoint(run, "best") == ck / "last.pt"
    save_checkpoint(_state(), ck / "best.pt")
    assert resolve_checkpoint(run, "best") == ck / "best.pt"
    assert resolve_checkpoint(run, "last") == ck / "last.pt"
    assert resolve_checkpoint(run) == ck / "best.pt"
    # a file path is returned as is
    assert resolve_checkpoint(ck / "last.pt", "best") == ck / "last.pt"


def test_resolve_checkpoint_only_best(tmp_path):
    save_checkpoint(_state(), tmp_path / "checkpoints" / "best.pt")
    assert resolve_checkpoint(tmp_path, "last") == tmp_path / "checkpoints" / "best.pt"


def test_resolve_checkpoint_empty_run_dir(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(CheckpointError, match="no checkpoint found in run directory") as info:
        resolve_checkpoint(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_load_checkpoint_from_run_dir(tmp_path):
    save_checkpoint({**_state(), "epoch": 5}, tmp_path / "checkpoints" / "last.pt")
    save_checkpoint({**_state(), "epoch": 4}, tmp_path / "checkpoints" / "best.pt")
    assert load_checkpoint(tmp_path, which="last")["epoch"] == 5
    assert load_checkpoint(tmp_path, which="best")["epoch"] == 4


# --------------------------------------------------------------------------- CLI on bad files


def test_cli_evaluate_corrupt_checkpoint(tmp_path, capsys):
    path = tmp_path / "bad.pt"
    path.write_bytes(os.urandom(4096))
    before = path.read_bytes()
    assert main(["evaluate", str(path), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "distillkit evaluate: error:" in err
    assert str(path) in err and "corrupt" in err
    assert "Traceback" not in err
    assert path.read_bytes() == before


def test_cli_evaluate_corrupt_run_dir(tmp_path, capsys):
    run = tmp_path / "run"
    good = run / "checkpoints" / "last.pt"
    save_checkpoint(_mlp_state(), good)
    data = good.read_bytes()
    bad = run / "checkpoints" / "best.pt"
    bad.write_bytes(data[: len(data) // 2])
    snapshot = {p: p.read_bytes() for p in (good, bad)}
    assert main(["evaluate", str(run), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err
    assert {p: p.read_bytes() for p in (good, bad)} == snapshot
    assert sorted(os.listdir(run / "checkpoints")) == ["best.pt", "last.pt"]


def test_cli_evaluate_foreign_and_missing(tmp_path, capsys):
    foreign = tmp_path / "foreign.pt"
    torch.save({"a": 1}, foreign)
    assert main(["evaluate", str(foreign)]) == 2
    assert "not a distillkit checkpoint" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "missing.pt")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err


def test_cli_train_refuses_existing_run_dir(tmp_path, capsys):
    run = tmp_path / "run"
    ck = run / "checkpoints" / "last.pt"
    save_checkpoint(_mlp_state(), ck)
    before = ck.read_bytes()
    listing = sorted(p.relative_to(run) for p in run.rglob("*"))
    code = main(["train", "model=mlp", "epochs=1", f"out_dir={run}", "--quiet", "--device", "cpu"])
    assert code == 2
    err = capsys.readouterr().err
    assert "already holds a checkpoint" in err and "distillkit resume" in err
    assert str(run) in err
    assert ck.read_bytes() == before
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == listing  # nothing written


def test_cli_distill_refuses_existing_run_dir(tmp_path, capsys):
    run = tmp_path / "run"
    ck = run / "checkpoints" / "last.pt"
    save_checkpoint(_mlp_state(), ck)
    before = ck.read_bytes()
    code = main(["distill", "model=mlp", f"teacher={run}", f"out_dir={run}", "--quiet"])
    assert code == 2
    assert "already holds a checkpoint" in capsys.readouterr().err
    assert ck.read_bytes() == before


def test_cli_resume_corrupt_last_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    bad = run / "checkpoints" / "last.pt"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(os.urandom(1000))
    before = bad.read_bytes()
    assert main(["resume", str(run), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "distillkit resume: error:" in err and str(bad) in err
    assert bad.read_bytes() == before


def test_checkpoint_file_mode_follows_umask(tmp_path):
    old = os.umask(0o022)
    try:
        save_checkpoint(_state(), tmp_path / "last.pt")
    finally:
        os.umask(old)
    assert (tmp_path / "last.pt").stat().st_mode & 0o777 == 0o644


def test_ctrl_c_during_a_checkpoint_write_waits_for_it(tmp_path):
    import signal

    from distillkit.engine.checkpoint import sigint_deferred

    path = tmp_path / "last.pt"
    with pytest.raises(KeyboardInterrupt):
        with sigint_deferred():
            os.kill(os.getpid(), signal.SIGINT)  # arrives mid-"write"
            save_checkpoint(_state(), path)  # still runs to the end
    assert load_checkpoint(path)["epoch"] == 3
    assert os.listdir(tmp_path) == ["last.pt"]
