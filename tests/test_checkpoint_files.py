"""Tests for hkfit.checkpoint on hostile and broken files, and for how files are written.

Every refused file must raise a ValueError naming it, quickly, without allocating what
the file dictates, and leave the model it was loaded into bit-identical.
"""

import contextlib
import errno
import io
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
import tracemalloc
import zipfile

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hkfit
from hkfit import _checkpoint_file, checkpoint

META = checkpoint.META_KEY + ".npy"


def forward(x, is_training):
    h = jax.nn.relu(hk.Linear(6)(x))
    h = hk.BatchNorm(True, True, 0.9)(h, is_training)
    return hk.Linear(3)(h)


def make_model():
    return hkfit.Model(forward, loss="sparse_categorical_crossentropy", optimizer="adam", seed=0)


def data(n=16):
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, 4)).astype(np.float32), rng.integers(0, 3, n)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """``(model, path)``: a model trained for one epoch and its full checkpoint.

    Every test only tries to load broken files into this model, so it must not change.
    """
    x, y = data()
    model = make_model()
    model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    path = str(tmp_path_factory.mktemp("ckpt") / "model.npz")
    model.save(path)
    return model, path


def bits(model):
    """The model's params, state and optimizer state as exact bytes."""
    leaves = jax.tree_util.tree_leaves((model.params, model.state, model.opt_state))
    return [(np.asarray(leaf).dtype, np.asarray(leaf).tobytes()) for leaf in leaves]


# --- Building broken files -----------------------------------------------------------------


def members(path):
    with zipfile.ZipFile(path) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def npy(array):
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def meta_of(path):
    return json.loads(np.load(io.BytesIO(members(path)[META])).tobytes())


def write_zip(path, parts, compression=zipfile.ZIP_STORED):
    with zipfile.ZipFile(path, "w", compression=compression) as archive:
        for name, raw in parts.items():
            archive.writestr(name, raw)
    return str(path)


def rewrite(src, dst, meta=None, **replaced):
    """``src`` with its metadata replaced (a dict, or raw JSON text or bytes) and members."""
    parts = members(src)
    if meta is not None:
        text = json.dumps(meta) if isinstance(meta, dict) else meta
        raw = text.encode() if isinstance(text, str) else text
        parts[META] = npy(np.frombuffer(raw, np.uint8))
    for name, value in replaced.items():
        parts[name + ".npy"] = value if isinstance(value, bytes) else npy(value)
    return write_zip(dst, parts)


def entry_of(meta, tree_path):
    return next(e for e in meta["entries"] if e["path"] == tree_path)


@contextlib.contextmanager
def deadline(seconds):
    """Fails the test instead of hanging when the block runs longer than ``seconds``."""

    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def allocation_below(limit):
    """Fails if the block's peak of traced allocations (numpy's included) reaches ``limit``."""
    tracemalloc.start()
    try:
        yield
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < limit, f"allocated {peak} bytes"


def refused(model, path, match=None, *, weights_only=False):
    """Loads ``path`` into ``model``: a ValueError naming it, and the model unchanged."""
    before, built = (bits(model) if model.built else None), model.built
    with deadline(20), pytest.raises(ValueError) as info:
        (model.load_weights if weights_only else model.load)(path)
    assert os.path.basename(path) in str(info.value)
    if match is not None:
        assert match in str(info.value), str(info.value)
    assert model.built == built
    if built:
        assert bits(model) == before
    return str(info.value)


# --- 1. Allocation dictated by the file ----------------------------------------------------


def test_compressed_member_is_refused_without_inflating(saved, tmp_path):
    model, path = saved
    parts = members(path)
    bomb = tmp_path / "bomb.npz"
    with zipfile.ZipFile(bomb, "w") as archive:
        for name, raw in parts.items():
            archive.writestr(name, raw)
        zeros = b"\0" * 2**26  # deflated: 64 MB in about 64 kB
        archive.writestr("unused.npy", zeros, compress_type=zipfile.ZIP_DEFLATED)
    assert os.path.getsize(bomb) < 2**20
    with allocation_below(2**24):
        refused(model, str(bomb), "compressed")


@pytest.mark.parametrize("entry_says_huge", [True, False])
def test_lying_npy_header_is_refused_before_allocating(saved, tmp_path, entry_says_huge):
    model, path = saved
    meta = meta_of(path)
    entry = entry_of(meta, ".params['linear']['w']")
    huge = 2 * 10**9
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<f4", "fortran_order": False, "shape": (huge,)}
    )
    if entry_says_huge:
        entry["shape"] = [huge]
    bad = rewrite(
        path, tmp_path / "header.npz", meta, **{entry["key"]: header.getvalue() + bytes(16)}
    )
    with allocation_below(2**24):
        refused(model, bad, "corrupted")


def test_huge_input_spec_is_refused_before_allocating(saved, tmp_path):
    _, path = saved
    meta = meta_of(path)
    meta["input_spec"] = {"shape": [1, 10**12], "dtype": "float32"}
    bad = rewrite(path, tmp_path / "spec.npz", meta)
    fresh = make_model()
    with allocation_below(2**24):
        message = refused(fresh, bad, "input_spec")
    assert "elements" in message


def test_fresh_model_compares_shapes_before_allocating(saved, tmp_path):
    _, path = saved
    meta = meta_of(path)
    meta["input_spec"] = {"shape": [1, 50_000], "dtype": "float32"}  # w would be 50000 x 6
    bad = rewrite(path, tmp_path / "spec.npz", meta)
    fresh = make_model()
    fresh.init = lambda x: pytest.fail("the model was initialized before the check")
    message = refused(fresh, bad, ".params['linear']['w']")
    assert "(50000, 6)" in message and "(4, 6)" in message
    assert fresh._input_spec is None


def test_metadata_size_is_bounded(saved, tmp_path, monkeypatch):
    model, path = saved
    monkeypatch.setattr(_checkpoint_file, "META_LIMIT", 64)
    refused(model, path, "more than the 64 bytes")


# --- 2. Files that are not regular files ---------------------------------------------------


def test_non_regular_files_are_refused_without_blocking(saved, tmp_path):
    model, _ = saved
    fifo = str(tmp_path / "fifo.npz")
    os.mkfifo(fifo)
    directory = str(tmp_path / "dir.npz")
    os.mkdir(directory)
    with tempfile.TemporaryDirectory(dir="/tmp") as short:  # socket paths are short
        sock_path = os.path.join(short, "s.npz")
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind(sock_path)
            for path, kind in [
                (fifo, "FIFO"),
                (directory, "directory"),
                (sock_path, "socket"),
                ("/dev/null", "device"),
            ]:
                assert kind in refused(model, path)
                with deadline(20), pytest.raises(ValueError, match="regular files"):
                    checkpoint.read(path)
    with pytest.raises(FileNotFoundError, match=r"nothing\.npz"):
        checkpoint.read(tmp_path / "nothing.npz")


def test_backup_in_a_fifo_does_not_hang_fit(tmp_path):
    backup = tmp_path / "backup"
    backup.mkdir()
    os.mkfifo(backup / hkfit.callbacks.BackupAndRestore.FILENAME)
    x, y = data()
    callback = hkfit.callbacks.BackupAndRestore(str(backup))
    with deadline(60), pytest.raises(ValueError), pytest.warns(UserWarning, match="FIFO"):
        make_model().fit(x, y, epochs=1, batch_size=8, verbose=0, callbacks=[callback])


# --- 3. Malformed metadata -----------------------------------------------------------------


def _set(field, value):
    def edit(meta):
        meta[field] = value
        return meta

    return edit


def _set_entry(field, value, delete=False):
    def edit(meta):
        entry = entry_of(meta, ".params['linear_1']['b']")
        if delete:
            del entry[field]
        else:
            entry[field] = value
        return meta

    return edit


def _raw(text):
    return lambda meta: text


def _inf_epoch(meta):
    meta["epoch"] = "@"
    return json.dumps(meta).replace('"@"', "1e400")


def _deep_spec(meta):
    spec = {"shape": [1, 4], "dtype": "float32"}
    for _ in range(40):
        spec = {"list": [spec]}
    meta["input_spec"] = spec
    return meta


def _duplicate_path(meta):
    meta["entries"][1]["path"] = meta["entries"][0]["path"]
    return meta


MALFORMED = {
    "deep nesting": _raw(
        '{"format": "hkfit-checkpoint", "x": ' + "[" * 100_000 + "]" * 100_000 + "}"
    ),
    "not json": _raw("{'format': 'hkfit-checkpoint'}"),
    "not utf-8": _raw(b"\xff\xfe\x00"),
    "top level list": _raw('["hkfit-checkpoint"]'),
    "format": _set("format", ["hkfit-checkpoint"]),
    "format_version str": _set("format_version", "1"),
    "format_version newer": _set("format_version", 99),
    "hkfit_version": _set("hkfit_version", 1),
    "entries not a list": _set("entries", {"a0": {}}),
    "entry not an object": lambda m: {**m, "entries": [*m["entries"], 3]},
    "entry without key": _set_entry("key", None, delete=True),
    "entry path int": _set_entry("path", 7),
    "negative shape": _set_entry("shape", [-3]),
    "shape not a list": _set_entry("shape", 3),
    "shape of floats": _set_entry("shape", [3.0]),
    "unknown dtype": _set_entry("dtype", "float1024"),
    "object dtype": _set_entry("dtype", "object"),
    "str dtype": _set_entry("dtype", "str"),
    "ml_dtypes non-dtype": _set_entry("dtype", "finfo"),
    "bits not bool": _set_entry("bits", "yes"),
    "key_impl unknown": lambda m: {
        **m,
        "entries": [{**e, "key_impl": "nope"} if e["path"] == ".rng" else e for e in m["entries"]],
    },
    "sha256 not hex": _set_entry("sha256", "xyz"),
    "duplicate path": _duplicate_path,
    "kind": _set("kind", 5),
    "epoch 1e400": _inf_epoch,
    "epoch negative": _set("epoch", -1),
    "step bool": _set("step", True),
    "epochs_trained huge": _set("epochs_trained", 2**70),
    "history not an object": _set("history", [1, 2]),
    "history values not numbers": _set("history", {"epoch": [0], "history": {"loss": ["a"]}}),
    "history series not a list": _set("history", {"epoch": [0], "history": {"loss": 1.0}}),
    "history epoch strings": _set("history", {"epoch": ["0"], "history": {}}),
    "seed list": _set("seed", [1, 2]),
    "seed data": _set("seed", {"impl": "threefry2x32", "data": [-1, 2**40]}),
    "input_spec shape str": _set("input_spec", {"shape": "abc", "dtype": "float32"}),
    "input_spec dtype": _set("input_spec", {"shape": [1, 4], "dtype": "object"}),
    "input_spec deep": _deep_spec,
    "input_spec unknown": _set("input_spec", {"set": [1]}),
    "position": _set("position", {"epoch": -1, "batch": 0, "logs": []}),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_metadata_is_a_value_error_and_changes_nothing(saved, tmp_path, case):
    model, path = saved
    bad = rewrite(path, tmp_path / "meta.npz", MALFORMED[case](meta_of(path)))
    refused(model, bad)
    refused(model, bad, weights_only=True)


def test_malformed_metadata_keeps_a_fresh_model_fresh(saved, tmp_path):
    _, path = saved
    bad = rewrite(path, tmp_path / "meta.npz", _set("epoch", "two")(meta_of(path)))
    fresh = make_model()
    assert "`epoch`" in refused(fresh, bad)
    assert not fresh.built and fresh._input_spec is None


# --- 4. Array dtypes, shapes and content ---------------------------------------------------


def test_member_dtype_must_match_its_entry(saved, tmp_path):
    model, path = saved
    meta = meta_of(path)
    entry = entry_of(meta, ".params['linear']['w']")
    complex_w = np.ones(entry["shape"], np.complex64)
    bad = rewrite(path, tmp_path / "complex.npz", **{entry["key"]: complex_w})
    assert "complex64" in refused(model, bad, "corrupted")
    # the entry says complex too (no hash): the live float32 leaf refuses it
    entry["dtype"] = "complex64"
    del entry["sha256"]
    bad = rewrite(path, tmp_path / "complex2.npz", meta, **{entry["key"]: complex_w})
    assert "complex64" in refused(model, bad, ".params['linear']['w']")
    assert all(jnp.isrealobj(leaf) for leaf in jax.tree_util.tree_leaves(model.params))


def test_swapped_arrays_are_refused_by_their_hash(saved, tmp_path):
    model, path = saved
    meta = meta_of(path)
    first = entry_of(meta, ".params['linear']['b']")
    twin = next(
        e
        for e in meta["entries"]
        if e["shape"] == first["shape"] and e["dtype"] == first["dtype"] and e is not first
    )
    parts = members(path)
    swapped = {first["key"]: parts[twin["key"] + ".npy"], twin["key"]: parts[first["key"] + ".npy"]}
    bad = rewrite(path, tmp_path / "swapped.npz", **swapped)
    message = refused(model, bad, "sha256")
    assert "linear" in message

    tree = {"a": jnp.arange(3.0), "b": jnp.arange(3.0) + 10}
    checkpoint.save_tree(tmp_path / "t.npz", tree)
    parts = members(tmp_path / "t.npz")
    bad = rewrite(tmp_path / "t.npz", tmp_path / "t2.npz", a0=parts["a1.npy"], a1=parts["a0.npy"])
    with pytest.raises(ValueError, match=r"t2\.npz.*\['a'\].*sha256"):
        checkpoint.load_tree(bad, tree)


def test_files_without_hashes_still_load(saved, tmp_path):
    model, path = saved
    meta = meta_of(path)
    assert all(len(e["sha256"]) == 64 for e in meta["entries"])
    for entry in meta["entries"]:
        del entry["sha256"]
    old = rewrite(path, tmp_path / "old.npz", meta)
    x, _ = data()
    np.testing.assert_array_equal(make_model().load(old).predict(x), model.predict(x))


def test_fortran_ordered_members_of_older_files_load(tmp_path):
    array = np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3))
    checkpoint.save_tree(tmp_path / "t.npz", {"a": array})
    meta = meta_of(tmp_path / "t.npz")
    del meta["entries"][0]["sha256"]
    old = rewrite(tmp_path / "t.npz", tmp_path / "f.npz", meta, a0=npy(array))
    loaded, _ = checkpoint.load_tree(old, {"a": jnp.zeros((2, 3))})
    np.testing.assert_array_equal(loaded["a"], array)


# --- 5. Corrupted bytes --------------------------------------------------------------------


def test_compression_method_flip_is_a_value_error(saved, tmp_path):
    model, path = saved
    raw = bytearray(open(path, "rb").read())
    central = raw.index(b"PK\x01\x02")  # the first central directory record
    raw[central + 10 : central + 12] = (99).to_bytes(2, "little")
    bad = tmp_path / "method.npz"
    bad.write_bytes(bytes(raw))
    message = refused(model, str(bad), "not a readable hkfit checkpoint")
    assert "corrupted" in message


def test_random_byte_flips_give_value_errors_only(saved, tmp_path):
    _, path = saved
    raw = open(path, "rb").read()
    rng = np.random.default_rng(1)
    bad = tmp_path / "flip.npz"
    for position in rng.integers(0, len(raw), 150):
        damaged = bytearray(raw)
        damaged[position] ^= 1 << int(rng.integers(0, 8))
        bad.write_bytes(bytes(damaged))
        try:
            checkpoint.read(bad)
        except ValueError as e:
            assert "flip.npz" in str(e)


# --- 6. Temporary files --------------------------------------------------------------------


def test_stale_temp_file_is_replaced(tmp_path):
    path = tmp_path / "t.npz"
    stale = checkpoint.temp_path(path)
    assert stale == str(tmp_path / ".t.npz.tmp")
    open(stale, "wb").write(b"left by a killed writer")
    checkpoint.save_tree(path, {"a": jnp.ones(2)})
    assert sorted(os.listdir(tmp_path)) == ["t.npz"]


def test_a_concurrent_writer_of_the_same_path_is_detected(tmp_path):
    path = str(tmp_path / "f.bin")
    checkpoint.atomic_write(path, lambda f: f.write(b"old"))
    tmp = checkpoint.temp_path(path)

    def write_while_another_starts(f):
        f.write(b"mine")
        os.unlink(tmp)  # what a second writer of `path` does first
        open(tmp, "wb").write(b"half of the other")

    with pytest.raises(OSError, match="another writer") as info:
        checkpoint.atomic_write(path, write_while_another_starts)
    assert info.value.errno == errno.EBUSY
    assert open(path, "rb").read() == b"old"
    assert open(tmp, "rb").read() == b"half of the other"  # left to its writer


CHILD = textwrap.dedent(
    """
    import sys
    import numpy as np
    from hkfit import checkpoint
    tree = {"w": np.random.default_rng(0).normal(size=(4, 2**20)).astype(np.float32)}
    checkpoint.save_tree(sys.argv[1], tree)
    print("saving", flush=True)
    while True:
        checkpoint.save_tree(sys.argv[1], tree)
    """
)


def test_sigkill_during_saves_leaves_no_temp_after_the_next_save(tmp_path):
    path = str(tmp_path / "big.npz")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, path], stdout=subprocess.PIPE, env=env, text=True
    )
    try:
        with deadline(60):
            assert child.stdout.readline().strip() == "saving"
        time.sleep(0.5)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdout.close()
    checkpoint.read(path)  # the file killed mid-save is still a whole checkpoint
    checkpoint.save_tree(path, {"w": np.zeros(3, np.float32)})
    assert sorted(os.listdir(tmp_path)) == ["big.npz"]


# --- 7. File modes -------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_new_file_mode_follows_the_umask(tmp_path, umask):
    previous = os.umask(umask)
    try:
        checkpoint.save_tree(tmp_path / "t.npz", {"a": jnp.ones(2)})
    finally:
        os.umask(previous)
    assert stat.S_IMODE(os.stat(tmp_path / "t.npz").st_mode) == 0o666 & ~umask


def test_overwrite_keeps_the_mode(tmp_path):
    path = tmp_path / "t.npz"
    checkpoint.save_tree(path, {"a": jnp.ones(2)})
    for mode in (0o644, 0o600, 0o640):
        os.chmod(path, mode)
        checkpoint.save_tree(path, {"a": jnp.zeros(2)})
        assert stat.S_IMODE(os.stat(path).st_mode) == mode


# --- 8. A full disk ------------------------------------------------------------------------


def test_full_disk_names_the_file_and_the_bytes_needed(tmp_path, monkeypatch):
    path = tmp_path / "t.npz"
    tree = {"a": jnp.ones(1000)}
    checkpoint.save_tree(path, tree)
    before = path.read_bytes()

    def full(file, **arrays):
        file.write(b"PK\x03\x04 part of an archive")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "savez", full)
    with pytest.raises(OSError) as info:
        checkpoint.save_tree(path, {"a": jnp.zeros(1000)})
    monkeypatch.undo()
    assert info.value.errno == errno.ENOSPC
    message = str(info.value)
    assert str(path) in message and "No space left" in message
    needed = int(message.split("needs about ")[1].split(" bytes")[0])
    assert needed >= 4000
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["t.npz"]
