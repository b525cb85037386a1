"""Training and evaluation with `model.fit` or the `strategy.run` loop, and the run's end.

`train` picks the loop the run resolved (`distribution.Run.loop`); both save through the
same `checkpoints.Checkpointer`, which logs the same columns and keeps the history of the
whole run, resumed epochs included.
"""

import os
import shlex
import signal
import sys
import time

import keras
from absl import app

from keras_preact.train import callbacks, checkpoints, metrics, resume


def train(
    cfg,
    run,
    built,
    train_data,
    val_data_fn,
    *,
    checkpointer,
    initial_epoch,
    initial_step=0,
    budget=None,
    position=None,
):
    """Trains `built.model` to `cfg.epochs` with the run's loop; returns the whole run's
    history (a dict of lists, from the checkpoints: earlier processes' epochs included).

    `val_data_fn()` returns the validation data (distributed for the custom loop).
    `initial_step`: steps of epoch `initial_epoch` done (a run resumed mid-epoch).
    `budget`: a `callbacks.TimeBudget`, or None. `position`: where the training input
    stands (`epoch`, `offset`), when it is not `train_data` itself.
    SIGTERM or Ctrl-C saves a checkpoint at the next step boundary and raises
    `callbacks.Interrupted`.
    """
    with callbacks.StopRequest() as stop:
        _train(cfg, run, built, train_data, val_data_fn, checkpointer=checkpointer,
               initial_epoch=initial_epoch, initial_step=initial_step, budget=budget,
               position=position, stop=stop)  # fmt: skip
    return checkpointer.history()


def _fit(cfg, run, built, train_data, val_data_fn, *, checkpointer, epochs, initial_epoch,
         steps, budget, stop, offset=0):  # fmt: skip
    built.model.fit(
        train_data,
        epochs=epochs,
        initial_epoch=initial_epoch,
        steps_per_epoch=steps,
        validation_data=val_data_fn(),
        callbacks=callbacks.fit_callbacks(
            run,
            checkpointer,
            model_dir=cfg.model_dir,
            max_steps=cfg.max_steps,
            budget=budget,
            data=train_data,
            stop=callbacks.SaveOnSignal(
                stop, checkpointer, steps_per_epoch=cfg.steps_per_epoch, offset=offset
            ),
        ),
        verbose=cfg.verbose,
        # The pipelines shuffle themselves (a PyDataset or tf.data ignores `shuffle`).
        shuffle=False,
    )


def _train(cfg, run, built, train_data, val_data_fn, *, checkpointer, initial_epoch,
           initial_step, budget, position, stop):  # fmt: skip
    if run.loop == "fit":
        common = dict(checkpointer=checkpointer, budget=budget, stop=stop)
        if initial_step:
            # The rest of the epoch a signal stopped: its logs cover these steps only.
            _fit(cfg, run, built, train_data, val_data_fn, epochs=initial_epoch + 1,
                 initial_epoch=initial_epoch, steps=cfg.steps_per_epoch - initial_step,
                 offset=initial_step, **common)  # fmt: skip
            initial_epoch += 1
            if position is not None:
                position.epoch, position.offset = initial_epoch, 0
            if built.model.stop_training or initial_epoch >= cfg.epochs:
                return
        _fit(cfg, run, built, train_data, val_data_fn, epochs=cfg.epochs,
             initial_epoch=initial_epoch, steps=cfg.steps_per_epoch, **common)  # fmt: skip
    elif run.loop == "jax":
        from keras_preact.train import jax_loop

        built.loop = jax_loop.fit(
            cfg,
            built,
            train_data,
            val_data_fn(),
            checkpointer=checkpointer,
            initial_epoch=initial_epoch,
            initial_step=initial_step,
            extra_callbacks=[budget] if budget else (),
            stop=stop,
        )
    else:
        from keras_preact.train import custom_loop

        custom_loop.fit(
            built.model,
            run.strategy,
            train_data,
            checkpointer=checkpointer,
            epochs=cfg.epochs,
            steps_per_epoch=cfg.steps_per_epoch,
            global_batch_size=cfg.batch_size,
            log_dir=run.write_dir,
            chief=run.chief,
            initial_epoch=initial_epoch,
            val_dist_dataset_fn=val_data_fn,
            max_steps=cfg.max_steps,
            jit_compile=run.jit_compile,
            verbose=cfg.verbose,
            label_smoothing=cfg.label_smoothing,
            budget=budget,
            initial_step=initial_step,
            stop=stop,
        )


def evaluate(cfg, run, built, val_data_fn):
    """`{"loss", "top1", "top5"}` of the trained model on `val_data_fn()`."""
    if run.loop == "fit":
        result = built.model.evaluate(val_data_fn(), verbose=0, return_dict=True)
        return {k.replace("compile_metrics_", ""): float(v) for k, v in result.items()}
    if run.loop == "jax":
        from keras_preact.train import jax_loop

        loop = getattr(built, "loop", None) or jax_loop.Loop(
            built.model, label_smoothing=cfg.label_smoothing
        )
        return {k: float(v) for k, v in loop.evaluate(val_data_fn()).items()}
    from keras_preact.train import custom_loop

    return custom_loop.evaluate(
        built.model, run.strategy, val_data_fn(), label_smoothing=cfg.label_smoothing
    )


def time_budget(cfg, start):
    """The run's `callbacks.TimeBudget` (`--time_budget`, counted from `start`), or None."""
    return callbacks.TimeBudget(cfg.time_budget, start=start) if cfg.time_budget else None


def resume_command():
    """This process's command line, to resume the run with."""
    return " ".join(map(shlex.quote, getattr(sys, "orig_argv", sys.argv)))


def stopped_by_budget(cfg, budget, history):
    """Prints how to resume a run its `--time_budget` stopped; True if it did."""
    done = len(history.get("loss", []))
    if budget is None or not budget.stopped or done >= cfg.epochs:
        return False
    print(
        f"Stopped by --time_budget={cfg.time_budget:g} s after epoch {done}/{cfg.epochs} "
        f"({time.time() - budget.start:.0f} s), checkpoint saved in {cfg.model_dir}. "
        f"Resume with the same command: {resume_command()}",
        flush=True,
    )
    return True


#: What stops a run loudly, with one message and no traceback: the exit code of each.
_STOPS = (
    (callbacks.Diverged, 3),
    (resume.RunLocked, 4),
    (resume.ResumeRefused, 5),
    (checkpoints.WriteError, 6),
)


def _interrupt(signum, frame):
    raise callbacks.Interrupted(signum, saved=False)


def run(main):
    """`absl.app.run(main)` for a trainer: a signal, a divergence, a locked or mismatched
    run folder or a failed write ends the run with one message and a non-zero exit code
    (128 + the signal's number after a signal), not a traceback."""

    def guarded(argv):
        previous = signal.signal(signal.SIGTERM, _interrupt)
        try:
            return main(argv)
        except callbacks.Interrupted as e:
            print(f"{e} Resume with the same command: {resume_command()}", file=sys.stderr,
                  flush=True)  # fmt: skip
            sys.exit(128 + e.signum)
        except KeyboardInterrupt:  # outside the training loop: nothing new to save
            print(
                "Interrupted outside the training loop: nothing new was saved; the run's "
                f"checkpoints are unchanged. Resume with the same command: {resume_command()}",
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

    from keras_preact.train import distribution

    distribution.quiet_device_start(if_imported=True)  # absl's start-up makes TF look, loudly
    app.run(guarded)


def finish(cfg, run, built, *, history, initial_epoch, start, **results):
    """Saves `final.weights.h5` (the model alone) and writes `summary.json` (chief only).

    The summary holds `results` and what every run reports, over the whole run when it
    was resumed (`history` is `train`'s); it is returned.
    """
    os.makedirs(run.write_dir, exist_ok=True)
    callbacks.check_finite(built.model, {}, len(history.get("loss", [])))
    checkpoints.save_model_weights_atomic(
        built.export(built.model), os.path.join(run.write_dir, "final.weights.h5")
    )
    summary = {
        "model": cfg.model,
        **results,
        "epochs_run": len(history.get("loss", [])),
        "epochs_run_this_process": len(history.get("loss", [])) - initial_epoch,
        "resumed_from_epoch": initial_epoch,
        "steps": int(metrics.scalar(built.optimizer.iterations)),
        "final_lr": metrics.learning_rate(built.optimizer),
        "wall_time_s": round(time.time() - start, 1),
        "backend": keras.backend.backend(),
        "replicas": run.replicas,
        "loop": run.loop,
        "jit_compile": run.jit_compile,
        "model_dir": cfg.model_dir,
    }
    if run.chief:
        checkpoints.write_summary(cfg.model_dir, summary)
    return summary
