"""Data sources: in-memory arrays (pytrees) and iterables of batches.

Arrays that fit in memory are checked once, put on the device once per ``fit``, and
batched there by row indices (see :mod:`hkfit.step`): an epoch's shuffle is one device
permutation, never a copy of the dataset. Iterables (generators, ``tf.data`` numpy
iterators, torch ``DataLoader``, grain loaders) yield ``(x, y)`` or ``(x, y, sample_weight)``
batches that are moved to the device two batches ahead of the step that uses them.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hkfit import _outputs as outputs_lib

PyTree = Any

# What a 64-bit host dtype becomes on a device while `jax_enable_x64` is off.
_NARROW_DTYPES = {
    np.dtype(wide): np.dtype(narrow)
    for wide, narrow in (
        (np.float64, np.float32),
        (np.int64, np.int32),
        (np.uint64, np.uint32),
        (np.complex128, np.complex64),
    )
}


_FLOAT32_MAX = float(np.finfo(np.float32).max)


def is_array(value: Any) -> bool:
    """True for numpy/JAX arrays (anything with a shape and a dtype)."""
    return isinstance(value, (np.ndarray, jax.Array)) or (
        hasattr(value, "shape") and hasattr(value, "dtype") and hasattr(value, "__array__")
    )


def is_array_tree(value: Any) -> bool:
    """True for an array or a (nested) dict/list/tuple whose leaves are all arrays."""
    if is_array(value):
        return True
    if isinstance(value, dict):
        children = list(value.values())
    elif isinstance(value, (list, tuple)):
        children = list(value)
    else:
        return False
    return bool(children) and all(is_array_tree(child) for child in children)


def num_rows(tree: PyTree, name: str) -> int:
    """The common length of every leaf of ``tree``.

    Raises:
      ValueError: if the leaves differ in length or one is a scalar.
    """
    paths_leaves = jax.tree_util.tree_leaves_with_path(tree, is_leaf=is_array)
    lengths = {}
    for path, leaf in paths_leaves:
        shape = np.shape(leaf)
        where = f"{name}{jax.tree_util.keystr(path)}"
        if not shape:
            raise ValueError(
                f"Expected every array in `{name}` to have a batch axis. "
                f"Received: a scalar at {where}."
            )
        lengths[where] = shape[0]
    if len(set(lengths.values())) > 1:
        raise ValueError(
            f"Expected every array in `{name}` to have the same number of rows. "
            f"Received: {', '.join(f'{k}: {v}' for k, v in lengths.items())}."
        )
    return next(iter(lengths.values()))


def positive_int(value: Any, name: str, minimum: int = 1) -> int:
    """``value`` as an int, or ValueError naming ``name`` if it is not an int >= ``minimum``."""
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
        raise ValueError(
            f"Expected `{name}` to be an int >= {minimum}. Received: {name}={value!r}."
        )
    return int(value)


def checked_arrays(
    x: PyTree, y: PyTree, check_inputs: bool = True, names: tuple[str, str] = ("x", "y")
) -> tuple[PyTree, PyTree, int]:
    """``x`` and ``y`` as numpy pytrees with the same, non-zero number of rows.

    The leaves are in the dtypes the device will hold (see :func:`to_device_dtypes`).
    With ``check_inputs`` the values are checked before they are narrowed, so a float64
    value beyond float32's range is refused rather than turned into Inf.

    Args:
      x: inputs, an array or a pytree of arrays.
      y: targets, an array or a pytree of arrays.
      check_inputs: refuse NaN/Inf (and values the device dtype cannot hold).
      names: what ``x`` and ``y`` are called in error messages.

    Raises:
      ValueError: for different row counts, no rows, or (with ``check_inputs``) NaN/Inf.
      TypeError: for leaves that are not numbers (strings, objects, dates).
    """
    x_name, y_name = names
    x, y = host_arrays(x, x_name), host_arrays(y, y_name)
    n, n_y = num_rows(x, x_name), num_rows(y, y_name)
    if n != n_y:
        raise ValueError(
            f"Expected `{x_name}` and `{y_name}` to have the same number of rows. Received: "
            f"{x_name} has {n} rows, {y_name} has {n_y}."
        )
    if n == 0:
        raise ValueError(
            f"Expected a non-empty dataset. Received: {x_name} and {y_name} with 0 rows."
        )
    if check_inputs:
        check_finite(x, x_name)
        check_finite(y, y_name)
    return to_device_dtypes(x, x_name), to_device_dtypes(y, y_name), n


def host_arrays(tree: PyTree, name: str = "x") -> PyTree:
    """Every leaf of ``tree`` as a numpy array in its own dtype, checked to hold numbers.

    Raises:
      ValueError: for ``None`` or an empty dict/list/tuple.
      TypeError: for leaves of strings, objects, dates or other non-numeric dtypes.
    """
    check_present(tree, name)
    tree = jax.tree_util.tree_map(np.asarray, tree, is_leaf=is_array)
    check_numeric(tree, name)
    return tree


def check_present(tree: PyTree, name: str) -> None:
    """Refuses ``None`` and empty containers where data is expected, naming ``name``."""
    if tree is None or (isinstance(tree, (dict, list, tuple)) and not tree):
        raise ValueError(
            f"Expected `{name}` to hold data: an array, a dict/list/tuple of arrays or an "
            f"iterable of batches. Received: {name}={tree!r}."
        )

    def is_leaf(value: Any) -> bool:
        return is_array(value) or not isinstance(value, (dict, list, tuple))

    if not jax.tree_util.tree_leaves(tree, is_leaf=is_leaf):
        raise ValueError(
            f"Expected `{name}` to hold at least one array. Received: {name}={tree!r}, "
            "a container without arrays."
        )


def check_numeric(tree: PyTree, name: str, allow_complex: bool = True) -> None:
    """Refuses leaves whose dtype is not a number (or complex, unless ``allow_complex``).

    Booleans, integers, floating-point types (``bfloat16`` and float8 included) and,
    with ``allow_complex``, complex types are numbers.

    Raises:
      TypeError: naming the leaf, its dtype and the fix.
    """
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree, is_leaf=is_array):
        dtype = np.dtype(leaf.dtype) if hasattr(leaf, "dtype") else np.asarray(leaf).dtype
        where = f"{name}{jax.tree_util.keystr(path)}"
        numeric = dtype.kind == "b" or jnp.issubdtype(dtype, jnp.number)
        if not numeric:
            raise TypeError(
                f"Expected numbers in `{where}` (bool, int or float arrays). Received: "
                f"dtype {dtype}. Encode the values as numbers first (e.g. class indices "
                "for strings, timestamps as floats)."
            )
        if not allow_complex and jnp.issubdtype(dtype, jnp.complexfloating):
            raise TypeError(
                f"Expected real numbers in `{where}`: the model was not built on complex "
                f"inputs. Received: dtype {dtype}. Pass np.real(...) or np.abs(...) of it, "
                "or call model.init(x) with complex inputs first to build a complex model."
            )


def to_numpy(tree: PyTree, name: str = "x") -> PyTree:
    """Converts every leaf (numpy, JAX, torch CPU tensors, lists) to a numpy array.

    The arrays are in the dtypes the device will hold (see :func:`to_device_dtypes`).

    Raises:
      TypeError: for leaves that are not numbers.
    """
    tree = jax.tree_util.tree_map(np.asarray, tree, is_leaf=is_array)
    check_numeric(tree, name)
    return to_device_dtypes(tree, name)


def device_dtype(dtype: Any) -> np.dtype:
    """The dtype a host array of ``dtype`` takes on the device (see :func:`to_device_dtypes`).

    >>> device_dtype(np.float64), device_dtype(np.uint8)
    (dtype('float32'), dtype('uint8'))
    """
    dtype = np.dtype(dtype)
    if jax.config.jax_enable_x64:  # type: ignore[attr-defined]  # set dynamically by JAX
        return dtype
    return _NARROW_DTYPES.get(dtype, dtype)


def to_device_dtypes(tree: PyTree, name: str = "x") -> PyTree:
    """Narrows 64-bit leaves on the host to the dtypes JAX puts on the device.

    While ``jax.config.jax_enable_x64`` is False, JAX truncates float64, int64, uint64
    and complex128 arrays (with a warning wherever the dtype is requested explicitly).
    This converts them once, leaf by leaf, to float32, int32, uint32 and complex64.
    Other leaves, and every leaf while x64 is enabled, are returned unchanged.

    Args:
      tree: an array or a pytree of arrays.
      name: what ``tree`` is called in error messages, e.g. ``"x"``.

    Returns:
      ``tree`` with its 64-bit leaves narrowed.

    Raises:
      ValueError: if an integer leaf holds a value that does not fit in 32 bits.

    >>> to_device_dtypes({"a": np.zeros(2), "b": np.arange(2)})["b"].dtype
    dtype('int32')
    """
    if jax.config.jax_enable_x64:  # type: ignore[attr-defined]  # set dynamically by JAX
        return tree

    def narrow(path, leaf):
        narrow_dtype = _NARROW_DTYPES.get(getattr(leaf, "dtype", None))
        if narrow_dtype is None:
            return leaf
        leaf = np.asarray(leaf)
        if narrow_dtype.kind in "iu" and leaf.size:
            info = np.iinfo(narrow_dtype)
            low, high = leaf.min(), leaf.max()
            if low < info.min or high > info.max:
                where = f"{name}{jax.tree_util.keystr(path)}"
                raise ValueError(
                    f"Expected the integers in `{where}` to fit in {narrow_dtype} (JAX's "
                    f"integer type while jax_enable_x64 is off). Received: values from {low} "
                    f"to {high}. Enable 64-bit types with jax.config.update('jax_enable_x64', "
                    "True), or re-encode the values (e.g. as indices from 0)."
                )
        return leaf.astype(narrow_dtype)

    return jax.tree_util.tree_map_with_path(narrow, tree, is_leaf=is_array)


def _non_finite(leaf: np.ndarray) -> np.ndarray | None:
    """The mask of entries of a floating-point ``leaf`` that are not finite on the device.

    NaN and Inf, and (while ``jax_enable_x64`` is off) float64 values beyond float32's
    range, which the narrowing to float32 would turn into Inf. None for other dtypes.
    ``jnp.issubdtype`` also counts ml_dtypes' bfloat16 and float8 types as inexact, which
    numpy does not; they are widened to float32 for the check.
    """
    if not jnp.issubdtype(leaf.dtype, jnp.inexact):
        return None
    if not np.issubdtype(leaf.dtype, np.inexact):
        leaf = leaf.astype(np.float32)
    bad = ~np.isfinite(leaf)
    if leaf.dtype in _NARROW_DTYPES and not jax.config.jax_enable_x64:  # type: ignore[attr-defined]
        bad |= np.abs(leaf) > _FLOAT32_MAX  # complex64 holds two float32
    return bad


def _surely_finite(leaf: np.ndarray) -> bool:
    """A fast pass for the common case: a float32 leaf whose sum is finite.

    A NaN or an Inf makes the sum non-finite, so a finite sum proves every entry finite
    (one pass, no mask allocated). A non-finite sum may also be an overflow of large
    finite values: the exact check then decides. Other dtypes take the exact check.
    """
    if leaf.dtype != np.float32:
        return False
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow only means "check"
        return bool(np.isfinite(np.add.reduce(leaf, axis=None)))


def check_finite(tree: PyTree, name: str) -> None:
    """Raises ValueError naming the first leaf of ``tree`` that holds NaN or Inf.

    Every floating-point dtype is checked, including ``bfloat16`` and the float8 types,
    and float64 values are checked against the float32 range they are narrowed to.
    """
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree, is_leaf=is_array):
        leaf = np.asarray(leaf)
        if _surely_finite(leaf):
            continue
        bad = _non_finite(leaf)
        if bad is not None and bad.any():
            first = np.argwhere(bad)[0]
            value = leaf[tuple(first)]
            overflow = ""
            if np.isfinite(value):
                overflow = (
                    f" It overflows {_NARROW_DTYPES[leaf.dtype]} (max {_FLOAT32_MAX:.4g}), "
                    f"the dtype `{name}` takes on the device; rescale it."
                )
            raise ValueError(
                f"Expected finite values in `{name}`. Received: {value} at "
                f"{name}{jax.tree_util.keystr(path)}[{', '.join(map(str, first))}].{overflow} "
                "Clean the data, or pass check_inputs=False to skip this check."
            )


def check_input_spec(x: PyTree, spec: PyTree, name: str = "x") -> None:
    """Checks that ``x`` has the structure and row shapes the model was built on.

    Only shapes are compared, not dtypes (integer and float inputs may both be valid),
    and only on array metadata: nothing runs on a device.

    Args:
      x: an array or a pytree of arrays, with the batch on axis 0.
      spec: a pytree of ``jax.ShapeDtypeStruct`` with a leading axis of size 1, the
        per-row shapes the model was built with, e.g. ``ShapeDtypeStruct((1, 3), float32)``.
      name: what ``x`` is called in error messages.

    Raises:
      ValueError: if the pytree structures differ, or a leaf has rows of another shape.

    >>> spec = jax.ShapeDtypeStruct((1, 3), jnp.float32)
    >>> check_input_spec(np.zeros((5, 3)), spec)
    >>> check_input_spec(np.zeros(3), spec)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
      ...
    ValueError: Expected `x` with rows of shape (3,) ... pass x[None] (or np.expand_dims(x, 0)).
    """
    x_leaves, x_def = jax.tree_util.tree_flatten_with_path(x, is_leaf=is_array)
    spec_leaves, spec_def = jax.tree_util.tree_flatten(spec)
    if x_def != spec_def:  # type: ignore[operator]  # PyTreeDef: no jaxlib stub
        raise ValueError(
            f"Expected `{name}` with the structure the model was built on: "
            f"{spec_def}. Received: {name} with structure {x_def}. Pass inputs "
            "with the same keys and nesting as the first batch."
        )
    for (path, leaf), expected in zip(x_leaves, spec_leaves):
        shape, row = tuple(np.shape(leaf)), tuple(expected.shape[1:])
        if len(shape) == len(expected.shape) and shape[1:] == row:
            continue
        where = f"{name}{jax.tree_util.keystr(path)}"
        if shape == row:
            fix = (
                " It looks like one example without its batch axis: pass "
                f"{where}[None] (or np.expand_dims({where}, 0))."
            )
        else:
            fix = " Pass rows shaped like the ones the model was built on."
        raise ValueError(
            f"Expected `{where}` with rows of shape {row} (the model was built on "
            f"inputs of shape {(None, *row)}). Received: {where} of shape "
            f"{shape}.{fix}"
        )


def sparse_labels(
    labels: Any,
    classes: int,
    out_ndim: int,
    name: str = "y",
    ignore_class: int | None = None,
    check: bool = True,
) -> Any:
    """Checks integer class labels against the number of classes of the output.

    Labels of shape ``[batch, ..., 1]`` for outputs ``[batch, ..., classes]`` lose their
    trailing axis, as Keras squeezes them. Host arrays are checked in one pass; other
    arrays (already on a device) are returned unchecked.

    Args:
      labels: the labels of a sparse crossentropy, ``[batch, ...]`` or ``[batch, ..., 1]``.
      classes: the size of the output's last axis.
      out_ndim: the number of axes of the output, the batch axis included.
      name: what the labels are called in error messages.
      ignore_class: a label value that is allowed besides ``0 .. classes - 1``.
      check: check the values (False: only squeeze).

    Returns:
      The labels, without a trailing axis of size 1.

    Raises:
      ValueError: for a label that is not an integer in ``[0, classes)``.

    >>> sparse_labels(np.array([[0], [2]]), 3, 2).shape
    (2,)
    """
    if labels is None or not hasattr(labels, "shape"):
        return labels
    if np.ndim(labels) == out_ndim and np.shape(labels)[-1] == 1:
        labels = labels[..., 0]
    if not check or not isinstance(labels, np.ndarray) or labels.size == 0:
        return labels
    values = labels if labels.dtype.kind in "biu" else labels.astype(np.float64)
    bad = (values < 0) | (values >= classes)
    if values.dtype.kind == "f":
        bad |= values != np.round(values)
    if ignore_class is not None:
        bad &= values != ignore_class
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        allowed = "" if ignore_class is None else f" (or ignore_class={ignore_class})"
        raise ValueError(
            f"Expected `{name}` to hold integer class indices in [0, {classes}){allowed}: "
            f"the model has {classes} outputs per row. Received: "
            f"{name}[{', '.join(map(str, first))}]={labels[first]}. Encode the labels as "
            f"0 .. {classes - 1}, or give the last layer one output per class."
        )
    return labels


def take_rows(tree: PyTree, start: int | None, stop: int | None) -> PyTree:
    return jax.tree_util.tree_map(lambda a: a[start:stop], tree, is_leaf=is_array)


def _class_weight_table(class_weight: Any) -> dict[int, float]:
    """``class_weight`` as ``{class index: weight}``, checked."""
    if not isinstance(class_weight, Mapping):
        raise TypeError(
            "Expected `class_weight` to be a dict {class index: weight}. "
            f"Received: {type(class_weight).__name__}."
        )
    bad_keys = [
        key
        for key in class_weight
        if isinstance(key, bool) or not isinstance(key, (int, np.integer)) or key < 0
    ]
    if bad_keys:
        raise ValueError(
            "Expected `class_weight` keys to be non-negative integer class "
            f"indices. Received: class_weight keys {bad_keys!r}. Map each class "
            "index to its weight, e.g. {0: 1.0, 1: 5.0}."
        )
    table, bad = {}, {}
    for cls, weight in class_weight.items():
        try:
            value = float(weight)
        except (TypeError, ValueError):
            value = float("nan")
        if not (np.isfinite(value) and value >= 0) or isinstance(weight, (bool, str)):
            bad[cls] = weight
        table[int(cls)] = value
    if bad:
        raise ValueError(
            "Expected `class_weight` values to be finite numbers >= 0. "
            f"Received: class_weight items {bad!r}. Give every class a "
            "finite, non-negative weight."
        )
    return table


def _class_labels(y: np.ndarray) -> np.ndarray:
    """The class index of every row of integer labels ``[n]``/``[n, 1]`` or one-hot ``y``."""
    fix = (
        "`class_weight` needs integer class labels [n] or one-hot labels [n, classes]; "
        "for other targets, pass per-row weights as `sample_weight` instead."
    )
    numeric = (
        y.dtype == bool
        or jnp.issubdtype(y.dtype, jnp.integer)
        or jnp.issubdtype(y.dtype, jnp.floating)
    )
    if not numeric or y.ndim not in (1, 2) or (y.ndim == 2 and y.shape[1] == 0):
        raise ValueError(
            f"Expected `class_weight` with class labels. Received: y of shape "
            f"{y.shape} and dtype {y.dtype}. {fix}"
        )
    values = y.astype(np.float64)
    if y.ndim == 2 and y.shape[1] > 1:
        not_one_hot = ~(((values == 0) | (values == 1)).all(axis=1) & (values.sum(axis=1) == 1))
        if not_one_hot.any():
            row = int(np.argmax(not_one_hot))
            raise ValueError(
                f"Expected `class_weight` with one-hot labels. Received: y of "
                f"shape {y.shape} whose row {row} is not one-hot: "
                f"{values[row].tolist()}. {fix}"
            )
        return np.argmax(values, axis=1)
    values = values.reshape(len(y))
    bad = ~(np.isfinite(values) & (values == np.round(values)) & (values >= 0))
    if bad.any():
        row = int(np.argmax(bad))
        raise ValueError(
            f"Expected `class_weight` with non-negative integer labels. Received: "
            f"y[{row}]={y.reshape(len(y))[row]}. {fix}"
        )
    return values.astype(np.int64)


def class_weights_for(
    y: np.ndarray, class_weight: Mapping[int, float], require_present: bool = True
) -> np.ndarray:
    """Per-row weights from a ``{class: weight}`` dict; classes not in the dict weigh 1.

    Labels may be integers ``[n]`` (or ``[n, 1]``), or one-hot ``[n, classes]`` where
    every row holds a single 1 and zeros elsewhere.

    Args:
      y: the labels.
      class_weight: non-negative integer class index -> finite weight >= 0.
      require_present: refuse weights for classes absent from ``y`` (a likely typo in
        ``fit``'s whole dataset; a single batch of ``train_on_batch`` may lack a class).

    Returns:
      A float32 vector with the weight of each row's class.

    Raises:
      TypeError: if ``class_weight`` is not a dict.
      ValueError: for keys that are not non-negative integers, weights that are negative
        or not finite, labels that are neither integer nor one-hot, or (with
        ``require_present``) a class that never occurs in ``y``.

    >>> class_weights_for(np.array([0, 1, 1]), {1: 2.0})
    array([1., 2., 2.], dtype=float32)
    """
    table = _class_weight_table(class_weight)
    labels = _class_labels(np.asarray(y))
    present = set(np.unique(labels).tolist())
    absent = sorted(c for c in table if c not in present)
    if absent and require_present:
        raise ValueError(
            f"Expected `class_weight` to name classes that occur in `y` "
            f"({sorted(present)}). Received weights for absent classes {absent}."
        )
    weights = np.ones(max(present | set(table), default=-1) + 1, np.float32)
    for cls, weight in table.items():
        weights[cls] = weight
    return weights[labels]


def present_classes(y: Any) -> set[int]:
    """The class indices that occur in labels ``y`` (integer, or one-hot rows).

    With :func:`check_classes_present`, the check :func:`class_weights_for` makes of a
    whole dataset, for labels read a part at a time.

    Raises:
      ValueError: for labels that are neither integer class indices nor one-hot.
    """
    return set(np.unique(_class_labels(np.asarray(y))).tolist())


def check_classes_present(class_weight: Mapping[int, float], present: set[int]) -> None:
    """Refuses ``class_weight`` keys for classes outside ``present`` (see
    :func:`class_weights_for`'s ``require_present``).

    Raises:
      ValueError: naming the absent classes.
    """
    absent = sorted(c for c in _class_weight_table(class_weight) if c not in present)
    if absent:
        raise ValueError(
            f"Expected `class_weight` to name classes that occur in `y` "
            f"({sorted(present)}). Received weights for absent classes {absent}."
        )


def row_weights(
    n: int,
    y: PyTree,
    sample_weight: Any,
    class_weight: Mapping | None,
    require_present: bool = True,
    name: str = "sample_weight",
) -> Any:
    """``sample_weight * class_weight[y]`` as float32 weights of ``n`` rows.

    ``sample_weight`` is one weight per row ``[n]``, or per element of the targets
    ``[n, ...]`` (a ``[batch, seq]`` token mask for a language model), which the losses
    and mean metrics then use per token. A dict (or list) of such weights, one per output
    of a multi-output model, gives ``{output name: weights}`` (see ``hkfit._outputs``).
    ``require_present`` is passed to :func:`class_weights_for`; ``name`` is what
    ``sample_weight`` is called in error messages.
    """
    per_output = outputs_lib.named_weights(sample_weight)
    if per_output:
        if class_weight is not None:
            raise ValueError(
                "`class_weight` needs one array of class labels; it does not apply to a "
                "model with several outputs. Pass per-output `sample_weight` instead. "
                f"Received: class_weight={class_weight!r} with sample_weight for "
                f"{sorted(per_output)}."
            )
        return {
            out: row_weights(n, None, w, None, name=f"{name}[{out!r}]").astype(np.float32)
            for out, w in per_output.items()
        }
    weights = np.ones(n, np.float32)
    if sample_weight is not None and per_output is None:
        sample_weight = checked_weights(sample_weight, name)
        if sample_weight.ndim == 0 or sample_weight.shape[0] != n:
            raise ValueError(
                f"Expected `{name}` of shape ({n},), one weight per row, or ({n}, ...) "
                f"per token. Received: shape {sample_weight.shape}."
            )
        weights = sample_weight.copy()
    if class_weight is not None:
        if not is_array(y):
            raise ValueError(
                "`class_weight` needs `y` to be one array of class labels. "
                f"Received: y of type {type(y).__name__}."
            )
        per_row = class_weights_for(y, class_weight, require_present)
        weights = weights * per_row.reshape(per_row.shape + (1,) * (weights.ndim - 1))
    return weights


def checked_weights(weights: Any, name: str) -> np.ndarray:
    """``weights`` as float32, checked to be finite numbers >= 0.

    The values are checked before the cast, so a float64 weight beyond float32's range is
    refused rather than turned into Inf.

    Raises:
      TypeError: for weights that are not numbers.
      ValueError: for negative, NaN or infinite weights.
    """
    host = np.asarray(weights)
    if host.dtype != bool and not jnp.issubdtype(host.dtype, jnp.number):
        raise TypeError(f"Expected `{name}` to hold numbers >= 0. Received: dtype {host.dtype}.")
    if jnp.issubdtype(host.dtype, jnp.complexfloating):
        raise TypeError(f"Expected real `{name}`. Received: dtype {host.dtype}.")
    wide = host.astype(np.float64)
    bad = ~np.isfinite(wide) | (wide < 0) | (wide > np.finfo(np.float32).max)
    if bad.any():
        first = tuple(np.argwhere(bad)[0]) if wide.ndim else ()
        raise ValueError(
            f"Expected `{name}` to hold finite values >= 0 (a negative weight would train "
            f"the model away from its targets). Received: {wide[first]} at "
            f"{name}[{', '.join(map(str, first))}]."
        )
    return host.astype(np.float32)


def epoch_order(
    key: jax.Array,
    epoch: int,
    *,
    num_rows: int,
    batch_size: int,
    shuffle: bool,
    pad_tail: bool = False,
) -> tuple[np.ndarray, np.ndarray | None]:
    """The epoch's row order as full batches ``[num_batches, batch_size]`` and a tail.

    The order is a function of ``(key, epoch)`` only, so a resumed run sees the same
    batches. It is drawn with numpy on the host (a device permutation costs a compilation
    and more time than the upload of ``num_rows`` indices). The tail
    ``[1, num_rows % batch_size]`` holds the leftover rows (``None`` if there are none).
    With ``pad_tail`` the leftover rows become one more full batch instead, padded with
    the out-of-range index ``num_rows``, which the fused step treats as a zero-weight row.
    """
    order = np.arange(num_rows, dtype=np.int32)
    if shuffle:
        seed = [int(word) for word in np.ravel(jax.random.key_data(key))]
        order = np.random.default_rng([*seed, int(epoch)]).permutation(order)
    num_full = num_rows // batch_size
    cut = num_full * batch_size
    full = order[:cut].reshape(num_full, batch_size)
    tail = order[None, cut:] if cut < num_rows else None
    if pad_tail and tail is not None:
        padded = np.full((1, batch_size), num_rows, np.int32)
        padded[0, : tail.shape[1]] = tail[0]
        full, tail = np.concatenate([full, padded]), None
    if len(full) == 0:  # a placeholder row keeps the fused loop's shapes valid
        full = np.zeros((1, batch_size), np.int32)
    return full, tail


# --- Iterables ---------------------------------------------------------------------------


def split_batch(batch: Any) -> tuple[PyTree, PyTree, Any]:
    """Splits an ``(x, y)`` or ``(x, y, sample_weight)`` batch."""
    if isinstance(batch, (tuple, list)) and len(batch) in (2, 3):
        x, y = batch[0], batch[1]
        w = batch[2] if len(batch) == 3 else None
        return x, y, w
    raise ValueError(
        "Expected each batch of an iterable `x` to be a tuple (x, y) or "
        f"(x, y, sample_weight). Received: {type(batch).__name__}"
        f"{f' of length {len(batch)}' if hasattr(batch, '__len__') else ''}."
    )


class Prefetcher:
    """Moves the batches of an iterator to the device ``size`` batches ahead.

    ``jax.device_put`` is asynchronous, so the copy of batch ``i + 1`` overlaps the step
    on batch ``i``.
    """

    def __init__(self, iterator: Iterator, convert, size: int = 2):
        self._iterator = iterator
        self._convert = convert
        self._queue: collections.deque = collections.deque()
        self._size = size
        self._done = False

    def _fill(self):
        while not self._done and len(self._queue) < self._size:
            try:
                self._queue.append(self._convert(next(self._iterator)))
            except StopIteration:
                self._done = True

    def __iter__(self):
        return self

    def __next__(self):
        self._fill()
        if not self._queue:
            raise StopIteration
        item = self._queue.popleft()
        self._fill()
        return item


def batch_weights(w: Any, n: int) -> Any:
    """The weights of an iterable's batch: ``[n]``, ``[n, 1]`` (flattened) or per token.

    A dict (or list) of them, one per output, gives ``{output name: weights}``.
    """
    per_output = outputs_lib.named_weights(w)
    if per_output == {}:
        return np.ones(n, np.float32)
    if per_output:
        return {name: batch_weights(v, n) for name, v in per_output.items()}
    w = checked_weights(w, "sample_weight")
    if w.ndim == 0 or w.shape[0] != n:
        raise ValueError(
            f"Expected the sample weights of a batch (`sample_weight`, its third item) to "
            f"have {n} rows, one per example. Received: shape {w.shape}."
        )
    return w.reshape(n) if w.size == n else w


def metric_mask(weights: Any) -> np.ndarray:
    """What plain ``metrics=`` weigh rows by: 1 for every row, whatever its sample weight.

    Per-token weights (``[n, seq]``, more axes than one per row) mark padding tokens with
    0, and those stay masked for every metric. Per-output weights (a dict) give one 1 per
    row; each output's metrics read their own token masks (see ``hkfit._outputs``).
    """
    if isinstance(weights, dict):
        return np.ones(len(next(iter(weights.values()))), np.float32)
    weights = np.asarray(weights, np.float32)
    if weights.ndim > 1:
        return (weights > 0).astype(np.float32)
    return np.ones(weights.shape, np.float32)


def device_batch(batch: Any, sharding=None):
    """``(x, y, w, mask)`` on the device, ``w`` filled with ones when absent.

    ``mask`` is :func:`metric_mask` of ``w``: the four fields of a :class:`hkfit.Batch`.
    """
    x, y, w = split_batch(batch)
    x, y = to_numpy(x, "x"), to_numpy(y, "y")
    n = num_rows(x, "x")
    if y is not None and num_rows(y, "y") != n:
        raise ValueError(
            f"Expected `x` and `y` of a batch to have the same number of rows. "
            f"Received: {n} and {num_rows(y, 'y')}."
        )
    w = np.ones(n, np.float32) if w is None else batch_weights(w, n)
    return jax.device_put((x, y, w, metric_mask(w)), sharding)


def iterate(source: Iterable, steps: int | None):
    """Yields up to ``steps`` items of ``source`` (all of them when ``steps`` is None)."""
    for i, item in enumerate(source):
        yield item
        if steps is not None and i + 1 >= steps:
            return
