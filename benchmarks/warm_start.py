"""Warm start: the first epoch of a fresh process, with and without the compilation cache.

Each measurement is a new Python process that builds a model and runs ``fit`` for one
epoch (plus ``evaluate`` and ``predict``), timed from the start of the process to the end
of ``predict``; the process reports its own import time too, so the difference is what
compilation costs. Three kinds of process, interleaved, ``--repeats`` times each:

* ``no cache``: JAX's default, everything compiled;
* ``cache, cold``: ``hkfit.enable_compilation_cache(dir)`` on an empty directory (compiles
  and stores);
* ``cache, warm``: the same directory again (loads what the cold run stored).

Run:  python benchmarks/warm_start.py [--repeats 3] [--out benchmarks/RESULTS-warm-start.md]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

CHILD = r"""
import json, sys, time
start = time.perf_counter()
import haiku as hk, jax, numpy as np
import hkfit
from sklearn.datasets import load_digits
imported = time.perf_counter()
if sys.argv[1] != "-":
    hkfit.enable_compilation_cache(sys.argv[1])
digits = load_digits()
x = (digits.images[..., None] / 16.0).astype(np.float32)
y = digits.target.astype(np.int32)


def cnn(x):
    x = jax.nn.relu(hk.Conv2D(16, 3)(x))
    x = hk.max_pool(x, 2, 2, "SAME")
    x = jax.nn.relu(hk.Conv2D(32, 3)(x))
    return hk.Linear(10)(hk.Flatten()(x))


def mlp(x):
    return hk.nets.MLP([256, 256, 10])(hk.Flatten()(x))


model = hkfit.Model(
    {"cnn": cnn, "mlp": mlp}[sys.argv[2]],
    loss="sparse_categorical_crossentropy",
    metrics=["accuracy"],
    optimizer="adam",
)
model.fit(x, y, epochs=1, batch_size=64, verbose=0, validation_split=0.2)
model.evaluate(x, y, verbose=0)
model.predict(x, verbose=0)
done = time.perf_counter()
print(json.dumps({"total": done - start, "import": imported - start}))
"""


def run(cache: str, model: str) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    out = subprocess.run(
        [sys.executable, "-c", CHILD, cache, model],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None, help="write the markdown table here")
    args = parser.parse_args()
    began = time.time()
    rows = []
    for model in ("mlp", "cnn"):
        times: dict[str, list[dict]] = {"no cache": [], "cache, cold": [], "cache, warm": []}
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory() as cache:
                times["no cache"].append(run("-", model))
                times["cache, cold"].append(run(cache, model))
                times["cache, warm"].append(run(cache, model))
        base = statistics.median(t["total"] - t["import"] for t in times["no cache"])
        for kind, runs in times.items():
            work = statistics.median(t["total"] - t["import"] for t in runs)
            total = statistics.median(t["total"] for t in runs)
            rows.append(f"| {model} | {kind} | {total:.2f} | {work:.2f} | {base / work:.2f}x |")
    import jax

    lines = [
        "# Warm start with the compilation cache",
        "",
        f"`python benchmarks/warm_start.py --repeats {args.repeats}` on "
        f"{time.strftime('%Y-%m-%d %H:%M')}, {time.time() - began:.0f} s; jax {jax.__version__}, "
        f"backend {jax.default_backend()}, {os.cpu_count()} CPUs.",
        "",
        "A fresh process builds a digits model (1,797 images) and runs `fit(epochs=1,",
        "validation_split=0.2)`, `evaluate` and `predict`. *after imports* excludes the",
        "process's imports (the same for all three); speed-up = no cache / this, after imports.",
        "Medians over the repeats.",
        "",
        "| model | process | total (s) | after imports (s) | speed-up |",
        "|---|---|---:|---:|---:|",
        *rows,
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
