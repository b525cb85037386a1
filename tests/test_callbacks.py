"""keras_preact/train/callbacks.py: the NaN guard and the wall-clock budget."""

import types

import keras
import pytest

from keras_preact.train import callbacks


def test_nan_guard_stops_loudly():
    with pytest.raises(FloatingPointError, match="nan"):
        callbacks.NaNGuard().on_train_batch_end(3, {"loss": float("nan")})
    callbacks.NaNGuard().on_train_batch_end(3, {"loss": 1.0})


def test_time_budget_stops_before_the_epoch_that_would_overrun(monkeypatch):
    """10 s of set-up, then 10 s epochs, within 95 s: the epoch ending at 90 s stops the run,
    since its successor would end at 100 s; every earlier one lets it go on (the one ending
    at 80 s too: its successor ends at 90 s, within the 10 % margin)."""
    clock = types.SimpleNamespace(now=10.0)
    monkeypatch.setattr(callbacks, "time", types.SimpleNamespace(time=lambda: clock.now))
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    budget = callbacks.TimeBudget(95, start=0.0)
    budget.set_model(model)
    model.stop_training = False
    ends = []
    for epoch in range(20):
        budget.on_epoch_begin(epoch)
        clock.now += 10.0
        budget.on_epoch_end(epoch)
        ends.append(clock.now)
        if model.stop_training:
            break
    assert budget.stopped and model.stop_training
    assert ends == [20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0]


def test_time_budget_counts_the_longest_epoch_and_works_without_a_model(monkeypatch):
    """A slow first epoch (compilation) is the estimate of the next ones; the custom loop
    calls the callback without a Keras model attached."""
    clock = types.SimpleNamespace(now=0.0)
    monkeypatch.setattr(callbacks, "time", types.SimpleNamespace(time=lambda: clock.now))
    budget = callbacks.TimeBudget(65, start=0.0)
    for epoch, seconds in enumerate([30.0, 5.0]):
        assert not budget.stopped, epoch
        budget.on_epoch_begin(epoch)
        clock.now += seconds
        budget.on_epoch_end(epoch)
    # After 30 s, 30 + 1.1 * 30 <= 65; after 35 s the next epoch, taken to last as long as
    # the longest (1.1 * 30 s), would end past 65 s.
    assert budget.stopped and budget.longest == 30.0


def test_epoch_logs_time_the_training_not_the_validation():
    """`epoch_time_s` under model.fit ends where validation starts, as in the other loops."""
    import time

    import keras
    import numpy as np

    from keras_preact.train.callbacks import EpochLogs

    class SlowValidation(keras.callbacks.Callback):
        def on_test_end(self, logs=None):
            time.sleep(1.0)

    seen = []
    record = keras.callbacks.LambdaCallback(on_epoch_end=lambda e, logs: seen.append(logs))
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    x = np.zeros((8, 2), "float32")
    model.fit(x, x[:, :1], validation_data=(x, x[:, :1]), epochs=2, verbose=0,
              callbacks=[EpochLogs(), SlowValidation(), record])  # fmt: skip
    assert [round(float(logs["lr"]), 4) for logs in seen] == [0.01, 0.01]
    assert all(0 < logs["epoch_time_s"] < 1.0 for logs in seen), seen
