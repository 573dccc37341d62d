"""Tests for hkfit.optimizers: grouped learning rates and schedule-free evaluation params."""

import doctest

import chex
import jax
import jax.numpy as jnp
import optax
import pytest

from hkfit import optimizers

PARAMS = {"a": jnp.ones(3), "b": jnp.ones(2)}
LABELS = {"a": "a", "b": "b"}
GROUPERS = [
    pytest.param(getattr(optax, name), id=name)
    for name in ("multi_transform", "partition")
    if hasattr(optax, name)
]


def inject(make, rate):
    return optax.inject_hyperparams(make)(learning_rate=rate)


def two_groups(group=optax.multi_transform):
    """SGD (0.1) on ``a``, Adam (0.01) on ``b``: one injected rate per group."""
    return group({"a": inject(optax.sgd, 0.1), "b": inject(optax.adam, 0.01)}, LABELS)


def grads_like(params, value=1.0):
    return jax.tree.map(lambda p: jnp.full_like(p, value), params)


# --- Reading ---------------------------------------------------------------------------------


@pytest.mark.parametrize("group", GROUPERS)
def test_learning_rates_of_groups(group):
    state = two_groups(group).init(PARAMS)
    rates = optimizers.learning_rates(state)
    assert list(rates) == ["a", "b"]
    assert rates == pytest.approx({"a": 0.1, "b": 0.01})
    assert optimizers.learning_rate(state) == pytest.approx(0.1)


def test_learning_rate_is_first_group_by_name():
    optimizer = optax.multi_transform(
        {"head": inject(optax.sgd, 0.5), "encoder": inject(optax.sgd, 0.25)},
        {"a": "head", "b": "encoder"},
    )
    state = optimizer.init(PARAMS)
    assert list(optimizers.learning_rates(state)) == ["encoder", "head"]
    assert optimizers.learning_rate(state) == 0.25


def test_single_optimizer_unchanged():
    state = inject(optax.sgd, 0.5).init(PARAMS)
    assert optimizers.learning_rates(state) == {"": 0.5}
    assert optimizers.learning_rate(state) == 0.5
    new = optimizers.set_learning_rate(state, 0.25)
    assert optimizers.learning_rate(new) == 0.25
    assert optimizers.learning_rate(state) == 0.5  # pure
    assert type(new) is type(state)
    named = optimizers.get("adam").init(PARAMS)
    assert optimizers.learning_rate(named) == pytest.approx(1e-3)


def test_no_injected_rate():
    state = optax.adam(1e-3).init(PARAMS)
    assert optimizers.learning_rates(state) == {}
    assert optimizers.learning_rate(state) is None
    with pytest.raises(ValueError, match=r"inject_hyperparams\(optax.adam\)"):
        optimizers.set_learning_rate(state, 0.1)
    with pytest.raises(ValueError, match=r"inject_hyperparams\(optax.adam\)"):
        optimizers.scale_learning_rates(state, 0.5)
    with pytest.raises(ValueError, match=r"inject_hyperparams\(optax.adam\)"):
        optimizers.set_learning_rate(state, 0.1, group="a")


def test_chain_with_clip():
    state = optax.chain(optax.clip(1.0), inject(optax.adam, 0.5)).init(PARAMS)
    assert optimizers.learning_rates(state) == {"": 0.5}
    new = optimizers.set_learning_rate(state, 0.25)
    assert optimizers.learning_rate(new) == 0.25
    assert type(new) is type(state) and type(new[1]) is type(state[1])
    assert new[0] is state[0]
    chex.assert_trees_all_equal(new[1].inner_state, state[1].inner_state)


def test_masked_inner():
    state = optax.masked(inject(optax.sgd, 0.5), {"a": True, "b": False}).init(PARAMS)
    assert isinstance(state, optax.MaskedState)
    assert optimizers.learning_rates(state) == {"": 0.5}
    new = optimizers.scale_learning_rates(state, 0.5)
    assert isinstance(new, optax.MaskedState)
    assert optimizers.learning_rates(new) == {"": 0.25}


def test_groups_of_chains_and_wrappers():
    optimizer = optax.multi_transform(
        {
            "a": optax.chain(optax.clip(1.0), inject(optax.sgd, 0.5)),
            "b": optax.MultiSteps(inject(optax.adam, 0.25), every_k_schedule=2),
        },
        LABELS,
    )
    state = optimizer.init(PARAMS)
    assert optimizers.learning_rates(state) == {"a": 0.5, "b": 0.25}
    new = optimizers.set_learning_rate(state, 0.125, group="b")
    assert optimizers.learning_rates(new) == {"a": 0.5, "b": 0.125}


def test_nested_groups_and_repeated_paths():
    inner = optax.multi_transform(
        {"x": inject(optax.sgd, 0.5), "y": inject(optax.sgd, 0.25)}, {"a": "x", "b": "y"}
    )
    outer = optax.multi_transform({"outer": inner}, {"a": "outer", "b": "outer"})
    state = outer.init(PARAMS)
    assert optimizers.learning_rates(state) == {"outer/x": 0.5, "outer/y": 0.25}

    twice = optax.chain(inject(optax.sgd, 0.5), inject(optax.sgd, 0.25)).init(PARAMS)
    assert optimizers.learning_rates(twice) == {"": 0.5, "#2": 0.25}
    assert optimizers.learning_rate(twice) == 0.5  # the first one, depth first
    new = optimizers.set_learning_rate(twice, 1.0, group="#2")
    assert optimizers.learning_rates(new) == {"": 0.5, "#2": 1.0}


# --- Writing ---------------------------------------------------------------------------------


@pytest.mark.parametrize("group", GROUPERS)
def test_set_every_group(group):
    state = two_groups(group).init(PARAMS)
    new = optimizers.set_learning_rate(state, 0.5)
    assert optimizers.learning_rates(new) == {"a": 0.5, "b": 0.5}
    assert optimizers.learning_rates(state) == pytest.approx({"a": 0.1, "b": 0.01})
    assert type(new) is type(state)


def test_set_one_group():
    state = two_groups().init(PARAMS)
    new = optimizers.set_learning_rate(state, 0.5, group="b")
    assert optimizers.learning_rates(new) == pytest.approx({"a": 0.1, "b": 0.5})
    assert new.inner_states["a"] is state.inner_states["a"]
    chex.assert_trees_all_equal(
        new.inner_states["b"].inner_state.inner_state,
        state.inner_states["b"].inner_state.inner_state,
    )


def test_unknown_group():
    state = two_groups().init(PARAMS)
    with pytest.raises(ValueError, match=r"`group`.*\['a', 'b'\].*group='c'"):
        optimizers.set_learning_rate(state, 0.5, group="c")
    with pytest.raises(ValueError, match=r"`group`.*\['a', 'b'\].*group='c'"):
        optimizers.scale_learning_rates(state, 0.5, group="c")
    single = inject(optax.sgd, 0.5).init(PARAMS)
    with pytest.raises(ValueError, match=r"\[''\].*group='a'"):
        optimizers.set_learning_rate(single, 0.5, group="a")


def test_scale_learning_rates():
    state = two_groups().init(PARAMS)
    new = optimizers.scale_learning_rates(state, 0.5)
    assert optimizers.learning_rates(new) == pytest.approx({"a": 0.05, "b": 0.005})
    only_a = optimizers.scale_learning_rates(state, 0.5, group="a")
    assert optimizers.learning_rates(only_a) == pytest.approx({"a": 0.05, "b": 0.01})


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf"), "x"])
def test_invalid_numbers(bad):
    state = two_groups().init(PARAMS)
    with pytest.raises(ValueError, match="learning_rate"):
        optimizers.set_learning_rate(state, bad)
    with pytest.raises(ValueError, match="factor"):
        optimizers.scale_learning_rates(state, bad)


def rate_of(state, group):
    return state.inner_states[group].inner_state.hyperparams["learning_rate"]


def test_dtype_and_weak_type_survive_jitted_steps():
    optimizer = two_groups()
    chex.clear_trace_counter()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(params, state):
        updates, state = optimizer.update(grads_like(params), state, params)
        return optax.apply_updates(params, updates), state

    params, state = step(PARAMS, optimizer.init(PARAMS))
    for change in (
        lambda s: optimizers.set_learning_rate(s, 0.5),
        lambda s: optimizers.set_learning_rate(s, 0.25, group="a"),
        lambda s: optimizers.scale_learning_rates(s, 0.5),
    ):
        new_state = change(state)
        for group in ("a", "b"):
            old, new = rate_of(state, group), rate_of(new_state, group)
            assert (new.dtype, new.weak_type, new.shape) == (old.dtype, old.weak_type, old.shape)
        rate = float(rate_of(new_state, "a"))
        new_params, state = step(params, new_state)  # no new trace (assert_max_traces)
        # SGD on group "a" moved by exactly the new rate, which survived the step.
        chex.assert_trees_all_close(new_params["a"], params["a"] - rate)
        assert float(rate_of(state, "a")) == rate
        params = new_params


@pytest.mark.parametrize("old", [jnp.asarray(0.1), jnp.asarray(0.1, jnp.bfloat16)])
def test_weak_type_and_dtype_kept(old):
    state = inject(optax.sgd, 0.1).init(PARAMS)
    state = state._replace(hyperparams={**state.hyperparams, "learning_rate": old})
    for new in (
        optimizers.set_learning_rate(state, 0.5),
        optimizers.scale_learning_rates(state, 0.5),
    ):
        rate = new.hyperparams["learning_rate"]
        assert (rate.dtype, rate.weak_type) == (old.dtype, old.weak_type)


class PureTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_set_and_scale(self):
        state = two_groups().init(PARAMS)
        set_b = self.variant(lambda s, v: optimizers.set_learning_rate(s, v, group="b"))
        assert optimizers.learning_rates(set_b(state, 0.5)) == pytest.approx({"a": 0.1, "b": 0.5})
        scale = self.variant(optimizers.scale_learning_rates)
        assert optimizers.learning_rates(scale(state, 0.5)) == pytest.approx(
            {"a": 0.05, "b": 0.005}
        )

    @chex.variants(with_jit=True, without_jit=True)
    def test_eval_params(self):
        optimizer = optax.contrib.schedule_free_sgd(learning_rate=0.1)
        params, state = trained(optimizer)
        got = self.variant(optimizers.eval_params)(state, params)
        chex.assert_trees_all_close(got, optax.contrib.schedule_free_eval_params(state, params))


# --- Schedule-free ---------------------------------------------------------------------------


def trained(optimizer, params=PARAMS, steps=3):
    state = optimizer.init(params)
    for i in range(steps):
        updates, state = optimizer.update(grads_like(params, 1.0 + i), state, params)
        params = optax.apply_updates(params, updates)
    return params, state


@pytest.mark.parametrize(
    "optimizer",
    [
        pytest.param(optax.contrib.schedule_free_sgd(learning_rate=0.1), id="sgd"),
        pytest.param(optax.contrib.schedule_free_adamw(learning_rate=0.1), id="adamw"),
    ],
)
def test_eval_params_schedule_free(optimizer):
    params, state = trained(optimizer)
    assert optimizers.is_schedule_free(state)
    got = optimizers.eval_params(state, params)
    chex.assert_trees_all_equal(got, optax.contrib.schedule_free_eval_params(state, params))
    with pytest.raises(AssertionError):
        chex.assert_trees_all_close(got, params)


def test_eval_params_nested_in_inject_and_chain():
    optimizer = optax.chain(
        optax.clip(10.0),
        optax.inject_hyperparams(optax.contrib.schedule_free_sgd)(learning_rate=0.1),
    )
    params, state = trained(optimizer)
    assert optimizers.is_schedule_free(state)
    assert optimizers.learning_rates(state) == pytest.approx({"": 0.1})
    expected = optax.contrib.schedule_free_eval_params(state[1].inner_state, params)
    chex.assert_trees_all_equal(optimizers.eval_params(state, params), expected)


def test_eval_params_one_group_schedule_free():
    optimizer = optax.multi_transform(
        {"a": optax.contrib.schedule_free_sgd(learning_rate=0.1), "b": optax.sgd(0.1)}, LABELS
    )
    params, state = trained(optimizer)
    assert optimizers.is_schedule_free(state)
    got = optimizers.eval_params(state, params)
    assert got["b"] is params["b"]
    alone, alone_state = trained(
        optax.contrib.schedule_free_sgd(learning_rate=0.1), {"a": PARAMS["a"]}
    )
    chex.assert_trees_all_close(
        got["a"], optax.contrib.schedule_free_eval_params(alone_state, alone)["a"]
    )


def test_eval_params_not_schedule_free():
    for optimizer in (optax.sgd(0.1), two_groups(), optimizers.get("adam")):
        params, state = trained(optimizer)
        assert not optimizers.is_schedule_free(state)
        assert optimizers.eval_params(state, params) is params


def test_doctests():
    assert doctest.testmod(optimizers).failed == 0
