"""``Model.export`` / ``hkfit.load_exported``: a self-contained inference artifact.

Covered:
  * the exported file equals ``predict`` on batches of 1, 7 and 64 rows when loaded in a
    fresh process that has no model code (an MLP, the CNN of examples/digits.py with
    BatchNorm state and dropout, a dict-in / dict-out model, a dropout MLP);
  * ``batch_polymorphic=False`` fixes the batch size and refuses others;
  * ``apply_fn`` holds its key as uint32 data (exporters cannot carry typed keys), with
    bit-identical results;
  * input checks, bad arguments, and bad files (never unpickled);
  * (the export guide's snippets run in tests/test_docs.py);
  * the ONNX route (``hkfit[onnx]``), checked with onnxruntime, where it is installed.
"""

import functools
import importlib.util
import json
import os
import pathlib
import pickle
import subprocess
import sys
import textwrap
import zipfile

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export as jax_export

import hkfit
from hkfit import _export as export_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
BATCHES = (1, 7, 64)
RNG = np.random.default_rng(0)
X = RNG.normal(size=(96, 6)).astype(np.float32)
Y = (X[:, 0] > 0).astype(np.int32)
IMAGES = RNG.normal(size=(96, 8, 8, 1)).astype(np.float32)
DIGITS = RNG.integers(0, 10, 96).astype(np.int32)


def mlp(x):
    return hk.nets.MLP([16, 2])(x)


def _digits_forward():
    """The CNN of examples/digits.py: BatchNorm state, dropout in training."""
    spec = importlib.util.spec_from_file_location("digits", ROOT / "examples" / "digits.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.forward


def two_heads(x):
    h = jax.nn.relu(hk.Linear(16)(jnp.concatenate([x["left"], x["right"]], axis=-1)))
    return {"score": hk.Linear(1)(h)[:, 0], "kind": hk.Linear(3)(h)}


def dropout_mlp(x, is_training):
    h = jax.nn.relu(hk.Linear(16)(x))
    h = hk.dropout(hk.next_rng_key(), 0.5, h) if is_training else h
    return hk.Linear(2)(h)


@functools.cache
def trained(name):
    """A model and its inputs (shared: the tests only read them).

    The CNN is trained for one epoch, so its BatchNorm statistics are not the initial ones.
    """
    if name == "mlp":
        model, x = hkfit.Model(mlp, loss="sparse_categorical_crossentropy"), X
    elif name == "digits_cnn":
        model, x = hkfit.Model(_digits_forward(), loss="sparse_categorical_crossentropy"), IMAGES
        model.fit(x, DIGITS, epochs=1, batch_size=32, verbose=0)
    elif name == "dict_io":
        loss = {"score": "mse", "kind": "sparse_categorical_crossentropy"}
        model, x = hkfit.Model(two_heads, loss=loss), {"left": X[:, :2], "right": X[:, 2:]}
    else:
        model, x = hkfit.Model(dropout_mlp, loss="sparse_categorical_crossentropy"), X
    return model.init(x), x


def rows(tree, n):
    return jax.tree_util.tree_map(lambda a: a[:n], tree)


def flat(tree, prefix):
    """``{prefix + keystr(path): leaf}``: a pytree as npz entries."""
    return {
        prefix + jax.tree_util.keystr(path): np.asarray(leaf)
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


CHILD = textwrap.dedent(
    """
    import json, re, sys
    import jax, numpy as np
    from hkfit import load_exported

    def unflat(arrays, prefix):
        if prefix in arrays:
            return arrays[prefix]
        return {re.fullmatch(r"\\['(.*)'\\]", k[len(prefix):]).group(1): v
                for k, v in arrays.items() if k.startswith(prefix)}

    results = {}
    for case in json.loads(sys.argv[1]):
        f = load_exported(case["export"])
        for data in case["data"]:
            arrays = dict(np.load(data, allow_pickle=False))
            out = f(unflat(arrays, "x"))
            got = {"y" + jax.tree_util.keystr(p): np.asarray(v)
                   for p, v in jax.tree_util.tree_flatten_with_path(out)[0]}
            want = {k: v for k, v in arrays.items() if k.startswith("y")}
            assert sorted(got) == sorted(want), (sorted(got), sorted(want))
            assert all(got[k].shape == want[k].shape for k in want), data
            results[data] = max(float(np.max(np.abs(got[k] - want[k]))) for k in want)
    assert not any(m in sys.modules for m in ("digits", "test_export", "tests.test_export"))
    print(json.dumps(results))
    """
)


def test_exported_equals_predict_in_a_fresh_process(tmp_path):
    cases = []
    for name in ("mlp", "digits_cnn", "dict_io", "dropout_mlp"):
        model, x = trained(name)
        path = tmp_path / f"{name}.zip"
        model.export(path)
        data = []
        for n in BATCHES:
            file = tmp_path / f"{name}-{n}.npz"
            np.savez(file, **flat(rows(x, n), "x"), **flat(model.predict(rows(x, n)), "y"))
            data.append(str(file))
        cases.append({"export": str(path), "data": data})
    pythonpath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": pythonpath}  # this hkfit
    env.pop("XLA_FLAGS", None)  # one device, as a serving process
    done = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(cases)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,  # not the repository: the tests' code cannot be imported
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    differences = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(differences) == 4 * len(BATCHES)
    assert max(differences.values()) < 1e-5, differences


def test_fixed_batch_size(tmp_path):
    model, x = trained("mlp")
    model.export(tmp_path / "fixed.zip", batch_polymorphic=False, batch_size=7)
    f = hkfit.load_exported(tmp_path / "fixed.zip")
    assert f.batch_size == 7 and f.metadata["inputs"][0]["shape"] == [7, 6]
    np.testing.assert_allclose(np.asarray(f(x[:7])), model.predict(x[:7]), atol=1e-6)
    with pytest.raises(ValueError, match=r"fixed batch size of 7 .* Received: inputs with 8 rows"):
        f(x[:8])
    model.export(tmp_path / "one.zip", batch_polymorphic=False)  # default: one row
    assert hkfit.load_exported(tmp_path / "one.zip").batch_size == 1


def test_forward_that_needs_a_concrete_batch_size(tmp_path):
    def forward(x):
        y = hk.Linear(2)(x)
        return y * 2.0 if x.shape[0] > 4 else y  # a Python branch on the batch size

    model = hkfit.Model(forward, loss="mse").init(X[:8])
    with pytest.raises(ValueError, match="batch_polymorphic=False"):
        model.export(tmp_path / "poly.zip")
    model.export(tmp_path / "fixed.zip", batch_polymorphic=False, batch_size=8)
    out = hkfit.load_exported(tmp_path / "fixed.zip")(X[:8])
    np.testing.assert_allclose(np.asarray(out), model.predict(X[:8]), atol=1e-6)


def stochastic(x):  # draws a key at inference too
    return hk.Linear(2)(x) + jax.random.normal(hk.next_rng_key(), (x.shape[0], 2))


def test_apply_fn_holds_the_inference_key_as_uint32_data(tmp_path):
    model = hkfit.Model(stochastic, loss="mse", seed=3).init(X[:4])
    jaxpr = jax.make_jaxpr(lambda x: model.apply_fn(model.params, model.state, x))(X[:4])
    dtypes = [jnp.result_type(c) for c in jaxpr.consts]
    assert not any(jnp.issubdtype(d, jax.dtypes.prng_key) for d in dtypes), dtypes
    # bit-identical to the typed key it replaces: stream 3 of the seed's key
    key = jax.random.fold_in(jax.random.key(3), 3)
    apply = hk.transform_with_state(stochastic).apply
    expected, _ = apply(model.params, model.state, key, X)
    np.testing.assert_array_equal(model.apply_fn(model.params, model.state, X), expected)
    jitted = jax.jit(lambda p, s, x: apply(p, s, key, x)[0])(model.params, model.state, X)
    np.testing.assert_array_equal(jax.jit(model.apply_fn)(model.params, model.state, X), jitted)
    model.export(tmp_path / "stochastic.zip")  # the key travels as data
    out = hkfit.load_exported(tmp_path / "stochastic.zip")(X)
    np.testing.assert_allclose(np.asarray(out), expected, atol=1e-6)


def test_exports_eval_params(tmp_path):
    model = hkfit.Model(mlp, loss="sparse_categorical_crossentropy", ema=0.9)
    model.fit(X, Y, epochs=2, batch_size=16, verbose=0)
    model.export(tmp_path / "ema.zip")
    out = np.asarray(hkfit.load_exported(tmp_path / "ema.zip")(X))
    np.testing.assert_allclose(out, model.predict(X), atol=1e-6)
    raw = np.asarray(model.apply_fn(model.params, model.state, X))
    assert np.abs(out - raw).max() > 1e-4  # the average, not the training params


def test_inputs_are_checked(tmp_path):
    model, x = trained("dict_io")
    model.export(tmp_path / "dict.zip")
    f = hkfit.load_exported(tmp_path / "dict.zip")
    out = f({"left": x["left"][:3].astype(np.float64), "right": jnp.asarray(x["right"][:3])})
    assert set(out) == {"score", "kind"} and out["kind"].shape == (3, 3)
    with pytest.raises(ValueError, match="structure"):
        f(x["left"])
    with pytest.raises(ValueError, match=r"rows of shape \(4,\).* It looks like one example"):
        f({"left": x["left"][:3], "right": x["right"][0]})
    with pytest.raises(ValueError, match="same number of rows"):
        f({"left": x["left"][:3], "right": x["right"][:4]})
    with pytest.raises(ValueError, match=r"dtype float32 .* Received: x\['left'\] of dtype int32"):
        f({"left": x["left"][:3].astype(np.int32), "right": x["right"][:3]})
    assert "x['left']: shape (batch, 2) float32" in repr(f)


def test_bad_arguments(tmp_path):
    model = hkfit.Model(mlp, loss="mse")
    with pytest.raises(ValueError, match="`export` needs parameters"):
        model.export(tmp_path / "m.zip")
    model.init(X[:2])
    with pytest.raises(ValueError, match="format"):
        model.export(tmp_path / "m.zip", format="saved_model")
    with pytest.raises(ValueError, match="batch_polymorphic=False"):
        model.export(tmp_path / "m.zip", batch_size=4)
    with pytest.raises(ValueError, match="batch_size` > 0"):
        model.export(tmp_path / "m.zip", batch_polymorphic=False, batch_size=0)
    with pytest.raises(ValueError, match="directory"):
        model.export(tmp_path / "missing" / "m.zip")
    with pytest.raises(ValueError, match="Received a directory"):
        model.export(tmp_path)
    with pytest.raises(TypeError, match="platforms"):
        model.export(tmp_path / "m.zip", platforms="cpu")
    with pytest.raises(ValueError, match="platforms"):
        model.export(tmp_path / "m.onnx", format="onnx", platforms=("cpu",))
    assert not list(tmp_path.iterdir())  # nothing written


def test_missing_flatbuffers_names_the_extra(tmp_path, monkeypatch):
    model = hkfit.Model(mlp, loss="mse").init(X[:2])
    monkeypatch.setitem(sys.modules, "flatbuffers", None)  # import flatbuffers fails
    with pytest.raises(ImportError, match=r"hkfit\[export\]"):
        model.export(tmp_path / "m.zip")


def test_errors_unrelated_to_the_batch_size_propagate(tmp_path):
    def apply_fn(params, state, x):
        raise TypeError("boom")

    spec = jax.ShapeDtypeStruct((1, 3), jnp.float32)
    with pytest.raises(TypeError, match="boom"):  # not blamed on the symbolic batch
        export_lib.export(tmp_path / "m.zip", apply_fn, {}, {}, spec)


def test_wrong_platform_is_refused_at_load(tmp_path):
    model = hkfit.Model(mlp, loss="mse").init(X[:2])
    other = "cuda" if jax_export.default_export_platform() != "cuda" else "cpu"
    model.export(tmp_path / "other.zip", platforms=(other,))
    with pytest.raises(ValueError, match=rf"exported for the platforms \('{other}',\)"):
        hkfit.load_exported(tmp_path / "other.zip")


class _Boom:
    def __reduce__(self):
        return (open, (os.path.join(os.environ.get("HKFIT_EXPORT_MARKER", "."), "owned"), "w"))


def test_bad_files(tmp_path, monkeypatch):
    model = hkfit.Model(mlp, loss="mse").init(X[:2])
    good = tmp_path / "good.zip"
    model.export(good)
    with pytest.raises(FileNotFoundError):
        hkfit.load_exported(tmp_path / "nothing.zip")
    with pytest.raises(ValueError, match="directory"):
        hkfit.load_exported(tmp_path)

    def write(name, data):
        (tmp_path / name).write_bytes(data)
        return tmp_path / name

    monkeypatch.setenv("HKFIT_EXPORT_MARKER", str(tmp_path))
    with pytest.raises(ValueError, match="not a model exported"):
        hkfit.load_exported(write("pickled.zip", pickle.dumps(_Boom())))
    assert not (tmp_path / "owned").exists()  # never unpickled
    with pytest.raises(ValueError, match="not a model exported"):
        hkfit.load_exported(write("truncated.zip", good.read_bytes()[:200]))
    model.save(tmp_path / "checkpoint.npz")  # a zip, but a checkpoint
    with pytest.raises(ValueError, match="without the members"):
        hkfit.load_exported(tmp_path / "checkpoint.npz")

    def rewrite(name, meta=None, module=None):
        with zipfile.ZipFile(good) as archive:
            old_meta = json.loads(archive.read("hkfit_export.json"))
            old_module = archive.read("exported.bin")
        with zipfile.ZipFile(tmp_path / name, "w") as archive:
            archive.writestr("hkfit_export.json", json.dumps({**old_meta, **(meta or {})}))
            archive.writestr("exported.bin", old_module if module is None else module)
        return tmp_path / name

    with pytest.raises(ValueError, match="format 'other'"):
        hkfit.load_exported(rewrite("format.zip", meta={"format": "other"}))
    with pytest.raises(ValueError, match=r"version 99.*Upgrade hkfit"):
        hkfit.load_exported(rewrite("newer.zip", meta={"format_version": 99}))
    with pytest.raises(ValueError, match="cannot read"):
        hkfit.load_exported(rewrite("module.zip", module=b"\x00" * 64))
    hkfit.load_exported(rewrite("same.zip"))  # the rewrite itself keeps a valid file


@pytest.fixture(scope="module")
def onnx():
    pytest.importorskip(
        "jax2onnx", reason="the ONNX route needs the onnx extra: pip install 'hkfit[onnx]'"
    )
    return pytest.importorskip("onnxruntime", reason="pip install 'hkfit[onnx]'")


@pytest.mark.parametrize("name", ["mlp", "digits_cnn", "dict_io"])
def test_onnx_equals_predict(onnx, tmp_path, name):
    model, x = trained(name)
    path = tmp_path / f"{name}.onnx"
    model.export(path, format="onnx")
    session = onnx.InferenceSession(str(path))
    for n in BATCHES:
        batch = rows(x, n)
        outputs = session.run(None, batch if isinstance(batch, dict) else {"x": batch})
        expected = jax.tree_util.tree_leaves(model.predict(batch))
        assert len(outputs) == len(expected)
        for got, want in zip(outputs, expected):
            np.testing.assert_allclose(got, want, atol=1e-5)
    names = [o.name for o in session.get_outputs()]
    assert names == (["kind", "score"] if name == "dict_io" else ["y"])


def test_onnx_fixed_batch(onnx, tmp_path):
    model, x = trained("mlp")
    model.export(tmp_path / "fixed.onnx", format="onnx", batch_polymorphic=False, batch_size=7)
    session = onnx.InferenceSession(str(tmp_path / "fixed.onnx"))
    assert session.get_inputs()[0].shape == [7, 6]
    np.testing.assert_allclose(session.run(None, {"x": x[:7]})[0], model.predict(x[:7]), atol=1e-5)
