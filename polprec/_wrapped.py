"""Refusing modules wrapped by torch's distributed engine (FSDP2, DDP, FSDP1).

:func:`polprec.apply_with_policy` calls a module with the tensors it is given in place of the
module's own. A module wrapped by torch's engine does not compute with those: FSDP2
(``fully_shard``, also under a root that is not sharded itself) all-gathers its own sharded
parameters in a forward hook and computes with them, so every gradient with respect to the
given tensors is zero; ``DistributedDataParallel`` averages gradients in hooks on its own
parameters, so the given tensors' gradients are not averaged and the ranks drift apart.
Neither raises. :func:`refuse_wrapped` turns both into a ``TypeError`` naming the two routes
that work.

The verdict for a module is kept (weakly) with the module and reused while nothing could
have changed it: a module enters a tree through ``register_module``/``setattr`` (counted by a
global registration hook, installed on the first check) or becomes FSDP2's through
``fully_shard`` (which records it in torch's composable-state table, whose size is compared).
The check of a module already seen is two dictionary lookups.
"""

from __future__ import annotations

import sys
import weakref
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

__all__ = ["refuse_wrapped"]

# FSDP's classes, once torch.distributed.fsdp is imported (importing it here would add half
# a second to `import polprec`; until it is imported, no module can be FSDP's):
# (FSDPModule, FullyShardedDataParallel, torch's table of modules with composable state).
_FSDP: list[tuple[type[Any], type[Any], Any]] = []
# Submodules registered anywhere since the hook was installed (a list: updated in place).
_REGISTERED = [0]
_HOOK: list[Any] = []
# module -> the generation at which it and its submodules were found unwrapped
_CLEAN: weakref.WeakKeyDictionary[nn.Module, tuple[int, int]] = weakref.WeakKeyDictionary()


def _count_registration(parent: nn.Module, name: str, child: nn.Module | None) -> None:
    _REGISTERED[0] += 1


def _wrappers() -> tuple[type[Any], ...]:
    """The wrapper classes that can exist by now."""
    if not _FSDP:
        fsdp = sys.modules.get("torch.distributed.fsdp")
        states = sys.modules.get("torch.distributed._composable_state")
        if fsdp is None or states is None:
            return (DistributedDataParallel,)
        table = states._module_state_mapping  # noqa: SLF001 (torch's, filled by fully_shard)
        _FSDP.append((fsdp.FSDPModule, fsdp.FullyShardedDataParallel, table))
    fsdp2, fsdp1, _ = _FSDP[0]
    return (DistributedDataParallel, fsdp2, fsdp1)


def _generation() -> tuple[int, int]:
    """What changes whenever a module may have become, or gained, a wrapped submodule."""
    return _REGISTERED[0], len(_FSDP[0][2]) if _FSDP else 0


#: The wrapper classes by name, for the check while tracing (see refuse_wrapped).
_WRAPPER_NAMES = frozenset({"DistributedDataParallel", "FSDPModule", "FullyShardedDataParallel"})


def _traced_check(module: nn.Module) -> None:
    """The check while ``torch.compile`` traces: by the names in each class's MRO, which the
    traced graph holds as constants, so that no global the eager check fills in (``_FSDP``)
    becomes a guard that recompiles the step once it is filled."""
    for path, sub in module.named_modules(remove_duplicate=False):
        if any(c.__name__ in _WRAPPER_NAMES for c in type(sub).__mro__):
            raise TypeError(_message(module, path, sub))


def refuse_wrapped(module: nn.Module) -> None:
    """Raise a ``TypeError`` if ``module`` or a submodule is a DDP, FSDP2 or FSDP module."""
    if torch.compiler.is_compiling():
        _traced_check(module)
        return
    wrappers = _wrappers()
    if isinstance(module, wrappers):  # checked on every call: wrapping the root is common
        raise TypeError(_message(module, "", module))
    if not _HOOK:
        _HOOK.append(
            nn.modules.module.register_module_module_registration_hook(_count_registration)
        )
    generation = _generation()
    if _CLEAN.get(module) == generation:
        return
    _check_submodules(module, wrappers)
    _CLEAN[module] = generation


def _check_submodules(module: nn.Module, wrappers: tuple[type[Any], ...]) -> None:
    for path, sub in module.named_modules(remove_duplicate=False):
        if path and isinstance(sub, wrappers):
            raise TypeError(_message(module, path, sub))


def _kind(wrapper: nn.Module) -> tuple[str, str]:
    """What ``wrapper`` is, and why ``apply_with_policy``'s tensors would go unused."""
    if isinstance(wrapper, DistributedDataParallel):
        return (
            "a DistributedDataParallel module",
            "DDP averages gradients across ranks in hooks on its own parameters, so the "
            "gradients of the tensors you pass would not be averaged and the ranks would "
            "drift apart",
        )
    fsdp2 = any(c.__name__ == "FSDPModule" for c in type(wrapper).__mro__)
    return (
        "an FSDP2 module (fully_shard)" if fsdp2 else "a FullyShardedDataParallel (FSDP1) module",
        "FSDP all-gathers its own sharded parameters before each forward and computes with "
        "them instead of the tensors you pass, so every gradient would be zero",
    )


def _message(module: nn.Module, path: str, wrapper: nn.Module) -> str:
    kind, why = _kind(wrapper)
    name = type(module).__name__
    if path:
        where = f"apply_with_policy got a {name} whose submodule {path!r} is {kind}"
    else:
        where = f"apply_with_policy got {kind}" + ("" if name in kind else f" ({name})")
    return (
        f"{where}: {why}. Two routes work instead. (a) DTensor params: keep the module "
        "unwrapped and pass params whose leaves are torch.distributed.tensor.DTensor "
        "(distribute_tensor(p, mesh, [Replicate()]) for DDP, [Shard(0)] for FSDP) to "
        "apply_with_policy or value_and_grad. (b) torch's module route: call the wrapped "
        "module itself and backward() its scaled loss (fully_shard(..., mp_policy="
        "pp.to_fsdp_mixed_precision(policy)) for FSDP2), then pp.unscale_and_check, "
        "pp.clip_by_global_norm and the optimizer's step(..., donate=True) on the "
        "parameters' .grad tensors"
    )
