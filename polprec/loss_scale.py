"""Stateless loss scaling: immutable loss-scale states and pure functions over gradients.

A loss-scale state is a pytree: its tensors (scale, counters) are children, its settings
(period, factor, bounds, ...) are static metadata that survive every flatten/unflatten, so a
state passes through ``vmap`` (a stacked state gives each ensemble member its own scale),
``torch.func.grad`` and ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, ClassVar, TypeVar, Union

import torch

from polprec import _tree
from polprec.policy import Policy, get_policy
from polprec.tree import all_finite

__all__ = [
    "DynamicLossScale",
    "LossScale",
    "NoOpLossScale",
    "StaticLossScale",
    "default_loss_scale",
    "scale_loss",
    "unscale_and_check",
]

_S = TypeVar("_S", bound="_Base")


def _check_number(name: str, value: Any, *, positive: bool = True) -> float:
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


def _as_tensor(name: str, value: Any, dtype: torch.dtype, *, positive: bool) -> torch.Tensor:
    """A 0-dim ``dtype`` tensor from a number (value-checked) or a tensor (checked statically).

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
        return torch.tensor(_check_number(name, value, positive=positive), dtype=dtype)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r} of type {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return torch.tensor(value, dtype=dtype)


def _mul(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``x * factor`` in ``x``'s dtype for a 0-dim float32 ``factor``.

    The elementwise kernels read a 0-dim operand as a float32 scalar, so the product is
    computed in float32 and rounded once (a 2**-25 reciprocal is not flushed to zero for
    float16). Only a 0-dim ``x`` is promoted by torch's rules; it is cast back.
    """
    return _keep_dtype(x * factor, x.dtype)


def _keep_dtype(y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return y if y.dtype == dtype else y.to(dtype)


def _check_grads_finite(grads_finite: Any) -> torch.Tensor:
    if isinstance(grads_finite, bool):
        return torch.tensor(grads_finite)
    if not isinstance(grads_finite, torch.Tensor):
        raise TypeError(
            "grads_finite must be a 0-dim torch.bool tensor (as returned by unscale_and_check "
            f"or all_finite) or a bool, got {grads_finite!r} of type {type(grads_finite).__name__}"
        )
    if grads_finite.dtype != torch.bool or grads_finite.dim() != 0:
        raise ValueError(
            "grads_finite must be a 0-dim torch.bool tensor, got dtype "
            f"{grads_finite.dtype} with shape {tuple(grads_finite.shape)}"
        )
    return grads_finite


class _Base:
    """Shared behaviour of the loss-scale states (pytree registration, state dicts)."""

    _children: ClassVar[tuple[str, ...]] = ()
    _static: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _tree.register_node(cls, cls._flatten, cls._unflatten)

    def _flatten(self) -> tuple[list[Any], tuple[Any, ...]]:
        return [getattr(self, n) for n in self._children], tuple(
            getattr(self, n) for n in self._static
        )

    @classmethod
    def _unflatten(cls: type[_S], children: list[Any], static: tuple[Any, ...]) -> _S:
        # Unvalidated: vmap and stacking rebuild states from batched/stacked tensors.
        obj = object.__new__(cls)
        for name, value in zip(cls._children, children, strict=True):
            object.__setattr__(obj, name, value)
        for name, value in zip(cls._static, static, strict=True):
            object.__setattr__(obj, name, value)
        return obj

    def _replace(self: _S, **children: torch.Tensor) -> _S:
        leaves, static = self._flatten()
        values = dict(zip(self._children, leaves, strict=True))
        values.update(children)
        return self._unflatten([values[n] for n in self._children], static)

    def to(self: _S, device: torch.device | str) -> _S:
        """A copy of this state with its tensors on ``device``."""
        leaves, static = self._flatten()
        return self._unflatten([t.to(device) for t in leaves], static)

    def state_dict(self) -> dict[str, Any]:
        """Tensors and settings as a dict that survives ``torch.load(weights_only=True)``."""
        leaves, static = self._flatten()
        out: dict[str, Any] = {"type": type(self).__name__}
        out.update(zip(self._children, (t.detach().clone() for t in leaves), strict=True))
        out.update(zip(self._static, static, strict=True))
        return out

    @classmethod
    def from_state_dict(cls: type[_S], state_dict: Mapping[str, Any]) -> _S:
        """Rebuild a state from :meth:`state_dict`'s output (validated)."""
        if not isinstance(state_dict, Mapping):
            raise TypeError(
                f"state_dict must be a mapping, got {type(state_dict).__name__}; pass the "
                "output of state_dict()"
            )
        kind = state_dict.get("type", cls.__name__)
        if kind != cls.__name__:
            raise ValueError(f"state_dict is of a {kind}, not a {cls.__name__}")
        fields = set(cls._children) | set(cls._static)
        missing = sorted(fields - set(state_dict))
        unknown = sorted(set(state_dict) - fields - {"type"})
        if missing or unknown:
            raise ValueError(
                f"state_dict for {cls.__name__} has missing keys {missing} and unknown keys "
                f"{unknown}; expected keys {sorted(fields | {'type'})}"
            )
        return cls(**{k: state_dict[k] for k in fields})

    def load_state_dict(self: _S, state_dict: Mapping[str, Any]) -> _S:
        """A new state built from ``state_dict`` (this one is unchanged)."""
        return type(self).from_state_dict(state_dict)


class _Scales:
    """``scale``/``unscale`` of the states that hold a ``loss_scale`` tensor."""

    loss_scale: torch.Tensor

    def scale(self, tree: Any) -> Any:
        """Multiply the floating leaves of ``tree`` by the loss scale.

        Each product is computed in float32 and returned in its leaf's dtype, so a float16
        leaf can overflow to ``inf``; scale a loss with :func:`scale_loss`, which returns
        float32.
        """
        return _tree.map_floating(tree, lambda x: _mul(x, self.loss_scale))

    def unscale(self, tree: Any) -> Any:
        """Multiply the floating leaves of ``tree`` by the float32 reciprocal of the scale."""
        inv = torch.reciprocal(self.loss_scale)
        return _tree.map_floating(tree, lambda x: _mul(x, inv))


@dataclasses.dataclass(frozen=True, eq=False)
class NoOpLossScale(_Base):
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
        _check_grads_finite(grads_finite)
        return self


@dataclasses.dataclass(frozen=True, eq=False, init=False)
class StaticLossScale(_Scales, _Base):
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
    _children: ClassVar[tuple[str, ...]] = ("loss_scale",)

    def __init__(self, loss_scale: float | torch.Tensor) -> None:
        object.__setattr__(
            self, "loss_scale", _as_tensor("loss_scale", loss_scale, torch.float32, positive=True)
        )

    def adjust(self, grads_finite: torch.Tensor | bool) -> StaticLossScale:
        """Return ``self`` (a static scale never changes)."""
        _check_grads_finite(grads_finite)
        return self


@dataclasses.dataclass(frozen=True, eq=False, init=False)
class DynamicLossScale(_Scales, _Base):
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
    period: int
    factor: float
    min_loss_scale: float
    max_loss_scale: float | None
    hysteresis: int

    _children: ClassVar[tuple[str, ...]] = ("loss_scale", "counter", "hysteresis_tracker")
    _static: ClassVar[tuple[str, ...]] = (
        "period",
        "factor",
        "min_loss_scale",
        "max_loss_scale",
        "hysteresis",
    )

    def __init__(
        self,
        loss_scale: float | torch.Tensor = 2.0**15,
        counter: int | torch.Tensor = 0,
        *,
        period: int = 2000,
        factor: float = 2.0,
        min_loss_scale: float = 1.0,
        max_loss_scale: float | None = None,
        hysteresis: int = 1,
        hysteresis_tracker: int | torch.Tensor | None = None,
    ) -> None:
        for name, value in (("period", period), ("hysteresis", hysteresis)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int >= 1, got {value!r}")
            if value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        factor = _check_number("factor", factor)
        if factor <= 1:
            raise ValueError(f"factor must be > 1, got {factor!r}")
        min_loss_scale = _check_number("min_loss_scale", min_loss_scale, positive=False)
        if max_loss_scale is not None:
            max_loss_scale = _check_number("max_loss_scale", max_loss_scale)
            if max_loss_scale < min_loss_scale:
                raise ValueError(
                    f"max_loss_scale ({max_loss_scale!r}) must be >= min_loss_scale "
                    f"({min_loss_scale!r})"
                )
        if not isinstance(loss_scale, torch.Tensor):
            initial = _check_number("loss_scale", loss_scale)
            if initial < min_loss_scale or (
                max_loss_scale is not None and initial > max_loss_scale
            ):
                raise ValueError(
                    f"loss_scale {initial!r} is outside [min_loss_scale, max_loss_scale] = "
                    f"[{min_loss_scale!r}, {max_loss_scale!r}]"
                )
        tracker = hysteresis if hysteresis_tracker is None else hysteresis_tracker
        values = {
            "loss_scale": _as_tensor("loss_scale", loss_scale, torch.float32, positive=True),
            "counter": _as_tensor("counter", counter, torch.int32, positive=False),
            "hysteresis_tracker": _as_tensor(
                "hysteresis_tracker", tracker, torch.int32, positive=False
            ),
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
        finite = _check_grads_finite(grads_finite)
        if self._fusable() and finite.device == self.loss_scale.device:
            return self._adjust_found_inf(torch.logical_not(finite).to(torch.float32))
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
        (so multiplying by ``1 / factor`` equals dividing), in eager mode only (the kernel
        updates in place, has no vmap rule and no derivative).
        """
        return (
            self.hysteresis == 1
            and self.max_loss_scale is None
            and math.frexp(self.factor)[0] == 0.5
            and not torch.compiler.is_compiling()
            and not torch._C._are_functorch_transforms_active()
            and not self.loss_scale.requires_grad
        )

    def _adjust_found_inf(self, found_inf: torch.Tensor) -> DynamicLossScale:
        """:meth:`adjust` from a float ``found_inf`` flag with the fused kernel, on copies."""
        scale, counter = self.loss_scale.clone(), self.counter.clone()
        torch._amp_update_scale_(
            scale, counter, found_inf, self.factor, 1.0 / self.factor, self.period
        )
        if self.min_loss_scale > 0:
            scale.clamp_min_(self.min_loss_scale)  # a fresh tensor: nobody else holds it
        return self._replace(loss_scale=scale, counter=counter)

    # --- torch.amp.GradScaler interoperability -------------------------------------------

    @classmethod
    def from_grad_scaler_state_dict(
        cls, state_dict: Mapping[str, Any], *, min_loss_scale: float = 0.0, **kwargs: Any
    ) -> DynamicLossScale:
        """A state equivalent to a ``torch.amp.GradScaler.state_dict()``.

        ``growth_factor`` becomes ``factor`` (``backoff_factor`` must be its reciprocal),
        ``growth_interval`` becomes ``period`` and ``_growth_tracker`` becomes ``counter``.
        GradScaler has no lower bound, hence ``min_loss_scale=0`` by default.

        Examples:
            >>> import torch
            >>> scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=10)
            >>> state = DynamicLossScale.from_grad_scaler_state_dict(scaler.state_dict())
            >>> float(state.loss_scale), state.period
            (1024.0, 10)
        """
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"expected GradScaler.state_dict(), got {type(state_dict).__name__}")
        keys = ("scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker")
        missing = [k for k in keys if k not in state_dict]
        if missing:
            hint = " (a disabled GradScaler saves an empty dict)" if not state_dict else ""
            raise ValueError(
                f"GradScaler state dict is missing keys {missing}{hint}; expected {list(keys)}"
            )
        growth = _check_number("growth_factor", state_dict["growth_factor"])
        backoff = _check_number("backoff_factor", state_dict["backoff_factor"])
        if not math.isclose(growth * backoff, 1.0, rel_tol=1e-6):
            raise ValueError(
                f"backoff_factor {backoff!r} is not 1/growth_factor ({1 / growth!r}); "
                "DynamicLossScale grows and backs off by the same factor"
            )
        scale = state_dict["scale"]
        if isinstance(scale, torch.Tensor):
            scale = float(scale)
        return cls(
            scale,
            int(state_dict["_growth_tracker"]),
            period=int(state_dict["growth_interval"]),
            factor=growth,
            min_loss_scale=min_loss_scale,
            **kwargs,
        )

    def to_grad_scaler_state_dict(self) -> dict[str, Any]:
        """This state as a dict for ``torch.amp.GradScaler.load_state_dict`` (reads the tensors)."""
        return {
            "scale": float(self.loss_scale),
            "growth_factor": self.factor,
            "backoff_factor": 1.0 / self.factor,
            "growth_interval": self.period,
            "_growth_tracker": int(self.counter),
        }


LossScale = Union[NoOpLossScale, StaticLossScale, DynamicLossScale]  # noqa: UP007
_LOSS_SCALE_TYPES = (NoOpLossScale, StaticLossScale, DynamicLossScale)


def _check_loss_scale(loss_scale: Any) -> None:
    if not isinstance(loss_scale, _LOSS_SCALE_TYPES):
        raise TypeError(
            f"loss_scale must be a NoOpLossScale, StaticLossScale or DynamicLossScale, got "
            f"{loss_scale!r} of type {type(loss_scale).__name__}; for a plain number use "
            "StaticLossScale(value)"
        )


def scale_loss(loss: torch.Tensor, loss_scale: LossScale) -> torch.Tensor:
    """``loss * loss_scale``, computed in at least float32 (a float16 loss cannot overflow).

    Examples:
        >>> import torch
        >>> scale_loss(torch.tensor(3.0, dtype=torch.float16), StaticLossScale(2.0**16))
        tensor(196608.)
    """
    _check_loss_scale(loss_scale)
    if not isinstance(loss, torch.Tensor) or not loss.is_floating_point():
        raise TypeError(
            f"loss must be a floating-point tensor, got {loss!r} of type {type(loss).__name__}"
        )
    if isinstance(loss_scale, NoOpLossScale):
        return loss
    if loss.dtype in (torch.float16, torch.bfloat16):
        loss = loss.float()
    return loss * loss_scale.loss_scale


def _can_fuse(leaves: list[torch.Tensor]) -> bool:
    """Whether the eager fused kernels apply (they have no vmap rule and no derivative)."""
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return False
    if torch.is_grad_enabled() and any(x.requires_grad for x in leaves):
        return False
    return all(type(x) is torch.Tensor or type(x) is torch.nn.Parameter for x in leaves)


# The dtypes torch's fused check-and-unscale kernel implements, per device type (its CUDA
# kernel has no bfloat16); other groups take the plain-op path in _fused_unscale_.
_FUSED_UNSCALE_DTYPES: dict[str, tuple[torch.dtype, ...]] = {
    "cpu": (torch.float16, torch.bfloat16, torch.float32, torch.float64),
    "cuda": (torch.float16, torch.float32, torch.float64),
}


def _fused_unscale_(leaves: list[torch.Tensor], inv_scale: torch.Tensor) -> torch.Tensor:
    """Unscale ``leaves`` in place with torch's fused AMP kernel.

    Returns ``found_inf``: a 0-dim float32 tensor, 0 when every element was finite.
    """
    first = leaves[0]
    if all(x.dtype == first.dtype and x.device == first.device for x in leaves):
        groups = {(first.device, first.dtype): leaves}  # the common case: one group
    else:
        groups = {}
        for x in leaves:
            groups.setdefault((x.device, x.dtype), []).append(x)
    found = []
    for (device, dtype), group in groups.items():
        if dtype in _FUSED_UNSCALE_DTYPES.get(device.type, ()):
            found_inf = torch.zeros((), dtype=torch.float32, device=device)
            torch._amp_foreach_non_finite_check_and_unscale_(group, found_inf, inv_scale.to(device))
        else:  # the same in plain ops, where the kernel lacks this dtype or device type
            all_finite_ = torch.stack([torch.isfinite(x).all() for x in group]).all()
            torch._foreach_mul_(group, inv_scale.to(device))
            found_inf = torch.logical_not(all_finite_).to(torch.float32)
        found.append(found_inf)
    if len(found) == 1:
        return found[0]
    return torch.stack([f.to(found[0].device) for f in found]).sum()


def unscale_and_check(
    grads: Any, loss_scale: LossScale, *, process_group: Any = None
) -> tuple[Any, torch.Tensor]:
    """Unscale gradients and check that they are finite.

    Every floating leaf is multiplied by the float32 reciprocal of the scale and returned in
    its own dtype (float16 gradients are fine). ``grads_finite`` is a 0-dim bool tensor,
    True when every element of the scaled input was finite. ``None`` leaves stay ``None``,
    non-floating leaves pass through. Pure: the input is never modified; no host
    synchronisation. In eager mode it runs torch's fused AMP kernel on fresh buffers; under
    ``vmap``/``grad``/``torch.compile`` it uses plain tensor ops.

    Args:
        grads: a pytree of (scaled) gradients.
        loss_scale: the loss-scale state the loss was scaled with.
        process_group: a ``torch.distributed.ProcessGroup`` (e.g.
            ``torch.distributed.group.WORLD``): ``grads_finite`` is then agreed across its
            ranks (:func:`polprec.all_finite_across`), so all ranks skip together. ``None``:
            this rank's verdict only.

    Returns:
        ``(grads, grads_finite)``.

    Examples:
        >>> import torch
        >>> grads, finite = unscale_and_check({"w": torch.tensor([8.0, 4.0])}, StaticLossScale(4))
        >>> grads, finite
        ({'w': tensor([2., 1.])}, tensor(True))
    """
    if process_group is not None:  # distributed: validate before any work
        from polprec.distributed import _check_process_group, all_finite_across

        _check_process_group(process_group, "process_group")
    grads, finite = _unscale_and_check(grads, loss_scale, owned=False)
    if process_group is not None:
        finite = all_finite_across(finite, group=process_group)
    return grads, finite


def _unscale_and_check(
    grads: Any, loss_scale: LossScale, *, owned: bool
) -> tuple[Any, torch.Tensor]:
    """:func:`unscale_and_check` without the distributed option.

    ``owned=True`` unscales ``grads`` in place with the fused kernel: only for eager, fresh,
    dense, distinct gradients that the caller has just created and nobody else holds.
    """
    _check_loss_scale(loss_scale)
    leaves, spec = _tree.tree_flatten(grads)
    idx = [i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor) and x.is_floating_point()]
    floats = [leaves[i] for i in idx]
    if isinstance(loss_scale, NoOpLossScale):
        return grads, all_finite(floats)
    if not floats:
        return grads, torch.tensor(True)
    inv = torch.reciprocal(loss_scale.loss_scale)
    if owned or _can_fuse(floats):  # owned: fresh eager gradients (value_and_grad checked)
        if not owned:
            products = torch._foreach_mul(floats, inv)
            floats = [_keep_dtype(y, x.dtype) for x, y in zip(floats, products, strict=True)]
            inv = torch.ones((), dtype=torch.float32, device=floats[0].device)  # no H2D copy
        finite = _fused_unscale_(floats, inv) == 0
    else:
        finite = all_finite(floats)
        floats = [_mul(x, inv) for x in floats]
    out = list(leaves)
    for i, x in zip(idx, floats, strict=True):
        out[i] = x
    return _tree.tree_unflatten(spec, out), finite


def default_loss_scale(policy: Policy | int | str | None = None) -> LossScale:
    """``DynamicLossScale()`` when the policy involves float16, else ``NoOpLossScale()``.

    Examples:
        >>> type(default_loss_scale("16-mixed")).__name__
        'DynamicLossScale'
        >>> type(default_loss_scale("bf16-mixed")).__name__
        'NoOpLossScale'
    """
    if get_policy(policy).uses_float16:
        return DynamicLossScale()
    return NoOpLossScale()
