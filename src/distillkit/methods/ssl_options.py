"""Options of the self-supervised methods (`options:` of `method: dino` / `method: mokd`).

Model a is the run's `model` / `model_kwargs`; `options.a` is its optimisation recipe. MOKD's
second model and its recipe are `options.b` (`options.b.model`, `options.b.model_kwargs`, ...).
Heads, views, the DINO loss and the k-NN / linear-probe evaluation are shared by both models.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from distillkit.models import is_import_spec, list_models

Rule = tuple[Callable[[Any], bool], str]  # (test of a value, what the value must be)
_POSITIVE: Rule = (lambda v: v > 0, "must be > 0")
_NON_NEGATIVE: Rule = (lambda v: v >= 0, "must be >= 0")
_FRACTION: Rule = (lambda v: 0.0 <= v <= 1.0, "must be in [0, 1]")
_OPTIONAL_POSITIVE: Rule = (lambda v: v is None or v > 0, "must be > 0 or null")


def _check_rules(obj: Any, prefix: str, rules: list[tuple[str, Rule]]) -> None:
    """Raise ValueError for the first attribute of `obj` (in `rules` order) that fails its rule."""
    for attr, (ok, msg) in rules:
        value = getattr(obj, attr)
        if not ok(value):
            raise ValueError(f"config key '{prefix}.{attr}': {msg}, got {value!r}")


@dataclass
class ModelOptions:
    """One model of a self-supervised run and its optimisation recipe."""

    model: str | None = None  # options.b only: a zoo name or file.py:Name (a: the run's `model`)
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # options.b only
    optimizer: str = "sgd"  # sgd | adamw (paper: SGD for the CNN, AdamW for the ViT)
    lr: float = 0.03
    min_lr: float = 0.0
    momentum: float = 0.9
    weight_decay: float = 1e-4
    weight_decay_end: float | None = None  # cosine wd schedule end; None: constant
    warmup_epochs: float = 0.0
    grad_clip: float | None = 3.0
    freeze_last_layer: int = 0  # epochs during which the heads' last layers stay fixed
    ema_momentum: float = 0.996  # teacher momentum, cosine to 1.0
    cross_weight: float = 1.0  # MOKD lambda (paper: 1.0 for the CNN, 0.1 for the ViT)
    token_layer: str = "auto"  # tokens for the T-head: ViT final norm, else last hook layer
    norm_last_layer: bool = True
    # BatchNorm in this model's head and T-head hidden layers; None: options.head_bn
    head_bn: bool | None = None
    # DINO's linear scaling rule: `lr` and `min_lr` are per 256 images of the global batch
    scale_lr: bool = False

    def effective_lr(self, batch_size: int) -> tuple[float, float]:
        """(base lr, final lr) for a global batch, after the optional batch/256 scaling."""
        scale = batch_size / 256 if self.scale_lr else 1.0
        return self.lr * scale, self.min_lr * scale

    def validate(self, name: str) -> None:
        """Raise ValueError naming the first bad key of options.<name>."""
        key = f"options.{name}"
        rules: list[tuple[str, Rule]] = [
            ("optimizer", (lambda v: v in ("sgd", "adamw"), "choose from ('sgd', 'adamw')")),
            ("lr", _POSITIVE),
            ("min_lr", _NON_NEGATIVE),
            ("weight_decay", _NON_NEGATIVE),
            ("warmup_epochs", _NON_NEGATIVE),
            ("ema_momentum", _FRACTION),
            ("cross_weight", _NON_NEGATIVE),
            ("grad_clip", _OPTIONAL_POSITIVE),
            ("freeze_last_layer", _NON_NEGATIVE),
        ]
        _check_rules(self, key, rules)
        if name == "a":
            if self.model is not None or self.model_kwargs:
                raise ValueError(
                    "config key 'options.a.model': model a is the run's `model` (and "
                    "`model_kwargs`); set those instead"
                )
            return
        if self.model is None:
            raise ValueError(f"config key '{key}.model': name model {name} (e.g. vit_tiny)")
        if not is_import_spec(self.model) and self.model not in list_models():
            close = difflib.get_close_matches(self.model, list_models(), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ValueError(f"config key '{key}.model': unknown model {self.model!r}{hint}")


@dataclass
class DINOOptions:
    """Options of method dino: model a's recipe, heads, views, loss and evaluation."""

    a: ModelOptions = field(default_factory=ModelOptions)
    b: ModelOptions | None = None  # mokd only
    # heads
    out_dim: int = 4096
    head_hidden: int = 2048
    head_bottleneck: int = 256
    head_layers: int = 3
    head_bn: bool = False  # BatchNorm in the head's hidden layers (DINO's use_bn_in_head)
    thead: bool = False  # dino only: also self-distil a T-head (always on for mokd)
    thead_width: int = 384
    thead_depth: int = 3
    thead_heads: int = 6
    thead_mlp_ratio: float = 4.0
    # T-head output: 0 = bare weight-normed linear on the pooled token; >= 1 = a DINO projection
    # head of that many layers (head_hidden / head_bottleneck / head_bn, like the main head)
    thead_head_layers: int = 0
    # DINO loss
    student_temp: float = 0.1
    teacher_temp: float = 0.07
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: int = 30
    center_momentum: float = 0.9
    # multi-crop
    global_crops_scale: list[float] = field(default_factory=lambda: [0.25, 1.0])
    local_crops_scale: list[float] = field(default_factory=lambda: [0.05, 0.25])
    local_crops_number: int = 8
    global_size: int | None = None  # default: the dataset's image size
    local_size: int | None = None  # default: 3/7 of the global size (96/224 in DINO)
    jitter: float = 0.4
    blur: bool = True
    solarize: bool = True
    # evaluation of each EMA teacher's frozen features (when: the run's eval_every)
    eval_train_samples: int | None = None  # k-NN bank / probe training set: a fixed random subset
    eval_test_samples: int | None = None  # evaluate on a fixed random subset of the test split
    knn_k: int = 20
    knn_temperature: float = 0.07
    probe_steps: int = 100
    probe_l2: float = 1e-4

    def members(self) -> dict[str, ModelOptions]:
        """The recipes of the run's models by member name."""
        return {"a": self.a} if self.b is None else {"a": self.a, "b": self.b}

    def crop_sizes(self, image_size: int) -> tuple[int, int]:
        """(global, local) view sizes for images of side `image_size`."""
        g = self.global_size or image_size
        return g, self.local_size or max(2, round(g * 96 / 224))

    def validate(self) -> None:
        """Raise ValueError naming the first bad key."""
        if self.b is not None:
            raise ValueError(
                "config key 'options.b': method 'dino' trains one model (the run's `model`); "
                "use method=mokd for two"
            )
        self._validate_common()

    def _validate_common(self) -> None:
        for name, m in self.members().items():
            m.validate(name)
        positive = ("out_dim", "head_hidden", "head_bottleneck", "head_layers", "thead_width")
        positive += ("thead_depth", "thead_heads", "knn_k", "probe_steps", "student_temp")
        positive += ("teacher_temp", "warmup_teacher_temp", "knn_temperature")
        divisible = f"must be divisible by options.thead_heads={self.thead_heads}"
        scale: Rule = (
            lambda v: len(v) == 2 and 0 < v[0] <= v[1] <= 1,
            "must be [low, high] with 0 < low <= high <= 1",
        )
        optional = ("global_size", "local_size", "eval_train_samples", "eval_test_samples")
        # in order: thead_heads is known to be > 0 before thead_width is divided by it
        rules: list[tuple[str, Rule]] = [
            *((key, _POSITIVE) for key in positive),
            ("thead_head_layers", _NON_NEGATIVE),
            ("thead_width", (lambda v: v % self.thead_heads == 0, divisible)),
            ("center_momentum", _FRACTION),
            ("local_crops_number", _NON_NEGATIVE),
            ("warmup_teacher_temp_epochs", _NON_NEGATIVE),
            ("global_crops_scale", scale),
            ("local_crops_scale", scale),
            *((key, _OPTIONAL_POSITIVE) for key in optional),
        ]
        _check_rules(self, "options", rules)


@dataclass
class MOKDOptions(DINOOptions):
    """Options of method mokd: DINOOptions with model b (`options.b`) required."""

    def validate(self) -> None:
        """Raise ValueError naming the first bad key."""
        if self.b is None:
            raise ValueError(
                "config key 'options.b': method 'mokd' trains two models: set options.b.model "
                "(e.g. options.b.model=vit_tiny) and its recipe"
            )
        self._validate_common()
