"""A GAN on eight Gaussians in the plane, trained by a custom ``train_step``.

A generator and a discriminator live in one model and take turns: each step of ``fit``
updates the discriminator on real and generated points, then the generator against the
updated discriminator (the non-saturating loss), each with its own Adam. The step is an
ordinary pure function ``(train_state, batch) -> (train_state, logs)`` passed to
``hkfit.Model(train_step=...)``; ``fit`` runs it fused like any built-in step and logs
``d_loss`` and ``g_loss`` per epoch. The two optimizers' states are created by one
``optax.GradientTransformation`` whose ``init`` splits the parameters by network.

It prints how far generated points are from the nearest of the eight modes, and how many
modes they cover, before and after training; then saves the model one epoch before the
end, loads it into a fresh model and checks that finishing training from the file gives
bit for bit the parameters of the uninterrupted run.

Run:  python examples/gan.py
"""

import os
import tempfile

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax

import hkfit
from hkfit.callbacks import LambdaCallback

MODES, RADIUS, SPREAD = 8, 2.0, 0.05  # eight Gaussians on a circle of radius 2
CENTERS = RADIUS * np.stack(
    [np.cos(2 * np.pi * np.arange(MODES) / MODES), np.sin(2 * np.pi * np.arange(MODES) / MODES)],
    axis=-1,
).astype(np.float32)
LATENT = 8  # the forward takes noise; fit's x are real points of another shape
HIDDEN = 64
EPOCHS, BATCH_SIZE = 100, 128


def generator(z):
    return hk.nets.MLP([HIDDEN, HIDDEN, 2], name="generator")(z)


def discriminator(x):
    return hk.nets.MLP([HIDDEN, HIDDEN, 1], name="discriminator")(x)[:, 0]  # logits


def forward(z):
    """Both networks, so that init creates both; predict(z)["sample"] draws points."""
    sample = generator(z)
    return {"sample": sample, "score": discriminator(sample)}


# The same module names as in `forward`, so each applies with the model's params.
G = hk.without_apply_rng(hk.transform(generator))
D = hk.without_apply_rng(hk.transform(discriminator))
G_OPT = optax.adam(1e-3, b1=0.5)
D_OPT = optax.adam(1e-3, b1=0.5)


def split(params):
    """(generator params, discriminator params)."""
    return hk.data_structures.partition(
        lambda module, name, value: module.startswith("generator"), params
    )


def gan_optimizer():
    """One optimizer state per network: {"generator": ..., "discriminator": ...}."""

    def init(params):
        g_params, d_params = split(params)
        return {"generator": G_OPT.init(g_params), "discriminator": D_OPT.init(d_params)}

    def update(updates, state, params=None):
        raise NotImplementedError(
            "The GAN's optimizers are applied by its train_step, one per network."
        )

    return optax.GradientTransformation(init, update)


def bce(logits, label):
    return optax.losses.sigmoid_binary_cross_entropy(logits, jnp.full_like(logits, label))


def train_step(ts, batch):
    """One discriminator step, then one generator step (non-saturating loss)."""
    g_params, d_params = split(ts.params)
    real, weights = batch.x, batch.weights  # one weight per real row (1 unless given)
    k_d, k_g = jax.random.split(jax.random.fold_in(ts.rng, ts.step))
    z_d = jax.random.normal(k_d, (real.shape[0], LATENT))
    z_g = jax.random.normal(k_g, (real.shape[0], LATENT))

    def d_loss_fn(d_params):
        fake = G.apply(g_params, z_d)
        real_term = jnp.sum(weights * bce(D.apply(d_params, real), 1.0)) / jnp.sum(weights)
        return real_term + jnp.mean(bce(D.apply(d_params, fake), 0.0))

    d_loss, d_grads = jax.value_and_grad(d_loss_fn)(d_params)
    d_updates, d_opt = D_OPT.update(d_grads, ts.opt_state["discriminator"], d_params)
    d_params = optax.apply_updates(d_params, d_updates)

    def g_loss_fn(g_params):
        return jnp.mean(bce(D.apply(d_params, G.apply(g_params, z_g)), 1.0))

    g_loss, g_grads = jax.value_and_grad(g_loss_fn)(g_params)
    g_updates, g_opt = G_OPT.update(g_grads, ts.opt_state["generator"], g_params)
    g_params = optax.apply_updates(g_params, g_updates)

    params = hk.data_structures.merge(g_params, d_params)
    opt_state = {"generator": g_opt, "discriminator": d_opt}
    return ts._replace(params=params, opt_state=opt_state), {"d_loss": d_loss, "g_loss": g_loss}


def make_model():
    return hkfit.Model(forward, train_step=train_step, optimizer=gan_optimizer(), seed=0)


def real_samples(n, seed=0):
    rng = np.random.default_rng(seed)
    points = CENTERS[rng.integers(0, MODES, n)] + SPREAD * rng.normal(size=(n, 2))
    return points.astype(np.float32)


def quality(points):
    """(mean distance to the nearest mode, modes holding >= 1/4 of their share)."""
    distances = np.linalg.norm(points[:, None, :] - CENTERS[None], axis=-1)
    nearest = distances.argmin(axis=-1)
    close = distances.min(axis=-1) < 4 * SPREAD
    counts = np.bincount(nearest[close], minlength=MODES)
    return float(distances.min(axis=-1).mean()), int(np.sum(counts >= len(points) / MODES / 4))


def main():
    x = real_samples(4096)
    z = np.random.default_rng(1).normal(size=(2000, LATENT)).astype(np.float32)  # test noise
    model = make_model().init(z)  # built on the forward's input: noise
    before = quality(model.predict(z, batch_size=500, verbose=0)["sample"])

    path = os.path.join(tempfile.mkdtemp(), "gan.hkfit")

    def save_before_last_epoch(epoch, logs):
        if epoch == EPOCHS - 2:
            model.save(path)

    # A custom step may train on data that is not the forward's input (real points here).
    # fit needs targets with array inputs; the train step reads only x, so y is x again.
    history = model.fit(
        x,
        x,
        epochs=EPOCHS,
        batch_size=BATCH_SIZE,
        verbose=0,
        callbacks=[LambdaCallback(on_epoch_end=save_before_last_epoch)],
    )
    after = quality(model.predict(z, batch_size=500, verbose=0)["sample"])
    logs = history.history
    print(
        f"d_loss {logs['d_loss'][0]:.3f} -> {logs['d_loss'][-1]:.3f}, "
        f"g_loss {logs['g_loss'][0]:.3f} -> {logs['g_loss'][-1]:.3f}"
    )
    print(
        f"{len(z)} test samples: mean distance to the nearest mode {before[0]:.3f} -> "
        f"{after[0]:.3f}, modes covered {before[1]} -> {after[1]} of {MODES}"
    )

    # Resume: a fresh model loads the file and trains the last epoch again.
    resumed = make_model().load(path)
    resumed.fit(x, x, epochs=EPOCHS, initial_epoch=EPOCHS - 1, batch_size=BATCH_SIZE, verbose=0)
    same = all(
        np.array_equal(a, b)
        for a, b in zip(
            jax.tree_util.tree_leaves(model.params), jax.tree_util.tree_leaves(resumed.params)
        )
    )
    print(f"resumed from the checkpoint of epoch {EPOCHS - 1}: bit-identical params {same}")
    assert after[0] < 0.25 * before[0], f"generated points stayed far from the modes: {after[0]}"
    assert after[1] > before[1], f"modes covered: {before[1]} -> {after[1]}"
    assert len(logs["d_loss"]) == len(logs["g_loss"]) == EPOCHS
    assert same, "finishing training from the checkpoint changed the parameters"
    return {"before": before, "after": after, "resumed_identical": same, "history": logs}


if __name__ == "__main__":
    main()
