"""The benchmark model: a decoder-only transformer LM written with Flax Linen.

Self-contained (it does not import lorax_fn) so that the jax-lorax baseline can
run it in its own environment with an older JAX. Every projection is a
``Proj`` so that the hand-written LoRA reference (``rank > 0``) lives in the
same model: ``x@W + scale·(x@A)@B`` with ``A``/``B`` as extra parameters.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

# the kernels every LoRA configuration adapts: attention q/k/v/out and both MLP kernels
TARGETS = r".*/(q|k|v|o|mlp_in|mlp_out)/kernel"


@dataclasses.dataclass(frozen=True)
class Shape:
    layers: int = 4
    d_model: int = 512
    heads: int = 8
    mlp: int = 2048
    vocab: int = 8192
    seq: int = 128
    batch: int = 8


class Proj(nn.Module):
    """``x @ kernel + bias``, plus ``scale·(x@lora_a)@lora_b`` when ``rank > 0``."""

    features: int
    rank: int = 0
    scale: float = 1.0
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        w = self.param("kernel", nn.initializers.lecun_normal(), (d, self.features), self.dtype)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), self.dtype)
        y = x @ w + bias
        if self.rank:
            a = self.param("lora_a", nn.initializers.he_uniform(), (d, self.rank), self.dtype)
            b = self.param("lora_b", nn.initializers.zeros, (self.rank, self.features), self.dtype)
            y = y + ((x @ a) * jnp.asarray(self.scale, x.dtype)) @ b
        return y


class Block(nn.Module):
    shape: Shape
    rank: int = 0
    scale: float = 1.0
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, h):
        s = self.shape
        proj = lambda n, name: Proj(n, self.rank, self.scale, self.dtype, name=name)
        bsz, t, d = h.shape
        y = nn.LayerNorm(dtype=self.dtype, param_dtype=self.dtype, name="ln1")(h)
        heads = lambda z: z.reshape(bsz, t, s.heads, d // s.heads)
        q, k, v = (heads(proj(d, n)(y)) for n in ("q", "k", "v"))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(jnp.asarray(d // s.heads, q.dtype))
        causal = jnp.tril(jnp.ones((t, t), bool))
        logits = jnp.where(causal, logits, jnp.finfo(logits.dtype).min)
        att = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
        y = jnp.einsum("bhqk,bkhd->bqhd", att, v).reshape(bsz, t, d)
        h = h + proj(d, "o")(y)
        y = nn.LayerNorm(dtype=self.dtype, param_dtype=self.dtype, name="ln2")(h)
        y = proj(d, "mlp_out")(nn.gelu(proj(s.mlp, "mlp_in")(y)))
        return h + y


class LM(nn.Module):
    shape: Shape
    rank: int = 0
    scale: float = 1.0
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens):
        s = self.shape
        h = nn.Embed(s.vocab, s.d_model, dtype=self.dtype, param_dtype=self.dtype, name="embed")(tokens)
        for i in range(s.layers):
            h = Block(s, self.rank, self.scale, self.dtype, name=f"block{i}")(h)
        h = nn.LayerNorm(dtype=self.dtype, param_dtype=self.dtype, name="ln_f")(h)
        return nn.Dense(s.vocab, use_bias=False, dtype=self.dtype, param_dtype=self.dtype,
                        name="head")(h)


def batch(shape: Shape, step: int = 0) -> jax.Array:
    """Deterministic token batch ``(batch, seq + 1)`` for one step."""
    key = jax.random.fold_in(jax.random.PRNGKey(1), step)
    return jax.random.randint(key, (shape.batch, shape.seq + 1), 0, shape.vocab)


def loss_fn(apply, params, tokens):
    """Next-token cross-entropy of ``apply(params, inputs)``, averaged in float32."""
    logits = apply(params, tokens[:, :-1]).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits)
    return -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1).mean()


def init(shape: Shape, rank: int = 0, scale: float = 1.0, dtype=jnp.float32, seed: int = 0):
    """``(model, params)``; ``rank > 0`` adds the hand-written ``lora_a``/``lora_b``."""
    model = LM(shape, rank, scale, dtype)
    params = model.init(jax.random.PRNGKey(seed), batch(shape)[:, :-1])["params"]
    return model, params
