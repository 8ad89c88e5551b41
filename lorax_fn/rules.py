"""Rules for first-order primitives that meet a lazy adapted value.

A rule takes ``(ctx, eqn, invals)`` and returns the list of output values, or
``None`` when it cannot keep the computation unmerged; the interpreter then
materialises. *Structural* rules return a new lazy value and never need the
adapter's kind. *Consuming* rules (``dot_general``, ``conv_general_dilated``,
``gather``) work out how the weight is used and hand that to the kind's own
rule (LoRA's computes ``x·w + scale·(x·a)·b``).
"""

from __future__ import annotations

import string
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from . import lazy as lz
from .interpret import bind
from .errors import TargetError
from .lazy import Lazy
from .quant.array import QuantizedArray

LETTERS = string.ascii_letters.replace("R", "")  # 'R' is left for a kind's own axis (LoRA's rank)


def _is_lazy(v) -> bool:
    return isinstance(v, Lazy)


# ------------------------------------------------------------- structural
def _convert(ctx, eqn, invals):
    (z,) = invals
    dtype = eqn.params["new_dtype"]
    if not jnp.issubdtype(dtype, jnp.inexact):
        return None
    return [lz.cast(z, dtype)]


def _transpose(ctx, eqn, invals):
    return [lz.transpose(invals[0], eqn.params["permutation"])]


def _identity(ctx, eqn, invals):
    return [invals[0]]


def _reshape(ctx, eqn, invals):
    if len(invals) > 1:
        return None  # dynamic-shape operands
    out = lz.reshape(invals[0], eqn.outvars[0].aval.shape)
    return None if out is None else [out]


def _broadcast_in_dim(ctx, eqn, invals):
    z = invals[0]
    shape = tuple(eqn.params["shape"])
    dims = tuple(eqn.params["broadcast_dimensions"])
    if len(invals) > 1 or any(shape[d] != n for d, n in zip(dims, z.shape)):
        return None  # a real broadcast, not an expand_dims
    out = lz.reshape(z, shape)
    return None if out is None else [out]


def _slice(ctx, eqn, invals):
    p = eqn.params
    out = lz.slice_stack(invals[0], p["start_indices"], p["limit_indices"], p["strides"])
    return None if out is None else [out]


def _dynamic_slice(ctx, eqn, invals):
    z, *starts = invals
    if any(_is_lazy(s) for s in starts):
        return None
    out = lz.dynamic_slice_stack(z, starts, tuple(eqn.params["slice_sizes"]))
    return None if out is None else [out]


def _sharding_constraint(ctx, eqn, invals):
    z = invals[0]
    # a coded base keeps its codes' placement: constraining it would dequantise it whole
    w = z.w if isinstance(z.w, QuantizedArray) else bind(eqn, z.w)
    parts = z.parts
    sharding = eqn.params.get("sharding")
    spec = getattr(sharding, "spec", None)
    if spec is not None and hasattr(sharding, "mesh"):
        from jax.sharding import NamedSharding
        # each child follows the axes it shares with the value; its own axes stay replicated
        parts = [lax.with_sharding_constraint(p, NamedSharding(sharding.mesh, s))
                 for p, s in zip(parts, lz.child_specs(z, spec))]
    return [z.with_parts(w, parts)]


# ------------------------------------------------------------- consuming
class Dot(NamedTuple):
    """A ``dot_general`` that meets a lazy value, in einsum letters, for the kind's rule."""

    eqn: Any
    x: Any  # the other operand
    z: Lazy
    z_is_lhs: bool
    mode: str  # "i": x contracts z's in axes (x @ w); "o": its out axes (x @ w.T)
    xl: list  # one letter per axis of x
    zl: list  # one letter per value axis of z; contracted and batch pairs share x's letter
    out: str  # the output's letters

    def dense(self, x_, w_):
        """The primitive itself on ``x_`` and a dense weight ``w_``."""
        return bind(self.eqn, *((w_, x_) if self.z_is_lhs else (x_, w_)))

    def forward_batched(self) -> bool:
        """``x @ w`` (not ``x @ wᵀ``) with every stack axis of the weight a batch axis of ``x``: the
        use a kind that rescales or remaps the output units handles; other uses can fall back to dense."""
        return self.mode == "i" and all(c in self.xl for c in self.canon()[0])

    def canon(self) -> tuple[str, str, str]:
        """z's stack, in and out letters in canonical order."""
        m = self.z.meta
        c = [""] * len(m.axes)
        for k, j in enumerate(m.axes):
            c[j] = self.zl[k]
        return "".join(c[:m.ns]), "".join(c[m.ns:m.ns + m.ni]), "".join(c[m.ns + m.ni:])


def dot_general_parts(ctx, eqn, invals):
    """``(dense, low)`` for a ``dot_general`` that meets a lazy value, from its kind, or ``None``.

    ``low`` is ``None`` when the kind returns the whole product in ``dense``.
    """
    lhs, rhs = invals
    params = eqn.params
    if _is_lazy(lhs) and _is_lazy(rhs):
        rhs = ctx.materialize(rhs, eqn, "both operands of dot_general are LoRA weights")
    z_is_lhs = _is_lazy(lhs)
    z, x = (lhs, rhs) if z_is_lhs else (rhs, lhs)
    (lc, rc), (lb, rb) = params["dimension_numbers"]
    zc, xc, zb, xb = (lc, rc, lb, rb) if z_is_lhs else (rc, lc, rb, lb)
    m = z.meta
    if any(m.role(k) != "s" for k in zb):
        return None
    contracted = set(zc)
    if contracted == set(m.value_axes("i")) and contracted:
        mode = "i"
    elif contracted == set(m.value_axes("o")) and contracted:
        mode = "o"
    else:
        return None
    # one letter per axis of x and of z; contracted and batch pairs share a letter
    it = iter(LETTERS)
    xl = [next(it) for _ in range(x.ndim)]
    zl = [None] * z.ndim
    for kz, kx in zip(zc, xc):
        zl[kz] = xl[kx]
    for kz, kx in zip(zb, xb):
        zl[kz] = xl[kx]
    zl = [c if c is not None else next(it) for c in zl]
    ll, rl = (zl, xl) if z_is_lhs else (xl, zl)
    lfree = [ll[k] for k in range(len(ll)) if k not in lc and k not in lb]
    rfree = [rl[k] for k in range(len(rl)) if k not in rc and k not in rb]
    out = "".join([ll[k] for k in lb] + lfree + rfree)
    _supported(z, eqn)
    return _on_dense_base(lambda x_, z_: m.kind.dot_general(ctx, Dot(eqn, x_, z_, z_is_lhs, mode, xl, zl, out)),
                          x, z)


def _on_dense_base(use, x, z):
    """``use(x, z)`` with ``z``'s base dense: the kinds' rules never see codes.

    A quantised base is dequantised inside a rematerialised region. The dense
    weight depends on no differentiated input, so JAX would otherwise compute
    it in the forward pass and keep it for the backward one (``x``'s cotangent
    needs it): a dense copy of every layer of a scanned stack. Here the
    backward pass dequantises again from the codes, as QLoRA does, and
    recomputes nothing else of size (the dense product is not needed there).
    """
    if not isinstance(z.w, QuantizedArray):
        return use(x, z)
    return jax.checkpoint(lambda x_, z_: use(x_, lz.dense_base(z_)),
                          policy=jax.checkpoint_policies.nothing_saveable)(x, z)


def _dot_general(ctx, eqn, invals):
    parts = dot_general_parts(ctx, eqn, invals)
    if parts is None:
        return None
    dense, low = parts
    return [dense if low is None else dense + low]


def _supported(z: Lazy, eqn) -> None:
    """TargetError when the weight's kind is not defined for this consuming primitive (MoRA in a conv)."""
    kind, name = z.meta.kind, eqn.primitive.name
    if name not in kind.primitives:
        raise TargetError(f"'{z.meta.path}' is a {kind.__name__} ({kind.kind} adapter), which is not defined for "
                          f"{name} (only {', '.join(sorted(kind.primitives))}); exclude the leaf from lorafy's "
                          "targets or adapt it with variant='lora'")


def _conv(ctx, eqn, invals):
    x, z = invals
    if _is_lazy(x):
        return None
    _supported(z, eqn)
    out = _on_dense_base(lambda x_, z_: z.meta.kind.conv(ctx, eqn, x_, z_), x, z)
    return None if out is None else [out]


def _gather(ctx, eqn, invals):
    z, idx = invals
    if _is_lazy(idx):
        return None
    dn = eqn.params["dimension_numbers"]
    if dn.operand_batching_dims or dn.start_indices_batching_dims:
        return None
    indexed = set(dn.start_index_map) | set(dn.collapsed_slice_dims)
    if {z.meta.role(k) for k in indexed} == {"s"}:
        return _gather_stack(eqn, z, idx)
    _supported(z, eqn)
    out = _on_dense_base(lambda i_, z_: z.meta.kind.gather(ctx, eqn, z_, i_), idx, z)
    return None if out is None else [out]


def zero_fill(params) -> dict:
    """Out-of-bounds rows of a factor read as zero: the dense ``w`` gather alone
    carries the fill value, and no NaN meets a zero cotangent in the backward pass."""
    if params.get("mode") == lax.GatherScatterMode.FILL_OR_DROP:
        return {"fill_value": 0}
    return {}


def _gather_stack(eqn, z, idx):
    """Indexing along stack axes only (``experts[ids]``): gather ``w``, ``a`` and ``b``
    alike and stay lazy; the index batch dims become new stack axes."""
    p = eqn.params
    dn = p["dimension_numbers"]
    m = z.meta
    collapsed = set(dn.collapsed_slice_dims)
    if collapsed != set(dn.start_index_map):
        return None
    for k in range(z.ndim):
        if p["slice_sizes"][k] != (1 if k in collapsed else z.shape[k]):
            return None
    cc = sorted(m.axes[k] for k in collapsed)
    w = bind(eqn, lz.dense_base(z).w, idx)
    nb = w.ndim - len(dn.offset_dims)

    def factor(f):
        fdn = lax.GatherDimensionNumbers(
            offset_dims=tuple(range(nb, nb + f.ndim - len(cc))), collapsed_slice_dims=tuple(cc),
            start_index_map=tuple(m.axes[k] for k in dn.start_index_map))
        sizes = tuple(1 if c in cc else f.shape[c] for c in range(f.ndim))
        return bind(eqn, f, idx, dimension_numbers=fdn, slice_sizes=sizes, **zero_fill(p))

    def renum(c):  # canonical index after the collapsed stack axes leave and nb batch axes arrive
        return nb + c - sum(1 for x in cc if x < c)

    kept = [k for k in range(z.ndim) if k not in collapsed]
    offset = dict(zip(dn.offset_dims, kept))
    batch = iter(range(nb))
    axes = tuple(renum(m.axes[offset[d]]) if d in offset else next(batch) for d in range(w.ndim))
    meta = m._replace(axes=axes, ns=nb + m.ns - len(cc))
    return [z.with_parts(w, [factor(p) for p in z.parts], meta)]


RULES = {
    "convert_element_type": _convert,
    "transpose": _transpose,
    "copy": _identity,
    "copy_p": _identity,
    "reshape": _reshape,
    "squeeze": _reshape,
    "expand_dims": _reshape,
    "broadcast_in_dim": _broadcast_in_dim,
    "slice": _slice,
    "dynamic_slice": _dynamic_slice,
    "sharding_constraint": _sharding_constraint,
    "dot_general": _dot_general,
    "conv_general_dilated": _conv,
    "gather": _gather,
}
