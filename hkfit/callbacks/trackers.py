"""Experiment trackers: :class:`WandbLogger` (Weights & Biases) and :class:`MLflowLogger`.

Both are re-exported by :mod:`hkfit.callbacks`; import them from there. Each imports its
library, an optional extra, only when it is created. In a multi-process run only process
0 logs. Batch-level values (``update_freq``) follow :mod:`hkfit.callbacks.loggers`: no
extra device sync unless ``update_freq="batch"``.
"""

from __future__ import annotations

import time
from typing import Any

from hkfit.callbacks.base import Callback
from hkfit.callbacks.loggers import BatchCadence, check_update_freq, fit_params, scalars
from hkfit.distributed import is_main_process


class WandbLogger(Callback):
    """Logs to a Weights & Biases run (needs ``pip install hkfit[wandb]``).

    When ``fit`` starts, it logs to the current run (``wandb.run``) if there is one,
    and otherwise starts one with ``wandb.init(project=project, name=name,
    config=config, **init_kwargs)``, which it finishes when ``fit`` ends (marked failed,
    ``exit_code=1``, if ``fit`` raises). A run you started yourself is left open, so
    several ``fit`` calls can log to it. The run's config gets the fit's ``epochs``,
    ``steps_per_epoch``, ``batch_size`` (array inputs) and ``optimizer`` (when given by
    name), plus ``config``.

    Keys are those of W&B's Keras ``WandbMetricsLogger``: ``epoch/<name>`` for the epoch
    logs (``epoch/loss``, ``epoch/val_loss``, ``epoch/learning_rate``) against
    ``epoch/epoch`` (0-based), and ``batch/<name>`` (``update_freq``) against
    ``batch/batch_step`` (``model.step``).

    Args:
      project: the W&B project (``wandb.init``'s default when None).
      name: the run's name.
      config: hyperparameters to add to the run's config.
      update_freq: ``"epoch"``, ``"batch"`` or N (see :mod:`hkfit.callbacks.loggers`).
      **init_kwargs: more arguments for ``wandb.init`` (``dir``, ``mode``, ``tags``...).

    Raises:
      ImportError: if wandb is not installed.
      ValueError: for a bad ``update_freq``.
    """

    def __init__(
        self,
        project: str | None = None,
        *,
        name: str | None = None,
        config: dict | None = None,
        update_freq: Any = "epoch",
        **init_kwargs: Any,
    ):
        super().__init__()
        try:
            import wandb
        except ImportError as e:
            raise ImportError(
                "The WandbLogger callback needs wandb: `pip install hkfit[wandb]` "
                "(or `pip install wandb`)."
            ) from e
        self._wandb = wandb
        self.project, self.name, self.config = project, name, dict(config or {})
        self.update_freq = check_update_freq(update_freq)
        self._cadence = BatchCadence(update_freq)
        self.init_kwargs = init_kwargs
        self.run: Any = None
        self._owns_run = False

    def wants_batch_logs(self, hook: str | None = None) -> bool:
        return self._cadence.wants_batch_logs(hook)

    def on_train_begin(self, logs=None):
        self._cadence.reset()
        if not is_main_process():
            return
        wandb = self._wandb
        if wandb.run is not None:
            self.run, self._owns_run = wandb.run, False
        else:
            self.run = wandb.init(
                project=self.project, name=self.name, config=self.config, **self.init_kwargs
            )
            self._owns_run = True
        self.run.define_metric("epoch/epoch")
        self.run.define_metric("epoch/*", step_metric="epoch/epoch")
        if self.update_freq != "epoch":
            self.run.define_metric("batch/batch_step")
            self.run.define_metric("batch/*", step_metric="batch/batch_step")
        self.run.config.update({**fit_params(self.params), **self.config}, allow_val_change=True)

    def on_epoch_begin(self, epoch, logs=None):
        self._cadence.epoch_begin(self.model)

    def on_train_batch_end(self, batch, logs=None):
        step = self._cadence.due(batch, logs)
        if step is not None and self.run is not None:
            values = {f"batch/{k}": v for k, v in scalars(logs).items()}
            self.run.log({"batch/batch_step": step, **values})

    def on_epoch_end(self, epoch, logs=None):
        if self.run is not None:
            values = {f"epoch/{k}": v for k, v in scalars(logs).items()}
            self.run.log({"epoch/epoch": int(epoch), **values})

    def on_train_end(self, logs=None):
        self._end(0)

    def on_exception(self, exception):
        self._end(1)

    def _end(self, exit_code: int) -> None:
        run, self.run = self.run, None
        if run is not None and self._owns_run:
            run.finish(exit_code=exit_code)
        self._owns_run = False


class MLflowLogger(Callback):
    """Logs to an MLflow run (needs ``pip install hkfit[mlflow]``).

    When ``fit`` starts, it logs to the active run (``mlflow.active_run()``) if there is
    one, and otherwise starts one (``mlflow.start_run``) in ``experiment_name`` (created
    if needed; MLflow's default experiment when None) on the current tracking URI
    (``mlflow.set_tracking_uri`` or ``MLFLOW_TRACKING_URI``). A run it started ends with
    ``fit``: ``FINISHED``, or ``FAILED`` (``KILLED`` on ``KeyboardInterrupt``) if ``fit``
    raises; a run you started is left open.

    It logs the fit's ``epochs``, ``steps_per_epoch``, ``batch_size`` (array inputs) and
    ``optimizer`` (when given by name), plus ``hparams``, as run params (a param the run
    already has keeps its value: MLflow params cannot change). Epoch logs are metrics
    under their own names (``loss``, ``val_loss``, ``learning_rate``) at step = the
    0-based epoch; batch logs (``update_freq``) are ``batch_<name>`` at step
    ``model.step``.

    Args:
      experiment_name: the experiment of a run it starts.
      run_name: the name of a run it starts.
      tags: tags of a run it starts.
      hparams: more params to log.
      update_freq: ``"epoch"``, ``"batch"`` or N (see :mod:`hkfit.callbacks.loggers`).

    Raises:
      ImportError: if mlflow is not installed.
      ValueError: for a bad ``update_freq``.
    """

    def __init__(
        self,
        experiment_name: str | None = None,
        *,
        run_name: str | None = None,
        tags: dict | None = None,
        hparams: dict | None = None,
        update_freq: Any = "epoch",
    ):
        super().__init__()
        try:
            import mlflow
            from mlflow.entities import Metric, Param
            from mlflow.tracking import MlflowClient
        except ImportError as e:
            raise ImportError(
                "The MLflowLogger callback needs mlflow: `pip install hkfit[mlflow]` "
                "(or `pip install mlflow`)."
            ) from e
        self._mlflow, self._client_class = mlflow, MlflowClient
        self._metric, self._param = Metric, Param
        self.experiment_name, self.run_name = experiment_name, run_name
        self.tags, self.hparams = dict(tags or {}), dict(hparams or {})
        self.update_freq = check_update_freq(update_freq)
        self._cadence = BatchCadence(update_freq)
        self.run_id: str | None = None
        self._client: Any = None
        self._owns_run = False

    def wants_batch_logs(self, hook: str | None = None) -> bool:
        return self._cadence.wants_batch_logs(hook)

    def on_train_begin(self, logs=None):
        self._cadence.reset()
        if not is_main_process():
            return
        mlflow = self._mlflow
        active = mlflow.active_run()
        if active is not None:
            self.run_id, self._owns_run = active.info.run_id, False
        else:
            experiment_id = None
            if self.experiment_name is not None:
                found = mlflow.get_experiment_by_name(self.experiment_name)
                experiment_id = (
                    found.experiment_id
                    if found is not None
                    else mlflow.create_experiment(self.experiment_name)
                )
            run = mlflow.start_run(
                experiment_id=experiment_id, run_name=self.run_name, tags=self.tags or None
            )
            self.run_id, self._owns_run = run.info.run_id, True
        self._client = self._client_class()
        existing = self._client.get_run(self.run_id).data.params
        values = {**fit_params(self.params), **self.hparams}
        new = [self._param(k, str(v)) for k, v in values.items() if k not in existing]
        for i in range(0, len(new), 100):  # MLflow takes at most 100 params per batch
            self._client.log_batch(self.run_id, params=new[i : i + 100])

    def _log(self, values: dict[str, float], step: int) -> None:
        if self.run_id is None or not values:
            return
        now = int(time.time() * 1000)
        metrics = [self._metric(k, v, now, step) for k, v in values.items()]
        for i in range(0, len(metrics), 1000):  # MLflow takes at most 1000 per batch
            self._client.log_batch(self.run_id, metrics=metrics[i : i + 1000])

    def on_epoch_begin(self, epoch, logs=None):
        self._cadence.epoch_begin(self.model)

    def on_train_batch_end(self, batch, logs=None):
        step = self._cadence.due(batch, logs)
        if step is not None:
            self._log({f"batch_{k}": v for k, v in scalars(logs).items()}, step)

    def on_epoch_end(self, epoch, logs=None):
        self._log(scalars(logs), int(epoch))

    def on_train_end(self, logs=None):
        self._end("FINISHED")

    def on_exception(self, exception):
        self._end("KILLED" if isinstance(exception, KeyboardInterrupt) else "FAILED")

    def _end(self, status: str) -> None:
        run_id, self.run_id = self.run_id, None
        if run_id is None or not self._owns_run:
            return
        self._owns_run = False
        active = self._mlflow.active_run()
        if active is not None and active.info.run_id == run_id:
            self._mlflow.end_run(status=status)
        else:  # the user switched runs meanwhile: end ours without touching theirs
            self._client.set_terminated(run_id, status=status)


__all__ = ["MLflowLogger", "WandbLogger"]
