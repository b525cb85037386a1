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
import time
from typing import NamedTuple

import keras
import numpy as np
from absl import app, flags

from keras_preact.train import checkpoints, config, modeling, sources
from keras_preact.train import flags as train_flags

train_flags.define_model_flags(
    model=None,
    weights_help="A .weights.h5 or .keras file, or a keras_preact weights record "
    "(fashion_mnist, imagenet, imagenet:fb_torch, ...).",
)
flags.mark_flag_as_required("weights")
flags.adopt_module_key_flags(train_flags)  # `--help` lists the shared flags too
flags.DEFINE_string(
    "config",
    None,
    "The run's config.json (default: next to --weights, or above its checkpoints/ folder).",
)
flags.DEFINE_enum(
    "dataset",
    "imagenet",
    ["imagenet", *sources.MEMORY_DATASETS],
    "imagenet (ImageNet-format data), or an in-memory dataset.",
)
flags.DEFINE_string(
    "source",
    None,
    "imagenet: tfrecord (default) or a TFDS name; in-memory datasets: tfds (default) or files.",
)
flags.DEFINE_string("data_dir", None, "Data folder.")
flags.DEFINE_string("split", "validation", "Evaluation split (TFDS or tfrecord prefix).")
flags.DEFINE_integer(
    "num_classes", None, "Classes of the model (default: the run's, else 1000).", lower_bound=1
)
flags.DEFINE_integer("eval_resize", 256, "Shorter side before the centre crop.", lower_bound=1)
flags.DEFINE_integer("eval_size", 224, "Centre crop size.", lower_bound=1)
flags.DEFINE_bool("ten_crop", False, "Average the softmax over 10 crops.")
flags.DEFINE_integer("batch_size", 100, "Batch size.", lower_bound=1)
flags.DEFINE_integer("label_offset", 1, "Subtracted from TFRecord labels.")
flags.DEFINE_integer("max_batches", None, "Evaluate only this many batches.", lower_bound=1)
flags.DEFINE_string("output", None, "Write the JSON result here too.")


def _source(values):
    if values["source"]:
        return values["source"]
    return "tfrecord" if values["dataset"] == "imagenet" else "tfds"


@flags.multi_flags_validator(["dataset", "source", "data_dir"])
def _source_is_readable(values):
    dataset, source = values["dataset"], _source(values)
    if dataset != "imagenet" and source not in ("files", "tfds"):
        raise flags.ValidationError(
            f"--dataset={dataset} is read with --source=files or --source=tfds; got {source}."
        )
    if source in ("files", "tfrecord"):
        if not values["data_dir"]:
            raise flags.ValidationError(f"--source={source} needs --data_dir.")
        return True
    problem = sources.tfds_problem(dataset if dataset != "imagenet" else source, values["data_dir"])
    if problem:
        raise flags.ValidationError(problem)
    return True


FLAGS = flags.FLAGS


def run_config(weights, path=None):
    """The `config.json` of the run that wrote `weights` (a dict), or None."""
    if path is None and weights.endswith(".weights.h5") and os.path.isfile(weights):
        folder = os.path.dirname(os.path.abspath(weights))
        # Next to the file, above checkpoints/ or above checkpoints/epoch-NNNN/.
        candidates = [folder, os.path.dirname(folder)]
        if os.path.basename(candidates[1]) == "checkpoints":
            candidates.append(os.path.dirname(candidates[1]))
        for candidate in candidates:
            if os.path.isfile(os.path.join(candidate, "config.json")):
                path = os.path.join(candidate, "config.json")
                break
    if path is None:
        return None
    with open(path) as f:
        return json.load(f)


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

    if not os.path.isfile(cfg.weights):  # a record name
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
    in_checkpoint = os.path.basename(os.path.dirname(os.path.dirname(os.path.abspath(weights))))
    if in_checkpoint != checkpoints.FOLDER:
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
        model.load_weights(weights)
    return model


def imagenet_batches(cfg, source, raw, num_classes):
    """Batches of the evaluation protocol: [0, 255] pixels if `raw`, else normalized with
    ImageNet's statistics."""
    import tensorflow as tf

    from keras_preact.data import imagenet_preprocessing as ipp
    from keras_preact.data import tfdata

    counter = tfdata.SkipCounter()
    if not cfg.ten_crop:
        ds = tfdata.imagenet_dataset(
            source=source,
            split=cfg.split,
            data_dir=cfg.data_dir,
            batch_size=cfg.batch_size,
            training=False,
            image_size=cfg.eval_size,
            eval_resize=cfg.eval_resize,
            label_offset=cfg.label_offset,
            counter=counter,
            normalize=not raw,
            num_classes=num_classes,
        )
    else:
        records = tfdata.encoded_records(
            source=source,
            split=cfg.split,
            data_dir=cfg.data_dir,
            deterministic=True,
            label_offset=cfg.label_offset,
            num_classes=num_classes,
            counter=counter,
        )

        def crops(image_bytes):
            images = ipp.ten_crop(image_bytes, resize=cfg.eval_resize, crop=cfg.eval_size)
            return tf.cast(tf.round(images), tf.uint8) if raw else ipp.normalize(images)

        ds = records.map(counter.wrap(crops), num_parallel_calls=tf.data.AUTOTUNE)
        ds = ds.ignore_errors().batch(cfg.batch_size).prefetch(tf.data.AUTOTUNE)
    return ds.as_numpy_iterator(), counter


def memory_batches(cfg, source, raw):
    """Test-set batches: uint8 pixels if `raw`, else normalized with the training set's
    statistics (what the trainer computes)."""
    from keras_preact.data import numpy_pipeline

    (x, _), (xt, yt) = sources.load_arrays(cfg.dataset, source, cfg.data_dir)
    mean, std = numpy_pipeline.channel_stats(x)
    ds = numpy_pipeline.ArrayDataset(
        xt, yt, cfg.batch_size, mean, std, training=False, normalize=not raw
    )
    return (ds[i] for i in range(len(ds))), xt.shape[1:]


def main(argv):
    del argv
    start = time.time()
    cfg = config.EvalConfig.from_flags(FLAGS)
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
    for i, (images, labels) in enumerate(batches):
        if cfg.max_batches and i >= cfg.max_batches:
            break
        probs = probabilities(images)
        if cfg.ten_crop:
            probs = probs.mean(1)
        ranked = np.argsort(-probs, -1)
        top1 += int(np.sum(ranked[:, 0] == labels))
        top5 += int(np.sum(np.any(ranked[:, :5] == labels[:, None], -1)))
        nll -= float(np.sum(np.log(np.maximum(probs[np.arange(len(labels)), labels], 1e-30))))
        n += len(labels)
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
        "eval_resize": cfg.eval_resize,
        "eval_size": cfg.eval_size,
        "ten_crop": cfg.ten_crop,
        "skipped_images": counter.skipped() if counter else 0,
        "skipped_by_cause": (
            {c: n for c, n in counter.counts().items() if c != "delivered"} if counter else {}
        ),
        "wall_time_s": round(time.time() - start, 1),
        "backend": keras.backend.backend(),
    }
    print(json.dumps(result, indent=2), flush=True)
    if cfg.output:
        checkpoints.write_json_atomic(cfg.output, result)


def run_main():
    """The console entry point: `python -m keras_preact.train.evaluate` or `training/evaluate.py`."""
    app.run(main)


if __name__ == "__main__":
    run_main()
