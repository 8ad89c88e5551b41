"""Training-step benchmark in PyTorch: full fine-tuning against PEFT's LoRA, on
the same decoder-only transformer LM as ``train_step.py`` (``model.py``).

    python benchmarks/torch_peft.py                   # both configurations, one process each
    python benchmarks/torch_peft.py --config peft     # one configuration in this process

Runs in its own environment (``make bench-env`` builds ``benchmarks/.venv-peft``):
it imports torch, peft and ``_common`` only, never JAX. The model mirrors
``model.py`` module for module and size for size; attention is a plain
matmul + softmax, as there (not ``scaled_dot_product_attention``). Each step
is eager PyTorch: forward, backward, ``AdamW.step``. It reports the median step
time over ``--steps`` steps after 2 warm-up steps, the optimizer-state size,
the trainable parameter count and the peak RSS of its own process. Its
records carry ``"framework": "torch"``, so ``train_step.py`` compares them
with each other and not with the JAX rows.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as C  # noqa: E402

CONFIGS = ["peft_full", "peft"]
LABELS = {
    "peft_full": "PEFT: full fine-tuning (PyTorch)",
    "peft": "PEFT LoRA (PyTorch)",
}
# the same six kernels per block as model.TARGETS
TARGETS = ["q", "k", "v", "o", "mlp_in", "mlp_out"]


@dataclasses.dataclass(frozen=True)
class Shape:  # the fields of model.Shape, which imports JAX
    layers: int
    d_model: int
    heads: int
    mlp: int
    vocab: int
    seq: int
    batch: int


def modules():
    """The model classes; defined on call so ``--help`` works without torch."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    class Block(nn.Module):
        def __init__(self, s: Shape):
            super().__init__()
            d = s.d_model
            self.heads = s.heads
            self.ln1, self.ln2 = nn.LayerNorm(d, eps=1e-6), nn.LayerNorm(d, eps=1e-6)  # flax eps
            self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
            self.mlp_in, self.mlp_out = nn.Linear(d, s.mlp), nn.Linear(s.mlp, d)
            self.register_buffer("causal", torch.ones(s.seq, s.seq, dtype=torch.bool).tril(),
                                 persistent=False)

        def forward(self, h):
            bsz, t, d = h.shape
            y = self.ln1(h)
            heads = lambda z: z.view(bsz, t, self.heads, d // self.heads).transpose(1, 2)
            q, k, v = heads(self.q(y)), heads(self.k(y)), heads(self.v(y))
            logits = q @ k.transpose(-1, -2) / math.sqrt(d // self.heads)
            logits = logits.masked_fill(~self.causal[:t, :t], torch.finfo(logits.dtype).min)
            att = logits.float().softmax(-1).to(v.dtype)  # in float32, as model.py
            y = (att @ v).transpose(1, 2).reshape(bsz, t, d)
            h = h + self.o(y)
            # flax's nn.gelu defaults to the tanh approximation
            return h + self.mlp_out(F.gelu(self.mlp_in(self.ln2(h)), approximate="tanh"))

    class LM(nn.Module):
        def __init__(self, s: Shape):
            super().__init__()
            self.embed = nn.Embedding(s.vocab, s.d_model)
            self.blocks = nn.ModuleList(Block(s) for _ in range(s.layers))
            self.ln_f = nn.LayerNorm(s.d_model, eps=1e-6)
            self.head = nn.Linear(s.d_model, s.vocab, bias=False)

        def forward(self, tokens):
            h = self.embed(tokens)
            for block in self.blocks:
                h = block(h)
            return self.head(self.ln_f(h))

    return LM


def _init_like_flax(model) -> None:
    """Flax's default scales (kernels and embedding N(0, 1/fan_in), zero biases), so the
    losses are on the scale of the JAX rows; timing does not depend on it."""
    import torch
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.normal_(0.0, m.in_features ** -0.5)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, torch.nn.Embedding):
                m.weight.normal_(0.0, m.embedding_dim ** -0.5)


def build_model(s: Shape, dtype: str, seed: int = 0):
    import torch
    torch.manual_seed(seed)
    model = modules()(s)
    _init_like_flax(model)
    return model.to(getattr(torch, dtype))


def batches(s: Shape, n: int = 4):
    """``n`` deterministic token batches ``(batch, seq + 1)``, cycled over the steps."""
    import torch
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, s.vocab, (s.batch, s.seq + 1), generator=g) for _ in range(n)]


def loss_fn(model, tokens):
    """Next-token cross-entropy, averaged in float32 (as ``model.loss_fn``)."""
    from torch.nn import functional as F
    logits = model(tokens[:, :-1]).float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


def lorafy(model, a):
    from peft import LoraConfig, get_peft_model
    cfg = LoraConfig(r=a.rank, lora_alpha=a.alpha, lora_dropout=0.0, target_modules=TARGETS)
    # PEFT upcasts bfloat16 adapters to float32 by default; the JAX rows keep them in dtype
    return get_peft_model(model, cfg, autocast_adapter_dtype=False)


def _state_bytes(opt) -> int:
    return sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values()
               if hasattr(t, "element_size"))


def _frozen(model) -> dict[str, str]:
    """A digest of each frozen parameter's bytes: a copy would add the base model's
    size to the peak RSS that this process reports."""
    import hashlib
    import torch
    return {n: hashlib.sha256(p.detach().contiguous().view(torch.uint8).numpy()).hexdigest()
            for n, p in model.named_parameters() if not p.requires_grad}


def trainer(model):
    """``(step, opt, trainable)``: ``step(tokens)`` is one AdamW step on ``model``'s
    trainable parameters and returns the loss before it (a float)."""
    import torch
    train = [p for p in model.parameters() if p.requires_grad]
    # optax.adamw's defaults, so both frameworks apply the same update rule
    opt = torch.optim.AdamW(train, lr=1e-4, weight_decay=1e-4)

    def step(tokens) -> float:
        loss = loss_fn(model, tokens)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach().item()  # eager CPU ops are synchronous: the step is done

    return step, opt, train


def run_one(a) -> dict:
    shape = Shape(a.layers, a.d_model, a.heads, a.mlp or 4 * a.d_model, a.vocab, a.seq, a.batch)
    model = build_model(shape, a.dtype)
    if a.config == "peft":
        model = lorafy(model, a)
    step, opt, train = trainer(model)
    frozen = _frozen(model)
    tokens = batches(shape)
    losses = []

    def one():
        losses.append(step(tokens[len(losses) % len(tokens)]))

    med, times = C.median_time(one, a.steps, warmup=2, sync=lambda _: None)
    rec = {"bench": "train_step", "framework": "torch", "config": a.config,
           "label": LABELS[a.config], **dataclasses.asdict(shape), "rank": a.rank,
           "dtype": a.dtype, "attention": "matmul+softmax",
           "step_ms": med, "step_ms_all": [round(t, 2) for t in times],
           "loss_first": losses[0], "loss_last": losses[-1],
           "opt_state_bytes": _state_bytes(opt), "trainable_params": sum(p.numel() for p in train),
           "peak_rss_mb": C.peak_rss_mb(), "machine": C.machine("torch")}
    if a.config == "peft":
        import peft
        rec["peft"] = peft.__version__
        rec["adapted_modules"] = sum(1 for n, _ in model.named_modules() if n.endswith(".lora_A"))
        rec["base_unchanged"] = bool(frozen) and _frozen(model) == frozen
        if not rec["base_unchanged"]:
            rec["error"] = "the frozen base weights CHANGED during training"
    return rec


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help=f"run one configuration in this process: {', '.join(CONFIGS)}")
    p.add_argument("--configs", default=",".join(CONFIGS), help="comma list to run, one process each")
    C.add_shape_flags(p)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--steps", type=int, default=10, help="timed steps (after 2 warm-up steps)")
    return p.parse_args(argv)


def child_argv(a, config) -> list[str]:
    """This script's command line for one configuration, sizes taken from ``a``
    (this script's or ``train_step.py``'s arguments: the flags are the same)."""
    return [os.path.abspath(__file__), "--config", config,
            *C.flags(a, C.SHAPE_FLAGS + ["dtype", "steps"])]


def run_all(a, configs=CONFIGS, python: str | None = None) -> list[dict]:
    """Each configuration in its own process, with ``python`` (default: this one)."""
    recs = []
    for config in configs:
        got = C.run_child(child_argv(a, config), python=python)
        for r in got:
            r.setdefault("config", config)
            r.setdefault("label", LABELS.get(config, config))
            r.setdefault("framework", "torch")
        recs += got
    return recs


COLUMNS = [("label", "configuration", ""), ("step_ms", "step (ms, median)", "{:.1f}"),
           ("ratio", "× full", "{:.2f}"), ("opt_mb", "opt state MiB", "{:.2f}"),
           ("trainable_params", "trainable", ""), ("peak_rss_mb", "peak RSS MiB", "{:.0f}"),
           ("base_unchanged", "frozen base bit-identical", ""), ("error", "note", "")]


def main(argv=None) -> list[dict]:
    a = parse(argv)
    if a.config:
        C.emit(run_one(a))
        return []
    recs = run_all(a, [c for c in a.configs.split(",") if c])
    full = next((r for r in recs if r["config"] == "peft_full" and "step_ms" in r), None)
    for r in recs:
        C.emit(r)
        if "step_ms" in r:
            r["opt_mb"] = r["opt_state_bytes"] / 2**20
            r["ratio"] = r["step_ms"] / full["step_ms"] if full else None
    print()
    print(C.table(recs, COLUMNS))
    return recs


if __name__ == "__main__":
    main()
