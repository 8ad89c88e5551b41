"""NF4 with double quantisation against the reference quantiser's stored outputs, byte for byte.

``tests/data/nf4_reference.npz`` holds inputs and what bitsandbytes 0.50.2 (CPU)
produced for them: packed codes, block absmax, dequantised values, and the
double-quantised scales (see the project's fixture README for each array).
"""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lorax_fn.quant import nf4

REF = np.load(Path(__file__).parent / "data" / "nf4_reference.npz")
CASES = sorted(json.loads(str(REF["cases"])))


def test_tables_are_the_references():
    np.testing.assert_array_equal(nf4.LEVELS.view(np.uint32), REF["nf4_code"].view(np.uint32))
    np.testing.assert_array_equal(nf4.dynamic_code().view(np.uint32), REF["dynamic_code"].view(np.uint32))


@pytest.mark.parametrize("case", CASES)
def test_codes_and_scales_match_the_reference_bit_for_bit(case):
    x = REF[f"{case}.x"]
    q = nf4.quantize(x, double_quant=False)
    np.testing.assert_array_equal(q.packed, REF[f"{case}.packed"])
    np.testing.assert_array_equal(q.absmax.view(np.uint32), REF[f"{case}.absmax"].view(np.uint32))
    np.testing.assert_array_equal(nf4.dequantize(q).view(np.uint32), REF[f"{case}.deq"].view(np.uint32))


@pytest.mark.parametrize("case", CASES)
def test_double_quantisation_matches_given_the_references_offset(case):
    x = REF[f"{case}.x"]
    q = nf4.quantize(x, offset=REF[f"{case}.dq_offset"])
    np.testing.assert_array_equal(q.packed, REF[f"{case}.packed"])  # the 4-bit codes do not change
    np.testing.assert_array_equal(q.absmax_q, REF[f"{case}.dq_absmax_q"])
    np.testing.assert_array_equal(q.nested.view(np.uint32), REF[f"{case}.dq_nested_absmax"].view(np.uint32))
    np.testing.assert_array_equal(nf4.block_scales(q).view(np.uint32), REF[f"{case}.dq_absmax_deq"].view(np.uint32))
    np.testing.assert_array_equal(nf4.dequantize(q).view(np.uint32), REF[f"{case}.dq_deq"].view(np.uint32))


@pytest.mark.parametrize("case", ["rect300x70", "nested3", "decades"])
def test_our_own_offset_stays_within_a_few_ulp_and_dequantises_under_jit(case):
    x = REF[f"{case}.x"]
    q = nf4.quantize(x)
    ulp = np.spacing(np.abs(REF[f"{case}.dq_offset"]))
    assert abs(float(q.offset) - float(REF[f"{case}.dq_offset"])) <= 4 * ulp
    jq = jax.tree.map(lambda a: None if a is None else jnp.asarray(a), q._replace(shape=None, dtype=None))
    out = jax.jit(lambda p, a, n, o: nf4.dequantize(nf4.NF4(p, None, a, n, o, x.shape, np.float32), xp=jnp))(
        jq.packed, jq.absmax_q, jq.nested, jq.offset)
    np.testing.assert_allclose(np.asarray(out), nf4.dequantize(q), rtol=1e-6, atol=0)


def test_stored_bytes_with_double_quantisation():
    """A (1024, 4096) weight: codes + 8-bit scales + nested scales + offset ≈ 0.129 of float32."""
    x = np.random.default_rng(0).standard_normal((1024, 4096)).astype(np.float32)
    q = nf4.quantize(x)
    stored = q.packed.nbytes + q.absmax_q.nbytes + q.nested.nbytes + 4
    assert stored == 2_097_152 + 65_536 + 1_024 + 4
    assert stored / x.nbytes <= 0.135
