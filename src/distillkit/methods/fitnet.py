"""FitNets (Romero et al., 2015): regress a teacher feature map from a student's via an adapter."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from distillkit.methods.base import Batch, Distiller
from distillkit.methods.registry import register_method
from distillkit.models.hooks import FeatureHooks, feature_shapes


@dataclass
class FitNetOptions:
    """Options of method fitnet (config key `options:`)."""

    hint_layer: str | None = None  # student layer; None: the middle entry of its hook_layers
    teacher_hint_layer: str | None = None  # teacher layer; None: likewise
    hint_weight: float = 100.0

    def validate(self) -> None:
        """The hint weight must be >= 0."""
        if not self.hint_weight >= 0:
            raise ValueError(
                f"config key 'options.hint_weight': must be >= 0, got {self.hint_weight!r}"
            )


class FitNet(Distiller):
    """loss = CE(s(x), y) + w * MSE(adapter(s_feat), t_feat), features read with forward hooks.

    The adapter is a 1x1 conv (+BN) for 4-D maps or a linear map for token/vector features; when
    spatial sizes differ the student map is resized to the teacher's by bilinear interpolation.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        student_layer: str,
        teacher_layer: str,
        input_shape: tuple[int, ...],
        hint_weight: float = 100.0,
    ):
        super().__init__(student, teacher)
        self.student_layer = student_layer
        self.teacher_layer = teacher_layer
        self.hint_weight = hint_weight
        s_shape = feature_shapes(student, [student_layer], input_shape)[student_layer]
        t_model = teacher.model
        t_shape = feature_shapes(t_model, [teacher_layer], input_shape)[teacher_layer]
        if len(s_shape) != len(t_shape):
            raise ValueError(
                f"fitnet: student layer '{student_layer}' gives {tuple(s_shape)} and teacher layer "
                f"'{teacher_layer}' gives {tuple(t_shape)}; choose layers of the same rank"
            )
        if len(s_shape) == 4:
            self.adapter = nn.Sequential(
                nn.Conv2d(s_shape[1], t_shape[1], kernel_size=1, bias=False),
                nn.BatchNorm2d(t_shape[1]),
            )
        else:
            self.adapter = nn.Linear(s_shape[-1], t_shape[-1])
        self._s_hooks = FeatureHooks(student, [student_layer])
        self._t_hooks = FeatureHooks(t_model, [teacher_layer])

    def training_step(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """CE on labels plus the hint regression."""
        x, y, _ = batch
        with torch.no_grad():
            self.teacher(x)
        t_feat = self._t_hooks.features[self.teacher_layer]
        logits = self.student(x)
        s_feat = self.adapter(self._s_hooks.features[self.student_layer])
        if s_feat.dim() == 4 and s_feat.shape[-2:] != t_feat.shape[-2:]:
            s_feat = F.interpolate(
                s_feat, size=t_feat.shape[-2:], mode="bilinear", align_corners=False
            )
        ce = F.cross_entropy(logits, y)
        hint = self.hint_weight * F.mse_loss(s_feat.float(), t_feat.float())
        return logits, {"ce": ce, "hint": hint}


@register_method(
    "fitnet", options=FitNetOptions, description="FitNets hint regression on hooked features + CE"
)
def build(cfg, options: FitNetOptions, student, teacher, bundle) -> FitNet:
    """Registry builder; layers default to the middle entry of each model's hook_layers."""
    shape = (bundle.in_channels, bundle.image_size, bundle.image_size)
    s_layers = getattr(student, "hook_layers", [])
    t_layers = getattr(teacher.model, "hook_layers", [])
    s_layer = options.hint_layer or (s_layers[len(s_layers) // 2] if s_layers else None)
    t_layer = options.teacher_hint_layer or (t_layers[len(t_layers) // 2] if t_layers else None)
    if s_layer is None or t_layer is None:
        raise ValueError(
            "fitnet needs options.hint_layer and options.teacher_hint_layer for models without "
            "hook_layers"
        )
    return FitNet(student, teacher, s_layer, t_layer, shape, options.hint_weight)
