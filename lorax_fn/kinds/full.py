"""Leaves that train in full next to the adapters (PEFT's ``modules_to_save``): biases, norms, a new head.

``lorafy(params, ..., trainable=...)`` wraps each matched leaf in a
:class:`FullWeight` node whose one child, ``w``, is trainable. Inside
``lora(fn)`` it is the plain array (and takes gradients); ``merge`` unwraps
it; the optimizer masks, ``save_adapters``/``load_adapters`` and ``split``
treat it like any adapter kind, so a trained head travels with the adapters.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import numpy as np

from ..weight import Adapter, Layout


class FullWeight(Adapter):
    """A leaf that trains in full: child ``w`` (trainable), no other state.

    Example:
        >>> import jax.numpy as jnp, lorax_fn as lf
        >>> lp = lf.lorafy({"k": jnp.ones((4, 3)), "bias": jnp.zeros(3)}, rank=2, trainable="bias")
        >>> lp["bias"]
        FullWeight(shape=(3,), dtype=float32)
    """

    kind = "full"
    children = ("w",)
    trainable = ("w",)
    static = ("layout",)
    axes: dict = {}

    def __init__(self, w: Any, *, layout: Layout | None = None):
        ndim = np.ndim(w)
        super().__init__(w, layout=layout if layout is not None else whole(ndim))

    @classmethod
    def create(cls, w, layout, key, *, rank, alpha, dtype, init, config, path):
        return cls(w)

    @classmethod
    def child_shapes(cls, shape, config):
        return {}

    @classmethod
    def read_config(cls, stored):
        return {}

    @classmethod
    def dense(cls, z):
        return z.w

    @classmethod
    def enter(cls, node, path):
        return node.w  # an ordinary trainable array inside lora(fn)

    def __repr__(self) -> str:
        return f"FullWeight(shape={getattr(self.w, 'shape', '?')}, dtype={getattr(self.w, 'dtype', '?')})"


def whole(ndim: int) -> Layout:
    """The layout of a fully trained leaf: every axis 'in' (it is never factorised)."""
    return Layout((), tuple(range(ndim)), ())


@dataclasses.dataclass(frozen=True)
class Full:
    """Full fine-tuning of the targets (``variant="full"``); ``lorafy(trainable=...)`` uses it for extra leaves.

    Example:
        >>> import jax.numpy as jnp, lorax_fn as lf
        >>> lf.lorafy({"k": jnp.ones((4, 3))}, variant=lf.Full())["k"]
        FullWeight(shape=(4, 3), dtype=float32)
    """

    adapter: ClassVar[type] = FullWeight
