"""(a) Linen MLP: the plain Dense case every other model builds on."""

import flax.linen as nn
import jax

from lorax_fn import Layout

from ._init import fill, normal


class MLP(nn.Module):
    hidden: int = 32
    out: int = 8

    @nn.compact
    def __call__(self, x):
        x = nn.gelu(nn.Dense(self.hidden, name="fc1")(x))
        x = nn.gelu(nn.Dense(self.hidden, name="fc2")(x))
        return nn.Dense(self.out, name="head")(x)


LAYOUTS = {
    "fc1/kernel": Layout((), (0,), (1,)),
    "head/kernel": Layout((), (0,), (1,)),
}


def make():
    model = MLP()
    x = normal(1, (4, 16))
    params = fill(jax.eval_shape(model.init, jax.random.key(0), x)["params"])
    return (lambda p, x: model.apply({"params": p}, x)), params, (x,)
