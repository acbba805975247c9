"""Turn a RunConfig into a trained run directory: data, models, teacher, method, trainer.

The runner is where a config meets the registries: it checks model, dataset and method names
and builds the method's typed options (`check_config`); config.py knows none of them. It never
branches on a method's name: what differs between methods is in their registry entry.
"""

from __future__ import annotations

import dataclasses
import difflib
import gc
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from distillkit.config import (
    RunConfig,
    build_dataclass,
    config_from_dict,
    format_overrides,
    read_config_history,
    save_config,
    with_absolute_paths,
)
from distillkit.data import canonical_dataset_spec, list_datasets
from distillkit.data.datasets import DataBundle, load_dataset
from distillkit.data.transforms import normalize, to_float
from distillkit.engine.checkpoint import load_checkpoint, model_from_checkpoint, resolve_checkpoint
from distillkit.engine.distributed import (
    DistContext,
    barrier,
    init_distributed,
    shutdown_distributed,
)
from distillkit.engine.evaluation import evaluate
from distillkit.engine.setup import resolve_device, seed_everything, teacher_cache_enabled
from distillkit.engine.trainer import Trainer
from distillkit.errors import ConfigError
from distillkit.methods import Distiller, get_method
from distillkit.models import (
    build_model,
    canonical_model_spec,
    is_import_spec,
    list_models,
    penultimate_features,
)
from distillkit.models.external import resolve_import_spec
from distillkit.report.run_report import write_run_report
from distillkit.teachers import (
    CachedTeacher,
    ExternalTeacherSpec,
    LocalTeacher,
    OpaqueBlackBoxTeacher,
    is_external_teacher,
    load_external_teacher,
)

# the dataset name of a run whose data were handed over as Python objects (not stored)
IN_MEMORY = "in-memory"


@dataclass
class RunObjects:
    """What a Python caller already holds; used as given instead of being built from the config."""

    student: nn.Module | None = None
    teacher: nn.Module | None = None  # a white-box teacher module (not reloadable by resume)
    bundle: DataBundle | None = None


@dataclass
class Prepared:
    """What a run needs, assembled from its config."""

    cfg: RunConfig
    bundle: DataBundle
    distiller: Distiller
    device: torch.device
    ctx: DistContext
    run_dir: Path
    train_indices: np.ndarray | None
    model_meta: dict[str, Any]


class RunInterrupted(Exception):
    """Training stopped by Ctrl-C; the message says where the last checkpoint is."""


def resolve_options(cfg: RunConfig) -> Any:
    """The method's typed options from cfg.options (None for methods without options)."""
    try:
        spec = get_method(cfg.method)
    except ValueError as exc:
        raise ConfigError(f"config key 'method': {exc}") from None
    if spec.options_cls is None:
        if cfg.options:
            raise ConfigError(f"method '{cfg.method}' takes no options, got {sorted(cfg.options)}")
        return None
    opts = build_dataclass(spec.options_cls, cfg.options, prefix="options.")
    try:
        getattr(opts, "validate", lambda: None)()
    except ConfigError:
        raise
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return opts


def unreloadable_model(spec: str) -> str | None:
    """Why a model recorded from a Python object cannot be rebuilt here (None: it can)."""
    target, _, attr = spec.rpartition(":")
    if "<locals>" in attr:
        where = f"inside a function ({target}:{attr})"
    elif target == "__main__":
        try:  # the same interpreter (a notebook) still has it
            resolve_import_spec(spec, "model")
            return None
        except ValueError:
            where = "in __main__ (a script or notebook)"
    else:
        return None
    name = attr.rsplit(".", 1)[-1]
    return (
        f"model {spec!r} is a class defined {where}, which another process cannot import: a run "
        "from objects defined in __main__ needs the class in an importable file; move it into "
        f"a module (e.g. mynets.py) and pass an instance of it, or model=mynets.py:{name}"
    )


def _check_teacher_keys(cfg: RunConfig, spec_has_teacher: bool) -> None:
    """The teacher_* keys fit together and fit the kind of teacher named."""
    if is_external_teacher(cfg) or cfg.teacher_weights or cfg.teacher_model_kwargs:
        ExternalTeacherSpec.from_any(cfg).validate()
        return
    given = [k for k in ("teacher_kind", "teacher_input", "teacher_budget") if getattr(cfg, k)]
    if given and not (cfg.teacher or spec_has_teacher):
        raise ConfigError(f"config key '{given[0]}' needs a teacher")
    if cfg.teacher_input is not None:
        raise ConfigError(
            "config key 'teacher_input': a distillkit run teacher takes the inputs it was "
            "trained on; teacher_input is for TorchScript, ONNX and teacher_model teachers"
        )
    if cfg.teacher_budget is not None and cfg.teacher_kind in (None, "white-box"):
        raise ConfigError(
            "config key 'teacher_budget': a budget limits a black-box teacher; set "
            "teacher_kind=soft or teacher_kind=hard"
        )


def check_config(cfg: RunConfig, objects: RunObjects | None = None) -> Any:
    """Check what config.py cannot: model, dataset and method names, the method's options, and
    whether the method can use the teacher settings. Returns the typed options."""
    objects = objects or RunObjects()
    # a student module the caller gave is checked by its recorded spec when the run is resumed
    if objects.student is None:
        if problem := unreloadable_model(cfg.model):
            raise ConfigError(problem)
        if not is_import_spec(cfg.model) and cfg.model not in list_models():
            close = difflib.get_close_matches(cfg.model, list_models(), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(
                f"config key 'model': unknown model {cfg.model!r}{hint}; see `distillkit models`, "
                "or give path/to/file.py:Name or package.module:Name"
            )
    if cfg.dataset == IN_MEMORY and objects.bundle is None:
        raise ConfigError(
            "this run's data were given as Python objects (dataset 'in-memory'), which the run "
            "does not store: give dataset=NAME (and data_dir=...) to continue it"
        )
    # a name with ':' is a dataset factory (path/to/file.py:factory or package.module:factory)
    if objects.bundle is None and ":" not in cfg.dataset and cfg.dataset not in list_datasets():
        raise ConfigError(
            f"config key 'dataset': unknown dataset {cfg.dataset!r}; choose from "
            f"{', '.join(list_datasets())}, or give path/to/file.py:factory"
        )
    options = resolve_options(cfg)
    spec = get_method(cfg.method)
    # the teacher keys first: a key missing its partner says more than "needs a teacher"
    _check_teacher_keys(cfg, objects.teacher is not None)
    if spec.needs_teacher and not (cfg.teacher or cfg.teacher_model or objects.teacher is not None):
        raise ConfigError(
            f"method '{cfg.method}' needs a teacher: set teacher=RUN_DIR_OR_CHECKPOINT, a "
            "TorchScript/.onnx file, or teacher_model= with teacher_weights="
        )
    teacher_cache_enabled(cfg, spec.teacher_cache)  # raises where teacher_cache=true cannot hold
    return options


def canonical_config(cfg: RunConfig, base: str | Path | None = None) -> RunConfig:
    """A copy of cfg that works from any folder: teacher, teacher_weights, data_dir and the import
    paths of model, teacher_model and dataset made absolute (relative to `base`, default the cwd)."""
    where = Path(base) if base is not None else Path.cwd()
    cfg = with_absolute_paths(cfg, where)
    teacher_model = cfg.teacher_model
    return dataclasses.replace(
        cfg,
        model=canonical_model_spec(cfg.model, where),
        teacher_model=None if teacher_model is None else canonical_model_spec(teacher_model, where),
        dataset=canonical_dataset_spec(cfg.dataset, where),
    )


def _describe(dataset: Any, channels: Any, size: Any, classes: Any) -> str:
    return f"'{dataset}' ({channels}x{size}x{size}, {classes} classes)"


def check_teacher_data(cfg: RunConfig, meta: dict[str, Any], bundle: DataBundle) -> None:
    """Refuse a teacher trained on other data than this run's (see teacher_dataset_check)."""
    theirs = _describe(
        meta.get("dataset", "?"), meta["in_channels"], meta.get("image_size"), meta["num_classes"]
    )
    ours = _describe(bundle.name, bundle.in_channels, bundle.image_size, bundle.num_classes)
    where = f"teacher {cfg.teacher} was trained on {theirs}, this run uses {ours}"
    if meta["num_classes"] != bundle.num_classes or meta["in_channels"] != bundle.in_channels:
        raise ConfigError(f"{where}: a teacher needs the same input channels and classes")
    classes = meta.get("classes")
    # data handed over as objects have no name or class names of their own to compare
    named = bundle.name != IN_MEMORY
    differs = (
        (named and meta.get("dataset") != bundle.name)
        or meta.get("image_size") != bundle.image_size
        or (named and classes is not None and list(classes) != list(bundle.classes))
    )
    if differs and cfg.teacher_dataset_check:
        raise ConfigError(f"{where}; set teacher_dataset_check=false to use it anyway")


def load_teacher(
    cfg: RunConfig, bundle: DataBundle, device: torch.device | str = "cpu"
) -> nn.Module:
    """The teacher (a finished run or a model trained elsewhere), checked against the data."""
    if is_external_teacher(cfg):
        return load_external_teacher(cfg, bundle=bundle, device=device)
    model, state = model_from_checkpoint(cfg.teacher, which="best")
    check_teacher_data(cfg, state["model_meta"], bundle)
    if cfg.teacher_kind in ("soft", "hard"):
        # not BlackBoxTeacher: methods that re-wrap teacher.model need the answer-only view
        source = str(cfg.teacher)
        kind, classes = cfg.teacher_kind, bundle.num_classes
        teacher = OpaqueBlackBoxTeacher(model, kind, cfg.teacher_budget, "logits", classes, source)
        return teacher.to(device)
    return LocalTeacher(model).to(device)


def load_run_dataset(cfg: RunConfig) -> DataBundle:
    """The dataset a config names, with its dataset_kwargs."""
    return load_dataset(
        cfg.dataset, data_dir=cfg.data_dir, image_size=cfg.image_size, **cfg.dataset_kwargs
    )


def build_student(cfg: RunConfig, bundle: DataBundle) -> nn.Module:
    """The model being trained; a model_kwargs entry the model does not take is a ConfigError."""
    try:
        return build_model(
            cfg.model,
            in_channels=bundle.in_channels,
            num_classes=bundle.num_classes,
            image_size=bundle.image_size,
            **cfg.model_kwargs,
        )
    except (TypeError, ValueError) as exc:
        # the model's own one-line reason (file missing, argument not taken, ...)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if is_import_spec(cfg.model):
            key = "model_kwargs" if cfg.model_kwargs else "model"
            raise ConfigError(f"config key '{key}': {first}") from None
        if not cfg.model_kwargs:
            raise
        if unknown := re.search(r"unexpected keyword argument '(\w+)'", str(exc)):
            raise ConfigError(
                f"config key 'model_kwargs.{unknown.group(1)}': model '{cfg.model}' has no "
                f"argument '{unknown.group(1)}'"
            ) from None
        raise ConfigError(
            f"config key 'model_kwargs': model '{cfg.model}' rejected {cfg.model_kwargs}: {first}"
        ) from None


def build_distiller(
    cfg: RunConfig, student: nn.Module, teacher: nn.Module | None, bundle: DataBundle
) -> Distiller:
    """The method object named by cfg.method, built by its registered builder."""
    return get_method(cfg.method).build(cfg, resolve_options(cfg), student, teacher, bundle)


def choose_subset(
    cfg: RunConfig, bundle: DataBundle, teacher: nn.Module | None, device: torch.device
) -> np.ndarray | None:
    """Training indices selected by cfg.subset (None: the whole split)."""
    sub = cfg.subset
    if sub.method == "full" and sub.fraction >= 1.0:
        return None
    from distillkit.data.subset import select_fraction

    labels = bundle.train.labels.numpy()
    if sub.method == "kt" and sub.features == "teacher":
        assert teacher is not None
        feats = []
        for start in range(0, len(bundle.train), 512):
            x = bundle.train.images[start : start + 512].to(device)
            x = normalize(to_float(x), bundle.mean, bundle.std)
            with torch.no_grad():
                feats.append(penultimate_features(teacher.model, x).float().cpu())
        features = torch.cat(feats).numpy().astype(np.float64)
    else:
        features = (
            bundle.train.images.reshape(len(bundle.train), -1).numpy().astype(np.float64) / 255.0
        )
    method = "random" if sub.method == "full" else sub.method
    return select_fraction(
        features, sub.fraction, labels=labels, method=method, per_class=sub.per_class, seed=cfg.seed
    )


def prepare(
    cfg: RunConfig, resume_state: dict[str, Any] | None = None, objects: RunObjects | None = None
) -> Prepared:
    """Build everything for a run; with resume_state, reuse its subset instead of re-selecting."""
    objects = objects or RunObjects()
    check_config(cfg, objects)
    device = resolve_device(cfg.device)  # device=auto under torchrun: this rank's GPU, below
    ctx = init_distributed(device)
    if ctx.enabled and cfg.device == "auto" and device.type == "cuda":
        device = torch.device("cuda", ctx.local_rank % torch.cuda.device_count())
    if device.type == "cuda":
        torch.cuda.set_device(device)
    seed_everything(cfg.seed, cfg.deterministic)
    bundle = objects.bundle if objects.bundle is not None else load_run_dataset(cfg)
    run_dir = cfg.run_dir()
    teacher: nn.Module | None = None
    if objects.teacher is not None:
        teacher = LocalTeacher(objects.teacher).to(device)
    elif cfg.teacher or cfg.teacher_model:
        teacher = load_teacher(cfg, bundle, device)
        info = getattr(teacher, "info", None)
        if info and ctx.is_main and not cfg.quiet:
            print(
                f"teacher: {info['format']} {info['source']} ({info['kind']}, input "
                f"{info['input']}, outputs {info['outputs']})",
                flush=True,
            )
    # the student is built after seeding so every rank (and every rerun) starts from the same weights
    torch.manual_seed(cfg.seed)
    student = objects.student if objects.student is not None else build_student(cfg, bundle)
    if teacher is not None and teacher_cache_enabled(
        cfg, get_method(cfg.method).teacher_cache, len(bundle.train) * bundle.num_classes
    ):
        cache_path = run_dir / "teacher_cache" / f"{bundle.name}_train_rank{ctx.rank}.pt"
        teacher = CachedTeacher(teacher, len(bundle.train), cache_path)
    distiller = build_distiller(cfg, student, teacher, bundle)
    if resume_state is not None:
        indices = resume_state.get("train_indices")
    else:
        base_teacher = teacher.teacher if isinstance(teacher, CachedTeacher) else teacher
        indices = choose_subset(cfg, bundle, base_teacher, device)
    meta = {
        "name": cfg.model,
        "kwargs": dict(cfg.model_kwargs),
        "in_channels": bundle.in_channels,
        "num_classes": bundle.num_classes,
        "image_size": bundle.image_size,
        "dataset": bundle.name,
        "mean": list(bundle.mean),
        "std": list(bundle.std),
        "classes": list(bundle.classes),
    }
    return Prepared(cfg, bundle, distiller, device, ctx, run_dir, indices, meta)


def record_split(p: Prepared) -> None:
    """Write a carved test split to RUN_DIR/split.json; a resumed run must see the same split."""
    split = p.bundle.info.get("split")
    if split is None:
        return
    path = p.run_dir / "split.json"
    text = json.dumps(split, indent=2) + "\n"
    if path.is_file():
        if json.loads(path.read_text()) != json.loads(text):
            raise ConfigError(
                f"the test split carved now differs from the one in {path} (same data, "
                "dataset_kwargs.seed and dataset_kwargs.val_fraction are needed to continue)"
            )
        return
    path.write_text(text)
    if not p.cfg.quiet:
        print(
            f"test split: {split.get('test', 'carved')} ({len(split.get('val_files', []))} "
            f"images, seed {split.get('seed')}); listed in {path}",
            flush=True,
        )


def _execute(p: Prepared, resume_state: dict[str, Any] | None) -> dict[str, Any]:
    try:
        trainer = Trainer(
            p.cfg, p.distiller, p.bundle, p.device, p.run_dir, p.ctx, p.train_indices, p.model_meta
        )
        try:
            if resume_state is not None:
                trainer.load_state(resume_state)
            summary = trainer.fit()
            teacher = p.distiller.teacher
            if isinstance(teacher, CachedTeacher):
                teacher.save()
            if p.ctx.is_main:
                write_run_report(p.run_dir, summary)
            return summary
        finally:
            # order matters with gloo: barrier and destroy the group first, then drop the DDP
            # wrapper and collect it, or the process can abort at interpreter exit
            shutdown_distributed(p.ctx)
            trainer.close()
            del trainer
            gc.collect()
    except KeyboardInterrupt:
        raise RunInterrupted(interrupted_message(p.run_dir)) from None


def interrupted_message(run_dir: Path) -> str:
    """What to tell the user after Ctrl-C: the last checkpoint and how to continue from it."""
    ckpt = run_dir / "checkpoints" / "last.pt"
    if ckpt.is_file():
        return f"interrupted; last checkpoint: {ckpt}; continue with `distillkit resume {run_dir}`"
    return f"interrupted before the first checkpoint of {run_dir} was written; nothing to resume"


def refuse_existing_run(cfg: RunConfig) -> None:
    """FileExistsError if the run directory already holds a checkpoint (resume continues it)."""
    ckpt = cfg.run_dir() / "checkpoints" / "last.pt"
    if ckpt.exists():
        raise FileExistsError(
            f"run directory {cfg.run_dir()} already holds a checkpoint; use `distillkit resume "
            f"{cfg.run_dir()}` to continue it or choose another name/out_dir"
        )


def run(
    cfg: RunConfig, history: list[str] | None = None, objects: RunObjects | None = None
) -> dict[str, Any]:
    """Train a fresh run from its config; refuses to overwrite a run directory that has checkpoints.

    `history` (e.g. the command line) is written as a comment at the top of config.yaml;
    `objects` holds a student, teacher or data a Python caller already has (distillkit.api).
    """
    check_config(cfg, objects)
    # the saved config must work from any folder: paths relative to here become absolute
    cfg = canonical_config(cfg)
    refuse_existing_run(cfg)
    return run_prepared(prepare(cfg, objects=objects), history)


def run_prepared(p: Prepared, history: list[str] | None = None) -> dict[str, Any]:
    """Write the files of a `prepare`d run (subset as the caller left it) and train it."""
    if p.ctx.is_main:
        p.run_dir.mkdir(parents=True, exist_ok=True)
        save_config(p.cfg, p.run_dir / "config.yaml", history)
        if p.train_indices is not None:
            np.save(p.run_dir / "subset_indices.npy", np.asarray(p.train_indices, dtype=np.int64))
        record_split(p)
    barrier(p.ctx)
    return _execute(p, None)


def resume(run_dir: str | Path, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Continue a run exactly where its last checkpoint left it (optionally with more epochs)."""
    run_dir = Path(run_dir)
    state = load_checkpoint(run_dir, which="last")
    data = {**state["config"], "out_dir": str(run_dir), **(overrides or {})}
    cfg = canonical_config(config_from_dict(data))
    trained = int(state["epoch"])
    if cfg.epochs < trained:
        # training would not run, yet config.yaml would claim fewer epochs than the weights saw
        raise ConfigError(
            f"run {run_dir} has already trained {trained} epochs; epochs={cfg.epochs} cannot "
            f"shorten it (give epochs={trained} or more)"
        )
    given = " ".join(format_overrides(overrides or {})) or "(no overrides)"
    history = read_config_history(run_dir / "config.yaml")
    history.append(f"resume {run_dir} at epoch {trained}: {given}")
    p = prepare(cfg, resume_state=state)
    # a black-box teacher's teacher_budget counts what the run already asked before resuming
    teacher = p.distiller.teacher
    teacher = teacher.teacher if isinstance(teacher, CachedTeacher) else teacher
    if cfg.teacher_budget is not None and isinstance(teacher, OpaqueBlackBoxTeacher):
        spent = int(state.get("teacher_queries", 0) or 0)
        teacher.budget = max(cfg.teacher_budget - spent, 0)
    if p.ctx.is_main:
        record_split(p)
        save_config(cfg, run_dir / "config.yaml", history)
    return _execute(p, state)


def evaluate_checkpoint(
    path: str | Path, data_dir: str | None = None, device: str = "auto", dataset: str | None = None
) -> dict[str, Any]:
    """Accuracy and loss of a saved model on its dataset's test split (or on `dataset`'s)."""
    try:
        model, state = model_from_checkpoint(path, which="best")
    except ValueError:
        meta = load_checkpoint(path, which="best").get("model_meta") or {}
        if problem := unreloadable_model(str(meta.get("name", ""))):
            raise ConfigError(problem) from None
        raise
    meta = state["model_meta"]
    config = state.get("config") or {}
    name = dataset or meta["dataset"]
    if name == IN_MEMORY:
        raise ConfigError(
            f"{path} was trained on data given as Python objects, which the run does not store; "
            "name the data to evaluate on with --dataset NAME (and --data-dir), e.g. "
            "--dataset npz --data-dir data.npz"
        )
    # the recorded data_dir and dataset_kwargs belong to the recorded dataset only
    kwargs = dict(config.get("dataset_kwargs") or {}) if dataset is None else {}
    where = data_dir or (config.get("data_dir") if dataset is None else None)
    dev = resolve_device(device)
    bundle = load_dataset(name, data_dir=where, image_size=meta["image_size"], **kwargs)
    result = evaluate(model.to(dev), bundle.test, bundle, dev)
    return {
        "checkpoint": str(resolve_checkpoint(path, which="best")),
        "model": meta["name"],
        "dataset": bundle.name,
        "epoch": state["epoch"],
        "test_acc": result["acc"],
        "test_loss": result["loss"],
        "test_images": len(bundle.test),
    }
