"""SGD with momentum, dampening, Nesterov momentum, weight decay and maximize (torch.optim's)."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch

from polprec import _fused
from polprec._checks import check_nonnegative
from polprec.optim._base import Optimizer, setting
from polprec.optim._precision import check_bool
from polprec.optim._states import OptState, SGDState
from polprec.optim._update import Buffers

__all__ = ["SGD", "sgd"]


def _check_dampening(name: str, value: Any) -> float:
    dampening = check_nonnegative(name, value)
    if dampening > 1:
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    return dampening


@dataclasses.dataclass(frozen=True)
class SGD(Optimizer):
    """Stochastic gradient descent with ``torch.optim.SGD``'s settings and update rule, pure.

    The settings it shares with every optimizer (``lr``, ``maximize`` and the precision
    options) are described on :class:`~polprec.optim.Optimizer`.

    Attributes:
        momentum: momentum factor (>= 0).
        dampening: dampening of the momentum, in [0, 1].
        nesterov: Nesterov momentum (needs momentum > 0 and dampening 0).
        weight_decay: L2 penalty added to the gradient (>= 0).

    Examples:
        >>> import torch
        >>> import polprec as pp
        >>> opt = pp.optim.sgd(0.1, momentum=0.9)
        >>> params = {"w": torch.ones(2)}
        >>> state = opt.init(params)
        >>> params, state = opt.step(params, {"w": torch.ones(2)}, state)
        >>> params["w"], state.step
        (tensor([0.9000, 0.9000]), tensor(1, dtype=torch.int32))
    """

    momentum: float = setting(0.0, check=check_nonnegative)
    dampening: float = setting(0.0, check=_check_dampening)
    nesterov: bool = setting(False, check=check_bool)
    weight_decay: float = setting(0.0, check=check_nonnegative)

    state_type: ClassVar[type[OptState]] = SGDState
    slot_fields: ClassVar[tuple[str, ...]] = ("momentum_buffer",)

    def validate(self) -> None:
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise ValueError(
                "nesterov=True needs momentum > 0 and dampening == 0 (as torch.optim.SGD), got "
                f"momentum={self.momentum!r}, dampening={self.dampening!r}"
            )

    def slots(self) -> tuple[str, ...]:
        return self.slot_fields if self.momentum != 0 else ()

    def fusable(self) -> bool:
        # torch's kernel sets the buffer to the gradient on a first step it must be told
        # about (a host-side flag); without dampening, zero buffers make that unnecessary.
        return self.dampening == 0

    def kernel(self, b: Buffers) -> None:
        _fused.sgd_(
            b.params,
            b.grads,
            b.slots[0] if b.slots else [],
            lr=b.lr,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
            nesterov=self.nesterov,
            maximize=self.maximize,
            found_inf=b.found_inf,
        )

    def scalars(self, step: torch.Tensor, lr: float | torch.Tensor) -> Any:
        # torch's first step sets the buffer to the gradient; later ones dampen it (without
        # dampening, a zero buffer plus the gradient is the gradient: nothing to tell apart)
        first = step == 1 if self.dampening != 0 else None
        return lr, first

    def rule(
        self, param: torch.Tensor, grad: torch.Tensor, slots: list[torch.Tensor], scalars: Any
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        lr, first = scalars
        if self.maximize:
            grad = -grad
        if self.weight_decay != 0:
            grad = grad.add(param, alpha=self.weight_decay)
        new_slots = []
        if self.momentum != 0:
            buf = torch.add(slots[0] * self.momentum, grad, alpha=1 - self.dampening)
            if first is not None:
                buf = torch.where(first, grad, buf)
            grad = grad.add(buf, alpha=self.momentum) if self.nesterov else buf
            new_slots.append(buf)
        if isinstance(lr, torch.Tensor):
            return param - lr * grad, new_slots
        return param.add(grad, alpha=-lr), new_slots


#: torch.optim.SGD's settings and update rule as a pure optimizer (an alias of :class:`SGD`).
sgd = SGD
