"""torch.optim and polprec: a polprec state from a torch optimizer's ``state_dict()``, and
polprec's gradients handed to a fused torch optimizer that skips without a host sync."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from polprec import _fused, _tree
from polprec._checks import check_grads_finite
from polprec.optim._plan import Flat, active

__all__ = ["check_group", "from_torch", "step_torch"]


def _plain(value: Any) -> Any:
    """A torch setting as a Python value (torch allows tensors for lr and betas)."""
    if isinstance(value, torch.Tensor):
        return value.item()
    if isinstance(value, tuple | list):
        return tuple(_plain(v) for v in value)
    return value


def check_group(opt: Any, group: Any, g: int, hint: str) -> list[Any]:
    """The parameter ids of torch's param group ``g``, after checking its settings against
    ``opt``'s (the settings torch has under the same names)."""
    if not isinstance(group, dict) or "params" not in group:
        raise ValueError(
            f"param group {g} of the torch optimizer must be a dict with a 'params' list, got "
            f"{group!r}"
        )
    for key in opt.torch_settings():
        theirs = _plain(group.get(key, False if key == "decoupled_weight_decay" else None))
        mine = getattr(opt, key)
        if theirs is None or theirs != mine:
            raise ValueError(
                f"param group {g} of the torch optimizer has {key}={theirs!r} but this "
                f"optimizer has {key}={mine!r}; make the polprec optimizer with "
                f"{key}={theirs!r} ({hint})"
            )
    return list(group["params"])


def _check_groups(opt: Any, groups: Any) -> list[Any]:
    """The parameter ids of every group, after checking each group's settings against ``opt``."""
    if not isinstance(groups, list) or not groups:
        raise ValueError("state_dict['param_groups'] must be a non-empty list of groups")
    hint = (
        "a polprec optimizer has one group of settings; a schedule passes lr_scale= to step, "
        "and pp.optim.partition gives each torch param group its own optimizer"
    )
    return [pid for g, group in enumerate(groups) for pid in check_group(opt, group, g, hint)]


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
    return from_torch_ids(opt, state_dict, ids, params, step=step)


def from_torch_ids(
    opt: Any, state_dict: Mapping[str, Any], ids: list[Any], params: Any, *, step: int | None
) -> Any:
    """``opt``'s state for ``params`` from torch's state of the parameters ``ids`` (in order)."""
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
                    f"{_path_of(params, i)} has shape {tuple(leaves[i].shape)}: are params "
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


def _path_of(tree: Any, index: int) -> str:
    """The readable path of the ``index``-th leaf of ``tree`` (for error messages only)."""
    paths, _, _ = _tree.tree_flatten_with_path(tree)
    return _tree.path_str(paths[index])


def _check_optimizer(optimizer: Any) -> None:
    """A torch optimizer that can skip a step from a tensor flag, without reading it."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}; "
            "polprec's own optimizers take grads_finite= in their step"
        )
    name = type(optimizer).__name__
    if not _fused.skips_in_step(optimizer):
        fused = [group.get("fused") for group in optimizer.param_groups]
        groups = fused[0] if len(set(fused)) == 1 else f"{fused} in its param groups"
        raise ValueError(
            f"{name}(fused={groups}) cannot skip a step without a host sync: only a fused "
            "kernel reads the finite flag on the device; any other torch optimizer skips by "
            "not calling step(), which needs the flag on the host (what GradScaler.step "
            "does). Build it with fused=True (torch.optim.SGD, Adam, AdamW and Adagrad take "
            "it), or use pp.optim"
        )
    if hasattr(optimizer, "found_inf") or hasattr(optimizer, "grad_scale"):
        raise ValueError(
            f"{name} already has a found_inf or grad_scale attribute (a GradScaler step in "
            "progress?); step_torch sets and removes them itself"
        )


def _first_sgd_buffers(optimizer: Any, with_grad: list[Any]) -> None:
    """Zero momentum buffers where a fused SGD has none yet (checked before anything moves).

    torch's fused SGD decides on the host that a step is the first (every buffer missing),
    then makes the buffers with ``empty_like`` and sets them to the gradient in the kernel;
    a skipped first step leaves them uninitialised. Without dampening a zero buffer gives
    that first step's result exactly and stays zero when the step is skipped.
    """
    if not isinstance(optimizer, torch.optim.SGD):
        return
    missing = []
    for group in optimizer.param_groups:
        if group["momentum"] == 0:
            continue
        held = {id(p) for p in group["params"]}
        for p in with_grad:
            if id(p) in held and optimizer.state.get(p, {}).get("momentum_buffer") is None:
                if group["dampening"] != 0:
                    raise ValueError(
                        f"SGD(fused=True, momentum={group['momentum']}, dampening="
                        f"{group['dampening']}) cannot skip its first step without a host "
                        "sync: torch sets the momentum buffers to the gradient on the first "
                        "step (decided on the host) and leaves them uninitialised when it is "
                        "skipped, and with dampening no zero buffer gives the same step; take "
                        "the first step with `if finite: optimizer.step()`, or use pp.optim.sgd"
                    )
                missing.append(p)
    for p in missing:
        optimizer.state[p]["momentum_buffer"] = torch.zeros_like(p.detach())


def step_torch(
    optimizer: torch.optim.Optimizer,
    params: Any,
    grads: Any,
    *,
    grads_finite: torch.Tensor | bool,
) -> None:
    """Step a fused ``torch.optim`` optimizer with polprec's gradients, skipping on the device.

    For a migration that keeps its torch optimizer: each parameter's ``.grad`` becomes its
    gradient from ``grads`` (the tensor itself, as after ``backward()``; ``None`` leaves the
    parameter out of the step), and ``optimizer.step()`` runs with the two attributes
    ``GradScaler.step`` gives a fused optimizer: ``found_inf`` (``grads_finite`` negated, a
    float32 tensor) and ``grad_scale=None`` (polprec's gradients are unscaled already). The
    fused kernels skip the update inside the kernel when ``found_inf`` is 1 (Adam's step
    counts are put back), so nothing is read back to the host: the same trajectory as
    ``scaler.step(optimizer)``, without its ``.item()``. The attributes are removed afterwards.

    Unlike polprec's functions this one changes its arguments, by design: the torch
    optimizer's state and the parameters are updated in place, and their ``.grad`` set.
    ``grads`` and ``grads_finite`` are left as they are.

    One difference from GradScaler: a fused SGD with momentum whose first step is skipped
    keeps zero momentum buffers (they are made here, before that first step; torch leaves
    them uninitialised). With dampening it is refused at the first step (see Raises).

    Args:
        optimizer: a torch optimizer built with ``fused=True`` (``torch.optim.SGD``,
            ``Adam``, ``AdamW``, ``Adagrad``), every param group fused.
        params: the optimizer's own parameters as a tree, e.g.
            ``dict(model.named_parameters())``; it must name every parameter the optimizer
            holds (so no stale ``.grad`` is stepped).
        grads: gradients with the structure of ``params``, each in its parameter's dtype
            and device, e.g. from :func:`polprec.value_and_grad` on detached copies of
            ``params`` (and clipped with :func:`polprec.clip_by_global_norm`).
        grads_finite: the 0-dim bool tensor from :func:`polprec.value_and_grad` (or a bool):
            when False, parameters and optimizer state are left as they were.

    Raises:
        TypeError: ``optimizer`` is not a torch optimizer, or a gradient is not a floating
            tensor or ``None``.
        ValueError: ``optimizer`` is not fused (a skip would need a host sync), a fused SGD
            with momentum and dampening is at its first step, ``params`` holds a tensor the
            optimizer does not (a detached copy) or misses one it does, or a gradient's
            shape, dtype or device is not its parameter's.

    Examples:
        >>> import torch
        >>> import polprec as pp
        >>> model = torch.nn.Linear(2, 1)
        >>> optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
        >>> params = dict(model.named_parameters())
        >>> grads = {k: torch.ones_like(p) for k, p in params.items()}
        >>> before = model.bias.detach().clone()
        >>> pp.optim.step_torch(optimizer, params, grads, grads_finite=torch.tensor(False))
        >>> torch.equal(model.bias, before), float(optimizer.state[model.bias]["step"])
        (True, 0.0)
        >>> pp.optim.step_torch(optimizer, params, grads, grads_finite=torch.tensor(True))
        >>> float(optimizer.state[model.bias]["step"]), hasattr(optimizer, "found_inf")
        (1.0, False)
    """
    _check_optimizer(optimizer)
    if isinstance(params, torch.nn.Module):
        raise TypeError(
            f"params must be the optimizer's parameters by name, got the module "
            f"{type(params).__name__} itself; pass dict(model.named_parameters())"
        )
    _tree.check_tree(params, "params")
    _tree.check_tree(grads, "grads")
    finite = check_grads_finite(grads_finite)
    flat = Flat(params, grads)
    held = {id(p): p for group in optimizer.param_groups for p in group["params"]}
    named: set[int] = set()
    with_grad: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
    for i, p in enumerate(flat.leaves):
        if not isinstance(p, torch.Tensor):
            continue
        if id(p) not in held:
            raise ValueError(
                f"params has a tensor at {flat.name(i)} that {type(optimizer).__name__} "
                "does not hold; pass the parameters it was built with, "
                "dict(model.named_parameters()), not detached copies"
            )
        named.add(id(p))
        with_grad.setdefault(id(p), (p, None))
    for i in active(flat):
        p, g = flat.leaves[i], flat.grads[i]
        if (g.dtype, g.device) != (p.dtype, p.device):
            raise ValueError(
                f"the gradient of {flat.name(i)} is {g.dtype} on {g.device} but the "
                f"parameter is {p.dtype} on {p.device}; torch.optim needs each gradient in "
                "its parameter's dtype and device (value_and_grad returns them so)"
            )
        if with_grad[id(p)][1] is None:
            with_grad[id(p)] = (p, g)
    if len(named) != len(held):
        raise ValueError(
            f"params names {len(named)} of the {len(held)} parameters "
            f"{type(optimizer).__name__} holds; name them all (dict(model.named_parameters())) "
            "so that no stale .grad is stepped"
        )
    _first_sgd_buffers(optimizer, [p for p, grad in with_grad.values() if grad is not None])
    for p, grad in with_grad.values():
        p.grad = grad
    _fused.step_skipping(optimizer, torch.logical_not(finite).to(torch.float32))
