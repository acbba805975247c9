"""Batched transforms and the deterministic, shardable BatchLoader."""

from __future__ import annotations

import pytest
import torch

from distillkit.data import (
    BatchLoader,
    DataBundle,
    Split,
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


@pytest.mark.parametrize("n", [50, 49])
def test_shards_union_equals_single_process(n):
    split = _split(n)
    single = torch.cat([i for _, _, i in _epoch(_loader(split, batch_size=8), 2)])
    shards = [
        torch.cat([i for _, _, i in _epoch(_loader(split, batch_size=4, rank=r, world_size=2), 2)])
        for r in range(2)
    ]
    assert len(shards[0]) == len(shards[1])  # ranks must agree on the step count
    # Interleaving rank 0 and rank 1 reproduces the single-process order (plus wrap padding).
    merged = torch.stack(shards, 1).flatten()
    assert torch.equal(merged[:n], single)
    assert set(merged.tolist()) == set(range(n))
    if n % 2:
        assert merged[n:].tolist() == single[: len(merged) - n].tolist()


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
