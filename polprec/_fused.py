"""The one home of torch's private AMP and multi-tensor kernels, and of the choice to use them.

torch's fused kernels (``_amp_foreach_non_finite_check_and_unscale_``, ``_amp_update_scale_``,
``_foreach_*``) are fast but work in place and have no vmap batching rule and no derivative.
polprec therefore takes them only in plain eager mode, on plain tensors nobody is
differentiating, and always on buffers it owns (fresh gradients or copies), so that its
functions stay pure. Everywhere else it uses plain tensor ops, which ``vmap`` batches,
``torch.func.grad`` differentiates and inductor fuses. :func:`may_fuse` is that decision.

GradScaler's private contract with torch's fused optimizers (``_step_supports_amp_scaling``,
the ``found_inf`` and ``grad_scale`` attributes their ``step()`` reads) lives here too:
:func:`skips_in_step` and :func:`step_skipping`, for ``polprec.optim.step_torch``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def transforms_active() -> bool:
    """True inside a ``torch.func`` transform (``vmap``, ``grad``, ``jvp``, ...)."""
    return bool(torch._C._are_functorch_transforms_active())  # noqa: SLF001


def unwrapped(x: Any) -> Any:
    """``x`` without the wrappers of the ``torch.func`` transforms it is inside."""
    functorch = torch._C._functorch  # noqa: SLF001
    while isinstance(x, torch.Tensor) and functorch.is_functorch_wrapped_tensor(x):
        x = functorch.get_unwrapped(x)
    return x


def tracing() -> bool:
    """True while ``torch.compile`` traces or inside a ``torch.func`` transform."""
    return torch.compiler.is_compiling() or transforms_active()


def may_fuse(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether the fused eager kernels may run on (copies of) ``tensors``.

    Only in plain eager mode, when autograd is not recording through the tensors, and for
    plain tensors or parameters (a subclass such as ``DTensor`` routes ops of its own).
    """
    if tracing():
        return False
    if torch.is_grad_enabled() and any(x.requires_grad for x in tensors):
        return False
    return all(type(x) is torch.Tensor or type(x) is torch.nn.Parameter for x in tensors)


def owned(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether freshly made ``tensors`` (gradients) may be overwritten in place.

    They must be plain dense tensors and distinct: autograd can hand the same buffer to two
    inputs (``(a + b).sum()``), which must not be unscaled twice.
    """
    ptrs = set()
    for t in tensors:
        if type(t) is not torch.Tensor or not t.is_contiguous():
            return False
        ptrs.add(t.data_ptr())
    return len(ptrs) == len(tensors)


def copies(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Fresh contiguous copies of ``tensors``: one multi-tensor launch where they are contiguous."""
    if all(t.is_contiguous() for t in tensors):
        return list(torch._foreach_clone(list(tensors)))  # noqa: SLF001
    return [t.clone(memory_format=torch.contiguous_format) for t in tensors]


def scaled(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``x * factor`` in ``x``'s dtype for a 0-dim float32 ``factor``, in plain ops.

    The elementwise kernels read a 0-dim operand as a float32 scalar, so the product is
    computed in float32 and rounded once (a 2**-25 reciprocal is not flushed to zero for
    float16). Only a 0-dim ``x`` is promoted by torch's rules; it is cast back.
    """
    y = x * factor
    return y if y.dtype == x.dtype else y.to(x.dtype)


def mul(tensors: Sequence[torch.Tensor], factor: torch.Tensor) -> list[torch.Tensor]:
    """``x * factor`` for every ``x`` in one multi-tensor launch, each in its own dtype."""
    products = torch._foreach_mul(list(tensors), factor)  # noqa: SLF001
    return [
        y if y.dtype == x.dtype else y.to(x.dtype) for x, y in zip(tensors, products, strict=True)
    ]


# The dtypes torch's fused check-and-unscale kernel implements, per device type (its CUDA
# kernel has no bfloat16); other groups take the plain-op path in unscale_.
UNSCALE_DTYPES: dict[str, tuple[torch.dtype, ...]] = {
    "cpu": (torch.float16, torch.bfloat16, torch.float32, torch.float64),
    "cuda": (torch.float16, torch.float32, torch.float64),
}


_ONES: dict[torch.device, torch.Tensor] = {}


def one(device: torch.device) -> torch.Tensor:
    """A float32 ``1`` on ``device``, made once: a factor the kernels only read."""
    t = _ONES.get(device)
    if t is None:
        t = _ONES[device] = torch.ones((), dtype=torch.float32, device=device)
    return t


def unscale_(tensors: Sequence[torch.Tensor], inv_scale: torch.Tensor) -> torch.Tensor:
    """Multiply ``tensors`` by ``inv_scale`` in place and check them, one group per device/dtype.

    Only for buffers the caller owns. Returns ``found_inf``: a 0-dim float32 tensor, 0 when
    every element was finite.
    """
    first = tensors[0]
    if all(x.dtype == first.dtype and x.device == first.device for x in tensors):
        groups = {(first.device, first.dtype): list(tensors)}  # the common case: one group
    else:
        groups = {}
        for x in tensors:
            groups.setdefault((x.device, x.dtype), []).append(x)
    found = []
    for (device, dtype), group in groups.items():
        if dtype in UNSCALE_DTYPES.get(device.type, ()):
            found_inf = torch.zeros((), dtype=torch.float32, device=device)
            torch._amp_foreach_non_finite_check_and_unscale_(group, found_inf, inv_scale.to(device))
        else:  # the same in plain ops, where the kernel lacks this dtype or device type
            all_finite = torch.stack([torch.isfinite(x).all() for x in group]).all()
            torch._foreach_mul_(group, inv_scale.to(device))
            found_inf = torch.logical_not(all_finite).to(torch.float32)
        found.append(found_inf)
    if len(found) == 1:
        return found[0]
    return torch.stack([f.to(found[0].device) for f in found]).sum()


def update_scale(
    scale: torch.Tensor, counter: torch.Tensor, found_inf: torch.Tensor, factor: float, period: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """GradScaler's fused scale update, on copies of ``scale`` and ``counter``."""
    scale, counter = scale.clone(), counter.clone()
    torch._amp_update_scale_(scale, counter, found_inf, factor, 1.0 / factor, period)
    return scale, counter


def accumulate(
    acc: list[torch.Tensor], grads: list[torch.Tensor], *, owned: bool
) -> list[torch.Tensor]:
    """``acc + grads`` in float32, the sum of gradients over micro-batches.

    An empty ``acc`` starts the sum. With ``owned`` (fresh eager gradients) the sum is kept
    in place in buffers polprec made, in one multi-tensor launch per step.
    """
    if not acc:
        return [g if owned and g.dtype == torch.float32 else g.float() for g in grads]
    if owned:
        torch._foreach_add_(acc, grads)
        return acc
    return [a + g.float() for a, g in zip(acc, grads, strict=True)]


def all_finite(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """A 0-dim bool tensor: every element of every tensor is finite. No host sync.

    In eager mode on plain tensors of up to 32 bits, one multi-tensor 2-norm pass per device
    and dtype, accumulated in float64: a NaN or an infinity makes the norm non-finite, and no
    finite float32 value can overflow it (the largest square is about 1e77). torch's
    infinity-norm would be exact too but runs element by element on CPU, about 30 times
    slower. float64 tensors, and everything under transforms, take plain ops.
    """
    if may_fuse(tensors) and all(t.dtype != torch.float64 for t in tensors):
        groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
        for t in tensors:
            groups.setdefault((t.device, t.dtype), []).append(t)
        device = tensors[0].device
        sums = [  # 2-norms, _foreach_norm's default
            n.to(device)
            for group in groups.values()
            for n in torch._foreach_norm(group, dtype=torch.float64)  # noqa: SLF001
        ]
        return torch.isfinite(torch.stack(sums)).all()
    return torch.stack([torch.isfinite(x).all() for x in tensors]).all()


def norm_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a norm of ``dtype`` values is accumulated in: at least float32."""
    return torch.promote_types(dtype, torch.float32)


def norms(tensors: Sequence[torch.Tensor], ord: float) -> list[torch.Tensor]:
    """The ``ord``-norm of every tensor in at least float32: one launch per device and dtype."""
    first = tensors[0]
    if all(t.device == first.device and t.dtype == first.dtype for t in tensors):
        out = torch._foreach_norm(list(tensors), ord, dtype=norm_dtype(first.dtype))  # noqa: SLF001
        return list(out)
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.device, t.dtype), []).append(i)
    result: list[torch.Tensor] = [first] * len(tensors)
    for (_, dtype), idx in groups.items():
        group = [tensors[i] for i in idx]
        for i, n in zip(idx, torch._foreach_norm(group, ord, dtype=norm_dtype(dtype)), strict=True):  # noqa: SLF001
            result[i] = n
        del dtype
    return result


# --- polprec.optim: torch's fused optimizer kernels, always on buffers polprec owns -----------
#
# The kernels update params and moments in place and skip the whole update when ``found_inf``
# is 1 (on CUDA without reading it on the host). polprec never passes ``grad_scale``: with it
# the kernels write the unscaled gradients back into ``grads``.

#: Device types whose fused Adam/AdamW/SGD kernels implement float16, bfloat16, float32 and
#: float64; elsewhere polprec.optim takes plain ops.
OPTIM_DEVICES = ("cpu", "cuda")


def adam_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    max_exp_avg_sqs: list[torch.Tensor],
    step: torch.Tensor,
    *,
    lr: float | torch.Tensor,
    beta1: float,
    beta2: float,
    weight_decay: float,
    eps: float,
    amsgrad: bool,
    maximize: bool,
    decoupled: bool,
    found_inf: torch.Tensor | None,
) -> None:
    """torch's fused Adam (``decoupled``: AdamW) step, in place, for one device and dtype.

    ``step`` is the float32 count after this step, shared by every tensor; ``found_inf`` a
    float32 0-dim tensor (1: leave everything as it is) or ``None``.
    """
    kernel = torch._fused_adamw_ if decoupled else torch._fused_adam_
    kernel(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        max_exp_avg_sqs,
        [step] * len(params),
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        weight_decay=weight_decay,
        eps=eps,
        amsgrad=amsgrad,
        maximize=maximize,
        found_inf=found_inf,
    )


def sgd_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    momentum_buffers: list[torch.Tensor],
    *,
    lr: float | torch.Tensor,
    momentum: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
    found_inf: torch.Tensor | None,
) -> None:
    """torch's fused SGD step without dampening, in place, for one device and dtype.

    The momentum buffers start at zero, so ``is_first_step`` (buffer <- gradient) is never
    needed: with no dampening, ``momentum * 0 + gradient`` is the gradient.
    """
    torch._fused_sgd_(
        params,
        grads,
        momentum_buffers,
        weight_decay=weight_decay,
        momentum=momentum,
        lr=lr,
        dampening=0.0,
        nesterov=nesterov,
        maximize=maximize,
        is_first_step=False,
        found_inf=found_inf,
    )


def skips_in_step(optimizer: Any) -> bool:
    """Whether a torch optimizer's ``step()`` reads GradScaler's ``found_inf`` and skips inside
    its kernels (torch's ``fused=True`` SGD, Adam, AdamW and Adagrad).

    That is the flag ``GradScaler.step`` reads, and every param group must be fused too: a
    group that is not would meet the attributes in a step that refuses them.
    """
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False)) and all(
        group.get("fused") is True for group in optimizer.param_groups
    )


def step_skipping(optimizer: Any, found_inf: torch.Tensor) -> Any:
    """``optimizer.step()`` as ``GradScaler.step`` calls a fused optimizer: ``found_inf``
    (float32, 1.0 to skip) set for the kernels, ``grad_scale=None`` (the gradients are
    unscaled already), both attributes removed afterwards."""
    optimizer.grad_scale = None
    optimizer.found_inf = found_inf
    try:
        return optimizer.step()
    finally:
        del optimizer.grad_scale
        del optimizer.found_inf
