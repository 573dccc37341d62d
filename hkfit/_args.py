"""Checks of the public arguments of ``Model`` and its methods, in one place.

Every check raises a ``ValueError`` / ``TypeError`` that names the argument, the
expected and the received value: ``Expected `batch_size` to be an int >= 1. Received:
batch_size=0.``
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from hkfit import _data as data_lib
from hkfit import _pacing
from hkfit import _stream as stream_lib
from hkfit import metrics as metrics_lib
from hkfit.callbacks.progress import resolve_verbose

positive_int = data_lib.positive_int
check_steps_per_execution = _pacing.check


def to_key(seed: Any) -> jax.Array:
    """An int seed or a (typed or raw uint32) JAX key -> a typed key."""
    if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
        return jax.random.key(int(seed))
    if isinstance(seed, jax.Array):
        if jnp.issubdtype(seed.dtype, jax.dtypes.prng_key):
            return seed
        if seed.dtype == jnp.uint32 and seed.shape == (2,):
            return jax.random.wrap_key_data(seed)
    raise TypeError(
        "Expected `seed` to be an int or a JAX PRNG key. "
        f"Received: seed={seed!r} of type {type(seed).__name__}."
    )


def metric_specs(metrics: Any, arg: str = "metrics") -> list:
    """``metrics`` as a list, every name checked now (fail fast)."""
    if isinstance(metrics, (str, bytes)) or not isinstance(metrics, Iterable):
        raise TypeError(
            f"Expected `{arg}` to be a list of names, callables or metric "
            f"objects. Received: {arg}={metrics!r}."
        )
    specs = list(metrics)
    for spec in specs:
        metrics_lib.get(spec)
    return specs


def validation_epochs(validation_freq: Any) -> Callable[[int], bool]:
    """``validation_freq`` -> whether to validate after a 1-based epoch.

    Raises:
      TypeError: for anything but an int or a collection of ints.
      ValueError: for an int < 1 or a listed epoch < 1 (which would never validate).
    """
    if isinstance(validation_freq, (int, np.integer)) and not isinstance(validation_freq, bool):
        every = positive_int(validation_freq, "validation_freq")
        return lambda e: e % every == 0
    if isinstance(validation_freq, (list, tuple, set, frozenset, range)):
        epochs = list(validation_freq)
        bad = [
            e
            for e in epochs
            if isinstance(e, (bool, np.bool_)) or not isinstance(e, (int, np.integer)) or e < 1
        ]
        if bad:
            raise ValueError(
                "Expected `validation_freq` to list 1-based epochs (ints >= 1). "
                f"Received: validation_freq={validation_freq!r}, with {bad!r}."
            )
        wanted = frozenset(int(e) for e in epochs)
        return lambda e: e in wanted
    raise TypeError(
        "Expected `validation_freq` to be an int or a list of 1-based epochs. "
        f"Received: validation_freq={validation_freq!r}."
    )


def check_shuffle(shuffle: Any) -> bool:
    """``shuffle`` as a bool; anything but ``True``/``False`` (numpy's too) is refused."""
    if not isinstance(shuffle, (bool, np.bool_)):
        raise TypeError(
            f"Expected `shuffle` to be True or False. Received: shuffle={shuffle!r} of "
            f"type {type(shuffle).__name__}."
        )
    return bool(shuffle)


def check_fraction(value: Any, name: str) -> float:
    """A real number in ``[0, 1)`` (Python or numpy scalar) as a float."""
    if (
        isinstance(value, (bool, np.bool_))
        or not isinstance(value, numbers.Real)
        or not 0 <= float(value) < 1
    ):
        raise ValueError(f"Expected `{name}` in [0, 1). Received: {name}={value!r}.")
    return float(value)


class FitArgs(NamedTuple):
    """The checked scalar arguments of ``fit``."""

    batch_size: int
    epochs: int
    verbose: int
    initial_epoch: int
    steps_per_epoch: int | None
    validation_split: float
    validation_batch_size: int
    validate_after: Callable[[int], bool]
    steps_per_execution: Any
    gradient_accumulation_steps: int = 1
    device_data_budget: int | None = None  # None: the default budget (hkfit._stream)


def fit_args(
    *,
    batch_size: Any,
    epochs: Any,
    verbose: Any,
    initial_epoch: Any,
    steps_per_epoch: Any,
    validation_split: Any,
    validation_batch_size: Any,
    validation_freq: Any,
    steps_per_execution: Any,
    gradient_accumulation_steps: Any = 1,
    device_data_budget: Any = None,
) -> FitArgs:
    """Checks ``fit``'s scalar arguments before any data is touched."""
    batch_size = positive_int(batch_size, "batch_size")
    gradient_accumulation_steps = positive_int(
        gradient_accumulation_steps, "gradient_accumulation_steps"
    )
    epochs = positive_int(epochs, "epochs", 0)
    initial_epoch = positive_int(initial_epoch, "initial_epoch", 0)
    if epochs < initial_epoch:
        raise ValueError(
            f"Expected `epochs` >= `initial_epoch` (epochs is the epoch count "
            f"to reach). Received: epochs={epochs}, initial_epoch={initial_epoch}."
        )
    if steps_per_epoch is not None:
        steps_per_epoch = positive_int(steps_per_epoch, "steps_per_epoch")
    validation_split = check_fraction(validation_split, "validation_split")
    validation_batch_size = positive_int(
        validation_batch_size or batch_size, "validation_batch_size"
    )
    check_steps_per_execution(steps_per_execution)
    device_data_budget = stream_lib.check_budget(device_data_budget)
    return FitArgs(
        batch_size,
        epochs,
        resolve_verbose(verbose),
        initial_epoch,
        steps_per_epoch,
        validation_split,
        validation_batch_size,
        validation_epochs(validation_freq),
        steps_per_execution,
        gradient_accumulation_steps,
        device_data_budget,
    )


def signature(tree: Any) -> tuple:
    """The structure, per-row shapes and dtypes of a batch (what a compile depends on)."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return treedef, tuple(
        (tuple(np.shape(a)[1:]), str(getattr(a, "dtype", type(a)))) for a in leaves
    )


def count(tree: Any) -> int:
    """The number of scalars in a pytree of arrays."""
    return sum(int(np.prod(np.shape(a))) for a in jax.tree_util.tree_leaves(tree))


def is_iterable_input(x: Any, y: Any) -> bool:
    """True when ``x`` is an iterable of batches rather than arrays (or a pytree of them).

    Without ``y``, a list or tuple is an iterable of batches, as in Keras; with ``y`` it is
    a multi-input pytree when all its leaves are arrays.
    """
    if isinstance(x, dict) or data_lib.is_array(x):
        return False
    if y is None or not data_lib.is_array_tree(x):
        return True
    # a list of (x, y[, w]) pairs is a list of batches, whatever y says
    return isinstance(x, list) and all(
        isinstance(item, tuple) and len(item) in (2, 3) for item in x
    )


def check_iterable_args(
    y: Any, sample_weight: Any, class_weight: Any, validation_split: float
) -> None:
    """Arguments that only arrays take, refused for an iterable ``x``."""
    if y is not None:
        raise ValueError(
            "Expected `y=None` with an iterable `x`: an iterable carries its "
            "own targets, yielding (x, y) or (x, y, sample_weight) batches. "
            f"Received: y of type {type(y).__name__}."
        )
    if validation_split:
        raise ValueError(
            "`validation_split` needs array inputs; with an iterable `x` pass "
            f"`validation_data` instead. Received: validation_split={validation_split}."
        )
    if class_weight is not None or sample_weight is not None:
        raise ValueError(
            "`class_weight` and `sample_weight` need array inputs; an iterable "
            "`x` yields (x, y, sample_weight) batches instead. Received: "
            f"sample_weight of type {type(sample_weight).__name__}, "
            f"class_weight={class_weight!r}."
        )


__all__: Sequence[str] = ()
