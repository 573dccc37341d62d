"""Streaming metrics: Keras values, scikit-learn values, exact merges, padding and jit."""

import doctest

import chex
import jax
import numpy as np
import pytest
from absl.testing import parameterized
from sklearn import metrics as skm

from hkfit import _streaming_metrics as sm

N = 400  # rows in the scikit-learn comparisons (one size keeps compiled shapes shared)


def run(metric, y_true, y_pred, weights=None):
    """The metric's value after one update over all rows."""
    return np.asarray(metric.compute(metric.update(metric.empty(), y_true, y_pred, weights)))


def weights_for(n, rng, dyadic=False):
    """Positive weights with about 10% zeros; multiples of 1/4 when ``dyadic`` (exact sums)."""
    w = rng.integers(1, 9, n) / 4.0 if dyadic else rng.uniform(0.2, 2.0, n)
    w[rng.random(n) < 0.1] = 0.0
    return w.astype(np.float32)


def binary_probs(n, rng):
    y = (rng.random(n) < 0.4).astype(np.float32)
    p = np.clip(0.5 + 0.3 * (y - 0.5) + 0.2 * rng.standard_normal(n), 0.0, 1.0)
    return y, p.astype(np.float32)


def bucket_midpoints(y, rng, num_thresholds=200):
    """Scores at the middle of Keras's threshold buckets (ties included), correlated with y."""
    k = np.clip(rng.normal(90 + 30 * y, 40), 0, num_thresholds - 2).astype(int)
    return ((k + 0.5) / (num_thresholds - 1)).astype(np.float32)


def multilabel(n, k, rng):
    y = (rng.random((n, k)) < 0.4).astype(np.float32)
    logits = (2 * y - 1) + 1.5 * rng.standard_normal((n, k))
    return y, logits.astype(np.float32)


def one_hot_probs(n, k, rng):
    labels = rng.integers(0, k, n)
    y = np.eye(k, dtype=np.float32)[labels]
    logits = 2.0 * y + rng.standard_normal((n, k))
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    return y, probs.astype(np.float32)


# ------------------------------------------------------------------------------------- AUC

KERAS_Y_TRUE = np.array([0, 0, 1, 1])
KERAS_Y_PRED = np.array([0, 0.5, 0.3, 0.9], np.float32)
KERAS_WEIGHTS = np.array([1, 2, 3, 4], np.float32)


@pytest.mark.parametrize(
    "curve,method,expected",
    [  # keras/src/metrics/confusion_metrics_test.py, AUCTest, num_thresholds=3, weighted
        ("ROC", "interpolation", (1 + 4 / 7) / 2),
        ("ROC", "majoring", 1.0),
        ("ROC", "minoring", 4 / 7),
        ("PR", "majoring", 1.0),
        ("PR", "minoring", 0.7 * 3 / 7),
        ("PR", "interpolation", (0.5 * (3 + 2 * np.log(2.5)) + 4) / 7),
        ("PRGAIN", "majoring", 1.0),
        ("PRGAIN", "minoring", 0.0),
        ("PRGAIN", "interpolation", 0.5),
    ],
)
def test_auc_matches_keras_values(curve, method, expected):
    m = sm.AUC(num_thresholds=3, curve=curve, summation_method=method)
    np.testing.assert_allclose(
        run(m, KERAS_Y_TRUE, KERAS_Y_PRED, KERAS_WEIGHTS), expected, 1e-6, atol=1e-6
    )


def test_auc_matches_keras_unweighted_examples():
    m = sm.AUC(num_thresholds=3)
    assert run(m, KERAS_Y_TRUE, KERAS_Y_PRED) == pytest.approx(0.75)
    assert run(m, KERAS_Y_TRUE, KERAS_Y_PRED, np.array([1.0, 0, 0, 1])) == pytest.approx(1.0)
    logits = np.log(KERAS_Y_PRED + 1e-12) - np.log1p(-KERAS_Y_PRED)
    assert run(sm.AUC(num_thresholds=3, from_logits=True), KERAS_Y_TRUE, logits) == pytest.approx(
        0.75
    )
    y = np.array([0, 0, 0, 1, 0, 1, 0, 1, 1, 1])
    p = np.array([0.1, 0.2, 0.3, 0.3, 0.4, 0.4, 0.6, 0.6, 0.8, 0.9], np.float32)
    prgain = run(sm.AUC(num_thresholds=3, curve="PRGAIN"), y, p)
    np.testing.assert_allclose(prgain, (2 / 3) * (1 / 3) + (1 / 3) * (5 / 6), 1e-6)
    m = sm.AUC(num_thresholds=2, thresholds=[0.5])
    assert m.num_thresholds == 3
    np.testing.assert_allclose(m.thresholds, [-1e-7, 0.5, 1 + 1e-7])
    assert run(m, KERAS_Y_TRUE, KERAS_Y_PRED) == pytest.approx(0.75)


MULTI_Y = np.array([[0, 0, 1, 1], [0, 0, 1, 1]], np.float32).T
MULTI_P = np.array([[0, 0.5, 0.3, 0.9], [0.1, 0.2, 0.3, 0.4]], np.float32).T


@pytest.mark.parametrize(
    "kwargs,weights,expected",
    [  # keras/src/metrics/confusion_metrics_test.py, MultiAUCTest, num_thresholds=5
        (dict(multi_label=True, num_labels=2), None, (0.875 + 1.0) / 2),
        (dict(multi_label=True, label_weights=[0.75, 0.25]), None, 0.875 * 0.75 + 0.25),
        (dict(), None, 1 - 3 / 32),
        (dict(label_weights=[0.75, 0.25]), None, 1 - 0.625 * 0.375 / 2),
        (dict(), np.array([1, 2, 3, 4.0]), 1 - (1 / 3) * (1 - 2 / 7) / 2),
        (dict(), np.arange(8.0).reshape(4, 2), 1 - (1 / 3) * (1 - 3 / 11) / 2),
    ],
)
def test_multi_label_auc_matches_keras_values(kwargs, weights, expected):
    m = sm.AUC(num_thresholds=5, **kwargs)
    np.testing.assert_allclose(run(m, MULTI_Y, MULTI_P, weights), expected, 1e-6)


@pytest.mark.parametrize("weighted", [False, True])
def test_roc_auc_equals_sklearn_when_scores_sit_in_buckets(weighted):
    rng = np.random.default_rng(1)
    y = (rng.random(N) < 0.4).astype(np.float32)
    p = bucket_midpoints(y, rng)
    w = weights_for(N, rng) if weighted else None
    np.testing.assert_allclose(
        run(sm.AUC(), y, p, w), skm.roc_auc_score(y, p, sample_weight=w), 1e-5
    )


def test_pr_auc_is_close_to_sklearn_average_precision():
    rng = np.random.default_rng(2)
    y, p = binary_probs(1000, rng)
    w = weights_for(1000, rng)
    value = run(sm.AUC(num_thresholds=2000, curve="PR"), y, p, w)
    # Keras interpolates between thresholds where sklearn takes steps: close, not equal.
    np.testing.assert_allclose(value, skm.average_precision_score(y, p, sample_weight=w), atol=2e-3)


def test_multi_label_and_flattened_auc_equal_sklearn():
    rng = np.random.default_rng(3)
    y = (rng.random((N, 4)) < 0.4).astype(np.float32)
    p = np.stack([bucket_midpoints(y[:, j], rng) for j in range(4)], axis=1)
    w = weights_for(N, rng)
    per_label = run(sm.AUC(multi_label=True, num_labels=4), y, p, w)
    np.testing.assert_allclose(per_label, skm.roc_auc_score(y, p, sample_weight=w), 1e-5)
    flat = run(sm.AUC(), y, p, w)
    expected = skm.roc_auc_score(y.ravel(), p.ravel(), sample_weight=np.repeat(w, 4))
    np.testing.assert_allclose(flat, expected, 1e-5)


def brute_force_counts(y, p, w, thresholds):
    """Keras's general path: ``p > t`` for every threshold, weighted, summed over rows."""
    above = p[None] > np.asarray(thresholds, np.float32).reshape(-1, *([1] * p.ndim))
    pos, neg = (y != 0) * w, (y == 0) * w
    return [np.sum(x, axis=1) for x in (above * pos, above * neg, ~above * neg, ~above * pos)]


@pytest.mark.parametrize("extra", [0, 700])  # few pairs: compared directly; many: histogram
def test_counts_equal_a_brute_force_comparison_at_every_threshold(extra):
    rng = np.random.default_rng(4)
    given = [0.77, 0.1, 0.3, 0.25, 0.5, *np.round(rng.random(extra), 3)]
    y, logits = multilabel(N, 4, rng)
    p = np.round(1 / (1 + np.exp(-logits)), 2).astype(np.float32)
    p[:5, 0] = given[:5]  # predictions equal to a threshold are not above it
    w = weights_for(N, rng, dyadic=True)[:, None] * np.ones((1, 4), np.float32)
    assert (N * 4 * (len(given) + 2) > sm._DIRECT_LIMIT) == (extra > 0)

    m = sm.AUC(thresholds=given, multi_label=True, num_labels=4)
    state = m.update(m.empty(), y, p, w)
    for got, want in zip(state, brute_force_counts(y, p, w, m.thresholds)):
        np.testing.assert_array_equal(got, want)

    m = sm.Precision(thresholds=given)  # flattened, and in the given (unsorted) order
    state = m.update(m.empty(), y, p, w)
    for got, want in zip(state, brute_force_counts(y.ravel(), p.ravel(), w.ravel(), given)):
        np.testing.assert_array_equal(got, want)


# -------------------------------------------------------------------- precision and recall


@pytest.mark.parametrize("cls", [sm.Precision, sm.Recall])
def test_precision_and_recall_match_keras_examples(cls):
    y, p = np.array([0, 1, 1, 1]), np.array([1.0, 0, 1, 1])
    np.testing.assert_allclose(run(cls(), y, p), 2 / 3, 1e-6)
    assert run(cls(), y, p, np.array([0.0, 0, 1, 0])) == 1.0


def test_precision_top_k_matches_keras_examples():
    y, p = np.array([0, 0, 1, 1]), np.array([1.0, 1, 1, 1])
    assert run(sm.Precision(top_k=2), y, p) == 0.0
    assert run(sm.Precision(top_k=4), y, p) == 0.5


@pytest.mark.parametrize(
    "cls,score", [(sm.Precision, skm.precision_score), (sm.Recall, skm.recall_score)]
)
def test_precision_and_recall_equal_sklearn(cls, score):
    rng = np.random.default_rng(5)
    y, p = binary_probs(N, rng)
    w = weights_for(N, rng)
    thresholds = [0.7, 0.3, 0.5]
    got = run(cls(thresholds=thresholds), y, p, w)
    want = [score(y, p > t, sample_weight=w) for t in thresholds]
    np.testing.assert_allclose(got, want, 1e-5)  # one value per threshold, in the given order
    logits = np.log(p + 1e-6) - np.log1p(-p + 1e-6)
    got = run(cls(from_logits=True), y, logits[:, None], w)
    np.testing.assert_allclose(got, score(y, logits > 0, sample_weight=w), 1e-5)

    y, logits = multilabel(N, 4, rng)
    w = weights_for(N, rng)
    probs = 1 / (1 + np.exp(-logits))
    got = run(cls(class_id=2), y, probs, w)
    np.testing.assert_allclose(got, score(y[:, 2], probs[:, 2] > 0.5, sample_weight=w), 1e-5)
    top2 = np.zeros_like(y, bool)
    np.put_along_axis(top2, np.argsort(-probs, axis=1)[:, :2], True, axis=1)
    got = run(cls(top_k=2), y, probs, w)
    np.testing.assert_allclose(
        got, score(y.ravel(), top2.ravel(), sample_weight=np.repeat(w, 4)), 1e-5
    )
    got = run(cls(top_k=2, class_id=1), y, probs, w)
    np.testing.assert_allclose(got, score(y[:, 1], top2[:, 1], sample_weight=w), 1e-5)


# ------------------------------------------------------------------------------- F-scores


def test_f_scores_match_keras_examples():
    y = np.array([[1, 1, 1], [1, 0, 0], [1, 1, 0]], np.int32)
    p = np.array([[0.2, 0.6, 0.7], [0.2, 0.6, 0.6], [0.6, 0.8, 0.0]], np.float32)
    got = run(sm.FBetaScore(beta=2.0, threshold=0.5, num_classes=3), y, p)
    np.testing.assert_allclose(got, [0.3846154, 0.90909094, 0.8333334], 1e-6)
    got = run(sm.F1Score(threshold=0.5, num_classes=3), y, p)
    np.testing.assert_allclose(got, [0.5, 0.8, 0.6666667], 1e-6)


@pytest.mark.parametrize("average", [None, "micro", "macro", "weighted"])
@pytest.mark.parametrize("beta", [1.0, 2.0])
@pytest.mark.parametrize("threshold", [None, 0.3])
def test_f_scores_equal_sklearn(average, beta, threshold):
    rng = np.random.default_rng(6)
    y, p = one_hot_probs(N, 4, rng)
    w = weights_for(N, rng)
    if threshold is None:
        predicted = np.eye(4)[np.argmax(p, axis=1)]
    else:
        predicted = (p > threshold).astype(float)
    if beta == 1.0:
        metric = sm.F1Score(average, threshold, num_classes=4)
    else:
        metric = sm.FBetaScore(average, beta, threshold, num_classes=4)
    want = skm.fbeta_score(
        y, predicted, beta=beta, average=average, sample_weight=w, zero_division=0
    )
    np.testing.assert_allclose(run(metric, y, p, w), want, 1e-5)
    if beta == 1.0:
        np.testing.assert_allclose(
            want, skm.f1_score(y, predicted, average=average, sample_weight=w)
        )


def test_binary_f1_from_logits_equals_sklearn():
    rng = np.random.default_rng(7)
    y, p = binary_probs(N, rng)
    logits = (4 * (p - 0.5))[:, None]
    w = weights_for(N, rng)
    metric = sm.named("f1", from_logits=True)
    np.testing.assert_allclose(
        run(metric, y, logits, w), skm.f1_score(y, logits[:, 0] > 0, sample_weight=w), 1e-5
    )


# -------------------------------------------------------------------------------- MeanIoU


def expected_mean_iou(y, predicted, w, num_classes):
    """Mean of sklearn's per-class IoU over the classes that occur in y or the predictions."""
    keep = w != 0
    y, predicted, w = y[keep], predicted[keep], w[keep]
    labels = list(range(num_classes))
    iou = skm.jaccard_score(
        y, predicted, labels=labels, average=None, sample_weight=w, zero_division=0
    )
    present = np.isin(labels, np.concatenate([y, predicted]))
    return iou[present].mean()


def test_mean_iou_matches_keras_examples():
    m = sm.MeanIoU(num_classes=2, sparse_y_pred=True)
    y, p = np.array([0, 0, 1, 1]), np.array([0, 1, 0, 1])
    np.testing.assert_allclose(run(m, y, p), 1 / 3, 1e-6)
    np.testing.assert_allclose(run(m, y, p, np.array([0.3, 0.3, 0.3, 0.1])), 0.23809525, 1e-6)


def test_mean_iou_equals_sklearn_jaccard():
    rng = np.random.default_rng(8)
    labels = rng.integers(0, 4, N)
    logits = 1.5 * np.eye(4)[labels] + rng.standard_normal((N, 4))
    w = weights_for(N, rng)
    want = expected_mean_iou(labels, logits.argmax(-1), w, 4)
    np.testing.assert_allclose(run(sm.MeanIoU(4), labels, logits, w), want, 1e-5)
    one_hot = sm.MeanIoU(4, sparse_y_true=False)
    np.testing.assert_allclose(run(one_hot, np.eye(4)[labels], logits, w), want, 1e-5)

    seg = rng.integers(0, 3, (6, 5, 5))  # segmentation maps with per-image weights
    seg_logits = 1.5 * np.eye(3)[seg] + rng.standard_normal((6, 5, 5, 3))
    w = np.array([1.0, 0.5, 0.0, 2.0, 1.0, 0.25], np.float32)
    flat_w = np.repeat(w, 25)
    want = expected_mean_iou(seg.ravel(), seg_logits.argmax(-1).ravel(), flat_w, 3)
    np.testing.assert_allclose(run(sm.MeanIoU(3), seg, seg_logits, w), want, 1e-5)
    keep = seg.ravel() != 0  # ignore_class: those pixels are left out entirely
    want = expected_mean_iou(
        seg.ravel()[keep], seg_logits.argmax(-1).ravel()[keep], flat_w[keep], 3
    )
    np.testing.assert_allclose(run(sm.MeanIoU(3, ignore_class=0), seg, seg_logits, w), want, 1e-5)


# -------------------------------------------------------------------------------- R2Score


def test_r2_matches_keras_example():
    y, p = np.array([[1.0], [4.0], [3.0]]), np.array([[2.0], [4.0], [4.0]])
    np.testing.assert_allclose(run(sm.R2Score(), y, p), 0.57142854, 1e-6)


@pytest.mark.parametrize(
    "aggregation,multioutput",
    [
        ("uniform_average", "uniform_average"),
        ("variance_weighted_average", "variance_weighted"),
        (None, "raw_values"),
    ],
)
def test_r2_equals_sklearn(aggregation, multioutput):
    rng = np.random.default_rng(9)
    y = (rng.standard_normal((N, 4)) * [1.0, 2.0, 0.5, 1.0] + [0.0, 1.0, -1.0, 3.0]).astype(
        np.float32
    )
    p = (y + rng.standard_normal((N, 4)) * [0.5, 1.0, 0.4, 0.1]).astype(np.float32)
    w = weights_for(N, rng)
    got = run(sm.R2Score(aggregation, num_outputs=4), y, p, w)
    np.testing.assert_allclose(
        got, skm.r2_score(y, p, sample_weight=w, multioutput=multioutput), 1e-5
    )


def test_adjusted_r2_and_its_fallback():
    rng = np.random.default_rng(10)
    y = rng.standard_normal(N).astype(np.float32)
    p = (y + 0.5 * rng.standard_normal(N)).astype(np.float32)
    w = weights_for(N, rng)
    n = int(np.sum(w != 0))  # padding rows are not samples
    r2 = skm.r2_score(y, p, sample_weight=w)
    np.testing.assert_allclose(
        run(sm.R2Score(num_regressors=3), y, p, w), 1 - (1 - r2) * (n - 1) / (n - 4), 1e-5
    )
    np.testing.assert_allclose(run(sm.R2Score(num_regressors=n - 1), y, p, w), r2, 1e-5)


# ---------------------------------------------------- streaming: batches, merge, padding, jit


def _binary_case(rng, n):
    return binary_probs(n, rng)


def _binary_logits_case(rng, n):
    y, p = binary_probs(n, rng)
    return y, (4 * (p - 0.5))[:, None]


def _multilabel_case(rng, n):
    return multilabel(n, 4, rng)


def _multilabel_probs_case(rng, n):
    y, logits = multilabel(n, 4, rng)
    return y, 1 / (1 + np.exp(-logits))


def _one_hot_case(rng, n):
    return one_hot_probs(n, 4, rng)


def _segmentation_case(rng, n):
    seg = rng.integers(0, 3, (n, 4, 4)).astype(np.int32)
    return seg, (1.5 * np.eye(3)[seg] + rng.standard_normal((n, 4, 4, 3))).astype(np.float32)


def _regression_case(rng, n):
    y = rng.standard_normal((n, 4)).astype(np.float32)
    return y, (y + 0.5 * rng.standard_normal((n, 4))).astype(np.float32)


CASES = [  # (name, metric factory, data, whether every state entry is a count)
    (
        "auc_multi_label",
        lambda: sm.AUC(multi_label=True, num_labels=4, from_logits=True),
        _multilabel_case,
        True,
    ),
    (
        "auc_flat_label_weights",
        lambda: sm.AUC(label_weights=[1, 0.5, 2, 1], from_logits=True),
        _multilabel_case,
        True,
    ),
    ("precision_thresholds", lambda: sm.Precision(thresholds=[0.7, 0.3, 0.5]), _binary_case, True),
    ("recall_top_k_class_id", lambda: sm.Recall(top_k=2, class_id=1), _multilabel_probs_case, True),
    ("f1_per_class", lambda: sm.F1Score(num_classes=4), _one_hot_case, True),
    ("named_f1_logits", lambda: sm.named("f1", from_logits=True), _binary_logits_case, True),
    ("mean_iou_segmentation", lambda: sm.MeanIoU(3, ignore_class=0), _segmentation_case, True),
    (
        "r2_adjusted",
        lambda: sm.R2Score("variance_weighted_average", 2, num_outputs=4),
        _regression_case,
        False,
    ),
]


def garbage_like(a, rows):
    """Rows that padding may hold: NaN for floats, an out-of-range id for integers."""
    fill = 99 if np.issubdtype(a.dtype, np.integer) else np.nan
    return np.full((rows, *a.shape[1:]), fill, a.dtype)


class StreamingTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(*CASES)
    def test_batches_merge_and_padding_equal_one_update(self, make_metric, make_data, counts):
        rng = np.random.default_rng(11)
        y, p = make_data(rng, 48)
        w = weights_for(48, rng, dyadic=True)  # sums of multiples of 1/4 are exact
        metric = make_metric()
        update, compute = self.variant(metric.update), self.variant(metric.compute)
        same = np.testing.assert_array_equal if counts else self._close
        whole = update(metric.empty(), y, p, w)

        # Three batches of the same size, each 16 real rows and 32 padding rows of weight 0
        # holding NaN or out-of-range labels, shuffled in.
        batches = []
        for i in (0, 16, 32):
            order = rng.permutation(48)
            batches.append(
                (
                    np.concatenate([y[i : i + 16], garbage_like(y, 32)])[order],
                    np.concatenate([p[i : i + 16], garbage_like(p, 32)])[order],
                    np.concatenate([w[i : i + 16], np.zeros(32, np.float32)])[order],
                )
            )
        running = metric.empty()
        for batch in batches:  # batch by batch
            running = update(running, *batch)
        parts = [update(metric.empty(), *batch) for batch in batches]  # e.g. one per device
        jax.tree_util.tree_map(same, running, whole)
        jax.tree_util.tree_map(
            same, metric.merge(parts[0], metric.merge(parts[1], parts[2])), whole
        )

        value = compute(running)
        assert np.all(np.isfinite(value))
        chex.assert_trees_all_close(value, metric.compute(whole), rtol=1e-6, atol=1e-6)

    @staticmethod
    def _close(a, b):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------ names, errors, doctests


def test_default_names_are_keras_3_names():
    assert sm.AUC().name == "auc"
    assert sm.Precision().name == "precision"
    assert sm.Recall().name == "recall"
    assert sm.F1Score("micro").name == "f1_score"
    assert sm.FBetaScore("micro").name == "fbeta_score"
    assert sm.MeanIoU(2).name == "mean_io_u"  # Keras 3's to_snake_case("MeanIoU")
    assert sm.R2Score().name == "r2_score"
    assert sm.AUC(name="val_auc").name == "val_auc"


@pytest.mark.parametrize(
    "name,cls",
    [("auc", sm.AUC), ("precision", sm.Precision), ("recall", sm.Recall), ("f1", sm.F1Score)],
)
@pytest.mark.parametrize("from_logits", [False, True])
def test_named_builds_binary_metrics(name, cls, from_logits):
    metric = sm.named(name, from_logits=from_logits)
    assert isinstance(metric, cls) and metric.name == name and metric.from_logits is from_logits
    assert set(sm.NAMED) == {"auc", "precision", "recall", "f1"}


@pytest.mark.parametrize(
    "make,arg,received",
    [
        (lambda: sm.AUC(num_thresholds=1), "num_thresholds", "num_thresholds=1"),
        (lambda: sm.AUC(curve="ROCK"), "curve", "curve='ROCK'"),
        (lambda: sm.AUC(summation_method="trapezoid"), "summation_method", "'trapezoid'"),
        (lambda: sm.AUC(thresholds=[0.5, 1.5]), "thresholds", "thresholds=[0.5, 1.5]"),
        (lambda: sm.AUC(multi_label=True), "num_labels", "num_labels=None"),
        (lambda: sm.AUC(num_labels=3), "num_labels", "num_labels=3"),
        (lambda: sm.AUC(label_weights=[-1.0, 1.0]), "label_weights", "[-1.0, 1.0]"),
        (
            lambda: sm.AUC(multi_label=True, num_labels=3, label_weights=[1, 1]),
            "label_weights",
            "[1, 1]",
        ),
        (lambda: sm.AUC(from_logits="yes"), "from_logits", "from_logits='yes'"),
        (lambda: sm.AUC(name=3), "name", "name=3"),
        (lambda: sm.Precision(thresholds=1.5), "thresholds", "thresholds=1.5"),
        (lambda: sm.Precision(thresholds=[]), "thresholds", "thresholds=[]"),
        (lambda: sm.Precision(top_k=0), "top_k", "top_k=0"),
        (lambda: sm.Recall(class_id=-1), "class_id", "class_id=-1"),
        (lambda: sm.F1Score(average="samples"), "average", "average='samples'"),
        (lambda: sm.F1Score(average="macro"), "num_classes", "num_classes=None"),
        (lambda: sm.F1Score("micro", threshold=0.0), "threshold", "threshold=0.0"),
        (lambda: sm.F1Score("micro", threshold=1.5), "threshold", "threshold=1.5"),
        (lambda: sm.FBetaScore("micro", beta=0.0), "beta", "beta=0.0"),
        (lambda: sm.FBetaScore("micro", num_classes=0), "num_classes", "num_classes=0"),
        (lambda: sm.MeanIoU(0), "num_classes", "num_classes=0"),
        (lambda: sm.MeanIoU(2, ignore_class=1.5), "ignore_class", "ignore_class=1.5"),
        (lambda: sm.MeanIoU(2, sparse_y_pred=None), "sparse_y_pred", "sparse_y_pred=None"),
        (lambda: sm.R2Score("mean"), "class_aggregation", "class_aggregation='mean'"),
        (lambda: sm.R2Score(num_regressors=-1), "num_regressors", "num_regressors=-1"),
        (lambda: sm.R2Score(num_outputs=0), "num_outputs", "num_outputs=0"),
        (lambda: sm.named("accuracy", from_logits=True), "name", "name='accuracy'"),
    ],
)
def test_bad_arguments_raise_value_errors_naming_them(make, arg, received):
    with pytest.raises(ValueError) as err:
        make()
    assert f"`{arg}`" in str(err.value) and received in str(err.value), str(err.value)


@pytest.mark.parametrize(
    "metric,y_true,y_pred,weights,arg",
    [
        (
            sm.AUC(multi_label=True, num_labels=3),
            np.zeros((4, 2)),
            np.zeros((4, 2)),
            None,
            "y_pred",
        ),
        (sm.AUC(), np.zeros(4), np.zeros(5), None, "y_pred"),
        (sm.F1Score("macro", num_classes=3), np.zeros((4, 2)), np.zeros((4, 2)), None, "y_pred"),
        (sm.F1Score("micro"), np.zeros(4), np.zeros((4, 3)), None, "y_true"),
        (sm.R2Score(num_outputs=2), np.zeros((4, 3)), np.zeros((4, 3)), None, "y_true"),
        (sm.Precision(), np.zeros(4), np.zeros(4), np.ones(5), "weights"),
        (sm.Precision(top_k=5), np.zeros((4, 3)), np.zeros((4, 3)), None, "top_k"),
        (sm.Recall(class_id=3), np.zeros((4, 3)), np.zeros((4, 3)), None, "class_id"),
        (sm.MeanIoU(3, sparse_y_pred=True), np.zeros(4), np.zeros(5), None, "y_true"),
    ],
)
def test_bad_shapes_raise_value_errors(metric, y_true, y_pred, weights, arg):
    with pytest.raises(ValueError) as err:
        jax.jit(metric.update)(metric.empty(), y_true, y_pred, weights)
    assert f"`{arg}`" in str(err.value) and "Received:" in str(err.value), str(err.value)


def test_docstring_examples_run():
    assert doctest.testmod(sm).failed == 0
