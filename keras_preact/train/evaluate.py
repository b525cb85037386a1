r"""Single-crop (or 10-crop) top-1 / top-5 of a trained model on ImageNet-format data.

    # 224 centre crop of the image resized to 256 (the standard protocol):
    python training/evaluate.py --weights=runs/r200/final.weights.h5 \
        --source=tfrecord --data_dir=/data/imagenet

    # The paper's Table 5: 320 centre crop of the image resized to 320, same weights.
    python training/evaluate.py ... --eval_resize=320 --eval_size=320

    # 10-crop (four corners, centre and their mirrors, softmax averaged):
    python training/evaluate.py ... --ten_crop

    # In-memory datasets (CIFAR, Fashion-MNIST), no TensorFlow needed with --source=files:
    python training/evaluate.py --dataset=fashion_mnist \
        --source=files --data_dir=/usr/share/datasets/fashion-mnist \
        --weights=runs/fmnist_r20/final.weights.h5

    # A weights record of keras_preact (the model is the record's):
    python training/evaluate.py --weights=fashion_mnist --dataset=fashion_mnist \
        --source=files --data_dir=/usr/share/datasets/fashion-mnist

`--weights` is a `.weights.h5` file, a whole `.keras` model, or a weights record name.
A `.weights.h5` file written by a trainer is rebuilt with exactly the architecture of
its run (model, unit, shortcut and its parameters, layout, width, ...): the run's
`config.json` is found next to the file (or above its `checkpoints/` folder), or
given with `--config`. Without one, the architecture comes from the flags. The model
is built at the evaluation size (the network is fully convolutional).
"""

import json
import os
import sys
import time
from typing import NamedTuple

import keras
import numpy as np
from absl import app, flags

from keras_preact.train import checkpoints, config, distribution, fs, modeling, sources
from keras_preact.train import flags as train_flags


@train_flags.program
def define_flags():
    """The program's flags."""
    # fmt: off
    train_flags.define_model_flags(model=None, weights_help="A .weights.h5 or .keras file, or a "
                                   "keras_preact weights record (fashion_mnist, imagenet, "
                                   "imagenet:fb_torch, ...).")
    flags.mark_flag_as_required("weights")
    train_flags.DEFINE_path("config", None, "The run's config.json (default: next to --weights, or "
                        "above its checkpoints/ folder).")
    flags.DEFINE_enum("dataset", "imagenet", ["imagenet", *sources.MEMORY_DATASETS],
                      "imagenet (ImageNet-format data), or an in-memory dataset.")
    flags.DEFINE_string("source", None, "imagenet: tfrecord (default) or a TFDS name; in-memory "
                        "datasets: tfds (default) or files.")
    train_flags.DEFINE_path("data_dir", None, "Data folder.")
    flags.DEFINE_string("split", "validation", "Evaluation split (TFDS or tfrecord prefix).")
    flags.DEFINE_integer("num_classes", None, "Classes of the model (default: the run's, else "
                         "1000).", lower_bound=1)
    flags.DEFINE_integer("eval_resize", 256, "Shorter side before the centre crop.", lower_bound=1)
    flags.DEFINE_integer("eval_size", 224, "Centre crop size.", lower_bound=1)
    flags.DEFINE_bool("ten_crop", False, "Average the softmax over 10 crops.")
    flags.DEFINE_integer("batch_size", 100, "Batch size.", lower_bound=1)
    flags.DEFINE_integer("label_offset", 1, "Subtracted from TFRecord labels.")
    flags.DEFINE_integer("max_batches", None, "Evaluate only this many batches.", lower_bound=1)
    train_flags.DEFINE_path("output", None, "Write the JSON result here too.")
    flags.register_multi_flags_validator(["dataset", "source", "data_dir", "split"],
                                         _source_is_readable)
    flags.register_multi_flags_validator(["dataset", "ten_crop"], _ten_crop_is_for_imagenet)
    flags.register_validator("output", _output_folder_exists)
    flags.register_multi_flags_validator(["weights", "config"], _run_config_is_sound)
    # fmt: on


def _source(values):
    if values["source"]:
        return values["source"]
    return "tfrecord" if values["dataset"] == "imagenet" else "tfds"


def _source_is_readable(values):
    dataset, source = values["dataset"], _source(values)
    if dataset != "imagenet" and source not in ("files", "tfds"):
        raise flags.ValidationError(
            f"--dataset={dataset} is read with --source=files or --source=tfds; got {source}."
        )
    if source in ("files", "tfrecord"):
        if not values["data_dir"]:
            raise flags.ValidationError(f"--source={source} needs --data_dir.")
        split = "train" if values["split"].startswith("train") else "validation"
        problem = (
            sources.files_problem(dataset, values["data_dir"])
            if source == "files"
            else sources.tfrecord_problem(values["data_dir"], [split])
        )
        if problem:
            raise flags.ValidationError(problem)
        return True
    problem = sources.tfds_problem(dataset if dataset != "imagenet" else source, values["data_dir"])
    if problem:
        raise flags.ValidationError(problem)
    return True


def _ten_crop_is_for_imagenet(values):
    if values["ten_crop"] and values["dataset"] != "imagenet":
        raise flags.ValidationError(
            f"--ten_crop crops ImageNet-format images (--dataset=imagenet); the "
            f"--dataset={values['dataset']} test images are evaluated whole."
        )
    return True


def _output_folder_exists(path):
    if path is None:
        return True
    if os.path.isdir(path):
        raise flags.ValidationError(f"--output={path} is a folder; pass a file name for the JSON.")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise flags.ValidationError(f"--output={path}: its folder {folder} does not exist.")
    return True


def _run_config_is_sound(values):
    """The run's `config.json` (found or given) must be JSON whose architecture options the
    builders take: a hand-edited one fails here, naming the file, the key and the value."""
    if values["config"] is not None and not fs.isfile(values["config"]):
        raise flags.ValidationError(f"--config={values['config']} is not a file.")
    path = values["config"] or config_path(values["weights"] or "")
    if path is None:
        return True
    try:
        run = read_run_config(path)
    except ValueError as e:
        raise flags.ValidationError(str(e)) from None
    problem = run_config_problem(run)
    if problem:
        raise flags.ValidationError(f"{path}: {problem} Fix the file, or pass --config.")
    return True


FLAGS = flags.FLAGS


def config_path(weights):
    """The `config.json` of the run that wrote the `.weights.h5` file `weights`, or None:
    next to the file, above `checkpoints/` or above `checkpoints/epoch-NNNN/`."""
    if not (weights.endswith(".weights.h5") and fs.isfile(weights)):
        return None
    folder = fs.dirname(weights)
    candidates = [folder, fs.dirname(folder)]
    if fs.basename(candidates[1]) == "checkpoints":
        candidates.append(fs.dirname(candidates[1]))
    for candidate in candidates:
        if fs.isfile(fs.join(candidate, "config.json")):
            return fs.join(candidate, "config.json")
    return None


def read_run_config(path):
    """The dict of a run's `config.json`; ValueError naming the file if it is not one."""
    try:
        run = fs.read_json(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is not a readable run config.json: {e}.") from None
    if not isinstance(run, dict):
        raise ValueError(f"{path} is not a run config.json: it holds no JSON object.")
    return run


def run_config_problem(run):
    """What in a run's config dict the builders would refuse, in one sentence, or None."""
    import keras_preact
    from keras_preact.train.config import SHORTCUT_PARAMS

    allowed = {
        "model": keras_preact.list_models(),
        "unit": list(keras_preact.units.UNITS),
        "shortcut": list(SHORTCUT_PARAMS),
    }
    for key, names in allowed.items():
        if key in run and run[key] not in names:
            return f'"{key}": {json.dumps(run[key])} is not one of {names}.'
    layout = run.get("layout")
    if layout is not None and not isinstance(layout, dict) and layout not in keras_preact.LAYOUTS:
        return (
            f'"layout": {json.dumps(layout)} is not one of {list(keras_preact.LAYOUTS)} '
            "(or a layout's config, a JSON object)."
        )
    numbers = {
        "width_multiplier": (lambda v: v > 0, "a number > 0"),
        "drop_path_rate": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
        "num_classes": (lambda v: v >= 1 and v == int(v), "an integer >= 1"),
    }
    for key, (ok, wanted) in numbers.items():
        value = run.get(key)
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if value is not None and not (number and ok(value)):
            return f'"{key}": {json.dumps(value)} is not {wanted}.'
    return None


def run_config(weights, path=None):
    """The `config.json` of the run that wrote `weights` (a dict), or None."""
    path = path or config_path(weights)
    return read_run_config(path) if path else None


def architecture(cfg, run):
    """The model name and architecture options: the run's, checked against the flags.

    A flag given explicitly must agree with the run's value: the weights only fit the
    architecture they were trained with.
    """
    options = {"model": cfg.model, **modeling.architecture(cfg)}
    if run is None:
        return options
    recorded = {"model": run.get("model"), **modeling.architecture(run)}
    for name, value in recorded.items():
        if name in cfg.origins and cfg.origins[name] == "flag" and cfg.values[name] != value:
            raise app.UsageError(
                f"--{name}={cfg.values[name]} contradicts the run that wrote --weights, "
                f"which trained {name}={value!r} (its config.json); leave --{name} out."
            )
    return recorded


class Plan(NamedTuple):
    """What to build: the architecture, and who normalizes the pixels."""

    options: dict  # "model" and the architecture options (empty for a .keras file)
    classes: int | None  # the weights' number of classes, when they say
    normalization: tuple | None  # (mean, std) the model applies to [0, 255] pixels


def plan(cfg, run):
    """The architecture of `--weights` and its input normalization.

    A trainer's `.weights.h5` with its `config.json`: the run's architecture, classes and
    normalization statistics. A record or an upstream file: its model, classes and
    preprocessing (weights carry their preprocessing). A bare `.weights.h5`: the flags', and
    the pipeline normalizes (the data set's statistics; ImageNet's for ImageNet data).
    """
    if cfg.weights.endswith(".keras"):
        return Plan({}, None, None)
    options = architecture(cfg, run)
    if run is not None:
        classes = run.get("num_classes") or sources.MEMORY_DATASETS.get(run.get("dataset"))
        normalization = (run["mean"], run["std"]) if "mean" in run else None
        return Plan(options, classes, normalization)
    if cfg.weights.endswith(".weights.h5"):
        return Plan(options, None, None)
    import keras_preact

    if not fs.isfile(cfg.weights):  # a record name
        options["model"] = options["model"] or keras_preact.weights.get_record(cfg.weights).model
    if not options["model"]:
        raise app.UsageError(f"--model is needed to build the network of {cfg.weights}.")
    record = modeling.start_record({**options, "weights": cfg.weights}, options["model"])
    normalization = None
    if record is not None and record.preprocessing is not None:
        normalization = keras_preact.imagenet_utils.mean_std(record.preprocessing)
    return Plan(options, record.classes if record is not None else None, normalization)


def build_model(cfg, plan, input_shape, classes):
    """The model at `input_shape`, with the weights of `--weights` loaded."""
    weights = cfg.weights
    if weights.endswith(".keras"):
        loaded = keras.saving.load_model(weights, compile=False)
        if tuple(loaded.input_shape[1:]) == tuple(input_shape):
            return loaded
        # Same weights at another resolution: rebuild the graph with a new input.
        model_config = loaded.get_config()
        model_config["layers"][0]["config"]["batch_shape"] = (None, *input_shape)
        model = keras.Model.from_config(model_config)
        model.set_weights(loaded.get_weights())
        return model
    if not plan.options["model"]:
        raise app.UsageError(
            "--model is needed: --weights has no config.json beside it (pass --config)."
        )
    mean, std = plan.normalization or (None, None)
    trainer_file = weights.endswith(".weights.h5")
    options = dict(plan.options)
    if fs.basename(fs.dirname(fs.dirname(weights))) != checkpoints.FOLDER:
        # A run's final and best weights are written-out nets, also with --scan_units;
        # only its resumable checkpoints hold the scanned stages.
        options["scan_units"] = False
    model = modeling.build_base(
        options,
        model=plan.options["model"],
        input_shape=input_shape,
        classes=classes,
        weights=None if trainer_file else weights,
        mean=mean,
        std=std,
    )
    if trainer_file:
        with fs.local_copy(weights) as local:
            model.load_weights(local)
    return model


def imagenet_batches(cfg, source, raw, num_classes):
    """Batches of the evaluation protocol (`--max_batches` of them at most), with their
    skip counter: [0, 255] pixels if `raw`, else normalized with ImageNet's statistics."""
    return sources.imagenet_eval_batches(
        source=source,
        split=cfg.split,
        data_dir=cfg.data_dir,
        batch_size=cfg.batch_size,
        size=cfg.eval_size,
        resize=cfg.eval_resize,
        ten_crop=cfg.ten_crop,
        label_offset=cfg.label_offset,
        num_classes=num_classes,
        raw=raw,
        max_batches=cfg.max_batches,
    )


def memory_batches(cfg, source, raw):
    """Test-set batches (`--max_batches` of them at most): uint8 pixels if `raw`, else
    normalized with the training set's statistics (what the trainer computes)."""
    from keras_preact.data import numpy_pipeline

    (x, _), (xt, yt) = sources.load_arrays(cfg.dataset, source, cfg.data_dir)
    mean, std = numpy_pipeline.channel_stats(x)
    ds = numpy_pipeline.ArrayDataset(
        xt, yt, cfg.batch_size, mean, std, training=False, normalize=not raw
    )
    count = min(len(ds), cfg.max_batches or len(ds))
    return (ds[i] for i in range(count)), xt.shape[1:]


def main(argv):
    del argv
    start = time.time()
    cfg = config.EvalConfig.from_flags(FLAGS)
    if cfg.dataset != "imagenet":
        given = [f"--{k}" for k in ("eval_resize", "eval_size") if cfg.origins[k] == "flag"]
        if given:
            raise app.UsageError(
                f"{' and '.join(given)} crop ImageNet-format images (--dataset=imagenet); the "
                f"--dataset={cfg.dataset} test images are evaluated whole: leave them out."
            )
    distribution.quiet_device_start()
    run = run_config(cfg.weights, cfg.config)
    what = plan(cfg, run)
    # The model normalizes [0, 255] pixels itself when the weights say how.
    raw = what.normalization is not None
    source = _source(cfg.values)
    if cfg.dataset == "imagenet":
        classes = cfg.num_classes or what.classes or 1000
        batches, counter = imagenet_batches(cfg, source, raw, classes)
        shape = (cfg.eval_size, cfg.eval_size, 3)
    else:
        batches, shape = memory_batches(cfg, source, raw)
        counter = None
        classes = cfg.num_classes or what.classes or sources.MEMORY_DATASETS[cfg.dataset]
    model = build_model(cfg, what, shape, classes)

    def probabilities(images):
        flat = images.reshape((-1, *images.shape[-3:]))
        logits = keras.ops.convert_to_numpy(model(flat, training=False)).astype(np.float64)
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        return probs.reshape((*images.shape[:-3], probs.shape[-1]))

    top1 = top5 = n = 0
    nll = 0.0
    for images, labels in batches:  # to the end: the skip counts are exact then
        probs = probabilities(images)
        if cfg.ten_crop:
            probs = probs.mean(1)
        ranked = np.argsort(-probs, -1)
        top1 += int(np.sum(ranked[:, 0] == labels))
        top5 += int(np.sum(np.any(ranked[:, :5] == labels[:, None], -1)))
        nll -= float(np.sum(np.log(np.maximum(probs[np.arange(len(labels)), labels], 1e-30))))
        n += len(labels)
    counts = counter.counts() if counter else {}
    skipped = {c: k for c, k in counts.items() if c != "delivered"}
    # The sizes the images were evaluated at: an in-memory test set is evaluated whole.
    sizes = (
        {"eval_resize": cfg.eval_resize, "eval_size": cfg.eval_size, "ten_crop": cfg.ten_crop}
        if cfg.dataset == "imagenet"
        else {"eval_size": int(shape[0])}
    )
    result = {
        "weights": cfg.weights,
        "model": what.options.get("model", model.name),
        "architecture": {k: v for k, v in what.options.items() if k != "model"},
        "normalization": list(map(list, what.normalization)) if raw else "pipeline",
        "run_config": bool(run),
        "dataset": cfg.dataset,
        "examples": n,
        "top1": top1 / max(n, 1),
        "top5": top5 / max(n, 1),
        "loss": nll / max(n, 1),
        **sizes,
        "skipped_images": sum(skipped.values()),
        "skipped_by_cause": skipped,
        "wall_time_s": round(time.time() - start, 1),
        "backend": keras.backend.backend(),
    }
    print(json.dumps(result, indent=2), flush=True)
    if cfg.output:
        fs.write_json_atomic(cfg.output, result)


def _one_line_errors(main):
    """`main`, with a usage error (a conflict found after parsing) or a failed write of
    `--output` ending the program with its message and exit code 1, as a bad flag does:
    no traceback, and no help text before it (absl prints the usage for a UsageError)."""

    def guarded(argv):
        try:
            return main(argv)
        except (app.UsageError, fs.WriteError) as e:
            print(f"{type(e).__name__}: {e}", file=sys.stderr, flush=True)
            sys.exit(1)

    return guarded


def run_main():
    """The console entry point: `python -m keras_preact.train.evaluate` or `training/evaluate.py`."""
    train_flags.list_in_help(define_flags())
    distribution.quiet_device_start(if_imported=True)  # absl's start-up makes TF look, loudly
    app.run(_one_line_errors(main))


if __name__ == "__main__":
    run_main()
