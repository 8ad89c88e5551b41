"""The benchmark scripts run end to end at a tiny size (numbers are not asserted)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
PEFT_PYTHON = os.path.join(BENCH, ".venv-peft", "bin", "python")  # built by make bench-env
TINY = ["--layers", "1", "--d-model", "32", "--heads", "2", "--vocab", "64", "--seq", "8",
        "--batch", "2"]  # bench.py's --quick size


def records(stdout: str) -> list[dict]:
    return [json.loads(l[6:]) for l in stdout.splitlines() if l.startswith("BENCH ")]


@pytest.mark.slow
def test_standard_set_runs_and_writes_docs(tmp_path):
    out = tmp_path / "docs"
    env = {**os.environ, "JAX_LORAX_PYTHON": "", "PEFT_PYTHON": ""}
    proc = subprocess.run([sys.executable, os.path.join(BENCH, "bench.py"), "--quick",
                           "--write-docs", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = records(proc.stdout)
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


@pytest.mark.parametrize("script", ["train_step.py", "merge_overhead.py", "scaling.py", "bench.py",
                                    "torch_peft.py", "qlora.py"])
def test_help(script):
    proc = subprocess.run([sys.executable, os.path.join(BENCH, script), "--help"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "usage" in proc.stdout


def test_qlora_benchmark_runs_every_part_and_checks_its_bars(tmp_path):
    out = tmp_path / "qlora.jsonl"
    proc = subprocess.run([sys.executable, os.path.join(BENCH, "qlora.py"), *TINY, "--steps", "2",
                           "--big-layers", "1", "--big-d-model", "64", "--big-heads", "2", "--big-mlp", "128",
                           "--big-vocab", "128", "--quant-repeats", "1", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert not [r for r in recs if r.get("error")]
    assert "NF4+DQ ≤ 0.135× float32 (≤ 0.27× bfloat16): True" in proc.stdout
    assert "| QLoRA" in proc.stdout


needs_peft = pytest.mark.skipif(not os.path.exists(PEFT_PYTHON),
                                reason="no benchmarks/.venv-peft (make bench-env)")


@pytest.mark.slow
@needs_peft
def test_torch_peft_runs():
    proc = subprocess.run([PEFT_PYTHON, os.path.join(BENCH, "torch_peft.py"), *TINY, "--steps", "2"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    by = {r["config"]: r for r in records(proc.stdout)}
    assert set(by) == {"peft_full", "peft"}
    for r in by.values():
        assert "error" not in r, r
        assert r["framework"] == "torch" and 0 < r["step_ms"] < float("inf")
        assert r["machine"]["torch"] and r["machine"]["threads"] >= 1
    assert by["peft"]["base_unchanged"] is True
    assert by["peft"]["adapted_modules"] == 6  # q, k, v, o, mlp_in, mlp_out of the one block
    assert by["peft"]["trainable_params"] < by["peft_full"]["trainable_params"]


# run in the PEFT environment: B = 0 at init leaves the loss of the base model
# unchanged, and a few steps on one batch lower it in both configurations
CHECK = """
import sys, types
sys.path.insert(0, sys.argv[1])
import torch_peft as TP
s = TP.Shape(1, 32, 2, 128, 64, 8, 2)
tokens = TP.batches(s, 1)[0]
for config in ("peft_full", "peft"):
    model = TP.build_model(s, "float32")
    base = TP.loss_fn(model, tokens).item()
    if config == "peft":
        model = TP.lorafy(model, types.SimpleNamespace(rank=8, alpha=16.0))
        assert TP.loss_fn(model, tokens).item() == base
    step = TP.trainer(model)[0]
    losses = [step(tokens) for _ in range(5)]
    assert losses[0] == base and losses[-1] < losses[0], (config, losses)
print("ok")
"""


@pytest.mark.slow
@needs_peft
def test_torch_model_trains_and_lora_starts_at_the_base():
    proc = subprocess.run([PEFT_PYTHON, "-c", CHECK, BENCH], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
