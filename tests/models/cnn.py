"""(b) Linen CNN: a strided 3x3 convolution, a 1x1 one and a Dense head."""

import flax.linen as nn
import jax

from lorax_fn import Layout

from ._init import fill, normal


class CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3), strides=(2, 2), padding="SAME", name="conv1")(x))
        x = nn.relu(nn.Conv(12, (3, 3), padding="VALID", name="conv2")(x))
        x = x.reshape(x.shape[0], -1)
        return nn.Dense(10, name="head")(x)


LAYOUTS = {
    # HWIO: the spatial taps and input channels are all contracted
    "conv1/kernel": Layout((), (0, 1, 2), (3,)),
    "conv2/kernel": Layout((), (0, 1, 2), (3,)),
}

USES = {"conv1/kernel": {"conv_general_dilated"}, "conv2/kernel": {"conv_general_dilated"}}


def make():
    model = CNN()
    x = normal(1, (2, 10, 10, 3))
    params = fill(jax.eval_shape(model.init, jax.random.key(0), x)["params"])
    return (lambda p, x: model.apply({"params": p}, x)), params, (x,)
