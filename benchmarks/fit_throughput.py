"""Training, evaluation and prediction throughput of ``hkfit.Model`` against hand-written JAX.

Four implementations of one model (MLP in-256-256-10, relu, Adam 1e-3, softmax
cross-entropy from logits, accuracy tracked during training) run in ONE process,
interleaved repeat by repeat (A B C D, then B C D A, ...):

1. ``hkfit``: ``Model.fit`` with its defaults (``steps_per_execution="auto"``), verbose=0.
2. ``jit loop``: Haiku + Optax, one jitted step per batch with params and optimizer state
   donated; each epoch a numpy permutation, batches gathered on the host.
3. ``scan epoch``: the whole epoch in ONE jitted call: permutation on the device, the
   permuted data reshaped into batches, ``lax.scan`` over them (then the last, smaller
   batch): one dispatch per epoch, the reference every ratio is taken to.
4. ``keras``: Keras 3 with ``KERAS_BACKEND=jax`` and its defaults, when keras is importable.

A "mixed precision" part runs ``hkfit`` alone under ``Model(precision=...)`` =
``"float32"``, ``"mixed_bfloat16"`` and ``"mixed_float16"`` (interleaved the same way)
and reports each policy's samples/s as a ratio to float32.

Every run builds a fresh model (its steps are traced and compiled again) and trains for a
few epochs: the first epoch (setup + compilation) is reported apart, steady-state samples/s
come from the later ones. One excluded warm-up run per implementation first pays the
process-wide one-time costs (lazy imports, the small eager operations every library
shares). Peak memory is the kernel's high-water mark (VmHWM), reset before each run via
``/proc/self/clear_refs``. A "cold start" section runs each implementation once more in a
fresh subprocess, which gives the first-fit compile cost and the whole-process peak RSS a
user actually sees.

Usage::

    python benchmarks/fit_throughput.py [--quick] [--repeats N] [--out benchmarks/RESULTS.md]
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import functools
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import NamedTuple

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["KERAS_BACKEND"] = "jax"  # keras must use the same backend as everything else

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax

import hkfit

HIDDEN = (256, 256)
CLASSES = 10
LEARNING_RATE = 1e-3
IMPLS = ("hkfit", "jit loop", "scan epoch", "keras", "keras spe32")
#: A row whose repeats spread more than this (max - min over the median) is flagged noisy.
NOISY = 0.15
PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")
MB = 1024 * 1024
_KERAS: dict = {}


def import_keras():
    """The keras module (JAX backend), or None with the reason in ``_KERAS["error"]``."""
    if "module" not in _KERAS:
        try:
            import keras

            _KERAS["module"], _KERAS["error"] = keras, None
        except Exception as e:  # not installed, or no usable backend
            _KERAS["module"], _KERAS["error"] = None, f"{type(e).__name__}: {e}"
    return _KERAS["module"]


# --- Data --------------------------------------------------------------------------------


class Data(NamedTuple):
    x: np.ndarray
    y: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    test_name: str  # what the reported accuracy is measured on


def synthetic(n: int, n_test: int, dim: int = 784, seed: int = 0) -> Data:
    """Gaussian inputs labelled by a fixed random linear teacher (learnable, ~balanced)."""
    rng = np.random.default_rng(seed)
    teacher = rng.standard_normal((dim, CLASSES)).astype(np.float32)
    x = rng.standard_normal((n + n_test, dim), dtype=np.float32)
    y = np.argmax(x @ teacher, axis=1).astype(np.int32)
    return Data(x[:n], y[:n], x[n:], y[n:], "held-out")


def digits() -> Data:
    """scikit-learn's 8x8 digits (all 1797 rows, 64 features) scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.data / 16.0).astype(np.float32)
    y = bunch.target.astype(np.int32)
    return Data(x, y, x, y, "train")


# --- Memory ------------------------------------------------------------------------------


def status_kb(field: str) -> int | None:
    """A ``/proc/self/status`` field (VmRSS, VmHWM) in kB, or None off Linux."""
    try:
        with open("/proc/self/status") as f:
            match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
        return int(match.group(1)) if match else None
    except OSError:
        return None


def trim() -> None:
    """Collects garbage and returns free heap pages to the OS, so RSS means live memory."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakRss:
    """Peak resident memory of a block, in bytes, and its growth over the RSS before it.

    Uses the kernel's high-water mark (VmHWM) reset through ``/proc/self/clear_refs``
    (Linux >= 4.0), so no peak is missed; falls back to sampling VmRSS every millisecond.
    """

    method = "not measured"

    def __enter__(self):
        trim()
        self.before = (status_kb("VmRSS") or 0) * 1024
        self._sampler = None
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            PeakRss.method = "VmHWM, reset through /proc/self/clear_refs"
        except OSError:
            PeakRss.method = "VmRSS sampled every 1 ms"
            self._samples = [self.before]
            self._stop = threading.Event()
            self._sampler = threading.Thread(target=self._sample, daemon=True)
            self._sampler.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.001):
            self._samples.append((status_kb("VmRSS") or 0) * 1024)

    def __exit__(self, *exc):
        if self._sampler is not None:
            self._stop.set()
            self._sampler.join()
            self.peak = max(self._samples)
        else:
            self.peak = (status_kb("VmHWM") or 0) * 1024
        self.growth = max(0, self.peak - self.before)


# --- The four implementations --------------------------------------------------------------


def forward(x):
    return hk.nets.MLP([*HIDDEN, CLASSES])(x)


def haiku_net() -> hk.Transformed:
    return hk.without_apply_rng(hk.transform(forward))


def make_step(net: hk.Transformed, opt: optax.GradientTransformation) -> Callable:
    """One Adam step; ``sums`` accumulates (loss sum, correct count) on the device."""

    def step(params, opt_state, sums, xb, yb):
        def objective(p):
            logits = net.apply(p, xb)
            losses = optax.softmax_cross_entropy_with_integer_labels(logits, yb)
            return losses.mean(), (losses, logits)

        grads, (losses, logits) = jax.grad(objective, has_aux=True)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        correct = jnp.sum(jnp.argmax(logits, -1) == yb).astype(jnp.float32)
        return params, opt_state, sums + jnp.stack([losses.sum(), correct])

    return step


def make_apply(net: hk.Transformed) -> tuple[Callable, Callable]:
    """Hand-written jitted evaluation (loss and correct sums) and prediction of one batch."""

    @jax.jit
    def eval_batch(params, sums, xb, yb):
        logits = net.apply(params, xb)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, yb)
        correct = jnp.sum(jnp.argmax(logits, -1) == yb).astype(jnp.float32)
        return sums + jnp.stack([losses.sum(), correct])

    return eval_batch, jax.jit(net.apply)


def hand_accuracy(net: hk.Transformed, params, x, y, batch_size: int = 1024) -> float:
    eval_batch, _ = make_apply(net)
    sums = jnp.zeros(2)
    for i in range(0, len(x), batch_size):
        sums = eval_batch(params, sums, x[i : i + batch_size], y[i : i + batch_size])
    return float(sums[1]) / len(x)


def now() -> tuple[float, float]:
    """Wall-clock and process CPU seconds."""
    return time.perf_counter(), time.process_time()


class Run(NamedTuple):
    ends: list  # now() at the start, then at the end of each epoch
    accuracy: float


def run_hkfit(
    data: Data, batch_size: int, epochs: int, seed: int, precision: str = "float32"
) -> Run:
    class Clock(hkfit.Callback):
        def on_epoch_end(self, epoch, logs=None):
            ends.append(now())

    ends = [now()]
    model = hkfit.Model(
        forward,
        loss="sparse_categorical_crossentropy",
        optimizer=optax.adam(LEARNING_RATE),
        metrics=["accuracy"],
        precision=precision,
        seed=seed,
    )
    model.fit(data.x, data.y, batch_size=batch_size, epochs=epochs, verbose=0, callbacks=[Clock()])
    accuracy = model.evaluate(data.x_test, data.y_test, batch_size=1024, verbose=0)["accuracy"]
    return Run(ends, accuracy)


def run_jit_loop(data: Data, batch_size: int, epochs: int, seed: int) -> Run:
    ends = [now()]
    net, opt = haiku_net(), optax.adam(LEARNING_RATE)
    params = net.init(jax.random.key(seed), data.x[:1])
    opt_state = opt.init(params)
    step = jax.jit(make_step(net, opt), donate_argnums=(0, 1, 2))
    rng = np.random.default_rng(seed)
    x, y, n = data.x, data.y, len(data.x)
    for _ in range(epochs):
        order = rng.permutation(n)
        sums = jnp.zeros(2)
        for i in range(0, n, batch_size):
            rows = order[i : i + batch_size]
            params, opt_state, sums = step(params, opt_state, sums, x[rows], y[rows])
        float(sums[0])  # the epoch's loss reaches the host, as any real loop would log it
        ends.append(now())
    return Run(ends, hand_accuracy(net, params, data.x_test, data.y_test))


def run_scan_epoch(data: Data, batch_size: int, epochs: int, seed: int) -> Run:
    ends = [now()]
    net, opt = haiku_net(), optax.adam(LEARNING_RATE)
    key = jax.random.key(seed)
    params = net.init(key, data.x[:1])
    opt_state = opt.init(params)
    step = make_step(net, opt)
    n = len(data.x)
    num_full, tail = divmod(n, batch_size)

    def epoch_fn(params, opt_state, epoch_key, x, y):
        order = jax.random.permutation(epoch_key, n)
        xs, ys = jnp.take(x, order, axis=0), jnp.take(y, order, axis=0)
        cut = num_full * batch_size
        batches = (
            xs[:cut].reshape(num_full, batch_size, *xs.shape[1:]),
            ys[:cut].reshape(num_full, batch_size),
        )
        carry, _ = jax.lax.scan(
            lambda c, b: (step(*c, *b), None), (params, opt_state, jnp.zeros(2)), batches
        )
        if tail:
            carry = step(*carry, xs[cut:], ys[cut:])
        return carry

    epoch_fn = jax.jit(epoch_fn, donate_argnums=(0, 1))
    x, y = jax.device_put(data.x), jax.device_put(data.y)
    for epoch in range(epochs):
        params, opt_state, sums = epoch_fn(params, opt_state, jax.random.fold_in(key, epoch), x, y)
        float(sums[0])
        ends.append(now())
    return Run(ends, hand_accuracy(net, params, data.x_test, data.y_test))


def run_keras(
    data: Data, batch_size: int, epochs: int, seed: int, steps_per_execution: int = 1
) -> Run:
    """Keras 3 on JAX; ``steps_per_execution=32`` fuses steps into an on-device loop."""
    keras = import_keras()

    class Clock(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            ends.append(now())

    ends = [now()]
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input(data.x.shape[1:]),
            *(keras.layers.Dense(h, activation="relu") for h in HIDDEN),
            keras.layers.Dense(CLASSES),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.Adam(LEARNING_RATE),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        steps_per_execution=steps_per_execution,
    )
    model.fit(data.x, data.y, batch_size=batch_size, epochs=epochs, verbose=0, callbacks=[Clock()])
    result = model.evaluate(data.x_test, data.y_test, batch_size=1024, verbose=0, return_dict=True)
    return Run(ends, float(result["accuracy"]))


RUNNERS = {
    "hkfit": run_hkfit,
    "jit loop": run_jit_loop,
    "scan epoch": run_scan_epoch,
    "keras": run_keras,
    "keras spe32": functools.partial(run_keras, steps_per_execution=32),
}


# --- Measurement -------------------------------------------------------------------------


class Sample(NamedTuple):
    """One run of one implementation."""

    samples_per_s: float  # steady state: n / median epoch time, first epoch excluded
    epoch_s: float  # that median epoch time
    samples_per_cpu_s: float  # n / median process CPU seconds per steady epoch
    first_epoch_s: float  # model building + setup + compilation + one epoch
    peak_rss: int  # VmHWM during the run
    rss_growth: int  # peak minus the RSS before the run
    accuracy: float


def measure_fit(
    impl: str, data: Data, batch_size: int, epochs: int, seed: int, **options
) -> Sample:
    with PeakRss() as rss:
        run = RUNNERS[impl](data, batch_size, epochs, seed, **options)
    times, cpu = np.diff(np.asarray(run.ends), axis=0).T
    steady = float(np.median(times[1:]))
    return Sample(
        len(data.x) / steady,
        steady,
        len(data.x) / float(np.median(cpu[1:])),
        float(times[0]),
        rss.peak,
        rss.growth,
        run.accuracy,
    )


def rotated(items: tuple, r: int) -> tuple:
    r %= len(items)
    return items[r:] + items[:r]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def bench_fit(configs, impls, repeats: int) -> dict:
    """``{config name: {impl: [Sample per repeat]}}``, implementations interleaved."""
    results = {}
    for name, data, batch_size, epochs in configs:
        results[name] = {impl: [] for impl in impls}
        for r in range(repeats):
            for impl in rotated(impls, r):
                s = measure_fit(impl, data, batch_size, epochs, seed=r)
                results[name][impl].append(s)
                log(
                    f"  {name:>16} r{r} {impl:>10}: {s.samples_per_s:9.0f} samples/s "
                    f"({s.samples_per_cpu_s:7.0f}/CPU-s), first "
                    f"epoch {s.first_epoch_s:6.2f} s, +{s.rss_growth / MB:4.0f} MB, "
                    f"acc {s.accuracy:.3f}"
                )
    return results


def bench_inference(data: Data, batch_size: int, repeats: int) -> dict:
    """hkfit evaluate/predict vs a hand-written jitted apply over the same batches.

    Both read the same numpy arrays and return host values (a metrics dict, a numpy
    array). Returns ``{name: {"first": s, "times": [s, ...]}}``; round 0 compiles.
    """
    model = hkfit.Model(
        forward,
        loss="sparse_categorical_crossentropy",
        optimizer=optax.adam(LEARNING_RATE),
        metrics=["accuracy"],
        seed=0,
    )
    model.init(data.x)
    params = model.params
    eval_batch, predict_batch = make_apply(haiku_net())
    x, y, n = data.x, data.y, len(data.x)

    def hand_evaluate():
        sums = jnp.zeros(2)
        for i in range(0, n, batch_size):
            sums = eval_batch(params, sums, x[i : i + batch_size], y[i : i + batch_size])
        sums = np.asarray(sums)
        return {"loss": sums[0] / n, "accuracy": sums[1] / n}

    def hand_predict():
        outs = [predict_batch(params, x[i : i + batch_size]) for i in range(0, n, batch_size)]
        return np.concatenate([np.asarray(o) for o in outs])

    fns = {
        "hkfit evaluate": lambda: model.evaluate(x, y, batch_size=batch_size, verbose=0),
        "hand evaluate": hand_evaluate,
        "hkfit predict": lambda: model.predict(x, batch_size=batch_size),
        "hand predict": hand_predict,
    }
    results = {k: {"first": None, "times": []} for k in fns}
    outputs = {}
    for r in range(repeats + 1):
        for k in rotated(tuple(fns), r):
            start = time.perf_counter()
            outputs[k] = fns[k]()
            seconds = time.perf_counter() - start
            if r == 0:
                results[k]["first"] = seconds
            else:
                results[k]["times"].append(seconds)
        log(
            f"  inference r{r}: "
            + ", ".join(
                f"{k} {(results[k]['times'] or [results[k]['first']])[-1]:.3f} s" for k in fns
            )
        )
    np.testing.assert_allclose(
        outputs["hkfit predict"], outputs["hand predict"], rtol=1e-4, atol=1e-4
    )
    np.testing.assert_allclose(
        outputs["hkfit evaluate"]["loss"], outputs["hand evaluate"]["loss"], rtol=1e-4
    )
    return results


def bench_precision(data: Data, batch_size: int, epochs: int, repeats: int) -> dict:
    """hkfit fit under each ``Model(precision=...)``, interleaved: ``{precision: [Sample]}``."""
    results: dict = {p: [] for p in PRECISIONS}
    for r in range(repeats):
        for precision in rotated(PRECISIONS, r):
            s = measure_fit("hkfit", data, batch_size, epochs, seed=r, precision=precision)
            results[precision].append(s)
            log(
                f"  precision {precision:>14} r{r}: {s.samples_per_s:9.0f} samples/s "
                f"({s.samples_per_cpu_s:7.0f}/CPU-s), first epoch {s.first_epoch_s:6.2f} s, "
                f"acc {s.accuracy:.3f}"
            )
    return results


def bench_scaling(data: Data, sizes, batch_size: int, epochs: int, repeats: int) -> dict:
    """hkfit steady epoch time at several dataset sizes (interleaved): ``{n: [s, ...]}``."""
    results = {n: [] for n in sizes}
    for r in range(repeats):
        for n in rotated(tuple(sizes), r):
            subset = Data(data.x[:n], data.y[:n], data.x_test, data.y_test, data.test_name)
            s = measure_fit("hkfit", subset, batch_size, epochs, seed=r)
            results[n].append(s.epoch_s)
            log(f"  scaling n={n:>6} r{r}: {s.epoch_s:.3f} s/epoch")
    return results


def probe(impl: str, n: int, batch_size: int, epochs: int) -> dict:
    """One implementation in THIS fresh process: cold first epoch and whole-process peak RSS."""
    data = synthetic(n, n // 6)
    if impl.startswith("keras"):
        import_keras()
    jnp.zeros(1).block_until_ready()
    trim()
    before = (status_kb("VmRSS") or 0) * 1024
    run = RUNNERS[impl](data, batch_size, epochs, seed=0)
    times = np.diff(np.asarray(run.ends)[:, 0])
    return {
        "first_epoch_s": float(times[0]),
        "epoch_s": float(np.median(times[1:])),
        "rss_before": before,
        "peak_rss": (status_kb("VmHWM") or 0) * 1024,
        "accuracy": run.accuracy,
    }


def bench_cold(impls, n: int, batch_size: int, epochs: int, rounds: int) -> dict:
    """Runs :func:`probe` in a fresh subprocess per implementation: ``{impl: [dict, ...]}``."""
    results = {impl: [] for impl in impls}
    for r in range(rounds):
        for impl in rotated(impls, r):
            cmd = [
                sys.executable,
                os.path.abspath(__file__),
                "--probe",
                impl,
                "--probe-n",
                str(n),
                "--probe-batch",
                str(batch_size),
                "--probe-epochs",
                str(epochs),
            ]
            out = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if out.returncode != 0:
                raise RuntimeError(f"probe {impl} failed:\n{out.stderr[-3000:]}")
            result = json.loads(out.stdout.strip().splitlines()[-1])
            results[impl].append(result)
            log(
                f"  cold r{r} {impl:>10}: first epoch {result['first_epoch_s']:.2f} s, "
                f"peak RSS {result['peak_rss'] / MB:.0f} MB"
            )
    return results


# --- Report ------------------------------------------------------------------------------


def machine() -> str:
    model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            found = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M)
        model = found.group(1).strip() if found else model
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{model}, {cores} cores available to this process ({os.cpu_count()} logical)"


def load_average() -> str:
    return ", ".join(f"{v:.1f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"


def versions() -> str:
    import haiku
    import jaxlib

    keras = import_keras()
    parts = [
        f"python {platform.python_version()}",
        f"jax {jax.__version__}",
        f"jaxlib {jaxlib.__version__}",
        f"dm-haiku {haiku.__version__}",
        f"optax {optax.__version__}",
        f"hkfit {hkfit.__version__}",
        f"numpy {np.__version__}",
        f"keras {keras.__version__} (JAX backend)" if keras else "keras not available",
    ]
    return ", ".join(parts)


def med(values) -> float:
    return float(statistics.median(values))


_NOISY_ROWS: list = []  # names of the rows flagged noisy, for the targets' footnote


def noisy(values, row: str | None = None) -> bool:
    """Whether repeats spread more than ``NOISY`` of their median (recorded by ``row``)."""
    flagged = len(values) > 1 and (max(values) - min(values)) > NOISY * med(values)
    if flagged and row:
        _NOISY_ROWS.append(row)
    return flagged


def spread(values, fmt: str = "{:,.0f}", row: str | None = None) -> str:
    """`` [min–max]`` of several values (flagged when noisy), nothing for one."""
    if len(values) < 2:
        return ""
    flag = " noisy" if noisy(values, row) else ""
    return f" [{fmt.format(min(values))}–{fmt.format(max(values))}{flag}]"


def status(ok: bool | None) -> str:
    return "n/a" if ok is None else ("met" if ok else "**NOT met**")


def fit_section(configs, fit, targets: list) -> list:
    lines = [
        "## fit",
        "",
        "| config | implementation | samples/s | vs scan epoch | samples/CPU-s (vs scan) | "
        "first epoch (s) | overhead (s) | RSS growth (MB) | accuracy |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, data, batch_size, _ in configs:
        rows = fit[name]
        scan = med([s.samples_per_s for s in rows["scan epoch"]])
        scan_cpu = med([s.samples_per_cpu_s for s in rows["scan epoch"]])
        stat = {}
        for impl, samples in rows.items():
            sps = med([s.samples_per_s for s in samples])
            overhead = med([s.first_epoch_s - s.epoch_s for s in samples])
            cpu = med([s.samples_per_cpu_s for s in samples])
            stat[impl] = (sps, overhead)
            lines.append(
                f"| {name} | {impl} | "
                f"{sps:,.0f}{spread([s.samples_per_s for s in samples], row=f'{name} {impl}')} | "
                f"{sps / scan:.2f}x | {cpu:,.0f} ({cpu / scan_cpu:.2f}x) | "
                f"{med([s.first_epoch_s for s in samples]):.2f} | "
                f"{overhead:.2f} | {med([s.rss_growth for s in samples]) / MB:.0f} | "
                f"{med([s.accuracy for s in samples]):.3f} ({data.test_name}) |"
            )
        hk_sps, hk_over = stat["hkfit"]
        if batch_size >= 1024:
            worst = min(stat["jit loop"][0], stat["scan epoch"][0])
            targets.append(
                (
                    f"{name}: fit within 5% of the hand-written loops",
                    f"{hk_sps / stat['jit loop'][0]:.2f}x jit loop, "
                    f"{hk_sps / scan:.2f}x scan epoch",
                    hk_sps >= 0.95 * worst,
                )
            )
        else:
            targets.append(
                (f"{name}: fit >= 0.95x scan epoch", f"{hk_sps / scan:.2f}x", hk_sps >= 0.95 * scan)
            )
        if "keras" in stat:
            targets.append(
                (
                    f"{name}: first-epoch overhead (warm process) <= Keras",
                    f"{hk_over:.2f} s vs {stat['keras'][1]:.2f} s",
                    hk_over <= stat["keras"][1],
                )
            )
    return lines


def inference_section(inference, targets: list) -> list:
    batch_size, n, res = inference["batch_size"], inference["n"], inference["results"]
    lines = [
        f"## evaluate / predict ({n:,} rows, batch {batch_size})",
        "",
        "| call | samples/s | vs hand-written | first call (s) |",
        "|---|---:|---:|---:|",
    ]
    for kind in ("evaluate", "predict"):
        hk_t, hand_t = med(res[f"hkfit {kind}"]["times"]), med(res[f"hand {kind}"]["times"])
        for who, t in ((f"hkfit {kind}", hk_t), (f"hand {kind}", hand_t)):
            rates = [n / v for v in res[who]["times"]]
            lines.append(
                f"| {who} | {n / t:,.0f}{spread(rates, row=who)} | {hand_t / t:.2f}x | "
                f"{res[who]['first']:.2f} |"
            )
        targets.append(
            (
                f"{kind} >= 0.95x hand-written jitted apply",
                f"{hand_t / hk_t:.2f}x",
                hk_t <= hand_t / 0.95,
            )
        )
    return lines


def precision_section(precision) -> list:
    res, n, batch_size = precision["results"], precision["n"], precision["batch_size"]
    base = med([s.samples_per_s for s in res["float32"]])
    base_cpu = med([s.samples_per_cpu_s for s in res["float32"]])
    lines = [
        f"## mixed precision (hkfit fit, synthetic {n:,} rows, batch {batch_size})",
        "",
        f"`Model(precision=...)` on this machine ({jax.default_backend()}). "
        + (
            "No bfloat16-capable accelerator was available for this run. XLA's CPU "
            "backend computes the half types by converting to float32 and back (a bfloat16 "
            "matmul compiles to converts around a float32 dot), so on a CPU the mixed "
            "policies run correctly but slower; tensor-core GPUs and TPUs are where they "
            "pay off."
            if jax.default_backend() == "cpu"
            else ""
        ),
        "",
        "| precision | samples/s | vs float32 | samples/CPU-s (vs float32) | first epoch (s) | "
        "accuracy |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, samples in res.items():
        sps = med([s.samples_per_s for s in samples])
        cpu = med([s.samples_per_cpu_s for s in samples])
        lines.append(
            f"| {name} | {sps:,.0f}{spread([s.samples_per_s for s in samples])} | "
            f"{sps / base:.2f}x | {cpu:,.0f} ({cpu / base_cpu:.2f}x) | "
            f"{med([s.first_epoch_s for s in samples]):.2f} | "
            f"{med([s.accuracy for s in samples]):.3f} (held-out) |"
        )
    return lines


def scaling_section(scaling, targets: list) -> list:
    results = scaling["results"]
    sizes = sorted(results)
    per_sample = {n: med(results[n]) / n for n in sizes}
    largest = per_sample[sizes[-1]]
    lines = [
        f"## scaling (hkfit fit, batch {scaling['batch_size']})",
        "",
        "| samples | s/epoch | µs/sample | vs largest |",
        "|---:|---:|---:|---:|",
    ]
    for n in sizes:
        lines.append(
            f"| {n:,} | {med(results[n]):.3f}{spread(results[n], '{:.3f}')} | "
            f"{per_sample[n] * 1e6:.2f} | {per_sample[n] / largest:.2f}x |"
        )
    ratios = [per_sample[n] / largest for n in sizes]
    targets.append(
        (
            "linear scaling: time per sample within ±15% across sizes",
            f"{min(ratios):.2f}x–{max(ratios):.2f}x of the largest",
            max(ratios) <= 1.15 and min(ratios) >= 0.85,
        )
    )
    return lines


def cold_section(cold, targets: list) -> list:
    res, n, batch_size = cold["results"], cold["n"], cold["batch_size"]
    lines = [
        f"## cold start (fresh process per run; synthetic {n:,} rows, batch {batch_size})",
        "",
        "| implementation | first epoch (s) | overhead (s) | RSS before fit (MB) | "
        "peak RSS (MB) | peak vs jit loop |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    stat = {}
    for impl, runs in res.items():
        over = med([r["first_epoch_s"] - r["epoch_s"] for r in runs])
        peak = med([r["peak_rss"] for r in runs])
        stat[impl] = (over, peak)
    for impl, runs in res.items():
        over, peak = stat[impl]
        lines.append(
            f"| {impl} | {med([r['first_epoch_s'] for r in runs]):.2f} | {over:.2f} | "
            f"{med([r['rss_before'] for r in runs]) / MB:.0f} | {peak / MB:.0f} | "
            f"{peak / stat['jit loop'][1]:.2f}x |"
        )
    if "keras" in stat:
        targets.append(
            (
                "first-epoch overhead in a fresh process <= Keras",
                f"{stat['hkfit'][0]:.2f} s vs {stat['keras'][0]:.2f} s",
                stat["hkfit"][0] <= stat["keras"][0],
            )
        )
    else:
        targets.append(("first-epoch overhead <= Keras", "Keras not measured", None))
    targets.append(
        (
            "peak RSS (fresh process) <= 1.1x jit loop",
            f"{stat['hkfit'][1] / stat['jit loop'][1]:.2f}x "
            f"({stat['hkfit'][1] / MB:.0f} vs {stat['jit loop'][1] / MB:.0f} MB)",
            stat["hkfit"][1] <= 1.1 * stat["jit loop"][1],
        )
    )
    return lines


def report(
    args, sizes, fit, inference, scaling, cold, started, elapsed, loads, precision=None
) -> str:
    configs = sizes["configs"]
    keras = import_keras()
    lines = [
        "# hkfit throughput benchmark",
        "",
        f"`python benchmarks/fit_throughput.py{' --quick' if args.quick else ''} --repeats "
        f"{args.repeats}` on {started:%Y-%m-%d %H:%M}, {elapsed / 60:.1f} min.",
        "",
        f"- Machine: {machine()}; CPU only (`JAX_PLATFORMS={os.environ.get('JAX_PLATFORMS')}`). "
        f"Load average (1, 5, 15 min) at start {loads[0]}, at end {loads[1]}: the cores are "
        "shared, so absolute numbers are noisy; compare within a row group.",
        f"- Versions: {versions()}.",
        f"- Model: MLP in-{'-'.join(map(str, HIDDEN))}-{CLASSES} (relu), Adam {LEARNING_RATE:g}, "
        "softmax cross-entropy from logits, accuracy tracked during training.",
        f"- fit: {args.repeats} interleaved repeats per configuration (order rotated each "
        "repeat); every run builds a fresh model, so it traces and compiles its step again; one "
        "excluded warm-up run per implementation first pays process-wide one-time costs. "
        "samples/s = rows / median epoch time with the first epoch excluded; median over "
        "repeats [min–max]. First epoch = from building the model to the end of epoch 1; "
        "overhead = first epoch − steady epoch. samples/CPU-s divides by the process CPU "
        "time of the steady epochs instead: less sensitive to other processes on shared "
        "cores (it counts every thread's work). Accuracy is measured after the last epoch.",
        f"- RSS growth (fit table): {PeakRss.method}, after `gc.collect()` + `malloc_trim(0)`, "
        "minus the RSS before the run: extra memory the run needed on top of the numpy "
        "dataset (includes XLA compilation). Peak RSS (cold start): VmHWM of a fresh "
        "process that generates the data and runs one implementation.",
        f"- A spread marked *noisy* means the repeats differ by more than {NOISY:.0%} of "
        "their median: the machine was busy, and that row's wall-clock ratios are not "
        "reliable (the samples/CPU-s ratio holds up better). `keras` is Keras 3's "
        "default (one step per call); `keras spe32` fuses 32 steps per call "
        "(`steps_per_execution=32`), Keras's own on-device loop.",
    ]
    if keras is None:
        lines.append(
            f"- Keras 3 skipped: `import keras` failed ({_KERAS['error']}). It is not an "
            "hkfit dependency; `pip install keras` to include it."
        )
    targets: list = []
    if configs:
        lines += [""] + fit_section(configs, fit, targets)
    if precision:
        lines += [""] + precision_section(precision)
    for section, value in (
        (inference_section, inference),
        (scaling_section, scaling),
        (cold_section, cold),
    ):
        if value:
            lines += [""] + section(value, targets)
    lines += ["", "## Targets", "", "| target | measured | status |", "|---|---|---|"]
    lines += [f"| {what} | {value} | {status(ok)} |" for what, value, ok in targets]
    if _NOISY_ROWS:
        lines += [
            "",
            f"{len(set(_NOISY_ROWS))} rows were noisy (see their spread): "
            + ", ".join(sorted(set(_NOISY_ROWS)))
            + ". Rerun on a quieter machine before trusting a miss or a win that rests on "
            "one of them.",
        ]
    judged = [ok for _, _, ok in targets if ok is not None]
    lines += ["", f"{sum(judged)} of {len(judged)} judged targets met."]
    if args.quick:
        lines += [
            "",
            "This was a `--quick` smoke run (small data, one repeat, fewer "
            "configurations): it checks that everything runs; its numbers are not "
            "measurements.",
        ]
    return "\n".join(lines) + "\n"


# --- Main --------------------------------------------------------------------------------


def plan(quick: bool) -> dict:
    """Sizes and epoch counts. The full plan takes about 6 minutes on 2 shared cores."""
    if quick:
        # Compilation dominates a smoke run: fewer configurations, not just smaller data.
        return {
            "n": 2_000,
            "n_test": 500,
            "epochs": 2,
            "digits_epochs": 3,
            "b1024_epochs": 2,
            "parts": {"digits", "b128", "precision", "inference", "scaling", "cold"},
            "scaling": [1_000, 2_000],
            "scaling_epochs": 2,
            "cold_n": 2_000,
            "cold_impls": ("hkfit", "jit loop"),
            "warm_up": False,
        }
    return {
        "n": 60_000,
        "n_test": 10_000,
        "epochs": 3,
        "digits_epochs": 30,
        "b1024_epochs": 5,
        "parts": {"digits", "b32", "b128", "b1024", "precision", "inference", "scaling", "cold"},
        "scaling": [15_000, 30_000, 60_000],
        "scaling_epochs": 3,
        "cold_n": 60_000,
        "cold_impls": ("hkfit", "jit loop", "scan epoch", "keras"),
        "warm_up": True,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small sizes and one repeat: a smoke check, not a measurement",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="interleaved repeats per configuration (default 3; 1 with --quick)",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="where to write the markdown report (default: benchmarks/RESULTS.md; "
        "a --quick run only prints it unless --out is given)",
    )
    parser.add_argument(
        "--only",
        default=None,
        help="comma-separated parts: digits,b32,b128,b1024,precision,inference,scaling,cold",
    )
    parser.add_argument(
        "--no-keras-spe32",
        dest="keras_spe32",
        action="store_false",
        help="leave out the Keras row with steps_per_execution=32",
    )
    parser.add_argument("--probe", choices=IMPLS, help=argparse.SUPPRESS)
    parser.add_argument("--probe-n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--probe-batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--probe-epochs", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.probe:
        print(json.dumps(probe(args.probe, args.probe_n, args.probe_batch, args.probe_epochs)))
        return 0
    args.repeats = args.repeats or (1 if args.quick else 3)
    if args.repeats < 1:
        parser.error(f"Expected --repeats >= 1. Received: {args.repeats}.")
    sizes = plan(args.quick)
    wanted = set(args.only.split(",")) if args.only else sizes["parts"]
    keep = lambda part: part in wanted

    started, clock, loads = datetime.datetime.now(), time.perf_counter(), [load_average()]
    synth, small = synthetic(sizes["n"], sizes["n_test"]), digits()
    configs = [
        ("digits b128", small, 128, sizes["digits_epochs"], "digits"),
        ("synthetic b32", synth, 32, sizes["epochs"], "b32"),
        ("synthetic b128", synth, 128, sizes["epochs"], "b128"),
        ("synthetic b1024", synth, 1024, sizes["b1024_epochs"], "b1024"),
    ]
    sizes["configs"] = [c[:4] for c in configs if keep(c[4])]
    keras = import_keras()
    impls = IMPLS if keras is not None else IMPLS[:3]
    if not args.keras_spe32:
        impls = tuple(i for i in impls if i != "keras spe32")
    log(f"{versions()}\n{machine()}, load average {loads[0]}")
    if keras is None:
        log(f"keras skipped: {_KERAS['error']}")

    jnp.zeros(1).block_until_ready()
    if sizes["warm_up"]:
        log("  warm-up (not reported)")
        tiny = synthetic(256, 64)
        for impl in impls:
            measure_fit(impl, tiny, 32, 2, seed=0)
    fit = bench_fit(sizes["configs"], impls, args.repeats)
    inference = scaling = cold = precision = None
    if keep("precision"):
        precision = {
            "n": sizes["n"],
            "batch_size": 128,
            "results": bench_precision(synth, 128, sizes["epochs"], args.repeats),
        }
    if keep("inference"):
        inference = {
            "batch_size": 1024,
            "n": sizes["n"],
            "results": bench_inference(synth, 1024, args.repeats),
        }
    if keep("scaling"):
        scaling = {
            "batch_size": 128,
            "results": bench_scaling(
                synth, sizes["scaling"], 128, sizes["scaling_epochs"], args.repeats
            ),
        }
    if keep("cold"):
        cold_impls = tuple(i for i in impls if i in sizes["cold_impls"])
        cold = {
            "n": sizes["cold_n"],
            "batch_size": 128,
            "results": bench_cold(cold_impls, sizes["cold_n"], 128, 2, rounds=1),
        }
    loads.append(load_average())
    text = report(
        args,
        sizes,
        fit,
        inference,
        scaling,
        cold,
        started,
        time.perf_counter() - clock,
        loads,
        precision,
    )
    write_report(text, args, "RESULTS.md")
    return 0


def write_report(text: str, args: argparse.Namespace, default_name: str) -> None:
    """Prints ``text`` and writes it to ``--out``, or to ``default_name`` here unless
    ``--quick``."""
    out = args.out or (
        None if args.quick else os.path.join(os.path.dirname(__file__), default_name)
    )
    if out:
        with open(out, "w") as f:
            f.write(text)
    print(text)
    if out:
        log(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
