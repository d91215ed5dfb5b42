"""The optimizers' one machinery (polprec/optim/_engine.py): a plan per tree structure, kept
between steps, and one decision per group between torch's fused kernel and plain ops.

Every step takes the same road: the plan's groups (one optimizer, device and work dtype
each), each run on torch's fused kernel where ``_fused.may_fuse`` allows it. These tests pin
what the plan caches, that the common step is exactly torch's fused step, that a step whose
leaves fall into several groups gives the plain path's numbers, and that nothing is mutated.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch

import polprec as pp
from polprec import _fused
from polprec.optim import _plan


def _params(dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {k: torch.randn(s, generator=gen).to(dtype) for k, s in [("w", (7, 5)), ("b", (5,))]}


def _grads(params: dict[str, Any], t: int) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(100 + t)
    return {
        k: None if v is None else torch.randn(v.shape, generator=gen).to(v.dtype)
        for k, v in params.items()
    }


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (
            pp.optim.sgd(0.05, momentum=0.9),
            lambda ps: torch.optim.SGD(ps, 0.05, momentum=0.9, fused=True),
        ),
        (  # with weight decay, where Adam and AdamW differ
            pp.optim.adam(0.01, weight_decay=0.1),
            lambda ps: torch.optim.Adam(ps, 0.01, weight_decay=0.1, fused=True),
        ),
        (pp.optim.adamw(0.01), lambda ps: torch.optim.AdamW(ps, 0.01, fused=True)),
    ],
    ids=["sgd", "adam", "adamw"],
)
@pytest.mark.parametrize("donate", [False, True], ids=["pure", "donated"])
def test_the_common_step_is_torchs_fused_step(ours: Any, theirs: Any, donate: bool) -> None:
    params = _params()
    torch_params = [torch.nn.Parameter(v.clone()) for v in params.values()]
    torch_opt = theirs(torch_params)
    state = ours.init(params)
    for t in range(5):
        grads = _grads(params, t)
        for p, g in zip(torch_params, grads.values(), strict=True):
            p.grad = g.clone()
        torch_opt.step()
        params, state = ours.step(params, grads, state, donate=donate)
    for a, b in zip(params.values(), torch_params, strict=True):
        assert torch.equal(a, b.detach())


def _count_plans(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    made: list[int] = []
    make = _plan._make_plan
    monkeypatch.setattr(
        _plan,
        "_make_plan",
        lambda *a: (made.append(1), make(*a))[1],  # type: ignore[func-returns-value]
    )
    return made


def test_the_plan_is_made_once_per_structure(monkeypatch: pytest.MonkeyPatch) -> None:
    made = _count_plans(monkeypatch)
    opt = pp.optim.adamw(0.01)
    params = _params()
    state = opt.init(params)
    for t in range(3):
        params, state = opt.step(params, _grads(params, t), state)
    assert len(made) == 1
    # another dtype, another shape, a None gradient: each a structure of its own
    half = {k: v.bfloat16() for k, v in params.items()}
    opt.step(half, _grads(half, 0), opt.init(half))
    wide = {"w": torch.ones(7, 6), "b": torch.ones(5)}
    opt.step(wide, _grads(wide, 0), opt.init(wide))
    opt.step(params, {"w": _grads(params, 0)["w"], "b": None}, state)
    assert len(made) == 4
    opt.step(params, _grads(params, 9), state)  # the first structure again: kept
    assert len(made) == 4
    # an equal optimizer keeps its own plans; the plans never leak into equality
    assert pp.optim.adamw(0.01) == opt and hash(pp.optim.adamw(0.01)) == hash(opt)


def test_the_kept_plans_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    opt = pp.optim.sgd(0.1)
    for n in range(1, _plan._MAX_PLANS + 5):
        params = {"w": torch.ones(n)}
        opt.step(params, {"w": torch.ones(n)}, opt.init(params))
    assert len(opt._plans) == _plan._MAX_PLANS


def test_the_common_step_is_fused_and_pure(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    kernel = _fused.adam_
    monkeypatch.setattr(_fused, "adam_", lambda *a, **k: (calls.append(1), kernel(*a, **k))[1])
    opt = pp.optim.adamw(0.01)
    params = _params()
    state = opt.init(params)
    grads = _grads(params, 0)
    watched = [*params.values(), *grads.values(), *state.exp_avg.values(), state.step]
    versions = [t._version for t in watched]
    new, new_state = opt.step(params, grads, state, grads_finite=torch.tensor(True))
    assert calls == [1]  # one launch for the whole dict
    assert [t._version for t in watched] == versions
    assert all(not torch.equal(new[k], params[k]) for k in params)
    assert int(new_state.step) == 1 and int(state.step) == 0


def _mixed_tree() -> tuple[Any, Any]:
    """Float32 and bfloat16 leaves (one with a master copy), a frozen leaf, an int leaf."""
    gen = torch.Generator().manual_seed(3)
    params = {
        "layer": {"w": torch.randn(4, 3, generator=gen), "b": torch.randn(3, generator=gen)},
        "head": torch.randn(3, 2, generator=gen).bfloat16(),
        "frozen": torch.randn(2, generator=gen),
        "count": torch.tensor(4),
    }
    grads = {
        "layer": {"w": torch.randn(4, 3, generator=gen), "b": torch.randn(3, generator=gen)},
        "head": torch.randn(3, 2, generator=gen).bfloat16(),
        "frozen": None,
        "count": None,
    }
    return params, grads


@pytest.mark.parametrize(
    "opt",
    [pp.optim.adamw(0.01), pp.optim.sgd(0.1, momentum=0.9, nesterov=True)],
    ids=["adamw", "sgd"],
)
def test_several_groups_give_the_plain_paths_numbers(
    opt: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    params, grads = _mixed_tree()
    launches: list[int] = []
    for name in ("adam_", "sgd_"):
        kernel = getattr(_fused, name)
        monkeypatch.setattr(
            _fused, name, lambda *a, _k=kernel, **k: (launches.append(len(a[0])), _k(*a, **k))[1]
        )

    def run(fuse: bool) -> tuple[Any, Any]:
        with pytest.MonkeyPatch.context() as mp:
            if not fuse:
                mp.setattr(_fused, "may_fuse", lambda tensors: False)
            p, s = params, opt.init(params)
            for t in range(4):
                p, s = opt.step(p, grads, s, grads_finite=torch.tensor(t != 2))
            return p, s

    fused, fused_state = run(True)
    assert launches == [3, 3, 3, 3]  # one group: the bf16 head works in float32 too
    plain, plain_state = run(False)
    assert fused["count"] is params["count"] and fused["frozen"] is params["frozen"]
    assert fused["head"].dtype == torch.bfloat16 and fused_state.master["head"].dtype == (
        torch.float32
    )
    for a, b in zip(
        pp._tree.tree_leaves((fused, fused_state)),
        pp._tree.tree_leaves((plain, plain_state)),
        strict=True,
    ):
        if a.is_floating_point():
            torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-6)
        else:
            assert torch.equal(a, b)
    assert int(fused_state.step) == 3 and int(fused_state.skips) == 1


def test_recorded_parameters_take_plain_ops() -> None:
    # autograd records through the parameters: torch's in-place kernels would break the graph
    opt = pp.optim.sgd(0.1, momentum=0.9)
    params = {k: v.requires_grad_() for k, v in _params().items()}
    new, state = opt.step(params, _grads(params, 0), opt.init(params))
    assert new["w"].grad_fn is not None and int(state.step) == 1


def test_other_keys_in_grads_are_refused() -> None:
    opt = pp.optim.sgd(0.1)
    params = _params()
    grads = {"w": torch.ones(7, 5), "c": torch.ones(5)}
    with pytest.raises(ValueError, match="structure of params"):
        opt.step(params, grads, opt.init(params))


def test_params_come_back_in_their_key_order_whatever_the_grads_order() -> None:
    opt = pp.optim.adamw(0.01)
    params = _params()
    grads = dict(reversed(list(_grads(params, 0).items())))
    new, state = opt.step(params, grads, opt.init(params))
    assert list(new) == list(params) == list(state.exp_avg)


def test_a_donated_step_updates_parameters_that_require_grad_in_place() -> None:
    # a module's own parameters, stepped as torch.optim steps them (no detach needed)
    model = torch.nn.Linear(4, 3)
    params = dict(model.named_parameters())
    before = {k: v.detach().clone() for k, v in params.items()}
    opt = pp.optim.adamw(0.1)
    grads = {k: torch.ones_like(v) for k, v in params.items()}
    new, state = opt.step(params, grads, opt.init(params), donate=True)
    assert all(new[k] is params[k] or new[k].data_ptr() == params[k].data_ptr() for k in params)
    assert not torch.equal(model.weight.detach(), before["weight"])
    assert torch.equal(model.weight.detach(), new["weight"].detach())
    assert int(state.step) == 1 and torch.is_grad_enabled()


def test_an_optimizer_is_not_iterable_like_torchs() -> None:
    with pytest.raises(TypeError, match=r"opt_state.state_dict\(\)"):
        iter(pp.optim.adamw())


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"master_weights": False},
        {"rounding": "stochastic"},
        {"kahan": True},
        {"master_weights": False, "state_dtype": torch.bfloat16},
    ],
    ids=["master", "nearest", "stochastic", "kahan", "bf16-moments"],
)
def test_a_donated_step_updates_16_bit_parameters_in_place(options: dict[str, Any]) -> None:
    # a module route on a bf16 model: the update runs in float32 and lands in the module
    model = torch.nn.Linear(3, 2).bfloat16()
    params = dict(model.named_parameters())
    opt = pp.optim.adamw(1e-2, **options)
    state = opt.init(params)
    grads = {k: torch.ones_like(p) for k, p in params.items()}
    pure, pure_state = opt.step({k: v.detach().clone() for k, v in params.items()}, grads, state)
    before = model.weight.detach().clone()
    new, new_state = opt.step(params, grads, state, donate=True)
    assert all(new[k] is params[k] for k in params)  # the module's own parameters, updated
    assert not torch.equal(model.weight.detach(), before)
    for k in params:
        assert torch.equal(new[k].detach(), pure[k])
    for a, b in zip(pp._tree.tree_leaves(new_state), pp._tree.tree_leaves(pure_state), strict=True):
        assert torch.equal(a, b)
    for name in ("exp_avg", "exp_avg_sq", "master", "compensation"):  # into the state's buffers
        old, got = getattr(state, name), getattr(new_state, name)
        if old is not None:
            assert all(got[k] is old[k] for k in old), name


def test_while_tracing_a_plan_is_made_afresh_and_not_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    opt = pp.optim.adamw(1e-2)
    params = {"w": torch.ones(3, dtype=torch.bfloat16), "b": torch.ones(2)}
    flat = _plan.Flat(params, {k: torch.ones_like(v) for k, v in params.items()})

    def labels(flat: Any, dotted: Any) -> list[int | None]:
        return [None, 0]  # the first leaf in leaf order is left to no optimizer

    kept: dict[Any, Any] = {}
    eager = _plan.plan_for(kept, flat, [opt], labels)
    traced_plans: dict[Any, Any] = {}
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    traced = _plan.plan_for(traced_plans, flat, [opt], labels)
    monkeypatch.undo()
    assert len(kept) == 1 and traced_plans == {}  # a cache is a side effect to a tracer
    assert traced == eager  # the same plan, made afresh
    assert [g.idx for g in traced.groups] == [(1,)]  # the labels taken, past the unlabelled
    # without labels, path keys are worked out for stochastic rounding only
    assert all(g.keys == () for g in _plan.plan_for({}, flat, [opt], None).groups)


def test_a_python_number_lr_is_taken_as_it_is_while_tracing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from polprec.optim import _engine

    with pytest.raises(ValueError, match="lr"):
        _engine.check_lr("lr", -1.0)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert _engine.check_lr("lr", -1.0) == -1.0  # symbolic while tracing: eager mode checks it
    with pytest.raises(TypeError, match="lr"):
        _engine.check_lr("lr", True)  # a bool is no learning rate, traced or not


def test_bias_corrections_are_a_reduction_of_their_own_while_tracing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from polprec.optim import _adam

    x = torch.tensor(0.1234567890123, dtype=torch.float64)
    assert _adam._once(x) is x  # eager: nothing to do
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    out = _adam._once(x)
    assert out is not x and out.shape == () and out.dtype == x.dtype and torch.equal(out, x)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["float64", "bfloat16"])
def test_a_tensor_learning_rate_is_taken_in_float32(dtype: torch.dtype) -> None:
    """As torch's fused kernels take a tensor lr: the same bits whatever the tensor's dtype."""
    gen = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(200, generator=gen)}
    grads = {"w": torch.randn(200, generator=gen)}
    opt = pp.optim.adamw(1.0)
    state = opt.init(params)
    rate = torch.tensor(1 / 3, dtype=dtype)  # 1/3 in float64 is no float32 number
    want, _ = opt.step(params, grads, state, lr_scale=rate.float())
    got, _ = opt.step(params, grads, state, lr_scale=rate)
    assert torch.equal(got["w"], want["w"])


def test_a_kept_plan_serves_only_trees_of_its_keys_and_dtypes() -> None:
    """Trees with the same leaf shapes but other keys or other parameter dtypes get plans of
    their own: stochastic rounding keys on the path, master copies on the dtype."""
    opt = pp.optim.adamw(0.01, rounding="stochastic")
    fresh = pp.optim.adamw(0.01, rounding="stochastic")
    a = {"w": torch.full((64,), 1.0, dtype=torch.bfloat16)}
    b = {"v": torch.full((64,), 1.0, dtype=torch.bfloat16)}
    g = torch.full((64,), 0.3, dtype=torch.bfloat16)
    opt.step(a, {"w": g}, opt.init(a, seed=1))
    got, _ = opt.step(b, {"v": g}, opt.init(b, seed=1))
    want, _ = fresh.step(b, {"v": g}, fresh.init(b, seed=1))
    assert torch.equal(got["v"], want["v"])
    opt, fresh = pp.optim.adamw(0.01), pp.optim.adamw(0.01)
    full = {"w": torch.ones(8)}
    half = {"w": torch.ones(8, dtype=torch.bfloat16)}
    grads = {"w": torch.full((8,), 1e-3)}  # float32 gradients for both
    opt.step(full, grads, opt.init(full))
    got, got_state = opt.step(half, grads, opt.init(half))
    want, want_state = fresh.step(half, grads, fresh.init(half))
    assert got["w"].dtype == torch.bfloat16 and torch.equal(got["w"], want["w"])
    assert torch.equal(got_state.master["w"], want_state.master["w"])


def test_leaves_without_gradients_before_others_leave_them_alone() -> None:
    opt = pp.optim.sgd(0.5)
    params = {"name": "mlp", "count": torch.tensor(3), "frozen": torch.ones(2), "w": torch.ones(2)}
    grads = {"name": "mlp", "count": None, "frozen": None, "w": torch.ones(2)}
    new, _ = opt.step(params, grads, opt.init(params))
    assert new["count"] is params["count"] and new["frozen"] is params["frozen"]
    assert new["name"] == "mlp"  # a leaf that is no tensor, in both trees
    assert new["w"].tolist() == [0.5, 0.5]


def test_structure_errors_name_both_sides() -> None:
    opt = pp.optim.sgd(0.1, momentum=0.9)
    params = {"layer": {"w": torch.ones(2)}, "b": torch.ones(1)}
    state = opt.init(params)
    missing = re.escape(
        "grads must have the structure of params (None where a leaf has no gradient); "
        "missing in grads: ['b'], not in params: none; params: PyTreeSpec({"
    )
    with pytest.raises(ValueError, match=missing):
        opt.step(params, {"layer": {"w": torch.ones(2)}}, state)
    extra = {"layer": {"w": torch.ones(2)}, "b": torch.ones(1), "c": torch.ones(1)}
    with pytest.raises(ValueError, match=r"missing in grads: none, not in params: \['c'\]"):
        opt.step(params, extra, state)
    other = state.replace(momentum_buffer={"layer": {"w": torch.zeros(2)}})
    hint = re.escape(
        "state.momentum_buffer must have the structure of params (was the state made by "
        "init(params) for these params?); missing in state.momentum_buffer: ['b'], not in "
        "params: none; params: PyTreeSpec({"
    )
    with pytest.raises(ValueError, match=hint):
        opt.step(params, {"layer": {"w": torch.ones(2)}, "b": torch.ones(1)}, other)
