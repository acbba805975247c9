"""CLI hardening: nothing the user made is deleted, wrong inputs are one-line errors (exit 2),
saved configs reproduce their run from any folder, Ctrl-C tells how to resume, unsafe checkpoints
are refused."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from distillkit import demo
from distillkit.cli import build_parser, main
from distillkit.engine.checkpoint import FORMAT, VERSION, CheckpointError, load_checkpoint
from distillkit.models import build_model
from tests.helpers import cli_env, read_rows, without_timing

TINY = ["model=mlp", "epochs=1", "batch_size=256", "--quiet", "--device", "cpu"]


def _one_line_error(err: str, command: str) -> str:
    """The stderr of a failed command: exactly one line, no traceback."""
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"distillkit {command}: error:"), err
    return lines[0]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """A 1-epoch mlp teacher on digits."""
    out = tmp_path_factory.mktemp("hard") / "teacher"
    assert main(["train", *TINY, f"out_dir={out}"]) == 0
    return out


def _fake_teacher(path: Path, **meta_changes) -> Path:
    """A checkpoint of an mlp whose model_meta claims other training data."""
    from distillkit.engine.checkpoint import save_checkpoint

    model = build_model("mlp", in_channels=1, num_classes=10, image_size=8)
    meta = {"name": "mlp", "kwargs": {}, "in_channels": 1, "num_classes": 10, "image_size": 8}
    meta.update(dataset="digits", classes=[str(i) for i in range(10)])
    meta.update(meta_changes)
    save_checkpoint(
        {"epoch": 1, "model": model.state_dict(), "model_meta": meta, "config": {}}, path
    )
    return path


# --------------------------------------------------------------------------- demo never deletes


@pytest.fixture
def fast_demo(monkeypatch):
    """The demo with an mlp teacher, so each demo run takes about a second."""
    monkeypatch.setattr(demo, "TEACHER", {"model": "mlp", "epochs": 1, "lr": 0.05})


def test_demo_refuses_folder_with_unrelated_file(tmp_path, capsys, fast_demo):
    out = tmp_path / "demo"
    out.mkdir()
    precious = out / "thesis.tex"
    precious.write_text("years of work")
    assert main(["demo", "--out", str(out), "--epochs", "1"]) == 2
    line = _one_line_error(capsys.readouterr().err, "demo")
    assert "thesis.tex" in line
    assert precious.read_text() == "years of work"
    assert sorted(os.listdir(out)) == ["thesis.tex"]


@pytest.mark.slow
def test_demo_can_rerun_over_its_own_output(tmp_path, capsys, fast_demo):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--epochs", "1"]) == 0
    notes = out / "my_notes.txt"  # the user adds a file next to the demo's output
    notes.write_text("keep me")
    assert main(["demo", "--out", str(out), "--epochs", "1"]) == 0
    assert notes.read_text() == "keep me"
    for sub in ("teacher", "student", "kd"):
        assert len(read_rows(out / sub)) == 1  # replaced, not appended to
    assert (out / "summary.md").is_file()


# --------------------------------------------------------------------------- teacher dataset check


def test_teacher_from_other_dataset_is_refused(tmp_path, capsys):
    fake = _fake_teacher(tmp_path / "fmnist_teacher.pt", dataset="fashion-mnist")
    out = tmp_path / "kd"
    assert main(["distill", *TINY, f"teacher={fake}", f"out_dir={out}"]) == 2
    line = _one_line_error(capsys.readouterr().err, "distill")
    assert "fashion-mnist" in line and "digits" in line and "teacher_dataset_check" in line
    assert not (out / "checkpoints").exists()


def test_teacher_with_other_input_size_is_refused(tmp_path, teacher, capsys):
    out = tmp_path / "kd"
    args = ["distill", *TINY, "model=cnn_small", "image_size=16", f"teacher={teacher}"]
    assert main([*args, f"out_dir={out}"]) == 2
    line = _one_line_error(capsys.readouterr().err, "distill")
    assert "8" in line and "16" in line


def test_teacher_dataset_check_can_be_switched_off(tmp_path, capsys):
    fake = _fake_teacher(tmp_path / "fmnist_teacher.pt", dataset="fashion-mnist")
    out = tmp_path / "kd"
    args = ["distill", *TINY, f"teacher={fake}", "teacher_dataset_check=false", f"out_dir={out}"]
    assert main(args) == 0
    assert len(read_rows(out)) == 1


# --------------------------------------------------------------------------- reproducible configs


def test_saved_config_reruns_from_another_folder(tmp_path, monkeypatch):
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    monkeypatch.chdir(first)
    assert main(["train", *TINY, "out_dir=t"]) == 0
    assert main(["distill", *TINY, "teacher=t", "data_dir=data", "out_dir=kd"]) == 0
    saved = yaml.safe_load((first / "kd" / "config.yaml").read_text())
    # absolute, or relative to the run directory: either way not to the working directory
    assert (first / "kd" / saved["data_dir"]).resolve() == (first / "data").resolve()

    monkeypatch.chdir(second)
    assert main(["train", str(first / "kd" / "config.yaml"), "out_dir=again"]) == 0
    assert without_timing(read_rows(second / "again")) == without_timing(read_rows(first / "kd"))


def test_resume_records_epochs_trained_and_overrides(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY, f"out_dir={run}"]) == 0
    assert main(["resume", str(run), "epochs=2", "--quiet"]) == 0
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["epochs"] == len(read_rows(run)) == 2
    from distillkit.config import read_config_history

    history = read_config_history(run / "config.yaml")
    assert any("epochs=2" in h and "resume" in h for h in history), history
    capsys.readouterr()
    # asking for fewer epochs than were trained would make the saved config lie about the run
    assert main(["resume", str(run), "epochs=1", "--quiet"]) == 2
    assert "2" in _one_line_error(capsys.readouterr().err, "resume")
    assert yaml.safe_load((run / "config.yaml").read_text())["epochs"] == len(read_rows(run))


# --------------------------------------------------------------------------- one-line errors


def test_unknown_model_kwarg_is_a_one_line_error(tmp_path, capsys):
    out = tmp_path / "x"
    assert main(["train", *TINY, "model_kwargs.foo=1", f"out_dir={out}"]) == 2
    line = _one_line_error(capsys.readouterr().err, "train")
    assert "foo" in line and "mlp" in line
    assert not (out / "checkpoints").exists()


def _flags(text: str) -> set[str]:
    import re

    return set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", text))


@pytest.mark.parametrize("dataset", ["fashion-mnist", "cifar10", "cifar100", "imagefolder"])
def test_dataset_not_found_suggests_options_that_exist(tmp_path, capsys, dataset):
    missing = tmp_path / "nowhere"
    args = ["train", *TINY, f"dataset={dataset}", f"out_dir={tmp_path / 'x'}"]
    if dataset != "imagefolder":
        args.append(f"data_dir={missing}")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "data_dir=" in err
    (train,) = [a for a in build_parser()._subparsers._group_actions if "train" in a.choices]
    accepted = {s for a in train.choices["train"]._actions for s in a.option_strings}
    assert _flags(err) <= accepted, _flags(err) - accepted


def test_datasets_listing_suggests_options_that_exist(capsys):
    assert main(["datasets"]) == 0
    out = capsys.readouterr().out
    (train,) = [a for a in build_parser()._subparsers._group_actions if "train" in a.choices]
    accepted = {s for a in train.choices["train"]._actions for s in a.option_strings}
    assert _flags(out) <= accepted


def test_plot_unknown_key_lists_keys_present(tmp_path, teacher, capsys):
    png = tmp_path / "x.png"
    assert main(["plot", str(teacher), "--key", "nope", "--out", str(png)]) == 2
    line = _one_line_error(capsys.readouterr().err, "plot")
    assert "'nope'" in line and "test_acc" in line and "loss_ce" in line
    assert not png.exists()


def test_corrupt_checkpoint_is_one_short_line_and_verbose_adds_detail(tmp_path, capsys):
    good = _fake_teacher(tmp_path / "good.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    assert main(["evaluate", str(bad), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    line = _one_line_error(err, "evaluate")
    assert str(bad) in line
    assert len(line.replace(str(bad), "").split()) <= 16, line  # no torch internals
    assert main(["--verbose", "evaluate", str(bad), "--device", "cpu"]) == 2
    verbose = capsys.readouterr().err
    assert "--verbose" in line
    assert str(bad) in verbose.splitlines()[0] and len(verbose.splitlines()) > 1
    assert main(["evaluate", str(bad), "--verbose"]) == 2  # also accepted after the command
    assert capsys.readouterr().err == verbose


# --------------------------------------------------------------------------- unsafe checkpoints


class _CreatesFile:
    """Unpickling this calls open(path, 'w'): arbitrary code at load time."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_checkpoint_with_pickled_object_is_refused(tmp_path):
    planted = tmp_path / "planted.txt"
    path = tmp_path / "evil.pt"
    torch.save({"format": FORMAT, "version": VERSION, "x": _CreatesFile(planted)}, path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert not planted.exists()
    message = str(info.value)
    assert str(path) in message and "\n" not in message


def test_cli_refuses_pickled_object_in_run_dir(tmp_path, capsys):
    planted = tmp_path / "planted.txt"
    ckpt = tmp_path / "run" / "checkpoints" / "last.pt"
    ckpt.parent.mkdir(parents=True)
    torch.save({"format": FORMAT, "version": VERSION, "x": _CreatesFile(planted)}, ckpt)
    assert main(["resume", str(tmp_path / "run"), "--quiet"]) == 2
    assert str(ckpt) in _one_line_error(capsys.readouterr().err, "resume")
    assert not planted.exists()


def test_real_run_checkpoints_load_without_pickle(teacher):
    state = load_checkpoint(teacher / "checkpoints" / "last.pt")
    assert state["epoch"] == 1 and state["rng"]["numpy"][0] == "MT19937"


# --------------------------------------------------------------------------- Ctrl-C


@pytest.mark.slow
def test_ctrl_c_prints_where_to_resume(tmp_path):
    run = tmp_path / "run"
    ckpt = run / "checkpoints" / "last.pt"
    args = ["train", "model=mlp", "epochs=500", "batch_size=64", f"out_dir={run}", "--quiet"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "distillkit", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(),
    )
    try:
        deadline = time.monotonic() + 120
        while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ckpt.exists() and proc.poll() is None
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert str(ckpt) in lines[0] and f"distillkit resume {run}" in lines[0]
    assert load_checkpoint(ckpt)["epoch"] >= 1


# --------------------------------------------------------------------------- misc bad input


@pytest.mark.parametrize(
    "argv, command, needle",
    [
        (["evaluate", "{tmp}/none"], "evaluate", "none"),
        (["plot", "{tmp}/none"], "plot", "none"),
        (["train", "epochs=two"], "train", "epochs"),
        (["train", "model_kwargs=3"], "train", "model_kwargs"),
        (["distill", "model=mlp", "teacher={tmp}/none"], "distill", "none"),
    ],
)
def test_bad_input_is_one_line(tmp_path, capsys, argv, command, needle):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    if command in ("train", "distill"):
        argv.append(f"out_dir={tmp_path / 'out'}")
    assert main(argv) == 2
    line = _one_line_error(capsys.readouterr().err, command)
    assert needle in line
