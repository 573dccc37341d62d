"""The objective examples run and check their own results (each asserts what it claims)."""

import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize("script", ["vae.py", "language_model.py", "gan.py"])
def test_example_runs(script):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    env.pop("XLA_FLAGS", None)  # one device, as a user would run it
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "test" in done.stdout


def _load_example(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_gan_moves_samples_to_the_modes():
    gan = _load_example("gan")
    result = gan.main()
    (far, covered_before), (near, covered_after) = result["before"], result["after"]
    assert near < 0.25 * far, result  # mean distance of generated points to the nearest mode
    assert covered_after > covered_before, result
    history = result["history"]
    assert len(history["d_loss"]) == len(history["g_loss"]) == gan.EPOCHS
    assert result["resumed_identical"]
