"""Deterministic in-memory batch loader that shards each global batch over data-parallel ranks.

The shuffled order and every per-sample augmentation draw depend only on (seed, epoch) and a sample's
position in the global batch: rank r of N gets its contiguous slice of each global batch of
N * batch_size samples, with the crop and flip the sample would get in a single-process run.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Iterator, Sequence

import torch

from .datasets import DataBundle, Split
from .transforms import BatchShard, apply_crop_flip, draw_crop_flip, split_counts, to_float

__all__ = ["BatchLoader", "derive_seed", "make_loaders"]

_SHUFFLE_STREAM = 0
_AUGMENT_STREAM = 1


def derive_seed(*parts: int) -> int:
    """Hash integers into a 63-bit seed (stable across runs, platforms and processes)."""
    data = struct.pack(f"<{len(parts)}q", *parts)
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 1


class BatchLoader:
    """Iterate (x, y, idx) batches of a Split; all randomness comes from (seed, epoch).

    `batch_size` is per rank: the global batch is world_size * batch_size samples of the shuffled
    order, split into contiguous slices (see `shard`). A last global batch smaller than that is
    split as evenly as possible (earlier ranks get one more); a rank left with no sample gets one
    padding row, a copy of the batch's last sample, which `shard_counts` gives weight 0.
    """

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
        memory_format: torch.memory_format = torch.contiguous_format,
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
        self.memory_format = memory_format  # layout of the yielded batches (channels_last or not)
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
    def global_batch_size(self) -> int:
        """Samples per step over all ranks."""
        return self.batch_size * self.world_size

    @property
    def num_samples(self) -> int:
        """The set's size per rank: n / world_size, rounded down with drop_last, else up."""
        n = len(self.base_indices)
        return n // self.world_size if self.drop_last else math.ceil(n / self.world_size)

    def _global_order(self) -> torch.Tensor:
        """The current epoch's sample indices in single-process batch order."""
        idx = self.base_indices
        if self.shuffle:
            g = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch, _SHUFFLE_STREAM))
            idx = idx[torch.randperm(len(idx), generator=g)]
        return idx

    def shard_counts(self, step: int) -> tuple[int, ...]:
        """Real samples each rank holds at `step`; they sum to the global batch's size."""
        if not 0 <= step < len(self):
            raise IndexError(f"step {step} out of range for {len(self)} steps")
        g = self.global_batch_size
        return split_counts(min(g, len(self.base_indices) - step * g), self.world_size)

    def shard(self, step: int) -> BatchShard:
        """Where this rank's rows of `step` sit in the global batch (no gather attached)."""
        return BatchShard.from_counts(self.shard_counts(step), self.rank)

    def __len__(self) -> int:
        """Number of batches (steps) per epoch, the same on every rank."""
        n, g = len(self.base_indices), self.global_batch_size
        return n // g if self.drop_last else math.ceil(n / g)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Yield (x normalized float32, y int64, idx int64 on CPU) for the current epoch."""
        order = self._global_order()
        g = self.global_batch_size
        shards = [self.shard(step) for step in range(len(self))]
        rows = [order[step * g + shard.positions] for step, shard in enumerate(shards)]
        crops = None
        if self.augment and rows:
            # one stream for the global batch, seeded as rank 0's used to be: every rank draws all
            # samples' crops and flips and keeps its own rows; single-process runs are unchanged.
            # The draws are made step by step, in the order a lazy loop would make them.
            gen = torch.Generator().manual_seed(
                derive_seed(self.seed, self.epoch, _AUGMENT_STREAM, 0)
            )
            draws = [draw_crop_flip(s.total, self.padding, self.flip, gen) for s in shards]
            if draws[0] is not None:
                offsets = torch.cat([o[:, s.positions] for (o, _), s in zip(draws, shards)], 1)
                coins = torch.cat([c[s.positions] for (_, c), s in zip(draws, shards)])
                crops = (self._to_device(offsets), self._to_device(coins))
        # the epoch's indices and draws reach the device in one transfer each, not one per step
        flat = torch.cat(rows) if rows else order[:0]
        flat_dev = self._to_device(flat)
        start = 0
        for idx in rows:
            end = start + len(idx)
            sel = flat_dev[start:end]
            x = to_float(self.images[sel])
            if crops is not None:
                x = apply_crop_flip(x, self.padding, crops[0][:, start:end], crops[1][start:end])
            # x is this step's own tensor: normalise in place, then lay it out as the model wants
            x = x.sub_(self._mean).mul_(self._inv_std).contiguous(memory_format=self.memory_format)
            yield x, self.labels[sel], idx
            start = end

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        if self.device.type != "cuda":
            return t.to(self.device)
        # pinned host memory lets the copy run asynchronously with the step before it
        return t.pin_memory().to(self.device, non_blocking=True)


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
