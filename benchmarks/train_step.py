"""Training-step benchmark: LoRA against full fine-tuning, naive merging and
LoRA written by hand, on one decoder-only transformer LM.

    python benchmarks/train_step.py                    # every configuration, one process each
    python benchmarks/train_step.py --config hand      # one configuration in this process

Each configuration is an AdamW step, jitted, with the trainable state donated.
It reports the median step time over ``--steps`` steps after warm-up, the
compiled FLOPs (``cost_analysis``), XLA's memory plan (``memory_analysis``),
the optimizer-state size and the peak RSS of its own process.

The ``peft`` configuration runs ``torch_peft.py`` (full fine-tuning and PEFT's
LoRA in PyTorch, same model and shape) with ``--peft-python``, or with this
python if torch and peft import here; its "× full" is to the PyTorch full
fine-tuning row, not to the JAX one.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from flax import traverse_util  # noqa: E402

import _common as C  # noqa: E402
import model as M  # noqa: E402
import torch_peft as TP  # noqa: E402  (imports no torch until it runs)

CONFIGS = ["full", "naive", "hand", "lorax_fn", "lorax_fn_split", "lorax_fn_factored", "jax_lorax",
           "peft"]
# other adapter kinds on the same model and targets (``--configs full,lorax_fn,lorax_fn_dora,lorax_fn_mora``)
KIND_CONFIGS = ["lorax_fn_dora", "lorax_fn_mora"]
LABELS = {
    "full": "full fine-tuning",
    "naive": "naive LoRA (dense W + s·A@B every step)",
    "hand": "LoRA by hand (x@W + s·(x@A)@B)",
    "lorax_fn": "lorax_fn, `optimizer` mask",
    "lorax_fn_split": "lorax_fn, `split`/`combine`",
    "lorax_fn_factored": "lorax_fn, mask, `formulation=\"factored\"`",
    "lorax_fn_dora": "lorax_fn DoRA (`variant=\"dora\"`), mask",
    "lorax_fn_mora": "lorax_fn MoRA (`variant=\"mora\"`, same trainable count), mask",
    "jax_lorax": "jax-lorax (qax)",
    **TP.LABELS,
}
# the full fine-tuning row each framework's "× full" is relative to
FULL = {"jax": "full", "torch": "peft_full"}


def _apply(model):
    return lambda p, x: model.apply({"params": p}, x)


def _is_target(path: str) -> bool:
    return re.fullmatch(M.TARGETS, path) is not None


def _adamw():
    return optax.adamw(1e-4)


# Each builder returns (step, state, extra): step(state, tokens) -> (state, loss), with
# state donated; extra is merged into the record.
def _whole_step(tx, loss_of):
    """Step over state ``(params, opt)``: every leaf gets a gradient, ``tx`` decides."""
    def step(state, tokens):
        params, opt = state
        loss, g = jax.value_and_grad(lambda p: loss_of(p, tokens))(params)
        u, opt = tx.update(g, opt, params)
        return (optax.apply_updates(params, u), opt), loss
    return step


def _part_step(tx, loss_of):
    """Step over state ``((trainable, opt), frozen)``: only ``trainable`` is differentiated."""
    def step(state, tokens):
        (train, opt), frozen = state
        loss, g = jax.value_and_grad(lambda t: loss_of(t, frozen, tokens))(train)
        u, opt = tx.update(g, opt, train)
        return ((optax.apply_updates(train, u), opt), frozen), loss
    return step

def build_full(a, shape):
    model, params = M.init(shape, dtype=a.dtype)
    tx, apply = _adamw(), _apply(model)
    step = _whole_step(tx, lambda p, tokens: M.loss_fn(apply, p, tokens))
    return step, (params, tx.init(params)), {}


def _factors(params, rank, dtype, seed=0):
    flat = traverse_util.flatten_dict(params, sep="/")
    keys = jax.random.split(jax.random.PRNGKey(seed), len(flat))
    out = {}
    for k, (path, w) in zip(keys, flat.items()):
        if _is_target(path):
            d, f = w.shape
            a = jax.random.uniform(k, (d, rank), dtype, -1, 1) * jnp.sqrt(6.0 / d).astype(dtype)
            out[path] = {"a": a, "b": jnp.zeros((rank, f), dtype)}
    return out


def build_naive(a, shape):
    model, params = M.init(shape, dtype=a.dtype)
    tx, apply, s = _adamw(), _apply(model), a.alpha / a.rank
    factors = _factors(params, a.rank, a.dtype)

    def merged(factors, params):
        flat = traverse_util.flatten_dict(params, sep="/")
        for path, f in factors.items():
            flat[path] = flat[path] + s * (f["a"] @ f["b"])
        return traverse_util.unflatten_dict(flat, sep="/")

    step = _part_step(tx, lambda f, params, tokens: M.loss_fn(apply, merged(f, params), tokens))
    return step, ((factors, tx.init(factors)), params), {}


def build_hand(a, shape):
    model, params = M.init(shape, rank=a.rank, scale=a.alpha / a.rank, dtype=a.dtype)
    tx, apply = _adamw(), _apply(model)
    flat = traverse_util.flatten_dict(params, sep="/")
    train = {k: v for k, v in flat.items() if "/lora_" in k}
    frozen = {k: v for k, v in flat.items() if "/lora_" not in k}
    unflat = lambda t, f: traverse_util.unflatten_dict({**t, **f}, sep="/")

    step = _part_step(tx, lambda t, frozen, tokens: M.loss_fn(apply, unflat(t, frozen), tokens))
    return step, ((train, tx.init(train)), frozen), {}


def _lorafied(a, shape, variant="lora"):
    import lorax_fn as lf
    model, params = M.init(shape, dtype=a.dtype)
    lp = lf.lorafy(params, targets=M.TARGETS, rank=a.rank, alpha=a.alpha,
                   key=jax.random.PRNGKey(0), variant=variant)
    return lf, model, lp


def build_lorax_fn(a, shape, formulation=None, variant="lora"):
    lf, model, lp = _lorafied(a, shape, variant)
    apply = lf.lora(_apply(model), **({"formulation": formulation} if formulation else {}))
    tx = lf.optimizer(_adamw(), lp)
    step = _whole_step(tx, lambda p, tokens: M.loss_fn(apply, p, tokens))
    frozen = _host(lf.base(lp))
    return step, (lp, tx.init(lp)), {"_after": lambda st: {
        "base_unchanged": _same(frozen, _host(lf.base(st[0])))}}


def build_lorax_fn_factored(a, shape):
    return build_lorax_fn(a, shape, formulation="factored")


def build_lorax_fn_dora(a, shape):
    return build_lorax_fn(a, shape, variant="dora")


def build_lorax_fn_mora(a, shape):
    return build_lorax_fn(a, shape, variant="mora")


def build_lorax_fn_split(a, shape):
    lf, model, lp = _lorafied(a, shape)
    apply, tx = lf.lora(_apply(model)), _adamw()
    train, frozen = lf.split(lp)

    step = _part_step(tx, lambda t, frozen, tokens: M.loss_fn(apply, lf.combine(t, frozen), tokens))
    return step, ((train, tx.init(train)), frozen), {}


def build_jax_lorax(a, shape):
    import lorax  # the PyPI package jax-lorax, in its own environment
    from lorax.constants import LORA_FREEZE
    model, params = M.init(shape, dtype=a.dtype)

    def decide(path, leaf):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        return a.rank if _is_target(name) else LORA_FREEZE

    spec = lorax.simple_spec(params, decision_fn=decide, tune_vectors=False)
    lp = lorax.init_lora(params, spec, jax.random.PRNGKey(0), alpha=a.alpha, dtype=a.dtype)
    tx = lorax.wrap_optimizer(_adamw(), spec)
    apply = lorax.lora(_apply(model))
    step = _whole_step(tx, lambda p, tokens: M.loss_fn(apply, p, tokens))

    bases = lambda t: [x.w for x in jax.tree.leaves(t, is_leaf=lambda x: isinstance(x, lorax.LoraWeight))
                       if isinstance(x, lorax.LoraWeight)]  # noqa: E731
    before = _host(bases(lp))
    return step, (lp, tx.init(lp)), {
        "_after": lambda st: {"base_unchanged": _same(before, _host(bases(st[0])))}}


def _host(tree):
    import numpy as np
    return [np.array(x) for x in jax.tree.leaves(tree)]


def _same(xs, ys) -> bool:
    import numpy as np
    return len(xs) == len(ys) and all(np.array_equal(x, y) for x, y in zip(xs, ys))


def _opt_state(config, state):
    # every builder keeps (trainable, opt_state) first
    inner = state[0] if isinstance(state[0], tuple) else state
    return inner[1]


def run_one(a) -> dict:
    shape = M.Shape(a.layers, a.d_model, a.heads, a.mlp or 4 * a.d_model, a.vocab, a.seq, a.batch)
    step, state, extra = globals()[f"build_{a.config}"](a, shape)
    after = extra.pop("_after", None)
    jstep = jax.jit(step, donate_argnums=0)
    tokens = [M.batch(shape, i) for i in range(4)]
    t0 = time.perf_counter()
    compiled = jstep.lower(state, tokens[0]).compile()
    compile_s = time.perf_counter() - t0
    rec = {"bench": "train_step", "config": a.config, "label": LABELS[a.config],
           **dataclasses.asdict(shape), "rank": a.rank, "dtype": a.dtype,
           "compile_s": compile_s, **C.analyses(compiled), **extra}
    rec["opt_state_bytes"] = C.tree_bytes(_opt_state(a.config, state))
    stats, final = C.train_steps(compiled, state, tokens, a.steps)
    rec.update(stats)
    if after:
        rec.update(after(final))
    if tuple(int(p) for p in jax.__version__.split(".")[:3]) < (0, 4, 30):
        # this JAX's CPU cost analysis counts only part of the step (1.5 GFLOP where the
        # forward matmuls alone are ~25) and its memory analysis is empty: not comparable
        for k in ("flops", "argument_bytes", "output_bytes", "temp_bytes", "alias_bytes",
                  "compiled_bytes"):
            rec.pop(k, None)
        rec["flops"] = float("nan")
        rec["error"] = f"JAX {jax.__version__}: XLA cost and memory analyses not comparable"
    if rec.get("base_unchanged") is False:
        rec["error"] = (rec.get("error", "") + "; " if rec.get("error") else "") + \
            "the frozen base weights CHANGED during training"
    return rec


COLUMNS = [("label", "configuration", ""), ("step_ms", "step (ms, median)", "{:.1f}"),
           ("ratio", "× full", "{:.2f}"), ("gflops", "GFLOP", "{:.1f}"),
           ("flops_ratio", "FLOPs × full", "{:.2f}"),
           ("compiled_mb", "compiled MiB", "{:.0f}"), ("temp_mb", "temp MiB", "{:.0f}"),
           ("opt_mb", "opt state MiB", "{:.2f}"), ("peak_rss_mb", "peak RSS MiB", "{:.0f}"),
           ("base_unchanged", "frozen base bit-identical", ""),
           ("error", "note", "")]


def derive(recs: list[dict]) -> list[dict]:
    """Add ratios to full fine-tuning and MiB columns (same run, same shape).

    Ratios are within a framework: PyTorch rows to PyTorch full fine-tuning. They have
    no XLA analyses, so their FLOPs and compiled-memory cells stay blank."""
    fulls = {fw: next((r for r in recs if r.get("config") == c and "step_ms" in r), None)
             for fw, c in FULL.items()}
    for r in recs:
        if "step_ms" not in r:
            continue
        full = fulls.get(r.get("framework", "jax"))
        flops = r.get("flops", float("nan"))
        r["gflops"] = flops / 1e9 if flops == flops else None
        r["compiled_mb"] = r.get("compiled_bytes", float("nan")) / 2**20
        r["temp_mb"] = r.get("temp_bytes", float("nan")) / 2**20
        r["opt_mb"] = r["opt_state_bytes"] / 2**20
        if full:
            r["ratio"] = r["step_ms"] / full["step_ms"]
            r["flops_ratio"] = flops / full["flops"] if r["gflops"] else None
    return recs


def derive_by_width(recs: list[dict]) -> list[dict]:
    """:func:`derive` within each ``d_model``, plus memory as a ratio to full fine-tuning."""
    out = []
    for d in dict.fromkeys(r.get("d_model") for r in recs):
        group = derive([r for r in recs if r.get("d_model") == d])
        full = next((r for r in group if r.get("config") == "full" and "compiled_bytes" in r), None)
        for r in group:
            if full and "compiled_bytes" in r:
                r["mem_ratio"] = r["compiled_bytes"] / full["compiled_bytes"]
        out += group
    return out


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help=f"run one configuration in this process: {', '.join(CONFIGS + KIND_CONFIGS)}")
    p.add_argument("--configs", default=",".join(CONFIGS), help="comma list to run, one process each")
    C.add_shape_flags(p)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--steps", type=int, default=10, help="timed steps (after 2 warm-up steps)")
    p.add_argument("--jax-lorax-python", default=os.environ.get("JAX_LORAX_PYTHON", ""),
                   help="python of an environment where jax-lorax is installed")
    p.add_argument("--peft-python", default=os.environ.get("PEFT_PYTHON", ""),
                   help="python of an environment where torch and peft are installed "
                        "(default: this one, if they import here)")
    p.add_argument("--json", help="also write the records to this file (JSON lines)")
    return p.parse_args(argv)


def child_argv(a, config) -> list[str]:
    return [os.path.abspath(__file__), "--config", config,
            *C.flags(a, C.SHAPE_FLAGS + ["dtype", "steps"])]


def run_all(a) -> list[dict]:
    recs = []
    for config in [c for c in a.configs.split(",") if c]:
        if config == "jax_lorax":
            recs += _jax_lorax(a)
        elif config == "peft":
            recs += _peft(a)
        else:
            recs += C.run_child(child_argv(a, config))
        for r in recs:
            r.setdefault("config", config)
            r.setdefault("label", LABELS.get(config, config))
    return derive(recs)


def _jax_lorax(a) -> list[dict]:
    py = a.jax_lorax_python
    if not py or not os.path.exists(py):
        return [{"config": "jax_lorax", "label": LABELS["jax_lorax"],
                 "error": "not run: jax-lorax needs JAX <= 0.4.35, so it runs in its own "
                          "environment (`make bench-env`); none was given"}]
    return C.run_child(child_argv(a, "jax_lorax"), python=py)


def _peft(a) -> list[dict]:
    """Both PyTorch configurations, each in its own process."""
    import importlib.util
    py = a.peft_python
    if py and os.path.exists(py):
        return TP.run_all(a, python=py)
    if py:
        return [{"config": "peft", "label": LABELS["peft"],
                 "error": f"not run: the PEFT python '{os.path.basename(py)}' given does not exist"}]
    missing = [m for m in ("torch", "peft") if importlib.util.find_spec(m) is None]
    if not missing:
        return TP.run_all(a)
    return [{"config": "peft", "label": LABELS["peft"],
             "error": f"not run: {', '.join(missing)} missing here and no PEFT python given "
                      "(`make bench-env` builds benchmarks/.venv-peft)"}]


def main(argv=None) -> list[dict]:
    a = parse(argv)
    if a.config == "peft":  # PyTorch: torch_peft.py's processes, never this one
        a.configs, a.config = "peft", None
    if a.config:
        C.emit(run_one(a))
        return []
    recs = run_all(a)
    return C.finish(recs, C.table(recs, COLUMNS), a.json)


if __name__ == "__main__":
    main()
