"""`QuantizedArray`: a frozen weight stored as 4-bit NF4 (or int8) codes with blockwise scales.

A node stands where a dense weight stood: it has the dense ``shape`` and
``dtype``, and its children are the stored parts. The leading ``lead`` axes
of the weight (the layers of a scanned stack) are quantised one slice at a
time, each slice exactly as the reference quantiser quantises a tensor of its
own: so every child starts with those axes, and ``lax.scan`` (or a slice)
over them hands each step a smaller, valid ``QuantizedArray`` with no
dequantisation of the rest.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import GetAttrKey

from . import int8, nf4

CODEBOOKS = ("nf4", "int8")
CHILDREN = ("codes", "absmax", "absmax_q", "nested", "offset")


class QuantizedArray:
    """A frozen weight in 4-bit NF4 (or int8) codes plus blockwise scales; a pytree node.

    Built by :func:`lorax_fn.quantize` or ``lorafy(..., quantize="nf4")``; not
    constructed by hand. ``.shape``/``.dtype`` are the dense weight's
    (``dtype`` is what :meth:`dequantize` returns and what a function under
    :func:`lorax_fn.lora` computes in). Children, each led by the ``lead``
    axes quantised separately:

    - ``codes``: NF4: ``uint8 (..., ceil(n/2))``, two codes per byte, the first
      value of a pair in the high nibble (the reference quantiser's layout);
      int8: ``int8 (..., n)``;
    - ``absmax``: ``float32 (..., nb)``, each block's scale (``None`` with
      double quantisation);
    - ``absmax_q``, ``nested``, ``offset``: with double quantisation, the
      scales less their mean ``offset`` as 8-bit codes in blocks of 256, each
      with its ``float32`` ``nested`` scale (``None`` without).

    Here ``n`` is the size of one slice, ``nb = ceil(n / block_size)``; a
    short last block is quantised on its own values, as the reference does
    (nothing is padded but the last nibble of an odd count).

    Example:
        >>> import jax.numpy as jnp, lorax_fn as lf
        >>> q = lf.quantize({"w": jnp.ones((128, 64))})["w"]
        >>> q
        QuantizedArray(shape=(128, 64), dtype=float32, codebook=nf4, block_size=64, double_quant=True)
        >>> q.codes.dtype, q.codes.shape, round(q.nbytes / (128 * 64 * 4), 3)
        (dtype('uint8'), (4096,), 0.129)
        >>> bool((q.dequantize() == 1).all())
        True
    """

    __slots__ = ("_kids", "_static")

    def __init__(self, codes: Any, absmax: Any, absmax_q: Any, nested: Any, offset: Any, *, codebook: str,
                 inner: tuple[int, ...], dtype: Any, block_size: int):
        object.__setattr__(self, "_kids", (codes, absmax, absmax_q, nested, offset))
        object.__setattr__(self, "_static", (codebook, tuple(int(n) for n in inner),
                                             jnp.dtype(dtype).name, int(block_size)))

    # -- pytree ------------------------------------------------------------
    def _flatten_with_keys(self):
        return tuple((GetAttrKey(n), x) for n, x in zip(CHILDREN, self._kids)), self._static

    @classmethod
    def _unflatten(cls, static, kids):
        obj = object.__new__(cls)
        object.__setattr__(obj, "_kids", tuple(kids))
        object.__setattr__(obj, "_static", static)
        return obj

    def __setattr__(self, name, value):
        raise AttributeError("QuantizedArray is immutable")

    def __getattr__(self, name):
        if name in CHILDREN:
            return object.__getattribute__(self, "_kids")[CHILDREN.index(name)]
        raise AttributeError(f"'QuantizedArray' object has no attribute {name!r}")

    def with_children(self, f) -> "QuantizedArray":
        """Apply ``f`` to every child (all lead with the ``lead`` axes); static fields kept."""
        return QuantizedArray._unflatten(self._static, [None if k is None else f(k) for k in self._kids])

    # -- static fields -----------------------------------------------------
    @property
    def codebook(self) -> str:
        return self._static[0]

    @property
    def inner(self) -> tuple[int, ...]:
        """The shape of one separately quantised slice."""
        return self._static[1]

    @property
    def dtype(self):
        return jnp.dtype(self._static[2])

    @property
    def block_size(self) -> int:
        return self._static[3]

    @property
    def double_quant(self) -> bool:
        return self.absmax_q is not None

    @property
    def lead(self) -> int:
        """How many leading axes are quantised slice by slice."""
        return len(np.shape(self.codes)) - 1

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(np.shape(self.codes)[:-1]) + self.inner

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Stored bytes, scales included."""
        return sum(math.prod(np.shape(k)) * jnp.dtype(k.dtype).itemsize for k in self._kids if k is not None)

    def settings(self) -> dict:
        """What decides the codes: ``codebook``, ``block_size``, ``double_quant``, ``lead`` (and ``dtype``)."""
        return {"codebook": self.codebook, "block_size": self.block_size, "double_quant": self.double_quant,
                "lead": self.lead, "dtype": self.dtype.name}

    # -- values ------------------------------------------------------------
    def astype(self, dtype: Any) -> "QuantizedArray":
        """The same codes, dequantising to ``dtype`` (no data is touched)."""
        return QuantizedArray._unflatten(self._static[:2] + (jnp.dtype(dtype).name,) + self._static[3:],
                                         self._kids)

    def dequantize(self, dtype: Any = None) -> jax.Array:
        """The dense weight (float32 math: ``level[code] · absmax``), in ``dtype`` or ``self.dtype``.

        Jittable; under ``jit`` XLA fuses it with the operation that consumes it.
        """
        return dequantize_parts(self, jnp, self.dtype if dtype is None else dtype)

    def __jax_array__(self):
        return self.dequantize()

    def __repr__(self) -> str:
        lead = f", lead={self.lead}" if self.lead else ""
        return (f"QuantizedArray(shape={self.shape}, dtype={self.dtype.name}, codebook={self.codebook}, "
                f"block_size={self.block_size}, double_quant={self.double_quant}{lead})")


jax.tree_util.register_pytree_with_keys(
    QuantizedArray, QuantizedArray._flatten_with_keys, QuantizedArray._unflatten,
    lambda q: (q._kids, q._static))


def reshaped(q: QuantizedArray, shape: tuple[int, ...]) -> QuantizedArray | None:
    """``q`` viewed as ``shape`` without touching codes, or ``None``.

    The codes follow each slice's C order, so any reshape that keeps the slices
    whole is free: the leading axes of ``shape`` whose product is the number of
    slices index them (reshaping the children's leading axes), the rest is the
    new slice shape.
    """
    shape = tuple(int(n) for n in shape)
    lead_shape = tuple(np.shape(q.codes)[:-1])
    count = math.prod(lead_shape)
    for k in range(len(shape) + 1):
        if math.prod(shape[:k]) == count and math.prod(shape[k:]) == math.prod(q.inner):
            new_lead = shape[:k]
            kids = [None if c is None else c.reshape(new_lead + tuple(np.shape(c)[len(lead_shape):]))
                    for c in q._kids]
            return QuantizedArray._unflatten((q.codebook, shape[k:]) + q._static[2:], kids)
        if math.prod(shape[:k]) > count:
            break
    return None


def is_quantized(x: Any) -> bool:
    """True for a :class:`QuantizedArray` (use as ``is_leaf`` to stop tree functions at one).

    Example:
        >>> import jax.numpy as jnp, lorax_fn as lf
        >>> q = lf.quantize({"w": jnp.ones((64, 64)), "b": jnp.ones(64)})
        >>> {k: lf.is_quantized(v) for k, v in q.items()}
        {'b': False, 'w': True}
    """
    return isinstance(x, QuantizedArray)


# ------------------------------------------------------------------ encode
def quantize_array(x: Any, codebook: str = "nf4", block_size: int = nf4.BLOCK, double_quant: bool = True,
                   lead: int = 0, dtype: Any = None) -> QuantizedArray:
    """Quantise a float array on the host, each index of its ``lead`` leading axes on its own."""
    arr = np.asarray(jax.device_get(x))
    shape, lead_shape = arr.shape, arr.shape[:lead]
    flat = arr.astype(np.float32).reshape((math.prod(lead_shape), -1))
    parts = [_encode(row, codebook, block_size, double_quant) for row in flat]
    stacked = [None if parts[0][j] is None else np.stack([p[j] for p in parts]).reshape(
        lead_shape + np.shape(parts[0][j])) for j in range(len(CHILDREN))]
    return QuantizedArray(*stacked, codebook=codebook, inner=shape[lead:],
                          dtype=arr.dtype if dtype is None else dtype, block_size=block_size)


def _encode(row: np.ndarray, codebook: str, block: int, double_quant: bool) -> tuple:
    if codebook == "nf4":
        c, absmax = nf4.codes(row, block)
        c = nf4.pack(c)
    else:
        c, absmax = int8.codes(row, block)
    if not double_quant:
        return c, absmax, None, None, None
    q, nested, off = nf4.quantize_absmax(absmax)
    return c, None, q, nested, np.float32(off)


# ------------------------------------------------------------------ decode
def _pad_last(x, size: int, xp):
    extra = size - x.shape[-1]
    if extra <= 0:
        return x[..., :size]
    return xp.concatenate([x, xp.zeros(x.shape[:-1] + (extra,), x.dtype)], axis=-1)


def block_scales(q: QuantizedArray, xp=jnp):
    """Each block's absmax, ``(..., nb)`` float32, as dequantisation sees it."""
    if q.absmax is not None:
        return xp.asarray(q.absmax, xp.float32)
    aq = xp.asarray(q.absmax_q)
    nb, lead = aq.shape[-1], aq.shape[:-1]
    nested = xp.asarray(q.nested, xp.float32)
    nn = nested.shape[-1]
    table = xp.asarray(nf4.dynamic_code())[_pad_last(aq, nn * nf4.NESTED_BLOCK, xp).astype(xp.int32)]
    scaled = (table.reshape(lead + (nn, nf4.NESTED_BLOCK)) * nested[..., None]).reshape(lead + (-1,))[..., :nb]
    offset = xp.asarray(q.offset, xp.float32)[..., None]
    if xp is jnp:
        scaled = _rounded(scaled, offset)
    # one multiply, then one add, each rounded to float32, as the reference does
    return scaled + offset


def _rounded(product, offset):
    """``product`` as a float32 value the compiler cannot fuse into a multiply-add with ``offset``.

    LLVM contracts a multiply feeding an add into one fused multiply-add, rounded
    once; where the scales are far from their mean (a cancellation) that lands
    tens of ulp from the reference's two roundings. Passing the product through
    its bits, or-ed with a flag that is zero unless ``offset`` is NaN (and then
    the sum is NaN either way), hides the multiply from that rewrite at no cost.
    """
    flag = jnp.isnan(offset).astype(jnp.int32)
    bits = jax.lax.bitcast_convert_type(product, jnp.int32) | flag
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def dequantize_parts(q: QuantizedArray, xp, dtype) -> Any:
    """The dense value of ``q`` with array module ``xp`` (NumPy or ``jax.numpy``)."""
    n, block = math.prod(q.inner), q.block_size
    lead = tuple(np.shape(q.codes)[:-1])
    scales = block_scales(q, xp)
    nb = scales.shape[-1]
    c = xp.asarray(q.codes)
    if q.codebook == "nf4":
        c = xp.stack([c >> 4, c & 15], axis=-1).reshape(lead + (-1,))
        vals = xp.asarray(nf4.LEVELS)[c.astype(xp.int32)]
    else:
        vals = c.astype(xp.float32)
        scales = scales / xp.float32(int8.STEPS)
    vals = _pad_last(vals, nb * block, xp).reshape(lead + (nb, block))
    out = (vals * scales[..., None]).reshape(lead + (nb * block,))[..., :n]
    return out.reshape(lead + q.inner).astype(dtype)
