"""``value_and_grad``: one call that scales, differentiates, unscales, checks and adjusts.

With ``microbatches=k`` it is also gradient accumulation: the batch is split into ``k``
chunks, their scaled gradients are summed in float32, and the loss scale is adjusted once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from polprec import _checkpointing, _dtensor, _fused, _grad_checks, _tree
from polprec._checks import check_int
from polprec.distributed import all_finite_across, check_process_group
from polprec.loss_scale import LossScale, NoOpLossScale
from polprec.scaling import scale_loss, unscale_and_check
from polprec.tree import stack_trees

__all__ = ["value_and_grad"]


def _argument_name(path: tuple[Any, ...]) -> str:
    where, key, *rest = path
    name = f"positional argument {key}" if where == 0 else f"keyword argument {key!r}"
    return name + (f" at {_tree.path_str(rest)}" if rest else "")


def _split(args: tuple[Any, ...], kwargs: dict[str, Any], k: int) -> list[Any]:
    """``k`` ``(args, kwargs)`` chunks: every tensor with a leading dim split along it."""
    paths, leaves, spec = _tree.tree_flatten_with_path((args, kwargs))
    columns: list[list[Any]] = []
    for path, leaf in zip(paths, leaves, strict=True):
        if isinstance(leaf, torch.Tensor) and leaf.dim() > 0:
            size = leaf.shape[0]
            if size % k:
                raise ValueError(
                    f"microbatches={k} cannot split {_argument_name(path)}: its leading "
                    f"dimension {size} is not divisible by {k}; use a batch size that is a "
                    f"multiple of {k} or another number of micro-batches"
                )
            columns.append(list(leaf.reshape(k, size // k, *leaf.shape[1:]).unbind(0)))
        else:  # 0-dim tensors and other values are the same in every chunk
            columns.append([leaf] * k)
    return [_tree.tree_unflatten(spec, [col[i] for col in columns]) for i in range(k)]


def value_and_grad(
    loss_fn: Callable[..., Any],
    *,
    has_aux: bool = False,
    microbatches: int = 1,
    process_group: Any = None,
) -> Callable[..., tuple[Any, Any, torch.Tensor, LossScale]]:
    """Turn ``loss_fn(params, *args, **kwargs)`` into a mixed-precision gradient function.

    The returned function has the signature
    ``(params, *args, loss_scale, **kwargs) -> (loss, grads, grads_finite, new_loss_scale)``:
    it scales the loss by ``loss_scale``, differentiates it with respect to the floating
    leaves of ``params``, unscales the gradients, checks that they are finite and adjusts the
    loss scale. ``loss`` is the unscaled loss (``(loss, aux)`` with ``has_aux=True``);
    ``grads`` has the structure of ``params`` with each gradient in its parameter's dtype
    (non-floating leaves get ``None``). No host synchronisation.

    A loss that no floating leaf of ``params`` reaches is refused with a ``ValueError``
    naming :func:`polprec.apply_with_policy`: its gradients would all be zero, which is what a
    loss function that calls the module itself (``model(x)``, the module's own parameters)
    computes. Leaves that do not reach the loss (frozen layers, an unused head) get zero
    gradients, as long as one leaf does. The check reads ``requires_grad`` and which
    gradients autograd returned, never a value.

    Under ``torch.compile`` and inside other ``torch.func`` transforms it differentiates with
    ``torch.func.grad``; in plain eager mode it uses ``torch.autograd.grad`` on detached copies
    of the parameters (the same gradients, without the functorch wrapper overhead) and
    unscales the fresh gradients with torch's fused AMP kernel.

    Gradient accumulation: with ``microbatches=k > 1`` every tensor argument with a leading
    dimension (at any depth of ``args`` and ``kwargs``) is split along it into ``k`` equal
    chunks (a ``ValueError`` names an argument whose size ``k`` does not divide; 0-dim
    tensors and other values go to every chunk as they are). Each chunk's loss is divided by
    ``k`` and scaled, as ``scaler.scale(loss / k).backward()`` does; the chunks' scaled
    gradients are summed in float32, unscaled and checked once, and returned in each
    parameter's dtype; ``loss`` is the mean of the chunks' losses; the loss scale is
    adjusted once. For a mean loss the gradients equal the full batch's, and the loss
    scale follows ``torch.amp.GradScaler``'s trajectory with one ``update()`` per call. With
    ``has_aux=True``, ``aux`` is the chunks' aux stacked along a new leading dimension of
    size ``k`` (:func:`polprec.stack_trees`: tensor leaves stacked, other leaves equal in
    every chunk).

    With ``process_group=`` a ``torch.distributed.ProcessGroup`` (e.g.
    ``torch.distributed.group.WORLD``), ``grads_finite`` is agreed across the group's ranks
    (:func:`polprec.all_finite_across`) before the loss scale is adjusted: every rank then
    gets the same flag and the same new loss scale. The gradients themselves are this
    rank's; averaging them across ranks is the caller's step. (``group.WORLD`` is ``None``
    until ``init_process_group`` has run: build the step after it.)

    DTensor parameters (``torch.distributed.tensor``, see :func:`polprec.apply_with_policy`)
    need none of that: each rank passes its own batch, the gradients come back as DTensors
    laid out as the parameters, averaged over the ranks, and ``grads_finite`` is a plain
    0-dim bool tensor agreed over the parameters' meshes, so every rank skips a step together
    and the loss-scale state stays plain and the same on every rank. Every floating leaf of
    ``params`` must then be a DTensor (a plain tensor's gradient would be this rank's own).
    They are differentiated with ``torch.autograd`` also under ``torch.compile`` (for
    ``fullgraph=True``, set ``torch._dynamo.config.trace_autograd_ops = True``), and refused
    inside ``vmap``/``torch.func.grad``, which do not support DTensor.

    Examples:
        >>> import torch
        >>> from polprec import DynamicLossScale
        >>> def loss_fn(params, x, y):
        ...     return ((x @ params["w"] - y) ** 2).mean()
        >>> step = value_and_grad(loss_fn)
        >>> params = {"w": torch.ones(2)}
        >>> x, y = torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([2.0, 8.0])
        >>> loss, grads, finite, scale = step(params, x, y, loss_scale=DynamicLossScale())
        >>> loss, grads["w"], finite
        (tensor(1.), tensor([-2., -2.]), tensor(True))
        >>> accumulate = value_and_grad(loss_fn, microbatches=2)  # two chunks of one example
        >>> loss, grads, finite, scale = accumulate(params, x, y, loss_scale=scale)
        >>> loss, grads["w"], int(scale.counter)  # one adjust per call
        (tensor(1.), tensor([-2., -2.]), 2)
    """
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {loss_fn!r}")
    if not isinstance(has_aux, bool):
        raise TypeError(f"has_aux must be a bool, got {has_aux!r}")
    k = check_int("microbatches", microbatches, minimum=1)
    if process_group is not None:
        check_process_group(process_group, "process_group")

    def grad_fn(
        params: Any, *args: Any, loss_scale: LossScale | None = None, **kwargs: Any
    ) -> tuple[Any, Any, torch.Tensor, LossScale]:
        loss_scale = _grad_checks.check_loss_scale_arg(loss_scale, args)
        leaves, unflatten = _flatten(params)
        if type(params) is dict and all(x.is_floating_point() for x in leaves):
            idx = list(range(len(leaves)))  # (_flatten took a dict apart only if all are tensors)
        else:
            idx = [i for i, x in enumerate(leaves) if _tree.is_float_tensor(x)]
        diff, slot = _distinct([leaves[i] for i in idx])
        _grad_checks.check_params(params, leaves, diff)
        # (any_dtensor refuses DTensors inside torch.func transforms; mixing them with plain
        # tensors is checked after the forward pass, so that a module wrapped by DDP or FSDP2
        # is refused first, naming what to do instead)
        sharded = _dtensor.any_dtensor(diff)
        simple = len(idx) == len(leaves) and len(diff) == len(leaves)  # every leaf differentiated

        def rebuild(new: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> Any:
            if simple:
                return unflatten(new)
            full = list(leaves)
            for i, j in zip(idx, slot, strict=True):
                full[i] = new[j]
            return unflatten(full)

        def scaled_grads(
            a: tuple[Any, ...], kw: dict[str, Any]
        ) -> tuple[torch.Tensor, Any, list[torch.Tensor], bool]:
            return _scaled_grads(loss_fn, rebuild, diff, a, kw, loss_scale, has_aux, k, sharded)

        if k == 1:
            loss, aux, dgrads, owned = scaled_grads(args, kwargs)
            dgrads, finite = _unscale(dgrads, loss_scale, owned, sharded)
        else:
            losses, auxes = [], []
            acc: list[torch.Tensor] = []
            acc_owned = True  # the sum is kept in buffers of our own while every chunk's are
            for a, kw in _split(args, kwargs, k):
                loss, aux, dgrads, owned = scaled_grads(a, kw)
                losses.append(loss)
                auxes.append(aux)
                acc_owned = acc_owned and owned
                acc = _fused.accumulate(acc, dgrads, owned=acc_owned)
            acc, finite = _unscale(acc, loss_scale, acc_owned, sharded)
            dgrads = [g.to(x.dtype) for g, x in zip(acc, diff, strict=True)]
            # (every chunk's loss has the dtype of the last one; without aux, auxes are None)
            loss = torch.stack([x.float() for x in losses]).mean().to(loss.dtype)
            aux = stack_trees(auxes)
        if process_group is not None:
            finite = all_finite_across(finite, group=process_group)
        if simple:
            grads = unflatten(dgrads)
        else:
            grads_full: list[Any] = [None] * len(leaves)
            for i, j in zip(idx, slot, strict=True):
                grads_full[i] = dgrads[j]
            grads = unflatten(grads_full)
        new_scale = loss_scale.adjust(finite)
        return ((loss, aux) if has_aux else loss), grads, finite, new_scale

    return grad_fn


def _flatten(params: Any) -> tuple[list[Any], Callable[[Any], Any]]:
    """The leaves of ``params`` and a function that rebuilds its structure from new leaves.

    A dict of tensors, the usual params, is taken apart without a tree walk.
    """
    if type(params) is dict and all(isinstance(v, torch.Tensor) for v in params.values()):
        keys = list(params)
        return list(params.values()), lambda new: dict(zip(keys, new, strict=True))
    leaves, spec = _tree.tree_flatten(params)
    return leaves, lambda new: _tree.tree_unflatten(spec, new)


def _distinct(tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[int]]:
    """One differentiated input per distinct tensor, and each leaf's position among them.

    A tensor under two names (weights tied and named twice) stays one tensor, and both
    names get its whole gradient.
    """
    if not torch.compiler.is_compiling() and len({id(x) for x in tensors}) == len(tensors):
        return tensors, list(range(len(tensors)))  # the common case: no tensor twice
    diff: list[torch.Tensor] = []
    slot: list[int] = []
    first = _tree.TensorMemo()
    for x in tensors:
        j = first.get(x)
        if j is None:
            j = first.put(x, len(diff))
            diff.append(x)
        slot.append(j)
    return diff, slot


def _scaled_grads(
    loss_fn: Callable[..., Any],
    rebuild: Callable[[Any], Any],
    diff: list[torch.Tensor],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    loss_scale: LossScale,
    has_aux: bool,
    k: int,
    sharded: bool,
) -> tuple[torch.Tensor, Any, list[torch.Tensor], bool]:
    """``(loss, aux, scaled gradients of loss / k, whether the gradients are ours to overwrite)``.

    DTensor parameters (``sharded``) are differentiated with autograd also while compiling:
    torch.func does not support DTensor.
    """

    def scale(loss: torch.Tensor) -> torch.Tensor:
        return scale_loss(loss / k, loss_scale)  # (a division by 1 is exact)

    if not _fused.tracing() or sharded:
        inputs = [x.detach().requires_grad_() for x in diff]
        with torch.enable_grad(), _checkpointing.Deferred() as guard:
            loss, aux = _grad_checks.split_loss(loss_fn(rebuild(inputs), *args, **kwargs), has_aux)
            _grad_checks.check_reaches(loss)
            if sharded:
                _dtensor.check_params(diff)
            try:
                got = torch.autograd.grad(scale(loss), inputs, allow_unused=True)
            except RuntimeError:
                guard.settle(loss, None, ())  # (inputs are read only beside gradients)
                raise
        guard.settle(loss, got, (args, kwargs))
        _grad_checks.check_reached(got)
        dgrads = [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, got, strict=True)]
        if has_aux:
            aux = _tree.tree_map(lambda a: a.detach() if isinstance(a, torch.Tensor) else a, aux)
        return loss.detach(), aux, dgrads, _fused.owned(dgrads)

    def scaled_loss(
        d: list[torch.Tensor], a: tuple[Any, ...], kw: dict[str, Any]
    ) -> tuple[torch.Tensor, Any]:
        loss, aux = _grad_checks.split_loss(loss_fn(rebuild(d), *a, **kw), has_aux)
        _grad_checks.check_reaches(loss)
        # torch.func's aux may hold only tensors: pass `aux` on only when there is one.
        if has_aux:
            _grad_checks.check_traced_aux(aux)
        return scale(loss), ((loss, aux) if has_aux else (loss,))

    # The other arguments go through torch.func.grad too (it differentiates the first only):
    # an argument captured from outside could not be updated in place inside the transform,
    # and BatchNorm's running statistics passed beside the params are.
    dgrads, out = torch.func.grad(scaled_loss, has_aux=True)(diff, args, kwargs)
    loss, aux = out if has_aux else (out[0], None)
    return loss, aux, dgrads, False


def _unscale(
    grads: list[torch.Tensor], loss_scale: LossScale, owned: bool, sharded: bool = False
) -> tuple[list[torch.Tensor], torch.Tensor]:
    if sharded:  # DTensors: their local shards unscaled, the verdict agreed over the meshes
        shards = _dtensor.Shards(grads)
        fresh = not _fused.tracing() and _fused.owned(shards.local)
        local, finite = _unscale(shards.local, loss_scale, fresh)
        return shards.rebuild(local), shards.agree(finite)
    if owned and grads:
        # Fresh eager gradients nobody else holds: unscaled and checked in place, in one fused
        # pass; without a loss scale the same kernel checks them (a factor of 1 is exact).
        if isinstance(loss_scale, NoOpLossScale):
            inv = _fused.one(grads[0].device)
        else:
            inv = torch.reciprocal(loss_scale.loss_scale)
        return grads, _fused.unscale_(grads, inv) == 0
    out, finite = unscale_and_check(grads, loss_scale)
    return list(out), finite
