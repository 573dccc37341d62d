"""DataParallel(param_sharding="fsdp") on 8 virtual CPU devices."""

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import hkfit
from hkfit._layout import FSDP_MIN_SIZE, FullySharded
from hkfit.step import Batch

pytestmark = pytest.mark.skipif(
    jax.device_count() < 8, reason="needs 8 devices (tests/conftest.py sets 8 CPU devices)"
)


def forward(x):
    h = jax.nn.relu(hk.Linear(256)(x))
    h = jax.nn.relu(hk.Linear(512)(h))
    return hk.Linear(10)(h)


RNG = np.random.default_rng(0)
X = RNG.normal(size=(512, 64)).astype(np.float32)
Y = RNG.integers(0, 10, 512)


def per_device_bytes(tree):
    return sum(
        leaf.addressable_shards[0].data.nbytes
        for leaf in jax.tree_util.tree_leaves(tree)
        if isinstance(leaf, jax.Array)
    )


def total_bytes(tree):
    return sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(tree))


@pytest.fixture(scope="module")
def runs():
    out = {}
    for mode in (None, "fsdp"):
        model = hkfit.Model(
            forward,
            loss="sparse_categorical_crossentropy",
            optimizer="adam",
            seed=0,
            distribution=hkfit.DataParallel(param_sharding=mode),
        )
        history = model.fit(X, Y, epochs=2, batch_size=64, verbose=0, steps_per_execution=1)
        out[mode] = (model, history)
    return out


def test_large_parameters_are_split_along_their_largest_divisible_dimension(runs):
    model, _ = runs["fsdp"]
    specs = {
        (layer, name): value.sharding.spec
        for layer, values in model.params.items()
        for name, value in values.items()
    }
    assert specs[("linear", "w")] == P(None, "data")  # 64 x 256: 256 is the larger
    assert specs[("linear_1", "w")] == P(None, "data")  # 256 x 512
    assert specs[("linear_2", "w")] == P()  # 512 x 10 = 5,120 elements: too small
    assert specs[("linear", "b")] == P()


def test_parameter_and_optimizer_bytes_per_device_fall_about_eightfold(runs):
    fsdp, _ = runs["fsdp"]
    replicated, _ = runs[None]
    params = total_bytes(fsdp.params)
    assert per_device_bytes(replicated.params) == params
    assert per_device_bytes(fsdp.params) < params / 6  # the small leaves stay whole
    assert per_device_bytes(fsdp.opt_state) < per_device_bytes(replicated.opt_state) / 6


def test_the_loss_equals_the_replicated_run(runs):
    _, fsdp = runs["fsdp"]
    _, replicated = runs[None]
    np.testing.assert_allclose(fsdp.history["loss"], replicated.history["loss"], rtol=1e-5)
    a = jax.tree_util.tree_leaves(jax.device_get(runs["fsdp"][0].params))
    b = jax.tree_util.tree_leaves(jax.device_get(runs[None][0].params))
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=5e-5)  # Adam amplifies sum orders


def test_the_step_gathers_parameters_and_scatters_gradients(runs):
    model, _ = runs["fsdp"]
    program = model._program
    run = program.train_run(model.train_state, False)
    layout = model.distribution
    data = layout.place_rows(Batch(X, Y.astype(np.int32), np.ones(512, np.float32)))
    idx = layout.place_state(jnp.arange(512, dtype=jnp.int32).reshape(8, 64))
    text = (
        run.lower(model.train_state, program.empty_logs(train=True), data, idx, 0, 1)
        .compile()
        .as_text()
    )
    assert "all-gather" in text  # each split parameter, where the forward uses it
    # Each gradient is reduced across devices and each device keeps its own shard: a
    # reduce-scatter on GPU and TPU; XLA:CPU writes it as an all-reduce and a slice.
    assert "reduce-scatter" in text or ("all-reduce" in text and "dynamic-slice" in text)


def test_fsdp_rules():
    rules = FullySharded("data", {"data": 8}, FSDP_MIN_SIZE)
    assert rules.spec_for("a/w", (8, 4096)) == P(None, "data")
    assert rules.spec_for("a/w", (4096, 12)) == P("data")  # 12 is not divisible by 8
    assert rules.spec_for("a/w", (4097, 13)) == P()  # nothing divisible
    assert rules.spec_for("a/b", (4096,)) == P()  # 4,096 < FSDP_MIN_SIZE elements
    assert rules.spec_for("conv/w", (3, 3, 64, 128)) == P(None, None, None, "data")


def test_an_unknown_word_is_refused():
    with pytest.raises(ValueError, match="'fsdp'"):
        hkfit.DataParallel(param_sharding="zero3")
