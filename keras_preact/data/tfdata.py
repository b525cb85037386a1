"""tf.data pipelines: CIFAR-style in-memory data and ImageNet-format images.

TensorFlow is imported here and never by `import keras_preact`. Every builder
takes a `tf.distribute.InputContext` (or None) and returns a dataset of
per-replica batches for that input pipeline, ready for
`strategy.distribute_datasets_from_function`.
"""

import numpy as np
import tensorflow as tf

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

    Returns:
        A `tf.data.Dataset` of `(float32 images, int64 labels)` batches.

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

    def normalize(x, y):
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
    ds = ds.map(normalize, num_parallel_calls=AUTOTUNE)
    return ds.with_options(_options(deterministic)).prefetch(AUTOTUNE)


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
