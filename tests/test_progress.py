"""Which progress bar is shown (hkfit.callbacks.progress): the notebook widget in Jupyter
with ipywidgets, otherwise the text bar on stderr, without warnings or crashes."""

import gc
import sys
import types
import warnings

import haiku as hk
import numpy as np
import pytest
import tqdm.notebook
import tqdm.std

import hkfit
from hkfit.callbacks import progress

BAR = dict(total=3, unit="step", leave=True, desc="Epoch 1/1", dynamic_ncols=True, mininterval=0.5)


class FakeWidgetBar:
    """Stands in for tqdm's notebook bar (which needs a live Jupyter frontend)."""

    made: list = []

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.total = kwargs.get("total")
        FakeWidgetBar.made.append(self)

    def update(self, n=1): ...
    def set_postfix_str(self, s="", refresh=True): ...
    def close(self): ...


@pytest.fixture
def notebook(monkeypatch):
    """A Jupyter kernel, as ``in_notebook`` sees it."""
    monkeypatch.setattr(progress, "in_notebook", lambda: True)


@pytest.fixture
def no_ipywidgets(monkeypatch):
    monkeypatch.setattr(tqdm.notebook, "IProgress", None)


@pytest.fixture
def ipywidgets(monkeypatch):
    FakeWidgetBar.made = []
    monkeypatch.setattr(tqdm.notebook, "IProgress", object)
    monkeypatch.setattr(tqdm.notebook, "tqdm", FakeWidgetBar)


@pytest.fixture
def quiet(monkeypatch):
    """Fails the test on any warning or any exception ignored in ``__del__``."""
    ignored = []
    monkeypatch.setattr(sys, "unraisablehook", ignored.append)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
        gc.collect()
    assert not caught, [str(w.message) for w in caught]
    assert not ignored, [repr(u.exc_value) for u in ignored]


def assert_text_bar_on_stderr(bar, capsys):
    assert type(bar) is tqdm.std.tqdm
    bar.update(3)
    bar.close()
    out, err = capsys.readouterr()
    assert "Epoch 1/1" in err and "3/3" in err and out == ""


def test_terminal_gets_the_text_bar_on_stderr(quiet, capsys):
    assert_text_bar_on_stderr(progress._make_bar(**BAR), capsys)


def test_notebook_with_ipywidgets_gets_the_widget(notebook, ipywidgets, quiet):
    bar = progress._make_bar(**BAR)
    assert isinstance(bar, FakeWidgetBar) and bar.kwargs == BAR  # no file=: widgets own it


def test_notebook_without_ipywidgets_falls_back_to_text_quietly(
    notebook, no_ipywidgets, quiet, capsys
):
    assert_text_bar_on_stderr(progress._make_bar(**BAR), capsys)


def test_a_widget_bar_that_fails_falls_back_to_text(
    notebook, ipywidgets, monkeypatch, quiet, capsys
):
    def broken(**kwargs):
        raise RuntimeError("no frontend")

    monkeypatch.setattr(tqdm.notebook, "tqdm", broken)
    assert_text_bar_on_stderr(progress._make_bar(**BAR), capsys)


def test_fit_in_a_notebook_without_ipywidgets(notebook, no_ipywidgets, quiet, capsys):
    x, y = np.ones((8, 3), np.float32), np.zeros((8, 1), np.float32)
    model = hkfit.Model(lambda x: hk.Linear(1)(x), loss="mse", optimizer="sgd")
    model.fit(x, y, epochs=2, batch_size=4)  # verbose="auto": a bar in a notebook
    err = capsys.readouterr().err
    assert "Epoch 1/2" in err and "Epoch 2/2" in err and "Warning" not in err


def test_fit_in_a_notebook_uses_the_widget(notebook, ipywidgets, quiet):
    x, y = np.ones((8, 3), np.float32), np.zeros((8, 1), np.float32)
    model = hkfit.Model(lambda x: hk.Linear(1)(x), loss="mse", optimizer="sgd")
    model.fit(x, y, epochs=2, batch_size=4)
    assert [bar.kwargs["desc"] for bar in FakeWidgetBar.made] == ["Epoch 1/2", "Epoch 2/2"]


def fake_ipython(monkeypatch, shell_class):
    module = types.ModuleType("IPython")
    module.get_ipython = lambda: None if shell_class is None else shell_class()
    monkeypatch.setitem(sys.modules, "IPython", module)


class ZMQInteractiveShell:  # the Jupyter kernel's shell
    pass


class Shell(ZMQInteractiveShell):  # Google Colab's subclass
    pass


class TerminalInteractiveShell:
    pass


@pytest.mark.parametrize(
    "shell, expected",
    [(ZMQInteractiveShell, True), (Shell, True), (TerminalInteractiveShell, False), (None, False)],
)
def test_in_notebook(monkeypatch, shell, expected):
    fake_ipython(monkeypatch, shell)
    assert progress.in_notebook() is expected
    assert hkfit.callbacks.resolve_verbose("auto") == (1 if expected else 2)  # stderr: no tty


def test_no_ipython_is_no_notebook(monkeypatch):
    monkeypatch.delitem(sys.modules, "IPython", raising=False)
    assert progress.in_notebook() is False
