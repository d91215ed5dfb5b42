"""Running a module under a policy: ``apply_with_policy``, ``autocast`` and ``full_precision``."""

from __future__ import annotations

import functools
from collections.abc import Callable, Collection, Mapping
from typing import Any, TypeVar

import torch
from torch import nn

from polprec import _buffers, _context, _dtensor, _fused, _tree, _wrapped
from polprec._catalogue import HALF_DTYPES
from polprec._islands import apply_rules
from polprec.policy import Policy, PolicySpec, get_policy
from polprec.rules import PolicyRules

__all__ = ["apply_with_policy", "autocast", "full_precision"]

_F = TypeVar("_F", bound=Callable[..., Any])


def autocast(
    policy: PolicySpec = None, device_type: str | None = None
) -> torch.autocast | _TransformAutocast | _context.NullContext:
    """``torch.autocast`` to the policy's compute dtype, for code outside the forward.

    The counterpart of Lightning Fabric's ``fabric.autocast()``: a loss computed outside the
    model's forward runs under the same policy. A no-op for 32/64-bit compute dtypes. Entered
    inside a ``torch.func`` transform (``vmap``, ``grad``), where ``torch.autocast`` alone loses
    dtypes, it also makes autocast's casts itself, op by op, as
    :func:`apply_with_policy` does there.

    Args:
        policy: a :class:`Policy` or any spec :func:`get_policy` accepts (``None`` reads
            ``POLPREC_PRECISION``).
        device_type: ``"cpu"``, ``"cuda"``, ...; defaults to torch's default device.

    Examples:
        >>> import torch
        >>> with autocast("bf16-mixed", "cpu"):
        ...     (torch.ones(2, 2) @ torch.ones(2, 2)).dtype
        torch.bfloat16
    """
    policy = get_policy(policy)
    if device_type is None:
        device_type = torch.get_default_device().type
    elif not isinstance(device_type, str):
        raise TypeError(
            f"device_type must be a str such as 'cpu' or 'cuda', got {device_type!r} of type "
            f"{type(device_type).__name__}"
        )
    if policy.compute_dtype not in HALF_DTYPES:
        return _context.NullContext()
    if _fused.transforms_active():
        return _TransformAutocast(device_type, policy.compute_dtype)
    return torch.autocast(device_type, dtype=policy.compute_dtype)


class _TransformAutocast:
    """:func:`autocast` inside a ``torch.func`` transform: autocast plus its casts, op by op."""

    def __init__(self, device_type: str, dtype: torch.dtype) -> None:
        self._autocast = torch.autocast(device_type, dtype=dtype)
        self._casts = _context.transform_casts(device_type, mixed=True)

    def __enter__(self) -> None:
        self._autocast.__enter__()  # type: ignore[no-untyped-call]
        self._casts.__enter__()

    def __exit__(self, *exc: Any) -> None:
        self._casts.__exit__(*exc)
        self._autocast.__exit__(*exc)


class full_precision:  # lower case: used like a function, `with full_precision():`
    """Keep a region in float32 inside a low-precision forward.

    As a context manager it switches autocast off (on CPU and on the CUDA device when there
    is one), so ops run in their inputs' dtype: pass float32 tensors into the region. As a
    decorator it also casts the function's floating tensor arguments to float32, which is
    what scatter-style operations (Lightning's note) and numerically sensitive reductions
    need; it works under ``vmap``, ``grad`` and ``torch.compile``.

    Examples:
        >>> import torch
        >>> @full_precision()
        ... def total(x):
        ...     return x.sum()
        >>> total(torch.ones(3, dtype=torch.bfloat16)).dtype
        torch.float32
        >>> with autocast("bf16-mixed", "cpu"), full_precision():
        ...     (torch.ones(2, 2) @ torch.ones(2, 2)).dtype
        torch.float32
    """

    def __init__(self) -> None:
        types = ["cpu"]
        if torch.cuda.is_available():
            types.append("cuda")
        self._contexts = [_context.autocast_off(t) for t in types]

    def __enter__(self) -> full_precision:
        for ctx in self._contexts:
            ctx.__enter__()  # type: ignore[no-untyped-call]
        return self

    def __exit__(self, *exc: Any) -> None:
        for ctx in reversed(self._contexts):
            ctx.__exit__(*exc)

    def __call__(self, fn: _F) -> _F:
        if not callable(fn):
            raise TypeError(f"full_precision() decorates a callable, got {fn!r}")

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            args, kwargs = _tree.cast_floating((args, kwargs), torch.float32)
            with full_precision():
                return fn(*args, **kwargs)

        return wrapper  # type: ignore[return-value]


class _Required:
    """The default of a keyword argument that must be given (a clearer error than Python's)."""

    def __repr__(self) -> str:
        return "<required>"


_REQUIRED: Any = _Required()


def _as_args(args: Any) -> tuple[Any, ...]:
    return args if isinstance(args, tuple) else (args,)


def apply_with_policy(
    module: nn.Module,
    params_and_buffers: Mapping[str, Any] | tuple[Mapping[str, Any], ...],
    args: Any = (),
    kwargs: Mapping[str, Any] | None = None,
    *,
    policy: PolicySpec | PolicyRules = _REQUIRED,
    strict: bool = False,
    tie_weights: bool = True,
    keep_dtype: Collection[str | int] = (),
    reduce_dtype: torch.dtype | str | None = None,
) -> Any:
    """``torch.func.functional_call`` under a mixed-precision policy.

    The module runs under the policy and its floating outputs are cast to the output dtype.
    Gradients with respect to ``params_and_buffers`` come back in the dtype each parameter
    was passed in (the param dtype), because every cast is differentiable.

    Inputs follow torch.amp's rule. Under a mixed policy they are passed as they are, and
    autocast casts them per op: into a matmul in the compute dtype, into a loss in float32,
    so a float32 target (regression ``labels``) keeps its precision. Every other policy casts
    floating inputs to the compute dtype, except those named in ``keep_dtype``.

    How the module runs:

    * mixed policies (16-bit compute, float32 params): ``torch.autocast`` on the device of
      the tensors, with the parameters and buffers as they are. Inside a ``torch.func``
      transform (``vmap``, ``grad``, ...), where autocast alone loses dtypes (``nn.Linear``
      with bias returns float32 under ``vmap``, pytorch issue 192617; ``vmap(grad(...))``
      through ``LayerNorm`` fails, pytorch issue 184890), a ``TorchFunctionMode`` also makes
      autocast's casts itself, op by op, from torch's own per-op lists: the numerics are
      autocast's, and the parameters stay float32. The check is
      ``torch._C._are_functorch_transforms_active()``, which ``torch.compile`` traces.
    * every other policy ("true" 16-bit, float32, float64, float64 params with 16-bit
      compute, which autocast does not cast): parameters and buffers are cast
      to the compute dtype explicitly and autocast is switched off.

    Buffers: in-place updates (BatchNorm running statistics in training mode) land in the
    buffers passed, as with ``functional_call``, under every policy. Where a policy computes
    with a cast copy of a floating buffer, what the module changed in the copy is written back
    into the buffer passed (in training mode; rounded as the module computed it). Buffers that
    require grad (differentiated as if they were parameters: pass ``(params, buffers)`` and
    differentiate ``params`` only) are refused with a ``ValueError``, and so is a dtype error
    caused by the module's own floating buffers where they were not passed.

    Tied weights (one tensor under several names, such as an embedding and the output layer
    that shares it) may be passed under one name or under all of them as the same tensor;
    with :class:`~polprec.PolicyRules` each module that uses the tensor computes with it in
    its own compute dtype. Objects that are no pytree, such as a transformers cache, pass
    through as they are. Gradient checkpointing (``torch.utils.checkpoint``) inside the
    module is refused with an error: its recomputation would read the module's own
    parameters instead of ``params_and_buffers``.

    Parameters may be ``torch.distributed.tensor.DTensor``s (``distribute_tensor``;
    ``Replicate()`` or ``Shard(d)`` on each mesh dimension): sharding is then a property of
    the parameters, and every rank runs this call on its own batch. Each DTensor is gathered
    to a full tensor just before the module runs, a parameter cast to the compute dtype
    *before* the all-gather under every policy (so 16-bit bytes move, as with FSDP2's
    ``param_dtype``). Its gradient comes back as a DTensor with the parameter's mesh,
    placements and dtype: the gradient of the *mean* of all ranks' losses, reduced in
    ``reduce_dtype``. ``Replicate()`` parameters are data parallelism (DDP), ``Shard(0)``
    fully sharded data parallelism (FSDP, ZeRO-3), ``(Replicate(), Shard(0))`` on a 2-D mesh
    both (HSDP). Not inside ``vmap``/``torch.func.grad``, which do not support DTensor.

    Args:
        module: the ``nn.Module`` whose ``forward`` runs.
        params_and_buffers: parameters and buffers by name (or a tuple of such dicts), as
            for ``functional_call``; usually already cast with :func:`cast_params`.
        args: positional inputs (a single non-tuple value is one argument).
        kwargs: keyword inputs.
        policy: a :class:`Policy`, any spec :func:`get_policy` accepts, or
            :class:`~polprec.PolicyRules` for per-module-class and per-path policies
            (precision islands).
        strict: as for ``functional_call``: every parameter and buffer must be given.
        tie_weights: as for ``functional_call``.
        keep_dtype: keyword names (``"labels"``) and positional indices of inputs that a
            policy that casts inputs passes on in their own dtype; names and indices that a
            call does not have are ignored.
        reduce_dtype: the dtype DTensor parameters' gradients are averaged over the ranks in
            (FSDP2's ``reduce_dtype``): ``None`` for float32 (float64 for float64
            parameters), or a floating dtype or its name. Ignored without DTensors.

    Raises:
        TypeError, ValueError: bad arguments, names that are no parameter or buffer of
            ``module``, different tensors under tied names, buffers that require grad,
            or buffers left out whose dtype clashes with the compute dtype.
        TypeError: ``module`` is, or contains, a DDP or FSDP2 module (torch's module route).
        RuntimeError: the module uses ``torch.utils.checkpoint`` on parameters other than
            its own; DTensor parameters inside a ``torch.func`` transform.

    Examples:
        >>> import torch
        >>> model = torch.nn.Linear(3, 2)
        >>> params = dict(model.named_parameters())
        >>> out = apply_with_policy(model, params, torch.ones(4, 3), policy="bf16-mixed")
        >>> out.dtype
        torch.float32
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    _wrapped.refuse_wrapped(module)  # FSDP2/DDP modules would ignore params_and_buffers
    if not isinstance(params_and_buffers, Mapping | tuple):
        raise TypeError(
            "params_and_buffers must be a dict of tensors by name (or a tuple of dicts), got "
            f"{type(params_and_buffers).__name__}"
        )
    if kwargs is None:
        kwargs = {}
    elif isinstance(kwargs, Policy | PolicyRules | str | int):
        raise TypeError(
            f"apply_with_policy got {kwargs!r} where kwargs goes; the policy is keyword-only: "
            f"apply_with_policy(module, params, args, policy={kwargs!r})"
        )
    elif isinstance(kwargs, torch.Tensor):
        raise TypeError(
            "apply_with_policy got a tensor where kwargs goes: a module with several positional "
            "inputs takes them as one tuple, as functional_call does: "
            "apply_with_policy(module, params, (x, y), policy=...)"
        )
    elif not isinstance(kwargs, Mapping):
        raise TypeError(f"kwargs must be a dict or None, got {type(kwargs).__name__}")
    if policy is _REQUIRED:
        raise TypeError(
            "apply_with_policy needs policy=..., by keyword: a Policy, PolicyRules or any spec "
            "get_policy accepts, e.g. apply_with_policy(module, params, args, policy='bf16-mixed')"
        )
    params = _merged(params_and_buffers)
    _context.check_names(module, params)
    keep = _keep_dtype(keep_dtype)
    reduce = _dtensor.check_reduce_dtype(reduce_dtype)
    args = _as_args(args)
    if isinstance(policy, PolicyRules):
        return apply_rules(
            policy, module, params, args, dict(kwargs), strict, tie_weights, keep, reduce
        )
    policy = get_policy(policy)
    args, kwargs = _context.cast_inputs(policy, args, dict(kwargs), keep)
    device_type = _context.device_type(params, args, kwargs)
    computed = _context.params_for_compute(policy, params, module=module, reduce_dtype=reduce)
    with (
        _context.policy_context(policy, device_type),
        _context.transform_casts(device_type, policy.is_mixed),
    ):
        out = _buffers.call(module, params, computed, args, kwargs, strict, tie_weights, policy)
    return policy.cast_to_output(out)


def _merged(params_and_buffers: Mapping[str, Any] | tuple[Mapping[str, Any], ...]) -> Any:
    """One dict of tensors by name; ``functional_call``'s tuple of dicts is merged."""
    if not isinstance(params_and_buffers, tuple):
        return params_and_buffers
    merged: dict[str, Any] = {}
    for d in params_and_buffers:
        if not isinstance(d, Mapping):
            raise TypeError(
                "params_and_buffers as a tuple holds dicts of tensors by name, got a "
                f"{type(d).__name__} in it"
            )
        twice = sorted(k for k in d if k in merged)
        if twice:
            raise ValueError(
                f"params_and_buffers: the keys {twice} appear in more than one of its dicts; "
                "each parameter or buffer may be given once"
            )
        merged.update(d)
    return merged


_NOTHING_KEPT: frozenset[str | int] = frozenset()


def _keep_dtype(keep_dtype: Any) -> frozenset[str | int]:
    """``keep_dtype`` checked: keyword names and positional indices of inputs left uncast."""
    if keep_dtype == ():
        return _NOTHING_KEPT
    if isinstance(keep_dtype, str) or not isinstance(keep_dtype, Collection):
        raise TypeError(
            f"keep_dtype takes a collection of keyword names and positional indices, e.g. "
            f"keep_dtype=('labels',), got {keep_dtype!r}"
        )
    for item in keep_dtype:
        if isinstance(item, bool) or not isinstance(item, str | int):
            raise TypeError(
                f"keep_dtype holds keyword names (str) and positional indices (int), got "
                f"{item!r} of type {type(item).__name__}"
            )
        if isinstance(item, int) and item < 0:
            raise ValueError(f"keep_dtype: positional indices start at 0, got {item}")
    return frozenset(keep_dtype)
