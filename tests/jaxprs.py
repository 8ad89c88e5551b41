"""Walking a jaxpr with every sub-jaxpr (jit, scan, cond branches, custom rules)."""

from __future__ import annotations

from typing import Iterator


def walk(jaxpr, inside: tuple[str, ...] = ()) -> Iterator[tuple]:
    """``(eqn, names of the enclosing primitives)`` for every equation, depth first."""
    for eqn in jaxpr.eqns:
        yield eqn, inside
        for v in eqn.params.values():
            for sub in v if isinstance(v, (list, tuple)) else [v]:
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    yield from walk(sub, inside + (eqn.primitive.name,))
