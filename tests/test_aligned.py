"""Host copies that a CPU device uses in place (hkfit._aligned)."""

import jax
import numpy as np
import pytest

from hkfit import _aligned as aligned
from hkfit import _feeds as feeds
from hkfit._row_blocks import BlockPlan
from hkfit.step import Batch

RNG = np.random.default_rng(0)


def batch(n, width=64):
    x = RNG.normal(size=(n, width)).astype(np.float32)
    return Batch(x, np.arange(n, dtype=np.int32), np.ones(n, np.float32), np.ones(n, np.float32))


@pytest.mark.parametrize(
    "shape,dtype", [((3, 5), np.float32), ((7,), np.int8), ((2, 4), np.float64)]
)
def test_empty_is_aligned(shape, dtype):
    a = aligned.empty(shape, dtype)
    assert a.shape == shape and a.dtype == dtype and a.ctypes.data % aligned.ALIGNMENT == 0


def test_padded_rows_are_aligned_and_equal_numpy():
    data = batch(1003)
    padded = feeds.pad_rows(data, feeds.bucket(1003))
    for leaf in jax.tree_util.tree_leaves(padded):
        assert leaf.ctypes.data % aligned.ALIGNMENT == 0
    np.testing.assert_array_equal(padded.x[:1003], data.x)
    np.testing.assert_array_equal(padded.x[1003:], np.repeat(data.x[-1:], len(padded.x) - 1003, 0))
    assert (padded.weights[1003:] == 0).all() and (padded.mask[1003:] == 0).all()


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="aliasing host memory is a CPU matter")
def test_a_cpu_device_uses_the_padded_copy_in_place():
    padded = feeds.pad_rows(batch(1003), feeds.bucket(1003))
    placed = jax.device_put(padded)
    assert placed.x.unsafe_buffer_pointer() == padded.x.ctypes.data  # no second copy


def test_blocks_are_aligned():
    blocks = BlockPlan(1003, 8).split(batch(1003))
    for leaf in jax.tree_util.tree_leaves(blocks):
        assert leaf.ctypes.data % aligned.ALIGNMENT == 0
