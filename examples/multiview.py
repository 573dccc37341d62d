"""Multi-view classification (MVCNN style) with ``hkfit.multiview`` and ``Model.vmap``.

Each example is one class-dependent 12x12 pattern seen 5 times, each time shifted at
random and with fresh noise; the 5 views are stacked on a trailing axis:
``x.shape == (n, 12, 12, 1, 5)``. One small CNN with shared parameters looks at every
view and the per-view logits are max-pooled, so the prediction does not depend on the
order of the views.

Run: ``python examples/multiview.py``
"""

import haiku as hk
import jax
import numpy as np
import optax

import hkfit

NUM_CLASSES, VIEWS, SIZE = 4, 5, 12


def make_data(n: int, rng: np.random.RandomState, patterns: np.ndarray):
    """``n`` examples of ``VIEWS`` shifted, noisy views of their class pattern."""
    y = rng.randint(0, NUM_CLASSES, n)
    x = np.empty((n, SIZE, SIZE, 1, VIEWS), np.float32)
    for i in range(n):
        for v in range(VIEWS):
            dy, dx = rng.randint(-2, 3, size=2)
            view = np.roll(patterns[y[i]], (dy, dx), axis=(0, 1))
            x[i, :, :, 0, v] = view + 0.3 * rng.randn(SIZE, SIZE)
    return x, y


def cnn(x, is_training):
    """One view ``[batch, 12, 12, 1]`` -> class logits ``[batch, NUM_CLASSES]``."""
    x = jax.nn.relu(hk.Conv2D(8, 3)(x))
    x = hk.max_pool(x, window_shape=(2, 2, 1), strides=(2, 2, 1), padding="SAME")
    x = jax.nn.relu(hk.Conv2D(16, 3)(x))
    x = hk.Flatten()(x)
    if is_training:
        x = hk.dropout(hk.next_rng_key(), 0.1, x)
    return hk.Linear(NUM_CLASSES)(x)


def main():
    rng = np.random.RandomState(0)
    patterns = (rng.rand(NUM_CLASSES, SIZE, SIZE) > 0.7).astype(np.float32)
    x_train, y_train = make_data(512, rng, patterns)
    x_test, y_test = make_data(128, rng, patterns)

    model = hkfit.Model(
        hkfit.multiview(cnn, axis=-1, pool="max"),
        loss="sparse_categorical_crossentropy",
        optimizer=optax.adam(3e-3),
        metrics=["accuracy"],
        seed=0,
    )
    model.fit(x_train, y_train, epochs=8, batch_size=64, verbose=2)
    results = model.evaluate(x_test, y_test, verbose=0)
    print("test:", results)

    # Max pooling over views: the order of the views does not matter.
    permuted = x_test[..., rng.permutation(VIEWS)]
    logits = model.predict(x_test)
    invariant = np.allclose(logits, model.predict(permuted), atol=1e-5)
    print("order invariant:", invariant)

    # The same parameters as a single-view model: per-view logits through a vmapped view.
    single = hkfit.Model(cnn, loss="sparse_categorical_crossentropy")
    single.init(x_test[:1, ..., 0])
    single.params = model.params
    per_view = single.vmap(in_axes=-1, out_axes=-1).predict(x_test)
    pooled = np.allclose(per_view.max(-1), logits, atol=1e-5)
    print("per-view logits:", per_view.shape, "max over views == model output:", pooled)

    # The model is a pure function: d(logits) / d(input) for one example.
    jacobian = jax.jacrev(model.apply_fn, argnums=2)(model.params, model.state, x_test[:1])
    print("Jacobian of the logits w.r.t. one input:", jacobian.shape)

    assert results["accuracy"] > 0.8, f"test accuracy {results['accuracy']:.3f}, expected > 0.8"
    assert invariant, "the prediction changed when the views were reordered"
    assert pooled and per_view.shape == (len(x_test), NUM_CLASSES, VIEWS), per_view.shape
    assert jacobian.shape == (1, NUM_CLASSES, 1, *x_test.shape[1:]), jacobian.shape
    return results


if __name__ == "__main__":
    main()
