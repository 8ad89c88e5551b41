"""(h) A dense-gated mixture of experts: kernels stacked (experts, in, out) and
applied per expert through einsums in which the expert axis is a batch axis."""

import jax
import jax.numpy as jnp

from lorax_fn import Layout

from ._init import normal

EXPERTS, D, HIDDEN = 4, 12, 20


def apply(p, x):
    gates = jax.nn.softmax(x @ p["router"], axis=-1)            # (b, e)
    xe = jnp.einsum("be,bd->ebd", gates, x)                     # dispatch
    h = jax.nn.gelu(jnp.einsum("ebd,edh->ebh", xe, p["w_in"]))
    y = jnp.einsum("ebh,ehd->ebd", h, p["w_out"])
    return jnp.einsum("ebd->bd", y)                             # combine


LAYOUTS = {
    "w_in": Layout((0,), (1,), (2,)),
    "w_out": Layout((0,), (1,), (2,)),
    "router": Layout((), (0,), (1,)),
}


def make():
    params = {
        "router": normal(1, (D, EXPERTS), D ** -0.5),
        "w_in": normal(2, (EXPERTS, D, HIDDEN), D ** -0.5),
        "w_out": normal(3, (EXPERTS, HIDDEN, D), HIDDEN ** -0.5),
    }
    x = normal(4, (6, D))
    return apply, params, (x,)
