"""(d) The decoder's blocks stacked under ``nn.scan`` and ``nn.remat``: every
block parameter gains a leading layer axis that must stay a ``stack`` axis."""

import flax.linen as nn
import jax

from lorax_fn import Layout

from ._init import fill, tokens

from .transformer import Block


class ScanBlock(nn.Module):
    d_model: int
    heads: int

    @nn.compact
    def __call__(self, h, mask):
        return Block(self.d_model, self.heads, name="block")(h, mask), None


class ScannedDecoder(nn.Module):
    vocab: int = 64
    d_model: int = 32
    heads: int = 4
    layers: int = 3

    @nn.compact
    def __call__(self, tokens):
        embed = nn.Embed(self.vocab, self.d_model, name="embed")
        h = embed(tokens)
        mask = nn.make_causal_mask(tokens)
        stack = nn.scan(nn.remat(ScanBlock), variable_axes={"params": 0},
                        split_rngs={"params": True}, in_axes=nn.broadcast, length=self.layers)
        h, _ = stack(self.d_model, self.heads, name="layers")(h, mask)
        return embed.attend(nn.LayerNorm(name="ln_f")(h))


LAYOUTS = {
    "layers/block/mlp_in/kernel": Layout((0,), (1,), (2,)),
    "layers/block/mlp_out/kernel": Layout((0,), (1,), (2,)),
    "layers/block/attn/query/kernel": Layout((0,), (1,), (2, 3)),
    "layers/block/attn/out/kernel": Layout((0,), (1, 2), (3,)),
}

USES = {"embed/embedding": {"gather", "dot_general"}, "layers/block/mlp_in/kernel": {"dot_general"}}


def make():
    model = ScannedDecoder()
    toks = tokens(1, (2, 8), model.vocab)
    abstract = jax.eval_shape(model.init, jax.random.key(0), toks)["params"]
    params = fill(abstract, n_stack=lambda path: int(path.startswith("layers/")))
    return (lambda p, t: model.apply({"params": p}, t)), params, (toks,)
