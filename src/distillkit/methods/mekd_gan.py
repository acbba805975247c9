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
        self.image_size = image_size
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
    spread that the discriminator can see and punish. `spectral_norm` constrains every layer's
    largest singular value to 1 (Miyato et al. 2018): D stays smooth, so it cannot memorise a
    small edge set and G keeps a useful gradient.
    """

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        width: int = 128,
        minibatch_std: bool = False,
        spectral_norm: bool = False,
    ):
        super().__init__()
        sn = nn.utils.parametrizations.spectral_norm if spectral_norm else (lambda m: m)
        chans = [in_channels, width // 8, width // 4, width // 2, width]
        convs = [sn(nn.Conv2d(a, b, 3, stride=2, padding=1)) for a, b in zip(chans, chans[1:])]
        self.body = nn.Sequential(*(m for conv in convs for m in (conv, nn.LeakyReLU(0.2))))
        with torch.no_grad():
            probe = torch.zeros(2, in_channels, image_size, image_size)
            n = self.body.eval()(probe).flatten(1).shape[1]
            self.body.train()
        self.minibatch_std = minibatch_std
        self.head = sn(nn.Linear(n + int(minibatch_std), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """One logit per image, shape (B,)."""
        h = self.body(x).flatten(1)
        if self.minibatch_std:
            spread = h.std(dim=0, unbiased=False).mean() if h.shape[0] > 1 else h.new_zeros(())
            h = torch.cat([h, spread.expand(h.shape[0], 1)], dim=1)
        return self.head(h).squeeze(1)


AUGMENTS = ("translation", "cutout", "color")


def diff_augment(x: torch.Tensor, policy: tuple[str, ...]) -> torch.Tensor:
    """DiffAugment (Zhao et al. 2020): random, differentiable transforms applied before D.

    The same policy goes to real and fake images (each image its own draw), so D never sees an
    unaugmented image and cannot memorise the few thousand real ones, while G's gradient flows
    through the transforms. Images are normalised (about zero mean, unit spread):
    - color: brightness (add U(-0.5, 0.5)), contrast (scale about the image mean by U(0.5, 1.5)),
      and for colour images saturation (scale about the pixel's channel mean by U(0, 2));
    - translation: shift by up to 1/8 of the size in each direction, zero padding;
    - cutout: zero a random square of half the size (clipped at the borders).
    """
    if not policy:
        return x
    b, c, h, w = x.shape
    dev, dt = x.device, x.dtype
    if "color" in policy:
        x = x + (torch.rand(b, 1, 1, 1, device=dev, dtype=dt) - 0.5)
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * (torch.rand(b, 1, 1, 1, device=dev, dtype=dt) + 0.5) + mean
        if c > 1:
            mean = x.mean(dim=1, keepdim=True)
            x = (x - mean) * (torch.rand(b, 1, 1, 1, device=dev, dtype=dt) * 2) + mean
    if "translation" in policy:
        sh, sw = max(1, h // 8), max(1, w // 8)
        dy = torch.randint(-sh, sh + 1, (b, 1, 1), device=dev)
        dx = torch.randint(-sw, sw + 1, (b, 1, 1), device=dev)
        gy = torch.arange(h, device=dev).view(1, h, 1) + dy + sh  # rows of the padded image
        gx = torch.arange(w, device=dev).view(1, 1, w) + dx + sw
        padded = F.pad(x, (sw, sw, sh, sh))
        flat = padded.flatten(2)  # (b, c, (h + 2sh) * (w + 2sw))
        index = (gy * (w + 2 * sw) + gx).flatten(1)  # (b, h * w)
        x = flat.gather(2, index.unsqueeze(1).expand(b, c, h * w)).view(b, c, h, w)
    if "cutout" in policy:
        ch, cw = max(1, h // 2), max(1, w // 2)
        # the square's top-left corner, so that its centre is uniform over the image
        y0 = torch.randint(0, h, (b, 1, 1), device=dev) - ch // 2
        x0 = torch.randint(0, w, (b, 1, 1), device=dev) - cw // 2
        ys = torch.arange(h, device=dev).view(1, h, 1)
        xs = torch.arange(w, device=dev).view(1, 1, w)
        inside = (ys >= y0) & (ys < y0 + ch) & (xs >= x0) & (xs < x0 + cw)
        x = x * (~inside).unsqueeze(1).to(dt)
    return x


def parse_augment(policy: str) -> tuple[str, ...]:
    """'translation,cutout,color' (or '' / 'none') as a tuple; unknown names are a ValueError."""
    names = tuple(p.strip() for p in policy.split(",") if p.strip() and p.strip() != "none")
    bad = [n for n in names if n not in AUGMENTS]
    if bad:
        raise ValueError(
            f"options.diff_augment: unknown transform {bad[0]!r} (choose from {', '.join(AUGMENTS)})"
        )
    return names


def d_loss(d_real: torch.Tensor, d_fake: torch.Tensor, kind: str) -> torch.Tensor:
    """The discriminator's loss: hinge (max(0, 1 - real) + max(0, 1 + fake)) or BCE."""
    if kind == "hinge":
        return F.relu(1.0 - d_real).mean() + F.relu(1.0 + d_fake).mean()
    bce = F.binary_cross_entropy_with_logits
    return bce(d_real, torch.ones_like(d_real)) + bce(d_fake, torch.zeros_like(d_fake))


def g_loss(d_fake: torch.Tensor, kind: str) -> torch.Tensor:
    """The generator's adversarial loss: -D(G(z)) for hinge, non-saturating BCE otherwise."""
    if kind == "hinge":
        return -d_fake.mean()
    return F.binary_cross_entropy_with_logits(d_fake, torch.ones_like(d_fake))


def standardize_rows(v: torch.Tensor) -> torch.Tensor:
    """Each row to zero mean and unit spread: a K-vector then lies on N(0, I_K)'s typical shell.

    The generator is trained on N(0, I) latents (norm about sqrt(K), zero mean); teacher
    log-probabilities / tau_g sit far off that (all negative, mean about -log K / tau_g and
    below), so G would be differentiated where it was never trained. Standardising keeps the
    ranking and relative gaps of the answer and puts it where G learned.
    """
    v = v - v.mean(dim=1, keepdim=True)
    return v / v.pow(2).mean(dim=1, keepdim=True).sqrt().clamp_min(1e-6)


def generator_input(v: torch.Tensor, g_input: str, tau_g: float) -> torch.Tensor:
    """What distillation feeds G for a teacher or student vector v: v / tau_g or its z-score."""
    return standardize_rows(v) if g_input == "standardized" else v / tau_g


def answer_latents(
    answers: torch.Tensor,
    n: int,
    noise: float,
    g_input: str,
    tau_g: float,
    gen: torch.Generator | None = None,
) -> torch.Tensor:
    """n latents matched to the teacher's answers: in(t) of a random answer plus noise * N(0, I).

    G trained on these sees, in deprivatization, the range distillation later feeds it (in(t) and
    in(s)); N(0, I) latents sit elsewhere (log-probabilities / tau_g are all negative).
    """
    idx = torch.randint(len(answers), (n,), generator=gen)
    base = generator_input(answers[idx].float().cpu(), g_input, tau_g)
    return base + noise * torch.randn(base.shape, generator=gen)


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
    return 1.0 / torch.bincount(labels)[labels].double()


def distill_loss(
    generator: nn.Module,
    s: torch.Tensor,
    t: torch.Tensor,
    tau: float,
    tau_g: float,
    beta: float,
    align: str = "l1",
    g_input: str = "scaled",
    align_weight: float = 1.0,
    hard: bool = False,
) -> dict[str, torch.Tensor]:
    """MEKD's distillation terms: align_weight * align(G(in(s)), G(in(t))) and beta * KL at tau.

    in(v) is v / tau_g (`g_input=scaled`, the paper) or standardize_rows(v) (`standardized`).
    With align_weight 0 the generator is not run (the term is a constant 0). With `hard`, t is a
    one-hot answer and the KL term is taken against it as it is (cross-entropy of s / tau on the
    label): softmax(one-hot / tau), as a soft answer would be read, is nearly uniform.
    """
    if align_weight > 0:
        with torch.no_grad():
            target = generator(generator_input(t, g_input, tau_g))
        recon = generator(generator_input(s.float(), g_input, tau_g))
        dist = F.l1_loss(recon, target) if align == "l1" else F.mse_loss(recon, target)
        dist = dist * align_weight
    else:
        dist = s.new_zeros((), dtype=torch.float32)
    log_p_s = F.log_softmax(s.float() / tau, dim=1)
    if hard:
        kl = F.nll_loss(log_p_s, t.argmax(1))
    else:
        kl = F.kl_div(log_p_s, F.softmax(t / tau, dim=1), reduction="batchmean")
    return {"align": dist, "kl": beta * kl}
