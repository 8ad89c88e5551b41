"""`quantize` and `dequantize` over parameter trees, and `Quantization`, the settings they take."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from .. import checks
from ..errors import ArgumentError, TargetDtypeError, TargetError
from ..paths import leaves_with_paths
from ..weight import is_lora, is_node
from . import nf4
from .array import CODEBOOKS, QuantizedArray, is_quantized, quantize_array


@dataclasses.dataclass(frozen=True)
class Quantization:
    """How a frozen base is stored: ``lorafy(..., quantize=lf.Quantization(...))`` (or ``"nf4"``).

    Attributes:
      codebook: ``"nf4"`` (4-bit NormalFloat, QLoRA's) or ``"int8"`` (absmax per block).
      block_size: values per absmax scale (64, as QLoRA).
      double_quant: store the scales as 8-bit codes in blocks of 256 plus one
        float32 scale per block and their mean (QLoRA's double quantisation).
      dtype: the dtype the base dequantises to, which the model then computes
        in. ``None``: the weight's own dtype on CPU, ``bfloat16`` on GPU and
        TPU (QLoRA computes in bfloat16).

    Example:
        >>> import jax.numpy as jnp, lorax_fn as lf
        >>> lp = lf.lorafy({"k": jnp.ones((64, 32))}, rank=2, quantize=lf.Quantization(double_quant=False))
        >>> lp["k"].w
        QuantizedArray(shape=(64, 32), dtype=float32, codebook=nf4, block_size=64, double_quant=False)
    """

    codebook: str = "nf4"
    block_size: int = nf4.BLOCK
    double_quant: bool = True
    dtype: Any = None

    def checked(self) -> "Quantization":
        if self.codebook not in CODEBOOKS:
            raise ArgumentError(f"codebook must be one of {CODEBOOKS}, got {self.codebook!r}")
        bs = self.block_size
        if isinstance(bs, bool) or not isinstance(bs, int) or bs < 2 or bs % 2:
            raise ArgumentError(f"block_size must be an even integer >= 2, got {bs!r}")
        if not isinstance(self.double_quant, bool):
            raise ArgumentError(f"double_quant must be True or False, got {self.double_quant!r}")
        dtype = None if self.dtype is None else checks.float_dtype(self.dtype, min_bits=16)
        return dataclasses.replace(self, dtype=dtype)

    def apply(self, w: Any, lead: int, path: str) -> QuantizedArray:
        """``w`` quantised with these settings, its ``lead`` leading axes slice by slice."""
        if is_quantized(w):
            return w
        if not (hasattr(w, "dtype") and jnp.issubdtype(w.dtype, jnp.floating)):
            raise TargetDtypeError(f"cannot quantise '{path}': it is "
                                   f"{getattr(w, 'dtype', type(w).__name__)}, not a floating-point array")
        if isinstance(w, jax.core.Tracer):
            raise ArgumentError(f"cannot quantise '{path}' under a JAX transformation (jit, grad, vmap): "
                                "quantisation runs once, on concrete weights, outside the step")
        dtype = self.dtype if self.dtype is not None else (
            w.dtype if jax.default_backend() == "cpu" else jnp.bfloat16)
        return quantize_array(w, self.codebook, self.block_size, self.double_quant, lead, dtype)


def as_quantization(spec: Any) -> Quantization | None:
    """``None``, a codebook name or a :class:`Quantization`, checked."""
    if spec is None:
        return None
    if isinstance(spec, str):
        return Quantization(codebook=spec).checked()
    if isinstance(spec, Quantization):
        return spec.checked()
    raise ArgumentError(f"quantize must be None, a codebook name {CODEBOOKS} or an lf.Quantization, got {spec!r}")


def leading_stack(stack) -> int:
    """How many leading axes (0, 1, …) are among ``stack``: the axes a scan walks, coded slice by slice."""
    n = 0
    while n in stack:
        n += 1
    return n


def quantize(tree: Any, codebook: str = "nf4", *, targets: Any = None, exclude: Any = None,
             block_size: int = nf4.BLOCK, double_quant: bool = True, dtype: Any = None,
             fn: Callable[[Any], Any] | None = None) -> Any:
    """Store the chosen weights of ``tree`` as :class:`QuantizedArray` (QLoRA's 4-bit NF4 by default).

    Runs once, on the host, on concrete arrays. Plain weights become
    ``QuantizedArray`` leaves (frozen: under :func:`lora` they are dequantised
    inside the operation that uses them); adapter nodes whose kind supports a
    quantised base (LoRA, DoRA, MoRA) get their ``w`` quantised. For DoRA use
    ``lorafy(..., quantize=)`` instead, which sets the magnitudes from the
    quantised base. The codes of one tensor are those of the reference
    quantiser (bitsandbytes' NF4) on the same float32 values in C order.

    Args:
      tree: any params pytree (LoRA trees included).
      codebook: ``"nf4"`` or ``"int8"``.
      targets, exclude: which leaves, as in :func:`lorafy` (path regexes or a
        predicate). Default: every floating leaf with ``ndim >= 2`` and every
        adapter base.
      block_size, double_quant, dtype: see :class:`Quantization`.
      fn: optional ``fn(tree)``, traced abstractly as ``lorafy``'s ``fn``: the
        leading axes it scans or slices (a scanned stack's layer axis) are
        quantised one slice at a time, so that each layer dequantises on its
        own. Adapter bases use their layout's stack axes.

    Returns:
      ``tree`` with the chosen leaves quantised.

    Raises:
      TargetDtypeError: a leaf named by ``targets`` is not floating point
        (an integer leaf), with its path.
      TargetError: ``targets`` matched nothing, or names an adapter whose kind
        trains its base (``FullWeight``).
      ArgumentError: an unknown codebook, an odd or non-positive ``block_size``,
        a non-float ``dtype``, or a call under ``jit``.

    Example:
        >>> import jax.numpy as jnp, lorax_fn as lf
        >>> q = lf.quantize({"w": jnp.ones((64, 64)), "b": jnp.zeros(64)})
        >>> type(q["w"]).__name__, type(q["b"]).__name__
        ('QuantizedArray', 'ArrayImpl')
        >>> lf.dequantize(q)["w"].shape
        (64, 64)
    """
    from ..lorafy import _matcher
    from .. import infer

    spec = Quantization(codebook, block_size, double_quant, dtype).checked()
    want, skip = _matcher(targets, "targets"), _matcher(exclude, "exclude")
    flat, treedef = leaves_with_paths(tree, is_leaf=is_node)
    seen = infer.observe(fn, tree, is_leaf=is_node) if fn is not None else {}
    out, matched = [], 0
    for i, (path, leaf) in enumerate(flat):
        if is_quantized(leaf) or (skip is not None and skip(path, leaf)):
            out.append(leaf)
            continue
        named = want is not None and want(path, leaf)
        if is_lora(leaf):
            ok = getattr(type(leaf), "quantizable", False)
            if named and not ok:
                raise TargetError(f"'{path}' is a {type(leaf).__name__}, whose kind does not take a quantised "
                                  "base (its base trains, or the kind does not declare quantizable=True)")
            if ok and (want is None or named) and not is_quantized(leaf.w):
                matched += 1
                leaf = leaf.replace(w=spec.apply(leaf.w, leading_stack(leaf.layout.stack), path))
            out.append(leaf)
            continue
        floating = hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.floating)
        if want is None and not (floating and getattr(leaf, "ndim", 0) >= 2):
            out.append(leaf)
            continue
        if want is not None and not named:
            out.append(leaf)
            continue
        uses = seen.get(i, [])
        stack = frozenset().union(*(u.stack for u in uses)) if uses else frozenset()
        lead = min(leading_stack(stack), max(getattr(leaf, "ndim", 1) - 1, 0))
        matched += 1
        out.append(spec.apply(leaf, lead, path))
    if want is not None and not matched:
        paths = ", ".join(f"'{p}'" for p, _ in flat[:6])
        raise TargetError(f"targets={targets!r} matched no leaf to quantise; paths include {paths}")
    return jax.tree_util.tree_unflatten(treedef, out)


def dequantize(tree: Any, dtype: Any = None) -> Any:
    """Every :class:`QuantizedArray` of ``tree`` (adapter bases included) as a dense array.

    Args:
      tree: a pytree, possibly with quantised leaves or adapter bases.
      dtype: the dtype of the dense arrays (default: each one's own ``dtype``).

    Returns:
      The tree with plain arrays in place of ``QuantizedArray`` nodes; jittable.

    Example:
        >>> import jax.numpy as jnp, lorax_fn as lf
        >>> lf.dequantize(lf.quantize({"w": jnp.ones((64, 64))}), jnp.bfloat16)["w"].dtype
        dtype(bfloat16)
    """
    if dtype is not None:
        dtype = checks.float_dtype(dtype)

    def one(x):
        if is_quantized(x):
            return x.dequantize(dtype)
        if is_lora(x) and is_quantized(x.w):
            return x.replace(w=x.w.dequantize(dtype))
        return x

    return jax.tree.map(one, tree, is_leaf=is_node)
