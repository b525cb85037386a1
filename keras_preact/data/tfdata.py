"""tf.data pipelines: CIFAR-style in-memory data and ImageNet-format images.

TensorFlow is imported here and never by `import keras_preact`. Every builder
takes a `tf.distribute.InputContext` (or None) and returns a dataset of
per-replica batches for that input pipeline, ready for
`strategy.distribute_datasets_from_function`.
"""

import functools
import os

import numpy as np
import tensorflow as tf

from keras_preact.data import imagenet_preprocessing as ipp

AUTOTUNE = tf.data.AUTOTUNE


def per_replica_batch(global_batch_size, input_context):
    """The batch size of one replica; checks the global batch divides evenly."""
    if input_context is None:
        return global_batch_size
    replicas = input_context.num_replicas_in_sync
    if global_batch_size % replicas:
        raise ValueError(
            f"global batch_size={global_batch_size} is not divisible by the {replicas} replicas."
        )
    return global_batch_size // replicas


def _options(deterministic):
    # Evaluation is always ordered; training may trade order for throughput.
    options = tf.data.Options()
    options.deterministic = bool(deterministic)
    options.experimental_optimization.map_parallelization = True
    # Files are sharded by hand below; turn off auto-sharding so every input
    # pipeline of a multi-worker run does not also re-shard by element.
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return options


# ----------------------------------------------------------------------------
# CIFAR-style in-memory data.


def cifar_augment(image, *, padding=4, flip=True, seed=None):
    """4-pixel zero padding, random crop back to the input size, random flip.

    Args:
        image: `(H, W, C)` image tensor.
        padding: pixels of padding on each side.
        flip: random left-right flip.
        seed: a stateless seed `(2,)` int tensor, or None for stateful ops.

    Returns:
        The augmented image, same shape and dtype.
    """
    h, w, c = image.shape
    padded = tf.pad(image, [[padding, padding], [padding, padding], [0, 0]])
    if seed is None:
        image = tf.image.random_crop(padded, [h, w, c])
        if flip:
            image = tf.image.random_flip_left_right(image)
        return image
    seeds = tf.random.experimental.stateless_split(seed, 2)
    image = tf.image.stateless_random_crop(padded, [h, w, c], seed=seeds[0])
    if flip:
        image = tf.image.stateless_random_flip_left_right(image, seed=seeds[1])
    return image


def array_dataset(
    images,
    labels,
    *,
    batch_size,
    training,
    mean,
    std,
    input_context=None,
    padding=4,
    flip=True,
    seed=0,
    deterministic=False,
    shuffle_buffer=None,
    normalize=True,
):
    """Dataset of CIFAR-style batches from uint8 arrays held in memory.

    Args:
        images: uint8 `(N, H, W, C)`.
        labels: int `(N,)`.
        batch_size: the global batch size.
        training: shuffle, repeat, augment and drop the remainder.
        mean: per-channel mean, [0, 1] units.
        std: per-channel standard deviation, [0, 1] units.
        input_context: `tf.distribute.InputContext`, or None for one pipeline.
        padding: padding of the random crop; 0 disables it.
        flip: random horizontal flips.
        seed: seed of the shuffle and the augmentation.
        deterministic: fixed element order and stateless random ops.
        shuffle_buffer: default: the whole (sharded) dataset.
        normalize: map images to float32 `(x / 255 - mean) / std`; if False, batches stay
            uint8 (4x fewer bytes to the accelerator) and the model normalizes them.

    Returns:
        A `tf.data.Dataset` of `(float32 images, int64 labels)` batches (uint8 images
        with `normalize=False`).

    Example:

    >>> x = np.zeros((16, 28, 28, 1), np.uint8); y = np.zeros(16, np.int64)
    >>> ds = array_dataset(x, y, batch_size=8, training=True, mean=[0.5], std=[0.5])
    >>> next(iter(ds))[0].shape
    TensorShape([8, 28, 28, 1])
    """
    batch = per_replica_batch(batch_size, input_context)
    ds = tf.data.Dataset.from_tensor_slices((images, np.asarray(labels, np.int64)))
    if input_context is not None and input_context.num_input_pipelines > 1:
        ds = ds.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
    mean = tf.constant(mean, tf.float32)
    std = tf.constant(std, tf.float32)

    def normalize_batch(x, y):
        return (tf.cast(x, tf.float32) / 255.0 - mean) / std, y

    if training:
        ds = ds.shuffle(shuffle_buffer or len(images), seed=seed, reshuffle_each_iteration=True)
        ds = ds.repeat()
        if deterministic:
            ds = tf.data.Dataset.zip((ds, tf.data.Dataset.random(seed=seed).batch(2)))
            ds = ds.map(
                lambda xy, s: (cifar_augment(xy[0], padding=padding, flip=flip, seed=s), xy[1]),
                num_parallel_calls=AUTOTUNE,
            )
        else:
            ds = ds.map(
                lambda x, y: (cifar_augment(x, padding=padding, flip=flip), y),
                num_parallel_calls=AUTOTUNE,
            )
    ds = ds.batch(batch, drop_remainder=training)
    if normalize:
        ds = ds.map(normalize_batch, num_parallel_calls=AUTOTUNE)
    return ds.with_options(_options(deterministic or not training)).prefetch(AUTOTUNE)


def load_tfds_arrays(name, data_dir=None, download=True):
    """Loads a small TFDS dataset (cifar10, cifar100, fashion_mnist) as numpy.

    Returns:
        `((x_train, y_train), (x_test, y_test))` as uint8 / int64 arrays.
    """
    import tensorflow_datasets as tfds

    out = []
    for split in ("train", "test"):
        x, y = tfds.as_numpy(
            tfds.load(
                name,
                split=split,
                batch_size=-1,
                as_supervised=True,
                data_dir=data_dir,
                download=download,
            )
        )
        out.append((x.astype(np.uint8), y.astype(np.int64)))
    return tuple(out)


# ----------------------------------------------------------------------------
# ImageNet-format data: TFRecord shards or TFDS, kept encoded until the map.


class SkipCounter:
    """Counts the images a pipeline could not decode and skipped.

    Each element increments `started` before decoding and `decoded` after; an
    element whose decode fails raises inside the map, is dropped by
    `ignore_errors` and never reaches `decoded`. `skipped()` is exact once the
    dataset is exhausted; mid-epoch it can also include the few elements in
    flight.
    """

    def __init__(self):
        with tf.init_scope():
            self.started = tf.Variable(0, dtype=tf.int64, trainable=False, name="started")
            self.decoded = tf.Variable(0, dtype=tf.int64, trainable=False, name="decoded")

    def skipped(self):
        return int(self.started.numpy() - self.decoded.numpy())

    def wrap(self, fn):
        def counted(image_bytes, label):
            with tf.control_dependencies([self.started.assign_add(1)]):
                image = fn(image_bytes)
            with tf.control_dependencies([image]):
                done = self.decoded.assign_add(1)
            with tf.control_dependencies([done]):
                return tf.identity(image), label

        return counted


def parse_example(serialized, label_offset=1):
    """ImageNet TFRecord example -> `(encoded image, label - label_offset)`.

    The TF official and TPU ImageNet scripts store `image/encoded` and a 1-based
    `image/class/label` (0 is "background"), hence the default offset of 1.
    """
    features = tf.io.parse_single_example(
        serialized,
        {
            "image/encoded": tf.io.FixedLenFeature([], tf.string),
            "image/class/label": tf.io.FixedLenFeature([], tf.int64),
        },
    )
    return features["image/encoded"], features["image/class/label"] - label_offset


def write_imagenet_tfrecords(path, encoded_images, labels):
    """Writes `(encoded bytes, 1-based label)` pairs as one ImageNet-format shard."""
    with tf.io.TFRecordWriter(path) as writer:
        for data, label in zip(encoded_images, labels):
            example = tf.train.Example(
                features=tf.train.Features(
                    feature={
                        "image/encoded": tf.train.Feature(
                            bytes_list=tf.train.BytesList(value=[data])
                        ),
                        "image/class/label": tf.train.Feature(
                            int64_list=tf.train.Int64List(value=[int(label)])
                        ),
                    }
                )
            )
            writer.write(example.SerializeToString())


def _encoded_records(
    source,
    split,
    data_dir,
    training,
    input_context,
    seed,
    deterministic,
    label_offset,
    cycle_length,
):
    """Dataset of `(encoded image, label)`, one file-level shard per input pipeline."""
    pipelines = input_context.num_input_pipelines if input_context else 1
    pipeline_id = input_context.input_pipeline_id if input_context else 0
    if source == "tfrecord":
        prefix = "train" if split.startswith("train") else "validation"
        files = sorted(tf.io.gfile.glob(os.path.join(data_dir, f"{prefix}-*")))
        if not files:
            raise FileNotFoundError(f"No {prefix}-* TFRecord shards in {data_dir!r}.")
        if len(files) < pipelines:
            raise ValueError(
                f"{len(files)} {prefix} shards cannot be split over {pipelines} input "
                "pipelines; write at least one shard per pipeline."
            )
        ds = tf.data.Dataset.from_tensor_slices(files).shard(pipelines, pipeline_id)
        if training:
            ds = ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
        ds = ds.interleave(
            lambda f: tf.data.TFRecordDataset(f, buffer_size=8 << 20),
            cycle_length=cycle_length,
            num_parallel_calls=AUTOTUNE,
            deterministic=bool(deterministic) or not training,
        )
        return ds.map(lambda r: parse_example(r, label_offset), num_parallel_calls=AUTOTUNE)
    import tensorflow_datasets as tfds

    read_config = tfds.ReadConfig(
        input_context=input_context,
        shuffle_seed=seed,
        interleave_cycle_length=cycle_length,
        try_autocache=False,
    )
    ds = tfds.load(
        source,
        split=split,
        data_dir=data_dir,
        shuffle_files=training,
        decoders={"image": tfds.decode.SkipDecoding()},
        read_config=read_config,
    )
    return ds.map(lambda e: (e["image"], e["label"]), num_parallel_calls=AUTOTUNE)


def imagenet_dataset(
    *,
    source,
    split,
    batch_size,
    training,
    data_dir=None,
    input_context=None,
    crop="inception",
    image_size=224,
    eval_resize=256,
    color=False,
    fused=True,
    normalize=True,
    seed=0,
    deterministic=False,
    shuffle_buffer=10_000,
    label_offset=1,
    cycle_length=16,
    counter=None,
    one_hot_classes=None,
):
    """The ImageNet input pipeline.

    Records stay encoded through the shuffle (a 10k-element buffer of JPEG bytes
    is ~1 GB less than of decoded images); decoding, cropping and augmentation
    run in one parallel map; undecodable images are dropped and counted.

    Args:
        source: `"tfrecord"` (shards `train-*` / `validation-*` in `data_dir`),
            or a TFDS name such as `"imagenet2012"` or `"imagenette"`.
        split: `"train"` or `"validation"` (any TFDS split string for TFDS).
        batch_size: the global batch size; each pipeline yields per-replica
            batches.
        training: shuffle, repeat, augment, drop the remainder.
        data_dir: shard folder, or the TFDS data_dir.
        input_context: `tf.distribute.InputContext`, or None.
        crop: training crop, `"inception"` or `"scale"`.
        image_size: training crop size (224).
        eval_resize: shorter side before the evaluation centre crop of
            `image_size` (256 -> 224; 320 -> 320 for Table 5).
        color: colour augmentation.
        fused: decode only the crop window of JPEGs.
        normalize: subtract the mean and divide by the std here; if False the
            batches are uint8 and normalization runs on the accelerator.
        seed: seed of shuffles and augmentation.
        deterministic: fixed order and stateless augmentation.
        shuffle_buffer: number of encoded records in the shuffle buffer.
        label_offset: subtracted from TFRecord labels (1 for the TF scripts).
        cycle_length: shards read in parallel.
        counter: a `SkipCounter` to count skipped images.
        one_hot_classes: emit one-hot labels of this depth (for label smoothing).

    Returns:
        A `tf.data.Dataset` of `(images, labels)` batches.
    """
    batch = per_replica_batch(batch_size, input_context)
    ds = _encoded_records(
        source,
        split,
        data_dir,
        training,
        input_context,
        seed,
        deterministic,
        label_offset,
        cycle_length,
    )
    if training:
        ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True).repeat()
    counter = counter or SkipCounter()
    if training:
        prep = functools.partial(
            ipp.preprocess_train, crop=crop, size=image_size, color=color, fused=fused
        )
    else:
        prep = functools.partial(ipp.preprocess_eval, resize=eval_resize, crop=image_size)
    if training and deterministic:
        ds = tf.data.Dataset.zip((ds, tf.data.Dataset.random(seed=seed).batch(2)))
        ds = ds.map(
            lambda xy, s: counter.wrap(functools.partial(prep, seed=s))(*xy),
            num_parallel_calls=AUTOTUNE,
            deterministic=True,
        )
    else:
        ds = ds.map(
            counter.wrap(prep),
            num_parallel_calls=AUTOTUNE,
            deterministic=bool(deterministic) or not training,
        )
    ds = ds.ignore_errors(log_warning=True)
    ds = ds.batch(batch, drop_remainder=training, num_parallel_calls=AUTOTUNE)

    def finish(images, labels):
        images = ipp.normalize(images) if normalize else tf.cast(tf.round(images), tf.uint8)
        if one_hot_classes:
            labels = tf.one_hot(labels, one_hot_classes)
        return images, labels

    ds = ds.map(finish, num_parallel_calls=AUTOTUNE)
    return ds.with_options(_options(deterministic or not training)).prefetch(AUTOTUNE)
