"""Pretrained weights: the table of records (data), resolution of `weights=`, and loading.

Reading order: the `WeightsRecord` schema, the `RECORDS` table (one row per downloadable or
shipped file; `docs/weights.md` is the same table for people), then `resolve` (called by
the builder before building: picks the record, checks it against the user's arguments and
returns what it found, with any tensors it had to read), `fetch` and `load` (called after
building: fetches, verifies, converts and assigns every tensor, or raises before setting
any). This module never imports the builder: data flows from the builder to here.

`weights=` accepts `None`, a local file (a Keras 3 `.weights.h5` from `model.save_weights`,
this package's own `.h5` from `tools/export_weights.py`, or an upstream file in its own
format: keras.applications `.h5`, timm `.safetensors`, fb.resnet.torch `.t7`),
`"imagenet"` (the record with the best source-reported top-1 for that depth), a dataset
name (`"fashion_mnist"`), or `"<dataset>:<tag>"`.
"""

import contextlib
import dataclasses
import glob
import hashlib
import http.client
import json
import math
import os
import pathlib
import socket
import struct
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import keras
import numpy as np

from keras_preact import convert
from keras_preact import shortcuts as kp_shortcuts
from keras_preact._optional import MissingDependency, require
from keras_preact.layout import LAYOUTS, Layout

#: The layout and preprocessing each upstream file format implies when a local file has
#: no record (a local `.t7` file is read first and takes "fb" or "fb_legacy" from its
#: structure). This package's own files carry neither: the builder arguments give them.
FORMAT_DEFAULTS = {
    "keras_h5": ("keras", "inception"),
    "timm_safetensors": ("timm", "inception"),
    "torch7": ("fb", "imagenet_torch"),
}

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
#: What a `weights=` string ends with when it names a file rather than a record.
_FILE_SUFFIXES = (".h5", ".hdf5", ".keras", ".safetensors", ".t7")


@dataclasses.dataclass(frozen=True)
class WeightsRecord:
    """One weights file and everything needed to build, fetch, check and use it.

    Attributes:
        model: the named builder (`"PreActResNet200"`).
        tag: the record's tag; `"<dataset>:<tag>"` names it in `weights=`.
        dataset: `"imagenet"`, `"fashion_mnist"`, or `"local"` for a file without a record.
        classes: classifier width of the file (None: unknown, for local files).
        input_shape: default input `(height, width, channels)` the builder uses.
        layout: the `keras_preact.Layout` the file needs (None: any, for this package's
            own local files, whose layout the builder arguments give).
        source: where the weights come from, with a link.
        format: `"keras_h5"`, `"timm_safetensors"`, `"torch7"` or `"keras_preact_h5"`.
        url: download URL (None for shipped files).
        file_name: name in the Keras cache (`~/.keras/models/`).
        file_hash, hash_algorithm: the hash the source publishes (None where it does not).
        license: license of the weights as the source states it.
        num_params: `model.count_params()` of the built model, BatchNorm moving statistics
            included as in keras.applications (checked by a test).
        top1, top5: accuracy (%) as reported by `metrics_source`.
        metrics_source: who reported `top1`/`top5`, and how (crop, resolution).
        eval_size: input side at which `top1` was measured.
        preprocessing: the `keras_preact.preprocess_input` mode of the file's inputs (None:
            unknown, for this package's own local files).
        unit, shortcut: the unit and shortcut names the weights were trained with (None:
            unknown, not checked).
        shipped: path of the file inside the package, for weights that ship with it.
        command: the exact command that produced our own weights.
    """

    model: str
    tag: str
    dataset: str
    classes: int | None
    input_shape: tuple | None
    layout: Layout | None
    source: str = ""
    format: str = "keras_preact_h5"
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
    preprocessing: str | None = "imagenet_torch"
    unit: str | None = "full_preact"
    shortcut: str | None = "identity"
    shipped: str | None = None
    command: str | None = None

    def __post_init__(self):
        _check_file_name(self)

    @property
    def name(self):
        """`"<dataset>:<tag>"`; for a local file without a record, its path."""
        return self.source if self.dataset == "local" else f"{self.dataset}:{self.tag}"

    @property
    def depth(self):
        return int(self.model.removeprefix("PreActResNet"))

    def default_input_shape(self, data_format):
        if self.input_shape is None:
            return None
        if data_format == "channels_last":
            return tuple(self.input_shape)
        return tuple(self.input_shape[-1:]) + tuple(self.input_shape[:2])


def _check_file_name(record):
    """A record's `file_name` is a plain name: `fetch` joins it to the cache folder, so a
    `../`, a separator or an absolute path would write outside it."""
    name = record.file_name
    if name is None:
        return
    seps = {os.path.sep, "/", "\\"} | ({os.path.altsep} if os.path.altsep else set())
    if not isinstance(name, str) or name in ("", ".", "..") or any(c in name for c in seps):
        raise ValueError(
            f"Weights record {record.dataset}:{record.tag} has file_name={name!r}: a file name "
            "in the cache folder must be a plain name (no path separator, not '..', '.' or "
            "empty)."
        )


def _names(records):
    """The names of `records`, each once, in order (depths share tags: `imagenet:keras`)."""
    return list(dict.fromkeys(r.name for r in records))


_HF = "https://huggingface.co/timm/{}/resolve/main/model.safetensors"
_KERAS = "https://storage.googleapis.com/tensorflow/keras-applications/resnet/"
_TIMM_SOURCE = "timm `{}` (https://huggingface.co/timm/{})"
_TIMM_METRICS = "timm model card / results CSV, 224 px, crop_pct {}"
_KERAS_METRICS = "keras.io/api/applications table (single center crop)"


def _timm(depth, tag, top1, params, crop):
    arch = f"resnetv2_{depth}.{tag}"
    return WeightsRecord(
        model=f"PreActResNet{depth}", tag=f"timm_{tag}", dataset="imagenet", classes=1000,
        input_shape=(224, 224, 3), layout=LAYOUTS["timm"], source=_TIMM_SOURCE.format(arch, arch),
        format="timm_safetensors", url=_HF.format(arch), file_name=f"timm_{arch}.safetensors",
        license="Apache-2.0 (timm pretrained_cfg)", num_params=params, top1=top1,
        metrics_source=_TIMM_METRICS.format(crop), eval_size=224, preprocessing="inception",
    )  # fmt: skip


def _keras(depth, md5, top1, top5, params):
    fname = f"resnet{depth}v2_weights_tf_dim_ordering_tf_kernels.h5"
    return WeightsRecord(
        model=f"PreActResNet{depth}", tag="keras", dataset="imagenet", classes=1000,
        input_shape=(224, 224, 3), layout=LAYOUTS["keras"],
        source=f"keras.applications ResNet{depth}V2 (keras/src/applications/resnet.py)",
        format="keras_h5", url=_KERAS + fname, file_name=fname, file_hash=md5,
        hash_algorithm="md5", license="Apache-2.0 (Keras)", num_params=params, top1=top1,
        top5=top5, metrics_source=_KERAS_METRICS, eval_size=299, preprocessing="inception",
    )  # fmt: skip


#: What the Fashion-MNIST records share: the network, its input, file format and normalization.
_FASHION_MNIST = dict(
    model="PreActResNet20",
    dataset="fashion_mnist",
    classes=10,
    input_shape=(28, 28, 1),
    layout=LAYOUTS["paper"],
    format="keras_preact_h5",
    hash_algorithm="sha256",
    license="Apache-2.0 (keras-preact)",
    num_params=273_370,
    eval_size=28,
    preprocessing="fashion_mnist",
)

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
        layout=LAYOUTS["fb_legacy"],
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
        **_FASHION_MNIST,
        tag="e6",
        source="keras-preact: training/cifar.py, exported by tools/export_weights.py",
        shipped="weights_files/preact_resnet20_fashion_mnist.h5",
        file_hash="03c9e1553559eb811a62f335217722c6b0150115568b4cf0af52cc7cf1107b8b",
        top1=92.38,
        metrics_source="measured here: top-1 on all 10,000 Fashion-MNIST test images "
        "(tools/export_weights.py, TensorFlow CPU)",
        command="python training/cifar.py --dataset=fashion_mnist --source=files "
        "--data_dir=/usr/share/datasets/fashion-mnist --model=PreActResNet20 --epochs=6 "
        "--batch_size=128 --lr_schedule=cosine --base_lr=0.1 --warmup_steps=200 "
        "--pipeline=numpy --verbose=2 --model_dir=runs/fmnist_r20  # best.weights.h5, then "
        "python tools/export_weights.py --checkpoint runs/fmnist_r20/best.weights.h5 "
        "--out keras_preact/weights_files/preact_resnet20_fashion_mnist.h5",
    ),  # fmt: skip
    WeightsRecord(
        **_FASHION_MNIST,
        tag="e42",
        source="keras-preact: training/fashion_mnist_recipe.py (the package's trainer, "
        "model.fit on TensorFlow, 2 CPU cores, 75 min)",
        shipped="weights_files/preact_resnet20_fashion_mnist_e42.h5",
        file_hash="f94d3ac7266a50a2204b864eae52665f60fb34e3687e9c95c467377495e4c7cb",
        top1=94.79,
        metrics_source="measured here: top-1 on all 10,000 Fashion-MNIST test images, one "
        "28x28 view (training/evaluate.py; 94.75 with flip test-time augmentation)",
        command="KERAS_BACKEND=tensorflow python training/fashion_mnist_recipe.py "
        "--data_dir=/usr/share/datasets/fashion-mnist --model_dir=runs/fmnist_r20_e42 "
        "--batch_size=128 --width_multiplier=1 --epochs=42 --time_budget=6600  # then "
        "cp runs/fmnist_r20_e42/fashion_mnist_wrn.h5 "
        "keras_preact/weights_files/preact_resnet20_fashion_mnist_e42.h5",
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
                f"Records for depth {depth}: {_names(candidates)}."
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
            + f". Available for this depth: {_names(candidates)}; all records: "
            f"{_names(RECORDS)}; or None, or a path to a weights file."
        )
    return found[0]


@dataclasses.dataclass(frozen=True)
class ResolvedWeights:
    """What `resolve` found for a `weights=` value; `load` takes it.

    Attributes:
        record: the record (a `"local"` one for an upstream file no record names), or None
            for a Keras 3 `.weights.h5` file, which `model.load_weights` reads.
        path: the local file `weights=` named, or None for a record to fetch.
        tensors: tensors `resolve` had to read already (a local `.t7` file, whose structure
            picks its layout), so `load` does not read the file twice; else None.
    """

    record: WeightsRecord | None
    path: str | None = None
    tensors: dict | None = None


def _local_record(path, fmt, model_name):
    """A record for a local file: the one whose file name it bears, or one made from its
    format, with the tensors read to make it (a `.t7` file's structure picks its layout)."""
    base = os.path.basename(path)
    for r in RECORDS:
        if r.file_name == base and r.format == fmt:
            return r, None
    layout, preprocessing = FORMAT_DEFAULTS.get(fmt, (None, None))
    tensors = None
    if fmt == "torch7":
        tensors = _read(path, fmt, downloaded=False)
        layout = "fb" if convert.torch7.preact_scope(tensors) == "shared" else "fb_legacy"
    record = WeightsRecord(
        model=model_name, tag="local", dataset="local", classes=None, input_shape=None,
        layout=LAYOUTS[layout] if layout else None, source=path, format=fmt,
        preprocessing=preprocessing, unit=None, shortcut=None,
    )  # fmt: skip
    return record, tensors


def _looks_like_a_path(weights):
    text = os.fspath(weights)
    return (
        not isinstance(weights, str)
        or os.path.sep in text
        or (os.path.altsep is not None and os.path.altsep in text)
        or text.lower().endswith(_FILE_SUFFIXES)
    )


def resolve(
    weights,
    *,
    model_name=None,
    depth=None,
    include_top=True,
    classes=None,
    unit="full_preact",
    shortcut="identity",
):
    """What `weights=` names, checked against the other builder arguments.

    Called by the builder before it builds anything. Returns None for `weights=None`, else a
    `ResolvedWeights`. Raises FileNotFoundError for a missing file and ValueError for an
    unknown record or one that contradicts the arguments (the layout is the builder's
    check: it knows its default).
    """
    if weights is None:
        return None
    if not isinstance(weights, (str, os.PathLike)):
        raise ValueError(
            f"Invalid weights={weights!r}: expected None, a file path or a record name. "
            f"Records: {_names(RECORDS)}."
        )
    if os.path.isfile(weights):
        path = os.fspath(weights)
        fmt = convert.detect_format(path)
        if fmt == "keras_native":
            return ResolvedWeights(record=None, path=path)
        record, tensors = _local_record(path, fmt, model_name)
        resolved = ResolvedWeights(record=record, path=path, tensors=tensors)
    elif _looks_like_a_path(weights):
        raise FileNotFoundError(
            f"weights={os.fspath(weights)!r}: file not found. Pass an existing weights file, "
            f"None, or a record name: {_names(RECORDS)}."
        )
    else:
        resolved = ResolvedWeights(record=get_record(weights, depth))
    record = resolved.record
    if record.dataset != "local" and record.depth != depth:
        raise ValueError(f"{record.name} is for {record.model}, not a depth-{depth} network.")
    if include_top and classes is not None and record.classes is not None:
        if classes != record.classes:
            raise ValueError(
                f"weights={record.name!r} have a {record.classes}-class classifier; got "
                f"include_top=True with classes={classes}. Pass include_top=False to use "
                "them with another number of classes."
            )
    if record.unit is not None and unit != record.unit:
        raise ValueError(
            f"weights={record.name!r} were trained with unit={record.unit!r}; got unit={unit!r}."
        )
    if record.shortcut is not None and kp_shortcuts.get(shortcut) != kp_shortcuts.get(
        record.shortcut
    ):
        raise ValueError(
            f"weights={record.name!r} were trained with shortcut={record.shortcut!r}; got "
            f"shortcut={shortcut!r}."
        )
    return resolved


# -- Fetching and verifying files ------------------------------------------------------


def file_digest(path, algorithm="sha256"):
    """Hex digest of a file, read in 1 MiB chunks."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def keras_home():
    """Keras' cache folder, as `keras.utils.get_file` picks it: `$KERAS_HOME`, else
    `~/.keras`."""
    return os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")


def _cache_dir(cache_dir):
    base = os.path.expanduser(cache_dir or keras_home())
    try:
        os.makedirs(os.path.join(base, "models"), exist_ok=True)
    except OSError:
        pass
    if not os.access(base, os.W_OK):  # keras.utils.get_file's own fallback
        base = os.path.join("/tmp", ".keras")
        os.makedirs(os.path.join(base, "models"), exist_ok=True)
    return os.path.join(base, "models")


@dataclasses.dataclass(frozen=True)
class DownloadPolicy:
    """How `fetch` downloads and how long it waits; `from_env()` gives the default.

    Attributes:
        timeout: seconds allowed for the connection and for each read: a server that stops
            sending for longer fails the attempt (`$KERAS_PREACT_DOWNLOAD_TIMEOUT`).
        retries: attempts in all, for errors that may pass (a timeout, a reset or refused
            connection, a body cut short, an HTTP 5xx, 408 or 429)
            (`$KERAS_PREACT_DOWNLOAD_RETRIES`).
        backoff: seconds before the second attempt, doubled before each next one
            (`$KERAS_PREACT_DOWNLOAD_BACKOFF`).
        lock_timeout: seconds a process waiting for another's download of the same file
            waits while that download makes no progress, before it gives up naming the lock
            file and its holder (`$KERAS_PREACT_LOCK_TIMEOUT`).
    """

    timeout: float = 30.0
    retries: int = 3
    backoff: float = 1.0
    lock_timeout: float = 120.0

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"DownloadPolicy.{field.name}={value!r}: expected a number > 0.")
        if not isinstance(self.retries, int):
            raise ValueError(f"DownloadPolicy.retries={self.retries!r}: expected an int >= 1.")

    @classmethod
    def from_env(cls):
        """The defaults, overridden by `$KERAS_PREACT_{DOWNLOAD_TIMEOUT, DOWNLOAD_RETRIES,
        DOWNLOAD_BACKOFF, LOCK_TIMEOUT}`."""
        values = {}
        for field, var in (("timeout", "DOWNLOAD_TIMEOUT"), ("retries", "DOWNLOAD_RETRIES"),
                           ("backoff", "DOWNLOAD_BACKOFF"), ("lock_timeout", "LOCK_TIMEOUT")):  # fmt: skip
            text = os.environ.get(f"KERAS_PREACT_{var}")
            if text is None:
                continue
            try:
                values[field] = int(text) if field == "retries" else float(text)
            except ValueError:
                raise ValueError(
                    f"KERAS_PREACT_{var}={text!r}: expected a number > 0"
                    + (" (an int)." if field == "retries" else ".")
                ) from None
        return cls(**values)


def _lock_holder(lock_path):
    """The pid the holder of `lock_path` wrote in it, or a phrase when it wrote none."""
    try:
        with open(lock_path) as f:
            pid = f.read(32).strip()
    except OSError:
        pid = ""
    return f"pid {pid}" if pid.isdigit() else "a process that wrote no pid"


def _partial_bytes(path):
    """Bytes downloaded so far by every download of `path` in progress."""
    total = 0
    for part in glob.glob(glob.escape(path) + ".part*"):
        with contextlib.suppress(OSError):
            total += os.path.getsize(part)
    return total


@contextlib.contextmanager
def _exclusive(path, policy):
    """A cross-process lock on `path + ".lock"`, so concurrent users of one cache share one
    download: the second waits for the first, then finds the finished file.

    The holder writes its pid in the lock file and removes the file before it lets go. A
    waiter polls; it takes the lock only if the file it locked is still the one at that path
    (a holder that removed it leaves a stale inode), and gives up after
    `policy.lock_timeout` seconds in which the holder's download did not grow.
    """
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, downloads still land atomically
        yield
        return
    lock_path = f"{path}.lock"
    waiting_since, seen = None, None
    while True:
        lock = open(lock_path, "a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            now, grown = time.monotonic(), _partial_bytes(path)
            if waiting_since is None:
                print(f"Waiting for {_lock_holder(lock_path)}, downloading {path} ...", flush=True)
            if waiting_since is None or grown != seen:
                waiting_since, seen = now, grown
            elif now - waiting_since > policy.lock_timeout:
                raise TimeoutError(
                    f"Gave up waiting for the lock {lock_path}, held by "
                    f"{_lock_holder(lock_path)}: its download of {path} made no progress for "
                    f"{policy.lock_timeout:g} s. If that process is gone or stuck, stop it or "
                    "delete the lock file; set KERAS_PREACT_LOCK_TIMEOUT to wait longer."
                ) from None
            time.sleep(min(0.1, policy.lock_timeout / 4))
            continue
        try:
            current = os.stat(lock_path)
            mine = os.fstat(lock.fileno())
            if (current.st_ino, current.st_dev) == (mine.st_ino, mine.st_dev):
                break
        except FileNotFoundError:
            pass
        lock.close()  # the holder before us removed this file: lock the new one
    try:
        lock.seek(0)
        lock.truncate()
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        yield
    finally:
        with contextlib.suppress(OSError):
            os.remove(lock_path)  # while still held: a waiter on this inode retries
        fcntl.flock(lock, fcntl.LOCK_UN)
        lock.close()


def _write_text_atomic(path, text):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _lasting(error):
    """Why a failed download will fail again within seconds, or None: a host name that does
    not resolve (no DNS on a firewalled cluster), a local file that is missing or unreadable."""
    reason = error.reason if isinstance(error, urllib.error.URLError) else error
    if isinstance(reason, socket.gaierror):
        return "the host name does not resolve"
    if isinstance(reason, (FileNotFoundError, NotADirectoryError, PermissionError)):
        return "a local file is missing or unreadable"
    return None


def _may_pass(error):
    """Whether a failed download is worth another attempt."""
    if isinstance(error, urllib.error.HTTPError):
        return error.code >= 500 or error.code in (408, 429)
    if _lasting(error) is not None:
        return False
    return isinstance(error, (OSError, http.client.HTTPException))


def _download_once(url, tmp, timeout):
    """One attempt: `url` into `tmp`; raises if fewer bytes than announced arrived."""
    with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as f:
        announced = response.headers.get("Content-Length")
        announced = int(announced) if announced else None
        # A progress bar redraws itself with "\r": in a log it is many lines of noise.
        tty = sys.stdout.isatty()
        bar = keras.utils.Progbar(announced, unit_name="B") if tty else None
        done, start = 0, time.monotonic()
        for chunk in iter(lambda: response.read(1 << 20), b""):
            f.write(chunk)
            done += len(chunk)
            if bar is not None:
                bar.update(done)
        f.flush()
        os.fsync(f.fileno())
    if announced is not None and done != announced:
        raise OSError(f"the server announced {announced} bytes and sent {done}")
    if not tty:
        print(f"Downloaded {done} bytes in {time.monotonic() - start:.1f} s.", flush=True)


def _download(url, dest, policy, advice):
    """Downloads `url` to a temporary name beside `dest` (a progress bar on a terminal, one
    line otherwise), with `policy`'s timeout and retries; returns the temporary path once
    the server's announced size (if any) has arrived in full. A failure raises OSError with
    `advice` (what the user can do instead) appended."""
    tmp = f"{dest}.part{os.getpid()}"
    print(f"Downloading {url} to {dest}", flush=True)
    for attempt in range(1, policy.retries + 1):
        try:
            _download_once(url, tmp, policy.timeout)
            return tmp
        except BaseException as e:
            if os.path.exists(tmp):
                os.remove(tmp)
            if not isinstance(e, Exception):
                raise
            if attempt < policy.retries and _may_pass(e):
                wait = policy.backoff * 2 ** (attempt - 1)
                print(f"Download attempt {attempt} failed ({e}); retrying in {wait:g} s.",
                      flush=True)  # fmt: skip
                time.sleep(wait)
                continue
            lasting = _lasting(e)
            raise OSError(
                f"Download of {url} failed after {attempt} attempt{'s' * (attempt > 1)}"
                + (f" (not retried: {lasting})" if lasting and policy.retries > 1 else "")
                + f": {e}. Nothing was cached. {advice}"
            ) from e
    raise AssertionError("unreachable")


#: The largest safetensors header accepted (the safetensors format's own limit).
_MAX_SAFETENSORS_HEADER = 100_000_000


def _incomplete(path, fmt):
    """Why `path` is not a complete `fmt` file, by the format's own cheap check, or None.

    A safetensors header must be a JSON object of tensor entries whose data offsets cover
    the file exactly; an HDF5 file must open. (A Torch7 file has no cheap check: its
    conversion reads it whole, and `load` re-fetches a downloaded file that fails.)"""
    try:
        if fmt == "timm_safetensors":
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    return f"{size} bytes, shorter than the 8-byte header length"
                (length,) = struct.unpack("<Q", head)
                if length > min(size - 8, _MAX_SAFETENSORS_HEADER):
                    return f"a header length of {length} in a file of {size} bytes"
                text = f.read(length)
            try:
                header = json.loads(text)
            except (ValueError, RecursionError):  # an HTML page saved by a proxy, ...
                return f"its header is not JSON (it starts {text[:40]!r})"
            if not isinstance(header, dict):
                return f"its header is a JSON {type(header).__name__}, not an object"
            end = 0
            for key, entry in header.items():
                if key == "__metadata__":
                    continue
                offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
                if not (isinstance(offsets, list) and len(offsets) == 2
                        and all(type(o) is int and o >= 0 for o in offsets)
                        and offsets[0] <= offsets[1]):  # fmt: skip
                    return f"the header entry {key!r} has no valid data_offsets"
                end = max(end, offsets[1])
            if size != 8 + length + end:
                return f"{size} bytes, the header describes {8 + length + end}"
        elif fmt in ("keras_h5", "keras_preact_h5"):
            h5py = require("h5py")

            with h5py.File(path, "r"):
                pass
    except OSError as e:
        return f"it cannot be read ({e})"
    return None


def _set_aside(path, why):
    """Moves a cached file that failed its check to `<file>.bad` (replacing an older one)
    and removes what was derived from it, saying which, why and where it went; returns the
    new path. Never deleted: it may be a file a user copied there by hand."""
    bad = f"{path}.bad"
    print(f"Removing the cached weights file {path}: {why}. Moved it to {bad}; downloading "
          "it again.", flush=True)  # fmt: skip
    try:
        if os.path.isfile(bad) or os.path.islink(bad):
            os.remove(bad)
        os.replace(path, bad)
    except OSError as e:
        raise OSError(
            f"The cached weights file {path} failed its check ({why}) and cannot be moved to "
            f"{bad}: {e}. Move or delete it, then call again."
        ) from e
    for p in (f"{path}.sha256", f"{path}.keras_preact.h5"):
        if os.path.exists(p):
            os.remove(p)
    return bad


def _recorded_sha256(seen):
    """The sha256 recorded in `seen` (`<file>.sha256`), or None if it holds none."""
    try:
        with open(seen, "rb") as f:
            words = f.read(200).split()
    except OSError:
        return None
    word = words[0].decode("ascii", "replace") if words else ""
    return word if len(word) == 64 and all(c in "0123456789abcdef" for c in word) else None


def _cached_problem(path, record):
    """Why the cached `path` is not the complete, verified file of `record`, or None if it
    is (then its sha256 is recorded beside it, if it was not yet)."""
    seen = f"{path}.sha256"
    try:
        expected = _recorded_sha256(seen)
        if record.file_hash:
            actual = file_digest(path, record.hash_algorithm)
            if actual != record.file_hash:
                return (
                    f"{record.hash_algorithm} {actual} where {record.file_hash} is expected: "
                    f"it is not the published file of {record.name} (a wrong file, or a "
                    "corrupt copy)"
                )
        elif expected is not None:
            actual = file_digest(path)
            if actual != expected:
                return f"sha256 {actual}, but it was {expected} when downloaded"
        else:
            why = _incomplete(path, record.format)
            if why is not None:
                return f"not a complete {record.format} file: {why}"
            # cached before hashes were recorded (or its record was lost): record it now
            _write_text_atomic(seen, f"{file_digest(path)}  {os.path.basename(path)}\n")
    except OSError as e:  # a directory, no permission, ...
        return f"it cannot be read ({e})"
    return None


#: The environment variable that redirects weight downloads to a mirror: a base URL
#: (`https://`, `http://`, `file://`) or a local folder holding the files under their
#: records' `file_name`.
MIRROR_ENV = "KERAS_PREACT_WEIGHTS_MIRROR"


def source_url(record, mirror=None):
    """The URL `fetch` downloads `record`'s file from.

    Without a mirror (`mirror`, default `$KERAS_PREACT_WEIGHTS_MIRROR`; unset or empty:
    none) that is `record.url`. With one, it is the record's `file_name` under the mirror:
    `<base URL>/<file_name>` for an HTTP(S) URL, `file://<folder>/<file_name>` for a folder
    or a `file://` URL, whose folder must exist and hold the file. A mirrored file is
    checked exactly as a download from `record.url` would be (the published hash, or the
    format's completeness check).
    """
    mirror = os.environ.get(MIRROR_ENV) if mirror is None else mirror
    if not mirror:
        return record.url
    name = record.file_name or os.path.basename(urllib.parse.urlsplit(record.url).path)
    parts = urllib.parse.urlsplit(mirror)
    scheme = parts.scheme.lower()
    if scheme in ("http", "https"):
        return f"{mirror.rstrip('/')}/{urllib.parse.quote(name)}"
    if scheme == "file" and parts.netloc not in ("", "localhost"):
        raise ValueError(
            f"{MIRROR_ENV}={mirror!r}: a file:// URL names a local folder "
            "(file:///shared/weights); mount the share and name its folder."
        )
    if scheme not in ("", "file") and len(scheme) > 1:  # (one letter: a Windows drive)
        raise ValueError(
            f"{MIRROR_ENV}={mirror!r}: expected an https://, http:// or file:// base URL or a "
            "local folder."
        )
    # A file:// mirror is checked as its folder: a missing file is named with the record's URL.
    folder = urllib.request.url2pathname(parts.path) if scheme == "file" else mirror
    folder = os.path.abspath(os.path.expanduser(folder))
    if not os.path.isdir(folder):
        raise FileNotFoundError(
            f"{MIRROR_ENV}={mirror!r}: no such folder. Set it to the folder or base URL that "
            "holds the weights files under their records' file names, or unset it to "
            "download from the records' own URLs."
        )
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"The weights mirror {folder} ({MIRROR_ENV}) has no {name}, the file of "
            f"{record.name}: {path} is not a file. Copy it there from {record.url}, or unset "
            f"{MIRROR_ENV} to download from that URL."
        )
    return pathlib.Path(path).as_uri()


def fetch(record, cache_dir=None, policy=None):
    """The local path of `record`'s file: shipped, or downloaded into the Keras cache.

    A download goes to a temporary name and is renamed into place only when complete and
    verified: the published hash where there is one, otherwise the server's announced size
    and the format's completeness check. The sha256 of the file is then recorded beside it
    (`<file>.sha256`), so every later use verifies against it. A cross-process lock makes
    concurrent users share one download. A cached file that fails its check (a partial,
    corrupt or tampered file, a wrong file copied there by hand, or one that cannot be read
    at all) is moved aside to `<file>.bad`, with a message naming it and its hash, and
    downloaded again. A failed download says what to do offline. `policy` (a
    `DownloadPolicy`; default `DownloadPolicy.from_env()`) sets the timeouts, retries and
    the lock wait.
    `$KERAS_PREACT_WEIGHTS_MIRROR` redirects the download to a mirror URL or a local
    folder (`source_url`); the checks stay the same.
    """
    policy = policy or DownloadPolicy.from_env()
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
    _check_file_name(record)  # again: a record changed after it was made
    path = os.path.join(_cache_dir(cache_dir), record.file_name)
    with _exclusive(path, policy):
        set_aside = ""
        if os.path.exists(path):
            why = _cached_problem(path, record)
            if why is None:
                return path
            bad = _set_aside(path, why)
            set_aside = f"The file that was in the cache had {why}; it was moved to {bad}. "
        url = source_url(record)
        again = "call again to download it anew"
        if url != record.url:
            again = (
                f"the mirror's copy ({MIRROR_ENV}) is not the published file of "
                f"{record.name} ({record.url}): replace it"
            )
        for stale in glob.glob(glob.escape(path) + ".part*"):  # killed downloads: no one
            os.remove(stale)  # else can be writing them while we hold the lock
        advice = set_aside + _offline_advice(record, path, mirrored=url != record.url)
        tmp = _download(url, path, policy, advice)
        try:
            if record.file_hash:
                actual = file_digest(tmp, record.hash_algorithm)
                if actual != record.file_hash:
                    raise ValueError(
                        f"Hash mismatch for {url}: expected {record.hash_algorithm} "
                        f"{record.file_hash}, got {actual}. Nothing was cached; {again}."
                    )
            else:
                why = _incomplete(tmp, record.format)
                if why is not None:
                    raise ValueError(
                        f"The download of {url} is not a complete {record.format} file "
                        f"({why}). Nothing was cached; {again}."
                    )
            digest = file_digest(tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        _write_text_atomic(f"{path}.sha256", f"{digest}  {os.path.basename(path)}\n")
    return path


def _offline_advice(record, path, mirrored):
    """What a user can do when the file of `record` cannot be downloaded into `path`."""
    name = os.path.basename(path)
    check = f" (its {record.hash_algorithm} must be {record.file_hash})" if record.file_hash else ""
    by_hand = (
        f"copy the file published at {record.url}{check} to {path} (the cache, under the "
        f"record's file name), or pass its path: weights='/path/to/{name}' (docs/weights.md, "
        "'Offline use')."
    )
    if mirrored:
        return (
            f"Does the mirror ({MIRROR_ENV}) hold {name}? Copy it there from {record.url}, "
            f"or unset {MIRROR_ENV} to download from that URL; or {by_hand}"
        )
    return (
        f"Offline, or behind a firewall or proxy? Point {MIRROR_ENV} at a folder or URL that "
        f"holds {name} (export {MIRROR_ENV}=/shared/weights, or file:///shared/weights, or "
        f"https://mirror.example.org/keras-preact), or {by_hand}"
    )


def _read(path, fmt, *, downloaded, expected=None):
    """`convert.read_tensors`, with any failure to read turned into a ValueError that names
    the file and says what to do. A declared shape the model has no room for
    (`convert.ShapeError`) is raised as it is: the file may be fine, for another model."""
    try:
        return convert.read_tensors(path, fmt, expected=expected)
    except (convert.ShapeError, MissingDependency):
        raise
    except Exception as e:  # h5py's OSError, safetensors' SafetensorError, a KeyError, ...
        what = "Delete it to download it again" if downloaded else "Re-export or re-download it"
        raise ValueError(
            f"Cannot read the weights file {path} ({fmt}): {type(e).__name__}: {e}. The file "
            f"is truncated or corrupt, or not a {fmt} file. {what}."
        ) from e


def expected_shapes(model):
    """`{layer: {variable: shape}}` of `model`: what a weights file must declare for it."""
    return {
        layer.name: {w.name: tuple(w.shape) for w in layer.weights}
        for layer in model.layers
        if layer.weights
    }


def converted_tensors(path, fmt, cache=False, expected=None):
    """The neutral tensors of `path`; with `cache`, reuses/writes `<path>.keras_preact.h5`.

    `expected` (`expected_shapes(model)`) has HDF5 files checked against the model before
    their data is read."""
    if fmt in ("keras_h5", "keras_preact_h5") or not cache:
        return _read(path, fmt, downloaded=cache, expected=expected)
    cached = f"{path}.keras_preact.h5"
    if os.path.exists(cached) and os.path.getmtime(cached) >= os.path.getmtime(path):
        try:
            return _read(cached, "keras_h5", downloaded=True, expected=expected)
        except convert.ShapeError:
            raise
        except ValueError as e:  # a damaged conversion cache: convert again
            print(f"Ignoring the unreadable conversion cache {cached}: {e}", flush=True)
    tensors = _read(path, fmt, downloaded=True)
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


def _check_declared_sizes(path, largest):
    """Raises if an HDF5 dataset of `path` declares more elements than `largest` (the
    model's size: a scanned net's stacked variable holds several units' weights), before
    anything is read: Keras reads each dataset whole before it compares shapes, and a file
    of a few KB can declare gigabytes."""
    h5py = require("h5py")

    try:
        f = h5py.File(path, "r")
    except OSError:
        return  # not HDF5 or unreadable: model.load_weights says so, naming the file
    too_big = []

    def visit(name, obj):
        if isinstance(obj, h5py.Dataset) and not too_big and math.prod(obj.shape) > largest:
            too_big.append((name, tuple(obj.shape)))

    with f:
        f.visititems(visit)
    if too_big:
        name, shape = too_big[0]
        raise ValueError(
            f"Cannot load {path}: its dataset {name} declares shape {shape}, more elements "
            f"than the whole model has ({largest}); not read. The file is "
            "corrupt, hostile or for another architecture. No variable was changed."
        )


def load_weights_file(model, path):
    """`model.load_weights(path)` for a Keras 3 `.weights.h5`, all or nothing.

    Keras assigns variables one by one while it reads the file, so a file of another
    architecture can change some variables before it raises. Here every variable of the
    model (and of its optimizer, which `save_weights` also writes) is copied first and
    restored if the load fails; the error names the file.
    """
    variables = list(model.variables)
    optimizer = getattr(model, "optimizer", None)
    if optimizer is not None:
        variables += list(optimizer.variables)
    _check_declared_sizes(path, sum(math.prod(v.shape) for v in variables))
    saved = [keras.ops.convert_to_numpy(v) for v in variables]
    try:
        model.load_weights(path)
    except Exception as e:
        for v, value in zip(variables, saved):
            v.assign(value)
        first_line = str(e).strip().split("\n")[0]  # Keras appends whole variable values
        raise ValueError(
            f"Cannot load {path} into model {model.name!r}: {type(e).__name__}: "
            f"{first_line} No variable was changed. Is the file for another architecture "
            "(depth, unit, shortcut, layout, classes), or truncated?"
        ) from e


def load(model, resolved):
    """Loads the weights `resolve` found into the built `model`."""
    record = resolved.record
    if record is None:
        load_weights_file(model, resolved.path)
        return
    if resolved.path is not None:
        path, downloaded = resolved.path, False
    else:
        path, downloaded = fetch(record), record.shipped is None
    tensors = resolved.tensors
    expected = expected_shapes(model)
    if tensors is None:
        try:
            tensors = converted_tensors(path, record.format, cache=downloaded, expected=expected)
        except ValueError as e:
            if not downloaded or isinstance(e, convert.ShapeError):
                raise
            # A cached download that passed its checks but does not read (a Torch7 file
            # cut short before sizes were checked): remove it and download it once more.
            _set_aside(path, f"it cannot be read ({e.__cause__ or e})")
            path = fetch(record)
            tensors = converted_tensors(path, record.format, cache=True, expected=expected)
    if record.format == "torch7":
        scope = convert.torch7.preact_scope(tensors)
        if scope != record.layout.preact_scope:
            raise ValueError(
                f"{path} has the preact_scope={scope!r} structure; {record.name} expects "
                f"preact_scope={record.layout.preact_scope!r}. Pass a copy under another "
                "file name: a local .t7 file no record names takes its layout from its "
                "structure."
            )
    assign(model, tensors, source=f"{record.name} ({os.path.basename(path)})")
