"""keras-preact: pre-activation ResNets (He et al., ECCV 2016) for Keras 3.

>>> from keras_preact import PreActResNet200, PreActResNet164, PreActResNet20
>>> model = PreActResNet20(input_shape=(28, 28, 1), classes=10)
"""

from keras_preact import layers, scan, shortcuts, units, weights
from keras_preact.context import BuildContext
from keras_preact.imagenet_utils import decode_predictions, preprocess_input
from keras_preact.layout import LAYOUTS, Layout
from keras_preact.preact_resnet import (
    MODELS,
    PreActResNet,
    PreActResNet18,
    PreActResNet20,
    PreActResNet32,
    PreActResNet34,
    PreActResNet44,
    PreActResNet50,
    PreActResNet56,
    PreActResNet101,
    PreActResNet110,
    PreActResNet152,
    PreActResNet164,
    PreActResNet200,
    PreActResNet1001,
    PreActResNetModel,
    feature_extractor,
    get_model,
    list_models,
)

__version__ = "0.1.0"

__all__ = [
    "BuildContext",
    "LAYOUTS",
    "Layout",
    "MODELS",
    "PreActResNet",
    "PreActResNet18",
    "PreActResNet34",
    "PreActResNet50",
    "PreActResNet101",
    "PreActResNet152",
    "PreActResNet200",
    "PreActResNet20",
    "PreActResNet32",
    "PreActResNet44",
    "PreActResNet56",
    "PreActResNet110",
    "PreActResNet164",
    "PreActResNet1001",
    "PreActResNetModel",
    "decode_predictions",
    "feature_extractor",
    "get_model",
    "layers",
    "list_models",
    "preprocess_input",
    "scan",
    "shortcuts",
    "units",
    "weights",
]
