"""benchmarks/mekd_fmnist.py: its white-box reference, and its results file (appended, never
rewritten, with the keys the table is recomputed from)."""

from __future__ import annotations

import json
import sys
from importlib.util import module_from_spec, spec_from_file_location
from pathlib import Path
from types import SimpleNamespace

from distillkit.config import config_from_dict
from distillkit.runner import check_teacher_data


def load_bench():
    """The benchmark script as a module."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "mekd_fmnist.py"
    spec = spec_from_file_location("mekd_fmnist_bench", path)
    bench = module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def fake_servers(monkeypatch):
    """No teacher server: the runs are replaced by the tests."""
    from distillkit.teachers import server

    fake = SimpleNamespace(url="http://127.0.0.1:1", stop=lambda: None)
    fake.start = lambda: fake
    monkeypatch.setattr(server, "load_service", lambda *a, **k: None)
    monkeypatch.setattr(server, "create_app", lambda *a, **k: None)
    monkeypatch.setattr(server, "ServerThread", lambda app: fake)


def fake_teacher(tmp_path) -> Path:
    """A directory the benchmark takes for a trained teacher (its metrics only)."""
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    (teacher / "metrics.json").write_text(json.dumps({"test_acc": 90.0}))
    return teacher


def test_benchmark_whitebox_reference_accepts_its_fashion_mnist_teacher(tmp_path, monkeypatch):
    """mekd_fmnist's white-box KD: a teacher trained on fashion-mnist, students on the edge shard."""
    bench = load_bench()
    fake_servers(monkeypatch)
    jobs = []
    row = {"seed": 0, "acc": 1.0, "queries": 0, "MB": 0.0, "seconds": 0.0}
    monkeypatch.setattr(bench, "run_one", lambda job: jobs.append(job) or {**job, **row})
    argv = ["mekd_fmnist.py", "--teacher", str(fake_teacher(tmp_path))]
    argv += ["--out", str(tmp_path / "out"), "--results", str(tmp_path / "results.jsonl")]
    monkeypatch.setattr(sys, "argv", [*argv, "--seeds", "0", "--methods", "whitebox_kd"])
    assert bench.main() == 0
    shape = {"in_channels": 1, "image_size": 28, "num_classes": 10, "classes": list("0123456789")}
    meta = {"dataset": "fashion-mnist", **shape}
    check_teacher_data(
        config_from_dict(jobs[0]["spec"]), meta, SimpleNamespace(name=bench.EDGE, **shape)
    )


def test_results_file_is_appended_with_the_table_keys_and_variants_run_mekd(tmp_path, monkeypatch):
    bench = load_bench()
    jobs = []

    def run_one(job):
        jobs.append(job)
        acc = 50.0 + len(jobs)
        return {"method": job["method"], "budget": job["budget"], "seed": job["spec"]["seed"],
                "split": job["split"], "acc": acc, "queries": job["budget"], "MB": 0.0,
                "seconds": 6.0, "options": job["spec"]["options"]}  # fmt: skip

    monkeypatch.setattr(bench, "run_one", run_one)
    results = tmp_path / "results.jsonl"
    results.write_text('{"method": "earlier", "budget": 1, "seed": 0}\n')
    argv = ["mekd_fmnist.py", "--local", "--teacher", str(fake_teacher(tmp_path))]
    argv += ["--out", str(tmp_path / "out"), "--results", str(results), "--seeds", "0"]
    argv += ["--budgets", "100", "--methods", "blackbox_kd,mekd_hard"]
    argv += ["--variant", "mekd_soft_x:edge_share=0.25,gan_loss=bce", "--val"]
    monkeypatch.setattr(sys, "argv", argv)
    assert bench.main() == 0
    lines = [json.loads(x) for x in results.read_text().splitlines()]
    assert lines[0] == {"method": "earlier", "budget": 1, "seed": 0}  # kept, not rewritten
    assert [r["method"] for r in lines[1:]] == ["blackbox_kd", "mekd_hard", "mekd_soft_x"]
    for r, job in zip(lines[1:], jobs):
        assert {"method", "budget", "seed", "test_acc", "teacher_queries", "minutes"} <= set(r)
        assert r["split"] == "val" and r["teacher_via"] == "local" and r["minutes"] == 0.1
        assert job["spec"]["dataset"] == bench.EDGE_VAL  # chosen on validation, never test
    specs = {j["method"]: j["spec"] for j in jobs}
    assert specs["mekd_soft_x"]["method"] == "mekd"
    assert specs["mekd_soft_x"]["options"]["edge_share"] == 0.25
    assert specs["mekd_soft_x"]["options"]["response"] == "soft"
    assert specs["mekd_hard"]["options"] == {"response": "hard", "budget": 100}  # the defaults
    # a second invocation adds new runs after the old lines and reruns nothing recorded
    monkeypatch.setattr(sys, "argv", [*argv[:-5], "--budgets", "200", "--methods", "blackbox_kd"])
    assert bench.main() == 0
    again = [json.loads(x) for x in results.read_text().splitlines()]
    assert again[:4] == lines and [r["budget"] for r in again[4:]] == [200]


def test_results_line_carries_the_options_an_mekd_run_resolved(tmp_path):
    """A row names its GAN even when it ran on defaults, so a later change of default is visible."""
    from distillkit.methods.mekd_options import MEKDOptions

    bench = load_bench()
    resolved = bench._resolved(MEKDOptions(gen_width=24, beta=3.0))
    assert resolved["gen_width"] == 24 and resolved["beta"] == 3.0
    assert resolved["gan_steps_per_batch"] == MEKDOptions().gan_steps_per_batch
    row = {"method": "mekd_soft", "budget": 10, "seed": 0, "acc": 50.0, "queries": 10, "MB": 0.0,
           "seconds": 60.0, "options": {"budget": 10}, "resolved": resolved}  # fmt: skip
    shared = tmp_path / "shared.jsonl"
    bench.record(tmp_path / "runs.jsonl", row, shared, {"teacher_acc": 88.0})
    line = json.loads(shared.read_text())
    assert line["resolved"]["gen_width"] == 24 and line["teacher_acc"] == 88.0
    del row["resolved"]
    bench.record(tmp_path / "runs.jsonl", {**row, "method": "blackbox_kd"}, shared)
    assert "resolved" not in json.loads(shared.read_text().splitlines()[-1])


def test_table_spread_is_the_sample_standard_deviation():
    """Three seeds at 1, 2 and 3 points: std 1 (n - 1), as every other benchmark table reports."""
    bench = load_bench()
    rows = [
        {"budget": 5, "method": "m", "acc": a, "queries": 5, "MB": 0.0} for a in (1.0, 2.0, 3.0)
    ]
    (row,) = bench.table(rows)
    assert row["acc_mean"] == 2.0 and abs(row["acc_std"] - 1.0) < 1e-12


def test_an_interrupted_attempts_run_directory_is_kept_aside_not_appended_to(tmp_path, monkeypatch):
    bench = load_bench()
    run_dir = tmp_path / "runs" / "mekd_soft_b100_s0"
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text('{"epoch": 1}\n')  # what the interrupted attempt wrote
    seen = []

    def fake_prepare(cfg):
        seen.append(run_dir.exists())  # the fresh attempt starts without the old directory
        raise RuntimeError("stop here")

    monkeypatch.setattr(bench, "prepare", fake_prepare)
    monkeypatch.setattr(bench, "register_edge", lambda args: None)
    job = {"args": {}, "spec": {"out_dir": str(run_dir), "model": "mlp"}}
    try:
        bench.run_one(job)
    except RuntimeError:
        pass
    assert seen == [False]
    kept = [p for p in (tmp_path / "runs").iterdir() if p.name.startswith("mekd_soft_b100_s0.")]
    assert len(kept) == 1 and "interrupted" in kept[0].name
    assert (kept[0] / "metrics.jsonl").read_text() == '{"epoch": 1}\n'  # nothing deleted
