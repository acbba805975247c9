"""Batch-level data augmentations for distillation, each drawing its randomness per sample.

Every augmentation maps a float batch (B, C, H, W) to an augmented batch. Conventions:

* ``space = "normalized"``: the op works directly on the normalized tensors the trainer hands
  out. Mixing (mixup, cutmix) is linear, flips and crops move pixels, so they commute with the
  per-channel affine normalization. Zeros written by ``crop_flip`` padding and ``cutout`` holes are
  therefore the dataset mean colour, as in DeVries & Taylor's Cutout (applied after Normalize).
* ``space = "unit"``: the op needs pixel values in [0, 1] (``randaugment``: solarize, posterize,
  equalize ...). `Augmentation.augment` denormalizes with the bundle's mean/std, applies the op and
  normalizes again.

Randomness comes from an explicit ``torch.Generator`` or, when none is given, from the global CPU
torch RNG (the trainer saves and restores it, so resumed runs stay exact). Draws always happen on
the generator's device (CPU by default), so results do not depend on where the batch lives.

Under data parallelism the trainer sets a `BatchShard` (`transforms.use_shard`): every op then draws
for the whole global batch and keeps this process's rows, and the mixing ops take partners from the
global batch, so each sample is augmented as in a single-process run. This needs the ranks' RNGs in
step, which holds while every rank draws the same amounts (same seed, no per-rank dropout draws).

Build any of them by name with `build_augmentation(name, **params)`; unknown names and bad
parameters raise ValueError naming them.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .transforms import (
    POLICY_OPS,
    BatchShard,
    CutMixResult,
    MixupResult,
    _rand,
    _randint,
    cutmix_batch,
    derangement,
    draw_size,
    mixup_batch,
    random_crop_flip,
    shard_for,
    take_rows,
)

__all__ = [
    "AugOutput",
    "Augmentation",
    "CutMix",
    "CutMixPick",
    "CutMixResult",
    "Cutout",
    "Flip",
    "CropFlip",
    "Identity",
    "Mixup",
    "MixupResult",
    "POLICY_OPS",
    "RandAugment",
    "build_augmentation",
    "cutmix_batch",
    "derangement",
    "list_augmentations",
    "mixup_batch",
    "parse_scheme",
    "pick_scores",
]

LogProbFn = Callable[[torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------- base class


@dataclass
class AugOutput:
    """An augmented batch, plus the teacher's log-probabilities on it when they were computed."""

    x: torch.Tensor
    teacher_log_probs: torch.Tensor | None = None


class Augmentation:
    """Base class: subclasses implement `apply(x, generator)` in their declared `space`."""

    name = "augmentation"
    space = "normalized"  # "normalized" | "unit" (pixel values in [0, 1])
    is_identity = False
    needs_teacher = False
    needs_student = False

    def apply(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Augment a batch that is already in this op's space."""
        raise NotImplementedError

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Same as `apply`."""
        _check_batch(x)
        return self.apply(x, generator)

    def augment(
        self,
        x: torch.Tensor,
        generator: torch.Generator | None = None,
        *,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        teacher: LogProbFn | None = None,
        student: LogProbFn | None = None,
        temperature: float = 4.0,
    ) -> AugOutput:
        """Augment a normalized batch; mean/std let unit-space ops see [0, 1] pixels."""
        _check_batch(x)
        if self.space == "unit" and mean is not None and std is not None:
            m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)
            s = torch.as_tensor(std, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)
            return AugOutput((self.apply(x * s + m, generator) - m) / s)
        return AugOutput(self.apply(x, generator))

    def params(self) -> dict[str, Any]:
        """The constructor parameters of this instance (for logs and result tables)."""
        names = [p for p in inspect.signature(type(self).__init__).parameters if p != "self"]
        return {n: getattr(self, n) for n in names}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{self.name}({args})"


def _check_batch(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"augmentations expect a float batch (B, C, H, W), got {shape}")


def _check_number(
    aug: str, key: str, value: Any, *, low: float, high: float = math.inf, integer: bool = False
) -> None:
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type or not (low <= value <= high):
        kind = "an integer" if integer else "a number"
        upper = "" if high == math.inf else f" and <= {high}"
        raise ValueError(
            f"augmentation {aug!r}: parameter {key!r} must be {kind} >= {low}{upper}, got {value!r}"
        )


# --------------------------------------------------------------------------- simple ops

_REGISTRY: dict[str, type[Augmentation]] = {}


def register_augmentation(name: str) -> Callable[[type[Augmentation]], type[Augmentation]]:
    """Class decorator adding an augmentation to the registry under `name`."""

    def deco(cls: type[Augmentation]) -> type[Augmentation]:
        if name in _REGISTRY:
            raise ValueError(f"augmentation {name!r} is registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


@register_augmentation("identity")
class Identity(Augmentation):
    """No augmentation: x' = x."""

    is_identity = True

    def apply(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Return x unchanged."""
        return x


@register_augmentation("flip")
class Flip(Augmentation):
    """Mirror each image left-right with probability p."""

    def __init__(self, p: float = 0.5):
        _check_number("flip", "p", p, low=0.0, high=1.0)
        self.p = float(p)

    def apply(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Per-sample horizontal flips."""
        coins = take_rows(_rand((draw_size(x),), generator) < self.p, x).to(x.device)
        return torch.where(coins[:, None, None, None], x.flip(-1), x)


@register_augmentation("crop_flip")
class CropFlip(Augmentation):
    """Zero-pad, take a random crop and maybe mirror, independently per image."""

    def __init__(self, padding: int | None = None, flip: bool = True):
        if padding is not None:
            _check_number("crop_flip", "padding", padding, low=0, integer=True)
        if not isinstance(flip, bool):
            raise ValueError(
                f"augmentation 'crop_flip': parameter 'flip' must be true/false, got {flip!r}"
            )
        self.padding = padding
        self.flip = flip

    def apply(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Random crop (padding defaults to H // 8, at least 1) and flip per sample."""
        pad = max(1, x.shape[-2] // 8) if self.padding is None else self.padding
        if generator is None:
            # random_crop_flip needs a generator: derive one from the global RNG so it stays seeded
            seed = int(torch.randint(0, 2**62, (1,)).item())
            generator = torch.Generator().manual_seed(seed)
        return random_crop_flip(x, pad, self.flip, generator)


@register_augmentation("cutout")
class Cutout(Augmentation):
    """Zero out `holes` square patches of side `length` per image (centres uniform, boxes clipped)."""

    def __init__(self, holes: int = 1, length: int | None = None):
        _check_number("cutout", "holes", holes, low=1, integer=True)
        if length is not None:
            _check_number("cutout", "length", length, low=1, integer=True)
        self.holes = holes
        self.length = length

    def masks(
        self, b: int, h: int, w: int, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """(B, 1, H, W) float mask: 0 inside the holes, 1 elsewhere."""
        length = max(1, h // 2) if self.length is None else self.length
        cy = _randint(h, (b, self.holes), generator).cpu()
        cx = _randint(w, (b, self.holes), generator).cpu()
        y1, y2 = (cy - length // 2).clamp(0, h), (cy - length // 2 + length).clamp(0, h)
        x1, x2 = (cx - length // 2).clamp(0, w), (cx - length // 2 + length).clamp(0, w)
        rows = torch.arange(h)[None, None, :, None]
        cols = torch.arange(w)[None, None, None, :]
        inside = (
            (rows >= y1[..., None, None])
            & (rows < y2[..., None, None])
            & (cols >= x1[..., None, None])
            & (cols < x2[..., None, None])
        )  # (B, holes, H, W)
        return (~inside.any(dim=1, keepdim=True)).float()

    def apply(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Multiply each image by its own hole mask."""
        _, _, h, w = x.shape
        masks = take_rows(self.masks(draw_size(x), h, w, generator), x)
        return x * masks.to(device=x.device, dtype=x.dtype)


@register_augmentation("mixup")
class Mixup(Augmentation):
    """Mixup with lambda ~ Beta(alpha, alpha), one lambda per sample unless per_sample=false."""

    def __init__(self, alpha: float = 1.0, per_sample: bool = True):
        _check_number("mixup", "alpha", alpha, low=1e-6)
        if not isinstance(per_sample, bool):
            raise ValueError(
                f"augmentation 'mixup': parameter 'per_sample' must be true/false, got {per_sample!r}"
            )
        self.alpha = float(alpha)
        self.per_sample = per_sample

    def apply(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The mixed batch (labels are not needed: KD's target is the teacher on x')."""
        return mixup_batch(x, self.alpha, generator, self.per_sample).x


@register_augmentation("cutmix")
class CutMix(Augmentation):
    """CutMix with lambda ~ Beta(beta, beta) and one box per sample."""

    def __init__(self, beta: float = 1.0):
        _check_number("cutmix", "beta", beta, low=1e-6)
        self.beta = float(beta)

    def apply(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The cut-and-pasted batch."""
        return cutmix_batch(x, self.beta, generator).x


# --------------------------------------------------------------------------- CutMixPick

CRITERIA = ("teacher_entropy", "student_entropy", "kl")


def _entropy(log_probs: torch.Tensor) -> torch.Tensor:
    return -(log_probs.exp() * log_probs).sum(dim=1)


def pick_scores(
    criterion: str,
    teacher_log_probs: torch.Tensor | None,
    student_logits: torch.Tensor | None,
    temperature: float = 4.0,
) -> torch.Tensor:
    """Per-sample score: entropy at T = 1 of teacher or student, or KL(t || s) at `temperature`."""
    if criterion == "teacher_entropy":
        assert teacher_log_probs is not None
        return _entropy(F.log_softmax(teacher_log_probs.float(), dim=1))
    if criterion == "student_entropy":
        assert student_logits is not None
        return _entropy(F.log_softmax(student_logits.float(), dim=1))
    if criterion == "kl":
        assert teacher_log_probs is not None and student_logits is not None
        log_t = F.log_softmax(teacher_log_probs.float() / temperature, dim=1)
        log_s = F.log_softmax(student_logits.float() / temperature, dim=1)
        return (log_t.exp() * (log_t - log_s)).sum(dim=1)
    raise ValueError(
        f"unknown CutMixPick criterion {criterion!r}; choose from {', '.join(CRITERIA)}"
    )


@dataclass
class PickResult:
    """The kept samples of a CutMixPick pool, their scores and positions in the pool."""

    x: torch.Tensor
    index: torch.Tensor
    scores: torch.Tensor
    pool: torch.Tensor
    teacher_log_probs: torch.Tensor | None


@register_augmentation("cutmixpick")
class CutMixPick(Augmentation):
    """CutMix `mix_n_run` times, score every mixed sample, keep the `n_pick` highest (Wang et al.).

    Scores: entropy at T = 1 of the teacher's or the student's prediction, or KL(teacher || student)
    at the KD temperature. n_pick defaults to the batch size.
    """

    def __init__(
        self,
        mix_n_run: int = 2,
        n_pick: int | None = None,
        criterion: str = "teacher_entropy",
        beta: float = 1.0,
    ):
        _check_number("cutmixpick", "mix_n_run", mix_n_run, low=1, integer=True)
        if n_pick is not None:
            _check_number("cutmixpick", "n_pick", n_pick, low=1, integer=True)
        if criterion not in CRITERIA:
            raise ValueError(
                f"augmentation 'cutmixpick': parameter 'criterion' must be one of "
                f"{', '.join(CRITERIA)}, got {criterion!r}"
            )
        _check_number("cutmixpick", "beta", beta, low=1e-6)
        self.mix_n_run = mix_n_run
        self.n_pick = n_pick
        self.criterion = criterion
        self.beta = float(beta)

    @property
    def needs_teacher(self) -> bool:  # type: ignore[override]
        """Whether scoring asks the teacher."""
        return self.criterion in ("teacher_entropy", "kl")

    @property
    def needs_student(self) -> bool:  # type: ignore[override]
        """Whether scoring asks the student."""
        return self.criterion in ("student_entropy", "kl")

    def pool(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """mix_n_run independent CutMix batches, concatenated."""
        return torch.cat([cutmix_batch(x, self.beta, generator).x for _ in range(self.mix_n_run)])

    def pick(
        self,
        x: torch.Tensor,
        generator: torch.Generator | None = None,
        *,
        teacher: LogProbFn | None = None,
        student: LogProbFn | None = None,
        temperature: float = 4.0,
    ) -> PickResult:
        """Build the pool, score it, and keep the n_pick highest-scoring samples.

        Under a `BatchShard` the pool and the pick are those of the global batch (n_pick defaults
        to its size); each rank scores its own rows and returns its part of the picks.
        """
        _check_batch(x)
        if self.needs_teacher and teacher is None:
            raise ValueError(f"cutmixpick with criterion={self.criterion!r} needs a teacher")
        if self.needs_student and student is None:
            raise ValueError(
                f"cutmixpick with criterion={self.criterion!r} needs a student; "
                "use criterion=teacher_entropy where no student exists (T. stddev)"
            )
        shard = shard_for(x)
        batch = x.shape[0] if shard is None else shard.total
        n_pick = batch if self.n_pick is None else self.n_pick
        if n_pick > self.mix_n_run * batch:
            raise ValueError(
                f"cutmixpick: n_pick={n_pick} exceeds the pool of {self.mix_n_run * batch} samples "
                f"(mix_n_run={self.mix_n_run} x batch {batch})"
            )
        pool = self.pool(x, generator)
        with torch.no_grad():
            t_lp = teacher(pool) if teacher is not None else None
            s_logits = student(pool) if student is not None else None
            scores = pick_scores(self.criterion, t_lp, s_logits, temperature)
        if shard is not None:
            # each rank scored its own rows of every run; the pick is over the global pool
            pool, scores = _gather_pool(pool, shard), _gather_pool(scores, shard)
            t_lp = _gather_pool(t_lp, shard) if t_lp is not None else None
        index = scores.topk(n_pick).indices
        if shard is not None:
            part = shard.part_of(n_pick)
            # a rank left without picks keeps one (weightless) row, as the loader pads batches
            index = index[part] if part.stop > part.start else index[-1:]
        kept_t = t_lp[index] if t_lp is not None else None
        return PickResult(pool[index], index, scores, pool, kept_t)

    def apply(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Without a scorer there is nothing to pick by."""
        raise ValueError("cutmixpick needs a teacher or student to score samples; call augment()")

    def augment(
        self,
        x: torch.Tensor,
        generator: torch.Generator | None = None,
        *,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        teacher: LogProbFn | None = None,
        student: LogProbFn | None = None,
        temperature: float = 4.0,
    ) -> AugOutput:
        """The picked samples, with the teacher's outputs on them reused when they were scored."""
        res = self.pick(x, generator, teacher=teacher, student=student, temperature=temperature)
        return AugOutput(res.x, res.teacher_log_probs)


def _gather_pool(v: torch.Tensor, shard: BatchShard) -> torch.Tensor:
    """A pool of runs of local rows, (runs * local, ...), as the global pool (runs * total, ...)."""
    runs = v.shape[0] // len(shard.positions)
    local = v.reshape(runs, len(shard.positions), *v.shape[1:]).transpose(0, 1).contiguous()
    full = shard.gather_all(local)  # (total, runs, ...)
    return full.transpose(0, 1).reshape(runs * shard.total, *v.shape[1:])


def student_scorer(student: nn.Module) -> LogProbFn:
    """Student logits without gradients and without moving its BatchNorm running statistics."""

    def score(x: torch.Tensor) -> torch.Tensor:
        bufs = {n: b.clone() for n, b in student.named_buffers()}
        with torch.no_grad():
            out = student(x)
        # scoring is not training: put back the running stats the extra forward updated
        with torch.no_grad():
            for n, b in student.named_buffers():
                b.copy_(bufs[n])
        return out

    return score


@register_augmentation("randaugment")
class RandAugment(Augmentation):
    """RandAugment-style policy on [0, 1] pixels: `n_ops` random ops per image at `magnitude`/30.

    Each image draws its own ops and signs; magnitude m (0-30) scales every op: rotate up to 30
    degrees, shear 0.3, translate 45% of the side, brightness/contrast factor 1 +- 0.9, solarize
    threshold 1 - m, posterize down to 4 bits. With random_magnitude the level is drawn uniformly
    in [0, m] per image and op. Works in "unit" space: `augment` denormalizes first.
    """

    space = "unit"

    def __init__(
        self,
        n_ops: int = 2,
        magnitude: float = 9.0,
        random_magnitude: bool = False,
        ops: list[str] | None = None,
    ):
        _check_number("randaugment", "n_ops", n_ops, low=1, integer=True)
        _check_number("randaugment", "magnitude", magnitude, low=0.0, high=30.0)
        if not isinstance(random_magnitude, bool):
            raise ValueError(
                "augmentation 'randaugment': parameter 'random_magnitude' must be true/false, "
                f"got {random_magnitude!r}"
            )
        if ops is not None:
            bad = [o for o in ops if o not in POLICY_OPS] if isinstance(ops, list) else [ops]
            if bad or not ops:
                raise ValueError(
                    f"augmentation 'randaugment': parameter 'ops' has unknown ops {bad}; "
                    f"choose from {', '.join(POLICY_OPS)}"
                )
        self.n_ops = n_ops
        self.magnitude = float(magnitude)
        self.random_magnitude = random_magnitude
        self.ops = list(ops) if ops is not None else None

    def apply(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Apply n_ops rounds; in each round every image gets one randomly chosen op."""
        names = self.ops or list(POLICY_OPS)
        n = draw_size(x)  # draws for the global batch when x is a shard of it
        out = x
        for _ in range(self.n_ops):
            choice = _randint(len(names), (n,), generator).cpu()
            sign = _randint(2, (n,), generator).cpu().float() * 2 - 1
            level = torch.full((n,), self.magnitude / 30.0)
            if self.random_magnitude:
                level = level * _rand((n,), generator).cpu()
            choice, sign, level = (take_rows(v, x) for v in (choice, sign, level))
            new = out.clone()
            # one vectorised call per op over the images that drew it, not a loop over images
            for k, name in enumerate(names):
                sel = (choice == k).nonzero().flatten()
                if len(sel) == 0:
                    continue
                sel_dev = sel.to(x.device)
                new[sel_dev] = POLICY_OPS[name](out[sel_dev], level[sel], sign[sel])
            out = new.clamp(0.0, 1.0)
        return out


# --------------------------------------------------------------------------- registry API


def list_augmentations() -> list[str]:
    """Names accepted by `build_augmentation`."""
    return sorted(_REGISTRY)


def build_augmentation(name: str, **params: Any) -> Augmentation:
    """An augmentation by name; unknown names or parameters raise ValueError naming them."""
    if name not in _REGISTRY:
        raise ValueError(
            f"unknown augmentation {name!r}; choose from {', '.join(list_augmentations())}"
        )
    cls = _REGISTRY[name]
    allowed = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        valid = ", ".join(allowed) if allowed else "none"
        raise ValueError(
            f"augmentation {name!r}: unknown parameter(s) {', '.join(map(repr, unknown))}; "
            f"valid parameters: {valid}"
        )
    try:
        return cls(**params)
    except TypeError as exc:  # e.g. a list where a number belongs
        raise ValueError(f"augmentation {name!r}: bad parameters {params}: {exc}") from None


def parse_scheme(text: str) -> tuple[str, dict[str, Any]]:
    """'cutout:holes=2:length=4' -> ('cutout', {'holes': 2, 'length': 4}); values parsed as YAML."""
    import yaml

    parts = [p.strip() for p in str(text).split(":")]
    name, params = parts[0], {}
    if not name:
        raise ValueError(f"empty augmentation name in scheme {text!r}")
    for item in parts[1:]:
        if "=" not in item:
            raise ValueError(f"scheme {text!r}: parameter {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        params[key.strip()] = yaml.safe_load(raw) if raw != "" else None
    return name, params
