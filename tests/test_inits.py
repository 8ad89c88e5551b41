"""PiSSA and OLoRA inits against NumPy decompositions, and their conversion back to the original base."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorax_fn as lf

# (shape, layout, canonical order): Dense 2-D, DenseGeneral (embed, heads, head_dim), scanned (layers, in, out)
CASES = {
    "dense": ((12, 8), ((), (0,), (1,))),
    "dense_general": ((10, 3, 4), ((), (0,), (1, 2))),
    "scanned": ((3, 9, 7), ((0,), (1,), (2,))),
    "out_in_stored": ((8, 12), ((), (1,), (0,))),  # used as x @ w.T
}


def _weights(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _matrices(w, layout):
    """The weight as float64 ``(stack, fan_in, fan_out)`` matrices, in canonical order."""
    order = layout[0] + layout[1] + layout[2]
    t = np.transpose(np.asarray(w, np.float64), order)
    s = tuple(w.shape[k] for k in layout[0])
    fan_in = int(np.prod([w.shape[k] for k in layout[1]]))
    return t.reshape((int(np.prod(s)) if s else 1, fan_in, -1))


def _principal(m, rank, init):
    if init == "olora":  # QR of the (out, in) weight, as PEFT and the paper
        q, r = np.linalg.qr(np.swapaxes(m, -1, -2))
        return np.swapaxes(q[..., :rank] @ r[..., :rank, :], -1, -2)
    u, s, vt = np.linalg.svd(m, full_matrices=False)
    return (u[..., :rank] * s[..., None, :rank]) @ vt[..., :rank, :]


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("init", ["pissa", "olora"])
@pytest.mark.parametrize("rslora", [False, True])
def test_factors_hold_the_principal_part_and_the_base_the_rest(case, init, rslora):
    shape, layout = CASES[case]
    w = _weights(shape)
    lw = lf.lorafy({"w": w}, rank=3, alpha=5, init=init, layout=layout, rslora=rslora)["w"]
    m = _matrices(w, layout)
    want = _principal(m, 3, init)
    a = np.asarray(lw.a, np.float64).reshape(m.shape[0], m.shape[1], 3)
    b = np.asarray(lw.b, np.float64).reshape(m.shape[0], 3, m.shape[2])
    np.testing.assert_allclose(lw.scale * a @ b, want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(_matrices(lw.w, layout), m - want, rtol=1e-4, atol=1e-5)
    # merge gives back the weight up to float error (not bit for bit, unlike the random inits)
    np.testing.assert_allclose(lf.merge(lw), w, rtol=0, atol=1e-5)


def test_olora_b_has_orthonormal_rows_over_the_outputs():
    lw = lf.lorafy({"w": _weights((12, 8))}, rank=3, alpha=3, init="olora")["w"]  # scale 1
    b = np.asarray(lw.b, np.float64)
    np.testing.assert_allclose(b @ b.T, np.eye(3), atol=1e-5)


def test_randomised_pissa_finds_the_same_principal_part_on_a_decaying_spectrum():
    rng = np.random.default_rng(1)
    u, _ = np.linalg.qr(rng.standard_normal((64, 64)))
    v, _ = np.linalg.qr(rng.standard_normal((48, 48)))
    s = 0.5 ** np.arange(48)
    w = jnp.asarray((u[:, :48] * s) @ v.T, jnp.float32)
    exact = lf.lorafy({"w": w}, rank=4, init="pissa")["w"]
    fast = lf.lorafy({"w": w}, rank=4, init="pissa_niter_4", key=jax.random.key(3))["w"]
    np.testing.assert_allclose(np.asarray(fast.a) @ np.asarray(fast.b), np.asarray(exact.a) @ np.asarray(exact.b),
                               rtol=0, atol=1e-4)


def test_lora_of_a_pissa_tree_equals_the_original_model():
    shape, layout = CASES["dense_general"]
    p = {"w": _weights(shape)}
    lp = lf.lorafy(p, rank=2, init="pissa", layout=layout)
    x = _weights((5, 10), seed=2)
    f = lambda params, x: jnp.einsum("bi,ihd->bhd", x, params["w"])  # noqa: E731
    np.testing.assert_allclose(lf.lora(f)(lp, x), f(p, x), rtol=1e-5, atol=1e-5)


def _trained(lp, seed=4):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: x.replace(a=x.a + 0.1 * rng.standard_normal(x.a.shape).astype(np.float32),
                                            b=x.b + 0.1 * rng.standard_normal(x.b.shape).astype(np.float32))
                        if lf.is_lora(x) else x, lp, is_leaf=lf.is_lora)


@pytest.mark.parametrize("init", ["pissa", "olora"])
@pytest.mark.parametrize("rslora", [False, True])
def test_to_original_base_gives_the_trained_model_on_the_original_weights(tmp_path, init, rslora):
    p = {name: _weights(shape, seed=k) for k, (name, (shape, _)) in enumerate(sorted(CASES.items()))}
    layout = {name: lay for name, (_, lay) in CASES.items()}
    initial = lf.lorafy(p, rank=2, alpha=3, init=init, layout=layout, rslora=rslora)
    trained = _trained(initial)
    plain = lf.to_original_base(trained, initial)
    for name in p:
        assert plain[name].rank == 4 and plain[name].scale == pytest.approx(trained[name].scale)
        np.testing.assert_allclose(plain[name].w, p[name], atol=1e-5)
    # saved without its base, loaded onto the user's original params: the trained model
    back = lf.load_adapters(lf.save_adapters(tmp_path / "ad", plain), p)
    want = lf.merge(trained)
    for name in p:
        np.testing.assert_allclose(lf.merge(back)[name], want[name], rtol=1e-5, atol=1e-5)


def test_to_original_base_refuses_trees_of_another_run():
    p = {"w": _weights((12, 8))}
    with pytest.raises(lf.StructureError, match="'w'.*differ"):
        lf.to_original_base(lf.lorafy(p, rank=2, init="pissa"), lf.lorafy(p, rank=3, init="pissa"))
    with pytest.raises(lf.StructureError, match="different structures"):
        lf.to_original_base(lf.lorafy(p, rank=2, init="pissa"), {"v": lf.lorafy(p, rank=2)["w"]})


@pytest.mark.parametrize("init", ["svd", "pissa_niter_", "PISSA", 3])
def test_unknown_init_names_the_choices(init):
    with pytest.raises(lf.ArgumentError, match="init must be one of.*pissa_niter_<k>"):
        lf.lorafy({"w": _weights((12, 8))}, rank=2, init=init)


def test_pissa_on_a_non_float_target_names_it():
    with pytest.raises(lf.TargetDtypeError, match="'ids'"):
        lf.lorafy({"ids": jnp.ones((4, 4), jnp.int32)}, rank=2, init="pissa", targets="ids")
