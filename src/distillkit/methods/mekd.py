"""MEKD (Lin et al., CVPR 2024): black-box KD through a generator that inverts the teacher.

One method, two phases chosen by the epoch (`on_epoch_start`):

1. Deprivatization, epochs [0, gan_epochs): a DCGAN whose latent size is the number of classes
   learns the edge's (unlabeled) images, `gan_steps_per_batch` D/G updates per trainer step (fresh
   latents, same edge batch; a small edge set gives a few dozen batches an epoch). Default 1 update
   and `gen_width` 16: with edge images first (align off, beta 5), 5 updates at width 128 did not
   beat it on the validation split (85.3 vs 85.8) at over ten times the cost (over an hour on one
   CPU thread, ~3.5 min on a GPU). D: spectral norm on every layer, minibatch-std feature, hinge
   loss (`spectral_norm`, `minibatch_std`, `gan_loss`); real and fake images both pass the same
   kind of random differentiable augmentation before D (`diff_augment`, DiffAugment: translation,
   cutout, brightness/contrast), so D cannot memorise a few thousand real images; two time scales
   (Adam, G `gan_lr` 1e-4, D `gan_d_lr` 8e-4, betas (0, 0.9)). The paper's IM term
   ``-mean_i w_i log D(G(z_i))`` (w_i the teacher's top probability on G(z_i), 1 for hard answers;
   the public code's argmax-index weight is not copied) buys `gan_query_fraction` of the budget
   spread over the updates (`im_batch` per query); off by default (see the table).
   Diagnostics per GAN epoch in metrics.jsonl (methods/mekd_diag.py): D's accuracy, and on a fixed
   batch of `diag_batch` G(z) (bought, counted) the teacher's mean top probability, classes
   covered and the entropy of its class histogram.
2. Distillation, the remaining epochs: G is frozen (eval mode) but differentiated through. For an
   image x with answer t: ``align_weight * align(G(in(s(x))), G(in(t))) + beta * KL_tau(t || s)``,
   align L1 (or L2), in(v) = v / tau_g (the paper; `g_input=standardized`: per-row z-score, which
   puts v on N(0, I)'s shell). Soft t are **log-probabilities** (an API returns probabilities: log p
   is the logits up to a per-row constant). Hard t are one-hot in the align term and the second
   term is the cross-entropy of s / hard_tau on the label: read as logits at tau 5 a one-hot
   would be a nearly uniform target (the old handicap of hard answers). Its weight is `hard_beta`
   (5), the soft KL's `beta` (25 = tau^2, the scale KD gives its KL; the paper's 5 under-trained).
   Budget (`edge_first`, default): every edge image the budget allows is asked once (chosen by
   `query_selection`), then the rest buys a fixed transfer set of generated images (latents in the
   checkpoint, images regenerated once by the frozen G, answers kept); each batch takes
   `edge_share` of its rows from the edge images (all of them while no generated set exists).
   Without `edge_first`, `edge_share` is also the budget's share for edge images; `edge_share=0`
   distils on generated images only (the paper), whatever `edge_first` says. Generated images
   are drawn class-balanced by the teacher's answer (`balance`). With neither budget nor
   `transfer_size`, fresh G(z) are asked at every step. Defaults per kind of answer
   (`MEKDOptions.resolved`, chosen on the F-MNIST validation split, README): soft answers distil on
   edge images only (`edge_share` 1: a generated image teaches less than it costs), G trained on
   `latents=answers` (in(t) of the teacher's answers on edge images plus N(0, I) noise, the range
   distillation feeds G; those edge images bought before deprivatization); hard answers take half
   of each batch from generated images, N(0, I) latents. (`min_confidence`: measured, it hurts.)

Measured on digits (seed 0; resnet20 teacher 98.0%, cnn_small, 30 epochs with 10 GAN epochs of
5 updates a batch, gen_width 64, budget 5000 > the 1347 edge images, test split):

| variant (digits, generated images only unless said)              | test acc |
|------------------------------------------------------------------|----------|
| blackbox_kd / blackbox_hard (all 1347 edge images)               | 98.4 / 98.9 |
| old GAN (BCE, no SN/DiffAugment, lr 2e-4 both), constant lr     | 84.0 |
| SN + hinge + DiffAugment, same lr, constant / cosine lr         | 84.9 / 78.0 |
| + two time scales (G 1e-4, D 8e-4, betas 0/0.9), cosine          | 89.6 |
| + IM term off (gan_query_fraction 0.3 -> 0): kept               | 91.6 |
| align off / g_input standardized (before TTUR; vs 78.0)         | 74.9 / 78.7 |
| hard: KL_5 on one-hot as logits / KL_1 / cross-entropy: kept    | 64.9 / 83.6 / 89.6 |
| hard, cross-entropy + g_input standardized                      | 87.1 |
| edge_first, edge_share 0.5, soft / hard                          | 98.4 / 98.9 |
| final defaults, soft (constant lr) / hard (cosine; 94.7 constant) | 98.4 / 98.4 |
| final defaults with edge_share 0 (paper), soft / hard (cosine)   | 89.3 / 86.7 |

The Fashion-MNIST measurements the defaults were chosen on (benchmarks/mekd_fmnist.py, validation
split) are README's "Black-box KD on Fashion-MNIST" tables; every run is a line of
benchmarks/results/mekd_fmnist.jsonl.

Optimisation is manual (`automatic_optimization = False`): three optimizers for the trainer,
"student" (the run's optimizer/lr/schedule, the schedule counted from the first distillation
epoch), "generator" and "discriminator" (Adam, constant). A GAN step backs the D loss, then the G
loss, through `manual_backward` (autocast off) and steps D, then G, through `optimizer_step`; a
distillation step does the same for the student; no optimizer is stepped twice or behind the
trainer's back. The trainer checkpoints all three optimizers; latents, answers, GAN step and spent
count are extra state, so `distillkit resume` continues either phase exactly; the exported
`student` is the plain model. `options.generator=RUN_DIR` loads G and D from an earlier mekd run
(then `gan_epochs=0` skips deprivatization). With `amp=fp16` the loss scaler allows one step of
each optimizer per batch, so `gan_steps_per_batch` must be 1 there. MEKD runs in one process; its
per-step draws are made for the global batch, each process keeping its rows (`take_rows`).
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import torch
from torch import nn

from distillkit.data.transforms import draw_size, normalize, take_rows
from distillkit.errors import ConfigError
from distillkit.methods.base import Batch, OptimizerConfig, SetupContext
from distillkit.methods.blackbox import (
    BudgetedDistiller,
    check_single_process,
    make_teacher,
    select_queries,
)
from distillkit.methods.mekd_diag import diagnostics
from distillkit.methods.mekd_gan import (
    Discriminator,
    Generator,
    answer_latents,
    class_balance_weights,
    d_loss,
    diff_augment,
    distill_loss,
    g_loss,
    generator_input,
    im_term,
    im_weights,
    parse_augment,
    teacher_vector,
)
from distillkit.methods.mekd_options import MEKDOptions, read_run_weights
from distillkit.methods.optim import build_optimizer, lr_factor
from distillkit.methods.registry import register_method
from distillkit.teachers.base import BudgetExceededError


class MEKD(BudgetedDistiller):
    """Deprivatization (GAN + IM) then distillation through the frozen generator."""

    automatic_optimization = False

    def __init__(
        self,
        student: nn.Module,
        teacher: Any,
        options: MEKDOptions,
        bundle: Any,
        batch_size: int,
        seed: int = 0,
    ):
        super().__init__(student, teacher, options, bundle.num_classes)
        self.kind = teacher.kind if teacher.kind in ("soft", "hard") else options.response
        options = options.resolved(self.kind)  # the defaults measured per kind of answer
        if options.min_confidence > 0 and self.kind == "hard":  # a label carries no confidence
            raise ConfigError("options.min_confidence needs soft answers, not labels")
        self.options: MEKDOptions = options
        self.use_edge(bundle, seed)
        self.generator = Generator(
            bundle.num_classes, bundle.in_channels, bundle.image_size, options.gen_width
        )
        self.discriminator = Discriminator(
            bundle.in_channels,
            bundle.image_size,
            options.gen_width,
            options.minibatch_std,
            options.spectral_norm,
        )
        self.augment = parse_augment(options.diff_augment)
        # what an answer is kept as: log-probabilities, or the one-hot label (teacher_vector)
        self.answer_vector = partial(teacher_vector, num_classes=bundle.num_classes)
        self.stats: dict[str, float] = {}  # this epoch's diagnostic sums (reset at epoch start)
        self.phase = "gan" if options.gan_epochs > 0 else "distill"
        self.im_batch = options.im_batch or batch_size
        self.gan_queries = (
            None if options.budget is None else int(options.budget * options.gan_query_fraction)
        )
        self.im_every = 1  # GAN updates between IM queries; setup() spreads the budget
        self.gan_step = self.gan_spent = 0
        self.pool_z: torch.Tensor | None = None
        self._pool_x: torch.Tensor | None = None  # pool_z's images (a cache, see pool_images)
        self.pool_t: torch.Tensor | None = None
        self.edge_idx: torch.Tensor | None = None
        self.edge_t: torch.Tensor | None = None
        self.transfer_ready = False  # build_transfer_set has run (edge answers may come earlier)

    # -- contract: setup and optimizers --------------------------------------------------------
    def setup(self, ctx: SetupContext) -> None:
        """Spread the deprivatization queries evenly over the run's GAN updates."""
        super().setup(ctx)
        o = self.options
        total_steps = max(1, o.gan_epochs * ctx.steps_per_epoch * o.gan_steps_per_batch)
        if self.gan_queries is not None:
            planned = self.gan_queries // self.im_batch
            self.im_every = math.ceil(total_steps / planned) if planned > 0 else 0

    def configure_optimizers(self) -> list[OptimizerConfig]:
        """The run's optimizer for the student (schedule from distillation start), G's, D's Adam."""
        if self.context is None:
            raise RuntimeError("MEKD.configure_optimizers needs setup(ctx) first")
        cfg, spe, o = self.context.cfg, self.context.steps_per_epoch, self.options
        betas = (o.gan_beta1, o.gan_beta2)
        # the student idles through the GAN epochs: its warm-up and schedule span the epochs it
        # trains in; in the GAN phase the factor is the first distillation step's (shown, unused)
        start, epochs = o.gan_epochs * spe, cfg.epochs - o.gan_epochs
        return [
            OptimizerConfig(
                build_optimizer(cfg, [p for p in self.student.parameters() if p.requires_grad]),
                lr_lambda=lambda step: lr_factor(cfg, max(0, step - start), spe, epochs),
                grad_clip=cfg.grad_clip,
                name="student",
            ),
            OptimizerConfig(
                torch.optim.Adam(self.generator.parameters(), lr=o.gan_lr, betas=betas),
                name="generator",
            ),
            OptimizerConfig(
                torch.optim.Adam(
                    self.discriminator.parameters(), lr=o.gan_d_lr or o.gan_lr, betas=betas
                ),
                name="discriminator",
            ),
        ]

    def _opt(self, name: str) -> OptimizerConfig:
        return next(o for o in self.optimizers() if o.name == name)

    # -- helpers -----------------------------------------------------------------------------------
    def generate(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised images from latents (tanh output mapped to [0, 1] pixels first)."""
        return normalize((self.generator(z) + 1.0) * 0.5, self.mean, self.std)

    def on_epoch_start(self, epoch: int) -> None:
        """Pick the phase from the epoch (the trainer calls this at each epoch start)."""
        self.phase = "gan" if epoch < self.options.gan_epochs else "distill"
        self.stats = {}

    def _add(self, **values: float) -> None:
        for name, v in values.items():
            self.stats[name] = self.stats.get(name, 0.0) + v

    def on_epoch_end(self, epoch: int) -> dict[str, float]:
        """This epoch's diagnostics for metrics.jsonl (see `diagnostics`)."""
        return diagnostics(self, epoch)

    def load_generator(self, run_dir: str) -> None:
        """Take G and D from an earlier mekd run's last checkpoint."""
        state = read_run_weights(run_dir)
        for name in ("generator", "discriminator"):
            prefix = f"{name}."
            part = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            if not part:
                raise ConfigError(f"{run_dir} holds no MEKD {name}; is it an mekd run?")
            try:
                getattr(self, name).load_state_dict(part)
            except RuntimeError as exc:
                first = str(exc).strip().splitlines()[0]
                raise ConfigError(
                    f"the {name} in {run_dir} does not match this run "
                    f"(gen_width, image size, classes): {first}"
                ) from None

    # -- deprivatization ---------------------------------------------------------------------------
    def sample_latents(self, n: int, gen: torch.Generator | None = None) -> torch.Tensor:
        """n latents on the CPU: N(0, I), or matched to the answered edge images (`latents`)."""
        o = self.options
        if o.latents == "normal":
            return torch.randn(n, self.num_classes, generator=gen)
        assert self.edge_t is not None
        return answer_latents(self.edge_t, n, o.latent_noise, o.g_input, o.tau_g, gen)

    def gan_latents(self, x: torch.Tensor) -> torch.Tensor:
        """Generator noise for the edge batch x: drawn for the global batch, this rank's rows."""
        if self.options.latents == "normal":
            return take_rows(torch.randn(draw_size(x), self.num_classes, device=x.device), x)
        self.answer_edge_first(x.device)  # the answers the latents match, bought now
        return take_rows(self.sample_latents(draw_size(x)).to(x.device), x)

    def gan_step_losses(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """One discriminator step and one generator step on an edge batch; losses detached."""
        opt_d, opt_g = self._opt("discriminator"), self._opt("generator")
        with torch.enable_grad(), torch.autocast(x.device.type, enabled=False):
            x = x.float()
            self.generator.train()
            self.discriminator.train()
            kind, aug = self.options.gan_loss, self.augment
            fake = self.generate(self.gan_latents(x))
            d_real = self.discriminator(diff_augment(x, aug))
            d_fake = self.discriminator(diff_augment(fake.detach(), aug))
            loss_d = d_loss(d_real, d_fake, kind)
            self.manual_backward(loss_d)
            self.optimizer_step(opt_d)
            right = (d_real > 0).sum() + (d_fake < 0).sum()  # comparisons: no graph
            self._add(d_right=float(right), d_seen=2.0 * x.shape[0])

            d_fake = self.discriminator(diff_augment(fake, aug))
            adv = g_loss(d_fake, kind)
            im = torch.zeros((), device=x.device)
            if self._query_this_step():
                k = min(self.im_batch, x.shape[0])
                with torch.no_grad():
                    out = self.query(fake[:k].detach())
                self.gan_spent += k
                weights = im_weights(out).to(x.device)
                im = self.options.im_weight * im_term(d_fake[:k], weights)
                self._add(im_top=float(weights.sum()), im_seen=float(k))
            self.manual_backward(adv + im)
            self.optimizer_step(opt_g)
            # the G loss also reached D's parameters: those gradients belong to no step
            opt_d.optimizer.zero_grad(set_to_none=True)
        self.gan_step += 1
        return {"gan_d": loss_d.detach(), "gan_g": adv.detach(), "gan_im": im.detach()}

    def _query_this_step(self) -> bool:
        if self.im_every == 0 or self.gan_step % self.im_every:
            return False
        if self.gan_queries is not None and self.gan_spent + self.im_batch > self.gan_queries:
            return False
        return self.remaining is None or self.remaining >= self.im_batch

    # -- distillation ------------------------------------------------------------------------------
    @property
    def fresh_queries(self) -> bool:
        """No budget and no transfer_size: generated images are asked fresh at every step."""
        return self.options.budget is None and self.options.transfer_size is None

    def answer_edge_first(self, device: torch.device) -> None:
        """Ask about every edge image the budget allows, once (nothing when already bought)."""
        if self.edge_t is not None:
            return
        size = len(self.edge) if self.fresh_queries else self.transfer_size()
        if size < 1:
            raise BudgetExceededError("no query budget left for MEKD's edge answers")
        self.edge_idx, self.edge_t = self.answer_edge(size, device, self.answer_vector)

    def transfer_size(self) -> int | None:
        """Images the transfer set may hold, edge answers already bought included."""
        left, cap = self.remaining, self.options.transfer_size
        if left is None:
            return cap
        if self.edge_t is not None:
            left += len(self.edge_t)
        return left if cap is None else min(left, cap)

    def keep_mask(self, t: torch.Tensor) -> torch.Tensor:
        """Rows of answers t to distil on: the teacher's top probability >= min_confidence."""
        if self.options.min_confidence <= 0:
            return torch.ones(len(t), dtype=torch.bool, device=t.device)
        return t.exp().max(1).values >= self.options.min_confidence

    def build_transfer_set(self, device: torch.device) -> None:
        """Spend the remaining budget once: answered edge images (edge_share) and generated ones."""
        self.transfer_ready = True
        if self.fresh_queries:
            # unlimited teacher, no set size: the whole edge set once, generated images per step
            if self.options.edge_share > 0:
                self.answer_edge_first(device)
            return
        size = self.transfer_size()
        if size < 1:
            raise BudgetExceededError(
                "no query budget left for MEKD's transfer set; lower options.gan_query_fraction"
            )
        o = self.options
        if o.edge_share > 0:
            if o.edge_first:  # every edge image the budget allows, generated ones with the rest
                self.answer_edge_first(device)
            else:
                n_edge = min(len(self.edge), max(1, round(o.edge_share * size)))
                self.edge_idx, self.edge_t = self.answer_edge(n_edge, device, self.answer_vector)
            size -= len(self.edge_t)
        if o.edge_share >= 1.0 or size < 1:  # edge rows only: buy no generated image
            self.pool_z, self.pool_t = torch.zeros(0, self.num_classes), None
            return
        gen = torch.Generator().manual_seed(self.seed + 1)
        if o.query_selection == "kt" and o.kt_oversample > 1:
            cand = self.sample_latents(size * o.kt_oversample, gen)
            with torch.no_grad():
                feats = torch.cat(
                    [self.generate(c.to(device)).flatten(1).cpu() for c in cand.split(1024)]
                )
            idx = select_queries(feats.double().numpy(), size, "kt", self.seed)
            z = cand[torch.from_numpy(idx)]
        else:
            z = self.sample_latents(size, gen)
        t = self.query_all(z, lambda part: self.generate(part.to(device)), self.answer_vector)
        keep = self.keep_mask(t)  # paid for either way; only confident answers are distilled on
        self.pool_z, self.pool_t = z[keep], (t[keep] if keep.any() else None)
        if self.pool_t is None and self.edge_idx is None:
            raise ConfigError(
                f"options.min_confidence={o.min_confidence} dropped every generated image and "
                "there are no edge images to distil on; lower it"
            )

    def pool_images(self, device: torch.device) -> torch.Tensor:
        """The transfer set's images, generated once by the frozen G (not checkpointed: the
        latents are, and the frozen, eval-mode G maps them to the same images after a resume)."""
        assert self.pool_z is not None
        if self._pool_x is None or self._pool_x.device != device:
            with torch.no_grad():
                self._pool_x = torch.cat(
                    [self.generate(z.to(device)) for z in self.pool_z.split(1024)]
                )
        return self._pool_x

    def sample_pool(self, b: int) -> torch.Tensor:
        """Indices into the transfer set; with `balance`, each teacher class equally likely."""
        assert self.pool_t is not None
        if not self.options.balance:
            return torch.randint(len(self.pool_t), (b,))
        return torch.multinomial(class_balance_weights(self.pool_t.argmax(1)), b, replacement=True)

    def distill_batch(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images and teacher vectors to distil on for the edge batch x (its size, its rows).

        The batch is planned for the global batch (edge rows first, then generated ones) and this
        process keeps its rows, so ranks never draw the same samples.
        """
        device = x.device
        # the generator is differentiated through, never updated
        self.generator.eval().requires_grad_(False)
        fresh = self.fresh_queries
        if not self.transfer_ready:
            self.build_transfer_set(device)
        n = draw_size(x)
        rows = take_rows(torch.arange(n), x)
        parts_x, parts_t = [], []
        n_edge = 0
        if self.edge_idx is not None:
            generated = fresh or self.pool_t is not None
            n_edge = round(self.options.edge_share * n) if generated else n
            sel = torch.randint(len(self.edge_idx), (n_edge,))[rows[rows < n_edge]]
            parts_x.append(self.edge_batch(self.edge_idx[sel], device))
            parts_t.append(self.edge_t[sel].to(device))
        mine = rows[rows >= n_edge] - n_edge
        if n > n_edge:
            with torch.no_grad():
                if fresh:
                    z = self.sample_latents(n - n_edge).to(device)[mine.to(device)]
                    if len(mine):
                        xg = self.generate(z)
                        t = self.answer_vector(self.query(xg)).to(device)
                        keep = self.keep_mask(t)
                        keep[t.max(1).values.argmax()] = True  # never an empty batch
                        parts_t.append(t[keep])
                        parts_x.append(xg[keep])
                else:
                    sel = self.sample_pool(n - n_edge)[mine]
                    if len(mine):
                        parts_x.append(self.pool_images(device)[sel.to(device)])
                        parts_t.append(self.pool_t[sel].to(device))
        return torch.cat(parts_x), torch.cat(parts_t)

    def distill_losses(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """MEKD's distillation loss on a batch the size of x: generated and answered edge images."""
        xg, t = self.distill_batch(x)
        s = self.student(xg)
        o = self.options
        with torch.no_grad():
            # where G's inputs sit against the N(0, I) latents it was trained on
            for who, v in (("t", t), ("s", s.float())):
                v = generator_input(v, o.g_input, o.tau_g)
                self._add(**{f"g_in_{who}_mean": float(v.mean()) * len(v)})
                self._add(**{f"g_in_{who}_sq": float(v.pow(2).mean()) * len(v)})
            self._add(g_in_rows=float(len(t)))
        hard = self.kind == "hard"
        tau, beta = (o.hard_tau, o.hard_beta) if hard else (o.tau, o.beta)
        return distill_loss(
            self.generator, s, t, tau, o.tau_g, beta, o.align, o.g_input, o.align_weight, hard
        )

    # -- Distiller contract ------------------------------------------------------------------------
    def training_step(self, batch: Batch) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        """A GAN step (no student logits) or a distillation step, optimizers stepped here.

        The logits of a distillation step are monitoring predictions on the edge batch.
        """
        x, _, _ = batch
        if self.phase == "gan":
            k = self.options.gan_steps_per_batch
            steps = [self.gan_step_losses(x) for _ in range(k)]
            return None, {name: sum(s[name] for s in steps) / k for name in steps[0]}
        losses = self.distill_losses(x)
        logits = self.monitor_logits(x)
        self.manual_backward(sum(losses.values()))
        self.optimizer_step(self._opt("student"))
        return logits, {name: v.detach() for name, v in losses.items()}

    def train(self, mode: bool = True) -> MEKD:
        """Student follows `mode`; the generator stays frozen (eval) once distillation started."""
        super().train(mode)
        if self.phase == "distill":
            self.generator.eval()
        return self

    def extra_state(self) -> dict[str, Any]:
        """Spent counts, the GAN step and the transfer set (the trainer saves the optimizers)."""
        return {
            **super().extra_state(),
            "gan_step": self.gan_step,
            "gan_spent": self.gan_spent,
            "pool_z": self.pool_z,
            "pool_t": self.pool_t,
            "edge_idx": self.edge_idx,
            "edge_t": self.edge_t,
            "transfer_ready": self.transfer_ready,
        }

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Inverse of extra_state."""
        super().load_extra_state(state)
        self.gan_step = int(state.get("gan_step", 0))
        self.gan_spent = int(state.get("gan_spent", 0))
        self.pool_z, self.pool_t = state.get("pool_z"), state.get("pool_t")
        self._pool_x = None
        self.edge_idx, self.edge_t = state.get("edge_idx"), state.get("edge_t")
        built = self.pool_z is not None or self.edge_idx is not None  # files without the key
        self.transfer_ready = bool(state.get("transfer_ready", built))


@register_method(
    "mekd",
    options=MEKDOptions,
    needs_teacher=False,
    description="MEKD: black-box KD via a generator inverting the teacher (soft or hard answers)",
)
def build(cfg, options, student, teacher, bundle) -> MEKD:
    """Registry builder: teacher from options.teacher_url or teacher= (wrapped as a black box)."""
    check_single_process("mekd")
    if options.gan_epochs >= cfg.epochs:
        raise ConfigError(
            f"options.gan_epochs ({options.gan_epochs}) must be < epochs ({cfg.epochs}): "
            "the remaining epochs distil the student"
        )
    if cfg.amp == "fp16" and options.gan_steps_per_batch > 1:
        raise ConfigError(
            "options.gan_steps_per_batch > 1 needs amp=none or amp=bf16: the fp16 loss scaler "
            "steps each optimizer once per batch"
        )
    bb = make_teacher(cfg, options, teacher, bundle)
    distiller = MEKD(student, bb, options, bundle, cfg.batch_size, cfg.seed)
    if options.generator:
        distiller.load_generator(options.generator)
    return distiller
