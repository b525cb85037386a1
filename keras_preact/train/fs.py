"""The one file system layer of a run folder: local folders, `gs://`, `s3://`, `file://` and
`ram://` behave the same.

A path with no scheme is local: `os` and `open`, no TensorFlow. A path with a scheme,
`file://` included (how tests take the remote path across processes), goes through
`tf.io.gfile`, whose errors are raised as the `OSError` a local file would raise. There is no
folder rename (on `ram://` a renamed folder lists empty, object stores copy it object by
object): a checkpoint folder is committed by writing its state file last.

>>> import tempfile
>>> from keras_preact.train import fs
>>> tmp = tempfile.TemporaryDirectory()
>>> fs.write_json_atomic(fs.join(tmp.name, "config.json"), {"epochs": 2})
>>> fs.read_json(fs.join(tmp.name, "config.json")), fs.listdir(tmp.name)
({'epochs': 2}, ['config.json'])
>>> tmp.cleanup()
"""

import atexit
import builtins
import contextlib
import datetime
import errno
import json
import logging
import os
import re
import shlex
import shutil
import socket
import sys
import tempfile
import threading
import time
import uuid

from keras_preact._optional import MissingDependency

log = logging.getLogger(__name__)

_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
#: TensorFlow's error classes -> the errno a local file system gives for the same failure.
_ERRNO = {"NotFoundError": errno.ENOENT, "AlreadyExistsError": errno.EEXIST,
          "PermissionDeniedError": errno.EACCES, "UnauthenticatedError": errno.EACCES,
          "ResourceExhaustedError": errno.ENOSPC}  # fmt: skip
#: The temporary names of this module's writers, `NAME.tmp-PID` and `.tmp-PID-NAME`: what a
#: killed writer leaves behind, safe to remove before a run writes its folder.
TEMP = re.compile(r"(\.tmp-\d+$|^\.tmp-\d+-)")
#: How long a remote run folder's lease lasts unless renewed (`KERAS_PREACT_LEASE_SECONDS`).
LEASE_SECONDS = 60.0


class WriteError(OSError):
    """A file of the run could not be written; nothing half-written was left behind."""


class RunLocked(RuntimeError):
    """Another trainer holds the run folder."""


def is_local(path):
    """Whether `path` is a local file name (it has no `scheme://`)."""
    return not _SCHEME.match(os.fspath(path))


def _gfile(path):
    """`tf.io.gfile`, imported for the first path with a scheme."""
    scheme = _SCHEME.match(path).group(1)
    try:
        import tensorflow as tf
    except ImportError as e:
        raise MissingDependency(
            f"{scheme}:// run folders are read and written through TensorFlow's file systems "
            "(tf.io.gfile), and tensorflow is not installed: pip install tensorflow (or pip "
            f"install 'keras-preact[train]'), or use a local folder. ({type(e).__name__}: {e})"
        ) from e
    if scheme not in ("gs", "file", "ram"):  # TensorFlow >= 2.6 left s3, hdfs, az to tfio
        with contextlib.suppress(ImportError):
            import tensorflow_io  # noqa: F401 - registers its file systems with tf.io.gfile
    return tf.io.gfile


def _call(path, function, *args, **kwargs):
    """`function(*args, **kwargs)`, raising TensorFlow's errors as the `OSError` a local file
    would raise for `path`."""
    try:
        return function(*args, **kwargs)
    except Exception as e:
        tf = sys.modules.get("tensorflow")
        if tf is None or not isinstance(e, tf.errors.OpError):
            raise
        code, message = _ERRNO.get(type(e).__name__), f"{type(e).__name__}: {e.message}"
        raise (OSError(code, message, path) if code else OSError(message)) from e


def _g(name, path, *args, **kwargs):
    """`tf.io.gfile.<name>(path, ...)`, raising `OSError`."""
    return _call(path, getattr(_gfile(path), name), path, *args, **kwargs)


class _File:
    """A `tf.io.gfile.GFile` whose errors are `OSError`, as a local file's are."""

    def __init__(self, file, path):
        self._file, self._path = file, path

    def __getattr__(self, name):
        value = getattr(self._file, name)
        return (lambda *a, **k: _call(self._path, value, *a, **k)) if callable(value) else value

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def __iter__(self):
        return iter(self.readline, b"" if "b" in self.mode else "")


def join(path, *parts):
    """`os.path.join` for a local path, a `/`-join for a path with a scheme."""
    if is_local(path):
        return os.path.join(path, *parts)
    return "/".join([path.rstrip("/"), *(part.strip("/") for part in parts if part)])


def dirname(path):
    """The folder of `path` (made absolute when local)."""
    if is_local(path):
        return os.path.dirname(os.path.abspath(path))
    return path.rstrip("/").rsplit("/", 1)[0]


def basename(path):
    """The last part of `path`."""
    return os.path.basename(path) if is_local(path) else path.rstrip("/").rsplit("/", 1)[-1]


def isfile(path):
    """Whether `path` is a file."""
    return exists(path) and not isdir(path)


def exists(path):
    """Whether a file or folder exists at `path`."""
    return os.path.exists(path) if is_local(path) else _g("exists", path)


def isdir(path):
    """Whether `path` is a folder."""
    return os.path.isdir(path) if is_local(path) else _g("isdir", path)


def listdir(path):
    """The sorted names (not paths) in the folder `path`."""
    names = os.listdir(path) if is_local(path) else _g("listdir", path)
    return sorted(name.rstrip("/") for name in names)  # object stores end folders with "/"


def makedirs(path):
    """Creates the folder `path` and its parents; an existing folder is fine."""
    if is_local(path):
        os.makedirs(path, exist_ok=True)
    else:
        _g("makedirs", path)


def getsize(path):
    """The size of the file `path` in bytes."""
    return os.path.getsize(path) if is_local(path) else _g("stat", path).length


def remove(path):
    """Removes the file `path`, or the folder and everything under it; a missing path is fine."""
    if is_local(path):
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
    elif _g("isdir", path):
        _g("rmtree", path)
    else:
        with contextlib.suppress(FileNotFoundError):
            _g("remove", path)


def rename(src, dst):
    """Renames the file `src` to `dst`, replacing `dst` if it exists."""
    if is_local(src):
        os.replace(src, dst)
    else:
        _g("rename", src, dst, overwrite=True)


def open(path, mode="r"):  # shadows the builtin on purpose: used as fs.open
    """A file object for `path`: bytes with a "b" mode, else UTF-8 text with no newline
    translation (as `csv` needs, and as TensorFlow's files behave)."""
    if is_local(path):
        text = {} if "b" in mode else {"encoding": "utf-8", "newline": ""}
        return builtins.open(path, mode, **text)
    if "r" in mode and not _g("exists", path):  # a GFile opens lazily: fail here, as open does
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)
    return _File(_gfile(path).GFile(path, mode), path)


def read_text(path):
    """The text in the file `path`."""
    with open(path) as f:
        return f.read()


def read_json(path):
    """The JSON value in the file `path`."""
    return json.loads(read_text(path))


def fsync_folder(path):
    """Flushes a local folder's entries, so that a rename in it survives a power cut; a no-op
    for a path with a scheme (a store commits each write) and on Windows (no folder fds)."""
    if not is_local(path) or os.name == "nt":
        return
    fd = os.open(path or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_failed(e, path):
    """One error naming the file that could not be written and why (e.g. a full disk)."""
    code = errno.errorcode.get(e.errno, "") if isinstance(e.errno, int) else ""
    reason = os.strerror(e.errno) if code else str(e)
    hint = " Free some space and rerun the same command." if e.errno == errno.ENOSPC else ""
    return WriteError(e.errno, f"Could not write {path}: {reason} ({code or type(e).__name__}). "
                      "Its temporary file was removed and the previous file or checkpoint is "
                      f"unchanged.{hint}")  # fmt: skip


@contextlib.contextmanager
def _committing(path, tmp):
    """On any failure removes `tmp`; an `OSError` becomes one `WriteError` naming `path`."""
    try:
        yield
    except BaseException as e:
        with contextlib.suppress(OSError):
            remove(tmp)
        if isinstance(e, OSError) and not isinstance(e, WriteError):
            raise _write_failed(e, path) from None
        raise


def write_atomic(path, write, mode="w"):
    """The one atomic writer: `write(file)` fills a temporary file (`fs.open(tmp, mode)`, mode
    "w" or "wb"), which is flushed to disk and renamed into place. On failure (a full disk, a
    read-only folder) it is removed, and one `WriteError` names `path`, left unchanged."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with _committing(path, tmp):
        with open(tmp, mode) as f:
            write(f)
            if is_local(path):
                f.flush()
                os.fsync(f.fileno())
        rename(tmp, path)
    fsync_folder(os.path.dirname(path))  # after the rename: makes it survive a power cut


def write_json_atomic(path, obj):
    """`obj` as JSON at `path`, atomically (`write_atomic`)."""
    write_atomic(path, lambda f: json.dump(obj, f, indent=2, sort_keys=True, default=str))


def write_text_atomic(path, text):
    """`text` at `path`, atomically (`write_atomic`)."""
    write_atomic(path, lambda f: f.write(text))


def save_file(path, write_local):
    """`write_local(tmp)` writes a local file (h5py, `model.save_weights`), moved to `path`
    atomically; on failure nothing is left at the temporary names, one `WriteError` names `path`.

    `tmp` ends with `path`'s name (`.tmp-PID-model.weights.h5`: Keras checks the suffix). It
    sits next to a local `path`; for a path with a scheme it is written in a local temporary
    folder, copied to `PATH.tmp-PID` and renamed.
    """
    name = basename(path)
    if is_local(path):
        tmp = os.path.join(os.path.dirname(path), f".tmp-{os.getpid()}-{name}")
        with _committing(path, tmp):
            write_local(tmp)
            with builtins.open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        fsync_folder(os.path.dirname(path))
        return
    tmp = f"{path}.tmp-{os.getpid()}"
    with tempfile.TemporaryDirectory() as folder, _committing(path, tmp):
        local = os.path.join(folder, f".tmp-{os.getpid()}-{name}")
        write_local(local)
        _call(tmp, _gfile(tmp).copy, local, tmp, overwrite=True)
        rename(tmp, path)


@contextlib.contextmanager
def local_copy(path):
    """A local file with the contents of `path`: `path` itself when local, else a download
    into a temporary folder, removed on exit. The file name is kept (Keras checks it)."""
    if is_local(path):
        yield os.fspath(path)
        return
    with tempfile.TemporaryDirectory() as folder:
        local = os.path.join(folder, basename(path))
        _g("copy", path, local, overwrite=True)
        yield local


def _cannot_write(folder, e):
    return WriteError(e.errno, f"Cannot write in --model_dir={folder}: {e.strerror or e}. Give "
                      "the run a folder it can write to.")  # fmt: skip


def _refused(folder, holder):
    return RunLocked(f"{folder} is in use by another trainer: {holder}. Wait for it to end or "
                     "stop it, or give this run another --model_dir.")  # fmt: skip


def _holder():
    command = " ".join(map(shlex.quote, getattr(sys, "orig_argv", sys.argv)))
    since = datetime.datetime.now().isoformat(timespec="seconds")
    return f"pid {os.getpid()} on {socket.gethostname()}, since {since}: {command}"


def lock(folder):
    """Takes `folder` (created if needed) for this trainer, until the process ends.

    Locally the guard is an `fcntl.flock` on `FOLDER/.lock`, which the kernel drops when its
    holder dies (its leftover file is taken over). A remote folder has no locks: `.lock` is a
    lease, JSON {"holder", "pid", "host", "expires"} that a daemon thread renews every third
    of `KERAS_PREACT_LEASE_SECONDS` (default 60); a lease not renewed in time is taken over.
    Best effort: object stores have no compare-and-swap, so two trainers starting at the same
    moment are told apart only by re-reading the lease after a short settle delay.

    Returns:
        A handle whose `release()` gives the folder up (done at a normal exit too); keep it.

    Raises:
        RunLocked: another live trainer holds the folder; the message names it.
        WriteError: the folder cannot be written (read-only, no permission).
    """
    if not is_local(folder):
        return _Lease.take(folder)
    path = os.path.join(folder, ".lock")
    try:
        os.makedirs(folder, exist_ok=True)
        handle = builtins.open(path, "a+")  # noqa: SIM115 - held for the process's lifetime
    except OSError as e:
        raise _cannot_write(folder, e) from None
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        return _Flock(handle)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "a process that has not written its name yet"
        handle.close()
        raise _refused(folder, holder) from None
    handle.seek(0)
    stale = handle.read().strip()
    if stale:
        print(f"Taking over the lock of {path} left by an ended process: {stale}", flush=True)
    handle.seek(0)
    handle.truncate()
    handle.write(_holder() + "\n")
    handle.flush()
    return _Flock(handle)


class _Flock:
    """A local run folder's lock: the open `.lock` file that holds the flock."""

    def __init__(self, file):
        self.file = file
        atexit.register(self.release)

    def release(self):
        """Empties the lock file, so the next trainer sees no ended holder, and unlocks."""
        atexit.unregister(self.release)
        with contextlib.suppress(OSError, ValueError):
            self.file.seek(0)
            self.file.truncate()
            self.file.close()


def _read_lease(path):
    """The lease at `path`; {} when there is none or it is unreadable (as good as expired)."""
    try:
        lease = read_json(path)
    except (FileNotFoundError, ValueError):
        return {}
    ok = isinstance(lease, dict) and isinstance(lease.get("expires"), (int, float))
    return lease if ok else {}


class _Lease:
    """A remote run folder's lease, renewed by a daemon thread until `release()`.

    `lost` turns true if the heartbeat finds another trainer's lease in its place.
    """

    def __init__(self, path, lease, seconds):
        self.path, self.lease, self.seconds, self.lost = path, lease, seconds, False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, name=f"lease {path}", daemon=True)
        self._thread.start()
        atexit.register(self.release)

    @classmethod
    def take(cls, folder):
        value = os.environ.get("KERAS_PREACT_LEASE_SECONDS", str(LEASE_SECONDS))
        seconds = float(value) if re.fullmatch(r"\d+(\.\d*)?|\.\d+", value.strip()) else 0.0
        if not seconds > 0:  # `inf`, `nan`, 0 and words too
            raise ValueError(
                f"KERAS_PREACT_LEASE_SECONDS={value!r}: expected a number of seconds > 0 "
                f"(the default is {LEASE_SECONDS:g}). Set it to one or unset it."
            )
        path = join(folder, ".lock")
        try:
            makedirs(folder)
        except OSError as e:
            raise _cannot_write(folder, e) from None
        found, now = _read_lease(path), time.time()
        left = found.get("expires", 0) - now
        if left > 0:
            raise _refused(folder, f"{found.get('holder')} (its lease runs {left:.0f} s more)")
        if found:
            holder = found.get("holder")
            print(f"Taking over the lock of {path}, whose lease expired: {holder}", flush=True)
        lease = {"holder": _holder(), "pid": os.getpid(), "host": socket.gethostname()}
        lease.update(expires=now + seconds, token=uuid.uuid4().hex)
        write_json_atomic(path, lease)
        # Another trainer that read the same expired lease has written its own by now.
        time.sleep(min(1.0, seconds / 10))
        found = _read_lease(path)
        if found.get("token") != lease["token"]:
            raise _refused(folder, found.get("holder", "a trainer that removed this lease"))
        return cls(path, lease, seconds)

    def _renew(self):
        while not self._stop.wait(self.seconds / 3):
            try:
                if _read_lease(self.path).get("token") != self.lease["token"]:
                    self.lost = True
                    log.error("The lease %s was taken by another trainer.", self.path)
                    return
                self.lease["expires"] = time.time() + self.seconds
                write_json_atomic(self.path, self.lease)
            except OSError as e:  # a network hiccup: the next beat tries again
                log.warning("Could not renew the lease %s: %s", self.path, e)

    def release(self):
        """Stops the heartbeat and removes the lease, if it is still this trainer's."""
        atexit.unregister(self.release)
        self._stop.set()
        self._thread.join(self.seconds)
        with contextlib.suppress(OSError):
            if _read_lease(self.path).get("token") == self.lease["token"]:
                remove(self.path)
