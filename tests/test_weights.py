"""Pretrained weights: the records table, conversion parity per upstream layout, bad input.

Parity tests build small networks of each upstream layout and compare logits with the
reference framework's, offline: keras.applications (Keras' own ResNet50V2, built here), timm (golden outputs in tests/fixtures, tools/make_timm_fixture.py) and
fb.resnet.torch (a Torch7 fixture with an independent forward, tools/make_t7_fixture.py).
"""

import dataclasses
import functools
import hashlib
import http.server
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from unittest import mock

import h5py
import keras
import numpy as np
import pytest
from model_test_utils import REPO

import keras_preact
from keras_preact import convert
from keras_preact import weights as kp_weights
from keras_preact.convert import torch7
from keras_preact.imagenet_utils import class_index, decode_predictions, preprocess_input

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def _tool(name):
    """A script of tools/ (not a package) as a module."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


torch7_reference = _tool("torch7_reference")  # the Torch7 writer

TOL = 1e-4


def _tiny(block, stage_blocks, width_multiplier, **kwargs):
    return keras_preact.PreActResNet(
        family="imagenet", block=block, stage_blocks=stage_blocks,
        width_multiplier=width_multiplier, input_shape=(64, 64, 3), classes=10,
        classifier_activation=None, kernel_initializer="zeros", **kwargs,
    )  # fmt: skip


def _logits(model, x_nhwc):
    return keras.ops.convert_to_numpy(model(x_nhwc, training=False))


# -- The records table -------------------------------------------------------------------


def test_every_imagenet_depth_has_a_record():
    depths = {r.depth for r in kp_weights.list_records(dataset="imagenet")}
    assert depths >= {18, 34, 50, 101, 152, 200}


def test_records_are_complete():
    keys = [(r.model, r.name) for r in kp_weights.RECORDS]  # tags are per model, as in timm
    assert len(keys) == len(set(keys))
    for r in kp_weights.RECORDS:
        assert r.model in keras_preact.MODELS, r.name
        assert isinstance(r.layout, keras_preact.Layout), r.name
        assert r.url or r.shipped, r.name
        assert r.license and r.source and r.num_params, r.name
        assert r.format in (*convert.FORMATS, "keras_native"), r.name
        if r.dataset == "imagenet":
            assert r.url.startswith("https://") and r.top1 is not None, r.name
            assert r.classes == 1000 and r.preprocessing in ("inception", "imagenet_torch")
        if r.file_hash:
            assert len(r.file_hash) == {"md5": 32, "sha256": 64}[r.hash_algorithm]


def test_imagenet_picks_the_best_reported_top1():
    assert kp_weights.get_record("imagenet", 50).name == "imagenet:timm_a1h_in1k"
    assert kp_weights.get_record("imagenet", 152).name == "imagenet:keras"
    assert kp_weights.get_record("imagenet", 200).name == "imagenet:fb_torch"


#: Per layout preset: the record (name, depth) whose parameter count its network must have,
#: and the difference. "fb" has no published file: it is "fb_legacy" without the 15,616
#: weights of its branch-scope BatchNorms (docs/models.md).
PRESET_RECORDS = {
    "paper": ("fashion_mnist:e6", 20, 0),
    "timm": ("imagenet:timm_ra4_e3600_r224_in1k", 18, 0),
    "keras": ("imagenet:keras", 50, 0),
    "fb_legacy": ("imagenet:fb_torch", 200, 0),
    "fb": ("imagenet:fb_torch", 200, -15_616),
}


def _built_params(record, layout):
    with mock.patch.object(keras.initializers.VarianceScaling, "__call__", _zeros):  # shapes only
        model = keras_preact.get_model(
            record.model, input_shape=record.input_shape, classes=record.classes, layout=layout
        )
    return model.count_params()


@pytest.mark.parametrize(
    "preset",
    [pytest.param(p, marks=[] if d <= 20 else pytest.mark.slow)
     for p, (_, d, _) in PRESET_RECORDS.items()],
)  # fmt: skip
def test_layout_preset_builds_its_records_parameter_count(preset):
    name, depth, difference = PRESET_RECORDS[preset]
    record = kp_weights.get_record(name, depth)
    if not difference:
        assert record.layout == keras_preact.Layout.get(preset)
    assert _built_params(record, preset) == record.num_params + difference


@pytest.mark.parametrize(
    "record",
    [
        pytest.param(r, id=r.name + "-" + r.model, marks=pytest.mark.slow)
        for r in kp_weights.RECORDS
        if (r.name, r.depth, 0) not in PRESET_RECORDS.values()
    ],
)
def test_record_param_count_matches_the_built_model(record):
    # Builds with the record's layout but no weights: the count is what the file fills.
    assert _built_params(record, record.layout) == record.num_params


# -- resolve: argument checks --------------------------------------------------------------


def test_unknown_tag_lists_the_available_ones():
    with pytest.raises(ValueError, match=r"imagenet:fb_torch"):
        keras_preact.PreActResNet200(weights="imagenet:nope")
    with pytest.raises(ValueError, match=r"Available for this depth"):
        keras_preact.PreActResNet20(weights="imagenet", input_shape=(32, 32, 3))


def test_record_for_another_depth_raises():
    with pytest.raises(ValueError, match=r"exist for \['PreActResNet200'\]"):
        keras_preact.PreActResNet50(weights="imagenet:fb_torch")


def test_include_top_with_other_classes_raises():
    with pytest.raises(ValueError, match=r"1000-class"):
        keras_preact.PreActResNet50(weights="imagenet", classes=10)


def test_contradicting_layout_raises():
    with pytest.raises(
        ValueError, match=r"layout='paper' contradicts.*stem_norm=True \(file: False\)"
    ):
        keras_preact.PreActResNet50(weights="imagenet:timm_a1h_in1k", layout="paper")
    with pytest.raises(ValueError, match=r"conv_bias=frozenset\(\) \(file: frozenset"):
        keras_preact.PreActResNet152(
            weights="imagenet", layout=keras_preact.Layout.get("keras").replace(conv_bias=())
        )


def test_conv_bias_compares_as_a_set_of_places():
    # A layout equal to the record's, conv_bias listed in another order, is the record's.
    same = keras_preact.Layout.get("keras").replace(
        conv_bias=["residual_last", "stem", "projection"]
    )
    assert same == kp_weights.get_record("imagenet:keras").layout
    with pytest.raises(ValueError, match=r"conv_bias='bogus'.*'residual_inner'"):
        keras_preact.Layout.get("keras").replace(conv_bias="bogus")


def test_other_unit_raises():
    with pytest.raises(ValueError, match=r"unit='full_preact'"):
        keras_preact.PreActResNet200(weights="imagenet", unit="relu_preact")


def test_local_upstream_file_checks_the_layout_of_its_format():
    path = os.path.join(FIXTURES, "timm_basic.safetensors")
    with pytest.raises(ValueError, match=r"contradicts.*downsample_in='last_unit'"):
        _tiny("basic", (2, 1, 1, 1), 0.125, weights=path,
              layout=keras_preact.Layout.get("timm").replace(downsample_in="last_unit"))  # fmt: skip


# -- Parity: keras.applications --------------------------------------------------------


def _zeros(self, shape, dtype=None):
    return keras.ops.zeros(shape, dtype=dtype)


def _keras_reference():
    """Keras' own ResNet50V2 (keras.applications: pre-activation units with conv biases, the
    layout of the `imagenet:keras` records), 10 classes, with random weights."""
    # Random initialization compiles one kernel per shape under JAX (slow); every value is
    # overwritten below, so the initializers return zeros while building.
    with mock.patch.object(keras.initializers.VarianceScaling, "__call__", _zeros):
        ref = keras.applications.ResNet50V2(
            weights=None, input_shape=(64, 64, 3), classes=10, classifier_activation=None
        )
    rng = np.random.default_rng(0)
    for w in ref.weights:
        if w.name == "moving_variance":
            w.assign(rng.uniform(0.5, 1.5, w.shape).astype("float32"))
        else:
            w.assign((0.1 * rng.standard_normal(w.shape)).astype("float32"))
    return ref


@pytest.fixture(scope="module")
def keras_h5(tmp_path_factory):
    """Keras' reference with random weights, written as the Keras 2 HDF5 files Keras
    downloads (root `layer_names`, one group per layer with `weight_names`) by Keras' own
    legacy writer: `model.save` to `.h5` writes that tree under `model_weights`, which is
    copied to the root of a weights-only file here."""
    ref = _keras_reference()
    folder = tmp_path_factory.mktemp("keras")
    model_file = str(folder / "resnet50v2_model.h5")
    ref.save(model_file)
    path = str(folder / "resnet50v2_weights.h5")
    with h5py.File(model_file, "r") as source, h5py.File(path, "w") as target:
        tree = source["model_weights"]
        target.attrs.update(tree.attrs)
        for name in tree:
            source.copy(tree[name], target, name)
    os.remove(model_file)
    x = np.random.default_rng(1).uniform(-1, 1, (2, 64, 64, 3)).astype("float32")
    # predict: one compiled program (eager calls compile layer by layer under JAX).
    return path, x, ref.predict(x, verbose=0), ref.count_params()


def test_keras_applications_parity(keras_h5):
    path, x, expected, n_params = keras_h5
    assert convert.detect_format(path) == "keras_h5"
    with h5py.File(path, "r") as f:
        assert "layer_names" in f.attrs and "model_weights" not in f  # a weights-only file
    model = keras_preact.PreActResNet50(
        input_shape=(64, 64, 3), classes=10, classifier_activation=None,
        kernel_initializer="zeros", weights=path,
    )  # fmt: skip
    assert model.count_params() == n_params
    np.testing.assert_allclose(model.predict(x, verbose=0), expected, atol=TOL, rtol=0)


def test_keras_applications_without_top(keras_h5):
    path, x, _, _ = keras_h5
    model = keras_preact.PreActResNet50(
        input_shape=(64, 64, 3), include_top=False, pooling="avg", kernel_initializer="zeros",
        weights=path,
    )  # fmt: skip
    kernel = keras.ops.convert_to_numpy(model.get_layer("conv1_conv").kernel)
    np.testing.assert_array_equal(kernel, convert.read_tensors(path)["conv1_conv"]["kernel"])


# -- Parity: timm --------------------------------------------------------------------------

TIMM_CONFIGS = {"basic": ("basic", (2, 1, 1, 1)), "bottleneck": ("bottleneck", (1, 2, 1, 1))}


@pytest.mark.parametrize("name", sorted(TIMM_CONFIGS))
def test_timm_parity(name):
    block, stage_blocks = TIMM_CONFIGS[name]
    golden = np.load(os.path.join(FIXTURES, f"timm_{name}.npz"))
    path = os.path.join(FIXTURES, f"timm_{name}.safetensors")
    model = _tiny(block, stage_blocks, 0.125, weights=path)
    x = golden["x_nchw"].transpose(0, 2, 3, 1)
    np.testing.assert_allclose(_logits(model, x), golden["logits"], atol=TOL, rtol=0)


def test_timm_parity_channels_first():
    if keras.backend.backend() == "tensorflow":
        pytest.skip("TensorFlow's CPU convolutions do not support channels_first.")
    golden = np.load(os.path.join(FIXTURES, "timm_basic.npz"))
    model = keras_preact.PreActResNet(
        family="imagenet", block="basic", stage_blocks=(2, 1, 1, 1), width_multiplier=0.125,
        input_shape=(3, 64, 64), classes=10, classifier_activation=None,
        kernel_initializer="zeros", data_format="channels_first", weights=os.path.join(FIXTURES, "timm_basic.safetensors"),
    )  # fmt: skip
    np.testing.assert_allclose(_logits(model, golden["x_nchw"]), golden["logits"], atol=TOL)


# -- Parity: fb.resnet.torch -----------------------------------------------------------------


def test_torch7_parity():
    golden = np.load(os.path.join(FIXTURES, "fb_preresnet_tiny.npz"))
    model = _tiny(
        "bottleneck", (2, 2, 1, 1), 0.125, weights=os.path.join(FIXTURES, "fb_preresnet_tiny.t7")
    )
    x = golden["x_nchw"].transpose(0, 2, 3, 1)
    np.testing.assert_allclose(_logits(model, x), golden["logits"], atol=TOL, rtol=1e-5)


def test_torch7_legacy_parity():
    # The structure of the published resnet-200.t7 (preresnet.lua before PR #42), read from
    # a local file no record names: the converter detects it and the builder follows.
    golden = np.load(os.path.join(FIXTURES, "fb_preresnet_legacy_tiny.npz"))
    path = os.path.join(FIXTURES, "fb_preresnet_legacy_tiny.t7")
    model = _tiny("bottleneck", (2, 2, 1, 1), 0.125, weights=path)
    names = {layer.name for layer in model.layers}
    assert {"conv2_block1_preact_bn", "conv2_block1_0_bn", "conv5_block1_0_bn"} <= names
    x = golden["x_nchw"].transpose(0, 2, 3, 1)
    np.testing.assert_allclose(_logits(model, x), golden["logits"], atol=TOL, rtol=1e-5)
    assert torch7.preact_scope(convert.read_tensors(path)) == "branch"
    with pytest.raises(ValueError, match=r"layout='fb' contradicts.*preact_scope='shared'"):
        _tiny("bottleneck", (2, 2, 1, 1), 0.125, weights=path, layout="fb")


def test_torch7_detects_the_current_structure():
    path = os.path.join(FIXTURES, "fb_preresnet_tiny.t7")
    assert torch7.preact_scope(convert.read_tensors(path)) == "shared"
    with pytest.raises(ValueError, match=r"layout='fb_legacy' contradicts.*preact_scope='branch'"):
        _tiny("bottleneck", (2, 2, 1, 1), 0.125, weights=path, layout="fb_legacy")


def test_fb_record_has_the_published_structure():
    record = kp_weights.get_record("imagenet:fb_torch")
    assert record.layout == keras_preact.Layout.get("fb_legacy")
    assert record.layout.preact_scope == "branch"


def test_torch7_file_of_the_other_structure_than_its_record_raises(tmp_path):
    # A file claimed by a record (by name) but with the other unit structure: clear error.
    record = dataclasses.replace(
        kp_weights.get_record("imagenet:fb_torch"), file_name="fb_preresnet_tiny.t7", classes=10
    )
    model = _tiny("bottleneck", (2, 2, 1, 1), 0.125, layout=record.layout)
    path = os.path.join(FIXTURES, "fb_preresnet_tiny.t7")
    with pytest.raises(ValueError, match=r"has the preact_scope='shared' structure"):
        kp_weights.load(model, kp_weights.ResolvedWeights(record, path=path))


def _t7_unit(shortcut):
    conv = functools.partial(
        torch7_reference.T7Module, "cudnn.SpatialConvolution"
    )  # fields filled per call below

    def c(n_in, n_out, k):
        w = np.ones((n_out, n_in, k, k), np.float32)
        return conv({"nInputPlane": n_in, "nOutputPlane": n_out, "kW": k, "kH": k, "dW": 1,
                     "dH": 1, "weight": w})  # fmt: skip

    def bn(n):
        one = np.ones(n, np.float32)
        return torch7_reference.T7Module("nn.SpatialBatchNormalization", {
            "weight": one, "bias": one, "running_mean": one, "running_var": one, "eps": 1e-5})  # fmt: skip

    seq = lambda *m, kind="nn.Sequential": torch7_reference.T7Module(kind, {"modules": list(m)})  # noqa: E731
    relu = torch7_reference.T7Module("cudnn.ReLU", {})

    def unit(n_in, preact, conv_bn, outer=False):
        branch = [bn(n_in), relu] if preact else []
        branch = seq(*branch, c(n_in, 8, 1), bn(8), relu, c(8, 8, 3), bn(8), relu, c(8, 32, 1))
        sc = seq(c(n_in, 32, 1), bn(32)) if conv_bn else seq(c(n_in, 32, 1))
        outer = [bn(n_in), relu] if outer else []  # "both_preact"
        return seq(*outer, seq(branch, sc, kind="nn.ConcatTable"),
                   torch7_reference.T7Module("nn.CAddTable", {}))  # fmt: skip

    units = {
        # preresnet.lua's first version: no pre-activation in the first unit, conv-BN shortcut
        "first_conv_bn": [unit(64, False, True)],
        "branch_bare": [unit(64, True, False)],  # raw input into a bare 1x1: not expressible
        "shared": [unit(64, False, False)],
        "mixed": [unit(64, True, True), unit(32, False, False, outer=True)],  # branch, shared
    }[shortcut]
    return seq(c(3, 64, 7), bn(64), relu, seq(*units))


@pytest.mark.parametrize(
    "structure, match",
    [
        ("first_conv_bn", r"conv2_block1: shortcut \['SpatialConvolution', "
         r"'SpatialBatchNormalization'\] on the un-activated input.*preact_scope='branch'"),
        ("branch_bare", r"conv2_block1: shortcut \['SpatialConvolution'\] on the un-activated "
         r"input, with the branch pre-activating itself"),
        ("mixed", r"conv2_block2 has the preact_scope='shared' structure but conv2_block1 has "
         r"preact_scope='branch'"),
    ],
)  # fmt: skip
def test_torch7_refuses_structures_no_option_expresses(tmp_path, structure, match):
    path = str(tmp_path / "odd.t7")
    torch7_reference.write(path, _t7_unit(structure))
    with pytest.raises(ValueError, match=match):
        convert.read_tensors(path)


def test_torch7_reads_a_bare_projection_on_the_stem_activation(tmp_path):
    path = str(tmp_path / "ok.t7")
    torch7_reference.write(path, _t7_unit("shared"))
    assert set(convert.read_tensors(path)) >= {"conv1_conv", "conv1_bn", "conv2_block1_0_conv"}


# -- Bad files ---------------------------------------------------------------------------------


def _timm_state():
    from safetensors.numpy import load_file

    return load_file(os.path.join(FIXTURES, "timm_basic.safetensors"))


def test_missing_tensor_is_named(tmp_path):
    from safetensors.numpy import save_file

    state = _timm_state()
    del state["stages.1.blocks.0.norm2.running_var"]
    path = str(tmp_path / "cut.safetensors")
    save_file(state, path)
    model_kwargs = dict(block="basic", stage_blocks=(2, 1, 1, 1), width_multiplier=0.125)
    with pytest.raises(ValueError, match=r"missing tensor conv3_block1_1_bn/moving_variance"):
        _tiny(**model_kwargs, weights=path)


def test_misshaped_tensor_is_named_and_nothing_is_set(tmp_path):
    from safetensors.numpy import save_file

    state = _timm_state()
    state["head.fc.weight"] = state["head.fc.weight"][:7]
    path = str(tmp_path / "bad.safetensors")
    save_file(state, path)
    with pytest.raises(ValueError, match=r"predictions/kernel has shape \(64, 7\)"):
        _tiny("basic", (2, 1, 1, 1), 0.125, weights=path)


def test_tensors_of_another_depth_raise():
    path = os.path.join(FIXTURES, "timm_basic.safetensors")
    with pytest.raises(ValueError, match=r"does not have, first 'conv2_block2_1_bn'"):
        _tiny("basic", (1, 1, 1, 1), 0.125, weights=path)


def test_assign_sets_nothing_on_error():
    model = _tiny("basic", (2, 1, 1, 1), 0.125, layout="timm")
    before = [keras.ops.convert_to_numpy(w) for w in model.weights]
    tensors = convert.read_tensors(os.path.join(FIXTURES, "timm_basic.safetensors"))
    del tensors["post_bn"]
    with pytest.raises(ValueError, match=r"no tensors for layer 'post_bn'"):
        kp_weights.assign(model, tensors)
    for b, w in zip(before, model.weights):
        np.testing.assert_array_equal(b, keras.ops.convert_to_numpy(w))


def test_truncated_torch7_file_raises(tmp_path):
    src = os.path.join(FIXTURES, "fb_preresnet_tiny.t7")
    path = str(tmp_path / "cut.t7")
    with open(src, "rb") as f, open(path, "wb") as g:
        g.write(f.read()[: os.path.getsize(src) // 2])
    with pytest.raises(ValueError, match=r"cut.t7"):
        _tiny("bottleneck", (2, 2, 1, 1), 0.125, weights=path)


# -- Downloads (a local HTTP server, never the internet) -------------------------------------


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _served_record(monkeypatch, tmp_path, server, file_hash=None):
    root, base = server
    shutil.copy(os.path.join(FIXTURES, "timm_basic.safetensors"), root / "m.safetensors")
    record = kp_weights.WeightsRecord(
        model="PreActResNet12", tag="served", dataset="test", classes=10,
        input_shape=(64, 64, 3), layout=keras_preact.Layout.get("timm"), format="timm_safetensors",
        url=f"{base}/m.safetensors", file_name="served.safetensors", file_hash=file_hash,
        hash_algorithm="md5" if file_hash else None,
    )  # fmt: skip
    monkeypatch.setattr(kp_weights, "RECORDS", [*kp_weights.RECORDS, record])
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))
    return record, tmp_path / "keras_home" / "models" / "served.safetensors"


def test_download_convert_and_cache(monkeypatch, tmp_path, server):
    md5 = hashlib.md5(open(os.path.join(FIXTURES, "timm_basic.safetensors"), "rb").read())
    _, cached = _served_record(monkeypatch, tmp_path, server, md5.hexdigest())
    golden = np.load(os.path.join(FIXTURES, "timm_basic.npz"))
    kwargs = dict(family="imagenet", block="basic", stage_blocks=(2, 1, 1, 1),
                  width_multiplier=0.125, classifier_activation=None,
                  kernel_initializer="zeros")  # fmt: skip
    model = keras_preact.PreActResNet(weights="test:served", **kwargs)
    assert model.input_shape == (None, 64, 64, 3)  # from the record
    assert cached.exists() and os.path.exists(f"{cached}.keras_preact.h5")
    x = golden["x_nchw"].transpose(0, 2, 3, 1)
    np.testing.assert_allclose(_logits(model, x), golden["logits"], atol=TOL, rtol=0)
    os.remove(server[0] / "m.safetensors")  # the second build reads the cache only
    keras_preact.PreActResNet(weights="test:served", **kwargs)


def test_hash_mismatch_deletes_and_names_both_hashes(monkeypatch, tmp_path, server):
    wrong = "0" * 32
    _, cached = _served_record(monkeypatch, tmp_path, server, wrong)
    actual = hashlib.md5(open(os.path.join(FIXTURES, "timm_basic.safetensors"), "rb").read())
    with pytest.raises(ValueError, match=rf"expected md5 {wrong}, got {actual.hexdigest()}"):
        keras_preact.PreActResNet(
            family="imagenet", block="basic", stage_blocks=(2, 1, 1, 1), width_multiplier=0.125,
            weights="test:served",
        )  # fmt: skip
    assert not cached.exists()


class _Throttled(http.server.BaseHTTPRequestHandler):
    """Serves one file slowly (`chunk` bytes every `delay` s), announcing its full size; with
    `truncate`, closes the connection after that many bytes. Counts the requests."""

    data, chunk, delay, truncate = b"", 1 << 16, 0.0, None

    def do_GET(self):
        self.server.gets.append(self.path)
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.data)))
        self.end_headers()
        body = self.data if self.truncate is None else self.data[: self.truncate]
        for i in range(0, len(body), self.chunk):
            self.wfile.write(body[i : i + self.chunk])
            self.wfile.flush()
            time.sleep(self.delay)

    def log_message(self, *args):
        pass


@pytest.fixture
def throttled():
    """`start(**attributes) -> (url, server)` for a `_Throttled` server on 127.0.0.1."""
    servers = []

    def start(**attributes):
        handler = type("Handler", (_Throttled,), attributes)
        httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        httpd.gets = []
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        servers.append(httpd)
        return f"http://127.0.0.1:{httpd.server_address[1]}/m.safetensors", httpd

    yield start
    for httpd in servers:
        httpd.shutdown()
        httpd.server_close()


SAFETENSORS = os.path.join(FIXTURES, "timm_basic.safetensors")
FETCH = """
import json, sys, keras_preact
from keras_preact import weights as w
record = w.WeightsRecord(model="PreActResNet12", tag="t", dataset="test", classes=10,
    input_shape=None, layout=None, format="timm_safetensors", url={url!r},
    file_name="served.safetensors", file_hash={file_hash!r}, hash_algorithm={algorithm!r})
print("fetching", flush=True)
path = w.fetch(record)
print(json.dumps([path, w.file_digest(path)]))
"""


def _fetch_process(url, home, file_hash=None):
    env = dict(os.environ, KERAS_HOME=str(home), KERAS_BACKEND=keras.backend.backend())
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    code = FETCH.format(url=url, file_hash=file_hash, algorithm="md5" if file_hash else None)
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip


@pytest.mark.backend_independent
def test_concurrent_downloads_share_one(tmp_path, throttled):
    data = open(SAFETENSORS, "rb").read()
    url, httpd = throttled(data=data, chunk=1 << 15, delay=0.05)  # about 0.6 s
    md5 = hashlib.md5(data).hexdigest()
    first = _fetch_process(url, tmp_path, md5)
    time.sleep(0.3)
    second = _fetch_process(url, tmp_path, md5)
    results = [p.communicate(timeout=120) for p in (first, second)]
    for proc, (_, err) in zip((first, second), results):
        assert proc.returncode == 0, err[-2000:]
    paths = [json.loads(out.strip().splitlines()[-1]) for out, _ in results]
    assert paths[0] == paths[1] and paths[0][1] == hashlib.sha256(data).hexdigest()
    assert len(httpd.gets) == 1  # the second process waited and used the first's file
    # The last holder of the lock removes the lock file.
    assert sorted(os.listdir(tmp_path / "models")) == [
        "served.safetensors",
        "served.safetensors.sha256",
    ]


@pytest.mark.backend_independent
def test_a_download_killed_halfway_leaves_nothing_that_breaks_a_load(tmp_path, throttled):
    data = open(SAFETENSORS, "rb").read()
    url, httpd = throttled(data=data, chunk=1 << 13, delay=0.05)  # about 2.3 s
    proc = _fetch_process(url, tmp_path)
    models = tmp_path / "models"
    deadline = time.time() + 60
    while not any(".part" in n for n in (os.listdir(models) if models.exists() else [])):
        assert time.time() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (models / "served.safetensors").exists()  # only a .part file is left
    out, err = _fetch_process(url, tmp_path).communicate(timeout=120)
    assert json.loads(out.strip().splitlines()[-1])[1] == hashlib.sha256(data).hexdigest(), err
    assert not [n for n in os.listdir(models) if ".part" in n]
    assert len(httpd.gets) == 2


def test_a_partial_or_altered_cached_file_is_named_removed_and_fetched_again(
    monkeypatch, tmp_path, server, capsys
):
    record, cached = _served_record(monkeypatch, tmp_path, server)  # no published hash
    data = open(SAFETENSORS, "rb").read()
    cached.parent.mkdir(parents=True)
    cached.write_bytes(data[: len(data) // 2])  # left by a download killed before the fix
    path = kp_weights.fetch(record)
    assert open(path, "rb").read() == data
    assert f"Removing the cached weights file {cached}: not a complete" in capsys.readouterr().out
    sha = open(f"{cached}.sha256").read().split()[0]
    assert sha == hashlib.sha256(data).hexdigest()  # recorded at the download
    altered = bytearray(data)
    altered[-1] ^= 0xFF  # complete, but not the file that was downloaded
    cached.write_bytes(bytes(altered))
    assert open(kp_weights.fetch(record), "rb").read() == data
    assert f"sha256 {hashlib.sha256(bytes(altered)).hexdigest()}, but it was {sha}" in (
        capsys.readouterr().out
    )


def test_a_download_cut_short_is_not_cached(tmp_path, throttled, monkeypatch):
    data = open(SAFETENSORS, "rb").read()
    url, _ = throttled(data=data, truncate=len(data) // 3)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    monkeypatch.setenv("KERAS_PREACT_DOWNLOAD_BACKOFF", "0.01")  # a cut is retried
    record = kp_weights.WeightsRecord(
        model="PreActResNet12", tag="t", dataset="test", classes=10, input_shape=None,
        layout=None, format="timm_safetensors", url=url, file_name="served.safetensors",
    )  # fmt: skip
    with pytest.raises(OSError, match=r"Download of .*m.safetensors failed.*Nothing was cached"):
        kp_weights.fetch(record)
    assert os.listdir(tmp_path / "models") == []  # no .part, and the lock file is removed


# -- Preprocessing and labels ------------------------------------------------------------------


def test_class_index_is_keras_file():
    path = os.path.join(os.path.dirname(keras_preact.__file__), "imagenet_class_index.json")
    assert hashlib.md5(open(path, "rb").read()).hexdigest() == "c2c37ea517e94d9795004a39431a14cb"
    assert len(class_index()) == 1000 and class_index()[0] == ("n01440764", "tench")


def test_decode_predictions():
    preds = np.zeros((2, 1000), np.float32)
    preds[0, [1, 2]] = [0.9, 0.1]
    preds[1, 999] = 1.0
    decoded = decode_predictions(preds, top=2)
    assert decoded[0] == [("n01443537", "goldfish", pytest.approx(0.9)),
                          ("n01484850", "great_white_shark", pytest.approx(0.1))]  # fmt: skip
    assert decoded[1][0][:2] == ("n15075141", "toilet_tissue")
    with pytest.raises(ValueError, match=r"\(N, 1000\)"):
        decode_predictions(np.zeros((1, 10)))
    for top in (0, -1, 1001, 2.0, True):
        with pytest.raises(ValueError, match=rf"top={top!r}: expected an int in \[1, 1000\]"):
            decode_predictions(preds, top=top)


def test_preprocess_input_follows_each_record():
    x = np.array([[[[0.0, 127.5, 255.0]]]])
    np.testing.assert_allclose(
        preprocess_input(x, weights="imagenet:timm_a1h_in1k"), [[[[-1, 0, 1]]]]
    )
    np.testing.assert_allclose(
        preprocess_input(x, weights=kp_weights.get_record("imagenet", 152)), [[[[-1, 0, 1]]]]
    )
    fb = preprocess_input(np.full((1, 1, 1, 3), 255.0), weights="imagenet:fb_torch")
    np.testing.assert_allclose(fb[0, 0, 0], (1 - np.array([0.485, 0.456, 0.406])) / [0.229, 0.224, 0.225], rtol=1e-6)  # fmt: skip
    t = preprocess_input(keras.ops.ones((1, 2, 2, 1)) * 255.0, weights="fashion_mnist")
    np.testing.assert_allclose(keras.ops.convert_to_numpy(t), (1 - 0.2860406) / 0.35302424, rtol=1e-6)  # fmt: skip
    with pytest.raises(ValueError, match=r"Unknown preprocessing"):
        preprocess_input(x, weights="caffe")


# -- Our Fashion-MNIST weights -----------------------------------------------------------------

FASHION_DIR = "/usr/share/datasets/fashion-mnist"


FASHION_RECORDS = [r.name for r in kp_weights.list_records(dataset="fashion_mnist")]


def _fashion_mnist_test_set():
    if not os.path.isdir(FASHION_DIR):
        pytest.skip(f"Fashion-MNIST not installed at {FASHION_DIR} (Debian dataset-fashion-mnist)")
    from keras_preact.data import idx

    return idx.load_fashion_mnist(FASHION_DIR)[1]


def _fashion_mnist_top1(name, x, y):
    record = kp_weights.get_record(name, depth=20)
    path = os.path.join(os.path.dirname(kp_weights.__file__), record.shipped)
    assert os.path.isfile(path), f"the shipped weights file is missing: {path}"
    model = keras_preact.PreActResNet20(weights=name, input_shape=(28, 28, 1), classes=10)
    assert model.weights_record == name
    x = preprocess_input(x, weights=record, data_format="channels_last")
    pred = np.argmax(model.predict(x, batch_size=500, verbose=0), axis=-1)
    return record, 100.0 * float(np.mean(pred == y))


@pytest.mark.parametrize("name", FASHION_RECORDS)
def test_fashion_mnist_weights_classify_real_test_images(name):
    x_test, y_test = _fashion_mnist_test_set()
    pick = np.random.default_rng(0).choice(len(x_test), 1000, replace=False)
    record, accuracy = _fashion_mnist_top1(name, x_test[pick], y_test[pick])
    # The record's accuracy is on all 10,000 images; 1,000 of them vary by ~1 point.
    assert accuracy >= record.top1 - 3, accuracy


def test_best_fashion_mnist_record_reproduces_its_accuracy():
    """`weights="fashion_mnist"` is the best record, and its top-1 on all 10,000 test images
    is the documented one (to 0.1 point: backends may round a few borderline images apart)."""
    best = kp_weights.get_record("fashion_mnist", depth=20)
    assert best.top1 == max(kp_weights.get_record(n).top1 for n in FASHION_RECORDS)
    assert best.top1 >= 94.5
    record, accuracy = _fashion_mnist_top1(best.name, *_fashion_mnist_test_set())
    assert abs(accuracy - record.top1) <= 0.1, (accuracy, record.top1)


# -- Preprocessing belongs to the weights ---------------------------------------------------


def test_a_bare_dataset_name_whose_records_disagree_raises():
    x = np.full((1, 1, 1, 3), 200.0)
    with pytest.raises(ValueError, match=r"'imagenet' names records with different.*"
                       r"PreActResNet200 imagenet:fb_torch: imagenet_torch.*model="):  # fmt: skip
        preprocess_input(x, weights="imagenet")
    # With the builder name it resolves the record the builder resolves.
    r200 = preprocess_input(x, weights="imagenet", model="PreActResNet200")
    np.testing.assert_allclose(r200[0, 0, 0], (200 / 255 - np.array([0.485, 0.456, 0.406]))
                               / [0.229, 0.224, 0.225], rtol=1e-6)  # fmt: skip
    assert r200.min() > 1.3  # not inception's 0.57
    np.testing.assert_allclose(preprocess_input(x, weights="imagenet", model="PreActResNet50"),
                               200 / 127.5 - 1, rtol=1e-6)  # fmt: skip
    with pytest.raises(ValueError, match=r"model='ResNet50'"):
        preprocess_input(x, weights="imagenet", model="ResNet50")
    with pytest.raises(ValueError, match=r"data_format='NHWC'"):
        preprocess_input(x, weights="inception", data_format="NHWC")


def test_the_model_remembers_its_record_and_includes_its_preprocessing(tmp_path):
    model = keras_preact.PreActResNet20(
        weights="fashion_mnist", input_shape=(28, 28, 1), include_preprocessing=True
    )
    assert model.weights_record == "fashion_mnist:e42"
    assert model.layers[1].name == "preprocessing"
    plain = keras_preact.PreActResNet20(weights="fashion_mnist", input_shape=(28, 28, 1))
    pixels = np.random.default_rng(0).integers(0, 256, (3, 28, 28, 1)).astype("uint8")
    expected = plain.predict(preprocess_input(pixels, model=plain), verbose=0)
    np.testing.assert_allclose(model.predict(pixels, verbose=0), expected, atol=1e-5)
    # It survives .keras save/load and a config round trip.
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert loaded.weights_record == "fashion_mnist:e42"
    np.testing.assert_allclose(loaded.predict(pixels, verbose=0), expected, atol=1e-5)
    assert model.__class__.from_config(model.get_config()).weights_record == "fashion_mnist:e42"
    assert keras_preact.PreActResNet20(input_shape=(28, 28, 1)).weights_record is None
    with pytest.raises(ValueError, match=r"built without a weights record"):
        preprocess_input(pixels, model=keras_preact.PreActResNet20(input_shape=(28, 28, 1)))


def test_include_preprocessing_with_data_statistics_or_a_contradiction():
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    model = _tiny("basic", (1, 1, 1, 1), 0.125, include_preprocessing=True,
                  preprocessing=(mean, std))  # fmt: skip
    norm = model.get_layer("preprocessing")
    x = np.full((1, 64, 64, 3), 255, "uint8")
    np.testing.assert_allclose(to_numpy(norm(x))[0, 0, 0], (1 - np.array(mean)) / std, rtol=1e-5)
    with pytest.raises(ValueError, match=r"preprocessing='inception' contradicts.*fashion_mnist"):
        keras_preact.PreActResNet20(weights="fashion_mnist", input_shape=(28, 28, 1),
                                    include_preprocessing=True, preprocessing="inception")  # fmt: skip


# -- Files a user made load back; bad files say which and what to do -----------------------


def _export(model, path):
    """What tools/export_weights.py writes: this package's by-layer-name file."""
    convert.write_tensors(path, {
        layer.name: {w.name: to_numpy(w) for w in layer.weights}
        for layer in model.layers if layer.weights
    })  # fmt: skip


def test_a_file_exported_from_a_non_default_unit_and_shortcut_loads_back(tmp_path):
    kwargs = dict(depth=14, block="basic", input_shape=(16, 16, 3), classes=4,
                  unit="relu_before_add", shortcut=keras_preact.shortcuts.exclusive_gating(-2.0))  # fmt: skip
    source = keras_preact.PreActResNet(**kwargs)
    path = str(tmp_path / "ablation.h5")
    _export(source, path)
    loaded = keras_preact.PreActResNet(weights=path, **kwargs)
    x = np.random.default_rng(0).standard_normal((2, 16, 16, 3)).astype("float32")
    np.testing.assert_array_equal(to_numpy(loaded(x)), to_numpy(source(x)))
    assert loaded.weights_record is None


def test_a_shortcut_equal_to_the_records_is_accepted():
    identity = keras_preact.shortcuts.identity()
    assert identity == keras_preact.shortcuts.get("identity")
    assert keras_preact.shortcuts.exclusive_gating(-6) == keras_preact.shortcuts.get(
        "exclusive_gating"
    )
    model = keras_preact.PreActResNet20(
        weights="fashion_mnist", input_shape=(28, 28, 1), shortcut=identity
    )
    assert model.weights_record == "fashion_mnist:e42"
    with pytest.raises(ValueError, match=r"trained with shortcut='identity'; got shortcut="):
        keras_preact.PreActResNet20(weights="fashion_mnist", input_shape=(28, 28, 1),
                                    shortcut=keras_preact.shortcuts.dropout())  # fmt: skip


def test_a_missing_file_says_file_not_found(tmp_path):
    for missing in ("no_such_file.weights.h5", str(tmp_path / "nope"), tmp_path / "x.safetensors"):
        with pytest.raises(FileNotFoundError, match=r"file not found"):
            _tiny("basic", (1, 1, 1, 1), 0.125, weights=missing)
    with pytest.raises(ValueError, match=r"Unknown weights='imagenet:nope'"):
        _tiny("basic", (1, 1, 1, 1), 0.125, weights="imagenet:nope")


@pytest.mark.parametrize("kind", ["truncated_h5", "garbage_h5", "truncated_safetensors",
                                  "garbage_safetensors"])  # fmt: skip
def test_a_broken_weights_file_is_named_with_what_to_do(tmp_path, kind):
    if kind.endswith("h5"):
        model = _tiny("basic", (2, 1, 1, 1), 0.125)
        good = str(tmp_path / "good.h5")
        _export(model, good)
    else:
        good = os.path.join(FIXTURES, "timm_basic.safetensors")
    data = open(good, "rb").read()
    data = data[: len(data) // 2] if kind.startswith("truncated") else data[:8] + b"\0" * 4096
    path = str(tmp_path / f"broken{os.path.splitext(good)[1]}")
    with open(path, "wb") as f:
        f.write(data)
    with pytest.raises(
        ValueError, match=rf"{path}.*(truncated or corrupt).*Re-export or re-download"
    ):
        _tiny("basic", (2, 1, 1, 1), 0.125, weights=path)


def test_a_keras_weights_file_of_another_depth_changes_no_variable(tmp_path):
    deeper = keras_preact.PreActResNet(depth=14, block="basic", input_shape=(16, 16, 3))
    path = str(tmp_path / "deeper.weights.h5")
    deeper.save_weights(path)
    model = keras_preact.PreActResNet(depth=8, block="basic", input_shape=(16, 16, 3))
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), loss="mse")
    model.optimizer.build(model.trainable_variables)
    before = [to_numpy(v).copy() for v in [*model.variables, *model.optimizer.variables]]
    with pytest.raises(ValueError, match=r"deeper.weights.h5 into model.*No variable was changed"):
        kp_weights.load_weights_file(model, path)
    after = [to_numpy(v) for v in [*model.variables, *model.optimizer.variables]]
    assert all(np.array_equal(a, b) for a, b in zip(before, after))
    # The builder's route (weights=<a Keras 3 file>) is the same loader.
    with pytest.raises(ValueError, match=r"No variable was changed"):
        keras_preact.PreActResNet(depth=8, block="basic", input_shape=(16, 16, 3), weights=path)


def to_numpy(x):
    return keras.ops.convert_to_numpy(x)
