"""DataParallel(data_placement="sharded"): one block of rows per device (8 CPU devices)."""

import re

import chex
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hkfit
from hkfit import _feeds as feeds
from hkfit import callbacks as C
from hkfit._row_blocks import BlockPlan
from hkfit.model import _SHUFFLE
from hkfit.step import Batch

pytestmark = pytest.mark.skipif(
    jax.device_count() < 8, reason="needs 8 devices (tests/conftest.py sets 8 CPU devices)"
)

N, BATCH = 203, 16  # blocks of 26 and 25 rows; 2 local rows per batch; an 11-row tail
RNG = np.random.default_rng(0)
X = RNG.normal(size=(N, 5)).astype(np.float32)
Y = (X[:, 0] + 0.5 * X[:, 1] > 0).astype(np.int32)
W = RNG.uniform(0.5, 2.0, N).astype(np.float32)


def mlp(x):
    return hk.Linear(2)(jax.nn.relu(hk.Linear(8)(x)))


def bn_mlp(x, is_training):
    h = hk.BatchNorm(True, True, 0.9)(hk.Linear(8)(x), is_training)
    return hk.Linear(2)(jax.nn.relu(h))


def model(forward=mlp, placement=None, **kwargs):
    distribution = None if placement is None else hkfit.DataParallel(data_placement=placement)
    # SGD: Adam would turn the float noise of BatchNorm's zero bias gradients into steps
    optimizer = optax.sgd(0.1) if forward is bn_mlp else optax.adam(1e-2)
    return hkfit.Model(
        forward,
        loss="sparse_categorical_crossentropy",
        optimizer=optimizer,
        metrics=["accuracy"],
        weighted_metrics=["accuracy"],
        seed=0,
        distribution=distribution,
        **kwargs,
    )


def host(tree):
    return jax.tree_util.tree_map(np.asarray, jax.device_get(tree))


def one_device_order(plan: BlockPlan, key, epoch, local_batch_size, shuffle, groups=1):
    """The rows of an epoch's global batches, in the order a sharded fit takes them."""
    full, tail = plan.epoch_order(key, epoch, local_batch_size=local_batch_size, shuffle=shuffle)
    rows = plan.offsets[None, :, None] + full  # [batches, blocks, local rows]
    if groups > 1:  # accumulation: part-major, so each micro-batch spans every block
        b, k, w = rows.shape
        rows = rows.reshape(b, k, groups, w // groups).swapaxes(1, 2)
    order = rows.reshape(-1).tolist()
    if tail is not None:
        order += (plan.offsets[:, None] + tail.local[0]).reshape(-1)[tail.keep].tolist()
    return order


# --- placement -----------------------------------------------------------------------------


def per_device_bytes(tree):
    return max(
        sum(s.data.nbytes for s in leaf.addressable_shards if s.device == device)
        for leaf in jax.tree_util.tree_leaves(tree)
        for device in jax.devices()
    )


@pytest.mark.parametrize("n", [4096, 4099])
def test_each_device_holds_about_an_eighth_of_the_rows(n):
    x = RNG.normal(size=(n, 64)).astype(np.float32)
    data = Batch(x, np.zeros(n, np.int32), np.ones(n, np.float32), np.ones(n, np.float32))
    placed = {}
    for placement in ("sharded", "replicated"):
        layout = hkfit.DataParallel(data_placement=placement)
        train = feeds.TrainArrays(data, 64, layout, shuffle=True, steps_per_epoch=None)
        placed[placement] = train.data
    sharded = [s.data.shape[:2] for s in placed["sharded"].x.addressable_shards]  # [1 block, rows]
    assert all(shape[0] == 1 for shape in sharded) and len(sharded) == 8
    block = feeds.bucket(-(-n // 8))  # small datasets: a bucketed block length
    assert {shape[1] for shape in sharded} == {block}
    assert placed["sharded"].x.addressable_shards[0].data.nbytes == block * 64 * 4
    replicated = placed["replicated"].x.addressable_shards[0].data.nbytes
    assert replicated == feeds.bucket(n) * 64 * 4
    ratio = per_device_bytes(placed["replicated"]) / per_device_bytes(placed["sharded"])
    assert 6.4 < ratio <= 8.0  # 8, less the bucketing of the blocks


def test_padding_rows_weigh_nothing_and_every_row_is_in_one_block():
    plan = BlockPlan(13, 4, capacity=5)
    assert plan.counts.tolist() == [4, 3, 3, 3] and plan.offsets.tolist() == [0, 4, 7, 10]
    data = Batch(np.arange(13.0)[:, None], np.arange(13), np.ones(13, np.float32), None)
    blocks = plan.split(data)
    assert blocks.x.shape == (4, 5, 1)
    real = blocks.weights > 0
    assert real.sum(1).tolist() == [4, 3, 3, 3]
    assert sorted(blocks.x[real].ravel().tolist()) == list(range(13))
    assert (blocks.mask[~real] == 0).all()


@pytest.mark.parametrize("shuffle", [False, True])
def test_every_row_once_per_epoch_shuffled_within_its_block(shuffle):
    plan = BlockPlan(N, 8)
    key = jax.random.key(1)
    orders = [one_device_order(plan, key, e, 2, shuffle) for e in range(3)]
    for order in orders:
        assert sorted(order) == list(range(N))
    assert (orders[0] != orders[1]) is shuffle
    full, _ = plan.epoch_order(key, 0, local_batch_size=2, shuffle=shuffle)
    assert (full < plan.counts[None, :, None]).all()  # local rows: never another block's
    again, _ = plan.epoch_order(key, 0, local_batch_size=2, shuffle=shuffle)
    np.testing.assert_array_equal(full, again)


def test_the_step_gathers_without_collectives_on_the_data():
    m = model(placement="sharded")
    m.fit(X, Y, batch_size=BATCH, epochs=1, verbose=0)
    layout, program = m.distribution, m._program
    run = program.train_run(m.train_state, True, blocked=True)
    data = layout.place_blocks(BlockPlan(N, 8).split(Batch(X, Y, W, np.ones(N, np.float32))))
    idx = layout.place_state(jnp.zeros((4, 8, 2), jnp.int32))
    text = run.lower(m.train_state, program.empty_logs(True), data, idx, 0, 1).compile().as_text()
    moved = re.findall(r"= \w+\[([\d,]*)\]\S* (?:all-gather|all-to-all|collective-permute)\(", text)
    sizes = [int(np.prod([int(d) for d in dims.split(",") if d])) for dims in moved]
    # nothing of the dataset's size moves (labels alone are N elements; a batch's logits
    # may be gathered for the metrics on some JAX versions), and the gradients are reduced
    assert all(size < N for size in sizes), moved
    assert " all-reduce(" in text


# --- results -------------------------------------------------------------------------------


@pytest.mark.parametrize("forward", [mlp, bn_mlp], ids=["mlp", "batchnorm"])
def test_fit_equals_one_device_on_the_same_batches(forward):
    sharded = model(forward, "sharded")
    history = sharded.fit(
        X, Y, sample_weight=W, batch_size=BATCH, epochs=2, verbose=0, shuffle=True
    )
    key = sharded._stream(_SHUFFLE)
    plan = BlockPlan(N, 8)
    one = model(forward)
    logs = []
    for epoch in range(2):
        order = one_device_order(plan, key, epoch, BATCH // 8, shuffle=True)
        logs.append(
            one.fit(
                X[order],
                Y[order],
                sample_weight=W[order],
                batch_size=BATCH,
                epochs=1,
                verbose=0,
                shuffle=False,
            ).history
        )
    for name, values in history.history.items():
        np.testing.assert_allclose(values, [log[name][0] for log in logs], rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(host(sharded.params), host(one.params), rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(host(sharded.state), host(one.state), rtol=1e-5, atol=1e-6)


def test_gradient_accumulation_takes_every_block_in_each_micro_batch():
    sharded = model(placement="sharded")
    sharded.fit(
        X, Y, batch_size=8, gradient_accumulation_steps=2, epochs=1, verbose=0, shuffle=False
    )
    order = one_device_order(BlockPlan(N, 8), None, 0, 2, shuffle=False, groups=2)
    one = model()
    one.fit(
        X[order],
        Y[order],
        batch_size=8,
        gradient_accumulation_steps=2,
        epochs=1,
        verbose=0,
        shuffle=False,
    )
    chex.assert_trees_all_close(host(sharded.params), host(one.params), rtol=1e-5, atol=1e-6)


def test_evaluate_and_validation_are_exact():
    sharded, one = model(placement="sharded"), model()
    for m in (sharded, one):
        m.init(X[:2])
    sharded.params = host(one.params)
    for batch_size in (7, 32, 500):
        a = sharded.evaluate(X, Y, sample_weight=W, batch_size=batch_size, verbose=0)
        b = one.evaluate(X, Y, sample_weight=W, batch_size=batch_size, verbose=0)
        chex.assert_trees_all_close(a, b, rtol=1e-5)
    history = sharded.fit(
        X[:150],
        Y[:150],
        validation_data=(X[150:], Y[150:], W[150:]),
        batch_size=BATCH,
        epochs=1,
        verbose=0,
    )
    one.params = host(sharded.params)  # the same params, on one device
    expected = one.evaluate(X[150:], Y[150:], sample_weight=W[150:], verbose=0)
    np.testing.assert_allclose(history.history["val_loss"][0], expected["loss"], rtol=1e-5)


def test_steps_per_epoch_cuts_the_epoch():
    m = model(placement="sharded")
    m.fit(X, Y, batch_size=BATCH, epochs=2, steps_per_epoch=5, verbose=0)
    assert m.step == 10


def test_mid_epoch_resume_is_bit_identical(tmp_path):
    def run(callbacks):
        m = model(placement="sharded")
        m.fit(
            X, Y, batch_size=BATCH, epochs=2, verbose=0, steps_per_execution=1, callbacks=callbacks
        )
        return m

    clean = run([])
    backup = str(tmp_path / "backup")

    class Crash(Exception):
        pass

    def crash(batch, logs):
        if batch == 7:
            raise Crash()

    with pytest.raises(Crash):
        run([C.BackupAndRestore(backup, save_freq=3), C.LambdaCallback(on_train_batch_end=crash)])
    resumed = run([C.BackupAndRestore(backup, save_freq=3)])
    chex.assert_trees_all_equal(host(resumed.params), host(clean.params))


def test_an_unknown_placement_is_refused():
    with pytest.raises(ValueError, match=r"data_placement.*'everywhere'"):
        hkfit.DataParallel(data_placement="everywhere")


def test_predict_places_chunks_not_the_whole_input(monkeypatch):
    m = model(placement="sharded")
    m.fit(X, Y, batch_size=BATCH, epochs=1, verbose=0)
    one = model()
    one.init(X[:2])
    one.params = host(m.params)
    x = RNG.normal(size=(40_000, 5)).astype(np.float32)  # 800 KB of inputs
    monkeypatch.setattr(feeds, "CHUNK_BYTES", 64 << 10)  # chunks of about 64 KB
    placed = []
    place_rows = m.distribution.place_rows

    def recording(tree):
        placed.append(sum(np.asarray(a).nbytes for a in jax.tree_util.tree_leaves(tree)))
        return place_rows(tree)

    monkeypatch.setattr(m.distribution, "place_rows", recording)
    out = m.predict(x, batch_size=1000)
    assert len(placed) > 5 and max(placed) <= 80_000  # each device holds one chunk at a time
    np.testing.assert_allclose(out, one.predict(x, batch_size=1000), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("placement", ["sharded", "replicated"])
def test_a_loss_that_couples_rows_evaluates_on_the_one_device_batches(placement):
    """Its value depends on which rows share a batch: evaluate places such rows on every
    device and takes the one-device batches, never padded for the devices (25 rows on 8
    devices run whole), and the short last one at its real size."""

    def centered(y_true, y_pred):
        error = y_pred[:, 0] - y_true
        return (error - jnp.mean(error)) ** 2

    centered.couples_rows = True

    def build(distribution=None):
        return hkfit.Model(
            lambda x: hk.Linear(1)(x), loss=centered, seed=0, distribution=distribution
        )

    y = X[:, 0] * 2.0
    sharded, one = build(hkfit.DataParallel(data_placement=placement)), build()
    sharded.fit(X, y, batch_size=BATCH, epochs=1, verbose=0)
    one.init(X[:2])
    one.params = host(sharded.params)
    a = sharded.evaluate(X, y, batch_size=25, verbose=0)
    b = one.evaluate(X, y, batch_size=25, verbose=0)
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
