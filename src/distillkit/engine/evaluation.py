"""Evaluation: test accuracy of a classifier, and k-NN / linear-probe accuracy of frozen features.

The k-NN and linear-probe evaluators live with the self-supervised methods that use them
(`methods/ssl_eval.py`, below the engine) and are re-exported here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from distillkit.data.datasets import DataBundle, Split
from distillkit.data.transforms import normalize, to_float
from distillkit.engine.distributed import DistContext, all_reduce_sum
from distillkit.methods.ssl_eval import (
    eval_subset,
    extract_features,
    fit_linear_probe,
    knn_accuracy,
    knn_predict,
    linear_probe_accuracy,
    probe_accuracy,
)

__all__ = [
    "eval_subset",
    "evaluate",
    "extract_features",
    "fit_linear_probe",
    "knn_accuracy",
    "knn_predict",
    "linear_probe_accuracy",
    "probe_accuracy",
]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    split: Split,
    bundle: DataBundle,
    device: torch.device,
    batch_size: int = 512,
    ctx: DistContext | None = None,
) -> dict[str, float]:
    """Accuracy and mean cross-entropy of `model` on `split`, sharded and summed over ranks.

    No autocast: a run records the accuracy that export, evaluate and profile give."""
    ctx = ctx or DistContext()
    was_training = model.training
    model.eval()
    order = torch.arange(ctx.rank, len(split), ctx.world_size)
    correct = loss_sum = 0.0
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        x = normalize(to_float(split.images[idx].to(device)), bundle.mean, bundle.std)
        y = split.labels[idx].to(device)
        logits = model(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
    correct, loss_sum, count = all_reduce_sum([correct, loss_sum, float(len(order))], ctx, device)
    model.train(was_training)
    return {"acc": 100.0 * correct / max(count, 1.0), "loss": loss_sum / max(count, 1.0)}
