"""Resumable training: `AdapterCheckpointManager`, an `ocp.CheckpointManager` over adapter steps.

Each step directory holds three Orbax items: ``arrays`` and ``config`` (the same
adapter checkpoint :func:`save_adapters` writes, so :func:`load_adapters` and
``python -m lorax_fn inspect`` read any step) and ``train`` (the optimizer
state, the step and the PRNG key). The frozen base is never written.

The config's ``train`` section records the step and every array of the
``train`` item (path, shape, dtype, CRC-32), under the config's own checksum;
:meth:`AdapterCheckpointManager.restore` checks the restored item against it,
so a damaged optimizer-state or key file is an error, never wrong moments.
Steps saved before the section existed restore without that check.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_manager as _ocm

from . import ckpt_format as fmt
from .checkpoint import parent_is_dir
from .ckpt_format import ARRAYS, CONFIG
from .errors import CheckpointError
from .lorafy import Targets
from .paths import leaves_with_paths
from .weight import is_lora

TRAIN = "train"
# what Orbax names a step's directory, committed or being written (other files in the run directory are the user's)
_STEP_NAME = re.compile(r"[0-9]+(\.orbax-checkpoint-tmp.*)?")
# Orbax raises this when a step directory exists; older versions may lack the class
_STEP_EXISTS = getattr(_ocm, "StepAlreadyExistsError", ())


class Restored(NamedTuple):
    """What :meth:`AdapterCheckpointManager.restore` returns: unpack it like a tuple.

    Example:
        >>> import tempfile, jax.numpy as jnp, lorax_fn as lf
        >>> lp = lf.lorafy({"w": jnp.ones((4, 3))}, rank=2)
        >>> with lf.AdapterCheckpointManager(tempfile.mkdtemp(), async_save=False) as ckpt:
        ...     _ = ckpt.save(5, lp)
        ...     tree, opt_state, step, rng = ckpt.restore(lp)
        >>> step, opt_state, rng
        (5, None, None)
    """

    tree: Any
    opt_state: Any
    step: int
    rng: Any


def _abstract(x: Any) -> Any:
    """ShapeDtypeStructs that keep each array's sharding, so a restore lands where the template lives."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, x)


def _train_item(step: int, opt_state: Any, rng: Any) -> dict:
    item: dict[str, Any] = {"step": int(step)}
    if opt_state is not None:
        item["opt_state"] = opt_state
    if rng is not None:
        # typed keys are not arrays Orbax can write; their bits are, and the template's impl rewraps them
        item["rng"] = jax.random.key_data(rng) if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key) else rng
    return item


def _others(item: dict) -> dict:
    """The train item without its step, which the record holds as a number rather than an array."""
    return {k: v for k, v in item.items() if k != "step"}


def _record(item: dict) -> dict:
    """The ``train`` section of a step's config: the step, and every other array's path, shape, dtype and CRC-32.

    Taken in :meth:`~AdapterCheckpointManager.save` itself, from the values it
    was given, so a caller that donates or overwrites its buffers right after
    an async save cannot make the record disagree with what Orbax copied then.
    """
    flat, _ = leaves_with_paths(_others(item))
    return {"step": int(item["step"]), "arrays": [{"path": p, **fmt.array_spec(_data(x))} for p, x in flat]}


def _is_key(x: Any) -> bool:
    return jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key)


def _data(x: Any) -> Any:
    """A train-item array as recorded: a typed PRNG key (``noisy_sgd`` keeps one) by its key data, which is
    also how Orbax's abstract templates describe it."""
    return jax.random.key_data(x) if _is_key(x) else x


def _targets(abstract: dict, record: dict | None, where: str) -> dict:
    """Restore targets: the template's structure, shapes and shardings, in the dtypes the record says were written.

    Reading each array as written lets its checksum be checked before a cast to
    the template's dtype. A template that does not match the record is refused
    before anything is read.
    """
    if record is None:  # a step from before the record: read as the template says
        return abstract
    flat, treedef = leaves_with_paths(_others(abstract))
    specs = record["arrays"]
    saved = [(e["path"], tuple(e["shape"])) for e in specs]
    given = [(p, tuple(np.shape(x))) for p, x in flat]
    if given != saved:
        i = next((i for i, (s, g) in enumerate(zip(saved, given)) if s != g), min(len(saved), len(given)))
        first = [f"'{pairs[i][0]}' {pairs[i][1]}" if i < len(pairs) else "nothing" for pairs in (saved, given)]
        raise CheckpointError(
            f"{where}: the templates do not match what the step was saved with (did you pass the opt_state/rng "
            f"it was saved with, e.g. tx.init(tree) of the same optimizer?): {len(saved)} arrays saved, "
            f"{len(given)} in the templates; first difference: saved {first[0]}, template {first[1]}")
    leaves = [jax.ShapeDtypeStruct(x.shape, jnp.dtype(e["dtype"]), sharding=x.sharding)
              if isinstance(x, jax.ShapeDtypeStruct) and not _is_key(x) else x for (_, x), e in zip(flat, specs)]
    return {**jax.tree_util.tree_unflatten(treedef, leaves), "step": abstract["step"]}


def _check_train(train: dict, record: dict | None, step: int, where: str) -> None:
    """Compare a restored train item with the step and its record; CheckpointError naming the leaf if not.

    ``where`` is the item's directory. Without a record (a step saved before
    there was one) only the step number can be checked.
    """
    got = int(train["step"])
    recorded = "" if record is None else f" and the step's config records step {record['step']}"
    if got != step or (record is not None and record["step"] != step):
        raise CheckpointError(
            f"{where}: the train item holds step {got}{recorded}, but this is the directory of step {step}: "
            "parts of another step were copied in. Restore another step (restore(..., step=k))")
    if record is None:
        return
    flat, _ = leaves_with_paths(_others(train))
    paths, specs = [p for p, _ in flat], record["arrays"]
    if paths != [e["path"] for e in specs]:
        raise CheckpointError(f"{where}: read arrays {paths[:4]} but the step's config records "
                              f"{[e['path'] for e in specs][:4]}; the train item is damaged or mixed up")
    for (path, x), spec in zip(flat, specs):
        data = _data(x)
        if np.dtype(data.dtype).name != spec["dtype"]:
            raise CheckpointError(f"{where}: '{path}' was read as {np.dtype(data.dtype).name}, the step's config "
                                  f"records {spec['dtype']}")
        fmt.verify(data, spec, f"'{path}'", where)  # shape and CRC-32, as for the adapters


def _cast(train: dict, abstract: dict) -> dict:
    """The restored arrays in the template's dtypes (they were read as written, to check them)."""
    def cast(x, t):
        dt = getattr(t, "dtype", None)
        if _is_key(x) or _is_key(t):  # Orbax restores a typed key as it was saved; keys have no astype
            return x
        return x.astype(dt) if dt is not None and hasattr(x, "astype") and x.dtype != dt else x

    return {**jax.tree.map(cast, _others(train), _others(abstract)), "step": train["step"]}


def _lost_trained_leaves(tree: Any, config: dict, opt_state: Any) -> list[str]:
    """Paths of non-LoRA leaves that ``opt_state`` holds non-zero state for but the adapter config does not store.

    Optimizer states nest a params-shaped tree under their own keys (``lf.optimizer``'s
    ``inner_states/train/.../mu/<param path>``; frozen leaves are empty ``MaskedNode``s), so an
    opt-state leaf whose path ends in a parameter's path, with that parameter's shape, is state
    for that parameter. The longest matching path wins, so ``l1/bias`` is never read as a
    top-level ``bias``.
    """
    if opt_state is None:
        return []
    stored = {e["path"] for e in config["trainable"]}
    known: dict[str, tuple | None] = {}  # path -> shape if it would be lost, None if it is fine
    for path, leaf in leaves_with_paths(tree, is_leaf=is_lora)[0]:
        if is_lora(leaf):
            known.update({f"{path}/{k}": None for k in leaf.children})
        elif leaf is not None:
            known[path] = None if path in stored else tuple(np.shape(leaf))
    if not any(v is not None for v in known.values()):
        return []
    lost = set()
    for path, x in leaves_with_paths(opt_state)[0]:
        parts = path.split("/")
        for k in range(len(parts)):
            suffix = "/".join(parts[k:])
            if suffix in known:
                # non-zero: a fresh tx.init() holds zeros, which training has not yet put anything into
                if known[suffix] is not None and tuple(np.shape(x)) == known[suffix] and bool(jnp.any(x != 0)):
                    lost.add(suffix)
                break
    return sorted(lost)


class AdapterCheckpointManager:
    """Periodic, asynchronous, crash-safe checkpoints of a LoRA training run.

    Wraps ``ocp.CheckpointManager``: one directory per step, written to a
    temporary name and renamed on commit (a process killed mid-save leaves the
    previous step intact), the oldest removed beyond ``max_to_keep``. With
    ``async_save`` the arrays are copied off the device during :meth:`save`
    and written in the background while training continues; :meth:`close`
    (or leaving a ``with`` block) waits for the last write.

    Args:
      directory: the run's checkpoint directory (created if missing).
      max_to_keep: how many recent steps to keep (``None``: all).
      save_interval_steps: :meth:`save` writes only at multiples of this.
      async_save: write in a background thread.
      trainable: fully trained non-LoRA leaves to store with the adapters
        (the same ``trainable`` you gave :func:`optimizer`).
      metadata: JSON notes stored in every step's adapter config.

    Example:
        >>> import tempfile, jax, jax.numpy as jnp, optax, lorax_fn as lf
        >>> lp = lf.lorafy({"w": jnp.ones((4, 3))}, rank=2)
        >>> tx = lf.optimizer(optax.sgd(0.1), lp)
        >>> opt_state, rng = tx.init(lp), jax.random.key(0)
        >>> with lf.AdapterCheckpointManager(tempfile.mkdtemp(), max_to_keep=2) as ckpt:
        ...     for step in range(1, 4):
        ...         _ = ckpt.save(step, lp, opt_state, rng)
        ...     ckpt.wait_until_finished()
        ...     r = ckpt.restore(lp, opt_state, rng)
        ...     ckpt.all_steps(), r.step
        ([2, 3], 3)
    """

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int | None = 3,
                 save_interval_steps: int = 1, async_save: bool = True, trainable: Targets = None,
                 metadata: Mapping[str, Any] | None = None):
        self._trainable, self._metadata = trainable, metadata
        if int(save_interval_steps) < 1:
            raise ValueError(f"save_interval_steps must be a positive integer, got {save_interval_steps!r}")
        interval = int(save_interval_steps)
        # exactly the multiples of the interval (Orbax's default policy also saves the first step it sees);
        # Orbax adds its preemption policy to this one, so a preempted TPU job still saves
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                               should_save_fn=lambda step, last: step % interval == 0,
                                               enable_async_checkpointing=async_save, create=True)
        path = Path(directory).expanduser().absolute()
        parent_is_dir(path)  # Orbax would create it and fail on a file with a raw OSError
        self._mgr = ocp.CheckpointManager(
            path, options=options,
            item_handlers={ARRAYS: ocp.StandardCheckpointHandler(), CONFIG: ocp.JsonCheckpointHandler(),
                           TRAIN: ocp.StandardCheckpointHandler()})

    # -- bookkeeping -------------------------------------------------------
    @property
    def directory(self) -> Path:
        """The run's checkpoint directory."""
        return Path(self._mgr.directory)

    def step_directory(self, step: int) -> Path:
        """The directory of one committed step; :func:`load_adapters` reads it."""
        return self.directory / str(step)

    def latest_step(self) -> int | None:
        """The newest committed step, or ``None`` before the first save finished."""
        return self._mgr.latest_step()

    def all_steps(self) -> list[int]:
        """Every committed step still on disk, oldest first."""
        return sorted(self._mgr.all_steps())

    def should_save(self, step: int) -> bool:
        """Whether :meth:`save` would write at ``step`` (interval and duplicates)."""
        return self._mgr.should_save(step)

    def wait_until_finished(self) -> None:
        """Block until every pending background write has committed."""
        self._mgr.wait_until_finished()

    def close(self) -> None:
        """Wait for pending writes, then release Orbax's threads."""
        self._mgr.wait_until_finished()
        self._mgr.close()

    def __enter__(self) -> "AdapterCheckpointManager":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_step_names(self) -> None:
        """Refuse links and files under step names: Orbax would write through or delete them (raw OSError)."""
        if not self.directory.is_dir():
            return
        for entry in os.scandir(self.directory):
            if _STEP_NAME.fullmatch(entry.name) and (entry.is_symlink() or not entry.is_dir(follow_symlinks=False)):
                raise CheckpointError(f"'{entry.path}' is {'a symbolic link' if entry.is_symlink() else 'a file'} "
                                      "under a step's name in the checkpoint directory; lorax_fn never saves "
                                      "through links or over files: move it away")

    # -- save / restore ----------------------------------------------------
    def save(self, step: int, tree: Any, opt_state: Any = None, rng: Any = None, *,
             force: bool = False) -> bool:
        """Checkpoint the adapters of ``tree``, ``opt_state``, ``step`` and ``rng``.

        Args:
          step: the number of finished training steps.
          tree: the LoRA tree (its base is not written).
          opt_state: the optimizer state (any pytree; optional).
          rng: a PRNG key (typed or raw ``uint32``) to resume the random stream.
          force: write even when ``step`` is off the save interval.

        The CRC-32 of every array is taken here, from the values given, and
        stored in the step's config; with ``async_save`` Orbax copies the
        arrays off the device here too, so donating them afterwards is safe.

        Returns:
          Whether a save was started (False off the interval).

        Raises:
          CheckpointError: ``step`` is not after the latest saved step (e.g.
            after ``restore(step=k)`` rolled back to an older step: Orbax would
            skip every save up to the latest, or refuse an existing step), or
            ``opt_state`` holds non-zero state for non-LoRA leaves that are not stored
            (a manager made without the ``trainable=`` of :func:`optimizer`).
          StructureError: ``tree`` holds no adapters and no ``trainable`` leaves.
        """
        self._check_step_names()
        latest = self._mgr.latest_step()
        if latest is not None and int(step) <= latest:
            raise CheckpointError(
                f"cannot save step {step} in '{self.directory}': the latest saved step is {latest} (steps "
                f"{self.all_steps()}) and Orbax writes only newer steps, so this save would be skipped. After "
                "restore(step=...) rolled back to an older step, delete the newer step directories or save to "
                "a new directory")
        if not force and not self._mgr.should_save(step):
            return False
        item = _train_item(step, opt_state, rng)
        arrays, config = fmt.describe(tree, self._trainable, self._metadata, _record(item))
        lost = _lost_trained_leaves(tree, config, opt_state)
        if lost:
            raise CheckpointError(
                f"opt_state holds optimizer state for {', '.join(repr(p) for p in lost[:5])}, which are not "
                "adapters and are not stored: their trained values would be lost. Pass "
                "AdapterCheckpointManager(..., trainable=...) the same trainable= you gave lf.optimizer")
        args = ocp.args.Composite(**{ARRAYS: ocp.args.StandardSave(arrays), CONFIG: ocp.args.JsonSave(config),
                                     TRAIN: ocp.args.StandardSave(item)})
        try:
            return bool(self._mgr.save(step, args=args, force=force))
        except _STEP_EXISTS as err:
            raise CheckpointError(f"step {step} already exists in '{self.directory}': {err}") from err

    def restore(self, tree: Any, opt_state: Any = None, rng: Any = None, *, step: int | None = None,
                dtype: Any = None) -> Restored:
        """Read a step back: adapters onto ``tree``'s base, optimizer state and key like the templates.

        Args:
          tree: the LoRA tree of this run (e.g. fresh from :func:`lorafy`): its
            base is kept, its adapters are replaced, and restored adapters land
            on the shardings of its current ones. A dense base works too.
          opt_state: a template of the optimizer state (e.g. ``tx.init(tree)``);
            restored onto the same structure and shardings. Pass it iff you saved one.
          rng: a template key of the saved kind; pass it iff you saved one.
          step: which step (default: the latest).
          dtype: as in :func:`load_adapters`.

        Returns:
          ``Restored(tree, opt_state, step, rng)``.

        Raises:
          CheckpointError: no committed step, a damaged step (a file that fails
            to decode, an adapter, optimizer-state or key array that fails its
            checksum, a train item holding another step: the message names the
            step's ``train`` directory and the array's path), or templates that
            do not match what was saved.
          StructureError: ``tree`` does not fit the saved adapters (path, shape, rank).
        """
        step = self.latest_step() if step is None else int(step)
        if step is None:
            raise CheckpointError(f"no committed checkpoint in '{self.directory}'")
        where = str(self.step_directory(step))
        try:
            config = self._mgr.restore(step, args=ocp.args.Composite(**{CONFIG: ocp.args.JsonRestore()}))[CONFIG]
            stored = self._mgr.item_metadata(step)[ARRAYS].tree
        except Exception as err:  # a missing step, a damaged item: Orbax raises many types
            raise CheckpointError(f"cannot read checkpoint step {step} in '{self.directory}': {err}") from err
        p = fmt.plan(fmt.validate(config, where), tree, where)
        fmt.check_stored(p, stored)
        abstract = _abstract(_train_item(step, opt_state, rng))
        record = config.get(TRAIN)  # the config's record of the train item; steps saved before it have none
        where_train = str(self.step_directory(step) / TRAIN)
        targets = _targets(abstract, record, where_train)
        try:
            got = self._mgr.restore(step, args=ocp.args.Composite(**{
                ARRAYS: ocp.args.StandardRestore(p.targets()),
                TRAIN: ocp.args.StandardRestore(targets)}))
        except Exception as err:
            # with a record the templates were checked above, so a failed read is a file that fails to decode
            # (e.g. a flipped bit in a compressed chunk); TensorStore calls some of those DATA_LOSS
            why = ("a file of the step is damaged or unreadable; restore another step (restore(..., step=k))"
                   if record is not None or "DATA_LOSS" in str(err) else
                   "it does not fit the given templates (did you pass the opt_state/rng it was saved with?)")
            raise CheckpointError(f"cannot restore step {step} from '{self.directory}': {why}: {err}") from err
        _check_train(got[TRAIN], record, step, where_train)
        train = _cast(got[TRAIN], abstract)
        key = train.get("rng")
        if key is not None and rng is not None and jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
            key = jax.random.wrap_key_data(key, impl=jax.random.key_impl(rng))
        return Restored(fmt.assemble(p, got[ARRAYS], dtype), train.get("opt_state"), int(train["step"]), key)
