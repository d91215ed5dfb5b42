"""Bad input to the public API: one table per public function, checked in one place.

Every public function and every method that takes user input gets wrong types, wrong values
and mismatched structures; each must raise the stated error (a ``TypeError`` or
``ValueError`` that names the bad value and the accepted ones; a ``RuntimeError`` only for
a missing process group), never an ``AssertionError``, ``KeyError``, ``AttributeError`` or
an error from deep inside torch. A public function without a table fails
``test_every_public_callable_has_a_table`` (polprec.optim's optimizers and states keep theirs
in ``tests/test_optim_errors.py``, as ``TABLE_ELSEWHERE`` records).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
import tempfile
import warnings
from collections.abc import Callable
from fnmatch import fnmatch
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

import polprec as pp
from polprec import testing

F16, F32 = torch.float16, torch.float32
LIN = nn.Linear(3, 2)
PARAMS = {k: v.detach() for k, v in LIN.named_parameters()}
PARAMETERS = dict(LIN.named_parameters())  # Parameters that require grad
DLS = pp.DynamicLossScale()
ACCEPTED_DTYPES = "torch.float16, torch.bfloat16, torch.float32, torch.float64"
POLICY_FIELD = r"Policy\((param|compute|output)_dtype="
TE_HINT = " (float8 / Transformer Engine precisions are not supported by polprec); accepted:"
GRADS_FINITE = (
    "grads_finite must be a 0-dim torch.bool tensor (as returned by unscale_and_check or "
    "all_finite) or a bool, got 'yes' of type str"
)
BAD_GROUPS = ["world", 0, [0, 1]]


@dataclasses.dataclass(frozen=True)
class Case:
    """One bad call, the error it must raise and what that error's message must say."""

    id: str
    call: Callable[[], Any]
    exc: type[Exception]
    fragments: tuple[str, ...]  # each is in the message
    match: str | None = None  # a regex found in the message (re.search)
    absent: tuple[str, ...] = ()  # none of these is in the message
    once: tuple[str, ...] = ()  # each is in the message exactly once


def case(
    id: str,
    call: Callable[[], Any],
    exc: type[Exception],
    *fragments: str,
    match: str | None = None,
    absent: tuple[str, ...] = (),
    once: tuple[str, ...] = (),
) -> Case:
    """A :class:`Case`; the message must contain every one of ``fragments``."""
    return Case(id, call, exc, fragments, match, absent, once)


def _step(**kw: Any) -> Callable[..., Any]:
    return pp.value_and_grad(lambda p, x: (p["weight"] @ x).sum(), **kw)


def _grad_scaler_dict(
    scale: Any, growth: Any, backoff: Any, interval: int, tracker: int = 0
) -> dict[str, Any]:
    """A GradScaler state dict written out by hand."""
    return {
        "scale": scale,
        "growth_factor": growth,
        "backoff_factor": backoff,
        "growth_interval": interval,
        "_growth_tracker": tracker,
    }


def _grad_scaler_state_dict(*, drop: str = "", **kwargs: Any) -> dict[str, Any]:
    """``torch.amp.GradScaler("cpu", **kwargs).state_dict()``, less the key ``drop``."""
    return _without(torch.amp.GradScaler("cpu", **kwargs).state_dict(), drop)


def _without(state_dict: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in state_dict.items() if k != key}


class _Fake(dist.ProcessGroup):
    """A ProcessGroup object that no initialised default group stands behind."""

    def __init__(self) -> None:
        super().__init__(0, 1)


def _uninitialised(call: Callable[[], Any]) -> Callable[[], Any]:
    """``call``, after checking that no default process group exists in this process."""

    def run() -> Any:
        if dist.is_initialized():
            pytest.fail("a default process group is initialised; this case needs none")
        return call()

    return run


def _group_match(group: Any) -> str:
    return rf"must be a torch.distributed.ProcessGroup.*got {group!r}".replace("[", r"\[")


def _one_rank(call: Callable[[], Any]) -> Callable[[], Any]:
    """``call`` inside a one-rank gloo default group (DDP and FSDP need one), torn down after."""

    def run() -> Any:
        with tempfile.TemporaryDirectory() as scratch:
            dist.init_process_group(
                "gloo", init_method=f"file://{scratch}/store", rank=0, world_size=1
            )
            try:
                return call()
            finally:
                dist.destroy_process_group()

    return run


def _wrapped(wrap: Callable[[nn.Module], nn.Module]) -> Callable[[], Any]:
    """``apply_with_policy`` on an MLP that ``wrap`` wrapped, in a one-rank group."""

    def call() -> Any:
        with warnings.catch_warnings():  # FSDP1 on one rank: "switching to use NO_SHARD"
            warnings.filterwarnings("ignore", "FSDP is switching", UserWarning)
            model = wrap(nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2)))
        params = {k: v.detach() for k, v in model.named_parameters()}
        return pp.apply_with_policy(model, params, torch.ones(1, 3), policy="bf16-mixed")

    return _one_rank(call)


def _fully_shard_all(model: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        fully_shard(layer, mp_policy=pp.to_fsdp_mixed_precision("bf16-mixed", root=False))
    return fully_shard(model, mp_policy=pp.to_fsdp_mixed_precision("bf16-mixed"))


def _fully_shard_layer(model: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    fully_shard(model[1])
    return model


def _fsdp1(model: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import FullyShardedDataParallel

    return FullyShardedDataParallel(model, device_id=torch.device("cpu"))


def _dcp_load_into(state: Any) -> Callable[[], Any]:
    """``torch.distributed.checkpoint.load`` handed ``state`` itself, in one process."""

    def run() -> Any:
        import torch.distributed.checkpoint as dcp

        with tempfile.TemporaryDirectory() as path, warnings.catch_warnings():
            # DCP without a process group says it assumes a single process.
            warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
            dcp.save({"state": state}, checkpoint_id=path)  # saving the object works
            dcp.load({"state": state}, checkpoint_id=path)

    return _uninitialised(run)


_WRAPPED_ROUTES = (
    "(a) DTensor params",
    "(b) torch's module route",
    "pp.unscale_and_check, pp.clip_by_global_norm",
    "step(..., donate=True)",
)
_DCP_PATTERN = (
    "drops the new state it returns (polprec states are immutable), so the object would keep "
    "its fresh values. Load into its state_dict() and rebuild the state from that: "
    "sd = {'opt_state': opt_state.state_dict()}; dcp.load(sd, checkpoint_id=path); "
    "opt_state = opt_state.load_state_dict(sd['opt_state']). (Saving the state object itself "
    "works: dcp.save stores its state_dict(), which that pattern loads.)",
)


def _unmatched_rule() -> Any:
    model = nn.Sequential(nn.Linear(2, 2))
    params = dict(model.named_parameters())
    rules = pp.PolicyRules(32, {"head.*": 16})
    return pp.apply_with_policy(model, params, torch.ones(1, 2), policy=rules)


def _batch_norm() -> tuple[nn.Module, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A fresh Linear + BatchNorm1d, its parameters and its buffers (detached)."""
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    params = {k: v.detach() for k, v in model.named_parameters()}
    return model, params, {k: v.detach().clone() for k, v in model.named_buffers()}


def _differentiated_buffers() -> Any:
    model, params, buffers = _batch_norm()
    grad = {k: v.requires_grad_() if v.is_floating_point() else v for k, v in buffers.items()}
    return pp.apply_with_policy(model, {**params, **grad}, torch.ones(2, 3), policy=32)


def _buffers_in_the_step_params() -> Any:
    model, params, buffers = _batch_norm()
    step = pp.value_and_grad(
        lambda t, x: pp.apply_with_policy(model, t, x, policy="bf16-mixed").float().sum()
    )
    return step({**params, **buffers}, torch.ones(2, 3), loss_scale=DLS)


def _own_buffers_in_another_dtype() -> Any:
    model, params, _ = _batch_norm()
    low = pp.cast_params(params, "bf16-true")
    return pp.apply_with_policy(model, low, torch.ones(2, 3), policy="bf16-true")


def _class_rules_without_module() -> Any:
    model = nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2))
    rules = pp.PolicyRules("bf16-true", {nn.LayerNorm: "32-true"})
    return rules.cast_params(dict(model.named_parameters()))


def _step_torch(
    make: Callable[..., Any] = lambda ps: torch.optim.AdamW(ps, fused=True),
    *,
    params: Callable[[dict[str, Any]], Any] = lambda named: named,
    grads: Callable[[dict[str, Any]], Any] = lambda named: {
        k: torch.zeros_like(v) for k, v in named.items()
    },
    finite: Any = True,
) -> Callable[[], Any]:
    """A call of ``pp.optim.step_torch`` on a fresh model and optimizer, with one part bad."""

    def call() -> Any:
        model = nn.Linear(3, 2)
        named = dict(model.named_parameters())
        optimizer = make(model.parameters())
        return pp.optim.step_torch(optimizer, params(named), grads(named), grads_finite=finite)

    return call


def _with_found_inf(ps: Any) -> torch.optim.Optimizer:
    optimizer = torch.optim.SGD(ps, fused=True)
    optimizer.found_inf = torch.zeros(())  # type: ignore[attr-defined]
    return optimizer


def _with_grad_scale(ps: Any) -> torch.optim.Optimizer:
    optimizer = torch.optim.SGD(ps, fused=True)
    optimizer.grad_scale = torch.ones(())  # type: ignore[attr-defined]
    return optimizer


# The tables below are laid out by hand, one case to a line or two.
# fmt: off


def _bad_flags(state: Callable[[], Any]) -> list[Case]:
    """What every loss-scale state's ``adjust`` rejects."""
    return [
        case("bool-vector", lambda: state().adjust(torch.tensor([True, False])), ValueError,
             "shape (2,)"),
        case("float-flag", lambda: state().adjust(torch.tensor(1.0)), ValueError, "torch.float32"),
        case("int-1", lambda: state().adjust(1), TypeError, "bool", "1"),
        case("str-yes", lambda: state().adjust("yes"), TypeError, "'yes'", GRADS_FINITE),
    ]


def _dynamic(id: str, kwargs: dict[str, Any], exc: type[Exception], *fragments: str) -> Case:
    """A case of ``DynamicLossScale(**kwargs)``."""
    return case(id, lambda: pp.DynamicLossScale(**kwargs), exc, *fragments)


BAD_INPUT: dict[str, list[Case]] = {
    # --- polprec.policy ------------------------------------------------------------------
    "Policy": [
        case("param-int32", lambda: pp.Policy(torch.int32, "f32", "f32"), ValueError, "torch.int32"),
        case("param-None", lambda: pp.Policy(None, "f32", "f32"), TypeError, "None"),  # type: ignore[arg-type]
        case("compute-f17", lambda: pp.Policy("f32", "f17", "f32"), ValueError, "'f17'"),
        case("output-complex64", lambda: pp.Policy("f32", "f32", torch.complex64), ValueError,
             "complex64"),
        *(
            case(id, lambda args=args: pp.Policy(*args), exc, "accepted", match=POLICY_FIELD)
            for id, args, exc in [
                ("param-int32-dtypes", (torch.int32, F32, F32), ValueError),
                ("compute-complex64", (F32, torch.complex64, F32), ValueError),
                ("output-int8", (F32, F32, "int8"), ValueError),
                ("output-16", (F32, F32, 16), TypeError),
                ("param-None-dtypes", (None, F32, F32), TypeError),
                ("compute-float8", (F32, torch.float8_e4m3fn, F32), ValueError),
            ]
        ),
    ],
    "Policy.with_param_dtype": [
        case("int-3", lambda: pp.get_policy(32).with_param_dtype(3), TypeError, "3"),  # type: ignore[arg-type]
    ],
    "Policy.with_compute_dtype": [
        case("int8", lambda: pp.get_policy(32).with_compute_dtype("int8"), ValueError, "'int8'"),
    ],
    "Policy.with_output_dtype": [
        case("bool", lambda: pp.get_policy(32).with_output_dtype(torch.bool), ValueError,
             "torch.bool"),
    ],
    "parse_dtype": [
        case("list", lambda: pp.parse_dtype([1]), TypeError,  # type: ignore[arg-type]
             "[1]", "of type list", ACCEPTED_DTYPES),
        case("int-1", lambda: pp.parse_dtype(1), TypeError, "accepted"),  # type: ignore[arg-type]
        case("None", lambda: pp.parse_dtype(None), TypeError, "accepted"),  # type: ignore[arg-type]
        case("int64", lambda: pp.parse_dtype(torch.int64), ValueError,
             "int64", "accepted", ACCEPTED_DTYPES),
        case("int32-name", lambda: pp.parse_dtype("int32"), ValueError, "accepted"),
        case("f8", lambda: pp.parse_dtype("f8"), ValueError, "accepted"),
        case("torch.int8", lambda: pp.parse_dtype("torch.int8"), ValueError,
             "unknown dtype name", "'torch.int8'", "accepted names are bf16, bfloat16,"),
    ],
    "get_policy": [
        case("float-16.0", lambda: pp.get_policy(16.0), TypeError, "16.0", "float"),  # type: ignore[arg-type]
        case("bool-False", lambda: pp.get_policy(False), TypeError, "False"),  # type: ignore[arg-type]
        case("bool-True", lambda: pp.get_policy(True), TypeError, "True"),  # type: ignore[arg-type]
        case("int-8", lambda: pp.get_policy(8), ValueError, "8", "accepted"),
        case("int-128", lambda: pp.get_policy(128), ValueError, "64, 32, 16"),
        case("dtype", lambda: pp.get_policy(torch.float16), TypeError, "torch.float16"),  # type: ignore[arg-type]
        case("list", lambda: pp.get_policy([16]), TypeError, "list"),  # type: ignore[arg-type]
        case("dict", lambda: pp.get_policy({"c": "f16"}), TypeError, "dict"),  # type: ignore[arg-type]
        case("transformer-engine", lambda: pp.get_policy("transformer-engine"), ValueError,
             "'transformer-engine'", "Transformer Engine",
             f"'transformer-engine'{TE_HINT} a Policy;"),
        case("transformer-engine-float16", lambda: pp.get_policy("transformer-engine-float16"),
             ValueError, "not supported"),
        case("fp8", lambda: pp.get_policy("fp8"), ValueError, "float8"),
        case("float8_e4m3fn", lambda: pp.get_policy("float8_e4m3fn"), ValueError, "float8"),
        case("str-8", lambda: pp.get_policy("8"), ValueError, "accepted"),
        case("quarter", lambda: pp.get_policy("quarter"), ValueError,  # no hint at all
             "'quarter'", "unknown precision 'quarter'; accepted: a Policy;"),
        *(
            case(f"did-you-mean-{spec}", lambda spec=spec: pp.get_policy(spec), ValueError,
                 f"unknown precision {spec!r} (did you mean {meant!r}?); accepted: a Policy;")
            for spec, meant in [
                ("17-mixed", "16-mixed"),
                ("bf16_mixed", "bf16-mixed"),
                ("fp16-mixed", "16-mixed"),
                ("float16-true", "16-true"),
                ("mixed-float16", "mixed_float16"),
            ]
        ),
        *(
            case(f"integer-{spec}", lambda spec=spec: pp.get_policy(spec), ValueError,
                 "integer dtypes are not supported", absent=("float8",))
            for spec in ["int8", "uint8", "int4"]
        ),
        case("empty", lambda: pp.get_policy(""), ValueError, "accepted"),
        case("bf32", lambda: pp.get_policy("bf32"), ValueError,  # lists the accepted forms
             "bf16-mixed", "'16-true'", "mixed_float16", "params|p", "bfloat16"),
        case("c=int8", lambda: pp.get_policy("c=int8"), ValueError, "'int8'"),
        case("q=f16", lambda: pp.get_policy("q=f16"), ValueError, "'q'"),
        case("x=f16", lambda: pp.get_policy("x=f16"), ValueError, "unknown key 'x'",
             match=r"unknown key 'x'; accepted keys are params\|p, compute\|c, output\|o$"),
        case("p=f16,p=f32", lambda: pp.get_policy("p=f16,p=f32"), ValueError, "given twice"),
        case("p=f16,", lambda: pp.get_policy("p=f16,"), ValueError, "key=value"),
        *(
            case(spec, lambda spec=spec: pp.get_policy(spec), ValueError,
                 "key=value", "params|p, compute|c, output|o", repr(spec))
            for spec in ["p=,c=f32", "=f32", "p=f32,=bf16", "c=bf16,o="]
        ),
        case("p==f32", lambda: pp.get_policy("p==f32"), ValueError, "unknown dtype name '=f32'"),
    ],
    "parse_spec": [
        case("None", lambda: pp.parse_spec(None), TypeError, "None", "accepted"),  # type: ignore[arg-type]
        case("float", lambda: pp.parse_spec(16.0), TypeError, "16.0"),  # type: ignore[arg-type]
        case("bf17", lambda: pp.parse_spec("bf17"), ValueError, "'bf17'", "did you mean"),
        case("int-8", lambda: pp.parse_spec(8), ValueError, "8", "64, 32, 16"),
    ],
    "half_dtype": [
        case("float-0.5", lambda: pp.half_dtype(0.5), TypeError, "0.5"),  # type: ignore[arg-type]
        case("float-1.5", lambda: pp.half_dtype(1.5), TypeError, "1.5", "of type float"),  # type: ignore[arg-type]
        case("tpu9", lambda: pp.half_dtype("tpu9"), ValueError, "'tpu9'"),
        case("gpu", lambda: pp.half_dtype("gpu"), ValueError, "'gpu'"),
    ],
    # --- polprec.tree --------------------------------------------------------------------
    "cast_tree": [
        case("int64", lambda: pp.cast_tree([torch.ones(1)], torch.int64), ValueError,
             "torch.int64"),
        case("flo", lambda: pp.cast_tree([torch.ones(1)], "flo"), ValueError, "'flo'"),
        case("module", lambda: pp.cast_tree(LIN, "bf16"), TypeError,
             match=r"^tree must be a tree of tensors, got the module Linear itself; pass its "
             r"tensors by name: \{k: v\.detach\(\) for k, v in model\.named_parameters\(\)\}$"),
        case("iterator", lambda: pp.cast_tree(iter([torch.ones(1)]), "bf16"), TypeError,
             match=r"^tree must be a tree of tensors, got a list_iterator \(an iterator, such as "
             r"model\.parameters\(\), is used up once and has no names\); pass "
             r"\{k: v\.detach\(\) for k, v in model\.named_parameters\(\)\}$"),
        *(
            case(id, lambda bad=bad: pp.cast_tree({"w": torch.ones(1)}, bad), exc, "accepted")
            for id, bad, exc in [
                ("int32", torch.int32, ValueError),
                ("int8-name", "int8", ValueError),
                ("int-3", 3, TypeError),
                ("None", None, TypeError),
                ("complex64", torch.complex64, ValueError),
            ]
        ),
    ],
    "cast_params": [
        case("fp8", lambda: pp.cast_params(PARAMS, "fp8"), ValueError, "'fp8'"),
        case("module", lambda: pp.cast_params(LIN, "bf16-true"), TypeError,
             "params must be a tree of tensors, got the module Linear itself",
             "model.named_parameters()"),
        case("parameters()", lambda: pp.cast_params(LIN.parameters(), "bf16-true"), TypeError,
             "got a generator", "model.parameters()", "named_parameters()"),
        case("str-module", lambda: pp.cast_params(PARAMS, 32, module="lin"), TypeError, "str"),  # type: ignore[arg-type]
    ],
    "select_tree": [
        case("float-pred", lambda: pp.select_tree(torch.tensor(1.0), [torch.ones(1)], [torch.ones(1)]),
             ValueError, "torch.float32"),
        case("int-pred",
             lambda: pp.select_tree(torch.tensor(1), {"a": torch.ones(1)}, {"a": torch.ones(1)}),
             ValueError, "torch.int64"),
        case("vector-pred",
             lambda: pp.select_tree(torch.tensor([True]), {"a": torch.ones(1)}, {"a": torch.ones(1)}),
             ValueError, "(1,)"),
        case("list-pred", lambda: pp.select_tree([True], [torch.ones(1)], [torch.ones(1)]),  # type: ignore[arg-type]
             TypeError, "[True]"),
        case("int-1-pred", lambda: pp.select_tree(1, {"a": torch.ones(1)}, {"a": torch.ones(1)}),  # type: ignore[arg-type]
             TypeError, "or a Python bool, got 1 of type int"),
        case("float-pred-list", lambda: pp.select_tree(0.5, [torch.ones(1)], [torch.ones(1)]),  # type: ignore[arg-type]
             TypeError, match=r"or a Python bool, got 0\.5 of type float$"),
        case("bool-pred-structure",
             lambda: pp.select_tree(True, {"a": torch.ones(1)}, [torch.ones(1)]),
             ValueError, "same structure"),
        case("dict-vs-list",
             lambda: pp.select_tree(torch.tensor(True), {"a": torch.ones(1)}, [torch.ones(1)]),
             ValueError, "same structure"),
        case("keys-differ",
             lambda: pp.select_tree(torch.tensor(True), {"a": torch.ones(1)}, {"b": torch.ones(1)}),
             ValueError, "same structure"),
        case("lengths-differ",
             lambda: pp.select_tree(torch.tensor(True), [torch.ones(1)], [torch.ones(1), torch.ones(1)]),
             ValueError, "same structure"),
        case("list-vs-tuple",
             lambda: pp.select_tree(torch.tensor(True), [torch.ones(1)], (torch.ones(1),)),
             ValueError, match=r"^select_tree needs on_true and on_false of the same structure"),
        case("float64-leaf",
             lambda: pp.select_tree(torch.tensor(True), [torch.ones(1)], [torch.ones(1).double()]),
             ValueError, "torch.float64"),
        case("float16-leaf",
             lambda: pp.select_tree(torch.tensor(True), {"a": torch.ones(1)}, {"a": torch.ones(1).half()}),
             ValueError, "leaf a has dtype"),
        case("tensor-vs-float",
             lambda: pp.select_tree(torch.tensor(True), {"a": torch.ones(1)}, {"a": 1.0}),
             ValueError, "tensor on one side"),
        case("nested-tensor-vs-float",
             lambda: pp.select_tree(torch.tensor(True), {"a": [torch.ones(1)]}, {"a": [1.0]}),
             ValueError, "leaf a[0] is a tensor on one side only (Tensor vs float)"),
        case("int-vs-tensor",
             lambda: pp.select_tree(torch.tensor(True), {"x": 1}, {"x": torch.ones(1)}),
             ValueError, "leaf x is a tensor on one side only (int vs Tensor)"),
        case("ints-differ", lambda: pp.select_tree(torch.tensor(True), {"a": 1}, {"a": 2}),
             ValueError, "non-tensor leaf a differs"),
    ],
    "stack_trees": [
        case("empty", lambda: pp.stack_trees([]), TypeError, "non-empty"),
        case("dict", lambda: pp.stack_trees({"a": torch.ones(1)}), TypeError, "dict"),  # type: ignore[arg-type]
        case("dict-of-int", lambda: pp.stack_trees({"a": 1}), TypeError, "dict"),  # type: ignore[arg-type]
        case("lengths-differ", lambda: pp.stack_trees([[torch.ones(1)], [torch.ones(1), torch.ones(1)]]),
             ValueError, "structure"),
        case("keys-differ", lambda: pp.stack_trees([{"a": torch.ones(1)}, {"b": torch.ones(1)}]),
             ValueError, "tree 1 differs"),
        case("settings-differ",
             lambda: pp.stack_trees([pp.DynamicLossScale(period=2), pp.DynamicLossScale(period=3)]),
             ValueError, "differs in structure"),
        case("floats-differ", lambda: pp.stack_trees([{"lr": 0.1}, {"lr": 0.2}]), ValueError,
             "leaf lr"),
        case("tensor-vs-float", lambda: pp.stack_trees([{"w": torch.ones(1)}, {"w": 1.0}]),
             ValueError, "leaf w", "['Tensor', 'float']"),
    ],
    # --- polprec.loss_scale --------------------------------------------------------------
    "NoOpLossScale.adjust": _bad_flags(pp.NoOpLossScale),
    "NoOpLossScale.from_state_dict": [
        case("static-dict", lambda: pp.NoOpLossScale.from_state_dict(pp.StaticLossScale(2).state_dict()),
             ValueError, "state_dict is of a StaticLossScale, not a NoOpLossScale"),
    ],
    "StaticLossScale": [
        case("int-0", lambda: pp.StaticLossScale(0), ValueError, "0"),
        case("float--1.0", lambda: pp.StaticLossScale(-1.0), ValueError,
             match=r"^loss_scale must be a finite number > 0, got -1\.0$"),
        case("nan", lambda: pp.StaticLossScale(math.nan), ValueError, "nan"),
        case("str-8", lambda: pp.StaticLossScale("8"), TypeError, "'8'"),  # type: ignore[arg-type]
        case("str-1", lambda: pp.StaticLossScale("1"), TypeError, "'1'"),  # type: ignore[arg-type]
        case("None", lambda: pp.StaticLossScale(None), TypeError, "None"),  # type: ignore[arg-type]
        case("vector", lambda: pp.StaticLossScale(torch.zeros(3)), ValueError, "(3,)"),
    ],
    "StaticLossScale.adjust": _bad_flags(lambda: pp.StaticLossScale(2)),
    "StaticLossScale.from_state_dict": [
        case("dynamic-dict", lambda: pp.StaticLossScale.from_state_dict(DLS.state_dict()),
             ValueError, "DynamicLossScale"),
        case("unknown-key",
             lambda: pp.StaticLossScale.from_state_dict(pp.StaticLossScale(4.0).state_dict() | {"bogus": 1}),
             ValueError, "unknown keys ['bogus']; expected keys ['loss_scale', 'type']"),
        case("list", lambda: pp.StaticLossScale.from_state_dict([]),  # type: ignore[arg-type]
             TypeError, "got list; pass the output of state_dict()"),
    ],
    "NoOpLossScale.load_state_dict": [
        case("dcp-load", _dcp_load_into(pp.NoOpLossScale()), TypeError,
             "torch.distributed.checkpoint.load was given a polprec NoOpLossScale itself",
             *_DCP_PATTERN),
        case("list", lambda: pp.NoOpLossScale().load_state_dict([]),  # type: ignore[arg-type]
             TypeError, "state_dict must be a mapping, got list"),
    ],
    "StaticLossScale.load_state_dict": [
        case("dcp-load", _dcp_load_into(pp.StaticLossScale(4.0)), TypeError,
             "was given a polprec StaticLossScale itself", *_DCP_PATTERN),
        case("dynamic-dict", lambda: pp.StaticLossScale(2).load_state_dict(DLS.state_dict()),
             ValueError, "state_dict is of a DynamicLossScale, not a StaticLossScale"),
    ],
    "DynamicLossScale.load_state_dict": [
        case("dcp-load", _dcp_load_into(pp.DynamicLossScale(8.0, 3)), TypeError,
             "was given a polprec DynamicLossScale itself", *_DCP_PATTERN),
        case("missing-key", lambda: DLS.load_state_dict(_without(DLS.state_dict(), "counter")),
             ValueError, "missing keys ['counter']"),
    ],
    "DynamicLossScale": [
        _dynamic("loss_scale--1.0", {"loss_scale": -1.0}, ValueError, "-1.0"),
        _dynamic("loss_scale--2.0", {"loss_scale": -2.0}, ValueError, "-2.0"),
        _dynamic("loss_scale-0.0", {"loss_scale": 0.0}, ValueError,
                 "loss_scale must be a finite number > 0", "0.0"),
        _dynamic("loss_scale-nan", {"loss_scale": math.nan}, ValueError, "nan"),
        _dynamic("loss_scale-inf", {"loss_scale": math.inf}, ValueError, "inf"),
        _dynamic("loss_scale-str", {"loss_scale": "big"}, TypeError, "'big'"),
        _dynamic("loss_scale-shape-3", {"loss_scale": torch.ones(3)}, ValueError, "(3,)"),
        _dynamic("loss_scale-shape-2", {"loss_scale": torch.ones(2)}, ValueError,
                 "loss_scale must be a 0-dim tensor", "(2,)"),
        _dynamic("loss_scale-bool", {"loss_scale": torch.tensor(True)}, TypeError,
                 "loss_scale must be a real number", "torch.bool"),
        _dynamic("loss_scale-below-min", {"loss_scale": 0.5}, ValueError,
                 "outside [min_loss_scale"),
        _dynamic("period-0", {"period": 0}, ValueError, "period must be an int >= 1", "0"),
        _dynamic("period-1.5", {"period": 1.5}, TypeError, "1.5"),
        _dynamic("period-2.5", {"period": 2.5}, TypeError, "2.5"),
        _dynamic("period-2.0", {"period": 2.0}, TypeError, "period must be an int >= 1", "2.0"),
        _dynamic("factor-1", {"factor": 1}, ValueError, "1"),
        _dynamic("factor-1.0", {"factor": 1.0}, ValueError, "factor must be > 1", "1.0"),
        _dynamic("factor-0.5", {"factor": 0.5}, ValueError, "0.5"),
        _dynamic("factor-str", {"factor": "2"}, TypeError, "factor must be", "'2'", "of type str"),
        _dynamic("factor-inf", {"factor": math.inf}, ValueError,
                 "factor must be a finite number > 0", "inf"),
        _dynamic("min_loss_scale--2", {"min_loss_scale": -2}, ValueError, "-2"),
        _dynamic("min_loss_scale--1.0", {"min_loss_scale": -1.0}, ValueError,
                 "min_loss_scale must be a finite number >= 0", "-1.0"),
        _dynamic("min_loss_scale-nan", {"min_loss_scale": math.nan}, ValueError,
                 "min_loss_scale must be", "nan"),
        _dynamic("max_loss_scale-0.0", {"max_loss_scale": 0.0}, ValueError,
                 "max_loss_scale must be", "> 0", "0.0"),
        _dynamic("max_loss_scale-str", {"max_loss_scale": "big"}, TypeError,
                 "max_loss_scale must be", "'big'"),
        _dynamic("max_loss_scale-0.5", {"max_loss_scale": 0.5}, ValueError,
                 "max_loss_scale (0.5) must be >= min_loss_scale"),
        _dynamic("max-below-min", {"loss_scale": 4.0, "min_loss_scale": 4, "max_loss_scale": 2},
                 ValueError, "2.0"),
        _dynamic("hysteresis-0", {"hysteresis": 0}, ValueError,
                 "hysteresis must be an int >= 1", "0"),
        _dynamic("counter--1", {"counter": -1}, ValueError, "counter must be >= 0", "-1"),
        _dynamic("counter-1.5", {"counter": 1.5}, TypeError,
                 "counter must be an int", "1.5", "of type float"),
        _dynamic("counter-tensor-0.5", {"counter": torch.tensor(0.5)}, TypeError, "torch.float32"),
        _dynamic("counter-tensor-1.0", {"counter": torch.tensor(1.0)}, TypeError,
                 "counter must be an integer tensor"),
        _dynamic("counter-tensor-1.5", {"counter": torch.tensor(1.5)}, TypeError, "integer tensor"),
        _dynamic("hysteresis_tracker--2", {"hysteresis_tracker": -2}, ValueError,
                 "hysteresis_tracker must be >= 0", "-2"),
        _dynamic("hysteresis_tracker-shape-3", {"hysteresis_tracker": torch.zeros(3, dtype=torch.int32)},
                 ValueError, "hysteresis_tracker must be a 0-dim tensor"),
        case("jmp-positional-settings", lambda: pp.DynamicLossScale(2.0**15, 0, 2000, 2.0),
             TypeError, "keyword-only (jmp's are positional)",
             "write DynamicLossScale(32768.0, 0, period=2000, factor=2.0)"),
        case("every-setting-positional", lambda: pp.DynamicLossScale(1.0, 0, 10, 2.0, 0.5, 1e6, 2),  # type: ignore[misc]
             TypeError,
             match=r"^DynamicLossScale takes only loss_scale and counter positionally; its "
             r"settings are keyword-only \(jmp's are positional\): write DynamicLossScale\(1\.0, "
             r"0, period=10, factor=2\.0, min_loss_scale=0\.5, max_loss_scale=1000000\.0, "
             r"hysteresis=2\)$"),
    ],
    "DynamicLossScale.adjust": [
        *_bad_flags(pp.DynamicLossScale),
        case("float-0.0", lambda: DLS.adjust(torch.tensor(0.0)), ValueError, "torch.float32"),
        case("bool-vector-1", lambda: DLS.adjust(torch.tensor([True])), ValueError, "(1,)"),
        case("bool-ones-2", lambda: pp.DynamicLossScale().adjust(torch.ones(2, dtype=torch.bool)),
             ValueError,
             "grads_finite must be a 0-dim torch.bool tensor, got dtype torch.bool with shape (2,)"),
    ],
    "DynamicLossScale.from_state_dict": [
        case("list", lambda: pp.DynamicLossScale.from_state_dict([]), TypeError, "list"),  # type: ignore[arg-type]
        case("list-of-ints", lambda: pp.DynamicLossScale.from_state_dict([1, 2]), TypeError,  # type: ignore[arg-type]
             "mapping"),
        case("static-dict",
             lambda: pp.DynamicLossScale.from_state_dict(pp.StaticLossScale(2).state_dict()),
             ValueError, "StaticLossScale, not a DynamicLossScale"),
        case("missing-keys", lambda: pp.DynamicLossScale.from_state_dict({"loss_scale": 1.0}),
             ValueError, "missing keys"),
        case("missing-period",
             lambda: pp.DynamicLossScale.from_state_dict(
                 _without(pp.DynamicLossScale().state_dict(), "period")),
             ValueError, "missing keys ['period']"),
    ],
    "DynamicLossScale.from_grad_scaler_state_dict": [
        case("empty", lambda: pp.DynamicLossScale.from_grad_scaler_state_dict({}), ValueError,
             "GradScaler state dict", "missing keys", "disabled GradScaler",
             once=(" (a disabled GradScaler saves an empty dict);",)),
        case("scale-only", lambda: pp.DynamicLossScale.from_grad_scaler_state_dict({"scale": 2.0}),
             ValueError, "missing keys", "'growth_factor'", absent=("disabled",)),
        case("no-scale",
             lambda: pp.DynamicLossScale.from_grad_scaler_state_dict(
                 _grad_scaler_state_dict(drop="scale")),
             ValueError, "GradScaler state dict", "['scale']", "missing keys ['scale']; expected",
             absent=("disabled",)),
        case("str", lambda: pp.DynamicLossScale.from_grad_scaler_state_dict("scale"),  # type: ignore[arg-type]
             TypeError, "GradScaler.state_dict(), got str"),
        case("growth_factor-str",
             lambda: pp.DynamicLossScale.from_grad_scaler_state_dict(_grad_scaler_dict(8.0, "2", 0.5, 2)),
             TypeError, "growth_factor must be a Python number, got '2' of type str"),
        case("backoff_factor--0.5",
             lambda: pp.DynamicLossScale.from_grad_scaler_state_dict(_grad_scaler_dict(8.0, 2.0, -0.5, 2)),
             ValueError, "backoff_factor must be a finite number > 0"),
        case("backoff_factor-0.9",
             lambda: pp.DynamicLossScale.from_grad_scaler_state_dict(_grad_scaler_dict(2.0, 2.0, 0.9, 1)),
             ValueError, "0.9"),
        case("backoff_factor-0.3",
             lambda: pp.DynamicLossScale.from_grad_scaler_state_dict(_grad_scaler_dict(1.0, 2.0, 0.3, 10)),
             ValueError, "not 1/growth_factor"),
        case("growth-4-backoff-0.5",
             lambda: pp.DynamicLossScale.from_grad_scaler_state_dict(
                 _grad_scaler_state_dict(growth_factor=4.0, backoff_factor=0.5)),
             ValueError, "backoff_factor", "backoff_factor 0.5 is not 1/growth_factor (0.25)",
             match=r"\(0\.25\); DynamicLossScale grows and backs off by the same factor$"),
    ],
    # --- polprec.scaling -----------------------------------------------------------------
    "scale_loss": [
        case("int-tensor-loss", lambda: pp.scale_loss(torch.tensor(1), DLS), TypeError,
             "tensor(1)", "floating-point tensor"),
        *(
            case(id, lambda bad=bad: pp.scale_loss(bad, pp.DynamicLossScale()), TypeError,
                 "floating-point tensor")
            for id, bad in [("float-loss", 1.0), ("str-loss", "loss"), ("None-loss", None)]
        ),
        case("int-loss", lambda: pp.scale_loss(3, pp.StaticLossScale(2)), TypeError, "of type int"),  # type: ignore[arg-type]
        case("float-state", lambda: pp.scale_loss(torch.tensor(1.0), 2.0), TypeError,  # type: ignore[arg-type]
             "2.0", "StaticLossScale"),
        case("float-state-1024", lambda: pp.scale_loss(torch.tensor(1.0), 1024.0), TypeError,  # type: ignore[arg-type]
             "1024.0 of type float", "use StaticLossScale(value)"),
        *(
            case(id, lambda bad=bad: pp.scale_loss(torch.tensor(1.0), bad), TypeError,
                 "StaticLossScale")
            for id, bad in [
                ("None-state", None),
                ("str-state", "dynamic"),
                ("tensor-state", torch.tensor(2.0)),
                ("GradScaler-state", torch.amp.GradScaler("cpu")),
            ]
        ),
    ],
    "unscale_and_check": [
        case("str-state", lambda: pp.unscale_and_check(PARAMS, "dynamic"), TypeError, "'dynamic'"),  # type: ignore[arg-type]
        *(
            case(id, lambda bad=bad: pp.unscale_and_check({"w": torch.ones(1)}, bad), TypeError,
                 "StaticLossScale")
            for id, bad in [
                ("float-state", 2.0),
                ("None-state", None),
                ("str-state-w", "dynamic"),
                ("tensor-state", torch.tensor(2.0)),
                ("GradScaler-state", torch.amp.GradScaler("cpu")),
            ]
        ),
        case("group-world", lambda: pp.unscale_and_check(PARAMS, DLS, process_group="world"),
             TypeError, "'world'"),
        case("group-world-static",
             lambda: pp.unscale_and_check({"w": torch.ones(2)}, pp.StaticLossScale(2), process_group="world"),
             TypeError, "process_group must be"),
        *(
            case(f"group-{group!r}-noop",
                 lambda group=group: pp.unscale_and_check(
                     {"w": torch.ones(2)}, pp.NoOpLossScale(), process_group=group),
                 TypeError, match=_group_match(group))
            for group in BAD_GROUPS
        ),
        case("group-uninitialised",
             _uninitialised(lambda: pp.unscale_and_check(
                 {"w": torch.ones(2)}, pp.StaticLossScale(2.0), process_group=_Fake())),
             RuntimeError, "init_process_group"),
    ],
    "default_loss_scale": [
        case("f8", lambda: pp.default_loss_scale("f8"), ValueError, "'f8'"),
    ],
    # --- polprec.apply and polprec.grad --------------------------------------------------
    "apply_with_policy": [
        case("str-model", lambda: pp.apply_with_policy("model", PARAMETERS, policy="bf16-mixed"),  # type: ignore[arg-type]
             TypeError, "nn.Module"),
        case("bound-method",
             lambda: pp.apply_with_policy(LIN.forward, PARAMS, torch.ones(1, 3), policy=32),  # type: ignore[arg-type]
             TypeError, "method"),
        case("str-params", lambda: pp.apply_with_policy(LIN, "params", torch.ones(1, 3), policy=32),  # type: ignore[arg-type]
             TypeError, "str"),
        case("list-params", lambda: pp.apply_with_policy(LIN, [1], policy="bf16-mixed"),  # type: ignore[arg-type]
             TypeError, "params_and_buffers must be a dict of tensors by name (or a tuple of "
             "dicts), got list"),
        case("tuple-with-a-list",
             lambda: pp.apply_with_policy(LIN, (PARAMS, [1]), torch.ones(1, 3), policy=32),  # type: ignore[arg-type]
             TypeError, "params_and_buffers as a tuple holds dicts of tensors by name, got a "
             "list in it"),
        case("tuple-kwargs",
             lambda: pp.apply_with_policy(LIN, PARAMS, torch.ones(1, 3), kwargs=(1,), policy=32),  # type: ignore[arg-type]
             TypeError, "tuple"),
        case("second-positional-input",
             lambda: pp.apply_with_policy(LIN, PARAMS, torch.ones(1, 3), torch.ones(1, 3), policy=32),  # type: ignore[arg-type]
             TypeError, "several positional inputs", "(x, y)"),
        case("int-kwargs",
             lambda: pp.apply_with_policy(LIN, PARAMS, torch.ones(1, 3), kwargs=1.5, policy=32),  # type: ignore[arg-type]
             TypeError, "kwargs must be a dict or None, got float"),
        case("list-kwargs",
             lambda: pp.apply_with_policy(LIN, PARAMETERS, torch.ones(1, 3), kwargs=[1], policy="bf16-mixed"),  # type: ignore[arg-type]
             TypeError, "kwargs"),
        case("policy-12", lambda: pp.apply_with_policy(LIN, PARAMS, torch.ones(1, 3), policy=12),
             ValueError, "12"),
        case("policy-fp8",
             lambda: pp.apply_with_policy(LIN, PARAMETERS, torch.ones(1, 3), policy="fp8"),
             ValueError, "accepted"),
        case("unmatched-rule", _unmatched_rule, ValueError,
             "['head.*'] match no module", "'0'"),  # and names the paths that exist
        case("positional-policy", lambda: pp.apply_with_policy(LIN, PARAMS, torch.ones(1, 3), "bf16-mixed"),  # type: ignore[arg-type]
             TypeError, "the policy is keyword-only",
             "apply_with_policy(module, params, args, policy='bf16-mixed')"),
        case("missing-policy", lambda: pp.apply_with_policy(LIN, PARAMS, torch.ones(1, 3)),
             TypeError, "apply_with_policy needs policy=..., by keyword: a Policy, PolicyRules "
             "or any spec get_policy accepts, e.g. apply_with_policy(module, params, args, "
             "policy='bf16-mixed')"),
        case("typo-in-name",
             lambda: pp.apply_with_policy(LIN, {"wieght": PARAMS["weight"]}, torch.ones(1, 3), policy=32),
             ValueError, "name no parameter or buffer of Linear: 'wieght' (did you mean 'weight'?)"
             "; functional_call would ignore them and use the module's own tensors. Use the "
             "names of module.named_parameters() and module.named_buffers()"),
        case("many-unknown-names",
             lambda: pp.apply_with_policy(
                 LIN, {k: PARAMS["weight"] for k in ("a", "b", "c", "d", "e", "f", "g")},
                 torch.ones(1, 3), policy=32),
             ValueError, "of Linear: 'a', 'b', 'c', 'd', 'e' and 2 more; functional_call"),
        case("five-unknown-names",
             lambda: pp.apply_with_policy(
                 LIN, {k: PARAMS["weight"] for k in ("a", "b", "c", "d", "e")},
                 torch.ones(1, 3), policy=32),
             ValueError, "of Linear: 'a', 'b', 'c', 'd', 'e'; functional_call"),
        case("six-unknown-names",
             lambda: pp.apply_with_policy(
                 LIN, {k: PARAMS["weight"] for k in ("a", "b", "c", "d", "e", "zzz")},
                 torch.ones(1, 3), policy=32),
             ValueError, "'d', 'e' and 1 more;"),
        case("unknown-name-rules",
             lambda: pp.apply_with_policy(LIN, {"head.bias": torch.zeros(2)}, torch.ones(1, 3),
                                          policy=pp.PolicyRules("bf16-mixed")),
             ValueError, "'head.bias'"),
        case("keep_dtype-str",
             lambda: pp.apply_with_policy(LIN, PARAMS, torch.ones(1, 3), policy=32, keep_dtype="labels"),  # type: ignore[arg-type]
             TypeError, "keep_dtype=('labels',)"),
        case("keep_dtype-float",
             lambda: pp.apply_with_policy(LIN, PARAMS, torch.ones(1, 3), policy=32, keep_dtype=[1.0]),  # type: ignore[list-item]
             TypeError, "1.0 of type float"),
        case("keep_dtype-negative",
             lambda: pp.apply_with_policy(LIN, PARAMS, torch.ones(1, 3), policy=32, keep_dtype=[-1]),
             ValueError, "start at 0"),
        case("tuple-of-dicts-twice",
             lambda: pp.apply_with_policy(LIN, (PARAMS, PARAMS), torch.ones(1, 3), policy=32),
             ValueError, "['bias', 'weight'] appear in more than one of its dicts; each parameter "
             "or buffer may be given once"),
        case("ddp-module", _wrapped(lambda m: nn.parallel.DistributedDataParallel(m)), TypeError,
             "got a DistributedDataParallel module: DDP averages gradients", *_WRAPPED_ROUTES),
        case("fsdp2-module", _wrapped(_fully_shard_all), TypeError,
             "got an FSDP2 module (fully_shard) (FSDPSequential)", "every gradient would be zero",
             *_WRAPPED_ROUTES),
        case("fsdp2-layer", _wrapped(_fully_shard_layer), TypeError,
             "got a Sequential whose submodule '1' is an FSDP2 module (fully_shard)",
             *_WRAPPED_ROUTES),
        case("fsdp1-module", _wrapped(_fsdp1), TypeError,
             "got a FullyShardedDataParallel (FSDP1) module: FSDP all-gathers", *_WRAPPED_ROUTES),
        case("buffers-require-grad", _differentiated_buffers, ValueError,
             "buffers of Sequential that require grad: '1.running_mean', '1.running_var'.",
             "pp.apply_with_policy(model, (params, buffers), x, policy=policy)",
             absent=("num_batches_tracked",)),
        case("own-buffers-in-another-dtype", _own_buffers_in_another_dtype, ValueError,
             "expected scalar type BFloat16 but found Float", "while computing in torch.bfloat16",
             "its own: '1.running_mean', '1.running_var', in torch.float32.",
             "pp.apply_with_policy(model, (params, buffers), x, policy=policy)",
             "pp.PolicyRules(policy, {'BatchNorm1d': '32-true'})"),
    ],
    "autocast": [
        case("policy-nope", lambda: pp.autocast("nope"), ValueError, "'nope'"),
        case("device", lambda: pp.autocast(32, device_type=torch.device("cpu")), TypeError,  # type: ignore[arg-type]
             "device"),
        case("device_type-0", lambda: pp.autocast("bf16-mixed", device_type=0), TypeError,  # type: ignore[arg-type]
             "device_type must be a str such as 'cpu' or 'cuda', got 0 of type int"),
    ],
    "full_precision": [
        case("None", lambda: pp.full_precision()(None), TypeError, "None"),  # type: ignore[arg-type]
        case("int-3", lambda: pp.full_precision()(3), TypeError, "callable"),  # type: ignore[arg-type]
    ],
    "value_and_grad": [
        case("int-fn", lambda: pp.value_and_grad(3), TypeError, "3"),  # type: ignore[arg-type]
        case("str-fn", lambda: pp.value_and_grad("f"), TypeError, "callable"),  # type: ignore[arg-type]
        case("has_aux-yes", lambda: pp.value_and_grad(len, has_aux="yes"), TypeError, "'yes'"),  # type: ignore[arg-type]
        case("has_aux-1", lambda: pp.value_and_grad(lambda q: q, has_aux=1), TypeError, "has_aux"),  # type: ignore[arg-type]
        case("group-0-len", lambda: pp.value_and_grad(len, process_group=0), TypeError,
             "process_group must be a torch.distributed.ProcessGroup", "got 0 of type int"),
        *(
            case(f"microbatches-{bad!r}", lambda bad=bad: pp.value_and_grad(len, microbatches=bad),
                 exc, f"microbatches must be an int >= 1, got {bad!r}")
            for bad, exc in [(0, ValueError), (2.0, TypeError), (True, TypeError)]
        ),
        *(
            case(f"group-{group!r}",
                 lambda group=group: pp.value_and_grad(lambda p: p.sum(), process_group=group),
                 TypeError, match=_group_match(group))
            for group in BAD_GROUPS
        ),
    ],
    "value_and_grad()": [  # the function value_and_grad returns
        case("loss_scale-None", lambda: _step()(PARAMS, torch.ones(3), loss_scale=None), TypeError,
             "None"),
        case("loss_scale-float",
             lambda: pp.value_and_grad(lambda q: q["weight"].sum())(PARAMETERS, loss_scale=1.0),
             TypeError, "DynamicLossScale"),
        case("vector-loss", lambda: pp.value_and_grad(lambda p: p["weight"])(PARAMS, loss_scale=DLS),
             TypeError, "shape (2, 3)"),
        case("vector-loss-noop",
             lambda: pp.value_and_grad(lambda q: q["weight"])(PARAMETERS, loss_scale=pp.NoOpLossScale()),
             TypeError, "scalar"),
        case("tuple-without-has_aux",
             lambda: pp.value_and_grad(lambda q: (q["weight"].sum(), 1))(
                 PARAMETERS, loss_scale=pp.NoOpLossScale()),
             TypeError, "has_aux=True"),
        case("has_aux-without-tuple",
             lambda: pp.value_and_grad(lambda q: q["weight"].sum(), has_aux=True)(
                 PARAMETERS, loss_scale=pp.NoOpLossScale()),
             TypeError, "(loss, aux)"),
        case("loss_scale-missing", lambda: _step()(PARAMS, torch.ones(3)), TypeError,
             "needs loss_scale=<state>", "loss_scale=pp.default_loss_scale(policy)"),
        case("loss_scale-positional", lambda: _step()(PARAMS, torch.ones(3), DLS), TypeError,
             "loss_scale was given as positional argument 2", "loss_scale=state"),
        case("integer-params", lambda: _step()({"n": torch.tensor(3)}, torch.ones(3), loss_scale=DLS),
             ValueError, "no floating-point tensor to differentiate (its leaves are torch.int64)"),
        case("module-params", lambda: _step()(LIN, torch.ones(3), loss_scale=DLS), TypeError,
             "got the module Linear itself"),
        case("indivisible-batch",
             lambda: _step(microbatches=2)(PARAMS, torch.ones(3), loss_scale=DLS), ValueError,
             "microbatches=2 cannot split positional argument 0",
             "leading dimension 3 is not divisible by 2"),
        case("module-called-directly",  # LIN's own Parameters, not the params passed
             lambda: pp.value_and_grad(lambda p, x: LIN(x).sum())(PARAMS, torch.ones(1, 3), loss_scale=DLS),
             ValueError, "the loss does not depend on any floating-point leaf of params",
             "calls the module itself (model(x))",
             "pp.apply_with_policy(model, params, x, policy=policy)", "such as the module's own nn.Parameters"),
        case("buffers-in-params", _buffers_in_the_step_params, ValueError,
             "require grad", "pp.value_and_grad differentiates every floating leaf of its first",
             "step(params, buffers, x, loss_scale=...)"),
        case("loss-of-the-batch-only",
             lambda: pp.value_and_grad(lambda p, x: x.sum())(PARAMS, torch.ones(3), loss_scale=DLS),
             ValueError, "every gradient would be zero", "pp.apply_with_policy(model, params, x",
             "frozen layers or an unused head, are fine", absent=("nn.Parameters",)),
    ],
    "clip_by_global_norm": [
        *(
            case(f"max_norm-{bad!r}", lambda bad=bad: pp.clip_by_global_norm(PARAMS, bad), exc,
                 fragment)
            for bad, exc, fragment in [
                (-1.0, ValueError, "max_norm must be a finite number >= 0, got -1.0"),
                (math.nan, ValueError, "got nan"),
                (math.inf, ValueError, "got inf"),
                ("1", TypeError, "got '1' of type str"),
                (True, TypeError, "got True of type bool"),
                (None, TypeError, "got None"),
            ]
        ),
        case("max_norm-vector", lambda: pp.clip_by_global_norm(PARAMS, torch.ones(2)), ValueError,
             "0-dim floating tensor", "shape (2,)"),
        case("max_norm-int-tensor", lambda: pp.clip_by_global_norm(PARAMS, torch.tensor(1)),
             ValueError, "dtype torch.int64"),
        case("norm_type-0.5", lambda: pp.clip_by_global_norm(PARAMS, 1.0, norm_type=0.5),
             ValueError, "norm_type must be a number >= 1 or math.inf, got 0.5"),
        case("norm_type-str", lambda: pp.clip_by_global_norm(PARAMS, 1.0, norm_type="2"),  # type: ignore[arg-type]
             TypeError, "got '2' of type str"),
    ],
    # --- polprec.rules -------------------------------------------------------------------
    "PolicyRules": [
        case("int-key", lambda: pp.PolicyRules(32, {3: 16}), TypeError, "3"),  # type: ignore[dict-item]
        case("function-key", lambda: pp.PolicyRules("bf16-mixed", {nn.functional.relu: 32}), TypeError,  # type: ignore[dict-item]
             "nn.Module subclass"),
        case("class-key", lambda: pp.PolicyRules("bf16-mixed", {int: 32}), TypeError,  # type: ignore[dict-item]
             "nn.Module subclass"),
        case("empty-pattern", lambda: pp.PolicyRules("bf16-mixed", {"": 32}), ValueError,
             "bad path pattern ''"),
        case("space-in-pattern", lambda: pp.PolicyRules(32, {"a b": 16}), ValueError, "'a b'"),
        case("space-in-glob", lambda: pp.PolicyRules("bf16-mixed", {"head .*": 32}), ValueError,
             "bad path pattern"),
        case("unbalanced", lambda: pp.PolicyRules("bf16-mixed", {"head[0": 32}), ValueError, "unbalanced"),
        case("policy-f9", lambda: pp.PolicyRules(32, {"head": "f9"}), ValueError, "'f9'"),
        case("policy-fp8", lambda: pp.PolicyRules("bf16-mixed", {"head": "fp8"}), ValueError,
             "rule 'head'"),
        case("key-twice", lambda: pp.PolicyRules("bf16-mixed", [("a", 32), ("a", 16)]), ValueError,
             "given twice"),
        case("triple", lambda: pp.PolicyRules("bf16-mixed", [("a", 32, 1)]), TypeError,  # type: ignore[list-item]
             "(key, policy) pairs"),
        case("default-nope", lambda: pp.PolicyRules("nope"), ValueError, "accepted"),
        case("on_unmatched-loud", lambda: pp.PolicyRules(32, on_unmatched="loud"), ValueError,  # type: ignore[arg-type]
             "'loud'"),
        case("on_unmatched-raise", lambda: pp.PolicyRules("bf16-mixed", on_unmatched="raise"),  # type: ignore[arg-type]
             ValueError, "on_unmatched"),
    ],
    "PolicyRules.resolve": [
        case("unmatched", lambda: pp.PolicyRules(32, {"head": 16}).resolve(LIN), ValueError,
             "'head'"),
        case("str-module", lambda: pp.PolicyRules("bf16-mixed").resolve("model"), TypeError,  # type: ignore[arg-type]
             "nn.Module"),
        case("conflict",
             lambda: pp.PolicyRules(32, {"0*": "bf16-true", "*0": "16-true"}).resolve(
                 nn.Sequential(nn.Linear(2, 2))),
             ValueError, "conflicting rules for module '0'"),
    ],
    "PolicyRules.policy_for": [
        case("no-submodule", lambda: pp.PolicyRules("bf16-mixed").policy_for(nn.Linear(1, 1), "x"),
             ValueError, "no submodule 'x'"),
    ],
    "PolicyRules.cast_params": [
        case("class-rule-without-module", _class_rules_without_module, ValueError, "module="),
        case("class-name-without-module",
             lambda: pp.PolicyRules("bf16-true", {"LayerNorm": 32}).cast_params(PARAMS),
             ValueError, "rule 'LayerNorm' matches no parameter path", "module="),
    ],
    "PolicyRules.keep_in_fp32": [
        case("str-module", lambda: pp.PolicyRules("16-true").keep_in_fp32("model"), TypeError,  # type: ignore[arg-type]
             "nn.Module"),
        case("policy-fp8", lambda: pp.PolicyRules("16-true").keep_in_fp32(LIN, "fp8"), ValueError,
             "accepted"),
    ],
    # --- polprec.distributed -------------------------------------------------------------
    "all_finite_across": [
        case("float-vector", lambda: pp.all_finite_across(torch.tensor([1.0])), ValueError,
             "torch.float32"),
        case("int-1", lambda: pp.all_finite_across(1), TypeError,  # type: ignore[arg-type]
             match="grads_finite must be a 0-dim torch.bool tensor.*got 1 of type int"),
        case("float-flag", lambda: pp.all_finite_across(torch.tensor(1.0)), ValueError,
             "dtype torch.float32"),
        case("bool-vector", lambda: pp.all_finite_across(torch.tensor([True, True])), ValueError,
             "shape (2,)"),
        *(
            case(f"group-{group!r}",
                 lambda group=group: pp.all_finite_across(torch.tensor(True), group=group),
                 TypeError, match=_group_match(group))
            for group in BAD_GROUPS
        ),
        case("uninitialised", _uninitialised(lambda: pp.all_finite_across(torch.tensor(True))),
             RuntimeError, "init_process_group"),
    ],
    "to_fsdp_mixed_precision": [
        case("fp8", lambda: pp.to_fsdp_mixed_precision("fp8"), ValueError, "'fp8'"),
        case("float8", lambda: pp.to_fsdp_mixed_precision("float8"), ValueError, "float8"),
        case("cast_forward_inputs-yes",
             lambda: pp.to_fsdp_mixed_precision("bf16-mixed", cast_forward_inputs="yes"),  # type: ignore[arg-type]
             TypeError, "cast_forward_inputs must be a bool, got 'yes'"),
        case("root-1", lambda: pp.to_fsdp_mixed_precision("bf16-mixed", root=1),  # type: ignore[arg-type]
             TypeError, "root must be a bool, got 1"),
        case("reduce_dtype-fp8", lambda: pp.to_fsdp_mixed_precision("bf16-true", reduce_dtype="fp8"),
             ValueError, "reduce_dtype: unknown dtype name 'fp8'; accepted names are", "bf16"),
        case("reduce_dtype-int32",
             lambda: pp.to_fsdp_mixed_precision("bf16-true", reduce_dtype=torch.int32),
             ValueError, "reduce_dtype: dtype torch.int32 is not supported", "torch.float32"),
        case("reduce_dtype-32", lambda: pp.to_fsdp_mixed_precision("bf16-true", reduce_dtype=32),  # type: ignore[arg-type]
             TypeError, "reduce_dtype: expected a torch.dtype or a dtype name, got 32 of type int"),
    ],
    # --- polprec.optim (the optimizers' own table is tests/test_optim_errors.py) ---------
    "optim.step_torch": [
        case("polprec-optimizer", _step_torch(lambda ps: pp.optim.adamw()), TypeError,
             "optimizer must be a torch.optim.Optimizer, got Adam; polprec's own optimizers take "
             "grads_finite= in their step"),
        *(
            case(f"not-fused-{id}", _step_torch(make), ValueError, fragment,
                 "cannot skip a step without a host sync: only a fused kernel reads the finite "
                 "flag on the device; any other torch optimizer skips by not calling step(), "
                 "which needs the flag on the host (what GradScaler.step does). Build it with "
                 "fused=True (torch.optim.SGD, Adam, AdamW and Adagrad take it), or use pp.optim")
            for id, make, fragment in [
                ("sgd", lambda ps: torch.optim.SGD(ps), "SGD(fused=None)"),
                ("adamw-foreach", lambda ps: torch.optim.AdamW(ps, foreach=True),
                 "AdamW(fused=None)"),
                ("adam-false", lambda ps: torch.optim.Adam(ps, fused=False), "Adam(fused=False)"),
                ("rmsprop", lambda ps: torch.optim.RMSprop(ps), "RMSprop(fused=None)"),
                ("one-group",
                 lambda ps: torch.optim.AdamW(
                     [{"params": [next(ps)]}, {"params": list(ps), "fused": False}], fused=True),
                 "AdamW(fused=[True, False] in its param groups)"),
            ]
        ),
        case("sgd-dampening-first-step",
             _step_torch(lambda ps: torch.optim.SGD(ps, momentum=0.9, dampening=0.5, fused=True)),
             ValueError, "SGD(fused=True, momentum=0.9, dampening=0.5) cannot skip its first "
             "step without a host sync: torch sets the momentum buffers to the gradient on the "
             "first step (decided on the host) and leaves them uninitialised when it is "
             "skipped, and with dampening no zero buffer gives the same step; take the first "
             "step with `if finite: optimizer.step()`, or use pp.optim.sgd"),
        case("found_inf-set", _step_torch(_with_found_inf), ValueError,
             "SGD already has a found_inf or grad_scale attribute (a GradScaler step in "
             "progress?); step_torch sets and removes them itself"),
        case("grad_scale-set", _step_torch(_with_grad_scale), ValueError,
             "SGD already has a found_inf or grad_scale attribute"),
        case("module-params", _step_torch(params=lambda named: nn.Linear(3, 2)), TypeError,
             "got the module Linear itself; pass dict(model.named_parameters())"),
        case("iterator-params", _step_torch(params=lambda named: iter(named.values())),
             TypeError, "params must be a tree of tensors, got a dict_valueiterator"),
        case("iterator-grads", _step_torch(grads=lambda named: iter(named.values())),
             TypeError, "grads must be a tree of tensors, got a dict_valueiterator"),
        case("detached-params",
             _step_torch(params=lambda named: {k: v.detach() for k, v in named.items()}),
             ValueError, "params has a tensor at weight that AdamW does not hold; pass the "
             "parameters it was built with, dict(model.named_parameters()), not detached copies"),
        case("missing-params",
             _step_torch(params=lambda named: {"weight": named["weight"]},
                         grads=lambda named: {"weight": None}),
             ValueError, "params names 1 of the 2 parameters AdamW holds; name them all "
             "(dict(model.named_parameters())) so that no stale .grad is stepped"),
        case("grads-structure", _step_torch(grads=lambda named: [None, None]), ValueError,
             "grads must have the structure of params"),
        case("grad-float64",
             _step_torch(grads=lambda named: {k: v.double() for k, v in named.items()}),
             ValueError, "the gradient of weight is torch.float64 on cpu but the parameter is "
             "torch.float32 on cpu; torch.optim needs each gradient in its parameter's dtype and "
             "device (value_and_grad returns them so)"),
        case("grad-int", _step_torch(grads=lambda named: {"weight": torch.zeros(2, 3).long(),
                                                          "bias": None}),
             TypeError, "the gradient of weight must be a floating tensor or None"),
        case("grad-shape", _step_torch(grads=lambda named: {"weight": torch.zeros(3, 2),
                                                            "bias": None}),
             ValueError, "the gradient of weight has shape (3, 2), its parameter (2, 3)"),
        case("grads_finite-str", _step_torch(finite="yes"), TypeError, GRADS_FINITE),
        case("grads_finite-float", _step_torch(finite=torch.tensor(1.0)), ValueError,
             "grads_finite must be a 0-dim torch.bool tensor, got dtype torch.float32"),
    ],
    # --- polprec.testing -----------------------------------------------------------------
    "testing.assert_trees_all_close": [
        case("dtype-and-policy",
             lambda: testing.assert_trees_all_close(1, 1, dtype="f32", policy=32),
             ValueError, "not both"),
    ],
    "testing.assert_trees_all_equal_dtypes": [
        case("int64", lambda: testing.assert_trees_all_equal_dtypes(torch.ones(1), torch.int64),
             ValueError, "torch.int64", ACCEPTED_DTYPES),
    ],
    "testing.assert_matches_full_precision": [
        case("policy-fp8",
             lambda: testing.assert_matches_full_precision(lambda p, *, policy: p, PARAMS, policy="fp8"),
             ValueError, "'fp8'"),
    ],
    "testing.default_tolerance": [
        case("int8", lambda: testing.default_tolerance("int8"), ValueError, "'int8'"),
    ],
}
# fmt: on


# Public callables that accept any value for every argument (fnmatch patterns), and why.
NO_TABLE = {
    "all_finite": "any object is a tree; leaves that are not floating tensors are skipped",
    "*LossScale.scale": "any tree; only floating tensor leaves are scaled",
    "*LossScale.unscale": "any tree; only floating tensor leaves are unscaled",
    "Policy.cast_to_*": "any tree; only floating tensor leaves are cast",
    "*LossScale.to": "torch.device parses the device (torch's error lists the device types)",
}
# Public callables whose table lives in another file (fnmatch patterns), and where.
TABLE_ELSEWHERE = {
    "optim.[A-Z]*": "tests/test_optim_errors.py: the optimizers' settings, init, step, states",
    "optim.adam*": "tests/test_optim_errors.py: OPTIONS",
    "optim.sgd*": "tests/test_optim_errors.py: OPTIONS and STEPS (sgd is the class SGD)",
    "optim.partition": "tests/test_optim_errors.py: GROUPS",
    "optim.warmup_*": "tests/test_optim_errors.py: GROUPS",
}


def _takes_input(fn: Any, *, bound: bool) -> bool:
    """Whether ``fn`` has parameters (past ``self`` unless ``bound``)."""
    params = list(inspect.signature(fn).parameters)
    return bool(params if bound else params[1:])


def _public_callables() -> set[str]:
    """Every public function, class and method that takes arguments, named as in BAD_INPUT."""
    names = {"value_and_grad()"}  # the step function value_and_grad returns
    for prefix, module in (("", pp), ("optim.", pp.optim), ("testing.", testing)):
        for name in module.__all__:
            obj = getattr(module, name)
            if inspect.isfunction(obj) and _takes_input(obj, bound=True):
                names.add(prefix + name)
            if not inspect.isclass(obj):
                continue  # LossScale (a type alias), __version__, testing.strategies
            call = vars(obj).get("__call__")
            if _takes_input(obj, bound=True) or (call and _takes_input(call, bound=False)):
                names.add(prefix + name)  # the constructor, or an instance called (full_precision)
            for attr, member in inspect.getmembers(obj):
                bound = inspect.ismethod(member)  # a classmethod; a plain function takes self
                if attr.startswith("_") or not (bound or inspect.isfunction(member)):
                    continue
                if not attr.isascii():
                    continue  # mutmut's copies of a method under mutation ("xǁClassǁname__...")
                if _takes_input(member, bound=bound):
                    names.add(f"{prefix}{name}.{attr}")
    return names


CASES = [(name, c) for name, cases in BAD_INPUT.items() for c in cases]


@pytest.mark.parametrize("bad", [pytest.param(c, id=f"{name}-{c.id}") for name, c in CASES])
def test_bad_input_is_rejected_clearly(bad: Case) -> None:
    with pytest.raises(Exception) as info:  # noqa: PT011 (the type is checked below, precisely)
        bad.call()
    err = info.value
    message = str(err)
    assert isinstance(err, bad.exc), f"{type(err).__name__}: {err}"
    assert not isinstance(err, AssertionError | KeyError | AttributeError)
    for fragment in bad.fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    if bad.match is not None:
        assert re.search(bad.match, message), f"{bad.match!r} does not match {message!r}"
    for fragment in bad.absent:
        assert fragment not in message, f"{fragment!r} in {message!r}"
    for fragment in bad.once:
        assert message.count(fragment) == 1, f"{fragment!r} not once in {message!r}"


def test_every_public_callable_has_a_table() -> None:
    public = _public_callables()
    exempt = {n for n in public if any(fnmatch(n, p) for p in NO_TABLE | TABLE_ELSEWHERE)}
    missing = sorted(public - exempt - set(BAD_INPUT))
    assert not missing, f"no bad-input cases for {missing}; add them to BAD_INPUT"
    assert sorted(set(BAD_INPUT) - public) == []  # every table names a public callable
    assert sorted(set(BAD_INPUT) & exempt) == []
    # no stale exemption
    assert all(any(fnmatch(n, p) for n in public) for p in NO_TABLE | TABLE_ELSEWHERE)
    assert all(BAD_INPUT.values())


def test_case_ids_are_unique() -> None:
    ids = [f"{name}-{c.id}" for name, c in CASES]
    assert len(ids) == len(set(ids))


def test_audit_is_large_enough() -> None:
    assert len(CASES) >= 40
