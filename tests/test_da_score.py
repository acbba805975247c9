"""T. stddev against a direct numpy computation, and `distillkit da-score` end to end on digits."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from distillkit.cli import main
from distillkit.commands.da_score import correlations
from distillkit.data.augment import build_augmentation
from distillkit.data.tstddev import t_stddev, t_stddev_from_windows, window_means


def _np_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(1, keepdims=True)
    return np.exp(z) / np.exp(z).sum(1, keepdims=True)


def test_t_stddev_equals_direct_numpy_computation():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 6, generator=g, dtype=torch.float64)
    batches = [torch.randn(8, 1, 4, 4, generator=g) for _ in range(11)]

    def teacher(x):
        return x.flatten(1).double() @ w

    res = t_stddev(
        teacher,
        batches,
        build_augmentation("flip"),
        window_batches=3,
        generator=torch.Generator().manual_seed(5),
    )
    # direct: redo the flips with the same draws, then windows of 3 batches (2 left over dropped)
    g2 = torch.Generator().manual_seed(5)
    wn = w.numpy()
    per_batch = []
    for x in batches:
        coins = (torch.rand(8, generator=g2) < 0.5).numpy()
        xn = x.numpy().astype(np.float64)
        x_aug = np.where(coins[:, None, None, None], xn[..., ::-1], xn)
        per_batch.append(
            np.concatenate(
                [_np_softmax(xn.reshape(8, -1) @ wn), _np_softmax(x_aug.reshape(8, -1) @ wn)]
            )
        )
    rows = np.stack([np.concatenate(per_batch[3 * k : 3 * k + 3]).mean(0) for k in range(3)])
    expected = np.mean(np.std(rows, axis=0, ddof=1))
    assert res.n_windows == 3 and res.images_per_window == 48
    np.testing.assert_allclose(res.window_means, rows, rtol=1e-5, atol=1e-7)
    assert res.value == pytest.approx(expected, rel=1e-4)
    p_all = np.concatenate(per_batch)
    assert res.mean_entropy == pytest.approx(-(p_all * np.log(p_all)).sum(1).mean(), rel=1e-5)


def test_window_helpers():
    probs = [[torch.full((2, 3), float(i))] for i in range(4)]
    means, size = window_means(probs, window_batches=2)
    np.testing.assert_allclose(means, [[0.5] * 3, [2.5] * 3])
    assert size == 4
    assert t_stddev_from_windows(means) == pytest.approx(np.std([0.5, 2.5], ddof=1))
    with pytest.raises(ValueError, match="at least 2 windows"):
        t_stddev_from_windows(means[:1])


def test_correlations_match_direct_formulas():
    x, y = [0.1, 0.3, 0.2, 0.5], [1.0, 2.5, 2.0, 2.2]
    c = correlations(x, y)
    assert c["pearson"]["statistic"] == pytest.approx(np.corrcoef(x, y)[0, 1])
    assert c["spearman"]["statistic"] == pytest.approx(
        np.corrcoef([1, 3, 2, 4], [1, 4, 2, 3])[0, 1]
    )
    # Kendall: 6 pairs, 5 concordant, 1 discordant
    assert c["kendall"]["statistic"] == pytest.approx((5 - 1) / 6)
    assert correlations([0.1, 0.2], [1.0, 2.0])["pearson"]["statistic"] is None


def _pearson(x: list[float], y: list[float]) -> float:
    dx, dy = np.asarray(x) - np.mean(x), np.asarray(y) - np.mean(y)
    return float((dx * dy).sum() / np.sqrt((dx**2).sum() * (dy**2).sum()))


def _ranks(v: list[float]) -> list[float]:
    """1-based ranks of distinct values."""
    return [float(sorted(v).index(a) + 1) for a in v]


def _kendall(x: list[float], y: list[float]) -> float:
    """(concordant - discordant) / pairs, for values without ties."""
    n = len(x)
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    return sum(np.sign(x[i] - x[j]) * np.sign(y[i] - y[j]) for i, j in pairs) / len(pairs)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("da") / "teacher"
    rc = main(
        [
            "train",
            "model=mlp",
            "epochs=1",
            "batch_size=32",
            "lr=0.2",
            "device=cpu",
            f"out_dir={out}",
            "--quiet",
        ]
    )
    assert rc == 0
    return out


def test_da_score_end_to_end(teacher_dir, tmp_path, capsys):
    out = tmp_path / "score"
    rc = main(
        [
            "da-score",
            f"teacher={teacher_dir}",
            "model=mlp",
            "device=cpu",
            "--quiet",
            "--schemes",
            "identity,cutout:length=4,cutmixpick",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    for name in ("identity", "cutout:length=4", "cutmixpick", "T. stddev"):
        assert name in printed
    result = json.loads((out / "da_score.json").read_text())
    rows = result["schemes"]
    assert [r["scheme"] for r in rows] == ["identity", "cutout:length=4", "cutmixpick"]
    # digits: 1347 train images -> 21 batches of 64 -> 4 windows of 640 images
    assert all(r["windows"] == 4 for r in rows)
    assert all(np.isfinite(r["t_stddev"]) and r["t_stddev"] > 0 for r in rows)
    assert "correlations" not in result
    with open(out / "da_score.csv") as fh:
        assert [r["scheme"] for r in csv.DictReader(fh)] == [r["scheme"] for r in rows]


def test_da_score_with_students(teacher_dir, tmp_path, capsys):
    out = tmp_path / "students"
    rc = main(
        [
            "da-score",
            f"teacher={teacher_dir}",
            "model=mlp",
            "epochs=1",
            "device=cpu",
            "--quiet",
            "--schemes",
            "identity,mixup,cutmix",
            "--train-students",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "spearman" in printed and "kendall" in printed
    result = json.loads((out / "da_score.json").read_text())
    rows = result["schemes"]
    x = [r["t_stddev"] for r in rows]
    y = [r["student_test_loss"] for r in rows]
    assert all(0 <= r["student_test_acc"] <= 100 for r in rows)
    corr = result["correlations"]
    # written-out formulas (the command itself uses scipy); three distinct values, so no ties
    assert len(set(x)) == len(set(y)) == len(rows) == 3
    assert corr["pearson"]["statistic"] == pytest.approx(_pearson(x, y))
    assert corr["spearman"]["statistic"] == pytest.approx(_pearson(_ranks(x), _ranks(y)))
    assert corr["kendall"]["statistic"] == pytest.approx(_kendall(x, y))
    assert (out / "tstddev_vs_test_loss.png").stat().st_size > 0
    metrics = (out / "students" / "mixup_s0" / "metrics.jsonl").read_text()
    assert "loss_kd_aug" in metrics
    saved = (out / "students" / "mixup_s0" / "config.yaml").read_text()
    assert "kd_da" in saved and "mixup" in saved


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--schemes", "identity,bogus"], "'bogus'"),
        (["--schemes", "cutout:size=3"], "'size'"),
        (["--schemes", "mixup:alpha=-2"], "'alpha'"),
        (["--seeds", "a,b"], "--seeds"),
    ],
)
def test_da_score_errors_name_the_problem(teacher_dir, tmp_path, capsys, args, needle):
    rc = main(["da-score", f"teacher={teacher_dir}", "model=mlp", "--out", str(tmp_path), *args])
    assert rc == 2
    assert needle in capsys.readouterr().err


def test_da_score_needs_a_teacher(tmp_path, capsys):
    assert main(["da-score", "model=mlp", "--out", str(tmp_path), "--schemes", "identity"]) == 2
    assert "teacher" in capsys.readouterr().err


def test_da_score_rerun_reuses_finished_students(teacher_dir, tmp_path, monkeypatch, capsys):
    # a relative --out and teacher: the saved config holds them absolute, the rerun must match it
    monkeypatch.chdir(tmp_path)
    (tmp_path / "t").symlink_to(teacher_dir, target_is_directory=True)
    args = ["da-score", "teacher=t", "model=mlp", "epochs=1", "device=cpu", "--quiet"]
    args += ["--schemes", "identity", "--train-students", "--out", "rel"]
    assert main(args) == 0
    student = tmp_path / "rel" / "students" / "identity_s0"
    first = (student / "metrics.json").read_text()
    stamp = (student / "checkpoints" / "last.pt").stat().st_mtime_ns
    assert main(args) == 0, capsys.readouterr().err
    assert (student / "checkpoints" / "last.pt").stat().st_mtime_ns == stamp
    assert (student / "metrics.json").read_text() == first
    rows = json.loads((tmp_path / "rel" / "da_score.json").read_text())["schemes"]
    assert rows[0]["student_test_acc"] == json.loads(first)["test_acc"]
