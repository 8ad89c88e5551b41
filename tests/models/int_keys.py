"""(i) A params dict keyed by integers, as hand-written layer lists often are."""

import jax.numpy as jnp

from lorax_fn import Layout

from ._init import normal

SIZES = (8, 16, 16, 4)


def apply(p, x):
    layers = p["layers"]
    for i in sorted(layers):
        x = x @ layers[i]["w"] + layers[i]["b"]
        if i < len(layers) - 1:
            x = jnp.tanh(x)
    return x


LAYOUTS = {
    "layers/0/w": Layout((), (0,), (1,)),
    "layers/2/w": Layout((), (0,), (1,)),
}


def make():
    layers = {
        i: {"w": normal(i, (m, n), m ** -0.5), "b": normal(10 + i, (n,), 0.1)}
        for i, (m, n) in enumerate(zip(SIZES[:-1], SIZES[1:]))
    }
    x = normal(99, (5, SIZES[0]))
    return apply, {"layers": layers}, (x,)
