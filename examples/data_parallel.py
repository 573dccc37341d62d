"""Data-parallel training on every local device, here 8 virtual CPU devices.

The same script runs unchanged on a machine with several GPUs or TPU cores: only the
``XLA_FLAGS`` line below, which splits the CPU into 8 devices, is there for the demo.

Run:  python examples/data_parallel.py
"""

import os

# Must be set before JAX is imported: one CPU becomes 8 devices.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()

import haiku as hk
import jax
import numpy as np
import optax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import hkfit


def forward(x, is_training):
    """A small MLP; its BatchNorm sees the statistics of the whole global batch."""
    x = hk.Linear(64)(x)
    x = hk.BatchNorm(create_scale=True, create_offset=True, decay_rate=0.9)(x, is_training)
    return hk.Linear(10)(jax.nn.relu(x))


def main():
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)  # (1797, 64)
    y = digits.target.astype(np.int32)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.2, random_state=0, stratify=y
    )

    strategy = hkfit.DataParallel()  # a 1-D "data" mesh over jax.devices()
    print(f"devices: {jax.device_count()} ({strategy})")
    model = hkfit.Model(
        forward,
        loss="sparse_categorical_crossentropy",
        optimizer=optax.adam(3e-3),
        metrics=["accuracy"],
        seed=0,
        distribution=strategy,
    )
    # batch_size is the global batch: 64 rows per step, 8 on each of the 8 devices.
    model.fit(x_train, y_train, epochs=10, batch_size=64, validation_split=0.1, verbose=2)
    results = model.evaluate(x_test, y_test, verbose=0)  # exact: 360 rows, no row dropped
    print(f"test accuracy {results['accuracy']:.4f}")
    assert results["accuracy"] > 0.93, f"test accuracy {results['accuracy']:.4f}, expected > 0.93"
    # The parameters are replicated: every device holds a copy of each.
    kernel = model.params["linear"]["w"]
    assert len(kernel.sharding.device_set) == jax.device_count(), kernel.sharding
    return results


if __name__ == "__main__":
    main()
