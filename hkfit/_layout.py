"""Where arrays live: :class:`SingleDevice` (the default) and :class:`DataParallel`.

A layout answers every placement question of the engine, so no other module branches on
the kind of distribution:

* ``place_state(tree)``: model state (train state, metric states, output buffers);
* ``place_rows(tree)``: a whole dataset with rows on axis 0 (device-resident data);
* ``device_batch(batch)``: one ``(x, y[, w])`` batch from an iterable;
* ``local_batch_size(batch_size)``: checks a global training batch size and returns the
  rows this process contributes;
* ``step_options(kind)``: keyword arguments for the fused step makers of :mod:`hkfit.step`;
* ``state_shardings(ts)``: the output shardings of a training step (``None``: XLA's choice);
* ``pads_train_tail`` / ``streams_inference``: whether the short last batch of an epoch
  may be padded into the fused call, and whether evaluate/predict may stream host arrays.

The parameter-sharding rules of ``DataParallel`` are their own small class,
:class:`ShardingRules`.

``DataParallel`` lays data out as follows. ``fit`` and ``evaluate`` put an array dataset
on the devices once and gather each batch inside the compiled loop by row indices; the
gathered batch is then constrained to ``P("data")``, so each device runs the forward and
backward pass on its slice only. With ``data_placement="sharded"`` (the default) each
device holds one block of the rows and gathers its slice of every batch from it
(:mod:`hkfit._row_blocks`); with ``"replicated"`` every device holds every row. Either
way the gathers are local (no communication). ``predict`` streams its inputs in chunks,
each placed on every device (with several processes: the whole inputs, replicated).

Multi-host: each process passes ITS OWN shard of the data (the same number of rows
everywhere). With ``data_placement="sharded"`` each process cuts its shard into one block
per local device, and global batch ``b`` is the concatenation, in data-axis order, of
every device's local batch ``b``. With ``"replicated"`` a process shuffles its shard with
the shared seed, so all processes draw the same local row order, and global batch ``b``
is the concatenation, in process order, of every process's local batch ``b``.
"""

from __future__ import annotations

import math
import re
import warnings
import zlib
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from hkfit import _compat
from hkfit import _data as data_lib
from hkfit.step import Batch, TrainState

PyTree = Any


class SingleDevice:
    """The default layout: everything on JAX's default device, no collectives."""

    pads_train_tail = True
    streams_inference = True
    shards_rows = False

    def __repr__(self) -> str:
        return "SingleDevice()"

    @property
    def platform(self) -> str:
        return jax.default_backend()

    def place_state(self, tree: PyTree) -> PyTree:
        return tree

    def place_rows(self, tree: PyTree) -> PyTree:
        return jax.device_put(tree)

    def device_batch(self, batch: Any) -> tuple:
        return data_lib.device_batch(batch)

    def local_batch_size(self, batch_size: int) -> int:
        return batch_size

    def step_options(self, kind: str) -> dict[str, Any]:
        return {}

    def state_shardings(self, ts: TrainState) -> TrainState | None:
        return None

    def gather_rows(self, tree: PyTree) -> PyTree:
        """Every process's rows of a prediction buffer (one process: as is)."""
        return tree


def _param_path(path) -> str:
    """``"module/name"`` from the dict keys of a tree path (other keys are skipped)."""
    return "/".join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


class ShardingRules:
    """``[(regex, PartitionSpec), ...]`` splitting parameters over mesh axes.

    A parameter whose Haiku path (``"mlp/~/linear_1/w"``) a regex finds (``re.search``,
    the first matching rule wins) gets that rule's spec; every other parameter is
    replicated. Optimizer slots follow their parameter.

    Raises:
      ValueError: on a malformed rule, a bad regex, or an axis the mesh lacks.
    """

    def __init__(self, rules: Sequence[tuple[str, PartitionSpec]], mesh_axes: dict[str, int]):
        self.mesh_axes = dict(mesh_axes)
        self.rules = [self._check(rule) for rule in rules]

    def __bool__(self) -> bool:
        return bool(self.rules)

    def _check(self, rule) -> tuple[re.Pattern, PartitionSpec]:
        if not (
            isinstance(rule, (tuple, list))
            and len(rule) == 2
            and isinstance(rule[0], str)
            and isinstance(rule[1], PartitionSpec)
        ):
            raise ValueError(
                "Expected each `param_sharding` rule to be a pair (regex, "
                f"PartitionSpec). Received: {rule!r}."
            )
        try:
            pattern = re.compile(rule[0])
        except re.error as e:
            raise ValueError(f"Invalid regex in `param_sharding` rule {rule[0]!r}: {e}.") from e
        for axes in rule[1]:
            for axis in axes if isinstance(axes, tuple) else (axes,):
                if axis is not None and axis not in self.mesh_axes:
                    raise ValueError(
                        f"`param_sharding` rule {rule[0]!r} names mesh axis "
                        f"{axis!r}; expected one of {tuple(self.mesh_axes)}."
                    )
        return pattern, rule[1]

    def spec_for(self, path: str, shape: tuple) -> PartitionSpec:
        """The spec of the parameter at ``path`` (replicated when no rule matches)."""
        for pattern, spec in self.rules:
            if pattern.search(path):
                if len(spec) > len(shape):
                    raise ValueError(
                        f"`param_sharding` rule {pattern.pattern!r} gives {spec} "
                        f"({len(spec)} dims) to parameter {path!r} of shape {shape}."
                    )
                for dim, axes in enumerate(spec):
                    names = axes if isinstance(axes, tuple) else (axes,)
                    size = math.prod(self.mesh_axes[a] for a in names if a is not None)
                    if shape[dim] % size:
                        raise ValueError(
                            f"`param_sharding` rule {pattern.pattern!r} splits dimension {dim} "
                            f"of parameter {path!r} (shape {shape}) over mesh axes {axes!r} of "
                            f"size {size}, but {shape[dim]} is not divisible by {size}. Change "
                            "the layer size, the mesh shape or the rule."
                        )
                return spec
        return PartitionSpec()

    def train_state_specs(self, ts: TrainState) -> TrainState:
        """A TrainState of PartitionSpecs: params by the rules, optimizer slots alike."""
        specs, shapes = {}, {}
        for path, leaf in jax.tree_util.tree_flatten_with_path(ts.params)[0]:
            key = _param_path(path)
            specs[key], shapes[key] = self.spec_for(key, tuple(np.shape(leaf))), np.shape(leaf)
        for pattern, _ in self.rules:
            if not any(pattern.search(key) for key in specs):
                warnings.warn(
                    f"`param_sharding` rule {pattern.pattern!r} matches no parameter; "
                    f"parameter paths are: {sorted(specs)}.",
                    stacklevel=5,
                )

        def spec(path, leaf):
            key = _param_path(path)
            if key in specs and np.shape(leaf) == shapes[key]:
                return specs[key]
            return PartitionSpec()

        def tree(t):
            return jax.tree_util.tree_map_with_path(spec, t)

        replicated = jax.tree_util.tree_map(lambda _: PartitionSpec(), ts.state)
        # The fields hold PartitionSpecs, not arrays: the same pytree structure as `ts`.
        return TrainState._make(
            (tree(ts.params), replicated, tree(ts.opt_state), PartitionSpec(), PartitionSpec())
        )


class FullySharded(ShardingRules):
    """FSDP: every parameter split along its largest dimension the data axis divides.

    Each device then holds 1/N of each such parameter and of its optimizer slots. XLA's
    partitioner plans the communication: typically it gathers a parameter where it is
    used (all-gather) and reduces each gradient straight to its shard (reduce-scatter);
    when a batch's activations are smaller than the weights, it may instead gather the
    activations and keep the weights split. Parameters with fewer than
    ``min_size`` elements (biases, norms: too small to matter) and those with no
    divisible dimension stay replicated.
    """

    def __init__(self, axis_name: str, mesh_axes: dict[str, int], min_size: int):
        super().__init__([], mesh_axes)
        self.axis_name, self.min_size = axis_name, min_size

    def __bool__(self) -> bool:
        return True

    def spec_for(self, path: str, shape: tuple) -> PartitionSpec:
        """``P(..., axis, ...)`` on the largest divisible dimension, or replicated."""
        size = self.mesh_axes[self.axis_name]
        if math.prod(shape) < self.min_size or size == 1:
            return PartitionSpec()
        divisible = [d for d in range(len(shape)) if shape[d] % size == 0]
        if not divisible:
            return PartitionSpec()
        dim = max(divisible, key=lambda d: (shape[d], -d))
        return PartitionSpec(*([None] * dim), self.axis_name)


#: The values of ``DataParallel(data_placement=...)``.
DATA_PLACEMENTS = ("sharded", "replicated")

#: Parameters with fewer elements stay replicated under ``param_sharding="fsdp"``.
FSDP_MIN_SIZE = 2**14


def _nearest_multiples(value: int, multiple: int) -> str:
    below, above = value // multiple * multiple, -(-value // multiple) * multiple
    return " or ".join(f"batch_size={v}" for v in (below, above) if v > 0)


class DataParallel:
    """Data-parallel training over a device mesh (pass as ``Model(distribution=...)``).

    Params, state and optimizer state are replicated (or split by ``param_sharding``);
    each batch is split over the ``axis_name`` mesh axis. ``batch_size`` in ``fit`` is the
    GLOBAL batch size and must be a multiple of that axis's size. The last smaller batch
    of an epoch is still trained on, placed unsplit when its size does not divide; and
    ``evaluate``/``predict`` pad their batches with masked rows, so they stay exact.

    Args:
      devices: the devices to use (default: ``jax.devices()``, every process's devices).
      axis_name: the mesh axis the batch is split along.
      mesh_shape: ``None`` (a 1-D mesh over ``devices``) or ``{axis name: size}`` such as
        ``{"data": 4, "model": 2}``; the sizes multiply to the number of devices.
      param_sharding: ``[(regex, PartitionSpec), ...]`` (see :class:`ShardingRules`), or
        ``"fsdp"``: every parameter with at least ``FSDP_MIN_SIZE`` (16,384) elements,
        and its optimizer slots, split along its largest dimension that the
        ``axis_name`` axis divides (fully sharded data parallel; see
        :class:`FullySharded`). Parameters no rule matches stay replicated, also after
        training: the training step's output shardings are pinned, so it compiles once
        per fit.
      data_placement: where ``fit`` and ``evaluate`` keep array datasets on the devices.
        ``"sharded"`` (the default): each device holds its own block of about
        ``1/N`` of the rows (see :mod:`hkfit._row_blocks`) and shuffles it with
        ``(seed, epoch, device)``; global batch ``b`` is the concatenation of every
        device's local batch ``b``. ``"replicated"``: every device holds every row, and
        the batches are exactly those of a one-device run with the same seed.

    Raises:
      ValueError: on a mesh that does not fit the devices, or a rule naming an axis
        that the mesh lacks.

    >>> import jax, hkfit
    >>> strategy = hkfit.DataParallel(jax.devices()[:1])
    >>> strategy.local_batch_size(64)   # the rows of a global batch this process feeds
    64
    """

    pads_train_tail = False
    streams_inference = False

    def __init__(
        self,
        devices: Sequence[Any] | None = None,
        axis_name: str = "data",
        *,
        mesh_shape: dict[str, int] | None = None,
        param_sharding: Sequence[tuple[str, PartitionSpec]] | str | None = None,
        data_placement: str = "sharded",
    ):
        if data_placement not in DATA_PLACEMENTS:
            raise ValueError(
                f"Expected `data_placement` to be one of {list(DATA_PLACEMENTS)}. "
                f"Received: data_placement={data_placement!r}."
            )
        self.data_placement = data_placement
        devices = list(jax.devices() if devices is None else devices)
        if not devices:
            raise ValueError("Expected at least one device in `devices`. Received: [].")
        if mesh_shape is None:
            mesh_shape = {axis_name: len(devices)}
        if (
            not isinstance(mesh_shape, dict)
            or axis_name not in mesh_shape
            or not all(isinstance(s, int) and s > 0 for s in mesh_shape.values())
        ):
            raise ValueError(
                f"Expected `mesh_shape` to be a dict of positive axis sizes that "
                f"includes the batch axis {axis_name!r}. Received: "
                f"mesh_shape={mesh_shape!r}."
            )
        if math.prod(mesh_shape.values()) != len(devices):
            raise ValueError(
                f"Expected the sizes in `mesh_shape` to multiply to the number of "
                f"devices, {len(devices)}. Received: mesh_shape={mesh_shape!r}."
            )
        self.axis_name = axis_name
        self.mesh = _compat.make_mesh(tuple(mesh_shape.values()), tuple(mesh_shape), devices)
        self.num_replicas = int(mesh_shape[axis_name])
        self.platform = devices[0].platform  # e.g. "cpu", "gpu", "tpu"
        self.batch_sharding = NamedSharding(self.mesh, PartitionSpec(axis_name))
        self.replicated = NamedSharding(self.mesh, PartitionSpec())
        if isinstance(param_sharding, str):
            if param_sharding != "fsdp":
                raise ValueError(
                    "Expected `param_sharding` to be 'fsdp' or a list of (regex, "
                    f"PartitionSpec) rules. Received: param_sharding={param_sharding!r}."
                )
            self.param_sharding: ShardingRules = FullySharded(axis_name, mesh_shape, FSDP_MIN_SIZE)
        else:
            self.param_sharding = ShardingRules(param_sharding or [], mesh_shape)

    def __repr__(self) -> str:
        return (
            f"DataParallel(mesh={dict(self.mesh.shape)}, axis_name={self.axis_name!r}, "
            f"data_placement={self.data_placement!r})"
        )

    @property
    def shards_rows(self) -> bool:
        """Whether ``fit`` / ``evaluate`` keep array datasets in per-device blocks."""
        return self.data_placement == "sharded"

    def local_blocks(self) -> tuple[int, int]:
        """``(first, count)``: the data-axis positions whose blocks this process feeds.

        Raises:
          ValueError: if this process's devices are not one contiguous run of the data
            axis (a mesh built so cannot take per-process row blocks).
        """
        if jax.process_count() == 1:
            return 0, self.num_replicas
        axis = self.mesh.axis_names.index(self.axis_name)
        mine = np.vectorize(lambda d: d.process_index == jax.process_index())(self.mesh.devices)
        positions = sorted(set(np.nonzero(mine)[axis].tolist()))
        if positions != list(range(positions[0], positions[0] + len(positions))):
            raise ValueError(
                "Expected this process's devices to be one contiguous run of the "
                f"{self.axis_name!r} mesh axis for data_placement='sharded'. Received: "
                f"positions {positions}. Use data_placement='replicated'."
            )
        return positions[0], len(positions)

    def place_blocks(self, tree: PyTree) -> PyTree:
        """Puts per-device row blocks ``[local blocks, rows, ...]`` (this process's
        blocks) on their devices: axis 0 is split over the data axis."""
        sharding = NamedSharding(self.mesh, PartitionSpec(self.axis_name))
        if jax.process_count() == 1:
            return jax.device_put(tree, sharding)
        return jax.tree_util.tree_map(
            lambda a: jax.make_array_from_process_local_data(
                sharding, np.asarray(a), (self.num_replicas, *np.shape(a)[1:])
            ),
            tree,
        )

    # --- Placement ---

    def _put(self, value, sharding):
        """``value`` as a global array with ``sharding`` (same value in every process)."""
        if jax.process_count() == 1:
            return jax.device_put(value, sharding)
        if isinstance(value, jax.Array) and not value.is_fully_addressable:
            return jax.jit(lambda a: a, out_shardings=sharding)(value)
        if jnp.issubdtype(getattr(value, "dtype", np.float32), jax.dtypes.prng_key):
            bits = self._put(jax.random.key_data(value), sharding)
            return jax.random.wrap_key_data(bits, impl=jax.random.key_impl(value))
        host = np.asarray(value)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    def state_shardings(self, ts: TrainState) -> TrainState:
        """The shardings of a TrainState: replicated, or split by ``param_sharding``."""
        specs = (
            self.param_sharding.train_state_specs(ts)
            if self.param_sharding
            else jax.tree_util.tree_map(lambda _: PartitionSpec(), ts)
        )
        return jax.tree_util.tree_map(
            lambda spec: NamedSharding(self.mesh, spec),
            specs,
            is_leaf=lambda s: isinstance(s, PartitionSpec),
        )

    def place_state(self, tree: PyTree) -> PyTree:
        """Puts model state (or any pytree) on every device; a ``TrainState``'s parameters
        follow ``param_sharding``."""
        if isinstance(tree, TrainState) and self.param_sharding:
            return jax.tree_util.tree_map(self._put, tree, self.state_shardings(tree))
        return jax.tree_util.tree_map(lambda leaf: self._put(leaf, self.replicated), tree)

    def place_rows(self, tree: PyTree) -> PyTree:
        """Puts a dataset (rows on axis 0) on every device, replicated.

        With several processes, a :class:`hkfit.Batch` (fit/evaluate data) is each
        process's own shard: the shards are stacked on a new axis 1 (``[rows, processes,
        ...]``) and a gathered batch is merged back in process order by the step's
        layout. Other trees (``predict`` inputs) must be the same in every process.

        Raises:
          ValueError: if processes hold different numbers of rows (or, for predict
            inputs, different inputs).
        """
        tree = data_lib.to_numpy(tree)
        if jax.process_count() > 1:
            if isinstance(tree, Batch):
                rows = data_lib.num_rows(tree.x, "x")
                counts = np.asarray(multihost_utils.process_allgather(np.array([rows]))).ravel()
                if len(set(counts.tolist())) > 1:
                    raise ValueError(
                        "Expected every process to pass the same number of rows. "
                        f"Received: rows per process {counts.tolist()}."
                    )
                stacked = multihost_utils.process_allgather(tree, tiled=False)
                tree = jax.tree_util.tree_map(lambda a: np.swapaxes(np.asarray(a), 0, 1), stacked)
            else:
                self._check_same_everywhere(tree)
        return jax.tree_util.tree_map(lambda leaf: self._put(leaf, self.replicated), tree)

    @staticmethod
    def _check_same_everywhere(tree) -> None:
        leaves = [np.ascontiguousarray(a) for a in jax.tree_util.tree_leaves(tree)]
        digest = np.array(
            [zlib.crc32(a.tobytes()) ^ zlib.crc32(repr(a.shape).encode()) for a in leaves], np.int64
        )
        digests = np.asarray(multihost_utils.process_allgather(digest))
        if not (digests == digests[0]).all():
            raise ValueError(
                "In a multi-process run, `predict` on arrays expects the same "
                "inputs in every process (each gets every output row). Received: "
                "different inputs. Predict on each process's own rows with a "
                "single-process model, or pass the same arrays everywhere."
            )

    def device_batch(self, batch: Any) -> tuple:
        """One ``(x, y[, w])`` batch from an iterable as global arrays ``(x, y, w)``.

        Split over the data axis when its global row count divides the axis size, else
        replicated (so the last smaller batch is still used exactly). With several
        processes each passes its local batch; the global batch concatenates them.
        """
        x, y, w = data_lib.split_batch(batch)
        x, y = data_lib.to_numpy(x), data_lib.to_numpy(y)
        n = data_lib.num_rows(x, "x")
        w = np.ones(n, np.float32) if w is None else data_lib.batch_weights(w, n)
        local = (x, y, w, data_lib.metric_mask(w))
        if jax.process_count() == 1:
            sharding = self.batch_sharding if n % self.num_replicas == 0 else self.replicated
            return jax.device_put(local, sharding)
        total = n * jax.process_count()
        if total % self.num_replicas == 0:
            return jax.tree_util.tree_map(
                lambda a: jax.make_array_from_process_local_data(
                    self.batch_sharding, a, (total, *a.shape[1:])
                ),
                local,
            )
        full = multihost_utils.process_allgather(local, tiled=True)
        return jax.tree_util.tree_map(lambda a: self._put(a, self.replicated), full)

    def gather_rows(self, tree: PyTree) -> PyTree:
        return tree

    # --- Steps ---

    def local_batch_size(self, batch_size: int) -> int:
        """Checks a global training batch size; returns the rows each process contributes.

        Raises:
          ValueError: if ``batch_size`` is not a multiple of the data axis size (and of
            the process count), naming the nearest valid sizes.
        """
        multiple = math.lcm(self.num_replicas, jax.process_count())
        if batch_size % multiple:
            raise ValueError(
                f"Expected `batch_size` to be a multiple of {multiple}, the number of devices "
                f"along the {self.axis_name!r} mesh axis (the global batch is split evenly "
                f"across them). Received: batch_size={batch_size}. Use "
                f"{_nearest_multiples(batch_size, multiple)}."
            )
        return batch_size // jax.process_count()

    def step_options(self, kind: str) -> dict[str, Any]:
        """Keyword arguments for the fused step makers of :mod:`hkfit.step`.

        ``kind`` is ``"train"``, ``"eval"`` or ``"predict"``: a ``shard_batch`` layout
        for gathered batches, and for eval/predict the ``multiple`` their batches are
        padded to. ``"train_blocks"`` / ``"eval_blocks"`` are for data in per-device row
        blocks (``data_placement="sharded"``; eval also gets the number of ``blocks``).
        """
        processes = jax.process_count()
        if kind in ("train_blocks", "eval_blocks"):  # per-device row blocks: nothing to merge
            options: dict[str, Any] = {"shard_batch": self._split_evenly}
            if kind == "eval_blocks":
                options["blocks"] = self.num_replicas
            return options
        merge = processes > 1 and kind in ("train", "eval")

        def shard_batch(tree):
            if merge:  # [rows, processes, ...] -> process-major [processes * rows, ...]
                tree = jax.tree_util.tree_map(
                    lambda a: jnp.swapaxes(a, 0, 1).reshape((-1, *a.shape[2:])), tree
                )
            return self._split_evenly(tree)

        if kind == "train":
            return {"shard_batch": shard_batch}
        per_process = (
            self.num_replicas // math.gcd(self.num_replicas, processes)
            if merge
            else self.num_replicas
        )
        return {"shard_batch": shard_batch, "multiple": per_process}

    def _split_evenly(self, tree: PyTree) -> PyTree:
        """A batch split over the data axis when its rows divide it, else left whole."""
        rows = jax.tree_util.tree_leaves(tree)[0].shape[0]
        if rows % self.num_replicas:
            return tree  # unsplit: every row still counts, exactly
        return jax.lax.with_sharding_constraint(tree, self.batch_sharding)
