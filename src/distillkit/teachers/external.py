"""Teachers trained outside distillkit: a model class plus weights, a TorchScript file, an ONNX file.

- ``teacher_model=SPEC`` with ``teacher_weights=FILE``: SPEC is anything ``build_model`` takes
  (a zoo name, ``path/to/file.py:Name`` or ``package.module:Name``), built for the dataset
  (plus ``teacher_model_kwargs``); FILE is a state_dict saved by ``torch.save`` (.pt/.pth; also
  ``{'state_dict': ...}`` or ``{'model': ...}``, DDP/compile prefixes stripped) or .safetensors.
  A full white-box teacher: logits and forward hooks, so every method can use it.
- ``teacher=FILE`` written by ``torch.jit.save``: a white-box teacher (logits) whose layers cannot
  be hooked, so methods that read teacher features refuse it with a one-line error.
- ``teacher=FILE.onnx``: run by onnxruntime on the CPU as a black box answering probabilities
  ('soft', the default) or labels ('hard'), with an optional query budget.

Input convention: the runner hands teachers normalised batches ((pixels - mean) / std, the
dataset's mean and std). ``teacher_input='pixels'`` maps them back to float32 pixels in [0, 1]
first, which is what files written by ``distillkit export`` take (their normalisation is inside
the graph); such files are recognised by their metadata and default to 'pixels'. Every other
teacher defaults to 'normalized'. An ONNX output is taken as logits unless its rows are already
probabilities (non-negative, summing to 1 on the probe batch).
"""

from __future__ import annotations

import json
import re
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distillkit.errors import ConfigError, InputNotFoundError, InvalidInputError
from distillkit.models import build_model
from distillkit.teachers.base import KINDS
from distillkit.teachers.local import (
    ONNX_INPUT_TYPES,
    LocalTeacher,
    OnnxModel,
    OpaqueBlackBoxTeacher,
    PixelInputHook,
    ScriptedModel,
    refuse_stagewise_pixels,
)

__all__ = [
    "TEACHER_INPUTS",
    "ExternalTeacherSpec",
    "is_external_teacher",
    "load_external_teacher",
    "load_state_dict_file",
    "teacher_file_format",
]

TEACHER_INPUTS = ("normalized", "pixels")
# metadata written by `distillkit export`: a TorchScript extra file, an ONNX metadata key
DK_TORCHSCRIPT_EXTRA = "distillkit.json"
DK_MEAN_KEY = "distillkit.mean"
PROBE_BATCH = 2  # not 1: a batch of one would hide a graph specialised to batch 1
_LISTED = 3  # keys named in a weights mismatch message
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel, torch.compile


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _describe(bundle: Any) -> str:
    size = bundle.image_size
    return f"'{bundle.name}' ({bundle.in_channels}x{size}x{size}, {bundle.num_classes} classes)"


# -- what a teacher= path holds ----------------------------------------------------------------


def _is_torchscript(path: Path) -> bool:
    # torch.save archives hold data.pkl and tensors; torch.jit.save adds compiled code and constants
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return any(n.split("/", 1)[-1] == "constants.pkl" or "/code/" in n for n in names)


def teacher_file_format(path: str | Path) -> str:
    """What a teacher= path holds: 'run' (a directory), 'onnx', 'torchscript' or 'checkpoint'."""
    p = Path(path).expanduser()
    if p.is_dir():
        return "run"
    if p.suffix.lower() == ".onnx":
        return "onnx"
    if p.is_file() and zipfile.is_zipfile(p) and _is_torchscript(p):
        return "torchscript"
    return "checkpoint"


def _get(spec: Any, key: str, default: Any = None) -> Any:
    if isinstance(spec, Mapping):
        return spec.get(key, default)
    return getattr(spec, key, default)


def is_external_teacher(spec: Any) -> bool:
    """True if a config (mapping or object) names a teacher this module loads, not a distillkit run."""
    if _get(spec, "teacher_model"):
        return True
    path = _get(spec, "teacher")
    return bool(path) and teacher_file_format(path) in ("onnx", "torchscript")


# -- the spec ----------------------------------------------------------------------------------


@dataclass
class ExternalTeacherSpec:
    """The config keys that describe a teacher trained outside distillkit."""

    teacher: str | None = None  # a TorchScript or ONNX file
    teacher_model: str | None = None  # zoo name or import spec, with teacher_weights
    teacher_weights: str | None = None  # .pt/.pth state_dict or .safetensors
    teacher_model_kwargs: dict[str, Any] = field(default_factory=dict)
    teacher_kind: str | None = None  # white-box | soft | hard (default: white-box, ONNX soft)
    teacher_input: str | None = None  # normalized | pixels (default: from the file's metadata)
    teacher_budget: int | None = None  # images a black-box teacher answers (None: unlimited)
    teacher_dataset_check: bool = True  # refuse a distillkit export made on another dataset

    @classmethod
    def from_any(cls, spec: Any = None, **overrides: Any) -> ExternalTeacherSpec:
        """Read the keys from a mapping or a config object (other keys ignored), then overrides."""
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(overrides) - set(names))
        if unknown:
            raise TypeError(f"unknown external teacher keys: {', '.join(unknown)}")
        values: dict[str, Any] = {}
        if spec is not None:
            sentinel = object()
            for name in names:
                value = _get(spec, name, sentinel)
                if value is not sentinel:
                    values[name] = value
        values.update(overrides)
        if values.get("teacher_model_kwargs") is None:
            values["teacher_model_kwargs"] = {}
        if values.get("teacher_dataset_check") is None:
            values["teacher_dataset_check"] = True
        return cls(**values)

    def validate(self) -> None:
        """One-line ConfigError for keys that do not fit together."""
        if self.teacher_kind is not None and self.teacher_kind not in KINDS:
            raise ConfigError(
                f"config key 'teacher_kind': must be one of {', '.join(KINDS)}, "
                f"got {self.teacher_kind!r}"
            )
        if self.teacher_input is not None and self.teacher_input not in TEACHER_INPUTS:
            raise ConfigError(
                f"config key 'teacher_input': must be one of {', '.join(TEACHER_INPUTS)}, "
                f"got {self.teacher_input!r}"
            )
        budget = self.teacher_budget
        if budget is not None:
            if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
                raise ConfigError(
                    f"config key 'teacher_budget': must be an integer >= 1, got {budget!r}"
                )
            if self.teacher_kind == "white-box":
                raise ConfigError(
                    "config key 'teacher_budget': a budget limits a black-box teacher; "
                    "set teacher_kind=soft or teacher_kind=hard"
                )
        if not isinstance(self.teacher_model_kwargs, Mapping):
            raise ConfigError("config key 'teacher_model_kwargs': must be a mapping")
        if self.teacher_model and self.teacher:
            raise ConfigError(
                "set either teacher= (a run, TorchScript or ONNX file) or teacher_model= with "
                "teacher_weights=, not both"
            )
        if self.teacher_model and not self.teacher_weights:
            raise ConfigError(
                "config key 'teacher_model' needs teacher_weights=FILE (.pt, .pth or .safetensors)"
            )
        if self.teacher_weights and not self.teacher_model:
            raise ConfigError(
                "config key 'teacher_weights' needs teacher_model= (the class the weights belong to)"
            )
        if self.teacher_model_kwargs and not self.teacher_model:
            raise ConfigError("config key 'teacher_model_kwargs' needs teacher_model=")
        if not self.teacher_model and not self.teacher:
            raise ConfigError(
                "no external teacher: set teacher=FILE (TorchScript or .onnx) or "
                "teacher_model= with teacher_weights="
            )


# -- weights files -----------------------------------------------------------------------------


def _existing(path: str, key: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise InputNotFoundError(f"{key} file not found: {p}")
    return p


def _strip_wrappers(state: dict[str, Any]) -> dict[str, Any]:
    # a prefix every key shares comes from a wrapper (DDP, torch.compile), not from the model
    changed = True
    while changed and state:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix) :]: v for k, v in state.items()}
                changed = True
    return state


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state_dict from .pt/.pth (torch.save, weights only) or .safetensors, on the CPU."""
    p = _existing(str(path), "teacher_weights")
    if p.suffix.lower() == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ConfigError(
                f"reading {p.name} needs the 'safetensors' package: pip install safetensors"
            ) from None
        try:
            state: Any = load_file(str(p), device="cpu")
        except Exception as exc:  # the Rust reader raises its own error types
            raise InvalidInputError(
                f"cannot read teacher_weights {p} as safetensors ({_first_line(exc)})"
            ) from None
    else:
        if zipfile.is_zipfile(p) and _is_torchscript(p):
            raise InvalidInputError(
                f"teacher_weights {p} is a TorchScript file: give it as teacher={p} instead"
            )
        try:
            state = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as exc:  # unpickling refusals and corrupt files have many types
            raise InvalidInputError(
                f"cannot read teacher_weights {p} as a state_dict ({_first_line(exc)}); "
                "save it with torch.save(model.state_dict(), FILE)"
            ) from None
    if isinstance(state, Mapping):
        for key in ("state_dict", "model"):
            inner = state.get(key)
            if isinstance(inner, Mapping):
                state = inner
                break
    if not isinstance(state, Mapping) or not any(
        isinstance(v, torch.Tensor) for v in state.values()
    ):
        raise InvalidInputError(
            f"teacher_weights {p} holds {type(state).__name__}, not a state_dict of tensors"
        )
    return _strip_wrappers({str(k): v for k, v in state.items()})


def _listed(keys: Sequence[str]) -> str:
    more = f" (+{len(keys) - _LISTED} more)" if len(keys) > _LISTED else ""
    return ", ".join(keys[:_LISTED]) + more


def load_weights(model: nn.Module, state: Mapping[str, torch.Tensor], where: str) -> None:
    """Load ``state`` strictly; a missing, unexpected or misshapen key is one ConfigError line."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        k
        for k in own
        if k in state
        and isinstance(state[k], torch.Tensor)
        and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    problems = []
    if shapes:
        k = shapes[0]
        problems.append(
            f"'{k}' is {tuple(state[k].shape)} in the file, {tuple(own[k].shape)} in the model"
            + (f" ({len(shapes) - 1} more shapes differ)" if len(shapes) > 1 else "")
        )
    if missing:
        problems.append(f"missing from the file: {_listed(missing)}")
    if unexpected:
        problems.append(f"not in the model: {_listed(unexpected)}")
    if problems:
        raise ConfigError(f"{where}: {'; '.join(problems)}")
    model.load_state_dict(state, strict=True)


# -- loading -----------------------------------------------------------------------------------


@dataclass
class _Loaded:
    scorer: nn.Module
    source: str
    fmt: str  # weights | torchscript | onnx
    input: str
    meta: dict[str, Any]
    outputs: str = "logits"


def _input_mode(asked: str | None, meta: dict[str, Any], source: str) -> str:
    exported = DK_MEAN_KEY in meta
    if asked is None:
        return "pixels" if exported else "normalized"
    if exported and asked != "pixels":
        raise ConfigError(
            f"config key 'teacher_input': {source} was written by distillkit export and takes "
            "pixels in [0, 1]; drop teacher_input=normalized"
        )
    return asked


def _build_from_weights(spec: ExternalTeacherSpec, bundle: Any) -> _Loaded:
    assert spec.teacher_model and spec.teacher_weights
    kwargs = dict(spec.teacher_model_kwargs)
    try:
        model = build_model(
            spec.teacher_model,
            in_channels=bundle.in_channels,
            num_classes=bundle.num_classes,
            image_size=bundle.image_size,
            **kwargs,
        )
    except (TypeError, ValueError) as exc:
        # build_model names the student's keys; say the teacher's
        text = re.sub(r"(?<!teacher_)model_kwargs", "teacher_model_kwargs", _first_line(exc))
        raise ConfigError(f"config key 'teacher_model': {text}") from None
    state = load_state_dict_file(spec.teacher_weights)
    source = f"{spec.teacher_model} (weights {spec.teacher_weights})"
    where = (
        f"teacher_weights {spec.teacher_weights} do not fit teacher_model {spec.teacher_model} "
        f"built for dataset {_describe(bundle)}"
    )
    load_weights(model, state, where)
    model.eval()
    mode = _input_mode(spec.teacher_input, {}, source)
    if mode == "pixels":
        model.register_forward_pre_hook(PixelInputHook(bundle))
        model.stagewise_blocks = refuse_stagewise_pixels
    return _Loaded(model, source, "weights", mode, {})


def _load_torchscript(spec: ExternalTeacherSpec, path: Path, bundle: Any) -> _Loaded:
    extra = {DK_TORCHSCRIPT_EXTRA: ""}
    try:
        net = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    except Exception as exc:  # TorchScript raises RuntimeError and its own types
        raise InvalidInputError(
            f"cannot load TorchScript teacher {path} ({_first_line(exc)})"
        ) from None
    meta: dict[str, Any] = {}
    if extra[DK_TORCHSCRIPT_EXTRA]:
        try:
            meta = dict(json.loads(extra[DK_TORCHSCRIPT_EXTRA]))
        except (ValueError, TypeError):
            meta = {}
    mode = _input_mode(spec.teacher_input, meta, str(path))
    net.eval()
    model = ScriptedModel(net, str(path), bundle if mode == "pixels" else None)
    return _Loaded(model, str(path), "torchscript", mode, meta)


def _load_onnx(spec: ExternalTeacherSpec, path: Path, bundle: Any) -> _Loaded:
    try:
        import onnxruntime as ort
    except ImportError:
        raise ConfigError(
            "an ONNX teacher needs the 'onnxruntime' package: pip install 'distillkit[export]'"
        ) from None
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # errors only: optimiser notices are not the user's concern
    try:
        session = ort.InferenceSession(
            str(path), sess_options=opts, providers=["CPUExecutionProvider"]
        )
    except Exception as exc:  # onnxruntime raises its own exception types
        raise InvalidInputError(f"cannot load ONNX teacher {path} ({_first_line(exc)})") from None
    inputs = session.get_inputs()
    if len(inputs) != 1:
        names = ", ".join(i.name for i in inputs)
        raise ConfigError(
            f"teacher {path} takes {len(inputs)} inputs ({names}); a teacher takes one image batch"
        )
    inp = inputs[0]
    if inp.type not in ONNX_INPUT_TYPES:
        raise ConfigError(f"teacher {path} takes {inp.type} input; expected float images")
    want = (bundle.in_channels, bundle.image_size, bundle.image_size)
    dims = list(inp.shape or [])
    if len(dims) != 4 or any(isinstance(d, int) and d != w for d, w in zip(dims[1:], want)):
        shown = tuple(
            d if isinstance(d, int) else "batch" if i == 0 else d for i, d in enumerate(dims)
        )
        raise ConfigError(
            f"teacher {path} takes input of shape {shown}, dataset {_describe(bundle)} gives "
            f"(batch, {want[0]}, {want[1]}, {want[2]})"
        )
    meta = dict(session.get_modelmeta().custom_metadata_map or {})
    mode = _input_mode(spec.teacher_input, meta, str(path))
    model = OnnxModel(session, str(path), bundle if mode == "pixels" else None)
    return _Loaded(model, str(path), "onnx", mode, meta)


def _probe(loaded: _Loaded, bundle: Any, device: torch.device) -> torch.Tensor:
    """Run one batch of zeros; the output must be (batch, the dataset's classes)."""
    shape = (PROBE_BATCH, bundle.in_channels, bundle.image_size, bundle.image_size)
    try:
        with torch.no_grad():
            out = loaded.scorer(torch.zeros(shape, device=device))
    except ConfigError:
        raise
    except Exception as exc:  # whatever the network raises on the wrong input
        raise ConfigError(
            f"teacher {loaded.source} cannot take inputs of dataset {_describe(bundle)} "
            f"({_first_line(exc)})"
        ) from None
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != PROBE_BATCH:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(
            f"teacher {loaded.source} outputs {got} for a batch of {PROBE_BATCH}; a teacher must "
            f"output (batch, classes), dataset {_describe(bundle)}"
        )
    if out.shape[1] != bundle.num_classes:
        raise ConfigError(
            f"teacher {loaded.source} outputs {out.shape[1]} classes, dataset '{bundle.name}' has "
            f"{bundle.num_classes}"
        )
    return out


def _check_exported_dataset(loaded: _Loaded, bundle: Any, check: bool) -> None:
    """A distillkit export records its dataset and classes: refuse others unless told not to."""
    theirs = loaded.meta.get("distillkit.dataset")
    try:
        classes = json.loads(loaded.meta.get("distillkit.classes") or "[]")
    except ValueError:
        classes = []
    differs = (theirs and theirs != bundle.name) or (
        classes and [str(c) for c in classes] != [str(c) for c in bundle.classes]
    )
    if differs and check:
        raise ConfigError(
            f"teacher {loaded.source} was exported from a run on '{theirs}', this run uses "
            f"{_describe(bundle)}; set teacher_dataset_check=false to use it anyway"
        )


def _looks_like_probs(out: torch.Tensor) -> bool:
    out = out.float()
    sums = out.sum(dim=1)
    in_range = bool(out.min() >= 0) and bool(out.max() <= 1)
    return in_range and torch.allclose(sums, torch.ones_like(sums), atol=1e-4)


def load_external_teacher(
    spec: Any = None, *, bundle: Any, device: torch.device | str = "cpu", **keys: Any
) -> nn.Module:
    """Load the teacher a config describes (mapping, config object or keyword keys), checked.

    Returns a ``LocalTeacher`` (kind 'white-box': logits) or an ``OpaqueBlackBoxTeacher``
    ('soft' / 'hard'); ``teacher.info`` says where it came from and its input convention.
    """
    s = ExternalTeacherSpec.from_any(spec, **keys)
    s.validate()
    device = torch.device(device)
    if s.teacher_model:
        loaded = _build_from_weights(s, bundle)
    else:
        assert s.teacher is not None
        path = _existing(s.teacher, "teacher")
        fmt = teacher_file_format(path)
        if fmt == "torchscript":
            loaded = _load_torchscript(s, path, bundle)
        elif fmt == "onnx":
            loaded = _load_onnx(s, path, bundle)
        else:
            raise ConfigError(
                f"teacher {path} is not a TorchScript or ONNX file (a distillkit checkpoint is "
                "loaded as a run teacher)"
            )
    kind = s.teacher_kind or ("soft" if loaded.fmt == "onnx" else "white-box")
    if kind == "white-box" and loaded.fmt == "onnx":
        raise ConfigError(
            f"config key 'teacher_kind': the ONNX teacher {loaded.source} is a black box; "
            "use soft (probabilities) or hard (labels)"
        )
    loaded.scorer.to(device)
    out = _probe(loaded, bundle, device)
    _check_exported_dataset(loaded, bundle, s.teacher_dataset_check)
    if loaded.fmt == "onnx" and DK_MEAN_KEY not in loaded.meta and _looks_like_probs(out):
        loaded.outputs = "probs"
    teacher: nn.Module
    if kind == "white-box":
        teacher = LocalTeacher(loaded.scorer)
    else:
        teacher = OpaqueBlackBoxTeacher(
            loaded.scorer, kind, s.teacher_budget, loaded.outputs, bundle.num_classes, loaded.source
        )
    teacher.info = {
        "format": loaded.fmt,
        "source": loaded.source,
        "kind": kind,
        "input": loaded.input,
        "outputs": loaded.outputs,
        "metadata": loaded.meta,
    }
    return teacher.to(device)
