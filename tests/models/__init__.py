"""A zoo of small models that exercise the ways real code uses its weights.

Every module here exposes ``make() -> (apply, params, inputs)`` where
``apply(params, *inputs)`` is a plain function of a params pytree, and
``LAYOUTS``: the ``Layout`` that layout inference must find for the kernels
whose orientation is not the default one (or that are easy to get wrong), and
optionally ``USES``: the primitives through which a weight must be consumed
low-rank (so that e.g. a tied embedding's logits matmul is not overlooked).
Sizes are tiny so that the whole zoo traces and compiles in seconds on CPU.
"""

from . import cnn, einsum_mid, experts, int_keys, mlp, nnx_model, out_in, scanned, transformer

ZOO = {
    "mlp": mlp,
    "cnn": cnn,
    "transformer": transformer,
    "scanned": scanned,
    "nnx": nnx_model,
    "einsum_mid": einsum_mid,
    "out_in": out_in,
    "experts": experts,
    "int_keys": int_keys,
}
