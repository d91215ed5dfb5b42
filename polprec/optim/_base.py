"""What every polprec optimizer is: settings declared once, ``init``, and a pure ``step``.

An optimizer is a frozen dataclass whose fields are its settings. Each field is declared
once, with :func:`setting`: its default, its check and whether ``torch.optim`` has a setting
of that name (which :meth:`Optimizer.from_torch_state_dict` compares). The class adds its
update rule: the moments it keeps (:meth:`Optimizer.slots`), torch's fused kernel that
implements it in place (:meth:`Optimizer.kernel`), the numbers it needs once per step
(:meth:`Optimizer.scalars`) and the same update in plain tensor ops (:meth:`Optimizer.rule`).
How a step runs on a tree (which leaves, which kernel, the skip) is not the optimizer's
business: :mod:`polprec.optim._engine` does it for every optimizer, and for
:func:`~polprec.optim.partition`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch

from polprec import _tree
from polprec._checks import check_int, check_nonnegative
from polprec.optim import _engine, _plan, _precision
from polprec.optim._precision import Mode, check_bool
from polprec.optim._states import OptState
from polprec.optim._torch import from_torch
from polprec.optim._update import Buffers

__all__ = ["Optimizer", "setting"]


# pragma: no mutate start
# (setting() runs only while the optimizer classes are defined, on import: no mutant of it
# can be switched in afterwards; tests/test_optim.py checks the fields it declares)
def setting(
    default: Any,
    *,
    check: Callable[[str, Any], Any] | None = None,
    torch_name: bool = True,
    kw_only: bool = True,
) -> Any:
    """A setting of an optimizer: a dataclass field with its check.

    Args:
        default: the default (torch.optim's, for the settings torch has).
        check: ``check(name, value) -> value``, run by ``__post_init__``; what it returns is
            stored (a normalised value).
        torch_name: ``torch.optim`` has a param-group setting of this name, which must agree
            when a torch optimizer's state is taken over.
        kw_only: keyword-only (every setting but ``lr``).
    """
    return dataclasses.field(
        default=default, kw_only=kw_only, metadata={"check": check, "torch": torch_name}
    )


# pragma: no mutate end


@dataclasses.dataclass(frozen=True)
class Optimizer:
    """The settings every polprec optimizer has, and the machinery they share.

    Attributes:
        lr: learning rate (>= 0); ``step`` may override it (``lr=``) or scale it
            (``lr_scale=``) for one step.
        maximize: maximize the objective instead of minimizing it.
        master_weights: keep float32 master copies of 16-bit parameters, update them and
            return each parameter in its own dtype (Apex O2, DeepSpeed's bf16 optimizer).
            ``None`` (the default): on for 16-bit parameters unless ``kahan`` or stochastic
            rounding is asked for, which exist to make them unnecessary.
        state_dtype: the dtype of the moments; ``None``: float32 for 16-bit parameters, the
            parameter's dtype otherwise.
        rounding: how updated values are written into 16-bit parameters: ``"nearest"`` or
            ``"stochastic"`` (unbiased; its random bits come from a counter in the state and
            each element's place in the full tensor, whatever the grouping or sharding).
        kahan: Kahan-compensated updates of 16-bit parameters without a master copy (a
            compensation buffer in the parameter's dtype); exclusive with
            ``master_weights=True``.
    """

    lr: float = setting(1e-3, check=check_nonnegative, kw_only=False)
    maximize: bool = setting(False, check=check_bool)
    master_weights: bool | None = setting(None, torch_name=False)
    state_dtype: torch.dtype | None = setting(None, torch_name=False)
    rounding: str = setting("nearest", torch_name=False)
    kahan: bool = setting(False, torch_name=False)
    # a per-object cache, no setting: equality, hashing and repr ignore it
    _plans: dict[Any, _plan.Plan] = dataclasses.field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    #: The state class this optimizer's ``init`` returns.
    state_type: ClassVar[type[OptState]]
    #: The moment fields of :attr:`state_type` (those the settings do not use are ``None``).
    slot_fields: ClassVar[tuple[str, ...]]

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            check = field.metadata.get("check")
            if check is not None and field.init:
                object.__setattr__(self, field.name, check(field.name, getattr(self, field.name)))
        dtype = _precision.check(self.master_weights, self.state_dtype, self.rounding, self.kahan)
        object.__setattr__(self, "state_dtype", dtype)
        self.validate()

    # --- the update rule: what each optimizer provides

    def validate(self) -> None:
        """Check settings against each other (each field is checked on its own before)."""

    def slots(self) -> tuple[str, ...]:
        """The moment fields these settings use."""
        raise NotImplementedError

    def fusable(self) -> bool:
        """Whether torch's fused kernel implements these settings."""
        return True

    def kernel(self, b: Buffers) -> None:
        """The update, in place, by torch's fused kernel for one device and dtype."""
        raise NotImplementedError

    def scalars(self, step: torch.Tensor, lr: float | torch.Tensor) -> Any:
        """What :meth:`rule` needs once per step (bias corrections), from the step count after
        it."""
        raise NotImplementedError

    def rule(
        self, param: torch.Tensor, grad: torch.Tensor, slots: list[torch.Tensor], scalars: Any
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The update of one leaf in plain tensor ops: ``(param, slots) -> (param, slots)``."""
        raise NotImplementedError

    def __iter__(self) -> Any:
        raise TypeError(
            f"{type(self).__name__} is a polprec optimizer: settings only, no parameters or "
            "state to iterate (torch.optim's param_groups). Its state is the opt_state its "
            "init(params) made: checkpoint opt_state.state_dict() (with "
            "torch.distributed.checkpoint, a dict of the params and opt_state.state_dict()), "
            "not the optimizer"
        )

    # --- what the machinery asks

    def mode(self, dtype: torch.dtype) -> Mode:
        """How a parameter of ``dtype`` is updated under these precision options (asked once
        per leaf by ``init`` and by each plan, which the optimizer keeps)."""
        return _precision.leaf_mode(
            dtype, self.master_weights, self.state_dtype, self.rounding, self.kahan
        )

    @classmethod
    def torch_settings(cls) -> tuple[str, ...]:
        """The settings ``torch.optim`` has under the same names."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get("torch"))

    # --- init, step

    def init(self, params: Any, *, seed: int = 0) -> Any:
        """A fresh state for ``params``: zero moments, counters at 0, master copies as needed.

        Args:
            params: the parameter pytree the steps will update.
            seed: seeds stochastic rounding (an int >= 0); give ensemble members their own.
        """
        seed = check_int("seed", seed, minimum=0)
        _tree.check_tree(params, "params")
        leaves, spec = _tree.tree_flatten(params)
        floats = [p if _tree.is_float_tensor(p) else None for p in leaves]
        count = _engine.zero_count(floats)
        return _engine.init_state(self, spec, floats, count, seed)

    def step(
        self,
        params: Any,
        grads: Any,
        state: Any,
        *,
        grads_finite: torch.Tensor | bool | None = None,
        lr: float | torch.Tensor | None = None,
        lr_scale: float | torch.Tensor | None = None,
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
                counters move. ``None`` (the default): the step checks the gradients itself
                and skips if any element is not finite (in eager mode inside the fused
                kernel's skip, as GradScaler's ``found_inf``). ``True``: no check.
            lr: overrides the optimizer's ``lr`` for this step: a number or a 0-dim tensor
                (a schedule that does not recompile under ``torch.compile``).
            lr_scale: multiplies the learning rate for this step (a number or a 0-dim
                tensor), as torch's ``LambdaLR`` does: ``lr_scale=schedule(state.step)``.
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
        rate = _engine.learning_rate(
            self.lr if lr is None else _engine.check_lr("lr", lr), lr_scale
        )
        new_params, (new_state,), _ = _engine.step(
            self._plans,
            (self,),
            None,
            params,
            grads,
            (state,),
            state,
            grads_finite,
            (rate,),
            donate,
        )
        return new_params, new_state

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
        start from zero moments. (A torch optimizer with several param groups maps onto
        :func:`~polprec.optim.partition`.)

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
