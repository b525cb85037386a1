"""`keras_preact.train.export`: a run folder, a scanned run's checkpoint or a weights record
as a TensorFlow SavedModel, an ONNX or a LiteRT file, each run by its own runtime and
compared with the Keras model on the same images."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from model_test_utils import set_seeded_weights
from trainer_runs import REPO

import keras_preact
from keras_preact.train import export, modeling, predict, sources

TF = keras.backend.backend() == "tensorflow"
needs_tf = pytest.mark.skipif(not TF, reason="export runs under KERAS_BACKEND=tensorflow")
#: The round trip's largest |exported - Keras| logit over the largest |logit|: measured
#: 2.6e-7 (SavedModel, ONNX) and 5.2e-7 (LiteRT) on 2 CPU cores (docs/export.md); the
#: bounds leave room for other CPUs' kernels.
TOLERANCE = {"tf_saved_model": 1e-5, "onnx": 1e-5, "litert": 1e-4}
NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "crème brûlée"]
MEAN, STD = [0.286], [0.353]


def _run_folder(root, *, scan_units):
    """A Fashion-MNIST-shaped PreActResNet20 run: `config.json` with class names, seeded
    `final.weights.h5` (written out, as a trainer writes it) and, for `scan_units`, a
    resumable checkpoint holding the scanned net."""
    run = {"model": "PreActResNet20", "dataset": "fashion_mnist", "mean": MEAN, "std": STD,
           "class_names": NAMES, "scan_units": scan_units}  # fmt: skip
    os.makedirs(root)
    with open(os.path.join(root, "config.json"), "w") as f:
        json.dump(run, f)
    build = dict(model="PreActResNet20", input_shape=(28, 28, 1), classes=10, mean=MEAN, std=STD)
    plain = modeling.build_base({**run, "scan_units": False}, **build)
    set_seeded_weights(plain, seed=3)
    plain.save_weights(os.path.join(root, "final.weights.h5"))
    if scan_units:
        scanned = modeling.build_base(run, **build)
        keras_preact.scan.copy_weights(plain, scanned)
        checkpoint = os.path.join(root, "checkpoints", "epoch-0001")
        os.makedirs(checkpoint)
        scanned.save_weights(os.path.join(checkpoint, "model.weights.h5"))
    return str(root)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return _run_folder(tmp_path_factory.mktemp("export") / "run", scan_units=False)


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).integers(0, 256, (4, 28, 28, 1)).astype("float32")


def _keras_logits(weights, images):
    model = predict.Predictor(weights).model
    return keras.ops.convert_to_numpy(model(images, training=False)), model


def run_exported(folder, fmt, images):
    """`(logits, class names)` of the export at `folder`, run by its format's runtime."""
    manifest = json.load(open(os.path.join(folder, "export.json")))
    if fmt == "tf_saved_model":
        import tensorflow as tf

        loaded = tf.saved_model.load(folder)
        names = [n.decode() for n in loaded.class_names().numpy()]
        return loaded.serve(images)["logits"].numpy(), names
    if fmt == "onnx":
        ort = pytest.importorskip("onnxruntime", reason="pip install onnxruntime")
        session = ort.InferenceSession(os.path.join(folder, manifest["file"]))
        assert [i.name for i in session.get_inputs()] == ["images"]
        meta = session.get_modelmeta().custom_metadata_map
        (logits,) = session.run(["logits"], {"images": images})
        return logits, json.loads(meta["class_names"])
    litert = pytest.importorskip("ai_edge_litert.interpreter", reason="pip install ai-edge-litert")
    from tensorflow.lite.tools import flatbuffer_utils

    file = os.path.join(folder, manifest["file"])
    serve = litert.Interpreter(model_path=file).get_signature_runner("serve")
    logits = serve(images=images)["logits"]  # the runner resizes the batch-1 input
    tflite = flatbuffer_utils.read_model(file)
    meta = {m.name.decode(): bytes(tflite.buffers[m.buffer].data) for m in tflite.metadata}
    return logits, json.loads(meta["class_names"])


@needs_tf
@pytest.mark.parametrize("fmt", ["tf_saved_model", "onnx", "litert"])
def test_a_run_folder_round_trips_through_each_runtime(tmp_path, run_dir, images, fmt):
    """Each format, run by its runtime on [0, 255] float images, gives the Keras model's
    logits; the run's class names are in labels.txt, export.json and the file itself."""
    if fmt == "onnx":
        pytest.importorskip("tf2onnx", reason="pip install tf2onnx")
        pytest.importorskip("onnx", reason="pip install onnx")
    expected, _ = _keras_logits(run_dir, images)
    out = str(tmp_path / fmt)
    manifest = export.export(run_dir, out, format=fmt)
    logits, names = run_exported(out, fmt, images)
    diff, scale = float(np.abs(logits - expected).max()), float(np.abs(expected).max())
    print(
        f"{fmt}: max |exported - keras| = {diff:.2e}, / max |logit| {scale:.1f} = {diff / scale:.1e}"
    )
    assert diff < TOLERANCE[fmt] * scale, (diff, scale)
    assert (logits.argmax(-1) == expected.argmax(-1)).all()
    assert names == NAMES and manifest["class_names"] == NAMES
    with open(os.path.join(out, "labels.txt"), encoding="utf-8") as f:
        assert f.read().splitlines() == NAMES
    assert json.load(open(os.path.join(out, "export.json"))) == manifest
    assert manifest["input"] == {"name": "images", "shape": [None, 28, 28, 1], "dtype": "float32",
                                 "range": [0, 255], "data_format": "channels_last"}  # fmt: skip
    assert manifest["normalization"]["mean"] == pytest.approx(MEAN)
    assert manifest["output"]["shape"] == [None, 10] and manifest["output"]["kind"] == "logits"
    assert manifest["weights"].endswith("final.weights.h5")
    assert not manifest["written_out_from_scanned_units"]
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # no staging left


@needs_tf
def test_a_scanned_checkpoint_exports_through_its_written_out_twin(tmp_path, images):
    """A `scan_units=True` run's resumable checkpoint is rebuilt scanned; the export holds
    the written-out twin with the same weights, and gives the scanned net's logits. A
    scanned net without a run config cannot be written out: the error says what to pass."""
    run = _run_folder(tmp_path / "run", scan_units=True)
    checkpoint = os.path.join(run, "checkpoints", "epoch-0001", "model.weights.h5")
    expected, scanned = _keras_logits(checkpoint, images)
    assert any(isinstance(layer, keras_preact.scan.Scan) for layer in scanned.layers)
    out = str(tmp_path / "sm")
    manifest = export.export(checkpoint, out)
    assert manifest["written_out_from_scanned_units"] and manifest["class_names"] == NAMES
    logits, _ = run_exported(out, "tf_saved_model", images)
    np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-5 * np.abs(expected).max())
    twin = export.written_out(scanned, checkpoint)
    assert not any(isinstance(layer, keras_preact.scan.Scan) for layer in twin.layers)
    assert twin.count_params() == scanned.count_params()
    with pytest.raises(ValueError, match="scanned units.*--config=RUN/config.json"):
        export.written_out(scanned, str(tmp_path / "scanned.keras"))


@needs_tf
def test_bad_requests_are_refused_before_any_model_work(tmp_path, monkeypatch):
    """An unknown format names the value and the allowed ones; an existing output needs
    --overwrite, which replaces only an earlier export; a missing package is named."""
    with pytest.raises(ValueError, match=r"format='torchscript' is not one of \['tf_saved_model'"):
        export.export("fashion_mnist", str(tmp_path / "x"), format="torchscript")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="mine exists: pass --overwrite"):
        export.export("fashion_mnist", str(tmp_path / "mine"))
    with pytest.raises(FileExistsError, match="is no export"):
        export.export("fashion_mnist", str(tmp_path / "mine"), overwrite=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
    monkeypatch.setitem(sys.modules, "tf2onnx", None)  # import tf2onnx raises ImportError
    with pytest.raises(ImportError, match=r"keras-preact\[export\]' \(or pip install tf2onnx\)"):
        export.export("fashion_mnist", str(tmp_path / "y"), format="onnx")
    assert sorted(os.listdir(tmp_path)) == ["mine"]


@needs_tf
def test_overwrite_replaces_an_earlier_export_on_a_remote_path(tmp_path, run_dir, images):
    """Through the `fs` layer (`file://`, as `gs://`): --overwrite replaces an earlier
    export whole (no file of it is left), and the copy runs."""
    earlier = tmp_path / "remote"
    earlier.mkdir()
    (earlier / "export.json").write_text("{}")
    (earlier / "stale.bin").write_text("old")
    export.export(run_dir, f"file://{earlier}", overwrite=True)
    assert "stale.bin" not in os.listdir(earlier)
    assert {"saved_model.pb", "labels.txt", "export.json"} <= set(os.listdir(earlier))
    logits, names = run_exported(str(earlier), "tf_saved_model", images)
    expected, _ = _keras_logits(run_dir, images)
    assert names == NAMES
    np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-5 * np.abs(expected).max())


@needs_tf
def test_the_command_exports_a_record_and_refuses_to_overwrite(tmp_path):
    """`python -m keras_preact.train.export --weights=fashion_mnist`: the record's classes
    in labels.txt; the command with an existing --output stops in one line, naming
    --overwrite (both commands run side by side)."""
    taken = tmp_path / "taken"
    taken.mkdir()
    cmd = [sys.executable, "-m", "keras_preact.train.export", "--weights=fashion_mnist"]
    runs = [subprocess.Popen([*cmd, f"--output={out}"], cwd=REPO, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            for out in (tmp_path / "fm", taken)]  # fmt: skip
    (out, err), (_, refused) = (run.communicate(timeout=300) for run in runs)
    assert runs[0].returncode == 0, err[-3000:]
    assert "(tf_saved_model)" in out and "10 classes" in out, out
    with open(tmp_path / "fm" / "labels.txt") as f:
        assert tuple(f.read().splitlines()) == sources.CLASS_NAMES["fashion_mnist"]
    assert runs[1].returncode == 1 and "taken exists: pass --overwrite" in refused, refused
    assert "Traceback" not in refused and os.listdir(taken) == []


@pytest.mark.skipif(TF, reason="the error of the other backends")
def test_other_backends_are_told_to_run_under_tensorflow(tmp_path):
    with pytest.raises(RuntimeError, match=f"runs '{keras.backend.backend()}'.*KERAS_BACKEND="):
        export.check_request("onnx", str(tmp_path / "out"))
