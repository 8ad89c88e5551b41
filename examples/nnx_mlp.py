"""LoRA on a Flax NNX model: ``nnx.split`` to a state pytree, adapt it, ``nnx.merge`` back.

A student MLP first learns to imitate a teacher network. Then the teacher
changes: its middle layer gets a low-rank update, the kind of shift LoRA is
built to capture. The student's weights are frozen and only rank-r adapters
train, on the new teacher's outputs. Nothing NNX-specific is needed from
lorax_fn: the module is split into a graph definition and a state, the state is
just a pytree, and the forward function merges them back:

    graphdef, state = nnx.split(model)
    forward = lambda state, x: nnx.merge(graphdef, state)(x)
    lp = lf.lorafy(state, rank=4, fn=lambda s: forward(s, x))
    y = lf.lora(forward)(lp, x)
    nnx.update(model, lf.merge(lp))          # an ordinary NNX module again

Run ``python examples/nnx_mlp.py --help`` for the knobs; the defaults take well
under a minute on two CPU cores.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

import lorax_fn as lf


class MLP(nnx.Module):
    def __init__(self, din: int, hidden: int, dout: int, *, rngs: nnx.Rngs):
        self.inp = nnx.Linear(din, hidden, rngs=rngs)
        self.mid = nnx.Linear(hidden, hidden, rngs=rngs)
        self.out = nnx.Linear(hidden, dout, rngs=rngs)

    def __call__(self, x):
        return self.out(nnx.gelu(self.mid(nnx.gelu(self.inp(x)))))


def shifted_teacher(teacher: MLP, rank: int, key) -> MLP:
    """A copy of ``teacher`` whose middle kernel moved by a rank-``rank`` update."""
    graphdef, state = nnx.split(teacher)
    w = state["mid"]["kernel"][...]
    ku, kv = jax.random.split(key)
    u = jax.random.normal(ku, (w.shape[0], rank))
    v = jax.random.normal(kv, (rank, w.shape[1]))
    # as large as the kernel itself, so the new task differs visibly from the old one
    delta = u @ v * (jnp.linalg.norm(w) / jnp.linalg.norm(u @ v))
    state["mid"]["kernel"] = state["mid"]["kernel"].replace(w + delta)
    return nnx.merge(graphdef, state)


def count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def mse(pred, target):
    return jnp.mean((pred - target) ** 2)


def train(name, step, state, rng, args, steps):
    """``steps`` of ``step(state, x) -> (state, loss)`` on fresh inputs, with a progress bar."""
    losses = []
    bar = tqdm(range(steps), desc=name, unit="step", disable=args.quiet, mininterval=0.5,
               dynamic_ncols=True)
    for i in bar:
        x = jnp.asarray(rng.standard_normal((args.batch, args.din), dtype=np.float32))
        state, loss = step(state, x)
        losses.append(loss)
        if i % 20 == 0 or i == steps - 1:
            bar.set_postfix(loss=f"{float(loss):.4f}")
    return state, np.asarray(jax.device_get(losses))


@dataclass
class Summary:
    trainable: int
    total: int
    old_loss: float
    new_loss_before: float
    new_loss_after: float
    merge_max_diff: float
    explain_uses: int
    explain_materialised: int
    seconds: float


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Flax NNX MLP: imitate a teacher, then LoRA-adapt to the teacher after a "
                    "low-rank change.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--din", type=int, default=32, help="input features")
    p.add_argument("--hidden", type=int, default=256, help="hidden width")
    p.add_argument("--dout", type=int, default=8, help="output features")
    p.add_argument("--batch", type=int, default=128, help="inputs per step")
    p.add_argument("--steps-base", type=int, default=600, help="steps imitating the first teacher")
    p.add_argument("--steps-lora", type=int, default=800, help="LoRA steps on the changed teacher")
    p.add_argument("--lr-base", type=float, default=2e-3, help="learning rate, base training")
    p.add_argument("--lr-lora", type=float, default=5e-3, help="learning rate, adapters")
    p.add_argument("--rank", type=int, default=4, help="LoRA rank r")
    p.add_argument("--shift-rank", type=int, default=2, help="rank of the teacher's change")
    p.add_argument("--eval-size", type=int, default=2048, help="held-out inputs per evaluation")
    p.add_argument("--seed", type=int, default=0, help="seed for init and sampling")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def main(argv=None) -> Summary:
    args = parse_args(argv)
    t0 = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    k_teacher, k_shift, k_student, k_lora = jax.random.split(jax.random.key(args.seed), 4)

    def make(key):
        return MLP(args.din, args.hidden, args.dout, rngs=nnx.Rngs(params=key))

    old_teacher = make(k_teacher)
    new_teacher = shifted_teacher(old_teacher, args.shift_rank, k_shift)
    x_eval = jnp.asarray(np.random.default_rng(args.seed + 1)
                         .standard_normal((args.eval_size, args.din), dtype=np.float32))
    y_old, y_new = old_teacher(x_eval), new_teacher(x_eval)

    # the student as a (graph definition, state) pair: the state is an ordinary pytree
    student = make(k_student)
    graphdef, state = nnx.split(student)

    def forward(state, x):
        return nnx.merge(graphdef, state)(x)

    print(f"student: {count(state):,} parameters ({args.din} -> {args.hidden} -> {args.hidden} -> "
          f"{args.dout})")

    # ---- 1. ordinary training: imitate the first teacher
    tx = optax.adam(args.lr_base)

    @jax.jit
    def base_step(carry, x):
        s, opt = carry
        loss, g = jax.value_and_grad(lambda s: mse(forward(s, x), old_teacher(x)))(s)
        upd, opt = tx.update(g, opt, s)
        return (optax.apply_updates(s, upd), opt), loss

    (state, _), _ = train("imitate the teacher", base_step, (state, tx.init(state)), rng, args,
                          args.steps_base)
    evaluate = jax.jit(lambda s, y: mse(forward(s, x_eval), y))
    old_loss = float(evaluate(state, y_old))
    new_before = float(evaluate(state, y_new))

    # ---- 2. LoRA: the teacher changed; only the adapters train
    lp = lf.lorafy(state, rank=args.rank, key=k_lora, fn=lambda s: forward(s, x_eval[:1]))
    apply = lf.lora(forward)
    trainable, total = count(lf.adapters(lp)), count(lp)
    print(f"LoRA rank {args.rank}: {trainable:,} trainable of {total:,} parameters "
          f"({100 * trainable / total:.2f}%)")
    report = lf.explain(forward, lp, x_eval[:1])

    ltx = lf.optimizer(optax.adam(args.lr_lora), lp)

    @jax.jit
    def lora_step(carry, x):
        lp, opt = carry
        loss, g = jax.value_and_grad(lambda lp: mse(apply(lp, x), new_teacher(x)))(lp)
        upd, opt = ltx.update(g, opt, lp)
        return (optax.apply_updates(lp, upd), opt), loss

    (lp, _), _ = train("LoRA on the changed teacher", lora_step, (lp, ltx.init(lp)), rng, args,
                       args.steps_lora)

    # ---- 3. back to an ordinary NNX module holding the merged weights
    nnx.update(student, lf.merge(lp))
    merged_out = student(x_eval)
    diff = float(jnp.max(jnp.abs(jax.jit(apply)(lp, x_eval) - merged_out)))
    s = Summary(trainable, total, old_loss, new_before, float(mse(merged_out, y_new)), diff,
                len(report), len(report.materialized), time.perf_counter() - t0)
    print()
    print("summary")
    print(f"  trainable share        {100 * s.trainable / s.total:.2f}% ({s.trainable:,} / {s.total:,})")
    print(f"  first teacher, MSE     {s.old_loss:.4f} after imitation")
    print(f"  changed teacher, MSE   {s.new_loss_before:.4f} -> {s.new_loss_after:.4f} "
          f"(before -> after LoRA)")
    print(f"  merge max |diff|       {s.merge_max_diff:.2e} (LoRA model vs nnx.update'd module)")
    print(f"  explain                {s.explain_uses} uses, {s.explain_materialised} materialised")
    print(f"  wall time              {s.seconds:.1f} s")
    return s


if __name__ == "__main__":
    main()
