"""Exceptions raised by lorax_fn; every one is a :class:`LoraError`."""


class LoraError(Exception):
    """Base class of every error lorax_fn raises on bad input."""


class TargetError(LoraError, ValueError):
    """``targets``/``exclude`` matched nothing, or named a leaf that cannot be adapted."""


class RankError(LoraError, ValueError):
    """The rank is not positive or exceeds the factorised dimensions of a weight."""


class TargetDtypeError(LoraError, TypeError):
    """A targeted leaf is not a floating-point array."""


class LayoutError(LoraError, ValueError):
    """A layout (stack/in/out axes) does not fit the weight's shape."""


class MaterializationError(LoraError, ValueError):
    """A LoRA weight reached an operation with no low-rank rule under ``on_materialize='raise'``."""


class StructureError(LoraError, ValueError):
    """Two trees that must line up (base and adapters, trainable and frozen) do not."""


class MaterializationWarning(UserWarning):
    """A LoRA weight was built densely under ``on_materialize='warn'`` (still correct, slower)."""
