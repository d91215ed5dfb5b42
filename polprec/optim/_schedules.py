"""Learning-rate schedules as pure functions of the step count (optax's schedules).

Each is a small frozen object called with the number of updates applied so far (a 0-dim
integer tensor such as ``state.step``, or an int) and returning a 0-dim float32 factor for
``step(..., lr_scale=...)``: tensor ops only, so a compiled step takes a new factor every
call without recompiling.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from polprec._checks import check_int, check_nonnegative

__all__ = ["WarmupCosine", "WarmupLinear", "warmup_cosine", "warmup_linear"]


def _steps(step: Any) -> torch.Tensor:
    """The step count as a float64 0-dim tensor (on its own device)."""
    if isinstance(step, torch.Tensor):
        if step.dim() != 0 or step.is_complex() or step.dtype == torch.bool:
            raise TypeError(
                f"a schedule takes the step count as a 0-dim real tensor (state.step) or an "
                f"int, got a tensor of dtype {step.dtype} and shape {tuple(step.shape)}"
            )
        return step.to(torch.float64)
    return torch.tensor(float(check_int("step", step, minimum=0)), dtype=torch.float64)


def _check_steps(warmup_steps: Any, total_steps: Any) -> tuple[int, int]:
    warmup = check_int("warmup_steps", warmup_steps, minimum=0)
    total = check_int("total_steps", total_steps, minimum=0)
    if total < warmup:
        raise ValueError(
            f"total_steps ({total}) must be >= warmup_steps ({warmup}): warm-up is part of the run"
        )
    return warmup, total


@dataclasses.dataclass(frozen=True)
class WarmupCosine:
    """Linear warm-up, then cosine decay to ``min_factor`` (see :func:`warmup_cosine`)."""

    warmup_steps: int
    total_steps: int
    min_factor: float = 0.0

    def __post_init__(self) -> None:
        _check_steps(self.warmup_steps, self.total_steps)
        low = check_nonnegative("min_factor", self.min_factor)
        if low > 1:
            raise ValueError(f"min_factor must be in [0, 1], got {self.min_factor!r}")
        object.__setattr__(self, "min_factor", low)

    def __call__(self, step: Any) -> torch.Tensor:
        t = _steps(step)
        warm = t / max(1, self.warmup_steps)
        span = max(1, self.total_steps - self.warmup_steps)
        progress = ((t - self.warmup_steps) / span).clamp(max=1.0)  # (read from warm-up on)
        cosine = 0.5 * (1.0 + torch.cos(math.pi * progress))
        decayed = self.min_factor + (1.0 - self.min_factor) * cosine
        return torch.where(t < self.warmup_steps, warm, decayed).to(torch.float32)


@dataclasses.dataclass(frozen=True)
class WarmupLinear:
    """Linear warm-up, then linear decay to 0 (see :func:`warmup_linear`)."""

    warmup_steps: int
    total_steps: int

    def __post_init__(self) -> None:
        _check_steps(self.warmup_steps, self.total_steps)

    def __call__(self, step: Any) -> torch.Tensor:
        t = _steps(step)
        warm = t / max(1, self.warmup_steps)
        span = max(1, self.total_steps - self.warmup_steps)
        decayed = ((self.total_steps - t) / span).clamp(min=0.0)
        return torch.where(t < self.warmup_steps, warm, decayed).to(torch.float32)


def warmup_cosine(warmup_steps: int, total_steps: int, *, min_factor: float = 0.0) -> WarmupCosine:
    """A learning-rate factor: ``step / warmup_steps`` during warm-up, then cosine decay.

    After warm-up the factor is ``min + (1 - min) * 0.5 * (1 + cos(pi * progress))`` with
    ``progress = (step - warmup_steps) / (total_steps - warmup_steps)``, and ``min_factor``
    from ``total_steps`` on. With ``min_factor=0`` it is Hugging Face's
    ``get_cosine_schedule_with_warmup`` (computed in float64, returned in float32), up to
    ``total_steps``.

    Args:
        warmup_steps: steps of linear warm-up from 0 (an int >= 0).
        total_steps: the step at which the decay reaches ``min_factor`` (>= ``warmup_steps``).
        min_factor: the final factor, in [0, 1].

    Examples:
        >>> import torch
        >>> schedule = warmup_cosine(10, 110)
        >>> [round(float(schedule(torch.tensor(s))), 4) for s in (0, 5, 10, 60, 110, 200)]
        [0.0, 0.5, 1.0, 0.5, 0.0, 0.0]
    """
    return WarmupCosine(warmup_steps, total_steps, min_factor)


def warmup_linear(warmup_steps: int, total_steps: int) -> WarmupLinear:
    """A learning-rate factor: ``step / warmup_steps`` during warm-up, then linear decay to 0
    at ``total_steps`` (Hugging Face's ``get_linear_schedule_with_warmup``).

    Examples:
        >>> import torch
        >>> schedule = warmup_linear(10, 110)
        >>> [round(float(schedule(torch.tensor(s))), 4) for s in (0, 5, 10, 60, 110, 200)]
        [0.0, 0.5, 1.0, 0.5, 0.0, 0.0]
    """
    return WarmupLinear(warmup_steps, total_steps)
