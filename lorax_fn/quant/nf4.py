"""4-bit NormalFloat (NF4) with double quantisation, as QLoRA defines it (Dettmers et al. 2023,
arXiv:2305.14314), byte for byte as the reference quantiser (bitsandbytes' CPU kernel) writes it.

Quantisation runs on the host in NumPy: it happens once per weight, and the
reference's float32 rounding (a reciprocal then a multiply for full blocks, a
division for the short last one, subnormal floors) is easier to follow exactly
there than under XLA, which flushes subnormals on CPU. Dequantisation is one
lookup and one multiply per value and works on NumPy or JAX arrays alike, so it
can run inside a jitted step.

Layout: ``x`` flattened in C order; blocks of 64 values, each with its float32
``absmax``; codes packed two per byte, the first value in the high nibble; an
odd count gets one padding code (for 0.0). With double quantisation the
``absmax`` values, less their mean, are coded to 8 bits in blocks of 256 with
one float32 scale per block.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import numpy as np

BLOCK = 64
NESTED_BLOCK = 256

# the 16 NF4 levels (quantiles of N(0, 1) scaled to [-1, 1]) as float32 bit patterns, the table the
# paper's reference implementation hard-codes; a recomputation from the normal distribution differs in
# the last bits
LEVELS = np.array([0xbf800000, 0xbf3239b1, 0xbf066b30, 0xbeca32a0, 0xbe91a24d, 0xbe3d353f, 0xbdba7871,
                   0x00000000, 0x3da2faff, 0x3e24cae3, 0x3e7c04dd, 0x3ead033a, 0x3ee1a4b8, 0x3f1007ab,
                   0x3f3913b3, 0x3f800000], np.uint32).view(np.float32)
# float32 midpoints of neighbouring levels: a value's code is the number of them strictly below it
THRESHOLDS = ((LEVELS[:-1] + LEVELS[1:]).astype(np.float32) / np.float32(2)).astype(np.float32)
_TINY = np.float32(1e-38)  # the reference's floor under absmax (a float32 subnormal)


@functools.cache
def _dynamic_code() -> np.ndarray:
    table = _build_dynamic_code()
    table.setflags(write=False)  # shared by every caller
    return table


def dynamic_code() -> np.ndarray:
    """The 256-entry map of the nested 8-bit quantisation (sorted, float32), built once per process."""
    return _dynamic_code()


def _build_dynamic_code() -> np.ndarray:
    """The 256-entry map of the nested 8-bit quantisation (sorted, float32), built the reference's way:
    per decade ``i = 0..6``, the means of neighbours of a float32 linspace(0.1, 1, 2^i + 1), scaled by
    ``10^(i-6)``, both signs, plus 0 and 1."""
    out = [np.float32(0.0), np.float32(1.0)]
    lo = np.float32(0.1)
    for i in range(7):
        k = 2 ** i + 1
        step = np.float32(np.float32(np.float32(1.0) - lo) / np.float32(k - 1))
        pts = []
        for j in range(k):
            # a fused multiply-add, rounded once: exact in float64 at these magnitudes, then to float32
            if j < k // 2:
                pts.append(np.float32(np.float64(j) * np.float64(step) + np.float64(lo)))
            else:
                pts.append(np.float32(np.float64(-(k - 1 - j)) * np.float64(step) + 1.0))
        scale = np.float32(10.0 ** (i - 6))
        for j in range(k - 1):
            mean = np.float32(np.float32(pts[j] + pts[j + 1]) / np.float32(2))
            v = np.float32(mean * scale)
            out += [v, np.float32(-v)]
    return np.sort(np.array(out, np.float32))


class NF4(NamedTuple):
    """The stored parts of one quantised weight (NumPy or JAX arrays)."""

    packed: Any  # uint8 (ceil(n/2),): two 4-bit codes per byte, first value high
    absmax: Any  # float32 (nb,) without double quantisation, else None
    absmax_q: Any  # uint8 (nb,): 8-bit codes of absmax - offset (double quantisation), else None
    nested: Any  # float32 (nn,): scale of each block of 256 absmax codes, else None
    offset: Any  # float32 (): the mean of absmax, else None
    shape: tuple
    dtype: Any  # the dtype dequantisation returns by default


def blocks(x: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray, int]:
    """``x`` flattened in C order as ``(nb, block)`` rows (a short last block padded with 0),
    each row's absmax (float32) and the number of values."""
    x = np.asarray(x, np.float32).reshape(-1)
    n = x.size
    xp = np.zeros(-(-n // block) * block, np.float32)
    xp[:n] = x
    xp = xp.reshape(-1, block)
    return xp, np.max(np.abs(xp), axis=1).astype(np.float32), n


def codes(x: np.ndarray, block: int = BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """``(codes uint8 (n,), absmax float32 (nb,))`` of ``x`` flattened in C order, blocks of ``block``."""
    xp, absmax, n = blocks(x, block)
    short = n % block
    denom = np.maximum(absmax, _TINY)
    with np.errstate(over="ignore"):
        recip = (np.float32(1.0) / denom).astype(np.float32)
    v = (xp * recip[:, None]).astype(np.float32)
    if short:  # the reference divides in the short last block
        v[-1] = (xp[-1] / denom[-1]).astype(np.float32)
    v = np.clip(v, np.float32(-1), np.float32(1))
    v[absmax == 0] = 0
    c = np.searchsorted(THRESHOLDS, v.reshape(-1)[:n], side="left").astype(np.uint8)
    return c, absmax


def pack(c: np.ndarray) -> np.ndarray:
    """Two codes per byte, the first in the high nibble; an odd count gets the code of 0.0 (7) last."""
    if c.size % 2:
        c = np.concatenate([c, np.array([7], np.uint8)])
    return ((c[0::2] << 4) | c[1::2]).astype(np.uint8)


def unpack(packed, n: int, xp=np):
    """The ``n`` codes of a packed array (NumPy or JAX)."""
    packed = xp.asarray(packed)
    both = xp.stack([packed >> 4, packed & 15], axis=-1).reshape(-1)
    return both[:n]


def quantize_absmax(absmax: np.ndarray, offset: Any = None) -> tuple[np.ndarray, np.ndarray, np.float32]:
    """Double quantisation of the block scales: ``(codes uint8, nested float32, offset float32)``.

    ``offset`` defaults to the mean of ``absmax`` accumulated in float64 (the
    reference sums in float32 in its own order, within a few ulp of this).
    """
    absmax = np.asarray(absmax, np.float32)
    off = np.float32(np.mean(absmax, dtype=np.float64)) if offset is None else np.float32(offset)
    a = (absmax - off).astype(np.float32)
    nb = a.size
    nn = -(-nb // NESTED_BLOCK)
    ap = np.zeros(nn * NESTED_BLOCK, np.float32)
    ap[:nb] = a
    ap = ap.reshape(nn, NESTED_BLOCK)
    nested = np.max(np.abs(ap), axis=1).astype(np.float32)
    # the padding of a short last block is 0 and never raises its max
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        recip = (np.float32(1.0) / nested).astype(np.float32)
        u = np.clip((ap * recip[:, None]).astype(np.float32), np.float32(-1), np.float32(1))
    # the reference's CPU kernel snaps u to one of 65,536 points, then takes the nearest entry (ties down)
    k = np.floor((((u + np.float32(1)).astype(np.float32) * np.float32(0.5)).astype(np.float32)
                  * np.float32(65535)).astype(np.float32) + np.float32(0.5))
    c_k = (np.float32(-1) + ((np.float32(2) * k.astype(np.float32)).astype(np.float32)
                             / np.float32(65535)).astype(np.float32)).astype(np.float32)
    table = dynamic_code()
    mids = (np.float32(0.5) * (table[:-1] + table[1:]).astype(np.float32)).astype(np.float32)
    q = np.searchsorted(mids, c_k, side="left").astype(np.uint8)
    q[nested == 0] = 0
    return q.reshape(-1)[:nb], nested, off


def quantize(x: Any, double_quant: bool = True, offset: Any = None, block: int = BLOCK) -> NF4:
    """NF4 codes of ``x`` (any float array; bfloat16/float16 convert to float32 exactly)."""
    arr = np.asarray(x)
    c, absmax = codes(arr.astype(np.float32), block)
    packed = pack(c)
    if not double_quant:
        return NF4(packed, absmax, None, None, None, tuple(arr.shape), arr.dtype)
    q, nested, off = quantize_absmax(absmax, offset)
    return NF4(packed, None, q, nested, off, tuple(arr.shape), arr.dtype)


def block_scales(q: NF4, xp=np):
    """Each block's absmax as dequantisation sees it (recovered from 8 bits with double quantisation)."""
    if q.absmax is not None:
        return xp.asarray(q.absmax, xp.float32)
    table = xp.asarray(dynamic_code())
    nested = xp.repeat(xp.asarray(q.nested, xp.float32), NESTED_BLOCK)[:xp.asarray(q.absmax_q).shape[0]]
    # one multiply, then one add, each rounded to float32 as the reference does
    return (table[xp.asarray(q.absmax_q).astype(xp.int32)] * nested) + xp.asarray(q.offset, xp.float32)


def dequantize(q: NF4, dtype: Any = None, xp=np):
    """The float values ``L[code] * absmax`` in ``q.shape`` (float32 math, then ``dtype``)."""
    n = int(np.prod(q.shape)) if q.shape else 1
    c = unpack(q.packed, n, xp)
    scales = xp.repeat(block_scales(q, xp), BLOCK)[:n]
    out = xp.asarray(LEVELS)[c.astype(xp.int32)] * scales
    return out.reshape(q.shape).astype(q.dtype if dtype is None else dtype)
