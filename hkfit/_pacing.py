"""How many fused steps to run per call (``steps_per_execution``).

Each jitted call costs a dispatch (tens of microseconds of Python and runtime work); on
small batches that is a large share of a step. ``"auto"`` measures the time per step
after compilation and picks the number of steps per call so that one call takes about
``target`` seconds: dispatch overhead becomes negligible while the progress bar and batch
callbacks still see an update at least every ``target`` seconds.

One exception: XLA on CPU runs convolutions inside loop bodies many times slower than at
top level (tens of times for small images; jax-ml/jax#12868). For a model with
convolutions on CPU, ``"auto"`` therefore runs one step per call, compiled without a
loop. ``steps_per_execution=1`` never compiles a loop; an explicit int K > 1 always fuses.
"""

from __future__ import annotations

import time
from typing import Any

import jax

MAX_STEPS = 1 << 16
#: Executions timed (after the compiling one) before "auto" settles on a size and stops
#: waiting for each execution.
TIMED_CALLS = 3


def check(steps_per_execution: Any) -> None:
    """Raises ValueError unless ``steps_per_execution`` is ``"auto"`` or an int >= 1."""
    if steps_per_execution != "auto" and (
        not isinstance(steps_per_execution, int)
        or isinstance(steps_per_execution, bool)
        or steps_per_execution < 1
    ):
        raise ValueError(
            "Expected `steps_per_execution` to be 'auto' or an int >= 1. "
            f"Received: steps_per_execution={steps_per_execution!r}."
        )


class Pacer:
    """Chooses the size of the next execution and times the previous one.

    Args:
      steps_per_execution: ``"auto"`` or an int >= 1.
      target: seconds one execution should take in ``"auto"`` mode.
      fuse_auto: whether ``"auto"`` may fuse steps (see :func:`loops_help`); when it may
        not, every execution is one step of a loop-free compiled function.
    """

    def __init__(
        self, steps_per_execution: Any = "auto", target: float = 0.2, fuse_auto: bool = True
    ):
        check(steps_per_execution)
        self.fused = steps_per_execution != 1 and (steps_per_execution != "auto" or fuse_auto)
        self.auto = steps_per_execution == "auto" and self.fused
        self.steps = 1 if steps_per_execution == "auto" else steps_per_execution
        self.target = target
        self._calls = 0
        self._started = 0.0

    @property
    def syncs(self) -> bool:
        """Whether the next execution is waited for (to time it, in ``"auto"`` mode only)."""
        return self.auto and self._calls <= TIMED_CALLS

    def next(self, remaining: int) -> int:
        """Steps for the next execution, at most ``remaining``."""
        self._started = time.perf_counter()
        return max(0, min(self.steps, remaining))

    def done(self, count: int, result: Any, timed: bool = True) -> None:
        """Records an execution of ``count`` steps whose output is ``result``.

        ``timed=False`` marks a call that is not representative (e.g. a differently shaped
        last batch, which compiles on its first use): it is waited for but not timed.
        """
        if not self.syncs or count == 0:
            return
        if not timed:
            jax.block_until_ready(result)
            return
        self._calls += 1
        jax.block_until_ready(result)
        seconds = time.perf_counter() - self._started
        if self._calls == 1:  # the first call compiles; time the next one
            return
        per_step = max(seconds / count, 1e-7)
        self.steps = int(min(MAX_STEPS, max(1, self.target / per_step)))


# Primitives that XLA:CPU runs much slower inside a while-loop body than at top level.
SLOW_IN_CPU_LOOPS = frozenset({"conv_general_dilated"})


def _primitives(jaxpr: Any):
    """Names of every primitive in a jaxpr, including nested ones (cond, scan, pjit...)."""
    for eqn in jaxpr.eqns:
        yield eqn.primitive.name
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _primitives(inner)


def loops_help(fn, *args, platform: str | None = None) -> bool:
    """Whether compiling ``fn``'s steps into a loop is expected to pay off on ``platform``."""
    platform = platform or jax.default_backend()
    if platform != "cpu":
        return True
    names = set(_primitives(jax.make_jaxpr(fn)(*args).jaxpr))
    return not names & SLOW_IN_CPU_LOOPS
