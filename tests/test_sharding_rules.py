"""Adapter shardings derived from the base weight's (on one device here; 8 devices in test_checkpoint)."""

import jax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P, SingleDeviceSharding

import lorax_fn as lf
from lorax_fn.sharding_rules import adapter_shardings, leaf_sharding

MESH = jax.make_mesh((1, 1, 1), ("data", "model", "layers"))


@pytest.mark.parametrize("spec, layout, ndim, want_a, want_b", [
    # Dense (in, out)
    (P("data", "model"), lf.Layout((), (0,), (1,)), 2, P("data", None), P(None, "model")),
    # a spec shorter than the weight: missing axes are replicated
    (P("data"), lf.Layout((), (0,), (1,)), 2, P("data", None), P(None, None)),
    # q/k/v (embed, heads, head_dim)
    (P("data", "model", None), lf.Layout((), (0,), (1, 2)), 3, P("data", None), P(None, "model", None)),
    # out projection (heads, head_dim, embed)
    (P("model", None, "data"), lf.Layout((), (0, 1), (2,)), 3, P("model", None, None), P(None, "data")),
    # scanned (layers, in, out): the stack axis keeps its spec on both factors
    (P("layers", "data", "model"), lf.Layout((0,), (1,), (2,)), 3, P("layers", "data", None),
     P("layers", None, "model")),
    # stored (out, in) and used as x @ w.T: the layout, not the position, decides
    (P("model", "data"), lf.Layout((), (1,), (0,)), 2, P("data", None), P(None, "model")),
])
def test_adapters_inherit_the_base_spec(spec, layout, ndim, want_a, want_b):
    got = adapter_shardings(NamedSharding(MESH, spec), layout, ndim)
    assert got["a"].spec == want_a and got["b"].spec == want_b
    assert got["a"].mesh == MESH and got["b"].mesh == MESH


def test_single_device_and_host_arrays():
    dev = SingleDeviceSharding(jax.devices()[0])
    assert adapter_shardings(dev, lf.Layout((), (0,), (1,)), 2) == {"a": dev, "b": dev}
    assert leaf_sharding(jax.numpy.ones(3)) == dev
    assert leaf_sharding([1.0, 2.0]) == dev  # no sharding of its own: the default device
