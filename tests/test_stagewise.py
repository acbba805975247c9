"""Block decomposition of models (models/stagewise.py): exact forward, grouping, pairing, connectors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from distillkit.models import build_model, list_models
from distillkit.models.stagewise import (
    Block,
    Connector,
    group_blocks,
    make_connector,
    pair_blocks,
    run_blocks,
    split_blocks,
    split_model,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one intra-op thread is much faster than two on a busy shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    return build_model(name, in_channels=1, num_classes=7, image_size=8).eval()


# the smallest member of every zoo family (the splitters are per class, not per size)
FAMILIES = ["mlp", "cnn_small", "resnet8", "wrn_16_1", "vgg8", "mobilenetv2", "vit_tiny"]


def test_every_zoo_model_splits():
    for name in list_models():
        assert split_model(build_model(name, in_channels=1, num_classes=7, image_size=8))


@pytest.mark.parametrize("name", FAMILIES)
def test_blocks_in_order_reproduce_the_forward_exactly(name):
    model = _model(name)
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        ref = model(x)
        fine = split_model(model)
        assert fine[-1].role == "head"
        for n in range(1, len(fine) + 1):
            blocks = group_blocks(fine, n)
            assert len(blocks) == n
            out, feats = run_blocks(blocks, x)
            assert len(feats) == n - 1
            assert torch.equal(out, ref), (name, n, [b.name for b in blocks])


def test_blocks_share_the_model_weights():
    model = _model("resnet8")
    model_params = {id(p) for p in model.parameters()}
    block_params = [id(p) for b in split_model(model) for p in b.module.parameters()]
    assert sorted(block_params) == sorted(model_params)  # each weight in exactly one block


def test_training_mode_forward_matches_too():
    model = _model("wrn_16_1").train()
    x = torch.randn(4, 1, 8, 8)
    torch.manual_seed(1)
    ref = model(x)
    torch.manual_seed(1)
    out, _ = run_blocks(split_blocks(model, 4), x)
    assert torch.equal(out, ref)


def test_grouping_rules():
    names = lambda blocks: [b.name for b in blocks]  # noqa: E731
    assert names(split_blocks(_model("resnet8"), 4)) == ["stem+layer1", "layer2", "layer3", "head"]
    assert names(split_blocks(_model("resnet8"), 3)) == ["stem+layer1+layer2", "layer3", "head"]
    assert names(split_blocks(_model("resnet8"), 5)) == [
        "stem",
        "layer1",
        "layer2",
        "layer3",
        "head",
    ]
    assert names(split_blocks(_model("cnn_small"), 4)) == ["layer1", "layer2", "layer3", "head"]
    assert names(split_blocks(_model("vgg8"), 4)) == [
        "layer1+layer2",
        "layer3+layer4",
        "layer5",
        "head",
    ]
    assert len(split_blocks(_model("cnn_small"), 1)) == 1
    with pytest.raises(ValueError, match="only 3"):
        split_blocks(_model("mlp"), 4)


def test_user_sequential_one_block_per_child():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU()),
        nn.Sequential(nn.Conv2d(4, 8, 3, stride=2, padding=1), nn.ReLU()),
        nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()),
        nn.Linear(8, 3),
    ).eval()
    blocks = split_model(model)
    assert [b.name for b in blocks] == ["0", "1", "2", "3"]
    x = torch.randn(2, 1, 8, 8)
    for n in (1, 2, 3, 4):
        out, _ = run_blocks(split_blocks(model, n), x)
        assert torch.equal(out, model(x))


def test_custom_blocks_hook_and_unknown_models():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.b(self.a(x))

    with pytest.raises(ValueError, match="cannot split Net"):
        split_model(Net())
    Net.stagewise_blocks = lambda self: [Block("a", self.a), Block("b", self.b, "head")]
    net = Net()
    x = torch.randn(2, 4)
    assert torch.equal(run_blocks(split_model(net), x)[0], net(x))


def test_pairing_shapes_and_connectors():
    teacher, student = _model("resnet8"), _model("cnn_medium")
    pairing = pair_blocks(teacher, student, 4, (1, 8, 8))
    assert len(pairing) == 4
    assert [tuple(s[1:]) for s in pairing.teacher_shapes] == [(16, 8, 8), (32, 4, 4), (64, 2, 2)]
    assert [tuple(s[1:]) for s in pairing.student_shapes] == [(32, 8, 8), (64, 4, 4), (128, 2, 2)]
    assert "teacher stem+layer1 | student layer1" in pairing.describe()
    same = pair_blocks(teacher, _model("cnn_small"), 4, (1, 8, 8))
    assert all(
        isinstance(make_connector(t, s), nn.Identity)
        for t, s in zip(same.teacher_shapes, same.student_shapes)
    )


def test_connector_shapes():
    conn = make_connector((1, 16, 8, 8), (1, 32, 4, 4))
    assert isinstance(conn, Connector)
    assert conn(torch.randn(2, 16, 8, 8)).shape == (2, 32, 4, 4)
    assert make_connector((1, 16, 2, 2), (1, 8, 4, 4))(torch.randn(2, 16, 2, 2)).shape == (
        2,
        8,
        4,
        4,
    )
    assert make_connector((1, 5), (1, 7))(torch.randn(3, 5)).shape == (3, 7)
    assert make_connector((1, 9, 5), (1, 9, 7))(torch.randn(3, 9, 5)).shape == (3, 9, 7)
    with pytest.raises(ValueError, match="cannot connect"):
        make_connector((1, 16, 8, 8), (1, 32))
