"""A small character-level transformer trained on Python's own standard library sources.

The text ships with every Python install (the ``.py`` files of
``sysconfig.get_paths()["stdlib"]``, read in sorted order), so nothing is downloaded. The model
is a byte-level, pre-norm causal transformer whose time goes into matrix multiplications:
a compute-bound workload, where the speed of a 16-bit policy is the speed of the machine's
16-bit matrix units. The same functional step as ``train_digits.py`` (``pp.value_and_grad``
and ``pp.optim.adamw``'s pure update, which skips a step whose gradients overflowed) trains
it; the report gives tokens per second and the final training and validation losses.

    python examples/char_lm.py                       # precision from POLPREC_PRECISION
    python examples/char_lm.py --precision bf16-mixed
    python examples/char_lm.py --compare             # 32-true, bf16-mixed, bf16-true
    python examples/char_lm.py --optimizers --lr 3e-4 --steps 300 --d-model 64 --context 64
    python examples/char_lm.py --precision 16-mixed --accumulate 4 --clip 1.0

``--accumulate K`` splits every batch into ``K`` micro-batches (``pp.value_and_grad(...,
microbatches=K)``, one optimizer step per batch) and ``--clip NORM`` clips the unscaled
gradients to that global norm (``pp.clip_by_global_norm``) before the step, in every run.

What to expect from ``--compare``: on a CPU with bfloat16 matrix units (Intel AMX, or
AVX512-BF16) a bfloat16 matmul is several times faster than a float32 one and the bf16 policies
train faster. On a CPU without them (AVX2 only, e.g. many AMD EPYC and older Intel
parts) torch emulates bfloat16 and float16 matmuls, which are then many times *slower* than
float32 (50x for a matmul and 10x for this model's training step on an AVX2 AMD EPYC):
polprec passes on whatever speed the hardware has. The run prints this machine's
measured 16-bit/float32 matmul throughput so the table can be read against it. float16
("16-mixed", add it with ``--policies``) is slow on most CPUs.

``--optimizers`` trains float32 parameters and then bfloat16 ones ("bf16-true") under each of
``pp.optim``'s precision options. At a small learning rate (3e-4 above) AdamW's updates,
about the learning rate each, fall under half a bfloat16 spacing of many weights: rounded to
nearest they are lost and the validation loss ends visibly above float32's, while master
weights, stochastic rounding and Kahan compensation keep them.
"""

from __future__ import annotations

import argparse
import math
import sysconfig
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from _common import (
    Progress,
    SkipWatch,
    add_step_options,
    check_step_options,
    clip,
    clipped_steps,
    make_parser,
    median_ms,
    precision_spec,
    print_table,
    step_line,
    threads,
)
from torch import nn

import polprec as pp

COMPARE = ["32-true", "bf16-mixed", "bf16-true"]
#: --optimizers: (precision, name, pp.optim.adamw's precision options).
OPTIMIZER_RUNS: list[tuple[str, str, dict[str, Any]]] = [
    ("32-true", "default", {}),
    ("bf16-true", "nearest", {"master_weights": False}),
    ("bf16-true", "master weights", {"master_weights": True}),
    ("bf16-true", "stochastic", {"rounding": "stochastic"}),
    ("bf16-true", "Kahan", {"kahan": True}),
]


def stdlib_text(n_bytes: int) -> torch.Tensor:
    """The first ``n_bytes`` bytes of the standard library's top-level ``.py`` files, sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.glob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= n_bytes:
            break
    text = b"".join(chunks)[:n_bytes]
    return torch.frombuffer(bytearray(text), dtype=torch.uint8).to(torch.int64)


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention and a GELU MLP."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2) for z in (q, k, v))
        att = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class CharTransformer(nn.Module):
    """Byte embeddings, learned positions, ``n_layers`` blocks and a linear head to 256 logits."""

    def __init__(self, *, d_model: int, n_layers: int, n_heads: int, context: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(256, d_model)
        self.pos = nn.Parameter(torch.zeros(context, d_model))
        self.blocks = nn.Sequential(*(Block(d_model, n_heads) for _ in range(n_layers)))
        self.ln = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, 256)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        return self.head(self.ln(self.blocks(x)))


def matmul_speed(dtype: torch.dtype, n: int = 256, reps: int = 5) -> float:
    """Measured GFLOP/s of an ``n x n`` matmul in ``dtype`` on the CPU (best of ``reps``)."""
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    a @ b  # warm-up
    best = math.inf
    for _ in range(reps):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def train(
    text: torch.Tensor,
    precision: str,
    args: argparse.Namespace,
    *,
    optimizer: str = "default",
    options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train one model under ``precision`` (and ``pp.optim.adamw`` ``options``); report it."""
    policy = pp.get_policy(precision)
    with torch.random.fork_rng():
        torch.manual_seed(args.seed)
        model = CharTransformer(
            d_model=args.d_model, n_layers=args.layers, n_heads=args.heads, context=args.context
        )
    params = pp.cast_params({k: p.detach() for k, p in model.named_parameters()}, policy)
    adamw = pp.optim.adamw(args.lr, weight_decay=0.01, **(options or {}))
    opt = adamw.init(params)
    scale = pp.default_loss_scale(policy)

    def loss_fn(params: dict[str, torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
        logits = pp.apply_with_policy(model, params, tokens[:, :-1], policy=policy)
        return nn.functional.cross_entropy(logits.reshape(-1, 256), tokens[:, 1:].reshape(-1))

    grad_fn = pp.value_and_grad(loss_fn, microbatches=args.accumulate)

    def step(params: Any, opt: Any, scale: pp.LossScale, tokens: torch.Tensor) -> Any:
        loss, grads, finite, scale = grad_fn(params, tokens, loss_scale=scale)
        grads, norm = clip(grads, args.clip)  # --clip: the unscaled gradients' global norm
        params, opt = adamw.step(params, grads, opt, grads_finite=finite)
        return params, opt, scale, loss, norm

    n_val = len(text) // 20
    train_text, val_text = text[:-n_val], text[-n_val:]
    gen = torch.Generator().manual_seed(args.seed)
    span = args.context + 1

    def sample(source: torch.Tensor) -> torch.Tensor:
        starts = torch.randint(0, len(source) - span, (args.batch_size,), generator=gen)
        return torch.stack([source[s : s + span] for s in starts.tolist()])

    losses, norms, seconds = [], [], []
    desc = precision if optimizer == "default" else f"{precision}, {optimizer}"
    bar = Progress(range(args.steps), desc=desc, quiet=args.quiet)
    watch = SkipWatch(bar)  # reads opt.consecutive_skips every 10 steps: warns if training stopped
    for i in bar:
        tokens = sample(train_text)
        start = time.perf_counter()
        params, opt, scale, loss, norm = step(params, opt, scale, tokens)
        seconds.append(time.perf_counter() - start)
        losses.append(loss)
        norms.append(norm)
        if not args.quiet and i % 10 == 0:  # reading the loss syncs; only for the display
            bar.set_postfix(loss=f"{float(loss):.3f}")
        watch.check(i, opt)
    bar.close()
    with torch.no_grad():
        val_loss = torch.stack([loss_fn(params, sample(val_text)) for _ in range(8)]).mean()
    curve = torch.stack(losses).float()
    tail = max(1, len(curve) // 10)
    return {
        "precision": precision,
        "optimizer": optimizer,
        "policy": str(policy),
        "tokens/s": args.batch_size * args.context / (median_ms(seconds) / 1000),
        "step ms": median_ms(seconds),
        "first loss": float(curve[:tail].mean()),
        "final loss": float(curve[-tail:].mean()),
        "val loss": float(val_loss),
        "skipped": int(opt.skips),
        "clipped": clipped_steps(norms, args.clip),
        "loss curve": curve,
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    # One thread by default: timings stay stable when another process shares the cores (with
    # two threads on two busy cores each parallel region waits for a descheduled thread).
    parser = make_parser(__doc__, precision="32-true", steps=80, batch_size=16, lr=2e-3, threads=1)
    parser.add_argument("--compare", action="store_true", help="run --policies side by side")
    parser.add_argument("--policies", nargs="+", default=COMPARE, help="precisions for --compare")
    parser.add_argument(
        "--optimizers",
        action="store_true",
        help="float32, then bf16-true under each of pp.optim's precision options",
    )
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--text-bytes", type=int, default=1_000_000)
    add_step_options(parser)
    args = parser.parse_args(argv)
    check_step_options(parser, args)
    return args


COLUMNS = [
    ("precision", "s"),
    ("optimizer", "s"),
    ("tokens/s", ".0f"),
    ("step ms", ".1f"),
    ("first loss", ".3f"),
    ("final loss", ".3f"),
    ("val loss", ".3f"),
]


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Run the example; return one report dict per policy."""
    args = parse_args(argv)
    with threads(args.threads):
        return run(args)


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    text = stdlib_text(args.text_bytes)
    f32 = matmul_speed(torch.float32)
    print(
        f"{len(text):,} bytes of standard-library source; CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()}, torch threads {torch.get_num_threads()}; matmul "
        f"float32 {f32:.1f} GFLOP/s, bfloat16 {matmul_speed(torch.bfloat16) / f32:.2f}x, "
        f"float16 {matmul_speed(torch.float16) / f32:.2f}x of float32"
    )
    if args.optimizers:
        runs = OPTIMIZER_RUNS
    else:
        runs = [
            (p, "default", {}) for p in (args.policies if args.compare else [precision_spec(args)])
        ]
    rows = [train(text, p, args, optimizer=name, options=options) for p, name, options in runs]
    print_table(rows, COLUMNS + [("clipped", "d")] * (args.clip is not None))
    print(step_line(args))
    if args.optimizers:
        print()
        print("\n".join(optimizer_conclusions(rows)))
    return rows


def optimizer_conclusions(rows: Sequence[dict[str, Any]]) -> list[str]:
    """How each bfloat16 row's validation loss compares with the float32 row's."""
    f32 = rows[0]
    lines = ["Conclusions (a row matches 32-true when its validation loss is within 1%):"]
    for row in rows[1:]:
        gap = row["val loss"] / f32["val loss"] - 1
        verdict = "matches 32-true" if abs(gap) <= 0.01 else f"is {100 * gap:+.1f}% off 32-true"
        lines.append(
            f"* bf16-true, {row['optimizer']} {verdict}: validation loss {row['val loss']:.4f} "
            f"vs {f32['val loss']:.4f} ({100 * gap:+.2f}%)."
        )
    return lines


if __name__ == "__main__":
    main()
