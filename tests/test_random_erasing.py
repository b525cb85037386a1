"""Random erasing in the numpy pipeline (numpy only: runs under every backend)."""

import numpy as np
import pytest

from keras_preact.data import numpy_pipeline


def _changed(before, after):
    return (before != after).any(axis=-1)  # (N, H, W)


def test_random_erasing_erases_one_rectangle_per_image():
    rng = np.random.default_rng(0)
    x = np.full((64, 28, 28, 1), 7, np.uint8)
    y = numpy_pipeline.random_erasing(x, rng, probability=1.0)
    assert y.shape == x.shape and y.dtype == np.uint8
    assert (x == 7).all()  # the input is not modified
    changed = _changed(x, y)
    erased = 0
    for mask in changed:
        rows, cols = np.nonzero(mask)
        if rows.size == 0:
            continue  # no rectangle fitted (rare), or all values drew 7
        erased += 1
        h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
        # Changed pixels lie in one rectangle of at most 40 % of the image.
        assert h * w <= 0.4 * 28 * 28 + 28
        assert mask[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].mean() > 0.9
    assert erased >= 60


def test_random_erasing_probability_and_determinism():
    x = np.random.default_rng(1).integers(0, 256, (200, 28, 28, 1), dtype=np.uint8)
    same = numpy_pipeline.random_erasing(x, np.random.default_rng(5), probability=0.0)
    np.testing.assert_array_equal(same, x)
    a = numpy_pipeline.random_erasing(x, np.random.default_rng(5), probability=0.5)
    b = numpy_pipeline.random_erasing(x, np.random.default_rng(5), probability=0.5)
    np.testing.assert_array_equal(a, b)
    share = _changed(x, a).any(axis=(1, 2)).mean()
    assert 0.35 < share < 0.65
    f = numpy_pipeline.random_erasing(x.astype(np.float32) / 255, np.random.default_rng(5))
    assert f.dtype == np.float32 and 0.0 <= f.min() and f.max() <= 1.0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"probability": 1.5}, "probability=1.5"),
        ({"area": (0.5, 0.1)}, r"area=\(0.5, 0.1\)"),
        ({"aspect": (0.0, 2.0)}, r"aspect=\(0.0, 2.0\)"),
    ],
)
def test_random_erasing_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        numpy_pipeline.random_erasing(
            np.zeros((1, 8, 8, 1), np.uint8), np.random.default_rng(0), **kwargs
        )


def test_array_dataset_erasing_keeps_the_crops_and_flips():
    x = np.random.default_rng(2).integers(0, 256, (40, 28, 28, 1), dtype=np.uint8)
    y = np.arange(40) % 10
    plain = numpy_pipeline.ArrayDataset(x, y, 8, [0.5], [0.5], training=True, seed=3)
    erased = numpy_pipeline.ArrayDataset(x, y, 8, [0.5], [0.5], training=True, seed=3, erasing=1.0)
    a, la = plain[1]
    b, lb = erased[1]
    np.testing.assert_array_equal(la, lb)
    differs = (a != b).any(axis=(1, 2, 3))
    assert differs.sum() >= 6
    # Outside each erased rectangle the crop and flip are the same as without erasing.
    assert ((a == b).mean(axis=(1, 2, 3)) > 0.5).all()
    with pytest.raises(ValueError, match="erasing=2"):
        numpy_pipeline.ArrayDataset(x, y, 8, [0.5], [0.5], training=True, erasing=2)
