"""Every example runs as a user would run it, and checks its own result.

Each script in examples/ ends with ``assert``s on what it claims (an accuracy floor, a
bit-identical resume, ...), so a run that exits with 0 is a run that worked. The scripts
run in a subprocess on one CPU device, as from a shell; ``data_parallel.py`` and
``multihost.py`` set up their own devices and processes.
"""

import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"

#: Scripts run with ``python examples/<name>``; test_custom_layer.py is run by pytest.
SCRIPTS = [
    "digits.py",
    "data_parallel.py",
    "gan.py",
    "language_model.py",
    "multihost.py",
    "multiview.py",
    "resume.py",
    "vae.py",
]


def run(args, cwd=ROOT, timeout=300):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    env.pop("XLA_FLAGS", None)  # one device, as a user would run it
    return subprocess.run(
        [sys.executable, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=cwd,
    )


def test_every_example_is_run_here():
    scripts = {p.name for p in EXAMPLES.glob("*.py")}
    assert scripts == {*SCRIPTS, "test_custom_layer.py"}, "add new examples to SCRIPTS"


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_example_runs(script, tmp_path):
    args = [EXAMPLES / script]
    if script == "resume.py":
        args.append(tmp_path / "backup")  # not ./runs of the checkout
    done = run(args)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    if script == "multihost.py":  # two processes trained one model together
        assert "processes: 2" in done.stdout, done.stdout[-2000:]


@pytest.mark.slow
def test_custom_layer_example_passes_its_tests():
    done = run(
        [
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            EXAMPLES / "test_custom_layer.py",
        ]
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert re.search(r"\b5 passed\b", done.stdout), done.stdout[-2000:]


@pytest.mark.slow
def test_resume_example_survives_a_crash(tmp_path):
    """Killed after epoch 3 and started again, it ends as an uninterrupted run does."""
    backup = tmp_path / "backup"
    crashed = run([EXAMPLES / "resume.py", backup, "--crash-after-epoch", "3"])
    assert crashed.returncode == 1, crashed.stderr[-3000:]
    assert "Simulated crash during epoch 4" in crashed.stdout, crashed.stdout
    resumed = run([EXAMPLES / "resume.py", backup])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Starting at epoch 4/8, from the backup" in resumed.stdout, resumed.stdout
    fresh = run([EXAMPLES / "resume.py", tmp_path / "other"])
    assert fresh.returncode == 0, fresh.stderr[-3000:]

    def summary(out):
        return re.search(r"^Done: .*$", out, re.M).group(0)

    assert summary(resumed.stdout) == summary(fresh.stdout)  # the same params, bit for bit
