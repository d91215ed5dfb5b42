"""A full training step: polprec (eager and compiled) against the hand-written torch.amp step.

Two models: an MLP (small ops: per-call overhead dominates) and a 2-block transformer encoder
(matmuls dominate). For each, the median time per step of

* ``fp32``: plain float32 step (``loss.backward()`` + ``torch.optim.SGD``), for reference;
* ``torch.amp``: ``torch.autocast`` + ``torch.amp.GradScaler`` + ``torch.optim.SGD``;
* ``polprec``: ``pp.value_and_grad`` + a functional SGD update + ``pp.select_tree``, eager;
* ``polprec compiled``: the same step under ``torch.compile(fullgraph=True)``,

all measured interleaved in one process, and the ratios to ``torch.amp``. Both mixed steps use
dynamic loss scaling (GradScaler / DynamicLossScale). ``--precision 32-true`` compares the same
steps in float32 (autocast off), which isolates per-step overhead and what compilation buys on
hardware without fast 16-bit matmuls. Run:
``python benchmarks/bench_step.py [--precision 16-mixed] [--no-compile] [--device cuda]``.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from _timing import header, measure, parse_args, table
from torch import nn

import polprec as pp

LR = 1e-3


def mlp() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    model = nn.Sequential(
        nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 10)
    )
    return model, (torch.randn(64, 64), torch.randint(0, 10, (64,)))


class Transformer(nn.Module):
    def __init__(self, d: int = 256, heads: int = 4, blocks: int = 2, vocab: int = 96) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, blocks, enable_nested_tensor=False)
        self.head = nn.Linear(d, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(tokens))).flatten(0, 1)


def transformer() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    tokens = torch.randint(0, 96, (16, 128))
    return Transformer(), (tokens, torch.randint(0, 96, (16 * 128,)))


def steps(
    model: nn.Module,
    batch: tuple[torch.Tensor, torch.Tensor],
    spec: str,
    compile_: bool,
    device: str = "cpu",
) -> dict[str, Any]:
    policy = pp.get_policy(spec)
    model = model.to(device)
    x, y = (t.to(device) for t in batch)
    device_type = torch.device(device).type
    loss_f = nn.functional.cross_entropy

    # --- the torch.amp baseline and the float32 reference, on their own copies of the model
    ref = {name: _clone(model) for name in ("fp32", "amp")}
    opts = {name: torch.optim.SGD(m.parameters(), lr=LR) for name, m in ref.items()}
    scaler = torch.amp.GradScaler(device_type, init_scale=2.0**10)

    def fp32_step() -> None:
        opts["fp32"].zero_grad(set_to_none=True)
        loss_f(ref["fp32"](x), y).backward()
        opts["fp32"].step()

    def amp_step() -> None:
        opts["amp"].zero_grad(set_to_none=True)
        # For a float32 policy the same step with autocast off (the GradScaler stays on).
        half = policy.compute_dtype if policy.is_mixed else torch.bfloat16
        with torch.autocast(device_type, dtype=half, enabled=policy.is_mixed):
            loss = loss_f(ref["amp"](x), y)
        scaler.scale(loss).backward()
        scaler.step(opts["amp"])
        scaler.update()

    # --- polprec
    def loss_fn(params: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return loss_f(pp.apply_with_policy(model, params, x, policy=policy), y)

    step_grad = pp.value_and_grad(loss_fn)

    def pp_step(params: Any, state: pp.DynamicLossScale) -> tuple[Any, pp.DynamicLossScale]:
        _, grads, finite, state = step_grad(params, x, y, loss_scale=state)
        new = {k: torch.add(p, grads[k], alpha=-LR) for k, p in params.items()}
        return pp.select_tree(finite, new, params), state

    box: dict[str, Any] = {
        "params": pp.cast_params({k: v.detach() for k, v in model.named_parameters()}, policy),
        "state": pp.DynamicLossScale(2.0**10).to(device),
    }

    def run_pp(fn: Any, key: str) -> Any:
        def run() -> None:
            box[key + "_params"], box[key + "_state"] = fn(
                box.get(key + "_params", box["params"]), box.get(key + "_state", box["state"])
            )

        return run

    candidates = {"fp32": fp32_step, "torch.amp": amp_step, "polprec": run_pp(pp_step, "eager")}
    if compile_:
        candidates["polprec compiled"] = run_pp(torch.compile(pp_step, fullgraph=True), "compiled")
    if device_type == "cuda":  # time whole steps, not kernel launches
        return {name: _synced(fn) for name, fn in candidates.items()}
    return candidates


def _synced(fn: Any) -> Any:
    def run() -> None:
        fn()
        torch.cuda.synchronize()

    return run


def _clone(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", nargs="+", default=["bf16-mixed", "16-mixed"])
    parser.add_argument("--models", nargs="+", default=["mlp", "transformer"])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    args = parse_args(parser, argv)
    rows = []
    for model_name in args.models:
        for spec in args.precision:
            torch.manual_seed(0)
            model, batch = {"mlp": mlp, "transformer": transformer}[model_name]()
            cands = steps(model, batch, spec, not args.no_compile, args.device)
            times = measure(cands, repeats=args.repeats, warmup=3)
            amp = times["torch.amp"]
            row = [model_name, spec] + [
                f"{times[k] * 1e3:.2f} ({times[k] / amp:.2f}x)" if k in times else "-"
                for k in ("fp32", "torch.amp", "polprec", "polprec compiled")
            ]
            rows.append(row)
            print(row, flush=True)
    print(header())
    if torch.device(args.device).type == "cuda":
        print(f"device {torch.cuda.get_device_name()}")
    print("median ms per step (ratio to torch.amp)")
    print(
        table(
            rows, ["model", "precision", "fp32", "torch.amp", "polprec eager", "polprec compiled"]
        )
    )


if __name__ == "__main__":
    main()
