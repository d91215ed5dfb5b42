"""Bad-input audit and purity audit of the public API.

Every public function gets wrong types, wrong values and mismatched structures; each must
raise a TypeError or ValueError whose message names the bad value (never an
AssertionError, KeyError, AttributeError or an error from deep inside torch). And every
public function is run once more to check that it never modifies its inputs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from helpers import assert_unchanged, snapshot
from torch import nn

import polprec as pp
from polprec import testing

LIN = nn.Linear(3, 2)
PARAMS = {k: v.detach() for k, v in LIN.named_parameters()}
DLS = pp.DynamicLossScale()


def _step(**kw: Any) -> Callable[..., Any]:
    return pp.value_and_grad(lambda p, x: (p["weight"] @ x).sum(), **kw)


# (id, call, exception type, fragment the message must contain)
CASES: list[tuple[str, Callable[[], Any], type[Exception], str]] = [
    # Policy / dtypes
    ("Policy int dtype", lambda: pp.Policy(torch.int32, "f32", "f32"), ValueError, "torch.int32"),
    ("Policy None", lambda: pp.Policy(None, "f32", "f32"), TypeError, "None"),  # type: ignore[arg-type]
    ("Policy bad name", lambda: pp.Policy("f32", "f17", "f32"), ValueError, "'f17'"),
    ("Policy complex", lambda: pp.Policy("f32", "f32", torch.complex64), ValueError, "complex64"),
    ("parse_dtype list", lambda: pp.parse_dtype([1]), TypeError, "[1]"),  # type: ignore[arg-type]
    (
        "with_compute_dtype",
        lambda: pp.get_policy(32).with_compute_dtype("int8"),
        ValueError,
        "'int8'",
    ),
    ("with_param_dtype", lambda: pp.get_policy(32).with_param_dtype(3), TypeError, "3"),  # type: ignore[arg-type]
    (
        "with_output_dtype",
        lambda: pp.get_policy(32).with_output_dtype(torch.bool),
        ValueError,
        "torch.bool",
    ),
    # get_policy
    ("get_policy float", lambda: pp.get_policy(16.0), TypeError, "16.0"),  # type: ignore[arg-type]
    ("get_policy bool", lambda: pp.get_policy(False), TypeError, "False"),  # type: ignore[arg-type]
    ("get_policy 8", lambda: pp.get_policy(8), ValueError, "8"),
    (
        "get_policy te",
        lambda: pp.get_policy("transformer-engine"),
        ValueError,
        "'transformer-engine'",
    ),
    ("get_policy grammar", lambda: pp.get_policy("q=f16"), ValueError, "'q'"),
    ("get_policy dict", lambda: pp.get_policy({"c": "f16"}), TypeError, "dict"),  # type: ignore[arg-type]
    ("half_dtype float", lambda: pp.half_dtype(0.5), TypeError, "0.5"),  # type: ignore[arg-type]
    ("half_dtype bad device", lambda: pp.half_dtype("tpu9"), ValueError, "'tpu9'"),
    # tree functions
    (
        "cast_tree int dtype",
        lambda: pp.cast_tree([torch.ones(1)], torch.int64),
        ValueError,
        "torch.int64",
    ),
    ("cast_tree bad name", lambda: pp.cast_tree([torch.ones(1)], "float"[:3]), ValueError, "'flo'"),
    ("cast_params bad spec", lambda: pp.cast_params(PARAMS, "fp8"), ValueError, "'fp8'"),
    ("cast_params bad module", lambda: pp.cast_params(PARAMS, 32, module="lin"), TypeError, "str"),  # type: ignore[arg-type]
    (
        "select_tree float pred",
        lambda: pp.select_tree(torch.tensor(1.0), [torch.ones(1)], [torch.ones(1)]),
        ValueError,
        "torch.float32",
    ),
    (
        "select_tree list pred",
        lambda: pp.select_tree([True], [torch.ones(1)], [torch.ones(1)]),
        TypeError,
        "[True]",
    ),  # type: ignore[arg-type]
    (
        "select_tree structure",
        lambda: pp.select_tree(torch.tensor(True), {"a": torch.ones(1)}, [torch.ones(1)]),
        ValueError,
        "same structure",
    ),
    (
        "select_tree dtypes",
        lambda: pp.select_tree(torch.tensor(True), [torch.ones(1)], [torch.ones(1).double()]),
        ValueError,
        "torch.float64",
    ),
    ("stack_trees dict", lambda: pp.stack_trees({"a": torch.ones(1)}), TypeError, "dict"),  # type: ignore[arg-type]
    (
        "stack_trees structure",
        lambda: pp.stack_trees([[torch.ones(1)], [torch.ones(1), torch.ones(1)]]),
        ValueError,
        "structure",
    ),
    # loss-scale states
    ("Static zero", lambda: pp.StaticLossScale(0), ValueError, "0"),
    ("Static str", lambda: pp.StaticLossScale("8"), TypeError, "'8'"),  # type: ignore[arg-type]
    ("Dynamic negative", lambda: pp.DynamicLossScale(-1.0), ValueError, "-1.0"),
    ("Dynamic nan", lambda: pp.DynamicLossScale(float("nan")), ValueError, "nan"),
    ("Dynamic period 0", lambda: pp.DynamicLossScale(period=0), ValueError, "0"),
    ("Dynamic period float", lambda: pp.DynamicLossScale(period=1.5), TypeError, "1.5"),  # type: ignore[arg-type]
    ("Dynamic factor 1", lambda: pp.DynamicLossScale(factor=1), ValueError, "1"),
    ("Dynamic min negative", lambda: pp.DynamicLossScale(min_loss_scale=-2), ValueError, "-2"),
    (
        "Dynamic max < min",
        lambda: pp.DynamicLossScale(4.0, min_loss_scale=4, max_loss_scale=2),
        ValueError,
        "2.0",
    ),
    ("Dynamic hysteresis 0", lambda: pp.DynamicLossScale(hysteresis=0), ValueError, "0"),
    ("Dynamic tensor shape", lambda: pp.DynamicLossScale(torch.ones(3)), ValueError, "(3,)"),
    (
        "Dynamic counter float",
        lambda: pp.DynamicLossScale(counter=torch.tensor(0.5)),
        TypeError,
        "torch.float32",
    ),
    ("adjust float flag", lambda: DLS.adjust(torch.tensor(0.0)), ValueError, "torch.float32"),
    ("adjust vector flag", lambda: DLS.adjust(torch.tensor([True])), ValueError, "(1,)"),
    ("adjust int", lambda: DLS.adjust(1), TypeError, "1"),  # type: ignore[arg-type]
    ("from_state_dict list", lambda: pp.DynamicLossScale.from_state_dict([]), TypeError, "list"),  # type: ignore[arg-type]
    (
        "from_state_dict keys",
        lambda: pp.DynamicLossScale.from_state_dict({"loss_scale": 1.0}),
        ValueError,
        "missing keys",
    ),
    (
        "from_state_dict type",
        lambda: pp.StaticLossScale.from_state_dict(DLS.state_dict()),
        ValueError,
        "DynamicLossScale",
    ),
    (
        "GradScaler sd empty",
        lambda: pp.DynamicLossScale.from_grad_scaler_state_dict({}),
        ValueError,
        "missing keys",
    ),
    (
        "GradScaler sd backoff",
        lambda: pp.DynamicLossScale.from_grad_scaler_state_dict(
            {
                "scale": 2.0,
                "growth_factor": 2.0,
                "backoff_factor": 0.9,
                "growth_interval": 1,
                "_growth_tracker": 0,
            }
        ),
        ValueError,
        "0.9",
    ),
    # loss-scale functions
    ("scale_loss int loss", lambda: pp.scale_loss(torch.tensor(1), DLS), TypeError, "tensor(1)"),
    ("scale_loss float state", lambda: pp.scale_loss(torch.tensor(1.0), 2.0), TypeError, "2.0"),  # type: ignore[arg-type]
    (
        "unscale_and_check state",
        lambda: pp.unscale_and_check(PARAMS, "dynamic"),
        TypeError,
        "'dynamic'",
    ),  # type: ignore[arg-type]
    (
        "unscale_and_check group",
        lambda: pp.unscale_and_check(PARAMS, DLS, process_group="world"),
        TypeError,
        "'world'",
    ),
    ("default_loss_scale spec", lambda: pp.default_loss_scale("f8"), ValueError, "'f8'"),
    # applying a policy
    (
        "apply module",
        lambda: pp.apply_with_policy(LIN.forward, PARAMS, torch.ones(1, 3), policy=32),
        TypeError,
        "method",
    ),  # type: ignore[arg-type]
    (
        "apply params",
        lambda: pp.apply_with_policy(LIN, "params", torch.ones(1, 3), policy=32),
        TypeError,
        "str",
    ),  # type: ignore[arg-type]
    (
        "apply kwargs",
        lambda: pp.apply_with_policy(LIN, PARAMS, torch.ones(1, 3), kwargs=(1,), policy=32),
        TypeError,
        "tuple",
    ),  # type: ignore[arg-type]
    (
        "apply policy",
        lambda: pp.apply_with_policy(LIN, PARAMS, torch.ones(1, 3), policy=12),
        ValueError,
        "12",
    ),
    ("autocast policy", lambda: pp.autocast("nope"), ValueError, "'nope'"),
    (
        "autocast device",
        lambda: pp.autocast(32, device_type=torch.device("cpu")),
        TypeError,
        "device",
    ),  # type: ignore[arg-type]
    ("full_precision non-callable", lambda: pp.full_precision()(None), TypeError, "None"),  # type: ignore[arg-type]
    ("value_and_grad fn", lambda: pp.value_and_grad(3), TypeError, "3"),  # type: ignore[arg-type]
    ("value_and_grad has_aux", lambda: pp.value_and_grad(len, has_aux="yes"), TypeError, "'yes'"),  # type: ignore[arg-type]
    ("value_and_grad group", lambda: pp.value_and_grad(len, process_group=0), TypeError, "0"),
    ("step loss_scale", lambda: _step()(PARAMS, torch.ones(3), loss_scale=None), TypeError, "None"),
    (
        "step vector loss",
        lambda: pp.value_and_grad(lambda p: p["weight"])(PARAMS, loss_scale=DLS),
        TypeError,
        "shape (2, 3)",
    ),
    # precision islands
    ("rules key", lambda: pp.PolicyRules(32, {3: 16}), TypeError, "3"),  # type: ignore[dict-item]
    ("rules pattern", lambda: pp.PolicyRules(32, {"a b": 16}), ValueError, "'a b'"),
    ("rules value", lambda: pp.PolicyRules(32, {"head": "f9"}), ValueError, "'f9'"),
    ("rules on_unmatched", lambda: pp.PolicyRules(32, on_unmatched="loud"), ValueError, "'loud'"),  # type: ignore[arg-type]
    (
        "rules unmatched",
        lambda: pp.PolicyRules(32, {"head": 16}).resolve(LIN),
        ValueError,
        "'head'",
    ),
    # distributed
    (
        "all_finite_across flag",
        lambda: pp.all_finite_across(torch.tensor([1.0])),
        ValueError,
        "torch.float32",
    ),
    (
        "all_finite_across uninit",
        lambda: pp.all_finite_across(torch.tensor(True)),
        RuntimeError,
        "init_process_group",
    ),
    ("to_fsdp bad spec", lambda: pp.to_fsdp_mixed_precision("fp8"), ValueError, "'fp8'"),
    # polprec.testing
    (
        "assert dtype+policy",
        lambda: testing.assert_trees_all_close(1, 1, dtype="f32", policy=32),
        ValueError,
        "not both",
    ),
    ("default_tolerance", lambda: testing.default_tolerance("int8"), ValueError, "'int8'"),
]


@pytest.mark.parametrize(
    ("call", "exc", "fragment"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_input_is_rejected_clearly(
    call: Callable[[], Any], exc: type[Exception], fragment: str
) -> None:
    with pytest.raises(Exception) as info:  # noqa: PT011 (the type is checked below, precisely)
        call()
    err = info.value
    assert type(err) is exc or isinstance(err, exc), f"{type(err).__name__}: {err}"
    assert not isinstance(err, AssertionError | KeyError | AttributeError)
    assert fragment in str(err), f"{fragment!r} not in {err}"


def test_audit_is_large_enough() -> None:
    assert len(CASES) >= 40


# --- purity ---------------------------------------------------------------------------------


def _inputs() -> dict[str, Any]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    params = {k: v.detach() for k, v in model.named_parameters()}
    return {
        "model": model,
        "params": params,
        "grads": {k: v * 64 for k, v in params.items()} | {"none": None, "step": torch.tensor(3)},
        "bad": {"w": torch.tensor([1.0, float("nan")])},
        "x": torch.randn(5, 3),
        "y": torch.randn(5, 2),
        "state": pp.DynamicLossScale(64.0, period=2),
        "flag": torch.tensor(False),
    }


def _calls(d: dict[str, Any]) -> list[tuple[str, Callable[[], Any], list[Any]]]:
    m, p, x, y = d["model"], d["params"], d["x"], d["y"]
    policy = pp.get_policy("bf16-mixed")
    rules = pp.PolicyRules("bf16-true", {nn.LayerNorm: "32-true"})

    def loss_fn(q: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return ((pp.apply_with_policy(m, q, x, policy=policy) - y) ** 2).mean()

    return [
        ("cast_tree", lambda: pp.cast_tree(d["grads"], "f16"), [d["grads"]]),
        ("cast_params", lambda: pp.cast_params(p, "bf16-true"), [p]),
        ("cast_params rules", lambda: pp.cast_params(p, rules, module=m), [p]),
        ("Policy casts", lambda: (policy.cast_to_compute(p), policy.cast_to_output(p)), [p]),
        ("all_finite", lambda: pp.all_finite(d["bad"]), [d["bad"]]),
        (
            "select_tree",
            lambda: pp.select_tree(d["flag"], p, d["grads"] and {k: v * 2 for k, v in p.items()}),
            [p, d["flag"]],
        ),
        ("stack_trees", lambda: pp.stack_trees([p, p]), [p]),
        ("scale", lambda: d["state"].scale(p), [p, d["state"]]),
        ("unscale", lambda: d["state"].unscale(p), [p, d["state"]]),
        ("adjust", lambda: d["state"].adjust(d["flag"]), [d["state"], d["flag"]]),
        ("scale_loss", lambda: pp.scale_loss(y.sum(), d["state"]), [y, d["state"]]),
        (
            "unscale_and_check",
            lambda: pp.unscale_and_check(d["grads"], d["state"]),
            [d["grads"], d["state"]],
        ),
        ("unscale_and_check nan", lambda: pp.unscale_and_check(d["bad"], d["state"]), [d["bad"]]),
        ("apply_with_policy", lambda: pp.apply_with_policy(m, p, x, policy=policy), [p, x]),
        (
            "apply_with_policy rules",
            lambda: pp.apply_with_policy(m, pp.cast_params(p, rules, module=m), x, policy=rules),
            [p, x],
        ),
        (
            "value_and_grad",
            lambda: pp.value_and_grad(loss_fn)(p, x, y, loss_scale=d["state"]),
            [p, x, y, d["state"]],
        ),
        ("state_dict", lambda: d["state"].state_dict(), [d["state"]]),
        ("full_precision", lambda: pp.full_precision()(lambda t: t.sum())(x), [x]),
        ("assert_trees_all_close", lambda: testing.assert_trees_all_close(p, p), [p]),
    ]


@pytest.mark.parametrize(
    "index", range(len(_calls(_inputs()))), ids=[c[0] for c in _calls(_inputs())]
)
def test_public_functions_do_not_modify_inputs(index: int) -> None:
    d = _inputs()
    _, call, watched = _calls(d)[index]
    snaps = [snapshot(t) for t in watched]
    call()
    for tree, snap in zip(watched, snaps, strict=True):
        assert_unchanged(tree, snap)
