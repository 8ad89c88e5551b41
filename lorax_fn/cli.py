"""``python -m lorax_fn``: inspect a saved adapter, merge one into a base checkpoint."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Sequence

DESCRIPTION = """\
Work with LoRA adapters saved by lorax_fn, from the shell.

  inspect  show what an adapter checkpoint holds: every adapted parameter with
           its base shape, rank, alpha, layout and adapter shapes, the library
           version that wrote it, and its size on disk. Reads adapter
           checkpoints (lorax_fn.save_adapters, or one step of an
           AdapterCheckpointManager; given the manager's directory it reads
           the latest step) and PEFT adapter directories (adapter_config.json +
           adapter_model.safetensors).

  merge    fold an adapter into a base model: reads the base params from a
           standard Orbax pytree checkpoint (what StandardCheckpointer or
           lorax_fn.save_merged writes), applies the adapter
           (W + scale * A @ B at every adapted parameter; scale is alpha/r,
           or alpha/sqrt(r) for rsLoRA) and writes the
           merged params as a standard Orbax checkpoint that a plain Flax model
           restores without lorax_fn.
"""

EPILOG = """\
examples:
  python -m lorax_fn inspect out/my_adapter
  python -m lorax_fn inspect out/my_adapter --json
  python -m lorax_fn merge --adapters out/my_adapter --base ckpt/base_params --out ckpt/merged
"""


def directory_bytes(path: Path) -> int:
    """Total size of the files under ``path``."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _size(n: int) -> str:
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= div:
            return f"{n / div:.2f} {unit} ({n:,} bytes)"
    return f"{n:,} bytes"


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[k]) for r in rows) for k in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _shape(s) -> str:
    return "(" + ", ".join(str(int(n)) for n in s) + ("," if len(s) == 1 else "") + ")"


def _adapter_dir(path: Path) -> tuple[Path, str]:
    """The step to read when given a checkpoint manager's directory."""
    from .ckpt_format import CONFIG
    if (path / CONFIG).is_dir():
        return path, ""
    steps = sorted(int(p.name) for p in path.iterdir() if p.name.isdigit() and (p / CONFIG).is_dir()) \
        if path.is_dir() else []
    if steps:
        return path / str(steps[-1]), f"training checkpoint directory with steps {steps}; showing step {steps[-1]}"
    return path, ""


def _inspect_lorax(path: Path, as_json: bool) -> int:
    from .checkpoint import read_adapter_config
    path, note = _adapter_dir(path)
    cfg = read_adapter_config(path)
    size = directory_bytes(path)
    if as_json:
        print(json.dumps({"directory": str(path), "bytes_on_disk": size, "config": cfg}, indent=2))
        return 0
    ads, full = cfg["adapters"], cfg["trainable"]
    n_adapter = sum(math.prod(s["shape"]) for e in ads for s in e["arrays"].values())
    n_base = sum(math.prod(e["base"]["shape"]) for e in ads)
    n_full = sum(math.prod(e["shape"]) for e in full)
    ranks = sorted({e["rank"] for e in ads if "rank" in e})
    alphas = sorted({e["alpha"] for e in ads if "alpha" in e})
    kinds = sorted({e.get("kind", "lora") + (f" ({e['variant']})" if e.get("variant", "lora") != "lora" else "")
                    for e in ads})
    print(f"lorax_fn adapter checkpoint: {path}")
    if note:
        print(f"  ({note})")
    print(f"  written by        lorax_fn {cfg.get('library_version', '?')} (format {cfg['format_version']})")
    print(f"  adapters          {len(ads)} weights, rank {'/'.join(map(str, ranks)) or '-'}, "
          f"alpha {'/'.join(f'{a:g}' for a in alphas) or '-'}, "
          f"kind {'/'.join(kinds) or '-'}")
    print(f"  parameters        {n_adapter:,} in adapters (on {n_base:,} base weights)"
          + (f" + {n_full:,} in {len(full)} fully trained leaves" if full else ""))
    print(f"  size on disk      {_size(size)}")
    if cfg.get("metadata"):
        print(f"  metadata          {json.dumps(cfg['metadata'])}")
    if ads:
        rows = [["path", "base shape", "dtype", "rank", "alpha", "stack/in/out", "kind", "stored arrays"]]
        for e in ads:
            lay = e["layout"]
            stored = ", ".join(f"{n} {_shape(a['shape'])} {a['dtype']}" for n, a in sorted(e["arrays"].items()))
            rows.append([e["path"], _shape(e["base"]["shape"]), e["base"]["dtype"],
                         str(e.get("rank", "-")), f"{e['alpha']:g}" if "alpha" in e else "-",
                         f"{_shape(lay['stack'])}/{_shape(lay['in'])}/{_shape(lay['out'])}",
                         e.get("kind", "lora"), stored])
        print()
        print(_table(rows))
    if full:
        print()
        print(_table([["fully trained leaf", "shape", "dtype"]]
                     + [[e["path"], _shape(e["shape"]), e["dtype"]] for e in full]))
    return 0


def _inspect_peft(path: Path, as_json: bool) -> int:
    from safetensors import safe_open

    from .errors import CheckpointError
    from .peft import CONFIG_FILE, WEIGHTS_FILE, _read_json, _regular_file
    # the loader's reader: bounded size and nesting, no links but the Hugging Face cache's own
    cfg = _read_json(_regular_file(path / CONFIG_FILE, path, CONFIG_FILE))
    if not isinstance(cfg, dict):
        raise CheckpointError(f"'{path / CONFIG_FILE}' is not a JSON object")
    shapes = {}
    if (path / WEIGHTS_FILE).is_file():
        weights = _regular_file(path / WEIGHTS_FILE, path, WEIGHTS_FILE)
        try:
            with safe_open(str(weights), "np") as f:
                shapes = {k: (list(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
        except Exception as err:  # safetensors raises its own error types for damaged headers and short files
            raise CheckpointError(f"cannot read '{path / WEIGHTS_FILE}': {err}") from err
    size = directory_bytes(path)
    if as_json:
        print(json.dumps({"directory": str(path), "bytes_on_disk": size, "config": cfg,
                          "tensors": {k: {"shape": s, "dtype": d} for k, (s, d) in shapes.items()}}, indent=2))
        return 0
    print(f"PEFT adapter: {path}")
    for k in ("peft_type", "r", "lora_alpha", "use_rslora", "target_modules", "rank_pattern", "alpha_pattern",
              "base_model_name_or_path", "task_type"):
        print(f"  {k:<24}{json.dumps(cfg.get(k))}")
    print(f"  {'tensors':<24}{len(shapes)} ({sum(math.prod(s) for s, _ in shapes.values()):,} parameters)")
    print(f"  {'size on disk':<24}{_size(size)}")
    if shapes:
        print()
        print(_table([["tensor", "shape", "dtype"]] + [[k, _shape(s), d] for k, (s, d) in sorted(shapes.items())]))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    """``inspect``: print a lorax_fn or PEFT adapter's contents; returns the exit status."""
    path = Path(args.directory).expanduser().absolute()
    from .peft import CONFIG_FILE
    if (path / CONFIG_FILE).is_file():
        return _inspect_peft(path, args.json)
    return _inspect_lorax(path, args.json)


def cmd_merge(args: argparse.Namespace) -> int:
    """``merge``: fold an adapter into base params from a checkpoint and write the result; returns the exit status."""
    import jax
    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    from .checkpoint import _absolute, check_destination, committed_dir, load_adapters, save_merged
    from . import checks
    from .errors import CheckpointError
    from .merge import merge
    from .weight import is_lora

    dt = checks.float_dtype(args.dtype, "--dtype") if args.dtype else None
    adapters_dir, _ = _adapter_dir(Path(args.adapters).expanduser().absolute())
    base_dir = committed_dir(args.base)
    # the path save_merged writes ('..' taken lexically), then resolved: links must not hide an overlap
    out_dir = _absolute(args.out).resolve()
    for src, what in ((base_dir, "--base"), (adapters_dir, "--adapters")):
        # --overwrite deletes --out before writing: it must not be (or contain, or lie inside) an input
        src = src.resolve()
        if out_dir == src or src in out_dir.parents or out_dir in src.parents:
            raise CheckpointError(f"--out '{out_dir}' overlaps {what} '{src}'; write the merged params "
                                  "somewhere else")
    # before anything is read: a destination that cannot be used fails now, and untouched
    check_destination(_absolute(args.out), args.overwrite, flag="--overwrite")
    try:
        with ocp.StandardCheckpointer() as ck:
            base = ck.restore(base_dir)
    except Exception as err:  # Orbax raises many types for a directory that is not a pytree checkpoint
        raise CheckpointError(f"cannot read base params from '{base_dir}' (expected a standard Orbax pytree "
                              f"checkpoint, as StandardCheckpointer or save_merged writes): {err}") from err
    tree = load_adapters(adapters_dir, base)
    n = sum(1 for x in jax.tree.leaves(tree, is_leaf=is_lora) if is_lora(x))
    # the restored bases are ours alone: merging into their buffers avoids a second copy of each; with
    # --dtype the update is added in that dtype, not rounded to the base's first
    tree = merge(tree, donate=True, dtype=dt)
    if dt is not None:
        tree = jax.tree.map(lambda x: x.astype(dt) if jnp.issubdtype(jnp.result_type(x), jnp.floating) else x,
                            tree)
    out = save_merged(args.out, tree, overwrite=args.overwrite)
    print(f"merged {n} adapters from {adapters_dir} into the base params from {base_dir}")
    print(f"wrote {out} ({_size(directory_bytes(out))})")
    return 0


def parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m lorax_fn`` (subcommands ``inspect`` and ``merge``)."""
    p = argparse.ArgumentParser(prog="python -m lorax_fn", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="{inspect,merge}")
    i = sub.add_parser("inspect", help="show an adapter checkpoint's config, shapes and size on disk",
                       description="Show what an adapter checkpoint (lorax_fn or PEFT format) holds.")
    i.add_argument("directory", help="adapter checkpoint, checkpoint-manager directory, or PEFT adapter directory")
    i.add_argument("--json", action="store_true", help="print the config and size as JSON")
    i.set_defaults(run=cmd_inspect)
    m = sub.add_parser("merge", help="merge an adapter into base params and write a plain Orbax checkpoint",
                       description="Fold an adapter into base params (a standard Orbax pytree checkpoint) "
                                   "and write the dense result as a standard Orbax checkpoint.")
    m.add_argument("--adapters", required=True, help="adapter checkpoint (save_adapters or a manager step)")
    m.add_argument("--base", required=True, help="base params: a standard Orbax pytree checkpoint")
    m.add_argument("--out", required=True, help="where to write the merged params (must not exist)")
    m.add_argument("--dtype", default=None, help="cast the merged floating-point params (float32, bfloat16, "
                                                 "float16)")
    m.add_argument("--overwrite", action="store_true",
                   help="replace --out if it is a checkpoint lorax_fn wrote (anything else is refused)")
    m.set_defaults(run=cmd_merge)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (errors print one line to stderr, status 1).

    Example:
        >>> from lorax_fn.cli import parser
        >>> parser().parse_args(["inspect", "some/dir"]).directory
        'some/dir'
    """
    args = parser().parse_args(argv)
    from .errors import LoraError
    try:
        status = args.run(args)
        sys.stdout.flush()  # a closed pipe (`| head`) shows here, not at interpreter exit
        return status
    except LoraError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # the reader went away (`... | head`): stop quietly, and keep Python from failing again at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
