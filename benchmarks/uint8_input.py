r"""Host-to-device bytes per batch and CPU step time: float32 batches vs uint8 batches.

The trainers (`--normalize_on_device`, the default) ship uint8 images and normalize them
on the device, as the model's first op; `--nonormalize_on_device` normalizes on the host
and ships float32. This script measures, for the trainers' own pipelines and models:

* bytes per batch: `images.nbytes + labels.nbytes` of real batches of the input
  pipelines (numpy `ArrayDataset`, tf.data `array_dataset` for CIFAR; tf.data
  `imagenet_dataset` on ImageNet-format shards of scikit-image photos for ImageNet), each
  with `normalize=True` (float32) and `normalize=False` (uint8): what `fit` copies to
  the accelerator per step;
* host time per batch of the numpy pipeline (CPU time of `ArrayDataset[i]`);
* the training-step time (`train_on_batch`, SGD + momentum, the trainers' loss) of the
  model fed float32 batches and of the same model built with `include_preprocessing=True`
  (the trainers' on-device normalization, its first layer) fed uint8 batches, timed in
  interleaved rounds (A, B, A, B, ...), median per-step time over rounds.

    KERAS_BACKEND=tensorflow python benchmarks/uint8_input.py --case=cifar
    KERAS_BACKEND=tensorflow python benchmarks/uint8_input.py --case=imagenet --batch=16
"""

import argparse
import importlib.util
import os
import statistics
import tempfile
import time

import keras
import numpy as np

from keras_preact.data import numpy_pipeline
from keras_preact.train import modeling, optimization

CASES = {
    # name: (model, image shape, classes, default batch)
    "cifar": ("PreActResNet20", (32, 32, 3), 10, 128),
    "imagenet": ("PreActResNet50", (224, 224, 3), 1000, 16),
}


def _sibling(name):
    """`benchmarks/<name>.py` as a module: the benchmarks are scripts, not a package."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def batch_bytes(batch):
    images, labels = batch
    return int(np.asarray(images).nbytes + np.asarray(labels).nbytes), str(np.asarray(images).dtype)


def cifar_pipelines(batch, seed=0):
    """`{pipeline: {normalize: (bytes, dtype, host ms/batch or None)}}` of the CIFAR pipelines."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (50 * batch, 32, 32, 3), dtype=np.uint8)
    y = rng.integers(0, 10, len(x))
    mean, std = numpy_pipeline.channel_stats(x)
    out = {"numpy": {}}
    for normalize in (True, False):
        ds = numpy_pipeline.ArrayDataset(x, y, batch, mean, std, training=True, normalize=normalize)
        ds[0]
        start = time.process_time()
        for i in range(1, 21):
            ds[i]
        host_ms = (time.process_time() - start) / 20 * 1e3
        out["numpy"][normalize] = (*batch_bytes(ds[0]), host_ms)
    if keras.backend.backend() == "tensorflow":
        from keras_preact.data import tfdata

        out["tfdata"] = {}
        for normalize in (True, False):
            ds = tfdata.array_dataset(
                x,
                y,
                batch_size=batch,
                training=True,
                mean=mean,
                std=std,
                normalize=normalize,
                num_batches=1,
            )
            out["tfdata"][normalize] = (*batch_bytes(next(iter(ds))), None)
    return out, (x[:batch], y[:batch], mean, std)


def imagenet_pipelines(batch):
    """The ImageNet pipeline's batches on shards of real photos (needs TensorFlow)."""
    if keras.backend.backend() != "tensorflow":
        return {}, None
    from keras_preact.data import tfdata

    make_jpegs = _sibling("input_pipeline").make_jpegs

    folder = tempfile.mkdtemp()
    jpegs = make_jpegs(2 * batch)
    tfdata.write_imagenet_tfrecords(
        os.path.join(folder, "train-00000-of-00001"), jpegs, [1] * len(jpegs)
    )
    out = {"tfdata imagenet": {}}
    first = None
    for normalize in (True, False):
        spec = tfdata.InputSpec(source="tfrecord", data_dir=folder, batch_size=batch,
                                normalize=normalize, shuffle_buffer=8)  # fmt: skip
        ds = tfdata.imagenet_dataset(spec, "train", training=True)
        images, labels = next(iter(ds))
        out["tfdata imagenet"][normalize] = (*batch_bytes((images, labels)), None)
        if not normalize:
            first = np.asarray(images), np.asarray(labels)
    return out, first


def step_times(name, shape, classes, batch, steps, rounds, images_u8, labels, mean, std):
    """Median ms/step of the float32 model and of the uint8 model (normalizing on device)."""
    float_images = numpy_pipeline.normalize(images_u8, np.asarray(mean), np.asarray(std))
    models = {}
    for kind in ("float32 (host normalizes)", "uint8 (device normalizes)"):
        keras.utils.set_random_seed(0)
        on_device = kind.startswith("uint8")
        # The trainers' model: `include_preprocessing=True` when it normalizes on the device.
        model = modeling.build_base(
            {},
            model=name,
            input_shape=shape,
            classes=classes,
            mean=mean if on_device else None,
            std=std if on_device else None,
        )
        model.compile(keras.optimizers.SGD(0.01, momentum=0.9), optimization.SparseCrossentropy())
        x = images_u8 if on_device else float_images
        for _ in range(3):  # compilation and warm-up
            model.train_on_batch(x, labels)
        models[kind] = (model, x)
    times = {k: [] for k in models}
    for _ in range(rounds):
        for kind, (model, x) in models.items():
            start = time.perf_counter()
            for _ in range(steps):
                model.train_on_batch(x, labels)
            times[kind].append((time.perf_counter() - start) / steps * 1e3)
    return {k: (statistics.median(v), min(v), max(v)) for k, v in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--case", choices=list(CASES), default="cifar")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    name, shape, classes, default_batch = CASES[args.case]
    batch = args.batch or default_batch
    print(
        f"{args.case}: {name}, batch {batch} of {shape}, keras {keras.__version__}, "
        f"backend {keras.backend.backend()}"
    )
    rng = np.random.default_rng(0)
    if args.case == "cifar":
        pipelines, (images, labels, mean, std) = cifar_pipelines(batch)
    else:
        from keras_preact.data.imagenet_preprocessing import MEAN_RGB, STDDEV_RGB

        pipelines, first = imagenet_pipelines(batch)
        mean, std = MEAN_RGB, STDDEV_RGB
        if first is None:
            first = (
                rng.integers(0, 256, (batch, *shape), dtype=np.uint8),
                rng.integers(0, classes, batch),
            )
        images, labels = first
    print("\nbytes per batch, host to device:")
    for pipeline, by_setting in pipelines.items():
        (f_bytes, f_dtype, f_ms), (u_bytes, u_dtype, u_ms) = by_setting[True], by_setting[False]
        line = (
            f"  {pipeline:16s} normalize on host: {f_bytes:>10,d} B ({f_dtype})   "
            f"on device: {u_bytes:>10,d} B ({u_dtype})   ratio {f_bytes / u_bytes:.2f}x"
        )
        if f_ms is not None:
            line += f"   host CPU {f_ms:.2f} vs {u_ms:.2f} ms/batch"
        print(line)
    print(f"\ntraining step ({args.rounds} rounds of {args.steps} steps, median [min-max]):")
    results = step_times(
        name, shape, classes, batch, args.steps, args.rounds, images, labels, mean, std
    )
    for kind, (median, lo, hi) in results.items():
        print(f"  {kind:28s} {median:8.1f} ms/step  [{lo:.1f}-{hi:.1f}]")
    (a, _, _), (b, _, _) = results.values()
    print(f"  uint8 / float32: {b / a:.3f}")


if __name__ == "__main__":
    main()
