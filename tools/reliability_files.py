r"""Fault injection, end to end: hostile and damaged files, broken caches, stalled servers.

Each case makes `--trials` variants of one fault (offsets, values and seeds vary), feeds each
to the package's own entry point and sorts the outcome: **held** when the reader refused with
a clear error naming the file (or the value, for a record), ran nothing the file named and
allocated nothing the file merely declared, or when an undetectable corruption (pixel bytes)
loaded as well-formed data; **broke** for anything else (another exception type, a message
without the file, a hang, code run, memory allocated). Everything runs on 127.0.0.1 and in a
temporary folder; the Torch7 trials run in a child process, since the fault they inject used
to crash the reader.

    python tools/reliability_files.py             # 5 trials per case, about a minute
    python tools/reliability_files.py --trials 20 --seed 1
"""

import argparse
import contextlib
import gzip
import http.server
import io
import json
import os
import pickle
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO, "tests", "fixtures")
T7_FIXTURE = os.path.join(FIXTURES, "fb_preresnet_tiny.t7")
SAFETENSORS = os.path.join(FIXTURES, "timm_basic.safetensors")
PEAK_LIMIT = 64 << 20  # bytes a refused file may cost


def names(error, *parts):
    """Held: `error` is a ValueError/OSError whose message holds every part."""
    return isinstance(error, (ValueError, OSError)) and all(str(p) in str(error) for p in parts)


def outcome(fn):
    """`(exception or None, result)` of `fn()`."""
    try:
        return None, fn()
    except Exception as e:  # the trial inspects it
        return e, None


def with_deadline(fn, seconds):
    """`(finished, exception)` of `fn()` run in a thread for at most `seconds`."""
    out = {}

    def run():
        out["error"] = outcome(fn)[0]

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    return not thread.is_alive(), out.get("error")


# -- Torch7 -----------------------------------------------------------------------------------


def t7_trial(rng, folder):
    """A FloatTensor header (or its storage) of the fixture patched out of bounds."""
    from keras_preact.convert import torch7

    raw = bytearray(open(T7_FIXTURE, "rb").read())
    heads = [m.end() for m in re.finditer(rb"torch\.FloatTensor", raw)]
    at = heads[rng.integers(len(heads))]
    (n,) = struct.unpack_from("<i", raw, at)
    sizes = list(struct.unpack_from(f"<{n}q", raw, at + 4))
    strides = list(struct.unpack_from(f"<{n}q", raw, at + 4 + 8 * n))
    numel = int(np.prod(sizes))
    used = [i for i in range(n) if sizes[i] > 1]  # a stride over a size-1 dim is never used
    d = int(rng.choice(used)) if used else 0
    kind = rng.choice(["stride", "size", "offset", "huge_stride", "negative", "ndim", "storage"])
    if kind == "stride":
        strides[d] = strides[d] + numel  # the last element lands past the storage
    elif kind == "size":
        sizes[d] = sizes[d] * int(rng.integers(2, 1000)) + 1
    elif kind == "huge_stride":
        strides[d] = 1 << int(rng.integers(30, 62))
    elif kind == "negative":
        (sizes if rng.integers(2) else strides)[d] = -int(rng.integers(1, 1 << 20))
    struct.pack_into(f"<{n}q", raw, at + 4, *sizes)
    struct.pack_into(f"<{n}q", raw, at + 4 + 8 * n, *strides)
    if kind == "offset":
        struct.pack_into("<q", raw, at + 4 + 16 * n, 2 + int(rng.integers(1, 1 << 40)))
    elif kind == "ndim":
        struct.pack_into("<i", raw, at, int(rng.integers(9, 1 << 30)))
    elif kind == "storage":
        storage = raw.index(b"torch.FloatStorage", at) + len(b"torch.FloatStorage")
        struct.pack_into("<q", raw, storage, int(rng.integers(1 << 24, 1 << 62)))
    path = os.path.join(folder, f"hostile_{kind}.t7")
    open(path, "wb").write(bytes(raw))
    error, _ = outcome(lambda: torch7.read(path))
    return names(error, path)


# -- HDF5 -------------------------------------------------------------------------------------


def h5_trial(rng, folder):
    """A Keras 2 layout file whose dataset declares a huge shape (unwritten or compressed)."""
    import h5py

    from keras_preact import convert

    tensors = {"conv1_conv": {"kernel": np.zeros((3, 3, 3, 4), np.float32)},
               "predictions": {"kernel": np.zeros((4, 10), np.float32),
                               "bias": np.zeros(10, np.float32)}}  # fmt: skip
    expected = {k: {v: a.shape for v, a in vs.items()} for k, vs in tensors.items()}
    path = os.path.join(folder, f"huge{rng.integers(1 << 30)}.h5")
    convert.write_tensors(path, tensors)
    layer, var = [("conv1_conv", "kernel"), ("predictions", "kernel"), ("predictions", "bias")][
        rng.integers(3)
    ]
    shape = tuple(int(rng.integers(1 << 13, 1 << 16)) for _ in range(int(rng.integers(1, 5))))
    shape = shape if np.prod(shape, dtype=float) > (1 << 28) else (1 << 15, 1 << 15)
    with h5py.File(path, "r+") as f:
        name = f"{layer}/{var}:0"
        del f[layer][name]
        if rng.integers(2):
            f[layer].create_dataset(name, shape=shape, dtype="f4")  # never written: no space
        else:
            chunks = tuple(min(s, 64) for s in shape)
            f[layer].create_dataset(name, shape=shape, dtype="f4", chunks=chunks,
                                    compression="gzip")  # fmt: skip
            f[layer][name][(0,) * len(shape)] = 1.0  # one chunk written
    with_model = bool(rng.integers(2))
    tracemalloc.start()
    start = time.monotonic()
    error, _ = outcome(
        lambda: convert.read_tensors(path, "keras_h5", expected=expected if with_model else None)
    )
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return names(error, path, name) and peak < PEAK_LIMIT and time.monotonic() - start < 5


def h5_keras3_trial(rng, folder, model):
    """A Keras 3 `.weights.h5` with one dataset re-declared huge, through load_weights_file."""
    import h5py

    from keras_preact import weights

    path = os.path.join(folder, f"w{rng.integers(1 << 30)}.weights.h5")
    model.save_weights(path)
    with h5py.File(path, "r+") as f:
        datasets = []
        f.visititems(lambda n, o: datasets.append(n) if isinstance(o, h5py.Dataset) else None)
        name = datasets[rng.integers(len(datasets))]
        del f[name]
        f.create_dataset(name, shape=(int(rng.integers(1 << 14, 1 << 16)),) * 2, dtype="f4")
    tracemalloc.start()
    error, _ = outcome(lambda: weights.load_weights_file(model, path))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return names(error, path, name) and peak < PEAK_LIMIT


# -- The weights cache and downloads ----------------------------------------------------------


@contextlib.contextmanager
def static_server(root):
    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=root, **kwargs)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def record(url, file_name="served.safetensors"):
    from keras_preact import weights

    return weights.WeightsRecord(
        model="PreActResNet12", tag="t", dataset="test", classes=10, input_shape=None,
        layout=None, format="timm_safetensors", url=url, file_name=file_name,
    )  # fmt: skip


FAST = dict(timeout=0.2, retries=2, backoff=0.02, lock_timeout=0.2)


def bad_cached(rng, good):
    """The bytes of a cached `.safetensors` a proxy or a broken download leaves."""
    kind = rng.choice(["html", "huge_length", "list", "entries", "random", "cut", "flip"])
    if kind == "html":
        return b"<!DOCTYPE html><html>" + b"x" * int(rng.integers(0, 5000)) + b"</html>"
    if kind == "huge_length":
        return struct.pack("<Q", int(rng.integers(1 << 40, 1 << 63))) + b"{}"
    if kind in ("list", "entries"):
        entry = ["b", 1, None, [1], {"x": 1}][rng.integers(5)]
        header = [1, 2] if kind == "list" else {"a": entry}
        text = json.dumps(header).encode()
        return struct.pack("<Q", len(text)) + text
    if kind == "random":
        return rng.bytes(int(rng.integers(0, 4096)))
    if kind == "cut":
        return good[: int(rng.integers(0, len(good)))]
    out = bytearray(good)
    at = int(rng.integers(0, 8 + struct.unpack("<Q", good[:8])[0]))  # in the header
    out[at] ^= 0xFF
    return bytes(out)


def cache_trial(rng, folder):
    from keras_preact import weights

    www = os.path.join(folder, "www")
    os.makedirs(www, exist_ok=True)
    shutil.copy(SAFETENSORS, os.path.join(www, "m.safetensors"))
    good = open(SAFETENSORS, "rb").read()
    cache = os.path.join(folder, f"cache{rng.integers(1 << 30)}")
    cached = os.path.join(cache, "models", "served.safetensors")
    os.makedirs(os.path.dirname(cached))
    open(cached, "wb").write(bad_cached(rng, good))
    out = io.StringIO()
    with static_server(www) as base, contextlib.redirect_stdout(out):
        error, path = outcome(
            lambda: weights.fetch(
                record(f"{base}/m.safetensors"),
                cache_dir=cache,
                policy=weights.DownloadPolicy(**FAST),
            )  # fmt: skip
        )
    return (error is None and open(path, "rb").read() == good
            and f"Removing the cached weights file {cached}" in out.getvalue())  # fmt: skip


@contextlib.contextmanager
def stalling_server(sent):
    release = threading.Event()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(sent + 100_000))
            self.end_headers()
            self.wfile.write(b"\0" * sent)
            self.wfile.flush()
            release.wait(10)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/m.safetensors"
    finally:
        release.set()
        httpd.shutdown()
        httpd.server_close()


def stall_trial(rng, folder):
    from keras_preact import weights

    cache = os.path.join(folder, f"stall{rng.integers(1 << 30)}")
    with (
        stalling_server(int(rng.integers(0, 4096))) as url,
        contextlib.redirect_stdout(io.StringIO()),
    ):
        start = time.monotonic()
        policy = weights.DownloadPolicy(**FAST)
        finished, error = with_deadline(lambda: weights.fetch(record(url), cache, policy), 10)
    quick = time.monotonic() - start < 3
    clean = os.listdir(os.path.join(cache, "models")) == []
    return finished and quick and clean and names(error, url, "Nothing was cached")


def lock_trial(rng, folder):
    import fcntl

    from keras_preact import weights

    cache = os.path.join(folder, f"lock{rng.integers(1 << 30)}")
    os.makedirs(os.path.join(cache, "models"))
    lock_path = os.path.join(cache, "models", "served.safetensors.lock")
    pid = str(int(rng.integers(2, 1 << 22)))
    with open(lock_path, "w") as holder, contextlib.redirect_stdout(io.StringIO()):
        fcntl.flock(holder, fcntl.LOCK_EX)
        holder.write(pid)
        holder.flush()
        policy = weights.DownloadPolicy(**FAST)
        finished, error = with_deadline(
            lambda: weights.fetch(record("http://127.0.0.1:9/x"), cache, policy), 5
        )
    return finished and isinstance(error, TimeoutError) and names(error, lock_path, pid)


def file_name_trial(rng, folder):
    name = rng.choice(["../", "../../", "/", "a/", "a\\", "./../", "/tmp/"]) + rng.choice(
        ["x.safetensors", "evil", "..", ""]
    )
    error, _ = outcome(lambda: record("http://127.0.0.1:9/x", file_name=name))
    return names(error, repr(name), "test:t")


# -- CIFAR and IDX ------------------------------------------------------------------------------


def cifar_folder(folder, rng, n=3, labels=None, name="cifar10"):
    from keras_preact.data import cifar_files

    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    classes = 10 if name == "cifar10" else 100
    labels = labels if labels is not None else rng.integers(0, classes, n)
    cifar_files.write_cifar(name, folder, (images, labels), (images, labels))
    return os.path.join(folder, "cifar-10-batches-py" if name == "cifar10" else "cifar-100-python")


class RunsCode:
    def __init__(self, call, args):
        self.call, self.args = call, args

    def __reduce__(self):
        return self.call, self.args


def pickle_code_trial(rng, folder):
    from keras_preact.data import cifar_files

    root = os.path.join(folder, f"pk{rng.integers(1 << 30)}")
    batches = cifar_folder(root, rng)
    marker = os.path.join(root, "pwned")
    call, args = [
        (os.system, (f"touch {marker}",)),
        (subprocess.call, (["touch", marker],)),
        (eval, (f"open({marker!r}, 'w').close()",)),
        (exec, (f"open({marker!r}, 'w').close()",)),
    ][rng.integers(4)]
    victim = os.path.join(batches, rng.choice(["test_batch", "data_batch_1", "data_batch_5"]))
    payload = {b"data": RunsCode(call, args), b"labels": [0]}
    if rng.integers(2):
        payload = {b"data": np.zeros((1, 3072), np.uint8), b"labels": [RunsCode(call, args)]}
    with open(victim, "wb") as f:
        pickle.dump(payload, f, protocol=int(rng.integers(0, pickle.HIGHEST_PROTOCOL + 1)))
    error, _ = outcome(lambda: cifar_files.load_cifar("cifar10", root))
    return names(error, victim) and not os.path.exists(marker)


def damage(rng, data):
    """Bytes cut at a random offset, or with 1-4 random bytes flipped."""
    if rng.integers(2):
        return data[: int(rng.integers(0, len(data)))]
    out = bytearray(data)
    for at in rng.integers(0, len(data), int(rng.integers(1, 5))):
        out[at] ^= int(rng.integers(1, 256))
    return bytes(out)


def well_formed(arrays, classes, size):
    (x, y), (xt, yt) = arrays
    return all(a.shape[1:] == size and a.dtype == np.uint8 for a in (x, xt)) and all(
        len(b) and b.min() >= 0 and b.max() < classes for b in (y, yt)
    )


def cifar_damage_trial(rng, folder):
    from keras_preact.data import cifar_files

    root = os.path.join(folder, f"cd{rng.integers(1 << 30)}")
    batches = cifar_folder(root, rng)
    victim = os.path.join(batches, f"data_batch_{rng.integers(1, 6)}")
    data = damage(rng, open(victim, "rb").read())
    open(victim, "wb").write(data)
    error, arrays = outcome(lambda: cifar_files.load_cifar("cifar10", root))
    return names(error, victim) if error else well_formed(arrays, 10, (32, 32, 3))


def idx_folder(folder, rng, labels=None):
    from keras_preact.data import idx

    os.makedirs(folder)
    labels = np.asarray(labels if labels is not None else rng.integers(0, 10, 5), np.uint8)
    for prefix in ("train", "t10k"):
        images = rng.integers(0, 256, (len(labels), 28, 28), dtype=np.uint8)
        idx.write_idx(os.path.join(folder, f"{prefix}-images-idx3-ubyte.gz"), images)
        idx.write_idx(os.path.join(folder, f"{prefix}-labels-idx1-ubyte.gz"), labels)


def idx_damage_trial(rng, folder):
    from keras_preact.data import idx

    root = os.path.join(folder, f"idx{rng.integers(1 << 30)}")
    idx_folder(root, rng)
    victim = os.path.join(root, rng.choice(["train", "t10k"]) + "-"
                          + rng.choice(["images-idx3", "labels-idx1"]) + "-ubyte.gz")  # fmt: skip
    data = open(victim, "rb").read()
    if rng.integers(2):  # damage the IDX bytes inside an intact gzip stream
        data = gzip.compress(damage(rng, gzip.decompress(data)))
    else:
        data = damage(rng, data)
    open(victim, "wb").write(data)
    error, arrays = outcome(lambda: idx.load_fashion_mnist(root))
    if error:
        return names(error, victim)
    return well_formed(arrays, 10, (28, 28, 1))


def labels_trial(rng, folder):
    from keras_preact.data import cifar_files, idx

    root = os.path.join(folder, f"lb{rng.integers(1 << 30)}")
    which = rng.choice(["idx", "cifar10", "cifar100"])
    if which == "idx":
        bad = int(rng.integers(10, 256))
        idx_folder(root, rng, labels=[1, bad, 2])
        error, _ = outcome(lambda: idx.load_fashion_mnist(root))
        return names(error, os.path.join(root, "train-labels-idx1-ubyte.gz"), bad, "[0, 10)")
    classes = 10 if which == "cifar10" else 100
    bad = int(rng.integers(classes, 1 << 31))
    batches = cifar_folder(root, rng, labels=np.array([0, bad, 1]), name=which)
    error, _ = outcome(lambda: cifar_files.load_cifar(which, root))
    first = "data_batch_2" if which == "cifar10" else "train"  # write_cifar deals round robin
    return names(error, os.path.join(batches, first), bad, f"[0, {classes})")


# -- TFRecord shards ----------------------------------------------------------------------------


def shard_trial(rng, folder):
    import tensorflow as tf

    from keras_preact.data import tfdata

    root = os.path.join(folder, f"shards{rng.integers(1 << 30)}")
    os.makedirs(root)
    jpeg = tf.io.encode_jpeg(np.full((8, 8, 3), 128, np.uint8)).numpy()
    count = int(rng.integers(1, 5))
    split = "train" if rng.integers(2) else "validation"
    paths = []
    for i in range(count):
        paths.append(os.path.join(root, f"{split}-{i:05d}-of-{count:05d}"))
        tfdata.write_imagenet_tfrecords(paths[-1], [jpeg] * 3, [1, 2, 3])
    if rng.integers(2):
        spec = tfdata.InputSpec(source="tfrecord", data_dir=root, batch_size=2, image_size=8,
                                eval_resize=8, shuffle_buffer=2)  # fmt: skip
        ds = tfdata.imagenet_dataset(spec, split, training=split == "train")
    else:
        ds = tfdata.encoded_records(tfdata.InputSpec(source="tfrecord", data_dir=root), split)
    gone = paths[rng.integers(count)]
    os.remove(gone)
    finished, error = with_deadline(lambda: [None for _ in ds], 30)
    return finished and error is not None and gone in str(error)


# -- The run ------------------------------------------------------------------------------------

CASES = {
    "t7 tensor outside its storage": t7_trial,
    "h5 dataset declared huge (Keras 2 layout)": h5_trial,
    "h5 dataset declared huge (Keras 3 .weights.h5)": h5_keras3_trial,
    "bad cached .safetensors (HTML, 2^62 length, list...)": cache_trial,
    "stalled download server": stall_trial,
    "lock held by a stuck process": lock_trial,
    "record file_name leaving the cache": file_name_trial,
    "CIFAR pickle that runs code": pickle_code_trial,
    "CIFAR batch cut or flipped": cifar_damage_trial,
    "IDX gz / IDX bytes cut or flipped": idx_damage_trial,
    "out-of-range labels (IDX, CIFAR-10/100)": labels_trial,
    "TFRecord shard deleted after build": shard_trial,
}


def run_case(name, trials, seed, folder, model=None):
    held = 0
    for t in range(trials):
        rng = np.random.default_rng([seed, t, len(name)])
        fn = CASES[name]
        try:
            ok = fn(rng, folder, model) if fn is h5_keras3_trial else fn(rng, folder)
        except Exception as e:  # a trial's own failure is a broken case too
            print(f"  {name}, trial {t}: {type(e).__name__}: {e}", file=sys.stderr)
            ok = False
        held += bool(ok)
    return held


def child_t7(trials, seed):
    """The Torch7 trials in a child process: a crash there is counted, not fatal."""
    command = [sys.executable, os.path.abspath(__file__), "--t7_child",
               f"--trials={trials}", f"--seed={seed}"]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        print(f"  t7 child exited {proc.returncode}: {proc.stderr[-500:]}", file=sys.stderr)
        return 0
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--t7_child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.t7_child:
        with tempfile.TemporaryDirectory() as folder:
            print(json.dumps(run_case("t7 tensor outside its storage", args.trials, args.seed,
                                      folder)))  # fmt: skip
        return 0
    start = time.monotonic()
    os.environ.setdefault("KERAS_BACKEND", "jax")
    import keras

    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, name="conv1_conv")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(10, name="predictions")(x))
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name in CASES:
            if name.startswith("t7"):
                held = child_t7(args.trials, args.seed)
            else:
                held = run_case(name, args.trials, args.seed, folder, model)
            rows.append((name, args.trials, held, args.trials - held))
    print("| case | trials | held | broke |")
    print("| --- | --- | --- | --- |")
    for row in rows:
        print("| {} | {} | {} | {} |".format(*row))
    total = sum(r[1] for r in rows), sum(r[2] for r in rows), sum(r[3] for r in rows)
    print("| **all** | {} | {} | {} |".format(*total))
    print(f"\nTotal time: {time.monotonic() - start:.1f} s "
          f"(keras backend {keras.backend.backend()}, seed {args.seed}).")  # fmt: skip
    return 1 if total[2] else 0


if __name__ == "__main__":
    sys.exit(main())
