"""The runs of fit, evaluate and predict: feeds, program and executor wired together.

``Model`` checks its public arguments and calls these functions with a :class:`Context`:
everything they need from the model, passed down explicitly (nothing here reads a
model's attributes). Each function builds the feed for the user's data, asks the model
to build (once per input structure) through ``context.build``, and hands segments to the
executor, which paces them and fires the hooks.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np

from hkfit import _args
from hkfit import _data as data_lib
from hkfit import _eager as eager
from hkfit import _engine as engine
from hkfit import _feeds as feeds
from hkfit import _position as position_lib
from hkfit import _stream as stream_lib
from hkfit._pacing import Pacer
from hkfit._position import Position
from hkfit._program import Program
from hkfit.callbacks.base import CallbackList
from hkfit.callbacks.progress import ProgressBar
from hkfit.step import Batch


class Context(NamedTuple):
    """What a run needs from the model.

    Attributes:
      layout: where arrays live.
      build: ``(x, y=None, train=False) -> Program``: initializes the model if needed,
        checks the inputs once per structure, resolves metrics when labels are first
        seen (``train``: the data is for training, which a custom train step may take in
        another shape than the forward's inputs).
      program: () -> the current program, None before the first build.
      built: () -> whether the model has parameters.
      get_state / set_state: read and publish the train state.
      example: () -> zeros of one input row (to inspect the forward).
      shuffle_key: the key epoch orders are drawn from.
      eval_params: () -> the params inference runs with (a schedule-free optimizer's
        evaluation params; the train state's own otherwise). Called once per run.
      labels: ``(y, name="y") -> y``: checks the labels of a built model against its
        outputs (sparse class indices in range) and squeezes ``[n, 1]`` sparse labels.
      set_position: publishes where the running epoch stands (a
        :class:`hkfit._position.Position`, with device metric states), after every
        execution; a save made then can resume at the next batch.
    """

    layout: Any
    build: Callable[..., Program]
    program: Callable[[], Program | None]
    built: Callable[[], bool]
    get_state: Callable[[], Any]
    set_state: Callable[[Any], None]
    example: Callable[[], Any]
    shuffle_key: jax.Array
    eval_params: Callable[[], Any]
    set_position: Callable[[Any], None] = lambda position: None
    labels: Callable[..., Any] = lambda y, name="y": y


def _current_program(context: Context) -> Program:
    """The program of a model that array feeds have already built."""
    program = context.program()
    if program is None:
        raise RuntimeError("Expected the model to be built by its feed before the run.")
    return program


def callback_list(
    callbacks: Any, model: Any, verbose: int, params: dict, history: Any = None
) -> CallbackList:
    """The user's callbacks (checked), then a progress bar when ``verbose``, then ``history``.

    As in Keras, the history comes last: what a callback adds to the epoch's logs in its
    ``on_epoch_end`` is recorded (and shown by the bar).
    """
    if isinstance(callbacks, (str, bytes)) or not hasattr(callbacks, "__iter__"):
        raise TypeError(
            "Expected `callbacks` to be a list of hkfit.callbacks.Callback. "
            f"Received: callbacks={callbacks!r}."
        )
    bar = [ProgressBar(verbose)] if verbose else []
    last = [] if history is None else [history]
    return CallbackList(
        [*callbacks, *bar, *last], model=model, params={**params, "verbose": verbose}
    )


def _pacer(context: Context, program: Program, kind: str, steps_per_execution: Any) -> Pacer:
    if eager.active():  # one step at a time, op by op
        return Pacer(1)
    ts = context.get_state()
    fuse_auto = program.loops_help(ts.params, ts.state, context.example())
    return program.pacer(kind, steps_per_execution, fuse_auto)


# --- fit -----------------------------------------------------------------------------


def fit_feeds(
    context: Context,
    x: Any,
    y: Any,
    args: _args.FitArgs,
    *,
    shuffle: bool,
    class_weight: Any,
    sample_weight: Any,
    validation_data: Any,
    check_inputs: bool,
) -> tuple[Any, Any, _args.FitArgs]:
    """The training feed, the validation feed (or None) and the args of one ``fit``.

    Every input is checked here, before any step: the arrays, their labels against the
    model's outputs, the weights and ``validation_data``. The returned args hold the
    batch size that is used: at most the number of training rows (as ``evaluate`` caps
    it), so a huge ``batch_size`` costs no memory.
    """
    if _args.is_iterable_input(x, y):
        _args.check_iterable_args(y, sample_weight, class_weight, args.validation_split)
        train: Any = feeds.Batches(
            x,
            args.steps_per_epoch,
            checked_batches(context, context.layout.device_batch, train=True),
            group=args.gradient_accumulation_steps,
        )
    elif y is not None and stream_lib.exceeds_budget(
        x, y, sample_weight, args.validation_split, args.device_data_budget
    ):  # streamed from the host, chunk by chunk (see hkfit._stream)
        train, split, args = stream_lib.fit_feed(
            context,
            x,
            y,
            args,
            shuffle=shuffle,
            class_weight=class_weight,
            sample_weight=sample_weight,
            check_inputs=check_inputs,
            cap_batch_size=lambda rows: _capped_batch_size(context, args.batch_size, rows),
        )
        validation_data = validation_data if split is None else split
    else:
        if y is None:
            raise ValueError("Expected targets `y` for array inputs `x`. Received: y=None.")
        context.layout.local_batch_size(args.batch_size)  # refused before building
        x, y, n = data_lib.checked_arrays(x, y, check_inputs)
        context.build(x, y, train=True)
        y = context.labels(y)
        weights = data_lib.row_weights(n, y, sample_weight, None)
        data = Batch(x, y, weights, data_lib.metric_mask(weights))
        if args.validation_split:
            data, split = feeds.split_validation(data, args.validation_split)
            validation_data = (split.x, split.y, split.weights)
        rows = data_lib.num_rows(data.x, "x")
        if class_weight is not None:
            data = data._replace(
                weights=data.weights * data_lib.row_weights(rows, data.y, None, class_weight)
            )
        args = args._replace(batch_size=_capped_batch_size(context, args.batch_size, rows))
        train = feeds.TrainArrays(
            data,
            args.batch_size,
            context.layout,
            shuffle=shuffle,
            steps_per_epoch=args.steps_per_epoch,
            accumulation_steps=args.gradient_accumulation_steps,
        )
    val = None
    if validation_data is not None:
        val = eval_feed(
            context,
            validation_data,
            None,
            None,
            args.validation_batch_size,
            check_inputs,
            resident=True,
            name="validation_data",
        )
    return train, val, args


#: Training feeds over arrays, resident or streamed: their epochs are segments of a plan.
_ARRAY_FEEDS = (feeds.TrainArrays, stream_lib.TrainStream)


def _capped_batch_size(context: Context, batch_size: int, rows: int) -> int:
    """``batch_size``, or the smallest size >= ``rows`` the layout takes if that is less.

    One batch of all the rows trains exactly like a larger batch padded with nothing,
    and does not allocate a row order of ``batch_size`` indices.
    """
    if batch_size <= rows:
        return batch_size
    for size in range(rows, batch_size):
        try:
            context.layout.local_batch_size(size)
        except ValueError:
            continue
        return size
    return batch_size


def checked_batches(
    context: Context, convert: Callable, *, train: bool = False, name: str = "x"
) -> Callable:
    """``convert`` of an iterable's batches, after the checks that arrays get.

    Each ``(x, y[, w])`` batch is checked on the host before it is converted (two batches
    ahead of the step that uses it): numeric inputs with the model's input spec, labels
    in range of the model's outputs (``[n, 1]`` sparse labels squeezed), and weights.
    """

    def checked(batch: Any) -> Any:
        x, y, w = data_lib.split_batch(batch)
        x, y = data_lib.to_numpy(x, name), data_lib.to_numpy(y, name)
        if y is not None:
            context.build(x, y, train=train, name=name)
            y = context.labels(y, "y" if name == "x" else name)
        return convert((x, y) if w is None else (x, y, w))

    return checked


def train_epoch(
    context: Context,
    train: Any,
    cbs: CallbackList,
    args: _args.FitArgs,
    epoch: int,
    epoch_index: int,
    should_stop: Callable[[], bool],
    start: Position | None = None,
) -> dict | None:
    """Runs epoch ``epoch``; None when the data ran out before it started.

    ``epoch_index`` counts the epochs the model has trained: the shuffle order's index.
    ``start`` resumes the epoch after ``start.batch`` batches, with its metric states
    (JSON, restored when they fit this program) and its iterator state.
    """
    skipped = 0 if start is None else start.batch
    steps_per_execution = engine.steps_per_execution_for(
        cbs, engine.TRAIN, args.steps_per_execution
    )
    if isinstance(train, _ARRAY_FEEDS):
        program = _current_program(context)
        pacer = _pacer(context, program, "train", steps_per_execution)
        if train.steps is not None:  # what is left of this fit, to judge a probe's cost
            pacer.expect((args.epochs - epoch) * train.steps - skipped)
        segments: Any = feeds.skip(
            train.segments(
                program,
                context.get_state(),
                context.shuffle_key,
                epoch_index,
                pacer.fused,
                pacer.compare,
            ),
            skipped,
        )
    else:
        if start is not None and start.iterator is not None:
            train.restore(start.iterator)
        batches = train.open(offset=skipped)
        if batches.first is None:
            if not context.built():
                raise ValueError(
                    "Expected a non-empty dataset. Received: an iterable `x` that yielded no batch."
                )
            return None
        program = context.build(batches.first[0], batches.first[1], train=True)
        if train.group > 1:  # gradient accumulation: `group` batches per optimizer step
            grouped = program.grouped_train_step(context.get_state(), train.group)
            segments = batches.groups(
                train.group,
                lambda carry, group: grouped(carry[0], carry[1], tuple(Batch(*b) for b in group)),
            )
        else:
            step = program.train_step(context.get_state())
            segments = batches.segments(lambda carry, b, _i: step(carry[0], carry[1], Batch(*b)))
        pacer = Pacer(1)

    def publish(carry: Any, done: int) -> None:
        context.set_state(carry[0])
        iterator = None if isinstance(train, _ARRAY_FEEDS) else batches.state
        context.set_position(Position(epoch, done, carry[1], iterator))

    logs = program.empty_logs(train=True)
    if start is not None and start.logs:
        logs = position_lib.restore_logs(start.logs, logs) or logs
    executor = engine.Executor(
        cbs,
        engine.TRAIN,
        pacer,
        read_logs=program.read_train_logs,
        commit=lambda carry, done: publish(carry, done),
        should_stop=should_stop,
        progress=args.verbose == 1,
        logs_of=lambda carry: carry[1],
        load=lambda carry: (context.get_state(), carry[1]),
    )
    _, logs = executor.run(segments, (context.get_state(), logs))
    wanted = getattr(train, "steps_per_pass", None)
    if wanted is not None and skipped + executor.batches < wanted and not should_stop():
        warnings.warn(
            f"The iterable ran out after {executor.batches} of {wanted} steps in epoch "
            f"{epoch + 1}; training stops here and keeps every completed step. Make it "
            "yield steps_per_epoch * epochs batches (e.g. repeat it).",
            stacklevel=5,
        )
        train.exhausted = True
    return program.read_train_logs(logs)


def validate(
    context: Context, val: Any, cbs: CallbackList, args: _args.FitArgs, epoch: int
) -> dict | None:
    """``{}`` when no validation is due, None when it yielded no batch, else its logs."""
    if val is None or not args.validate_after(epoch + 1):
        return {}
    return evaluate(context, val, cbs, args.steps_per_execution, None, progress=False)


# --- evaluate ------------------------------------------------------------------------


def eval_feed(
    context: Context,
    x: Any,
    y: Any,
    sample_weight: Any,
    batch_size: int,
    check_inputs: bool,
    *,
    resident: bool,
    name: str = "x",
) -> Any:
    """Arrays (``(x, y[, w])`` tuples or lists too, as ``validation_data`` is) or an iterable.

    Arrays are checked (rows, values, input spec, labels, weights) before any step; an
    iterable's batches as they are read (see :func:`checked_batches`). Errors name ``name``.
    """
    names: tuple[str, ...] = ("x", "y", "sample_weight")
    if y is None and _is_data_tuple(x):
        x, y, sample_weight = (*x, None)[:3]
        names = tuple(f"{name}[{i}]" for i in range(3)) if name != "x" else names
    elif name != "x" and (isinstance(x, dict) or data_lib.is_array(x)):
        raise ValueError(
            f"Expected `{name}` to be a tuple (x, y) or (x, y, sample_weight) of arrays, or "
            f"an iterable of such batches. Received: {type(x).__name__}."
        )
    if y is None:
        if isinstance(x, dict) or data_lib.is_array(x):
            raise ValueError(
                f"Expected targets `y` to evaluate array inputs `{name}`. Received: y=None."
            )
        if sample_weight is not None:
            raise ValueError(
                f"Expected `sample_weight=None` with an iterable `{name}`: its batches carry "
                "their own weights as (x, y, sample_weight), as in Keras. Received: "
                f"sample_weight of type {type(sample_weight).__name__}."
            )
        convert = checked_batches(context, context.layout.device_batch, name=name)
        return feeds.Batches(x, None, convert, name=name)
    x, y, n = data_lib.checked_arrays(x, y, check_inputs, (names[0], names[1]))
    context.build(x, y, name=names[0])
    y = context.labels(y, names[1])
    weights = data_lib.row_weights(n, y, sample_weight, None, name=names[2])
    data = Batch(x, y, weights, data_lib.metric_mask(weights))
    return feeds.EvalArrays(data, batch_size, context.layout, resident=resident)


def _is_data_tuple(data: Any) -> bool:
    """Whether ``data`` is ``(x, y[, w])`` arrays rather than an iterable of batches.

    A tuple or a list (as Keras takes ``validation_data``) of 2 or 3 array pytrees; a
    list whose items are all ``(x, y[, w])`` tuples is a list of batches.
    """
    if not isinstance(data, (tuple, list)) or len(data) not in (2, 3):
        return False
    if isinstance(data, list) and all(isinstance(d, tuple) and len(d) in (2, 3) for d in data):
        return False
    return all(d is None or data_lib.is_array_tree(d) for d in data)


def steps_of(feed: Any, steps: int | None) -> int | None:
    """Batches an evaluation will run (None for an iterable of unknown length)."""
    total = feed.num_batches() if isinstance(feed, feeds.EvalArrays) else feed.steps
    return total if steps is None or total is None else min(total, steps)


def evaluate(
    context: Context,
    feed: Any,
    cbs: CallbackList,
    steps_per_execution: Any,
    steps: int | None,
    *,
    progress: bool,
) -> dict | None:
    """One evaluation run with its test hooks; None when it saw no batch."""
    steps_per_execution = engine.steps_per_execution_for(cbs, engine.TEST, steps_per_execution)
    if isinstance(feed, feeds.EvalArrays):
        program = _current_program(context)
        pacer = _pacer(context, program, "eval", steps_per_execution)
        params, state = context.eval_params(), context.get_state().state
        segments: Any = feed.segments(program, params, state, pacer.fused, steps)
    else:
        batches = feed.open(steps)
        if batches.first is None:
            return None
        program = context.build(batches.first[0], batches.first[1])
        params, state, step = context.eval_params(), context.get_state().state, program.eval_step()
        segments = batches.segments(lambda logs, b, i: step(params, state, logs, Batch(*b), i))
        pacer = Pacer(1)
    executor = engine.Executor(
        cbs, engine.TEST, pacer, read_logs=program.read_logs, progress=progress
    )
    return engine.evaluate(cbs, executor, segments, program.empty_logs, program.read_logs)


# --- predict -------------------------------------------------------------------------


def _input_batches(context: Context) -> Callable[[Any], Any]:
    """The conversion of an iterable's input batches, each checked like array inputs."""

    def convert(batch: Any) -> Any:
        if isinstance(batch, (tuple, list)):  # (x, y[, w]) batches: keep x
            batch = batch[0]
        data_lib.check_present(batch, "x")
        batch = data_lib.to_numpy(batch)
        context.build(batch)
        return jax.device_put(batch)

    return convert


def predict(
    context: Context,
    x: Any,
    batch_size: int,
    steps: int | None,
    cbs: CallbackList,
    steps_per_execution: Any,
    *,
    progress: bool,
) -> Any:
    """Outputs for every row of ``x`` (arrays or an iterable of input batches)."""
    steps_per_execution = engine.steps_per_execution_for(cbs, engine.PREDICT, steps_per_execution)
    if isinstance(x, dict) or data_lib.is_array_tree(x):
        x = data_lib.to_numpy(x)
        feed = feeds.PredictArrays(x, batch_size, context.layout, steps)
        program = context.build(x)
        cbs.set_params({**cbs.params, "steps": feed.steps})
        params, state = context.eval_params(), context.get_state().state
        pacer = _pacer(context, program, "predict", steps_per_execution)
        spec = program.output_spec(params, state, data_lib.take_rows(x, 0, feed.batch_size))
        collector = feed.collector(spec)
        executor = engine.Executor(cbs, engine.PREDICT, pacer, progress=progress)
        cbs.on_predict_begin({})
        executor.run(feed.segments(program, params, state, pacer.fused), collector)
        result = collector.finish()
        cbs.on_predict_end({})
        return result
    batches = feeds.Batches(x, steps, _input_batches(context)).open()
    if batches.first is None:
        raise ValueError("Expected at least one batch to predict. Received: an empty iterable.")
    program = context.build(batches.first)
    params, state, step = context.eval_params(), context.get_state().state, program.predict_step()
    segments = batches.segments(
        lambda outs, b, i: [*outs, step(params, state, b, i)],
        outputs=lambda outs, _s, _c: outs[-1],
    )
    executor = engine.Executor(cbs, engine.PREDICT, Pacer(1), progress=progress)
    cbs.on_predict_begin({})
    outputs = jax.device_get(executor.run(segments, []))
    cbs.on_predict_end({})
    return jax.tree_util.tree_map(lambda *parts: np.concatenate(parts), *outputs)


# --- single batches ------------------------------------------------------------------


def _one_batch(
    context: Context, x: Any, y: Any, sample_weight: Any, class_weight: Any, train: bool
) -> tuple[Program, Batch]:
    """The checked batch on the device; ``class_weight`` may name classes it lacks.

    A training batch is checked for NaN/Inf as ``fit`` checks its arrays: one bad value
    would make every parameter NaN.
    """
    x, y, n = data_lib.checked_arrays(x, y, check_inputs=train)
    program = context.build(x, y, train=train)
    y = context.labels(y)
    weights = data_lib.row_weights(n, y, sample_weight, class_weight, require_present=False)
    return program, Batch(*context.layout.device_batch((x, y, weights)))


def train_on_batch(
    context: Context, x: Any, y: Any, sample_weight: Any, class_weight: Any
) -> dict[str, float]:
    program, batch = _one_batch(context, x, y, sample_weight, class_weight, True)
    ts = context.get_state()
    ts, logs = program.train_step(ts)(ts, program.empty_logs(train=True), batch)
    context.set_state(ts)
    return program.read_train_logs(logs)


def test_on_batch(context: Context, x: Any, y: Any, sample_weight: Any) -> dict[str, float]:
    program, batch = _one_batch(context, x, y, sample_weight, None, False)
    params, state = context.eval_params(), context.get_state().state
    return program.read_logs(program.eval_step()(params, state, program.empty_logs(), batch, 0))


def predict_on_batch(context: Context, x: Any) -> Any:
    data_lib.check_present(x, "x")
    x = data_lib.to_numpy(x)
    program = context.build(x)
    params, state = context.eval_params(), context.get_state().state
    return jax.device_get(program.predict_step()(params, state, x, 0))
