"""MEKD's typed options (with validation) and the reading of an earlier run's G and D weights."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from distillkit.errors import ConfigError
from distillkit.methods.blackbox import BlackBoxOptions
from distillkit.methods.mekd_gan import parse_augment
from distillkit.models.checkpoint import CheckpointError, load_checkpoint


@dataclass
class MEKDOptions(BlackBoxOptions):
    """MEKD's knobs (paper values unless methods/mekd.py or README says why they changed)."""

    gan_epochs: int = 10  # deprivatization epochs before distillation starts
    # D/G updates per trainer step (fresh latents, same edge batch). The defaults (1 update, width
    # 16) keep one run within 20 minutes on one CPU thread; the 5 x width-128 GAN took over an hour
    # there and did not beat the small one on the validation split (README's F-MNIST tables)
    gan_steps_per_batch: int = 1
    gan_lr: float = 1e-4  # the generator's Adam lr
    gan_d_lr: float | None = 8e-4  # the discriminator's (two time scales); None: gan_lr
    gan_beta1: float = 0.0
    gan_beta2: float = 0.9
    gen_width: int = 16
    minibatch_std: bool = True  # discriminator sees the batch spread (counters mode collapse)
    spectral_norm: bool = True  # spectral normalisation of every discriminator layer
    gan_loss: str = "hinge"  # hinge | bce
    diff_augment: str = "translation,cutout,color"  # applied to real and fake before D ('' off)
    diag_batch: int = 16  # fixed G(z) asked each GAN epoch for the diagnostics (counted); 0 off
    im_weight: float = 0.5  # alpha in the generator loss
    im_batch: int | None = None  # generated images per IM query (default: the batch size)
    gan_query_fraction: float = 0.0  # share of the budget spent on the IM term (0: IM off)
    tau: float = 5.0  # KL temperature (soft answers)
    hard_tau: float = 1.0  # hard answers: cross-entropy of student logits / hard_tau on the label
    tau_g: float = 5.0  # temperature of the vectors fed to the generator (g_input=scaled)
    g_input: str = "scaled"  # scaled (v / tau_g, the paper) | standardized (per-row z-score)
    beta: float = 25.0  # weight of the KL term (soft answers; tau^2, as KD scales it)
    hard_beta: float = 5.0  # weight of the cross-entropy term (hard answers)
    align: str = "l1"  # l1 | l2
    align_weight: float = 1.0  # weight of the align term (0: no generator passes in distillation)
    transfer_size: int | None = None  # fixed transfer set size (default: the budget's rest)
    balance: bool = True  # draw the transfer set with equal weight per teacher class
    # share of each distillation batch from answered edge images (0: none, the paper). None: 1 with
    # soft answers (generated images cost more than they teach there), 0.5 with hard answers
    edge_share: float | None = None
    edge_first: bool = True  # buy every edge image the budget allows first, generated ones after
    # G's latents: "normal" N(0, I) (the paper) or "answers": in(t) of a teacher answer on an
    # edge image plus latent_noise * N(0, I), so G learns the range distillation feeds it (the
    # edge images are then bought before deprivatization; needs edge_first and edge_share > 0).
    # None: answers with soft answers when edge images come first, normal otherwise (measured)
    latents: str | None = None
    latent_noise: float = 1.0
    # drop generated transfer images whose teacher top probability is below this (soft answers;
    # they were paid for: this trades budget for cleaner targets). 0: keep all
    min_confidence: float = 0.0
    kt_oversample: int = 4  # query_selection=kt picks the transfer set from this many x candidates
    generator: str | None = None  # run dir of an earlier mekd run to take G and D from

    def resolved(self, kind: str) -> MEKDOptions:
        """A copy with the per-kind defaults of edge_share and latents (kind: "soft" or "hard")."""
        soft = kind == "soft"
        share = self.edge_share if self.edge_share is not None else (1.0 if soft else 0.5)
        latents = self.latents
        if latents is None:
            latents = "answers" if soft and self.edge_first and share > 0 else "normal"
        return replace(self, edge_share=share, latents=latents)

    def validate(self) -> None:
        """Check the values."""
        super().validate()
        bounds = (
            (
                ("gan_epochs", "align_weight", "diag_batch", "latent_noise"),
                ">= 0",
                lambda v: v >= 0,
            ),
            (("gan_steps_per_batch", "kt_oversample"), ">= 1", lambda v: v >= 1),
            (("gan_lr", "tau", "tau_g", "hard_tau", "hard_beta"), "> 0", lambda v: v > 0),
            (("gan_d_lr",), "> 0 or null", lambda v: v is None or v > 0),
            (("im_batch", "transfer_size"), ">= 1 or null", lambda v: v is None or v >= 1),
            (("edge_share",), "in [0, 1]", lambda v: v is None or 0.0 <= v <= 1.0),
            (
                ("gan_query_fraction", "gan_beta1", "gan_beta2", "min_confidence"),
                "in [0, 1)",
                lambda v: 0.0 <= v < 1.0,
            ),
        )
        for names, rule, ok in bounds:
            for name in names:
                if not ok(getattr(self, name)):
                    raise ValueError(f"options.{name} must be {rule}, got {getattr(self, name)}")
        if self.gan_epochs == 0 and not self.generator:
            raise ValueError(
                "options.gan_epochs=0 needs options.generator=RUN_DIR of a trained GAN"
            )
        choices = {"align": ("l1", "l2"), "gan_loss": ("hinge", "bce")}
        choices["g_input"] = ("scaled", "standardized")
        if self.latents is not None:
            choices["latents"] = ("normal", "answers")
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"options.{name} must be {' or '.join(allowed)}, got {getattr(self, name)!r}"
                )
        if self.gen_width < 8 or self.gen_width % 8:
            raise ValueError(f"options.gen_width must be a multiple of 8, got {self.gen_width}")
        edge = self.edge_share is None or self.edge_share > 0
        if self.latents == "answers" and not (self.edge_first and edge):
            raise ValueError(
                "options.latents=answers draws on the answered edge images: it needs "
                "edge_first=true and edge_share > 0"
            )
        parse_augment(self.diff_augment)


def read_run_weights(run_dir: str, part: str = "distiller") -> dict[str, Any]:
    """A part of a run's last checkpoint, read as data only: the trained module weights
    ("distiller", the default) or the method's "extra_state"."""
    try:
        state = load_checkpoint(run_dir, which="last")
    except CheckpointError as exc:
        raise ConfigError(f"options.generator: {exc}") from None
    weights = state.get(part)
    if not isinstance(weights, dict):
        raise ConfigError(f"options.generator: {run_dir} is not a distillkit run checkpoint")
    return weights
