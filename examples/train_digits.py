"""Train an MLP on scikit-learn's handwritten digits under any precision, or all side by side.

The training step is functional: ``pp.value_and_grad`` scales the loss, differentiates,
unscales, checks the gradients and adjusts the loss scale; ``pp.optim.adam``'s pure update
(tensors in, tensors out) applies them, or skips the step when they overflowed. Parameters live
in the policy's param dtype (``pp.cast_params``) and the forward runs through
``pp.apply_with_policy``.

    python examples/train_digits.py                        # precision from POLPREC_PRECISION
    python examples/train_digits.py --precision bf16-mixed
    python examples/train_digits.py --compare --plot digits.png
    python examples/train_digits.py --optimizers
    python examples/train_digits.py --precision 16-mixed --accumulate 4 --clip 1.0

``--accumulate K`` splits every batch into ``K`` micro-batches (``pp.value_and_grad(...,
microbatches=K)``: one loss-scale adjustment and one optimizer step per batch, the
``scaler.scale(loss / K).backward()`` loop of torch.amp) and ``--clip NORM`` clips the
unscaled gradients to that global norm before the step (``pp.clip_by_global_norm``, torch's
``clip_grad_norm_`` after ``scaler.unscale_``); both apply to every run, ``--compare`` and
``--optimizers`` included, and the summary says how many steps clipping shortened.

``--compare`` trains float32 ("32-true"), "bf16-mixed", "16-mixed" with dynamic loss scaling,
"bf16-true" and "16-mixed" without loss scaling on the same data from the same start, then
repeats float32 and the two "16-mixed" runs on a case built to underflow. It prints a table,
a legend of its rows and columns, and one conclusion per comparison drawn from the numbers.

Why the underflow case underflows: its loss is multiplied by a tiny weight (``2**-20``,
about 1e-6, as a small auxiliary term or a sum divided by a huge count would be). Adam is
invariant to the scale of the loss (its ``eps`` is scaled along), so float32 trains exactly
as before. Under "16-mixed" the backward pass runs in float16, whose smallest subnormal is
``2**-24`` (about 6e-8) and whose smallest normal number is ``2**-14`` (about 6e-5): the
gradient reaching the logits is about ``1e-6 * 0.5 / batch_size``, about 8e-9, which rounds
to zero, so every gradient is zero and the model never moves. Dynamic loss scaling multiplies
the loss by ``2**15`` (and more as training goes on) before the backward pass and divides
the float32 gradients afterwards, which lifts them back into float16's range.

``--optimizers`` compares ``pp.optim``'s precision options under "bf16-true" (bfloat16
parameters) with float32, on a case built to make nearest rounding stall: Adam's updates are
about its learning rate, and at ``--stall-lr`` (5e-5) they fall under half a bfloat16 spacing
of most weights (2**-9, about 2e-3, at 1.0; about 1e-4 at a typical initial weight of 0.03), so
a bfloat16 weight rounded to nearest never moves. Master weights (a float32 copy in the
optimizer state), stochastic rounding (up or down at random, unbiased) and Kahan compensation
(a bfloat16 buffer that carries what each update lost) each keep those updates. The table gives
the bytes per parameter each mode holds (parameters, gradients and optimizer state, measured
from the tensors).
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence
from typing import Any

import optree
import torch
from _common import (
    Digits,
    Progress,
    SkipWatch,
    accuracy,
    add_step_options,
    batches,
    check_step_options,
    clip,
    clipped_steps,
    load_digits,
    make_parser,
    median_ms,
    power_of_two,
    precision_spec,
    print_table,
    step_line,
    threads,
)
from torch import nn

import polprec as pp

COMPARE = [  # (precision, loss scaling)
    ("32-true", "none"),
    ("bf16-mixed", "none"),
    ("16-mixed", "dynamic"),
    ("bf16-true", "none"),
    ("16-mixed", "none"),
]
UNDERFLOW = [("32-true", "none"), ("16-mixed", "dynamic"), ("16-mixed", "none")]
FINAL_WINDOW = 20  # "final CE" averages the last this many training steps
INITIAL_SCALE = 2.0**15  # of the dynamic runs (DynamicLossScale's default, jmp's)
# Runs "match" when their test accuracies differ by at most this many points (7 of 449 digits).
TOLERANCE = 1.5
#: pp.optim.adam's precision options by name. "default" leaves float32 parameters as
#: torch.optim.Adam does and keeps float32 master copies of 16-bit ones.
OPTIMIZERS: dict[str, dict[str, Any]] = {
    "default": {},
    "nearest": {"master_weights": False},
    "master weights": {"master_weights": True},
    "stochastic": {"rounding": "stochastic"},
    "Kahan": {"kahan": True},
    "Kahan, bf16 moments": {"kahan": True, "state_dtype": torch.bfloat16},
}
#: --optimizers: float32, then bfloat16 parameters under each option.
OPTIMIZER_RUNS = [("32-true", "default")] + [
    ("bf16-true", name) for name in OPTIMIZERS if name != "default"
]
# --optimizers rows "match" float32 within this many points of test accuracy.
OPTIMIZER_TOLERANCE = 1.0


def make_model(hidden: int, seed: int) -> nn.Module:
    """A 64-hidden-hidden-10 MLP with GELUs, initialised from ``seed``."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Sequential(
            nn.Linear(64, hidden),
            nn.GELU(),
            nn.Linear(hidden, hidden),
            nn.GELU(),
            nn.Linear(hidden, 10),
        )


def make_loss_scale(kind: str, policy: pp.Policy, period: int) -> pp.LossScale:
    """``"dynamic"``, ``"none"``, or ``"auto"`` (dynamic when the policy uses float16)."""
    if kind == "auto":
        kind = "dynamic" if policy.uses_float16 else "none"
    if kind == "dynamic":
        return pp.DynamicLossScale(INITIAL_SCALE, period=period)
    return pp.NoOpLossScale()


def train(
    data: Digits,
    *,
    precision: str,
    loss_scale: str,
    loss_weight: float,
    args: argparse.Namespace,
    optimizer: str = "default",
    lr: float | None = None,
    steps: int | None = None,
) -> dict[str, Any]:
    """Train one model; return its report and per-step loss and loss-scale curves.

    ``optimizer`` names the precision options of ``pp.optim.adam`` (:data:`OPTIMIZERS`);
    ``lr`` and ``steps`` default to ``--lr`` and ``--steps``.
    """
    lr = args.lr if lr is None else lr
    steps = args.steps if steps is None else steps
    policy = pp.get_policy(precision)
    model = make_model(args.hidden, args.seed)
    params = pp.cast_params({k: p.detach() for k, p in model.named_parameters()}, policy)
    start_params = params  # the update is pure: these tensors never change
    # Adam is invariant to the loss weight when its eps is scaled along.
    adam = pp.optim.adam(lr, eps=1e-8 * loss_weight, **OPTIMIZERS[optimizer])
    opt = adam.init(params)
    scale = make_loss_scale(loss_scale, policy, args.scale_period)

    def loss_fn(params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = pp.apply_with_policy(model, params, x, policy=policy)
        return loss_weight * nn.functional.cross_entropy(logits, y)

    grad_fn = pp.value_and_grad(loss_fn, microbatches=args.accumulate)

    def step(params: Any, opt: Any, scale: pp.LossScale, x: torch.Tensor, y: torch.Tensor) -> Any:
        loss, grads, finite, scale = grad_fn(params, x, y, loss_scale=scale)
        grads, norm = clip(grads, args.clip)  # --clip: the unscaled gradients' global norm
        params, opt = adam.step(params, grads, opt, grads_finite=finite)  # skipped if not finite
        return params, opt, scale, loss, grads, norm

    name = f"{precision}, {type(scale).__name__}" + (
        f", loss x{power_of_two(loss_weight)}" if loss_weight != 1 else ""
    )
    if optimizer != "default":
        name += f", {optimizer}"
    losses, scales, norms, seconds = [], [], [], []
    plan = batches(len(data.y_train), args.batch_size, steps, args.seed)
    bar = Progress(plan, desc=name, quiet=args.quiet)
    watch = SkipWatch(bar)  # reads opt.consecutive_skips every 10 steps: warns if training stopped
    for i, idx in enumerate(bar):
        x, y = data.x_train[idx], data.y_train[idx]
        start = time.perf_counter()
        params, opt, scale, loss, grads, norm = step(params, opt, scale, x, y)
        seconds.append(time.perf_counter() - start)
        losses.append(loss)
        scales.append(scale.loss_scale)
        norms.append(norm)
        if not args.quiet and i % 50 == 0:  # reading the loss syncs; only for the display
            bar.set_postfix(loss=f"{float(loss) / loss_weight:.3f}")
        watch.check(i, opt)
    bar.close()

    with torch.no_grad():
        logits = pp.apply_with_policy(model, params, data.x_test, policy=policy)
    loss_curve = torch.stack(losses).float() / loss_weight
    moved = [not torch.equal(params[k], p) for k, p in start_params.items()]
    return {
        "precision": precision,
        "policy": str(policy),
        "optimizer": optimizer,
        "loss scale": type(scale).__name__.removesuffix("LossScale"),
        "loss weight": loss_weight,
        "test acc %": accuracy(logits.float(), data.y_test),
        # The cross-entropy itself, without the loss weight: the same quantity in every row.
        "final CE": float(loss_curve[-FINAL_WINDOW:].mean()),
        "step ms": median_ms(seconds),
        "skipped": int(opt.skips),  # the optimizer state counts the skipped steps
        "accumulate": args.accumulate,
        "clip": args.clip,
        "clipped": clipped_steps(norms, args.clip),
        "final scale": float(scale.loss_scale),
        "param dtype": str(next(iter(params.values())).dtype).removeprefix("torch."),
        "moved": any(moved),
        "bytes/param": bytes_per_parameter(params, grads, opt),
        "loss curve": loss_curve,
        "scale curve": torch.stack(scales).float(),
    }


def bytes_per_parameter(params: Any, grads: Any, opt_state: Any) -> float:
    """Bytes of parameters, gradients and optimizer state per parameter, from the tensors."""
    count = sum(p.numel() for p in optree.tree_leaves(params, namespace="torch"))
    tensors = optree.tree_leaves((params, grads, opt_state), namespace="torch")
    # 0-dim tensors are the step and skip counters: a few bytes per model, not per parameter
    return sum(t.numel() * t.element_size() for t in tensors if t.dim() > 0) / count


def plot(rows: Sequence[dict[str, Any]], path: str) -> None:
    """Save the loss and loss-scale curves of ``rows`` to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_scale) = plt.subplots(1, 2, figsize=(12, 4.5))
    for row in rows:
        tiny = row["loss weight"] != 1
        label = f"{row['precision']}, {row['loss scale']}" + (
            f", loss x{power_of_two(row['loss weight'])}" if tiny else ""
        )
        if row.get("optimizer", "default") != "default":
            label += f", {row['optimizer']}"

        style = {"label": label, "linewidth": 1, "linestyle": "--" if tiny else "-"}
        window = min(20, len(row["loss curve"]))
        smooth = row["loss curve"].unfold(0, window, 1).mean(1)  # running mean
        ax_loss.plot(range(window - 1, len(row["loss curve"])), smooth.numpy(), **style)
        if row["loss scale"] == "Dynamic":
            ax_scale.plot(row["scale curve"].numpy(), **style)
    ax_loss.set(xlabel="step", ylabel="training loss (unweighted, running mean of 20)")
    ax_loss.set_yscale("log")
    ax_scale.set(xlabel="step", ylabel="loss scale (dynamic runs; the others use 1)")
    ax_scale.set_yscale("log", base=2)
    ax_loss.legend(fontsize=7)
    if ax_scale.lines:
        ax_scale.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    # One thread by default: the model is too small to gain from more.
    parser = make_parser(
        __doc__, precision="32-true", steps=600, batch_size=64, lr=2e-3, threads=1, hidden=128
    )
    parser.add_argument(
        "--loss-scale",
        choices=["auto", "dynamic", "none"],
        default="auto",
        help="auto: DynamicLossScale when the policy uses float16, else none",
    )
    parser.add_argument("--loss-weight", type=float, default=1.0, help="multiplies the loss")
    parser.add_argument("--compare", action="store_true", help="run every policy, print a table")
    parser.add_argument(
        "--underflow-weight",
        type=float,
        default=2.0**-20,
        help="loss weight of the underflow case in --compare",
    )
    parser.add_argument(
        "--optimizers",
        action="store_true",
        help="compare pp.optim's precision options under bf16-true with float32, on a case "
        "built to stall nearest rounding (Adam at --stall-lr for --stall-steps steps)",
    )
    parser.add_argument("--stall-lr", type=float, default=5e-5, help="lr of --optimizers")
    parser.add_argument("--stall-steps", type=int, default=3000, help="steps of --optimizers")
    parser.add_argument("--plot", metavar="FILE.png", help="save loss and loss-scale curves")
    parser.add_argument(
        "--scale-period", type=int, default=100, help="DynamicLossScale growth period"
    )
    add_step_options(parser)
    args = parser.parse_args(argv)
    check_step_options(parser, args)
    return args


COLUMNS = [
    ("precision", "s"),
    ("loss scale", "s"),
    ("loss weight", power_of_two),
    ("test acc %", ".1f"),
    ("final CE", ".4f"),
    ("step ms", ".2f"),
    ("skipped", "d"),
    ("final scale", power_of_two),
]


#: The column --clip adds: the steps whose gradients it shortened.
CLIPPED = [("clipped", "d")]


OPTIMIZER_COLUMNS = [
    ("precision", "s"),
    ("optimizer", "s"),
    ("bytes/param", ".0f"),
    ("test acc %", ".1f"),
    ("final CE", ".4f"),
    ("step ms", ".2f"),
]


def optimizer_legend(args: argparse.Namespace, n_test: int) -> list[str]:
    """What the rows and columns of the ``--optimizers`` table mean."""
    return [
        f"Legend: every row trains the same MLP from the same start on the same batches with "
        f"pp.optim.adam at lr {args.stall_lr:g} ({args.stall_steps} steps of "
        f"{args.batch_size} examples); 32-true = float32 parameters, bf16-true = bfloat16 "
        "parameters and compute.",
        "  optimizer    pp.optim.adam's precision options: default (float32: torch's Adam); "
        "nearest = master_weights=False (updates rounded to nearest bfloat16); master weights "
        "= a float32 copy in the state; stochastic = rounding='stochastic'; Kahan = kahan=True "
        "(a bfloat16 compensation buffer); bf16 moments = state_dtype=torch.bfloat16",
        "  bytes/param  parameters + gradients + optimizer state, per parameter, summed over "
        "the tensors",
        f"  test acc %   accuracy on the {n_test} held-out digits (chance: 10%)",
        f"  final CE     cross-entropy, mean of the last {min(FINAL_WINDOW, args.stall_steps)} "
        "training steps",
        "  step ms      median wall time of one training step",
    ]


def optimizer_conclusions(rows: Sequence[dict[str, Any]], args: argparse.Namespace) -> list[str]:
    """One line per bfloat16 row of ``--optimizers``, judged against the float32 row."""
    f32, others = rows[0], rows[1:]
    lines = [
        f"Conclusions (a row matches 32-true when the test accuracies differ by <= "
        f"{OPTIMIZER_TOLERANCE} point):"
    ]
    for row in others:
        gap = row["test acc %"] - f32["test acc %"]
        if abs(gap) <= OPTIMIZER_TOLERANCE:
            verdict = "matches 32-true"
        else:
            verdict = f"is {abs(gap):.1f} points {'above' if gap > 0 else 'below'} 32-true"
        line = (
            f"* bf16-true, {row['optimizer']} {verdict}: {row['test acc %']:.1f}% vs "
            f"{f32['test acc %']:.1f}%, final CE {row['final CE']:.4f} vs {f32['final CE']:.4f}, "
            f"{row['bytes/param']:.0f} bytes per parameter vs {f32['bytes/param']:.0f}"
        )
        if gap < -OPTIMIZER_TOLERANCE and row["optimizer"] == "nearest":
            line += (
                f": Adam's updates (about {args.stall_lr:g}) fall under half a bfloat16 spacing "
                "of most weights and round away"
            )
        lines.append(line + ".")
    return lines


def _dtype(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def legend(rows: Sequence[dict[str, Any]], args: argparse.Namespace, n_test: int) -> list[str]:
    """What each row and column of the table means, for the runs in ``rows``."""
    policies = {spec: pp.get_policy(spec) for spec in dict.fromkeys(r["precision"] for r in rows)}
    dtypes = "; ".join(
        f"{spec} = {_dtype(p.param_dtype)} params, {_dtype(p.compute_dtype)} compute"
        for spec, p in policies.items()
    )
    weights = ", ".join(power_of_two(w) for w in dict.fromkeys(r["loss weight"] for r in rows))
    if len(rows) > 1:
        runs = "every row trains the same MLP from the same start on the same batches"
    else:
        runs = "one training run"
    window = min(FINAL_WINDOW, args.steps)
    return [
        f"Legend: {runs} ({args.steps} steps of {args.batch_size} examples).",
        f"  precision    the policy: {dtypes}",
        f"  loss scale   Dynamic = pp.DynamicLossScale (starts at {power_of_two(INITIAL_SCALE)}, "
        f"doubles after {args.scale_period} finite steps in a row, halves on an overflow); "
        "NoOp = no loss scaling",
        f"  loss weight  the factor the loss is multiplied by: {weights}",
        f"  test acc %   accuracy on the {n_test} held-out digits (chance: 10%)",
        f"  final CE     cross-entropy, mean of the last {window} training steps, without the "
        "loss weight (the same quantity in every row)",
        "  step ms      median wall time of one training step (see the note on speed)",
        "  skipped      steps whose gradients were not finite: the update was skipped",
        "  final scale  the loss scale after the last step (1 without loss scaling)",
    ]


def _label(row: dict[str, Any]) -> str:
    """``row``'s precision, and for float16 whether it had loss scaling."""
    if not pp.get_policy(row["precision"]).uses_float16:
        return str(row["precision"])
    scaling = "with dynamic" if row["loss scale"] == "Dynamic" else "without"
    return f"{row['precision']} {scaling} loss scaling"


def _compare(row: dict[str, Any], ref: dict[str, Any], *, steps: int) -> str:
    """One sentence: how ``row`` did against ``ref``, judged from their numbers."""
    acc, ref_acc = row["test acc %"], ref["test acc %"]
    float16 = pp.get_policy(row["precision"]).uses_float16
    if not row["moved"]:
        if row["skipped"] == steps:
            why = "every step was skipped"
        else:
            why = "every gradient was zero" + (": they underflowed float16" if float16 else "")
        return (
            f"{_label(row)} stalls at {acc:.1f}% (chance: 10%): its parameters never moved, so "
            f"{why}; final CE {row['final CE']:.4f}, where an untrained model is near "
            f"ln 10 = {math.log(10):.4f}."
        )
    gap = acc - ref_acc
    if abs(gap) <= TOLERANCE:
        verdict = f"matches {ref['precision']}"
    else:
        verdict = f"is {abs(gap):.1f} points {'above' if gap > 0 else 'below'} {ref['precision']}"
    line = (
        f"{_label(row)} {verdict}: {acc:.1f}% vs {ref_acc:.1f}% test accuracy, "
        f"final CE {row['final CE']:.4f} vs {ref['final CE']:.4f}"
    )
    if float16 and row["loss scale"] == "NoOp" and abs(gap) <= TOLERANCE:
        line += ", so with this loss float16 needs no loss scaling"
    if row["loss scale"] == "Dynamic":
        skipped = row["skipped"]
        line += (
            f"; {skipped} overflowing step{'' if skipped == 1 else 's'} skipped, "
            f"loss scale {power_of_two(INITIAL_SCALE)} -> {power_of_two(row['final scale'])}"
        )
    return line + "."


def conclusions(rows: Sequence[dict[str, Any]], args: argparse.Namespace) -> list[str]:
    """One line per comparison of a ``--compare`` run, each computed from ``rows``."""

    def find(precision: str, weight: float) -> dict[str, Any]:
        (row,) = [
            r
            for r in rows
            if (r["precision"], r["loss scale"], r["loss weight"]) == (precision, "NoOp", weight)
        ]
        return row

    weight = args.underflow_weight
    tiny = f"Loss x{power_of_two(weight)}"
    f32, f32_tiny = find("32-true", 1.0), find("32-true", weight)
    lines = [
        f"Conclusions (runs match when their test accuracies differ by <= {TOLERANCE} points):"
    ]
    lines += [
        f"* {_compare(r, f32, steps=args.steps)}"
        for r in rows
        if r["loss weight"] == 1.0 and r is not f32
    ]
    if abs(f32_tiny["test acc %"] - f32["test acc %"]) <= TOLERANCE:
        same = "trains as before (Adam is invariant to the scale of the loss)"
    else:
        same = "does not train as before"
    lines.append(
        f"* {tiny}: 32-true {same}: {f32_tiny['test acc %']:.1f}% vs {f32['test acc %']:.1f}%."
    )
    lines += [
        f"* {tiny}: {_compare(r, f32_tiny, steps=args.steps)}"
        for r in rows
        if r["loss weight"] == weight and r is not f32_tiny
    ]
    times = ", ".join(
        f"{_label(r)} {r['step ms']:.2f} ms ({r['step ms'] / f32['step ms']:.2f}x)"
        for r in rows
        if r["loss weight"] == 1.0 and r is not f32
    )
    lines.append(f"* Step time: 32-true {f32['step ms']:.2f} ms; {times}.")
    return lines


def speed_note(args: argparse.Namespace) -> str:
    """Why ``step ms`` can show the 16-bit rows slower, even where bf16 pays."""
    pays = (
        "bf16 pays only on a compute-bound model, on hardware with bf16 matrix units (Intel "
        "AMX, recent GPUs); see examples/char_lm.py with a larger --d-model."
    )
    emulated = (
        "on a CPU without bfloat16 or float16 matrix units 16-bit matmuls are emulated, "
        "slower than float32 ones."
    )
    size = f"a 64-{args.hidden}-{args.hidden}-10 MLP, batches of {args.batch_size}"
    if args.hidden > 256:
        return f"Note on speed ({size}): {emulated} {pays}"
    return (
        f"Note on speed: this model is tiny ({size}), so per-call overhead (Python, operator "
        f"dispatch, the casts a policy adds) dominates step ms, and {emulated} That is why the "
        "16-bit rows can be slower than 32-true even where `polprec info` says bf16 pays: it "
        f"times large matmuls, which are compute-bound. {pays}"
    )


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Run the example; return one report dict per training run."""
    args = parse_args(argv)
    with threads(args.threads):
        return run(args)


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    data = load_digits(seed=args.seed)
    if args.optimizers:
        return run_optimizers(data, args)
    if args.compare:
        runs = [(p, s, 1.0) for p, s in COMPARE]
        runs += [(p, s, args.underflow_weight) for p, s in UNDERFLOW]
    else:
        runs = [(precision_spec(args), args.loss_scale, args.loss_weight)]
    rows = [train(data, precision=p, loss_scale=s, loss_weight=w, args=args) for p, s, w in runs]
    if not args.compare:
        print(f"policy: {rows[0]['policy']}")
    print_table(rows, COLUMNS + CLIPPED * (args.clip is not None))
    print(step_line(args))
    print()
    print("\n".join(legend(rows, args, len(data.y_test))))
    if args.compare:
        print()
        print("\n".join(conclusions(rows, args)))
    print()
    print(speed_note(args))
    if args.plot:
        plot(rows, args.plot)
        print(f"saved {args.plot}")
    return rows


def run_optimizers(data: Digits, args: argparse.Namespace) -> list[dict[str, Any]]:
    """``--optimizers``: float32 and bfloat16 parameters under each precision option."""
    rows = [
        train(
            data,
            precision=precision,
            loss_scale="none",
            loss_weight=1.0,
            args=args,
            optimizer=optimizer,
            lr=args.stall_lr,
            steps=args.stall_steps,
        )
        for precision, optimizer in OPTIMIZER_RUNS
    ]
    print_table(rows, OPTIMIZER_COLUMNS + CLIPPED * (args.clip is not None))
    print(step_line(args))
    print()
    print("\n".join(optimizer_legend(args, len(data.y_test))))
    print()
    print("\n".join(optimizer_conclusions(rows, args)))
    if args.plot:
        plot(rows, args.plot)
        print(f"saved {args.plot}")
    return rows


if __name__ == "__main__":
    main()
