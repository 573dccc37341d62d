"""``hkfit.enable_compilation_cache``: a second process finds its programs on disk."""

import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

import hkfit
from hkfit import _compat
from hkfit import _compilation_cache as cache_lib

SCRIPT = textwrap.dedent(
    """
    import sys
    import haiku as hk, numpy as np, hkfit

    hkfit.enable_compilation_cache(sys.argv[1])
    x = np.random.default_rng(0).normal(size=(64, 5)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int32)
    model = hkfit.Model(lambda x: hk.nets.MLP([16, 2])(x), loss="sparse_categorical_crossentropy")
    model.fit(x, y, epochs=1, batch_size=16, verbose=0)
    print("loss", model.evaluate(x, y, verbose=0)["loss"])
    """
)


def run(cache_dir):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)  # one device, as a user's script
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(cache_dir)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def entries(cache_dir):
    return sorted(p.name for p in pathlib.Path(cache_dir).rglob("*") if p.is_file())


@pytest.mark.skipif(
    not _compat.cpu_cache_works(),
    reason="JAX < 0.5 runs programs loaded from the cache incorrectly on CPU (hangs, crashes)",
)
def test_a_second_process_reuses_the_compiled_programs(tmp_path):
    first = run(tmp_path)
    stored = entries(tmp_path)
    assert stored, "the first process stored no compiled program"
    second = run(tmp_path)
    assert entries(tmp_path) == stored  # every program was found: nothing new compiled
    assert first == second  # and it computes the same


def test_default_path_follows_xdg_cache_home(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_lib.default_path() == tmp_path / "hkfit" / "jax"


def test_bad_arguments(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("")
    with pytest.raises(ValueError, match="directory"):
        hkfit.enable_compilation_cache(a_file)
    with pytest.raises(ValueError, match="min_compile_time_secs"):
        hkfit.enable_compilation_cache(tmp_path, min_compile_time_secs=-1)


@pytest.mark.skipif(_compat.cpu_cache_works(), reason="this JAX runs cached CPU programs")
def test_left_off_where_cached_programs_would_hang(tmp_path):
    with pytest.warns(UserWarning, match="stays off"):
        assert hkfit.enable_compilation_cache(tmp_path / "cache") is None
    assert not (tmp_path / "cache").exists()
