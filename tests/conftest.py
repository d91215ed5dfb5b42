"""Shared fixtures: hypothesis profiles and the tree shapes every tree function is run on."""

from __future__ import annotations

import collections
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.utils._pytree as torch_pytree
from hypothesis import HealthCheck, Phase, settings
from torch import nn
from torch.distributed.device_mesh import init_device_mesh

settings.register_profile(
    "ci", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "thorough", max_examples=1000, deadline=None, suppress_health_check=list(HealthCheck)
)
# For mutation testing: a failing mutant should fail fast, not shrink for minutes.
settings.register_profile(
    "mutation",
    max_examples=20,
    deadline=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    suppress_health_check=list(HealthCheck),
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

if "mutmut" in sys.modules:
    # mutmut forks its workers from this process: a forked child that enters an OpenMP
    # parallel region the parent already started hangs, and the mutant is miscounted as a
    # timeout. One intra-op thread means no OpenMP pool to inherit.
    torch.set_num_threads(1)

torch.manual_seed(0)

Pair = collections.namedtuple("Pair", ["first", "second"])


class Registered:
    """A container registered with torch's pytree registry (as torch.func users do)."""

    def __init__(self, weight: object, extra: object) -> None:
        self.weight = weight
        self.extra = extra

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Registered) and (self.weight, self.extra) == (
            other.weight,
            other.extra,
        )

    __hash__ = None  # type: ignore[assignment]


torch_pytree.register_pytree_node(
    Registered,
    lambda r: ([r.weight, r.extra], None),
    lambda children, _: Registered(*children),
    serialized_type_name="tests.conftest.Registered",
)

FLOAT_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def make_tree(shape: str, dtype: torch.dtype = torch.float32) -> object:
    """One tree of each shape the tree functions must handle."""
    t = lambda *s: torch.randn(*s).to(dtype)  # noqa: E731
    return {
        "dict": lambda: {"w": t(3, 2), "b": t(2)},
        "nested": lambda: {"layer": {"w": t(2, 2), "b": t(2)}, "head": {"w": t(2)}},
        "list": lambda: [t(2), t(3)],
        "tuple": lambda: (t(2), (t(1), t(2, 2))),
        "namedtuple": lambda: Pair(t(2), t(3)),
        "registered": lambda: Registered(t(2, 3), [t(1)]),
        "empty_dict": lambda: {},
        "empty_list": lambda: [],
        "empty_tuple": lambda: (),
        "none": lambda: None,
        "mixed": lambda: {
            "w": t(2),
            "step": torch.tensor(3),
            "mask": torch.tensor([True, False]),
            "z": torch.tensor([1 + 1j]),
            "lr": 0.1,
            "name": "mlp",
            "skip": None,
            "fn": len,
        },
    }[shape]()


TREE_SHAPES = [
    "dict",
    "nested",
    "list",
    "tuple",
    "namedtuple",
    "registered",
    "empty_dict",
    "empty_list",
    "empty_tuple",
    "none",
    "mixed",
]


@pytest.fixture(params=TREE_SHAPES)
def tree_shape(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(params=FLOAT_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def float_dtype(request: pytest.FixtureRequest) -> torch.dtype:
    return request.param  # type: ignore[no-any-return]


class Block(nn.Module):
    """Linear -> LayerNorm -> GELU -> MultiheadAttention -> Linear, mean-pooled to a scalar."""

    def __init__(self, d_in: int = 8, d: int = 16) -> None:
        super().__init__()
        self.inp = nn.Linear(d_in, d)
        self.norm = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.out = nn.Linear(d, 1)
        self.seen: list[torch.dtype] = []
        self.inp.register_forward_hook(lambda m, i, o: self.seen.append(o.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = nn.functional.gelu(self.norm(self.inp(x)))
        a, _ = self.attn(h, h, h, need_weights=False)
        return self.out(a + h).squeeze(-1).mean(-1)


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[Any]:
    """A one-rank gloo group in this process and a 1-D mesh over it, torn down afterwards."""
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()
