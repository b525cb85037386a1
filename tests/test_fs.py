"""The run folder's file system layer behaves the same on local, `file://` and `ram://` roots."""

import contextlib
import csv
import errno
import json
import os
import re
import subprocess
import sys
import time
import uuid

import keras
import numpy as np
import pytest

from keras_preact._optional import MissingDependency
from keras_preact.train import fs

pytestmark = pytest.mark.backend_independent


def _made(kind, tmp_path):
    path = {
        "local": str(tmp_path),
        "file": "file://" + str(tmp_path),
        "ram": f"ram://test-fs/{uuid.uuid4().hex}",
    }[kind]
    fs.makedirs(path)
    yield path
    fs.remove(path)


@pytest.fixture(params=["local", "file", "ram"])
def root(request, tmp_path):
    """A run folder's parent: a local folder, the same as a `file://` URL, or in memory."""
    yield from _made(request.param, tmp_path)


@pytest.fixture(params=["file", "ram"])
def remote(request, tmp_path):
    """A root with a scheme, where `lock` takes a lease."""
    yield from _made(request.param, tmp_path)


@pytest.fixture
def short_lease(monkeypatch):
    """Leases of 0.6 s: renewed every 0.2 s, a settle delay of 0.06 s."""
    monkeypatch.setenv("KERAS_PREACT_LEASE_SECONDS", "0.6")
    return 0.6


@pytest.fixture(scope="module", autouse=True)
def other_process(tmp_path_factory):
    """A second process holding a 2 s lease on a `file://` folder: started with the module,
    so that its TensorFlow import overlaps the other tests."""
    run = "file://" + str(tmp_path_factory.mktemp("other") / "run")
    env = {**os.environ, "KERAS_BACKEND": "tensorflow", "KERAS_PREACT_LEASE_SECONDS": "2"}
    code = "import sys, time; from keras_preact.train import fs; fs.lock(sys.argv[1]); "
    code += "print('locked', flush=True); time.sleep(60)"
    child = subprocess.Popen(
        [sys.executable, "-c", code, run], env=env, stdout=subprocess.PIPE, text=True
    )
    yield child, run
    child.kill()
    child.wait()


def _fail_halfway(f):
    f.write('{"epoch": ')
    raise OSError(errno.ENOSPC, "No space left on device")


def test_paths_are_local_without_a_scheme_and_joined_by_their_kind():
    assert fs.is_local("/tmp/run") and fs.is_local("runs/x") and fs.is_local("C:\\run")
    assert not any(map(fs.is_local, ["gs://b/run", "s3://b", "file:///tmp", "ram://x"]))
    assert fs.join("runs", "checkpoints", "state.json") == os.path.join(
        "runs", "checkpoints", "state.json"
    )
    assert (
        fs.join("gs://b/run/", "checkpoints", "epoch-0001") == "gs://b/run/checkpoints/epoch-0001"
    )


def test_folders_and_files(root):
    run = fs.join(root, "run")
    assert not fs.exists(run)
    fs.makedirs(fs.join(run, "checkpoints", "epoch-0001"))
    fs.makedirs(run)  # an existing folder is fine
    assert fs.isdir(run) and fs.isdir(fs.join(run, "checkpoints"))
    fs.write_json_atomic(fs.join(run, "config.json"), {"epochs": 2, "seed": None})
    fs.write_text_atomic(fs.join(run, "log.csv"), "epoch,loss\r\n1,0.5\r\n")
    fs.write_atomic(fs.join(run, "blob"), lambda f: f.write(b"\x00\xff"), mode="wb")
    assert fs.listdir(run) == ["blob", "checkpoints", "config.json", "log.csv"]
    assert fs.read_json(fs.join(run, "config.json")) == {"epochs": 2, "seed": None}
    assert fs.read_text(fs.join(run, "log.csv")) == "epoch,loss\r\n1,0.5\r\n"  # as written
    with fs.open(fs.join(run, "log.csv")) as f:
        assert list(csv.reader(f)) == [["epoch", "loss"], ["1", "0.5"]]
    with fs.open(fs.join(run, "blob"), "rb") as f:
        assert f.read() == b"\x00\xff"
    assert fs.getsize(fs.join(run, "blob")) == 2 and not fs.isdir(fs.join(run, "blob"))

    fs.rename(fs.join(run, "log.csv"), fs.join(run, "blob"))  # replaces the old file
    assert fs.read_text(fs.join(run, "blob")) == "epoch,loss\r\n1,0.5\r\n"
    fs.remove(fs.join(run, "blob"))
    fs.remove(fs.join(run, "checkpoints"))  # a folder and everything under it
    fs.remove(fs.join(run, "missing"))
    assert fs.listdir(run) == ["config.json"]


def test_a_missing_file_raises_file_not_found_on_every_root(root):
    for read in (fs.read_text, fs.listdir, fs.getsize):
        with pytest.raises(FileNotFoundError):
            read(fs.join(root, "missing"))


def test_write_atomic_replaces_the_file_and_leaves_no_temporary_file(root):
    path = fs.join(root, "state.json")
    fs.write_json_atomic(path, {"epoch": 1})
    fs.write_json_atomic(path, {"epoch": 2})
    assert fs.read_json(path) == {"epoch": 2}
    assert fs.listdir(root) == ["state.json"]


def test_a_write_that_fails_halfway_keeps_the_previous_file(root):
    path = fs.join(root, "state.json")
    fs.write_json_atomic(path, {"epoch": 1})
    with pytest.raises(fs.WriteError) as e:
        fs.write_atomic(path, _fail_halfway)
    assert re.fullmatch(
        rf"Could not write {re.escape(path)}: No space left on device \(ENOSPC\)\. .*"
        r"previous file or checkpoint is unchanged\. Free some space and rerun the same command\.",
        e.value.strerror,
    )
    assert e.value.errno == errno.ENOSPC
    assert fs.read_json(path) == {"epoch": 1}
    assert fs.listdir(root) == ["state.json"]


def test_a_local_write_is_fsynced_then_renamed_then_its_folder_fsynced(tmp_path, monkeypatch):
    path = str(tmp_path / "state.json")
    calls = []
    fsync, rename = os.fsync, fs.rename
    monkeypatch.setattr(os, "fsync", lambda fd: calls.append("fsync file") or fsync(fd))
    monkeypatch.setattr(fs, "rename", lambda *a: calls.append("rename") or rename(*a))

    def fsync_folder(folder):
        assert fs.read_json(path) == {"epoch": 1}  # the new file is in place
        calls.append(f"fsync folder {folder}")

    monkeypatch.setattr(fs, "fsync_folder", fsync_folder)
    fs.write_json_atomic(path, {"epoch": 1})
    assert calls == ["fsync file", "rename", f"fsync folder {tmp_path}"]


def _model(seed):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    rng = np.random.default_rng(seed)
    model.set_weights([rng.standard_normal(w.shape).astype("float32") for w in model.weights])
    return model


def test_save_file_and_local_copy_round_trip_keras_weights(root):
    path = fs.join(root, "model.weights.h5")
    saved, loaded = _model(0), _model(1)
    fs.save_file(path, saved.save_weights)
    assert fs.listdir(root) == ["model.weights.h5"]
    with fs.local_copy(path) as local:
        loaded.load_weights(local)
    assert os.path.exists(local) == fs.is_local(path)  # a download is removed
    for a, b in zip(saved.get_weights(), loaded.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_a_save_file_that_fails_keeps_the_previous_file(root):
    path = fs.join(root, "model.weights.h5")
    fs.save_file(path, lambda tmp: _write(tmp, b"old"))
    used = []

    def fail(tmp):
        used.append(os.path.basename(tmp))
        _write(tmp, b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(fs.WriteError, match=rf"Could not write {re.escape(path)}: No space left"):
        fs.save_file(path, fail)
    assert fs.TEMP.search(used[0]) and used[0].endswith(".weights.h5")
    assert fs.listdir(root) == ["model.weights.h5"]
    with fs.open(path, "rb") as f:
        assert f.read() == b"old"


def _write(path, data):
    with open(path, "wb") as f:
        f.write(data)


def test_a_second_trainer_is_refused_naming_the_first(root, short_lease):
    run = fs.join(root, "run")
    held = fs.lock(run)
    try:
        with pytest.raises(fs.RunLocked, match=rf"pid {os.getpid()} on .* another --model_dir"):
            fs.lock(run)
    finally:
        held.release()
    fs.lock(run).release()  # a released folder is free at once


def test_a_killed_local_holder_is_taken_over_and_the_lock_emptied_at_release(tmp_path, capsys):
    (tmp_path / ".lock").write_text("pid 1 on elsewhere, since 2020-01-01T00:00:00: train\n")
    held = fs.lock(str(tmp_path))
    assert "Taking over the lock of" in capsys.readouterr().out
    assert (tmp_path / ".lock").read_text().startswith(f"pid {os.getpid()} on ")
    held.release()
    assert (tmp_path / ".lock").read_text() == ""


def _lease(root):
    return fs.read_json(fs.join(root, "run", ".lock"))


def test_an_expired_lease_is_taken_over(remote, short_lease, capsys):
    stale = {"holder": "pid 1 on elsewhere", "pid": 1, "host": "elsewhere", "expires": 1.0}
    fs.makedirs(fs.join(remote, "run"))
    fs.write_json_atomic(fs.join(remote, "run", ".lock"), stale)
    held = fs.lock(fs.join(remote, "run"))
    try:
        assert "whose lease expired" in capsys.readouterr().out
        lease = _lease(remote)
        assert lease["pid"] == os.getpid() and lease["expires"] > time.time()
    finally:
        held.release()
    assert not fs.exists(fs.join(remote, "run", ".lock"))


def _eventually(condition, seconds=10.0):
    """Polls `condition` until it holds: timing on a loaded test machine varies."""
    deadline = time.time() + seconds
    while not condition():
        assert time.time() < deadline, f"still false after {seconds} s"
        time.sleep(0.05)


def test_the_heartbeat_renews_the_lease_and_notices_a_lost_one(remote, short_lease):
    held = fs.lock(fs.join(remote, "run"))
    try:
        first = _lease(remote)["expires"]
        _eventually(lambda: _lease(remote)["expires"] > first)
        assert not held.lost
        other = {**_lease(remote), "holder": "another", "token": "another"}

        def replaced():  # written again each time: a renewal in flight may overwrite it
            fs.write_json_atomic(fs.join(remote, "run", ".lock"), other)
            return held.lost

        _eventually(replaced)
    finally:
        held.release()
    assert _lease(remote)["holder"] == "another"  # release removes only its own lease


def test_the_lease_length_must_be_a_number(root, monkeypatch):
    monkeypatch.setenv("KERAS_PREACT_LEASE_SECONDS", "soon")
    if fs.is_local(root):
        fs.lock(fs.join(root, "run")).release()  # a local folder uses no lease
        return
    with pytest.raises(ValueError, match=r"KERAS_PREACT_LEASE_SECONDS='soon': expected"):
        fs.lock(fs.join(root, "run"))


def test_a_lease_held_by_another_process_is_refused_until_it_expires(other_process, capsys):
    """The other process is killed: it cannot release, so its lease must run out."""
    child, run = other_process
    try:
        assert child.stdout.readline() == "locked\n"
        with pytest.raises(fs.RunLocked, match=rf"pid {child.pid} on .*its lease runs"):
            fs.lock(run)
    finally:
        child.kill()
        child.wait()
    held = []

    def taken():
        with contextlib.suppress(fs.RunLocked):
            held.append(fs.lock(run))
        return held

    _eventually(taken)  # once the last renewal's lease has run out
    held[0].release()
    assert re.search(rf"whose lease expired: pid {child.pid} on ", capsys.readouterr().out)


def test_a_read_only_folder_gives_one_clear_error(tmp_path, monkeypatch):
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(os, "makedirs", read_only)
    with pytest.raises(fs.WriteError, match=r"--model_dir=.*run: Read-only file system"):
        fs.lock(str(tmp_path / "run"))


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores chmod")
def test_a_folder_without_write_permission_gives_one_clear_error(tmp_path):
    tmp_path.chmod(0o555)
    try:
        with pytest.raises(fs.WriteError, match=r"--model_dir=.*run: Permission denied"):
            fs.lock(str(tmp_path / "run"))
        with pytest.raises(fs.WriteError, match=r"state.json: Permission denied \(EACCES\)"):
            fs.write_json_atomic(str(tmp_path / "state.json"), {})
    finally:
        tmp_path.chmod(0o755)


def test_local_folders_need_no_tensorflow_and_remote_ones_say_what_to_install(
    tmp_path, monkeypatch
):
    monkeypatch.setitem(sys.modules, "tensorflow", None)  # `import tensorflow` now fails
    fs.write_json_atomic(str(tmp_path / "config.json"), {"epochs": 2})
    assert fs.read_json(str(tmp_path / "config.json")) == {"epochs": 2}
    fs.lock(str(tmp_path)).release()
    with pytest.raises(MissingDependency, match=r"gs:// run folders .* \(tf\.io\.gfile\).*pip"):
        fs.exists("gs://bucket/run")


def test_a_lease_file_is_json_naming_its_holder(remote, short_lease):
    held = fs.lock(fs.join(remote, "run"))
    try:
        with fs.open(fs.join(remote, "run", ".lock")) as f:
            lease = json.load(f)
    finally:
        held.release()
    assert lease["holder"].startswith(f"pid {os.getpid()} on {lease['host']}, since ")
    assert lease["pid"] == os.getpid()
