"""`lora(fn)` and `explain(fn, ...)`: run a function with LoRA weights kept low-rank."""

from __future__ import annotations

import collections
import functools
import warnings
from typing import Any, Callable

import jax
import numpy as np
from jax.extend.core import ClosedJaxpr, Jaxpr

from . import checks
from .errors import ArgumentError, NoAdapterWarning
from .interpret import Context, Use, run_closed
from .paths import path_str
from .quant import frozen
from .weight import is_lora, is_node


def _is_array(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic)) or hasattr(x, "__jax_array__")


def _prepare(args, kwargs):
    """Split the call's leaves into LoRA weights, arrays and static Python values."""
    flat, treedef = jax.tree_util.tree_flatten((args, kwargs), is_leaf=is_node)
    kinds, dynamic, statics, avals = [], [], [], []
    for leaf in flat:
        if is_node(leaf):
            kinds.append("lora" if is_lora(leaf) else "quantized")
            dynamic.append(leaf)
            avals.append(jax.ShapeDtypeStruct(leaf.shape, leaf.dtype))
        elif _is_array(leaf) or isinstance(leaf, jax.core.Tracer):
            kinds.append("array")
            dynamic.append(leaf)
            avals.append(jax.ShapeDtypeStruct(np.shape(leaf), jax.numpy.result_type(leaf),
                                              weak_type=getattr(leaf, "weak_type", False)))
        else:
            kinds.append("static")
            statics.append(leaf)
    return treedef, tuple(kinds), dynamic, tuple(statics), avals


def _paths(args, kwargs) -> list:
    """Parameter path of every dynamic leaf (None for plain arrays), relative to its argument."""
    flat = jax.tree_util.tree_flatten_with_path((args, kwargs), is_leaf=is_node)[0]
    out = []
    for keypath, leaf in flat:
        if is_node(leaf):
            # relative to the first positional argument (the params, by convention); other
            # arguments keep their index or keyword name so that two trees stay apart
            first = keypath[0].idx == 0 and keypath[1].idx == 0
            out.append(path_str(keypath[2:] if first else keypath[1:]) or "<argument 0>")
        elif _is_array(leaf) or isinstance(leaf, jax.core.Tracer):
            out.append(None)
    return out


def _key(treedef, kinds, statics, avals):
    try:
        # 1, 1.0 and True are equal and hash alike, but trace to different dtypes
        key = (treedef, kinds, tuple((type(v), v) for v in statics),
               tuple((a.shape, str(a.dtype), a.weak_type) for a in avals))
        hash(key)
        return key
    except TypeError:
        return None


def _trace(fn, treedef, kinds, statics, avals):
    def flat_fn(*dyn):
        it_d, it_s = iter(dyn), iter(statics)
        leaves = [next(it_s) if k == "static" else next(it_d) for k in kinds]
        args, kwargs = jax.tree_util.tree_unflatten(treedef, leaves)
        return fn(*args, **kwargs)

    closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(*avals)
    return closed, jax.tree_util.tree_structure(out_shape)


def _warn_no_adapter(fn: Callable) -> None:
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)
    warnings.warn(
        f"lora({name}) was called with no LoraWeight among its arguments, so it has nothing to "
        "keep low-rank; if the function closes over lorafied params, they are constants of its "
        "trace and their adapters get no gradient (all zeros, silently). Pass the lorafied "
        "params as an argument of the wrapped function instead of closing over them: "
        "lora(apply)(lp, x), not lora(lambda x: apply(lp, x))(x).", NoAdapterWarning, stacklevel=3)


def _interpret(closed, ctx: Context, kinds, paths, rate, dynamic, key=None):
    invals = [type(x).enter(x, p) if k == "lora" else frozen.enter(x, p) if k == "quantized" else x
              for x, k, p in zip(dynamic, [k for k in kinds if k != "static"], paths)]
    with ctx.dropping(rate, key):
        return run_closed(ctx, closed, invals, dense_outputs="returned by the function")


def _check_rate(dropout: Any) -> float:
    try:
        rate = float(dropout)
    except (TypeError, ValueError):
        rate = float("nan")
    if isinstance(dropout, (bool, str)) or not 0.0 <= rate < 1.0:
        raise ArgumentError(f"dropout must be a rate in [0, 1), got {dropout!r}")
    return rate


def lora(fn: Callable, *, on_materialize: str = "warn", formulation: str = "auto",
         dropout: float | None = None) -> Callable:
    """Transform ``fn`` so that it accepts :class:`LoraWeight` leaves wherever arrays go.

    The returned function computes exactly what ``fn`` computes on the merged
    weights ``w + scale·a⊗b``, but each LoRA weight stays factored where a rule
    allows: a matmul becomes ``x·w + scale·(x·a)·b``, a convolution runs ``a``
    as a kernel then ``b`` as a 1×1, an embedding lookup gathers rows of ``a``.
    ``w`` is wrapped in ``lax.stop_gradient``: no dense weight gradient is ever
    computed. ``jit``, ``scan``, ``cond``, ``while_loop``, ``checkpoint``,
    ``custom_jvp``/``custom_vjp`` and ``shard_map`` inside ``fn`` are entered
    and emitted again. The trace is cached per argument structure and shapes;
    non-array leaves of the arguments (Python numbers, strings, flags) are
    static and part of that cache key.

    Args:
      fn: any function of pytrees of arrays.
      on_materialize: what to do when a LoRA weight meets an operation with no
        low-rank rule and must be built densely (always correct): ``"allow"``,
        ``"warn"`` (default; names the parameter path and the primitive) or
        ``"raise"`` (:class:`~lorax_fn.MaterializationError`).
      formulation: how a matmul with a LoRA weight runs forward. ``"factored"``
        computes ``x·w + scale·(x·a)·b``; ``"merged"`` computes
        ``x·(w + scale·a·b)``, building the merged weight as a temporary;
        ``"auto"`` (default) takes merged where that costs fewer FLOPs (the
        contracted size is below the number of rows of ``x``, as in training
        on batches of tokens) and the weight is float32 or wider, factored
        otherwise (small batches, decoding, bfloat16). Gradients are the same
        factored ones in every case: no dense weight gradient is formed and
        no merged weight is kept for the backward pass.
      dropout: rate of dropout on the adapters' input (PEFT's ``lora_dropout``):
        the low-rank path of each matmul and convolution sees ``x`` with
        entries zeroed at this rate (and the rest scaled by ``1/(1-rate)``),
        the frozen path sees ``x`` unchanged. It is on only in calls that pass
        ``dropout_key=`` (a PRNG key; the keyword is taken whenever ``dropout``
        is given, and ignored at rate 0, so one training loop serves every
        rate), so evaluation calls without a key run the plain path exactly.
        Every use draws its own mask, every step of a ``scan``/``while_loop``
        (each layer of a scanned stack) its own; under ``jax.vmap`` one
        unbatched key gives every example the same mask, as any JAX random
        draw does (map over split keys for distinct ones). A weight that is
        materialised (see ``on_materialize``), used by a row lookup or passed
        into a ``custom_jvp``/``custom_vjp`` function gets none; with dropout
        on, matmuls run in the factored formulation.

    Returns:
      A function with ``fn``'s signature and outputs. Calling it with no
      :class:`LoraWeight` among the arguments warns (:class:`NoAdapterWarning`,
      once per trace): LoRA weights that ``fn`` closes over are not seen by
      the transform and their adapters take no gradient.

    Raises:
      MaterializationError: under ``on_materialize="raise"``, at trace time.

    Example:
        >>> import jax, jax.numpy as jnp, lorax_fn as lf
        >>> lp = lf.lorafy({"w": jnp.ones((3, 2))}, rank=1)
        >>> lf.lora(lambda p, x: x @ p["w"])(lp, jnp.ones((4, 3))).shape
        (4, 2)
    """
    ctx = Context(on_materialize, formulation=formulation)
    dropout_given = dropout is not None
    rate = _check_rate(0.0 if dropout is None else dropout)
    cache: dict = {}

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        drop_key = kwargs.pop("dropout_key", None) if dropout_given else None
        if drop_key is not None:
            drop_key = checks.prng_key(drop_key, "dropout_key") if rate > 0 else None
        treedef, kinds, dynamic, statics, avals = _prepare(args, kwargs)
        key = _key(treedef, kinds, statics, avals)
        entry = cache.get(key) if key is not None else None
        if entry is None:
            if "lora" not in kinds and "quantized" not in kinds:
                _warn_no_adapter(fn)
            closed, out_tree = _trace(fn, treedef, kinds, statics, avals)
            run = jax.jit(functools.partial(_interpret, closed, ctx, kinds, _paths(args, kwargs), rate))
            entry = (run, out_tree)
            leaks = any(isinstance(c, jax.core.Tracer) for c in closed.consts)
            if key is not None and not leaks:
                cache[key] = entry
        run, out_tree = entry
        return jax.tree_util.tree_unflatten(out_tree, run(dynamic, drop_key))

    wrapped.cache_size = lambda: len(cache)  # type: ignore[attr-defined]
    return wrapped


class Explanation(tuple):
    """The uses :func:`explain` found: a tuple of ``Use(path, primitive, low_rank, detail)``.

    The tuple holds the uses of the forward pass. ``.gradient`` holds those
    of the differentiated computation, what ``jax.grad`` of the transformed
    function runs; they differ where a ``custom_jvp``/``custom_vjp`` rule
    receives a LoRA weight, since the rule is written for the dense weight.

    Example:
        >>> import jax.numpy as jnp, lorax_fn as lf
        >>> lp = lf.lorafy({"w": jnp.ones((3, 2))}, rank=1)
        >>> rep = lf.explain(lambda p, x: x @ p["w"], lp, jnp.ones((4, 3)))
        >>> print(rep)
        path  primitive              computed
        w     dot_general            low-rank
        1 uses, 0 materialised
        >>> rep.materialized, rep.gradient.materialized
        ((), ())
    """

    def __new__(cls, uses=(), gradient: "Explanation | None" = None, gradient_error: str = ""):
        self = super().__new__(cls, uses)
        self._gradient = gradient
        self._gradient_error = gradient_error
        return self

    @property
    def materialized(self) -> tuple[Use, ...]:
        """The uses that built a dense ``w + ΔW``."""
        return tuple(u for u in self if not u.low_rank)

    @property
    def gradient(self) -> "Explanation | None":
        """The uses under differentiation with respect to the adapters (as ``jax.grad`` in
        training); ``None`` when JAX cannot differentiate the function, or for a report
        that is itself a gradient's."""
        return getattr(self, "_gradient", None)

    def by_path(self) -> dict[str, tuple[Use, ...]]:
        """Uses grouped by parameter path."""
        out: dict[str, list] = {}
        for u in self:
            out.setdefault(u.path, []).append(u)
        return {k: tuple(v) for k, v in out.items()}

    def _gradient_only(self) -> list[Use]:
        """Materialised uses of the gradient beyond those of the forward pass, in order."""
        forward = collections.Counter(self.materialized)
        extra = []
        for u in self.gradient.materialized if self.gradient else ():
            if forward[u]:
                forward[u] -= 1  # the same use, already listed for the forward pass
            else:
                extra.append(u)
        return extra

    def __str__(self) -> str:
        more = self._gradient_only()
        note = getattr(self, "_gradient_error", "")
        if not self and not more:
            return "no LoRA weight is used" + (f"\n{note}" if note else "")
        width = max([len("path")] + [len(u.path) for u in (*self, *more)])
        row = lambda u: f"{u.path:<{width}}  {u.primitive:<22} " + (  # noqa: E731
            "low-rank" if u.low_rank else f"MATERIALISED ({u.detail})")
        lines = [f"{'path':<{width}}  {'primitive':<22} computed"] + [row(u) for u in self]
        lines.append(f"{len(self)} uses, {len(self.materialized)} materialised")
        if more:
            lines.append(f"differentiating (jax.grad w.r.t. the adapters) also materialises "
                         f"{len(more)}:")
            lines += [row(u) for u in more]
        if note:
            lines.append(note)
        return "\n".join(lines)


_CUSTOM_RULES = ("custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr")


def _has_custom_rule(jaxpr) -> bool:
    """Whether a ``custom_jvp``/``custom_vjp`` call occurs anywhere in ``jaxpr``."""
    jaxpr = jaxpr.jaxpr if isinstance(jaxpr, ClosedJaxpr) else jaxpr
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in _CUSTOM_RULES:
            return True
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                if isinstance(sub, (ClosedJaxpr, Jaxpr)) and _has_custom_rule(sub):
                    return True
    return False


def _gradient_uses(closed, kinds, paths, dynamic) -> list:
    """The uses recorded while ``jax.vjp`` traces the interpreter, w.r.t. every adapter."""
    uses: list = []
    ctx = Context("allow", record=uses)
    is_lw = [is_lora(x) for x in dynamic]

    def forward(dyn, factors):
        it = iter(factors)
        dyn = [x.replace(**dict(zip(x.trainable, next(it)))) if lw else x for x, lw in zip(dyn, is_lw)]
        return _interpret(closed, ctx, kinds, paths, 0.0, dyn)

    def differentiated(dyn):
        factors = [tuple(getattr(x, n) for n in x.trainable) for x in dyn if is_lora(x)]
        # the rules of custom_jvp/custom_vjp are traced when JAX linearises, i.e. in vjp
        return jax.vjp(functools.partial(forward, dyn), factors)[0]

    jax.eval_shape(differentiated, dynamic)
    return uses


def explain(fn: Callable, *args: Any, **kwargs: Any) -> Explanation:
    """Report how each use of each LoRA weight in ``fn(*args, **kwargs)`` is computed.

    Runs :func:`lora`'s interpreter abstractly (``jax.eval_shape``: no FLOPs)
    and lists, per parameter path, every primitive that consumed the weight and
    whether it stayed low-rank or was materialised (and why). It does so for
    the forward pass and for the gradient: a ``custom_jvp``/``custom_vjp``
    rule that receives a LoRA weight keeps the forward pass low-rank but, once
    differentiated, runs on the dense weight (``lora`` warns then, at gradient
    time); ``.gradient`` reports that ahead of time, and ``str()`` lists it.

    Args:
      fn: the un-transformed function, as you would pass it to :func:`lora`.
      *args, **kwargs: its arguments, with :class:`LoraWeight` leaves.

    Returns:
      An :class:`Explanation`: a tuple of ``Use`` records of the forward pass;
      ``str()`` gives a table, ``.materialized`` the uses that fell off the
      fast path, ``.gradient`` the same report for the computation that
      ``jax.grad`` with respect to the adapters runs (``None``, with a note in
      ``str()``, when JAX cannot differentiate ``fn``).

    Raises:
      Whatever tracing ``fn`` on these arguments raises (as :func:`lora` would);
      a failure to differentiate ``fn`` is reported, not raised.

    Example:
        >>> import jax, jax.numpy as jnp, lorax_fn as lf
        >>> @jax.custom_vjp
        ... def mm(x, w):
        ...     return x @ w
        >>> mm.defvjp(lambda x, w: (x @ w, (x, w)), lambda r, g: (g @ r[1].T, r[0].T @ g))
        >>> lp = lf.lorafy({"w": jnp.ones((3, 2))}, rank=1)
        >>> rep = lf.explain(lambda p, x: mm(x, p["w"]), lp, jnp.ones((4, 3)))
        >>> [(u.path, u.primitive, u.low_rank) for u in rep]
        [('w', 'dot_general', True)]
        >>> [(u.path, u.primitive, u.low_rank) for u in rep.gradient.materialized]
        [('w', 'custom_vjp_call', False)]
    """
    treedef, kinds, dynamic, statics, avals = _prepare(args, kwargs)
    closed, _ = _trace(fn, treedef, kinds, statics, avals)
    paths = _paths(args, kwargs)
    uses: list = []
    ctx = Context("allow", record=uses)
    jax.eval_shape(functools.partial(_interpret, closed, ctx, kinds, paths, 0.0), dynamic)
    if "lora" not in kinds or not _has_custom_rule(closed):
        # elsewhere differentiation transforms the operations the forward pass
        # emitted; only a custom rule runs other code (its own, on the dense weight)
        return Explanation(uses, gradient=Explanation(uses))
    try:
        grad_uses = _gradient_uses(closed, kinds, paths, dynamic)
    except Exception as err:  # JAX cannot differentiate fn: then there is no gradient to explain
        first = (str(err).strip().splitlines() or [""])[0]
        return Explanation(uses, gradient_error="the gradient was not explained: JAX could not "
                           f"differentiate the function ({type(err).__name__}: {first})")
    return Explanation(uses, gradient=Explanation(grad_uses))
