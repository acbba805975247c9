"""Model zoo: small CNNs, CIFAR ResNets/WRNs/VGGs, MobileNetV2 and a tiny ViT.

Every zoo model returns logits only, has its final ``nn.Linear`` at the attribute
``classifier`` and lists its main intermediate stages in ``hook_layers``.
"""

from .hooks import FeatureHooks, feature_shapes, penultimate_features
from .zoo import build_model, count_parameters, list_models, register

__all__ = [
    "FeatureHooks",
    "build_model",
    "count_parameters",
    "feature_shapes",
    "list_models",
    "penultimate_features",
    "register",
]
