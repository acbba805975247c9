"""The Python API: distill / train with objects the caller already holds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn
from torch.utils.data import TensorDataset

import distillkit
from distillkit.errors import ConfigError
from distillkit.runner import resume
from tests.helpers import cli_env

NETS = """
from torch import nn


class SmallNet(nn.Module):
    def __init__(self, in_channels=1, num_classes=10, width=16):
        super().__init__()
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(in_channels * 64, width), nn.ReLU(), nn.Linear(width, num_classes)
        )

    def forward(self, x):
        return self.classifier(x)
"""


def digits_tensors() -> tuple[TensorDataset, TensorDataset]:
    """The digits splits as float images in [0, 1] and int labels, as a user might hold them."""
    from distillkit.data.datasets import load_dataset

    b = load_dataset("digits")
    train = TensorDataset(b.train.images.float() / 255.0, b.train.labels)
    test = TensorDataset(b.test.images.float() / 255.0, b.test.labels)
    return train, test


@pytest.fixture
def nets(tmp_path, monkeypatch):
    """A module `user_nets_api` importable through sys.path, as a user's own package would be."""
    (tmp_path / "user_nets_api.py").write_text(NETS)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "user_nets_api", raising=False)
    import user_nets_api

    return user_nets_api


def evaluate_fresh(run: Path, *extra: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "distillkit", "evaluate", str(run), "--device", "cpu", *extra],
        cwd=cwd,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )


def test_distill_objects_writes_a_run_directory(nets, tmp_path):
    train, test = digits_tensors()
    torch.manual_seed(0)
    teacher = nets.SmallNet(width=32)
    student = nets.SmallNet(width=8)
    out = tmp_path / "api_kd"
    summary = distillkit.distill(
        student, teacher, train, test, method="kd", epochs=1, out_dir=str(out),
        model_kwargs={"width": 8}, teacher_model_kwargs={"width": 32}, temperature=2.0,
        lr=0.1, quiet=True, device="cpu",
    )  # fmt: skip
    for name in ("config.yaml", "metrics.json", "summary.md", "curves.png"):
        assert (out / name).is_file(), name
    assert (out / "checkpoints" / "best.pt").is_file()
    metrics = json.loads((out / "metrics.json").read_text())
    assert summary["test_acc"] == metrics["test_acc"]
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["options"] == {"temperature": 2.0}  # method option routed to options
    assert config["lr"] == 0.1  # run-level key routed to the config
    assert config["model"].endswith("user_nets_api.py:SmallNet")
    assert config["model_kwargs"] == {"width": 8}
    assert config["dataset"] == "in-memory"

    # a fresh process rebuilds the student from the recorded class; the data must be named
    proc = evaluate_fresh(out, cwd=tmp_path)
    assert proc.returncode == 2 and "--dataset" in proc.stderr, proc.stderr
    proc = evaluate_fresh(out, "--dataset", "digits", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["test_acc"] == pytest.approx(metrics["best_acc"])

    # the teacher module was recorded by class and weights, so the run can be continued
    assert config["teacher_model"] == config["model"]
    assert Path(config["teacher_weights"]) == out / "teacher_weights.pt"
    with pytest.raises(ConfigError, match="dataset="):
        resume(out, {"epochs": 2})
    assert resume(out, {"epochs": 2, "dataset": "digits", "quiet": True})["epochs"] == 2


def test_in_memory_data_with_a_run_teacher(tmp_path):
    teacher = tmp_path / "teacher"
    distillkit.train("mlp", "digits", epochs=1, out_dir=str(teacher), quiet=True, device="cpu")
    train, test = digits_tensors()
    summary = distillkit.distill(
        "mlp", str(teacher), train, test, epochs=1, out_dir=str(tmp_path / "kd"), quiet=True
    )
    assert summary["teacher_queries"] == len(train)  # one epoch: every image asked once


def test_train_accepts_arrays_and_a_dataset_name(tmp_path):
    train, test = digits_tensors()
    arrays = {
        "x_train": train.tensors[0].numpy(),
        "y_train": train.tensors[1].numpy(),
        "x_test": test.tensors[0].numpy(),
        "y_test": test.tensors[1].numpy(),
    }
    summary = distillkit.train(
        "mlp", arrays, epochs=1, out_dir=str(tmp_path / "arrays"), quiet=True, device="cpu"
    )
    assert summary["epochs"] == 1 and (tmp_path / "arrays" / "summary.md").is_file()
    tuples = distillkit.train(
        "mlp",
        (arrays["x_train"], arrays["y_train"]),
        (arrays["x_test"], arrays["y_test"]),
        epochs=1,
        out_dir=str(tmp_path / "tuples"),
        quiet=True,
        device="cpu",
    )
    assert tuples["test_acc"] == summary["test_acc"]  # the same data, model and seed
    named = distillkit.train(
        "mlp", "digits", epochs=1, out_dir=str(tmp_path / "named"), quiet=True, device="cpu"
    )
    assert named["dataset"] == "digits"


def test_class_from_main_is_recorded_as_unavailable(tmp_path):
    class MainNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(64, 10)

        def forward(self, x):
            return self.fc(x.flatten(1))

    MainNet.__module__ = "__main__"  # as if defined in a script or notebook
    MainNet.__qualname__ = "MainNet"
    out = tmp_path / "main_run"
    distillkit.train(MainNet(), "digits", epochs=1, out_dir=str(out), quiet=True, device="cpu")
    assert (out / "checkpoints" / "best.pt").is_file()
    proc = evaluate_fresh(out, cwd=tmp_path)
    assert proc.returncode == 2
    assert "importable file" in proc.stderr and "__main__" in proc.stderr, proc.stderr


def test_unknown_and_misplaced_keywords_are_named(tmp_path):
    train, test = digits_tensors()
    with pytest.raises(ConfigError, match="temprature"):
        distillkit.train("mlp", train, test, out_dir=str(tmp_path / "x"), temprature=2.0)
    with pytest.raises(ConfigError, match="'dataset' is not a keyword option"):
        distillkit.train("mlp", train, test, dataset="digits")
    with pytest.raises(ConfigError, match="'teacher' is not a keyword option"):
        distillkit.train("mlp", train, test, teacher="runs/x")
    with pytest.raises(ConfigError, match="test"):
        distillkit.train("mlp", "digits", test)
    assert not (tmp_path / "x").exists()


def test_import_is_cheap_and_exposes_the_api():
    code = (
        "import sys, distillkit\n"
        "print(sorted(m for m in ('torch', 'numpy', 'yaml') if m in sys.modules))\n"
        "print(all(callable(getattr(distillkit, n)) for n in "
        "('distill', 'train', 'load_config', 'run')), distillkit.__version__)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=cli_env(), timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    loaded, exposed = proc.stdout.splitlines()
    assert loaded == "[]"
    assert exposed.startswith("True ")
