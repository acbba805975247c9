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
    (teacher / "checkpoints").mkdir()
    (teacher / "checkpoints" / "last.pt").write_bytes(b"final weights")
    (teacher / "checkpoints" / "best.pt").write_bytes(b"best on test")
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
    argv += ["--results", str(tmp_path / "results.jsonl")]  # never the committed results file
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


def test_mokd_second_invocation_keeps_the_first_report(tmp_path, monkeypatch):
    bench = _load("mokd_fmnist")
    fake = {"knn_acc_a": 60.0, "linear_acc_a": 61.0, "knn_acc_b": 50.0, "linear_acc_b": 51.0}
    monkeypatch.setattr(bench, "_worker", lambda *a, **k: dict(fake))
    out = tmp_path / "out"
    argv = ["--smoke", "--out", str(out), "--results"]
    assert bench.main([*argv, str(tmp_path / "first.jsonl")]) == 0
    first = {n: (out / n).read_text() for n in ("report.md", "results.json")}
    fake["knn_acc_a"] = 70.0
    assert bench.main([*argv, str(tmp_path / "second.jsonl")]) == 0
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


def test_kd_runs_and_overhead_append_to_results(tmp_path, monkeypatch):
    """Each student run trained and each overhead measurement is one JSON line in --results."""
    import argparse

    bench = _load("kd_fmnist")
    results = tmp_path / "kd.jsonl"
    results.write_text('{"earlier": 1}\n')
    args = argparse.Namespace(
        seeds="0",
        student_model="cnn_small",
        teacher_model="resnet8",
        epochs=1,
        data_dir=None,
        batch_size=128,
        lr=0.05,
        overhead_steps=5,
        results=str(results),
    )
    tdir = _teacher(tmp_path)
    (tdir / "metrics.json").write_text(
        json.dumps({"test_acc": 90.0, "best_acc": 90.5, "epochs": 6, "images_per_sec": 100.0})
    )

    def fake_run(cfg):
        out = Path(cfg.out_dir)
        out.mkdir(parents=True)
        acc = {"ce": 80.0, "kd": 82.5}[cfg.method]
        keys = {"model": cfg.model, "epochs": cfg.epochs, "images_per_sec": 50.0}
        (out / "metrics.json").write_text(json.dumps({**keys, "test_acc": acc, "best_acc": acc}))

    monkeypatch.setattr(bench, "run", fake_run)
    bench.accuracy_table(args, tmp_path / "out", tdir)
    bench.accuracy_table(args, tmp_path / "out", tdir)  # reused runs are not appended again
    speeds = {
        "hand": iter([100.0, 120.0, 110.0]),
        "same": iter([90.0, 114.0, 100.0]),  # the same float32 step: called with amp="none"
        "default": iter([200.0, 210.0, 205.0]),
    }
    monkeypatch.setattr(bench, "hand_written_kd", lambda *a: next(speeds["hand"]))
    monkeypatch.setattr(
        bench, "engine_epoch_kd", lambda *a, **k: next(speeds["same" if "amp" in k else "default"])
    )
    text = bench.overhead_table(args, tdir, tmp_path / "out")
    lines = [json.loads(line) for line in results.read_text().splitlines()]
    assert lines[0] == {"earlier": 1}
    runs = [(r["run"], r["seed"], r["test_acc"]) for r in lines if r.get("kind") == "accuracy"]
    assert runs == [("student alone", 0, 80.0), ("KD", 0, 82.5)]
    (over,) = [r for r in lines if r.get("kind") == "overhead"]
    assert over["hand"] == [100.0, 120.0, 110.0] and over["default_config"][1] == 210.0
    # best of 3: hand 120, same step 114 -> 5% slower
    assert over["overhead_pct"] == pytest.approx(5.0)
    assert "+5.0%" in text and "finished_at" in over


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
    results = str(tmp_path / "r.jsonl")
    argv = ["--smoke", "--untrained", "--seeds", "0,1", "--out", str(out), "--results", results]
    assert bench.main(argv) == 0
    assert [n.split("_")[0] for n, u in seen if u] == ["untrained", "untrained"]
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

    for script in (
        "mekd_fmnist",
        "stablekd_fmnist",
        "mokd_fmnist",
        "augment_fmnist",
        "fmnist_teacher",
    ):
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


# -- Fashion-MNIST benchmarks: one JSON line per finished run, reruns skip, --report -------------
def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def test_results_file_appends_after_a_torn_line_and_reads_it_back(tmp_path, capsys):
    shared = _load("fmnist_teacher")
    path = tmp_path / "r.jsonl"
    shared.append_result(path, {"seed": 0})
    with path.open("a") as f:
        f.write('{"seed": 1, "acc')  # killed mid-write
    assert [r["seed"] for r in shared.read_results(path)] == [0]
    shared.append_result(path, {"seed": 2})
    first, last = json.loads(_lines(path)[0]), json.loads(_lines(path)[-1])
    assert first["seed"] == 0 and last["seed"] == 2
    with pytest.raises(SystemExit, match="r.jsonl:2 is not a JSON line"):
        shared.read_results(path)  # a bad line that is not the last one is not skipped quietly


def test_each_results_line_is_stamped_when_it_is_written(tmp_path, monkeypatch):
    shared = _load("fmnist_teacher")
    facts = shared.run_facts(1, 2)  # taken once, when a benchmark starts
    clock = iter(["2026-01-01T10:00:00+0000", "2026-01-01T11:30:00+0000"])
    monkeypatch.setattr(shared.time, "strftime", lambda fmt: next(clock))
    path = tmp_path / "r.jsonl"
    shared.append_result(path, {"seed": 0, **facts})
    shared.append_result(path, {"seed": 1, **facts})
    rows = shared.read_results(path)
    assert [r["finished_at"] for r in rows] == [
        "2026-01-01T10:00:00+0000",
        "2026-01-01T11:30:00+0000",
    ]
    assert all(r["threads"] == 1 and r["jobs"] == 2 for r in rows)


def test_teacher_is_its_final_weights_and_an_unfinished_run_is_refused(tmp_path):
    shared = _load("fmnist_teacher")
    info = shared.teacher_info(_teacher(tmp_path))
    assert Path(info["teacher_checkpoint"]).read_bytes() == b"final weights"
    assert info["teacher_acc"] == 90.0
    (tmp_path / "teacher" / "metrics.json").unlink()
    with pytest.raises(SystemExit, match="distillkit resume"):
        shared.teacher_info(tmp_path / "teacher")


def test_validation_split_is_a_stratified_part_of_train_and_leaves_test_unread():
    shared = _load("fmnist_teacher")
    from distillkit.data.datasets import load_dataset

    full = load_dataset("digits")
    split = load_dataset(shared.register_val_split(0.25, 3, "digits"))
    assert len(split.train) + len(split.test) == len(full.train)
    train_rows = {x.numpy().tobytes() for x in full.train.images}
    assert all(x.numpy().tobytes() in train_rows for x in split.test.images)
    held = {x.numpy().tobytes() for x in split.test.images}
    assert not any(x.numpy().tobytes() in held for x in split.train.images)
    full_counts = np.bincount(full.train.labels.numpy())
    assert np.bincount(split.test.labels.numpy()).tolist() == [
        int(round(0.25 * c)) for c in full_counts
    ]


def _augment_record(settings: dict, worker_args: dict, out: str) -> dict:
    """A fake (scheme, seed) job: numbers from the scheme's position, no training."""
    rank = ["identity", "cutmix", "cutmixpick"].index(settings["scheme"].split(":")[0])
    return {"scheme": settings["scheme"], "seed": settings["seed"], "epochs": 1, "train_size": 9,
            "split": "test", "t_stddev": 0.03 - 0.01 * rank + 0.001 * settings["seed"],
            "student_test_acc": 80.0 + 2 * rank + 0.1 * settings["seed"],
            "student_test_loss": 0.6 - 0.1 * rank + 0.01 * settings["seed"], "wall_s": 1.0}  # fmt: skip


def test_augment_appends_each_run_and_a_rerun_skips_the_recorded_ones(tmp_path, monkeypatch):
    bench = _load("augment_fmnist")
    calls = []
    monkeypatch.setattr(
        bench, "scheme_job", lambda s, a, o: calls.append(s["seed"]) or _augment_record(s, a, o)
    )
    monkeypatch.setattr(bench, "scatter_plot", lambda rows, path: path)  # no matplotlib here
    results = tmp_path / "augment.jsonl"
    argv = ["--teacher", str(_teacher(tmp_path)), "--results", str(results), "--epochs", "1",
            "--schemes", "identity,cutmix", "--out", str(tmp_path / "runs")]  # fmt: skip
    assert bench.main([*argv, "--seeds", "0,1"]) == 0
    first = _lines(results)
    assert len(first) == 4 and calls == [0, 1, 0, 1]
    assert bench.main([*argv, "--seeds", "0,1,2"]) == 0  # only seed 2 is new
    assert calls == [0, 1, 0, 1, 2, 2] and _lines(results)[:4] == first
    assert bench.main([*argv, "--seeds", "0,1,2", "--lr", "0.05"]) == 0  # other settings: rerun
    assert len(calls) == 12 and len(_lines(results)) == 12
    row = json.loads(first[0])
    for key in ("scheme", "seed", "epochs", "train_size", "student_test_acc", "teacher_acc",
                "threads", "git_head", "t_stddev"):  # fmt: skip
        assert key in row
    assert row["teacher_checkpoint"].endswith("last.pt")


def test_augment_report_is_rebuilt_from_the_file_with_verdicts(tmp_path, capsys):
    bench = _load("augment_fmnist")
    shared = _load("fmnist_teacher")
    results = tmp_path / "augment.jsonl"
    for scheme in ("identity", "cutmix", "cutmixpick:criterion=teacher_entropy"):
        for seed in (0, 1, 2):
            s = {"scheme": scheme, "seed": seed, "epochs": 1}
            shared.append_result(results, {**_augment_record(s, {}, ""), "settings": s})
    assert bench.main(["--report", "--results", str(results)]) == 0
    text = capsys.readouterr().out
    accs = [82.0, 82.1, 82.2]  # cutmix's three seeds
    row = next(line for line in text.splitlines() if line.startswith("| cutmix | 3 |"))
    assert f"| {np.mean(accs):.2f} ± {np.std(accs, ddof=1):.2f} |" in row
    # loss falls as T. stddev falls: Spearman +1 over the scheme means, every resample too
    assert "| spearman | 1.000 |" in text
    assert "Spearman(T. stddev, test loss) >= 0.7 (over scheme means: 1.000): **confirmed**" in text
    assert "ranking cutmixpick:criterion=teacher_entropy >= cutmix" in text
    assert text.count("**confirmed**") == 3
    # the other way round: CutMixPick clearly below identity is refuted
    flipped = tmp_path / "flipped.jsonl"
    for row in shared.read_results(results):
        if row["scheme"] == "identity":
            row["student_test_acc"] += 10
        shared.append_result(flipped, row)
    bench.main(["--report", "--results", str(flipped)])
    assert "ranking cutmix >= identity (student acc difference -8.00 points): **refuted**" in (
        capsys.readouterr().out
    )


def _curve(acc: list[float], n: int = 10) -> dict:
    return {"epochs": list(range(1, len(acc) + 1)), "acc": acc, "seconds": [1.0] * len(acc),
            "final": acc[-1], "train_samples": n}  # fmt: skip


def test_stablekd_rerun_skips_recorded_runs_and_reports_from_the_file(tmp_path, monkeypatch):
    bench = _load("stablekd_fmnist")
    ran = []

    def fake(spec, own=None):
        ran.append(spec["name"])
        seed = spec["seed"]
        if spec["method"] == "stablekd":
            return _curve([85.0 + seed, 90.0, 90.5, 91.0])  # KD's final from epoch 2 on
        return _curve([70.0, 80.0, 85.0, 90.0])  # KD: only at its last epoch

    monkeypatch.setattr(bench, "run_spec", fake)
    results, out = tmp_path / "skd.jsonl", tmp_path / "out"
    argv = ["--teacher", str(_teacher(tmp_path)), "--out", str(out), "--results", str(results),
            "--epochs", "4", "--stage-epochs", "1,1,2", "--skip-kt", "--only", "kd,stablekd"]  # fmt: skip
    assert bench.main([*argv, "--seeds", "0,1"]) == 0
    first = _lines(results)
    assert sorted(ran) == ["kd_s0", "kd_s1", "stablekd_s0", "stablekd_s1"] and len(first) == 4
    assert bench.main([*argv, "--seeds", "0,1"]) == 0
    assert len(ran) == 4 and _lines(results) == first  # nothing rerun, nothing rewritten
    assert (out / "stablekd_fmnist.png").is_file()
    row = json.loads(first[0])
    assert {"method", "seed", "epochs", "train_size", "final_acc", "curve_acc"} <= set(row)
    text = bench.report_file(results)
    assert "| stablekd | 100% | 10 | 2 | 91.00 ± 0.00 | 2, 2 | 2.0 |" in text
    assert "| kd | 100% | 10 | 2 | 90.00 ± 0.00 | 4, 4 | 4.0 |" in text
    assert "in fewer epochs (speed-up 2.00x): **confirmed**" in text
    assert "up to 10x faster: **refuted**" in text


def test_mokd_rerun_skips_recorded_runs_and_reports_verdicts(tmp_path, monkeypatch, capsys):
    bench = _load("mokd_fmnist")
    calls = []

    def fake_worker(data, run_dir, threads, untrained=False):
        calls.append(data["name"])
        bonus = 5.0 if data["method"] == "mokd" else 0.0
        s = data["seed"]
        return {"knn_acc_a": 60.0 + bonus + s, "linear_acc_a": 61.0 + s,
                "knn_acc_b": 50.0 + bonus + s, "linear_acc_b": 51.0 - bonus + s}  # fmt: skip

    monkeypatch.setattr(bench, "_worker", fake_worker)
    results = tmp_path / "mokd.jsonl"
    argv = ["--smoke", "--seeds", "0,1", "--out", str(tmp_path / "o"), "--results", str(results)]
    assert bench.main(argv) == 0 and len(calls) == 6 and len(_lines(results)) == 6
    assert bench.main(argv) == 0 and len(calls) == 6 and len(_lines(results)) == 6
    capsys.readouterr()
    assert bench.main(["--report", "--results", str(results)]) == 0
    text = capsys.readouterr().out
    assert "| CNN (resnet8) with MOKD | 65.50 ± 0.71 | 61.50 ± 0.71 | 2 |" in text
    assert (
        "MOKD improves the CNN's knn accuracy over DINO alone (+5.00 points): **confirmed**" in text
    )
    assert (
        "MOKD improves the CNN's linear accuracy over DINO alone (+0.00 points): **not confirmed**"
        in text
    )
    assert "ViT's linear accuracy over DINO alone (-15.00 points): **refuted**" in text
