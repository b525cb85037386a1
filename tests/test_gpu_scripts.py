"""The GPU experiments' smoke modes: each script end to end on CPU, with TensorFlow hidden.

`benchmarks/gpu_throughput.py`, `training/paper_tables.py` and
`training/fashion_mnist_recipe.py` run on GPU machines that may have JAX but no TensorFlow
(the two training scripts run the package's trainer with `--loop=jax --pipeline=numpy`).
Here each runs `--smoke` in its own process under KERAS_BACKEND=jax with TensorFlow made
unimportable (also in the trainer processes they start), and the tests check the files it
writes (CSV columns and rows, PNG images, JSON fields, the export), not only its exit code.
The three processes run at the same time (two cores); they launch JAX themselves, so they
run once, in the suite's KERAS_BACKEND=jax pass.
"""

import csv
import importlib.util
import json
import math
import os
import platform
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


def _script(name):
    """A script of `training/` imported by its path (the scripts are no package)."""
    spec = importlib.util.spec_from_file_location(
        name, os.path.join(REPO, "training", f"{name}.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _csv(path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def test_paper_tables_smoke(runs, capsys):
    root, text = _check_ran(runs["tables"])
    pt = _script("paper_tables")
    assert "COMPLETE" in text and "INCOMPLETE" not in text
    out, model_dir = root / "tables_out", root / "tables"
    assert sorted(os.listdir(out)) == sorted(pt.OUTPUTS)
    fields, rows = _csv(out / "paper_tables.csv")
    assert fields == pt.RESULT_FIELDS
    assert sorted(r["variant"] for r in rows) == sorted(pt.SMOKE_VARIANTS)
    for r in rows:
        variant = pt.VARIANTS[r["variant"]]
        assert (r["status"], r["epochs"], r["seed"]) == ("done", "2", "0")
        assert r["model"] == "PreActResNet20" and r["unit"] == variant.unit
        assert r["paper_cifar10_error"] == variant.paper and float(r["wall_time_s"]) > 0
        assert 0.0 <= float(r["best_test_error"]) <= float(r["final_test_error"]) <= 1.0
        assert float(r["final_train_loss"]) > 0
        # One run of the trainer, with the variant's flags and the paper's schedule in epochs.
        run = model_dir / "runs" / r["variant"] / "seed0"
        cfg = json.loads((run / "config.json").read_text())
        assert cfg["loop"] == "jax" and cfg["pipeline"] == "numpy" and cfg["unit"] == variant.unit
        assert {k: cfg[k] for k in variant.shortcut} == variant.shortcut
        assert cfg["lr_boundaries"] == [1.0, 1.5] and cfg["warmup_lr"] == 0.01
        summary = json.loads((run / "summary.json").read_text())
        assert float(r["final_test_error"]) == pytest.approx(1.0 - summary["test_top1"])
    fields, curves = _csv(out / "paper_tables_curves.csv")
    assert fields == pt.CURVE_FIELDS
    for r in rows:
        mine = [c for c in curves if c["variant"] == r["variant"]]
        assert [c["epoch"] for c in mine] == ["1", "2"]
        assert all(float(c["train_loss"]) > 0 and float(c["lr"]) > 0 for c in mine)
        assert float(mine[-1]["test_error"]) == pytest.approx(float(r["final_test_error"]))
        assert float(mine[-1]["train_loss"]) == pytest.approx(float(r["final_train_loss"]))
    for name in ("paper_tables_table1.png", "paper_tables_table2.png"):
        _png(out / name)
    md = (out / "paper_tables.md").read_text()
    assert "| dropout 0.5 | fail |" in md and "| full pre-activation (4e) | 6.37 |" in md
    # The same command again trains nothing: finished runs are recognized by summary.json.
    argv = ["--smoke", "--part=all", f"--data_dir={root / 'fashion_mnist'}"]
    assert pt.main([*argv, f"--model_dir={model_dir}"]) == 0
    assert "0 run(s) to train" in capsys.readouterr().out
    assert _csv(model_dir / "paper_tables.csv")[1] == rows


def test_paper_tables_records_stopped_diverged_and_failed_runs(tmp_path):
    """A run stopped by its budget resumes, a diverged one is final, a failed one retries."""
    pt = _script("paper_tables")
    args = pt.parse_args(
        ["--part=r110_identity,r110_conv1x1,r110_dropout_0.5", f"--model_dir={tmp_path}"]
    )
    row = (
        "epoch,epoch_time_s,loss,lr,top1,top5,val_loss,val_top1,val_top5\n"
        "0,9.0,2.0,0.01,0.2,0.6,1.9,0.3,0.7\n"
    )
    outcomes = {
        "r110_identity": (0, "Stopped by --time_budget=60 s after epoch 1/10"),
        "r110_conv1x1": (3, "Diverged: The loss became nan at batch 3 of epoch 1; stopped"),
        "r110_dropout_0.5": (1, "OSError: Could not write log.csv"),
    }
    for variant, (code, output) in outcomes.items():
        folder = tmp_path / "runs" / variant / "seed0"
        folder.mkdir(parents=True)
        (folder / "log.csv").write_text(row)
        (folder / "train.log").write_text(f"earlier attempt\n{output}\n")
        for _ in range(2):
            status = pt.record_run(str(folder), code, 30.0, len("earlier attempt\n"))
    assert status == "failed"
    record = json.loads((folder / pt.RUN_RECORD).read_text())
    assert record == {"status": "failed", "wall_time_s": 60.0, "cpus": [pt.cpu_kind()]}
    assert pt.pending(args) == [("r110_identity", 0), ("r110_dropout_0.5", 0)]
    results, curves = pt.collect(str(tmp_path))
    statuses = {v: r["status"] for (v, _), r in results.items()}
    assert statuses == {"r110_identity": "stopped", "r110_conv1x1": "diverged",
                        "r110_dropout_0.5": "failed"}  # fmt: skip
    stopped = results["r110_identity", 0]
    assert stopped["final_test_error"] == pytest.approx(0.7) and stopped["wall_time_s"] == 60.0
    assert math.isnan(results["r110_conv1x1", 0]["final_test_error"])  # diverged: none
    assert curves["r110_identity", 0][0]["epoch"] == 1
    md = pt.markdown(results)
    assert "| 1x1 conv | 12.22 | diverged |  | 0 |" in md and "| identity | 6.61 |  |  | 0 |" in md
    assert f"| failed | 60 | {pt.cpu_kind()} |" in md  # the runs table names the CPU


def test_paper_tables_names_the_cpu_kind(tmp_path):
    """A seed fixes a run only on one kind of CPU, so each run records its model and widest
    vector extension."""
    pt = _script("paper_tables")
    info = tmp_path / "cpuinfo"
    flags = "flags\t\t: fpu sse2 avx avx2 fma"
    info.write_text(f"processor\t: 0\nmodel name\t: AMD EPYC 7B13\n{flags}\n\nprocessor\t: 1\n")
    assert pt.cpu_kind(str(info)) == "AMD EPYC 7B13, AVX2"
    info.write_text(f"model name\t: Intel(R) Xeon(R) CPU @ 2.20GHz\n{flags} avx512f avx512bw\n")
    assert pt.cpu_kind(str(info)) == "Intel(R) Xeon(R) CPU @ 2.20GHz, AVX-512"
    assert pt.cpu_kind(str(tmp_path / "none")) == platform.machine()


def test_paper_tables_backend_picks_the_loop_and_the_table_gives_the_training_loss(capsys):
    """`--backend=tensorflow` trains with model.fit; Table 1 has the final training loss."""
    pt = _script("paper_tables")
    jax_cmd = pt.trainer_command(pt.parse_args(["--part=r110_identity"]), "r110_identity", 0)
    args = pt.parse_args(["--part=r110_identity", "--backend=tensorflow", "--model=PreActResNet56"])
    cmd = pt.trainer_command(args, "r110_identity", 0)
    assert "--loop=jax" in jax_cmd and "--loop=fit" in cmd and "--loop=jax" not in cmd
    assert "--model=PreActResNet56" in cmd
    with pytest.raises(SystemExit):
        pt.parse_args(["--backend=numpy"])
    assert "--backend: invalid choice: 'numpy'" in capsys.readouterr().err
    done = dict(status="done", final_test_error=0.0712, final_train_loss=0.25, seed=0,
                model="PreActResNet56")  # fmt: skip
    md = pt.markdown({("r110_identity", 0): done, ("r110_identity", 1): {**done, "seed": 1,
                      "final_test_error": 0.0732, "final_train_loss": 0.35}})  # fmt: skip
    assert "| identity | 6.61 | 7.22 (7.12, 7.32) | 0.300 | 0,1 |" in md
    third = {**done, "seed": 2, "final_test_error": 0.0722}
    md = pt.markdown({("r110_identity", 2): third, ("r110_identity", 0): done})
    assert "| identity | 6.61 | 7.17 (7.12, 7.22) | 0.250 | 2,0 |" in md  # values in seed order


def test_paper_tables_preloads_tcmalloc_for_tensorflow_trainers(monkeypatch, capsys):
    """`--allocator=auto`: the TensorFlow trainers get tcmalloc (or jemalloc) when installed;
    JAX's and an explicit `system` keep the system's malloc; a missing one is refused."""
    import ctypes.util

    pt = _script("paper_tables")
    installed = {"tcmalloc_minimal": "libtcmalloc_minimal.so.4"}
    monkeypatch.setattr(ctypes.util, "find_library", installed.get)
    env = lambda *flags: pt.trainer_env(pt.parse_args(["--part=1", *flags]), {"A": "1"})  # noqa: E731
    assert env("--backend=tensorflow")["LD_PRELOAD"] == "libtcmalloc_minimal.so.4"
    assert env("--backend=tensorflow")["KERAS_BACKEND"] == "tensorflow"
    assert "LD_PRELOAD" not in env("--backend=jax")
    assert "LD_PRELOAD" not in env("--backend=tensorflow", "--allocator=system")
    assert env("--backend=jax", "--allocator=tcmalloc")["LD_PRELOAD"].startswith("libtcmalloc")
    with pytest.raises(SystemExit):
        pt.parse_args(["--allocator=jemalloc"])
    assert "--allocator=jemalloc: no libjemalloc is installed." in capsys.readouterr().err


def _fake_run(model_dir, variant, seed, test_error, losses=(1.5, 0.5)):
    """A finished run folder as the trainer leaves it: log.csv per epoch, summary.json."""
    folder = model_dir / "runs" / variant / f"seed{seed}"
    folder.mkdir(parents=True)
    rows = [f"{i},9.0,{loss},0.1,0.5,0.9,0.6,{1 - test_error - 0.01 * (len(losses) - 1 - i)},0.99"
            for i, loss in enumerate(losses)]  # fmt: skip
    header = "epoch,epoch_time_s,loss,lr,top1,top5,val_loss,val_top1,val_top5"
    (folder / "log.csv").write_text("\n".join([header, *rows]) + "\n")
    (folder / "summary.json").write_text(json.dumps({"test_top1": 1 - test_error}))
    (folder / "config.json").write_text(json.dumps({"model": "PreActResNet56"}))


def test_paper_tables_report_merges_earlier_reports_and_states_the_orderings(tmp_path, capsys):
    """`--merge` adds an earlier report's runs (its CSVs) to the run folders of --model_dir,
    which win where both have a run; the report states on which seeds the paper's order of
    each pair of variants holds."""
    pt = _script("paper_tables")
    earlier, now = tmp_path / "earlier", tmp_path / "now"
    _fake_run(earlier, "r110_identity", 0, 0.13)
    _fake_run(earlier, "r110_full_preact", 0, 0.20)  # replaced by the run of `now`
    _fake_run(earlier, "r110_bn_after_add", 0, 0.16)
    assert pt.main(["--part=report", f"--model_dir={earlier}"]) == 0
    _fake_run(now, "r110_full_preact", 0, 0.12)
    for variant, error in [("r110_identity", 0.15), ("r110_full_preact", 0.14),
                           ("r110_bn_after_add", 0.14)]:  # fmt: skip
        _fake_run(now, variant, 1, error)
    capsys.readouterr()
    merge = f"--merge={earlier / 'paper_tables.csv'}"
    assert pt.main(["--part=report", f"--model_dir={now}", merge]) == 0
    results, curves = pt.collect(str(now), [str(earlier / "paper_tables.csv")])
    assert list(results) == [("r110_identity", 0), ("r110_identity", 1),
                             ("r110_bn_after_add", 0), ("r110_bn_after_add", 1),
                             ("r110_full_preact", 0), ("r110_full_preact", 1)]  # fmt: skip
    assert results["r110_full_preact", 0]["final_test_error"] == pytest.approx(0.12)  # now's
    merged = results["r110_identity", 0]  # the earlier report's run, numbers read back
    assert merged["status"] == "done" and merged["table"] == 1 and merged["epochs"] == 2
    assert merged["final_test_error"] == pytest.approx(0.13)
    assert merged["final_train_loss"] == pytest.approx(0.5)
    assert [(c["epoch"], c["train_loss"]) for c in curves["r110_identity", 0]] == [
        (1, 1.5),
        (2, 0.5),
    ]
    md = (now / "paper_tables.md").read_text()
    assert "| original (Fig. 4a) | 6.61 | 14.00 (13.00, 15.00) |" in md
    # The paper: full pre-activation 6.37 < original 6.61 < BN after addition 8.17.
    assert "| full pre-activation (4e) < original (Fig. 4a) | 0,1 | 0,1 | yes |" in md
    assert "| original (Fig. 4a) < BN after addition (4b) | 0 | 0,1 | yes |" in md
    assert "| full pre-activation (4e) < BN after addition (4b) | 0 | 0,1 | yes |" in md
    assert (  # and in words, under the table
        "The paper's order holds on every seed where both finished for: full pre-activation "
        "(4e) < original (Fig. 4a) (seeds 0,1). On some seeds only: full pre-activation (4e) < "
        "BN after addition (4b) (seed 0 of 0,1); original (Fig. 4a) < BN after addition (4b) "
        "(seed 0 of 0,1). On none: none."
    ) in md
    # Every pair once, the paper's better variant first, in the paper's order.
    pairs = [(a, b) for a, b, *_ in pt.orderings(results, pt.TABLE2[110])]
    assert pairs == [("r110_full_preact", "r110_identity"), ("r110_full_preact", "r110_bn_after_add"),
                     ("r110_identity", "r110_bn_after_add")]  # fmt: skip
    _fake_run(now, "r110_relu_before_add", 1, 0.30)
    results, _ = pt.collect(str(now))
    pairs = [(a, b) for a, b, *_ in pt.orderings(results, pt.TABLE2[110])]
    assert len(pairs) == len(set(pairs)) == 6 and pairs[-1] == ("r110_relu_before_add",
                                                                "r110_bn_after_add")  # fmt: skip
    assert "| 2 | r110_relu_before_add | PreActResNet56 | 1 | 30.00 | 30.00 | 0.500 | 2 | done |" in (
        "\n".join(pt._runs_lines(results)))  # fmt: skip
    assert "| Fashion-MNIST (PreActResNet56) | paper ResNet-164 | Fashion-MNIST |" in md
    pairs = pt.orderings({("r110_identity", 0): merged, ("r110_dropout_0.5", 0): {
        **merged, "final_test_error": 0.10}}, pt.TABLE1)  # fmt: skip
    assert pairs == [("r110_identity", "r110_dropout_0.5", [], [0], False)]  # "fail": worst
    with pytest.raises(SystemExit):
        pt.main(["--part=report", f"--model_dir={now}", f"--merge={tmp_path / 'none.csv'}"])


def test_recipe_smoke(runs):
    root, text = _check_ran(runs["recipe"])
    recipe_module = _script("fashion_mnist_recipe")
    out = root / "recipe_out"
    assert sorted(os.listdir(out)) == sorted(recipe_module.OUTPUTS)
    recipe = json.loads((out / "recipe.json").read_text())
    for key in ("float32", "float16"):
        assert 0.0 <= recipe[key]["top1"] <= 100.0
        assert 0.0 <= recipe[key]["top1_flip_tta"] <= 100.0
    assert recipe["epochs"] == 2 and recipe["test_images"] == 40 and recipe["loop"] == "jax"
    assert recipe["erasing"] == 0.5 and recipe["weight_decay"] == 5e-4
    assert 0 < recipe["train_seconds"] <= recipe["trainer_wall_time_s"]
    # The float32 export measures what the trainer's final evaluation measured (to one image).
    summary = json.loads((root / "recipe" / "summary.json").read_text())
    assert abs(recipe["float32"]["top1"] - 100 * summary["test_top1"]) <= 100 / 40 + 1e-6
    export = recipe["export"]
    assert export["dtype"] in ("float16", "float32") and export["file"] == "fashion_mnist_wrn.h5"
    if recipe["float16"]["top1"] == recipe["float32"]["top1"]:
        assert export["dtype"] == "float16"
    path = out / export["file"]
    assert os.path.getsize(path) == export["bytes"] <= 16 * 2**20
    from keras_preact import weights

    assert weights.file_digest(path) == export["sha256"]
    fields, log = _csv(out / "log.csv")
    assert [r["epoch"] for r in log] == ["0", "1"] and {"loss", "val_top1", "lr"} <= set(fields)
    _png(out / "curves.png")
    # The export holds float16 or float32 tensors, as many as the trained network has (the
    # recipe itself read each file back into that network to measure it).
    import h5py

    with h5py.File(path, "r") as f:
        dtypes = set()
        f.visititems(lambda n, o: dtypes.add(str(o.dtype)) if hasattr(o, "dtype") else None)
    assert dtypes == {export["dtype"]}
    from keras_preact import convert

    tensors = convert.read_tensors(path)
    assert "predictions" in tensors and "post_bn" in tensors
    assert sum(t.size for group in tensors.values() for t in group.values()) == recipe["parameters"]


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
