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
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from distillkit.methods.ssl import (
    DINO,
    DINOHead,
    SSLMember,
    WeightNormLinear,
    dino_loss,
    soft_cross_entropy,
)
from distillkit.models.vit import TransformerBlock


class TransformerHead(nn.Module):
    """T-head: tokens -> width projection + position embedding -> blocks -> mean pool -> output.

    The output is the paper's weight-normed linear layer on the l2-normalised pooled token
    (`head_layers=0`), or a DINO projection head (`head_layers >= 1`: MLP, optional BatchNorm,
    l2-normalised bottleneck, weight-normed linear) like the main head. The DINO head keeps the
    T-head's centered self-distillation from collapsing to uniform when the pooled tokens of all
    images share a big common component (small images, few tokens).

    CNN feature-map positions and ViT patch tokens are both projected (a 1x1 conv is a linear map
    over channels) to one common width, so one model's query can search the other's tokens.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        width: int = 384,
        depth: int = 3,
        heads: int = 6,
        mlp_ratio: float = 4.0,
        grid: tuple[int, int] = (7, 7),
        norm_last_layer: bool = True,
        head_layers: int = 0,
        head_hidden: int = 2048,
        head_bottleneck: int = 256,
        head_bn: bool = False,
    ) -> None:
        super().__init__()
        if head_layers < 0:
            raise ValueError(f"thead_head_layers must be >= 0, got {head_layers}")
        self.width = width
        self.grid = tuple(grid)
        self.proj = nn.Linear(in_dim, width)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid[0] * self.grid[1], width))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.blocks = nn.Sequential(
            *[TransformerBlock(width, heads, mlp_ratio) for _ in range(depth)]
        )
        self.norm = nn.LayerNorm(width)
        # head_layers 0: the bare weight-normed linear output on the l2-normalised pooled token;
        # >= 1: a DINO projection head (MLP [+ BN] -> l2-normalised bottleneck -> WN linear)
        self.head: nn.Module | None = None
        if head_layers == 0:
            self.last_layer = WeightNormLinear(width, out_dim, norm_last_layer)
        else:
            self.head = DINOHead(
                width, out_dim, head_hidden, head_bottleneck, head_layers, norm_last_layer, head_bn
            )

    def _pos(self, grid: tuple[int, int]) -> torch.Tensor:
        if tuple(grid) == self.grid:
            return self.pos_embed
        # local crops give smaller token grids: resize the learned table like a ViT does
        g = self.pos_embed.reshape(1, self.grid[0], self.grid[1], self.width).permute(0, 3, 1, 2)
        g = F.interpolate(g, size=tuple(grid), mode="bicubic", align_corners=False)
        return g.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], self.width)

    def embed(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """(B, L, in_dim) backbone tokens -> (B, L, width) T-head input."""
        return self.proj(tokens) + self._pos(grid)

    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        """Pooled (B, width) -> output (B, out_dim)."""
        if self.head is not None:
            return self.head(pooled)
        return self.last_layer(F.normalize(pooled, dim=-1))

    def forward(
        self, tokens: torch.Tensor, grid: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(pooled embedding (B, width), projected output (B, out_dim))."""
        x = self.norm(self.blocks(self.embed(tokens, grid)))
        pooled = x.mean(dim=1)
        return pooled, self.project(pooled)

    def search(
        self, query: torch.Tensor, tokens: torch.Tensor, grid: tuple[int, int]
    ) -> torch.Tensor:
        """Cross-attention feature search: the target (B, out_dim) for query (B, width).

        The query gets no position embedding; its own output is dropped before pooling, so it
        acts only through attention on the tokens.
        """
        x = torch.cat([query[:, None, :], self.embed(tokens, grid)], dim=1)
        x = self.norm(self.blocks(x))
        return self.project(x[:, 1:].mean(dim=1))


class MOKD(DINO):
    """DINO for two models plus the cross-distillation of MOKD (head DINO + feature search)."""

    def __init__(
        self,
        members: dict[str, SSLMember],
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
    ) -> None:
        if len(members) != 2:
            raise ValueError(f"MOKD trains exactly two models, got {len(members)}")
        for name, m in members.items():
            if m.student.thead is None:
                raise ValueError(f"MOKD member {name!r} needs a T-head")
        super().__init__(members, student_temp, center_momentum, use_thead=True)

    def search_targets(
        self, queries: Sequence[torch.Tensor], other: SSLMember, other_t: dict
    ) -> list[torch.Tensor]:
        """One search target per local-crop query, from the other teacher's global view 1."""
        tokens, grid = other_t["tokens"][0], other_t["grids"][0]
        thead = other.teacher.thead
        with torch.no_grad():
            # all local crops in one pass: the teacher tokens repeat once per query
            q = torch.cat([x.detach() for x in queries])
            rep = tokens.repeat(len(queries), 1, 1)
            return list(thead.search(q, rep, grid).chunk(len(queries)))

    def compute_losses(
        self, views: Sequence[torch.Tensor], teacher_temp: float
    ) -> dict[str, dict[str, torch.Tensor]]:
        """Self terms plus lambda-weighted cross terms for both models."""
        outputs = self.forward_all(views)
        names = self.names()
        losses: dict[str, dict[str, torch.Tensor]] = {}
        for name in names:
            other_name = names[1 - names.index(name)]
            m, other = self.members[name], self.members[other_name]
            s, t = outputs[name]
            other_t = outputs[other_name][1]
            terms = self.self_losses(m, s, t, teacher_temp)
            cross = dino_loss(
                s["head"], other_t["head"], m.center_cross, self.student_temp, teacher_temp
            )
            terms["cross"] = m.cross_weight * cross
            local = list(range(2, len(views)))
            if local:
                targets = self.search_targets([s["pooled"][i] for i in local], other, other_t)
                search = sum(
                    soft_cross_entropy(s["thead"][i], tgt, self.student_temp, teacher_temp)
                    for i, tgt in zip(local, targets)
                ) / len(local)
                terms["search"] = m.cross_weight * search
            losses[name] = terms
        self.update_centers(outputs)
        for name in names:
            other_name = names[1 - names.index(name)]
            self._set_center(self.members[name], "center_cross", outputs[other_name][1]["head"])
        return losses
