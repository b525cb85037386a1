"""Hostile and damaged inputs: every reader and the weights cache fail with a clear error
naming the file, run no code from a file, allocate nothing a file merely declares, and never
hang. Tiny files, local servers on 127.0.0.1 with sub-second timeouts.
"""

import contextlib
import fcntl
import gzip
import http.server
import io
import os
import pickle
import re
import shutil
import struct
import tarfile
import threading
import time
import tracemalloc

import h5py
import keras
import numpy as np
import pytest
from model_test_utils import REPO
from model_test_utils import pipeline as run_pipeline

from keras_preact import convert
from keras_preact import weights as kp_weights
from keras_preact.data import cifar_files, idx

FIXTURES = os.path.join(REPO, "tests", "fixtures")
SAFETENSORS = os.path.join(FIXTURES, "timm_basic.safetensors")
RETRIES = 2


@pytest.fixture
def fast(monkeypatch):
    """Downloads and lock waits that give up in well under a second (the environment route a
    user takes; `fetch(policy=...)` is the argument route)."""
    for name, value in (("DOWNLOAD_TIMEOUT", "0.3"), ("DOWNLOAD_RETRIES", str(RETRIES)),
                        ("DOWNLOAD_BACKOFF", "0.05"), ("LOCK_TIMEOUT", "0.3")):  # fmt: skip
        monkeypatch.setenv(f"KERAS_PREACT_{name}", value)


def _with_deadline(fn, seconds):
    """`fn()` in a thread: returns what it raised (None if nothing), or fails the test if it
    still runs after `seconds` (the old code waited forever)."""
    outcome = {}

    def run():
        try:
            fn()
            outcome["error"] = None
        except Exception as e:  # the test inspects it
            outcome["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds} s"
    return outcome["error"]


def _error_names(error, *parts):
    """`error` is a ValueError or an OSError whose message holds every part."""
    assert isinstance(error, (ValueError, OSError)), repr(error)
    for part in parts:
        assert str(part) in str(error), (part, str(error))


# -- TFRecord shards (items 6, 17) -------------------------------------------------------------


def _tiny_jpeg():
    tf = pytest.importorskip("tensorflow")
    return tf.io.encode_jpeg(np.full((8, 8, 3), 128, np.uint8)).numpy()


def _write_shards(folder, split, labels_per_shard):
    from keras_preact.data import tfdata

    folder.mkdir(exist_ok=True)
    jpeg = _tiny_jpeg()
    paths = []
    for i, labels in enumerate(labels_per_shard):
        path = str(folder / f"{split}-{i:05d}-of-{len(labels_per_shard):05d}")
        tfdata.write_imagenet_tfrecords(path, [jpeg] * len(labels), labels)
        paths.append(path)
    return paths


@pytest.mark.parametrize("pipeline", ["imagenet_train", "encoded_eval"])
def test_a_deleted_shard_stops_iteration_with_an_error_naming_it(tmp_path, pipeline):
    from keras_preact.data import tfdata

    split = "train" if pipeline == "imagenet_train" else "validation"
    paths = _write_shards(tmp_path / "shards", split, [[1, 2], [3, 4], [5, 6]])
    if pipeline == "imagenet_train":
        ds = run_pipeline(tfdata.imagenet_dataset,
            source="tfrecord", split="train", data_dir=str(tmp_path / "shards"), batch_size=2,
            training=True, image_size=8, shuffle_buffer=2,
        )  # fmt: skip
    else:
        ds = run_pipeline(
            tfdata.encoded_records,
            source="tfrecord",
            split="validation",
            data_dir=str(tmp_path / "shards"),
        )
    os.remove(paths[1])
    error = _with_deadline(lambda: [None for _ in ds], 30)  # it spun forever
    assert error is not None and paths[1] in str(error), error


def test_imagenet_labels_default_to_the_1000_classes(tmp_path):
    from keras_preact.data import tfdata

    # 1-based labels: 0, 4999, 2**40 and 999 after label_offset=1.
    _write_shards(tmp_path / "shards", "validation", [[1, 5000, 2**40 + 1, 1000]])
    counter = tfdata.SkipCounter()
    ds = run_pipeline(tfdata.imagenet_dataset,
        source="tfrecord", split="validation", data_dir=str(tmp_path / "shards"), batch_size=4,
        training=False, image_size=8, eval_resize=8, counter=counter,
    )  # fmt: skip
    labels = sorted(int(y) for _, batch in ds for y in batch)
    assert labels == [0, 999]
    assert counter.counts()["bad_label"] == 2


# -- Torch7 (item 10) --------------------------------------------------------------------------


def _patched_t7(tmp_path, which=0, *, sizes=None, strides=None, offset=None, ndim=None,
                storage_size=None):  # fmt: skip
    """The tiny fb fixture with the header of its `which`-th FloatTensor (and storage) changed."""
    raw = bytearray(open(os.path.join(FIXTURES, "fb_preresnet_tiny.t7"), "rb").read())
    at = [m.end() for m in re.finditer(rb"torch\.FloatTensor", raw)][which]
    (n,) = struct.unpack_from("<i", raw, at)
    if sizes is not None:
        struct.pack_into(f"<{n}q", raw, at + 4, *sizes)
    if strides is not None:
        struct.pack_into(f"<{n}q", raw, at + 4 + 8 * n, *strides)
    if offset is not None:
        struct.pack_into("<q", raw, at + 4 + 16 * n, offset)
    if ndim is not None:
        struct.pack_into("<i", raw, at, ndim)
    if storage_size is not None:
        storage = raw.index(b"torch.FloatStorage", at) + len(b"torch.FloatStorage")
        struct.pack_into("<q", raw, storage, storage_size)
    path = tmp_path / "hostile.t7"
    path.write_bytes(bytes(raw))
    return str(path)


def _first_tensor_shape():
    raw = open(os.path.join(FIXTURES, "fb_preresnet_tiny.t7"), "rb").read()
    at = raw.index(b"torch.FloatTensor") + len(b"torch.FloatTensor")
    (n,) = struct.unpack_from("<i", raw, at)
    return list(struct.unpack_from(f"<{n}q", raw, at + 4))


@pytest.mark.parametrize(
    "change",
    [
        "stride_past_storage", "size_past_storage", "offset_past_storage", "huge_stride",
        "negative_stride", "negative_size", "too_many_dims", "storage_past_file",
    ],
)  # fmt: skip
def test_torch7_tensor_outside_its_storage_is_refused(tmp_path, change):
    shape = _first_tensor_shape()  # the stem conv weight, (out, in, kh, kw)
    contiguous = [int(np.prod(shape[i + 1 :])) for i in range(len(shape))]
    patch = {
        "stride_past_storage": dict(strides=[contiguous[0] * 2, *contiguous[1:]]),
        "size_past_storage": dict(sizes=[shape[0] * 4, *shape[1:]]),
        "offset_past_storage": dict(offset=5),
        "huge_stride": dict(strides=[1 << 40, *contiguous[1:]]),
        "negative_stride": dict(strides=[-contiguous[0], *contiguous[1:]]),
        "negative_size": dict(sizes=[-1, *shape[1:]]),
        "too_many_dims": dict(ndim=1 << 20),
        "storage_past_file": dict(storage_size=1 << 40),
    }[change]
    path = _patched_t7(tmp_path, **patch)
    with pytest.raises(ValueError) as excinfo:
        convert.read_tensors(path, "torch7")
    _error_names(excinfo.value, path, "torch.Float")


# -- HDF5 files declaring huge datasets (item 11) ----------------------------------------------

HUGE = (32768, 32768)  # 4.3 GB of float32 declared by a file of a few KB


@pytest.fixture(scope="module")
def tiny_model():
    """Two layers named as in the family (the readers key tensors by layer name)."""
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, name="conv1_conv")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(10, name="predictions")(x))


@contextlib.contextmanager
def _peak_allocation(limit_bytes):
    """Fails if the block's numpy/Python allocations peak above `limit_bytes`."""
    tracemalloc.start()
    try:
        yield
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < limit_bytes, f"allocated {peak / 2**20:.0f} MiB"


def _huge_keras_h5(path, tensors, huge_layer, huge_var):
    convert.write_tensors(path, tensors)
    with h5py.File(path, "r+") as f:
        name = f"{huge_layer}/{huge_var}:0"
        del f[huge_layer][name]
        f[huge_layer].create_dataset(name, shape=HUGE, dtype="f4")  # never written: no space
    return path


def _model_tensors(model):
    return {
        layer.name: {w.name: keras.ops.convert_to_numpy(w) for w in layer.weights}
        for layer in model.layers
        if layer.weights
    }


@pytest.mark.parametrize("where", ["conv1_conv/kernel", "predictions/bias"])
def test_huge_declared_h5_dataset_is_refused_before_reading(tmp_path, tiny_model, where):
    layer, var = where.split("/")
    path = _huge_keras_h5(str(tmp_path / "w.h5"), _model_tensors(tiny_model), layer, var)
    assert os.path.getsize(path) < 1 << 20
    resolved = kp_weights.resolve(path, model_name="PreActResNet10", depth=10, classes=10)
    with _peak_allocation(64 << 20), pytest.raises(ValueError) as excinfo:
        kp_weights.load(tiny_model, resolved)
    _error_names(excinfo.value, path, f"{layer}/{var}:0", str(HUGE))


def test_huge_declared_dataset_in_a_keras3_weights_file_is_refused(tmp_path, tiny_model):
    path = str(tmp_path / "w.weights.h5")
    tiny_model.save_weights(path)
    with h5py.File(path, "r+") as f:
        names = []
        f.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
        del f[names[0]]
        f.create_dataset(names[0], shape=HUGE, dtype="f4")
    before = [keras.ops.convert_to_numpy(w) for w in tiny_model.weights]
    with _peak_allocation(64 << 20), pytest.raises(ValueError) as excinfo:
        kp_weights.load_weights_file(tiny_model, path)
    _error_names(excinfo.value, path, names[0])
    for b, w in zip(before, tiny_model.weights):
        np.testing.assert_array_equal(b, keras.ops.convert_to_numpy(w))


# -- The weights cache and downloads (items 12, 13, 18, 24) ------------------------------------


@pytest.fixture
def server(tmp_path):
    """`(folder, base url)` of a static HTTP server on 127.0.0.1; records the requests."""
    root = tmp_path / "www"
    root.mkdir()
    gets = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root), **kwargs)

        def do_GET(self):
            gets.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.gets = gets
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}", httpd
    httpd.shutdown()
    httpd.server_close()


def _record(url, file_name="served.safetensors", **kwargs):
    return kp_weights.WeightsRecord(
        model="PreActResNet12", tag="t", dataset="test", classes=10, input_shape=None,
        layout=None, format="timm_safetensors", url=url, file_name=file_name, **kwargs,
    )  # fmt: skip


def _safetensors_header(header):
    text = header if isinstance(header, bytes) else str.encode(__import__("json").dumps(header))
    return struct.pack("<Q", len(text)) + text


BAD_CACHED = {
    "html": b"<!DOCTYPE html><html><body>Proxy authentication required</body></html>\n" * 4,
    "header_length_2_62": struct.pack("<Q", 1 << 62) + b"{}",
    "header_longer_than_file": struct.pack("<Q", 1000) + b"{}",
    "json_list_header": _safetensors_header([1, 2, 3]),
    "json_string_entries": _safetensors_header({"a": "b"}),
    "offsets_not_ints": _safetensors_header({"a": {"dtype": "F32", "data_offsets": ["x", 2]}}),
    "not_json": _safetensors_header(b"\xff\xfe not json"),
    "empty": b"",
}


@pytest.mark.parametrize("bad", sorted(BAD_CACHED))
def test_unreadable_cached_file_is_named_discarded_and_fetched_again(
    tmp_path, server, capsys, fast, bad
):
    root, base, _ = server
    shutil.copy(SAFETENSORS, root / "m.safetensors")
    cached = tmp_path / "cache" / "models" / "served.safetensors"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(BAD_CACHED[bad])
    path = kp_weights.fetch(_record(f"{base}/m.safetensors"), cache_dir=tmp_path / "cache")
    assert open(path, "rb").read() == open(SAFETENSORS, "rb").read()
    assert f"Removing the cached weights file {cached}" in capsys.readouterr().out


class _Stalling(http.server.BaseHTTPRequestHandler):
    """Announces 100 kB, sends 1 kB, then stalls until the test ends."""

    def do_GET(self):
        self.server.gets.append(self.path)
        self.send_response(200)
        self.send_header("Content-Length", str(100_000))
        self.end_headers()
        self.wfile.write(b"\0" * 1024)
        self.wfile.flush()
        self.server.release.wait(10)

    def log_message(self, *args):
        pass


@pytest.fixture
def stalling():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Stalling)
    httpd.gets, httpd.release = [], threading.Event()
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/m.safetensors", httpd
    httpd.release.set()
    httpd.shutdown()
    httpd.server_close()


def test_a_stalled_download_times_out_retries_and_caches_nothing(tmp_path, stalling, fast):
    url, httpd = stalling
    start = time.monotonic()
    error = _with_deadline(lambda: kp_weights.fetch(_record(url), cache_dir=tmp_path), 10)
    assert time.monotonic() - start < 5
    assert isinstance(error, OSError), error
    _error_names(error, url, f"{RETRIES} attempts", "Nothing was cached")
    assert len(httpd.gets) == RETRIES
    assert os.listdir(tmp_path / "models") == []  # no .part, no .lock


def test_a_lock_waiter_gives_up_naming_the_lock_and_its_holder(tmp_path, server, fast):
    _, base, httpd = server
    models = tmp_path / "models"
    models.mkdir()
    lock_path = models / "served.safetensors.lock"
    with open(lock_path, "w") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX)
        holder.write("4242\n")
        holder.flush()
        record = _record(f"{base}/m.safetensors")
        error = _with_deadline(lambda: kp_weights.fetch(record, cache_dir=tmp_path), 5)
    assert isinstance(error, TimeoutError), error
    assert str(lock_path) in str(error) and "4242" in str(error), error
    assert httpd.gets == []


def test_download_removes_its_lock_and_prints_few_lines_without_a_tty(
    tmp_path, server, capsys, fast
):
    from safetensors.numpy import save_file

    root, base, _ = server
    save_file({"x": np.zeros(3 << 20, np.float32)}, str(root / "m.safetensors"))  # 12 MB
    path = kp_weights.fetch(_record(f"{base}/m.safetensors"), cache_dir=tmp_path)
    assert sorted(os.listdir(tmp_path / "models")) == [
        "served.safetensors", "served.safetensors.sha256"
    ]  # fmt: skip
    out = capsys.readouterr().out
    assert "\r" not in out and "\x1b[" not in out, repr(out[:300])
    assert len(out.strip().splitlines()) <= 3, out
    assert path.endswith("served.safetensors")


def test_an_unreachable_server_error_gives_the_offline_route(tmp_path, fast):
    with socket_closed_port() as port:
        record = _record(f"http://127.0.0.1:{port}/m.safetensors")
        with pytest.raises(OSError) as excinfo:
            kp_weights.fetch(record, cache_dir=tmp_path)
    cached = tmp_path / "models" / "served.safetensors"
    _error_names(excinfo.value, record.url, cached, "weights=", "docs/weights.md")


@contextlib.contextmanager
def socket_closed_port():
    """A port on 127.0.0.1 nothing listens on (bound, never listening)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


@pytest.mark.parametrize(
    "file_name", ["../escape.safetensors", "/tmp/abs.safetensors", "a/b.safetensors",
                  "a\\b.safetensors", "..", ".", ""],
)  # fmt: skip
def test_a_file_name_leaving_the_cache_is_refused(tmp_path, file_name):
    with pytest.raises(ValueError) as excinfo:
        _record("http://127.0.0.1:9/m.safetensors", file_name=file_name)
    _error_names(excinfo.value, "test:t", repr(file_name))


def test_record_lists_in_errors_name_each_record_once():
    with pytest.raises(ValueError) as excinfo:
        kp_weights.get_record("imagenet:nope")
    for listed in re.findall(r"\[([^\]]*)\]", str(excinfo.value)):
        names = re.findall(r"'([^']*)'", listed)
        assert len(names) == len(set(names)), listed


# -- CIFAR and IDX files (items 14, 15, 16) ----------------------------------------------------


def _cifar10_folder(tmp_path, n=3, labels=None, protocol=2):
    """A cifar-10-batches-py folder in the archive's own format (pickle protocol 2)."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            b"batch_label": b"batch",
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"labels": list(labels if labels is not None else rng.integers(0, 10, n).tolist()),
            b"filenames": [b"x.png"] * n,
        }
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=protocol)
    return folder


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_cifar_pickle_that_runs_code_is_refused(tmp_path):
    folder = _cifar10_folder(tmp_path)
    marker = tmp_path / "pwned"
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": _RunsCode(marker), b"labels": [0]}, f, protocol=2)
    with pytest.raises(ValueError) as excinfo:
        cifar_files.load_cifar("cifar10", str(tmp_path))
    assert not marker.exists()
    _error_names(excinfo.value, folder / "test_batch", "system")


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_real_format_cifar_batches_still_load(tmp_path, protocol):
    _cifar10_folder(tmp_path, n=4, labels=[0, 9, 3, 3], protocol=protocol)
    (x, y), (xt, yt) = cifar_files.load_cifar("cifar10", str(tmp_path))
    assert x.shape == (20, 32, 32, 3) and x.dtype == np.uint8 and xt.shape == (4, 32, 32, 3)
    assert yt.tolist() == [0, 9, 3, 3]


def test_write_cifar_round_trips_with_empty_batch_files(tmp_path):
    # Three training images over five batch files: two hold an empty `data`, which protocol 2
    # pickles with `bytes()`.
    images = np.zeros((3, 32, 32, 3), np.uint8)
    cifar_files.write_cifar("cifar10", str(tmp_path), (images, [1, 2, 3]), (images, [4, 5, 6]))
    (x, y), (xt, yt) = cifar_files.load_cifar("cifar10", str(tmp_path))
    assert x.shape == (3, 32, 32, 3) and y.tolist() == [1, 2, 3] and yt.tolist() == [4, 5, 6]


def _fashion_folder(tmp_path, labels=(1, 2, 3)):
    folder = tmp_path / "fmnist"
    folder.mkdir(exist_ok=True)
    labels = np.asarray(labels, np.uint8)
    images = np.zeros((len(labels), 28, 28), np.uint8)
    for prefix in ("train", "t10k"):
        idx.write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images)
        idx.write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return folder


def _cut(data, at):
    return data[:at]


def _flip(data, at):
    out = bytearray(data)
    out[at] ^= 0xFF
    return bytes(out)


IDX_DAMAGE = {
    "gz_cut_in_header": lambda d: _cut(d, 5),
    "gz_cut_midway": lambda d: _cut(d, len(d) // 2),
    "gz_cut_last_byte": lambda d: _cut(d, len(d) - 1),
    "gz_crc_flipped": lambda d: _flip(d, len(d) - 6),
    "gz_size_flipped": lambda d: _flip(d, len(d) - 2),
    "gz_deflate_flipped": lambda d: _flip(d, 12),
    "idx_cut": lambda d: gzip.compress(gzip.decompress(d)[:-3]),
    "idx_ndim_huge": lambda d: gzip.compress(bytes([0, 0, 8, 255]) + gzip.decompress(d)[4:]),
    "idx_dims_huge": lambda d: gzip.compress(
        bytes([0, 0, 8, 3]) + b"\xff" * 12 + gzip.decompress(d)[16:]
    ),
    "empty": lambda d: b"",
}


@pytest.mark.parametrize("damage", sorted(IDX_DAMAGE))
def test_a_damaged_idx_file_error_names_it(tmp_path, damage):
    folder = _fashion_folder(tmp_path)
    path = folder / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(IDX_DAMAGE[damage](path.read_bytes()))
    with pytest.raises((ValueError, OSError)) as excinfo:
        idx.load_fashion_mnist(str(folder))
    _error_names(excinfo.value, path)


def _pickled(obj):
    return pickle.dumps(obj, protocol=2)


CIFAR_DAMAGE = {
    "cut_midway": lambda d: _cut(d, len(d) // 2),
    "cut_to_2_bytes": lambda d: _cut(d, 2),
    "empty": lambda d: b"",
    "first_opcode_flipped": lambda d: _flip(d, 0),
    "stop_flipped": lambda d: _flip(d, len(d) - 1),
    "not_a_dict": lambda d: _pickled([1, 2, 3]),
    "no_labels": lambda d: _pickled({b"data": np.zeros((2, 3072), np.uint8)}),
    "no_data": lambda d: _pickled({b"labels": [1, 2]}),
    "data_wrong_width": lambda d: _pickled(
        {b"data": np.zeros((2, 7), np.uint8), b"labels": [1, 2]}
    ),
    "labels_count_differs": lambda d: _pickled(
        {b"data": np.zeros((2, 3072), np.uint8), b"labels": [1]}
    ),
    "labels_not_ints": lambda d: _pickled(
        {b"data": np.zeros((2, 3072), np.uint8), b"labels": [b"a", b"b"]}
    ),
}


@pytest.mark.parametrize("damage", sorted(CIFAR_DAMAGE))
def test_a_damaged_cifar_batch_error_names_it(tmp_path, damage):
    folder = _cifar10_folder(tmp_path)
    path = folder / "data_batch_3"
    path.write_bytes(CIFAR_DAMAGE[damage](path.read_bytes()))
    with pytest.raises((ValueError, OSError)) as excinfo:
        cifar_files.load_cifar("cifar10", str(tmp_path))
    _error_names(excinfo.value, path)


@pytest.mark.parametrize("cut", [100, 0.5, 0.9])
def test_a_damaged_cifar_tarball_error_names_it(tmp_path, cut):
    folder = _cifar10_folder(tmp_path / "src")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    data = buf.getvalue()
    at = int(len(data) * cut) if isinstance(cut, float) else cut
    tarball = tmp_path / "cifar-10-python.tar.gz"
    tarball.write_bytes(data[:at])
    with pytest.raises((ValueError, OSError)) as excinfo:
        cifar_files.load_cifar("cifar10", str(tmp_path))
    _error_names(excinfo.value, tarball)


def test_out_of_range_labels_are_refused_naming_file_label_and_range(tmp_path):
    folder = _fashion_folder(tmp_path, labels=(1, 200, 3))
    with pytest.raises(ValueError) as excinfo:
        idx.load_fashion_mnist(str(folder))
    _error_names(excinfo.value, folder / "train-labels-idx1-ubyte.gz", "200", "[0, 10)")

    folder = _cifar10_folder(tmp_path / "c10", labels=[0, 77, 1])
    with pytest.raises(ValueError) as excinfo:
        cifar_files.load_cifar("cifar10", str(tmp_path / "c10"))
    _error_names(excinfo.value, folder / "data_batch_1", "77", "[0, 10)")

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    cifar_files.write_cifar("cifar100", str(tmp_path / "c100"), (images, [5, 99, 0]),
                            (images, [1, 100, 2]))  # fmt: skip
    with pytest.raises(ValueError) as excinfo:
        cifar_files.load_cifar("cifar100", str(tmp_path / "c100"))
    _error_names(excinfo.value, tmp_path / "c100" / "cifar-100-python" / "test", "100", "[0, 100)")
