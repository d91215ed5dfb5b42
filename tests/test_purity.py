"""Purity audit of the public API: no public function modifies its inputs.

Each call runs on fresh inputs; every watched tree must come out with the same leaf values,
no in-place write (tensor versions) and, for dicts and lists, the same keys and objects.
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
        "torch_grads": {k: torch.randn_like(v) for k, v in params.items()},
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
        (
            "value_and_grad microbatches",
            lambda: pp.value_and_grad(loss_fn, microbatches=5)(p, x, y, loss_scale=d["state"]),
            [p, x, y, d["state"]],
        ),
        ("clip_by_global_norm", lambda: pp.clip_by_global_norm(d["grads"], 0.1), [d["grads"]]),
        (  # it updates the torch optimizer and the module's parameters by design; not these
            "optim.step_torch",
            lambda: pp.optim.step_torch(
                torch.optim.AdamW(m.parameters(), fused=True),
                dict(m.named_parameters()),
                d["torch_grads"],
                grads_finite=torch.tensor(True),
            ),
            [d["torch_grads"]],
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


def test_polprec_makes_its_tensors_where_the_data_is(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under another default device and dtype (``torch.device("meta")``, float64), a step on
    float32 CPU tensors makes every tensor of its own (factors, flags, counters) beside the
    data, in the dtype its kernels need, and gives the numbers it gives under the defaults."""
    from polprec import _fused

    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    params = {k: v.detach() for k, v in model.named_parameters()}
    x = torch.randn(4, 3)
    scales = [pp.NoOpLossScale(), pp.DynamicLossScale(2.0**8), pp.StaticLossScale(4.0)]
    opt = pp.optim.adamw(1e-2)
    state = opt.init(params)
    torch_state = torch.optim.AdamW(model.parameters(), lr=1e-2).state_dict()

    def loss_fn(p: Any, x: torch.Tensor) -> torch.Tensor:
        return pp.apply_with_policy(model, p, x, policy="bf16-mixed").pow(2).mean()

    def run() -> list[Any]:
        out: list[Any] = []
        for loss_scale in scales:
            for k in (1, 2):
                step = pp.value_and_grad(loss_fn, microbatches=k)
                out.append(step(params, x, loss_scale=loss_scale))
            out.append(pp.unscale_and_check(out[-1][1], loss_scale))
        grads, finite = out[-1]
        out.append(pp.clip_by_global_norm(grads, 0.1))
        out.append(opt.step(params, grads, state))
        out.append(opt.step(params, grads, state, grads_finite=finite))
        out.append(opt.from_torch_state_dict(torch_state, params))
        return out

    want = run()
    monkeypatch.setattr(_fused, "_ONES", {})  # cached factors of 1 are made afresh too
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        with torch.device("meta"):
            got = run()
    finally:
        torch.set_default_dtype(default)
    tensors = [t for t in pp._tree.tree_leaves(got) if isinstance(t, torch.Tensor)]
    assert {t.device.type for t in tensors} == {"cpu"}
    assert {t.dtype for t in tensors if t.is_floating_point()} == {torch.float32}
    expected = [t for t in pp._tree.tree_leaves(want) if isinstance(t, torch.Tensor)]
    assert len(tensors) == len(expected)
    assert all(torch.equal(a, b) for a, b in zip(tensors, expected, strict=True))
