"""Batch augmentations: CutMix/Mixup formulas, CutMixPick selection, per-sample randomness, registry."""

from __future__ import annotations

import dataclasses
import math
import threading

import numpy as np
import pytest
import torch

from distillkit.data.augment import (
    CutMixPick,
    build_augmentation,
    cutmix_batch,
    derangement,
    list_augmentations,
    mixup_batch,
    parse_scheme,
)
from distillkit.data.transforms import BatchShard, use_shard


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_derangement_has_no_fixed_points():
    for n in (2, 3, 7, 64):
        for seed in range(20):
            perm = derangement(n, _gen(seed))
            assert sorted(perm.tolist()) == list(range(n))
            assert (perm != torch.arange(n)).all()


def test_cutmix_box_area_matches_lambda():
    b, h, w = 256, 16, 12
    # image i is the constant i + 1, so every pixel tells where it came from
    x = (torch.arange(b, dtype=torch.float32) + 1).reshape(b, 1, 1, 1).expand(b, 2, h, w).clone()
    res = cutmix_batch(x, beta=1.0, generator=_gen(3))
    assert (res.perm != torch.arange(b)).all()
    clipped = unclipped = 0
    for i in range(b):
        y1, y2, x1, x2 = res.boxes[i].tolist()
        area = (y2 - y1) * (x2 - x1)
        from_partner = (res.x[i] == res.perm[i] + 1).all(0)
        assert int(from_partner.sum()) == area
        assert (res.x[i, :, y1:y2, x1:x2] == res.perm[i] + 1).all()
        assert int((res.x[i] == i + 1).all(0).sum()) == h * w - area
        assert math.isclose(float(res.lam[i]), 1.0 - area / (h * w), abs_tol=1e-6)
        side = math.sqrt(1.0 - float(res.lam_drawn[i]))
        full_h, full_w = math.floor(h * side), math.floor(w * side)
        if (y2 - y1, x2 - x1) == (full_h, full_w):
            unclipped += 1
        else:
            clipped += 1
            assert y2 - y1 <= full_h and x2 - x1 <= full_w
    assert clipped > 0 and unclipped > 0


def test_mixup_is_the_convex_combination_with_the_drawn_lambda():
    x = torch.randn(512, 3, 5, 5, generator=_gen(1))
    res = mixup_batch(x, alpha=0.2, generator=_gen(2))
    lam = res.lam.reshape(-1, 1, 1, 1)
    expected = lam * x + (1 - lam) * x[res.perm]
    torch.testing.assert_close(res.x, expected)
    assert (res.perm != torch.arange(512)).all()
    assert ((res.lam >= 0) & (res.lam <= 1)).all()
    # Beta(a, a) has mean 1/2 and variance 1 / (4 (2a + 1))
    lam_many = mixup_batch(torch.zeros(20000, 1, 1, 1), alpha=0.2, generator=_gen(4)).lam
    assert abs(float(lam_many.mean()) - 0.5) < 0.02
    assert abs(float(lam_many.var()) - 1 / (4 * 1.4)) < 0.01
    one = mixup_batch(x, alpha=1.0, generator=_gen(5), per_sample=False).lam
    assert (one == one[0]).all()


def _teacher(logit_scale: float):
    # two classes, logits (0, s * mean(x)): entropy falls as |mean(x)| grows
    def fn(x: torch.Tensor) -> torch.Tensor:
        m = x.mean(dim=(1, 2, 3))
        return torch.log_softmax(torch.stack([torch.zeros_like(m), logit_scale * m], 1), 1)

    return fn


def _np_entropy(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    return -(p * np.log(p)).sum(1)


def test_cutmixpick_keeps_the_highest_teacher_entropy_samples():
    b = 16
    x = torch.randn(b, 1, 8, 8, generator=_gen(0)) + torch.linspace(-2, 2, b).reshape(b, 1, 1, 1)
    aug = CutMixPick(mix_n_run=3, n_pick=10, criterion="teacher_entropy")
    res = aug.pick(x, _gen(7), teacher=_teacher(3.0))
    pool = aug.pool(x, _gen(7))
    torch.testing.assert_close(res.pool, pool)
    means = pool.double().mean(dim=(1, 2, 3)).numpy()
    ent = _np_entropy(np.stack([np.zeros_like(means), 3.0 * means], 1))
    expected = np.argsort(-ent)[:10]
    assert set(res.index.tolist()) == set(expected.tolist())
    # the known answer: highest entropy = pooled samples with the smallest |mean|
    assert set(res.index.tolist()) == set(np.argsort(np.abs(means))[:10].tolist())
    torch.testing.assert_close(res.x, pool[res.index])
    torch.testing.assert_close(res.teacher_log_probs, _teacher(3.0)(pool[res.index]))
    # n_pick defaults to the batch size
    assert CutMixPick().augment(x, _gen(1), teacher=_teacher(1.0)).x.shape == x.shape


def test_cutmixpick_student_entropy_and_kl_criteria():
    b, t = 12, 4.0
    x = torch.randn(b, 1, 4, 4, generator=_gen(0))
    w_s = torch.randn(16, 5, generator=_gen(1), dtype=torch.float64)
    w_t = torch.randn(16, 5, generator=_gen(2), dtype=torch.float64)

    def student(z):
        return z.flatten(1).double() @ w_s

    def teacher(z):
        return torch.log_softmax(z.flatten(1).double() @ w_t, 1)

    for criterion in ("student_entropy", "kl"):
        aug = CutMixPick(mix_n_run=2, criterion=criterion)
        res = aug.pick(x, _gen(5), teacher=teacher, student=student, temperature=t)
        pool = aug.pool(x, _gen(5)).flatten(1).double().numpy()
        ls, lt = pool @ w_s.numpy(), pool @ w_t.numpy()
        if criterion == "student_entropy":
            score = _np_entropy(ls)
        else:

            def log_softmax(a):
                a = a - a.max(1, keepdims=True)
                return a - np.log(np.exp(a).sum(1, keepdims=True))

            lpt, lps = log_softmax(lt / t), log_softmax(ls / t)
            score = (np.exp(lpt) * (lpt - lps)).sum(1)
        np.testing.assert_allclose(res.scores.numpy(), score, rtol=1e-5, atol=1e-6)
        assert set(res.index.tolist()) == set(np.argsort(-score)[:b].tolist())
    with pytest.raises(ValueError, match="needs a student"):
        CutMixPick(criterion="kl").pick(x, teacher=teacher)


def test_identical_images_get_different_random_draws():
    b = 32
    img = torch.rand(1, 1, 8, 8, generator=_gen(0))
    x = img.expand(b, 1, 8, 8).clone()
    for name, params in [
        ("flip", {}),
        ("crop_flip", {}),
        ("cutout", {"length": 3}),
        ("randaugment", {"magnitude": 15.0}),
    ]:
        out = build_augmentation(name, **params)(x, _gen(1))
        distinct = torch.unique(out.flatten(1), dim=0)
        assert len(distinct) >= 2, name
        if name != "flip":
            assert len(distinct) >= 4, name
    res = cutmix_batch(x, generator=_gen(2))
    assert len(torch.unique(res.boxes, dim=0)) >= 4
    assert len(torch.unique(mixup_batch(x, generator=_gen(3)).lam)) == b


def test_cutout_masks_square_holes():
    aug = build_augmentation("cutout", holes=1, length=4)
    x = torch.ones(64, 2, 10, 10)
    out = aug(x, _gen(0))
    zeros = (out == 0).all(1)  # both channels zeroed together
    for i in range(64):
        rows = zeros[i].any(1).nonzero().flatten()
        cols = zeros[i].any(0).nonzero().flatten()
        assert 1 <= len(rows) <= 4 and 1 <= len(cols) <= 4
        assert int(zeros[i].sum()) == len(rows) * len(cols)  # a (clipped) rectangle


def test_randaugment_works_on_unit_pixels_of_normalized_batches():
    mean, std = (0.3,), (0.2,)
    pix = torch.rand(16, 1, 6, 6, generator=_gen(0))
    x = (pix - mean[0]) / std[0]
    aug = build_augmentation("randaugment", n_ops=1, magnitude=15.0, ops=["solarize"])
    out = aug.augment(x, _gen(1), mean=mean, std=std).x
    expected = torch.where(pix >= 0.5, 1 - pix, pix)
    torch.testing.assert_close(out, (expected - mean[0]) / std[0], atol=1e-5, rtol=1e-5)
    ident = build_augmentation("randaugment", ops=["identity"]).augment(x, mean=mean, std=std).x
    torch.testing.assert_close(ident, x, atol=1e-5, rtol=1e-5)
    # every op keeps pixels in [0, 1] and the shape
    for op in ("equalize", "autocontrast", "posterize", "rotate", "shear_x", "translate_y"):
        y = build_augmentation("randaugment", ops=[op], magnitude=20.0)(pix, _gen(2))
        assert y.shape == pix.shape and y.min() >= 0 and y.max() <= 1


def test_same_seed_same_result_and_global_rng():
    x = torch.randn(8, 1, 8, 8, generator=_gen(0))
    for name in ("crop_flip", "cutout", "mixup", "cutmix", "randaugment"):
        aug = build_augmentation(name)
        torch.testing.assert_close(aug(x, _gen(9)), aug(x, _gen(9)))
        torch.manual_seed(5)
        a = aug(x)
        torch.manual_seed(5)
        torch.testing.assert_close(a, aug(x))


def test_registry_errors_name_the_problem():
    assert {"identity", "flip", "crop_flip", "cutout", "mixup", "cutmix", "cutmixpick"} <= set(
        list_augmentations()
    )
    with pytest.raises(ValueError, match="'bogus'"):
        build_augmentation("bogus")
    with pytest.raises(ValueError, match="'size'"):
        build_augmentation("cutout", size=3)
    with pytest.raises(ValueError, match="'alpha'.*-1"):
        build_augmentation("mixup", alpha=-1)
    with pytest.raises(ValueError, match="'criterion'.*'entropy'"):
        build_augmentation("cutmixpick", criterion="entropy")
    with pytest.raises(ValueError, match="'holes'"):
        build_augmentation("cutout", holes=1.5)
    with pytest.raises(ValueError, match="n_pick=40 exceeds"):
        CutMixPick(n_pick=40).pick(torch.zeros(8, 1, 4, 4), teacher=_teacher(1.0))
    assert parse_scheme("cutout:holes=2:length=4") == ("cutout", {"holes": 2, "length": 4})
    assert parse_scheme("cutmixpick:criterion=kl") == ("cutmixpick", {"criterion": "kl"})


# --------------------------------------------------------------------------- data-parallel shards


def _as_ranks(counts: tuple[int, ...], fn):
    """Run fn(shard) once per simulated rank, on threads whose `gather` is a real all-gather."""
    n = len(counts)
    barrier, slots, out, errors = threading.Barrier(n, timeout=20), [None] * n, [None] * n, []

    def worker(rank: int) -> None:
        def gather(t: torch.Tensor) -> torch.Tensor:
            slots[rank] = t[: counts[rank]]
            barrier.wait()
            full = torch.cat(slots)
            barrier.wait()  # nobody overwrites a slot before everyone has read it
            return full

        shard = dataclasses.replace(BatchShard.from_counts(counts, rank), gather=gather)
        try:
            with use_shard(shard):
                out[rank] = fn(shard)
        except Exception as exc:  # surfaced in the main thread
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=worker, args=(r,)) for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return out


SHARDED = [
    ("flip", {}),
    ("crop_flip", {"padding": 2}),
    ("cutout", {"holes": 2, "length": 3}),
    ("mixup", {}),
    ("mixup", {"per_sample": False}),
    ("cutmix", {}),
    ("randaugment", {"random_magnitude": True, "magnitude": 20.0}),
]


@pytest.mark.parametrize("counts", [(4, 4), (3, 2, 2), (3, 0)])
@pytest.mark.parametrize("name,params", SHARDED, ids=[f"{n}{p}" for n, p in SHARDED])
def test_shards_of_a_batch_are_augmented_as_the_whole_batch(counts, name, params):
    # Each rank holds its slice of the global batch and its own generator with the same seed (as
    # ranks seeded alike): concatenated, their outputs must be the single-process output.
    aug = build_augmentation(name, **params)
    x = torch.rand(sum(counts), 2, 8, 8, generator=_gen(0))
    whole = aug(x, _gen(4))

    def rank_output(shard: BatchShard) -> torch.Tensor:
        return aug(x[shard.positions], _gen(4))

    parts = _as_ranks(counts, rank_output)
    joined = torch.cat([p[:c] for p, c in zip(parts, counts)])
    assert torch.equal(joined, whole), name
    # a rank without samples holds the batch's last sample as padding
    for p, c in zip(parts, counts):
        assert len(p) == max(c, 1)


@pytest.mark.parametrize("counts", [(6, 6), (5, 4, 3)])
def test_sharded_cutmixpick_picks_from_the_global_pool(counts):
    x = torch.randn(sum(counts), 1, 8, 8, generator=_gen(0))
    x = x + torch.linspace(-2, 2, len(x)).reshape(-1, 1, 1, 1)
    queried = []

    def teacher(z: torch.Tensor) -> torch.Tensor:
        queried.append(len(z))
        return _teacher(3.0)(z)

    aug = CutMixPick(mix_n_run=3)
    whole = aug.pick(x, _gen(7), teacher=teacher)
    queried.clear()
    parts = _as_ranks(counts, lambda s: aug.pick(x[s.positions], _gen(7), teacher=teacher))
    # each rank scored only its own rows of the pool: the teacher saw the pool once in total
    assert sorted(queried) == sorted(3 * c for c in counts)
    for p in parts:
        torch.testing.assert_close(p.scores, whole.scores)
        torch.testing.assert_close(p.pool, whole.pool)
    # the default n_pick is the global batch, split over the ranks like the batch
    assert torch.equal(torch.cat([p.index for p in parts]), whole.index)
    assert torch.equal(torch.cat([p.x for p in parts]), whole.x)
    torch.testing.assert_close(
        torch.cat([p.teacher_log_probs for p in parts]), whole.teacher_log_probs
    )


def test_sharded_mixing_without_gather_is_refused():
    x = torch.rand(4, 1, 4, 4)
    with use_shard(BatchShard.from_counts((4, 4), 0)), pytest.raises(ValueError, match="gather"):
        mixup_batch(x, generator=_gen(0))
    # a batch that is not this rank's slice (other length) is augmented on its own
    with use_shard(BatchShard.from_counts((4, 4), 0)):
        assert mixup_batch(torch.rand(3, 1, 4, 4), generator=_gen(0)).x.shape == (3, 1, 4, 4)
