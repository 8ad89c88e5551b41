"""Adapter checkpoints through Orbax: `save_adapters`, `load_adapters`, `save_merged`.

An adapter checkpoint holds the adapter arrays and a JSON config, never the
base: for a transformer adapted at rank 8 it is a few percent of the model's
size. Orbax writes it to a temporary directory and renames it on commit, so a
crash mid-save leaves no half-written checkpoint under the final name.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping

import orbax.checkpoint as ocp

from . import ckpt_format as fmt
from .ckpt_format import ARRAYS, CONFIG
from .errors import CheckpointError
from .lorafy import Targets
from .merge import merge

__all__ = ["load_adapters", "read_adapter_config", "save_adapters", "save_merged"]

# an overwrite writes the new checkpoint next to the old one and swaps the two directories
NEW_SUFFIX, OLD_SUFFIX = ".lorax-new", ".lorax-old"
MARK = "lorax_fn"  # key of the Orbax custom metadata that marks a checkpoint as ours


def _absolute(directory: str | os.PathLike) -> Path:
    """The absolute, lexically normalised path ('..' resolved, links not followed)."""
    return Path(os.path.abspath(Path(directory).expanduser()))


def composite_checkpointer(**extra_items: ocp.CheckpointHandler) -> ocp.Checkpointer:
    """A synchronous Orbax checkpointer for the ``arrays`` + ``config`` composite.

    ``extra_items`` adds more items by name (name → handler), as in
    ``ocp.CompositeCheckpointHandler``.
    """
    handlers = {ARRAYS: ocp.StandardCheckpointHandler(), CONFIG: ocp.JsonCheckpointHandler(), **extra_items}
    return ocp.Checkpointer(ocp.CompositeCheckpointHandler(**handlers))


def committed_dir(directory: str | os.PathLike) -> Path:
    """The absolute path of a finished checkpoint, or a CheckpointError saying what is there instead.

    Orbax commits by renaming ``<name>.orbax-checkpoint-tmp*`` to ``<name>``,
    so a directory under the final name is a finished save; only the
    temporary name is left by a save that died. Recent Orbax versions also
    write ``commit_success.txt`` on commit, but it is not required here:
    atomic-rename saves by older Orbax versions (which this package
    supports) carry none, and Orbax itself reads those as finished.
    """
    path = _absolute(directory)  # as the saves spell it, so 'link/..' names the same directory on both sides
    if path.is_dir():
        return path
    new, old = path.with_name(path.name + NEW_SUFFIX), path.with_name(path.name + OLD_SUFFIX)
    if new.is_dir() and old.is_dir():
        raise CheckpointError(f"an overwrite of '{path}' was interrupted between its two renames: the new "
                              f"checkpoint is complete at '{new}', the previous one is at '{old}'; rename the one "
                              f"you want to '{path}'")
    unfinished = sorted(path.parent.glob(path.name + ".orbax-checkpoint-tmp*")) if path.parent.is_dir() else []
    if unfinished:
        raise CheckpointError(f"the save to '{path}' never finished (only '{unfinished[0].name}' exists): the "
                              "process stopped before Orbax committed it; use the previous checkpoint")
    raise CheckpointError(f"no checkpoint at '{path}'")


def _marker(kind: str) -> dict:
    """Orbax custom metadata naming this library as the writer: what ``overwrite=True`` looks for."""
    from . import __version__
    return {MARK: {"kind": kind, "library_version": __version__}}


def _lexists(path: Path) -> bool:
    return os.path.lexists(path)


def written_by_lorax(path: Path) -> bool:
    """Whether ``path`` is a real directory holding a checkpoint this library wrote.

    Checkpoints carry ``custom_metadata["lorax_fn"]`` in Orbax's
    ``_CHECKPOINT_METADATA``; adapter checkpoints from before that marker are
    recognised by their adapter config. Nothing else (a folder of user files,
    another program's Orbax checkpoint) qualifies, so ``overwrite=True``
    never deletes it.
    """
    if path.is_symlink() or not path.is_dir():
        return False
    meta = path / "_CHECKPOINT_METADATA"
    try:
        if not meta.is_symlink() and meta.is_file() and meta.stat().st_size < 2**20:
            custom = json.loads(meta.read_text()).get("custom_metadata") or {}
            if isinstance(custom.get(MARK), dict):
                return True
    except (OSError, ValueError, AttributeError):
        pass
    if (path / CONFIG).is_symlink() or not (path / CONFIG).is_dir():
        return False
    ck = composite_checkpointer()
    try:
        _read_config(ck, path)
        return True
    except CheckpointError:
        return False
    finally:
        ck.close()


def parent_is_dir(path: Path) -> None:
    """CheckpointError unless the nearest existing ancestor of ``path`` is a directory (so Orbax can create it)."""
    for parent in path.parents:
        if _lexists(parent):
            if parent.is_symlink() and not parent.exists():
                raise CheckpointError(f"cannot write '{path}': '{parent}' is a symbolic link to nothing")
            if not parent.is_dir():
                raise CheckpointError(f"cannot write '{path}': '{parent}' is a file, not a directory")
            return


def check_destination(path: Path, overwrite: bool, flag: str = "overwrite=True") -> None:
    """Refuse, before anything is written, a destination a save could not use safely.

    Raises CheckpointError when a parent of ``path`` is a file (Orbax would
    fail half-way), when ``path`` or a name the save writes next to it is a
    symbolic link (a write would land outside the directory given), or when
    ``path`` exists and is not a checkpoint this library wrote (``overwrite``
    only ever replaces those). ``flag`` is how the caller spells the overwrite
    option in messages (the CLI says ``--overwrite``).
    """
    parent_is_dir(path)
    new, old = path.with_name(path.name + NEW_SUFFIX), path.with_name(path.name + OLD_SUFFIX)
    tmps = [t for n in (path, new) for t in path.parent.glob(glob.escape(n.name) + ".orbax-checkpoint-tmp*")] \
        if path.parent.is_dir() else []
    for name in (path, new, old, *tmps):
        if name.is_symlink():
            raise CheckpointError(f"'{name}' is a symbolic link; lorax_fn never saves through links (the write "
                                  "would land wherever it points): remove it or give the real path")
        if name != path and _lexists(name) and not name.is_dir():
            raise CheckpointError(f"'{name}' is a file in the way of the save to '{path}'; it was left "
                                  "untouched: move it away")
    if not _lexists(path):
        return
    if not overwrite:
        raise CheckpointError(f"'{path}' already exists; pass {flag} to replace it")
    if not path.is_dir():
        raise CheckpointError(f"'{path}' is a file, not a checkpoint directory; {flag} only replaces "
                              "checkpoints written by lorax_fn, so it was left untouched")
    if not written_by_lorax(path):
        raise CheckpointError(f"'{path}' is not a checkpoint written by lorax_fn (it has no lorax_fn metadata; "
                              "merged checkpoints saved before lorax_fn marked them have none either); "
                              f"{flag} only replaces those, so it was left untouched: remove it yourself or "
                              "save somewhere else")


def _remove_stale(path: Path) -> None:
    """Delete what an earlier interrupted save to ``path`` left next to it, and only that."""
    new, old = path.with_name(path.name + NEW_SUFFIX), path.with_name(path.name + OLD_SUFFIX)
    for stale in (new, old):
        if _lexists(stale):
            if not written_by_lorax(stale):
                raise CheckpointError(f"'{stale}' is in the way of the save to '{path}' and is not a checkpoint "
                                      "written by lorax_fn; it was left untouched: move it away")
            shutil.rmtree(stale)
    # Orbax's unfinished temporary of the new checkpoint (check_destination refused links and files)
    for stale in path.parent.glob(glob.escape(new.name) + ".orbax-checkpoint-tmp*"):
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale)


def _save_replacing(path: Path, overwrite: bool, write: Callable[[Path], None]) -> None:
    """Run ``write(target)`` so that an existing checkpoint at ``path`` is replaced only once the new one is committed.

    Orbax's own ``force=True`` deletes the old directory before writing, so a
    crash mid-save would lose both. Here the new checkpoint is written (and
    committed by Orbax) under ``<path>.lorax-new``, then the old one is renamed
    aside, the new one renamed in, and the old one deleted. A crash before the
    first rename leaves the old checkpoint in place; between the renames, both
    are complete on disk and :func:`committed_dir` says where. Only a
    checkpoint this library wrote is ever replaced (see :func:`check_destination`).
    """
    check_destination(path, overwrite)
    if not _lexists(path):
        write(path)
        return
    _remove_stale(path)  # left by an earlier overwrite that stopped while writing, or around its renames
    new, old = path.with_name(path.name + NEW_SUFFIX), path.with_name(path.name + OLD_SUFFIX)
    write(new)
    os.rename(path, old)
    os.rename(new, path)
    shutil.rmtree(old)


def _read_config(ck: ocp.Checkpointer, path: Path) -> dict:
    if not (path / CONFIG).is_dir():
        raise CheckpointError(f"'{path}' has no '{CONFIG}' item: it is not a lorax_fn adapter checkpoint, or "
                              "it was damaged")
    try:
        cfg = ck.restore(path, args=ocp.args.Composite(**{CONFIG: ocp.args.JsonRestore()}))[CONFIG]
    except Exception as err:  # Orbax raises many types for unreadable JSON
        raise CheckpointError(f"cannot read the adapter config in '{path}': {err}") from err
    return fmt.validate(cfg, str(path))


def _stored_arrays(ck: ocp.Checkpointer, path: Path) -> Mapping:
    try:
        meta = ck.metadata(path).item_metadata[ARRAYS]
        return meta.tree
    except Exception as err:
        raise CheckpointError(f"cannot read the array metadata in '{path}/{ARRAYS}': {err}") from err


def read_adapter_config(directory: str | os.PathLike) -> dict:
    """The JSON config of an adapter checkpoint (paths, ranks, layouts, shapes, dtypes, checksums).

    Args:
      directory: a directory written by :func:`save_adapters` (or one step of
        :class:`AdapterCheckpointManager`).

    Returns:
      The config as a dict: ``adapters`` (one entry per LoRA weight),
      ``trainable`` (fully trained leaves), ``library_version``, ``metadata``.

    Raises:
      CheckpointError: no finished checkpoint there, or no readable config.

    Example:
        >>> import tempfile, jax.numpy as jnp, lorax_fn as lf
        >>> lp = lf.lorafy({"w": jnp.ones((4, 3))}, rank=2)
        >>> d = lf.save_adapters(tempfile.mkdtemp() + "/ad", lp)
        >>> [(e["path"], e["rank"], e["base"]["shape"]) for e in lf.read_adapter_config(d)["adapters"]]
        [('w', 2, [4, 3])]
    """
    path = committed_dir(directory)
    ck = composite_checkpointer()
    try:
        return _read_config(ck, path)
    finally:
        ck.close()


def save_adapters(directory: str | os.PathLike, tree: Any, *, trainable: Targets = None,
                  metadata: Mapping[str, Any] | None = None, overwrite: bool = False) -> Path:
    """Write only the adapters of ``tree`` (and its ``trainable`` leaves) as an Orbax checkpoint.

    Stores ``a``/``b`` of every :class:`LoraWeight` plus a JSON config: paths,
    rank, alpha, variant, layout, base shapes and dtypes, the library version
    and a CRC-32 of every array (checked on load). The base is not stored.

    Args:
      directory: where to write; must not exist unless ``overwrite``.
      tree: the LoRA tree (from :func:`lorafy`, trained or not).
      trainable: fully trained non-LoRA leaves to store as well (biases,
        ``modules_to_save``-style heads), in the forms :func:`optimizer` takes.
      metadata: JSON-serialisable notes kept in the config (e.g. the base model's name).
      overwrite: replace an existing checkpoint written by lorax_fn (nothing
        else is ever replaced). The new one is written next
        to it (``<directory>.lorax-new``) and swapped in once committed, so a
        crash never leaves neither; training loops should still use
        :class:`AdapterCheckpointManager`, which writes one directory per step.

    Returns:
      The absolute path of the checkpoint.

    Raises:
      CheckpointError: ``directory`` exists and ``overwrite`` is False; it
        exists and is not a checkpoint lorax_fn wrote (a file, a folder of
        other files: never replaced, even with ``overwrite``); it, or a name
        the save writes next to it, is a symbolic link; or a parent is a file.
        Each is raised before anything is written.
      StructureError: the tree holds nothing to save, or a LoRA weight has no base.

    Example:
        >>> import tempfile, jax.numpy as jnp, lorax_fn as lf
        >>> lp = lf.lorafy({"w": jnp.ones((4, 3)), "bias": jnp.zeros(3)}, rank=2)
        >>> path = lf.save_adapters(tempfile.mkdtemp() + "/adapter", lp, trainable="bias")
        >>> sorted(p.name for p in path.iterdir() if not p.name.startswith("_"))
        ['arrays', 'commit_success.txt', 'config']
    """
    arrays, config = fmt.describe(tree, trainable, metadata)
    path = _absolute(directory)

    def write(target: Path) -> None:
        ck = composite_checkpointer()
        try:
            ck.save(target, args=ocp.args.Composite(**{ARRAYS: ocp.args.StandardSave(arrays),
                                                       CONFIG: ocp.args.JsonSave(config)}),
                    custom_metadata=_marker("adapters"))
        finally:
            ck.close()

    _save_replacing(path, overwrite, write)
    return path


def load_adapters(directory: str | os.PathLike, base: Any, *, shardings: Any = None,
                  dtype: Any = None) -> Any:
    """Read adapters saved by :func:`save_adapters` and attach them to ``base``.

    Every check runs before an array is read: the config against the base
    (paths, shapes, ranks), then the stored arrays against the config. Arrays
    are read straight onto their target shardings, then their checksums are
    verified.

    Args:
      directory: the checkpoint (or one step directory of :class:`AdapterCheckpointManager`).
      base: the dense params the adapters were trained on (same structure and
        shapes; the dtype may differ), or a LoRA tree of matching ranks, whose
        ``w`` serve as the base.
      shardings: where to put the arrays. ``None``: each adapter inherits its
        base weight's sharding (``a`` the stack and ``in`` axes' part of the
        spec, ``b`` the stack and ``out`` part, rank replicated); a LoRA-tree
        ``base`` keeps the shardings of its own adapters. A single
        ``Sharding``: the base sharding of every leaf. A pytree of the base's
        structure with one ``Sharding`` per leaf: the base shardings to derive from.
      dtype: cast every adapter array to this dtype. By default adapters keep
        the dtype they were saved in, whatever the base's dtype (a bfloat16
        base takes float32 adapters as they are; :func:`merge` returns the
        base's dtype either way). Fully trained leaves always take the dtype of
        the base leaf they replace.

    Returns:
      ``base`` with a :class:`LoraWeight` at every saved path and the saved
      trainable leaves in place: ready for :func:`lora` or :func:`merge`.

    Raises:
      CheckpointError: nothing committed at ``directory`` (an unfinished save
        is named as such), the config is missing or malformed, stored arrays
        disagree with the config, or an array fails its checksum.
      StructureError: the base does not fit: a path is missing, a shape
        differs (the message names the path and both shapes), or a LoRA base
        has different ranks.

    Example:
        >>> import tempfile, jax.numpy as jnp, lorax_fn as lf
        >>> params = {"w": jnp.ones((4, 3))}
        >>> d = lf.save_adapters(tempfile.mkdtemp() + "/ad", lf.lorafy(params, rank=2))
        >>> lf.load_adapters(d, params)["w"]
        LoraWeight(shape=(4, 3), dtype=float32, rank=2, alpha=2, in=(0,), out=(1,))
    """
    path = committed_dir(directory)
    ck = composite_checkpointer()
    try:
        config = _read_config(ck, path)
        p = fmt.plan(config, base, str(path), shardings)
        fmt.check_stored(p, _stored_arrays(ck, path))
        try:
            restored = ck.restore(path, args=ocp.args.Composite(
                **{ARRAYS: ocp.args.StandardRestore(p.targets())}))[ARRAYS]
        except Exception as err:  # TensorStore and Orbax raise many types for damaged files
            raise CheckpointError(f"cannot read the adapter arrays in '{path}': {err}") from err
    finally:
        ck.close()
    return fmt.assemble(p, restored, dtype)


def save_merged(directory: str | os.PathLike, tree: Any, *, overwrite: bool = False) -> Path:
    """Fold the adapters in and write the dense params as a plain Orbax checkpoint.

    The result is an ordinary ``StandardCheckpointer`` pytree checkpoint of
    the original structure, shapes and dtypes: a Flax model restores it with
    ``ocp.StandardCheckpointer().restore(directory, abstract_params)`` and
    needs no lorax_fn.

    Args:
      directory: where to write; must not exist unless ``overwrite``.
      tree: a LoRA tree (or any params tree; plain leaves pass through).
      overwrite: replace an existing checkpoint, crash-safely (see :func:`save_adapters`).

    Returns:
      The absolute path of the checkpoint.

    Raises:
      CheckpointError: as for :func:`save_adapters`, before the merge runs.

    Example:
        >>> import tempfile, jax.numpy as jnp, orbax.checkpoint as ocp, lorax_fn as lf
        >>> lp = lf.lorafy({"w": jnp.ones((4, 3))}, rank=2)
        >>> d = lf.save_merged(tempfile.mkdtemp() + "/merged", lp)
        >>> with ocp.StandardCheckpointer() as ck:
        ...     ck.restore(d)["w"].shape
        (4, 3)
    """
    path = _absolute(directory)
    check_destination(path, overwrite)  # before the merge: a bad destination fails fast
    dense = merge(tree)

    def write(target: Path) -> None:
        # synchronous: a failed background write of StandardCheckpointer (async) keeps the process from exiting;
        # the files are the same, so StandardCheckpointer().restore reads them
        ck = ocp.Checkpointer(ocp.StandardCheckpointHandler())
        try:
            ck.save(target, args=ocp.args.StandardSave(dense), custom_metadata=_marker("merged"))
        finally:
            ck.close()

    _save_replacing(path, overwrite, write)
    return path
