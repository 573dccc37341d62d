"""History.plot (hkfit._plotting): the curves drawn equal the history, rendered with Agg."""

import sys

import haiku as hk
import numpy as np
import pytest

import hkfit
from hkfit import _plotting
from hkfit.callbacks import History

matplotlib = pytest.importorskip("matplotlib", reason="needs the plot extra")
matplotlib.use("Agg")
plt = pytest.importorskip("matplotlib.pyplot")


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def recorded(epochs, **series):
    """A History that saw ``epochs`` with the logs in ``series`` (None: not logged)."""
    history = History()
    for i, epoch in enumerate(epochs):
        logs = {k: v[i] for k, v in series.items() if v[i] is not None}
        history.on_epoch_end(epoch, logs)
    return history


def lines(axis):
    return {
        line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in axis.lines
    }


def test_plot_draws_each_metric_with_its_validation_curve(tmp_path):
    x = np.random.default_rng(0).normal(size=(64, 3)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int32)
    model = hkfit.Model(
        lambda x: hk.Linear(2)(x),
        loss="sparse_categorical_crossentropy",
        optimizer="adam",
        metrics=["accuracy"],
    )
    history = model.fit(x, y, epochs=3, batch_size=16, validation_split=0.25, verbose=0)

    figure = history.plot()
    path = tmp_path / "history.png"
    figure.savefig(path)
    assert path.stat().st_size > 1000

    by_title = {axis.get_title(): axis for axis in figure.axes}
    assert set(by_title) == {"loss", "accuracy", "learning_rate"}
    for name in ("loss", "accuracy"):
        drawn = lines(by_title[name])
        assert set(drawn) == {name, f"val_{name}"}
        for key, (xs, ys) in drawn.items():
            assert xs == history.epoch == [0, 1, 2]
            assert ys == history.history[key]
    assert lines(by_title["learning_rate"]) == {
        "learning_rate": ([0, 1, 2], history.history["learning_rate"])
    }


def test_metrics_selects_and_ax_draws_on_one_axes(tmp_path):
    history = recorded(
        [0, 1, 2], loss=[3.0, 2.0, 1.0], val_loss=[3.5, 2.5, 1.5], mae=[0.9, 0.8, 0.7]
    )
    figure = history.plot(metrics="loss")
    assert [axis.get_title() for axis in figure.axes] == ["loss"]
    assert lines(figure.axes[0]) == {
        "loss": ([0, 1, 2], [3.0, 2.0, 1.0]),
        "val_loss": ([0, 1, 2], [3.5, 2.5, 1.5]),
    }

    figure, ax = plt.subplots()
    assert history.plot(metrics=["mae", "loss"], ax=ax) is figure
    assert set(lines(ax)) == {"mae", "loss", "val_loss"}
    figure.savefig(tmp_path / "one.png")
    assert (tmp_path / "one.png").stat().st_size > 0


def test_a_key_logged_on_some_epochs_is_drawn_at_those_epochs():
    # validation_freq=2: val_loss exists after epochs 1 and 3 only
    history = recorded([0, 1, 2, 3], loss=[4.0, 3.0, 2.0, 1.0], val_loss=[None, 3.5, None, 1.5])
    drawn = lines(history.plot().axes[0])
    assert drawn["val_loss"] == ([1, 3], [3.5, 1.5])
    assert drawn["loss"] == ([0, 1, 2, 3], [4.0, 3.0, 2.0, 1.0])


def test_resumed_history_plots_from_initial_epoch():
    history = recorded([5, 6], loss=[2.0, 1.0])
    assert lines(history.plot().axes[0]) == {"loss": ([5, 6], [2.0, 1.0])}


def test_many_metrics_make_a_grid():
    values = [1.0, 2.0]
    history = recorded([0, 1], **{f"m{i}": values for i in range(5)})
    figure = history.plot()
    assert [axis.get_title() for axis in figure.axes] == [f"m{i}" for i in range(5)]


def test_bad_metric_names_list_what_exists():
    history = recorded([0], loss=[1.0], val_loss=[2.0], accuracy=[0.5])
    with pytest.raises(ValueError, match=r"\['loss', 'accuracy'\].*metrics=\['acc'\]"):
        history.plot(metrics=["acc"])
    with pytest.raises(ValueError, match="val_loss"):  # val_ curves come with their metric
        history.plot(metrics="val_loss")
    with pytest.raises(ValueError, match="empty History"):
        History().plot()


def test_missing_matplotlib_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)  # import fails
    history = recorded([0], loss=[1.0])
    with pytest.raises(ImportError, match=r'pip install "hkfit\[plot\]"'):
        history.plot()


def test_metric_groups_pairs_validation_keys():
    groups = _plotting.metric_groups({"val_loss": [1.0], "loss": [1.0], "val_only": [2.0]})
    assert groups == {"loss": ["loss", "val_loss"], "only": ["val_only"]}
