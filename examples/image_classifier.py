"""Train a small Flax Linen CNN on digit images, then LoRA-adapt it to a shifted domain.

The images are drawn here, so the example needs no download: each digit is a
5x7 bitmap glyph, scaled up, placed at a random offset with random stroke
strength and pixel noise. The base domain is upright white-on-black digits; the
new domain is the same digits rotated by 90 degrees and inverted (dark ink on a
light background), which the base model has never seen and gets mostly wrong.

After base training every weight is frozen and only rank-r adapters on the
convolution and dense kernels train:

    lp = lf.lorafy(params, rank=4)
    apply = lf.lora(model.apply)
    tx = lf.optimizer(optax.adam(...), lp)

Run ``python examples/image_classifier.py --help`` for the knobs; the defaults
take well under a minute on two CPU cores.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

import lorax_fn as lf

# 5x7 glyphs, one string per row ("#" = ink)
GLYPHS = {
    0: (" ### ", "#   #", "#  ##", "# # #", "##  #", "#   #", " ### "),
    1: ("  #  ", " ##  ", "# #  ", "  #  ", "  #  ", "  #  ", "#####"),
    2: (" ### ", "#   #", "    #", "   # ", "  #  ", " #   ", "#####"),
    3: ("#### ", "    #", "    #", " ### ", "    #", "    #", "#### "),
    4: ("   # ", "  ## ", " # # ", "#  # ", "#####", "   # ", "   # "),
    5: ("#####", "#    ", "#### ", "    #", "    #", "#   #", " ### "),
    6: ("  ## ", " #   ", "#    ", "#### ", "#   #", "#   #", " ### "),
    7: ("#####", "    #", "   # ", "  #  ", " #   ", " #   ", " #   "),
    8: (" ### ", "#   #", "#   #", " ### ", "#   #", "#   #", " ### "),
    9: (" ### ", "#   #", "#   #", " ####", "    #", "   # ", " ##  "),
}
CLASSES = len(GLYPHS)


def glyph_bitmaps() -> np.ndarray:
    """``(10, 7, 5)`` float array of the glyphs, 1 where there is ink."""
    return np.array([[[c == "#" for c in row] for row in GLYPHS[d]] for d in range(CLASSES)],
                    dtype=np.float32)


def draw(rng: np.random.Generator, n: int, size: int, shifted: bool):
    """``n`` random digit images ``(n, size, size, 1)`` in [0, 1] and their labels.

    ``shifted=True`` draws the new domain: rotated by 90 degrees and inverted.
    """
    scale = max(1, (size - 2) // 7)
    glyphs = glyph_bitmaps().repeat(scale, axis=1).repeat(scale, axis=2)
    gh, gw = glyphs.shape[1:]
    labels = rng.integers(0, CLASSES, n)
    images = np.zeros((n, size, size), np.float32)
    ys = rng.integers(0, size - gh + 1, n)
    xs = rng.integers(0, size - gw + 1, n)
    ink = rng.uniform(0.6, 1.0, n).astype(np.float32)
    for i in range(n):
        images[i, ys[i]:ys[i] + gh, xs[i]:xs[i] + gw] = glyphs[labels[i]] * ink[i]
    images += rng.normal(0.0, 0.15, images.shape).astype(np.float32)
    if shifted:
        images = 1.0 - np.rot90(images, k=1, axes=(1, 2))
    return np.clip(images, 0.0, 1.0)[..., None], labels.astype(np.int32)


class CNN(nn.Module):
    width: int = 16

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(self.width, (3, 3), name="conv1")(x))
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = nn.relu(nn.Conv(2 * self.width, (3, 3), name="conv2")(x))
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(8 * self.width, name="dense")(x))
        return nn.Dense(CLASSES, name="head")(x)


def xent(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def accuracy(logits, labels) -> float:
    return float((jnp.argmax(logits, -1) == labels).mean())


def count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def train(name, step, state, rng, args, steps, shifted):
    """``steps`` of ``step(state, x, y) -> (state, loss)`` on fresh images, with a progress bar."""
    losses = []
    bar = tqdm(range(steps), desc=name, unit="step", disable=args.quiet, mininterval=0.5,
               dynamic_ncols=True)
    for i in bar:
        x, y = draw(rng, args.batch, args.size, shifted)
        state, loss = step(state, jnp.asarray(x), jnp.asarray(y))
        losses.append(loss)
        if i % 20 == 0 or i == steps - 1:
            bar.set_postfix(loss=f"{float(loss):.3f}")
    return state, np.asarray(jax.device_get(losses))


@dataclass
class Summary:
    trainable: int
    total: int
    base_acc: float
    new_acc_before: float
    new_acc_after: float
    base_acc_after: float
    merge_max_diff: float
    explain_uses: int
    explain_materialised: int
    seconds: float


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Linen CNN on drawn digits: train on upright images, LoRA-adapt to rotated, "
                    "inverted ones.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--size", type=int, default=16, help="image side in pixels (at least 9)")
    p.add_argument("--width", type=int, default=16, help="channels of the first convolution")
    p.add_argument("--batch", type=int, default=64, help="images per step")
    p.add_argument("--steps-base", type=int, default=400, help="training steps on the base domain")
    p.add_argument("--steps-lora", type=int, default=300, help="LoRA steps on the new domain")
    p.add_argument("--lr-base", type=float, default=3e-3, help="learning rate, base training")
    p.add_argument("--lr-lora", type=float, default=1e-2, help="learning rate, adapters")
    p.add_argument("--rank", type=int, default=4, help="LoRA rank r")
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (scale alpha/r); default: rank")
    p.add_argument("--eval-size", type=int, default=1000, help="held-out images per evaluation")
    p.add_argument("--seed", type=int, default=0, help="seed for init and image sampling")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if args.size < 9:
        p.error("--size must be at least 9 (a 5x7 glyph plus room to move)")
    return args


def main(argv=None) -> Summary:
    args = parse_args(argv)
    t0 = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    key_init, key_lora = jax.random.split(jax.random.key(args.seed))
    # a separate stream for the held-out sets, so they do not depend on the step counts
    eval_rng = np.random.default_rng(args.seed + 1)
    xb, yb = map(jnp.asarray, draw(eval_rng, args.eval_size, args.size, shifted=False))
    xn, yn = map(jnp.asarray, draw(eval_rng, args.eval_size, args.size, shifted=True))

    model = CNN(args.width)
    params = model.init(key_init, xb[:1])["params"]
    print(f"base model: {count(params):,} parameters, {args.size}x{args.size} images, "
          f"{CLASSES} classes")

    # ---- 1. ordinary training on upright digits
    tx = optax.adam(args.lr_base)

    @jax.jit
    def base_step(state, x, y):
        p, opt = state
        loss, g = jax.value_and_grad(lambda p: xent(model.apply({"params": p}, x), y))(p)
        upd, opt = tx.update(g, opt, p)
        return (optax.apply_updates(p, upd), opt), loss

    (params, _), _ = train("train on upright digits", base_step, (params, tx.init(params)), rng,
                           args, args.steps_base, shifted=False)
    logits = jax.jit(lambda p, x: model.apply({"params": p}, x))
    base_acc = accuracy(logits(params, xb), yb)
    new_before = accuracy(logits(params, xn), yn)

    # ---- 2. LoRA on the rotated, inverted digits: the base stays frozen
    lp = lf.lorafy(params, rank=args.rank, alpha=args.alpha, key=key_lora)
    apply = lf.lora(model.apply)
    trainable, total = count(lf.adapters(lp)), count(lp)
    print(f"LoRA rank {args.rank}: {trainable:,} trainable of {total:,} parameters "
          f"({100 * trainable / total:.2f}%)")
    report = lf.explain(model.apply, {"params": lp}, xn[:1])

    ltx = lf.optimizer(optax.adam(args.lr_lora), lp)

    @jax.jit
    def lora_step(state, x, y):
        lp, opt = state
        loss, g = jax.value_and_grad(lambda lp: xent(apply({"params": lp}, x), y))(lp)
        upd, opt = ltx.update(g, opt, lp)
        return (optax.apply_updates(lp, upd), opt), loss

    (lp, _), _ = train("LoRA on rotated digits", lora_step, (lp, ltx.init(lp)), rng, args,
                       args.steps_lora, shifted=True)

    # ---- 3. merge: an ordinary parameter tree for the unmodified model
    dense = jax.jit(lf.merge)(lp)
    # LoRA training never touched the base: bit for bit the trained base model
    assert all(bool((x == y).all()) for x, y in zip(jax.tree.leaves(lf.base(lp)), jax.tree.leaves(params)))
    lora_logits = jax.jit(lambda lp, x: apply({"params": lp}, x))(lp, xn)
    merged_logits = logits(dense, xn)
    diff = float(jnp.max(jnp.abs(lora_logits - merged_logits)))
    s = Summary(trainable, total, base_acc, new_before, accuracy(merged_logits, yn),
                accuracy(logits(dense, xb), yb), diff, len(report), len(report.materialized),
                time.perf_counter() - t0)
    print()
    print("summary")
    print(f"  trainable share          {100 * s.trainable / s.total:.2f}% ({s.trainable:,} / {s.total:,})")
    print(f"  upright accuracy         {100 * s.base_acc:.1f}% after base training")
    print(f"  rotated accuracy         {100 * s.new_acc_before:.1f}% -> {100 * s.new_acc_after:.1f}% "
          f"(before -> after LoRA)")
    print(f"  upright accuracy         {100 * s.base_acc_after:.1f}% with the adapter; the frozen base "
          f"(lf.base) still scores {100 * s.base_acc:.1f}%")
    print(f"  merge max |diff|         {s.merge_max_diff:.2e} (logits, LoRA model vs merged model)")
    print(f"  explain                  {s.explain_uses} uses, {s.explain_materialised} materialised")
    print(f"  wall time                {s.seconds:.1f} s")
    return s


if __name__ == "__main__":
    main()
