"""DoRA (Liu et al. 2024, arXiv:2402.09353): a trainable magnitude per output unit over a LoRA direction.

``W' = m ⊙ (w + s·a@b) / ||w + s·a@b||_c``: ``||·||_c`` is the L2 norm of each
output unit over the input axes, ``m`` (``stack + out``) starts at ``||w||_c``
and trains with ``a`` and ``b``. As the paper proposes, the norm is a constant
in backprop (``stop_gradient``), in ``lora(fn)`` and in ``merge`` alike, so
gradients through the merged tree equal those of the unmerged model.

Inside a matmul the output is ``(x·w + s·(x·a)·b) ⊙ m / n``. The column norms
``n`` come from ``||w_c||² + 2s·b·(aᵀw) + s²·b·(aᵀa)b``, which needs ``aᵀw``
(an ``r × out`` product) but never the ``in × out`` delta; since ``n`` takes
no gradient, nothing of size ``in × out`` is kept for the backward pass.
Convolutions and row lookups use the dense weight (the interpreter
materialises it, and ``explain`` says so).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp
from jax import lax

from .. import lazy as lz
from ..weight import Adapter, Layout, factor_shapes
from . import lora


class DoraWeight(Adapter):
    """A DoRA adapter: base ``w``, LoRA factors ``a``, ``b`` and magnitude ``m`` (``stack + out``).

    Static: ``rank``, ``alpha``, ``layout``, ``variant`` (``"lora"`` or
    ``"rslora"``, the scale of ``a@b``). Made by ``lorafy(..., variant="dora")``.

    Example:
        >>> import jax.numpy as jnp, lorax_fn as lf
        >>> dw = lf.lorafy({"k": jnp.ones((4, 3))}, rank=2, variant="dora")["k"]
        >>> dw.m.shape, dw.m                                   # ||w||_c of each output unit
        ((3,), Array([2., 2., 2.], dtype=float32))
    """

    kind = "dora"
    children = ("w", "a", "b", "m")
    trainable = ("a", "b", "m")
    static = ("rank", "alpha", "layout", "variant")
    axes = {"a": "sir", "b": "sro", "m": "so"}
    quantizable = True

    def __init__(self, w, a, b, m, *, rank: int, alpha: float, layout: Layout, variant: str = "lora"):
        super().__init__(w, a=a, b=b, m=m, rank=int(rank), alpha=float(alpha), layout=layout, variant=variant)

    @property
    def scale(self) -> float:
        """The scale of ``a@b``: ``alpha / rank`` (``alpha / sqrt(rank)`` for rsLoRA)."""
        return lora.scale_of(self.config)

    @classmethod
    def create(cls, w, layout, key, *, rank, alpha, dtype, init, config, path):
        lw = lora.LoraWeight.create(w, layout, key, rank=rank, alpha=alpha, dtype=dtype, init=init,
                                    config=config, path=path)
        z = lz.as_lazy(lw)
        dt = jnp.promote_types(z.w.dtype, jnp.float32)
        v = lz.canonical(z, z.w.astype(dt)) + lora.delta_canonical(z.meta, lw.scale, lw.a, lw.b, dt)
        m = _norm(v, z.meta).astype(dtype)
        return cls(lw.w, lw.a, lw.b, m, rank=rank, alpha=alpha, layout=layout, variant=lw.variant)

    @classmethod
    def child_shapes(cls, shape, config):
        lay = config["layout"]
        sa, sb = factor_shapes(tuple(shape), lay, config["rank"])
        return {"a": sa, "b": sb, "m": tuple(shape[k] for k in lay.stack + lay.outputs)}

    @classmethod
    def read_config(cls, stored):
        return lora.read_rank_alpha(stored)

    @classmethod
    def delta(cls, z, dtype):
        wc = lz.canonical(z, z.w.astype(dtype))
        return cls._dense_canonical(z, wc, dtype) - wc

    @classmethod
    def dense(cls, z):
        dt = jnp.promote_types(z.w.dtype, jnp.float32)
        wc = lz.canonical(z, z.w.astype(dt))
        return lz.to_value(z, cls._dense_canonical(z, wc, dt)).astype(z.w.dtype)

    @classmethod
    def _dense_canonical(cls, z, wc, dt):
        m = z.meta
        v = wc + lora.delta_canonical(m, lora.scale_of(m.config), z.a, z.b, dt)
        ratio = z.m.astype(dt) / lax.stop_gradient(_norm(v, m))
        return v * _over_in(ratio, m)

    @classmethod
    def dot_general(cls, ctx, d):
        z, m = d.z, d.z.meta
        s_l, _, o_l = d.canon()
        if not d.forward_batched():
            return None  # x @ wᵀ, or stack axes not matched by x: the dense weight
        scale = lora.scale_of(m.config)
        dense, low = lora.dot(ctx, d, scale)
        y = dense if low is None else dense + low
        n = lax.stop_gradient(_norm_factored(z, scale))
        ratio = (z.m / n.astype(z.m.dtype)).astype(y.dtype)
        return jnp.einsum(f"{d.out},{s_l}{o_l}->{d.out}", y, ratio), None


@dataclasses.dataclass(frozen=True)
class DoRA:
    """DoRA (Liu et al. 2024): LoRA's direction with a trainable per-output magnitude.

    ``lorafy(params, rank, variant=lf.DoRA())`` (or ``variant="dora"``);
    ``rslora=True`` scales ``a@b`` by ``alpha/sqrt(r)``.

    Example:
        >>> import jax.numpy as jnp, lorax_fn as lf
        >>> type(lf.lorafy({"k": jnp.ones((4, 3))}, rank=2, variant=lf.DoRA())["k"]).__name__
        'DoraWeight'
    """

    rslora: bool = False
    adapter: ClassVar[type] = DoraWeight


def _in_axes(m):
    return tuple(range(m.ns, m.ns + m.ni))


def _over_in(v, m):
    """A ``stack + out`` array broadcast over the canonical ``in`` axes."""
    return jnp.expand_dims(v, _in_axes(m))


def _norm(v, m):
    """Column norms (over the in axes) of a canonical ``stack + in + out`` array."""
    return jnp.sqrt(jnp.sum(jnp.square(v), axis=_in_axes(m)))


def _norm_factored(z, scale: float):
    """``||w + s·a@b||_c`` from ``||w||²``, ``aᵀw`` and ``aᵀa``: no ``in × out`` temporary beyond ``w``."""
    m = z.meta
    dt = jnp.promote_types(z.w.dtype, jnp.float32)
    wc = lz.canonical(z, z.w).astype(dt)
    a, b = z.a.astype(dt), z.b.astype(dt)
    cl = lora.LETTERS[:m.ns + m.ni + m.no]
    s, i, o = cl[:m.ns], cl[m.ns:m.ns + m.ni], cl[m.ns + m.ni:]
    w2 = jnp.einsum(f"{s}{i}{o},{s}{i}{o}->{s}{o}", wc, wc)
    aw = jnp.einsum(f"{s}{i}R,{s}{i}{o}->{s}R{o}", a, wc)
    gram = jnp.einsum(f"{s}{i}R,{s}{i}Q->{s}RQ", a, a)
    cross = jnp.einsum(f"{s}R{o},{s}R{o}->{s}{o}", b, aw)
    quad = jnp.einsum(f"{s}R{o},{s}RQ,{s}Q{o}->{s}{o}", b, gram, b)
    sq = w2 + 2 * scale * cross + scale * scale * quad
    return jnp.sqrt(jnp.maximum(sq, 0))
