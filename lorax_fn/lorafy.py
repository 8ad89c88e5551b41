"""`lorafy`: choose target leaves, work out their layouts and initialise the adapters."""

from __future__ import annotations

import difflib
import math
import re
import warnings
from typing import Any, Callable, Mapping, Sequence, Union

import jax
import jax.numpy as jnp

from . import infer
from .errors import LayoutError, RankError, TargetDtypeError, TargetError
from .paths import leaves_with_paths
from .weight import Layout, LoraWeight, default_layout, factor_shapes, is_lora

Targets = Union[None, str, Sequence[str], Callable[[str, Any], bool]]
LayoutSpec = Union[None, Layout, Sequence, Mapping[str, Any], Callable[[str, Any], Any]]
INITS = ("kaiming", "gaussian")


def _matcher(spec: Targets) -> Callable[[str, Any], bool] | None:
    if spec is None:
        return None
    if callable(spec):
        return spec
    pats = [spec] if isinstance(spec, str) else list(spec)
    compiled = [re.compile(p) for p in pats]
    return lambda path, leaf: any(c.fullmatch(path) for c in compiled)


def _is_float(x) -> bool:
    return hasattr(x, "dtype") and hasattr(x, "shape") and jnp.issubdtype(x.dtype, jnp.floating)


def _user_layout(spec: LayoutSpec, path: str, leaf) -> Layout | None:
    if spec is None:
        return None
    if callable(spec) and not isinstance(spec, Layout):
        got = spec(path, leaf)
    elif isinstance(spec, Mapping):
        got = next((v for k, v in spec.items() if re.fullmatch(k, path)), None)
    else:
        got = spec
    if got is None:
        return None
    try:
        return Layout(*(tuple(int(a) for a in g) for g in got))
    except (TypeError, ValueError):
        raise LayoutError(f"layout for '{path}' must be (stack, in, out) axis tuples, got {got!r}") from None


def _nearest(pattern: Any, paths: list[str]) -> str:
    text = pattern if isinstance(pattern, str) else (pattern[0] if isinstance(pattern, (list, tuple))
                                                     and pattern else "")
    near = difflib.get_close_matches(str(text), paths, n=5, cutoff=0.0) if text else []
    near = near or paths[:5]
    return ", ".join(f"'{p}'" for p in near)


def _init_factors(key, shape_a, shape_b, fan_in: int, rank: int, dtype, init: str):
    if init == "kaiming":
        # PEFT's default: kaiming_uniform(a=sqrt(5)) is U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        bound = 1.0 / math.sqrt(fan_in)
        a = jax.random.uniform(key, shape_a, jnp.float32, -bound, bound)
    else:
        # the LoRA paper draws A Gaussian; std 1/r as PEFT's init_lora_weights="gaussian"
        a = jax.random.normal(key, shape_a, jnp.float32) / rank
    return a.astype(dtype), jnp.zeros(shape_b, dtype)


def lorafy(
    params: Any,
    rank: int = 8,
    alpha: float | None = None,
    *,
    targets: Targets = None,
    exclude: Targets = None,
    key: jax.Array | None = None,
    fn: Callable[[Any], Any] | None = None,
    init: str = "kaiming",
    layout: LayoutSpec = None,
    rslora: bool = False,
    dtype: Any = None,
) -> Any:
    """Replace target weights of ``params`` by :class:`LoraWeight` (frozen base + ``a``, ``b``).

    Args:
      params: any pytree of arrays (Flax Linen ``params``, an NNX ``nnx.split``
        state, Equinox arrays, plain dicts). Leaves already LoRA are kept.
      rank: the rank ``r`` of every adapter.
      alpha: scale numerator; the update is ``alpha / r · a⊗b``
        (``alpha / sqrt(r)`` with ``rslora=True``). Default: ``alpha = rank``
        (scale 1).
      targets: which leaves to adapt, by their '/'-joined path (dict keys,
        indices and attribute names; NNX's trailing ``value`` dropped): a regex
        that must ``re.fullmatch``, a list of them, or ``predicate(path, leaf)``.
        Default: every floating leaf with ``ndim >= 2`` (with ``fn``: those
        that ``fn`` contracts in a matmul, convolution or row lookup).
      exclude: same forms; matching leaves are left alone.
      key: PRNG key for ``a`` (default ``jax.random.key(0)``).
      fn: optional ``fn(params)`` (e.g. ``lambda p: model.apply({"params": p}, x)``)
        traced abstractly to infer each weight's layout: contracted axes are
        ``in``, scanned or batch axes are ``stack``. Without it, the default
        rule: ``in`` = all axes but the last, ``out`` = the last.
      init: ``"kaiming"`` (PEFT default: ``a ~ U(±1/sqrt(fan_in))``, ``b = 0``)
        or ``"gaussian"`` (``a ~ N(0, 1/r²)``, ``b = 0``).
      layout: explicit layouts, overriding inference: a ``Layout`` (or
        ``(stack, in, out)`` tuple) for every target, a ``{regex: layout}`` dict,
        or ``layout(path, leaf)`` returning one or ``None``.
      rslora: use the rsLoRA scale ``alpha / sqrt(r)``.
      dtype: dtype of ``a`` and ``b`` (default: the base weight's). Pass
        ``jnp.float32`` to train float32 adapters on a bfloat16 base, as PEFT's
        ``autocast_adapter_dtype`` does; ``merge`` still returns the base dtype.

    Returns:
      A pytree of ``params``'s structure with ``LoraWeight`` nodes at the targets.
      ``merge`` of it equals ``params`` bit for bit (``b = 0``).

    Raises:
      TargetError: ``targets`` matched nothing (the message lists near paths).
      TargetDtypeError: a target is not a floating-point array.
      RankError: ``rank`` is not positive or exceeds ``min(prod(in), prod(out))``
        of an explicit target (default targets that small are left dense, with a
        warning naming them).
      LayoutError: a layout does not fit its weight's shape.

    Example:
        >>> import jax.numpy as jnp, lorax_fn as lf
        >>> p = {"dense": {"kernel": jnp.zeros((16, 4)), "bias": jnp.zeros(4)}}
        >>> lp = lf.lorafy(p, rank=2, alpha=4)
        >>> lp["dense"]["kernel"]
        LoraWeight(shape=(16, 4), dtype=float32, rank=2, alpha=4, in=(0,), out=(1,))
    """
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    if int(rank) != rank or rank < 1:
        raise RankError(f"rank must be a positive integer, got {rank!r}")
    alpha = float(rank if alpha is None else alpha)
    key = jax.random.key(0) if key is None else key
    flat, treedef = leaves_with_paths(params, is_leaf=is_lora)
    paths = [p for p, _ in flat]
    want, skip = _matcher(targets), _matcher(exclude)
    seen = infer.observe(fn, params, is_leaf=is_lora) if fn is not None else None

    chosen, too_small = [], []
    for i, (path, leaf) in enumerate(flat):
        if is_lora(leaf) or (skip is not None and skip(path, leaf)):
            continue
        if want is not None:
            if not want(path, leaf):
                continue
            if not _is_float(leaf):
                raise TargetDtypeError(
                    f"target '{path}' is not a floating-point array "
                    f"(got {getattr(leaf, 'dtype', type(leaf).__name__)}); exclude it or narrow `targets`")
        elif not (_is_float(leaf) and leaf.ndim >= 2):
            continue
        lay = _user_layout(layout, path, leaf)
        if lay is None and seen is not None:
            lay, unserved = infer.choose(leaf.ndim, seen.get(i, []))
            if unserved:
                warnings.warn(f"'{path}' is used with conflicting layouts; chose in={lay.inputs} "
                              f"out={lay.outputs}, so uses with (in, out) in {unserved} will be "
                              "materialised (see lorax_fn.explain)", stacklevel=2)
            if lay is None:
                if want is None:
                    continue  # default targets: fn never contracts this leaf
                n_stack = len(frozenset().union(*(u.stack for u in seen.get(i, [])))) if seen.get(i) else 0
                lay = default_layout(leaf.ndim, n_stack) if leaf.ndim - n_stack >= 2 else None
        if lay is None:
            if leaf.ndim < 2:
                raise LayoutError(f"target '{path}' has shape {tuple(leaf.shape)}: LoRA needs at least "
                                  "two axes (one 'in', one 'out')")
            lay = default_layout(leaf.ndim)
        lay = lay.check(tuple(leaf.shape), path)
        fan_in = math.prod(leaf.shape[k] for k in lay.inputs)
        fan_out = math.prod(leaf.shape[k] for k in lay.outputs)
        if rank > min(fan_in, fan_out):
            msg = (f"rank {rank} exceeds the factorised dims of '{path}' (shape "
                   f"{tuple(leaf.shape)}: in {fan_in}, out {fan_out})")
            if want is not None:
                raise RankError(msg)
            too_small.append(msg)
            continue
        chosen.append((i, path, leaf, lay, fan_in))

    if want is not None and not chosen:
        raise TargetError(f"targets={targets!r} matched no adaptable leaf; nearest paths: "
                          f"{_nearest(targets, paths)}")

    if too_small:
        warnings.warn("lorafy left these default targets dense: " + "; ".join(too_small)
                      + ". Pass `targets` to choose leaves explicitly.", stacklevel=2)
    new = [leaf for _, leaf in flat]
    for n, (i, path, leaf, lay, fan_in) in enumerate(chosen):
        sa, sb = factor_shapes(tuple(leaf.shape), lay, rank)
        a, b = _init_factors(jax.random.fold_in(key, n), sa, sb, fan_in, rank,
                             leaf.dtype if dtype is None else dtype, init)
        new[i] = LoraWeight(leaf, a, b, rank=rank, alpha=alpha, layout=lay,
                            variant="rslora" if rslora else "lora")
    return jax.tree_util.tree_unflatten(treedef, new)
