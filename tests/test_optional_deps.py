"""A missing optional package is named as such, with the command that installs it, never
reported as a corrupt file. Each test hides one package (`sys.modules[name] = None` makes
its import fail, as on a base install) and calls a public entry point."""

import os
import sys

import pytest

import keras_preact
from keras_preact import convert
from keras_preact import weights as kp_weights
from keras_preact._optional import MissingDependency

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
SHIPPED = os.path.join(os.path.dirname(kp_weights.__file__), "weights_files")


def _hide(monkeypatch, *modules):
    for name in modules:
        monkeypatch.setitem(sys.modules, name, None)


def _assert_names(excinfo, package, extra):
    message = str(excinfo.value)
    assert f"needs the {package} package, which is not installed" in message
    assert f"pip install 'keras-preact[{extra}]'" in message
    assert f"pip install {package}" in message
    assert "corrupt" not in message and "re-download" not in message.lower()


def _tiny(weights):
    return keras_preact.PreActResNet(
        family="imagenet", block="basic", stage_blocks=(2, 1, 1, 1), width_multiplier=0.125,
        input_shape=(64, 64, 3), classes=10, kernel_initializer="zeros", weights=weights,
    )  # fmt: skip


def test_safetensors_file_without_safetensors(monkeypatch):
    _hide(monkeypatch, "safetensors", "safetensors.numpy")
    with pytest.raises(MissingDependency) as excinfo:
        _tiny(os.path.join(FIXTURES, "timm_basic.safetensors"))
    _assert_names(excinfo, "safetensors", "weights")
    assert "Reading .safetensors files" in str(excinfo.value)
    assert isinstance(excinfo.value, ImportError)


def test_t7_file_without_torchfile(monkeypatch):
    _hide(monkeypatch, "torchfile")
    with pytest.raises(MissingDependency) as excinfo:
        keras_preact.PreActResNet(
            family="imagenet", block="bottleneck", stage_blocks=(2, 2, 1, 1),
            width_multiplier=0.125, input_shape=(64, 64, 3), classes=10,
            weights=os.path.join(FIXTURES, "fb_preresnet_tiny.t7"),
        )  # fmt: skip
    _assert_names(excinfo, "torchfile", "weights")


def test_h5_file_without_h5py(monkeypatch):
    path = os.path.join(SHIPPED, "preact_resnet20_fashion_mnist.h5")
    _hide(monkeypatch, "h5py")
    with pytest.raises(MissingDependency) as excinfo:
        convert.read_tensors(path)
    _assert_names(excinfo, "h5py", "weights")


def test_downloaded_file_without_its_reader_is_kept(monkeypatch, tmp_path):
    """A cached download that cannot be read for want of a package is not the file's fault:
    the error names the package and the file stays in the cache."""
    import shutil

    cache = tmp_path / "keras_home" / "models"
    cache.mkdir(parents=True)
    shutil.copy(os.path.join(FIXTURES, "timm_basic.safetensors"), cache / "m.safetensors")
    record = kp_weights.WeightsRecord(
        model="PreActResNet12", tag="cached", dataset="test", classes=10,
        input_shape=(64, 64, 3), layout=keras_preact.Layout.get("timm"),
        format="timm_safetensors", url="http://127.0.0.1:1/m.safetensors",
        file_name="m.safetensors",
    )  # fmt: skip
    monkeypatch.setattr(kp_weights, "RECORDS", [*kp_weights.RECORDS, record])
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))
    _hide(monkeypatch, "safetensors", "safetensors.numpy")
    with pytest.raises(MissingDependency) as excinfo:
        _tiny("test:cached")
    _assert_names(excinfo, "safetensors", "weights")
    assert (cache / "m.safetensors").exists()


def test_tfds_without_tensorflow_datasets(monkeypatch):
    pytest.importorskip("tensorflow")
    from keras_preact.data import tfdata
    from keras_preact.train import sources

    _hide(monkeypatch, "tensorflow_datasets")
    with pytest.raises(MissingDependency) as excinfo:
        tfdata.load_tfds_arrays("fashion_mnist")
    _assert_names(excinfo, "tensorflow-datasets", "train")
    problem = sources.tfds_problem("fashion_mnist", None, can_reach=lambda host: True)
    assert "pip install 'keras-preact[train]'" in problem and "--source=files" in problem
