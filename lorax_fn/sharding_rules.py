"""Where adapters live: each inherits its base weight's sharding.

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
                      path: str = "") -> dict[str, jax.sharding.Sharding]:
    """Shardings of ``a`` and ``b`` for a base weight of ``ndim`` axes sharded as ``base``.

    Returns ``{"a": ..., "b": ...}``: a ``NamedSharding`` base gives each
    factor the spec entries of its own axes (see the module docstring); a
    single-device or fully replicated base is reused as it is. ``path``
    only names the weight in the error.

    Raises:
      StructureError: ``base`` is split across devices but is not a
        ``NamedSharding``, so there is no spec to carry over.
    """
    if isinstance(base, NamedSharding):
        spec = tuple(base.spec) + (None,) * (ndim - len(base.spec))
        pick = lambda axes: [spec[k] for k in axes]  # noqa: E731
        a = PartitionSpec(*pick(layout.stack), *pick(layout.inputs), None)
        b = PartitionSpec(*pick(layout.stack), None, *pick(layout.outputs))
        return {"a": NamedSharding(base.mesh, a), "b": NamedSharding(base.mesh, b)}
    if isinstance(base, SingleDeviceSharding) or base.is_fully_replicated:
        return {"a": base, "b": base}
    raise StructureError(f"cannot derive adapter shardings for '{path}' from a {type(base).__name__}; "
                         "shard the base with a NamedSharding")
