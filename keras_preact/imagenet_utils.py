"""Input preprocessing per weights record, and ImageNet label decoding that works offline.

Each weights record names its preprocessing (`record.preprocessing`); `preprocess_input`
applies it to RGB images with values in [0, 255], and builders with
`include_preprocessing=True` apply it inside the model. The constants below are the one home
of these normalizations (the tf.data pipeline imports them):

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

#: keras.applications' `mode=` names: "tf" and "torch" are two of the modes above; "caffe"
#: is RGB -> BGR minus keras' ImageNet BGR mean, in [0, 255] units, with no scaling.
KERAS_MODES = {"tf": "inception", "torch": "imagenet_torch", "caffe": None}
_KERAS_NAME = {ours: theirs for theirs, ours in KERAS_MODES.items() if ours}
CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)

_CLASS_INDEX = os.path.join(os.path.dirname(os.path.abspath(__file__)), "imagenet_class_index.json")


def mean_std(preprocessing):
    """`(mean, std)` tuples, [0, 1] units, of a mode name or a `(mean, std)` pair.

    A pair is per-channel statistics of pixels scaled to [0, 1]: every mean in [0, 1] and
    every std in (0, 1] (data in [0, 1] has a std of at most 0.5; 1 leaves the scale as it
    is). Statistics of [0, 255] pixels are refused, with the pair divided by 255.

    >>> mean_std("inception")
    ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    >>> mean_std(([0.2860406], [0.35302424]))
    ((0.2860406,), (0.35302424,))
    """
    if isinstance(preprocessing, str) and preprocessing in MODES:
        return MODES[preprocessing]
    try:
        mean, std = preprocessing
        mean = tuple(float(m) for m in np.ravel(mean))
        std = tuple(float(s) for s in np.ravel(std))
    except (TypeError, ValueError):
        mean = std = ()
    if not mean or len(mean) != len(std):
        raise ValueError(
            f"Invalid preprocessing={preprocessing!r}. Allowed: a mode in {sorted(MODES)}, or "
            "a (mean, std) pair of equally long per-channel sequences in [0, 1] units "
            "(0 <= mean <= 1, 0 < std <= 1)."
        )
    bad = [f"mean {m!r}" for m in mean if not 0.0 <= m <= 1.0]
    bad += [f"std {s!r}" for s in std if not 0.0 < s <= 1.0]
    if bad:
        hint = ""
        if all(0.0 <= v <= 255.0 for v in mean + std) and min(std) > 0:
            # Statistics of [0, 255] pixels: the likeliest mistake, so show the conversion.
            scaled = (
                tuple(round(m / 255.0, 6) for m in mean),
                tuple(round(s / 255.0, 6) for s in std),
            )
            hint = f" If these are [0, 255] pixel statistics, divide by 255: {scaled!r}."
        raise ValueError(
            f"Invalid preprocessing={preprocessing!r}: {', '.join(bad)} out of range. The "
            "(mean, std) pair is in [0, 1] units, as for pixels divided by 255: every mean "
            f"in [0, 1], every std in (0, 1].{hint}"
        )
    return mean, std


def _mode(weights, model):
    """The preprocessing mode `preprocess_input(x, weights, model=model)` means."""
    from keras_preact import weights as kp_weights

    if isinstance(model, keras.Model):
        return _built_model_mode(weights, model)
    if isinstance(weights, kp_weights.WeightsRecord):
        if isinstance(model, str) and weights.model != model:
            raise ValueError(
                f"weights={weights.name!r} (a WeightsRecord for {weights.model}) contradicts "
                f"model={model!r}. Pass the record of that builder, or one of the two alone."
            )
        return weights.preprocessing
    if isinstance(weights, str) and weights in MODES:
        return weights
    if not isinstance(weights, str):
        raise ValueError(
            f"Invalid weights={weights!r}: expected a record name (e.g. 'imagenet:fb_torch'), "
            f"a WeightsRecord or a mode in {sorted(MODES)}."
        )
    depth = None
    if model is not None:
        # The builder's choice for this model: the same record `weights=` would load.
        name = model if isinstance(model, str) else ""
        digits = name.removeprefix("PreActResNet")
        if not name.startswith("PreActResNet") or not digits.isdigit():
            raise ValueError(
                f"Invalid model={model!r}: expected a builder name such as 'PreActResNet200' "
                "or a model built by keras_preact."
            )
        depth = int(digits)
    if ":" in weights:
        found = [r for r in kp_weights.RECORDS if r.name == weights]
        if found and depth is not None and all(r.depth != depth for r in found):
            raise ValueError(
                f"weights={weights!r} are for {[r.model for r in found]}; they contradict "
                f"model={model!r}. Pass a record of {model} (e.g. "
                f"{[r.name for r in kp_weights.list_records(model=model)]}), or one of the "
                "two alone."
            )
        return kp_weights.get_record(weights, depth).preprocessing
    if depth is not None:
        return kp_weights.get_record(weights, depth).preprocessing
    records = kp_weights.list_records(dataset=weights)
    modes = {r.preprocessing for r in records}
    if len(modes) == 1:
        return modes.pop()
    if not records:
        raise ValueError(
            f"Unknown preprocessing weights={weights!r}. Allowed: a record name in "
            f"{[r.name for r in kp_weights.RECORDS]}, a dataset name, or a mode in "
            f"{sorted(MODES)}."
        )
    listed = sorted({f"{r.model} {r.name}: {r.preprocessing}" for r in records})
    raise ValueError(
        f"weights={weights!r} names records with different preprocessing: {listed}. Pass "
        "model= (the builder name, e.g. model='PreActResNet200') or a full record name."
    )


def _built_model_mode(weights, model):
    """The mode for a built `model`: its own record's, which `weights=` may only repeat."""
    from keras_preact import weights as kp_weights

    own = getattr(model, "weights_record", None)
    if own is None:
        if weights is None:
            raise ValueError(
                f"Model {model.name!r} was built without a weights record; pass weights= "
                f"(a record name or a mode in {sorted(MODES)})."
            )
        return _mode(weights, None)  # nothing in the model to contradict
    own_mode = kp_weights.get_record(own).preprocessing
    if weights is None or (isinstance(weights, str) and weights in (own, own.split(":")[0])):
        return own_mode  # the model's record, or its dataset
    name = weights.name if isinstance(weights, kp_weights.WeightsRecord) else weights
    others = kp_weights.list_records(dataset=weights) if isinstance(weights, str) else []
    if others:  # another dataset: never the model's record, whatever its modes
        wanted = " or ".join(sorted({repr(r.preprocessing) for r in others}))
    else:
        wanted = repr(_mode(weights, None))
    if others or wanted != repr(own_mode):
        raise ValueError(
            f"weights={name!r} (preprocessing {wanted}) contradicts model={model.name!r}, "
            f"built with weights={own!r} (preprocessing {own_mode!r}). Pass model= alone to "
            "use the model's own, or weights= alone."
        )
    return own_mode


def _data_format(data_format):
    if data_format in (None, "channels_last", "channels_first"):
        return data_format or keras.config.image_data_format()
    hint = ""
    if isinstance(data_format, str) and data_format in KERAS_MODES:
        hint = f" To normalize with keras.applications' mode, pass mode={data_format!r}."
    elif isinstance(data_format, str) or not isinstance(data_format, type(None)):
        hint = (
            " The second positional argument is data_format, as in keras.applications; pass "
            f"a record or mode by keyword: weights={data_format!r}."
        )
    raise ValueError(
        f"Invalid data_format={data_format!r}. Allowed: None, 'channels_last', "
        f"'channels_first'.{hint}"
    )


def _keras_mode(mode, weights, model):
    """(mean, std, bgr) in [0, 255] units for `mode=` with any `weights=`/`model=`, which
    must name the same normalization."""
    if not (isinstance(mode, str) and mode in KERAS_MODES):
        raise ValueError(
            f"Invalid mode={mode!r}. Allowed: {sorted(KERAS_MODES)} (keras.applications' "
            f"modes); this package's own modes {sorted(MODES)} go in weights=."
        )
    if weights is not None or model is not None:
        ours = _mode(weights, model)
        if KERAS_MODES[mode] != ours:
            raise ValueError(
                f"mode={mode!r} contradicts weights={getattr(weights, 'name', weights)!r} / "
                f"model={getattr(model, 'name', model)!r}, whose preprocessing is {ours!r}"
                f"{f' (mode={_KERAS_NAME[ours]!r})' if ours in _KERAS_NAME else ''}. Pass "
                "one of them alone."
            )
    if mode == "caffe":
        return CAFFE_BGR_MEAN, (1.0, 1.0, 1.0), True
    mean, std = MODES[KERAS_MODES[mode]]
    return tuple(m * 255.0 for m in mean), tuple(v * 255.0 for v in std), False


def preprocess_input(x, data_format=None, mode=None, *, weights=None, model=None):
    """Maps RGB (or grey) images in [0, 255] to the input a model's weights were trained on.

    Called as keras.applications' `preprocess_input(x, data_format=None, mode=...)`, or
    with this package's weights records: each record names its normalization, and
    `preprocess_input(x, weights="imagenet", model="PreActResNet200")` applies what
    `PreActResNet200(weights="imagenet")` needs. One of `mode`, `weights` or `model` is
    required: the records differ, so there is no default. (Models built with
    `include_preprocessing=True` take [0, 255] pixels and need none of this.)

    | way | normalization |
    | --- | --- |
    | `mode="tf"`, `weights="inception"` | `x / 127.5 - 1` |
    | `mode="torch"`, `weights="imagenet_torch"` | `(x / 255 - mean) / std`, ImageNet RGB statistics |
    | `mode="caffe"` | RGB to BGR, minus the ImageNet BGR mean (103.939, 116.779, 123.68), no scaling |
    | `weights="fashion_mnist"` | `(x / 255 - 0.28604) / 0.35302` |

    Args:
        x: images, `(..., H, W, C)` for channels_last or `(..., C, H, W)`; a numpy array
            (returns float32 numpy) or a backend or symbolic Keras tensor (returns a
            tensor).
        data_format: `"channels_last"` or `"channels_first"`; default: Keras' config.
        mode: keras.applications' `"caffe"`, `"tf"` or `"torch"`.
        weights: a record name (`"imagenet:timm_a1h_in1k"`; a bare dataset name such as
            `"imagenet"` with `model=`, or alone if all its records agree), a
            `WeightsRecord`, or one of this package's modes: `"inception"`,
            `"imagenet_torch"`, `"fashion_mnist"`.
        model: a builder name (`"PreActResNet200"`), or a model built by this package with
            weights (its `weights_record` is used when `weights` is None). With both, they
            must agree: `weights` then names the model's record, its dataset, or a record
            or mode of the same preprocessing. With `mode`, both must mean that mode.

    Returns:
        The normalized images, float32.

    Raises:
        ValueError: when none of mode, weights and model is given (listing the three), for
            an unknown mode, record or data format, a dataset whose records disagree
            (listing them), arguments that contradict each other (naming them), or images
            whose channels do not match the normalization.

    Example:

    >>> import numpy as np
    >>> from keras_preact import preprocess_input
    >>> x = np.array([[[[0, 127.5, 255]]]])
    >>> preprocess_input(x, mode="tf").tolist()
    [[[[-1.0, 0.0, 1.0]]]]
    >>> preprocess_input(x, weights="inception").tolist()
    [[[[-1.0, 0.0, 1.0]]]]
    >>> [round(v, 3) for v in preprocess_input(x, "channels_last", "caffe").ravel().tolist()]
    [151.061, 10.721, -123.68]
    """
    data_format = _data_format(data_format)
    if mode is not None:
        mean, std, bgr = _keras_mode(mode, weights, model)
    elif weights is not None or model is not None:
        mean, std = MODES[_mode(weights, model)]
        mean, std, bgr = tuple(m * 255.0 for m in mean), tuple(v * 255.0 for v in std), False
    else:
        raise ValueError(
            "preprocess_input needs the normalization, given one of three ways: "
            f"mode={sorted(KERAS_MODES)} (keras.applications' modes); weights= a record name "
            f"(e.g. 'imagenet:fb_torch', 'fashion_mnist') or a mode in {sorted(MODES)}; or "
            "model= a builder name with weights= a dataset, or a model built with weights."
        )
    axis = -1 if data_format == "channels_last" else -3
    shape = [1] * 3
    shape[axis] = len(mean)
    m = np.reshape(np.asarray(mean, np.float32), shape)
    s = np.reshape(np.asarray(std, np.float32), shape)
    if isinstance(x, (np.ndarray, list, tuple, int, float)):
        x = np.asarray(x, np.float32)
        channels = x.shape[axis] if x.ndim >= 3 else None
        if channels != len(mean):
            raise ValueError(
                f"Images of shape {x.shape} have {channels} channels on axis {axis} "
                f"({data_format}); the preprocessing expects {len(mean)}."
            )
        if bgr:
            x = np.flip(x, axis)
        return ((x - m) / s).astype(np.float32)
    ops = keras.ops
    x = ops.cast(x, "float32")
    if bgr:
        x = ops.flip(x, axis=len(x.shape) + axis)
    return (x - ops.convert_to_tensor(m)) / ops.convert_to_tensor(s)


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
    if isinstance(top, bool) or not isinstance(top, int) or not 1 <= top <= 1000:
        raise ValueError(f"Invalid top={top!r}: expected an int in [1, 1000].")
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
