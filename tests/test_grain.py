"""grain as a data path: datasets and DataLoaders in fit / evaluate / predict, the sharding
of their rows across JAX processes, and an exact resume after a SIGKILL.

Run as a script (``python tests/test_grain.py worker PID PORT OUTDIR``) this file is one
process of the two-process test below.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import warnings

import _processes as processes
import chex
import haiku as hk
import jax
import numpy as np
import optax
import pytest

import hkfit
from hkfit import _position as position_lib
from hkfit import callbacks as C
from hkfit import checkpoint

grain = pytest.importorskip("grain", reason="needs grain: pip install -e '.[grain]'")
gp = pytest.importorskip("grain.python", reason="needs grain: pip install -e '.[grain]'")

# Column 0 of x is the row's id, which the forward ignores: a batch says which rows it holds.
N, FEATURES = 48, 4
_rng = np.random.default_rng(0)
X = np.concatenate([np.arange(N)[:, None], _rng.normal(size=(N, FEATURES))], 1).astype(np.float32)
Y = _rng.integers(0, 3, N).astype(np.int32)
RECORDS = [{"features": X[i], "label": Y[i]} for i in range(N)]  # grain's usual records


def forward(x):
    return hk.Linear(3)(jax.nn.relu(hk.Linear(8)(x[:, 1:])))


def new_model(distribution=None):
    return hkfit.Model(
        forward,
        loss="sparse_categorical_crossentropy",
        optimizer=optax.sgd(0.1),
        metrics=["accuracy"],
        seed=0,
        distribution=distribution,
    )


class ToTuple(gp.MapTransform):
    """A record (a dict) as the ``(x, y)`` pair that fit takes."""

    def map(self, record):
        return record["features"], record["label"]


class RecordIds(gp.MapTransform):
    """Appends the row ids of each batch, as grain hands it out, to a list."""

    def __init__(self, out):
        self.out = out

    def map(self, batch):
        self.out.append([int(i) for i in batch[0][:, 0]])
        return batch


def loader(batch_size=8, *, shuffle=True, seed=5, num_epochs=1, shard_options=None, record=None):
    return gp.DataLoader(
        data_source=RECORDS,
        sampler=gp.IndexSampler(N, shuffle=shuffle, seed=seed, num_epochs=num_epochs),
        operations=[
            ToTuple(),
            gp.Batch(batch_size),
            *([] if record is None else [RecordIds(record)]),
        ],
        shard_options=shard_options or gp.ShardByJaxProcess(drop_remainder=True),
    )


def ids(batches, steps=None):
    """The row ids of the first ``steps`` batches of an iterable of (x, y) batches, in order."""
    out = []
    for i, (x, _) in enumerate(batches):
        if steps is not None and i >= steps:
            break
        out += [int(v) for v in np.asarray(x)[:, 0]]
    return out


def host(tree):
    return jax.tree_util.tree_map(np.asarray, jax.device_get(tree))


def fit_like_arrays(rows, batch_size=8):
    """A model trained on the arrays, on the rows ``rows`` in that order (batch after batch)."""
    model = new_model()
    model.fit(X[rows], Y[rows], batch_size=batch_size, shuffle=False, verbose=0)
    return model


def assert_evaluates_and_predicts_like_arrays(model, eval_data, predict_data):
    expected = model.evaluate(X, Y, verbose=0)
    result = model.evaluate(eval_data, verbose=0)
    assert result.keys() == expected.keys()
    for key in expected:
        np.testing.assert_allclose(result[key], expected[key], rtol=1e-6)
    predicted = model.predict(predict_data, verbose=0)
    assert predicted.shape == (N, 3)  # every row once, in order
    np.testing.assert_allclose(predicted, model.predict(X, verbose=0), atol=1e-6)


# --- datasets and loaders in fit, evaluate and predict -----------------------------------


def test_a_map_dataset_in_fit_evaluate_and_predict():
    dataset = (
        grain.MapDataset.source(RECORDS)
        .shuffle(seed=5)
        .map(lambda r: (r["features"], r["label"]))
        .batch(8)
    )
    order = ids(dataset)
    assert sorted(order) == list(range(N)) and order != list(range(N))
    model = new_model()
    history = model.fit(dataset, epochs=2, verbose=0)
    assert history.epoch == [0, 1] and model.step == 2 * N // 8
    # without .repeat(), each epoch iterates the dataset again: the same order
    chex.assert_trees_all_close(model.params, fit_like_arrays(order * 2).params, atol=1e-6)

    in_order = grain.MapDataset.source(RECORDS).map(lambda r: (r["features"], r["label"]))
    assert_evaluates_and_predicts_like_arrays(
        model,
        in_order.batch(10),  # a last batch of 8 rows
        in_order.map(lambda xy: xy[0]).batch(10),  # inputs only
    )


def test_a_pipeline_of_dicts_maps_its_batches_to_tuples():
    batched = grain.MapDataset.source(RECORDS).batch(8)  # batches of dicts
    assert isinstance(batched[0], dict)
    with pytest.raises(ValueError, match="to be a tuple"):
        new_model().fit(batched, epochs=1, verbose=0)
    as_pairs = batched.map(lambda b: (b["features"], b["label"]))
    model = new_model()
    model.fit(as_pairs, epochs=1, verbose=0)
    chex.assert_trees_all_close(model.params, fit_like_arrays(list(range(N))).params, atol=1e-6)


def test_an_iter_dataset_in_fit_evaluate_and_predict():
    def pipeline(batch_size, seed=None):
        ds = grain.MapDataset.source(RECORDS)
        if seed is not None:
            ds = ds.shuffle(seed=seed)
        return ds.to_iter_dataset().map(lambda r: (r["features"], r["label"])).batch(batch_size)

    dataset = pipeline(8, seed=3)
    assert isinstance(dataset, grain.IterDataset)
    order = ids(dataset)
    model = new_model()
    model.fit(dataset, epochs=2, verbose=0)
    assert model.step == 2 * N // 8
    chex.assert_trees_all_close(model.params, fit_like_arrays(order * 2).params, atol=1e-6)
    assert_evaluates_and_predicts_like_arrays(model, pipeline(10), pipeline(10))


def test_a_data_loader_in_fit_evaluate_and_predict():
    train = loader(8, seed=5)
    order = ids(train)
    assert sorted(order) == list(range(N))
    model = new_model()
    history = model.fit(train, epochs=2, verbose=0, validation_data=loader(10, shuffle=False))
    assert model.step == 2 * N // 8
    # each epoch is a new iter(loader): with num_epochs=1, the same order every epoch
    reference = fit_like_arrays(order * 2)
    chex.assert_trees_all_close(model.params, reference.params, atol=1e-6)
    np.testing.assert_allclose(
        history.history["val_loss"][-1], model.evaluate(X, Y, verbose=0)["loss"], rtol=1e-6
    )
    assert_evaluates_and_predicts_like_arrays(
        model, loader(10, shuffle=False), loader(10, shuffle=False)
    )


def test_repeated_pipelines_reshuffle_each_epoch_with_steps_per_epoch():
    steps, epochs = N // 8, 3
    dataset = (
        grain.MapDataset.source(RECORDS)
        .shuffle(seed=5)
        .map(lambda r: (r["features"], r["label"]))
        .batch(8)
        .repeat()  # endless, a new order each epoch
    )
    endless = loader(8, seed=5, num_epochs=None)
    for data in (dataset, endless):
        read = ids(data, steps * epochs)
        orders = [read[e * N : (e + 1) * N] for e in range(epochs)]
        assert all(sorted(o) == list(range(N)) for o in orders)
        assert orders[0] != orders[1] != orders[2]
        model = new_model()
        history = model.fit(data, epochs=epochs, steps_per_epoch=steps, verbose=0)
        assert history.epoch == [0, 1, 2] and model.step == steps * epochs
        chex.assert_trees_all_close(model.params, fit_like_arrays(read).params, atol=1e-6)
        # `steps` bounds evaluate and predict on an endless pipeline: here one pass of rows
        result = model.evaluate(data, steps=steps, verbose=0)
        np.testing.assert_allclose(
            result["loss"], model.evaluate(X, Y, verbose=0)["loss"], rtol=1e-6
        )
        first = ids(data, steps)
        np.testing.assert_allclose(
            model.predict(data, steps=steps, verbose=0),
            model.predict(X[first], verbose=0),
            atol=1e-6,
        )


# --- resuming a DataLoader -----------------------------------------------------------------


class Crash(Exception):
    pass


def test_a_data_loader_resumes_at_the_exact_next_batch(tmp_path):
    steps, epochs = N // 8, 3
    clean, clean_ids = new_model(), []
    clean.fit(
        loader(seed=5, num_epochs=None, record=clean_ids),
        epochs=epochs,
        steps_per_epoch=steps,
        verbose=0,
    )
    assert len(clean_ids) == steps * epochs

    current = {}

    def crash(batch, logs):
        if current["epoch"] == 1 and batch == 2:
            raise Crash()

    backup_dir = str(tmp_path / "backup")
    with pytest.raises(Crash):
        new_model().fit(
            loader(seed=5, num_epochs=None),
            epochs=epochs,
            steps_per_epoch=steps,
            verbose=0,
            callbacks=[
                C.LambdaCallback(
                    on_epoch_begin=lambda epoch, logs: current.update(epoch=epoch),
                    on_train_batch_end=crash,
                ),
                C.BackupAndRestore(backup_dir, save_freq=1),
            ],
        )
    meta, _ = checkpoint.read(os.path.join(backup_dir, C.BackupAndRestore.FILENAME))
    position = meta["position"]
    assert (position["epoch"], position["batch"]) == (1, 2)  # the crash came before batch 3's
    # the DataLoader's state is bytes: the backup holds it, in base64
    state = position_lib.decode(position, "backup").iterator
    assert isinstance(state, bytes) and json.loads(state)["last_seen_indices"]

    resumed, resumed_ids = new_model(), []
    backup = C.BackupAndRestore(backup_dir, save_freq=1)
    resumed.fit(
        loader(seed=5, num_epochs=None, record=resumed_ids),
        epochs=epochs,
        steps_per_epoch=steps,
        verbose=0,
        callbacks=[backup],
    )
    assert (backup.restored_epoch, backup.restored_batch) == (1, 2)
    assert resumed_ids == clean_ids[steps + 2 :]  # exactly the batches after the backup
    assert resumed.step == clean.step == steps * epochs
    chex.assert_trees_all_equal(host(resumed.params), host(clean.params))


@pytest.mark.parametrize("kind", ["dataset", "loader"])
def test_an_endless_pipeline_resumes_from_an_epoch_end_backup_on_the_next_batches(tmp_path, kind):
    """With steps_per_epoch, every epoch reads on from one iterator: a backup written at
    an epoch's end holds its state, or the resumed run would read the first epoch again."""
    steps, epochs = N // 8, 3

    def data(record):
        if kind == "loader":
            return loader(seed=5, num_epochs=None, record=record)
        return (
            grain.MapDataset.source(RECORDS)
            .shuffle(seed=5)
            .map(lambda r: (r["features"], r["label"]))
            .batch(8)
            .repeat()
            .to_iter_dataset()
            .map(lambda batch: (record.append(ids([batch])), batch)[1])
        )

    def fit(model, record, callbacks=()):
        model.fit(
            data(record),
            epochs=epochs,
            steps_per_epoch=steps,
            verbose=0,
            callbacks=list(callbacks),
        )

    clean, clean_ids = new_model(), []
    fit(clean, clean_ids)
    assert len(clean_ids) == steps * epochs

    current = {}

    def crash(batch, logs):
        if current["epoch"] == 1 and batch == 2:
            raise Crash()

    backup_dir = str(tmp_path / "backup")
    on_epochs = C.LambdaCallback(
        on_epoch_begin=lambda epoch, logs: current.update(epoch=epoch), on_train_batch_end=crash
    )
    with pytest.raises(Crash):
        fit(new_model(), [], [on_epochs, C.BackupAndRestore(backup_dir)])  # save_freq="epoch"
    meta, _ = checkpoint.read(os.path.join(backup_dir, C.BackupAndRestore.FILENAME))
    assert meta["epoch"] == 1 and meta["position"]["batch"] == 0  # epoch 2 not begun

    resumed, resumed_ids = new_model(), []
    backup = C.BackupAndRestore(backup_dir)
    fit(resumed, resumed_ids, [backup])
    assert (backup.restored_epoch, backup.restored_batch) == (1, 0)
    assert resumed_ids == clean_ids[steps:]
    chex.assert_trees_all_equal(host(resumed.params), host(clean.params))


def test_a_bytes_iterator_state_round_trips_through_a_checkpoints_json():
    state = bytes(range(256))
    encoded = position_lib.encode(position_lib.Position(1, 2, None, state))
    assert json.loads(json.dumps(encoded))["iterator"] is None
    assert position_lib.decode(encoded, "ckpt").iterator == state
    with pytest.raises(ValueError, match=r"corrupted.*iterator_bytes"):
        position_lib.decode({**encoded, "iterator_bytes": "not base64!"}, "ckpt")
    json_state = {"epoch": 0, "batch": 1, "logs": [], "iterator": {"next_index": 3}}
    assert position_lib.decode(json_state, "ckpt").iterator == {"next_index": 3}


# --- one process: sharding by JAX process --------------------------------------------------


def test_shard_by_jax_process_in_one_process_feeds_every_row():
    sharded = loader(8, seed=5, shard_options=gp.ShardByJaxProcess(drop_remainder=True))
    everything = loader(8, seed=5, shard_options=gp.NoSharding())
    assert (jax.process_index(), jax.process_count()) == (0, 1)
    assert ids(sharded) == ids(everything) and sorted(ids(sharded)) == list(range(N))
    a, b = new_model(), new_model()
    a.fit(sharded, epochs=1, verbose=0)
    b.fit(everything, epochs=1, verbose=0)
    chex.assert_trees_all_equal(host(a.params), host(b.params))

    dataset = grain.MapDataset.source(RECORDS)
    shard = dataset[jax.process_index() :: jax.process_count()]
    assert len(shard) == N and [int(r["features"][0]) for r in shard] == list(range(N))


# --- two processes ---------------------------------------------------------------------------

PROCS, LOCAL_BATCH = 2, 8
# Two CPU devices per process where jaxlib's gloo set-up allows it (as in test_distributed).
LOCAL_DEVICES = 2 if tuple(int(p) for p in jax.__version__.split(".")[:2]) >= (0, 5) else 1


def _worker(pid: int, port: int, outdir: str) -> None:
    hkfit.distributed.initialize(f"127.0.0.1:{port}", PROCS, pid)
    for name, shard_options in (
        ("sharded", gp.ShardByJaxProcess(drop_remainder=True)),  # after initialize
        ("unsharded", gp.NoSharding()),  # the mistake: every process reads every row
    ):
        data = loader(LOCAL_BATCH, seed=5, shard_options=shard_options)
        model = new_model(distribution=hkfit.DataParallel())
        history = model.fit(data, epochs=1, verbose=0)
        result = {"ids": ids(data), "history": history.history, "step": model.step}
        with open(os.path.join(outdir, f"{name}{pid}.json"), "w") as f:
            json.dump(result, f)
        np.savez(
            os.path.join(outdir, f"{name}{pid}.npz"), *jax.tree_util.tree_leaves(host(model.params))
        )
    for name in ("sliced", "loader"):
        _crash_and_resume(name, pid, outdir)


def _endless(name, record):
    """This process's rows, shuffled and batched, endlessly: a slice of a dataset, or a
    ShardByJaxProcess DataLoader. ``record`` gets the row ids of each batch handed out."""
    if name == "loader":
        return loader(LOCAL_BATCH, seed=5, num_epochs=None, record=record)
    dataset = grain.MapDataset.source(RECORDS)
    mine = dataset[jax.process_index() :: jax.process_count()]  # N is a multiple of PROCS
    return (
        mine.shuffle(seed=5)
        .map(lambda r: (r["features"], r["label"]))
        .batch(LOCAL_BATCH)
        .repeat()
        .to_iter_dataset()
        .map(lambda batch: (record.append(ids([batch])), batch)[1])
    )


def _crash_and_resume(name: str, pid: int, outdir: str) -> None:
    """An uninterrupted run; one that both processes stop inside epoch 2; its resume."""
    steps = N // (PROCS * LOCAL_BATCH)

    def fit(record, callbacks=()):
        model = new_model(distribution=hkfit.DataParallel())
        data = _endless(name, record)
        model.fit(data, epochs=2, steps_per_epoch=steps, verbose=0, callbacks=list(callbacks))
        return model

    current = {}

    def crash(batch, logs):
        if current["epoch"] == 1 and batch == 1:
            raise Crash()

    clean_ids, resumed_ids = [], []
    clean = fit(clean_ids)
    backup_dir = os.path.join(outdir, f"backup_{name}")  # the same directory for both
    stop = C.LambdaCallback(
        on_epoch_begin=lambda epoch, logs: current.update(epoch=epoch), on_train_batch_end=crash
    )
    try:
        fit([], [stop, C.BackupAndRestore(backup_dir, save_freq=1)])
    except Crash:
        pass
    backup = C.BackupAndRestore(backup_dir, save_freq=1)
    resumed = fit(resumed_ids, [backup])
    same = all(
        np.array_equal(a, b)
        for a, b in zip(
            jax.tree_util.tree_leaves(host(clean.params)),
            jax.tree_util.tree_leaves(host(resumed.params)),
        )
    )
    result = {
        "clean": clean_ids,
        "resumed": resumed_ids,
        "restored": [backup.restored_epoch, backup.restored_batch],
        "same_params": same,
    }
    with open(os.path.join(outdir, f"resume_{name}{pid}.json"), "w") as f:
        json.dump(result, f)


def _params(path):
    with np.load(path) as npz:
        return [npz[f"arr_{i}"] for i in range(len(npz.files))]


@pytest.mark.slow
def test_two_processes_each_feed_their_own_rows_with_shard_by_jax_process(tmp_path):
    if not hasattr(jax, "make_array_from_process_local_data"):
        pytest.skip(f"jax {jax.__version__} lacks jax.make_array_from_process_local_data")
    processes.run(__file__, PROCS, LOCAL_DEVICES, tmp_path, timeout=180)

    def outputs(name):
        results = [json.loads((tmp_path / f"{name}{p}.json").read_text()) for p in range(PROCS)]
        params = [_params(tmp_path / f"{name}{p}.npz") for p in range(PROCS)]
        for a, b in zip(params[0], params[1], strict=True):
            assert np.array_equal(a, b)  # one model, trained together
        assert results[0]["history"] == results[1]["history"]
        return results, params[0]

    # ShardByJaxProcess: process p reads every PROCS-th row of the shared shuffled order,
    # so global batch b holds the rows of one process's batch b of PROCS * LOCAL_BATCH rows
    results, params = outputs("sharded")
    mine = [r["ids"] for r in results]
    assert not set(mine[0]) & set(mine[1]) and sorted(mine[0] + mine[1]) == list(range(N))
    assert results[0]["step"] == N // (PROCS * LOCAL_BATCH)
    one = new_model()
    one.fit(loader(PROCS * LOCAL_BATCH, seed=5, shard_options=gp.NoSharding()), epochs=1, verbose=0)
    chex.assert_trees_all_close(params, jax.tree_util.tree_leaves(host(one.params)), atol=1e-5)

    # Without sharding, nothing fails: every process feeds the same batches, each global
    # batch holds each of its rows PROCS times, and training is that of one process with
    # the local batch size: PROCS times the steps per epoch, each on PROCS copies of a row
    results, params = outputs("unsharded")
    assert results[0]["ids"] == results[1]["ids"] and sorted(results[0]["ids"]) == list(range(N))
    assert results[0]["step"] == N // LOCAL_BATCH
    one = new_model()
    one.fit(loader(LOCAL_BATCH, seed=5, shard_options=gp.NoSharding()), epochs=1, verbose=0)
    chex.assert_trees_all_close(params, jax.tree_util.tree_leaves(host(one.params)), atol=1e-5)

    # Resuming: a backup holds every process's iterator state, and each restores its own.
    # (A ShardByJaxProcess DataLoader's state names a record of the process's shard: with
    # process 0's state, process 1 would resume one record back.)
    steps = N // (PROCS * LOCAL_BATCH)
    restored_at = steps + 1  # the crash came in epoch 2, after 1 batch was backed up
    for name in ("sliced", "loader"):
        first_epochs = []
        for pid in range(PROCS):
            result = json.loads((tmp_path / f"resume_{name}{pid}.json").read_text())
            first_epochs += [i for batch in result["clean"][:steps] for i in batch]
            assert result["restored"] == [1, 1] and len(result["clean"]) == 2 * steps
            assert result["resumed"] == result["clean"][restored_at:], (name, pid)
            assert result["same_params"], (name, pid)
        assert sorted(first_epochs) == list(range(N))  # each row in one process, once


# --- SIGKILL in the middle of an epoch, then the same script again ----------------------------

KILL_SCRIPT = textwrap.dedent("""
    import json, sys, time
    import grain.python as gp, haiku as hk, jax, numpy as np
    import hkfit
    from hkfit import callbacks as C

    backup_dir, out = sys.argv[1], sys.argv[2]
    N, BATCH, STEPS, EPOCHS = 80, 8, 10, 3
    rng = np.random.default_rng(0)
    x = np.concatenate([np.arange(N)[:, None], rng.normal(size=(N, 5))], 1).astype(np.float32)
    y = rng.integers(0, 3, N)
    records = [{"features": x[i], "label": y[i]} for i in range(N)]

    class ToTuple(gp.MapTransform):
        def map(self, record):
            return record["features"], record["label"]

    class RecordIds(gp.MapTransform):  # one line per batch, as grain hands it out
        def map(self, batch):
            with open(out + ".ids", "a") as f:
                f.write(" ".join(str(int(i)) for i in batch[0][:, 0]) + "\\n")
            return batch

    data = gp.DataLoader(
        data_source=records,
        sampler=gp.IndexSampler(N, shuffle=True, seed=7, num_epochs=None),
        operations=[ToTuple(), gp.Batch(BATCH, drop_remainder=True), RecordIds()],
        shard_options=gp.ShardByJaxProcess(drop_remainder=True),
    )

    def forward(x, is_training):
        h = jax.nn.relu(hk.Linear(16)(x[:, 1:]))  # column 0: the row's id
        if is_training:
            h = hk.dropout(hk.next_rng_key(), 0.3, h)
        return hk.Linear(3)(h)

    model = hkfit.Model(forward, loss="sparse_categorical_crossentropy", optimizer="adam",
                        metrics=["accuracy"], seed=3)

    def on_batch_end(batch, logs):  # after the backup of this batch, when one is due
        print("batch", model.step, flush=True)
        time.sleep(0.05)

    backup = C.BackupAndRestore(backup_dir, save_freq=4)
    callbacks = [backup, C.LambdaCallback(on_train_batch_end=on_batch_end)]
    history = model.fit(data, epochs=EPOCHS, steps_per_epoch=STEPS, verbose=0,
                        callbacks=callbacks)
    print("restored", backup.restored_epoch, backup.restored_batch, flush=True)
    np.savez(out + ".npz", *[np.asarray(a) for a in jax.tree_util.tree_leaves(model.params)])
    with open(out + ".json", "w") as f:
        json.dump({"epoch": history.epoch, "history": history.history, "step": model.step}, f)
""")
KILL_STEPS = 10  # batches per epoch in KILL_SCRIPT


def _kill_script_env(tmp_path):
    env = dict(os.environ)
    env.update(  # the later runs reuse the first one's executables
        JAX_COMPILATION_CACHE_DIR=str(tmp_path / "xla_cache"),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
    return env


def _run_to_the_end(tmp_path, backup_dir, out):
    return subprocess.run(
        [sys.executable, str(tmp_path / "train.py"), backup_dir, out],
        env=_kill_script_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=180,
    )


def _batch_ids(out):
    with open(out + ".ids") as f:
        return [[int(i) for i in line.split()] for line in f]


def _outputs(out):
    with np.load(out + ".npz", allow_pickle=False) as npz:
        params = [npz[f"arr_{i}"] for i in range(len(npz.files))]
    with open(out + ".json") as f:
        return params, json.load(f)


@pytest.mark.slow
def test_sigkill_mid_epoch_with_a_data_loader_resumes_on_the_same_batches(tmp_path):
    (tmp_path / "train.py").write_text(KILL_SCRIPT)
    clean_out = str(tmp_path / "clean")
    clean = _run_to_the_end(tmp_path, str(tmp_path / "clean_backup"), clean_out)
    assert clean.returncode == 0, clean.stderr
    assert "restored None 0" in clean.stdout
    clean_ids = _batch_ids(clean_out)
    assert len(clean_ids) == 3 * KILL_STEPS  # grain read exactly the batches trained on

    # SIGKILL once the run is past the backup at step 12 (epoch 2, after its 2nd batch)
    backup_dir, killed_out = str(tmp_path / "backup"), str(tmp_path / "killed")
    with open(tmp_path / "killed.stderr", "w") as stderr:
        child = subprocess.Popen(
            [sys.executable, str(tmp_path / "train.py"), backup_dir, killed_out],
            env=_kill_script_env(tmp_path),
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
        watchdog = threading.Timer(180, child.kill)  # a hung child fails the test, not CI
        watchdog.start()
        try:
            for line in child.stdout:
                if line.split() == ["batch", "14"]:
                    child.send_signal(signal.SIGKILL)
                    break
            child.wait(timeout=60)
        finally:
            watchdog.cancel()
            if child.poll() is None:
                child.kill()
                child.wait()
            child.stdout.close()
    assert child.returncode == -signal.SIGKILL, (tmp_path / "killed.stderr").read_text()
    assert not os.path.exists(killed_out + ".json")
    meta, _ = checkpoint.read(os.path.join(backup_dir, C.BackupAndRestore.FILENAME))
    epoch, batch = meta["position"]["epoch"], meta["position"]["batch"]
    assert epoch == 1 and 0 < batch < KILL_STEPS  # inside the epoch
    assert meta["position"]["iterator_bytes"]  # the DataLoader's state
    restored_at = epoch * KILL_STEPS + batch
    killed_ids = _batch_ids(killed_out)
    assert killed_ids[:restored_at] == clean_ids[:restored_at]
    assert len(killed_ids) > restored_at  # it read batches after the backup, lost to the kill

    resumed_out = str(tmp_path / "resumed")
    resumed = _run_to_the_end(tmp_path, backup_dir, resumed_out)
    assert resumed.returncode == 0, resumed.stderr
    assert f"restored {epoch} {batch}" in resumed.stdout
    assert not os.path.exists(backup_dir)
    # from the restore point on: the batches of the uninterrupted run, row for row
    assert _batch_ids(resumed_out) == clean_ids[restored_at:]

    clean_params, clean_log = _outputs(clean_out)
    resumed_params, resumed_log = _outputs(resumed_out)
    assert resumed_log == clean_log
    for a, b in zip(resumed_params, clean_params, strict=True):
        assert a.dtype == b.dtype and np.array_equal(a, b)


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    warnings.simplefilter("ignore")
    _worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
