"""save_peft / load_peft: PEFT's file layout, checked independently with safetensors' NumPy API."""

import json
import os
import re
import time
import tracemalloc
from pathlib import Path

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
import lorax_fn.peft as peft_mod
from lorax_fn.peft import CONFIG_FILE, WEIGHTS_FILE, module_name, rename

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


# ------------------------------------------------------------------ hostile files and planted links
FC = {"fc": {"kernel": jnp.ones((6, 4))}}


def _write_peft(d, tensors, config_text):
    """A PEFT adapter directory as PEFT writes it: no lorax_fn metadata, any config text."""
    d.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(d / "adapter_model.safetensors"), metadata={"format": "pt"})
    (d / "adapter_config.json").write_text(config_text)
    return d


def _fc_tensors(r=2, dtype=np.float32, name="fc", n_in=6, n_out=4):
    rng = np.random.default_rng(0)
    return {f"{P}{name}.lora_A.weight": rng.standard_normal((r, n_in)).astype(dtype),
            f"{P}{name}.lora_B.weight": rng.standard_normal((n_out, r)).astype(dtype)}


def _config(**fields):
    return json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["fc"], **fields})


def _snapshot(d):
    """{name: bytes or link target} of everything in a directory, without following links."""
    return {p.name: (("link", os.readlink(p)) if p.is_symlink() else p.read_bytes()) for p in d.iterdir()}


@pytest.mark.parametrize("name", ["adapter_config.json", "adapter_model.safetensors"])
def test_save_refuses_a_link_at_a_final_name(tmp_path, name):
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"not yours")
    d = tmp_path / "adapter"
    d.mkdir()
    (d / name).symlink_to(outside)
    before = _snapshot(d)
    with pytest.raises(CheckpointError, match=re.escape(f"'{d / name}' is a symbolic link")):
        lf.save_peft(d, lf.lorafy(FC, rank=2))
    assert outside.read_bytes() == b"not yours"
    assert _snapshot(d) == before  # the link untouched, the other file not written, no temporaries left


def test_save_never_follows_links_at_old_temporary_names(tmp_path):
    """Temporaries are fresh names created exclusively: links planted at the old fixed names stay as they are."""
    d = tmp_path / "adapter"
    d.mkdir()
    targets = {}
    for name in ("adapter_config.json.tmp", "adapter_model.safetensors.tmp"):
        targets[name] = tmp_path / f"outside-{name}"
        targets[name].write_bytes(b"keep me")
        (d / name).symlink_to(targets[name])
    src = trained(lf.lorafy(FC, rank=2))
    lf.save_peft(d, src)
    for name, target in targets.items():
        assert (d / name).is_symlink() and os.readlink(d / name) == str(target)
        assert target.read_bytes() == b"keep me"
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert not (d / name).is_symlink() and (d / name).is_file()
    assert sorted(p.name for p in d.iterdir()) == sorted(["adapter_config.json", "adapter_model.safetensors",
                                                          *targets])
    chex.assert_trees_all_equal(lf.load_peft(d, FC), src)


def test_save_into_a_linked_directory(tmp_path):
    """A directory the user names may be a link to a directory: the files land in the real one."""
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "alias").symlink_to(real, target_is_directory=True)
    src = trained(lf.lorafy(FC, rank=2))
    lf.save_peft(tmp_path / "alias", src)
    assert sorted(p.name for p in real.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    chex.assert_trees_all_equal(lf.load_peft(real, FC), src)


def test_failed_save_leaves_no_temporaries(tmp_path, monkeypatch):
    d = tmp_path / "adapter"
    d.mkdir()
    (d / "README.md").write_text("mine")

    def full_disk(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(peft_mod.os, "replace", full_disk)
    with pytest.raises(CheckpointError, match=re.escape(f"cannot write the PEFT adapter in '{d}'") + ".*No space"):
        lf.save_peft(d, lf.lorafy(FC, rank=2))
    assert _snapshot(d) == {"README.md": b"mine"}


# each case: (config text, tensors, base, what the message must name)
_NAME = "a" * 24 + "!"  # the old matcher takes about a second on this name with the key below
# regex keys that Python's re rejects quickly on these names but that cost the automaton more than it may spend
_LONG_NAMES = ["".join(np.random.default_rng(k).choice(list("ab"), 300)) for k in range(40)]
_COSTLY = {"[ab]" * 50 + ".*" + "(a|b|c)" * 40 + str(i): 2 for i in range(64)}
_HOSTILE = {
    "catastrophic_regex": (_config(target_modules=[_NAME], rank_pattern={"(a+)+$": 2}),
                           _fc_tensors(name=_NAME), {_NAME: {"kernel": jnp.ones((6, 4))}},
                           r"rank_pattern key '\(a\+\)\+\$' uses a repeat nested inside another repeat"),
    "invalid_regex": (_config(rank_pattern={"fc(": 2}), _fc_tensors(), FC,
                      r"rank_pattern key 'fc\(' is not a valid regular expression"),
    "backreference": (_config(alpha_pattern={r"(f)\1?c": 2}), _fc_tensors(), FC,
                      r"alpha_pattern key .* uses the escape '\\1'"),
    "absurd_rank": (_config(r=10 ** 9), {f"{P}fc.lora_A.weight": np.zeros((10 ** 9, 0), np.float32),
                                         f"{P}fc.lora_B.weight": np.zeros((0, 10 ** 9), np.float32)}, FC,
                    r"field 'r' is 1000000000; a rank must be a whole number from 1 to"),
    "bool_rank": (_config(r=True, lora_alpha=1), _fc_tensors(r=1), FC, r"field 'r' is True"),
    "deep_nesting": ('{"peft_type": "LORA", "r": 2, "lora_alpha": 4, "x": ' + "[" * 200_000 + "]" * 200_000 + "}",
                     _fc_tensors(), FC, r"adapter_config.json': nested too deeply"),
    "nan_alpha": (_config(lora_alpha=float("nan")), _fc_tensors(), FC, r"field 'lora_alpha' is nan"),
    "inf_alpha": (_config(lora_alpha=float("inf")), _fc_tensors(), FC, r"field 'lora_alpha' is inf"),
    "negative_alpha": (_config(lora_alpha=-4), _fc_tensors(), FC, r"field 'lora_alpha' is -4"),
    "zero_alpha": (_config(lora_alpha=0), _fc_tensors(), FC, r"field 'lora_alpha' is 0;"),
    "bool_alpha": (_config(lora_alpha=True), _fc_tensors(), FC, r"field 'lora_alpha' is True"),
    "bool_rank_pattern": (_config(r=1, rank_pattern={"fc": True}), _fc_tensors(r=1), FC,
                          r"rank_pattern\['fc'\] is True"),
    "nan_alpha_pattern": (_config(alpha_pattern={"fc": float("nan")}), _fc_tensors(), FC,
                          r"alpha_pattern\['fc'\] is nan"),
    "text_alpha_pattern": (_config(alpha_pattern={"fc": "8"}), _fc_tensors(), FC, r"alpha_pattern\['fc'\] is '8'"),
    "list_rank_pattern": (_config(rank_pattern=["fc"]), _fc_tensors(), FC, r"field 'rank_pattern' is a list"),
    "text_use_rslora": (_config(use_rslora="yes"), _fc_tensors(), FC, r"field 'use_rslora' is 'yes'"),
    "oversized_config": (_config() + " " * (5 << 20), _fc_tensors(), FC, r"larger than 4 MiB"),
    "integer_tensors": (_config(), _fc_tensors(dtype=np.int32), FC, r"tensor 'base_model.model.fc.lora_A.weight' is I32"),
    "costly_keys": (_config(r=1, target_modules=_LONG_NAMES, rank_pattern=_COSTLY),
                    {k: v for n in _LONG_NAMES for k, v in _fc_tensors(r=1, name=n, n_in=2, n_out=2).items()},
                    {n: {"kernel": jnp.ones((2, 2))} for n in _LONG_NAMES},
                    r"evaluating rank_pattern/alpha_pattern/target_modules for these module names takes more than"),
    "untargeted_module": (_config(target_modules=["q_proj", "v_proj"]), _fc_tensors(), FC,
                          r"modules \['fc'\] are in adapter_model.safetensors but not in the config's target_modules"),
}


@pytest.mark.parametrize("case", sorted(_HOSTILE))
def test_hostile_config_is_refused_quickly(tmp_path, case):
    text, tensors, base, message = _HOSTILE[case]
    d = _write_peft(tmp_path / case, tensors, text)
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match=message):
        lf.load_peft(d, base, layout=lf.Layout((), (0,), (1,)))  # a known layout: nothing guessed from shapes
    assert time.perf_counter() - start < 1.0


def test_absurd_rank_is_refused_before_allocating(tmp_path):
    """Zero-size factors that declare a huge rank: the shapes are checked against the base before any buffer."""
    r = 1 << 20  # allowed by the config checks; a and b of the base below would be 256 MiB each
    d = _write_peft(tmp_path, {f"{P}fc.lora_A.weight": np.zeros((r, 0), np.float32),
                               f"{P}fc.lora_B.weight": np.zeros((0, r), np.float32)}, _config(r=r))
    base = {"fc": {"kernel": jnp.ones((64, 64))}}
    tracemalloc.start()
    try:
        with pytest.raises(lf.StructureError, match=r"module 'fc' \(lora_A \(1048576, 0\), lora_B \(0, 1048576\)\) "
                                                    r"does not fit 'fc/kernel' of shape \(64, 64\)"):
            lf.load_peft(d, base, layout=lf.Layout((), (0,), (1,)))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20


@pytest.mark.parametrize("name", ["adapter_config.json", "adapter_model.safetensors"])
def test_links_in_the_adapter_directory_are_not_read(tmp_path, name):
    d = _write_peft(tmp_path / "adapter", _fc_tensors(), _config())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (d / name).rename(elsewhere / name)
    (d / name).symlink_to(elsewhere / name)
    with pytest.raises(CheckpointError, match=re.escape(f"'{d / name}' is a symbolic link")):
        lf.load_peft(d, FC)


def test_a_hugging_face_cache_snapshot_is_read_through_its_blob_links(tmp_path):
    # snapshot_download's layout: <repo>/snapshots/<rev>/<file> -> ../../blobs/<hash>
    repo = tmp_path / "hub" / "models--someone--adapter"
    src = _write_peft(tmp_path / "src", _fc_tensors(), _config())
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "0123abc"
    snap.mkdir(parents=True)
    for i, name in enumerate((CONFIG_FILE, WEIGHTS_FILE)):
        (src / name).rename(repo / "blobs" / f"hash{i}")
        (snap / name).symlink_to(Path("..") / ".." / "blobs" / f"hash{i}")
    got = lf.load_peft(snap, FC)["fc"]["kernel"]
    assert got.rank == 2
    (tmp_path / "my_adapter").symlink_to(snap, target_is_directory=True)  # a link to the snapshot folder
    assert lf.load_peft(tmp_path / "my_adapter", FC)["fc"]["kernel"].rank == 2
    # a link in a snapshot folder that leaves its repo's blobs is still refused
    outside = tmp_path / "outside.json"
    (repo / "blobs" / "hash0").rename(outside)
    (snap / CONFIG_FILE).unlink()
    (snap / CONFIG_FILE).symlink_to(outside)
    with pytest.raises(CheckpointError, match="is a symbolic link"):
        lf.load_peft(snap, FC)


def test_target_modules_as_peft_writes_them(tmp_path):
    """Suffix names and a whole-name regex both cover the file's modules; a module neither names is refused."""
    params = {"model": {n: {"kernel": jnp.ones((6, 4))} for n in ("q_proj", "v_proj")}}
    tensors = {**_fc_tensors(name="model.q_proj"), **_fc_tensors(name="model.v_proj")}
    for targets in (["q_proj", "v_proj"], ["model.q_proj", "v_proj"], r"model\.(q|v)_proj", ".*_proj", None):
        d = _write_peft(tmp_path / str(len(os.listdir(tmp_path))), tensors, _config(target_modules=targets))
        back = lf.load_peft(d, params)
        assert back["model"]["v_proj"]["kernel"].rank == 2
    for targets, left_out in ((["q_proj"], "'model.v_proj'"), ("model.q_proj", "'model.v_proj'"),
                              (["proj"], "'model.q_proj', 'model.v_proj'")):  # a suffix ends at a dot
        d = _write_peft(tmp_path / str(len(os.listdir(tmp_path))), tensors, _config(target_modules=targets))
        with pytest.raises(CheckpointError, match=re.escape(f"modules [{left_out}] are in")):
            lf.load_peft(d, params)


def test_pattern_keys_as_peft_writes_them(tmp_path):
    """Plain suffixes, unescaped dotted names, '^'-anchored names and regexes; the first matching key wins."""
    params = {"model": {"layers": {str(i): {n: {"kernel": jnp.ones((6, 4))} for n in ("q_proj", "v_proj")}
                                   for i in range(2)}}}
    names = [f"model.layers.{i}.{n}" for i in range(2) for n in ("q_proj", "v_proj")]
    want_r = {"model.layers.0.q_proj": 1, "model.layers.0.v_proj": 3, "model.layers.1.q_proj": 4,
              "model.layers.1.v_proj": 2}
    tensors = {k: v for n in names for k, v in _fc_tensors(r=want_r[n], name=n).items()}
    rank_pattern = {"^model.layers.0.q_proj": 1, "layers.0.v_proj": 3, r"layers\.1\.q_proj": 4, "q_proj": 9}
    alpha_pattern = {r"model\.layers\.[01]\.v_proj$": 5, "(q|v)_proj": 7}
    d = _write_peft(tmp_path, tensors, _config(target_modules=["q_proj", "v_proj"], rank_pattern=rank_pattern,
                                               alpha_pattern=alpha_pattern))
    back = lf.load_peft(d, params)
    for n in names:
        lw = back["model"]["layers"][n.split(".")[2]][n.split(".")[3]]["kernel"]
        # independent reference: PEFT's own rule, a regex suffix match with the first key winning
        ref_r = next((v for k, v in rank_pattern.items() if re.match(rf"(.*\.)?({k})$", n)), 2)
        ref_alpha = next((v for k, v in alpha_pattern.items() if re.match(rf"(.*\.)?({k})$", n)), 4)
        assert (lw.rank, lw.alpha) == (ref_r, ref_alpha) == (want_r[n], 5.0 if "v_proj" in n else 7.0)


_ATOMS = ["a", "b", "1", "_", ".", r"\.", "[ab]", "[^a.]", "[0-9]", r"\d", r"\w", r"\W", "x"]


@st.composite
def _pattern(draw, depth=0):
    kind = draw(st.integers(0, 4 if depth < 3 else 0))
    if kind == 0:
        return draw(st.sampled_from(_ATOMS))
    if kind == 1:
        return "".join(draw(st.lists(_pattern(depth + 1), min_size=1, max_size=3)))
    if kind == 2:
        return "(" + draw(_pattern(depth + 1)) + "|" + draw(_pattern(depth + 1)) + ")"
    if kind == 3:
        return "(?:" + draw(_pattern(depth + 1)) + ")"
    atom = draw(st.sampled_from(["a", ".", "[ab]", "(ab)", r"\.", "(a|b.)"]))
    return atom + draw(st.sampled_from(["*", "+", "?", "{2}", "{1,3}", "{,2}", "{2,}", "*?"]))


@settings(max_examples=300, deadline=None)
@given(body=_pattern(), anchors=st.tuples(st.booleans(), st.booleans()),
       names=st.lists(st.text("ab.1_x", max_size=7), min_size=1, max_size=8))
def test_pattern_keys_match_like_pythons_re(body, anchors, names):
    """The linear-time matcher agrees with PEFT's rule run by Python's re, on keys re handles quickly."""
    from lorax_fn.peft_patterns import _Budget, _Key
    key = ("^" if anchors[0] else "") + body + ("$" if anchors[1] else "")
    suffix, whole = _Key(key, suffix=True), _Key(key, suffix=False)
    budget = _Budget("adapter_config.json")
    for name in names:
        assert suffix.matches(name, budget) == bool(re.match(rf"(.*\.)?({key})$", name)), (key, name)
        assert whole.matches(name, budget) == bool(re.fullmatch(key, name)), (key, name)


def test_escaped_module_names_are_literals():
    """What save_peft writes (re.escape'd names) matches exactly those names, without a regex engine."""
    from lorax_fn.peft_patterns import _Budget, _Key
    budget = _Budget("adapter_config.json")
    for name in ("model.layers.0.self_attn.q_proj", "h.0.attn.c-attn", "blocks.1.mlp+gate", "x.y[0]"):
        key = _Key(re.escape(name), suffix=True)
        assert key.literal == name
        assert key.matches(name, budget) and key.matches("base." + name, budget)
        assert not key.matches("x" + name, budget) and not key.matches(name + ".z", budget)


# ----------------------------------------------------------------- DoRA
def _dora_tree(rng):
    p = {"q": {"kernel": jnp.asarray(rng.standard_normal((8, 2, 3)), jnp.float32)},
         "fc": {"kernel": jnp.asarray(rng.standard_normal((6, 5)), jnp.float32)},
         "layers": {"kernel": jnp.asarray(rng.standard_normal((2, 5, 4)), jnp.float32)}}
    layout = {"q/kernel": ((), (0,), (1, 2)), "layers/kernel": ((0,), (1,), (2,))}
    lp = lf.lorafy(p, rank=2, alpha=3.0, variant="dora", layout=lambda path, leaf: layout.get(path))
    moved = {}
    for k, v in lp.items():
        n = v["kernel"]
        moved[k] = {"kernel": n.replace(b=n.b + 0.1 * jnp.asarray(rng.standard_normal(n.b.shape), jnp.float32),
                                        m=n.m * 1.1)}
    return p, moved


def test_dora_round_trips_through_peft_files_with_the_magnitude(tmp_path):
    rng = np.random.default_rng(11)
    p, lp = _dora_tree(rng)
    names = rename({"layers/kernel": "layers.{}.mlp", "q/kernel": "q", "fc/kernel": "fc"})
    d = lf.save_peft(tmp_path / "dora", lp, names)
    cfg = json.loads((d / CONFIG_FILE).read_text())
    assert cfg["use_dora"] is True
    with safe_open(str(d / WEIGHTS_FILE), "np") as f:
        mags = {k: f.get_tensor(k) for k in f.keys() if k.endswith(".lora_magnitude_vector")}
    # PEFT's layout: one norm per output unit of the torch (out, in) weight; our out axes flattened
    assert set(mags) == {f"base_model.model.{n}.lora_magnitude_vector" for n in ("q", "fc", "layers.0.mlp",
                                                                                    "layers.1.mlp")}
    np.testing.assert_array_equal(mags["base_model.model.q.lora_magnitude_vector"],
                                  np.asarray(lp["q"]["kernel"].m).reshape(-1))
    np.testing.assert_array_equal(mags["base_model.model.layers.1.mlp.lora_magnitude_vector"],
                                  np.asarray(lp["layers"]["kernel"].m[1]))
    back = lf.load_peft(d, p, names, layout=lambda path, leaf: {"q/kernel": ((), (0,), (1, 2)),
                                                                "layers/kernel": ((0,), (1,), (2,))}.get(path))
    for k in p:
        got, want = back[k]["kernel"], lp[k]["kernel"]
        assert isinstance(got, lf.DoraWeight)
        for c in ("a", "b", "m"):
            np.testing.assert_array_equal(getattr(got, c), getattr(want, c))
    np.testing.assert_allclose(lf.merge(back)["q"]["kernel"], lf.merge(lp)["q"]["kernel"], rtol=1e-6)


def test_dora_peft_mismatches_are_refused(tmp_path):
    rng = np.random.default_rng(12)
    p, lp = _dora_tree(rng)
    plain = lf.lorafy(p, rank=2, targets="fc/kernel")
    mixed = {**plain, "q": lp["q"]}
    with pytest.raises(lf.StructureError, match="use_dora"):
        lf.save_peft(tmp_path / "mixed", mixed)
    d = lf.save_peft(tmp_path / "d", {"fc": lp["fc"]})
    cfg = json.loads((d / CONFIG_FILE).read_text())
    cfg["use_dora"] = False
    (d / CONFIG_FILE).write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="use_dora"):
        lf.load_peft(d, {"fc": p["fc"]})


# ----------------------------------------------------------------- modules_to_save
def test_fully_trained_leaves_travel_as_modules_to_save(tmp_path):
    rng = np.random.default_rng(13)
    p = {"fc": {"kernel": jnp.asarray(rng.standard_normal((6, 5)), jnp.float32)},
         "head": {"kernel": jnp.asarray(rng.standard_normal((5, 3)), jnp.float32), "bias": jnp.zeros(3)},
         "ln": {"scale": jnp.ones(5)}}
    lp = lf.lorafy(p, rank=2, targets="fc/kernel", trainable=["head/.*", "ln/scale"])
    lp = jax.tree.map(lambda n: n.replace(w=n.w + 0.5) if isinstance(n, lf.FullWeight) else n, lp,
                      is_leaf=lf.is_lora)
    d = lf.save_peft(tmp_path / "m", lp)
    cfg = json.loads((d / CONFIG_FILE).read_text())
    assert cfg["modules_to_save"] == ["head", "ln"] and cfg["target_modules"] == ["fc"]
    with safe_open(str(d / WEIGHTS_FILE), "np") as f:
        keys = set(f.keys())
        head_w = f.get_tensor(f"{P}head.weight")
    assert {f"{P}head.weight", f"{P}head.bias", f"{P}ln.weight"} <= keys
    np.testing.assert_array_equal(head_w, np.asarray(lp["head"]["kernel"].w).T)  # torch (out, in)
    back = lf.load_peft(d, p)
    for path in (("head", "kernel"), ("head", "bias"), ("ln", "scale")):
        got, want = back[path[0]][path[1]], lp[path[0]][path[1]]
        assert isinstance(got, lf.FullWeight)
        np.testing.assert_array_equal(got.w, want.w)
    np.testing.assert_array_equal(back["fc"]["kernel"].a, lp["fc"]["kernel"].a)
    # the config and the file must agree: a parameter of a module the config does not list is refused
    cfg["modules_to_save"] = ["ln"]
    (d / CONFIG_FILE).write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"head\.(weight|bias).*modules_to_save"):
        lf.load_peft(d, p)
