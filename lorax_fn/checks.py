"""Checks of user arguments shared by the public functions; each error names the argument it refuses."""

from __future__ import annotations

import math
import operator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .errors import ArgumentError, RankError


def prng_key(key: Any, name: str = "key") -> Any:
    """``key`` if it is one PRNG key (typed, or a raw ``uint32`` key from ``PRNGKey``); ArgumentError otherwise."""
    dtype, shape = getattr(key, "dtype", None), getattr(key, "shape", None)
    if dtype is None or shape is None:
        raise ArgumentError(f"{name} must be a PRNG key such as jax.random.key(0); got {type(key).__name__} "
                            f"{key!r}")
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        if shape != ():
            raise ArgumentError(f"{name} must be one PRNG key; got an array of {shape} keys (from "
                                "jax.random.split?): pass one of them, e.g. keys[0]")
        return key
    if dtype == jnp.uint32 and len(shape) == 1:  # a raw key; jax.random takes it as it is
        return key
    raise ArgumentError(f"{name} must be one PRNG key such as jax.random.key(0); got an array of dtype {dtype} "
                        f"and shape {tuple(shape)}" + (" (split keys: pass one of them, e.g. keys[0])"
                                                       if dtype == jnp.uint32 else ""))


def float_dtype(dtype: Any, name: str = "dtype", min_bits: int = 8) -> Any:
    """``dtype`` as a NumPy dtype if it is floating point of at least ``min_bits`` bits; ArgumentError otherwise."""
    try:
        dt = jnp.dtype(dtype)
    except TypeError:
        dt = None
    if dt is None or not jnp.issubdtype(dt, jnp.floating) or 8 * dt.itemsize < min_bits:
        wide = f" of {min_bits} bits or more" if min_bits > 8 else ""
        # an integer dtype would truncate every weight; an 8-bit float cannot hold a trained update
        raise ArgumentError(f"{name} must be a floating-point dtype{wide} (float32, bfloat16, float16), got "
                            f"{dtype!r}")
    return dt


def rank(value: Any, name: str = "rank") -> int:
    """A positive Python ``int`` from an int, NumPy or 0-d JAX integer; RankError otherwise (never from 2.0)."""
    if isinstance(value, bool) or getattr(value, "dtype", None) == np.bool_:
        raise RankError(f"{name} must be a positive integer, got {type(value).__name__} {value!r}")
    try:
        out = operator.index(value)
    except TypeError:
        raise RankError(f"{name} must be a positive integer, got {type(value).__name__} {value!r}") from None
    if out < 1:
        raise RankError(f"{name} must be a positive integer, got {value!r}")
    return int(out)


def alpha(value: Any, name: str = "alpha") -> float:
    """A finite ``float`` above 0; ArgumentError otherwise (a checkpoint of any other could not be loaded)."""
    if isinstance(value, (bool, str)) or value is None:
        raise ArgumentError(f"{name} must be a finite number > 0, got {type(value).__name__} {value!r}")
    try:
        out = float(value)
    except (TypeError, ValueError, jax.errors.ConcretizationTypeError):
        raise ArgumentError(f"{name} must be a finite number > 0, got {type(value).__name__} {value!r}") from None
    if not math.isfinite(out) or out <= 0:
        raise ArgumentError(f"{name} must be a finite number > 0, got {value!r}")
    return out
