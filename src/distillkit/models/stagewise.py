"""Describe a model as an ordered list of blocks (stem + stages + head), pair teacher and student.

Running the blocks of ``split_model(model)`` (or of any grouping of them) one after the other
computes exactly ``model(x)``: each block is a thin ``nn.Module`` that calls the model's own
submodules, so training a block trains the model and no weights are copied.

- ``split_model(model)``: the finest blocks. Every zoo family is known (SimpleCNN, MLP, CIFAR
  ResNet, WRN, VGG, MobileNetV2, ViT); an ``nn.Sequential`` gives one block per child (nest
  Sequentials to choose the boundaries); any model may define ``stagewise_blocks()`` returning a
  list of ``Block``; other classes can be added with ``@register_splitter(cls)``.
- ``group_blocks(blocks, n)`` / ``split_blocks(model, n)``: ``n`` contiguous blocks. A stem is
  merged into the stage after it, the head stays alone (when ``n >= 2``) and the stages are
  divided as evenly as possible, earlier groups taking the extra block.
- ``pair_blocks(teacher, student, n, input_shape)``: both models grouped into ``n`` blocks, block
  ``i`` of the teacher paired with block ``i`` of the student, plus the feature shapes at the
  ``n - 1`` inner boundaries.
- ``make_connector(src_shape, dst_shape)``: ``nn.Identity`` for equal shapes, otherwise a 1x1
  conv + BN (with resizing of the spatial grid) for maps, a linear map for vectors or tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .cnn import MLP, SimpleCNN
from .mobilenet import MobileNetV2
from .resnet import CifarResNet
from .vgg import VGG
from .vit import VisionTransformer
from .wrn import WideResNet

ROLES = ("stem", "stage", "head")


@dataclass
class Block:
    """One block: ``module(h)`` maps the features at its input boundary to those at its output."""

    name: str
    module: nn.Module
    role: str = "stage"  # stem | stage | head

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"block role must be one of {ROLES}, got {self.role!r}")


Splitter = Callable[[nn.Module], list[Block]]
_SPLITTERS: dict[type, Splitter] = {}


def register_splitter(cls: type) -> Callable[[Splitter], Splitter]:
    """Decorator: ``@register_splitter(MyNet)`` on a function ``model -> list[Block]``."""

    def deco(fn: Splitter) -> Splitter:
        _SPLITTERS[cls] = fn
        return fn

    return deco


def _seq(*modules: nn.Module) -> nn.Module:
    return modules[0] if len(modules) == 1 else nn.Sequential(*modules)


def _stages(model: nn.Module, names: Sequence[str]) -> list[Block]:
    return [Block(name, getattr(model, name), "stage") for name in names]


@register_splitter(SimpleCNN)
def _split_simple_cnn(model: SimpleCNN) -> list[Block]:
    head = _seq(model.pool, nn.Flatten(1), model.dropout, model.classifier)
    return [*_stages(model, model.hook_layers), Block("head", head, "head")]


@register_splitter(MLP)
def _split_mlp(model: MLP) -> list[Block]:
    stages = _stages(model, model.hook_layers)
    # flattening has no weights: it opens the first stage instead of being a block of its own
    stages[0] = Block(stages[0].name, nn.Sequential(nn.Flatten(1), stages[0].module), "stage")
    return [*stages, Block("classifier", model.classifier, "head")]


@register_splitter(CifarResNet)
def _split_resnet(model: CifarResNet) -> list[Block]:
    stem = Block("stem", _seq(model.conv1, model.bn1, model.relu), "stem")
    head = Block("head", _seq(model.pool, nn.Flatten(1), model.classifier), "head")
    return [stem, *_stages(model, model.hook_layers), head]


@register_splitter(WideResNet)
def _split_wrn(model: WideResNet) -> list[Block]:
    head = _seq(model.bn, model.relu, model.pool, nn.Flatten(1), model.classifier)
    stem = Block("conv1", model.conv1, "stem")
    return [stem, *_stages(model, model.hook_layers), Block("head", head, "head")]


@register_splitter(VGG)
def _split_vgg(model: VGG) -> list[Block]:
    head = _seq(model.pool, nn.Flatten(1), model.classifier)
    return [*_stages(model, model.hook_layers), Block("head", head, "head")]


@register_splitter(MobileNetV2)
def _split_mobilenet(model: MobileNetV2) -> list[Block]:
    head = _seq(model.conv_last, model.pool, nn.Flatten(1), model.classifier)
    stem = Block("stem", model.stem, "stem")
    return [stem, *_stages(model, model.hook_layers), Block("head", head, "head")]


class _ViTEmbed(nn.Module):
    """Patch embedding, position embeddings and class token of a VisionTransformer."""

    def __init__(self, vit: VisionTransformer) -> None:
        super().__init__()
        self.patch_embed = vit.patch_embed
        self.cls_token = vit.cls_token
        self.cls_pos = vit.cls_pos
        self._vit = [vit]  # a list: not registered, so the ViT is not a child of this block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        vit = self._vit[0]
        p = vit.patch_size
        pad_h, pad_w = -x.shape[-2] % p, -x.shape[-1] % p
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        x = self.patch_embed(x)
        h, w = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2) + vit._pos_embed_for(h, w)
        cls = (self.cls_token + self.cls_pos).expand(x.shape[0], -1, -1)
        return torch.cat([cls, x], dim=1)


class _ViTHead(nn.Module):
    """Final norm, token pooling and classifier of a VisionTransformer."""

    def __init__(self, vit: VisionTransformer) -> None:
        super().__init__()
        self.norm = vit.norm
        self.classifier = vit.classifier
        self.pool = vit.pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        feat = x[:, 0] if self.pool == "cls" else x[:, 1:].mean(dim=1)
        return self.classifier(feat)


@register_splitter(VisionTransformer)
def _split_vit(model: VisionTransformer) -> list[Block]:
    stages = [Block(f"blocks.{i}", b, "stage") for i, b in enumerate(model.blocks)]
    return [
        Block("embed", _ViTEmbed(model), "stem"),
        *stages,
        Block("head", _ViTHead(model), "head"),
    ]


def split_model(model: nn.Module) -> list[Block]:
    """The finest ordered blocks of ``model``; running them in order gives ``model(x)``."""
    custom = getattr(model, "stagewise_blocks", None)
    if callable(custom):
        blocks = list(custom())
    elif type(model) in _SPLITTERS:
        blocks = _SPLITTERS[type(model)](model)
    elif isinstance(model, nn.Sequential):
        blocks = [Block(name, child, "stage") for name, child in model.named_children()]
    else:
        for cls, fn in _SPLITTERS.items():  # subclasses of a known family
            if isinstance(model, cls):
                blocks = fn(model)
                break
        else:
            raise ValueError(
                f"cannot split {type(model).__name__} into blocks: use a zoo model, an "
                "nn.Sequential, define stagewise_blocks() -> list[Block] on the model, or "
                "register a splitter with distillkit.models.stagewise.register_splitter"
            )
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no blocks")
    return blocks


def even_sizes(n_items: int, n_groups: int) -> list[int]:
    """`n_items` split into `n_groups` sizes that differ by at most one, the larger ones first."""
    base, extra = divmod(n_items, n_groups)
    return [base + (1 if i < extra else 0) for i in range(n_groups)]


def merge_blocks(blocks: Sequence[Block]) -> Block:
    """One block running ``blocks`` in order; named 'a+b+c'."""
    if len(blocks) == 1:
        return blocks[0]
    roles = {b.role for b in blocks}
    role = "head" if "head" in roles else "stage"
    return Block("+".join(b.name for b in blocks), nn.Sequential(*[b.module for b in blocks]), role)


def group_blocks(blocks: Sequence[Block], num_blocks: int) -> list[Block]:
    """Merge neighbouring blocks into ``num_blocks`` contiguous groups (see the module doc)."""
    blocks = list(blocks)
    if num_blocks < 1:
        raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
    if len(blocks) < num_blocks:
        names = ", ".join(b.name for b in blocks)
        raise ValueError(
            f"cannot split into {num_blocks} blocks: the model has only {len(blocks)} ({names})"
        )
    if num_blocks == 1:
        return [merge_blocks(blocks)]
    if len(blocks) == num_blocks:
        return blocks
    # a stem joins the block after it when enough blocks remain
    units: list[list[Block]] = []
    pending: list[Block] = []
    n_stems = sum(b.role == "stem" for b in blocks[:-1])
    merge_stems = len(blocks) - n_stems >= num_blocks
    for b in blocks:
        pending.append(b)
        if not (merge_stems and b.role == "stem" and b is not blocks[-1]):
            units.append(pending)
            pending = []
    head: list[list[Block]] = []
    if units[-1][-1].role == "head" and len(units) > num_blocks:
        head = [units.pop()]
        num_groups = num_blocks - 1
    else:
        num_groups = num_blocks
    groups, start = [], 0
    for size in even_sizes(len(units), num_groups):
        groups.append([b for unit in units[start : start + size] for b in unit])
        start += size
    return [merge_blocks(g) for g in groups + head]


def split_blocks(model: nn.Module, num_blocks: int | None = None) -> list[Block]:
    """``split_model(model)``, grouped into ``num_blocks`` blocks when given."""
    blocks = split_model(model)
    return blocks if num_blocks is None else group_blocks(blocks, num_blocks)


def run_blocks(
    blocks: Sequence[Block | nn.Module], x: torch.Tensor
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Run blocks in order: (final output, features at the inner boundaries).

    Boundary features are cloned, so a later block that works in place cannot change them.
    """
    feats: list[torch.Tensor] = []
    h = x
    for i, b in enumerate(blocks):
        module = b.module if isinstance(b, Block) else b
        h = module(h)
        if i < len(blocks) - 1:
            feats.append(h.clone())
    return h, feats


@torch.no_grad()
def boundary_shapes(
    blocks: Sequence[Block], input_shape: Sequence[int], model: nn.Module | None = None
) -> list[torch.Size]:
    """Shapes (batch 1) at the inner boundaries of ``blocks``, measured in eval mode."""
    params = [p for b in blocks for p in b.module.parameters()]
    device = params[0].device if params else torch.device("cpu")
    owners = [model] if model is not None else [b.module for b in blocks]
    modes = [(m, m.training) for owner in owners for m in owner.modules()]
    try:
        for owner in owners:
            owner.eval()
        _, feats = run_blocks(blocks, torch.zeros(1, *input_shape, device=device))
    finally:
        for m, mode in modes:
            m.training = mode
    return [f.shape for f in feats]


@dataclass
class BlockPairing:
    """Teacher and student split into the same number of blocks, paired by position."""

    teacher: list[Block]
    student: list[Block]
    teacher_shapes: list[torch.Size]  # at inner boundary k = 1..n-1 (index k-1)
    student_shapes: list[torch.Size]

    def __len__(self) -> int:
        return len(self.student)

    def describe(self) -> str:
        """One line per block pair, with the boundary shapes after it."""
        lines = []
        for i, (t, s) in enumerate(zip(self.teacher, self.student)):
            line = f"block {i}: teacher {t.name} | student {s.name}"
            if i < len(self) - 1:
                ts, ss = tuple(self.teacher_shapes[i][1:]), tuple(self.student_shapes[i][1:])
                line += f"  -> teacher {ts} student {ss}"
            lines.append(line)
        return "\n".join(lines)


def pair_blocks(
    teacher: nn.Module, student: nn.Module, num_blocks: int, input_shape: Sequence[int]
) -> BlockPairing:
    """Split both models into ``num_blocks`` blocks and measure the boundary feature shapes."""
    pairs = []
    for role, model in (("teacher", teacher), ("student", student)):
        try:
            pairs.append(split_blocks(model, num_blocks))
        except ValueError as exc:
            raise ValueError(f"{role} ({type(model).__name__}): {exc}") from None
    t_blocks, s_blocks = pairs
    t_shapes = boundary_shapes(t_blocks, input_shape, teacher)
    s_shapes = boundary_shapes(s_blocks, input_shape, student)
    for k, (ts, ss) in enumerate(zip(t_shapes, s_shapes), start=1):
        try:
            make_connector(ts, ss)
        except ValueError as exc:
            raise ValueError(
                f"boundary {k} (after teacher block '{t_blocks[k - 1].name}' and student block "
                f"'{s_blocks[k - 1].name}'): {exc}"
            ) from None
    return BlockPairing(t_blocks, s_blocks, t_shapes, s_shapes)


class Connector(nn.Module):
    """Maps features of shape ``src`` to shape ``dst`` (batch dimension ignored).

    Maps (N, C, H, W): 1x1 conv + BN, then average pooling (shrinking) or bilinear interpolation
    (growing) to the target grid. Vectors (N, D) and tokens (N, L, D, same L): a linear map.
    """

    def __init__(self, src: Sequence[int], dst: Sequence[int]) -> None:
        super().__init__()
        src, dst = tuple(src), tuple(dst)
        if len(src) != len(dst):
            raise ValueError(f"cannot connect features of shape {src[1:]} to {dst[1:]}")
        self.size: tuple[int, ...] | None = None
        if len(src) == 4:
            self.proj: nn.Module = nn.Sequential(
                nn.Conv2d(src[1], dst[1], kernel_size=1, bias=False), nn.BatchNorm2d(dst[1])
            )
            self.size = dst[2:]
        elif len(src) == 2 or (len(src) == 3 and src[1] == dst[1]):
            self.proj = nn.Linear(src[-1], dst[-1])
        else:
            raise ValueError(f"cannot connect features of shape {src[1:]} to {dst[1:]}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.proj(x)
        if self.size is not None and tuple(y.shape[-2:]) != self.size:
            if all(a >= b for a, b in zip(y.shape[-2:], self.size)):
                y = F.adaptive_avg_pool2d(y, self.size)
            else:
                y = F.interpolate(y, size=self.size, mode="bilinear", align_corners=False)
        return y


def make_connector(src: Sequence[int], dst: Sequence[int]) -> nn.Module:
    """``nn.Identity()`` when the shapes agree, else a ``Connector``."""
    if tuple(src[1:]) == tuple(dst[1:]):
        return nn.Identity()
    return Connector(src, dst)
