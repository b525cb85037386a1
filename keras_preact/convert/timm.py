"""timm `resnetv2_{18,34,50,101}` `model.safetensors` (non-BiT: plain conv, BatchNorm).

State-dict names (timm `timm/models/resnetv2.py`): `stem.conv`, then
`stages.{s}.blocks.{b}.{norm1, conv1, norm2, conv2[, norm3, conv3], downsample.conv}`,
the final `norm` and the 1x1-conv classifier `head.fc`. `norm1` is the unit's
pre-activation, `normK` (K > 1) the BN before `convK`, `downsample.conv` the projection on
the pre-activated input. Torch conv weights OIHW become Keras HWIO.
"""

import re

import numpy as np

from keras_preact._optional import require

_BN = {"weight": "gamma", "bias": "beta", "running_mean": "moving_mean",
       "running_var": "moving_variance"}  # fmt: skip
_BLOCK = re.compile(r"stages\.(\d+)\.blocks\.(\d+)\.(.+)")


def _layer_and_var(key):
    """(layer name, variable name) of one state-dict key, or None to skip it."""
    module, _, param = key.rpartition(".")
    if param == "num_batches_tracked":
        return None
    if module == "stem.conv" and param == "weight":
        return "conv1_conv", "kernel"
    if module == "norm" and param in _BN:
        return "post_bn", _BN[param]
    if module == "head.fc" and param in ("weight", "bias"):
        return "predictions", "kernel" if param == "weight" else "bias"
    m = _BLOCK.fullmatch(module)
    if m:
        stage, block, part = int(m.group(1)), int(m.group(2)), m.group(3)
        prefix = f"conv{stage + 2}_block{block + 1}"
        if part == "downsample.conv" and param == "weight":
            return f"{prefix}_0_conv", "kernel"
        conv = re.fullmatch(r"conv(\d)", part)
        if conv and param == "weight":
            return f"{prefix}_{conv.group(1)}_conv", "kernel"
        norm = re.fullmatch(r"norm(\d)", part)
        if norm and param in _BN:
            k = int(norm.group(1))
            return (f"{prefix}_preact_bn" if k == 1 else f"{prefix}_{k - 1}_bn"), _BN[param]
    raise ValueError(
        f"Unexpected tensor {key!r}: not part of a timm resnetv2_{{18,34,50,101}} checkpoint "
        "(BiT, 'd'/'t' stems and GroupNorm variants are not supported)."
    )


def convert_state_dict(state):
    """Maps a timm state dict (name -> numpy array) to the neutral form."""
    tensors = {}
    for key, value in state.items():
        target = _layer_and_var(key)
        if target is None:
            continue
        layer, var = target
        value = np.asarray(value, np.float32)
        if var == "kernel" and value.ndim == 4:
            value = value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
            if layer == "predictions":
                value = value[0, 0]  # 1x1 conv head == Dense on the pooled features
        tensors.setdefault(layer, {})[var] = value
    return tensors


def read(path):
    load_file = require("safetensors.numpy").load_file

    return convert_state_dict(load_file(path))
