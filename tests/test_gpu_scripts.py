"""The GPU experiments' smoke modes: each script end to end on CPU, with TensorFlow hidden.

`benchmarks/gpu_throughput.py`, `training/paper_tables.py` and
`training/fashion_mnist_recipe.py` run on a GPU machine that has JAX but no TensorFlow. Here
each runs `--smoke` in its own process under KERAS_BACKEND=jax with TensorFlow made
unimportable, and the tests check the files it writes (CSV columns, PNG images, JSON
fields), not only its exit code. The three processes run at the same time (two cores);
they launch JAX themselves, so they run once, in the suite's KERAS_BACKEND=jax pass.
"""

import csv
import importlib.util
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from keras_preact.data import idx

pytestmark = [
    pytest.mark.skipif(
        importlib.util.find_spec("jax") is None, reason="the GPU scripts run on JAX"
    ),
    # The scripts launch JAX themselves, whatever the suite's backend: run them once, in the
    # suite's JAX pass, not three times.
    pytest.mark.skipif(
        os.environ.get("KERAS_BACKEND", "jax") != "jax",
        reason="the GPU scripts' smoke runs belong to the KERAS_BACKEND=jax pass",
    ),
]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

#: Hides TensorFlow as if it were not installed: `import tensorflow` fails and
#: `importlib.util.find_spec` finds nothing. (A `sys.modules["tensorflow"] = None` entry
#: would not do: Keras tests `"tensorflow" in sys.modules` and then needs the module.)
NO_TENSORFLOW = """
import importlib.machinery as _machinery

_find_spec = _machinery.PathFinder.find_spec.__func__


def _hide_tensorflow(cls, name, path=None, target=None):
    if name.split(".")[0] in ("tensorflow", "tensorflow_datasets", "tf_keras"):
        return None
    return _find_spec(cls, name, path, target)


_machinery.PathFinder.find_spec = classmethod(_hide_tensorflow)
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Runs the three smoke modes concurrently; returns {name: (folder, output, seconds)}."""
    root = tmp_path_factory.mktemp("gpu_scripts")
    hide = root / "no_tensorflow"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(NO_TENSORFLOW)
    data = root / "fashion_mnist"
    data.mkdir()
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 128), ("t10k", 48)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        idx.write_idx(data / f"{prefix}-images-idx3-ubyte.gz", images)
        idx.write_idx(data / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, n, np.uint8))
    env = {
        **os.environ,
        "KERAS_BACKEND": "jax",
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": os.pathsep.join([str(hide), REPO, os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
    }
    commands = {
        "throughput": ["benchmarks/gpu_throughput.py", "--smoke", f"--out={root / 'tp'}"],
        "tables": [
            "training/paper_tables.py",
            "--smoke",
            "--part=all",
            "--procs=2",
            f"--data_dir={data}",
            f"--model_dir={root / 'tables'}",
            f"--out={root / 'tables_out'}",
        ],
        "recipe": [
            "training/fashion_mnist_recipe.py",
            "--smoke",
            f"--data_dir={data}",
            f"--model_dir={root / 'recipe'}",
            f"--out={root / 'recipe_out'}",
        ],
    }
    start = time.time()
    procs = {
        name: subprocess.Popen(
            [sys.executable, *cmd],
            cwd=REPO,
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for name, cmd in commands.items()
    }
    out = {}
    for name, proc in procs.items():
        text, _ = proc.communicate(timeout=600)
        out[name] = (root, text, proc.returncode, time.time() - start)
    return out


def _check_ran(run):
    root, text, code, _ = run
    assert code == 0, text[-3000:]
    return root, text


def _png(path):
    with open(path, "rb") as f:
        head = f.read(8)
    assert head == PNG_MAGIC and os.path.getsize(path) > 5000, path


def test_throughput_smoke(runs):
    root, text = _check_ran(runs["throughput"])
    with open(root / "tp" / "gpu_throughput.json") as f:
        doc = json.load(f)
    assert doc["smoke"] is True and doc["cases"] == [r["case"] for r in doc["results"]]
    ok = {r["case"]: r for r in doc["results"] if r["status"] == "ok"}
    assert {"preact50:jit", "preact50_keras:fit:workers=1"} <= set(ok), doc["results"]
    jit, fit = ok["preact50:jit"], ok["preact50_keras:fit:workers=1"]
    for r in (jit, fit):
        assert r["images_per_s"] > 0 and r["first_step_s"] > 0 and r["params"] > 0
        assert r["flops_per_image"] > 0
    for key in ("trace_lower_s", "compile_s", "build_s"):
        assert jit[key] >= 0
    assert fit["host_pipeline_images_per_s_per_thread"] > 0
    timm = next(r for r in doc["results"] if r["model"] == "timm_resnetv2_50")
    assert timm["status"] in ("ok", "skipped"), timm
    assert sorted(os.listdir(root / "tp")) == ["gpu_throughput.json", "gpu_throughput.md"]
    table = (root / "tp" / "gpu_throughput.md").read_text()
    assert "| case | images/s | first step (s) | peak mem (GiB) |" in table
    assert "| preact50:jit |" in table


def test_paper_tables_smoke(runs):
    root, text = _check_ran(runs["tables"])
    assert "COMPLETE" in text
    out = root / "tables_out"
    with open(out / "paper_tables.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    from training import paper_tables

    assert list(rows[0]) == paper_tables.RESULT_FIELDS
    assert {r["variant"] for r in rows} == set(paper_tables.SMOKE_VARIANTS)
    for r in rows:
        assert r["status"] == "done" and int(r["epochs"]) == 2 and r["seed"] == "0"
        assert 0.0 <= float(r["final_test_error"]) <= 1.0
    with open(out / "paper_tables_curves.csv", newline="") as f:
        curves = list(csv.DictReader(f))
    assert list(curves[0]) == paper_tables.CURVE_FIELDS
    tests = [c for c in curves if c["kind"] == "epoch"]
    assert len(tests) == 2 * len(rows) and all(c["test_error"] for c in tests)
    assert any(c["kind"] == "train" and float(c["train_loss"]) > 0 for c in curves)
    for name in ("paper_tables_table1.png", "paper_tables_table2.png"):
        _png(out / name)
    md = (out / "paper_tables.md").read_text()
    assert "| dropout 0.5 | fail |" in md and "| full pre-activation (4e) | 6.37 |" in md
    assert len(os.listdir(out)) <= 8  # what one call of the GPU machine can bring back
    status = json.loads((out / "status.json").read_text())
    assert status["complete"] is True and status["results"] == len(rows)


def test_recipe_smoke(runs):
    root, text = _check_ran(runs["recipe"])
    out = root / "recipe_out"
    summary = json.loads((out / "recipe.json").read_text())
    for key in ("float32", "float16"):
        assert 0.0 <= summary[key]["top1"] <= 100.0
        assert 0.0 <= summary[key]["top1_flip_tta"] <= 100.0
    export = summary["export"]
    assert export["dtype"] in ("float16", "float32") and export["file"] == "fashion_mnist_wrn.h5"
    path = out / export["file"]
    assert os.path.getsize(path) == export["bytes"] <= 16 * 2**20
    assert summary["epochs"] == 2 and summary["test_images"] == 40
    with open(out / "log.csv", newline="") as f:
        log = list(csv.DictReader(f))
    assert [r["epoch"] for r in log if r["kind"] == "epoch"] == ["1", "2"]
    _png(out / "curves.png")
    assert sorted(os.listdir(out)) == [
        "curves.png",
        "fashion_mnist_wrn.h5",
        "log.csv",
        "recipe.json",
    ]
    # The export loads through the package and holds float16 or float32 tensors.
    import h5py

    with h5py.File(path, "r") as f:
        dtypes = set()
        f.visititems(lambda n, o: dtypes.add(str(o.dtype)) if hasattr(o, "dtype") else None)
    assert dtypes == {export["dtype"]}


def _throughput_module():
    spec = importlib.util.spec_from_file_location(
        "gpu_throughput", os.path.join(REPO, "benchmarks", "gpu_throughput.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_throughput_cases_parse_and_bad_ones_are_named():
    gt = _throughput_module()
    for case in gt.DEFAULT_CASES + gt.EXPLORE_CASES + gt.SMOKE_CASES:
        gt.parse_case(case)
    model, path, options = gt.parse_case("preact50:jit:batch=512,bn=onepass,xla=fast_compile")
    assert (model, path, options) == (
        "preact50",
        "jit",
        {"batch": 512, "bn": "onepass", "xla": "fast_compile"},
    )
    assert gt._split_cases("preact50:jit:batch=512,donate=0,resnet50v2:fit") == [
        "preact50:jit:batch=512,donate=0",
        "resnet50v2:fit",
    ]
    for bad, match in (
        ("resnet152:jit", "Unknown model 'resnet152'"),
        ("preact50:eager", "timm runs 'eager' or 'compile'"),
        ("preact50:jit:batchsize=2", "Unknown option 'batchsize'"),
        ("preact50:jit:xla=fastest", "Unknown xla='fastest'"),
        ("preact50:jit:bn=fused", "bn='fused'"),
    ):
        with pytest.raises(ValueError, match=match):
            gt.parse_case(bad)
    assert gt.peak_tflops("NVIDIA H100 80GB HBM3") == ("H100", 989.4)
    assert gt.peak_tflops("NVIDIA H100 PCIe") == ("H100 PCIe", 756.0)
    assert gt.peak_tflops("NVIDIA H200") == ("H200", 989.4)
    assert gt.peak_tflops("cpu") == (None, None)


def test_onepass_batch_statistics_match_keras():
    """The benchmark's `bn=onepass` option computes Keras' batch mean and variance."""
    import keras

    gpu_throughput = _throughput_module()

    rng = np.random.default_rng(0)
    x = (3.0 + 0.5 * rng.standard_normal((16, 6, 6, 4))).astype("float32")
    layer = keras.layers.BatchNormalization()
    layer.build(x.shape)
    layer.moving_mean.assign(np.full(4, 2.5, "float32"))
    xt = keras.ops.convert_to_tensor(x)
    before = [keras.ops.convert_to_numpy(v) for v in layer._moments(xt, None)]
    original = keras.layers.BatchNormalization._moments
    try:
        gpu_throughput._onepass_moments()
        after = [keras.ops.convert_to_numpy(v) for v in layer._moments(xt, None)]
    finally:
        keras.layers.BatchNormalization._moments = original
    np.testing.assert_allclose(after[0], x.mean((0, 1, 2)), rtol=1e-5)
    np.testing.assert_allclose(after[1], x.var((0, 1, 2)), rtol=1e-4)
    np.testing.assert_allclose(after[1], before[1], rtol=1e-4)
