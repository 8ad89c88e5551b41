"""Where adapters live: each child inherits its base weight's sharding through its axis signature.

For a base sharded ``PartitionSpec(*spec)`` with layout ``(stack, in, out)``,
``a`` (``stack + in + (r,)``) takes the spec entries of the stack and ``in``
axes, ``b`` (``stack + (r,) + out``) those of the stack and ``out`` axes, and
the rank axis is replicated. A matmul ``x @ a`` then contracts ``a`` over the
same mesh axes as ``x @ w`` does, and ``(x @ a) @ b`` lands with the output
sharding of ``x @ w``.
"""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

from .errors import StructureError
from .weight import Layout


def leaf_sharding(x: Any) -> jax.sharding.Sharding:
    """The sharding of a ``jax.Array``; the default device for host arrays (NumPy, Python scalars)."""
    s = getattr(x, "sharding", None)
    if isinstance(s, jax.sharding.Sharding):
        return s
    return SingleDeviceSharding(jax.devices()[0])


def adapter_shardings(base: jax.sharding.Sharding, layout: Layout, ndim: int,
                      path: str = "", signatures: dict | None = None) -> dict[str, jax.sharding.Sharding]:
    """Shardings of an adapter's children for a base weight of ``ndim`` axes sharded as ``base``.

    ``signatures`` are the kind's child axis signatures (``Adapter.axes``;
    default LoRA's ``{"a": "sir", "b": "sro"}``): ``s``/``i``/``o`` take the spec
    entries of the base's stack/in/out axes, the kind's own axes (a rank)
    are replicated. Returns ``{child: sharding}``; a single-device or fully
    replicated base is reused as it is. ``path`` only names the weight in the
    error.

    Raises:
      StructureError: ``base`` is split across devices but is not a
        ``NamedSharding``, so there is no spec to carry over.
    """
    signatures = {"a": "sir", "b": "sro"} if signatures is None else signatures
    if isinstance(base, NamedSharding):
        spec = tuple(base.spec) + (None,) * (ndim - len(base.spec))
        groups = {"s": layout.stack, "i": layout.inputs, "o": layout.outputs}
        out = {}
        for name, sig in signatures.items():
            entries = []
            for c in sig:
                entries.extend([spec[k] for k in groups[c]] if c in groups else [None])
            out[name] = NamedSharding(base.mesh, PartitionSpec(*entries))
        return out
    if isinstance(base, SingleDeviceSharding) or base.is_fully_replicated:
        return {name: base for name in signatures}
    raise StructureError(f"cannot derive adapter shardings for '{path}' from a {type(base).__name__}; "
                         "shard the base with a NamedSharding")
