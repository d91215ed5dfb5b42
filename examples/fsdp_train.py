"""Fully sharded (FSDP, ZeRO-3) mixed-precision training with ``Shard(0)`` DTensor parameters.

    polprec run --devices 2 examples/fsdp_train.py --precision bf16-mixed
    python examples/fsdp_train.py --precision bf16-mixed      # one process: a 1-rank mesh

The model and data are ``char_lm.py``'s: a character-level transformer on Python's own
standard-library sources. Every parameter is a DTensor placed ``Shard(0)`` on a 1-D mesh of
the ranks (``distribute_tensor``), so each rank holds its rows of every parameter, of every
gradient and of AdamW's moments. No ``fully_shard`` wrapper: ``pp.apply_with_policy``
all-gathers each parameter just before the model uses it (cast to the compute dtype first,
so 16-bit bytes move), ``pp.value_and_grad`` returns the gradient of the mean loss over all
ranks, reduce-scattered back to ``Shard(0)`` in float32, ``pp.clip_by_global_norm`` clips
to the global norm, and ``pp.optim.partition`` (AdamW, weight decay on 2-D weights only)
updates each rank's shards with torch's fused kernel, in place (``donate=True``). Each rank
takes its slice of every global batch.

At the end it prints the bytes of parameters, gradients and optimizer state each rank holds
(the local shards) against what one process holds for the same model: about 1/N of it on N
ranks. Then rank 0 trains the same model from the same start in one process, with plain
tensors on the whole global batches for the same steps, and compares the final parameters
(the largest difference, and the norm of the difference over the norm of what training
changed). On a 1-rank mesh they are equal bit for bit. On N ranks each rank's backward pass
sums its own slice of the batch, which rounds differently from the whole batch (the
optimizer itself is elementwise and agrees bit for bit, given the same gradients); to show
that this is all, rank 0 also trains one process with each batch split into the ranks'
slices as micro-batches (``microbatches=N``), which differs from the whole-batch run by the
same amount. ``--precision 32-true`` shows it with float32 rounding.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import Any

import optree
import torch
import torch.distributed as dist
from _common import init_distributed, make_parser, precision_spec, threads
from char_lm import CharTransformer, stdlib_text
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Partial, Shard, distribute_tensor

import polprec as pp

Tree = dict[str, torch.Tensor]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = make_parser(
        __doc__, precision="bf16-mixed", steps=20, batch_size=16, lr=3e-3, threads=1
    )
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--text-bytes", type=int, default=200_000)
    parser.add_argument("--clip", type=float, default=1.0, help="global gradient norm")
    parser.add_argument("--log-every", type=int, default=5, help="print the loss every N steps")
    args = parser.parse_args(argv)
    if not args.clip > 0:
        parser.error(f"--clip must be a number > 0, got {args.clip}")
    return args


def held_bytes(*trees: Any) -> int:
    """Bytes of the tensors in ``trees`` that this process holds: a DTensor's local shard."""
    leaves = optree.tree_leaves(trees, namespace="torch")  # polprec's states are torch pytrees
    local = [x.to_local() if isinstance(x, DTensor) else x for x in leaves]
    return sum(t.numel() * t.element_size() for t in local)


def optimizer(lr: float) -> pp.optim.Partition:
    """AdamW that decays the 2-D weights only (nanoGPT's groups)."""
    return pp.optim.partition(
        {
            "decay": pp.optim.adamw(lr, weight_decay=0.1),
            "no_decay": pp.optim.adamw(lr, weight_decay=0.0),
        },
        lambda path, leaf: "decay" if leaf.dim() >= 2 else "no_decay",
    )


def train(
    model: nn.Module,
    params: Tree,
    batches: Sequence[torch.Tensor],
    policy: pp.Policy,
    args: argparse.Namespace,
    *,
    microbatches: int = 1,
    cast_first: bool = False,
    log: Any = None,
) -> tuple[Tree, Tree, Any, list[torch.Tensor]]:
    """``len(batches)`` steps from ``params`` (DTensors or plain tensors alike); returns the
    final parameters, the last gradients, the optimizer state and each step's loss.

    ``cast_first`` casts plain parameters to the compute dtype before the model, as the
    gather does with DTensor ones (FSDP2's ``param_dtype``): a mixed policy otherwise leaves
    plain parameters to autocast, which keeps LayerNorm's and the embedding's in float32.
    """
    opt = optimizer(args.lr)
    opt_state = opt.init(params)
    loss_scale = pp.default_loss_scale(policy)

    def loss_fn(params: Tree, tokens: torch.Tensor) -> torch.Tensor:
        if cast_first:
            params = policy.cast_to_compute(params)
        logits = pp.apply_with_policy(model, params, tokens[:, :-1], policy=policy)
        return nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())

    step_grad = pp.value_and_grad(loss_fn, microbatches=microbatches)
    losses = []
    grads: Tree = {}
    for i, tokens in enumerate(batches):
        loss, grads, finite, loss_scale = step_grad(params, tokens, loss_scale=loss_scale)
        grads, _ = pp.clip_by_global_norm(grads, args.clip)
        params, opt_state = opt.step(params, grads, opt_state, grads_finite=finite, donate=True)
        losses.append(loss)
        if log is not None and (i % args.log_every == 0 or i == len(batches) - 1):
            log(i, loss)
    return params, grads, opt_state, losses


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the example; rank 0 returns its report (the other ranks an empty dict)."""
    args = parse_args(argv)
    with threads(args.threads):
        init_distributed()
        try:
            report = run(args)
            dist.barrier()  # no rank tears the group down while another still uses it
            return report
        finally:
            dist.destroy_process_group()


def run(args: argparse.Namespace) -> dict[str, Any]:
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.batch_size % world:
        raise SystemExit(f"--batch-size {args.batch_size} must divide over {world} ranks")
    policy = pp.get_policy(precision_spec(args))
    mesh = init_device_mesh("cpu", (world,))
    with torch.random.fork_rng():
        torch.manual_seed(args.seed)
        model = CharTransformer(
            d_model=args.d_model, n_layers=args.layers, n_heads=args.heads, context=args.context
        )
    start = pp.cast_params({k: p.detach() for k, p in model.named_parameters()}, policy)
    # The same global batches on every rank (one seeded generator); each rank takes its slice.
    text, span = stdlib_text(args.text_bytes), args.context + 1
    gen = torch.Generator().manual_seed(args.seed)
    starts = torch.randint(0, len(text) - span, (args.steps, args.batch_size), generator=gen)
    batches = [torch.stack([text[s : s + span] for s in row.tolist()]) for row in starts]
    per_rank = args.batch_size // world
    mine = [b[rank * per_rank : (rank + 1) * per_rank] for b in batches]

    n_params = sum(p.numel() for p in start.values())
    if rank == 0:
        print(
            f"char-LM of {n_params:,} parameters, each a DTensor placed Shard(0) over {world} "
            f"rank(s); policy {policy}; {args.steps} steps of {args.batch_size} sequences of "
            f"{args.context} bytes ({per_rank} per rank)"
        )

    def log(i: int, loss: torch.Tensor) -> None:  # this rank's loss, averaged over the ranks
        mean = DTensor.from_local(loss.float(), mesh, [Partial("avg")]).full_tensor()
        if rank == 0:
            print(f"step {i:3d}  loss {float(mean):.4f}")

    # distribute_tensor sends rank 0's values: every rank starts from the same parameters
    sharded = {k: distribute_tensor(v.clone(), mesh, [Shard(0)]) for k, v in start.items()}
    began = time.perf_counter()
    params, grads, opt_state, _ = train(model, sharded, mine, policy, args, log=log)
    elapsed = time.perf_counter() - began
    mine_bytes = torch.tensor([held_bytes(params, grads, opt_state)])
    # one number per rank, stacked by DTensor's all-gather
    per_rank_bytes = DTensor.from_local(mine_bytes, mesh, [Shard(0)]).full_tensor().tolist()
    final = {k: v.full_tensor() for k, v in params.items()}  # every rank takes part
    if rank != 0:
        return {}

    # One process on rank 0: plain tensors, the same start, batches and steps.
    def one_process(microbatches: int) -> tuple[Tree, int, float]:
        fresh = {k: v.clone() for k, v in start.items()}
        out, grads, state, losses = train(
            model, fresh, batches, policy, args, microbatches=microbatches, cast_first=True
        )
        return out, held_bytes(out, grads, state), float(losses[-1])

    whole, whole_bytes, whole_loss = one_process(1)
    print(f"{world} rank(s): {args.steps} steps in {elapsed:.1f} s")
    print(
        "bytes of params + grads + optimizer state held: "
        + ", ".join(f"rank {r} {b:,}" for r, b in enumerate(per_rank_bytes))
        + f"; one process {whole_bytes:,} (largest rank / one process = "
        f"{max(per_rank_bytes) / whole_bytes:.3f})"
    )
    trained = _norm({k: whole[k] - start[k] for k in whole})  # the norm of what training did

    def gap(a: Tree, b: Tree) -> str:
        diff = {k: a[k] - b[k] for k in a}
        largest = max(float(d.abs().max()) for d in diff.values())
        return f"max |difference| {largest:.3g}, its norm {_norm(diff) / trained:.2g} of training's"

    report: dict[str, Any] = {
        "world": world,
        "per rank bytes": per_rank_bytes,
        "one process bytes": whole_bytes,
        "max abs diff": max(float((final[k] - whole[k]).abs().max()) for k in final),
        "relative diff": _norm({k: final[k] - whole[k] for k in final}) / trained,
        "bitwise": all(torch.equal(final[k], whole[k]) for k in final),
    }
    print(
        f"final params against one process (rank 0: plain tensors, whole batches, the same "
        f"start and steps; final loss {whole_loss:.4f}): {gap(final, whole)}"
    )
    if report["bitwise"] or world == 1:
        print(f"agreement: {'bitwise equal' if report['bitwise'] else 'NOT bitwise equal'}")
        return report
    # What rounding alone does: one process, each batch split into the ranks' slices
    split, _, _ = one_process(world)
    report["rounding diff"] = _norm({k: split[k] - whole[k] for k in split}) / trained
    print(
        f"rounding alone: one process, each batch as {world} micro-batches (the ranks' "
        f"slices), against whole batches: {gap(split, whole)}"
    )
    within = report["relative diff"] <= 1.5 * report["rounding diff"]
    dtype = str(policy.compute_dtype).removeprefix("torch.")
    print(
        f"agreement: not bitwise, {'within' if within else 'NOT within'} {dtype} rounding: "
        f"{world} ranks differ from one process about as much as one process differs from "
        f"itself when its {dtype} backward pass sums the same slices apart (AdamW turns "
        "rounding into whole steps where a gradient is near zero)"
    )
    return report


def _norm(tree: Tree) -> float:
    """The 2-norm of all of ``tree``'s elements together."""
    return float(torch.linalg.vector_norm(torch.stack([v.norm() for v in tree.values()])))


if __name__ == "__main__":
    main()
