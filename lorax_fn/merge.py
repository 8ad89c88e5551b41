"""Between LoRA trees and dense trees: `merge`, `base`, `adapters`, `attach`."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from . import checks
from . import lazy as lz
from .errors import StructureError
from .paths import path_str
from .quant.array import is_quantized
from .quant.tree import dequantize
from .weight import is_lora, is_node


def merge(tree: Any, *, donate: bool = False, dtype: Any = None) -> Any:
    """Fold every adapter into its base: ``w + scale·a⊗b`` in ``w``'s dtype (or ``dtype``).

    A merge is only as exact as the dtype it lands in. LoRA updates are small
    next to their weights, and a bfloat16 weight keeps 8 significant bits: in
    a probe, merging into bfloat16 bases lost 68% of an update whose size was
    0.16% of the weight's (13% in float16). The unmerged model (``lora(fn)``
    on the tree) computes the update in the adapters' dtype and loses none of
    it; pass ``dtype=jnp.float32`` to get the trained model exactly as a dense
    tree.

    Args:
      tree: a pytree with :class:`LoraWeight` nodes (other leaves pass through).
        Quantised bases and :class:`QuantizedArray` leaves are dequantised
        (to ``dtype``, else their own), then merged; ``donate`` is then moot.
      donate: write each merged weight into its base weight's buffer instead of
        a new one (``jax.jit`` buffer donation), so switching to inference takes
        no second copy of the adapted weights. The adapted ``w`` arrays of
        ``tree`` are deleted by the call (and with them the params
        :func:`lorafy` was given, which share those arrays); ``a``, ``b`` and
        every other leaf stay valid. A base shared by several adapters is
        donated once; one that is also a plain leaf of ``tree`` is not donated.
        JAX copies instead of donating a buffer it cannot take (one with a
        live NumPy view, say); the result is the same. Ignored when an array of
        an adapted weight is being traced (under ``jit``, ``grad``, ``vmap`` …
        of it), where the caller's transformation decides.
      dtype: the floating-point dtype of the merged weights (e.g.
        ``jnp.float32`` for a bfloat16 base, so that the update is not
        rounded away); other leaves keep theirs. Default: each base's dtype.

    Returns:
      The dense pytree with the original structure, shapes and dtypes; jittable.
      With ``b = 0`` (fresh from :func:`lorafy`) it equals the original bit for bit.

    Raises:
      StructureError: a ``LoraWeight`` has no base (an :func:`adapters` tree;
        use :func:`attach` first) or its base was already deleted (by an
        earlier ``donate=True``); the message names the path.
      ArgumentError: ``dtype`` is not a floating-point dtype.

    Example:
        >>> import jax.numpy as jnp, lorax_fn as lf
        >>> p = {"w": jnp.ones((3, 2))}
        >>> bool((lf.merge(lf.lorafy(p, rank=1))["w"] == p["w"]).all())
        True
        >>> lp = lf.lorafy({"w": jnp.ones((3, 2))}, rank=1)
        >>> dense = lf.merge(lp, donate=True)   # lp["w"].w is consumed
        >>> lp["w"].w.is_deleted()
        True
    """
    if any(is_quantized(x) or (is_lora(x) and is_quantized(x.w))
           for x in jax.tree.leaves(tree, is_leaf=is_node)):
        # codes are no buffer a dense weight can take over: dequantise, then merge without donation
        return merge(dequantize(tree, dtype), dtype=dtype)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_lora)
    nodes = [(path_str(k), x) for k, x in leaves if is_lora(x)]
    for path, x in nodes:
        _check_base(path, x)
    if dtype is not None:
        dt = checks.float_dtype(dtype)
        # the cast copies any base of another dtype, so donate=True then consumes only that copy
        return merge(treedef.unflatten([x.replace(w=x.w.astype(dt)) if is_lora(x) else x for _, x in leaves]),
                     donate=donate)
    if not (donate and nodes) or any(isinstance(t, jax.core.Tracer)
                                     for _, x in nodes for t in jax.tree.leaves(x)):
        return treedef.unflatten([_merged(x) if is_lora(x) else x for _, x in leaves])
    plain = {id(x) for _, x in leaves if not is_lora(x)}
    # each distinct base buffer is passed once; a plain leaf's buffer is not donated
    given, kept, where = {}, {}, []
    for _, x in nodes:
        bucket = kept if id(x.w) in plain else given
        where.append((bucket is given, bucket.setdefault(id(x.w), (len(bucket), x.w))[0]))
    merged = iter(_merge_into_bases([w for _, w in given.values()], [w for _, w in kept.values()],
                                    [x.replace(w=None) for _, x in nodes], tuple(where)))
    return treedef.unflatten([next(merged) if is_lora(x) else x for _, x in leaves])


def _check_base(path: str, x) -> None:
    if x.w is None:
        raise StructureError(f"'{path}': this LoraWeight has no base weight (an adapters-only "
                             "tree?); put the adapters back on a base with attach(base, adapters)")
    if isinstance(x.w, jax.Array) and not isinstance(x.w, jax.core.Tracer) and x.w.is_deleted():
        raise StructureError(f"'{path}': the base weight was deleted, e.g. donated by an earlier "
                             "merge(..., donate=True)")


def _merged(x):
    return lz.materialize(lz.as_lazy(x))


# only distinct bases are donated: the factors never fit an output, and other
# leaves pass through untouched instead of being consumed
@functools.partial(jax.jit, donate_argnums=0, static_argnums=3)
def _merge_into_bases(donated, kept, factors, where):
    ws = [(donated if d else kept)[k] for d, k in where]
    return [_merged(f.replace(w=w)) for w, f in zip(ws, factors)]


def base(tree: Any) -> Any:
    """The frozen base: every :class:`LoraWeight` replaced by its ``w``.

    Example:
        >>> import jax.numpy as jnp, lorax_fn as lf
        >>> lf.base(lf.lorafy({"w": jnp.ones((3, 2))}, rank=1))["w"].shape
        (3, 2)
    """
    return jax.tree.map(lambda x: x.w if is_lora(x) else x, tree, is_leaf=is_lora)


def adapters(tree: Any) -> Any:
    """Only the adapters: ``LoraWeight(w=None, a, b)`` nodes (each kind's trainable children), every other leaf ``None``.

    ``jax.tree.leaves(adapters(tree))`` lists exactly the adapter arrays.

    Example:
        >>> import jax, jax.numpy as jnp, lorax_fn as lf
        >>> ad = lf.adapters(lf.lorafy({"w": jnp.ones((3, 2)), "b": jnp.ones(2)}, rank=1))
        >>> [x.shape for x in jax.tree.leaves(ad)]
        [(3, 1), (1, 2)]
    """
    # every child but the trainable ones is dropped (a fully trained leaf keeps its w)
    return jax.tree.map(lambda x: x.replace(**{n: None for n in x.children if n not in x.trainable})
                        if is_lora(x) else None, tree, is_leaf=is_lora)


def attach(base_tree: Any, adapter_tree: Any) -> Any:
    """Put adapters (from :func:`adapters`) back onto a base tree.

    Args:
      base_tree: dense params of the original structure.
      adapter_tree: the output of :func:`adapters` for a tree of that structure.

    Returns:
      The ``LoraWeight`` tree.

    Raises:
      StructureError: the trees do not line up, or an adapter does not fit its
        base weight's shape (the message names the path and both shapes).

    Example:
        >>> import jax.numpy as jnp, lorax_fn as lf
        >>> p = {"w": jnp.ones((3, 2))}
        >>> lp = lf.attach(p, lf.adapters(lf.lorafy(p, rank=1)))
        >>> lp["w"].rank
        1
    """
    is_leaf = lambda x: x is None or is_lora(x)  # noqa: E731
    flat_a = jax.tree_util.tree_flatten_with_path(adapter_tree, is_leaf=is_leaf)[0]
    flat_b, tdef_b = jax.tree_util.tree_flatten_with_path(base_tree, is_leaf=is_leaf)
    paths_a = [path_str(kp) for kp, _ in flat_a]
    paths_b = [path_str(kp) for kp, _ in flat_b]
    if paths_a != paths_b:
        first = next((f"'{x}' vs '{y}'" for x, y in zip(paths_a, paths_b) if x != y),
                     f"{len(paths_a)} adapter leaves vs {len(paths_b)} base leaves")
        raise StructureError(f"adapters and base have different structures; first difference: {first}")
    out = []
    for (kp, ad), (_, w) in zip(flat_a, flat_b):
        if not is_lora(ad):
            out.append(w)
            continue
        path = path_str(kp)
        if is_lora(w):
            raise StructureError(f"base leaf '{path}' already carries an adapter")
        if not jnp.issubdtype(jnp.result_type(w), jnp.floating):
            raise StructureError(f"base leaf '{path}' is {jnp.result_type(w)}, not floating point")
        want = tuple(jnp.shape(w))
        n_axes = len(ad.layout.stack + ad.layout.inputs + ad.layout.outputs)
        need = type(ad).child_shapes(want, ad.config) if len(want) == n_axes else None
        have = {n: tuple(jnp.shape(getattr(ad, n))) for n in ad.children[1:]}
        if "w" in ad.trainable and tuple(jnp.shape(ad.w)) != want:  # a fully trained leaf carries its own w
            need = None
        if need is None or have != {n: tuple(s) for n, s in need.items()}:
            shown = ", ".join(f"{n} {s}" for n, s in have.items())
            raise StructureError(f"adapter at '{path}' ({shown}) does not fit base shape {want}")
        out.append(ad if "w" in ad.trainable else ad.replace(w=w))
    return jax.tree_util.tree_unflatten(tdef_b, out)
