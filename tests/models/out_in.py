"""(g) Kernels stored torch-style as (out, in) and applied as ``x @ w.T``."""

import jax

from lorax_fn import Layout

from ._init import normal


def apply(p, x):
    h = jax.nn.relu(x @ p["fc1"]["weight"].T + p["fc1"]["bias"])
    return h @ p["fc2"]["weight"].T + p["fc2"]["bias"]


LAYOUTS = {
    "fc1/weight": Layout((), (1,), (0,)),
    "fc2/weight": Layout((), (1,), (0,)),
}


def make():
    d_in, d_hid, d_out = 10, 24, 6
    params = {
        "fc1": {"weight": normal(1, (d_hid, d_in), d_in ** -0.5),
                "bias": normal(4, (d_hid,), 0.1)},
        "fc2": {"weight": normal(2, (d_out, d_hid), d_hid ** -0.5),
                "bias": normal(5, (d_out,), 0.1)},
    }
    x = normal(3, (3, d_in))
    return apply, params, (x,)
