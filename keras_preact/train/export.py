r"""A trained model as a file a server or a phone runs: TensorFlow SavedModel, ONNX or LiteRT.

    # a run folder (its final weights, architecture, normalization and class names):
    python -m keras_preact.train.export --weights=runs/fmnist_r20 --output=export/fmnist_sm

    # a weights record, as ONNX and as LiteRT:
    python -m keras_preact.train.export --weights=fashion_mnist --format=onnx --output=export/fm_onnx
    python -m keras_preact.train.export --weights=fashion_mnist --format=litert --output=export/fm_tflite

`--weights` is what `keras_preact.train.predict` takes (a weights record, a run folder, a
trainer's `.weights.h5` or a `.keras` model) and is resolved by its `Predictor`: the same
net, input size and class names. A net trained with `--scan_units` is exported as its
written-out twin (`scan_units=False`, the same weights), which every runtime runs as plain
convolutions. Export runs under the TensorFlow backend (`KERAS_BACKEND=tensorflow`).

`--output` is a folder, written whole or not at all (built beside it, then renamed into
place); an existing one is replaced only with `--overwrite`, and only if it holds an
earlier export. It holds the model, `labels.txt` (one class name per line, in output order)
and `export.json` (model, input, normalization, class names, source weights, versions):

| format | model file | input | output | class names inside |
| --- | --- | --- | --- | --- |
| `tf_saved_model` | the folder itself | `serve(images)` | `{"logits": ...}` | `class_names()` signature |
| `onnx` | `model.onnx` | `images` | `logits` | `metadata_props["class_names"]` |
| `litert` | `model.tflite` | signature `serve`, `images` | `logits` | metadata `class_names` |

`images` is float32 `(N, H, W, C)` (`(N, C, H, W)` for a channels_first net), pixel values
in [0, 255] as in a uint8 image: the model normalizes them itself with the weights'
statistics (a `.keras` model without a `preprocessing` layer takes what it was trained on;
`export.json` says `"normalization": null` then). ImageNet-sized nets take the crop
`export.json` names (`resize_shorter_side`, then the centre `H x W`). The output is float32
logits `(N, classes)`, as the Keras model's: apply a softmax for probabilities. The LiteRT
file's batch dimension is 1 until the interpreter resizes its input
(`interpreter.resize_tensor_input`); ONNX and SavedModel take any batch size.
"""

import json
import logging
import os
import shutil
import sys
import tempfile
import warnings

import keras
from absl import app, flags
from absl import logging as absl_logging

from keras_preact._optional import MissingDependency
from keras_preact.train import flags as train_flags
from keras_preact.train import fs

log = logging.getLogger(__name__)
FLAGS = flags.FLAGS

#: Format -> the model's file in the output folder (None: the folder is the model).
FORMATS = {"tf_saved_model": None, "onnx": "model.onnx", "litert": "model.tflite"}
#: Format -> {module: its pip package} that the export imports.
NEEDS = {"tf_saved_model": {}, "onnx": {"tf2onnx": "tf2onnx", "onnx": "onnx"}, "litert": {}}
#: The file that says a folder is an export; written last.
MANIFEST = "export.json"
LABELS = "labels.txt"
INPUT_NAME, OUTPUT_NAME = "images", "logits"


@train_flags.program
def define_flags():
    # fmt: off
    flags.DEFINE_string("weights", None, "A weights record name, a run folder, a trainer's "
                        ".weights.h5 file or a .keras model.", required=True)
    flags.DEFINE_enum("format", "tf_saved_model", list(FORMATS), "The file format to write.")
    flags.DEFINE_string("output", None, "The folder to write (model, labels.txt, "
                        "export.json).", required=True)
    flags.DEFINE_bool("overwrite", False, "Replace an earlier export at --output.")
    flags.DEFINE_string("model", None, "The network, for a record or a weights file that does "
                        "not name it (e.g. --weights=imagenet --model=PreActResNet50).")
    flags.DEFINE_string("config", None, "The run's config.json, when it is not next to "
                        "--weights.")
    flags.DEFINE_integer("eval_resize", 256, "ImageNet-sized nets: the shorter side the image "
                         "is resized to before the centre crop.", lower_bound=1)
    flags.DEFINE_integer("eval_size", 224, "ImageNet-sized nets: the centre crop's side, the "
                         "exported input size.", lower_bound=1)
    # fmt: on


def check_request(format, path, *, overwrite=False):
    """Raises before any model work: a `ValueError` for an unknown `format`, a
    `RuntimeError` for a backend other than TensorFlow, `MissingDependency` naming the pip
    package a format needs, `FileExistsError` for an existing `path` (without `overwrite`,
    or when it is not an earlier export)."""
    if format not in FORMATS:
        raise ValueError(f"format={format!r} is not one of {list(FORMATS)}.")
    backend = keras.backend.backend()
    if backend != "tensorflow":
        raise RuntimeError(
            f"Export runs under the TensorFlow backend; this process runs {backend!r}. Run "
            f"KERAS_BACKEND=tensorflow python -m keras_preact.train.export --format={format} ..."
        )
    for module, package in NEEDS[format].items():
        try:
            __import__(module)
        except ImportError as e:
            raise MissingDependency(
                f"--format={format} needs the {package} package, which is not installed: pip "
                f"install 'keras-preact[export]' (or pip install {package}). "
                f"({type(e).__name__}: {e})"
            ) from e
    if fs.exists(path):
        if not overwrite:
            raise FileExistsError(
                f"{path} exists: pass --overwrite (overwrite=True) to replace it."
            )
        if not fs.isfile(fs.join(path, MANIFEST)):
            raise FileExistsError(
                f"{path} exists and is no export (it has no {MANIFEST}): --overwrite replaces "
                "only an earlier export. Remove it yourself, or pick another --output."
            )


def written_out(model, weights, config_path=None):
    """`model`, or for a net with scanned units (`scan_units=True`, e.g. a run's resumable
    checkpoint) its written-out twin holding the same weights. The twin's architecture is
    the run's (`config.json` beside `weights`, or `config_path`); ValueError without one."""
    import keras_preact
    from keras_preact.train import evaluate, modeling

    if not any(isinstance(layer, keras_preact.scan.Scan) for layer in model.layers):
        return model
    run = evaluate.run_config(weights, config_path and os.path.expanduser(config_path))
    if run is None or not run.get("model"):
        raise ValueError(
            f"{weights} holds scanned units (scan_units=True) and no run config.json names its "
            "architecture, which writing them out needs: pass --config=RUN/config.json."
        )
    mean, std = normalization(model) or (None, None)
    twin = modeling.WrittenOut(
        {**run, "scan_units": True},
        model=run["model"],
        input_shape=tuple(model.input_shape[1:]),
        classes=int(model.output_shape[-1]),
        mean=mean,
        std=std,
    )
    return twin(model)


def normalization(model):
    """`(mean, std)` in [0, 1] units of `model`'s `preprocessing` layer, or None."""
    from keras_preact.layers import Normalize

    for layer in model.layers:
        if isinstance(layer, Normalize):
            return list(layer.mean), list(layer.std)
    return None


def export(
    weights,
    path,
    *,
    format="tf_saved_model",
    model=None,
    config_path=None,
    eval_resize=256,
    eval_size=224,
    overwrite=False,
):
    """Writes the model of `weights` to the folder `path` in `format` (see the module).

    Args:
        weights: a weights record name, a run folder, a trainer's `.weights.h5` or a
            `.keras` file (as `keras_preact.train.predict.Predictor` takes).
        path: the output folder: the model, `labels.txt` and `export.json`. Any `fs` path
            (`gs://...` too).
        format: `"tf_saved_model"`, `"onnx"` or `"litert"`.
        model: the network's name, for a record or file that does not say it.
        config_path: the run's `config.json`, when it is not next to `weights`.
        eval_resize: ImageNet-sized nets: the shorter side before the centre crop.
        eval_size: ImageNet-sized nets: the crop's side, the exported input size.
        overwrite: replace an earlier export at `path`.

    Returns:
        The dict written to `export.json`.

    Example:

    >>> from keras_preact.train.export import export
    >>> manifest = export("fashion_mnist", "/tmp/fm_onnx", format="onnx")  # doctest: +SKIP
    >>> manifest["input"]["shape"], manifest["class_names"][:2]  # doctest: +SKIP
    ([None, 28, 28, 1], ['T-shirt/top', 'Trouser'])
    """
    import tensorflow as tf

    import keras_preact
    from keras_preact.train import predict

    path = os.path.expanduser(os.fspath(path))
    check_request(format, path, overwrite=overwrite)
    predictor = predict.Predictor(
        weights, model=model, config_path=config_path, eval_resize=eval_resize, eval_size=eval_size
    )
    net = written_out(predictor.model, predictor.weights, config_path)
    names = [str(n) for n in predictor.names]
    stats = normalization(net)
    input_shape, output_shape = list(net.input_shape), list(net.output_shape)
    manifest = {
        "format": format,
        "file": FORMATS[format] or ".",
        "model": net.name,
        "weights": predictor.weights,
        "written_out_from_scanned_units": net is not predictor.model,
        "input": {
            "name": INPUT_NAME,
            "shape": input_shape,
            "dtype": "float32",
            "range": [0, 255] if stats else None,
            "data_format": keras.config.image_data_format(),
        },
        "image": (
            {"resize_shorter_side": predictor.resize, "centre_crop": list(predictor.shape[:2])}
            if predictor.resize
            else {"resize_to": list(predictor.shape[:2])}
        ),
        "normalization": (
            {"inside": True, "mean": stats[0], "std": stats[1], "units": "[0, 1] pixels"}
            if stats
            else None
        ),
        "output": {
            "name": OUTPUT_NAME,
            "shape": output_shape,
            "dtype": "float32",
            "kind": "logits",
        },
        "class_names": names,
        "keras_version": keras.__version__,
        "tensorflow_version": tf.__version__,
        "keras_preact_version": keras_preact.__version__,
    }
    if stats is None:
        log.warning("%s has no preprocessing layer: the export takes the inputs it was "
                    "trained on, not [0, 255] pixels.", predictor.weights)  # fmt: skip
    _write(path, overwrite, lambda folder: WRITERS[format](net, folder, names, manifest), manifest)
    return manifest


def _spec(net):
    import tensorflow as tf

    return tf.TensorSpec((None, *net.input_shape[1:]), "float32", name=INPUT_NAME)


def write_saved_model(net, folder, names, manifest=None):
    """A SavedModel: `serve(images) -> {"logits": ...}` (also `serving_default`), and
    `class_names() -> string tensor`."""
    import tensorflow as tf

    archive = keras.export.ExportArchive()
    archive.track(net)
    archive.add_endpoint(
        "serve", lambda images: {OUTPUT_NAME: net(images, training=False)}, [_spec(net)]
    )
    archive.add_endpoint("class_names", lambda: tf.constant(names), input_signature=[])
    archive.write_out(folder, verbose=False)


def write_onnx(net, folder, names, manifest):
    """`model.onnx` through Keras' exporter (tf2onnx), its output renamed `logits`, the
    class names and the manifest in its `metadata_props`."""
    import onnx

    file = os.path.join(folder, FORMATS["onnx"])
    with warnings.catch_warnings():  # Keras' numpy 2 patch of tf2onnx touches np.object
        warnings.filterwarnings("ignore", "In the future `np.object`", FutureWarning)
        net.export(file, format="onnx", input_signature=[_spec(net)], verbose=False)
    proto = onnx.load(file)
    old = proto.graph.output[0].name
    for node in proto.graph.node:
        node.input[:] = [OUTPUT_NAME if n == old else n for n in node.input]
        node.output[:] = [OUTPUT_NAME if n == old else n for n in node.output]
    proto.graph.output[0].name = OUTPUT_NAME
    for key, value in _metadata(names, manifest).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    onnx.save(proto, file)


def write_litert(net, folder, names, manifest):
    """`model.tflite` converted from the SavedModel's `serve` signature with the built-in
    ops only (no Flex delegate needed), the class names and manifest as its metadata."""
    import numpy as np
    import tensorflow as tf
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    with tempfile.TemporaryDirectory() as staged:
        write_saved_model(net, staged, names)
        converter = tf.lite.TFLiteConverter.from_saved_model(staged, signature_keys=["serve"])
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        flat = converter.convert()
    tflite = flatbuffer_utils.read_model_from_bytearray(bytearray(flat))
    tflite.metadata = tflite.metadata or []
    for key, value in _metadata(names, manifest).items():
        buffer, entry = schema.BufferT(), schema.MetadataT()
        buffer.data = np.frombuffer(value.encode("utf-8"), np.uint8)
        entry.name, entry.buffer = key, len(tflite.buffers)
        tflite.buffers.append(buffer)
        tflite.metadata.append(entry)
    with open(os.path.join(folder, FORMATS["litert"]), "wb") as f:
        f.write(flatbuffer_utils.convert_object_to_bytearray(tflite))


WRITERS = {"tf_saved_model": write_saved_model, "onnx": write_onnx, "litert": write_litert}


def _metadata(names, manifest):
    """The key-value metadata of an ONNX or LiteRT file: the class names (a JSON list) and
    the manifest (JSON)."""
    return {
        "class_names": json.dumps(names),
        "keras_preact_export": json.dumps(manifest, sort_keys=True),
    }


def _write(path, overwrite, write_model, manifest):
    """Writes the export to `path`: `write_model(local folder)`, `labels.txt` and the
    manifest, in a local folder beside a local `path` that is then renamed into place (the
    earlier export removed after), or copied file by file to a remote `path` with the
    manifest last (an object store has no folder rename: the manifest marks it complete).
    A failed write raises one `fs.WriteError` naming `path`, and leaves no staging folder."""
    local = fs.is_local(path)
    parent = os.path.dirname(os.path.abspath(path)) if local else None
    try:
        if local:
            os.makedirs(parent, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
        try:
            write_model(staging)
            with open(os.path.join(staging, LABELS), "w", encoding="utf-8") as f:
                f.writelines(f"{name}\n" for name in manifest["class_names"])
            with open(os.path.join(staging, MANIFEST), "w", encoding="utf-8") as f:
                json.dump(manifest, f, indent=2)
            if local:
                _replace_local(staging, path, overwrite)
            else:
                _copy_remote(staging, path, overwrite)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    except OSError as e:
        if isinstance(e, fs.WriteError):
            raise
        raise fs.WriteError(e.errno, f"Could not write the export {path}: {e}.") from e


def _replace_local(staging, path, overwrite):
    old = None
    if overwrite and os.path.exists(path):
        old = f"{staging}.old"
        os.replace(path, old)
    try:
        os.replace(staging, path)
    except OSError:
        if old:
            os.replace(old, path)  # the earlier export stays
        raise
    fs.fsync_folder(os.path.dirname(os.path.abspath(path)))
    if old:
        shutil.rmtree(old, ignore_errors=True)


def _copy_remote(staging, path, overwrite):
    if overwrite and fs.exists(path):
        fs.remove(path)
    files = sorted(
        os.path.relpath(os.path.join(root, name), staging)
        for root, _, names in os.walk(staging)
        for name in names
    )
    for rel in sorted(files, key=lambda r: r == MANIFEST):  # the manifest last
        target = fs.join(path, *rel.split(os.sep))
        fs.makedirs(fs.dirname(target))
        with open(os.path.join(staging, rel), "rb") as src, fs.open(target, "wb") as dst:
            dst.write(src.read())


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments {argv[1:]}: export takes flags only.")
    if not FLAGS["verbosity"].present:  # TensorFlow's and tf2onnx's INFO lines, one per step
        absl_logging.set_verbosity(absl_logging.WARNING)
    try:
        manifest = export(
            FLAGS.weights,
            FLAGS.output,
            format=FLAGS.format,
            model=FLAGS.model,
            config_path=FLAGS.config,
            eval_resize=FLAGS.eval_resize,
            eval_size=FLAGS.eval_size,
            overwrite=FLAGS.overwrite,
        )
    except (ValueError, RuntimeError, FileNotFoundError, FileExistsError, ImportError) as e:
        raise app.UsageError(str(e)) from None
    inside = [manifest["file"] if manifest["file"] != "." else "a SavedModel", LABELS, MANIFEST]
    stats = manifest["normalization"]
    shape = ", ".join(str(d) for d in manifest["input"]["shape"]).replace("None", "N")
    print(
        f"Wrote {FLAGS.output} ({FLAGS.format}): {', '.join(inside)}. Input "
        f"{manifest['input']['name']}: float32 ({shape}){' in [0, 255]' * bool(stats)}; output "
        f"{manifest['output']['name']}: {len(manifest['class_names'])} classes.",
        flush=True,
    )


def run_main():
    """The console entry point: `python -m keras_preact.train.export` (`keras-preact-export`)."""
    from keras_preact.train import trainer

    trainer.run_program(main, define_flags())


if __name__ == "__main__":
    sys.exit(run_main())
