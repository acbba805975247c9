"""Python API for people who already hold a model, a teacher and data: `distill` and `train`.

Both write the same run directory as the CLI (config.yaml, metrics, checkpoints, summary.md,
curves.png) and return the run's summary. Keyword arguments are either run-level config keys
(`epochs`, `lr`, `out_dir`, ...) or options of the method (`temperature`, `alpha`, ...).

What a later process needs is recorded by reference, never by pickling objects: a module's class
as an import spec with `model_kwargs`, a teacher module that rebuilds so as `teacher_model` +
RUN_DIR/teacher_weights.pt, data given as objects as dataset 'in-memory' (not stored); README's
"Python API" says what evaluate and resume then need.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import sys
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from distillkit.config import RunConfig, config_from_dict
from distillkit.data.datasets import DataBundle
from distillkit.data.external import ARRAY_KEYS, arrays_to_bundle
from distillkit.engine.checkpoint import write_atomically
from distillkit.errors import ConfigError
from distillkit.methods import get_method
from distillkit.models import build_model
from distillkit.runner import (
    IN_MEMORY,
    RunObjects,
    check_config,
    load_run_dataset,
    refuse_existing_run,
    run,
)

__all__ = ["distill", "train"]

TEACHER_WEIGHTS_FILE = "teacher_weights.pt"
# given positionally; as keywords they would say the same thing twice
POSITIONAL = ("model", "teacher", "dataset", "method")
# modules the API loads user code under when given a file (models/external.py)
_FILE_MODULE_PREFIX = "_distillkit_user_"

Data = Any  # a torch Dataset, an (images, labels) pair, a dict of npz-style arrays, or a name


def train(
    model: nn.Module | str,
    train: Data,
    test: Data | None = None,
    *,
    method: str = "ce",
    **options: Any,
) -> dict[str, Any]:
    """Train `model` on `train`, test on `test`; writes a run directory, returns its summary."""
    return _run("train", model, None, train, test, method, options)


def distill(
    student: nn.Module | str,
    teacher: nn.Module | str | None,
    train: Data,
    test: Data | None = None,
    *,
    method: str = "kd",
    **options: Any,
) -> dict[str, Any]:
    """Distil `teacher` into `student` on `train`; writes a run directory, returns its summary."""
    return _run("distill", student, teacher, train, test, method, options)


# -- keyword routing -------------------------------------------------------------------------------
def route_keywords(fn: str, method: str, given: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments as config data, method options under 'options'; unknown: ConfigError."""
    try:
        spec = get_method(method)
    except ValueError as exc:
        raise ConfigError(f"distillkit.{fn}(method={method!r}): {exc}") from None
    run_keys = [f.name for f in dataclasses.fields(RunConfig) if f.name not in POSITIONAL]
    opt_keys = [f.name for f in dataclasses.fields(spec.options_cls)] if spec.options_cls else []
    config: dict[str, Any] = {}
    opts: dict[str, Any] = dict(given.pop("options", None) or {})
    unknown = []
    for key, value in given.items():
        if key in POSITIONAL:
            raise ConfigError(
                f"distillkit.{fn}(): {key!r} is not a keyword option: the model, the teacher "
                "(distill) and the data are positional arguments, the method is method="
            )
        if key in run_keys and key in opt_keys:
            raise ConfigError(
                f"distillkit.{fn}(): {key!r} is both a run key and an option of method "
                f"'{method}'; pass options={{{key!r}: ...}} for the method's"
            )
        if key in run_keys:
            config[key] = value
        elif key in opt_keys:
            opts[key] = value
        else:
            close = difflib.get_close_matches(key, run_keys + opt_keys, n=1)
            unknown.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    if unknown:
        listed = ", ".join(opt_keys) or "none"
        raise ConfigError(
            f"distillkit.{fn}(): unknown keyword {', '.join(unknown)}; keywords are run keys "
            f"(RunConfig: epochs, lr, batch_size, out_dir, ...) or options of method "
            f"'{method}' ({listed})"
        )
    if opts:
        config["options"] = opts
    return config


# -- models given as objects -----------------------------------------------------------------------
def module_spec(module: nn.Module) -> tuple[str, bool]:
    """(import spec of the module's class, whether another process can import it)."""
    cls = type(module)
    name, qual = cls.__module__, cls.__qualname__
    if name == "__main__" or "<locals>" in qual:
        return f"{name}:{qual}", False
    loaded = sys.modules.get(name)
    path = getattr(loaded, "__file__", None)
    single_file = path and path.endswith(".py") and not hasattr(loaded, "__path__")
    if single_file and ("." not in name or name.startswith(_FILE_MODULE_PREFIX)):
        # a top-level file is found by path from any folder, not only where it is on sys.path
        return f"{os.path.abspath(path)}:{qual}", True
    return f"{name}:{qual}", True


def rebuild_problem(
    spec: str, module: nn.Module, kwargs: dict[str, Any], bundle: DataBundle
) -> str | None:
    """Why `spec` + `kwargs` does not rebuild `module`'s architecture (None: it does)."""
    try:
        rebuilt = build_model(
            spec,
            in_channels=bundle.in_channels,
            num_classes=bundle.num_classes,
            image_size=bundle.image_size,
            **kwargs,
        )
    except Exception as exc:  # whatever the user's constructor raises
        text = str(exc).strip().splitlines()
        return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
    mine = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()}
    for key in sorted(set(mine) | set(theirs)):
        if mine.get(key) != theirs.get(key):
            return f"'{key}' is {mine.get(key, 'absent')} here, {theirs.get(key, 'absent')} rebuilt"
    return None


# -- data given as objects -------------------------------------------------------------------------
def _array(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def _image(x: Any) -> np.ndarray:
    """One image as a C x H x W array (from a tensor, an array or a PIL image)."""
    a = _array(x)
    if a.ndim == 2:
        return a[None]
    if a.ndim == 3 and a.shape[0] not in (1, 3) and a.shape[-1] in (1, 3):
        return a.transpose(2, 0, 1)  # H x W x C (a PIL image or a NumPy picture)
    return a


def _label(y: Any, where: str) -> int:
    a = _array(y)
    if a.size != 1 or not np.issubdtype(a.dtype, np.integer):
        raise ConfigError(f"{where}: a label must be one integer, got {y!r}")
    return int(a.reshape(()))


def split_arrays(data: Data, which: str) -> tuple[np.ndarray, np.ndarray]:
    """(images, labels) of one split given as a Dataset of (image, label) or an (x, y) pair."""
    if isinstance(data, (tuple, list)) and len(data) == 2:
        return _array(data[0]), _array(data[1])
    if isinstance(data, torch.utils.data.TensorDataset) and len(data.tensors) >= 2:
        return _array(data.tensors[0]), _array(data.tensors[1])
    if not (hasattr(data, "__getitem__") and hasattr(data, "__len__")):
        raise ConfigError(
            f"{which}: expected a torch Dataset of (image, label), an (images, labels) pair or a "
            f"dict with {', '.join(ARRAY_KEYS)}; got {type(data).__name__}"
        )
    images, labels = [], []
    for i in range(len(data)):
        item = data[i]
        if not isinstance(item, (tuple, list)) or len(item) < 2:
            raise ConfigError(f"{which} item {i} is {type(item).__name__}; expected (image, label)")
        images.append(_image(item[0]))
        labels.append(_label(item[1], f"{which} item {i}"))
    if not images:
        raise ConfigError(f"{which}: the dataset is empty")
    if any(x.shape != images[0].shape for x in images):
        raise ConfigError(f"{which}: images of different shapes; give them all one C x H x W")
    return np.stack(images), np.asarray(labels, dtype=np.int64)


def bundle_from_objects(train: Data, test: Data | None, image_size: int | None) -> DataBundle:
    """An in-memory DataBundle from data the caller holds (nothing is written to disk)."""
    if isinstance(train, Mapping):
        if test is not None:
            raise ConfigError(
                "test: a dict of arrays holds both splits (x_test, y_test); leave test out"
            )
        arrays = {k: _array(v) for k, v in train.items()}
    else:
        if test is None:
            raise ConfigError(
                "test: give the test split too (a Dataset or an (images, labels) pair), or "
                f"pass one dict with {', '.join(ARRAY_KEYS)}"
            )
        x_train, y_train = split_arrays(train, "train")
        x_test, y_test = split_arrays(test, "test")
        arrays = {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}
    return arrays_to_bundle(
        IN_MEMORY, arrays, image_size, "data given to distillkit", info={"source": IN_MEMORY}
    )


def _describe(obj: Any) -> str:
    if obj is None or isinstance(obj, str):
        return repr(obj)
    return f"<{type(obj).__module__}.{type(obj).__qualname__}>"


# -- the run ---------------------------------------------------------------------------------------
def _run(
    fn: str,
    model: nn.Module | str,
    teacher: nn.Module | str | None,
    train: Data,
    test: Data | None,
    method: str,
    given: dict[str, Any],
) -> dict[str, Any]:
    data = route_keywords(fn, method, dict(given))
    data["method"] = method
    if isinstance(train, str) and test is not None:
        raise ConfigError(
            f"test: dataset {train!r} brings its own test split; give test only with data objects"
        )
    data["dataset"] = train if isinstance(train, str) else IN_MEMORY
    if isinstance(model, str):
        data["model"] = model
    if isinstance(teacher, str):
        data["teacher"] = teacher
    cfg = config_from_dict(data)
    if isinstance(train, str):
        bundle = load_run_dataset(cfg)
    else:
        bundle = bundle_from_objects(train, test, cfg.image_size)
    objects = RunObjects(bundle=bundle)
    notes = []
    if isinstance(model, nn.Module):
        spec, importable = module_spec(model)
        problem = rebuild_problem(spec, model, cfg.model_kwargs, bundle) if importable else None
        if problem:
            warnings.warn(
                f"distillkit.{fn}(): {spec} with model_kwargs={cfg.model_kwargs} does not "
                f"rebuild the given model ({problem}); evaluate/resume/export in another process "
                "will fail unless model_kwargs holds its constructor arguments",
                stacklevel=2,
            )
        cfg = dataclasses.replace(cfg, model=spec)
        objects.student = model
    elif not isinstance(model, str):
        raise ConfigError(f"model: expected an nn.Module or a model name, got {_describe(model)}")
    teacher_weights = None
    if isinstance(teacher, nn.Module):
        spec, importable = module_spec(teacher)
        if importable and rebuild_problem(spec, teacher, cfg.teacher_model_kwargs, bundle) is None:
            teacher_weights = cfg.run_dir() / TEACHER_WEIGHTS_FILE
            weights = str(teacher_weights.absolute())
            cfg = dataclasses.replace(cfg, teacher_model=spec, teacher_weights=weights)
        else:
            objects.teacher = teacher
            notes.append(
                f"the teacher ({spec}) was given as an object that cannot be rebuilt from its "
                "class; resume with teacher=..."
            )
    elif teacher is not None and not isinstance(teacher, str):
        raise ConfigError(
            f"teacher: expected an nn.Module, a run directory or a file, got {_describe(teacher)}"
        )
    check_config(cfg, objects)
    refuse_existing_run(cfg)
    if teacher_weights is not None:
        # the run loads its teacher from this file, as any later resume will
        state = teacher.state_dict()  # type: ignore[union-attr]
        write_atomically({k: v.detach().cpu() for k, v in state.items()}, teacher_weights)
    history = [
        f"distillkit.{fn}() in Python: model {_describe(model)}, teacher {_describe(teacher)}, "
        f"data {_describe(train)}, method={method!r}, {', '.join(sorted(given)) or 'no options'}",
        *notes,
    ]
    summary = run(cfg, history=history, objects=objects)
    return {**summary, "run_dir": str(cfg.run_dir().absolute())}
