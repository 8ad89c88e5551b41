"""`QuantizedArray`: the reference quantiser's bytes through the node, slices of a stack, and its
dequantisation in NumPy and under jit."""

import json
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import lorax_fn as lf
from lorax_fn.quant import int8, nf4
from lorax_fn.quant.array import QuantizedArray, block_scales, dequantize_parts, quantize_array, reshaped

REF = np.load(Path(__file__).parent / "data" / "nf4_reference.npz")
CASES = sorted(json.loads(str(REF["cases"])))


def _bits(x):
    return np.asarray(x, np.float32).view(np.int32).astype(np.int64)


@pytest.mark.parametrize("case", CASES)
def test_node_holds_the_reference_codes_and_scales(case):
    x = REF[f"{case}.x"]
    q = quantize_array(x, double_quant=False)
    np.testing.assert_array_equal(np.asarray(q.codes), REF[f"{case}.packed"])
    np.testing.assert_array_equal(np.asarray(q.absmax).view(np.uint32), REF[f"{case}.absmax"].view(np.uint32))
    d = jax.jit(lambda q: q.dequantize())(q)
    np.testing.assert_array_equal(_bits(d), _bits(REF[f"{case}.deq"]))
    assert q.shape == x.shape and q.dtype == jnp.float32


@pytest.mark.parametrize("case", CASES)
def test_double_quantised_node_codes_agree_and_dequantise_within_one_ulp(case):
    x = REF[f"{case}.x"]
    q = quantize_array(x)
    # the 8-bit scale codes against the reference's, which used its own (torch-summed) mean
    agree = np.mean(np.asarray(q.absmax_q) == REF[f"{case}.dq_absmax_q"])
    assert agree >= 0.9999
    # given the reference's stored offset, every dequantised value within 1 ulp (the node's own path)
    ref = QuantizedArray(REF[f"{case}.packed"], None, REF[f"{case}.dq_absmax_q"],
                         REF[f"{case}.dq_nested_absmax"], REF[f"{case}.dq_offset"],
                         codebook="nf4", inner=x.shape, dtype=np.float32, block_size=64)
    for d in (jax.jit(lambda q: q.dequantize())(ref), dequantize_parts(ref, np, np.float32)):
        assert np.max(np.abs(_bits(d) - _bits(REF[f"{case}.dq_deq"]))) <= 1


def test_stack_axes_are_quantised_slice_by_slice_like_separate_tensors():
    x = np.random.RandomState(0).randn(3, 2, 70, 33).astype(np.float32)
    q = quantize_array(x, lead=2)
    assert q.lead == 2 and q.shape == x.shape and q.inner == (70, 33)
    assert q.codes.shape == (3, 2, 70 * 33 // 2) and q.nested.shape == (3, 2, 1) and q.offset.shape == (3, 2)
    for i in range(3):
        for j in range(2):
            one = quantize_array(x[i, j])
            for name in ("codes", "absmax_q", "nested", "offset"):
                np.testing.assert_array_equal(np.asarray(getattr(q, name)[i, j]), np.asarray(getattr(one, name)))
    # scan hands each step one slice, a valid node of its own
    ys = jax.lax.map(lambda qi: qi.dequantize(), jax.tree.map(lambda c: c.reshape((6,) + c.shape[2:]), q))
    np.testing.assert_array_equal(np.asarray(ys).reshape(x.shape), np.asarray(q.dequantize()))


def test_reshape_views_keep_codes_and_refuse_splitting_a_slice():
    x = np.random.RandomState(1).randn(4, 16, 8).astype(np.float32)
    q = quantize_array(x, lead=1)
    flat = reshaped(q, (4, 128))
    assert flat.codes is not None and flat.inner == (128,)
    np.testing.assert_array_equal(np.asarray(flat.dequantize()), np.asarray(q.dequantize()).reshape(4, 128))
    merged = reshaped(q, (512,))   # one slice across the stack would mix separately coded tensors
    assert merged is None
    assert reshaped(q, (2, 2, 16, 8)).lead == 2


def test_int8_codebook_error_is_half_a_step():
    x = np.random.RandomState(2).randn(50, 40).astype(np.float32) * 3
    q = quantize_array(x, "int8", double_quant=False)
    assert q.codes.dtype == np.int8
    absmax = np.abs(np.concatenate([x.reshape(-1), np.zeros(-x.size % 64, np.float32)])).reshape(-1, 64).max(1)
    step = np.repeat(absmax / int8.STEPS, 64)[:x.size].reshape(x.shape)
    err = np.abs(np.asarray(q.dequantize()) - x)
    assert np.all(err <= step / 2 * (1 + 1e-5))
    assert np.any(err > step / 4)   # a real quantiser: not exact


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 3), st.integers(1, 200), st.sampled_from([2, 8, 64]), st.booleans())
def test_any_shape_round_trips_within_half_an_nf4_gap(rows, cols, block, dq):
    x = np.random.RandomState(rows * 1000 + cols).randn(rows, cols).astype(np.float32)
    q = quantize_array(x, block_size=block, double_quant=dq)
    d = np.asarray(q.dequantize()).reshape(-1)
    flat = x.reshape(-1)
    n = flat.size
    padded = np.concatenate([np.abs(flat), np.zeros(-n % block, np.float32)]).reshape(-1, block)
    absmax = np.repeat(padded.max(axis=1), block)[:n]
    used = np.repeat(np.asarray(block_scales(q, np)), block)[:n]   # the scale dequantisation sees
    # the nearest level to x / absmax is at most half the widest gap away; a double-quantised
    # scale adds its own error on top
    gap = np.max(np.diff(nf4.LEVELS)) / 2
    assert np.all(np.abs(d - flat) <= gap * absmax + np.abs(used - absmax) + 1e-6)
    nonzero = d != 0
    np.testing.assert_array_equal(np.sign(d[nonzero]), np.sign(flat[nonzero]))
    assert not dq or q.absmax is None


def test_node_is_a_pytree_with_dense_shape_and_dtype_and_casts_without_data():
    q = lf.quantize({"w": jnp.ones((128, 64))})["w"]
    leaves = jax.tree.leaves(q)
    assert [x.dtype for x in leaves] == [np.uint8, np.uint8, np.float32, np.float32]
    assert q.shape == (128, 64) and q.ndim == 2 and q.size == 128 * 64
    b = q.astype(jnp.bfloat16)
    assert b.dtype == jnp.bfloat16 and b.codes is q.codes
    chex.assert_trees_all_equal(b.dequantize(), jnp.ones((128, 64), jnp.bfloat16))
    assert jnp.asarray(q).shape == (128, 64)  # __jax_array__ dequantises
    assert "codebook=nf4" in repr(q)
    with pytest.raises(AttributeError):
        q.codes = None


def test_stored_bytes_with_double_quantisation_are_under_0135_of_float32():
    q = lf.quantize({"w": jnp.zeros((1024, 4096))})["w"]
    # 4 bits of code + 8/64 of scale code + 32/(64·256) of nested scale + one offset
    assert q.nbytes == 1024 * 4096 // 2 + 1024 * 4096 // 64 + 4 * (1024 * 4096 // 64 // 256) + 4
    assert q.nbytes / (1024 * 4096 * 4) <= 0.135
