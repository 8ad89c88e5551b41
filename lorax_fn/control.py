"""Higher-order primitives entered by the interpreter and re-emitted through public APIs.

Each rule runs the primitive's body with the interpreter, passing lazy LoRA
values in as pytrees of their children (``w``, ``a``, ``b``), and emits the
primitive again with ``jax.jit``, ``lax.scan``, ``lax.switch``,
``lax.while_loop``, ``jax.checkpoint``, ``jax.custom_jvp``/``custom_vjp`` or
``jax.shard_map``. So a scanned stack of layers stays a scan and a remat policy
stays in force, while the matmuls inside stay low-rank.
"""

from __future__ import annotations

import contextlib

import jax
from jax import lax

from . import lazy as lz
from .interpret import bind, run_closed
from .lazy import Lazy


def _jit(ctx, eqn, invals):
    body = eqn.params["jaxpr"]

    def fn(*args):
        return run_closed(ctx, body, args)

    fn.__name__ = str(eqn.params.get("name", "jit"))
    return jax.jit(fn)(*invals)


def _remat(ctx, eqn, invals):
    p = eqn.params

    def fn(*args):
        return run_closed(ctx, p["jaxpr"], args)

    return jax.checkpoint(fn, prevent_cse=p.get("prevent_cse", True), policy=p.get("policy"))(*invals)


def _scan(ctx, eqn, invals):
    p = eqn.params
    nc, ncar = p["num_consts"], p["num_carry"]
    consts, init, xs = invals[:nc], invals[nc:nc + ncar], invals[nc + ncar:]
    init = [ctx.dense(v, eqn, "a LoRA weight in a scan carry") for v in init]
    xs_in, metas = [], []
    for v in xs:
        if isinstance(v, Lazy):
            split = lz.unstack_leading(v)
            if split is None:
                xs_in.append(ctx.dense(v, eqn, "scanned over an axis that is not a stack axis"))
                metas.append(None)
            else:
                xs_in.append(split[0])
                metas.append(split[1])
        else:
            xs_in.append(v)
            metas.append(None)

    # with dropout, each step (each layer of a scanned stack) draws its masks from its own key
    keys = None if ctx.drop is None else jax.random.split(ctx.next_key(), p["length"])
    rate = None if ctx.drop is None else ctx.drop[0]

    def body(carry, x):
        x, key = x
        xv = [Lazy.tree_unflatten(m, c) if m is not None else c for c, m in zip(x, metas)]
        with _step_dropout(ctx, rate, key):
            outs = run_closed(ctx, p["jaxpr"], list(consts) + list(carry) + xv, dense_outputs=True)
        return outs[:ncar], outs[ncar:]

    extra = {"_split_transpose": p["_split_transpose"]} if "_split_transpose" in p else {}
    carry, ys = lax.scan(body, init, (xs_in, keys), length=p["length"], reverse=p["reverse"],
                         unroll=p["unroll"], **extra)
    return list(carry) + list(ys)


def _cond(ctx, eqn, invals):
    index, *ops = invals
    branches = [
        (lambda br: (lambda *a: run_closed(ctx, br, a, dense_outputs=True)))(br)
        for br in eqn.params["branches"]
    ]
    return list(lax.switch(index, branches, *ops))


def _while(ctx, eqn, invals):
    p = eqn.params
    cn, bn = p["cond_nconsts"], p["body_nconsts"]
    cconsts, bconsts, init = invals[:cn], invals[cn:cn + bn], invals[cn + bn:]
    init = tuple(ctx.dense(v, eqn, "a LoRA weight in a while-loop carry") for v in init)

    # with dropout the loop carries a key and splits it each step, so no two steps share masks
    rate = None if ctx.drop is None else ctx.drop[0]

    def cond_fn(state):
        carry, _ = state
        return run_closed(ctx, p["cond_jaxpr"], list(cconsts) + list(carry), dense_outputs=True)[0]

    def body_fn(state):
        carry, key = state
        if key is not None:
            key, step_key = jax.random.split(key)
        with _step_dropout(ctx, rate, None if key is None else step_key):
            outs = run_closed(ctx, p["body_jaxpr"], list(bconsts) + list(carry), dense_outputs=True)
        return tuple(outs), key

    carry, _ = lax.while_loop(cond_fn, body_fn, (init, None if rate is None else ctx.next_key()))
    return list(carry)


def _step_dropout(ctx, rate, key):
    """The dropout scope of one loop step: its own key when dropout is on, else nothing changes."""
    return ctx.dropping(rate, key) if key is not None else contextlib.nullcontext()


def _dense_tangent(primal, tangent):
    """Tangent of the dense value of a lazy primal (a linear map of the factor tangents)."""
    if not isinstance(primal, Lazy):
        return tangent
    return jax.jvp(lz.materialize, (primal,), (tangent,))[1]


_CUSTOM_WHY = "the function's own derivative rule needs the dense weight"


def _dense_bases(invals):
    """Quantised bases dequantised: these rules hand the lazy values to code that differentiates or
    partitions them whole, which the integer codes cannot take part in."""
    return [lz.dense_base(v) if isinstance(v, Lazy) else v for v in invals]


def _custom_jvp(ctx, eqn, invals):
    p = eqn.params
    invals = _dense_bases(invals)

    @jax.custom_jvp
    def fn(*args):
        # no dropout: under differentiation the function's own rule runs on the dense weight, without it
        with ctx.dropping(0.0, None):
            return run_closed(ctx, p["call_jaxpr"], args, dense_outputs=True)

    @fn.defjvp
    def fn_jvp(primals, tangents):
        # the function's own rule, applied to the dense weight and its tangent
        dense = [ctx.dense(x, eqn, _CUSTOM_WHY) for x in primals]
        dts = [_dense_tangent(x, t) for x, t in zip(primals, tangents)]
        outs, touts = jax.jvp(lambda *d: bind(eqn, *d), dense, dts)
        return outs, touts

    return fn(*invals)


def _custom_vjp(ctx, eqn, invals):
    p = eqn.params
    invals = _dense_bases(invals)

    def dense_call(*args):
        return bind(eqn, *[ctx.dense(x, eqn, _CUSTOM_WHY) for x in args])

    @jax.custom_vjp
    def fn(*args):
        with ctx.dropping(0.0, None):  # as in _custom_jvp: the same value with and without grad
            return run_closed(ctx, p["call_jaxpr"], args, dense_outputs=True)

    def fwd(*args):
        # the backward pass goes through the function's own rule on the dense weight
        outs, pullback = jax.vjp(dense_call, *args)
        return outs, pullback

    def bwd(pullback, cts):
        return pullback(cts)

    fn.defvjp(fwd, bwd)
    return fn(*invals)


def _shard_map(ctx, eqn, invals):
    p = eqn.params
    invals = _dense_bases(invals)
    specs = []
    for v, spec in zip(invals, p["in_specs"]):
        if not isinstance(v, Lazy):
            specs.append(spec)
            continue
        specs.append(v.with_parts(spec, lz.child_specs(v, tuple(spec))))

    def fn(*args):
        return tuple(run_closed(ctx, p["jaxpr"], args, dense_outputs=True))

    kwargs = dict(mesh=p["mesh"], in_specs=tuple(specs), out_specs=tuple(p["out_specs"]),
                  check_vma=p.get("check_vma", True))
    manual = p.get("newly_manual_axes") or p.get("axis_names")
    if manual and set(manual) != set(p["mesh"].axis_names):
        kwargs["axis_names"] = set(manual)
    return list(jax.shard_map(fn, **kwargs)(*invals))


HIGHER_ORDER = {
    "jit": _jit,
    "pjit": _jit,
    "closed_call": _jit,
    "core_call": _jit,
    "scan": _scan,
    "cond": _cond,
    "while": _while,
    "checkpoint": _remat,
    "remat": _remat,
    "remat2": _remat,
    "custom_jvp_call": _custom_jvp,
    "custom_vjp_call": _custom_vjp,
    "custom_vjp_call_jaxpr": _custom_vjp,
    "shard_map": _shard_map,
}
