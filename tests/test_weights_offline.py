"""Weight downloads without a network: what the errors tell a user on a firewalled cluster,
which failures are retried, and what happens to a file copied into the cache by hand.

No test touches the internet: a record's URL points at a closed port on 127.0.0.1, at a
local HTTP server, or at a `.invalid` host whose name resolution is replaced by a failure
(`socket.getaddrinfo` patched), as on a machine without DNS."""

import hashlib
import http.server
import os
import re
import shutil
import socket
import threading
import time

import pytest

import keras_preact
from keras_preact import weights as kp_weights

pytestmark = pytest.mark.backend_independent

FILE = os.path.join(os.path.dirname(__file__), "fixtures", "timm_basic.safetensors")
ENV = kp_weights.MIRROR_ENV
REFUSED = "http://127.0.0.1:1/hub/model.safetensors"  # port 1: connection refused


def _md5(data):
    return hashlib.md5(data).hexdigest()


@pytest.fixture
def env(monkeypatch, tmp_path):
    """No mirror, a cache under `tmp_path`, one download attempt."""
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))
    monkeypatch.setenv("KERAS_PREACT_DOWNLOAD_RETRIES", "1")
    return tmp_path / "keras_home" / "models" / "offline.safetensors"


def _record(url, file_hash=None):
    return kp_weights.WeightsRecord(
        model="PreActResNet12", tag="offline", dataset="test", classes=10, input_shape=None,
        layout=keras_preact.Layout.get("timm"), format="timm_safetensors", url=url,
        file_name="offline.safetensors", file_hash=file_hash,
        hash_algorithm="md5" if file_hash else None,
    )  # fmt: skip


def _error(record, **kwargs):
    with pytest.raises(OSError) as excinfo:
        kp_weights.fetch(record, **kwargs)
    return str(excinfo.value)


def test_offline_error_names_the_mirror_variable_and_the_cache(env):
    message = _error(_record(REFUSED))
    assert f"Download of {REFUSED} failed" in message
    # The documented fix for a firewalled cluster, with a value to set it to ...
    assert re.search(rf"{ENV}=(/|file://|https://)\S", message), message
    # ... and the file to copy by hand.
    assert str(env) in message


@pytest.fixture
def no_dns(monkeypatch):
    """Makes every `.invalid` host name fail to resolve at once; returns the lookups made."""
    lookups = []
    resolve = socket.getaddrinfo

    def getaddrinfo(host, *args, **kwargs):
        if str(host).endswith(".invalid"):
            lookups.append(host)
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return resolve(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return lookups


def test_a_host_name_that_does_not_resolve_fails_at_once(env, no_dns):
    url = "https://weights.invalid/hub/model.safetensors"
    policy = kp_weights.DownloadPolicy(retries=3, backoff=0.5)  # retries would sleep 1.5 s
    start = time.monotonic()
    message = _error(_record(url), policy=policy)
    assert no_dns == ["weights.invalid"]  # one attempt
    assert time.monotonic() - start < 1.0
    assert f"Download of {url} failed after 1 attempt" in message and ENV in message


class _Unavailable(http.server.BaseHTTPRequestHandler):
    """Answers every request with HTTP 503, counting them."""

    def do_GET(self):
        self.server.gets.append(self.path)
        self.send_error(503)

    def log_message(self, *args):
        pass


@pytest.fixture
def unavailable():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Unavailable)
    httpd.gets = []
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/m.safetensors", httpd.gets
    httpd.shutdown()
    httpd.server_close()


@pytest.mark.parametrize("failure", ["refused", "503"])
def test_errors_that_may_pass_keep_their_retries(env, unavailable, capsys, failure):
    url = REFUSED if failure == "refused" else unavailable[0]
    policy = kp_weights.DownloadPolicy(retries=3, backoff=0.01)
    message = _error(_record(url), policy=policy)
    assert f"Download of {url} failed after 3 attempts" in message
    out = capsys.readouterr().out
    assert "Download attempt 1 failed" in out and "Download attempt 2 failed" in out
    if failure == "503":
        assert len(unavailable[1]) == 3


def test_a_file_url_mirror_without_the_file_names_the_path_and_the_record_url(
    monkeypatch, env, tmp_path
):
    folder = tmp_path / "mirror"
    folder.mkdir()
    monkeypatch.setenv(ENV, folder.as_uri())
    record = _record(REFUSED)
    message = _error(record)
    assert str(folder / "offline.safetensors") in message  # the path tried
    assert REFUSED in message  # where to copy the file from
    assert ENV in message and not env.exists()


def test_a_file_url_mirror_with_the_file(monkeypatch, env, tmp_path):
    folder = tmp_path / "a mirror"  # a space: percent-encoded in the URL
    folder.mkdir()
    shutil.copy(FILE, folder / "offline.safetensors")
    monkeypatch.setenv(ENV, folder.as_uri() + "/")
    record = _record(REFUSED, _md5(open(FILE, "rb").read()))
    assert kp_weights.fetch(record) == str(env)
    assert open(env, "rb").read() == open(FILE, "rb").read()


def test_a_wrong_file_copied_into_the_cache_is_kept_and_named(env, capsys):
    data = open(FILE, "rb").read()
    wrong = b"not the weights: " + data[:100]
    env.parent.mkdir(parents=True)
    env.write_bytes(wrong)  # copied there by hand, offline
    record = _record(REFUSED, _md5(data))
    message = _error(record)
    # The user's file is not destroyed: it is moved aside, and the message says where.
    bad = f"{env}.bad"
    assert open(bad, "rb").read() == wrong and not env.exists()
    assert bad in message and bad in capsys.readouterr().out
    # It says which hash the file has and which is expected, and what that means.
    assert f"md5 {_md5(wrong)} where {_md5(data)} is expected" in message
    assert "wrong file" in message and "corrupt" in message
    # And what to do: the published file, from its URL, into the cache.
    assert REFUSED in message and str(env) in message
