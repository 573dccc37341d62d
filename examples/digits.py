"""Train a small Haiku CNN on scikit-learn's bundled 8x8 digits with hkfit.

Run:  python examples/digits.py
      python examples/digits.py --precision mixed_bfloat16   # mixed precision (needs jmp)
"""

import argparse

import haiku as hk
import jax
import numpy as np
import optax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import hkfit


def forward(x, is_training):
    """Conv -> BatchNorm -> ReLU (twice), dropout in training, then 10 logits."""
    for channels in (16, 32):
        x = hk.Conv2D(channels, 3)(x)
        x = hk.BatchNorm(create_scale=True, create_offset=True, decay_rate=0.9)(x, is_training)
        x = jax.nn.relu(x)
    x = hk.Flatten()(x)
    if is_training:
        x = hk.dropout(hk.next_rng_key(), 0.2, x)
    return hk.Linear(10)(x)


def main(precision="float32", verbose="auto"):
    digits = load_digits()
    images = (digits.images[..., None] / 16.0).astype(np.float32)  # (1797, 8, 8, 1), channels last
    labels = digits.target.astype(np.int32)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=0.2, random_state=0, stratify=labels
    )

    model = hkfit.Model(
        forward,
        loss="sparse_categorical_crossentropy",
        optimizer=optax.adam(1e-3),
        metrics=["accuracy"],
        precision=precision,
        seed=0,
    )
    model.fit(x_train, y_train, epochs=15, batch_size=64, validation_split=0.1, verbose=verbose)
    results = model.evaluate(x_test, y_test, verbose=0)
    print(f"test loss {results['loss']:.4f} - test accuracy {results['accuracy']:.4f}")
    assert results["accuracy"] > 0.95, f"test accuracy {results['accuracy']:.4f}, expected > 0.95"
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Train a small CNN on the 8x8 digits.")
    parser.add_argument(
        "--precision",
        default="float32",
        choices=["float32", "mixed_bfloat16", "mixed_float16"],
        help="hkfit.Model(precision=...): float32, or a mixed policy (needs jmp)",
    )
    main(parser.parse_args().precision)
