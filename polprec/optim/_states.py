"""Optimizer states: pytrees of tensors (counters, moments, master copies, compensation).

Every tree-valued field has the structure of the parameters, with ``None`` where a leaf has
no such state (a non-floating leaf, a moment the options do not use, a float32 parameter
that needs no master copy). A field the options do not use at all is ``None``. The states
hold no settings: those live on the optimizer, which checks that a state fits it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

import torch

from polprec._state import State, check_state_dict

__all__ = ["COUNTERS", "AdamState", "OptState", "PartitionState", "SGDState", "state_class"]

_S = TypeVar("_S", bound="OptState")

#: The counters every optimizer state starts with.
COUNTERS = ("step", "skips", "consecutive_skips")


@dataclasses.dataclass(frozen=True, eq=False)
class OptState(State):
    """What every polprec optimizer state holds.

    Attributes:
        step: int32 0-dim tensor, the number of updates applied (skipped steps not counted).
        skips: int32 0-dim tensor, the number of steps skipped because ``grads_finite`` was
            False.
        consecutive_skips: int32 0-dim tensor, skips since the last applied update (optax's
            ``apply_if_finite`` keeps the same count).
        master: float32 master copies of 16-bit parameters (``master_weights``), or ``None``.
        compensation: Kahan compensation buffers in each 16-bit parameter's dtype
            (``kahan=True``), or ``None``.
        seed: int64 0-dim tensor seeding stochastic rounding (``rounding="stochastic"``), or
            ``None``. The random bits of a step are a hash of the seed, :attr:`step` and the
            element's position: the same state gives the same result, bit for bit.
    """

    step: torch.Tensor
    skips: torch.Tensor
    consecutive_skips: torch.Tensor
    master: Any
    compensation: Any
    seed: torch.Tensor | None

    def __post_init__(self) -> None:
        for name in COUNTERS:
            value = getattr(self, name)
            if not isinstance(value, torch.Tensor) or value.is_floating_point():
                raise TypeError(
                    f"{type(self).__name__}.{name} must be an integer tensor, got {value!r}"
                )
        if self.seed is not None and not isinstance(self.seed, torch.Tensor):
            raise TypeError(f"{type(self).__name__}.seed must be a tensor or None")

    def replace(self: _S, **children: Any) -> _S:
        """A copy with some children replaced (unchecked, like a pytree rebuild)."""
        return self._replace(**children)


@dataclasses.dataclass(frozen=True, eq=False)
class SGDState(OptState):
    """The state of :func:`~polprec.optim.sgd`: counters and, with momentum, the buffers.

    Attributes:
        momentum_buffer: torch's ``momentum_buffer`` per parameter (zeros before the first
            step), or ``None`` without momentum.
    """

    momentum_buffer: Any


@dataclasses.dataclass(frozen=True, eq=False)
class AdamState(OptState):
    """The state of :func:`~polprec.optim.adam` and :func:`~polprec.optim.adamw`.

    Attributes:
        exp_avg: first moments (torch's ``exp_avg``).
        exp_avg_sq: second moments (torch's ``exp_avg_sq``).
        max_exp_avg_sq: running maxima of the second moments with ``amsgrad=True``, else
            ``None``.
    """

    exp_avg: Any
    exp_avg_sq: Any
    max_exp_avg_sq: Any


@dataclasses.dataclass(frozen=True, eq=False)
class PartitionState(OptState):
    """The state of :func:`~polprec.optim.partition`: the counters, and each label's state.

    Attributes:
        states: each label's optimizer state by label, in the order of the partition's
            optimizers. Their trees have the structure of the parameters, with ``None`` at the
            leaves of other labels; their counters are the partition's own.

    ``master``, ``compensation`` and ``seed`` are ``None``: they live in the labels' states.
    """

    states: dict[str, OptState]

    def state_dict(self) -> dict[str, Any]:
        """Tensors and settings as nested dicts that survive ``torch.load(weights_only=True)``."""
        return {
            "type": type(self).__name__,
            **{n: getattr(self, n).detach().clone() for n in COUNTERS},
            "states": {label: s.state_dict() for label, s in self.states.items()},
        }

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, Any]) -> PartitionState:
        """Rebuild a partition's state from :meth:`state_dict`'s output (validated)."""
        check_state_dict(cls, state_dict, {"states", *COUNTERS})
        inner = state_dict["states"]
        if not isinstance(inner, Mapping):
            raise TypeError(f"state_dict['states'] must be a mapping by label, got {inner!r}")
        counters = {n: state_dict[n] for n in COUNTERS}
        states = {
            label: state_class(sd).from_state_dict(sd).replace(**counters)
            for label, sd in inner.items()
        }
        return cls(master=None, compensation=None, seed=None, states=states, **counters)


def state_class(state_dict: Mapping[str, Any]) -> type[OptState]:
    """The optimizer-state class a ``state_dict()`` was made by (its ``"type"``)."""
    kinds = {c.__name__: c for c in (SGDState, AdamState, PartitionState)}
    kind = state_dict.get("type") if isinstance(state_dict, Mapping) else None
    if kind not in kinds:
        raise ValueError(
            f"not an optimizer state's state_dict(): its 'type' is {kind!r}, expected one of "
            f"{sorted(kinds)}"
        )
    return kinds[kind]
