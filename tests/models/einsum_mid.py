"""(f) A plain function whose projection kernel is stored (heads, embed, head_dim):
the contracted axis sits in the middle, so the default rule would be wrong."""

import jax.numpy as jnp

from lorax_fn import Layout

from ._init import normal

HEADS, EMBED, HEAD_DIM = 3, 12, 4


def apply(p, x):
    q = jnp.einsum("bte,hed->bthd", x, p["proj"])
    q = jnp.tanh(q)
    return jnp.einsum("bthd,hdf->btf", q, p["out"])


LAYOUTS = {
    "proj": Layout((), (1,), (0, 2)),
    "out": Layout((), (0, 1), (2,)),
}


def make():
    params = {
        "proj": normal(1, (HEADS, EMBED, HEAD_DIM), EMBED ** -0.5),
        "out": normal(2, (HEADS, HEAD_DIM, EMBED), (HEADS * HEAD_DIM) ** -0.5),
    }
    x = normal(3, (2, 5, EMBED))
    return apply, params, (x,)
