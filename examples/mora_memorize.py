"""MoRA against LoRA on memorisation: the MoRA paper's UUID-pair task in miniature.

Jiang et al. (2024, arXiv:2405.12130) argue that LoRA's low-rank update limits
how much *new* information fine-tuning can store, and show it on pairs of
random UUIDs a model must memorise. Here the pairs are random key → value
tokens: a frozen random "pretrained" network (key embedding → hidden → value
logits) must learn ``n_pairs`` arbitrary assignments through its two
kernels. Three ways to train it, side by side:

- LoRA of rank ``r`` on both kernels;
- MoRA (type 6) at the same trainable-parameter count (``variant="mora"``);
- full fine-tuning of both kernels (the upper bound, ~25× the parameters).

The script prints the trainable counts, final loss and accuracy of each, and
writes the loss curves to ``out/mora_memorize.png`` (with matplotlib). Run
``python examples/mora_memorize.py --help`` for the knobs; the defaults take
well under a minute on two CPU cores.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lorax_fn as lf


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Memorise random key→value pairs: LoRA vs MoRA vs full fine-tuning.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--pairs", type=int, default=1024, help="key→value pairs to memorise")
    p.add_argument("--values", type=int, default=256, help="size of the value vocabulary")
    p.add_argument("--d-model", type=int, default=64, help="key embedding width")
    p.add_argument("--hidden", type=int, default=256, help="hidden width")
    p.add_argument("--rank", type=int, default=4, help="LoRA rank r (MoRA matches its trainable count)")
    p.add_argument("--steps", type=int, default=400, help="full-batch Adam steps per method")
    p.add_argument("--lr", type=float, default=1e-2, help="learning rate (LoRA and full)")
    p.add_argument("--lr-mora", type=float, default=3e-2, help="learning rate for MoRA's M")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="out", help="directory for the plot")
    p.add_argument("--no-plot", action="store_true", help="skip the plot")
    return p.parse_args(argv)


@dataclass
class Result:
    trainable: int
    final_loss: float
    accuracy: float
    losses: list = field(repr=False)


@dataclass
class Summary:
    results: dict
    seconds: float


def model(params, keys):
    h = jax.nn.gelu(params["embed"][keys] @ params["up"]["kernel"])
    return h @ params["down"]["kernel"]


def count(tree) -> int:
    return sum(int(np.prod(getattr(n, c).shape)) for n in jax.tree.leaves(tree, is_leaf=lf.is_lora)
               if lf.is_lora(n) for c in n.trainable)


def train(lp, keys, values, lr, steps):
    apply = lf.lora(model)

    def loss_fn(lp):
        logits = apply(lp, keys)
        return optax.softmax_cross_entropy_with_integer_labels(logits, values).mean()

    tx = lf.optimizer(optax.adam(lr), lp)

    @jax.jit
    def step(carry, _):
        lp, opt = carry
        loss, g = jax.value_and_grad(loss_fn)(lp)
        upd, opt = tx.update(g, opt, lp)
        return (optax.apply_updates(lp, upd), opt), loss

    (lp, _), losses = jax.lax.scan(step, (lp, tx.init(lp)), None, length=steps)
    acc = float(jnp.mean(jnp.argmax(jax.jit(apply)(lp, keys), -1) == values))
    return lp, np.asarray(losses), acc


def main(argv=None) -> Summary:
    args = parse_args(argv)
    t0 = time.perf_counter()
    k_e, k_u, k_d, k_v, k_a = jax.random.split(jax.random.key(args.seed), 5)
    params = {  # the frozen "pretrained" network: random, knows nothing about the pairs
        "embed": jax.random.normal(k_e, (args.pairs, args.d_model)),
        "up": {"kernel": jax.random.normal(k_u, (args.d_model, args.hidden)) / np.sqrt(args.d_model)},
        "down": {"kernel": jax.random.normal(k_d, (args.hidden, args.values)) / np.sqrt(args.hidden)},
    }
    keys = jnp.arange(args.pairs)
    values = jax.random.randint(k_v, (args.pairs,), 0, args.values)
    kernels = ".*kernel"
    runs = {
        f"LoRA r={args.rank}": (lf.lorafy(params, rank=args.rank, targets=kernels, key=k_a), args.lr),
        "MoRA (type 6)": (lf.lorafy(params, rank=args.rank, targets=kernels, variant="mora"), args.lr_mora),
        "full fine-tuning": (lf.lorafy(params, targets=kernels, variant="full"), args.lr),
    }
    results = {}
    for name, (lp, lr) in runs.items():
        _, losses, acc = train(lp, keys, values, lr, args.steps)
        results[name] = Result(count(lp), float(losses[-1]), acc, losses.tolist())

    print(f"{args.pairs} random key→value pairs, {args.values} values, {args.steps} full-batch Adam steps")
    print(f"{'method':<20}{'trainable':>12}{'final loss':>12}{'accuracy':>10}")
    for name, r in results.items():
        print(f"{name:<20}{r.trainable:>12,}{r.final_loss:>12.4f}{100 * r.accuracy:>9.1f}%")
    if not args.no_plot:
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("matplotlib is not installed: no plot (pip install -e '.[examples]')")
        else:
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            fig, ax = plt.subplots(figsize=(6, 4))
            for name, r in results.items():
                ax.plot(r.losses, label=f"{name} ({r.trainable:,} trainable)")
            ax.set(xlabel="step", ylabel="cross-entropy", yscale="log", title="memorising random pairs")
            ax.legend()
            fig.tight_layout()
            fig.savefig(out / "mora_memorize.png", dpi=120)
            print(f"loss curves: {out / 'mora_memorize.png'}")
    s = Summary(results, time.perf_counter() - t0)
    print(f"wall time {s.seconds:.1f} s")
    return s


if __name__ == "__main__":
    main()
