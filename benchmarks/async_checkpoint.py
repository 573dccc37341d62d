"""Asynchronous checkpoints: the training time a background write gives back.

A model with about 30 M parameters (Adam: 90 M floats, a ~360 MB checkpoint, so one
write takes well over 100 ms) trains for a few epochs with ``ModelCheckpoint`` saving
every ``--every`` batches, synchronously and with ``asynchronous=True``, interleaved
(A B A B). It reports the median fit time of each, the time of one synchronous write
measured alone, and how much of the write time the asynchronous mode hides.

Run:  python benchmarks/async_checkpoint.py [--repeats 3] [--out benchmarks/RESULTS-checkpoints.md]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

import haiku as hk
import jax
import numpy as np

import hkfit
from hkfit import callbacks as C

WIDTH = 2800  # two Linear(WIDTH) layers on WIDTH inputs: ~15.7 M params, 3x with Adam


def forward(x):
    return hk.Linear(10)(jax.nn.relu(hk.Linear(WIDTH)(jax.nn.relu(hk.Linear(WIDTH)(x)))))


def new_model() -> hkfit.Model:
    return hkfit.Model(forward, loss="sparse_categorical_crossentropy", optimizer="adam", seed=0)


def timed_fit(x, y, directory: str, asynchronous: bool | None, every: int) -> float:
    model = new_model()
    model.fit(x[:64], y[:64], batch_size=64, verbose=0)  # compile outside the timing
    callbacks = []
    if asynchronous is not None:
        callbacks = [
            C.ModelCheckpoint(
                os.path.join(directory, "ckpt.npz"), save_freq=every, asynchronous=asynchronous
            )
        ]
    start = time.perf_counter()
    model.fit(x, y, batch_size=64, epochs=2, verbose=0, callbacks=callbacks)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--every", type=int, default=8, help="batches between saves")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    x = rng.normal(size=(64 * 16, WIDTH)).astype(np.float32)
    y = rng.integers(0, 10, len(x))
    directory = tempfile.mkdtemp(prefix="hkfit-bench-")
    try:
        model = new_model().init(x[:2])
        write = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            model.save(os.path.join(directory, "alone.npz"))
            write.append(time.perf_counter() - start)
        size_mb = os.path.getsize(os.path.join(directory, "alone.npz")) / 2**20
        runs: dict[str, list[float]] = {"no checkpoint": [], "synchronous": [], "asynchronous": []}
        for _ in range(args.repeats):
            runs["no checkpoint"].append(timed_fit(x, y, directory, None, args.every))
            runs["synchronous"].append(timed_fit(x, y, directory, False, args.every))
            runs["asynchronous"].append(timed_fit(x, y, directory, True, args.every))
    finally:
        shutil.rmtree(directory, ignore_errors=True)

    steps = 2 * len(x) // 64
    saves = steps // args.every
    median = {name: statistics.median(times) for name, times in runs.items()}
    spread = {name: (max(t) - min(t)) / statistics.median(t) for name, t in runs.items()}
    cost_sync = median["synchronous"] - median["no checkpoint"]
    cost_async = median["asynchronous"] - median["no checkpoint"]
    lines = [
        "# Asynchronous checkpoints",
        "",
        f"`python benchmarks/async_checkpoint.py --repeats {args.repeats} --every {args.every}`"
        f" on {os.cpu_count()} CPU cores, JAX {jax.__version__} ({jax.default_backend()}).",
        "",
        f"A {size_mb:.0f} MB checkpoint (one `model.save`, measured alone: "
        f"{statistics.median(write) * 1e3:.0f} ms median); {steps} training steps with "
        f"{saves} saves (every {args.every} batches). Interleaved, {args.repeats} repeats.",
        "",
        "| run | fit time (median) | spread | per step | cost of the saves |",
        "|---|---|---|---|---|",
    ]
    for name in runs:
        cost = {"synchronous": cost_sync, "asynchronous": cost_async}.get(name)
        lines.append(
            f"| {name} | {median[name]:.2f} s | {spread[name]:.0%} | "
            f"{median[name] / steps * 1e3:.1f} ms | "
            + ("—" if cost is None else f"{cost:.2f} s ({cost / saves * 1e3:.0f} ms per save)")
            + " |"
        )
    hidden = 1 - cost_async / cost_sync if cost_sync > 0 else float("nan")
    lines += [
        "",
        f"The asynchronous mode hides {hidden:.0%} of the time the synchronous saves cost "
        "the training loop. What remains is the copy of the arrays to the host, which has "
        "to happen before the next step can reuse their buffers; on a CPU the background "
        "write also competes with training for the same cores.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
