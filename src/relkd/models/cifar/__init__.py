"""The CIFAR model zoo of the CRD / RepDistiller protocol (Tian et al., arXiv 1910.10699).

Importing this package registers: resnet8 .. resnet110, resnet8x4, resnet32x4 (``resnet``),
ResNet18 / ResNet34 / ResNet50 (``resnetv2``), wrn_16_1 .. wrn_40_2 (``wrn``), vgg8 .. vgg19
with BN (``vgg``), MobileNetV2 alias mobile_half (``mobilenetv2``), ShuffleV1 and ShuffleV2.
Parameter names match the community's released teacher checkpoints.
"""

from relkd.models.cifar import (  # noqa: F401  (registration side effects)
    mobilenetv2,
    resnet,
    resnetv2,
    shufflenetv1,
    shufflenetv2,
    vgg,
    wrn,
)
