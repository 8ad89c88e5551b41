"""`LoraWeight` outside `lf.lora`: a clear LoraError where it is used as an array, and
nothing changed for what handles it as a pytree node."""

import copy
import pickle

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorax_fn as lf


def _dense():
    model = nn.Dense(3)
    x = jnp.ones((2, 4))
    params = model.init(jax.random.key(0), x)["params"]
    return model, params, x


def _lw():
    return lf.lorafy({"w": jnp.ones((4, 3))}, rank=2, key=jax.random.key(1))["w"]


UNWRAPPED = {
    "flax model.apply": lambda: (lambda m, p, x: m.apply({"params": lf.lorafy(p, rank=2)}, x))(*_dense()),
    "jnp.asarray": lambda: jnp.asarray(_lw()),
    "jnp.array": lambda: jnp.array(_lw()),
    "np.asarray": lambda: np.asarray(_lw()),
    "jax array @ lw": lambda: jnp.ones((2, 4)) @ _lw(),
    "lw @ jax array": lambda: _lw() @ jnp.ones((3, 2)),
    "numpy array @ lw": lambda: np.ones((2, 4), np.float32) @ _lw(),
    "jnp.dot": lambda: jnp.dot(jnp.ones((2, 4)), _lw()),
    "jax array + lw": lambda: jnp.ones((4, 3)) + _lw(),
    "inside jax.jit": lambda: jax.jit(lambda p, x: x @ p["w"])({"w": _lw()}, jnp.ones((2, 4))),
}


@pytest.mark.parametrize("use", UNWRAPPED, ids=list(UNWRAPPED))
def test_lora_weight_in_unwrapped_code_raises_a_lora_error_that_names_the_fix(use):
    with pytest.raises(lf.ArgumentError) as info:
        UNWRAPPED[use]()
    msg = str(info.value)
    assert "LoraWeight (shape (4, 3), rank 2)" in msg
    assert "`lf.lora`" in msg and "`lf.merge`" in msg
    # code that caught today's TypeError keeps working
    assert isinstance(info.value, TypeError) and isinstance(info.value, lf.LoraError)


def test_the_wrapped_and_the_merged_model_still_run():
    model, params, x = _dense()
    lp = lf.lorafy(params, rank=2, key=jax.random.key(1))
    lp = jax.tree.map(lambda t: t + 0.25, lp)   # a nonzero update, so merge has work to do
    want = np.asarray(model.apply({"params": lf.merge(lp)}, x))
    got = lf.lora(model.apply, on_materialize="raise")({"params": lp}, x)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    # the same by hand: x @ (w + scale · a @ b) + bias
    k = lp["kernel"]
    ref = np.asarray(x) @ (np.asarray(k.w) + k.scale * np.asarray(k.a) @ np.asarray(k.b)) + np.asarray(lp["bias"])
    np.testing.assert_allclose(want, ref, rtol=1e-6, atol=1e-6)


def test_what_handles_a_lora_weight_as_a_node_is_unchanged():
    lw = _lw()
    assert jnp.shape(lw) == np.shape(lw) == (4, 3) and np.ndim(lw) == 2 and np.size(lw) == 12
    assert repr(lw).startswith("LoraWeight(shape=(4, 3), dtype=float32, rank=2")
    shapes = jax.eval_shape(lambda t: t, {"w": lw})["w"]
    assert (shapes.w.shape, shapes.a.shape, shapes.b.shape) == ((4, 3), (4, 2), (2, 3))
    assert jax.eval_shape(lf.merge, {"w": lw})["w"].shape == (4, 3)
    doubled = jax.tree.map(lambda t: 2 * t, lw)
    np.testing.assert_array_equal(doubled.a, 2 * np.asarray(lw.a))
    assert [x.shape for x in jax.tree.leaves(jax.device_get(lw))] == [(4, 3), (4, 2), (2, 3)]
    for clone in (copy.deepcopy(lw), pickle.loads(pickle.dumps(lw))):
        assert (clone.rank, clone.layout) == (lw.rank, lw.layout)
        np.testing.assert_array_equal(clone.a, lw.a)
    np.testing.assert_array_equal(jax.jit(lf.merge)({"w": lw})["w"], lf.merge({"w": lw})["w"])
