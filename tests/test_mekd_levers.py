"""MEKD's two budget levers: generator latents matched to the teacher's answers, and a transfer
set kept only where the teacher is confident."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from distillkit.cli import main
from distillkit.methods.mekd import MEKDOptions, read_run_weights
from distillkit.methods.mekd_gan import Generator, answer_latents
from distillkit.models.checkpoint import model_from_checkpoint
from tests.test_mekd_gan import make


def _step(m, n=32):
    return m.training_step((torch.randn(n, 1, 8, 8), torch.zeros(n, dtype=torch.long), None))


def _rows_of(z: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """For each row of z, the index of the row of base it equals (-1 if none)."""
    eq = (z[:, None, :] - base[None, :, :]).abs().amax(2) < 1e-6
    return torch.where(eq.any(1), eq.float().argmax(1), torch.full((len(z),), -1))


def test_answer_latents_are_generator_inputs_of_answers_plus_noise():
    t = torch.log_softmax(torch.tensor([[4.0, 0.0, -1.0], [0.0, 3.0, 0.0]]), dim=1)
    # no noise: every latent is exactly t_i / tau_g for one of the answers
    z = answer_latents(t, 200, 0.0, "scaled", 5.0, torch.Generator().manual_seed(0))
    hit = _rows_of(z, t / 5.0)
    assert (hit >= 0).all() and set(hit.tolist()) == {0, 1}
    # standardized: each row zero mean, unit root mean square
    z = answer_latents(t, 50, 0.0, "standardized", 5.0, torch.Generator().manual_seed(0))
    torch.testing.assert_close(z.mean(1), torch.zeros(50), atol=1e-6, rtol=0)
    torch.testing.assert_close(z.pow(2).mean(1), torch.ones(50), atol=1e-5, rtol=0)
    # noise: the spread around the answer is the asked standard deviation
    z = answer_latents(t[:1], 20000, 0.5, "scaled", 5.0, torch.Generator().manual_seed(1))
    assert (z - t[:1] / 5.0).std().item() == pytest.approx(0.5, rel=0.03)
    again = answer_latents(t[:1], 20000, 0.5, "scaled", 5.0, torch.Generator().manual_seed(1))
    assert torch.equal(z, again)  # the private generator makes them reproducible


def test_answers_latents_buy_edge_answers_first_and_feed_them_to_the_gan(
    digits_mlp_teacher, digits_bundle
):
    n = len(digits_bundle.train)
    kw = {"latents": "answers", "latent_noise": 0.0, "diag_batch": 0, "edge_share": 0.5}
    m = make(digits_mlp_teacher, digits_bundle, budget=n + 40, **kw)
    m.train()
    m.on_epoch_start(0)
    assert m.spent == 0
    _step(m)
    # the first GAN step bought every edge image (edge_first buys them anyway), nothing else
    assert m.spent == n == m.teacher.queries and len(m.edge_t) == n
    hit = _rows_of(m.gan_latents(torch.zeros(64, 1, 8, 8)), m.edge_t / m.options.tau_g)
    assert (hit >= 0).all() and len(set(hit.tolist())) > 30  # answers of many edge images
    # distillation: the edge answers are not bought again; the rest buys the generated set
    state = m.extra_state()
    m.on_epoch_start(1)
    m.train()
    _step(m)
    assert m.spent == n + 40 == m.teacher.queries and len(m.pool_z) == 40
    # the generated set's latents are answer latents too
    assert (_rows_of(m.pool_z, m.edge_t / m.options.tau_g) >= 0).all()
    # resumed from the end of the GAN phase: the same edge answers, only the 40 generated bought
    again = make(digits_mlp_teacher, digits_bundle, budget=n + 40, **kw)
    again.load_extra_state(state)
    assert torch.equal(again.edge_t, m.edge_t) and not again.transfer_ready
    again.on_epoch_start(1)
    _step(again)
    assert again.spent == n + 40 and torch.equal(again.pool_z, m.pool_z)


def test_min_confidence_keeps_only_confident_generated_answers_and_still_pays(
    digits_mlp_teacher, digits_bundle
):
    n = len(digits_bundle.train)
    model, _ = model_from_checkpoint(digits_mlp_teacher)

    def build(**kw):
        m = make(
            digits_mlp_teacher, digits_bundle, budget=n + 300, diag_batch=0, edge_share=0.5, **kw
        )
        torch.manual_seed(0)
        m.generator.load_state_dict(Generator(10, 1, 8, 16).state_dict())  # the same G for both
        m.on_epoch_start(1)
        m.train()
        _step(m)
        assert m.spent == n + 300  # paid for every generated image, kept or not
        return m

    def top(m, z):
        """The teacher's own top probability on G(z), asked directly."""
        with torch.no_grad():
            return torch.softmax(model(m.generate(z)), 1).max(1).values

    full = build()
    assert len(full.pool_z) == 300
    tops = top(full, full.pool_z)
    threshold = float(tops.median())  # about half the generated images pass
    cut = build(min_confidence=threshold)
    expected = int((tops >= threshold).sum())  # same G, same latents (the set's private seed)
    assert 0 < expected < 300 and len(cut.pool_z) == expected
    assert (top(cut, cut.pool_z) >= threshold).all()
    assert cut.on_epoch_end(1)["transfer_images"] == expected


def test_min_confidence_on_fresh_generated_batches_drops_unsure_rows(
    digits_mlp_teacher, digits_bundle
):
    m = make(digits_mlp_teacher, digits_bundle, min_confidence=0.9, edge_share=0.0, diag_batch=0)
    m.on_epoch_start(1)
    torch.manual_seed(0)
    x, t = m.distill_batch(torch.zeros(64, 1, 8, 8))
    assert m.spent == 64 and 1 <= len(t) < 64 and len(x) == len(t)
    keep = t.exp().max(1).values >= 0.9
    assert keep.sum() >= len(t) - 1  # at most the one row kept so a batch is never empty


def test_min_confidence_that_drops_everything_is_an_error_without_edge_images(
    digits_mlp_teacher, digits_bundle, monkeypatch
):
    m = make(digits_mlp_teacher, digits_bundle, budget=50, edge_share=0.0, min_confidence=0.5)
    monkeypatch.setattr(m, "keep_mask", lambda t: torch.zeros(len(t), dtype=torch.bool))
    m.on_epoch_start(1)
    with pytest.raises(Exception, match="dropped every generated image"):
        _step(m)


def test_lever_options_are_validated(digits_mlp_teacher, tmp_path, capsys):
    for kw, needle in (
        ({"latents": "uniform"}, "options.latents"),
        ({"latents": "answers", "edge_share": 0.0}, "edge_share > 0"),
        ({"latents": "answers", "edge_first": False}, "edge_first"),
        ({"latent_noise": -1.0}, "latent_noise"),
        ({"min_confidence": 1.0}, "min_confidence"),
    ):
        with pytest.raises(ValueError, match=needle):
            MEKDOptions(**kw).validate()
    out = tmp_path / "run"
    args = ["distill", "method=mekd", f"teacher={digits_mlp_teacher}", "model=mlp", "epochs=2"]
    args += ["options.gan_epochs=1", "options.response=hard", "options.min_confidence=0.5"]
    assert main([*args, f"out_dir={out}", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "min_confidence needs soft answers" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_answer_latents_run_end_to_end_with_diagnostics(digits_mlp_teacher, tmp_path):
    out = tmp_path / "run"
    args = ["distill", "method=mekd", f"teacher={digits_mlp_teacher}", "model=mlp", "epochs=2"]
    args += ["batch_size=64", "augment=false", "options.gan_epochs=1", "options.budget=1500"]
    args += ["options.latents=answers", "options.min_confidence=0.5", "options.diag_batch=16"]
    args += ["options.latent_noise=0"]
    assert main([*args, f"out_dir={out}", "--quiet"]) == 0
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    gan = [r for r in lines if "gan_classes" in r]
    assert gan and gan[0]["gan_classes"] >= 1  # the diagnostic batch was bought after the edge
    assert any("g_in_t_rms" in r for r in lines)
    # the samples picture draws the latents the run drew: its own answers / tau_g (noise 0 here)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import mekd_plots

    answers = read_run_weights(str(out), "extra_state")["edge_t"]
    z = mekd_plots.draw_latents(out, 300, 10)
    assert (_rows_of(z, answers / 5.0) >= 0).all()
    assert mekd_plots.draw_latents(tmp_path, 5, 10).shape == (5, 10)  # no config: N(0, I)


def test_edge_share_one_buys_no_generated_images_even_with_budget_left(
    digits_mlp_teacher, digits_bundle
):
    n = len(digits_bundle.train)
    m = make(digits_mlp_teacher, digits_bundle, budget=n + 500, edge_share=1.0, diag_batch=0)
    m.on_epoch_start(1)
    m.train()
    _step(m)
    _step(m)
    # every batch row comes from the edge images: the 500 left are not spent on unused images
    assert m.spent == n == m.teacher.queries and m.pool_t is None


def test_edge_share_default_is_edge_images_only_for_soft_and_half_for_hard(
    digits_mlp_teacher, digits_bundle
):
    n = len(digits_bundle.train)
    for response, share, spent in (("soft", 1.0, n), ("hard", 0.5, n + 200)):
        m = make(digits_mlp_teacher, digits_bundle, budget=n + 200, response=response, diag_batch=0)
        assert MEKDOptions().edge_share is None and m.options.edge_share == share
        m.on_epoch_start(1)
        m.train()
        _step(m)
        # soft: no generated image is bought; hard: the budget left buys them
        assert m.spent == spent == m.teacher.queries
    with pytest.raises(ValueError, match="edge_share"):
        MEKDOptions(edge_share=-0.1).validate()
