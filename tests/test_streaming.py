"""fit on arrays larger than ``device_data_budget``: streamed from the host in chunks.

Small arrays with a 64 KB budget stand for large ones: the streamed fit equals the fit
that places the arrays (``shuffle=False``), its shuffle covers every row once per epoch,
and resume, callbacks, accumulation, eager runs and ``DataParallel`` work on it. The slow
test trains on a 2 GB memory-mapped ``.npy`` file in a subprocess and checks its peak
resident memory.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import chex
import haiku as hk
import jax
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec
from test_long_runs import Crash, crash_at

import hkfit
from hkfit import _host_rows as host_rows
from hkfit import _stream as stream_lib
from hkfit import callbacks as C
from hkfit import checkpoint
from hkfit._layout import SingleDevice
from hkfit.step import Batch

BUDGET = 64 << 10  # the 1000 training rows below take 92 KB placed: they are streamed

RNG = np.random.default_rng(0)
X = RNG.normal(size=(1000, 20)).astype(np.float32)
Y = RNG.integers(0, 3, 1000)
W = RNG.uniform(0.5, 2.0, 1000).astype(np.float32)


def dropout_forward(x, is_training):
    h = jax.nn.relu(hk.Linear(16)(x))
    if is_training:
        h = hk.dropout(hk.next_rng_key(), 0.2, h)
    return hk.Linear(3)(h)


def batchnorm_forward(x, is_training):
    h = hk.BatchNorm(True, True, 0.9)(hk.Linear(16)(x), is_training)
    return hk.Linear(3)(jax.nn.relu(h))


def new_model(forward=dropout_forward, **kwargs):
    kwargs = {"optimizer": "adam", **kwargs}
    return hkfit.Model(
        forward, loss="sparse_categorical_crossentropy", metrics=["accuracy"], seed=1, **kwargs
    )


def fit(model, x=X, y=Y, **kwargs):
    kwargs = {"batch_size": 30, "epochs": 2, "verbose": 0, "shuffle": False, **kwargs}
    return model.fit(x, y, **kwargs)


def host(tree):
    return jax.tree_util.tree_map(np.asarray, jax.device_get(tree))


def assert_same_training(a, b, history_a, history_b, tolerance=1e-6):
    assert history_a.history.keys() == history_b.history.keys()
    for key in history_a.history:
        np.testing.assert_allclose(history_a.history[key], history_b.history[key], rtol=tolerance)
    chex.assert_trees_all_close(host(a.params), host(b.params), rtol=tolerance, atol=tolerance)
    assert a.step == b.step


@pytest.fixture
def streams(monkeypatch):
    """The TrainStream of every epoch that runs (empty when fit places its arrays)."""
    seen = []
    segments = stream_lib.TrainStream.segments

    def spy(self, *args, **kwargs):
        seen.append(self)
        return segments(self, *args, **kwargs)

    monkeypatch.setattr(stream_lib.TrainStream, "segments", spy)
    return seen


# --- the budget ------------------------------------------------------------------------


def test_the_default_budget_places_small_arrays(streams):
    assert stream_lib.DEFAULT_BUDGET == 2 << 30
    model = new_model()
    fit(model, epochs=1)
    assert not streams


@pytest.mark.parametrize(
    ("value", "error"),
    [(0, ValueError), (-5, ValueError), (True, TypeError), (1.5e9, TypeError), ("2GB", TypeError)],
)
def test_the_budget_is_checked(value, error):
    model = new_model()
    with pytest.raises(error, match=r"`device_data_budget`.*Received: device_data_budget="):
        fit(model, device_data_budget=value)
    assert not model.built


def test_the_budget_counts_rows_as_they_are_placed(monkeypatch):
    # float32 x: 80 bytes, int64 y narrowed to int32: 4, a float32 weight and mask: 8
    assert host_rows.placed_row_bytes(X, Y, None) == 92
    assert host_rows.placed_row_bytes(X.astype(np.float64), Y, W) == 92
    tokens = np.ones((1000, 6), np.float32)  # per-token weights: a weight and mask each
    assert host_rows.placed_row_bytes(X, Y, tokens) == 84 + 2 * 24
    assert stream_lib.exceeds_budget(X, Y, None, 0.0, 91_999)
    assert not stream_lib.exceeds_budget(X, Y, None, 0.0, 92_000)
    assert not stream_lib.exceeds_budget(X, Y, None, 0.5, 91_999)  # 500 training rows
    assert not stream_lib.exceeds_budget(X, Y[:10], None, 0.0, 1)  # left to the usual error
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    assert not stream_lib.exceeds_budget(X, Y, None, 0.0, None)  # several processes: placed
    assert stream_lib.exceeds_budget(X, Y, None, 0.0, 1)
    with pytest.raises(ValueError, match=r"works in one process\. Received: 2 processes"):
        stream_lib.TrainStream(
            None, 1000, 92, 30, SingleDevice(), budget=1, shuffle=False, steps_per_epoch=None
        )


# --- the same training as placed arrays ----------------------------------------------


@pytest.mark.parametrize("forward", [dropout_forward, batchnorm_forward])
def test_without_shuffle_it_trains_as_placed_arrays_do(forward, streams):
    kwargs = {
        "sample_weight": W,
        "class_weight": {0: 1.0, 1: 2.0, 2: 0.5},
        "validation_split": 0.2,  # 800 training rows: 26 batches of 30 and one of 20
    }
    placed, streamed = new_model(forward), new_model(forward)
    placed_history = fit(placed, **kwargs)
    assert not streams
    streamed_history = fit(streamed, device_data_budget=BUDGET, **kwargs)
    assert_same_training(placed, streamed, placed_history, streamed_history)
    stream = streams[0]
    assert (stream.n, stream.batch_size, stream.window_batches) == (800, 30, 5)
    assert stream.plan(jax.random.key(0), 0).num_windows == 6  # windows of 150 rows


def test_steps_per_epoch_accumulation_float64_and_steps_per_execution(streams):
    for kwargs in (
        {"steps_per_epoch": 7},
        {"gradient_accumulation_steps": 2},
        {"x": X.astype(np.float64)},
        {"steps_per_execution": 4},  # executions end at chunk boundaries (5 batches)
    ):
        placed, streamed = new_model(), new_model()
        placed_history = fit(placed, **kwargs)
        streamed_history = fit(streamed, device_data_budget=BUDGET, **kwargs)
        assert_same_training(placed, streamed, placed_history, streamed_history)
    assert len(streams) == 8  # two epochs of each streamed fit
    assert streams[0].steps == 7


def test_run_eagerly_equals_the_compiled_run():
    compiled, eager = new_model(optimizer=optax.sgd(0.1)), new_model(optimizer=optax.sgd(0.1))
    kwargs = {"epochs": 1, "steps_per_epoch": 3, "device_data_budget": BUDGET}
    fit(compiled, **kwargs)
    fit(eager, run_eagerly=True, **kwargs)
    chex.assert_trees_all_close(host(compiled.params), host(eager.params), atol=1e-5)


def test_callbacks_validation_data_and_initial_epoch(streams):
    seen = []
    counter = C.LambdaCallback(
        on_epoch_begin=lambda epoch, logs: seen.append(("epoch", epoch)),
        on_train_batch_end=lambda batch, logs: seen.append(batch),
    )
    model = new_model()
    history = fit(
        model,
        epochs=3,
        initial_epoch=1,
        device_data_budget=BUDGET,
        validation_data=(X[:100], Y[:100]),
        steps_per_execution=1,
        callbacks=[counter],
    )
    assert history.epoch == [1, 2] and "val_loss" in history.history
    steps = list(range(34))  # 1000 rows: 33 batches of 30, then one of 10
    assert seen == [("epoch", 1), *steps, ("epoch", 2), *steps]
    assert model.step == 68 and streams[0].steps == 34


# --- the order of an epoch -------------------------------------------------------------


@pytest.mark.parametrize(
    ("num_rows", "batch_size", "window_batches"),
    [(1003, 16, 5), (100, 10, 3), (40, 8, 5), (7, 8, 1)],
)
def test_each_epoch_takes_every_row_once_in_windows(num_rows, batch_size, window_batches):
    key = jax.random.key(3)

    def rows(epoch, shuffle=True):
        return stream_lib.EpochPlan(
            key,
            epoch,
            num_rows=num_rows,
            batch_size=batch_size,
            window_batches=window_batches,
            shuffle=shuffle,
        ).rows()

    window = batch_size * window_batches
    for epoch in range(3):
        full, tail = rows(epoch)
        again, tail_again = rows(epoch)
        np.testing.assert_array_equal(full, again)  # a function of (key, epoch)
        np.testing.assert_array_equal(
            np.empty(0) if tail is None else tail, np.empty(0) if tail_again is None else tail_again
        )
        assert full.shape == (num_rows // batch_size, batch_size)
        everything = np.concatenate([full.ravel(), [] if tail is None else tail.ravel()])
        np.testing.assert_array_equal(np.sort(everything), np.arange(num_rows))
        assert (tail is None) == (num_rows % batch_size == 0)
        for batch in full:  # a batch takes rows of one window
            assert len(set((batch // window).tolist())) == 1
        if tail is not None:  # the short last batch: the last window's leftover rows
            assert (tail // window == (num_rows - 1) // window).all()
    if num_rows > 2 * batch_size:
        assert not np.array_equal(rows(0)[0], rows(1)[0])  # another order every epoch
    full, tail = rows(0, shuffle=False)
    in_order = np.concatenate([full.ravel(), [] if tail is None else tail.ravel()])
    np.testing.assert_array_equal(in_order, np.arange(num_rows))


def test_a_shuffled_epoch_trains_in_the_plans_order(streams):
    streamed = new_model()
    history = fit(streamed, epochs=1, shuffle=True, device_data_budget=BUDGET)
    full, tail = streams[0].plan(streamed._context().shuffle_key, 0).rows()
    order = np.concatenate([full.ravel(), tail.ravel()])
    assert not np.array_equal(order, np.arange(len(X)))
    placed = new_model()
    placed_history = fit(placed, x=X[order], y=Y[order], epochs=1)
    assert_same_training(placed, streamed, placed_history, history)
    again = new_model()
    fit(again, epochs=1, shuffle=True, device_data_budget=BUDGET)
    chex.assert_trees_all_equal(host(again.params), host(streamed.params))


class Waited:
    """A carry leaf that records when the stream waits for the work before it."""

    def __init__(self, events):
        self.events = events

    def block_until_ready(self):
        self.events.append("wait")
        return self


class FakeProgram:
    """Records the first row of each batch an execution runs, and whether it fused."""

    def __init__(self, events):
        self.events = events

    def train_batches_run(self, ts, fuse, accumulation):
        def run(ts, logs, batches, start, count):
            for b in range(start, start + count):
                row = int(np.asarray(batches.x)[b, 0, 0])
                self.events.append(("run" if fuse else "one", row))
            return ts, logs

        return run


def test_the_next_chunk_is_sent_before_the_work_on_the_previous_is_waited_for():
    events = []

    def read(start, stop):
        events.append(("read", start))
        x = np.arange(start, stop, dtype=np.float32)[:, None]
        ones = np.ones(stop - start, np.float32)
        return Batch(x, x, ones, ones)

    # 15 rows in batches of 2: windows of 2 batches (a chunk of 64 bytes, 16 per row),
    # rows 12 and 13 are the last window's one batch, row 14 the short last batch
    stream = stream_lib.TrainStream(
        read, 15, 16, 2, SingleDevice(), budget=4 * 64, shuffle=False, steps_per_epoch=None
    )
    assert stream.window_batches == 2 and stream.steps == 8
    program = FakeProgram(events)
    segments = stream.segments(program, None, jax.random.key(0), 0, fused=True, single=True)
    assert events == []  # nothing is read before a segment runs
    carry = (Waited(events), None)
    for segment in segments:
        for start in range(segment.num_batches):  # the fused and the loop-free function
            carry = (segment.single if start % 2 else segment.run)(carry, start, 1)
    assert events == [
        ("read", 0),
        ("run", 0),
        ("read", 4),  # sent ahead while chunk 0 computes
        ("one", 2),
        "wait",  # chunk 0 done: dropped
        ("run", 4),
        ("read", 8),
        ("one", 6),
        "wait",
        ("run", 8),
        ("read", 12),  # the last window, which also holds the short last batch
        ("one", 10),
        "wait",
        ("run", 12),
        "wait",
        ("run", 14),
    ]


# --- resume ----------------------------------------------------------------------------


def test_a_mid_epoch_backup_resumes_bit_identically(tmp_path):
    kwargs = {"shuffle": True, "steps_per_execution": 1, "device_data_budget": BUDGET}
    clean = new_model()
    clean_history = fit(clean, **kwargs)
    backup_dir = str(tmp_path / "backup")
    crashed = new_model()
    with pytest.raises(Crash):
        fit(
            crashed,
            callbacks=[crash_at(1, 8), C.BackupAndRestore(backup_dir, save_freq=3)],
            **kwargs,
        )
    meta, _ = checkpoint.read(os.path.join(backup_dir, C.BackupAndRestore.FILENAME))
    # every 3 batches across epochs (34 per epoch): the last save after batch 7 of epoch 1,
    # inside the second window of that epoch
    assert (meta["position"]["epoch"], meta["position"]["batch"]) == (1, 8)
    resumed = new_model()
    backup = C.BackupAndRestore(backup_dir, save_freq=3)
    history = fit(resumed, callbacks=[backup], **kwargs)
    assert (backup.restored_epoch, backup.restored_batch) == (1, 8)
    chex.assert_trees_all_equal(host(resumed.params), host(clean.params))
    chex.assert_trees_all_equal(host(resumed.opt_state), host(clean.opt_state))
    assert history.history == clean_history.history and resumed.step == clean.step


# --- DataParallel ----------------------------------------------------------------------


def test_data_parallel_equals_one_device(monkeypatch):
    placements = []
    put = stream_lib.TrainStream.put

    def spy(self, chunk):
        out = put(self, chunk)
        placements.append(out.x.sharding)
        return out

    monkeypatch.setattr(stream_lib.TrainStream, "put", spy)
    kwargs = {"batch_size": 40, "device_data_budget": BUDGET, "shuffle": True}
    one = new_model(batchnorm_forward, optimizer=optax.sgd(0.05))
    one_history = fit(one, **kwargs)
    assert all(not hasattr(s, "spec") or s.spec == PartitionSpec() for s in placements)
    placements.clear()
    parallel = new_model(
        batchnorm_forward, optimizer=optax.sgd(0.05), distribution=hkfit.DataParallel()
    )
    parallel_history = fit(parallel, **kwargs)
    assert placements and all(s.spec == PartitionSpec(None, "data") for s in placements)
    assert_same_training(one, parallel, one_history, parallel_history, tolerance=1e-5)


# --- memory maps -----------------------------------------------------------------------


def test_memory_maps_are_read_with_file_reads(tmp_path, streams):
    path = str(tmp_path / "x.npy")
    np.save(path, X)
    mapped = np.load(path, mmap_mode="r")
    for view, first in ((mapped, 0), (mapped[10:], 10), (np.asarray(mapped)[300:], 300)):
        reader = host_rows.file_rows(view)
        assert reader is not None
        np.testing.assert_array_equal(reader.read(2, 7), X[first + 2 : first + 7])
    assert host_rows.file_rows(mapped[:, 1:]) is None  # rows not contiguous: sliced
    assert host_rows.file_rows(mapped[::2]) is None
    assert host_rows.file_rows(np.load(path, mmap_mode="c")) is None  # may differ from the file
    assert host_rows.file_rows(X) is None
    in_memory, from_file = new_model(), new_model()
    history = fit(in_memory, device_data_budget=BUDGET, epochs=1)
    file_history = fit(from_file, x=mapped, device_data_budget=BUDGET, epochs=1)
    assert_same_training(in_memory, from_file, history, file_history, tolerance=0)
    assert len(streams) == 2


# --- checks ----------------------------------------------------------------------------


def test_bad_data_is_refused_before_any_step_naming_its_rows():
    bad = X.copy()
    bad[500, 3] = np.nan
    model = new_model()
    with pytest.raises(ValueError, match=r"finite values in `x\[450:600\]`.*x\[450:600\]\[50, 3\]"):
        fit(model, x=bad, device_data_budget=BUDGET)
    assert not model.built  # refused before the first step: the model is left as it was
    labels = Y.copy()
    labels[620] = 3
    with pytest.raises(ValueError, match=r"`y\[600:750\]` to hold integer class indices"):
        fit(new_model(), y=labels, device_data_budget=BUDGET)
    with pytest.raises(ValueError, match=r"absent classes \[7\]"):
        fit(new_model(), class_weight={0: 1.0, 7: 2.0}, device_data_budget=BUDGET)
    with pytest.raises(ValueError, match=r"`sample_weight\[0:150\]` to hold finite values"):
        fit(new_model(), sample_weight=-W, device_data_budget=BUDGET)
    with pytest.raises(ValueError, match=r"validation_split=0\.5.*device_data_budget=30000"):
        fit(new_model(), validation_split=0.5, device_data_budget=30_000)


# --- larger than memory ----------------------------------------------------------------

ROWS, FEATURES, BATCH = 2_000_000, 256, 16384  # 2.05 GB of float32

SCRIPT = textwrap.dedent("""
    import json, resource, sys, time
    import haiku as hk, jax, numpy as np, optax
    import hkfit

    x_path, y_path, budget, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    x = np.load(x_path, mmap_mode="r")
    y = np.load(y_path)
    model = hkfit.Model(lambda x: hk.Linear(1)(x), loss="mse", optimizer=optax.sgd(0.05), seed=0)
    start = time.perf_counter()
    history = model.fit(x, y, batch_size=int(sys.argv[5]), epochs=1, shuffle=False, verbose=0,
                        device_data_budget=budget)
    seconds = time.perf_counter() - start
    params = jax.device_get(model.params)
    np.savez(out, w=np.asarray(params["linear"]["w"]), b=np.asarray(params["linear"]["b"]))
    with open("/proc/self/status") as f:  # this address space's high-water mark
        hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    print(json.dumps({
        "peak_rss_mb": hwm / 1024,
        # Linux carries the high-water mark of the address space that exec replaced (the
        # forking test process's) into ru_maxrss: it is reported, not checked
        "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "fit_seconds": seconds,
        "loss": history.history["loss"][0],
    }))
""")


def _write_dataset(x_path, y_path):
    """A float32 ``.npy`` of ROWS x FEATURES written 100,000 rows at a time, and targets."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=FEATURES).astype(np.float32) / 16
    y = np.empty((ROWS, 1), np.float32)
    step = 100_000
    with open(x_path, "wb") as f:
        header = {"descr": "<f4", "fortran_order": False, "shape": (ROWS, FEATURES)}
        np.lib.format.write_array_header_1_0(f, header)
        for start in range(0, ROWS, step):
            part = rng.standard_normal((step, FEATURES), dtype=np.float32)
            y[start : start + step, 0] = part @ w
            part.tofile(f)
    np.save(y_path, y)


def _available_bytes():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def _train(tmp_path, budget, name):
    out = str(tmp_path / f"{name}.npz")
    result = subprocess.run(
        [
            sys.executable,
            str(tmp_path / "train.py"),
            str(tmp_path / "x.npy"),
            str(tmp_path / "y.npy"),
            str(budget),
            out,
            str(BATCH),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    with np.load(out) as params:
        return report, {k: params[k] for k in params.files}


@pytest.mark.slow
def test_a_memory_map_larger_than_the_budget_trains_in_little_memory(tmp_path):
    if shutil.disk_usage(tmp_path).free < 4 << 30:
        pytest.skip("needs 4 GB of free disk for a 2 GB file")
    if not sys.platform.startswith("linux") or _available_bytes() < 6 << 30:
        pytest.skip("needs Linux and 6 GB of available memory (for the placed comparison)")
    (tmp_path / "train.py").write_text(SCRIPT)
    try:
        _write_dataset(str(tmp_path / "x.npy"), str(tmp_path / "y.npy"))
        streamed, streamed_params = _train(tmp_path, 256 << 20, "streamed")
        placed, placed_params = _train(tmp_path, 8 << 30, "placed")
    finally:
        for name in ("x.npy", "y.npy"):
            (tmp_path / name).unlink(missing_ok=True)
    print(f"\nstreamed (256 MiB budget): {streamed}\nplaced (8 GiB budget): {placed}")
    assert streamed["peak_rss_mb"] < 1024  # the file alone is 1953 MiB
    assert placed["peak_rss_mb"] > 2048  # the comparison did hold the whole array
    np.testing.assert_allclose(streamed["loss"], placed["loss"], rtol=1e-5)
    for key in placed_params:
        np.testing.assert_allclose(streamed_params[key], placed_params[key], rtol=1e-5, atol=1e-6)
