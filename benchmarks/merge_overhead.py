"""Merge and transform-overhead benchmarks on the benchmark transformer.

    python benchmarks/merge_overhead.py             # both, one process each
    python benchmarks/merge_overhead.py --part merge

``merge``: jitted ``lf.merge`` of every adapter, into new arrays and in place
(``donate=True``), against a jitted copy of the same dense params
(``tree.map(lambda x: x + 0)``), the memory-bandwidth floor.

``overhead``: trace + compile time of ``jit(lora(apply))`` against
``jit(apply)``, and the steady-state forward of ``lora(apply)`` on unmerged
adapters against ``apply`` on merged params (inference).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402

import _common as C  # noqa: E402
import model as M  # noqa: E402


def _setup(a):
    import lorax_fn as lf
    shape = M.Shape(a.layers, a.d_model, a.heads, a.mlp or 4 * a.d_model, a.vocab, a.seq, a.batch)
    model, params = M.init(shape)
    lp = lf.lorafy(params, targets=M.TARGETS, rank=a.rank, alpha=a.alpha, key=jax.random.PRNGKey(0))
    # non-zero b, so merge and the low-rank terms do real work
    lp = lf.attach(lf.base(lp), jax.tree.map(lambda t: t + 0.01, lf.adapters(lp)))
    return lf, shape, model, params, lp


def _timed(fn, repeats, inputs=None) -> tuple[float, float]:
    """Median ms of ``fn()`` (or of ``fn(x)`` over fresh ``inputs``, for a ``fn`` that
    consumes its argument), and the minor page faults per call: a call whose outputs
    land in pages fresh from the OS pays for zeroing them."""
    it = iter(inputs or ())
    call = (lambda: fn(next(it))) if inputs else fn
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    ms = C.median_time(call, repeats)[0]
    return ms, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / (repeats + 2)


def bench_merge(a) -> dict:
    lf, shape, _, params, lp = _setup(a)
    merge = jax.jit(lf.merge)
    copy = jax.jit(lambda p: jax.tree.map(lambda x: x + 0, p))
    # in place: every call consumes its bases, so each gets its own copy, made untimed
    fresh = jax.jit(lambda t: jax.tree.map(lambda x: x + 0, t))
    in_place = lambda: _timed(lambda t: lf.merge(t, donate=True), a.repeats,  # noqa: E731
                              [C.block(fresh(lp)) for _ in range(a.repeats + 2)])
    # interleaved rounds: all are memory-bound and this machine's bandwidth drifts
    rounds = [(_timed(lambda: merge(lp), a.repeats), _timed(lambda: copy(params), a.repeats),
               in_place()) for _ in range(3)]
    (t_merge, f_merge), (t_copy, f_copy), (t_place, f_place) = (
        tuple(statistics.median(r[k][j] for r in rounds) for j in range(2)) for k in range(3))
    adapted = sum(int(x.w.size) for x in jax.tree.leaves(lp, is_leaf=lf.is_lora) if lf.is_lora(x))
    total = sum(int(x.size) for x in jax.tree.leaves(params))
    return {"bench": "merge", **dataclasses.asdict(shape), "rank": a.rank, "merge_ms": t_merge,
            "copy_ms": t_copy, "ratio": t_merge / t_copy, "merge_in_place_ms": t_place,
            "in_place_ratio": t_place / t_copy, "faults_per_call": {
                "merge": f_merge, "copy": f_copy, "merge_in_place": f_place},
            "params": total, "adapted_params": adapted, "machine": C.machine()}


def _compile_time(make_fn, args, repeats) -> float:
    times = []
    for _ in range(repeats):
        jax.clear_caches()
        fn = jax.jit(make_fn())
        t0 = time.perf_counter()
        fn.lower(*args).compile()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_overhead(a) -> dict:
    lf, shape, model, _, lp = _setup(a)
    apply = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
    tokens = M.batch(shape)[:, :-1]
    merged = jax.jit(lf.merge)(lp)
    c_plain = _compile_time(lambda: apply, (merged, tokens), a.compile_repeats)
    c_lora = _compile_time(lambda: lf.lora(apply), (lp, tokens), a.compile_repeats)
    rec = {"bench": "overhead", **dataclasses.asdict(shape), "rank": a.rank,
           "compile_plain_s": c_plain, "compile_lora_s": c_lora, "compile_ratio": c_lora / c_plain}
    f_plain = jax.jit(apply)
    t_plain, _ = C.median_time(lambda: f_plain(merged, tokens), a.repeats)
    rec.update(forward_merged_ms=t_plain)
    for form in ("auto", "factored"):
        f = jax.jit(lf.lora(apply, formulation=form))
        t, _ = C.median_time(lambda: f(lp, tokens), a.repeats)
        rec[f"forward_lora_{form}_ms"] = t
        rec[f"forward_{form}_ratio"] = t / t_plain
    rec["machine"] = C.machine()
    return rec


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["merge", "overhead"], help="run one part in this process")
    C.add_shape_flags(p)
    p.add_argument("--repeats", type=int, default=20, help="timed calls per measurement")
    p.add_argument("--compile-repeats", type=int, default=3)
    return p.parse_args(argv)


def run_all(a) -> list[dict]:
    args = C.flags(a, C.SHAPE_FLAGS + ["repeats", "compile_repeats"])
    recs = []
    for part in ("merge", "overhead"):
        recs += C.run_child([os.path.abspath(__file__), "--part", part, *args])
    return recs


def tables(recs) -> str:
    merge = [r for r in recs if r.get("bench") == "merge"]
    over = [r for r in recs if r.get("bench") == "overhead"]
    out = []
    if merge:
        out.append(C.table(merge, [("merge_ms", "merge, new arrays (ms)", "{:.2f}"),
                                   ("ratio", "× floor", "{:.2f}"),
                                   ("merge_in_place_ms", "merge, `donate=True` (ms)", "{:.2f}"),
                                   ("in_place_ratio", "× floor", "{:.2f}"),
                                   ("copy_ms", "copy floor (ms)", "{:.2f}")]))
    if over:
        out.append(C.table(over, [
            ("compile_plain_s", "compile jit(apply) (s)", "{:.2f}"),
            ("compile_lora_s", "compile jit(lora(apply)) (s)", "{:.2f}"),
            ("compile_ratio", "×", "{:.2f}"),
            ("forward_merged_ms", "forward, merged (ms)", "{:.1f}"),
            ("forward_lora_auto_ms", "forward, lora auto (ms)", "{:.1f}"),
            ("forward_auto_ratio", "×", "{:.2f}"),
            ("forward_lora_factored_ms", "forward, lora factored (ms)", "{:.1f}"),
            ("forward_factored_ratio", "×", "{:.2f}")]))
    errors = [r for r in recs if "error" in r]
    out += [f"error: {r['error']}" for r in errors]
    return "\n\n".join(out)


def main(argv=None) -> list[dict]:
    a = parse(argv)
    if a.part:
        C.emit(bench_merge(a) if a.part == "merge" else bench_overhead(a))
        return []
    recs = run_all(a)
    for r in recs:
        C.emit(r)
    print()
    print(tables(recs))
    return recs


if __name__ == "__main__":
    main()
