"""The trainers' configuration: presets and origins, flag errors at start, module layout,
and command-line runs of the model options (an ablation, label smoothing on both loops)."""

import ast
import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
from trainer_runs import REPO, cifar_cmd, fake_cifar, run

from keras_preact.train import config

TF = keras.backend.backend() == "tensorflow"
JAX = keras.backend.backend() == "jax"


# ----------------------------------------------------------------------------
# Config: presets, origins, derived values.


def test_preset_fills_only_what_no_flag_gave():
    values = {"epochs": 1, "batch_size": 128, "seed": 0, "base_lr": None}
    preset = {"epochs": 160, "batch_size": 128, "base_lr": 0.1}
    cfg = config.CifarConfig.from_values(values, explicit={"epochs", "batch_size"}, preset=preset)
    assert (cfg.epochs, cfg.batch_size, cfg.base_lr, cfg.seed) == (1, 128, 0.1, 0)
    assert {name: cfg.origins[name] for name in values} == {
        "epochs": "flag",
        "batch_size": "flag",
        "base_lr": "preset",
        "seed": "default",
    }
    # Every option has an origin; those neither given nor preset keep their defaults.
    assert set(cfg.origins) == set(config.CifarConfig.option_names())
    assert {cfg.origins[n] for n in cfg.origins if n not in values} == {"default"}
    assert cfg.model == "PreActResNet20" and cfg.dataset == "cifar10"
    with pytest.raises(ValueError, match=r"CifarConfig has no options \['epoch'\]"):
        config.CifarConfig.from_values(values, preset={"epoch": 3})
    with pytest.raises(ValueError, match=r"has no options \['pipeline'\]"):
        config.ImagenetConfig.from_values({"pipeline": "numpy"})


def test_config_is_frozen_and_derives_without_overriding():
    cfg = config.CifarConfig.from_values({"steps_per_epoch": None, "pipeline": "auto", "epochs": 2})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.epochs = 3
    with pytest.raises(TypeError):
        cfg.values["epochs"] = 3
    with pytest.raises(TypeError):
        cfg.origins["epochs"] = "flag"
    with pytest.raises(AttributeError, match="no attribute 'epoch'"):
        _ = cfg.epoch
    derived = cfg.derive(steps_per_epoch=390, pipeline="numpy", total_steps=780)
    assert derived.steps_per_epoch == 390 and cfg.steps_per_epoch is None
    assert derived.origins["steps_per_epoch"] == "derived"
    assert derived.origins["total_steps"] == "derived"
    assert derived.origins["epochs"] == "default"
    with pytest.raises(ValueError, match="already 2"):
        derived.derive(epochs=3)
    with pytest.raises(ValueError, match="no option 'epoch'"):
        derived.derive(epoch=3)
    # The steps of the run follow from the steps per epoch once these are known.
    assert cfg.derive(steps_per_epoch=390).total_steps == 780
    # A flag set afterwards (as evaluate.py and the tests do) is recorded as a flag.
    flagged = derived.with_flags(verbose=2)
    assert (flagged.verbose, flagged.origins["verbose"], derived.verbose) == (2, "flag", 1)
    record = derived.derive(mean=(np.float32(0.5),), std=(np.float32(0.25),)).record()
    assert record["total_steps"] == 780 and record["origins"]["pipeline"] == "derived"
    assert record["trainer"] == "cifar" and record["mean"] == [0.5]
    assert set(record) == {*config.CifarConfig.option_names(), "trainer", "origins"}
    json.dumps(record)


#: The paper's CIFAR recipe (Sec. 4 and the appendix), in the units of the config.
PAPER_CIFAR = {
    "batch_size": 128,
    "steps_per_epoch": 400,
    "epochs": 160,
    "lr_schedule": "step",
    "lr_boundaries": (80.0, 120.0),
    "warmup_steps": 400,
    "warmup": "constant",
    "warmup_lr": 0.01,
    "base_lr": 0.1,
    "momentum": 0.9,
    "weight_decay": 1e-4,
}


def test_paper_presets_and_boundary_steps():
    """`--lr_boundaries` is in epochs for both trainers: the paper's 32k and 48k iterations
    of 64k are epochs 80 and 120 of 400 steps."""
    cfg = config.get_config("paper", "cifar")
    assert isinstance(cfg, config.CifarConfig) and cfg.preset == "paper"
    assert {name: cfg.values[name] for name in PAPER_CIFAR} == PAPER_CIFAR
    assert {cfg.origins[name] for name in PAPER_CIFAR} == {"preset"}
    assert cfg.boundary_steps() == [32000, 48000]
    assert cfg.derive().total_steps == 64000
    assert config.PRESETS["cifar"]["paper"]["lr_boundaries"] == (80, 120)
    short = config.get_config("paper", "cifar", epochs=1, lr_boundaries=(0.5,))
    assert (short.epochs, short.origins["epochs"], short.warmup_steps) == (1, "flag", 400)
    assert short.boundary_steps() == [200]
    imagenet = config.get_config("paper", "imagenet").derive(steps_per_epoch=5004)
    assert isinstance(imagenet, config.ImagenetConfig) and imagenet.batch_size == 256
    assert imagenet.boundary_steps() == [150120, 300240] and imagenet.total_steps == 450360
    assert config.get_config(None, "imagenet").lr_boundaries == ()
    for trainer, presets in config.PRESETS.items():
        for name, values in presets.items():  # every preset sets options of its trainer
            assert set(values) <= set(config.CONFIGS[trainer].option_names()), (trainer, name)
    with pytest.raises(ValueError, match="preset='fast'"):
        config.get_config("fast", "cifar")
    with pytest.raises(ValueError, match="trainer='mnist'"):
        config.get_config("paper", "mnist")
    with pytest.raises(ValueError, match=r"has no options \['epoch'\]"):
        config.get_config("paper", "cifar", epoch=1)


#: Options computed by the run (from the data, the weights and the other options), never
#: given on the command line.
DERIVED_ONLY = {
    "cifar": {"total_steps", "mean", "std", "decayed_weights", "num_train", "num_test"},
    "imagenet": {"total_steps", "mean", "std", "decayed_weights", "class_names", "channels"},
}

_FLAG_NAMES = textwrap.dedent("""
    import json, runpy, sys
    from absl import flags
    runpy.run_path(sys.argv[1], run_name="parse_only")
    by_module = flags.FLAGS.flags_by_module_dict()
    print("RESULT " + json.dumps({
        "all": sorted(flags.FLAGS),
        "own": sorted({f.name for m, fs in by_module.items()
                       if m.startswith("keras_preact") for f in fs}),
    }))
""")


def test_jit_compile_unset_follows_keras_default_per_backend():
    """An unset --jit_compile compiles the train step under JAX only (Keras' `"auto"` there;
    an uncompiled JAX step runs op by op); a given value wins on every backend."""
    from keras_preact.train import distribution

    assert config.TrainConfig().jit_compile is None
    for backend, default in (("jax", True), ("tensorflow", False), ("torch", False)):
        assert distribution.resolve_jit_compile(None, backend) is default
        assert distribution.resolve_jit_compile(True, backend) is True
        assert distribution.resolve_jit_compile(False, backend) is False


@pytest.mark.parametrize("trainer", ["cifar", "imagenet"])
@pytest.mark.backend_independent
def test_every_option_has_its_flag(trainer):
    """Each option of the trainer's config that is not computed by the run is a flag of the
    trainer, and each flag the trainer defines is an option of its config (`from_flags`
    reads the options by flag name: a flag without its option would be ignored)."""
    out = subprocess.run(
        [sys.executable, "-c", _FLAG_NAMES, f"training/{trainer}.py"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, out.stderr[-4000:]
    names = json.loads(lines[0][len("RESULT ") :])
    options = set(config.CONFIGS[trainer].option_names())
    assert sorted(options - set(names["all"])) == sorted(DERIVED_ONLY[trainer])
    assert sorted(set(names["own"]) - options) == []
    assert set(names["own"]) == options - DERIVED_ONLY[trainer]


# ----------------------------------------------------------------------------
# Bad flags fail at parsing, before any data or model work.

_PARSE = textwrap.dedent("""
    import json, runpy, sys
    from absl import flags
    script, cases = sys.argv[1], json.loads(sys.argv[2])
    runpy.run_path(script, run_name="parse_only")
    out = {}
    for name, argv in cases.items():
        try:
            flags.FLAGS([script, *argv])
            out[name] = None
        except flags.Error as error:
            out[name] = str(error)
        flags.FLAGS.unparse_flags()
    print("RESULT " + json.dumps(out))
""")


def _parse_errors(script, cases):
    out = subprocess.run(
        [sys.executable, "-c", _PARSE, script, json.dumps(cases)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, out.stderr[-4000:]
    return json.loads(lines[0][len("RESULT ") :])


def _check_errors(got, expected):
    for name, wanted in expected.items():
        if wanted is None:
            assert got[name] is None, (name, got[name])
            continue
        assert got[name] is not None, f"{name}: no error"
        for fragment in wanted:
            assert fragment in got[name], (name, got[name])


def test_bad_cifar_flags_fail_at_parsing(tmp_path):
    data = tmp_path / "data"  # the parse-time check looks at file names only
    data.mkdir()
    (data / "cifar-10-python.tar.gz").write_bytes(b"")
    (tmp_path / "empty").mkdir()
    base = [f"--model_dir={tmp_path}", "--source=files", f"--data_dir={data}"]
    cases = {
        "ok": [],
        "empty data_dir": [f"--data_dir={tmp_path / 'empty'}"],
        "batch_size=0": ["--batch_size=0"],
        "batch_size=-8": ["--batch_size=-8"],
        "epochs=0": ["--epochs=0"],
        "steps_per_epoch=0": ["--steps_per_epoch=0"],
        "base_lr=0": ["--base_lr=0"],
        "base_lr=-0.1": ["--base_lr=-0.1"],
        "padding=-1": ["--padding=-1"],
        "eval_examples=0": ["--eval_examples=0"],
        "unknown model": ["--model=PreActResNet7"],
        "tpu without name": ["--strategy=tpu"],
        "stray shortcut parameter": ["--gate_bias=-6"],
        "gate bias ok": ["--shortcut=exclusive_gating", "--gate_bias=-6"],
        "unknown weights": ["--weights=no_such_record"],
        "bad layout": ["--layout=caffe"],
        "bad boundaries": ["--lr_boundaries=30,sixty"],
        "files without folder": [f"--model_dir={tmp_path}", "--source=files", "--data_dir="],
        "custom loop": ["--loop=custom"],
        "jax loop": ["--loop=jax"],
        "time_budget=0": ["--time_budget=0"],
        "erasing=1.5": ["--erasing=1.5"],
        "fit under multi-worker": ["--loop=fit", "--strategy=multi_worker_mirrored"],
    }
    cases = {name: base + argv for name, argv in cases.items()}
    expected = {
        "ok": None,
        "empty data_dir": ["holds neither cifar-10-python.tar.gz nor", "cifar-10-batches-py"],
        "batch_size=0": ["--batch_size=0", "positive"],
        "batch_size=-8": ["--batch_size=-8", "positive"],
        "epochs=0": ["--epochs=0"],
        "steps_per_epoch=0": ["--steps_per_epoch=0"],
        "base_lr=0": ["--base_lr=0", "> 0"],
        "base_lr=-0.1": ["--base_lr=-0.1", "> 0"],
        "padding=-1": ["--padding=-1"],
        "eval_examples=0": ["--eval_examples=0"],
        "unknown model": ["--model=PreActResNet7", "PreActResNet20", "PreActResNet200"],
        "tpu without name": ["--strategy=tpu needs --tpu"],
        "stray shortcut parameter": ["--gate_bias", "exclusive_gating", "--shortcut=identity"],
        "gate bias ok": None,
        "unknown weights": ["no_such_record", "fashion_mnist"],
        "bad layout": ["--layout=caffe", "timm"],
        "bad boundaries": ["--lr_boundaries"],
        "files without folder": ["--source=files needs --data_dir"],
        "custom loop": None if TF else ["--loop=custom", "KERAS_BACKEND=tensorflow"],
        "jax loop": None if JAX else ["--loop=jax", "KERAS_BACKEND=jax"],
        "time_budget=0": ["--time_budget", "> 0 seconds"],
        "erasing=1.5": ["--erasing", "[0, 1]"],
        "fit under multi-worker": [
            "--loop=fit cannot train under --strategy=multi_worker_mirrored",
            "--loop="
            + {"tensorflow": "custom", "jax": "jax"}.get(keras.backend.backend(), "torch"),
        ],
    }
    if not TF:  # the default strategy-less backends refuse tf.distribute strategies
        cases["tpu without name"] = base + ["--strategy=tpu", "--tpu=x"]
        expected["tpu without name"] = ["--strategy=tpu", "not available"]
    if keras.backend.backend() == "torch":  # several processes are torchrun's
        cases["mirrored without torchrun"] = base + ["--strategy=mirrored"]
        expected["mirrored without torchrun"] = ["--strategy=mirrored", "torchrun --nproc_per_node"]
        expected["fit under multi-worker"] = ["--strategy=multi_worker_mirrored", "torchrun"]
    _check_errors(_parse_errors("training/cifar.py", cases), expected)


@pytest.mark.backend_independent
def test_bad_imagenet_and_evaluate_flags_fail_at_parsing(tmp_path):
    # The data folder must hold the data set's files (names only are checked at parsing).
    for name in ("train-00000-of-00001", "validation-00000-of-00001"):
        (tmp_path / name).write_bytes(b"")
    for name in ("train-images", "train-labels", "t10k-images", "t10k-labels"):
        (tmp_path / f"{name}-idx{1 if 'labels' in name else 3}-ubyte.gz").write_bytes(b"")
    base = [f"--model_dir={tmp_path}", f"--data_dir={tmp_path}"]
    cases = {
        "ok": base,
        "no data_dir": [f"--model_dir={tmp_path}"],
        "batch_size=0": base + ["--batch_size=0"],
        "image_size=0": base + ["--image_size=0"],
        "num_eval_examples=0": base + ["--num_eval_examples=0"],
        "shuffle_buffer=0": base + ["--shuffle_buffer=0"],
        "crop above resize": base + ["--eval_size=320", "--eval_resize=256"],
        "unknown model": base + ["--model=ResNet50"],
        "label smoothing 1": base + ["--label_smoothing=1.0"],
    }
    expected = {
        "ok": None,
        "no data_dir": ["--source=tfrecord needs --data_dir"],
        "batch_size=0": ["--batch_size=0"],
        "image_size=0": ["--image_size=0"],
        "num_eval_examples=0": ["--num_eval_examples=0"],
        "shuffle_buffer=0": ["--shuffle_buffer=0"],
        "crop above resize": ["--eval_resize must be >= --eval_size"],
        "unknown model": ["--model=ResNet50", "PreActResNet50"],
        "label smoothing 1": ["--label_smoothing=1.0", "[0, 1)"],
    }
    _check_errors(_parse_errors("training/imagenet.py", cases), expected)
    weights = ["--weights=fashion_mnist"]
    cases = {
        "ok": weights + ["--dataset=fashion_mnist", "--source=files", f"--data_dir={tmp_path}"],
        "unknown dataset": weights + ["--dataset=mnist"],
        "tfrecord for cifar": weights + ["--dataset=cifar10", "--source=tfrecord"],
        "batch_size=0": weights + [f"--data_dir={tmp_path}", "--batch_size=0"],
        "no weights": [f"--data_dir={tmp_path}"],
    }
    expected = {
        "ok": None,
        "unknown dataset": ["--dataset=mnist", "imagenet", "cifar10", "cifar100", "fashion_mnist"],
        "tfrecord for cifar": ["--source=files or --source=tfds"],
        "batch_size=0": ["--batch_size=0"],
        "no weights": ["--weights"],
    }
    _check_errors(_parse_errors("training/evaluate.py", cases), expected)


@pytest.mark.backend_independent
def test_bad_flag_exits_at_once_without_a_traceback(tmp_path):
    out = subprocess.run(
        [sys.executable, "training/cifar.py", f"--model_dir={tmp_path}", "--batch_size=0"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 1
    assert "flag --batch_size=0: 0 is not a positive integer" in out.stderr
    assert "Traceback" not in out.stderr + out.stdout
    assert not os.listdir(tmp_path)  # nothing written


@pytest.mark.skipif(not TF, reason="tensorflow_datasets needs TensorFlow")
def test_tfds_offline_says_what_to_do_instead(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    from keras_preact.train import sources

    offline = lambda host: False  # noqa: E731
    problem = sources.tfds_problem("fashion_mnist", str(tmp_path), can_reach=offline)
    assert "cannot be reached" in problem
    assert "--source=files" in problem and "prepare_tfds.py" in problem
    problem = sources.tfds_problem("imagenet2012", str(tmp_path), can_reach=offline)
    assert "tfds build imagenet2012 --manual_dir" in problem
    assert sources.tfds_problem("cifar10", str(tmp_path), can_reach=lambda h: True) is None


# ----------------------------------------------------------------------------
# Module layout.


@pytest.mark.skipif(
    keras.backend.backend() != "torch", reason="backend-independent; run once, under torch"
)
def test_programs_import_side_by_side_and_list_their_flags_in_help():
    """Importing the four programs defines no flag (a program defines its own where it
    starts), so they import in one process; each program's `--help`, through `python -m`
    and through its console script, lists its flags (the shared ones too)."""
    code = (
        "from absl import flags\n"
        "from keras_preact.train import cifar, evaluate, imagenet, predict\n"
        "assert 'batch_size' not in flags.FLAGS\n"
        "names = imagenet.define_flags()\n"
        "assert 'eval_resize' in names and 'batch_size' in names, names\n"
        "print('RESULT ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, cwd=REPO)  # fmt: skip
    assert "RESULT ok" in out.stdout, out.stderr[-3000:]
    import shutil

    for program, own in (("cifar", "--padding"), ("imagenet", "--eval_resize"),
                         ("evaluate", "--max_batches"), ("predict", "--top")):  # fmt: skip
        commands = [[sys.executable, "-m", f"keras_preact.train.{program}"]]
        script = shutil.which(f"keras-preact-{program}")
        if script:
            commands.append([script])
        for command in commands:
            out = subprocess.run([*command, "--help"], capture_output=True, text=True,
                                 timeout=300, cwd=REPO)  # fmt: skip
            assert own in out.stdout and "--model" in out.stdout, (  # absl exits 1 after help
                command,
                out.stdout[-2000:] + out.stderr[-2000:],
            )


def test_training_modules_import_without_cycles():
    """`keras_preact/train/` modules import each other in one direction only (no cycle),
    counting the imports inside functions too."""
    package = "keras_preact.train"
    folder = os.path.join(REPO, *package.split("."))
    graph = {}
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".py") or name == "__init__.py":
            continue
        tree = ast.parse(open(os.path.join(folder, name)).read())
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == package:
                deps |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(package + "."):
                deps.add(node.module.split(".")[2])
            elif isinstance(node, ast.Import):
                deps |= {
                    a.name.split(".")[2] for a in node.names if a.name.startswith(package + ".")
                }
        graph[name[:-3]] = deps
    assert {"config", "flags", "optimization", "checkpoints", "cifar"} <= set(graph)
    assert "flags" in graph["cifar"] and "config" in graph["flags"]  # the scan sees imports
    state = {}

    def visit(node, path):
        if state.get(node) == "done":
            return
        assert state.get(node) != "active", f"import cycle: {' -> '.join(path + [node])}"
        state[node] = "active"
        for dep in graph.get(node, ()):
            visit(dep, path + [node])
        state[node] = "done"

    for node in graph:
        visit(node, [])
    assert "common" not in graph  # split by concern


# ----------------------------------------------------------------------------
# Command-line runs.


@pytest.mark.slow
def test_preset_overridden_by_a_flag(tmp_path):
    """`--preset=paper --epochs=1` runs one epoch; config.json says where each value came from
    and holds only the trainer's own flags."""
    data = fake_cifar(tmp_path / "data")
    model_dir = tmp_path / "run"
    out = run(
        cifar_cmd(data, model_dir, "--preset=paper", "--epochs=1", "--steps_per_epoch=2"),
        timeout=300,
    )
    summary = json.loads((model_dir / "summary.json").read_text())
    assert summary["epochs_run"] == 1 and summary["steps"] == 2
    cfg = json.loads((model_dir / "config.json").read_text())
    origins = cfg["origins"]
    assert (cfg["epochs"], origins["epochs"]) == (1, "flag")
    assert (cfg["steps_per_epoch"], origins["steps_per_epoch"]) == (2, "flag")
    assert (cfg["batch_size"], origins["batch_size"]) == (16, "flag")
    assert (cfg["warmup_steps"], origins["warmup_steps"]) == (400, "preset")
    assert (cfg["lr_boundaries"], origins["lr_boundaries"]) == ([80.0, 120.0], "preset")
    assert (cfg["base_lr"], origins["base_lr"]) == (0.1, "preset")
    assert (cfg["seed"], origins["seed"]) == (0, "default")
    assert origins["total_steps"] == "derived" and cfg["total_steps"] == 2
    assert set(origins) <= set(cfg)
    assert set(origins.values()) <= {"flag", "preset", "default", "derived"}
    for foreign in ("hbm_oom_exit", "tt_check_filter", "runtime_oom_exit", "logtostderr", "help"):
        assert foreign not in cfg
    # The constant warm-up of the preset is in force: lr 0.01 at step 2.
    assert summary["final_lr"] == pytest.approx(0.01)
    assert "shuffle=True" not in out.stdout + out.stderr


@pytest.mark.slow
def test_ablation_from_the_command_line_then_evaluate(tmp_path):
    """The paper's Fig. 4(c) unit with Fig. 2(c) shortcuts, trained for a few steps; then
    evaluate.py rebuilds that architecture from the run's config.json and gets the
    trainer's own test loss and accuracy from final.weights.h5."""
    data = fake_cifar(tmp_path / "data")
    model_dir = tmp_path / "run"
    run(
        cifar_cmd(
            data,
            model_dir,
            "--unit=relu_before_add",
            "--shortcut=exclusive_gating",
            "--gate_bias=-4",
            "--width_multiplier=0.5",
            "--zero_init_residual",
            "--epochs=1",
            "--steps_per_epoch=2",
            "--base_lr=0.05",
            "--weight_decay=0",  # the trainer's test loss is then the cross-entropy alone
        )
    )
    summary = json.loads((model_dir / "summary.json").read_text())
    cfg = json.loads((model_dir / "config.json").read_text())
    assert (cfg["unit"], cfg["shortcut"], cfg["gate_bias"]) == (
        "relu_before_add",
        "exclusive_gating",
        -4.0,
    )
    import keras_preact
    from keras_preact.train import modeling

    model = keras_preact.get_model(
        "PreActResNet20", input_shape=(32, 32, 3), **modeling.builder_kwargs(cfg)
    )
    names = [layer.name for layer in model.layers]
    assert "conv2_block2_gate_conv" in names  # the gates exist (block1 projects 16 -> 8)
    assert model.get_layer("conv2_block1_1_conv").filters == 8  # width 0.5
    out_json = tmp_path / "eval.json"
    run(
        [
            sys.executable,
            "training/evaluate.py",
            f"--weights={model_dir / 'final.weights.h5'}",
            "--dataset=cifar10",
            "--source=files",
            f"--data_dir={data}",
            f"--output={out_json}",
        ]
    )
    result = json.loads(out_json.read_text())
    assert result["run_config"] and result["model"] == "PreActResNet20"
    assert result["architecture"]["unit"] == "relu_before_add"
    assert result["architecture"]["shortcut"] == "exclusive_gating"
    assert result["examples"] == 16
    np.testing.assert_allclose(result["loss"], summary["test_loss"], rtol=1e-4)
    assert result["top1"] == pytest.approx(summary["test_top1"])
    assert result["top5"] == pytest.approx(summary["test_top5"])
    # A flag that contradicts the run is refused, not silently used.
    bad = subprocess.run(
        [
            sys.executable,
            "training/evaluate.py",
            f"--weights={model_dir / 'final.weights.h5'}",
            "--unit=full_preact",
            "--dataset=cifar10",
            "--source=files",
            f"--data_dir={data}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode != 0 and "--unit=full_preact contradicts" in bad.stderr


def _smoothed(data, model_dir, loop, smoothing):
    run(cifar_cmd(data, model_dir, f"--loop={loop}", f"--label_smoothing={smoothing}",
                  "--deterministic", "--epochs=1", "--steps_per_epoch=2", "--base_lr=0.05",
                  "--lr_schedule=constant"))  # fmt: skip
    return json.loads((model_dir / "summary.json").read_text())


@pytest.mark.slow
def test_label_smoothing_changes_the_loss_alike_on_every_loop(tmp_path):
    """`--label_smoothing` trains and evaluates under `fit` and (TensorFlow) the custom loop
    alike: from the same seed and deterministic input, both end with the same smoothed
    losses, which differ from the same run's without smoothing."""
    data = fake_cifar(tmp_path / "data")
    loops = ("fit", "custom") if TF else ("fit",)
    smoothed = {loop: _smoothed(data, tmp_path / loop, loop, 0.2) for loop in loops}
    plain = _smoothed(data, tmp_path / "plain", "fit", 0.0)
    fit = smoothed["fit"]
    assert fit["steps"] == plain["steps"] == 2
    cfg = json.loads((tmp_path / "fit" / "config.json").read_text())
    assert cfg["label_smoothing"] == 0.2
    for key in ("test_loss", "train_loss_per_epoch"):
        assert np.max(np.abs(np.subtract(fit[key], plain[key]))) > 1e-3, key
    if TF:
        custom = smoothed["custom"]
        assert custom["steps"] == 2
        np.testing.assert_allclose(custom["test_loss"], fit["test_loss"], rtol=1e-4)
        np.testing.assert_allclose(
            custom["train_loss_per_epoch"], fit["train_loss_per_epoch"], rtol=1e-4
        )


def test_fine_tuning_loads_every_layer_but_the_classifier():
    """`--weights` with another number of classes: the record's layers, a new classifier;
    the run derives the record's layout and input normalization."""
    import keras_preact
    from keras_preact.train import modeling

    record = keras_preact.get_model("PreActResNet20", weights="fashion_mnist")
    tuned = modeling.build_base(
        {}, model="PreActResNet20", input_shape=(28, 28, 1), classes=3, weights="fashion_mnist"
    )
    assert tuned.get_layer("predictions").units == 3
    for layer in record.layers:
        if layer.weights and layer.name != "predictions":
            for a, b in zip(layer.get_weights(), tuned.get_layer(layer.name).get_weights()):
                np.testing.assert_array_equal(a, b)
    derived = modeling.resolved_options(
        {"weights": "fashion_mnist"}, model="PreActResNet20", mean=[0.5], std=[0.5]
    )
    assert derived["layout"] == "paper"
    np.testing.assert_allclose(derived["mean"], [0.2860406])  # the record's, not the data's
    np.testing.assert_allclose(derived["std"], [0.35302424])
    plain = modeling.resolved_options({}, model="PreActResNet20", mean=[0.5], std=[0.25])
    assert plain == {"layout": "paper", "mean": [0.5], "std": [0.25]}


@pytest.mark.slow
def test_fine_tuning_from_the_command_line(tmp_path):
    """cifar.py --weights=fashion_mnist starts from the shipped record's weights."""
    import keras_preact
    from keras_preact.data import idx

    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    data.mkdir()
    for prefix, n in (("train", 64), ("t10k", 16)):
        idx.write_idx(
            data / f"{prefix}-images-idx3-ubyte.gz",
            rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
        )
        idx.write_idx(
            data / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, n, dtype=np.uint8)
        )
    model_dir = tmp_path / "run"
    cmd = cifar_cmd(data, model_dir, "--weights=fashion_mnist", "--epochs=1", "--steps_per_epoch=1")
    cmd[2] = "--dataset=fashion_mnist"
    run(cmd + ["--base_lr=1e-9", "--lr_schedule=constant"])
    cfg = json.loads((model_dir / "config.json").read_text())
    assert cfg["weights"] == "fashion_mnist" and cfg["origins"]["layout"] == "derived"
    np.testing.assert_allclose(cfg["mean"], [0.2860406])
    record = keras_preact.get_model("PreActResNet20", weights="fashion_mnist")
    tuned = keras_preact.get_model("PreActResNet20", input_shape=(28, 28, 1), classes=10)
    tuned.load_weights(model_dir / "final.weights.h5")
    kernels = [layer.name for layer in record.layers if layer.name.endswith("_conv")]
    assert len(kernels) > 10
    for name in kernels:  # one step at lr 1e-9 leaves the kernels where they started
        np.testing.assert_allclose(
            tuned.get_layer(name).get_weights()[0],
            record.get_layer(name).get_weights()[0],
            atol=1e-6,
        )


FMNIST = "/usr/share/datasets/fashion-mnist"


@pytest.mark.skipif(not os.path.isdir(FMNIST), reason="apt-get install dataset-fashion-mnist")
def test_evaluate_a_weights_record(tmp_path):
    """`evaluate.py --weights=fashion_mnist` builds the record's model with the record's own
    normalization and scores like the record says (its top-1 is on all 10,000 test images;
    1,000 of them vary by about a point)."""
    out_json = tmp_path / "eval.json"
    run(
        [
            sys.executable,
            "training/evaluate.py",
            "--weights=fashion_mnist",
            "--dataset=fashion_mnist",
            "--source=files",
            f"--data_dir={FMNIST}",
            "--batch_size=250",
            "--max_batches=4",
            f"--output={out_json}",
        ]
    )
    result = json.loads(out_json.read_text())
    assert result["model"] == "PreActResNet20" and result["examples"] == 1000
    np.testing.assert_allclose(result["normalization"], [[0.2860406], [0.35302424]])
    from keras_preact import weights as kp_weights

    assert result["top1"] >= kp_weights.get_record("fashion_mnist").top1 / 100 - 0.03, result


@pytest.mark.backend_independent
def test_a_run_written_before_an_option_existed_resumes(tmp_path):
    """config.json of an ImageNet run from before `--dataset` and the data's `channels` and
    `class_names`: its resume with today's defaults is no change; a changed option still is."""
    from keras_preact.train import distribution, resume

    cfg = config.get_config(None, "imagenet", model_dir=str(tmp_path), source="tfrecord")
    cfg = cfg.derive(channels=3, num_classes=1000, class_names=None, steps_per_epoch=10)
    old = {k: v for k, v in cfg.record().items() if k not in ("dataset", "channels", "class_names")}
    (tmp_path / "config.json").write_text(json.dumps({**old, "precision_policy": "float32"}))
    (tmp_path / "checkpoints" / "epoch-0001").mkdir(parents=True)
    run = distribution.Run(None, "float32", 1, True, "fit", False, str(tmp_path))
    assert resume.check(cfg, run, str(tmp_path)) == {}
    with pytest.raises(resume.ResumeRefused, match="dataset"):
        resume.check(cfg.with_flags(dataset="folder"), run, str(tmp_path))
