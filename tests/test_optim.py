"""polprec.optim against torch.optim, and what a pure optimizer promises.

Parity: float32 trajectories of every option combination over 100 steps, against
``torch.optim`` itself (its single-tensor, foreach and fused implementations), on both of
polprec's paths (torch's fused kernels in eager mode; plain ops, as under ``vmap``, ``grad``
and ``torch.compile``). Then purity, skipped steps, ``None`` gradients, trees, ``lr``,
donation, transforms, state dicts and bad input.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
from typing import Any

import pytest
import torch
from conftest import FLOAT_DTYPES, TREE_SHAPES, make_tree
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import grad, vmap

import polprec as pp
from polprec import _fused

STEPS = 100
SHAPES = [(7, 5), (5,), (3, 4, 2)]


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Any:
    """One intra-op thread: these small updates gain nothing from two, and on a shared two-core
    machine each of torch's parallel regions can wait milliseconds for the second core."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(params=["fused", "plain"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test on torch's fused kernels (eager) or on the plain-op path."""
    if request.param == "plain":
        monkeypatch.setattr(_fused, "may_fuse", lambda tensors: False)
    return str(request.param)


def _run_against_torch(
    make_torch: Any, opt: Any, *, steps: int = STEPS, lr_schedule: bool = False
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Train the same parameters with a torch optimizer and ``opt`` on the same gradients."""
    gen = torch.Generator().manual_seed(1)
    init = [torch.randn(s, generator=gen) for s in SHAPES]
    torch_params = [torch.nn.Parameter(x.clone()) for x in init]
    torch_opt = make_torch(torch_params)
    params = {f"p{i}": x.clone() for i, x in enumerate(init)}
    state = opt.init(params)
    for t in range(steps):
        grads = [torch.randn(x.shape, generator=gen) for x in init]
        for p, g in zip(torch_params, grads, strict=True):
            p.grad = g.clone()
        lr = None
        if lr_schedule:  # a schedule: torch reads the group's lr, polprec takes a tensor
            lr = opt.lr * (1 + t) / steps
            torch_opt.param_groups[0]["lr"] = lr
            lr = torch.tensor(lr)
        torch_opt.step()
        params, state = opt.step(params, {f"p{i}": g for i, g in enumerate(grads)}, state, lr=lr)
    assert int(state.step) == steps
    return [params[f"p{i}"] for i in range(len(SHAPES))], [p.detach() for p in torch_params]


def _assert_parity(ours: list[torch.Tensor], theirs: list[torch.Tensor], exact: bool) -> None:
    for a, b in zip(ours, theirs, strict=True):
        if exact:  # the same float operations in the same order
            assert torch.equal(a, b), (a - b).abs().max()
        else:  # torch's fused kernel and its op-by-op implementations round differently
            torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-6)


SGD_CASES = [
    dict(momentum=m, dampening=d, nesterov=n, weight_decay=w, maximize=x)
    for m, d, n, w, x in itertools.product(
        [0.0, 0.9], [0.0, 0.3], [False, True], [0.0, 0.1], [False, True]
    )
    if not (n and (m == 0 or d != 0)) and not (m == 0 and d != 0)
]
ADAM_CASES = [
    dict(weight_decay=w, amsgrad=a, maximize=x, decoupled_weight_decay=dec)
    for w, a, x, dec in itertools.product([0.0, 0.1], [False, True], [False, True], [False, True])
]
IMPLS = {"single": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


PARITY = [
    *[("sgd", k) for k in SGD_CASES],
    *[("adam", k) for k in ADAM_CASES],
    # the boundaries: full dampening and decay, momentum 1
    ("sgd", dict(momentum=0.9, dampening=1.0, weight_decay=1.0)),
    ("sgd", dict(momentum=1.0, dampening=0.5)),
    ("adam", dict(weight_decay=1.0)),
    ("adam", dict(weight_decay=1.0, decoupled_weight_decay=True)),
]
TORCH = {
    "sgd": (torch.optim.SGD, pp.optim.sgd, 0.05),
    "adam": (torch.optim.Adam, pp.optim.adam, 0.01),
}


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize(
    ("name", "kwargs"),
    PARITY,
    ids=[n + ":" + ",".join(f"{a}={b}" for a, b in k.items()) for n, k in PARITY],
)
def test_matches_torch(name: str, kwargs: dict[str, Any], impl: str, path: str) -> None:
    torch_class, factory, lr = TORCH[name]
    ours, theirs = _run_against_torch(
        lambda ps: torch_class(ps, lr=lr, **kwargs, **IMPLS[impl]), factory(lr, **kwargs)
    )
    # polprec's fused path is torch's fused kernel, except with dampening (plain ops there);
    # its plain path does torch's single-tensor and foreach operations
    fused_here = path == "fused" and kwargs.get("dampening", 0) == 0
    _assert_parity(ours, theirs, exact=(impl == "fused") == fused_here)


def test_adamw_is_torch_adamw(path: str) -> None:
    assert pp.optim.adamw() == pp.optim.adam(weight_decay=1e-2, decoupled_weight_decay=True)
    ours, theirs = _run_against_torch(
        lambda ps: torch.optim.AdamW(ps, lr=0.01, fused=True), pp.optim.adamw(0.01)
    )
    _assert_parity(ours, theirs, exact=path == "fused")


@pytest.mark.parametrize(
    ("make_torch", "opt"),
    [
        (lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9), pp.optim.sgd(0.05, momentum=0.9)),
        (lambda ps: torch.optim.AdamW(ps, lr=0.01), pp.optim.adamw(0.01)),
    ],
    ids=["sgd", "adamw"],
)
def test_tensor_lr_schedule_matches_torch(make_torch: Any, opt: Any, path: str) -> None:
    ours, theirs = _run_against_torch(make_torch, opt, steps=40, lr_schedule=True)
    _assert_parity(ours, theirs, exact=False)


def test_the_eager_path_runs_torchs_fused_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    for name in ("adam_", "sgd_"):
        kernel = getattr(_fused, name)
        monkeypatch.setattr(
            _fused, name, lambda *a, _k=kernel, _n=name, **kw: (calls.append(_n), _k(*a, **kw))[1]
        )
    params = {"w": torch.ones(3)}
    for opt in (pp.optim.adamw(), pp.optim.sgd(0.1, momentum=0.9)):
        opt.step(params, {"w": torch.ones(3)}, opt.init(params), grads_finite=torch.tensor(True))
    assert calls == ["adam_", "sgd_"]


# --- purity, skips, None gradients -----------------------------------------------------------

PRECISIONS = {
    "default": {},
    "nearest": {"master_weights": False},
    "master": {"master_weights": True},
    "stochastic": {"master_weights": False, "rounding": "stochastic"},
    "master+stochastic": {"master_weights": True, "rounding": "stochastic"},
    "kahan": {"kahan": True},
    "kahan+bf16 state": {"kahan": True, "state_dtype": torch.bfloat16},
    "kahan+stochastic": {"kahan": True, "rounding": "stochastic"},
    "bf16 state": {"master_weights": False, "state_dtype": torch.bfloat16},
}
OPTIMIZERS = {
    "sgd": lambda **k: pp.optim.sgd(0.1, momentum=0.9, weight_decay=0.01, **k),
    "sgd-dampening": lambda **k: pp.optim.sgd(0.1, momentum=0.9, dampening=0.5, **k),
    "adam-amsgrad": lambda **k: pp.optim.adam(0.01, amsgrad=True, weight_decay=0.01, **k),
    "adamw": lambda **k: pp.optim.adamw(0.01, **k),
}


def _problem(dtype: torch.dtype, seed: int = 0) -> tuple[dict[str, Any], dict[str, Any]]:
    gen = torch.Generator().manual_seed(seed)
    params = {
        "w": torch.randn(4, 3, generator=gen).to(dtype),
        "b": torch.randn(3, generator=gen).to(dtype),
        "n": torch.tensor(7),  # not floating: passes through
        "frozen": torch.randn(2, generator=gen).to(dtype),  # a None gradient
    }
    grads = {
        "w": torch.randn(4, 3, generator=gen).to(dtype),
        "b": torch.randn(3, generator=gen).to(dtype),
        "n": None,
        "frozen": None,
    }
    return params, grads


def _tensors(tree: Any) -> list[torch.Tensor]:
    return [x for x in pp._tree.tree_leaves(tree) if isinstance(x, torch.Tensor)]


def _trees_equal(a: Any, b: Any) -> bool:
    la, lb = _tensors(a), _tensors(b)
    return len(la) == len(lb) and all(
        x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(la, lb, strict=True)
    )


def _after_steps(opt: Any, params: Any, grads: Any, n: int = 3) -> tuple[Any, Any]:
    state = opt.init(params, seed=3)
    for _ in range(n):
        params, state = opt.step(params, grads, state)
    return params, state


@pytest.fixture(
    params=[(n, p) for n in OPTIMIZERS for p in PRECISIONS], ids=lambda c: f"{c[0]}-{c[1]}"
)
def trained(request: pytest.FixtureRequest, path: str) -> tuple[Any, Any, Any, Any]:
    """``(opt, params, grads, state)`` three steps into training bfloat16 parameters."""
    name, precision = request.param
    opt = OPTIMIZERS[name](**PRECISIONS[precision])
    params, grads = _problem(torch.bfloat16)
    params, state = _after_steps(opt, params, grads)
    return opt, params, grads, state


def test_step_is_pure(trained: tuple[Any, Any, Any, Any]) -> None:
    opt, params, grads, state = trained
    inputs = (params, grads, state)
    copies = [x.clone() for x in _tensors(inputs)]
    versions = [x._version for x in _tensors(inputs)]
    new_params, new_state = opt.step(*inputs, grads_finite=torch.tensor(True))
    assert [x._version for x in _tensors(inputs)] == versions
    assert all(torch.equal(a, b) for a, b in zip(_tensors(inputs), copies, strict=True))
    assert not torch.equal(new_params["w"], params["w"])
    assert new_params["n"] is params["n"]
    assert new_params["frozen"] is params["frozen"]  # a None gradient: left alone
    for slot in opt.slot_fields:
        if getattr(state, slot) is not None:
            assert getattr(new_state, slot)["frozen"] is getattr(state, slot)["frozen"]
            assert getattr(new_state, slot)["n"] is None


def test_skipped_step_leaves_only_the_counters(trained: tuple[Any, Any, Any, Any]) -> None:
    opt, params, grads, state = trained
    bad = {k: None if g is None else torch.full_like(g, float("nan")) for k, g in grads.items()}
    skipped, skipped_state = opt.step(params, bad, state, grads_finite=torch.tensor(False))
    assert _trees_equal(skipped, params)
    fields = [
        f.name
        for f in dataclasses.fields(state)
        if f.name not in ("step", "skips", "consecutive_skips")
    ]
    for f in fields:
        assert _trees_equal(getattr(skipped_state, f), getattr(state, f)), f
    assert (
        int(skipped_state.step),
        int(skipped_state.skips),
        int(skipped_state.consecutive_skips),
    ) == (3, 1, 1)
    twice, twice_state = opt.step(skipped, bad, skipped_state, grads_finite=torch.tensor(False))
    assert (int(twice_state.skips), int(twice_state.consecutive_skips)) == (2, 2)
    # a skip followed by a good step is the good step alone, bit for bit
    good, good_state = opt.step(params, grads, state, grads_finite=torch.tensor(True))
    after, after_state = opt.step(twice, grads, twice_state, grads_finite=torch.tensor(True))
    assert _trees_equal(after, good)
    for f in fields:
        assert _trees_equal(getattr(after_state, f), getattr(good_state, f)), f
    assert (int(after_state.step), int(after_state.skips), int(after_state.consecutive_skips)) == (
        4,
        2,
        0,
    )


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_no_flag_means_the_step_checks_itself(name: str, bad: float, path: str) -> None:
    opt = OPTIMIZERS[name]()
    params = {"w": torch.ones(300), "b": torch.ones(3)}
    state = opt.init(params)
    grads = {"w": torch.ones(300), "b": torch.ones(3)}
    grads["w"][150] = bad  # in the middle of a vectorised loop, not its first element
    new, after = opt.step(params, grads, state)
    assert _trees_equal(new, params) and _trees_equal(after.step, state.step)
    assert int(after.skips) == 1 and int(after.consecutive_skips) == 1
    new, after = opt.step(params, {"w": torch.ones(300), "b": torch.ones(3)}, after)
    assert not torch.equal(new["w"], params["w"]) and int(after.step) == 1
    assert int(after.consecutive_skips) == 0


def test_a_true_flag_means_no_check(path: str) -> None:
    opt = pp.optim.sgd(0.1)
    params = {"w": torch.ones(2)}
    state = opt.init(params)
    new, state = opt.step(
        params, {"w": torch.tensor([1.0, float("inf")])}, state, grads_finite=True
    )
    assert new["w"][1] == float("-inf") and int(state.step) == 1 and int(state.skips) == 0


def test_a_python_bool_flag_is_accepted() -> None:
    opt = pp.optim.sgd(0.1)
    params = {"w": torch.ones(2)}
    new, state = opt.step(params, {"w": torch.ones(2)}, opt.init(params), grads_finite=False)
    assert torch.equal(new["w"], params["w"]) and int(state.skips) == 1


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("shape", TREE_SHAPES)
def test_every_tree_shape_and_dtype(shape: str, dtype: torch.dtype, path: str) -> None:
    params = make_tree(shape, dtype)
    grads = pp._tree.tree_map(lambda x: x * 0 + 1 if pp._tree.is_float_tensor(x) else None, params)
    for opt in (pp.optim.sgd(0.5, momentum=0.5), pp.optim.adamw(0.5)):
        state = opt.init(params)
        new, state = opt.step(params, grads, state, grads_finite=torch.tensor(True))
        assert pp._tree.tree_structure(new) == pp._tree.tree_structure(params)
        for a, b in zip(pp._tree.tree_leaves(new), pp._tree.tree_leaves(params), strict=True):
            if pp._tree.is_float_tensor(b):
                assert a.dtype == b.dtype and a.shape == b.shape and not torch.equal(a, b)
            else:
                assert a is b
        assert int(state.step) == 1


def test_grads_in_another_dtype(path: str) -> None:
    opt = pp.optim.adamw(0.01)
    params = {"w": torch.randn(5)}
    state = opt.init(params)
    g = torch.randn(5)
    a, _ = opt.step(params, {"w": g}, state)
    b, _ = opt.step(params, {"w": g.to(torch.bfloat16)}, state)
    assert b["w"].dtype == torch.float32
    torch.testing.assert_close(a["w"], b["w"], rtol=1e-2, atol=1e-3)


def test_lr_override(path: str) -> None:
    opt = pp.optim.adam(0.01)
    params, grads = {"w": torch.randn(5)}, {"w": torch.randn(5)}
    state = opt.init(params)
    base, _ = opt.step(params, grads, state)
    as_float, _ = opt.step(params, grads, state, lr=0.01)
    as_tensor, _ = opt.step(params, grads, state, lr=torch.tensor(0.01))
    frozen, frozen_state = opt.step(params, grads, state, lr=0.0)
    assert torch.equal(base["w"], as_float["w"]) and torch.equal(base["w"], as_tensor["w"])
    assert torch.equal(frozen["w"], params["w"]) and int(frozen_state.step) == 1


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_donation_gives_the_pure_result_in_the_inputs_buffers(name: str) -> None:
    opt = OPTIMIZERS[name]()
    params, grads = _problem(torch.float32)
    params, state = _after_steps(opt, params, grads)
    pure, pure_state = opt.step(params, grads, state, grads_finite=torch.tensor(True))
    ptr = params["w"].data_ptr()
    donated, donated_state = opt.step(
        params, grads, state, grads_finite=torch.tensor(True), donate=True
    )
    assert _trees_equal(donated, pure) and _trees_equal(donated_state, pure_state)
    fused_path = name != "sgd-dampening"
    assert (donated["w"].data_ptr() == ptr) == fused_path


# --- transforms ------------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["default", "stochastic", "kahan", "bf16 state"])
@pytest.mark.parametrize("name", ["sgd-dampening", "adam-amsgrad"])
def test_vmap_over_stacked_states_with_a_flag_per_member(
    name: str, precision: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # each member alone on the plain path, which vmap runs: the same float operations
    monkeypatch.setattr(_fused, "may_fuse", lambda tensors: False)
    opt = OPTIMIZERS[name](**PRECISIONS[precision])
    members = [_problem(torch.bfloat16, seed=s) for s in range(3)]
    params = [{k: v for k, v in p.items() if k in ("w", "b")} for p, _ in members]
    grads = [{k: v for k, v in g.items() if k in ("w", "b")} for _, g in members]
    states = [opt.init(p, seed=s) for s, p in enumerate(params)]
    for i in range(3):  # members at different steps
        for _ in range(i):
            params[i], states[i] = opt.step(params[i], grads[i], states[i])
    flags = torch.tensor([True, False, True])
    stacked = vmap(lambda p, g, s, f: opt.step(p, g, s, grads_finite=f))(
        pp.stack_trees(params), pp.stack_trees(grads), pp.stack_trees(states), flags
    )
    for i in range(3):
        alone = opt.step(params[i], grads[i], states[i], grads_finite=flags[i])
        member = pp._tree.tree_map(lambda x, i=i: x[i], stacked)
        for a, b in zip(_tensors(member), _tensors(alone), strict=True):
            if a.is_floating_point():  # batched kernels may round a last bit differently
                torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-5)
            else:  # counters and seeds
                assert torch.equal(a, b)
    skipped = pp._tree.tree_map(lambda x: x[1], stacked)  # the member whose flag is False
    assert _trees_equal(skipped[0], params[1])
    assert int(skipped[1].skips) == 1 and int(skipped[1].step) == 1


def test_grad_through_an_sgd_step() -> None:
    """Differentiate the loss after a step with respect to the learning rate (meta-learning)."""
    opt = pp.optim.sgd(0.1, momentum=0.9)
    params, grads = {"w": torch.randn(5)}, {"w": torch.randn(5)}
    state = opt.init(params)

    def loss_after(lr: torch.Tensor) -> torch.Tensor:
        new, _ = opt.step(params, grads, state, lr=lr, grads_finite=torch.tensor(True))
        return (new["w"] ** 2).sum()

    lr = torch.tensor(0.1)
    expected = (-2 * (params["w"] - lr * grads["w"]) * grads["w"]).sum()
    torch.testing.assert_close(grad(loss_after)(lr), expected)
    # and with autograd in eager mode (the plain path, since lr requires grad)
    lr_leaf = lr.clone().requires_grad_()
    loss_after(lr_leaf).backward()
    torch.testing.assert_close(lr_leaf.grad, expected)


def test_grad_through_a_skipped_first_step_is_finite() -> None:
    """A skipped step's discarded update is computed at the count the step would reach (1),
    not at the count it keeps (0, where Adam's bias corrections divide by zero): a gradient
    through the step gets no NaN from the branch torch.where drops."""
    opt = pp.optim.adam(0.1, weight_decay=0.1)  # the L2 term puts the update on the params
    state = opt.init({"w": torch.ones(3)})

    def skipped(w: torch.Tensor) -> torch.Tensor:
        new, _ = opt.step({"w": w}, {"w": w * 2}, state, grads_finite=torch.tensor(False))
        return new["w"].sum()

    assert torch.equal(grad(skipped)(torch.ones(3)), torch.ones(3))


def test_grad_through_adam_steps_matches_autograd() -> None:
    opt = pp.optim.adam(0.1)
    w0, x = torch.randn(4), torch.randn(4)

    def unrolled(w: torch.Tensor) -> torch.Tensor:
        params, state = {"w": w}, opt.init({"w": w})
        for _ in range(2):
            params, state = opt.step(params, {"w": 2 * params["w"] * x}, state)
        return (params["w"] * x).sum()

    w = w0.clone().requires_grad_()
    unrolled(w).backward()
    torch.testing.assert_close(grad(unrolled)(w0), w.grad)


@pytest.mark.slow
def test_compiled_whole_step_does_not_recompile_for_lr_or_loss_scale() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 1))
    policy = pp.get_policy("16-mixed")
    opt = pp.optim.adamw(1e-2, amsgrad=True)
    step_grad = pp.value_and_grad(
        lambda p, x: pp.apply_with_policy(model, p, x, policy=policy).square().mean()
    )

    def train_step(params: Any, state: Any, scale: Any, x: torch.Tensor, lr: torch.Tensor) -> Any:
        loss, grads, finite, scale = step_grad(params, x, loss_scale=scale)
        params, state = opt.step(params, grads, state, grads_finite=finite, lr=lr)
        return params, state, scale, loss

    compiled = torch.compile(train_step, fullgraph=True)
    params = {k: v.detach() for k, v in model.named_parameters()}
    eager = (params, opt.init(params), pp.DynamicLossScale(2.0**15, period=2))
    comp = eager
    gen = torch.Generator().manual_seed(0)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for t in range(6):
            x = torch.randn(4, 8, generator=gen)
            if t == 3:
                x[0, 0] = float("nan")  # a skipped step; the scale backs off
            lr = torch.tensor(1e-2 / (1 + t))
            eager = train_step(*eager, x, lr)[:3]
            comp = compiled(*comp, x, lr)[:3]
    assert int(comp[1].skips) == 1 and int(comp[1].step) == 5
    assert float(comp[2].loss_scale) == float(eager[2].loss_scale)
    # float16 compute: inductor may round the forward and backward differently from eager
    for a, b in zip(_tensors(comp[:2]), _tensors(eager[:2]), strict=True):
        if a.is_floating_point():
            torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-3)
        else:
            assert torch.equal(a, b)


@pytest.mark.slow
def test_compiled_bias_corrections_are_the_eager_ones_bit_for_bit() -> None:
    # Under compile they are computed once per step, in a kernel of their own (see _once):
    # the values must be the eager float64 ones, for a float and a tensor lr.
    opt = pp.optim.adam(3e-3, betas=(0.8, 0.95))

    def scalars(step: torch.Tensor, lr: Any) -> Any:
        return opt.scalars(step, lr)[:2]

    compiled = torch.compile(scalars, fullgraph=True)
    for t in (1, 2, 7, 1000):
        step = torch.tensor(t, dtype=torch.int32)
        for lr in (3e-3, torch.tensor(3e-3)):
            for a, b in zip(compiled(step, lr), scalars(step, lr), strict=True):
                assert a.dtype == b.dtype == torch.float64 and torch.equal(a, b), (t, lr)


# --- states ----------------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["default", "stochastic", "kahan", "master"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_state_dict_round_trip_weights_only(name: str, precision: str) -> None:
    opt = OPTIMIZERS[name](**PRECISIONS[precision])
    params, grads = _problem(torch.bfloat16)
    params, state = _after_steps(opt, params, grads)
    buffer = io.BytesIO()
    torch.save(state.state_dict(), buffer)
    buffer.seek(0)
    loaded = type(state).from_state_dict(torch.load(buffer, weights_only=True))
    assert _trees_equal(loaded, state)
    assert _trees_equal(state.load_state_dict(state.state_dict()), state)
    a = opt.step(params, grads, state, grads_finite=torch.tensor(True))
    b = opt.step(params, grads, loaded, grads_finite=torch.tensor(True))
    assert _trees_equal(a, b)


def test_state_is_a_pytree_that_keeps_unused_fields_out_of_its_leaves() -> None:
    opt = pp.optim.adamw()
    state = opt.init({"w": torch.ones(2), "n": torch.tensor(1)})
    leaves, spec = torch.utils._pytree.tree_flatten(state)
    assert all(isinstance(x, torch.Tensor) for x in leaves if x is not None)
    rebuilt = torch.utils._pytree.tree_unflatten(leaves, spec)
    assert rebuilt.master is None and rebuilt.max_exp_avg_sq is None and rebuilt.seed is None
    assert _trees_equal(rebuilt, state)
    assert _trees_equal(state.to("cpu"), state)
    assert pp.stack_trees([state, state]).step.shape == (2,)


def test_optimizers_are_frozen_and_hashable() -> None:
    opt = pp.optim.sgd(0.1, momentum=0.9, state_dtype="bf16")
    assert opt.state_dtype == torch.bfloat16
    assert {opt: 1}[pp.optim.sgd(0.1, momentum=0.9, state_dtype=torch.bfloat16)] == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        opt.lr = 0.2  # type: ignore[misc]
    assert pp.optim.adam() != pp.optim.adamw()
    assert pp.optim.adam().betas == (0.9, 0.999) and pp.optim.adamw().weight_decay == 1e-2


@settings(max_examples=25)
@given(
    flags=st.lists(st.booleans(), min_size=1, max_size=8),
    name=st.sampled_from(sorted(OPTIMIZERS)),
    precision=st.sampled_from(sorted(PRECISIONS)),
    fused_path=st.booleans(),
)
def test_skips_leave_no_trace_but_the_counters(
    flags: list[bool], name: str, precision: str, fused_path: bool
) -> None:
    """Any sequence of good and skipped steps ends where the good steps alone end."""
    opt = OPTIMIZERS[name](**PRECISIONS[precision])
    params, grads = _problem(torch.bfloat16)
    bad = {k: None if g is None else torch.full_like(g, float("inf")) for k, g in grads.items()}
    with pytest.MonkeyPatch.context() as mp:
        if not fused_path:
            mp.setattr(_fused, "may_fuse", lambda tensors: False)
        mixed, mixed_state = params, opt.init(params, seed=1)
        good, good_state = params, opt.init(params, seed=1)
        for finite in flags:
            step_grads = grads if finite else bad
            mixed, mixed_state = opt.step(
                mixed, step_grads, mixed_state, grads_finite=torch.tensor(finite)
            )
            if finite:
                good, good_state = opt.step(
                    good, grads, good_state, grads_finite=torch.tensor(True)
                )
    assert _trees_equal(mixed, good)
    for f in dataclasses.fields(good_state):
        if f.name not in ("skips", "consecutive_skips"):
            assert _trees_equal(getattr(mixed_state, f.name), getattr(good_state, f.name)), f.name
    trailing = len(flags) - len("".join("1" if f else "0" for f in flags).rstrip("0"))
    assert int(mixed_state.skips) == flags.count(False)
    assert int(mixed_state.consecutive_skips) == trailing
    assert int(mixed_state.step) == flags.count(True)


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (pp.optim.sgd, torch.optim.SGD),
        (pp.optim.adam, torch.optim.Adam),
        (pp.optim.adamw, torch.optim.AdamW),
    ],
)
def test_defaults_are_torchs(ours: Any, theirs: Any) -> None:
    import inspect

    torch_defaults = {
        k: v.default
        for k, v in inspect.signature(theirs.__init__).parameters.items()
        if k not in ("self", "params")
    }
    mine = {k: v.default for k, v in inspect.signature(ours).parameters.items()}
    shared = set(torch_defaults) & set(mine)
    assert {"lr", "weight_decay", "maximize"} <= shared
    for name in shared:
        assert mine[name] == torch_defaults[name], name
    assert set(torch_defaults) - shared <= {
        "foreach",
        "fused",
        "capturable",
        "differentiable",
        "decoupled_weight_decay",
    }


def test_a_donated_skip_leaves_parameters_that_require_grad_alone() -> None:
    model = torch.nn.Linear(3, 2)
    params = dict(model.named_parameters())
    before = {k: v.detach().clone() for k, v in params.items()}
    grads = {k: torch.ones_like(v) for k, v in params.items()}
    opt = pp.optim.adamw(0.1)
    new, state = opt.step(
        params, grads, opt.init(params), grads_finite=torch.tensor(False), donate=True
    )
    assert all(torch.equal(new[k], before[k]) for k in params)
    assert (int(state.step), int(state.skips)) == (0, 1)


@pytest.mark.parametrize("precision", sorted(PRECISIONS))
def test_the_state_lives_on_the_parameters_device(precision: str) -> None:
    """Not on torch's default device, and on the CPU for a tree without floating leaves."""
    opt = pp.optim.adamw(**PRECISIONS[precision])
    params = {"w": torch.ones(2, 3, dtype=torch.bfloat16, device="meta"), "n": torch.tensor(1)}
    assert {t.device.type for t in _tensors(opt.init(params))} == {"meta"}
    with torch.device("meta"):
        on_cpu = opt.init({"w": torch.ones(2, 3, dtype=torch.bfloat16, device="cpu")})
        no_floats = opt.init({"n": torch.tensor(1, device="cpu")})
    assert {t.device.type for t in _tensors(on_cpu)} == {"cpu"}
    assert {t.device.type for t in _tensors(no_floats)} == {"cpu"}


@pytest.mark.parametrize("precision", sorted(PRECISIONS))
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_the_state_is_contiguous_whatever_the_parameters_strides(name: str, precision: str) -> None:
    opt = OPTIMIZERS[name](**PRECISIONS[precision])
    params = {"w": torch.randn(3, 4).to(torch.bfloat16).t()}
    state = opt.init(params)
    assert not params["w"].is_contiguous()
    assert all(t.is_contiguous() for t in _tensors(state))


def test_a_donated_step_updates_the_moments_of_a_transposed_parameter_in_place() -> None:
    params = {"w": torch.randn(3, 4).t()}
    opt = pp.optim.adamw(0.1)
    state = opt.init(params)
    moments = state.exp_avg["w"], state.exp_avg_sq["w"]
    _, new = opt.step(params, {"w": torch.ones(4, 3)}, state, donate=True)
    assert new.exp_avg["w"] is moments[0] and new.exp_avg_sq["w"] is moments[1]


def _strided(x: Any) -> Any:
    """``x`` with the same values, as a non-contiguous (transposed) view of a 2-D tensor."""
    if isinstance(x, torch.Tensor) and x.dim() == 2:
        return x.t().contiguous().t()
    return x


@pytest.mark.parametrize("donate", [False, True], ids=["pure", "donated"])
@pytest.mark.parametrize("precision", sorted(PRECISIONS))
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_non_contiguous_tensors_step_as_their_contiguous_copies(
    name: str, precision: str, donate: bool, path: str
) -> None:
    """Transposed parameters, gradients and state: torch's fused kernels pair elements by
    their place in memory, so whatever the strides, the step must be the contiguous one."""
    opt = OPTIMIZERS[name](**PRECISIONS[precision])
    params, grads = _problem(torch.bfloat16)
    params["v"], grads["v"] = params["w"].float(), grads["w"].float()
    want, want_state = params, opt.init(params, seed=1)
    got, got_state = {k: _strided(v) for k, v in params.items()}, want_state
    strided_grads = {k: _strided(v) for k, v in grads.items()}
    got_state = pp._tree.tree_map(_strided, got_state)
    for t in range(3):
        finite = torch.tensor(t != 1)
        want, want_state = opt.step(want, grads, want_state, grads_finite=finite)
        got, got_state = opt.step(got, strided_grads, got_state, grads_finite=finite, donate=donate)
    assert _trees_equal(got, want) and _trees_equal(got_state, want_state)


def test_settings_are_declared_with_their_torch_names() -> None:
    """What ``setting()`` declares: lr alone positional, the precision options polprec's own,
    the rest the names torch.optim's state dicts are checked against."""
    assert pp.optim.SGD.torch_settings() == (
        "lr",
        "maximize",
        "momentum",
        "dampening",
        "nesterov",
        "weight_decay",
    )
    assert pp.optim.Adam.torch_settings() == (
        "lr",
        "maximize",
        "betas",
        "eps",
        "weight_decay",
        "amsgrad",
        "decoupled_weight_decay",
    )
    assert pp.optim.sgd(0.2).lr == 0.2 and pp.optim.adam(lr=0.2).lr == 0.2
    with pytest.raises(TypeError, match="positional"):
        pp.optim.sgd(0.1, 0.9)  # type: ignore[misc]


@pytest.mark.parametrize("precision", sorted(PRECISIONS))
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_the_plain_path_follows_the_fused_path(name: str, precision: str) -> None:
    """Both ways compute each update in its leaf's work dtype and write it back the same way,
    so over steps given each kind of flag they differ only by the order of float operations:
    16-bit parameters by one spacing at most, everything kept in float32 or wider closely."""
    opt = OPTIMIZERS[name](**PRECISIONS[precision])
    params, grads = _problem(torch.bfloat16)
    params["d"], grads["d"] = params["w"].double(), grads["w"].double()  # a group of its own

    def run(fuse: bool) -> tuple[Any, Any]:
        with pytest.MonkeyPatch.context() as mp:
            if not fuse:
                mp.setattr(_fused, "may_fuse", lambda tensors: False)
            p, s = params, opt.init(params, seed=1)
            for flag in (torch.tensor(True), True, None, torch.tensor(False), None):
                p, s = opt.step(p, grads, s, grads_finite=flag)
            return p, s

    (fused, fused_state), (plain, plain_state) = run(True), run(False)
    assert (int(fused_state.step), int(fused_state.skips)) == (4, 1)
    assert (int(plain_state.step), int(plain_state.skips)) == (4, 1)
    for key in ("w", "b"):
        spacing = 2.0**-7 * fused[key].float().abs().clamp(min=1.0)
        assert torch.all((fused[key].float() - plain[key].float()).abs() <= spacing), key
        if plain_state.compensation is not None:  # the float32 sums the pairs hold
            a = fused[key].float() + fused_state.compensation[key].float()
            b = plain[key].float() + plain_state.compensation[key].float()
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused["d"], plain["d"], rtol=1e-12, atol=1e-12)
    for field in (*opt.slot_fields, "master"):  # moments and master copies
        pairs = zip(
            _tensors(getattr(fused_state, field)),
            _tensors(getattr(plain_state, field)),
            strict=True,
        )
        for x, y in pairs:
            wide = x.dtype in (torch.float32, torch.float64)
            torch.testing.assert_close(x, y, rtol=1e-5 if wide else 2.0**-7, atol=1e-6)
