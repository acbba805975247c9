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
from distillkit.engine.trainer import Trainer, resolve_device, seed_everything
from distillkit.errors import ConfigError
from distillkit.methods import Distiller, get_method
from distillkit.models import (
    build_model,
    canonical_model_spec,
    is_import_spec,
    list_models,
    penultimate_features,
)
from distillkit.teachers import CachedTeacher, LocalTeacher


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
    check = getattr(opts, "validate", None)
    if check is not None:
        try:
            check()
        except ConfigError:
            raise
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    return opts


def check_config(cfg: RunConfig) -> Any:
    """Check what config.py cannot: model, dataset and method names, the method's options, and
    whether the method can use the teacher settings. Returns the typed options."""
    if not is_import_spec(cfg.model) and cfg.model not in list_models():
        close = difflib.get_close_matches(cfg.model, list_models(), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(
            f"config key 'model': unknown model {cfg.model!r}{hint}; see `distillkit models`, or "
            "give path/to/file.py:Name or package.module:Name"
        )
    # a name with ':' is a dataset factory (path/to/file.py:factory or package.module:factory)
    if ":" not in cfg.dataset and cfg.dataset not in list_datasets():
        raise ConfigError(
            f"config key 'dataset': unknown dataset {cfg.dataset!r}; choose from "
            f"{', '.join(list_datasets())}, or give path/to/file.py:factory"
        )
    options = resolve_options(cfg)
    spec = get_method(cfg.method)
    if spec.needs_teacher and not cfg.teacher:
        raise ConfigError(
            f"method '{cfg.method}' needs a teacher: set teacher=RUN_DIR_OR_CHECKPOINT"
        )
    if cfg.teacher_cache:
        if not spec.teacher_cache:
            raise ConfigError(
                f"config key 'teacher_cache': method '{cfg.method}' cannot use cached teacher "
                "outputs; set teacher_cache=false"
            )
        if cfg.augment:
            raise ConfigError(
                "teacher_cache needs augment=false: cached outputs are keyed by sample"
            )
    return options


def canonical_config(cfg: RunConfig, base: str | Path | None = None) -> RunConfig:
    """A copy of cfg that works from any folder: teacher, data_dir and the import paths of model
    and dataset made absolute (relative to `base`, default the cwd)."""
    where = Path(base) if base is not None else Path.cwd()
    cfg = with_absolute_paths(cfg, where)
    return dataclasses.replace(
        cfg,
        model=canonical_model_spec(cfg.model, where),
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
    differs = (
        meta.get("dataset") != bundle.name
        or meta.get("image_size") != bundle.image_size
        or (classes is not None and list(classes) != list(bundle.classes))
    )
    if differs and cfg.teacher_dataset_check:
        raise ConfigError(f"{where}; set teacher_dataset_check=false to use it anyway")


def load_teacher(cfg: RunConfig, bundle: DataBundle) -> LocalTeacher:
    """The teacher model of a finished run, checked against the dataset it will see."""
    model, state = model_from_checkpoint(cfg.teacher, which="best")
    check_teacher_data(cfg, state["model_meta"], bundle)
    return LocalTeacher(model)


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
        if is_import_spec(cfg.model):
            # the model's own one-line reason (file missing, argument not taken, ...)
            key = "model_kwargs" if cfg.model_kwargs else "model"
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConfigError(f"config key '{key}': {first}") from None
        if not cfg.model_kwargs:
            raise
        unknown = re.search(r"unexpected keyword argument '(\w+)'", str(exc))
        if unknown:
            raise ConfigError(
                f"config key 'model_kwargs.{unknown.group(1)}': model '{cfg.model}' has no "
                f"argument '{unknown.group(1)}'"
            ) from None
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"config key 'model_kwargs': model '{cfg.model}' rejected {cfg.model_kwargs}: {first}"
        ) from None


def build_distiller(
    cfg: RunConfig, student: nn.Module, teacher: nn.Module | None, bundle: DataBundle
) -> Distiller:
    """The method object named by cfg.method, built by its registered builder."""
    spec = get_method(cfg.method)
    options = resolve_options(cfg)
    return spec.build(cfg, options, student, teacher, bundle)


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
        model = teacher.model
        for start in range(0, len(bundle.train), 512):
            x = bundle.train.images[start : start + 512].to(device)
            x = normalize(to_float(x), bundle.mean, bundle.std)
            with torch.no_grad():
                feats.append(penultimate_features(model, x).float().cpu())
        features = torch.cat(feats).numpy().astype(np.float64)
    else:
        features = (
            bundle.train.images.reshape(len(bundle.train), -1).numpy().astype(np.float64) / 255.0
        )
    method = "random" if sub.method == "full" else sub.method
    return select_fraction(
        features, sub.fraction, labels=labels, method=method, per_class=sub.per_class, seed=cfg.seed
    )


def prepare(cfg: RunConfig, resume_state: dict[str, Any] | None = None) -> Prepared:
    """Build everything for a run; with resume_state, reuse its subset instead of re-selecting."""
    check_config(cfg)
    probe_ctx_rank = DistContext()
    device = resolve_device(cfg.device, probe_ctx_rank.local_rank)
    ctx = init_distributed(device)
    if ctx.enabled and cfg.device == "auto" and device.type == "cuda":
        device = torch.device("cuda", ctx.local_rank % torch.cuda.device_count())
    if device.type == "cuda":
        torch.cuda.set_device(device)
    seed_everything(cfg.seed, cfg.deterministic)
    bundle = load_dataset(cfg.dataset, data_dir=cfg.data_dir, image_size=cfg.image_size)
    run_dir = cfg.run_dir()
    teacher = load_teacher(cfg, bundle).to(device) if cfg.teacher else None
    # the student is built after seeding so every rank (and every rerun) starts from the same weights
    torch.manual_seed(cfg.seed)
    student = build_student(cfg, bundle)
    if teacher is not None and cfg.teacher_cache:  # check_config: the method can use it
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


def _write_run_files(p: Prepared, history: list[str] | None) -> None:
    p.run_dir.mkdir(parents=True, exist_ok=True)
    save_config(p.cfg, p.run_dir / "config.yaml", history)
    if p.train_indices is not None:
        np.save(p.run_dir / "subset_indices.npy", np.asarray(p.train_indices, dtype=np.int64))


def _execute(p: Prepared, resume_state: dict[str, Any] | None) -> dict[str, Any]:
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
        return summary
    finally:
        # order matters with gloo: barrier and destroy the group first, then drop the DDP wrapper
        # and collect it, or the process can abort at interpreter exit
        shutdown_distributed(p.ctx)
        trainer.close()
        del trainer
        gc.collect()


def interrupted_message(run_dir: Path) -> str:
    """What to tell the user after Ctrl-C: the last checkpoint and how to continue from it."""
    ckpt = run_dir / "checkpoints" / "last.pt"
    if ckpt.is_file():
        return f"interrupted; last checkpoint: {ckpt}; continue with `distillkit resume {run_dir}`"
    return f"interrupted before the first checkpoint of {run_dir} was written; nothing to resume"


def _execute_interruptible(p: Prepared, resume_state: dict[str, Any] | None) -> dict[str, Any]:
    try:
        return _execute(p, resume_state)
    except KeyboardInterrupt:
        raise RunInterrupted(interrupted_message(p.run_dir)) from None


def run(cfg: RunConfig, history: list[str] | None = None) -> dict[str, Any]:
    """Train a fresh run from its config; refuses to overwrite a run directory that has checkpoints.

    `history` (e.g. the command line) is written as a comment at the top of config.yaml.
    """
    check_config(cfg)
    # the saved config must work from any folder: paths relative to here become absolute
    cfg = canonical_config(cfg)
    ckpt = cfg.run_dir() / "checkpoints" / "last.pt"
    if ckpt.exists():
        raise FileExistsError(
            f"run directory {cfg.run_dir()} already holds a checkpoint; use `distillkit resume "
            f"{cfg.run_dir()}` to continue it or choose another name/out_dir"
        )
    p = prepare(cfg)
    if p.ctx.is_main:
        _write_run_files(p, history)
    barrier(p.ctx)
    return _execute_interruptible(p, None)


def resume(run_dir: str | Path, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Continue a run exactly where its last checkpoint left it (optionally with more epochs)."""
    run_dir = Path(run_dir)
    state = load_checkpoint(resolve_checkpoint(run_dir, which="last"))
    data = dict(state["config"])
    data["out_dir"] = str(run_dir)
    data.update(overrides or {})
    cfg = canonical_config(config_from_dict(data))
    check_config(cfg)
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
    if p.ctx.is_main:
        save_config(cfg, run_dir / "config.yaml", history)
    return _execute_interruptible(p, state)


def evaluate_checkpoint(
    path: str | Path, data_dir: str | None = None, device: str = "auto"
) -> dict[str, Any]:
    """Accuracy and loss of a saved model on its dataset's test split."""
    from distillkit.engine.trainer import evaluate

    model, state = model_from_checkpoint(path, which="best")
    meta = state["model_meta"]
    dev = resolve_device(device)
    cfg_data_dir = data_dir or state["config"].get("data_dir")
    bundle = load_dataset(meta["dataset"], data_dir=cfg_data_dir, image_size=meta["image_size"])
    result = evaluate(model.to(dev), bundle.test, bundle, dev)
    return {
        "checkpoint": str(resolve_checkpoint(path, which="best")),
        "model": meta["name"],
        "dataset": meta["dataset"],
        "epoch": state["epoch"],
        "test_acc": result["acc"],
        "test_loss": result["loss"],
    }


def format_json(obj: dict[str, Any]) -> str:
    """Pretty JSON for the console."""
    return json.dumps(obj, indent=2, default=str)
