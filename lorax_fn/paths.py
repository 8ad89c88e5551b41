"""'/'-joined string paths for pytree leaves, whatever the key types."""

from __future__ import annotations

from typing import Any, Sequence

import jax
from jax.tree_util import DictKey, FlattenedIndexKey, GetAttrKey, SequenceKey


def key_str(key: Any) -> str:
    """One path component as text: dict keys, indices and attribute names alike."""
    if isinstance(key, DictKey):
        return str(key.key)
    if isinstance(key, SequenceKey):
        return str(key.idx)
    if isinstance(key, GetAttrKey):
        return key.name
    if isinstance(key, FlattenedIndexKey):
        return str(key.key)
    return str(key).strip(".[]'\"")


def path_str(keypath: Sequence[Any]) -> str:
    """Join a JAX key path with '/'.

    A trailing ``.value`` (the array inside a Flax NNX ``Variable``) is dropped so
    that NNX state and Linen params name the same kernel the same way.
    """
    keys = list(keypath)
    if keys and isinstance(keys[-1], GetAttrKey) and keys[-1].name == "value":
        keys = keys[:-1]
    return "/".join(key_str(k) for k in keys)


def leaves_with_paths(tree: Any, is_leaf=None) -> tuple[list[tuple[str, Any]], Any]:
    """Flatten ``tree`` into ``[(path, leaf)]`` and its treedef."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
    return [(path_str(p), leaf) for p, leaf in flat], treedef
