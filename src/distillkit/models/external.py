"""User code given by import path: ``path/to/file.py:Name`` or ``package.module:Name``.

A ``.py`` file is loaded under a module name derived from its absolute path, so every process
loads it under the same name and pickles of its classes resolve once the file is loaded again.
This module imports no model file (it sits below ``registry.py``).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

from torch import nn

__all__ = [
    "build_external_model",
    "call_accepting",
    "canonical_import_spec",
    "canonical_model_spec",
    "is_import_spec",
    "resolve_import_spec",
]

_IDENT = re.compile(r"[A-Za-z_]\w*\Z")
# At most this many names are listed when an attribute is missing.
_MAX_CANDIDATES = 12


def _is_dotted(text: str) -> bool:
    return all(_IDENT.match(part) for part in text.split("."))


def is_import_spec(spec: object) -> bool:
    """True if ``spec`` has the form ``TARGET:Name`` (a file path or module, then an attribute)."""
    if not isinstance(spec, str) or ":" not in spec:
        return False
    target, attr = spec.rsplit(":", 1)
    return bool(target.strip()) and _is_dotted(attr)


def _split(spec: str) -> tuple[str, str]:
    target, attr = spec.rsplit(":", 1)
    return target.strip(), attr


def _is_file_target(target: str) -> bool:
    # A target naming a .py file, or written like a path, is a file; otherwise a module name.
    seps = {"/", os.sep} | ({os.altsep} if os.altsep else set())
    return target.endswith(".py") or any(s in target for s in seps) or target.startswith("~")


def _absolute(target: str, base_dir: Path | None) -> str:
    path = Path(target).expanduser()
    if not path.is_absolute():
        path = Path(base_dir if base_dir is not None else os.getcwd()) / path
    return os.path.normpath(os.path.abspath(path))


def canonical_import_spec(spec: str, base_dir: Path | None = None) -> str:
    """``spec`` with a file target made absolute (relative to ``base_dir`` or the cwd)."""
    if not is_import_spec(spec):
        return spec
    target, attr = _split(spec)
    if not _is_file_target(target):
        return spec
    return f"{_absolute(target, base_dir)}:{attr}"


def canonical_model_spec(spec: str, base_dir: Path | None = None) -> str:
    """A model spec that works from any cwd: zoo names unchanged, a file path made absolute."""
    return canonical_import_spec(spec, base_dir)


def _brief(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _file_module_name(path: str) -> str:
    stem = re.sub(r"\W", "_", Path(path).stem) or "module"
    digest = hashlib.sha1(path.encode("utf-8")).hexdigest()[:12]
    return f"_distillkit_user_{stem}_{digest}"


def _load_file(target: str, kind: str) -> ModuleType:
    path = _absolute(target, None)
    if not path.endswith(".py"):
        raise ValueError(f"{kind} file {path} must be a .py file (or use package.module:Name)")
    if not Path(path).is_file():
        raise ValueError(f"{kind} file not found: {path}")
    name = _file_module_name(path)
    if name in sys.modules:
        # loaded before in this process: reuse it so its classes keep one identity
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ValueError(f"cannot load {kind} file {path}")
    module = importlib.util.module_from_spec(spec)
    # registered before running it, as the import system does (dataclasses and pickle need it)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(name, None)
        raise ValueError(f"cannot load {kind} file {path} ({_brief(exc)})") from exc
    return module


def _load_module(target: str, kind: str) -> ModuleType:
    if not _is_dotted(target):
        raise ValueError(
            f"{kind} {target!r} is neither a path to a .py file nor a module name (package.module)"
        )
    try:
        return importlib.import_module(target)
    except Exception as exc:
        raise ValueError(
            f"cannot import {kind} module {target!r} ({_brief(exc)}); is it installed or on "
            "PYTHONPATH?"
        ) from exc


def _candidates(module: ModuleType) -> str:
    names = sorted(
        name
        for name, obj in vars(module).items()
        if not name.startswith("_")
        and (inspect.isclass(obj) or inspect.isfunction(obj))
        and getattr(obj, "__module__", None) == module.__name__
    )
    if not names:
        return ""
    more = f", ... ({len(names) - _MAX_CANDIDATES} more)" if len(names) > _MAX_CANDIDATES else ""
    return f"; it defines {', '.join(names[:_MAX_CANDIDATES])}{more}"


def resolve_import_spec(spec: str, kind: str = "model") -> Any:
    """The object ``spec`` (``file.py:Name`` or ``module:Name``) names; ValueError if it cannot."""
    if not is_import_spec(spec):
        raise ValueError(f"{kind} {spec!r} is not of the form path/to/file.py:Name or module:Name")
    target, attr = _split(spec)
    module = _load_file(target, kind) if _is_file_target(target) else _load_module(target, kind)
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ValueError(
                f"{kind} {spec!r}: {target} has no attribute {attr!r}{_candidates(module)}"
            ) from None
    return obj


def call_accepting(
    fn: Any, offered: Mapping[str, Any], user: Mapping[str, Any], what: str, user_key: str
) -> Any:
    """Call ``fn`` with the ``offered`` arguments it accepts plus every ``user`` argument.

    An argument in ``user`` that ``fn`` does not take, or a required argument nobody supplies,
    is a one-line ValueError naming it (``user_key`` says where the user sets such arguments).
    """
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        params = None  # no introspectable signature: pass everything and let the call decide
    if params is None:
        return fn(**offered, **user)
    by_kw = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    accepted = [p.name for p in params if p.kind in by_kw]
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
    for key in user:
        if key not in accepted and not var_kw:
            raise ValueError(
                f"{what} takes no argument {key!r} (from {user_key}); it accepts: "
                f"{', '.join(accepted) or 'no keyword arguments'}"
            )
    args = {k: v for k, v in offered.items() if var_kw or k in accepted}
    args.update(user)
    for p in params:
        if p.default is not inspect.Parameter.empty:
            continue
        if p.kind is inspect.Parameter.POSITIONAL_ONLY:
            raise ValueError(f"{what} has a required positional-only argument {p.name!r}")
        if p.kind in by_kw and p.name not in args:
            raise ValueError(
                f"{what} needs argument {p.name!r}, which distillkit does not supply; "
                f"set it in {user_key}"
            )
    return fn(**args)


def build_external_model(
    spec: str, in_channels: int = 3, num_classes: int = 10, **kwargs: Any
) -> nn.Module:
    """Build the model class or factory ``spec`` names, passing only the arguments it accepts."""
    obj = resolve_import_spec(spec, "model")
    if isinstance(obj, nn.Module):
        raise ValueError(
            f"model {spec!r} is an nn.Module instance; give its class or a factory function"
        )
    if not callable(obj):
        raise ValueError(
            f"model {spec!r} is a {type(obj).__name__}, not an nn.Module class or a factory "
            "function"
        )
    offered: dict[str, Any] = {"in_channels": in_channels, "num_classes": num_classes}
    image_size = kwargs.pop("image_size", None)
    if image_size is not None:
        offered["image_size"] = image_size
    model = call_accepting(obj, offered, kwargs, f"model {spec!r}", "model_kwargs")
    if not isinstance(model, nn.Module):
        raise ValueError(
            f"model factory {spec!r} returned {type(model).__name__}, not an nn.Module"
        )
    return model
