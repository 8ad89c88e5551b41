"""The standard benchmark set (``make bench``): training step, merge, overhead
and width scaling, each configuration in its own process.

Prints every record as a JSON line and the tables in Markdown; with
``--write-docs`` it also rewrites the results block of ``docs/benchmarks.md``,
the raw records in ``docs/benchmarks.jsonl`` and the plot
``docs/bench-scaling.png``.

    python benchmarks/bench.py --write-docs
    python benchmarks/bench.py --quick          # a smoke run at a tiny size
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import _common as C  # noqa: E402
import merge_overhead as MO  # noqa: E402
import scaling as S  # noqa: E402
import train_step as T  # noqa: E402

ROOT = os.path.dirname(HERE)
TINY = ["--layers", "1", "--d-model", "32", "--heads", "2", "--vocab", "64", "--seq", "8",
        "--batch", "2"]


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes, few steps (a smoke test)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--widths", default="256,512,1024")
    p.add_argument("--write-docs", action="store_true",
                   help="rewrite the results in docs/ (benchmarks.md block, .jsonl, .png)")
    p.add_argument("--out", default=os.path.join(ROOT, "docs"), help="where --write-docs writes")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    a = parse(argv)
    size = TINY if a.quick else []
    steps = 2 if a.quick else a.steps
    widths = "16,32" if a.quick else a.widths
    t0 = time.perf_counter()
    train = T.run_all(T.parse([*size, "--steps", str(steps)]))
    default_width = T.parse(size).d_model
    mo = MO.run_all(MO.parse([*size, "--repeats", "3" if a.quick else "20",
                              "--compile-repeats", "1" if a.quick else "3"]))
    sc_widths = [int(w) for w in widths.split(",")]
    no_width = [x for i, x in enumerate(size) if "--d-model" not in size[max(i - 1, 0):i + 1]]
    sc = S.run(sc_widths, S.CONFIGS, steps, no_width,
               reuse=[r for r in train if r.get("d_model") == default_width])
    for r in train + mo + sc:
        C.emit(r)
    machine = next((r["machine"] for r in train + mo + sc if "machine" in r), None)
    text = render(train, mo, sc, machine, time.perf_counter() - t0)
    print()
    print(text)
    if a.write_docs:
        write_docs(a.out, train + mo + sc, text, sc)
    return {"train": train, "merge_overhead": mo, "scaling": sc}


def render(train, mo, sc, machine, seconds) -> str:
    parts = []
    if machine:
        parts.append(f"Measured {datetime.date.today().isoformat()} on {C.machine_line(machine)}; "
                     f"the whole set took {seconds / 60:.1f} min.")
    if train:
        r0 = next((r for r in train if "step_ms" in r), {})
        if r0:
            parts.append(f"**Training step** ({r0['layers']} layers, d_model {r0['d_model']}, "
                         f"{r0['heads']} heads, MLP {r0['mlp']}, vocab {r0['vocab']}, seq {r0['seq']}, "
                         f"batch {r0['batch']}, {r0['dtype']}, rank {r0['rank']} on q/k/v/o and both "
                         f"MLP kernels, AdamW; median of {len(r0['step_ms_all'])} steps after 2 "
                         "warm-up steps):")
        parts.append(C.table(train, T.COLUMNS))
        note = torch_note(train)
        if note:
            parts.append(note)
    goals = targets(train, mo)
    if goals:
        parts.append("**Targets** (from the benchmark issue; lorax_fn is the `optimizer` mask "
                     "configuration with the default `formulation=\"auto\"`):")
        parts.append(C.table(goals, [("what", "measure", ""), ("value", "measured", "{:.3f}"),
                                     ("target", "target", ""), ("met", "met", "")]))
    if mo:
        parts.append("**Merge and overhead:**")
        parts.append(MO.tables(mo))
    if sc:
        r0 = next((r for r in sc if "step_ms" in r), {})
        parts.append(f"**Scaling with width** ({r0.get('layers')} layers, MLP 4×, heads "
                     f"{r0.get('heads')}, same tokens per step):")
        parts.append(C.table(sc, S.COLUMNS))
    return "\n\n".join(parts)


def torch_note(train) -> str:
    """How to read the PyTorch rows, or nothing if none was measured."""
    rows = [r for r in train if r.get("framework") == "torch" and "step_ms" in r]
    if not rows:
        return ""
    m = rows[0]["machine"]
    peft = next((r["peft"] for r in rows if "peft" in r), "?")
    return (f"The PyTorch rows (`torch_peft.py`) train the same model at the same shape "
            f"in eager PyTorch {m['torch']} on {m['threads']} threads with PEFT {peft}, "
            "attention as a plain matmul + softmax; their × full is to PyTorch full "
            "fine-tuning, and they have no XLA FLOPs or memory plan.")


def targets(train, mo) -> list[dict]:
    """Each measured figure next to its target."""
    by = {r.get("config"): r for r in train if "step_ms" in r}
    lf, hand, full, naive = (by.get(k) for k in ("lorax_fn", "hand", "full", "naive"))
    rows = []

    def add(what, value, target, ok):
        rows.append({"what": what, "value": value, "target": target, "met": "yes" if ok else "NO"})

    if lf and hand:
        r = lf["flops"] / hand["flops"]
        add("FLOPs, lorax_fn / by hand", r, "≤ 1.02", r <= 1.02)
        r = lf["compiled_bytes"] / hand["compiled_bytes"]
        add("compiled bytes, lorax_fn / by hand", r, "≤ 1.05", r <= 1.05)
        r = lf["step_ms"] / hand["step_ms"]
        add("step time, lorax_fn / by hand", r, "≤ 1.10", r <= 1.10)
    if lf and full:
        r = lf["flops"] / full["flops"]
        add("FLOPs, lorax_fn / full fine-tuning", r, "≤ 0.72", r <= 0.72)
        r = lf["compiled_bytes"] / full["compiled_bytes"]
        add("compiled bytes, lorax_fn / full fine-tuning", r, "< 1", r < 1)
        r = lf["opt_state_bytes"] / full["opt_state_bytes"]
        add("optimizer state, lorax_fn / full fine-tuning", r, "< 0.02", r < 0.02)
        best = min(x["step_ms"] for x in (full, naive, hand) if x)
        r = lf["step_ms"] / best
        add("step time, lorax_fn / fastest of full, naive, by hand", r, "≤ 1", r <= 1)
    m = next((x for x in mo if x.get("bench") == "merge"), None)
    if m:
        add("merge into new arrays / copy floor", m["ratio"], "≤ 1.5", m["ratio"] <= 1.5)
        if "in_place_ratio" in m:
            add("merge in place (`donate=True`) / copy floor", m["in_place_ratio"], "≤ 1.5",
                m["in_place_ratio"] <= 1.5)
    o = next((x for x in mo if x.get("bench") == "overhead"), None)
    if o:
        add("trace+compile, jit(lora(apply)) / jit(apply)", o["compile_ratio"], "≤ 1.5",
            o["compile_ratio"] <= 1.5)
        add("forward on unmerged adapters / merged", o["forward_auto_ratio"], "≤ 1.3",
            o["forward_auto_ratio"] <= 1.3)
    return rows


def write_docs(out, recs, text, sc) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "benchmarks.jsonl"), "w") as f:
        f.writelines(json.dumps(r, sort_keys=True) + "\n" for r in recs)
    S.plot(sc, os.path.join(out, "bench-scaling.png"))
    doc = os.path.join(out, "benchmarks.md")
    block = f"<!-- results:begin -->\n{text}\n\n![step time and memory against width](bench-scaling.png)\n<!-- results:end -->"
    if os.path.exists(doc):
        with open(doc) as f:
            old = f.read()
        new, n = re.subn(r"<!-- results:begin -->.*?<!-- results:end -->", lambda m: block, old,
                         flags=re.S)
        if not n:
            new = old.rstrip() + "\n\n" + block + "\n"
    else:
        new = "# Benchmarks\n\n" + block + "\n"
    with open(doc, "w") as f:
        f.write(new)


if __name__ == "__main__":
    main()
