"""DP-SGD-style training with per-sample gradient clipping under a bf16 policy.

Differentially private SGD needs one gradient per example: each is clipped to an L2 norm of at
most ``--clip``, the clipped gradients are summed, Gaussian noise of standard deviation
``--noise * --clip`` is added and the sum is divided by the batch size. ``torch.func`` computes
the per-sample gradients with ``vmap(grad(loss))``, where the loss runs the model through
``pp.apply_with_policy``: the policy holds inside ``vmap`` (the script records the dtype the
first layer computes in, from a forward hook) and the gradients come back in the param dtype.
The same model is trained with a float32 policy from the same start for comparison.

    python examples/per_sample_grads.py                  # bf16-mixed vs float32
    python examples/per_sample_grads.py --precision 16-mixed

This shows the mechanics of DP-SGD (clipping and noise); it does no privacy accounting (the
privacy budget epsilon depends on the sampling scheme and the number of steps).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import Any

import torch
from _common import (
    Digits,
    Progress,
    Tree,
    accuracy,
    batches,
    load_digits,
    make_parser,
    median_ms,
    precision_spec,
    print_table,
    threads,
)
from torch import nn
from torch.func import grad, vmap
from train_digits import make_model

import polprec as pp

# Built directly, not by get_policy("32-true"): under `polprec run --precision X` that call
# would (rightly) report a conflict with the command line's precision.
FLOAT32 = pp.Policy(torch.float32, torch.float32, torch.float32)


def clip_and_noise(
    per_sample: Tree, *, clip: float, noise: float, generator: torch.Generator
) -> tuple[Tree, torch.Tensor, torch.Tensor]:
    """Clip each example's gradient to norm ``clip``, sum, add noise, average.

    Returns the noisy mean gradient and the per-sample norms before and after clipping.
    """
    flat = torch.cat([g.flatten(1).float() for g in per_sample.values()], dim=1)
    norms = flat.norm(dim=1)
    factors = (clip / (norms + 1e-6)).clamp(max=1.0)
    batch = len(norms)
    out = {}
    for k, g in per_sample.items():
        clipped_sum = (g * factors.view(-1, *[1] * (g.dim() - 1)).to(g.dtype)).sum(0)
        std = noise * clip
        sample = torch.randn(clipped_sum.shape, generator=generator, dtype=torch.float32)
        out[k] = ((clipped_sum + std * sample.to(g.dtype)) / batch).to(g.dtype)
    return out, norms, norms * factors


def train(data: Digits, name: str, policy: pp.Policy, args: argparse.Namespace) -> dict[str, Any]:
    """DP-SGD-style training under ``policy`` (called ``name``); return its report."""
    model = make_model(args.hidden, args.seed)
    seen: set[torch.dtype] = set()
    hook = model[0].register_forward_hook(lambda mod, inp, out: seen.add(out.dtype))
    params = pp.cast_params({k: p.detach() for k, p in model.named_parameters()}, policy)
    adam = pp.optim.adam(args.lr)
    opt = adam.init(params)

    def loss_one(params: Tree, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = pp.apply_with_policy(model, params, x[None], policy=policy)
        return nn.functional.cross_entropy(logits, y[None])

    per_sample_grads = vmap(grad(loss_one), in_dims=(None, 0, 0))
    noise_gen = torch.Generator().manual_seed(args.seed)
    max_raw, max_clipped = torch.zeros(()), torch.zeros(())
    seconds = []
    bar = Progress(
        batches(len(data.y_train), args.batch_size, args.steps, args.seed),
        desc=name,
        quiet=args.quiet,
    )
    for idx in bar:
        start = time.perf_counter()
        grads = per_sample_grads(params, data.x_train[idx], data.y_train[idx])
        mean, raw, clipped = clip_and_noise(
            grads, clip=args.clip, noise=args.noise, generator=noise_gen
        )
        params, opt = adam.step(params, mean, opt)
        seconds.append(time.perf_counter() - start)
        max_raw = torch.maximum(max_raw, raw.max())
        max_clipped = torch.maximum(max_clipped, clipped.max())
    bar.close()
    hook.remove()
    with torch.no_grad():
        logits = pp.apply_with_policy(model, params, data.x_test, policy=policy)
    return {
        "precision": name,
        "policy": str(policy),
        "test acc %": accuracy(logits.float(), data.y_test),
        "step ms": median_ms(seconds),
        "max norm": float(max_raw),
        "max clipped norm": float(max_clipped),
        "grad dtype": str(next(iter(grads.values())).dtype).removeprefix("torch."),
        "dtype in vmap": ", ".join(sorted(str(d).removeprefix("torch.") for d in seen)),
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = make_parser(
        __doc__, precision="bf16-mixed", steps=200, batch_size=256, lr=1e-2, threads=1, hidden=64
    )
    parser.add_argument("--clip", type=float, default=1.0, help="per-sample L2 norm bound")
    parser.add_argument("--noise", type=float, default=1.0, help="noise multiplier")
    return parser.parse_args(argv)


COLUMNS = [
    ("precision", "s"),
    ("dtype in vmap", "s"),
    ("grad dtype", "s"),
    ("test acc %", ".1f"),
    ("max norm", ".3f"),
    ("max clipped norm", ".4f"),
    ("step ms", ".2f"),
]


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Train under the chosen policy and under float32; return both reports."""
    args = parse_args(argv)
    spec = precision_spec(args)
    with threads(args.threads):
        data = load_digits(seed=args.seed)
        rows = [
            train(data, spec, pp.get_policy(spec), args),
            train(data, "32-true", FLOAT32, args),
        ]
    print(f"DP-SGD on digits: clip {args.clip}, noise multiplier {args.noise}")
    print_table(rows, COLUMNS)
    return rows


if __name__ == "__main__":
    main()
