"""`distillkit profile`: fields, MACs against a hand count, KD-vs-teacher ratios, settings shown."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from distillkit.cli import main
from tests.test_export import make_runs

pytest.importorskip("onnxruntime")

FAST = ["--repeats", "2", "--warmup", "1"]
FIELDS = {
    "parameters",
    "onnx_bytes",
    "macs_per_image",
    "latency_ms_b1",
    "throughput_img_s_b64",
    "test_acc",
}


@pytest.fixture(scope="session")
def runs(tmp_path_factory) -> dict[str, Path]:
    return make_runs(tmp_path_factory)


@pytest.fixture(scope="session")
def kd_profile(runs, tmp_path_factory) -> tuple[dict, str]:
    """Profile of the KD run (and so of its teacher), as JSON and as printed."""
    out = tmp_path_factory.mktemp("profile") / "p.json"
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["profile", str(runs["kd"]), *FAST, "--json", str(out)]) == 0
    return json.loads(out.read_text()), buf.getvalue()


def _checkpoint(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "best.pt", weights_only=False)


def _by_model(result: dict) -> dict[str, dict]:
    return {m["model"]: m for m in result["models"]}


def test_profile_reports_student_and_teacher_fields(kd_profile, runs):
    result, _ = kd_profile
    rows = _by_model(result)
    assert set(rows) == {"mlp", "cnn_small"}
    assert rows["mlp"]["role"] == "student" and rows["cnn_small"]["role"] == "teacher"
    for name, run in (("mlp", runs["kd"]), ("cnn_small", runs["cnn"])):
        row = rows[name]
        assert FIELDS <= set(row)
        state = _checkpoint(run)
        # parameters = trainable tensors of the saved network (BatchNorm running stats excluded)
        from distillkit.models import build_model

        net = build_model(name, in_channels=1, num_classes=10, image_size=8)
        shapes = {k: v.numel() for k, v in state["model"].items()}
        assert row["parameters"] == sum(shapes[k] for k, _ in net.named_parameters())
        assert row["onnx_bytes"] > 4 * row["parameters"]  # float32 weights plus the graph
        assert row["latency_ms_b1"] > 0 and row["throughput_img_s_b64"] > 0
        metrics = json.loads((run / "metrics.json").read_text())
        assert row["test_acc"] == pytest.approx(metrics["best_acc"])


def test_mlp_macs_equal_hand_count_of_linear_layers(kd_profile):
    result, _ = kd_profile
    # digits: 8x8x1 = 64 inputs, mlp hidden layers 512 and 256, 10 classes; one MAC per weight
    expected = 64 * 512 + 512 * 256 + 256 * 10
    assert _by_model(result)["mlp"]["macs_per_image"] == expected


def test_kd_comparison_ratios_and_printed_settings(kd_profile):
    result, printed = kd_profile
    rows = _by_model(result)
    (cmp,) = result["comparisons"]
    teacher, student = rows["cnn_small"], rows["mlp"]
    assert cmp["params_ratio"] == pytest.approx(teacher["parameters"] / student["parameters"])
    assert cmp["speedup_b1"] == pytest.approx(teacher["latency_ms_b1"] / student["latency_ms_b1"])
    assert cmp["acc_delta_points"] == pytest.approx(student["test_acc"] - teacher["test_acc"])
    assert f"{cmp['acc_delta_points']:+.1f} points" in printed
    # the mlp student is bigger than the cnn_small teacher here
    assert f"{student['parameters'] / teacher['parameters']:.1f}x more parameters" in printed
    assert "1 thread," in printed and "median of 2 runs after 1 warm-up" in printed
    assert "MACs = FLOPs / 2" in printed
    assert result["settings"]["threads"] == 1 and result["settings"]["repeats"] == 2


def test_threads_and_evaluated_accuracy_without_metrics(runs, tmp_path, capsys):
    run = tmp_path / "cnn"
    shutil.copytree(runs["cnn"], run)
    (run / "metrics.json").unlink()
    out = tmp_path / "p.json"
    args = ["profile", str(run), *FAST, "--threads", "2", "--runtime", "torch", "--json", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "torch, 2 threads," in printed
    (row,) = json.loads(out.read_text())["models"]
    assert row["test_acc_source"] == "evaluated"
    # the trainer evaluated the same checkpoint on the same split
    best = json.loads((runs["cnn"] / "metrics.json").read_text())["best_acc"]
    assert row["test_acc"] == pytest.approx(best)


def test_json_not_overwritten_without_force(runs, tmp_path, capsys):
    out = tmp_path / "p.json"
    out.write_text("keep me")
    assert main(["profile", str(runs["cnn"]), *FAST, "--json", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--force" in err
    assert out.read_text() == "keep me"


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["{missing}"], "no such run directory"),
        (["{run}", "--repeats", "0"], "--repeats"),
        (["{run}", "--runtime", "tvm"], "unknown runtime"),
    ],
)
def test_bad_input_is_one_line_exit_2(runs, tmp_path, capsys, extra, needle):
    values = {"missing": str(tmp_path / "nope"), "run": str(runs["cnn"])}
    assert main(["profile", *(a.format(**values) for a in extra)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err
