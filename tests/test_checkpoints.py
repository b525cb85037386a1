"""keras_preact/train/checkpoints.py and runlog.py: one checkpoint is one unit, whatever
stops the save; `log.csv` and the best model follow the committed checkpoint.

Unit tests use a tiny compiled model (all backends, a few seconds) and save the way the
controller does (`controller.Controller.save`); one subprocess test kills a real
`training/cifar.py` run between the checkpoint's writes (jax only: the code under test is
backend-independent).
"""

import csv
import errno
import glob
import json
import os
import shutil
import subprocess
import sys

import keras
import numpy as np
import pytest
from trainer_runs import REPO, small_cnn

from keras_preact.train import checkpoints, config, controller, fs, optimization, runlog


class Killed(BaseException):
    """Stands for SIGKILL in-process: the disk is copied as it was, then the save stops."""


def _model():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8), keras.layers.Dense(3)])
    model.compile(keras.optimizers.SGD(0.1, momentum=0.9), "sparse_categorical_crossentropy")
    return model


def _train(model, steps=3):
    x = np.random.default_rng(0).normal(size=(8, 4)).astype("float32")
    y = np.arange(8) % 3
    for _ in range(steps):
        model.train_on_batch(x, y)


def _values(model):
    variables = list(model.weights) + list(model.optimizer.variables)
    return [keras.ops.convert_to_numpy(v) for v in variables]


def _steps(model):
    return int(keras.ops.convert_to_numpy(model.optimizer.iterations))


def _rows(model_dir):
    path = os.path.join(model_dir, "log.csv")
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return [int(r["epoch"]) for r in csv.DictReader(f)]


def _leftovers(root):
    found = glob.glob(os.path.join(root, "**", "*"), recursive=True)
    found += glob.glob(os.path.join(root, "**", ".*"), recursive=True)
    return [p for p in found if ".tmp" in p]


class Saver:
    """Saves and restores as a run does: `controller.Controller.save`, `Store.restore`."""

    def __init__(self, model_dir):
        self.store = checkpoints.Store(model_dir)
        self.log = runlog.RunLog(model_dir)
        self.model_dir = model_dir

    def save(self, model, *, epoch, logs, step=0):
        class Runner:  # the model's variables are the state
            sync, gather = (lambda self: None), (lambda self, value: [value])
            agree = lambda self, wish: wish  # noqa: E731

        runner = Runner()
        runner.model = model
        cfg = config.get_config(None, "cifar", verbose=0).derive(steps_per_epoch=3)
        ctl = controller.Controller(cfg, runner, None, store=self.store, log=self.log, chief=False)
        iterations = _steps(model)
        if step:
            ctl.save(epoch, step, iterations, partial=controller.add_sums({}, {}))
        else:
            ctl.save(epoch, 0, iterations, logs=logs)

    def restore(self, model):
        restored = self.store.restore(model)
        self.log.restore(restored.state)
        return restored

    def history(self):
        return self.log.history()


def _two_epochs(model_dir, monkeypatch=None, kill_at=None):
    """Trains and saves epoch 1, then epoch 2 (optionally killed at its `kill_at`-th rename).

    Returns the variables after each epoch, and where the disk image of the kill was copied.
    """
    model = _model()
    saver = Saver(model_dir)
    _train(model)
    saver.save(model, epoch=1, logs={"loss": 1.0, "val_top1": 0.5})
    after = {1: _values(model)}
    _train(model)
    after[2] = _values(model)
    image = model_dir + "-image"
    if kill_at is not None:
        calls = []
        real_rename, real_replace = os.rename, os.replace

        def renamer(real):
            def rename(src, dst, *a, **k):
                calls.append(dst)
                if len(calls) == kill_at:
                    shutil.copytree(model_dir, image)  # the disk at the moment of the kill
                    raise Killed(dst)
                return real(src, dst, *a, **k)

            return rename

        monkeypatch.setattr(os, "rename", renamer(real_rename))
        monkeypatch.setattr(os, "replace", renamer(real_replace))
        with pytest.raises(Killed):
            saver.save(model, epoch=2, logs={"loss": 0.5, "val_top1": 0.75})
        monkeypatch.undo()
    else:
        saver.save(model, epoch=2, logs={"loss": 0.5, "val_top1": 0.75})
    return after, image


def _renames_in_a_save(tmp_path, monkeypatch):
    count = []
    for name in ("rename", "replace"):
        real = getattr(os, name)
        monkeypatch.setattr(
            os, name, lambda s, d, *a, _real=real, **k: (count.append(d), _real(s, d, *a, **k))[1]
        )
    model = _model()
    _train(model)
    Saver(str(tmp_path / "count")).save(model, epoch=1, logs={"loss": 1.0, "val_top1": 0.5})
    monkeypatch.undo()
    return len(count)


def test_a_kill_between_the_writes_leaves_one_whole_checkpoint(tmp_path, monkeypatch):
    """Killed before each rename of epoch 2's save in turn, the run resumes at epoch 1 or 2
    with exactly that epoch's weights, optimizer step and log rows, never a mix."""
    renames = _renames_in_a_save(tmp_path, monkeypatch)
    assert renames >= 2
    seen = set()
    for kill_at in range(1, renames + 1):
        model_dir = str(tmp_path / f"run{kill_at}")
        after, image = _two_epochs(model_dir, monkeypatch, kill_at)
        model = _model()
        resumer = Saver(image)
        restored = resumer.restore(model)
        seen.add(restored.epoch)
        assert restored.epoch in (1, 2), kill_at
        assert restored.iterations == _steps(model) == 3 * restored.epoch, (kill_at, restored)
        for a, b in zip(after[restored.epoch], _values(model)):
            np.testing.assert_array_equal(a, b)
        assert _rows(image) == list(range(restored.epoch)), kill_at
        # The resumed run saves the next epochs: no row lost or repeated, no temp file left.
        for epoch in range(restored.epoch + 1, 4):
            _train(model)
            resumer.save(model, epoch=epoch, logs={"loss": 1.0 / epoch, "val_top1": 0.1})
        assert _rows(image) == [0, 1, 2]
        assert _steps(model) == 9
        assert resumer.history()["loss"] == [1.0, 0.5, 1 / 3]
        assert _leftovers(image) == []
    assert seen == {1, 2}  # both sides of the commit were hit


def test_a_truncated_or_corrupt_latest_checkpoint_falls_back(tmp_path, caplog):
    model_dir = str(tmp_path / "run")
    after, _ = _two_epochs(model_dir)
    saved = glob.glob(os.path.join(model_dir, "checkpoints", "**", "*.weights.h5"), recursive=True)
    weights = max(saved, key=os.path.getmtime)  # the latest checkpoint's
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) // 2)
    model = _model()
    with caplog.at_level("WARNING"):
        restored = Saver(model_dir).restore(model)
    assert weights in caplog.text
    assert (restored.epoch, restored.iterations) == (1, 3)
    for a, b in zip(after[1], _values(model)):
        np.testing.assert_array_equal(a, b)
    assert _rows(model_dir) == [0]

    # Same size, other bytes: the hash catches it; a state.json that does not parse too.
    after, _ = _two_epochs(model_dir)
    with open(weights, "r+b") as f:
        f.seek(os.path.getsize(weights) - 8)
        f.write(b"\xff" * 8)
    assert Saver(model_dir).restore(_model()).epoch == 1
    with open(os.path.join(model_dir, "checkpoints", "epoch-0001", "state.json"), "w") as f:
        f.write('{"epoch": ')
    with pytest.raises(RuntimeError, match="epoch-0001/state.json.*JSONDecodeError") as e:
        Saver(model_dir).restore(_model())
    assert weights in str(e.value) and "Delete that folder" in str(e.value)


def _full_disk(monkeypatch, where):
    """Makes the next write of `where` fail as a full disk does."""
    full = OSError(errno.ENOSPC, "No space left on device")
    if where == "weights":
        import h5py

        real = h5py.Group.create_dataset

        def create_dataset(self, *a, **k):
            real(self, *a, **k)  # a partial file stays open, as on a real full disk
            raise full

        monkeypatch.setattr(h5py.Group, "create_dataset", create_dataset)
    else:
        real_dump = json.dump

        def dump(obj, f, *a, **k):
            if "epoch" in obj:
                f.write('{"epoch"')
                raise full
            return real_dump(obj, f, *a, **k)

        monkeypatch.setattr(json, "dump", dump)


@pytest.mark.parametrize("where", ["weights", "state"])
def test_a_full_disk_gives_one_clear_error_and_leaves_the_previous_checkpoint(
    tmp_path, monkeypatch, where
):
    model_dir = str(tmp_path / "run")
    model = _model()
    saver = Saver(model_dir)
    _train(model)
    saver.save(model, epoch=1, logs={"loss": 1.0})
    epoch1 = _values(model)
    _train(model)
    _full_disk(monkeypatch, where)
    with pytest.raises(OSError, match="No space left on device") as e:
        saver.save(model, epoch=2, logs={"loss": 0.5})
    monkeypatch.undo()
    assert e.value.errno == errno.ENOSPC
    assert os.path.join(model_dir, "checkpoints", "epoch-0002") in str(e.value)
    assert _leftovers(model_dir) == []
    import h5py

    still_open = [fid.name for fid in h5py.h5f.get_obj_ids(types=h5py.h5f.OBJ_FILE)]
    assert not [n for n in still_open if str(tmp_path).encode() in n], still_open
    fresh = _model()
    assert Saver(model_dir).restore(fresh).epoch == 1
    for a, b in zip(epoch1, _values(fresh)):
        np.testing.assert_array_equal(a, b)
    # With room again, the same save goes through.
    saver.save(model, epoch=2, logs={"loss": 0.5})
    assert Saver(model_dir).restore(_model()).epoch == 2


def test_a_full_disk_on_the_other_files(tmp_path, monkeypatch):
    """config.json / summary.json and final / best weights: same error, no temp file."""
    model = _model()
    _train(model)
    _full_disk(monkeypatch, "weights")
    path = str(tmp_path / "final.weights.h5")
    with pytest.raises(OSError, match=f"Could not write {path}: No space left"):
        checkpoints.save_model_weights(model, path)
    monkeypatch.undo()
    monkeypatch.setattr(
        json, "dump", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full"))
    )
    with pytest.raises(OSError, match="summary.json: No space left"):
        runlog.write_summary(str(tmp_path), {"epochs_run": 1})
    monkeypatch.undo()
    assert os.listdir(tmp_path) == []


def test_a_rerun_after_deleting_checkpoints_keeps_the_better_best(tmp_path):
    model_dir = str(tmp_path / "run")
    good = _model()
    _train(good)
    Saver(model_dir).save(good, epoch=1, logs={"val_top1": 0.681})
    shutil.rmtree(os.path.join(model_dir, "checkpoints"))
    worse = _model()
    rerun = Saver(model_dir)
    assert rerun.restore(worse).epoch == 0
    _train(worse, 1)
    rerun.save(worse, epoch=1, logs={"val_top1": 0.1015})
    best = _model()
    best.load_weights(os.path.join(model_dir, "best.weights.h5"))
    for a, b in zip(good.get_weights(), best.get_weights()):
        np.testing.assert_array_equal(a, b)
    # The file carries its own record, written with it in one atomic write.
    assert runlog.RunLog(model_dir).best == 0.681
    # The rerun's log starts over (its epochs are new); the earlier one is kept aside.
    assert _rows(model_dir) == [0]
    (kept,) = glob.glob(os.path.join(model_dir, "log.replaced-*.csv"))
    assert open(kept).read().splitlines()[1].startswith("0,")


def test_the_previous_format_still_resumes(tmp_path):
    """A checkpoint folder of the previous version (renamed into place whole; `state.json`
    with `steps` and `step_in_epoch`) resumes; its leftover temporary folder is removed."""
    model_dir = tmp_path / "run"
    folder = model_dir / "checkpoints" / "epoch-0001"
    folder.mkdir(parents=True)
    (model_dir / "checkpoints" / ".tmp-epoch-0002-123").mkdir()
    model = _model()
    _train(model)
    model.save_weights(str(folder / "model.weights.h5"))
    weights = str(folder / "model.weights.h5")
    record = {"bytes": os.path.getsize(weights), "sha256": checkpoints.digest(weights)}
    state = {"format": 2, "epoch": 1, "step_in_epoch": 0, "steps": 3, "best": 0.5,
             "rows": [{"epoch": 0, "loss": 1.0}], "weights": record}  # fmt: skip
    (folder / "state.json").write_text(json.dumps(state))
    (model_dir / "log.csv").write_text("epoch,loss\n0,1.0\n1,0.9\n")  # a row after it
    fresh = _model()
    saver = Saver(str(model_dir))
    restored = saver.restore(fresh)
    assert (restored.epoch, restored.step, restored.iterations) == (1, 0, 3)
    assert _rows(model_dir) == [0]
    _train(fresh)
    saver.save(fresh, epoch=2, logs={"loss": 0.5})
    assert sorted(os.listdir(model_dir / "checkpoints")) == ["epoch-0001", "epoch-0002"]
    assert _rows(model_dir) == [0, 1] and saver.history()["loss"] == [1.0, 0.5]


def test_atomic_weights_and_json(tmp_path):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    path = str(tmp_path / "w.weights.h5")
    checkpoints.save_weights(model, path)
    fs.write_json_atomic(str(tmp_path / "s.json"), {"epoch": 1})
    assert sorted(os.listdir(tmp_path)) == ["s.json", "w.weights.h5"]


@pytest.mark.parametrize("loop", ["fit", "custom"])
def test_checkpointer_restores_the_optimizer(tmp_path, loop):
    """The checkpoint of either loop's model holds the optimizer's step and momentum."""

    def compiled_model():
        keras.utils.set_random_seed(0)
        model = small_cnn()
        schedule = optimization.WarmupSchedule(0.1, 10, decay="cosine", warmup_steps=2)
        optimizer = keras.optimizers.SGD(schedule, momentum=0.9)
        if loop == "fit":
            model.compile(optimizer, optimization.SparseCrossentropy())
        else:  # what modeling.build does for the custom loop
            model.compile(optimizer=optimizer)
        optimizer.build(model.trainable_variables)
        return model

    def numpy_values(variables):
        return [keras.ops.convert_to_numpy(v) for v in variables]

    model = compiled_model()
    variables = model.trainable_variables
    for i in range(3):  # three optimizer steps, as either loop makes them
        grads = [
            keras.ops.convert_to_tensor(np.full(v.shape, i + 1.0, "float32")) for v in variables
        ]
        model.optimizer.apply(grads, variables)
    Saver(str(tmp_path)).save(model, epoch=1, logs={"loss": 1.0})
    fresh = compiled_model()
    assert int(keras.ops.convert_to_numpy(fresh.optimizer.iterations)) == 0
    restored = Saver(str(tmp_path)).restore(fresh)
    assert restored.epoch == 1 and restored.iterations == 3
    saved, loaded = numpy_values(model.optimizer.variables), numpy_values(fresh.optimizer.variables)
    assert len(saved) == len(loaded) > 2
    for a, b in zip(saved, loaded):
        np.testing.assert_array_equal(a, b)
    assert all(np.any(m) for m in loaded[2:])  # the momentum buffers are not zero
    for a, b in zip(numpy_values(model.weights), numpy_values(fresh.weights)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(
        float(keras.ops.convert_to_numpy(fresh.optimizer.learning_rate)),
        float(keras.ops.convert_to_numpy(model.optimizer.learning_rate)),
    )


def test_checkpointer_refuses_a_model_without_optimizer(tmp_path):
    with pytest.raises(ValueError, match="compile it with its optimizer"):
        checkpoints.Store(str(tmp_path)).save(small_cnn(), epoch=1, state={})


# Runs training/cifar.py, SIGKILLed right after the rename that puts epoch 2's weights in
# place (the K-th rename into checkpoints/ of a weights file).
_KILLER = r"""
import os, re, runpy, signal, sys
pattern, nth = re.compile(os.environ["KILL_AFTER_RENAME"]), int(os.environ["KILL_NTH"])
seen = []
def wrap(real):
    def rename(src, dst, *a, **k):
        out = real(src, dst, *a, **k)
        if pattern.search(str(dst)):
            seen.append(dst)
            if len(seen) == nth:
                os.kill(os.getpid(), signal.SIGKILL)
        return out
    return rename
os.rename, os.replace = wrap(os.rename), wrap(os.replace)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow  # two trainer processes: 46 s on 2 busy cores, 1 epoch trained in all
@pytest.mark.skipif(
    keras.backend.backend() != "jax", reason="backend-independent; run once, under jax"
)
def test_cifar_killed_between_the_writes_resumes_exactly(tmp_path):
    """A real run SIGKILLed right after epoch 2's weights land, before its state.json (the
    commit), resumes at epoch 1: it ends with the planned steps, one log row per epoch and
    a summary of the whole run. (The exact batch order across a resume, and so the final
    weights, are checked by test_training_cifar.py.)"""
    from test_training_cifar import _cifar_cmd
    from trainer_runs import fake_cifar, run

    data = fake_cifar(tmp_path / "data")
    model_dir = tmp_path / "run"
    cmd = _cifar_cmd(data, model_dir, "--epochs=2", "--steps_per_epoch=2", "--pipeline=numpy")
    env = dict(
        os.environ,
        KILL_AFTER_RENAME=r"checkpoints/epoch-\d+/model\.weights\.h5$",
        KILL_NTH="2",
    )
    first = subprocess.run(
        [sys.executable, "-c", _KILLER, *cmd[1:]], cwd=REPO, env=env, capture_output=True
    )
    assert first.returncode == -9, first.stdout[-2000:] + first.stderr[-2000:]
    rerun = run(cmd)
    assert "1 epoch(s) done, optimizer step 2," in rerun.stdout
    summary = json.loads((model_dir / "summary.json").read_text())
    assert summary["steps"] == 4, summary  # no epoch trained twice
    assert summary["epochs_run"] == 2 and len(summary["train_loss_per_epoch"]) == 2
    assert summary["resumed_from_epoch"] == 1 and summary["epochs_run_this_process"] == 1
    assert _rows(str(model_dir)) == [0, 1]
    assert _leftovers(str(model_dir)) == []
