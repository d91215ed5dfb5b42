"""A fully sharded training step on two gloo ranks: polprec's DTensor step against FSDP2.

On the same transformer, data and policy (default ``bf16-mixed``), each rank runs, one step
per call:

* ``polprec donate``: every parameter a ``Shard(0)`` DTensor (``distribute_tensor``), the
  module itself moved to the ``meta`` device (it holds no tensors); ``pp.value_and_grad`` +
  ``pp.clip_by_global_norm`` + ``pp.optim.adamw`` with ``grads_finite``, eager,
  ``donate=True`` (the fused kernel updates each rank's shards in place);
* ``polprec pure``: the same step with ``donate=False`` (new shards every step);
* ``FSDP2``: torch's ``fully_shard`` on every encoder layer and on the root, with
  ``pp.to_fsdp_mixed_precision(policy)``'s ``MixedPrecisionPolicy`` (``root=False`` on the
  layers), ``loss.backward()``, ``clip_grad_norm_`` and ``torch.optim.AdamW(fused=True)``
  (no GradScaler: bfloat16 needs none; polprec's step checks the gradients' finiteness
  inside its kernel, which FSDP2's does not).

Timing: ``_timing.measure`` inside each rank, candidates interleaved in shuffled rounds whose
order is seeded, so both ranks run the same candidate at the same time (collectives need
both); every call ends with ``dist.barrier()``, so a step counts as done when it is done on
both ranks. The table gives the slower rank's median and its ratio to FSDP2's.

Memory per rank, from the tensors torch allocates (not from the resident set size, which
the three candidates of one process share and the allocator blurs):

* ``state MB``: bytes of parameters + gradients + optimizer state each rank holds after a
  step (the local shards of the DTensors: ``to_local()``), counted from the tensors;
* ``step peak MB``: what one step allocates on top of that at its peak (gathered
  parameters, activations, new gradients, and for the pure step its new parameters and
  state), from the allocation and free events of ``torch.profiler`` with
  ``profile_memory=True`` over one step after the timed ones: the largest running sum;
* ``peak MB``: the two together, the most a rank holds during a step. The larger rank's.

``--repeats 20`` on the default model (about 1.6 M parameters) takes about a minute on two
cores. Run: ``python benchmarks/bench_distributed.py [--repeats 20] [--threads 1]``.
"""

from __future__ import annotations

import argparse
import datetime
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optree
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _timing import header, measure, table
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import Shard, distribute_tensor

import polprec as pp

CANDIDATES = ["polprec donate", "polprec pure", "FSDP2"]
LR = 1e-3
CLIP = 1.0


class Transformer(nn.Module):
    """Token embedding, ``blocks`` encoder layers and a head: what ``fully_shard`` wraps per layer."""

    def __init__(self, d: int, heads: int, blocks: int, vocab: int = 96) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True)
            for _ in range(blocks)
        )
        self.head = nn.Linear(d, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        for layer in self.layers:
            h = layer(h)
        return self.head(h)  # (batch, seq, vocab): not a view, which FSDP2 warns about


def _model(args: argparse.Namespace) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)  # the same start on every rank and for every candidate
        return Transformer(args.d_model, args.heads, args.layers)


def _batch(args: argparse.Namespace, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's own batch: tokens and next-token targets."""
    gen = torch.Generator().manual_seed(1 + rank)
    tokens = torch.randint(0, 96, (args.batch_size, args.seq + 1), generator=gen)
    return tokens[:, :-1], tokens[:, 1:].flatten()


def _held(*trees: Any) -> int:
    """Bytes of the tensors in ``trees`` this rank holds (a DTensor's local shard)."""
    leaves = optree.tree_leaves(trees, namespace="torch")
    local = [x.to_local() if hasattr(x, "to_local") else x for x in leaves]
    return sum(t.numel() * t.element_size() for t in local if isinstance(t, torch.Tensor))


# --- the candidates: each (setup) -> (one step, bytes held) -------------------------------


Candidate = tuple[Callable[[], None], Callable[[], int]]


def polprec_step(args: argparse.Namespace, rank: int, mesh: Any, donate: bool) -> Candidate:
    policy = pp.get_policy(args.precision)
    model = _model(args)
    plain = pp.cast_params({k: v.detach() for k, v in model.named_parameters()}, policy)
    params = {k: distribute_tensor(v, mesh, [Shard(0)]) for k, v in plain.items()}
    del plain
    model.to("meta")  # the module is a recipe now: the DTensors hold the parameters
    x, y = _batch(args, rank)
    opt = pp.optim.adamw(LR)

    def loss_fn(params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> Any:
        logits = pp.apply_with_policy(model, params, x, policy=policy)
        return nn.functional.cross_entropy(logits.flatten(0, 1), y)

    step_grad = pp.value_and_grad(loss_fn)
    box: dict[str, Any] = {"params": params, "scale": pp.default_loss_scale(policy)}

    def step() -> None:
        box.pop("grads", None)  # as zero_grad(set_to_none=True): the last step's are dropped
        if "state" not in box:  # made at the first step, as torch.optim makes its own
            box["state"] = opt.init(box["params"])
        _, grads, finite, box["scale"] = step_grad(box["params"], x, y, loss_scale=box["scale"])
        grads, _ = pp.clip_by_global_norm(grads, CLIP)
        box["params"], box["state"] = opt.step(
            box["params"], grads, box["state"], grads_finite=finite, donate=donate
        )
        box["grads"] = grads
        dist.barrier()

    return step, lambda: _held(box["params"], box["grads"], box["state"])


def fsdp2_step(args: argparse.Namespace, rank: int, mesh: Any) -> Candidate:
    policy = pp.get_policy(args.precision)
    model = _model(args).to(policy.param_dtype)
    for layer in model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=pp.to_fsdp_mixed_precision(policy, root=False))
    fully_shard(model, mesh=mesh, mp_policy=pp.to_fsdp_mixed_precision(policy))
    x, y = _batch(args, rank)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, fused=True)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x).flatten(0, 1), y)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        dist.barrier()

    def held() -> int:
        params = list(model.parameters())
        grads = [p.grad for p in params if p.grad is not None]
        states = [v for s in opt.state.values() for v in s.values()]
        return _held(params, grads, states)

    return step, held


def _candidate(name: str, args: argparse.Namespace, rank: int, mesh: Any) -> Candidate:
    if name == "FSDP2":
        return fsdp2_step(args, rank, mesh)
    return polprec_step(args, rank, mesh, donate=name == "polprec donate")


def _step_peak(step: Callable[[], None]) -> int:
    """The most bytes ``step`` allocates beyond what was allocated when it began."""
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
    ) as prof:
        step()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    now = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        now += event.nbytes()  # negative for a free
        peak = max(peak, now)
    return peak


# --- the ranks ----------------------------------------------------------------------------


def _rank(rank: int, port: int, out_dir: str, options: dict[str, Any]) -> None:
    args = argparse.Namespace(**options)
    torch.set_num_threads(args.threads)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=args.world,
        timeout=datetime.timedelta(seconds=300),
    )
    try:
        mesh = init_device_mesh("cpu", (args.world,))
        steps = {name: _candidate(name, args, rank, mesh) for name in CANDIDATES}
        times = measure({n: s for n, (s, _) in steps.items()}, repeats=args.repeats)
        result = {
            "times": times,
            "held": {n: held() for n, (_, held) in steps.items()},
            "peak": {
                n: _step_peak(step) for n, (step, _) in steps.items()
            },  # same order on every rank
            "header": header(),
        }
        dist.barrier()  # no rank tears the group down while another still uses it
    finally:
        dist.destroy_process_group()
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _launch(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Run the candidates on ``args.world`` gloo ranks on this machine; each rank's result.

    Ranks still running after ``args.timeout`` seconds are killed, and it raises.
    """
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.start_processes(
            _rank,
            args=(_free_port(), out_dir, vars(args)),
            nprocs=args.world,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + args.timeout
        try:
            while not ctx.join(timeout=1.0):  # raises with a rank's traceback if one failed
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the ranks did not finish within {args.timeout:g} s")
        finally:
            for process in ctx.processes:
                if process.is_alive():
                    process.kill()
                process.join()
        return [torch.load(Path(out_dir) / f"rank{r}.pt") for r in range(args.world)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", default="bf16-mixed")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--world", type=int, default=2, help="gloo ranks (processes)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per rank")
    parser.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    parser.add_argument(
        "--timeout", type=float, default=900, help="seconds before the ranks are killed"
    )
    args = parser.parse_args(argv)
    n_params = sum(p.numel() for p in _model(args).parameters())
    ranks = _launch(args)

    def worst(what: str, name: str) -> Any:  # the slower rank's median, the larger rank's bytes
        return max(r[what][name] for r in ranks)

    fsdp_time = worst("times", "FSDP2")
    fsdp_peak = worst("held", "FSDP2") + worst("peak", "FSDP2")
    rows = []
    for name in CANDIDATES:
        seconds, held = worst("times", name), worst("held", name)
        peak = max(r["held"][name] + r["peak"][name] for r in ranks)
        rows.append(
            [
                name,
                f"{seconds * 1e3:.1f}",
                f"{seconds / fsdp_time:.2f}x",
                f"{held / 2**20:.2f}",
                f"{worst('peak', name) / 2**20:.2f}",
                f"{peak / 2**20:.2f}",
                f"{peak / fsdp_peak:.2f}x",
            ]
        )
    print(ranks[0]["header"])
    print(
        f"{args.world} gloo ranks, {args.threads} thread(s) each; {args.precision}; transformer "
        f"of {n_params:,} parameters (d {args.d_model}, {args.layers} layers), "
        f"{args.batch_size} x {args.seq} tokens per rank; median of {args.repeats} "
        "interleaved rounds (the slower rank's), memory per rank (the larger rank's)"
    )
    head = ["candidate", "step ms", "vs FSDP2", "state MB", "step peak MB", "peak MB"]
    print(table(rows, [*head, "vs FSDP2"]))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
