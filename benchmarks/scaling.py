"""Per-device memory and per-step communication of ``hkfit.DataParallel`` on 1-8 devices.

One model (MLP 784-1024-1024-10, relu, Adam 1e-3, sparse softmax cross-entropy, accuracy
tracked) and one synthetic dataset (16,384 rows x 784 float32) are trained for a few steps
under each configuration: the data placements (``data_placement="sharded"`` and
``"replicated"`` where ``DataParallel`` takes that argument; only the current behaviour,
labelled "replicated", where it does not) crossed with the parameter shardings
(replicated, ``param_sharding="fsdp"``), each on 1, 2, 4 and 8 devices.

For each run it reports, per device: the bytes of the training arrays as ``fit`` placed
them, of the parameters and of the optimizer state; and the bytes that the collectives of
ONE compiled training step move, read from the step's optimized HLO. Nothing is timed on
a CPU, whose virtual devices share the same cores; on an accelerator the script also
reports the samples/s of a short fit per device count.

All device counts run in ONE process: the CPU is split into 8 virtual devices before JAX
is imported, and a run on ``k`` devices uses ``DataParallel(devices=jax.devices()[:k])``,
whose mesh and compiled programs are those of a process with ``k`` devices.

Usage::

    python benchmarks/scaling.py [--quick] [--devices 1,2,4,8] [--out benchmarks/RESULTS-scaling.md]
    python benchmarks/scaling.py --gpu   # let JAX pick an accelerator (also measures samples/s)
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import gc
import inspect
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Iterator
from typing import Any, NamedTuple

if __name__ == "__main__" and "--gpu" in sys.argv[1:]:
    os.environ.setdefault("JAX_PLATFORMS", "")  # empty: JAX picks the best platform
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()

import haiku as hk
import jax
import numpy as np
import optax
from fit_throughput import (
    CLASSES,
    LEARNING_RATE,
    load_average,
    log,
    machine,
    synthetic,
    write_report,
)

import hkfit
from hkfit._program import Program
from hkfit.step import Batch

HIDDEN = (1024, 1024)
ROWS, DIM, BATCH_SIZE, STEPS = 16_384, 784, 2048, 2
DEVICE_COUNTS = (1, 2, 4, 8)
#: Global batch sizes of the FSDP sweep (on the largest device count).
SWEEP_BATCHES = (256, 512, 1024, 2048)
#: The collective kinds reported, in table order. XLA:CPU has no reduce-scatter of its
#: own: it writes one as an all-reduce followed by a dynamic-slice.
KINDS = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
_OTHER_KINDS = ("ragged-all-to-all", "collective-broadcast")
MIB = 1024 * 1024


def forward(x):
    return hk.nets.MLP([*HIDDEN, CLASSES])(x)


# --- Configurations ----------------------------------------------------------------------


def data_placements() -> tuple[str | None, ...]:
    """``("sharded", "replicated")`` where ``DataParallel`` takes ``data_placement``, else
    ``(None,)``: the current behaviour, which copies every row to every device."""
    try:
        parameters = inspect.signature(hkfit.DataParallel).parameters
    except (TypeError, ValueError):
        return (None,)
    if "data_placement" not in parameters:
        return (None,)
    return ("sharded", "replicated")


def default_placement() -> str | None:
    """``DataParallel``'s default ``data_placement`` (None where there is no argument)."""
    parameter = inspect.signature(hkfit.DataParallel).parameters.get("data_placement")
    if parameter is None or parameter.default is inspect.Parameter.empty:
        return None
    return parameter.default


class Config(NamedTuple):
    placement: str | None  # data_placement, None where DataParallel has no such argument
    param_sharding: str | None  # None (replicated) or "fsdp"

    @property
    def title(self) -> str:
        args = []
        if self.placement is not None:
            args.append(f'data_placement="{self.placement}"')
        if self.param_sharding is not None:
            args.append(f'param_sharding="{self.param_sharding}"')
        call = f"DataParallel({', '.join(args)})"
        data = "data replicated" if self.placement is None else f"data {self.placement}"
        params = "parameters split (FSDP)" if self.param_sharding else "parameters replicated"
        current = " (current behaviour)" if self.placement is None else ""
        return f"`{call}`: {data}{current}, {params}"


def configs() -> list[Config]:
    return [Config(p, s) for p in data_placements() for s in (None, "fsdp")]


def make_layout(num_devices: int, config: Config) -> hkfit.DataParallel:
    """``DataParallel`` over the first ``num_devices`` devices.

    Raises:
      ValueError: if there are fewer devices.
    """
    if num_devices > jax.device_count():
        raise ValueError(f"Expected at most {jax.device_count()} devices. Received: {num_devices}.")
    kwargs: dict[str, Any] = {"param_sharding": config.param_sharding}
    if config.placement is not None:
        kwargs["data_placement"] = config.placement
    return hkfit.DataParallel(devices=jax.devices()[:num_devices], **kwargs)


def make_model(layout: hkfit.DataParallel, seed: int = 0) -> hkfit.Model:
    return hkfit.Model(
        forward,
        loss="sparse_categorical_crossentropy",
        optimizer=optax.adam(LEARNING_RATE),
        metrics=["accuracy"],
        seed=seed,
        distribution=layout,
    )


# --- Bytes per device --------------------------------------------------------------------


def per_device_bytes(tree: Any) -> int:
    """The largest, over devices, of the bytes that the arrays of ``tree`` keep on one
    device (each leaf's ``addressable_shards``; host values count on no device)."""
    totals: collections.Counter = collections.Counter()
    for leaf in jax.tree_util.tree_leaves(tree):
        if isinstance(leaf, jax.Array):
            for shard in leaf.addressable_shards:
                totals[shard.device] += shard.data.nbytes
    return max(totals.values(), default=0)


def total_bytes(tree: Any) -> int:
    return sum(int(np.asarray(leaf).nbytes) for leaf in jax.tree_util.tree_leaves(tree))


def host_batch(x: np.ndarray, y: np.ndarray) -> Batch:
    """The training arrays ``fit`` builds from ``x, y`` with no sample weights: the labels
    as int32, and a float32 weight and metric mask of 1 per row."""
    ones = np.ones(len(x), np.float32)
    return Batch(x, np.asarray(y, np.int32), ones, ones.copy())


class TrainCall(NamedTuple):
    """One call of a compiled training function that ``fit`` made."""

    fn: Any  # the jitted function
    fused: bool | None  # whether it runs a loop of steps (None: unknown)
    args: tuple  # its arguments, arrays replaced by ShapeDtypeStructs with their shardings
    data_bytes: int | None  # per device, of the `Batch` argument (the training arrays)


def _abstract(tree: Any) -> Any:
    def leaf(a):
        if isinstance(a, jax.Array):
            sharding, weak = a.sharding, getattr(a, "weak_type", False)
            if not weak:  # JAX < 0.4.31's ShapeDtypeStruct has no weak_type argument
                return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding)
            return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding, weak_type=weak)
        return a

    return jax.tree_util.tree_map(leaf, tree)


@contextlib.contextmanager
def recorded_train_calls() -> Iterator[list[TrainCall]]:
    """Records the calls ``fit`` makes to its compiled training functions.

    ``Program.train_run`` builds the function that trains over device-resident arrays;
    ``fit`` calls it as ``(train_state, logs, data, idx, start, count)``. Recording the
    arguments as it passes them (shapes, dtypes and shardings only) gives the training
    arrays exactly as ``fit`` placed them, and lets the same step be lowered again
    whatever layout the data placement uses.
    """
    calls: list[TrainCall] = []
    original = Program.train_run

    def train_run(self, ts, fuse, *args, **kwargs):
        fn = original(self, ts, fuse, *args, **kwargs)

        def recorded(*call_args):
            data = next((a for a in call_args if isinstance(a, Batch)), None)
            calls.append(
                TrainCall(
                    fn,
                    bool(fuse),
                    _abstract(call_args),
                    None if data is None else per_device_bytes(data),
                )
            )
            return fn(*call_args)

        return recorded

    Program.train_run = train_run  # type: ignore[method-assign]
    try:
        yield calls
    finally:
        Program.train_run = original  # type: ignore[method-assign]


# --- Collectives in the compiled step ----------------------------------------------------

_ITEM_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2}
_ITEM_BYTES.update({"s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8})
_ITEM_BYTES.update({"c64": 8, "c128": 16})
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
#: ``%name = shape opcode(operands), attributes``; operands end at the ``)`` that is
#: followed by an attribute or the end of the line (layouts may hold parentheses).
_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT\s+)?%?(?P<name>[^\s=]+)\s*=\s*(?P<result>.*?)\s(?P<op>[a-z][a-z0-9-]*)"
    r"\((?P<operands>.*?)\)(?:,\s*[A-Za-z_]+=|\s*$)"
)
_OPERAND_NAME = re.compile(r"%([^\s,()]+)")
_COLLECTIVE_OP = re.compile(
    r"^(?P<kind>" + "|".join(KINDS + _OTHER_KINDS) + r")(?P<phase>-start|-done)?$"
)


def _arrays(text: str) -> list[tuple[int, int]]:
    """``(bytes, rank)`` of every array shape written in ``text`` (``f32[784,1024]{1,0}``)."""
    out = []
    for dtype, dims in _ARRAY.findall(text):
        if dtype.startswith(("f8", "f4")):
            size = 1
        elif dtype in _ITEM_BYTES:
            size = _ITEM_BYTES[dtype]
        else:
            raise ValueError(f"Unknown HLO element type {dtype!r} in: {text}")
        sizes = [int(d) for d in dims.split(",") if d]
        out.append((size * int(np.prod(sizes, dtype=np.int64)), len(sizes)))
    return out


def _shape(text: str) -> str:
    """A result shape without layouts and comments: ``(f32[256,1024], f32[])``."""
    text = re.sub(r"/\*.*?\*/", "", text)
    return re.sub(r"\{[^{}]*\}", "", text).strip()


class Collectives(NamedTuple):
    """Collective ops of a compiled program.

    Attributes:
      kinds: ``{kind: (ops, bytes)}`` for every kind in ``KINDS`` (and any other seen).
      ops: ``(kind, result shape, bytes)`` of each op, in program order.
      has_loop: the program holds a while loop (its ops may run more than once).
    """

    kinds: dict[str, tuple[int, int]]
    ops: list[tuple[str, str, int]]
    has_loop: bool

    @property
    def total(self) -> int:
        return sum(nbytes for _, nbytes in self.kinds.values())


def collective_bytes(hlo_text: str) -> Collectives:
    """The collective ops of an optimized (SPMD-partitioned) HLO module and their bytes.

    Each op counts the size of the full buffer it works on, per device: the larger of its
    operands' and its result's sizes. That is the operand of an all-reduce (equal to its
    result), the result of an all-gather (the gathered array), the operand of a
    reduce-scatter (the array before it is scattered), and operand = result for
    collective-permute and all-to-all. Operand sizes come from the shapes written inline
    or, as compiled modules print them, from the instructions that the operands name. A
    tuple-shaped op (several arrays combined into one collective) counts all its arrays.
    An asynchronous pair counts once, at its ``*-start``: the larger of its operands and
    the output part of its result (which also repeats the operands, and scalar context
    values); ``*-done`` is skipped.

    Every op counts once: for the loop-free one-step program, once per step. ``has_loop``
    says when the program holds a ``while`` loop, whose ops run once per iteration.
    """
    shapes: dict[str, str] = {}  # instruction name -> result shape (names are unique)
    kinds: dict[str, list[int]] = {kind: [0, 0] for kind in KINDS}
    ops: list[tuple[str, str, int]] = []
    for line in hlo_text.splitlines():
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        shapes[match.group("name")] = match.group("result")
        collective = _COLLECTIVE_OP.match(match.group("op"))
        if not collective or collective.group("phase") == "-done":
            continue
        operand_text = match.group("operands")
        if not _ARRAY.search(operand_text):  # operands by name only: look their shapes up
            operand_text = " ".join(shapes.get(n, "") for n in _OPERAND_NAME.findall(operand_text))
        operands = sum(b for b, _ in _arrays(operand_text))
        result_arrays = _arrays(match.group("result"))
        result = sum(b for b, _ in result_arrays)
        if collective.group("phase") == "-start":
            output = sum(b for b, rank in result_arrays if rank > 0) - operands
            result = output if output > 0 else result
        kind, nbytes = collective.group("kind"), max(operands, result)
        entry = kinds.setdefault(kind, [0, 0])
        entry[0] += 1
        entry[1] += nbytes
        ops.append((kind, _shape(match.group("result")), nbytes))
    has_loop = any(op == "while" for op in _opcodes(hlo_text))
    return Collectives({k: (n, b) for k, (n, b) in kinds.items()}, ops, has_loop)


def _opcodes(hlo_text: str) -> Iterator[str]:
    for line in hlo_text.splitlines():
        match = _INSTRUCTION.match(line)
        if match:
            yield match.group("op")


# --- One configuration on k devices ------------------------------------------------------


class Measurement(NamedTuple):
    devices: int
    data_bytes: int | None  # per device, the training arrays as fit placed them
    param_bytes: int  # per device, model.params after the fit
    opt_bytes: int  # per device, model.opt_state after the fit
    collectives: Collectives  # of one training step
    fused_step: bool | None  # whether the measured program was a fused loop
    samples_per_s: float | None  # short fit on an accelerator; None on CPU


def measure(
    num_devices: int,
    config: Config,
    x: np.ndarray,
    y: np.ndarray,
    *,
    batch_size: int = BATCH_SIZE,
    steps: int = STEPS,
    hlo_out: str | None = None,
) -> Measurement:
    """Trains ``steps`` steps with ``steps_per_execution=1`` and reads bytes and collectives.

    With one step per execution ``fit`` runs its loop-free one-step program, so each
    collective of that program runs once per step. ``hlo_out``: also write its HLO there.
    """
    model = make_model(make_layout(num_devices, config))
    with recorded_train_calls() as calls:
        model.fit(
            x,
            y,
            batch_size=batch_size,
            epochs=1,
            steps_per_epoch=steps,
            steps_per_execution=1,
            verbose=0,
        )
    if not calls:
        raise RuntimeError(
            "fit made no call to Program.train_run, the training function over "
            "device-resident arrays, so there is no step to measure."
        )
    call = next((c for c in calls if c.fused is False), calls[0])
    text = call.fn.lower(*call.args).compile().as_text()
    if hlo_out:
        with open(hlo_out, "w") as f:
            f.write(text)
    result = Measurement(
        num_devices,
        call.data_bytes,
        per_device_bytes(model.params),
        per_device_bytes(model.opt_state),
        collective_bytes(text),
        call.fused,
        None,
    )
    del model, calls, call
    gc.collect()
    return result


def measures_speed() -> bool:
    """Whether samples/s are measured: on an accelerator, not on the CPU."""
    return jax.devices()[0].platform != "cpu"


def throughput(
    num_devices: int,
    config: Config,
    x: np.ndarray,
    y: np.ndarray,
    *,
    batch_size: int = BATCH_SIZE,
    epochs: int = 3,
) -> float | None:
    """Samples/s of ``fit`` (default pacing): rows / median epoch time, the first epoch
    excluded. None on a CPU, whose virtual devices share the same cores."""
    if not measures_speed():
        return None
    ends: list[float] = []

    class Clock(hkfit.Callback):
        def on_epoch_end(self, epoch, logs=None):
            ends.append(time.perf_counter())

    model = make_model(make_layout(num_devices, config))
    ends.append(time.perf_counter())
    model.fit(x, y, batch_size=batch_size, epochs=epochs, verbose=0, callbacks=[Clock()])
    steady = statistics.median(np.diff(ends)[1:])
    del model
    gc.collect()
    return len(x) / steady


# --- Report ------------------------------------------------------------------------------


def _bytes(value: int | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:,}" if value < MIB else f"{value:,} ({value / MIB:.2f} MiB)"


def _collective_cell(ops: int, nbytes: int) -> str:
    return "–" if ops == 0 else f"{nbytes:,} ({ops} op{'s' if ops != 1 else ''})"


def table(results: list[Measurement]) -> list[str]:
    lines = [
        "| devices | data B/device | params B/device | optimizer B/device | collective B/step | "
        + " | ".join(KINDS)
        + " | samples/s |",
        "|---:|---:|---:|---:|---:|" + "---:|" * len(KINDS) + "---:|",
    ]
    for m in results:
        extra = [k for k in m.collectives.kinds if k not in KINDS and m.collectives.kinds[k][0]]
        total = f"{m.collectives.total:,}"
        if extra:
            total += " (incl. " + ", ".join(extra) + ")"
        rate = "not measured on CPU" if m.samples_per_s is None else f"{m.samples_per_s:,.0f}"
        lines.append(
            f"| {m.devices} | {_bytes(m.data_bytes)} | {_bytes(m.param_bytes)} | "
            f"{_bytes(m.opt_bytes)} | {total} | "
            + " | ".join(_collective_cell(*m.collectives.kinds[k]) for k in KINDS)
            + f" | {rate} |"
        )
    return lines


def versions() -> str:
    import jaxlib

    return ", ".join(
        [
            f"python {platform.python_version()}",
            f"jax {jax.__version__}",
            f"jaxlib {jaxlib.__version__}",
            f"dm-haiku {hk.__version__}",
            f"optax {optax.__version__}",
            f"hkfit {hkfit.__version__}",
        ]
    )


def sweep_section(sweep: dict) -> list[str]:
    """The FSDP step's collectives at several global batch sizes (one device count)."""
    config, devices, rows = sweep["config"], sweep["devices"], sweep["results"]
    lines = [
        f"## FSDP: the plan XLA picks, by global batch size ({devices} devices)",
        "",
        f"{config.title}, one step at each global batch size. The parameter and "
        "optimizer bytes per device do not change with the batch; the collectives do, "
        "because XLA's SPMD partitioner picks its plan from the shapes (see *How to "
        "read*): compare the all-gather results with the weights (`f32[784,1024]`, "
        "`f32[1024,1024]`) and with the batch's activations (`f32[batch,784]`, "
        "`f32[batch,1024]`).",
        "",
        "| global batch | collective B/step | all-reduce | all-gather | all-gather results |",
        "|---:|---:|---:|---:|---|",
    ]
    for batch_size, m in rows.items():
        gathered = [shape for kind, shape, _ in m.collectives.ops if kind == "all-gather"]
        lines.append(
            f"| {batch_size:,} | {m.collectives.total:,} | "
            f"{_collective_cell(*m.collectives.kinds['all-reduce'])} | "
            f"{_collective_cell(*m.collectives.kinds['all-gather'])} | "
            + (", ".join(f"`{shape}`" for shape in gathered) or "–")
            + " |"
        )
    return lines


def report(
    args, results: dict, skipped: dict, sweep: dict | None, x, y, started, elapsed, loads
) -> str:
    device = jax.devices()[0]
    params = jax.eval_shape(
        hk.transform(forward).init, jax.random.key(0), jax.ShapeDtypeStruct((1, DIM), np.float32)
    )
    num_params = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params))
    placements = data_placements()
    default = default_placement()
    command = "python benchmarks/scaling.py" + " ".join(["", *args.argv]).rstrip()
    lines = [
        "# hkfit data-parallel scaling: memory and communication per device",
        "",
        f"`{command}` on {started:%Y-%m-%d %H:%M}, {elapsed:.0f} s.",
        "",
        f"- Platform: {device.platform}"
        + (f" ({device.device_kind})" if device.device_kind != device.platform else "")
        + f", {jax.device_count()} devices"
        + (
            " (virtual CPU devices from `XLA_FLAGS=--xla_force_host_platform_device_count=8`, "
            "sharing the machine's cores)"
            if device.platform == "cpu"
            else ""
        )
        + f"; {machine()}; load average (1, 5, 15 min) at start {loads[0]}, at end "
        f"{loads[1]}.",
        f"- Versions: {versions()}.",
        f"- Model: MLP {DIM}-{'-'.join(map(str, HIDDEN))}-{CLASSES} (relu), {num_params:,} "
        f"float32 parameters ({num_params * 4:,} B), Adam {LEARNING_RATE:g} (two slots per "
        "parameter), sparse softmax cross-entropy from logits, accuracy tracked.",
        f"- Data: synthetic, {len(x):,} rows x {x.shape[1]} float32 (`x` {x.nbytes:,} B), "
        f"int32 labels; `fit` adds a float32 weight and mask per row, "
        f"{total_bytes(host_batch(x, y)):,} B in all. Global batch {args.batch_size}, "
        f"{args.steps} steps, `steps_per_execution=1`.",
        "- Data placements: "
        + (
            f'`DataParallel` takes `data_placement` (default `"{default}"`); both '
            '`"sharded"` and `"replicated"` are reported.'
            if placements != (None,)
            else "this `DataParallel` has no `data_placement` argument: only its behaviour, "
            "which copies every row to every device, is reported (as replicated)."
        ),
        "- Method: while each `fit` runs, the script wraps hkfit's internal "
        "`Program.train_run` to record the arguments `fit` passes to its compiled training "
        "step (shapes, dtypes and shardings); the data bytes are those of the recorded "
        "`Batch`, and the step is lowered and compiled again from the recorded arguments "
        "to read its optimized HLO.",
        "- Every device count runs in one process: a run on k devices uses "
        "`DataParallel(devices=jax.devices()[:k])`, which builds the mesh and compiles the "
        "programs that a process with k devices would.",
        "",
        "## How to read",
        "",
        "Each row trains a fresh model for a few steps on k devices. **data B/device** is "
        "the training arrays (`x`, `y`, weights, mask) exactly as `fit` passed them to its "
        "compiled training step, read from their shardings: the largest, over devices, of "
        "the bytes of the shards one device holds. Replicated data stays at the full size "
        "on every device; sharded data falls as 1/k. **params B/device** and "
        "**optimizer B/device** read `model.params` and `model.opt_state` the same way "
        "after the fit: replicated parameters stay whole, FSDP splits every parameter of "
        "at least 16,384 elements (here both hidden weight matrices), so they fall about "
        "as 1/k, plus the small leaves that stay whole. **collective B/step** sums, over "
        "the collective ops of one compiled training step (the loop-free program that "
        "`steps_per_execution=1` runs, so each op runs once per step), the size of the "
        "full buffer each op works on, per device: the operand of an all-reduce, the "
        "(gathered) result of an all-gather, the (unscattered) operand of a "
        "reduce-scatter, and the operand of a collective-permute or all-to-all. This is "
        "the logical payload, which does not depend on k; the bytes a device actually "
        "sends depend on the algorithm (a ring moves about 2(k-1)/k of it for an "
        "all-reduce, (k-1)/k for an all-gather or a reduce-scatter). A cell shows bytes "
        "and (ops); – means none. The ops are read from the optimized HLO "
        "(`jit(...).lower(...).compile().as_text()`), after SPMD partitioning, which is "
        "where XLA inserts the collectives. **XLA:CPU has no reduce-scatter**: it writes "
        "one as an all-reduce followed by a dynamic-slice, so on CPU the FSDP gradient "
        "reduction shows up in the all-reduce column (on GPU and TPU it is a "
        "reduce-scatter). A data-parallel step all-reduces every gradient (the parameter "
        "bytes) and the metric sums. Under FSDP, XLA's SPMD partitioner chooses how to "
        "compute with the split weights: the textbook plan all-gathers each split weight "
        "where it is used and reduce-scatters its gradient (both about the parameter "
        "bytes); when a step's activations are smaller than the weights it instead "
        "all-gathers the activations and all-reduces partial sums, leaving the weights "
        "split, so its collective bytes follow the batch size, not the parameter count. "
        "The list under each table gives every op's result shape, from which the plan can "
        "be read, and the last section shows where the plan changes with the batch size. "
        "One device needs no collective.",
        "",
        "Nothing is timed on a CPU: the virtual devices share the same few cores, so more "
        "devices cannot run faster there, and the samples/s column says *not measured on "
        "CPU*. On an accelerator (`--gpu`) it is rows / median epoch time of a 3-epoch fit "
        "at the default pacing, first epoch excluded.",
    ]
    for config, rows in results.items():
        lines += ["", f"## {config.title}", ""]
        lines += table(rows)
        loops = [m.devices for m in rows if m.collectives.has_loop or m.fused_step]
        if loops:
            lines += [
                "",
                f"On {', '.join(map(str, loops))} device(s) the measured program held a loop: "
                "its collectives are counted once, but may run more than once per step.",
            ]
        if rows and rows[-1].collectives.ops:
            last = rows[-1]
            lines += [
                "",
                f"The collectives of one step on {last.devices} devices (kind, result shape, "
                "bytes): "
                + "; ".join(f"{op} `{shape}` {size:,}" for op, shape, size in last.collectives.ops)
                + ".",
            ]
        if skipped.get(config):
            lines += ["", "Not run: " + "; ".join(skipped[config]) + "."]
    if sweep:
        lines += [""] + sweep_section(sweep)
    if args.quick:
        lines += [
            "",
            "This was a `--quick` smoke run (fewer rows and devices): it checks that "
            "everything runs; its data sizes are not the report's.",
        ]
    return "\n".join(lines) + "\n"


# --- Main --------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="2,048 rows on 1 and 2 devices: a smoke check; prints, writes no file",
    )
    parser.add_argument(
        "--devices",
        default=None,
        help="comma-separated device counts (default 1,2,4,8; 1,2 with --quick)",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="where to write the markdown report (default: benchmarks/RESULTS-scaling.md; "
        "a --quick run only prints it unless --out is given)",
    )
    parser.add_argument(
        "--gpu",
        action="store_true",
        help="do not default JAX_PLATFORMS to cpu: run on the accelerator JAX finds, and "
        "measure samples/s there",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=BATCH_SIZE,
        help=f"global batch size of the main tables (default {BATCH_SIZE:,})",
    )
    parser.add_argument(
        "--no-sweep",
        dest="sweep",
        action="store_false",
        help="leave out the FSDP sweep over global batch sizes",
    )
    parser.add_argument("--hlo-dir", default=None, help="also write each step's HLO there")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.steps = STEPS
    counts = (1, 2) if args.quick else DEVICE_COUNTS
    if args.devices:
        try:
            counts = tuple(int(v) for v in args.devices.split(","))
        except ValueError:
            parser.error(f"Expected --devices like 1,2,4,8. Received: {args.devices!r}.")
    if any(c < 1 or args.batch_size % c for c in counts):
        parser.error(
            f"Expected device counts >= 1 that divide the batch size {args.batch_size}. "
            f"Received: {counts}."
        )
    data = synthetic(2_048 if args.quick else ROWS, 0, DIM)
    x, y = data.x, data.y
    started, clock, loads = datetime.datetime.now(), time.perf_counter(), [load_average()]
    log(f"{versions()}\n{machine()}, {jax.device_count()} {jax.devices()[0].platform} devices")
    if args.hlo_dir:
        os.makedirs(args.hlo_dir, exist_ok=True)

    results: dict[Config, list[Measurement]] = {}
    skipped: dict[Config, list[str]] = {}
    for config in configs():
        results[config], skipped[config] = [], []
        for k in counts:
            if k > jax.device_count():
                skipped[config].append(f"{k} devices (only {jax.device_count()} exist)")
                continue
            try:
                make_layout(k, config)
            except (TypeError, ValueError) as e:  # e.g. a placement this version refuses
                skipped[config].append(f"{k} devices ({type(e).__name__}: {e})")
                continue
            hlo = None
            if args.hlo_dir:
                name = f"{config.placement or 'current'}-{config.param_sharding or 'dp'}-{k}"
                hlo = os.path.join(args.hlo_dir, f"{name}.hlo.txt")
            m = measure(k, config, x, y, batch_size=args.batch_size, steps=args.steps, hlo_out=hlo)
            m = m._replace(samples_per_s=throughput(k, config, x, y, batch_size=args.batch_size))
            results[config].append(m)
            log(
                f"  {config.placement or 'current'}/{config.param_sharding or 'replicated'} "
                f"k={k}: data {_bytes(m.data_bytes)}, params {_bytes(m.param_bytes)}, "
                f"optimizer {_bytes(m.opt_bytes)}, collectives {m.collectives.total:,} B/step"
            )
    sweep = None
    largest = max((k for k in counts if k <= jax.device_count()), default=0)
    fsdp = next((c for c in results if c.param_sharding == "fsdp" and results[c]), None)
    if args.sweep and largest > 1 and fsdp is not None:
        config = fsdp
        batches = (SWEEP_BATCHES[0], SWEEP_BATCHES[-1]) if args.quick else SWEEP_BATCHES
        sweep = {"config": config, "devices": largest, "results": {}}
        for batch_size in batches:
            m = measure(largest, config, x, y, batch_size=batch_size, steps=1)
            sweep["results"][batch_size] = m
            log(f"  sweep k={largest} batch {batch_size}: collectives {m.collectives.total:,} B")
    loads.append(load_average())
    elapsed = time.perf_counter() - clock
    text = report(args, results, skipped, sweep, x, y, started, elapsed, loads)
    write_report(text, args, "RESULTS-scaling.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
