"""Quality of frozen features without training them: weighted k-NN and a linear probe.

Pure functions on tensors (and dataset splits), used by the self-supervised methods to
evaluate their EMA teachers; `engine/evaluation.py` re-exports them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from distillkit.data.datasets import Split
from distillkit.data.transforms import normalize


@torch.no_grad()
def extract_features(
    backbone: nn.Module,
    images: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device,
    batch_size: int = 512,
) -> torch.Tensor:
    """Embeddings (N, D) of uint8 images (N, C, H, W) with the backbone in eval mode."""
    was = backbone.training
    backbone.eval()
    feats = []
    for start in range(0, len(images), batch_size):
        x = images[start : start + batch_size].to(device).float().div_(255.0)
        out = backbone(normalize(x, mean, std))
        emb = out[0] if isinstance(out, tuple) else out
        feats.append(emb.float().cpu())
    backbone.train(was)
    return torch.cat(feats) if feats else torch.zeros(0, 0)


@torch.no_grad()
def knn_predict(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> torch.Tensor:
    """Weighted k-NN (DINO): cosine similarity, the k nearest vote with weight exp(sim / T)."""
    train = F.normalize(train_features.float(), dim=1)
    test = F.normalize(test_features.float(), dim=1)
    k = min(k, train.shape[0])
    preds = []
    for start in range(0, test.shape[0], chunk):
        sim = test[start : start + chunk] @ train.T
        top, idx = sim.topk(k, dim=1)
        weights = (top / temperature).exp()
        votes = torch.zeros(sim.shape[0], num_classes, dtype=weights.dtype)
        votes.scatter_add_(1, train_labels[idx], weights)
        preds.append(votes.argmax(1))
    return torch.cat(preds)


def knn_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
) -> float:
    """Top-1 accuracy (%) of the weighted k-NN classifier."""
    pred = knn_predict(train_features, train_labels, test_features, num_classes, k, temperature)
    return 100.0 * (pred == test_labels).double().mean().item()


def fit_linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    num_classes: int,
    steps: int = 100,
    l2: float = 1e-4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight (K, D), bias (K,)) in float64 of a logistic regression on the raw features.

    Fitted on standardised features (full-batch L-BFGS from zero weights: deterministic, free of
    learning-rate tuning); the standardisation is folded into the returned weights, so
    `features @ weight.T + bias` are the probe's logits and the probe can be a model's classifier.
    """
    x = train_features.double()
    mu, sd = x.mean(0, keepdim=True), x.std(0, keepdim=True).clamp_min(1e-6)
    x = (x - mu) / sd
    w = torch.zeros(x.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x @ w + b, train_labels) + l2 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        weight = (w / sd.T).T.contiguous()
        bias = b - (mu / sd) @ w
    return weight.detach(), bias.reshape(-1).detach()


def linear_probe_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    steps: int = 100,
    l2: float = 1e-4,
) -> float:
    """Test accuracy (%) of `fit_linear_probe`'s logistic regression on frozen features."""
    weight, bias = fit_linear_probe(train_features, train_labels, num_classes, steps, l2)
    return probe_accuracy(weight, bias, test_features, test_labels)


def probe_accuracy(
    weight: torch.Tensor, bias: torch.Tensor, features: torch.Tensor, labels: torch.Tensor
) -> float:
    """Accuracy (%) of the linear classifier (weight, bias) on features."""
    pred = (features.double() @ weight.T + bias).argmax(1)
    return 100.0 * (pred == labels).double().mean().item()


def eval_subset(split: Split, limit: int | None, seed: int) -> Split:
    """The whole split, or a fixed random `limit` of it (same subset at every evaluation)."""
    if limit is None or limit >= len(split):
        return split
    idx = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))[:limit]
    return Split(split.images[idx], split.labels[idx])
