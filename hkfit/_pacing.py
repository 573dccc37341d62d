"""How many fused steps to run per call (``steps_per_execution``).

Each jitted call costs a dispatch (tens of microseconds of Python and runtime work); on
small batches that is a large share of a step. ``"auto"`` measures the time per step
after compilation and picks the number of steps per call so that one call takes about
``target`` seconds: dispatch overhead becomes negligible while the progress bar and batch
callbacks still see an update at least every ``target`` seconds.

One exception: XLA on CPU runs convolutions inside loop bodies many times slower than at
top level (tens of times for small images; jax-ml/jax#12868). For a model with
convolutions on CPU, ``"auto"`` therefore starts with one step per call, compiled without
a loop. That is only the prior: when training over arrays, ``"auto"`` then times the
other variant for a few calls and keeps the faster one (see :class:`Pacer`), so it never
settles on the slower of the two for this model and machine. ``steps_per_execution=1``
never compiles a loop; an explicit int K > 1 always fuses.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jax

from hkfit import _executables as executables

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


#: Executions of the second variant timed (after its compiling one) by a comparing "auto".
PROBE_CALLS = 2
#: How much faster (a fraction) the other variant must be for "auto" to switch to it.
SWITCH_MARGIN = 0.03
#: "auto" compiles and times the other variant only when the steps the run still plans
#: take at least this many times as long as a compilation: the extra compilation then
#: costs at most a tenth of the run even when the other variant turns out slower.
PROBE_PAYBACK = 10


class Pacer:
    """Chooses the size of the next execution and times the previous ones.

    In ``"auto"`` mode with ``compare=True`` (training over arrays), the pacer first
    runs the variant it expects to be faster (fused steps, or one loop-free step per call
    for convolutions on CPU: the prior), times ``TIMED_CALLS`` executions after the
    compiling one, then ``PROBE_CALLS`` of the other variant (short ones, when that is
    the fused loop), and keeps whichever ran a step faster (the other one must win by
    ``SWITCH_MARGIN``). The choice is kept for the program's life (every later epoch and
    ``fit`` call). The other variant is tried only when the run is long enough to repay
    its compilation (``PROBE_PAYBACK``, from :meth:`expect` and the prior's first
    call); otherwise the prior stays, and a later, longer ``fit`` may still try it.
    Fused executions are sized to take about ``target`` seconds.

    Args:
      steps_per_execution: ``"auto"`` or an int >= 1.
      target: seconds one execution should take in ``"auto"`` mode.
      fuse_auto: the prior of ``"auto"``: whether fusing steps is expected to pay off
        (see :func:`loops_help`).
      compare: in ``"auto"`` mode, measure both variants and keep the faster (the feed
        must then offer a loop-free single step, ``Segment.single``).
      clock: the timer (seconds); tests pass a fake one.
    """

    def __init__(
        self,
        steps_per_execution: Any = "auto",
        target: float = 0.2,
        fuse_auto: bool = True,
        *,
        compare: bool = False,
        clock: Callable[[], float] = time.perf_counter,
    ):
        check(steps_per_execution)
        auto = steps_per_execution == "auto"
        self.compare = auto and compare
        self.fused = steps_per_execution != 1 and (not auto or fuse_auto or self.compare)
        self.auto = auto and self.fused
        self.steps = 1 if auto else steps_per_execution
        self.target = target
        self.clock = clock
        self.single = auto and not fuse_auto  # run the loop-free one-step function
        self.per_step: dict[bool, float] = {}  # {single: seconds per step} once measured
        self.compile_seconds: float | None = None  # the prior's first (compiling) call
        self._expected: int | None = None  # steps the run still plans (see `expect`)
        self._parked = False  # the prior is measured; the other variant waits for a long run
        self._calls = 0
        self._times: list[float] = []
        self._started = 0.0
        self._settled = not self.auto

    def expect(self, steps: int) -> None:
        """Tells the pacer how many steps the run still plans (e.g. at each epoch start)."""
        self._expected = steps
        if self._parked and self._worth_probing():
            self._parked, self._settled = False, False
            self._start_probe()

    def _worth_probing(self) -> bool:
        if self._expected is None or self.compile_seconds is None or not self.per_step:
            return False
        prior_time = self._expected * next(iter(self.per_step.values()))
        return prior_time >= PROBE_PAYBACK * self.compile_seconds

    def _start_probe(self) -> None:
        if self.single:  # fused probe: short executions (loops may be slow here)
            self.steps = max(2, int(self.target / 16 / self.per_step[True]))
        self.single = not self.single

    @property
    def syncs(self) -> bool:
        """Whether the next execution is waited for (to time it, in ``"auto"`` mode only)."""
        return not self._settled

    def next(self, remaining: int) -> int:
        """Steps for the next execution, at most ``remaining``."""
        self._started = self.clock()
        return max(0, min(1 if self.single else self.steps, remaining))

    def done(self, count: int, result: Any, timed: bool = True) -> None:
        """Records an execution of ``count`` steps whose output is ``result``.

        ``timed=False`` marks a call that is not representative (e.g. a differently shaped
        last batch, which compiles on its first use): it is waited for but not timed.
        """
        if self._expected is not None:
            self._expected -= count
        if self._settled or count == 0:
            return
        jax.block_until_ready(result)
        if not timed:
            return
        seconds = self.clock() - self._started
        self._calls += 1
        if self._calls == 1:  # the first call of a variant compiles; time the next ones
            if self.compile_seconds is None:  # a program from the cache: its real cost
                self.compile_seconds = max(seconds, executables.last_compile_seconds)
            return
        per_step = max(seconds / count, 1e-9)
        self._times.append(per_step)
        if not self.single:
            self.steps = int(min(MAX_STEPS, max(1, self.target / per_step)))
        if self._calls > (PROBE_CALLS if self.per_step else TIMED_CALLS):
            self._variant_measured()

    def _variant_measured(self) -> None:
        self.per_step[self.single] = min(self._times)
        self._calls, self._times = 0, []
        if self.compare and len(self.per_step) == 1:  # now measure the other variant?
            if self._worth_probing():
                self._start_probe()
                return
            self._parked = True
        if len(self.per_step) == 2:
            prior = not self.single  # the variant measured first
            other = self.single
            faster = self.per_step[other] < self.per_step[prior] * (1 - SWITCH_MARGIN)
            self.single = other if faster else prior
            if not self.single:
                fused_time = self.per_step[False]
                self.steps = int(min(MAX_STEPS, max(1, self.target / fused_time)))
        self._settled = True


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
