"""Adapter kinds: LoRA, rsLoRA, DoRA, MoRA (types 1 and 6), PiSSA and OLoRA through lorafy/lora/merge.

Each kind is checked three ways: the unmerged model (``lora(fn)``) against
the merged dense one, its gradients against the merged path's, and DoRA and
MoRA against NumPy references written from REFERENCES.md (the papers'
formulas), not from the package.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorax_fn as lf

VARIANTS = {
    "lora": dict(variant="lora"),
    "rslora": dict(variant="lora", rslora=True),
    "dora": dict(variant="dora"),
    "mora1": dict(variant=lf.MoRA(type=1)),
    "mora6": dict(variant="mora"),
    "pissa": dict(variant="lora", init="pissa"),
    "olora": dict(variant="lora", init="olora"),
}


class Dense2D(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(12)(x)


class DenseGeneral(nn.Module):  # kernel (in, heads, head_dim)
    @nn.compact
    def __call__(self, x):
        return nn.DenseGeneral((3, 4))(x).reshape(x.shape[:-1] + (12,))


class _Layer(nn.Module):
    @nn.compact
    def __call__(self, h, _):
        return jnp.tanh(nn.Dense(10)(h)), None


class Scanned(nn.Module):  # kernel (layers, in, out) under nn.scan
    @nn.compact
    def __call__(self, x):
        h = nn.Dense(10)(x)
        h, _ = nn.scan(_Layer, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)()(h, None)
        return h


MODELS = {"dense": (Dense2D, 10), "dense_general": (DenseGeneral, 10), "scanned": (Scanned, 7)}


def _trained(lp, seed=1, size=0.3):
    """Every trainable child moved away from its init, as a few training steps would."""
    rng = np.random.default_rng(seed)

    def move(node):
        if not lf.is_lora(node):
            return node
        new = {n: getattr(node, n) + size * jnp.asarray(rng.standard_normal(np.shape(getattr(node, n))),
                                                        getattr(node, n).dtype)
               for n in node.trainable}
        return node.replace(**new)

    return jax.tree.map(move, lp, is_leaf=lf.is_lora)


def _setup(model_name, variant_name, rank=2):
    cls, n_in = MODELS[model_name]
    model = cls()
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 5, n_in)), jnp.float32)
    params = model.init(jax.random.key(0), x)["params"]
    lp = lf.lorafy(params, rank=rank, alpha=3.0, fn=lambda p: model.apply({"params": p}, x),
                   **VARIANTS[variant_name])
    apply = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
    return apply, _trained(lp), x


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("model", sorted(MODELS))
def test_unmerged_equals_merged_values_and_gradients(model, variant):
    apply, lp, x = _setup(model, variant)
    kinds = {type(n).__name__ for n in jax.tree.leaves(lp, is_leaf=lf.is_lora) if lf.is_lora(n)}
    assert kinds, "nothing was adapted"
    np.testing.assert_allclose(lf.lora(apply)(lp, x), apply(lf.merge(lp), x), rtol=1e-5, atol=1e-5)

    loss_lora = lambda lp: jnp.sum(jnp.sin(lf.lora(apply)(lp, x)))  # noqa: E731
    loss_dense = lambda lp: jnp.sum(jnp.sin(apply(lf.merge(lp), x)))  # noqa: E731
    g_lora, g_dense = jax.grad(loss_lora)(lp), jax.grad(loss_dense)(lp)
    for got, want in zip(jax.tree.leaves(g_lora, is_leaf=lf.is_lora), jax.tree.leaves(g_dense, is_leaf=lf.is_lora)):
        if lf.is_lora(got):
            for n in got.trainable:
                np.testing.assert_allclose(getattr(got, n), getattr(want, n), rtol=1e-4, atol=1e-5, err_msg=n)
    rep = lf.explain(apply, lp, x)
    assert rep and not rep.materialized, rep


# ----------------------------------------------------------------- NumPy references
def _mora_ref(x, M, type_, n_out):
    """MoRA's compress → M → decompress for a 2-D kernel, from REFERENCES.md, in float64."""
    x, M = np.asarray(x, np.float64), np.asarray(M, np.float64)
    size, n_in = M.shape[0], x.shape[-1]
    groups = math.ceil(n_in / size)
    padded = np.concatenate([x] * math.ceil(groups * size / n_in), axis=-1)[..., :groups * size]
    blocks = [padded[..., g * size:(g + 1) * size] for g in range(groups)]
    if type_ == 1:
        z = sum(blocks) @ M
    else:
        theta = 10000.0 ** (-2.0 * np.arange(size // 2) / size)
        phi = np.concatenate([theta, theta])
        outs = []
        for i, blk in enumerate(blocks):
            rot = np.concatenate([-blk[..., size // 2:], blk[..., :size // 2]], axis=-1)
            outs.append((blk * np.cos(i * phi) + rot * np.sin(i * phi)) @ M)
        z = np.concatenate(outs, axis=-1)
    reps = math.ceil(n_out / z.shape[-1])
    return np.concatenate([z] * reps, axis=-1)[..., :n_out]


@pytest.mark.parametrize("type_", [1, 6])
@pytest.mark.parametrize("n_in,n_out,rank", [(24, 40, 2), (37, 16, 3), (6, 50, 4), (64, 64, 4)])
def test_mora_matches_numpy_reference(type_, n_in, n_out, rank):
    """in ≠ out, in not a multiple of r̂, and in < r̂ (the (6, 50) case: r̂ = 15 or 14)."""
    rng = np.random.default_rng(n_in + n_out)
    w = jnp.asarray(rng.standard_normal((n_in, n_out)), jnp.float32)
    lw = lf.lorafy({"w": w}, rank=rank, variant=lf.MoRA(type=type_))["w"]
    want_size = int(math.floor(math.sqrt((n_in + n_out) * rank) + 0.5))
    want_size -= want_size % 2 if type_ == 6 else 0
    assert lw.square == want_size and lw.m.shape == (want_size, want_size) and not np.any(lw.m)
    lw = lw.replace(m=jnp.asarray(rng.standard_normal(lw.m.shape), jnp.float32))
    x = rng.standard_normal((3, n_in)).astype(np.float32)
    want = np.asarray(x, np.float64) @ np.asarray(w, np.float64) + _mora_ref(x, lw.m, type_, n_out)
    got = lf.lora(lambda p, x: x @ p["w"])({"w": lw}, jnp.asarray(x))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # merge builds the same map as a dense delta: row k is the update of e_k
    delta = np.asarray(lf.merge({"w": lw})["w"], np.float64) - np.asarray(w, np.float64)
    np.testing.assert_allclose(delta, _mora_ref(np.eye(n_in), lw.m, type_, n_out), rtol=1e-4, atol=1e-4)


def test_dora_matches_numpy_reference():
    rng = np.random.default_rng(3)
    n_in, n_out, r, alpha = 9, 5, 2, 4.0
    w = rng.standard_normal((n_in, n_out)).astype(np.float32)
    dw = lf.lorafy({"w": jnp.asarray(w)}, rank=r, alpha=alpha, variant="dora")["w"]
    np.testing.assert_allclose(dw.m, np.linalg.norm(w, axis=0), rtol=1e-6)
    a, b = rng.standard_normal((n_in, r)), rng.standard_normal((r, n_out))
    m = np.linalg.norm(w, axis=0) * (1 + 0.1 * rng.standard_normal(n_out))
    dw = dw.replace(a=jnp.asarray(a, jnp.float32), b=jnp.asarray(b, jnp.float32), m=jnp.asarray(m, jnp.float32))
    v = w.astype(np.float64) + alpha / r * a @ b
    want_w = m * v / np.linalg.norm(v, axis=0)
    x = rng.standard_normal((4, n_in))
    got = lf.lora(lambda p, x: x @ p["w"])({"w": dw}, jnp.asarray(x, jnp.float32))
    np.testing.assert_allclose(got, x @ want_w, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lf.merge({"w": dw})["w"], want_w, rtol=1e-5, atol=1e-6)


def test_dora_norm_is_a_constant_in_backprop():
    """d/dm of y = m ⊙ v/||v|| is v/||v|| (no term through the norm); the gradient of a and b likewise
    treats ||v|| as fixed: compare with finite differences of the model whose norm is frozen."""
    rng = np.random.default_rng(4)
    w = jnp.asarray(rng.standard_normal((6, 3)), jnp.float32)
    dw = _trained({"w": lf.lorafy({"w": w}, rank=2, variant="dora")["w"]})["w"]
    x = jnp.asarray(rng.standard_normal((5, 6)), jnp.float32)
    g = jax.grad(lambda d: jnp.sum(lf.lora(lambda p, x: x @ p["w"])({"w": d}, x)))(dw)
    v = np.asarray(w, np.float64) + dw.scale * np.asarray(dw.a, np.float64) @ np.asarray(dw.b, np.float64)
    n = np.linalg.norm(v, axis=0)
    np.testing.assert_allclose(g.m, np.sum(np.asarray(x, np.float64) @ v, axis=0) / n, rtol=1e-5)
    want_b = dw.scale * (np.asarray(x, np.float64) @ np.asarray(dw.a, np.float64)).T @ np.tile(
        np.asarray(dw.m, np.float64) / n, (5, 1))
    np.testing.assert_allclose(g.b, want_b, rtol=1e-5)


def test_mora_update_has_rank_above_r_after_training_and_lora_does_not():
    rng = np.random.default_rng(5)
    p = {"w": jnp.asarray(rng.standard_normal((32, 32)), jnp.float32)}
    x = jnp.asarray(rng.standard_normal((64, 32)), jnp.float32)
    target = jnp.asarray(rng.standard_normal((64, 32)), jnp.float32)
    ranks = {}
    for name, variant in (("lora", "lora"), ("mora", "mora")):
        lp = lf.lorafy(p, rank=2, variant=variant)
        loss = lambda lp: jnp.mean((lf.lora(lambda q, x: x @ q["w"])(lp, x) - target) ** 2)  # noqa: E731
        for _ in range(5):
            g = jax.grad(loss)(lp)
            lp = jax.tree.map(lambda t, d: t - 0.5 * d, lp, g)
            lp = {"w": lp["w"].replace(w=p["w"])}  # the base is frozen
        delta = np.asarray(lf.merge(lp)["w"]) - np.asarray(p["w"])
        ranks[name] = np.linalg.matrix_rank(delta, tol=1e-4 * np.abs(delta).max())
    assert ranks["lora"] <= 2 < ranks["mora"], ranks


@pytest.mark.parametrize("shape,layout", [((768, 3072), None), ((4096, 11008), None),
                                          ((12, 768, 768), ((0,), (1,), (2,))),
                                          ((4096, 32, 128), ((), (0,), (1, 2)))])
def test_mora_trains_as_many_parameters_as_lora(shape, layout):
    """Within 2% on transformer-sized kernels (on tiny ones a square M cannot be that close: 38² vs 39.2²)."""
    w = {"w": jax.ShapeDtypeStruct(shape, jnp.bfloat16)}
    count = lambda t: sum(math.prod(getattr(n, c).shape) for n in jax.tree.leaves(t, is_leaf=lf.is_lora)  # noqa
                          if lf.is_lora(n) for c in n.trainable)
    for r in (4, 8, 16):
        lora = count(jax.eval_shape(lambda p: lf.lorafy(p, rank=r, layout=layout), w))
        for t in (1, 6):
            mora = count(jax.eval_shape(lambda p: lf.lorafy(p, rank=r, layout=layout, variant=lf.MoRA(type=t)), w))
            assert abs(mora - lora) <= 0.02 * lora, (r, t, mora, lora)


# ----------------------------------------------------------------- errors
def test_unknown_variant_is_an_argument_error():
    with pytest.raises(lf.ArgumentError, match="unknown variant 'doraa'"):
        lf.lorafy({"w": jnp.ones((4, 4))}, rank=1, variant="doraa")
    with pytest.raises(lf.ArgumentError, match="MoRA type"):
        lf.MoRA(type=3)


def test_mora_on_a_convolution_is_refused_at_lorafy_time_naming_the_path():
    model = nn.Sequential([nn.Conv(4, (3, 3)), nn.Dense(3)])
    x = jnp.ones((1, 6, 6, 2))
    params = model.init(jax.random.key(0), x)["params"]
    with pytest.raises(lf.TargetError, match=r"'layers_0/kernel' is used by conv_general_dilated"):
        lf.lorafy(params, rank=2, variant="mora", fn=lambda p: model.apply({"params": p}, x))
    # the same without the conv layer is fine
    lp = lf.lorafy(params, rank=2, variant="mora", targets=".*layers_1/kernel")
    assert isinstance(lp["layers_1"]["kernel"], lf.MoraWeight)


def test_pissa_on_a_non_float_leaf_names_it():
    with pytest.raises(lf.TargetDtypeError, match="'ids'"):
        lf.lorafy({"ids": jnp.ones((4, 4), jnp.int32)}, rank=1, init="pissa", targets="ids")


def test_mora_refuses_weight_based_inits():
    with pytest.raises(lf.ArgumentError, match="'w'.*MoRA"):
        lf.lorafy({"w": jnp.ones((8, 8))}, rank=1, variant="mora", init="pissa")


# ----------------------------------------------------------------- trainable=
def test_trainable_leaves_train_in_full_and_round_trip(tmp_path):
    rng = np.random.default_rng(6)
    p = {"dense": {"kernel": jnp.asarray(rng.standard_normal((6, 4)), jnp.float32), "bias": jnp.zeros(4)},
         "head": {"kernel": jnp.asarray(rng.standard_normal((4, 2)), jnp.float32)}}
    lp = lf.lorafy(p, rank=2, targets=".*dense/kernel", trainable=["head/kernel", ".*bias"])
    assert isinstance(lp["head"]["kernel"], lf.FullWeight) and isinstance(lp["dense"]["bias"], lf.FullWeight)
    fn = lambda q, x: jnp.tanh(x @ q["dense"]["kernel"] + q["dense"]["bias"]) @ q["head"]["kernel"]  # noqa: E731
    x = jnp.asarray(rng.standard_normal((3, 6)), jnp.float32)
    opt = lf.optimizer(__import__("optax").sgd(0.1), lp)
    state = opt.init(lp)
    g = jax.grad(lambda q: jnp.sum(lf.lora(fn)(q, x) ** 2))(lp)
    updates, state = opt.update(g, state, lp)
    new = __import__("optax").apply_updates(lp, updates)
    assert not np.allclose(new["head"]["kernel"].w, p["head"]["kernel"])  # the head trained
    assert not np.allclose(new["dense"]["bias"].w, 0)
    np.testing.assert_array_equal(new["dense"]["kernel"].w, p["dense"]["kernel"])  # the base did not
    np.testing.assert_allclose(lf.lora(fn)(new, x), fn(lf.merge(new), x), rtol=1e-5, atol=1e-6)
    lf.save_adapters(tmp_path / "ck", new)
    back = lf.load_adapters(tmp_path / "ck", p)
    np.testing.assert_array_equal(back["head"]["kernel"].w, new["head"]["kernel"].w)
    np.testing.assert_allclose(lf.lora(fn)(back, x), lf.lora(fn)(new, x), rtol=1e-6)


def test_trainable_overlapping_targets_or_matching_nothing_is_an_error():
    p = {"w": jnp.ones((4, 4)), "bias": jnp.ones(4)}
    with pytest.raises(lf.TargetError, match="'w'.*both"):
        lf.lorafy(p, rank=1, targets="w", trainable="w")
    with pytest.raises(lf.TargetError, match="trainable="):
        lf.lorafy(p, rank=1, trainable="nothing_here")


# ----------------------------------------------------------------- checkpoints of every kind
@pytest.mark.parametrize("variant", ["dora", "mora1", "mora6", "rslora"])
def test_every_kind_round_trips_through_save_and_load(tmp_path, variant):
    apply, lp, x = _setup("scanned", variant)
    base = lf.merge(jax.tree.map(lambda n: n, lp, is_leaf=lf.is_lora))
    base = jax.tree.map(lambda n: n.w if lf.is_lora(n) else n, lp, is_leaf=lf.is_lora)
    lf.save_adapters(tmp_path / "ck", lp)
    back = lf.load_adapters(tmp_path / "ck", base)
    for got, want in zip(jax.tree.leaves(back, is_leaf=lf.is_lora), jax.tree.leaves(lp, is_leaf=lf.is_lora)):
        assert type(got) is type(want)
        if lf.is_lora(got):
            assert got.config == want.config
    np.testing.assert_array_equal(lf.lora(apply)(back, x), lf.lora(apply)(lp, x))
    cfg = lf.read_adapter_config(tmp_path / "ck")
    assert {e["kind"] for e in cfg["adapters"]} == {type(want).kind for want in
                                                    jax.tree.leaves(lp, is_leaf=lf.is_lora) if lf.is_lora(want)}


def test_save_peft_refuses_mora_clearly(tmp_path):
    lp = lf.lorafy({"fc": {"kernel": jnp.ones((8, 8))}}, rank=2, variant="mora")
    with pytest.raises(lf.StructureError, match="PEFT has no MoRA.*save_adapters"):
        lf.save_peft(tmp_path / "p", lp)


def test_mora_in_a_convolution_is_refused_when_traced_without_fn():
    """Without ``fn`` lorafy cannot see the conv; the first trace names the path instead of materialising."""
    model = nn.Conv(4, (3, 3))
    x = jnp.ones((1, 6, 6, 2))
    params = model.init(jax.random.key(0), x)["params"]
    lp = lf.lorafy(params, rank=2, variant="mora", targets="kernel")
    with pytest.raises(lf.TargetError, match=r"'kernel' is a MoraWeight .* not defined for conv_general_dilated"):
        lf.lora(lambda p, x: model.apply({"params": p}, x))(lp, x)


@pytest.mark.parametrize("variant", ["dora", "mora6"])
def test_dropout_acts_on_the_adapter_path_of_every_kind(variant):
    apply, lp, x = _setup("dense", variant)
    plain = lf.lora(apply)(lp, x)
    dropped = lf.lora(apply, dropout=0.5)
    np.testing.assert_array_equal(dropped(lp, x), plain)  # no key: exactly the plain path
    a, b = dropped(lp, x, dropout_key=jax.random.key(1)), dropped(lp, x, dropout_key=jax.random.key(2))
    assert not np.allclose(a, plain) and not np.allclose(a, b)
    # only the adapter's input is dropped: the base output is intact, so with the adapter off it is the base
    if variant == "mora6":  # M = 0: whatever is dropped, the output is the base model's
        base_only = jax.tree.map(lambda n: n.replace(m=jnp.zeros_like(n.m)) if lf.is_lora(n) else n, lp,
                                 is_leaf=lf.is_lora)
        np.testing.assert_allclose(dropped(base_only, x, dropout_key=jax.random.key(1)),
                                   apply(lf.base(lp), x), rtol=1e-6)


def test_children_of_every_kind_are_sharded_from_their_signatures():
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from lorax_fn.sharding_rules import adapter_shardings

    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
    base = NamedSharding(mesh, P("data", None, "model"))  # (layers, in, out)
    lay = lf.Layout((0,), (1,), (2,))
    got = {k: s.spec for k, s in adapter_shardings(base, lay, 3, signatures=lf.DoraWeight.axes).items()}
    assert got == {"a": P("data", None, None), "b": P("data", None, "model"), "m": P("data", "model")}
    got = adapter_shardings(base, lay, 3, signatures=lf.MoraWeight.axes)
    assert got["m"].spec == P("data", None, None)  # the square is replicated within a layer


def test_adapters_and_attach_keep_every_kinds_trainable_children():
    rng = np.random.default_rng(7)
    p = {"a": jnp.asarray(rng.standard_normal((6, 4)), jnp.float32),
         "m": jnp.asarray(rng.standard_normal((8, 8)), jnp.float32), "bias": jnp.zeros(4)}
    lp = _trained({**lf.lorafy({"a": p["a"]}, rank=2, variant="dora"),
                   **lf.lorafy({"m": p["m"]}, rank=2, variant="mora"),
                   **lf.lorafy({"bias": p["bias"], "k": jnp.ones((4, 4))}, rank=1, targets="k",
                               trainable="bias")})
    lp.pop("k")
    ad = lf.adapters(lp)
    assert ad["a"].w is None and ad["m"].w is None and ad["bias"].w is not None  # the trained bias stays
    back = lf.attach(p, ad)
    for k in p:
        for c in back[k].children:
            np.testing.assert_array_equal(getattr(back[k], c), getattr(lp[k], c))
    with pytest.raises(lf.StructureError, match="'m'"):
        lf.attach({**p, "m": jnp.zeros((8, 40))}, ad)  # a square of 10, not 6
