"""Capture intermediate activations of any ``nn.Module`` with forward hooks."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

_MAX_LISTED = 20


def _resolve(model: nn.Module, name: str) -> nn.Module:
    """Return ``model.get_submodule(name)`` with a helpful error on failure."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        available = [n for n, _ in model.named_modules() if n]
        close = difflib.get_close_matches(name, available, n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        # prefer shallow names: they are what users usually mean and keep the message short
        shallow = sorted(available, key=lambda n: (n.count("."), available.index(n)))
        listed = ", ".join(shallow[:_MAX_LISTED])
        more = f", ... ({len(shallow) - _MAX_LISTED} more)" if len(shallow) > _MAX_LISTED else ""
        raise ValueError(
            f"module {name!r} not found in {type(model).__name__}.{hint} "
            f"Available modules: {listed}{more}"
        ) from None


class FeatureHooks:
    """Record the outputs of named submodules on every forward pass.

    Use as ``with FeatureHooks(model, ["layer2"]) as hooks: model(x)`` and read
    ``hooks.features["layer2"]``.  Outputs keep their autograd graph unless
    ``detach=True``, so they can be used in distillation losses.
    """

    def __init__(self, model: nn.Module, names: Iterable[str], detach: bool = False) -> None:
        self.names: list[str] = list(names)
        self.detach = detach
        self.features: dict[str, Any] = {}
        modules = [_resolve(model, name) for name in self.names]
        self._handles = [
            module.register_forward_hook(self._make_hook(name))
            for name, module in zip(self.names, modules)
        ]

    def _make_hook(self, name: str):
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if self.detach and isinstance(output, torch.Tensor):
                output = output.detach()
            self.features[name] = output

        return hook

    def clear(self) -> None:
        """Forget the features recorded so far."""
        self.features.clear()

    def remove(self) -> None:
        """Remove the hooks from the model (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> FeatureHooks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __getitem__(self, name: str) -> Any:
        return self.features[name]


def penultimate_features(
    model: nn.Module, x: torch.Tensor, module_name: str = "classifier"
) -> torch.Tensor:
    """Run ``model(x)`` and return the input of ``module_name`` (the penultimate features)."""
    module = _resolve(model, module_name)
    captured: dict[str, torch.Tensor] = {}

    def pre_hook(mod: nn.Module, args: tuple[Any, ...]) -> None:
        captured["x"] = args[0]

    handle = module.register_forward_pre_hook(pre_hook)
    try:
        model(x)
    finally:
        handle.remove()
    if "x" not in captured:
        raise RuntimeError(f"module {module_name!r} was not called during the forward pass")
    return captured["x"]


def feature_shapes(
    model: nn.Module,
    names: Sequence[str],
    input_shape: Sequence[int],
) -> dict[str, torch.Size]:
    """Return the output shapes of ``names`` for one dummy sample of ``input_shape`` (no batch dim).

    The model runs once in eval mode without gradients; its training flag is
    restored afterwards.  Returned sizes include a leading batch dimension of 1.
    """
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    dummy = torch.zeros(1, *input_shape, device=device, dtype=dtype)
    was_training = model.training
    model.eval()
    try:
        with FeatureHooks(model, names, detach=True) as hooks, torch.no_grad():
            model(dummy)
    finally:
        model.train(was_training)
    shapes: dict[str, torch.Size] = {}
    for name in names:
        if name not in hooks.features:
            raise RuntimeError(f"module {name!r} was not called during the forward pass")
        out = hooks.features[name]
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"module {name!r} returned {type(out).__name__}, not a tensor")
        shapes[name] = out.shape
    return shapes
