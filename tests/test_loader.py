"""Batched transforms and the deterministic, shardable BatchLoader."""

from __future__ import annotations

import pytest
import torch

from distillkit.data import (
    BatchLoader,
    DataBundle,
    Split,
    derive_seed,
    make_loaders,
    normalize,
    random_crop_flip,
    to_float,
)


def _split(n: int = 50, c: int = 1, h: int = 8) -> Split:
    g = torch.Generator().manual_seed(123)
    images = torch.randint(0, 256, (n, c, h, h), generator=g, dtype=torch.uint8)
    return Split(images, torch.arange(n) % 10)


def _loader(split: Split, **kw) -> BatchLoader:
    c = split.images.shape[1]
    defaults = dict(mean=[0.5] * c, std=[0.25] * c, shuffle=True, augment=False, seed=7)
    defaults.update(kw)
    bs = defaults.pop("batch_size", 8)
    return BatchLoader(split, bs, **defaults)


def _epoch(loader: BatchLoader, epoch: int = 0):
    loader.set_epoch(epoch)
    return list(loader)


# --------------------------------------------------------------------------- transforms


def test_to_float_and_normalize():
    x = torch.tensor([0, 51, 255], dtype=torch.uint8).reshape(1, 3, 1, 1)
    f = to_float(x)
    assert f.dtype == torch.float32 and f.flatten().tolist() == pytest.approx([0, 0.2, 1])
    y = normalize(f, (0.0, 0.2, 0.5), (1.0, 0.1, 0.25))
    assert y.flatten().tolist() == pytest.approx([0.0, 0.0, 2.0])


def _reference(x: torch.Tensor, padding: int, oy: int, ox: int, flipped: bool) -> torch.Tensor:
    """The window of the zero-padded image at (oy, ox), by direct slicing."""
    h, w = x.shape[-2:]
    padded = torch.nn.functional.pad(x, (padding,) * 4)
    win = padded[:, oy : oy + h, ox : ox + w]
    return torch.flip(win, dims=[-1]) if flipped else win


@pytest.mark.parametrize("flip", [False, True])
def test_crop_is_shifted_window_per_sample(flip):
    padding, b = 3, 64
    # Distinct values everywhere so each window (and mirror) is identifiable.
    x = torch.arange(b * 2 * 6 * 6, dtype=torch.float32).reshape(b, 2, 6, 6) + 1
    out = random_crop_flip(x, padding, flip, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    seen = set()
    for i in range(b):
        hits = [
            (oy, ox, f)
            for oy in range(2 * padding + 1)
            for ox in range(2 * padding + 1)
            for f in ((False, True) if flip else (False,))
            if torch.equal(out[i], _reference(x[i], padding, oy, ox, f))
        ]
        assert hits, f"sample {i} is not a (flipped) window of its padded image"
        seen.add(hits[0])
    # Per-sample randomness: 64 draws over 49 (or 98) outcomes cannot all coincide.
    assert len(seen) > 10
    if flip:
        assert {f for _, _, f in seen} == {False, True}


def test_identical_images_get_different_crops():
    x = torch.rand(1, 3, 32, 32).expand(16, 3, 32, 32).contiguous()
    out = random_crop_flip(x, 4, True, torch.Generator().manual_seed(1))
    distinct = {tuple(o.flatten().tolist()) for o in out}
    assert len(distinct) > 8


def test_flip_only_matches_torch_flip():
    x = torch.rand(32, 3, 5, 7)
    g = torch.Generator().manual_seed(3)
    out = random_crop_flip(x, 0, True, g)
    flipped = torch.flip(x, dims=[-1])
    is_flip = [torch.equal(out[i], flipped[i]) for i in range(32)]
    is_same = [torch.equal(out[i], x[i]) for i in range(32)]
    assert all(a or b for a, b in zip(is_flip, is_same))
    assert 0 < sum(is_flip) < 32


def test_crop_flip_deterministic_given_seed():
    x = torch.rand(20, 1, 28, 28)
    a = random_crop_flip(x, 4, True, torch.Generator().manual_seed(5))
    b = random_crop_flip(x, 4, True, torch.Generator().manual_seed(5))
    c = random_crop_flip(x, 4, True, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_crop_noop_cases():
    x = torch.rand(4, 1, 8, 8)
    assert torch.equal(random_crop_flip(x, 0, False, torch.Generator()), x)
    assert random_crop_flip(x[:0], 2, True, torch.Generator()).shape == (0, 1, 8, 8)


# --------------------------------------------------------------------------- loader


def test_same_seed_epoch_reproduces_batches():
    split = _split()
    a = _epoch(_loader(split, augment=True), 3)
    b = _epoch(_loader(split, augment=True), 3)  # a fresh loader "resumed" at epoch 3
    assert len(a) == len(b) == 7
    for (xa, ya, ia), (xb, yb, ib) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and torch.equal(ia, ib)


def test_different_epochs_differ_and_cover_everything():
    loader = _loader(_split())
    e0 = torch.cat([i for _, _, i in _epoch(loader, 0)])
    e1 = torch.cat([i for _, _, i in _epoch(loader, 1)])
    assert not torch.equal(e0, e1)
    assert sorted(e0.tolist()) == sorted(e1.tolist()) == list(range(50))


def test_batches_match_split_contents():
    split = _split(c=3)
    mean, std = [0.1, 0.2, 0.3], [0.5, 0.6, 0.7]
    loader = _loader(split, mean=mean, std=std)
    for x, y, idx in loader:
        assert x.dtype == torch.float32 and y.dtype == torch.int64 and idx.dtype == torch.int64
        assert torch.equal(y, split.labels[idx])
        torch.testing.assert_close(x, normalize(to_float(split.images[idx]), mean, std))


def test_no_shuffle_is_sequential():
    idx = torch.cat([i for _, _, i in _loader(_split(), shuffle=False)])
    assert idx.tolist() == list(range(50))


@pytest.mark.parametrize("n", [50, 49, 51, 48, 3])
@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_get_their_slice_of_the_single_process_batch(n, world_size):
    # 50 ends with a batch of 2 split 1 + 1, 49 with a batch of 1 (the other rank gets one padding
    # row), 51 with 3 split 2 + 1; crops and flips must be the same pixels, not just the same indices
    split = _split(n, c=2)
    kw = dict(augment=True, flip=True, padding=2)
    single = _epoch(_loader(split, batch_size=8 * world_size, **kw), 2)
    ranks = [
        _loader(split, batch_size=8, rank=r, world_size=world_size, **kw) for r in range(world_size)
    ]
    shards = [_epoch(loader, 2) for loader in ranks]
    assert all(len(s) == len(single) for s in shards)  # ranks must agree on the step count
    for step, (x, y, idx) in enumerate(single):
        t = len(idx)
        counts = tuple(t // world_size + (r < t % world_size) for r in range(world_size))
        parts = [s[step] for s in shards]
        # a rank with no sample left gets one padding row (the batch's last sample), weight 0
        real = [(px[:c], py[:c], pi[:c]) for (px, py, pi), c in zip(parts, counts)]
        assert torch.equal(torch.cat([r[2] for r in real]), idx)
        assert torch.equal(torch.cat([r[1] for r in real]), y)
        assert torch.equal(torch.cat([r[0] for r in real]), x)
        for (px, _, pi), c in zip(parts, counts):
            assert len(pi) == max(c, 1)
            if c == 0:
                assert pi.tolist() == idx[-1:].tolist() and torch.equal(px, x[-1:])
        for r, loader in enumerate(ranks):
            assert loader.shard_counts(step) == counts
            shard = loader.shard(step)
            assert shard.counts == counts and shard.rank == r
            assert shard.positions.tolist() == (
                list(range(sum(counts[:r]), sum(counts[: r + 1]))) or [len(idx) - 1]
            )


def test_single_process_batches_are_unchanged_by_sharding_support():
    # the single-process stream is what existing runs (and their resumes) were trained on
    split = _split(50, c=2)
    loader = _loader(split, augment=True, flip=True, padding=2)
    loader.set_epoch(4)
    order = torch.randperm(50, generator=torch.Generator().manual_seed(derive_seed(7, 4, 0)))
    gen = torch.Generator().manual_seed(derive_seed(7, 4, 1, 0))
    for i, (x, _, idx) in enumerate(loader):
        assert torch.equal(idx, order[i * 8 : (i + 1) * 8])
        want = random_crop_flip(to_float(split.images[idx]), 2, True, gen)
        torch.testing.assert_close(x, normalize(want, [0.5, 0.5], [0.25, 0.25]))


def test_shard_augmentation_differs_per_rank_but_is_deterministic():
    # All samples identical, so any difference between ranks comes from the augmentation RNG.
    split = Split(
        torch.randint(0, 256, (1, 1, 8, 8)).to(torch.uint8).expand(40, 1, 8, 8), torch.zeros(40)
    )
    x0 = _epoch(_loader(split, augment=True, rank=0, world_size=2), 1)[0][0]
    x0b = _epoch(_loader(split, augment=True, rank=0, world_size=2), 1)[0][0]
    x1 = _epoch(_loader(split, augment=True, rank=1, world_size=2), 1)[0][0]
    assert torch.equal(x0, x0b) and not torch.equal(x0, x1)


@pytest.mark.parametrize(
    "n,bs,ws,drop_last,expected",
    [
        (50, 8, 1, False, 7),
        (50, 8, 1, True, 6),
        (48, 8, 1, True, 6),
        (50, 8, 2, False, 4),  # 25 per rank -> 4 batches
        (51, 8, 2, False, 4),  # padded to 52 -> 26 per rank
        (51, 8, 2, True, 3),  # 25 per rank, last partial batch dropped
        (3, 8, 4, False, 1),  # fewer samples than ranks -> wrap around
    ],
)
def test_len(n, bs, ws, drop_last, expected):
    for rank in range(ws):
        loader = _loader(_split(n), batch_size=bs, world_size=ws, rank=rank, drop_last=drop_last)
        batches = list(loader)
        assert len(loader) == len(batches) == expected
        if drop_last:
            assert all(len(b[1]) == bs for b in batches)


def test_subset_indices_honoured():
    subset = [3, 7, 11, 40, 41, 42, 49]
    loader = _loader(_split(), indices=subset, batch_size=3)
    assert len(loader) == 3
    for ep in range(3):
        got = torch.cat([i for _, _, i in _epoch(loader, ep)])
        assert sorted(got.tolist()) == subset
    with pytest.raises(ValueError):
        _loader(_split(), indices=[0, 50])


def test_default_padding_depends_on_size():
    assert _loader(_split(h=8)).padding == 1
    assert _loader(_split(n=2, h=32)).padding == 4
    assert _loader(_split(n=2, h=28)).padding == 3


def test_make_loaders():
    train, test = _split(30, c=1), _split(12, c=1)
    bundle = DataBundle("toy", train, test, 10, 1, 8, (0.5,), (0.25,), list("0123456789"), False)
    tr, te = make_loaders(bundle, 8, seed=1, world_size=2, rank=1, eval_batch_size=5)
    assert tr.shuffle and tr.augment and not tr.flip and tr.world_size == 2 and tr.rank == 1
    assert not te.shuffle and not te.augment and te.world_size == 1 and len(te) == 3
    assert torch.cat([i for _, _, i in te]).tolist() == list(range(12))
