"""Concrete parameters for the zoo, drawn with NumPy from abstract shapes.

Why not ``model.init``: on CPU every jax.random draw compiles a threefry kernel
per shape, and a Flax init costs seconds (over ten for a small CNN), which
would dominate the zoo's runtime. The models' *structure* and the way they use
their weights is what the tests are about; any well-scaled values serve.
Biases and norm scales are drawn non-trivially on purpose: zeros and ones would
hide a model path that drops or double-counts them.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def _name(keypath) -> str:
    names = [getattr(k, "key", getattr(k, "name", None)) for k in keypath]
    names = [str(n) for n in names if n is not None and n != "value"]
    return "/".join(names)


def fill(abstract, seed: int = 0, n_stack=lambda path: 0):
    """Arrays for a tree of ``ShapeDtypeStruct`` (Linen ``eval_shape`` of init, NNX state).

    Kernels get ``N(0, 1/fan_in)`` with ``fan_in`` the product of all axes but the
    output ones (the last, or the last two for q/k/v ``(embed, heads, head_dim)``),
    ignoring ``n_stack(path)`` leading layer/expert axes; embedding tables
    ``N(0, 1/d)`` as Flax does; biases ``N(0, 0.1²)``; norm scales ``1 + N(0, 0.1²)``.
    """
    rng = np.random.default_rng(seed)

    def one(keypath, s):
        path, shape = _name(keypath), tuple(s.shape)
        leaf = path.rsplit("/", 1)[-1]
        if not jnp.issubdtype(s.dtype, jnp.floating):
            raise TypeError(f"unexpected non-float parameter {path}: {s.dtype}")
        z = rng.standard_normal(shape)
        if leaf == "scale":
            x = 1.0 + 0.1 * z
        elif leaf == "bias":
            x = 0.1 * z
        elif leaf == "embedding":
            x = z / math.sqrt(shape[-1])
        else:
            n_out = 2 if any(k in path for k in ("query", "key", "value")) else 1
            fan_in = math.prod(shape[n_stack(path):len(shape) - n_out]) or 1
            x = z / math.sqrt(fan_in)
        return jnp.asarray(x, s.dtype)

    return jax.tree_util.tree_map_with_path(one, abstract)


def normal(seed: int, shape, scale: float = 1.0, dtype=jnp.float32):
    return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), dtype)


def tokens(seed: int, shape, vocab: int):
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, shape), jnp.int32)
