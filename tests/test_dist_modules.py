"""Modules wrapped by torch's engine, FSDP2 policies per layer, distributed checkpoints.

On real gloo processes (``helpers.spawn``): ``apply_with_policy`` refuses FSDP2 and DDP
modules (their hooks would ignore the tensors it is given: zero or un-averaged gradients);
``to_fsdp_mixed_precision(root=False)`` on a transformer's layers and the default one on
its root; a checkpoint of params, optimizer and loss-scale states through
``torch.distributed.checkpoint`` that resumes bit for bit on 2 ranks and in 1 process, and
a state handed to ``dcp.load`` itself refused. The single-process refusals are also in
test_audit.py's tables.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from helpers import assert_unchanged, classification_batches, seeded_mlp, snapshot, spawn
from torch import nn

import polprec as pp
from polprec import _tree
from polprec.testing import assert_trees_all_close

# --- models --------------------------------------------------------------------------------


class _TinyGPT(nn.Module):
    """Embedding -> two TransformerEncoderLayers -> LayerNorm -> Linear: a small transformer."""

    def __init__(self, vocab: int = 32, d: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(d, 2, 2 * d, dropout=0.0, batch_first=True) for _ in range(2)
        )
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        for layer in self.layers:
            h = layer(h)
        return self.head(self.norm(h))


def _tiny_gpt(dtype: torch.dtype) -> _TinyGPT:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return _TinyGPT().to(dtype)


# --- apply_with_policy refuses wrapped modules ---------------------------------------------


def _attempts(model: nn.Module) -> dict[str, str | None]:
    """Each way of running ``model`` through polprec: its TypeError message, or None."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    x = torch.randn(3, 8)

    def loss(p: Any, x: torch.Tensor) -> torch.Tensor:
        return pp.apply_with_policy(model, p, x, policy="bf16-mixed").float().sum()

    rules = pp.PolicyRules("bf16-mixed", {nn.GELU: "32-true"})
    calls: dict[str, Callable[[], Any]] = {
        "eager": lambda: pp.apply_with_policy(model, params, x, policy="bf16-mixed"),
        "rules": lambda: pp.apply_with_policy(model, params, x, policy=rules),
        "value_and_grad": lambda: pp.value_and_grad(loss)(params, x, loss_scale=pp.NoOpLossScale()),
        "grad": lambda: torch.func.grad(loss)(params, x),
        "vmap": lambda: torch.func.vmap(
            lambda xi: pp.apply_with_policy(model, params, xi, policy="bf16-mixed")
        )(x),
    }
    out: dict[str, str | None] = {}
    for name, call in calls.items():
        try:
            call()
        except TypeError as err:
            out[name] = str(err)
        else:
            out[name] = None
    return out


def _refusal_worker(rank: int, _: Any) -> dict[str, Any]:
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    mp = pp.to_fsdp_mixed_precision("bf16-mixed")
    inner = pp.to_fsdp_mixed_precision("bf16-mixed", root=False)
    out: dict[str, Any] = {"plain": _attempts(seeded_mlp(8, 16, 4))}

    sharded = seeded_mlp(8, 16, 4)
    for layer in (sharded[0], sharded[2]):
        fully_shard(layer, mp_policy=inner)
    out["fsdp_layers"] = _attempts(sharded)  # the root is not sharded itself
    fully_shard(sharded, mp_policy=mp)
    out["fsdp_root"] = _attempts(sharded)
    out["ddp"] = _attempts(DistributedDataParallel(seeded_mlp(8, 16, 4)))

    # Wrapped after a first call that was accepted: the kept verdict is not reused.
    late = seeded_mlp(8, 16, 4)
    out["late_fsdp_before"] = _attempts(late)["eager"]
    fully_shard(late[2], mp_policy=inner)
    out["late_fsdp"] = _attempts(late)["eager"]
    outer = nn.Sequential(seeded_mlp(8, 16, 4))
    out["late_ddp_before"] = _attempts(outer)["eager"]
    outer[0] = DistributedDataParallel(seeded_mlp(8, 16, 4))
    out["late_ddp"] = _attempts(outer)["eager"]
    return out


_ROUTES = (
    "(a) DTensor params",
    "distribute_tensor(p, mesh, [Replicate()]) for DDP, [Shard(0)] for FSDP",
    "(b) torch's module route",
    "pp.to_fsdp_mixed_precision(policy)",
    "pp.unscale_and_check",
    "pp.clip_by_global_norm",
    "step(..., donate=True)",
    ".grad tensors",
)


@pytest.mark.slow
def test_apply_with_policy_refuses_fsdp2_and_ddp_modules(tmp_path: Path) -> None:
    for r in spawn(_refusal_worker, tmp_path, None):
        assert r["plain"] == dict.fromkeys(r["plain"])  # an unwrapped module runs every way
        assert r["late_fsdp_before"] is None and r["late_ddp_before"] is None
        expected = {
            "fsdp_layers": "got a Sequential whose submodule '0' is an FSDP2 module (fully_shard)",
            "fsdp_root": "got an FSDP2 module (fully_shard) (FSDPSequential): FSDP all-gathers",
            "ddp": "got a DistributedDataParallel module: DDP averages gradients",
        }
        for case, start in expected.items():
            assert set(r[case]) == {"eager", "rules", "value_and_grad", "grad", "vmap"}
            for how, message in r[case].items():
                assert message is not None, (case, how)
                assert start in message, (case, how, message)
                for route in _ROUTES:
                    assert route in message, (case, how, route)
        assert "submodule '2' is an FSDP2 module" in r["late_fsdp"]
        assert "submodule '0' is a DistributedDataParallel module" in r["late_ddp"]


# --- to_fsdp_mixed_precision on a transformer's layers and root ----------------------------


def _recording_reduce_scatter(reduced: list[torch.dtype]) -> None:
    """Record the dtype of every gradient FSDP2 reduce-scatters (in this process)."""
    name = "reduce_scatter_single" if hasattr(dist, "reduce_scatter_single") else None
    name = name or "reduce_scatter_tensor"
    original = getattr(dist, name)

    def recording(*args: Any, **kwargs: Any) -> Any:
        reduced.append((kwargs["input"] if "input" in kwargs else args[1]).dtype)
        return original(*args, **kwargs)

    setattr(dist, name, recording)


def _record(seen: dict[str, str], name: str, pick: Callable[..., torch.Tensor]) -> Any:
    """A forward (pre-)hook that records the dtype of what ``pick`` takes from its arguments."""

    def hook(module: nn.Module, *args: Any) -> None:
        seen.setdefault(name, str(pick(*args).dtype))

    return hook


def _fsdp_layers_worker(rank: int, _: Any) -> dict[str, Any]:
    from torch.distributed.fsdp import fully_shard

    reduced: list[torch.dtype] = []
    _recording_reduce_scatter(reduced)
    tokens = torch.randint(0, 32, (2, 6), generator=torch.Generator().manual_seed(0))
    out: dict[str, Any] = {}
    for spec, reduce_dtype in [("bf16-mixed", None), ("bf16-true", None), ("bf16-true", "bf16")]:
        policy = pp.get_policy(spec)
        model = _tiny_gpt(policy.param_dtype)
        reference = _tiny_gpt(policy.compute_dtype)  # unsharded, all in the compute dtype
        seen: dict[str, str] = {}
        model.layers[1].register_forward_hook(_record(seen, "layer output", lambda i, o: o))
        model.norm.register_forward_pre_hook(_record(seen, "norm input", lambda i: i[0]))
        for layer in model.layers:
            fully_shard(
                layer,
                mp_policy=pp.to_fsdp_mixed_precision(policy, reduce_dtype=reduce_dtype, root=False),
            )
        fully_shard(model, mp_policy=pp.to_fsdp_mixed_precision(policy, reduce_dtype=reduce_dtype))
        reduced.clear()
        logits = model(tokens)
        nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten()).backward()
        ref_logits = reference(tokens)
        nn.functional.cross_entropy(ref_logits.float().flatten(0, 1), tokens.flatten()).backward()
        out[f"{spec} {reduce_dtype}"] = {
            "seen": seen,
            "output_dtype": str(logits.dtype),
            "reduced": sorted({str(d) for d in reduced}),
            "grad_dtypes": sorted({str(p.grad.dtype) for p in model.parameters()}),
            "grads": {n: p.grad.full_tensor().float() for n, p in model.named_parameters()},
            "reference_grads": {n: p.grad.float() for n, p in reference.named_parameters()},
        }
    return out


@pytest.mark.slow
def test_fsdp2_policy_per_layer_and_root_trains_a_transformer(tmp_path: Path) -> None:
    for r in spawn(_fsdp_layers_worker, tmp_path, None):
        for case, got in r.items():
            spec, reduce_dtype = case.split()
            param = str(pp.get_policy(spec).param_dtype)
            # Between the layers and into the root's LayerNorm: the compute dtype; out of the
            # root: the output dtype.
            assert got["seen"] == {"layer output": "torch.bfloat16", "norm input": "torch.bfloat16"}
            assert got["output_dtype"] == "torch.float32"
            assert got["grad_dtypes"] == [param]
            # float32 reduction by default, also for bfloat16 parameters; or as asked.
            assert got["reduced"] == (
                ["torch.float32"] if reduce_dtype == "None" else ["torch.bfloat16"]
            )
            scale = max(float(g.abs().max()) for g in got["reference_grads"].values())
            assert_trees_all_close(
                got["grads"], got["reference_grads"], rtol=0.05, atol=0.05 * scale
            )


# --- distributed checkpoints ---------------------------------------------------------------

_STEPS, _SAVE_AT, _OVERFLOWS = 6, 2, (1, 4)
_OPT = pp.optim.adamw(1e-2, master_weights=True, rounding="stochastic")
_SEED = 5


def _fresh_scale() -> pp.DynamicLossScale:
    return pp.DynamicLossScale(2.0**4, period=2)


def _training() -> tuple[Callable[..., Any], list[Any], Any]:
    """The step, the batches (non-finite at ``_OVERFLOWS``) and the initial bf16 params."""
    model = seeded_mlp(8, 16, 4).to(torch.bfloat16)

    def loss_fn(params: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = pp.apply_with_policy(model, params, x, policy="bf16-true")
        return nn.functional.cross_entropy(logits, y)

    step_grad = pp.value_and_grad(loss_fn)

    def step(state: dict[str, Any], batch: Any) -> dict[str, Any]:
        _, grads, finite, loss_scale = step_grad(state["params"], *batch, loss_scale=state["ls"])
        params, opt_state = _OPT.step(state["params"], grads, state["opt"], grads_finite=finite)
        return {"params": params, "opt": opt_state, "ls": loss_scale}

    batches = classification_batches(_STEPS, 8, 8, 4, _OVERFLOWS, bad=(0, 0))
    return step, batches, {k: v.detach() for k, v in model.named_parameters()}


def _run(step: Callable[..., Any], state: dict[str, Any], batches: list[Any]) -> dict[str, Any]:
    for batch in batches:
        state = step(state, batch)
    return state


def _template(params: Any) -> dict[str, Any]:
    """What a resuming job builds before it loads: fresh params and states."""
    zeros = {k: torch.zeros_like(v) for k, v in params.items()}
    return {"params": zeros, "opt": _OPT.init(zeros), "ls": _fresh_scale()}


def _save(state: dict[str, Any], path: str) -> None:
    dcp.save(
        {
            "params": state["params"],
            "opt": state["opt"].state_dict(),
            "ls": state["ls"].state_dict(),
        },
        checkpoint_id=path,
    )


def _load(path: str) -> dict[str, Any]:
    """The documented pattern: load into the templates' state dicts, then rebuild."""
    template = _template(_training()[2])
    sd = {
        "params": template["params"],
        "opt": template["opt"].state_dict(),
        "ls": template["ls"].state_dict(),
    }
    dcp.load(sd, checkpoint_id=path)
    return {
        "params": sd["params"],
        "opt": template["opt"].load_state_dict(sd["opt"]),
        "ls": template["ls"].load_state_dict(sd["ls"]),
    }


def _as_saved(state: dict[str, Any]) -> dict[str, Any]:
    return {
        "params": state["params"],
        "opt": state["opt"].state_dict(),
        "ls": state["ls"].state_dict(),
    }


def _checkpoint_worker(rank: int, root: str) -> dict[str, Any]:
    step, batches, params = _training()
    start = {"params": params, "opt": _OPT.init(params, seed=_SEED), "ls": _fresh_scale()}
    straight = _run(step, start, batches)
    at_save = _run(step, start, batches[:_SAVE_AT])
    _save(at_save, os.path.join(root, "dicts"))
    # The state objects themselves, as DCP's Stateful: saving works (DCP stores state_dict()).
    dcp.save(
        {"params": at_save["params"], "opt": at_save["opt"], "ls": at_save["ls"]},
        checkpoint_id=os.path.join(root, "objects"),
    )
    loaded = _load(os.path.join(root, "dicts"))
    resumed = _run(step, loaded, batches[_SAVE_AT:])
    refused: dict[str, str] = {}
    for key in ("opt", "ls"):
        fresh = _template(params)[key]
        before = snapshot(fresh)
        try:
            dcp.load({key: fresh}, checkpoint_id=os.path.join(root, "objects"))
        except TypeError as err:
            refused[key] = str(err)
        assert_unchanged(fresh, before)  # the fresh state as it was: nothing written into it
    return {
        "saved": _as_saved(at_save),
        "loaded": _as_saved(loaded),
        "from_objects": _as_saved(_load(os.path.join(root, "objects"))),
        "straight": _as_saved(straight),
        "resumed": _as_saved(resumed),
        "refused": refused,
    }


def _assert_bitwise_equal(actual: Any, expected: Any, what: str) -> None:
    a_leaves, a_spec = _tree.tree_flatten(actual)
    e_leaves, e_spec = _tree.tree_flatten(expected)
    assert a_spec == e_spec, what
    for a, e in zip(a_leaves, e_leaves, strict=True):
        if isinstance(e, torch.Tensor):
            assert isinstance(a, torch.Tensor) and a.dtype == e.dtype, what
            assert torch.equal(a, e), what
        else:
            assert a == e, what


@pytest.fixture
def one_rank_group(tmp_path: Path) -> Iterator[None]:
    """A one-rank gloo default group in this process (a job resumed on 1 rank)."""
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks ran: the same kernels, the same bits
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.usefixtures("one_rank_group")
def test_dcp_checkpoint_of_states_resumes_bit_for_bit_on_2_ranks_and_1(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    results = spawn(_checkpoint_worker, tmp_path, str(ckpt))
    saved = results[0]["saved"]
    opt, ls = saved["opt"], saved["ls"]
    # The checkpoint holds a state worth resuming: an update taken and one skipped, master
    # weights, the stochastic-rounding seed, a loss scale that has backed off.
    assert (int(opt["step"]), int(opt["skips"]), int(opt["consecutive_skips"])) == (1, 1, 1)
    assert int(opt["seed"]) == _SEED and opt["master"]["0.weight"].dtype == torch.float32
    assert (float(ls["loss_scale"]), int(ls["counter"])) == (8.0, 0)
    for rank, r in enumerate(results):
        _assert_bitwise_equal(r["saved"], saved, f"rank {rank}: replicas")
        _assert_bitwise_equal(r["loaded"], saved, f"rank {rank}: 2 ranks -> 2 ranks")
        _assert_bitwise_equal(r["from_objects"], saved, f"rank {rank}: objects saved")
        _assert_bitwise_equal(r["resumed"], r["straight"], f"rank {rank}: resumed run")
        assert int(r["straight"]["opt"]["skips"]) == 2  # the overflow after the resume
        for key, kind in [("opt", "AdamState"), ("ls", "DynamicLossScale")]:
            message = r["refused"][key]
            assert f"torch.distributed.checkpoint.load was given a polprec {kind} itself" in message
            assert "opt_state = opt_state.load_state_dict(sd['opt_state'])" in message
    # The 2-rank checkpoint, loaded and resumed by one process.
    step, batches, _ = _training()
    loaded = _load(str(ckpt / "dicts"))
    _assert_bitwise_equal(_as_saved(loaded), saved, "2 ranks -> 1 process")
    resumed = _run(step, loaded, batches[_SAVE_AT:])
    _assert_bitwise_equal(_as_saved(resumed), results[0]["straight"], "resumed in 1 process")
