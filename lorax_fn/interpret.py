"""The jaxpr interpreter behind :func:`lorax_fn.lora`.

It follows the pattern of JAX's "Writing custom Jaxpr interpreters": walk the
equations of a closed jaxpr with an environment from variables to values. A
value is either an ordinary array (or tracer) or a :class:`~lorax_fn.lazy.Lazy`
LoRA weight. Equations without lazy inputs are bound unchanged; the others go
to a rule (:mod:`lorax_fn.rules`, :mod:`lorax_fn.control`) or, failing that, are
materialised under the caller's policy.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any, Callable, NamedTuple

from jax.extend.core import Literal

from . import lazy as lz
from .errors import MaterializationError, MaterializationWarning
from .lazy import Lazy

log = logging.getLogger("lorax_fn")

POLICIES = ("allow", "warn", "raise")


class Use(NamedTuple):
    """One use of a LoRA weight found while running a function under :func:`lora`."""

    path: str
    primitive: str
    low_rank: bool
    detail: str = ""


class Context:
    """Per-run state of the interpreter: the materialisation policy and a log of uses."""

    def __init__(self, policy: str = "warn", record: list | None = None):
        if policy not in POLICIES:
            raise ValueError(f"on_materialize must be one of {POLICIES}, got {policy!r}")
        self.policy = policy
        self.uses = record

    def note(self, z: Lazy, eqn, low_rank: bool, detail: str = "") -> None:
        if self.uses is not None:
            self.uses.append(Use(z.meta.path, eqn.primitive.name, low_rank, detail))

    def materialize(self, z: Lazy, eqn, why: str = "") -> Any:
        """Dense ``w + ΔW`` for ``z``, subject to the policy (the always-correct fallback)."""
        name = eqn.primitive.name if eqn is not None else "output"
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
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        with eqn.ctx.manager:
            if not any(isinstance(x, Lazy) for x in invals):
                outs = bind(eqn, *invals)
            else:
                outs = _apply_rule(ctx, eqn, invals, RULES, HIGHER_ORDER)
        if not eqn.primitive.multiple_results:
            outs = [outs]
        for v, x in zip(eqn.outvars, outs):
            env[v] = x
    return [read(v) for v in jaxpr.outvars]


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
