"""tf.data pipelines: CIFAR-style in-memory data and ImageNet-format images.

TensorFlow is imported here and never by `import keras_preact`. Every builder
takes a `tf.distribute.InputContext` (or None) and returns a dataset of
per-replica batches for that input pipeline, ready for
`strategy.distribute_datasets_from_function`.

A training dataset is built at a position of its stream, without Python in the
graph (a TPU host runs it): `array_dataset` from a global batch,
`imagenet_dataset` for an epoch and a number of records of it to skip, noting
in a `StreamPosition` where each batch it produces leaves the stream.
"""

import concurrent.futures
import dataclasses
import functools
import os
import sys

import numpy as np
import tensorflow as tf

from keras_preact._optional import require
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
    normalize=True,
    start_batch=0,
    num_batches=None,
):
    """Dataset of CIFAR-style batches from uint8 arrays held in memory.

    A training dataset is the stretch `[start_batch, start_batch + num_batches)` of global
    batches of one endless stream: a trainer builds it afresh at its position (an epoch,
    or a run resumed mid-epoch). It is built from index arrays, without Python in the
    graph (no `from_generator`), so it runs where a TPU host runs it.

    Args:
        images: uint8 `(N, H, W, C)`.
        labels: int `(N,)`.
        batch_size: the global batch size.
        training: shuffle, augment and drop the remainder.
        mean: per-channel mean, [0, 1] units.
        std: per-channel standard deviation, [0, 1] units.
        input_context: `tf.distribute.InputContext`, or None for one pipeline.
        padding: padding of the random crop; 0 disables it.
        flip: random horizontal flips.
        seed: seed of the example order and the augmentation. The training order is
            `numpy_pipeline.example_order`'s, the numpy pipeline's: global batch `b` holds
            the same examples in both (with several input pipelines, each takes its share
            of every global batch: their per-replica batches together).
        deterministic: stateless augmentation, seeded by `(seed, slot)` with slot
            `b * batch_size + i` for the i-th example of global batch `b`: a stream
            started at `b` augments it as the uninterrupted stream does. Otherwise
            stateful random ops (faster, not reproducible).
        normalize: map images to float32 `(x / 255 - mean) / std`; if False, batches stay
            uint8 (4x fewer bytes to the accelerator) and the model normalizes them.
        start_batch: the global batch (an int) the training stream starts at.
        num_batches: the global batches of a training dataset (required when training).

    Returns:
        A `tf.data.Dataset` of `(float32 images, int64 labels)` batches (uint8 images
        with `normalize=False`).

    Example:

    >>> x = np.zeros((16, 28, 28, 1), np.uint8); y = np.zeros(16, np.int64)
    >>> ds = array_dataset(x, y, batch_size=8, training=True, mean=[0.5], std=[0.5],
    ...                    start_batch=3, num_batches=2)
    >>> [tuple(x.shape) for x, _ in ds]
    [(8, 28, 28, 1), (8, 28, 28, 1)]
    """
    batch = per_replica_batch(batch_size, input_context)
    labels = np.asarray(labels, np.int64)
    pipelines = input_context.num_input_pipelines if input_context else 1
    mean = tf.constant(mean, tf.float32)
    std = tf.constant(std, tf.float32)

    def normalize_batch(x, y):
        return (tf.cast(x, tf.float32) / 255.0 - mean) / std, y

    if not training:
        ds = tf.data.Dataset.from_tensor_slices((images, labels))
        if pipelines > 1:
            ds = ds.shard(pipelines, input_context.input_pipeline_id)
    else:
        index, slot = _stream_indices(len(images), batch_size, seed, start_batch, num_batches)
        if pipelines > 1:  # every pipeline takes its share of each global batch
            share = slice(input_context.input_pipeline_id, None, pipelines)
            index, slot = index[share], slot[share]
        x_all, y_all = tf.constant(images), tf.constant(labels)

        def augment(i, s):
            s = tf.stack([tf.constant(seed, tf.int64), s]) if deterministic else None
            image = cifar_augment(tf.gather(x_all, i), padding=padding, flip=flip, seed=s)
            return image, tf.gather(y_all, i)

        ds = tf.data.Dataset.from_tensor_slices((index, slot))
        ds = ds.map(augment, num_parallel_calls=AUTOTUNE)
    ds = ds.batch(batch, drop_remainder=training)
    if normalize:
        ds = ds.map(normalize_batch, num_parallel_calls=AUTOTUNE)
    # The element order is the stream's (parallel maps must keep it).
    return ds.with_options(_options(True)).prefetch(AUTOTUNE)


def _stream_indices(n, batch_size, seed, start_batch, num_batches):
    """The example indices of global batches `[start_batch, start_batch + num_batches)` of
    `numpy_pipeline.example_order`'s stream, and their slots `b * batch_size + i`."""
    from keras_preact.data import numpy_pipeline

    _check_counts(start_batch=start_batch, num_batches=num_batches)
    if n < batch_size:
        raise ValueError(f"batch_size={batch_size} exceeds the {n} training examples.")
    need, chunks = num_batches * batch_size, []
    for chunk in numpy_pipeline.example_order(n, batch_size, seed, start_batch):
        chunks.append(chunk)
        if sum(map(len, chunks)) >= need:
            break
    slot = start_batch * batch_size + np.arange(need, dtype=np.int64)
    return np.concatenate(chunks)[:need].astype(np.int64), slot


def _check_counts(**values):
    for name, value in values.items():
        if not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{name} must be an int >= 0; got {value!r}.")


def load_tfds_arrays(name, data_dir=None, download=True):
    """Loads a small TFDS dataset (cifar10, cifar100, fashion_mnist) as numpy.

    Returns:
        `((x_train, y_train), (x_test, y_test))` as uint8 / int64 arrays.
    """
    tfds = require("tensorflow_datasets")

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


#: The classes `imagenet_dataset` keeps from TFRecords when no `num_classes` is given.
IMAGENET_CLASSES = 1000

SKIP_CAUSES = ("corrupt_record", "unparsable", "bad_label", "undecodable")


class SkipCounter:
    """Per-cause counts of the records an ImageNet pipeline dropped, and of the images it delivered.

    The causes (`SKIP_CAUSES`):

    * `corrupt_record`: TFRecord bytes that fail their CRC or framing (reading
      resumes at the next valid record of the shard; one unreadable stretch
      counts once, usually one record), or an image file of a folder that can no
      longer be read.
    * `unparsable`: not a `tf.train.Example`, or without exactly one
      `image/encoded` bytes value and one int64 `image/class/label`.
    * `bad_label`: a label (after `label_offset`) outside `[0, num_classes)`.
    * `undecodable`: image bytes that fail to decode.

    `delivered` counts the images in the batches the pipeline produced. One
    counter may serve every input pipeline of a process (each call of
    `strategy.distribute_datasets_from_function`'s function) and several
    passes; create it outside `strategy.scope()`, so that its variables are
    plain variables on the host's CPU. Counts are
    exact once the datasets using the counter are exhausted (an evaluation
    pass). While a pipeline runs, `unparsable` and `undecodable` (records started
    minus records finished) can also include the few records being parsed or
    decoded at that moment, and `delivered` includes prefetched batches. A
    training pipeline meets, and counts, a bad record once per epoch. Each
    process of a multi-worker run counts its own input pipelines.

    Example:

    >>> counter = SkipCounter()
    >>> counter.counts()["corrupt_record"], counter.skipped()
    (0, 0)
    """

    def __init__(self):
        names = [*SKIP_CAUSES, "delivered", *(f"{c}_done" for c in SKIP_CAUSES)]
        # init_scope: created eagerly even when a dataset function is being traced.
        with tf.init_scope(), tf.device("/CPU:0"):
            self._vars = {
                n: tf.Variable(0, dtype=tf.int64, trainable=False, name=f"skip_{n}") for n in names
            }
            # The path of a shard that was gone when a pipeline came to read it ("" while
            # none): the pipeline's last step raises naming it (`_stop_on_missing_shard`).
            self.missing_shard = tf.Variable("", trainable=False, name="missing_shard")

    def counts(self):
        """`{cause: records skipped for it, ..., "delivered": images delivered}` as ints."""
        v = {n: int(var.numpy()) for n, var in self._vars.items()}
        out = {c: v[c] for c in SKIP_CAUSES}
        for c in SKIP_CAUSES:  # the guarded ones: started minus finished
            out[c] -= v[f"{c}_done"]
        out["delivered"] = v["delivered"]
        return out

    def skipped(self):
        """All records skipped, over every cause."""
        counts = self.counts()
        return sum(counts[c] for c in SKIP_CAUSES)

    def reset(self):
        """Sets every count to 0, e.g. before an evaluation pass."""
        for var in self._vars.values():
            var.assign(0)
        self.missing_shard.assign("")

    def per_pass(self, ds):
        """`ds`, whose counts start at 0 whenever an iteration of it begins: the counts are
        those of its last pass, also where a framework peeks at it first (Keras' `evaluate`
        under a `tf.distribute` strategy draws a batch to build the model, and the prefetch
        behind that batch decodes, and counts, more records)."""

        def reset(_):
            resets = [v.assign(0) for v in self._vars.values()]
            with tf.control_dependencies([*resets, self.missing_shard.assign("")]):
                return tf.constant(0, tf.int64)

        start = tf.data.Dataset.from_tensors(tf.constant(0, tf.int64)).map(reset)
        return start.flat_map(lambda _: ds).with_options(ds.options())

    def variable(self, name):
        """The int64 `tf.Variable` behind count `name` (a cause or `"delivered"`)."""
        return self._vars[name]

    def add(self, name, n=1):
        """Adds `n` to count `name` (a cause or `"delivered"`) from inside a dataset function."""
        return self._vars[name].assign_add(tf.cast(n, tf.int64))

    def guard(self, cause, fn):
        """Wraps a `fn` that may raise, for a map followed by `ignore_errors()`.

        Each call adds 1 to `cause` before `fn` runs and 1 to its finished count
        after; a call that raises never finishes, so the difference counts the
        records `ignore_errors` dropped.
        """

        def guarded(*args):
            with tf.control_dependencies([self.add(cause)]):
                out = fn(*args)
            # The finished count waits for every output of fn.
            with tf.control_dependencies(tf.nest.flatten(out)):
                done = self.add(f"{cause}_done")
            with tf.control_dependencies([done]):
                return tf.nest.map_structure(tf.identity, out)

        return guarded

    def wrap(self, fn):
        """`fn(image_bytes) -> image` as `(image_bytes, label) -> (image, label)`, counted as
        `undecodable` when it raises (use with `ignore_errors()`)."""
        return self.guard("undecodable", lambda image_bytes, label: (fn(image_bytes), label))


class StreamPosition:
    """Where an ImageNet training stream stands, batch by batch, in records of its epoch.

    `imagenet_dataset(training=True, position=...)` notes for every batch it produces the
    records of the epoch's record stream consumed up to and including that batch:
    `skip_records` plus the index just past the batch's last record. The index is taken
    before decoding, so records dropped as undecodable count too. A trainer that has taken
    `k` batches from the iterator saves `records(k)`; building the epoch's stream again
    with `skip_records=records(k)` continues at batch `k + 1` (exactly under
    `deterministic=True`). The pipeline runs ahead of its consumer (prefetching); the
    notes of the last `size` batches it produced are kept.

    One position follows one input pipeline; `imagenet_dataset` resets it, so one object
    can serve epoch after epoch. Create it outside `strategy.scope()`, so that its
    variables are plain variables on the host's CPU.

    Example:

    >>> position = StreamPosition()
    >>> position.reset(skip_records=40)
    >>> position.records(0)
    40
    """

    def __init__(self, size=4096):
        self.size = size
        self._skip = 0
        self._stream = 0  # which stream notes belong to: a reset disowns older ones
        # init_scope: created eagerly even when a dataset function is being traced.
        with tf.init_scope(), tf.device("/CPU:0"):
            zeros = tf.zeros([size], tf.int64)
            self._records = tf.Variable(zeros, trainable=False, name="position_records")
            self._batches = tf.Variable(zeros, trainable=False, name="position_batches")

    def reset(self, skip_records=0):
        """Starts a new stream after `skip_records` records; an older stream's notes (an
        iterator still prefetching) no longer count."""
        self._skip = int(skip_records)
        self._stream += 1

    def records(self, batches):
        """Records of the epoch's stream consumed by the first `batches` batches produced
        (per-replica batches of this input pipeline; 0 gives `skip_records`)."""
        if batches == 0:
            return self._skip
        slot = batches % self.size
        records = int(self._records[slot].numpy())
        if batches < 0 or int(self._batches[slot].numpy()) != self._tag(batches):
            raise ValueError(
                f"batches={batches!r} is not noted: the pipeline has not produced that batch, "
                f"or has produced {self.size} more since (only the last {self.size} are kept)."
            )
        return records

    def note(self, batch, index):
        """In a dataset map: batch number `batch` (from 1) holds records up to `max(index)`."""
        slot = batch % self.size
        with tf.control_dependencies([self._records[slot].assign(tf.reduce_max(index) + 1)]):
            return self._batches[slot].assign(self._tag(batch))

    def _tag(self, batch):
        return batch + (self._stream << 40)


def parse_example(serialized, label_offset=1):
    """ImageNet TFRecord example -> `(encoded image, label - label_offset)`.

    The TF official and TPU ImageNet scripts store `image/encoded` and a 1-based
    `image/class/label` (0 is "background"), hence the default offset of 1.
    Raises `InvalidArgumentError` for bytes that are not a `tf.train.Example`
    or lack either feature.
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


# TFRecord framing: uint64 length, masked CRC-32C of the length, the data, masked
# CRC-32C of the data, all little-endian. `tf.data.TFRecordDataset` stops a file
# at its first record that fails a check and moves on to the next file; the
# readers below resume after the bad record instead. They build their graphs with
# explicit `tf.cond` / `tf.while_loop`, so AutoGraph is told not to convert them.
_HEADER_BYTES = 12
_FRAMING_BYTES = 16
_SCAN_WINDOW = 1 << 20
_READ_BUFFER = 8 << 20
_SCAN_BATCH = 32


def _crc32c_table():
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ (0x82F63B78 if c & 1 else 0)  # Castagnoli, reflected
        table.append(c)
    return table


_CRC32C_TABLE = _crc32c_table()


def _le_int(data, first, count, size):
    """Little-endian unsigned ints of `size` bytes at offsets `first + range(count)`."""
    out = tf.zeros([count], tf.int64)
    for i in range(size):
        out = tf.bitwise.bitwise_or(
            out, tf.bitwise.left_shift(data[first + i : first + i + count], 8 * i)
        )
    return out


@tf.autograph.experimental.do_not_convert
def _record_headers(data, start, count):
    """Which of the `count` byte offsets from `start` of `data` (uint8) hold a
    TFRecord header whose length passes its CRC, and that length (int64)."""
    b = tf.cast(data[start : start + count + _HEADER_BYTES - 1], tf.int64)
    table = tf.constant(_CRC32C_TABLE, tf.int64)

    def crc_step(i, crc):
        byte = b[i : i + count]
        index = tf.bitwise.bitwise_and(tf.bitwise.bitwise_xor(crc, byte), 0xFF)
        return i + 1, tf.bitwise.bitwise_xor(
            tf.gather(table, index), tf.bitwise.right_shift(crc, 8)
        )

    crc = tf.fill([count], tf.constant(0xFFFFFFFF, tf.int64))
    _, crc = tf.while_loop(lambda i, crc: i < 8, crc_step, (tf.constant(0, tf.int64), crc))
    crc = tf.bitwise.bitwise_xor(crc, 0xFFFFFFFF)
    rotated = tf.bitwise.bitwise_or(tf.bitwise.right_shift(crc, 15), tf.bitwise.left_shift(crc, 17))
    masked = tf.bitwise.bitwise_and(
        tf.bitwise.bitwise_and(rotated, 0xFFFFFFFF) + 0xA282EAD8, 0xFFFFFFFF
    )
    length = _le_int(b, 0, count, 8)
    # A length with the top bit set is negative here; none is that long.
    return tf.equal(masked, _le_int(b, 8, count, 4)) & (length >= 0), length


@tf.autograph.experimental.do_not_convert
def _next_record(data, pos):
    """Offset of the first record after the unreadable one at `pos` (or the size).

    An intact header (its length passes its CRC) gives the record's end, so a
    record with corrupt data costs only itself. Otherwise the bytes after `pos`
    are scanned for the next valid header of a record that fits in the file.
    """
    size = tf.size(data, out_type=tf.int64)

    def scan(p, found):
        count = tf.minimum(tf.constant(_SCAN_WINDOW, tf.int64), size - _HEADER_BYTES + 1 - p)
        ok, length = _record_headers(data, p, count)
        end = p + tf.range(count, dtype=tf.int64) + _FRAMING_BYTES + length
        fits = ok & (end <= size)
        first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int64)
        # At `pos` itself an intact header gives the end of the bad record.
        at_pos = tf.equal(p, pos) & ok[0]
        found = tf.where(tf.reduce_any(fits), p + first, found)
        return p + count, tf.where(at_pos, tf.minimum(end[0], size), found)

    _, found = tf.while_loop(
        lambda p, found: (found < 0) & (p + _HEADER_BYTES <= size),
        scan,
        (pos, tf.constant(-1, tf.int64)),
    )
    return tf.where(found < 0, size, found)


def _records_from(path, offset):
    """TFRecordDataset of one file from byte `offset`, a record boundary."""
    variant = tf.raw_ops.TFRecordDatasetV2(
        filenames=path, compression_type="", buffer_size=_READ_BUFFER, byte_offsets=offset
    )
    return tf.data.experimental.from_variant(variant, tf.TensorSpec([], tf.string))


@tf.autograph.experimental.do_not_convert
def _readable_run(path, offset):
    """The records from `offset` up to the first unreadable one, and the bytes they span."""
    everything = tf.int64.max
    records = (
        _records_from(path, offset)
        .ignore_errors()
        .batch(everything)
        .concatenate(tf.data.Dataset.from_tensors(tf.zeros([0], tf.string)))
        .take(1)
        .get_single_element()
    )
    span = tf.reduce_sum(tf.cast(tf.strings.length(records), tf.int64) + _FRAMING_BYTES)
    return records, span


# A call of a function that is not inlined: the recovery graph stays out of the
# scan's function, which then runs faster. The variable is an argument, so one
# trace serves every counter.
@functools.partial(tf.function, autograph=False, experimental_attributes={"_noinline": True})
def _recover(path, offset, corrupt):
    """Every readable record of `path` from `offset`, where reading stopped early.

    Adds the unreadable stretches to the int64 variable `corrupt`. Holds the
    whole shard in memory; it runs only after a read error.
    """
    # Counted before anything is read: if the shard cannot be read again the
    # loss is still counted once.
    with tf.control_dependencies([corrupt.assign_add(1)]):
        # A shard deleted since it was opened reads as empty here; `_shard_records`
        # notes it missing.
        exists = _exists(path)
        raw = tf.cond(exists, lambda: tf.io.read_file(path), lambda: tf.constant(b""))
        data = tf.io.decode_raw(raw, tf.uint8)
    size = tf.size(data, out_type=tf.int64)

    def body(pos, records, bad):
        good, span = _readable_run(path, pos)
        pos += span
        stuck = pos < size

        def skip():
            nxt = _next_record(data, pos)
            note = tf.print(
                "keras_preact.data: skipped an unreadable TFRecord in",
                path,
                "at bytes",
                pos,
                "to",
                nxt,
                output_stream=sys.stderr,
            )
            with tf.control_dependencies([note]):
                return tf.identity(nxt)

        nxt = tf.cond(stuck, skip, lambda: pos)
        return nxt, tf.concat([records, good], 0), bad + tf.cast(stuck, tf.int64)

    _, records, bad = tf.while_loop(
        lambda pos, records, bad: pos < size,
        body,
        (offset, tf.zeros([0], tf.string), tf.constant(0, tf.int64)),
        shape_invariants=(tf.TensorShape([]), tf.TensorShape([None]), tf.TensorShape([])),
    )
    # The first unreadable stretch was counted above; a re-read that worked
    # (a transient error) takes it back.
    with tf.control_dependencies([corrupt.assign_add(bad - 1)]):
        return tf.identity(records)


def _exists(path):
    """Whether the file `path` exists, in the graph (`matching_files` of the exact name)."""
    return tf.reduce_any(tf.equal(tf.io.matching_files(path), path))


@tf.autograph.experimental.do_not_convert
def _shard_records(path, size, counter):
    """The records of one TFRecord file; an unreadable record costs only itself.

    The file is read with `TFRecordDataset` while the bytes read are summed; if
    it stops before `size`, `_recover` reads the rest, skipping what fails. The
    sum runs on batches of records (one function call per batch, not per record).

    A shard that is gone when it comes to be read (deleted or moved after the
    dataset was built) yields nothing and is named in `counter.missing_shard`:
    `TFRecordDataset(missing).ignore_errors()` retries its open forever, and an
    error raised here would be swallowed by the `ignore_errors` downstream, so the
    pipeline's last step raises instead (`_stop_on_missing_shard`).
    """
    exists = _exists(path)

    def note_missing():
        with tf.control_dependencies([counter.missing_shard.assign(path, read_value=False)]):
            return tf.constant(False)

    noted = tf.cond(exists, lambda: tf.constant(True), note_missing)
    with tf.control_dependencies([noted]):
        files = tf.boolean_mask(tf.reshape(path, [1]), tf.reshape(exists, [1]))
    head = tf.data.TFRecordDataset(files, buffer_size=_READ_BUFFER).ignore_errors()
    # `batch` yields no empty batch, so an empty one marks the end.
    batches = head.batch(_SCAN_BATCH).concatenate(
        tf.data.Dataset.from_tensors(tf.zeros([0], tf.string))
    )

    def step(offset, records):
        end = tf.equal(tf.size(records), 0)
        out = tf.cond(
            end & (offset < size) & exists,
            lambda: _recover(path, offset, counter.variable("corrupt_record")),
            lambda: records,
        )
        span = tf.reduce_sum(tf.cast(tf.strings.length(records), tf.int64) + _FRAMING_BYTES)
        return offset + span, out

    return batches.scan(tf.constant(0, tf.int64), step).unbatch()


def _file_sizes(files):
    with concurrent.futures.ThreadPoolExecutor(min(32, len(files))) as pool:
        return list(pool.map(lambda f: tf.io.gfile.stat(f).length, files))


@tf.autograph.experimental.do_not_convert
def _stop_on_missing_shard(ds, counter):
    """`ds`, raising `InvalidArgumentError` naming the shard once one was found gone.

    The last step of a pipeline, after every `ignore_errors`: checked on every
    element and once more at the end, so a pipeline whose only shards are gone
    raises too instead of ending empty.
    """

    def check(*element):
        missing = counter.missing_shard.read_value()
        ok = tf.debugging.Assert(
            tf.equal(missing, ""),
            ["keras_preact.data: the TFRecord shard", missing, "is gone (deleted or moved after "
             "the dataset was built). Restore it, or rebuild the dataset over the shards there "
             "are."],
        )  # fmt: skip
        with tf.control_dependencies([ok]):
            out = tf.nest.map_structure(tf.identity, element)
        return out if len(out) > 1 else out[0]

    def dummy(spec):
        return tf.zeros([d if d is not None else 0 for d in spec.shape], spec.dtype)

    last = tf.data.Dataset.from_tensors(tf.nest.map_structure(dummy, ds.element_spec))
    last = last.map(check).filter(lambda *_: False)
    return ds.map(check).concatenate(last)


def _checked_num_classes(num_classes, one_hot_classes):
    for name, value in (("num_classes", num_classes), ("one_hot_classes", one_hot_classes)):
        if value is not None and (not isinstance(value, (int, np.integer)) or value < 1):
            raise ValueError(f"{name} must be a positive int or None; got {value!r}.")
    if num_classes and one_hot_classes and num_classes != one_hot_classes:
        raise ValueError(
            f"num_classes={num_classes} and one_hot_classes={one_hot_classes} disagree."
        )
    return num_classes or one_hot_classes


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """What an image pipeline reads and how it shapes the images: one value, built once by a
    trainer (or a test) and passed to `encoded_records` and `imagenet_dataset`.

    Where the records come from:

    * `source`: `"tfrecord"` (ImageNet-format shards `train-*` / `validation-*` in
      `data_dir`), `"folder"` (the class folders of `listing`, a `folders.Listing`), or a
      TFDS name (`"imagenet2012"`, `"imagenette"`, `"oxford_flowers102"`, ...; `data_dir`
      is its TFDS data_dir).
    * `num_classes`: labels must lie in `[0, num_classes)`; others are skipped and counted.
      None: `one_hot_classes`, else ImageNet's 1000 for TFRecords, else the classes a TFDS
      dataset declares (a TFDS dataset that declares more is an error).
    * `label_offset`: subtracted from TFRecord labels (1 for the TF scripts' 1..1000).

    How images are shaped:

    * `crop`: the training crop, `"inception"` (area and aspect ratio), `"scale"` ([1]:
      the shorter side in `scale_range`) or `"pad"` (small images: resize to `image_size`,
      pad by `padding`, random crop).
    * `image_size`: the side of the crop (of the training crop, or of the evaluation crop for
      an evaluation pipeline); `eval_resize`: the shorter side before the evaluation's centre
      crop (not used by `"pad"`, which sees small images whole).
    * `scale_range`: None follows `image_size`: the paper's [256, 480] for 224.
    * `channels`: 3 (RGB) or 1 (gray).
    * `normalize`: normalize with ImageNet's statistics here; False ships uint8 batches (the
      model normalizes).

    The rest: the global `batch_size`, `seed` of shuffles and augmentation, `deterministic`
    order and stateless augmentation, `shuffle_buffer` (encoded records), `cycle_length`
    (shards read in parallel), `color` augmentation, `fused` JPEG crop decoding, and
    `one_hot_classes` (one-hot labels of that depth, for label smoothing).

    Example:

    >>> spec = InputSpec(source="tfrecord", data_dir="/data/imagenet", batch_size=256)
    >>> spec.scale_range, InputSpec(source="tfrecord", image_size=112).scale_range
    ((256, 480), (128, 240))
    """

    source: str
    data_dir: str | None = None
    batch_size: int = 256
    num_classes: int | None = None
    one_hot_classes: int | None = None
    label_offset: int = 1
    listing: object = dataclasses.field(default=None, repr=False, compare=False)
    crop: str = "inception"
    image_size: int = 224
    eval_resize: int = 256
    scale_range: tuple | None = None
    padding: int | None = None
    channels: int = 3
    color: bool = False
    fused: bool = True
    normalize: bool = True
    seed: int = 0
    deterministic: bool = False
    shuffle_buffer: int = 10_000
    cycle_length: int = 16

    def __post_init__(self):
        if self.crop not in ipp.TRAIN_CROPS:
            raise ValueError(f"crop={self.crop!r}; allowed: {ipp.TRAIN_CROPS}.")
        if self.channels not in (1, 3):
            raise ValueError(f"channels={self.channels!r}; allowed: 1, 3.")
        if self.normalize and self.channels != 3:
            raise ValueError("normalize=True uses ImageNet's RGB statistics; with channels=1 "
                             "pass normalize=False (the model normalizes).")  # fmt: skip
        if self.source == "folder" and self.listing is None:
            raise ValueError("source='folder' needs listing=folders.list_folder(data_dir).")
        if self.scale_range is None:  # [256, 480] at 224: the same zoom at any crop size
            scale = self.image_size / 224
            object.__setattr__(self, "scale_range", (round(256 * scale), round(480 * scale)))
        num_classes = _checked_num_classes(self.num_classes, self.one_hot_classes)
        if num_classes is None and self.source == "tfrecord":
            num_classes = IMAGENET_CLASSES  # a label past it would reach the loss unchecked
        if num_classes is None and self.source == "folder":
            num_classes = len(self.listing.class_names)
        object.__setattr__(self, "num_classes", num_classes)

    def replace(self, **changes):
        """A copy with `changes` (e.g. the evaluation's `image_size`)."""
        return dataclasses.replace(self, **changes)


def encoded_records(spec, split, *, training=False, input_context=None, counter=None):
    """Dataset of `(encoded image, int64 label)` of `spec`'s `split`, one shard per input
    pipeline (of files for TFRecords and TFDS, of images for a folder).

    Records that cannot be read, parsed or that carry a label outside
    `[0, spec.num_classes)` are dropped and counted in `counter` (see `SkipCounter`).

    Args:
        spec: an `InputSpec`.
        split: `"train"` or `"validation"` (any TFDS split string for TFDS).
        training: shuffle the shards (the images of a folder).
        input_context: `tf.distribute.InputContext`, or None.
        counter: a `SkipCounter`; None counts into a private one.

    Returns:
        A `tf.data.Dataset` of `(scalar string, scalar int64)`.

    Example:

    >>> spec = InputSpec(source="tfrecord", data_dir="/data/imagenet")
    >>> ds = encoded_records(spec, "validation")  # doctest: +SKIP

    A TFRecord shard deleted or moved after the dataset was built stops the
    iteration with an `InvalidArgumentError` naming it.
    """
    counter = counter or SkipCounter()
    ds = _encoded_records(spec, split, training=training, input_context=input_context,
                          seed=spec.seed, counter=counter)  # fmt: skip
    return _stop_on_missing_shard(ds, counter) if spec.source == "tfrecord" else ds


def tfds_keys(info):
    """`(image feature, label feature)` of a TFDS dataset: its supervised keys, else
    `("image", "label")`."""
    keys = info.supervised_keys
    if isinstance(keys, tuple) and len(keys) == 2 and all(isinstance(k, str) for k in keys):
        return keys
    return "image", "label"


def tfds_builder(spec):
    """The TFDS builder of `spec.source` in `spec.data_dir`."""
    return require("tensorflow_datasets").builder(spec.source, data_dir=spec.data_dir)


def _encoded_records(spec, split, *, training, input_context, seed, counter):
    """`encoded_records` without the final missing-shard check (`imagenet_dataset` makes
    it after its own `ignore_errors`)."""
    num_classes = spec.num_classes
    pipelines = input_context.num_input_pipelines if input_context else 1
    pipeline_id = input_context.input_pipeline_id if input_context else 0
    order = bool(spec.deterministic) or not training

    def label_ok(image, label):
        # A filter predicate that counts what it drops.
        ok = label >= 0
        if num_classes is not None:
            ok &= label < num_classes
        with tf.control_dependencies([counter.add("bad_label", tf.cast(~ok, tf.int64))]):
            return tf.identity(ok)

    if spec.source == "tfrecord":
        files = shard_files(spec.data_dir, split)
        if len(files) < pipelines:
            raise ValueError(
                f"{len(files)} {_prefix(split)} shards cannot be split over {pipelines} input "
                "pipelines; write at least one shard per pipeline."
            )
        files = files[pipeline_id::pipelines]  # file-level sharding
        sizes = _file_sizes(files)
        ds = tf.data.Dataset.from_tensor_slices((files, np.asarray(sizes, np.int64)))
        if training:  # one order: an epoch's stream is the same at every iteration of it
            ds = ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=False)
        ds = ds.interleave(
            lambda f, n: _shard_records(f, n, counter),
            cycle_length=spec.cycle_length,
            num_parallel_calls=AUTOTUNE,
            deterministic=order,
        )
        ds = ds.map(
            counter.guard("unparsable", lambda r: parse_example(r, spec.label_offset)),
            num_parallel_calls=AUTOTUNE,
            deterministic=order,
        ).ignore_errors(log_warning=True)
    elif spec.source == "folder":
        files = spec.listing.split(split)
        if len(files) < pipelines:
            raise ValueError(
                f"{len(files)} {split} images cannot be split over {pipelines} input pipelines."
            )
        ds = tf.data.Dataset.from_tensor_slices(
            (np.asarray(files.paths), np.asarray(files.labels, np.int64))
        ).shard(pipelines, pipeline_id)
        if training:  # the file names, all of them: cheap, and a full shuffle
            ds = ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=False)
        # A file deleted since the listing cannot be read: skipped, counted as corrupt.
        ds = ds.map(
            counter.guard("corrupt_record", lambda path, label: (tf.io.read_file(path), label)),
            num_parallel_calls=AUTOTUNE,
            deterministic=order,
        ).ignore_errors(log_warning=True)
    else:
        tfds = require("tensorflow_datasets")

        read_config = tfds.ReadConfig(
            input_context=input_context,
            shuffle_seed=seed,
            shuffle_reshuffle_each_iteration=False,
            interleave_cycle_length=spec.cycle_length,
            try_autocache=False,
        )
        info = tfds_builder(spec).info
        image_key, label_key = tfds_keys(info)
        ds = tfds.load(
            spec.source,
            split=split,
            data_dir=spec.data_dir,
            shuffle_files=training,
            decoders={image_key: tfds.decode.SkipDecoding()},
            read_config=read_config,
        )
        declared = info.features[label_key].num_classes
        if num_classes is None:
            num_classes = declared
        elif declared > num_classes:
            raise ValueError(
                f"{spec.source!r} declares {declared} classes, more than "
                f"num_classes={num_classes}: its labels {num_classes}..{declared - 1} would be "
                "out of range."
            )
        ds = ds.map(lambda e: (e[image_key], e[label_key]), num_parallel_calls=AUTOTUNE)
    return ds.filter(label_ok)


def _prefix(split):
    return "train" if split.startswith("train") else "validation"


def shard_files(data_dir, split):
    """The sorted TFRecord shards of `split` in `data_dir` (`train-*` or `validation-*`)."""
    prefix = _prefix(split)
    files = sorted(tf.io.gfile.glob(os.path.join(data_dir, f"{prefix}-*")))
    if not files:
        raise FileNotFoundError(f"No {prefix}-* TFRecord shards in {data_dir!r}.")
    return files


def count_records(files):
    """The number of records in TFRecord `files`, from their length headers alone (no
    record is read: one 8-byte read and a seek per record)."""

    def count(path):
        n = 0
        with tf.io.gfile.GFile(path, "rb") as f:
            size = f.size()
            offset = 0
            while offset + _HEADER_BYTES <= size:
                f.seek(offset)
                length = int.from_bytes(f.read(8), "little")
                offset += length + _FRAMING_BYTES
                n += 1
        return n

    with concurrent.futures.ThreadPoolExecutor(min(16, max(1, len(files)))) as pool:
        return sum(pool.map(count, files))


def count_examples(spec, split):
    """The number of examples in `spec`'s `split`: the folder's images, a TFDS split's from
    its metadata (else counted), the records of TFRecord shards (counted from their headers; records that
    are later skipped, for a bad label or an undecodable image, are in the count)."""
    if spec.source == "folder":
        return len(spec.listing.split(split))
    if spec.source == "tfrecord":
        return count_records(shard_files(spec.data_dir, split))
    try:
        return int(tfds_builder(spec).info.splits[split].num_examples)
    except KeyError:  # a builder without split sizes in its metadata: count the records
        tfds = require("tensorflow_datasets")
        ds = tfds.load(
            spec.source,
            split=split,
            data_dir=spec.data_dir,
            decoders={tfds_keys(tfds_builder(spec).info)[0]: tfds.decode.SkipDecoding()},
        )
        return int(ds.reduce(np.int64(0), lambda n, _: n + 1))


def class_names(spec):
    """The class names of `spec`'s data in label order (a folder's sub-folders, a TFDS
    dataset's label names), or None where the data does not name them (TFRecords)."""
    if spec.source == "folder":
        return tuple(spec.listing.class_names)
    if spec.source == "tfrecord":
        return None
    info = tfds_builder(spec).info
    feature = info.features[tfds_keys(info)[1]]
    names = getattr(feature, "names", None)
    return tuple(names) if names else None


def label_range(spec, split="train", records=2048):
    """`(smallest, largest, records read)` of the labels of the first `records` records of
    `spec`'s `split`, after `label_offset` (TFRecords; a quick check before training)."""
    files = shard_files(spec.data_dir, split)
    ds = tf.data.TFRecordDataset(files[:16]).take(records).ignore_errors()
    ds = ds.map(lambda r: parse_example(r, spec.label_offset)[1]).ignore_errors()
    labels = [int(v) for v in ds.as_numpy_iterator()]
    return (min(labels), max(labels), len(labels)) if labels else (None, None, 0)


def imagenet_dataset(
    spec, split, *, training, input_context=None, counter=None, epoch=0, skip_records=0,
    position=None,
):  # fmt: skip
    """The image input pipeline of `spec` (an `InputSpec`): ImageNet's, and any other data's.

    Records stay encoded through the shuffle (a 10k-element buffer of JPEG bytes
    is ~1 GB less than of decoded images); decoding, cropping and augmentation
    run in one parallel map. Records that cannot be read or parsed, labels
    outside `[0, num_classes)` and undecodable images are dropped and counted
    by cause in `counter`, with the images delivered (see `SkipCounter`).

    A training dataset is epoch `epoch`'s stream, built afresh for every epoch
    (a trainer takes its steps from it): this pipeline's shards in an order drawn
    from `(seed, epoch)`, their records interleaved and shuffled, the decoded
    ones batched; pass after pass, each in an order of its own, without end.
    Under `deterministic=True` the stream is a fixed function of `(seed, epoch)`
    (and of TensorFlow's global seed, which tf.data's shuffles read; the trainers
    set it from the run's seed). Otherwise parallel reads and maps may reorder
    it locally, and a resume at a position is exact up to that reordering.

    Args:
        spec: the `InputSpec`: source, classes, crop and sizes, batch size, seed.
        split: `"train"` or `"validation"` (any TFDS split string for TFDS).
        training: shuffle, repeat, augment, drop the remainder. Evaluation takes the
            centre `spec.image_size` crop of the image resized to `spec.eval_resize`
            (small images under `crop="pad"`: the whole image at `image_size`).
        input_context: `tf.distribute.InputContext`, or None; each pipeline yields
            per-replica batches of the global `spec.batch_size`.
        counter: a `SkipCounter` that counts skipped records by cause and the
            images delivered; None counts into a private one.
        epoch: the epoch whose stream a training dataset is.
        skip_records: records of the epoch's record stream (parsed, with a good
            label, shuffled) to skip, read but not decoded: a mid-epoch resume
            at `StreamPosition.records(k)` continues at the stream's batch k + 1.
        position: a `StreamPosition` noting the stream's position after every
            training batch; reset here.

    Returns:
        A `tf.data.Dataset` of `(images, labels)` batches. A TFRecord shard
        deleted or moved after the dataset was built stops the iteration with an
        `InvalidArgumentError` naming it.

    Example:

    >>> position = StreamPosition()
    >>> spec = InputSpec(source="tfrecord", data_dir="/data/imagenet", batch_size=256)
    >>> ds = imagenet_dataset(spec, "train", training=True, epoch=3,  # doctest: +SKIP
    ...     skip_records=saved_records, position=position)
    """
    batch = per_replica_batch(spec.batch_size, input_context)
    _check_counts(epoch=epoch, skip_records=skip_records)
    counter = counter or SkipCounter()
    seed = spec.seed
    if training:  # one seed per epoch: every epoch's stream starts afresh
        seed = int(np.random.default_rng([seed, epoch]).integers(2**31 - 1))
    ds = _encoded_records(spec, split, training=training, input_context=input_context,
                          seed=seed, counter=counter)  # fmt: skip
    if training:
        # One order, the same at every iteration of the dataset: a framework may iterate it
        # twice (Keras' PyTorch trainer draws a first batch to build the model), and a
        # shuffle that reshuffles each iteration or pass draws its seeds from state those
        # iterations share, in whatever order their threads reach it. A further pass of the
        # epoch (an epoch longer than the data) repeats the first one's order.
        ds = ds.shuffle(spec.shuffle_buffer, seed=seed, reshuffle_each_iteration=False).repeat()
        # Numbered before the skip: later records keep their numbers and augmentation.
        ds = ds.enumerate().skip(skip_records)
        kw = dict(crop=spec.crop, size=spec.image_size, scale_range=spec.scale_range,
                  color=spec.color, fused=spec.fused, channels=spec.channels,
                  padding=spec.padding)  # fmt: skip

        def decode(index, record):
            s = tf.stack([tf.constant(seed, tf.int64), index]) if spec.deterministic else None
            return ipp.preprocess_train(record[0], **kw, seed=s), record[1], index

        decode = counter.guard("undecodable", decode)
    elif spec.crop == "pad":
        view = functools.partial(ipp.preprocess_small_eval, size=spec.image_size,
                                 channels=spec.channels)  # fmt: skip
        decode = counter.wrap(view)
    else:
        view = functools.partial(ipp.preprocess_eval, resize=spec.eval_resize,
                                 crop=spec.image_size, channels=spec.channels)  # fmt: skip
        decode = counter.wrap(view)
    ds = ds.map(
        decode, num_parallel_calls=AUTOTUNE,
        deterministic=bool(spec.deterministic) or not training,
    )  # fmt: skip
    ds = ds.ignore_errors(log_warning=True)
    ds = ds.batch(batch, drop_remainder=training, num_parallel_calls=AUTOTUNE)
    if position is not None:
        position.reset(skip_records)

    def finish(number, batch):  # batches numbered from 1, as their consumer counts them
        images, labels, *index = batch
        if spec.normalize:
            images = ipp.normalize(images)
        else:
            images = tf.cast(tf.round(images), tf.uint8)
        if spec.one_hot_classes:
            labels = tf.one_hot(labels, spec.one_hot_classes)
        notes = [counter.add("delivered", tf.shape(images)[0])]
        if position is not None and index:
            notes.append(position.note(number, index[0]))
        with tf.control_dependencies(notes):
            return tf.identity(images), labels

    # In order, whatever `deterministic`: the k-th batch out is batch number k.
    ds = ds.enumerate(1).map(finish, num_parallel_calls=AUTOTUNE, deterministic=True)
    if spec.source == "tfrecord":
        ds = _stop_on_missing_shard(ds, counter)
    opts = _options(spec.deterministic or not training)
    return ds.with_options(opts).prefetch(AUTOTUNE)
