"""Open at both ends: the user's own model, data and teacher go in, a deployable student comes out.

One teacher run (cnn_small, digits) is made once for the module; every other run is a short
digits run. Commands that must work without the user's code already loaded run in fresh
processes from another working directory.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from distillkit.cli import main
from tests.helpers import cli_env

# torch.jit warns that TorchScript is deprecated; the format is still what users hand over
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")

QUIET = ["--quiet", "--device", "cpu"]

MYMODEL = """
import torch
from torch import nn


class MyNet(nn.Module):
    def __init__(self, in_channels, num_classes, width=32):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(4 * width, num_classes)
        self.hook_layers = ["features"]

    def forward(self, x):
        return self.classifier(self.features(x))
"""

# the zoo's cnn_small behind an import path: a "user's" teacher class that the run teacher's
# weights fit exactly
TEACHER_FACTORY = """
from distillkit.models import build_model


def make_teacher(in_channels, num_classes):
    return build_model("cnn_small", in_channels=in_channels, num_classes=num_classes)
"""


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory) -> Path:
    """A 1-epoch cnn_small digits teacher, shared by every test of this module."""
    out = tmp_path_factory.mktemp("teacher") / "cnn"
    assert main(["train", "model=cnn_small", "epochs=1", "lr=0.1", f"out_dir={out}", *QUIET]) == 0
    return out


def fresh(args: list[str], cwd: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    """`python ARGS` in a new process started in `cwd` (the user's files not loaded)."""
    proc = subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        env=cli_env(MPLBACKEND="Agg"),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"{args} exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    return proc


def digits_arrays() -> dict[str, np.ndarray]:
    """The digits splits as the uint8 arrays an npz file holds."""
    from distillkit.data.datasets import load_dataset

    b = load_dataset("digits")
    return {
        "x_train": b.train.images.numpy(),
        "y_train": b.train.labels.numpy(),
        "x_test": b.test.images.numpy(),
        "y_test": b.test.labels.numpy(),
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ask_server(port: int, path: str, key: str | None = None, body: bytes | None = None):
    """(status, JSON) of one request to the local teacher server."""
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body, headers=headers)
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.status, json.loads(r.read())


def serve_and_predict(run: Path, tmp_path: Path, capsys) -> np.ndarray:
    """Serve `run` as a black-box teacher and ask it about two digits; returns the answers."""
    keys = tmp_path / "keys.json"
    capsys.readouterr()
    assert main(["teacher-keys", "add", "tester", "--budget", "10", "--keys", str(keys)]) == 0
    key = capsys.readouterr().out.strip().splitlines()[-1]
    port = free_port()
    log = tmp_path / "server.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "distillkit", "serve-teacher", str(run), "--keys", str(keys)]
            + ["--state", str(tmp_path / "state.db"), "--host", "127.0.0.1", "--port", str(port)],
            cwd=tmp_path,
            env=cli_env(),
            stdout=fh,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                if ask_server(port, "/healthz")[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "no /healthz answer: " + log.read_text()[-2000:]
            time.sleep(0.3)
        pixels = digits_arrays()["x_test"][:2].astype(np.float32) / 255.0
        status, out = ask_server(
            port, "/v1/predict", key, json.dumps({"images": pixels.tolist()}).encode()
        )
        assert status == 200
        return np.asarray(out["probs"])
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def check_run_report(run: Path) -> dict:
    """summary.md names the run's final numbers; curves.png is a PNG; returns metrics.json."""
    metrics = json.loads((run / "metrics.json").read_text())
    summary = (run / "summary.md").read_text()
    for value in (metrics["method"], metrics["dataset"], f"{metrics['test_acc']:.2f}"):
        assert str(value) in summary, (value, summary)
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return metrics


# -- a: the user's model class, from distillation to deployment -----------------------------------
def test_own_model_class_from_distill_to_deploy(teacher_run, tmp_path, monkeypatch, capsys):
    code = tmp_path / "code"
    code.mkdir()
    (code / "mymodel.py").write_text(MYMODEL)
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "runs" / "mine"
    args = ["model=code/mymodel.py:MyNet", "model_kwargs.width=8", f"teacher={teacher_run}"]
    assert main(["distill", *args, "epochs=1", "out_dir=runs/mine", *QUIET]) == 0
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"] == f"{code / 'mymodel.py'}:MyNet"
    metrics = check_run_report(run)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = fresh(["-m", "distillkit", "evaluate", str(run), "--device", "cpu"], elsewhere)
    evaluated = json.loads(proc.stdout)
    assert evaluated["test_acc"] == pytest.approx(metrics["best_acc"])

    # resume, export to both formats, profile, and use the run as a teacher, in one fresh process
    script = (
        "import sys\nfrom distillkit.cli import main\n"
        f"run = {str(run)!r}\n"
        'for argv in (["resume", run, "epochs=2", "--quiet"],\n'
        '             ["export", run, "--format", "onnx", "--out", "my.onnx"],\n'
        '             ["export", run, "--format", "torchscript", "--out", "my.ts"],\n'
        '             ["profile", run, "--repeats", "2", "--warmup", "1"],\n'
        '             ["distill", "model=mlp", "teacher=" + run, "epochs=1",\n'
        '              "out_dir=from_mine", "--quiet"]):\n'
        "    rc = main(argv)\n"
        "    print('EXIT', argv[0], rc, flush=True)\n"
        "    assert rc == 0, argv\n"
    )
    out = fresh(["-c", script], elsewhere).stdout
    assert json.loads((run / "metrics.json").read_text())["epochs"] == 2
    diffs = [float(d) for d in re.findall(r"max \|logit diff\| (\S+) \(limit", out)]
    assert len(diffs) == 2 and max(diffs) <= 1e-4, out
    assert (elsewhere / "my.onnx").is_file() and (elsewhere / "my.ts").is_file()
    assert "MACs" in out and "mymodel" in out  # the profile table names the model spec
    check_run_report(elsewhere / "from_mine")

    probs = serve_and_predict(run, tmp_path, capsys)
    assert probs.shape == (2, 10)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)


# -- b: the user's data ---------------------------------------------------------------------------
def test_train_on_an_npz_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    np.savez("mydata.npz", **digits_arrays())
    args = ["dataset=npz", "data_dir=mydata.npz", "model=mlp", "epochs=1", "out_dir=runs/npz"]
    assert main(["train", *args, *QUIET]) == 0
    saved = yaml.safe_load((tmp_path / "runs/npz/config.yaml").read_text())
    assert saved["data_dir"] == str(tmp_path / "mydata.npz")
    check_run_report(tmp_path / "runs/npz")


def test_imagefolder_without_test_split_carves_and_records_it(tmp_path, monkeypatch):
    from PIL import Image

    from distillkit.runner import evaluate_checkpoint

    rng = np.random.default_rng(0)
    for c in range(3):
        folder = tmp_path / "pics" / "train" / f"class{c}"
        folder.mkdir(parents=True)
        for i in range(6):
            img = (rng.random((8, 8)) * 60 + 60 * c).astype(np.uint8)
            Image.fromarray(img, mode="L").save(folder / f"{i}.png")
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "runs" / "pics"
    args = ["dataset=imagefolder", "data_dir=pics", "dataset_kwargs.val_fraction=0.5"]
    args += ["dataset_kwargs.seed=3", "model=mlp", "epochs=1", "batch_size=4", "out_dir=runs/pics"]
    assert main(["train", *args, *QUIET]) == 0
    split = json.loads((run / "split.json").read_text())
    assert split["seed"] == 3 and split["val_fraction"] == 0.5
    assert len(split["val_files"]) == 9  # 3 of 6 per class
    check_run_report(run)
    # evaluating reloads the same carved split (not the default 10%)
    monkeypatch.chdir(tmp_path / "runs")
    assert evaluate_checkpoint(run, device="cpu")["test_images"] == 9


# -- c: teachers trained elsewhere distil like the same teacher given as a run -------------------
@pytest.fixture(scope="module")
def teacher_files(teacher_run, tmp_path_factory) -> dict[str, list[str]]:
    """The run teacher as a class + state_dict, a TorchScript trace and a distillkit ONNX export."""
    from distillkit.engine.checkpoint import model_from_checkpoint

    root = tmp_path_factory.mktemp("teacher_files")
    net, state = model_from_checkpoint(teacher_run, which="best")
    torch.save(state["model"], root / "teacher_state.pt")
    (root / "teachers.py").write_text(TEACHER_FACTORY)
    scripted = torch.jit.trace(net, torch.zeros(2, 1, 8, 8))
    torch.jit.save(scripted, str(root / "teacher.ts"))
    onnx_file = root / "teacher.onnx"
    assert main(["export", str(teacher_run), "--format", "onnx", "--out", str(onnx_file)]) == 0
    return {
        "run": [f"teacher={teacher_run}"],
        "state_dict": [
            f"teacher_model={root / 'teachers.py'}:make_teacher",
            f"teacher_weights={root / 'teacher_state.pt'}",
        ],
        "torchscript": [f"teacher={root / 'teacher.ts'}"],
        "onnx": [f"teacher={onnx_file}"],
    }


STUDENT = ["model=mlp", "epochs=3", "augment=false", "seed=1", *QUIET]
_STUDENTS: dict[str, dict] = {}


def distil_with(kind: str, files: dict[str, list[str]], root: Path) -> dict:
    """Final metrics of the mlp student distilled from the teacher given as `kind`."""
    if kind not in _STUDENTS:
        out = root / f"student_{kind}"
        assert main(["distill", *files[kind], *STUDENT, f"out_dir={out}"]) == 0
        _STUDENTS[kind] = json.loads((out / "metrics.json").read_text())
    return _STUDENTS[kind]


@pytest.mark.parametrize("kind", ["state_dict", "torchscript", "onnx"])
def test_external_teacher_distils_like_the_run_teacher(kind, teacher_files, tmp_path_factory):
    root = tmp_path_factory.getbasetemp() / "students"
    root.mkdir(exist_ok=True)
    reference = distil_with("run", teacher_files, root)
    got = distil_with(kind, teacher_files, root)
    assert abs(got["test_acc"] - reference["test_acc"]) <= 1.0, (kind, got, reference)
    if kind == "state_dict":  # the same module with the same weights: the same run exactly
        assert got["test_acc"] == reference["test_acc"]
    config = yaml.safe_load((root / f"student_{kind}" / "config.yaml").read_text())
    if kind == "state_dict":
        assert Path(config["teacher_weights"]).is_absolute()


def test_teacher_keys_need_each_other(tmp_path):
    from distillkit.config import load_config
    from distillkit.errors import ConfigError
    from distillkit.runner import check_config

    cfg = load_config(None, ["method=kd", f"teacher_weights={tmp_path / 'w.pt'}"])
    with pytest.raises(ConfigError, match="teacher_weights' needs teacher_model"):
        check_config(cfg)
    cfg = load_config(None, ["method=kd", "teacher=runs/x", "teacher_input=pixels"])
    with pytest.raises(ConfigError, match="teacher_input"):
        check_config(cfg)
    with pytest.raises(ConfigError, match="teacher_kind"):
        load_config(None, ["teacher_kind=grey-box"])


def test_black_box_methods_keep_a_hard_teachers_kind():
    from types import SimpleNamespace

    from distillkit.methods.blackbox import BlackBoxOptions, make_teacher
    from distillkit.teachers import OpaqueBlackBoxTeacher

    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    hard = OpaqueBlackBoxTeacher(net, "hard", None, "logits", 10, "labels-only")
    bb = make_teacher(SimpleNamespace(), BlackBoxOptions(response="soft"), hard, None)
    assert bb.kind == "hard"  # asking for probabilities must not turn labels into "soft"


def test_run_teacher_as_black_box_keeps_its_budget_across_resume(teacher_run, tmp_path):
    from distillkit.runner import resume
    from distillkit.teachers import BudgetExceededError

    out = tmp_path / "soft"
    train_size = len(digits_arrays()["y_train"])
    args = [f"teacher={teacher_run}", "teacher_kind=soft", f"teacher_budget={2 * train_size}"]
    assert main(["distill", "model=mlp", *args, "epochs=2", f"out_dir={out}", *QUIET]) == 0
    assert json.loads((out / "metrics.json").read_text())["teacher_queries"] == 2 * train_size
    # the budget is spent: a third epoch must not get a fresh one
    with pytest.raises(BudgetExceededError):
        resume(out, {"epochs": 3})


def test_a_failed_plot_costs_one_line_not_the_run(tmp_path, monkeypatch, capsys):
    import distillkit.report.run_report as run_report

    def broken(*args, **kwargs):
        raise RuntimeError("no display\nsecond line")

    monkeypatch.setattr(run_report, "plot_run_curves", broken)
    out = tmp_path / "noplot"
    assert main(["train", "model=mlp", "epochs=1", f"out_dir={out}", *QUIET]) == 0
    assert (out / "metrics.json").is_file() and (out / "checkpoints" / "last.pt").is_file()
    err = [line for line in capsys.readouterr().err.splitlines() if "summary.md" in line]
    assert len(err) == 1 and "RuntimeError: no display" in err[0], err
