"""The way in from torch.optim: a polprec state from a torch optimizer's ``state_dict()``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from polprec import _tree
from polprec.optim._leaves import path_of

__all__ = ["TORCH_KEYS", "from_torch"]

#: The ``param_groups`` settings that must agree with the polprec optimizer, per class name.
TORCH_KEYS: dict[str, tuple[str, ...]] = {
    "SGD": ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize"),
    "Adam": (
        "lr",
        "betas",
        "eps",
        "weight_decay",
        "amsgrad",
        "maximize",
        "decoupled_weight_decay",
    ),
}


def _plain(value: Any) -> Any:
    """A torch setting as a Python value (torch allows tensors for lr and betas)."""
    if isinstance(value, torch.Tensor):
        return value.item()
    if isinstance(value, tuple | list):
        return tuple(_plain(v) for v in value)
    return value


def _check_groups(opt: Any, groups: Any) -> list[Any]:
    """The parameter ids of every group, after checking each group's settings against ``opt``."""
    if not isinstance(groups, list) or not groups:
        raise ValueError("state_dict['param_groups'] must be a non-empty list of groups")
    ids: list[Any] = []
    for g, group in enumerate(groups):
        for key in TORCH_KEYS[type(opt).__name__]:
            theirs = _plain(group.get(key, False if key == "decoupled_weight_decay" else None))
            mine = getattr(opt, key)
            if theirs is None or theirs != mine:
                raise ValueError(
                    f"param group {g} of the torch optimizer has {key}={theirs!r} but this "
                    f"optimizer has {key}={mine!r}; make the polprec optimizer with "
                    f"{key}={theirs!r} (polprec optimizers have one group of settings; a "
                    "schedule passes lr= to step)"
                )
        ids.extend(group["params"])
    return ids


def from_torch(
    opt: Any, state_dict: Mapping[str, Any], params: Any, *, step: int | None = None
) -> Any:
    """``opt``'s state for ``params`` holding a torch optimizer's moments and step count.

    torch numbers parameters in the order its optimizer was given them (``model.parameters()``);
    they are matched with the floating leaves of ``params`` in tree order
    (``dict(model.named_parameters())`` has the same order). Parameters torch holds no state
    for start from zero moments.
    """
    if not isinstance(state_dict, Mapping) or not {"state", "param_groups"} <= set(state_dict):
        raise TypeError(
            "state_dict must be a torch.optim optimizer's state_dict(): a mapping with keys "
            f"'state' and 'param_groups', got {type(state_dict).__name__}"
        )
    ids = _check_groups(opt, state_dict["param_groups"])
    leaves, spec = _tree.tree_flatten(params)
    floats = [i for i, p in enumerate(leaves) if _tree.is_float_tensor(p)]
    if len(ids) != len(floats):
        raise ValueError(
            f"the torch optimizer has {len(ids)} parameters but params has {len(floats)} "
            "floating leaves; build both from the same model (torch numbers parameters in the "
            "order model.parameters() gives them)"
        )
    state = opt.init(params)
    used = [n for n in opt.slot_fields if getattr(state, n) is not None]
    slots = {n: _tree.flatten_up_to(spec, getattr(state, n)) for n in used}
    steps: set[float] = set()
    torch_state = state_dict["state"]
    for pid, i in zip(ids, floats, strict=True):
        entry = torch_state.get(pid, torch_state.get(str(pid)))
        if entry is None:
            continue
        for name, leaf_list in slots.items():
            value = entry.get(name)
            if value is None:
                continue
            if tuple(value.shape) != tuple(leaves[i].shape):
                raise ValueError(
                    f"torch's {name} of parameter {pid} has shape {tuple(value.shape)} but "
                    f"{path_of(params, i)} has shape {tuple(leaves[i].shape)}: are params "
                    "in the order the torch optimizer was given them?"
                )
            target = leaf_list[i]
            leaf_list[i] = value.detach().to(target.device, target.dtype, copy=True)
        if "step" in entry:
            steps.add(float(_plain(entry["step"])))
    if step is None:
        if len(steps) > 1:
            raise ValueError(
                f"the torch optimizer's parameters have taken different numbers of steps "
                f"{sorted(steps)}; a polprec state has one step count: pass step="
            )
        had_buffers = any(pid in torch_state or str(pid) in torch_state for pid in ids)
        step = int(steps.pop()) if steps else int(had_buffers and bool(slots))
    count = torch.tensor(step, dtype=torch.int32, device=state.step.device)
    return state.replace(step=count, **{n: _tree.tree_unflatten(spec, s) for n, s in slots.items()})
