"""training/jax_loop.py: checkpoints in files <= 16 MiB, exact resume, the schedule.

The loop runs on JAX only; under the other backends these tests are skipped (CI runs them
in its JAX pass).
"""

import glob
import os

import keras
import numpy as np
import pytest

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "jax", reason="training/jax_loop.py runs on the JAX backend"
)


@pytest.fixture(scope="module")
def jl():
    from training import jax_loop

    return jax_loop


def _arrays(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "trainable/0000": rng.standard_normal((40, 30)).astype(np.float32),  # 4800 bytes
        "trainable/0001": rng.standard_normal(7).astype(np.float32),
        "optimizer/0000": np.asarray(12, np.int64),
        "optimizer/0001": rng.standard_normal((40, 30)).astype(np.float32),
    }


def test_checkpoint_files_stay_under_the_limit_and_round_trip(jl, tmp_path):
    arrays = _arrays()
    path = jl.save_checkpoint(tmp_path, arrays, {"step": 3}, max_file_bytes=64 * 1024 + 2000)
    shards = sorted(glob.glob(os.path.join(path, "shard-*.npz")))
    assert len(shards) >= 4  # the 4800-byte arrays are split; groups never share a file
    assert all(os.path.getsize(s) <= 64 * 1024 + 2000 for s in shards)
    loaded, meta = jl.load_checkpoint(tmp_path)
    assert meta["step"] == 3 and set(loaded) == set(arrays)
    for k, v in arrays.items():
        np.testing.assert_array_equal(loaded[k], v)
        assert loaded[k].dtype == v.dtype and loaded[k].shape == v.shape


def test_a_corrupt_checkpoint_falls_back_to_the_previous_one(jl, tmp_path, capsys):
    jl.save_checkpoint(tmp_path, _arrays(0), {"step": 1})
    newest = jl.save_checkpoint(tmp_path, _arrays(1), {"step": 2})
    shard = sorted(glob.glob(os.path.join(newest, "shard-*.npz")))[0]
    with open(shard, "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02")
    loaded, meta = jl.load_checkpoint(tmp_path)
    assert meta["step"] == 1
    np.testing.assert_array_equal(loaded["trainable/0000"], _arrays(0)["trainable/0000"])
    assert "does not match its SHA-256" in capsys.readouterr().out
    os.remove(shard)  # truncated/missing weights: not loadable even as weights only
    jl.save_checkpoint(tmp_path, _arrays(2), {"step": 3}, keep=1)
    assert jl.load_checkpoint(tmp_path)[1]["step"] == 3
    assert len(glob.glob(os.path.join(tmp_path, "ckpt-*"))) == 1


def test_weights_travel_without_the_optimizer_files(jl, tmp_path):
    path = jl.save_checkpoint(tmp_path, _arrays(), {"step": 5})
    optimizer_files = glob.glob(os.path.join(path, "*-optimizer.npz"))  # as docs/gpu.md says
    assert optimizer_files and glob.glob(os.path.join(path, "*-trainable.npz"))
    for name in optimizer_files:
        os.remove(name)
    assert jl.load_checkpoint(tmp_path) is None  # strict: the optimizer is missing
    loaded, _ = jl.load_checkpoint(tmp_path, allow_missing=("optimizer",))
    assert sorted(loaded) == ["trainable/0000", "trainable/0001"]


def test_schedule(jl):
    s = jl.Schedule(
        0.1,
        decay="step",
        boundaries=(0.5, 0.75),
        warmup_steps=400,
        warmup="constant",
        warmup_lr=0.01,
    )
    got = [round(float(s(i, 64000)), 5) for i in (0, 399, 400, 31999, 32000, 48000, 63999)]
    assert got == [0.01, 0.01, 0.1, 0.1, 0.01, 0.001, 0.001]
    c = jl.Schedule(0.2, decay="cosine", warmup_steps=10)
    assert float(c(4, 110)) == pytest.approx(0.1)
    assert float(c(60, 110)) == pytest.approx(0.1)
    assert float(c(110, 110)) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="decay='linear'"):
        jl.Schedule(0.1, decay="linear")


@pytest.fixture(scope="module")
def setup(jl):
    """One tiny network (with dropout shortcuts: their seeds are state too), compiled once."""
    import keras_preact

    keras.utils.set_random_seed(0)
    model = keras_preact.PreActResNet(
        depth=8,
        block="basic",
        width_multiplier=0.25,
        shortcut="dropout",
        input_shape=(28, 28, 1),
        classes=10,
        classifier_activation=None,
        seed=3,
    )
    schedule = jl.Schedule(0.1, decay="cosine", warmup_steps=1)
    optimizer = keras.optimizers.SGD(0.1, momentum=0.9)
    normalize = jl.device_normalizer([0.3], [0.3])
    step = jl.make_train_step(
        model, optimizer, schedule=schedule, weight_decay=1e-4, normalize=normalize
    )
    eval_step = jl.make_eval_step(model, normalize=normalize)
    return model, schedule, optimizer, step, eval_step


def _run(jl, setup, run_dir, guard=None):
    model, schedule, optimizer, step, eval_step = setup
    rng = np.random.default_rng(0)
    data = (
        (rng.integers(0, 256, (32, 28, 28, 1), dtype=np.uint8), rng.integers(0, 10, 32)),
        (rng.integers(0, 256, (12, 28, 28, 1), dtype=np.uint8), rng.integers(0, 10, 12)),
    )
    spec = jl.RunSpec(batch_size=8, epochs=3, steps_per_epoch=2, eval_batch_size=8)
    return jl.fit(
        state=jl.init_state(model, optimizer, total_steps=6),
        train_step=step,
        eval_step=eval_step,
        data=data,
        spec=spec,
        augment=jl.Augment(erasing=0.5),
        run_dir=str(run_dir),
        guard=guard,
        schedule=schedule,
        iteration_index=jl.iteration_index(optimizer),
        verbose=False,
    )


class _StopAfterFirstEpoch:
    def fits(self, cost_s):
        return False


def test_a_stopped_run_resumes_exactly(jl, setup, tmp_path):
    whole = _run(jl, setup, tmp_path / "whole")
    assert whole["status"] == "done" and whole["epoch"] == 3
    first = _run(jl, setup, tmp_path / "cut", guard=_StopAfterFirstEpoch())
    assert first["status"] == "stopped" and first["epoch"] == 1
    second = _run(jl, setup, tmp_path / "cut")
    assert second["status"] == "done" and second["epoch"] == 3
    # Same batches, augmentation, dropout masks and optimizer state: the same weights.
    for a, b in zip(
        jl.state_arrays(whole["state"]).values(), jl.state_arrays(second["state"]).values()
    ):
        np.testing.assert_array_equal(a, b)
    assert [r["train_loss"] for r in whole["rows"]] == [r["train_loss"] for r in second["rows"]]
    # A finished run is not trained again.
    again = _run(jl, setup, tmp_path / "cut")
    assert again["status"] == "done" and len(again["rows"]) == len(second["rows"])
    # Another run's folder is refused with the differences named.
    other = tmp_path / "other"
    _run(jl, setup, other, guard=_StopAfterFirstEpoch())
    import json

    latest = json.load(open(other / "latest.json"))["checkpoint"]
    manifest_path = other / latest / "manifest.json"
    manifest = json.load(open(manifest_path))
    manifest["meta"]["spec"]["batch_size"] = 16
    json.dump(manifest, open(manifest_path, "w"))
    with pytest.raises(ValueError, match="batch_size: checkpoint 16 vs now 8"):
        _run(jl, setup, other)


def test_resume_from_weights_alone_keeps_the_step_count(jl, setup, tmp_path):
    _run(jl, setup, tmp_path, guard=_StopAfterFirstEpoch())
    import json
    import shutil

    latest = json.load(open(tmp_path / "latest.json"))["checkpoint"]
    for path in glob.glob(str(tmp_path / latest / "*-optimizer.npz")):
        os.remove(path)
    for old in glob.glob(str(tmp_path / "ckpt-*")):
        if not old.endswith(latest):
            shutil.rmtree(old)
    resumed = _run(jl, setup, tmp_path)
    assert resumed["status"] == "done" and resumed["epoch"] == 3
    # The step counter (hence the learning rate) continued from step 2, not from 0.
    assert int(resumed["state"].optimizer[0]) == 6
