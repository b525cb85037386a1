r"""Images per second per CPU core of the ImageNet training input pipeline.

Compares, on real photographs (the ones bundled with scikit-image, re-encoded
as ImageNet-sized JPEGs and written to ImageNet-format TFRecords):

* fused:  `decode_and_crop_jpeg` of only the sampled crop window, then resize;
* decode_then_crop: decode the whole JPEG, crop, resize (same crop sampler);
* keras_cv: decode the whole JPEG, then `keras_cv.layers.RandomCropAndResize`
  with the same area and aspect-ratio ranges (if keras-cv imports).

Each variant runs the same tf.data graph (read, shuffle encoded records, parallel
map, flip, batch of 64, normalize) with tf.data's private thread pool and
TensorFlow's intra/inter-op pools limited to `--threads` threads. The per-core
rate is images per second of CPU time used by the process (`time.process_time`),
which does not depend on how many cores were free. Not a test; run by hand:

    pip install --no-deps keras-cv==0.9.0 && pip install regex
    KERAS_BACKEND=tensorflow python benchmarks/input_pipeline.py --threads=1
    KERAS_BACKEND=tensorflow python benchmarks/input_pipeline.py --threads=2
"""

import io
import os
import tempfile
import time

from absl import app, flags

flags.DEFINE_integer("threads", 1, "CPU threads for tf.data and TF ops.")
flags.DEFINE_integer("images", 256, "Distinct JPEGs written to the shards.")
flags.DEFINE_integer("batches", 40, "Timed batches of 64 per variant (after 5 warm-up).")
flags.DEFINE_list("variants", ["fused", "decode_then_crop", "keras_cv"], "What to time.")
FLAGS = flags.FLAGS


def make_jpegs(count, seed=0):
    """ImageNet-like JPEGs (about 500x375 px, quality 95) cut from real photos."""
    import numpy as np
    from PIL import Image
    from skimage import data

    photos = [
        data.astronaut(),
        data.coffee(),
        data.chelsea(),
        data.rocket(),
        data.hubble_deep_field(),
        data.immunohistochemistry(),
    ]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        photo = Image.fromarray(photos[i % len(photos)][..., :3])
        w, h = photo.size
        scale = rng.uniform(0.85, 1.15) * 420 / min(w, h)
        photo = photo.resize((int(w * scale), int(h * scale)), Image.BILINEAR)
        w, h = photo.size
        cw, ch = int(w * rng.uniform(0.8, 1.0)), int(h * rng.uniform(0.8, 1.0))
        x, y = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
        buf = io.BytesIO()
        photo.crop((x, y, x + cw, y + ch)).save(buf, format="JPEG", quality=95)
        out.append(buf.getvalue())
    return out


def main(argv):
    del argv
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(FLAGS.threads)
    tf.config.threading.set_inter_op_parallelism_threads(FLAGS.threads)
    from keras_preact.data import imagenet_preprocessing as ipp
    from keras_preact.data import tfdata

    jpegs = make_jpegs(FLAGS.images)
    folder = tempfile.mkdtemp()
    for shard in range(4):
        tfdata.write_imagenet_tfrecords(
            os.path.join(folder, f"train-{shard:05d}-of-00004"),
            jpegs[shard::4],
            [1] * len(jpegs[shard::4]),
        )
    sizes = [tf.image.extract_jpeg_shape(j).numpy()[:2] for j in jpegs]
    mean_kb = sum(len(j) for j in jpegs) / len(jpegs) / 1024
    print(
        f"{len(jpegs)} JPEGs, mean {mean_kb:.0f} KB, mean size "
        f"{sum(s[0] for s in sizes) / len(sizes):.0f}x{sum(s[1] for s in sizes) / len(sizes):.0f}"
        f" px; threads={FLAGS.threads}"
    )

    options = tf.data.Options()
    options.threading.private_threadpool_size = FLAGS.threads
    options.threading.max_intra_op_parallelism = 1

    def keras_cv_map():
        import keras_cv

        layer = keras_cv.layers.RandomCropAndResize(
            target_size=(224, 224), crop_area_factor=(0.08, 1.0), aspect_ratio_factor=(3 / 4, 4 / 3)
        )

        def fn(image_bytes):
            image = tf.cast(ipp.decode_full(image_bytes), tf.float32)
            return tf.image.random_flip_left_right(layer(image))

        return fn

    maps = {
        "fused": lambda: lambda b: ipp.preprocess_train(b, crop="inception", fused=True),
        "decode_then_crop": lambda: (
            lambda b: ipp.preprocess_train(b, crop="inception", fused=False)
        ),
        "scale_fused": lambda: lambda b: ipp.preprocess_train(b, crop="scale", fused=True),
        "keras_cv": keras_cv_map,
    }
    results = {}
    for name in FLAGS.variants:
        try:
            fn = maps[name]()
        except Exception as e:  # keras-cv missing or not importable: say so.
            print(f"{name}: unavailable ({type(e).__name__}: {e})")
            continue
        files = tf.data.Dataset.list_files(os.path.join(folder, "train-*"), shuffle=False)
        ds = files.interleave(tf.data.TFRecordDataset, cycle_length=4)
        ds = ds.map(tfdata.parse_example).cache().shuffle(len(jpegs)).repeat()
        ds = ds.map(lambda b, y, fn=fn: (fn(b), y), num_parallel_calls=tf.data.AUTOTUNE)
        ds = ds.batch(64, drop_remainder=True)
        ds = ds.map(lambda x, y: (ipp.normalize(x), y)).with_options(options).prefetch(2)
        it = iter(ds)
        for _ in range(5):
            next(it)
        start, cpu_start = time.perf_counter(), time.process_time()
        for _ in range(FLAGS.batches):
            images, _ = next(it)
        images.numpy()
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        count = FLAGS.batches * 64
        # images/s/core: images per second of CPU time used by the whole process.
        results[name] = count / cpu
        print(
            f"{name:18s} {count / wall:8.1f} images/s wall  {count / cpu:8.1f} "
            f"images/s/core (CPU time; {cpu / wall:.2f} cores busy)",
            flush=True,
        )
    if "fused" in results and "decode_then_crop" in results:
        print(
            f"fused / decode_then_crop (per core): "
            f"{results['fused'] / results['decode_then_crop']:.2f}x"
        )


if __name__ == "__main__":
    app.run(main)
