"""Several Python processes of one test script, joined on 127.0.0.1 (multi-process tests).

Each process runs ``python <script> worker <extra...> <pid> <port> <outdir>`` with
``local_devices`` CPU devices and writes its output to ``<outdir>/<prefix>log<pid>.txt``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(
    script: str, count: int, local_devices: int, outdir, *extra: str, prefix: str = ""
) -> list[subprocess.Popen]:
    """Starts ``count`` worker processes of ``script`` that join on a free port."""
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={local_devices}",
    )
    port, outdir = free_port(), str(outdir)
    procs = []
    for pid in range(count):
        with open(os.path.join(outdir, f"{prefix}log{pid}.txt"), "w") as log:
            command = [sys.executable, script, "worker", *extra, str(pid), str(port), outdir]
            procs.append(subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT))
    return procs


def kill(procs: list[subprocess.Popen]) -> None:
    """SIGKILLs the processes still running, and reaps them all."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
    for proc in procs:
        proc.wait()


def wait(procs: list[subprocess.Popen], timeout: float) -> None:
    """Waits up to ``timeout`` seconds in all; then kills whatever still runs."""
    deadline = time.monotonic() + timeout
    try:
        for proc in procs:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass  # the callers' return-code checks fail, with the logs
    finally:
        kill(procs)


def logs(outdir, count: int, prefix: str = "") -> list[str]:
    """The output of every process."""
    return [open(os.path.join(str(outdir), f"{prefix}log{pid}.txt")).read() for pid in range(count)]


def run(script: str, count: int, local_devices: int, outdir, *extra: str, timeout: float):
    """Starts the workers, waits for them and asserts they all succeeded; their outputs."""
    procs = start(script, count, local_devices, outdir, *extra)
    wait(procs, timeout)
    outputs = logs(outdir, count)
    for proc, out in zip(procs, outputs):
        assert proc.returncode == 0, out[-3000:]
    return outputs
