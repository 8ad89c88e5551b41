"""LoRA (Hu et al. 2021) and rsLoRA: ``w + scale · a ⊗_r b``, the first adapter kind.

``a: stack + in + (r,)``, ``b: stack + (r,) + out``; ``scale = alpha / r``
(``alpha / sqrt(r)`` for rsLoRA). Inside :func:`lorax_fn.lora` a matmul
computes ``x·w + scale·(x·a)·b`` (or, where it measured faster, the merged
forward with the factored derivative), a convolution runs ``a`` as an
``r``-feature kernel, and a row lookup gathers rows of the factors.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from jax import lax

from .. import lazy as lz
from ..interpret import bind
from ..rules import LETTERS, zero_fill
from ..weight import Adapter, Layout, factor_shapes



class LoraWeight(Adapter):
    """A frozen base weight ``w`` with a low-rank update ``scale · a ⊗_r b``.

    Behaves like the dense weight ``w + ΔW`` inside :func:`lorax_fn.lora` and is
    turned into it by :func:`lorax_fn.merge`. ``.shape``/``.dtype`` are the dense
    weight's. Children: ``w``, ``a``, ``b``; static: ``rank``, ``alpha``,
    ``layout``, ``variant`` (``"lora"`` or ``"rslora"``).

    Outside :func:`lorax_fn.lora` it is not an array: a function that is not
    wrapped (a plain ``model.apply``, ``jnp.asarray``, ``np.asarray``, ``x @ w``)
    raises :class:`~lorax_fn.ArgumentError`, which says to wrap the function
    with ``lf.lora`` or to ``lf.merge`` the tree first. Tree functions
    (``jax.tree.map``, ``jax.jit`` arguments, ``jax.eval_shape``) see its
    children and are unaffected.

    Example:
        >>> import jax.numpy as jnp, lorax_fn as lf
        >>> lw = lf.lorafy({"k": jnp.ones((4, 3))}, rank=2)["k"]
        >>> lw.shape, lw.a.shape, lw.b.shape
        ((4, 3), (4, 2), (2, 3))
        >>> try:
        ...     jnp.ones((2, 4)) @ lw
        ... except lf.ArgumentError as err:
        ...     print("`lf.lora`" in str(err), "`lf.merge`" in str(err))
        True True
    """

    kind = "lora"
    children = ("w", "a", "b")
    trainable = ("a", "b")
    static = ("rank", "alpha", "layout", "variant")
    axes = {"a": "sir", "b": "sro"}
    quantizable = True

    def __init__(self, w: Any, a: Any, b: Any, *, rank: int, alpha: float,
                 layout: Layout, variant: str = "lora"):
        super().__init__(w, a=a, b=b, rank=int(rank), alpha=float(alpha), layout=layout, variant=variant)

    @property
    def scale(self) -> float:
        """``alpha / rank`` (``alpha / sqrt(rank)`` for rsLoRA)."""
        return scale_of(self.config)

    def __repr__(self) -> str:
        lay = self.layout
        stack = f", stack={lay.stack}" if lay.stack else ""
        dt = getattr(self.w, "dtype", type(self.w).__name__)
        return (f"{type(self).__name__}(shape={getattr(self.w, 'shape', '?')}, dtype={dt}, rank={self.rank}, "
                f"alpha={self.alpha:g}{stack}, in={lay.inputs}, out={lay.outputs}"
                + (f", variant={self.variant}" if self.variant != "lora" else "")
                + (f", base={self.w.codebook}" if hasattr(self.w, "codebook") else "") + ")")

    # -- the kind's hooks ---------------------------------------------------
    @classmethod
    def create(cls, w, layout: Layout, key, *, rank: int, alpha: float, dtype, init: str, config, path: str):
        from .. import inits
        variant = "rslora" if config.rslora else "lora"
        if inits.rewrites_base(init):
            scale = alpha / math.sqrt(rank) if config.rslora else alpha / rank
            w, a, b = inits.from_weight(key, w, layout, rank, scale, dtype, init)
        else:
            a, b = inits.random_factors(key, w, layout, rank, dtype, init)
        return cls(w, a, b, rank=rank, alpha=alpha, layout=layout, variant=variant)

    @classmethod
    def child_shapes(cls, shape, config):
        sa, sb = factor_shapes(tuple(shape), config["layout"], config["rank"])
        return {"a": sa, "b": sb}

    @classmethod
    def read_config(cls, stored):
        return read_rank_alpha(stored)

    @classmethod
    def delta(cls, z, dtype):
        return delta_canonical(z.meta, scale_of(z.meta.config), z.a, z.b, dtype)

    @classmethod
    def dot_general(cls, ctx, d):
        return dot(ctx, d, scale_of(d.z.meta.config))

    @classmethod
    def conv(cls, ctx, eqn, x, z):
        return conv(ctx, eqn, x, z, scale_of(z.meta.config))

    @classmethod
    def gather(cls, ctx, eqn, z, idx):
        return gather(ctx, eqn, z, idx, scale_of(z.meta.config))


@dataclasses.dataclass(frozen=True)
class LoRA:
    """LoRA (Hu et al. 2021): ``w + alpha/r · a@b``; ``rslora=True`` scales by ``alpha/sqrt(r)``.

    Pass to :func:`lorax_fn.lorafy` as ``variant=lf.LoRA()`` (the default, also
    ``variant="lora"``). ``lorafy(..., rslora=True)`` is ``variant=lf.LoRA(rslora=True)``.

    Example:
        >>> import jax.numpy as jnp, lorax_fn as lf
        >>> lf.lorafy({"k": jnp.ones((4, 3))}, rank=2, variant=lf.LoRA(rslora=True))["k"].scale
        1.414213562373095
    """

    rslora: bool = False
    adapter: ClassVar[type] = LoraWeight


def scale_of(config) -> float:
    if config.get("variant") == "rslora":
        return config["alpha"] / math.sqrt(config["rank"])
    return config["alpha"] / config["rank"]


def read_rank_alpha(stored) -> dict:
    """``rank``, ``alpha`` and ``variant`` of a stored entry, checked; ``ValueError(field, why)`` if not."""
    rank, alpha, variant = stored.get("rank"), stored.get("alpha"), stored.get("variant")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError("rank", f"is {rank!r}; it must be >= 1")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError("alpha", f"is {alpha!r}; it must be finite and > 0")
    if variant not in ("lora", "rslora"):
        raise ValueError("variant", f"is {variant!r}; expected one of ('lora', 'rslora')")
    return {"rank": rank, "alpha": float(alpha), "variant": variant}


# ------------------------------------------------------------------ the delta
def letters(meta, value_letters: str) -> tuple[str, str]:
    """einsum specs of ``a`` and ``b`` given one letter per value axis."""
    canon = [""] * len(meta.axes)
    for k, c in enumerate(meta.axes):
        canon[c] = value_letters[k]
    s, i, o = canon[:meta.ns], canon[meta.ns:meta.ns + meta.ni], canon[meta.ns + meta.ni:]
    return "".join(s + i) + "R", "".join(s) + "R" + "".join(o)


# Up to this rank ΔW is built as a sum of r broadcast outer products, which XLA
# fuses with the add into one pass over w; a rank-r matmul writing an in×out
# result runs far below memory speed on CPU (merge took 1.9× a plain copy of
# the params that way, under 1.5× this way). Larger ranks use the matmul.
UNROLL_RANK = 16


def delta_canonical(m, scale: float, a, b, dtype) -> jax.Array:
    """``scale · a ⊗_r b`` in canonical order ``stack + in + out``, in ``dtype``."""
    rank = a.shape[-1]
    ns, ni, no = m.ns, m.ni, m.no
    if rank > UNROLL_RANK or not (ni and no):
        cl = LETTERS[:ns + ni + no]
        sa, sb = cl[:ns + ni] + "R", cl[:ns] + "R" + cl[ns + ni:]
        d = jnp.einsum(f"{sa},{sb}->{cl}", a, b, preferred_element_type=dtype)
        return d.astype(dtype) * jnp.asarray(scale, dtype)
    a = a.astype(dtype) * jnp.asarray(scale, dtype)
    b = b.astype(dtype)
    canon = a.shape[:-1] + b.shape[ns + 1:]
    # a's rank slice broadcasts along the first out axis, b's along the first in axis
    a_dims = tuple(range(ns + ni)) + (ns + ni,)
    b_dims = tuple(range(ns)) + (ns,) + tuple(range(ns + ni, ns + ni + no))
    d = None
    for r in range(rank):
        ar = lax.broadcast_in_dim(lax.slice_in_dim(a, r, r + 1, axis=a.ndim - 1), canon, a_dims)
        br = lax.broadcast_in_dim(lax.slice_in_dim(b, r, r + 1, axis=ns), canon, b_dims)
        d = ar * br if d is None else d + ar * br
    return d


def rank_major_grad(a: jax.Array, ns: int) -> jax.Array:
    """``a`` unchanged, but its cotangent is built with the rank axis leading.

    ``a``'s gradient is a contraction over tokens, ``x^T · g``. Left to itself
    XLA writes it straight into ``a``'s rank-minor layout, and on CPU that dot is
    several times slower than the same dot writing ``(r, in)``. The barrier pins
    the rank-major tangent (and so cotangent); the transpose back to ``a``'s
    layout is a small copy. Only the tangent goes through it: without
    differentiation this is the identity and compiles to nothing.
    """
    if a.ndim < 2:
        return a
    return _rank_major(a, ns)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _rank_major(a, ns):
    return a


@_rank_major.defjvp
def _rank_major_jvp(ns, primals, tangents):
    # the primal goes through its own barrier too: in training, a rank-major
    # copy of ``a`` for the forward products measured faster as well
    (a,), (da,) = primals, tangents
    perm = tuple(range(ns)) + (a.ndim - 1,) + tuple(range(ns, a.ndim - 1))
    inv = tuple(perm.index(k) for k in range(a.ndim))
    pinned = lambda t: jnp.transpose(lax.optimization_barrier(jnp.transpose(t, perm)), inv)
    return pinned(a), pinned(da)

# ------------------------------------------------------------- consuming
def dot(ctx, d, scale: float):
    """``(x·w, scale·(x·a)·b)`` for a ``dot_general`` (see ``rules.Dot``); with the
    merged-forward formulation the first part is the whole product and the second ``None``."""
    z, x, m = d.z, d.x, d.z.meta
    sa, sb = letters(m, "".join(d.zl))
    first, second = (sa, sb) if d.mode == "i" else (sb, sa)
    # intermediate: the letters of x that survive, z's free stack letters, then the rank
    keep = [c for c in d.xl if c in d.out] + [c for c in first if c in d.out and c not in d.xl]
    tl = "".join(keep) + "R"
    a = rank_major_grad(z.a, m.ns)
    f1, f2 = (a, z.b) if d.mode == "i" else (z.b, a)
    prec, pet = d.eqn.params.get("precision"), d.eqn.params.get("preferred_element_type")
    xs, out = "".join(d.xl), d.out

    def first_of(x_, f1_):
        t = jnp.einsum(f"{xs},{first}->{tl}", x_, f1_, precision=prec, preferred_element_type=pet)
        return t * jnp.asarray(scale, t.dtype)

    def second_of(t, f2_):
        return jnp.einsum(f"{tl},{second}->{out}", t, f2_, precision=prec, preferred_element_type=pet)

    # dropout acts on the adapter path only, which the merged forms cannot separate
    form = "factored" if ctx.drop is not None else _formulation(ctx, z, x, d.xl, out, first)
    if form != "factored":
        f = _merged_dot(d.dense, first_of, second_of, z.meta, scale, primal_merged=form == "merged")
        return f(x, z.w, f1, f2, d.mode == "i"), None
    dense = d.dense(x, z.w)
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


def _merged_dot(dense_of, first_of, second_of, meta, scale: float, primal_merged: bool):
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
        d = delta_canonical(meta, scale, a, b, jnp.promote_types(w.dtype, jnp.float32))
        return dense_of(x, lz.add_delta(w, jnp.transpose(d, meta.axes)))

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


def conv(ctx, eqn, x, z, scale: float):
    """``conv(x, w) + scale·conv(x, a)·b``: ``a`` runs as a kernel of ``r`` output features."""
    p = eqn.params
    if p["feature_group_count"] != 1 or p["batch_group_count"] != 1:
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
    t = t * jnp.asarray(scale, t.dtype)
    low = jnp.moveaxis(jnp.tensordot(t, z.b, axes=((f,), (0,))), -1, f)
    return dense + low.astype(dense.dtype)


def gather(ctx, eqn, z, idx, scale: float):
    """A row lookup (``embedding[ids]``): gather ``w`` and the indexed factor's rows, then one rank-r product."""
    p = eqn.params
    dn = p["dimension_numbers"]
    m = z.meta
    indexed = set(dn.start_index_map) | set(dn.collapsed_slice_dims)
    roles = {m.role(k) for k in indexed}
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
    sa, sb = letters(m, vl)
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
    g = bind(eqn, fv, idx, slice_sizes=tuple(new_sizes), **zero_fill(p))
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
    g = g * jnp.asarray(scale, g.dtype)
    low = jnp.einsum(f"{gspec},{ospec}->{''.join(out)}", g, other)
    return dense + low.astype(dense.dtype)
