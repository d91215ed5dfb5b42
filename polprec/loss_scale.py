"""Immutable loss-scale states (pytrees, see ``_state.py``); :mod:`polprec.scaling` applies them."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, Union

import torch

from polprec import _fused, _grad_scaler, _tree
from polprec._checks import (
    as_tensor,
    check_grads_finite,
    check_int,
    check_number,
    check_scale_bounds,
)
from polprec._state import State, static_field

__all__ = [
    "DynamicLossScale",
    "LossScale",
    "NoOpLossScale",
    "StaticLossScale",
]


class _Scales:
    """``scale``/``unscale`` of the states that hold a ``loss_scale`` tensor."""

    loss_scale: torch.Tensor

    def scale(self, tree: Any) -> Any:
        """Multiply the floating leaves of ``tree`` by the loss scale.

        Each product is computed in float32 and returned in its leaf's dtype, so a float16
        leaf can overflow to ``inf``; scale a loss with :func:`scale_loss`, which returns
        float32.
        """
        return _tree.map_floating(tree, lambda x: _fused.scaled(x, self.loss_scale))

    def unscale(self, tree: Any) -> Any:
        """Multiply the floating leaves of ``tree`` by the float32 reciprocal of the scale."""
        inv = torch.reciprocal(self.loss_scale)
        return _tree.map_floating(tree, lambda x: _fused.scaled(x, inv))


@dataclasses.dataclass(frozen=True, eq=False)
class NoOpLossScale(State):
    """No loss scaling: ``scale``/``unscale`` return their input; ``adjust`` returns ``self``.

    Examples:
        >>> import torch
        >>> state = NoOpLossScale()
        >>> state.scale(torch.tensor(2.0))
        tensor(2.)
    """

    @property
    def loss_scale(self) -> torch.Tensor:
        """Always ``tensor(1.)``."""
        return torch.ones((), dtype=torch.float32)

    def scale(self, tree: Any) -> Any:
        """Return ``tree`` unchanged."""
        return tree

    def unscale(self, tree: Any) -> Any:
        """Return ``tree`` unchanged."""
        return tree

    def adjust(self, grads_finite: torch.Tensor | bool) -> NoOpLossScale:
        """Return ``self`` (after checking ``grads_finite``)."""
        check_grads_finite(grads_finite)
        return self


@dataclasses.dataclass(frozen=True, eq=False, init=False)
class StaticLossScale(_Scales, State):
    """A fixed loss scale.

    Args:
        loss_scale: a finite number > 0 (stored as a float32 0-dim tensor).

    Examples:
        >>> import torch
        >>> state = StaticLossScale(128)
        >>> state.unscale(state.scale(torch.tensor([0.5, 3.0])))
        tensor([0.5000, 3.0000])
    """

    loss_scale: torch.Tensor

    def __init__(self, loss_scale: float | torch.Tensor) -> None:
        object.__setattr__(
            self, "loss_scale", as_tensor("loss_scale", loss_scale, torch.float32, positive=True)
        )

    def adjust(self, grads_finite: torch.Tensor | bool) -> StaticLossScale:
        """Return ``self`` (a static scale never changes)."""
        check_grads_finite(grads_finite)
        return self


@dataclasses.dataclass(frozen=True, eq=False, init=False)
class DynamicLossScale(_Scales, State):
    """A loss scale that grows after ``period`` finite steps and backs off on overflow.

    ``adjust(grads_finite)`` follows jmp's rule, with bounds and optional hysteresis:

    * finite and ``counter == period - 1``: the scale is multiplied by ``factor`` if the
      result is finite and at most ``max_loss_scale`` (else kept); the counter resets to 0;
    * finite otherwise: the counter increments;
    * not finite: the counter resets and the scale becomes
      ``max(min_loss_scale, scale / factor)``. With ``hysteresis=h > 1`` it backs off only
      from the ``h``-th overflow since the last growth period (Megatron-LM's rule).

    The scale never goes below ``min_loss_scale``. With ``min_loss_scale=0`` and ``factor=2``
    it follows ``torch.amp.GradScaler`` exactly. ``adjust`` uses ``torch.where`` only (no
    host synchronisation, vmappable, compilable); in eager mode, with the default settings
    and a power-of-two factor, it runs torch's fused GradScaler update kernel on copies
    instead, with the same results.

    Args:
        loss_scale: initial scale; a number > 0 or a 0-dim tensor (any real dtype, stored
            as float32).
        counter: finite steps since the last growth (int32).
        positional_settings: refused: the settings below are keyword-only (jmp takes them
            positionally); the ``TypeError`` shows the keyword form.
        period: finite steps between two growths (>= 1).
        factor: growth and back-off factor (> 1).
        min_loss_scale: lower bound of the scale (>= 0).
        max_loss_scale: upper bound of the scale, or ``None`` for only the inf guard.
        hysteresis: overflows tolerated before backing off (>= 1).
        hysteresis_tracker: overflows left before the next back-off (defaults to
            ``hysteresis``).

    Examples:
        >>> import torch
        >>> state = DynamicLossScale(2.0**15, period=2)
        >>> for finite in [True, True, False]:
        ...     state = state.adjust(torch.tensor(finite))
        ...     print(int(state.loss_scale), int(state.counter))
        32768 1
        65536 0
        32768 0
    """

    loss_scale: torch.Tensor
    counter: torch.Tensor
    hysteresis_tracker: torch.Tensor
    period: int = static_field()
    factor: float = static_field()
    min_loss_scale: float = static_field()
    max_loss_scale: float | None = static_field()
    hysteresis: int = static_field()

    def __init__(
        self,
        loss_scale: float | torch.Tensor = 2.0**15,
        counter: int | torch.Tensor = 0,
        *positional_settings: Any,
        period: int = 2000,
        factor: float = 2.0,
        min_loss_scale: float = 1.0,
        max_loss_scale: float | None = None,
        hysteresis: int = 1,
        hysteresis_tracker: int | torch.Tensor | None = None,
    ) -> None:
        if positional_settings:  # jmp's DynamicLossScale(loss_scale, counter, period, factor)
            names = ("period", "factor", "min_loss_scale", "max_loss_scale", "hysteresis")
            given = ", ".join(
                f"{n}={v!r}" for n, v in zip(names, positional_settings, strict=False)
            )
            raise TypeError(
                "DynamicLossScale takes only loss_scale and counter positionally; its settings "
                f"are keyword-only (jmp's are positional): write DynamicLossScale({loss_scale!r}, "
                f"{counter!r}, {given})"
            )
        period = check_int("period", period, minimum=1)
        hysteresis = check_int("hysteresis", hysteresis, minimum=1)
        factor = check_number("factor", factor)
        if factor <= 1:
            raise ValueError(f"factor must be > 1, got {factor!r}")
        min_loss_scale, max_loss_scale = check_scale_bounds(
            loss_scale, min_loss_scale, max_loss_scale
        )
        tracker = hysteresis if hysteresis_tracker is None else hysteresis_tracker
        values = {
            "loss_scale": as_tensor("loss_scale", loss_scale, torch.float32, positive=True),
            "counter": as_tensor("counter", counter, torch.int32),
            "hysteresis_tracker": as_tensor("hysteresis_tracker", tracker, torch.int32),
            "period": period,
            "factor": factor,
            "min_loss_scale": min_loss_scale,
            "max_loss_scale": max_loss_scale,
            "hysteresis": hysteresis,
        }
        for name, v in values.items():
            object.__setattr__(self, name, v)

    def adjust(self, grads_finite: torch.Tensor | bool) -> DynamicLossScale:
        """The next state after a step whose gradients were (not) finite."""
        finite = check_grads_finite(grads_finite)
        if self._fusable() and finite.device == self.loss_scale.device:
            return self._adjust_fused(finite)
        scale, counter = self.loss_scale, self.counter
        period_done = counter == self.period - 1
        grown = scale * self.factor
        can_grow = torch.isfinite(grown)
        if self.max_loss_scale is not None:
            can_grow = can_grow & (grown <= self.max_loss_scale)
        scale_if_finite = torch.where(period_done & can_grow, grown, scale)
        counter_if_finite = torch.where(period_done, 0, counter + 1)
        backed_off = scale / self.factor
        if self.hysteresis == 1:  # back off on every overflow; the tracker never changes
            scale_if_overflow = backed_off
            tracker = self.hysteresis_tracker
        else:
            tracker_if_overflow = torch.clamp_min(self.hysteresis_tracker - 1, 0)
            scale_if_overflow = torch.where(tracker_if_overflow == 0, backed_off, scale)
            tracker_if_finite = torch.where(period_done, self.hysteresis, self.hysteresis_tracker)
            tracker = torch.where(finite, tracker_if_finite, tracker_if_overflow)
        new_scale = torch.where(finite, scale_if_finite, scale_if_overflow)
        return self._replace(
            loss_scale=torch.clamp_min(new_scale, self.min_loss_scale),
            counter=torch.where(finite, counter_if_finite, 0).to(torch.int32),
            hysteresis_tracker=tracker.to(torch.int32),
        )

    def _fusable(self) -> bool:
        """Whether torch's fused GradScaler update kernel computes exactly :meth:`adjust`.

        It does for the defaults (no upper bound, no hysteresis) with a power-of-two factor
        (so multiplying by ``1 / factor`` equals dividing), where the fused kernels may run.
        """
        return (
            self.hysteresis == 1
            and self.max_loss_scale is None
            and math.frexp(self.factor)[0] == 0.5
            and _fused.may_fuse([self.loss_scale])
        )

    def _adjust_fused(self, finite: torch.Tensor) -> DynamicLossScale:
        """:meth:`adjust` with the fused kernel, on copies."""
        found_inf = torch.logical_not(finite).to(torch.float32)
        scale, counter = _fused.update_scale(
            self.loss_scale, self.counter, found_inf, self.factor, self.period
        )
        if self.min_loss_scale > 0:
            scale.clamp_min_(self.min_loss_scale)  # a fresh tensor: nobody else holds it
        return self._replace(loss_scale=scale, counter=counter)

    # torch.amp.GradScaler interoperability: the work is done beside the class.

    @classmethod
    def from_grad_scaler_state_dict(
        cls, state_dict: Mapping[str, Any], *, min_loss_scale: float = 0.0, **kwargs: Any
    ) -> DynamicLossScale:
        """A state equivalent to a ``torch.amp.GradScaler.state_dict()``.

        ``growth_factor`` becomes ``factor`` (``backoff_factor`` must be its reciprocal),
        ``growth_interval`` becomes ``period`` and ``_growth_tracker`` becomes ``counter``.
        GradScaler has no lower bound, hence ``min_loss_scale=0`` by default; ``kwargs`` are
        further settings (``max_loss_scale``, ``hysteresis``).

        Examples:
            >>> import torch
            >>> scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=10)
            >>> state = DynamicLossScale.from_grad_scaler_state_dict(scaler.state_dict())
            >>> float(state.loss_scale), state.period
            (1024.0, 10)
        """
        args = _grad_scaler.read(state_dict)
        return cls(**args, min_loss_scale=min_loss_scale, **kwargs)

    def to_grad_scaler_state_dict(self) -> dict[str, Any]:
        """This state as a dict for ``torch.amp.GradScaler.load_state_dict`` (reads the tensors)."""
        return _grad_scaler.write(
            self.loss_scale, self.counter, factor=self.factor, period=self.period
        )


LossScale = Union[NoOpLossScale, StaticLossScale, DynamicLossScale]  # noqa: UP007
_LOSS_SCALE_TYPES = (NoOpLossScale, StaticLossScale, DynamicLossScale)


def check_loss_scale(loss_scale: Any) -> LossScale:
    """``loss_scale`` if it is a loss-scale state, else a ``TypeError`` that says what is."""
    if not isinstance(loss_scale, _LOSS_SCALE_TYPES):
        raise TypeError(
            f"loss_scale must be a NoOpLossScale, StaticLossScale or DynamicLossScale, got "
            f"{loss_scale!r} of type {type(loss_scale).__name__}; for a plain number use "
            "StaticLossScale(value)"
        )
    return loss_scale
