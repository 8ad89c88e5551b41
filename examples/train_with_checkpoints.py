"""A LoRA fine-tuning loop that survives being killed: Orbax checkpoints every few steps.

Run it, interrupt it (Ctrl-C, ``kill -9``, a preempted TPU), run the same
command again: it finds the latest committed checkpoint and carries on, and
the losses are exactly those of a run that was never interrupted. Only the
adapters, the optimizer state, the step and the PRNG key are written, never
the frozen base, so each checkpoint is a few kilobytes here and a few
megabytes for a real transformer.

The task: a small Flax Linen MLP (the frozen "pretrained" base) adapts with
rank-r LoRA, plus fully trained biases, to a classification task labelled by
a different random network. Every batch is a function of the seed and the
step number, and input noise is drawn from the checkpointed key, so a resumed
run sees exactly the data the uninterrupted run would have seen.

The loop is the documented pattern::

    ckpt = lf.AdapterCheckpointManager(dir, max_to_keep=3, save_interval_steps=25,
                                       trainable=".*bias")
    start = 0
    if ckpt.latest_step() is not None:
        lp, opt_state, start, rng = ckpt.restore(lp, opt_state, rng)
    for step in range(start, steps):
        lp, opt_state, rng, loss = train_step(lp, opt_state, rng, step)
        ckpt.save(step + 1, lp, opt_state, rng)   # async; only every 25 steps
    ckpt.close()                                  # waits for the last write

``python examples/train_with_checkpoints.py --help`` lists the knobs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from tqdm.auto import tqdm

import lorax_fn as lf

TRAINABLE = ".*bias"  # trained in full next to the adapters, and checkpointed with them


class MLP(nn.Module):
    width: int
    classes: int

    @nn.compact
    def __call__(self, x):
        x = nn.gelu(nn.Dense(self.width, name="fc1")(x))
        x = nn.gelu(nn.Dense(self.width, name="fc2")(x))
        return nn.Dense(self.classes, name="head")(x)


def batch(seed: int, step: int, n: int, d_in: int) -> jax.Array:
    """Inputs of one step: a pure function of (seed, step), so any run sees the same stream."""
    return jax.random.normal(jax.random.fold_in(jax.random.key(seed), step), (n, d_in))


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


@dataclass
class Summary:
    start_step: int  # 0 for a fresh run, else the checkpoint it resumed from
    end_step: int
    final_loss: float
    accuracy: float  # on a fixed held-out batch, after training
    steps_on_disk: list
    checkpoint_bytes: int  # one step directory
    base_bytes: int  # the frozen base, in memory (never written)
    seconds: float


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="LoRA fine-tuning with resumable Orbax checkpoints: interrupt it and run it again.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=300, help="total training steps of the run")
    p.add_argument("--ckpt-dir", default=os.path.join("out", "train_with_checkpoints"),
                   help="checkpoint directory; a rerun resumes from its latest step")
    p.add_argument("--save-every", type=int, default=25, help="checkpoint interval in steps")
    p.add_argument("--max-to-keep", type=int, default=3, help="checkpoints kept on disk")
    p.add_argument("--sync", action="store_true", help="save synchronously (default: in the background)")
    p.add_argument("--fresh", action="store_true", help="delete --ckpt-dir first instead of resuming")
    p.add_argument("--d-in", type=int, default=32, help="input features")
    p.add_argument("--width", type=int, default=256, help="hidden width of the MLP")
    p.add_argument("--classes", type=int, default=10, help="output classes")
    p.add_argument("--rank", type=int, default=4, help="LoRA rank r")
    p.add_argument("--batch", type=int, default=128, help="examples per step")
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate")
    p.add_argument("--noise", type=float, default=0.1, help="input noise, drawn from the checkpointed key")
    p.add_argument("--seed", type=int, default=0, help="seed of the base, the task, the data and the key")
    p.add_argument("--loss-log", default="",
                   help="append '<step> <loss as float.hex()>' per step to this file (exact, for comparisons)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv=None) -> Summary:
    args = parse_args(argv)
    t0 = time.perf_counter()
    ckpt_dir = Path(args.ckpt_dir)
    if args.fresh and ckpt_dir.exists():
        shutil.rmtree(ckpt_dir)

    model = MLP(args.width, args.classes)
    x0 = jnp.zeros((1, args.d_in))
    init = jax.jit(model.init)  # one compilation instead of one per initializer
    params = init(jax.random.key(args.seed), x0)["params"]  # stands in for pretrained weights
    teacher = init(jax.random.key(args.seed + 1), x0)["params"]  # labels the new task

    def labels(x):
        return jnp.argmax(model.apply({"params": teacher}, x), -1)

    lp = lf.lorafy(params, rank=args.rank, key=jax.random.key(args.seed + 2))
    apply = lf.lora(model.apply)
    tx = lf.optimizer(optax.adamw(args.lr), lp, trainable=TRAINABLE)
    opt_state = tx.init(lp)
    rng = jax.random.key(args.seed + 3)

    def loss_fn(lp, x, y):
        logits = apply({"params": lp}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def train_step(lp, opt_state, rng, step):
        rng, sub = jax.random.split(rng)
        x = batch(args.seed, step, args.batch, args.d_in)
        y = labels(x)
        x = x + args.noise * jax.random.normal(sub, x.shape)
        loss, g = jax.value_and_grad(loss_fn)(lp, x, y)
        updates, opt_state = tx.update(g, opt_state, lp)
        return optax.apply_updates(lp, updates), opt_state, rng, loss

    ckpt = lf.AdapterCheckpointManager(ckpt_dir, max_to_keep=args.max_to_keep,
                                       save_interval_steps=args.save_every, async_save=not args.sync,
                                       trainable=TRAINABLE, metadata={"example": "train_with_checkpoints"})
    start = 0
    if ckpt.latest_step() is not None:
        lp, opt_state, start, rng = ckpt.restore(lp, opt_state, rng)
        print(f"resumed from step {start} ({ckpt.step_directory(start)})", flush=True)
    else:
        print(f"fresh run; checkpoints go to {ckpt.directory}", flush=True)

    log = open(args.loss_log, "a", buffering=1) if args.loss_log else None
    loss, last_saved = float("nan"), start
    try:
        bar = tqdm(range(start, args.steps), initial=start, total=args.steps, desc="lora", unit="step",
                   disable=args.quiet, mininterval=0.5)
        for step in bar:
            lp, opt_state, rng, loss_arr = train_step(lp, opt_state, rng, step)
            loss = float(loss_arr)
            if log:
                log.write(f"{step + 1} {loss.hex()}\n")
            bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            if ckpt.save(step + 1, lp, opt_state, rng):
                last_saved = step + 1
        if last_saved < args.steps:
            ckpt.save(args.steps, lp, opt_state, rng, force=True)  # the final state, off the interval
    finally:
        ckpt.close()  # waits for the background write
        if log:
            log.close()

    @jax.jit
    def accuracy_of(lp, x):
        return (jnp.argmax(apply({"params": lp}, x), -1) == labels(x)).mean()

    accuracy = float(accuracy_of(lp, jax.random.normal(jax.random.key(args.seed + 4), (1024, args.d_in))))
    steps_on_disk = ckpt.all_steps()
    last = ckpt.step_directory(steps_on_disk[-1]) if steps_on_disk else ckpt_dir
    s = Summary(start, max(start, args.steps), loss, accuracy, steps_on_disk, directory_bytes(last),
                sum(x.nbytes for x in jax.tree.leaves(params)), time.perf_counter() - t0)

    print()
    print("summary")
    print(f"  steps              {s.start_step} -> {s.end_step}"
          + (f" (resumed from step {s.start_step})" if s.start_step else " (fresh run)"))
    print(f"  final loss         {s.final_loss:.4f}")
    print(f"  held-out accuracy  {100 * s.accuracy:.1f}% (random: {100 / args.classes:.0f}%)")
    print(f"  checkpoints        steps {s.steps_on_disk} in {ckpt.directory}")
    print(f"  one checkpoint     {s.checkpoint_bytes / 1024:.1f} KiB on disk (adapters, biases, optimizer "
          f"state, step, key); the frozen base is {s.base_bytes / 1024:.1f} KiB and is not written")
    print(f"  wall time          {s.seconds:.1f} s")
    return s


if __name__ == "__main__":
    main()
