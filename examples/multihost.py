"""Two processes training one model together, on this machine (127.0.0.1).

``python examples/multihost.py`` starts two copies of itself, each with a process id.
Each copy joins the run with ``hkfit.distributed.initialize``, keeps HALF of the digits
training rows (its own shard), and calls the same ``fit``: every global batch of 64 rows
is 32 rows from each process, the gradients are summed across processes by XLA, and both
processes end with the same parameters. Only process 0 prints.

On real hosts, run one copy per host with the coordinator's address instead of
127.0.0.1 (and usually without the CPU flags below).

Run:  python examples/multihost.py
"""

import os
import socket
import subprocess
import sys

NUM_PROCESSES = 2


def launch() -> int:
    """Starts the processes, waits for them (at most 5 minutes) and cleans up."""
    with socket.socket() as s:  # a free port for the coordinator
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(
        os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1"
    )
    procs = [
        subprocess.Popen([sys.executable, __file__, str(i), str(port)], env=env)
        for i in range(NUM_PROCESSES)
    ]
    try:
        codes = [p.wait(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return max(abs(c) for c in codes)


def worker(process_id: int, port: int) -> None:
    import hkfit  # imported here: the launcher never touches JAX

    # First, before any other JAX call: join the run (gloo collectives on CPU).
    hkfit.distributed.initialize(f"127.0.0.1:{port}", NUM_PROCESSES, process_id)

    import haiku as hk
    import jax
    import numpy as np
    import optax
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    def forward(x):
        return hk.Linear(10)(jax.nn.relu(hk.Linear(64)(x)))

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int32)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.2, random_state=0, stratify=y
    )
    # This process's shard: every process must hold the same number of rows.
    shard = len(x_train) // NUM_PROCESSES
    mine = slice(process_id * shard, (process_id + 1) * shard)
    x_mine, y_mine = x_train[mine], y_train[mine]
    mine_test = slice(
        process_id * (len(x_test) // NUM_PROCESSES),
        (process_id + 1) * (len(x_test) // NUM_PROCESSES),
    )

    model = hkfit.Model(
        forward,
        loss="sparse_categorical_crossentropy",
        optimizer=optax.adam(3e-3),
        metrics=["accuracy"],
        seed=0,
        distribution=hkfit.DataParallel(),
    )
    # batch_size is global: 64 = 32 rows from each of the 2 processes.
    model.fit(x_mine, y_mine, epochs=8, batch_size=64, verbose=2)  # only process 0 prints
    # Metrics are global: over both processes' test shards together.
    results = model.evaluate(x_test[mine_test], y_test[mine_test], verbose=0)
    if hkfit.distributed.is_main_process():
        print(
            f"processes: {jax.process_count()}, devices: {jax.device_count()}, "
            f"test accuracy {results['accuracy']:.4f}",
            flush=True,
        )
    # Each process checks: both trained one model together, and it learned.
    assert jax.process_count() == NUM_PROCESSES, jax.process_count()
    assert results["accuracy"] > 0.9, f"test accuracy {results['accuracy']:.4f}, expected > 0.9"


if __name__ == "__main__":
    if len(sys.argv) == 1:
        sys.exit(launch())
    worker(int(sys.argv[1]), int(sys.argv[2]))
