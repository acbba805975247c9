"""Model zoo: small CNNs, CIFAR ResNets/WRNs/VGGs, MobileNetV2 and a tiny ViT.

Every zoo model returns logits only, has its final ``nn.Linear`` at the attribute
``classifier`` and lists its main intermediate stages in ``hook_layers``. Models outside the
zoo are built from ``path/to/file.py:Name`` or ``package.module:Name`` (see ``external.py``).
"""

# The zoo models register themselves on import; importing them here fills the registry
# whenever any part of distillkit.models is used.
from . import cnn, mobilenet, resnet, vgg, vit, wrn  # noqa: F401
from .external import canonical_model_spec, is_import_spec
from .hooks import FeatureHooks, feature_shapes, penultimate_features
from .registry import build_model, list_models, register
from .zoo import count_parameters

__all__ = [
    "FeatureHooks",
    "build_model",
    "canonical_model_spec",
    "count_parameters",
    "feature_shapes",
    "is_import_spec",
    "list_models",
    "penultimate_features",
    "register",
]
