"""What every polprec optimizer does: check its settings, ``init`` a state, ``step`` purely.

An optimizer is a frozen dataclass of settings. :class:`Optimizer` holds the shared
machinery; :class:`~polprec.optim.SGD` and :class:`~polprec.optim.Adam` add their update
rule twice over: as torch's fused kernel (``_kernel``) and as plain ops (``_rule``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from polprec import _fused, _tree
from polprec._checks import check_grads_finite, check_int, check_number
from polprec.optim._leaves import align, leaves, path_of
from polprec.optim._modes import Mode, check_bool, check_precision, leaf_mode
from polprec.optim._states import OptState
from polprec.optim._torch import from_torch
from polprec.optim._update import Buffers, Inputs, Outputs, fused, plain, replace

__all__ = ["Optimizer"]


def _counters(
    state: OptState, finite: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(step, skips, consecutive_skips, not_finite)`` after this step."""
    if finite is None:
        return state.step + 1, state.skips, torch.zeros_like(state.consecutive_skips), None
    if finite.device != state.step.device:
        finite = finite.to(state.step.device)
    skipped = torch.logical_not(finite)
    return (
        state.step + finite,
        state.skips + skipped,
        (state.consecutive_skips + 1) * skipped,
        skipped,
    )


class Optimizer:
    """The machinery shared by polprec's optimizers (see :func:`~polprec.optim.adamw`)."""

    # Settings every optimizer has; each subclass declares them as dataclass fields.
    lr: float
    maximize: bool
    master_weights: bool | None
    state_dtype: torch.dtype | None
    rounding: str
    kahan: bool

    #: The state class this optimizer's ``init`` returns.
    state_type: ClassVar[type[OptState]]
    #: The moment fields of :attr:`state_type` (those the settings do not use are ``None``).
    slot_fields: ClassVar[tuple[str, ...]]

    # --- what each optimizer provides

    def _slots(self) -> tuple[str, ...]:
        """The moment fields these settings use."""
        raise NotImplementedError

    def _fusable(self) -> bool:
        """Whether torch's fused kernel implements these settings."""
        return True

    def _kernel(self, b: Buffers) -> None:
        raise NotImplementedError

    def _scalars(self, step: torch.Tensor, lr: float | torch.Tensor) -> Any:
        """What the rule needs once per step (bias corrections), from the step count after it."""
        raise NotImplementedError

    def _rule(
        self, param: torch.Tensor, grad: torch.Tensor, slots: list[torch.Tensor], scalars: Any
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        raise NotImplementedError

    # --- settings

    def _check_common(self) -> None:
        """Check and normalise the settings every optimizer has (called by ``__post_init__``)."""
        object.__setattr__(self, "lr", check_number("lr", self.lr, positive=False))
        check_bool("maximize", self.maximize)
        dtype = check_precision(self.master_weights, self.state_dtype, self.rounding, self.kahan)
        object.__setattr__(self, "state_dtype", dtype)

    def _mode(self, dtype: torch.dtype) -> Mode:
        return leaf_mode(dtype, (self.master_weights, self.state_dtype, self.rounding, self.kahan))

    # --- init

    def init(self, params: Any, *, seed: int = 0) -> Any:
        """A fresh state for ``params``: zero moments, counters at 0, master copies as needed.

        Args:
            params: the parameter pytree the steps will update.
            seed: seeds stochastic rounding (an int >= 0); give ensemble members their own.
        """
        seed = check_int("seed", seed, minimum=0)
        p_leaves, spec = _tree.tree_flatten(params)
        floats = [p if _tree.is_float_tensor(p) else None for p in p_leaves]
        modes = [None if p is None else self._mode(p.dtype) for p in floats]
        device = next((p.device for p in floats if p is not None), torch.device("cpu"))

        def tree(make: Any, wanted: Any = None) -> Any:
            built = [
                None if p is None or m is None or (wanted and not wanted(m)) else make(p, m)
                for p, m in zip(floats, modes, strict=True)
            ]
            if wanted is not None and all(x is None for x in built):
                return None
            return _tree.tree_unflatten(spec, built)

        def zeros(p: torch.Tensor, m: Mode) -> torch.Tensor:
            return torch.zeros_like(p, dtype=m.state, memory_format=torch.contiguous_format)

        used = self._slots()
        children: dict[str, Any] = {
            name: tree(zeros) if name in used else None for name in self.slot_fields
        }
        count = torch.zeros((), dtype=torch.int32, device=device)
        stochastic = any(m is not None and m.stochastic for m in modes)
        return self.state_type(
            step=count,
            skips=count.clone(),
            consecutive_skips=count.clone(),
            master=tree(lambda p, m: p.detach().to(torch.float32, copy=True), lambda m: m.master),
            compensation=tree(
                lambda p, m: torch.zeros_like(p, memory_format=torch.contiguous_format),
                lambda m: m.kahan,
            ),
            seed=torch.tensor(seed, dtype=torch.int64, device=device) if stochastic else None,
            **children,
        )

    # --- step

    def step(
        self,
        params: Any,
        grads: Any,
        state: Any,
        *,
        grads_finite: torch.Tensor | bool | None = None,
        lr: float | torch.Tensor | None = None,
        donate: bool = False,
    ) -> tuple[Any, Any]:
        """One update: ``(params, grads, state) -> (params, state)``, pure, no host sync.

        Args:
            params: the parameter pytree; non-floating leaves pass through.
            grads: gradients with the structure of ``params`` (any floating dtype); a
                ``None`` gradient leaves its parameter and its moments as they are.
            state: this optimizer's state (from :meth:`init` or a previous step).
            grads_finite: a 0-dim bool tensor (from :func:`polprec.value_and_grad`): when
                False, parameters and moments come back bitwise unchanged and only the skip
                counters move. ``None``: no check.
            lr: overrides the optimizer's ``lr`` for this step: a number or a 0-dim tensor
                (a schedule that does not recompile under ``torch.compile``).
            donate: let the fused kernels update ``params``' and ``state``'s buffers in place
                instead of copies (as JAX's ``donate_argnums``): both are invalid afterwards.
                Only in eager mode on the fused path; elsewhere the step stays pure.

        Returns:
            ``(new_params, new_state)``.
        """
        if type(state) is not self.state_type:
            raise TypeError(
                f"state must be the {self.state_type.__name__} this optimizer's init(params) "
                f"makes, got {type(state).__name__}"
            )
        check_bool("donate", donate)
        lr_value = self._step_lr(lr)
        finite = None if grads_finite is None else check_grads_finite(grads_finite)
        lv = leaves(params, grads)
        names = self._slots()
        slots = [align(lv.spec, self._slot_tree(state, n, lv.params), params, n) for n in names]
        master = self._aligned(lv.spec, state.master, params, "master")
        comp = self._aligned(lv.spec, state.compensation, params, "compensation")
        by_dtype: dict[torch.dtype, Mode] = {}
        modes = []
        for i in lv.active:
            dtype = lv.params[i].dtype
            mode = by_dtype.get(dtype)
            if mode is None:
                mode = by_dtype[dtype] = self._mode(dtype)
            modes.append(mode)
        self._check_leaves(params, lv.params, lv.active, modes, names, slots, master, comp, state)
        step, skips, consecutive, skipped = _counters(state, finite)
        inp = Inputs(lv.params, lv.active, lv.grads, modes, slots, master, comp, state.seed, step)
        if not lv.active:
            out = Outputs([], [[] for _ in slots], [], [])
        elif self._fusable() and self._may_fuse(inp, lr_value, finite):
            found_inf = None if skipped is None else skipped.to(torch.float32)
            out = fused(
                inp, self._kernel, lr=lr_value, found_inf=found_inf, finite=finite, donate=donate
            )
        else:
            # the count this step would reach (> 0 even where it is skipped: no 1/0 in a
            # branch torch.where discards, which would poison a gradient through the step)
            after = step if finite is None else state.step + 1
            out = plain(inp, self._rule, self._scalars(after, lr_value), finite=finite)
        spec, active = lv.spec, lv.active
        new_params = _tree.tree_unflatten(spec, replace(lv.params, active, out.params))
        children: dict[str, Any] = {
            n: _tree.tree_unflatten(spec, replace(s, active, new))
            for n, s, new in zip(names, slots, out.slots, strict=True)
        }
        for name, old, new in (
            ("master", master, out.master),
            ("compensation", comp, out.compensation),
        ):
            children[name] = (
                None if old is None else _tree.tree_unflatten(spec, _merge(old, active, new))
            )
        new_state = state.replace(step=step, skips=skips, consecutive_skips=consecutive, **children)
        return new_params, new_state

    def _step_lr(self, lr: Any) -> float | torch.Tensor:
        if lr is None:
            return self.lr
        if isinstance(lr, torch.Tensor):
            if lr.dim() != 0 or not lr.is_floating_point():
                raise TypeError(
                    f"lr must be a number or a 0-dim floating tensor, got a tensor of dtype "
                    f"{lr.dtype} and shape {tuple(lr.shape)}"
                )
            return lr
        return check_number("lr", lr, positive=False)

    def _slot_tree(self, state: OptState, name: str, p_leaves: list[Any]) -> Any:
        tree = getattr(state, name)
        if tree is None and p_leaves:  # (a tree without leaves is None for params=None)
            raise ValueError(
                f"state.{name} is None: the state was made by an optimizer with other settings "
                f"than {self!r}; make one with this optimizer's init(params)"
            )
        return tree

    @staticmethod
    def _aligned(spec: Any, tree: Any, params: Any, name: str) -> list[Any] | None:
        return None if tree is None else align(spec, tree, params, name)

    def _check_leaves(
        self,
        params: Any,
        p_leaves: list[Any],
        active: list[int],
        modes: list[Mode],
        names: tuple[str, ...],
        slots: list[list[Any]],
        master: list[Any] | None,
        comp: list[Any] | None,
        state: OptState,
    ) -> None:
        """Every updated leaf has the state its mode needs, in its shape."""
        for k, i in enumerate(active):
            p, mode = p_leaves[i], modes[k]
            if mode.direct and all(
                type(s[i]) is torch.Tensor and s[i].shape == p.shape for s in slots
            ):
                continue
            need = [(n, s[i]) for n, s in zip(names, slots, strict=True)]
            if mode.master:
                need.append(("master", None if master is None else master[i]))
            if mode.kahan:
                need.append(("compensation", None if comp is None else comp[i]))
            for name, x in need:
                if not isinstance(x, torch.Tensor) or x.shape != p.shape:
                    raise ValueError(_missing(params, i, name, x, p, self))
            if mode.stochastic and state.seed is None:
                raise ValueError(
                    "state.seed is None but rounding='stochastic' needs it: make the state "
                    "with this optimizer's init(params)"
                )

    def _may_fuse(self, inp: Inputs, lr: Any, finite: torch.Tensor | None) -> bool:
        if _fused.tracing():
            return False
        tensors = [inp.params[i] for i in inp.active]
        if any(t.device.type not in _fused.OPTIM_DEVICES for t in tensors):
            return False
        tensors += inp.grads  # the state's tensors are polprec's own
        for extra in (lr, finite):
            if isinstance(extra, torch.Tensor):
                tensors.append(extra)
        return _fused.may_fuse(tensors)

    def from_torch_state_dict(
        self, state_dict: Mapping[str, Any], params: Any, *, step: int | None = None
    ) -> Any:
        """This optimizer's state from a ``torch.optim`` optimizer's ``state_dict()``.

        See :func:`polprec.optim.from_torch_state_dict`.
        """
        return from_torch(self, state_dict, params, step=step)


def _merge(old: list[Any], active: list[int], new: list[Any]) -> list[Any]:
    """``old`` with the ``active`` positions replaced where ``new`` has a tensor."""
    out = list(old)
    for i, x in zip(active, new, strict=True):
        if x is not None:
            out[i] = x
    return out


def _missing(params: Any, i: int, name: str, x: Any, p: torch.Tensor, opt: Any) -> str:
    got = (
        "nothing"
        if x is None
        else f"shape {tuple(x.shape)}"
        if isinstance(x, torch.Tensor)
        else repr(x)
    )
    return (
        f"state.{name} has {got} for parameter {path_of(params, i)} ({p.dtype}, shape "
        f"{tuple(p.shape)}): the state was made for other parameters or settings; make one "
        f"with {type(opt).__name__}.init(params)"
    )
