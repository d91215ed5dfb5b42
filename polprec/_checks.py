"""Argument checks shared by polprec's modules: numbers, 0-dim tensors and finite flags.

Each raises a ``TypeError`` or ``ValueError`` that names the argument, the bad value and
what is accepted. None of them reads a tensor's value (that would be a host
synchronisation).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from polprec import _dtensor


def check_number(name: str, value: Any, *, positive: bool = True) -> float:
    """Validate a Python number setting; ``positive`` demands > 0, else >= 0."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(
            f"{name} must be a Python number, got {value!r} of type {type(value).__name__}"
        )
    number = float(value)
    if not math.isfinite(number) or (number <= 0 if positive else number < 0):
        bound = "a finite number > 0" if positive else "a finite number >= 0"
        raise ValueError(f"{name} must be {bound}, got {value!r}")
    return number


def check_nonnegative(name: str, value: Any) -> float:
    """A Python number setting >= 0, as a float."""
    return check_number(name, value, positive=False)


def check_int(name: str, value: Any, *, minimum: int) -> int:
    """Validate an int setting of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def check_scale_bounds(
    loss_scale: Any, min_loss_scale: Any, max_loss_scale: Any
) -> tuple[float, float | None]:
    """Validate ``min_loss_scale <= loss_scale <= max_loss_scale`` (a tensor scale is not read)."""
    low = check_nonnegative("min_loss_scale", min_loss_scale)
    high = None if max_loss_scale is None else check_number("max_loss_scale", max_loss_scale)
    if high is not None and high < low:
        raise ValueError(f"max_loss_scale ({high!r}) must be >= min_loss_scale ({low!r})")
    if not isinstance(loss_scale, torch.Tensor):
        initial = check_number("loss_scale", loss_scale)
        if initial < low or (high is not None and initial > high):
            raise ValueError(
                f"loss_scale {initial!r} is outside [min_loss_scale, max_loss_scale] = "
                f"[{low!r}, {high!r}]"
            )
    return low, high


def as_tensor(name: str, value: Any, dtype: torch.dtype, *, positive: bool = False) -> torch.Tensor:
    """A 0-dim ``dtype`` tensor from a number (value-checked) or a tensor (checked statically).

    A floating number must be > 0 with ``positive``, else >= 0; an integer must be >= 0.

    Tensor values are not inspected: that would need a host synchronisation, and states are
    rebuilt from tensors on every step.
    """
    if isinstance(value, torch.Tensor):
        if value.dim() != 0:
            raise ValueError(f"{name} must be a 0-dim tensor, got shape {tuple(value.shape)}")
        if value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"{name} must be a real number, got a tensor of dtype {value.dtype}")
        if not dtype.is_floating_point and value.is_floating_point():
            raise TypeError(
                f"{name} must be an integer tensor, got a tensor of dtype {value.dtype}"
            )
        return value.to(dtype)
    if dtype.is_floating_point:
        return torch.tensor(check_number(name, value, positive=positive), dtype=dtype)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r} of type {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return torch.tensor(value, dtype=dtype)


def check_grads_finite(grads_finite: Any) -> torch.Tensor:
    """A 0-dim bool tensor from a finite flag (a Python bool, a verdict known in advance, is
    wrapped; everywhere polprec takes a flag it takes either). A DTensor flag becomes its
    global value, a plain tensor the same on every rank of its mesh (a collective, no host
    read)."""
    if isinstance(grads_finite, bool):
        return torch.tensor(grads_finite)
    if _dtensor.is_dtensor(grads_finite):
        _check_flag(grads_finite)
        return _dtensor.plain_flag(grads_finite)
    if not isinstance(grads_finite, torch.Tensor):
        raise TypeError(
            "grads_finite must be a 0-dim torch.bool tensor (as returned by unscale_and_check "
            f"or all_finite) or a bool, got {grads_finite!r} of type {type(grads_finite).__name__}"
        )
    _check_flag(grads_finite)
    return grads_finite


def _check_flag(flag: torch.Tensor) -> None:
    if flag.dtype != torch.bool or flag.dim() != 0:
        raise ValueError(
            f"grads_finite must be a 0-dim torch.bool tensor, got dtype {flag.dtype} with "
            f"shape {tuple(flag.shape)}"
        )
