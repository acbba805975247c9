"""MOKD: T-head search target, frozen teachers, cross terms, shipped configs, benchmark outputs.

The end-to-end run and its exact resume are in tests/test_resume_ssl.py.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from distillkit.config import ConfigError, load_config
from distillkit.methods.mokd import MOKD
from distillkit.methods.ssl_heads import DINOHead, TransformerHead

torch.set_num_threads(1)

TINY_MOKD = [
    "method=mokd",
    "dataset=digits",
    "model=resnet8",
    "options.a.cross_weight=1.0",
    "options.b.model=vit_tiny",
    "options.b.model_kwargs={patch_size: 4, dim: 16, depth: 1, heads: 2}",
    "options.b.optimizer=adamw",
    "options.b.lr=0.0005",
    "options.b.cross_weight=0.1",
    "options.out_dim=32",
    "options.head_hidden=16",
    "options.head_bottleneck=8",
    "options.thead_width=16",
    "options.thead_depth=1",
    "options.thead_heads=2",
    "options.global_size=8",
    "options.local_size=4",
    "options.local_crops_number=2",
    "epochs=2",
    "batch_size=16",
    "options.warmup_teacher_temp_epochs=2",
    "options.probe_steps=20",
    "quiet=true",
    "device=cpu",
]


def build_method(cfg):
    """The distiller of a config, built as `distillkit train` builds it."""
    from distillkit.data.datasets import load_dataset
    from distillkit.runner import build_distiller, build_student

    bundle = load_dataset(cfg.dataset)
    torch.manual_seed(cfg.seed)
    return build_distiller(cfg, build_student(cfg, bundle), None, bundle)


def _thead() -> TransformerHead:
    torch.manual_seed(0)
    return TransformerHead(
        in_dim=6, out_dim=10, width=8, depth=2, heads=2, mlp_ratio=2.0, grid=(2, 2)
    )


def test_search_target_shape_and_query_output_dropped():
    head = _thead().eval()
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(3, 4, 6, generator=g)
    query = torch.randn(3, 8, generator=g)
    target = head.search(query, tokens, (2, 2))
    assert target.shape == (3, 10)
    x = torch.cat([query[:, None], head.embed(tokens, (2, 2))], dim=1)
    y = head.norm(head.blocks(x))
    assert torch.allclose(target, head.project(y[:, 1:].mean(1)), atol=1e-6)
    # pooling with the query's own output would give something else
    assert not torch.allclose(target, head.project(y.mean(1)), atol=1e-3)
    # the query still matters, through attention
    other = head.search(torch.randn(3, 8, generator=g), tokens, (2, 2))
    assert not torch.allclose(target, other, atol=1e-4)


def test_thead_handles_smaller_local_grids():
    head = _thead()
    pooled, out = head(torch.randn(5, 1, 6), (1, 1))
    assert pooled.shape == (5, 8) and out.shape == (5, 10)


def test_thead_projection_head_separates_images_sharing_a_common_component():
    """Regression: the T-head's bare output (l2-normalise + WN linear on the pooled token) maps
    pooled tokens that share a big common part to one output, so centered DINO targets go
    uniform (loss ~ log(out_dim)). The DINO projection head (MLP + BN + bottleneck) does not."""
    g = torch.Generator().manual_seed(0)
    pooled = 10.0 * torch.randn(1, 16, generator=g) + 0.3 * torch.randn(32, 16, generator=g)

    def spread(head: TransformerHead) -> float:
        with torch.no_grad():
            out = F.normalize(head.project(pooled), dim=-1)
        return (1.0 - out @ out.T).mean().item()

    torch.manual_seed(0)
    bare = TransformerHead(in_dim=6, out_dim=64, width=16, depth=1, heads=2)
    torch.manual_seed(0)
    mlp = TransformerHead(
        in_dim=6,
        out_dim=64,
        width=16,
        depth=1,
        heads=2,
        head_layers=3,
        head_hidden=32,
        head_bottleneck=8,
        head_bn=True,
    )
    assert isinstance(mlp.head, DINOHead) and mlp.head.last_layer.weight_g.requires_grad is False
    assert spread(bare) < 1e-2 < 0.2 < spread(mlp)
    # the search target goes through the same projection head
    tokens = torch.randn(4, 49, 6, generator=g)
    x = torch.cat([pooled[:4, None], mlp.embed(tokens, (7, 7))], dim=1)
    expected = mlp.head(mlp.norm(mlp.blocks(x))[:, 1:].mean(1))
    assert torch.allclose(mlp.search(pooled[:4], tokens, (7, 7)), expected, atol=1e-5)


def test_thead_head_layers_from_config_and_rejects_negative():
    cfg = load_config(None, [*TINY_MOKD, "options.thead_head_layers=2", "options.head_bn=true"])
    method = build_method(cfg)
    for m in method.members.values():
        head = m.student.thead.head
        assert isinstance(head, DINOHead)
        assert any(isinstance(x, torch.nn.BatchNorm1d) for x in head.modules())
    from distillkit.runner import check_config

    with pytest.raises(ConfigError, match="options.thead_head_layers"):
        check_config(load_config(None, [*TINY_MOKD, "options.thead_head_layers=-1"]))


def _method_and_views():
    method = build_method(load_config(None, TINY_MOKD))
    g = torch.Generator().manual_seed(0)
    views = [torch.randn(4, 1, 8, 8, generator=g) for _ in range(2)]
    views += [torch.randn(4, 1, 4, 4, generator=g) for _ in range(2)]
    return method, views


def test_teachers_never_receive_gradients():
    method, views = _method_and_views()
    assert isinstance(method, MOKD)
    losses = method.compute_losses(views, 0.04)
    assert set(losses["a"]) == {"dino", "dino_thead", "cross", "search"}
    total = sum(sum(t.values()) for t in losses.values())
    total.backward()
    for name, m in method.members.items():
        assert all(not p.requires_grad and p.grad is None for p in m.teacher.parameters()), name
        grads = [p.grad for p in m.student.parameters() if p.requires_grad]
        assert any(g is not None and g.abs().sum() > 0 for g in grads), name


def test_cross_terms_are_lambda_weighted_and_search_uses_other_teacher():
    method, views = _method_and_views()
    a, b = method.members["a"], method.members["b"]
    s_a = a.student(views)
    with torch.no_grad():
        t_b = b.teacher(views[:2])
        # the target, written out: A's detached local-crop query prepended to B's teacher tokens of
        # global view 1, through B's teacher T-head blocks, query output dropped, mean, project
        th = b.teacher.thead
        tokens = th.embed(t_b["tokens"][0], t_b["grids"][0])
        expected_targets = []
        for i in (2, 3):
            x = torch.cat([s_a["pooled"][i][:, None], tokens], dim=1)
            expected_targets.append(th.project(th.norm(th.blocks(x))[:, 1:].mean(1)))
    # CE of softmax(target / 0.04) against log_softmax(student / 0.1), batch mean, crop mean
    expected = (
        sum(
            -(F.softmax(tgt / 0.04, -1) * F.log_softmax(s_a["thead"][i] / 0.1, -1)).sum(-1).mean()
            for i, tgt in zip((2, 3), expected_targets)
        )
        / 2
    )
    losses = method.compute_losses(views, 0.04)
    assert losses["a"]["search"].item() == pytest.approx(1.0 * expected.item(), rel=1e-4)
    # the same models with another lambda for B scale B's cross terms exactly by the ratio
    method2, _ = _method_and_views()
    method2.members["b"].cross_weight = 0.5
    losses2 = method2.compute_losses(views, 0.04)
    assert method.members["b"].cross_weight == pytest.approx(0.1)
    for term in ("cross", "search"):
        assert losses2["b"][term].item() / 0.5 == pytest.approx(
            losses["b"][term].item() / 0.1, rel=1e-5
        )
    assert losses2["b"]["dino"].item() == pytest.approx(losses["b"]["dino"].item(), rel=1e-6)


def test_trainer_rejects_uneven_global_batch(tmp_path):
    from distillkit.engine.distributed import DistContext
    from distillkit.engine.trainer import Trainer

    cfg = load_config(None, [*TINY_MOKD, "batch_size=15", f"out_dir={tmp_path}"])
    from distillkit.data.datasets import load_dataset

    with pytest.raises(ValueError, match="divisible"):
        Trainer(
            cfg,
            build_method(cfg),
            load_dataset("digits"),
            torch.device("cpu"),
            tmp_path,
            DistContext(rank=0, world_size=2),
        )


def _bench_module():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "mokd_fmnist.py"
    spec = importlib.util.spec_from_file_location("mokd_fmnist_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_writes_partial_results_as_runs_finish(tmp_path):
    bench = _bench_module()
    args = bench.parse_args(["--smoke", "--device", "cuda", "--jobs", "3", "--out", str(tmp_path)])
    assert (args.epochs, args.seeds, args.train_samples, args.jobs) == (1, "0", 256, 3)
    assert bench.parse_args(["--epochs", "3"]).epochs == 3
    runs = bench.runs_for_seed(args, 0)
    assert set(runs) == {"mokd", "dino_vit", "dino_cnn"}
    assert all(r["device"] == "cuda" and r["seed"] == 0 for r in runs.values())
    # the ViT alone and inside MOKD use the same recipe, and so do the two CNNs
    vit_alone = runs["dino_vit"]
    vit_recipe = {
        **vit_alone["options"]["a"],
        "model": vit_alone["model"],
        "model_kwargs": vit_alone["model_kwargs"],
    }
    assert vit_recipe == runs["mokd"]["options"]["b"]
    assert runs["dino_cnn"]["options"]["a"] == runs["mokd"]["options"]["a"]
    assert runs["dino_cnn"]["model"] == runs["mokd"]["model"] == "resnet8"
    from distillkit.config import config_from_dict
    from distillkit.runner import check_config

    for data in runs.values():  # every run config is valid, options included
        cfg = config_from_dict({**data, "out_dir": str(tmp_path / "x")})
        check_config(cfg)
        # 256 of the 60000 training images, in equal batches
        assert round(cfg.subset.fraction * 60000) == 256 and cfg.drop_last

    # two of six runs finished (one failed): the table has what is there, n says how much
    per_run = {
        "mokd_s1": {
            "knn_acc_a": 80.0,
            "linear_acc_a": 82.0,
            "knn_acc_b": 70.0,
            "linear_acc_b": 71.0,
        },
        "dino_cnn_s0": {"error": "Traceback ..."},
    }
    table = bench.write_outputs(tmp_path, args, [0, 1], per_run, 0.0)
    assert (tmp_path / "report.md").read_text() == table
    rows = {line.split(" | ")[0].lstrip("| "): line for line in table.splitlines()}
    assert "| 80.00 ± 0.00 | 82.00 ± 0.00 | 1 |" in rows["CNN (resnet8) with MOKD"]
    assert "| 70.00 ± 0.00 | 71.00 ± 0.00 | 1 |" in rows["ViT (vit_tiny) with MOKD"]
    assert "| - | - | 0 |" in rows["CNN (resnet8) DINO alone"]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["complete"] is False
    assert (saved["finished_runs"], saved["expected_runs"]) == (2, 6)
    assert saved["results"]["vit_mokd"] == {"knn": [70.0], "linear": [71.0]}
    assert "error" in saved["runs"]["dino_cnn_s0"]


@pytest.mark.parametrize("config", ["configs/digits_dino.yaml", "configs/digits_mokd.yaml"])
def test_digits_configs_build_and_take_one_step(config):
    from pathlib import Path

    from distillkit.data.multicrop import MultiCrop

    cfg = load_config(Path(__file__).resolve().parents[1] / config, ["device=cpu"])
    assert cfg.drop_last and not cfg.augment
    method = build_method(cfg)
    o = method.options
    crop = MultiCrop(o.global_size or 8, o.local_size, o.local_crops_number)
    views = crop(torch.rand(8, 1, 8, 8), torch.Generator().manual_seed(0))
    losses = method.compute_losses(views, o.warmup_teacher_temp)
    total = sum(sum(t.values()) for t in losses.values())
    assert torch.isfinite(total)
    total.backward()
