"""polprec.optim's bad-input table: every bad option or argument raises a TypeError or
ValueError that names the bad value and what is accepted, and leaves its inputs alone."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
import torch

import polprec as pp

sgd, adam, adamw = pp.optim.sgd, pp.optim.adam, pp.optim.adamw

# (what, call, exception, fragments the message must contain)
OPTIONS: list[tuple[str, Callable[[], Any], type[Exception], list[str]]] = [
    ("negative lr", lambda: sgd(-0.1), ValueError, ["lr", "-0.1", ">= 0"]),
    ("lr string", lambda: adam("1e-3"), TypeError, ["lr", "'1e-3'", "number"]),  # type: ignore[arg-type]
    ("nan lr", lambda: adamw(float("nan")), ValueError, ["lr", "nan", "finite"]),
    ("bool lr", lambda: sgd(True), TypeError, ["lr", "True"]),
    (
        "negative momentum",
        lambda: sgd(0.1, momentum=-0.9),
        ValueError,
        ["momentum", "-0.9", ">= 0"],
    ),
    (
        "dampening > 1",
        lambda: sgd(0.1, momentum=0.9, dampening=2.0),
        ValueError,
        ["dampening", "2.0", "[0, 1]"],
    ),
    (
        "nesterov without momentum",
        lambda: sgd(0.1, nesterov=True),
        ValueError,
        [
            "nesterov=True needs momentum > 0 and dampening == 0 (as torch.optim.SGD), got "
            "momentum=0.0, dampening=0.0"
        ],
    ),
    (
        "negative dampening",
        lambda: sgd(0.1, momentum=0.9, dampening=-0.1),
        ValueError,
        ["dampening must be a finite number >= 0, got -0.1"],
    ),
    (
        "adamw not decoupled",
        lambda: adamw(decoupled_weight_decay=False),
        TypeError,
        [
            "adamw() always decouples weight decay; for an L2 penalty use "
            "pp.optim.adam(..., weight_decay=...)"
        ],
    ),
    (
        "nesterov with dampening",
        lambda: sgd(0.1, momentum=0.9, dampening=0.1, nesterov=True),
        ValueError,
        ["nesterov", "dampening=0.1"],
    ),
    (
        "nesterov not bool",
        lambda: sgd(0.1, momentum=0.9, nesterov=1),
        TypeError,
        ["nesterov", "True or False", "1"],
    ),  # type: ignore[arg-type]
    (
        "negative weight decay",
        lambda: adamw(weight_decay=-1e-2),
        ValueError,
        ["weight_decay", "-0.01", ">= 0"],
    ),
    ("beta1 = 1", lambda: adam(betas=(1.0, 0.999)), ValueError, ["betas[0]", "1.0", "[0, 1)"]),
    ("beta2 > 1", lambda: adamw(betas=(0.9, 1.5)), ValueError, ["betas[1]", "1.5", "[0, 1)"]),
    ("negative beta", lambda: adam(betas=(-0.1, 0.9)), ValueError, ["betas[0]", "-0.1", ">= 0"]),
    ("one beta", lambda: adam(betas=0.9), TypeError, ["betas", "0.9", "pair"]),  # type: ignore[arg-type]
    ("three betas", lambda: adam(betas=(0.9, 0.99, 0.999)), TypeError, ["betas", "pair"]),  # type: ignore[arg-type]
    ("negative eps", lambda: adam(eps=-1e-8), ValueError, ["eps", "-1e-08", ">= 0"]),
    (
        "amsgrad not bool",
        lambda: adam(amsgrad="yes"),
        TypeError,
        ["amsgrad", "'yes'", "True or False"],
    ),  # type: ignore[arg-type]
    ("maximize not bool", lambda: sgd(0.1, maximize=None), TypeError, ["maximize", "None"]),  # type: ignore[arg-type]
    (
        "unknown rounding",
        lambda: adamw(rounding="up"),
        ValueError,
        ["rounding", "'up'", "'nearest'", "'stochastic'"],
    ),
    ("rounding not str", lambda: adamw(rounding=1), TypeError, ["rounding", "1", "'nearest'"]),  # type: ignore[arg-type]
    (
        "master and kahan",
        lambda: adamw(master_weights=True, kahan=True),
        ValueError,
        [
            "master_weights=True and kahan=True are exclusive: Kahan compensation keeps the "
            "bits a 16-bit parameter loses without a master copy; choose one"
        ],
    ),
    (
        "master_weights str",
        lambda: sgd(0.1, master_weights="on"),
        TypeError,
        ["master_weights", "'on'", "True, False or None"],
    ),  # type: ignore[arg-type]
    ("kahan int", lambda: sgd(0.1, kahan=1), TypeError, ["kahan must be True or False, got 1"]),  # type: ignore[arg-type]
    (
        "integer state dtype",
        lambda: adamw(state_dtype=torch.int8),
        ValueError,
        ["torch.int8", "torch.float32"],
    ),
    ("unknown state dtype", lambda: adamw(state_dtype="fp8"), ValueError, ["'fp8'", "bf16"]),
    ("state dtype type", lambda: adamw(state_dtype=16), TypeError, ["16", "dtype"]),  # type: ignore[arg-type]
    (
        "negative seed",
        lambda: adamw().init({"w": torch.ones(1)}, seed=-1),
        ValueError,
        ["seed", "-1", ">= 0"],
    ),
]


def _check(call: Callable[[], Any], exc: type[Exception], fragments: list[str]) -> None:
    with pytest.raises(exc) as info:
        call()
    message = str(info.value)
    for fragment in fragments:
        if fragment.endswith("$"):  # the end of the message
            assert message.endswith(fragment[:-1]), f"{message!r} does not end {fragment!r}"
        else:
            assert fragment in message, f"{fragment!r} not in {message!r}"


@pytest.mark.parametrize(("what", "call", "exc", "fragments"), OPTIONS, ids=[o[0] for o in OPTIONS])
def test_bad_options(
    what: str, call: Callable[[], Any], exc: type[Exception], fragments: list[str]
) -> None:
    _check(call, exc, fragments)


def _setup() -> tuple[Any, dict[str, torch.Tensor], Any]:
    opt = adamw()
    params = {"layer": {"w": torch.ones(2, 3)}, "b": torch.ones(3)}
    return opt, params, opt.init(params)


def _step(**changes: Any) -> Callable[[], Any]:
    def call() -> Any:
        opt, params, state = _setup()
        args: dict[str, Any] = {
            "params": params,
            "grads": {"layer": {"w": torch.ones(2, 3)}, "b": torch.ones(3)},
            "state": state,
        }
        args.update(changes)
        return opt.step(args.pop("params"), args.pop("grads"), args.pop("state"), **args)

    return call


def _floats(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {"w": torch.ones(2, 3, dtype=dtype), "b": torch.ones(3, dtype=dtype)}


def _half_step(opt: Any, change: Callable[[Any], Any]) -> Any:
    """A step of ``opt`` on bfloat16 parameters with its own state changed by ``change``."""
    params = _floats(torch.bfloat16)
    return opt.step(params, _floats(torch.bfloat16), change(opt.init(params)))


STEPS: list[tuple[str, Callable[[], Any], type[Exception], list[str]]] = [
    (
        "grads missing a key",
        _step(grads={"layer": {"w": torch.ones(2, 3)}}),
        ValueError,
        ["grads", "missing in grads: ['b']"],
    ),
    (
        "grads with an extra key",
        _step(grads={"layer": {"w": torch.ones(2, 3), "v": torch.ones(1)}, "b": torch.ones(3)}),
        ValueError,
        ["grads", "layer.v"],
    ),
    (
        "grads not a tree of params",
        _step(grads=[torch.ones(2, 3), torch.ones(3)]),
        ValueError,
        ["grads must have the structure of params"],
    ),
    (
        "grad of the wrong shape",
        _step(grads={"layer": {"w": torch.ones(3, 2)}, "b": torch.ones(3)}),
        ValueError,
        ["layer.w", "(3, 2)", "(2, 3)"],
    ),
    (
        "integer grad",
        _step(grads={"layer": {"w": torch.ones(2, 3, dtype=torch.int64)}, "b": torch.ones(3)}),
        TypeError,
        ["layer.w", "torch.int64", "floating"],
    ),
    (
        "grad not a tensor",
        _step(grads={"layer": {"w": 1.0}, "b": torch.ones(3)}),
        TypeError,
        ["the gradient of layer.w must be a floating tensor or None, got float$"],
    ),
    (
        "state of another optimizer",
        _step(state=sgd(0.1).init({"b": torch.ones(3)})),
        TypeError,
        ["AdamState", "SGDState"],
    ),
    (
        "state of other params",
        _step(state=adamw().init({"layer": {"w": torch.ones(2, 3)}})),
        ValueError,
        ["state.exp_avg", "structure of params"],
    ),
    (
        "state of other shapes",
        _step(state=adamw().init({"layer": {"w": torch.ones(3, 2)}, "b": torch.ones(3)})),
        ValueError,
        ["state.exp_avg", "layer.w", "(3, 2)", "init(params)"],
    ),
    (
        "state without amsgrad",
        lambda: adamw(amsgrad=True).step(
            *_setup()[1:2], {"layer": {"w": torch.ones(2, 3)}, "b": torch.ones(3)}, _setup()[2]
        ),
        ValueError,
        ["max_exp_avg_sq", "init(params)"],
    ),
    (
        "state master of other params",
        lambda: _half_step(adamw(), lambda st: st.replace(master={"w": st.master["w"]})),
        ValueError,
        ["state.master must have the structure of params", "missing in state.master: ['b']"],
    ),
    (
        "state compensation of other params",
        lambda: _half_step(
            sgd(0.1, kahan=True), lambda st: st.replace(compensation={"b": st.compensation["b"]})
        ),
        ValueError,
        ["state.compensation must have the structure of params", "['w']"],
    ),
    (
        "state without master copies",
        lambda: _half_step(adamw(), lambda st: adamw().init(_floats(torch.float32))),
        ValueError,
        [
            "state.master has nothing for parameter w (torch.bfloat16, shape (2, 3)): the state "
            "was made for other parameters or settings; make one with Adam.init(params)"
        ],
    ),
    (
        "state without compensation",
        lambda: _half_step(
            sgd(0.1, momentum=0.9, kahan=True),
            lambda st: sgd(0.1, momentum=0.9).init(_floats(torch.bfloat16)),
        ),
        ValueError,
        ["state.compensation has nothing for parameter w", "make one with SGD.init(params)"],
    ),
    (
        "state master of other shapes",
        lambda: _half_step(
            adamw(), lambda st: st.replace(master={**st.master, "b": torch.zeros(2)})
        ),
        ValueError,
        ["state.master has shape (2,) for parameter b (torch.bfloat16, shape (3,))"],
    ),
    (
        "state moment a number",
        lambda: _half_step(adamw(), lambda st: st.replace(exp_avg={**st.exp_avg, "b": 0.0})),
        ValueError,
        ["state.exp_avg has shape () for parameter b"],
    ),
    (
        "state without a seed",
        lambda: _half_step(
            adamw(rounding="stochastic"),
            lambda st: adamw(master_weights=False).init(_floats(torch.bfloat16)),
        ),
        ValueError,
        [
            "state.seed is None but rounding='stochastic' needs it: make the state with this "
            "optimizer's init(params)"
        ],
    ),
    (
        "params a module",
        _step(params=torch.nn.Linear(2, 3)),
        TypeError,
        ["params must be a tree of tensors, got the module Linear"],
    ),
    (
        "grads a module",
        _step(grads=torch.nn.Linear(2, 3)),
        TypeError,
        ["grads must be a tree of tensors, got the module Linear"],
    ),
    (
        "init of a module",
        lambda: adamw().init(torch.nn.Linear(2, 3)),
        TypeError,
        ["params must be a tree of tensors, got the module Linear"],
    ),
    (
        "init seed a float",
        lambda: adamw().init({"w": torch.ones(1)}, seed=1.5),
        TypeError,
        ["seed must be an int >= 0, got 1.5"],
    ),
    ("negative lr", _step(lr=-1.0), ValueError, ["lr must be a finite number >= 0, got -1.0"]),
    ("lr tensor of shape (1,)", _step(lr=torch.tensor([0.1])), TypeError, ["lr", "0-dim", "(1,)"]),
    ("integer lr tensor", _step(lr=torch.tensor(1)), TypeError, ["lr", "torch.int64"]),
    (
        "finite flag not bool",
        _step(grads_finite=torch.tensor(1.0)),
        ValueError,
        ["grads_finite", "torch.bool", "torch.float32"],
    ),
    ("finite flag a string", _step(grads_finite="yes"), TypeError, ["grads_finite", "'yes'"]),
    ("donate not bool", _step(donate=1), TypeError, ["donate must be True or False, got 1"]),
    (
        "negative lr_scale",
        _step(lr_scale=-0.5),
        ValueError,
        ["lr_scale must be a finite number >= 0, got -0.5"],
    ),
    ("lr_scale a string", _step(lr_scale="1"), TypeError, ["lr_scale", "'1'"]),
    (
        "lr_scale tensor of shape (2,)",
        _step(lr_scale=torch.ones(2)),
        TypeError,
        ["lr_scale", "0-dim", "(2,)"],
    ),
]


@pytest.mark.parametrize(("what", "call", "exc", "fragments"), STEPS, ids=[s[0] for s in STEPS])
def test_bad_step_arguments(
    what: str, call: Callable[[], Any], exc: type[Exception], fragments: list[str]
) -> None:
    _check(call, exc, fragments)


# --- partition and schedules ------------------------------------------------------------------


def _two(labels: Any) -> Callable[[], Any]:
    def call() -> Any:
        opt = pp.optim.partition({"a": sgd(0.1), "b": adamw()}, labels)
        return opt.init({"w": torch.ones(2, 2), "b": torch.ones(2)})

    return call


def _partition_step(**changes: Any) -> Callable[[], Any]:
    def call() -> Any:
        opt = pp.optim.partition(
            {"a": sgd(0.1), "b": adamw()}, lambda p, x: "a" if p == "w" else "b"
        )
        params = {"w": torch.ones(2, 2), "b": torch.ones(2)}
        args: dict[str, Any] = {"params": params, "grads": params, "state": opt.init(params)}
        args.update(changes)
        return opt.step(args.pop("params"), args.pop("grads"), args.pop("state"), **args)

    return call


def _two_labels() -> Any:
    return pp.optim.partition({"a": sgd(0.1), "b": adamw()}, lambda p, x: "a" if p == "w" else "b")


def _partition_state() -> Any:
    return _two_labels().init({"w": torch.ones(2, 2), "b": torch.ones(2)})


GROUPS: list[tuple[str, Callable[[], Any], type[Exception], list[str]]] = [
    (
        "optimizers not a dict",
        lambda: pp.optim.partition([sgd(0.1)], lambda p, x: "a"),  # type: ignore[arg-type]
        TypeError,
        [
            "optimizers must be a non-empty dict from label to a polprec optimizer, e.g. "
            "{'decay': pp.optim.adamw(3e-4), 'no_decay': pp.optim.adamw(3e-4, "
            "weight_decay=0.0)}, got [SGD("
        ],
    ),
    ("no optimizers", lambda: pp.optim.partition({}, lambda p, x: "a"), TypeError, ["non-empty"]),
    (
        "a torch optimizer",
        lambda: pp.optim.partition({"a": torch.optim.SGD}, lambda p, x: "a"),  # type: ignore[dict-item]
        TypeError,
        ["optimizers['a'] must be a polprec optimizer", "of type type"],
    ),
    (
        "a label not a str",
        lambda: pp.optim.partition({0: sgd(0.1)}, lambda p, x: 0),  # type: ignore[dict-item]
        TypeError,
        ["labels of optimizers must be str", "0"],
    ),
    (
        "an unknown label from the function",
        _two(lambda p, x: "c"),
        ValueError,
        ["'c'", "parameter", "['a', 'b']"],
    ),
    (
        "an unknown label in the tree",
        _two({"w": "a", "b": "decay"}),
        ValueError,
        ["'decay'", "parameter b", "['a', 'b']"],
    ),
    ("labels tree of other keys", _two({"w": "a"}), ValueError, ["labels", "missing in labels"]),
    (
        "a label not hashable",
        _two(lambda p, x: ["a"]),
        ValueError,
        ["labels gives ['a'] for parameter w; every floating parameter needs one of"],
    ),
    (
        "labels an iterator",
        _two(iter(["a", "b"])),
        TypeError,
        ["labels must be a tree", "list_iterator"],
    ),
    (
        "partition init of a module",
        lambda: pp.optim.partition({"a": sgd(0.1)}, lambda p, x: "a").init(torch.nn.Linear(2, 2)),
        TypeError,
        ["params must be a tree of tensors, got the module Linear"],
    ),
    (
        "partition init seed negative",
        lambda: pp.optim.partition({"a": sgd(0.1)}, lambda p, x: "a").init(
            {"w": torch.ones(1)}, seed=-1
        ),
        ValueError,
        ["seed must be an int >= 0, got -1"],
    ),
    (
        "a label's state of another optimizer",
        lambda: _partition_step(
            state=_partition_state().replace(
                states={"a": sgd(0.1).init({"w": torch.ones(2, 2)}), "b": sgd(0.1).init({})}
            )
        )(),
        TypeError,
        ["state.states['b'] is a SGDState, but that label's optimizer makes a AdamState"],
    ),
    (
        "labels as the module",
        _two(torch.nn.Linear(2, 2)),
        TypeError,
        ["labels must be a tree", "Linear"],
    ),
    (
        "a single optimizer's state",
        _partition_step(state=sgd(0.1).init({"w": torch.ones(2, 2)})),
        TypeError,
        ["PartitionState", "SGDState"],
    ),
    (
        "a state of other labels",
        lambda: pp.optim.partition({"a": sgd(0.1), "c": adamw()}, lambda p, x: "a").step(
            {"w": torch.ones(2)},
            {"w": torch.ones(2)},
            pp.optim.partition({"a": sgd(0.1), "b": adamw()}, lambda p, x: "a").init(
                {"w": torch.ones(2)}
            ),
        ),
        ValueError,
        ["['a', 'b']", "['a', 'c']", "init(params)"],
    ),
    ("partition lr_scale negative", _partition_step(lr_scale=-1.0), ValueError, ["lr_scale"]),
    (
        "partition donate not bool",
        _partition_step(donate="no"),
        TypeError,
        ["donate must be True or False, got 'no'"],
    ),
    (
        "partition from a torch state dict of params that are a module",
        lambda: _two_labels().from_torch_state_dict(
            {"state": {}, "param_groups": [{"params": []}, {"params": []}]}, torch.nn.Linear(1, 1)
        ),
        TypeError,
        ["params must be a tree of tensors, got the module Linear"],
    ),
    (
        "partition from torch param groups not a list",
        lambda: _two_labels().from_torch_state_dict(
            {"state": {}, "param_groups": {"a": 1}}, {"w": torch.ones(1)}
        ),
        ValueError,
        [
            "the torch optimizer has {'a': 1} param groups but this partition has 2 labels "
            "['a', 'b']; torch's group i maps to the i-th label"
        ],
    ),
    (
        "partition from torch settings of another group",
        lambda: _two_labels().from_torch_state_dict(
            torch.optim.SGD(
                [{"params": [torch.nn.Parameter(torch.ones(2, 2))]}, {"params": []}], lr=0.1
            ).state_dict(),
            {"w": torch.ones(2, 2)},
        ),
        ValueError,
        ["param group 1 of the torch optimizer has lr=0.1 but this optimizer has lr=0.001"],
    ),
    (
        "from a torch state dict that is none",
        lambda: pp.optim.partition({"a": sgd(0.1)}, lambda p, x: "a").from_torch_state_dict(
            {"state": {}}, {"w": torch.ones(2)}
        ),
        TypeError,
        [
            "state_dict must be a torch.optim optimizer's state_dict(): a mapping with keys "
            "'state' and 'param_groups', got dict"
        ],
    ),
    (
        "cosine steps negative",
        lambda: pp.optim.warmup_cosine(-1, 5),
        ValueError,
        ["warmup_steps must be an int >= 0, got -1"],
    ),
    (
        "linear total a float",
        lambda: pp.optim.warmup_linear(1, 5.0),
        TypeError,
        ["total_steps must be an int >= 0, got 5.0"],
    ),  # type: ignore[arg-type]
    (
        "cosine floor a string",
        lambda: pp.optim.warmup_cosine(1, 5, min_factor="0"),  # type: ignore[arg-type]
        TypeError,
        ["min_factor must be a Python number, got '0'"],
    ),
    (
        "cosine warm-up past the end",
        lambda: pp.optim.warmup_cosine(10, 5),
        ValueError,
        ["total_steps (5)", "warmup_steps (10)"],
    ),
    (
        "cosine floor above 1",
        lambda: pp.optim.warmup_cosine(1, 5, min_factor=2.0),
        ValueError,
        ["min_factor", "[0, 1]", "2.0"],
    ),
    ("cosine steps a float", lambda: pp.optim.warmup_cosine(1.5, 5), TypeError, ["warmup_steps"]),  # type: ignore[arg-type]
    ("linear negative steps", lambda: pp.optim.warmup_linear(0, -1), ValueError, ["total_steps"]),
    (
        "a schedule given a step vector",
        lambda: pp.optim.warmup_linear(1, 5)(torch.ones(2)),
        TypeError,
        ["0-dim", "(2,)"],
    ),
    (
        "a schedule given a bool step",
        lambda: pp.optim.warmup_linear(1, 5)(torch.tensor(True)),
        TypeError,
        ["got a tensor of dtype torch.bool and shape ()"],
    ),
    (
        "a schedule given a negative step",
        lambda: pp.optim.warmup_linear(1, 5)(-1),
        ValueError,
        ["step must be an int >= 0, got -1"],
    ),
]


@pytest.mark.parametrize(("what", "call", "exc", "fragments"), GROUPS, ids=[s[0] for s in GROUPS])
def test_bad_partition_and_schedule_arguments(
    what: str, call: Callable[[], Any], exc: type[Exception], fragments: list[str]
) -> None:
    _check(call, exc, fragments)


def test_complex_parameters_with_gradients_are_refused() -> None:
    params = {"z": torch.ones(2, dtype=torch.complex64)}
    opt = sgd(0.1)
    _check(
        lambda: opt.step(params, {"z": torch.ones(2, dtype=torch.complex64)}, opt.init(params)),
        TypeError,
        [
            "parameter z is complex (torch.complex64); polprec.optim updates real "
            "floating-point parameters (pass torch.view_as_real(p))$"
        ],
    )


def test_a_gradient_for_a_non_floating_leaf_is_refused() -> None:
    params = {"n": torch.tensor(3)}
    opt = sgd(0.1)
    _check(
        lambda: opt.step(params, {"n": torch.tensor(1.0)}, opt.init(params)),
        ValueError,
        [
            "grads has a tensor at n, where params has a non-floating Tensor leaf; its "
            "gradient must be None$"
        ],
    )


def test_bad_input_leaves_the_inputs_alone() -> None:
    opt, params, state = _setup()
    before = [t.clone() for t in pp._tree.tree_leaves((params, state))]
    with pytest.raises(ValueError, match=re.escape("layer.w")):
        opt.step(params, {"layer": {"w": torch.ones(3, 2)}, "b": torch.ones(3)}, state)
    after = pp._tree.tree_leaves((params, state))
    assert all(torch.equal(a, b) for a, b in zip(after, before, strict=True))


# --- optimizer states ---------------------------------------------------------------------------


def _counters(**changes: Any) -> dict[str, Any]:
    fields = {
        "step": torch.tensor(0),
        "skips": torch.tensor(0),
        "consecutive_skips": torch.tensor(0),
        "master": None,
        "compensation": None,
        "seed": None,
        "momentum_buffer": None,
    }
    return fields | changes


def _partition_dict(**changes: Any) -> dict[str, Any]:
    return {**_partition_state().state_dict(), **changes}


STATES: list[tuple[str, Callable[[], Any], type[Exception], list[str]]] = [
    (
        "an int step",
        lambda: pp.optim.SGDState(**_counters(step=3)),
        TypeError,
        ["SGDState.step must be an integer tensor, got 3"],
    ),
    (
        "a float skip count",
        lambda: pp.optim.SGDState(**_counters(skips=torch.tensor(0.0))),
        TypeError,
        ["SGDState.skips must be an integer tensor, got tensor(0.)"],
    ),
    (
        "an int seed",
        lambda: pp.optim.SGDState(**_counters(seed=3)),
        TypeError,
        ["SGDState.seed must be a tensor or None"],
    ),
    (
        "a partition state dict not a mapping",
        lambda: pp.optim.PartitionState.from_state_dict([1]),  # type: ignore[arg-type]
        TypeError,
        ["state_dict must be a mapping, got list; pass the output of state_dict()"],
    ),
    (
        "a single state's dict for a partition",
        lambda: pp.optim.PartitionState.from_state_dict(
            sgd(0.1).init({"w": torch.ones(1)}).state_dict()
        ),
        ValueError,
        ["state_dict is of a SGDState, not a PartitionState"],
    ),
    (
        "a partition state dict without its states",
        lambda: pp.optim.PartitionState.from_state_dict(
            {k: v for k, v in _partition_dict().items() if k != "states"}
        ),
        ValueError,
        [
            "state_dict for PartitionState has missing keys ['states'] and unknown keys []; "
            "expected keys ['consecutive_skips', 'skips', 'states', 'step', 'type']"
        ],
    ),
    (
        "a partition state dict with another key",
        lambda: pp.optim.PartitionState.from_state_dict(_partition_dict(extra=1)),
        ValueError,
        ["has missing keys [] and unknown keys ['extra']"],
    ),
    (
        "a partition state dict with a list of states",
        lambda: pp.optim.PartitionState.from_state_dict(_partition_dict(states=[1])),
        TypeError,
        ["state_dict['states'] must be a mapping by label, got [1]"],
    ),
    (
        "a partition state dict with a label's state not a dict",
        lambda: pp.optim.PartitionState.from_state_dict(_partition_dict(states={"a": [1]})),
        ValueError,
        [
            "not an optimizer state's state_dict(): its 'type' is None, expected one of "
            "['AdamState', 'PartitionState', 'SGDState']"
        ],
    ),
]


@pytest.mark.parametrize(("what", "call", "exc", "fragments"), STATES, ids=[s[0] for s in STATES])
def test_bad_states(
    what: str, call: Callable[[], Any], exc: type[Exception], fragments: list[str]
) -> None:
    _check(call, exc, fragments)


def test_an_optimizer_is_not_iterable_like_a_torch_optimizer() -> None:
    _check(
        lambda: list(sgd(0.1)),
        TypeError,
        [
            "SGD is a polprec optimizer: settings only, no parameters or state to iterate "
            "(torch.optim's param_groups). Its state is the opt_state its init(params) made: "
            "checkpoint opt_state.state_dict() (with torch.distributed.checkpoint, a dict of "
            "the params and opt_state.state_dict()), not the optimizer"
        ],
    )
