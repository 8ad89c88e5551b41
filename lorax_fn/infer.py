"""Layout inference: read how a function uses each weight from its jaxpr.

``infer_layouts(fn, params)`` traces ``fn(params)`` abstractly and follows every
floating leaf of ``params`` through casts, transposes, reshapes, slices and into
``jit``/``scan``/``cond``/``while``/``checkpoint``/custom-derivative bodies. At a
``dot_general`` the weight's contracting axes are its ``in`` axes and batch axes
are ``stack`` axes; at a convolution the input-feature and spatial axes are
``in``; at a row ``gather`` the indexed axes are ``in``; an axis that ``scan``
slices is a ``stack`` axis. No FLOPs are spent.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.extend.core import Literal

from .lazy import reshape_runs
from .weight import Layout, default_layout


class Track(NamedTuple):
    """A value derived from leaf ``leaf``: ``axmap[k]`` = leaf axes behind value axis k."""

    leaf: int
    axmap: tuple[frozenset, ...]
    stacked: frozenset  # leaf axes sliced away (stack axes)


class Seen(NamedTuple):
    stack: frozenset
    inputs: frozenset
    outputs: frozenset
    primitive: str = ""  # the consuming primitive


def _sub(j):
    if hasattr(j, "jaxpr") and hasattr(j, "consts"):
        return j.jaxpr
    return j


def _walk(jaxpr, tracks: list, seen: dict) -> list:
    env: dict = {}
    for v, t in zip(jaxpr.invars, tracks):
        if t is not None:
            env[v] = t

    def get(v):
        return None if isinstance(v, Literal) else env.get(v)

    for eqn in jaxpr.eqns:
        ins = [get(v) for v in eqn.invars]
        if not any(t is not None for t in ins):
            continue
        outs = _step(eqn, ins, seen)
        for v, t in zip(eqn.outvars, outs or []):
            if t is not None:
                env[v] = t
    return [get(v) for v in jaxpr.outvars]


def _observe(seen, t: Track, inputs, stack=frozenset(), primitive: str = ""):
    all_axes = frozenset().union(*t.axmap) if t.axmap else frozenset()
    stack = frozenset(stack) | t.stacked
    inputs = frozenset(inputs) - stack
    outputs = all_axes - inputs - stack
    if inputs and outputs:  # else an activation derived from the weight (a looked-up row)
        seen.setdefault(t.leaf, []).append(Seen(stack, inputs, outputs, primitive))


def _axes(t: Track, ks) -> frozenset:
    return frozenset().union(*(t.axmap[k] for k in ks)) if ks else frozenset()


def _reshape_track(t: Track, old, new) -> Track | None:
    """Follow a reshape: each new axis stands for the old axes of its row-major run."""
    keep = [k for k, n in enumerate(old) if n != 1]
    blocks = reshape_runs([old[k] for k in keep], tuple(new))
    if blocks is None:
        return None
    axmap = [frozenset()] * len(new)
    for po, pn in blocks:
        for j in pn:
            axmap[j] = _axes(t, [keep[i] for i in po])
    # a size-1 axis squeezed away was sliced out of a stack (``params[i]``)
    gone = _axes(t, [k for k, n in enumerate(old) if n == 1])
    return t._replace(axmap=tuple(axmap), stacked=t.stacked | gone)


def _step(eqn, ins, seen):
    name = eqn.primitive.name
    p = eqn.params
    t = ins[0]
    if name in ("convert_element_type", "copy", "copy_p", "sharding_constraint", "reduce_precision",
                "optimization_barrier"):
        return ins if eqn.primitive.multiple_results else [t]
    if name == "transpose" and t is not None:
        return [t._replace(axmap=tuple(t.axmap[k] for k in p["permutation"]))]
    if name in ("reshape", "squeeze", "expand_dims") and t is not None:
        return [_reshape_track(t, eqn.invars[0].aval.shape, eqn.outvars[0].aval.shape)]
    if name == "broadcast_in_dim" and t is not None:
        dims = p["broadcast_dimensions"]
        axmap = [frozenset()] * len(p["shape"])
        for k, d in enumerate(dims):
            axmap[d] = t.axmap[k]
        return [t._replace(axmap=tuple(axmap))]
    if name in ("slice", "dynamic_slice") and t is not None:
        return [t]
    if name == "dot_general":
        (lc, rc), (lb, rb) = p["dimension_numbers"]
        for t2, c, b in ((ins[0], lc, lb), (ins[1], rc, rb)):
            if t2 is not None:
                _observe(seen, t2, _axes(t2, c), _axes(t2, b), "dot_general")
        return [None]
    if name == "conv_general_dilated":
        rt = ins[1]
        if rt is not None:
            spec = p["dimension_numbers"].rhs_spec
            _observe(seen, rt, _axes(rt, [spec[1], *spec[2:]]), primitive="conv_general_dilated")
        return [None]
    if name == "gather" and t is not None:
        dn = p["dimension_numbers"]
        indexed = sorted(set(dn.start_index_map) | set(dn.collapsed_slice_dims))
        _observe(seen, t, _axes(t, indexed), primitive="gather")  # read as a row lookup (an embedding)
        # the rows may be weights themselves (experts[ids]): follow them, indexed axes stacked
        kept = [k for k in range(len(t.axmap)) if k not in dn.collapsed_slice_dims]
        axmap = [frozenset()] * len(eqn.outvars[0].aval.shape)
        for d, k in zip(dn.offset_dims, kept):
            axmap[d] = t.axmap[k]
        return [t._replace(axmap=tuple(axmap), stacked=t.stacked | _axes(t, indexed))]
    if name in ("jit", "pjit", "closed_call", "core_call", "checkpoint", "remat", "remat2"):
        return _walk(_sub(p["jaxpr"]), ins, seen)
    if name in ("custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr"):
        _walk(_sub(p["call_jaxpr"]), ins, seen)
        return [None] * len(eqn.outvars)
    if name == "shard_map":
        _walk(_sub(p["jaxpr"]), ins, seen)
        return [None] * len(eqn.outvars)
    if name == "scan":
        nc, ncar = p["num_consts"], p["num_carry"]
        inner = list(ins[:nc]) + [None] * ncar
        for x in ins[nc + ncar:]:
            inner.append(None if x is None or not x.axmap else
                         x._replace(axmap=x.axmap[1:], stacked=x.stacked | x.axmap[0]))
        _walk(_sub(p["jaxpr"]), inner, seen)
        return [None] * len(eqn.outvars)
    if name == "cond":
        for br in p["branches"]:
            _walk(_sub(br), ins[1:], seen)
        return [None] * len(eqn.outvars)
    if name == "while":
        cn, bn = p["cond_nconsts"], p["body_nconsts"]
        ncarry = len(ins) - cn - bn
        _walk(_sub(p["cond_jaxpr"]), list(ins[:cn]) + [None] * ncarry, seen)
        _walk(_sub(p["body_jaxpr"]), list(ins[cn:cn + bn]) + [None] * ncarry, seen)
        return [None] * len(eqn.outvars)
    return [None] * len(eqn.outvars)


def observe(fn: Callable[[Any], Any], params: Any, is_leaf=None) -> dict[int, list[Seen]]:
    """Per flat leaf index of ``params``: how ``fn(params)`` contracts it."""
    leaves, treedef = jax.tree_util.tree_flatten(params, is_leaf=is_leaf)
    avals = [jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)) for x in leaves]

    def flat(*xs):
        return fn(jax.tree_util.tree_unflatten(treedef, list(xs)))

    closed = jax.make_jaxpr(flat)(*avals)
    tracks = [Track(i, tuple(frozenset([k]) for k in range(len(a.shape))), frozenset())
              if jnp.issubdtype(a.dtype, jnp.floating) and len(a.shape) >= 1 else None
              for i, a in enumerate(avals)]
    seen: dict = {}
    _walk(closed.jaxpr, tracks, seen)
    return seen


def choose(ndim: int, uses: list[Seen]) -> tuple[Layout | None, list]:
    """One layout that serves the observed uses (None when no use contracts the leaf),
    and the uses it cannot serve low-rank.

    Uses that disagree only by swapping ``in`` and ``out`` (a tied embedding looked
    up by rows and multiplied by its transpose) are both served at run time, so
    the one agreeing with the default rule wins.
    """
    stack = frozenset().union(*(u.stack for u in uses)) if uses else frozenset()
    cands = []
    for u in uses:
        ins, outs = u.inputs - stack, u.outputs - stack
        if ins and outs:
            cands.append((tuple(sorted(ins)), tuple(sorted(outs))))
    if not cands:
        return None, []
    dflt = default_layout(ndim - len(stack))
    rest = [k for k in range(ndim) if k not in stack]
    dflt_in = tuple(rest[k] for k in dflt.inputs)
    ins, outs = next((c for c in cands if c[0] == dflt_in), cands[0])
    unserved = [c for c in cands if c not in ((ins, outs), (outs, ins))]
    return Layout(tuple(sorted(stack)), ins, outs), unserved
