"""The decision logic of steps_per_execution="auto", driven by a fake clock."""

import pytest

from hkfit import _executables, _pacing
from hkfit._pacing import Pacer


@pytest.fixture(autouse=True)
def no_cached_programs(monkeypatch):
    """The fake clock alone says what a compilation costs."""
    monkeypatch.setattr(_executables, "last_compile_seconds", 0.0)


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def drive(pacer, clock, cost, calls=40, compile_seconds=1.0, expect=10**9):
    """Runs ``calls`` executions; ``cost(single, count)`` gives an execution's seconds.

    A variant's first execution also pays ``compile_seconds``; ``expect`` steps are
    planned (a long run by default). Returns the variants used.
    """
    if expect is not None:
        pacer.expect(expect)
    compiled, used = set(), []
    for _ in range(calls):
        count = pacer.next(remaining=10_000)
        single = pacer.single
        clock.now += cost(single, count) + (0 if single in compiled else compile_seconds)
        compiled.add(single)
        used.append((single, count))
        pacer.done(count, None)
    return used


def fused_cost(per_step, overhead):
    return lambda single, count: (
        (overhead + per_step) * count if single else overhead + per_step * count
    )


@pytest.mark.parametrize("fuse_auto", [True, False])
def test_auto_keeps_fused_steps_when_they_are_faster(fuse_auto):
    clock = FakeClock()
    pacer = Pacer("auto", fuse_auto=fuse_auto, compare=True, clock=clock)
    used = drive(pacer, clock, fused_cost(per_step=1e-4, overhead=1e-3))
    assert not pacer.single and pacer.syncs is False
    assert pacer.per_step[False] < pacer.per_step[True]
    assert used[-1] == (False, pacer.steps) and pacer.steps > 100  # ~0.2 s per execution
    assert {single for single, _ in used} == {True, False}  # both were measured


@pytest.mark.parametrize("fuse_auto", [True, False])
def test_auto_switches_to_single_steps_when_loops_are_slow(fuse_auto):
    # e.g. convolutions on CPU: a step inside a loop costs 10x a top-level one
    def cost(single, count):
        return 1e-4 + 1e-3 * count if single else 1e-4 + 1e-2 * count

    clock = FakeClock()
    pacer = Pacer("auto", fuse_auto=fuse_auto, compare=True, clock=clock)
    used = drive(pacer, clock, cost)
    assert pacer.single and used[-1] == (True, 1)


def test_auto_keeps_its_prior_when_the_other_variant_is_barely_faster():
    clock = FakeClock()
    pacer = Pacer("auto", fuse_auto=True, compare=True, clock=clock)
    # the single step is 1% faster per step: within the margin, fused steps stay
    drive(pacer, clock, lambda single, count: (0.99e-3 if single else 1e-3) * count)
    assert not pacer.single
    assert _pacing.SWITCH_MARGIN > 0.01


def test_a_fused_probe_after_single_steps_is_short():
    clock = FakeClock()
    pacer = Pacer("auto", fuse_auto=False, compare=True, clock=clock)
    used = drive(pacer, clock, lambda single, count: 0.001 * count, calls=6)
    first_fused = next(count for single, count in used if not single)
    assert first_fused * 0.001 <= pacer.target / 16 + 1e-9  # a fraction of a normal execution


def test_timing_stops_once_settled():
    clock = FakeClock()
    pacer = Pacer("auto", compare=True, clock=clock)
    drive(pacer, clock, fused_cost(1e-4, 1e-3))
    before = dict(pacer.per_step)
    drive(pacer, clock, lambda single, count: 100.0, calls=5)  # would change any estimate
    assert pacer.per_step == before and not pacer.syncs


@pytest.mark.parametrize("steps", [1, 7])
def test_explicit_steps_never_compare(steps):
    clock = FakeClock()
    pacer = Pacer(steps, compare=True, clock=clock)
    used = drive(pacer, clock, fused_cost(1e-4, 1e-3), calls=8)
    assert used == [(False, steps)] * 8 and not pacer.syncs
    assert pacer.fused == (steps > 1)


def test_without_compare_auto_follows_its_prior():
    clock = FakeClock()
    pacer = Pacer("auto", fuse_auto=False, compare=False, clock=clock)
    assert not pacer.fused and pacer.single
    used = drive(pacer, clock, fused_cost(1e-4, 1e-3), calls=8)
    assert all(single and count == 1 for single, count in used)


def test_a_short_run_keeps_the_prior_without_compiling_the_other_variant():
    clock = FakeClock()
    pacer = Pacer("auto", fuse_auto=True, compare=True, clock=clock)
    cost = fused_cost(per_step=1e-4, overhead=1e-3)
    # 2,000 planned steps of ~0.1 ms: 0.2 s of training cannot repay a 1 s compilation
    used = drive(pacer, clock, cost, calls=20, expect=2_000)
    assert {single for single, _ in used} == {False} and not pacer.syncs
    assert list(pacer.per_step) == [False]
    # a later, long fit tries the other variant after all
    used = drive(pacer, clock, cost, calls=20, expect=10**7)
    assert {single for single, _ in used} == {True, False}
    assert not pacer.single and len(pacer.per_step) == 2


def test_the_payback_rule_uses_the_measured_compile_time():
    pacer = Pacer("auto", compare=True, clock=FakeClock())
    pacer.per_step, pacer.compile_seconds = {False: 1e-3}, 2.0
    pacer.expect(_pacing.PROBE_PAYBACK * 2_000 - 1)  # just under: 19.999 s < 20 s
    assert not pacer._worth_probing()
    pacer.expect(_pacing.PROBE_PAYBACK * 2_000)
    assert pacer._worth_probing()


def test_a_program_from_the_cache_is_charged_its_real_compile_time(monkeypatch):
    """A rebuilt model's first call compiles nothing, but a probe of the other variant
    would: the payback rule uses what the cached program cost when it was compiled."""
    clock = FakeClock()
    monkeypatch.setattr(_executables, "last_compile_seconds", 5.0)
    pacer = Pacer("auto", compare=True, clock=clock)
    # 1,000 planned steps of about 1 ms: 1 s < 10 x 5 s, not worth compiling the other
    used = drive(pacer, clock, fused_cost(1e-3, 1e-4), calls=8, compile_seconds=0.0, expect=1000)
    assert pacer.compile_seconds == 5.0
    assert {single for single, _ in used} == {False} and not pacer.syncs
    # the same run with the compilation really paid now: also no probe (the control)
    clock, fresh = FakeClock(), Pacer("auto", compare=True, clock=FakeClock())
    monkeypatch.setattr(_executables, "last_compile_seconds", 0.0)
    fresh.clock = clock
    used = drive(fresh, clock, fused_cost(1e-3, 1e-4), calls=8, compile_seconds=0.0, expect=1000)
    assert {single for single, _ in used} == {False, True}  # cheap compiles: it probes
