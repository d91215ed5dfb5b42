"""What apply_with_policy does with the inputs: torch.amp's rule for mixed policies.

Mixed policies leave floating inputs as they are (autocast casts per op, so a float32 target
reaches a float32 loss whole); every other policy casts them to the compute dtype, except the
inputs named in ``keep_dtype``.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn
from torch.func import grad, vmap

import polprec as pp

F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32


class Regressor(nn.Module):
    """A model that computes its own loss from a float target, as transformers models do."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 16), nn.GELU(), nn.Linear(16, 1))
        self.seen: dict[str, torch.dtype] = {}

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> Any:
        self.seen.update(x=x.dtype, **({"labels": labels.dtype} if labels is not None else {}))
        pred = self.body(x).squeeze(-1) * 1e4  # outputs of the size of the targets
        if labels is None:
            return pred
        return pred, nn.functional.mse_loss(pred, labels)


@pytest.fixture
def model() -> Regressor:
    torch.manual_seed(0)
    return Regressor()


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(8, 4, generator=g), torch.tensor([7e4, -3e4, 1.5e4, 2e3] * 2)


@pytest.mark.parametrize("spec", ["bf16-mixed", "16-mixed"])
def test_mixed_policies_leave_float_targets_alone(model: Regressor, spec: str) -> None:
    x, labels = _batch()
    params = {k: v.detach() for k, v in model.named_parameters()}
    _, ref = pp.apply_with_policy(model, params, x, {"labels": labels}, policy="32-true")
    _, loss = pp.apply_with_policy(model, params, x, {"labels": labels}, policy=spec)
    assert model.seen == {"x": F32, "labels": F32}  # as under torch.autocast
    assert bool(torch.isfinite(loss))  # 7e4 is inf in float16: the target must stay float32
    assert loss.dtype == F32  # mse_loss is one of autocast's float32 ops
    assert abs(float(loss) - float(ref)) < 0.02 * float(ref)


def test_true_policies_cast_inputs_unless_kept(model: Regressor) -> None:
    x, labels = _batch()
    params = pp.cast_params(dict(model.named_parameters()), "16-true")
    _, loss = pp.apply_with_policy(model, params, x, {"labels": labels}, policy="16-true")
    assert model.seen == {"x": F16, "labels": F16}
    assert not bool(torch.isfinite(loss))  # the 7e4 target became inf: what keep_dtype is for
    _, kept = pp.apply_with_policy(
        model, params, x, {"labels": labels}, policy="16-true", keep_dtype=("labels",)
    )
    assert model.seen == {"x": F16, "labels": F32}
    assert bool(torch.isfinite(kept)) and kept.dtype == F32  # type promotion in mse_loss
    pp.apply_with_policy(model, params, (x, labels), policy="16-true", keep_dtype=[1])
    assert model.seen == {"x": F16, "labels": F32}  # positional inputs are kept by index
    pp.apply_with_policy(model, params, x, policy="16-true", keep_dtype=("labels", 3))
    assert model.seen["x"] == F16  # names and indices that are absent are fine


def test_the_rule_holds_for_precision_islands(model: Regressor) -> None:
    x, labels = _batch()
    mixed = pp.PolicyRules("bf16-mixed", {"body.2": "32-true"})
    params = pp.cast_params(dict(model.named_parameters()), mixed, module=model)
    _, loss = pp.apply_with_policy(model, params, x, {"labels": labels}, policy=mixed)
    assert model.seen == {"x": F32, "labels": F32} and bool(torch.isfinite(loss))
    true = pp.PolicyRules("16-true", {"body.2": "32-true"})
    params = pp.cast_params(dict(model.named_parameters()), true, module=model)
    _, loss = pp.apply_with_policy(
        model, params, x, {"labels": labels}, policy=true, keep_dtype={"labels"}
    )
    assert model.seen == {"x": F16, "labels": F32} and bool(torch.isfinite(loss))


def test_mixed_inputs_under_vmap_and_grad(model: Regressor) -> None:
    x, labels = _batch()
    params = dict(model.named_parameters())

    def loss(p: Any, xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        kwargs = {"labels": yi[None]}
        return pp.apply_with_policy(model, p, xi[None], kwargs, policy="bf16-mixed")[1]

    grads = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, labels)
    assert model.seen == {"x": F32, "labels": F32}
    assert all(bool(torch.isfinite(g).all()) for g in grads.values())


def test_integer_inputs_are_never_cast(model: Regressor) -> None:
    ids = torch.arange(3)
    emb = nn.Embedding(5, 4)
    for spec in ("bf16-mixed", "bf16-true", "64-true"):
        out = pp.apply_with_policy(emb, dict(emb.named_parameters()), ids, policy=spec)
        assert out.shape == (3, 4)
