"""Adam and AdamW, with L2 or decoupled weight decay, AMSGrad and maximize (torch.optim's)."""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, ClassVar

import torch

from polprec import _fused
from polprec._checks import check_nonnegative
from polprec.optim._base import Optimizer, setting
from polprec.optim._precision import check_bool
from polprec.optim._states import AdamState, OptState
from polprec.optim._update import Buffers

__all__ = ["Adam", "adam", "adamw"]


def _check_betas(name: str, betas: Any) -> tuple[float, float]:
    if not isinstance(betas, tuple | list) or len(betas) != 2:
        raise TypeError(f"{name} must be a pair of numbers in [0, 1), got {betas!r}")
    out = []
    for i, beta in enumerate(betas):
        value = check_nonnegative(f"{name}[{i}]", beta)
        if value >= 1:
            raise ValueError(f"{name}[{i}] must be in [0, 1), got {beta!r}")
        out.append(value)
    return out[0], out[1]


@dataclasses.dataclass(frozen=True)
class Adam(Optimizer):
    """Adam with ``torch.optim.Adam``'s settings and update rule, pure.

    ``weight_decay`` is an L2 penalty added to the gradient, as in torch.optim.Adam
    (``decoupled_weight_decay=True`` is AdamW: :func:`adamw`). The settings it shares with
    every optimizer (``lr``, ``maximize`` and the precision options ``master_weights``,
    ``state_dtype``, ``rounding``, ``kahan``) are described on
    :class:`~polprec.optim.Optimizer`.

    Attributes:
        betas: decay rates of the first and second moments, each in [0, 1).
        eps: added to the denominator (>= 0).
        weight_decay: L2 penalty added to the gradient (>= 0).
        amsgrad: keep the running maximum of the second moments (AMSGrad).
        decoupled_weight_decay: decay the parameters directly instead (AdamW): each step
            multiplies them by ``1 - lr * weight_decay``.

    Examples:
        >>> import torch
        >>> import polprec as pp
        >>> opt = pp.optim.adam(1e-2, master_weights=True)
        >>> params = {"w": torch.ones(3, dtype=torch.bfloat16)}
        >>> state = opt.init(params)
        >>> new, state = opt.step(params, {"w": torch.ones(3, dtype=torch.bfloat16)}, state,
        ...                       grads_finite=torch.tensor(False))
        >>> torch.equal(new["w"], params["w"]), int(state.step), int(state.skips)
        (True, 0, 1)
    """

    betas: tuple[float, float] = setting((0.9, 0.999), check=_check_betas)
    eps: float = setting(1e-8, check=check_nonnegative)
    weight_decay: float = setting(0.0, check=check_nonnegative)
    amsgrad: bool = setting(False, check=check_bool)
    decoupled_weight_decay: bool = setting(False, check=check_bool)

    state_type: ClassVar[type[OptState]] = AdamState
    slot_fields: ClassVar[tuple[str, ...]] = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")

    def slots(self) -> tuple[str, ...]:
        return self.slot_fields if self.amsgrad else self.slot_fields[:2]

    def kernel(self, b: Buffers) -> None:
        _fused.adam_(
            b.params,
            b.grads,
            b.slots[0],
            b.slots[1],
            b.slots[2] if self.amsgrad else [],
            b.step.to(torch.float32),
            lr=b.lr,
            beta1=self.betas[0],
            beta2=self.betas[1],
            weight_decay=self.weight_decay,
            eps=self.eps,
            amsgrad=self.amsgrad,
            maximize=self.maximize,
            decoupled=self.decoupled_weight_decay,
            found_inf=b.found_inf,
        )

    def scalars(self, step: torch.Tensor, lr: float | torch.Tensor) -> Any:
        # torch computes these in Python floats (double); 0-dim float64 tensors here
        beta1, beta2 = self.betas
        t = step.to(torch.float64)
        neg_step_size = _once(-lr / (1 - beta1**t))
        bias_correction2_sqrt = _once(torch.sqrt(1 - beta2**t))
        decay = 1 - lr * self.weight_decay if self.decoupled_weight_decay else None
        return neg_step_size, bias_correction2_sqrt, decay

    def rule(
        self, param: torch.Tensor, grad: torch.Tensor, slots: list[torch.Tensor], scalars: Any
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        neg_step_size, bias_correction2_sqrt, decay = scalars
        beta1, beta2 = self.betas
        if self.maximize:
            grad = -grad
        if self.weight_decay != 0:
            if decay is not None:
                param = param * decay
            else:
                grad = grad.add(param, alpha=self.weight_decay)
        exp_avg = torch.lerp(slots[0], grad, 1 - beta1)
        exp_avg_sq = torch.addcmul(slots[1] * beta2, grad, grad, value=1 - beta2)
        new_slots = [exp_avg, exp_avg_sq]
        second = exp_avg_sq
        if self.amsgrad:
            second = torch.maximum(slots[2], exp_avg_sq)
            new_slots.append(second)
        denom = (second.sqrt() / bias_correction2_sqrt).add(self.eps)
        return torch.addcdiv(param, exp_avg * neg_step_size, denom), new_slots


def _once(x: torch.Tensor) -> torch.Tensor:
    """``x``, computed once per step under ``torch.compile`` rather than once per vector.

    Inductor inlines a 0-dim pointwise value into every loop that reads it, so the bias
    corrections (two float64 ``pow`` and a ``sqrt``) were recomputed for every 16 elements of
    every parameter, which made the compiled Adam update about twice as slow. A reduction is
    computed in a loop of its own; the larger of two copies of ``x`` is ``x``, bit for bit.
    """
    if not torch.compiler.is_compiling():
        return x
    return torch.stack([x, x]).amax(0)


#: torch.optim.Adam's settings and update rule as a pure optimizer (an alias of :class:`Adam`).
adam = Adam


def adamw(lr: float = 1e-3, **settings: Any) -> Adam:
    """AdamW with ``torch.optim.AdamW``'s settings and update rule, pure.

    :class:`Adam` with decoupled weight decay (each step multiplies the parameters by
    ``1 - lr * weight_decay``) and torch's AdamW default ``weight_decay=1e-2``; every other
    setting is :class:`Adam`'s, by keyword.

    Examples:
        >>> import torch
        >>> import polprec as pp
        >>> opt = pp.optim.adamw(1e-3)
        >>> params = {"w": torch.zeros(2)}
        >>> params, state = opt.step(params, {"w": torch.tensor([1.0, -1.0])}, opt.init(params))
        >>> params["w"]
        tensor([-0.0010,  0.0010])
    """
    if "decoupled_weight_decay" in settings:
        raise TypeError(
            "adamw() always decouples weight decay; for an L2 penalty use "
            "pp.optim.adam(..., weight_decay=...)"
        )
    return Adam(lr, **{"weight_decay": 1e-2, **settings}, decoupled_weight_decay=True)


# What inspect.signature(adamw) shows: Adam's settings, with AdamW's default weight decay.
adamw.__signature__ = inspect.signature(Adam).replace(  # type: ignore[attr-defined]
    parameters=[
        p.replace(default=1e-2) if p.name == "weight_decay" else p
        for p in inspect.signature(Adam).parameters.values()
        if p.name != "decoupled_weight_decay"
    ],
    return_annotation=Adam,
)
