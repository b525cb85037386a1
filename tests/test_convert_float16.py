"""Shipped weight files in float16: half the bytes, read back as float32, range checked."""

import h5py
import numpy as np
import pytest

from keras_preact import convert

pytestmark = pytest.mark.backend_independent


def _tensors():
    rng = np.random.default_rng(0)
    return {
        "conv1_conv": {"kernel": rng.standard_normal((3, 3, 1, 8)).astype(np.float32)},
        "post_bn": {
            "gamma": np.ones(8, np.float32),
            "moving_variance": np.full(8, 3e-4, np.float32),
        },
    }


def test_float16_storage_round_trips_at_half_precision(tmp_path):
    t = _tensors()
    convert.write_tensors(tmp_path / "a.h5", t)
    convert.write_tensors(tmp_path / "b.h5", t, dtype="float16")
    with h5py.File(tmp_path / "b.h5", "r") as f:
        assert f["conv1_conv"]["conv1_conv/kernel:0"].dtype == np.float16
    assert convert.detect_format(tmp_path / "b.h5") == "keras_preact_h5"
    back = convert.read_tensors(tmp_path / "b.h5")
    got = back["conv1_conv"]["kernel"]
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, t["conv1_conv"]["kernel"].astype(np.float16))
    full = convert.read_tensors(tmp_path / "a.h5")
    np.testing.assert_array_equal(
        full["post_bn"]["moving_variance"], t["post_bn"]["moving_variance"]
    )


def test_float16_storage_refuses_values_out_of_range(tmp_path):
    t = _tensors()
    t["post_bn"]["moving_variance"][3] = 1e6
    with pytest.raises(ValueError, match="post_bn/moving_variance"):
        convert.write_tensors(tmp_path / "c.h5", t, dtype="float16")
    assert not (tmp_path / "c.h5").exists()
    with pytest.raises(ValueError, match="dtype='bfloat16'"):
        convert.write_tensors(tmp_path / "d.h5", t, dtype="bfloat16")
