"""Pretrained weights: the records table, conversion parity per upstream layout, bad input.

Parity tests build small networks of each upstream layout and compare logits with the
reference framework's, offline: keras.applications (built here from Keras' own ResNetV2
blocks), timm (golden outputs in tests/fixtures, tools/make_timm_fixture.py) and
fb.resnet.torch (a Torch7 fixture with an independent forward, tools/make_t7_fixture.py).
"""

import dataclasses
import functools
import hashlib
import http.server
import os
import shutil
import threading
from unittest import mock

import h5py
import keras
import numpy as np
import pytest
from keras.src.initializers.random_initializers import VarianceScaling

import keras_preact
from keras_preact import convert
from keras_preact import weights as kp_weights
from keras_preact.convert import torch7
from keras_preact.imagenet_utils import class_index, decode_predictions, preprocess_input

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
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
        assert set(r.layout) == set(kp_weights.LAYOUT_PAPER), r.name
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


@pytest.mark.parametrize(
    "record",
    [
        pytest.param(r, id=r.name + "-" + r.model, marks=[] if r.depth <= 20 else pytest.mark.slow)
        for r in kp_weights.RECORDS
    ],
)
def test_record_param_count_matches_the_built_model(record):
    # Builds with the record's layout but no weights: the count is what the file fills.
    with mock.patch.object(VarianceScaling, "__call__", _zeros):  # only shapes matter
        model = keras_preact.get_model(
            record.model, input_shape=record.input_shape, classes=record.classes, **record.layout
        )
    assert model.count_params() == record.num_params


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
    with pytest.raises(ValueError, match=r"stem_norm=True contradicts"):
        keras_preact.PreActResNet50(weights="imagenet:timm_a1h_in1k", stem_norm=True)
    with pytest.raises(ValueError, match=r"conv_bias"):
        keras_preact.PreActResNet152(weights="imagenet", conv_bias=())


def test_conv_bias_compares_as_a_set_of_places():
    # The builder and the weights check read `conv_bias=` through one function.
    same = ["residual_last", "stem", "projection"]  # the keras layout, in another order
    record = kp_weights.resolve(
        "imagenet:keras", depth=50, family="imagenet", layout={"conv_bias": same}
    )
    assert record.name == "imagenet:keras"
    with pytest.raises(ValueError, match=r"conv_bias='stem' contradicts"):
        kp_weights.resolve(
            "imagenet:keras", depth=50, family="imagenet", layout={"conv_bias": "stem"}
        )
    with pytest.raises(ValueError, match=r"conv_bias='bogus'; allowed places"):
        kp_weights.resolve(
            "imagenet:keras", depth=50, family="imagenet", layout={"conv_bias": "bogus"}
        )


def test_other_unit_raises():
    with pytest.raises(ValueError, match=r"unit='full_preact'"):
        keras_preact.PreActResNet200(weights="imagenet", unit="relu_preact")


def test_local_upstream_file_checks_the_layout_of_its_format():
    path = os.path.join(FIXTURES, "timm_basic.safetensors")
    with pytest.raises(ValueError, match=r"downsample_in='last_unit' contradicts"):
        _tiny("basic", (2, 1, 1, 1), 0.125, weights=path, downsample_in="last_unit")


# -- Parity: keras.applications --------------------------------------------------------


def _zeros(self, shape, dtype=None):
    return keras.ops.zeros(shape, dtype=dtype)


def _keras_reference():
    from keras.src.applications import resnet as keras_resnet

    def stack_fn(x):
        for name, filters in (("conv2", 32), ("conv3", 64), ("conv4", 128)):
            x = keras_resnet.stack_residual_blocks_v2(x, filters, 2, name=name)
        return keras_resnet.stack_residual_blocks_v2(x, 256, 2, stride1=1, name="conv5")

    # Keras' own ResNetV2 code (preact=True, use_bias=True), at half width, 2 units a stage.
    # Random initialization compiles one kernel per shape under JAX (slow); every value is
    # overwritten below, so the initializers return zeros while building.
    with mock.patch.object(VarianceScaling, "__call__", _zeros):
        ref = keras_resnet.ResNet(
            stack_fn, True, True, weights=None, input_shape=(64, 64, 3), classes=10,
            classifier_activation=None, name="keras_resnetv2_tiny",
        )  # fmt: skip
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
    downloads (`layer_names` / `weight_names`), by Keras' own legacy writer."""
    from keras.src.legacy.saving import legacy_h5_format

    ref = _keras_reference()
    path = str(tmp_path_factory.mktemp("keras") / "resnet_tiny_v2.h5")
    with h5py.File(path, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, ref)
    x = np.random.default_rng(1).uniform(-1, 1, (2, 64, 64, 3)).astype("float32")
    return path, x, _logits(ref, x), ref.count_params()


def test_keras_applications_parity(keras_h5):
    path, x, expected, n_params = keras_h5
    assert convert.detect_format(path) == "keras_h5"
    model = _tiny("bottleneck", (2, 2, 2, 2), 0.5, weights=path)
    assert model.count_params() == n_params
    np.testing.assert_allclose(_logits(model, x), expected, atol=TOL, rtol=0)


def test_keras_applications_without_top(keras_h5):
    path, x, _, _ = keras_h5
    model = keras_preact.PreActResNet(
        family="imagenet", block="bottleneck", stage_blocks=(2, 2, 2, 2), width_multiplier=0.5,
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
    with pytest.raises(ValueError, match=r"preact_scope='shared' contradicts"):
        _tiny("bottleneck", (2, 2, 1, 1), 0.125, weights=path, preact_scope="shared")


def test_torch7_detects_the_current_structure():
    path = os.path.join(FIXTURES, "fb_preresnet_tiny.t7")
    assert torch7.preact_scope(convert.read_tensors(path)) == "shared"
    with pytest.raises(ValueError, match=r"preact_scope='branch' contradicts"):
        _tiny("bottleneck", (2, 2, 1, 1), 0.125, weights=path, preact_scope="branch")


def test_fb_record_has_the_published_structure():
    record = kp_weights.get_record("imagenet:fb_torch")
    assert record.layout == kp_weights.LAYOUT_FB_LEGACY
    assert record.layout["preact_scope"] == "branch"


def test_torch7_file_of_the_other_structure_than_its_record_raises(tmp_path):
    # A file claimed by a record (by name) but with the other unit structure: clear error.
    record = dataclasses.replace(
        kp_weights.get_record("imagenet:fb_torch"), file_name="fb_preresnet_tiny.t7", classes=10
    )
    model = _tiny("bottleneck", (2, 2, 1, 1), 0.125, **record.layout)
    path = os.path.join(FIXTURES, "fb_preresnet_tiny.t7")
    with pytest.raises(ValueError, match=r"has the preact_scope='shared' structure"):
        kp_weights.load(model, path, record)


def _t7_unit(shortcut):
    conv = functools.partial(
        torch7.T7Module, "cudnn.SpatialConvolution"
    )  # fields filled per call below

    def c(n_in, n_out, k):
        w = np.ones((n_out, n_in, k, k), np.float32)
        return conv({"nInputPlane": n_in, "nOutputPlane": n_out, "kW": k, "kH": k, "dW": 1,
                     "dH": 1, "weight": w})  # fmt: skip

    def bn(n):
        one = np.ones(n, np.float32)
        return torch7.T7Module("nn.SpatialBatchNormalization", {
            "weight": one, "bias": one, "running_mean": one, "running_var": one, "eps": 1e-5})  # fmt: skip

    seq = lambda *m, kind="nn.Sequential": torch7.T7Module(kind, {"modules": list(m)})  # noqa: E731
    relu = torch7.T7Module("cudnn.ReLU", {})

    def unit(n_in, preact, conv_bn, outer=False):
        branch = [bn(n_in), relu] if preact else []
        branch = seq(*branch, c(n_in, 8, 1), bn(8), relu, c(8, 8, 3), bn(8), relu, c(8, 32, 1))
        sc = seq(c(n_in, 32, 1), bn(32)) if conv_bn else seq(c(n_in, 32, 1))
        outer = [bn(n_in), relu] if outer else []  # "both_preact"
        return seq(*outer, seq(branch, sc, kind="nn.ConcatTable"),
                   torch7.T7Module("nn.CAddTable", {}))  # fmt: skip

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
    torch7.write(path, _t7_unit(structure))
    with pytest.raises(ValueError, match=match):
        convert.read_tensors(path)


def test_torch7_reads_a_bare_projection_on_the_stem_activation(tmp_path):
    path = str(tmp_path / "ok.t7")
    torch7.write(path, _t7_unit("shared"))
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
    model = _tiny("basic", (2, 1, 1, 1), 0.125, **kp_weights.LAYOUT_TIMM)
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
    from keras.src.backend import config

    root, base = server
    shutil.copy(os.path.join(FIXTURES, "timm_basic.safetensors"), root / "m.safetensors")
    record = kp_weights.WeightsRecord(
        model="PreActResNet12", tag="served", dataset="test", classes=10,
        input_shape=(64, 64, 3), layout=kp_weights.LAYOUT_TIMM, format="timm_safetensors",
        url=f"{base}/m.safetensors", file_name="served.safetensors", file_hash=file_hash,
        hash_algorithm="md5" if file_hash else None,
    )  # fmt: skip
    monkeypatch.setattr(kp_weights, "RECORDS", [*kp_weights.RECORDS, record])
    monkeypatch.setattr(config, "_KERAS_DIR", str(tmp_path / "keras_home"))
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


def test_preprocess_input_follows_each_record():
    x = np.array([[[[0.0, 127.5, 255.0]]]])
    np.testing.assert_allclose(preprocess_input(x, "imagenet:timm_a1h_in1k"), [[[[-1, 0, 1]]]])
    np.testing.assert_allclose(
        preprocess_input(x, kp_weights.get_record("imagenet", 152)), [[[[-1, 0, 1]]]]
    )
    fb = preprocess_input(np.full((1, 1, 1, 3), 255.0), "imagenet:fb_torch")
    np.testing.assert_allclose(fb[0, 0, 0], (1 - np.array([0.485, 0.456, 0.406])) / [0.229, 0.224, 0.225], rtol=1e-6)  # fmt: skip
    t = preprocess_input(keras.ops.ones((1, 2, 2, 1)) * 255.0, "fashion_mnist")
    np.testing.assert_allclose(keras.ops.convert_to_numpy(t), (1 - 0.2860406) / 0.35302424, rtol=1e-6)  # fmt: skip
    with pytest.raises(ValueError, match=r"Unknown preprocessing"):
        preprocess_input(x, "caffe")


# -- Our Fashion-MNIST weights -----------------------------------------------------------------

FASHION_DIR = "/usr/share/datasets/fashion-mnist"


def test_fashion_mnist_weights_classify_real_test_images():
    record = kp_weights.get_record("fashion_mnist:e6", depth=20)
    path = os.path.join(os.path.dirname(kp_weights.__file__), record.shipped)
    assert os.path.isfile(path), f"the shipped weights file is missing: {path}"
    if not os.path.isdir(FASHION_DIR):
        pytest.skip(f"Fashion-MNIST not installed at {FASHION_DIR} (Debian dataset-fashion-mnist)")
    from keras_preact.data import idx

    _, (x_test, y_test) = idx.load_fashion_mnist(FASHION_DIR)
    pick = np.random.default_rng(0).choice(len(x_test), 1000, replace=False)
    model = keras_preact.PreActResNet20(
        weights="fashion_mnist", input_shape=(28, 28, 1), classes=10
    )
    x = preprocess_input(x_test[pick], record, data_format="channels_last")
    pred = np.argmax(model.predict(x, batch_size=250, verbose=0), axis=-1)
    accuracy = float(np.mean(pred == y_test[pick]))
    # The record's accuracy is on all 10,000 images; 1,000 of them vary by ~1 point.
    assert accuracy >= record.top1 / 100 - 0.03, accuracy
