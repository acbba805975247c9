"""DINO self-distillation (Caron et al., ICCV 2021), written on tensors, plus SSL evaluation.

Pieces: multi-crop views on batched tensors, a projection head with a weight-normalised last
layer, an EMA teacher with a cosine momentum schedule, output centering, teacher temperature
warm-up, the DINO loss over every student/teacher view pair except identical views, and the two
frozen-feature evaluations (weighted k-NN and a linear probe).

`DINO` is the method for one or more independent models; `methods/mokd.py` extends it with
cross-distillation between two models.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# --------------------------------------------------------------------------- schedules


def cosine_value(step: int, total: int, start: float, end: float) -> float:
    """Cosine interpolation from `start` (step 0) to `end` (step `total`)."""
    if total <= 0:
        return end
    progress = min(max(step / total, 0.0), 1.0)
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def ema_momentum(step: int, total_steps: int, base: float, final: float = 1.0) -> float:
    """Teacher EMA momentum at a global step: cosine from `base` to `final` over the run."""
    return cosine_value(step, total_steps, base, final)


def teacher_temperature(epoch: int, warmup_temp: float, temp: float, warmup_epochs: int) -> float:
    """Teacher temperature: linear warm-up over `warmup_epochs` epochs, then constant."""
    if warmup_epochs <= 0 or epoch >= warmup_epochs:
        return temp
    # same grid as DINO's np.linspace(warmup, temp, warmup_epochs)
    return float(np.linspace(warmup_temp, temp, warmup_epochs)[epoch])


def lr_at(
    step: int, steps_per_epoch: int, epochs: int, base: float, final: float, warmup: float
) -> float:
    """Learning rate at a global step: linear warm-up then cosine decay to `final`."""
    warm = int(round(warmup * steps_per_epoch))
    total = epochs * steps_per_epoch
    if warm > 0 and step < warm:
        return base * (step + 1) / warm
    return cosine_value(step - warm, max(1, total - warm), base, final)


# --------------------------------------------------------------------------- multi-crop


@dataclass
class MultiCrop:
    """2 global + N local random-resized crops of a batch, with DINO's photometric augmentations.

    Works on float images in [0, 1] (B, C, H, W) on any device; every random number is drawn from
    the CPU generator passed in, so a (seed, epoch, rank)-derived generator makes views exact.
    """

    global_size: int
    local_size: int
    local_number: int = 8
    global_scale: tuple[float, float] = (0.25, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.25)
    flip: bool = True
    jitter: float = 0.4
    blur_sigma: tuple[float, float] = (0.1, 1.0)
    blur: bool = True
    solarize: bool = True

    def __call__(self, x: torch.Tensor, gen: torch.Generator) -> list[torch.Tensor]:
        """Views in [0, 1]: [global_1, global_2, local_1, ..., local_N]."""
        # DINO's per-view probabilities: blur always on view 1, rarely on view 2 (which may be
        # solarised instead), half the time on local views
        plan = [
            (self.global_size, self.global_scale, 1.0, 0.0),
            (self.global_size, self.global_scale, 0.1, 0.2),
        ]
        plan += [(self.local_size, self.local_scale, 0.5, 0.0)] * self.local_number
        views = []
        for size, scale, p_blur, p_sol in plan:
            v = random_resized_crop(x, size, scale, gen, flip=self.flip)
            v = color_jitter(v, self.jitter, gen)
            if self.blur and p_blur > 0:
                v = gaussian_blur(v, p_blur, self.blur_sigma, gen)
            if self.solarize and p_sol > 0:
                v = solarize(v, p_sol, gen)
            views.append(v)
        return views


def _uniform(n: int, low: float, high: float, gen: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=gen, dtype=torch.float64)


def random_resized_crop(
    x: torch.Tensor,
    size: int,
    scale: Sequence[float],
    gen: torch.Generator,
    ratio: Sequence[float] = (3 / 4, 4 / 3),
    flip: bool = True,
) -> torch.Tensor:
    """Per-sample random crop of area fraction in `scale`, aspect in `ratio`, resized to `size`."""
    b = x.shape[0]
    area = _uniform(b, scale[0], scale[1], gen)
    log_r = _uniform(b, math.log(ratio[0]), math.log(ratio[1]), gen)
    r = torch.exp(log_r)
    # crop side lengths as fractions of the image side; clamped crops just keep a valid window
    w = torch.sqrt(area * r).clamp(max=1.0)
    h = torch.sqrt(area / r).clamp(max=1.0)
    cx = (1 - w) * (2 * torch.rand(b, generator=gen, dtype=torch.float64) - 1)
    cy = (1 - h) * (2 * torch.rand(b, generator=gen, dtype=torch.float64) - 1)
    sign = torch.ones(b, dtype=torch.float64)
    if flip:
        sign = torch.where(torch.rand(b, generator=gen) < 0.5, -1.0, 1.0).double()
    theta = torch.zeros(b, 2, 3, dtype=torch.float64)
    theta[:, 0, 0] = w * sign
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = h
    theta[:, 1, 2] = cy
    theta = theta.to(device=x.device, dtype=x.dtype)
    grid = F.affine_grid(theta, [b, x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def color_jitter(
    x: torch.Tensor, strength: float, gen: torch.Generator, p: float = 0.8
) -> torch.Tensor:
    """Brightness and contrast (and saturation/grayscale for RGB) jitter, per sample."""
    b, c = x.shape[:2]
    if strength <= 0:
        return x
    apply = (torch.rand(b, generator=gen) < p).to(x.dtype)
    bright = _uniform(b, 1 - strength, 1 + strength, gen).to(x.dtype)
    contrast = _uniform(b, 1 - strength, 1 + strength, gen).to(x.dtype)
    sat = _uniform(b, 1 - strength, 1 + strength, gen).to(x.dtype)
    gray_coin = (torch.rand(b, generator=gen) < 0.2).to(x.dtype)
    dev = x.device
    bright = (1 + apply * (bright - 1)).to(dev).view(b, 1, 1, 1)
    contrast = (1 + apply * (contrast - 1)).to(dev).view(b, 1, 1, 1)
    y = (x * bright).clamp(0, 1)
    mean = y.mean(dim=(1, 2, 3), keepdim=True)
    y = ((y - mean) * contrast + mean).clamp(0, 1)
    if c == 3:
        weights = torch.tensor([0.299, 0.587, 0.114], device=dev, dtype=x.dtype).view(1, 3, 1, 1)
        gray = (y * weights).sum(1, keepdim=True)
        sat = (1 + apply * (sat - 1)).to(dev).view(b, 1, 1, 1)
        y = ((y - gray) * sat + gray).clamp(0, 1)
        g = gray_coin.to(dev).view(b, 1, 1, 1)
        y = g * (y * weights).sum(1, keepdim=True).expand_as(y) + (1 - g) * y
    return y


def gaussian_blur(
    x: torch.Tensor, p: float, sigma: Sequence[float], gen: torch.Generator, radius: int = 1
) -> torch.Tensor:
    """Separable Gaussian blur with a per-sample sigma, applied with probability `p`."""
    b, c, h, w = x.shape
    coin = (torch.rand(b, generator=gen) < p).to(x.dtype)
    s = _uniform(b, sigma[0], sigma[1], gen).to(x.dtype)
    offs = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k = torch.exp(-(offs[None] ** 2) / (2 * s[:, None] ** 2))
    k = k / k.sum(1, keepdim=True)
    identity = torch.zeros_like(k)
    identity[:, radius] = 1.0
    k = coin[:, None] * k + (1 - coin[:, None]) * identity
    k = k.to(x.device).repeat_interleave(c, 0)  # (B*C, K): one kernel per sample and channel
    y = F.pad(x.reshape(1, b * c, h, w), (radius,) * 4, mode="replicate")
    y = F.conv2d(y, k.view(b * c, 1, 1, -1), groups=b * c)
    y = F.conv2d(y, k.view(b * c, 1, -1, 1), groups=b * c)
    return y.reshape(b, c, h, w)


def solarize(
    x: torch.Tensor, p: float, gen: torch.Generator, threshold: float = 0.5
) -> torch.Tensor:
    """Invert pixels above `threshold`, per sample with probability `p`."""
    coin = (torch.rand(x.shape[0], generator=gen) < p).to(x.device).view(-1, 1, 1, 1)
    return torch.where(coin & (x >= threshold), 1.0 - x, x)


# --------------------------------------------------------------------------- heads


class WeightNormLinear(nn.Module):
    """Bias-free linear layer with weight = g * v / ||v|| (per output row).

    With `norm_last_layer` the scale g is fixed to 1 (not a parameter), as in DINO.
    """

    def __init__(self, in_dim: int, out_dim: int, norm_last_layer: bool = True) -> None:
        super().__init__()
        self.weight_v = nn.Parameter(torch.empty(out_dim, in_dim))
        nn.init.trunc_normal_(self.weight_v, std=0.02)
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1), requires_grad=not norm_last_layer)

    @property
    def weight(self) -> torch.Tensor:
        """The effective weight matrix."""
        return self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x @ weight.T."""
        return F.linear(x, self.weight)


class DINOHead(nn.Module):
    """MLP -> l2-normalised bottleneck -> weight-normalised linear layer to `out_dim`."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
        norm_last_layer: bool = True,
        use_bn: bool = False,
    ) -> None:
        super().__init__()
        if nlayers < 1:
            raise ValueError(f"head_layers must be >= 1, got {nlayers}")
        if nlayers == 1:
            self.mlp: nn.Module = nn.Linear(in_dim, bottleneck_dim)
        else:

            def block(d_in: int) -> list[nn.Module]:
                # DINO's use_bn_in_head: Linear -> BatchNorm -> GELU in the hidden layers
                bn: list[nn.Module] = [nn.BatchNorm1d(hidden_dim)] if use_bn else []
                return [nn.Linear(d_in, hidden_dim), *bn, nn.GELU()]

            layers: list[nn.Module] = block(in_dim)
            for _ in range(nlayers - 2):
                layers += block(hidden_dim)
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Head output (B, out_dim)."""
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))


# --------------------------------------------------------------------------- backbone wrapper


class SSLBackbone(nn.Module):
    """A zoo model without its classifier, returning (embedding, tokens, token grid).

    The embedding is what fed the classifier (the penultimate features); tokens are the outputs
    of `token_layer` read with a forward hook: CNN feature-map positions (B, h*w, C) or ViT patch
    tokens (B, L, D, class token dropped). The model's forward is not changed.
    """

    def __init__(self, model: nn.Module, token_layer: str = "auto", probe_size: int = 32) -> None:
        super().__init__()
        if not hasattr(model, "classifier"):
            raise ValueError(f"{type(model).__name__} has no `classifier` module to remove")
        model.classifier = nn.Identity()
        self.model = model
        if token_layer == "auto":
            if hasattr(model, "cls_token") and hasattr(model, "norm"):
                token_layer = "norm"
            else:
                layers = list(getattr(model, "hook_layers", []))
                if not layers:
                    raise ValueError(
                        f"{type(model).__name__} lists no hook_layers; set token_layer"
                    )
                token_layer = layers[-1]
        self.token_layer = token_layer
        self.has_cls = hasattr(model, "cls_token")
        self._captured: dict[str, torch.Tensor] = {}
        module = model.get_submodule(token_layer)
        module.register_forward_hook(self._hook)
        in_ch = _first_conv_in_channels(model)
        was = model.training
        model.eval()
        with torch.no_grad():
            emb, tokens, grid = self(torch.zeros(2, in_ch, probe_size, probe_size))
        model.train(was)
        self.embed_dim = int(emb.shape[-1])
        self.token_dim = int(tokens.shape[-1])
        self.probe_grid = grid

    def _hook(self, module: nn.Module, inputs: Any, output: Any) -> None:
        self._captured["tokens"] = output

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """(embedding (B, D), tokens (B, L, C), (grid_h, grid_w))."""
        emb = self.model(x)
        t = self._captured.pop("tokens")
        if t.dim() == 4:
            grid = (int(t.shape[2]), int(t.shape[3]))
            tokens = t.flatten(2).transpose(1, 2)
        elif t.dim() == 3:
            tokens = t[:, 1:] if self.has_cls else t
            side = int(round(math.sqrt(tokens.shape[1])))
            if side * side != tokens.shape[1]:
                raise ValueError(f"cannot lay out {tokens.shape[1]} tokens on a square grid")
            grid = (side, side)
        else:
            raise ValueError(f"token layer {self.token_layer!r} returned shape {tuple(t.shape)}")
        return emb, tokens, grid


def _first_conv_in_channels(model: nn.Module) -> int:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return m.in_channels
        if isinstance(m, nn.Linear):
            break
    raise ValueError(f"cannot infer input channels of {type(model).__name__}")


class SSLNetwork(nn.Module):
    """Backbone + DINO head (+ optional T-head): one student or one teacher."""

    def __init__(
        self, backbone: SSLBackbone, head: nn.Module, thead: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.thead = thead

    def forward(self, views: Sequence[torch.Tensor]) -> dict[str, list[torch.Tensor]]:
        """Per-view outputs; views of one resolution go through the backbone together."""
        out: dict[str, list[torch.Tensor]] = {
            "emb": [],
            "head": [],
            "pooled": [],
            "thead": [],
            "tokens": [],
        }
        out["grids"] = []  # type: ignore[assignment]
        start = 0
        while start < len(views):
            end = start
            while end < len(views) and views[end].shape[-2:] == views[start].shape[-2:]:
                end += 1
            x = torch.cat(list(views[start:end]))
            emb, tokens, grid = self.backbone(x)
            n = end - start
            out["emb"] += list(emb.chunk(n))
            out["head"] += list(self.head(emb).chunk(n))
            out["tokens"] += list(tokens.chunk(n))
            out["grids"] += [grid] * n  # type: ignore[list-item]
            if self.thead is not None:
                pooled, projected = self.thead(tokens, grid)
                out["pooled"] += list(pooled.chunk(n))
                out["thead"] += list(projected.chunk(n))
            start = end
        return out


# --------------------------------------------------------------------------- loss, centering, EMA


def dino_loss(
    student_out: Sequence[torch.Tensor],
    teacher_out: Sequence[torch.Tensor],
    center: torch.Tensor,
    student_temp: float,
    teacher_temp: float,
) -> torch.Tensor:
    """Mean over pairs (student view v, teacher global view t), v != t, of the batch-mean CE.

    Teacher view t is the same crop as student view t (global views come first in both lists).
    """
    total = student_out[0].new_zeros(())
    n_terms = 0
    for t, tout in enumerate(teacher_out):
        q = F.softmax((tout.detach() - center) / teacher_temp, dim=-1)
        for v, sout in enumerate(student_out):
            if v == t:
                continue
            total = (
                total + torch.sum(-q * F.log_softmax(sout / student_temp, dim=-1), dim=-1).mean()
            )
            n_terms += 1
    if n_terms == 0:
        raise ValueError("the DINO loss needs at least two views")
    return total / n_terms


def soft_cross_entropy(
    student: torch.Tensor, target: torch.Tensor, student_temp: float, teacher_temp: float
) -> torch.Tensor:
    """Batch-mean CE between softmax(target / teacher_temp) and softmax(student / student_temp)."""
    q = F.softmax(target.detach() / teacher_temp, dim=-1)
    return torch.sum(-q * F.log_softmax(student / student_temp, dim=-1), dim=-1).mean()


@torch.no_grad()
def updated_center(center: torch.Tensor, batch_mean: torch.Tensor, momentum: float) -> torch.Tensor:
    """center * m + batch_mean * (1 - m)."""
    return center * momentum + batch_mean * (1.0 - momentum)


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher <- m * teacher + (1 - m) * student, parameter by parameter (buffers are the teacher's own)."""
    for pt, ps in zip(teacher.parameters(), student.parameters(), strict=True):
        pt.mul_(momentum).add_(ps.detach(), alpha=1.0 - momentum)


def make_teacher(student: nn.Module) -> nn.Module:
    """A frozen copy of `student`: same weights, no gradients ever."""
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


Reducer = Callable[[torch.Tensor], torch.Tensor]


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


class SSLMember(nn.Module):
    """One model of an SSL run: its student, its EMA teacher and its output centers."""

    def __init__(self, student: SSLNetwork, out_dim: int, cross_weight: float = 0.0) -> None:
        super().__init__()
        self.student = student
        self.teacher = make_teacher(student)
        self.cross_weight = cross_weight
        for name in ("center_head", "center_thead", "center_cross"):
            self.register_buffer(name, torch.zeros(1, out_dim))

    def teacher_forward(self, views: Sequence[torch.Tensor]) -> dict[str, list[torch.Tensor]]:
        """Teacher outputs for the global views, without autograd."""
        with torch.no_grad():
            return self.teacher(views)


class DINO(nn.Module):
    """DINO self-distillation for each model independently (one model: plain DINO)."""

    def __init__(
        self,
        members: dict[str, SSLMember],
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        use_thead: bool = False,
    ) -> None:
        super().__init__()
        self.members = nn.ModuleDict(members)
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.use_thead = use_thead
        # sums a tensor over ranks; the trainer swaps in torch.distributed under torchrun
        self.reduce: Reducer = _identity
        self.world_size = 1

    def names(self) -> list[str]:
        """Member names in a fixed order."""
        return list(self.members.keys())

    def _batch_mean(self, outs: Sequence[torch.Tensor]) -> torch.Tensor:
        cat = torch.cat([o.detach().float() for o in outs])
        return self.reduce(cat.sum(0, keepdim=True)) / (cat.shape[0] * self.world_size)

    def _set_center(self, member: SSLMember, name: str, outs: Sequence[torch.Tensor]) -> None:
        batch_mean = self._batch_mean(outs)
        setattr(
            member, name, updated_center(getattr(member, name), batch_mean, self.center_momentum)
        )

    def forward_all(self, views: Sequence[torch.Tensor]) -> dict[str, tuple[dict, dict]]:
        """(student outputs on all views, teacher outputs on the 2 global views) per member."""
        out = {}
        for name, m in self.members.items():
            out[name] = (m.student(views), m.teacher_forward(views[:2]))
        return out

    def self_losses(
        self, m: SSLMember, s: dict, t: dict, teacher_temp: float
    ) -> dict[str, torch.Tensor]:
        """A member's own DINO terms (head, and T-head when it has one)."""
        losses = {
            "dino": dino_loss(s["head"], t["head"], m.center_head, self.student_temp, teacher_temp)
        }
        if self.use_thead:
            losses["dino_thead"] = dino_loss(
                s["thead"], t["thead"], m.center_thead, self.student_temp, teacher_temp
            )
        return losses

    def update_centers(self, outputs: dict[str, tuple[dict, dict]]) -> None:
        """EMA of each teacher's mean output (after the losses used the old centers)."""
        for name, m in self.members.items():
            t = outputs[name][1]
            self._set_center(m, "center_head", t["head"])
            if self.use_thead:
                self._set_center(m, "center_thead", t["thead"])

    def compute_losses(
        self, views: Sequence[torch.Tensor], teacher_temp: float
    ) -> dict[str, dict[str, torch.Tensor]]:
        """Named loss terms per member for one batch of views; centers are updated afterwards."""
        outputs = self.forward_all(views)
        losses = {
            name: self.self_losses(m, *outputs[name], teacher_temp)
            for name, m in self.members.items()
        }
        self.update_centers(outputs)
        return losses

    @torch.no_grad()
    def update_teachers(self, momenta: dict[str, float]) -> None:
        """EMA step of every teacher towards its student."""
        for name, m in self.members.items():
            ema_update(m.teacher, m.student, momenta[name])


# --------------------------------------------------------------------------- evaluation


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
    m = torch.tensor(mean, device=device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=device).view(1, -1, 1, 1)
    feats = []
    for start in range(0, len(images), batch_size):
        x = images[start : start + batch_size].to(device).float().div_(255.0)
        out = backbone((x - m) / s)
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


def linear_probe_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    steps: int = 100,
    l2: float = 1e-4,
) -> float:
    """Test accuracy (%) of a multinomial logistic regression on standardised frozen features.

    Full-batch L-BFGS from zero weights: deterministic and free of learning-rate tuning.
    """
    x = train_features.double()
    mu, sd = x.mean(0, keepdim=True), x.std(0, keepdim=True).clamp_min(1e-6)
    x = (x - mu) / sd
    xt = (test_features.double() - mu) / sd
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
        pred = (xt @ w + b).argmax(1)
    return 100.0 * (pred == test_labels).double().mean().item()
