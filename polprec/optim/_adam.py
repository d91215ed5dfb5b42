"""Adam and AdamW, with L2 or decoupled weight decay, AMSGrad and maximize (torch.optim's)."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch

from polprec import _fused
from polprec._checks import check_number
from polprec.optim._base import Optimizer
from polprec.optim._modes import check_bool
from polprec.optim._states import AdamState, OptState
from polprec.optim._update import Buffers

__all__ = ["Adam", "adam", "adamw"]


def _check_betas(betas: Any) -> tuple[float, float]:
    if not isinstance(betas, tuple | list) or len(betas) != 2:
        raise TypeError(f"betas must be a pair of numbers in [0, 1), got {betas!r}")
    out = []
    for i, beta in enumerate(betas):
        value = check_number(f"betas[{i}]", beta, positive=False)
        if value >= 1:
            raise ValueError(f"betas[{i}] must be in [0, 1), got {beta!r}")
        out.append(value)
    return out[0], out[1]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Adam(Optimizer):
    """Adam (and, with ``decoupled_weight_decay``, AdamW), ``torch.optim``'s update, pure.

    Made by :func:`adam` and :func:`adamw`, which document the settings.
    """

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    amsgrad: bool = False
    maximize: bool = False
    decoupled_weight_decay: bool = False
    master_weights: bool | None = None
    state_dtype: torch.dtype | None = None
    rounding: str = "nearest"
    kahan: bool = False

    state_type: ClassVar[type[OptState]] = AdamState
    slot_fields: ClassVar[tuple[str, ...]] = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", _check_betas(self.betas))
        for name in ("eps", "weight_decay"):
            object.__setattr__(self, name, check_number(name, getattr(self, name), positive=False))
        check_bool("amsgrad", self.amsgrad)
        check_bool("decoupled_weight_decay", self.decoupled_weight_decay)
        self._check_common()

    def _slots(self) -> tuple[str, ...]:
        return self.slot_fields if self.amsgrad else self.slot_fields[:2]

    def _kernel(self, b: Buffers) -> None:
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

    def _scalars(self, step: torch.Tensor, lr: float | torch.Tensor) -> Any:
        # torch computes these in Python floats (double); 0-dim float64 tensors here
        beta1, beta2 = self.betas
        t = step.to(torch.float64)
        neg_step_size = _once(-lr / (1 - beta1**t))
        bias_correction2_sqrt = _once(torch.sqrt(1 - beta2**t))
        decay = 1 - lr * self.weight_decay if self.decoupled_weight_decay else None
        return neg_step_size, bias_correction2_sqrt, decay

    def _rule(
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


def adam(
    lr: float = 1e-3,
    *,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    amsgrad: bool = False,
    maximize: bool = False,
    decoupled_weight_decay: bool = False,
    master_weights: bool | None = None,
    state_dtype: torch.dtype | str | None = None,
    rounding: str = "nearest",
    kahan: bool = False,
) -> Adam:
    """Adam with torch.optim.Adam's settings and update rule, pure.

    ``weight_decay`` is an L2 penalty added to the gradient, as in torch.optim.Adam
    (``decoupled_weight_decay=True`` is AdamW: :func:`adamw`).

    Args:
        lr: learning rate (>= 0); :meth:`~polprec.optim.Adam.step` may override it.
        betas: decay rates of the first and second moments, each in [0, 1).
        eps: added to the denominator (>= 0).
        weight_decay: L2 penalty added to the gradient (>= 0).
        amsgrad: keep the running maximum of the second moments (AMSGrad).
        maximize: maximize the objective instead of minimizing it.
        decoupled_weight_decay: decay the parameters directly instead (AdamW).
        master_weights: the precision options, as for :func:`adamw`.
        state_dtype: see :func:`adamw`.
        rounding: see :func:`adamw`.
        kahan: see :func:`adamw`.
    """
    return Adam(
        lr=lr,
        betas=betas,
        eps=eps,
        weight_decay=weight_decay,
        amsgrad=amsgrad,
        maximize=maximize,
        decoupled_weight_decay=decoupled_weight_decay,
        master_weights=master_weights,
        state_dtype=state_dtype,  # type: ignore[arg-type]
        rounding=rounding,
        kahan=kahan,
    )


def adamw(
    lr: float = 1e-3,
    *,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
    amsgrad: bool = False,
    maximize: bool = False,
    master_weights: bool | None = None,
    state_dtype: torch.dtype | str | None = None,
    rounding: str = "nearest",
    kahan: bool = False,
) -> Adam:
    """AdamW with torch.optim.AdamW's settings and update rule, pure.

    Args:
        lr: learning rate (>= 0); :meth:`~polprec.optim.Adam.step` may override it.
        betas: decay rates of the first and second moments, each in [0, 1).
        eps: added to the denominator (>= 0).
        weight_decay: decoupled weight decay: each step multiplies the parameters by
            ``1 - lr * weight_decay`` (>= 0).
        amsgrad: keep the running maximum of the second moments (AMSGrad).
        maximize: maximize the objective instead of minimizing it.
        master_weights: keep float32 master copies of 16-bit parameters, update them and
            return each parameter in its own dtype (Apex O2, DeepSpeed's bf16 optimizer).
            ``None`` (the default): on for 16-bit parameters unless ``kahan`` or stochastic
            rounding is asked for, which exist to make them unnecessary.
        state_dtype: the dtype of the moments; ``None``: float32 for 16-bit parameters, the
            parameter's dtype otherwise.
        rounding: how updated values are written into 16-bit parameters: ``"nearest"`` or
            ``"stochastic"`` (unbiased; its random bits come from a counter in the state).
        kahan: Kahan-compensated updates of 16-bit parameters without a master copy (a
            compensation buffer in the parameter's dtype); exclusive with
            ``master_weights=True``.

    Examples:
        >>> import torch
        >>> import polprec as pp
        >>> opt = pp.optim.adamw(1e-2, master_weights=True)
        >>> params = {"w": torch.ones(3, dtype=torch.bfloat16)}
        >>> state = opt.init(params)
        >>> new, state = opt.step(params, {"w": torch.ones(3, dtype=torch.bfloat16)}, state,
        ...                       grads_finite=torch.tensor(False))
        >>> torch.equal(new["w"], params["w"]), int(state.step), int(state.skips)
        (True, 0, 1)
    """
    return adam(
        lr,
        betas=betas,
        eps=eps,
        weight_decay=weight_decay,
        amsgrad=amsgrad,
        maximize=maximize,
        decoupled_weight_decay=True,
        master_weights=master_weights,
        state_dtype=state_dtype,
        rounding=rounding,
        kahan=kahan,
    )
