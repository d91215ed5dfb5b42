"""Data-parallel mixed-precision training with polprec and DTensor parameters (CPU, gloo).

Launch two processes on this machine (``polprec run --devices 2`` is ``fabric run --devices 2``;
``torchrun --nproc_per_node=2 examples/ddp_train.py`` starts the same two)::

    polprec run --devices 2 examples/ddp_train.py
    polprec run --devices 2 examples/ddp_train.py --precision bf16-mixed --nan-step 40
    polprec run --devices 2 examples/ddp_train.py --shard   # fully sharded (FSDP, ZeRO-3)

(``python examples/ddp_train.py`` runs the same code as a single process.)

No ``DistributedDataParallel`` wrapper and no hand-written all-reduce: the parameters are
DTensors placed ``Replicate()`` on a one-dimensional mesh of the ranks (``--shard``:
``Shard(0)``), and the training step is a pure function of ``(params, opt_state, loss_scale,
batch)``. Every rank takes its shard of each batch of sklearn's bundled digits;
``pp.value_and_grad`` returns the gradients of the mean loss over all ranks, as DTensors laid
out as the parameters (averaged by DTensor's own collectives, in float32), and a finite flag
agreed over the mesh: one rank's overflow makes every rank skip the step and back off the
scale together. ``pp.optim.sgd(..., momentum=...)`` updates the DTensors: its momentum
buffers are laid out as the parameters, torch's fused kernel updates each rank's local
shards, and a step whose flag is False is skipped on every rank, so the ranks stay bitwise
identical. ``--nan-step N`` poisons the last rank's shard at step N to show it. Rank 0 prints
the test accuracy.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import torch
import torch.distributed as dist
from _common import init_distributed
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

import polprec as pp

Tree = dict[str, torch.Tensor]


def same_on_every_rank(tree: Tree, mesh: Any) -> bool:
    """Whether every rank holds the same local tensors: each rank's, gathered by DTensor."""
    for p in tree.values():
        local = p.to_local()[None]  # one row per rank, stacked by an all-gather
        rows = DTensor.from_local(local, mesh, [Shard(0)]).full_tensor()
        if not all(torch.equal(row, rows[0]) for row in rows):
            return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", default=os.environ.get("POLPREC_PRECISION", "16-mixed"))
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=128, help="global, over all ranks")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--shard", action="store_true", help="Shard(0) parameters (FSDP)")
    parser.add_argument("--nan-step", type=int, default=None, help="poison a rank at step N")
    args = parser.parse_args()

    init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.batch_size % world:
        raise SystemExit(f"--batch-size {args.batch_size} must divide over {world} ranks")
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    policy = pp.get_policy(args.precision)
    mesh = init_device_mesh("cpu", (world,))
    placement = Shard(0) if args.shard else Replicate()

    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y), test_size=0.25, random_state=0
    )
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 10))
    params = {  # rank 0's initialisation, laid out over the mesh (distribute_tensor sends it)
        k: distribute_tensor(v.detach(), mesh, [placement])
        for k, v in pp.cast_params(dict(model.named_parameters()), policy).items()
    }
    sgd = pp.optim.sgd(args.lr, momentum=args.momentum)
    opt_state = sgd.init(params)  # momentum buffers laid out as the parameters
    loss_scale = pp.default_loss_scale(policy)

    def loss_fn(params: Tree, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        logits = pp.apply_with_policy(model, params, xb, policy=policy)
        return torch.nn.functional.cross_entropy(logits, yb)

    step_grad = pp.value_and_grad(loss_fn)

    def train_step(params: Tree, opt_state: Any, loss_scale: Any, xb: Any, yb: Any) -> Any:
        loss, grads, finite, loss_scale = step_grad(params, xb, yb, loss_scale=loss_scale)
        params, opt_state = sgd.step(params, grads, opt_state, grads_finite=finite)
        return loss, params, opt_state, loss_scale

    per_rank = args.batch_size // world
    steps_per_epoch = len(x_train) // args.batch_size
    shuffle = torch.Generator().manual_seed(0)  # the same order on every rank
    start, step = time.perf_counter(), 0
    for epoch in range(args.epochs):
        order = torch.randperm(len(x_train), generator=shuffle)
        for i in range(steps_per_epoch):
            mine = order[i * args.batch_size :][rank * per_rank : (rank + 1) * per_rank]
            xb, yb = x_train[mine], y_train[mine]
            if step == args.nan_step and rank == world - 1:
                xb = xb.clone()
                xb[0, 0] = float("nan")
            loss, params, opt_state, loss_scale = train_step(params, opt_state, loss_scale, xb, yb)
            step += 1
        # this rank's last loss, averaged over the ranks for the log line
        mean_loss = DTensor.from_local(loss.float(), mesh, [Partial("avg")]).full_tensor()
        if rank == 0:
            print(f"epoch {epoch:2d}  loss {float(mean_loss):.4f}")
    elapsed = time.perf_counter() - start

    identical = None if args.shard else same_on_every_rank(params, mesh)
    with torch.no_grad():  # every rank takes part: DTensor parameters gather collectively
        logits = pp.apply_with_policy(model, params, x_test, policy=policy)
    if rank == 0:
        accuracy = float((logits.argmax(-1) == y_test).float().mean())
        print(
            f"policy {policy}, {world} rank(s), {step} steps of {args.batch_size} in {elapsed:.1f} s"
        )
        scale = float(loss_scale.loss_scale)
        print(f"skipped steps {int(opt_state.skips)}, final loss scale {scale:g}")
        if identical is None:
            print(f"params sharded Shard(0) over {world} rank(s)")
        else:
            print(f"params identical on all ranks: {identical}")
        print(f"test accuracy {accuracy:.4f}")
    dist.barrier()  # no rank tears the group down while another still uses it
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
