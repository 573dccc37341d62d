"""Mixed precision: ``Model(precision=...)`` (hkfit._precision), loss scaling included."""

import ast
import functools
import importlib.util
import pathlib
import sys

import chex
import haiku as hk
import jax
import jax.numpy as jnp
import jmp
import numpy as np
import optax
import pytest

import hkfit
from hkfit import _forward as forward_lib
from hkfit import _precision as precision_lib
from hkfit import callbacks as C
from hkfit import checkpoint, optimizers
from hkfit import step as step_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
MIXED = ["mixed_bfloat16", "mixed_float16"]


def mlp(x, is_training):
    h = jax.nn.relu(hk.Linear(16)(x))
    if is_training:
        h = hk.dropout(hk.next_rng_key(), 0.2, h)
    return hk.Linear(3)(h)


def bn_mlp(x, is_training):
    h = hk.Linear(16)(x)
    h = hk.BatchNorm(True, True, 0.9)(h, is_training)
    h = hk.LayerNorm(-1, True, True)(jax.nn.relu(h))
    if is_training:
        h = hk.dropout(hk.next_rng_key(), 0.2, h)
    return hk.Linear(3)(h)


def data(n=48, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)).astype(np.float32)
    return x, np.argmax(x[:, :3], axis=1).astype(np.int32)


def model(forward=mlp, **kwargs):
    kwargs.setdefault("loss", "sparse_categorical_crossentropy")
    kwargs.setdefault("optimizer", optax.adam(1e-2))
    kwargs.setdefault("metrics", ["accuracy"])
    return hkfit.Model(forward, **kwargs)


def host(tree):
    def leaf(a):
        if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
            a = jax.random.key_data(a)
        return np.asarray(a)

    return jax.tree_util.tree_map(leaf, jax.device_get(tree))


def dtypes(tree):
    return {str(a.dtype) for a in jax.tree_util.tree_leaves(tree)}


@pytest.fixture
def fast_growth(monkeypatch):
    """Loss scaling that doubles the scale after 2 finite steps (Keras's default is 2000)."""
    monkeypatch.setattr(
        precision_lib, "LossScaling", functools.partial(precision_lib.LossScaling, period=2)
    )


# --- The argument ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "precision, error",
    [("bfloat16", ValueError), ("mixed_float32", ValueError), (16, TypeError), (None, TypeError)],
)
def test_precision_is_checked(precision, error):
    with pytest.raises(error) as info:
        model(precision=precision)
    message = str(info.value)
    assert "`precision`" in message and "mixed_bfloat16" in message and "jmp.Policy" in message
    assert f"precision={precision!r}" in message


def test_a_transform_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="needs the function itself"):
        model(hk.transform_with_state(lambda x: hk.Linear(2)(x)), precision="mixed_bfloat16")
    with pytest.raises(ValueError, match="custom `train_step`"):
        hkfit.Model(mlp, train_step=lambda ts, batch: (ts, {}), precision="mixed_float16")


def test_float32_is_the_model_without_a_precision_bit_for_bit():
    x, y = data()
    a, b = model(seed=1), model(seed=1, precision="float32")
    ha = a.fit(x, y, epochs=2, batch_size=16, verbose=0)
    hb = b.fit(x, y, epochs=2, batch_size=16, verbose=0)
    chex.assert_trees_all_equal(host(a.train_state), host(b.train_state))
    assert ha.history == hb.history and "loss_scale" not in hb.history
    assert b.precision == "float32"


def test_jmp_is_imported_only_inside_the_feature(monkeypatch):
    for path in sorted((ROOT / "hkfit").rglob("*.py")):
        for node in ast.parse(path.read_text()).body:  # module level only
            names = [a.name for a in getattr(node, "names", [])]
            module = getattr(node, "module", None) or ""
            assert "jmp" not in names and not module.startswith("jmp"), path
    # Without jmp (dm-haiku imports it, so it is hidden here): the default model works,
    # and a mixed policy says what to install.
    monkeypatch.setitem(sys.modules, "jmp", None)
    x, y = data(8)
    model().fit(x, y, verbose=0)
    with pytest.raises(ImportError, match=r"hkfit\[mixed\]"):
        model(precision="mixed_bfloat16")
    with pytest.raises(TypeError, match="`precision`"):
        model(precision=object())


# --- The forward ----------------------------------------------------------------------------


def test_bfloat16_computes_in_half_keeps_float32_params_norms_and_outputs(tmp_path):
    seen = {}

    def forward(x, is_training):
        seen["x"] = x.dtype
        h = hk.Linear(16)(x)
        seen["linear"] = h.dtype
        h = hk.BatchNorm(True, True, 0.9)(h, is_training)
        seen["batch_norm"] = h.dtype  # computed in float32, handed on in the half type
        h = hk.LayerNorm(-1, True, True)(h)
        return hk.Linear(3)(h)

    x, y = data()
    m = model(forward, precision="mixed_bfloat16")
    m.fit(x, y, epochs=1, batch_size=16, verbose=0)
    assert seen == {"x": jnp.bfloat16, "linear": jnp.bfloat16, "batch_norm": jnp.bfloat16}
    assert dtypes(m.params) == {"float32"}  # BatchNorm / LayerNorm scale and offset too
    assert set(m.params) == {"linear", "batch_norm", "layer_norm", "linear_1"}
    assert dtypes(m.state) == {"float32", "int32"}  # BatchNorm statistics and counters
    assert m.predict(x).dtype == np.float32
    assert m.apply_fn(m.params, m.state, x).dtype == jnp.float32

    # In the traced program: matmuls take bf16, the normalizations' rsqrt runs in float32.
    jaxpr = jax.make_jaxpr(m.apply_fn)(m.params, m.state, x).jaxpr
    eqns = {}
    for eqn in jaxpr.eqns:
        eqns.setdefault(eqn.primitive.name, []).append(eqn)
    assert {str(v.aval.dtype) for e in eqns["dot_general"] for v in e.invars} == {"bfloat16"}
    assert len(eqns["rsqrt"]) == 2
    assert {str(e.outvars[0].aval.dtype) for e in eqns["rsqrt"]} == {"float32"}

    # Checkpoints hold float32 under the same names as a float32 model: they load both ways.
    m.save(str(tmp_path / "mixed.npz"))
    _, arrays = checkpoint.read(str(tmp_path / "mixed.npz"))
    assert {str(a.dtype) for a in arrays.values() if a.dtype.kind == "f"} == {"float32"}
    plain = model(forward)
    plain.load_weights(str(tmp_path / "mixed.npz"))
    chex.assert_trees_all_equal(host(plain.params), host(m.params))


def test_initial_params_are_the_float32_models():
    x, _ = data(4)
    a, b = model(bn_mlp, seed=5).init(x), model(bn_mlp, seed=5, precision="mixed_float16").init(x)
    # The same initializers and keys (the two init programs may round differently by an ulp).
    chex.assert_trees_all_close(host(a.params), host(b.params), rtol=1e-6, atol=1e-7)


def test_a_jmp_policy_and_the_softmax_warning():
    policy = jmp.get_policy("params=float32,compute=bfloat16,output=float32")
    x, y = data(8)
    with pytest.warns(UserWarning, match="from_logits=False"):
        m = model(lambda x: jax.nn.softmax(hk.Linear(3)(x)), precision=policy)
        m.fit(x, y, verbose=0)  # the output cast does not hide the softmax
    assert m.precision is policy and m.predict(x).dtype == np.float32
    assert "Total params" in m.summary(print_fn=None)


def test_the_global_haiku_policy_is_left_as_it_was():
    mine = jmp.get_policy("float32")
    hk.mixed_precision.set_policy(hk.LayerNorm, mine)
    try:
        x, y = data(8)
        model(bn_mlp, precision="mixed_bfloat16").fit(x, y, verbose=0)
        assert hk.mixed_precision.get_policy(hk.BatchNorm) is None
        assert hk.mixed_precision.get_policy(hk.LayerNorm) is mine  # a user's own is kept
    finally:
        hk.mixed_precision.clear_policy(hk.LayerNorm)


# --- Loss scaling ---------------------------------------------------------------------------


def tiny_loss(y_true, y_pred):
    """Its gradient with respect to ``y_pred`` (~1e-8) is below float16's smallest number."""
    return 1e-8 * jnp.sum((y_pred - y_true) ** 2, axis=-1)


def linear(x):
    return hk.Linear(1, with_bias=False, w_init=hk.initializers.Constant(1.0))(x)


def test_loss_scaling_prevents_the_float16_gradient_underflow():
    x, y = np.ones((4, 2), np.float32), np.zeros((4, 1), np.float32)
    forward = forward_lib.wrap(precision_lib.scoped(linear, precision_lib.get("mixed_float16")))
    params, state = forward.init(jax.random.key(0), x)
    gradient = step_lib.make_batch_gradient(forward.apply_train, tiny_loss)
    batch = step_lib.Batch(x, y, np.ones(4, np.float32))
    logs, key = step_lib.empty_logs([]), jax.random.key(0)
    # Op by op, every float16 value is rounded as on an accelerator. (Compiled for CPU, XLA
    # may keep a float16 intermediate in float32, its excess-precision rule.)
    _, unscaled, _, _ = gradient(params, state, key, logs, batch)
    _, scaled, _, _ = gradient(params, state, key, logs, batch, jmp.DynamicLossScale(2.0**15))
    assert not np.any(unscaled["linear"]["w"])  # flushed to zero in float16
    np.testing.assert_allclose(scaled["linear"]["w"], 4e-8, rtol=1e-2)  # d(loss)/dw, exact

    m = hkfit.Model(
        linear, loss=tiny_loss, optimizer=optax.adam(0.1, eps=1e-12), precision="mixed_float16"
    )
    history = m.fit(x, y, epochs=3, batch_size=4, verbose=0).history
    assert m.params["linear"]["w"][0, 0] < 0.8 and history["loss"][-1] < history["loss"][0]
    assert history["loss_scale"] == [2.0**15] * 3


def overflowing(x, is_training):
    h = hk.Linear(4, w_init=hk.initializers.Constant(1.0))(x)  # 2 * 6e4 > float16's max
    return hk.Linear(3)(hk.BatchNorm(True, True, 0.9)(h, is_training))


def test_a_non_finite_step_is_skipped_and_halves_the_scale_which_grows_back(fast_growth):
    m = model(overflowing, precision="mixed_float16")
    x, y = np.random.default_rng(0).normal(size=(8, 2)).astype(np.float32), np.arange(8) % 3
    m.train_on_batch(x, y)
    before = host(m.train_state)
    assert before.opt_state.loss_scale == 2.0**15 and before.opt_state.counter == 1
    logs = m.train_on_batch(np.full_like(x, 6e4), y)
    assert not np.isfinite(logs["loss"])
    after = host(m.train_state)
    for field in ("params", "state"):  # BatchNorm statistics included
        chex.assert_trees_all_equal(getattr(after, field), getattr(before, field))
    chex.assert_trees_all_equal(after.opt_state.inner_state, before.opt_state.inner_state)
    assert after.opt_state.loss_scale == 2.0**14 and after.opt_state.counter == 0
    assert m.step == 2  # a skipped step still counts as a step taken
    m.train_on_batch(x, y)
    assert m.opt_state.loss_scale == 2.0**14 and m.opt_state.counter == 1
    m.train_on_batch(x, y)  # period=2 finite steps: the scale doubles
    assert m.opt_state.loss_scale == 2.0**15 and m.opt_state.counter == 0
    assert np.all(np.isfinite(m.predict(x)))


def test_accumulated_steps_scale_and_skip_as_a_whole(fast_growth):
    x, y = np.random.default_rng(0).normal(size=(16, 2)).astype(np.float32), np.arange(16) % 3
    m = model(overflowing, precision="mixed_float16")
    m.fit(x, y, batch_size=4, gradient_accumulation_steps=2, shuffle=False, verbose=0)
    assert m.step == 2 and m.opt_state.loss_scale == 2.0**16  # 2 finite steps
    before = host(m.train_state)
    bad = x.copy()
    bad[5] = 6e4  # one row of the second micro-batch of the first step overflows
    history = m.fit(bad, y, batch_size=4, gradient_accumulation_steps=2, shuffle=False, verbose=0)
    assert m.step == 4 and history.history["loss_scale"] == [2.0**15]
    # Step 1 was skipped whole; step 2 ran from the same params as a lone step would.
    lone = model(overflowing, precision="mixed_float16")
    lone.init(x)
    halved = before.opt_state._replace(loss_scale=np.float32(2.0**15), counter=np.int32(0))
    lone.train_state = jax.tree_util.tree_map(jnp.asarray, before._replace(opt_state=halved))
    lone.fit(x[8:], y[8:], batch_size=4, gradient_accumulation_steps=2, shuffle=False, verbose=0)
    chex.assert_trees_all_equal(host(m.params), host(lone.params))


def test_learning_rate_helpers_see_through_the_loss_scale():
    x, y = data(16)
    m = model(optimizer="adam", precision="mixed_float16")
    m.fit(x, y, epochs=1, batch_size=8, verbose=0)
    assert isinstance(m.opt_state, precision_lib.LossScaleState)
    assert m.learning_rate == pytest.approx(1e-3)
    m.learning_rate = 0.5
    assert optimizers.learning_rates(m.opt_state) == {"": 0.5}
    assert optimizers.learning_rate(optimizers.scale_learning_rates(m.opt_state, 0.5)) == 0.25
    plateau = C.ReduceLROnPlateau(monitor="loss", factor=0.5, patience=0, min_delta=1e9)
    history = m.fit(x, y, epochs=3, batch_size=8, verbose=0, callbacks=[plateau])
    assert history.history["learning_rate"] == [0.5, 0.5, 0.25]  # logged before the callback
    assert m.learning_rate == 0.125
    assert history.history["loss_scale"] == [2.0**15] * 3
    assert m.opt_state.loss_scale == 2.0**15  # the helpers leave the scale alone


# --- Exactness: resume, fusion, data parallelism --------------------------------------------


@pytest.mark.parametrize("precision", MIXED)
def test_save_load_continue_equals_an_uninterrupted_run(tmp_path, fast_growth, precision):
    x, y = data(40)
    kwargs = dict(batch_size=8, verbose=0, steps_per_execution=1)
    clean = model(bn_mlp, seed=2, precision=precision)
    clean.fit(x, y, epochs=2, **kwargs)
    path = str(tmp_path / "model.npz")
    clean.save(path)
    saved = host(clean.opt_state)
    expected = clean.fit(x, y, epochs=4, initial_epoch=2, **kwargs)  # not interrupted

    resumed = model(bn_mlp, seed=2, precision=precision).load(path)
    chex.assert_trees_all_equal(host(resumed.opt_state), saved)
    if precision == "mixed_float16":  # grown (and maybe halved) since 2**15, and restored
        assert resumed.opt_state.loss_scale == saved.loss_scale != 2.0**15
    history = resumed.fit(x, y, epochs=4, initial_epoch=2, **kwargs)
    chex.assert_trees_all_equal(host(resumed.train_state), host(clean.train_state))
    assert history.history == expected.history


def test_fused_steps_equal_single_steps():
    x, y = data(61)  # an uneven last batch, padded into the fused call
    a, b, c = (model(seed=1, precision="mixed_float16") for _ in range(3))
    ha = a.fit(x, y, epochs=2, batch_size=10, verbose=0, steps_per_execution=4)
    hb = b.fit(x, y, epochs=2, batch_size=10, verbose=0, steps_per_execution=2)
    hc = c.fit(x, y, epochs=2, batch_size=10, verbose=0, steps_per_execution=1)
    # Any number of fused steps: bit for bit. Against one compiled step per call: XLA
    # compiles a loop body and a lone step apart, which may round an ulp differently
    # (as in float32, see test_model.py).
    chex.assert_trees_all_equal(host(a.train_state), host(b.train_state))
    assert ha.history == hb.history
    chex.assert_trees_all_close(host(a.params), host(c.params), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ha.history["loss"], hc.history["loss"], rtol=1e-6)
    assert ha.history.get("loss_scale") == hc.history.get("loss_scale")


@pytest.mark.parametrize("precision", MIXED)
def test_data_parallel_matches_one_device(precision):
    x, y = data(64)
    sgd = optax.sgd(0.1)  # Adam would amplify the noise of the ~0 gradients before BatchNorm
    single = model(bn_mlp, seed=4, precision=precision, optimizer=sgd)
    parallel = model(
        bn_mlp,
        seed=4,
        precision=precision,
        optimizer=sgd,
        distribution=hkfit.DataParallel(data_placement="replicated"),
    )
    hs = single.fit(x, y, epochs=2, batch_size=16, verbose=0)
    hp = parallel.fit(x, y, epochs=2, batch_size=16, verbose=0)
    assert dtypes(parallel.params) == {"float32"}
    chex.assert_trees_all_close(host(parallel.params), host(single.params), atol=3e-2, rtol=3e-2)
    np.testing.assert_allclose(hp.history["loss"], hs.history["loss"], rtol=2e-2)
    assert hp.history.get("loss_scale") == hs.history.get("loss_scale")
    out = parallel.predict(x, batch_size=16)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, single.predict(x, batch_size=16), atol=5e-2, rtol=5e-2)


# --- The digits CNN -------------------------------------------------------------------------


@pytest.mark.slow
def test_bfloat16_digits_cnn_reaches_the_float32_accuracy():
    pytest.importorskip("sklearn")
    spec = importlib.util.spec_from_file_location("digits", ROOT / "examples" / "digits.py")
    digits = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(digits)
    float32 = digits.main(precision="float32", verbose=0)["accuracy"]
    bfloat16 = digits.main(precision="mixed_bfloat16", verbose=0)["accuracy"]
    assert float32 > 0.95
    assert bfloat16 >= float32 - 0.01, (float32, bfloat16)
