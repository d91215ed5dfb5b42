"""SGD with momentum, dampening, Nesterov momentum, weight decay and maximize (torch.optim's)."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch

from polprec import _fused
from polprec._checks import check_number
from polprec.optim._base import Optimizer
from polprec.optim._modes import check_bool
from polprec.optim._states import OptState, SGDState
from polprec.optim._update import Buffers

__all__ = ["SGD", "sgd"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class SGD(Optimizer):
    """Stochastic gradient descent, ``torch.optim.SGD``'s update as a pure function.

    Made by :func:`sgd`, which documents the settings.
    """

    lr: float = 1e-3
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    maximize: bool = False
    master_weights: bool | None = None
    state_dtype: torch.dtype | None = None
    rounding: str = "nearest"
    kahan: bool = False

    state_type: ClassVar[type[OptState]] = SGDState
    slot_fields: ClassVar[tuple[str, ...]] = ("momentum_buffer",)

    def __post_init__(self) -> None:
        for name in ("momentum", "weight_decay"):
            object.__setattr__(self, name, check_number(name, getattr(self, name), positive=False))
        dampening = check_number("dampening", self.dampening, positive=False)
        if dampening > 1:
            raise ValueError(f"dampening must be in [0, 1], got {self.dampening!r}")
        object.__setattr__(self, "dampening", dampening)
        check_bool("nesterov", self.nesterov)
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise ValueError(
                "nesterov=True needs momentum > 0 and dampening == 0 (as torch.optim.SGD), got "
                f"momentum={self.momentum!r}, dampening={self.dampening!r}"
            )
        self._check_common()

    def _slots(self) -> tuple[str, ...]:
        return self.slot_fields if self.momentum != 0 else ()

    def _fusable(self) -> bool:
        # torch's kernel sets the buffer to the gradient on a first step it must be told
        # about (a host-side flag); without dampening, zero buffers make that unnecessary.
        return self.dampening == 0

    def _kernel(self, b: Buffers) -> None:
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

    def _scalars(self, step: torch.Tensor, lr: float | torch.Tensor) -> Any:
        # torch's first step sets the buffer to the gradient; later ones dampen it
        first = step == 1 if self.momentum != 0 and self.dampening != 0 else None
        return lr, first

    def _rule(
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


def sgd(
    lr: float = 1e-3,
    *,
    momentum: float = 0.0,
    dampening: float = 0.0,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    maximize: bool = False,
    master_weights: bool | None = None,
    state_dtype: torch.dtype | str | None = None,
    rounding: str = "nearest",
    kahan: bool = False,
) -> SGD:
    """SGD with torch.optim.SGD's settings and update rule, pure.

    The first five settings are torch's (same names, defaults and numerics); the last four
    are the precision options shared by every polprec optimizer (see :func:`adamw`).

    Args:
        lr: learning rate (>= 0; torch's default 1e-3); :meth:`~polprec.optim.SGD.step` may
            override it.
        momentum: momentum factor (>= 0).
        dampening: dampening of the momentum, in [0, 1].
        nesterov: Nesterov momentum (needs momentum > 0 and dampening 0).
        weight_decay: L2 penalty added to the gradient (>= 0).
        maximize: maximize the objective instead of minimizing it.
        master_weights: keep float32 master copies of 16-bit parameters.
        state_dtype: the momentum buffers' dtype.
        rounding: ``"nearest"`` or ``"stochastic"``, for writing 16-bit parameters.
        kahan: Kahan-compensated updates of 16-bit parameters.

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
    return SGD(
        lr=lr,
        momentum=momentum,
        dampening=dampening,
        nesterov=nesterov,
        weight_decay=weight_decay,
        maximize=maximize,
        master_weights=master_weights,
        state_dtype=state_dtype,  # type: ignore[arg-type]
        rounding=rounding,
        kahan=kahan,
    )
