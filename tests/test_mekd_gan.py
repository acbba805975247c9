"""MEKD's generator training: diagnostics in metrics.jsonl, class coverage of a short digits run,
DiffAugment, spectral norm, hinge loss, two time scales, edge-first budgets, hard-answer loss."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from distillkit.cli import main
from distillkit.config import config_from_dict
from distillkit.data.transforms import normalize
from distillkit.engine.trainer import Trainer
from distillkit.methods.mekd import MEKD, Discriminator, MEKDOptions, read_run_weights
from distillkit.methods.mekd_gan import (
    Generator,
    d_loss,
    diff_augment,
    distill_loss,
    g_loss,
    standardize_rows,
)
from distillkit.models import build_model
from distillkit.models.checkpoint import model_from_checkpoint
from distillkit.teachers import BlackBoxTeacher


@pytest.fixture(scope="module")
def short_run(digits_mlp_teacher, tmp_path_factory):
    """A short digits MEKD run with the default GAN: 2 GAN epochs of 5 updates per batch."""
    out = tmp_path_factory.mktemp("mekd_gan") / "run"
    args = [
        "distill",
        "method=mekd",
        f"teacher={digits_mlp_teacher}",
        "model=mlp",
        "epochs=3",
        "batch_size=64",
        "augment=false",
        "options.gan_epochs=2",
        "options.gan_steps_per_batch=5",
        "options.gen_width=32",
        "options.budget=2000",
        "options.diag_batch=40",
        "options.im_batch=16",
        "options.edge_share=0.5",  # generated images too (soft answers default to edge ones only)
        "options.latents=normal",  # the paper's N(0, I) latents (the default with hard answers)
        f"out_dir={out}",
        "--quiet",
    ]
    assert main(args) == 0
    return out


def rows(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------- diagnostics


def test_gan_diagnostics_are_logged_every_gan_epoch_and_counted(short_run):
    r = rows(short_run)
    assert len(r) == 3
    for row in r[:2]:
        for key in ("gan_d_acc", "gan_top_prob", "gan_classes", "gan_class_entropy"):
            assert key in row, (key, sorted(row))
        assert 0.0 <= row["gan_d_acc"] <= 100.0
        assert 1.0 / 10 <= row["gan_top_prob"] <= 1.0
        assert 1 <= row["gan_classes"] <= 10
        assert 0.0 <= row["gan_class_entropy"] <= torch.log(torch.tensor(10.0)).item() + 1e-6
    # the distillation epoch reports where G's inputs sit and the transfer set's classes
    assert {"g_in_t_mean", "g_in_t_rms", "g_in_s_mean", "g_in_s_rms"} <= set(r[2])
    # each GAN epoch's diagnostic batch (40 images) was bought from the budget beyond the 1347
    # edge images: the queries after epoch 1 include it; the run spent exactly its budget
    assert r[0]["teacher_queries"] >= 40
    assert r[-1]["teacher_queries"] == 2000


def test_diagnostics_cost_nothing_off_and_never_displace_edge_answers(
    digits_mlp_teacher, digits_bundle
):
    m = make(digits_mlp_teacher, digits_bundle, budget=200, diag_batch=0, latents="normal")
    m.train()
    m.on_epoch_start(0)
    m.training_step((torch.randn(32, 1, 8, 8), torch.zeros(32, dtype=torch.long), None))
    out = m.on_epoch_end(0)
    assert set(out) == {"gan_d_acc"} and m.spent == 0 == m.teacher.queries
    # on by default, but with edge_first only from budget the edge images cannot use
    n = len(digits_bundle.train)
    for latents, edge in (("normal", 0), ("answers", n)):  # answers: edge images bought first
        for budget, bought in ((n, 0), (n + 8, 8)):
            m = make(digits_mlp_teacher, digits_bundle, budget=budget, latents=latents)
            m.train()
            m.on_epoch_start(0)
            m.training_step((torch.randn(32, 1, 8, 8), torch.zeros(32, dtype=torch.long), None))
            out = m.on_epoch_end(0)
            assert m.spent == edge + bought and ("gan_classes" in out) == (bought > 0)


def test_short_digits_run_generator_covers_most_teacher_classes(
    short_run, digits_mlp_teacher, digits_bundle
):
    # measured independently of the run's own diagnostics: its final G, 1000 fresh N(0, I)
    # latents, the teacher's argmax; a class counts when it is at least 1% of the draws
    weights = read_run_weights(str(short_run))
    part = {k[len("generator.") :]: v for k, v in weights.items() if k.startswith("generator.")}
    g = Generator(10, 1, 8, 32)
    g.load_state_dict(part)
    g.eval()
    teacher, _ = model_from_checkpoint(digits_mlp_teacher)
    z = torch.randn(1000, 10, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        labels = teacher(normalize((g(z) + 1) * 0.5, digits_bundle.mean, digits_bundle.std)).argmax(
            1
        )
    counts = torch.bincount(labels, minlength=10)
    assert int((counts >= 10).sum()) >= 8, counts.tolist()


# --------------------------------------------------------------------------- GAN pieces


def test_diff_augment_is_random_per_image_differentiable_and_shape_preserving():
    torch.manual_seed(0)
    x = torch.randn(16, 1, 8, 8, requires_grad=True)
    for policy in (("translation",), ("cutout",), ("color",), ("translation", "cutout", "color")):
        y = diff_augment(x, policy)
        assert y.shape == x.shape
        assert not torch.equal(y, x)
        (g,) = torch.autograd.grad(y.sum(), x)
        assert g.abs().sum() > 0  # the generator's gradient passes through
    # translation moves content: a single bright pixel lands somewhere else in some image
    dot = torch.zeros(64, 1, 8, 8)
    dot[:, :, 4, 4] = 1.0
    moved = diff_augment(dot, ("translation",))
    assert (moved[:, 0, 4, 4] == 0).any() and torch.allclose(
        moved.sum((1, 2, 3)), dot.sum((1, 2, 3))
    )
    # cutout zeroes a block of half the size (clipped at the border), never the whole image
    holes = diff_augment(torch.ones(64, 1, 8, 8), ("cutout",))
    zeros = (holes == 0).sum((1, 2, 3))
    assert zeros.max() == 16 and zeros.min() >= 4
    assert diff_augment(x, ()) is x


def test_gan_step_shows_the_discriminator_augmented_real_and_fake(
    digits_mlp_teacher, digits_bundle
):
    m = make(digits_mlp_teacher, digits_bundle, budget=100)
    seen = []
    handle = m.discriminator.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    m.train()
    m.on_epoch_start(0)
    x = normalize(
        digits_bundle.train.images[:32].float() / 255, digits_bundle.mean, digits_bundle.std
    )
    m.training_step((x, torch.zeros(32, dtype=torch.long), None))
    handle.remove()
    assert len(seen) == 3  # D step: real, fake; G step: fake
    assert not torch.equal(seen[0], x)  # the real batch was augmented before D
    plain = make(digits_mlp_teacher, digits_bundle, budget=100, diff_augment="")
    seen.clear()
    handle = plain.discriminator.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    plain.train()
    plain.on_epoch_start(0)
    plain.training_step((x, torch.zeros(32, dtype=torch.long), None))
    handle.remove()
    assert torch.equal(seen[0], x)


def test_spectral_norm_keeps_each_discriminator_layer_at_unit_gain():
    torch.manual_seed(0)
    d = Discriminator(1, 8, width=32, spectral_norm=True).train()
    for _ in range(30):  # power iterations run in train-mode forwards
        d(torch.randn(8, 1, 8, 8))
    layers = [m for m in d.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert len(layers) == 5
    for layer in layers:
        w = layer.weight.detach().flatten(1)
        assert torch.linalg.matrix_norm(w, ord=2).item() == pytest.approx(1.0, abs=0.05)
    plain = Discriminator(1, 8, width=32)
    assert not any("parametrizations" in k for k in plain.state_dict())


def test_hinge_and_bce_losses():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-3.0, 0.2])
    # hinge: mean(max(0, 1 - real)) + mean(max(0, 1 + fake)); G: -mean(fake)
    assert d_loss(real, fake, "hinge").item() == pytest.approx(0.25 + 0.6)
    assert g_loss(fake, "hinge").item() == pytest.approx(1.4)
    bce = F.softplus(-real).mean() + F.softplus(fake).mean()
    assert d_loss(real, fake, "bce").item() == pytest.approx(bce.item(), rel=1e-5)
    assert g_loss(fake, "bce").item() == pytest.approx(F.softplus(-fake).mean().item(), rel=1e-5)


def test_discriminator_learns_faster_than_generator_by_default(digits_mlp_teacher, digits_bundle):
    m = make(digits_mlp_teacher, digits_bundle, budget=100)
    lrs = {o.name: o.optimizer.defaults["lr"] for o in m.optimizers()}
    assert lrs["discriminator"] > lrs["generator"]
    assert lrs["discriminator"] == m.options.gan_d_lr and lrs["generator"] == m.options.gan_lr
    same = make(digits_mlp_teacher, digits_bundle, budget=100, gan_d_lr=None)
    lrs = {o.name: o.optimizer.defaults["lr"] for o in same.optimizers()}
    assert lrs["discriminator"] == lrs["generator"]


# --------------------------------------------------------------------------- distillation


def test_standardized_generator_input_matches_the_latent_shell():
    t = torch.tensor([[0.7, 0.2, 0.1]]).log()
    v = standardize_rows(t)
    assert v.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert v.pow(2).mean().item() == pytest.approx(1.0, abs=1e-5)
    assert torch.equal(v.argsort(), t.argsort())
    g = Generator(3, 1, 8, width=16).eval()
    s = torch.randn(1, 3)
    out = distill_loss(g, s, t, 5.0, 5.0, 1.0, g_input="standardized")
    with torch.no_grad():
        expected = (g(standardize_rows(s)) - g(v)).abs().mean()
    torch.testing.assert_close(out["align"], expected)
    # align_weight 0: no generator pass at all, the term is 0
    zero = distill_loss(None, s, t, 5.0, 5.0, 1.0, align_weight=0.0)  # type: ignore[arg-type]
    assert zero["align"].item() == 0.0


def test_hard_answers_take_cross_entropy_not_a_flattened_one_hot(digits_mlp_teacher, digits_bundle):
    m = make(digits_mlp_teacher, digits_bundle, budget=200, response="hard", gan_query_fraction=0.0)
    m.train()
    m.on_epoch_start(1)
    m.distill_batch(torch.randn(16, 1, 8, 8))  # buys the transfer set
    torch.manual_seed(0)
    xg, t = m.distill_batch(torch.randn(16, 1, 8, 8))
    assert set(t.sum(1).tolist()) == {1.0}  # one-hot answers
    s = m.student(xg)
    torch.manual_seed(0)
    losses = m.distill_losses(torch.randn(16, 1, 8, 8))
    expected = m.options.hard_beta * F.cross_entropy(s, t.argmax(1))
    torch.testing.assert_close(losses["kl"], expected, rtol=1e-4, atol=1e-5)


def test_edge_first_buys_every_edge_image_then_generated_ones(digits_mlp_teacher, digits_bundle):
    n = len(digits_bundle.train)
    # a budget beyond the edge set: all edge images once, the rest on generated images
    m = make(digits_mlp_teacher, digits_bundle, budget=n + 300, edge_first=True, edge_share=0.5)
    m.on_epoch_start(1)
    m.train()
    xb, _ = m.distill_batch(torch.randn(32, 1, 8, 8))
    assert len(m.edge_idx) == n and len(m.pool_z) == 300 - m.gan_spent and m.spent == n + 300
    assert xb.shape[0] == 32
    diag = m.on_epoch_end(1)  # the transfer set's class histogram, from answers already bought
    assert 1 <= diag["transfer_classes"] <= 10 and m.spent == n + 300
    # the cached transfer images are the frozen generator's images of the kept latents
    with torch.no_grad():
        torch.testing.assert_close(m.pool_images(xb.device)[:5], m.generate(m.pool_z[:5]))
    # a budget below it: every query on edge images, none generated, batches all edge images
    small = make(digits_mlp_teacher, digits_bundle, budget=500, edge_first=True, edge_share=0.5)
    small.on_epoch_start(1)
    small.train()
    small.distill_batch(torch.randn(32, 1, 8, 8))
    assert len(small.edge_idx) == 500 - small.gan_spent and len(small.pool_z) == 0
    # edge_share 0 is the paper's use whatever edge_first says: generated images only
    paper = make(digits_mlp_teacher, digits_bundle, budget=500, edge_share=0.0)
    paper.on_epoch_start(1)
    paper.train()
    paper.distill_batch(torch.randn(32, 1, 8, 8))
    assert paper.edge_idx is None and len(paper.pool_z) == 500 - paper.gan_spent


@pytest.mark.parametrize(
    ("option", "needle"),
    [
        ("options.gan_loss=wasserstein", "options.gan_loss"),
        ("options.diff_augment=translation,rotate", "options.diff_augment"),
        ("options.gan_d_lr=0", "options.gan_d_lr"),
        ("options.gan_beta1=1.5", "options.gan_beta1"),
        ("options.diag_batch=-1", "options.diag_batch"),
        ("options.g_input=raw", "options.g_input"),
        ("options.hard_tau=0", "options.hard_tau"),
        ("options.hard_beta=0", "options.hard_beta"),
        ("options.align_weight=-1", "options.align_weight"),
    ],
)
def test_new_options_are_validated_with_one_line_errors(
    digits_mlp_teacher, tmp_path, capsys, option, needle
):
    out = tmp_path / "x"
    args = [
        "distill",
        "method=mekd",
        "model=mlp",
        f"teacher={digits_mlp_teacher}",
        f"out_dir={out}",
    ]
    assert main([*args, "epochs=2", "options.gan_epochs=1", option, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert not out.exists()


# --------------------------------------------------------------------------- helpers


def make(digits_mlp_teacher, digits_bundle, budget=None, response="soft", **kw) -> MEKD:
    """An MEKD (one GAN epoch of two) on digits, attached to a Trainer for its optimizers."""
    model, _ = model_from_checkpoint(digits_mlp_teacher)
    kw = {"gen_width": 16, "gan_epochs": 1, "gan_steps_per_batch": 1, "diag_batch": 8, **kw}
    opts = MEKDOptions(budget=budget, response=response, **kw)
    opts.validate()
    student = build_model("mlp", in_channels=1, num_classes=10, image_size=8)
    m = MEKD(student, BlackBoxTeacher(model, response, budget), opts, digits_bundle, 32)
    cfg = config_from_dict({"model": "mlp", "batch_size": 32, "epochs": 2, "lr": 0.1})
    Trainer(cfg, m, digits_bundle, torch.device("cpu"), digits_mlp_teacher.parent / "unit")
    return m
