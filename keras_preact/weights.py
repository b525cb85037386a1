"""Pretrained weights: the table of records (data), resolution of `weights=`, and loading.

Reading order: the layouts of the upstream codebases, the `WeightsRecord` schema, the
`RECORDS` table (one row per downloadable or shipped file; `docs/weights.md` is the same
table for people), then `resolve` (called by the builder before building: picks the record,
checks it against the user's arguments) and `load` (called after building: fetches,
verifies, converts and assigns every tensor, or raises before setting any).

`weights=` accepts `None`, a local file (a Keras 3 `.weights.h5` from `model.save_weights`,
or an upstream file in its own format: keras.applications `.h5`, timm `.safetensors`,
fb.resnet.torch `.t7`), `"imagenet"` (the record with the best source-reported top-1 for
that depth), a dataset name (`"fashion_mnist"`), or `"<dataset>:<tag>"`.
"""

import dataclasses
import hashlib
import os

import keras
import numpy as np

from keras_preact import convert
from keras_preact.context import PAPER_LAYOUT, conv_bias_places

#: The paper's reference code (the authors' resnet-1k-layers): every builder's defaults.
LAYOUT_PAPER = PAPER_LAYOUT
#: timm `resnetv2_{18,34,50,101}`: stem conv without norm, Torch max-pool (-inf border),
#: stride on the 3x3, projection on the pre-activated input, no conv biases.
LAYOUT_TIMM = {
    "stride_in": "3x3",
    "downsample_in": "first_unit",
    "stem_norm": False,
    "stem_pool_padding": "neg_inf",
    "conv_bias": (),
    "bn_epsilon": 1e-5,
    "preact_scope": "shared",
}
#: keras.applications ResNetV2 (`keras/src/applications/resnet.py`, `residual_block_v2`):
#: stride in each stage's last unit with a 1x1 max-pool shortcut, biases on all but the
#: inner convolutions, BN epsilon 1.001e-5.
LAYOUT_KERAS = {
    "stride_in": "3x3",
    "downsample_in": "last_unit",
    "stem_norm": False,
    "stem_pool_padding": "zeros",
    "conv_bias": ("stem", "projection", "residual_last"),
    "bn_epsilon": 1.001e-5,
    "preact_scope": "shared",
}
#: fb.resnet.torch `models/preresnet.lua` since PR #42 (ImageNet): the paper's layout (stem
#: conv-BN-ReLU, "both_preact" first units of later stages) but the stride on the 3x3.
LAYOUT_FB = {**LAYOUT_PAPER, "stride_in": "3x3"}
#: The structure of the published `resnet-200.t7` (preresnet.lua before PR #42, whose
#: `layer()` dropped each unit's type): every unit pre-activates only its residual branch,
#: the first unit again after the stem's BN-ReLU; projections are conv-BN on the raw input.
LAYOUT_FB_LEGACY = {**LAYOUT_FB, "preact_scope": "branch"}
#: The layout each upstream file format implies when a local file has no record (a local
#: `.t7` file is read first and takes LAYOUT_FB or LAYOUT_FB_LEGACY from its structure).
FORMAT_LAYOUTS = {"keras_h5": LAYOUT_KERAS, "timm_safetensors": LAYOUT_TIMM, "torch7": LAYOUT_FB}

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


@dataclasses.dataclass(frozen=True)
class WeightsRecord:
    """One weights file and everything needed to build, fetch, check and use it.

    Attributes:
        model: the named builder (`"PreActResNet200"`).
        tag: the record's tag; `"<dataset>:<tag>"` names it in `weights=`.
        dataset: `"imagenet"`, `"fashion_mnist"`, or `"local"` for a file without a record.
        classes: classifier width of the file (None: unknown, for local files).
        input_shape: default input `(height, width, channels)` the builder uses.
        layout: the `PreActResNet` layout options the file needs (all seven).
        source: where the weights come from, with a link.
        format: `"keras_h5"`, `"timm_safetensors"`, `"torch7"` or `"keras_native"`.
        url: download URL (None for shipped files).
        file_name: name in the Keras cache (`~/.keras/models/`).
        file_hash, hash_algorithm: the hash the source publishes (None where it does not).
        license: license of the weights as the source states it.
        num_params: `model.count_params()` of the built model, BatchNorm moving statistics
            included as in keras.applications (checked by a test).
        top1, top5: accuracy (%) as reported by `metrics_source`, not measured here.
        metrics_source: who reported `top1`/`top5`, and how (crop, resolution).
        eval_size: input side at which `top1` was measured.
        preprocessing: the `imagenet_utils.preprocess_input` mode.
        unit, shortcut: the unit and shortcut the weights were trained with.
        shipped: path of the file inside the package, for weights that ship with it.
        command: the exact command that produced our own weights.
    """

    model: str
    tag: str
    dataset: str
    classes: int | None
    input_shape: tuple | None
    layout: dict
    source: str = ""
    format: str = "keras_native"
    url: str | None = None
    file_name: str | None = None
    file_hash: str | None = None
    hash_algorithm: str | None = None
    license: str = ""
    num_params: int | None = None
    top1: float | None = None
    top5: float | None = None
    metrics_source: str = ""
    eval_size: int | None = None
    preprocessing: str = "imagenet_torch"
    unit: str = "full_preact"
    shortcut: str = "identity"
    shipped: str | None = None
    command: str | None = None

    @property
    def name(self):
        return f"{self.dataset}:{self.tag}"

    @property
    def depth(self):
        return int(self.model.removeprefix("PreActResNet"))

    def default_input_shape(self, data_format):
        if self.input_shape is None:
            return None
        if data_format == "channels_last":
            return tuple(self.input_shape)
        return tuple(self.input_shape[-1:]) + tuple(self.input_shape[:2])


_HF = "https://huggingface.co/timm/{}/resolve/main/model.safetensors"
_KERAS = "https://storage.googleapis.com/tensorflow/keras-applications/resnet/"
_TIMM_SOURCE = "timm `{}` (https://huggingface.co/timm/{})"
_TIMM_METRICS = "timm model card / results CSV, 224 px, crop_pct {}"
_KERAS_METRICS = "keras.io/api/applications table (single center crop)"


def _timm(depth, tag, top1, params, crop):
    arch = f"resnetv2_{depth}.{tag}"
    return WeightsRecord(
        model=f"PreActResNet{depth}", tag=f"timm_{tag}", dataset="imagenet", classes=1000,
        input_shape=(224, 224, 3), layout=LAYOUT_TIMM, source=_TIMM_SOURCE.format(arch, arch),
        format="timm_safetensors", url=_HF.format(arch), file_name=f"timm_{arch}.safetensors",
        license="Apache-2.0 (timm pretrained_cfg)", num_params=params, top1=top1,
        metrics_source=_TIMM_METRICS.format(crop), eval_size=224, preprocessing="inception",
    )  # fmt: skip


def _keras(depth, md5, top1, top5, params):
    fname = f"resnet{depth}v2_weights_tf_dim_ordering_tf_kernels.h5"
    return WeightsRecord(
        model=f"PreActResNet{depth}", tag="keras", dataset="imagenet", classes=1000,
        input_shape=(224, 224, 3), layout=LAYOUT_KERAS,
        source=f"keras.applications ResNet{depth}V2 (keras/src/applications/resnet.py)",
        format="keras_h5", url=_KERAS + fname, file_name=fname, file_hash=md5,
        hash_algorithm="md5", license="Apache-2.0 (Keras)", num_params=params, top1=top1,
        top5=top5, metrics_source=_KERAS_METRICS, eval_size=299, preprocessing="inception",
    )  # fmt: skip


#: Every record. Hashes: keras' md5 from `WEIGHTS_HASHES` in keras/src/applications/resnet.py;
#: Hugging Face and fb.resnet.torch publish none with the file (see docs/weights.md).
RECORDS = [
    _timm(18, "ra4_e3600_r224_in1k", 73.57, 11_695_528, 0.9),
    _timm(34, "ra4_e3600_r224_in1k", 77.63, 21_811_112, 0.9),
    _timm(50, "a1h_in1k", 80.41, 25_594_792, 0.95),
    _timm(101, "a1h_in1k", 82.04, 44_639_144, 0.95),
    _keras(50, "3ef43a0b657b3be2300d5770ece849e0", 76.0, 93.0, 25_613_800),
    _keras(101, "6343647c601c52e1368623803854d971", 77.2, 93.8, 44_675_560),
    _keras(152, "a49b44d1979771252814e80f8ec446f9", 78.0, 94.2, 60_380_648),
    WeightsRecord(
        model="PreActResNet200",
        tag="fb_torch",
        dataset="imagenet",
        classes=1000,
        input_shape=(224, 224, 3),
        layout=LAYOUT_FB_LEGACY,
        source="fb.resnet.torch resnet-200.t7 (github.com/facebookarchive/fb.resnet.torch, "
        "pretrained/README.md)",
        format="torch7",
        url="https://d2j0dndfm35trm.cloudfront.net/resnet-200.t7",
        file_name="resnet-200.t7",
        license="BSD-3-Clause + PATENTS (fb.resnet.torch)",
        num_params=64_850_088,
        top1=100 - 21.66,
        top5=100 - 5.79,
        metrics_source="fb.resnet.torch pretrained/README.md, 1-crop 224x224 error 21.66 / 5.79",
        eval_size=224,
        preprocessing="imagenet_torch",
    ),  # fmt: skip
    WeightsRecord(
        model="PreActResNet20",
        tag="e6",
        dataset="fashion_mnist",
        classes=10,
        input_shape=(28, 28, 1),
        layout=LAYOUT_PAPER,
        source="keras-preact: training/cifar.py, exported by tools/export_weights.py",
        format="keras_preact_h5",
        shipped="weights_files/preact_resnet20_fashion_mnist.h5",
        file_hash="03c9e1553559eb811a62f335217722c6b0150115568b4cf0af52cc7cf1107b8b",
        hash_algorithm="sha256",
        license="Apache-2.0 (keras-preact)",
        num_params=273_370,
        top1=92.38,
        metrics_source="measured here: top-1 on all 10,000 Fashion-MNIST test images "
        "(tools/export_weights.py, TensorFlow CPU)",
        eval_size=28,
        preprocessing="fashion_mnist",
        command="python training/cifar.py --dataset=fashion_mnist --source=files "
        "--data_dir=/usr/share/datasets/fashion-mnist --model=PreActResNet20 --epochs=6 "
        "--batch_size=128 --lr_schedule=cosine --base_lr=0.1 --warmup_steps=200 "
        "--pipeline=numpy --verbose=2 --model_dir=runs/fmnist_r20  # best.weights.h5, then "
        "python tools/export_weights.py --checkpoint runs/fmnist_r20/best.weights.h5 "
        "--out keras_preact/weights_files/preact_resnet20_fashion_mnist.h5",
    ),  # fmt: skip
]


def list_records(model=None, dataset=None):
    """The records, optionally only those for `model` (`"PreActResNet50"`) or a dataset."""
    return [
        r
        for r in RECORDS
        if (model is None or r.model == model) and (dataset is None or r.dataset == dataset)
    ]


def get_record(name, depth=None):
    """The record `name` names (`"imagenet:fb_torch"`, `"imagenet"`, `"fashion_mnist"`).

    A bare dataset picks that dataset's record for `depth` with the best source-reported
    top-1. Raises ValueError listing the available names otherwise.
    """
    candidates = [r for r in RECORDS if depth is None or r.depth == depth]
    if ":" in name:
        found = [r for r in candidates if r.name == name]
        others = [r.model for r in RECORDS if r.name == name]
        if not found and others and depth is not None:
            raise ValueError(
                f"weights={name!r} exist for {others}, not for a depth-{depth} network. "
                f"Records for depth {depth}: {[r.name for r in candidates]}."
            )
    else:
        found = sorted(
            (r for r in candidates if r.dataset == name),
            key=lambda r: -(r.top1 if r.top1 is not None else -1.0),
        )
    if not found:
        raise ValueError(
            f"Unknown weights={name!r}"
            + (f" for depth {depth}" if depth is not None else "")
            + f". Available for this depth: {[r.name for r in candidates]}; all records: "
            f"{[r.name for r in RECORDS]}; or None, or a path to a weights file."
        )
    return found[0]


def _same_option(key, a, b):
    if key == "conv_bias":
        return conv_bias_places(a) == conv_bias_places(b)
    if key == "bn_epsilon":
        return abs(float(a) - float(b)) <= 1e-9
    return a == b


#: Tensors read from a local file while resolving its layout, kept for `load`:
#: {(path, size, mtime_ns): tensors}; `load` pops them, so a file is read once.
_READ_AHEAD = {}


def _file_key(path):
    st = os.stat(path)
    return (os.path.realpath(path), st.st_size, st.st_mtime_ns)


def _local_record(path, fmt, model_name):
    """A record for a local upstream file: the one whose file name it bears, or its format's.

    A `.t7` file without a record is read here: its structure picks `preact_scope`.
    """
    base = os.path.basename(os.fspath(path))
    for r in RECORDS:
        if r.file_name == base and r.format == fmt:
            return r
    layout = FORMAT_LAYOUTS.get(fmt, {})
    if fmt == "torch7":
        tensors = convert.read_tensors(path, fmt)
        _READ_AHEAD.clear()
        _READ_AHEAD[_file_key(path)] = tensors
        layout = {**layout, "preact_scope": convert.torch7.preact_scope(tensors)}
    return WeightsRecord(
        model=model_name, tag="local", dataset="local", classes=None, input_shape=None,
        layout=layout, source=os.fspath(path), format=fmt,
    )  # fmt: skip


def resolve(
    weights,
    *,
    model_name=None,
    depth=None,
    family=None,
    block=None,
    include_top=True,
    classes=None,
    unit="full_preact",
    shortcut="identity",
    layout=None,
):
    """The record `weights` names (None for no weights or a Keras 3 file); raises if it
    contradicts the other arguments. Called by `PreActResNet` before it builds anything."""
    if weights is None:
        return None
    if isinstance(weights, (str, os.PathLike)) and os.path.isfile(weights):
        fmt = convert.detect_format(weights)
        if fmt == "keras_native":
            return None
        record = _local_record(weights, fmt, model_name)
        if record.dataset == "local":
            _check(record, depth, family, include_top, classes, unit, shortcut, layout)
            return record
    elif isinstance(weights, str) and os.path.sep not in weights:
        record = get_record(weights, depth)
    else:
        raise ValueError(
            f"weights={weights!r} is neither None, an existing file, nor a record name. "
            f"Records: {[r.name for r in RECORDS]}."
        )
    if record.depth != depth:
        raise ValueError(f"{record.name} is for {record.model}, not a depth-{depth} network.")
    _check(record, depth, family, include_top, classes, unit, shortcut, layout)
    return record


def _check(record, depth, family, include_top, classes, unit, shortcut, layout):
    from keras_preact.preact_resnet import MODELS

    row = MODELS.get(record.model)
    if row is not None and family is not None and row["family"] != family:
        raise ValueError(f"{record.name} needs family={row['family']!r}, not {family!r}.")
    if include_top and classes is not None and record.classes is not None:
        if classes != record.classes:
            raise ValueError(
                f"weights={record.name!r} have a {record.classes}-class classifier; got "
                f"include_top=True with classes={classes}. Pass include_top=False to use "
                "them with another number of classes."
            )
    for arg, value, wanted in (
        ("unit", unit, record.unit),
        ("shortcut", shortcut, record.shortcut),
    ):
        if value != wanted:
            raise ValueError(
                f"weights={record.name!r} were trained with {arg}={wanted!r}; got {arg}={value!r}."
            )
    for key, value in (layout or {}).items():
        if key not in record.layout:  # our own files carry no layout
            continue
        if value is not None and not _same_option(key, value, record.layout[key]):
            raise ValueError(
                f"{key}={value!r} contradicts the layout of weights={record.name!r}, which "
                f"needs {key}={record.layout[key]!r}. Leave {key} unset to take it from the "
                "weights."
            )


# -- Fetching and verifying files ------------------------------------------------------


def file_digest(path, algorithm="sha256"):
    """Hex digest of a file, read in 1 MiB chunks."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _verify(path, expected, algorithm):
    actual = file_digest(path, algorithm)
    if actual != expected:
        os.remove(path)
        raise ValueError(
            f"Hash mismatch for {path}: expected {algorithm} {expected}, got {actual}. The "
            "file was deleted; call again to download it anew."
        )


def fetch(record, cache_dir=None):
    """The local path of `record`'s file: shipped, or downloaded into the Keras cache.

    Downloads go through `keras.utils.get_file` (into `~/.keras/models/`, removing partial
    files on interruption). The hash is checked here rather than by `get_file`, so that a
    mismatch deletes the file and names both hashes.
    """
    if record.shipped:
        path = os.path.join(_PACKAGE_DIR, record.shipped)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"The weights file of {record.name} is missing from the package: {path}."
            )
        actual = file_digest(path, record.hash_algorithm) if record.file_hash else None
        if actual != record.file_hash:
            raise ValueError(
                f"Hash mismatch for the shipped {path}: expected {record.hash_algorithm} "
                f"{record.file_hash}, got {actual}."
            )
        return path
    if record.url is None:
        raise ValueError(f"{record.name} has neither a URL nor a shipped file.")
    from keras.src.backend import config

    base = os.path.expanduser(cache_dir or config.keras_home())
    try:
        os.makedirs(base, exist_ok=True)
    except OSError:
        pass
    if not os.access(base, os.W_OK):  # keras.utils.get_file's own fallback
        base = os.path.join("/tmp", ".keras")
    cached = os.path.join(base, "models", record.file_name)
    if record.file_hash and os.path.exists(cached):
        if file_digest(cached, record.hash_algorithm) != record.file_hash:
            os.remove(cached)  # stale or corrupted: download anew
    path = keras.utils.get_file(record.file_name, record.url, cache_subdir="models", cache_dir=base)
    if record.file_hash:
        _verify(path, record.file_hash, record.hash_algorithm)
    return path


def converted_tensors(path, fmt, cache=False):
    """The neutral tensors of `path`; with `cache`, reuses/writes `<path>.keras_preact.h5`."""
    if fmt in ("keras_h5", "keras_preact_h5") or not cache:
        return convert.read_tensors(path, fmt)
    cached = f"{path}.keras_preact.h5"
    if os.path.exists(cached) and os.path.getmtime(cached) >= os.path.getmtime(path):
        return convert.read_tensors(cached, "keras_h5")
    tensors = convert.read_tensors(path, fmt)
    convert.write_tensors(cached, tensors)  # atomic: tmp + os.replace
    return tensors


# -- Assigning tensors -----------------------------------------------------------------


def assign(model, tensors, source="weights"):
    """Sets every weight of `model` from `tensors` (`{layer: {variable: array}}`).

    Checks everything first and sets nothing on error: a layer or variable the file lacks,
    a shape that differs, or tensors the model has no place for (another depth or layout)
    raise ValueError naming the first offending tensor. `predictions` may be absent from
    the model (`include_top=False`).
    """
    plan = []
    for layer in model.layers:
        if not layer.weights:
            continue
        group = tensors.get(layer.name)
        if group is None:
            raise ValueError(
                f"{source}: no tensors for layer {layer.name!r} "
                f"({[w.name for w in layer.weights]}); the file is truncated or for another "
                "architecture or layout."
            )
        values = []
        for w in layer.weights:
            if w.name not in group:
                raise ValueError(f"{source}: missing tensor {layer.name}/{w.name}.")
            value = np.asarray(group[w.name])
            if tuple(value.shape) != tuple(w.shape):
                raise ValueError(
                    f"{source}: tensor {layer.name}/{w.name} has shape {tuple(value.shape)}, "
                    f"the model expects {tuple(w.shape)}."
                )
            values.append(value)
        extra = sorted(set(group) - {w.name for w in layer.weights})
        if extra:
            raise ValueError(
                f"{source}: tensors {[f'{layer.name}/{e}' for e in extra]} have no place in "
                "the model (a conv bias the layout lacks?)."
            )
        plan.append((layer, values))
    names = {layer.name for layer in model.layers}
    unused = sorted(set(tensors) - names - {"predictions"})
    if unused:
        raise ValueError(
            f"{source}: tensors for layers the model does not have, first {unused[0]!r} "
            f"({len(unused)} in all); the file is for another depth or layout."
        )
    for layer, values in plan:
        layer.set_weights(values)


def load(model, weights, record):
    """Loads `weights` into the built `model`; `record` is what `resolve` returned."""
    if record is None:
        model.load_weights(weights)  # a Keras 3 `.weights.h5`: Keras checks it
        return
    if isinstance(weights, (str, os.PathLike)) and os.path.isfile(weights):
        path, downloaded = os.fspath(weights), False
    else:
        path, downloaded = fetch(record), record.shipped is None
    try:
        tensors = _READ_AHEAD.pop(_file_key(path), None)
        if tensors is None:
            tensors = converted_tensors(path, record.format, cache=downloaded)
    except (OSError, ValueError, KeyError) as e:
        hint = f" Delete {path} to download it again." if downloaded else ""
        raise ValueError(f"Cannot read {record.name} from {path}: {e}.{hint}") from e
    if record.format == "torch7":
        scope = convert.torch7.preact_scope(tensors)
        if scope != record.layout["preact_scope"]:
            raise ValueError(
                f"{path} has the preact_scope={scope!r} structure; {record.name} expects "
                f"preact_scope={record.layout['preact_scope']!r}. Pass a copy under another "
                "file name: a local .t7 file no record names takes its layout from its "
                "structure."
            )
    assign(model, tensors, source=f"{record.name} ({os.path.basename(path)})")
