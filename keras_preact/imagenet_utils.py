"""Input preprocessing per weights record, and ImageNet label decoding that works offline.

Each weights record names its preprocessing (`record.preprocessing`); `preprocess_input`
applies it to RGB images with values in [0, 255]:

| mode | formula | used by |
| --- | --- | --- |
| `"inception"` | `x / 127.5 - 1` (timm mean = std = 0.5; keras `mode="tf"`) | timm, keras.applications |
| `"imagenet_torch"` | `(x / 255 - mean) / std`, ImageNet mean/std | fb.resnet.torch |
| `"fashion_mnist"` | `(x / 255 - 0.28604) / 0.35302` (training-set statistics) | our Fashion-MNIST weights |

The 1000 class names ship as `imagenet_class_index.json`: the same file Keras downloads at
run time (`keras/src/applications/imagenet_utils.py`, md5 c2c37ea517e94d9795004a39431a14cb),
rebuilt from the ImageNet-1k synset order and WordNet lemmas listed in timm
(`timm/data/_info/imagenet_synsets.txt`, `imagenet_synset_to_lemma.txt`); the rebuilt file
has exactly that md5.
"""

import functools
import json
import os

import keras
import numpy as np

#: ImageNet RGB mean/std in [0, 1] units (fb.resnet.torch `datasets/imagenet.lua`).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Fashion-MNIST training-set pixel mean/std in [0, 1] units, as training/cifar.py computes
#: them (`keras_preact.data.numpy_pipeline.channel_stats` over the 60,000 training images).
FASHION_MNIST_MEAN = (0.2860406,)
FASHION_MNIST_STD = (0.35302424,)

MODES = {
    "inception": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "imagenet_torch": (IMAGENET_MEAN, IMAGENET_STD),
    "fashion_mnist": (FASHION_MNIST_MEAN, FASHION_MNIST_STD),
}

_CLASS_INDEX = os.path.join(os.path.dirname(os.path.abspath(__file__)), "imagenet_class_index.json")


def _mode(record_or_mode):
    from keras_preact import weights as kp_weights

    if isinstance(record_or_mode, kp_weights.WeightsRecord):
        return record_or_mode.preprocessing
    if record_or_mode in MODES:
        return record_or_mode
    if isinstance(record_or_mode, str):
        try:
            return kp_weights.get_record(record_or_mode).preprocessing
        except ValueError:
            pass
    raise ValueError(
        f"Unknown preprocessing {record_or_mode!r}. Allowed: a WeightsRecord, a record name "
        f"such as 'imagenet:fb_torch', or a mode in {sorted(MODES)}."
    )


def preprocess_input(x, record_or_mode, data_format=None):
    """Maps RGB (or grey) images in [0, 255] to the input the weights were trained on.

    Args:
        x: images, `(..., H, W, C)` for channels_last or `(..., C, H, W)`; a numpy array
            (returns float32 numpy) or a backend tensor (returns a tensor).
        record_or_mode: a `WeightsRecord`, a record name (`"imagenet:timm_a1h_in1k"`), or a
            mode: `"inception"`, `"imagenet_torch"`, `"fashion_mnist"`.
        data_format: `"channels_last"` or `"channels_first"`; default: Keras' config.

    Returns:
        The normalized images, float32.

    Example:

    >>> import numpy as np
    >>> from keras_preact.imagenet_utils import preprocess_input
    >>> preprocess_input(np.array([[[[0, 127.5, 255]]]]), "inception").tolist()
    [[[[-1.0, 0.0, 1.0]]]]
    """
    mean, std = MODES[_mode(record_or_mode)]
    data_format = data_format or keras.config.image_data_format()
    axis = -1 if data_format == "channels_last" else -3
    shape = [1] * 3
    shape[axis] = len(mean)
    if isinstance(x, (np.ndarray, list, tuple, int, float)):
        x = np.asarray(x, np.float32)
        channels = x.shape[axis]
        if channels != len(mean):
            raise ValueError(
                f"Images have {channels} channels on axis {axis} ({data_format}); the "
                f"preprocessing expects {len(mean)}."
            )
        m = np.reshape(np.asarray(mean, np.float32) * 255.0, shape)
        s = np.reshape(np.asarray(std, np.float32) * 255.0, shape)
        return ((x - m) / s).astype(np.float32)
    ops = keras.ops
    x = ops.cast(x, "float32")
    m = ops.reshape(ops.convert_to_tensor(np.asarray(mean, np.float32) * 255.0), shape)
    s = ops.reshape(ops.convert_to_tensor(np.asarray(std, np.float32) * 255.0), shape)
    return (x - m) / s


@functools.lru_cache(maxsize=1)
def class_index():
    """`{index: (wnid, name)}` of the 1000 ImageNet-1k classes, read from the package."""
    with open(_CLASS_INDEX) as f:
        return {int(k): tuple(v) for k, v in json.load(f).items()}


def decode_predictions(preds, top=5):
    """Decodes ImageNet predictions into `(wnid, name, score)`, offline.

    Args:
        preds: scores of shape `(batch, 1000)` (probabilities or logits).
        top: how many classes to return per image.

    Returns:
        One list per image of `top` tuples `(wnid, class_name, score)`, best first.

    Example:

    >>> import numpy as np
    >>> from keras_preact.imagenet_utils import decode_predictions
    >>> p = np.zeros((1, 1000)); p[0, 1] = 1.0
    >>> decode_predictions(p, top=1)
    [[('n01443537', 'goldfish', 1.0)]]
    """
    preds = keras.ops.convert_to_numpy(preds)
    if preds.ndim != 2 or preds.shape[1] != 1000:
        raise ValueError(
            f"decode_predictions expects a batch of 1000 ImageNet scores, shape (N, 1000); "
            f"received shape {preds.shape}."
        )
    names = class_index()
    results = []
    for row in preds:
        best = np.argsort(-row, kind="stable")[:top]
        results.append([(*names[int(i)], float(row[i])) for i in best])
    return results
