"""save_peft / load_peft: PEFT's file layout, checked independently with safetensors' NumPy API."""

import json

import chex
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

import lorax_fn as lf
from lorax_fn.errors import CheckpointError
from lorax_fn.peft import module_name, rename

from models import cnn, scanned, transformer

P = "base_model.model."
TARGETS = r"embed/embedding|block0/(attn/(query|key|value|out)|mlp_in|mlp_out)/kernel"


def trained(lp, seed=0):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: x.replace(b=jnp.asarray(rng.standard_normal(x.b.shape) * 0.1, x.b.dtype))
                        if lf.is_lora(x) else x, lp, is_leaf=lf.is_lora)


@pytest.fixture(scope="module")
def decoder():
    apply, params, (toks,) = transformer.make()
    lp = trained(lf.lorafy(params, rank=2, alpha=8, targets=TARGETS, layout=transformer.LAYOUTS))
    return apply, params, toks, lp


def test_round_trip_is_bit_identical(decoder, tmp_path):
    apply, params, toks, lp = decoder
    d = lf.save_peft(tmp_path, lp, base_model_name_or_path="zoo/decoder", task_type="CAUSAL_LM")
    back = lf.load_peft(d, transformer.make()[1])
    chex.assert_trees_all_equal(back, lp)
    chex.assert_trees_all_equal(lf.merge(back), lf.merge(lp))
    chex.assert_trees_all_equal(lf.lora(apply)(back, toks), lf.lora(apply)(lp, toks))


def test_file_layout_read_independently(decoder, tmp_path):
    """Keys, shapes, dtypes and orientation as PEFT lays them out, read with safetensors' NumPy API."""
    _, params, _, lp = decoder
    d = lf.save_peft(tmp_path, lp)
    t = load_file(str(d / "adapter_model.safetensors"))
    mods = ["block0.attn.key", "block0.attn.out", "block0.attn.query", "block0.attn.value", "block0.mlp_in",
            "block0.mlp_out"]
    want = {f"{P}{m}.lora_{x}.weight" for m in mods for x in "AB"} | {f"{P}embed.lora_embedding_A",
                                                                      f"{P}embed.lora_embedding_B"}
    assert set(t) == want
    assert all(v.dtype == np.float32 for v in t.values())
    with safe_open(str(d / "adapter_model.safetensors"), "np") as f:
        assert f.metadata()["format"] == "pt"

    blk = lp["block0"]
    # Dense: torch Linear weight is (out, in); A (r, in), B (out, r)
    A, B = t[f"{P}block0.mlp_in.lora_A.weight"], t[f"{P}block0.mlp_in.lora_B.weight"]
    assert A.shape == (2, 32) and B.shape == (128, 2)
    np.testing.assert_array_equal(A, np.asarray(blk["mlp_in"]["kernel"].a).T)
    np.testing.assert_array_equal(B, np.asarray(blk["mlp_in"]["kernel"].b).T)
    # DenseGeneral query (embed, heads, head_dim): a torch Linear of in=embed, out=heads*head_dim
    A, B = t[f"{P}block0.attn.query.lora_A.weight"], t[f"{P}block0.attn.query.lora_B.weight"]
    assert A.shape == (2, 32) and B.shape == (4 * 8, 2)
    # the PEFT update B @ A, times alpha/r, is the torch-orientation (out, in) delta of the merged kernel
    for name, path in (("attn.query", ("attn", "query")), ("attn.out", ("attn", "out")), ("mlp_out", ("mlp_out",))):
        A, B = t[f"{P}block0.{name}.lora_A.weight"], t[f"{P}block0.{name}.lora_B.weight"]
        node = blk
        for k in path:
            node = node[k]
        lw = node["kernel"]
        delta = np.asarray(lf.merge(lw), np.float64) - np.asarray(lw.w, np.float64)
        n_in = int(np.prod([lw.shape[k] for k in lw.layout.inputs]))
        torch_delta = delta.reshape(n_in, -1).T
        np.testing.assert_allclose(4.0 * B.astype(np.float64) @ A.astype(np.float64), torch_delta,
                                   rtol=1e-5, atol=1e-6)
    # out projection (heads, head_dim, embed): in = heads*head_dim
    assert t[f"{P}block0.attn.out.lora_A.weight"].shape == (2, 32)
    # Embedding: lora_embedding_A (r, num_embeddings), lora_embedding_B (dim, r)
    assert t[f"{P}embed.lora_embedding_A"].shape == (2, 64) and t[f"{P}embed.lora_embedding_B"].shape == (32, 2)
    np.testing.assert_array_equal(t[f"{P}embed.lora_embedding_A"], np.asarray(lp["embed"]["embedding"].a).T)


def test_config_fields(decoder, tmp_path):
    _, params, _, lp = decoder
    lp = dict(lp)
    lp["block0"] = jax.tree.map(lambda x: x, lp["block0"], is_leaf=lf.is_lora)
    # one module with another rank and alpha: goes to rank_pattern / alpha_pattern
    lp["block0"]["mlp_out"] = dict(lp["block0"]["mlp_out"],
                                   kernel=lf.lorafy({"k": params["block0"]["mlp_out"]["kernel"]}, rank=4,
                                                    alpha=3)["k"])
    cfg = json.loads((lf.save_peft(tmp_path, lp, base_model_name_or_path="zoo/decoder",
                                   task_type="CAUSAL_LM") / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 2 and cfg["lora_alpha"] == 8
    assert cfg["target_modules"] == ["block0.attn.key", "block0.attn.out", "block0.attn.query",
                                     "block0.attn.value", "block0.mlp_in", "block0.mlp_out", "embed"]
    assert cfg["rank_pattern"] == {r"block0\.mlp_out": 4} and cfg["alpha_pattern"] == {r"block0\.mlp_out": 3}
    assert (cfg["use_rslora"], cfg["bias"], cfg["lora_dropout"], cfg["fan_in_fan_out"], cfg["use_dora"]) == \
        (False, "none", 0.0, False, False)
    assert cfg["base_model_name_or_path"] == "zoo/decoder" and cfg["task_type"] == "CAUSAL_LM"
    assert cfg["modules_to_save"] is None and cfg["init_lora_weights"] is True

    back = lf.load_peft(tmp_path, params)
    assert (back["block0"]["mlp_out"]["kernel"].rank, back["block0"]["mlp_out"]["kernel"].alpha) == (4, 3.0)
    assert (back["block0"]["mlp_in"]["kernel"].rank, back["block0"]["mlp_in"]["kernel"].alpha) == (2, 8.0)


def test_without_our_metadata_layouts_come_from_the_shapes(decoder, tmp_path):
    """A file PEFT itself wrote has no lorax_fn metadata: layouts are inferred from A/B and the base."""
    _, params, _, lp = decoder
    d = lf.save_peft(tmp_path, lp)
    f = d / "adapter_model.safetensors"
    save_file(load_file(str(f)), str(f), metadata={"format": "pt"})
    chex.assert_trees_all_equal(lf.load_peft(d, params), lp)


def test_conv_and_rslora(tmp_path):
    apply, params, (x,) = cnn.make()
    lp = trained(lf.lorafy(params, rank=2, targets=r"conv\d/kernel|head/kernel", rslora=True))
    name_map = {r"(conv\d)/kernel": (r"\1", "conv"), r"head/kernel": "classifier"}
    d = lf.save_peft(tmp_path, lp, name_map)
    t = load_file(str(d / "adapter_model.safetensors"))
    A, B = t[f"{P}conv1.lora_A.weight"], t[f"{P}conv1.lora_B.weight"]
    assert A.shape == (2, 3, 3, 3) and B.shape == (8, 2, 1, 1)  # torch Conv2d: (r, in, kh, kw), (out, r, 1, 1)
    lw = lp["conv1"]["kernel"]
    delta = np.asarray(lf.merge(lw), np.float64) - np.asarray(lw.w, np.float64)  # HWIO
    torch_delta = np.einsum("or,rihw->oihw", B[:, :, 0, 0].astype(np.float64), A.astype(np.float64)) * lw.scale
    np.testing.assert_allclose(torch_delta, delta.transpose(3, 2, 0, 1), rtol=1e-5, atol=1e-6)
    assert json.loads((d / "adapter_config.json").read_text())["use_rslora"] is True

    back = lf.load_peft(d, params, name_map)
    chex.assert_trees_all_equal(back, lp)
    chex.assert_trees_all_equal(lf.lora(apply)(back, x), lf.lora(apply)(lp, x))
    f = d / "adapter_model.safetensors"
    save_file(load_file(str(f)), str(f), metadata={"format": "pt"})  # and from the shapes alone
    chex.assert_trees_all_equal(lf.load_peft(d, params, name_map), lp)


def test_stacked_layers_become_one_module_per_layer(tmp_path):
    apply, params, (toks,) = scanned.make()
    lp = trained(lf.lorafy(params, rank=2, targets=r"layers/block/(mlp_in|attn/query)/kernel",
                           layout=scanned.LAYOUTS))
    name_map = rename({r"layers/block/mlp_in/kernel": "model.layers.{}.mlp.up_proj",
                       r"layers/block/attn/query/kernel": "model.layers.{}.self_attn.q_proj"})
    d = lf.save_peft(tmp_path, lp, name_map)
    t = load_file(str(d / "adapter_model.safetensors"))
    assert sorted(t) == sorted(f"{P}model.layers.{i}.{m}.lora_{x}.weight" for i in range(3)
                               for m in ("mlp.up_proj", "self_attn.q_proj") for x in "AB")
    a = np.asarray(lp["layers"]["block"]["mlp_in"]["kernel"].a)  # (layers, in, r)
    np.testing.assert_array_equal(t[f"{P}model.layers.1.mlp.up_proj.lora_A.weight"], a[1].T)
    back = lf.load_peft(d, params, name_map)
    chex.assert_trees_all_equal(back, lp)
    with pytest.raises(lf.StructureError, match=r"1 stack axes \(3,\).*0 '\{\}' fields"):
        lf.save_peft(tmp_path / "bad", lp, {r"layers/block/(mlp_in|attn/query)/kernel": r"\1"})


@st.composite
def dense_weight(draw):
    """A kernel of 2 or 3 axes, `in` first then `out` (PEFT keeps no layout, so that order is what it means)."""
    nd = draw(st.integers(2, 3))
    shape = tuple(draw(st.lists(st.integers(1, 6), min_size=nd, max_size=nd)))
    k = draw(st.integers(1, nd - 1))
    lay = lf.Layout((), tuple(range(k)), tuple(range(k, nd)))
    rank = draw(st.integers(1, 3))
    return shape, lay, rank, draw(st.sampled_from([np.float32, jnp.bfloat16, np.float16]))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(w=dense_weight(), seed=st.integers(0, 1000))
def test_round_trip_any_shape_and_dtype(tmp_path, w, seed):
    shape, lay, rank, dt = w
    rng = np.random.default_rng(seed)
    from lorax_fn.weight import factor_shapes
    sa, sb = factor_shapes(shape, lay, rank)
    lw = lf.LoraWeight(rng.standard_normal(shape).astype(np.float32), rng.standard_normal(sa).astype(dt),
                       rng.standard_normal(sb).astype(dt), rank=rank, alpha=float(rank + 1), layout=lay)
    tree = {"net": {"fc": {"kernel": lw}}}
    d = lf.save_peft(tmp_path, tree)
    t = load_file(str(d / "adapter_model.safetensors"))
    A, B = t[f"{P}net.fc.lora_A.weight"], t[f"{P}net.fc.lora_B.weight"]
    assert A.dtype == np.dtype(dt) and A.shape == (rank, int(np.prod(sa[:-1])))
    assert B.shape == (int(np.prod(sb[1:])), rank)
    back = lf.load_peft(d, lf.base(tree))
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, back), jax.tree.map(np.asarray, tree))


# ------------------------------------------------------------------ errors
def test_module_with_no_base_weight(decoder, tmp_path):
    _, params, _, lp = decoder
    d = lf.save_peft(tmp_path, lp)
    with pytest.raises(lf.StructureError, match=r"no base weight maps to modules \['block0.attn.key'"):
        lf.load_peft(d, params, lambda path: None if "attn/key" in path else module_name(path))


def test_shape_that_does_not_fit(decoder, tmp_path):
    _, params, _, lp = decoder
    d = lf.save_peft(tmp_path, lp)
    other = transformer.make(d_model=48)[1]
    with pytest.raises(lf.StructureError, match=r"'block0.attn.key'.*\(2, 32\).*'block0/attn/key/kernel' of shape "
                                                r"\(48, 4, 12\)"):
        lf.load_peft(d, other)


def test_rank_that_differs_from_the_config(decoder, tmp_path):
    _, params, _, lp = decoder
    d = lf.save_peft(tmp_path, lp)
    cfg = json.loads((d / "adapter_config.json").read_text())
    (d / "adapter_config.json").write_text(json.dumps(dict(cfg, r=4)))
    with pytest.raises(CheckpointError, match=r"'block0.attn.key'.*lora_A \(2, 32\).*config gives it rank 4"):
        lf.load_peft(d, params)


def test_bad_files(decoder, tmp_path):
    _, params, _, lp = decoder
    with pytest.raises(CheckpointError, match="no adapter_config.json"):
        lf.load_peft(tmp_path, params)
    d = lf.save_peft(tmp_path, lp)
    cfg = json.loads((d / "adapter_config.json").read_text())
    (d / "adapter_config.json").write_text(json.dumps(dict(cfg, peft_type="IA3")))
    with pytest.raises(CheckpointError, match="not a LoRA adapter config"):
        lf.load_peft(d, params)
    (d / "adapter_config.json").write_text(json.dumps(dict(cfg, use_dora=True)))
    with pytest.raises(CheckpointError, match="DoRA"):
        lf.load_peft(d, params)
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    f = d / "adapter_model.safetensors"
    tensors = load_file(str(f))
    save_file(dict(tensors, **{f"{P}block0.mlp_in.lora_B.bias": np.zeros(3, np.float32)}), str(f))
    with pytest.raises(CheckpointError, match=r"'base_model.model.block0.mlp_in.lora_B.bias' is not a LoRA A/B"):
        lf.load_peft(d, params)
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="cannot read"):
        lf.load_peft(d, params)
    f.unlink()
    with pytest.raises(CheckpointError, match="no adapter_model.safetensors"):
        lf.load_peft(d, params)


def test_save_errors(decoder, tmp_path):
    _, params, _, lp = decoder
    with pytest.raises(lf.StructureError, match="no module name for LoRA weight 'block0/attn/key/kernel'"):
        lf.save_peft(tmp_path, lp, {r"embed/embedding": "embed"})
    with pytest.raises(lf.StructureError, match="both map to module 'same'"):
        lf.save_peft(tmp_path, lp, lambda path: "same")
    mixed = dict(lp, embed={"embedding": lf.lorafy({"e": params["embed"]["embedding"]}, rank=2, rslora=True)["e"]})
    with pytest.raises(lf.StructureError, match="use_rslora"):
        lf.save_peft(tmp_path, mixed)


# ------------------------------------------------------------------ review fixes
def _rnd(rng, *shape):
    return jnp.asarray(rng.standard_normal(shape), jnp.float32)


def _strip_our_metadata(d):
    """What a file PEFT itself wrote looks like: no lorax_fn entries in the safetensors header."""
    f = d / "adapter_model.safetensors"
    save_file(load_file(str(f)), str(f), metadata={"format": "pt"})


def test_one_module_cannot_fill_two_weights(tmp_path):
    rng = np.random.default_rng(0)
    params = {"attn": {n: {"kernel": _rnd(rng, 8, 8)} for n in ("query", "key", "value")}}
    lp = trained(lf.lorafy(params, rank=2))
    d = lf.save_peft(tmp_path, {"attn": {"query": {"kernel": lp["attn"]["query"]["kernel"]}}})
    sloppy = {r"attn/(query|key|value)/kernel": "attn.query"}
    with pytest.raises(lf.StructureError, match=r"module 'attn.query' maps to both 'attn/key/kernel' and "
                                                r"'attn/query/kernel'"):
        lf.load_peft(d, params, sloppy)


def test_lora_base_gives_the_layout_and_must_be_covered(tmp_path):
    rng = np.random.default_rng(1)
    # a square weight stored (out, in): the shapes alone cannot tell, the template's layout can
    p = {"o": {"kernel": _rnd(rng, 6, 6)}}
    lay = lf.Layout((), (1,), (0,))
    src = trained(lf.lorafy(p, rank=2, layout=lay))
    d = lf.save_peft(tmp_path / "square", src)
    _strip_our_metadata(d)
    back = lf.load_peft(d, lf.lorafy(p, rank=2, layout=lay))
    assert back["o"]["kernel"].layout == lay
    chex.assert_trees_all_equal(back, src)

    # adapters of the template that the file does not hold must not come back unchanged
    params = {"attn": {n: {"kernel": _rnd(rng, 8, 8)} for n in ("query", "key")}}
    only_q = lf.save_peft(tmp_path / "q", {"attn": {"query": {"kernel": trained(lf.lorafy(params, rank=2))
                                                              ["attn"]["query"]["kernel"]}}})
    with pytest.raises(lf.StructureError, match=r"the given tree has adapters the file does not have: "
                                                r"'attn/key/kernel'"):
        lf.load_peft(only_q, trained(lf.lorafy(params, rank=2), seed=5))


def test_embedding_with_its_feature_axis_as_input(tmp_path):
    rng = np.random.default_rng(2)
    vocab, dim, r = 10, 4, 2
    p = {"embed": {"embedding": _rnd(rng, vocab, dim)}}
    src = trained(lf.lorafy(p, rank=r, layout=lf.Layout((), (1,), (0,))))
    lw = src["embed"]["embedding"]
    assert lw.a.shape == (dim, r) and lw.b.shape == (r, vocab)
    d = lf.save_peft(tmp_path, src)
    t = load_file(str(d / "adapter_model.safetensors"))
    A, B = t[f"{P}embed.lora_embedding_A"], t[f"{P}embed.lora_embedding_B"]
    assert A.shape == (r, vocab) and B.shape == (dim, r)  # PEFT: (r, num_embeddings), (embedding_dim, r)
    # PEFT's embedding update is (B @ A).T * scale, a (num_embeddings, embedding_dim) table; here a and b
    # hold exactly those factors, so A is b and B is a, value for value
    np.testing.assert_array_equal(A, np.asarray(lw.b))
    np.testing.assert_array_equal(B, np.asarray(lw.a))
    chex.assert_trees_all_equal(lf.load_peft(d, p), src)  # from our metadata
    _strip_our_metadata(d)
    chex.assert_trees_all_equal(lf.load_peft(d, lf.lorafy(p, rank=r, layout=lf.Layout((), (1,), (0,)))), src)
    with pytest.raises(lf.LayoutError, match=r"vocabulary axis 0 must be the whole 'in' or the whole 'out'"):
        lf.save_peft(tmp_path / "3d", lf.lorafy({"e": {"embedding": _rnd(rng, 5, 2, 3)}}, rank=1,
                                                layout=((), (0, 1), (2,))))


def test_stack_axis_that_is_not_leading(tmp_path):
    rng = np.random.default_rng(3)
    p = {"w": _rnd(rng, 4, 3, 5)}  # (in, layers, out)
    src = trained(lf.lorafy(p, rank=2, layout=lf.Layout((1,), (0,), (2,))))
    name_map = {r"w": "layer.{}"}
    d = lf.save_peft(tmp_path, src, name_map)
    t = load_file(str(d / "adapter_model.safetensors"))
    assert sorted(t) == sorted(f"{P}layer.{i}.lora_{x}.weight" for i in range(3) for x in "AB")
    a = np.asarray(src["w"].a)  # (layers, in, r)
    np.testing.assert_array_equal(t[f"{P}layer.1.lora_A.weight"], a[1].T)
    chex.assert_trees_all_equal(lf.load_peft(d, p, name_map), src)


def test_config_that_does_not_belong_to_the_weights(tmp_path, monkeypatch):
    import lorax_fn.peft as peft_mod
    p = {"fc": {"kernel": jnp.ones((6, 4))}}
    old = trained(lf.lorafy(p, rank=2, alpha=2))
    new = trained(lf.lorafy(p, rank=2, alpha=32), seed=1)
    d = lf.save_peft(tmp_path, old)
    real, calls = peft_mod.os.replace, []

    def crash_on_second(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed between the two renames")
        return real(src, dst)

    monkeypatch.setattr(peft_mod.os, "replace", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        lf.save_peft(d, new)
    monkeypatch.setattr(peft_mod.os, "replace", real)
    with pytest.raises(CheckpointError, match="adapter_config.json is not the config adapter_model.safetensors "
                                              "was saved with"):
        lf.load_peft(d, p)
    # a complete save is consistent again; a hand-edited lora_alpha is not
    lf.save_peft(d, new)
    assert lf.load_peft(d, p)["fc"]["kernel"].alpha == 32.0
    cfg = json.loads((d / "adapter_config.json").read_text())
    (d / "adapter_config.json").write_text(json.dumps(dict(cfg, lora_alpha=64)))
    with pytest.raises(CheckpointError, match="is not the config"):
        lf.load_peft(d, p)
