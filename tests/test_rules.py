"""Low-rank rules against the dense math, over random shapes, layouts and dimension numbers."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from jax import lax
from jaxprs import walk

import lorax_fn as lf


def _weight(rng, shape, layout, rank, dtype=jnp.float32, alpha=3.0):
    lay = lf.Layout(*layout)
    w = rng.standard_normal(shape).astype(np.float32)
    a_shape = tuple(shape[k] for k in lay.stack + lay.inputs) + (rank,)
    b_shape = tuple(shape[k] for k in lay.stack) + (rank,) + tuple(shape[k] for k in lay.outputs)
    a = rng.standard_normal(a_shape).astype(np.float32)
    b = rng.standard_normal(b_shape).astype(np.float32)
    lw = lf.LoraWeight(jnp.asarray(w, dtype), jnp.asarray(a, dtype), jnp.asarray(b, dtype),
                       rank=rank, alpha=alpha, layout=lay)
    return lw


def _dense_numpy(lw):
    """w + (alpha/r) a⊗b, written independently with numpy in float64."""
    lay = lw.layout
    a = np.asarray(lw.a, np.float64)
    b = np.asarray(lw.b, np.float64)
    ns, ni = len(lay.stack), len(lay.inputs)
    s_shape = a.shape[:ns]
    i_size = math.prod(a.shape[ns:ns + ni])
    o_size = math.prod(b.shape[ns + 1:])
    a2 = a.reshape((-1, i_size, lw.rank)) if ns else a.reshape((1, i_size, lw.rank))
    b2 = b.reshape((-1, lw.rank, o_size)) if ns else b.reshape((1, lw.rank, o_size))
    d = np.matmul(a2, b2).reshape(s_shape + a.shape[ns:ns + ni] + b.shape[ns + 1:])
    order = lay.stack + lay.inputs + lay.outputs
    d = np.transpose(d, np.argsort(order))
    return np.asarray(lw.w, np.float64) + lw.alpha / lw.rank * d


@st.composite
def dot_cases(draw):
    ns = draw(st.integers(0, 1))
    ni = draw(st.integers(1, 2))
    no = draw(st.integers(1, 2))
    nd = ns + ni + no
    sizes = draw(st.lists(st.integers(2, 5), min_size=nd, max_size=nd))
    perm = draw(st.permutations(range(nd)))
    lay = (tuple(perm[:ns]), tuple(perm[ns:ns + ni]), tuple(perm[ns + ni:]))
    fan_in = math.prod(sizes[k] for k in lay[1])
    fan_out = math.prod(sizes[k] for k in lay[2])
    rank = draw(st.integers(1, min(fan_in, fan_out, 4)))
    mode = draw(st.sampled_from(["in", "out"]))
    contract = list(lay[1] if mode == "in" else lay[2])
    contract = draw(st.permutations(contract))
    batch = list(lay[0]) if (ns and draw(st.booleans())) else []
    n_free_x = draw(st.integers(0, 2))
    lora_lhs = draw(st.booleans())
    dtype = draw(st.sampled_from([jnp.float32, jnp.bfloat16]))
    seed = draw(st.integers(0, 2**16))
    form = draw(st.sampled_from(["auto", "factored", "merged"]))
    return sizes, lay, rank, contract, batch, n_free_x, lora_lhs, dtype, seed, form


@settings(max_examples=60, deadline=None)
@given(dot_cases())
def test_dot_general_matches_dense(case):
    sizes, lay, rank, contract, batch, n_free_x, lora_lhs, dtype, seed, form = case
    rng = np.random.default_rng(seed)
    lw = _weight(rng, tuple(sizes), lay, rank, dtype)
    # x: batch axes first, then free axes, then the contracted axes in a shuffled order
    free = list(rng.integers(2, 4, size=n_free_x))
    x_shape = [sizes[k] for k in batch] + free + [sizes[k] for k in contract]
    order = rng.permutation(len(x_shape))
    x_shape = [x_shape[k] for k in order]
    pos = {old: new for new, old in enumerate(order)}
    xb = tuple(pos[k] for k in range(len(batch)))
    xc = tuple(pos[len(batch) + n_free_x + j] for j in range(len(contract)))
    x = jnp.asarray(rng.standard_normal(x_shape), dtype)
    if lora_lhs:
        dn = ((tuple(contract), xc), (tuple(batch), xb))
        f = lambda p, x: lax.dot_general(p, x, dn)  # noqa: E731
    else:
        dn = ((xc, tuple(contract)), (xb, tuple(batch)))
        f = lambda p, x: lax.dot_general(x, p, dn)  # noqa: E731
    got = lf.lora(f, on_materialize="raise", formulation=form)(lw, x)
    dense = jnp.asarray(_dense_numpy(lw), jnp.float32)
    want = f(dense, x.astype(jnp.float32))
    tol = 1e-4 if dtype == jnp.float32 else 6e-2
    scale = float(jnp.abs(want).max()) + 1.0
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want), rtol=tol, atol=tol * scale)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**16), st.sampled_from(["in", "out"]), st.integers(1, 3),
       st.sampled_from(["factored", "merged"]))
def test_dot_general_gradients_match_merged(seed, mode, rank, form):
    rng = np.random.default_rng(seed)
    lw = _weight(rng, (5, 3, 4), ((), (0,), (1, 2)), rank)
    x = jnp.asarray(rng.standard_normal((2, 5) if mode == "in" else (2, 3, 4)), jnp.float32)
    if mode == "in":
        f = lambda p, x: jnp.einsum("bi,iho->bho", x, p)  # noqa: E731
    else:
        f = lambda p, x: jnp.einsum("bho,iho->bi", x, p)  # noqa: E731
    train, frozen = lf.split(lw)
    g_lora = jax.grad(lambda t: jnp.sum(jnp.sin(
        lf.lora(f, on_materialize="raise", formulation=form)(lf.combine(t, frozen), x))))(train)
    g_ref = jax.grad(lambda t: jnp.sum(jnp.sin(f(lf.merge(lf.combine(t, frozen)), x))))(train)
    chex.assert_trees_all_close(g_lora, g_ref, rtol=1e-4, atol=1e-4)


def _einsum_case(rows):
    rng = np.random.default_rng(3)
    lw = _weight(rng, (6, 5), ((), (0,), (1,)), 2)
    x = jnp.asarray(rng.standard_normal((rows, 6)), jnp.float32)
    return lw, x, (lambda p, x: jnp.tanh(x @ p))


@pytest.mark.parametrize("form", ["factored", "merged", "auto"])
def test_forward_mode_and_second_order_match_merged(form):
    """jvp, jacfwd-of-grad (Hessian-vector) and vmap through either formulation."""
    lw, x, f = _einsum_case(9)
    train, frozen = lf.split(lw)
    lo = lambda t, x: jnp.sum(lf.lora(f, formulation=form)(lf.combine(t, frozen), x) ** 2)  # noqa: E731
    ref = lambda t, x: jnp.sum(f(lf.merge(lf.combine(t, frozen)), x) ** 2)  # noqa: E731
    v = jax.tree.map(lambda t: jnp.full_like(t, 0.3), train)
    chex.assert_trees_all_close(jax.jvp(lambda t: lo(t, x), (train,), (v,)),
                                jax.jvp(lambda t: ref(t, x), (train,), (v,)), rtol=1e-5, atol=1e-5)
    hvp = lambda g: jax.jvp(jax.grad(lambda t: g(t, x)), (train,), (v,))[1]  # noqa: E731
    chex.assert_trees_all_close(hvp(lo), hvp(ref), rtol=1e-4, atol=1e-4)
    xs = jnp.stack([x, 2 * x])
    chex.assert_trees_all_close(jax.vmap(lambda x: jax.grad(lo)(train, x))(xs),
                                jax.vmap(lambda x: jax.grad(ref)(train, x))(xs), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows,dtype,merged", [(9, jnp.float32, True), (3, jnp.float32, False),
                                               (9, jnp.bfloat16, False)])
def test_auto_formulation_choice(rows, dtype, merged):
    """auto merges forward only when there are more rows than contracted features, in float32."""
    lw, x, f = _einsum_case(rows)
    lw = jax.tree.map(lambda t: t.astype(dtype), lw)
    jaxpr = jax.make_jaxpr(lf.lora(f))(lw, x.astype(dtype)).jaxpr
    # the merged forward is a custom_jvp around the matmul (the rank-major pin on
    # ``a`` is another custom_jvp, an identity with no matmul inside)
    assert _has_custom_jvp_with_dot(jaxpr) == merged


def _has_custom_jvp_with_dot(jaxpr) -> bool:
    return any(e.primitive.name == "dot_general" and "custom_jvp_call" in inside
               for e, inside in walk(jaxpr))


def test_formulation_is_checked():
    with pytest.raises(ValueError, match="formulation"):
        lf.lora(lambda p: p, formulation="fused")


def test_frozen_base_gets_no_gradient():
    rng = np.random.default_rng(0)
    lw = _weight(rng, (4, 3), ((), (0,), (1,)), 2)
    g = jax.grad(lambda p: lf.lora(lambda q: jnp.sum(jnp.ones((2, 4)) @ q))(p))(lw)
    assert not np.any(np.asarray(g.w))
    assert np.any(np.asarray(g.a)) and np.any(np.asarray(g.b))


@pytest.mark.parametrize("dims", [("NHWC", "HWIO", "NHWC"), ("NCHW", "OIHW", "NCHW")])
@pytest.mark.parametrize("stride", [1, 2])
def test_conv_matches_dense(dims, stride):
    rng = np.random.default_rng(1)
    lhs_spec, rhs_spec, _ = dims
    kshape = {"HWIO": (3, 3, 4, 6), "OIHW": (6, 4, 3, 3)}[rhs_spec]
    out_axis = rhs_spec.index("O")
    lay = ((), tuple(k for k in range(4) if k != out_axis), (out_axis,))
    lw = _weight(rng, kshape, lay, 2)
    xshape = (2, 9, 9, 4) if lhs_spec == "NHWC" else (2, 4, 9, 9)
    x = jnp.asarray(rng.standard_normal(xshape), jnp.float32)

    def f(k, x):
        return lax.conv_general_dilated(x, k, (stride, stride), "SAME", dimension_numbers=dims)

    got = lf.lora(f, on_materialize="raise")(lw, x)
    want = f(jnp.asarray(_dense_numpy(lw), jnp.float32), x)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("axis", [0, 1])
def test_row_and_column_gather(axis):
    rng = np.random.default_rng(2)
    lw = _weight(rng, (7, 5), ((), (0,), (1,)), 3)
    ids = jnp.array([[0, 6], [3, 3]])
    f = lambda p, i: jnp.take(p, i, axis=axis)  # noqa: E731
    got = lf.lora(f, on_materialize="raise")(lw, ids[:, :] % (7 if axis == 0 else 5))
    want = f(jnp.asarray(_dense_numpy(lw), jnp.float32), ids % (7 if axis == 0 else 5))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("f, x_shape", [
    (lambda p, x: jnp.einsum("oi,bi->bo", p.T, x), (2, 12)),
    (lambda p, x: jnp.einsum("jio,bij->bo", p.reshape(4, 3, 5).transpose(1, 0, 2), x), (2, 4, 3)),
    (lambda p, x: x @ p.astype(jnp.bfloat16).astype(jnp.float32), (2, 12)),
    (lambda p, x: x @ jnp.expand_dims(p, 1).squeeze(1), (2, 12)),
    (lambda p, x: x @ p.reshape(12, 1, 5).reshape(12, 5), (2, 12)),
    (lambda p, x: jnp.einsum("bi,io->bo", x, jax.lax.copy_p.bind(p)), (2, 12)),
])
def test_structural_ops_stay_low_rank(f, x_shape):
    rng = np.random.default_rng(3)
    lw = _weight(rng, (12, 5), ((), (0,), (1,)), 2)
    x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
    got = lf.lora(f, on_materialize="raise")(lw, x)
    want = f(jnp.asarray(_dense_numpy(lw), jnp.float32), x)
    tol = 2e-2 if "bfloat16" in str(jax.make_jaxpr(f)(lw.w, x)) else 1e-4
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol)


def test_reshape_mixing_roles_falls_back_to_dense():
    rng = np.random.default_rng(3)
    lw = _weight(rng, (12, 5), ((), (0,), (1,)), 2)
    x = jnp.asarray(rng.standard_normal((2, 30)), jnp.float32)
    f = lambda p, x: x @ p.reshape(2, 30).T  # noqa: E731  (merges 'in' with 'out': no factored form)
    with pytest.raises(lf.MaterializationError, match="reshape"):
        lf.lora(f, on_materialize="raise")(lw, x)
    with pytest.warns(lf.MaterializationWarning, match="'reshape'"):
        got = lf.lora(f, on_materialize="warn")(lw, x)
    want = f(jnp.asarray(_dense_numpy(lw), jnp.float32), x)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_stacked_weight_slices_stay_low_rank():
    rng = np.random.default_rng(4)
    lw = _weight(rng, (3, 4, 5), ((0,), (1,), (2,)), 2)
    x = jnp.asarray(rng.standard_normal((2, 4)), jnp.float32)

    def f(p, x, i):
        return x @ p[1] + x @ p[i] + x @ jax.lax.dynamic_index_in_dim(p, i, keepdims=False)

    got = lf.lora(f, on_materialize="raise")(lw, x, jnp.int32(2))
    want = f(jnp.asarray(_dense_numpy(lw), jnp.float32), x, 2)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_conv_with_float32_adapters_on_a_bfloat16_kernel():
    rng = np.random.default_rng(5)
    lw = _weight(rng, (3, 3, 4, 6), ((), (0, 1, 2), (3,)), 2)
    lw = lw.replace(w=lw.w.astype(jnp.bfloat16))
    x = jnp.asarray(rng.standard_normal((2, 8, 8, 4)), jnp.bfloat16)
    f = lambda k, x: lax.conv_general_dilated(x, k, (1, 1), "SAME",  # noqa: E731
                                              dimension_numbers=("NHWC", "HWIO", "NHWC"))
    got = lf.lora(f, on_materialize="raise")(lw, x)
    want = f(jnp.asarray(_dense_numpy(lw), jnp.float32), x.astype(jnp.float32))
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=5e-2, atol=5e-2 * float(jnp.abs(want).max()))


@pytest.mark.parametrize("middle", [False, True])
def test_gather_along_stack_axes_stays_low_rank(middle):
    # experts picked per token: experts[ids] is a stack of weights, contracted afterwards
    rng = np.random.default_rng(6)
    shape, lay = ((4, 3, 6), ((1,), (0,), (2,))) if middle else ((3, 4, 6), ((0,), (1,), (2,)))
    lw = _weight(rng, shape, lay, 2)
    x = jnp.asarray(rng.standard_normal((5, 4)), jnp.float32)
    ids = jnp.array([0, 2, 1, 1, 0])
    if middle:
        f = lambda p, x, i: jnp.einsum("td,dto->to", x, p[:, i])  # noqa: E731
    else:
        f = lambda p, x, i: jnp.einsum("td,tdo->to", x, p[i])  # noqa: E731
    dense = jnp.asarray(_dense_numpy(lw), jnp.float32)
    np.testing.assert_allclose(lf.lora(f, on_materialize="raise")(lw, x, ids), f(dense, x, ids),
                               rtol=1e-4, atol=1e-4)
    train, frozen = lf.split(lw)
    g = jax.grad(lambda t: lf.lora(f, on_materialize="raise")(lf.combine(t, frozen), x, ids).sum())(train)
    g_ref = jax.grad(lambda t: f(lf.merge(lf.combine(t, frozen)), x, ids).sum())(train)
    chex.assert_trees_all_close(g, g_ref, rtol=1e-4, atol=1e-5)


def test_out_of_range_lookup_gives_finite_gradients():
    # the default jnp.take fills out-of-range rows with NaN; masked away, they must not
    # poison the adapter gradients (the dense path drops them in its scatter-add)
    rng = np.random.default_rng(7)
    lw = _weight(rng, (10, 6), ((), (0,), (1,)), 2)
    ids = jnp.array([0, 3, 10, 10])
    f = lambda p, i: jnp.where((i < 10)[:, None], jnp.take(p, i, axis=0), 0.0).sum()  # noqa: E731
    train, frozen = lf.split(lw)
    g = jax.grad(lambda t: lf.lora(f, on_materialize="raise")(lf.combine(t, frozen), ids))(train)
    g_ref = jax.grad(lambda t: f(lf.merge(lf.combine(t, frozen)), ids))(train)
    assert np.all(np.isfinite(np.asarray(g.b)))
    chex.assert_trees_all_close(g, g_ref, rtol=1e-5, atol=1e-6)
