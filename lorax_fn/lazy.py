"""The interpreter's lazy adapted value: a base ``w`` plus a kind's children, unmerged.

A ``Lazy`` is what an adapter node (a ``LoraWeight``, a ``DoraWeight`` …)
becomes inside :func:`lorax_fn.lora` after structural operations (casts,
transposes, reshapes, slices of stacked layers). Its axes keep their roles:
every value axis maps to one *canonical* axis, and the canonical order is
``stack + in + out``. Each child is laid out by its kind's signature (LoRA:
``a: stack + in + (r,)``, ``b: stack + (r,) + out``), so the structural
operations here move children without knowing the kind; only the kind knows
the value (``kind.dense``).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from .quant.array import QuantizedArray, reshaped as _quant_reshaped


class Meta(NamedTuple):
    """Static part of a lazy value."""

    kind: type  # the adapter node's class: its hooks and child signatures
    static: tuple  # the node's static fields, in ``kind.static`` order
    axes: tuple[int, ...]  # value axis k is canonical axis axes[k]
    ns: int
    ni: int
    no: int
    path: str

    @property
    def config(self) -> dict:
        return dict(zip(self.kind.static, self.static))

    def role(self, k: int) -> str:
        """'s', 'i' or 'o' for value axis k."""
        c = self.axes[k]
        return "s" if c < self.ns else ("i" if c < self.ns + self.ni else "o")

    def value_axes(self, role: str) -> tuple[int, ...]:
        return tuple(k for k in range(len(self.axes)) if self.role(k) == role)


@jax.tree_util.register_pytree_node_class
class Lazy:
    """An adapted weight flowing through the interpreter (internal): the base
    ``w`` in value order, the kind's other children by their signatures."""

    __slots__ = ("w", "parts", "meta")

    def __init__(self, w, parts, meta: Meta):
        self.w, self.parts, self.meta = w, tuple(parts), meta

    def tree_flatten(self):
        return (self.w,) + self.parts, self.meta

    @classmethod
    def tree_unflatten(cls, meta, children):
        return cls(children[0], children[1:], meta)

    def __getattr__(self, name):
        names = self.meta.kind.children[1:]
        if name in names:
            return self.parts[names.index(name)]
        raise AttributeError(name)

    def child(self, name):
        return self.parts[self.meta.kind.children.index(name) - 1]

    def with_parts(self, w, parts, meta=None) -> "Lazy":
        return Lazy(w, parts, self.meta if meta is None else meta)

    def signatures(self):
        kind = self.meta.kind
        return [kind.axes[n] for n in kind.children[1:]]

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
        return f"Lazy({self.meta.kind.kind}, {self.meta.path}, shape={self.w.shape}, axes={self.meta.axes})"


def as_lazy(node, path: str = "") -> Lazy:
    """The lazy value of an adapter node, axes in the base weight's order."""
    lay = node.layout
    order = lay.stack + lay.inputs + lay.outputs
    axes = tuple(order.index(k) for k in range(len(order)))
    kind = type(node)
    meta = Meta(kind, node._static, axes, len(lay.stack), len(lay.inputs), len(lay.outputs), path)
    return Lazy(node.w, [getattr(node, n) for n in kind.children[1:]], meta)


def from_weight(node, path: str) -> Lazy:
    """Start a lazy value for the interpreter: the base takes no gradient."""
    z = as_lazy(node, path)
    return Lazy(lax.stop_gradient(z.w), z.parts, z.meta)


# ------------------------------------------------------- child signatures
def _segments(sig: str, ns: int, ni: int, no: int) -> list[tuple[str, int]]:
    """``(role, number of axes)`` per character of a child signature."""
    count = {"s": ns, "i": ni, "o": no}
    return [(c, count.get(c, 1)) for c in sig]


def child_shape(sig: str, x_shape, m: Meta, s, i, o) -> tuple:
    """The shape of a child of signature ``sig`` (now ``x_shape`` under ``m``) for canonical sizes s, i, o."""
    out, pos = [], 0
    new = {"s": tuple(s), "i": tuple(i), "o": tuple(o)}
    for role, n in _segments(sig, m.ns, m.ni, m.no):
        out.extend(new[role] if role in new else x_shape[pos:pos + n])
        pos += n
    return tuple(out)


def child_axes(sig: str, m: Meta) -> list[tuple[str, int]]:
    """For each axis of a child: (role or own letter, canonical index or -1)."""
    out = []
    start = {"s": 0, "i": m.ns, "o": m.ns + m.ni}
    for role, n in _segments(sig, m.ns, m.ni, m.no):
        for j in range(n):
            out.append((role, start[role] + j) if role in start else (role, -1))
    return out


def canonical_sizes(z: Lazy) -> tuple[tuple, tuple, tuple]:
    """Canonical sizes (stack, in, out) of a lazy value."""
    canon = [0] * len(z.meta.axes)
    for k, c in enumerate(z.meta.axes):
        canon[c] = z.w.shape[k]
    m = z.meta
    return tuple(canon[:m.ns]), tuple(canon[m.ns:m.ns + m.ni]), tuple(canon[m.ns + m.ni:])


def canonical(z: Lazy, x):
    """A value-order array (such as ``w``) in canonical order ``stack + in + out``."""
    inv = [0] * len(z.meta.axes)
    for k, c in enumerate(z.meta.axes):
        inv[c] = k
    return jnp.transpose(x, inv)


def to_value(z: Lazy, x):
    """A canonical-order array in the value's axis order."""
    return jnp.transpose(x, z.meta.axes)


def materialize(z: Lazy) -> jax.Array:
    """The dense value of ``z`` (``w + ΔW`` for LoRA) in ``w``'s dtype, from its kind."""
    return z.meta.kind.dense(dense_base(z))


# ------------------------------------------------------------ quantised bases
# A QuantizedArray base stays coded through the structural operations that keep
# its slices whole (casts, reshapes, slices and scans over its leading axes), so
# that a scanned stack is dequantised one layer at a time, inside the consuming
# rule; any other operation dequantises it first (the dense value of one use).
def dense_base(z: Lazy) -> Lazy:
    """``z`` with a quantised base dequantised (to the base's current dtype)."""
    if isinstance(z.w, QuantizedArray):
        return z.with_parts(z.w.dequantize(), z.parts)
    return z


def _reshape_w(w, shape):
    if isinstance(w, QuantizedArray):
        view = _quant_reshaped(w, shape)
        return view if view is not None else w.dequantize().reshape(shape)
    return w.reshape(shape)


def _lead_only(w, touched) -> bool:
    """True when every value axis in ``touched`` is one of a quantised base's separately coded axes."""
    return all(k < w.lead for k in touched)


# ---------------------------------------------------------------- structure
def cast(z: Lazy, dtype) -> Lazy:
    # integer children (indices, seeds) keep their type; floating ones follow the value
    parts = [p.astype(dtype) if jnp.issubdtype(p.dtype, jnp.floating) else p for p in z.parts]
    return z.with_parts(z.w.astype(dtype), parts)


def transpose(z: Lazy, perm) -> Lazy:
    if tuple(perm) != tuple(range(len(perm))):
        z = dense_base(z)
    meta = z.meta._replace(axes=tuple(z.meta.axes[p] for p in perm))
    return z.with_parts(jnp.transpose(z.w, perm), z.parts, meta)


def _reshaped(z: Lazy, w, sizes, ns: int, ni: int, axes) -> Lazy:
    """``z`` with value ``w``, canonical sizes ``sizes`` split ``ns``/``ni``/rest, children reshaped."""
    m = z.meta
    s, i, o = sizes[:ns], sizes[ns:ns + ni], sizes[ns + ni:]
    parts = [p.reshape(child_shape(sig, p.shape, m, s, i, o)) for p, sig in zip(z.parts, z.signatures())]
    meta = m._replace(axes=tuple(axes), ns=ns, ni=ni, no=len(sizes) - ns - ni)
    return z.with_parts(w, parts, meta)


def _drop_units(z: Lazy) -> Lazy:
    """Remove size-1 value axes from the value and from the children."""
    keep = [k for k, n in enumerate(z.w.shape) if n != 1]
    if len(keep) == len(z.w.shape):
        return z
    m = z.meta
    dropped = {m.axes[k] for k in range(len(z.w.shape)) if k not in keep}
    s, i, o = canonical_sizes(z)
    canon = list(s + i + o)
    groups = [range(0, m.ns), range(m.ns, m.ns + m.ni), range(m.ns + m.ni, len(canon))]
    ns, ni, _ = (sum(1 for c in g if c not in dropped) for g in groups)
    renum = {c: n for n, c in enumerate(c for c in range(len(canon)) if c not in dropped)}
    sizes = [canon[c] for c in range(len(canon)) if c not in dropped]
    axes = tuple(renum[m.axes[k]] for k in keep)
    w = _reshape_w(z.w, tuple(z.w.shape[k] for k in keep))
    return _reshaped(z, w, sizes, ns, ni, axes)


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
    axes = tuple(new_axes[j] for j in range(len(new_shape)))
    return _reshaped(z, _reshape_w(z.w, new_shape), sizes, counts["s"], counts["i"], axes)


def _stack_index(z: Lazy, per_axis):
    """Per-canonical-stack-axis entries from a per-value-axis list (stack axes only)."""
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
    sl = tuple(_stack_index(z, [slice(s, l, st) for s, l, st in zip(start, limit, strides)]))
    if isinstance(z.w, QuantizedArray):
        touched = [k for k in range(len(shape)) if (start[k], limit[k], strides[k]) != (0, shape[k], 1)]
        if _lead_only(z.w, touched):
            lead = tuple(slice(start[k], limit[k], strides[k]) for k in range(z.w.lead))
            return z.with_parts(z.w.with_children(lambda c: c[lead]), [p[sl] for p in z.parts])
        z = dense_base(z)
    w = lax.slice(z.w, start, limit, strides)
    # every child signature starts with the stack axes
    return z.with_parts(w, [p[sl] for p in z.parts])


def dynamic_slice_stack(z: Lazy, starts, sizes) -> Lazy | None:
    """Dynamic slice that touches stack axes only."""
    m, shape = z.meta, z.w.shape
    for k in range(len(shape)):
        if m.role(k) != "s" and sizes[k] != shape[k]:
            return None
    s_starts = _stack_index(z, list(starts))
    s_sizes = tuple(_stack_index(z, list(sizes)))
    zero = jnp.zeros((), jnp.result_type(*starts) if starts else jnp.int32)
    parts = [lax.dynamic_slice(p, s_starts + [zero] * (p.ndim - m.ns), s_sizes + p.shape[m.ns:])
             for p in z.parts]
    w = z.w
    if isinstance(w, QuantizedArray):
        if not _lead_only(w, [k for k in range(len(shape)) if sizes[k] != shape[k]]):
            return z.with_parts(lax.dynamic_slice(w.dequantize(), starts, sizes), parts)
        n = w.lead
        return z.with_parts(w.with_children(lambda c: lax.dynamic_slice(
            c, list(starts[:n]) + [zero] * (c.ndim - n), tuple(sizes[:n]) + c.shape[n:])), parts)
    return z.with_parts(lax.dynamic_slice(w, starts, sizes), parts)


def unstack_leading(z: Lazy) -> tuple[tuple, Meta] | None:
    """Children stacked along axis 0 for ``scan`` xs, and the per-slice meta.

    Needs value axis 0 to be a stack axis; the children are rearranged so that
    that axis is their leading axis too.
    """
    m = z.meta
    if not m.axes or m.role(0) != "s":
        return None
    if isinstance(z.w, QuantizedArray) and not z.w.lead:
        z = dense_base(z)
    c = m.axes[0]
    parts = tuple(jnp.moveaxis(p, c, 0) for p in z.parts)
    # moving canonical axis c to the front and slicing it off shifts the ones after it down
    fixed = tuple((x - 1) if x > c else x for x in m.axes[1:])
    meta = m._replace(axes=fixed, ns=m.ns - 1)
    return (z.w,) + parts, meta


def child_specs(z: Lazy, value_spec) -> list:
    """PartitionSpecs of the children given one spec entry per value axis (own axes replicated)."""
    from jax.sharding import PartitionSpec as P

    full = tuple(value_spec) + (None,) * (len(z.meta.axes) - len(tuple(value_spec)))
    canon = [None] * len(z.meta.axes)
    for k, c in enumerate(z.meta.axes):
        canon[c] = full[k]
    return [P(*(canon[c] if c >= 0 else None for _, c in child_axes(sig, z.meta)))
            for sig in z.signatures()]


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
