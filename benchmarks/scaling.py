"""How the LoRA saving grows with model width: full fine-tuning, LoRA by hand
and lorax_fn at several ``d_model`` (MLP 4×, heads fixed), each configuration
in its own process. Prints JSON lines and a table; ``--plot`` writes a PNG of
step time and XLA's compiled memory against width.

    python benchmarks/scaling.py --widths 256,512,1024 --plot docs/bench-scaling.png
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as C  # noqa: E402
import train_step as T  # noqa: E402

CONFIGS = ("full", "hand", "lorax_fn")


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--widths", default="256,512,1024")
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--plot", help="write a PNG here")
    p.add_argument("train_step_args", nargs="*", help="extra flags for train_step.py (after --)")
    return p.parse_args(argv)


def run(widths, configs, steps, extra=(), reuse=()) -> list[dict]:
    """Records for every (width, config); ``reuse`` supplies ones already measured."""
    recs = []
    for d in widths:
        a = T.parse(["--d-model", str(d), "--steps", str(steps), *extra])
        for config in configs:
            have = [r for r in reuse if r.get("config") == config and r.get("d_model") == d
                    and "step_ms" in r]
            recs += [dict(r) for r in have[:1]] or C.run_child(T.child_argv(a, config))
    return T.derive_by_width(recs)


def plot(recs, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for config in dict.fromkeys(r["config"] for r in recs):
        rows = sorted((r for r in recs if r["config"] == config and "step_ms" in r),
                      key=lambda r: r["d_model"])
        if not rows:
            continue
        xs = [r["d_model"] for r in rows]
        label = T.LABELS[config]
        ax1.plot(xs, [r["step_ms"] for r in rows], marker="o", label=label)
        ax2.plot(xs, [r["compiled_bytes"] / 2**20 for r in rows], marker="o", label=label)
    for ax, title in ((ax1, "training step, median (ms)"), (ax2, "XLA compiled memory (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(f"d_model (MLP 4×, {recs[0].get('layers')} layers)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    ax1.legend(fontsize=8)
    m = next((r["machine"] for r in recs if "machine" in r), None)
    if m:
        fig.suptitle(C.machine_line(m), fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)


COLUMNS = [("d_model", "d_model", ""), ("label", "configuration", ""),
           ("step_ms", "step (ms)", "{:.1f}"), ("ratio", "× full", "{:.2f}"),
           ("gflops", "GFLOP", "{:.1f}"), ("compiled_mb", "compiled MiB", "{:.0f}"),
           ("mem_ratio", "memory × full", "{:.2f}"), ("peak_rss_mb", "peak RSS MiB", "{:.0f}")]


def main(argv=None) -> list[dict]:
    a = parse(argv)
    widths = [int(w) for w in a.widths.split(",")]
    recs = run(widths, a.configs.split(","), a.steps, a.train_step_args)
    for r in recs:
        C.emit(r)
    print()
    print(C.table(recs, COLUMNS))
    if a.plot:
        plot(recs, a.plot)
    return recs


if __name__ == "__main__":
    main()
