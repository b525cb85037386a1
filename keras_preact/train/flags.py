"""The trainers' command-line flags (absl), with their checks, for `cifar.py`, `imagenet.py`
and `evaluate.py`.

Each flag's name is the name of a field of the run's config (`config.TrainConfig` and its
subclasses); `define_train_flags` returns the names it defined. Bad values fail while the
flags are parsed, before any data or model work: each flag carries its own check (absl
validators), and checks across flags are multi-flag validators registered next to the
flags they read.
"""

import os

from absl import flags

from keras_preact.train import fs
from keras_preact.train.config import LOOPS, SHORTCUT_PARAMS, STRATEGIES


def _positive(value):
    return value is None or value > 0


def _non_negative(value):
    return value is None or value >= 0


def _fraction(value):
    return value is None or 0.0 <= value < 1.0


def _boundaries(values):
    try:
        return all(float(v) >= 0 for v in values)
    except ValueError:
        return False


class _PathParser(flags.ArgumentParser):
    """A path flag's parser: `~` and `~user` expanded, as a shell would outside `--flag=~/x`."""

    syntactic_help = "a path"

    def parse(self, argument):
        return None if argument is None else os.path.expanduser(str(argument))

    def flag_type(self):
        return "string"


def DEFINE_path(name, default, help, **kwargs):  # noqa: N802 - absl's naming
    """`flags.DEFINE_string` for a file or folder: `~` is expanded (`--data_dir=~/data`)."""
    return flags.DEFINE(
        _PathParser(), name, default, help, serializer=flags.ArgumentSerializer(), **kwargs
    )


def program(define):
    """Decorates a program's `define()` of its flags: it runs once per process, where the
    program starts (importing a program defines nothing, so programs import side by side),
    and returns the names of the flags it defined."""
    names = []

    def once():
        if not names:
            before = set(flags.FLAGS)
            define()
            names.extend(sorted(set(flags.FLAGS) - before))
        return names

    return once


def list_in_help(names):
    """Makes `--help` list the flags `names`: absl lists the main module's key flags, and a
    console script's main module defines none."""
    import sys

    for name in names:
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS[name])


def define_model_flags(*, model, weights_help):
    """The architecture flags: everything the keras_preact builders take.

    Used by both trainers and by `evaluate.py` (which reads them from a run's
    `config.json` when it has one).
    """
    import keras_preact

    # fmt: off
    flags.DEFINE_enum("model", model, keras_preact.list_models(), "Builder name.")
    flags.DEFINE_enum("unit", "full_preact", list(keras_preact.units.UNITS), "Residual unit of "
                      "the paper's Fig. 4: original (a), bn_after_add (b), relu_before_add (c), "
                      "relu_preact (d), full_preact (e, the paper's choice).")
    flags.DEFINE_enum("shortcut", "identity", list(SHORTCUT_PARAMS), "Shortcut of the paper's "
                      "Fig. 2 (Table 1), replacing the identity shortcuts.")
    flags.DEFINE_float("shortcut_scale", None, "constant_scaling: lambda, the factor on the "
                       "shortcut (0.5).")
    flags.DEFINE_float("residual_scale", None, "constant_scaling: the factor on the residual "
                       "branch (0.5; 1.0 is Table 1's 'F unscaled').")
    flags.DEFINE_float("gate_bias", None, "exclusive_gating / shortcut_only_gating: initial gate "
                       "bias (-6).")
    flags.DEFINE_float("shortcut_dropout_rate", None, "dropout shortcut: drop rate (0.5).")
    flags.register_validator("shortcut_dropout_rate", _fraction, message="must be in [0, 1).")
    flags.DEFINE_string("layout", None, "Checkpoint layout preset (keras_preact.LAYOUTS: paper, "
                        "timm, keras, fb, fb_legacy). Default: the weights record's, else the "
                        "paper's.")
    flags.register_validator("layout", lambda v: v is None or v in keras_preact.LAYOUTS,
                             message=f"must be one of {list(keras_preact.LAYOUTS)}.")
    flags.DEFINE_float("width_multiplier", 1.0, "Multiplies every stage width (wide ResNets).")
    flags.register_validator("width_multiplier", _positive, message="must be > 0.")
    flags.DEFINE_bool("zero_init_residual", False, "Start every residual branch at zero (beyond "
                      "the paper).")
    flags.DEFINE_bool("scan_units", False, "Apply each stage's repeated units with "
                      "keras.ops.scan (much faster compiles of deep nets under JAX/XLA); the "
                      "exported weights load into the written-out net.")
    DEFINE_path("weights", None, weights_help)
    flags.register_validator("weights", _known_weights)
    flags.register_multi_flags_validator(["weights", "model", "layout", "unit", "shortcut"],
                                         _record_fits_the_net)
    flags.register_multi_flags_validator(["shortcut", *_all_shortcut_params()],
                                         _shortcut_params_match)
    # fmt: on


def _known_weights(value):
    import keras_preact

    if value is None or fs.isfile(value):
        return True
    records = sorted({r.name for r in keras_preact.weights.RECORDS})
    datasets = sorted({r.dataset for r in keras_preact.weights.RECORDS})
    if value in records or value in datasets:
        return True
    raise flags.ValidationError(
        f"is neither a file nor a weights record; records: {datasets + records}."
    )


def _shortcut_params_match(values):
    wanted = SHORTCUT_PARAMS[values["shortcut"]]
    stray = [p for p in _all_shortcut_params() if values[p] is not None and p not in wanted]
    if stray:
        raise flags.ValidationError(
            f"--{stray[0]} is a parameter of --shortcut="
            f"{[s for s, ps in SHORTCUT_PARAMS.items() if stray[0] in ps]}, not of "
            f"--shortcut={values['shortcut']} (which takes {list(wanted) or 'none'})."
        )
    return True


def _record_fits_the_net(values):
    """A weights record (`--weights=fashion_mnist`) must be one for `--model` and agree with
    `--layout`, `--unit` and `--shortcut`: checked here, not when the model is built."""
    import keras_preact

    name, model = values["weights"], values["model"]
    records = keras_preact.weights.RECORDS
    named = [r for r in records if name in (r.name, r.dataset)]
    if not named or fs.isfile(name):  # a file, or no record (`known_weights` says so)
        return True
    depth = keras_preact.MODELS[model]["depth"] if model else None
    fits = [r for r in named if depth is None or r.depth == depth]
    if not fits:
        models = sorted({r.model for r in named})
        others = sorted({r.name for r in records if r.depth == depth}) or "none"
        raise flags.ValidationError(
            f"--weights={name} holds weights for {models}, not for --model={model}: pass "
            f"--model={models[0]} (records for {model}: {others})."
        )
    record = keras_preact.weights.get_record(name, depth)
    layout, layouts = values["layout"], keras_preact.LAYOUTS
    if layout in layouts and record.layout not in (None, layouts[layout]):
        raise flags.ValidationError(
            f"--layout={layout} contradicts --weights={name} ({record.name}), whose file needs "
            f"--layout={record.layout.name}: leave --layout out to take it from the weights."
        )
    for option in ("unit", "shortcut"):
        wanted = getattr(record, option)
        if wanted is not None and values[option] != wanted:
            raise flags.ValidationError(
                f"--{option}={values[option]} contradicts --weights={name} ({record.name}), "
                f"trained with --{option}={wanted}: leave --{option} out."
            )
    return True


def _all_shortcut_params():
    return sorted({p for ps in SHORTCUT_PARAMS.values() for p in ps})


def define_train_flags(config_class):
    """The flags every trainer shares, with the defaults and presets of `config_class`.

    Returns:
        The names of the flags defined (the config's options that come from the command
        line).
    """
    from keras_preact.train.config import PRESETS

    before = set(flags.FLAGS)
    defaults = config_class()
    presets = PRESETS[config_class.trainer]
    flags.DEFINE_enum(
        "preset",
        None,
        list(presets),
        "Recipe whose values fill every flag not given on the command line: "
        + "; ".join(
            f"{name}: " + ", ".join(f"{k}={v}" for k, v in sorted(values.items()))
            for name, values in presets.items()
        ),
    )
    define_model_flags(
        model=defaults.model,
        weights_help="Start from these weights (fine-tuning): a keras_preact weights record "
        "(imagenet, imagenet:fb_torch, fashion_mnist, ...) or a weights file. With another "
        "number of classes or trained on another data set, every layer but the classifier is "
        "loaded (a new head).",
    )
    flags.DEFINE_float("drop_path_rate", 0.0, "Stochastic depth rate (0 in the paper).")
    flags.register_validator("drop_path_rate", _fraction, message="must be in [0, 1).")
    _define_run_flags(defaults)
    _define_optimizer_flags(defaults)
    _define_execution_flags()
    return sorted(set(flags.FLAGS) - before)


def _define_run_flags(defaults):
    # fmt: off
    DEFINE_path("model_dir", None, "Where the run writes everything: a folder, or a URL "
                        "such as gs://bucket/run.", required=True)
    flags.register_validator(
        "model_dir", lambda path: path is None or not os.path.exists(path) or os.path.isdir(path),
        message="is an existing file, not a folder: pass a new folder, or a run's folder to "
        "resume it.")
    flags.DEFINE_enum("strategy", "default", STRATEGIES, "Distribution strategy.")
    flags.DEFINE_string("tpu", "", "TPU name or grpc:// address for --strategy=tpu.")
    flags.DEFINE_string("coordinator_address", "", "JAX: host:port of process 0 of a run of "
                        "several processes (default: $KERAS_DISTRIBUTION_JOB_ADDRESSES, else "
                        "what jax.distributed detects: a TPU VM slice, SLURM, Open MPI).")
    flags.DEFINE_integer("num_processes", None, "JAX: the processes of the run (default: "
                         "$KERAS_DISTRIBUTION_NUM_PROCESSES, or detected).", lower_bound=1)
    flags.DEFINE_integer("process_id", None, "JAX: this process's index, 0 for the one that "
                         "writes the run folder (default: $KERAS_DISTRIBUTION_PROCESS_ID, or "
                         "detected).", lower_bound=0)
    flags.DEFINE_integer("batch_size", defaults.batch_size, "Global batch size (all replicas).",
                         lower_bound=1)
    flags.DEFINE_integer("epochs", defaults.epochs, "Number of epochs.", lower_bound=1)
    flags.DEFINE_integer("steps_per_epoch", None, "Steps per epoch (default: one pass over the "
                         "data).", lower_bound=1)
    flags.DEFINE_integer("max_steps", None, "Stop after this many steps in total, with a "
                         "checkpoint there that the command without it resumes.", lower_bound=1)
    flags.DEFINE_enum("loop", "auto", list(LOOPS), "fit: model.fit; custom: the tf.distribute "
                      "strategy.run loop (TensorFlow backend; multi-worker and TPU); jax: a "
                      "jitted JAX step over every device of every process (JAX backend); torch: "
                      "DistributedDataParallel over the processes of a torchrun launch "
                      "(PyTorch backend); auto: jax under JAX; torch under torchrun; custom "
                      "under TensorFlow's multi_worker_mirrored (Keras 3 fit fails there); "
                      "else fit.")
    flags.DEFINE_float("time_budget", None, "Wall-clock seconds for this process: when one more "
                       "step, and the checkpoint (and at an epoch end the evaluation) after it, "
                       "would not end within it, the run saves a checkpoint at that step, prints "
                       "the command that resumes it, and exits 0 (preemptible and time-limited "
                       "jobs).")
    flags.register_validator("time_budget", _positive, message="must be > 0 seconds.")
    flags.DEFINE_list("allow_changes", [], "Options a resumed run may change although they change "
                      "what the run means (batch size, schedule, optimizer, seed, ...), or `all`. "
                      "Without it such a resume is refused; the net and the data set can never "
                      "change.")
    flags.DEFINE_bool("restart_optimizer", False, "On resume, load the checkpoint's weights and "
                      "step count but start the optimizer's state (momentum) again at zero; "
                      "needed when an option changed its shape.")
    flags.register_multi_flags_validator(["strategy", "tpu"], _tpu_named)
    flags.register_multi_flags_validator(["loop", "strategy"], _loop_has_backend)
    flags.register_validator("strategy", _strategy_has_backend)
    # fmt: on


def _tpu_named(values):
    if values["strategy"] == "tpu" and not values["tpu"]:
        raise flags.ValidationError(
            "--strategy=tpu needs --tpu=NAME (a Cloud TPU name or grpc://host:8470)."
        )
    return True


def _loop_has_backend(values):
    import keras

    backend = keras.backend.backend()
    from keras_preact.train import distribution

    custom = distribution.resolve_loop(values["loop"], values["strategy"], backend) == "custom"
    if custom and backend != "tensorflow":
        raise flags.ValidationError(
            f"--loop=custom (the strategy.run loop, also chosen by --loop=auto with "
            f"--strategy=multi_worker_mirrored) needs tf.distribute, i.e. "
            f"KERAS_BACKEND=tensorflow; got KERAS_BACKEND={backend}. Use --loop=fit."
        )
    multi_worker = values["strategy"] == "multi_worker_mirrored"
    if values["loop"] == "fit" and multi_worker:
        reason, use = {
            "tensorflow": ("Keras 3's model.fit fails there (keras-team/keras#20585)", "custom"),
            "jax": ("the processes of a run train through the jitted JAX loop", "jax"),
            "torch": ("the processes of a torchrun launch train through DDP", "torch"),
        }[backend]
        raise flags.ValidationError(
            f"--loop=fit cannot train under --strategy=multi_worker_mirrored: {reason}. "
            f"Use --loop={use} (or auto)."
        )
    for loop, needs, what in (("jax", "jax", "the jitted JAX step loop"),
                              ("torch", "torch", "PyTorch's DistributedDataParallel")):  # fmt: skip
        if values["loop"] == loop and backend != needs:
            raise flags.ValidationError(
                f"--loop={loop} ({what}) needs KERAS_BACKEND={needs}; got "
                f"KERAS_BACKEND={backend}. Use --loop=fit."
            )
    return True


def _strategy_has_backend(strategy):
    import keras

    backend = keras.backend.backend()
    several = ("default", "one_device", "mirrored", "multi_worker_mirrored")
    allowed = {"tensorflow": STRATEGIES, "jax": several, "torch": several}
    if backend == "torch" and strategy in several[2:]:
        from keras_preact.train import distribution

        if not distribution.torch_launched():
            raise flags.ValidationError(
                f"--strategy={strategy} under KERAS_BACKEND=torch means the processes of a "
                f"torchrun launch: start it with `torchrun --nproc_per_node=N -m "
                f"keras_preact.train.cifar ...` (one process: --strategy=default)."
            )
    allowed = allowed.get(backend, ("default", "one_device"))
    if strategy not in allowed:
        raise flags.ValidationError(
            f"--strategy={strategy} is not available with KERAS_BACKEND={backend}; "
            f"allowed: {list(allowed)} (every strategy runs under tensorflow)."
        )
    return True


def _define_optimizer_flags(defaults):
    # fmt: off
    flags.DEFINE_enum("lr_schedule", defaults.lr_schedule, ["step", "cosine", "constant"],
                      "step: divide by 10 at --lr_boundaries; cosine: cosine decay to 0.")
    flags.DEFINE_float("base_lr", None, "Peak learning rate (default: 0.1 * batch / 256 for "
                       "ImageNet, 0.1 for CIFAR).")
    flags.register_validator("base_lr", _positive, message="must be > 0.")
    flags.DEFINE_list("lr_boundaries", [], "Epochs (may be fractional) at which the step schedule "
                      "divides the learning rate by 10 (the paper's CIFAR 32k/48k iterations at "
                      "400 steps per epoch: 80,120).")
    flags.register_validator("lr_boundaries", _boundaries,
                             message="must be a comma-separated list of non-negative numbers.")
    flags.DEFINE_integer("warmup_steps", 0, "Warm-up steps.", lower_bound=0)
    flags.DEFINE_enum("warmup", "linear", ["linear", "constant"], "linear: ramp from 0 to "
                      "base_lr; constant: hold --warmup_lr (the paper's 0.01 for the first 400 "
                      "iterations).")
    flags.DEFINE_float("warmup_lr", 0.01, "Learning rate of a constant warm-up.")
    flags.register_validator("warmup_lr", _non_negative, message="must be >= 0.")
    flags.DEFINE_float("momentum", 0.9, "SGD momentum.")
    flags.register_validator("momentum", _fraction, message="must be in [0, 1).")
    flags.DEFINE_bool("nesterov", False, "Nesterov momentum.")
    flags.DEFINE_float("weight_decay", 1e-4, "L2 coefficient (gradient += wd * w).")
    flags.register_validator("weight_decay", _non_negative, message="must be >= 0.")
    flags.DEFINE_enum("weight_decay_on", "kernels", ["kernels", "all"], "kernels: conv and dense "
                      "kernels only; all: every trainable weight, as the paper's Torch code does.")
    flags.DEFINE_float("label_smoothing", 0.0, "Label smoothing (0 in the paper).")
    flags.register_validator("label_smoothing", _fraction, message="must be in [0, 1).")
    flags.DEFINE_integer("freeze_stages", 0, "Fine-tuning: freeze the stem and the first N "
                         "stages (more than the net has: the whole backbone, a linear probe).",
                         lower_bound=0)
    flags.DEFINE_bool("freeze_batchnorm", False, "Fine-tuning: keep every BatchNorm layer's "
                      "statistics and scale as the start weights have them (inference mode).")
    flags.DEFINE_float("backbone_lr_scale", 1.0, "Fine-tuning: the learning rate of every layer "
                       "but the classifier, as a fraction of --base_lr's schedule.")
    flags.register_validator("backbone_lr_scale", lambda v: v > 0, message="must be > 0.")
    # fmt: on


def _define_execution_flags():
    # fmt: off
    flags.DEFINE_bool("mixed_precision", False, "float16 compute on GPU, bfloat16 on TPU/CPU.")
    flags.DEFINE_bool("jit_compile", None, "XLA-compile the train step. Default: on under the JAX "
                      "backend (as Keras' jit_compile='auto'; an uncompiled JAX step runs op by "
                      "op), off under TensorFlow and PyTorch.")
    flags.DEFINE_bool("compilation_cache", True, "JAX backend: keep XLA's compiled programs in "
                      "MODEL_DIR/jax_cache (a local or gs:// folder), so a resumed or repeated "
                      "run skips the compile (JAX's persistent compilation cache).")
    flags.DEFINE_integer("seed", 0, "Seed for initialization and the input pipeline.")
    flags.DEFINE_bool("deterministic", False, "Deterministic input order and ops (slower).")
    flags.DEFINE_bool("normalize_on_device", True, "Ship uint8 batches; the model normalizes them "
                      "as its first layer (include_preprocessing=True), on the accelerator: 4x "
                      "less host-to-device traffic.")
    flags.DEFINE_integer("verbose", 1, "Progress: 0 silent, 1 progress bar, 2 one line per "
                         "epoch.", lower_bound=0)
    # fmt: on
