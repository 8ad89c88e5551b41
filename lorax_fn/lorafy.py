"""`lorafy`: choose target leaves, work out their layouts and initialise the adapters."""

from __future__ import annotations

import difflib
import math
import re
import warnings
from typing import Any, Callable, Mapping, Sequence, Union

import jax
import jax.numpy as jnp

from . import checks, infer, inits, kinds
from .errors import ArgumentError, LayoutError, NoAdapterWarning, RankError, TargetDtypeError, TargetError
from .paths import leaves_with_paths
from .kinds.full import FullWeight
from .quant.array import is_quantized
from .quant.tree import Quantization, as_quantization, leading_stack
from .weight import Layout, default_layout, is_lora, is_node

Targets = Union[None, str, Sequence[str], Callable[[str, Any], bool]]
LayoutSpec = Union[None, Layout, Sequence, Mapping[str, Any], Callable[[str, Any], Any]]


def _compile(spec: Targets, name: str) -> list[re.Pattern]:
    """The patterns of a ``targets``-like argument, each checked: a TargetError names the argument."""
    pats = [spec] if isinstance(spec, (str, re.Pattern)) else spec
    try:
        pats = list(pats)
    except TypeError:
        raise TargetError(f"{name} must be a regex string, a list of them, or a predicate(path, leaf); got "
                          f"{type(spec).__name__} {spec!r}") from None
    compiled = []
    for p in pats:
        if isinstance(p, re.Pattern):
            compiled.append(p)
            continue
        if not isinstance(p, str):
            raise TargetError(f"{name} must hold regex strings; got {type(p).__name__} {p!r} in {spec!r}")
        try:
            compiled.append(re.compile(p))
        except re.error as err:
            hint = f"'.*{p.lstrip('*')}'" if p.startswith("*") else "a regular expression"
            raise TargetError(f"{name}={p!r} is not a valid regular expression ({err}). Patterns are "
                              f"full-match regexes on '/'-joined paths, not globs: write {hint}") from None
    return compiled


def _matcher(spec: Targets, name: str = "targets") -> Callable[[str, Any], bool] | None:
    """``predicate(path, leaf)`` for a ``targets``-like argument; TargetError for a malformed one."""
    if spec is None:
        return None
    if callable(spec):
        return spec
    compiled = _compile(spec, name)
    return lambda path, leaf: any(c.fullmatch(path) for c in compiled)


def _partial_hint(spec: Targets, paths: list[str]) -> str:
    """A suggestion when a pattern matches nothing in full but occurs inside some paths (``kernel`` → ``.*kernel``)."""
    if spec is None or callable(spec):
        return ""
    pats = [spec] if isinstance(spec, (str, re.Pattern)) else list(spec)
    for p in (getattr(p, "pattern", p) for p in pats):
        inside = [q for q in paths if re.search(p, q)]
        if inside:
            fix = f".*{p}" if any(re.fullmatch(f".*{p}", q) for q in inside) else f".*{p}.*"
            return (f". Patterns must match the whole path (re.fullmatch): {p!r} only occurs inside paths "
                    f"such as '{inside[0]}'; did you mean {fix!r}?")
    return ""


class _Patterns:
    """A ``{path_regex: value}`` override table (``rank_pattern``/``alpha_pattern``): first full match wins."""

    def __init__(self, name: str, table: Mapping[str, Any] | None, check: Callable[[Any, str], Any]):
        if table is not None and not isinstance(table, Mapping):
            raise TargetError(f"{name} must be a dict {{path_regex: value}}, got {type(table).__name__}")
        self.name = name
        self.rows = [(k, _compile(k, f"{name} key")[0], check(v, k)) for k, v in (table or {}).items()]

    def lookup(self, path: str, default: Any) -> tuple[Any, bool]:
        """``(value, whether a key gave it)`` for one path."""
        for _, rx, value in self.rows:
            if rx.fullmatch(path):
                return value, True
        return default, False

    def check_used(self, paths: list[str]) -> None:
        """TargetError for a key that matches none of the adapted ``paths`` (one shadowed by an earlier key is fine)."""
        unused = [k for k, rx, _ in self.rows if not any(rx.fullmatch(p) for p in paths)]
        if unused:
            # a key that selects nothing is a typo, not a no-op: the weight it meant keeps the global value
            raise TargetError(f"{self.name} key {unused[0]!r} matched no adapted leaf (keys are full-match "
                              f"regexes on '/'-joined paths); adapted paths: {_nearest(unused[0], paths)}"
                              f"{_partial_hint(unused[0], paths)}")


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


def _why_nothing(rank: int, too_small: list[str], fn: Any, seen: dict | None) -> str:
    """The cause and the fix when the default targets adapt no leaf (every gradient would be zero)."""
    head = "lorafy adapted no leaf, so nothing will train: "
    if too_small:
        return (head + f"rank {rank} is larger than every candidate allows (" + "; ".join(too_small[:3])
                + "). Lower `rank`, or pass `targets` to choose leaves explicitly.")
    if fn is not None and not seen:
        return (head + "`fn` never uses its argument (does it close over the params instead?). Write it as a "
                "function of the params it is given, e.g. fn=lambda p: model.apply({'params': p}, x).")
    if fn is not None:
        return (head + "`fn` contracts no floating-point leaf of ndim >= 2 in a matmul, convolution or row "
                "lookup. Pass `targets` to choose leaves explicitly.")
    return (head + "the tree has no floating-point leaf of ndim >= 2 (the default targets). Pass `targets` "
            "to choose leaves explicitly.")


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
    rank_pattern: Mapping[str, int] | None = None,
    alpha_pattern: Mapping[str, float] | None = None,
    variant: Any = "lora",
    trainable: Targets = None,
    quantize: Any = None,
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
      init: ``"kaiming"`` (PEFT default: ``a ~ U(±1/sqrt(fan_in))``, ``b = 0``),
        ``"gaussian"`` (``a ~ N(0, 1/r²)``, ``b = 0``), ``"pissa"`` (the top
        ``r`` singular directions of each weight into ``a``, ``b``; the frozen
        base becomes the residual ``w − scale·a@b``), ``"pissa_niter_<k>"``
        (the same from a randomised SVD with ``k`` subspace iterations: much
        faster on large weights) or ``"olora"`` (from a QR decomposition).
        With the last three ``merge`` gives back ``params`` up to float error,
        not bit for bit; :func:`to_original_base` turns a trained tree back
        into adapters on the original weights, for saving.
      layout: explicit layouts, overriding inference: a ``Layout`` (or
        ``(stack, in, out)`` tuple) for every target, a ``{regex: layout}`` dict,
        or ``layout(path, leaf)`` returning one or ``None``.
      rslora: use the rsLoRA scale ``alpha / sqrt(r)``.
      rank_pattern: ``{path_regex: rank}`` overriding ``rank`` for the paths a
        key matches in full (the first matching key wins, as in PEFT). A
        target whose pattern rank exceeds its dimensions is a ``RankError``.
      alpha_pattern: ``{path_regex: alpha}`` overriding ``alpha`` likewise.
        Without ``alpha`` or a matching ``alpha_pattern`` key, each weight's
        alpha is its own rank (scale 1).
      dtype: dtype of ``a`` and ``b`` (default: the base weight's). Pass
        ``jnp.float32`` to train float32 adapters on a bfloat16 base, as PEFT's
        ``autocast_adapter_dtype`` does; ``merge`` still returns the base dtype.
      variant: the adapter kind: ``"lora"`` (default), ``"dora"`` (DoRA: a
        trainable magnitude per output unit), ``"mora"`` (MoRA type 6: one
        square matrix of LoRA's trainable count, a high-rank update), or a
        config object: ``lf.LoRA(rslora=...)``, ``lf.DoRA(...)``,
        ``lf.MoRA(type=1 | 6)``, or a kind registered with
        :func:`register_kind`.
      trainable: leaves that train in full beside the adapters (biases, norms,
        a new head: PEFT's ``modules_to_save``), same forms as ``targets``.
        Each becomes a :class:`FullWeight`, which the optimizer trains,
        ``save_adapters`` stores and ``merge`` unwraps. A leaf both targeted
        explicitly and named here is an error.
      quantize: store each adapted base quantised (QLoRA): ``"nf4"`` (4-bit
        NormalFloat, blocks of 64, double-quantised scales), ``"int8"``, or an
        :class:`Quantization`. The adapter is initialised on the dequantised
        base, so ``merge`` at init gives that base back; under :func:`lora` it
        is dequantised inside each matmul, one layer at a time in a scanned
        stack (its stack axes are coded slice by slice). Targets that are
        already :class:`QuantizedArray` leaves (from :func:`quantize`) keep
        their codes. With a quantised base, differentiate with respect to the
        trainable part only (``lf.split``), as ``jax.grad`` takes no integer
        leaves.

    Returns:
      A pytree of ``params``'s structure with ``LoraWeight`` nodes at the targets.
      ``merge`` of it equals ``params`` bit for bit (``b = 0``).

    Raises:
      TargetError: a ``rank_pattern``/``alpha_pattern`` key matched no adapted
        leaf, or is not a valid regex.
      TargetError: ``targets`` matched nothing (the message lists near paths,
        and suggests ``.*kernel`` for ``kernel``), or ``targets``/``exclude``
        is not a valid regex, list of regexes or predicate.
      TargetDtypeError: a target is not a floating-point array, or is an 8-bit
        float and no wider adapter ``dtype`` was given.
      RankError: ``rank`` is not a positive integer, or exceeds
        ``min(prod(in), prod(out))`` of an explicit target (default targets
        that small are left dense, with a warning naming them).
      ArgumentError: ``alpha`` is not a finite number > 0, ``dtype`` is not a
        floating-point dtype of at least 16 bits, ``key`` is not one PRNG key,
        ``init`` is unknown, ``variant`` is not a known kind or config, or
        ``init`` does not apply to the variant (MoRA starts at zero).
      TargetError: with ``fn``, a target is used by a primitive its variant is
        not defined for (MoRA on a convolution), or ``trainable`` matched no
        leaf or overlaps explicit ``targets``.
      LayoutError: a layout does not fit its weight's shape.
      ArgumentError: ``quantize`` is not a codebook name or ``Quantization``,
        or the variant's kind does not take a quantised base.

    Warns:
      NoAdapterWarning: no leaf was adapted (all too small for ``rank``, or
        ``fn`` never uses its argument): nothing would train.
      UserWarning: ``exclude`` matched no leaf.

    Example:
        >>> import jax.numpy as jnp, lorax_fn as lf
        >>> p = {"dense": {"kernel": jnp.zeros((16, 4)), "bias": jnp.zeros(4)}}
        >>> lp = lf.lorafy(p, rank=2, alpha=4)
        >>> lp["dense"]["kernel"]
        LoraWeight(shape=(16, 4), dtype=float32, rank=2, alpha=4, in=(0,), out=(1,))
    """
    why = inits.check(init)
    if why is not None:
        raise ArgumentError(why)
    cfg = kinds.resolve(variant, rslora)
    node_cls = cfg.adapter
    rank = checks.rank(rank)
    alpha = None if alpha is None else checks.alpha(alpha)
    ranks = _Patterns("rank_pattern", rank_pattern, lambda v, k: checks.rank(v, f"rank_pattern[{k!r}]"))
    alphas = _Patterns("alpha_pattern", alpha_pattern, lambda v, k: checks.alpha(v, f"alpha_pattern[{k!r}]"))
    dtype = None if dtype is None else checks.float_dtype(dtype, min_bits=16)
    key = jax.random.key(0) if key is None else checks.prng_key(key)
    quant = as_quantization(quantize)
    if quant is not None and not getattr(node_cls, "quantizable", False):
        raise ArgumentError(f"the {node_cls.kind} adapter kind does not take a quantised base "
                            f"({node_cls.__name__} does not declare quantizable=True); drop quantize=")
    flat, treedef = leaves_with_paths(params, is_leaf=is_node)
    paths = [p for p, _ in flat]
    want, skip = _matcher(targets, "targets"), _matcher(exclude, "exclude")
    full = _matcher(trainable, "trainable")
    seen = infer.observe(fn, params, is_leaf=is_node) if fn is not None else None

    chosen, too_small, excluded, trained = [], [], 0, []
    for i, (path, leaf) in enumerate(flat):
        if is_lora(leaf):
            continue
        if full is not None and full(path, leaf):
            if want is not None and want(path, leaf):
                raise TargetError(f"'{path}' is matched by both `targets` and `trainable`: it either gets an "
                                  "adapter or trains in full; narrow one of them")
            if not _is_float(leaf):
                raise TargetDtypeError(f"trainable leaf '{path}' is {getattr(leaf, 'dtype', type(leaf).__name__)}"
                                       ", not floating point: it cannot take gradients")
            trained.append(i)
            continue
        if skip is not None and skip(path, leaf):
            excluded += 1
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
        if dtype is None and jnp.dtype(leaf.dtype).itemsize < 2:
            raise TargetDtypeError(f"target '{path}' is {jnp.dtype(leaf.dtype).name}: 8-bit floats cannot hold "
                                   "trainable adapters; pass dtype=jnp.bfloat16 (or float32) for them, or "
                                   "exclude the leaf")
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
        _check_primitives(node_cls, path, seen.get(i, []) if seen is not None else [])
        r, from_pattern = ranks.lookup(path, rank)
        if "rank" in node_cls.static and r > min(fan_in, fan_out):
            msg = (f"rank {r} exceeds the factorised dims of '{path}' (shape "
                   f"{tuple(leaf.shape)}: in {fan_in}, out {fan_out})")
            if want is not None or from_pattern:
                raise RankError(msg + (" (from rank_pattern)" if from_pattern else ""))
            too_small.append(msg)
            continue
        al, _ = alphas.lookup(path, float(r) if alpha is None else alpha)
        chosen.append((i, path, leaf, lay, fan_in, r, al))

    if full is not None and not trained:
        raise TargetError(f"trainable={trainable!r} matched no floating leaf; nearest paths: "
                          f"{_nearest(trainable, paths)}{_partial_hint(trainable, paths)}")
    if want is not None and not chosen:
        raise TargetError(f"targets={targets!r} matched no adaptable leaf; nearest paths: "
                          f"{_nearest(targets, paths)}{_partial_hint(targets, paths)}")
    if skip is not None and not excluded:
        warnings.warn(f"exclude={exclude!r} matched no leaf, so nothing was excluded; nearest paths: "
                      f"{_nearest(exclude, paths)}{_partial_hint(exclude, paths)}", UserWarning, stacklevel=2)
    for table in (ranks, alphas):
        table.check_used([p for _, p, *_ in chosen])
    if not chosen and not trained and not any(is_lora(leaf) for _, leaf in flat):  # adapters already there still train
        warnings.warn(_why_nothing(rank, too_small, fn, seen), NoAdapterWarning, stacklevel=2)
    elif too_small:
        warnings.warn("lorafy left these default targets dense: " + "; ".join(too_small)
                      + ". Pass `targets` to choose leaves explicitly.", stacklevel=2)
    new = [leaf for _, leaf in flat]
    for i in trained:
        if is_quantized(new[i]):
            raise TargetError(f"'{paths[i]}' is quantised and cannot train in full; dequantize it first")
        new[i] = FullWeight(new[i])
    for n, (i, path, leaf, lay, fan_in, rank, alpha) in enumerate(chosen):
        k = jax.random.fold_in(key, n)
        coded = quant.apply(leaf, leading_stack(lay.stack), path) if quant is not None else leaf
        if is_quantized(coded) and not getattr(node_cls, "quantizable", False):
            raise TargetError(f"'{path}' is quantised, and the {node_cls.kind} adapter kind does not take "
                              "a quantised base; exclude it or dequantize it first")
        base = coded.dequantize() if is_quantized(coded) else leaf
        adapter_dtype = jnp.dtype(leaf.dtype) if dtype is None else dtype
        node = node_cls.create(base, lay, k, rank=rank, alpha=alpha, dtype=adapter_dtype, init=init,
                               config=cfg, path=path)
        if is_quantized(coded):
            # a kind that keeps the base as given keeps its codes; one that rewrote it (PiSSA's
            # residual) gets the rewritten base quantised with the same settings
            spec = quant if quant is not None else Quantization(coded.codebook, coded.block_size,
                                                                coded.double_quant, coded.dtype)
            node = node.replace(w=coded if node.w is base else spec.apply(node.w, coded.lead, path))
        new[i] = node
    return jax.tree_util.tree_unflatten(treedef, new)



def _check_primitives(node_cls, path: str, uses: list) -> None:
    """TargetError when ``fn`` uses the weight in a primitive its kind is not defined for."""
    bad = sorted({u.primitive for u in uses if u.primitive and u.primitive not in node_cls.primitives})
    if bad:
        raise TargetError(f"'{path}' is used by {', '.join(bad)}, which the {node_cls.kind} adapter kind does "
                          f"not support (it is defined for {', '.join(sorted(node_cls.primitives))}); exclude "
                          "the leaf or adapt it with variant='lora'")
