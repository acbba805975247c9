"""Training on kernel-thinning subsets chosen from pixels or teacher embeddings."""

from __future__ import annotations

import json

import numpy as np
import pytest

from distillkit.cli import main
from distillkit.data.datasets import load_dataset


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    assert main(["train", "model=mlp", "epochs=1", f"out_dir={out}", "--quiet"]) == 0
    return out


@pytest.mark.parametrize("features", ["pixels", "teacher"])
def test_kt_subset_is_class_balanced_and_saved(tmp_path, teacher, features):
    out = tmp_path / "run"
    args = ["distill", "model=mlp", "epochs=1", f"teacher={teacher}", f"out_dir={out}", "--quiet"]
    args += ["subset.method=kt", "subset.fraction=0.4", f"subset.features={features}"]
    assert main(args) == 0
    idx = np.load(out / "subset_indices.npy")
    labels = load_dataset("digits").train.labels.numpy()
    n = len(labels)
    assert (
        len(idx)
        == round(0.4 * n)
        == json.loads((out / "metrics.json").read_text())["train_samples"]
    )
    assert len(np.unique(idx)) == len(idx)
    # per class: the subset keeps each class's share of the split to within one sample
    for c in range(10):
        share = (labels == c).sum() * len(idx) / n
        assert abs((labels[idx] == c).sum() - share) <= 1.0


def test_kt_subset_differs_between_pixel_and_teacher_features(tmp_path, teacher):
    chosen = {}
    for features in ("pixels", "teacher"):
        out = tmp_path / features
        args = [
            "distill",
            "model=mlp",
            "epochs=1",
            f"teacher={teacher}",
            f"out_dir={out}",
            "--quiet",
        ]
        args += ["subset.method=kt", "subset.fraction=0.2", f"subset.features={features}"]
        assert main(args) == 0
        chosen[features] = set(np.load(out / "subset_indices.npy").tolist())
    assert chosen["pixels"] != chosen["teacher"]


def test_teacher_features_need_a_teacher(tmp_path, capsys):
    args = [
        "train",
        "model=mlp",
        "subset.method=kt",
        "subset.features=teacher",
        f"out_dir={tmp_path}",
    ]
    assert main(args) == 2
    assert "subset.features" in capsys.readouterr().err
