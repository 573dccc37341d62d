"""Regularizers: values and gradients against hand computation on a small MLP."""

import doctest

import chex
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hkfit import regularizers
from hkfit.regularizers import Regularizer, get, l1, l1_l2, l2


def mlp_params():
    """Params of ``hk.nets.MLP([3, 2])`` on 4 features, filled with distinct known values."""
    init = hk.transform(lambda x: hk.nets.MLP([3, 2])(x)).init
    params = init(jax.random.PRNGKey(0), jnp.zeros((1, 4)))
    leaves, treedef = jax.tree_util.tree_flatten(params)
    filled, start = [], 1.0
    for leaf in leaves:
        n = leaf.size
        values = np.arange(start, start + n, dtype=np.float32) / 10 * (-1) ** np.arange(n)
        filled.append(jnp.asarray(values.reshape(leaf.shape)))
        start += n
    return jax.tree_util.tree_unflatten(treedef, filled)


PARAMS = mlp_params()
L0, L1 = "mlp/~/linear_0", "mlp/~/linear_1"


def sq(*arrays):
    return float(sum(np.sum(np.square(np.asarray(a, np.float64))) for a in arrays))


def ab(*arrays):
    return float(sum(np.sum(np.abs(np.asarray(a, np.float64))) for a in arrays))


def test_params_tree_is_the_expected_haiku_layout():
    assert set(PARAMS) == {L0, L1}
    assert PARAMS[L0]["w"].shape == (4, 3) and PARAMS[L1]["b"].shape == (2,)
    assert float(jnp.min(jnp.abs(PARAMS[L0]["b"]))) > 0  # biases are not zero


class RegularizersTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_l2_every_parameter_and_weights_only(self):
        p = PARAMS
        every = self.variant(l2(0.1))(p)
        chex.assert_shape(every, ())
        assert every.dtype == jnp.float32
        w_all = (p[L0]["w"], p[L0]["b"], p[L1]["w"], p[L1]["b"])
        np.testing.assert_allclose(every, 0.1 * sq(*w_all), rtol=1e-6)
        weights = self.variant(l2(0.1, include=r"/w$"))(p)
        np.testing.assert_allclose(weights, 0.1 * sq(p[L0]["w"], p[L1]["w"]), rtol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_exclude_a_module_and_list_of_patterns(self):
        p = PARAMS
        value = self.variant(l2(0.3, exclude="linear_1"))(p)
        np.testing.assert_allclose(value, 0.3 * sq(p[L0]["w"], p[L0]["b"]), rtol=1e-6)
        both = self.variant(l2(0.3, include=[r"linear_0/w$", r"linear_1/b$"]))(p)
        np.testing.assert_allclose(both, 0.3 * sq(p[L0]["w"], p[L1]["b"]), rtol=1e-6)
        inc_exc = self.variant(l1(0.2, include=r"/w$", exclude=L0))(p)
        np.testing.assert_allclose(inc_exc, 0.2 * ab(p[L1]["w"]), rtol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_predicate_form_matches_the_regex_form(self):
        p = PARAMS
        by_ndim = self.variant(l2(0.1, include=lambda module, name, value: value.ndim == 2))(p)
        by_name = self.variant(l2(0.1, include=lambda module, name, value: name == "w"))(p)
        by_regex = l2(0.1, include=r"/w$")(p)
        chex.assert_trees_all_close(by_ndim, by_regex)
        chex.assert_trees_all_close(by_name, by_regex)
        not_last = self.variant(l1(0.1, exclude=lambda module, name, value: module == L1))(p)
        np.testing.assert_allclose(not_last, 0.1 * ab(p[L0]["w"], p[L0]["b"]), rtol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_l1_and_l1_l2_and_addition(self):
        p = PARAMS
        w = (p[L0]["w"], p[L1]["w"])
        np.testing.assert_allclose(self.variant(l1(0.5, include="/w$"))(p), 0.5 * ab(*w), rtol=1e-6)
        both = self.variant(l1_l2(0.5, 0.25, include="/w$"))(p)
        np.testing.assert_allclose(both, 0.5 * ab(*w) + 0.25 * sq(*w), rtol=1e-6)
        added = self.variant(l1(0.5, include="/w$") + l2(0.25, include="/w$"))(p)
        chex.assert_trees_all_close(added, both, rtol=1e-6)
        mixed = self.variant(l2(0.25, include="/w$") + l1(0.1, include="/b$"))(p)
        expected = 0.25 * sq(*w) + 0.1 * ab(p[L0]["b"], p[L1]["b"])
        np.testing.assert_allclose(mixed, expected, rtol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_l2_gradient_is_two_factor_w_on_selected_leaves_only(self):
        grads = self.variant(jax.grad(l2(0.1, include=r"/w$")))(PARAMS)
        chex.assert_trees_all_equal_structs(grads, PARAMS)
        for module in (L0, L1):
            chex.assert_trees_all_close(grads[module]["w"], 2 * 0.1 * PARAMS[module]["w"])
            chex.assert_trees_all_equal(grads[module]["b"], jnp.zeros_like(PARAMS[module]["b"]))

    @chex.variants(with_jit=True, without_jit=True)
    def test_l1_gradient_is_factor_sign_w(self):
        grads = self.variant(jax.grad(l1(0.3, exclude=L1)))(PARAMS)
        chex.assert_trees_all_close(
            grads[L0], jax.tree.map(lambda w: 0.3 * jnp.sign(w), PARAMS[L0])
        )
        chex.assert_trees_all_equal(grads[L1], jax.tree.map(jnp.zeros_like, PARAMS[L1]))


def test_low_precision_params_give_a_float32_scalar():
    p = jax.tree.map(lambda w: w.astype(jnp.bfloat16), PARAMS)
    value = l2(0.1)(p)
    assert value.dtype == jnp.float32 and value.shape == ()
    expected = 0.1 * sq(*jax.tree.leaves(jax.tree.map(lambda w: w.astype(jnp.float32), p)))
    np.testing.assert_allclose(value, expected, rtol=1e-5)


def test_combining_with_sum_and_plain_callables():
    p = PARAMS
    a, b = l2(0.1, include="/w$"), l1(0.2)
    chex.assert_trees_all_close(sum([a, b])(p), a(p) + b(p))
    extra = lambda params: 1.5
    chex.assert_trees_all_close((a + extra)(p), a(p) + 1.5)
    chex.assert_trees_all_close((extra + a)(p), a(p) + 1.5)
    assert isinstance(extra + a, Regularizer)
    assert (extra + a).terms[0] is extra
    assert Regularizer()(p).shape == ()
    with pytest.raises(TypeError):
        a + 3
    with pytest.raises(ValueError, match="return a scalar"):
        (a + (lambda params: jnp.ones(2)))(p)


def test_repr_equality_and_hash():
    assert repr(l2()) == "l2(factor=0.01)"
    assert repr(l1(0.5, include=r"/w$", exclude="linear_1")) == (
        "l1(factor=0.5, include='/w$', exclude='linear_1')"
    )
    assert repr(l1_l2(0.1, 0.2, include=["a", "b"])) == "l1_l2(l1=0.1, l2=0.2, include=['a', 'b'])"

    def weights(module, name, value):
        return name == "w"

    combined = l2(0.1, include=weights) + l1(0.2)
    assert repr(combined) == (
        "l2(factor=0.1, include=test_repr_equality_and_hash.<locals>.weights) + l1(factor=0.2)"
    )
    assert l2(0.1, include="/w$") == l2(0.1, include="/w$")
    assert l2(0.1) != l1(0.1)
    assert hash(l2(0.1, include=["a", "b"])) == hash(l2(0.1, include=["a", "b"]))


def test_no_match_lists_the_available_paths():
    reg = l2(0.1, include=r"/kernel$")
    with pytest.raises(ValueError, match=r"include='/kernel\$'") as info:
        reg(PARAMS)
    for path in ("mlp/~/linear_0/w", "mlp/~/linear_0/b", "mlp/~/linear_1/w"):
        assert repr(path) in str(info.value)
    with pytest.raises(ValueError, match="matched none"):
        jax.jit(reg)(PARAMS)
    with pytest.raises(ValueError, match=r"include='/w\$', exclude='mlp'"):
        l1(include="/w$", exclude="mlp")(PARAMS)
    # Without `include`, an empty selection is a zero penalty, not an error.
    assert float(l2(0.1, exclude="mlp")(PARAMS)) == 0.0
    assert float(l2(0.1)({})) == 0.0


def test_traced_predicate_is_reported():
    reg = l2(include=lambda module, name, value: jnp.sum(value) > 0)
    with pytest.raises(TypeError, match="`include` predicate must return a Python bool"):
        jax.jit(reg)(PARAMS)


@pytest.mark.parametrize(
    "build, error, match",
    [
        (lambda: l2(-0.1), ValueError, r"`factor`.*Received: factor=-0.1"),
        (lambda: l2(float("nan")), ValueError, r"finite float >= 0. Received: factor=nan"),
        (lambda: l1(float("inf")), ValueError, "Received: factor=inf"),
        (lambda: l2("0.1"), TypeError, r"`factor`.*Received: factor='0.1' of type str"),
        (lambda: l2(True), TypeError, "`factor`"),
        (lambda: l2(jnp.array(0.1)), TypeError, "`factor`"),
        (lambda: l1_l2(l1=-1.0), ValueError, "Received: l1=-1.0"),
        (lambda: l1_l2(l2=None), TypeError, "Received: l2=None"),
        (lambda: l2(include="("), ValueError, r"`include` to be a valid regular.*include='\('"),
        (lambda: l2(exclude=["ok", "["]), ValueError, r"`exclude`.*exclude='\['"),
        (lambda: l2(include=3), TypeError, "Received: include=3 of type int"),
        (lambda: l2(include=[]), ValueError, r"`include` to hold at least one.*include=\[\]"),
        (lambda: l2(exclude=["a", 3]), TypeError, "every item of `exclude`"),
    ],
)
def test_bad_arguments(build, error, match):
    with pytest.raises(error, match=match):
        build()


def test_valid_factor_forms():
    assert l2(0)(PARAMS) == 0.0
    assert repr(l2(1)) == "l2(factor=1.0)"
    assert repr(l1(np.float32(0.5))) == "l1(factor=0.5)"


def test_get():
    reg = l2(1e-4)
    fn = lambda params: 0.0
    assert get(None) is None
    assert get(reg) is reg
    assert get(fn) is fn
    with pytest.raises(TypeError, match=r"`regularizer`.*Received: regularizer='l2'.*l2\(\)"):
        get("l2")
    with pytest.raises(TypeError, match=r"Received: regularizer=0\.1 of type float"):
        get(0.1)


def test_docstring_examples():
    assert doctest.testmod(regularizers).failed == 0
