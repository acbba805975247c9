"""Process set-up: device choice, seeding, the global RNG states a resume restores, and the
choices that make a training step fast (memory format, folded teacher BN, teacher cache)."""

from __future__ import annotations

import copy
import os
import random
from collections import Counter
from typing import Any

import numpy as np
import torch
from torch import nn

from distillkit.errors import ConfigError


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """'auto' picks cuda (this rank's GPU), then mps, then cpu; explicit names are checked."""
    if name == "auto" and not torch.cuda.is_available():
        mps = getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()
        return torch.device("mps" if mps else "cpu")
    try:
        device = torch.device("cuda" if name == "auto" else name)
    except RuntimeError as exc:
        raise ValueError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                "device 'cuda' was asked for but CUDA is not available; use device=auto or cpu"
            )
        if device.index is None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device 'mps' was asked for but MPS is not available")
    return device


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed python, numpy and torch; optionally ask torch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def rng_state() -> dict[str, Any]:
    """Every global RNG state (dropout and friends draw from these)."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of rng_state."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- speed: memory format, frozen-teacher folding, teacher cache policy ---------------------------


def convolutional(module: nn.Module) -> bool:
    """True when most of a module's parameters are 4-D convolution kernels."""
    total = sum(p.numel() for p in module.parameters())
    conv = sum(p.numel() for p in module.parameters() if p.dim() == 4)
    return total > 0 and 2 * conv > total


# the autocast dtype of each amp mode (None: no autocast)
AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def native_bf16(device: torch.device) -> bool:
    """Whether `device` does bfloat16 math in hardware (CUDA sm_80+, or a CPU with AVX512-BF16/AMX)."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return bool(
            torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
        )
    return False


def resolve_amp(setting: str, device: torch.device) -> str:
    """The autocast mode a run trains in: `setting` none/bf16/fp16 as given, or auto.

    auto: bf16 where the device does bf16 math natively (on one 2-core AVX512-BF16 CPU a
    resnet20 step ran 1.68x and a resnet8 -> cnn_small KD step 1.54x faster than float32;
    weights, optimizer state and losses stay float32), none elsewhere.
    """
    if setting != "auto":
        return setting
    return "bf16" if native_bf16(device) else "none"


def use_channels_last(
    setting: bool | str, module: nn.Module, device: torch.device, amp: str
) -> bool:
    """Whether `module` should train (or answer) in channels_last: `setting` true/false, or auto.

    auto: convolutional models on the CPU (oneDNN: 1.37x for cnn_small and resnet8 training steps
    on one thread), and on CUDA under bf16/fp16 autocast (tensor-core convolutions take NHWC);
    never for MLPs and transformers, nor on other devices.
    """
    if isinstance(setting, bool):
        return setting
    if not convolutional(module):
        return False
    return device.type == "cpu" or (device.type == "cuda" and amp != "none")


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def fold_frozen_batchnorm(model: nn.Module) -> int:
    """Fold every eval-mode BatchNorm2d that only reads a Conv2d's output into that conv.

    For a frozen model (eval mode, no parameter requiring grad) the result is the same function
    with one pass over the activations less per BN. The module tree stays as it is (a folded BN
    becomes nn.Identity), so hooks on blocks keep working; a conv or BN that carries a hook, is
    called twice, or is shared is left alone, and so is a model torch.fx cannot trace. Returns
    the number of BNs folded.
    """
    trainable = model.training or any(p.requires_grad for p in model.parameters())
    if trainable or not any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
        return 0
    from torch.fx import symbolic_trace
    from torch.nn.utils.fusion import fuse_conv_bn_weights

    # trace a copy: tracing runs forward with proxies, and a forward with side effects on its
    # module (counters, cached features) must not see them
    try:
        probe = copy.deepcopy(model)
        for m in probe.modules():
            m._forward_hooks.clear()
            m._forward_pre_hooks.clear()
        graph = symbolic_trace(probe).graph
    except Exception:  # noqa: BLE001 - a model torch.fx cannot copy or trace runs as it is
        return 0
    modules = dict(model.named_modules())
    occurrences = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
    folded = 0
    for node in graph.nodes:
        bn = modules.get(node.target) if node.op == "call_module" else None
        if type(bn) is not nn.BatchNorm2d or bn.training or bn.running_mean is None:
            continue
        if len(node.args) != 1 or node.kwargs:
            continue
        src = node.args[0]
        conv = modules.get(src.target) if getattr(src, "op", None) == "call_module" else None
        if type(conv) is not nn.Conv2d or len(src.users) != 1:
            continue
        if calls[node.target] != 1 or calls[src.target] != 1 or _hooked(bn) or _hooked(conv):
            continue
        if occurrences[id(bn)] != 1 or occurrences[id(conv)] != 1:
            continue
        conv.weight, conv.bias = fuse_conv_bn_weights(
            conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias
        )
        parent_name, _, child = node.target.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, child, nn.Identity())
        folded += 1
    return folded


# auto caches only what comfortably fits beside the run: n x classes float32 answers (ImageNet's
# 1.28M x 1000 would be 5 GB on disk and in memory, which nobody should get without asking)
AUTO_CACHE_BYTES = 1 << 30


def teacher_cache_enabled(cfg: Any, method_caches: bool, entries: int | None = None) -> bool:
    """Whether a run caches its teacher's answers per training sample (config key teacher_cache).

    auto: yes when the inputs are deterministic (augment=false), the method asks its teacher
    about training samples by index only (`method_caches`) and the cache (`entries` float32
    values, when known) fits in AUTO_CACHE_BYTES: the teacher then runs once per image, not once
    per epoch. true insists (a ConfigError where it cannot hold), false never caches.
    """
    setting = cfg.teacher_cache
    if setting == "auto":
        fits = entries is None or 4 * entries <= AUTO_CACHE_BYTES
        return method_caches and not cfg.augment and fits
    if not setting:
        return False
    if not method_caches:
        raise ConfigError(
            f"config key 'teacher_cache': method '{cfg.method}' cannot use cached teacher "
            "outputs; set teacher_cache=false"
        )
    if cfg.augment:
        raise ConfigError("teacher_cache needs augment=false: cached outputs are keyed by sample")
    return True
