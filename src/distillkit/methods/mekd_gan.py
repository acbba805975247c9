"""MEKD's networks and loss terms: the DCGAN generator and discriminator, the IM term, the
teacher vectors fed to the generator and the distillation loss through it (see methods/mekd.py)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from distillkit.teachers.base import TeacherOutput


class Generator(nn.Module):
    """DCGAN-style: Linear -> BN -> (Upsample, Conv3x3, BN, LeakyReLU 0.2) x2 -> Conv -> Tanh."""

    def __init__(self, latent_dim: int, out_channels: int, image_size: int, width: int = 128):
        super().__init__()
        self.latent_dim, self.image_size = latent_dim, image_size
        self.s0 = max(1, math.ceil(image_size / 4))
        self.width = width
        self.fc = nn.Linear(latent_dim, width * self.s0 * self.s0)
        self.bn0 = nn.BatchNorm2d(width)
        self.body = nn.Sequential(
            nn.Upsample(scale_factor=2),
            nn.Conv2d(width, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.LeakyReLU(0.2),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(width, width // 2, 3, padding=1),
            nn.BatchNorm2d(width // 2),
            nn.LeakyReLU(0.2),
            nn.Conv2d(width // 2, out_channels, 3, padding=1),
            nn.Tanh(),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] of shape (B, C, image_size, image_size)."""
        h = self.bn0(self.fc(z).view(z.shape[0], self.width, self.s0, self.s0))
        out = self.body(h)
        if out.shape[-1] != self.image_size:
            out = F.interpolate(out, size=(self.image_size, self.image_size), mode="bilinear")
        return out


class Discriminator(nn.Module):
    """Four stride-2 conv blocks with LeakyReLU 0.2 and a linear real/fake logit.

    No batch norm: real and fake batches pass separately, and on small images the last blocks are
    1x1, where per-batch normalisation erases the very statistics that tell real from fake.
    `minibatch_std` appends the batch's mean feature standard deviation to the features (as in
    progressive GANs): a generator that collapses onto a few modes yields a batch with a low
    spread that the discriminator can see and punish.
    """

    def __init__(
        self, in_channels: int, image_size: int, width: int = 128, minibatch_std: bool = False
    ):
        super().__init__()
        chans = [in_channels, width // 8, width // 4, width // 2, width]
        layers: list[nn.Module] = []
        for i in range(4):
            layers.append(nn.Conv2d(chans[i], chans[i + 1], 3, stride=2, padding=1))
            layers.append(nn.LeakyReLU(0.2))
        self.body = nn.Sequential(*layers)
        with torch.no_grad():
            n = self.body(torch.zeros(2, in_channels, image_size, image_size)).flatten(1).shape[1]
        self.minibatch_std = minibatch_std
        self.head = nn.Linear(n + int(minibatch_std), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """One logit per image, shape (B,)."""
        h = self.body(x).flatten(1)
        if self.minibatch_std:
            spread = h.std(dim=0, unbiased=False).mean() if h.shape[0] > 1 else h.new_zeros(())
            h = torch.cat([h, spread.expand(h.shape[0], 1)], dim=1)
        return self.head(h).squeeze(1)


def im_weights(out: TeacherOutput) -> torch.Tensor:
    """Per-image IM weight: the teacher's top probability (1 for hard labels)."""
    if out.probs is not None:
        return out.probs.float().max(dim=1).values
    if out.logits is not None:
        return torch.softmax(out.logits.float(), dim=1).max(dim=1).values
    if out.labels is None:
        raise ValueError("empty TeacherOutput")
    return torch.ones(out.labels.shape[0], device=out.labels.device)


def im_term(d_fake_logits: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Information-maximisation term: -mean(w * log D(G(z))), w the teacher's top probability."""
    return -(weights.detach().to(d_fake_logits.dtype) * F.logsigmoid(d_fake_logits)).mean()


def teacher_vector(out: TeacherOutput, num_classes: int) -> torch.Tensor:
    """What replaces the teacher's logits: log-probabilities (soft) or the one-hot label (hard)."""
    if out.labels is not None and out.probs is None and out.logits is None:
        return F.one_hot(out.labels.long(), num_classes).float()
    return out.log_probs().float()


def class_balance_weights(labels: torch.Tensor) -> torch.Tensor:
    """Per-sample weights 1 / count(label): every present class gets the same total weight."""
    counts = torch.bincount(labels)
    return 1.0 / counts[labels].double()


def distill_loss(
    generator: nn.Module,
    s: torch.Tensor,
    t: torch.Tensor,
    tau: float,
    tau_g: float,
    beta: float,
    align: str = "l1",
) -> dict[str, torch.Tensor]:
    """MEKD's distillation terms: align(G(s/tau_g), G(t/tau_g)) and beta * KL at tau."""
    with torch.no_grad():
        target = generator(t / tau_g)
    recon = generator(s.float() / tau_g)
    dist = F.l1_loss(recon, target) if align == "l1" else F.mse_loss(recon, target)
    log_p_s = F.log_softmax(s.float() / tau, dim=1)
    p_t = F.softmax(t / tau, dim=1)
    kl = F.kl_div(log_p_s, p_t, reduction="batchmean")
    return {"align": dist, "kl": beta * kl}
