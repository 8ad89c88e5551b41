"""QLoRA benchmark: a 4-bit NF4 frozen base against float32 full fine-tuning and
LoRA on a bfloat16 base, on the decoder-only transformer LM of ``train_step.py``
(same default shape, same adapter targets and rank as its ``lorax_fn`` row).

    python benchmarks/qlora.py                      # every part, one process each
    python benchmarks/qlora.py --config qlora       # one part in this process
    python benchmarks/qlora.py --steps 20 --json qlora.jsonl

It measures, in the same run:

1. ``bytes``: the frozen bytes of the targeted kernels stored as float32,
   bfloat16, NF4 with double-quantised scales (the sum of
   ``QuantizedArray.nbytes`` from ``lorafy(..., quantize=)``) and NF4 without
   double quantisation, as ratios to float32 and bfloat16. The bar is NF4+DQ
   ≤ 0.135× float32 (≤ 0.27× bfloat16).
2. ``full``, ``lora_bf16``, ``qlora``: one AdamW step, jitted, with the
   trainable state (weights and optimizer state) donated. ``full`` trains every
   float32 weight. ``lora_bf16`` casts the whole ``params`` to bfloat16, then
   lorafies with float32 adapters. ``qlora`` casts ``params`` to bfloat16 too
   (QLoRA's setup: the untargeted leaves, embedding, head, norms and biases,
   stay bfloat16), then lorafies with ``quantize=lf.Quantization(dtype=
   jnp.bfloat16)`` and float32 adapters: the two differ only in the targeted
   kernels' storage. Both adapter steps ``lf.split`` the tree,
   differentiate with respect to the trainable part only (``jax.grad`` takes no
   uint8 leaves) and take the frozen part as a jit argument, not donated and
   not returned, so XLA counts it once, as argument bytes. Reported: the median
   step time over ``--steps`` steps after 2 warm-up steps, and XLA's
   ``memory_analysis()`` of the compiled step: argument, temp, output and
   alias bytes, and "peak" = argument + temp + output − alias, i.e. what the
   step needs resident at once when the donated inputs are reused for outputs
   (XLA's static plan: buffers live at the same time are not told apart
   further). The QLoRA peak must be below the bfloat16 LoRA peak.
3. ``quantize_1b``: the host time of ``lf.quantize`` for a 1B-parameter-shaped
   decoder (``--big-*`` flags: 18 layers, d_model 2048, MLP 8192, vocab 32000,
   1.04B), sized abstractly with ``jax.eval_shape`` (nothing of its size is
   allocated), measured on one real slice (one layer's targeted kernels,
   random normal float32) and extrapolated at the measured values/s to the
   targeted kernels of the whole tree and to every ≥2-D leaf (``lf.quantize``'s
   default targets).

The benchmark model unrolls its layers (``model.py`` has no ``nn.scan``), so
there is no stacked kernel and the check that a scanned stack is never
dequantised whole does not apply here: it is skipped.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import traverse_util  # noqa: E402

import _common as C  # noqa: E402
import model as M  # noqa: E402
import train_step as T  # noqa: E402  (its model apply, AdamW and target test)

STEPS = ["full", "lora_bf16", "qlora"]
CONFIGS = ["bytes", *STEPS, "quantize_1b"]
LABELS = {
    "full": "full fine-tuning (float32)",
    "lora_bf16": "LoRA, bfloat16 base, float32 adapters",
    "qlora": "QLoRA, NF4+DQ base → bfloat16, float32 adapters",
}
# the acceptance bars
NF4_DQ_MAX_VS_F32 = 0.135
NF4_DQ_MAX_VS_BF16 = 0.27


def _shape(a) -> M.Shape:
    return M.Shape(a.layers, a.d_model, a.heads, a.mlp or 4 * a.d_model, a.vocab, a.seq, a.batch)


def _target_leaves(params) -> dict:
    flat = traverse_util.flatten_dict(params, sep="/")
    return {k: v for k, v in flat.items() if T._is_target(k)}


def _lorafy(lf, params, a, **kw):
    # the adapter settings of train_step's lorax_fn row
    return lf.lorafy(params, targets=M.TARGETS, rank=a.rank, alpha=a.alpha,
                     key=jax.random.PRNGKey(0), **kw)


def _bases(lf, lp) -> list:
    return [x.w for x in jax.tree.leaves(lp, is_leaf=lf.is_lora) if lf.is_lora(x)]


# ------------------------------------------------------------------ 1. bytes
def run_bytes(a) -> dict:
    import lorax_fn as lf
    shape = _shape(a)
    _, params = M.init(shape)
    targets = _target_leaves(params)
    values = sum(int(w.size) for w in targets.values())
    rec = {"bench": "qlora", "config": "bytes", **dataclasses.asdict(shape), "rank": a.rank,
           "targets": len(targets), "target_values": values,
           "float32_bytes": 4 * values, "bfloat16_bytes": 2 * values}
    for key, dq in (("nf4_dq_bytes", True), ("nf4_bytes", False)):
        bases = _bases(lf, _lorafy(lf, params, a, quantize=lf.Quantization(double_quant=dq)))
        # every target must come back quantised, or the sum below undercounts
        if len(bases) != len(targets) or not all(lf.is_quantized(w) for w in bases):
            rec["error"] = f"{key}: {sum(map(lf.is_quantized, bases))}/{len(targets)} bases quantised"
        rec[key] = sum(w.nbytes for w in bases if lf.is_quantized(w))
    for key in ("bfloat16", "nf4_dq", "nf4"):
        rec[f"{key}_vs_f32"] = rec[f"{key}_bytes"] / rec["float32_bytes"]
        rec[f"{key}_vs_bf16"] = rec[f"{key}_bytes"] / rec["bfloat16_bytes"]
    rec["nf4_dq_ok"] = bool(rec["nf4_dq_vs_f32"] <= NF4_DQ_MAX_VS_F32
                            and rec["nf4_dq_vs_bf16"] <= NF4_DQ_MAX_VS_BF16)
    return rec


# ------------------------------------------------------------------ 2. steps
# Each builder returns (loss_of, trainable, frozen): loss_of(trainable, frozen, tokens).
def build_full(a, shape):
    model, params = M.init(shape)
    apply = T._apply(model)
    return (lambda p, _, tokens: M.loss_fn(apply, p, tokens)), params, None


def _split_lora(lp, model):
    import lorax_fn as lf
    apply = lf.lora(T._apply(model))
    train, frozen = lf.split(lp)
    return (lambda t, f, tokens: M.loss_fn(apply, lf.combine(t, f), tokens)), train, frozen


def build_lora_bf16(a, shape):
    import lorax_fn as lf
    model, params = M.init(shape)
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    return _split_lora(_lorafy(lf, params, a, dtype=jnp.float32), model)


def build_qlora(a, shape):
    import lorax_fn as lf
    model, params = M.init(shape)
    # as QLoRA runs: the model in bfloat16, its targeted kernels then stored in NF4
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    lp = _lorafy(lf, params, a, dtype=jnp.float32, quantize=lf.Quantization(dtype=jnp.bfloat16))
    return _split_lora(lp, model)


def _step(tx, loss_of):
    """``step((trainable, opt), frozen, tokens)``: only ``trainable`` is differentiated;
    ``frozen`` is an argument in and nothing out, so it is neither donated nor copied."""
    def step(state, frozen, tokens):
        train, opt = state
        loss, g = jax.value_and_grad(lambda t: loss_of(t, frozen, tokens))(train)
        u, opt = tx.update(g, opt, train)
        return (optax.apply_updates(train, u), opt), loss
    return step


def run_step(a) -> dict:
    shape = _shape(a)
    loss_of, train, frozen = globals()[f"build_{a.config}"](a, shape)
    tx = T._adamw()
    state = (train, tx.init(train))
    rec = {"bench": "qlora", "config": a.config, "label": LABELS[a.config],
           **dataclasses.asdict(shape), "rank": a.rank,
           "trainable_bytes": C.tree_bytes(train), "frozen_bytes": C.tree_bytes(frozen),
           "opt_state_bytes": C.tree_bytes(state[1])}
    jstep = jax.jit(_step(tx, loss_of), donate_argnums=0)
    tokens = [M.batch(shape, i) for i in range(4)]
    t0 = time.perf_counter()
    compiled = jstep.lower(state, frozen, tokens[0]).compile()
    rec["compile_s"] = time.perf_counter() - t0
    rec.update(C.analyses(compiled))
    stats, _ = C.train_steps(lambda st, batch: compiled(st, frozen, batch), state, tokens, a.steps)
    rec.update(stats)
    if not math.isfinite(rec["loss_last"]):
        rec["error"] = "loss is not finite"
    return rec


# ------------------------------------------------------------------ 3. quantise a 1B tree
def _big_shape(a) -> M.Shape:
    return M.Shape(a.big_layers, a.big_d_model, a.big_heads, a.big_mlp, a.big_vocab, seq=8, batch=1)


def run_quantize_1b(a) -> dict:
    import lorax_fn as lf
    shape = _big_shape(a)
    model = M.LM(shape)
    # shapes only: init is traced abstractly, no weight of the 1B tree is allocated
    abstract = jax.eval_shape(lambda k: model.init(k, M.batch(shape)[:, :-1])["params"],
                              jax.random.PRNGKey(0))
    flat = traverse_util.flatten_dict(abstract, sep="/")
    total = sum(math.prod(x.shape) for x in flat.values())
    targeted = {k: x for k, x in flat.items() if T._is_target(k)}
    matrices = sum(math.prod(x.shape) for x in flat.values() if len(x.shape) >= 2)
    # the slice: one layer's targeted kernels, as real float32 values of weight-like spread
    rng = np.random.default_rng(0)
    layer = {k: (rng.standard_normal(x.shape, np.float32) * 0.02)
             for k, x in targeted.items() if k.startswith("block0/")}
    slice_values = sum(x.size for x in layer.values())
    lf.quantize({"w": np.ones((64, 64), np.float32)})  # first-call costs out of the timing
    times = []
    for _ in range(a.quant_repeats):
        t0 = time.perf_counter()
        q = lf.quantize(layer, "nf4")
        times.append(time.perf_counter() - t0)
    slice_s = statistics.median(times)
    rate = slice_values / slice_s
    targeted_values = sum(math.prod(x.shape) for x in targeted.values())
    return {"bench": "qlora", "config": "quantize_1b", **dataclasses.asdict(shape),
            "total_params": total, "targeted_values": targeted_values, "matrix_values": matrices,
            "slice": "block0 targeted kernels", "slice_values": slice_values,
            "slice_s": slice_s, "slice_s_all": [round(t, 3) for t in times],
            "values_per_s": rate,
            "slice_nbytes": sum(w.nbytes for w in jax.tree.leaves(q, is_leaf=lf.is_quantized)),
            "targeted_s_extrapolated": targeted_values / rate,
            "matrices_s_extrapolated": matrices / rate,
            "machine": C.machine()}


# ------------------------------------------------------------------ report
def run_one(a) -> dict:
    if a.config == "bytes":
        return run_bytes(a)
    if a.config == "quantize_1b":
        return run_quantize_1b(a)
    return run_step(a)


STEP_COLUMNS = [("label", "configuration", ""), ("step_ms", "step (ms, median)", "{:.1f}"),
                ("ratio_full", "time × full", "{:.2f}"), ("ratio_bf16", "time × lora_bf16", "{:.2f}"),
                ("argument_mb", "argument MiB", "{:.1f}"), ("temp_mb", "temp MiB", "{:.1f}"),
                ("output_mb", "output MiB", "{:.1f}"), ("alias_mb", "alias MiB", "{:.1f}"),
                ("peak_mb", "peak MiB", "{:.1f}"),
                ("peak_full", "peak × full", "{:.2f}"), ("peak_bf16", "peak × lora_bf16", "{:.2f}"),
                ("frozen_mb", "frozen MiB", "{:.1f}"), ("peak_rss_mb", "peak RSS MiB", "{:.0f}"),
                ("error", "note", "")]


def derive(recs: list[dict]) -> list[dict]:
    """MiB columns and ratios of the step rows to ``full`` and ``lora_bf16`` (same run, shape)."""
    steps = {r["config"]: r for r in recs if r.get("config") in STEPS and "step_ms" in r}
    for r in steps.values():
        for k in ("argument", "temp", "output", "alias"):
            r[f"{k}_mb"] = r.get(f"{k}_bytes", float("nan")) / 2**20
        r["peak_bytes"] = r.get("compiled_bytes")  # argument + temp + output − alias
        r["peak_mb"] = (r["peak_bytes"] or float("nan")) / 2**20
        r["frozen_mb"] = r["frozen_bytes"] / 2**20
        for key, base in (("full", "full"), ("bf16", "lora_bf16")):
            ref = steps.get(base)
            if ref:
                r[f"ratio_{key}"] = r["step_ms"] / ref["step_ms"]
                if r["peak_bytes"] and ref.get("peak_bytes"):
                    r[f"peak_{key}"] = r["peak_bytes"] / ref["peak_bytes"]
    q, b = steps.get("qlora"), steps.get("lora_bf16")
    if q and b and q.get("peak_bytes") and b.get("peak_bytes"):
        q["peak_below_lora_bf16"] = bool(q["peak_bytes"] < b["peak_bytes"])
    return recs


def bytes_table(r: dict) -> str:
    rows = [{"store": name, "mb": r[f"{k}_bytes"] / 2**20, "f32": r[f"{k}_bytes"] / r["float32_bytes"],
             "bf16": r[f"{k}_bytes"] / r["bfloat16_bytes"]}
            for name, k in (("float32", "float32"), ("bfloat16", "bfloat16"),
                            ("NF4 + double quant", "nf4_dq"), ("NF4", "nf4"))]
    return C.table(rows, [("store", "frozen targeted kernels", ""), ("mb", "MiB", "{:.2f}"),
                          ("f32", "× float32", "{:.4f}"), ("bf16", "× bfloat16", "{:.4f}")])


def quant_table(r: dict) -> str:
    rate = r["values_per_s"]
    rows = [{"what": f"measured: {r['slice']}", "values": r["slice_values"], "s": r["slice_s"]},
            {"what": "extrapolated: all targeted kernels", "values": r["targeted_values"],
             "s": r["targeted_s_extrapolated"]},
            {"what": "extrapolated: every ≥2-D leaf", "values": r["matrix_values"],
             "s": r["matrices_s_extrapolated"]}]
    for row in rows:
        row["rate"] = rate / 1e6
    return C.table(rows, [("what", "lf.quantize, NF4+DQ", ""), ("values", "values", "{:,}"),
                          ("s", "seconds", "{:.2f}"), ("rate", "M values/s", "{:.1f}")])


def report(recs: list[dict]) -> str:
    by = {r.get("config"): r for r in recs}
    out = []
    errors = [r for r in recs if r.get("error")]
    b = by.get("bytes")
    if b and "nf4_dq_bytes" in b:
        out += [f"## Frozen base bytes ({b['targets']} targeted kernels, {b['target_values']:,} values)",
                "", bytes_table(b), "",
                f"NF4+DQ ≤ {NF4_DQ_MAX_VS_F32}× float32 (≤ {NF4_DQ_MAX_VS_BF16}× bfloat16): "
                f"{b['nf4_dq_ok']}", ""]
    rows = [by[c] for c in STEPS if c in by]
    if rows:
        r0 = rows[0]
        out += [f"## Training step (AdamW; {r0.get('layers')} layers, d_model {r0.get('d_model')}, "
                f"rank {r0.get('rank')}; peak = argument + temp + output − alias)", "",
                C.table(rows, STEP_COLUMNS), ""]
        q = by.get("qlora", {})
        if "peak_below_lora_bf16" in q:
            out += [f"QLoRA step peak < bfloat16 LoRA step peak: {q['peak_below_lora_bf16']}", ""]
    qb = by.get("quantize_1b")
    if qb and "values_per_s" in qb:
        out += [f"## Quantising a {qb['total_params'] / 1e9:.2f}B-parameter-shaped tree "
                f"({qb['layers']} layers, d_model {qb['d_model']}, MLP {qb['mlp']}, vocab {qb['vocab']})",
                "", quant_table(qb), ""]
    out += ["Scanned-stack check: skipped (model.py unrolls its layers; no nn.scan).", ""]
    for r in errors:
        out.append(f"ERROR in {r.get('config')}: {r['error']}")
    m = next((r["machine"] for r in recs if "machine" in r), None)
    if m:
        out.append(f"Machine: {C.machine_line(m)}")
    return "\n".join(out)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help=f"run one part in this process: {', '.join(CONFIGS)}")
    p.add_argument("--configs", default=",".join(CONFIGS), help="comma list to run, one process each")
    C.add_shape_flags(p)
    p.add_argument("--steps", type=int, default=10, help="timed steps (after 2 warm-up steps)")
    p.add_argument("--big-layers", type=int, default=18)
    p.add_argument("--big-d-model", type=int, default=2048)
    p.add_argument("--big-heads", type=int, default=16)
    p.add_argument("--big-mlp", type=int, default=8192)
    p.add_argument("--big-vocab", type=int, default=32000)
    p.add_argument("--quant-repeats", type=int, default=3, help="timed lf.quantize calls on the slice")
    p.add_argument("--json", help="also write the records to this file (JSON lines)")
    return p.parse_args(argv)


BIG_FLAGS = ["big_layers", "big_d_model", "big_heads", "big_mlp", "big_vocab", "quant_repeats"]


def child_argv(a, config) -> list[str]:
    return [os.path.abspath(__file__), "--config", config,
            *C.flags(a, C.SHAPE_FLAGS + ["steps"] + BIG_FLAGS)]


def main(argv=None) -> list[dict]:
    a = parse(argv)
    if a.config:
        C.emit(run_one(a))
        return []
    recs = []
    for config in [c for c in a.configs.split(",") if c]:
        got = C.run_child(child_argv(a, config))
        for r in got:
            r.setdefault("config", config)
            r.setdefault("label", LABELS.get(config, config))
        recs += got
    recs = derive(recs)
    return C.finish(recs, report(recs), a.json)


if __name__ == "__main__":
    main()
