"""Exceptions raised by lorax_fn; every one is a :class:`LoraError`."""


class LoraError(Exception):
    """Base class of every error lorax_fn raises on bad input.

    Example:
        >>> import jax.numpy as jnp, lorax_fn as lf
        >>> try:
        ...     lf.lorafy({"w": jnp.ones((4, 3))}, rank=9, targets="w")
        ... except lf.LoraError as e:
        ...     print(type(e).__name__, isinstance(e, ValueError))
        RankError True
    """


class TargetError(LoraError, ValueError):
    """``targets``/``exclude`` matched nothing, or named a leaf that cannot be adapted.

    Example:
        >>> import jax.numpy as jnp, lorax_fn as lf
        >>> try:
        ...     lf.lorafy({"kernel": jnp.ones((4, 3))}, targets="kernal")
        ... except lf.TargetError as e:
        ...     print(type(e).__name__, "'kernel'" in str(e))
        TargetError True
    """


class ArgumentError(LoraError, ValueError, TypeError):
    """An argument has a type or value that can never work (the message names the argument).

    Raised where a bad value would otherwise surface later as a raw JAX or
    NumPy error, or be accepted and then refused when a checkpoint of it is
    loaded (``alpha=0``, ``key=0``, an integer adapter ``dtype``).

    Example:
        >>> import jax.numpy as jnp, lorax_fn as lf
        >>> try:
        ...     lf.lorafy({"w": jnp.ones((4, 3))}, rank=2, alpha=float("nan"))
        ... except lf.ArgumentError as e:
        ...     print(type(e).__name__, "alpha" in str(e))
        ArgumentError True
    """


class RankError(LoraError, ValueError):
    """The rank is not positive or exceeds the factorised dimensions of a weight.

    Example:
        >>> import jax.numpy as jnp, lorax_fn as lf
        >>> try:
        ...     lf.lorafy({"w": jnp.ones((4, 3))}, rank=0)
        ... except lf.RankError:
        ...     print("rank must be positive")
        rank must be positive
    """


class TargetDtypeError(LoraError, TypeError):
    """A targeted leaf is not a floating-point array.

    Example:
        >>> import jax.numpy as jnp, lorax_fn as lf
        >>> try:
        ...     lf.lorafy({"ids": jnp.ones((4, 3), jnp.int32)}, targets="ids")
        ... except lf.TargetDtypeError as e:
        ...     print(isinstance(e, TypeError))
        True
    """


class LayoutError(LoraError, ValueError):
    """A layout (stack/in/out axes) does not fit the weight's shape.

    Example:
        >>> import jax.numpy as jnp, lorax_fn as lf
        >>> try:
        ...     lf.lorafy({"w": jnp.ones((4, 3))}, layout=((), (0,), (5,)))
        ... except lf.LayoutError:
        ...     print("bad layout")
        bad layout
    """


class MaterializationError(LoraError, ValueError):
    """A LoRA weight reached an operation with no low-rank rule under ``on_materialize='raise'``.

    Example:
        >>> import jax.numpy as jnp, lorax_fn as lf
        >>> lp = lf.lorafy({"w": jnp.ones((4, 3))}, rank=2)
        >>> try:
        ...     lf.lora(lambda p: p["w"] + 1.0, on_materialize="raise")(lp)
        ... except lf.MaterializationError:
        ...     print("no low-rank rule for add")
        no low-rank rule for add
    """


class StructureError(LoraError, ValueError):
    """Two trees that must line up (base and adapters, trainable and frozen) do not.

    Example:
        >>> import jax.numpy as jnp, lorax_fn as lf
        >>> ad = lf.adapters(lf.lorafy({"w": jnp.ones((4, 3))}, rank=2))
        >>> try:
        ...     lf.attach({"w": jnp.ones((5, 3))}, ad)
        ... except lf.StructureError:
        ...     print("does not fit")
        does not fit
    """


class MaterializationWarning(UserWarning):
    """A LoRA weight was built densely under ``on_materialize='warn'`` (still correct, slower).

    Example:
        >>> import warnings, jax.numpy as jnp, lorax_fn as lf
        >>> lp = lf.lorafy({"w": jnp.ones((4, 3))}, rank=2)
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     _ = lf.lora(lambda p: p["w"] + 1.0)(lp)
        >>> [w.category.__name__ for w in caught]
        ['MaterializationWarning']
    """


class NoAdapterWarning(UserWarning):
    """Nothing would train: ``lorafy`` adapted no leaf, ``lora(fn)`` got no adapter, or an optimizer has nothing trainable.

    Each of these runs without an error but leaves every gradient zero, so
    the message names the cause and what to change.

    Example:
        >>> import warnings, jax.numpy as jnp, lorax_fn as lf
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     _ = lf.lorafy({"bias": jnp.zeros(3)})
        >>> [w.category.__name__ for w in caught]
        ['NoAdapterWarning']
    """


class CheckpointError(LoraError, ValueError):
    """A checkpoint is missing, unfinished, corrupted, or not what it claims to be.

    Example:
        >>> import tempfile, jax.numpy as jnp, lorax_fn as lf
        >>> try:
        ...     lf.load_adapters(tempfile.mkdtemp() + "/absent", {"w": jnp.ones((2, 2))})
        ... except lf.CheckpointError as err:
        ...     print(type(err).__name__, isinstance(err, ValueError))
        CheckpointError True
    """
