"""Deterministic in-memory batch loader with DistributedSampler-style sharding."""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Iterator, Sequence

import torch

from .datasets import DataBundle, Split
from .transforms import random_crop_flip, to_float

__all__ = ["BatchLoader", "derive_seed", "make_loaders"]

_SHUFFLE_STREAM = 0
_AUGMENT_STREAM = 1


def derive_seed(*parts: int) -> int:
    """Hash integers into a 63-bit seed (stable across runs, platforms and processes)."""
    data = struct.pack(f"<{len(parts)}q", *parts)
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 1


class BatchLoader:
    """Iterate (x, y, idx) batches of a Split; all randomness comes from (seed, epoch[, rank])."""

    def __init__(
        self,
        split: Split,
        batch_size: int,
        *,
        mean: Sequence[float],
        std: Sequence[float],
        shuffle: bool,
        augment: bool,
        padding: int | None = None,
        flip: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        indices: Sequence[int] | torch.Tensor | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}"
            )
        n = len(split)
        if indices is None:
            base = torch.arange(n, dtype=torch.int64)
        else:
            base = torch.as_tensor(indices, dtype=torch.int64).reshape(-1).clone()
            if len(base) and (int(base.min()) < 0 or int(base.max()) >= n):
                raise ValueError(
                    f"indices must lie in [0, {n}), got range [{int(base.min())}, {int(base.max())}]"
                )
        if len(mean) != split.images.shape[1] or len(std) != split.images.shape[1]:
            raise ValueError(
                f"mean/std need {split.images.shape[1]} entries, got {len(mean)}/{len(std)}"
            )

        self.device = torch.device(device)
        # The whole uint8 split is moved once; per-batch work is then an index + transform on device.
        self.images = split.images.to(self.device)
        self.labels = split.labels.to(self.device)
        self.base_indices = base
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = augment
        h = int(split.images.shape[-2])
        self.padding = max(1, h // 8) if padding is None else padding
        self.flip = flip
        self.seed = seed
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self._mean = torch.tensor(mean, dtype=torch.float32, device=self.device).reshape(
            1, -1, 1, 1
        )
        self._inv_std = 1.0 / torch.tensor(std, dtype=torch.float32, device=self.device).reshape(
            1, -1, 1, 1
        )

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose shuffle and augmentation are produced next."""
        self.epoch = int(epoch)

    @property
    def num_samples(self) -> int:
        """Samples this rank sees per epoch (after padding/truncation to world_size)."""
        n = len(self.base_indices)
        if self.drop_last:
            return n // self.world_size
        return math.ceil(n / self.world_size)

    def epoch_indices(self) -> torch.Tensor:
        """This rank's sample indices (into the split) for the current epoch, in batch order."""
        idx = self.base_indices
        if self.shuffle:
            g = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch, _SHUFFLE_STREAM))
            idx = idx[torch.randperm(len(idx), generator=g)]
        total = self.num_samples * self.world_size
        if total > len(idx):
            # Wrap around (repeatedly if the set is tiny) like torch's DistributedSampler.
            reps = math.ceil(total / max(len(idx), 1))
            idx = idx.repeat(reps)
        idx = idx[:total]
        return idx[self.rank : total : self.world_size]

    def __len__(self) -> int:
        """Number of batches per epoch for this rank."""
        if self.drop_last:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Yield (x normalized float32, y int64, idx int64 on CPU) for the current epoch."""
        idx_cpu = self.epoch_indices()
        idx_dev = idx_cpu.to(self.device)
        gen = None
        if self.augment:
            gen = torch.Generator().manual_seed(
                derive_seed(self.seed, self.epoch, _AUGMENT_STREAM, self.rank)
            )
        for i in range(len(self)):
            sl = slice(i * self.batch_size, (i + 1) * self.batch_size)
            bi = idx_dev[sl]
            x = to_float(self.images[bi])
            if gen is not None:
                x = random_crop_flip(x, self.padding, self.flip, gen)
            x = (x - self._mean) * self._inv_std
            yield x, self.labels[bi], idx_cpu[sl]


def make_loaders(
    bundle: DataBundle,
    batch_size: int,
    *,
    seed: int,
    augment: bool = True,
    rank: int = 0,
    world_size: int = 1,
    indices: Sequence[int] | torch.Tensor | None = None,
    device: torch.device | str = "cpu",
    eval_batch_size: int | None = None,
    drop_last: bool = False,
    shard_eval: bool = False,
) -> tuple[BatchLoader, BatchLoader]:
    """Build (train, test) loaders; the test loader never shuffles or augments."""
    train = BatchLoader(
        bundle.train,
        batch_size,
        mean=bundle.mean,
        std=bundle.std,
        shuffle=True,
        augment=augment,
        flip=bundle.hflip,
        seed=seed,
        drop_last=drop_last,
        rank=rank,
        world_size=world_size,
        indices=indices,
        device=device,
    )
    test = BatchLoader(
        bundle.test,
        eval_batch_size or batch_size,
        mean=bundle.mean,
        std=bundle.std,
        shuffle=False,
        augment=False,
        seed=seed,
        rank=rank if shard_eval else 0,
        world_size=world_size if shard_eval else 1,
        device=device,
    )
    return train, test
