"""merge, base, adapters, attach, and the LoraWeight node itself."""

import subprocess
import sys
import textwrap

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import lorax_fn as lf


def _random_b(lp, seed=0):
    key = jax.random.key(seed)
    return jax.tree.map(lambda l: l.replace(b=jax.random.normal(key, l.b.shape, l.b.dtype))
                        if lf.is_lora(l) else l, lp, is_leaf=lf.is_lora)


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 1000), st.sampled_from([(6, 4), (3, 5, 4), (2, 3, 4, 5)]), st.integers(1, 3))
def test_merge_is_w_plus_scaled_product(seed, shape, rank):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape).astype(np.float32)
    lw = _random_b(lf.lorafy({"w": jnp.asarray(w)}, rank=rank, alpha=5.0, key=jax.random.key(seed)),
                   seed)["w"]
    a = np.asarray(lw.a, np.float64).reshape(-1, rank)
    b = np.asarray(lw.b, np.float64)
    want = w + (5.0 / rank) * (a @ b).reshape(shape)
    np.testing.assert_allclose(lf.merge({"w": lw})["w"], want, rtol=1e-5, atol=1e-5)


def test_merge_respects_layout_and_stack_axes():
    w = jnp.asarray(np.random.default_rng(0).standard_normal((3, 4, 5)), jnp.float32)
    lw = _random_b(lf.lorafy({"w": w}, rank=2, layout=((2,), (0,), (1,))))["w"]
    assert lw.a.shape == (5, 3, 2) and lw.b.shape == (5, 2, 4)
    a, b = np.asarray(lw.a), np.asarray(lw.b)
    want = np.asarray(w).copy()
    for s in range(5):
        want[:, :, s] += lw.scale * a[s] @ b[s]
    np.testing.assert_allclose(lf.merge(lw), want, rtol=1e-5, atol=1e-5)


def test_merge_is_jittable_and_keeps_dtype():
    p = {"w": jnp.ones((8, 4), jnp.bfloat16), "n": jnp.arange(3)}
    lp = _random_b(lf.lorafy(p, rank=2))
    m = jax.jit(lf.merge)(lp)
    assert m["w"].dtype == jnp.bfloat16 and m["n"].dtype == p["n"].dtype
    chex.assert_trees_all_close(m, lf.merge(lp))


@pytest.mark.parametrize("donate", [False, True])
def test_merge_dtype_keeps_a_small_update_that_bfloat16_rounds_away(donate):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 32)).astype(np.float32)
    w_bf = jnp.asarray(w, jnp.bfloat16)
    lw = lf.lorafy({"w": w_bf}, rank=4, dtype=jnp.float32)["w"]
    b = 1e-3 * rng.standard_normal(lw.b.shape).astype(np.float32)
    lw = lw.replace(b=jnp.asarray(b))
    # the dense reference in float64, from the bfloat16 base as stored
    want = np.asarray(w_bf, np.float64) + lw.scale * np.asarray(lw.a, np.float64) @ b.astype(np.float64)
    update = want - np.asarray(w_bf, np.float64)
    exact = lf.merge({"w": lw}, dtype=jnp.float32, donate=donate)["w"]
    assert exact.dtype == jnp.float32
    np.testing.assert_allclose(exact, want, rtol=0, atol=1e-6)
    assert not lw.w.is_deleted()  # donation consumed the float32 copy, never the caller's bfloat16 base
    # the default lands in the base's dtype, which loses a large share of such an update
    lossy = np.asarray(lf.merge({"w": lw})["w"], np.float64) - np.asarray(w_bf, np.float64)
    assert np.linalg.norm(lossy - update) / np.linalg.norm(update) > 0.3


@pytest.mark.parametrize("dtype", [jnp.int8, "nope"])
def test_merge_dtype_must_be_floating(dtype):
    with pytest.raises(lf.ArgumentError, match="dtype"):
        lf.merge(lf.lorafy({"w": jnp.ones((4, 3))}, rank=1), dtype=dtype)


@settings(max_examples=10, deadline=None)
@given(st.integers(0, 1000), st.sampled_from([jnp.float32, jnp.bfloat16]),
       st.sampled_from([(6, 4), (3, 5, 4)]))
def test_merge_donate_is_merge_in_place(seed, dtype, shape):
    fresh = lambda: {"w": jax.random.normal(jax.random.key(seed), shape, dtype),
                     "bias": jnp.arange(shape[-1], dtype=dtype), "n": jnp.arange(3)}
    lp = _random_b(lf.lorafy(fresh(), rank=2, key=jax.random.key(seed + 1)), seed)
    ref = jax.jit(lf.merge)(lp)  # the same program, not donating: equal bit for bit
    # the dense reference w + s·a@b on the host; w is rebuilt, because a host view
    # of lp's own w would pin its buffer and block the donation
    w = np.asarray(fresh()["w"], np.float32)
    a, b = (np.array(x, np.float32) for x in (lp["w"].a, lp["w"].b))
    want = w + lp["w"].scale * np.tensordot(a, b, axes=1)
    bias, a_arr = lp["bias"], lp["w"].a
    got = lf.merge(lp, donate=True)
    chex.assert_trees_all_equal(got, ref)
    assert got["w"].dtype == dtype and got["bias"] is bias
    assert lp["w"].w.is_deleted()  # merged into its own buffer
    assert not a_arr.is_deleted() and not bias.is_deleted()  # factors and other leaves survive
    tol = 2e-2 if dtype == jnp.bfloat16 else 1e-5
    np.testing.assert_allclose(np.asarray(got["w"], np.float32), want, rtol=tol, atol=tol)


def test_merge_donate_under_jit_leaves_donation_to_the_outer_jit():
    p = {"w": jnp.ones((6, 4))}
    lp = _random_b(lf.lorafy(p, rank=2))
    got = jax.jit(lambda t: lf.merge(t, donate=True))(lp)
    chex.assert_trees_all_close(got, lf.merge(lp))
    assert not lp["w"].w.is_deleted()


def test_merge_donate_shared_and_plain_bases():
    w = jax.random.normal(jax.random.key(0), (5, 4))
    other = jax.random.normal(jax.random.key(1), (5, 4))
    # one base under two adapters (tied layers), and a base that is also a plain leaf
    tree = {"enc": w, "dec": w, "proj": other, "proj_copy": other}
    lp = _random_b(lf.lorafy(tree, rank=2, targets=r"enc|dec|proj"), 3)
    lp["dec"] = lp["dec"].replace(b=lp["dec"].b * 2)
    ref = jax.jit(lf.merge)(lp)
    got = lf.merge(lp, donate=True)
    chex.assert_trees_all_equal(got, ref)
    assert not np.array_equal(np.asarray(got["enc"]), np.asarray(got["dec"]))
    assert w.is_deleted() and not other.is_deleted()  # the plain leaf's buffer is kept
    assert got["proj_copy"] is other


def test_merge_donate_when_only_adapters_are_traced_keeps_the_base():
    lp = _random_b(lf.lorafy({"w": jnp.ones((6, 4))}, rank=2))
    base, ad = lf.base(lp), lf.adapters(lp)
    loss = lambda ad: jnp.sum(lf.merge(lf.attach(base, ad), donate=True)["w"] ** 2)  # noqa: E731
    g1 = jax.grad(loss)(ad)
    assert not base["w"].is_deleted()
    chex.assert_trees_all_close(jax.grad(loss)(ad), g1)  # the base is still usable
    bs = jnp.stack([ad["w"].b, 2 * ad["w"].b])
    out = jax.vmap(lambda b: lf.merge(lf.attach(base, {"w": ad["w"].replace(b=b)}),
                                      donate=True)["w"])(bs)
    assert out.shape == (2, 6, 4) and not base["w"].is_deleted()
    chex.assert_trees_all_close(out[1], lf.merge(lf.attach(base, {"w": ad["w"].replace(b=bs[1])}))["w"])


def test_merge_errors_name_the_path():
    lp = lf.lorafy({"layer": {"kernel": jnp.ones((6, 4))}}, rank=2)
    with pytest.raises(lf.StructureError, match="layer/kernel.*no base weight"):
        lf.merge(lf.adapters(lp))
    lf.merge(lp, donate=True)
    for donate in (False, True):
        with pytest.raises(lf.StructureError, match="layer/kernel.*deleted"):
            lf.merge(lp, donate=donate)


def test_base_adapters_attach_round_trip():
    p = {"a": {"kernel": jnp.ones((6, 4)), "bias": jnp.zeros(4)}, "b": [jnp.ones((4, 4))]}
    lp = _random_b(lf.lorafy(p, rank=2))
    chex.assert_trees_all_equal(lf.base(lp), p)
    ad = lf.adapters(lp)
    assert all(x.shape in {(6, 2), (2, 4), (4, 2)} for x in jax.tree.leaves(ad))
    again = lf.attach(p, ad)
    chex.assert_trees_all_equal(again, lp)


def test_attach_onto_a_wrong_base_names_path_and_shapes():
    p = {"layer": {"kernel": jnp.ones((6, 4))}}
    ad = lf.adapters(lf.lorafy(p, rank=2))
    with pytest.raises(lf.StructureError, match=r"'layer/kernel'.*\(6, 2\).*\(7, 4\)"):
        lf.attach({"layer": {"kernel": jnp.ones((7, 4))}}, ad)
    with pytest.raises(lf.StructureError):
        lf.attach({"layer": {"kernel": jnp.ones((6, 4))}, "extra": jnp.ones(3)}, ad)


def test_lora_weight_is_array_like_and_readable():
    lw = lf.lorafy({"w": jnp.ones((2, 6, 4))}, rank=3, alpha=6, layout=((0,), (1,), (2,)))["w"]
    assert lw.shape == (2, 6, 4) and lw.dtype == jnp.float32 and lw.ndim == 3 and lw.size == 48
    assert repr(lw) == ("LoraWeight(shape=(2, 6, 4), dtype=float32, rank=3, alpha=6, stack=(0,), "
                        "in=(1,), out=(2,))")
    leaves, treedef = jax.tree.flatten(lw)
    assert [x.shape for x in leaves] == [(2, 6, 4), (2, 6, 3), (2, 3, 4)]
    assert jax.tree.unflatten(treedef, leaves).layout == lw.layout
    paths = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(lw)[0]]
    assert paths == [".w", ".a", ".b"]


def test_merge_keeps_negative_zero_and_still_differentiates_at_init():
    w = jnp.asarray(np.random.default_rng(0).standard_normal((4, 3)), jnp.float32).at[0, 0].set(-0.0)
    lw = lf.lorafy({"w": w}, rank=2, alpha=2.0)["w"]
    merged = lf.merge(lw)
    assert np.signbit(merged[0, 0]) and np.array_equal(np.asarray(merged), np.asarray(w))
    # at b = 0 the gradient w.r.t. b is scale · aᵀ · ones: the sign-keeping sum must not block it
    g = jax.grad(lambda b: jnp.sum(lf.merge(lw.replace(b=b))))(lw.b)
    want = np.asarray(lw.a).T @ np.ones((4, 3))
    np.testing.assert_allclose(g, want, rtol=1e-6)


def test_attach_checks_paths_not_just_counts():
    a, b = jnp.ones((4, 4)), jnp.ones((4, 3))
    ad = lf.adapters(lf.lorafy({"q": a, "k": b}, rank=2))
    for wrong in ({"q2": a, "k2": b}, {"x": {"q": a}, "k": b}, [a, b]):
        with pytest.raises(lf.StructureError, match="first difference"):
            lf.attach(wrong, ad)
    with pytest.raises(lf.StructureError, match="'q' is int32"):
        lf.attach({"q": jnp.ones((4, 4), jnp.int32), "k": b}, ad)


EXPLICIT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    import lorax_fn as lf
    mesh = jax.make_mesh((4, 2), ("data", "model"),
                         axis_types=(jax.sharding.AxisType.Explicit,) * 2)
    rng = np.random.default_rng(0)
    w, a, b = (rng.standard_normal(s).astype(np.float32) for s in [(16, 8), (16, 2), (2, 8)])
    x = rng.standard_normal((32, 16)).astype(np.float32)
    f = lambda p, x: jnp.tanh(x @ p["w"])
    lay = lf.Layout((), (0,), (1,))
    host = {"w": lf.LoraWeight(jnp.asarray(w), jnp.asarray(a), jnp.asarray(b), rank=2, alpha=4.0,
                               layout=lay)}
    want = w + 2.0 * a @ b  # scale alpha / rank
    grads = jax.grad(lambda t: jnp.sum(f(lf.merge(lf.combine(t, lf.split(host)[1])), x)))(
        lf.split(host)[0])
    with jax.set_mesh(mesh):
        put = lambda v, spec: jax.device_put(jnp.asarray(v), NamedSharding(mesh, spec))
        tree = lambda: {"w": lf.LoraWeight(put(w, P(None, "model")), put(a, P("data", None)),
                                           put(b, P()), rank=2, alpha=4.0, layout=lay)}
        xs = put(x, P("data", None))
        for donate in (False, True):
            got = lf.merge(tree(), donate=donate)["w"]
            assert got.sharding.spec == P(None, "model"), got.sharding
            np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
        for form in ("auto", "factored", "merged"):
            lp = tree()
            train, frozen = lf.split(lp)
            loss = lambda t: jnp.sum(lf.lora(f, formulation=form)(lf.combine(t, frozen), xs))
            g = jax.jit(jax.grad(loss))(train)
            for got_, want_ in zip(jax.tree.leaves(g), jax.tree.leaves(grads)):
                np.testing.assert_allclose(np.asarray(got_), np.asarray(want_), rtol=1e-4, atol=1e-4)
    print("EXPLICIT-OK")
""")


def test_merge_and_lora_on_an_explicit_mesh():
    """JAX types shardings over explicit mesh axes: ΔW must take its base's spec."""
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu",
           "PATH": "/usr/bin:/bin"}
    res = subprocess.run([sys.executable, "-c", EXPLICIT], env=env, capture_output=True, text=True,
                         timeout=300)
    assert "EXPLICIT-OK" in res.stdout, res.stderr[-3000:]
