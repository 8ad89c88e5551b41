"""Shared plumbing for the benchmark scripts: timing, XLA analyses, process
memory, the machine record, JSON lines and Markdown tables, subprocesses.

Self-contained (no lorax_fn import) so baselines can run it in their own
environments; JAX is imported only where it is used, so the PyTorch script
can run it in an environment without JAX.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Iterable


def _cpu() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "python": platform.python_version(),
    }


def machine(framework: str = "jax") -> dict[str, Any]:
    """What the numbers were measured on, as seen by ``framework`` (``"jax"`` or ``"torch"``)."""
    if framework == "torch":
        import torch
        return {"torch": torch.__version__, "backend": "cpu", "device": "cpu",
                "threads": torch.get_num_threads(), **_cpu()}
    import jax
    dev = jax.devices()[0]
    return {
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "device": getattr(dev, "device_kind", str(dev)),
        "devices": jax.device_count(),
        **_cpu(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


def block(tree):
    import jax
    return jax.tree.map(lambda x: x.block_until_ready() if hasattr(x, "block_until_ready") else x,
                        tree)


def median_time(step: Callable[[], Any], steps: int, warmup: int = 2,
                sync: Callable[[Any], Any] = block) -> tuple[float, list[float]]:
    """Median wall time of ``step()`` in ms, each call waited for with ``sync(result)``
    (default: block on every JAX array in it)."""
    for _ in range(warmup):
        sync(step())
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        sync(step())
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), times


def train_steps(step: Callable[[Any, Any], tuple[Any, Any]], state: Any, batches: list,
                steps: int) -> tuple[dict[str, Any], Any]:
    """Run ``state, loss = step(state, batch)`` over ``batches`` in turn (2 warm-up calls, then
    ``steps`` timed): ``(record, final state)``, the record with the median step time, every
    time, the first and last loss, the peak RSS and the machine."""
    box = {"state": state, "i": 0, "losses": []}

    def one():
        box["state"], loss = step(box["state"], batches[box["i"] % len(batches)])
        box["i"] += 1
        box["losses"].append(loss)
        return loss

    med, times = median_time(one, steps, warmup=2)
    rec = {"step_ms": med, "step_ms_all": [round(t, 2) for t in times],
           "loss_first": float(box["losses"][0]), "loss_last": float(box["losses"][-1]),
           "peak_rss_mb": peak_rss_mb(), "machine": machine()}
    return rec, box["state"]


def analyses(compiled) -> dict[str, Any]:
    """Compiled FLOPs and XLA's memory plan (bytes) of a ``jax.stages.Compiled``."""
    out: dict[str, Any] = {}
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older JAX returns one dict per computation
        cost = cost[0] if cost else {}
    out["flops"] = float(cost.get("flops", float("nan"))) if cost else float("nan")
    mem = compiled.memory_analysis()
    if mem is not None:
        for k in ("argument", "output", "temp", "alias"):
            out[f"{k}_bytes"] = int(getattr(mem, f"{k}_size_in_bytes", 0))
        # what the step needs resident: inputs + outputs that are not donated back + scratch
        out["compiled_bytes"] = out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"] \
            + out["temp_bytes"]
    return out


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB."""
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


def tree_bytes(tree) -> int:
    import jax
    return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, "dtype"))


def emit(record: dict[str, Any]) -> None:
    """One JSON line on stdout, tagged so the parent can pick it out of the noise."""
    print("BENCH " + json.dumps(record, sort_keys=True), flush=True)


def finish(recs: list[dict[str, Any]], report: str, json_path: str | None) -> list[dict[str, Any]]:
    """Print every record (``BENCH`` lines), then the report; write the records as JSON lines too."""
    for r in recs:
        emit(r)
    print()
    print(report)
    if json_path:
        with open(json_path, "w") as f:
            f.writelines(json.dumps(r, sort_keys=True) + "\n" for r in recs)
    return recs


def run_child(argv: list[str], timeout: float = 1200, python: str | None = None,
              env: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Run a benchmark configuration in its own process; return its records.

    A child that fails yields one record with ``"error"`` so no row is dropped silently.
    """
    cmd = [python or sys.executable, *argv]
    shown = [os.path.basename(argv[0]), *argv[1:]]  # records may be committed: no machine paths
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired:
        return [{"error": f"timed out after {timeout:.0f} s", "argv": shown}]
    recs = [json.loads(l[6:]) for l in proc.stdout.splitlines() if l.startswith("BENCH ")]
    if proc.returncode != 0 or not recs:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        recs.append({"error": " | ".join(tail) or f"exit {proc.returncode}", "argv": shown})
    return recs


def table(rows: Iterable[dict[str, Any]], columns: list[tuple[str, str, str]]) -> str:
    """A Markdown table. ``columns`` are ``(key, header, format)``; missing cells print ``–``."""
    lines = ["| " + " | ".join(h for _, h, _ in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    for r in rows:
        cells = []
        for key, _, fmt in columns:
            v = r.get(key)
            cells.append("–" if v is None or v != v else (fmt.format(v) if fmt else str(v)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine_line(m: dict[str, Any]) -> str:
    if "torch" in m:
        return (f"{m['cpus']} × {m['cpu']} ({m['backend']}), PyTorch {m['torch']} on "
                f"{m['threads']} threads, Python {m['python']}")
    flags = f", XLA_FLAGS={m['xla_flags']}" if m.get("xla_flags") else ""
    return (f"{m['cpus']} × {m['cpu']} ({m['backend']}, {m['device']}), JAX {m['jax']}, "
            f"Python {m['python']}{flags}")


# the model and adapter size flags every benchmark script takes, so that a parent
# can hand its sizes to a child process (and train_step's to torch_peft's)
SHAPE_FLAGS = ["layers", "d_model", "heads", "mlp", "vocab", "seq", "batch", "rank", "alpha"]


def add_shape_flags(p) -> None:
    """Add the size flags (``SHAPE_FLAGS``) with the standard benchmark's defaults."""
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--mlp", type=int, default=0, help="MLP width (default 4 × d_model)")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)


def flags(a, names) -> list[str]:
    """``--name=value`` for each attribute ``name`` of the parsed arguments ``a``."""
    return [f"--{k.replace('_', '-')}={getattr(a, k)}" for k in names]
