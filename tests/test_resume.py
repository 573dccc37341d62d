"""Exact resume with BackupAndRestore: after an exception, and after a real SIGKILL."""

import json
import os
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
from hkfit import callbacks as C
from hkfit import checkpoint


def forward(x, is_training):
    h = jax.nn.relu(hk.Linear(8)(x))
    if is_training:
        h = hk.dropout(hk.next_rng_key(), 0.3, h)
    return hk.Linear(3)(h)


X = np.random.default_rng(0).normal(size=(32, 5)).astype(np.float32)
Y = np.arange(32) % 3


class Crash(Exception):
    pass


def crash_in_epoch(epoch_to_crash):
    """A callback that raises in the middle (after batch 1) of ``epoch_to_crash``."""
    current = {}

    def on_batch_end(batch, logs):
        if current.get("epoch") == epoch_to_crash and batch >= 1:
            raise Crash(f"crash in epoch {epoch_to_crash}")

    return C.LambdaCallback(
        on_epoch_begin=lambda epoch, logs: current.update(epoch=epoch),
        on_train_batch_end=on_batch_end,
    )


def run(model, callbacks, epochs=4):
    scheduler = C.LearningRateScheduler(lambda epoch, lr: lr * 0.5)
    return model.fit(
        X,
        Y,
        epochs=epochs,
        batch_size=8,
        validation_split=0.25,
        verbose=0,
        steps_per_execution=1,
        callbacks=[*callbacks, scheduler],
    )


def host(tree):
    return jax.tree_util.tree_map(np.asarray, jax.device_get(tree))


def test_resume_after_a_crash_equals_an_uninterrupted_run(tmp_path):
    clean_dir, crash_dir = str(tmp_path / "clean"), str(tmp_path / "crash")
    clean = hkfit.Model(
        forward, loss="sparse_categorical_crossentropy", metrics=["accuracy"], seed=3
    )
    expected = run(clean, [C.BackupAndRestore(clean_dir)])
    assert not os.path.exists(clean_dir)  # deleted once training completed

    model = hkfit.Model(
        forward, loss="sparse_categorical_crossentropy", metrics=["accuracy"], seed=3
    )
    with pytest.raises(Crash):
        run(model, [crash_in_epoch(2), C.BackupAndRestore(crash_dir)])
    meta, _ = checkpoint.read(os.path.join(crash_dir, C.BackupAndRestore.FILENAME))
    assert meta["epoch"] == 2 and meta["history"]["epoch"] == [0, 1]
    assert model.step > meta["step"]  # the crashed epoch had taken steps

    backup = C.BackupAndRestore(crash_dir, delete_checkpoint=False)
    history = run(model, [backup])
    assert backup.restored_epoch == 2
    assert history.epoch == expected.epoch == [0, 1, 2, 3]
    assert history.history == expected.history
    assert len(set(history.history["learning_rate"])) == 4
    chex.assert_trees_all_equal(host(model.train_state.params), host(clean.train_state.params))
    chex.assert_trees_all_equal(host(model.opt_state), host(clean.opt_state))
    assert model.step == clean.step and model.epoch == 4

    # The kept backup is at the last epoch: fit has nothing left to run.
    again = C.BackupAndRestore(crash_dir)
    history = run(model, [again])
    assert again.restored_epoch == 4 and history.history == expected.history
    assert model.step == clean.step
    assert not os.path.exists(crash_dir)


SCRIPT = textwrap.dedent("""
    import json, os, signal, sys
    import haiku as hk, jax, numpy as np
    import hkfit
    from hkfit import callbacks as C

    backup_dir, out = sys.argv[1], sys.argv[2]
    kill_epoch = int(os.environ.get("HKFIT_TEST_KILL_EPOCH", "-1"))

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
    current = {}

    def on_batch_end(batch, logs):
        if current.get("epoch") == kill_epoch and batch >= 1:
            os.kill(os.getpid(), signal.SIGKILL)

    backup = C.BackupAndRestore(backup_dir)
    callbacks = [
        C.LambdaCallback(on_epoch_begin=lambda epoch, logs: current.update(epoch=epoch),
                         on_train_batch_end=on_batch_end),
        C.LearningRateScheduler(lambda epoch, lr: lr * 0.9),
        backup,
    ]
    history = model.fit(x, y, epochs=5, batch_size=8, validation_split=0.25, verbose=0,
                        steps_per_execution=1, callbacks=callbacks)
    print("restored_epoch", backup.restored_epoch)
    np.savez(out + ".npz", *[np.asarray(a) for a in jax.tree_util.tree_leaves(model.params)])
    with open(out + ".json", "w") as f:
        json.dump({"epoch": history.epoch, "history": history.history, "step": model.step}, f)
""")


def _run_script(tmp_path, backup_dir, out, kill_epoch=None):
    env = dict(os.environ)
    # Later runs reuse the first one's executables (same programs, so same numerics).
    env.update(
        JAX_COMPILATION_CACHE_DIR=str(tmp_path / "xla_cache"),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
    env.pop("HKFIT_TEST_KILL_EPOCH", None)
    if kill_epoch is not None:
        env["HKFIT_TEST_KILL_EPOCH"] = str(kill_epoch)
    return subprocess.run(
        [sys.executable, str(tmp_path / "train.py"), backup_dir, out],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _outputs(out):
    with np.load(out + ".npz", allow_pickle=False) as npz:
        params = [npz[k] for k in sorted(npz.files, key=lambda k: int(k.split("_")[1]))]
    with open(out + ".json") as f:
        return params, json.load(f)


@pytest.mark.slow
def test_sigkill_mid_epoch_then_rerun_is_bit_identical(tmp_path):
    (tmp_path / "train.py").write_text(SCRIPT)
    clean = _run_script(tmp_path, str(tmp_path / "clean_backup"), str(tmp_path / "clean"))
    assert clean.returncode == 0, clean.stderr
    assert "restored_epoch None" in clean.stdout

    backup_dir = str(tmp_path / "backup")
    killed = _run_script(tmp_path, backup_dir, str(tmp_path / "killed"), kill_epoch=3)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not os.path.exists(tmp_path / "killed.json")
    meta, _ = checkpoint.read(os.path.join(backup_dir, C.BackupAndRestore.FILENAME))
    assert meta["epoch"] == 3

    resumed = _run_script(tmp_path, backup_dir, str(tmp_path / "resumed"))
    assert resumed.returncode == 0, resumed.stderr
    assert "restored_epoch 3" in resumed.stdout
    assert not os.path.exists(backup_dir)

    clean_params, clean_log = _outputs(str(tmp_path / "clean"))
    resumed_params, resumed_log = _outputs(str(tmp_path / "resumed"))
    assert resumed_log == clean_log
    assert clean_log["epoch"] == [0, 1, 2, 3, 4]
    assert len(resumed_params) == len(clean_params) == 4
    for a, b in zip(resumed_params, clean_params):
        assert a.dtype == b.dtype and np.array_equal(a, b)
