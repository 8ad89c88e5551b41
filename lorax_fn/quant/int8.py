"""Blockwise absmax int8: ``code = round(127 · x / absmax)`` per block, ``x ≈ code · absmax / 127``.

The 8-bit sibling of NF4 for bases where 4 bits lose too much: twice the bytes,
an error bound of half a step (``absmax / 254``) per value. Host-side NumPy,
like :mod:`lorax_fn.quant.nf4`; the same double quantisation of the scales
applies.
"""

from __future__ import annotations

import numpy as np

from . import nf4

STEPS = 127  # codes span -127..127, symmetric, so that -x codes to -code


def codes(x: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """``(codes int8 (n,), absmax float32 (nb,))`` of ``x`` flattened in C order, blocks of ``block``."""
    xp, absmax, n = nf4.blocks(x, block)
    with np.errstate(divide="ignore", invalid="ignore"):
        v = xp * (np.float32(STEPS) / absmax)[:, None]
    v[absmax == 0] = 0
    c = np.clip(np.rint(v), -STEPS, STEPS).astype(np.int8)
    return c.reshape(-1)[:n], absmax
