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
from polprec.optim import _fast
from polprec.optim._leaves import check_lr, check_state, leaves, state_leaves
from polprec.optim._modes import Mode, check_bool, check_precision, leaf_mode
from polprec.optim._states import OptState
from polprec.optim._torch import from_torch
from polprec.optim._update import (
    Buffers,
    Inputs,
    Outputs,
    counters,
    fused,
    merge,
    plain,
    replace,
)

__all__ = ["Optimizer"]


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
        _tree.check_tree(params, "params")
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
        _tree.check_tree(params, "params")
        _tree.check_tree(grads, "grads")
        lr_value = self.lr if lr is None else check_lr(lr)
        finite = None if grads_finite is None else check_grads_finite(grads_finite)
        short = _fast.step(self, params, grads, state, finite, lr_value, donate)
        if short is not None:
            return short
        lv = leaves(params, grads)
        names = self._slots()
        slots, master, comp = state_leaves(self, state, names, lv, params)
        by_dtype: dict[torch.dtype, Mode] = {}
        modes = []
        for i in lv.active:
            dtype = lv.params[i].dtype
            mode = by_dtype.get(dtype)
            if mode is None:
                mode = by_dtype[dtype] = self._mode(dtype)
            modes.append(mode)
        check_state(self, state, params, lv, modes, names, (slots, master, comp))
        step, skips, consecutive, skipped = counters(state, finite)
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
                None if old is None else _tree.tree_unflatten(spec, merge(old, active, new))
            )
        new_state = state.replace(step=step, skips=skips, consecutive_skips=consecutive, **children)
        return new_params, new_state

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

        The torch optimizer's settings (every group's ``lr``, ``betas``, ``momentum``, ...)
        must equal this optimizer's; an error names any that differ. torch numbers
        parameters in the order its optimizer was given them (``model.parameters()``); they
        are matched with the floating leaves of ``params`` in tree order, which
        ``dict(model.named_parameters())`` shares. The moments are copied into this state's
        dtypes; master copies come from ``params``. Parameters torch holds no state for
        start from zero moments.

        Args:
            state_dict: ``torch_optimizer.state_dict()``.
            params: the parameter pytree the polprec steps will update.
            step: the step count of the new state. ``None``: torch's (Adam and AdamW record
                one per parameter, which must agree); SGD records none, so 1 when torch has
                momentum buffers (a step was taken), else 0.

        Raises:
            TypeError: ``state_dict`` is not a torch optimizer's state dict.
            ValueError: a setting differs, the parameters do not line up (count or shapes),
                or the per-parameter step counts differ (pass ``step=``).

        Examples:
            >>> import torch
            >>> import polprec as pp
            >>> model = torch.nn.Linear(2, 1)
            >>> torch_opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
            >>> model(torch.ones(1, 2)).sum().backward()
            >>> torch_opt.step()
            >>> params = {k: v.detach() for k, v in model.named_parameters()}
            >>> state = pp.optim.adamw(1e-2).from_torch_state_dict(torch_opt.state_dict(), params)
            >>> int(state.step), state.exp_avg["bias"]
            (1, tensor([0.1000]))
        """
        return from_torch(self, state_dict, params, step=step)
