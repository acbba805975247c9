"""Networks of self-supervised runs: projection heads, the backbone adapter, student/teacher pairs.

`build_member` assembles one model's `SSLMember` (student network, EMA teacher, output centers)
from a zoo model and the run's options.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from distillkit.models.vit import TransformerBlock

if TYPE_CHECKING:
    from distillkit.methods.ssl_options import DINOOptions, ModelOptions

# --------------------------------------------------------------------------- heads


class WeightNormLinear(nn.Module):
    """Bias-free linear layer with weight = g * v / ||v|| (per output row).

    With `norm_last_layer` the scale g is fixed to 1 (not a parameter), as in DINO.
    """

    def __init__(self, in_dim: int, out_dim: int, norm_last_layer: bool = True) -> None:
        super().__init__()
        self.weight_v = nn.Parameter(torch.empty(out_dim, in_dim))
        nn.init.trunc_normal_(self.weight_v, std=0.02)
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1), requires_grad=not norm_last_layer)

    @property
    def weight(self) -> torch.Tensor:
        """The effective weight matrix."""
        return self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x @ weight.T."""
        return F.linear(x, self.weight)


class DINOHead(nn.Module):
    """MLP -> l2-normalised bottleneck -> weight-normalised linear layer to `out_dim`."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
        norm_last_layer: bool = True,
        use_bn: bool = False,
    ) -> None:
        super().__init__()
        if nlayers < 1:
            raise ValueError(f"head_layers must be >= 1, got {nlayers}")
        dims = [in_dim] + [hidden_dim] * (nlayers - 1)  # inputs of the nlayers linear layers
        layers: list[nn.Module] = []
        for d_in in dims[:-1]:
            # DINO's use_bn_in_head: Linear -> BatchNorm -> GELU in the hidden layers
            bn: list[nn.Module] = [nn.BatchNorm1d(hidden_dim)] if use_bn else []
            layers += [nn.Linear(d_in, hidden_dim), *bn, nn.GELU()]
        layers.append(nn.Linear(dims[-1], bottleneck_dim))
        # one layer: the bare Linear (state keys mlp.weight, mlp.bias)
        self.mlp: nn.Module = nn.Sequential(*layers) if nlayers > 1 else layers[0]
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Head output (B, out_dim)."""
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))


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


# --------------------------------------------------------------------------- backbone wrapper


class SSLBackbone(nn.Module):
    """A zoo model without its classifier, returning (embedding, tokens, token grid).

    The embedding is what fed the classifier (the penultimate features); tokens are the outputs
    of `token_layer` read with a forward hook: CNN feature-map positions (B, h*w, C) or ViT patch
    tokens (B, L, D, class token dropped). The model's forward is not changed.
    """

    def __init__(self, model: nn.Module, token_layer: str = "auto", probe_size: int = 32) -> None:
        super().__init__()
        if not hasattr(model, "classifier"):
            raise ValueError(f"{type(model).__name__} has no `classifier` module to remove")
        model.classifier = nn.Identity()
        self.model = model
        self.has_cls = hasattr(model, "cls_token")
        if token_layer == "auto":  # a ViT's final norm, else the model's last hook layer
            vit = self.has_cls and hasattr(model, "norm")
            layers = ["norm"] if vit else list(getattr(model, "hook_layers", []))
            if not layers:
                raise ValueError(f"{type(model).__name__} lists no hook_layers; set token_layer")
            token_layer = layers[-1]
        self.token_layer = token_layer
        self._captured: dict[str, torch.Tensor] = {}
        model.get_submodule(token_layer).register_forward_hook(self._hook)
        in_ch = _first_conv_in_channels(model)
        was = model.training
        model.eval()
        with torch.no_grad():
            emb, tokens, grid = self(torch.zeros(2, in_ch, probe_size, probe_size))
        model.train(was)
        self.embed_dim = int(emb.shape[-1])
        self.token_dim = int(tokens.shape[-1])
        self.probe_grid = grid

    def _hook(self, module: nn.Module, inputs: Any, output: Any) -> None:
        self._captured["tokens"] = output

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """(embedding (B, D), tokens (B, L, C), (grid_h, grid_w))."""
        emb = self.model(x)
        t = self._captured.pop("tokens")
        if t.dim() == 4:
            grid = (int(t.shape[2]), int(t.shape[3]))
            tokens = t.flatten(2).transpose(1, 2)
        elif t.dim() == 3:
            tokens = t[:, 1:] if self.has_cls else t
            side = int(round(math.sqrt(tokens.shape[1])))
            if side * side != tokens.shape[1]:
                raise ValueError(f"cannot lay out {tokens.shape[1]} tokens on a square grid")
            grid = (side, side)
        else:
            raise ValueError(f"token layer {self.token_layer!r} returned shape {tuple(t.shape)}")
        return emb, tokens, grid


def _first_conv_in_channels(model: nn.Module) -> int:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return m.in_channels
        if isinstance(m, nn.Linear):
            break
    raise ValueError(f"cannot infer input channels of {type(model).__name__}")


class SSLNetwork(nn.Module):
    """Backbone + DINO head (+ optional T-head): one student or one teacher."""

    def __init__(
        self, backbone: SSLBackbone, head: nn.Module, thead: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.thead = thead

    def forward(self, views: Sequence[torch.Tensor]) -> dict[str, list[Any]]:
        """Per-view outputs; consecutive views of one size go through the backbone together."""
        out: dict[str, list[Any]] = {k: [] for k in ("head", "pooled", "thead", "tokens", "grids")}
        for _, group in itertools.groupby(views, key=lambda v: v.shape[-2:]):
            same_size = list(group)
            n = len(same_size)
            emb, tokens, grid = self.backbone(torch.cat(same_size))
            out["head"] += list(self.head(emb).chunk(n))
            out["tokens"] += list(tokens.chunk(n))
            out["grids"] += [grid] * n
            if self.thead is not None:
                pooled, projected = self.thead(tokens, grid)
                out["pooled"] += list(pooled.chunk(n))
                out["thead"] += list(projected.chunk(n))
        return out


# --------------------------------------------------------------------------- student and EMA teacher


class SSLMember(nn.Module):
    """One model of an SSL run: its student, its EMA teacher and its output centers."""

    def __init__(self, student: SSLNetwork, out_dim: int, cross_weight: float = 0.0) -> None:
        super().__init__()
        self.student = student
        self.teacher = copy.deepcopy(student).requires_grad_(False)  # EMA-updated, no gradients
        self.cross_weight = cross_weight
        for name in ("center_head", "center_thead", "center_cross"):
            self.register_buffer(name, torch.zeros(1, out_dim))

    @torch.no_grad()
    def teacher_forward(self, views: Sequence[torch.Tensor]) -> dict[str, list[Any]]:
        """Teacher outputs for the global views, without autograd."""
        return self.teacher(views)


def build_member(
    options: DINOOptions,
    recipe: ModelOptions,
    model: nn.Module,
    global_size: int,
    with_thead: bool,
) -> SSLMember:
    """Student network (backbone of `model`, head, optional T-head) and its EMA teacher."""
    backbone = SSLBackbone(model, recipe.token_layer, probe_size=global_size)
    head_bn = options.head_bn if recipe.head_bn is None else recipe.head_bn
    head = DINOHead(
        backbone.embed_dim,
        options.out_dim,
        options.head_hidden,
        options.head_bottleneck,
        options.head_layers,
        recipe.norm_last_layer,
        head_bn,
    )
    thead = None
    if with_thead:
        thead = TransformerHead(
            backbone.token_dim,
            options.out_dim,
            options.thead_width,
            options.thead_depth,
            options.thead_heads,
            options.thead_mlp_ratio,
            backbone.probe_grid,
            recipe.norm_last_layer,
            options.thead_head_layers,
            options.head_hidden,
            options.head_bottleneck,
            head_bn,
        )
    return SSLMember(SSLNetwork(backbone, head, thead), options.out_dim, recipe.cross_weight)
