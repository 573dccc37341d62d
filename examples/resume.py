"""A training run that survives being killed: run it, interrupt it, run it again.

    python examples/resume.py                       # backup in ./runs/resume_example
    python examples/resume.py /tmp/my_run           # backup in /tmp/my_run
    python examples/resume.py --crash-after-epoch 3 # simulate a crash after epoch 3

Kill it at any time (Ctrl-C, `kill -9`, a preempted machine) and start the same command
again: ``BackupAndRestore`` reloads the state saved at the end of the last completed epoch
and training continues from the next one. The final parameters and history are the same,
bit for bit on CPU, as those of a run that was never interrupted. The backup is deleted
when training completes.
"""

from __future__ import annotations

import argparse
import os

import haiku as hk
import jax
import numpy as np

import hkfit
from hkfit import callbacks


def forward(x, is_training):
    x = jax.nn.relu(hk.Linear(32)(x))
    if is_training:
        x = hk.dropout(hk.next_rng_key(), 0.2, x)
    return hk.Linear(3)(x)


def make_data(n=600, seed=0):
    """Three Gaussian blobs in 8 dimensions."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    centers = rng.normal(scale=2.0, size=(3, 8))
    x = centers[y] + rng.normal(size=(n, 8))
    return x.astype(np.float32), y


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("backup_dir", nargs="?", default=os.path.join("runs", "resume_example"))
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument(
        "--crash-after-epoch",
        type=int,
        default=None,
        help="exit abruptly in the epoch after this one (to try resuming)",
    )
    args = parser.parse_args()

    x, y = make_data()
    model = hkfit.Model(
        forward,
        loss="sparse_categorical_crossentropy",
        optimizer="adam",
        metrics=["accuracy"],
        seed=0,
    )
    backup = callbacks.BackupAndRestore(args.backup_dir)

    def announce(epoch, logs):
        if epoch == (backup.restored_epoch or 0):  # the first epoch this run trains
            where = "scratch" if backup.restored_epoch is None else f"the backup in {backup.path}"
            print(f"Starting at epoch {epoch + 1}/{args.epochs}, from {where}.", flush=True)

    def maybe_crash(batch, logs):
        if args.crash_after_epoch is not None and model.epoch >= args.crash_after_epoch:
            print(
                f"Simulated crash during epoch {model.epoch + 1}. Run the command again to resume.",
                flush=True,
            )
            os._exit(1)

    history = model.fit(
        x,
        y,
        epochs=args.epochs,
        batch_size=32,
        validation_split=0.2,
        verbose=2,
        callbacks=[
            callbacks.LambdaCallback(on_epoch_begin=announce),
            callbacks.LearningRateScheduler(lambda epoch, lr: lr * 0.9),
            backup,  # last, so its backup includes every other callback's changes
            callbacks.LambdaCallback(on_train_batch_end=maybe_crash),
        ],
    )
    # A fingerprint of the final parameters: equal, to the last bit, after any interruption.
    checksum = sum(float(np.abs(np.asarray(leaf)).sum()) for leaf in jax.tree.leaves(model.params))
    print(
        f"Done: {len(history.epoch)} epochs, final val_accuracy "
        f"{history.history['val_accuracy'][-1]:.3f}, params checksum {checksum!r}."
    )
    assert history.epoch == list(range(args.epochs)), history.epoch  # earlier epochs restored
    assert history.history["val_accuracy"][-1] > 0.8, history.history["val_accuracy"]
    assert not os.path.exists(backup.path), "the backup is deleted once training completes"


if __name__ == "__main__":
    main()
