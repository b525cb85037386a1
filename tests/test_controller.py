"""keras_preact/train/controller.py: the one outer loop, over a runner that only trains N steps.

A fake runner (its steps advance the optimizer's counter and a fake clock) and a fake data
object that records the positions it is asked for, with the real checkpoint store and run
log: every stop (max_steps, signal, time budget, divergence) is a checkpoint at a step, and
a resume continues at exactly that step.
"""

import os
import signal
import sys

import keras
import numpy as np
import pytest
from trainer_runs import small_cnn

from keras_preact.train import checkpoints, config, controller, fs, runlog, runners

STEPS = 5  # per epoch


class Clock:
    def __init__(self):
        self.now = 1000.0

    def time(self):
        return self.now


class Runner:
    """Each step: optimizer step + 1, clock + `step_s`; evaluation: clock + `eval_s`."""

    def __init__(self, model, clock, *, step_s=1.0, eval_s=0.0, loss=1.0, on_step=None):
        self.model, self.clock, self.step_s, self.eval_s = model, clock, step_s, eval_s
        self.loss, self.on_step = loss, on_step

    def train(self, inputs, steps, *, stop, progress, every):
        done = wish = 0
        while done < steps:
            self.model.optimizer.iterations.assign_add(1)
            self.clock.now += self.step_s
            done += 1
            if self.on_step:
                self.on_step(self.model, done)
            sums = {"loss": self.loss * done, "top1": 2.0 * done, "top5": 4.0 * done,
                    "examples": 4.0 * done, "steps": done}  # fmt: skip
            if done % every == 0 or done == steps:
                progress(done, sums)
            if done < steps and (wish := stop(done)):
                break
        return runners.Trained(done, sums, wish)

    def evaluate(self, inputs):
        self.clock.now += self.eval_s
        return {"loss": 0.5, "top1": 0.25, "top5": 1.0, "examples": 8}

    def sync(self):
        pass

    def gather(self, value):
        return [value]

    def agree(self, wish):
        return wish


class Data:
    def __init__(self):
        self.asked = []

    def train(self, epoch, step, steps):
        self.asked.append((epoch, step, steps))

    def evaluate(self):
        return None

    def position(self, epoch, step, batches):
        return {"epoch": epoch, "records": 10 * step}


def _model():
    model = small_cnn()
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9))
    model.optimizer.build(model.trainable_variables)
    return model


def _run(tmp_path, clock, monkeypatch, *, restore=True, budget=None, runner_kw=None, **options):
    """Runs a controller over a fresh model (restored from `tmp_path`'s checkpoint)."""
    monkeypatch.setattr(controller, "time", clock)
    options = {"epochs": 2, "verbose": 0, "model_dir": str(tmp_path), **options}
    cfg = config.get_config(None, "cifar", **options).derive(steps_per_epoch=STEPS)
    model, data = _model(), Data()
    store, log = checkpoints.Store(str(tmp_path)), runlog.RunLog(str(tmp_path))
    if str(tmp_path).startswith("ram://"):
        monkeypatch.setattr(controller, "_tensorboard", lambda folder: None)
    restored = store.restore(model) if restore else checkpoints.Restored()
    log.restore(restored.state)
    runner = Runner(model, clock, **(runner_kw or {}))
    budget = budget and controller.TimeBudget(budget, start=clock.now)
    ctl = controller.Controller(cfg, runner, data, store=store, log=log, budget=budget)
    return ctl.run(restored), data, model, log


@pytest.mark.parametrize("where", ["local", "ram"])
def test_max_steps_stops_inside_an_epoch_and_the_resume_ends_where_one_run_ends(
    tmp_path, monkeypatch, where
):
    """Also in TensorFlow's in-memory file system: every file of the run goes through `fs`."""
    root = str(tmp_path) if where == "local" else f"ram://run-{os.getpid()}-{id(tmp_path)}"
    clock = Clock()
    ended, data, model, _ = _run(root, clock, monkeypatch, max_steps=3)
    assert ended == "max_steps" and data.asked == [(0, 0, 3)]
    saved = checkpoints.Store(root).folders(root)
    assert [key for key, _ in saved] == [(0, 3)]
    state = checkpoints.Store(root).restore(_model()).state
    assert state["partial"]["steps"] == 3 and state["input"] == [{"epoch": 0, "records": 30}]

    ended, data, model, log = _run(root, clock, monkeypatch)
    assert ended == "done"
    assert data.asked == [(0, 3, 2), (1, 0, STEPS)]  # the rest of epoch 1, then epoch 2
    assert int(model.optimizer.iterations.numpy()) == 2 * STEPS
    rows = log.history()
    assert len(rows["loss"]) == 2 and fs.read_text(fs.join(root, "log.csv")).count("\n") == 3
    # Epoch 1's row covers all its 5 steps (3 before the stop, 2 after): 4 examples each.
    assert rows["top1"][0] == pytest.approx(0.5) and rows["val_top1"] == [0.25, 0.25]
    assert rows["epoch_time_s"][0] == pytest.approx(STEPS * 1.0)


def test_a_resume_past_a_shrunk_epoch_ends_that_epoch(tmp_path, monkeypatch):
    """Stopped at step 3 of 5, resumed with 2 steps per epoch (`--allow_changes`): the saved
    step is past the epoch's end, so the epoch ends at once with its 3 steps' sums."""
    clock = Clock()
    _run(tmp_path, clock, monkeypatch, max_steps=3)
    monkeypatch.setattr(sys.modules[__name__], "STEPS", 2)
    ended, data, model, log = _run(tmp_path, clock, monkeypatch)
    assert ended == "done" and data.asked == [(1, 0, 2)]
    assert int(model.optimizer.iterations.numpy()) == 5
    assert log.history()["top1"] == [0.5, 0.5] and log.history()["epoch_time_s"][0] == 3.0


def test_a_signal_saves_at_the_next_step_and_stops(tmp_path, monkeypatch):
    runner_kw = {"on_step": lambda _, done: done == 2 and os.kill(os.getpid(), signal.SIGTERM)}
    with pytest.raises(controller.Interrupted, match="SIGTERM: saved a checkpoint at step 2 of"):
        _run(tmp_path, Clock(), monkeypatch, runner_kw=runner_kw)
    state = checkpoints.Store(str(tmp_path)).restore(_model())
    assert (state.epoch, state.step, state.iterations) == (0, 2, 2)


def test_the_budget_stops_at_the_step_after_which_the_epoch_end_would_overrun(
    tmp_path, monkeypatch
):
    # Steps of 1 s, evaluations of 5 s, 20 s of budget (10 % margin): epoch 1 ends at 10 s
    # with its evaluation; after step 4 of epoch 2 (14 s), step 5 and the evaluation would
    # end at 14 + 1.1 * 6 s: the run stops there, where a step-only estimate would go on.
    clock, kw = Clock(), {"eval_s": 5.0}
    ended, data, _, log = _run(tmp_path, clock, monkeypatch, budget=20, runner_kw=kw, epochs=3)
    assert ended == "budget" and data.asked == [(0, 0, STEPS), (1, 0, STEPS)]
    assert len(log.history()["loss"]) == 1
    restored = checkpoints.Store(str(tmp_path)).restore(_model())
    assert (restored.epoch, restored.step, restored.iterations) == (1, 4, 9)
    # The next process trains at least one step (every resume makes progress).
    ended, data, _, _ = _run(tmp_path, clock, monkeypatch, budget=0.5, runner_kw=kw, epochs=3)
    assert ended == "budget" and data.asked == [(1, 4, 1)]
    assert checkpoints.Store(str(tmp_path)).restore(_model()).epoch == 2


def test_a_non_finite_loss_stops_before_anything_is_saved(tmp_path, monkeypatch):
    with pytest.raises(controller.Diverged, match="The loss became nan by step 5 of epoch 1"):
        _run(tmp_path, Clock(), monkeypatch, runner_kw={"loss": float("nan")})
    assert checkpoints.Store(str(tmp_path)).folders(str(tmp_path)) == []


def test_divergence_stops_the_run_and_keeps_the_finite_checkpoints(tmp_path, monkeypatch):
    """Weights that overflow in epoch 3 while every reported loss is finite: the epoch end
    stops the run before its checkpoint; those of epochs 1 and 2 stay."""

    def overflow(model, done):
        if int(model.optimizer.iterations.numpy()) == 2 * STEPS + 2:
            kernel = model.get_layer("fc").kernel
            kernel.assign(np.full(kernel.shape, np.inf, "float32"))

    with pytest.raises(controller.Diverged, match=r"epoch 3: 1 of \d+ weight tensors"):
        _run(tmp_path, Clock(), monkeypatch, epochs=4, runner_kw={"on_step": overflow})
    saved = checkpoints.Store(str(tmp_path)).folders(str(tmp_path))
    assert [key for key, _ in saved] == [(2, 0), (1, 0)]
    assert (tmp_path / "log.csv").read_text().count("\n") == 3  # the header and 2 rows


def test_non_finite_metrics_or_weights_stop_the_run():
    model = _model()
    with pytest.raises(controller.Diverged, match=r"epoch 5: val_loss=nan not finite"):
        controller.check_finite(model, {"loss": 5.5e23, "val_loss": float("nan")}, 5)
    controller.check_finite(model, {"loss": 5.5e23, "val_loss": 1.0}, 5)  # finite: allowed
    model.get_layer("fc").kernel.assign(np.full((3, 2), np.inf, "float32"))
    with pytest.raises(controller.Diverged, match=r"epoch 3: 1 of \d+ weight tensors"):
        controller.check_finite(model, {}, 3)


def test_time_budget_costs():
    budget = controller.TimeBudget(10, start=0.0)
    budget.note("step", 30.0)  # the first mean includes compiling
    budget.note("step", 1.0)  # the latest mean wins
    budget.note("save", 2.0)
    budget.note("save", 1.0)  # the longest save wins
    budget.note("evaluate", 4.0)
    assert budget.costs == {"step": 1.0, "save": 2.0, "evaluate": 4.0}
