"""(e) A Flax NNX model, handled through ``nnx.split`` state as a plain pytree."""

from flax import nnx

from lorax_fn import Layout

from ._init import fill, tokens


class Tagger(nnx.Module):
    def __init__(self, vocab=50, d=16, heads=2, classes=5, *, rngs: nnx.Rngs):
        self.embed = nnx.Embed(vocab, d, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(num_heads=heads, in_features=d, decode=False, rngs=rngs)
        self.conv = nnx.Conv(d, d, kernel_size=(3,), padding="SAME", rngs=rngs)
        self.head = nnx.Linear(d, classes, rngs=rngs)

    def __call__(self, tokens):
        h = self.embed(tokens)
        h = h + self.attn(h)
        h = h + nnx.relu(self.conv(h))
        return self.head(h)


LAYOUTS = {
    "attn/query/kernel": Layout((), (0,), (1, 2)),
    "attn/out/kernel": Layout((), (0, 1), (2,)),
    "conv/kernel": Layout((), (0, 1), (2,)),
    "embed/embedding": Layout((), (0,), (1,)),
}

USES = {"embed/embedding": {"gather"}, "conv/kernel": {"conv_general_dilated"}}


def make():
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Tagger(rngs=nnx.Rngs(0))))
    state = fill(abstract)
    toks = tokens(1, (2, 7), 50)
    return (lambda s, t: nnx.merge(graphdef, s)(t)), state, (toks,)
