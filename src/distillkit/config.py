"""Typed run configuration: YAML files plus `key=value` overrides, validated field by field.

This module knows nothing of methods, models or datasets: it checks run-level keys (types,
ranges, choices). The runner checks names and builds a method's typed `options` with
`build_dataclass`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import itertools
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# defined at the bottom layer so any module can raise it; re-exported for existing imports
from distillkit.errors import ConfigError
from distillkit.files import write_text_atomically


@dataclass
class SubsetConfig:
    """Which part of the training split a run trains on."""

    method: str = "full"  # full | random | kt
    fraction: float = 1.0
    features: str = "pixels"  # pixels | teacher
    per_class: bool = True


@dataclass
class RunConfig:
    """Everything a training or distillation run needs; flat keys except `subset`."""

    name: str = "run"
    method: str = "ce"  # any registered method: distillkit methods
    # method-specific (temperature, alpha, hint layers, ...): typed and checked by the runner
    options: dict[str, Any] = field(default_factory=dict)
    # data
    dataset: str = "digits"
    data_dir: str | None = None
    image_size: int | None = None
    # options of the dataset's loader or factory (imagefolder: val_fraction, seed)
    dataset_kwargs: dict[str, Any] = field(default_factory=dict)
    augment: bool = True
    subset: SubsetConfig = field(default_factory=SubsetConfig)
    # student (the model being trained)
    model: str = "cnn_small"  # a zoo name or an import path (path/to/file.py:Name, module:Name)
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    # teacher: a run directory or checkpoint file of a trained model
    teacher: str | None = None
    # cache the teacher's answers per training sample: auto (when augment=false and the method
    # can), true or false
    teacher_cache: bool | str = "auto"
    # refuse a teacher trained on another dataset or input size (channels and classes always must match)
    teacher_dataset_check: bool = True
    # a teacher trained outside distillkit (teachers/external.py); teacher= may also name a
    # TorchScript or .onnx file
    teacher_model: str | None = None  # zoo name or path/to/file.py:Name, with teacher_weights
    teacher_weights: str | None = None  # .pt/.pth state_dict or .safetensors
    teacher_model_kwargs: dict[str, Any] = field(default_factory=dict)
    teacher_kind: str | None = None  # white-box | soft | hard (default white-box; ONNX soft)
    teacher_input: str | None = None  # normalized | pixels (default: pixels for exports)
    teacher_budget: int | None = None  # images a soft/hard teacher may answer (None: unlimited)
    # optimisation
    epochs: int = 10
    batch_size: int = 128  # global batch: split over processes under torchrun
    drop_last: bool = False
    eval_batch_size: int = 512
    optimizer: str = "sgd"  # sgd | adamw
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    schedule: str = "cosine"  # cosine | step | constant
    warmup_epochs: float = 0.0
    milestones: list[int] = field(default_factory=list)
    gamma: float = 0.1
    grad_clip: float | None = None
    # engine
    device: str = "auto"  # auto | cpu | cuda | mps | cuda:N
    amp: str = "auto"  # auto (bf16 where the device does bf16 natively) | none | bf16 | fp16
    seed: int = 0
    deterministic: bool = False
    out_dir: str | None = None  # default runs/<name>
    quiet: bool = False
    tensorboard: bool = False
    save_every: int = 1
    eval_every: int = 1  # evaluate every N epochs (always after the last)
    sync_bn: bool = False
    # NHWC convolutions: auto (conv models on cpu, and on cuda under amp), true or false
    channels_last: bool | str = "auto"
    compile: bool = False  # torch.compile student and teacher (pays only on long runs)

    def run_dir(self) -> Path:
        """Directory this run writes to."""
        return Path(self.out_dir) if self.out_dir else Path("runs") / self.name

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for YAML/JSON, nested dataclasses included."""
        return dataclasses.asdict(self)


# keys that were run-level once and now belong to the options of the methods using them
MOVED_TO_OPTIONS = ("temperature", "alpha", "hint_layer", "teacher_hint_layer", "hint_weight")

CHOICES: dict[str, tuple[str, ...]] = {
    "optimizer": ("sgd", "adamw"),
    "schedule": ("cosine", "step", "constant"),
    "amp": ("auto", "none", "bf16", "fp16"),
    "subset.method": ("full", "random", "kt"),
    "subset.features": ("pixels", "teacher"),
    "channels_last": ("auto", True, False),
    "teacher_cache": ("auto", True, False),
}
# optional keys (None: decided by the teacher's format)
TEACHER_CHOICES: dict[str, tuple[str, ...]] = {
    "teacher_kind": ("white-box", "soft", "hard"),
    "teacher_input": ("normalized", "pixels"),
}


# what a value of these annotated types must be, as error messages name it
_EXPECTED = {bool: "true/false", int: "an integer", str: "a string"}


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check `value` against the annotated type, converting only the safe cases (int -> float)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is not type(None):
                with contextlib.suppress(ConfigError):
                    return _coerce(key, value, arg)
        name = getattr(tp, "__name__", None) or str(tp).replace("typing.", "")
        raise ConfigError(f"config key '{key}': expected {name}, got {value!r}")
    if tp is Any:
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp) or (Any,)
        return [_coerce(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if origin is dict or dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping, got {value!r}")
        return dict(value) if origin is dict else build_dataclass(tp, value, prefix=f"{key}.")
    if tp in _EXPECTED:
        # bool is a subclass of int, but true is no integer
        if isinstance(value, tp) and (tp is bool or not isinstance(value, bool)):
            return value
        raise ConfigError(f"config key '{key}': expected {_EXPECTED[tp]}, got {value!r}")
    if tp is float:
        # YAML 1.1 reads 1e-3 (no dot) as a string; accept what Python reads as a number
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            with contextlib.suppress(ValueError):
                return float(value)
        raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
    raise ConfigError(f"config key '{key}': unsupported type {tp}")


def build_dataclass(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """An instance of dataclass `cls` from a mapping, each value checked against its annotation.

    Unknown keys are a ConfigError naming `prefix + key` (with the closest valid key); ints are
    accepted for floats, nested dataclasses are built from nested mappings.
    """
    if not isinstance(data, dict):
        where = f"config key '{prefix.rstrip('.')}'" if prefix else "a config"
        raise ConfigError(f"{where}: expected a mapping of keys to values, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in hints:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown config key '{prefix}{key}'{hint}")
        kwargs[key] = _coerce(prefix + key, value, hints[key])
    return cls(**kwargs)


def _validate(cfg: RunConfig) -> None:
    for key, allowed in CHOICES.items():
        obj: Any = cfg
        for part in key.split("."):
            obj = getattr(obj, part)
        if obj not in allowed:
            raise ConfigError(f"config key '{key}': unknown value {obj!r}; choose from {allowed}")
    for key in ("epochs", "batch_size", "lr", "eval_batch_size"):
        if getattr(cfg, key) <= 0:
            raise ConfigError(f"config key '{key}': must be > 0, got {getattr(cfg, key)!r}")
    if cfg.save_every < 1:
        raise ConfigError(f"config key 'save_every': must be >= 1, got {cfg.save_every!r}")
    if cfg.warmup_epochs < 0:
        raise ConfigError(f"config key 'warmup_epochs': must be >= 0, got {cfg.warmup_epochs!r}")
    if cfg.image_size is not None and cfg.image_size <= 0:
        raise ConfigError(f"config key 'image_size': must be > 0, got {cfg.image_size!r}")
    # the name becomes runs/<name>: a path in it would write outside runs/
    if not cfg.name or "/" in cfg.name or "\\" in cfg.name or cfg.name in (".", ".."):
        raise ConfigError(
            f"config key 'name': must be a plain name, got {cfg.name!r}; use out_dir=PATH "
            "to choose the run directory"
        )
    if not 0.0 < cfg.subset.fraction <= 1.0:
        raise ConfigError(
            f"config key 'subset.fraction': must be in (0, 1], got {cfg.subset.fraction!r}"
        )
    has_teacher = cfg.teacher or cfg.teacher_model
    if cfg.subset.features == "teacher" and cfg.subset.method == "kt" and not has_teacher:
        raise ConfigError("config key 'subset.features': 'teacher' needs a teacher")
    for key, allowed in TEACHER_CHOICES.items():
        value = getattr(cfg, key)
        if value is not None and value not in allowed:
            raise ConfigError(f"config key '{key}': unknown value {value!r}; choose from {allowed}")
    if cfg.teacher_budget is not None and cfg.teacher_budget < 1:
        raise ConfigError(f"config key 'teacher_budget': must be >= 1, got {cfg.teacher_budget!r}")


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn ['lr=0.1', 'subset.method=kt'] into a nested dict, values parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override {item!r} has an empty key")
        value = yaml.safe_load(raw)  # None for an empty value
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with another override")
        node[parts[-1]] = value
    return out


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            value = _merge(merged[key], value)
        merged[key] = value
    return merged


def config_from_dict(data: dict[str, Any]) -> RunConfig:
    """Build a RunConfig from a (possibly partial) dict, checking its run-level keys only."""
    if not isinstance(data, dict):
        raise ConfigError(
            f"a config must be a mapping of keys to values, got {type(data).__name__}"
        )
    for key in MOVED_TO_OPTIONS:
        if key in data:
            raise ConfigError(f"config key '{key}' moved to 'options.{key}'")
    cfg = build_dataclass(RunConfig, data)
    _validate(cfg)
    return cfg


def read_config_data(path: str | Path | None, overrides: list[str] | None = None) -> dict[str, Any]:
    """The raw mapping of a YAML config file (or {}) with `key=value` overrides merged in."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {p} is not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping of keys to values")
        data = loaded or {}
    return _merge(data, parse_overrides(overrides or []))


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config (or none: defaults) and apply `key=value` overrides."""
    return config_from_dict(read_config_data(path, overrides))


def _absolute(path: str | None, base: Path) -> str | None:
    if path is None or "://" in path:
        return path
    return os.path.abspath(base / Path(path).expanduser())


def with_absolute_paths(cfg: RunConfig, base: str | Path | None = None) -> RunConfig:
    """A copy of cfg whose teacher, teacher_weights and data_dir do not depend on the cwd."""
    where = Path(base) if base is not None else Path.cwd()
    return dataclasses.replace(
        cfg,
        teacher=_absolute(cfg.teacher, where),
        teacher_weights=_absolute(cfg.teacher_weights, where),
        data_dir=_absolute(cfg.data_dir, where),
    )


HISTORY_TITLE = "# how this run was made, oldest first:"
HISTORY_PREFIX = "#   "


def save_config(cfg: RunConfig, path: str | Path, history: list[str] | None = None) -> None:
    """Write the resolved config as YAML (atomically), `history` as a comment header."""
    header = ""
    if history:
        header = "\n".join([HISTORY_TITLE, *(HISTORY_PREFIX + h for h in history)]) + "\n"
    write_text_atomically(path, header + yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def read_config_history(path: str | Path) -> list[str]:
    """The history lines save_config wrote into a config file ([] if none or no file)."""
    p = Path(path)
    lines = p.read_text().splitlines() if p.is_file() else []
    if lines[:1] != [HISTORY_TITLE]:
        return []
    kept = itertools.takewhile(lambda line: line.startswith(HISTORY_PREFIX), lines[1:])
    return [line.removeprefix(HISTORY_PREFIX) for line in kept]


def format_overrides(overrides: dict[str, Any], prefix: str = "") -> list[str]:
    """Inverse of parse_overrides: {'subset': {'method': 'kt'}} -> ['subset.method=kt']."""
    out = []
    for key, value in overrides.items():
        if isinstance(value, dict) and value:
            out += format_overrides(value, f"{prefix}{key}.")
        else:
            text = yaml.safe_dump(value, default_flow_style=True).strip()
            out.append(f"{prefix}{key}={text.removesuffix(chr(10) + '...').strip()}")
    return out
