"""Parameter groups: one optimizer per label, as optax's ``multi_transform`` and torch.optim's
param groups."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from polprec import _tree
from polprec._checks import check_int
from polprec.optim import _engine
from polprec.optim._base import Optimizer
from polprec.optim._plan import Flat, Plan
from polprec.optim._precision import check_bool
from polprec.optim._states import COUNTERS, PartitionState
from polprec.optim._torch import check_group, from_torch_ids

__all__ = ["Partition", "partition"]

LabelFn = Callable[[str, torch.Tensor], str]


class Partition:
    """Several optimizers over one parameter tree, each updating the leaves of its label.

    Made by :func:`partition`, which documents it. Steps as one optimizer: one plan, each
    label's groups on their own fused path, one skip decision and one set of counters.
    """

    def __init__(self, optimizers: Mapping[str, Optimizer], labels: Any) -> None:
        if not isinstance(optimizers, Mapping) or not optimizers:
            raise TypeError(
                "optimizers must be a non-empty dict from label to a polprec optimizer, e.g. "
                "{'decay': pp.optim.adamw(3e-4), 'no_decay': pp.optim.adamw(3e-4, "
                f"weight_decay=0.0)}}, got {optimizers!r}"
            )
        for label, opt in optimizers.items():
            if not isinstance(label, str):
                raise TypeError(f"the labels of optimizers must be str, got {label!r}")
            if not isinstance(opt, Optimizer):
                raise TypeError(
                    f"optimizers[{label!r}] must be a polprec optimizer (pp.optim.sgd, adam, "
                    f"adamw, ...), got {opt!r} of type {type(opt).__name__}"
                )
        _tree.check_tree(labels, "labels")  # (a function passes; a module is refused)
        self.optimizers: dict[str, Optimizer] = dict(optimizers)
        self.labels = labels
        self._names = tuple(self.optimizers)
        self._members = tuple(self.optimizers.values())
        self._index = {name: m for m, name in enumerate(self._names)}
        self._plans: dict[Any, Plan] = {}

    def __repr__(self) -> str:
        labels = getattr(self.labels, "__name__", None)  # a function by its name
        return f"partition({self.optimizers!r}, labels={labels or self.labels!r})"

    # --- labels

    def _assign(self, flat: Flat, dotted: list[str]) -> list[int | None]:
        """Each leaf's optimizer (its label's position); ``None`` for non-floating leaves."""
        if callable(self.labels):
            given = [
                self.labels(path, p) if _tree.is_float_tensor(p) else None
                for path, p in zip(dotted, flat.leaves, strict=True)
            ]
        else:
            given = flat.align(self.labels, "labels")
        out: list[int | None] = []
        for i, (label, p) in enumerate(zip(given, flat.leaves, strict=True)):
            if not _tree.is_float_tensor(p):
                out.append(None)
                continue
            m = self._index.get(label) if isinstance(label, str) else None
            if m is None:
                raise ValueError(
                    f"labels gives {label!r} for parameter {flat.name(i)}; every floating "
                    f"parameter needs one of the labels of optimizers: {list(self._names)}"
                )
            out.append(m)
        return out

    # --- init, step

    def init(self, params: Any, *, seed: int = 0) -> PartitionState:
        """A fresh state: each label's optimizer's state for its leaves, counters at 0.

        Args:
            params: the parameter pytree the steps will update.
            seed: seeds stochastic rounding; every label's leaves round as they would under
                a single optimizer with this seed.
        """
        seed = check_int("seed", seed, minimum=0)
        _tree.check_tree(params, "params")
        flat = Flat.of(params)
        label_of = self._assign(flat, flat.dotted())
        spec = _tree.tree_structure(params)
        count = _engine.zero_count(flat.leaves)
        counters = {"step": count, "skips": count.clone(), "consecutive_skips": count.clone()}
        states = {}
        for m, (name, opt) in enumerate(self.optimizers.items()):
            floats = [p if label_of[i] == m else None for i, p in enumerate(flat.leaves)]
            states[name] = _engine.init_state(opt, spec, floats, count, seed).replace(**counters)
        return PartitionState(master=None, compensation=None, seed=None, states=states, **counters)

    def step(
        self,
        params: Any,
        grads: Any,
        state: PartitionState,
        *,
        grads_finite: torch.Tensor | bool | None = None,
        lr_scale: float | torch.Tensor | None = None,
        donate: bool = False,
    ) -> tuple[Any, PartitionState]:
        """One update of every label's leaves: ``(params, grads, state) -> (params, state)``.

        As :meth:`polprec.optim.Optimizer.step`, with ``lr_scale`` multiplying each label's
        own ``lr`` (``lr_scale=schedule(state.step)``). Parameters come back with the
        structure and key order of ``params``; one skip decision covers every label.
        """
        if type(state) is not PartitionState:
            raise TypeError(
                f"state must be the PartitionState this partition's init(params) makes, got "
                f"{type(state).__name__}"
            )
        if tuple(state.states) != self._names:
            raise ValueError(
                f"state holds the labels {list(state.states)} but this partition has "
                f"{list(self._names)}; make the state with this partition's init(params)"
            )
        check_bool("donate", donate)
        rates = tuple(_engine.learning_rate(opt.lr, lr_scale) for opt in self._members)
        inner = tuple(state.states.values())
        for opt, sub, name in zip(self._members, inner, self._names, strict=True):
            if type(sub) is not opt.state_type:
                raise TypeError(
                    f"state.states[{name!r}] is a {type(sub).__name__}, but that label's "
                    f"optimizer makes a {opt.state_type.__name__}"
                )
        new_params, new_inner, (count, skips, consecutive) = _engine.step(
            self._plans,
            self._members,
            self._assign,
            params,
            grads,
            inner,
            state,
            grads_finite,
            rates,
            donate,
        )
        new_state = state.replace(
            step=count,
            skips=skips,
            consecutive_skips=consecutive,
            states=dict(zip(self._names, new_inner, strict=True)),
        )
        return new_params, new_state

    def from_torch_state_dict(
        self, state_dict: Mapping[str, Any], params: Any, *, step: int | None = None
    ) -> PartitionState:
        """This partition's state from a torch optimizer with one param group per label.

        torch's param group ``i`` maps to the ``i``-th label of ``optimizers``: its settings
        must equal that label's optimizer's, and its parameters, in order, are that label's
        floating leaves of ``params`` in tree order (so build the torch groups from the same
        split). Otherwise as :meth:`polprec.optim.Optimizer.from_torch_state_dict`.
        """
        if not isinstance(state_dict, Mapping) or not {"state", "param_groups"} <= set(state_dict):
            raise TypeError(
                "state_dict must be a torch.optim optimizer's state_dict(): a mapping with keys "
                f"'state' and 'param_groups', got {type(state_dict).__name__}"
            )
        groups = state_dict["param_groups"]
        if not isinstance(groups, list) or len(groups) != len(self._names):
            count = len(groups) if isinstance(groups, list) else groups
            raise ValueError(
                f"the torch optimizer has {count} param groups but this partition has "
                f"{len(self._names)} labels {list(self._names)}; torch's group i maps to the "
                "i-th label"
            )
        _tree.check_tree(params, "params")
        flat = Flat.of(params)
        label_of = self._assign(flat, flat.dotted())
        spec = _tree.tree_structure(params)
        states = {}
        for m, (name, opt) in enumerate(self.optimizers.items()):
            hint = f"torch's param group {m} maps to the label {name!r}"
            ids = check_group(opt, groups[m], m, hint)
            mine = [p if label_of[i] == m else None for i, p in enumerate(flat.leaves)]
            masked = _tree.tree_unflatten(spec, mine)
            states[name] = from_torch_ids(opt, state_dict, ids, masked, step=step)
        steps = {int(s.step) for s in states.values()}
        if len(steps) > 1:
            raise ValueError(
                f"the torch optimizer's param groups have taken different numbers of steps "
                f"{sorted(steps)}; a partition has one step count: pass step="
            )
        first = next(iter(states.values()))
        counters = {n: getattr(first, n) for n in COUNTERS}
        states = {name: s.replace(**counters) for name, s in states.items()}
        return PartitionState(master=None, compensation=None, seed=None, states=states, **counters)


def partition(optimizers: Mapping[str, Optimizer], labels: Any | LabelFn) -> Partition:
    """One optimizer per label: AdamW that decays 2-D weights only, or other param groups.

    optax's ``multi_transform`` and torch.optim's param groups, pure. ``labels`` says which
    optimizer updates each floating leaf of the parameters: a tree of label strings shaped
    like the params, or a function ``(path, leaf) -> label`` of each leaf's dotted key path
    (``"blocks.0.ln_1.weight"``) and the leaf. The result has the optimizers' ``init``,
    ``step`` (with ``lr_scale=`` for a schedule that drives every label's own ``lr``) and
    ``from_torch_state_dict`` (torch's param group ``i`` is the ``i``-th label); its state,
    a :class:`~polprec.optim.PartitionState`, has the ``step``, ``skips`` and
    ``consecutive_skips`` counters of every optimizer state and ``state_dict()``. Parameters
    come back with the input's structure and key order; each label's leaves run on its own
    fused kernel in eager mode; one skip decision covers all of them. Stochastic rounding
    gives every leaf the bits it would get under a single optimizer with the same seed.

    Args:
        optimizers: label -> polprec optimizer (its ``lr`` and settings for that group).
        labels: a tree of labels shaped like ``params``, or ``(path, leaf) -> label``.

    Examples:
        >>> import torch
        >>> import polprec as pp
        >>> opt = pp.optim.partition(
        ...     {"decay": pp.optim.adamw(0.1), "no_decay": pp.optim.adamw(0.1, weight_decay=0.0)},
        ...     lambda path, leaf: "decay" if leaf.dim() >= 2 else "no_decay",
        ... )
        >>> params = {"w": torch.ones(2, 2), "b": torch.ones(2)}
        >>> state = opt.init(params)
        >>> zeros = {k: torch.zeros_like(v) for k, v in params.items()}
        >>> params, state = opt.step(params, zeros, state)
        >>> params["w"][0, 0], params["b"][0], int(state.step)  # only w decays
        (tensor(0.9990), tensor(1.), 1)
    """
    return Partition(optimizers, labels)
