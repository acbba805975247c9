"""Export a run's trained network, normalisation included, to ONNX or TorchScript, with a parity check.

The exported graph takes float32 NCHW pixels in [0, 1] (what the loaders yield before
normalisation) and returns logits; the per-channel mean/std the run trained with are inside it.
Only the student network is exported: method adapters, connectors and teachers are left out.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distillkit.data.datasets import Split, load_dataset
from distillkit.data.transforms import normalize, to_float
from distillkit.engine.checkpoint import load_checkpoint
from distillkit.files import atomic_path
from distillkit.models import build_model

FORMATS = ("onnx", "torchscript")
CHECKPOINTS = ("best", "last")
PARITY_TOL = 1e-4  # max |logit difference| allowed between PyTorch and the exported graph (float32)
EVAL_BATCH = 256
INPUT_NAME, OUTPUT_NAME = "pixels", "logits"
# the loggers that print progress or optional-op notices while exporting
_NOISY_LOGGERS = ("torch.onnx", "torch.export", "torch._export", "torch._dynamo", "torch.fx")

Predictor = Callable[[torch.Tensor], torch.Tensor]


class DeployError(ValueError):
    """Bad input to export or profile: missing run, checkpoint or dependency, unknown format."""


class ExportError(RuntimeError):
    """The model could not be exported, or the exported graph does not behave like the model."""


class ParityError(ExportError):
    """The exported graph's logits differ from PyTorch's by more than the tolerance."""


class Deployable(nn.Module):
    """A trained network plus its input normalisation: float32 NCHW pixels in [0, 1] -> logits."""

    def __init__(self, network: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.network = network
        # buffers, so the constants travel inside the exported graph
        self.register_buffer(
            "mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1)
        )
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of pixels in [0, 1], normalised as the training loaders do: (x - mean) / std."""
        return self.network((x - self.mean) / self.std)


@dataclass
class LoadedModel:
    """A trained network rebuilt from a checkpoint, in eval mode, with what it needs at inference."""

    network: nn.Module
    meta: dict[str, Any]
    config: dict[str, Any]
    checkpoint: Path
    epoch: int

    def deployable(self) -> Deployable:
        """The network wrapped with its normalisation, in eval mode."""
        return Deployable(self.network, self.meta["mean"], self.meta["std"]).eval()

    def input_shape(self, batch: int) -> tuple[int, int, int, int]:
        """(batch, C, H, W) of the network's input."""
        size = int(self.meta["image_size"])
        return (batch, int(self.meta["in_channels"]), size, size)


@dataclass
class ExportReport:
    """What `export_run` wrote and how the exported graph compared with PyTorch."""

    out: Path
    fmt: str
    exporter: str
    model: LoadedModel
    size_bytes: int
    parity: dict[str, Any]


def resolve_target(target: str | Path, which: str = "best") -> Path:
    """The checkpoint file of a run directory (exactly checkpoints/<which>.pt) or a .pt file."""
    if which not in CHECKPOINTS:
        raise DeployError(f"unknown checkpoint {which!r}; choose from {', '.join(CHECKPOINTS)}")
    p = Path(target)
    if p.is_dir():
        ckpt = p / "checkpoints" / f"{which}.pt"
        if not ckpt.is_file():
            others = [c for c in CHECKPOINTS if (p / "checkpoints" / f"{c}.pt").is_file()]
            hint = f" (it has {', '.join(o + '.pt' for o in others)})" if others else ""
            raise DeployError(f"run directory {p} has no checkpoints/{which}.pt{hint}")
        return ckpt
    if p.is_file():
        return p
    raise DeployError(f"no such run directory: {p}")


def load_model(target: str | Path, which: str = "best") -> LoadedModel:
    """Rebuild the student network of a run directory (or checkpoint file) in eval mode."""
    path = resolve_target(target, which)
    state = load_checkpoint(path)
    meta = state.get("model_meta") or {}
    missing = [k for k in ("name", "in_channels", "num_classes", "image_size", "mean", "std")]
    missing = [k for k in missing if k not in meta]
    if "model" not in state or missing:
        raise DeployError(f"{path} lacks the model or its metadata ({', '.join(missing)})")
    network = build_model(
        meta["name"],
        in_channels=meta["in_channels"],
        num_classes=meta["num_classes"],
        image_size=meta["image_size"],
        **meta.get("kwargs", {}),
    )
    network.load_state_dict(state["model"])
    network.eval()
    return LoadedModel(network, meta, dict(state.get("config") or {}), path, int(state["epoch"]))


def load_test_split(model: LoadedModel, data_dir: str | None = None) -> Split:
    """The test split of the dataset the model was trained on, at its image size."""
    bundle = load_dataset(
        model.meta.get("dataset") or model.config.get("dataset", "digits"),
        data_dir=data_dir or model.config.get("data_dir"),
        image_size=int(model.meta["image_size"]),
    )
    if len(bundle.test) == 0:
        raise DeployError(f"dataset '{bundle.name}' has an empty test split")
    return bundle.test


def metadata(model: LoadedModel) -> dict[str, str]:
    """Key/value notes stored in the exported file so a deployer needs nothing else."""
    _, c, h, w = model.input_shape(1)
    return {
        "distillkit.model": str(model.meta["name"]),
        "distillkit.dataset": str(model.meta.get("dataset", "")),
        "distillkit.checkpoint": f"{model.checkpoint.name} (epoch {model.epoch})",
        "distillkit.input": (
            f"{INPUT_NAME}: float32 NCHW (batch, {c}, {h}, {w}) in [0, 1]; "
            "normalisation is inside the graph"
        ),
        "distillkit.output": f"{OUTPUT_NAME}: float32 (batch, {model.meta['num_classes']})",
        "distillkit.mean": json.dumps(list(model.meta["mean"])),
        "distillkit.std": json.dumps(list(model.meta["std"])),
        "distillkit.classes": json.dumps(list(model.meta.get("classes", []))),
    }


def require_onnx() -> None:
    """Raise DeployError naming the extra to install when onnx, onnxscript or onnxruntime is missing."""
    for name in ("onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(name)
        except ImportError:
            raise DeployError(
                f"ONNX needs the '{name}' package: pip install 'distillkit[export]'"
            ) from None


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporters' progress prints, deprecation warnings and optional-op notices."""
    loggers = [logging.getLogger(n) for n in _NOISY_LOGGERS]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".strip()


def _export_dynamo(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    """torch.export-based ONNX export with a dynamic batch dimension."""
    program = torch.onnx.export(
        model,
        (example,),
        dynamo=True,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_shapes=({0: torch.export.Dim("batch")},),
        verbose=False,
    )
    if program is None:
        raise ExportError("the dynamo exporter returned no program")
    program.save(str(path))


def _export_legacy(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    """TorchScript-based ONNX export, used only when the dynamo exporter fails for a model."""
    torch.onnx.export(
        model,
        (example,),
        str(path),
        dynamo=False,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        opset_version=17,
    )


def _add_onnx_metadata(path: Path, props: dict[str, str]) -> None:
    import onnx

    proto = onnx.load(str(path))
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(path))


def write_model(model: LoadedModel, fmt: str, path: str | Path) -> str:
    """Write the deployable graph of `model` to `path`; returns the exporter that was used."""
    if fmt not in FORMATS:
        raise DeployError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    path = Path(path)
    net = model.deployable()
    # batch 2, not 1: an example batch of 1 would let the tracer specialise the batch dimension
    example = torch.rand(model.input_shape(2), generator=torch.Generator().manual_seed(0))
    props = metadata(model)
    if fmt == "torchscript":
        with _quiet(), torch.no_grad():
            traced = torch.jit.trace(net, example, check_trace=False)
            torch.jit.save(traced, str(path), _extra_files={"distillkit.json": json.dumps(props)})
        return "torch.jit.trace"
    require_onnx()
    try:
        with _quiet():
            _export_dynamo(net, example, path)
        used = "dynamo (torch.onnx.export, dynamo=True)"
    except Exception as exc:  # the dynamo exporter raises many types; the legacy one may still work
        reason = _first_line(exc)
        try:
            with _quiet():
                _export_legacy(net, example, path)
        except Exception as exc2:
            raise ExportError(
                f"ONNX export of {model.meta['name']} failed: dynamo: {reason}; "
                f"legacy: {_first_line(exc2)}"
            ) from None
        used = f"legacy (torch.onnx.export, dynamo=False; the dynamo exporter failed: {reason})"
    _add_onnx_metadata(path, props)
    return used


def onnx_predictor(path: str | Path, threads: int = 1) -> Predictor:
    """Run an exported ONNX file with onnxruntime on the CPU, `threads` intra-op threads."""
    require_onnx()
    import numpy as np
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])

    def predict(x: torch.Tensor) -> torch.Tensor:
        feed = {INPUT_NAME: np.ascontiguousarray(x.numpy(), dtype=np.float32)}
        return torch.from_numpy(session.run([OUTPUT_NAME], feed)[0])

    return predict


def torchscript_predictor(path: str | Path) -> Predictor:
    """Run an exported TorchScript file."""
    with _quiet():
        module = torch.jit.load(str(path), map_location="cpu")
    module.eval()

    def predict(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return module(x)

    return predict


def open_predictor(fmt: str, path: str | Path, threads: int = 1) -> Predictor:
    """A callable pixels -> logits for an exported file of format `fmt`."""
    return onnx_predictor(path, threads) if fmt == "onnx" else torchscript_predictor(path)


def check_parity(
    model: LoadedModel, predictor: Predictor, split: Split, batch_size: int = EVAL_BATCH
) -> dict[str, Any]:
    """Compare exported logits with the PyTorch network's on every test image.

    The reference is the network applied to pixels normalised by `data.transforms.normalize`,
    exactly as the engine evaluates; the exported graph gets the raw [0, 1] pixels. A batch of
    one and full batches (the last one shorter) exercise the dynamic batch dimension.
    """
    mean, std = model.meta["mean"], model.meta["std"]
    n = len(split)
    max_diff, agree, ref_correct, exp_correct = 0.0, 0, 0, 0
    batches = [(0, 1)] + [(s, min(n, s + batch_size)) for s in range(0, n, batch_size)]
    with torch.no_grad():
        for i, (start, stop) in enumerate(batches):
            x = to_float(split.images[start:stop])
            ref = model.network(normalize(x, mean, std))
            try:
                out = predictor(x)
            except Exception as exc:  # runtimes raise their own types on shape problems
                raise ExportError(
                    f"the exported graph failed on a batch of {len(x)}: {_first_line(exc)}"
                ) from None
            if tuple(out.shape) != tuple(ref.shape):
                raise ParityError(
                    f"the exported graph returned shape {tuple(out.shape)} for a batch of "
                    f"{len(x)}; PyTorch returns {tuple(ref.shape)}"
                )
            diff = (ref.float() - out.float()).abs().max().item()
            max_diff = max(max_diff, math.inf if math.isnan(diff) else diff)
            if i == 0:
                continue  # the batch-of-one probe repeats image 0; count each image once
            y = split.labels[start:stop]
            agree += int((ref.argmax(1) == out.argmax(1)).sum())
            ref_correct += int((ref.argmax(1) == y).sum())
            exp_correct += int((out.argmax(1) == y).sum())
    return {
        "max_abs_diff": max_diff,
        "test_images": n,
        "batch_sizes": sorted({stop - start for start, stop in batches}),
        "top1_agree": agree,
        "top1_agreement": 100.0 * agree / n,
        "pytorch_acc": 100.0 * ref_correct / n,
        "exported_acc": 100.0 * exp_correct / n,
    }


def export_run(
    target: str | Path,
    fmt: str,
    out: str | Path,
    which: str = "best",
    force: bool = False,
    data_dir: str | None = None,
    tolerance: float = PARITY_TOL,
) -> ExportReport:
    """Export a run's network to `out` and check it against PyTorch on the test split.

    The file is written next to `out` under a temporary name and moved into place only once the
    parity check passes, so a failed export never replaces an existing file.
    """
    if fmt not in FORMATS:
        raise DeployError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    out = Path(out)
    if out.is_dir():
        raise DeployError(f"--out {out} is a directory; give a file name")
    if out.exists() and not force:
        raise FileExistsError(f"{out} already exists; pass --force to overwrite it")
    model = load_model(target, which)
    if fmt == "onnx":
        require_onnx()
    split = load_test_split(model, data_dir)
    with atomic_path(out) as tmp:
        exporter = write_model(model, fmt, tmp)
        parity = check_parity(model, open_predictor(fmt, tmp), split)
        parity["tolerance"] = tolerance
        if not parity["max_abs_diff"] <= tolerance:
            raise ParityError(
                f"parity check failed: max |logit difference| {parity['max_abs_diff']:.3g} between "
                f"PyTorch and the exported {fmt} graph exceeds {tolerance:g}; {out} was not written"
            )
        size = tmp.stat().st_size
    return ExportReport(out, fmt, exporter, model, size, parity)


def format_size(n: int) -> str:
    """Bytes as a short human string (KB/MB, powers of 1000)."""
    if n >= 1_000_000:
        return f"{n / 1e6:.2f} MB"
    return f"{n / 1e3:.1f} KB"


def format_export(report: ExportReport) -> str:
    """The lines `distillkit export` prints."""
    m, p = report.model, report.parity
    _, c, h, w = m.input_shape(1)
    runtime = "onnxruntime" if report.fmt == "onnx" else "TorchScript"
    return "\n".join(
        [
            f"exported {m.meta['name']} ({m.checkpoint.name}, epoch {m.epoch}) to {report.out} "
            f"[{report.fmt}, {format_size(report.size_bytes)}]",
            f"exporter: {report.exporter}",
            f"input '{INPUT_NAME}': float32 (batch, {c}, {h}, {w}) pixels in [0, 1], "
            f"normalisation inside the graph; output '{OUTPUT_NAME}': (batch, {m.meta['num_classes']})",
            f"parity PyTorch vs {runtime}: max |logit diff| {p['max_abs_diff']:.2e} "
            f"(limit {p['tolerance']:.0e}) over {p['test_images']} test images, "
            f"batch sizes {', '.join(map(str, p['batch_sizes']))}",
            f"top-1 agreement on the test split: {p['top1_agreement']:.2f}% "
            f"({p['top1_agree']}/{p['test_images']}); test accuracy {p['exported_acc']:.2f}% "
            f"exported, {p['pytorch_acc']:.2f}% PyTorch",
        ]
    )
