"""The on-disk description of an adapter checkpoint: what is stored, and the checks on load.

An adapter checkpoint is an Orbax composite of two items:

- ``arrays``: a flat dict of the adapter arrays, ``{"<i>": {"a": ..., "b": ...}}``
  per LoRA weight and ``{"t<i>": array}`` per extra trainable leaf. Keys are
  positions, not parameter paths, because Orbax joins nested keys with ``.``
  and paths may contain any character.
- ``config``: JSON naming, for every entry, the parameter path, rank, alpha,
  variant, layout, the base weight's shape and dtype, and each stored array's
  shape, dtype and CRC-32. The checksums are what turns a damaged file into an
  error instead of silently wrong weights. An adapter on a quantised base
  (QLoRA) also records the quantisation (``quant``: codebook, block size,
  double quantisation, coded leading axes, dtype, and the CRC-32 of each coded
  part), so that loading onto the original weights rebuilds the same codes, or
  refuses.

This module builds both from a LoRA tree and, on load, checks a config against
the base it is loaded onto and against the arrays Orbax reports, before any
array is read.
"""

from __future__ import annotations

import collections
import difflib
import json
import zlib
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .errors import CheckpointError, LoraError, StructureError
from .lorafy import Targets, _matcher
from .paths import leaves_with_paths
from .sharding_rules import adapter_shardings, leaf_sharding
from .quant.array import QuantizedArray, is_quantized, quantize_array
from .weight import Layout, is_lora, is_node

FORMAT = "lorax_fn.adapters"
# 2: the config carries ``config_crc32``; version-1 configs (without it) still load.
# 3: entries name their adapter ``kind``; written only when a kind other than LoRA is
# stored, so that LoRA checkpoints stay readable by version-2 readers
FORMAT_VERSION = 4  # 2: LoRA only; 3: adapter kinds; 4: quantised bases
ARRAYS, CONFIG = "arrays", "config"
CONFIG_CRC = "config_crc32"


class Entry(NamedTuple):
    """One stored item, resolved against a base tree."""

    index: int  # position of the base leaf in the flattened base
    key: str  # key in the ``arrays`` item
    spec: dict  # the config entry
    targets: Any  # ShapeDtypeStruct (trainable leaf) or {name: ShapeDtypeStruct} (adapter)


class Plan(NamedTuple):
    """Everything needed to read the arrays and rebuild the LoRA tree."""

    leaves: list
    treedef: Any
    entries: list[Entry]
    where: str

    def targets(self) -> dict:
        """``{arrays key: ShapeDtypeStruct(s)}``: the restore targets Orbax reads onto."""
        return {e.key: e.targets for e in self.entries}


# ------------------------------------------------------------------ save side
def crc32(x: Any) -> int | None:
    """CRC-32 of an array's bytes in C order; ``None`` when the array is not all on this host."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return None
    arr = np.ascontiguousarray(np.asarray(x))
    return zlib.crc32(arr.reshape(-1).view(np.uint8))


def array_spec(x: Any) -> dict:
    # np.asarray: a trainable leaf may be a Python scalar, which has no .dtype
    arr = x if isinstance(x, jax.Array) else np.asarray(x)
    return {"shape": list(np.shape(arr)), "dtype": np.dtype(arr.dtype).name, "crc32": crc32(arr)}


def config_crc32(config: Mapping) -> int:
    """CRC-32 of the config's canonical JSON (sorted keys, compact), without the CRC field itself.

    Taken after a JSON round trip, so tuples/lists and int/str keys give the
    same value at save time as after reading the file back.
    """
    body = {k: v for k, v in config.items() if k != CONFIG_CRC}
    canon = json.dumps(json.loads(json.dumps(body)), sort_keys=True, separators=(",", ":"))
    return zlib.crc32(canon.encode())


def _check_unique(path: str, seen: set, what: str) -> None:
    """Paths are '/'-joined keys, so a key "a/b" and nested a → b give the same string: refuse to guess."""
    if path in seen:
        raise StructureError(f"two leaves of {what} have the same path '{path}' (e.g. a key containing '/' "
                             "next to nested keys of the same names); rename one, paths must be unique")
    seen.add(path)


def _children(node) -> dict[str, Any]:
    """The arrays an adapter stores, by child name: its trainable children (the base is the user's)."""
    return {n: getattr(node, n) for n in node.trainable}


def _static_json(node) -> dict:
    """The node's static fields but the layout, as JSON values (LoRA: rank, alpha, variant)."""
    return {n: v for n, v in node.config.items() if n != "layout"}


def describe(tree: Any, trainable: Targets = None, metadata: Mapping[str, Any] | None = None,
             train: Mapping[str, Any] | None = None) -> tuple[dict, dict]:
    """``(arrays, config)`` to store for the adapters of ``tree`` and its ``trainable`` leaves.

    ``train`` is the record of a training step's other state (the ``train``
    section :class:`AdapterCheckpointManager` checks on restore); it goes into
    the config before the config checksum is taken, so the checksum covers it.

    Raises:
      StructureError: no adapters and no trainable leaves, a LoRA weight
        without its base (e.g. the output of ``adapters()``), whose shape the
        config must record, or two stored leaves with the same path string.
    """
    from . import __version__

    extra = _matcher(trainable, "trainable")
    flat, _ = leaves_with_paths(tree, is_leaf=is_lora)
    arrays, adapters, full, seen = {}, [], [], set()
    for path, leaf in flat:
        if is_lora(leaf):
            _check_unique(path, seen, "the tree")
            if leaf.w is None:
                raise StructureError(f"'{path}' has no base weight: save the full LoRA tree (the config "
                                     "records each base shape), not the output of adapters()")
            key = str(len(adapters))
            kids = _children(leaf)
            arrays[key] = kids
            lay = leaf.layout
            adapters.append({
                "path": path, "key": key, "kind": leaf.kind, **_static_json(leaf),
                "layout": {"stack": list(lay.stack), "in": list(lay.inputs), "out": list(lay.outputs)},
                "base": {"shape": list(leaf.shape), "dtype": np.dtype(leaf.dtype).name},
                "arrays": {name: array_spec(x) for name, x in kids.items()},
                **({"quant": quant_record(leaf.w)} if is_quantized(leaf.w) else {}),
            })
        elif extra is not None and leaf is not None and extra(path, leaf):
            _check_unique(path, seen, "the tree")
            key = f"t{len(full)}"
            if not isinstance(leaf, (jax.Array, np.ndarray)):
                leaf = jnp.asarray(leaf)  # a Python scalar: store it as JAX would use it (float32, int32)
            arrays[key] = leaf
            full.append({"path": path, "key": key, **array_spec(leaf)})
    if not adapters and not full:
        raise StructureError("the tree has no LoRA weights and `trainable` matched no leaf: nothing to save")
    version = (FORMAT_VERSION if any("quant" in e for e in adapters) else
               2 if all(e["kind"] == "lora" for e in adapters) else 3)
    config = {"format": FORMAT, "format_version": version, "library_version": __version__,
              "adapters": adapters, "trainable": full, "metadata": dict(metadata or {})}
    if train is not None:
        config["train"] = dict(train)
    # the array checksums do not cover the config itself (rank, alpha, variant, layout)
    config[CONFIG_CRC] = config_crc32(config)
    return arrays, config


def quant_record(q: QuantizedArray) -> dict:
    """What rebuilds ``q`` from the original weight, and the checksums its codes must have."""
    crcs = {n: crc32(getattr(q, n)) for n in ("codes", "absmax", "absmax_q", "nested", "offset")
            if getattr(q, n) is not None}
    return {**q.settings(), "crc32": crcs}


_QUANT_FIELDS = ("codebook", "block_size", "double_quant", "lead", "dtype")


def _settings_text(d: Mapping) -> str:
    return ", ".join(f"{k} {d[k]}" for k in _QUANT_FIELDS if k in d)


def _quantized_base(e: dict, w: Any, where: str) -> Any:
    """The base an entry's adapters were trained on, from the given base leaf ``w``.

    A dense ``w`` is quantised with the recorded settings; a quantised one must
    have them. Either way its codes must match the recorded checksums.

    Raises:
      CheckpointError: the base is quantised differently (or the checkpoint
        has no quantisation but the base does), or its codes differ.
    """
    path, rec = e["path"], e.get("quant")
    if rec is None:
        if is_quantized(w):
            raise CheckpointError(f"{where}: the adapters for '{path}' were trained on a dense base, but the "
                                  f"base given here is quantised ({_settings_text(w.settings())}); give the "
                                  "dense weights (lf.dequantize changes the values)")
        return w
    if not isinstance(rec, Mapping) or any(k not in rec for k in _QUANT_FIELDS + ("crc32",)):
        raise CheckpointError(f"{where}: config field 'adapters['{path}'].quant' is malformed")
    if is_quantized(w):
        got = w.settings()
        if any(got[k] != rec[k] for k in _QUANT_FIELDS if k != "dtype"):
            raise CheckpointError(f"{where}: the base given for '{path}' is quantised with "
                                  f"{_settings_text(got)}, but the adapters were trained on a base quantised "
                                  f"with {_settings_text(rec)}; give the original dense weights instead")
        q = w
    else:
        if not (hasattr(w, "dtype") and jnp.issubdtype(w.dtype, jnp.floating)):
            raise CheckpointError(f"{where}: base leaf '{path}' is {getattr(w, 'dtype', type(w).__name__)}, "
                                  "not floating point: it cannot be quantised")
        q = quantize_array(w, rec["codebook"], rec["block_size"], rec["double_quant"], rec["lead"], rec["dtype"])
    for name, want in rec["crc32"].items():
        part = getattr(q, name, None) if name in ("codes", "absmax", "absmax_q", "nested", "offset") else None
        got_crc = None if part is None else crc32(part)
        if part is None or (want is not None and got_crc is not None and got_crc != want):
            raise CheckpointError(f"{where}: the base given for '{path}' quantises to other {name} than the "
                                  f"base the adapters were trained on ({_settings_text(rec)}): it is not the "
                                  "same weight; give the original params the adapters were trained on")
    return q if rec["dtype"] == q.dtype.name else q.astype(rec["dtype"])


# ------------------------------------------------------------------ load side
def _need(d: Any, key: str, kind, where: str, what: str):
    if not isinstance(d, Mapping) or key not in d or not isinstance(d[key], kind):
        raise CheckpointError(f"{where}: config field '{what}{key}' is missing or malformed")
    return d[key]


def validate(config: Any, where: str) -> dict:
    """Check the config's format, checksum, required fields and values; raise CheckpointError naming what is wrong."""
    if not isinstance(config, Mapping):
        raise CheckpointError(f"{where}: the adapter config is not a JSON object")
    if config.get("format") != FORMAT:
        raise CheckpointError(f"{where}: not a lorax_fn adapter config (format={config.get('format')!r})")
    version = config.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"{where}: format_version {version!r} is newer than this library "
                              f"understands ({FORMAT_VERSION}); upgrade lorax_fn")
    if version >= 2 or CONFIG_CRC in config:  # version 1 wrote no config checksum
        want = config.get(CONFIG_CRC)
        if not isinstance(want, int):
            raise CheckpointError(f"{where}: config field '{CONFIG_CRC}' is missing or malformed")
        got = config_crc32(config)
        if got != want:
            raise CheckpointError(f"{where}: the adapter config fails its checksum (crc32 {got:#010x}, "
                                  f"recorded {want:#010x}); the config was damaged or edited")
    for e in _need(config, "adapters", list, where, ""):
        p = _need(e, "path", str, where, "adapters[].")
        ctx = f"adapters['{p}']."
        for k, kind in (("key", str), ("layout", Mapping), ("base", Mapping), ("arrays", Mapping)):
            _need(e, k, kind, where, ctx)
        if not isinstance(e.get("kind", "lora"), str):
            raise CheckpointError(f"{where}: config field '{ctx}kind' is malformed")
        try:
            _node_class(e, where).read_config(e)
        except ValueError as err:
            field, why = err.args if len(err.args) == 2 else ("", str(err))
            raise CheckpointError(f"{where}: config field '{ctx}{field}' {why}") from None
        for k in ("stack", "in", "out"):
            _need(e["layout"], k, list, where, ctx + "layout.")
        for k, kind in (("shape", list), ("dtype", str)):
            _need(e["base"], k, kind, where, ctx + "base.")
        for name, spec in e["arrays"].items():
            for k, kind in (("shape", list), ("dtype", str)):
                _need(spec, k, kind, where, f"{ctx}arrays.{name}.")
    for e in _need(config, "trainable", list, where, ""):
        p = _need(e, "path", str, where, "trainable[].")
        for k, kind in (("key", str), ("shape", list), ("dtype", str)):
            _need(e, k, kind, where, f"trainable['{p}'].")
    if "train" in config:  # only AdapterCheckpointManager steps have it; configs without it are older
        train = _need(config, "train", Mapping, where, "")
        step = _need(train, "step", int, where, "train.")
        if isinstance(step, bool) or step < 0:
            raise CheckpointError(f"{where}: config field 'train.step' is {step!r}; it must be an integer >= 0")
        for e in _need(train, "arrays", list, where, "train."):
            p = _need(e, "path", str, where, "train.arrays[].")
            ctx = f"train.arrays['{p}']."
            shape = _need(e, "shape", list, where, ctx)
            if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape):
                raise CheckpointError(f"{where}: config field '{ctx}shape' is {shape!r}; expected sizes >= 0")
            try:
                jnp.dtype(_need(e, "dtype", str, where, ctx))
            except TypeError:
                raise CheckpointError(f"{where}: config field '{ctx}dtype' is {e['dtype']!r}, not a dtype this "
                                      "JAX knows") from None
            crc = e.get("crc32", False)  # None: the array was not all on the saving host
            if crc is not None and (not isinstance(crc, int) or isinstance(crc, bool)):
                raise CheckpointError(f"{where}: config field '{ctx}crc32' is missing or malformed")
    return dict(config)


def _layout(e: dict) -> Layout:
    lay = e["layout"]
    return Layout(tuple(lay["stack"]), tuple(lay["in"]), tuple(lay["out"]))


def _node_class(e: dict, where: str) -> type:
    from .kinds import node_class
    return node_class(e.get("kind", "lora"), where)  # entries before format 3 are LoRA


def _static(e: dict, where: str) -> tuple:
    """The node's static fields, in its class's order, from a validated entry."""
    cls = _node_class(e, where)
    config = {**cls.read_config(e), "layout": _layout(e)}
    return tuple(config[n] for n in cls.static)


def _expected(e: dict, where: str) -> dict[str, tuple]:
    """Shapes of the stored children implied by the base shape, layout and static fields; the config must agree."""
    shape, path = tuple(e["base"]["shape"]), e["path"]
    cls = _node_class(e, where)
    try:
        lay = _layout(e)
        if cls.kind != "full":
            lay = lay.check(shape, path)
    except LoraError as err:
        raise CheckpointError(f"{where}: {err}") from None
    config = {**cls.read_config(e), "layout": lay}
    want = {n: tuple(x) for n, x in cls.child_shapes(shape, config).items()}
    if "w" in cls.trainable:
        want["w"] = shape
    for name, spec in e["arrays"].items():
        if name in want and tuple(spec["shape"]) != want[name]:
            raise CheckpointError(
                f"{where}: config for '{path}' is inconsistent: {_what(cls.kind, e)} on base {shape} needs "
                f"{name} {want[name]}, the config lists {name} {tuple(spec['shape'])}")
    if set(e["arrays"]) != set(cls.trainable):
        raise CheckpointError(f"{where}: config for '{path}' lists arrays {sorted(e['arrays'])}; a "
                              f"{cls.kind} adapter stores exactly {sorted(cls.trainable)}")
    return want


def _what(kind: str, fields: Mapping) -> str:
    """'rank 4' for LoRA, 'a dora adapter of rank 4' for other kinds."""
    rank = f"rank {fields['rank']}" if "rank" in fields else ""
    if kind == "lora":
        return rank
    return f"a {kind} adapter" + (f" of {rank}" if rank else "")


def _nearest(path: str, paths: list[str]) -> str:
    near = difflib.get_close_matches(path, paths, n=3, cutoff=0.0)
    return ", ".join(f"'{p}'" for p in near) or "(the base is empty)"


def _base_shardings(base_leaves: list, shardings: Any) -> list:
    """One sharding per flattened base leaf; ``None`` entries fall back to where the leaf lives."""
    own = [leaf_sharding(x.w if is_lora(x) else x) for x in base_leaves]
    if shardings is None:
        return own
    if isinstance(shardings, jax.sharding.Sharding):
        return [shardings] * len(base_leaves)
    flat = jax.tree_util.tree_flatten(shardings, is_leaf=lambda s: isinstance(s, jax.sharding.Sharding)
                                      or s is None)[0]
    if len(flat) != len(base_leaves):
        raise StructureError(f"shardings has {len(flat)} leaves but the base has {len(base_leaves)}; pass "
                             "one sharding per base leaf (the base's own structure), or a single sharding")
    return [s if s is not None else o for s, o in zip(flat, own)]


def _kind(dtype: Any) -> str:
    """The family of a dtype; NumPy's ``dtype.kind`` calls bfloat16 and float8 'V', not 'f'."""
    for family, name in ((jnp.bool_, "bool"), (jnp.floating, "float"), (jnp.complexfloating, "complex"),
                         (jnp.signedinteger, "int"), (jnp.unsignedinteger, "uint")):
        if jnp.issubdtype(dtype, family):
            return name
    return jnp.dtype(dtype).name


def plan(config: dict, base: Any, where: str, shardings: Any = None) -> Plan:
    """Resolve every config entry against ``base`` and decide how each array is restored.

    Raises:
      StructureError: the base does not fit: a path is missing, a shape differs
        (the message names the path and both shapes), or a LoRA leaf of the base
        has a different rank or layout than the checkpoint, or several base
        leaves have the path of a checkpoint entry.
      CheckpointError: the config contradicts itself.
    """
    flat, treedef = leaves_with_paths(base, is_leaf=is_node)
    index = {p: i for i, (p, _) in enumerate(flat)}
    counts = collections.Counter(p for p, _ in flat)
    leaves = [x for _, x in flat]
    paths = [p for p, _ in flat]
    where_sh = _base_shardings(leaves, shardings)
    entries, claimed = [], set()

    def locate(path: str, what: str) -> int:
        if path not in index:
            raise StructureError(f"{where}: the checkpoint has {what} for '{path}' but the base has no such "
                                 f"leaf; nearest base paths: {_nearest(path, paths)}")
        if counts[path] > 1:
            raise StructureError(f"{where}: {counts[path]} leaves of the base have the path '{path}' (e.g. a "
                                 "key containing '/' next to nested keys of the same names); the checkpoint's "
                                 "entry for it cannot be placed")
        claimed.add(path)
        return index[path]

    for e in config["adapters"]:
        path = e["path"]
        want = _expected(e, where)
        i = locate(path, "an adapter")
        leaf = leaves[i]
        saved = tuple(e["base"]["shape"])
        got = tuple(np.shape(leaf.w if is_lora(leaf) else leaf))
        if got != saved:
            raise StructureError(f"{where}: adapter for '{path}' was trained on a base of shape {saved}, "
                                 f"but the base given here has shape {got} at that path")
        w = leaf.w if is_lora(leaf) else leaf
        wdt = w.dtype if is_quantized(w) else jnp.result_type(w)
        if not jnp.issubdtype(wdt, jnp.floating):
            raise StructureError(f"{where}: base leaf '{path}' is {wdt}, not floating point")
        qw = _quantized_base(e, w, where)
        if qw is not w:
            leaves[i] = leaf.replace(w=qw) if is_lora(leaf) else qw
        cls = _node_class(e, where)
        if is_lora(leaf):
            have = {n: tuple(np.shape(getattr(leaf, n))) for n in leaf.trainable}
            if type(leaf) is not cls or leaf._static != _static(e, where) or have != want:
                shown = lambda d: ", ".join(f"{n} {v}" for n, v in d.items())  # noqa: E731
                raise StructureError(
                    f"{where}: '{path}' in the given tree has {_what(leaf.kind, leaf.config)} ({shown(have)}) "
                    f"but the checkpoint has {_what(cls.kind, e)} ({shown(want)})")
        shard = adapter_shardings(where_sh[i], _layout(e), len(saved), path, signatures=cls.axes)
        if is_lora(leaf) and shardings is None:
            # a LoRA template (a training tree) keeps its adapters where they already live
            shard = {k: leaf_sharding(getattr(leaf, k)) for k in leaf.trainable}
        tg = {name: jax.ShapeDtypeStruct(tuple(spec["shape"]), jnp.dtype(spec["dtype"]),
                                         sharding=shard.get(name, where_sh[i]))
              for name, spec in e["arrays"].items()}
        entries.append(Entry(i, e["key"], e, tg))

    for e in config["trainable"]:
        path = e["path"]
        i = locate(path, "a trained leaf")
        leaf = leaves[i]
        if is_lora(leaf):
            raise StructureError(f"{where}: '{path}' is a fully trained leaf in the checkpoint but carries "
                                 "an adapter in the given tree")
        got, saved = tuple(np.shape(leaf)), tuple(e["shape"])
        if got != saved:
            raise StructureError(f"{where}: trained leaf '{path}' has shape {saved} in the checkpoint, but "
                                 f"the base given here has shape {got} at that path")
        stored, given = jnp.dtype(e["dtype"]), jnp.dtype(jnp.result_type(leaf))
        if _kind(stored) != _kind(given):
            # assemble casts to the base leaf's dtype: float → int would silently truncate the trained values
            raise StructureError(f"{where}: trained leaf '{path}' was saved as {stored.name}, but the base given "
                                 f"here holds {jnp.dtype(given).name} at that path; a cast would change its "
                                 f"values: give a base whose '{path}' is {stored.name}")
        tg = jax.ShapeDtypeStruct(saved, stored, sharding=where_sh[i])
        entries.append(Entry(i, e["key"], e, tg))

    extra = [p for p, x in flat if is_lora(x) and p not in claimed]
    if extra:
        raise StructureError(f"{where}: the given tree has adapters the checkpoint does not have: "
                             + ", ".join(f"'{p}'" for p in extra[:5]))
    return Plan(leaves, treedef, entries, where)


def check_stored(p: Plan, stored: Any) -> None:
    """Compare the arrays Orbax reports (shape, dtype) with the config before reading them; CheckpointError if not."""
    if not isinstance(stored, Mapping):
        raise CheckpointError(f"{p.where}: the arrays item holds no tree")
    have = set(stored)
    want = {e.key for e in p.entries}
    if have != want:
        raise CheckpointError(f"{p.where}: the arrays item holds keys {sorted(have)[:8]} but the config "
                              f"describes {sorted(want)[:8]}; the checkpoint is incomplete or mixed up")
    for e in p.entries:
        got = stored[e.key]
        pairs = e.targets.items() if isinstance(e.targets, Mapping) else [(None, e.targets)]
        for name, tg in pairs:
            m = got.get(name) if name is not None and isinstance(got, Mapping) else got
            label = f"'{e.spec['path']}'" + (f" {name}" if name else "")
            if m is None or not hasattr(m, "shape"):
                raise CheckpointError(f"{p.where}: no stored array for {label}")
            if tuple(m.shape) != tuple(tg.shape):
                why = f" (rank {e.spec['rank']})" if "rank" in e.spec else ""
                raise CheckpointError(f"{p.where}: stored array {label} has shape {tuple(m.shape)} but the "
                                      f"config{why} says {tuple(tg.shape)}")
            if getattr(m, "dtype", None) is not None and jnp.dtype(m.dtype) != jnp.dtype(tg.dtype):
                raise CheckpointError(f"{p.where}: stored array {label} is {jnp.dtype(m.dtype)} but the "
                                      f"config says {jnp.dtype(tg.dtype)}")


def verify(x: Any, spec: dict, label: str, where: str) -> None:
    """CheckpointError unless ``x`` has the shape and CRC-32 ``spec`` records (a ``None`` CRC is not checked)."""
    if tuple(np.shape(x)) != tuple(spec["shape"]):
        raise CheckpointError(f"{where}: {label} was read with shape {tuple(np.shape(x))}, the config says "
                              f"{tuple(spec['shape'])}")
    want = spec.get("crc32")
    if want is None:
        return
    got = crc32(x)
    if got is not None and got != want:
        raise CheckpointError(f"{where}: {label} fails its checksum (crc32 {got:#010x}, config "
                              f"{want:#010x}); the array file is corrupted")


def assemble(p: Plan, restored: Mapping, dtype: Any = None) -> Any:
    """Verify checksums and put the restored arrays onto the base (CheckpointError on a mismatch).

    Adapters keep their stored dtype unless ``dtype`` is given; fully trained
    leaves take the dtype of the base leaf they replace.
    """
    leaves = list(p.leaves)
    for e in p.entries:
        got = restored[e.key]
        base_leaf = leaves[e.index]
        w = base_leaf.w if is_lora(base_leaf) else base_leaf
        if isinstance(e.targets, Mapping):
            kids = {}
            for name, spec in e.spec["arrays"].items():
                x = got[name]
                verify(x, spec, f"'{e.spec['path']}' {name}", p.where)
                kids[name] = x if dtype is None else x.astype(dtype)
            cls = _node_class(e.spec, p.where)
            kids.setdefault("w", w)
            leaves[e.index] = cls.tree_unflatten(_static(e.spec, p.where), [kids[n] for n in cls.children])
        else:
            verify(got, e.spec, f"trained leaf '{e.spec['path']}'", p.where)
            leaves[e.index] = got.astype(jnp.result_type(w))
    return jax.tree_util.tree_unflatten(p.treedef, leaves)
