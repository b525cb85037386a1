"""The two in-memory training streams, numpy (`numpy_pipeline.ArrayDataset`) and tf.data
(`tfdata.array_dataset`), follow one seeding rule (`numpy_pipeline.example_order`): the
same examples in every global batch, the same augmentation statistics, and a resumed
stream that continues where an uninterrupted one would be."""

import numpy as np
import pytest

from keras_preact.data import numpy_pipeline

tf = pytest.importorskip("tensorflow")
from keras_preact.data import tfdata  # noqa: E402

pytestmark = pytest.mark.backend_independent

N, B, STEPS, SEED = 100, 8, 12, 5  # 12 batches of 8: one pass (12 batches) per epoch


@pytest.fixture(scope="module")
def arrays():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (N, 12, 12, 3), dtype=np.uint8), np.arange(N)


def _numpy_epoch(arrays, epoch, **kw):
    x, y = arrays
    ds = numpy_pipeline.ArrayDataset(
        x,
        y,
        B,
        [0.5] * 3,
        [0.25] * 3,
        training=True,
        steps_per_epoch=STEPS,
        seed=SEED,
        normalize=False,
        **kw,
    )
    ds.epoch = epoch
    return [ds[i] for i in range(STEPS)]


def _tf_batches(arrays, start_batch, num_batches, input_context=None, deterministic=False):
    x, y = arrays
    ds = tfdata.array_dataset(
        x,
        y,
        batch_size=B,
        training=True,
        mean=[0.5] * 3,
        std=[0.25] * 3,
        seed=SEED,
        normalize=False,
        start_batch=start_batch,
        num_batches=num_batches,
        input_context=input_context,
        deterministic=deterministic,
    )
    return [tuple(t.numpy() for t in batch) for batch in ds]


def _tf_epochs(arrays, epochs, start_batch=0, **kw):
    batches = _tf_batches(arrays, start_batch, epochs * STEPS, **kw)
    return [batches[e * STEPS : (e + 1) * STEPS] for e in range(epochs)]


def test_both_streams_hold_the_same_examples_in_every_batch(arrays):
    tf_epochs = _tf_epochs(arrays, 2)
    for epoch in range(2):
        numpy_labels = [labels for _, labels in _numpy_epoch(arrays, epoch)]
        tf_labels = [labels for _, labels in tf_epochs[epoch]]
        for a, b in zip(numpy_labels, tf_labels):
            np.testing.assert_array_equal(a, b)
    # One pass per epoch: every example at most once, 96 of the 100.
    labels = np.concatenate([b for _, b in tf_epochs[0]])
    assert len(set(labels.tolist())) == 96


def test_both_streams_augment_alike(arrays):
    """Different random crops and flips, same distribution: per-epoch pixel statistics."""
    tf_epochs = _tf_epochs(arrays, 3)
    tf_images = np.concatenate([x for e in tf_epochs for x, _ in e]).astype(np.float64)
    np_images = np.concatenate([x for e in range(3) for x, _ in _numpy_epoch(arrays, e)]).astype(
        np.float64
    )
    raw = arrays[0].astype(np.float64)
    for images in (tf_images, np_images):
        assert images.shape == (288, 12, 12, 3)
        # 4-pixel zero padding on 12-pixel images blacks out a third of a crop on average
        # (a shift of 20/9 pixels per axis): in both streams alike.
        assert 0.55 * raw.mean() < images.mean() < 0.8 * raw.mean()
    assert abs(tf_images.mean() - np_images.mean()) < 0.04 * raw.mean()
    assert abs((tf_images == 0).mean() - (np_images == 0).mean()) < 0.04


def test_a_resumed_tf_stream_continues_where_it_stopped(arrays):
    straight = _tf_epochs(arrays, 3)
    resumed = _tf_epochs(arrays, 1, start_batch=2 * STEPS)
    for (_, a), (_, b) in zip(straight[2], resumed[0]):
        np.testing.assert_array_equal(a, b)


def test_a_deterministic_stream_started_at_a_batch_augments_it_alike(arrays):
    """Batch b of a stream started at b is the uninterrupted stream's, images included."""
    straight = _tf_batches(arrays, 0, 2 * STEPS, deterministic=True)
    for start in (1, STEPS - 2, STEPS + 5):  # the second start crosses a pass
        resumed = _tf_batches(arrays, start, 4, deterministic=True)
        for (xa, ya), (xb, yb) in zip(straight[start : start + 4], resumed, strict=True):
            np.testing.assert_array_equal(ya, yb)
            np.testing.assert_array_equal(xa, xb)


def test_the_training_stream_runs_no_python(arrays):
    """No `from_generator` (a TPU host cannot run it): no generator or py_func op."""
    x, y = arrays
    for deterministic in (False, True):
        ds = tfdata.array_dataset(
            x, y, batch_size=B, training=True, mean=[0.5] * 3, std=[0.25] * 3,
            deterministic=deterministic, num_batches=3,
        )  # fmt: skip
        graph = tf.compat.v1.GraphDef.FromString(ds._as_serialized_graph().numpy())
        nodes = [*graph.node, *(n for f in graph.library.function for n in f.node_def)]
        ops = {node.op for node in nodes}
        assert "TensorSliceDataset" in ops
        assert not {op for op in ops if "PyFunc" in op or "Generator" in op}, ops
    with pytest.raises(ValueError, match="num_batches"):
        tfdata.array_dataset(x, y, batch_size=B, training=True, mean=[0.5] * 3, std=[0.25] * 3)


def test_input_pipelines_share_each_global_batch(arrays):
    """With two input pipelines, their per-replica batches together are the global batch."""
    contexts = [tf.distribute.InputContext(2, i, 2) for i in range(2)]
    halves = [_tf_epochs(arrays, 1, input_context=c)[0] for c in contexts]
    whole = _numpy_epoch(arrays, 0)
    for step in range(STEPS):
        together = np.concatenate([halves[0][step][1], halves[1][step][1]])
        np.testing.assert_array_equal(np.sort(together), np.sort(whole[step][1]))
