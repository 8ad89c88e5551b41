"""Training only the adapters: `trainable_mask`, `optimizer`, `split`, `combine`."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from .errors import StructureError
from .lorafy import Targets, _matcher
from .paths import leaves_with_paths
from .weight import is_lora


def _labels(tree: Any, trainable: Targets) -> Any:
    """True for every leaf that trains: ``a``, ``b`` and leaves matched by ``trainable``."""
    extra = _matcher(trainable)
    flat, treedef = leaves_with_paths(tree, is_leaf=is_lora)
    out = []
    for path, leaf in flat:
        if is_lora(leaf):
            out.append(leaf.replace(w=False, a=True, b=True))
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
      ``LoraWeight(w=False, a=True, b=True)`` at adapters; True/False elsewhere.

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

    Args:
      tx: any Optax transformation.
      tree: the LoRA tree (its structure decides the labels).
      trainable: extra fully-trained leaves, as in :func:`trainable_mask`.

    Returns:
      An ``optax.GradientTransformation`` over trees of ``tree``'s structure.

    Example:
        >>> import jax.numpy as jnp, optax, lorax_fn as lf
        >>> lp = lf.lorafy({"w": jnp.ones((3, 2))}, rank=1)
        >>> tx = lf.optimizer(optax.adam(1e-2), lp)
        >>> state = tx.init(lp)
    """
    mask = _labels(tree, trainable)
    labels = jax.tree.map(lambda m: "train" if m else "freeze", mask)

    def label_fn(params):
        if jax.tree.structure(params) != jax.tree.structure(labels):
            raise StructureError("optimizer was built for a tree of a different structure: "
                                 f"{jax.tree.structure(labels)} vs {jax.tree.structure(params)}")
        return labels

    return optax.multi_transform({"train": tx, "freeze": _freeze()}, label_fn)


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
