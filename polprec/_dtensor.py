"""DTensor parameters: sharding as a property of the tensors, the one home of DTensor handling.

A params tree whose leaves are ``torch.distributed.tensor.DTensor``s says how the parameters
are laid out over the ranks, as a JAX array's sharding does: ``Replicate()`` on a 1-D mesh is
data parallelism (DDP), ``Shard(d)`` fully sharded data parallelism (FSDP, ZeRO-3),
``(Replicate(), Shard(0))`` on a 2-D mesh both (HSDP). Every rank feeds its own batch.

* :func:`gather` makes the full tensor a module computes with: the local shard is cast to the
  compute dtype *before* the all-gather (so 16-bit bytes move, as FSDP2's ``param_dtype``),
  then redistributed to ``Replicate()``. Its backward pass casts the full gradient to the
  reduce dtype (float32, float64 for float64 parameters), reduces it as ``Partial("avg")``
  back to the leaf's own placements (all-reduce for ``Replicate``, reduce-scatter for
  ``Shard``) and returns it in the leaf's dtype: the gradient of the mean of all ranks'
  losses, as a DTensor with the leaf's mesh and placements. All collectives are DTensor's.
  :func:`gather_tree` gathers the parameters of one module call that share a mesh and a
  placement pattern in buckets (:class:`_Bucket`): each rank's shards side by side in one
  flat buffer, one all-gather forward and one reduce-scatter (or all-reduce) backward per
  bucket instead of one per parameter, with the same bits.
* :class:`Shards` takes DTensor gradients apart into their local shards, so that the fused
  eager kernels unscale and clip them, puts them back together, and agrees on a finite flag
  across their meshes; :func:`plain_flag` turns a DTensor flag into its global value.
* :func:`local_shard`, :func:`shard_offset` and :func:`global_indices` say where a rank's
  shard lies in the full tensor; :func:`wrap_like` lays a new local shard out as a DTensor
  (``pp.optim`` updates the local shards and wraps them back).

Importing ``torch.distributed.tensor`` costs about half a second, so polprec never does: a
DTensor can only exist once its module is loaded, and :func:`any_dtensor` looks it up in
``sys.modules``. torch.func's transforms (``vmap``, ``grad``) do not support DTensor (a
DTensor inside ``torch.func.grad`` loses its mesh; under ``vmap`` the process aborts), so
:func:`refuse_transforms` says so before either is reached. ``torch.compile`` traces all of
it (``value_and_grad`` then differentiates with ``torch.autograd.grad``, which Dynamo traces
with ``torch._dynamo.config.trace_autograd_ops = True``).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch

from polprec import _fused
from polprec.policy import parse_dtype

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

__all__ = [
    "Shards",
    "any_dtensor",
    "check_params",
    "check_reduce_dtype",
    "gather",
    "gather_tree",
    "global_indices",
    "is_dtensor",
    "local_shard",
    "plain_flag",
    "refuse_transforms",
    "same_layout",
    "shard_offset",
    "wrap_like",
]

_MODULE = "torch.distributed.tensor"


def _api() -> ModuleType:
    """``torch.distributed.tensor``: loaded by whoever made the DTensor at hand."""
    return sys.modules[_MODULE]


def is_dtensor(x: Any) -> bool:
    """Whether ``x`` is a DTensor."""
    api = sys.modules.get(_MODULE)
    return api is not None and isinstance(x, api.DTensor)


def any_dtensor(tree: Any) -> bool:
    """Whether a tensor, a dict of tensors or an iterable of them holds a DTensor.

    Cheap where no DTensor can exist (``torch.distributed.tensor`` not loaded: one dict
    look-up) and for plain tensors (a type check each). Inside a ``torch.func`` transform,
    where a DTensor may also hide in the transform's wrapper, finding one raises
    (:func:`refuse_transforms`).
    """
    api = sys.modules.get(_MODULE)
    if api is None:
        return False
    cls = api.DTensor
    if isinstance(tree, torch.Tensor):
        values: Any = (tree,)
    else:
        values = tree.values() if isinstance(tree, dict) else tree
    for x in values:
        if type(x) is not torch.Tensor and isinstance(x, cls):
            refuse_transforms("polprec")
            return True
    if _fused.transforms_active() and not torch.compiler.is_compiling():
        for x in values:
            if isinstance(_fused.unwrapped(x), cls):
                refuse_transforms("polprec")
    return False


def refuse_transforms(what: str) -> None:
    """Raise inside ``vmap``/``torch.func.grad``, which do not support DTensor."""
    if _fused.transforms_active() and not torch.compiler.is_compiling():
        raise RuntimeError(
            f"{what} got DTensor parameters inside a torch.func transform (vmap, grad, "
            "jacrev, ...): torch.func does not support DTensor (inside grad a DTensor loses "
            "its mesh, under vmap the process aborts). Call it outside the transform: "
            "pp.value_and_grad differentiates DTensor parameters itself, with autograd"
        )


def check_params(tensors: Sequence[torch.Tensor]) -> None:
    """Refuse differentiating DTensor parameters where that cannot be right.

    Inside ``vmap``/``torch.func.grad`` (:func:`refuse_transforms`), and beside plain
    tensors: a plain parameter's gradient would be this rank's own, not the mean over the
    ranks, and the ranks would drift apart.
    """
    refuse_transforms("value_and_grad")
    plain = sum(1 for x in tensors if not is_dtensor(x))
    if plain:
        raise ValueError(
            f"params mixes {len(tensors) - plain} DTensor(s) with {plain} plain tensor(s) to "
            "differentiate; a plain tensor's gradient would be this rank's alone, not the mean "
            "over the ranks. Make every parameter a DTensor (distribute_tensor(p, mesh, "
            "[Replicate()]) for one to keep whole on every rank), or none"
        )


def check_reduce_dtype(value: Any) -> torch.dtype | None:
    """``reduce_dtype=`` checked: ``None`` or a floating dtype (or its name)."""
    if value is None:
        return None
    if not isinstance(value, torch.dtype | str):
        raise TypeError(
            "reduce_dtype must be None (float32, float64 for float64 parameters) or a floating "
            f"dtype such as torch.float32 or 'bf16', got {value!r} of type {type(value).__name__}"
        )
    try:
        return parse_dtype(value)
    except ValueError as err:
        raise ValueError(f"reduce_dtype: {err}") from None


def _check_placements(x: Any) -> None:
    api = _api()
    for p in x.placements:
        if not isinstance(p, api.Replicate | api.Shard):
            raise ValueError(
                f"a DTensor parameter has placements {tuple(x.placements)}; polprec computes "
                "with parameters placed Replicate() or Shard(d) on each mesh dimension (a "
                f"{type(p).__name__} parameter has no single value: redistribute it first)"
            )


def _full(local: torch.Tensor, x: Any) -> torch.Tensor:
    """The full tensor from this rank's ``local`` shard of ``x`` (same placements)."""
    api = _api()
    mesh, placements = x.device_mesh, x.placements
    if all(isinstance(p, api.Replicate) for p in placements):
        return local  # every rank holds all of it
    shard = api.DTensor.from_local(
        local, mesh, placements, run_check=False, shape=x.shape, stride=x.stride()
    )
    full: torch.Tensor = shard.redistribute(mesh, [api.Replicate()] * mesh.ndim).to_local()
    return full


class _Gather(torch.autograd.Function):
    """Forward: a DTensor's full tensor in ``dtype``. Backward: the mean over ranks, reduced
    in ``reduce_dtype`` to the DTensor's placements, in its dtype."""

    @staticmethod
    def forward(x: Any, dtype: torch.dtype, reduce_dtype: torch.dtype) -> torch.Tensor:
        local = x.to_local()
        full = _full(local.to(dtype), x)
        # A fresh tensor object even where nothing was copied (Replicate, same dtype), so
        # that autograd does not write its history into the DTensor's own local tensor.
        return full.detach() if full is local else full

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        x, _, reduce_dtype = inputs
        ctx.layout = (x.device_mesh, x.placements, x.dtype, reduce_dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, None, None]:
        api = _api()
        mesh, placements, dtype, reduce_dtype = ctx.layout
        partial = api.DTensor.from_local(
            grad.to(reduce_dtype).contiguous(),
            mesh,
            [api.Partial("avg")] * mesh.ndim,
            run_check=False,
        )
        return partial.redistribute(mesh, placements).to(dtype), None, None


def gather(x: Any, dtype: torch.dtype | None, reduce_dtype: torch.dtype | None) -> torch.Tensor:
    """The full tensor of DTensor ``x`` for computing, cast to ``dtype`` before the gather.

    Where autograd records through ``x``, the gradient comes back as the mean over the ranks
    of the mesh, reduced in ``reduce_dtype`` (``None``: float32, float64 for float64 ``x``)
    to ``x``'s placements, in ``x``'s dtype. ``dtype=None`` keeps ``x``'s dtype (buffers,
    integer tensors).
    """
    refuse_transforms("apply_with_policy")
    _check_placements(x)
    if dtype is None or not x.is_floating_point():
        dtype = x.dtype
    if not (torch.is_grad_enabled() and x.requires_grad):  # nothing to differentiate
        return _full(x.to_local().to(dtype), x)
    if reduce_dtype is None:
        reduce_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    out: torch.Tensor = _Gather.apply(x, dtype, reduce_dtype)  # type: ignore[no-untyped-call]
    return out


def _piece(n: int, world: int, rank: int) -> tuple[int, int]:
    """``(offset, size)`` of rank ``rank``'s piece of a dimension of ``n`` split over
    ``world`` ranks as ``Shard`` splits it (``torch.chunk``: the last pieces smaller or
    empty)."""
    chunk = -(-n // world)  # ceil
    start = min(rank * chunk, n)
    return start, min(n, start + chunk) - start


class _Member:
    """Where one DTensor lies in a bucket: its slot in each rank's flat buffer, the shape of
    each rank's shard along the sharded mesh dimension, and its own layout."""

    __slots__ = ("dim", "like", "offset", "pieces", "shapes", "slot")

    def __init__(self, x: Any, dim: int | None, world: int, offset: int) -> None:
        shape = tuple(x.shape)
        self.dim = dim
        self.like = x
        self.offset = offset
        if dim is None:  # replicated: every rank holds all of it
            self.pieces: list[tuple[int, int]] = []
            self.shapes = [shape] * world
        else:
            self.pieces = [_piece(shape[dim], world, r) for r in range(world)]
            self.shapes = [(*shape[:dim], size, *shape[dim + 1 :]) for _, size in self.pieces]
        self.slot = self.numel(0)  # the first shard is the largest

    def numel(self, rank: int) -> int:
        return math.prod(self.shapes[rank])


class _Bucket:
    """DTensors of one mesh and one sharded mesh dimension (or none), gathered with one
    collective and reduced with one: what FSDP2 does per layer group, by placement."""

    def __init__(self, xs: Sequence[Any], dtype: torch.dtype, reduce_dtype: torch.dtype) -> None:
        api = _api()
        first = xs[0]
        self.mesh = first.device_mesh
        sharded = [i for i, p in enumerate(first.placements) if isinstance(p, api.Shard)]
        self.mesh_dim = sharded[0] if sharded else None
        self.world = 1 if self.mesh_dim is None else self.mesh.size(self.mesh_dim)
        self.rank = 0 if self.mesh_dim is None else self.mesh.get_local_rank(self.mesh_dim)
        self.dtype, self.reduce_dtype = dtype, reduce_dtype
        self.members: list[_Member] = []
        offset = 0
        for x in xs:
            dim = None
            if self.mesh_dim is not None:
                dim = x.placements[self.mesh_dim].dim % x.dim()
            member = _Member(x, dim, self.world, offset)
            self.members.append(member)
            offset += member.slot
        self.length = offset  # each rank's flat buffer, padded to the first rank's
        # the flat buffer's placements: Shard(0) where the members are sharded
        self.flat_placements = [
            api.Shard(0) if i == self.mesh_dim else api.Replicate() for i in range(self.mesh.ndim)
        ]

    def gather(self, locals_: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Every member's full tensor in the compute dtype, from this rank's shards."""
        if self.mesh_dim is None:
            return [t.to(self.dtype) for t in locals_]
        api = _api()
        # this rank's shards side by side in one buffer (cast on the way in), each in its slot
        buf = torch.empty(self.length, dtype=self.dtype, device=locals_[0].device)
        for m, t in zip(self.members, locals_, strict=True):
            n = t.numel()
            buf[m.offset : m.offset + n].view(t.shape).copy_(t)
            if m.slot > n:
                buf[m.offset + n : m.offset + m.slot].zero_()
        flat = api.DTensor.from_local(
            buf,
            self.mesh,
            self.flat_placements,
            run_check=False,
            shape=(self.world * self.length,),
            stride=(1,),
        )
        full = flat.redistribute(self.mesh, [api.Replicate()] * self.mesh.ndim).to_local()
        rows = full.view(self.world, self.length)
        out = []
        for m in self.members:
            parts = [
                rows[r, m.offset : m.offset + m.numel(r)].view(m.shapes[r])
                for r in range(self.world)
            ]
            out.append(torch.cat(parts, dim=m.dim or 0))
        return out

    def reduce(self, grads: Sequence[torch.Tensor | None]) -> list[Any]:
        """Each member's gradient averaged over the ranks (``None`` where this rank's loss
        did not reach it), reduced in the reduce dtype, as a DTensor laid out as the member."""
        api = _api()
        device = next(g.device for g in grads if g is not None)
        # every rank's part of every gradient in its slot, cast on the way in: one buffer
        buf = torch.empty(self.world * self.length, dtype=self.reduce_dtype, device=device)
        rows = buf.view(self.world, self.length)
        for m, g in zip(self.members, grads, strict=True):
            for r in range(self.world):
                slot = rows[r, m.offset : m.offset + m.slot]
                if g is None:  # not reached on this rank: zeros to the sum
                    slot.zero_()
                    continue
                n = m.numel(r)
                part = g if m.dim is None else g.narrow(m.dim, *m.pieces[r])
                slot[:n].view(m.shapes[r]).copy_(part)
                if m.slot > n:
                    slot[n:].zero_()
        flat = api.DTensor.from_local(
            buf, self.mesh, [api.Partial("avg")] * self.mesh.ndim, run_check=False
        )
        mine = flat.redistribute(self.mesh, self.flat_placements).to_local()
        out: list[Any] = []
        for m, g in zip(self.members, grads, strict=True):
            if g is None:
                out.append(None)
                continue
            local = mine[m.offset : m.offset + m.numel(self.rank)].view(m.shapes[self.rank])
            out.append(wrap_like(local.to(m.like.dtype), m.like))
        return out


class _GatherBucket(torch.autograd.Function):
    """:class:`_Gather` for a whole :class:`_Bucket`: one all-gather forward, one
    reduce-scatter (or all-reduce) backward."""

    @staticmethod
    def forward(ctx: Any, bucket: _Bucket, *xs: Any) -> tuple[torch.Tensor, ...]:
        ctx.bucket = bucket
        ctx.set_materialize_grads(False)
        locals_ = [x.to_local() for x in xs]
        full = bucket.gather(locals_)
        # fresh tensor objects where nothing was copied (see _Gather.forward)
        return tuple(f.detach() if f is t else f for f, t in zip(full, locals_, strict=True))

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[Any, ...]:
        if all(g is None for g in grads):
            return (None,) * (len(grads) + 1)
        return (None, *ctx.bucket.reduce(grads))


def _bucket_key(x: Any) -> tuple[Any, ...] | None:
    """What a DTensor shares with the others of its bucket, or ``None`` where it takes the
    single-tensor path (two sharded mesh dimensions, a shard not laid out as ``Shard``
    lays it out)."""
    api = _api()
    pattern = tuple(isinstance(p, api.Shard) for p in x.placements)
    if sum(pattern) > 1 or (x.dim() == 0 and any(pattern)):
        return None
    if any(pattern) and tuple(x.to_local().shape) != shard_offset(x)[0]:
        return None
    return (x.device_mesh, pattern)


#: The largest bucket, in bytes of full gradients in the reduce dtype. A bucket's gradients
#: are reduced once all of them are computed, so a smaller cap starts reducing earlier in the
#: backward pass and holds less at once, a larger one calls fewer collectives (8 MiB: a
#: transformer layer of d_model 256 in float32 is 3 MiB).
BUCKET_BYTES = 8 * 2**20


def gather_tree(
    params: dict[str, Any],
    compute_dtype: torch.dtype,
    parameters: frozenset[str],
    reduce_dtype: torch.dtype | None,
) -> dict[str, Any]:
    """``params`` with every DTensor gathered: parameters in ``compute_dtype``, buffers (names
    not in ``parameters``) in their own dtype. A DTensor under two names is gathered once.

    Parameters being differentiated that share a mesh and a sharded mesh dimension (and a
    reduce dtype) are gathered in buckets of up to :data:`BUCKET_BYTES` of full gradients,
    in the tree's order, with one collective each way per bucket (:class:`_Bucket`); the
    others one by one (:func:`gather`).
    """
    done: dict[int, torch.Tensor] = {}
    buckets: dict[Any, list[list[Any]]] = {}
    filled: dict[Any, int] = {}
    for name, x in params.items():
        if type(x) is torch.Tensor or not is_dtensor(x) or id(x) in done:
            continue
        differentiated = torch.is_grad_enabled() and x.requires_grad
        if name in parameters and differentiated and x.is_floating_point():
            _check_placements(x)
            key = _bucket_key(x)
            if key is not None:
                reduce = reduce_dtype or (
                    torch.float64 if x.dtype == torch.float64 else torch.float32
                )
                key = (*key, reduce)
                size = x.numel() * reduce.itemsize
                groups = buckets.setdefault(key, [])
                if not groups or filled[key] + size > BUCKET_BYTES:
                    groups.append([])  # the first, or the last one is full
                    filled[key] = 0
                groups[-1].append(x)
                filled[key] += size
                done[id(x)] = x  # placeholder until its bucket is gathered
                continue
        done[id(x)] = gather(x, compute_dtype if name in parameters else None, reduce_dtype)
    for (*_, reduce), xs in ((key, xs) for key, groups in buckets.items() for xs in groups):
        if len(xs) == 1:
            done[id(xs[0])] = gather(xs[0], compute_dtype, reduce)
            continue
        refuse_transforms("apply_with_policy")
        bucket = _Bucket(xs, compute_dtype, reduce)
        full = _GatherBucket.apply(bucket, *xs)  # type: ignore[no-untyped-call]
        for x, f in zip(xs, full, strict=True):
            done[id(x)] = f
    return {
        name: x if type(x) is torch.Tensor or not is_dtensor(x) else done[id(x)]
        for name, x in params.items()
    }


# --- DTensor gradients: local shards, finite flags, norms --------------------------------------


class Shards:
    """A list of tensors (some DTensors) as their local shards, and back.

    polprec's fused eager kernels (unscaling, norms) run on the local shards; :meth:`rebuild`
    wraps new local tensors into DTensors laid out as the originals; :meth:`agree` makes a
    flag computed from the local shards the same on every rank of their meshes.
    """

    def __init__(self, tensors: Sequence[torch.Tensor]) -> None:
        api = _api()
        self._layouts: list[Any] = []  # the DTensor itself (for its layout), or None
        self.local: list[torch.Tensor] = []
        self.meshes: list[DeviceMesh] = []
        for x in tensors:
            if isinstance(x, api.DTensor):
                self._layouts.append(x)
                self.local.append(x.to_local())
                if x.device_mesh not in self.meshes:
                    self.meshes.append(x.device_mesh)
            else:
                self._layouts.append(None)
                self.local.append(x)

    def rebuild(self, local: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """DTensors with the originals' meshes, placements and shapes around ``local``."""
        from_local = _api().DTensor.from_local
        return [
            t
            if x is None
            else from_local(
                t, x.device_mesh, x.placements, run_check=False, shape=x.shape, stride=x.stride()
            )
            for x, t in zip(self._layouts, local, strict=True)
        ]

    def agree(self, flag: torch.Tensor) -> torch.Tensor:
        """``flag`` AND-ed over every rank of the meshes: one all-reduce (MIN) per mesh dim
        (dimension by dimension, which DTensor takes for the plan it is)."""
        api = _api()
        value = flag.to(torch.int32)
        for mesh in self.meshes:
            placements = [api.Partial("min")] * mesh.ndim
            agreed = api.DTensor.from_local(value, mesh, placements, run_check=False)
            for dim in range(mesh.ndim):
                placements[dim] = api.Replicate()
                agreed = agreed.redistribute(mesh, placements)
            value = agreed.to_local()
        return value.to(torch.bool)

    def global_norms(self, local_norms: Sequence[torch.Tensor], p: float) -> list[torch.Tensor]:
        """From every leaf's local ``p``-norm, norms whose ``p``-norm is the global norm.

        A plain leaf's norm is kept. DTensor leaves are grouped by mesh, by the mesh
        dimensions they are sharded over and by dtype; each group's local norms are combined
        (``sum |.|**p``, or ``max`` for ``p = inf``) and reduced over the sharded mesh
        dimensions (``Partial``; replicated ones hold the same values already): one
        all-reduce per group, where ``clip_grad_norm_`` makes one per leaf. A group sharded
        over no mesh dimension of more than one rank holds its full tensors: its norm is
        the ``vector_norm`` of its leaves' norms, as for plain tensors, so DDP-style
        (``Replicate()``) gradients and those on a one-rank mesh clip bit for bit as the same
        gradients in one process do.
        """
        api = _api()
        out: list[torch.Tensor] = []
        # Keyed on the mesh's value: equal meshes are the same ranks, though DTensor may hand
        # back a result on another mesh object equal to its input's (its sharding cache).
        groups: dict[Any, list[torch.Tensor]] = {}
        for x, n in zip(self._layouts, local_norms, strict=True):
            if x is None:
                out.append(n)
                continue
            mesh = x.device_mesh
            sharded = tuple(
                isinstance(pl, api.Shard) and mesh.size(dim) > 1
                for dim, pl in enumerate(x.placements)
            )
            groups.setdefault((mesh, sharded, n.dtype), []).append(n)
        inf = p == float("inf")
        for (mesh, sharded, _), norms in groups.items():
            stacked = torch.stack(norms)
            if not any(sharded):  # every rank holds the full gradients
                out.append(torch.linalg.vector_norm(stacked, p))
                continue
            local = stacked.max() if inf else stacked.pow(p).sum()
            reduce = api.Partial("max" if inf else "sum")
            placements = [reduce if s else api.Replicate() for s in sharded]
            total = api.DTensor.from_local(local, mesh, placements, run_check=False).full_tensor()
            out.append(total if inf else total.pow(1.0 / p))
        return out


def wrap_like(local: torch.Tensor, like: Any) -> torch.Tensor:
    """``local`` as a DTensor laid out as ``like`` (its mesh, placements, shape and stride);
    ``local`` itself where ``like`` is a plain tensor."""
    if type(like) is torch.Tensor or not is_dtensor(like):
        return local
    wrapped: torch.Tensor = _api().DTensor.from_local(
        local,
        like.device_mesh,
        like.placements,
        run_check=False,
        shape=like.shape,
        stride=like.stride(),
    )
    return wrapped


def same_layout(a: Any, b: Any) -> bool:
    """Whether two DTensors lie on one mesh with the same placements (plain: both plain)."""
    if not is_dtensor(a) or not is_dtensor(b):
        return not is_dtensor(a) and not is_dtensor(b)
    return bool(a.device_mesh == b.device_mesh and a.placements == b.placements)


def plain_flag(flag: Any) -> torch.Tensor:
    """The value of a DTensor flag as a plain tensor, the same on every rank of its mesh
    (``Partial`` placements resolved, as ``full_tensor`` does)."""
    value: torch.Tensor = flag.full_tensor()
    return value


# --- where a shard lies in the full tensor ------------------------------------------------------


def local_shard(x: torch.Tensor) -> torch.Tensor:
    """The part of ``x`` this rank holds: a DTensor's local tensor, a plain tensor itself.

    Examples:
        >>> import torch
        >>> w = torch.zeros(2, 3)
        >>> local_shard(w) is w
        True
    """
    if is_dtensor(x):
        local: torch.Tensor = x.to_local()  # type: ignore[attr-defined]
        return local
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"local_shard takes a tensor or DTensor, got {type(x).__name__}")
    return x


def shard_offset(x: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(local shape, global offset)``: where this rank's shard of ``x`` lies in the full tensor.

    The shard is the block ``full[o0 : o0 + s0, o1 : o1 + s1, ...]``. A plain tensor is all
    of itself (offset 0). ``Shard(d)`` splits dimension ``d`` as ``torch.chunk`` does (the
    last shards may be smaller or empty); several mesh dimensions sharding one tensor
    dimension split it in mesh order, as DTensor does.

    Raises:
        TypeError: ``x`` is not a tensor.
        ValueError: a placement other than ``Replicate()``, ``Shard(d)`` or ``Partial()``,
            or a rank that is not part of ``x``'s mesh.

    Examples:
        >>> import torch
        >>> shard_offset(torch.zeros(4, 3))
        ((4, 3), (0, 0))
    """
    if not is_dtensor(x):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"shard_offset takes a tensor or DTensor, got {type(x).__name__}")
        return tuple(x.shape), (0,) * x.dim()
    api = _api()
    d: Any = x
    mesh = d.device_mesh
    coordinate = mesh.get_coordinate()
    if coordinate is None:
        raise ValueError(f"this rank is not part of the DTensor's mesh {mesh}")
    shape, offset = list(d.shape), [0] * d.dim()
    for mesh_dim, placement in enumerate(d.placements):
        if type(placement) is api.Shard:
            dim = placement.dim % d.dim()
            start, shape[dim] = _piece(shape[dim], mesh.size(mesh_dim), coordinate[mesh_dim])
            offset[dim] += start
        elif not isinstance(placement, api.Replicate | api.Partial):
            raise ValueError(
                f"shard_offset: placement {placement} is not supported; accepted are "
                "Replicate(), Shard(d) and Partial()"
            )
    return tuple(shape), tuple(offset)


def global_indices(x: torch.Tensor) -> torch.Tensor:
    """Each local element's flat (row-major) index in the full tensor, as an int64 tensor of
    the local shape on the local device: ``arange(numel).view(shape)`` for a plain tensor.

    What makes per-element randomness (stochastic rounding) independent of the layout: the
    same element gets the same index on one process and on any mesh.

    Examples:
        >>> import torch
        >>> global_indices(torch.zeros(2, 3))
        tensor([[0, 1, 2],
                [3, 4, 5]])
    """
    shape, offset = shard_offset(x)
    full = tuple(x.shape)
    device = local_shard(x).device
    index = torch.zeros(shape, dtype=torch.int64, device=device)
    stride = 1
    for dim in reversed(range(len(full))):
        along = torch.arange(offset[dim], offset[dim] + shape[dim], device=device) * stride
        index = index + along.view([-1 if i == dim else 1 for i in range(len(full))])
        stride *= full[dim]
    return index
