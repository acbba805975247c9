"""Batched, vectorised image transforms with per-sample randomness, and global-batch sharding.

Random transforms draw one value per sample of the batch they are given. Under data parallelism a
process holds only its slice of the global batch; the trainer then sets a `BatchShard` (see
`use_shard`) and the transforms draw for the whole global batch and keep this process's rows, so a
sample gets the same crop, flip, hole, partner or policy whether 1 or N processes train.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "POLICY_OPS",
    "BatchShard",
    "CutMixResult",
    "MixupResult",
    "apply_crop_flip",
    "current_shard",
    "cutmix_batch",
    "derangement",
    "draw_crop_flip",
    "draw_size",
    "mixup_batch",
    "normalize",
    "random_crop_flip",
    "shard_for",
    "split_counts",
    "take_rows",
    "to_float",
    "use_shard",
]


def to_float(images: torch.Tensor) -> torch.Tensor:
    """Convert uint8 images to float32 in [0, 1] (float input is returned as float32)."""
    if images.dtype == torch.uint8:
        return images.to(torch.float32).div_(255.0)
    return images.to(torch.float32)


def normalize(
    x: torch.Tensor,
    mean: Sequence[float] | torch.Tensor,
    std: Sequence[float] | torch.Tensor,
) -> torch.Tensor:
    """Per-channel `(x - mean) / std` for x of shape (B, C, H, W)."""
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)
    return (x - m) / s


# --------------------------------------------------------------------------- global-batch shards


def split_counts(n: int, parts: int) -> tuple[int, ...]:
    """Split n rows into `parts` contiguous runs; the first n % parts runs get one row more."""
    if parts < 1 or n < 0:
        raise ValueError(f"need n >= 0 and parts >= 1, got n={n}, parts={parts}")
    return tuple(n // parts + (1 if r < n % parts else 0) for r in range(parts))


@dataclass(frozen=True)
class BatchShard:
    """This process's rows of one global batch: local row i is global row `positions[i]`.

    Rank r holds the contiguous run of counts[r] rows after those of ranks 0..r-1. A rank whose run
    is empty holds one padding row, a copy of the batch's last sample, that carries no weight.
    `gather` concatenates every rank's real rows (first dimension) in rank order: one collective,
    so every rank must call it at the same point.
    """

    positions: torch.Tensor
    counts: tuple[int, ...]
    rank: int = 0
    gather: Callable[[torch.Tensor], torch.Tensor] | None = None

    @classmethod
    def from_counts(cls, counts: Sequence[int], rank: int) -> BatchShard:
        """The shard of `rank` when rank r holds counts[r] rows of the global batch."""
        counts = tuple(int(c) for c in counts)
        total, start = sum(counts), sum(counts[:rank])
        if total < 1 or not 0 <= rank < len(counts):
            raise ValueError(f"bad shard: counts={counts}, rank={rank}")
        if counts[rank]:
            positions = torch.arange(start, start + counts[rank])
        else:
            positions = torch.tensor([total - 1])
        return cls(positions, counts, rank)

    @property
    def total(self) -> int:
        """Rows of the global batch."""
        return sum(self.counts)

    @property
    def real(self) -> int:
        """Rows of this process that are samples (0 when it holds only a padding row)."""
        return self.counts[self.rank]

    def gather_all(self, t: torch.Tensor) -> torch.Tensor:
        """The global batch's rows of a per-sample tensor (no gradient flows back through it)."""
        if self.gather is None:
            if len(self.counts) == 1:
                return t
            raise ValueError("this op mixes samples across processes: the BatchShard needs gather")
        return self.gather(t)

    def part_of(self, n: int) -> slice:
        """This rank's rows of an n-row per-batch list: like the batch when n = total, else even."""
        counts = self.counts if n == self.total else split_counts(n, len(self.counts))
        start = sum(counts[: self.rank])
        return slice(start, start + counts[self.rank])


_SHARD: contextvars.ContextVar[BatchShard | None] = contextvars.ContextVar("shard", default=None)


@contextlib.contextmanager
def use_shard(shard: BatchShard | None) -> Iterator[None]:
    """Within the block, random transforms treat batches of len(shard.positions) rows as shards."""
    token = _SHARD.set(shard)
    try:
        yield
    finally:
        _SHARD.reset(token)


def current_shard() -> BatchShard | None:
    """The shard `use_shard` set, if any."""
    return _SHARD.get()


def shard_for(x: torch.Tensor) -> BatchShard | None:
    """The current shard when x is this process's slice of the global batch, else None."""
    shard = _SHARD.get()
    if shard is None or x.shape[0] != len(shard.positions):
        return None
    return shard


# --------------------------------------------------------------------------- randomness helpers


def _gen_device(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def _rand(shape: Sequence[int], generator: torch.Generator | None) -> torch.Tensor:
    return torch.rand(tuple(shape), generator=generator, device=_gen_device(generator))


def _randint(high: int, shape: Sequence[int], generator: torch.Generator | None) -> torch.Tensor:
    return torch.randint(0, high, tuple(shape), generator=generator, device=_gen_device(generator))


def _beta(a: float, b: float, n: int, generator: torch.Generator | None) -> torch.Tensor:
    """Beta(a, b) samples via two Gamma draws; torch's Beta sampler takes no generator."""
    dev = _gen_device(generator)
    ga = torch._standard_gamma(torch.full((n,), float(a), device=dev), generator=generator)
    gb = torch._standard_gamma(torch.full((n,), float(b), device=dev), generator=generator)
    total = ga + gb
    # both gammas can underflow to 0 for tiny alpha; fall back to a fair coin then
    lam = torch.where(
        total > 0, ga / total.clamp_min(1e-30), (_rand((n,), generator) < 0.5).float()
    )
    return lam.clamp(0.0, 1.0)


def derangement(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A random permutation of range(n) with no fixed points (identity when n < 2)."""
    if n < 2:
        return torch.arange(n)
    order = torch.randperm(n, generator=generator, device=_gen_device(generator)).cpu()
    # following one random cycle through all samples: everyone gets a partner other than itself
    perm = torch.empty(n, dtype=torch.long)
    perm[order] = order.roll(-1)
    return perm


# --------------------------------------------------------------------------- crop and flip


def draw_crop_flip(
    n: int, padding: int, flip: bool, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per-sample (2, n) window offsets and (n,) mirror coins; None when there is nothing to draw."""
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    if n == 0 or (padding == 0 and not flip):
        return None
    # Draw on the generator's device (usually CPU) so results do not depend on where x lives.
    gdev = generator.device
    offsets = torch.randint(0, 2 * padding + 1, (2, n), generator=generator, device=gdev)
    coins = (
        torch.randint(0, 2, (n,), generator=generator, device=gdev).bool()
        if flip
        else torch.zeros(n, dtype=torch.bool, device=gdev)
    )
    return offsets, coins


def apply_crop_flip(
    x: torch.Tensor, padding: int, offsets: torch.Tensor, coins: torch.Tensor
) -> torch.Tensor:
    """Zero-pad by `padding`, take each sample's window at `offsets` and mirror where `coins`."""
    if x.dim() != 4:
        raise ValueError(f"expected (B, C, H, W), got shape {tuple(x.shape)}")
    b, c, h, w = x.shape
    if b == 0:
        return x
    offsets, coins = offsets.to(x.device), coins.to(x.device)
    pw = w + 2 * padding
    rows = offsets[0, :, None] + torch.arange(h, device=x.device)  # (B, H)
    cols = torch.arange(w, device=x.device).expand(b, w)
    cols = torch.where(coins[:, None], (w - 1) - cols, cols) + offsets[1, :, None]  # (B, W)
    # One flat gather over the padded image keeps the output contiguous in (B, C, H, W)
    # and avoids a Python loop over samples.
    flat = (rows[:, :, None] * pw + cols[:, None, :]).reshape(b, 1, h * w).expand(b, c, h * w)
    padded = F.pad(x, (padding,) * 4) if padding else x
    return padded.reshape(b, c, -1).gather(2, flat).reshape(b, c, h, w)


def random_crop_flip(
    x: torch.Tensor,
    padding: int,
    flip: bool,
    generator: torch.Generator,
) -> torch.Tensor:
    """Zero-pad by `padding`, take a random HxW window and maybe mirror it, independently per sample.

    Under a `BatchShard` the windows and coins are drawn for the global batch (this process keeps
    its rows), so the draws depend only on the generator and a sample's global position.
    """
    if x.dim() != 4:
        raise ValueError(f"expected (B, C, H, W), got shape {tuple(x.shape)}")
    shard = shard_for(x)
    params = draw_crop_flip(shard.total if shard else x.shape[0], padding, flip, generator)
    if params is None:
        return x
    offsets, coins = params
    if shard is not None:
        pos = shard.positions.to(offsets.device)
        offsets, coins = offsets[:, pos], coins[pos]
    return apply_crop_flip(x, padding, offsets, coins)


def take_rows(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-sample draws v for the global batch, restricted to x's rows when x is a shard."""
    shard = shard_for(x)
    return v if shard is None else v[shard.positions.to(v.device)]


def draw_size(x: torch.Tensor) -> int:
    """How many samples to draw for: the global batch when x is a shard, else len(x)."""
    shard = shard_for(x)
    return x.shape[0] if shard is None else shard.total


# --------------------------------------------------------------------------- mixing ops


@dataclass
class MixupResult:
    """A mixup batch: x_mixed[i] = lam[i] * x[i] + (1 - lam[i]) * x[perm[i]]."""

    x: torch.Tensor
    perm: torch.Tensor
    lam: torch.Tensor


def _mixup_full(
    x: torch.Tensor,
    alpha: float = 1.0,
    generator: torch.Generator | None = None,
    per_sample: bool = True,
) -> MixupResult:
    b = x.shape[0]
    perm = derangement(b, generator)
    lam = _beta(alpha, alpha, b if per_sample else 1, generator)
    if not per_sample:
        lam = lam.expand(b).clone()
    lam_x = lam.to(device=x.device, dtype=x.dtype).reshape(-1, 1, 1, 1)
    mixed = lam_x * x + (1.0 - lam_x) * x[perm.to(x.device)]
    return MixupResult(mixed, perm, lam)


@dataclass
class CutMixResult:
    """A cutmix batch: box [y1:y2, x1:x2] of image i comes from image perm[i].

    `lam` is the fraction of image i that is kept (1 - box area / (H W), after clipping);
    `lam_drawn` is the Beta draw the box size came from.
    """

    x: torch.Tensor
    perm: torch.Tensor
    lam: torch.Tensor
    lam_drawn: torch.Tensor
    boxes: torch.Tensor  # (B, 4) int64: y1, y2, x1, x2


def _cutmix_full(
    x: torch.Tensor, beta: float = 1.0, generator: torch.Generator | None = None
) -> CutMixResult:
    b, _, h, w = x.shape
    perm = derangement(b, generator)
    lam_drawn = _beta(beta, beta, b, generator).cpu()
    cut = torch.sqrt(1.0 - lam_drawn)
    # CutMix's box: side sqrt(1 - lam) of the image, centre uniform, clipped at the border
    cut_h = (h * cut).floor().long()
    cut_w = (w * cut).floor().long()
    cy = _randint(h, (b,), generator).cpu()
    cx = _randint(w, (b,), generator).cpu()
    y1 = (cy - cut_h // 2).clamp(0, h)
    y2 = (cy - cut_h // 2 + cut_h).clamp(0, h)
    x1 = (cx - cut_w // 2).clamp(0, w)
    x2 = (cx - cut_w // 2 + cut_w).clamp(0, w)
    boxes = torch.stack([y1, y2, x1, x2], dim=1)
    # clipping shrinks boxes, so lambda is re-derived from the area actually pasted
    lam = 1.0 - ((y2 - y1) * (x2 - x1)).double() / float(h * w)
    rows = torch.arange(h)[None, :, None]
    cols = torch.arange(w)[None, None, :]
    inside = (
        (rows >= y1[:, None, None])
        & (rows < y2[:, None, None])
        & (cols >= x1[:, None, None])
        & (cols < x2[:, None, None])
    )
    inside = inside[:, None].to(x.device)
    mixed = torch.where(inside, x[perm.to(x.device)], x)
    return CutMixResult(mixed, perm, lam.float(), lam_drawn, boxes)


def mixup_batch(
    x: torch.Tensor,
    alpha: float = 1.0,
    generator: torch.Generator | None = None,
    per_sample: bool = True,
) -> MixupResult:
    """Mix each image with a partner (no fixed points) by lambda ~ Beta(alpha, alpha).

    Under a `BatchShard` the partners and lambdas are those of the global batch (perm indexes it),
    and this process gets the rows of its own samples.
    """
    shard = shard_for(x)
    if shard is None:
        return _mixup_full(x, alpha, generator, per_sample)
    full = _mixup_full(shard.gather_all(x), alpha, generator, per_sample)
    pos = shard.positions
    return MixupResult(full.x[pos.to(x.device)], full.perm[pos], full.lam[pos])


def cutmix_batch(
    x: torch.Tensor, beta: float = 1.0, generator: torch.Generator | None = None
) -> CutMixResult:
    """Paste a box from a partner image (no fixed points) into each image, one box per sample.

    Under a `BatchShard`, as for `mixup_batch`: global partners and boxes, local rows.
    """
    shard = shard_for(x)
    if shard is None:
        return _cutmix_full(x, beta, generator)
    full = _cutmix_full(shard.gather_all(x), beta, generator)
    pos = shard.positions
    return CutMixResult(
        full.x[pos.to(x.device)],
        full.perm[pos],
        full.lam[pos],
        full.lam_drawn[pos],
        full.boxes[pos],
    )


# --------------------------------------------------------------------------- RandAugment-style ops


def _per_sample(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.to(device=x.device, dtype=x.dtype).reshape(-1, 1, 1, 1)


def _gray_mean(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 3:
        w = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype, device=x.device)
        g = (x * w.reshape(1, 3, 1, 1)).sum(1, keepdim=True)
    else:
        g = x.mean(1, keepdim=True)
    return g.mean(dim=(2, 3), keepdim=True)


def _affine(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Warp each image by its own 2x3 matrix (normalized coordinates), filling with 0 (black)."""
    grid = F.affine_grid(
        theta.to(device=x.device, dtype=x.dtype), list(x.shape), align_corners=False
    )
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _op_identity(x: torch.Tensor, m: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return x


def _op_autocontrast(x: torch.Tensor, m: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    lo = x.amin(dim=(2, 3), keepdim=True)
    hi = x.amax(dim=(2, 3), keepdim=True)
    span = hi - lo
    return torch.where(span > 1e-6, (x - lo) / span.clamp_min(1e-6), x)


def _op_equalize(x: torch.Tensor, m: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    # histogram equalization via ranks: each value goes to its empirical CDF, the minimum to 0
    b, c, h, w = x.shape
    flat = x.reshape(b, c, h * w)
    ordered = flat.sort(dim=-1).values.contiguous()
    cdf = torch.searchsorted(ordered, flat.contiguous(), right=True).to(x.dtype) / (h * w)
    cdf_min = cdf.amin(dim=-1, keepdim=True)
    out = (cdf - cdf_min) / (1.0 - cdf_min).clamp_min(1e-6)
    constant = (ordered[..., -1:] - ordered[..., :1]) <= 1e-6
    return torch.where(constant, flat, out).reshape(b, c, h, w)


def _op_brightness(x: torch.Tensor, m: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return x * _per_sample(1.0 + 0.9 * m * s, x)


def _op_contrast(x: torch.Tensor, m: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    mu = _gray_mean(x)
    return mu + _per_sample(1.0 + 0.9 * m * s, x) * (x - mu)


def _op_solarize(x: torch.Tensor, m: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    thr = _per_sample(1.0 - m, x)
    return torch.where(x >= thr, 1.0 - x, x)


def _op_posterize(x: torch.Tensor, m: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    bits = (8 - (4 * m).round()).clamp(4, 8)
    step = _per_sample(2.0 ** (8 - bits), x)
    return torch.floor(x * 255.0 / step) * step / 255.0


def _op_rotate(x: torch.Tensor, m: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    a = torch.deg2rad(30.0 * m * s)
    theta = torch.zeros(len(a), 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = a.cos(), -a.sin()
    theta[:, 1, 0], theta[:, 1, 1] = a.sin(), a.cos()
    return _affine(x, theta)


def _op_shear_x(x: torch.Tensor, m: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    theta = torch.zeros(len(m), 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    theta[:, 0, 1] = 0.3 * m * s
    return _affine(x, theta)


def _op_shear_y(x: torch.Tensor, m: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    theta = torch.zeros(len(m), 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    theta[:, 1, 0] = 0.3 * m * s
    return _affine(x, theta)


def _op_translate_x(x: torch.Tensor, m: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    theta = torch.zeros(len(m), 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    theta[:, 0, 2] = 2 * 0.45 * m * s  # normalized coordinates span 2: up to 45% of the width
    return _affine(x, theta)


def _op_translate_y(x: torch.Tensor, m: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    theta = torch.zeros(len(m), 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    theta[:, 1, 2] = 2 * 0.45 * m * s
    return _affine(x, theta)


POLICY_OPS: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "identity": _op_identity,
    "autocontrast": _op_autocontrast,
    "equalize": _op_equalize,
    "brightness": _op_brightness,
    "contrast": _op_contrast,
    "solarize": _op_solarize,
    "posterize": _op_posterize,
    "rotate": _op_rotate,
    "shear_x": _op_shear_x,
    "shear_y": _op_shear_y,
    "translate_x": _op_translate_x,
    "translate_y": _op_translate_y,
}
