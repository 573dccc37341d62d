"""A variational autoencoder on scikit-learn's 8x8 digits, written the natural way.

The encoder adds its KL term with ``hkfit.add_loss``; the model is trained with
``fit(x, x)`` on the reconstruction loss, and ``predict`` returns reconstructions only.

Run:  python examples/vae.py
"""

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits

import hkfit

LATENT = 4


def forward(x):
    """Encode to a Gaussian, sample with the reparameterization trick, decode to logits."""
    h = jax.nn.relu(hk.Linear(64)(x))
    mean, log_var = hk.Linear(LATENT)(h), hk.Linear(LATENT)(h)
    z = mean + jnp.exp(0.5 * log_var) * jax.random.normal(hk.next_rng_key(), mean.shape)
    # KL(q(z|x) || N(0, I)) per example, in nats: part of the objective and of the logs
    hkfit.add_loss(-0.5 * jnp.sum(1 + log_var - mean**2 - jnp.exp(log_var), axis=-1), name="kl")
    return hk.Linear(64)(jax.nn.relu(hk.Linear(64)(z)))  # Bernoulli logits per pixel


def reconstruction(y_true, logits):
    """Bernoulli negative log-likelihood per example, summed over pixels (nats)."""
    return optax.losses.sigmoid_binary_cross_entropy(logits, y_true).sum(axis=-1)


def main():
    pixels = (load_digits().data / 16.0).astype(np.float32)  # (1797, 64) in [0, 1]
    x_train, x_test = pixels[:1500], pixels[1500:]
    model = hkfit.Model(forward, loss=reconstruction, optimizer=optax.adam(2e-3), seed=0)
    history = model.fit(x_train, x_train, epochs=20, batch_size=64, verbose=0)
    first, last = history.history["loss"][0], history.history["loss"][-1]
    test = model.evaluate(x_test, x_test, batch_size=100, verbose=0)
    print(
        f"train -ELBO {first:.2f} -> {last:.2f} nats; test -ELBO {test['loss']:.2f} "
        f"(KL {test['kl']:.2f})"
    )
    assert last < first and "kl" in test and model.predict(x_test).shape == x_test.shape
    return test


if __name__ == "__main__":
    main()
