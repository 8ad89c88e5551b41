"""`LoraWeight`, the pytree node that stands where a dense kernel stood, and its layout."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import GetAttrKey

from .errors import ArgumentError, LayoutError


class Layout(NamedTuple):
    """Roles of a base weight's axes: ``stack`` (not factorised), ``in``, ``out``.

    Each field is a tuple of axis indices of the base weight; together they name
    every axis exactly once. ``a`` has shape ``stack + in + (r,)`` and ``b`` has
    shape ``stack + (r,) + out``, with sizes taken in the order the axes are listed.

    Example:
        >>> import jax.numpy as jnp, lorax_fn as lf
        >>> lay = lf.Layout(stack=(), inputs=(0,), outputs=(1, 2))      # (embed, heads, head_dim)
        >>> lw = lf.lorafy({"q": jnp.ones((8, 2, 4))}, rank=2, layout=lay)["q"]
        >>> lw.a.shape, lw.b.shape
        ((8, 2), (2, 2, 4))
    """

    stack: tuple[int, ...]
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]

    def check(self, shape: tuple[int, ...], path: str = "") -> "Layout":
        """Return the layout with negative axes normalised; raise LayoutError if it does not fit."""
        nd = len(shape)
        where = f" at '{path}'" if path else ""
        try:
            norm = Layout(*(tuple(int(a) % nd if -nd <= int(a) < nd else _bad(a)
                                  for a in group) for group in self))
        except ValueError:
            raise LayoutError(f"layout {tuple(self)} has an axis outside a weight of shape {shape}{where}") from None
        every = norm.stack + norm.inputs + norm.outputs
        if sorted(every) != list(range(nd)):
            raise LayoutError(
                f"layout stack={self.stack} in={self.inputs} out={self.outputs} must name each axis of "
                f"shape {shape} exactly once{where}")
        if not norm.inputs or not norm.outputs:
            raise LayoutError(f"layout needs at least one 'in' and one 'out' axis for shape {shape}{where}")
        return norm


def _bad(axis):
    raise ValueError(axis)


def default_layout(ndim: int, n_stack: int = 0) -> Layout:
    """The rule used when nothing else is known: leading ``n_stack`` axes stacked,
    ``in`` = every other axis but the last, ``out`` = the last (Dense, Conv HWIO, Embed)."""
    return Layout(tuple(range(n_stack)), tuple(range(n_stack, ndim - 1)), (ndim - 1,))


def factor_shapes(shape: tuple[int, ...], layout: Layout, rank: int):
    """Shapes of ``a`` and ``b`` for a base of ``shape`` under ``layout``."""
    s = tuple(shape[i] for i in layout.stack)
    i = tuple(shape[k] for k in layout.inputs)
    o = tuple(shape[k] for k in layout.outputs)
    return s + i + (rank,), s + (rank,) + o


@jax.tree_util.register_pytree_with_keys_class
class LoraWeight:
    """A frozen base weight ``w`` with a low-rank update ``scale · a ⊗_r b``.

    Behaves like the dense weight ``w + ΔW`` inside :func:`lorax_fn.lora` and is
    turned into it by :func:`lorax_fn.merge`. ``.shape``/``.dtype`` are the dense
    weight's. Children: ``w``, ``a``, ``b``; static: ``rank``, ``alpha``,
    ``layout``, ``variant`` (``"lora"`` or ``"rslora"``).

    Outside :func:`lorax_fn.lora` it is not an array: a function that is not
    wrapped (a plain ``model.apply``, ``jnp.asarray``, ``np.asarray``, ``x @ w``)
    raises :class:`~lorax_fn.ArgumentError`, which says to wrap the function
    with ``lf.lora`` or to ``lf.merge`` the tree first. Tree functions
    (``jax.tree.map``, ``jax.jit`` arguments, ``jax.eval_shape``) see its
    children and are unaffected.

    Example:
        >>> import jax.numpy as jnp, lorax_fn as lf
        >>> lw = lf.lorafy({"k": jnp.ones((4, 3))}, rank=2)["k"]
        >>> lw.shape, lw.a.shape, lw.b.shape
        ((4, 3), (4, 2), (2, 3))
        >>> try:
        ...     jnp.ones((2, 4)) @ lw
        ... except lf.ArgumentError as err:
        ...     print("`lf.lora`" in str(err), "`lf.merge`" in str(err))
        True True
    """

    __slots__ = ("w", "a", "b", "rank", "alpha", "layout", "variant")

    def __init__(self, w: Any, a: Any, b: Any, *, rank: int, alpha: float,
                 layout: Layout, variant: str = "lora"):
        self.w, self.a, self.b = w, a, b
        self.rank, self.alpha = int(rank), float(alpha)
        self.layout, self.variant = Layout(*layout), variant

    # -- pytree ------------------------------------------------------------
    def tree_flatten_with_keys(self):
        children = ((GetAttrKey("w"), self.w), (GetAttrKey("a"), self.a), (GetAttrKey("b"), self.b))
        return children, (self.rank, self.alpha, self.layout, self.variant)

    @classmethod
    def tree_unflatten(cls, aux, children):
        obj = object.__new__(cls)
        obj.w, obj.a, obj.b = children
        obj.rank, obj.alpha, obj.layout, obj.variant = aux
        return obj

    def replace(self, **children) -> "LoraWeight":
        """A copy with some of ``w``, ``a``, ``b`` replaced; static fields kept."""
        w, a, b = (children.get(k, getattr(self, k)) for k in ("w", "a", "b"))
        return LoraWeight.tree_unflatten((self.rank, self.alpha, self.layout, self.variant), (w, a, b))

    # -- array-like --------------------------------------------------------
    @property
    def scale(self) -> float:
        """``alpha / rank`` (``alpha / sqrt(rank)`` for rsLoRA)."""
        if self.variant == "rslora":
            return self.alpha / math.sqrt(self.rank)
        return self.alpha / self.rank

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(np.shape(self.w))

    @property
    def dtype(self):
        return jnp.result_type(self.w)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    # -- outside lf.lora ---------------------------------------------------
    # A LoraWeight is not an array: code that is not wrapped by lf.lora would
    # otherwise fail deep inside JAX or NumPy with "float() argument must be ...
    # not 'LoraWeight'" (or, for NumPy, silently build an object array). JAX and
    # NumPy call these hooks when they convert an operand, so that is where the
    # mistake is caught and named.
    def _outside_lora(self, how: str) -> ArgumentError:
        return ArgumentError(
            f"a LoraWeight (shape {self.shape}, rank {self.rank}) reached code that is not wrapped "
            f"by lf.lora ({how}); a LoRA tree only runs under the transform. Wrap the function "
            "with `lf.lora` (e.g. `lf.lora(model.apply)({'params': lp}, x)`), or `lf.merge` the "
            "tree first to get plain arrays (`model.apply({'params': lf.merge(lp)}, x)`).")

    def __jax_array__(self):
        raise self._outside_lora("JAX tried to convert it to an array")

    def __array__(self, dtype=None, copy=None):
        raise self._outside_lora("NumPy tried to convert it to an array")

    def __repr__(self) -> str:
        lay = self.layout
        stack = f", stack={lay.stack}" if lay.stack else ""
        dt = getattr(self.w, "dtype", type(self.w).__name__)
        return (f"LoraWeight(shape={getattr(self.w, 'shape', '?')}, dtype={dt}, rank={self.rank}, "
                f"alpha={self.alpha:g}{stack}, in={lay.inputs}, out={lay.outputs}"
                + (f", variant={self.variant}" if self.variant != "lora" else "") + ")")


def is_lora(x: Any) -> bool:
    """True for a :class:`LoraWeight` node (use as ``is_leaf`` in tree functions).

    Example:
        >>> import jax, jax.numpy as jnp, lorax_fn as lf
        >>> lp = lf.lorafy({"w": jnp.ones((3, 2)), "bias": jnp.zeros(2)}, rank=1)
        >>> [lf.is_lora(x) for x in jax.tree.leaves(lp, is_leaf=lf.is_lora)]
        [False, True]
    """
    return isinstance(x, LoraWeight)
