"""Training only the adapters: `trainable_mask`, `optimizer`, `split`, `combine`."""

from __future__ import annotations

import warnings
from typing import Any

import jax
import jax.numpy as jnp
import optax

from .errors import NoAdapterWarning, StructureError
from .lorafy import Targets, _matcher
from .paths import key_str, leaves_with_paths
from .weight import is_lora


def _labels(tree: Any, trainable: Targets) -> Any:
    """True for every leaf that trains: each adapter's trainable children and leaves matched by ``trainable``."""
    extra = _matcher(trainable, "trainable")
    flat, treedef = leaves_with_paths(tree, is_leaf=is_lora)
    out = []
    for path, leaf in flat:
        if is_lora(leaf):
            # a child that is itself a tree (a quantised base) gets one flag per leaf
            out.append(leaf.replace(**{n: jax.tree.map(lambda _, t=n in leaf.trainable: t, getattr(leaf, n))
                                       for n in leaf.children}))
        else:
            out.append(bool(extra is not None and extra(path, leaf)))
    return jax.tree_util.tree_unflatten(treedef, out)


def trainable_mask(tree: Any, trainable: Targets = None) -> Any:
    """A bool pytree of ``tree``'s structure: True where a leaf trains.

    Args:
      tree: a LoRA tree from :func:`lorafy`.
      trainable: extra leaves to train in full (like PEFT ``modules_to_save``
        or biases): a path regex, a list of them, or ``predicate(path, leaf)``.

    Returns:
      ``LoraWeight(w=False, a=True, b=True)`` at LoRA adapters (each kind: True
      at its trainable children); True/False elsewhere.

    Example:
        >>> import jax, jax.numpy as jnp, lorax_fn as lf
        >>> lp = lf.lorafy({"w": jnp.ones((3, 2)), "bias": jnp.ones(2)}, rank=1)
        >>> jax.tree.leaves(lf.trainable_mask(lp, trainable="bias"))
        [True, False, True, True]
    """
    return _labels(tree, trainable)


def optimizer(tx: optax.GradientTransformation, tree: Any,
              trainable: Targets = None) -> optax.GradientTransformation:
    """Wrap ``tx`` so that only adapter leaves (and ``trainable`` ones) move.

    Built with ``optax.multi_transform``: trainable leaves go through ``tx``, the
    rest get an update of ``-0.0`` (like ``optax.set_to_zero()``, but adding it
    keeps even ``-0.0`` entries), so frozen leaves stay bit-identical and the
    optimizer state holds nothing for them.

    Put every other transformation *inside*: ``lf.optimizer(optax.MultiSteps(
    optax.adam(1e-3), k), lp)``, not ``optax.MultiSteps(lf.optimizer(...), k)``.
    A wrapper outside sees the frozen leaves' ``-0.0`` updates and may hand
    back ``+0.0`` instead (``MultiSteps`` does on every accumulation step, as
    does a negative ``optax.scale`` chained after), and ``-0.0 + 0.0`` is
    ``+0.0``: the frozen weights' negative zeros would flip. Inside, the
    wrapper only ever sees the trainable leaves.

    Args:
      tx: any Optax transformation (wrappers such as ``optax.MultiSteps`` included).
      tree: the LoRA tree from :func:`lorafy` (its structure decides the labels).
      trainable: extra fully-trained leaves, as in :func:`trainable_mask`.

    Returns:
      An ``optax.GradientTransformation`` over trees of ``tree``'s structure.

    Raises:
      StructureError: from ``init``/``update``, when given a tree of another
        structure than ``tree`` (the message names the first differing path).

    Warns:
      NoAdapterWarning: when no leaf of ``tree`` trains (it has no
        :class:`LoraWeight` and ``trainable`` matched nothing).

    Example:
        >>> import jax.numpy as jnp, optax, lorax_fn as lf
        >>> lp = lf.lorafy({"w": jnp.ones((3, 2))}, rank=1)
        >>> tx = lf.optimizer(optax.adam(1e-2), lp)
        >>> state = tx.init(lp)
        >>> accumulate = lf.optimizer(optax.MultiSteps(optax.adam(1e-2), every_k_schedule=4), lp)
        >>> state = accumulate.init(lp)
    """
    mask = _labels(tree, trainable)
    if not any(jax.tree.leaves(mask)):
        warnings.warn(_nothing_to_train(trainable), NoAdapterWarning, stacklevel=2)
    elif trainable is not None and not any(m for m in jax.tree.leaves(mask, is_leaf=is_lora) if not is_lora(m)):
        # the adapters train, but the leaves the caller meant to train in full silently stay frozen
        paths = [p for p, x in leaves_with_paths(tree, is_leaf=is_lora)[0] if not is_lora(x)]
        warnings.warn(f"trainable={trainable!r} matched no leaf, so only the adapters train (patterns are "
                      f"full-match regexes on '/'-joined paths); non-adapter paths: "
                      + ", ".join(f"'{p}'" for p in paths[:5]), UserWarning, stacklevel=2)
    labels = jax.tree.map(lambda m: "train" if m else "freeze", mask)

    def label_fn(params):
        if jax.tree.structure(params) != jax.tree.structure(labels):
            raise StructureError(_structure_message(labels, params))
        return labels

    return optax.multi_transform({"train": tx, "freeze": _freeze()}, label_fn)


def _nothing_to_train(trainable: Targets) -> str:
    extra = ("`trainable` matched no leaf either" if trainable is not None else
             "no `trainable=` was given")
    return ("lf.optimizer: no leaf of this tree trains, so every update will be zero: the tree holds "
            f"no LoraWeight and {extra}. Build the optimizer from the tree lorafy returned "
            "(`lp = lf.lorafy(params, ...)`, then `lf.optimizer(tx, lp)`); if that is this tree, "
            "lorafy found nothing to adapt (check its `targets`/`exclude`). To train plain leaves "
            "in full, pass trainable=... (a path regex such as '.*bias', or a predicate).")


def _structure_message(labels: Any, given: Any) -> str:
    where = _first_difference(labels, given, "")
    if where is None:   # defensive: the treedefs differ in something no path shows
        detail = "the two trees differ"
    else:
        path, want, got = where
        detail = f"at '{path or '<root>'}' the optimizer's tree has {want}, the tree given has {got}"
    return ("this optimizer was built for a tree of another structure: " + detail + " (first "
            "difference). Build the optimizer from the lorafied tree (`lf.optimizer(tx, lp)`) and "
            "pass that tree, or gradients of its structure, to `init` and `update`.")


def _children(x: Any) -> tuple[Any, list]:
    """``x``'s own pytree node (``None`` for a leaf) and its ``[(key, child)]``, one level down."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(x, is_leaf=lambda y: y is not x)
    node = treedef.node_data()
    return node, ([] if node is None else [(p[0], c) for p, c in flat])


def _describe(x: Any, node: Any, static: bool = False) -> str:
    if x is None:
        return "None"
    if is_lora(x):
        if static:
            return f"a {type(x).__name__} ({x._describe()}, layout {tuple(x.layout)})"
        return f"a {type(x).__name__}" + (f" (rank {x.rank})" if "rank" in x.static else "")
    return "an array leaf" if node is None else f"a {type(x).__name__}"


def _first_difference(built: Any, given: Any, path: str):
    """``(path, what built has, what given has)`` at the first place two trees part, else None.

    ``built`` is the optimizer's labels tree (strings where ``given`` has arrays), so
    leaves are compared as leaves; containers by type, then keys, then static data
    (a LoraWeight's rank or layout), then child by child.
    """
    node_b, kids_b = _children(built)
    node_g, kids_g = _children(given)
    if node_b is None and node_g is None:
        return None
    if node_b is None or node_g is None or node_b[0] is not node_g[0]:
        return path, _describe(built, node_b), _describe(given, node_g)
    join = lambda k: f"{path}/{key_str(k)}" if path else key_str(k)  # noqa: E731
    keys_b, keys_g = [k for k, _ in kids_b], [k for k, _ in kids_g]
    # an extra key first: for {"params": lp} against lp it names "params", not lp's first key
    for k, child in kids_g:
        if k not in keys_b:
            return join(k), "nothing", _describe(child, _children(child)[0])
    for k, child in kids_b:
        if k not in keys_g:
            return join(k), _describe(child, _children(child)[0]), "nothing"
    try:
        same_static = bool(node_b[1] == node_g[1])
    except (TypeError, ValueError):  # static data that does not compare (arrays): call it different
        same_static = False
    if not same_static:
        return path, _describe(built, node_b, static=True), _describe(given, node_g, static=True)
    lookup = dict(kids_g)
    for k, child in kids_b:
        found = _first_difference(child, lookup[k], join(k))
        if found is not None:
            return found
    return None


def _freeze() -> optax.GradientTransformation:
    """Updates of ``-0.0``: ``x + (-0.0)`` is ``x`` bit for bit for every ``x``, ``-0.0``
    included, where ``optax.set_to_zero``'s ``+0.0`` would turn ``-0.0`` into ``0.0``."""

    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda g: jnp.full_like(g, -0.0), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def split(tree: Any, trainable: Targets = None) -> tuple[Any, Any]:
    """Partition into ``(trainable, frozen)`` trees, ``None`` where a leaf belongs to the other.

    Differentiate with respect to ``trainable`` only (the leanest step) and
    rebuild the full tree with :func:`combine`.

    Example:
        >>> import jax, jax.numpy as jnp, lorax_fn as lf
        >>> lp = lf.lorafy({"w": jnp.ones((3, 2))}, rank=1)
        >>> train, frozen = lf.split(lp)
        >>> [x.shape for x in jax.tree.leaves(train)], [x.shape for x in jax.tree.leaves(frozen)]
        ([(3, 1), (1, 2)], [(3, 2)])
    """
    mask = _labels(tree, trainable)
    leaves = jax.tree.leaves(tree)
    flags = jax.tree.leaves(mask)
    treedef = jax.tree.structure(tree)
    train = [x if f else None for x, f in zip(leaves, flags)]
    frozen = [None if f else x for x, f in zip(leaves, flags)]
    return jax.tree.unflatten(treedef, train), jax.tree.unflatten(treedef, frozen)


def combine(trainable: Any, frozen: Any) -> Any:
    """Inverse of :func:`split`: take each leaf from whichever tree has it.

    Example:
        >>> import jax.numpy as jnp, lorax_fn as lf
        >>> lp = lf.lorafy({"w": jnp.ones((3, 2))}, rank=1)
        >>> lf.combine(*lf.split(lp))["w"].shape
        (3, 2)
    """
    is_none = lambda x: x is None  # noqa: E731
    return jax.tree.map(lambda t, f: f if t is None else t, trainable, frozen, is_leaf=is_none)
