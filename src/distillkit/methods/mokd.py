"""MOKD: multi-mode online knowledge distillation (Song et al., CVPR 2023).

Two different models (say a CNN and a ViT) train together without labels. Each runs DINO
self-distillation on a projection head and on a T-head (a few transformer blocks over its own
tokens). They exchange knowledge by cross-distillation:

    loss_A = DINO(s_A head, t_A head) + DINO(s_A T-head, t_A T-head)
             + lambda_A * [ DINO(s_A head, t_B head; own center)
                            + CE(s_A T-head on local crops, search target of t_B) ]

The search target (cross-attention feature search): the student's local-crop query vector
(T-head pooled embedding, detached) is prepended to teacher B's global-view-1 tokens, passed
through B's teacher T-head blocks; the query's output is dropped, the rest mean-pooled and
projected. Teachers are EMA copies and never receive gradients.

`method: mokd`: model a is the run's `model` (recipe `options.a`), model b is `options.b.model`
with its own recipe; both run on the one Trainer like DINO (`methods/dino.py`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from distillkit.data.datasets import DataBundle
from distillkit.methods.dino import DINO, Rows, build_dino_like, dino_loss, soft_cross_entropy
from distillkit.methods.registry import register_method
from distillkit.methods.ssl_heads import SSLMember
from distillkit.methods.ssl_options import MOKDOptions


class MOKD(DINO):
    """DINO for two models plus the cross-distillation of MOKD (head DINO + feature search)."""

    def __init__(
        self,
        members: dict[str, SSLMember],
        options: MOKDOptions | None = None,
        *,
        deploy: nn.Module | None = None,
        num_classes: int = 10,
    ) -> None:
        if len(members) != 2:
            raise ValueError(f"MOKD trains exactly two models, got {len(members)}")
        for name, m in members.items():
            if m.student.thead is None:
                raise ValueError(f"MOKD member {name!r} needs a T-head")
        super().__init__(members, options, deploy=deploy, num_classes=num_classes)

    @torch.no_grad()
    def search_targets(
        self, queries: Sequence[torch.Tensor], other: SSLMember, other_t: dict
    ) -> list[torch.Tensor]:
        """One search target per local-crop query, from the other teacher's global view 1."""
        tokens, grid = other_t["tokens"][0], other_t["grids"][0]
        # all local crops in one pass: the teacher tokens repeat once per query
        q = torch.cat([x.detach() for x in queries])
        rep = tokens.repeat(len(queries), 1, 1)
        return list(other.teacher.thead.search(q, rep, grid).chunk(len(queries)))

    def compute_losses(
        self, views: Sequence[torch.Tensor], teacher_temp: float, rows: Rows | None = None
    ) -> dict[str, dict[str, torch.Tensor]]:
        """Self terms plus lambda-weighted cross terms for both models."""
        outputs = self.forward_all(views)
        names = list(self.members)
        pairs = list(zip(names, names[::-1]))  # (a, b), (b, a)
        losses: dict[str, dict[str, torch.Tensor]] = {}
        for name, other_name in pairs:
            m, other = self.members[name], self.members[other_name]
            s, t = outputs[name]
            other_t = outputs[other_name][1]
            terms = self.self_losses(m, s, t, teacher_temp)
            terms["cross"] = m.cross_weight * dino_loss(
                s["head"], other_t["head"], m.center_cross, self.student_temp, teacher_temp
            )
            if len(views) > 2:  # local crops: views 2.. search the other teacher's tokens
                targets = self.search_targets(s["pooled"][2:], other, other_t)
                search = sum(
                    soft_cross_entropy(out, tgt, self.student_temp, teacher_temp)
                    for out, tgt in zip(s["thead"][2:], targets)
                ) / len(targets)
                terms["search"] = m.cross_weight * search
            losses[name] = terms
        self.update_centers(outputs, rows)
        for name, other_name in pairs:
            other_head = outputs[other_name][1]["head"]
            self._set_center(self.members[name], "center_cross", other_head, rows)
        return losses


@register_method(
    "mokd",
    options=MOKDOptions,
    needs_teacher=False,
    description="self-supervised MOKD: `model` and options.b.model distil each other (DINO + T-heads)",
)
def build(cfg: Any, options: MOKDOptions, student: nn.Module, teacher: Any, bundle: DataBundle):
    """Registry builder: model a is the run's `model`, model b options.b.model; both T-headed."""
    return build_dino_like(MOKD, cfg, options, student, bundle, with_thead=True)
