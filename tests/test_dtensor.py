"""DTensor parameters: functional DDP, FSDP and HSDP by placement.

The multi-process tests run two gloo ranks (``helpers.spawn``); each rank feeds its own half
of one batch, and the references are single-process computations on the whole batch, made in
the test process. Two spawns carry all the checks, since starting ranks costs more than the
checks themselves. The single-process tests use a one-rank group and mesh.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from helpers import assert_unchanged, snapshot, spawn
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import (
    DTensor,
    Partial,
    Replicate,
    Shard,
    distribute_tensor,
)

import polprec as pp
from polprec import _dtensor
from polprec.testing import assert_trees_all_close

_WORLD = 2
_PER_RANK = 4

# Layouts on two ranks: name -> (mesh shape, placements of 2-D leaves, of 1-D leaves).
_LAYOUTS: dict[str, tuple[tuple[int, ...], list[Any], list[Any]]] = {
    "replicate": ((2,), [Replicate()], [Replicate()]),
    "shard0": ((2,), [Shard(0)], [Shard(0)]),
    "shard1": ((2,), [Shard(1)], [Shard(0)]),
    "hsdp_1x2": ((1, 2), [Replicate(), Shard(0)], [Replicate(), Shard(0)]),
    "hsdp_2x1": ((2, 1), [Replicate(), Shard(0)], [Replicate(), Shard(0)]),
}


# --- model, data and references -------------------------------------------------------------


def _mlp() -> nn.Module:
    """Odd sizes, so that every Shard splits unevenly (3 + 2 rows, 4 + 3 columns, ...)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 3))


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(_WORLD * _PER_RANK, 7, generator=g)
    return x, torch.randint(0, 3, (_WORLD * _PER_RANK,), generator=g)


def _mine(batch: tuple[torch.Tensor, torch.Tensor], rank: int) -> tuple[torch.Tensor, ...]:
    return tuple(t[rank * _PER_RANK : (rank + 1) * _PER_RANK] for t in batch)


def _loss_fn(model: nn.Module, policy: Any, **options: Any) -> Callable[..., torch.Tensor]:
    def loss_fn(params: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = pp.apply_with_policy(model, params, x, policy=policy, **options)
        return nn.functional.cross_entropy(logits, y)

    return loss_fn


def _params(policy: Any) -> dict[str, torch.Tensor]:
    named = dict(_mlp().named_parameters())
    return {k: v.detach() for k, v in pp.cast_params(named, policy).items()}


def _distributed(params: dict[str, torch.Tensor], layout: str) -> dict[str, Any]:
    shape, matrix, vector = _LAYOUTS[layout]
    mesh = init_device_mesh("cpu", shape)
    return {
        k: distribute_tensor(v, mesh, matrix if v.dim() == 2 else vector) for k, v in params.items()
    }


def _reference_grads(policy: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
    """One process, the whole batch: the gradient of the mean loss over every rank's rows."""
    grad = pp.value_and_grad(_loss_fn(_mlp(), policy), **kwargs)
    return grad(_params(policy), *_batch(), loss_scale=pp.NoOpLossScale())[1]


def _full(tree: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {k: v.full_tensor() for k, v in tree.items()}


def _locals(tree: dict[str, Any]) -> tuple[torch.Tensor, ...]:
    """What a rank holds of a tree of DTensors, for purity checks: values and versions."""
    return tuple(v.to_local() for v in tree.values())  # new aliases each call: no identity


def _layout_of(tree: dict[str, Any]) -> dict[str, Any]:
    return {k: (type(v).__name__, str(v.placements), str(v.dtype)) for k, v in tree.items()}


class _Collectives:
    """Records the dtype of every all-gather, reduce-scatter and all-reduce DTensor makes."""

    names = ("all_gather_single", "reduce_scatter_single", "all_reduce")

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []
        self._saved = {n: getattr(funcol, n) for n in self.names}

    def __enter__(self) -> _Collectives:
        for name, fn in self._saved.items():

            def record(t: torch.Tensor, *a: Any, _fn: Any = fn, _n: str = name, **k: Any) -> Any:
                self.seen.append((_n, str(t.dtype)))
                return _fn(t, *a, **k)

            setattr(funcol, name, record)
        return self

    def __exit__(self, *exc: Any) -> None:
        for name, fn in self._saved.items():
            setattr(funcol, name, fn)


class _WithUnused(nn.Module):
    """The MLP beside a layer the loss never reaches."""

    def __init__(self) -> None:
        super().__init__()
        self.used = _mlp()
        with torch.random.fork_rng():
            torch.manual_seed(1)
            self.unused = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.used(x)


# Bucket caps in bytes of float32 gradients: the default (the whole tree in one bucket),
# 100 (the first weight alone, the rest of the MLP, the unused layer), 0 (one by one).
_CAPS = {"default": _dtensor.BUCKET_BYTES, "100 bytes": 100, "none": 0}


# --- workers (module level: spawn pickles them by name) -------------------------------------


def _gradients_worker(rank: int, _: Any) -> dict[str, Any]:
    """Every layout and two policies; reduce dtypes; where each shard lies."""
    model, mine = _mlp(), _mine(_batch(), rank)
    out: dict[str, Any] = {}
    for policy in ["32-true", "bf16-mixed"]:
        step = pp.value_and_grad(_loss_fn(model, policy))
        for layout in _LAYOUTS:
            params = _distributed(_params(policy), layout)
            before = snapshot(_locals(params))
            _, grads, finite, scale = step(params, *mine, loss_scale=pp.DynamicLossScale(8.0))
            assert_unchanged(_locals(params), before)
            out[policy, layout] = {
                "grads": _full(grads),
                "layout": _layout_of(grads),
                "params_layout": _layout_of(params),
                "finite": finite,
                "scale": (type(scale.loss_scale).__name__, scale.loss_scale),
            }
    # Reduce dtypes: bf16 compute, float32 parameters; default (float32) against bfloat16.
    params = _distributed(_params("bf16-mixed"), "shard0")
    for name, reduce in [("reduce_default", None), ("reduce_bf16", torch.bfloat16)]:
        step = pp.value_and_grad(_loss_fn(model, "bf16-mixed", reduce_dtype=reduce))
        with _Collectives() as collectives:
            grads = step(params, *mine, loss_scale=pp.NoOpLossScale())[1]
        out[name] = {"grads": _full(grads), "collectives": collectives.seen}
    accumulate = pp.value_and_grad(_loss_fn(model, "32-true"), microbatches=2)
    out["microbatches"] = _full(
        accumulate(
            _distributed(_params("32-true"), "shard0"), *mine, loss_scale=pp.DynamicLossScale()
        )[1]
    )
    out["reduce_f64"] = _layout_of(
        pp.value_and_grad(_loss_fn(model, "64-true"))(
            _distributed(_params("64-true"), "shard1"), *mine, loss_scale=pp.NoOpLossScale()
        )[1]
    )
    # Buckets: the same bits as one parameter at a time, one collective each way per bucket.
    model_with_unused = _WithUnused()
    step = pp.value_and_grad(_loss_fn(model_with_unused, "bf16-mixed"))
    plain = {k: v.detach() for k, v in model_with_unused.named_parameters()}
    for layout in _LAYOUTS:
        params = _distributed(plain, layout)
        for cap_name, cap in _CAPS.items():
            _dtensor.BUCKET_BYTES = cap
            try:
                with _Collectives() as collectives:
                    grads = step(params, *mine, loss_scale=pp.NoOpLossScale())[1]
            finally:
                _dtensor.BUCKET_BYTES = _CAPS["default"]
            out["buckets", layout, cap_name] = {
                "grads": {k: None if g is None else g.full_tensor() for k, g in grads.items()},
                "collectives": [n for n, dtype in collectives.seen if dtype != "torch.int32"],
            }
    # Where each shard lies, against DTensor's own split of the indices.
    for layout, (shape, matrix, _) in _LAYOUTS.items():
        mesh = init_device_mesh("cpu", shape)
        x = distribute_tensor(torch.zeros(5, 7), mesh, matrix)
        expected = distribute_tensor(torch.arange(35).view(5, 7), mesh, matrix).to_local()
        out["indices", layout] = (_dtensor.global_indices(x), expected, _dtensor.shard_offset(x))
    mesh = init_device_mesh("cpu", (1, 2))
    x = distribute_tensor(torch.zeros(5, 7), mesh, [Shard(1), Shard(1)])
    expected = distribute_tensor(torch.arange(35).view(5, 7), mesh, [Shard(1), Shard(1)])
    out["indices", "shard1_twice"] = (_dtensor.global_indices(x), expected.to_local(), None)
    return out


def _skip_clip_compile_worker(rank: int, _: Any) -> dict[str, Any]:
    """A NaN on one rank, loss scales, flags, clipping and a compiled sharded step."""
    model, (x, y) = _mlp(), _mine(_batch(), rank)
    out: dict[str, Any] = {}
    params = _distributed(_params("16-mixed"), "hsdp_1x2")
    poisoned = x.clone()
    if rank == 1:
        poisoned[0, 0] = float("nan")
    step = pp.value_and_grad(_loss_fn(model, "16-mixed"))
    bounded = pp.DynamicLossScale(2.0**10, period=1, max_loss_scale=2.0**12)
    _, _, finite, scale = step(params, poisoned, y, loss_scale=bounded)
    _, _, finite_after, scale_after = step(params, x, y, loss_scale=scale)
    agreed = pp.value_and_grad(_loss_fn(model, "16-mixed"), process_group=dist.group.WORLD)
    out["nan"] = {
        "finite": (finite, finite_after, agreed(params, poisoned, y, loss_scale=bounded)[2]),
        "scales": (scale.loss_scale, scale_after.loss_scale, scale_after.counter),
        "types": [type(t).__name__ for t in (finite, scale.loss_scale, scale_after.loss_scale)],
    }
    # Flags and scaled gradients as DTensors; an inf in rank 1's shard of one gradient.
    grads = step(params, x, y, loss_scale=pp.NoOpLossScale())[1]
    bias = grads["2.bias"]
    local = torch.full_like(bias.to_local(), math.inf) if rank == 1 else bias.to_local()
    bad = dict(grads)
    bad["2.bias"] = DTensor.from_local(
        local, bias.device_mesh, bias.placements, shape=bias.shape, stride=bias.stride()
    )
    scaled = {k: g * 4.0 for k, g in grads.items()}
    unscaled, unscaled_finite = pp.unscale_and_check(scaled, pp.StaticLossScale(4.0))
    flag = torch.isfinite(bad["2.bias"]).all()  # a DTensor, Partial(product): rank 1's is False
    out["flags"] = {
        "unscaled": (_full(unscaled), _layout_of(unscaled), unscaled_finite),
        "bad_unscale": pp.unscale_and_check(bad, pp.StaticLossScale(4.0))[1],
        "all_finite": (pp.all_finite(bad), pp.all_finite(grads)),
        "across": (type(flag).__name__, pp.all_finite_across(flag)),
        "adjust": pp.DynamicLossScale(8.0).adjust(flag).loss_scale,
        "grads": _full(grads),
    }
    # Clipping: the global norm of DTensor gradients, as clip_grad_norm_ computes it.
    f32 = pp.value_and_grad(_loss_fn(model, "32-true"))
    sharded = f32(_distributed(_params("32-true"), "shard1"), x, y, loss_scale=pp.NoOpLossScale())[
        1
    ]
    clipped, norm = pp.clip_by_global_norm(sharded, 0.1)
    _, inf_norm = pp.clip_by_global_norm(sharded, 0.1, norm_type=math.inf)
    holders = [nn.Parameter(torch.zeros_like(g)) for g in sharded.values()]
    for holder, g in zip(holders, sharded.values(), strict=True):
        holder.grad = g.clone()
    torch_norm = torch.nn.utils.clip_grad_norm_(holders, 0.1)
    out["clip"] = {
        "norm": (type(norm).__name__, norm, inf_norm, torch_norm.full_tensor()),
        "clipped": _full(clipped),
        "layout": _layout_of(clipped),
    }
    # A compiled sharded step, fullgraph, with autograd traced.
    torch._dynamo.config.trace_autograd_ops = True

    def train_step(p: Any, x: torch.Tensor, y: torch.Tensor, ls: Any) -> Any:
        loss, grads, finite, ls = step(p, x, y, loss_scale=ls)
        grads, norm = pp.clip_by_global_norm(grads, 1.0)
        new = {k: v - 0.5 * grads[k] for k, v in p.items()}
        return loss, pp.select_tree(finite, new, p), finite, ls, norm

    compiled = torch.compile(train_step, fullgraph=True, backend="aot_eager")
    ls = pp.DynamicLossScale(2.0**10)
    out["compiled"] = {
        name: (loss, _full(new), finite, ls.loss_scale, norm)
        for name, (loss, new, finite, ls, norm) in [
            ("eager", train_step(params, x, y, ls)),
            ("compiled", compiled(params, x, y, ls)),
            ("compiled_nan", compiled(params, poisoned, y, ls)),
        ]
    }
    return out


# --- multi-process tests ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def gradients(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return spawn(_gradients_worker, tmp_path_factory.mktemp("gradients"), None)


@pytest.fixture(scope="module")
def skip_clip_compile(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return spawn(_skip_clip_compile_worker, tmp_path_factory.mktemp("skip"), None)


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(_LAYOUTS))
@pytest.mark.parametrize("policy", ["32-true", "bf16-mixed"])
def test_gradients_are_those_of_the_mean_loss_over_all_ranks_in_the_params_layout(
    gradients: list[dict[str, Any]], policy: str, layout: str
) -> None:
    reference = _reference_grads(policy)
    for r in gradients:
        got = r[policy, layout]
        if policy == "32-true":
            assert_trees_all_close(got["grads"], reference, rtol=1e-5, atol=1e-7)
        else:  # within bf16 rounding, and near float32's gradient
            assert_trees_all_close(got["grads"], reference, dtype=torch.bfloat16)
            assert_trees_all_close(got["grads"], _reference_grads("32-true"), rtol=0.05, atol=5e-3)
        assert got["layout"] == got["params_layout"]  # DTensors, the params' placements, dtype
        assert {kind for kind, _, _ in got["layout"].values()} == {"DTensor"}
        assert got["finite"].dtype == torch.bool and bool(got["finite"])
        assert got["scale"][0] == "Tensor" and float(got["scale"][1]) == 8.0
    for k, g in gradients[0][policy, layout]["grads"].items():
        assert torch.equal(g, gradients[1][policy, layout]["grads"][k]), k


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(_LAYOUTS))
def test_buckets_give_the_bits_of_one_parameter_at_a_time_with_fewer_collectives(
    gradients: list[dict[str, Any]], layout: str
) -> None:
    sharded = any(isinstance(p, Shard) for p in _LAYOUTS[layout][1]) and layout != "hsdp_2x1"
    for r in gradients:
        one_by_one = r["buckets", layout, "none"]["grads"]
        assert one_by_one["unused.weight"] is None or not one_by_one["unused.weight"].any()
        for cap in _CAPS:
            got = r["buckets", layout, cap]["grads"]
            assert set(got) == set(one_by_one)
            for k, g in one_by_one.items():
                assert (got[k] is None) == (g is None), (cap, k)
                assert g is None or (got[k].dtype == g.dtype and torch.equal(got[k], g)), (cap, k)
        counts = {
            cap: collections.Counter(r["buckets", layout, cap]["collectives"]) for cap in _CAPS
        }
        if sharded:  # gathered per bucket forward (the unused layer too), reduced backward
            assert counts["none"] == {"all_gather_single": 6, "reduce_scatter_single": 4}
            assert counts["100 bytes"] == {"all_gather_single": 3, "reduce_scatter_single": 2}
            assert counts["default"] == {"all_gather_single": 1, "reduce_scatter_single": 1}
        else:  # each rank holds the whole tensors: nothing to gather, one all-reduce per bucket
            assert counts["none"] == {"all_reduce": 4}
            assert counts["100 bytes"] == {"all_reduce": 2}
            assert counts["default"] == {"all_reduce": 1}


@pytest.mark.slow
def test_micro_batches_of_dtensor_params_average_over_chunks_and_ranks(
    gradients: list[dict[str, Any]],
) -> None:
    reference = _reference_grads("32-true")
    for r in gradients:
        assert_trees_all_close(r["microbatches"], reference, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_reduce_dtype_sets_the_dtype_gradients_are_averaged_in(
    gradients: list[dict[str, Any]],
) -> None:
    for r in gradients:
        default, bf16 = r["reduce_default"], r["reduce_bf16"]
        # Gathered in the compute dtype (16-bit bytes move), reduced in the reduce dtype.
        assert set(default["collectives"]) == {
            ("all_gather_single", "torch.bfloat16"),
            ("reduce_scatter_single", "torch.float32"),
            ("all_reduce", "torch.int32"),  # the finite flag
        }
        assert ("reduce_scatter_single", "torch.bfloat16") in bf16["collectives"]
        assert ("reduce_scatter_single", "torch.float32") not in bf16["collectives"]
        # bf16 compute gives bf16 gradients per rank; their float32 mean is rarely a bf16
        # number, the bfloat16 mean always is.
        for k, g in bf16["grads"].items():
            assert g.dtype == torch.float32 and torch.equal(g, g.bfloat16().float()), k
        assert any(not torch.equal(g, g.bfloat16().float()) for g in default["grads"].values())
        assert_trees_all_close(bf16["grads"], default["grads"], dtype=torch.bfloat16)
        assert {dtype for _, _, dtype in r["reduce_f64"].values()} == {"torch.float64"}


@pytest.mark.slow
@pytest.mark.parametrize("layout", [*_LAYOUTS, "shard1_twice"])
def test_global_indices_locate_each_local_element_in_the_full_tensor(
    gradients: list[dict[str, Any]], layout: str
) -> None:
    for r in gradients:
        indices, expected, where = r["indices", layout]
        assert indices.dtype == torch.int64 and torch.equal(indices, expected)
        if where is not None and indices.numel():
            (shape, offset) = where
            assert tuple(indices.shape) == shape
            assert int(indices.flatten()[0]) == offset[0] * 7 + offset[1]  # the shard's corner
    together = torch.cat([r["indices", layout][0].flatten() for r in gradients]).unique()
    assert torch.equal(together, torch.arange(35))  # every element, on some rank


@pytest.mark.slow
def test_a_nan_on_one_rank_skips_the_step_on_every_rank_with_plain_scales(
    skip_clip_compile: list[dict[str, Any]],
) -> None:
    for r in skip_clip_compile:
        nan = r["nan"]
        assert [bool(f) for f in nan["finite"]] == [False, True, False]
        assert nan["types"] == ["Tensor", "Tensor", "Tensor"]
        scale, scale_after, counter = nan["scales"]
        assert (float(scale), float(scale_after), int(counter)) == (2.0**9, 2.0**10, 0)
        flags = r["flags"]
        grads = flags["grads"]
        unscaled, layout, finite = flags["unscaled"]
        assert bool(finite) and {kind for kind, _, _ in layout.values()} == {"DTensor"}
        assert_trees_all_close(unscaled, grads, rtol=0, atol=0)
        assert not bool(flags["bad_unscale"])  # the inf on rank 1 counts on rank 0 too
        assert [bool(f) for f in flags["all_finite"]] == [False, True]
        assert flags["across"][0] == "DTensor" and not bool(flags["across"][1])
        assert float(flags["adjust"]) == 4.0  # backed off from 8 on both ranks


@pytest.mark.slow
def test_clip_by_global_norm_takes_the_norm_of_the_full_gradients(
    skip_clip_compile: list[dict[str, Any]],
) -> None:
    x, y = _batch()
    full = [
        pp.value_and_grad(_loss_fn(_mlp(), "32-true"))(
            _params("32-true"), *_mine((x, y), r), loss_scale=pp.NoOpLossScale()
        )[1]
        for r in range(_WORLD)
    ]
    mean = {k: (full[0][k] + full[1][k]) / 2 for k in full[0]}
    clipped, norm = pp.clip_by_global_norm(mean, 0.1)
    _, inf_norm = pp.clip_by_global_norm(mean, 0.1, norm_type=math.inf)
    assert float(norm) > 0.1  # it clips
    for r in skip_clip_compile:
        kind, got, got_inf, torch_norm = r["clip"]["norm"]
        assert kind == "Tensor" and got.shape == ()
        torch.testing.assert_close(got, norm, rtol=1e-5, atol=0)
        torch.testing.assert_close(got, torch_norm, rtol=1e-5, atol=0)
        torch.testing.assert_close(got_inf, inf_norm, rtol=1e-5, atol=0)
        assert_trees_all_close(r["clip"]["clipped"], clipped, rtol=1e-5, atol=1e-7)
        assert {(kind, pl) for kind, pl, _ in r["clip"]["layout"].values()} == {
            ("DTensor", "(Shard(dim=1),)"),
            ("DTensor", "(Shard(dim=0),)"),
        }
    assert torch.equal(
        skip_clip_compile[0]["clip"]["norm"][1], skip_clip_compile[1]["clip"]["norm"][1]
    )


@pytest.mark.slow
def test_a_compiled_fullgraph_sharded_step_equals_the_eager_one(
    skip_clip_compile: list[dict[str, Any]],
) -> None:
    for r in skip_clip_compile:
        eager, compiled, nan = (r["compiled"][k] for k in ("eager", "compiled", "compiled_nan"))
        assert_trees_all_close(compiled, eager, rtol=1e-5, atol=1e-6)
        assert bool(compiled[2]) and not bool(nan[2])
        assert float(nan[3]) == 2.0**9
        assert_trees_all_close(nan[1], _params("16-mixed"), rtol=0, atol=0)  # skipped


# --- one process: a one-rank group and mesh ---------------------------------------------------


# (the ``mesh`` fixture, a one-rank group and 1-D mesh, is in conftest.py)


@pytest.mark.parametrize("spec", ["32-true", "bf16-mixed", "16-mixed", "bf16-true", "64-true"])
@pytest.mark.parametrize("placement", [Replicate(), Shard(0)], ids=["replicate", "shard0"])
def test_one_rank_dtensor_params_give_the_plain_gradients(
    mesh: Any, spec: str, placement: Any
) -> None:
    model, (x, y) = _mlp(), _batch()
    plain = _params(spec)
    sharded = {k: distribute_tensor(v, mesh, [placement]) for k, v in plain.items()}
    before = snapshot(_locals(sharded))
    step = pp.value_and_grad(_loss_fn(model, spec))
    ls = pp.default_loss_scale(spec)
    loss, grads, finite, new_ls = step(sharded, x, y, loss_scale=ls)
    ref_loss, ref_grads, ref_finite, ref_ls = step(plain, x, y, loss_scale=ls)
    policy = pp.get_policy(spec)
    assert_trees_all_close(_full(grads), ref_grads, dtype=policy.compute_dtype)
    assert_trees_all_close(loss, ref_loss, dtype=policy.compute_dtype)
    assert all(
        g.placements == (placement,) and g.dtype == policy.param_dtype for g in grads.values()
    )
    assert type(finite) is torch.Tensor and bool(finite) and bool(ref_finite)
    assert_trees_all_close(new_ls, ref_ls, rtol=0, atol=0)
    assert_unchanged(_locals(sharded), before)


@pytest.mark.parametrize("placement", [Replicate(), Shard(0)], ids=["replicate", "shard0"])
@pytest.mark.parametrize("norm_type", [2.0, 1.0])
@pytest.mark.parametrize("meshes", [1, 2], ids=["one mesh", "two equal mesh objects"])
def test_full_dtensor_gradients_clip_bit_for_bit_as_plain_ones(
    mesh: Any, placement: Any, norm_type: float, meshes: int
) -> None:
    # Replicate() leaves, or any leaves on a one-rank mesh, hold their full gradients: the
    # global norm combines the leaves' norms as for plain tensors, to the last bit. Leaves on
    # equal meshes are one group, whichever mesh object each holds (DTensor's sharding cache
    # may return an op's result on another object equal to its input's mesh).
    other = init_device_mesh("cpu", (1,)) if meshes == 2 else mesh
    assert other == mesh
    gen = torch.Generator().manual_seed(3)
    scales = 10 ** (torch.rand(40, generator=gen) * 4 - 2)  # norms from 0.01 to 100 or so
    plain = {f"g{i}": torch.randn(7 + 5 * i, 3, generator=gen) * scales[i] for i in range(40)}
    placed = {
        k: distribute_tensor(v, other if i % 2 else mesh, [placement])
        for i, (k, v) in enumerate(plain.items())
    }
    clipped, norm = pp.clip_by_global_norm(placed, 1.0, norm_type=norm_type)
    ref_clipped, ref_norm = pp.clip_by_global_norm(plain, 1.0, norm_type=norm_type)
    assert float(norm) > 1.0 and torch.equal(norm, ref_norm), (float(norm), float(ref_norm))
    assert all(torch.equal(clipped[k].full_tensor(), ref_clipped[k]) for k in plain)


def test_policy_rules_gather_each_parameter_in_its_islands_compute_dtype(mesh: Any) -> None:
    model, (x, y) = _mlp(), _batch()
    rules = pp.PolicyRules("bf16-true", {"2": "32-true"})
    plain = rules.cast_params(_params("32-true"), module=model)
    sharded = {k: distribute_tensor(v, mesh, [Shard(0)]) for k, v in plain.items()}
    seen: list[tuple[torch.dtype, ...]] = []
    hook = model[2].register_forward_pre_hook(
        lambda m, args: seen.append((model[0].weight.dtype, m.weight.dtype))
    )
    try:
        step = pp.value_and_grad(_loss_fn(model, rules))
        grads = step(sharded, x, y, loss_scale=pp.NoOpLossScale())[1]
        ref = step(plain, x, y, loss_scale=pp.NoOpLossScale())[1]
    finally:
        hook.remove()
    assert seen == [(torch.bfloat16, torch.float32)] * 2
    assert_trees_all_close(_full(grads), ref, dtype=torch.bfloat16)
    assert {k: g.dtype for k, g in grads.items()} == {k: v.dtype for k, v in plain.items()}


class _Shift(nn.Module):
    """``x * weight + offset``, with ``offset`` a buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 2.0, 7))
        self.register_buffer("offset", torch.full((7,), 0.25))
        self.seen: list[tuple[torch.dtype, torch.dtype]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append((self.weight.dtype, self.offset.dtype))
        return x * self.weight + self.offset


def test_dtensor_buffers_are_gathered_in_their_own_dtype(mesh: Any) -> None:
    model, x = _Shift(), _batch()[0]
    weight = distribute_tensor(model.weight.detach(), mesh, [Shard(0)])
    offset = distribute_tensor(model.offset, mesh, [Shard(0)])
    out = pp.apply_with_policy(
        model, ({"weight": weight}, {"offset": offset}), x, policy="bf16-mixed"
    )
    assert model.seen == [(torch.bfloat16, torch.float32)]  # the parameter in compute dtype
    assert torch.equal(out, x * model.weight.detach().bfloat16() + model.offset)


def test_batch_norm_with_dtensor_params_runs_in_a_float32_island(mesh: Any) -> None:
    # Under a mixed policy a DTensor parameter reaches its module in the compute dtype (FSDP2's
    # param_dtype), and batch_norm cannot mix a bfloat16 weight with float32 running
    # statistics: an island keeps the normalisation in float32, as with FSDP2.
    model = nn.Sequential(nn.Linear(7, 5), nn.BatchNorm1d(5)).eval()
    rules = pp.PolicyRules("bf16-mixed", {nn.BatchNorm1d: "32-true"})
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())
    x = _batch()[0]
    want = pp.apply_with_policy(model, (params, buffers), x, policy=rules)
    got = pp.apply_with_policy(
        model,
        (
            {k: distribute_tensor(v, mesh, [Shard(0)]) for k, v in params.items()},
            {k: distribute_tensor(v, mesh, [Replicate()]) for k, v in buffers.items()},
        ),
        x,
        policy=rules,
    )
    assert got.dtype == want.dtype == torch.float32
    assert_trees_all_close(got, want, dtype=torch.bfloat16)


def test_dtensor_params_inside_vmap_or_grad_are_refused(mesh: Any) -> None:
    model, (x, y) = _mlp(), _batch()
    sharded = {k: distribute_tensor(v, mesh, [Shard(0)]) for k, v in _params("32-true").items()}
    loss_fn = _loss_fn(model, "32-true")
    step = pp.value_and_grad(loss_fn)
    match = "torch.func does not support DTensor"
    with pytest.raises(RuntimeError, match=match):
        torch.func.vmap(lambda xi, yi: loss_fn(sharded, xi[None], yi[None]))(x, y)
    with pytest.raises(RuntimeError, match=match):
        torch.func.grad(loss_fn)(sharded, x, y)
    with pytest.raises(RuntimeError, match=match):
        torch.func.vmap(lambda xi: step(sharded, xi, y, loss_scale=pp.NoOpLossScale())[0])(x[None])


def test_dtensor_params_beside_plain_ones_are_refused(mesh: Any) -> None:
    plain = _params("32-true")
    mixed = {
        k: distribute_tensor(v, mesh, [Shard(0)]) if k != "2.bias" else v for k, v in plain.items()
    }
    step = pp.value_and_grad(_loss_fn(_mlp(), "32-true"))
    with pytest.raises(ValueError, match=r"mixes 3 DTensor\(s\) with 1 plain tensor"):
        step(mixed, *_batch(), loss_scale=pp.NoOpLossScale())


def test_partial_params_and_bad_reduce_dtypes_are_refused(mesh: Any) -> None:
    model, x = _mlp(), _batch()[0]
    params = {k: distribute_tensor(v, mesh, [Replicate()]) for k, v in _params("32-true").items()}
    partial = dict(params, **{"0.weight": DTensor.from_local(torch.ones(5, 7), mesh, [Partial()])})
    with pytest.raises(ValueError, match=r"placements \(Partial\(sum\),\).*Replicate\(\) or Shard"):
        pp.apply_with_policy(model, partial, x, policy="32-true")
    with pytest.raises(TypeError, match="reduce_dtype must be None .* got 3 of type int"):
        pp.apply_with_policy(model, params, x, policy="32-true", reduce_dtype=3)
    with pytest.raises(ValueError, match="reduce_dtype: dtype torch.int32 is not supported"):
        pp.apply_with_policy(model, params, x, policy="32-true", reduce_dtype=torch.int32)
    with pytest.raises(ValueError, match="reduce_dtype: unknown dtype name 'int8'"):
        pp.apply_with_policy(model, params, x, policy="32-true", reduce_dtype="int8")
    with pytest.raises(ValueError, match="0-dim torch.bool tensor, got dtype torch.float32"):
        pp.all_finite_across(distribute_tensor(torch.ones(()), mesh, [Replicate()]))


@pytest.mark.parametrize("placement", [Replicate(), Shard(0)], ids=["replicate", "shard0"])
def test_one_rank_gradients_are_reduced_in_the_reduce_dtype(mesh: Any, placement: Any) -> None:
    # float32 compute: the gradients are float32 numbers until the reduction rounds them
    model, (x, y) = _mlp(), _batch()
    sharded = {k: distribute_tensor(v, mesh, [placement]) for k, v in _params("32-true").items()}
    default = pp.value_and_grad(_loss_fn(model, "32-true"))(
        sharded, x, y, loss_scale=pp.NoOpLossScale()
    )[1]
    bf16 = pp.value_and_grad(_loss_fn(model, "32-true", reduce_dtype="bf16"))(
        sharded, x, y, loss_scale=pp.NoOpLossScale()
    )[1]
    for k, g in _full(bf16).items():
        assert g.dtype == torch.float32 and torch.equal(g, g.bfloat16().float()), k
        assert torch.equal(g, _full(default)[k].bfloat16().float()), k
    assert any(not torch.equal(g, g.bfloat16().float()) for g in _full(default).values())


def test_reduce_dtype_leaves_plain_params_alone() -> None:
    model, (x, y) = _mlp(), _batch()
    plain = _params("32-true")
    got = pp.value_and_grad(_loss_fn(model, "bf16-mixed", reduce_dtype="bf16"))(
        plain, x, y, loss_scale=pp.NoOpLossScale()
    )
    want = pp.value_and_grad(_loss_fn(model, "bf16-mixed"))(
        plain, x, y, loss_scale=pp.NoOpLossScale()
    )
    assert_trees_all_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(), (4,), (2, 3), (2, 1, 3)])
def test_global_indices_of_a_plain_tensor_are_its_flat_positions(shape: tuple[int, ...]) -> None:
    x = torch.zeros(shape)
    got = _dtensor.global_indices(x)
    assert got.dtype == torch.int64 and torch.equal(got, torch.arange(x.numel()).view(shape))
    assert _dtensor.shard_offset(x) == (shape, (0,) * len(shape))
    assert _dtensor.local_shard(x) is x
    with pytest.raises(TypeError, match="shard_offset takes a tensor or DTensor, got list"):
        _dtensor.shard_offset([1.0])  # type: ignore[arg-type]


def test_global_indices_of_a_one_rank_dtensor_are_those_of_the_full_tensor(mesh: Any) -> None:
    for placement in [Replicate(), Shard(0), Shard(1)]:
        x = distribute_tensor(torch.zeros(3, 4), mesh, [placement])
        assert torch.equal(_dtensor.global_indices(x), torch.arange(12).view(3, 4))
        local = _dtensor.local_shard(x)  # the local tensor itself: writes land in x
        assert type(local) is torch.Tensor and local.data_ptr() == x.to_local().data_ptr()
        assert _dtensor.shard_offset(x) == ((3, 4), (0, 0))


@pytest.mark.parametrize("placement", [Replicate(), Shard(0)], ids=["replicate", "shard0"])
def test_unscale_and_check_and_all_finite_take_one_rank_dtensors(mesh: Any, placement: Any) -> None:
    plain = {"w": torch.full((4, 2), 8.0), "b": torch.full((3,), -4.0), "n": torch.tensor(2)}
    grads = {
        k: distribute_tensor(v, mesh, [placement]) if k != "n" else v for k, v in plain.items()
    }
    before = snapshot(_locals({k: grads[k] for k in ("w", "b")}))
    for state in (pp.StaticLossScale(4.0), pp.NoOpLossScale()):
        out, finite = pp.unscale_and_check(grads, state)
        ref, ref_finite = pp.unscale_and_check(plain, state)
        assert type(finite) is torch.Tensor and bool(finite) and bool(ref_finite)
        assert out["n"] is grads["n"]
        for k in ("w", "b"):
            assert type(out[k]) is DTensor and out[k].placements == (placement,)
            assert torch.equal(out[k].full_tensor(), ref[k])
    assert_unchanged(_locals({k: grads[k] for k in ("w", "b")}), before)
    flag = pp.all_finite(grads)
    assert type(flag) is torch.Tensor and bool(flag)
    bad = dict(
        grads, b=distribute_tensor(torch.tensor([1.0, float("inf"), 0.0]), mesh, [placement])
    )
    assert not bool(pp.all_finite(bad))
    _, finite = pp.unscale_and_check(bad, pp.StaticLossScale(4.0))
    assert type(finite) is torch.Tensor and not bool(finite)


def test_a_dtensor_flag_is_taken_as_its_global_value(mesh: Any) -> None:
    params = {"w": torch.ones(3)}
    opt = pp.optim.sgd(0.5)
    flag = distribute_tensor(torch.tensor(False), mesh, [Replicate()])
    new, state = opt.step(params, {"w": torch.ones(3)}, opt.init(params), grads_finite=flag)
    assert torch.equal(new["w"], params["w"]) and int(state.skips) == 1
    assert type(state.skips) is torch.Tensor
    with pytest.raises(ValueError, match="grads_finite must be a 0-dim torch.bool tensor"):
        opt.step(params, {"w": torch.ones(3)}, opt.init(params), grads_finite=flag.float())


def test_dtensor_params_read_the_modules_names_once(
    mesh: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from polprec import _context

    model, (x, _) = _mlp(), _batch()
    sharded = {k: distribute_tensor(v, mesh, [Shard(0)]) for k, v in _params("32-true").items()}
    buffers = {"running": torch.zeros(1)}
    model.register_buffer("running", buffers["running"])
    reads: list[int] = []
    names = _context._names
    monkeypatch.setattr(_context, "_names", lambda m: (reads.append(1), names(m))[1])
    for _ in range(2):
        out = pp.apply_with_policy(model, (sharded, buffers), x, policy="bf16-mixed")
    assert len(reads) == 1 and out.shape == (x.shape[0], 3)
