"""Rules for first-order primitives that meet a lazy LoRA value.

A rule takes ``(ctx, eqn, invals)`` and returns the list of output values, or
``None`` when it cannot keep the computation low-rank; the interpreter then
materialises. *Consuming* rules (``dot_general``, ``conv_general_dilated``,
``gather``) return dense arrays computed as ``x·w + scale·(x·a)·b``.
*Structural* rules return a new lazy value.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from . import lazy as lz
from .interpret import bind
from .lazy import LETTERS, Lazy


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
    p = eqn.params
    w = bind(eqn, z.w)
    a, b = z.a, z.b
    sharding = p.get("sharding")
    spec = getattr(sharding, "spec", None)
    if spec is not None and hasattr(sharding, "mesh"):
        from jax.sharding import NamedSharding, PartitionSpec as P
        full = tuple(spec) + (None,) * (len(z.shape) - len(spec))
        canon = [None] * len(z.meta.axes)
        for k, c in enumerate(z.meta.axes):
            canon[c] = full[k]
        m = z.meta
        sa = P(*canon[:m.ns + m.ni], None)
        sb = P(*canon[:m.ns], None, *canon[m.ns + m.ni:])
        a = lax.with_sharding_constraint(a, NamedSharding(sharding.mesh, sa))
        b = lax.with_sharding_constraint(b, NamedSharding(sharding.mesh, sb))
    return [Lazy(w, a, b, z.meta)]


# ------------------------------------------------------------- consuming
def dot_general_parts(ctx, eqn, invals):
    """``(x·w, scale·(x·a)·b)`` for a ``dot_general`` that meets a lazy value, or ``None``.

    With the merged-forward formulation the first part is the whole product
    and the second is ``None``.
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
    sa, sb = lz.letters(m, "".join(zl))
    first, second = (sa, sb) if mode == "i" else (sb, sa)
    # intermediate: the letters of x that survive, z's free stack letters, then the rank
    keep = [c for c in xl if c in out] + [c for c in first if c in out and c not in xl]
    tl = "".join(keep) + "R"
    a = lz.rank_major_grad(z.a, m.ns)
    f1, f2 = (a, z.b) if mode == "i" else (z.b, a)
    prec, pet = params.get("precision"), params.get("preferred_element_type")
    xs = "".join(xl)

    def dense_of(x_, w_):
        return bind(eqn, *((w_, x_) if z_is_lhs else (x_, w_)))

    def first_of(x_, f1_):
        t = jnp.einsum(f"{xs},{first}->{tl}", x_, f1_, precision=prec, preferred_element_type=pet)
        return t * jnp.asarray(m.scale, t.dtype)

    def second_of(t, f2_):
        return jnp.einsum(f"{tl},{second}->{out}", t, f2_, precision=prec, preferred_element_type=pet)

    # dropout acts on the adapter path only, which the merged forms cannot separate
    form = "factored" if ctx.drop is not None else _formulation(ctx, z, x, xl, out, first)
    if form != "factored":
        f = _merged_dot(dense_of, first_of, second_of, z.meta, primal_merged=form == "merged")
        return f(x, z.w, f1, f2, mode == "i"), None
    dense = dense_of(x, z.w)
    low = second_of(first_of(ctx.dropout(x), f1), f2)
    return dense, low.astype(dense.dtype)


def _formulation(ctx, z, x, xl, out, first) -> str:
    """How this use runs: ``"factored"``, ``"merged"`` or ``"train-merged"``.

    ``formulation="auto"`` gives ``"train-merged"``, i.e. ``x·(w + ΔW)`` in the
    forward pass of a differentiated computation and the factored product
    otherwise, when building ``ΔW`` costs less than the second low-rank
    product: the contracted size is below the number of rows of ``x`` that
    reach the output (tokens). Only for float32 or wider weights, where folding
    ``ΔW`` into ``w`` loses nothing to rounding.
    """
    mode = ctx.formulation
    if mode != "auto":
        return mode
    if jnp.finfo(z.w.dtype).bits < 32:
        return "factored"
    contracted = 1
    for c in first:
        if c in xl and c not in out:
            contracted *= x.shape[xl.index(c)]
    rows = 1
    for k, c in enumerate(xl):
        if c in out and c not in first:
            rows *= x.shape[k]
    return "train-merged" if contracted < rows else "factored"


def _merged_dot(dense_of, first_of, second_of, meta, primal_merged: bool):
    """``x·(w + scale·f1⊗f2)`` whose derivative is the factored one.

    Under differentiation the forward value is one dense product with the
    merged weight, with no rank-r product of the size of the output. Without
    differentiation it is that product (``primal_merged``) or the factored one
    (cheaper to compile, and as fast for a single forward pass).
    Tangent (and so the gradient, by transposition):
    ``dx·w + scale·((dx·f1)·f2) + scale·((x·df1)·f2) + (scale·x·f1)·df2``,
    which needs only ``x``, ``x·f1`` and the parameters as residuals, never the
    merged weight.
    """

    def merged(x, w, f1, f2, a_first):
        a, b = (f1, f2) if a_first else (f2, f1)
        return dense_of(x, lz.materialize(lz.Lazy(w, a, b, meta)))

    @functools.partial(jax.custom_jvp, nondiff_argnums=(4,))
    def f(x, w, f1, f2, a_first):
        if primal_merged:
            return merged(x, w, f1, f2, a_first)
        dense = dense_of(x, w)
        return dense + second_of(first_of(x, f1), f2).astype(dense.dtype)

    @functools.partial(f.defjvp, symbolic_zeros=True)
    def f_jvp(a_first, primals, tangents):
        x, w, f1, f2 = primals
        dx, dw, df1, df2 = tangents
        y = merged(x, w, f1, f2, a_first)
        terms = []
        if not _zero(dx):
            terms += [dense_of(dx, w), second_of(first_of(dx, f1), f2)]
        if not _zero(dw):
            terms.append(dense_of(x, dw))
        if not _zero(df1):
            terms.append(second_of(first_of(x, df1), f2))
        if not _zero(df2):
            terms.append(second_of(first_of(x, f1), df2))
        if not terms:
            return y, jnp.zeros_like(y)
        # on an explicit mesh each term carries its own operands' sharding
        terms = [lz.sharded_like(t.astype(y.dtype), y) for t in terms]
        tangent = terms[0]
        for t in terms[1:]:
            tangent = tangent + t
        return y, tangent

    return f


def _zero(t) -> bool:
    return isinstance(t, jax.custom_derivatives.SymbolicZero)


def _dot_general(ctx, eqn, invals):
    parts = dot_general_parts(ctx, eqn, invals)
    if parts is None:
        return None
    dense, low = parts
    return [dense if low is None else dense + low]


def _conv(ctx, eqn, invals):
    x, z = invals
    p = eqn.params
    if _is_lazy(x) or p["feature_group_count"] != 1 or p["batch_group_count"] != 1:
        return None
    dn = p["dimension_numbers"]
    rhs_spec, out_spec = dn.rhs_spec, dn.out_spec
    m = z.meta
    if m.ns or set(m.value_axes("o")) != {rhs_spec[0]}:
        return None
    # a as a conv kernel with r output features (the out axis replaced by the rank)
    perm = [m.axes[k] - m.ns if m.role(k) != "o" else m.ni for k in range(z.ndim)]
    # the rank-r conv runs in the layer's compute dtype, as the dense one does
    kernel_a = jnp.transpose(z.a, perm).astype(x.dtype)
    dense = bind(eqn, x, z.w)
    t = bind(eqn, ctx.dropout(x), kernel_a)
    f = out_spec[1]
    t = t * jnp.asarray(m.scale, t.dtype)
    low = jnp.moveaxis(jnp.tensordot(t, z.b, axes=((f,), (0,))), -1, f)
    return [dense + low.astype(dense.dtype)]


def _gather(ctx, eqn, invals):
    z, idx = invals
    if _is_lazy(idx):
        return None
    p = eqn.params
    dn = p["dimension_numbers"]
    if dn.operand_batching_dims or dn.start_indices_batching_dims:
        return None
    m = z.meta
    indexed = set(dn.start_index_map) | set(dn.collapsed_slice_dims)
    roles = {m.role(k) for k in indexed}
    if roles == {"s"}:
        return _gather_stack(eqn, z, idx)
    if len(roles) != 1:
        return None
    mode = roles.pop()
    kept = "o" if mode == "i" else "i"
    sizes = list(p["slice_sizes"])
    for k in range(z.ndim):
        if k not in indexed and sizes[k] != z.shape[k]:
            return None
    kept_axes = m.value_axes(kept)
    if not kept_axes:
        return None
    # the indexed factor laid out like the value, kept axes squeezed to one rank axis
    vl = LETTERS[:z.ndim]
    sa, sb = lz.letters(m, vl)
    fac, fspec, other, ospec = (z.a, sa, z.b, sb) if mode == "i" else (z.b, sb, z.a, sa)
    first_kept = kept_axes[0]
    target = "".join("R" if k == first_kept else ("" if k in kept_axes else vl[k]) for k in range(z.ndim))
    fv = jnp.einsum(f"{fspec}->{target}", fac)
    for k in kept_axes[1:]:
        fv = jnp.expand_dims(fv, k)
    new_sizes = list(sizes)
    for k in kept_axes:
        new_sizes[k] = fv.shape[k]
    dense = bind(eqn, z.w, idx)
    g = bind(eqn, fv, idx, slice_sizes=tuple(new_sizes), **_zero_fill(p))
    # letters of the gather output: offset dims carry operand letters, batch dims fresh ones
    it = iter(LETTERS[z.ndim:])
    non_collapsed = [k for k in range(z.ndim) if k not in dn.collapsed_slice_dims]
    gl, out = [], []
    offset = {d: non_collapsed[j] for j, d in enumerate(dn.offset_dims)}
    for d in range(g.ndim):
        if d in offset:
            k = offset[d]
            out.append(vl[k])
            gl.append("R" if k == first_kept else ("" if k in kept_axes else vl[k]))
        else:
            c = next(it)
            out.append(c); gl.append(c)
    g = g.reshape([n for n, c in zip(g.shape, gl) if c != ""])
    gspec = "".join(gl)
    g = g * jnp.asarray(m.scale, g.dtype)
    low = jnp.einsum(f"{gspec},{ospec}->{''.join(out)}", g, other)
    return [dense + low.astype(dense.dtype)]


def _zero_fill(params) -> dict:
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
    w = bind(eqn, z.w, idx)
    nb = w.ndim - len(dn.offset_dims)

    def factor(f):
        fdn = lax.GatherDimensionNumbers(
            offset_dims=tuple(range(nb, nb + f.ndim - len(cc))), collapsed_slice_dims=tuple(cc),
            start_index_map=tuple(m.axes[k] for k in dn.start_index_map))
        sizes = tuple(1 if c in cc else f.shape[c] for c in range(f.ndim))
        return bind(eqn, f, idx, dimension_numbers=fdn, slice_sizes=sizes, **_zero_fill(p))

    def renum(c):  # canonical index after the collapsed stack axes leave and nb batch axes arrive
        return nb + c - sum(1 for x in cc if x < c)

    kept = [k for k in range(z.ndim) if k not in collapsed]
    offset = dict(zip(dn.offset_dims, kept))
    batch = iter(range(nb))
    axes = tuple(renum(m.axes[offset[d]]) if d in offset else next(batch) for d in range(w.ndim))
    meta = m._replace(axes=axes, ns=nb + m.ns - len(cc))
    return [Lazy(w, factor(z.a), factor(z.b), meta)]


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
