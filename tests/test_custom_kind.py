"""A kind defined here, outside the package: an IA3-style per-output scaling ``W' = W ⊙ v``.

It goes end to end through ``lorafy``/``lora``/``merge``/``optimizer``/
``save_adapters``/``load_adapters``/``explain`` without touching lorax_fn:
the extension point is the ``lf.Adapter`` subclass and one ``register_kind``.
"""

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lorax_fn as lf
from lorax_fn import lazy as lz


class IA3Weight(lf.Adapter):
    kind = "ia3_test"
    children = ("w", "v")
    trainable = ("v",)
    static = ("layout",)
    axes = {"v": "so"}  # one scale per stack slice and output unit
    primitives = frozenset({"dot_general"})

    @classmethod
    def create(cls, w, layout, key, *, rank, alpha, dtype, init, config, path):
        v = jnp.ones(tuple(w.shape[k] for k in layout.stack + layout.outputs), dtype)
        return cls(w, v=v, layout=layout)

    @classmethod
    def child_shapes(cls, shape, config):
        lay = config["layout"]
        return {"v": tuple(shape[k] for k in lay.stack + lay.outputs)}

    @classmethod
    def dense(cls, z):
        m = z.meta
        wc = lz.canonical(z, z.w)
        v = jnp.expand_dims(z.v, tuple(range(m.ns, m.ns + m.ni)))
        return lz.to_value(z, wc * v.astype(wc.dtype))

    @classmethod
    def dot_general(cls, ctx, d):
        s_l, _, o_l = d.canon()
        if not d.forward_batched():
            return None
        y = d.dense(d.x, d.z.w)
        return jnp.einsum(f"{d.out},{s_l}{o_l}->{d.out}", y, d.z.v.astype(y.dtype)), None


@dataclasses.dataclass(frozen=True)
class IA3:
    adapter: ClassVar[type] = IA3Weight


lf.register_kind("ia3_test", IA3)


def _model():
    rng = np.random.default_rng(0)
    params = {"l1": {"kernel": jnp.asarray(rng.standard_normal((6, 3, 4)), jnp.float32)},
              "l2": {"kernel": jnp.asarray(rng.standard_normal((12, 5)), jnp.float32), "bias": jnp.zeros(5)}}

    def apply(p, x):
        h = jnp.tanh(jnp.einsum("bi,ihd->bhd", x, p["l1"]["kernel"]).reshape(x.shape[0], 12))
        return h @ p["l2"]["kernel"] + p["l2"]["bias"]

    return params, apply, jnp.asarray(rng.standard_normal((8, 6)), jnp.float32)


def test_a_kind_defined_outside_the_package_works_end_to_end(tmp_path):
    params, apply, x = _model()
    lp = lf.lorafy(params, variant="ia3_test", fn=lambda p: apply(p, x))
    assert isinstance(lp["l1"]["kernel"], IA3Weight) and lp["l1"]["kernel"].v.shape == (3, 4)
    np.testing.assert_array_equal(lf.merge(lp)["l2"]["kernel"], params["l2"]["kernel"])  # v = 1 at init

    y = jnp.asarray(np.random.default_rng(1).standard_normal((8, 5)), jnp.float32)
    loss = lambda q: jnp.mean((lf.lora(apply)(q, x) - y) ** 2)  # noqa: E731
    tx = lf.optimizer(optax.adam(0.05), lp)
    state = tx.init(lp)
    first = float(loss(lp))
    for _ in range(20):
        updates, state = tx.update(jax.grad(loss)(lp), state, lp)
        lp = optax.apply_updates(lp, updates)
    assert float(loss(lp)) < first
    np.testing.assert_array_equal(lp["l1"]["kernel"].w, params["l1"]["kernel"])  # the base stayed frozen
    assert not np.allclose(lp["l1"]["kernel"].v, 1)

    # unmerged equals merged, and equals the NumPy model W ⊙ v
    v1, v2 = np.asarray(lp["l1"]["kernel"].v), np.asarray(lp["l2"]["kernel"].v)
    h = np.tanh(np.einsum("bi,ihd->bhd", np.asarray(x), np.asarray(params["l1"]["kernel"]) * v1).reshape(8, 12))
    want = h @ (np.asarray(params["l2"]["kernel"]) * v2)
    np.testing.assert_allclose(lf.lora(apply)(lp, x), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(apply(lf.merge(lp), x), want, rtol=1e-5, atol=1e-5)
    assert not lf.explain(apply, lp, x).materialized

    lf.save_adapters(tmp_path / "ia3", lp)
    cfg = lf.read_adapter_config(tmp_path / "ia3")
    assert [sorted(e["arrays"]) for e in cfg["adapters"]] == [["v"], ["v"]]
    back = lf.load_adapters(tmp_path / "ia3", params)
    np.testing.assert_array_equal(lf.lora(apply)(back, x), lf.lora(apply)(lp, x))
