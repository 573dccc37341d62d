"""Tests for hkfit.checkpoint and Model.save / load / save_weights / load_weights."""

import io
import os
import pickle
import zipfile
from typing import NamedTuple

import chex
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hkfit
from hkfit import checkpoint


def forward(x, is_training):
    h = jax.nn.relu(hk.Linear(6)(x))
    h = hk.BatchNorm(True, True, 0.9)(h, is_training)
    if is_training:
        h = hk.dropout(hk.next_rng_key(), 0.2, h)
    return hk.Linear(3)(h)


def wider_forward(x, is_training):
    h = jax.nn.relu(hk.Linear(7)(x))
    h = hk.BatchNorm(True, True, 0.9)(h, is_training)
    return hk.Linear(3)(h)


def deeper_forward(x, is_training):
    h = forward(x, is_training)
    return hk.Linear(3)(h)


def make_model(fn=forward, seed=0, **kwargs):
    kwargs.setdefault("optimizer", "adam")
    return hkfit.Model(
        fn, loss="sparse_categorical_crossentropy", metrics=["accuracy"], seed=seed, **kwargs
    )


def data(n=24):
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, 4)).astype(np.float32), rng.integers(0, 3, n)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A model trained for 2 epochs and its full checkpoint (the model is not reused)."""
    x, y = data()
    model = make_model()
    model.fit(x, y, epochs=2, batch_size=8, verbose=0, validation_split=0.25)
    path = str(tmp_path_factory.mktemp("ckpt") / "model.npz")
    model.save(path)
    return model, path


class Pair(NamedTuple):
    a: jax.Array
    b: dict


def tree_equal(a, b):
    unkey = lambda t: jax.tree_util.tree_map(
        lambda v: jax.random.key_data(v) if checkpoint._is_key(v) else v, t
    )
    chex.assert_trees_all_equal(unkey(a), unkey(b), strict=True)


# --- save_tree / load_tree -----------------------------------------------------------------


def test_tree_roundtrip_keeps_values_dtypes_and_keys(tmp_path):
    tree = Pair(
        jnp.arange(6, dtype=jnp.int32).reshape(2, 3),
        {
            "f": jnp.linspace(0, 1, 5),
            "bf": jnp.array([1.5, -2.0], jnp.bfloat16),
            "mask": jnp.array([True, False]),
            "key": jax.random.key(3),
            "raw": jax.random.PRNGKey(4),
            "scalar": jnp.float32(2.5),
        },
    )
    path = tmp_path / "tree.npz"
    checkpoint.save_tree(path, tree, metadata={"note": [1, 2]})
    target = jax.tree_util.tree_map(
        lambda v: v if checkpoint._is_key(v) else jnp.zeros_like(v), tree
    )
    loaded, meta = checkpoint.load_tree(path, target)
    tree_equal(loaded, tree)
    assert loaded.b["bf"].dtype == jnp.bfloat16
    assert jax.random.key_impl(loaded.b["key"]) == jax.random.key_impl(tree.b["key"])
    assert meta == {"note": [1, 2]}


def test_file_is_plain_npz_readable_without_pickle(trained):
    _, path = trained
    with np.load(path, allow_pickle=False) as npz:
        assert checkpoint.META_KEY in npz.files
        assert all(npz[k].dtype != object for k in npz.files)
    meta, _ = checkpoint.read(path)
    assert meta["format"] == checkpoint.FORMAT and meta["format_version"] == 1
    assert meta["hkfit_version"] == hkfit.__version__
    assert meta["epoch"] == 2 and meta["input_spec"] == {"shape": [1, 4], "dtype": "float32"}
    paths = [e["path"] for e in meta["entries"]]
    assert ".params['linear']['w']" in paths and ".rng" in paths and ".step" in paths


def test_reserved_metadata_keys_are_refused(tmp_path):
    with pytest.raises(ValueError, match="reserved"):
        checkpoint.save_tree(tmp_path / "t.npz", {"a": jnp.ones(1)}, metadata={"entries": 1})


# --- Model save / load ---------------------------------------------------------------------


def test_fresh_model_loads_full_state(trained):
    model, path = trained
    x, _ = data()
    fresh = make_model()
    assert not fresh.built
    fresh.load(path)
    np.testing.assert_array_equal(fresh.predict(x), model.predict(x))
    tree_equal(fresh.train_state, model.train_state)
    assert fresh.step == model.step and fresh.epoch == 2
    assert fresh.history.epoch == model.history.epoch == [0, 1]
    assert fresh.history.history == model.history.history


def test_training_continues_identically_after_load(tmp_path):
    x, y = data()
    a = make_model()
    a.fit(x, y, epochs=1, batch_size=8, verbose=0)
    path = tmp_path / "a.npz"
    a.save(path)
    a.fit(x, y, epochs=2, initial_epoch=1, batch_size=8, verbose=0)
    b = make_model().load(path)
    b.fit(x, y, epochs=2, initial_epoch=1, batch_size=8, verbose=0)
    tree_equal(b.train_state, a.train_state)


def test_dict_inputs_fresh_load(tmp_path):
    def two_inputs(x):
        return hk.Linear(2)(jnp.concatenate([x["a"], x["b"]], axis=-1))

    x = {"a": np.ones((4, 2), np.float32), "b": np.zeros((4, 3), np.float32)}
    model = hkfit.Model(two_inputs, loss="mse", optimizer="sgd")
    model.init(x)
    model.save(tmp_path / "d.npz")
    fresh = hkfit.Model(two_inputs, loss="mse", optimizer="sgd").load(tmp_path / "d.npz")
    np.testing.assert_array_equal(fresh.predict(x), model.predict(x))


def test_weights_roundtrip_and_kinds(trained, tmp_path):
    model, full = trained
    x, _ = data()
    path = tmp_path / "w.npz"
    model.save_weights(path)
    meta, _ = checkpoint.read(path)
    assert meta["kind"] == "weights"
    assert all(e["path"].startswith((".params", ".state")) for e in meta["entries"])
    fresh = make_model(seed=7).load_weights(path)
    np.testing.assert_array_equal(fresh.predict(x), model.predict(x))
    assert fresh.step == 0  # the optimizer state is not part of the weights
    from_full = make_model(seed=7).load_weights(full)
    np.testing.assert_array_equal(from_full.predict(x), model.predict(x))
    with pytest.raises(ValueError, match="load_weights"):
        make_model().load(path)


def test_save_needs_parameters(tmp_path):
    with pytest.raises(ValueError, match="save"):
        make_model().save(tmp_path / "m.npz")


def test_fresh_load_without_input_spec_explains(trained, tmp_path):
    model, _ = trained
    spec = model._input_spec
    model._input_spec = object()  # not expressible in JSON
    try:
        model.save_weights(tmp_path / "nospec.npz")
    finally:
        model._input_spec = spec
    with pytest.raises(ValueError, match=r"model.init\(x\)"):
        make_model().load_weights(tmp_path / "nospec.npz")


def test_different_seed_warns(trained):
    _, path = trained
    with pytest.warns(UserWarning, match="different seed"):
        make_model(seed=123).load(path)


def test_missing_file():
    with pytest.raises(FileNotFoundError):
        make_model().load("/nonexistent/model.npz")


# --- Structure mismatches ------------------------------------------------------------------


def test_shape_mismatch_names_path_and_both_shapes(trained):
    _, path = trained
    with pytest.raises(ValueError) as info:
        make_model(wider_forward).load(path)
    message = str(info.value)
    # params are checked first, in flattening order: batch_norm/offset is the first difference
    assert "at .params['batch_norm']['offset']" in message
    assert "checkpoint has shape (1, 6) float32" in message
    assert "model has shape (1, 7) float32" in message


def test_missing_path_is_named(trained):
    _, path = trained
    with pytest.raises(ValueError, match=r"\.params\['linear_2'\]\['b'\].*checkpoint has absent"):
        make_model(deeper_forward).load_weights(path)


def test_extra_path_is_named(tmp_path):
    checkpoint.save_tree(tmp_path / "t.npz", {"a": jnp.ones(2), "b": jnp.ones(3)})
    with pytest.raises(ValueError, match=r"\['b'\].*shape \(3,\) float32, the model has absent"):
        checkpoint.load_tree(tmp_path / "t.npz", {"a": jnp.ones(2)})


def test_dtype_mismatch_is_named(tmp_path):
    checkpoint.save_tree(tmp_path / "t.npz", {"a": jnp.ones(2)})
    with pytest.raises(ValueError, match=r"\['a'\].*float32.*int32"):
        checkpoint.load_tree(tmp_path / "t.npz", {"a": jnp.ones(2, jnp.int32)})


def test_other_optimizer_restores_weights_and_warns(trained):
    model, path = trained
    with pytest.warns(UserWarning, match="optimizer state"):
        other = make_model(optimizer="sgd").load(path)
    chex.assert_trees_all_equal(other.params, model.params)
    assert other.step == model.step and other.history.history == model.history.history


# --- Hostile and damaged files -------------------------------------------------------------


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_object_array_is_refused(tmp_path):
    marker = str(tmp_path / "pwned")
    path = tmp_path / "evil.npz"
    meta = np.frombuffer(
        b'{"format": "hkfit-checkpoint", "kind": "model", "entries": []}', np.uint8
    )
    np.savez(path, **{checkpoint.META_KEY: meta, "a0": np.array([_Payload(marker)], dtype=object)})
    with pytest.raises(ValueError, match="pickled Python object"):
        make_model().load(path)
    assert not os.path.exists(marker)


def test_pickle_file_is_refused(tmp_path):
    marker = str(tmp_path / "pwned")
    path = tmp_path / "evil.npz"
    path.write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(ValueError, match="never unpickles"):
        make_model().load(path)
    assert not os.path.exists(marker)


def test_pickle_member_inside_zip_is_refused(tmp_path):
    marker = str(tmp_path / "pwned")
    path = tmp_path / "evil.npz"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(checkpoint.META_KEY + ".npy", pickle.dumps(_Payload(marker)))
    with pytest.raises(ValueError, match=r"evil\.npz"):
        make_model().load(path)
    assert not os.path.exists(marker)


def test_single_npy_and_foreign_npz_are_refused(tmp_path):
    np.save(tmp_path / "one.npy", np.ones(3))
    with pytest.raises(ValueError, match=r"single \.npy"):
        checkpoint.read(tmp_path / "one.npy")
    np.savez(tmp_path / "other.npz", a=np.ones(3))
    with pytest.raises(ValueError, match="__hkfit_meta__"):
        checkpoint.read(tmp_path / "other.npz")


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty"])
def test_damaged_file_gives_clear_error(trained, tmp_path, damage):
    _, path = trained
    raw = bytearray(open(path, "rb").read())
    if damage == "truncate":
        raw = raw[: len(raw) // 2]
    elif damage == "flip":
        middle = len(raw) // 2
        raw[middle : middle + 16] = bytes(b ^ 0xFF for b in raw[middle : middle + 16])
    else:
        raw = bytearray()
    bad = tmp_path / "bad.npz"
    bad.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"bad\.npz"):
        make_model().load(bad)


# --- Atomic writes -------------------------------------------------------------------------


def _only_checkpoint_left(directory, name):
    assert sorted(os.listdir(directory)) == [name]


@pytest.mark.parametrize("where", ["write", "fsync"])
def test_crash_mid_save_keeps_previous_checkpoint(trained, tmp_path, monkeypatch, where):
    model, _ = trained
    x, _ = data()
    path = tmp_path / "model.npz"
    model.save(path)
    before = open(path, "rb").read()

    def broken_savez(file, **arrays):
        file.write(b"PK\x03\x04 half an archive")
        raise OSError("disk full")

    def broken_fsync(fd):
        raise OSError("I/O error")

    if where == "write":
        monkeypatch.setattr(np, "savez", broken_savez)
    else:
        monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError):
        model.save_weights(path)
    monkeypatch.undo()
    assert open(path, "rb").read() == before
    _only_checkpoint_left(tmp_path, "model.npz")
    np.testing.assert_array_equal(make_model().load(path).predict(x), model.predict(x))


def test_atomic_write_replaces_in_one_step(tmp_path):
    path = str(tmp_path / "f.bin")
    checkpoint.atomic_write(path, lambda f: f.write(b"one"))
    checkpoint.atomic_write(path, lambda f: f.write(b"two"))
    assert open(path, "rb").read() == b"two"
    _only_checkpoint_left(tmp_path, "f.bin")
    buffer = io.BytesIO()
    np.savez(buffer, a=np.ones(2))  # np.savez accepts file objects, as atomic_write passes
    assert buffer.getvalue()[:2] == b"PK"
