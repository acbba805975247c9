"""T. stddev (Wang et al., NeurIPS 2022): a teacher-only score that ranks augmentations for KD.

With the student absent, the teacher (softmax at T = 1) sees batches of original images and their
augmented copies. Every `window_batches` batches (default 5 batches of 64 originals plus their 64
augmented copies = 640 images) give one mean probability vector; T. stddev is the mean over
classes of the unbiased standard deviation of these window means. Lower is better: a good
augmentation lowers the variance of the teacher-student cross-entropy, for which this is a proxy.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .augment import Augmentation

__all__ = [
    "TStdDevResult",
    "t_stddev",
    "t_stddev_from_windows",
    "t_stddev_on_bundle",
    "window_means",
]


@dataclass
class TStdDevResult:
    """T. stddev and what it was computed from."""

    value: float
    window_means: np.ndarray  # (n_windows, num_classes)
    n_windows: int
    images_per_window: int
    mean_entropy: float  # teacher entropy (T = 1) over every image seen, original and augmented


def t_stddev_from_windows(means: np.ndarray | torch.Tensor) -> float:
    """Mean over classes of the unbiased std across window mean-probability vectors."""
    arr = np.asarray(means, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] < 2:
        raise ValueError(
            f"T. stddev needs at least 2 windows of mean probabilities, got shape {arr.shape}; "
            "use more data, a smaller batch or more epochs"
        )
    return float(arr.std(axis=0, ddof=1).mean())


def window_means(
    prob_batches: Iterable[Sequence[torch.Tensor]], window_batches: int = 5
) -> tuple[np.ndarray, int]:
    """Group per-batch probability tensors into windows of `window_batches` batches; (means, size).

    Each item of `prob_batches` is the list of (n_i, C) probability tensors one batch contributed
    (original and augmented); a trailing partial window is dropped.
    """
    if window_batches < 1:
        raise ValueError(f"window_batches must be >= 1, got {window_batches}")
    rows, pending, size = [], [], 0
    for probs in prob_batches:
        pending.extend(p.detach().double().cpu() for p in probs)
        size += 1
        if size == window_batches:
            window = torch.cat(pending)
            rows.append(window.mean(0).numpy())
            n_images = len(window)
            pending, size = [], 0
    if not rows:
        return np.zeros((0, 0)), 0
    return np.stack(rows), n_images


def t_stddev(
    teacher: Callable[[torch.Tensor], torch.Tensor],
    batches: Iterable[torch.Tensor],
    augmentation: Augmentation,
    *,
    window_batches: int = 5,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    generator: torch.Generator | None = None,
) -> TStdDevResult:
    """T. stddev of `augmentation` for a teacher (x -> logits or log-probs) over normalized batches."""
    if augmentation.needs_student:
        raise ValueError(
            f"augmentation {augmentation!r} scores samples with the student; T. stddev is "
            "teacher-only (use criterion=teacher_entropy)"
        )
    entropy_sum, entropy_count = 0.0, 0

    def stream() -> Iterable[list[torch.Tensor]]:
        nonlocal entropy_sum, entropy_count
        for x in batches:
            with torch.no_grad():
                lp = F.log_softmax(teacher(x).float(), dim=1)
                out = augmentation.augment(x, generator, mean=mean, std=std, teacher=teacher)
                lp_aug = out.teacher_log_probs
                if lp_aug is None:
                    lp_aug = teacher(out.x)
                lp_aug = F.log_softmax(lp_aug.float(), dim=1)
            for part in (lp, lp_aug):
                entropy_sum += float(-(part.exp() * part).sum())
                entropy_count += len(part)
            yield [lp.exp(), lp_aug.exp()]

    means, n_images = window_means(stream(), window_batches)
    value = t_stddev_from_windows(means)
    return TStdDevResult(value, means, len(means), n_images, entropy_sum / max(entropy_count, 1))


def t_stddev_on_bundle(
    teacher: torch.nn.Module,
    bundle,
    augmentation: Augmentation,
    *,
    batch_size: int = 64,
    window_batches: int = 5,
    epochs: int = 1,
    seed: int = 0,
    augment: bool = True,
    device: torch.device | str = "cpu",
    indices: Sequence[int] | None = None,
) -> TStdDevResult:
    """T. stddev over `epochs` shuffled passes of a DataBundle's training split.

    Batches come from the same loader the trainer uses (standard crop/flip when `augment`), so x is
    what a student would see; the extra augmentation draws from a generator seeded by `seed`.
    """
    from .loader import BatchLoader

    teacher = teacher.to(device).eval()
    loader = BatchLoader(
        bundle.train,
        batch_size,
        mean=bundle.mean,
        std=bundle.std,
        shuffle=True,
        augment=augment,
        flip=bundle.hflip,
        seed=seed,
        drop_last=True,
        indices=indices,
        device=device,
    )
    if epochs * len(loader) < 2 * window_batches:
        raise ValueError(
            f"T. stddev needs at least {2 * window_batches} batches of {batch_size} for two windows; "
            f"the training split gives {len(loader)} per epoch: raise epochs or lower the batch size"
        )

    def batches() -> Iterable[torch.Tensor]:
        for epoch in range(epochs):
            loader.set_epoch(epoch)
            for x, _, _ in loader:
                yield x

    def teacher_fn(x: torch.Tensor) -> torch.Tensor:
        out = teacher(x)
        return out.log_probs(bundle.num_classes) if hasattr(out, "log_probs") else out

    gen = torch.Generator().manual_seed(int(seed))
    return t_stddev(
        teacher_fn,
        batches(),
        augmentation,
        window_batches=window_batches,
        mean=bundle.mean,
        std=bundle.std,
        generator=gen,
    )
