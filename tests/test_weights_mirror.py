"""$KERAS_PREACT_WEIGHTS_MIRROR: weight downloads from a mirror URL (a local HTTP server on
127.0.0.1) or a local folder, with the same hash checks as downloads from the records' own
URLs (which point at a closed port here, so a download that ignored the mirror fails)."""

import functools
import hashlib
import http.server
import os
import shutil
import threading

import keras
import numpy as np
import pytest

import keras_preact
from keras_preact import weights as kp_weights

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
FILE = os.path.join(FIXTURES, "timm_basic.safetensors")
ENV = "KERAS_PREACT_WEIGHTS_MIRROR"


def _md5(path):
    with open(path, "rb") as f:
        return hashlib.md5(f.read()).hexdigest()


@pytest.fixture
def record(monkeypatch, tmp_path):
    """A record of the timm fixture whose own URL refuses connections (port 1)."""
    rec = kp_weights.WeightsRecord(
        model="PreActResNet12", tag="mirrored", dataset="test", classes=10,
        input_shape=(64, 64, 3), layout=keras_preact.Layout.get("timm"),
        format="timm_safetensors", url="http://127.0.0.1:1/hub/model.safetensors",
        file_name="mirrored.safetensors", file_hash=_md5(FILE), hash_algorithm="md5",
    )  # fmt: skip
    monkeypatch.setattr(kp_weights, "RECORDS", [*kp_weights.RECORDS, rec])
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))
    monkeypatch.setenv("KERAS_PREACT_DOWNLOAD_RETRIES", "1")
    return rec


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "www"
    (root / "weights").mkdir(parents=True)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield root / "weights", f"http://127.0.0.1:{httpd.server_address[1]}/weights"
    httpd.shutdown()
    httpd.server_close()


def _cached(tmp_path):
    return tmp_path / "keras_home" / "models" / "mirrored.safetensors"


def test_no_mirror_is_the_record_url(monkeypatch, record):
    monkeypatch.delenv(ENV, raising=False)
    assert kp_weights.source_url(record) == record.url
    monkeypatch.setenv(ENV, "")
    assert kp_weights.source_url(record) == record.url


@pytest.mark.parametrize("slash", ["", "/"])
def test_http_mirror(monkeypatch, tmp_path, record, server, slash):
    root, base = server
    shutil.copy(FILE, root / "mirrored.safetensors")
    monkeypatch.setenv(ENV, base + slash)
    assert kp_weights.source_url(record) == f"{base}/mirrored.safetensors"
    path = kp_weights.fetch(record)
    assert path == str(_cached(tmp_path)) and _md5(path) == record.file_hash


def test_folder_mirror_builds_the_model(monkeypatch, tmp_path, record):
    folder = tmp_path / "mirror"
    folder.mkdir()
    shutil.copy(FILE, folder / "mirrored.safetensors")
    monkeypatch.setenv(ENV, str(folder))
    golden = np.load(os.path.join(FIXTURES, "timm_basic.npz"))
    model = keras_preact.PreActResNet(
        family="imagenet", block="basic", stage_blocks=(2, 1, 1, 1), width_multiplier=0.125,
        classifier_activation=None, kernel_initializer="zeros", weights="test:mirrored",
    )  # fmt: skip
    logits = keras.ops.convert_to_numpy(model(golden["x_nchw"].transpose(0, 2, 3, 1)))
    np.testing.assert_allclose(logits, golden["logits"], atol=1e-4, rtol=0)
    assert _md5(_cached(tmp_path)) == record.file_hash  # copied into the cache, checked


def test_cached_file_needs_no_mirror(monkeypatch, tmp_path, record):
    folder = tmp_path / "mirror"
    folder.mkdir()
    shutil.copy(FILE, folder / "mirrored.safetensors")
    monkeypatch.setenv(ENV, str(folder))
    kp_weights.fetch(record)
    monkeypatch.setenv(ENV, str(tmp_path / "gone"))
    assert kp_weights.fetch(record) == str(_cached(tmp_path))


def test_folder_mirror_without_the_file(monkeypatch, tmp_path, record):
    folder = tmp_path / "mirror"
    folder.mkdir()
    monkeypatch.setenv(ENV, str(folder))
    with pytest.raises(FileNotFoundError) as excinfo:
        kp_weights.fetch(record)
    message = str(excinfo.value)
    assert str(folder) in message and ENV in message and "mirrored.safetensors" in message
    assert record.url in message
    assert not _cached(tmp_path).exists()


def test_missing_mirror_folder(monkeypatch, tmp_path, record):
    monkeypatch.setenv(ENV, str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=rf"{ENV}=.*nowhere.*no such folder"):
        kp_weights.fetch(record)


def test_unsupported_mirror_scheme(monkeypatch, record):
    monkeypatch.setenv(ENV, "ftp://mirror.example/weights")
    with pytest.raises(ValueError, match=rf"{ENV}='ftp://mirror.example/weights'.*https://"):
        kp_weights.fetch(record)


@pytest.mark.parametrize("where", ["http", "folder"])
def test_mirror_copy_with_another_hash_is_refused(monkeypatch, tmp_path, record, server, where):
    root, base = server
    if where == "folder":
        root = tmp_path / "mirror"
        root.mkdir()
    data = bytearray(open(FILE, "rb").read())
    data[-1] ^= 0xFF  # one byte of the last tensor
    (root / "mirrored.safetensors").write_bytes(bytes(data))
    monkeypatch.setenv(ENV, base if where == "http" else str(root))
    with pytest.raises(ValueError) as excinfo:
        kp_weights.fetch(record)
    message = str(excinfo.value)
    assert f"expected md5 {record.file_hash}, got {hashlib.md5(data).hexdigest()}" in message
    assert "mirrored.safetensors" in message and f"mirror's copy ({ENV})" in message
    assert not _cached(tmp_path).exists()
    assert not list(_cached(tmp_path).parent.glob("*.part*"))


def test_http_mirror_without_the_file(monkeypatch, tmp_path, record, server):
    _, base = server
    monkeypatch.setenv(ENV, base)
    with pytest.raises(OSError) as excinfo:
        kp_weights.fetch(record)
    message = str(excinfo.value)
    assert f"{base}/mirrored.safetensors" in message and "404" in message
    assert f"Does the mirror ({ENV}) hold mirrored.safetensors?" in message
    assert record.url in message  # where to copy the file from
    assert not _cached(tmp_path).exists()
