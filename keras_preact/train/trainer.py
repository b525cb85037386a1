"""The one entry of the trainers: `train(cfg, prepare)` runs a whole run, whatever the data.

A trainer module (`cifar.py`, `imagenet.py`) is its flags and its data: it parses its
config and calls `train` with a `prepare(cfg, run) -> (cfg, data)` that loads its data
and derives what follows from it (steps per epoch, normalization, ...). Everything else is
here, top to bottom: seeds, strategy and precision; the run folder's lock; the model and
its optimizer; the resume check, the checkpoint, `config.json`; training under the one
`controller.Controller` with the runner of `--loop`; the final evaluation and
`summary.json`. `run_program(main)` turns every stop into one message and an exit code.
"""

import signal
import sys
import time

import keras
from absl import app

from keras_preact.train import (
    checkpoints,
    controller,
    distribution,
    fs,
    metrics,
    modeling,
    optimization,
    resume,
    runlog,
    runners,
)


class Data:
    """A run's data, as the controller asks for it (subclassed by each trainer), with the
    model's `input_shape` and the number of `classes`."""

    input_shape, classes = None, None

    def train(self, epoch, step, steps):
        """The training input of `steps` steps from `(epoch, step)`, for the run's loop."""
        raise NotImplementedError

    def evaluate(self):
        """The evaluation input, for the run's loop."""
        raise NotImplementedError

    def position(self, epoch, step, batches):
        """Where the training stream stands after `batches` batches of the input that
        `train` gave last, for a checkpoint at `(epoch, step)` (a JSON value); None when
        `(epoch, step)` says it all, as for the in-memory streams."""
        return None

    def restore(self, restored):
        """Takes a restored checkpoint's position (`restored.state["input"]`)."""

    def notes(self):
        """Lines for the console at an epoch end (records the input skipped, ...)."""
        return []

    def summary(self, final, gather=lambda value: [value]):
        """The trainer's entries of `summary.json`, from the final evaluation `final`;
        `gather(value)` is every process's `value` (a dict of ints; a collective: every
        process calls `summary`)."""
        return {}


def make_runner(cfg, run, built):
    """The runner of the run's loop (`runners`)."""
    if run.loop == "fit":
        return runners.FitRunner(built.model)
    if run.loop == "jax":
        import jax

        from keras_preact.train import jax_loop

        one = cfg.strategy == "one_device"
        return jax_loop.JaxRunner(built.model, label_smoothing=cfg.label_smoothing,
                                  devices=jax.local_devices()[:1] if one else None,
                                  eval_batch_size=getattr(cfg, "eval_batch_size", None)
                                  or cfg.batch_size)  # fmt: skip
    if run.loop == "torch":
        from keras_preact.train import torch_loop

        return torch_loop.TorchRunner(built.model, label_smoothing=cfg.label_smoothing)
    from keras_preact.train import custom_loop

    return custom_loop.TFRunner(built.model, run.strategy, cfg.batch_size,
                                jit_compile=run.jit_compile,
                                label_smoothing=cfg.label_smoothing)  # fmt: skip


def train(cfg, prepare):
    """Trains, evaluates and writes the run of `cfg`; returns `summary.json`'s dict, or
    None when `--time_budget` stopped the run (its checkpoint resumes it)."""
    start = time.time()

    # 1. Seeds, strategy and precision: variables are created under them. One trainer
    # per run folder.
    run = distribution.setup(cfg)
    writes = run.write_dir is not None  # all but one process of a JAX run write nothing
    lease = fs.lock(run.write_dir) if writes else None  # noqa: F841 - held until the end

    # 2. Data, and the values that follow from it.
    cfg, data = prepare(cfg, run)

    # 3. Model and optimizer.
    schedule = optimization.lr_schedule(cfg)
    built = modeling.build(cfg, run, schedule, input_shape=data.input_shape, classes=data.classes)
    cfg = cfg.derive(decayed_weights=built.decayed)

    # 4. Resume: the options are checked against config.json before anything is written;
    # config.json records the resume once its checkpoint has loaded.
    changed = resume.check(cfg, run, cfg.model_dir)
    store = checkpoints.Store(cfg.model_dir, run.write_dir, writes=writes)
    restored = store.restore(built.model, restart_optimizer=cfg.restart_optimizer)
    runlog.write_config(cfg, run, resume.history(cfg.model_dir, changed, restored))
    log = runlog.RunLog(run.write_dir or cfg.model_dir, export=built.export, writes=writes)
    log.restore(restored.state)
    data.restore(restored)

    # 5. Train, within --time_budget when one is given.
    runner = make_runner(cfg, run, built)
    budget = controller.TimeBudget(cfg.time_budget, start=start) if cfg.time_budget else None
    ended = controller.Controller(
        cfg, runner, data, store=store, log=log, chief=run.chief, budget=budget
    ).run(restored)
    if ended == "budget":
        return None

    # 6. Final evaluation, the final weights and the run's summary.
    final = runner.evaluate(data.evaluate())
    history = log.history()
    controller.check_finite(built.model, {}, len(history.get("loss", [])))
    if writes:
        checkpoints.save_model_weights(
            built.export(built.model), fs.join(run.write_dir, "final.weights.h5")
        )
    done = len(history.get("loss", []))
    summary = {
        "model": cfg.model, **data.summary(final, runner.gather), "epochs_run": done,
        "epochs_run_this_process": done - restored.epoch, "resumed_from_epoch": restored.epoch,
        "stopped_by": None if ended == "done" else ended,
        "steps": int(metrics.scalar(built.optimizer.iterations)),
        "final_lr": metrics.learning_rate(built.optimizer),
        "train_loss_per_epoch": [float(v) for v in history.get("loss", [])],
        "wall_time_s": round(time.time() - start, 1), "backend": keras.backend.backend(),
        "replicas": run.replicas, "processes": run.processes, "loop": run.loop,
        "jit_compile": run.jit_compile, "model_dir": cfg.model_dir,
    }  # fmt: skip
    if run.chief:
        runlog.write_summary(cfg.model_dir, summary)
    return summary


#: What stops a run loudly, with one message and no traceback: the exit code of each.
_STOPS = (
    (controller.Diverged, 3),
    (fs.RunLocked, 4),
    (resume.ResumeRefused, 5),
    (fs.WriteError, 6),
)


def _interrupt(signum, frame):
    raise controller.Interrupted(signum, saved=False)


def _guarded(main, argv):
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        return main(argv)
    except controller.Interrupted as e:
        print(f"{e} Resume with the same command: {controller.resume_command()}", file=sys.stderr,
              flush=True)  # fmt: skip
        sys.exit(128 + e.signum)
    except KeyboardInterrupt:  # outside the training loop: nothing new to save
        print(
            "Interrupted outside the training loop: nothing new was saved; the run's "
            f"checkpoints are unchanged. Resume with the same command: {controller.resume_command()}",
            file=sys.stderr,
            flush=True,
        )
        sys.exit(128 + signal.SIGINT)
    except app.UsageError as e:  # a check after parsing: one line, not the help text
        print(f"FATAL Flags parsing error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    except tuple(kind for kind, _ in _STOPS) as e:
        code = next(c for kind, c in _STOPS if isinstance(e, kind))
        print(f"{type(e).__name__}: {e}", file=sys.stderr, flush=True)
        sys.exit(code)
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_program(main, defined=()):
    """`absl.app.run(main)` for a trainer: a signal, a divergence, a locked or mismatched
    run folder or a failed write ends the run with one message and a non-zero exit code
    (128 + the signal's number after a signal), not a traceback. `defined`: the names of
    the program's flags, which `--help` lists."""
    from keras_preact.train import flags as train_flags

    train_flags.list_in_help(defined)
    distribution.quiet_device_start(if_imported=True)  # absl's start-up makes TF look, loudly
    app.run(lambda argv: _guarded(main, argv))
