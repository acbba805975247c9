"""Profile trained runs for deployment: size, compute, CPU speed and accuracy, teacher vs student."""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distillkit.engine.checkpoint import CheckpointError, resolve_checkpoint
from distillkit.files import write_text_atomically
from distillkit.models import count_parameters

from .export import (
    DeployError,
    LoadedModel,
    Predictor,
    format_size,
    load_model,
    onnx_predictor,
    require_onnx,
    write_model,
)

RUNTIMES = ("onnxruntime", "torch")
LATENCY_BATCH = 1
THROUGHPUT_BATCH = 64
MACS_NOTE = "MACs = FLOPs / 2, FLOPs counted by torch.utils.flop_counter.FlopCounterMode"


@dataclass
class ProfileSettings:
    """How to time the models: CPU threads, timed repeats after warm-up, runtime, checkpoint."""

    threads: int = 1
    repeats: int = 30
    warmup: int = 5
    runtime: str = "onnxruntime"  # onnxruntime | torch
    which: str = "best"  # checkpoint of the runs named on the command line
    data_dir: str | None = None

    def validate(self) -> None:
        """Raise DeployError for a setting that cannot be used."""
        if self.threads < 1:
            raise DeployError(f"--threads must be >= 1, got {self.threads}")
        if self.repeats < 1:
            raise DeployError(f"--repeats must be >= 1, got {self.repeats}")
        if self.warmup < 0:
            raise DeployError(f"--warmup must be >= 0, got {self.warmup}")
        if self.runtime not in RUNTIMES:
            raise DeployError(
                f"unknown runtime {self.runtime!r}; choose from {', '.join(RUNTIMES)}"
            )


def count_macs(network: nn.Module, input_shape: Sequence[int]) -> int:
    """Multiply-accumulates of one forward pass on an input of `input_shape` (FLOPs / 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        network(torch.zeros(tuple(input_shape)))
    return int(counter.get_total_flops()) // 2


def median_seconds(fn: Predictor, x: torch.Tensor, repeats: int, warmup: int) -> float:
    """Median wall time of fn(x) over `repeats` calls after `warmup` untimed calls."""
    for _ in range(warmup):
        fn(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def checkpoint_accuracy(model: LoadedModel, data_dir: str | None = None) -> tuple[float, str]:
    """Test accuracy of the checkpoint: from its run's metrics.json when it matches, else evaluated."""
    ckpt = model.checkpoint
    metrics_path = ckpt.parent.parent / "metrics.json"
    if ckpt.parent.name == "checkpoints" and metrics_path.is_file():
        try:
            metrics = json.loads(metrics_path.read_text())
        except (OSError, ValueError):
            metrics = {}
        # metrics.json describes the finished run: use it only for the epoch this checkpoint holds
        if metrics.get("best_epoch") == model.epoch and metrics.get("best_acc") is not None:
            return float(metrics["best_acc"]), "metrics.json"
        if metrics.get("epochs") == model.epoch and metrics.get("test_acc") is not None:
            return float(metrics["test_acc"]), "metrics.json"
    from distillkit.runner import evaluate_checkpoint

    result = evaluate_checkpoint(ckpt, data_dir=data_dir, device="cpu")
    return float(result["test_acc"]), "evaluated"


def _torch_predictor(model: LoadedModel) -> Predictor:
    net = model.deployable()

    def predict(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return net(x)

    return predict


def profile_model(model: LoadedModel, settings: ProfileSettings) -> dict[str, Any]:
    """Parameters, ONNX size, MACs per image, CPU latency/throughput and test accuracy of a model."""
    gen = torch.Generator().manual_seed(0)
    x1 = torch.rand(model.input_shape(LATENCY_BATCH), generator=gen)
    x64 = torch.rand(model.input_shape(THROUGHPUT_BATCH), generator=gen)
    threads_before = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="distillkit-profile-") as tmp:
        path = Path(tmp) / "model.onnx"
        exporter = write_model(model, "onnx", path)
        size = path.stat().st_size
        if settings.runtime == "onnxruntime":
            fn = onnx_predictor(path, settings.threads)
        else:
            torch.set_num_threads(settings.threads)
            fn = _torch_predictor(model)
        try:
            latency = median_seconds(fn, x1, settings.repeats, settings.warmup)
            batch_time = median_seconds(fn, x64, settings.repeats, settings.warmup)
        finally:
            torch.set_num_threads(threads_before)
        del fn  # release the onnxruntime session before its file goes
    acc, source = checkpoint_accuracy(model, settings.data_dir)
    return {
        "model": model.meta["name"],
        "dataset": model.meta.get("dataset"),
        "checkpoint": str(model.checkpoint),
        "epoch": model.epoch,
        "parameters": count_parameters(model.network),
        "onnx_bytes": size,
        "onnx_exporter": exporter.split(" ")[0],
        "macs_per_image": count_macs(model.network, model.input_shape(1)),
        "latency_ms_b1": 1000.0 * latency,
        "throughput_img_s_b64": THROUGHPUT_BATCH / batch_time,
        "test_acc": acc,
        "test_acc_source": source,
    }


def _times(ratio: float, better: str, worse: str) -> str:
    """'9.8x fewer parameters' for ratio >= 1, '2.0x more parameters' below."""
    if ratio >= 1.0:
        return f"{ratio:.1f}x {better}"
    return f"{1.0 / ratio:.1f}x {worse}" if ratio > 0 else f"n/a {better}"


def compare(teacher: dict[str, Any], student: dict[str, Any]) -> dict[str, Any]:
    """Ratios of a teacher's profile to its student's, and the accuracy difference in points."""

    def ratio(a: float, b: float) -> float:
        return a / b if b else float("inf")

    out = {
        "student": student["run"],
        "teacher": teacher["run"],
        "params_ratio": ratio(teacher["parameters"], student["parameters"]),
        "macs_ratio": ratio(teacher["macs_per_image"], student["macs_per_image"]),
        "onnx_size_ratio": ratio(teacher["onnx_bytes"], student["onnx_bytes"]),
        "speedup_b1": ratio(teacher["latency_ms_b1"], student["latency_ms_b1"]),
        "throughput_ratio_b64": ratio(
            student["throughput_img_s_b64"], teacher["throughput_img_s_b64"]
        ),
        "acc_delta_points": student["test_acc"] - teacher["test_acc"],
    }
    out["summary"] = ", ".join(
        [
            _times(out["params_ratio"], "fewer parameters", "more parameters"),
            _times(out["macs_ratio"], "fewer MACs", "more MACs"),
            _times(out["onnx_size_ratio"], "smaller ONNX file", "larger ONNX file"),
            _times(out["speedup_b1"], "faster at batch 1", "slower at batch 1"),
            _times(
                out["throughput_ratio_b64"],
                "higher throughput at batch 64",
                "lower throughput at batch 64",
            ),
            f"{out['acc_delta_points']:+.1f} points",
        ]
    )
    return out


def _checkpoint_key(path: Path) -> str:
    return str(path.resolve())


def profile_runs(targets: Sequence[str | Path], settings: ProfileSettings) -> dict[str, Any]:
    """Profile each run and, for a KD run (a teacher in its config), its teacher and the ratios."""
    settings.validate()
    require_onnx()
    # load everything first so a bad path fails before minutes of timing
    loaded = [(str(t), load_model(t, settings.which)) for t in targets]
    rows: dict[str, dict[str, Any]] = {}
    comparisons, notes = [], []

    def profiled(label: str, model: LoadedModel, role: str) -> dict[str, Any]:
        key = _checkpoint_key(model.checkpoint)
        if key not in rows:
            rows[key] = {"run": label, "role": role, **profile_model(model, settings)}
        elif role == "teacher":
            rows[key]["role"] = "teacher"
        return rows[key]

    for label, model in loaded:
        teacher_ref = model.config.get("teacher")
        row = profiled(label, model, "student" if teacher_ref else "")
        if not teacher_ref:
            continue
        try:
            teacher_ckpt = resolve_checkpoint(teacher_ref, which="best")
        except CheckpointError:
            notes.append(f"teacher of {label} ({teacher_ref}) not found: no comparison")
            continue
        teacher = load_model(teacher_ckpt)
        trow = profiled(str(teacher_ref), teacher, "teacher")
        comparisons.append(compare(trow, row))
    return {
        "settings": {
            **asdict(settings),
            "latency_batch": LATENCY_BATCH,
            "throughput_batch": THROUGHPUT_BATCH,
            "statistic": "median",
            "device": "cpu",
            "macs": MACS_NOTE + ", per image (batch of 1)",
            "torch": torch.__version__,
            "onnxruntime": _version("onnxruntime"),
        },
        "models": list(rows.values()),
        "comparisons": comparisons,
        "notes": notes,
    }


def _version(package: str) -> str | None:
    try:
        return __import__(package).__version__
    except ImportError:
        return None


def _count(n: float) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.2f}G"
    if n >= 1e6:
        return f"{n / 1e6:.2f}M"
    return f"{n / 1e3:.1f}K"


def format_profile(result: dict[str, Any]) -> str:
    """The table, comparison lines and settings `distillkit profile` prints."""
    s = result["settings"]
    thread_word = "thread" if s["threads"] == 1 else "threads"
    header = ["run", "role", "model", "params", "ONNX", "MACs/img", "ms @b1", "img/s @b64", "acc %"]
    table = [header]
    for r in result["models"]:
        table.append(
            [
                r["run"],
                r["role"] or "-",
                r["model"],
                _count(r["parameters"]),
                format_size(r["onnx_bytes"]),
                _count(r["macs_per_image"]),
                f"{r['latency_ms_b1']:.3f}",
                f"{r['throughput_img_s_b64']:.0f}",
                f"{r['test_acc']:.2f}" + ("" if r["test_acc_source"] == "metrics.json" else "*"),
            ]
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = [
        f"CPU timings: {s['runtime']}, {s['threads']} {thread_word}, median of {s['repeats']} runs "
        f"after {s['warmup']} warm-up; latency at batch {s['latency_batch']}, throughput at "
        f"batch {s['throughput_batch']}",
        MACS_NOTE + ", per image",
        "",
    ]
    for i, row in enumerate(table):
        cells = [c.ljust(w) if j < 3 else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    if any(r["test_acc_source"] != "metrics.json" for r in result["models"]):
        lines.append("* accuracy evaluated on the test split (metrics.json did not match)")
    for c in result["comparisons"]:
        lines.append(f"{c['student']} vs teacher {c['teacher']}: {c['summary']}")
    lines.extend(result["notes"])
    return "\n".join(lines)


def write_json(path: str | Path, obj: dict[str, Any], force: bool = False) -> Path:
    """Write `obj` as JSON atomically; refuses to replace an existing file unless `force`."""
    path = Path(path)
    if path.is_dir():
        raise DeployError(f"--json {path} is a directory; give a file name")
    if path.exists() and not force:
        raise FileExistsError(f"{path} already exists; pass --force to overwrite it")
    write_text_atomically(path, json.dumps(obj, indent=2) + "\n")
    return path
