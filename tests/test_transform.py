"""lora(fn) as a function transform: arguments, outputs, statics, jit/grad/vmap composition."""

import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorax_fn as lf


def _lp():
    k1, k2 = jax.random.split(jax.random.key(0))
    lp = lf.lorafy({"w": jax.random.normal(k1, (6, 5)), "b": jnp.ones(5)}, rank=2, key=k2)
    return jax.tree.map(lambda l: l.replace(b=jax.random.normal(k2, l.b.shape)) if lf.is_lora(l) else l,
                        lp, is_leaf=lf.is_lora)


X = jnp.linspace(-1, 1, 18).reshape(3, 6)


def f(p, x, *, scale=1.0, act="tanh"):
    y = x @ p["w"] + p["b"]
    return {"y": getattr(jnp, act)(y) * scale, "aux": (y.sum(), None)}


class TestComposition(chex.TestCase):
    """Each case runs with and without an outer jax.jit (chex variants)."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_kwargs_statics_and_pytree_outputs(self):
        lp = _lp()
        run = self.variant(lf.lora(f, on_materialize="raise"), static_argnames=("scale", "act"))
        got = run(lp, X, scale=2.0, act="sin")
        want = f(lf.merge(lp), X, scale=2.0, act="sin")
        chex.assert_trees_all_close(got, want, rtol=1e-5)
        assert got["aux"][1] is None

    @chex.variants(with_jit=True, without_jit=True)
    def test_composes_with_grad_and_vmap(self):
        lp = _lp()
        run = lf.lora(lambda p, x: f(p, x)["y"], on_materialize="raise")

        @self.variant
        def loss(p, x):
            return jnp.sum(jax.vmap(lambda xi: run(p, xi[None]))(x) ** 2)

        g = jax.grad(loss)(lp, X)
        g_ref = jax.grad(lambda p: jnp.sum(f(lf.merge(p), X)["y"] ** 2))(lp)
        # the dense reference differentiates merge(p) w.r.t. a and b: the same numbers
        chex.assert_trees_all_close(lf.adapters(g), lf.adapters(g_ref), rtol=1e-4, atol=1e-6)
        assert not np.any(np.asarray(g["w"].w))


def test_returning_the_weight_itself_materialises_it():
    lp = _lp()
    with pytest.raises(lf.MaterializationError, match="'w'"):
        lf.lora(lambda p: p["w"], on_materialize="raise")(lp)
    out = lf.lora(lambda p: p["w"].T, on_materialize="allow")(lp)
    np.testing.assert_allclose(out, lf.merge(lp)["w"].T, rtol=1e-6)


def test_plain_arrays_pass_through_untouched():
    p = {"w": jnp.ones((6, 5)), "b": jnp.ones(5)}
    run = lf.lora(lambda p, x: f(p, x)["y"], on_materialize="raise")
    with pytest.warns(lf.NoAdapterWarning):
        chex.assert_trees_all_close(run(p, X), f(p, X)["y"])


def test_explain_lists_paths_with_argument_structure():
    lp = _lp()
    rep = lf.explain(lambda v, x: f(v["params"], x)["y"], {"params": lp}, X)
    assert [(u.path, u.primitive, u.low_rank) for u in rep] == [("params/w", "dot_general", True)]
    assert rep.by_path() == {"params/w": tuple(rep)}
    assert "1 uses, 0 materialised" in str(rep)


def test_static_arguments_of_equal_value_but_other_type_trace_apart():
    run = lf.lora(lambda p, x, s: (x @ p["w"], jnp.asarray(s)))
    lp = _lp()
    dtypes = [run(lp, X, s)[1].dtype for s in (1, 1.0, True)]
    assert dtypes == [jnp.asarray(1).dtype, jnp.asarray(1.0).dtype, jnp.bool_]
    assert run.cache_size() == 3


def test_paths_keep_other_arguments_apart():
    lp = _lp()
    rep = lf.explain(lambda p, q, x: x @ p["w"] + x @ q["w"], lp, lp, X)
    assert [u.path for u in rep] == ["w", "1/w"]
    rep = lf.explain(lambda w, x: x @ w, lp["w"], X)
    assert [u.path for u in rep] == ["<argument 0>"]
    with pytest.raises(lf.MaterializationError, match="returned by the function"):
        lf.lora(lambda p: p["w"], on_materialize="raise")(lp)


def _custom_vjp_mm():
    @jax.custom_vjp
    def mm(x, w):
        return x @ w

    mm.defvjp(lambda x, w: (x @ w, (x, w)), lambda r, g: (g @ r[1].T, r[0].T @ g))
    return mm


def _custom_jvp_mm():
    @jax.custom_jvp
    def mm(x, w):
        return x @ w

    @mm.defjvp
    def mm_jvp(primals, tangents):
        (x, w), (dx, dw) = primals, tangents
        return mm(x, w), dx @ w + x @ dw

    return mm


@pytest.mark.parametrize("make, primitive", [(_custom_vjp_mm, "custom_vjp_call"),
                                             (_custom_jvp_mm, "custom_jvp_call")])
def test_explain_reports_what_the_gradient_materialises(make, primitive):
    mm = make()
    fn = lambda p, x: jnp.tanh(mm(x, p["w"]) + p["b"])  # noqa: E731
    lp = _lp()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        jax.grad(lambda q: lf.lora(fn)(q, X).sum())(lp)
    # the reference: what differentiating lora(fn) actually warns about
    warned = [str(w.message) for w in caught if w.category is lf.MaterializationWarning]
    assert len(warned) == 1 and "'w'" in warned[0]

    rep = lf.explain(fn, lp, X)
    assert rep.materialized == ()                              # the forward pass stays low-rank
    got = [(u.path, u.primitive) for u in rep.gradient.materialized]
    assert got == [("w", primitive)]
    assert f"'{got[0][0]}'" in warned[0] and f"'{got[0][1]}'" in warned[0]
    assert rep.gradient.materialized[0].detail in warned[0]
    text = str(rep)
    assert "1 uses, 0 materialised" in text
    assert "differentiating (jax.grad w.r.t. the adapters) also materialises 1:" in text
    assert f"{got[0][1]}" in text.splitlines()[-1] and "MATERIALISED" in text.splitlines()[-1]


def test_explain_gradient_equals_the_forward_report_without_custom_rules():
    lp = _lp()
    rep = lf.explain(lambda p, x: f(p, x)["y"], lp, X)
    assert rep.gradient == rep and rep.gradient.materialized == ()
    assert str(rep).endswith("1 uses, 0 materialised")


def test_explain_notes_a_function_jax_cannot_differentiate():
    mm = _custom_vjp_mm()
    shape = jax.ShapeDtypeStruct((3, 5), jnp.float32)
    fn = lambda p, x: jax.pure_callback(np.asarray, shape, mm(x, p["w"]))  # noqa: E731
    rep = lf.explain(fn, _lp(), X)
    assert [(u.path, u.low_rank) for u in rep] == [("w", True)]
    assert rep.gradient is None
    assert "the gradient was not explained" in str(rep) and "JVP" in str(rep)


def test_lora_without_an_adapter_argument_warns_once_per_trace():
    lp = _lp()
    dense = lf.merge(lp)
    closes_over = lambda x: f(dense, x)["y"]  # noqa: E731  the usual mistake: params closed over
    run = jax.jit(lf.lora(closes_over))
    with pytest.warns(lf.NoAdapterWarning) as caught:
        for _ in range(3):
            run(X)
        run(X[:2])                                             # a new shape: a new trace
    msgs = [str(w.message) for w in caught if w.category is lf.NoAdapterWarning]
    assert len(msgs) == 2
    assert "no LoraWeight among its arguments" in msgs[0]     # the cause
    assert "closes over" in msgs[0] and "no gradient" in msgs[0]
    assert "Pass the lorafied params as an argument of the wrapped function" in msgs[0]  # the fix
    assert "instead of closing over them" in msgs[0]
    assert "<lambda>" in msgs[0]                               # names the function


def test_lora_with_an_adapter_argument_does_not_warn():
    lp = _lp()
    with warnings.catch_warnings():
        warnings.simplefilter("error", lf.NoAdapterWarning)
        lf.lora(lambda p, x: f(p, x)["y"])(lp, X)
        lf.lora(lambda x, *, p: f(p, x)["y"])(X, p={"inner": lp}["inner"])
        lf.lora(lambda x, w: x @ w)(X, lp["w"])


# ------------------------------------------------------------------ dropout on the adapter input
N = 48


def _probe(shape=(N, N)):
    """w = 0, a = b = I, scale 1: the layer returns exactly what its adapter path sees."""
    layout = ((0,), (1,), (2,)) if len(shape) == 3 else None  # a stack of layers for scan
    lw = lf.lorafy({"w": jnp.zeros(shape)}, rank=shape[-1], targets="w", layout=layout)["w"]
    eye = jnp.broadcast_to(jnp.eye(shape[-1]), lw.a.shape)
    return lw.replace(a=eye, b=eye)


def test_dropout_without_a_key_or_at_rate_zero_is_the_plain_path():
    rng = np.random.default_rng(0)
    lp = lf.lorafy({"w": jnp.asarray(rng.standard_normal((N, 8)), jnp.float32)}, rank=4)
    lp = {"w": lp["w"].replace(b=jnp.asarray(rng.standard_normal((4, 8)), jnp.float32))}
    x = jnp.asarray(rng.standard_normal((5, N)), jnp.float32)
    f = lambda p, x: x @ p["w"]  # noqa: E731
    plain = lf.lora(f)(lp, x)
    np.testing.assert_array_equal(lf.lora(f, dropout=0.3)(lp, x), plain)
    np.testing.assert_array_equal(lf.lora(f, dropout=0.0)(lp, x), plain)


def test_dropout_zeroes_the_adapter_input_at_the_rate_and_rescales_the_rest():
    x = jnp.asarray(np.random.default_rng(1).uniform(1, 2, (N, N)), jnp.float32)
    f = lf.lora(lambda w, x: x @ w, dropout=0.25)
    y = np.asarray(f(_probe(), x, dropout_key=jax.random.key(0)))
    kept = y != 0
    np.testing.assert_allclose(y[kept], np.asarray(x)[kept] / 0.75, rtol=1e-6)
    assert abs(kept.mean() - 0.75) < 0.03  # 2304 draws: the standard error is 0.009
    again = f(_probe(), x, dropout_key=jax.random.key(0))
    other = f(_probe(), x, dropout_key=jax.random.key(1))
    np.testing.assert_array_equal(again, y)
    assert not np.array_equal(np.asarray(other), y)


def test_dropout_leaves_the_frozen_path_alone_and_gradients_follow_the_mask():
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((6, N)), jnp.float32)
    key = jax.random.key(5)
    f = lf.lora(lambda w, x: x @ w, dropout=0.5)
    dropped = np.asarray(f(_probe(), x, dropout_key=key), np.float64)  # the mask depends on key and shapes only
    w = rng.standard_normal((N, N)).astype(np.float32)
    lw = lf.lorafy({"w": jnp.asarray(w)}, rank=3, alpha=6)["w"]
    lw = lw.replace(b=jnp.asarray(rng.standard_normal((3, N)), jnp.float32))
    a, b = np.asarray(lw.a, np.float64), np.asarray(lw.b, np.float64)
    want = np.asarray(x, np.float64) @ w + 2.0 * dropped @ a @ b
    np.testing.assert_allclose(f(lw, x, dropout_key=key), want, rtol=1e-5, atol=1e-4)
    g = jax.grad(lambda lw: f(lw, x, dropout_key=key).sum())(lw)
    ones = np.ones((6, N))
    np.testing.assert_allclose(g.b, 2.0 * (dropped @ a).T @ ones, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(g.a, 2.0 * dropped.T @ ones @ b.T, rtol=1e-5, atol=1e-4)


def test_dropout_draws_a_new_mask_per_layer_of_a_scan_and_per_step_of_a_while_loop():
    stack = _probe((3, N, N))
    x = jnp.ones((4, N))

    def scanned(ws, x):
        return jax.lax.scan(lambda c, w: (c, x @ w), 0.0, ws)[1]

    def looped(w, x):
        def body(s):
            i, acc = s
            return i + 1, acc.at[i].set(x @ w)
        return jax.lax.while_loop(lambda s: s[0] < 3, body, (0, jnp.zeros((3, 4, N))))[1]

    for fn, w in ((scanned, stack), (looped, _probe())):
        ys = np.asarray(lf.lora(fn, dropout=0.5)(w, x, dropout_key=jax.random.key(0)))
        masks = [ys[k] != 0 for k in range(3)]
        assert 0.4 < masks[0].mean() < 0.6
        assert not np.array_equal(masks[0], masks[1]) and not np.array_equal(masks[1], masks[2])


def test_dropout_key_under_jit_needs_no_retrace():
    f = lf.lora(lambda w, x: x @ w, dropout=0.5)
    step = jax.jit(lambda w, x, k: f(w, x, dropout_key=k))
    x = jnp.ones((4, N))
    y0, y1 = step(_probe(), x, jax.random.key(0)), step(_probe(), x, jax.random.key(1))
    assert not np.array_equal(np.asarray(y0), np.asarray(y1)) and step._cache_size() == 1


@pytest.mark.parametrize("rate", [1.0, -0.1, True, "0.1"])
def test_dropout_rate_must_be_in_zero_one(rate):
    with pytest.raises(lf.ArgumentError, match="dropout must be a rate in \\[0, 1\\)"):
        lf.lora(lambda w, x: x @ w, dropout=rate)


def test_dropout_key_must_be_one_key():
    with pytest.raises(lf.ArgumentError, match="dropout_key"):
        lf.lora(lambda w, x: x @ w, dropout=0.1)(_probe(), jnp.ones((2, N)), dropout_key=0)


def test_dropout_key_is_accepted_and_ignored_at_rate_zero():
    x = jnp.ones((4, N))
    plain = lf.lora(lambda w, x: x @ w)(_probe(), x)
    got = lf.lora(lambda w, x: x @ w, dropout=0.0)(_probe(), x, dropout_key=jax.random.key(0))
    np.testing.assert_array_equal(got, plain)  # a training loop that always passes a key works at rate 0


def test_a_custom_vjp_function_sees_no_dropout_with_or_without_grad():
    @jax.custom_vjp
    def mm(x, w):
        return x @ w

    mm.defvjp(lambda x, w: (x @ w, (x, w)), lambda res, g: (g @ res[1].T, res[0].T @ g))
    f = lf.lora(lambda w, x: mm(x, w).sum(), dropout=0.5, on_materialize="allow")
    x, key = jnp.ones((4, N)), jax.random.key(0)
    plain = float(lf.lora(lambda w, x: mm(x, w).sum(), on_materialize="allow")(_probe(), x))
    value, _ = jax.value_and_grad(lambda w: f(w, x, dropout_key=key))(_probe())
    assert float(f(_probe(), x, dropout_key=key)) == plain and float(value) == plain
