"""Higher-order primitives: entered, re-emitted, low-rank inside, same numbers as the merged model."""

import subprocess
import sys
import textwrap

import chex
import jax
import jax.numpy as jnp
import pytest
from jax import lax
from jaxprs import walk

import lorax_fn as lf


def _lp(seed=0, shape=(6, 5), **kw):
    k1, k2 = jax.random.split(jax.random.key(seed))
    p = {"w": jax.random.normal(k1, shape)}
    lp = lf.lorafy(p, rank=2, alpha=4.0, key=k2, **kw)
    return jax.tree.map(lambda l: l.replace(b=jax.random.normal(k2, l.b.shape)) if lf.is_lora(l) else l,
                        lp, is_leaf=lf.is_lora)


def _check(f, lp, *args, grads=True, grad_policy="raise"):
    """lora(f) equals f on merged params, values and a/b gradients; no materialisation."""
    run = lf.lora(f, on_materialize="raise")
    chex.assert_trees_all_close(run(lp, *args), f(lf.merge(lp), *args), rtol=1e-5, atol=1e-5)
    rep = lf.explain(f, lp, *args)
    assert rep and not rep.materialized, str(rep)
    if grads:
        run = lf.lora(f, on_materialize=grad_policy)
        train, frozen = lf.split(lp)
        loss = lambda g: lambda t: jnp.sum(jnp.tanh(g(lf.combine(t, frozen), *args)))  # noqa: E731
        chex.assert_trees_all_close(jax.grad(loss(run))(train),
                                    jax.grad(loss(lambda p, *a: f(lf.merge(p), *a)))(train),
                                    rtol=1e-4, atol=1e-5)
    return rep


X = jnp.linspace(-1.0, 1.0, 12).reshape(2, 6)


def test_nested_jit():
    _check(lambda p, x: jax.jit(lambda q, y: jax.jit(lambda r, z: z @ r["w"])(q, y))(p, x), _lp(), X)


@pytest.mark.parametrize("pred", [True, False])
def test_cond(pred):
    f = lambda p, x, c: lax.cond(c, lambda: x @ p["w"], lambda: 2.0 * (x @ p["w"]))  # noqa: E731
    _check(f, _lp(), X, jnp.bool_(pred))


def test_switch():
    f = lambda p, x, i: lax.switch(i, [lambda y: y @ p["w"], lambda y: jnp.sin(y) @ p["w"]], x)  # noqa: E731
    for i in range(2):
        _check(f, _lp(), X, jnp.int32(i))


def test_while_loop_with_weight_in_body():
    def f(p, x):
        def body(c):
            i, y = c
            return i + 1, jnp.tanh(y @ p["w"]) @ p["w"].T
        return lax.while_loop(lambda c: c[0] < 3, body, (0, x))[1]

    _check(f, _lp(), X, grads=False)  # reverse-mode of while_loop is not defined in JAX


def test_fori_loop_forward_mode():
    def f(p, x):
        return lax.fori_loop(0, 2, lambda i, y: jnp.tanh(y @ p["w"]) @ p["w"].T, x)

    lp = _lp()
    run = lf.lora(f, on_materialize="raise")
    # the base is frozen: its tangent is zero on both sides
    tangent = jax.tree.map(jnp.ones_like, lp)
    tangent = tangent.copy() | {"w": tangent["w"].replace(w=jnp.zeros_like(lp["w"].w))}
    chex.assert_trees_all_close(jax.jvp(lambda q: run(q, X), (lp,), (tangent,)),
                                jax.jvp(lambda q: f(lf.merge(q), X), (lp,), (tangent,)), rtol=1e-4)


def test_scan_weight_as_const_and_stacked_xs():
    k = jax.random.split(jax.random.key(3), 2)
    p = {"w": jax.random.normal(k[0], (6, 6)), "ws": jax.random.normal(k[1], (3, 6, 6))}

    def f(p, x):
        def body(c, wl):
            h = jnp.tanh(c @ wl) @ p["w"]
            return h, h.sum()
        c, ys = lax.scan(body, x, p["ws"])
        return c + ys.sum()

    lp = lf.lorafy(p, rank=2, fn=lambda q: f(q, X))
    lp = jax.tree.map(lambda l: l.replace(b=jnp.ones_like(l.b) * 0.1) if lf.is_lora(l) else l,
                      lp, is_leaf=lf.is_lora)

    assert lp["ws"].layout.stack == (0,)
    rep = _check(f, lp, X)
    assert {u.path for u in rep} == {"w", "ws"}


def test_scan_reverse_and_unroll_kept():
    lp = lf.lorafy({"ws": jax.random.normal(jax.random.key(0), (4, 6, 6))}, rank=2,
                   layout=((0,), (1,), (2,)))
    f = lambda p, x: lax.scan(lambda c, w: (jnp.tanh(c @ w), None), x, p["ws"], reverse=True, unroll=2)[0]  # noqa: E731
    _check(f, lp, X)
    text = str(jax.make_jaxpr(lf.lora(f))(lp, X))
    assert "reverse=True" in text and "unroll=2" in text


def test_remat_keeps_policy():
    policy = jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    f = lambda p, x: jax.checkpoint(lambda q, y: jnp.sin(y @ q["w"]), policy=policy)(p, x)  # noqa: E731
    _check(f, _lp(), X)
    eqns = _all_eqns(jax.make_jaxpr(lf.lora(f))(_lp(), X).jaxpr)
    policies = [e.params["policy"] for e in eqns if "policy" in e.params]
    assert policies and all(pol is policy for pol in policies)


def _all_eqns(jaxpr):
    return [e for e, _ in walk(jaxpr)]


def test_custom_jvp_rule_is_kept():
    # a deliberately "wrong" derivative: the transform must use it, not differentiate the primal
    @jax.custom_jvp
    def mm(x, w):
        return x @ w

    @mm.defjvp
    def mm_jvp(primals, tangents):
        x, w = primals
        dx, dw = tangents
        return mm(x, w), 3.0 * (dx @ w + x @ dw)

    # the forward stays low-rank; the rule itself is written for the dense weight, so
    # differentiating builds it, and says so under the policy
    f = lambda p, x: mm(x, p["w"])  # noqa: E731
    with pytest.warns(lf.MaterializationWarning, match="'w'.*custom_jvp_call.*derivative rule"):
        _check(f, _lp(), X, grad_policy="warn")


def test_custom_vjp_rule_is_kept():
    @jax.custom_vjp
    def mm(x, w):
        return x @ w

    mm.defvjp(lambda x, w: (x @ w, (x, w)), lambda r, g: (0.5 * g @ r[1].T, 0.5 * r[0].T @ g))
    f = lambda p, x: mm(x, p["w"])  # noqa: E731
    with pytest.warns(lf.MaterializationWarning, match="'w'.*custom_vjp_call.*derivative rule"):
        _check(f, _lp(), X, grad_policy="warn")
    with pytest.raises(lf.MaterializationError):
        jax.grad(lambda p: lf.lora(f, on_materialize="raise")(p, X).sum())(_lp())


def test_trace_is_cached_per_structure_and_shape():
    calls = []

    def f(p, x):
        calls.append(x.shape)
        return x @ p["w"]

    run = lf.lora(f)
    lp = _lp()
    for _ in range(3):
        run(lp, X)
    assert len(calls) == 1
    run(lp, jnp.ones((5, 6)))
    assert len(calls) == 2
    run(lp, X + 1.0)
    assert len(calls) == 2


def test_policy_choices():
    f = lambda p, x: x @ jnp.sin(p["w"])  # noqa: E731  (sin has no low-rank rule)
    lp = _lp()
    with pytest.raises(lf.MaterializationError, match="'w'.*'sin'"):
        lf.lora(f, on_materialize="raise")(lp, X)
    with pytest.warns(lf.MaterializationWarning, match="'w'"):
        out = lf.lora(f, on_materialize="warn")(lp, X)
    chex.assert_trees_all_close(out, f(lf.merge(lp), X), rtol=1e-5)
    rep = lf.explain(f, lp, X)
    assert [(u.path, u.primitive, u.low_rank) for u in rep] == [("w", "sin", False)]
    assert "MATERIALISED" in str(rep)
    with pytest.raises(ValueError, match="on_materialize"):
        lf.lora(f, on_materialize="never")


SHARDED = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    import lorax_fn as lf
    assert jax.device_count() == 8
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    k = jax.random.key(0)
    lp = lf.lorafy({"w": jax.random.normal(k, (8, 6))}, rank=2)
    lp = jax.tree.map(lambda l: l.replace(b=jnp.ones_like(l.b)) if lf.is_lora(l) else l, lp, is_leaf=lf.is_lora)
    x = jax.random.normal(k, (8, 8))

    def f(p, x):
        w = jax.lax.with_sharding_constraint(p["w"], NamedSharding(mesh, P(None, "model")))
        y = jax.shard_map(lambda a, b: a @ b, mesh=mesh, in_specs=(P(), P()), out_specs=P())(x, w)
        return y + x @ w

    with jax.set_mesh(mesh):
        got = jax.jit(lf.lora(f, on_materialize="raise"))(lp, x)
        want = jax.jit(f)(lf.merge(lp), x)
        rep = lf.explain(f, lp, x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    assert rep and not rep.materialized, str(rep)
    print("SHARDED-OK", len(rep))
""")


def test_shard_map_and_sharding_constraint_on_8_host_devices():
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu",
           "PATH": "/usr/bin:/bin"}
    res = subprocess.run([sys.executable, "-c", SHARDED], env=env, capture_output=True, text=True,
                         timeout=300)
    assert "SHARDED-OK" in res.stdout, res.stderr[-3000:]
