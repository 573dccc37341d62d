"""Property checks for custom Haiku layers, for use in unit tests.

:func:`check_layer` transforms a forward function (a plain function using Haiku
modules, as given to ``hkfit.Model``), initializes it on an example batch and checks
what every well-behaved layer does: the expected output shape and dtype, finite
outputs and gradients, the same result with and without ``jax.jit`` and under
``jax.vmap``, rows of a batch that do not mix, and a sound use of random keys. A
failure raises ``AssertionError`` naming the property, the mode and the numbers.
:class:`LayerTestCase` offers the same checks as ``chex.TestCase`` assertions, and
:func:`assert_compiles_once` pins the trace count of a jitted function.

>>> import haiku as hk, jax.numpy as jnp
>>> report = check_layer(lambda x: hk.Linear(4)(x), jnp.ones((3, 2)), output_shape=(None, 4))
>>> "jit_consistent" in report.checked
True
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import itertools
from collections.abc import Callable, Sequence
from typing import Any

import chex
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["LayerReport", "LayerTestCase", "assert_compiles_once", "check_layer"]

_NUM_VMAP_COPIES = 3  # stacked copies of `x` (rolled along the batch) for vmap_consistent
_NUM_OTHER_KEYS = 4  # extra keys tried to see whether the output depends on the rng
_PERTURBATION = 0.1  # scale of the noise added to params when re-checking zero gradients
_unique_ids = itertools.count()
_tree = jax.tree_util


@dataclasses.dataclass(frozen=True)
class LayerReport:
    """What :func:`check_layer` verified.

    Attributes:
      checked: the properties that passed, with the mode in brackets for forwards
        that take ``is_training``, e.g. ``"jit_consistent[is_training=False]"``.
      skipped: property -> why it was not checked (disabled by the caller, or not
        applicable to this layer in this mode).
    """

    checked: tuple[str, ...]
    skipped: dict[str, str]

    def __str__(self) -> str:
        lines = [f"LayerReport: {len(self.checked)} passed, {len(self.skipped)} skipped"]
        lines += [f"  passed   {name}" for name in self.checked]
        lines += [f"  skipped  {name}: {why}" for name, why in self.skipped.items()]
        return "\n".join(lines)


def _is_float(leaf: Any) -> bool:
    return jnp.issubdtype(jnp.result_type(leaf), jnp.floating)


def _paths(tree: Any, prefix: str) -> list[tuple[str, Any]]:
    return [(prefix + _tree.keystr(p), v) for p, v in _tree.tree_flatten_with_path(tree)[0]]


def _param_paths(params: hk.Params) -> list[tuple[str, Any]]:
    return [(f"{module}/{name}", v) for module, name, v in hk.data_structures.traverse(params)]


def _mismatch(a: Any, b: Any, atol: float, rtol: float, names: tuple[str, str]) -> str | None:
    """Describes the largest disagreement between two pytrees of arrays, or None."""
    a_def, b_leaves = _tree.tree_structure(a), _tree.tree_leaves(b)
    if a_def != _tree.tree_structure(b):  # type: ignore[operator]  # PyTreeDef: no jaxlib stub
        return f"the output structures differ: {a_def} vs {_tree.tree_structure(b)}"
    for (where, u), v in zip(_paths(a, "output"), b_leaves):
        u, v = np.asarray(u, np.float64), np.asarray(v, np.float64)
        if u.shape != v.shape:
            return f"{where} has shape {u.shape} ({names[0]}) vs {v.shape} ({names[1]})"
        bad = ~np.isclose(u, v, atol=atol, rtol=rtol, equal_nan=True)
        if bad.any():
            diff = np.nan_to_num(np.where(bad, np.abs(u - v), 0.0), nan=np.inf)
            idx = tuple(int(i) for i in np.unravel_index(np.argmax(diff), diff.shape))
            return (
                f"max abs difference {diff[idx]:.6g} at index {idx} of {where} "
                f"({int(bad.sum())} of {bad.size} values differ beyond atol={atol}, "
                f"rtol={rtol}); {names[0]}={u[idx]:.6g}, {names[1]}={v[idx]:.6g}"
            )
    return None


def _non_finite(items: Sequence[tuple[str, Any]]) -> str | None:
    """Describes the first named floating-point array holding NaN or Inf, or None."""
    for where, leaf in items:
        bad = ~np.isfinite(np.asarray(leaf, np.float64)) if _is_float(leaf) else None
        if bad is not None and bad.any():
            idx = tuple(int(i) for i in np.argwhere(bad)[0])
            return (
                f"{where} has {int(bad.sum())} non-finite values of {bad.size} "
                f"(first at index {idx}: {np.asarray(leaf)[idx]})"
            )
    return None


def _is_shape(spec: Any) -> bool:
    return isinstance(spec, (tuple, list)) and all(
        d is None or d is Ellipsis or (isinstance(d, (int, set)) and not isinstance(d, bool))
        for d in spec
    )


def _as_batch(x: Any, min_rows: int) -> Any:
    """Validates `x`: an array or pytree of arrays sharing one leading batch size."""
    try:
        arrays = _tree.tree_map(jnp.asarray, x)
    except TypeError:
        arrays = None
    leaves = _tree.tree_leaves(arrays)
    if not leaves or not all(
        jnp.issubdtype(l.dtype, jnp.number) or l.dtype == bool for l in leaves
    ):
        raise TypeError(
            "Expected `x` to be an array or a pytree of arrays. "
            f"Received: x of type {type(x).__name__}."
        )
    x = arrays
    shapes = (
        f"x.shape={tuple(x.shape)}"
        if hasattr(x, "shape")
        else f"x shapes={_tree.tree_map(lambda l: tuple(l.shape), x)}"
    )
    sizes = {l.shape[0] if l.ndim else None for l in _tree.tree_leaves(x)}
    size = sizes.pop() if len(sizes) == 1 else None
    if size is None:
        raise ValueError(
            "Expected every array in `x` to have a leading batch axis of one size. "
            f"Received: {shapes}."
        )
    if size < min_rows:
        why = (
            " when `batch_independent=True` (pass more rows, or batch_independent=False)"
            if min_rows > 1
            else ""
        )
        raise ValueError(
            f"Expected `x` to have a batch of at least {min_rows} "
            f"row{'s' * (min_rows > 1)}{why}. Received: {shapes}."
        )
    return x


def _validate(forward, is_training, output_shape, output_dtype, seed, atol, rtol) -> bool:
    """Validates the arguments of check_layer; returns whether forward takes the flag."""
    if not callable(forward):
        raise TypeError(
            "Expected `forward` to be a plain function using Haiku modules "
            "(check_layer applies hk.transform_with_state itself). Received: "
            f"forward of type {type(forward).__name__}."
        )
    try:
        takes_flag = "is_training" in inspect.signature(forward).parameters
    except (TypeError, ValueError):
        takes_flag = False
    if is_training is not None and not isinstance(is_training, bool):
        raise TypeError(
            "Expected `is_training` to be None, True or False. "
            f"Received: is_training={is_training!r}."
        )
    if is_training is not None and not takes_flag:
        raise ValueError(
            "Expected `is_training=None` because `forward` has no `is_training` "
            f"parameter. Received: is_training={is_training!r}."
        )
    if (
        output_shape is not None
        and not _is_shape(output_shape)
        and not (
            isinstance(output_shape, (tuple, list, dict))
            and all(map(_is_shape, _tree.tree_leaves(output_shape, is_leaf=_is_shape)))
        )
    ):
        raise TypeError(
            "Expected `output_shape` to be a tuple of ints or None (e.g. (None, 10)) "
            f"or a pytree of such tuples. Received: output_shape={output_shape!r}."
        )
    if output_dtype is not None:
        try:
            jnp.dtype(output_dtype)
        except TypeError:
            raise TypeError(
                "Expected `output_dtype` to be a dtype such as jnp.float32. "
                f"Received: output_dtype={output_dtype!r}."
            ) from None
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"Expected `seed` to be an int. Received: seed={seed!r}.")
    for name, tol in (("atol", atol), ("rtol", rtol)):
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol >= 0:
            raise ValueError(f"Expected `{name}` >= 0. Received: {name}={tol!r}.")
    return takes_flag


class _ModeChecks:
    """The checks of one transformed layer in one mode (is_training True, False or absent)."""

    def __init__(
        self,
        transformed: hk.TransformedWithState,
        params: hk.Params,
        state: hk.State,
        keys: tuple[jax.Array, Sequence[jax.Array]],
        x: Any,
        mode: bool | None,
        seed: int,
        atol: float,
        rtol: float,
    ) -> None:
        self.params, self.state, self.x = params, state, x
        self.key, self.other_keys = keys
        self.mode, self.atol, self.rtol = mode, atol, rtol
        self.np_rng = np.random.default_rng(seed)  # Probes and noise: no compile needed.
        self.label = "" if mode is None else f"[is_training={mode}]"
        self.apply = functools.partial(
            transformed.apply, **({} if mode is None else {"is_training": mode})
        )
        self.run = lambda p, s, k, xs: self.apply(p, s, k, xs)[0]
        self.jit_run = jax.jit(self.run)
        self.zero_grads: set[str] | None = None  # Set by check_finite_grads.

    def fail(self, prop: str, message: str):
        raise AssertionError(f"{prop}{self.label} failed: {message}")

    def compare(self, prop: str, what: str, a: Any, b: Any, names: tuple[str, str]) -> None:
        found = _mismatch(a, b, self.atol, self.rtol, names)
        if found:
            self.fail(prop, f"{what}: {found}.")

    @functools.cached_property
    def out(self) -> Any:  # Non-jitted: run op by op, so computed only when a check needs it.
        return self.run(self.params, self.state, self.key, self.x)

    @functools.cached_property
    def jit_out(self) -> Any:
        return self.jit_run(self.params, self.state, self.key, self.x)

    @functools.cached_property
    def draws_key(self) -> bool:
        try:  # Haiku raises a ValueError when hk.next_rng_key() finds no key.
            jax.eval_shape(self.apply, self.params, self.state, None, self.x)
        except ValueError:
            return True
        return False

    def perturbed(self, params: hk.Params) -> hk.Params:
        """Float params plus noise: moves zero-initialized layers off their dead point."""
        noise = lambda l: _PERTURBATION * self.np_rng.standard_normal(l.shape)
        return _tree.tree_map(
            lambda l: (np.asarray(l) + noise(l)).astype(l.dtype) if _is_float(l) else l, params
        )

    @functools.cached_property
    def varies_with_key(self) -> bool:
        # Perturbed params only matter for layers that draw keys (see check_deterministic).
        for params in [self.params] + [self.perturbed(self.params)] * self.draws_key:
            base = self.jit_run(params, self.state, self.key, self.x)
            if any(
                _mismatch(base, self.jit_run(params, self.state, k, self.x), 0.0, 0.0, ("", ""))
                for k in self.other_keys
            ):
                return True
        return False

    def check_output_shape(self, spec: Any) -> None:
        items, out_def = _paths(self.out, "output"), _tree.tree_structure(self.out)
        specs, spec_def = (
            ([spec] * len(items), out_def)
            if _is_shape(spec)
            else (_tree.tree_flatten(spec, is_leaf=_is_shape))
        )
        if spec_def != out_def:  # type: ignore[operator]  # PyTreeDef: no jaxlib stub
            self.fail(
                "output_shape",
                f"the output has structure {out_def}, expected "
                f"{spec_def} from output_shape={spec!r}.",
            )
        for (where, leaf), s in zip(items, specs):
            try:
                chex.assert_shape(leaf, tuple(s))
            except AssertionError:
                self.fail(
                    "output_shape",
                    f"{where} has shape {tuple(leaf.shape)}, expected "
                    f"{tuple(s)} (None matches any size).",
                )

    def check_output_dtype(self, dtype: Any) -> None:
        for where, leaf in _paths(self.out, "output"):
            if leaf.dtype != jnp.dtype(dtype):
                self.fail(
                    "output_dtype", f"{where} has dtype {leaf.dtype}, expected {jnp.dtype(dtype)}."
                )

    def check_finite_output(self) -> None:
        found = _non_finite(_paths(self.out, "output"))
        if found:
            self.fail("finite_output", f"{found}.")

    def check_jit_consistent(self) -> None:
        self.compare(
            "jit_consistent",
            "jitted and non-jitted apply disagree (is a Python-side "
            "value, such as a counter or a np.random draw, baked in at trace time?)",
            self.out,
            self.jit_out,
            ("non-jitted", "jitted"),
        )

    def check_deterministic(self) -> None:
        again = self.run(self.params, self.state, self.key, self.x)
        self.compare(
            "deterministic",
            "two calls with the same rng gave different outputs",
            self.out,
            again,
            ("first call", "second call"),
        )
        if self.mode is not False and self.draws_key and not self.varies_with_key:
            self.fail(
                "deterministic",
                "the layer calls hk.next_rng_key() but its output is "
                f"identical under {_NUM_OTHER_KEYS + 1} different rng keys: it ignores "
                "its random key.",
            )

    def check_batch_independent(self) -> str | None:
        """Returns why the check does not apply, or None once passed; raises on failure.

        Rows are compared at the initial params and again at randomly perturbed ones:
        a zero-initialized layer (such as the logits of ``hk.nets.ResNet``) gives every
        row the same output at init, which would hide any mixing before it.
        """
        if self.varies_with_key:
            return (
                "the output depends on the rng in this mode (random numbers, e.g. "
                "dropout), so a 1-row call draws different ones than the full batch"
            )
        n = _tree.tree_leaves(self.x)[0].shape[0]
        for where, leaf in _paths(self.jit_out, "output"):
            if leaf.ndim == 0 or leaf.shape[0] != n:
                self.fail(
                    "batch_independent",
                    f"{where} has shape {tuple(leaf.shape)}, without "
                    f"the leading batch axis of size {n} of x.",
                )
        perturbed = self.perturbed(self.params)
        for params, at in ((self.params, ""), (perturbed, " at randomly perturbed params")):
            full = self.jit_out if not at else self.jit_run(params, self.state, self.key, self.x)
            rows = [
                self.jit_run(
                    params,
                    self.state,
                    self.key,  # Host slices: no compiles.
                    _tree.tree_map(lambda l: np.asarray(l)[i : i + 1], self.x),
                )
                for i in range(n)
            ]
            stacked = _tree.tree_map(lambda *ls: np.concatenate(ls), *rows)
            found = _mismatch(full, stacked, self.atol, self.rtol, ("full batch", "row alone"))
            if found:
                self.fail(
                    "batch_independent",
                    f"an output row changes when its input row is "
                    f"passed alone (1-row batch) instead of in the full batch{at}: "
                    f"{found}. The first index is the row: the layer mixes examples "
                    "across the batch. If it does so on purpose (batch statistics, as "
                    "hk.BatchNorm uses in training), pass is_training=False to check "
                    "eval mode only, or batch_independent=False.",
                )
        return None

    def check_vmap_consistent(self) -> None:
        copies = [
            _tree.tree_map(lambda l, k=k: np.roll(np.asarray(l), k, axis=0), self.x)
            for k in range(_NUM_VMAP_COPIES)
        ]
        stack = lambda trees: _tree.tree_map(lambda *ls: np.stack(ls), *trees)
        mapped = jax.jit(jax.vmap(self.run, in_axes=(None, None, None, 0)))(
            self.params, self.state, self.key, stack(copies)
        )
        separate = [self.jit_run(self.params, self.state, self.key, c) for c in copies]
        self.compare(
            "vmap_consistent",
            f"jax.vmap of apply over {_NUM_VMAP_COPIES} stacked "
            "copies of x differs from separate calls (the first index is the copy)",
            stack(separate),
            mapped,
            ("separate calls", "vmap"),
        )

    def check_finite_grads(self) -> str | None:
        """Raises on NaN/Inf; records the params whose gradient is all zero."""
        out_leaves = _tree.tree_leaves(self.out)
        probes = {
            i: self.np_rng.standard_normal(leaf.shape, np.float32)
            for i, leaf in enumerate(out_leaves)
            if _is_float(leaf)
        }
        if not probes:
            return "the output has no floating-point array to differentiate"
        trainable, frozen = hk.data_structures.partition(lambda m, n, v: _is_float(v), self.params)
        x_leaves, x_def = _tree.tree_flatten(self.x)
        x_float = {i: leaf for i, leaf in enumerate(x_leaves) if _is_float(leaf)}

        def objective(train, xs):  # A fixed random projection of the output.
            x_new = _tree.tree_unflatten(x_def, [xs.get(i, l) for i, l in enumerate(x_leaves)])
            out = _tree.tree_leaves(
                self.run(hk.data_structures.merge(train, frozen), self.state, self.key, x_new)
            )
            return sum(jnp.vdot(r, out[i].astype(r.dtype)) for i, r in probes.items())

        grad_fn = jax.jit(jax.grad(objective, argnums=(0, 1)))
        g_params, g_x = grad_fn(trainable, x_float)
        x_names = dict(enumerate(name for name, _ in _paths(self.x, "x")))
        found = _non_finite(
            [(f"the gradient w.r.t. parameter '{n}'", g) for n, g in _param_paths(g_params)]
            + [(f"the gradient w.r.t. input {x_names[i]}", g) for i, g in g_x.items()]
        )
        if found:
            self.fail("finite_grads", f"for a random projection of the output, {found}.")
        zero = {n for n, g in _param_paths(g_params) if not np.any(np.asarray(g))}
        if zero:  # Re-check away from the initial point, for zero-initialized layers.
            moved = grad_fn(self.perturbed(trainable), x_float)[0]
            zero &= {n for n, g in _param_paths(moved) if not np.any(g)}
        self.zero_grads = zero
        return None


def check_layer(
    forward: Callable[..., Any],
    x: Any,
    *,
    is_training: bool | None = None,
    output_shape: Any = None,
    output_dtype: Any = None,
    batch_independent: bool = True,
    jit_consistent: bool = True,
    vmap_consistent: bool = True,
    finite_grads: bool = True,
    deterministic: bool = True,
    finite_output: bool = True,
    seed: int = 0,
    atol: float = 1e-5,
    rtol: float = 1e-5,
) -> LayerReport:
    """Checks that a Haiku forward function behaves like a well-formed layer.

    ``forward`` is wrapped with ``hk.transform_with_state`` and initialized on ``x``
    (with ``is_training=True`` if it takes that flag, as ``hk.BatchNorm`` needs). In
    each mode, the enabled properties are checked in this order: output_shape,
    output_dtype, finite_output, jit_consistent, deterministic, batch_independent,
    vmap_consistent, finite_grads.

    Args:
      forward: a plain function using Haiku modules; it takes the batch as its one
        positional argument, and optionally a parameter named ``is_training``.
      x: an example batch: an array or a pytree of arrays sharing the batch size.
      is_training: the mode to check, for a forward taking ``is_training``: ``None``
        checks eval mode (False), then train mode (True). Must be ``None`` for a
        forward without the flag, which is called without it and follows the
        rules of train mode below.
      output_shape: expected shape of every output array, e.g. ``(None, 10)``
        (``None`` matches any size, as in ``chex.assert_shape``), or a pytree of
        shapes with the structure of the output. ``None``: not checked.
      output_dtype: expected dtype of every output array. ``None``: not checked.
      batch_independent: output row ``i`` depends only on input row ``i`` (the full
        batch is compared with 1-row calls, so ``x`` needs 2 rows), at the initial
        params and at randomly perturbed params (so that a zero-initialized layer,
        such as the logits of ``hk.nets.ResNet``, cannot hide mixing before it).
        Skipped, with the reason in the report, in a mode where the layer draws
        random numbers. Batch statistics, as in ``hk.BatchNorm`` training, fail it:
        check such a layer with ``is_training=False``, or ``batch_independent=False``.
      jit_consistent: ``jax.jit`` of apply agrees with plain apply.
      vmap_consistent: ``jax.vmap`` of apply over 3 stacked copies of ``x`` (rolled
        along the batch) agrees with 3 separate calls.
      finite_grads: the gradients of a fixed random projection of the output
        w.r.t. the params and the floating-point inputs are finite, and no param
        gets an all-zero gradient in every checked mode (all-zero gradients are
        checked again at randomly perturbed params, so zero-initialized layers pass).
      deterministic: two calls with the same rng agree, and a layer that calls
        ``hk.next_rng_key()`` changes its output under other keys, at its initial
        or at randomly perturbed params (not required in eval mode).
      finite_output: the output holds no NaN or Inf (turn off for a layer that
        outputs -inf on purpose, e.g. masked logits).
      seed: seed of the keys for init, apply and the random probes.
      atol: absolute tolerance of every comparison.
      rtol: relative tolerance of every comparison.

    Returns:
      A :class:`LayerReport` of the properties checked and skipped (with reasons).

    Raises:
      AssertionError: a property fails; the message names it and the mode, with the
        largest difference and its index, or the offending value or param path.
      ValueError: ``x`` has no common batch axis or too few rows, or ``is_training``,
        ``atol`` or ``rtol`` has a wrong value.
      TypeError: ``forward``, ``x``, ``is_training``, ``output_shape``,
        ``output_dtype`` or ``seed`` has a wrong type.

    >>> import haiku as hk, jax.numpy as jnp
    >>> def forward(x, is_training):
    ...     x = hk.BatchNorm(True, True, 0.9)(hk.Linear(3)(x), is_training)
    ...     return hk.Linear(2)(x)
    >>> x = jnp.arange(8.0).reshape(4, 2)
    >>> check_layer(forward, x)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
      ...
    AssertionError: batch_independent[is_training=True] failed: an output row changes ...
    >>> report = check_layer(forward, x, is_training=False, output_shape=(4, 2))
    >>> "batch_independent[is_training=False]" in report.checked
    True
    """
    takes_flag = _validate(forward, is_training, output_shape, output_dtype, seed, atol, rtol)
    x = _as_batch(x, min_rows=2 if batch_independent else 1)
    modes: tuple[bool | None, ...] = (
        (None,) if not takes_flag else (False, True) if is_training is None else (is_training,)
    )
    enabled = dict(
        finite_output=finite_output,
        jit_consistent=jit_consistent,
        deterministic=deterministic,
        batch_independent=batch_independent,
        vmap_consistent=vmap_consistent,
        finite_grads=finite_grads,
    )
    skipped = {name: f"disabled ({name}=False)" for name, on in enabled.items() if not on}
    checked: list[str] = []

    transformed = hk.transform_with_state(forward)
    init_key, key, *other_keys = jax.random.split(jax.random.PRNGKey(seed), 2 + _NUM_OTHER_KEYS)
    init = functools.partial(transformed.init, **({"is_training": True} if takes_flag else {}))
    params, state = jax.jit(init)(init_key, x)  # One compile instead of many eager ops.
    zero_grads: list[set[str]] = []
    for mode in modes:
        checks = _ModeChecks(
            transformed, params, state, (key, other_keys), x, mode, seed, atol, rtol
        )
        for name, option in (("output_shape", output_shape), ("output_dtype", output_dtype)):
            if option is not None:
                getattr(checks, "check_" + name)(option)
                checked.append(name + checks.label)
        for name in (n for n, on in enabled.items() if on):
            reason = getattr(checks, "check_" + name)()  # None once passed; raises on failure.
            if reason:
                skipped[name + checks.label] = reason
            else:
                checked.append(name + checks.label)
        if checks.zero_grads is not None:
            zero_grads.append(checks.zero_grads)
    never = set.intersection(*zero_grads) if zero_grads else set()
    if never:
        raise AssertionError(
            f"finite_grads failed: the gradient of a random projection of the output is all "
            f"zero for parameter(s) {sorted(never)} in every checked mode, also at randomly "
            "perturbed params: they do not affect the output (unused, or cut off by "
            "jax.lax.stop_gradient)."
        )
    return LayerReport(checked=tuple(checked), skipped=skipped)


def assert_compiles_once(
    fn: Callable[..., Any], *args_list: tuple, static_argnums: Sequence[int] = ()
) -> list[Any]:
    """Jits ``fn``, calls it with each tuple of arguments, and fails if it traced twice.

    Built on ``chex.assert_max_traces``: use it to pin that a function keeps one
    compiled program across calls (same shapes, dtypes and pytree structure).

    Args:
      fn: a pure function, not already jitted.
      *args_list: one tuple of positional arguments per call, e.g. ``(x1,), (x2,)``.
      static_argnums: passed to ``jax.jit``.

    Returns:
      The outputs of the calls, in order.

    Raises:
      AssertionError: ``fn`` was traced more than once; the message gives the trace
        count and the argument shapes of each trace.
      TypeError: ``fn`` is not callable, or an element of ``args_list`` is not a tuple.
      ValueError: ``args_list`` is empty.

    >>> import jax.numpy as jnp
    >>> outs = assert_compiles_once(lambda a: a * 2, (jnp.ones(3),), (jnp.zeros(3),))
    >>> len(outs)
    2
    """
    if not callable(fn):
        raise TypeError(f"Expected `fn` to be callable. Received: fn of type {type(fn).__name__}.")
    if not args_list:
        raise ValueError("Expected at least one tuple of arguments after `fn`. Received: none.")
    for i, args in enumerate(args_list):
        if not isinstance(args, tuple):
            raise TypeError(
                "Expected each element of `args_list` to be a tuple of positional "
                "arguments (wrap a single argument as `(x,)`). Received: "
                f"args_list[{i}] of type {type(args).__name__}."
            )
    name = getattr(fn, "__name__", type(fn).__name__)
    traces: list[str] = []

    def counted(*args):
        return fn(*args)

    counted.__name__ = f"{name}_{next(_unique_ids)}"  # chex counts traces per name.
    limited = chex.assert_max_traces(counted, n=1)

    outputs: list[Any] = []

    def recorded(*args):  # Runs at trace time only.
        traces.append(
            f"call {len(outputs)}: "
            + str(
                _tree.tree_map(
                    lambda a: f"{a.dtype}{list(a.shape)}" if hasattr(a, "shape") else repr(a), args
                )
            )
        )
        return limited(*args)

    jitted = jax.jit(recorded, static_argnums=tuple(static_argnums))
    for args in args_list:
        try:
            outputs.append(jitted(*args))
        except AssertionError:
            if len(traces) < 2:
                raise
            break
    if len(traces) > 1:
        raise AssertionError(
            f"assert_compiles_once failed: `{name}` was traced {len(traces)} times in "
            f"{min(len(outputs) + 1, len(args_list))} calls, expected 1. Argument shapes at "
            f"each trace: {'; '.join(traces)}. Keep shapes, dtypes and pytree structure fixed "
            "across calls (e.g. pad the last batch), or mark non-array arguments static."
        )
    return outputs


class LayerTestCase(chex.TestCase):
    """A ``chex.TestCase`` with assertions for custom layers.

    >>> import haiku as hk, jax.numpy as jnp
    >>> class LinearTest(LayerTestCase):
    ...     def test_linear(self):
    ...         self.assertLayer(lambda x: hk.Linear(3)(x), jnp.ones((2, 4)),
    ...                          output_shape=(2, 3))
    """

    def assertLayer(self, forward: Callable[..., Any], x: Any, **kwargs: Any) -> LayerReport:
        """Runs :func:`check_layer` with these arguments and returns its report."""
        return check_layer(forward, x, **kwargs)

    def assertCompilesOnce(
        self, fn: Callable[..., Any], *args_list: tuple, **kwargs: Any
    ) -> list[Any]:
        """Runs :func:`assert_compiles_once` with these arguments."""
        return assert_compiles_once(fn, *args_list, **kwargs)
