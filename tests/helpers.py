"""Helpers shared by the test files (fixtures live in conftest.py).

Imported as ``from helpers import ...``: pytest puts ``tests/`` on ``sys.path`` because it
has no ``__init__.py`` (the default ``prepend`` import mode), as it does for ``conftest``.
"""

from __future__ import annotations

import copy
import datetime
import gc
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import polprec as pp
from polprec import _tree

# --- trees ---------------------------------------------------------------------------------


def float_leaves(tree: Any) -> list[torch.Tensor]:
    """The floating-point tensor leaves of ``tree``, in flatten order."""
    return [x for x in _tree.tree_leaves(tree) if _tree.is_float_tensor(x)]


Snapshot = tuple[Any, list[Any], list[int]]


def snapshot(tree: Any) -> Snapshot:
    """What :func:`assert_unchanged` compares: a shallow copy, leaf values and versions."""
    leaves = _tree.tree_leaves(tree)
    return (
        copy.copy(tree) if isinstance(tree, dict | list) else tree,
        [x.detach().clone() if isinstance(x, torch.Tensor) else x for x in leaves],
        [x._version if isinstance(x, torch.Tensor) else -1 for x in leaves],
    )


def assert_unchanged(tree: Any, snap: Snapshot) -> None:
    """``tree`` was not modified since ``snap``: no in-place write, same values and objects."""
    shallow, values, versions = snap
    leaves = _tree.tree_leaves(tree)
    assert [x._version if isinstance(x, torch.Tensor) else -1 for x in leaves] == versions
    for x, v in zip(leaves, values, strict=True):
        if isinstance(x, torch.Tensor):
            assert torch.equal(x.nan_to_num(), v.nan_to_num())
    if isinstance(tree, dict):
        assert list(tree.items()) == list(shallow.items())  # same keys, same objects
    if isinstance(tree, list):
        assert all(a is b for a, b in zip(tree, shallow, strict=True))


# --- loss scaling --------------------------------------------------------------------------


def trajectory(state: Any, flags: list[bool]) -> tuple[list[float], list[int]]:
    """The scale and counter after each ``adjust`` of ``state`` by ``flags``."""
    scales, counters = [], []
    for flag in flags:
        state = state.adjust(torch.tensor(flag))
        scales.append(float(state.loss_scale))
        counters.append(int(state.counter))
    return scales, counters


# --- models and data -----------------------------------------------------------------------


def block_batch(n: int = 6, *, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed ``(x, y)`` batch for conftest's ``Block``: ``x`` of shape (n, 5, 8), ``y`` (n,)."""
    g = torch.Generator(device=device).manual_seed(1)
    return torch.randn(n, 5, 8, device=device, generator=g), torch.randn(
        n, device=device, generator=g
    )


def mse_loss_fn(model: nn.Module, policy: Any) -> Callable[..., torch.Tensor]:
    """``loss_fn(params, x, y)``: the float32 mean squared error of ``model`` under ``policy``."""

    def loss_fn(params: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = pp.apply_with_policy(model, params, (x,), policy=policy)
        return ((out.float() - y) ** 2).mean()

    return loss_fn


def load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """sklearn's bundled digits: float32 inputs of shape (1797, 64) in [0, 1], int64 labels."""
    from sklearn import datasets

    x, y = datasets.load_digits(return_X_y=True)
    return torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y, dtype=torch.int64)


# --- processes -----------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- real torch.distributed processes (gloo over loopback) ---------------------------------

#: How long a multi-process test may run before its ranks are killed.
DIST_TIMEOUT_S = 50.0


def _dist_entry(
    rank: int,
    worker: Callable[[int, Any], Any],
    port: int,
    out_dir: str,
    data: Any,
    world: int,
    timeout_s: float,
) -> None:
    torch.set_num_threads(1)  # the ranks share the machine's cores
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    try:
        result = worker(rank, data)
        # Free the worker's modules, meshes and pending work while the interpreter is alive:
        # FSDP2 keeps the group referenced through cycles, and a gloo group whose C++ side
        # is torn down only at interpreter exit may abort the process.
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


def spawn(
    worker: Callable[[int, Any], Any],
    tmp_path: Path,
    data: Any,
    *,
    world: int = 2,
    timeout_s: float = DIST_TIMEOUT_S,
) -> list[Any]:
    """Run ``worker(rank, data)`` on ``world`` gloo ranks; return each rank's result.

    ``worker`` must live at module level (the spawn start method pickles it by name) and
    return what ``torch.load(weights_only=True)`` reads back. Ranks that outlive
    ``timeout_s`` are killed and the test fails.
    """
    ctx = mp.start_processes(
        _dist_entry,
        args=(worker, free_port(), str(tmp_path), data, world, timeout_s),
        nprocs=world,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=1.0):  # raises with the worker's traceback if one failed
            if time.monotonic() > deadline:
                pytest.fail(f"{worker.__name__} did not finish within {timeout_s:.0f} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
            p.join()
    return [torch.load(Path(tmp_path) / f"rank{r}.pt", weights_only=True) for r in range(world)]


def seeded_mlp(d_in: int, hidden: int, classes: int) -> nn.Module:
    """``Linear -> GELU -> Linear``, the same weights every call (the global RNG untouched)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, classes))


def classification_batches(
    steps: int,
    batch: int,
    d_in: int,
    classes: int,
    overflow_at: tuple[int, ...],
    *,
    bad: tuple[int, int],
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``steps`` seeded ``(x, y)`` batches; at ``overflow_at`` an inf at ``x[bad]``."""
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(steps):
        x = torch.randn(batch, d_in, generator=g)
        if i in overflow_at:
            x[bad] = float("inf")  # one bad example: every gradient is non-finite
        out.append((x, torch.randint(0, classes, (batch,), generator=g)))
    return out


# --- pp.optim on DTensors: the same small tree in one process and on two ranks -------------

#: One optimizer per kind of update and precision option, with the parameter dtype it runs on.
OPTIM_CASES: dict[str, tuple[Any, torch.dtype]] = {
    "adamw": (pp.optim.adamw(1e-2), torch.float32),
    "adam-amsgrad": (pp.optim.adam(1e-2, amsgrad=True, weight_decay=0.1), torch.float32),
    "sgd-nesterov": (pp.optim.sgd(0.1, momentum=0.9, nesterov=True), torch.float32),
    "sgd-dampening": (pp.optim.sgd(0.1, momentum=0.9, dampening=0.5), torch.float32),
    "master-bf16": (pp.optim.adamw(1e-2, master_weights=True), torch.bfloat16),
    "stochastic-bf16": (pp.optim.adamw(1e-3, rounding="stochastic"), torch.bfloat16),
    "kahan-bf16": (pp.optim.sgd(1e-2, momentum=0.9, kahan=True), torch.bfloat16),
    "partition": (
        pp.optim.partition(
            {"decay": pp.optim.adamw(1e-2, weight_decay=0.1), "other": pp.optim.sgd(0.1)},
            lambda path, leaf: "decay" if leaf.dim() >= 2 else "other",
        ),
        torch.float32,
    ),
}


def optim_tree(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Three seeded parameters of odd sizes (every ``Shard`` over 2 ranks splits unevenly)."""
    gen = torch.Generator().manual_seed(0)
    shapes = {"w": (5, 3), "v": (3, 4), "b": (7,)}
    return {k: torch.randn(s, generator=gen).to(dtype) for k, s in shapes.items()}


def optim_grads(like: dict[str, torch.Tensor], t: int) -> dict[str, torch.Tensor]:
    """Step ``t``'s seeded gradients for ``like``'s shapes and dtypes."""
    gen = torch.Generator().manual_seed(10 + t)
    return {k: (torch.randn(v.shape, generator=gen) * 1e-2).to(v.dtype) for k, v in like.items()}
