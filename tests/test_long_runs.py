"""Long runs: checkpoint retention, asynchronous saves, mid-epoch resume, preemption,
the double backup, TerminateOnNaN, and fits on many dataset sizes."""

import json
import os
import resource
import signal
import subprocess
import sys
import textwrap

import chex
import haiku as hk
import jax
import numpy as np
import pytest

import hkfit
from hkfit import _compat, checkpoint
from hkfit import callbacks as C


def forward(x, is_training):
    h = jax.nn.relu(hk.Linear(8)(x))
    if is_training:
        h = hk.dropout(hk.next_rng_key(), 0.3, h)
    return hk.Linear(3)(h)


RNG = np.random.default_rng(0)
X = RNG.normal(size=(40, 5)).astype(np.float32)
Y = np.arange(40) % 3


def new_model(**kwargs):
    return hkfit.Model(
        forward,
        loss="sparse_categorical_crossentropy",
        optimizer="adam",
        metrics=["accuracy"],
        seed=3,
        **kwargs,
    )


def host(tree):
    return jax.tree_util.tree_map(np.asarray, jax.device_get(tree))


def fit(model, callbacks, epochs=3, **kwargs):
    kwargs = {"batch_size": 8, "verbose": 0, "steps_per_execution": 1, **kwargs}
    return model.fit(X, Y, epochs=epochs, callbacks=callbacks, **kwargs)


class Crash(Exception):
    pass


def crash_at(epoch, batch):
    """Raises after batch ``batch`` (0-based) of epoch ``epoch``."""
    now = {}

    def on_batch_end(b, logs):
        if now.get("epoch") == epoch and b >= batch:
            raise Crash(f"crash in epoch {epoch} after batch {b}")

    return C.LambdaCallback(
        on_epoch_begin=lambda e, logs: now.update(epoch=e), on_train_batch_end=on_batch_end
    )


@pytest.fixture(scope="module")
def clean_run():
    """An uninterrupted 3-epoch run: (params, opt_state, history, step)."""
    model = new_model()
    history = fit(model, [])
    return host(model.params), host(model.opt_state), history.history, model.step


# --- retention -------------------------------------------------------------------------


def test_max_to_keep_keeps_the_newest_and_never_touches_other_files(tmp_path):
    (tmp_path / "notes-01.npz").write_text("not a checkpoint")  # not matching the pattern
    (tmp_path / "model-other.txt").write_text("unrelated")
    pattern = str(tmp_path / "model-{epoch:02d}.npz")
    model = new_model()
    fit(model, [C.ModelCheckpoint(pattern, max_to_keep=2)], epochs=4)
    assert sorted(os.listdir(tmp_path)) == [
        "model-03.npz",
        "model-04.npz",
        "model-other.txt",
        "notes-01.npz",
    ]
    # A new callback (a restarted run) rediscovers the two files and keeps counting.
    again = C.ModelCheckpoint(pattern, max_to_keep=2)
    fit(model, [again], epochs=6, initial_epoch=4)
    names = sorted(n for n in os.listdir(tmp_path) if n.startswith("model-0"))
    assert names == ["model-05.npz", "model-06.npz"]
    assert [os.path.basename(p) for p, _ in again.kept] == names


def test_max_to_keep_with_save_best_only_keeps_the_best_files(tmp_path):
    pattern = str(tmp_path / "best-{epoch:02d}-{loss:.5f}.npz")
    losses = iter([0.9, 0.5, 0.7, 0.3, 0.4, 0.2])

    class FakeLoss(C.Callback):  # runs before the checkpoint: a known sequence of values
        def on_epoch_end(self, epoch, logs=None):
            logs["loss"] = next(losses)

    checkpoint_cb = C.ModelCheckpoint(pattern, monitor="loss", save_best_only=True, max_to_keep=2)
    fit(new_model(), [FakeLoss(), checkpoint_cb], epochs=4)
    # saves at 0.9, 0.5, 0.3 (0.7 did not improve): the best two stay
    assert sorted(os.listdir(tmp_path)) == ["best-02-0.50000.npz", "best-04-0.30000.npz"]
    restarted = C.ModelCheckpoint(pattern, monitor="loss", save_best_only=True, max_to_keep=2)
    fit(new_model(), [FakeLoss(), restarted], epochs=2)  # 0.4 does not beat 0.3; 0.2 does
    assert restarted.best == 0.2
    assert sorted(os.listdir(tmp_path)) == ["best-02-0.20000.npz", "best-04-0.30000.npz"]


def test_retention_arguments_are_checked(tmp_path):
    with pytest.raises(ValueError, match="max_to_keep"):
        C.ModelCheckpoint(str(tmp_path / "m.npz"), max_to_keep=0)
    with pytest.raises(ValueError, match=r"\{val_loss:.4f\}"):
        C.ModelCheckpoint(str(tmp_path / "m-{epoch}.npz"), save_best_only=True, max_to_keep=2)


# --- asynchronous saves ----------------------------------------------------------------


def test_asynchronous_saves_write_what_synchronous_saves_write(tmp_path):
    sync_model, async_model = new_model(), new_model()
    fit(sync_model, [C.ModelCheckpoint(str(tmp_path / "sync-{epoch}.npz"))])
    fit(
        async_model,
        [C.ModelCheckpoint(str(tmp_path / "async-{epoch}.npz"), asynchronous=True)],
    )
    for epoch in (1, 2, 3):
        a, _ = checkpoint.read(tmp_path / f"sync-{epoch}.npz")
        b, _ = checkpoint.read(tmp_path / f"async-{epoch}.npz")
        assert a["entries"] == b["entries"] and a["history"] == b["history"]
        left = new_model().load(str(tmp_path / f"sync-{epoch}.npz"))
        right = new_model().load(str(tmp_path / f"async-{epoch}.npz"))
        chex.assert_trees_all_equal(host(left.params), host(right.params))
        chex.assert_trees_all_equal(host(left.opt_state), host(right.opt_state))


def test_a_failed_background_write_is_raised_on_the_training_thread(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the checkpoint directory should be")
    model = new_model()
    with pytest.raises(OSError):
        fit(
            model,
            [C.ModelCheckpoint(str(blocker / "m-{epoch}.npz"), asynchronous=True)],
            epochs=3,
        )
    assert model.epoch in (1, 2)  # raised at a hook after the failed write, not at the end


def test_pending_saves_are_waited_for_when_fit_raises(tmp_path):
    model = new_model()
    with pytest.raises(Crash):
        fit(
            model,
            [
                C.ModelCheckpoint(str(tmp_path / "m-{epoch}.npz"), asynchronous=True),
                crash_at(1, 2),
            ],
        )
    meta, _ = checkpoint.read(tmp_path / "m-1.npz")  # complete and readable
    assert meta["epoch"] == 1


# --- mid-epoch resume ------------------------------------------------------------------


def test_mid_epoch_backup_resumes_at_the_next_batch_bit_identically(tmp_path, clean_run):
    params, opt_state, history, step = clean_run
    backup_dir = str(tmp_path / "backup")
    model = new_model()
    with pytest.raises(Crash):
        fit(model, [crash_at(1, 2), C.BackupAndRestore(backup_dir, save_freq=2)])
    meta, _ = checkpoint.read(os.path.join(backup_dir, C.BackupAndRestore.FILENAME))
    # every 2 batches, counted across epochs (5 per epoch): the last at batch 1 of epoch 1
    assert meta["position"]["epoch"] == 1 and meta["position"]["batch"] == 1

    resumed = new_model()
    backup = C.BackupAndRestore(backup_dir, save_freq=2)
    resumed_history = fit(resumed, [backup])
    assert (backup.restored_epoch, backup.restored_batch) == (1, 1)
    chex.assert_trees_all_equal(host(resumed.params), params)
    chex.assert_trees_all_equal(host(resumed.opt_state), opt_state)
    assert resumed.step == step
    assert resumed_history.history == history  # the resumed epoch's logs cover every batch
    assert not os.path.exists(backup_dir)


class StatefulBatches:
    """An iterable whose iterators have get_state / set_state (like grain's)."""

    def __init__(self, x, y, batch_size):
        self.x, self.y, self.batch_size = x, y, batch_size
        self.served = []

    def __iter__(self):
        return StatefulIterator(self)


class StatefulIterator:
    def __init__(self, source):
        self.source, self.position = source, 0

    def __next__(self):
        start = self.position * self.source.batch_size
        if start >= len(self.source.x):
            raise StopIteration
        self.position += 1
        self.source.served.append(start)
        stop = start + self.source.batch_size
        return self.source.x[start:stop], self.source.y[start:stop]

    def __iter__(self):
        return self

    def get_state(self):
        return {"position": self.position}

    def set_state(self, state):
        self.position = state["position"]


def test_an_iterator_with_get_state_resumes_at_the_exact_next_batch(tmp_path):
    backup_dir = str(tmp_path / "backup")
    clean_data = StatefulBatches(X, Y, 8)
    clean = new_model()
    clean.fit(clean_data, epochs=2, verbose=0)

    data = StatefulBatches(X, Y, 8)
    model = new_model()
    with pytest.raises(Crash):
        model.fit(
            data,
            epochs=2,
            verbose=0,
            callbacks=[C.BackupAndRestore(backup_dir, save_freq=1), crash_at(1, 1)],
        )
    resumed_data = StatefulBatches(X, Y, 8)
    resumed = new_model()
    resumed.fit(
        resumed_data, epochs=2, verbose=0, callbacks=[C.BackupAndRestore(backup_dir, save_freq=1)]
    )
    assert resumed_data.served == [16, 24, 32]  # epoch 2 after its first two batches
    chex.assert_trees_all_equal(host(resumed.params), host(clean.params))


def test_a_grain_dataset_resumes_at_the_exact_next_batch(tmp_path):
    grain = pytest.importorskip("grain", reason="needs grain: pip install -e '.[grain]'")
    dataset = (
        grain.MapDataset.source(list(range(len(X))))
        .shuffle(seed=1)
        .map(lambda i: (X[i], Y[i]))
        .batch(8)
    )
    clean = new_model()
    clean.fit(dataset, epochs=2, verbose=0)
    backup_dir = str(tmp_path / "backup")
    with pytest.raises(Crash):
        new_model().fit(
            dataset,
            epochs=2,
            verbose=0,
            callbacks=[C.BackupAndRestore(backup_dir, save_freq=1), crash_at(1, 2)],
        )
    meta, _ = checkpoint.read(os.path.join(backup_dir, C.BackupAndRestore.FILENAME))
    assert meta["position"]["iterator"] is not None
    resumed = new_model()
    resumed.fit(dataset, epochs=2, verbose=0, callbacks=[C.BackupAndRestore(backup_dir)])
    chex.assert_trees_all_equal(host(resumed.params), host(clean.params))


# --- preemption --------------------------------------------------------------------------


SCRIPT = textwrap.dedent("""
    import json, sys, time
    import haiku as hk, jax, numpy as np
    import hkfit
    from hkfit import callbacks as C

    backup_dir, out = sys.argv[1], sys.argv[2]

    def forward(x, is_training):
        h = jax.nn.relu(hk.Linear(16)(x))
        if is_training:
            h = hk.dropout(hk.next_rng_key(), 0.3, h)
        return hk.Linear(3)(h)

    rng = np.random.default_rng(0)
    x = rng.normal(size=(48, 5)).astype(np.float32)
    y = rng.integers(0, 3, 48)
    model = hkfit.Model(forward, loss="sparse_categorical_crossentropy", optimizer="adam",
                        metrics=["accuracy"], seed=3)

    def on_batch_end(batch, logs):
        print("batch", batch, flush=True)
        time.sleep(0.02)

    callbacks = [C.LambdaCallback(on_train_batch_end=on_batch_end),
                 C.BackupAndRestore(backup_dir, save_freq=3)]
    history = model.fit(x, y, epochs=6, batch_size=8, verbose=0, steps_per_execution=1,
                        callbacks=callbacks)
    np.savez(out + ".npz", *[np.asarray(a) for a in jax.tree_util.tree_leaves(model.params)])
    with open(out + ".json", "w") as f:
        json.dump({"epoch": history.epoch, "history": history.history, "step": model.step}, f)
""")


def _script_env(tmp_path):
    env = dict(os.environ)
    env.update(
        JAX_COMPILATION_CACHE_DIR=str(tmp_path / "xla_cache"),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
    return env


def _outputs(out):
    with np.load(out + ".npz", allow_pickle=False) as npz:
        params = [npz[k] for k in sorted(npz.files, key=lambda k: int(k.split("_")[1]))]
    with open(out + ".json") as f:
        return params, json.load(f)


@pytest.mark.slow
def test_sigterm_writes_a_backup_stops_and_a_rerun_is_bit_identical(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    env = _script_env(tmp_path)
    run = [sys.executable, str(script)]
    clean = subprocess.run(
        [*run, str(tmp_path / "clean_backup"), str(tmp_path / "clean")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert clean.returncode == 0, clean.stderr

    backup_dir = str(tmp_path / "backup")
    child = subprocess.Popen(
        [*run, backup_dir, str(tmp_path / "stopped")],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    seen = 0
    for line in child.stdout:  # send SIGTERM in the middle of the run
        seen += line.startswith("batch")
        if seen == 14:  # epoch 3 of 6 (6 batches per epoch)
            child.send_signal(signal.SIGTERM)
            break
    _, stderr = child.communicate(timeout=120)
    assert child.returncode == 1, stderr
    assert "stopped by SIGTERM" in stderr and "Run the same script again" in stderr
    assert not os.path.exists(tmp_path / "stopped.json")
    meta, _ = checkpoint.read(os.path.join(backup_dir, C.BackupAndRestore.FILENAME))
    assert meta["epoch"] == 2 and meta["position"]["batch"] in (2, 3, 4, 5)

    resumed = subprocess.run(
        [*run, backup_dir, str(tmp_path / "resumed")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr
    clean_params, clean_log = _outputs(str(tmp_path / "clean"))
    resumed_params, resumed_log = _outputs(str(tmp_path / "resumed"))
    assert resumed_log == clean_log
    for a, b in zip(resumed_params, clean_params, strict=True):
        assert a.dtype == b.dtype and np.array_equal(a, b)


def test_the_sigterm_handler_is_restored_after_fit(tmp_path):
    def mine(signum, frame):
        pass

    previous = signal.signal(signal.SIGTERM, mine)
    try:
        fit(new_model(), [C.BackupAndRestore(str(tmp_path / "b"))], epochs=1)
        assert signal.getsignal(signal.SIGTERM) is mine
        with pytest.raises(Crash):
            fit(new_model(), [crash_at(0, 1), C.BackupAndRestore(str(tmp_path / "c"))])
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, previous)


# --- double checkpoint, NaN --------------------------------------------------------------


def test_a_damaged_newest_backup_falls_back_to_the_previous_one(tmp_path, clean_run):
    params, _, history, _ = clean_run
    backup_dir = tmp_path / "backup"
    with pytest.raises(Crash):
        fit(new_model(), [crash_at(2, 1), C.BackupAndRestore(str(backup_dir))])
    newest = backup_dir / C.BackupAndRestore.FILENAME
    previous = backup_dir / C.BackupAndRestore.PREVIOUS
    assert checkpoint.read(previous)[0]["epoch"] == 1
    newest.write_bytes(newest.read_bytes()[:300])  # truncated
    model = new_model()
    backup = C.BackupAndRestore(str(backup_dir))
    with pytest.warns(UserWarning, match="training_state.npz"):
        resumed_history = fit(model, [backup])
    assert backup.restored_epoch == 1
    chex.assert_trees_all_equal(host(model.params), params)
    assert resumed_history.history == history


def test_terminate_on_nan_raise_error_leaves_the_last_good_backup(tmp_path):
    backup_dir = str(tmp_path / "backup")
    model = new_model()
    bomb = {}

    class Poison(C.Callback):  # makes the params non-finite in epoch 2
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 1:
                bomb["before"] = host(self.model.params)
                self.model.params = jax.tree_util.tree_map(lambda p: p * np.nan, self.model.params)

    with pytest.raises(RuntimeError, match="invalid loss"):
        model.fit(
            X,
            Y,
            epochs=3,
            batch_size=8,
            verbose=0,
            callbacks=[
                Poison(),
                C.TerminateOnNaN(raise_error=True),
                C.ModelCheckpoint(str(tmp_path / "ckpt.npz")),
                C.BackupAndRestore(backup_dir),
            ],
        )
    for path in (tmp_path / "ckpt.npz", os.path.join(backup_dir, C.BackupAndRestore.FILENAME)):
        restored = new_model().load(str(path))
        chex.assert_trees_all_equal(host(restored.params), bomb["before"])


def test_checkpoints_skip_non_finite_weights_with_a_warning(tmp_path):
    model = new_model()
    fit(model, [C.ModelCheckpoint(str(tmp_path / "m.npz"))], epochs=1)
    good = host(model.params)
    model.params = jax.tree_util.tree_map(lambda p: p * np.inf, model.params)
    with pytest.warns(UserWarning, match="not finite"):
        cb = C.ModelCheckpoint(str(tmp_path / "m.npz"))
        cb.set_model(model)
        cb.on_epoch_end(0, {"loss": 1.0})
    chex.assert_trees_all_equal(host(new_model().load(str(tmp_path / "m.npz")).params), good)


# --- many dataset sizes ----------------------------------------------------------------


@pytest.mark.skipif(
    not _compat.threefry_partitionable(),
    reason="JAX < 0.5 draws random bits by batch shape, so the short last batch of an "
    "epoch is not padded into the fused call and compiles once per size",
)
def test_fits_on_many_dataset_sizes_share_a_few_compilations():
    compiles = []

    def listen(name, seconds, **kwargs):
        if name == "/jax/core/compile/backend_compile_duration":
            compiles.append(name)

    jax.monitoring.register_event_duration_secs_listener(listen)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(700, 4)).astype(np.float32)
    y = rng.integers(0, 3, 700)
    model = hkfit.Model(lambda x: hk.Linear(3)(x), loss="sparse_categorical_crossentropy")
    model.fit(x[:300], y[:300], verbose=0)
    before, rss_before = len(compiles), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for n in range(301, 701, 4):  # 100 distinct sizes
        model.fit(x[:n], y[:n], verbose=0)
    assert len(compiles) - before <= 10, len(compiles) - before
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    assert grown_mb < 200, grown_mb
    assert np.all(np.isfinite(jax.tree_util.tree_leaves(host(model.params))[0]))


def test_a_completed_fit_removes_the_temp_file_a_killed_save_left(tmp_path):
    backup_dir = tmp_path / "backup"
    backup_dir.mkdir()
    stale = backup_dir / checkpoint.temp_path(C.BackupAndRestore.FILENAME)
    stale.write_bytes(b"half of a checkpoint")
    fit(new_model(), [C.BackupAndRestore(str(backup_dir))], epochs=1)
    assert not backup_dir.exists()  # the stale temp file did not keep the folder


def test_fit_outside_the_main_thread_leaves_sigterm_alone(tmp_path):
    import threading

    before = signal.getsignal(signal.SIGTERM)
    errors = []

    def run():
        try:
            fit(new_model(), [C.BackupAndRestore(str(tmp_path / "b"))], epochs=1)
        except BaseException as e:  # signal.signal raises ValueError off the main thread
            errors.append(e)

    worker = threading.Thread(target=run)
    worker.start()
    worker.join()
    assert errors == [] and signal.getsignal(signal.SIGTERM) is before
