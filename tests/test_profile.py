"""Tests for hkfit.callbacks.Profile, TensorBoard(profile_batch=...) and the
``on_exception`` hook that ``fit`` fires when it raises."""

import gzip
import json

import haiku as hk
import jax
import numpy as np
import pytest

import hkfit
from hkfit import _engine as engine
from hkfit import callbacks as C

X = np.random.default_rng(0).normal(size=(64, 4)).astype(np.float32)  # 8 batches of 8
Y = X.sum(axis=1, keepdims=True)


def new_model():
    return hkfit.Model(lambda x: hk.Linear(1)(x), loss="mse", optimizer="sgd", seed=0)


def fit(model, callbacks, epochs=2, **kwargs):
    return model.fit(X, Y, batch_size=8, epochs=epochs, verbose=0, callbacks=callbacks, **kwargs)


class Counter(C.Callback):
    """Counts the training batches begun and ended over a fit call (put it first)."""

    def __init__(self):
        super().__init__()
        self.begun = self.ended = self.base = 0

    def wants_batch_logs(self, hook=None):  # as Profile: every batch, never its logs
        return hook in (None, "on_train_batch_begin")

    def on_train_begin(self, logs=None):
        self.begun = self.ended = self.base = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.base = self.ended

    def on_train_batch_begin(self, batch, logs=None):
        self.begun = self.base + batch + 1

    def on_train_batch_end(self, batch, logs=None):
        self.ended = self.base + batch + 1


class Calls(list):
    def __init__(self):
        super().__init__()
        self.counter = Counter()


@pytest.fixture
def calls(monkeypatch):
    """Replaces the profiler's start/stop with recorders of (event, batches begun, ended)."""
    recorded = Calls()
    counter = recorded.counter
    monkeypatch.setattr(
        jax.profiler,
        "start_trace",
        lambda log_dir, **kw: recorded.append(("start", counter.begun, counter.ended)),
    )
    monkeypatch.setattr(
        jax.profiler,
        "stop_trace",
        lambda: recorded.append(("stop", counter.begun, counter.ended)),
    )
    return recorded


def trace_files(log_dir):
    runs = sorted((log_dir / "plugins" / "profile").iterdir())
    return runs, {p.name: p.stat().st_size for p in runs[-1].iterdir()}


def test_profile_writes_a_trace_for_tensorboard_and_perfetto(tmp_path):
    profile = C.Profile(batches=(2, 3), log_dir=tmp_path, create_perfetto_trace=True)
    fit(new_model(), [profile], epochs=1)
    runs, files = trace_files(tmp_path)
    assert len(runs) == 1
    xplanes = [name for name in files if name.endswith(".xplane.pb")]
    assert xplanes and all(files[name] > 0 for name in xplanes), files
    assert files.get("perfetto_trace.json.gz", 0) > 0, files
    with gzip.open(runs[0] / "perfetto_trace.json.gz") as f:
        events = json.load(f)
    names = {e.get("name") for e in events.get("traceEvents", events)}
    assert "train" in names  # the step annotations of the window
    assert not profile.tracing


def test_the_window_is_exact_across_epochs(calls):
    """batches=(3, 10): starts before the 3rd batch, stops after the 10th (epoch 2)."""

    class Spy(C.Profile):
        def on_train_batch_end(self, batch, logs=None):
            self.logs.append(logs)
            super().on_train_batch_end(batch, logs)

    profile = Spy(batches=(3, 10))
    profile.logs = []
    fit(new_model(), [calls.counter, profile], epochs=2)
    assert list(calls) == [("start", 3, 2), ("stop", 10, 10)]
    # every batch is its own execution (steps_per_execution="auto" -> 1), and Profile
    # never makes the executor read batch logs (no device sync per batch)
    assert len(profile.logs) == 16 and all(logs == {} for logs in profile.logs)
    cbs = C.CallbackList([C.Profile()])
    assert engine.steps_per_execution_for(cbs, engine.TRAIN, "auto") == 1
    assert not cbs.wants_batch_logs("on_train_batch_end")
    assert engine.steps_per_execution_for(cbs, engine.TEST, "auto") == "auto"


def test_a_single_batch_and_every_fit_call(calls):
    profile = C.Profile(batches=5)
    model = new_model()
    fit(model, [calls.counter, profile], epochs=1)
    fit(model, [calls.counter, profile], epochs=2, initial_epoch=1)  # counts restart per fit
    assert list(calls) == [("start", 5, 4), ("stop", 5, 5)] * 2


def test_fused_executions_are_profiled_whole(calls):
    """steps_per_execution=2: the window grows to the executions holding its edges."""
    fit(new_model(), [calls.counter, C.Profile(batches=(4, 5))], steps_per_execution=2)
    assert list(calls) == [("start", 3, 2), ("stop", 5, 6)]  # executions 3-4 and 5-6


def test_a_short_fit_stops_the_trace_at_train_end(calls):
    fit(new_model(), [calls.counter, C.Profile(batches=(6, 100))], epochs=1)
    assert list(calls) == [("start", 6, 5), ("stop", 8, 8)]


def test_a_window_after_the_end_warns_and_records_nothing(calls):
    with pytest.warns(UserWarning, match=r"ran 8 training batches"):
        fit(new_model(), [calls.counter, C.Profile(batches=(9, 10))], epochs=1)
    assert list(calls) == []


def test_only_process_zero_records(calls, monkeypatch):
    monkeypatch.setattr("hkfit.callbacks.profile.is_main_process", lambda: False)
    fit(new_model(), [calls.counter, C.Profile(batches=(2, 3))], epochs=1)
    assert list(calls) == []


class Boom(C.Callback):
    def __init__(self, at):
        super().__init__()
        self.at = at

    def on_train_batch_end(self, batch, logs=None):
        if batch == self.at:
            raise RuntimeError("boom")


def test_an_exception_in_the_window_stops_the_real_trace(tmp_path):
    profile = C.Profile(batches=(2, 6), log_dir=tmp_path / "a")
    with pytest.raises(RuntimeError, match="boom"):
        fit(new_model(), [profile, Boom(at=3)], epochs=1)
    assert not profile.tracing
    jax.profiler.start_trace(str(tmp_path / "b"))  # raises if a trace were still running
    jax.profiler.stop_trace()
    assert trace_files(tmp_path / "a")[1]  # the partial trace was written


@pytest.mark.parametrize(
    "batches, error",
    [
        (0, ValueError),
        ((0, 3), ValueError),
        ((5, 3), ValueError),
        (-1, ValueError),
        ("10,15", TypeError),
        ((1.0, 2), TypeError),
        ((1, 2, 3), TypeError),
        (True, TypeError),
        (None, TypeError),
    ],
)
def test_bad_batches_are_refused(batches, error):
    with pytest.raises(error, match=r"Expected `batches` to be an int >= 1 .*Received: batches="):
        C.Profile(batches=batches)


def test_tensorboard_profile_batch_writes_to_the_train_run(tmp_path):
    pytest.importorskip("tensorboardX", reason="needs the tensorboard extra")
    tb = C.TensorBoard(tmp_path, profile_batch=(2, 3))
    assert tb.wants_batch_logs("on_train_batch_begin")
    assert not tb.wants_batch_logs("on_train_batch_end")  # no batch logs read
    fit(new_model(), [tb], epochs=1)
    assert trace_files(tmp_path / "train")[1]
    assert not C.TensorBoard(tmp_path).wants_batch_logs()  # profile_batch=0: off
    with pytest.raises(ValueError, match="profile_batch"):
        C.TensorBoard(tmp_path, profile_batch=(3, 1))


# --- on_exception ------------------------------------------------------------------------


class Ends(C.Callback):
    def __init__(self):
        super().__init__()
        self.events = []

    def on_train_end(self, logs=None):
        self.events.append("on_train_end")

    def on_exception(self, exception):
        self.events.append(("on_exception", str(exception)))


class BadCleanup(C.Callback):
    def on_exception(self, exception):
        raise ValueError("cleanup failed")


def test_fit_fires_on_exception_instead_of_on_train_end():
    ends = Ends()
    model = new_model()
    fit(model, [ends], epochs=1)
    assert ends.events == ["on_train_end"]
    ends.events.clear()
    with pytest.raises(RuntimeError, match="boom"), pytest.warns(UserWarning, match="cleanup"):
        fit(model, [BadCleanup(), Boom(at=1), ends], epochs=1)
    assert ends.events == [("on_exception", "boom")]  # still called after BadCleanup raised
