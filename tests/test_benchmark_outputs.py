"""Benchmark scripts never lose an earlier invocation's results (the training inside is faked)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(
        f"{name}_bench", ROOT / "benchmarks" / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _teacher(tmp_path: Path) -> Path:
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    (teacher / "metrics.json").write_text(json.dumps({"test_acc": 90.0, "model": "resnet8"}))
    return teacher


def _kept(out: Path, pattern: str, text: str) -> bool:
    """True when some file of out matching pattern holds exactly text."""
    return any(p.read_text() == text for p in out.glob(pattern))


def test_mekd_second_invocation_appends_to_runs_jsonl(tmp_path, monkeypatch):
    """README runs mekd_fmnist twice into one --out (5k/20k, then 100k): both stay recorded."""
    bench = _load("mekd_fmnist")
    from distillkit.teachers import server

    class FakeServer:
        def __init__(self, app):
            self.url = "http://127.0.0.1:1"

        def start(self):
            return self

        def stop(self):
            pass

    monkeypatch.setattr(server, "load_service", lambda *a, **k: None)
    monkeypatch.setattr(server, "create_app", lambda *a, **k: None)
    monkeypatch.setattr(server, "ServerThread", FakeServer)
    ran = []

    def fake_run(job):
        ran.append((job["method"], job["budget"]))
        return {"method": job["method"], "budget": job["budget"], "seed": job["spec"]["seed"],
                "acc": 50.0 + len(ran), "queries": 1, "MB": 0.0, "seconds": 0.0}  # fmt: skip

    monkeypatch.setattr(bench, "run_one", fake_run)
    teacher, out = _teacher(tmp_path), tmp_path / "out"
    argv = ["mekd_fmnist.py", "--teacher", str(teacher), "--out", str(out), "--seeds", "0"]
    for budgets in ("5000", "100000", "5000"):
        monkeypatch.setattr(sys, "argv", [*argv, "--budgets", budgets, "--methods", "blackbox_kd"])
        assert bench.main() == 0
    rows = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    assert [(r["budget"], r["acc"]) for r in rows] == [(5000, 51.0), (100000, 52.0)]
    assert ran == [("blackbox_kd", 5000), ("blackbox_kd", 100000)]  # the rerun reused its row
    report = (out / "report.md").read_text()
    assert (
        "| 5000 | blackbox_kd | 1 | 51.00" in report
        and "| 100000 | blackbox_kd | 1 | 52.00" in report
    )


def test_stablekd_second_invocation_keeps_the_first_report(tmp_path, monkeypatch):
    bench = _load("stablekd_fmnist")
    curve = {"epochs": [1], "acc": [80.0], "seconds": [1.0], "final": 80.0, "train_samples": 10}
    monkeypatch.setattr(bench, "run_spec", lambda spec, own=None: dict(curve))
    monkeypatch.setattr(bench, "plot", lambda *a, **k: None)
    teacher, out = _teacher(tmp_path), tmp_path / "out"
    argv = ["--teacher", str(teacher), "--out", str(out), "--seeds", "0", "--skip-kt"]
    assert bench.main([*argv, "--epochs", "3", "--stage-epochs", "1,1,1"]) == 0
    first = {n: (out / n).read_text() for n in ("report.md", "results.json")}
    assert bench.main([*argv, "--only", "kd", "--epochs", "3", "--stage-epochs", "1,1,1"]) == 0
    assert "| stablekd |" not in (out / "report.md").read_text()
    assert _kept(out, "report*.md", first["report.md"])
    assert _kept(out, "results*.json", first["results.json"])


def test_mokd_second_invocation_keeps_the_first_report(tmp_path, monkeypatch):
    bench = _load("mokd_fmnist")
    fake = {"knn_acc_a": 60.0, "linear_acc_a": 61.0, "knn_acc_b": 50.0, "linear_acc_b": 51.0}
    monkeypatch.setattr(bench, "_worker", lambda *a, **k: dict(fake))
    out = tmp_path / "out"
    assert bench.main(["--smoke", "--out", str(out)]) == 0
    first = {n: (out / n).read_text() for n in ("report.md", "results.json")}
    fake["knn_acc_a"] = 70.0
    assert bench.main(["--smoke", "--out", str(out)]) == 0
    assert "70.00" in (out / "report.md").read_text()
    assert _kept(out, "report*.md", first["report.md"])
    assert _kept(out, "results*.json", first["results.json"])


def test_kd_second_invocation_keeps_the_first_report(tmp_path, monkeypatch):
    bench = _load("kd_fmnist")
    monkeypatch.setattr(bench, "ensure_teacher", lambda args, out: out / "teacher")
    monkeypatch.setattr(bench, "accuracy_table", lambda *a: "accuracy table")
    overhead = iter(["overhead +0.3%", "overhead +9.9%"])
    monkeypatch.setattr(bench, "overhead_table", lambda *a: next(overhead))
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["kd_fmnist.py", "--out", str(out)])
    bench.main()
    first = (out / "report.md").read_text()
    monkeypatch.setattr(sys, "argv", ["kd_fmnist.py", "--out", str(out), "--skip-accuracy"])
    bench.main()
    assert "+9.9%" in (out / "report.md").read_text()
    assert "+0.3%" in first and _kept(out, "report*.md", first)


def test_augment_second_invocation_keeps_the_first_results(tmp_path, monkeypatch):
    bench = _load("augment_fmnist")
    losses = iter([0.5, 0.7])

    def fake_score(cfg, schemes, seeds, out_dir, train_students):
        loss = next(losses)
        result = {
            "schemes": [
                {
                    "scheme": s,
                    "t_stddev": 0.01 * i,
                    "t_stddev_seeds": [0.01 * i] * len(seeds),
                    "student_test_acc_seeds": [80.0] * len(seeds),
                    "student_test_loss_seeds": [loss + 0.01 * i] * len(seeds),
                }
                for i, s in enumerate(["identity", "flip", "cutmix"], 1)
            ],  # fmt: skip
            "correlations": {},
            "plot": str(out_dir / "tstddev_vs_test_loss.png"),
        }
        (out_dir / "da_score.json").write_text(json.dumps(result))
        (out_dir / "da_score.csv").write_text(f"loss {loss}\n")
        return result

    monkeypatch.setattr(bench, "run_da_score", fake_score)
    teacher, out = _teacher(tmp_path), tmp_path / "out"
    argv = ["--teacher", str(teacher), "--out", str(out), "--seeds", "0", "--epochs", "1"]
    assert bench.main(argv) == 0
    first = {n: (out / n).read_text() for n in ("da_score.json", "da_score.csv")}
    assert bench.main(argv) == 0
    assert "0.7" in (out / "da_score.csv").read_text()
    assert _kept(out, "da_score*.json", first["da_score.json"])
    assert _kept(out, "da_score*.csv", first["da_score.csv"])


# -- MOKD: the untrained rows of README's table ---------------------------------------------------
def test_mokd_untrained_rows_come_from_the_benchmark(tmp_path, monkeypatch):
    """--untrained adds the MOKD pair at initialisation, evaluated like the trained models."""
    bench = _load("mokd_fmnist")
    seen = []

    def fake_worker(data, run_dir, threads, untrained=False):
        seen.append((Path(run_dir).name, untrained))
        if untrained:
            return {
                "knn_acc_a": 10.0,
                "linear_acc_a": 11.0,
                "knn_acc_b": 20.0,
                "linear_acc_b": 21.0,
            }
        return {"knn_acc_a": 60.0, "linear_acc_a": 61.0, "knn_acc_b": 50.0, "linear_acc_b": 51.0}

    monkeypatch.setattr(bench, "_worker", fake_worker)
    out = tmp_path / "out"
    assert bench.main(["--smoke", "--untrained", "--seeds", "0,1", "--out", str(out)]) == 0
    assert [n for n, u in seen if u] == ["untrained", "untrained"]
    table = (out / "report.md").read_text()
    rows = {line.split(" | ")[0].lstrip("| "): line for line in table.splitlines()}
    assert "| 10.00 ± 0.00 | 11.00 ± 0.00 | 2 |" in rows["CNN (resnet8) untrained"]
    assert "| 20.00 ± 0.00 | 21.00 ± 0.00 | 2 |" in rows["ViT (vit_tiny) untrained"]
    assert "| 60.00 ± 0.00 | 61.00 ± 0.00 | 2 |" in rows["CNN (resnet8) DINO alone"]
    assert json.loads((out / "results.json").read_text())["expected_runs"] == 8
    # the untrained pair is the MOKD run's own initial pair: same config, seed and eval sets
    args = bench.parse_args(["--smoke", "--untrained"])
    untrained = bench.untrained_runs(args, 0)["untrained"]
    assert {**untrained, "name": None} == {**bench.runs_for_seed(args, 0)["mokd"], "name": None}


def test_mokd_untrained_evaluation_does_not_train(tmp_path, monkeypatch):
    bench = _load("mokd_fmnist")
    args = bench.parse_args(["--smoke", "--untrained"])
    pair = bench.untrained_runs(args, 0)["untrained"]
    options = {
        **pair["options"],
        "b": {
            **pair["options"]["b"],
            "model_kwargs": {"patch_size": 4, "dim": 16, "depth": 1, "heads": 2},
        },
        "thead_width": 16,
        "thead_depth": 1,
        "thead_heads": 2,
        "global_size": 8,
        "local_size": 4,
        "eval_train_samples": 300,
        "eval_test_samples": 100,
        "probe_steps": 10,
        "out_dim": 32,
        "head_hidden": 16,
        "head_bottleneck": 8,
    }
    data = {
        **pair,
        "options": options,
        "dataset": "digits",
        "device": "cpu",
        "quiet": True,
        "subset": {"method": "random", "fraction": 64 / 1347, "per_class": False},
    }
    trained = []
    monkeypatch.setattr(bench.Trainer, "fit", lambda self, *a: trained.append(1))
    summary = bench.evaluate_untrained(data, tmp_path / "u")
    assert not trained and summary["epochs"] == 0
    for key in ("knn_acc_a", "linear_acc_a", "knn_acc_b", "linear_acc_b"):
        assert 0.0 <= summary[key] <= 100.0
    assert not (tmp_path / "u" / "checkpoints").exists()
    # a finished evaluation is read back, not redone
    monkeypatch.setattr(bench, "Trainer", None)
    assert bench.evaluate_untrained(data, tmp_path / "u") == summary


@pytest.fixture(autouse=True)
def _one_thread():
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)  # the scripts set their own thread counts


# -- the worker pool the benchmarks share ---------------------------------------------------------
def _pool():
    if str(ROOT / "benchmarks") not in sys.path:  # importable by name, so spawned workers find it
        sys.path.insert(0, str(ROOT / "benchmarks"))
    import _pool

    return _pool


def pool_job(value: int) -> dict:
    """A job for the pool tests: fails on a negative value, else reports its thread settings."""
    import os

    import torch

    if value < 0:
        raise ValueError(f"negative value {value}\nsecond line")
    return {
        "value": value,
        "threads": torch.get_num_threads(),
        "omp": os.environ["OMP_NUM_THREADS"],
    }


@pytest.mark.parametrize("n_workers", [1, 2])
def test_pool_reports_results_and_one_line_errors_by_job_name(n_workers):
    pool = _pool()
    jobs = [pool.Job("good", (3,)), pool.Job("bad", (-1,))]
    results, errors = [], []
    failed = pool.run_jobs(
        jobs,
        pool_job,
        n_workers=n_workers,
        threads_per_worker=3,
        on_result=lambda name, value: results.append((name, value)),
        on_error=errors.append,
    )
    assert results == [("good", {"value": 3, "threads": 3, "omp": "3"})]
    assert failed == errors and [e.name for e in errors] == ["bad"]
    line = errors[0].line()
    assert "\n" not in line and line.startswith("bad") and "ValueError: negative value -1" in line
    assert "Traceback" in errors[0].traceback and "pool_job" in errors[0].traceback


def test_pool_ctrl_c_stops_the_jobs_not_yet_run():
    from distillkit.runner import RunInterrupted

    pool = _pool()
    ran = []

    def job(stop: BaseException | None) -> None:
        ran.append(stop)
        if stop is not None:
            raise stop

    for stop in (KeyboardInterrupt(), RunInterrupted("interrupted; last checkpoint: x")):
        ran.clear()
        with pytest.raises(KeyboardInterrupt):
            jobs = [pool.Job("a", (stop,)), pool.Job("b", (None,))]
            pool.run_jobs(jobs, job, 1, 1, on_result=lambda *a: None)
        assert ran == [stop]  # b never started


def test_benchmarks_use_only_the_public_api():
    """No benchmark imports a private name of distillkit (its internals change without notice)."""
    import ast

    for script in ("mekd_fmnist", "stablekd_fmnist", "mokd_fmnist"):
        tree = ast.parse((ROOT / "benchmarks" / f"{script}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("distillkit"):
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"{script} imports {private} from {node.module}"


def test_stablekd_own_random_subset_trains_through_the_public_runner(tmp_path):
    """The fallback subset path (no distillkit.data.subset) trains a real run on its indices."""
    bench = _load("stablekd_fmnist")
    spec = {"dataset": "digits", "model": "mlp", "epochs": 1, "device": "cpu", "quiet": True,
            "name": "own", "out_dir": str(tmp_path / "own")}  # fmt: skip
    curve = bench.run_spec(spec, own_random_subset=0.1)
    indices = np.load(tmp_path / "own" / "subset_indices.npy")
    assert curve["train_samples"] == len(indices) and 0 < len(indices) < 1347 * 0.2
    assert curve["epochs"] == [1]
