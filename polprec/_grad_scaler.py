"""Reading and writing ``torch.amp.GradScaler`` state dicts, for users migrating.

:meth:`polprec.DynamicLossScale.from_grad_scaler_state_dict` and
:meth:`~polprec.DynamicLossScale.to_grad_scaler_state_dict` are the public entry points.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from polprec._checks import check_number

#: The keys of ``GradScaler.state_dict()`` (an enabled scaler).
KEYS = ("scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker")


def read(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The ``DynamicLossScale`` arguments a ``GradScaler.state_dict()`` stands for."""
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"expected GradScaler.state_dict(), got {type(state_dict).__name__}")
    missing = [k for k in KEYS if k not in state_dict]
    if missing:
        hint = " (a disabled GradScaler saves an empty dict)" if not state_dict else ""
        raise ValueError(
            f"GradScaler state dict is missing keys {missing}{hint}; expected {list(KEYS)}"
        )
    growth = check_number("growth_factor", state_dict["growth_factor"])
    backoff = check_number("backoff_factor", state_dict["backoff_factor"])
    if not math.isclose(growth * backoff, 1.0, rel_tol=1e-6):
        raise ValueError(
            f"backoff_factor {backoff!r} is not 1/growth_factor ({1 / growth!r}); "
            "DynamicLossScale grows and backs off by the same factor"
        )
    scale = state_dict["scale"]
    return {
        "loss_scale": float(scale) if isinstance(scale, torch.Tensor) else scale,
        "counter": int(state_dict["_growth_tracker"]),
        "period": int(state_dict["growth_interval"]),
        "factor": growth,
    }


def write(
    loss_scale: torch.Tensor, counter: torch.Tensor, *, factor: float, period: int
) -> dict[str, Any]:
    """A ``GradScaler.load_state_dict`` dict for these values (reads the tensors)."""
    return {
        "scale": float(loss_scale),
        "growth_factor": factor,
        "backoff_factor": 1.0 / factor,
        "growth_interval": period,
        "_growth_tracker": int(counter),
    }
