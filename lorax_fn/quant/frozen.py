"""How a :class:`QuantizedArray` that carries no adapter enters :func:`lorax_fn.lora`.

It becomes a lazy value of a kind with no update, so the interpreter moves its
codes through scans and slices like any adapted base and dequantises it inside
the operation that consumes it, one layer at a time under ``scan``.
"""

from __future__ import annotations

from typing import Any

from jax import lax

from .. import lazy as lz
from ..interpret import bind
from ..weight import Adapter, Layout
from .array import QuantizedArray


class Dequantized(Adapter):
    """The interpreter's view of a frozen quantised weight: its value is the dequantised base (internal)."""

    kind = "quantized"
    children = ("w",)
    static = ("layout",)
    silent = True  # dequantising is this value's only use, not a fallback worth a warning

    @classmethod
    def dense(cls, z: Any) -> Any:
        return z.w

    @classmethod
    def dot_general(cls, ctx: Any, d: Any) -> Any:
        return d.dense(d.x, d.z.w), None

    @classmethod
    def conv(cls, ctx: Any, eqn: Any, x: Any, z: Any) -> Any:
        return bind(eqn, x, z.w)

    @classmethod
    def gather(cls, ctx: Any, eqn: Any, z: Any, idx: Any) -> Any:
        return bind(eqn, z.w, idx)


def enter(q: QuantizedArray, path: str) -> lz.Lazy:
    """The lazy value of a frozen quantised leaf: separately coded axes are its stack axes."""
    nd, n = q.ndim, q.lead
    layout = Layout(tuple(range(n)), tuple(range(n, nd - 1)), (nd - 1,)) if nd > n else Layout(tuple(range(nd)), (), ())
    meta = lz.Meta(Dequantized, (layout,), tuple(range(nd)), len(layout.stack), len(layout.inputs),
                   len(layout.outputs), path)
    return lz.Lazy(lax.stop_gradient(q), [], meta)
