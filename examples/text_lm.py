"""Train a tiny byte-level transformer on English prose, then LoRA-adapt it to Python source.

Both texts ship with Python itself, so the demo needs no downloads:

* base domain: the prose of the interpreter's help topics (``pydoc_data.topics``,
  the text behind ``help("assignment")`` and friends), with the indented code
  examples dropped so that the base model sees English, not code;
* new domain: the source code of a few pure-Python stdlib modules.

The base model is a small decoder-only Flax Linen transformer
(``nn.MultiHeadDotProductAttention``, whose q/k/v kernels are 3-D DenseGeneral
kernels, and an ``nn.Embed`` tied to the output layer). After base training,
``lorax_fn`` freezes every weight and trains rank-r adapters only:

    lp = lf.lorafy(params, rank=8, fn=lambda p: model.apply({"params": p}, x))
    apply = lf.lora(model.apply)
    tx = lf.optimizer(optax.adamw(...), lp)

At the end the adapters are saved with ``lf.save_adapters`` (their size on
disk is printed next to the base model's) and reloaded onto the base with
``lf.load_adapters``, and the loss curves of both phases go to a PNG
(``--plot``, by default ``out/text_lm_loss.png``). The plot needs matplotlib
(``pip install -e ".[examples]"``); the script checks for it before training,
and ``--plot ''`` runs without it.

Run ``python examples/text_lm.py --help`` for the knobs; the defaults finish in
under two minutes on two CPU cores.
"""

from __future__ import annotations

import argparse
import inspect
import importlib
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

import lorax_fn as lf

VOCAB = 256  # raw UTF-8 bytes: no tokenizer to ship or fit
CODE_MODULES = ("textwrap", "dataclasses", "fractions", "argparse", "shlex", "string")


# ----------------------------------------------------------------- data
def prose_corpus() -> str:
    """English from the interpreter's help pages; falls back to stdlib docstrings."""
    try:
        from pydoc_data.topics import topics
        text = "\n".join(topics[k] for k in sorted(topics))
    except ImportError:  # some distributions strip pydoc_data
        text = _docstrings(("collections", "functools", "itertools", "os", "re", "json", "typing"))
    # indented lines are grammar rules and code samples; without them the base
    # model never sees Python syntax, which is what makes the second domain new
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln[:1].isspace()]
    return "\n".join(lines)


def _docstrings(modules) -> str:
    out = []
    for name in modules:
        mod = importlib.import_module(name)
        for _, obj in sorted(vars(mod).items()):
            doc = inspect.getdoc(obj) if callable(obj) else None
            if doc:
                out.append(doc)
    return "\n\n".join(out)


def code_corpus() -> str:
    return "\n\n".join(inspect.getsource(importlib.import_module(m)) for m in CODE_MODULES)


def to_bytes(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)


def split_holdout(data: np.ndarray, frac: float = 0.1):
    """Hold out the tail, so evaluation text is never a window the model trained on."""
    cut = int(len(data) * (1 - frac))
    return data[:cut], data[cut:]


def sample_batch(rng: np.random.Generator, data: np.ndarray, batch: int, seq_len: int):
    starts = rng.integers(0, len(data) - seq_len - 1, size=batch)
    return np.stack([data[s:s + seq_len + 1] for s in starts])


def eval_windows(data: np.ndarray, seq_len: int, n: int) -> np.ndarray:
    """``n`` evenly spread windows: the same text for every evaluation."""
    starts = np.linspace(0, len(data) - seq_len - 1, n).astype(int)
    return np.stack([data[s:s + seq_len + 1] for s in starts])


# ----------------------------------------------------------------- model
class Block(nn.Module):
    d_model: int
    n_heads: int

    @nn.compact
    def __call__(self, x, mask):
        h = nn.LayerNorm()(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=self.n_heads)(h, mask=mask)
        h = nn.LayerNorm()(x)
        h = nn.Dense(4 * self.d_model)(h)
        return x + nn.Dense(self.d_model)(nn.gelu(h))


class ByteLM(nn.Module):
    d_model: int = 96
    n_layers: int = 2
    n_heads: int = 4
    max_len: int = 64

    @nn.compact
    def __call__(self, tokens):
        embed = nn.Embed(VOCAB, self.d_model)
        pos = self.param("pos", nn.initializers.normal(0.02), (self.max_len, self.d_model))
        x = embed(tokens) + pos[: tokens.shape[-1]]
        mask = nn.make_causal_mask(tokens)
        for _ in range(self.n_layers):
            x = Block(self.d_model, self.n_heads)(x, mask)
        # tied output: the same table reads bytes in and scores them out
        return embed.attend(nn.LayerNorm()(x))


def next_byte_loss(logits, batch):
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()


# ----------------------------------------------------------------- training
def count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def train(name, step, state, data, args, rng, steps):
    """Run ``steps`` of ``step(state, batch) -> (state, loss)`` with a progress bar.

    Returns the final state and the training loss of every step.
    """
    bar = tqdm(range(steps), desc=name, unit="step", disable=args.quiet, mininterval=0.5,
               dynamic_ncols=True)
    losses = []
    for i in bar:
        state, loss = step(state, jnp.asarray(sample_batch(rng, data, args.batch, args.seq_len)))
        # kept on device: a float() per step would wait for every step to finish
        losses.append(loss)
        if i % 10 == 0 or i == steps - 1:
            bar.set_postfix(loss=f"{float(loss):.3f}")
    return state, np.asarray(jax.device_get(losses), dtype=np.float64)


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def smooth(x: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average, as long as ``x`` (shorter windows at the start)."""
    c = np.cumsum(np.insert(x, 0, 0.0))
    i = np.arange(1, len(x) + 1)
    lo = np.maximum(0, i - window)
    return (c[i] - c[lo]) / (i - lo)


def plot_losses(path: Path, base_losses, lora_losses, s: "Summary") -> None:
    """Write the training curves of both phases and the held-out code losses to ``path``."""
    # the object API with an Agg canvas: no pyplot state and no display needed
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    nb, nl = len(base_losses), len(lora_losses)
    window = max(1, min(25, (nb + nl) // 40))
    ax.plot(np.arange(nb), base_losses, color="tab:blue", alpha=0.25, lw=0.8)
    ax.plot(np.arange(nb), smooth(base_losses, window), color="tab:blue",
            label="pretraining on prose (all parameters)")
    ax.plot(nb + np.arange(nl), lora_losses, color="tab:orange", alpha=0.25, lw=0.8)
    ax.plot(nb + np.arange(nl), smooth(lora_losses, window), color="tab:orange",
            label=f"LoRA on Python source ({100 * s.trainable_share:.1f}% of parameters)")
    ax.axvline(nb, color="gray", ls=":", lw=1)
    ax.scatter([nb, nb + nl], [s.code_loss_before, s.code_loss_after], color="black", zorder=3,
               label="held-out code loss, before and after LoRA")
    ax.set_xlabel("training step")
    ax.set_ylabel("loss (nats per byte)")
    ax.set_title("Byte-level LM: pretrain on English prose, LoRA-adapt to Python source")
    ax.legend(loc="upper right")
    ax.grid(alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def schedule(lr: float, steps: int):
    warm = max(1, steps // 10)
    return optax.warmup_cosine_decay_schedule(0.0, lr, warm, max(steps, warm + 1), lr / 10)


@dataclass
class Summary:
    trainable: int
    total: int
    prose_loss_base: float
    code_loss_before: float
    code_loss_after: float
    prose_loss_after: float
    merge_max_diff: float
    explain_uses: int
    explain_materialised: int
    adapter_bytes: int
    base_bytes: int
    plot: str | None
    seconds: float

    @property
    def trainable_share(self) -> float:
        return self.trainable / self.total


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Byte-level transformer: pretrain on English prose, LoRA-adapt to Python source.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--d-model", type=int, default=96, help="embedding width")
    p.add_argument("--layers", type=int, default=2, help="transformer blocks")
    p.add_argument("--heads", type=int, default=4, help="attention heads")
    p.add_argument("--seq-len", type=int, default=64, help="bytes per training window")
    p.add_argument("--batch", type=int, default=16, help="windows per step")
    p.add_argument("--steps-base", type=int, default=800, help="pretraining steps on prose")
    p.add_argument("--steps-lora", type=int, default=300, help="LoRA steps on Python source")
    p.add_argument("--lr-base", type=float, default=3e-3, help="peak learning rate, pretraining")
    p.add_argument("--lr-lora", type=float, default=1e-2, help="peak learning rate, adapters")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank r")
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (scale alpha/r); default: rank")
    p.add_argument("--eval-windows", type=int, default=64, help="held-out windows per evaluation")
    p.add_argument("--seed", type=int, default=0, help="seed for init and batch sampling")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--explain", action="store_true", help="print the full lf.explain table")
    p.add_argument("--plot", default=os.path.join("out", "text_lm_loss.png"),
                   help="where to write the loss-curve PNG ('' for none; a plot needs matplotlib, "
                        "from pip install -e \".[examples]\")")
    p.add_argument("--adapter-dir", default=os.path.join("out", "text_lm_adapter"),
                   help="where lf.save_adapters writes the trained adapters (replaced if present)")
    args = p.parse_args(argv)
    if args.d_model % args.heads:
        p.error("--d-model must be divisible by --heads")
    require_plotting(args.plot)
    return args


def require_plotting(plot: str | None) -> None:
    """Stop at start-up, not after minutes of training, when the plot cannot be drawn."""
    if not plot:
        return
    try:
        import matplotlib  # noqa: F401  (an optional dependency: the extra "examples")
    except ImportError:
        raise SystemExit("text_lm.py: the loss plot needs matplotlib, which is not installed: run "
                         "pip install -e \".[examples]\" (or pass --plot '' to run without the plot)") from None


def main(argv=None) -> Summary:
    args = parse_args(argv)
    t0 = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    key_init, key_lora = jax.random.split(jax.random.key(args.seed))

    prose_train, prose_test = split_holdout(to_bytes(prose_corpus()))
    code_train, code_test = split_holdout(to_bytes(code_corpus()))
    print(f"prose: {len(prose_train):,} train / {len(prose_test):,} held-out bytes (pydoc help topics)")
    print(f"code:  {len(code_train):,} train / {len(code_test):,} held-out bytes "
          f"(stdlib source: {', '.join(CODE_MODULES)})")
    prose_eval = jnp.asarray(eval_windows(prose_test, args.seq_len, args.eval_windows))
    code_eval = jnp.asarray(eval_windows(code_test, args.seq_len, args.eval_windows))

    model = ByteLM(args.d_model, args.layers, args.heads, args.seq_len)
    params = model.init(key_init, prose_eval[:1, :-1])["params"]

    # ---- 1. ordinary pretraining on prose
    tx = optax.adamw(schedule(args.lr_base, args.steps_base), weight_decay=0.01)

    def base_loss(p, batch):
        return next_byte_loss(model.apply({"params": p}, batch[:, :-1]), batch)

    @jax.jit
    def base_step(state, batch):
        p, opt = state
        loss, g = jax.value_and_grad(base_loss)(p, batch)
        upd, opt = tx.update(g, opt, p)
        return (optax.apply_updates(p, upd), opt), loss

    base_eval = jax.jit(base_loss)

    print(f"base model: {count(params):,} parameters")
    (params, _), base_losses = train("pretrain on prose", base_step, (params, tx.init(params)),
                                     prose_train, args, rng, args.steps_base)
    prose_base = float(base_eval(params, prose_eval))
    code_before = float(base_eval(params, code_eval))

    # ---- 2. LoRA: the base is frozen, only the adapters train
    # fn= lets lorafy see how each kernel is contracted, so the (embed, heads,
    # head_dim) q/k/v kernels are factored embed -> (heads, head_dim)
    lp = lf.lorafy(params, rank=args.rank, alpha=args.alpha, key=key_lora,
                   fn=lambda p: model.apply({"params": p}, prose_eval[:1, :-1]))
    apply = lf.lora(model.apply)
    trainable, total = count(lf.adapters(lp)), count(lp)
    n_adapted = sum(map(lf.is_lora, jax.tree.leaves(lp, is_leaf=lf.is_lora)))
    print(f"LoRA rank {args.rank} on {n_adapted} weights: {trainable:,} trainable of {total:,} "
          f"parameters ({100 * trainable / total:.2f}%)")

    report = lf.explain(model.apply, {"params": lp}, code_eval[:1, :-1])
    print(f"explain: {len(report)} uses of LoRA weights, {len(report.materialized)} materialised")
    if args.explain:
        print(report)

    ltx = lf.optimizer(optax.adamw(schedule(args.lr_lora, args.steps_lora), weight_decay=0.0), lp)

    def lora_loss(lp, batch):
        return next_byte_loss(apply({"params": lp}, batch[:, :-1]), batch)

    @jax.jit
    def lora_step(state, batch):
        lp, opt = state
        loss, g = jax.value_and_grad(lora_loss)(lp, batch)
        upd, opt = ltx.update(g, opt, lp)
        return (optax.apply_updates(lp, upd), opt), loss

    (lp, _), lora_losses = train("LoRA on Python source", lora_step, (lp, ltx.init(lp)),
                                 code_train, args, rng, args.steps_lora)
    code_after = float(jax.jit(lora_loss)(lp, code_eval))
    assert code_after < code_before, "LoRA training did not lower the held-out code loss"

    # ---- 3. merge: a plain dense tree for the unmodified model, same outputs
    dense = jax.jit(lf.merge)(lp)
    assert jax.tree.structure(dense) == jax.tree.structure(params)
    wrapped = jax.jit(lambda lp, x: apply({"params": lp}, x))(lp, code_eval[:, :-1])
    merged = jax.jit(lambda p, x: model.apply({"params": p}, x))(dense, code_eval[:, :-1])
    diff = float(jnp.max(jnp.abs(wrapped - merged)))
    tol = 1e-4 * max(1.0, float(jnp.max(jnp.abs(merged))))
    assert diff <= tol, f"merged model disagrees with the LoRA model: max |diff| {diff:g} > {tol:g}"
    prose_after = float(base_eval(dense, prose_eval))
    # the frozen base is untouched by LoRA training: bit for bit
    assert all(bool((x == y).all()) for x, y in zip(jax.tree.leaves(lf.base(lp)), jax.tree.leaves(params)))

    # ---- 4. save only the adapters, reload them onto the base, check nothing changed
    # a rerun of the demo replaces the previous run's checkpoint
    adapter_dir = lf.save_adapters(args.adapter_dir, lp, overwrite=True)
    reloaded = lf.load_adapters(adapter_dir, params)
    assert float(jax.jit(lora_loss)(reloaded, code_eval)) == code_after, "reloaded adapters differ"
    base_bytes = sum(x.nbytes for x in jax.tree.leaves(params))

    s = Summary(trainable, total, prose_base, code_before, code_after, prose_after, diff,
                len(report), len(report.materialized), directory_bytes(adapter_dir), base_bytes,
                args.plot or None, time.perf_counter() - t0)
    if args.plot:
        plot_losses(Path(args.plot), base_losses, lora_losses, s)
    print()
    print("summary")
    print(f"  trainable share       {100 * s.trainable_share:.2f}% ({s.trainable:,} / {s.total:,})")
    print(f"  held-out prose loss   {s.prose_loss_base:.3f} nats/byte after pretraining")
    print(f"  held-out code loss    {s.code_loss_before:.3f} -> {s.code_loss_after:.3f} nats/byte "
          f"(before -> after LoRA; {s.code_loss_before / math.log(2):.2f} -> "
          f"{s.code_loss_after / math.log(2):.2f} bits/byte)")
    print(f"  prose loss, adapted   {s.prose_loss_after:.3f} nats/byte (merged model)")
    print(f"  merge max |diff|      {s.merge_max_diff:.2e} (logits, LoRA model vs merged dense model)")
    print(f"  explain               {s.explain_uses} uses, {s.explain_materialised} materialised")
    print(f"  adapters on disk      {s.adapter_bytes / 1024:.1f} KiB in {args.adapter_dir} "
          f"(base weights: {s.base_bytes / 1024:.1f} KiB in memory)")
    if s.plot:
        print(f"  loss curve            {s.plot}")
    print(f"  wall time             {s.seconds:.1f} s")
    return s


if __name__ == "__main__":
    main()
