"""Data-parallel mixed-precision training with polprec and torch.distributed (CPU, gloo).

Launch two processes on this machine (``polprec run --devices 2`` is ``fabric run --devices 2``;
``torchrun --nproc_per_node=2 examples/ddp_train.py`` starts the same two)::

    polprec run --devices 2 examples/ddp_train.py
    polprec run --devices 2 examples/ddp_train.py --precision bf16-mixed --nan-step 40

(``python examples/ddp_train.py`` runs the same code as a single process.)

No ``DistributedDataParallel`` wrapper: the training step is a pure function of
``(params, opt_state, loss_scale, batch)``. Every rank takes its shard of each batch of
sklearn's bundled digits and computes gradients with
``pp.value_and_grad(loss_fn, process_group=WORLD)``, which agrees on ``grads_finite`` across
the ranks before it adjusts the loss scale: one rank's overflow makes every rank skip the
step and back off the scale together. The step then averages the gradients with one
all-reduce of a flat buffer, and ``pp.optim.sgd``'s step keeps or drops the update on the agreed
flag (and counts the skips in its state), so the ranks stay bitwise identical. ``--nan-step N`` poisons rank 1's shard at step N to show it.
Rank 0 prints the test accuracy.
"""

from __future__ import annotations

import argparse
import os
import socket
import time
from typing import Any

import torch
import torch.distributed as dist
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import polprec as pp

Tree = dict[str, torch.Tensor]


def init_distributed() -> None:
    """Join the gloo group torchrun describes, or form a one-process group without torchrun."""
    if "WORLD_SIZE" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1")
    dist.init_process_group("gloo")


def average_across_ranks(grads: Tree) -> Tree:
    """The mean of ``grads`` over all ranks, in one all-reduce of a flat buffer."""
    flat = torch.cat([g.reshape(-1) for g in grads.values()])
    dist.all_reduce(flat)
    parts = (flat / dist.get_world_size()).split([g.numel() for g in grads.values()])
    return {k: p.view_as(g) for (k, g), p in zip(grads.items(), parts, strict=True)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", default=os.environ.get("POLPREC_PRECISION", "16-mixed"))
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=128, help="global, over all ranks")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--nan-step", type=int, default=None, help="poison rank 1 at step N")
    args = parser.parse_args()

    init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.batch_size % world:
        raise SystemExit(f"--batch-size {args.batch_size} must divide over {world} ranks")
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    policy = pp.get_policy(args.precision)

    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y), test_size=0.25, random_state=0
    )
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 10))
    params = pp.cast_params({k: v.detach().clone() for k, v in model.named_parameters()}, policy)
    for p in params.values():  # every rank starts from rank 0's initialisation
        dist.broadcast(p, src=0)
    sgd = pp.optim.sgd(args.lr, momentum=0.9)
    opt_state = sgd.init(params)
    loss_scale = pp.default_loss_scale(policy)

    def loss_fn(params: Tree, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        logits = pp.apply_with_policy(model, params, xb, policy=policy)
        return torch.nn.functional.cross_entropy(logits, yb)

    step_grad = pp.value_and_grad(loss_fn, process_group=dist.group.WORLD)

    def train_step(params: Tree, opt_state: Any, loss_scale: Any, xb: Any, yb: Any) -> Any:
        loss, grads, finite, loss_scale = step_grad(params, xb, yb, loss_scale=loss_scale)
        grads = average_across_ranks(grads)
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
        mean_loss = loss.float().clone()  # this rank's last loss; averaged for the log line
        dist.all_reduce(mean_loss)
        if rank == 0:
            print(f"epoch {epoch:2d}  loss {float(mean_loss) / world:.4f}")
    elapsed = time.perf_counter() - start

    flat = torch.cat([p.float().reshape(-1) for p in params.values()])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    if rank == 0:
        with torch.no_grad():
            logits = pp.apply_with_policy(model, params, x_test, policy=policy)
        accuracy = float((logits.argmax(-1) == y_test).float().mean())
        print(
            f"policy {policy}, {world} rank(s), {step} steps of {args.batch_size} in {elapsed:.1f} s"
        )
        print(
            f"skipped steps {int(opt_state.skips)}, final loss scale {float(loss_scale.loss_scale):g}"
        )
        print(f"params identical on all ranks: {all(torch.equal(g, flat) for g in gathered)}")
        print(f"test accuracy {accuracy:.4f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
