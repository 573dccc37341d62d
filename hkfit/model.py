"""``hkfit.Model``: a thin stateful shell around pure, jitted steps.

The model holds a :class:`hkfit.step.TrainState` and runs loops and callbacks; all the
maths lives in :mod:`hkfit.step`. See ``Model`` for the public API.
"""

from __future__ import annotations

import warnings
from typing import Any, Iterable, Sequence

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from hkfit import callbacks as callbacks_lib
from hkfit import checkpoint as checkpoint_lib
from hkfit import _data as data_lib
from hkfit import _forward as forward_lib
from hkfit import inference
from hkfit import losses as losses_lib
from hkfit import metrics as metrics_lib
from hkfit import optimizers as optimizers_lib
from hkfit import step as step_lib
from hkfit.epochs import ArraySource as _ArraySource
from hkfit.epochs import IterableSource as _IterableSource
from hkfit import _pacing as pacing
from hkfit._pacing import Pacer
from hkfit.step import Batch, TrainState

# Distinct streams derived from the seed key.
_INIT, _TRAIN, _SHUFFLE, _INFER = range(4)


def _compile_once(fn, *args):
    """Runs ``fn(*args)`` jitted; on CPU compiled with few optimizations (it runs once).

    Initialization runs once per model, so its compile time matters more than its speed:
    XLA's backend optimizations make it about 3x slower to compile on CPU.
    """
    jitted = jax.jit(fn)
    if jax.default_backend() == "cpu":
        try:
            return jitted.lower(*args).compile(
                compiler_options={"xla_backend_optimization_level": 0})(*args)
        except Exception:  # an older JAX without compiler_options: compile normally
            pass
    return jitted(*args)


def _train_state_field(name: str):
    """Getter and setter of one field of the model's :class:`TrainState`."""

    def get(model):
        return getattr(model._require_built(name), name)

    def set_(model, value):
        model._ts = model._require_built(name)._replace(**{name: value})

    return get, set_, None, f"The model's current ``{name}`` (see :class:`hkfit.step.TrainState`)."


def _to_key(seed: Any) -> jax.Array:
    """An int seed or a (typed or raw uint32) JAX key -> a typed key."""
    if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
        return jax.random.key(int(seed))
    if isinstance(seed, jax.Array):
        if jnp.issubdtype(seed.dtype, jax.dtypes.prng_key):
            return seed
        if seed.dtype == jnp.uint32 and seed.shape == (2,):
            return jax.random.wrap_key_data(seed)
    raise TypeError("Expected `seed` to be an int or a JAX PRNG key. "
                    f"Received: seed={seed!r} of type {type(seed).__name__}.")


class Model:
    """Keras-style training for a Haiku forward function.

    Args:
      forward: a function using Haiku modules, called with ONE argument ``x`` (an array or
        any pytree), plus ``is_training`` when it declares that parameter (``True`` in fit,
        ``False`` in evaluate/predict); or an ``hk.Transformed`` / ``hk.TransformedWithState``
        called as ``apply(params, [state,] rng, x)``.
      loss: a name from ``hkfit.losses.names()`` or ``(y_true, y_pred) -> [batch]`` losses.
      optimizer: an ``optax.GradientTransformation`` or ``"adam"``, ``"adamw"``, ``"sgd"``,
        ``"rmsprop"`` (built with ``optax.inject_hyperparams``, default learning rates).
      metrics: names, callables ``(y_true, y_pred) -> [batch]`` or metric objects.
      seed: an int or a JAX key; the same seed and data give bit-identical results.
      distribution: ``None`` (one device) or a distribution strategy such as
        ``hkfit.DataParallel()``.

    Parameters are created lazily from the first batch (or by :meth:`init`).

    Note:
      Training steps donate the previous train state to XLA, so arrays read from
      ``model.params`` before a ``fit`` may be invalidated by it; copy them
      (``jax.tree_util.tree_map(jnp.copy, model.params)``) to keep a snapshot.
    """

    def __init__(self, forward: Any, *, loss: Any, optimizer: Any = "adam",
                 metrics: Sequence[Any] = (), seed: Any = 0, distribution: Any = None):
        self._forward = forward_lib.wrap(forward)
        self._loss_name = loss if isinstance(loss, str) else None
        self.loss = loss
        self._loss_fn = losses_lib.get(loss)
        self.optimizer = optimizers_lib.get(optimizer)
        if isinstance(metrics, (str, bytes)) or not isinstance(metrics, Iterable):
            raise TypeError("Expected `metrics` to be a list of names, callables or metric "
                            f"objects. Received: metrics={metrics!r}.")
        self._metric_specs = list(metrics)
        for spec in self._metric_specs:  # fail fast on unknown names
            metrics_lib.get(spec)
        self._key = _to_key(seed)
        self.distribution = distribution
        self._ts: TrainState | None = None
        self._metrics: list | None = None
        self._input_spec = None
        self._fns: dict[str, Any] = {}
        self._pacers: dict[str, Pacer] = {}
        self.history = callbacks_lib.History()
        self.stop_training = False
        self.epoch = 0  # the number of epochs completed, as fit counts them

    # --- State --------------------------------------------------------------------------

    def _stream(self, which: int) -> jax.Array:
        return jax.random.fold_in(self._key, which)

    def _stream_shuffle(self) -> jax.Array:
        """The key each epoch's shuffle is folded from (with the epoch index)."""
        return self._stream(_SHUFFLE)

    @property
    def built(self) -> bool:
        return self._ts is not None

    def _require_built(self, what: str) -> TrainState:
        if self._ts is None:
            raise ValueError(f"`{what}` needs parameters: call `fit`, `init(x)` or `load` first.")
        return self._ts

    params = property(*_train_state_field("params"))
    state = property(*_train_state_field("state"))
    opt_state = property(*_train_state_field("opt_state"))

    @property
    def step(self) -> int:
        return 0 if self._ts is None else int(self._ts.step)

    @property
    def train_state(self) -> TrainState:
        """The whole :class:`TrainState` (params, state, opt_state, rng, step)."""
        return self._require_built("train_state")

    @train_state.setter
    def train_state(self, value: TrainState):
        self._ts = value

    @property
    def metrics(self) -> list:
        """The resolved metric objects (empty until the model sees labels)."""
        return list(self._metrics or [])

    def apply_fn(self, params, state, x):
        """Pure inference: ``apply_fn(model.params, model.state, x) -> y``.

        Runs the forward in inference mode (``is_training=False``), with a fixed key
        derived from the seed for any layer that draws one. It composes with ``jax.jit``,
        ``jax.vmap``, ``jax.grad``, ``jax.jacrev`` and ``jax.jacfwd``.
        """
        return self._forward.apply_eval(params, state, self._stream(_INFER), x)

    def vmap(self, in_axes: Any, out_axes: Any = -1) -> "Model":
        """A view of this model whose predict/evaluate vmap ``apply_fn`` inside each batch.

        The view shares this model's parameters and state (read at call time, never
        copied). Axes count the batch axis 0, which can be neither mapped nor an output
        axis. See :class:`hkfit.multiview.ModelView`.

        >>> # x.shape == (n, 16, 16, 3, 5): 5 views on the last axis
        >>> # model.vmap(in_axes=4, out_axes=4).predict(x)[..., v] == model.predict(x[..., v])

        Raises:
          ValueError / TypeError: if an axis is 0 or not an int / None.
        """
        from hkfit.multiview import ModelView  # multiview imports this module
        return ModelView(self, in_axes, out_axes)

    def init(self, x: Any) -> "Model":
        """Creates parameters, state and optimizer state from an example batch ``x``.

        Does nothing if the model already has parameters.
        """
        if self._ts is None:
            x = data_lib.to_numpy(x)
            sample = data_lib.take_rows(x, 0, min(8, data_lib.num_rows(x, "x")))
            params, state = _compile_once(self._forward.init, self._stream(_INIT), sample)
            self._input_spec = jax.tree_util.tree_map(
                lambda a: jax.ShapeDtypeStruct((1, *a.shape[1:]), a.dtype), sample)
            opt_state = self.optimizer.init(params)
            self._ts = self._place(TrainState(params, state, opt_state, self._stream(_TRAIN),
                                              jnp.zeros((), jnp.int32)))
        return self

    def _place(self, tree):
        """Puts model state on the device(s) the distribution asks for."""
        if self.distribution is not None:
            return self.distribution.replicate(tree)
        return tree

    def _place_rows(self, tree):
        """Puts a dataset (rows on axis 0) where the distribution asks for it."""
        if self.distribution is not None:
            return self.distribution.place_dataset(tree)
        return jax.device_put(tree)

    def _build(self, x, y) -> None:
        """Initializes if needed, resolves metrics and checks ``forward``'s output against ``y``."""
        self.init(x)
        sample_x = data_lib.take_rows(x, 0, 2)
        out = jax.eval_shape(self.apply_fn, self.params, self.state, sample_x)
        if y is None:
            return
        sample_y = data_lib.take_rows(y, 0, 2)
        losses_lib.check_output(self.loss, out, sample_y)
        if self._metrics is None:
            out_shape = getattr(out, "shape", ())
            y_shape = np.shape(sample_y) if data_lib.is_array(sample_y) else ()
            self._metrics = [metrics_lib.get(m, y_true_shape=y_shape, y_pred_shape=out_shape,
                                             loss_name=self._loss_name)
                             for m in self._metric_specs]

    # --- Compiled functions, built once per model ----------------------------------------

    def _fn(self, name: str):
        if name not in self._fns:
            self._fns[name] = self._make(name)
        return self._fns[name]

    def _apply_eval(self, params, state, x):
        return self.apply_fn(params, state, x)

    def _make(self, name: str):
        metrics = self._metrics or []
        if name.startswith("train"):
            step = step_lib.make_train_step(self._forward.apply_train, self._loss_fn,
                                            self.optimizer, metrics)
            if name != "train":  # "train_fused" or "train_stepwise"
                layout = (self.distribution.step_options("train")
                          if self.distribution is not None else {})
                step = step_lib.make_fused_train(step, fuse=name == "train_fused", **layout)
            return jax.jit(step, donate_argnums=(0, 1))
        if name == "eval":
            return jax.jit(step_lib.make_eval_step(self._apply_eval, self._loss_fn, metrics),
                           donate_argnums=(2,))
        if name == "predict":
            return jax.jit(step_lib.make_predict_step(self._apply_eval))
        raise KeyError(name)

    def _fused(self, name: str, batch_size: int, fuse: bool = True):
        """The jitted many-batches-per-call eval or predict function for ``batch_size``."""
        key = f"{name}_fused/{batch_size}/{fuse}"
        if key not in self._fns:
            layout = {} if self.distribution is None else self.distribution.step_options(name)
            if name == "eval":
                run = step_lib.make_fused_eval(
                    step_lib.make_eval_step(self._apply_eval, self._loss_fn, self._metrics or []),
                    batch_size, fuse, **layout)
            else:
                run = step_lib.make_fused_predict(step_lib.make_predict_step(self._apply_eval),
                                                  batch_size, fuse, **layout)
            self._fns[key] = jax.jit(run, donate_argnums=(2,))
        return self._fns[key]

    def _loops_help(self) -> bool:
        """Whether fusing steps into a compiled loop pays off for this model (see pacing)."""
        if "loops_help" not in self._fns:
            ts = self._require_built("fit")
            example = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), self._input_spec)
            platform = (self.distribution.platform if hasattr(self.distribution, "platform")
                        else None)
            self._fns["loops_help"] = pacing.loops_help(
                self._forward.apply_eval, ts.params, ts.state, self._stream(_INFER), example,
                platform=platform)
        return self._fns["loops_help"]

    def _pacer(self, kind: str, steps_per_execution: Any) -> Pacer:
        """The model's pacer for ``kind`` (kept across calls: it remembers its timing)."""
        pacing.check(steps_per_execution)
        key = (kind, steps_per_execution)
        if key not in self._pacers:
            self._pacers[key] = Pacer(steps_per_execution, fuse_auto=self._loops_help())
        return self._pacers[key]

    def _empty_logs(self):
        return self._place(step_lib.empty_logs(self._metrics or []))

    def _read_logs(self, logs) -> dict[str, float]:
        return step_lib.compute_logs(jax.device_get(logs), self._metrics or [])

    # --- fit ----------------------------------------------------------------------------

    def fit(self, x: Any, y: Any = None, *, batch_size: int = 32, epochs: int = 1,
            verbose: Any = "auto", callbacks: Sequence[callbacks_lib.Callback] | None = None,
            validation_split: float = 0.0, validation_data: Any = None, shuffle: bool = True,
            class_weight: dict | None = None, sample_weight: Any = None, initial_epoch: int = 0,
            steps_per_epoch: int | None = None, validation_batch_size: int | None = None,
            validation_freq: Any = 1, steps_per_execution: Any = "auto",
            check_inputs: bool = True) -> callbacks_lib.History:
        """Trains for the epochs numbered ``initial_epoch, ..., epochs - 1``.

        Args:
          x: inputs (an array or a pytree of arrays with the same number of rows), or an
            iterable yielding ``(x, y)`` / ``(x, y, sample_weight)`` batches.
          y: targets (array or pytree); ``None`` when ``x`` is an iterable.
          batch_size: rows per training batch (arrays only). The last partial batch of an
            epoch is trained on as is (never padded, so BatchNorm statistics stay right).
          epochs: the epoch count to reach, as in Keras.
          verbose: ``"auto"`` (1 on a terminal or in a notebook, else 2), 0 silent, 1 a
            progress bar on stderr, 2 one line per epoch on stdout.
          callbacks: :class:`hkfit.callbacks.Callback` instances.
          validation_split: fraction of the arrays, taken from the END before shuffling,
            held out for validation.
          validation_data: ``(x_val, y_val)``, ``(x_val, y_val, w_val)`` or an iterable.
          shuffle: shuffle the rows each epoch (deterministic from seed and epoch).
          class_weight: ``{class: weight}`` multiplying each row's weight (arrays only).
          sample_weight: per-row weights, shape ``[rows]``.
          initial_epoch: index of the first epoch to run (to resume).
          steps_per_epoch: batches per epoch; bounds an infinite iterable. With arrays, at
            most this many batches of each epoch's order are used.
          validation_batch_size: batch size for validation (default ``batch_size``).
          validation_freq: validate every N epochs (int) or after the listed 1-based epochs.
          steps_per_execution: ``"auto"`` or the number of batches fused into one compiled
            call (``lax.fori_loop`` over device-resident data). Batch callbacks fire once
            per call. Results do not depend on it.
          check_inputs: refuse NaN/Inf in array ``x``/``y`` (one cheap host pass).

        Returns:
          The :class:`hkfit.callbacks.History` of this call (also ``model.history``).

        Raises:
          ValueError / TypeError: on invalid arguments or data, before any step runs.
        """
        batch_size = data_lib.positive_int(batch_size, "batch_size")
        epochs = data_lib.positive_int(epochs, "epochs", 0)
        initial_epoch = data_lib.positive_int(initial_epoch, "initial_epoch", 0)
        if epochs < initial_epoch:
            raise ValueError(f"Expected `epochs` >= `initial_epoch` (epochs is the epoch count "
                             f"to reach). Received: epochs={epochs}, initial_epoch={initial_epoch}.")
        if steps_per_epoch is not None:
            steps_per_epoch = data_lib.positive_int(steps_per_epoch, "steps_per_epoch")
        if not isinstance(validation_split, (int, float)) or not 0 <= validation_split < 1:
            raise ValueError("Expected `validation_split` in [0, 1). "
                             f"Received: validation_split={validation_split!r}.")
        validation_batch_size = data_lib.positive_int(validation_batch_size or batch_size,
                                                    "validation_batch_size")
        validation_freq = _validation_epochs(validation_freq)
        verbose = callbacks_lib.resolve_verbose(verbose)
        pacing.check(steps_per_execution)

        if y is None and not isinstance(x, dict) and not data_lib.is_array(x):
            if validation_split:
                raise ValueError("`validation_split` needs array inputs; with an iterable `x` "
                                 "pass `validation_data` instead. Received: validation_split="
                                 f"{validation_split}.")
            if class_weight is not None or sample_weight is not None:
                raise ValueError("`class_weight` and `sample_weight` need array inputs; an iterable "
                                 "`x` yields (x, y, sample_weight) batches instead.")
            source = _IterableSource(self, x, steps_per_epoch)
        else:
            if y is None:
                raise ValueError("Expected targets `y` for array inputs `x`. Received: y=None.")
            source = _ArraySource(self, x, y, sample_weight, class_weight, batch_size, shuffle,
                                  steps_per_epoch, validation_split, check_inputs,
                                  steps_per_execution)
            if validation_split:
                validation_data = source.validation
        val = None
        if validation_data is not None:
            val = inference.evaluation_source(self, validation_data, validation_batch_size,
                                              check_inputs)

        history = callbacks_lib.History()
        cbs = callbacks_lib.CallbackList(
            [history, *(callbacks or []), *([callbacks_lib.ProgressBar(verbose)] if verbose else [])],
            model=self, params={"epochs": epochs, "steps": source.steps, "verbose": verbose})
        self.history = history
        self.stop_training = False
        batch_logs = cbs.wants_batch_logs()
        cbs.on_train_begin()
        resume_epoch = getattr(self, "_resume_epoch", None)  # set by BackupAndRestore
        if resume_epoch is not None:
            self._resume_epoch = None
            initial_epoch = max(initial_epoch, int(resume_epoch))
        epoch_logs: dict = {}
        for epoch in range(initial_epoch, epochs):
            if self.stop_training:
                break
            cbs.on_epoch_begin(epoch)
            logs = source.run_epoch(epoch, cbs, batch_logs, verbose == 1)
            if logs is None:
                warnings.warn(f"The data ran out before epoch {epoch + 1} could start; training "
                              "stops here. Pass a re-iterable source, or set `steps_per_epoch` "
                              "and make the iterable yield enough batches for all epochs.",
                              stacklevel=2)
                break
            epoch_logs = logs
            if val is not None and epoch + 1 in validation_freq(epoch + 1):
                val_logs = inference.evaluate(self, val)
                epoch_logs.update({f"val_{k}": v for k, v in val_logs.items()})
            learning_rate = optimizers_lib.learning_rate(self._ts.opt_state)
            if learning_rate is not None:
                epoch_logs["learning_rate"] = learning_rate
            self.epoch = epoch + 1
            cbs.on_epoch_end(epoch, epoch_logs)
            if source.exhausted:
                break
        cbs.on_train_end(epoch_logs)
        return history

    # --- evaluate / predict -------------------------------------------------------------

    def _device_batch(self, batch):
        if self.distribution is not None:
            return self.distribution.device_batch(batch)
        return data_lib.device_batch(batch)

    def evaluate(self, x: Any, y: Any = None, *, batch_size: int = 32, verbose: Any = "auto",
                 sample_weight: Any = None, steps: int | None = None,
                 callbacks: Sequence[callbacks_lib.Callback] | None = None,
                 steps_per_execution: Any = "auto", check_inputs: bool = True) -> dict[str, float]:
        """Loss and metrics over every row of ``x`` (weighted by ``sample_weight``).

        Exact: the last partial batch is padded with zero-weight rows, never dropped.

        Args:
          x: inputs (array or pytree of arrays), or an iterable of ``(x, y[, w])`` batches.
          y: targets for array inputs.
          batch_size: rows per batch (arrays only).
          verbose: ``"auto"``, 0, 1 (a progress bar on stderr) or 2 (one line on stdout).
          sample_weight: per-row weights, shape ``[rows]``.
          steps: evaluate at most this many batches.
          callbacks: callbacks whose ``on_test_*`` hooks are called.
          steps_per_execution: ``"auto"`` or batches per compiled call (see ``fit``).
          check_inputs: refuse NaN/Inf in array inputs.

        Returns:
          ``{"loss": ..., "<metric>": ...}`` as Python floats.
        """
        batch_size = data_lib.positive_int(batch_size, "batch_size")
        if steps is not None:
            steps = data_lib.positive_int(steps, "steps")
        verbose = callbacks_lib.resolve_verbose(verbose)
        source = inference.evaluation_source(self, x, batch_size, check_inputs, y, sample_weight,
                                             stream=True)
        self._require_built("evaluate")
        cbs = self._inference_callbacks(callbacks, verbose, inference.num_batches(source, steps))
        cbs.on_test_begin()
        logs = inference.evaluate(self, source, cbs, steps_per_execution, steps)
        cbs.on_test_end(logs)
        return logs

    def predict(self, x: Any, *, batch_size: int = 32, verbose: Any = 0, steps: int | None = None,
                callbacks: Sequence[callbacks_lib.Callback] | None = None,
                steps_per_execution: Any = "auto") -> Any:
        """Model outputs in inference mode, exactly one row per input row.

        Equal to ``model.apply_fn(model.params, model.state, x)`` on the whole input.

        Args:
          x: an array, a pytree of arrays, or an iterable of input batches. An iterable's
            tuple or list items are read as ``(x, y[, w])`` and their first element is
            used, so multi-input batches from an iterable should be dicts.
          batch_size: rows per batch (arrays only).
          verbose: 0 (default), ``"auto"``, 1 (a progress bar) or 2.
          steps: predict at most this many batches.
          callbacks: callbacks whose ``on_predict_*`` hooks are called.
          steps_per_execution: ``"auto"`` or batches per compiled call (see ``fit``).

        Returns:
          A numpy array (or a pytree of them, as the forward returns).
        """
        batch_size = data_lib.positive_int(batch_size, "batch_size")
        if steps is not None:
            steps = data_lib.positive_int(steps, "steps")
        verbose = callbacks_lib.resolve_verbose(verbose)
        cbs = self._inference_callbacks(callbacks, verbose, steps)
        cbs.on_predict_begin()
        if data_lib.is_array_tree(x):
            out = inference.predict_arrays(self, data_lib.to_numpy(x), batch_size, steps, cbs,
                                           steps_per_execution)
        else:
            out = inference.predict_iterable(self, x, steps, cbs)
        cbs.on_predict_end()
        return out

    def _inference_callbacks(self, callbacks, verbose: int, steps: int | None):
        bar = [callbacks_lib.ProgressBar(verbose)] if verbose else []
        return callbacks_lib.CallbackList([*(callbacks or []), *bar], model=self,
                                          params={"verbose": verbose, "steps": steps})

    # --- single batches -----------------------------------------------------------------

    def train_on_batch(self, x: Any, y: Any, *, sample_weight: Any = None,
                       class_weight: dict | None = None) -> dict[str, float]:
        """One optimizer step on one batch; returns that batch's loss and metrics."""
        x, y, n = data_lib.checked_arrays(x, y, check_inputs=False)
        self._build(x, y)
        weights = data_lib.row_weights(n, y, sample_weight, class_weight)
        self._ts, logs = self._fn("train")(self._ts, self._empty_logs(),
                                           Batch(*self._device_batch((x, y, weights))))
        return self._read_logs(logs)

    def test_on_batch(self, x: Any, y: Any, *, sample_weight: Any = None) -> dict[str, float]:
        """Loss and metrics of one batch in inference mode."""
        x, y, n = data_lib.checked_arrays(x, y, check_inputs=False)
        self._build(x, y)
        weights = data_lib.row_weights(n, y, sample_weight, None)
        logs = self._fn("eval")(self._ts.params, self._ts.state, self._empty_logs(),
                                Batch(*self._device_batch((x, y, weights))))
        return self._read_logs(logs)

    def predict_on_batch(self, x: Any) -> Any:
        """Outputs for one batch (numpy)."""
        x = data_lib.to_numpy(x)
        self.init(x)
        return jax.device_get(self._fn("predict")(self.params, self.state, x))

    # --- save / load --------------------------------------------------------------------

    def save(self, path: str) -> None:
        """Writes the full training state to one file, atomically (see :mod:`hkfit.checkpoint`).

        Saves params, state, opt_state, rng, step, ``epoch`` and the history, plus the input
        spec so that :meth:`load` works on a fresh model. Arrays and JSON only, never pickle.

        >>> # model.save("run/model.npz"); Model(forward, loss=...).load("run/model.npz")
        """
        checkpoint_lib.save_model(self, path)

    def load(self, path: str) -> "Model":
        """Restores a file written by :meth:`save` (also into a never-initialized model).

        Raises:
          ValueError: naming the first tree path that differs, or if the file is corrupted,
            holds pickled data or holds weights only.
        """
        checkpoint_lib.load_model(self, path)
        return self

    def save_weights(self, path: str) -> None:
        """Writes params and state only (atomically, arrays and JSON, never pickle)."""
        checkpoint_lib.save_model(self, path, weights_only=True)

    def load_weights(self, path: str) -> "Model":
        """Restores params and state from a file written by :meth:`save_weights` or :meth:`save`."""
        checkpoint_lib.load_model(self, path, weights_only=True)
        return self

    # --- summary ------------------------------------------------------------------------

    def summary(self, print_fn=print) -> str:
        """A table of modules, shapes and parameter counts (``hk.experimental.tabulate``).

        Returns (and prints with ``print_fn``, unless it is None) the table followed by the
        total parameter and state counts.
        """
        ts = self._require_built("summary")
        example = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), self._input_spec)
        table = hk.experimental.tabulate(self._forward.transformed)(example)
        count = lambda tree: sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(tree))
        text = (f"{table}\nTotal params: {count(ts.params):,}\n"
                f"Total state: {count(ts.state):,}\n")
        if print_fn is not None:
            print_fn(text)
        return text


def _validation_epochs(validation_freq: Any):
    """``validation_freq`` -> a function from a 1-based epoch to a container to test membership."""
    if isinstance(validation_freq, int) and not isinstance(validation_freq, bool):
        data_lib.positive_int(validation_freq, "validation_freq")
        return lambda e: (e,) if e % validation_freq == 0 else ()
    if isinstance(validation_freq, (list, tuple, set, range)):
        wanted = frozenset(int(e) for e in validation_freq)
        return lambda e: wanted
    raise TypeError("Expected `validation_freq` to be an int or a list of 1-based epochs. "
                    f"Received: validation_freq={validation_freq!r}.")
