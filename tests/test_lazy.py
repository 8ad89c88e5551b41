"""Lazy LoRA values: structural operations keep ``materialize`` equal to the dense op."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings, strategies as st
from jaxprs import walk

import lorax_fn as lf
from lorax_fn.kinds.lora import rank_major_grad
from lorax_fn import lazy as lz


def _lazy(seed, shape, layout, rank=2):
    rng = np.random.default_rng(seed)
    lay = lf.Layout(*layout)
    a_shape = tuple(shape[k] for k in lay.stack + lay.inputs) + (rank,)
    b_shape = tuple(shape[k] for k in lay.stack) + (rank,) + tuple(shape[k] for k in lay.outputs)
    lw = lf.LoraWeight(jnp.asarray(rng.standard_normal(shape), jnp.float32),
                       jnp.asarray(rng.standard_normal(a_shape), jnp.float32),
                       jnp.asarray(rng.standard_normal(b_shape), jnp.float32),
                       rank=rank, alpha=3.0, layout=lay)
    return lz.from_weight(lw, "w"), lf.merge(lw)


@st.composite
def chains(draw):
    nd = draw(st.integers(2, 4))
    shape = tuple(draw(st.lists(st.sampled_from([1, 2, 3, 4, 6]), min_size=nd, max_size=nd)))
    perm = draw(st.permutations(range(nd)))
    ns = draw(st.integers(0, nd - 2))
    ni = draw(st.integers(1, nd - ns - 1))
    layout = (tuple(perm[:ns]), tuple(perm[ns:ns + ni]), tuple(perm[ns + ni:]))
    ops = draw(st.lists(st.tuples(st.sampled_from(["transpose", "split", "merge", "expand", "squeeze"]),
                                  st.integers(0, 10**6)), max_size=5))
    return shape, layout, ops, draw(st.integers(0, 1000))


def _apply(op, seed, shape):
    """A new shape or permutation for one random structural op, or None if it does not apply."""
    rng = np.random.default_rng(seed)
    nd = len(shape)
    if op == "transpose":
        return "t", tuple(rng.permutation(nd))
    if op == "split":
        cands = [k for k, n in enumerate(shape) if n in (4, 6)]
        if not cands:
            return None
        k = cands[rng.integers(len(cands))]
        return "r", shape[:k] + (2, shape[k] // 2) + shape[k + 1:]
    if op == "merge" and nd >= 2:
        k = int(rng.integers(nd - 1))
        return "r", shape[:k] + (shape[k] * shape[k + 1],) + shape[k + 2:]
    if op == "expand":
        k = int(rng.integers(nd + 1))
        return "r", shape[:k] + (1,) + shape[k:]
    if op == "squeeze" and 1 in shape:
        k = shape.index(1)
        return "r", shape[:k] + shape[k + 1:]
    return None


@settings(max_examples=80, deadline=None)
@given(chains())
def test_structural_chains_commute_with_materialize(case):
    shape, layout, ops, seed = case
    z, dense = _lazy(seed, shape, layout)
    for op, s in ops:
        step = _apply(op, s, tuple(z.shape))
        if step is None:
            continue
        kind, arg = step
        if kind == "t":
            z, dense = lz.transpose(z, arg), jnp.transpose(dense, arg)
        else:
            nz = lz.reshape(z, arg)
            if nz is None:  # a run that mixes roles: the rule declines, which is allowed
                continue
            z, dense = nz, dense.reshape(arg)
        assert z.shape == dense.shape
        # the factors always describe the value: stack+in on a, stack+out on b
        m = z.meta
        assert z.a.ndim == m.ns + m.ni + 1 and z.b.ndim == m.ns + m.no + 1
    np.testing.assert_allclose(lz.materialize(z), dense, rtol=1e-5, atol=1e-5)


def test_reshape_declines_runs_that_mix_roles():
    z, _ = _lazy(0, (4, 6), ((), (0,), (1,)))
    assert lz.reshape(z, (24,)) is None
    assert lz.reshape(z, (2, 2, 6)) is not None


def test_stack_slices_and_unstacking():
    z, dense = _lazy(1, (3, 4, 5), ((1,), (0,), (2,)))  # stack axis in the middle
    s = lz.slice_stack(z, (0, 1, 0), (3, 3, 5), (1, 1, 1))
    np.testing.assert_allclose(lz.materialize(s), dense[:, 1:3], rtol=1e-5, atol=1e-5)
    assert lz.slice_stack(z, (1, 0, 0), (3, 4, 5), None) is None  # slices an 'in' axis
    d = lz.dynamic_slice_stack(z, (jnp.int32(0), jnp.int32(2), jnp.int32(0)), (3, 1, 5))
    np.testing.assert_allclose(lz.materialize(d), dense[:, 2:3], rtol=1e-5, atol=1e-5)
    t = lz.transpose(z, (1, 0, 2))
    children, meta = lz.unstack_leading(t)
    for i in range(4):
        one = lz.Lazy.tree_unflatten(meta, jax.tree.map(lambda c: c[i], children))
        np.testing.assert_allclose(lz.materialize(one), dense[:, i], rtol=1e-5, atol=1e-5)
    assert lz.unstack_leading(z) is None  # axis 0 is an 'in' axis


def _primitives(jaxpr) -> set[str]:
    return {eqn.primitive.name for eqn, _ in walk(jaxpr)}


def test_rank_major_grad_is_identity_with_a_pinned_derivative():
    a = jax.random.normal(jax.random.key(0), (2, 5, 3))  # stack 2, in 5, rank 3
    x = jax.random.normal(jax.random.key(1), (2, 4, 5))
    f = lambda a: jnp.sum(jnp.einsum("sti,sir->str", x, rank_major_grad(a, 1)) ** 2)  # noqa: E731
    ref = lambda a: jnp.sum(jnp.einsum("sti,sir->str", x, a) ** 2)  # noqa: E731
    chex.assert_trees_all_close(f(a), ref(a))
    chex.assert_trees_all_close(jax.grad(f)(a), jax.grad(ref)(a), rtol=1e-6)
    # not differentiated: nothing to compile; differentiated: the barrier pins the layout
    assert "optimization_barrier" not in _primitives(jax.make_jaxpr(f)(a).jaxpr)
    assert "optimization_barrier" in _primitives(jax.make_jaxpr(jax.grad(f))(a).jaxpr)
