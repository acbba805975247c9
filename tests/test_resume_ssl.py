"""DINO and MOKD through `distillkit train`: kill after epoch 1, resume, same weights and metrics.

Also what a finished self-supervised run gives `distillkit evaluate` / `export`: model a's EMA
teacher with the linear probe of the last evaluation as its classifier.
"""

from __future__ import annotations

import json
import math
import signal

import pytest
import torch

from distillkit.cli import main
from distillkit.engine.checkpoint import load_checkpoint
from tests.helpers import cli_env, read_rows, run_cli, without_timing
from tests.test_ssl import TINY as SSL_TINY

# every test here uses a finished run per method (about 10 s on two cores)
pytestmark = pytest.mark.slow

# test_ssl's tiny DINO run (96 digits, 3 batches of 32, 2 epochs), as this file always ran it:
# without its method key (each method is set below) and without quiet=true
TINY = [a for a in SSL_TINY if a not in ("method=dino", "quiet=true")]
MOKD = [
    "options.a.cross_weight=1.0",
    "options.b.model=vit_tiny",
    "options.b.model_kwargs={patch_size: 4, dim: 16, depth: 1, heads: 2}",
    "options.b.optimizer=adamw",
    "options.b.lr=0.0005",
    "options.b.warmup_epochs=1",
    "options.b.weight_decay=0.04",
    "options.b.weight_decay_end=0.4",
    "options.b.freeze_last_layer=1",
    "options.b.cross_weight=0.1",
    "options.thead_width=16",
    "options.thead_depth=1",
    "options.thead_heads=2",
]
ARGS = {"dino": ["method=dino", *TINY], "mokd": ["method=mokd", *TINY, *MOKD]}


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """One uninterrupted run per method, trained in this process (an interpreter start is slow)."""
    from distillkit.config import load_config
    from distillkit.runner import run

    out = {}
    for method, args in ARGS.items():
        run_dir = tmp_path_factory.mktemp(method) / "straight"
        run(load_config(None, [*args, "quiet=true", f"out_dir={run_dir}"]))
        out[method] = run_dir
    return out


@pytest.mark.parametrize("method", ["dino", "mokd"])
def test_killed_after_epoch_1_and_resumed_equals_straight_run(tmp_path, straight, method):
    broken = tmp_path / "broken"
    proc = run_cli(
        "train",
        *ARGS[method],
        f"out_dir={broken}",
        "--quiet",
        env=cli_env(DISTILLKIT_KILL_AFTER_EPOCH="1"),
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert load_checkpoint(broken, "last")["epoch"] == 1
    assert not (broken / "metrics.json").exists()
    # the resume runs here: one interpreter start less (one thread, as in the killed process)
    assert main(["resume", str(broken), "--quiet"]) == 0

    a, b = load_checkpoint(straight[method], "last"), load_checkpoint(broken, "last")
    assert a["epoch"] == b["epoch"] == 2 and a["global_step"] == b["global_step"] == 6
    # students, EMA teachers, centers and the probe classifier: everything the method holds
    assert a["distiller"].keys() == b["distiller"].keys()
    for key, value in a["distiller"].items():
        assert torch.equal(value, b["distiller"][key]), key
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    members = "ab" if method == "mokd" else "a"
    assert a["optimizers"].keys() == b["optimizers"].keys() == set(members)
    for name in a["optimizers"]:
        sa, sb = a["optimizers"][name], b["optimizers"][name]
        assert sa["param_groups"] == sb["param_groups"]
        for pa, pb in zip(sa["state"].values(), sb["state"].values(), strict=True):
            for k in pa:
                assert torch.equal(torch.as_tensor(pa[k]), torch.as_tensor(pb[k])), (name, k)
    rows_a, rows_b = read_rows(straight[method]), read_rows(broken)
    assert [r["epoch"] for r in rows_a] == [1, 2]
    assert without_timing(rows_a) == without_timing(rows_b)
    ja = json.loads((straight[method] / "metrics.json").read_text())
    jb = json.loads((broken / "metrics.json").read_text())
    for m in members:
        for key in (f"knn_acc_{m}", f"linear_acc_{m}"):
            assert 0 <= ja[key] <= 100 and ja[key] == jb[key], key
    assert ja["method"] == method and ja["best_acc"] == jb["best_acc"]
    assert ja["best_acc"] == pytest.approx(
        max(
            sum(r[f"knn_acc_{m}"] for m in members) / len(members)
            for r in rows_a
            if "knn_acc_a" in r
        )
    )
    assert "loss_a_dino" in rows_a[0] and math.isfinite(rows_a[0]["loss_a_dino"])
    if method == "mokd":
        assert {"loss_b_cross", "loss_b_search", "loss_a_dino_thead"} <= set(rows_a[0])


def test_evaluate_gives_the_linear_probe_classifier_of_model_a(straight, capsys):
    # the checkpoint's model is a's EMA teacher with the probe of the last evaluation folded into
    # its classifier: evaluating it on the whole test split reproduces linear_acc_a
    run_dir = straight["dino"]
    summary = json.loads((run_dir / "metrics.json").read_text())
    capsys.readouterr()
    assert main(["evaluate", str(run_dir), "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out)
    n_test = 450  # digits test split
    assert abs(result["test_acc"] - summary["linear_acc_a"]) <= 100.0 / n_test + 1e-9
    assert summary["test_acc"] == summary["linear_acc_a"]


def test_checkpoint_model_is_the_ema_teacher_backbone(straight):
    state = load_checkpoint(straight["mokd"], "best")
    teacher = {
        k.removeprefix("student.a.teacher.backbone.model."): v
        for k, v in state["distiller"].items()
        if k.startswith("student.a.teacher.backbone.model.")
    }
    assert teacher and set(state["model"]) == set(teacher) | {
        "classifier.weight",
        "classifier.bias",
    }
    for key, value in teacher.items():
        assert torch.equal(state["model"][key], value), key
    from distillkit.models import build_model

    fresh = build_model("resnet8", in_channels=1, num_classes=10, image_size=8)
    assert state["model"]["classifier.weight"].shape == fresh.classifier.weight.shape
