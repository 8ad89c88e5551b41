"""How ``lorafy`` initialises ``a`` and ``b``: random (``kaiming``, ``gaussian``) or from the weight (``pissa``, ``olora``).

The random inits leave the base untouched (``b = 0``). PiSSA (Meng et al. 2024,
arXiv:2404.02948) and OLoRA (Büyükakyüz 2024, arXiv:2406.01775) move the
weight's principal part into the factors instead and freeze the residual
``w_res = w − scale·a@b``; ``merge`` then gives back ``w`` up to float error.
Both work on the base in its canonical ``stack + in + out`` order, flattened to
one ``(in, out)`` matrix per stack slice, so multi-axis and stacked kernels
factorise the way :func:`~lorax_fn.lorafy`'s layout says.
"""

from __future__ import annotations

import math
import re
from typing import Any

import jax
import jax.numpy as jnp

from . import lazy
from .errors import StructureError
from .paths import leaves_with_paths
from .weight import Layout, factor_shapes, is_lora

RANDOM = ("kaiming", "gaussian")
FROM_WEIGHT = ("pissa", "olora")
_NITER = re.compile(r"pissa_niter_([0-9]+)")


def check(init: Any) -> str | None:
    """``None`` if ``init`` names an init, else why not (for the caller's error)."""
    if isinstance(init, str) and (init in RANDOM + FROM_WEIGHT or _NITER.fullmatch(init)):
        return None
    return (f"init must be one of {RANDOM + FROM_WEIGHT} or 'pissa_niter_<k>' (randomised SVD with k subspace "
            f"iterations), got {init!r}")


def rewrites_base(init: str) -> bool:
    """Whether ``init`` replaces the base by a residual (PiSSA, OLoRA)."""
    return init in FROM_WEIGHT or bool(_NITER.fullmatch(init))


def random_factors(key, w: Any, layout: Layout, rank: int, dtype, init: str) -> tuple[jax.Array, jax.Array]:
    """``(a, b)`` for a random init: ``b = 0``, so the update starts at zero."""
    sa, sb = factor_shapes(tuple(w.shape), layout, rank)
    fan_in = math.prod(w.shape[k] for k in layout.inputs)
    if init == "kaiming":
        # PEFT's default: kaiming_uniform(a=sqrt(5)) is U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        bound = 1.0 / math.sqrt(fan_in)
        a = jax.random.uniform(key, sa, jnp.float32, -bound, bound)
    else:
        # the LoRA paper draws A Gaussian; std 1/r as PEFT's init_lora_weights="gaussian"
        a = jax.random.normal(key, sa, jnp.float32) / rank
    return a.astype(dtype), jnp.zeros(sb, dtype)


def _canonical(w: jax.Array, layout: Layout) -> tuple[jax.Array, tuple]:
    """``w`` as ``(stack..., fan_in, fan_out)`` in float32, and the canonical shape to undo it."""
    order = layout.stack + layout.inputs + layout.outputs
    t = jnp.transpose(w, order).astype(jnp.float32)
    s = tuple(w.shape[k] for k in layout.stack)
    fan_in = math.prod(w.shape[k] for k in layout.inputs)
    return t.reshape(s + (fan_in, -1)), t.shape


def _svd_top(m: jax.Array, rank: int, niter: int | None, key) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``U[:, :r]``, ``S[:r]``, ``Vᵀ[:r]`` of each matrix of ``m``: exact, or randomised with ``niter`` iterations."""
    if niter is None:
        u, s, vt = jnp.linalg.svd(m, full_matrices=False)
        return u[..., :rank], s[..., :rank], vt[..., :rank, :]
    # Halko, Martinsson & Tropp: a few oversampled random directions, refined by subspace iterations
    k = min(rank + 8, *m.shape[-2:])
    omega = jax.random.normal(key, m.shape[:-2] + (m.shape[-1], k), m.dtype)
    mt = jnp.swapaxes(m, -1, -2)
    q, _ = jnp.linalg.qr(m @ omega)
    for _ in range(niter):
        q, _ = jnp.linalg.qr(mt @ q)
        q, _ = jnp.linalg.qr(m @ q)
    u_small, s, vt = jnp.linalg.svd(jnp.swapaxes(q, -1, -2) @ m, full_matrices=False)
    return (q @ u_small)[..., :rank], s[..., :rank], vt[..., :rank, :]


def from_weight(key, w: Any, layout: Layout, rank: int, scale: float, dtype,
                init: str) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(w_res, a, b)`` for PiSSA or OLoRA: ``scale·a@b`` is the principal part, ``w_res`` the rest.

    ``w_res`` has ``w``'s dtype and layout; the factors are ``dtype``. The
    split is computed in float32 and the residual is taken against the factors
    as stored (after their cast), so ``w_res + scale·a@b`` is ``w`` up to the
    rounding of that sum.
    """
    m, canon_shape = _canonical(jnp.asarray(w), layout)
    if init == "olora":
        # as PEFT and the paper: QR of the (out, in) weight, so b holds orthonormal rows over the outputs
        q, r = jnp.linalg.qr(jnp.swapaxes(m, -1, -2))
        left, right = jnp.swapaxes(r[..., :rank, :], -1, -2), jnp.swapaxes(q[..., :rank], -1, -2)
    else:
        niter = _NITER.fullmatch(init)
        u, s, vt = _svd_top(m, rank, int(niter.group(1)) if niter else None, key)
        root = jnp.sqrt(s)
        left, right = u * root[..., None, :], root[..., :, None] * vt
    # split the scale evenly so that scale·a@b is the principal part
    inv = 1.0 / math.sqrt(scale)
    sa, sb = factor_shapes(tuple(w.shape), layout, rank)
    a = (left * inv).reshape(sa).astype(dtype)
    b = (right * inv).reshape(sb).astype(dtype)
    principal = scale * (a.astype(jnp.float32).reshape(left.shape) @ b.astype(jnp.float32).reshape(right.shape))
    res = (m - principal).reshape(canon_shape)
    order = layout.stack + layout.inputs + layout.outputs
    inverse = tuple(order.index(k) for k in range(len(order)))
    return jnp.transpose(res, inverse).astype(jnp.result_type(w)), a, b


def to_original_base(trained: Any, initial: Any) -> Any:
    """A PiSSA/OLoRA run's adapters as a plain LoRA of rank ``2r`` on the original weights.

    After ``lorafy(init="pissa")`` the frozen base is a residual, so the
    trained adapters only mean something on that residual. Since
    ``w_res = w − s·a₀@b₀``, the trained model ``w_res + s·a@b`` equals
    ``w + s·[a, a₀]@[b; −b₀]``: a rank-``2r`` adapter on the original ``w``
    (what PEFT's ``path_initial_model_for_weight_conversion`` does). Save the
    result with :func:`save_adapters` or :func:`save_peft`; it loads onto the
    user's original params and gives the trained model.

    Args:
      trained: the tree after training.
      initial: the tree ``lorafy(..., init="pissa")`` returned (keep it, or
        call ``lorafy`` again with the same arguments and key).

    Returns:
      ``trained``'s structure with every :class:`LoraWeight` of rank ``2r``
      over ``merge``-of-``initial`` bases (the original weights up to float
      error); other leaves are ``trained``'s.

    Raises:
      StructureError: the trees do not line up, or a LoRA weight differs in
        rank, layout, variant or base shape (the message names the path).

    Example:
        >>> import jax.numpy as jnp, numpy as np, lorax_fn as lf
        >>> p = {"w": jnp.asarray(np.random.default_rng(0).standard_normal((6, 4)), jnp.float32)}
        >>> lp0 = lf.lorafy(p, rank=2, init="pissa")
        >>> trained = {"w": lp0["w"].replace(b=lp0["w"].b + 0.1)}
        >>> plain = lf.to_original_base(trained, lp0)
        >>> plain["w"].rank, bool(jnp.allclose(lf.merge(plain)["w"], lf.merge(trained)["w"], atol=1e-5))
        (4, True)
    """
    from .kinds.lora import LoraWeight

    flat_t, treedef = leaves_with_paths(trained, is_leaf=is_lora)
    flat_i, treedef_i = leaves_with_paths(initial, is_leaf=is_lora)
    if treedef != treedef_i:
        raise StructureError("trained and initial trees have different structures; pass the tree lorafy returned "
                             "and the same tree after training")
    out = []
    for (path, t), (_, i) in zip(flat_t, flat_i):
        if not is_lora(t) or not {"a", "b"} <= set(t.children):
            out.append(t)  # kinds without LoRA factors never rewrite the base
            continue
        if type(i) is not type(t) or t._static != i._static or t.shape != i.shape:
            raise StructureError(f"'{path}': the trained and the initial LoRA weights differ in rank, layout, "
                                 "variant or shape; pass the tree lorafy returned for this run")
        ns = len(t.layout.stack)
        # merge's own LoRA sum w_res + s·a₀b₀ in w's dtype (a DoRA magnitude applies on top of it, unchanged)
        original = lazy.materialize(lazy.as_lazy(LoraWeight(i.w, i.a, i.b, rank=i.rank, alpha=i.alpha,
                                                            layout=i.layout, variant=i.variant)))
        a = jnp.concatenate([t.a, i.a.astype(t.a.dtype)], axis=-1)
        b = jnp.concatenate([t.b, -i.b.astype(t.b.dtype)], axis=ns)
        r2 = 2 * t.rank
        alpha = t.scale * (math.sqrt(r2) if t.variant == "rslora" else r2)  # the same scale at rank 2r
        kids = {n: getattr(t, n) for n in t.children}
        kids.update(w=original, a=a, b=b)
        config = {**t.config, "rank": r2, "alpha": alpha}
        out.append(type(t).tree_unflatten(tuple(config[n] for n in t.static), [kids[n] for n in t.children]))
    return jax.tree_util.tree_unflatten(treedef, out)
