"""Distributed training: one finiteness verdict for all ranks, and policies for FSDP2.

With data parallelism each rank checks its own gradients (or its own shard of them). If one
rank sees an overflow and another does not, the ranks would take different branches of
``select_tree`` and different loss-scale updates, and drift apart for good.
:func:`all_finite_across` agrees on the flag with one all-reduce, so every rank skips the
step and backs off the scale together; :func:`polprec.unscale_and_check` and
:func:`polprec.value_and_grad` do it for you when given ``process_group=``.

:func:`to_fsdp_mixed_precision` turns a :class:`~polprec.Policy` into the
``MixedPrecisionPolicy`` that ``torch.distributed.fsdp.fully_shard`` (FSDP2) takes.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.distributed as dist

from polprec import _fused
from polprec._catalogue import HALF_DTYPES
from polprec._checks import check_grads_finite
from polprec.policy import PolicySpec, get_policy, parse_dtype

if dist.is_available():  # the functional collectives that torch.compile traces
    from torch.distributed import _functional_collectives as funcol

if TYPE_CHECKING:
    from torch.distributed.fsdp import MixedPrecisionPolicy

__all__ = ["all_finite_across", "to_fsdp_mixed_precision"]


def check_process_group(group: Any, name: str) -> None:
    """Raise unless ``group`` is ``None`` or a ``ProcessGroup`` of a usable torch.distributed."""
    if not dist.is_available():
        raise RuntimeError(
            f"{name} needs torch.distributed, which this build of torch does not include "
            "(torch.distributed.is_available() is False)"
        )
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise TypeError(
            f"{name} must be a torch.distributed.ProcessGroup (e.g. torch.distributed.group"
            f".WORLD or one from torch.distributed.new_group), got {group!r} of type "
            f"{type(group).__name__}"
        )


def all_finite_across(grads_finite: torch.Tensor | bool, *, group: Any = None) -> torch.Tensor:
    """True on every rank only when ``grads_finite`` is True on every rank of ``group``.

    One all-reduce (MIN) of the flag as an int32 tensor on the flag's device; the input is
    not modified and nothing is read back to the host (with NCCL the flag must be on the
    rank's CUDA device, where ``unscale_and_check`` puts it for CUDA gradients). Every rank
    of the group must call it, as with any collective. Under ``torch.compile`` it uses
    torch's functional all-reduce, which traces with ``fullgraph=True``. Not supported under
    ``vmap``: a collective cannot run once per batch member.

    A DTensor flag (e.g. ``torch.isfinite(g).all()`` of a sharded gradient ``g``, whose
    placement is ``Partial``) is first resolved to its global value, as ``full_tensor()``
    does; the result is always a plain tensor.

    Args:
        grads_finite: this rank's 0-dim bool flag, e.g. from :func:`polprec.unscale_and_check`
            or :func:`polprec.all_finite`, a plain tensor or a DTensor.
        group: the process group to agree within; ``None`` means all ranks (the default
            group), as in ``torch.distributed``.

    Returns:
        A 0-dim bool tensor, the same on every rank of ``group``.

    Raises:
        TypeError: ``grads_finite`` is not a bool tensor or bool, or ``group`` is not a
            ``ProcessGroup``.
        ValueError: ``grads_finite`` is not 0-dim or not of dtype ``torch.bool``.
        RuntimeError: torch.distributed is unavailable or its default group is not
            initialised, or the call is inside ``vmap``/``torch.func.grad``.

    Examples:
        On each rank of a two-rank job (``torchrun --nproc_per_node=2``)::

            grads, finite = pp.unscale_and_check(grads, loss_scale)  # rank 1 overflowed
            finite = pp.all_finite_across(finite)  # tensor(False) on both ranks
    """
    flag = check_grads_finite(grads_finite)
    check_process_group(group, "group")
    if not dist.is_initialized():
        raise RuntimeError(
            "all_finite_across needs an initialised torch.distributed default group: call "
            "torch.distributed.init_process_group(...) first (torchrun sets the environment "
            "it reads)"
        )
    if _fused.transforms_active() and not torch.compiler.is_compiling():
        raise RuntimeError(
            "all_finite_across cannot run inside vmap/grad transforms: a collective runs "
            "once per rank, not once per batch member; agree on the flag outside the transform"
        )
    flag = flag.to(torch.int32)  # a fresh tensor: the collective may write into it
    if torch.compiler.is_compiling():
        world = cast(dist.ProcessGroup, dist.group.WORLD)  # set: initialised above
        reduced: torch.Tensor = funcol.all_reduce(flag, "min", world if group is None else group)
        return reduced.to(torch.bool)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    return flag.to(torch.bool)


def _mixed_precision_policy_class() -> type[MixedPrecisionPolicy]:
    # torch >= 2.6 exports FSDP2 publicly; 2.4 and 2.5 ship it under its prototype name.
    for module in ("torch.distributed.fsdp", "torch.distributed._composable.fsdp"):
        try:
            cls: type[MixedPrecisionPolicy] = importlib.import_module(module).MixedPrecisionPolicy
        except (ImportError, AttributeError):
            continue
        return cls
    raise RuntimeError(
        "to_fsdp_mixed_precision needs FSDP2 (torch.distributed.fsdp.MixedPrecisionPolicy and "
        f"fully_shard); this torch {torch.__version__} has no FSDP2"
        + ("" if dist.is_available() else " (torch.distributed is not available)")
    )


def to_fsdp_mixed_precision(
    policy: PolicySpec = None,
    *,
    reduce_dtype: torch.dtype | str | None = None,
    root: bool = True,
    cast_forward_inputs: bool = True,
) -> MixedPrecisionPolicy:
    """The FSDP2 ``MixedPrecisionPolicy`` that carries out ``policy``.

    ``param_dtype`` (FSDP's dtype of the unsharded parameters, hence of forward and
    backward compute) is the policy's compute dtype. ``reduce_dtype`` (the gradient
    reduce-scatter) is float32 for 16-bit parameters, as torchtitan does: a sum of 16-bit
    gradients over many ranks loses their low bits, and FSDP casts the reduced gradient back
    to the parameter's dtype afterwards. Other parameters reduce in their own dtype (float64
    parameters in float64). ``output_dtype`` is the policy's output dtype on the root module
    only: give ``root=False`` for the layers sharded inside it, so that they hand each other
    activations in the compute dtype (with float32 between the layers, a module of the root
    such as a final ``LayerNorm`` in the compute dtype would get float32 inputs, which
    torch's CPU kernels refuse). The dtypes are always given explicitly, so the policy is
    honoured even for a module whose parameters are not yet in its parameter dtype; FSDP
    itself skips the casts that would not change anything. Cast the module to the parameter
    dtype before ``fully_shard`` (``module.to(policy.param_dtype)``): the sharded parameters
    keep the dtype they have.

    Unlike :func:`polprec.apply_with_policy` under autocast, FSDP casts the whole module,
    normalisation layers included, to the compute dtype.

    Args:
        policy: a :class:`~polprec.Policy` or any spec :func:`~polprec.get_policy` accepts.
        reduce_dtype: the dtype gradients are reduced in (a ``torch.dtype`` or a name such as
            ``"bf16"``); ``None``: float32 for 16-bit parameters, else the parameter dtype.
        root: whether the policy is for the root module, the one ``fully_shard`` is called on
            last (``output_dtype`` is the policy's output dtype), or for a layer inside it
            (``output_dtype=None``: outputs stay in the compute dtype).
        cast_forward_inputs: passed on; whether FSDP casts floating forward inputs to the
            compute dtype (polprec's rule, hence the default).

    Raises:
        TypeError: ``root`` or ``cast_forward_inputs`` is not a bool, or ``reduce_dtype`` is
            neither a dtype nor a name.
        ValueError: ``policy`` is not a valid spec, or ``reduce_dtype`` names no floating
            dtype.
        RuntimeError: this build of torch has no FSDP2 (``MixedPrecisionPolicy``).

    Examples:
        >>> mp = to_fsdp_mixed_precision("bf16-true")
        >>> mp.param_dtype, mp.reduce_dtype, mp.output_dtype
        (torch.bfloat16, torch.float32, torch.float32)
        >>> to_fsdp_mixed_precision("bf16-true", root=False).output_dtype is None
        True
        >>> to_fsdp_mixed_precision("bf16-true", reduce_dtype="bf16").reduce_dtype
        torch.bfloat16
    """
    policy = get_policy(policy)
    for name, value in (("root", root), ("cast_forward_inputs", cast_forward_inputs)):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool, got {value!r}")
    if reduce_dtype is None:
        half = policy.param_dtype in HALF_DTYPES
        reduce_dtype = torch.float32 if half else policy.param_dtype
    else:
        try:
            reduce_dtype = parse_dtype(reduce_dtype)
        except (TypeError, ValueError) as err:
            raise type(err)(f"reduce_dtype: {err}") from None
    return _mixed_precision_policy_class()(
        param_dtype=policy.compute_dtype,
        reduce_dtype=reduce_dtype,
        output_dtype=policy.output_dtype if root else None,
        cast_forward_inputs=cast_forward_inputs,
    )
