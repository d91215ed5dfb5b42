"""The precision options, checked once, and what they mean for a parameter of each dtype.

``master_weights``, ``state_dtype``, ``rounding`` and ``kahan`` are fields of every
optimizer (declared once, on :class:`~polprec.optim.Optimizer`). :func:`check` validates them
together; :func:`leaf_mode` says how a parameter of one dtype is updated under them.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from polprec.optim._rounding import HALF
from polprec.policy import parse_dtype

__all__ = ["ROUNDINGS", "Mode", "check", "check_bool", "leaf_mode"]

#: The accepted values of ``rounding``.
ROUNDINGS = ("nearest", "stochastic")


class Mode(NamedTuple):
    """How one parameter dtype is updated under an optimizer's precision options."""

    param: torch.dtype  # the parameter's own dtype
    state: torch.dtype  # the moments' dtype
    work: torch.dtype  # the dtype the update is computed in
    master: bool  # a float32 master copy is kept and updated
    kahan: bool  # a compensation buffer carries what the 16-bit parameter lost
    stochastic: bool  # stochastic rounding writes the 16-bit parameter

    @property
    def direct(self) -> bool:
        """The update runs on the parameter and moments themselves, as torch.optim's does."""
        return self.work == self.param == self.state and not (self.master or self.kahan)


def check_bool(name: str, value: Any) -> bool:
    """``value`` if it is a bool, else a TypeError naming ``name``."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def check(master_weights: Any, state_dtype: Any, rounding: Any, kahan: Any) -> torch.dtype | None:
    """Validate the precision options; returns ``state_dtype`` as a dtype (or ``None``)."""
    if master_weights is not None and not isinstance(master_weights, bool):
        raise TypeError(
            f"master_weights must be True, False or None (on for 16-bit parameters), got "
            f"{master_weights!r}"
        )
    check_bool("kahan", kahan)
    if not isinstance(rounding, str):
        raise TypeError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    if master_weights is True and kahan:
        raise ValueError(
            "master_weights=True and kahan=True are exclusive: Kahan compensation keeps the "
            "bits a 16-bit parameter loses without a master copy; choose one"
        )
    return None if state_dtype is None else parse_dtype(state_dtype)


def leaf_mode(
    dtype: torch.dtype,
    master_weights: bool | None,
    state_dtype: torch.dtype | None,
    rounding: str,
    kahan: bool,
) -> Mode:
    """The :class:`Mode` of a parameter of ``dtype`` (the options act on 16-bit ones only).

    ``master_weights=None`` keeps master copies of 16-bit parameters unless ``kahan`` or
    stochastic rounding is asked for: those exist to do without them.
    """
    half = dtype in HALF
    if master_weights is None:
        master_weights = not kahan and rounding == "nearest"
    master = half and master_weights
    compensated = half and kahan
    stochastic = half and rounding == "stochastic"
    state = state_dtype or (torch.float32 if half else dtype)
    if not half:
        work = torch.promote_types(dtype, state)
    elif master or compensated or stochastic or state != dtype:
        work = torch.promote_types(torch.float32, state)
    else:  # a 16-bit parameter with 16-bit moments, nearest rounding: torch's own update
        work = dtype
    return Mode(dtype, state, work, master, compensated, stochastic)
