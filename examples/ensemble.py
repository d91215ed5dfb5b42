"""Train an ensemble of MLPs at once with ``vmap``, under float16 with one loss scale per member.

``torch.func.stack_module_state`` stacks the members' parameters along a new first dimension
and ``torch.func.vmap`` runs one functional training step over all of them together: each
member sees its own shuffle of scikit-learn's digits, its own ``pp.optim.adam`` state and its
own ``DynamicLossScale``. The optimizer and loss-scale states are pytrees of tensors, so they
stack and vmap like the parameters; each member grows and backs off its scale and skips its
overflowing steps independently (the optimizer's ``grads_finite`` under ``vmap`` is one flag
per member, and each member's state counts its own skips). To make that visible, the
members start from different loss scales: the largest overflows float16 at once and backs off.

    python examples/ensemble.py
    python examples/ensemble.py --members 8 --precision bf16-mixed

Why polprec here: under ``vmap`` over stacked parameters, ``torch.autocast`` alone loses the
policy (``nn.Linear`` with a bias returns float32, pytorch issue 192617), so the members would
silently train in float32. Under ``vmap`` ``pp.apply_with_policy`` makes autocast's casts itself,
op by op; the script records the dtype the first layer computes in with both, from a forward
hook.
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Sequence
from typing import Any

import torch
from _common import (
    Progress,
    Tree,
    accuracy,
    batches,
    load_digits,
    make_parser,
    median_ms,
    power_of_two,
    precision_spec,
    print_table,
    threads,
)
from torch import nn
from torch.func import functional_call, stack_module_state, vmap
from train_digits import make_model

import polprec as pp


def hooked_dtypes(
    model: nn.Module, params: Tree, x: torch.Tensor, policy: pp.Policy
) -> dict[str, str]:
    """The first layer's compute dtype under ``vmap``: with polprec, and with autocast alone."""
    seen: list[torch.dtype] = []
    base = copy.deepcopy(model)
    hook = base[0].register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))

    def with_polprec(p: Tree, x: torch.Tensor) -> torch.Tensor:
        return pp.apply_with_policy(base, p, x, policy=policy)

    def with_autocast(p: Tree, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=policy.compute_dtype):
            return functional_call(base, p, (x,))

    out = {}
    for name, fn in (("polprec", with_polprec), ("autocast", with_autocast)):
        seen.clear()
        vmap(fn)(params, x)
        out[name] = str(seen[0]).removeprefix("torch.")
    hook.remove()
    return out


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = make_parser(
        __doc__, precision="16-mixed", steps=400, batch_size=64, lr=2e-3, threads=1, hidden=128
    )
    parser.add_argument("--members", type=int, default=4)
    parser.add_argument(
        "--log2-scales",
        type=float,
        nargs="+",
        default=[10, 15, 20, 26],
        help="initial loss scale of each member, as powers of two (cycled over the members)",
    )
    parser.add_argument(
        "--scale-period", type=int, default=100, help="DynamicLossScale growth period"
    )
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> dict[str, Any]:
    policy = pp.get_policy(precision_spec(args))
    data = load_digits(seed=args.seed)
    n = args.members
    models = [make_model(args.hidden, args.seed + i) for i in range(n)]
    stacked, _ = stack_module_state(models)
    params = pp.cast_params({k: v.detach() for k, v in stacked.items()}, policy)
    adam = pp.optim.adam(args.lr)
    opt = vmap(adam.init)(params)  # one Adam state (step and skip counts) per member
    log2 = [args.log2_scales[i % len(args.log2_scales)] for i in range(n)]
    scales = pp.stack_trees([pp.DynamicLossScale(2.0**e, period=args.scale_period) for e in log2])
    base = models[0]

    def loss_fn(params: Tree, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = pp.apply_with_policy(base, params, x, policy=policy)
        return nn.functional.cross_entropy(logits, y)

    grad_fn = pp.value_and_grad(loss_fn)

    def member_step(
        params: Tree, opt: Any, scale: pp.LossScale, x: torch.Tensor, y: torch.Tensor
    ) -> Any:
        loss, grads, finite, scale = grad_fn(params, x, y, loss_scale=scale)
        params, opt = adam.step(params, grads, opt, grads_finite=finite)
        return params, opt, scale, loss

    step = vmap(member_step)
    # Each member gets its own shuffle of the training set; a step takes one batch from each.
    plans = [
        batches(len(data.y_train), args.batch_size, args.steps, args.seed + i) for i in range(n)
    ]
    seconds, losses = [], []
    for member_idx in Progress(
        zip(*plans, strict=True), total=args.steps, desc=f"{n} members", quiet=args.quiet
    ):
        idx = torch.stack(member_idx)
        start = time.perf_counter()
        params, opt, scales, loss = step(params, opt, scales, data.x_train[idx], data.y_train[idx])
        seconds.append(time.perf_counter() - start)
        losses.append(loss)

    with torch.no_grad():
        logits = vmap(lambda p: pp.apply_with_policy(base, p, data.x_test, policy=policy))(params)
    logits = logits.float()
    final_loss = torch.stack(losses[-20:]).float().mean(0)  # per member
    members = [
        {
            "member": i,
            "initial scale": 2.0 ** log2[i],
            "final loss": float(final_loss[i]),
            "test acc %": accuracy(logits[i], data.y_test),
            "skipped": int(opt.skips[i]),
            "final scale": float(scales.loss_scale[i]),
        }
        for i in range(n)
    ]
    return {
        "policy": str(policy),
        "members": members,
        "ensemble acc %": accuracy(logits.softmax(-1).mean(0), data.y_test),
        "step ms": median_ms(seconds),
        "dtype in vmap": hooked_dtypes(base, params, data.x_test[:8].expand(n, 8, 64), policy),
    }


COLUMNS = [
    ("member", "d"),
    ("initial scale", power_of_two),
    ("final loss", ".4f"),
    ("test acc %", ".1f"),
    ("skipped", "d"),
    ("final scale", power_of_two),
]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Train the ensemble; return per-member and ensemble reports."""
    args = parse_args(argv)
    with threads(args.threads):
        report = run(args)
    dtypes = report["dtype in vmap"]
    print(
        f"{args.members} members under {report['policy']}, "
        f"{report['step ms']:.1f} ms per vmapped step; first layer computes in {dtypes['polprec']} "
        f"with pp.apply_with_policy, {dtypes['autocast']} with torch.autocast alone under vmap"
    )
    print_table(report["members"], COLUMNS)
    print(
        f"ensemble (mean of the members' probabilities): {report['ensemble acc %']:.1f}% test accuracy"
    )
    return report


if __name__ == "__main__":
    main()
