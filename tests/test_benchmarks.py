"""The benchmark scripts run end to end at a tiny size (numbers are not asserted)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")


@pytest.mark.slow
def test_standard_set_runs_and_writes_docs(tmp_path):
    out = tmp_path / "docs"
    env = {**os.environ, "JAX_LORAX_PYTHON": ""}
    proc = subprocess.run([sys.executable, os.path.join(BENCH, "bench.py"), "--quick",
                           "--write-docs", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = [json.loads(l[6:]) for l in proc.stdout.splitlines() if l.startswith("BENCH ")]
    by = {(r.get("bench"), r.get("config")): r for r in recs}
    for config in ("full", "naive", "hand", "lorax_fn", "lorax_fn_split", "lorax_fn_factored"):
        r = by[("train_step", config)]
        assert "error" not in r, r
        assert r["step_ms"] > 0 and r["flops"] > 0 and r["compiled_bytes"] > 0
        assert r["machine"]["jax"] and r["machine"]["backend"]
    # baselines that cannot run say why instead of vanishing
    for config in ("jax_lorax", "peft"):
        assert by[(None, config)]["error"].startswith("not run")
    assert by[("merge", None)]["ratio"] > 0
    assert by[("overhead", None)]["compile_ratio"] > 0
    widths = {r["d_model"] for r in recs if r.get("bench") == "train_step"}
    assert widths == {16, 32}
    doc = (out / "benchmarks.md").read_text()
    assert "<!-- results:begin -->" in doc and "| full fine-tuning |" in doc
    assert (out / "bench-scaling.png").stat().st_size > 1000
    assert len((out / "benchmarks.jsonl").read_text().splitlines()) == len(recs)


@pytest.mark.parametrize("script", ["train_step.py", "merge_overhead.py", "scaling.py", "bench.py"])
def test_help(script):
    proc = subprocess.run([sys.executable, os.path.join(BENCH, script), "--help"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "usage" in proc.stdout
