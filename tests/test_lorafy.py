"""lorafy: targets, default rule, inferred layouts, init statistics and bad input."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import lorax_fn as lf


def _params():
    k = jax.random.split(jax.random.key(0), 4)
    return {
        "encoder": {"dense": {"kernel": jax.random.normal(k[0], (8, 16)), "bias": jnp.zeros(16)},
                    "layers": [{"kernel": jax.random.normal(k[1], (16, 16))}]},
        "head": {"kernel": jax.random.normal(k[2], (16, 4)), "step": jnp.zeros((3, 3), jnp.int32)},
    }


def _targets(lp):
    flat = jax.tree_util.tree_flatten_with_path(lp, is_leaf=lf.is_lora)[0]
    return sorted("/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in p)
                  for p, x in flat if lf.is_lora(x))


def test_default_targets_every_float_leaf_of_ndim_2():
    assert _targets(lf.lorafy(_params(), rank=4)) == ["encoder/dense/kernel", "encoder/layers/0/kernel",
                                                        "head/kernel"]


def test_default_targets_too_small_for_the_rank_stay_dense_with_a_warning():
    with pytest.warns(UserWarning, match="'head/kernel'"):
        lp = lf.lorafy(_params(), rank=8)
    assert _targets(lp) == ["encoder/dense/kernel", "encoder/layers/0/kernel"]


@pytest.mark.parametrize("targets, expected", [
    (".*dense/kernel", ["encoder/dense/kernel"]),
    ([".*layers/0/kernel", "head/kernel"], ["encoder/layers/0/kernel", "head/kernel"]),
    (lambda path, x: path.startswith("head") and x.dtype == jnp.float32, ["head/kernel"]),
])
def test_targets_forms(targets, expected):
    assert _targets(lf.lorafy(_params(), rank=2, targets=targets)) == expected


def test_exclude():
    assert _targets(lf.lorafy(_params(), rank=4, exclude="head/.*")) == ["encoder/dense/kernel",
                                                                 "encoder/layers/0/kernel"]


def test_targets_fullmatch_not_search():
    with pytest.raises(lf.TargetError):
        lf.lorafy(_params(), targets="kernel")


def test_targets_matching_nothing_lists_nearest_paths():
    with pytest.raises(lf.TargetError, match="nearest paths: .*'encoder/dense/kernel'"):
        lf.lorafy(_params(), targets="encoder/dense/kernal")


def test_non_float_target_is_a_type_error():
    with pytest.raises(lf.TargetDtypeError, match="'head/step'") as info:
        lf.lorafy(_params(), rank=2, targets="head/.*")
    assert isinstance(info.value, TypeError) and isinstance(info.value, lf.LoraError)


def test_rank_larger_than_dims():
    with pytest.raises(lf.RankError, match="'head/kernel'.*in 16, out 4"):
        lf.lorafy(_params(), rank=5, targets="head/kernel")
    with pytest.raises(lf.RankError):
        lf.lorafy(_params(), rank=0)


def test_layout_that_does_not_fit():
    with pytest.raises(lf.LayoutError, match="'head/kernel'"):
        lf.lorafy(_params(), targets="head/kernel", layout=((), (0,), (2,)))
    with pytest.raises(lf.LayoutError, match="exactly once"):
        lf.lorafy(_params(), targets="head/kernel", layout=((), (0,), (0,)))
    with pytest.raises(lf.LayoutError, match="at least one"):
        lf.lorafy(_params(), targets="head/kernel", layout=((0,), (1,), ()))


def test_one_dimensional_target_is_rejected():
    with pytest.raises(lf.LayoutError, match="'encoder/dense/bias'"):
        lf.lorafy(_params(), targets="encoder/dense/bias")


def test_integer_keys_and_attributes_in_paths():
    class Box:  # an object registered with attribute keys, as Equinox modules are
        def __init__(self, w):
            self.w = w

    jax.tree_util.register_pytree_with_keys(
        Box, lambda b: (((jax.tree_util.GetAttrKey("w"), b.w),), None), lambda _, c: Box(*c))
    tree = {"layers": {0: Box(jnp.ones((4, 3))), 1: Box(jnp.ones((4, 3)))}}
    lp = lf.lorafy(tree, rank=2, targets="layers/1/w")
    assert lf.is_lora(lp["layers"][1].w) and not lf.is_lora(lp["layers"][0].w)


def test_merge_at_init_is_bit_identical_and_keeps_dtypes():
    p = jax.tree.map(lambda x: x.astype(jnp.bfloat16) if x.dtype == jnp.float32 else x, _params())
    merged = lf.merge(lf.lorafy(p, rank=2, key=jax.random.key(7)))
    assert jax.tree.structure(merged) == jax.tree.structure(p)
    for x, y in zip(jax.tree.leaves(merged), jax.tree.leaves(p)):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_kaiming_init_matches_peft_bounds():
    w = jnp.zeros((400, 300))
    lw = lf.lorafy({"w": w}, rank=16, key=jax.random.key(3))["w"]
    bound = 1 / math.sqrt(400)
    a = np.asarray(lw.a)
    assert a.shape == (400, 16) and np.all(np.abs(a) <= bound)
    # a uniform draw fills its range: max near the bound, variance bound²/3
    assert np.abs(a).max() > 0.99 * bound
    assert abs(a.var() - bound**2 / 3) < 0.05 * bound**2 / 3
    assert not np.any(np.asarray(lw.b)) and lw.b.shape == (16, 300)


def test_gaussian_init():
    lw = lf.lorafy({"w": jnp.zeros((500, 200))}, rank=10, init="gaussian")["w"]
    assert abs(float(jnp.std(lw.a)) - 0.1) < 0.01
    with pytest.raises(ValueError, match="init"):
        lf.lorafy({"w": jnp.zeros((5, 5))}, init="svd")


def test_alpha_default_and_rslora_scale():
    lw = lf.lorafy({"w": jnp.zeros((8, 8))}, rank=4)["w"]
    assert lw.alpha == 4 and lw.scale == 1.0
    assert lf.lorafy({"w": jnp.zeros((8, 8))}, rank=4, alpha=8, rslora=True)["w"].scale == 4.0


def test_already_lorafied_leaves_are_kept():
    lp = lf.lorafy(_params(), rank=4, targets="head/kernel")
    again = lf.lorafy(lp, rank=4)
    assert again["head"]["kernel"] is lp["head"]["kernel"] or np.array_equal(
        again["head"]["kernel"].a, lp["head"]["kernel"].a)
    assert len(_targets(again)) == 3


def test_fn_infers_layouts_of_real_uses():
    p = {"qkv": jnp.ones((3, 8, 4)), "proj": jnp.ones((6, 8)), "experts": jnp.ones((5, 8, 6)),
         "scanned": jnp.ones((2, 8, 8)), "bias_stack": jnp.ones((2, 8)), "emb": jnp.ones((11, 8))}

    def f(p, x, ids):
        h = p["emb"][ids] + x                                   # row lookup: in = vocab
        q = jnp.einsum("be,hed->bhd", h, p["qkv"])              # input axis in the middle
        y = h @ p["proj"].T                                      # stored (out, in)
        z = jnp.einsum("xbe,xeo->xbo", jnp.stack([h] * 5), p["experts"])  # experts as a batch axis
        c, _ = jax.lax.scan(lambda c, wb: (c @ wb[0] + wb[1], None), h, (p["scanned"], p["bias_stack"]))
        return q.sum() + y.sum() + z.sum() + c.sum() + (c @ p["emb"].T).sum()

    x, ids = jnp.ones((2, 8)), jnp.array([1, 2])
    lp = lf.lorafy(p, rank=2, fn=lambda q: f(q, x, ids))
    lay = {k: v.layout for k, v in lp.items() if lf.is_lora(v)}
    assert lay["qkv"] == lf.Layout((), (1,), (0, 2))
    assert lay["proj"] == lf.Layout((), (1,), (0,))
    assert lay["experts"] == lf.Layout((0,), (1,), (2,))
    assert lay["scanned"] == lf.Layout((0,), (1,), (2,))
    assert lay["emb"] == lf.Layout((), (0,), (1,))       # tied: the lookup's layout wins
    assert "bias_stack" not in lay                        # never contracted: left alone
    rep = lf.explain(f, lp, x, ids)
    assert not rep.materialized, str(rep)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(1, 6), min_size=2, max_size=4), st.integers(1, 3))
def test_factor_shapes_follow_default_rule(shape, rank):
    shape = tuple(shape)
    fan_in, fan_out = math.prod(shape[:-1]), shape[-1]
    if rank > min(fan_in, fan_out):
        with pytest.raises(lf.RankError):
            lf.lorafy({"w": jnp.zeros(shape)}, rank=rank, targets="w")
        return
    lw = lf.lorafy({"w": jnp.zeros(shape)}, rank=rank)["w"]
    assert lw.a.shape == shape[:-1] + (rank,) and lw.b.shape == (rank, shape[-1])
    assert lw.shape == shape and lw.dtype == jnp.float32


def test_float32_adapters_on_a_bfloat16_base():
    k = jax.random.split(jax.random.key(5), 3)
    w = jax.random.normal(k[0], (32, 16)).astype(jnp.bfloat16)
    x = jax.random.normal(k[1], (4, 32)).astype(jnp.bfloat16)
    lw = lf.lorafy({"w": w}, rank=4, alpha=8, dtype=jnp.float32)["w"]
    lw = lw.replace(b=jax.random.normal(k[2], lw.b.shape))
    assert lw.a.dtype == jnp.float32 and lw.b.dtype == jnp.float32 and lw.dtype == jnp.bfloat16
    out = lf.lora(lambda p, x: x @ p, on_materialize="raise")(lw, x)
    # reference in float32 from the raw factors
    ref = np.asarray(x, np.float32) @ (np.asarray(w, np.float32) + 2.0 * np.asarray(lw.a) @ np.asarray(lw.b))
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, rtol=3e-2, atol=3e-2 * np.abs(ref).max())
    g = jax.grad(lambda p: lf.lora(lambda p, x: x @ p)(p, x).astype(jnp.float32).sum())(lw)
    assert g.a.dtype == jnp.float32 and g.b.dtype == jnp.float32
    assert lf.merge(lw).dtype == jnp.bfloat16


def test_fn_infers_expert_stacks_selected_by_index():
    x, ids = jnp.ones((5, 4)), jnp.array([0, 2, 1, 1, 0])
    f = lambda p, x: jnp.einsum("td,tdo->to", x, p["experts"][ids])  # noqa: E731
    lp = lf.lorafy({"experts": jnp.ones((3, 4, 6))}, rank=2, fn=lambda p: f(p, x))
    assert lp["experts"].layout == lf.Layout((0,), (1,), (2,))
    assert not lf.explain(f, lp, x).materialized


def test_conflicting_uses_warn_and_name_the_path():
    f = lambda p: (jnp.einsum("bd,hdk->bhk", jnp.ones((2, 4)), p["w"]).sum()  # noqa: E731
                   + jnp.einsum("bk,hdk->bhd", jnp.ones((2, 5)), p["w"]).sum())
    with pytest.warns(UserWarning, match="'w' is used with conflicting layouts"):
        lf.lorafy({"w": jnp.ones((3, 4, 5))}, rank=2, fn=f)


def test_malformed_layout_is_a_layout_error():
    with pytest.raises(lf.LayoutError, match="'head/kernel'"):
        lf.lorafy(_params(), rank=2, targets="head/kernel", layout={"head/kernel": ((), (0,))})


# ------------------------------------------------------------------ bad arguments, named before anything runs
@pytest.mark.parametrize("alpha", [0, -1.0, float("nan"), float("inf"), True, "2"])
def test_alpha_that_could_never_be_loaded_is_refused(alpha):
    # saving such a tree works but loading refuses it: a run that could not be resumed
    with pytest.raises(lf.ArgumentError, match="alpha"):
        lf.lorafy(_params(), rank=2, alpha=alpha)


@pytest.mark.parametrize("rank", [2.0, True, "2", None])
def test_rank_must_be_an_integer(rank):
    with pytest.raises(lf.RankError, match="rank must be a positive integer"):
        lf.lorafy(_params(), rank=rank)


def test_rank_may_be_a_numpy_integer():
    assert lf.lorafy(_params(), rank=np.int64(2), targets="head/kernel")["head"]["kernel"].rank == 2


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.uint8, jnp.float8_e4m3fn, "not-a-dtype"])
def test_adapter_dtype_must_be_a_wide_float(dtype):
    with pytest.raises(lf.ArgumentError, match="dtype"):
        lf.lorafy(_params(), rank=2, dtype=dtype)


def test_float8_base_needs_a_wider_adapter_dtype():
    p = {"w": jnp.ones((8, 4), jnp.float8_e4m3fn)}
    with pytest.raises(lf.TargetDtypeError, match="'w'.*dtype=jnp.bfloat16"):
        lf.lorafy(p, rank=2)
    lw = lf.lorafy(p, rank=2, dtype=jnp.bfloat16)["w"]
    assert lw.a.dtype == jnp.bfloat16 and lw.w.dtype == jnp.float8_e4m3fn


@pytest.mark.parametrize("key, hint", [
    (0, "jax.random.key"),
    (jax.random.split(jax.random.key(0)), "keys\\[0\\]"),
    (jax.random.split(jax.random.PRNGKey(0)), "keys\\[0\\]"),
    (jnp.zeros(3, jnp.float32), "jax.random.key"),
])
def test_key_must_be_one_prng_key(key, hint):
    with pytest.raises(lf.ArgumentError, match=f"key.*{hint}"):
        lf.lorafy(_params(), rank=2, key=key)


def test_raw_and_typed_keys_both_work_and_differ_by_seed():
    a1 = lf.lorafy(_params(), rank=2, key=jax.random.PRNGKey(1))["head"]["kernel"].a
    a2 = lf.lorafy(_params(), rank=2, key=jax.random.key(1))["head"]["kernel"].a
    a3 = lf.lorafy(_params(), rank=2, key=jax.random.key(2))["head"]["kernel"].a
    np.testing.assert_array_equal(a1, a2)
    assert not np.array_equal(a2, a3)


@pytest.mark.parametrize("arg", ["targets", "exclude"])
def test_glob_instead_of_regex_is_a_target_error_with_the_fix(arg):
    with pytest.raises(lf.TargetError, match=f"{arg}='\\*kernel'.*full-match.*'\\.\\*kernel'"):
        lf.lorafy(_params(), **{arg: "*kernel"})


@pytest.mark.parametrize("targets", [[1], 3, [".*kernel", None]])
def test_targets_that_are_not_patterns(targets):
    with pytest.raises(lf.TargetError, match="targets"):
        lf.lorafy(_params(), targets=targets)


def test_partial_pattern_suggests_the_full_match():
    with pytest.raises(lf.TargetError, match="did you mean '\\.\\*kernel'"):
        lf.lorafy(_params(), targets="kernel")


def test_exclude_that_matches_nothing_warns_with_a_hint():
    with pytest.warns(UserWarning, match="exclude='kernel' matched no leaf.*'\\.\\*kernel'"):
        lp = lf.lorafy(_params(), rank=2, exclude="kernel")
    assert len(_targets(lp)) == 3  # nothing excluded, as the warning says


def test_rank_too_large_for_every_default_target_warns_that_nothing_trains():
    with pytest.warns(lf.NoAdapterWarning, match="rank 1000.*Lower `rank`"):
        lp = lf.lorafy(_params(), rank=1000)
    assert _targets(lp) == []


def test_fn_that_ignores_its_argument_warns_that_nothing_trains():
    p = _params()
    x = jnp.ones((2, 8))
    with pytest.warns(lf.NoAdapterWarning, match="`fn` never uses its argument.*fn=lambda p"):
        lp = lf.lorafy(p, rank=2, fn=lambda _: x @ p["encoder"]["dense"]["kernel"])
    assert _targets(lp) == []


def test_tree_without_matrices_warns_that_nothing_trains():
    with pytest.warns(lf.NoAdapterWarning, match="no floating-point leaf of ndim >= 2"):
        lf.lorafy({"bias": jnp.zeros(3), "step": jnp.zeros((3, 3), jnp.int32)})


def test_lorafy_of_a_lorafied_tree_does_not_warn(recwarn):
    lp = lf.lorafy(_params(), rank=2)
    again = lf.lorafy(lp, rank=2)
    assert _targets(again) == _targets(lp) and not [w for w in recwarn if w.category is lf.NoAdapterWarning]


@pytest.mark.parametrize("targets", [[re.compile(r".*dense/kernel")], {r".*dense/kernel"}])
def test_targets_may_be_compiled_patterns_or_any_iterable(targets):
    assert _targets(lf.lorafy(_params(), rank=2, targets=targets)) == ["encoder/dense/kernel"]


def test_rank_may_be_a_jax_integer_scalar():
    assert lf.lorafy(_params(), rank=jnp.int32(2), targets="head/kernel")["head"]["kernel"].rank == 2


# ------------------------------------------------------------------ rank_pattern / alpha_pattern
def test_rank_and_alpha_patterns_override_per_path_first_match_wins():
    lp = lf.lorafy(_params(), rank=2, alpha=4,
                   rank_pattern={r"encoder/.*": 3, r"encoder/layers/.*": 5, r"head/kernel": 1},
                   alpha_pattern={r".*layers.*": 10})
    got = {p: (lp_leaf.rank, lp_leaf.alpha) for p, lp_leaf in [
        ("dense", lp["encoder"]["dense"]["kernel"]), ("layers", lp["encoder"]["layers"][0]["kernel"]),
        ("head", lp["head"]["kernel"])]}
    # 'encoder/.*' comes first, so it wins for encoder/layers too
    assert got == {"dense": (3, 4.0), "layers": (3, 10.0), "head": (1, 4.0)}
    assert lp["encoder"]["dense"]["kernel"].a.shape == (8, 3) and lp["head"]["kernel"].b.shape == (1, 4)


def test_patterns_without_alpha_keep_scale_one():
    lp = lf.lorafy(_params(), rank=2, rank_pattern={r"head/kernel": 4})
    assert lp["head"]["kernel"].scale == 1.0 and lp["encoder"]["dense"]["kernel"].scale == 1.0


def test_pattern_ranks_compute_the_dense_update():
    rng = np.random.default_rng(0)
    lp = lf.lorafy(_params(), rank=2, alpha=6, rank_pattern={r"head/kernel": 3})
    lw = lp["head"]["kernel"]
    lw = lw.replace(b=jnp.asarray(rng.standard_normal(lw.b.shape), jnp.float32))
    want = np.asarray(lw.w, np.float64) + (6 / 3) * np.asarray(lw.a, np.float64) @ np.asarray(lw.b, np.float64)
    x = jnp.asarray(rng.standard_normal((5, 16)), jnp.float32)
    np.testing.assert_allclose(lf.lora(lambda w, x: x @ w)(lw, x), np.asarray(x, np.float64) @ want,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kw, match", [
    (dict(rank_pattern={r"head/kernal": 2}), "rank_pattern key 'head/kernal' matched no adapted leaf"),
    (dict(alpha_pattern={r"kernel": 2}), "alpha_pattern key 'kernel' matched no adapted leaf.*'\\.\\*kernel'"),
    (dict(rank_pattern={r"*kernel": 2}), "not a valid regular expression"),
    (dict(rank_pattern=[("head/kernel", 2)]), "rank_pattern must be a dict"),
])
def test_pattern_keys_that_select_nothing_or_are_malformed(kw, match):
    with pytest.raises(lf.TargetError, match=match):
        lf.lorafy(_params(), rank=2, **kw)


@pytest.mark.parametrize("kw, err, match", [
    (dict(rank_pattern={r"head/kernel": 2.5}), lf.RankError, "rank_pattern\\['head/kernel'\\]"),
    (dict(rank_pattern={r"head/kernel": 9}), lf.RankError, "'head/kernel'.*from rank_pattern"),
    (dict(alpha_pattern={r"head/kernel": float("nan")}), lf.ArgumentError, "alpha_pattern\\['head/kernel'\\]"),
    (dict(alpha_pattern={r"head/kernel": None}), lf.ArgumentError, "alpha_pattern\\['head/kernel'\\]"),
])
def test_pattern_values_are_checked_like_the_arguments(kw, err, match):
    with pytest.raises(err, match=match):
        lf.lorafy(_params(), rank=2, **kw)


def test_pattern_ranks_round_trip_through_a_checkpoint(tmp_path):
    lp = lf.lorafy(_params(), rank=2, rank_pattern={r"head/kernel": 3}, alpha_pattern={r"head/kernel": 7})
    back = lf.load_adapters(lf.save_adapters(tmp_path / "ad", lp), _params())
    assert (back["head"]["kernel"].rank, back["head"]["kernel"].alpha) == (3, 7.0)
    assert back["encoder"]["dense"]["kernel"].rank == 2
