"""Hugging Face PEFT's LoRA format: `save_peft`, `load_peft` and parameter-path → module-name maps.

PEFT's ``save_pretrained`` writes a directory with ``adapter_config.json``
(``peft_type: "LORA"``, ``r``, ``lora_alpha``, ``target_modules``,
``use_rslora``, per-module ``rank_pattern``/``alpha_pattern``, ...) and
``adapter_model.safetensors``, whose tensors are keyed
``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight`` in torch
orientation: ``lora_A`` is ``(r, in)`` and ``lora_B`` is ``(out, r)``, so
``ΔW_torch = scale · B @ A`` is ``(out, in)``. Embeddings use
``lora_embedding_A`` ``(r, num_embeddings)`` and ``lora_embedding_B``
``(dim, r)``; convolutions ``lora_A`` ``(r, in, *kernel)`` and ``lora_B``
``(out, r, 1, ..., 1)``. Ours are the transposes in Flax orientation:
``a: in + (r,)``, ``b: (r,) + out``, multi-axis ``in``/``out`` flattened in
their layout order (a ``(embed, heads, head_dim)`` query kernel becomes a
``(heads*head_dim, embed)`` torch weight).

Torch module names are not Flax paths, so the caller supplies the mapping
(``name_map``); see :func:`module_name` and :func:`rename`.
"""

from __future__ import annotations

import collections
import json
import math
import os
import re
import string
import zlib
from pathlib import Path
from typing import Any, Callable, Mapping, Union

import jax
import jax.numpy as jnp
import numpy as np

from .errors import CheckpointError
from .errors import LayoutError, StructureError
from .lorafy import LayoutSpec, _user_layout
from .paths import leaves_with_paths
from .weight import Layout, LoraWeight, factor_shapes, is_lora

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
KINDS = ("linear", "embedding", "conv")
_SUFFIXES = {".lora_A.weight": ("matrix", "A"), ".lora_B.weight": ("matrix", "B"),
             ".lora_embedding_A": ("embedding", "A"), ".lora_embedding_B": ("embedding", "B")}
_PARAM_NAMES = ("kernel", "embedding", "weight")
# safetensors header key holding a CRC-32 of the config fields load_peft reads (PEFT ignores the header;
# older PEFT versions reject unknown keys in adapter_config.json, so the binding lives here)
CONFIG_CRC_KEY = "lorax_fn_config_crc32"
_BOUND_FIELDS = ("peft_type", "r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "use_dora")

NameMap = Union[None, Mapping[str, Any], Callable[[str], Any]]


def module_name(path: str) -> str:
    """The default name map: drop a trailing ``kernel``/``embedding``/``weight`` and join with dots.

    Right for a torch port that kept the Flax module names (Linen
    ``block0/mlp_in/kernel`` → ``block0.mlp_in``; NNX ``layers/0/kernel`` →
    ``layers.0``).

    Example:
        >>> from lorax_fn.peft import module_name
        >>> module_name("block0/attn/query/kernel")
        'block0.attn.query'
    """
    parts = path.split("/")
    if len(parts) > 1 and parts[-1] in _PARAM_NAMES:
        parts = parts[:-1]
    return ".".join(parts)


def rename(rules: Mapping[str, Any]) -> Callable[[str], Any]:
    """A name map from ``{path_regex: module_template}`` rules; the first full match wins.

    Templates may use the regex's groups (``\\1``, ``\\g<name>``) and, for a
    weight with stack axes (``nn.scan`` layers, experts), one ``{}`` per stack
    axis, filled with the slice's index: each slice is a separate torch
    module. A value may be a ``(template, kind)`` pair, ``kind`` one of
    ``"linear"``, ``"embedding"``, ``"conv"`` (default: ``"embedding"`` for a
    path ending in ``embedding``, else ``"linear"``). Paths no rule matches
    map to ``None``.

    Example:
        >>> from lorax_fn.peft import rename
        >>> m = rename({r"block(\\d+)/attn/(query|key|value)/kernel": r"model.layers.\\1.self_attn.\\2",
        ...             r"layers/mlp_in/kernel": "model.layers.{}.mlp.up_proj"})
        >>> m("block3/attn/key/kernel"), m("layers/mlp_in/kernel"), m("head/kernel")
        ('model.layers.3.self_attn.key', 'model.layers.{}.mlp.up_proj', None)
    """
    compiled = [(re.compile(k), v) for k, v in rules.items()]

    def name_map(path: str):
        for rx, v in compiled:
            m = rx.fullmatch(path)
            if m:
                tmpl, kind = (v, None) if isinstance(v, str) else v
                return m.expand(tmpl) if kind is None else (m.expand(tmpl), kind)
        return None

    return name_map


def _resolve(name_map: NameMap, path: str) -> tuple[str, str] | None:
    """``(module template, kind)`` for a path, or ``None`` when the map skips it."""
    if name_map is None:
        got = module_name(path)
    elif isinstance(name_map, Mapping):
        got = rename(name_map)(path)
    else:
        got = name_map(path)
    if got is None:
        return None
    tmpl, kind = (got, None) if isinstance(got, str) else tuple(got)
    kind = kind or ("embedding" if path.rsplit("/", 1)[-1] == "embedding" else "linear")
    if kind not in KINDS:
        raise LayoutError(f"name_map gave kind {kind!r} for '{path}'; expected one of {KINDS}")
    return tmpl, kind


def _fields(tmpl: str) -> int:
    return sum(1 for _, field, _, _ in string.Formatter().parse(tmpl) if field is not None)


def _modules(tmpl: str, path: str, stack_shape: tuple[int, ...]) -> list[tuple[tuple[int, ...], str]]:
    """``[(stack index, module name)]`` of one weight: one module per slice along its stack axes."""
    n = _fields(tmpl)
    if n != len(stack_shape):
        raise StructureError(f"'{path}' has {len(stack_shape)} stack axes {stack_shape} but its module name "
                             f"'{tmpl}' has {n} '{{}}' fields; one slice of a stacked weight is one torch module")
    return [(idx, tmpl.format(*idx)) for idx in np.ndindex(*stack_shape)]


# ----------------------------------------------------------------- orientation
def _embedding_swapped(lay: Layout, ndim: int, path: str) -> bool:
    """Whether an embedding's layout has its vocabulary axis as ``out`` rather than ``in``.

    PEFT's ``lora_embedding_A`` is ``(r, num_embeddings)`` and
    ``lora_embedding_B`` ``(embedding_dim, r)``. A Flax ``nn.Embed`` table is
    ``(num_embeddings, features)``, so the first non-stack axis is the
    vocabulary; a layout with ``in`` on the feature axes (e.g. a table also
    used through ``attend``) holds the factors the other way round.
    """
    vocab = next(k for k in range(ndim) if k not in lay.stack)
    if lay.inputs == (vocab,):
        return False
    if lay.outputs == (vocab,):
        return True
    raise LayoutError(f"'{path}' is exported as an embedding, which PEFT stores as lora_embedding_A "
                      f"(r, num_embeddings) and lora_embedding_B (embedding_dim, r): its vocabulary axis {vocab} "
                      f"must be the whole 'in' or the whole 'out' of its layout, got in={lay.inputs}, "
                      f"out={lay.outputs}")


def _to_torch(a: np.ndarray, b: np.ndarray, kind: str, n_in: int, path: str,
              swap: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """One slice ``a: in + (r,)``, ``b: (r,) + out`` as PEFT's ``(A, B)``."""
    r = a.shape[-1]
    if kind == "embedding" and swap:  # in is the feature axis: b holds the vocabulary side
        return b.reshape(r, -1), a.reshape(-1, r)
    if kind == "conv":
        if n_in < 2 or b.ndim != 2:
            raise LayoutError(f"'{path}' is not a convolution kernel (spatial + in, out) for kind='conv': "
                                 f"a {a.shape}, b {b.shape}")
        A = np.transpose(a, (n_in, n_in - 1) + tuple(range(n_in - 1)))  # (r, cin, *spatial)
        B = b.T.reshape(b.shape[1], r, *([1] * (n_in - 1)))
        return A, B
    return a.reshape(-1, r).T, b.reshape(r, -1).T


def _from_torch(A: np.ndarray, B: np.ndarray, sa: tuple, sb: tuple,
                swap: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """PEFT's ``(A, B)`` as one slice of ``a`` (shape ``sa``) and ``b`` (shape ``sb``)."""
    if swap:  # an embedding whose layout contracts the feature axis, see _embedding_swapped
        return B.reshape(sa), A.reshape(sb)
    if A.ndim > 2:  # convolution: A (r, cin, *spatial)
        n = A.ndim - 1
        a = np.transpose(A, tuple(range(2, n + 1)) + (1, 0))
        return a.reshape(sa), B.reshape(B.shape[0], B.shape[1]).T.reshape(sb)
    return A.T.reshape(sa), B.T.reshape(sb)


# ----------------------------------------------------------------- save
def _number(x: float):
    return int(x) if float(x).is_integer() else float(x)


def save_peft(directory: str | os.PathLike, tree: Any, name_map: NameMap = None, *,
              base_model_name_or_path: str | None = None, task_type: str | None = None,
              dtype: Any = None) -> Path:
    """Write the adapters of ``tree`` as a PEFT LoRA adapter directory.

    Writes ``adapter_config.json`` and ``adapter_model.safetensors`` (via
    safetensors' NumPy API; no torch needed). ``r``/``lora_alpha`` are the most
    common rank and alpha; other modules go to ``rank_pattern``/``alpha_pattern``.
    The safetensors header also records each weight's Flax path and layout
    (extra metadata PEFT ignores), so :func:`load_peft` restores our files
    exactly. Only LoRA weights are exported; fully trained leaves are not
    (use :func:`save_adapters` for those).

    Args:
      directory: the output directory (created; existing files of these names are replaced).
      tree: the LoRA tree.
      name_map: parameter path → torch module name: ``None`` (:func:`module_name`),
        a ``{path_regex: template}`` dict (see :func:`rename`), or a function
        of the path returning a name, a ``(name, kind)`` pair, or ``None``.
      base_model_name_or_path, task_type: copied into the config (PEFT uses
        them to find the base model and pick the model class).
      dtype: cast the tensors (e.g. ``jnp.float16``); default: as trained.

    Returns:
      The directory's absolute path.

    Raises:
      StructureError: a LoRA weight has no module name, two map to the same
        module, a stacked weight's template has the wrong number of ``{}``, or
        the tree mixes plain and rsLoRA scales (PEFT has one ``use_rslora``).
      LayoutError: ``name_map`` gave an unknown kind, ``kind="conv"`` for a
        weight that is not a convolution kernel, or an embedding whose
        vocabulary axis (its first non-stack axis) is not all of ``in`` or all of ``out``.

    Example:
        >>> import json, tempfile, jax.numpy as jnp, lorax_fn as lf
        >>> lp = lf.lorafy({"fc": {"kernel": jnp.ones((6, 4))}}, rank=2, alpha=4)
        >>> d = lf.save_peft(tempfile.mkdtemp(), lp)
        >>> cfg = json.loads((d / "adapter_config.json").read_text())
        >>> cfg["peft_type"], cfg["r"], cfg["lora_alpha"], cfg["target_modules"]
        ('LORA', 2, 4, ['fc'])
    """
    from safetensors.numpy import save_file

    flat, _ = leaves_with_paths(tree, is_leaf=is_lora)
    tensors, owners, record = {}, {}, []
    ranks, alphas, variants = {}, {}, set()
    for path, leaf in flat:
        if not is_lora(leaf):
            continue
        got = _resolve(name_map, path)
        if got is None:
            raise StructureError(f"name_map gives no module name for LoRA weight '{path}'")
        tmpl, kind = got
        lay = leaf.layout
        a, b = np.asarray(leaf.a), np.asarray(leaf.b)
        if dtype is not None:
            a, b = a.astype(dtype), b.astype(dtype)
        ns = len(lay.stack)
        swap = kind == "embedding" and _embedding_swapped(lay, len(leaf.shape), path)
        # a and b hold the stack axes first, wherever they sit in the base weight
        for idx, name in _modules(tmpl, path, a.shape[:ns]):
            if name in owners:
                raise StructureError(f"'{path}' and '{owners[name]}' both map to module '{name}'")
            owners[name] = path
            A, B = _to_torch(a[idx], b[idx], kind, len(lay.inputs), path, swap)
            keys = ("lora_embedding_A", "lora_embedding_B") if kind == "embedding" else ("lora_A.weight",
                                                                                        "lora_B.weight")
            tensors[f"{PREFIX}{name}.{keys[0]}"] = np.ascontiguousarray(A)
            tensors[f"{PREFIX}{name}.{keys[1]}"] = np.ascontiguousarray(B)
            ranks[name], alphas[name] = leaf.rank, leaf.alpha
        variants.add(leaf.variant)
        record.append({"path": path, "module": tmpl, "kind": kind,
                       "layout": [list(lay.stack), list(lay.inputs), list(lay.outputs)]})
    if not tensors:
        raise StructureError("the tree has no LoRA weights to export")
    if len(variants) > 1:
        raise StructureError(f"PEFT has one use_rslora flag for all modules; the tree mixes {sorted(variants)}")
    r = collections.Counter(ranks.values()).most_common(1)[0][0]
    alpha = collections.Counter(alphas[n] for n in ranks if ranks[n] == r).most_common(1)[0][0]
    config = {
        "peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": base_model_name_or_path,
        "revision": None, "inference_mode": True, "r": r, "lora_alpha": _number(alpha),
        "lora_dropout": 0.0, "target_modules": sorted(ranks), "fan_in_fan_out": False, "bias": "none",
        "use_rslora": variants == {"rslora"}, "modules_to_save": None, "init_lora_weights": True,
        "layers_to_transform": None, "layers_pattern": None,
        # PEFT matches pattern keys as regexes against module names: escape the dots
        "rank_pattern": {re.escape(n): k for n, k in sorted(ranks.items()) if k != r},
        "alpha_pattern": {re.escape(n): _number(v) for n, v in sorted(alphas.items()) if v != alpha},
        "use_dora": False,
    }
    out = Path(directory).expanduser().absolute()
    out.mkdir(parents=True, exist_ok=True)
    # Write under temporary names, fsync, then rename, so a crash never leaves a half-written file under the
    # real name. The two renames are not one atomic step: the weights' header records a checksum of the
    # config they were written with, so load_peft refuses new weights next to an old config (or the reverse).
    # The directory itself is not swapped, because adapter directories often hold other files (README,
    # tokenizer) that must survive a re-save.
    tmp_w, tmp_c = out / (WEIGHTS_FILE + ".tmp"), out / (CONFIG_FILE + ".tmp")
    save_file(tensors, str(tmp_w), metadata={"format": "pt", "lorax_fn": json.dumps(record),
                                             CONFIG_CRC_KEY: str(_config_crc(config))})
    tmp_c.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for f in (tmp_w, tmp_c):
        _fsync(f)
    os.replace(tmp_w, out / WEIGHTS_FILE)
    os.replace(tmp_c, out / CONFIG_FILE)
    _fsync(out)
    return out


def _fsync(path: Path) -> None:
    """Flush a file (or a directory's entries) to disk; a no-op where the OS cannot open directories."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _config_crc(config: Mapping) -> int:
    """CRC-32 of the config fields load_peft reads, as canonical JSON."""
    bound = {k: config.get(k) for k in _BOUND_FIELDS}
    return zlib.crc32(json.dumps(bound, sort_keys=True, separators=(",", ":")).encode())


# ----------------------------------------------------------------- load
def _read(directory: Path) -> tuple[dict, dict, dict]:
    from safetensors import safe_open

    cfg_path, w_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    if not cfg_path.is_file():
        raise CheckpointError(f"no {CONFIG_FILE} in '{directory}'")
    if not w_path.is_file():
        other = " (only adapter_model.bin, a torch pickle, is there; convert it to safetensors)" \
            if (directory / "adapter_model.bin").exists() else ""
        raise CheckpointError(f"no {WEIGHTS_FILE} in '{directory}'{other}")
    try:
        config = json.loads(cfg_path.read_text())
    except (ValueError, OSError) as err:
        raise CheckpointError(f"cannot read '{cfg_path}': {err}") from err
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise CheckpointError(f"'{cfg_path}' is not a LoRA adapter config "
                              f"(peft_type={config.get('peft_type') if isinstance(config, dict) else None!r})")
    for k, kind in (("r", int), ("lora_alpha", (int, float))):
        if not isinstance(config.get(k), kind):
            raise CheckpointError(f"'{cfg_path}': field '{k}' is missing or not a number")
    if config.get("use_dora"):
        raise CheckpointError(f"'{cfg_path}' is a DoRA adapter (use_dora=true), which load_peft does not read")
    try:
        with safe_open(str(w_path), "np") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors raises its own error types for damaged headers and short files
        raise CheckpointError(f"cannot read '{w_path}': {err}") from err
    return config, tensors, meta


def _group(tensors: dict, where: str) -> dict[str, dict]:
    """``{module: {"A": array, "B": array, "kind": ...}}``; unknown keys are an error, not skipped."""
    out: dict[str, dict] = {}
    for key, x in tensors.items():
        hit = next(((s, v) for s, v in _SUFFIXES.items() if key.endswith(s)), None)
        if hit is None or not key.startswith(PREFIX):
            raise CheckpointError(f"{where}: tensor '{key}' is not a LoRA A/B weight under '{PREFIX}' "
                                  "(biases, modules_to_save and other PEFT methods are not read)")
        suffix, (kind, which) = hit
        mod = out.setdefault(key[len(PREFIX):-len(suffix)], {"kind": kind})
        mod[which] = x
    for name, mod in out.items():
        if "A" not in mod or "B" not in mod:
            raise CheckpointError(f"{where}: module '{name}' has only lora_{'A' if 'A' in mod else 'B'}")
    return out


def _pattern_value(patterns: Mapping[str, Any], name: str, default):
    for pat, v in (patterns or {}).items():
        if re.fullmatch(rf"(?:.*\.)?(?:{pat})", name):
            return v
    return default


def _infer_layout(shape: tuple, ns: int, A: np.ndarray, B: np.ndarray, path: str) -> Layout:
    """Axes of a base weight from PEFT's flat ``(r, in)``/``(out, r)``: ``in`` leads, ``out`` follows."""
    rest = list(range(ns, len(shape)))
    if A.ndim > 2:  # convolution: everything but the output channel is contracted
        return Layout(tuple(range(ns)), tuple(rest[:-1]), (rest[-1],))
    n_in, n_out = A.shape[1], B.shape[0]
    for k in range(1, len(rest)):
        if math.prod(shape[i] for i in rest[:k]) == n_in and math.prod(shape[i] for i in rest[k:]) == n_out:
            return Layout(tuple(range(ns)), tuple(rest[:k]), tuple(rest[k:]))
    raise StructureError(f"'{path}' of shape {shape} cannot hold lora_A {A.shape} and lora_B {B.shape} "
                         f"(in {n_in}, out {n_out}); pass layout= if its axes are not (stack, in, out) in order")


def load_peft(directory: str | os.PathLike, base: Any, name_map: NameMap = None, *,
              layout: LayoutSpec = None, dtype: Any = None) -> Any:
    """Read a PEFT LoRA adapter directory onto ``base``.

    Every tensor in the file must find its base weight through ``name_map``
    (unmatched modules are an error, never dropped). The layout of each
    weight comes from ``layout=``, else from the LoRA leaf of ``base`` at that
    path, else from the metadata :func:`save_peft` records, else from the shapes (``in`` axes first, then ``out``; a
    convolution contracts all but its last axis).

    Args:
      directory: a directory with ``adapter_config.json`` and ``adapter_model.safetensors``.
      base: the dense params, or a LoRA tree (whose ``w`` and layouts are
        used; the file must hold an adapter for each of its LoRA weights).
      name_map: as in :func:`save_peft`.
      layout: explicit layouts, in the forms :func:`lorafy` takes.
      dtype: cast ``a``/``b``; default: the stored dtype.

    Returns:
      ``base`` with a :class:`LoraWeight` at every adapted path.

    Raises:
      CheckpointError: missing or unreadable files, not a LoRA config, an
        unsupported tensor, a module whose rank differs from the config, or a
        config that is not the one :func:`save_peft` wrote with these weights.
      StructureError: a module has no base weight or maps to two, a shape does
        not fit (the message names the path and both shapes), a stacked weight
        misses slices, or a LoRA ``base`` has adapters the file does not have.

    Example:
        >>> import tempfile, jax.numpy as jnp, lorax_fn as lf
        >>> params = {"fc": {"kernel": jnp.ones((6, 4))}}
        >>> d = lf.save_peft(tempfile.mkdtemp(), lf.lorafy(params, rank=2))
        >>> lf.load_peft(d, params)["fc"]["kernel"]
        LoraWeight(shape=(6, 4), dtype=float32, rank=2, alpha=2, in=(0,), out=(1,))
    """
    where = str(Path(directory).expanduser().absolute())
    config, tensors, meta = _read(Path(where))
    modules = _group(tensors, where)
    try:
        recorded = {e["path"]: e for e in json.loads(meta.get("lorax_fn", "[]"))}
    except (ValueError, TypeError, KeyError):
        recorded = {}
    variant = "rslora" if config.get("use_rslora") else "lora"
    flat, treedef = leaves_with_paths(base, is_leaf=is_lora)
    # owner: module -> the path it went to, so one module never fills two weights (a sloppy name_map)
    leaves, owner, filled = [x for _, x in flat], {}, set()
    for i, (path, leaf) in enumerate(flat):
        got = _resolve(name_map, path)
        if got is None:
            continue
        w = leaf.w if is_lora(leaf) else leaf
        shape = tuple(np.shape(w))
        tmpl = got[0]
        ns = _fields(tmpl)
        if ns > len(shape):
            continue
        # what is known about the axes, before any guess from the shapes: the caller's layout=, the
        # template leaf's own layout, then what save_peft recorded
        lay = _user_layout(layout, path, w)
        if lay is None and is_lora(leaf):
            lay = leaf.layout
        if lay is None and path in recorded:
            lay = Layout(*(tuple(g) for g in recorded[path]["layout"]))
        stack_shape, fits = shape[:ns], True  # without a layout: leading stack axes, one per '{}' field
        if lay is not None:
            try:
                lay = lay.check(shape, path)
                stack_shape = tuple(shape[k] for k in lay.stack)
            except LayoutError:
                fits = False
        fits = fits and len(stack_shape) == ns
        # a layout that does not fit (e.g. one layout= for every leaf) matters only for leaves in the file
        if not any(n in modules for _, n in _modules(tmpl, path, stack_shape if fits else shape[:ns])):
            continue
        if not fits:
            lay = lay.check(shape, path)  # raises LayoutError if it does not fit the weight
            _modules(tmpl, path, tuple(shape[k] for k in lay.stack))  # raises: '{}' fields vs stack axes
        slices = _modules(tmpl, path, stack_shape)
        if not jnp.issubdtype(jnp.result_type(w), jnp.floating):
            raise StructureError(f"{where}: the file has an adapter for '{path}', which is "
                                 f"{jnp.result_type(w)}, not floating point")
        missing = [n for _, n in slices if n not in modules]
        if missing:
            raise StructureError(f"{where}: '{path}' is stacked over {stack_shape} but modules {missing[:3]} "
                                 "are not in the file")
        first = modules[slices[0][1]]
        if lay is None:
            lay = _infer_layout(shape, ns, first["A"], first["B"], path).check(shape, path)
        swap = first["kind"] == "embedding" and _embedding_swapped(lay, len(shape), path)
        rank = int(first["A"].shape[0])
        sa, sb = factor_shapes(shape, lay, rank)
        a = np.empty(sa, first["A"].dtype)
        b = np.empty(sb, first["B"].dtype)
        alpha = None
        for idx, name in slices:
            if name in owner:
                raise StructureError(f"{where}: module '{name}' maps to both '{owner[name]}' and '{path}'; "
                                     "name_map must give each base weight its own module")
            owner[name] = path
            mod = modules[name]
            want_r = _pattern_value(config.get("rank_pattern"), name, config["r"])
            if mod["A"].shape[0] != want_r or mod["B"].shape[1] != want_r:
                raise CheckpointError(f"{where}: module '{name}' ('{path}') has lora_A {mod['A'].shape} and lora_B "
                                      f"{mod['B'].shape}, but the config gives it rank {want_r}")
            if mod["A"].shape[0] != rank:
                raise StructureError(f"{where}: slices of stacked '{path}' have different ranks")
            try:
                # a and b hold the stack axes first, wherever they sit in the base weight
                a[idx], b[idx] = _from_torch(mod["A"], mod["B"], sa[len(idx):], sb[len(idx):], swap)
            except ValueError:
                raise StructureError(f"{where}: module '{name}' (lora_A {mod['A'].shape}, lora_B {mod['B'].shape}) "
                                     f"does not fit '{path}' of shape {shape}: it needs a {sa[ns:]} and "
                                     f"b {sb[ns:]}") from None
            alpha_i = _pattern_value(config.get("alpha_pattern"), name, config["lora_alpha"])
            if alpha is not None and alpha_i != alpha:
                raise StructureError(f"{where}: slices of stacked '{path}' have different alphas")
            alpha = alpha_i
        a, b = jnp.asarray(a), jnp.asarray(b)
        if dtype is not None:
            a, b = a.astype(dtype), b.astype(dtype)
        leaves[i] = LoraWeight(w, a, b, rank=rank, alpha=float(alpha), layout=lay, variant=variant)
        filled.add(i)
    unclaimed = sorted(set(modules) - set(owner))
    if unclaimed:
        raise StructureError(f"{where}: no base weight maps to modules {unclaimed[:5]}; check name_map "
                             "(it must give these names for the base's paths)")
    # a LoRA template's adapters that the file does not replace would otherwise come back unchanged
    stale = [p for j, (p, x) in enumerate(flat) if is_lora(x) and j not in filled]
    if stale:
        raise StructureError(f"{where}: the given tree has adapters the file does not have: "
                             + ", ".join(f"'{p}'" for p in stale[:5]) + "; pass the dense base, or check name_map")
    # last, so the specific checks above name a problem first: new weights next to an old config (a save_peft
    # interrupted between its two renames) or an edited r/alpha would otherwise load with the wrong scale
    want = meta.get(CONFIG_CRC_KEY)
    if want is not None and want != str(_config_crc(config)):
        raise CheckpointError(f"{where}: {CONFIG_FILE} is not the config {WEIGHTS_FILE} was saved with (its "
                              "r/alpha/rank_pattern/alpha_pattern/use_rslora fields changed, e.g. by a save_peft "
                              "interrupted between writing the two files); save the adapter again")
    return jax.tree_util.tree_unflatten(treedef, leaves)
