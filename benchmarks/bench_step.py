"""A whole training step: polprec against autocast + GradScaler + torch.optim, as ratios.

Three models: two MLPs (64-256-256-10, and 256-512-512-10 with four times the parameters:
small ops, per-call overhead dominates, the optimizer's share grows with the second) and a
2-block transformer encoder (matmuls dominate); two optimizers: SGD with momentum and AdamW. For each, the median time
per step of

* ``fp32``: a plain float32 step (``loss.backward()`` + the torch.optim optimizer), for
  reference;
* ``torch.amp``: ``torch.autocast`` + ``torch.amp.GradScaler`` + the torch.optim optimizer
  with torch's default implementation;
* ``torch.amp fused``: the same with ``fused=True`` (GradScaler then hands the kernel its
  ``found_inf`` instead of reading it on the host);
* ``no scaler``: for policies without float16, the faster torch.amp step without a
  GradScaler (what bf16 users run: bfloat16 needs no loss scaling);
* ``polprec``: ``pp.value_and_grad`` + the ``pp.optim`` optimizer's pure step with
  ``grads_finite``, eager, with the loss scale ``pp.default_loss_scale`` picks
  (``NoOpLossScale`` unless float16 is involved);
* ``polprec donate``: the same step with ``donate=True`` (the fused kernels update the
  inputs' buffers instead of copies);
* ``polprec donate, no flag``: the donated step without ``grads_finite`` (the optimizer's
  default): the step then checks the gradients itself, one more read of every gradient;
* ``polprec compiled``: the pure step under ``torch.compile(fullgraph=True)``;
* ``copy``: ``torch._foreach_copy_`` of the bytes the pure step writes afresh (the
  parameters and every moment of the optimizer state) into buffers made once: what the pure
  step pays over the donated one should be about this copy (column ``(pure-donate)/copy``),

all measured interleaved in one process, with the ratios to ``torch.amp`` and, for polprec's
steps, to the faster of ``torch.amp`` and ``torch.amp fused`` (the target) and to ``no
scaler``. ``--precision 32-true`` compares the same steps in float32 (autocast off), which
isolates per-step overhead. Run:
``python benchmarks/bench_step.py [--precision 16-mixed] [--optimizers adamw] [--no-compile]``.
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable
from typing import Any

import torch
from _timing import header, measure, parse_args, table
from torch import nn

import polprec as pp

LR = 1e-3

#: name -> (torch.optim optimizer from (params, **implementation), pp.optim optimizer)
OPTIMIZERS: dict[str, tuple[Callable[..., torch.optim.Optimizer], Any]] = {
    "sgd": (
        lambda ps, **kw: torch.optim.SGD(ps, lr=LR, momentum=0.9, **kw),
        pp.optim.sgd(LR, momentum=0.9),
    ),
    "adamw": (lambda ps, **kw: torch.optim.AdamW(ps, lr=LR, **kw), pp.optim.adamw(LR)),
}
COLUMNS = [
    "fp32",
    "torch.amp",
    "torch.amp fused",
    "no scaler",
    "polprec",
    "polprec donate",
    "polprec donate, no flag",
    "polprec compiled",
    "copy",
]


def mlp() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    model = nn.Sequential(
        nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 10)
    )
    return model, (torch.randn(64, 64), torch.randint(0, 10, (64,)))


def mlp512() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    model = nn.Sequential(
        nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 512), nn.GELU(), nn.Linear(512, 10)
    )
    return model, (torch.randn(64, 256), torch.randint(0, 10, (64,)))


MODELS = {"mlp": mlp, "mlp512": mlp512}


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
    optimizer: str,
    compile_: bool,
    device: str = "cpu",
) -> dict[str, Callable[[], None]]:
    """The candidates for one model, precision and optimizer, each one step per call."""
    policy = pp.get_policy(spec)
    model = model.to(device)
    x, y = (t.to(device) for t in batch)
    device_type = torch.device(device).type
    loss_f = nn.functional.cross_entropy
    make_torch, opt = OPTIMIZERS[optimizer]

    def torch_step(
        implementation: dict[str, Any], amp: bool, scaler_on: bool = True
    ) -> Callable[[], None]:
        """A torch.amp step (or, without ``amp``, a plain float32 one) on its own model copy."""
        net = copy.deepcopy(model)
        torch_opt = make_torch(net.parameters(), **implementation)
        scaler = torch.amp.GradScaler(device_type, init_scale=2.0**10)
        # For a float32 policy the same step with autocast off (the GradScaler stays on).
        half = policy.compute_dtype if policy.is_mixed else torch.bfloat16

        def run() -> None:
            torch_opt.zero_grad(set_to_none=True)
            with torch.autocast(device_type, dtype=half, enabled=amp and policy.is_mixed):
                loss = loss_f(net(x), y)
            if not amp or not scaler_on:
                loss.backward()
                torch_opt.step()
                return
            scaler.scale(loss).backward()
            scaler.step(torch_opt)
            scaler.update()

        return run

    def loss_fn(params: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return loss_f(pp.apply_with_policy(model, params, x, policy=policy), y)

    step_grad = pp.value_and_grad(loss_fn)

    def pp_step(params: Any, state: Any, scale: pp.DynamicLossScale, donate: bool) -> Any:
        _, grads, finite, scale = step_grad(params, x, y, loss_scale=scale)
        params, state = opt.step(params, grads, state, grads_finite=finite, donate=donate)
        return params, state, scale

    def pp_step_no_flag(params: Any, state: Any, scale: pp.DynamicLossScale, donate: bool) -> Any:
        _, grads, _, scale = step_grad(params, x, y, loss_scale=scale)
        params, state = opt.step(params, grads, state, donate=donate)  # it checks the grads
        return params, state, scale

    def run_pp(fn: Callable[..., Any], donate: bool = False) -> Callable[[], None]:
        params = pp.cast_params(
            {k: v.detach().clone() for k, v in model.named_parameters()}, policy
        )
        scale = pp.DynamicLossScale(2.0**10) if policy.uses_float16 else pp.NoOpLossScale()
        box = [params, opt.init(params), scale.to(device)]

        def run() -> None:
            box[:] = fn(*box, donate)

        return run

    def copy_floor() -> Callable[[], None]:
        """The pure step's fresh bytes (params and moments), copied into buffers made once."""
        params = pp.cast_params({k: v.detach() for k, v in model.named_parameters()}, policy)
        state = opt.init(params)
        sources = [t for t in pp._tree.tree_leaves((params, state)) if t.is_floating_point()]
        targets = [torch.empty_like(t) for t in sources]

        def run() -> None:
            torch._foreach_copy_(targets, sources)

        return run

    candidates = {
        "fp32": torch_step({}, amp=False),
        "torch.amp": torch_step({}, amp=True),
        "torch.amp fused": torch_step({"fused": True}, amp=True),
        "polprec": run_pp(pp_step),
        "polprec donate": run_pp(pp_step, donate=True),
        "polprec donate, no flag": run_pp(pp_step_no_flag, donate=True),
        "copy": copy_floor(),
    }
    if not policy.uses_float16:
        candidates["no scaler"] = torch_step({"fused": True}, amp=True, scaler_on=False)
    if compile_:
        # pp_step's code is shared by every model, precision and optimizer of a run: start
        # each with an empty cache, so that a run of many does not hit the recompile limit.
        torch._dynamo.reset()
        compiled = torch.compile(pp_step, fullgraph=True)
        candidates["polprec compiled"] = run_pp(compiled)
    if device_type == "cuda":  # time whole steps, not kernel launches
        return {name: _synced(fn) for name, fn in candidates.items()}
    return candidates


def _synced(fn: Callable[[], None]) -> Callable[[], None]:
    def run() -> None:
        fn()
        torch.cuda.synchronize()

    return run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", nargs="+", default=["bf16-mixed", "16-mixed"])
    parser.add_argument(
        "--models",
        nargs="+",
        default=["mlp", "mlp512", "transformer"],
        choices=[*MODELS, "transformer"],
    )
    parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=OPTIMIZERS)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    args = parse_args(parser, argv)
    rows = []
    for model_name in args.models:
        for spec in args.precision:
            for optimizer in args.optimizers:
                torch.manual_seed(0)
                model, batch = {**MODELS, "transformer": transformer}[model_name]()
                cands = steps(model, batch, spec, optimizer, not args.no_compile, args.device)
                times = measure(cands, repeats=args.repeats, warmup=3)
                amp = times["torch.amp"]
                best = min(amp, times["torch.amp fused"])
                row = [model_name, spec, optimizer]
                row += [
                    f"{times[k] * 1e3:.2f} ({times[k] / amp:.2f}x)" if k in times else "-"
                    for k in COLUMNS
                ]
                row += [
                    f"{times[k] / best:.2f}x" if k in times else "-"
                    for k in (
                        "polprec",
                        "polprec donate",
                        "polprec donate, no flag",
                        "polprec compiled",
                    )
                ]
                bare = times.get("no scaler")
                row += [f"{times['polprec'] / bare:.2f}x" if bare else "-"]
                extra = times["polprec"] - times["polprec donate"]
                row += [f"{extra / times['copy']:.2f}x"]
                rows.append(row)
                print(row, flush=True)
    print(header())
    if torch.device(args.device).type == "cuda":
        print(f"device {torch.cuda.get_device_name()}")
    print(
        "median ms per step (ratio to torch.amp); then polprec eager, donated (with and without "
        "grads_finite) and compiled over "
        "the faster torch.amp step (default or fused=True), polprec eager over no scaler, and "
        "what the pure step costs over the donated one, in copies of its fresh bytes"
    )
    head = [
        "model",
        "precision",
        "optimizer",
        *COLUMNS,
        "eager/best",
        "donate/best",
        "no flag/best",
    ]
    head += ["compiled/best", "eager/no scaler", "(pure-donate)/copy"]
    print(table(rows, head))


if __name__ == "__main__":
    main()
