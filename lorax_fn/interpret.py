"""The jaxpr interpreter behind :func:`lorax_fn.lora`.

It follows the pattern of JAX's "Writing custom Jaxpr interpreters": walk the
equations of a closed jaxpr with an environment from variables to values. A
value is either an ordinary array (or tracer) or a :class:`~lorax_fn.lazy.Lazy`
LoRA weight. Equations without lazy inputs are bound unchanged; the others go
to a rule (:mod:`lorax_fn.rules`, :mod:`lorax_fn.control`) or, failing that, are
materialised under the caller's policy.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.extend.core import Literal

from . import lazy as lz
from .errors import MaterializationError, MaterializationWarning
from .lazy import Lazy

log = logging.getLogger("lorax_fn")

POLICIES = ("allow", "warn", "raise")


class Use(NamedTuple):
    """One use of a LoRA weight found while running a function under :func:`lora`.

    Example:
        >>> import jax.numpy as jnp, lorax_fn as lf
        >>> lp = lf.lorafy({"w": jnp.ones((3, 2))}, rank=1)
        >>> lf.explain(lambda p, x: x @ p["w"], lp, jnp.ones((4, 3)))[0]
        Use(path='w', primitive='dot_general', low_rank=True, detail='low-rank')
    """

    path: str
    primitive: str
    low_rank: bool
    detail: str = ""


FORMULATIONS = ("auto", "factored", "merged")  # see lora(); rules._formulation decides "auto"


class Context:
    """Per-run state of the interpreter: the materialisation policy and a log of uses."""

    def __init__(self, policy: str = "warn", record: list | None = None,
                 formulation: str = "auto"):
        if policy not in POLICIES:
            raise ValueError(f"on_materialize must be one of {POLICIES}, got {policy!r}")
        if formulation not in FORMULATIONS:
            raise ValueError(f"formulation must be one of {FORMULATIONS}, got {formulation!r}")
        self.policy = policy
        self.uses = record
        self.formulation = formulation
        # dropout on the adapter input: (rate, key) while a call with a dropout key runs, else None
        self.drop: tuple[float, Any] | None = None
        self.draws = 0  # masks drawn under the current key, each from its own fold_in

    @contextlib.contextmanager
    def dropping(self, rate: float, key: Any):
        """Run with adapter-input dropout at ``rate`` from ``key`` (``key=None``: none)."""
        saved = self.drop, self.draws
        self.drop, self.draws = ((rate, key) if key is not None and rate > 0 else None), 0
        try:
            yield
        finally:
            self.drop, self.draws = saved

    def next_key(self) -> Any:
        """A fresh key from the current dropout key (for one mask, or for a loop's per-step keys)."""
        rate, key = self.drop
        self.draws += 1
        return jax.random.fold_in(key, self.draws)

    def dropout(self, x: Any) -> Any:
        """``x`` with inverted dropout applied when dropout is on (the adapter path's input), else ``x``."""
        if self.drop is None:
            return x
        rate = self.drop[0]
        keep = jax.random.bernoulli(self.next_key(), 1.0 - rate, jnp.shape(x))
        return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))

    def note(self, z: Lazy, eqn, low_rank: bool, detail: str = "") -> None:
        if self.uses is not None:
            self.uses.append(Use(z.meta.path, eqn.primitive.name, low_rank, detail))

    def materialize(self, z: Lazy, eqn, why: str = "") -> Any:
        """Dense ``w + ΔW`` for ``z``, subject to the policy (the always-correct fallback)."""
        name = eqn.primitive.name if eqn is not None else "output"
        if getattr(z.meta.kind, "silent", False):
            return lz.materialize(z)
        msg = (f"LoRA weight '{z.meta.path}' (shape {tuple(z.shape)}) is materialised as a dense "
               f"matrix by '{name}'" + (f": {why}" if why else ""))
        if self.policy == "raise":
            raise MaterializationError(msg + ". Pass on_materialize='warn' or 'allow' to accept "
                                       "this, or see lorax_fn.explain.")
        if self.policy == "warn":
            warnings.warn(msg, MaterializationWarning, stacklevel=2)
        log.debug(msg)
        if self.uses is not None:
            self.uses.append(Use(z.meta.path, name, False, why or "materialised"))
        return lz.materialize(z)

    def dense(self, v: Any, eqn=None, why: str = "") -> Any:
        return self.materialize(v, eqn, why) if isinstance(v, Lazy) else v

    def eval(self, jaxpr, consts, args) -> list:
        return eval_jaxpr(self, jaxpr, consts, args)


def eval_jaxpr(ctx: Context, jaxpr, consts, args) -> list:
    """Evaluate an (open) jaxpr whose inputs may be lazy LoRA values."""
    from .control import HIGHER_ORDER
    from .rules import RULES

    env: dict = {}

    def read(v):
        return v.val if isinstance(v, Literal) else env[v]

    for v, x in zip(jaxpr.constvars, consts):
        env[v] = x
    for v, x in zip(jaxpr.invars, args):
        env[v] = x
    split = _split_sums(jaxpr)
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        with eqn.ctx.manager:
            if eqn.outvars[0] in split and any(isinstance(x, Lazy) for x in invals):
                outs = _apply_rule(ctx, eqn, invals, _SPLIT_RULES, {})
            elif any(isinstance(x, _Sum) for x in invals):
                if any(isinstance(x, Lazy) for x in invals):
                    invals = [_total(x) if isinstance(x, _Sum) else x for x in invals]
                    outs = _apply_rule(ctx, eqn, invals, RULES, HIGHER_ORDER)
                else:
                    outs = _add_sums(eqn, invals)
            elif not any(isinstance(x, Lazy) for x in invals):
                outs = bind(eqn, *invals)
            else:
                outs = _apply_rule(ctx, eqn, invals, RULES, HIGHER_ORDER)
        if not eqn.primitive.multiple_results:
            outs = [outs]
        for v, x in zip(eqn.outvars, outs):
            env[v] = x
    return [read(v) for v in jaxpr.outvars]


class _Sum(NamedTuple):
    """A LoRA matmul's two terms, kept apart until the single ``add`` that consumes it."""

    dense: Any
    low: Any


def _split_sums(jaxpr) -> set:
    """Outputs of ``dot_general`` whose only use is an ``add`` with no other such output.

    For ``y = x·W + c`` (a bias, a residual) the interpreter emits
    ``(x·w + c) + scale·(x·a)·b`` rather than ``(x·w + scale·(x·a)·b) + c``: the
    same graph a LoRA layer written by hand gives XLA, which then fuses ``c``
    into the dense matmul and plans less scratch memory (one activation per
    layer on the benchmark transformer).
    """
    uses: dict = {}
    for e in jaxpr.eqns:
        for v in e.invars:
            if not isinstance(v, Literal):
                uses[v] = uses.get(v, 0) + 1
    for v in jaxpr.outvars:
        if not isinstance(v, Literal):
            uses[v] = uses.get(v, 0) + 2
    dots = {e.outvars[0] for e in jaxpr.eqns if e.primitive.name == "dot_general"}
    out = set()
    for e in jaxpr.eqns:
        if e.primitive.name != "add":
            continue
        mine = [v for v in e.invars if not isinstance(v, Literal) and v in dots and uses[v] == 1]
        if len(mine) == 1 and all(v.aval.shape == e.outvars[0].aval.shape for v in mine):
            out.add(mine[0])
    return out


def _dot_general_split(ctx, eqn, invals):
    from .rules import dot_general_parts
    parts = dot_general_parts(ctx, eqn, invals)
    return None if parts is None else [_Sum(*parts)]


_SPLIT_RULES = {"dot_general": _dot_general_split}


def _total(s: "_Sum"):
    return s.dense if s.low is None else s.dense + s.low


def _add_sums(eqn, invals):
    """``add`` with one operand a :class:`_Sum`: the dense terms first, then the low-rank one."""
    (s,) = [x for x in invals if isinstance(x, _Sum)]
    dense = bind(eqn, *[x.dense if isinstance(x, _Sum) else x for x in invals])
    return dense if s.low is None else dense + s.low.astype(dense.dtype)


def _apply_rule(ctx, eqn, invals, rules, higher):
    name = eqn.primitive.name
    rule = higher.get(name) or rules.get(name)
    outs = rule(ctx, eqn, invals) if rule is not None else None
    if outs is not None:
        for z in invals:
            if isinstance(z, Lazy) and name in rules and not any(isinstance(o, Lazy) for o in outs):
                ctx.note(z, eqn, True, "low-rank")
        return outs if eqn.primitive.multiple_results else outs[0]
    why = "no low-rank rule for this primitive" if rule is None else "this use does not fit the weight's layout"
    dense = [ctx.dense(x, eqn, why) for x in invals]
    return bind(eqn, *dense)


def bind(eqn, *args, **overrides):
    """Bind ``eqn``'s primitive again on new operands (params may be overridden)."""
    params = {**eqn.params, **overrides}
    return eqn.primitive.bind(*args, **eqn.primitive.get_bind_params(params))


def jaxpr_parts(j) -> tuple[Any, list]:
    """``(open jaxpr, consts)`` of a ClosedJaxpr or an open Jaxpr."""
    if hasattr(j, "consts") and hasattr(j, "jaxpr"):
        return j.jaxpr, list(j.consts)
    return j, []


def run_closed(ctx: Context, j, args, dense_outputs: bool | str = False) -> list:
    """Evaluate a (closed) jaxpr; with ``dense_outputs`` (True or the reason to give),
    materialise lazy outputs, as bodies that must return arrays need."""
    jaxpr, consts = jaxpr_parts(j)
    outs = ctx.eval(jaxpr, consts, list(args))
    if dense_outputs:
        why = dense_outputs if isinstance(dense_outputs, str) else "returned from a control-flow body"
        outs = [ctx.dense(o, None, why) for o in outs]
    return outs


Rule = Callable[[Context, Any, list], "list | None"]
