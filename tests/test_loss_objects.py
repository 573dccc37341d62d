"""Keras-compatible loss objects: per-example values against Keras's formulas in NumPy."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from sklearn import metrics as sk_metrics

from hkfit import _loss_objects as lo

EPS = 1e-7
TOL = {"rtol": 1e-5, "atol": 1e-5}
B, K = 6, 5

# ----------------------------------------------------------------------------- reference maths
# Keras's documented formulas, written independently in float64 NumPy.


def np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def np_softmax(x):
    return np.exp(np_log_softmax(x))


def np_sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def np_one_hot(labels, k):
    return np.eye(k)[labels]


def ref_categorical_crossentropy(y, out, from_logits=False, label_smoothing=0.0):
    y = y * (1.0 - label_smoothing) + label_smoothing / y.shape[-1]
    if from_logits:
        log_p = np_log_softmax(out)
    else:
        log_p = np.log(np.clip(out / out.sum(-1, keepdims=True), EPS, 1 - EPS))
    return -(y * log_p).sum(-1)


def ref_binary_crossentropy(y, out, from_logits=False, label_smoothing=0.0):
    y = y * (1.0 - label_smoothing) + 0.5 * label_smoothing
    p = np_sigmoid(out) if from_logits else np.clip(out, EPS, 1 - EPS)
    bce = -(y * np.log(p) + (1 - y) * np.log(1 - p))
    return bce.mean(-1) if bce.ndim > 1 else bce


def ref_binary_focal(y, out, gamma, alpha, balance, from_logits=False, label_smoothing=0.0):
    y = y * (1.0 - label_smoothing) + 0.5 * label_smoothing
    p = np_sigmoid(out) if from_logits else out
    pc = np.clip(p, EPS, 1 - EPS)
    bce = -(y * np.log(pc) + (1 - y) * np.log(1 - pc))
    p_t = y * p + (1 - y) * (1 - p)
    focal = (1 - p_t) ** gamma * bce
    if balance:
        focal = (y * alpha + (1 - y) * (1 - alpha)) * focal
    return focal.mean(-1) if focal.ndim > 1 else focal


def ref_categorical_focal(y, out, alpha, gamma, from_logits=False, label_smoothing=0.0):
    y = y * (1.0 - label_smoothing) + label_smoothing / y.shape[-1]
    p = np_softmax(out) if from_logits else out
    p = np.clip(p / p.sum(-1, keepdims=True), EPS, 1 - EPS)
    return (np.asarray(alpha) * (1 - p) ** gamma * -y * np.log(p)).sum(-1)


def hinge_labels(y):
    return 2 * y - 1 if np.all((y == 0) | (y == 1)) else y


def ref_hinge(y, out):
    return np.maximum(1 - hinge_labels(y) * out, 0).mean(-1)


def ref_squared_hinge(y, out):
    return (np.maximum(1 - hinge_labels(y) * out, 0) ** 2).mean(-1)


def ref_categorical_hinge(y, out):
    pos = (y * out).sum(-1)
    neg = ((1 - y) * out).max(-1)
    return np.maximum(neg - pos + 1, 0)


def ref_kl(y, out):
    y, out = np.clip(y, EPS, 1), np.clip(out, EPS, 1)
    return (y * np.log(y / out)).sum(-1)


def ref_poisson(y, out):
    return (out - y * np.log(out + EPS)).mean(-1)


def ref_cosine(y, out, axis=-1):
    y = y / np.linalg.norm(y, axis=axis, keepdims=True)
    out = out / np.linalg.norm(out, axis=axis, keepdims=True)
    return -(y * out).sum(axis)


def ref_log_cosh(y, out):
    return np.log(np.cosh(out - y)).mean(-1)


def ref_huber(y, out, delta=1.0):
    err = np.abs(out - y)
    return np.where(err <= delta, 0.5 * err**2, delta * err - 0.5 * delta**2).mean(-1)


def ref_mse(y, out):
    return ((out - y) ** 2).mean(-1)


def ref_mae(y, out):
    return np.abs(out - y).mean(-1)


def ref_msle(y, out):
    return ((np.log(np.maximum(out, EPS) + 1) - np.log(np.maximum(y, EPS) + 1)) ** 2).mean(-1)


# ----------------------------------------------------------------------------- data


def f32(x):
    return np.asarray(x, np.float32)


rng = np.random.default_rng(0)
LOGITS = f32(rng.normal(size=(B, K)) * 2)
PROBS = f32(np_softmax(LOGITS.astype(np.float64)))
LABELS = rng.integers(0, K, size=B)
ONE_HOT = f32(np_one_hot(LABELS, K))
SOFT = f32(np_softmax(rng.normal(size=(B, K))))
BIN_LOGITS = f32(rng.normal(size=(B, 3)) * 2)
BIN_PROBS = f32(np_sigmoid(BIN_LOGITS.astype(np.float64)))
BIN_LABELS = f32(rng.integers(0, 2, size=(B, 3)))
X = f32(rng.normal(size=(B, 4)))
Y = f32(rng.normal(size=(B, 4)) * 2)
COUNTS = f32(rng.poisson(2.0, size=(B, 4)))
RATES = f32(rng.uniform(0.1, 3.0, size=(B, 4)))


def d(x):
    return np.asarray(x, np.float64)


CASES = [
    ("sparse_probs", lo.SparseCategoricalCrossentropy(), LABELS, PROBS,
     ref_categorical_crossentropy(np_one_hot(LABELS, K), d(PROBS))),
    ("sparse_logits", lo.SparseCategoricalCrossentropy(from_logits=True), LABELS, LOGITS,
     ref_categorical_crossentropy(np_one_hot(LABELS, K), d(LOGITS), from_logits=True)),
    ("sparse_smoothing", lo.SparseCategoricalCrossentropy(True, label_smoothing=0.2), LABELS,
     LOGITS, ref_categorical_crossentropy(np_one_hot(LABELS, K), d(LOGITS), True, 0.2)),
    ("sparse_probs_smoothing", lo.SparseCategoricalCrossentropy(label_smoothing=0.1), LABELS,
     PROBS, ref_categorical_crossentropy(np_one_hot(LABELS, K), d(PROBS), False, 0.1)),
    ("categorical_probs", lo.CategoricalCrossentropy(), SOFT, PROBS,
     ref_categorical_crossentropy(d(SOFT), d(PROBS))),
    ("categorical_logits", lo.CategoricalCrossentropy(from_logits=True), ONE_HOT, LOGITS,
     ref_categorical_crossentropy(d(ONE_HOT), d(LOGITS), from_logits=True)),
    ("categorical_smoothing", lo.CategoricalCrossentropy(label_smoothing=0.3), ONE_HOT, PROBS,
     ref_categorical_crossentropy(d(ONE_HOT), d(PROBS), label_smoothing=0.3)),
    ("binary_probs", lo.BinaryCrossentropy(), BIN_LABELS, BIN_PROBS,
     ref_binary_crossentropy(d(BIN_LABELS), d(BIN_PROBS))),
    ("binary_logits", lo.BinaryCrossentropy(from_logits=True), BIN_LABELS, BIN_LOGITS,
     ref_binary_crossentropy(d(BIN_LABELS), d(BIN_LOGITS), from_logits=True)),
    ("binary_smoothing", lo.BinaryCrossentropy(True, 0.2), BIN_LABELS, BIN_LOGITS,
     ref_binary_crossentropy(d(BIN_LABELS), d(BIN_LOGITS), True, 0.2)),
    ("binary_flat", lo.BinaryCrossentropy(), BIN_LABELS[:, 0], BIN_PROBS[:, 0],
     ref_binary_crossentropy(d(BIN_LABELS[:, 0]), d(BIN_PROBS[:, 0]))),
    ("binary_focal_probs", lo.BinaryFocalCrossentropy(), BIN_LABELS, BIN_PROBS,
     ref_binary_focal(d(BIN_LABELS), d(BIN_PROBS), 2.0, 0.25, False)),
    ("binary_focal_logits_balanced",
     lo.BinaryFocalCrossentropy(gamma=1.5, alpha=0.3, apply_class_balancing=True,
                                from_logits=True, label_smoothing=0.1),
     BIN_LABELS, BIN_LOGITS,
     ref_binary_focal(d(BIN_LABELS), d(BIN_LOGITS), 1.5, 0.3, True, True, 0.1)),
    ("binary_focal_probs_balanced",
     lo.BinaryFocalCrossentropy(gamma=3.0, alpha=0.7, apply_class_balancing=True),
     BIN_LABELS, BIN_PROBS, ref_binary_focal(d(BIN_LABELS), d(BIN_PROBS), 3.0, 0.7, True)),
    ("categorical_focal_probs", lo.CategoricalFocalCrossentropy(), ONE_HOT, PROBS,
     ref_categorical_focal(d(ONE_HOT), d(PROBS), 0.25, 2.0)),
    ("categorical_focal_logits",
     lo.CategoricalFocalCrossentropy(alpha=0.5, gamma=1.0, from_logits=True,
                                     label_smoothing=0.1),
     ONE_HOT, LOGITS, ref_categorical_focal(d(ONE_HOT), d(LOGITS), 0.5, 1.0, True, 0.1)),
    ("categorical_focal_class_alpha",
     lo.CategoricalFocalCrossentropy(alpha=[0.1, 0.2, 0.3, 0.4, 2.0]), SOFT, PROBS,
     ref_categorical_focal(d(SOFT), d(PROBS), [0.1, 0.2, 0.3, 0.4, 2.0], 2.0)),
    ("hinge_01", lo.Hinge(), BIN_LABELS, X[:, :3], ref_hinge(d(BIN_LABELS), d(X[:, :3]))),
    ("hinge_pm1", lo.Hinge(), 2 * BIN_LABELS - 1, X[:, :3],
     ref_hinge(d(2 * BIN_LABELS - 1), d(X[:, :3]))),
    ("squared_hinge", lo.SquaredHinge(), BIN_LABELS, X[:, :3],
     ref_squared_hinge(d(BIN_LABELS), d(X[:, :3]))),
    ("categorical_hinge", lo.CategoricalHinge(), ONE_HOT, LOGITS,
     ref_categorical_hinge(d(ONE_HOT), d(LOGITS))),
    ("kl_divergence", lo.KLDivergence(), SOFT, PROBS, ref_kl(d(SOFT), d(PROBS))),
    ("kl_divergence_zeros", lo.KLDivergence(), ONE_HOT, PROBS, ref_kl(d(ONE_HOT), d(PROBS))),
    ("poisson", lo.Poisson(), COUNTS, RATES, ref_poisson(d(COUNTS), d(RATES))),
    ("cosine_similarity", lo.CosineSimilarity(), Y, X, ref_cosine(d(Y), d(X))),
    ("log_cosh", lo.LogCosh(), Y, X, ref_log_cosh(d(Y), d(X))),
    ("huber", lo.Huber(), Y, X, ref_huber(d(Y), d(X))),
    ("huber_delta", lo.Huber(delta=0.5), Y, X, ref_huber(d(Y), d(X), 0.5)),
    ("mean_squared_error", lo.MeanSquaredError(), Y, X, ref_mse(d(Y), d(X))),
    ("mean_absolute_error", lo.MeanAbsoluteError(), Y, X, ref_mae(d(Y), d(X))),
    ("mean_squared_logarithmic_error", lo.MeanSquaredLogarithmicError(), Y, X,
     ref_msle(d(Y), d(X))),
]  # fmt: skip

ALL_LOSSES = [
    lo.SparseCategoricalCrossentropy(),
    lo.CategoricalCrossentropy(),
    lo.BinaryCrossentropy(),
    lo.BinaryFocalCrossentropy(),
    lo.CategoricalFocalCrossentropy(),
    lo.Hinge(),
    lo.SquaredHinge(),
    lo.CategoricalHinge(),
    lo.KLDivergence(),
    lo.Poisson(),
    lo.CosineSimilarity(),
    lo.LogCosh(),
    lo.Huber(),
    lo.MeanSquaredError(),
    lo.MeanAbsoluteError(),
    lo.MeanSquaredLogarithmicError(),
]


def inputs_for(loss):
    """Labels and outputs of a kind the loss is defined on."""
    if isinstance(loss, lo.SparseCategoricalCrossentropy):
        return LABELS, PROBS
    if isinstance(loss, (lo.CategoricalCrossentropy, lo.CategoricalFocalCrossentropy)):
        return ONE_HOT, PROBS
    if isinstance(loss, lo.KLDivergence):
        return SOFT, PROBS
    if isinstance(loss, (lo.BinaryCrossentropy, lo.BinaryFocalCrossentropy)):
        return BIN_LABELS, BIN_PROBS
    if isinstance(loss, lo.Poisson):
        return COUNTS, RATES
    if isinstance(loss, lo.CategoricalHinge):
        return ONE_HOT, LOGITS
    return Y, X


# ----------------------------------------------------------------------------- tests


class AgainstKerasFormulasTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(*CASES)
    def test_matches_reference(self, loss, y_true, y_pred, expected):
        result = self.variant(loss)(jnp.asarray(y_true), jnp.asarray(y_pred))
        chex.assert_shape(result, (B,))
        chex.assert_trees_all_close(result, f32(expected), **TOL)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(
        ("sparse", lo.SparseCategoricalCrossentropy, LABELS, LOGITS, np_softmax),
        ("categorical", lo.CategoricalCrossentropy, SOFT, LOGITS, np_softmax),
        ("binary", lo.BinaryCrossentropy, BIN_LABELS, BIN_LOGITS, np_sigmoid),
        ("binary_focal", lo.BinaryFocalCrossentropy, BIN_LABELS, BIN_LOGITS, np_sigmoid),
        ("categorical_focal", lo.CategoricalFocalCrossentropy, SOFT, LOGITS, np_softmax),
    )
    def test_logits_and_probabilities_agree(self, cls, y_true, logits, activation):
        probs = f32(activation(d(logits)))
        for smoothing in (0.0, 0.15):
            from_logits = self.variant(cls(from_logits=True, label_smoothing=smoothing))
            from_probs = self.variant(cls(from_logits=False, label_smoothing=smoothing))
            chex.assert_trees_all_close(
                from_logits(y_true, logits), from_probs(y_true, probs), **TOL
            )


def test_sparse_equals_categorical_with_one_hot_labels():
    for from_logits, smoothing in [(True, 0.0), (False, 0.0), (True, 0.2), (False, 0.2)]:
        out = LOGITS if from_logits else PROBS
        sparse = lo.SparseCategoricalCrossentropy(from_logits, smoothing)(LABELS, out)
        dense = lo.CategoricalCrossentropy(from_logits, smoothing)(ONE_HOT, out)
        chex.assert_trees_all_close(sparse, dense, **TOL)


def test_label_smoothing_changes_the_targets_as_keras_does():
    smoothed = ONE_HOT * 0.8 + 0.2 / K
    chex.assert_trees_all_close(
        lo.CategoricalCrossentropy(label_smoothing=0.2)(ONE_HOT, PROBS),
        lo.CategoricalCrossentropy()(smoothed, PROBS),
        **TOL,
    )
    chex.assert_trees_all_close(
        lo.BinaryCrossentropy(label_smoothing=0.2)(BIN_LABELS, BIN_PROBS),
        lo.BinaryCrossentropy()(BIN_LABELS * 0.8 + 0.1, BIN_PROBS),
        **TOL,
    )
    # Smoothing raises the loss of confident correct predictions.
    confident = f32(np_one_hot(LABELS, K) * 0.999 + 0.001 / K)
    plain = lo.SparseCategoricalCrossentropy()(LABELS, confident)
    smooth = lo.SparseCategoricalCrossentropy(label_smoothing=0.1)(LABELS, confident)
    assert np.all(np.asarray(smooth) > np.asarray(plain))


@pytest.mark.parametrize("from_logits", [True, False])
def test_focal_with_gamma_zero_is_plain_crossentropy(from_logits):
    bin_out = BIN_LOGITS if from_logits else BIN_PROBS
    chex.assert_trees_all_close(
        lo.BinaryFocalCrossentropy(gamma=0.0, from_logits=from_logits)(BIN_LABELS, bin_out),
        lo.BinaryCrossentropy(from_logits=from_logits)(BIN_LABELS, bin_out),
        **TOL,
    )
    cat_out = LOGITS if from_logits else PROBS
    chex.assert_trees_all_close(
        lo.CategoricalFocalCrossentropy(alpha=1.0, gamma=0.0, from_logits=from_logits)(
            SOFT, cat_out
        ),
        lo.CategoricalCrossentropy(from_logits=from_logits)(SOFT, cat_out),
        **TOL,
    )


def test_focal_down_weights_easy_examples():
    easy = lo.BinaryFocalCrossentropy()(f32([[1.0]]), f32([[0.95]]))
    hard = lo.BinaryFocalCrossentropy()(f32([[1.0]]), f32([[0.3]]))
    bce_easy = lo.BinaryCrossentropy()(f32([[1.0]]), f32([[0.95]]))
    assert float(easy[0]) < 0.01 * float(bce_easy[0]) < float(hard[0])


def test_against_scikit_learn():
    probs = d(PROBS) / d(PROBS).sum(-1, keepdims=True)
    sparse = lo.SparseCategoricalCrossentropy()(LABELS, f32(probs))
    expected = sk_metrics.log_loss(LABELS, probs, labels=list(range(K)))
    np.testing.assert_allclose(float(jnp.mean(sparse)), expected, rtol=1e-5)

    binary = lo.BinaryCrossentropy()(BIN_LABELS[:, 0], BIN_PROBS[:, 0])
    expected = sk_metrics.log_loss(BIN_LABELS[:, 0], d(BIN_PROBS[:, 0]), labels=[0, 1])
    np.testing.assert_allclose(float(jnp.mean(binary)), expected, rtol=1e-5)

    signs = 2 * BIN_LABELS[:, 0] - 1
    hinge = lo.Hinge()(signs, X[:, 0])
    expected = sk_metrics.hinge_loss(signs, d(X[:, 0]))
    np.testing.assert_allclose(float(jnp.mean(hinge)), expected, rtol=1e-5)


def test_hinge_converts_zero_one_labels():
    zero_one = lo.Hinge()(BIN_LABELS, X[:, :3])
    plus_minus = lo.Hinge()(2 * BIN_LABELS - 1, X[:, :3])
    chex.assert_trees_all_close(zero_one, plus_minus, **TOL)
    chex.assert_trees_all_close(
        lo.SquaredHinge()(BIN_LABELS, X[:, :3]),
        lo.SquaredHinge()(2 * BIN_LABELS - 1, X[:, :3]),
        **TOL,
    )


def test_cosine_similarity_is_negative_and_takes_an_axis():
    same = lo.CosineSimilarity()(X, 3 * X)
    chex.assert_trees_all_close(same, -jnp.ones(B), **TOL)
    cube_true = f32(rng.normal(size=(B, 4, 3)))
    cube_pred = f32(rng.normal(size=(B, 4, 3)))
    result = lo.CosineSimilarity(axis=1)(cube_true, cube_pred)
    chex.assert_shape(result, (B, 3))
    chex.assert_trees_all_close(result, f32(ref_cosine(d(cube_true), d(cube_pred), 1)), **TOL)
    zero = lo.CosineSimilarity()(jnp.zeros((2, 4)), jnp.ones((2, 4)))
    chex.assert_trees_all_close(zero, jnp.zeros(2))


def test_probabilities_are_clipped():
    y = f32([[1.0, 0.0]])
    loss = lo.BinaryCrossentropy()(y, f32([[0.0, 1.0]]))
    # Both terms are -log(1e-7) up to float32 rounding of 1 - 1e-7.
    np.testing.assert_allclose(float(loss[0]), -np.log(EPS), rtol=2e-2)
    sparse = lo.SparseCategoricalCrossentropy()(np.array([1]), f32([[1.0, 0.0]]))
    np.testing.assert_allclose(float(sparse[0]), -np.log(EPS), rtol=1e-5)
    kl = lo.KLDivergence()(f32([[0.5, 0.5]]), f32([[1.0, 0.0]]))
    np.testing.assert_allclose(float(kl[0]), 0.5 * np.log(0.5) + 0.5 * np.log(0.5 / EPS), rtol=1e-5)


def test_sequence_axes_are_kept():
    seq_labels = rng.integers(0, K, size=(2, 7))
    seq_logits = f32(rng.normal(size=(2, 7, K)))
    sparse = lo.SparseCategoricalCrossentropy(from_logits=True)(seq_labels, seq_logits)
    chex.assert_shape(sparse, (2, 7))
    expected = ref_categorical_crossentropy(np_one_hot(seq_labels, K), d(seq_logits), True)
    chex.assert_trees_all_close(sparse, f32(expected), **TOL)

    dense = lo.CategoricalCrossentropy(from_logits=True)(f32(np_one_hot(seq_labels, K)), seq_logits)
    chex.assert_shape(dense, (2, 7))
    chex.assert_shape(lo.CategoricalFocalCrossentropy()(SOFT[None], PROBS[None]), (1, B))

    bin_labels = f32(rng.integers(0, 2, size=(2, 7)))
    bin_logits = f32(rng.normal(size=(2, 7, 1)))
    binary = lo.BinaryCrossentropy(from_logits=True)(bin_labels, bin_logits)
    chex.assert_shape(binary, (2, 7))
    chex.assert_trees_all_close(
        binary, f32(ref_binary_crossentropy(d(bin_labels[..., None]), d(bin_logits), True)), **TOL
    )
    chex.assert_shape(lo.BinaryFocalCrossentropy(from_logits=True)(bin_labels, bin_logits), (2, 7))
    for loss in (lo.MeanSquaredError(), lo.Huber(), lo.LogCosh(), lo.CosineSimilarity()):
        chex.assert_shape(loss(jnp.zeros((2, 7, 3)), jnp.ones((2, 7, 3))), (2, 7))
    chex.assert_shape(lo.KLDivergence()(SOFT[None], PROBS[None]), (1, B))


def test_flat_and_unit_axis_shapes():
    flat = lo.BinaryCrossentropy()(BIN_LABELS[:, 0], BIN_PROBS[:, 0])
    column = lo.BinaryCrossentropy()(BIN_LABELS[:, 0], BIN_PROBS[:, :1])
    column_labels = lo.BinaryCrossentropy()(BIN_LABELS[:, :1], BIN_PROBS[:, 0])
    chex.assert_shape(flat, (B,))
    chex.assert_trees_all_close(flat, column, **TOL)
    chex.assert_trees_all_close(flat, column_labels, **TOL)
    chex.assert_trees_all_close(lo.MeanSquaredError()(Y[:, 0], X[:, 0]), (X[:, 0] - Y[:, 0]) ** 2)
    sparse = lo.SparseCategoricalCrossentropy()(LABELS[:, None], PROBS)
    chex.assert_trees_all_close(sparse, lo.SparseCategoricalCrossentropy()(LABELS, PROBS))


def test_ignore_class_gives_zero_loss_and_an_exact_weighted_mean():
    labels = np.array([[1, 2, -100, 0], [3, -100, -100, 4]])
    logits = f32(rng.normal(size=(2, 4, K)))
    loss = lo.SparseCategoricalCrossentropy(from_logits=True, ignore_class=-100)
    values = jax.jit(loss)(labels, logits)
    chex.assert_shape(values, (2, 4))
    valid = labels != -100
    assert np.all(np.asarray(values)[~valid] == 0.0)
    expected = ref_categorical_crossentropy(
        np_one_hot(np.where(valid, labels, 0), K), d(logits), True
    )
    chex.assert_trees_all_close(values[valid], f32(expected[valid]), **TOL)
    weights = valid.astype(np.float32)
    mean = jnp.sum(weights * values) / jnp.sum(weights)
    np.testing.assert_allclose(float(mean), expected[valid].mean(), rtol=1e-5)
    grads = jax.grad(lambda z: jnp.sum(weights * loss(labels, z)))(logits)
    assert np.all(np.isfinite(grads))
    assert np.all(np.asarray(grads)[~valid] == 0.0)
    # An ignored class inside the label range works too, with smoothing and probabilities.
    probs = lo.SparseCategoricalCrossentropy(label_smoothing=0.1, ignore_class=0)(LABELS, PROBS)
    assert np.all(np.asarray(probs)[LABELS == 0] == 0.0)
    assert np.all(np.asarray(probs)[LABELS != 0] > 0.0)


@pytest.mark.parametrize("loss", ALL_LOSSES, ids=lambda loss: loss.name)
def test_jit_and_grad_work_and_give_finite_gradients(loss):
    y_true, y_pred = inputs_for(loss)
    chex.assert_trees_all_close(jax.jit(loss)(y_true, y_pred), loss(y_true, y_pred), **TOL)
    grads = jax.jit(jax.grad(lambda z: jnp.sum(loss(y_true, z))))(jnp.asarray(y_pred))
    chex.assert_shape(grads, y_pred.shape)
    chex.assert_tree_all_finite(grads)
    assert float(jnp.max(jnp.abs(grads))) > 0.0


@pytest.mark.parametrize(
    "cls",
    [
        lo.SparseCategoricalCrossentropy,
        lo.CategoricalCrossentropy,
        lo.BinaryCrossentropy,
        lo.BinaryFocalCrossentropy,
        lo.CategoricalFocalCrossentropy,
    ],
)
def test_gradients_from_logits_stay_finite_for_extreme_logits(cls):
    loss = cls(from_logits=True)
    if cls is lo.SparseCategoricalCrossentropy:
        y_true, logits = np.array([0, 1]), f32([[80.0, -80.0], [-80.0, 80.0]])
    elif cls in (lo.BinaryCrossentropy, lo.BinaryFocalCrossentropy):
        y_true, logits = f32([[1.0, 0.0]]), f32([[-80.0, 80.0]])
    else:
        y_true, logits = f32([[1.0, 0.0], [0.0, 1.0]]), f32([[80.0, -80.0], [-80.0, 80.0]])
    grads = jax.grad(lambda z: jnp.sum(loss(y_true, z)))(logits)
    chex.assert_tree_all_finite(grads)


@pytest.mark.parametrize(
    "make, exception, message",
    [
        (lambda: lo.Huber(delta=-1), ValueError, "Expected `delta` > 0. Received: delta=-1."),
        (lambda: lo.Huber(delta=0.0), ValueError, "`delta` > 0"),
        (lambda: lo.Huber(delta="1"), TypeError, "`delta`"),
        (lambda: lo.SparseCategoricalCrossentropy(label_smoothing=1.5), ValueError,
         "Expected `label_smoothing` in [0, 1]. Received: label_smoothing=1.5."),
        (lambda: lo.CategoricalCrossentropy(label_smoothing=-0.1), ValueError, "label_smoothing"),
        (lambda: lo.BinaryCrossentropy(from_logits="yes"), TypeError, "`from_logits`"),
        (lambda: lo.BinaryCrossentropy(label_smoothing=None), TypeError, "`label_smoothing`"),
        (lambda: lo.SparseCategoricalCrossentropy(ignore_class="pad"), TypeError,
         "`ignore_class`"),
        (lambda: lo.SparseCategoricalCrossentropy(ignore_class=1.5), TypeError, "`ignore_class`"),
        (lambda: lo.BinaryFocalCrossentropy(gamma=-1.0), ValueError,
         "Expected `gamma` >= 0. Received: gamma=-1.0."),
        (lambda: lo.BinaryFocalCrossentropy(alpha=1.5), ValueError, "`alpha` in [0, 1]"),
        (lambda: lo.BinaryFocalCrossentropy(apply_class_balancing=1), TypeError,
         "`apply_class_balancing`"),
        (lambda: lo.CategoricalFocalCrossentropy(alpha=-0.5), ValueError, "`alpha` >= 0"),
        (lambda: lo.CategoricalFocalCrossentropy(alpha=[0.5, -1.0]), ValueError, "`alpha`"),
        (lambda: lo.CategoricalFocalCrossentropy(gamma=float("nan")), ValueError, "`gamma`"),
        (lambda: lo.CosineSimilarity(axis=1.0), TypeError, "`axis`"),
    ],
)  # fmt: skip
def test_bad_arguments_raise_errors_naming_them(make, exception, message):
    with pytest.raises(exception) as info:
        make()
    assert message in str(info.value)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: lo.MeanSquaredError()(jnp.zeros((2, 3)), jnp.zeros((2, 4))), "same shape"),
        (lambda: lo.BinaryCrossentropy()(jnp.zeros(2), jnp.zeros((2, 3))), "same shape"),
        (lambda: lo.SparseCategoricalCrossentropy()(jnp.zeros((2, 3)), PROBS), "y_true.shape"),
        (lambda: lo.CategoricalCrossentropy()(jnp.zeros(3), jnp.ones(3)), "classes"),
        (lambda: lo.CosineSimilarity(axis=0)(X, Y), "`axis`"),
        (lambda: lo.CosineSimilarity(axis=2)(X, Y), "`axis`"),
        (lambda: lo.CategoricalFocalCrossentropy(alpha=[0.5, 0.5])(ONE_HOT, PROBS),
         "one `alpha` per class"),
    ],
)  # fmt: skip
def test_bad_shapes_raise_value_errors(call, message):
    with pytest.raises(ValueError, match="Expected") as info:
        call()
    assert message in str(info.value)


def test_names_reprs_and_configs():
    names = {loss.name for loss in ALL_LOSSES}
    assert len(names) == len(ALL_LOSSES)
    assert all(name == name.lower() and " " not in name for name in names)
    assert lo.SparseCategoricalCrossentropy().name == "sparse_categorical_crossentropy"
    assert lo.BinaryFocalCrossentropy().name == "binary_focal_crossentropy"
    assert lo.SparseCategoricalCrossentropy().from_logits is False
    assert lo.CategoricalFocalCrossentropy(from_logits=True).from_logits is True
    assert repr(lo.Huber(delta=2)) == "Huber(delta=2.0)"
    assert repr(lo.MeanSquaredError()) == "MeanSquaredError()"
    assert repr(lo.BinaryFocalCrossentropy(apply_class_balancing=True)) == (
        "BinaryFocalCrossentropy(gamma=2.0, alpha=0.25, apply_class_balancing=True, "
        "from_logits=False, label_smoothing=0.0)"
    )
    assert lo.SparseCategoricalCrossentropy(ignore_class=-100).get_config() == {
        "name": "sparse_categorical_crossentropy",
        "from_logits": False,
        "label_smoothing": 0.0,
        "ignore_class": -100,
    }
    assert lo.Huber(1) == lo.Huber(1.0) and hash(lo.Huber(1)) == hash(lo.Huber(1.0))
    assert lo.Huber(1) != lo.Huber(2)
    assert hash(lo.CategoricalFocalCrossentropy(alpha=[0.2, 0.8])) is not None


def test_looks_like_probabilities():
    assert not lo.looks_like_probabilities(LOGITS)
    assert lo.looks_like_probabilities(PROBS)
    assert lo.looks_like_probabilities(jax.nn.softmax(jnp.asarray(LOGITS)))
    assert lo.looks_like_probabilities(BIN_PROBS[:, 0])
    assert lo.looks_like_probabilities(BIN_PROBS[:, :1])
    assert not lo.looks_like_probabilities(BIN_LOGITS[:, :1])
    # Independent sigmoid outputs over k > 1 columns do not sum to one.
    assert not lo.looks_like_probabilities(BIN_PROBS)
    assert lo.looks_like_probabilities(PROBS.reshape(2, 3, K))
    assert lo.looks_like_probabilities(jnp.asarray([[0.25, 0.75], [0.5, 0.5]], jnp.bfloat16))
    assert not lo.looks_like_probabilities(PROBS * 0.9)
    assert not lo.looks_like_probabilities(np.zeros((0, K)))
    assert not lo.looks_like_probabilities(np.full((2, 2), np.nan))
    with pytest.raises(TypeError, match="y_pred"):
        lo.looks_like_probabilities(np.array(["a", "b"]))
