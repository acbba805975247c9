"""MEKD and the black-box baselines: loss definitions, optimizer ownership, budgets, end to end."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch
import torch.nn.functional as F

from distillkit.cli import main
from distillkit.config import config_from_dict
from distillkit.data.datasets import load_dataset
from distillkit.data.transforms import BatchShard, use_shard
from distillkit.engine.checkpoint import load_checkpoint, model_from_checkpoint
from distillkit.engine.trainer import Trainer
from distillkit.methods.blackbox import (
    BlackBoxKDOptions,
    BlackBoxOptions,
    BudgetedDistiller,
    EdgePoolDistiller,
    select_queries,
)
from distillkit.methods.mekd import (
    MEKD,
    Discriminator,
    Generator,
    MEKDOptions,
    class_balance_weights,
    distill_loss,
    im_term,
    im_weights,
    teacher_vector,
)
from distillkit.methods.registry import get_method
from distillkit.models import build_model
from distillkit.runner import prepare, resume
from distillkit.teachers import BlackBoxTeacher, BudgetExceededError, LocalTeacher, TeacherOutput


@pytest.fixture(scope="module")
def teacher_dir(digits_mlp_teacher):
    """The session's small digits teacher (tests/conftest.py)."""
    return digits_mlp_teacher


@pytest.fixture(scope="module")
def bundle():
    return load_dataset("digits")


def metrics(run_dir) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


# --------------------------------------------------------------------------- definitions


def test_im_weight_is_the_top_probability_not_the_class_index():
    probs = torch.tensor(
        [[0.1, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.2, 0.7], [0.6, 0.4] + [0.0] * 8]
    )
    w = im_weights(TeacherOutput(probs=probs))
    torch.testing.assert_close(w, torch.tensor([0.7, 0.6]))
    d = torch.tensor([0.3, -1.2])
    expected = -(0.7 * F.logsigmoid(d[0]) + 0.6 * F.logsigmoid(d[1])) / 2
    torch.testing.assert_close(im_term(d, w), expected)
    # the public code's bug would weight the first image by its argmax class, 9
    bug = -(9 * F.logsigmoid(d[0]) + 0 * F.logsigmoid(d[1])) / 2
    assert not torch.isclose(im_term(d, w), bug)
    # hard labels carry no confidence: weight 1
    torch.testing.assert_close(
        im_weights(TeacherOutput(labels=torch.tensor([9, 0]))), torch.ones(2)
    )


def test_soft_answers_enter_the_generator_as_log_probabilities():
    probs = torch.tensor([[0.7, 0.2, 0.1]])
    torch.testing.assert_close(teacher_vector(TeacherOutput(probs=probs), 3), probs.log())
    onehot = teacher_vector(TeacherOutput(labels=torch.tensor([2])), 3)
    assert onehot.tolist() == [[0.0, 0.0, 1.0]]


def test_distill_loss_is_l1_through_generator_plus_beta_kl():
    torch.manual_seed(0)
    g = Generator(10, 1, 8, width=16).eval()
    s, t = torch.randn(4, 10), torch.randn(4, 10).log_softmax(1)
    out = distill_loss(g, s, t, tau=5.0, tau_g=2.0, beta=3.0, align="l1")
    with torch.no_grad():
        l1 = (g(s / 2.0) - g(t / 2.0)).abs().mean()
    kl = (F.softmax(t / 5, 1) * (F.log_softmax(t / 5, 1) - F.log_softmax(s / 5, 1))).sum(1).mean()
    torch.testing.assert_close(out["align"], l1)
    torch.testing.assert_close(out["kl"], 3.0 * kl)
    l2 = distill_loss(g, s, t, 5.0, 2.0, 3.0, align="l2")["align"]
    assert not torch.isclose(l2, l1)


def test_generator_and_discriminator_shapes():
    for size in (8, 28, 32):
        g, d = Generator(10, 3, size, width=16), Discriminator(3, size, width=16)
        x = g(torch.randn(2, 10))
        assert x.shape == (2, 3, size, size) and x.abs().max() <= 1
        assert d(x).shape == (2,)


def test_minibatch_std_makes_each_logit_depend_on_the_batch_spread():
    torch.manual_seed(0)
    x = torch.randn(4, 1, 8, 8)
    y = x.clone()
    y[3] = torch.randn(1, 8, 8) * 5  # change one image only
    plain, spread = Discriminator(1, 8, width=16), Discriminator(1, 8, width=16, minibatch_std=True)
    # without it image 0's logit ignores its batch-mates; with it, it sees their spread
    assert torch.allclose(plain(x)[0], plain(y)[0])
    assert not torch.allclose(spread(x)[0], spread(y)[0])
    # a batch of copies has no spread: the extra feature is 0 and only the last weight differs
    same = x[:1].expand(4, 1, 8, 8)
    h = spread.body(same).flatten(1)
    expected = h @ spread.head.weight[0, :-1] + spread.head.bias
    assert torch.allclose(spread(same), expected, atol=1e-6)


def test_class_balance_weights_give_every_present_class_the_same_total():
    labels = torch.tensor([0] * 90 + [1] * 9 + [3])
    w = class_balance_weights(labels)
    totals = [w[labels == c].sum().item() for c in (0, 1, 3)]
    assert totals == pytest.approx([1.0, 1.0, 1.0])


# --------------------------------------------------------------------------- optimizer ownership


BATCH = 32


def _mekd(teacher_dir, bundle, budget=None, response="soft", epochs=2, **kw) -> MEKD:
    """An MEKD (one GAN epoch by default) attached to a Trainer: its optimizers, steps per epoch."""
    model, _ = model_from_checkpoint(teacher_dir)
    # the paper's budget use (edge_share sets the budget share) unless a test says otherwise
    kw = {"gan_epochs": 1, "gan_steps_per_batch": 1, "edge_first": False, "edge_share": 0.0, **kw}
    opts = MEKDOptions(budget=budget, response=response, gen_width=16, **kw)
    student = build_model("mlp", in_channels=1, num_classes=10, image_size=8)
    m = MEKD(student, BlackBoxTeacher(model, response, budget), opts, bundle, BATCH)
    cfg = config_from_dict({"model": "mlp", "batch_size": BATCH, "epochs": epochs, "lr": 0.1})
    Trainer(cfg, m, bundle, torch.device("cpu"), teacher_dir.parent / "unit")
    return m


def _step(distiller, x):
    """One training step of a manually optimizing method: it steps its own optimizers."""
    return distiller.training_step((x, torch.zeros(len(x), dtype=torch.long), None))


def _snapshot(module):
    return [p.detach().clone() for p in module.parameters()]


def _changed(before, module) -> bool:
    return any(not torch.equal(a, b) for a, b in zip(before, module.parameters()))


def test_gan_phase_trains_gan_not_student_and_spends_budget(teacher_dir, bundle):
    m = _mekd(teacher_dir, bundle, budget=64, im_batch=8, gan_query_fraction=0.5)
    m.train()
    m.on_epoch_start(0)
    s0, g0, d0 = _snapshot(m.student), _snapshot(m.generator), _snapshot(m.discriminator)
    x = torch.randn(32, 1, 8, 8)
    logits, losses = _step(m, x)
    assert logits is None  # the student takes no part in a GAN step
    assert {"gan_d", "gan_g", "gan_im"} <= set(losses)
    assert not any(v.requires_grad for v in losses.values())  # stepped here, only logged there
    assert not _changed(s0, m.student)  # its optimizer (and weight decay) never stepped
    assert _changed(g0, m.generator) and _changed(d0, m.discriminator)
    assert m.spent == 8 and m.teacher.queries == 8
    # 32 queries for the GAN phase, 8 per query, spread evenly over the epoch's trainer steps
    steps = math.ceil(len(bundle.train) / BATCH)
    assert m.im_every == math.ceil(steps / 4)


@pytest.mark.parametrize("method", ["blackbox_kd", "blackbox_hard", "mekd"])
def test_trainer_optimizers_own_exactly_the_trained_modules(teacher_dir, tmp_path, method):
    options = {"budget": 100, **({"gan_epochs": 1, "gen_width": 16} if method == "mekd" else {})}
    data = {"method": method, "model": "mlp", "epochs": 2, "teacher": str(teacher_dir)}
    p = prepare(config_from_dict({**data, "out_dir": str(tmp_path), "options": options}))
    trainer = Trainer(p.cfg, p.distiller, p.bundle, p.device, tmp_path, p.ctx)
    d = p.distiller
    assert not [name for name, _ in d.named_parameters() if "anchor" in name]
    owned = [id(q) for o in trainer.opts for q in o.params()]
    assert len(owned) == len(set(owned))  # no parameter is stepped by two optimizers
    modules = {"student": d.student}
    if method == "mekd":
        modules.update(generator=d.generator, discriminator=d.discriminator)
    expected = {name: {id(q) for q in module.parameters()} for name, module in modules.items()}
    assert {o.name: {id(q) for q in o.params()} for o in trainer.opts} == expected
    trainer.close()


def test_student_schedule_counts_from_the_first_distillation_epoch(teacher_dir, bundle):
    # 1 GAN epoch of 3, cosine: the student's cosine spans the 2 epochs it trains in
    m = _mekd(teacher_dir, bundle, budget=100, epochs=3)
    opts = {o.name: o for o in m.optimizers()}
    assert list(opts) == ["student", "generator", "discriminator"]
    steps = math.ceil(len(bundle.train) / BATCH)
    f = opts["student"].lr_lambda
    assert f(0) == f(steps - 1) == f(steps) == 1.0
    assert f(2 * steps) == pytest.approx(0.5)
    assert f(3 * steps - 1) < 1e-2
    student = opts["student"].optimizer
    assert isinstance(student, torch.optim.SGD) and student.defaults["lr"] == 0.1
    for name in ("generator", "discriminator"):
        adam = opts[name].optimizer
        assert isinstance(adam, torch.optim.Adam) and opts[name].lr_lambda is None
        lr = m.options.gan_d_lr if name == "discriminator" else m.options.gan_lr
        assert adam.defaults["lr"] == lr
        assert adam.defaults["betas"] == (m.options.gan_beta1, m.options.gan_beta2)


def test_per_step_draws_are_each_ranks_rows_of_the_global_draw(teacher_dir, bundle):
    """Rank 1 of a (2, 4) split of a 6-row batch draws rows 2..5 of the one-process draw."""
    x = torch.randn(6, 1, 8, 8)
    shard = BatchShard.from_counts((2, 4), rank=1)

    def full_and_mine(fn):
        torch.manual_seed(0)
        full = fn(x)
        torch.manual_seed(0)
        with use_shard(shard):
            mine = fn(x[2:])
        return full, mine

    model, _ = model_from_checkpoint(teacher_dir)
    student = build_model("mlp", in_channels=1, num_classes=10, image_size=8)
    teacher = BlackBoxTeacher(model, "soft", 50)
    pool = EdgePoolDistiller(student, teacher, BlackBoxOptions(budget=50), bundle)
    full, mine = full_and_mine(pool.draw_pool)
    assert torch.equal(mine, full[2:])
    # MEKD: the GAN noise, and the distillation batch (row 2 an edge image, rows 3..5 generated)
    m = _mekd(teacher_dir, bundle, budget=100, edge_share=0.5)
    full, mine = full_and_mine(m.gan_latents)
    assert torch.equal(mine, full[2:])
    m.on_epoch_start(1)
    (xf, tf), (xm, tm) = full_and_mine(m.distill_batch)
    assert xf.shape[0] == 6 and xm.shape[0] == 4
    torch.testing.assert_close(xm, xf[2:])
    torch.testing.assert_close(tm, tf[2:])


def test_blackbox_kd_reads_its_temperature_from_options(teacher_dir, bundle):
    model, _ = model_from_checkpoint(teacher_dir)
    cfg = config_from_dict({"method": "blackbox_kd", "model": "mlp"})
    x = torch.randn(8, 1, 8, 8)
    losses = []
    for t in (1.0, 6.0):
        torch.manual_seed(0)
        student = build_model("mlp", in_channels=1, num_classes=10, image_size=8)
        options = BlackBoxKDOptions(budget=40, temperature=t)
        d = get_method("blackbox_kd").build(cfg, options, student, LocalTeacher(model), bundle)
        torch.manual_seed(1)
        _, loss = d.training_step((x, torch.zeros(8, dtype=torch.long), None))
        torch.manual_seed(1)
        sel = d.draw_pool(x)
        xp = (bundle.train.images[d.pool_idx[sel]].float() / 255.0 - bundle.mean[0]) / bundle.std[0]
        log_p_t, log_p_s = d.pool_t[sel].div(t).log_softmax(1), student(xp).div(t).log_softmax(1)
        expected = t * t * (log_p_t.exp() * (log_p_t - log_p_s)).sum(1).mean()
        torch.testing.assert_close(loss["kd"], expected)
        losses.append(loss["kd"])
    assert not torch.isclose(losses[0], losses[1])
    with pytest.raises(ValueError, match="options.temperature"):
        BlackBoxKDOptions(temperature=0).validate()


def test_distill_phase_trains_student_through_frozen_generator(teacher_dir, bundle):
    m = _mekd(teacher_dir, bundle, budget=100, gan_query_fraction=0.2)
    m.train()
    m.on_epoch_start(1)
    m.train()
    s0, g0 = _snapshot(m.student), _snapshot(m.generator)
    _, losses = _step(m, torch.randn(32, 1, 8, 8))
    assert set(losses) == {"align", "kl"}
    assert _changed(s0, m.student) and not _changed(g0, m.generator)
    assert not m.generator.training
    # the transfer set took the whole remaining budget once; more steps spend nothing
    assert m.spent == 100 and len(m.pool_z) == 100
    _step(m, torch.randn(32, 1, 8, 8))
    assert m.spent == 100 == m.teacher.queries


def test_edge_share_spends_part_of_the_budget_on_edge_images(teacher_dir, bundle):
    torch.manual_seed(0)
    m = _mekd(teacher_dir, bundle, budget=100, edge_share=0.25)
    m.train()
    m.on_epoch_start(1)
    m.train()
    _, losses = _step(m, torch.randn(32, 1, 8, 8))
    assert set(losses) == {"align", "kl"}
    # a quarter of the remaining budget on edge images, the rest on generated ones, spent once
    assert len(m.edge_idx) == 25 and len(m.pool_z) == 75 and m.spent == 100
    assert len(set(m.edge_idx.tolist())) == 25
    # the stored targets are the teacher's answers for those very edge images (log-probabilities
    # of the returned probabilities, so compared as probabilities: tiny ones are floored)
    model, _ = model_from_checkpoint(teacher_dir)
    x = (bundle.train.images[m.edge_idx].float() / 255.0 - bundle.mean[0]) / bundle.std[0]
    with torch.no_grad():
        expected = torch.softmax(model(x).float(), dim=1)
    torch.testing.assert_close(m.edge_t.exp(), expected, atol=1e-5, rtol=1e-4)
    # a resumed run gets the same pools back and spends nothing more
    state = m.extra_state()
    fresh = _mekd(teacher_dir, bundle, budget=100, edge_share=0.25)
    fresh.load_extra_state(state)
    assert torch.equal(fresh.edge_idx, m.edge_idx) and torch.equal(fresh.edge_t, m.edge_t)
    fresh.on_epoch_start(1)
    _step(fresh, torch.randn(32, 1, 8, 8))
    assert fresh.teacher.queries == 0


def test_edge_share_one_distils_on_edge_images_only(teacher_dir, bundle):
    m = _mekd(teacher_dir, bundle, budget=5000, edge_share=1.0)
    m.on_epoch_start(1)
    m.train()
    _step(m, torch.randn(16, 1, 8, 8))
    assert len(m.edge_idx) == len(bundle.train) == m.spent  # capped by the edge set
    assert m.pool_t is None and len(m.pool_z) == 0
    with pytest.raises(ValueError, match="edge_share"):
        MEKDOptions(edge_share=1.5).validate()


def test_unlimited_teacher_with_transfer_size_builds_a_fixed_set_of_that_size(teacher_dir, bundle):
    torch.manual_seed(0)
    for share, n_edge in ((0.0, 0), (0.25, 10)):
        m = _mekd(teacher_dir, bundle, transfer_size=40, edge_share=share)
        m.on_epoch_start(1)
        m.train()
        _, losses = _step(m, torch.randn(16, 1, 8, 8))
        assert set(losses) == {"align", "kl"} and all(v.isfinite() for v in losses.values())
        # transfer_size caps the set when no budget does; spent once, never again
        assert len(m.pool_z) == 40 - n_edge and m.spent == 40 == m.teacher.queries
        assert (0 if m.edge_idx is None else len(m.edge_idx)) == n_edge
        _step(m, torch.randn(16, 1, 8, 8))
        assert m.spent == 40


def test_unlimited_teacher_with_edge_share_answers_every_edge_image_once(teacher_dir, bundle):
    torch.manual_seed(0)
    m = _mekd(teacher_dir, bundle, edge_share=0.25)
    m.on_epoch_start(1)
    m.train()
    _, losses = _step(m, torch.randn(16, 1, 8, 8))
    assert set(losses) == {"align", "kl"} and all(v.isfinite() for v in losses.values())
    n = len(bundle.train)
    # every edge image asked once, plus fresh generated images for 3/4 of the batch
    assert sorted(m.edge_idx.tolist()) == list(range(n)) and m.pool_t is None
    assert m.spent == n + 12
    _step(m, torch.randn(16, 1, 8, 8))
    assert m.spent == n + 24 == m.teacher.queries
    # edge_share 1: edge images only, nothing generated is asked
    m = _mekd(teacher_dir, bundle, edge_share=1.0)
    m.on_epoch_start(1)
    _step(m, torch.randn(16, 1, 8, 8))
    _step(m, torch.randn(16, 1, 8, 8))
    assert m.spent == n == len(m.edge_idx)


def test_transfer_set_is_drawn_class_balanced_unless_turned_off(teacher_dir, bundle):
    torch.manual_seed(0)
    for balance, share in ((True, 0.5), (False, 0.9)):
        m = _mekd(teacher_dir, bundle, budget=100, balance=balance)
        m.pool_z = torch.randn(100, 10)
        m.pool_t = F.one_hot(torch.tensor([2] * 90 + [7] * 10), 10).float()
        picks = m.pool_t[m.sample_pool(20000)].argmax(1)
        assert (picks == 2).float().mean().item() == pytest.approx(share, abs=0.02)


def test_budget_is_enforced_before_the_teacher_is_asked(teacher_dir, bundle):
    model, _ = model_from_checkpoint(teacher_dir)
    student = build_model("mlp", in_channels=1, num_classes=10, image_size=8)
    d = BudgetedDistiller(student, BlackBoxTeacher(model, "soft"), BlackBoxOptions(budget=10), 10)
    d.query(torch.randn(6, 1, 8, 8))
    with pytest.raises(BudgetExceededError, match="6 used"):
        d.query(torch.randn(5, 1, 8, 8))
    assert d.spent == 6 and d.teacher.queries == 6


def test_kt_selection_and_clear_error_without_subset(monkeypatch):
    feats = torch.rand(200, 5, generator=torch.Generator().manual_seed(0)).double().numpy()
    idx = select_queries(feats, 20, "kt", seed=0)
    assert len(idx) == 20 and len(set(idx.tolist())) == 20
    monkeypatch.setitem(sys.modules, "distillkit.data.subset", None)
    with pytest.raises(RuntimeError, match="query_selection=random"):
        select_queries(feats, 20, "kt", seed=0)
    assert len(select_queries(feats, 20, "random", seed=0)) == 20


# --------------------------------------------------------------------------- end to end


def test_baselines_end_to_end_within_budget(teacher_dir, tmp_path):
    common = [f"teacher={teacher_dir}", "model=mlp", "epochs=4", "batch_size=32", "--quiet"]
    for method, extra in (("blackbox_kd", []), ("blackbox_hard", ["options.query_selection=kt"])):
        out = tmp_path / method
        assert (
            main(
                [
                    "distill",
                    *common,
                    f"method={method}",
                    "options.budget=300",
                    f"out_dir={out}",
                    *extra,
                ]
            )
            == 0
        )
        m = metrics(out)
        assert m["teacher_queries"] == 300, method
        assert m["test_acc"] > 60, (method, m["test_acc"])


@pytest.mark.parametrize("response", ["soft", "hard"])
def test_mekd_end_to_end_and_resume(teacher_dir, tmp_path, response):
    out = tmp_path / f"mekd_{response}"
    args = [
        "distill",
        f"teacher={teacher_dir}",
        "method=mekd",
        "model=mlp",
        "epochs=2",
        "batch_size=64",
        "options.gan_epochs=1",
        "options.gen_width=16",
        "options.budget=400",
        f"options.response={response}",
        "options.im_batch=16",
        f"out_dir={out}",
        "--quiet",
    ]
    assert main(args) == 0
    m = metrics(out)
    assert 0 < m["teacher_queries"] <= 400
    state = load_checkpoint(out, which="last")
    assert any(k.startswith("generator.") for k in state["distiller"])
    assert any(k.startswith("discriminator.") for k in state["distiller"])
    assert not any(k.startswith(("generator.", "teacher.")) for k in state["model"])
    model, _ = model_from_checkpoint(out)  # the exported student is the plain model
    assert sum(p.numel() for p in model.parameters()) == sum(
        v.numel() for v in state["model"].values()
    )
    spent = state["extra_state"]["spent"]
    assert spent == m["teacher_queries"] == 400  # the transfer set used what the GAN left
    # resuming for one more epoch reuses the transfer set from the checkpoint: no new queries
    summary = resume(out, {"epochs": 3})
    assert summary["teacher_queries"] == 400 and summary["epochs"] == 3
    if response == "hard":
        return
    # a later run takes G and D from this one and only distils: G is used frozen, never changed
    later = tmp_path / "later"
    args = [a for a in args if not a.startswith(("options.gan_epochs", "out_dir", "epochs"))]
    extra = ["options.gan_epochs=0", f"options.generator={out}", "epochs=1", f"out_dir={later}"]
    assert main([*args, *extra]) == 0
    ours = load_checkpoint(later, which="last")["distiller"]
    theirs = load_checkpoint(out, which="last")["distiller"]
    for key in theirs:
        if key.startswith(("generator.", "discriminator.")):
            assert torch.equal(ours[key], theirs[key]), key


def test_mekd_against_a_real_http_teacher(teacher_dir, tmp_path, monkeypatch):
    pytest.importorskip("fastapi")
    from distillkit.teachers.keys import BudgetStore, KeyStore
    from distillkit.teachers.server import ServerThread, create_app, load_service

    keys = KeyStore()
    key = keys.add("edge", budget=300)
    budgets = BudgetStore(tmp_path / "state.db")
    app = create_app(load_service(teacher_dir, "soft"), keys, budgets)
    monkeypatch.setenv("EDGE_KEY", key)
    with ServerThread(app) as server:
        out = tmp_path / "remote"
        args = [
            "distill",
            "method=mekd",
            "model=mlp",
            "epochs=2",
            "batch_size=64",
            "options.gan_epochs=1",
            "options.gen_width=16",
            "options.budget=300",
            f"options.teacher_url={server.url}",
            "options.api_key_env=EDGE_KEY",
            f"out_dir={out}",
            "--quiet",
        ]
        assert main(args) == 0
        spent_on_server = 300 - budgets.remaining(key.split("-")[1], 300)
    m = metrics(out)
    assert m["teacher_queries"] == spent_on_server == 300
    assert (out / "teacher_cache" / "responses.sqlite").is_file()


def test_mekd_config_errors(teacher_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "x"
    base = ["distill", "method=mekd", "model=mlp", f"out_dir={out}", "--quiet"]
    teacher = f"teacher={teacher_dir}"
    monkeypatch.delenv("DISTILLKIT_API_KEY", raising=False)
    cases = [
        (["epochs=2", "options.gan_epochs=2", f"teacher={teacher_dir}"], "gan_epochs"),
        (["epochs=2", "options.gan_epochs=1"], "needs a teacher"),
        (["options.align=l3", f"teacher={teacher_dir}"], "options.align"),
        (
            ["epochs=2", "options.gan_epochs=1", "options.teacher_url=http://127.0.0.1:9"],
            "DISTILLKIT_API_KEY",
        ),
        (
            ["options.gan_epochs=0", f"options.generator={tmp_path / 'none'}", teacher],
            "options.generator",
        ),
        (
            ["options.gan_epochs=0", f"options.generator={teacher_dir}", teacher],
            "holds no MEKD generator",
        ),
        (
            [
                "epochs=2",
                "options.gan_epochs=1",
                "options.gan_steps_per_batch=2",
                "amp=fp16",
                teacher,
            ],
            "gan_steps_per_batch",
        ),
    ]
    for args, needle in cases:
        assert main([*base, *args]) == 2, needle
        err = capsys.readouterr().err
        assert needle in err
        # one line naming the problem, no traceback
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert not out.exists()  # a refused config leaves nothing behind


def test_gan_steps_per_batch_runs_several_updates_and_spreads_queries(teacher_dir, bundle):
    m = _mekd(
        teacher_dir, bundle, budget=64, im_batch=8, gan_query_fraction=0.5, gan_steps_per_batch=3
    )
    # every trainer step makes 3 GAN updates; 4 queries of 8 spread evenly over all of them
    updates = 3 * math.ceil(len(bundle.train) / BATCH)
    every = math.ceil(updates / 4)
    assert m.im_every == every
    m.train()
    m.on_epoch_start(0)
    x = torch.randn(32, 1, 8, 8)
    _, losses = _step(m, x)
    assert m.gan_step == 3 and m.spent == 8  # the first update queried, the next two did not
    assert {"gan_d", "gan_g", "gan_im"} <= set(losses)
    while m.gan_step < updates:
        _step(m, x)
    assert m.gan_step == updates and m.spent == 32 == m.teacher.queries
    with pytest.raises(ValueError, match="gan_steps_per_batch"):
        MEKDOptions(gan_steps_per_batch=0).validate()
