"""torch.distributed set-up and tear-down for runs started with torchrun."""

from __future__ import annotations

import gc
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistContext:
    """Where this process sits in a (possibly single-process) job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        """True under torchrun with more than zero peers."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 writes files and prints."""
        return self.rank == 0


def init_distributed(device: torch.device) -> DistContext:
    """Join the process group torchrun describes in the environment; single process otherwise."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank)


def all_reduce_sum(values: list[float], ctx: DistContext, device: torch.device) -> list[float]:
    """Sum numbers over ranks (identity for a single process)."""
    if not ctx.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def all_gather_rows(t: torch.Tensor, counts: Sequence[int], ctx: DistContext) -> torch.Tensor:
    """Every rank's first counts[rank] rows of t, concatenated in rank order (no gradient)."""
    if not ctx.enabled:
        return t[: counts[0]]
    local = t.detach()[: counts[ctx.rank]]
    # all_gather needs equal shapes: pad every rank's rows to the largest count, then trim
    padded = local.new_zeros((max(counts), *t.shape[1:]))
    padded[: len(local)] = local
    parts = [torch.empty_like(padded) for _ in range(ctx.world_size)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:c] for p, c in zip(parts, counts)])


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are those of the global batch over all ranks.

    torch's SyncBatchNorm refuses CPU tensors (and DDP refuses it on CPU modules); this computes the
    same statistics with differentiable all-reduces, so it works with gloo. Mean and variance are
    taken in two passes over the global batch; running statistics get the unbiased variance, as in
    single-process BatchNorm. Outside training, or without a process group, it is plain BatchNorm.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """Normalise with global-batch statistics in training, running statistics otherwise."""
        self._check_input_dim(input)
        syncing = self.training and dist.is_available() and dist.is_initialized()
        if not syncing or dist.get_world_size() == 1:
            return super().forward(input)
        from torch.distributed.nn.functional import all_reduce

        # statistics in float32 even under autocast, as F.batch_norm keeps them
        low = input.dtype in (torch.float16, torch.bfloat16)
        x = input.float() if low else input
        dims = [0, *range(2, input.dim())]
        shape = [1, -1] + [1] * (input.dim() - 2)
        count = torch.tensor(
            [input.numel() / max(input.shape[1], 1)], dtype=torch.float64, device=input.device
        )
        dist.all_reduce(count)
        n = float(count.item())
        # all_reduce from torch.distributed.nn sums gradients over ranks in backward, as the
        # statistics' cross-rank dependence requires
        mean = all_reduce(x.sum(dims)) / n
        centred = x - mean.reshape(shape)
        var = all_reduce((centred * centred).sum(dims)) / n
        out = centred * torch.rsqrt(var + self.eps).reshape(shape)
        if self.affine:
            out = out * self.weight.reshape(shape) + self.bias.reshape(shape)
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                if self.momentum is None:  # cumulative moving average
                    factor = 1.0 / float(self.num_batches_tracked.item())
                else:
                    factor = self.momentum
                unbiased = var * (n / (n - 1)) if n > 1 else var
                self.running_mean.mul_(1 - factor).add_(mean.detach(), alpha=factor)
                self.running_var.mul_(1 - factor).add_(unbiased.detach(), alpha=factor)
        return out.to(input.dtype) if low else out


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """BatchNorm layers to global-batch statistics: SyncBatchNorm on GPUs, GlobalBatchNorm else."""
    if device.type in ("cuda", "xpu", "hpu"):
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(
        module, GlobalBatchNorm | nn.SyncBatchNorm
    ):
        new = GlobalBatchNorm(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
        )
        ref = next((t for t in module.state_dict().values() if t.is_floating_point()), None)
        if ref is not None:
            new.to(device=ref.device, dtype=ref.dtype)
        # same parameter and buffer names as BatchNorm: checkpoints load into plain models
        new.load_state_dict(module.state_dict())
        new.train(module.training)
        if module.affine:
            new.weight.requires_grad_(module.weight.requires_grad)
            new.bias.requires_grad_(module.bias.requires_grad)
        return new
    for name, child in module.named_children():
        converted = convert_sync_batchnorm(child, device)
        if converted is not child:
            setattr(module, name, converted)
    return module


def barrier(ctx: DistContext) -> None:
    """Wait for every rank."""
    if ctx.enabled and dist.is_initialized():
        dist.barrier()


def shutdown_distributed(ctx: DistContext) -> None:
    """Leave the process group cleanly (gloo can abort at exit while a DDP module is alive)."""
    if ctx.enabled and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    gc.collect()
