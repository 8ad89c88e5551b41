"""The interpreter's lazy LoRA value: ``w + scale · a ⊗_r b`` kept in factored form.

A ``Lazy`` is what a ``LoraWeight`` becomes inside :func:`lorax_fn.lora` after
structural operations (casts, transposes, reshapes, slices of stacked layers).
Its axes keep their roles: every value axis maps to one *canonical* axis, and
the canonical order is ``stack + in + out`` — the order of ``a``'s and ``b``'s
non-rank axes. ``a: stack + in + (r,)``, ``b: stack + (r,) + out`` and the value
equals ``w + scale · transpose(einsum(a, b), axes)``.
"""

from __future__ import annotations

import functools
import string
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from .weight import LoraWeight

LETTERS = string.ascii_letters.replace("R", "")  # 'R' is reserved for the rank axis


class Meta(NamedTuple):
    """Static part of a lazy value."""

    scale: float
    axes: tuple[int, ...]  # value axis k is canonical axis axes[k]
    ns: int
    ni: int
    no: int
    path: str

    def role(self, k: int) -> str:
        """'s', 'i' or 'o' for value axis k."""
        c = self.axes[k]
        return "s" if c < self.ns else ("i" if c < self.ns + self.ni else "o")

    def value_axes(self, role: str) -> tuple[int, ...]:
        return tuple(k for k in range(len(self.axes)) if self.role(k) == role)


@jax.tree_util.register_pytree_node_class
class Lazy:
    """A LoRA weight value flowing through the interpreter (internal)."""

    __slots__ = ("w", "a", "b", "meta")

    def __init__(self, w, a, b, meta: Meta):
        self.w, self.a, self.b, self.meta = w, a, b, meta

    def tree_flatten(self):
        return (self.w, self.a, self.b), self.meta

    @classmethod
    def tree_unflatten(cls, meta, children):
        return cls(*children, meta)

    @property
    def shape(self):
        return self.w.shape

    @property
    def dtype(self):
        return self.w.dtype

    @property
    def ndim(self):
        return self.w.ndim

    def __repr__(self):
        return f"Lazy({self.meta.path}, shape={self.w.shape}, axes={self.meta.axes})"


def as_lazy(lw: LoraWeight, path: str = "") -> Lazy:
    """The lazy value of a ``LoraWeight``, axes in the base weight's order."""
    lay = lw.layout
    order = lay.stack + lay.inputs + lay.outputs
    axes = tuple(order.index(k) for k in range(len(order)))
    meta = Meta(float(lw.scale), axes, len(lay.stack), len(lay.inputs), len(lay.outputs), path)
    return Lazy(lw.w, lw.a, lw.b, meta)


def from_weight(lw: LoraWeight, path: str) -> Lazy:
    """Start a lazy value for the interpreter: the base takes no gradient."""
    z = as_lazy(lw, path)
    return Lazy(lax.stop_gradient(z.w), z.a, z.b, z.meta)


def letters(meta: Meta, value_letters: str) -> tuple[str, str]:
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


def delta_value(z: Lazy, dtype) -> jax.Array:
    """``scale · a ⊗_r b`` in the value's axis order, in ``dtype``."""
    m = z.meta
    rank = z.a.shape[-1]
    if rank > UNROLL_RANK or not (m.ni and m.no):
        vl = LETTERS[:len(m.axes)]
        sa, sb = letters(m, vl)
        d = jnp.einsum(f"{sa},{sb}->{vl}", z.a, z.b, preferred_element_type=dtype)
        return d.astype(dtype) * jnp.asarray(m.scale, dtype)
    a = z.a.astype(dtype) * jnp.asarray(m.scale, dtype)
    b = z.b.astype(dtype)
    ns, ni, no = m.ns, m.ni, m.no
    canon = a.shape[:-1] + b.shape[ns + 1:]
    # a's rank slice broadcasts along the first out axis, b's along the first in axis
    a_dims = tuple(range(ns + ni)) + (ns + ni,)
    b_dims = tuple(range(ns)) + (ns,) + tuple(range(ns + ni, ns + ni + no))
    d = None
    for r in range(rank):
        ar = lax.broadcast_in_dim(lax.slice_in_dim(a, r, r + 1, axis=a.ndim - 1), canon, a_dims)
        br = lax.broadcast_in_dim(lax.slice_in_dim(b, r, r + 1, axis=ns), canon, b_dims)
        d = ar * br if d is None else d + ar * br
    return lax.transpose(d, m.axes)


def materialize(z: Lazy) -> jax.Array:
    """The dense value ``w + ΔW`` in ``w``'s dtype (accumulated in at least float32)."""
    return add_delta(z.w, delta_value(z, jnp.promote_types(z.w.dtype, jnp.float32)))


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


# ---------------------------------------------------------------- structure
def cast(z: Lazy, dtype) -> Lazy:
    return Lazy(z.w.astype(dtype), z.a.astype(dtype), z.b.astype(dtype), z.meta)


def transpose(z: Lazy, perm) -> Lazy:
    meta = z.meta._replace(axes=tuple(z.meta.axes[p] for p in perm))
    return Lazy(jnp.transpose(z.w, perm), z.a, z.b, meta)


def _split_canon(meta: Meta, a_shape, b_shape):
    """Canonical sizes (stack, in, out) read off the factors."""
    s = tuple(a_shape[:meta.ns])
    i = tuple(a_shape[meta.ns:meta.ns + meta.ni])
    o = tuple(b_shape[meta.ns + 1:])
    return s, i, o


def _drop_units(z: Lazy) -> Lazy:
    """Remove size-1 value axes from the value and from the factors."""
    keep = [k for k, n in enumerate(z.w.shape) if n != 1]
    if len(keep) == len(z.w.shape):
        return z
    dropped = {z.meta.axes[k] for k in range(len(z.w.shape)) if k not in keep}
    m = z.meta
    s, i, o = _split_canon(m, z.a.shape, z.b.shape)
    canon = list(s + i + o)
    groups = [range(0, m.ns), range(m.ns, m.ns + m.ni), range(m.ns + m.ni, len(canon))]
    ns, ni, no = (sum(1 for c in g if c not in dropped) for g in groups)
    renum = {c: n for n, c in enumerate(c for c in range(len(canon)) if c not in dropped)}
    sizes = [canon[c] for c in range(len(canon)) if c not in dropped]
    a = z.a.reshape(tuple(sizes[:ns + ni]) + (z.a.shape[-1],))
    b = z.b.reshape(tuple(sizes[:ns]) + (z.a.shape[-1],) + tuple(sizes[ns + ni:]))
    axes = tuple(renum[m.axes[k]] for k in keep)
    w = z.w.reshape(tuple(z.w.shape[k] for k in keep))
    return Lazy(w, a, b, Meta(m.scale, axes, ns, ni, no, m.path))


def reshape_runs(old, new):
    """Pair runs of ``old`` axes with runs of ``new`` axes of equal product (no 1s in old)."""
    nj = [k for k, n in enumerate(new) if n != 1]
    blocks, p, q = [], 0, 0
    while p < len(old):
        if q >= len(nj):
            return None
        po, pn, so, sn = [p], [nj[q]], old[p], new[nj[q]]
        p, q = p + 1, q + 1
        while so != sn:
            if so < sn and p < len(old):
                po.append(p); so *= old[p]; p += 1
            elif sn < so and q < len(nj):
                pn.append(nj[q]); sn *= new[nj[q]]; q += 1
            else:
                return None
        blocks.append((po, pn))
    return blocks if q == len(nj) else None


def reshape(z: Lazy, new_shape) -> Lazy | None:
    """Reshape keeping the factored form, or None when a run mixes roles."""
    new_shape = tuple(int(n) for n in new_shape)
    z = _drop_units(z)
    m, old = z.meta, tuple(z.w.shape)
    blocks = reshape_runs(old, new_shape)
    if not blocks:
        return None
    # a new size-1 axis joins the block whose span holds it, else the one before it
    owned = {j for _, pn in blocks for j in pn}
    for j in range(len(new_shape)):
        if j in owned:
            continue
        holder = [bi for bi, (_, pn) in enumerate(blocks) if pn[0] < j]
        blocks[holder[-1] if holder else 0][1].append(j)
    for po, pn in blocks:
        pn.sort()
        if pn != list(range(pn[0], pn[-1] + 1)):
            return None
    segs = []  # (canonical start, role, new axes)
    for po, pn in blocks:
        canon = [m.axes[k] for k in po]
        roles = {m.role(k) for k in po}
        if len(roles) != 1 or canon != list(range(canon[0], canon[0] + len(canon))):
            return None
        segs.append((canon[0], roles.pop(), pn))
    segs.sort()
    new_axes, sizes, counts = {}, [], {"s": 0, "i": 0, "o": 0}
    for _, role, pn in segs:
        for j in pn:
            new_axes[j] = len(sizes)
            sizes.append(new_shape[j])
            counts[role] += 1
    ns, ni = counts["s"], counts["i"]
    r = z.a.shape[-1]
    a = z.a.reshape(tuple(sizes[:ns + ni]) + (r,))
    b = z.b.reshape(tuple(sizes[:ns]) + (r,) + tuple(sizes[ns + ni:]))
    meta = Meta(m.scale, tuple(new_axes[j] for j in range(len(new_shape))), ns, ni, counts["o"], m.path)
    return Lazy(z.w.reshape(new_shape), a, b, meta)


def _stack_index(z: Lazy, per_axis):
    """Build per-factor index tuples from a per-value-axis list over stack axes only."""
    m = z.meta
    by_canon = {m.axes[k]: per_axis[k] for k in range(len(m.axes)) if m.role(k) == "s"}
    return [by_canon[c] for c in range(m.ns)]


def slice_stack(z: Lazy, start, limit, strides) -> Lazy | None:
    """Static slice that touches stack axes only."""
    m, shape = z.meta, z.w.shape
    strides = strides or (1,) * len(shape)
    for k in range(len(shape)):
        full = start[k] == 0 and limit[k] == shape[k] and strides[k] == 1
        if m.role(k) != "s" and not full:
            return None
    sl = _stack_index(z, [slice(s, l, st) for s, l, st in zip(start, limit, strides)])
    w = lax.slice(z.w, start, limit, strides)
    return Lazy(w, z.a[tuple(sl)], z.b[tuple(sl)], m)


def dynamic_slice_stack(z: Lazy, starts, sizes) -> Lazy | None:
    """Dynamic slice that touches stack axes only."""
    m, shape = z.meta, z.w.shape
    for k in range(len(shape)):
        if m.role(k) != "s" and sizes[k] != shape[k]:
            return None
    s_starts = _stack_index(z, list(starts))
    s_sizes = _stack_index(z, list(sizes))
    zero = jnp.zeros((), jnp.result_type(*starts) if starts else jnp.int32)
    a_start = s_starts + [zero] * (z.a.ndim - m.ns)
    b_start = s_starts + [zero] * (z.b.ndim - m.ns)
    a = lax.dynamic_slice(z.a, a_start, tuple(s_sizes) + z.a.shape[m.ns:])
    b = lax.dynamic_slice(z.b, b_start, tuple(s_sizes) + z.b.shape[m.ns:])
    w = lax.dynamic_slice(z.w, starts, sizes)
    return Lazy(w, a, b, m)


def unstack_leading(z: Lazy) -> tuple[tuple, Meta] | None:
    """Children stacked along axis 0 for ``scan`` xs, and the per-slice meta.

    Needs value axis 0 to be a stack axis; the factors are rearranged so that
    that axis is their leading axis too.
    """
    m = z.meta
    if not m.axes or m.role(0) != "s":
        return None
    c = m.axes[0]
    a, b = jnp.moveaxis(z.a, c, 0), jnp.moveaxis(z.b, c, 0)
    # moving canonical axis c to the front and slicing it off shifts the ones after it down
    fixed = tuple((x - 1) if x > c else x for x in m.axes[1:])
    meta = Meta(m.scale, fixed, m.ns - 1, m.ni, m.no, m.path)
    return (z.w, a, b), meta


def add_delta(w, d):
    """``w + d`` in ``w``'s dtype, accumulated in ``d``'s dtype."""
    return _add_keeping_zero_sign(w.astype(d.dtype), sharded_like(d, w)).astype(w.dtype)


def sharded_like(d, w):
    """``d`` with ``w``'s sharding where ``w`` is sharded over explicit mesh axes.

    There JAX types shardings, and ``d`` (built from the factors) would carry
    the factors' spec, which the elementwise sum with ``w`` refuses; elsewhere
    sharding is XLA's to propagate and ``d`` is returned as it is.
    """
    want = getattr(jax.typeof(w), "sharding", None)
    mesh = getattr(want, "mesh", None)
    if mesh is None or mesh.empty or jax.sharding.AxisType.Explicit not in mesh.axis_types:
        return d
    if jax.typeof(d).sharding.spec == want.spec:
        return d
    return jax.sharding.reshard(d, want)


@jax.custom_jvp
def _add_keeping_zero_sign(w, d):
    # where d is zero the sum is w itself, so a -0.0 in the base survives a zero
    # update bit for bit (-0.0 + 0.0 would give +0.0)
    return jnp.where(d == 0, w, w + d)


# differentiate it as the plain sum: a `where` would block the gradient at d == 0 (b = 0)
_add_keeping_zero_sign.defjvps(lambda t, ans, w, d: t, lambda t, ans, w, d: t)
