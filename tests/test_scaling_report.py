"""The measurements of ``benchmarks/scaling.py`` on 1, 2 and 8 virtual CPU devices."""

import importlib.util
import pathlib
import sys

import jax
import numpy as np
import pytest

pytestmark = pytest.mark.skipif(
    jax.device_count() < 8, reason="needs 8 devices (tests/conftest.py sets 8 CPU devices)"
)

BENCHMARKS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"


def _load_script():
    sys.path.insert(0, str(BENCHMARKS))  # the script imports helpers of fit_throughput.py
    try:
        spec = importlib.util.spec_from_file_location("scaling", BENCHMARKS / "scaling.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCHMARKS))
    return module


scaling = _load_script()

RNG = np.random.default_rng(0)
X = RNG.normal(size=(256, scaling.DIM)).astype(np.float32)
Y = RNG.integers(0, 10, 256).astype(np.int32)


def _replicated(param_sharding=None):
    placement = "replicated" if "replicated" in scaling.data_placements() else None
    return scaling.Config(placement, param_sharding)


def _measure(devices, config):
    return scaling.measure(devices, config, X, Y, batch_size=64, steps=2)


@pytest.fixture(scope="module")
def runs():
    return {
        ("fsdp", 2): _measure(2, _replicated("fsdp")),
        ("fsdp", 8): _measure(8, _replicated("fsdp")),
        ("dp", 1): _measure(1, _replicated()),
        ("dp", 8): _measure(8, _replicated()),
    }


def test_fsdp_parameter_and_optimizer_bytes_fall_with_the_device_count(runs):
    two, eight = runs[("fsdp", 2)], runs[("fsdp", 8)]
    # the two hidden weights (98% of the parameters) are split: ideally 1/4 of two devices'
    assert eight.param_bytes < 0.3 * two.param_bytes
    assert eight.opt_bytes < 0.3 * two.opt_bytes
    assert runs[("dp", 8)].param_bytes == runs[("dp", 1)].param_bytes  # replicated


def test_a_data_parallel_step_all_reduces_every_gradient(runs):
    step = runs[("dp", 8)]
    ops, nbytes = step.collectives.kinds["all-reduce"]
    assert ops > 0
    assert nbytes >= step.param_bytes  # every gradient, plus the loss and metric sums
    assert step.fused_step is False  # the loop-free step: each collective once per step


def test_one_device_needs_no_collective(runs):
    step = runs[("dp", 1)].collectives
    assert step.total == 0 and step.ops == []


def test_replicated_data_bytes_are_those_of_place_rows(runs):
    layout = scaling.make_layout(8, _replicated())
    placed = layout.place_rows(scaling.host_batch(X, Y))
    assert runs[("dp", 8)].data_bytes == scaling.per_device_bytes(placed)
    assert runs[("dp", 8)].data_bytes == scaling.total_bytes(scaling.host_batch(X, Y))


def test_the_parser_reads_operands_by_name_tuples_and_async_pairs():
    hlo = """
ENTRY %main (p0: f32[8,4], p1: f32[16]) -> f32[64,4] {
  %p0 = f32[8,4]{1,0} parameter(0)
  %p1 = f32[16]{0} parameter(1)
  %ar = (f32[8,4]{1,0}, f32[]) all-reduce(%p0, %s), channel_id=1, to_apply=%add
  %rs = f32[2]{0} reduce-scatter(f32[16]{0} %p1), channel_id=2, dimensions={0}
  %ags = (f32[8,4]{1,0}, f32[64,4]{1,0}) all-gather-start(%p0), channel_id=3
  ROOT %agd = f32[64,4]{1,0} all-gather-done(%ags)
}
"""
    found = scaling.collective_bytes(hlo)
    assert found.kinds["all-reduce"] == (1, 8 * 4 * 4 + 4)
    assert found.kinds["reduce-scatter"] == (1, 16 * 4)  # the operand, before scattering
    assert found.kinds["all-gather"] == (1, 64 * 4 * 4)  # the gathered output, counted once
    assert found.total == 132 + 64 + 1024 and not found.has_loop
