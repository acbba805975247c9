"""Tests for the model zoo, its conventions and the feature hooks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from distillkit.models import (
    FeatureHooks,
    build_model,
    count_parameters,
    feature_shapes,
    list_models,
    penultimate_features,
    register,
)

B = 2
# (in_channels, image_size): digits, Fashion-MNIST, CIFAR
SIZES = [(1, 8), (1, 28), (3, 32)]
EXPECTED_MODELS = {
    "mlp",
    "cnn_small",
    "cnn_medium",
    "cnn_large",
    "resnet8",
    "resnet14",
    "resnet20",
    "resnet32",
    "resnet56",
    "resnet110",
    "resnet8x4",
    "resnet32x4",
    "wrn_16_1",
    "wrn_16_2",
    "wrn_40_1",
    "wrn_40_2",
    "vgg8",
    "vgg11",
    "vgg13",
    "mobilenetv2",
    "vit_tiny",
}

_CACHE: dict[tuple[str, int, int], nn.Module] = {}


def _model(name: str, in_ch: int, size: int, num_classes: int = 7) -> nn.Module:
    """Build (once per session) an eval-mode model; reuse keeps the suite fast."""
    key = (name, in_ch, size)
    if key not in _CACHE:
        torch.manual_seed(0)
        _CACHE[key] = build_model(
            name, in_channels=in_ch, num_classes=num_classes, image_size=size
        ).eval()
    return _CACHE[key]


def _input(in_ch: int, size: int) -> torch.Tensor:
    return torch.randn(B, in_ch, size, size, generator=torch.Generator().manual_seed(1))


def test_registry_contains_all_models():
    assert EXPECTED_MODELS <= set(list_models())
    assert list_models() == sorted(list_models())


@pytest.mark.parametrize("in_ch,size", SIZES)
@pytest.mark.parametrize("name", sorted(EXPECTED_MODELS))
def test_forward_hooks_and_penultimate(name, in_ch, size):
    model = _model(name, in_ch, size)
    x = _input(in_ch, size)
    assert isinstance(model.classifier, nn.Linear)
    assert model.hook_layers, "hook_layers must not be empty"
    with torch.no_grad(), FeatureHooks(model, model.hook_layers) as hooks:
        logits = model(x)
        feats = penultimate_features(model, x)

    assert isinstance(logits, torch.Tensor)
    assert logits.shape == (B, 7)
    assert torch.isfinite(logits).all()

    assert list(hooks.features) == model.hook_layers  # recorded in forward order
    for layer in model.hook_layers:
        out = hooks.features[layer]
        assert isinstance(out, torch.Tensor)
        assert out.shape[0] == B
        assert torch.isfinite(out).all()
        if name == "vit_tiny":
            assert out.ndim == 3
        elif name != "mlp":
            assert out.ndim == 4 and min(out.shape[2:]) >= 1

    assert feats.shape == (B, model.classifier.in_features)
    # the pre-hook must see exactly what the classifier turns into the logits
    torch.testing.assert_close(model.classifier(feats), logits)


def test_hooks_removed_after_exit():
    model = _model("resnet8", 1, 8)
    x = _input(1, 8)
    with FeatureHooks(model, ["layer1"]) as hooks:
        model(x)
    assert "layer1" in hooks.features
    hooks.clear()
    model(x)
    assert hooks.features == {}


def test_hooks_keep_graph_unless_detached():
    model = _model("cnn_small", 1, 8)
    x = _input(1, 8)
    with FeatureHooks(model, ["layer2"]) as kept, FeatureHooks(model, ["layer2"], detach=True) as d:
        model(x)
    assert kept["layer2"].requires_grad
    assert not d["layer2"].requires_grad


def test_feature_shapes():
    model = _model("resnet8x4", 3, 32).train()
    try:
        shapes = feature_shapes(model, model.hook_layers, (3, 32, 32))
        assert model.training  # mode restored
    finally:
        model.eval()
    assert shapes == {
        "layer1": torch.Size([1, 64, 32, 32]),
        "layer2": torch.Size([1, 128, 16, 16]),
        "layer3": torch.Size([1, 256, 8, 8]),
    }
    vit = _model("vit_tiny", 1, 28)
    assert feature_shapes(vit, ["blocks.0"], (1, 28, 28))["blocks.0"] == (1, 1 + 7 * 7, 192)


def test_plain_user_module_works_with_hooks():
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.Sequential(nn.Conv2d(4, 5, 3, stride=2, padding=1), nn.ReLU()),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(5, 3),
    )
    x = torch.randn(B, 1, 8, 8)
    with FeatureHooks(model, ["0", "2.0"]) as hooks:
        model(x)
    assert hooks.features["0"].shape == (B, 4, 8, 8)
    assert hooks.features["2.0"].shape == (B, 5, 4, 4)
    assert penultimate_features(model, x, module_name="5").shape == (B, 5)
    assert feature_shapes(model, ["2"], (1, 8, 8)) == {"2": torch.Size([1, 5, 4, 4])}


def test_unknown_hook_name_lists_modules():
    model = _model("resnet8", 1, 8)
    with pytest.raises(ValueError, match="layer4") as err:
        FeatureHooks(model, ["layer4"])
    assert "layer1" in str(err.value) and "Did you mean" in str(err.value)
    with pytest.raises(ValueError, match="fc"):
        penultimate_features(model, _input(1, 8), module_name="fc")
    # a failed registration must not leave hooks behind
    assert not any(m._forward_hooks for m in model.modules())


def test_unknown_model_name():
    with pytest.raises(ValueError, match="resnet21") as err:
        build_model("resnet21")
    msg = str(err.value)
    assert "resnet20" in msg and "vit_tiny" in msg and "Did you mean" in msg


def test_register_custom_model_and_duplicate():
    @register("_test_tiny")
    def tiny(in_channels: int = 3, num_classes: int = 10, **kwargs) -> nn.Module:
        return nn.Linear(in_channels, num_classes)

    try:
        assert "_test_tiny" in list_models()
        assert build_model("_test_tiny", in_channels=4, num_classes=2).out_features == 2
        with pytest.raises(ValueError, match="already registered"):
            register("_test_tiny")(tiny)
    finally:
        from distillkit.models import registry

        registry._REGISTRY.pop("_test_tiny", None)


def test_mlp_wrong_image_size_is_clear():
    model = build_model("mlp", in_channels=1, image_size=8)
    with pytest.raises(ValueError, match="image_size"):
        model(torch.randn(B, 1, 28, 28))


def test_vit_mean_pool_and_odd_size():
    model = build_model("vit_tiny", in_channels=3, num_classes=5, depth=2, pool="mean").eval()
    with torch.no_grad():
        assert model(torch.randn(B, 3, 30, 30)).shape == (B, 5)  # padded to 32


@pytest.mark.parametrize(
    "name", ["mlp", "cnn_small", "resnet8", "wrn_16_1", "vgg8", "mobilenetv2", "vit_tiny"]
)
def test_backward_reaches_all_parameters(name):
    torch.manual_seed(0)
    model = build_model(name, in_channels=1, num_classes=3, image_size=8).train()
    x = torch.randn(B, 1, 8, 8)
    loss = nn.functional.cross_entropy(model(x), torch.tensor([0, 2]))
    loss.backward()
    for pname, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"no gradient for {pname}"
            assert torch.isfinite(p.grad).all(), pname
    assert any(p.grad.abs().sum() > 0 for p in model.parameters())


def _cifar_resnet_params(depth: int, filters: list[int], in_ch: int, classes: int) -> int:
    """Count parameters of a CIFAR ResNet by hand (3x3 convs, BN, 1x1 projections)."""
    n = (depth - 2) // 6
    total = 9 * in_ch * filters[0] + 2 * filters[0]
    prev = filters[0]
    for stage, width in enumerate(filters[1:]):
        for block in range(n):
            c_in = prev if block == 0 else width
            total += 9 * c_in * width + 9 * width * width + 4 * width
            if block == 0 and (stage > 0 or c_in != width):
                total += c_in * width + 2 * width
        prev = width
    return total + (filters[-1] + 1) * classes


@pytest.mark.parametrize(
    "name,depth,filters",
    [("resnet20", 20, [16, 16, 32, 64]), ("resnet8x4", 8, [32, 64, 128, 256])],
)
def test_resnet_parameter_count_exact(name, depth, filters):
    model = build_model(name, num_classes=100)
    assert count_parameters(model) == _cifar_resnet_params(depth, filters, 3, 100)


@pytest.mark.parametrize(
    "name,millions",
    # CIFAR-100 sizes reported for the RepDistiller/CRD model zoo
    [("resnet8x4", 1.23), ("resnet32x4", 7.43), ("wrn_40_2", 2.25), ("resnet20", 0.28)],
)
def test_parameter_counts_match_reference(name, millions):
    n = count_parameters(build_model(name, num_classes=100))
    assert abs(n / 1e6 - millions) / millions < 0.1


def test_count_parameters_trainable_only():
    model = build_model("cnn_small", in_channels=1)
    total = count_parameters(model)
    model.classifier.requires_grad_(False)
    frozen = model.classifier.weight.numel() + model.classifier.bias.numel()
    assert count_parameters(model, trainable_only=True) == total - frozen
