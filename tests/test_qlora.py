"""QLoRA end to end: adapters on a quantised base under `lora`, against the merged model on the same
dequantised base; training leaves the codes untouched; scanned stacks dequantise layer by layer;
checkpoints rebuild the codes or refuse."""

import warnings

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lorax_fn as lf

L, D, H = 3, 64, 128


class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        h = nn.Dense(H, use_bias=False, name="up")(x)
        return x + nn.Dense(D, use_bias=False, name="down")(jax.nn.gelu(h)), None


class Stack(nn.Module):
    @nn.compact
    def __call__(self, x):
        layers = nn.scan(nn.remat(Block), variable_axes={"params": 0}, split_rngs={"params": True}, length=L)
        return nn.Dense(4, name="head")(layers(name="layers")(x, None)[0])


MODEL = Stack()
X = jax.random.normal(jax.random.key(1), (16, D))
PARAMS = MODEL.init(jax.random.key(0), X)["params"]


def apply(p, x):
    return MODEL.apply({"params": p}, x)


def _perturbed(lp, scale=0.05):
    """Adapters moved off their init, so that the update is not zero."""
    train, frozen = lf.split(lp)
    keys = iter(jax.random.split(jax.random.key(7), 64))
    train = jax.tree.map(lambda t: t + scale * jax.random.normal(next(keys), t.shape, t.dtype), train)
    return lf.combine(train, frozen)


def _dense_reference(lp):
    """The merged model computed independently: dequantised base plus ``scale · a @ b`` per layer."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(lp, is_leaf=lf.is_lora)[0]:
        key = "/".join(str(k.key) for k in path)
        if lf.is_lora(leaf):
            w = np.asarray(leaf.w.dequantize(jnp.float32), np.float64)
            delta = np.einsum("lir,lro->lio" if w.ndim == 3 else "ir,ro->io",
                              np.asarray(leaf.a, np.float64), np.asarray(leaf.b, np.float64))
            out[key] = w + leaf.scale * delta
        else:
            out[key] = np.asarray(leaf, np.float64)
    return out


def test_lora_on_a_quantised_scanned_stack_equals_the_merged_dense_model():
    lp = _perturbed(lf.lorafy(PARAMS, rank=4, fn=lambda p: apply(p, X), quantize="nf4"))
    up = lp["layers"]["up"]["kernel"]
    assert lf.is_quantized(up.w) and up.w.lead == 1 and up.w.shape == (L, D, H)
    got = jax.jit(lf.lora(apply))(lp, X)
    merged = lf.merge(lp)
    chex.assert_trees_all_close(got, apply(merged, X), atol=2e-5, rtol=2e-5)
    # merge itself against the dense math done in float64 from the stored codes
    ref = _dense_reference(lp)
    for key, want in ref.items():
        node = merged
        for k in key.split("/"):
            node = node[k]
        np.testing.assert_allclose(np.asarray(node), want, atol=1e-5, rtol=1e-5)


def test_fresh_qlora_merges_to_the_dequantised_base_bit_for_bit():
    lp = lf.lorafy(PARAMS, rank=4, quantize="nf4")
    deq = lf.dequantize(lf.quantize(PARAMS))
    chex.assert_trees_all_equal(lf.merge(lp), deq)


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_training_lowers_the_loss_and_leaves_codes_and_scales_bit_identical(variant):
    lp = lf.lorafy(PARAMS, rank=4, fn=lambda p: apply(p, X), quantize="nf4", variant=variant)
    target = jnp.sin(X[:, :4] * 2)
    train, frozen = lf.split(lp)
    tx = optax.adam(1e-2)
    state = tx.init(train)

    @jax.jit
    def step(train, frozen, state):
        loss, g = jax.value_and_grad(lambda t: jnp.mean((lf.lora(apply)(lf.combine(t, frozen), X) - target) ** 2))(train)
        upd, state = tx.update(g, state, train)
        return optax.apply_updates(train, upd), state, loss

    losses = []
    for _ in range(20):
        train, state, loss = step(train, frozen, state)
        losses.append(float(loss))
    assert losses[-1] < 0.7 * losses[0]
    after = lf.combine(train, frozen)
    before_q = [x.w for x in jax.tree.leaves(lp, is_leaf=lf.is_lora) if lf.is_lora(x)]
    after_q = [x.w for x in jax.tree.leaves(after, is_leaf=lf.is_lora) if lf.is_lora(x)]
    for b, a in zip(before_q, after_q):
        chex.assert_trees_all_equal(jax.tree.leaves(b), jax.tree.leaves(a))
    # the trained model under lora equals the merged one on the same dequantised base
    chex.assert_trees_all_close(lf.lora(apply)(after, X), apply(lf.merge(after), X), atol=3e-5, rtol=3e-5)


def test_scanned_step_holds_no_dense_copy_of_the_stacked_base():
    lp = lf.lorafy(PARAMS, rank=4, fn=lambda p: apply(p, X), quantize="nf4")
    train, frozen = lf.split(lp)
    loss = lambda t, f: jnp.sum(lf.lora(apply)(lf.combine(t, f), X) ** 2)  # noqa: E731
    hlo = jax.jit(jax.grad(loss)).lower(train, frozen).compile().as_text()
    for shape in (f"[{L},{D},{H}]", f"[{L},{H},{D}]"):
        assert f"f32{shape}" not in hlo and f"bf16{shape}" not in hlo
    assert f"f32[{D},{H}]" in hlo   # one layer's dense kernel, inside the loop


def test_without_remat_the_backward_pass_dequantises_again_instead_of_keeping_dense_layers():
    class Plain(nn.Module):   # no nn.remat: JAX would keep every layer's dense base for the backward pass
        @nn.compact
        def __call__(self, x):
            layers = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=L)
            return layers(name="layers")(x, None)[0]

    model = Plain()
    params = model.init(jax.random.key(0), X)["params"]
    run = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
    lp = _perturbed(lf.lorafy(params, rank=4, fn=lambda p: run(p, X), quantize="nf4"))
    train, frozen = lf.split(lp)
    loss = lambda t, f: jnp.sum(lf.lora(run)(lf.combine(t, f), X) ** 2)  # noqa: E731
    hlo = jax.jit(jax.grad(loss)).lower(train, frozen).compile().as_text()
    for shape in (f"[{L},{D},{H}]", f"[{L},{H},{D}]"):
        assert f"f32{shape}" not in hlo
    # and the gradient is the merged dense model's
    got = jax.grad(loss)(train, frozen)
    dense = lf.merge(lp)
    a_up = lp["layers"]["up"]["kernel"]
    def dense_loss(b):
        p = jax.tree.map(lambda x: x, dense)
        p["layers"]["up"]["kernel"] = dense["layers"]["up"]["kernel"] + a_up.scale * jnp.einsum(
            "lir,lro->lio", a_up.a, b - a_up.b)
        return jnp.sum(run(p, X) ** 2)
    want = jax.grad(dense_loss)(a_up.b)
    chex.assert_trees_all_close(got["layers"]["up"]["kernel"].b, want, atol=1e-3, rtol=1e-4)


def test_compute_dtype_follows_the_quantisation_setting():
    lp = lf.lorafy(PARAMS, rank=4, quantize=lf.Quantization(dtype=jnp.bfloat16), dtype=jnp.float32)
    node = lp["head"]["kernel"]
    assert node.w.dtype == jnp.bfloat16 and node.a.dtype == jnp.float32
    out = lf.lora(lambda p, x: x.astype(jnp.bfloat16) @ p["head"]["kernel"])(lp, X)
    assert out.dtype == jnp.bfloat16
    want = X.astype(jnp.bfloat16) @ lf.merge(lp)["head"]["kernel"].astype(jnp.bfloat16)
    chex.assert_trees_all_close(out.astype(jnp.float32), want.astype(jnp.float32), atol=0.05, rtol=0.02)


def test_frozen_quantised_leaves_without_adapters_run_under_lora_per_layer():
    q = lf.quantize(PARAMS, fn=lambda p: apply(p, X))
    assert q["layers"]["up"]["kernel"].lead == 1 and not lf.is_quantized(q["head"]["bias"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # dequantising is the point, not a materialisation to warn of
        got = jax.jit(lf.lora(apply))(q, X)
    chex.assert_trees_all_close(got, apply(lf.dequantize(q), X), atol=1e-5, rtol=1e-5)


def test_lorafy_on_an_already_quantised_tree_keeps_its_codes():
    q = lf.quantize(PARAMS, "int8", double_quant=False)
    lp = lf.lorafy(q, rank=2)
    node = lp["head"]["kernel"]
    assert node.w is q["head"]["kernel"]
    chex.assert_trees_all_equal(lf.merge(lp), lf.dequantize(q))


def test_mask_and_optimizer_freeze_every_coded_part():
    lp = lf.lorafy(PARAMS, rank=2, quantize="nf4")
    mask = lf.trainable_mask(lp)
    assert jax.tree.structure(mask) == jax.tree.structure(lp)
    node = mask["head"]["kernel"]
    assert node.a and node.b and not any(jax.tree.leaves(node.w))
    train, frozen = lf.split(lp)
    assert all(jnp.issubdtype(x.dtype, jnp.floating) for x in jax.tree.leaves(train))
    assert any(x.dtype == jnp.uint8 for x in jax.tree.leaves(frozen))


def test_checkpoint_rebuilds_the_codes_from_the_original_params(tmp_path):
    lp = _perturbed(lf.lorafy(PARAMS, rank=2, quantize="nf4", fn=lambda p: apply(p, X)))
    lf.save_adapters(tmp_path / "ck", lp)
    entry = lf.read_adapter_config(tmp_path / "ck")["adapters"][0]
    assert entry["quant"]["codebook"] == "nf4" and entry["quant"]["double_quant"] is True
    back = lf.load_adapters(tmp_path / "ck", PARAMS)
    chex.assert_trees_all_equal(back, lp)
    # an already quantised base with the same settings is taken as it is
    again = lf.load_adapters(tmp_path / "ck", lf.quantize(PARAMS, fn=lambda p: apply(p, X)))
    chex.assert_trees_all_equal(again, lp)


def test_checkpoint_refuses_other_settings_or_other_weights(tmp_path):
    lp = lf.lorafy(PARAMS, rank=2, quantize="nf4")
    lf.save_adapters(tmp_path / "ck", lp)
    with pytest.raises(lf.CheckpointError, match="head/kernel.*quantised with codebook int8"):
        lf.load_adapters(tmp_path / "ck", lf.quantize(PARAMS, "int8"))
    other = jax.tree.map(lambda x: x, PARAMS)
    other["head"]["kernel"] = other["head"]["kernel"].at[0, 0].add(1.0)
    with pytest.raises(lf.CheckpointError, match="'head/kernel' quantises to other codes"):
        lf.load_adapters(tmp_path / "ck", other)
    dense = lf.lorafy(PARAMS, rank=2)
    lf.save_adapters(tmp_path / "dense", dense)
    with pytest.raises(lf.CheckpointError, match="trained on a dense base"):
        lf.load_adapters(tmp_path / "dense", lf.quantize(PARAMS))


def test_bad_input_names_the_path():
    p = {"ids": jnp.arange(128).reshape(2, 64), "w": jnp.ones((64, 64))}
    with pytest.raises(lf.TargetDtypeError, match="'ids'"):
        lf.quantize(p, targets="ids")
    with pytest.raises(lf.ArgumentError, match="codebook"):
        lf.quantize(p, "fp4")
    with pytest.raises(lf.ArgumentError, match="block_size"):
        lf.quantize(p, block_size=63)
    with pytest.raises(lf.TargetError, match="matched no leaf"):
        lf.quantize(p, targets="nothing")
    with pytest.raises(lf.ArgumentError, match="quantize"):
        lf.lorafy(p, quantize=4)
    full = lf.lorafy({"w": jnp.ones((64, 64)), "b": jnp.ones((64, 2))}, rank=2, targets="w", trainable="b")
    with pytest.raises(lf.TargetError, match="'b'"):
        lf.quantize(full, targets="b")
    with pytest.raises(lf.ArgumentError, match="under a JAX transformation"):
        jax.jit(lambda w: lf.quantize({"w": w}))(jnp.ones((64, 64)))


def test_a_size_off_the_block_is_quantised_like_the_reference_with_a_short_last_block():
    w = jax.random.normal(jax.random.key(3), (7, 143))
    lp = lf.lorafy({"w": w}, rank=2, quantize="nf4")
    q = lp["w"].w
    assert q.codes.shape == (-(-7 * 143 // 2),) and q.absmax_q.shape == (-(-7 * 143 // 64),)
    chex.assert_trees_all_equal(lf.merge(lp)["w"], q.dequantize())
