"""MoRA (Jiang et al. 2024, arXiv:2405.12130): one square trainable ``M`` for a high-rank update.

A parameter-free compression maps the flattened input (``in`` = product of
the layout's in axes) to ``r̂`` features, ``M`` (``r̂ × r̂``, zero at init, no
scale) acts on them, and a decompression maps ``r̂`` outputs back to the
flattened ``out`` axes: ``y = x·w + decomp(comp(x)·M)``. ``r̂`` is chosen so
that ``r̂² ≈ (in + out)·r``, LoRA's trainable count at rank ``r``.

- type 1 (sharing): the input is padded cyclically to ``G·r̂`` features and
  its ``G`` groups summed; the output repeats ``comp(x)·M`` and truncates.
- type 6 (rotation, the default): each block ``i`` of ``r̂`` input features is
  rotated by ``i·φ`` as in RoPE, every block goes through ``M``, and the
  concatenated blocks are truncated (or repeated) to ``out``.

Inside ``lora(fn)`` these act on the activations; the ``in × out`` delta is
built only by ``merge`` (the map applied to the identity). MoRA is defined
for matmuls only: a convolution or row lookup of a MoRA weight is refused.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax.numpy as jnp

from .. import lazy as lz
from ..errors import ArgumentError
from ..weight import Adapter, Layout


def square_size(n_in: int, n_out: int, rank: int, type: int) -> int:
    """``r̂ = floor(sqrt((in + out)·r) + 0.5)``, rounded down to even for type 6."""
    size = int(math.floor(math.sqrt((n_in + n_out) * rank) + 0.5))
    return size - size % 2 if type == 6 else size


class MoraWeight(Adapter):
    """A MoRA adapter: base ``w`` and square ``m`` (``stack + (size, size)``).

    Static: ``rank`` (the LoRA rank whose trainable count it matches),
    ``square`` (``r̂``), ``type`` (1 or 6) and ``layout``. Made by
    ``lorafy(..., variant="mora")`` (type 6) or ``variant=lf.MoRA(type=1)``.

    Example:
        >>> import jax.numpy as jnp, lorax_fn as lf
        >>> mw = lf.lorafy({"k": jnp.ones((64, 32))}, rank=4, variant="mora")["k"]
        >>> mw.square, mw.m.shape                # 20² = 400 ≈ (64 + 32)·4 = 384
        (20, (20, 20))
    """

    kind = "mora"
    children = ("w", "m")
    trainable = ("m",)
    static = ("rank", "square", "type", "layout")
    axes = {"m": "spq"}
    quantizable = True
    primitives = frozenset({"dot_general"})

    def __init__(self, w, m, *, rank: int, square: int, type: int, layout: Layout):
        super().__init__(w, m=m, rank=int(rank), square=int(square), type=int(type), layout=layout)

    @classmethod
    def create(cls, w, layout, key, *, rank, alpha, dtype, init, config, path):
        if init not in ("kaiming", "gaussian"):
            raise ArgumentError(f"'{path}': init={init!r} does not apply to MoRA, whose M starts at zero; "
                                "leave init at its default")
        n_in = math.prod(w.shape[k] for k in layout.inputs)
        n_out = math.prod(w.shape[k] for k in layout.outputs)
        size = square_size(n_in, n_out, rank, config.type)
        if size < 2:
            raise ArgumentError(f"'{path}': MoRA's square size for rank {rank} on in {n_in}, out {n_out} is "
                                f"{size}; raise the rank")
        stack = tuple(w.shape[k] for k in layout.stack)
        return cls(w, jnp.zeros(stack + (size, size), dtype), rank=rank, square=size, type=config.type,
                   layout=layout)

    @classmethod
    def child_shapes(cls, shape, config):
        # from the base's shape, not the stored ``square``: an M made for another base does not fit
        lay = config["layout"]
        n_in = math.prod(shape[k] for k in lay.inputs)
        n_out = math.prod(shape[k] for k in lay.outputs)
        size = square_size(n_in, n_out, config["rank"], config["type"])
        return {"m": tuple(shape[k] for k in lay.stack) + (size, size)}

    @classmethod
    def read_config(cls, stored):
        out = {}
        for name in ("rank", "square"):
            v = stored.get(name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(name, f"is {v!r}; it must be an integer >= 1")
            out[name] = v
        if stored.get("type") not in (1, 6):
            raise ValueError("type", f"is {stored.get('type')!r}; expected 1 or 6")
        out["type"] = stored["type"]
        return out

    @classmethod
    def delta(cls, z, dtype):
        m = z.meta
        s, i, o = lz.canonical_sizes(z)
        n_in, n_out, S = math.prod(i), math.prod(o), math.prod(s)
        cfg = m.config
        M = z.m.astype(dtype).reshape((S, cfg["square"], cfg["square"]))
        # row k of ΔW is the update's output for the unit input e_k
        c = compress(jnp.eye(n_in, dtype=dtype), cfg["square"], cfg["type"])
        zz = jnp.einsum("ip,spq->siq" if cfg["type"] == 1 else "igp,spq->sigq", c, M)
        return decompress(zz, cfg["type"], n_out).reshape(s + i + o)

    @classmethod
    def dot_general(cls, ctx, d):
        z, m = d.z, d.z.meta
        s_l, i_l, o_l = d.canon()
        if not d.forward_batched():
            return None  # x @ wᵀ, or stack axes not matched by x: the dense weight
        s, i, o = lz.canonical_sizes(z)
        cfg = m.config
        x = ctx.dropout(d.x)
        pre = "".join(c for c in d.xl if c not in i_l and c not in s_l)
        pre_shape = tuple(x.shape[d.xl.index(c)] for c in pre)
        xr = jnp.einsum(f"{''.join(d.xl)}->{pre}{s_l}{i_l}", x)
        xr = xr.reshape(pre_shape + (math.prod(s), math.prod(i)))
        M = z.m.reshape((math.prod(s), cfg["square"], cfg["square"]))
        y = apply(xr, M, cfg["type"], math.prod(o)).reshape(pre_shape + s + o)
        low = jnp.einsum(f"{pre}{s_l}{o_l}->{d.out}", y)
        dense = d.dense(d.x, z.w)
        return dense, low.astype(dense.dtype)


@dataclasses.dataclass(frozen=True)
class MoRA:
    """MoRA (Jiang et al. 2024): ``type=6`` (rotation, the default; ``variant="mora"``) or ``type=1`` (sharing).

    Example:
        >>> import jax.numpy as jnp, lorax_fn as lf
        >>> lf.lorafy({"k": jnp.ones((64, 32))}, rank=4, variant=lf.MoRA(type=1))["k"].type
        1
    """

    type: int = 6
    adapter: ClassVar[type] = MoraWeight

    def __post_init__(self):
        if self.type not in (1, 6):
            raise ArgumentError(f"MoRA type must be 1 (sharing) or 6 (rotation), got {self.type!r}")


def compress(x, size: int, type: int):
    """``(..., in)`` → ``(..., r̂)`` (type 1) or ``(..., G, r̂)`` rotated blocks (type 6)."""
    n_in = x.shape[-1]
    groups = -(-n_in // size)
    if groups * size != n_in:  # cyclic padding: the first features again, as often as needed
        x = jnp.take(x, jnp.arange(groups * size) % n_in, axis=-1)
    blocks = x.reshape(x.shape[:-1] + (groups, size))
    return jnp.sum(blocks, axis=-2) if type == 1 else _rotate(blocks)


def decompress(z, type: int, n_out: int):
    """``(..., r̂)`` or ``(..., G, r̂)`` → ``(..., out)``: concatenate blocks, repeat, truncate."""
    if type != 1:
        z = z.reshape(z.shape[:-2] + (z.shape[-2] * z.shape[-1],))
    reps = -(-n_out // z.shape[-1])
    if reps > 1:
        z = jnp.concatenate([z] * reps, axis=-1)
    return z[..., :n_out]


def apply(x, M, type: int, n_out: int):
    """``decomp(comp(x) @ M)`` for ``x`` of shape ``(..., S, in)`` and ``M`` of shape ``(S, r̂, r̂)``."""
    c = compress(x, M.shape[-1], type)
    z = jnp.einsum("...sp,spq->...sq" if type == 1 else "...sgp,spq->...sgq", c, M)
    return decompress(z, type, n_out)


def _rotate(blocks):
    """Rotate block ``i`` (axis -2) by ``i·φ`` with ``φ = concat(θ, θ)``, ``θ_j = 10000^(-2j/r̂)``."""
    groups, size = blocks.shape[-2], blocks.shape[-1]
    half = size // 2
    theta = 10000.0 ** (-2.0 * jnp.arange(half, dtype=jnp.float32) / size)
    ang = jnp.arange(groups, dtype=jnp.float32)[:, None] * jnp.concatenate([theta, theta])[None, :]
    cos, sin = jnp.cos(ang).astype(blocks.dtype), jnp.sin(ang).astype(blocks.dtype)
    rot = jnp.concatenate([-blocks[..., half:], blocks[..., :half]], axis=-1)
    return blocks * cos + rot * sin
