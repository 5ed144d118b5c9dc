"""Model zoo: CIFAR models of the CRD protocol, small CNNs, torchvision / timm adapters, taps."""

from relkd.models import cifar, small  # noqa: F401  (registration side effects)
from relkd.models.base import POOLED, FeatureInfo, FeatureTap, ModelOutput, get_feature_info
from relkd.models.checkpoint import load_checkpoint, save_student
from relkd.models.registry import MODELS, create_model, list_models, register_model

__all__ = [
    "MODELS",
    "POOLED",
    "FeatureInfo",
    "FeatureTap",
    "ModelOutput",
    "create_model",
    "get_feature_info",
    "list_models",
    "load_checkpoint",
    "register_model",
    "save_student",
]
