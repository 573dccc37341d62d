"""Tests for hkfit.testing: broken layers are caught by name, correct layers pass."""

import doctest
import itertools

import chex
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hkfit.testing
from hkfit.testing import LayerReport, LayerTestCase, assert_compiles_once, check_layer

X = jax.random.normal(jax.random.PRNGKey(42), (4, 3))


def linear(x):
    return hk.Linear(2)(x)


# --- Broken layers: each is caught, and the message names the property. -----------------


def test_batch_mixing_in_eval_mode_is_caught():
    def forward(x, is_training):
        del is_training  # The bug: the batch mean is used in every mode.
        return hk.Linear(2)(x - jnp.mean(x, axis=0))

    with pytest.raises(
        AssertionError,
        match=r"batch_independent\[is_training=False\] failed"
        r".*max abs difference [0-9.]+ at index \(\d+, \d+\)",
    ):
        check_layer(forward, X)


def test_batch_mixing_in_train_mode_without_state_is_caught():
    def forward(x, is_training):  # Not batch statistics: no state records them.
        return hk.Linear(2)(x - jnp.mean(x, axis=0) if is_training else x)

    with pytest.raises(AssertionError, match=r"batch_independent\[is_training=True\] failed"):
        check_layer(forward, X, is_training=True)


def test_nan_output_is_caught():
    with pytest.raises(
        AssertionError,
        match=r"finite_output failed: output has \d+ non-finite"
        r" values of 8 \(first at index \(\d, \d\): nan\)",
    ):
        check_layer(lambda x: jnp.log(linear(x)), X)


def test_inf_output_is_caught_in_a_pytree():
    forward = lambda x: {"ok": linear(x), "bad": linear(x) / 0.0}
    with pytest.raises(AssertionError, match=r"finite_output failed: output\['bad'\]"):
        check_layer(forward, X)


def test_non_finite_gradient_is_caught():
    def forward(x):  # The norm of a zero vector is 0, but its gradient is NaN.
        return jnp.sqrt(jnp.sum(linear(x) ** 2, axis=-1))

    x = X.at[0].set(0.0)  # Row 0 maps to the zero bias.
    with pytest.raises(
        AssertionError,
        match=r"finite_grads failed: .*parameter 'linear/b' "
        r"has 2 non-finite values of 2 \(first at index \(0,\): nan\)",
    ):
        check_layer(forward, x)


def test_python_counter_baked_in_at_trace_time_is_caught():
    calls = itertools.count()

    def forward(x):
        return linear(x) + next(calls)  # A Python int: a constant once traced.

    with pytest.raises(
        AssertionError,
        match=r"jit_consistent failed: jitted and non-jitted "
        r"apply disagree.*max abs difference 1 at index",
    ):
        check_layer(forward, X)


def test_numpy_random_draw_is_caught():
    rng = np.random.default_rng(0)
    forward = lambda x: linear(x) * rng.uniform(1.0, 2.0)
    with pytest.raises(AssertionError, match="jit_consistent failed"):
        check_layer(forward, X)
    with pytest.raises(AssertionError, match="deterministic failed: two calls with the same rng"):
        check_layer(forward, X, jit_consistent=False)


def test_layer_that_ignores_its_rng_key_is_caught():
    def forward(x, is_training):
        if is_training:
            hk.next_rng_key()  # Asks for a key, then forgets to use it.
        return linear(x)

    # Eval mode may ignore the key.
    report = check_layer(forward, X, is_training=False, vmap_consistent=False, finite_grads=False)
    assert "deterministic[is_training=False]" in report.checked
    with pytest.raises(
        AssertionError,
        match=r"deterministic\[is_training=True\] failed: the "
        r"layer calls hk.next_rng_key\(\) but .* it ignores its random key",
    ):
        check_layer(forward, X, is_training=True)


def test_wrong_output_shape_and_dtype_are_caught():
    with pytest.raises(
        AssertionError,
        match=r"output_shape failed: output has shape \(4, 2\), "
        r"expected \(None, 5\)",
    ):
        check_layer(linear, X, output_shape=(None, 5))
    with pytest.raises(AssertionError, match=r"output_shape failed: the output has structure"):
        check_layer(linear, X, output_shape={"logits": (4, 2)})
    with pytest.raises(
        AssertionError, match="output_dtype failed: output has dtype float32, expected bfloat16"
    ):
        check_layer(linear, X, output_dtype=jnp.bfloat16)


def test_output_without_batch_axis_is_caught():
    with pytest.raises(AssertionError, match=r"batch_independent failed: output has shape \(\)"):
        check_layer(lambda x: jnp.sum(linear(x)), X)


def test_param_without_gradient_is_caught_by_path():
    class Scaled(hk.Module):
        def __call__(self, x):
            unused = hk.get_parameter("unused", (2,), init=jnp.ones)
            frozen = hk.get_parameter("frozen", (2,), init=jnp.ones)
            del unused
            return hk.Linear(2)(x) * jax.lax.stop_gradient(frozen)

    with pytest.raises(
        AssertionError,
        match=r"finite_grads failed: .* \['scaled/frozen', "
        r"'scaled/unused'\] in every checked mode",
    ):
        check_layer(lambda x: Scaled()(x), X)


def test_vmap_inconsistency_is_caught():
    @jax.custom_batching.custom_vmap
    def double(v):
        return 2.0 * v

    @double.def_vmap
    def _wrong_rule(axis_size, in_batched, vs):  # Triples instead of doubling.
        del axis_size
        return 3.0 * vs, in_batched[0]

    with pytest.raises(AssertionError, match=r"vmap_consistent failed: .*index \(\d, \d, \d\)"):
        check_layer(lambda x: double(linear(x)), X)


# --- Correct layers pass. ------------------------------------------------------------------


def test_linear_passes_every_check():
    report = check_layer(linear, X, output_shape=(None, 2), output_dtype=jnp.float32)
    assert isinstance(report, LayerReport)
    assert report.checked == (
        "output_shape",
        "output_dtype",
        "finite_output",
        "jit_consistent",
        "deterministic",
        "batch_independent",
        "vmap_consistent",
        "finite_grads",
    )
    assert report.skipped == {}


def test_conv2d_passes():
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 4, 4, 1))
    check_layer(lambda x: hk.Conv2D(2, kernel_shape=3)(x), x, output_shape=(2, 4, 4, 2))


def test_batchnorm_in_train_mode_fails_batch_independence_with_the_fix():
    def forward(x, is_training):
        x = hk.BatchNorm(create_scale=True, create_offset=True, decay_rate=0.9)(
            hk.Linear(4)(x), is_training
        )
        return hk.Linear(2)(jax.nn.relu(x))

    with pytest.raises(
        AssertionError,
        match=r"batch_independent\[is_training=True\] failed: an "
        r"output row changes when its input row is passed alone .* pass "
        r"is_training=False to check eval mode only, or batch_independent=False",
    ):
        check_layer(forward, X, output_shape=(4, 2))
    report = check_layer(forward, X, is_training=False, output_shape=(4, 2))
    assert "batch_independent[is_training=False]" in report.checked
    report = check_layer(forward, X, is_training=True, batch_independent=False)
    assert "jit_consistent[is_training=True]" in report.checked


def test_plain_batchnorm_layer_mixes_rows_in_train_mode_only():
    def forward(x, is_training):
        return hk.BatchNorm(create_scale=True, create_offset=True, decay_rate=0.9)(x, is_training)

    assert (
        "batch_independent[is_training=False]" in check_layer(forward, X, is_training=False).checked
    )
    with pytest.raises(AssertionError, match=r"batch_independent\[is_training=True\] failed"):
        check_layer(forward, X, is_training=True)


def _constant_kernels(next_creator, shape, dtype, init, context):
    if context.name == "w" and context.module_name.split("/")[-1] != "logits":
        init = hk.initializers.Constant(0.1)  # Random inits take XLA:CPU ~20 s to compile.
    return next_creator(shape, dtype, init)


def _tiny_resnet(x, is_training):
    net = hk.nets.ResNet(
        blocks_per_group=(1, 1, 1, 1),
        num_classes=3,
        bottleneck=False,
        channels_per_group=(4, 4, 4, 4),
        resnet_v2=True,
    )
    with hk.custom_creator(_constant_kernels):  # Keeps ResNet's zero-initialized logits.
        return net(x, is_training)


def test_resnet_batch_statistics_are_caught_behind_its_zero_initialized_logits():
    # At init the logits layer is all zeros, so every row's output is 0 whatever BatchNorm
    # does: the rows are compared again at randomly perturbed params.
    x = jax.random.normal(jax.random.PRNGKey(3), (2, 16, 16, 3))
    only_rows = dict(
        finite_output=False,
        jit_consistent=False,
        deterministic=False,
        vmap_consistent=False,
        finite_grads=False,
    )
    with pytest.raises(
        AssertionError,
        match=r"batch_independent\[is_training=True\] failed: .* "
        r"in the full batch at randomly perturbed params",
    ):
        check_layer(_tiny_resnet, x, is_training=True, **only_rows)
    report = check_layer(_tiny_resnet, x, is_training=False, **only_rows)
    assert report.checked == ("batch_independent[is_training=False]",)


def test_zero_initialized_layer_cannot_hide_batch_mixing():
    def forward(x):  # Rows mix, but the zero-initialized layer maps every row to 0 at init.
        return hk.Linear(2, w_init=jnp.zeros)(x - jnp.mean(x, axis=0))

    with pytest.raises(
        AssertionError,
        match=r"batch_independent failed: .* at randomly "
        r"perturbed params: max abs difference",
    ):
        check_layer(forward, X)


def test_layernorm_passes():
    report = check_layer(lambda x: hk.LayerNorm(-1, create_scale=True, create_offset=True)(x), X)
    assert "batch_independent" in report.checked and report.skipped == {}


def test_dropout_depends_on_rng_only_in_train_mode():
    def forward(x, is_training):
        key = hk.next_rng_key()  # Drawn in both modes, used in training only.
        x = hk.Linear(6)(x)
        return hk.dropout(key, 0.5, x) if is_training else x

    report = check_layer(forward, X)
    assert "deterministic[is_training=True]" in report.checked
    assert "batch_independent[is_training=False]" in report.checked
    assert list(report.skipped) == ["batch_independent[is_training=True]"]
    assert "random numbers" in report.skipped["batch_independent[is_training=True]"]


def test_zero_initialized_layer_passes_finite_grads():
    def forward(x):  # The zero-initialized outer layer blocks every gradient at init.
        return hk.Linear(2, w_init=jnp.zeros)(jnp.tanh(hk.Linear(4)(x)))

    report = check_layer(
        forward, X, jit_consistent=False, batch_independent=False, vmap_consistent=False
    )
    assert report.checked == ("finite_output", "deterministic", "finite_grads")


def test_pytree_input_and_output_with_integer_leaf():
    def forward(inputs):
        tokens = hk.Embed(vocab_size=5, embed_dim=3)(inputs["ids"])
        return {"h": hk.Linear(2)(tokens + inputs["features"]), "ids": inputs["ids"]}

    x = {"ids": jnp.arange(4) % 5, "features": X}
    report = check_layer(forward, x, output_shape={"h": (4, 2), "ids": (4,)})
    assert "finite_grads" in report.checked


def test_report_str_lists_checked_and_skipped():
    text = str(check_layer(linear, X, vmap_consistent=False, finite_grads=False))
    assert text.startswith("LayerReport: 4 passed, 2 skipped")
    assert "  passed   jit_consistent" in text
    assert "  skipped  finite_grads: disabled (finite_grads=False)" in text


class LayerTestCaseTest(LayerTestCase):
    def test_assert_layer_returns_report(self):
        report = self.assertLayer(linear, X, output_shape=(4, 2))
        self.assertIn("batch_independent", report.checked)
        with self.assertRaisesRegex(AssertionError, "output_shape failed"):
            self.assertLayer(linear, X, output_shape=(4, 3))

    @chex.variants(with_jit=True, without_jit=True)
    def test_pure_helper_inside_forward(self):
        activation = self.variant(lambda v: v * jax.nn.sigmoid(v))  # May be jitted itself.
        self.assertLayer(lambda x: activation(linear(x)), X)

    def test_assert_compiles_once(self):
        outs = self.assertCompilesOnce(jnp.cumsum, (X,), (2 * X,))
        chex.assert_trees_all_close(outs[1], 2 * jnp.cumsum(X))


# --- assert_compiles_once. -----------------------------------------------------------------


def test_compiles_once_for_same_shapes():
    def step(params, batch):
        return jax.tree_util.tree_map(lambda p: p - 0.1 * jnp.mean(batch), params)

    params = {"w": jnp.ones(3)}
    outs = assert_compiles_once(step, (params, X), (params, X + 1.0), (params, X * 2.0))
    assert len(outs) == 3
    # The same function again, in the same test: a fresh count.
    assert_compiles_once(step, (params, X))


def test_retrace_on_new_shape_fails_with_shapes():
    with pytest.raises(
        AssertionError,
        match=r"traced 2 times in 3 calls, expected 1.*call 0: "
        r"\('float32\[4, 3\]',\); call 2: \('float32\[2, 3\]',\)",
    ):
        assert_compiles_once(jnp.sin, (X,), (X,), (X[:2],))


def test_retrace_on_new_static_argument_fails():
    assert_compiles_once(lambda a, n: a * n, (X, 2), (X, 2), static_argnums=(1,))
    with pytest.raises(AssertionError, match="traced 2 times"):
        assert_compiles_once(lambda a, n: a * n, (X, 2), (X, 3), static_argnums=(1,))


@pytest.mark.parametrize(
    "args, error, message",
    [
        ((), ValueError, "Expected at least one tuple of arguments"),
        (
            (X,),
            TypeError,
            r"Expected each element of `args_list` to be a tuple .* Received: "
            r"args_list\[0\] of type",
        ),
    ],
)
def test_assert_compiles_once_bad_arguments(args, error, message):
    with pytest.raises(error, match=message):
        assert_compiles_once(jnp.sin, *args)


def test_assert_compiles_once_rejects_non_callable():
    with pytest.raises(TypeError, match=r"Expected `fn` to be callable\. Received: fn of type int"):
        assert_compiles_once(3, (X,))


# --- Bad arguments of check_layer. ---------------------------------------------------------


def _takes_flag(x, is_training):
    del is_training
    return linear(x)


@pytest.mark.parametrize(
    "forward, x, kwargs, error, message",
    [
        (
            linear,
            X[:1],
            {},
            ValueError,
            r"Expected `x` to have a batch of at least 2 rows when "
            r"`batch_independent=True` .* Received: x.shape=\(1, 3\)\.",
        ),
        (
            linear,
            X[:0],
            {"batch_independent": False},
            ValueError,
            r"at least 1 row\. Received: x.shape=\(0, 3\)\.",
        ),
        (
            linear,
            {"a": X, "b": X[:2]},
            {},
            ValueError,
            r"leading batch axis of one size\. Received: x shapes=\{'a': \(4, 3\), 'b': \(2, 3\)\}",
        ),
        (linear, jnp.float32(1.0), {}, ValueError, r"Received: x.shape=\(\)\."),
        (linear, [], {}, TypeError, "Expected `x` to be an array or a pytree of arrays"),
        (
            linear,
            X,
            {"output_shape": 5},
            TypeError,
            r"Expected `output_shape` to be a tuple of ints or None .* Received: output_shape=5\.",
        ),
        (linear, X, {"output_dtype": "no-such-dtype"}, TypeError, "Expected `output_dtype`"),
        (
            linear,
            X,
            {"is_training": True},
            ValueError,
            "Expected `is_training=None` because `forward` has no `is_training` parameter",
        ),
        (
            _takes_flag,
            X,
            {"is_training": "yes"},
            TypeError,
            "Expected `is_training` to be None, True or False. Received: is_training='yes'",
        ),
        (
            linear,
            X,
            {"seed": 1.5},
            TypeError,
            r"Expected `seed` to be an int. Received: seed=1.5\.",
        ),
        (linear, X, {"atol": -1.0}, ValueError, r"Expected `atol` >= 0. Received: atol=-1.0\."),
        (
            hk.transform(linear),
            X,
            {},
            TypeError,
            "Expected `forward` to be a plain function .* Received: forward of type Transformed",
        ),
    ],
)
def test_check_layer_bad_arguments(forward, x, kwargs, error, message):
    with pytest.raises(error, match=message):
        check_layer(forward, x, **kwargs)


def test_docstring_examples_run():
    assert doctest.testmod(hkfit.testing).failed == 0
