r"""Single-crop (or 10-crop) top-1 / top-5 of a trained model on ImageNet-format data.

    # 224 centre crop of the image resized to 256 (the standard protocol):
    python training/evaluate.py --model=PreActResNet200 \
        --weights=runs/r200/final.weights.h5 --source=tfrecord --data_dir=/data/imagenet

    # The paper's Table 5: 320 centre crop of the image resized to 320, same weights.
    python training/evaluate.py ... --eval_resize=320 --eval_size=320

    # 10-crop (four corners, centre and their mirrors, softmax averaged):
    python training/evaluate.py ... --ten_crop

    # In-memory datasets (CIFAR, Fashion-MNIST), no TensorFlow needed with --source=files:
    python training/evaluate.py --model=PreActResNet20 --dataset=fashion_mnist \
        --source=files --data_dir=/usr/share/datasets/fashion-mnist \
        --weights=runs/fmnist_r20/final.weights.h5

`--weights` is a `.weights.h5` file (the model is built from `--model`, at the
evaluation size: the network is fully convolutional) or a whole `.keras` model.
"""

import json
import os
import sys
import time

import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402

flags.DEFINE_string("model", None, "Builder name; needed for a .weights.h5 file.")
flags.DEFINE_string("weights", None, "A .weights.h5 or .keras file.", required=True)
flags.DEFINE_string(
    "dataset", "imagenet", "imagenet, or an in-memory dataset: cifar10, cifar100, fashion_mnist."
)
flags.DEFINE_string(
    "source",
    "tfrecord",
    "tfrecord or a TFDS name for imagenet; files or tfds for the in-memory datasets.",
)
flags.DEFINE_string("data_dir", None, "Data folder.")
flags.DEFINE_string("split", "validation", "Evaluation split (TFDS or tfrecord prefix).")
flags.DEFINE_integer("num_classes", 1000, "Classes of the model (ImageNet data).")
flags.DEFINE_integer("eval_resize", 256, "Shorter side before the centre crop.")
flags.DEFINE_integer("eval_size", 224, "Centre crop size.")
flags.DEFINE_bool("ten_crop", False, "Average the softmax over 10 crops.")
flags.DEFINE_integer("batch_size", 100, "Batch size.")
flags.DEFINE_integer("label_offset", 1, "Subtracted from TFRecord labels.")
flags.DEFINE_integer("max_batches", None, "Evaluate only this many batches.")
flags.DEFINE_string("output", None, "Write the JSON result here too.")

FLAGS = flags.FLAGS


def build_model(input_shape, classes):
    """The model at `input_shape`, with the weights of `--weights` loaded."""
    import keras_preact

    if FLAGS.weights.endswith(".keras"):
        loaded = keras.saving.load_model(FLAGS.weights, compile=False)
        if tuple(loaded.input_shape[1:]) == tuple(input_shape):
            return loaded
        # Same weights at another resolution: rebuild the graph with a new input.
        config = loaded.get_config()
        config["layers"][0]["config"]["batch_shape"] = (None, *input_shape)
        model = keras.Model.from_config(config)
        model.set_weights(loaded.get_weights())
        return model
    if not FLAGS.model:
        raise app.UsageError("--model is needed with a .weights.h5 file.")
    model = keras_preact.get_model(
        FLAGS.model,
        input_shape=input_shape,
        classes=classes,
        classifier_activation=None,
        weights=None,
    )
    model.load_weights(FLAGS.weights)
    return model


def imagenet_batches():
    import tensorflow as tf

    from keras_preact.data import imagenet_preprocessing as ipp
    from keras_preact.data import tfdata

    counter = tfdata.SkipCounter()
    if not FLAGS.ten_crop:
        ds = tfdata.imagenet_dataset(
            source=FLAGS.source,
            split=FLAGS.split,
            data_dir=FLAGS.data_dir,
            batch_size=FLAGS.batch_size,
            training=False,
            image_size=FLAGS.eval_size,
            eval_resize=FLAGS.eval_resize,
            label_offset=FLAGS.label_offset,
            counter=counter,
        )
    else:
        records = tfdata._encoded_records(
            FLAGS.source, FLAGS.split, FLAGS.data_dir, False, None, 0, True, FLAGS.label_offset, 16
        )
        crops = counter.wrap(
            lambda b: ipp.normalize(ipp.ten_crop(b, resize=FLAGS.eval_resize, crop=FLAGS.eval_size))
        )
        ds = records.map(crops, num_parallel_calls=tf.data.AUTOTUNE).ignore_errors()
        ds = ds.batch(FLAGS.batch_size).prefetch(tf.data.AUTOTUNE)
    return ds.as_numpy_iterator(), counter


def memory_batches():
    from keras_preact.data import numpy_pipeline

    if FLAGS.source == "files":
        if FLAGS.dataset == "fashion_mnist":
            from keras_preact.data import idx

            (x, _), (xt, yt) = idx.load_fashion_mnist(FLAGS.data_dir)
        else:
            from keras_preact.data import cifar_files

            (x, _), (xt, yt) = cifar_files.load_cifar(FLAGS.dataset, FLAGS.data_dir)
    else:
        from keras_preact.data import tfdata

        (x, _), (xt, yt) = tfdata.load_tfds_arrays(FLAGS.dataset, data_dir=FLAGS.data_dir)
    mean, std = numpy_pipeline.channel_stats(x)  # the trainer's statistics
    ds = numpy_pipeline.ArrayDataset(xt, yt, FLAGS.batch_size, mean, std, training=False)
    return (ds[i] for i in range(len(ds))), None, xt.shape[1:], int(yt.max()) + 1


def main(argv):
    del argv
    start = time.time()
    if FLAGS.dataset == "imagenet":
        batches, counter = imagenet_batches()
        shape, classes = (FLAGS.eval_size, FLAGS.eval_size, 3), FLAGS.num_classes
    else:
        batches, counter, shape, classes = memory_batches()
    model = build_model(shape, classes)

    def probabilities(images):
        flat = images.reshape((-1, *images.shape[-3:]))
        logits = keras.ops.convert_to_numpy(model(flat, training=False)).astype(np.float64)
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        return probs.reshape((*images.shape[:-3], probs.shape[-1]))

    top1 = top5 = n = 0
    for i, (images, labels) in enumerate(batches):
        if FLAGS.max_batches and i >= FLAGS.max_batches:
            break
        probs = probabilities(images)
        if FLAGS.ten_crop:
            probs = probs.mean(1)
        ranked = np.argsort(-probs, -1)
        top1 += int(np.sum(ranked[:, 0] == labels))
        top5 += int(np.sum(np.any(ranked[:, :5] == labels[:, None], -1)))
        n += len(labels)
    result = {
        "weights": FLAGS.weights,
        "model": FLAGS.model,
        "dataset": FLAGS.dataset,
        "examples": n,
        "top1": top1 / max(n, 1),
        "top5": top5 / max(n, 1),
        "eval_resize": FLAGS.eval_resize,
        "eval_size": FLAGS.eval_size,
        "ten_crop": FLAGS.ten_crop,
        "skipped_images": counter.skipped() if counter else 0,
        "wall_time_s": round(time.time() - start, 1),
        "backend": keras.backend.backend(),
    }
    print(json.dumps(result, indent=2), flush=True)
    if FLAGS.output:
        with open(FLAGS.output, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    app.run(main)
