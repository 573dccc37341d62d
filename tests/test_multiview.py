"""Tests for hkfit.multiview: ``multiview()`` forwards, ``Model.vmap`` views, ``apply_fn``."""

import chex
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

import hkfit
from hkfit.multiview import ModelView

VIEWS = 5


def tiny_cnn(x):
    x = hk.Conv2D(5, 3, padding="VALID")(x)
    return hk.Conv2D(5, 3, padding="VALID")(jax.nn.relu(x))


def classifier(x):
    x = jax.nn.relu(hk.Conv2D(4, 3, padding="VALID")(x))
    return hk.Linear(3)(hk.Flatten()(x))


def count(tree) -> int:
    return sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(tree))


@pytest.fixture(scope="module")
def reference():
    """The reference case: two 3x3 VALID convs, 5 views on the last axis."""
    x = np.random.RandomState(0).randn(3, 16, 16, 3, VIEWS).astype(np.float32)
    model = hkfit.Model(tiny_cnn, loss="mse", seed=0)
    model.init(x[..., 0])
    return model, x


# --- apply_fn under JAX transforms -------------------------------------------------------


def test_reference_case_shapes_and_per_view_equality(reference):
    model, x = reference
    view = model.vmap(in_axes=4, out_axes=4)
    y = view.predict(x, batch_size=2)  # 2 batches, the last one padded
    assert isinstance(view, ModelView)
    assert y.shape == (3, 12, 12, 5, VIEWS)
    for v in range(VIEWS):
        np.testing.assert_allclose(y[..., v], model.predict(x[..., v]), rtol=1e-5, atol=1e-5)
    batches = iter([x[:2], x[2:]])  # an iterable of input batches
    chex.assert_trees_all_close(view.predict(batches), y, atol=1e-5)
    chex.assert_trees_all_close(view.predict_on_batch(x[:1]), y[:1], atol=1e-5)


def test_view_evaluate_takes_labels_shaped_like_outputs(reference):
    model, x = reference
    view = model.vmap(in_axes=-1, out_axes=-1)
    y = view.predict(x)
    logs = view.evaluate(x, np.zeros_like(y), batch_size=2, verbose=0)
    np.testing.assert_allclose(logs["loss"], np.mean(y**2), rtol=1e-4)
    assert view.evaluate(x, y, verbose=0)["loss"] == pytest.approx(0.0, abs=1e-10)


def test_jax_vmap_of_apply_fn_matches_view(reference):
    model, x = reference
    mapped = jax.vmap(model.apply_fn, in_axes=(None, None, 4), out_axes=4)
    chex.assert_trees_all_close(
        mapped(model.params, model.state, x),
        model.vmap(in_axes=4, out_axes=4).predict(x),
        atol=1e-5,
    )


def test_grad_and_jacobians_through_apply_fn(reference):
    model, x = reference
    one = jnp.asarray(x[:1, ..., 0])
    loss = lambda params, inputs: jnp.sum(model.apply_fn(params, model.state, inputs) ** 2)
    grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(model.params, one)
    chex.assert_trees_all_equal_shapes(grads, (model.params, one))
    jac_rev = jax.jit(jax.jacrev(model.apply_fn, argnums=2))(model.params, model.state, one)
    jac_fwd = jax.jit(jax.jacfwd(model.apply_fn, argnums=2))(model.params, model.state, one)
    assert jac_rev.shape == (1, 12, 12, 5, 1, 16, 16, 3)
    chex.assert_trees_all_close(jac_rev, jac_fwd, atol=1e-5)
    # The view's apply_fn is pure too: the Jacobian of a multi-view output.
    view = model.vmap(in_axes=4, out_axes=4)
    jac = jax.eval_shape(
        jax.jacrev(view.apply_fn, argnums=2), model.params, model.state, jnp.asarray(x[:1])
    )
    assert jac.shape == (1, 12, 12, 5, VIEWS, 1, 16, 16, 3, VIEWS)


def test_view_of_pytree_inputs_with_unmapped_leaf():
    def forward(x):
        return hk.Linear(2)(jnp.concatenate([x["a"], x["b"]], axis=-1))

    rng = np.random.RandomState(1)
    x = {"a": rng.randn(4, 3, VIEWS).astype(np.float32), "b": rng.randn(4, 2).astype(np.float32)}
    model = hkfit.Model(forward, loss="mse")
    view = model.vmap(in_axes={"a": 2, "b": None}, out_axes=1)
    y = view.predict(x, batch_size=3)  # the view initializes the parent on view 0
    assert model.built and y.shape == (4, VIEWS, 2)
    for v in range(VIEWS):
        np.testing.assert_allclose(
            y[:, v], model.predict({"a": x["a"][..., v], "b": x["b"]}), rtol=1e-5, atol=1e-6
        )


def test_view_sees_parameters_of_a_later_fit():
    rng = np.random.RandomState(2)
    x = rng.randn(16, 6, 4).astype(np.float32)  # 4 views of 6 features
    y = rng.randn(16, 1).astype(np.float32)
    inner = hkfit.Model(lambda v: hk.Linear(1)(v), loss="mse")
    inner.init(x[..., 0])
    view = inner.vmap(in_axes=2, out_axes=2)
    before = view.predict(x)
    inner.fit(x[..., 0], y, epochs=2, batch_size=8, verbose=0)
    after = view.predict(x)
    assert not np.allclose(before, after)
    expected = jax.vmap(inner.apply_fn, in_axes=(None, None, 2), out_axes=2)(
        inner.params, inner.state, x
    )
    chex.assert_trees_all_close(after, expected, atol=1e-5)
    assert view.params is inner.params


def test_view_does_not_train(reference):
    model, x = reference
    view = model.vmap(in_axes=4, out_axes=4)
    with pytest.raises(TypeError, match="predict` and `evaluate` only"):
        view.fit(x, x[:, 2:-2, 2:-2, :, :])


# --- multiview() --------------------------------------------------------------------------


def test_parameter_count_does_not_depend_on_the_number_of_views():
    forward = hk.transform(hkfit.multiview(classifier))
    key = jax.random.key(0)
    single = jax.eval_shape(hk.transform(classifier).init, key, jnp.zeros((2, 8, 8, 1)))
    for views in (3, 7):
        params = jax.eval_shape(forward.init, key, jnp.zeros((2, 8, 8, 1, views)))
        assert count(params) == count(single)
        chex.assert_trees_all_equal_shapes(params, single)


@pytest.mark.parametrize("pool", ["max", "mean"])
def test_pooled_outputs_do_not_depend_on_view_order(pool):
    forward = hk.without_apply_rng(hk.transform(hkfit.multiview(classifier, pool=pool)))
    x = jnp.asarray(np.random.RandomState(3).randn(2, 8, 8, 1, VIEWS), jnp.float32)
    params = jax.jit(forward.init)(jax.random.key(0), x)
    apply = jax.jit(forward.apply)
    y = apply(params, x)
    assert y.shape == (2, 3)
    for perm in ([4, 3, 2, 1, 0], [1, 0, 3, 4, 2]):
        chex.assert_trees_all_close(apply(params, x[..., jnp.asarray(perm)]), y, atol=1e-5)
    single = jax.jit(hk.without_apply_rng(hk.transform(classifier)).apply)
    per_view = jnp.stack([single(params, x[..., v]) for v in range(VIEWS)], axis=-1)
    reduce = jnp.max if pool == "max" else jnp.mean
    chex.assert_trees_all_close(y, reduce(per_view, axis=-1), atol=1e-5)


def test_no_pool_keeps_views_on_the_last_axis():
    x = jnp.asarray(np.random.RandomState(4).randn(2, VIEWS, 8, 8, 1), jnp.float32)
    forward = hk.without_apply_rng(hk.transform(hkfit.multiview(classifier, axis=1, pool=None)))
    params = jax.jit(forward.init)(jax.random.key(0), x)
    y = jax.jit(forward.apply)(params, x)
    assert y.shape == (2, 3, VIEWS)
    single = jax.jit(hk.without_apply_rng(hk.transform(classifier)).apply)
    for v in range(VIEWS):
        chex.assert_trees_all_close(y[..., v], single(params, x[:, v]), atol=1e-5)


def test_pytree_input_is_split_along_axis_in_every_leaf():
    def forward(x):
        return hk.Linear(2)(x["a"]) + hk.Linear(2)(x["b"])

    rng = np.random.RandomState(8)
    x = {
        "a": jnp.asarray(rng.randn(2, 3, 4), jnp.float32),
        "b": jnp.asarray(rng.randn(2, 3, 5), jnp.float32),
    }
    t = hk.without_apply_rng(hk.transform(hkfit.multiview(forward, axis=1, pool="mean")))
    params = jax.jit(t.init)(jax.random.key(0), x)
    single = hk.without_apply_rng(hk.transform(forward))
    per_view = [single.apply(params, {"a": x["a"][:, v], "b": x["b"][:, v]}) for v in range(3)]
    chex.assert_trees_all_close(jax.jit(t.apply)(params, x), sum(per_view) / 3, atol=1e-5)
    x["b"] = x["b"][:, :2]
    with pytest.raises(
        ValueError,
        match=r"same size.*x\['a'\] axis 1 of size 3, "
        r"x\['b'\] axis 1 of size 2",
    ):
        t.apply(params, x)


def test_is_training_is_passed_through():
    seen = []

    def forward(x, is_training):
        seen.append(is_training)
        return hk.Linear(2)(x) * (2.0 if is_training else 1.0)

    fn = hkfit.multiview(forward, axis=1)
    assert hkfit._forward.takes_is_training(fn)
    assert not hkfit._forward.takes_is_training(hkfit.multiview(lambda x: hk.Linear(2)(x)))
    t = hk.without_apply_rng(hk.transform(fn))
    x = jnp.ones((2, 3, 4))
    params = t.init(jax.random.key(0), x, is_training=True)
    chex.assert_trees_all_close(
        t.apply(params, x, is_training=True), 2.0 * t.apply(params, x, is_training=False)
    )
    assert seen == [True, True, False]


def test_batchnorm_over_views():
    def with_views_axis(x, is_training):
        x = hk.Linear(4)(x)
        return hk.BatchNorm(True, True, 0.9, cross_replica_axis="views")(x, is_training)

    def per_view_stats(x, is_training):
        return hk.BatchNorm(True, True, 0.9)(hk.Linear(4)(x), is_training)

    x = np.random.RandomState(5).randn(8, 3, VIEWS).astype(np.float32)
    model = hkfit.Model(hkfit.multiview(with_views_axis, pool="mean"), loss="mse")
    model.train_on_batch(x, np.zeros((8, 4), np.float32))
    assert model.step == 1
    # Statistics over the batch and every view: the same as the views stacked as rows.
    t = hk.transform_with_state(hkfit.multiview(with_views_axis, pool=None))
    params, state = jax.jit(t.init, static_argnums=2)(jax.random.key(0), x, True)
    y, _ = jax.jit(t.apply, static_argnums=4)(params, state, None, x, True)
    rows = jnp.moveaxis(y, -1, 1).reshape(-1, 4)
    chex.assert_trees_all_close(jnp.mean(rows, axis=0), jnp.zeros(4), atol=1e-5)
    bad = hk.transform_with_state(hkfit.multiview(per_view_stats))
    with pytest.raises(ValueError, match="cross_replica_axis='views'"):
        jax.eval_shape(lambda: bad.apply(params, state, None, x, is_training=True))


@pytest.mark.slow
def test_training_a_multiview_model_lowers_its_loss():
    rng = np.random.RandomState(6)
    y = rng.randint(0, 3, 48)
    patterns = rng.randn(3, 8, 8, 1).astype(np.float32)
    x = patterns[y][..., None] + 0.5 * rng.randn(48, 8, 8, 1, 4).astype(np.float32)
    model = hkfit.Model(
        hkfit.multiview(classifier),
        loss="sparse_categorical_crossentropy",
        optimizer="adam",
        metrics=["accuracy"],
        seed=0,
    )
    first = model.evaluate(x, y, verbose=0)["loss"]
    history = model.fit(x, y, epochs=4, batch_size=16, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]
    assert model.evaluate(x, y, verbose=0)["loss"] < first


class MultiviewVariantsTest(parameterized.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_forward_agrees_with_a_loop_over_views(self):
        def forward(x, is_training):
            x = hk.Linear(3)(x)
            return hk.dropout(hk.next_rng_key(), 0.5, x) if is_training else x

        t = hk.transform(hkfit.multiview(forward, axis=-2, pool="max"))
        x = jnp.asarray(np.random.RandomState(7).randn(2, VIEWS, 4), jnp.float32)
        params = t.init(jax.random.key(0), x, is_training=True)
        key = jax.random.key(1)
        apply = self.variant(lambda p, k, x: t.apply(p, k, x, is_training=False))
        single = hk.transform(forward)
        per_view = jnp.stack(
            [single.apply(params, key, x[:, v], is_training=False) for v in range(VIEWS)], axis=-1
        )
        chex.assert_trees_all_close(apply(params, key, x), jnp.max(per_view, axis=-1), atol=1e-5)
        # split_rng=False: every view draws the same dropout mask.
        train = self.variant(
            lambda p, k, x: hk.transform(hkfit.multiview(forward, axis=-2, pool=None)).apply(
                p, k, x, is_training=True
            )
        )
        same = jnp.broadcast_to(x[:, :1], x.shape)
        y = train(params, key, same)
        chex.assert_trees_all_close(y, jnp.broadcast_to(y[..., :1], y.shape))


# --- Bad inputs ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"in_axes": 0}, ValueError, r"`in_axes` to name axes other than 0: axis 0 is the batch"),
        ({"in_axes": 4, "out_axes": 0}, ValueError, r"`out_axes` to name axes other than 0"),
        ({"in_axes": {"a": 0, "b": None}}, ValueError, r"Received: in_axes=\{'a': 0"),
        ({"in_axes": None}, ValueError, r"at least one mapped \(non-None\) axis in `in_axes`"),
        ({"in_axes": 1.5}, TypeError, r"`in_axes` to be an int, None, or a pytree"),
        ({"in_axes": True}, TypeError, r"Received: in_axes=True"),
    ],
)
def test_vmap_rejects_bad_axes(reference, kwargs, error, message):
    model, _ = reference
    with pytest.raises(error, match=message):
        model.vmap(**kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"in_axes": -5}, r"Received: in_axes=-5, which is axis 0 of an input of rank 5"),
        ({"in_axes": 5}, r"`in_axes` in \[-5, 5\) for an input of rank 5. Received: in_axes=5"),
        ({"in_axes": 4, "out_axes": -5}, r"Received: out_axes=-5, which is axis 0 of an output"),
        ({"in_axes": 4, "out_axes": 6}, r"`out_axes` in \[-5, 5\) for an output of rank 5"),
    ],
)
def test_vmap_rejects_axes_out_of_range_when_called(reference, kwargs, message):
    model, x = reference
    with pytest.raises(ValueError, match=message):
        model.vmap(**kwargs).predict(x)


def test_vmap_rejects_mapped_axes_of_different_sizes():
    model = hkfit.Model(lambda x: hk.Linear(2)(x["a"]) + hk.Linear(2)(x["b"]), loss="mse")
    x = {"a": np.ones((2, 3, 4), np.float32), "b": np.ones((2, 3, 5), np.float32)}
    with pytest.raises(
        ValueError,
        match=r"same size.*x\['a'\] axis 2 of size 4, "
        r"x\['b'\] axis 2 of size 5",
    ):
        model.vmap(in_axes=-1).predict(x)


def test_vmap_rejects_in_axes_that_do_not_fit_the_inputs(reference):
    model, x = reference
    with pytest.raises(ValueError, match=r"`in_axes` to be an int, None, or a pytree prefix"):
        model.vmap(in_axes=(4, 4)).predict(x)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"axis": 0}, ValueError, r"`axis` to be a views axis other than 0.*Received: axis=0"),
        (
            {"pool": "sum"},
            ValueError,
            r"`pool` to be one of 'max', 'mean' or None. Received: pool='sum'",
        ),
        ({"pool": "MAX"}, ValueError, r"Received: pool='MAX'"),
        ({"axis": 1.0}, TypeError, r"`axis` to be an int.*Received: axis=1.0"),
    ],
)
def test_multiview_rejects_bad_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        hkfit.multiview(classifier, **kwargs)


def test_multiview_rejects_non_callable_forward():
    with pytest.raises(TypeError, match="Expected `forward` to be a function"):
        hkfit.multiview(hk.transform(classifier))


@pytest.mark.parametrize(
    "axis, message",
    [
        (5, r"`axis` in \[-5, 5\) for an input of rank 5. Received: axis=5"),
        (-6, r"Received: axis=-6"),
        (-5, r"Received: axis=-5, which is axis 0 of an input of rank 5"),
    ],
)
def test_multiview_checks_axis_against_the_input_rank(axis, message):
    forward = hk.transform(hkfit.multiview(classifier, axis=axis))
    with pytest.raises(ValueError, match=message):
        forward.init(jax.random.key(0), jnp.zeros((2, 8, 8, 1, 3)))
