"""Checkpoints of arrays sharded across processes: the shard layout.

In one process (8 virtual CPU devices), the layout is forced on arrays split over those
devices (``_shards.spans_processes`` is patched), which tests writing, the manifest and
shard-file checks, assembling blocks for other shardings, damaged files and the
callbacks' rotation. The two-process test runs two real processes on 127.0.0.1 with
FSDP, kills them after a backup, resumes, and compares with an uninterrupted run.

Run as a script (``python tests/test_multihost_checkpoints.py worker MODE PID PORT
OUTDIR``) this file is one process of the two-process test.
"""

import io
import json
import os
import shutil
import signal
import sys
import time
import warnings
import zipfile

import _processes as processes
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import hkfit
from hkfit import _checkpoint_file, _shard_files, _shards, checkpoint
from hkfit import callbacks as C

FEATURES, WIDE = 16, 1024  # the wide layer's w: 16 x 1024 = 16,384 elements, FSDP splits it
W = ".params['wide']['w']"


def forward(x):
    h = jax.nn.relu(hk.Linear(WIDE, name="wide")(x))
    return hk.Linear(2, name="head")(h)


def make_model(distribution=None):
    return hkfit.Model(
        forward,
        loss="sparse_categorical_crossentropy",
        optimizer=optax.adam(1e-2),
        metrics=["accuracy"],
        seed=0,
        distribution=distribution,
    )


def data(rows, seed=0):
    rng = np.random.RandomState(seed)
    x = rng.randn(rows, FEATURES).astype(np.float32)
    return x, (x[:, 0] + x[:, 1] > 0).astype(np.int32)


def host(tree):
    """Every leaf as a numpy array (key data for keys)."""

    def one(leaf):
        if jnp.issubdtype(jnp.result_type(leaf), jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        return np.asarray(leaf)

    return jax.tree_util.tree_map(one, jax.device_get(tree))


def bits_equal(a, b):
    leaves_a, leaves_b = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return len(leaves_a) == len(leaves_b) and all(
        np.asarray(x).tobytes() == np.asarray(y).tobytes() for x, y in zip(leaves_a, leaves_b)
    )


def assert_bit_identical(a, b):
    leaves_a, leaves_b = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()


# --- In one process: the layout forced on arrays split over 8 devices -----------------------

needs_8 = pytest.mark.skipif(  # a string: evaluated only when tests run, so that a worker
    "jax.device_count() < 8",  # process can join its run before JAX starts its backend
    reason="needs 8 devices (tests/conftest.py sets 8 CPU devices)",
)
META = checkpoint.META_KEY + ".npy"


def mesh_of(shape, names):
    return jax.sharding.Mesh(np.array(jax.devices()[: int(np.prod(shape))]).reshape(shape), names)


def split_over_devices(leaf):
    """A stand-in for ``_shards.spans_processes`` in one process: any array split over
    several devices is stored in the shard layout."""
    return isinstance(leaf, jax.Array) and not leaf.is_fully_replicated


@pytest.fixture
def forced(monkeypatch):
    monkeypatch.setattr(_shards, "spans_processes", split_over_devices)


@pytest.fixture(scope="module")
def fsdp():
    """A model trained with FSDP on the 8 devices of this process."""
    x, y = data(64)
    model = make_model(hkfit.DataParallel(param_sharding="fsdp"))
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert list(model.params["wide"]["w"].sharding.spec) == [None, "data"]
    return model


def bits(model):
    return [
        np.asarray(leaf).tobytes() for leaf in jax.tree_util.tree_leaves(host(model.train_state))
    ]


def files_in(directory):
    return sorted(os.listdir(directory))


def shard_of(path):
    (name,) = [
        n
        for n in files_in(os.path.dirname(path))
        if n.startswith(os.path.basename(path) + ".shard-")
    ]
    return os.path.join(os.path.dirname(path), name)


def members(path):
    with zipfile.ZipFile(path) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def meta_of(path):
    return json.loads(np.load(io.BytesIO(members(path)[META])).tobytes())


def rewrite(path, meta=None, **replaced):
    """Rewrites the archive at ``path`` with other metadata or members (raw ``.npy`` bytes)."""
    parts = members(path)
    if meta is not None:
        buffer = io.BytesIO()
        np.save(buffer, np.frombuffer(json.dumps(meta).encode(), np.uint8))
        parts[META] = buffer.getvalue()
    parts.update({name + ".npy": raw for name, raw in replaced.items()})
    with zipfile.ZipFile(path, "w") as archive:
        for name, raw in parts.items():
            archive.writestr(name, raw)


def refused(model, path, match):
    """Loading ``path`` is a ValueError containing ``match``; the model is unchanged."""
    before, built = (bits(model) if model.built else None), model.built
    with pytest.raises(ValueError) as info:
        model.load(path)
    assert match in str(info.value), str(info.value)
    assert model.built == built
    if built:
        assert bits(model) == before
    return str(info.value)


def test_bounds_of_indices():
    assert _shards.bounds(None, (3, 4)) == ((0, 0), (3, 4))
    assert _shards.bounds((slice(2, None),), (5, 4)) == ((2, 0), (5, 4))
    assert _shards.bounds((), ()) == ((), ())
    with pytest.raises(ValueError, match="contiguous"):
        _shards.bounds((slice(0, 4, 2),), (4,))
    with pytest.raises(ValueError, match="slices"):
        _shards.bounds((1,), (4,))


@needs_8
def test_blocks_are_written_once_by_the_lowest_holder():
    mesh = mesh_of((4, 2), ("a", "b"))
    array = jax.device_put(jnp.arange(32.0).reshape(8, 4), NamedSharding(mesh, P("a")))
    blocks = _shards.blocks(array)
    assert [(b.start, b.stop) for b in blocks] == [((2 * i, 0), (2 * i + 2, 4)) for i in range(4)]
    for block in blocks:  # each block is on 2 devices (axis "b"): the lower id writes it
        holders = [
            d
            for d, index in array.sharding.devices_indices_map(array.shape).items()
            if _shards.bounds(index, array.shape) == (block.start, block.stop)
        ]
        assert len(holders) == 2 and block.device == min(holders, key=lambda d: d.id)
        data = _shards.block_data(array, block)
        np.testing.assert_array_equal(data, np.asarray(array)[block.start[0] : block.stop[0]])
    replicated = jax.device_put(jnp.ones(3), NamedSharding(mesh, P()))
    assert [(b.start, b.stop) for b in _shards.blocks(replicated)] == [((0,), (3,))]


def test_tiling_check():
    check = lambda blocks: _checkpoint_file.check_tiling("f", "pieces", (4, 6), blocks)
    check([((0, 0), (2, 6)), ((2, 0), (4, 6))])
    check([((0, 0), (4, 6))])
    check([((0, 0), (2, 3)), ((0, 3), (2, 6)), ((2, 0), (4, 3)), ((2, 3), (4, 6))])
    for bad in (
        [((0, 0), (2, 6)), ((1, 0), (4, 6))],  # overlap
        [((0, 0), (2, 6))],  # a gap
        [((0, 0), (2, 6)), ((0, 0), (2, 6)), ((2, 0), (4, 6))],  # twice
    ):
        with pytest.raises(ValueError, match=r"'f'.*pieces"):
            check(bad)


@needs_8
def test_forced_layout_writes_a_manifest_and_a_shard_file(fsdp, forced, tmp_path):
    path = str(tmp_path / "model.npz")
    fsdp.save(path)
    shard = shard_of(path)
    assert files_in(tmp_path) == ["model.npz", os.path.basename(shard)]
    meta = _checkpoint_file.read_meta(path)
    assert meta["format_version"] == 2 and meta["kind"] == "model"
    (record,) = meta["shards"]["files"]
    assert record["name"] == os.path.basename(shard)
    assert record["size"] == os.path.getsize(shard)
    assert record["sha256"] == _shards.file_digest(shard)[1]
    assert _shards.shard_path(path, 0, 1, meta["shards"]["id"]) == shard
    sharded = sorted(e["path"] for e in meta["entries"] if e.get("sharded"))
    assert sharded == [".opt_state[0].mu['wide']['w']", ".opt_state[0].nu['wide']['w']", W]
    entry = next(e for e in meta["entries"] if e["path"] == W)
    assert entry["shape"] == [FEATURES, WIDE] and "sha256" not in entry
    assert [p["start"] for p in entry["pieces"]] == [[0, 128 * i] for i in range(8)]
    in_file = sorted(n[:-4] for n in members(path) if n != META)
    assert in_file == sorted(e["key"] for e in meta["entries"] if not e.get("sharded"))
    shard_meta = meta_of(shard)
    assert shard_meta["format"] == "hkfit-checkpoint-shard"
    assert (shard_meta["id"], shard_meta["file"], shard_meta["files"]) == (
        meta["shards"]["id"],
        0,
        1,
    )
    assert len(shard_meta["entries"]) == 3 * 8


@needs_8
def test_forced_layout_loads_into_one_device_and_into_fsdp(fsdp, forced, tmp_path):
    path = str(tmp_path / "model.npz")
    fsdp.save(path)
    single = make_model().load(path)
    assert single.step == fsdp.step and single.epoch == fsdp.epoch
    assert bits(single) == bits(fsdp)
    again = make_model(hkfit.DataParallel(param_sharding="fsdp")).load(path)
    assert bits(again) == bits(fsdp)
    assert again.params["wide"]["w"].sharding.is_equivalent_to(fsdp.params["wide"]["w"].sharding, 2)
    weights = make_model().load_weights(path)
    assert_bit_identical(host(weights.params), host(fsdp.params))


@needs_8
def test_pieces_assemble_any_block_and_restore_onto_other_shardings(fsdp, forced, tmp_path):
    path = str(tmp_path / "model.npz")
    fsdp.save(path)
    meta, arrays = checkpoint.read(path)
    entry = next(e for e in meta["entries"] if e["path"] == W)
    pieces = arrays[entry["key"]]
    assert isinstance(pieces, _shard_files.Pieces) and pieces.shape == (FEATURES, WIDE)
    value = np.asarray(fsdp.params["wide"]["w"])
    np.testing.assert_array_equal(pieces.assemble(), value)
    for index in [
        (slice(3, 9), slice(100, 300)),  # across 2 blocks
        (slice(None), slice(0, 1)),
        (slice(5, 6),),
        (slice(0, 0), slice(None)),  # empty
    ]:
        np.testing.assert_array_equal(pieces.assemble(index), value[index])
    mesh = mesh_of((4, 2), ("a", "b"))
    for spec in (P("a", "b"), P(), P(None, ("a", "b")), P("b")):
        target = jax.device_put(jnp.zeros_like(value), NamedSharding(mesh, spec))
        restored = checkpoint._global_array(path, W, target, entry, pieces)
        assert restored.sharding == target.sharding
        np.testing.assert_array_equal(np.asarray(restored), value)
    _shard_files.close(arrays)


@needs_8
def test_keys_and_bfloat16_blocks_round_trip(forced, tmp_path):
    mesh = mesh_of((8,), ("data",))
    split = NamedSharding(mesh, P("data"))
    tree = {
        "keys": jax.device_put(jax.random.split(jax.random.key(1), 8), split),
        "half": jax.device_put(jnp.arange(16, dtype=jnp.bfloat16), split),
        "whole": jnp.arange(3),
    }
    path = str(tmp_path / "tree.npz")
    checkpoint.save_tree(path, tree, metadata={"note": 1})
    meta = _checkpoint_file.read_meta(path)
    assert [e.get("sharded", False) for e in meta["entries"]] == [True, True, False]
    assert meta["entries"][0]["bits"] and meta["entries"][1]["dtype"] == "prng_key"
    zeros = {
        "keys": jax.device_put(jax.random.split(jax.random.key(9), 8), split),
        "half": jnp.zeros(16, jnp.bfloat16),
        "whole": jnp.zeros(3, jnp.int32),
    }
    loaded, extra = checkpoint.load_tree(path, zeros)
    assert extra == {"note": 1}  # the format keys, "shards" included, are not the caller's
    assert_bit_identical(host(loaded), host(tree))
    meta, arrays = checkpoint.read(path)
    keys = checkpoint._global_array(path, "keys", zeros["keys"], meta["entries"][1], arrays["a1"])
    assert keys.sharding == split
    assert_bit_identical(host(keys), host(tree["keys"]))
    _shard_files.close(arrays)


@needs_8
def test_saving_again_deletes_the_old_shard_files(fsdp, forced, tmp_path, monkeypatch):
    path = str(tmp_path / "model.npz")
    fsdp.save(path)
    old = shard_of(path)
    fsdp.save(path)
    assert not os.path.exists(old) and len(files_in(tmp_path)) == 2
    monkeypatch.setattr(_shards, "spans_processes", lambda leaf: False)
    fsdp.save(path)  # one file replaces the manifest: its shard files go too
    assert files_in(tmp_path) == ["model.npz"]
    assert _checkpoint_file.read_meta(path)["format_version"] == 1
    assert bits(make_model().load(path)) == bits(fsdp)


@needs_8
def test_a_failed_manifest_write_keeps_the_previous_checkpoint(fsdp, forced, tmp_path, monkeypatch):
    path = str(tmp_path / "model.npz")
    fsdp.save(path)
    before = files_in(tmp_path)
    saved = bits(make_model().load(path))
    savez, calls = np.savez, []

    def fail_on_the_manifest(f, **arrays):
        calls.append(sorted(arrays))
        if len(calls) == 2:  # the shard file is written first, the manifest last
            raise OSError(28, "No space left on device")
        return savez(f, **arrays)

    monkeypatch.setattr(np, "savez", fail_on_the_manifest)
    with pytest.raises(OSError, match=r"model\.npz"):
        fsdp.save(path)
    assert files_in(tmp_path) == before  # the new shard file was removed, nothing else changed
    assert bits(make_model().load(path)) == saved


@needs_8
def test_a_crash_before_the_manifest_leaves_the_previous_checkpoint_loadable(
    fsdp, forced, tmp_path
):
    path = str(tmp_path / "model.npz")
    fsdp.save(path)
    saved = bits(make_model().load(path))
    other = str(tmp_path / "other.npz")
    fsdp.save(other)
    # A killed save: its shard file is there (another id), its manifest never came.
    (other_shard,) = _shards.referenced(other)
    shutil.copy(other_shard, path + ".shard-00000-of-00001.00000000deadbeef")
    assert bits(make_model().load(path)) == saved
    orphan = path + ".shard-00000-of-00001.00000000deadbeef"
    assert sorted(_shards.leftovers(path)) == sorted([orphan, *_shards.referenced(path)])


def _damage_missing(path, shard):
    os.remove(shard)
    return "is missing"


def _damage_truncated(path, shard):
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) - 10)
    return "bytes long; the manifest records"


def _damage_flipped_byte(path, shard):
    with open(shard, "r+b") as f:
        f.seek(os.path.getsize(shard) // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    return "does not match the size and sha256"


def _damage_other_save(path, shard):
    other = os.path.join(os.path.dirname(path), "other.npz")
    checkpoint.save_tree(
        other,
        {"w": jax.device_put(jnp.ones((8, 8)), NamedSharding(mesh_of((8,), ("d",)), P("d")))},
    )
    shutil.copy(shard_of(other), shard)
    return "bytes long; the manifest records"


def _damage_directory(path, shard):
    os.remove(shard)
    os.mkdir(shard)
    return "a directory"


@needs_8
@pytest.mark.parametrize(
    "damage",
    [
        _damage_missing,
        _damage_truncated,
        _damage_flipped_byte,
        _damage_other_save,
        _damage_directory,
    ],
)
def test_a_missing_or_damaged_shard_file_is_a_value_error_naming_it(fsdp, forced, tmp_path, damage):
    path = str(tmp_path / "model.npz")
    fsdp.save(path)
    shard = shard_of(path)
    match = damage(path, shard)
    message = refused(fsdp, path, match)
    assert repr(shard) in message
    fresh = make_model()
    refused(fresh, path, match)
    assert not fresh.built


@needs_8
def test_a_block_that_differs_from_its_digest_is_refused_not_taken_for_another_optimizer(
    fsdp, forced, tmp_path
):
    """The manifest's record of the shard file agrees with the file, but one block of the
    optimizer state does not match its own digest: a damaged file, not a state saved
    with another optimizer (which would be skipped with a warning)."""
    path = str(tmp_path / "model.npz")
    fsdp.save(path)
    shard = shard_of(path)
    shard_meta = meta_of(shard)
    mu = next(e for e in shard_meta["entries"] if e["path"].startswith(".opt_state[0].mu"))
    raw = members(shard)[mu["key"] + ".npy"]
    rewrite(shard, **{mu["key"]: raw[:-4] + bytes(4 * [1])})
    meta = meta_of(path)
    meta["shards"]["files"][0].update(zip(("size", "sha256"), _shards.file_digest(shard)))
    rewrite(path, meta)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "another optimizer" warning
        refused(fsdp, path, "does not match the sha256 its metadata records")


def _edit_piece(field, value):
    def edit(meta):
        next(e for e in meta["entries"] if e["path"] == W)["pieces"][1][field] = value
        return meta

    return edit


def _edit_shards(field, value):
    def edit(meta):
        meta["shards"][field] = value
        return meta

    return edit


def _edit_record(field, value):
    def edit(meta):
        meta["shards"]["files"][0][field] = value
        return meta

    return edit


def _sharded_in_version_1(meta):
    meta["format_version"] = 1
    return meta


def _drop_piece(meta):
    del next(e for e in meta["entries"] if e["path"] == W)["pieces"][3]
    return meta


MANIFEST_EDITS = {
    "overlap": (_edit_piece("start", [0, 64]), "entries["),
    "gap": (_drop_piece, "blocks covering the stored shape"),
    "outside": (_edit_piece("stop", [FEATURES, 4096]), "a block inside the stored shape"),
    "file index": (_edit_piece("file", 1), ".file"),
    "same key twice": (_edit_piece("key", "p0"), "unique in its shard file"),
    "id": (_edit_shards("id", "../../etc"), "shards.id"),
    "no files": (_edit_shards("files", []), "shards.files"),
    "path in name": (
        _edit_record("name", "../x.npz.shard-00000-of-00001.0123456789abcdef"),
        ".name",
    ),
    "size": (_edit_record("size", -1), ".size"),
    "sha256": (_edit_record("sha256", "zz"), ".sha256"),
    "version 1": (_sharded_in_version_1, ".sharded"),
}


@needs_8
@pytest.mark.parametrize("case", sorted(MANIFEST_EDITS))
def test_a_malformed_manifest_is_a_value_error_naming_it_and_the_field(
    fsdp, forced, tmp_path, case
):
    edit, match = MANIFEST_EDITS[case]
    path = str(tmp_path / "model.npz")
    fsdp.save(path)
    rewrite(path, edit(meta_of(path)))
    message = refused(fsdp, path, match)
    assert repr(path) in message


@needs_8
def test_a_shard_file_listing_other_blocks_is_refused(fsdp, forced, tmp_path):
    path = str(tmp_path / "model.npz")
    fsdp.save(path)
    shard = shard_of(path)
    shard_meta = meta_of(shard)
    shard_meta["entries"][0]["stop"] = [1, 1]
    rewrite(shard, shard_meta)
    meta = meta_of(path)
    meta["shards"]["files"][0].update(zip(("size", "sha256"), _shards.file_digest(shard)))
    rewrite(path, meta)
    assert repr(shard) in refused(fsdp, path, "does not hold the blocks its manifest places in it")


@needs_8
def test_model_checkpoint_deletes_old_checkpoints_with_their_shard_files(forced, tmp_path):
    x, y = data(32)
    model = make_model(hkfit.DataParallel(param_sharding="fsdp"))
    pattern = str(tmp_path / "model-{epoch}")  # no extension: shard files match its regex
    model.fit(
        x,
        y,
        batch_size=16,
        epochs=3,
        verbose=0,
        callbacks=[C.ModelCheckpoint(pattern, max_to_keep=2)],
    )
    names = files_in(tmp_path)
    assert [n for n in names if not _shards.is_shard_name(n)] == ["model-2", "model-3"]
    assert len(names) == 4
    again = C.ModelCheckpoint(pattern, max_to_keep=1)
    model.fit(x, y, batch_size=16, epochs=4, initial_epoch=3, verbose=0, callbacks=[again])
    assert [n for n in files_in(tmp_path) if not _shards.is_shard_name(n)] == ["model-4"]
    assert len(files_in(tmp_path)) == 2
    assert bits(make_model().load(str(tmp_path / "model-4"))) == bits(model)


class _Crash(Exception):
    pass


@needs_8
def test_backup_and_restore_rotates_and_deletes_shard_files(forced, tmp_path):
    x, y = data(32)  # 2 steps per epoch
    backup_dir = tmp_path / "backup"

    def crash(model):
        raise _Crash()

    def fit(model, crash_step=None):
        callbacks = [C.BackupAndRestore(backup_dir, save_freq=1)]
        if crash_step is not None:
            callbacks.append(_AtStep(crash_step, crash))
        model.fit(x, y, batch_size=16, epochs=3, verbose=0, callbacks=callbacks)
        return callbacks[0]

    with pytest.raises(_Crash):
        fit(make_model(hkfit.DataParallel(param_sharding="fsdp")), crash_step=3)
    names = files_in(backup_dir)
    manifests = ["training_state.npz", "training_state.prev.npz"]
    assert [n for n in names if not _shards.is_shard_name(n)] == manifests
    assert len(names) == 4  # each with its own shard file; older ones were deleted
    newest = str(backup_dir / "training_state.npz")
    previous = str(backup_dir / "training_state.prev.npz")
    assert make_model().load(newest).step == 3 and make_model().load(previous).step == 2
    # The newest backup's shard file is gone: the previous backup is restored instead.
    os.remove(_shards.referenced(newest)[0])
    orphan = newest + ".shard-00000-of-00001.00000000deadbeef"  # as a killed save leaves
    open(orphan, "wb").close()
    open(backup_dir / f".{os.path.basename(orphan)}.tmp", "wb").close()
    resumed = make_model(hkfit.DataParallel(param_sharding="fsdp"))
    with pytest.raises(_Crash), pytest.warns(UserWarning, match="is missing"):
        fit(resumed, crash_step=4)
    assert make_model().load(newest).step == 4 and make_model().load(previous).step == 3
    assert len(files_in(backup_dir)) == 6  # 2 manifests, 2 shard files, 2 leftovers
    # Completing training deletes the backups, their shard files and the leftovers.
    fit(make_model(hkfit.DataParallel(param_sharding="fsdp")))
    assert not backup_dir.exists()


def test_agreement_in_one_process():
    assert _shards.agree(True, b"ab") == [(True, b"ab")]
    _shards.barrier("nothing to wait for")
    with pytest.raises(KeyError):
        _shards.on_main(lambda: {}["x"], "write it")
    with pytest.raises(OSError, match="Process 1 could not write it"):
        _shards.raise_unless_all([(True, b""), (False, b"")], None, "write it")


# --- Two processes -------------------------------------------------------------------------

PROCS, LOCAL_DEVICES = 2, 4
LOCAL_ROWS, BATCH, EPOCHS = 40, 16, 3  # 80 global rows: 5 steps per epoch, 15 in all
SAVE_FREQ, KILL_STEP = 2, 8  # backups after steps 2, 4, 6, 8...: killed after step 8's


def _worker_model():
    return make_model(hkfit.DataParallel(param_sharding="fsdp"))


def _fit(model, pid, callbacks):
    x, y = data(PROCS * LOCAL_ROWS, seed=1)
    mine = slice(pid * LOCAL_ROWS, (pid + 1) * LOCAL_ROWS)
    return model.fit(
        x[mine], y[mine], batch_size=BATCH, epochs=EPOCHS, verbose=0, callbacks=callbacks
    )


def _gathered(tree):
    """The whole value of every leaf (gathered from every process)."""
    from jax.experimental import multihost_utils

    def unkeyed(leaf):
        if jnp.issubdtype(jnp.result_type(leaf), jax.dtypes.prng_key):
            return jax.random.key_data(leaf)
        return leaf

    tree = jax.tree_util.tree_map(unkeyed, tree)
    return host(multihost_utils.process_allgather(tree, tiled=True))


def _save_npz(path, tree):
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    np.savez(path, **{jax.tree_util.keystr(p): np.asarray(v) for p, v in leaves})


class _AtStep(C.Callback):
    """Calls ``action(model)`` once training reaches step ``step`` (after the backup)."""

    def __init__(self, step, action):
        super().__init__()
        self.step, self.action = step, action

    def on_train_batch_end(self, batch, logs=None):
        if int(self.model.step) == self.step:
            self.action(self.model)


def _worker(mode: str, pid: int, port: int, outdir: str) -> None:
    hkfit.distributed.initialize(f"127.0.0.1:{port}", PROCS, pid)
    out = lambda name: os.path.join(outdir, name)
    if mode == "first":
        # An uninterrupted run, with the same callbacks as the interrupted one.
        model = _worker_model()
        at_kill_step = _AtStep(
            KILL_STEP, lambda m: _save_npz(out(f"ref_step{pid}.npz"), _gathered(m.train_state))
        )
        checkpoints = C.ModelCheckpoint(
            out("ckpt/model-{epoch}.npz"), max_to_keep=1, asynchronous=True
        )
        backup = C.BackupAndRestore(out("ref_backup"), save_freq=SAVE_FREQ)
        history = _fit(model, pid, [checkpoints, at_kill_step, backup])
        w = model.params["wide"]["w"]
        info = {
            "history": history.history,
            "fully_addressable": w.is_fully_addressable,
            "fully_replicated": w.is_fully_replicated,
            "spec": list(w.sharding.spec),
            "local_blocks": sorted(_shards.bounds(s.index, w.shape) for s in w.addressable_shards),
            "ckpt_files": sorted(os.listdir(out("ckpt"))),
            "ref_backup_left": os.path.exists(out("ref_backup")),
        }
        _save_npz(out(f"ref_final{pid}.npz"), _gathered(model.train_state))
        # Save then load right away, in every process, into a fresh model.
        model.save_weights(out("weights.npz"))
        fresh = _worker_model().load_weights(out("weights.npz"))
        info["weights_reloaded"] = bits_equal(_gathered(fresh.params), _gathered(model.params))
        info["reloaded_spec"] = list(fresh.params["wide"]["w"].sharding.spec)
        with open(out(f"info{pid}.json"), "w") as f:
            json.dump(info, f)

        # The run that gets killed: it waits after the backup of step KILL_STEP.
        def wait_to_be_killed(_):
            with open(out(f"killpoint{pid}"), "w") as f:
                f.write("ready")
            time.sleep(600)

        model = _worker_model()
        _fit(
            model,
            pid,
            [
                C.BackupAndRestore(out("backup"), save_freq=SAVE_FREQ),
                _AtStep(KILL_STEP, wait_to_be_killed),
            ],
        )
        raise SystemExit("the run went past its kill point")
    # mode == "resume": the same script as the killed run, without the kill point
    model = _worker_model()
    backup = C.BackupAndRestore(out("backup"), save_freq=SAVE_FREQ)
    history = _fit(model, pid, [backup])
    _save_npz(out(f"resumed_final{pid}.npz"), _gathered(model.train_state))
    result = {"history": history.history, "restored_epoch": backup.restored_epoch}
    # Replicated params: process 0 writes one file, and no process returns before it is there.
    replicated = make_model(hkfit.DataParallel())
    replicated.init(data(4)[0])
    replicated.save(out("replicated.npz"))
    result["replicated_there"] = os.path.isfile(out("replicated.npz"))
    fresh = make_model(hkfit.DataParallel()).load(out("replicated.npz"))
    result["replicated_reloaded"] = bits_equal(
        _gathered(fresh.params), _gathered(replicated.params)
    )
    with open(out(f"resumed{pid}.json"), "w") as f:
        json.dump(result, f)


def _start(mode, outdir):
    return processes.start(__file__, PROCS, LOCAL_DEVICES, outdir, mode, prefix=f"{mode}_")


def _logs(mode, outdir):
    return [log[-3000:] for log in processes.logs(outdir, PROCS, prefix=f"{mode}_")]


def _load(path):
    return dict(np.load(path))


@pytest.mark.slow
def test_two_processes_resume_fsdp_training_bit_identically(tmp_path):
    if not hasattr(jax, "make_array_from_process_local_data"):
        pytest.skip(f"jax {jax.__version__} lacks jax.make_array_from_process_local_data")
    if tuple(int(p) for p in jax.__version__.split(".")[:2]) < (0, 5):
        pytest.skip(f"jaxlib {jax.__version__} aborts with several CPU devices per process")
    outdir = str(tmp_path)
    backup_dir = tmp_path / "backup"

    # 1. The uninterrupted run, then the run killed after the backup of step KILL_STEP.
    procs = _start("first", outdir)
    markers = [tmp_path / f"killpoint{pid}" for pid in range(PROCS)]
    deadline = time.monotonic() + 240
    try:
        while not all(m.exists() for m in markers):
            exited = [p.poll() for p in procs]
            assert all(code is None for code in exited), (exited, _logs("first", outdir))
            assert time.monotonic() < deadline, _logs("first", outdir)
            time.sleep(0.2)
        # Both processes are past the backup of step KILL_STEP: kill them (SIGKILL).
        killed_at = sorted(os.listdir(backup_dir))
        shutil.copytree(backup_dir, tmp_path / "backup_copy")
    finally:
        processes.kill(procs)
    assert all(p.returncode == -signal.SIGKILL for p in procs)

    # The backup: a manifest and its 2 shard files, and the previous one with its own 2.
    manifests = ["training_state.npz", "training_state.prev.npz"]
    shard_files = [n for n in killed_at if _shards.is_shard_name(n)]
    assert [n for n in killed_at if n not in shard_files] == manifests, killed_at
    assert len(shard_files) == 2 * PROCS
    meta = _checkpoint_file.read_meta(str(backup_dir / "training_state.npz"))
    assert meta["format_version"] == 2 and meta["step"] == KILL_STEP
    listed = [record["name"] for record in meta["shards"]["files"]]
    assert len(listed) == PROCS and set(listed) <= set(shard_files)
    (entry,) = [e for e in meta["entries"] if e["path"] == W]
    assert entry["sharded"] and {piece["file"] for piece in entry["pieces"]} == {0, 1}
    assert not any(e.get("sharded") for e in meta["entries"] if "head" in e["path"])

    # The parameters really were split across the processes.
    infos = [json.load(open(tmp_path / f"info{pid}.json")) for pid in range(PROCS)]
    for pid, info in enumerate(infos):
        assert not info["fully_addressable"] and not info["fully_replicated"]
        assert info["spec"] == [None, "data"]
        quarter = WIDE // (PROCS * LOCAL_DEVICES)
        first = pid * LOCAL_DEVICES * quarter
        assert info["local_blocks"] == [
            [[0, first + i * quarter], [FEATURES, first + (i + 1) * quarter]]
            for i in range(LOCAL_DEVICES)
        ]
        assert info["weights_reloaded"] and info["reloaded_spec"] == info["spec"]
        # ModelCheckpoint(max_to_keep=1) kept the last checkpoint and its shard files only
        (kept,) = [n for n in info["ckpt_files"] if not _shards.is_shard_name(n)]
        assert kept == f"model-{EPOCHS}.npz" and len(info["ckpt_files"]) == 1 + PROCS
        assert not info["ref_backup_left"]  # deleted, with its shard files, at the end
    assert infos[0]["history"] == infos[1]["history"]
    first_logs = _logs("first", outdir)
    assert "writes synchronously in a run of 2 processes" in first_logs[0]

    # 2. Restart: both processes resume from the backup and finish.
    procs = _start("resume", outdir)
    processes.wait(procs, 240)
    for proc, log in zip(procs, _logs("resume", outdir)):
        assert proc.returncode == 0, log
    assert not backup_dir.exists()  # deleted with its shard files once training completed
    replicated = [n for n in os.listdir(tmp_path) if n.startswith("replicated")]
    assert replicated == ["replicated.npz"]  # one file, no shard file and no temporary file
    assert _checkpoint_file.read_meta(str(tmp_path / "replicated.npz"))["format_version"] == 1
    for pid in range(PROCS):
        resumed = json.load(open(tmp_path / f"resumed{pid}.json"))
        assert resumed["restored_epoch"] == KILL_STEP // 5
        assert resumed["replicated_there"] and resumed["replicated_reloaded"]
        assert resumed["history"] == infos[pid]["history"]
        assert_bit_identical(
            _load(tmp_path / f"resumed_final{pid}.npz"), _load(tmp_path / f"ref_final{pid}.npz")
        )

    # 3. One process loads the two-process checkpoint, with the same values.
    single = make_model()
    single.load(str(tmp_path / "backup_copy" / "training_state.npz"))
    assert single.step == KILL_STEP
    expected = _load(tmp_path / "ref_step0.npz")
    got = jax.tree_util.tree_flatten_with_path(host(single.train_state))[0]
    assert sorted(expected) == sorted(jax.tree_util.keystr(p) for p, _ in got)
    assert_bit_identical([expected[jax.tree_util.keystr(p)] for p, _ in got], [v for _, v in got])


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    warnings.simplefilter("default")
    _worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
