"""End to end through `distillkit.cli.main` on the bundled digits data, tiny models and epochs."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from distillkit.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
SUMMARY_KEYS = {"test_acc", "best_acc", "wall_time_s", "images_per_sec", "teacher_queries"}
TIMING = {"epoch_time", "images_per_sec"}


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def _untimed(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


@pytest.fixture(scope="module")
def n_train() -> int:
    from distillkit.data.datasets import load_dataset

    return len(load_dataset("digits").train)


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory) -> Path:
    """A 2-epoch mlp teacher trained from the shipped teacher config."""
    out = tmp_path_factory.mktemp("cli") / "teacher"
    code = main(
        [
            "train",
            str(ROOT / "configs" / "digits_teacher.yaml"),
            "model=mlp",
            "epochs=2",
            "batch_size=128",
            "optimizer=adamw",
            "lr=0.01",
            f"out_dir={out}",
            "--quiet",
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    return out


@pytest.fixture(scope="module")
def kd_run(tmp_path_factory, teacher_run) -> Path:
    out = tmp_path_factory.mktemp("cli") / "kd"
    code = main(
        ["distill", "model=mlp", "epochs=2", f"teacher={teacher_run}", f"out_dir={out}", "--quiet"]
    )
    assert code == 0
    return out


# --------------------------------------------------------------------------- train / distill


def test_train_writes_run_directory(teacher_run, n_train):
    assert (teacher_run / "config.yaml").is_file()
    cfg = yaml.safe_load((teacher_run / "config.yaml").read_text())
    assert cfg["model"] == "mlp" and cfg["epochs"] == 2 and cfg["method"] == "ce"
    assert cfg["name"] == "digits_teacher"  # from the YAML file
    assert cfg["optimizer"] == "adamw" and cfg["lr"] == 0.01

    rows = _rows(teacher_run)
    assert len(rows) == 2
    assert [r["epoch"] for r in rows] == [1, 2]
    for r in rows:
        assert 0.0 <= r["test_acc"] <= 100.0
        assert "loss_ce" in r and np.isfinite(r["loss_ce"])

    summary = _summary(teacher_run)
    assert SUMMARY_KEYS <= set(summary)
    assert summary["test_acc"] == rows[-1]["test_acc"]
    assert summary["best_acc"] == max(r["test_acc"] for r in rows)
    assert rows[summary["best_epoch"] - 1]["test_acc"] == summary["best_acc"]
    assert summary["teacher_queries"] == 0
    assert summary["wall_time_s"] > 0 and summary["images_per_sec"] > 0
    assert summary["epochs"] == 2
    assert summary["train_samples"] == n_train

    assert (teacher_run / "checkpoints" / "last.pt").is_file()
    assert (teacher_run / "checkpoints" / "best.pt").is_file()
    assert not (teacher_run / "subset_indices.npy").exists()


def test_teacher_learns_something(teacher_run):
    assert _summary(teacher_run)["best_acc"] > 50.0  # chance is 10%; about 79% at seed 0


def test_distill_kd_counts_teacher_queries(kd_run, teacher_run, n_train):
    summary = _summary(kd_run)
    assert summary["method"] == "kd"
    assert summary["teacher_queries"] == 2 * n_train
    rows = _rows(kd_run)
    assert len(rows) == 2
    assert [r["teacher_queries"] for r in rows] == [n_train, 2 * n_train]
    assert {"loss_ce", "loss_kd"} <= set(rows[0])
    cfg = yaml.safe_load((kd_run / "config.yaml").read_text())
    assert cfg["teacher"] == str(teacher_run)
    assert (kd_run / "checkpoints" / "best.pt").is_file()


def test_distill_fitnet(tmp_path, teacher_run, n_train):
    out = tmp_path / "fitnet"
    code = main(
        [
            "distill",
            "method=fitnet",
            "model=mlp",
            "epochs=1",
            "options.hint_weight=1.0",
            f"teacher={teacher_run}",
            f"out_dir={out}",
            "--quiet",
        ]
    )
    assert code == 0
    rows = _rows(out)
    assert len(rows) == 1
    assert {"loss_ce", "loss_hint"} <= set(rows[0])
    assert np.isfinite(rows[0]["loss_hint"]) and rows[0]["loss_hint"] > 0
    summary = _summary(out)
    assert summary["method"] == "fitnet"
    assert summary["teacher_queries"] == n_train


def test_distill_rejects_ce(tmp_path, teacher_run, capsys):
    out = tmp_path / "ce"
    assert main(["distill", "method=ce", f"teacher={teacher_run}", f"out_dir={out}"]) == 2
    assert "distillation method" in capsys.readouterr().err
    assert not out.exists()


# --------------------------------------------------------------------------- evaluate / resume


def test_evaluate_run_dir_uses_best_checkpoint(tmp_path, teacher_run, capsys):
    import torch

    from distillkit.engine.checkpoint import load_checkpoint, save_checkpoint

    run = tmp_path / "run"
    shutil.copytree(teacher_run, run)
    # make last.pt clearly different from best.pt, whichever epoch was best
    last = load_checkpoint(run / "checkpoints" / "last.pt")
    last["model"] = {k: torch.zeros_like(v) for k, v in last["model"].items()}
    last["epoch"] = 99
    save_checkpoint(last, run / "checkpoints" / "last.pt")
    capsys.readouterr()
    assert main(["evaluate", str(run), "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out)
    summary = _summary(run)
    best_row = _rows(run)[summary["best_epoch"] - 1]
    assert result["checkpoint"] == str(run / "checkpoints" / "best.pt")
    assert result["epoch"] == summary["best_epoch"]
    assert result["test_acc"] == pytest.approx(best_row["test_acc"], abs=1e-9)
    assert result["test_loss"] == pytest.approx(best_row["test_loss"], rel=1e-5)
    assert result["model"] == "mlp" and result["dataset"] == "digits"


def test_evaluate_checkpoint_file(teacher_run, capsys):
    capsys.readouterr()
    last = teacher_run / "checkpoints" / "last.pt"
    assert main(["evaluate", str(last), "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["checkpoint"] == str(last)
    assert result["epoch"] == 2
    assert result["test_acc"] == pytest.approx(_rows(teacher_run)[-1]["test_acc"], abs=1e-9)


def test_resume_to_more_epochs(tmp_path, teacher_run, capsys):
    run = tmp_path / "resumed"
    shutil.copytree(teacher_run, run)
    before = _rows(run)
    capsys.readouterr()
    assert main(["resume", str(run), "epochs=3", "--quiet"]) == 0
    printed = json.loads(capsys.readouterr().out)
    rows = _rows(run)
    assert len(rows) == 3
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert _untimed(rows[:2]) == _untimed(before)
    summary = _summary(run)
    assert summary["epochs"] == 3 and printed["epochs"] == 3
    assert summary["best_acc"] == max(r["test_acc"] for r in rows)
    assert yaml.safe_load((run / "config.yaml").read_text())["epochs"] == 3
    # the original run is untouched
    assert len(_rows(teacher_run)) == 2


def test_resume_missing_run_dir(tmp_path, capsys):
    assert main(["resume", str(tmp_path / "nothing")]) == 2
    assert "distillkit resume: error:" in capsys.readouterr().err


# --------------------------------------------------------------------------- subset


def test_random_subset_half(tmp_path, n_train):
    out = tmp_path / "half"
    code = main(
        [
            "train",
            "model=mlp",
            "--quiet",  # flags may sit between overrides
            "epochs=1",
            "subset.method=random",
            "subset.fraction=0.5",
            f"out_dir={out}",
        ]
    )
    assert code == 0
    summary = _summary(out)
    assert abs(summary["train_samples"] - n_train / 2) <= 10
    idx = np.load(out / "subset_indices.npy")
    assert len(idx) == summary["train_samples"]
    assert len(np.unique(idx)) == len(idx)
    assert idx.min() >= 0 and idx.max() < n_train
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["subset"]["method"] == "random" and cfg["subset"]["fraction"] == 0.5


# --------------------------------------------------------------------------- listings and plot


def test_models_lists_names(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name in ("mlp", "cnn_small", "resnet20"):
        assert name in out


def test_datasets_lists_names(capsys):
    assert main(["datasets"]) == 0
    out = capsys.readouterr().out
    for name in ("digits", "fashion-mnist", "cifar10", "cifar100", "imagefolder"):
        assert name in out


def test_methods_lists_names(capsys):
    assert main(["methods"]) == 0
    lines = capsys.readouterr().out.splitlines()
    names = {line.split()[0] for line in lines if line.strip()}
    assert {"ce", "kd", "fitnet"} <= names


def test_plot_writes_png(tmp_path, teacher_run, kd_run, capsys):
    png = tmp_path / "plots" / "curves.png"
    assert main(["plot", str(teacher_run), str(kd_run), "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(png) in capsys.readouterr().out


def test_plot_missing_metrics(tmp_path, capsys):
    assert main(["plot", str(tmp_path), "--out", str(tmp_path / "x.png")]) == 2
    assert "metrics.jsonl" in capsys.readouterr().err


# --------------------------------------------------------------------------- help and errors


def _subcommands() -> list[str]:
    parser = build_parser()
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return sorted(action.choices)


def test_expected_subcommands_exist():
    expected = {"train", "distill", "resume", "evaluate", "models", "datasets", "demo", "plot"}
    assert expected | {"methods"} <= set(_subcommands())


@pytest.mark.parametrize("command", _subcommands())
def test_subcommand_help(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    assert f"usage: distillkit {command}" in capsys.readouterr().out


def test_top_level_help(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "train" in out and "distill" in out and "examples:" in out


def test_no_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2


@pytest.mark.parametrize(
    "override,needle",
    [
        ("epoch=2", "unknown config key 'epoch' (did you mean 'epochs'?)"),
        ("model=resnet_nope", "unknown model 'resnet_nope'"),
        ("dataset=imagenet42", "unknown dataset 'imagenet42'"),
        ("lr=fast", "config key 'lr'"),
    ],
)
def test_config_errors_exit_2(tmp_path, capsys, override, needle):
    out = tmp_path / "never"
    assert main(["train", override, f"out_dir={out}", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("distillkit train: error:")
    assert needle in err
    assert "Traceback" not in err
    assert not out.exists()


def test_missing_config_file_exits_2(tmp_path, capsys):
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_python_m_distillkit_help():
    proc = subprocess.run(
        [sys.executable, "-m", "distillkit", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    assert "usage: distillkit" in proc.stdout and "train" in proc.stdout


def test_python_m_distillkit_error_exit_code(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "distillkit", "train", "epoch=1", f"out_dir={tmp_path / 'x'}"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert proc.returncode == 2
    assert "unknown config key 'epoch'" in proc.stderr


# --------------------------------------------------------------------------- layout and errors

CORE = ["train", "distill", "resume", "evaluate", "models", "datasets", "demo", "plot", "methods"]


def _command_modules() -> list[str]:
    import pkgutil

    import distillkit.commands as pkg

    return sorted(i.name for i in pkgutil.iter_modules(pkg.__path__) if i.name != "common")


def test_each_subcommand_is_one_commands_module():
    # every subcommand, core ones included, comes from commands/<name>.py registering exactly it
    modules = _command_modules()
    assert {c.replace("-", "_") for c in _subcommands()} == set(modules)
    for name in modules:
        import importlib

        parser = argparse.ArgumentParser()
        sub = parser.add_subparsers()
        importlib.import_module(f"distillkit.commands.{name}").register(sub)
        assert list(sub.choices) == [name.replace("_", "-")], name


def test_core_subcommands_keep_their_help_order():
    listed = _subcommands_in_order()
    assert listed[: len(CORE)] == CORE
    assert listed[len(CORE) :] == sorted(listed[len(CORE) :])


def _subcommands_in_order() -> list[str]:
    parser = build_parser()
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return list(action.choices)


def test_cli_module_defines_no_subcommand():
    import ast

    tree = ast.parse((ROOT / "src" / "distillkit" / "cli.py").read_text())
    defined = [n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)]
    assert not [n for n in defined if n.startswith("cmd_")], defined
    calls = [
        n.func.attr
        for n in ast.walk(tree)
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
    ]
    assert "add_parser" not in calls


def test_config_error_lives_in_errors_and_config_still_exports_it():
    import distillkit.config
    import distillkit.errors

    assert distillkit.config.ConfigError is distillkit.errors.ConfigError
    assert issubclass(distillkit.errors.UsageError, ValueError)


def test_usage_error_from_a_command_is_one_line_exit_2(tmp_path, capsys):
    # `distill` with method ce is a usage problem of the command itself (`train` runs ce)
    from distillkit.errors import UsageError

    argv = ["distill", "method=ce", f"out_dir={tmp_path / 'run'}"]
    args = build_parser().parse_args(argv)
    with pytest.raises(UsageError):
        args.func(args)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("distillkit distill: error: `distillkit distill` needs")
    assert err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_help_does_not_import_torch():
    # the error mapping must not import heavy modules before any command ran
    code = (
        "import sys\nfrom distillkit.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print('torch' in sys.modules)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "False"


@pytest.fixture
def refusing_teacher():
    """A stub teacher server answering every request with one HTTP status."""
    import http.server
    import threading

    status = {"code": 401}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({"detail": "refused", "remaining": 0}).encode()
            self.send_response(status["code"])
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_POST = do_GET

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", status
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(
    "code,needle",
    [(401, "refused the API key"), (402, "budget exhausted"), (404, "said HTTP 404")],
)
def test_remote_teacher_refusal_is_one_line_exit_1(
    tmp_path, capsys, monkeypatch, refusing_teacher, code, needle
):
    url, status = refusing_teacher
    status["code"] = code
    monkeypatch.setenv("DISTILLKIT_API_KEY", "dk-test-secretsecret")
    argv = ["distill", "method=blackbox_kd", f"options.teacher_url={url}", "model=mlp"]
    assert main([*argv, "epochs=1", f"out_dir={tmp_path / 'run'}", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.startswith("distillkit distill: error:") and err.count("\n") == 1, err
    assert needle in err and "secretsecret" not in err


@pytest.mark.parametrize(
    "text,needle", [("a: [1\n", "not valid YAML"), ("5\n", "must hold a mapping")]
)
def test_distill_with_unusable_config_file_is_one_line(tmp_path, capsys, text, needle):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    assert main(["distill", str(cfg), f"out_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    # (the YAML parser's own message, quoted by the config loader, may add lines below)
    assert err.startswith("distillkit distill: error: config file") and "Traceback" not in err
    assert needle in err.splitlines()[0]
    assert not (tmp_path / "run").exists()
