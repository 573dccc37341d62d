"""Multi-view models: one network with shared parameters applied to several views.

Two tools, for the two halves of the job:

* :func:`multiview` builds a forward function for :class:`hkfit.Model` that runs
  ``forward`` on every view along a views axis (``hk.vmap``, parameters shared) and pools
  the per-view outputs. Use it to TRAIN a multi-view model (e.g. MVCNN: several photos of
  one object, max-pooled so the result does not depend on their order).
* ``model.vmap(in_axes, out_axes)`` returns a :class:`ModelView`: the same model (same
  parameters and state, read at call time) whose ``predict`` / ``evaluate`` run
  ``jax.vmap(model.apply_fn, in_axes, out_axes)`` inside each batch. Use it to run an
  already trained single-view model over many views at once.

In both, axes count the batch axis: axis 0 is the batch axis, so it can never be the
views axis, and negative axes count from the end of the full array.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from hkfit import _auxiliary as auxiliary
from hkfit import _data as data_lib
from hkfit import _eager as eager
from hkfit import _forward as forward_lib

PyTree = Any

#: The ``hk.vmap`` axis name :func:`multiview` maps views over. Layers that reduce over
#: the batch can name it to reduce over the views too, e.g.
#: ``hk.BatchNorm(True, True, 0.9, cross_replica_axis="views")``.
VIEWS_AXIS = "views"

_POOLS = ("max", "mean", None)
_tree = jax.tree_util


# --- Axis helpers -----------------------------------------------------------------------


def _normalize_axis(axis: int, ndim: int, name: str, where: str) -> int:
    """``axis`` of an array of rank ``ndim`` as a non-negative int that is not the batch axis."""
    if not -ndim <= axis < ndim:
        raise ValueError(
            f"Expected `{name}` in [-{ndim}, {ndim}) for an {where} of rank {ndim}. "
            f"Received: {name}={axis}."
        )
    if axis % ndim == 0:
        raise ValueError(
            f"Expected `{name}` to be a views axis other than the batch axis 0. "
            f"Received: {name}={axis}, which is axis 0 of an {where} of rank {ndim}."
        )
    return axis % ndim


def _check_axes_spec(axes: Any, name: str, allow_all_none: bool) -> None:
    """Static checks of an ``in_axes`` / ``out_axes`` pytree (ints and Nones)."""
    leaves = _tree.tree_leaves(axes, is_leaf=lambda a: a is None)
    for leaf in leaves:
        if leaf is not None and (isinstance(leaf, bool) or not isinstance(leaf, (int, np.integer))):
            raise TypeError(
                f"Expected `{name}` to be an int, None, or a pytree of them. "
                f"Received: {name}={axes!r}."
            )
        if leaf is not None and int(leaf) == 0:
            raise ValueError(
                f"Expected `{name}` to name axes other than 0: axis 0 is the batch "
                f"axis (one row per example). Received: {name}={axes!r}."
            )
    if not allow_all_none and all(leaf is None for leaf in leaves):
        raise ValueError(
            f"Expected at least one mapped (non-None) axis in `{name}`. Received: {name}={axes!r}."
        )


def _leaf_axes(axes: Any, tree: PyTree, name: str, where: str) -> PyTree:
    """Broadcasts the prefix ``axes`` to one normalized axis (or None) per leaf of ``tree``."""

    def expand(axis, subtree):
        return _tree.tree_map(
            lambda leaf: (
                None
                if axis is None
                else _normalize_axis(int(axis), len(np.shape(leaf)), name, where)
            ),
            subtree,
        )

    try:
        return _tree.tree_map(expand, axes, tree, is_leaf=lambda a: a is None)
    except (ValueError, TypeError) as err:
        if f"`{name}`" in str(err):
            raise
        raise ValueError(
            f"Expected `{name}` to be an int, None, or a pytree prefix of the "
            f"{where}s. Received: {name}={axes!r} for {where}s of structure "
            f"{_tree.tree_structure(tree)}."
        ) from err


def _views_size(axes: PyTree, tree: PyTree, name: str) -> int:
    """The size of the mapped axes, which must agree across the leaves of ``tree``."""
    sizes = {}
    flat_axes = _tree.tree_leaves(axes, is_leaf=lambda a: a is None)
    for (path, leaf), axis in zip(_tree.tree_leaves_with_path(tree), flat_axes):
        if axis is not None:
            sizes[f"x{_tree.keystr(path)}"] = (axis, np.shape(leaf)[axis])
    if not sizes:
        raise ValueError(
            f"Expected `{name}` to map at least one array of the input. "
            "Received: every array unmapped."
        )
    if len({size for _, size in sizes.values()}) > 1:
        listed = ", ".join(f"{k} axis {a} of size {s}" for k, (a, s) in sizes.items())
        raise ValueError(
            f"Expected every axis mapped by `{name}` to have the same size (the "
            f"number of views). Received: {listed}."
        )
    return next(iter(sizes.values()))[1]


# --- multiview(): a forward function for training ---------------------------------------


def _pool(y: PyTree, pool: str | None) -> PyTree:
    if pool is None:
        return y
    reduce = jnp.max if pool == "max" else jnp.mean
    return _tree.tree_map(lambda a: reduce(a, axis=-1), y)


def multiview(forward: Callable, *, axis: int = -1, pool: str | None = "max") -> Callable:
    """Applies ``forward`` to every view along ``axis`` with shared parameters, then pools.

    The returned function is a forward function for :class:`hkfit.Model`. Inside it,
    ``hk.vmap(forward, in_axes=axis, out_axes=-1, split_rng=False)`` runs ``forward`` once
    per view, so ``forward`` sees arrays WITH the batch axis and WITHOUT the views axis,
    and the parameter count does not depend on the number of views. The per-view outputs
    are stacked on the last axis and reduced over it (``"max"`` or ``"mean"``, so pooled
    outputs do not depend on the order of the views), or kept stacked (``None``).

    If ``forward`` declares ``is_training``, so does the returned function, and the flag
    is passed through. With ``split_rng=False`` every view draws the same random keys
    (e.g. the same dropout mask). A pytree input is split along ``axis`` in every leaf.

    Batch statistics: in training mode ``hk.BatchNorm`` inside ``forward`` must name the
    views axis, ``hk.BatchNorm(..., cross_replica_axis="views")`` (:data:`VIEWS_AXIS`);
    its statistics and moving averages then cover the batch and all views together, as if
    the views were extra rows. Without it the statistics would differ per view, which
    shared state cannot hold, and training raises a ``ValueError`` saying so. In
    inference mode (evaluate/predict) ``hk.BatchNorm`` needs nothing.

    Args:
      forward: a function using Haiku modules, ``forward(x)`` or ``forward(x, is_training)``,
        applied to one view.
      axis: the views axis of the full input, counting the batch axis (so never 0);
        negative values count from the end. Checked against the input rank when called.
      pool: ``"max"``, ``"mean"``, or ``None`` to keep the views stacked on the last axis.

    Returns:
      ``fn(x)`` or ``fn(x, is_training)``, to be given to ``hkfit.Model``.

    Raises:
      TypeError: if ``forward`` is not callable or ``axis`` is not an int.
      ValueError: if ``axis`` is 0 or ``pool`` is not one of ``"max"``, ``"mean"``,
        ``None``; when called, if ``axis`` is out of range for the input.

    >>> import haiku as hk, hkfit
    >>> cnn = lambda x: hk.Linear(10)(hk.Flatten()(hk.Conv2D(8, 3)(x)))
    >>> model = hkfit.Model(hkfit.multiview(cnn, axis=-1, pool="max"),
    ...                     loss="sparse_categorical_crossentropy")   # x: [batch, H, W, C, views]
    """
    if not callable(forward):
        raise TypeError(
            "Expected `forward` to be a function using Haiku modules. Received: "
            f"{forward!r} of type {type(forward).__name__}."
        )
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
        raise TypeError(f"Expected `axis` to be an int (the views axis). Received: axis={axis!r}.")
    axis = int(axis)
    if axis == 0:
        raise ValueError(
            "Expected `axis` to be a views axis other than 0: axis 0 is the batch "
            "axis (one row per example). Received: axis=0."
        )
    if not (pool is None or (isinstance(pool, str) and pool in _POOLS)):
        raise ValueError(
            f"Expected `pool` to be one of 'max', 'mean' or None. Received: pool={pool!r}."
        )

    def run(x, per_view):
        axes = _leaf_axes(axis, x, "axis", "input")
        _views_size(axes, x, "axis")
        mapped = hk.vmap(
            lambda view: auxiliary.collect(per_view, view),  # losses added per view
            in_axes=(axes,),
            out_axes=-1,
            axis_name=VIEWS_AXIS,
            split_rng=False,
        )
        try:
            y, added = mapped(x)
        except ValueError as err:
            if "out_axes is None" not in str(err):
                raise
            raise ValueError(
                "The forward function updates Haiku state (e.g. hk.BatchNorm moving averages) "
                "differently for each view, but the views share one state. Reduce over the "
                f"views too: hk.BatchNorm(..., cross_replica_axis={VIEWS_AXIS!r})."
            ) from err
        for name, value in added.items():  # the mean over views, added to the outer step
            auxiliary.add_loss(jnp.mean(value, axis=-1), name)
        return _pool(y, pool)

    multiview_forward: Callable[..., Any]
    if forward_lib.takes_is_training(forward):

        def multiview_forward(x, is_training):
            return run(x, lambda view: forward(view, is_training=is_training))
    else:

        def multiview_forward(x):
            return run(x, forward)

    multiview_forward.__name__ = f"multiview_{getattr(forward, '__name__', 'forward')}"
    multiview_forward.__doc__ = (
        f"`{getattr(forward, '__name__', 'forward')}` on every view along "
        f"axis={axis}, pooled with pool={pool!r}."
    )
    return multiview_forward


# --- Model.vmap(): a view of a trained model --------------------------------------------


def vmapped_forward(
    forward: forward_lib.Forward, in_axes: Any, out_axes: Any
) -> forward_lib.Forward:
    """``forward`` whose inference maps ``in_axes`` -> ``out_axes`` with ``jax.vmap``.

    Its ``init`` initializes on the first view; it does not train.

    Raises:
      TypeError / ValueError: if an axis is not an int / None, or is the batch axis 0.
    """
    _check_axes_spec(in_axes, "in_axes", allow_all_none=False)
    _check_axes_spec(out_axes, "out_axes", allow_all_none=True)

    def apply_eval(params, state, rng, x):
        axes = _leaf_axes(in_axes, x, "in_axes", "input")
        _views_size(axes, x, "in_axes")
        mapped = jax.vmap(forward.apply_eval, in_axes=(None, None, None, axes))
        views_first = eager.shape_of(mapped, params, state, rng, x)
        out = _leaf_axes(out_axes, views_first, "out_axes", "output")
        return jax.vmap(forward.apply_eval, in_axes=(None, None, None, axes), out_axes=out)(
            params, state, rng, x
        )

    def init(rng, x):
        return forward.init(rng, first_view(x, in_axes))

    def apply_train(*_):
        raise TypeError("A model view made by `Model.vmap` does not train.")

    return forward_lib.Forward(init, apply_train, apply_eval, forward.transformed)


def first_view(x: Any, in_axes: Any) -> Any:
    """The first view of ``x`` along ``in_axes`` (unmapped leaves as they are)."""
    x = data_lib.to_numpy(x)
    axes = _leaf_axes(in_axes, x, "in_axes", "input")
    _views_size(axes, x, "in_axes")
    return _tree.tree_map(lambda a, ax: a if ax is None else np.take(a, 0, axis=ax), x, axes)


class ModelView:
    """A :class:`hkfit.Model` seen through ``jax.vmap``: same parameters, mapped inference.

    Made by ``model.vmap(in_axes, out_axes)``. Its ``predict``, ``evaluate``,
    ``predict_on_batch`` and ``test_on_batch`` (the Model's own, same signatures) run
    :meth:`apply_fn`, which is ``jax.vmap(model.apply_fn, in_axes=(None, None, in_axes),
    out_axes=out_axes)``, over each batch. The parameters and state are the parent
    model's, read when used: training the parent later is visible through the view, and
    assigning ``view.params`` assigns the parent's. The view keeps its own compiled
    functions and its own metrics (resolved from the view's output shapes). It does not
    train: train the parent, or build the model with :func:`multiview`.

    Axes count the full arrays including the batch axis 0, which can be neither mapped
    nor the output axis; so ``predict`` still returns one row per input row. A mapped
    input axis ``a`` is also axis ``a`` of each batch, and the parent's forward sees the
    batch without it. Labels for ``evaluate`` are shaped like the view's outputs.

    >>> import haiku as hk, numpy as np, hkfit
    >>> model = hkfit.Model(lambda x: hk.Conv2D(2, 3)(x), loss="mse")
    >>> x = np.zeros((4, 8, 8, 3, 5), np.float32)   # 5 views on the last axis
    >>> model.vmap(in_axes=4, out_axes=4).predict(x).shape
    (4, 8, 8, 2, 5)
    """

    def __init__(self, parent: Any, inner: Any, in_axes: Any, out_axes: Any = -1):
        self._parent, self._inner = parent, inner
        self.in_axes, self.out_axes = in_axes, out_axes

    def __repr__(self) -> str:
        return f"ModelView(in_axes={self.in_axes!r}, out_axes={self.out_axes!r})"

    @property
    def parent(self) -> Any:
        """The model whose parameters and state this view uses."""
        return self._parent

    @property
    def params(self) -> Any:
        return self._parent.params

    @params.setter
    def params(self, value: Any) -> None:
        self._parent.params = value

    @property
    def eval_params(self) -> Any:
        """The parent's :attr:`hkfit.Model.eval_params`, which ``predict`` and ``evaluate`` use."""
        return self._parent.eval_params

    @property
    def state(self) -> Any:
        return self._parent.state

    @state.setter
    def state(self, value: Any) -> None:
        self._parent.state = value

    @property
    def built(self) -> bool:
        return self._parent.built

    @property
    def metrics(self) -> list:
        return self._inner.metrics

    def apply_fn(self, params: Any, state: Any, x: Any) -> Any:
        """``jax.vmap`` of the parent's ``apply_fn`` over ``in_axes`` -> ``out_axes``.

        Pure; composes with ``jax.jit``, ``jax.grad``, ``jax.jacrev`` and ``jax.jacfwd``.

        Raises:
          ValueError: if an axis is out of range or is the batch axis, or if the mapped
            axes differ in size across the leaves of ``x``.
        """
        return self._inner.apply_fn(params, state, x)

    def init(self, x: Any) -> ModelView:
        """Initializes the parent (if needed) on the first view of ``x``."""
        if not self._parent.built:
            self._parent.init(first_view(x, self.in_axes))
        return self

    def predict(self, x: Any, **kwargs: Any) -> Any:
        """``Model.predict`` through the view (same arguments)."""
        if data_lib.is_array_tree(x) or isinstance(x, dict):
            self.init(x)
        return self._inner.predict(x, **kwargs)

    def evaluate(self, x: Any, y: Any = None, **kwargs: Any) -> dict[str, float]:
        """``Model.evaluate`` through the view (same arguments)."""
        if data_lib.is_array_tree(x) or isinstance(x, dict):
            self.init(x)
        return self._inner.evaluate(x, y, **kwargs)

    def predict_on_batch(self, x: Any) -> Any:
        self.init(x)
        return self._inner.predict_on_batch(x)

    def test_on_batch(self, x: Any, y: Any, **kwargs: Any) -> dict[str, float]:
        self.init(x)
        return self._inner.test_on_batch(x, y, **kwargs)

    def _no_training(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(
            "A model view made by `Model.vmap` runs `predict` and `evaluate` only. "
            "Train the parent model (`view.parent.fit(...)`; the view sees the new "
            "parameters), or train a multi-view model built with `hkfit.multiview`."
        )

    fit = _no_training
    train_on_batch = _no_training
