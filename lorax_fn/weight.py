"""`Adapter`, the base of the pytree nodes that stand where a dense kernel stood, and their `Layout`."""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import GetAttrKey

from . import lazy as lz
from .errors import ArgumentError, LayoutError
from .quant.array import QuantizedArray


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


class Adapter:
    """Base class of adapter nodes: a frozen base ``w`` plus a kind's own children.

    A node stands where a dense weight stood; ``.shape``/``.dtype`` are the
    base's. A *kind* of adapter (LoRA, DoRA, MoRA, your own) is a subclass
    that declares, as class attributes, everything the library asks of it:

    - ``kind``: the name stored in checkpoints and accepted by ``lorafy(variant=)``;
    - ``children``: child names, ``"w"`` (the frozen base) first;
    - ``trainable``: the children that train (``optimizer``, ``split``, saving);
    - ``static``: names of the hashable static fields (``layout`` among them);
    - ``axes``: for every child but ``w``, its axis signature: ``"s"``, ``"i"``
      and ``"o"`` stand for all stack, in or out axes of the base (in layout
      order), any other letter for one axis of the kind's own (a rank axis,
      say). Every signature starts with ``"s"``, so that the stack axes of a
      scanned layer stack lead. The interpreter reshapes, slices, scans and
      shards children through these signatures, so structural operations never
      need the kind;
    - ``primitives``: the consuming primitives it is defined for (a use by
      another one is refused at ``lorafy`` time when ``fn=`` shows it, and when
      traced);
    - ``quantizable``: whether ``w`` may be a :class:`QuantizedArray`
      (QLoRA). The interpreter dequantises it before any hook sees the lazy
      value, so a kind only declares it (default ``False``);

    and implements the hooks ``create`` (initialise from a base weight),
    ``child_shapes`` (what ``load_adapters`` checks), ``delta`` or ``dense``
    (for ``merge``) and optionally ``dot_general`` (the adapted matmul without
    building the dense delta). See ``lorax_fn/kinds/`` and the README section
    "Writing your own adapter kind". Subclasses are pytree nodes
    automatically; :func:`lorax_fn.register_kind` makes one known by name.

    Outside :func:`lorax_fn.lora` a node is not an array: a function that is
    not wrapped (``jnp.asarray``, ``x @ w``) raises
    :class:`~lorax_fn.ArgumentError`, which says to wrap the function with
    ``lf.lora`` or to ``lf.merge`` the tree first.

    Example:
        >>> import jax.numpy as jnp, lorax_fn as lf
        >>> lw = lf.lorafy({"k": jnp.ones((4, 3))}, rank=2)["k"]
        >>> isinstance(lw, lf.Adapter), lw.kind, lw.children, lw.trainable, lw.axes
        (True, 'lora', ('w', 'a', 'b'), ('a', 'b'), {'a': 'sir', 'b': 'sro'})
    """

    kind: str = "adapter"
    children: tuple[str, ...] = ("w",)
    trainable: tuple[str, ...] = ()
    static: tuple[str, ...] = ("layout",)
    axes: dict = {}
    primitives: frozenset = frozenset({"dot_general", "conv_general_dilated", "gather"})
    quantizable: bool = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.children[0] != "w" or "layout" not in cls.static:
            raise TypeError(f"{cls.__name__}: children must start with 'w' and static must name 'layout'")
        for name in cls.children[1:]:
            sig = cls.axes.get(name, "")
            if not sig.startswith("s"):
                raise TypeError(f"{cls.__name__}: axes[{name!r}] must be a signature starting with 's'")
        jax.tree_util.register_pytree_with_keys(cls, cls._flatten_with_keys, cls._unflatten, cls._flatten)

    def __init__(self, w: Any, **fields: Any):
        # a generic constructor: children and static fields by name
        missing = [n for n in self.children[1:] + self.static if n not in fields]
        if missing:
            raise ArgumentError(f"{type(self).__name__} needs {', '.join(missing)}")
        unknown = set(fields) - set(self.children + self.static)
        if unknown:
            raise ArgumentError(f"{type(self).__name__} has no field {sorted(unknown)[0]!r}")
        object.__setattr__(self, "_kids", (w,) + tuple(fields[n] for n in self.children[1:]))
        static = {n: fields[n] for n in self.static}
        static["layout"] = Layout(*static["layout"])
        object.__setattr__(self, "_static", tuple(static[n] for n in self.static))

    # -- pytree ------------------------------------------------------------
    def _flatten_with_keys(self):
        return tuple((GetAttrKey(n), x) for n, x in zip(self.children, self._kids)), self._static

    def _flatten(self):
        return self._kids, self._static

    @classmethod
    def _unflatten(cls, static, children):
        obj = object.__new__(cls)
        object.__setattr__(obj, "_kids", tuple(children))
        object.__setattr__(obj, "_static", static)
        return obj

    @classmethod
    def tree_unflatten(cls, static, children):
        return cls._unflatten(static, children)

    def tree_flatten(self):
        return self._flatten()

    def __getattr__(self, name):
        cls = type(self)
        if name in cls.children:
            return object.__getattribute__(self, "_kids")[cls.children.index(name)]
        if name in cls.static:
            return object.__getattribute__(self, "_static")[cls.static.index(name)]
        raise AttributeError(f"{cls.__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name, value):
        raise AttributeError(f"{type(self).__name__} is immutable; use .replace({name}=...)")

    def replace(self, **children: Any) -> "Adapter":
        """A copy with some children replaced by name; static fields kept."""
        unknown = set(children) - set(self.children)
        if unknown:
            raise ArgumentError(f"{type(self).__name__} has no child {sorted(unknown)[0]!r}")
        kids = tuple(children.get(n, x) for n, x in zip(self.children, self._kids))
        return type(self)._unflatten(self._static, kids)

    @property
    def config(self) -> dict:
        """The static fields by name."""
        return dict(zip(self.static, self._static))

    # -- the kind's hooks (overridden by subclasses) -------------------------
    @classmethod
    def child_shapes(cls, shape: tuple[int, ...], config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
        """Shapes of every child but ``w`` for a base of ``shape`` and these static fields."""
        raise NotImplementedError

    @classmethod
    def read_config(cls, stored: Mapping[str, Any]) -> dict:
        """Static fields (but ``layout``) from a checkpoint entry's JSON.

        Raises ``ValueError(field, why)`` for a bad field, e.g.
        ``ValueError("rank", "is 0; it must be >= 1")``. Default: the fields as stored.
        """
        out = {}
        for n in cls.static:
            if n != "layout":
                if n not in stored:
                    raise ValueError(n, "is missing")
                out[n] = stored[n]
        return out

    @classmethod
    def create(cls, w: Any, layout: Layout, key: Any, *, rank: int, alpha: float, dtype: Any, init: str,
               config: Any, path: str) -> "Adapter":
        """A new node on base ``w`` (what ``lorafy`` calls); ``config`` is the variant's config object."""
        raise NotImplementedError(f"{cls.__name__} does not define create")

    @classmethod
    def delta(cls, z: Any, dtype: Any) -> Any:
        """The dense update ``ΔW`` of lazy value ``z`` in canonical order ``stack + in + out``, in ``dtype``."""
        raise NotImplementedError(f"{cls.__name__} defines neither delta nor dense")

    @classmethod
    def dense(cls, z: Any) -> Any:
        """The dense weight of lazy value ``z`` in its value order and ``w``'s dtype (default ``w + ΔW``)."""
        dt = jnp.promote_types(z.w.dtype, jnp.float32)
        return lz.add_delta(z.w, lz.to_value(z, cls.delta(z, dt)))

    @classmethod
    def dot_general(cls, ctx: Any, d: Any) -> Any:
        """``(dense, low)`` or ``(whole, None)`` for the use ``d`` (a ``rules.Dot``), or ``None`` to
        materialise. Default: ``None``."""
        return None

    @classmethod
    def conv(cls, ctx: Any, eqn: Any, x: Any, z: Any) -> Any:
        """The output of a convolution of ``x`` with lazy kernel ``z``, or ``None`` to materialise."""
        return None

    @classmethod
    def gather(cls, ctx: Any, eqn: Any, z: Any, idx: Any) -> Any:
        """The output of a row lookup of ``z`` at ``idx``, or ``None`` to materialise."""
        return None

    @classmethod
    def enter(cls, node: "Adapter", path: str) -> Any:
        """What ``lora(fn)`` passes for this node: a lazy value whose base takes no gradient."""
        return lz.from_weight(node, path)

    # -- array-like --------------------------------------------------------
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
    # An adapter node is not an array: code that is not wrapped by lf.lora would
    # otherwise fail deep inside JAX or NumPy with "float() argument must be ...
    # not 'LoraWeight'" (or, for NumPy, silently build an object array). JAX and
    # NumPy call these hooks when they convert an operand, so that is where the
    # mistake is caught and named.
    def _outside_lora(self, how: str) -> ArgumentError:
        rank = f", rank {self.rank}" if "rank" in self.static else ""
        return ArgumentError(
            f"a {type(self).__name__} (shape {self.shape}{rank}) reached code that is not wrapped "
            f"by lf.lora ({how}); a LoRA tree only runs under the transform. Wrap the function "
            "with `lf.lora` (e.g. `lf.lora(model.apply)({'params': lp}, x)`), or `lf.merge` the "
            "tree first to get plain arrays (`model.apply({'params': lf.merge(lp)}, x)`).")

    def __jax_array__(self):
        raise self._outside_lora("JAX tried to convert it to an array")

    def __array__(self, dtype=None, copy=None):
        raise self._outside_lora("NumPy tried to convert it to an array")

    def _describe(self) -> str:
        """Static fields but the layout, for messages: ``rank 2, alpha 2, variant lora``."""
        return ", ".join(f"{n} {v:g}" if isinstance(v, float) else f"{n} {v}"
                         for n, v in self.config.items() if n != "layout")

    def __repr__(self) -> str:
        lay = self.layout
        stack = f", stack={lay.stack}" if lay.stack else ""
        dt = getattr(self.w, "dtype", type(self.w).__name__)
        more = ", ".join(f"{n}={v!r}" for n, v in self.config.items() if n != "layout")
        return (f"{type(self).__name__}(shape={getattr(self.w, 'shape', '?')}, dtype={dt}"
                + (f", {more}" if more else "") + f"{stack}, in={lay.inputs}, out={lay.outputs}"
                + (f", base={self.w.codebook}" if hasattr(self.w, "codebook") else "") + ")")


def is_node(x: Any) -> bool:
    """An adapter node or a :class:`QuantizedArray`: what tree walks stop at (internal), each one
    weight that :func:`lorax_fn.lora` runs as a single lazy value."""
    return isinstance(x, (Adapter, QuantizedArray))


def is_lora(x: Any) -> bool:
    """True for an adapter node of any kind (:class:`Adapter`; use as ``is_leaf`` in tree functions).

    Example:
        >>> import jax, jax.numpy as jnp, lorax_fn as lf
        >>> lp = lf.lorafy({"w": jnp.ones((3, 2)), "bias": jnp.zeros(2)}, rank=1)
        >>> [lf.is_lora(x) for x in jax.tree.leaves(lp, is_leaf=lf.is_lora)]
        [False, True]
    """
    return isinstance(x, Adapter)
