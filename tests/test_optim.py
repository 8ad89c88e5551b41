"""Adapter-only training: the frozen side never moves and holds no optimizer state."""

import warnings

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lorax_fn as lf


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(32)(x))
        return nn.Dense(3)(x)


def _task():
    kx, kp, kt = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (64, 8))
    # the target is a different random network: the base model is wrong and must adapt
    y = MLP().apply(MLP().init(kt, x), x)
    params = MLP().init(kp, x)["params"]
    return params, x, y


def _train_mask_style(lp, x, y, steps=20, trainable=None):
    apply = lf.lora(lambda p, x: MLP().apply({"params": p}, x), on_materialize="raise")
    tx = lf.optimizer(optax.adam(3e-2), lp, trainable=trainable)
    state = tx.init(lp)

    @jax.jit
    def step(lp, state):
        loss, g = jax.value_and_grad(lambda p: jnp.mean((apply(p, x) - y) ** 2))(lp)
        updates, state = tx.update(g, state, lp)
        return optax.apply_updates(lp, updates), state, loss

    losses = []
    for _ in range(steps):
        lp, state, loss = step(lp, state)
        losses.append(float(loss))
    return lp, state, losses


def test_training_moves_only_adapters():
    params, x, y = _task()
    lp = lf.lorafy(params, rank=2, key=jax.random.key(1))
    out, state, losses = _train_mask_style(lp, x, y)
    assert losses[-1] < 0.7 * losses[0], losses
    # frozen: every base weight and every non-LoRA leaf, bit for bit
    chex.assert_trees_all_equal(lf.base(out), params)
    moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), lf.adapters(out), lf.adapters(lp))
    assert all(jax.tree.leaves(moved))
    # the optimizer state holds arrays for a and b only (Adam: mu and nu) plus step counts
    n_adapter = len(jax.tree.leaves(lf.adapters(lp)))
    state_arrays = [s for s in jax.tree.leaves(state) if getattr(s, "ndim", 0) > 0]
    assert len(state_arrays) == 2 * n_adapter
    want = {s.shape for s in jax.tree.leaves(lf.adapters(lp))}
    assert {s.shape for s in state_arrays} == want


def test_extra_trainable_leaves():
    params, x, y = _task()
    lp = lf.lorafy(params, rank=2)
    out, _, _ = _train_mask_style(lp, x, y, steps=3, trainable=".*bias")
    assert not np.array_equal(out["Dense_0"]["bias"], params["Dense_0"]["bias"])
    chex.assert_trees_all_equal(out["Dense_0"]["kernel"].w, params["Dense_0"]["kernel"])


def test_split_combine_style_gives_the_same_adapters():
    params, x, y = _task()
    lp = lf.lorafy(params, rank=2, key=jax.random.key(1))
    ref, _, _ = _train_mask_style(lp, x, y)
    apply = lf.lora(lambda p, x: MLP().apply({"params": p}, x), on_materialize="raise")
    train, frozen = lf.split(lp)
    tx = optax.adam(3e-2)
    state = tx.init(train)

    @jax.jit
    def step(train, state):
        g = jax.grad(lambda t: jnp.mean((apply(lf.combine(t, frozen), x) - y) ** 2))(train)
        updates, state = tx.update(g, state, train)
        return optax.apply_updates(train, updates), state

    for _ in range(20):
        train, state = step(train, state)
    chex.assert_trees_all_close(lf.adapters(lf.combine(train, frozen)), lf.adapters(ref),
                                rtol=1e-5, atol=1e-6)


def test_trainable_mask_and_split_shapes():
    params, _, _ = _task()
    lp = lf.lorafy(params, rank=2)
    mask = lf.trainable_mask(lp)
    assert jax.tree.structure(mask) == jax.tree.structure(lp)
    n_true = sum(jax.tree.leaves(mask))
    assert n_true == 4  # a and b of two kernels
    train, frozen = lf.split(lp)
    assert len(jax.tree.leaves(train)) == 4 and len(jax.tree.leaves(frozen)) == 4
    chex.assert_trees_all_equal(lf.combine(train, frozen), lp)


def test_optimizer_refuses_another_structure():
    params, _, _ = _task()
    tx = lf.optimizer(optax.sgd(0.1), lf.lorafy(params, rank=2))
    with pytest.raises(lf.StructureError):
        tx.init(params)


def test_frozen_negative_zeros_survive_updates():
    w = jnp.ones((4, 3)).at[0, 0].set(-0.0)
    lp = lf.lorafy({"w": w, "bias": jnp.array([-0.0, 0.0, 1.0])}, rank=2)
    tx = lf.optimizer(optax.adamw(0.1, weight_decay=0.1), lp)
    state = tx.init(lp)
    for _ in range(3):
        updates, state = tx.update(jax.tree.map(jnp.ones_like, lp), state, lp)
        lp = optax.apply_updates(lp, updates)
    assert np.signbit(lp["w"].w[0, 0]) and np.signbit(lp["bias"][0])
    chex.assert_trees_all_equal(lf.base(lp)["bias"], jnp.array([-0.0, 0.0, 1.0]))


# ----------------------------------------------------------------- nothing to train
def test_optimizer_warns_when_nothing_trains_and_names_the_fix():
    params, _, _ = _task()
    assert issubclass(lf.NoAdapterWarning, UserWarning)
    with pytest.warns(lf.NoAdapterWarning) as caught:
        lf.optimizer(optax.adam(1e-2), params)   # the original params, not the lorafied tree
    msg = str(caught[0].message)
    assert "no LoraWeight" in msg and "lorafy found nothing to adapt" in msg
    assert "lf.optimizer(tx, lp)" in msg and "trainable=" in msg
    assert caught[0].filename == __file__       # points at the caller's line
    with pytest.warns(lf.NoAdapterWarning, match="`trainable` matched no leaf"):
        lf.optimizer(optax.adam(1e-2), params, trainable="no/such/leaf")


@pytest.mark.parametrize("trainable", [None, ".*bias"])
def test_optimizer_does_not_warn_when_something_trains(trainable):
    params, _, _ = _task()
    tree = lf.lorafy(params, rank=2) if trainable is None else params
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lf.optimizer(optax.adam(1e-2), tree, trainable=trainable)


# ----------------------------------------------------------------- structure errors
def _mismatches(lp, params):
    return {
        "the original params": (params, "'Dense_0/kernel'", "a LoraWeight (rank 2)", "an array leaf"),
        "the variables dict": ({"params": lp}, "'params'", "nothing", "a dict"),
        "another rank": (lf.lorafy(params, rank=3), "'Dense_0/kernel'", "a LoraWeight (rank 2, alpha 2",
                         "a LoraWeight (rank 3, alpha 3"),
        "the trainable half of split": (lf.split(lp)[0], "'Dense_0/bias'", "an array leaf", "None"),
        "a missing leaf": ({"Dense_0": lp["Dense_0"]}, "'Dense_1'", "a dict", "nothing"),
    }


MISMATCHES = ["the original params", "the variables dict", "another rank", "the trainable half of split",
              "a missing leaf"]


@pytest.mark.parametrize("case", MISMATCHES)
def test_structure_error_names_the_first_differing_path_and_the_fix(case):
    params, _, _ = _task()
    lp = lf.lorafy(params, rank=2)
    given, path, want, got = _mismatches(lp, params)[case]
    tx = lf.optimizer(optax.sgd(0.1), lp)
    for call in (lambda: tx.init(given), lambda: tx.update(given, tx.init(lp), lp)):
        with pytest.raises(lf.StructureError) as info:
            call()
        msg = str(info.value)
        assert f"at {path} the optimizer's tree has {want}" in msg and got in msg, msg
        assert "lf.optimizer(tx, lp)" in msg
        assert "PyTreeDef" not in msg and len(msg) < 500


# ----------------------------------------------------------------- wrappers go inside
def _bits(tree):
    return [np.asarray(x).view(np.uint32) for x in jax.tree.leaves(tree)]


def test_multisteps_inside_keeps_frozen_negative_zeros_and_accumulates_like_plain_optax():
    k = 3
    w = jnp.arange(12.0).reshape(4, 3).at[0, 0].set(-0.0)
    params = {"w": w, "bias": jnp.array([-0.0, 0.0, 1.0])}
    lp = lf.lorafy(params, rank=2, key=jax.random.key(1))
    tx = lf.optimizer(optax.MultiSteps(optax.adam(0.1), every_k_schedule=k), lp)
    # reference: the same MultiSteps on the adapters alone, no lorax_fn wrapper
    ref_tx = optax.MultiSteps(optax.adam(0.1), every_k_schedule=k)
    ref = lf.split(lp)[0]
    state, ref_state = tx.init(lp), ref_tx.init(ref)
    update, ref_update = jax.jit(tx.update), jax.jit(ref_tx.update)
    for i in range(2 * k + 1):
        grads = jax.tree.map(lambda x: jnp.full_like(x, 0.5 + i), lp)
        updates, state = update(grads, state, lp)
        lp = optax.apply_updates(lp, updates)
        ref_updates, ref_state = ref_update(lf.split(grads)[0], ref_state, ref)
        ref = optax.apply_updates(ref, ref_updates)
        # bit for bit, -0.0 included (== would call -0.0 and 0.0 equal)
        for got, want in zip(_bits(lf.base(lp)), _bits(params)):
            np.testing.assert_array_equal(got, want)
        for got, want in zip(_bits(lf.split(lp)[0]), _bits(ref)):
            np.testing.assert_array_equal(got, want)
    assert np.signbit(lp["w"].w[0, 0]) and np.signbit(lp["bias"][0])
    assert not np.array_equal(lp["w"].b, np.zeros((2, 3)))   # the adapters did move


def test_trainable_that_matches_nothing_warns_while_the_adapters_still_train():
    lp = lf.lorafy({"dense": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}}, rank=2)
    with pytest.warns(UserWarning, match="trainable='bias' matched no leaf.*'dense/bias'"):
        tx = lf.optimizer(optax.sgd(0.1), lp, trainable="bias")  # not a full match of 'dense/bias'
    assert tx.init(lp) is not None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lf.optimizer(optax.sgd(0.1), lp, trainable=".*bias")
