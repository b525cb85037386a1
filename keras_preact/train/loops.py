"""Training and evaluation with `model.fit` or the `strategy.run` loop, and the run's end.

`train` picks the loop the run resolved (`distribution.Run.loop`); both save through the
same `checkpoints.Checkpointer`, which logs the same columns and keeps the history of the
whole run, resumed epochs included.
"""

import os
import shlex
import sys
import time

import keras

from keras_preact.train import callbacks, checkpoints, metrics


def train(cfg, run, built, train_data, val_data_fn, *, checkpointer, initial_epoch, budget=None):
    """Trains `built.model` to `cfg.epochs` with the run's loop; returns the whole run's
    history (a dict of lists, from the checkpoints: earlier processes' epochs included).

    `val_data_fn()` returns the validation data (distributed for the custom loop).
    `budget`: a `callbacks.TimeBudget`, or None.
    """
    if run.loop == "fit":
        built.model.fit(
            train_data,
            epochs=cfg.epochs,
            initial_epoch=initial_epoch,
            steps_per_epoch=cfg.steps_per_epoch,
            validation_data=val_data_fn(),
            callbacks=callbacks.fit_callbacks(
                run,
                checkpointer,
                model_dir=cfg.model_dir,
                max_steps=cfg.max_steps,
                budget=budget,
                data=train_data,
            ),
            verbose=cfg.verbose,
            # The pipelines shuffle themselves (a PyDataset or tf.data ignores `shuffle`).
            shuffle=False,
        )
    elif run.loop == "jax":
        from keras_preact.train import jax_loop

        built.loop = jax_loop.fit(
            cfg,
            built,
            train_data,
            val_data_fn(),
            checkpointer=checkpointer,
            initial_epoch=initial_epoch,
            extra_callbacks=[budget] if budget else (),
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
            jit_compile=cfg.jit_compile,
            verbose=cfg.verbose,
            label_smoothing=cfg.label_smoothing,
            budget=budget,
        )
    return checkpointer.history()


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


def stopped_by_budget(cfg, budget, history):
    """Prints how to resume a run its `--time_budget` stopped; True if it did."""
    done = len(history.get("loss", []))
    if budget is None or not budget.stopped or done >= cfg.epochs:
        return False
    print(
        f"Stopped by --time_budget={cfg.time_budget:g} s after epoch {done}/{cfg.epochs} "
        f"({time.time() - budget.start:.0f} s), checkpoint saved in {cfg.model_dir}. "
        f"Resume with the same command: {' '.join(map(shlex.quote, sys.orig_argv))}",
        flush=True,
    )
    return True


def finish(cfg, run, built, *, history, initial_epoch, start, **results):
    """Saves `final.weights.h5` (the model alone) and writes `summary.json` (chief only).

    The summary holds `results` and what every run reports, over the whole run when it
    was resumed (`history` is `train`'s); it is returned.
    """
    os.makedirs(run.write_dir, exist_ok=True)
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
        "model_dir": cfg.model_dir,
    }
    if run.chief:
        checkpoints.write_summary(cfg.model_dir, summary)
    return summary
