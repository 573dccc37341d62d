"""Tests for the loggers: TensorBoard's update_freq / histogram_freq, WandbLogger and
MLflowLogger (run offline: W&B in offline mode, MLflow on a local file store), and the
logging guide's snippets (with the tracker blocks the docs test skips)."""

import glob
import json
import os
import pathlib
import re
import struct
import subprocess
import sys

import haiku as hk
import numpy as np
import pytest

import hkfit
from hkfit import _engine as engine
from hkfit import callbacks as C

X = np.random.default_rng(0).normal(size=(64, 4)).astype(np.float32)  # 8 batches of 8
Y = X.sum(axis=1, keepdims=True)


@pytest.fixture(scope="module")
def model():
    """One compiled model shared by the tests (steps are checked relative to model.step;
    every fit here runs a multiple of 6 steps)."""
    return hkfit.Model(lambda x: hk.Linear(1)(x), loss="mse", optimizer="sgd", seed=0)


def fit(model, callbacks, epochs=2, **kwargs):
    kwargs.setdefault("validation_split", 0.25)  # 48 training rows: 6 batches
    return model.fit(X, Y, batch_size=8, epochs=epochs, verbose=0, callbacks=callbacks, **kwargs)


def reader():
    """A callback that reads every execution's logs (and so makes them available)."""
    return C.LambdaCallback(on_train_batch_end=lambda batch, logs: None)


def test_importing_hkfit_imports_no_tracker():
    code = (
        "import sys, hkfit\n"
        "print(sorted(m for m in ('wandb', 'mlflow', 'tensorboardX') if m in sys.modules))"
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("update_freq", [0, -2, "step", 1.5, True, None])
def test_bad_update_freq_is_refused(update_freq):
    pytest.importorskip("tensorboardX", reason="needs the tensorboard extra")
    with pytest.raises(ValueError, match=r"Expected `update_freq` to be 'epoch', 'batch' or"):
        C.TensorBoard(update_freq=update_freq)


# --- TensorBoard ---------------------------------------------------------------------------


def read_events(run_dir):
    """{tag: [(step, value)]}: scalar values, or (num, min, max, sum) of histograms."""
    from tensorboardX.proto import event_pb2

    found = {}
    for name in sorted(os.listdir(run_dir)):
        if not name.startswith("events."):
            continue
        raw = (run_dir / name).read_bytes()
        offset = 0
        while offset < len(raw):
            (length,) = struct.unpack("<Q", raw[offset : offset + 8])
            event = event_pb2.Event.FromString(raw[offset + 12 : offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                if value.HasField("histo"):
                    h = value.histo
                    entry = (h.num, h.min, h.max, h.sum)
                else:
                    entry = value.simple_value
                found.setdefault(value.tag, []).append((event.step, entry))
    return found


@pytest.fixture
def tensorboard():
    pytest.importorskip("tensorboardX", reason="needs the tensorboard extra")
    return C.TensorBoard


def test_update_freq_batch_writes_every_batch(tensorboard, model, tmp_path):
    tb = tensorboard(tmp_path, update_freq="batch")
    cbs = C.CallbackList([tb])
    assert engine.steps_per_execution_for(cbs, engine.TRAIN, "auto") == 1  # asked for it
    start = model.step
    history = fit(model, [tb])
    train = read_events(tmp_path / "train")
    assert [step for step, _ in train["batch_loss"]] == list(range(start + 1, start + 13))
    # running means of the epoch: its last batch's value is the epoch's loss
    ends = [v for step, v in train["batch_loss"] if (step - start) % 6 == 0]
    assert ends == [float(np.float32(v)) for v in history.history["loss"]]
    assert "batch_loss" not in read_events(tmp_path / "validation")


def test_update_freq_n_adds_no_sync_and_keeps_fusing(tensorboard, model, tmp_path):
    tb = tensorboard(tmp_path, update_freq=3)
    cbs = C.CallbackList([tb])
    assert not tb.wants_batch_logs() and not cbs.wants_batch_logs("on_train_batch_end")
    assert engine.steps_per_execution_for(cbs, engine.TRAIN, "auto") == "auto"
    fit(model, [tb])  # verbose=0, no other batch callback: no batch logs are read
    assert "batch_loss" not in read_events(tmp_path / "train")


def test_update_freq_n_writes_when_logs_are_read_anyway(tensorboard, model, tmp_path):
    # executions of 2 batches whose logs another callback reads: a write whenever a
    # multiple of 3 was passed since the last one (steps 4, 6, 10, 12)
    start = model.step
    fit(model, [tensorboard(tmp_path, update_freq=3), reader()], steps_per_execution=2)
    steps = [step - start for step, _ in read_events(tmp_path / "train")["batch_loss"]]
    assert steps == [4, 6, 10, 12]


def test_batch_steps_continue_across_fit_calls(tensorboard, model, tmp_path):
    start = model.step
    fit(model, [tensorboard(tmp_path / "a", update_freq="batch")], epochs=1)
    fit(model, [tensorboard(tmp_path / "b", update_freq="batch")], epochs=2, initial_epoch=1)
    steps = [step for step, _ in read_events(tmp_path / "b" / "train")["batch_loss"]]
    assert steps == list(range(start + 7, start + 13))  # model.step, not a per-fit count


def test_histogram_freq_writes_every_parameter(tensorboard, model, tmp_path):
    fit(model, [tensorboard(tmp_path, histogram_freq=2)], epochs=3)
    train = read_events(tmp_path / "train")
    assert {"linear/w", "linear/b"} <= set(train)
    for tag, (module, name) in {"linear/w": ("linear", "w"), "linear/b": ("linear", "b")}.items():
        assert [step for step, _ in train[tag]] == [0, 2]
        num, low, high, total = train[tag][-1][1]
        value = np.asarray(model.params[module][name], np.float64)
        assert num == value.size
        np.testing.assert_allclose([low, high, total], [value.min(), value.max(), value.sum()])
    with pytest.raises(ValueError, match="histogram_freq"):
        tensorboard(tmp_path, histogram_freq=-1)


def test_only_process_zero_writes_tensorboard(tensorboard, model, tmp_path, monkeypatch):
    monkeypatch.setattr("hkfit.callbacks.loggers.is_main_process", lambda: False)
    fit(model, [tensorboard(tmp_path, update_freq="batch", histogram_freq=1)])
    assert not tmp_path.joinpath("train").exists()


# --- Weights & Biases ----------------------------------------------------------------------


@pytest.fixture
def wandb(monkeypatch, tmp_path):
    wandb = pytest.importorskip("wandb", reason="needs the wandb extra")
    wandb.teardown()  # W&B reads its settings (WANDB_DIR) once per setup
    for key, value in {
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(tmp_path),
        "WANDB_SILENT": "true",
        "WANDB_CONSOLE": "off",
        "WANDB_DISABLE_GIT": "true",
        "WANDB_DISABLE_CODE": "true",
    }.items():
        monkeypatch.setenv(key, value)
    yield wandb
    if wandb.run is not None:  # a failed test must not leak its run into the next one
        wandb.run.finish()
    wandb.teardown()


def wandb_records(directory):
    """The records of the offline run under ``directory``: its history rows, its config
    updates and its exit code (the ``.wandb`` file is a LevelDB-style log of protobufs)."""
    import wandb
    from wandb.proto import wandb_internal_pb2

    wandb.teardown()  # run.finish() returns before W&B's service has written everything
    (path,) = glob.glob(str(directory / "wandb" / "offline-run-*" / "run-*.wandb"))
    raw = pathlib.Path(path).read_bytes()
    block, header, pos, chunks = 32768, 7, 7, []  # a 7-byte file header, then records
    out = {"history": [], "config": {}, "exit_code": None}
    while pos + header <= len(raw):
        left = block - pos % block
        if left < header:  # records never straddle a block: the tail is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos : pos + header])
        if kind == 0:  # zero padding up to the block's end
            pos += left
            continue
        chunks.append(raw[pos + header : pos + header + length])
        pos += header + length
        if kind not in (1, 4):  # FULL or LAST ends a record
            continue
        record = wandb_internal_pb2.Record.FromString(b"".join(chunks))
        chunks = []
        which = record.WhichOneof("record_type")
        if which == "history":
            out["history"].append(
                {
                    "/".join(i.nested_key) or i.key: json.loads(i.value_json)
                    for i in record.history.item
                }
            )
        elif which in ("config", "run"):
            updates = record.config.update if which == "config" else record.run.config.update
            out["config"].update({u.key: json.loads(u.value_json) for u in updates})
        elif which == "exit":
            out["exit_code"] = record.exit.exit_code
    return out


def test_wandb_logs_epochs_batches_and_fit_params(wandb, model, tmp_path):
    logger = C.WandbLogger(project="hkfit-test", config={"seed": 0}, update_freq="batch")
    assert logger.wants_batch_logs("on_train_batch_end")
    start = model.step
    history = fit(model, [logger])
    assert wandb.run is None  # the run it started is finished
    records = wandb_records(tmp_path)
    config = records["config"]
    expected = {"epochs": 2, "steps_per_epoch": 6, "batch_size": 8, "optimizer": "sgd", "seed": 0}
    assert {k: config[k] for k in expected} == expected
    epochs = [row for row in records["history"] if "epoch/epoch" in row]
    assert [row["epoch/epoch"] for row in epochs] == [0, 1]
    for key in ("loss", "val_loss", "learning_rate"):
        assert [row[f"epoch/{key}"] for row in epochs] == pytest.approx(history.history[key])
    batches = [row for row in records["history"] if "batch/batch_step" in row]
    assert [row["batch/batch_step"] - start for row in batches] == list(range(1, 13))
    assert records["exit_code"] == 0


def test_wandb_logs_into_a_run_you_started_and_leaves_it_open(wandb, model, tmp_path):
    run = wandb.init(project="hkfit-test")
    logger = C.WandbLogger()
    assert not logger.wants_batch_logs()  # update_freq="epoch": no batch logs read
    fit(model, [logger], epochs=1)
    fit(model, [logger], epochs=2, initial_epoch=1)
    assert wandb.run is run
    run.finish()
    epochs = [row["epoch/epoch"] for row in wandb_records(tmp_path)["history"]]
    assert epochs == [0, 1]


def test_wandb_marks_a_failed_fit(wandb, model, tmp_path):
    boom = C.LambdaCallback(on_epoch_end=lambda epoch, logs: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        fit(model, [C.WandbLogger(), boom])
    assert wandb.run is None
    assert wandb_records(tmp_path)["exit_code"] == 1


def test_wandb_logs_only_on_process_zero(wandb, model, tmp_path, monkeypatch):
    monkeypatch.setattr("hkfit.callbacks.trackers.is_main_process", lambda: False)
    fit(model, [C.WandbLogger(update_freq="batch")])
    assert wandb.run is None and not tmp_path.joinpath("wandb").exists()


def test_missing_wandb_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ImportError, match=r"pip install hkfit\[wandb\]"):
        C.WandbLogger()


# --- MLflow --------------------------------------------------------------------------------


@pytest.fixture
def mlflow(monkeypatch, tmp_path):
    mlflow = pytest.importorskip("mlflow", reason="needs the mlflow extra")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow >= 3.? refuses it otherwise
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    yield mlflow
    while mlflow.active_run() is not None:
        mlflow.end_run()


def only_run(mlflow, experiment="hkfit-test"):
    client = mlflow.tracking.MlflowClient()
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    (run,) = client.search_runs([experiment_id])
    return client, run


def test_mlflow_logs_epochs_batches_and_fit_params(mlflow, model):
    logger = C.MLflowLogger(
        "hkfit-test", run_name="r", hparams={"seed": 0}, tags={"kind": "test"}, update_freq=2
    )
    start = model.step
    history = fit(model, [logger, reader()], steps_per_execution=2)
    assert mlflow.active_run() is None
    client, run = only_run(mlflow)
    assert run.info.status == "FINISHED" and run.info.run_name == "r"
    assert run.data.tags["kind"] == "test"
    assert {k: run.data.params[k] for k in ("epochs", "steps_per_epoch", "batch_size")} == {
        "epochs": "2",
        "steps_per_epoch": "6",
        "batch_size": "8",
    }
    assert run.data.params["optimizer"] == "sgd" and run.data.params["seed"] == "0"
    for key in ("loss", "val_loss", "learning_rate"):
        metrics = client.get_metric_history(run.info.run_id, key)
        assert [m.step for m in metrics] == [0, 1]
        assert [m.value for m in metrics] == pytest.approx(history.history[key])
    batch = client.get_metric_history(run.info.run_id, "batch_loss")
    assert sorted(m.step - start for m in batch) == [2, 4, 6, 8, 10, 12]


def test_mlflow_logs_into_the_active_run_and_leaves_it_open(mlflow, model):
    mlflow.set_experiment("hkfit-test")
    with mlflow.start_run() as run:
        mlflow.log_param("epochs", "mine")
        fit(model, [C.MLflowLogger()], epochs=1)
        fit(model, [C.MLflowLogger()], epochs=2, initial_epoch=1)
        assert mlflow.active_run().info.run_id == run.info.run_id
    client, logged = only_run(mlflow)
    assert logged.data.params["epochs"] == "mine"  # a param never changes
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [0, 1]


def test_mlflow_marks_a_failed_fit(mlflow, model):
    boom = C.LambdaCallback(on_epoch_end=lambda epoch, logs: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        fit(model, [C.MLflowLogger("hkfit-test"), boom])
    assert mlflow.active_run() is None
    assert only_run(mlflow)[1].info.status == "FAILED"


def test_mlflow_logs_only_on_process_zero(mlflow, model, tmp_path, monkeypatch):
    monkeypatch.setattr("hkfit.callbacks.trackers.is_main_process", lambda: False)
    fit(model, [C.MLflowLogger("hkfit-test")])
    assert mlflow.active_run() is None and not tmp_path.joinpath("mlruns").exists()


def test_missing_mlflow_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)
    with pytest.raises(ImportError, match=r"pip install hkfit\[mlflow\]"):
        C.MLflowLogger()


# --- the logging guide's snippets ---------------------------------------------------------


GUIDE = pathlib.Path(__file__).resolve().parents[1] / "docs" / "guides" / "logging.md"


def test_the_logging_guide_runs_with_its_tracker_blocks(tmp_path, monkeypatch, wandb, mlflow):
    """Every block of the guide, the W&B and MLflow ones too (which the docs test skips:
    here they run against this file's local fakes)."""
    pytest.importorskip("tensorboardX", reason="needs the tensorboard extra")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "guide_logging"}
    blocks = re.findall(r"^```python\n(.*?)^```", GUIDE.read_text(), re.M | re.S)
    assert len(blocks) >= 5
    for block in blocks:
        exec(compile(block, str(GUIDE), "exec"), namespace)
    assert glob.glob("runs/profile/plugins/profile/*/*.xplane.pb")
    assert {"batch_loss", "linear/w"} <= set(read_events(tmp_path / "runs" / "tb" / "train"))
    assert wandb_records(tmp_path)["exit_code"] == 0
    assert only_run(mlflow, "regression")[1].info.status == "FINISHED"
