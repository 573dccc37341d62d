"""``hkfit.Model``: the thin stateful shell.

The model owns its :class:`~hkfit.step.TrainState` and :class:`~hkfit.callbacks.History`,
checks the public arguments, and wires the pieces together: the program (compiled
steps, ``hkfit._program``), the feeds (user data as segments of batches,
``hkfit._feeds``), the layout (where arrays live, ``hkfit._layout``) and the executor
(pacing, log reads and every callback hook, ``hkfit._engine``). It does no maths and
runs no loop of its own.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from hkfit import _args, _compat
from hkfit import _auxiliary as auxiliary
from hkfit import _custom as custom_lib
from hkfit import _data as data_lib
from hkfit import _eager as eager
from hkfit import _ema as ema_lib
from hkfit import _engine as engine
from hkfit import _export as export_lib
from hkfit import _forward as forward_lib
from hkfit import _labels as labels_lib
from hkfit import _outputs as outputs_lib
from hkfit import _position as position_lib
from hkfit import _precision as precision_lib
from hkfit import _runs as runs
from hkfit import _saving as saving
from hkfit import callbacks as callbacks_lib
from hkfit import losses as losses_lib
from hkfit import metrics as metrics_lib
from hkfit import multiview as multiview_lib
from hkfit import optimizers as optimizers_lib
from hkfit import regularizers as regularizers_lib
from hkfit import step as step_lib
from hkfit._layout import SingleDevice
from hkfit._position import Position
from hkfit._program import Program, zeros_like_spec
from hkfit._snapshot import Snapshot
from hkfit.step import Batch, TrainState


def _class_name(loss_name: str) -> str:
    """``"sparse_categorical_crossentropy"`` -> ``"SparseCategoricalCrossentropy"``."""
    return "".join(part.capitalize() for part in loss_name.split("_"))


# Distinct streams derived from the seed key.
_INIT, _TRAIN, _SHUFFLE, _INFER = range(4)

# Pure: a schedule-free optimizer's evaluation params, compiled once per structure.
_eval_params = jax.jit(optimizers_lib.eval_params)


class _Slot:
    """Holds the train state and the inference choice; a model view shares its parent's."""

    def __init__(self) -> None:
        self.ts: TrainState | None = None
        self.ema_for_inference = True  # see Model.use_ema_for_inference


def _train_state_field(name: str):
    """Getter and setter of one field of the model's :class:`TrainState`."""

    def get(model):
        return getattr(model._require_built(name), name)

    def set_(model, value):
        ts = model._require_built(name)
        # The step donates the whole train state, and a buffer cannot be donated twice:
        # arrays shared with another field (`model.params = model.ema_params`) are copied.
        others = {id(a) for f in ts._fields if f != name for a in jax.tree.leaves(getattr(ts, f))}
        value = jax.tree.map(lambda a: jnp.copy(a) if id(a) in others else a, value)
        model._slot.ts = ts._replace(**{name: value})

    return get, set_, None, f"The model's current ``{name}`` (see :class:`hkfit.step.TrainState`)."


def _eager_if_asked(method: Callable) -> Callable:
    """Runs ``method`` op by op when called with ``run_eagerly=True`` (see ``hkfit._eager``)."""

    @functools.wraps(method)
    def run(self: Any, *args: Any, **kwargs: Any) -> Any:
        with eager.running(eager.check_flag(kwargs.get("run_eagerly", False))):
            return method(self, *args, **kwargs)

    return run


# What a call may set while it builds the model, restored when it fails before a step.
_BUILD_FIELDS = (
    "_input_spec",
    "_metrics",
    "_program",
    "_train_metrics",
    "_sparse",
    "_warned_logits",
    "history",
    "stop_training",
    "initial_epoch",
    "_epoch_logs",
)

# Floating-point input types too narrow to initialize params in (Haiku takes the params'
# dtype from the input's): the init runs on a float32 view of them instead.
_LOW_PRECISION = (np.dtype(np.float16), np.dtype(jnp.bfloat16))


def _transactional(method: Callable) -> Callable:
    """Leaves the model as it was when ``method`` fails before it commits a step.

    A fresh model stays fresh (no params, no input spec, no metrics), so a call with bad
    inputs never fixes the shapes a later, good call is checked against.
    """

    @functools.wraps(method)
    def run(self: Any, *args: Any, **kwargs: Any) -> Any:
        saved = {name: getattr(self, name) for name in _BUILD_FIELDS}
        checked, ts = set(self._checked), self._slot.ts
        try:
            return method(self, *args, **kwargs)
        except BaseException:
            if self._slot.ts is ts or (ts is None and self._slot.ts is self._initial_ts):
                self.__dict__.update(saved)
                self._checked, self._slot.ts = checked, ts
            raise

    return run


def _init_view(x: Any) -> Any:
    """``x`` with float16/bfloat16 leaves as float32, for the params' initialization."""
    return jax.tree_util.tree_map(
        lambda a: a.astype(np.float32) if a.dtype in _LOW_PRECISION else a, x
    )


class Model:
    """Keras-style training for a Haiku forward function.

    Args:
      forward: a function using Haiku modules, called with ONE argument ``x`` (an array or
        any pytree), plus ``is_training`` when it declares that parameter (``True`` in fit,
        ``False`` in evaluate/predict); an ``hk.Transformed`` / ``hk.TransformedWithState``
        called as ``apply(params, [state,] rng, x)``; or ``hkfit.with_is_training(t)`` for a
        transform whose apply takes the ``is_training`` flag.
      loss: a name from ``hkfit.losses.names()``, a loss object (``hkfit.losses``) or
        ``(y_true, y_pred) -> [batch]`` losses. For a forward that returns a dict (or a
        tuple/list) of outputs: a dict (or list) with one loss per output, ``None`` for an
        output that is not trained. Logs then hold the weighted total as ``loss`` and
        each output's ``<output>_loss`` (tuple/list outputs are named ``output_1``,
        ``output_2``, ...); ``y`` and ``sample_weight`` may be matching dicts (or lists).
      optimizer: an ``optax.GradientTransformation`` or ``"adam"``, ``"adamw"``, ``"sgd"``,
        ``"rmsprop"`` (built with ``optax.inject_hyperparams``, default learning rates).
      metrics: names, callables ``(y_true, y_pred) -> [batch]`` or metric objects. As in
        Keras they ignore sample and class weights: they see every real row (per-token
        weights of 0, which mark padding tokens, still mask). With several outputs: a
        dict ``{output: [metrics]}``, a list of lists (one per output), or a list that
        every output with a loss gets; logged as ``<output>_<metric>``.
      regularizer: ``params -> scalar`` added to the objective, e.g.
        ``hkfit.regularizers.l2(1e-4, include=r"/w$")``; logged as ``regularization_loss``
        and part of ``loss`` (in ``evaluate`` too, as Keras does).
      weighted_metrics: the same kinds, weighted like the loss by ``sample_weight`` and
        ``class_weight``; logged under their name, or ``weighted_<name>`` when a plain
        metric has that name.
      loss_weights: with several outputs, a dict (or list) of floats weighing each
        output's loss in the total (1.0 for those not given), as in Keras.
      ema: ``None`` (the default), a decay in (0, 1) such as ``0.999``, or
        ``hkfit.EMA(0.999, debias=False)``: keep an exponential moving average of the
        params, updated inside the compiled step and held in ``opt_state`` (so ``save``
        keeps it). Inference (``evaluate``, ``predict``, validation, ``test_on_batch``,
        ``predict_on_batch``, ``save_weights``) then uses the average, unless
        ``model.use_ema_for_inference = False``; read it as :attr:`ema_params`.
      precision: ``"float32"`` (the default), ``"mixed_bfloat16"``, ``"mixed_float16"``
        or a ``jmp.Policy`` (needs jmp: ``pip install "hkfit[mixed]"``). The mixed
        policies keep the params (and checkpoints) in float32, run the forward in the
        half type and return float32 outputs to the loss and ``predict``; normalization
        layers (``hk.BatchNorm``, ``hk.LayerNorm``, ...) compute in float32. float16
        compute trains with dynamic loss scaling, logged per epoch as ``loss_scale``;
        a step with non-finite gradients is skipped. Needs a forward function, not a
        Haiku transform.
      seed: an int or a JAX key; the same seed and data give bit-identical results.
      distribution: ``None`` (one device) or a distribution strategy such as
        ``hkfit.DataParallel()``.

    Parameters are created lazily from the first batch (or by :meth:`init`).

    Randomness at inference: :meth:`apply_fn` uses one fixed key derived from the seed;
    ``predict`` and ``evaluate`` give batch ``b`` of a run the key
    ``hkfit.step.batch_key(that key, b)``, so a stochastic forward draws fresh noise for
    every row, independent of the batch size only in distribution, and repeated calls
    with the same ``batch_size`` are identical.

    Note:
      Training steps donate the previous train state to XLA, so arrays read from
      ``model.params`` before a ``fit`` may be invalidated by it; copy them
      (``jax.tree_util.tree_map(jnp.copy, model.params)``) to keep a snapshot.

    >>> import haiku as hk, numpy as np, hkfit
    >>> model = hkfit.Model(lambda x: hk.Linear(1)(x), loss="mse", optimizer="sgd")
    >>> x, y = np.ones((8, 3), np.float32), np.zeros((8, 1), np.float32)
    >>> history = model.fit(x, y, epochs=2, batch_size=4, verbose=0)
    >>> history.epoch, model.step
    ([0, 1], 4)
    >>> model.predict(x).shape
    (8, 1)
    """

    def __init__(
        self,
        forward: Any,
        *,
        loss: Any = None,
        optimizer: Any = "adam",
        metrics: Sequence[Any] = (),
        weighted_metrics: Sequence[Any] = (),
        regularizer: Any = None,
        loss_weights: Any = None,
        objective: Any = None,
        train_step: Any = None,
        precision: Any = "float32",
        ema: Any = None,
        seed: Any = 0,
        distribution: Any = None,
    ):
        self.precision = precision
        mixed = precision_lib.get(precision)  # None for float32: nothing changes
        if mixed is not None:
            forward = precision_lib.scoped(forward, mixed, precision)
        self._forward = (
            forward if isinstance(forward, forward_lib.Forward) else forward_lib.wrap(forward)
        )
        if loss is None and objective is None and train_step is None:
            raise TypeError(
                "Expected `loss` (a name, loss object or callable), `objective` or "
                "`train_step`. Received none of them."
            )
        if loss is not None and objective is not None:
            raise ValueError(
                "Expected either `loss` or `objective`, not both: an objective computes "
                f"the loss itself. Received: loss={loss!r}, objective={objective!r}."
            )
        self._loss_name = loss if isinstance(loss, str) else None
        self.loss = loss
        self.loss_weights = loss_weights
        self.objective = objective
        self.train_step_fn = (
            None if train_step is None else custom_lib.checked(train_step, "train_step")
        )
        self._train_metrics: list | None = None
        self._heads: outputs_lib.Heads | None = None
        if objective is not None or loss is None:
            if loss_weights is not None:
                raise ValueError(
                    "`loss_weights` needs `loss` as a dict or list of per-output losses. "
                    f"Received: loss={loss!r}, loss_weights={loss_weights!r}."
                )
            self._loss_fn: Any = (
                None
                if objective is None
                else custom_lib.Objective(custom_lib.checked(objective, "objective"))
            )
            self._metric_specs: Any = _args.metric_specs(metrics)
            self._weighted_specs: Any = _args.metric_specs(weighted_metrics, "weighted_metrics")
        elif outputs_lib.is_multi(loss):
            self._heads = outputs_lib.heads(loss, loss_weights)
            names = [h.name for h in self._heads.heads]
            self._loss_fn = self._heads
            self._metric_specs = outputs_lib.metric_specs(metrics, "metrics", names)
            self._weighted_specs = outputs_lib.metric_specs(
                weighted_metrics, "weighted_metrics", names
            )
        else:
            if loss_weights is not None:
                raise ValueError(
                    "`loss_weights` weighs the losses of several outputs; it needs `loss` "
                    "as a dict or list of per-output losses. Received: "
                    f"loss={loss!r}, loss_weights={loss_weights!r}."
                )
            self._loss_fn = losses_lib.get(loss)
            self._metric_specs = _args.metric_specs(metrics)
            self._weighted_specs = _args.metric_specs(weighted_metrics, "weighted_metrics")
        self.optimizer = optimizers_lib.get(optimizer)
        self._optimizer_name = optimizer if isinstance(optimizer, str) else None
        self._loss_scaling = None if mixed is None else mixed.loss_scaling
        if self._loss_scaling is not None:  # float16 compute: the scale lives in opt_state
            if train_step is not None:
                raise ValueError(
                    f"`precision={precision_lib.name(precision)}` scales the loss inside "
                    "hkfit's training step; a custom `train_step` computes its own "
                    "gradients. Scale them there (jmp.DynamicLossScale), or use "
                    "precision='mixed_bfloat16', which needs no loss scaling. Received: "
                    f"train_step={train_step!r}."
                )
            self.optimizer = self._loss_scaling.wrap(self.optimizer)
        self.ema = ema_lib.resolve(ema)
        if self.ema is not None:
            if train_step is not None:
                raise ValueError(
                    "`ema` averages the params that the model's optimizer produces; a custom "
                    "`train_step` applies its own updates. Average them in the train step. "
                    f"Received: ema={ema!r} with train_step={train_step!r}."
                )
            self.optimizer = ema_lib.wrap(self.optimizer, self.ema)
        self._regularizer = regularizers_lib.get(regularizer)
        self._key = _args.to_key(seed)
        self._inference_key_data: Any = None  # numpy uint32, see _inference_key
        self.distribution = distribution
        self._layout = distribution or SingleDevice()
        self._slot = _Slot()
        self._metrics: list | None = None
        self._input_spec: Any = None
        self._program: Program | None = None
        self._checked: set = set()
        self._sparse: list[labels_lib.SparseSpec] = []  # the sparse losses (see _labels.py)
        self._initial_ts: TrainState | None = None  # the state `init` created
        self._warned_logits = False
        self.history = callbacks_lib.History()
        self.stop_training = False
        self.epoch = 0  # 1 + the index of the last completed epoch, as fit counts them
        self.initial_epoch = 0  # during fit: the first epoch (a callback may raise it)
        self._epochs_trained = 0  # epochs run over the model's life: the shuffle index
        self._epoch_logs: tuple[int, dict] | None = None  # of fit's current epoch
        self.initial_batch = 0  # during fit: batches of the first epoch already trained
        self.resume_point: tuple[int, int] | None = None  # see `load`
        self._position: Position | None = None  # of fit's running epoch
        self._resume: Position | None = None  # of the last loaded checkpoint

    # --- State --------------------------------------------------------------------------

    def _stream(self, which: int) -> jax.Array:
        return jax.random.fold_in(self._key, which)

    def _inference_key(self) -> jax.Array:
        """The inference key, wrapped inside the caller's trace from its raw uint32 data.

        A function that calls :meth:`apply_fn` then holds a uint32 constant rather than a
        typed-key one, which exporters (``jax.export``, jax2onnx) can carry.
        """
        if self._inference_key_data is None:
            with jax.ensure_compile_time_eval():  # concrete, even if first asked in a trace
                data = jax.random.key_data(self._stream(_INFER))
                self._inference_key_data = np.asarray(data)
        return jax.random.wrap_key_data(
            self._inference_key_data, impl=jax.random.key_impl(self._key)
        )

    @property
    def built(self) -> bool:
        """Whether the model has parameters."""
        return self._slot.ts is not None

    def _require_built(self, what: str) -> TrainState:
        if self._slot.ts is None:
            raise ValueError(f"`{what}` needs parameters: call `fit`, `init(x)` or `load` first.")
        return self._slot.ts

    params = property(*_train_state_field("params"))
    state = property(*_train_state_field("state"))
    opt_state = property(*_train_state_field("opt_state"))

    @property
    def step(self) -> int:
        """The number of optimizer steps taken."""
        return 0 if self._slot.ts is None else int(self._slot.ts.step)

    @property
    def train_state(self) -> TrainState:
        """The whole :class:`TrainState` (params, state, opt_state, rng, step)."""
        return self._require_built("train_state")

    @train_state.setter
    def train_state(self, value: TrainState) -> None:
        self._slot.ts = value

    @property
    def metrics(self) -> list:
        """The resolved metric objects (empty until the model sees labels)."""
        return list(self._metrics or [])

    @property
    def learning_rate(self) -> float:
        """The optimizer's injected learning rate; settable (``model.learning_rate = 0.01``).

        Works with the named optimizers and any ``optax.inject_hyperparams`` optimizer;
        the jitted step is not recompiled when it changes.

        Raises:
          ValueError: if the optimizer has no injected learning rate (the message says
            how to build one).
        """
        value = optimizers_lib.learning_rate(self._require_built("learning_rate").opt_state)
        if value is None:
            raise ValueError(
                f"{optimizers_lib.NO_LEARNING_RATE} Received: Model(optimizer={self.optimizer!r})."
            )
        return value

    @learning_rate.setter
    def learning_rate(self, value: float) -> None:
        self.opt_state = optimizers_lib.set_learning_rate(
            self._require_built("learning_rate").opt_state, value
        )

    @property
    def eval_params(self) -> Any:
        """The params that ``evaluate``, ``predict`` and ``save_weights`` use (read-only).

        With ``Model(ema=...)``, the average :attr:`ema_params` (unless
        :attr:`use_ema_for_inference` is False). Otherwise, for a schedule-free optimizer
        (``optax.contrib.schedule_free_adamw``, ...), its evaluation params,
        ``optax.contrib.schedule_free_eval_params(opt_state, params)`` (see
        :func:`hkfit.optimizers.eval_params`), computed by a jitted function at each
        read; for any other optimizer, ``params`` itself (the same object).
        """
        ts = self._require_built("eval_params")
        average = ema_lib.average(ts.opt_state) if self._slot.ema_for_inference else None
        if average is not None:
            return average
        if not optimizers_lib.is_schedule_free(ts.opt_state):
            return ts.params
        return _eval_params(ts.opt_state, ts.params)

    @property
    def ema_params(self) -> Any:
        """The exponential moving average of the params kept by ``Model(ema=...)`` (read-only).

        It lives in ``opt_state`` and is updated inside every training step (see
        :class:`hkfit.EMA` for the formula); before the first step it equals the initial
        params.

        Raises:
          ValueError: if the model was built without ``ema``.
        """
        average = ema_lib.average(self._require_built("ema_params").opt_state)
        if average is None:
            raise ValueError(
                "`ema_params` needs a model that averages its params: pass "
                "`Model(..., ema=0.999)`. Received: a model built with ema=None."
            )
        return average

    @property
    def use_ema_for_inference(self) -> bool:
        """Whether inference uses :attr:`ema_params` (default True; settable).

        With ``Model(ema=...)``, ``evaluate``, ``predict``, validation in ``fit``,
        ``test_on_batch``, ``predict_on_batch``, model views and ``save_weights`` use the
        average; set this to ``False`` to use the raw training params (or a schedule-free
        optimizer's evaluation params) instead. Without ``ema`` it changes nothing.
        """
        return self._slot.ema_for_inference

    @use_ema_for_inference.setter
    def use_ema_for_inference(self, value: bool) -> None:
        if not isinstance(value, (bool, np.bool_)):
            raise TypeError(
                f"Expected `use_ema_for_inference` to be True or False. Received: {value!r}."
            )
        self._slot.ema_for_inference = bool(value)

    def apply_fn(self, params: Any, state: Any, x: Any) -> Any:
        """Pure inference: ``apply_fn(model.params, model.state, x) -> y``.

        Runs the forward in inference mode (``is_training=False``), with a fixed key
        derived from the seed for any layer that draws one. It composes with ``jax.jit``,
        ``jax.vmap``, ``jax.grad``, ``jax.jacrev`` and ``jax.jacfwd``. With ``ema`` or a
        schedule-free optimizer, pass ``model.eval_params`` to get what ``predict`` computes.
        """
        return self._forward.apply_eval(params, state, self._inference_key(), x)

    def vmap(self, in_axes: Any, out_axes: Any = -1) -> multiview_lib.ModelView:
        """A view of this model whose predict/evaluate vmap ``apply_fn`` inside each batch.

        The view shares this model's parameters and state (read at call time, never
        copied). Axes count the batch axis 0, which can be neither mapped nor an output
        axis. See :class:`hkfit.multiview.ModelView`.

        Raises:
          ValueError / TypeError: if an axis is 0 or not an int / None.
        """
        forward = multiview_lib.vmapped_forward(self._forward, in_axes, out_axes)
        inner = Model(
            forward,
            loss=self.loss,
            optimizer=self.optimizer,
            metrics=self._metric_specs,
            weighted_metrics=self._weighted_specs,
            regularizer=self._regularizer,
            loss_weights=self.loss_weights,
            objective=self.objective,
            seed=self._key,
            distribution=self.distribution,
        )
        inner._slot = self._slot  # the view reads and writes the parent's train state
        return multiview_lib.ModelView(self, inner, in_axes, out_axes)

    @_transactional
    def init(self, x: Any) -> Model:
        """Creates parameters, state and optimizer state from an example batch ``x``.

        Does nothing if the model already has parameters. If it fails, the model is left
        without parameters, as it was.

        Input dtypes: the params take the dtype Haiku gives them from ``x``, except for
        float16 and bfloat16 inputs, whose float32 view initializes the params (float16
        params turn NaN after a few optimizer steps; ``precision=`` is the way to compute
        in half precision). Integer inputs are passed as they are, since they may be
        token ids for ``hk.Embed``; integer, uint8 or bool inputs that a layer cannot
        take (``hk.Linear``, ``hk.Conv2D``) raise a TypeError naming ``x`` that suggests
        a float conversion such as ``x.astype(np.float32) / 255``. Complex inputs build
        a complex model, which later calls then accept.

        Args:
          x: an example batch, an array or a pytree of arrays with the batch on axis 0.

        Returns:
          The model itself.

        Raises:
          ValueError: for ``None``, an empty container or arrays without rows.
          TypeError: for non-numeric inputs, or inputs the forward's layers cannot take.
        """
        if self._slot.ts is not None and self._input_spec is not None:
            return self
        data_lib.check_present(x, "x")
        x = data_lib.to_numpy(x)
        rows = data_lib.num_rows(x, "x")
        if rows == 0:
            raise ValueError("Expected at least one row in `x` to initialize. Received: 0 rows.")
        if self._input_spec is None:
            self._input_spec = jax.tree_util.tree_map(
                lambda a: jax.ShapeDtypeStruct((1, *np.shape(a)[1:]), a.dtype), x
            )
        if self._slot.ts is None:
            sample = _init_view(data_lib.take_rows(x, 0, min(8, rows)))
            params, state = self._init_params(sample)
            opt_state = self.optimizer.init(params)
            self._slot.ts = self._initial_ts = self._layout.place_state(
                TrainState(params, state, opt_state, self._stream(_TRAIN), jnp.zeros((), jnp.int32))
            )
        return self

    def _init_params(self, sample: Any) -> tuple[Any, Any]:
        """The forward's params and state for ``sample``; clear errors for unusable dtypes."""
        try:
            if eager.active():  # op by op: the forward may read values
                return self._forward.init(self._stream(_INIT), sample)
            return _compat.run_compiled_once(self._forward.init, self._stream(_INIT), sample)
        except (TypeError, ValueError) as e:
            if "not inexact" not in str(e):
                raise
            dtypes = sorted({str(a.dtype) for a in jax.tree_util.tree_leaves(sample)})
            raise TypeError(
                "Expected floating-point `x` for this forward: its layers need inexact "
                f"inputs ({e}). Received: x of dtype {', '.join(dtypes)}. Convert it, e.g. "
                "x.astype(np.float32) / 255 for uint8 images, x.astype(np.float32) for "
                "bool or integer features (token ids belong in hk.Embed)."
            ) from e

    def _build(self, x: Any, y: Any = None, train: bool = False, name: str = "x") -> Program:
        """Initializes if needed and checks ``x`` (and ``y``) once per input structure.

        ``name`` is what ``x`` is called in error messages (``"validation_data"``).
        """
        data_lib.check_numeric(x, name, allow_complex=self._complex_inputs())
        fresh = not self.built
        self.init(x)
        signature = (_args.signature(x), None if y is None else _args.signature(y), train)
        if signature not in self._checked:
            sample_x = data_lib.take_rows(x, 0, 2)
            sample_y = None if y is None else data_lib.take_rows(y, 0, 2)
            if self._forward_takes(x, train, name):
                jaxpr, out = self._trace(sample_x, fresh, name)
                if y is not None:
                    self._sparse = self._sparse_specs(out)
                    sample_y = self._labels(sample_y, check=False)  # the callers check y
                    self._check_outputs(jaxpr, out, sample_y)
                    if self._metrics is None:
                        metrics = []
                        if self._loss_fn is not None:
                            metrics = self._resolve_metrics(sample_y, out) + [
                                step_lib.AuxLoss(aux) for aux in self._added_losses(sample_x)
                            ]
                        self._metrics, self._program = metrics, None
            if y is not None and self.train_step_fn is not None and self._train_metrics is None:
                sample = Batch(sample_x, sample_y, np.ones(2, np.float32))
                names = custom_lib.log_names(self.train_step_fn, self.train_state, sample)
                self._train_metrics = [custom_lib.StepLog(name) for name in names]
                self._program = None
            self._checked.add(signature)
        if self._program is None:
            self._program = Program(
                self._forward,
                self._loss_fn,
                self.optimizer,
                self._metrics,
                self._layout,
                self._stream(_INFER),
                regularizer=self._regularizer,
                custom_step=self.train_step_fn,
                train_metrics=self._train_metrics,
                loss_scaling=self._loss_scaling,
            )
        return self._program

    def _complex_inputs(self) -> bool:
        """Whether the model was built on complex inputs (then complex ``x`` is valid)."""
        return any(
            jnp.issubdtype(s.dtype, jnp.complexfloating)
            for s in jax.tree_util.tree_leaves(self._input_spec)
        )

    def _trace(self, sample_x: Any, fresh: bool, name: str) -> tuple[Any, Any]:
        """The forward's jaxpr (None when eager) and output shapes on two rows of ``x``.

        The params of a model built in this call come from up to 8 rows: when the forward
        fails on 2 rows with params of other shapes, ``x`` has no batch axis.
        """
        try:
            if eager.active():  # no abstract trace: the forward may read values
                return None, self.apply_fn(self.params, self.state, sample_x)
            return jax.make_jaxpr(self.apply_fn, return_shape=True)(
                self.params, self.state, sample_x
            )
        except ValueError as e:
            if not fresh or "does not match shape" not in str(e):
                raise
            rows = [np.shape(a)[1:] for a in jax.tree_util.tree_leaves(sample_x)]
            raise ValueError(
                f"Expected `{name}` with a batch axis first: the forward's parameters change "
                f"shape with the number of rows ({e}). Received: {name} with rows of shape "
                f"{', '.join(map(str, rows))}. If `{name}` is one example, pass {name}[None] "
                f"(or np.expand_dims({name}, 0))."
            ) from e

    def _sparse_specs(self, out: Any) -> list[labels_lib.SparseSpec]:
        """The sparse crossentropies of this model's loss(es) on outputs ``out``."""
        return labels_lib.sparse_specs(self.loss, self._heads, out)

    def _labels(self, y: Any, name: str = "y", check: bool = True) -> Any:
        """``y`` with its sparse labels checked (and squeezed); see :mod:`hkfit._labels`."""
        return labels_lib.checked(y, self._sparse, name, check)

    def _require_objective(self, what: str) -> None:
        """A model trained by a custom ``train_step`` alone has no loss to evaluate."""
        if self._loss_fn is None:
            raise ValueError(
                f"`{what}` needs a loss: this model has a custom `train_step` but neither "
                "`loss` nor `objective`. Pass one of them to the Model to evaluate it."
            )

    def _forward_takes(self, x: Any, train: bool, name: str = "x") -> bool:
        """Checks ``x`` against the inputs the model was built on.

        A custom ``train_step`` may train on data that is not the forward's input (a GAN
        trains on samples and generates from noise): its ``fit`` data is not checked
        against the forward's inputs, and then not run through the forward either.

        Raises:
          ValueError: for inputs that do not match, unless a custom step takes them.
        """
        try:
            data_lib.check_input_spec(x, self._input_spec, name)
        except ValueError:
            if self.train_step_fn is None or not train:
                raise
            return False
        return True

    def _check_outputs(self, jaxpr: Any, out: Any, sample_y: Any) -> None:
        """Checks the losses against the forward's outputs; warns once of probabilities."""
        if self.loss is None:  # a custom objective or train step reads y itself
            return
        if self._heads is None:
            outputs_lib.require_matching_loss(self.loss, out)
            losses_lib.check_output(self.loss, out, sample_y)
            named: list[tuple[str | None, int | None]] = [(self._loss_name, None)]
        else:
            outputs_lib.check_structure(self._heads, out, sample_y)
            leaves = outputs_lib.leaf_indices(self._heads, out)
            named = []
            for head in self._heads.trained():
                losses_lib.check_output(
                    head.loss, outputs_lib.at(out, head), outputs_lib.at(sample_y, head)
                )
                if isinstance(head.loss, str) and leaves[head.name] is not None:
                    named.append((head.loss, leaves[head.name]))
        for name, leaf in named:
            if name not in losses_lib.LOGIT_NAMES or self._warned_logits:
                continue
            self._warned_logits = forward_lib.emits_probabilities(jaxpr, leaf)
            if self._warned_logits:
                warnings.warn(
                    f"loss={name!r} takes logits, but the forward ends in a softmax or a "
                    "sigmoid. Return logits (drop the activation), or pass a loss object "
                    f"that takes probabilities: hkfit.losses.{_class_name(name)}"
                    "(from_logits=False).",
                    stacklevel=5,
                )

    def _added_losses(self, sample_x: Any) -> list[str]:
        """Names of the losses the forward adds (``hkfit.add_loss``), plus regularization."""
        names: list[str] = []
        key = self._stream(_INFER)
        for apply, args in (
            (self._forward.apply_train, (self.params, self.state, key, sample_x)),
            (self._forward.apply_eval, (self.params, self.state, key, sample_x)),
        ):
            try:
                _, added = eager.shape_of(lambda *a, f=apply: auxiliary.collect(f, *a), *args)
            except TypeError:  # a model view does not train
                continue
            names += [name for name in added if name not in names]
        if self._regularizer is not None:
            names.append(step_lib.REGULARIZATION)
        return names

    def _resolve_metrics(self, sample_y: Any, out: Any) -> list:
        """Metric objects for these labels and outputs; weighted ones wrapped and named."""

        def get(spec: Any) -> Any:
            return metrics_lib.get(
                spec,
                y_true_shape=np.shape(sample_y) if data_lib.is_array(sample_y) else (),
                y_pred_shape=getattr(out, "shape", ()),
                loss_name=self._loss_name,
                from_logits=losses_lib.takes_logits(self.loss),
            )

        if self._heads is not None:
            return outputs_lib.resolve_metrics(
                self._heads, self._metric_specs, self._weighted_specs, sample_y, out
            )
        plain = [get(spec) for spec in self._metric_specs]
        taken = {m.name for m in plain}
        weighted = []
        for spec in self._weighted_specs:
            metric = get(spec)
            name = f"weighted_{metric.name}" if metric.name in taken else metric.name
            weighted.append(metrics_lib.Weighted(metric, name))
        return plain + weighted

    def _resume_at(self, epoch: int) -> Position | None:
        """Where epoch ``epoch`` of this ``fit`` starts: after ``initial_batch`` batches
        when it is the first epoch and a callback set that (``BackupAndRestore``); at its
        start with a loaded iterator state when the checkpoint was saved between epochs."""
        if epoch != self.initial_epoch:
            return None
        if self.initial_batch <= 0:  # the epoch's start: the state of a shared iterator, if any
            resume = self._resume
            if resume is None or (resume.epoch, resume.batch) != (epoch, 0):
                return None
            self._resume = None  # once
            return resume
        batch, self.initial_batch = self.initial_batch, 0
        if self._resume is not None and self._resume.epoch == epoch and self._resume.batch == batch:
            return self._resume
        return Position(epoch, batch)

    def _context(self) -> runs.Context:
        """What the run functions need from the model, passed down explicitly."""
        return runs.Context(
            layout=self._layout,
            build=self._build,
            program=lambda: self._program,
            built=lambda: self.built,
            get_state=lambda: self._require_built("fit"),
            set_state=lambda ts: setattr(self._slot, "ts", ts),
            example=lambda: zeros_like_spec(self._input_spec),
            shuffle_key=self._stream(_SHUFFLE),
            eval_params=lambda: self.eval_params,
            set_position=lambda position: setattr(self, "_position", position),
            labels=self._labels,
        )

    # --- fit / evaluate / predict --------------------------------------------------------

    @_eager_if_asked
    @_transactional
    def fit(
        self,
        x: Any,
        y: Any = None,
        *,
        batch_size: int = 32,
        epochs: int = 1,
        verbose: Any = "auto",
        callbacks: Sequence[callbacks_lib.Callback] | None = None,
        validation_split: float = 0.0,
        validation_data: Any = None,
        shuffle: bool = True,
        class_weight: dict | None = None,
        sample_weight: Any = None,
        initial_epoch: int = 0,
        steps_per_epoch: int | None = None,
        validation_batch_size: int | None = None,
        validation_freq: Any = 1,
        steps_per_execution: Any = "auto",
        check_inputs: bool = True,
        gradient_accumulation_steps: int = 1,
        run_eagerly: bool = False,
        device_data_budget: int | None = None,
    ) -> callbacks_lib.History:
        """Trains for the epochs numbered ``initial_epoch, ..., epochs - 1``.

        Args:
          x: inputs (an array or a pytree of arrays with the same number of rows), or an
            iterable yielding ``(x, y)`` / ``(x, y, sample_weight)`` batches.
          y: targets (array or pytree); ``None`` when ``x`` is an iterable.
          batch_size: rows per training batch (arrays only). The last partial batch of an
            epoch is trained on exactly: as a call of its own, or (models without Haiku
            state, one device) padded with zero-weight rows into the fused call. A size
            above the number of training rows is capped to it (one batch per epoch, the
            size reported in ``History.params``).
          epochs: the epoch count to reach, as in Keras.
          verbose: ``"auto"`` (1 on a terminal or in a notebook, else 2), 0 silent, 1 a
            progress bar on stderr, 2 one line per epoch on stdout.
          callbacks: :class:`hkfit.callbacks.Callback` instances.
          validation_split: fraction of the arrays, taken from the END before shuffling,
            held out for validation: a real number in [0, 1) (numpy scalars too).
          validation_data: ``(x_val, y_val)``, ``(x_val, y_val, w_val)`` (a tuple or a
            list) or an iterable. Arrays are checked like ``x`` and ``y`` before the first
            step, an iterable's batches as they are read; errors name ``validation_data``.
          shuffle: ``True`` or ``False`` (numpy bools too): shuffle the rows each epoch.
            The order is a function of the seed and of the number of epochs the model
            has trained, so successive ``fit`` calls reshuffle and a resumed run is
            bit-identical.
          class_weight: ``{class: weight}`` multiplying each row's weight (arrays only).
          sample_weight: per-row weights ``[rows]``, per-token weights ``[rows, ...]``,
            or a dict (list) of them per output of a multi-output model.
          initial_epoch: index of the first epoch to run (to resume).
          steps_per_epoch: batches (optimizer steps) per epoch; bounds an infinite
            iterable. With arrays, exactly this many batches of each epoch's order are
            used (at most one epoch).
          validation_batch_size: batch size for validation (default ``batch_size``).
          validation_freq: validate every N epochs (int) or after the listed 1-based epochs.
          steps_per_execution: ``"auto"`` or the number of batches fused into one compiled
            call, for training and validation. Batch callbacks fire once per call; under
            ``"auto"`` a callback that overrides a batch hook gets every batch.
          check_inputs: refuse NaN/Inf in array ``x``/``y``, and float64 values beyond the
            float32 range they are narrowed to (one cheap host pass). Labels of a sparse
            crossentropy are always checked against the model's number of classes
            (integers in ``[0, classes)``; ``[rows, 1]`` labels are squeezed, as in Keras),
            as are weights (finite, >= 0): arrays before the first step, an iterable's
            batches on the host as they are prefetched, before their step.
          run_eagerly: run every step op by op, without jit, so that ``print``,
            ``pdb.set_trace()`` and ``float(x)`` work inside the forward and the loss
            (slow; for debugging). Results equal the compiled ones within float
            tolerance.
          gradient_accumulation_steps: N >= 1 micro-batches per optimizer step, their
            gradients accumulated with ``optax.MultiSteps``. ``batch_size`` stays what one
            forward pass sees; a step trains on N * ``batch_size`` rows, and equals a step
            on one batch of that size for a model without Haiku state (the last, short
            one of an epoch too). Haiku state (``hk.BatchNorm`` statistics) is updated on
            every micro-batch. ``model.step``, ``steps_per_epoch``, batch hooks,
            ``ModelCheckpoint(save_freq=...)`` and the progress bar count optimizer
            steps. An iterable ``x`` gives N consecutive batches to each step (the last
            step of an epoch may get fewer). Validation is unaffected. Micro-batch ``i``
            of step ``s`` draws its dropout key from ``fold_in(fold_in(rng, s), i)``.
          device_data_budget: bytes the training arrays may take on the device (default
            ``None``: 2 GiB). Arrays that take more (inputs, targets and weights in the
            dtypes they are placed in) are streamed from the host instead of placed
            whole: windows of consecutive rows, about a quarter of the budget each, are
            read (a memory map with file reads, so the process never holds the whole
            array), permuted and copied to the device one chunk ahead of the step. The
            shuffle then draws the order of the windows and the order of the rows inside
            each window from the seed and the epoch: every row once per epoch, but not a
            uniform permutation (a batch holds rows of one window). ``shuffle=False``
            gives the same batches, and the same results up to float rounding, as
            placing the arrays. Rows held out by ``validation_split`` must fit in the
            budget. Streaming runs in one process: with several, arrays are placed
            unless a budget is given, and arrays over a given budget raise a
            ``ValueError``. Iterables are not affected.

        Returns:
          The :class:`hkfit.callbacks.History` of this call (also ``model.history``).

        Raises:
          ValueError / TypeError: on invalid arguments or data, naming the argument,
            before any step runs (for an iterable: before the step of the bad batch).
            If the model had no parameters, it is left without them.
        """
        args = _args.fit_args(
            batch_size=batch_size,
            epochs=epochs,
            verbose=verbose,
            initial_epoch=initial_epoch,
            steps_per_epoch=steps_per_epoch,
            validation_split=validation_split,
            validation_batch_size=validation_batch_size,
            validation_freq=validation_freq,
            steps_per_execution=steps_per_execution,
            gradient_accumulation_steps=gradient_accumulation_steps,
            device_data_budget=device_data_budget,
        )
        data_lib.check_present(x, "x")
        shuffle = _args.check_shuffle(shuffle)
        if validation_data is not None or validation_split:
            self._require_objective("validation_data")
        if self.train_step_fn is not None and args.gradient_accumulation_steps > 1:
            raise ValueError(
                "`gradient_accumulation_steps` accumulates the gradients of the model's "
                "loss; a custom `train_step` takes its own steps. Received: "
                f"gradient_accumulation_steps={args.gradient_accumulation_steps}."
            )
        context = self._context()
        train, val, args = runs.fit_feeds(
            context,
            x,
            y,
            args,
            shuffle=shuffle,
            class_weight=class_weight,
            sample_weight=sample_weight,
            validation_data=validation_data,
            check_inputs=check_inputs,
        )
        history = callbacks_lib.History()
        cbs = runs.callback_list(
            callbacks or [],
            self,
            args.verbose,
            {
                "epochs": args.epochs,
                "steps": train.steps,
                "batch_size": None if _args.is_iterable_input(x, y) else args.batch_size,
                "optimizer": self._optimizer_name,
            },
            history=history,
        )
        self.history, self.stop_training, self.initial_epoch = history, False, args.initial_epoch
        self._epoch_logs, self._position, self.initial_batch = None, None, 0

        def end_epoch(epoch: int, logs: dict) -> None:
            self._epoch_logs = (epoch, logs)  # saved with the history until History records it
            # saves from now on are at an epoch boundary: batch 0 of the next epoch, with
            # the state of an iterator that every epoch reads on (steps_per_epoch), if any
            state = getattr(train, "shared_state", None)
            self._position = None if state is None else Position(epoch + 1, 0, None, state)
            self.epoch = epoch + 1
            self._epochs_trained += 1
            rates = optimizers_lib.learning_rates(self._require_built("fit").opt_state)
            if rates:  # the first group's, and each group's when there are several
                logs["learning_rate"] = rates[min(rates)]
                if len(rates) > 1:
                    logs.update({f"learning_rate_{group}": rate for group, rate in rates.items()})
            if self._loss_scaling is not None:  # float16 compute
                logs["loss_scale"] = precision_lib.loss_scale(self.opt_state)

        plan = engine.FitPlan(
            cbs,
            args.epochs,
            lambda: self.initial_epoch,
            lambda epoch: runs.train_epoch(
                context,
                train,
                cbs,
                args,
                epoch,
                self._epochs_trained,
                lambda: self.stop_training,
                self._resume_at(epoch),
            ),
            lambda epoch: runs.validate(context, val, cbs, args, epoch),
            end_epoch,
            lambda: self.stop_training,
            lambda: train.exhausted,
        )
        engine.fit(plan)
        return history

    @_eager_if_asked
    @_transactional
    def evaluate(
        self,
        x: Any,
        y: Any = None,
        *,
        batch_size: int = 32,
        verbose: Any = "auto",
        sample_weight: Any = None,
        steps: int | None = None,
        callbacks: Sequence[callbacks_lib.Callback] | None = None,
        steps_per_execution: Any = "auto",
        check_inputs: bool = True,
        run_eagerly: bool = False,
    ) -> dict[str, float]:
        """Loss and metrics over every row of ``x`` (weighted by ``sample_weight``).

        Exact: the last partial batch is padded with zero-weight rows, never dropped.
        Runs with :attr:`eval_params` (the EMA of ``Model(ema=...)``, or a schedule-free
        optimizer's evaluation params).

        Args:
          x: inputs (array or pytree of arrays), or an iterable of ``(x, y[, w])`` batches.
          y: targets for array inputs.
          batch_size: rows per batch (arrays only).
          verbose: ``"auto"``, 0, 1 (a progress bar on stderr) or 2 (one line on stdout).
          sample_weight: per-row weights ``[rows]``, per-token weights ``[rows, ...]``,
            or a dict (list) of them per output of a multi-output model. Arrays only: an
            iterable's batches carry their own, as in Keras.
          steps: evaluate at most this many batches.
          callbacks: callbacks whose ``on_test_*`` hooks are called.
          steps_per_execution: ``"auto"`` or batches per compiled call (see ``fit``).
          check_inputs: refuse NaN/Inf in array inputs.
          run_eagerly: run op by op, without jit (see :meth:`fit`).

        Returns:
          ``{"loss": ..., "<metric>": ...}`` as Python floats.

        Raises:
          ValueError: on invalid arguments, or when ``x`` yields no batch.
        """
        data_lib.check_present(x, "x")
        batch_size = _args.positive_int(batch_size, "batch_size")
        steps = None if steps is None else _args.positive_int(steps, "steps")
        _args.check_steps_per_execution(steps_per_execution)
        verbose = callbacks_lib.resolve_verbose(verbose)
        self._require_objective("evaluate")
        context = self._context()
        feed = runs.eval_feed(
            context, x, y, sample_weight, batch_size, check_inputs, resident=False
        )
        cbs = runs.callback_list(
            callbacks or [], self, verbose, {"steps": runs.steps_of(feed, steps)}
        )
        logs = runs.evaluate(context, feed, cbs, steps_per_execution, steps, progress=verbose == 1)
        if logs is None:
            raise ValueError(
                "Expected at least one batch to evaluate. Received: `x` that "
                "yielded no batch (an empty or used-up iterable)."
            )
        return logs

    @_eager_if_asked
    @_transactional
    def predict(
        self,
        x: Any,
        *,
        batch_size: int = 32,
        verbose: Any = 0,
        steps: int | None = None,
        callbacks: Sequence[callbacks_lib.Callback] | None = None,
        steps_per_execution: Any = "auto",
        run_eagerly: bool = False,
    ) -> Any:
        """Model outputs in inference mode, exactly one row per input row.

        For a deterministic forward, equal to ``model.apply_fn(model.eval_params,
        model.state, x)`` on the whole input (see the class docs for randomness);
        ``eval_params`` is ``params`` unless ``ema`` is set or the optimizer is
        schedule-free.

        Args:
          x: an array, a pytree of arrays, or an iterable of input batches. An iterable's
            tuple or list items are read as ``(x, y[, w])`` and their first element is
            used, so multi-input batches from an iterable should be dicts.
          batch_size: rows per batch (arrays only).
          verbose: 0 (default), ``"auto"``, 1 (a progress bar) or 2.
          steps: predict at most this many batches.
          callbacks: callbacks whose ``on_predict_*`` hooks are called;
            ``on_predict_batch_end`` gets ``{"outputs": ...}`` of that execution.
          steps_per_execution: ``"auto"`` or batches per compiled call (see ``fit``).
          run_eagerly: run op by op, without jit (see :meth:`fit`).

        Returns:
          A numpy array (or a pytree of them, as the forward returns).
        """
        data_lib.check_present(x, "x")
        batch_size = _args.positive_int(batch_size, "batch_size")
        steps = None if steps is None else _args.positive_int(steps, "steps")
        _args.check_steps_per_execution(steps_per_execution)
        verbose = callbacks_lib.resolve_verbose(verbose)
        cbs = runs.callback_list(callbacks or [], self, verbose, {"steps": steps})
        return runs.predict(
            self._context(), x, batch_size, steps, cbs, steps_per_execution, progress=verbose == 1
        )

    # --- single batches -----------------------------------------------------------------

    @_transactional
    def train_on_batch(
        self, x: Any, y: Any, *, sample_weight: Any = None, class_weight: dict | None = None
    ) -> dict[str, float]:
        """One optimizer step on one batch; returns that batch's loss and metrics.

        ``class_weight`` may name classes that this batch lacks (unlike ``fit``, which
        refuses classes absent from the whole dataset).
        """
        data_lib.check_present(x, "x")
        return runs.train_on_batch(self._context(), x, y, sample_weight, class_weight)

    @_transactional
    def test_on_batch(self, x: Any, y: Any, *, sample_weight: Any = None) -> dict[str, float]:
        """Loss and metrics of one batch in inference mode."""
        data_lib.check_present(x, "x")
        self._require_objective("test_on_batch")
        return runs.test_on_batch(self._context(), x, y, sample_weight)

    @_transactional
    def predict_on_batch(self, x: Any) -> Any:
        """Outputs for one batch (numpy), drawing batch 0's inference key."""
        data_lib.check_present(x, "x")
        return runs.predict_on_batch(self._context(), x)

    # --- save / load --------------------------------------------------------------------

    def _save(self, path: str, weights_only: bool) -> None:
        saving.save(path, **self._save_contents(weights_only))

    def _save_contents(self, weights_only: bool) -> dict[str, Any]:
        # History runs after the other callbacks: a save from one of them includes the
        # epoch that is ending
        epochs, values = self.history.including(*(self._epoch_logs or (None, None)))
        position = None
        if self._position is not None and not weights_only:  # inside an epoch of fit
            position = position_lib.encode(self._position)
        progress = saving.Progress(self.epoch, self._epochs_trained, epochs, values, position)
        ts = self._require_built("save_weights" if weights_only else "save")
        if weights_only:  # for inference: a schedule-free optimizer's evaluation params
            ts = ts._replace(params=self.eval_params)
        return {
            "ts": ts,
            "weights_only": weights_only,
            "input_spec": self._input_spec,
            "seed": self._key,
            "progress": progress,
        }

    def snapshot(self, *, weights_only: bool = False) -> Snapshot:
        """A host copy of what :meth:`save` (or :meth:`save_weights`) would write now.

        ``snapshot().write(path)`` writes the file later, e.g. from another thread while
        training goes on (``ModelCheckpoint(asynchronous=True)`` does that): the arrays
        are copied off the device first, so later training steps cannot change them.
        """
        return Snapshot.take(**self._save_contents(weights_only))

    def _load(self, path: str, weights_only: bool) -> None:
        # The whole file is read and checked first; the model changes once, at the end.
        meta, arrays, spec = saving.read(path, weights_only=weights_only)
        before = self._input_spec, self._slot.ts
        try:
            if not self.built:
                if spec is None:
                    raise ValueError(
                        f"Loading {path!r} into a model without parameters needs the "
                        "input spec stored in the checkpoint, and this one has none. "
                        "Call `model.init(x)` with an example batch first."
                    )
                try:  # shapes first, abstractly: nothing is allocated if they differ
                    shapes = jax.eval_shape(
                        lambda x: self._forward.init(self._stream(_INIT), _init_view(x)), spec
                    )
                except Exception:  # a forward that reads values: `init` says what fails
                    shapes = None
                if shapes is not None:
                    saving.check_fits(path, meta, *shapes)
                self.init(saving.example(spec))
            live = self._require_built("load")
            ts, progress = saving.restore(
                path, meta, arrays, live, weights_only=weights_only, seed=self._key
            )
            if ts.opt_state is live.opt_state and optimizers_lib.is_schedule_free(ts.opt_state):
                # Its evaluation params depend on its state too: start it at the loaded params.
                ts = self._layout.place_state(ts._replace(opt_state=self.optimizer.init(ts.params)))
            elif ts.opt_state is live.opt_state and ema_lib.average(ts.opt_state) is not None:
                # The average restarts at the loaded params, which inference then uses.
                ts = self._layout.place_state(
                    ts._replace(opt_state=ema_lib.restart(ts.opt_state, ts.params))
                )
            resume = None
            if progress is not None and progress.position is not None:
                resume = position_lib.decode(progress.position, path)
        except BaseException:
            self._input_spec, self._slot.ts = before  # a fresh model stays fresh
            raise
        self._slot.ts = ts
        if progress is not None:
            self.epoch, self._epochs_trained = progress.epoch, progress.epochs_trained
            self.history.epoch, self.history.history = progress.history_epoch, progress.history
            self._resume = resume
            self.resume_point = None if resume is None else (resume.epoch, resume.batch)

    def save(self, path: str) -> None:
        """Writes the full training state to one file, atomically (see :mod:`hkfit.checkpoint`).

        Saves params, state, opt_state, rng, step, ``epoch`` and the history, plus the input
        spec so that :meth:`load` works on a fresh model. Arrays and JSON only, never pickle.
        """
        self._save(path, weights_only=False)

    def load(self, path: str) -> Model:
        """Restores a file written by :meth:`save` (also into a never-initialized model).

        A checkpoint saved with another optimizer (e.g. for inference or fine-tuning)
        restores params, state, step and history, and warns that the optimizer state
        starts fresh.

        A checkpoint written inside an epoch (``BackupAndRestore(save_freq=N)``, a
        preemption, ``ModelCheckpoint(save_freq=N)``) sets :attr:`resume_point` to
        ``(epoch, batches done)``; ``BackupAndRestore`` then makes ``fit`` continue at
        the next batch (``model.initial_batch``). One written between epochs of a ``fit``
        on an iterable that all epochs read on (``steps_per_epoch``), whose iterator has
        ``get_state``, sets it to ``(next epoch, 0)``: a ``fit`` that starts at that epoch
        sets the iterator to the saved state. Otherwise ``resume_point`` is None.

        Raises:
          ValueError: naming the first tree path that differs, or if the file is corrupted,
            holds pickled data or holds weights only.
        """
        self._load(path, weights_only=False)
        return self

    def save_weights(self, path: str) -> None:
        """Writes params and state only (atomically, arrays and JSON, never pickle).

        The params written are :attr:`eval_params`, the ones ``predict`` uses: with
        ``Model(ema=...)`` the average, for a schedule-free optimizer its evaluation params
        (``save`` keeps the training params and the optimizer state, to resume exactly).
        """
        self._save(path, weights_only=True)

    def load_weights(self, path: str) -> Model:
        """Restores params and state from a file written by :meth:`save_weights` or :meth:`save`.

        The optimizer state is kept, except a schedule-free optimizer's, whose evaluation
        params depend on it: it starts afresh at the loaded params (so ``predict`` runs
        with them). With ``Model(ema=...)`` the average restarts at the loaded params. From
        a full checkpoint the training params are read, not the average.
        """
        self._load(path, weights_only=True)
        return self

    def export(
        self,
        path: str,
        *,
        format: str = "stablehlo",
        batch_polymorphic: bool = True,
        batch_size: int | None = None,
        platforms: Sequence[str] | None = None,
    ) -> None:
        """Writes the inference function to one self-contained file (atomically).

        The function is ``x -> apply_fn(eval_params, state, x)`` (what ``predict``
        computes for a deterministic forward), with the params and state baked in as
        constants. ``format="stablehlo"`` serializes it with ``jax.export``; read it back
        with :func:`hkfit.load_exported`, which needs JAX but not the model's code.
        ``format="onnx"`` converts it with jax2onnx (``pip install "hkfit[onnx]"``) for
        onnxruntime: inputs ``x`` (or named after the input dict's keys), outputs ``y``.

        Args:
          path: the file to write, replaced atomically.
          format: ``"stablehlo"`` (default; needs ``pip install "hkfit[export]"``) or
            ``"onnx"``.
          batch_polymorphic: a symbolic batch dimension, so the file runs on any batch
            size (default); ``False`` fixes it to ``batch_size``.
          batch_size: the fixed batch size of a ``batch_polymorphic=False`` export
            (default 1).
          platforms: the platforms to lower a StableHLO export for, e.g.
            ``("cpu", "cuda")``; default: the platform JAX runs on now.

        Raises:
          ValueError: before the model has parameters, on invalid arguments, or if the
            forward cannot be traced with a symbolic batch size (export with
            ``batch_polymorphic=False``) or converted to ONNX.
          ImportError: when the extra the format needs is not installed.
        """
        self._require_built("export")
        export_lib.export(
            path,
            self.apply_fn,
            self.eval_params,
            self.state,
            self._input_spec,
            format=format,
            batch_polymorphic=batch_polymorphic,
            batch_size=batch_size,
            platforms=platforms,
        )

    def summary(self, print_fn: Any = print) -> str:
        """A table of modules, shapes and parameter counts (``hk.experimental.tabulate``).

        Returns (and prints with ``print_fn``, unless it is None) the table followed by the
        total parameter and state counts.
        """
        ts = self._require_built("summary")
        table = hk.experimental.tabulate(self._forward.transformed)(
            zeros_like_spec(self._input_spec)
        )
        text = (
            f"{table}\nTotal params: {_args.count(ts.params):,}\n"
            f"Total state: {_args.count(ts.state):,}\n"
        )
        if print_fn is not None:
            print_fn(text)
        return text


__all__ = ["Batch", "Model"]
