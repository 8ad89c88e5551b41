"""(c) Linen decoder: pre-LN blocks around ``nn.MultiHeadDotProductAttention``
and an MLP, with an ``nn.Embed`` whose table also produces the logits
(``embed.attend``, i.e. ``h @ E.T``: the table is contracted over its *out* axis).
"""

import flax.linen as nn
import jax

from lorax_fn import Layout

from ._init import fill, tokens


class Block(nn.Module):
    d_model: int
    heads: int
    mlp_ratio: int = 4

    @nn.compact
    def __call__(self, h, mask):
        y = nn.LayerNorm(name="ln1")(h)
        y = nn.MultiHeadDotProductAttention(num_heads=self.heads, name="attn")(y, y, mask=mask)
        h = h + y
        y = nn.LayerNorm(name="ln2")(h)
        y = nn.gelu(nn.Dense(self.mlp_ratio * self.d_model, name="mlp_in")(y))
        return h + nn.Dense(self.d_model, name="mlp_out")(y)


class Decoder(nn.Module):
    vocab: int = 64
    d_model: int = 32
    heads: int = 4
    layers: int = 1

    @nn.compact
    def __call__(self, tokens):
        embed = nn.Embed(self.vocab, self.d_model, name="embed")
        h = embed(tokens)
        mask = nn.make_causal_mask(tokens)
        for i in range(self.layers):
            h = Block(self.d_model, self.heads, name=f"block{i}")(h, mask)
        return embed.attend(nn.LayerNorm(name="ln_f")(h))


LAYOUTS = {
    # DenseGeneral q/k/v: (embed, heads, head_dim), only embed is contracted
    "block0/attn/query/kernel": Layout((), (0,), (1, 2)),
    "block0/attn/key/kernel": Layout((), (0,), (1, 2)),
    "block0/attn/value/kernel": Layout((), (0,), (1, 2)),
    # out projection: (heads, head_dim, embed)
    "block0/attn/out/kernel": Layout((), (0, 1), (2,)),
    # looked up by rows and used transposed for the logits: rows are `in`
    "embed/embedding": Layout((), (0,), (1,)),
}

# the tied table is consumed twice: a row lookup and the transposed logits matmul
USES = {"embed/embedding": {"gather", "dot_general"}}


def make(vocab=64, d_model=32, heads=4, layers=1, batch=2, seq=8, key=0):
    model = Decoder(vocab=vocab, d_model=d_model, heads=heads, layers=layers)
    toks = tokens(key + 1, (batch, seq), vocab)
    params = fill(jax.eval_shape(model.init, jax.random.key(0), toks)["params"], seed=key)
    return (lambda p, t: model.apply({"params": p}, t)), params, (toks,)
