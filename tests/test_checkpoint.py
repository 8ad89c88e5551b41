"""save_adapters / load_adapters / save_merged: round trips, sizes, damaged checkpoints, wrong bases."""

import json
import re
import shutil
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import chex
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from hypothesis import HealthCheck, given, settings

import lorax_fn as lf
from lorax_fn.errors import CheckpointError
from lorax_fn.weight import factor_shapes

from models import nnx_model, transformer

ATTN_LAYOUT = {r"block\d+/attn/(query|key|value)/kernel": ((), (0,), (1, 2)),
               r"block\d+/attn/out/kernel": ((), (0, 1), (2,))}
TARGETS = r"block\d+/(attn/(query|key|value|out)|mlp_in|mlp_out)/kernel"


def trained(lp, seed=0, scale=0.05):
    """Non-zero ``b`` (and a perturbed ``a``): a fresh ``lorafy`` has ``b = 0``, which would hide a lost ``b``."""
    rng = np.random.default_rng(seed)

    def one(x):
        if not lf.is_lora(x):
            return x
        a = x.a + jnp.asarray(rng.standard_normal(x.a.shape) * scale, x.a.dtype)
        return x.replace(a=a, b=jnp.asarray(rng.standard_normal(x.b.shape) * scale, x.b.dtype))

    return jax.tree.map(one, lp, is_leaf=lf.is_lora)


@pytest.fixture(scope="module")
def tiny():
    """The zoo's decoder, adapted on attention and MLP kernels, with trained adapters and one trained bias."""
    apply, params, (toks,) = transformer.make(layers=2)
    lp = trained(lf.lorafy(params, rank=2, alpha=4, targets=TARGETS, layout=ATTN_LAYOUT))
    lp["block1"]["mlp_out"]["bias"] = lp["block1"]["mlp_out"]["bias"] + 0.5  # a fully trained leaf
    return apply, params, toks, lp


def saved(tmp_path, lp, name="ad", **kw):
    return lf.save_adapters(tmp_path / name, lp, trainable=r".*mlp_out/bias", **kw)


def fresh_base():
    """The same base params, built again: no array is shared with the tree that was saved."""
    return transformer.make(layers=2)[1]


# ------------------------------------------------------------------ round trips
def test_round_trip_is_bit_identical(tiny, tmp_path):
    apply, _, toks, lp = tiny
    path = saved(tmp_path, lp)
    back = lf.load_adapters(path, fresh_base())

    chex.assert_trees_all_equal(lf.adapters(back), lf.adapters(lp))
    chex.assert_trees_all_equal(lf.merge(back), lf.merge(lp))
    chex.assert_trees_all_equal(lf.lora(apply)(back, toks), lf.lora(apply)(lp, toks))
    # the trained bias comes back, not the base's
    chex.assert_trees_all_equal(back["block1"]["mlp_out"]["bias"], lp["block1"]["mlp_out"]["bias"])
    assert not np.array_equal(back["block1"]["mlp_out"]["bias"], fresh_base()["block1"]["mlp_out"]["bias"])


def test_nnx_state_round_trip(tmp_path):
    apply, state, (toks,) = nnx_model.make()
    layout = {r"attn/(query|key|value)/kernel": ((), (0,), (1, 2)), r"attn/out/kernel": ((), (0, 1), (2,)),
              r"conv/kernel": ((), (0, 1), (2,))}
    lp = trained(lf.lorafy(state, rank=2, targets=".*kernel", layout=layout))
    path = lf.save_adapters(tmp_path / "nnx", lp)
    assert "attn/query/kernel" in {e["path"] for e in lf.read_adapter_config(path)["adapters"]}
    back = lf.load_adapters(path, nnx_model.make()[1])
    chex.assert_trees_all_equal(lf.lora(apply)(back, toks), lf.lora(apply)(lp, toks))


def test_config_records_what_the_issue_lists(tiny, tmp_path):
    _, params, _, lp = tiny
    cfg = lf.read_adapter_config(saved(tmp_path, lp, metadata={"base": "zoo decoder"}))
    assert cfg["library_version"] == lf.__version__ and cfg["metadata"] == {"base": "zoo decoder"}
    by_path = {e["path"]: e for e in cfg["adapters"]}
    want = sorted(p for p, x in zip(*_paths(lp)) if lf.is_lora(x))
    assert sorted(by_path) == want and len(want) == 12
    q = by_path["block0/attn/query/kernel"]
    assert (q["rank"], q["alpha"], q["variant"]) == (2, 4.0, "lora")
    assert q["layout"] == {"stack": [], "in": [0], "out": [1, 2]}
    assert q["base"] == {"shape": list(params["block0"]["attn"]["query"]["kernel"].shape), "dtype": "float32"}
    assert q["arrays"]["a"]["shape"] == [32, 2] and q["arrays"]["b"]["shape"] == [2, 4, 8]
    assert all(isinstance(s["crc32"], int) for e in cfg["adapters"] for s in e["arrays"].values())
    assert [e["path"] for e in cfg["trainable"]] == ["block0/mlp_out/bias", "block1/mlp_out/bias"]


def _paths(tree):
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lf.is_lora)
    from lorax_fn.paths import path_str
    return [path_str(k) for k, _ in flat], [x for _, x in flat]


@st.composite
def weights(draw):
    """A LoRA weight of 2-4 axes with a random (stack, in, out) split, rank, alpha, variant and dtypes."""
    nd = draw(st.integers(2, 4))
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=nd, max_size=nd)))
    perm = draw(st.permutations(range(nd)))
    ns = draw(st.integers(0, nd - 2))
    ni = draw(st.integers(1, nd - ns - 1))
    lay = lf.Layout(tuple(sorted(perm[:ns])), tuple(perm[ns:ns + ni]), tuple(perm[ns + ni:]))
    rank = draw(st.integers(1, 4))
    base_dt, ad_dt = draw(st.sampled_from([np.float32, jnp.bfloat16])), draw(st.sampled_from([np.float32,
                                                                                              jnp.bfloat16]))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    sa, sb = factor_shapes(shape, lay, rank)
    # built by hand from NumPy arrays: independent of lorafy, and nothing to compile per shape
    return lf.LoraWeight(rng.standard_normal(shape).astype(base_dt), rng.standard_normal(sa).astype(ad_dt),
                         rng.standard_normal(sb).astype(ad_dt), rank=rank,
                         alpha=draw(st.sampled_from([1.0, 2.5, 16.0])), layout=lay,
                         variant=draw(st.sampled_from(["lora", "rslora"])))


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lw=weights())
def test_round_trip_any_layout_rank_and_dtype(tmp_path, lw):
    tree = {"w": lw, "frozen": np.arange(3.0)}
    path = lf.save_adapters(tmp_path / "w", tree, overwrite=True)
    back = lf.load_adapters(path, lf.base(tree))
    got = back["w"]
    assert (got.rank, got.alpha, got.layout, got.variant) == (lw.rank, lw.alpha, lw.layout, lw.variant)
    assert got.a.dtype == lw.a.dtype and got.w.dtype == lw.w.dtype
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, back), tree)


def test_dtype_of_base_and_adapters(tiny, tmp_path):
    """A bfloat16 base takes the saved float32 adapters as they are (or cast with ``dtype=``);
    ``merge`` follows the base's dtype."""
    _, params, _, lp = tiny
    path = saved(tmp_path, lp)
    half = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    back = lf.load_adapters(path, half)
    q = back["block0"]["attn"]["query"]["kernel"]
    assert q.w.dtype == jnp.bfloat16 and q.a.dtype == jnp.float32
    assert back["block1"]["mlp_out"]["bias"].dtype == jnp.bfloat16  # trained leaves follow their base leaf
    want = lf.attach(half, lf.adapters(lp))  # the same adapters put onto the bf16 base by hand
    chex.assert_trees_all_equal(lf.merge(back["block0"]), lf.merge(want["block0"]))
    assert lf.merge(back)["block0"]["mlp_in"]["kernel"].dtype == jnp.bfloat16

    cast = lf.load_adapters(path, half, dtype=jnp.bfloat16)["block0"]["attn"]["query"]["kernel"]
    assert cast.a.dtype == jnp.bfloat16
    chex.assert_trees_all_equal(cast.a, lp["block0"]["attn"]["query"]["kernel"].a.astype(jnp.bfloat16))


def test_loads_onto_a_lora_template_and_keeps_its_shardings(tiny, tmp_path):
    apply, params, toks, lp = tiny
    path = saved(tmp_path, lp)
    template = lf.lorafy(fresh_base(), rank=2, alpha=4, targets=TARGETS, layout=ATTN_LAYOUT)
    back = lf.load_adapters(path, template)
    chex.assert_trees_all_equal(lf.merge(back), lf.merge(lp))


# ------------------------------------------------------------------ wrong base
def test_wrong_shape_names_path_and_both_shapes(tiny, tmp_path):
    _, params, _, lp = tiny
    path = saved(tmp_path, lp)
    other = transformer.make(layers=2, d_model=48, heads=4)[1]
    with pytest.raises(lf.StructureError, match=r"'block0/attn/key/kernel'.*\(32, 4, 8\).*\(48, 4, 12\)"):
        lf.load_adapters(path, other)


def test_missing_path_is_named(tiny, tmp_path):
    _, params, _, lp = tiny
    path = saved(tmp_path, lp)
    fewer = transformer.make(layers=1)[1]
    with pytest.raises(lf.StructureError, match=r"'block1/attn/key/kernel'.*no such leaf.*nearest"):
        lf.load_adapters(path, fewer)


def test_rank_differs_from_a_lora_base(tiny, tmp_path):
    _, params, _, lp = tiny
    path = saved(tmp_path, lp)
    rank4 = lf.lorafy(fresh_base(), rank=4, targets=TARGETS, layout=ATTN_LAYOUT)
    with pytest.raises(lf.StructureError, match=r"'block0/attn/key/kernel'.*rank 4 \(a \(32, 4\), b \(4, 4, 8\)\)"
                                                r".*rank 2 \(a \(32, 2\), b \(2, 4, 8\)\)"):
        lf.load_adapters(path, rank4)


def _canonical_crc(cfg):
    """The config checksum computed here independently: CRC-32 of sorted, compact JSON without the field."""
    body = {k: v for k, v in cfg.items() if k != "config_crc32"}
    return zlib.crc32(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())


def _edit_config(path, edit, reseal=True):
    """Edit the stored config; ``reseal`` updates its checksum so the checks behind it are reached."""
    f = Path(path) / "config" / "metadata"
    cfg = json.loads(f.read_text())
    edit(cfg)
    if reseal:
        cfg["config_crc32"] = _canonical_crc(cfg)
    f.write_text(json.dumps(cfg))


def test_config_rank_that_disagrees_with_the_stored_arrays(tiny, tmp_path):
    _, params, _, lp = tiny
    path = saved(tmp_path, lp)

    def rank3(cfg):
        e = cfg["adapters"][0]
        e["rank"] = 3
        e["arrays"]["a"]["shape"][-1] = 3
        e["arrays"]["b"]["shape"][0] = 3

    _edit_config(path, rank3)
    with pytest.raises(CheckpointError, match=r"'block0/attn/key/kernel' a has shape \(32, 2\) but the config "
                                              r"\(rank 3\) says \(32, 3\)"):
        lf.load_adapters(path, params)


def test_config_that_contradicts_itself(tiny, tmp_path):
    _, params, _, lp = tiny
    path = saved(tmp_path, lp)
    _edit_config(path, lambda cfg: cfg["adapters"][0].update(rank=5))
    with pytest.raises(CheckpointError, match=r"inconsistent: rank 5 on base \(32, 4, 8\) needs a \(32, 5\)"):
        lf.load_adapters(path, params)


def test_config_checksum_and_values_are_checked(tiny, tmp_path):
    """Array CRCs do not cover rank/alpha/variant: the config carries a CRC of itself; values are range-checked."""
    _, params, _, lp = tiny
    path = saved(tmp_path, lp)
    cfg = lf.read_adapter_config(path)
    assert cfg["format_version"] == 2 and cfg["config_crc32"] == _canonical_crc(cfg)
    _edit_config(path, lambda c: c["adapters"][0].update(alpha=400.0), reseal=False)  # a silent scale change
    with pytest.raises(CheckpointError, match="the adapter config fails its checksum"):
        lf.load_adapters(path, params)
    with pytest.raises(CheckpointError, match="the adapter config fails its checksum"):
        lf.read_adapter_config(path)
    for field, value, why in (("variant", "foo", r"'foo'; expected one of \('lora', 'rslora'\)"),
                              ("rank", 0, "0; it must be >= 1"), ("alpha", -1.0, "-1.0; it must be finite and > 0"),
                              ("alpha", float("nan"), "nan; it must be finite and > 0")):
        _edit_config(path, lambda c: c["adapters"][0].update({"variant": "lora", "rank": 2, "alpha": 4.0,
                                                               field: value}))
        with pytest.raises(CheckpointError, match=rf"config field 'adapters\['block0/attn/key/kernel'\]\.{field}' "
                                                  rf"is {why}"):
            lf.load_adapters(path, params)


def test_colliding_paths_are_refused(tmp_path):
    """A key "a/b" and nested a -> b both print as 'a/b': saving or loading by that path would lose one."""
    rng = np.random.default_rng(0)
    params = {"a/b": jnp.asarray(rng.standard_normal((4, 3)), jnp.float32),
              "a": {"b": jnp.asarray(rng.standard_normal((4, 3)), jnp.float32)}}
    with pytest.raises(lf.StructureError, match="same path 'a/b'"):
        lf.save_adapters(tmp_path / "both", lf.lorafy(params, rank=1))
    # a checkpoint with one 'a/b' cannot be placed onto a base where two leaves answer to that path
    one = lf.save_adapters(tmp_path / "one", lf.lorafy({"a": {"b": params["a"]["b"]}}, rank=1))
    with pytest.raises(lf.StructureError, match="2 leaves of the base have the path 'a/b'"):
        lf.load_adapters(one, params)


def test_python_scalar_trainable_leaf(tmp_path):
    lp = {"w": lf.lorafy({"w": jnp.ones((4, 3))}, rank=1)["w"], "temp": 1.5}
    path = lf.save_adapters(tmp_path / "ad", lp, trainable="temp")
    entry = lf.read_adapter_config(path)["trainable"][0]
    assert (entry["path"], entry["shape"], entry["dtype"]) == ("temp", [], "float32")
    back = lf.load_adapters(path, {"w": jnp.ones((4, 3)), "temp": 0.0})
    assert float(back["temp"]) == 1.5


# ------------------------------------------------------------------ damaged checkpoints
def _data_files(path):
    return [f for f in (Path(path) / "arrays" / "d").iterdir() if f.is_file()]


# TensorStore's own checks fire here; Orbax then leaves an asyncio callback on a closed loop
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_array_file_is_an_error(tiny, tmp_path, damage):
    _, params, _, lp = tiny
    path = saved(tmp_path, lp)
    for f in _data_files(path):
        data = bytearray(f.read_bytes())
        if damage == "truncate":
            data = data[: len(data) // 2]
        else:
            data[len(data) // 2] ^= 0x10
        f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=re.escape(str(path))):
        lf.load_adapters(path, params)


def test_arrays_from_another_save_fail_their_checksums(tiny, tmp_path):
    """Well-formed files with the right shapes but other values: only the checksums can tell."""
    _, params, _, lp = tiny
    path = saved(tmp_path, lp, "a")
    other = saved(tmp_path, trained(lp, seed=7), "b")
    shutil.rmtree(path / "arrays")
    shutil.copytree(other / "arrays", path / "arrays")
    with pytest.raises(CheckpointError, match=r"'block0/attn/key/kernel' a fails its checksum"):
        lf.load_adapters(path, params)


def test_wrong_checksum_in_config(tiny, tmp_path):
    _, params, _, lp = tiny
    path = saved(tmp_path, lp)
    _edit_config(path, lambda cfg: cfg["trainable"][0].update(crc32=cfg["trainable"][0]["crc32"] ^ 1))
    with pytest.raises(CheckpointError, match=r"trained leaf 'block0/mlp_out/bias' fails its checksum"):
        lf.load_adapters(path, params)


def test_missing_or_unreadable_config(tiny, tmp_path):
    _, params, _, lp = tiny
    path = saved(tmp_path, lp)
    (path / "config" / "metadata").write_text("{not json")
    with pytest.raises(CheckpointError, match="cannot read the adapter config"):
        lf.load_adapters(path, params)
    shutil.rmtree(path / "config")
    with pytest.raises(CheckpointError, match="has no 'config' item"):
        lf.load_adapters(path, params)
    with pytest.raises(CheckpointError, match="has no 'config' item"):
        lf.read_adapter_config(path)


def test_unfinished_and_absent_checkpoints(tiny, tmp_path):
    _, params, _, lp = tiny
    path = saved(tmp_path, lp)
    path.rename(tmp_path / "ad.orbax-checkpoint-tmp")  # what a save killed before its commit leaves
    with pytest.raises(CheckpointError, match="never finished"):
        lf.load_adapters(path, params)
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        lf.load_adapters(tmp_path / "nothing", params)


def test_refuses_to_overwrite_and_needs_something_to_save(tiny, tmp_path):
    _, params, _, lp = tiny
    path = saved(tmp_path, lp)
    with pytest.raises(CheckpointError, match="already exists"):
        saved(tmp_path, lp)
    with pytest.raises(lf.StructureError, match="has no base weight"):
        lf.save_adapters(tmp_path / "x", lf.adapters(lp))
    with pytest.raises(lf.StructureError, match="nothing to save"):
        lf.save_adapters(tmp_path / "y", params)
    saved(tmp_path, trained(lp, seed=3), overwrite=True)
    assert not np.array_equal(lf.load_adapters(path, params)["block0"]["mlp_in"]["kernel"].b,
                              lp["block0"]["mlp_in"]["kernel"].b)


def test_overwrite_keeps_the_old_checkpoint_until_the_new_one_is_in(tiny, tmp_path, monkeypatch):
    import lorax_fn.checkpoint as ckpt_mod
    _, params, _, lp = tiny
    path = saved(tmp_path, lp)
    want_b = np.asarray(lp["block0"]["mlp_in"]["kernel"].b)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed while writing")

    # killed while the new checkpoint is being written: Orbax's force=True would already have deleted the old
    with monkeypatch.context() as m:
        m.setattr(ocp.CompositeCheckpointHandler, "save", killed)
        with pytest.raises(KeyboardInterrupt):
            saved(tmp_path, trained(lp, seed=3), overwrite=True)
    np.testing.assert_array_equal(lf.load_adapters(path, params)["block0"]["mlp_in"]["kernel"].b, want_b)

    # killed between the two renames: both checkpoints are complete, and the error says where
    real = ckpt_mod.os.rename

    def second_rename_killed(src, dst):  # Orbax's own commit renames pass through; the swap's second does not
        if str(src).endswith(".lorax-new"):
            raise KeyboardInterrupt("killed between the renames")
        return real(src, dst)

    with monkeypatch.context() as m:
        m.setattr(ckpt_mod.os, "rename", second_rename_killed)
        with pytest.raises(KeyboardInterrupt):
            saved(tmp_path, trained(lp, seed=3), overwrite=True)
    with pytest.raises(CheckpointError, match=r"overwrite of .* was interrupted.*ad\.lorax-new.*ad\.lorax-old"):
        lf.load_adapters(path, params)
    np.testing.assert_array_equal(lf.load_adapters(tmp_path / "ad.lorax-old", params)["block0"]["mlp_in"]["kernel"].b,
                                  want_b)

    # a later overwrite completes and leaves no siblings behind
    (tmp_path / "ad.lorax-old").rename(path)
    saved(tmp_path, trained(lp, seed=3), overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad"]  # and no unfinished Orbax temporaries
    assert not np.array_equal(lf.load_adapters(path, params)["block0"]["mlp_in"]["kernel"].b, want_b)


# ------------------------------------------------------------------ save_merged
MERGED_READER = textwrap.dedent("""
    import sys
    sys.modules["lorax_fn"] = None  # any import of lorax_fn now fails: the reader must not need it
    import flax.linen as nn, jax, jax.numpy as jnp, numpy as np, orbax.checkpoint as ocp

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3, name="out")(nn.relu(nn.Dense(16, name="hidden")(x)))

    model, x = MLP(), jnp.asarray(np.load(sys.argv[2]))
    abstract = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    with ocp.StandardCheckpointer() as ck:
        params = ck.restore(sys.argv[1], abstract)
    np.save(sys.argv[3], np.asarray(model.apply({"params": params}, x)))
    print("PLAIN-FLAX-OK")
""")


def test_save_merged_is_restored_by_plain_flax_without_lorax_fn(tmp_path):
    import flax.linen as nn

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3, name="out")(nn.relu(nn.Dense(16, name="hidden")(x)))

    model, x = MLP(), jnp.asarray(np.random.default_rng(0).standard_normal((5, 8)), jnp.float32)
    params = model.init(jax.random.key(0), x)["params"]
    lp = trained(lf.lorafy(params, rank=2))
    path = lf.save_merged(tmp_path / "merged", lp)
    with ocp.StandardCheckpointer() as ck:
        chex.assert_trees_all_equal(ck.restore(path, jax.eval_shape(lambda: params)), lf.merge(lp))

    np.save(tmp_path / "x.npy", np.asarray(x))
    res = subprocess.run([sys.executable, "-c", MERGED_READER, str(path), str(tmp_path / "x.npy"),
                          str(tmp_path / "y.npy")], capture_output=True, text=True, timeout=300)
    assert "PLAIN-FLAX-OK" in res.stdout, res.stderr[-3000:]
    chex.assert_trees_all_equal(np.load(tmp_path / "y.npy"), np.asarray(model.apply({"params": lf.merge(lp)}, x)))
    with pytest.raises(CheckpointError, match="already exists"):
        lf.save_merged(path, lp)


# ------------------------------------------------------------------ size
def _bytes(path):
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


@pytest.mark.slow
def test_benchmark_transformer_adapter_is_under_3_percent_of_full(tmp_path):
    """4 layers, d_model 512, 8 heads, MLP 2048, vocab 8192, float32; rank 8 on q/k/v/out and both MLP kernels.

    Random values everywhere: Orbax compresses, and zeros (a fresh ``b``) would make the adapter look smaller.
    """
    _, params, _ = transformer.make(vocab=8192, d_model=512, heads=8, layers=4)
    lp = trained(lf.lorafy(params, rank=8, alpha=16, targets=TARGETS, layout=ATTN_LAYOUT))
    adapter, full = _bytes(lf.save_adapters(tmp_path / "ad", lp)), _bytes(lf.save_merged(tmp_path / "full", lp))
    print(f"adapter checkpoint {adapter:,} bytes, full checkpoint {full:,} bytes, ratio {adapter / full:.4f}")
    n_adapter = sum(x.size for x in jax.tree.leaves(lf.adapters(lp)))
    assert n_adapter == 4 * (4 * (512 * 8 + 8 * 512) + 2 * (512 * 8 + 8 * 2048))
    assert full > 0.9 * 4 * sum(x.size for x in jax.tree.leaves(params))  # the full one really holds the model
    assert adapter < 0.03 * full


# ------------------------------------------------------------------ shardings
SHARDED = textwrap.dedent("""
    import sys, jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    import lorax_fn as lf
    assert jax.device_count() == 8
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    rng = np.random.default_rng(0)
    params = {"q": rng.standard_normal((8, 4, 6)).astype(np.float32),   # (embed, heads, head_dim)
              "stacked": rng.standard_normal((2, 8, 4)).astype(np.float32),  # (layers, in, out)
              "bias": rng.standard_normal(6).astype(np.float32)}
    lay = {"q": ((), (0,), (1, 2)), "stacked": ((0,), (1,), (2,))}
    lp = lf.lorafy({k: jnp.asarray(v) for k, v in params.items()}, rank=2, targets=["q", "stacked"], layout=lay)
    lp = jax.tree.map(lambda l: l.replace(b=jnp.full(l.b.shape, 0.25)) if lf.is_lora(l) else l, lp,
                      is_leaf=lf.is_lora)
    path = lf.save_adapters(sys.argv[1], lp, trainable="bias")
    specs = {"q": P("data", "model", None), "stacked": P(None, "data", "model"), "bias": P("model")}
    shard = {k: NamedSharding(mesh, s) for k, s in specs.items()}
    base = {k: jax.device_put(v, shard[k]) for k, v in params.items()}

    def check(back):
        q, s = back["q"], back["stacked"]
        assert q.a.sharding.spec == P("data", None), q.a.sharding
        assert q.b.sharding.spec == P(None, "model", None), q.b.sharding
        assert s.a.sharding.spec == P(None, "data", None), s.a.sharding
        assert s.b.sharding.spec == P(None, None, "model"), s.b.sharding
        assert back["bias"].sharding.spec == P("model"), back["bias"].sharding
        for k in ("q", "stacked"):
            np.testing.assert_array_equal(np.asarray(back[k].a), np.asarray(lp[k].a))
            np.testing.assert_array_equal(np.asarray(back[k].b), np.asarray(lp[k].b))
        merged = jax.jit(lf.merge)(back)
        np.testing.assert_array_equal(np.asarray(merged["q"]), np.asarray(lf.merge(lp)["q"]))

    check(lf.load_adapters(path, base))                       # inherited from the sharded base
    check(lf.load_adapters(path, params, shardings=shard))    # host base, shardings given explicitly
    print("SHARDED-RESTORE-OK")
""")


@pytest.mark.slow
def test_restores_straight_onto_shardings_on_8_host_devices(tmp_path):
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"}
    res = subprocess.run([sys.executable, "-c", SHARDED, str(tmp_path / "ad")], env=env, capture_output=True,
                         text=True, timeout=300)
    assert "SHARDED-RESTORE-OK" in res.stdout, res.stderr[-3000:]


# ------------------------------------------------------------------ destinations: never write through links,
# never replace what this library did not write, never hang
SMALL = {"w": jnp.arange(12.0).reshape(4, 3), "bias": jnp.zeros(3)}


def _savers():
    lp = trained(lf.lorafy(SMALL, rank=2))
    return {"adapters": lambda d, **kw: lf.save_adapters(d, lp, **kw),
            "merged": lambda d, **kw: lf.save_merged(d, lp, **kw)}


def _user_folder(root: Path) -> Path:
    (root / "data").mkdir(parents=True)
    (root / "train.py").write_text("print('train')\n")
    (root / "data" / "rows.csv").write_text("1,2\n")
    return root


def _user_files(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("kind", ["adapters", "merged"])
def test_overwrite_never_removes_a_folder_of_user_files(tmp_path, kind, monkeypatch):
    project = _user_folder(tmp_path / "project")
    before = _user_files(project)
    monkeypatch.chdir(project)
    with pytest.raises(CheckpointError, match="not a checkpoint written by lorax_fn.*left untouched"):
        _savers()[kind](".", overwrite=True)  # what a new user typed in a project folder
    assert _user_files(project) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["project"]


@pytest.mark.parametrize("kind", ["adapters", "merged"])
def test_overwrite_never_replaces_a_plain_file(tmp_path, kind):
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    with pytest.raises(CheckpointError, match="is a file, not a checkpoint directory"):
        _savers()[kind](target, overwrite=True)
    assert target.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("kind", ["adapters", "merged"])
def test_overwrite_never_replaces_another_programs_orbax_checkpoint(tmp_path, kind):
    with ocp.StandardCheckpointer() as ck:  # e.g. the user's base params
        ck.save(tmp_path / "base", SMALL)
    with pytest.raises(CheckpointError, match="not a checkpoint written by lorax_fn"):
        _savers()[kind](tmp_path / "base", overwrite=True)
    with ocp.StandardCheckpointer() as ck:
        chex.assert_trees_all_equal(ck.restore(tmp_path / "base"), SMALL)


@pytest.mark.parametrize("kind", ["adapters", "merged"])
def test_overwrite_replaces_what_this_library_wrote(tmp_path, kind):
    save = _savers()[kind]
    save(tmp_path / "ck")
    assert lf.checkpoint.written_by_lorax(tmp_path / "ck")
    save(tmp_path / "ck", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


@pytest.mark.parametrize("kind", ["adapters", "merged"])
@pytest.mark.parametrize("name", ["ck", "ck.lorax-new", "ck.lorax-old", "ck.orbax-checkpoint-tmp",
                                  "ck.lorax-new.orbax-checkpoint-tmp"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_no_save_writes_through_a_planted_symlink(tmp_path, kind, name, overwrite):
    outside = _user_folder(tmp_path / "outside")
    before = _user_files(outside)
    work = tmp_path / "work"
    work.mkdir()
    save = _savers()[kind]
    if overwrite and name != "ck":
        save(work / "ck")  # a checkpoint of ours to replace, with the link next to it
    (work / name).symlink_to(outside, target_is_directory=True)
    with pytest.raises(CheckpointError, match="symbolic link"):
        save(work / "ck", overwrite=overwrite)
    assert _user_files(outside) == before
    assert (work / name).is_symlink()


def test_symlinked_checkpoint_directory_is_refused_before_the_swap(tmp_path):
    real = lf.save_adapters(tmp_path / "real", trained(lf.lorafy(SMALL, rank=2)))
    (tmp_path / "link").symlink_to(real, target_is_directory=True)
    with pytest.raises(CheckpointError, match="symbolic link"):  # today: a raw OSError after the swap
        lf.save_adapters(tmp_path / "link", trained(lf.lorafy(SMALL, rank=2)), overwrite=True)
    assert (tmp_path / "link").is_symlink() and lf.checkpoint.written_by_lorax(real)


@pytest.mark.parametrize("kind", ["adapters", "merged"])
def test_saving_under_a_regular_file_is_an_error_and_the_process_exits(tmp_path, kind):
    (tmp_path / "a_file").write_text("x")
    code = textwrap.dedent(f"""
        import jax.numpy as jnp, lorax_fn as lf
        lp = lf.lorafy({{"w": jnp.ones((4, 3))}}, rank=2)
        save = lf.save_adapters if {kind!r} == "adapters" else lf.save_merged
        try:
            save({str(tmp_path / "a_file" / "x")!r}, lp)
        except lf.CheckpointError as err:
            print("refused:", err)
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "refused: cannot write" in res.stdout and "is a file, not a directory" in res.stdout


def test_a_trained_float_leaf_is_not_truncated_onto_an_integer_base(tmp_path):
    lp = lf.lorafy({"w": jnp.ones((4, 3)), "bias": jnp.asarray([0.37, -1.9, 2.6])}, rank=2)
    path = lf.save_adapters(tmp_path / "ad", lp, trainable="bias")
    wrong = {"w": jnp.ones((4, 3)), "bias": jnp.zeros(3, jnp.int32)}
    with pytest.raises(lf.StructureError, match="'bias' was saved as float32.*int32"):
        lf.load_adapters(path, wrong)
    # a float of another width is a cast the user asked for by the base they give
    got = lf.load_adapters(path, {"w": jnp.ones((4, 3)), "bias": jnp.zeros(3, jnp.bfloat16)})["bias"]
    np.testing.assert_array_equal(got, jnp.asarray([0.37, -1.9, 2.6]).astype(jnp.bfloat16))


@pytest.mark.parametrize("kind", ["adapters", "merged"])
def test_a_save_that_fails_inside_orbax_still_lets_the_process_exit(tmp_path, kind):
    # the destination check is switched off, so Orbax itself hits the file; its failure must not leave
    # background threads that keep the interpreter alive (today's save_merged never exited)
    (tmp_path / "a_file").write_text("x")
    code = textwrap.dedent(f"""
        import jax.numpy as jnp, lorax_fn as lf, lorax_fn.checkpoint as ck
        ck.check_destination = lambda *a, **k: None
        lp = lf.lorafy({{"w": jnp.ones((4, 3))}}, rank=2)
        save = lf.save_adapters if {kind!r} == "adapters" else lf.save_merged
        try:
            save({str(tmp_path / "a_file" / "x")!r}, lp)
        except OSError as err:
            print("failed:", type(err).__name__)
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "failed: NotADirectoryError" in res.stdout, res.stderr[-2000:]
