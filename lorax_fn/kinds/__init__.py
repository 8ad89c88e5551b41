"""Adapter kinds: the registry from names and config objects to node classes.

Each kind is one module here (``lora``, ``dora``, ``mora``) defining its node
class (an :class:`~lorax_fn.Adapter` subclass with the kind's hooks) and its
config object; :func:`register_kind` is the one line that makes a kind known
by name, to ``lorafy(variant=...)`` and to ``load_adapters``.
"""

from __future__ import annotations

from typing import Any

from ..errors import ArgumentError, CheckpointError
from ..weight import Adapter
from .dora import DoRA, DoraWeight
from .full import Full, FullWeight
from .lora import LoRA, LoraWeight
from .mora import MoRA, MoraWeight

_KINDS: dict[str, Any] = {}  # name → config class; the config's ``adapter`` is the node class


def register_kind(name: str, config: type) -> None:
    """Make an adapter kind known by ``name`` to ``lorafy(variant=name)`` and to checkpoint loading.

    Args:
      name: the kind's name; must equal ``config.adapter.kind`` (what
        checkpoints record).
      config: a config class whose no-argument instance is the kind's default
        (a frozen dataclass, say) and whose class attribute ``adapter`` is the
        node class, an :class:`~lorax_fn.Adapter` subclass.

    Raises:
      ArgumentError: ``config.adapter`` is not an ``Adapter`` subclass, its
        ``kind`` is not ``name``, or ``name`` is taken by another kind (a class
        of the same module and name, defined again, replaces the old one).

    Example (a whole kind is in the README section "Writing your own adapter kind"):
        >>> import lorax_fn as lf
        >>> lf.register_kind("lora", lf.LoRA)          # the built-in again: allowed, changes nothing
        >>> try:
        ...     lf.register_kind("lora", lf.DoRA)
        ... except lf.ArgumentError as err:
        ...     print(err)
        register_kind('lora', ...): its adapter's kind is 'dora'; they must agree (checkpoints record the kind by that name)
    """
    node = getattr(config, "adapter", None)
    if not (isinstance(node, type) and issubclass(node, Adapter)):
        raise ArgumentError(f"register_kind({name!r}, ...): the config class needs an `adapter` attribute "
                            "naming an lf.Adapter subclass")
    if node.kind != name:
        raise ArgumentError(f"register_kind({name!r}, ...): its adapter's kind is {node.kind!r}; they must agree "
                            "(checkpoints record the kind by that name)")
    held = _KINDS.get(name)
    # the same class defined again (a notebook cell run twice) replaces the old one; another class may not
    same = held is not None and (held.adapter.__module__, held.adapter.__qualname__) == (node.__module__,
                                                                                         node.__qualname__)
    if held is not None and not same:
        raise ArgumentError(f"an adapter kind named {name!r} is already registered ({held.__name__})")
    _KINDS[name] = config


def kinds() -> dict[str, type]:
    """The registered adapter kinds: ``{name: config class}`` (``lorafy(variant=name)`` accepts each name).

    Example:
        >>> import lorax_fn as lf
        >>> lf.kinds()["mora"] is lf.MoRA
        True
    """
    return dict(_KINDS)


def resolve(variant: Any, rslora: bool = False) -> Any:
    """The config object for ``lorafy(variant=...)``: a registered name or a config object."""
    if isinstance(variant, str):
        if variant not in _KINDS:
            raise ArgumentError(f"unknown variant {variant!r}; known: {sorted(_KINDS)} (or pass a config "
                                "object such as lf.MoRA(type=1))")
        cfg = _KINDS[variant]()
    else:
        node = getattr(variant, "adapter", None)
        if not (isinstance(node, type) and issubclass(node, Adapter)):
            raise ArgumentError(f"variant must be a kind name ({sorted(_KINDS)}) or a config object such as "
                                f"lf.DoRA(), got {variant!r}")
        cfg = variant
    if rslora:
        if not hasattr(cfg, "rslora"):
            raise ArgumentError(f"rslora=True does not apply to variant {type(cfg).__name__}")
        import dataclasses
        cfg = dataclasses.replace(cfg, rslora=True)
    return cfg


def node_class(name: str, where: str) -> type:
    """The node class of a stored kind name; CheckpointError when this process does not know it."""
    cfg = _KINDS.get(name)
    if cfg is None:
        raise CheckpointError(f"{where}: the checkpoint holds adapters of kind {name!r}, which is not registered "
                              f"here (known: {sorted(_KINDS)}); import the module that calls "
                              f"lf.register_kind({name!r}, ...) first")
    return cfg.adapter


register_kind("lora", LoRA)
register_kind("dora", DoRA)
register_kind("mora", MoRA)
register_kind("full", Full)

__all__ = ["DoRA", "DoraWeight", "Full", "FullWeight", "LoRA", "LoraWeight", "MoRA", "MoraWeight", "kinds", "node_class",
           "register_kind", "resolve"]
