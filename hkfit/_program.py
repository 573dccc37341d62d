"""The compiled functions of one model: train, eval and predict; fused or step-wise.

A :class:`Program` is built from :mod:`hkfit.step`'s pure functions once the model knows
its metrics, and compiles each function once (per batch size, for the fused inference
loops). It also keeps the pacers of the model, which remember their timing across calls.

Inference draws its randomness per batch: batch ``b`` of an evaluate/predict run uses
``step.batch_key(inference_key, b)``, so a stochastic forward (a VAE's sampling) draws
fresh noise for every row whatever the batch size, and repeated calls are identical.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hkfit import _accumulate as accumulate
from hkfit import _custom as custom_lib
from hkfit import _eager as eager
from hkfit import _executables as executables
from hkfit import _pacing
from hkfit import step as step_lib
from hkfit._forward import Forward
from hkfit.step import Batch, TrainState


class Program:
    """Owns the jitted steps of one model.

    Args:
      forward: the model's pure functions (see ``hkfit._forward``).
      loss_fn: ``(y_true, y_pred) -> per-example losses``.
      optimizer: the Optax transformation.
      metrics: resolved metric objects, or ``None`` when no labels were seen yet (only
        the predict functions are available then).
      layout: where arrays live (see ``hkfit._layout``).
      inference_key: the key inference batches fold their index into.
      regularizer: ``params -> scalar`` added to the objective.
      custom_step: a user's ``(train_state, batch) -> (train_state, logs)``, which then
        trains instead of ``loss_fn`` (see ``hkfit._custom``).
      train_metrics: the logs of training when they differ from ``metrics`` (a custom
        step's); ``empty_logs`` / ``read_logs`` take ``train=True`` for them.
      loss_scaling: dynamic loss scaling of float16 compute (see ``hkfit._precision``).
    """

    def __init__(
        self,
        forward: Forward,
        loss_fn: Callable,
        optimizer: Any,
        metrics: Sequence[Any] | None,
        layout: Any,
        inference_key: jax.Array,
        *,
        regularizer: Callable[[Any], Any] | None = None,
        custom_step: Callable | None = None,
        train_metrics: Sequence[Any] | None = None,
        loss_scaling: Any = None,
    ):
        self.forward, self.loss_fn, self.optimizer = forward, loss_fn, optimizer
        self.loss_scaling = loss_scaling
        self.metrics = None if metrics is None else list(metrics)
        self.custom_step = custom_step
        self.train_metrics = None if train_metrics is None else list(train_metrics)
        # a batch's rows may be coupled: never pad them (see hkfit._custom)
        self.couples_rows = custom_step is not None or custom_lib.couples_rows(loss_fn)
        self.layout = layout
        self.inference_key = inference_key
        self.regularizer = regularizer
        self._jitted: dict[tuple, Callable] = {}
        self._pacers: dict[tuple, _pacing.Pacer] = {}
        self._loops_help: bool | None = None

    def _cached(self, key: tuple, build: Callable[[], Callable]) -> Callable:
        if key not in self._jitted:
            self._jitted[key] = build()
        return self._jitted[key]

    def _metric_list(self, train: bool = False) -> list:
        if train and self.train_metrics is not None:
            return self.train_metrics
        if self.metrics is None:
            raise ValueError(
                "Loss and metrics need labels: call `fit`, `evaluate` or "
                "`train_on_batch` with targets `y` first."
            )
        return self.metrics

    # --- Logs ---

    def empty_logs(self, train: bool = False) -> tuple:
        """Metric states of no example (of training with ``train``), placed by the layout.

        Every leaf is its own buffer (a metric's ``empty()`` may reuse one array for
        several fields), since the steps donate the logs.
        """
        logs = step_lib.empty_logs(self._metric_list(train))
        return self.layout.place_state(jax.tree_util.tree_map(np.array, logs))

    def read_logs(self, logs: tuple, train: bool = False) -> dict[str, float]:
        """Metric states -> Python floats (a device sync)."""
        return step_lib.compute_logs(jax.device_get(logs), self._metric_list(train))

    def read_train_logs(self, logs: tuple) -> dict[str, float]:
        """:meth:`read_logs` of training logs."""
        return self.read_logs(logs, train=True)

    # --- Training ---

    def _jit_train(self, step: Callable, ts: TrainState) -> Callable:
        kwargs: dict[str, Any] = {"donate_argnums": (0, 1)}
        shardings = self.layout.state_shardings(ts)
        if shardings is not None:  # pinned: unmatched parameters stay replicated
            logs = jax.tree_util.tree_map(lambda _: shardings.step, self.empty_logs(True))
            kwargs["out_shardings"] = (shardings, logs)
        return executables.shared(step, fixed=2, **kwargs)  # a rebuilt model: no compile

    def _train_step(self) -> Callable:
        if self.custom_step is not None:
            return custom_lib.make_train_step(
                self.custom_step, self._metric_list(True), step_lib.row_mask
            )
        return step_lib.make_train_step(
            self.forward.apply_train,
            self.loss_fn,
            self.optimizer,
            self._metric_list(),
            regularizer=self.regularizer,
            loss_scaling=self.loss_scaling,
        )

    def train_step(self, ts: TrainState) -> Callable:
        """``(ts, logs, batch) -> (ts, logs)`` for one batch (iterables, train_on_batch)."""
        return self._cached(("train",), lambda: self._jit_train(self._train_step(), ts))

    def grouped_train_step(self, ts: TrainState, steps: int) -> Callable:
        """``(ts, logs, batches) -> (ts, logs)``: one optimizer step over a tuple of batches.

        Gradient accumulation over an iterable's consecutive batches (see
        ``hkfit._accumulate``).
        """

        def build():
            step = accumulate.make_grouped_step(
                self.forward.apply_train,
                self.loss_fn,
                self.optimizer,
                self._metric_list(),
                steps=steps,
                regularizer=self.regularizer,
                loss_scaling=self.loss_scaling,
            )
            return self._jit_train(step, ts)

        return self._cached(("grouped", steps), build)

    def _batch_step(
        self, accumulation: tuple[int, int] | None, shard_batch: Callable | None
    ) -> tuple[Callable, Callable | None]:
        """``(step, shard_batch)``: the step of one batch (or macro-batch, cut into
        micro-batches that each get ``shard_batch``), and the layout left for its batch."""
        if accumulation is None:
            return self._train_step(), shard_batch
        steps, micro_batch_size = accumulation
        step = accumulate.make_accumulating_step(
            self.forward.apply_train,
            self.loss_fn,
            self.optimizer,
            self._metric_list(),
            steps=steps,
            micro_batch_size=micro_batch_size,
            regularizer=self.regularizer,
            shard_batch=shard_batch,  # each micro-batch's
            unroll=self._loops_help is False,  # e.g. convolutions on CPU
            loss_scaling=self.loss_scaling,
        )
        return step, None

    def train_run(
        self,
        ts: TrainState,
        fuse: bool,
        accumulation: tuple[int, int] | None = None,
        *,
        blocked: bool = False,
    ) -> Callable:
        """``(ts, logs, data, idx, start, count) -> (ts, logs)`` over device-resident rows.

        With ``accumulation=(steps, micro_batch_size)`` each batch of ``idx`` is a
        macro-batch, cut into micro-batches whose gradients are accumulated into one
        optimizer step (see ``hkfit._accumulate``). ``blocked``: the rows are in
        per-device blocks (see :func:`hkfit.step.make_fused_train`).
        """

        def build():
            options = self.layout.step_options("train_blocks" if blocked else "train")
            step, options["shard_batch"] = self._batch_step(
                accumulation, options.get("shard_batch")
            )
            if blocked:
                options.update(blocked=True, groups=accumulation[0] if accumulation else 1)
            run = step_lib.make_fused_train(step, fuse=fuse, **options)
            return self._jit_train(run, ts)

        return self._cached(("train_run", fuse, accumulation, blocked), build)

    def train_batches_run(
        self, ts: TrainState, fuse: bool, accumulation: tuple[int, int] | None = None
    ) -> Callable:
        """``(ts, logs, batches, start, count) -> (ts, logs)`` over batches already cut.

        ``batches`` holds ``[k, batch_size, ...]`` rows: a chunk of training data streamed
        from the host (``hkfit._stream``); see :func:`hkfit.step.make_fused_train_batches`.
        ``accumulation=(steps, micro_batch_size)``: each batch is a macro-batch whose
        micro-batches' gradients make one optimizer step, as in :meth:`train_run`.
        """

        def build():
            shard_batch = self.layout.step_options("train").get("shard_batch")
            step, shard_batch = self._batch_step(accumulation, shard_batch)
            run = step_lib.make_fused_train_batches(step, fuse=fuse, shard_batch=shard_batch)
            return self._jit_train(run, ts)

        return self._cached(("train_batches_run", fuse, accumulation), build)

    # --- Inference ---

    def apply_eval(self, params, state, rng, x):
        return self.forward.apply_eval(params, state, rng, x)

    def _keyed_eval_step(self) -> Callable:
        return step_lib.make_eval_step(
            self.apply_eval,
            self.loss_fn,
            self._metric_list(),
            keyed=True,
            regularizer=self.regularizer,
        )

    def eval_step(self) -> Callable:
        """``(params, state, logs, batch, index) -> logs`` for batch ``index`` of a run."""

        def build():
            step = self._keyed_eval_step()
            key = self.inference_key
            return jax.jit(
                lambda params, state, logs, batch, index: step(
                    params, state, logs, batch, step_lib.batch_key(key, index)
                ),
                donate_argnums=(2,),
            )

        return self._cached(("eval",), build)

    def eval_run(self, batch_size: int, fuse: bool, *, blocked: bool = False) -> Callable:
        """``(params, state, offset, logs, data, start, count) -> logs`` over rows of data
        (in per-device blocks with ``blocked``)."""

        def build():
            step = self._keyed_eval_step()
            options = self.layout.step_options("eval_blocks" if blocked else "eval")
            if self.couples_rows and "multiple" in options:  # never pad a batch of coupled
                options["multiple"] = 1  # rows for the devices: it runs whole, unsplit
            run = step_lib.make_fused_eval(step, batch_size, fuse, keyed=True, **options)
            return self._jit_keyed(run)

        return self._cached(("eval_run", batch_size, fuse, blocked), build)

    def predict_step(self) -> Callable:
        """``(params, state, x, index) -> y`` for batch ``index`` of a run."""

        def build():
            step = step_lib.make_predict_step(self.apply_eval, keyed=True)
            key = self.inference_key
            return jax.jit(
                lambda params, state, x, index: step(
                    params, state, x, step_lib.batch_key(key, index)
                )
            )

        return self._cached(("predict",), build)

    def predict_run(self, batch_size: int, fuse: bool) -> Callable:
        """``(params, state, offset, out, x, start, count) -> out`` writing rows of ``out``."""

        def build():
            step = step_lib.make_predict_step(self.apply_eval, keyed=True)
            run = step_lib.make_fused_predict(
                step, batch_size, fuse, keyed=True, **self.layout.step_options("predict")
            )
            return self._jit_keyed(run)

        return self._cached(("predict_run", batch_size, fuse), build)

    def _jit_keyed(self, run: Callable) -> Callable:
        """Jits a keyed fused run with the inference key bound; its carry is donated."""
        key = self.inference_key
        return executables.shared(
            lambda params, state, offset, carry, data, start, count: run(
                params, state, key, offset, carry, data, start, count
            ),
            fixed=2,
            donate_argnums=(3,),
        )

    def output_spec(self, params, state, x) -> Any:
        """Shapes and dtypes of the forward's output for the batch ``x`` (no compute)."""
        return eager.shape_of(self.apply_eval, params, state, self.inference_key, x)

    # --- Pacing ---

    def loops_help(self, params, state, example) -> bool:
        """Whether fusing steps into a compiled loop pays off here (see ``hkfit._pacing``)."""
        if self._loops_help is None:
            self._loops_help = _pacing.loops_help(
                self.apply_eval,
                params,
                state,
                self.inference_key,
                example,
                platform=self.layout.platform,
            )
        return self._loops_help

    def pacer(self, kind: str, steps_per_execution: Any, fuse_auto: bool) -> _pacing.Pacer:
        """The pacer of ``kind`` (kept across calls: it remembers its timing)."""
        key = (kind, steps_per_execution, fuse_auto)
        if key not in self._pacers:
            self._pacers[key] = _pacing.Pacer(
                steps_per_execution, fuse_auto=fuse_auto, compare=kind == "train"
            )
        return self._pacers[key]


def zeros_like_spec(spec: Any) -> Any:
    """Zeros with the shapes and dtypes of a pytree of ``jax.ShapeDtypeStruct``."""
    return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), spec)


__all__ = ["Batch", "Program", "zeros_like_spec"]
