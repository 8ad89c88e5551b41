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
import errno
import json
import math
import os
import re
import secrets
import stat
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
from .peft_patterns import _Budget, _compile_key, _PatternTable, _suffixes
from .kinds.dora import DoraWeight
from .kinds.full import FullWeight
from .kinds.lora import LoraWeight
from .weight import Layout, factor_shapes, is_lora

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
KINDS = ("linear", "embedding", "conv")
MAGNITUDE = "lora_magnitude_vector"  # DoRA's m, one per output unit; PEFT saves it without a ".weight"
_SUFFIXES = {".lora_A.weight": ("matrix", "A"), ".lora_B.weight": ("matrix", "B"), "." + MAGNITUDE: ("matrix", "M"),
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


# a fully trained leaf's last path component → the torch parameter it is
_TORCH_PARAM = {"kernel": "weight", "embedding": "weight", "scale": "weight", "weight": "weight", "bias": "bias"}


def _full_name(name_map: NameMap, path: str) -> str | None:
    """The torch parameter name of a fully trained leaf (PEFT's ``modules_to_save``).

    The default keeps the module path and maps the last component
    (``head/kernel`` → ``head.weight``, ``ln/scale`` → ``ln.weight``,
    ``head/bias`` → ``head.bias``); a given ``name_map`` returns the whole
    parameter name for such a path (e.g. ``{"head/kernel": "lm_head.weight"}``).
    """
    if name_map is None:
        parts = path.split("/")
        if len(parts) < 2 or parts[-1] not in _TORCH_PARAM:
            return None
        return ".".join(parts[:-1] + [_TORCH_PARAM[parts[-1]]])
    got = rename(name_map)(path) if isinstance(name_map, Mapping) else name_map(path)
    return got if got is None or isinstance(got, str) else got[0]


def _full_to_torch(path: str, x: np.ndarray) -> np.ndarray:
    """A Flax ``kernel`` (in, out) is torch's ``weight`` (out, in); other parameters keep their layout."""
    if path.rsplit("/", 1)[-1] != "kernel":
        return x
    if x.ndim != 2:
        raise StructureError(f"fully trained kernel '{path}' has shape {x.shape}; PEFT's modules_to_save export "
                             "here covers 2-D kernels, biases, norms and embeddings (use lf.save_adapters)")
    return x.T


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
    exactly. LoRA and DoRA weights are exported (DoRA on linear modules, with
    ``use_dora`` and each module's ``lora_magnitude_vector``), and fully
    trained leaves (``lorafy(trainable=...)``) as PEFT's ``modules_to_save``:
    the tensor under its torch name (``head/kernel`` → ``head.weight``,
    transposed; ``ln/scale`` → ``ln.weight``; ``head/bias`` → ``head.bias``;
    a given ``name_map`` returns the whole parameter name for such a path).
    MoRA, which PEFT does not have, is refused (use :func:`save_adapters`).

    Args:
      directory: the output directory (created; existing files of these names are replaced, other
        files are left alone). It may be a symbolic link to a directory, but a link at
        ``adapter_config.json`` or ``adapter_model.safetensors`` inside is refused, never written through.
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
      CheckpointError: the directory cannot be created or written, or one of the two file names in it is
        a symbolic link or not a regular file (nothing is written then; a failed write leaves no temporaries).
      StructureError: a LoRA weight has no module name, two map to the same
        module, a stacked weight's template has the wrong number of ``{}``, or
        the tree mixes plain and rsLoRA scales (PEFT has one ``use_rslora``) or
        LoRA and DoRA (one ``use_dora``), or holds a kind PEFT cannot express
        (MoRA, fully trained leaves, DoRA on an embedding or convolution).
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
    from safetensors.numpy import save

    flat, _ = leaves_with_paths(tree, is_leaf=is_lora)
    tensors, owners, record = {}, {}, []
    ranks, alphas, variants, kinds_seen = {}, {}, set(), set()
    full_names = []
    for path, leaf in flat:
        if not is_lora(leaf):
            continue
        if leaf.kind == "full":  # PEFT's modules_to_save: the tensor itself, under its torch name
            name = _full_name(name_map, path)
            if name is None:
                raise StructureError(f"name_map gives no torch parameter name for fully trained leaf '{path}'")
            t = _full_to_torch(path, np.asarray(leaf.w))
            key = f"{PREFIX}{name}"
            if key in tensors:
                raise StructureError(f"'{path}' and another leaf both map to '{name}'")
            tensors[key] = np.ascontiguousarray(t if dtype is None else t.astype(dtype))
            full_names.append(name)
            record.append({"path": path, "full": name})
            continue
        if leaf.kind not in ("lora", "dora"):
            why = {"mora": "PEFT has no MoRA"}.get(
                leaf.kind, "this writer handles LoRA and DoRA only")
            raise StructureError(f"'{path}' is a {type(leaf).__name__} ({leaf.kind} adapter): {why}; save the "
                                 "tree with lf.save_adapters, our own format, which stores every kind")
        got = _resolve(name_map, path)
        if got is None:
            raise StructureError(f"name_map gives no module name for LoRA weight '{path}'")
        tmpl, kind = got
        lay = leaf.layout
        a, b = np.asarray(leaf.a), np.asarray(leaf.b)
        mag = np.asarray(leaf.m) if leaf.kind == "dora" else None
        if mag is not None and kind != "linear":
            raise StructureError(f"'{path}' is a DoRA weight exported as a {kind} module; PEFT's DoRA magnitude "
                                 "for that is laid out differently, and this writer exports DoRA on linear "
                                 "modules only (save the tree with lf.save_adapters)")
        if dtype is not None:
            a, b = a.astype(dtype), b.astype(dtype)
            mag = None if mag is None else mag.astype(dtype)
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
            if mag is not None:  # one norm per output unit, out axes flattened like lora_B's rows
                tensors[f"{PREFIX}{name}.{MAGNITUDE}"] = np.ascontiguousarray(mag[idx].reshape(-1))
            ranks[name], alphas[name] = leaf.rank, leaf.alpha
        variants.add(leaf.variant)
        kinds_seen.add(leaf.kind)
        record.append({"path": path, "module": tmpl, "kind": kind,
                       "layout": [list(lay.stack), list(lay.inputs), list(lay.outputs)]})
    if not ranks:
        raise StructureError("the tree has no LoRA weights to export")
    if len(variants) > 1:
        raise StructureError(f"PEFT has one use_rslora flag for all modules; the tree mixes {sorted(variants)}")
    if len(kinds_seen) > 1:
        raise StructureError("PEFT has one use_dora flag for all modules; the tree mixes LoRA and DoRA weights")
    r = collections.Counter(ranks.values()).most_common(1)[0][0]
    alpha = collections.Counter(alphas[n] for n in ranks if ranks[n] == r).most_common(1)[0][0]
    config = {
        "peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": base_model_name_or_path,
        "revision": None, "inference_mode": True, "r": r, "lora_alpha": _number(alpha),
        "lora_dropout": 0.0, "target_modules": sorted(ranks), "fan_in_fan_out": False, "bias": "none",
        "use_rslora": variants == {"rslora"},
        "modules_to_save": sorted({n.rsplit(".", 1)[0] for n in full_names}) or None, "init_lora_weights": True,
        "layers_to_transform": None, "layers_pattern": None,
        # PEFT matches pattern keys as regexes against module names: escape the dots
        "rank_pattern": {re.escape(n): k for n, k in sorted(ranks.items()) if k != r},
        "alpha_pattern": {re.escape(n): _number(v) for n, v in sorted(alphas.items()) if v != alpha},
        "use_dora": kinds_seen == {"dora"},
    }
    out = Path(directory).expanduser().absolute()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CheckpointError(f"cannot create the directory '{out}': {err}") from err
    # A directory the user named may itself be a link (a scratch disk mounted elsewhere), but a link at one of
    # the file names inside would make the save write wherever it points: refuse before writing anything.
    for name in (WEIGHTS_FILE, CONFIG_FILE):
        _check_final_name(out / name)
    weights = save(tensors, metadata={"format": "pt", "lorax_fn": json.dumps(record),
                                      CONFIG_CRC_KEY: str(_config_crc(config))})
    text = (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()
    # Write under fresh temporary names (created exclusively, so a planted file or link there is never
    # followed), fsync, then rename, so a crash never leaves a half-written file under the real name. The two
    # renames are not one atomic step: the weights' header records a checksum of the config they were
    # written with, so load_peft refuses new weights next to an old config (or the reverse). The directory
    # itself is not swapped, because adapter directories often hold other files (README, tokenizer) that
    # must survive a re-save.
    pending: list[Path] = []
    try:
        tmp_w = _write_exclusive(out, WEIGHTS_FILE, weights, pending)
        tmp_c = _write_exclusive(out, CONFIG_FILE, text, pending)
        os.replace(tmp_w, out / WEIGHTS_FILE)
        pending.remove(tmp_w)
        os.replace(tmp_c, out / CONFIG_FILE)
        pending.remove(tmp_c)
    except OSError as err:
        raise CheckpointError(f"cannot write the PEFT adapter in '{out}': {err}") from err
    finally:
        for tmp in pending:  # also on KeyboardInterrupt: no stray temporaries
            try:
                os.unlink(tmp)
            except OSError:
                pass
    _fsync_dir(out)
    return out


def _check_final_name(path: Path) -> None:
    """Refuse a final file name that is a symbolic link or not a regular file (``os.replace`` would drop it)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as err:
        raise CheckpointError(f"cannot check '{path}': {err}") from err
    if stat.S_ISLNK(st.st_mode):
        raise CheckpointError(f"'{path}' is a symbolic link; save_peft never writes through links. Remove it "
                              "(the file it points to is left alone) or save to another directory")
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"'{path}' exists and is not a regular file; remove it or save to another directory")


_EXCLUSIVE = (os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
              | getattr(os, "O_BINARY", 0))


def _write_exclusive(directory: Path, final: str, data: bytes, pending: list[Path]) -> Path:
    """Write ``data`` to a new, uniquely named hidden file in ``directory``, fsynced; returns its path.

    ``O_EXCL`` (with ``O_NOFOLLOW``) means the file is always one this call created, never an existing file
    or link; the path is added to ``pending`` as soon as it exists so the caller can remove it on failure.
    """
    for _ in range(100):
        tmp = directory / f".{final}.{secrets.token_hex(8)}.tmp"
        try:
            fd = os.open(tmp, _EXCLUSIVE, 0o666)  # 0o666 less the umask, like any file the user writes
        except FileExistsError:
            continue
        pending.append(tmp)
        with open(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        return tmp
    raise CheckpointError(f"could not create a temporary file in '{directory}' (100 names taken)")


def _fsync_dir(path: Path) -> None:
    """Flush a directory's entries to disk; a no-op where the OS cannot open directories."""
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
_MAX_CONFIG_BYTES = 4 << 20  # real configs are a few KiB; the bound keeps a hostile one from being parsed
_MAX_RANK = 1 << 20
_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


def _rank_value(value: Any, what: str, where: str) -> int:
    if type(value) is not int or not 1 <= value <= _MAX_RANK:
        raise CheckpointError(f"'{where}': {what} is {value!r}; a rank must be a whole number from 1 to "
                              f"{_MAX_RANK}")
    return value


def _alpha_value(value: Any, what: str, where: str) -> float:
    try:
        ok = not isinstance(value, bool) and isinstance(value, (int, float)) and 0 < float(value) < math.inf
    except OverflowError:
        ok = False
    if not ok:
        raise CheckpointError(f"'{where}': {what} is {value!r}; an alpha must be a finite number above 0")
    return float(value)


def _regular_file(path: Path, directory: Path, what: str) -> Path:
    """The file to read for ``path``: itself when it is a regular file; CheckpointError when it is missing, not a
    regular file, or a symbolic link (it could point anywhere).

    The one kind of link followed is the Hugging Face cache's own, to ``<cache>/models--…/blobs/<hash>`` (what
    ``snapshot_download`` and older ``local_dir=`` downloads make), so those directories load; the blob is returned.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        other = " (only adapter_model.bin, a torch pickle, is there; convert it to safetensors)" \
            if what == WEIGHTS_FILE and (directory / "adapter_model.bin").exists() else ""
        raise CheckpointError(f"no {what} in '{directory}'{other}") from None
    except OSError as err:
        raise CheckpointError(f"cannot read '{path}': {err}") from err
    if stat.S_ISLNK(st.st_mode):
        blob = _cache_blob(path)
        if blob is not None:
            return blob
        raise CheckpointError(f"'{path}' is a symbolic link; load_peft reads only regular files in the adapter "
                              "directory (copy the file there, e.g. with cp -L, or download with local_dir=)")
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"'{path}' is not a regular file")
    return path


def _cache_blob(link: Path) -> Path | None:
    """The file a link points to if it is a blob of the Hugging Face cache, else None.

    The cache keeps each file once, as ``<cache>/models--<org>--<name>/blobs/<hash>``; snapshot folders and
    older ``local_dir=`` downloads hold links to those blobs.
    """
    target = Path(os.path.realpath(link))
    blobs = target.parent
    if blobs.name != "blobs" or not blobs.parent.name.startswith(("models--", "datasets--", "spaces--")):
        return None
    try:
        return target if stat.S_ISREG(os.lstat(target).st_mode) else None
    except OSError:
        return None


def _read_json(path: Path) -> Any:
    """The JSON in ``path``, a regular file (not a link) of at most a few MiB; any problem is a CheckpointError."""
    # O_NOFOLLOW: a link swapped in after any earlier check still fails; O_NONBLOCK: a FIFO cannot hang the open
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
        with open(fd, "rb") as fh:
            if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
                raise CheckpointError(f"'{path}' is not a regular file")
            raw = fh.read(_MAX_CONFIG_BYTES + 1)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise CheckpointError(f"'{path}' is a symbolic link; only regular files are read") from None
        raise CheckpointError(f"cannot read '{path}': {err}") from err
    if len(raw) > _MAX_CONFIG_BYTES:
        raise CheckpointError(f"'{path}' is larger than {_MAX_CONFIG_BYTES >> 20} MiB; an adapter config is a "
                              "few KiB")
    try:
        config = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as err:  # RecursionError: nesting deeper than the parser's stack
        kind = "nested too deeply" if isinstance(err, RecursionError) else str(err)
        raise CheckpointError(f"cannot read '{path}': {kind}") from None
    return config


def _read_config(path: Path) -> dict:
    """The LoRA adapter config in ``path`` (see :func:`_read_json`)."""
    config = _read_json(path)
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise CheckpointError(f"'{path}' is not a LoRA adapter config "
                              f"(peft_type={config.get('peft_type') if isinstance(config, dict) else None!r})")
    return config


class _Config:
    """The fields of ``adapter_config.json`` load_peft uses, each checked before any tensor is read."""

    def __init__(self, config: dict, where: str):
        for flag in ("use_dora", "use_rslora"):
            if config.get(flag) not in (None, True, False):
                raise CheckpointError(f"'{where}': field '{flag}' is {config.get(flag)!r}, not true or false")
        self.dora = bool(config.get("use_dora"))
        saved = config.get("modules_to_save")
        if saved is not None and not (isinstance(saved, list) and all(isinstance(m, str) for m in saved)):
            raise CheckpointError(f"'{where}': field 'modules_to_save' is {_short(saved)}; expected a list of "
                                  "module names")
        self.modules_to_save = tuple(saved or ())
        self.budget = _Budget(where)  # for building and running every key's automaton
        self.r = _rank_value(config.get("r"), "field 'r'", where)
        self.alpha = _alpha_value(config.get("lora_alpha"), "field 'lora_alpha'", where)
        self.variant = "rslora" if config.get("use_rslora") else "lora"
        self.ranks = _PatternTable("rank_pattern", config.get("rank_pattern"),
                                   lambda v, what: _rank_value(v, what, where), where, self.budget)
        self.alphas = _PatternTable("alpha_pattern", config.get("alpha_pattern"),
                                    lambda v, what: _alpha_value(v, what, where), where, self.budget)
        targets = config.get("target_modules")
        # PEFT: a list names modules by dotted suffix; a string is a regex the whole name must match
        self.target_regex = self.target_names = None
        if isinstance(targets, str) and targets != "all-linear":
            self.target_regex = _compile_key(targets, False, "target_modules", where, self.budget)
        elif isinstance(targets, list) and all(isinstance(t, str) for t in targets):
            self.target_names = frozenset(targets)
        elif targets not in (None, "all-linear"):
            raise CheckpointError(f"'{where}': field 'target_modules' is {type(targets).__name__}; expected a "
                                  "list of module names or a regex string")

    def targets(self, name: str) -> bool:
        """Whether ``target_modules`` covers a module (``True`` when the config leaves it out)."""
        if self.target_regex is not None:
            return self.target_regex.matches(name, self.budget)
        if self.target_names is not None:
            return any(s in self.target_names for s in _suffixes(name))
        return True


def _read(directory: Path) -> tuple[dict, _Config, dict, dict]:
    """Config, checked config, ``{key: (shape, dtype)}`` from the safetensors header, and its metadata."""
    from safetensors import safe_open

    cfg_path = _regular_file(directory / CONFIG_FILE, directory, CONFIG_FILE)
    w_path = _regular_file(directory / WEIGHTS_FILE, directory, WEIGHTS_FILE)
    config = _read_config(cfg_path)
    checked = _Config(config, str(cfg_path))
    try:  # only the header: shapes and dtypes are checked against the config and the base before any data
        with safe_open(str(w_path), "np") as f:
            meta = f.metadata() or {}
            header = {}
            for k in f.keys():
                sl = f.get_slice(k)
                header[k] = (tuple(int(n) for n in sl.get_shape()), sl.get_dtype())
    except Exception as err:  # safetensors raises its own error types for damaged headers and short files
        raise CheckpointError(f"cannot read '{w_path}': {err}") from err
    for k, (_, dt) in header.items():
        if dt not in _FLOAT_DTYPES:
            raise CheckpointError(f"'{w_path}': tensor '{k}' is {dt}; LoRA factors are floating point "
                                  f"({', '.join(_FLOAT_DTYPES)})")
    return config, checked, header, meta


def _saved_module(key: str, cfg: "_Config") -> bool:
    """Whether a tensor key is a parameter of a module the config lists in ``modules_to_save``."""
    if not key.startswith(PREFIX) or "." not in key[len(PREFIX):]:
        return False
    module = key[len(PREFIX):].rsplit(".", 1)[0]
    return any(module == m or module.endswith("." + m) for m in cfg.modules_to_save)


def _group(header: dict, where: str, cfg: "_Config") -> tuple[dict[str, dict], dict[str, tuple]]:
    """``{module: {"A": shape, "B": shape, "keys": {...}, "kind": ...}}`` and ``{name: shape}`` of the
    ``modules_to_save`` tensors; unknown keys are an error, not skipped."""
    out: dict[str, dict] = {}
    full: dict[str, tuple] = {}
    for key, (shape, _) in header.items():
        hit = next(((s, v) for s, v in _SUFFIXES.items() if key.endswith(s)), None)
        if hit is None and _saved_module(key, cfg):
            full[key[len(PREFIX):]] = shape
            continue
        if hit is None or not key.startswith(PREFIX):
            raise CheckpointError(f"{where}: tensor '{key}' is not a LoRA A/B weight under '{PREFIX}' "
                                  "or a parameter of a module in the config's modules_to_save (other PEFT methods "
                                  "are not read)")
        suffix, (kind, which) = hit
        mod = out.setdefault(key[len(PREFIX):-len(suffix)], {"kind": None, "keys": {}})
        if which != "M":
            mod["kind"] = kind
        mod[which], mod["keys"][which] = shape, key
    for name, mod in out.items():
        if "A" not in mod or "B" not in mod:
            have = "lora_A" if "A" in mod else ("lora_B" if "B" in mod else MAGNITUDE)
            raise CheckpointError(f"{where}: module '{name}' has only {have}")
        A, B = mod["A"], mod["B"]
        conv = mod["kind"] == "matrix" and len(A) > 2
        if len(A) < 2 or len(B) != len(A) or (mod["kind"] == "embedding" and len(A) != 2) \
                or (conv and any(n != 1 for n in B[2:])):
            raise CheckpointError(f"{where}: module '{name}' has lora_A {A} and lora_B {B}; PEFT's are (r, in) "
                                  "and (out, r), or (r, in, *kernel) and (out, r, 1, ...) for a convolution")
        if "M" in mod and (mod["kind"] != "matrix" or len(A) != 2 or mod["M"] != (B[0],)):
            raise CheckpointError(f"{where}: module '{name}' has {MAGNITUDE} {mod['M']} with lora_A {A} and "
                                  f"lora_B {B}; this reader takes DoRA on linear modules, magnitude (out,)")
    return out, full


def _infer_layout(shape: tuple, ns: int, A: tuple, B: tuple, path: str) -> Layout:
    """Axes of a base weight from PEFT's flat ``(r, in)``/``(out, r)`` shapes: ``in`` leads, ``out`` follows."""
    rest = list(range(ns, len(shape)))
    if len(A) > 2:  # convolution: everything but the output channel is contracted
        return Layout(tuple(range(ns)), tuple(rest[:-1]), (rest[-1],))
    n_in, n_out = A[1], B[0]
    for k in range(1, len(rest)):
        if math.prod(shape[i] for i in rest[:k]) == n_in and math.prod(shape[i] for i in rest[k:]) == n_out:
            return Layout(tuple(range(ns)), tuple(rest[:k]), tuple(rest[k:]))
    raise StructureError(f"'{path}' of shape {shape} cannot hold lora_A {A} and lora_B {B} "
                         f"(in {n_in}, out {n_out}); pass layout= if its axes are not (stack, in, out) in order")


def load_peft(directory: str | os.PathLike, base: Any, name_map: NameMap = None, *,
              layout: LayoutSpec = None, dtype: Any = None) -> Any:
    """Read a PEFT LoRA adapter directory onto ``base``.

    Every tensor in the file must find its base weight through ``name_map``
    (unmatched modules are an error, never dropped). The layout of each
    weight comes from ``layout=``, else from the LoRA leaf of ``base`` at that
    path, else from the metadata :func:`save_peft` records, else from the shapes (``in`` axes first, then ``out``; a
    convolution contracts all but its last axis).

    The files are treated as untrusted: both must be regular files (not
    symbolic links), the config is checked (ranks, finite positive alphas,
    ``target_modules`` covering every module, ``rank_pattern``/``alpha_pattern``
    keys matched as PEFT does but without a backtracking regex engine), and
    every tensor's shape and dtype are checked against the config and the base
    from the safetensors header before any tensor data is read.

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
      CheckpointError: missing, linked or unreadable files, not a LoRA config,
        a field of the wrong type or out of range, a pattern key that is not a
        valid regex or outside the subset evaluated (nested repeats,
        backreferences, lookarounds), an unsupported or non-float tensor, a
        module whose rank differs from the config or that ``target_modules``
        does not name, or a config that is not the one :func:`save_peft`
        wrote with these weights.
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
    config, cfg, header, meta = _read(Path(where))
    modules, full = _group(header, where, cfg)
    with_m = sorted(n for n, mod in modules.items() if "M" in mod)
    if cfg.dora and len(with_m) != len(modules):
        raise CheckpointError(f"{where}: the config says use_dora (a DoRA adapter), but modules "
                              f"{sorted(set(modules) - set(with_m))[:5]} have no {MAGNITUDE}")
    if not cfg.dora and with_m:
        raise CheckpointError(f"{where}: modules {with_m[:5]} have a DoRA {MAGNITUDE} but the config's use_dora "
                              "is not true; the two files do not belong together")
    try:
        recorded = {e["path"]: e for e in json.loads(meta.get("lorax_fn", "[]"))}
    except (ValueError, TypeError, KeyError, RecursionError):
        recorded = {}
    flat, treedef = leaves_with_paths(base, is_leaf=is_lora)
    # First every check, on shapes alone; only then the tensor data (so nothing is allocated for a file that
    # does not fit, and the allocations are bounded by the tensors the file really holds).
    # owner: module -> the path it went to, so one module never fills two weights (a sloppy name_map)
    plans, owner = [], {}
    full_plans, full_owner = [], {}
    for i, (path, leaf) in enumerate(flat):
        fname = _full_name(name_map, path) if full else None
        if fname in full:  # a modules_to_save parameter: the leaf itself trained
            w = leaf.w if is_lora(leaf) else leaf
            want = tuple(np.shape(_full_to_torch(path, np.empty(np.shape(w), np.uint8))))
            if full[fname] != want:
                raise StructureError(f"{where}: '{fname}' has shape {full[fname]} in the file, but base leaf "
                                     f"'{path}' needs {want}")
            if fname in full_owner:
                raise StructureError(f"{where}: '{fname}' maps to both '{full_owner[fname]}' and '{path}'")
            full_owner[fname] = path
            full_plans.append((i, path, w, fname))
            continue
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
            try:
                lay = Layout(*(tuple(int(a) for a in g) for g in recorded[path]["layout"]))
            except (TypeError, ValueError, KeyError):
                raise CheckpointError(f"{where}: the lorax_fn metadata in {WEIGHTS_FILE} has a damaged "
                                      f"layout for '{path}'") from None
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
        rank = first["A"][0]
        sa, sb = factor_shapes(shape, lay, rank)
        # one slice's element counts; A holds b's when swapped (see _from_torch)
        na, nb = math.prod(sa[ns:]), math.prod(sb[ns:])
        alpha = None
        for idx, name in slices:
            if name in owner:
                raise StructureError(f"{where}: module '{name}' maps to both '{owner[name]}' and '{path}'; "
                                     "name_map must give each base weight its own module")
            owner[name] = path
            mod = modules[name]
            want_r = cfg.ranks.value(name, cfg.r, cfg.budget)
            if mod["A"][0] != want_r or mod["B"][1] != want_r:
                raise CheckpointError(f"{where}: module '{name}' ('{path}') has lora_A {mod['A']} and lora_B "
                                      f"{mod['B']}, but the config gives it rank {want_r}")
            if mod["A"][0] != rank:
                raise StructureError(f"{where}: slices of stacked '{path}' have different ranks")
            if (math.prod(mod["A"]), math.prod(mod["B"])) != ((nb, na) if swap else (na, nb)):
                raise StructureError(f"{where}: module '{name}' (lora_A {mod['A']}, lora_B {mod['B']}) "
                                     f"does not fit '{path}' of shape {shape}: it needs a {sa[ns:]} and "
                                     f"b {sb[ns:]}")
            alpha_i = cfg.alphas.value(name, cfg.alpha, cfg.budget)
            if alpha is not None and alpha_i != alpha:
                raise StructureError(f"{where}: slices of stacked '{path}' have different alphas")
            alpha = alpha_i
        plans.append((i, w, lay, slices, rank, alpha, sa, sb, swap))
    unclaimed = sorted(set(modules) - set(owner))
    if unclaimed:
        raise StructureError(f"{where}: no base weight maps to modules {unclaimed[:5]}; check name_map "
                             "(it must give these names for the base's paths)")
    # a LoRA template's adapters that the file does not replace would otherwise come back unchanged
    lost = sorted(set(full) - set(full_owner))
    if lost:
        raise StructureError(f"{where}: no base leaf maps to the modules_to_save parameters {lost[:5]}; check "
                             "name_map (it must give these names for the base's paths)")
    filled = {p[0] for p in plans} | {p[0] for p in full_plans}
    stale = [p for j, (p, x) in enumerate(flat) if is_lora(x) and j not in filled]
    if stale:
        raise StructureError(f"{where}: the given tree has adapters the file does not have: "
                             + ", ".join(f"'{p}'" for p in stale[:5]) + "; pass the dense base, or check name_map")
    # after the unclaimed check, so every module is one the caller's base asked for (bounded names)
    untargeted = sorted(n for n in modules if not cfg.targets(n))
    if untargeted:
        raise CheckpointError(f"{where}: modules {untargeted[:5]} are in {WEIGHTS_FILE} but not in the config's "
                              f"target_modules {_short(config.get('target_modules'))}; the two files do not belong "
                              "together")
    # last of the checks, so the specific ones above name a problem first: new weights next to an old config (a
    # save_peft interrupted between its two renames) or an edited r/alpha would otherwise load with the wrong scale
    want = meta.get(CONFIG_CRC_KEY)
    if want is not None and want != str(_config_crc(config)):
        raise CheckpointError(f"{where}: {CONFIG_FILE} is not the config {WEIGHTS_FILE} was saved with (its "
                              "r/alpha/rank_pattern/alpha_pattern/use_rslora fields changed, e.g. by a save_peft "
                              "interrupted between writing the two files); save the adapter again")
    leaves = [x for _, x in flat]
    arrays = _read_tensors(Path(where) / WEIGHTS_FILE, modules, [n for p in plans for _, n in p[3]])
    saved = _read_full(Path(where) / WEIGHTS_FILE, full)
    for i, path, w, fname in full_plans:
        x = _full_to_torch(path, saved[fname])  # its own inverse: a transpose or nothing
        leaves[i] = FullWeight(jnp.asarray(x).astype(jnp.result_type(w) if dtype is None else dtype))
    for i, w, lay, slices, rank, alpha, sa, sb, swap in plans:
        a = b = m = None
        sm = sb[:len(lay.stack)] + sb[len(lay.stack) + 1:]  # DoRA's magnitude: stack + out
        for idx, name in slices:
            A, B, *M = arrays[name]
            if a is None:
                a, b = np.empty(sa, A.dtype), np.empty(sb, B.dtype)
                m = np.empty(sm, M[0].dtype) if M else None
            # a and b hold the stack axes first, wherever they sit in the base weight
            a[idx], b[idx] = _from_torch(A, B, sa[len(idx):], sb[len(idx):], swap)
            if M:
                m[idx] = M[0].reshape(sm[len(idx):])
        a, b = jnp.asarray(a), jnp.asarray(b)
        if dtype is not None:
            a, b = a.astype(dtype), b.astype(dtype)
        if m is None:
            leaves[i] = LoraWeight(w, a, b, rank=rank, alpha=float(alpha), layout=lay, variant=cfg.variant)
        else:
            m = jnp.asarray(m) if dtype is None else jnp.asarray(m).astype(dtype)
            leaves[i] = DoraWeight(w, a, b, m, rank=rank, alpha=float(alpha), layout=lay, variant=cfg.variant)
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _read_full(w_path: Path, full: dict) -> dict[str, np.ndarray]:
    """The ``modules_to_save`` tensors, each checked against the shape its header gave."""
    from safetensors import safe_open

    if not full:
        return {}
    w_path = _regular_file(w_path, w_path.parent, WEIGHTS_FILE)
    try:
        with safe_open(str(w_path), "np") as f:
            out = {name: f.get_tensor(PREFIX + name) for name in full}
    except Exception as err:  # safetensors raises its own error types for damaged headers and short files
        raise CheckpointError(f"cannot read '{w_path}': {err}") from err
    if any(tuple(x.shape) != full[name] for name, x in out.items()):
        raise CheckpointError(f"'{w_path}' changed while it was being read; load it again")
    return out


def _short(value: Any, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _read_tensors(w_path: Path, modules: dict, names: list[str]) -> dict[str, tuple[np.ndarray, ...]]:
    """``{module: (A, B)}`` (``(A, B, M)`` with a DoRA magnitude) from the file, each the shape its header
    gave when it was checked."""
    from safetensors import safe_open

    w_path = _regular_file(w_path, w_path.parent, WEIGHTS_FILE)
    out = {}
    try:
        with safe_open(str(w_path), "np") as f:
            for name in names:
                mod = modules[name]
                out[name] = tuple(f.get_tensor(mod["keys"][x]) for x in "ABM" if x in mod["keys"])
    except Exception as err:  # safetensors raises its own error types for damaged headers and short files
        raise CheckpointError(f"cannot read '{w_path}': {err}") from err
    for name in names:
        if any(tuple(x.shape) != modules[name][k] for x, k in zip(out[name], "ABM")):
            raise CheckpointError(f"'{w_path}' changed while it was being read; load it again")
    return out
