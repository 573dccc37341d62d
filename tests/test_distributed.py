"""Tests for hkfit.distributed: DataParallel on 8 virtual CPU devices, and two processes.

Run as a script (``python tests/test_distributed.py worker PID PORT OUTDIR``) this file
is one process of the two-process test below.
"""

import json
import os
import sys
import warnings

import _processes as processes
import chex
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import hkfit
from hkfit import distributed
from hkfit._row_blocks import BlockPlan
from hkfit.step import Batch

N, BATCH = 203, 16  # 203 % 16 = 11 rows in each epoch's last batch, not a multiple of 8


def _data(n=N, seed=0):
    rng = np.random.RandomState(seed)
    x = rng.randn(n, 5).astype(np.float32)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(np.int32)
    return x, y


def _bn_forward(x, is_training):
    h = hk.Linear(16)(x)
    h = hk.BatchNorm(True, True, 0.9)(h, is_training)
    return hk.Linear(2)(jax.nn.relu(h))


def _mlp_forward(x):
    h = jax.nn.relu(hk.Linear(8)(x))  # "linear": w of shape (5, 8)
    return hk.Linear(2)(h)  # "linear_1": w of shape (8, 2)


def _model(forward=_bn_forward, distribution=None):
    return hkfit.Model(
        forward,
        loss="sparse_categorical_crossentropy",
        optimizer=optax.sgd(0.1),
        metrics=["accuracy"],
        seed=0,
        distribution=distribution,
    )


def _history_close(a, b):
    assert a.epoch == b.epoch
    assert sorted(a.history) == sorted(b.history)
    chex.assert_trees_all_close(a.history, b.history, atol=1e-5)


@pytest.fixture(scope="module")
def runs():
    """The same fit/evaluate/predict on one device and data-parallel over 8 devices."""
    x, y = _data()
    out = {}
    for name, dist in (("single", None), ("dp", hkfit.DataParallel(data_placement="replicated"))):
        model = _model(distribution=dist)
        history = model.fit(
            x, y, batch_size=BATCH, epochs=2, shuffle=True, verbose=0, validation_split=0.1
        )
        out[name] = dict(
            model=model,
            history=history,
            evaluate=model.evaluate(x, y, batch_size=30, verbose=0),
            predict=model.predict(x, batch_size=30),
        )
    return out


def test_eight_devices():
    assert jax.device_count() == 8, "tests/conftest.py sets 8 virtual CPU devices"
    dp = hkfit.DataParallel()
    assert dp.num_replicas == 8 and dict(dp.mesh.shape) == {"data": 8}


@pytest.mark.slow
def test_fit_matches_single_device(runs):
    single, dp = runs["single"]["model"], runs["dp"]["model"]
    chex.assert_trees_all_close(jax.device_get(dp.params), jax.device_get(single.params), atol=1e-5)
    # 182 training rows: 11 batches of 16 and a last one of 6 rows per epoch, all trained on
    assert dp.step == single.step == 2 * 12


@pytest.mark.slow
def test_batchnorm_statistics_are_global(runs):
    chex.assert_trees_all_close(
        jax.device_get(runs["dp"]["model"].state),
        jax.device_get(runs["single"]["model"].state),
        atol=1e-5,
    )


@pytest.mark.slow
def test_history_matches_single_device(runs):
    _history_close(runs["dp"]["history"], runs["single"]["history"])
    assert "val_accuracy" in runs["dp"]["history"].history


@pytest.mark.slow
def test_evaluate_and_predict_exact_on_uneven_data(runs):
    single, dp = runs["single"], runs["dp"]
    chex.assert_trees_all_close(dp["evaluate"], single["evaluate"], atol=1e-5)
    assert dp["predict"].shape == (N, 2)
    chex.assert_trees_all_close(dp["predict"], single["predict"], atol=1e-5)
    model = dp["model"]
    whole = model.apply_fn(model.params, model.state, jnp.asarray(_data()[0]))
    chex.assert_trees_all_close(dp["predict"], np.asarray(whole), atol=1e-5)
    _, y = _data()
    accuracy = np.mean(np.argmax(dp["predict"], -1) == y)
    assert dp["evaluate"]["accuracy"] == pytest.approx(accuracy, abs=1e-6)


@pytest.mark.slow
def test_state_replicated_and_step_data_parallel(runs):
    model, dp = runs["dp"]["model"], runs["dp"]["model"].distribution
    for leaf in jax.tree_util.tree_leaves(model.train_state):
        assert leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == 8
    # the compiled training step splits the batch and sums gradients across devices
    x, y = _data()
    data = dp.place_rows(Batch(x, y, np.ones(N, np.float32)))
    idx = dp.place_state(jnp.arange(BATCH, dtype=jnp.int32)[None])
    train = model._program.train_run(model.train_state, fuse=False)
    logs = model._program.empty_logs()
    hlo = train.lower(model.train_state, logs, data, idx, 0, 1).compile().as_text()
    assert "all-reduce" in hlo


@pytest.mark.slow
def test_last_partial_batch_is_trained_on():
    x, y = _data(5)  # fewer rows than one batch: the only batch is the partial one
    single, dp = _model(_mlp_forward), _model(_mlp_forward, hkfit.DataParallel())
    dp.init(x)
    before = jax.tree_util.tree_map(np.array, dp.params)
    for model in (single, dp):
        model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert dp.step == 1
    assert not np.allclose(before["linear"]["w"], np.asarray(dp.params["linear"]["w"]))
    chex.assert_trees_all_close(jax.device_get(dp.params), jax.device_get(single.params), atol=1e-5)


@pytest.mark.slow
def test_iterable_fit_matches_single_device():
    x, y = _data(43)  # batches of 16, 16 and 11 rows

    def batches():
        for start in range(0, len(x), BATCH):
            yield x[start : start + BATCH], y[start : start + BATCH]

    single, dp = _model(_mlp_forward), _model(_mlp_forward, hkfit.DataParallel())
    logs = [m.fit(batches(), epochs=1, verbose=0) for m in (single, dp)]
    _history_close(logs[1], logs[0])
    assert dp.step == 3
    chex.assert_trees_all_close(jax.device_get(dp.params), jax.device_get(single.params), atol=1e-5)


@pytest.mark.slow
def test_param_sharding_on_2d_mesh():
    x, y = _data(64)
    dp = hkfit.DataParallel(
        mesh_shape={"data": 4, "model": 2},
        param_sharding=[(r"^linear/w$", P(None, "model"))],
        data_placement="replicated",  # the one-device batches
    )
    single, sharded = _model(_mlp_forward), _model(_mlp_forward, dp)
    for model in (single, sharded):
        model.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=True)
    w = sharded.params["linear"]["w"]
    assert w.sharding.is_equivalent_to(jax.sharding.NamedSharding(dp.mesh, P(None, "model")), 2)
    assert w.addressable_shards[0].data.shape == (5, 4)
    chex.assert_trees_all_close(
        jax.device_get(sharded.params), jax.device_get(single.params), atol=1e-5
    )


# --- Bad input ----------------------------------------------------------------------------


def test_indivisible_batch_size_suggests_nearest():
    x, y = _data(40)
    model = _model(_mlp_forward, hkfit.DataParallel())
    with pytest.raises(
        ValueError,
        match=r"multiple of 8.*batch_size=30.*batch_size=24 or "
        r"batch_size=32",
    ):
        model.fit(x, y, batch_size=30, verbose=0)
    assert not model.built  # refused before any step (and before building)
    with pytest.raises(ValueError, match=r"Use batch_size=8\."):
        hkfit.DataParallel().local_batch_size(3)


@pytest.mark.slow
def test_evaluate_and_predict_accept_any_batch_size():
    x, y = _data(21)
    model = _model(_mlp_forward, hkfit.DataParallel())
    model.init(x)
    reference = np.asarray(model.apply_fn(model.params, model.state, jnp.asarray(x)))
    chex.assert_trees_all_close(model.predict(x, batch_size=5), reference, atol=1e-6)
    assert model.evaluate(x, y, batch_size=5, verbose=0)["accuracy"] == pytest.approx(
        np.mean(reference.argmax(-1) == y), abs=1e-6
    )


def test_rule_matching_nothing_warns():
    dp = hkfit.DataParallel(
        mesh_shape={"data": 4, "model": 2}, param_sharding=[("no_such_layer", P("model"))]
    )
    with pytest.warns(UserWarning, match="no_such_layer.*matches no parameter.*linear/w"):
        _model(_mlp_forward, dp).init(_data(8)[0])


def test_rule_with_indivisible_dimension_raises():
    dp = hkfit.DataParallel(
        mesh_shape={"data": 2, "model": 4}, param_sharding=[("linear_1/w", P(None, "model"))]
    )
    # linear_1/w has shape (8, 2): 2 output columns cannot be split over 4 devices
    with pytest.raises(ValueError, match=r"linear_1/w.*\(8, 2\).*size 4.*not divisible"):
        _model(_mlp_forward, dp).init(_data(8)[0])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(mesh_shape={"data": 3}), "multiply to the number of devices, 8"),
        (dict(mesh_shape={"batch": 8}), "includes the batch axis 'data'"),
        (
            dict(mesh_shape={"data": 4, "model": 2}, param_sharding=[("w", P("tensor"))]),
            "mesh axis 'tensor'",
        ),
        (dict(param_sharding=[("w", None)]), r"pair \(regex, PartitionSpec\)"),
        (dict(param_sharding=[("(", P())]), "Invalid regex"),
        (dict(devices=[]), "at least one device"),
    ],
)
def test_bad_configuration(kwargs, match):
    with pytest.raises(ValueError, match=match):
        hkfit.DataParallel(**kwargs)


# --- Pieces -------------------------------------------------------------------------------


def test_subset_of_devices_and_mesh_axes():
    dp = hkfit.DataParallel(jax.devices()[:4], axis_name="batch")
    assert dp.num_replicas == 4 and dp.mesh.axis_names == ("batch",)
    assert dp.local_batch_size(12) == 12  # one process: every row is this process's
    axis_types = getattr(dp.mesh, "axis_types", None)
    if hasattr(jax.sharding, "AxisType"):
        assert all(t == jax.sharding.AxisType.Auto for t in axis_types)


class LayoutTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_shard_batch_keeps_values(self):
        shard = hkfit.DataParallel().step_options("train")["shard_batch"]
        tree = {"a": jnp.arange(32.0).reshape(16, 2), "b": jnp.arange(16)}
        odd = {"a": jnp.arange(10.0).reshape(5, 2)}  # 5 rows: left unsplit
        chex.assert_trees_all_equal(self.variant(shard)(tree), tree)
        chex.assert_trees_all_equal(self.variant(shard)(odd), odd)

    def test_eval_and_predict_pad_to_the_devices(self):
        dp = hkfit.DataParallel()
        assert dp.step_options("eval")["multiple"] == 8
        assert dp.step_options("predict")["multiple"] == 8


def test_main_process_prints():
    assert distributed.is_main_process()
    assert hkfit.callbacks.resolve_verbose(2) == 2


# --- Two processes ------------------------------------------------------------------------

LOCAL_ROWS, PROCS, MP_BATCH = 51, 2, 8  # 4 rows per process per batch; a last batch of 3+3
# Two CPU devices per process (a 4-device mesh). jaxlib 0.4.x aborts in its gloo set-up
# with several CPU devices per process, so there each process has one device.
_JAX_VERSION = tuple(int(p) for p in jax.__version__.split(".")[:2])
LOCAL_DEVICES = 2 if _JAX_VERSION >= (0, 5) else 1


PLACEMENTS = ("replicated", "sharded")


def _worker(pid: int, port: int, outdir: str) -> None:
    distributed.initialize(f"127.0.0.1:{port}", PROCS, pid)
    x, y = _data(PROCS * LOCAL_ROWS, seed=1)
    mine = slice(pid * LOCAL_ROWS, (pid + 1) * LOCAL_ROWS)
    for placement in PLACEMENTS:
        model = _model(distribution=hkfit.DataParallel(data_placement=placement))
        history = model.fit(
            x[mine], y[mine], batch_size=MP_BATCH, epochs=1, shuffle=False, verbose=2
        )
        evaluate = model.evaluate(x[mine], y[mine], batch_size=10, verbose=0)
        result = {
            "history": history.history,
            "evaluate": evaluate,
            "devices": jax.device_count(),
            "processes": jax.process_count(),
            # single batches from each process: 4 + 4 rows (split) and 5 + 5 rows
            "batches": [model.test_on_batch(x[mine][:k], y[mine][:k]) for k in (4, 5)],
        }
        params = {f"{m}/{n}": np.asarray(v) for m, d in model.params.items() for n, v in d.items()}
        out = os.path.join(outdir, f"{placement}{pid}")
        np.savez(out + ".npz", predict=model.predict(x[:7]), **params)
        with open(out + ".json", "w") as f:
            json.dump(result, f)


def _multihost_order(placement: str) -> list[int]:
    """The rows of the global batches, in order, as one process would see them."""
    if placement == "replicated":  # batch b: process 0's local batch b, then process 1's
        local = MP_BATCH // PROCS
        return [
            p * LOCAL_ROWS + r
            for start in range(0, LOCAL_ROWS, local)
            for p in range(PROCS)
            for r in range(start, min(start + local, LOCAL_ROWS))
        ]
    # sharded: each process cuts its rows into one block per local device; batch b is
    # every block's local batch b, and the leftover rows of every block end the epoch
    plan = BlockPlan(LOCAL_ROWS, LOCAL_DEVICES)
    full, tail = plan.epoch_order(
        jax.random.key(0),
        0,
        local_batch_size=MP_BATCH // (PROCS * LOCAL_DEVICES),
        shuffle=False,
        processes=PROCS,
    )
    starts = [p * LOCAL_ROWS + offset for p in range(PROCS) for offset in plan.offsets]
    order = [starts[g] + r for batch in full for g, rows in enumerate(batch) for r in rows]
    if tail is not None:
        flat = (np.asarray(starts)[:, None] + tail.local[0]).reshape(-1)
        order += flat[tail.keep].tolist()
    return order


@pytest.mark.slow
def test_two_processes_train_together(tmp_path):
    if not hasattr(jax, "make_array_from_process_local_data"):
        pytest.skip(f"jax {jax.__version__} lacks jax.make_array_from_process_local_data")
    outputs = processes.run(__file__, PROCS, LOCAL_DEVICES, tmp_path, timeout=300)
    assert "Epoch 1/1" in outputs[0] and "Epoch 1/1" not in outputs[1]  # process 0 prints

    x, y = _data(PROCS * LOCAL_ROWS, seed=1)
    for placement in PLACEMENTS:
        results = [json.load(open(tmp_path / f"{placement}{pid}.json")) for pid in range(PROCS)]
        params = [dict(np.load(tmp_path / f"{placement}{pid}.npz")) for pid in range(PROCS)]
        assert results[0]["devices"] == PROCS * LOCAL_DEVICES
        assert results[0]["processes"] == PROCS
        chex.assert_trees_all_equal(params[0], params[1])
        assert results[0] == results[1]

        # One process fed the same global batches, in order (the last one: 3 + 3 rows)
        order = _multihost_order(placement)
        assert sorted(order) == list(range(PROCS * LOCAL_ROWS))
        model = _model()
        history = model.fit(
            x[order], y[order], batch_size=MP_BATCH, epochs=1, shuffle=False, verbose=0
        )
        chex.assert_trees_all_close(results[0]["history"], history.history, atol=1e-5)
        chex.assert_trees_all_close(
            results[0]["evaluate"], model.evaluate(x, y, verbose=0), atol=1e-5
        )
        for k, logs in zip((4, 5), results[0]["batches"]):
            rows = [p * LOCAL_ROWS + r for p in range(PROCS) for r in range(k)]
            chex.assert_trees_all_close(logs, model.test_on_batch(x[rows], y[rows]), atol=1e-5)
        expected = {
            f"{m}/{n}": np.asarray(v) for m, d in model.params.items() for n, v in d.items()
        }
        predict = params[0].pop("predict")
        chex.assert_trees_all_close(params[0], expected, atol=1e-5)
        chex.assert_trees_all_close(predict, model.predict(x[:7]), atol=1e-5)


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    warnings.simplefilter("ignore")
    _worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
