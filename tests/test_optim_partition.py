"""Parameter groups and schedules: pp.optim.partition, lr_scale, warmup_cosine/warmup_linear.

nanoGPT's optimizer is AdamW that decays 2-D weights only, driven by warm-up and cosine decay:
here it is checked against torch.optim.AdamW with two param groups and a LambdaLR, bit for
bit on the fused path, and against Hugging Face's schedule functions.
"""

from __future__ import annotations

import io
import itertools
import math
from typing import Any

import pytest
import torch
from torch import nn

import polprec as pp
from polprec import _fused


def _gpt_like() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    shapes = {
        "wte.weight": (11, 8),
        "h.0.ln_1.weight": (8,),
        "h.0.attn.c_attn.weight": (24, 8),
        "h.0.attn.c_attn.bias": (24,),
        "h.0.mlp.c_fc.weight": (16, 8),
        "ln_f.weight": (8,),
        "ln_f.bias": (8,),
    }
    return {k: torch.randn(s, generator=gen) for k, s in shapes.items()}


def _grads(params: dict[str, torch.Tensor], t: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + t)
    return {k: torch.randn(v.shape, generator=gen).to(v.dtype) for k, v in params.items()}


def _decay(path: str, leaf: torch.Tensor) -> str:
    return "decay" if leaf.dim() >= 2 else "no_decay"


def _nanogpt_opt(lr: float = 6e-4) -> pp.optim.Partition:
    return pp.optim.partition(
        {
            "decay": pp.optim.adamw(lr, betas=(0.9, 0.95), weight_decay=0.1),
            "no_decay": pp.optim.adamw(lr, betas=(0.9, 0.95), weight_decay=0.0),
        },
        _decay,
    )


def _torch_nanogpt(params: dict[str, torch.Tensor], lr: float = 6e-4) -> Any:
    tparams = {k: nn.Parameter(v.clone()) for k, v in params.items()}
    groups = [
        {"params": [p for p in tparams.values() if p.dim() >= 2], "weight_decay": 0.1},
        {"params": [p for p in tparams.values() if p.dim() < 2], "weight_decay": 0.0},
    ]
    return tparams, torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=True)


@pytest.mark.parametrize("donate", [False, True], ids=["pure", "donated"])
def test_nanogpt_groups_and_schedule_are_torchs_bit_for_bit(donate: bool) -> None:
    params = _gpt_like()
    tparams, torch_opt = _torch_nanogpt(params)
    schedule = pp.optim.warmup_cosine(3, 10, min_factor=0.1)
    torch_sched = torch.optim.lr_scheduler.LambdaLR(
        torch_opt, lambda s: float(schedule(torch.tensor(s)))
    )
    opt = _nanogpt_opt()
    state = opt.init(params)
    for t in range(8):
        grads = _grads(params, t)
        for k, p in tparams.items():
            p.grad = grads[k].clone()
        torch_opt.step()
        torch_sched.step()
        factor = float(schedule(state.step))  # a Python float: torch's group lr is one too
        params, state = opt.step(params, grads, state, lr_scale=factor, donate=donate)
    assert list(params) == list(tparams)
    for k, p in tparams.items():
        assert torch.equal(params[k], p.detach()), k
    assert int(state.step) == 8 and set(state.states) == {"decay", "no_decay"}
    assert state.states["decay"].exp_avg["ln_f.bias"] is None  # other labels' leaves: None
    assert torch.equal(
        state.states["no_decay"].exp_avg["ln_f.bias"],
        torch_opt.state[tparams["ln_f.bias"]]["exp_avg"],
    )


def test_labels_as_a_tree_equal_labels_as_a_function() -> None:
    params = _gpt_like()
    tree = {k: _decay(k, v) for k, v in params.items()}
    by_fn, by_tree = _nanogpt_opt(), pp.optim.partition(_nanogpt_opt().optimizers, tree)
    a, sa = params, by_fn.init(params)
    b, sb = params, by_tree.init(params)
    for t in range(3):
        a, sa = by_fn.step(a, _grads(params, t), sa)
        b, sb = by_tree.step(b, _grads(params, t), sb)
    assert all(torch.equal(a[k], b[k]) for k in params)


def test_a_partition_equals_its_optimizers_on_split_trees() -> None:
    params = _gpt_like()
    opt = _nanogpt_opt()
    split = {
        label: {k: v for k, v in params.items() if _decay(k, v) == label}
        for label in ("decay", "no_decay")
    }
    states = {label: opt.optimizers[label].init(p) for label, p in split.items()}
    state = opt.init(params)
    for t in range(4):
        grads = _grads(params, t)
        params, state = opt.step(params, grads, state, lr_scale=torch.tensor(0.5))
        for label in split:
            split[label], states[label] = opt.optimizers[label].step(
                split[label],
                {k: grads[k] for k in split[label]},
                states[label],
                lr_scale=torch.tensor(0.5),
            )
    for part in split.values():
        for k, v in part.items():
            assert torch.equal(params[k], v), k


def test_one_skip_decision_for_every_group() -> None:
    params = _gpt_like()
    opt = _nanogpt_opt()
    state = opt.init(params)
    grads = _grads(params, 0)
    grads["ln_f.bias"] = torch.full_like(grads["ln_f.bias"], float("nan"))  # one group's leaf
    new, after = opt.step(params, grads, state)
    assert all(torch.equal(new[k], params[k]) for k in params)
    assert (int(after.step), int(after.skips), int(after.consecutive_skips)) == (0, 1, 1)
    for sub in after.states.values():  # the labels' states count with the partition
        assert (int(sub.step), int(sub.skips)) == (0, 1)
    new, after = opt.step(params, _grads(params, 1), after, grads_finite=torch.tensor(True))
    assert (int(after.step), int(after.skips), int(after.consecutive_skips)) == (1, 1, 0)


def test_state_dict_round_trip_weights_only() -> None:
    params = {k: v.bfloat16() for k, v in _gpt_like().items()}
    opt = pp.optim.partition(
        {
            "decay": pp.optim.adamw(1e-2, rounding="stochastic"),
            "no_decay": pp.optim.sgd(1e-2, momentum=0.9, master_weights=True),
        },
        _decay,
    )
    state = opt.init(params, seed=5)
    for t in range(2):
        params, state = opt.step(params, _grads(params, t), state)
    buffer = io.BytesIO()
    torch.save(state.state_dict(), buffer)
    buffer.seek(0)
    loaded = pp.optim.PartitionState.from_state_dict(torch.load(buffer, weights_only=True))
    assert loaded.load_state_dict(state.state_dict()).step == state.step
    untyped = {k: v for k, v in state.state_dict().items() if k != "type"}
    assert pp.optim.PartitionState.from_state_dict(untyped).step == state.step  # as any state
    a, sa = opt.step(params, _grads(params, 5), state)
    b, sb = opt.step(params, _grads(params, 5), loaded)
    assert all(torch.equal(a[k], b[k]) for k in params)
    la, lb = pp._tree.tree_leaves(sa), pp._tree.tree_leaves(sb)
    assert len(la) == len(lb) and all(torch.equal(x, y) for x, y in zip(la, lb, strict=True))


def test_a_torch_run_with_two_param_groups_continues_in_polprec() -> None:
    params = _gpt_like()
    tparams, torch_opt = _torch_nanogpt(params)
    for t in range(3):
        for k, p in tparams.items():
            p.grad = _grads(params, t)[k]
        torch_opt.step()
    opt = _nanogpt_opt()
    here = {k: p.detach().clone() for k, p in tparams.items()}
    state = opt.from_torch_state_dict(torch_opt.state_dict(), here)
    assert int(state.step) == 3
    for t in range(3, 6):
        grads = _grads(params, t)
        for k, p in tparams.items():
            p.grad = grads[k].clone()
        torch_opt.step()
        here, state = opt.step(here, grads, state)
    for k, p in tparams.items():
        assert torch.equal(here[k], p.detach()), k


def test_torch_groups_must_match_the_labels() -> None:
    params = _gpt_like()
    _, torch_opt = _torch_nanogpt(params)
    swapped = pp.optim.partition(
        {
            "no_decay": _nanogpt_opt().optimizers["no_decay"],
            "decay": _nanogpt_opt().optimizers["decay"],
        },
        _decay,
    )
    with pytest.raises(ValueError, match=r"weight_decay=0\.1.*label 'no_decay'"):
        swapped.from_torch_state_dict(torch_opt.state_dict(), params)
    one = pp.optim.partition({"all": pp.optim.adamw(6e-4, betas=(0.9, 0.95))}, lambda p, x: "all")
    with pytest.raises(ValueError, match="2 param groups but this partition has 1"):
        one.from_torch_state_dict(torch_opt.state_dict(), params)


def test_stochastic_rounding_does_not_depend_on_the_grouping_or_key_order() -> None:
    params = {k: v.bfloat16() for k, v in _gpt_like().items()}
    single = pp.optim.adamw(1e-3, rounding="stochastic")
    grouped = pp.optim.partition(
        {"a": pp.optim.adamw(1e-3, rounding="stochastic"), "b": single}, _decay_ab
    )
    reordered = dict(reversed(list(params.items())))
    runs = []
    for opt, start in ((single, params), (grouped, params), (single, reordered)):
        p, s = start, opt.init(start, seed=7)
        for t in range(4):
            p, s = opt.step(p, {k: _grads(params, t)[k] for k in start}, s)
        runs.append(p)
    for k in params:
        assert torch.equal(runs[0][k], runs[1][k]) and torch.equal(runs[0][k], runs[2][k]), k
    # the bits depend on the path: two leaves holding the same values round differently
    twins = {"x": torch.full((4096,), 1.0, dtype=torch.bfloat16)}
    twins["y"] = twins["x"].clone()
    g = {"x": torch.full((4096,), 1e-3, dtype=torch.bfloat16)}
    g["y"] = g["x"].clone()
    out, _ = pp.optim.sgd(1e-1, rounding="stochastic").step(
        twins, g, pp.optim.sgd(1e-1, rounding="stochastic").init(twins)
    )
    assert not torch.equal(out["x"], out["y"])


def _decay_ab(path: str, leaf: torch.Tensor) -> str:
    return "a" if leaf.dim() >= 2 else "b"


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain"])
def test_lr_scale_multiplies_each_groups_own_lr(
    fused: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not fused:
        monkeypatch.setattr(_fused, "may_fuse", lambda tensors: False)
    params = _gpt_like()
    opt = pp.optim.partition(
        {"decay": pp.optim.sgd(0.1, momentum=0.9), "no_decay": pp.optim.sgd(0.4)}, _decay
    )
    scaled, _ = opt.step(params, _grads(params, 0), opt.init(params), lr_scale=torch.tensor(0.25))
    by_lr = pp.optim.partition(
        {"decay": pp.optim.sgd(0.025, momentum=0.9), "no_decay": pp.optim.sgd(0.1)}, _decay
    )
    direct, _ = by_lr.step(params, _grads(params, 0), by_lr.init(params))
    for k in params:
        torch.testing.assert_close(scaled[k], direct[k], rtol=1e-6, atol=1e-7)
    one = pp.optim.adamw(1e-2)
    a, _ = one.step(params, _grads(params, 0), one.init(params), lr_scale=0.5)
    b, _ = one.step(params, _grads(params, 0), one.init(params), lr=5e-3)
    assert all(torch.equal(a[k], b[k]) for k in params)


@pytest.mark.parametrize("warmup", [0, 1, 4])
def test_schedules_are_hugging_faces(warmup: int) -> None:
    transformers = pytest.importorskip("transformers")
    total = 20
    for ours, theirs in (
        (pp.optim.warmup_cosine(warmup, total), transformers.get_cosine_schedule_with_warmup),
        (pp.optim.warmup_linear(warmup, total), transformers.get_linear_schedule_with_warmup),
    ):
        opt = torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=1.0)
        sched = theirs(opt, warmup, total)
        for s in range(total + 1):
            factor = ours(torch.tensor(s, dtype=torch.int32))
            assert factor.dtype == torch.float32 and factor.dim() == 0
            assert math.isclose(float(factor), opt.param_groups[0]["lr"], abs_tol=1e-7), s
            opt.step()
            sched.step()


def test_cosine_floor_and_after_the_end() -> None:
    schedule = pp.optim.warmup_cosine(2, 12, min_factor=0.1)
    values = [float(schedule(s)) for s in range(20)]
    assert values[:3] == [0.0, 0.5, 1.0]
    assert math.isclose(values[7], 0.1 + 0.9 * 0.5, rel_tol=1e-6)
    assert all(math.isclose(v, 0.1, rel_tol=1e-6) for v in values[12:])
    assert all(a >= b for a, b in itertools.pairwise(values[2:]))


def test_an_int_step_and_a_tensor_step_give_the_same_bits() -> None:
    """Both are computed in float64 and rounded once to float32."""
    for schedule in (pp.optim.warmup_cosine(7, 1000), pp.optim.warmup_linear(7, 1000)):
        for s in range(0, 1000, 3):
            assert torch.equal(schedule(s), schedule(torch.tensor(s))), (schedule, s)


@pytest.mark.parametrize(
    ("kind", "args", "values"),
    [
        ("linear", (2, 3), [0.0, 0.5, 1.0, 0.0, 0.0]),  # a one-step decay
        ("cosine", (2, 3), [0.0, 0.5, 1.0, 0.0, 0.0]),
        ("linear", (2, 2), [0.0, 0.5, 0.0, 0.0, 0.0]),  # no decay steps at all
        ("cosine", (0, 0), [1.0, 0.0, 0.0, 0.0, 0.0]),  # neither
        ("cosine", (1, 3, 1.0), [0.0, 1.0, 1.0, 1.0, 1.0]),  # a floor of 1
    ],
)
def test_short_schedules(kind: str, args: tuple[Any, ...], values: list[float]) -> None:
    if kind == "linear":
        schedule: Any = pp.optim.warmup_linear(*args)
    else:
        schedule = pp.optim.warmup_cosine(*args[:2], min_factor=args[2] if len(args) > 2 else 0.0)
    assert [float(schedule(s)) for s in range(5)] == values


def test_a_fractional_step_warms_up_linearly() -> None:
    for schedule in (pp.optim.warmup_cosine(1, 3), pp.optim.warmup_linear(1, 3)):
        assert float(schedule(torch.tensor(0.5))) == 0.5


def test_a_schedule_is_a_value_with_its_settings() -> None:
    schedule = pp.optim.warmup_cosine(1, 5, min_factor=0)
    assert repr(schedule) == "WarmupCosine(warmup_steps=1, total_steps=5, min_factor=0.0)"
    assert schedule == pp.optim.warmup_cosine(1, 5) and hash(schedule) == hash(
        pp.optim.warmup_cosine(1, 5)
    )


@pytest.mark.slow
def test_a_compiled_step_takes_float_and_tensor_rates_without_recompiling() -> None:
    params = _gpt_like()
    opt = _nanogpt_opt()
    schedule = pp.optim.warmup_cosine(2, 10)

    def step(p: Any, g: Any, s: Any, scale: Any) -> Any:
        return opt.step(p, g, s, lr_scale=scale)

    def scheduled(p: Any, g: Any, s: Any) -> Any:
        return opt.step(p, g, s, lr_scale=schedule(s.step))

    eager_p, eager_s = params, opt.init(params)
    comp_p, comp_s = params, opt.init(params)
    sched_p, sched_s = params, opt.init(params)
    compiled = torch.compile(step, fullgraph=True)
    compiled_sched = torch.compile(scheduled, fullgraph=True)
    for t, scale in enumerate((0.5, 0.25, 0.125, 0.75)):  # a Python float that changes
        grads = _grads(params, t)
        eager_p, eager_s = opt.step(eager_p, grads, eager_s, lr_scale=scale)
        comp_p, comp_s = compiled(comp_p, grads, comp_s, scale)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for t in range(4):
            sched_p, sched_s = compiled_sched(sched_p, _grads(params, t), sched_s)
    for k in params:
        torch.testing.assert_close(comp_p[k], eager_p[k], rtol=1e-5, atol=1e-6)
    assert int(comp_s.step) == 4 and int(sched_s.step) == 4


def test_labels_see_the_dotted_path_of_each_floating_leaf_only() -> None:
    seen: list[str] = []

    def label(path: str, leaf: torch.Tensor) -> str:
        seen.append(path)
        return "a" if path.startswith("blocks") else "b"

    opt = pp.optim.partition({"a": pp.optim.sgd(0.1), "b": pp.optim.sgd(1.0)}, label)
    params = {
        "count": torch.tensor(2),
        "blocks": [{"w": torch.ones(2)}, {"w": torch.ones(2)}],
        "head": {"b": torch.ones(1)},
    }
    state = opt.init(params)
    assert seen == ["blocks.0.w", "blocks.1.w", "head.b"]
    ones = {"count": None, "blocks": [{"w": torch.ones(2)}] * 2, "head": {"b": torch.ones(1)}}
    new, state = opt.step(params, ones, state)
    assert new["count"] is params["count"]
    assert all(torch.equal(b["w"], torch.full((2,), 1 - 0.1)) for b in new["blocks"])
    assert new["head"]["b"].tolist() == [0.0]
    assert state.states["a"].master is None and int(state.step) == 1


def test_the_default_seed_is_a_single_optimizers() -> None:
    params = {"w": torch.full((256,), 1.0, dtype=torch.bfloat16)}
    grads = {"w": torch.full((256,), 1e-3, dtype=torch.bfloat16)}
    single = pp.optim.sgd(0.1, rounding="stochastic")
    grouped = pp.optim.partition({"all": single}, lambda path, leaf: "all")
    a, _ = single.step(params, grads, single.init(params))
    b, _ = grouped.step(params, grads, grouped.init(params))
    c, _ = single.step(params, grads, single.init(params, seed=0))
    assert torch.equal(a["w"], b["w"]) and torch.equal(a["w"], c["w"])


def test_a_flag_and_donation_reach_every_label() -> None:
    params = _gpt_like()
    opt = _nanogpt_opt()
    state = opt.init(params)
    new, after = opt.step(params, _grads(params, 0), state, grads_finite=torch.tensor(False))
    assert all(torch.equal(new[k], params[k]) for k in params) and int(after.skips) == 1
    inputs = {k: v.clone() for k, v in params.items()}
    moments = {k: v for s in state.states.values() for k, v in s.exp_avg.items() if v is not None}
    new, after = opt.step(inputs, _grads(params, 0), state, donate=True)
    assert all(new[k] is inputs[k] for k in params)  # updated in place, as donated
    assert all(
        after.states[label].exp_avg[k] is moments[k]
        for label in after.states
        for k in moments
        if after.states[label].exp_avg[k] is not None
    )


def test_a_torch_run_with_groups_at_other_steps_needs_a_step_count() -> None:
    params = _gpt_like()
    tparams, torch_opt = _torch_nanogpt(params)
    for k, p in tparams.items():
        p.grad = _grads(params, 0)[k]
    torch_opt.step()
    state_dict = torch_opt.state_dict()
    for pid in state_dict["param_groups"][1]["params"]:
        state_dict["state"][pid]["step"] = torch.tensor(4.0)
    opt = _nanogpt_opt()
    with pytest.raises(ValueError, match=r"param groups have taken different numbers of steps"):
        opt.from_torch_state_dict(state_dict, params)
    state = opt.from_torch_state_dict(state_dict, params, step=4)
    assert int(state.step) == 4 and all(int(s.step) == 4 for s in state.states.values())


def test_a_partitions_repr_names_its_optimizers_and_labels() -> None:
    assert repr(_nanogpt_opt()).startswith("partition({'decay': Adam(lr=0.0006")
    assert repr(_nanogpt_opt()).endswith("}, labels='_decay')")  # a function by its name
    tree = {"w": "a"}
    opt = pp.optim.partition({"a": pp.optim.sgd(0.1)}, tree)
    assert repr(opt) == "partition({'a': " + repr(pp.optim.sgd(0.1)) + "}, labels={'w': 'a'})"


def test_a_torch_run_continues_on_nested_params_labelled_by_path() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    nested = {"blocks": [dict(model[0].named_parameters()), dict(model[1].named_parameters())]}
    torch_opt = torch.optim.SGD(
        [
            {"params": list(model[0].parameters()), "lr": 0.1},
            {"params": list(model[1].parameters()), "lr": 0.2},
        ],
        momentum=0.9,
    )
    model(torch.randn(5, 4)).square().mean().backward()
    torch_opt.step()
    opt = pp.optim.partition(
        {"first": pp.optim.sgd(0.1, momentum=0.9), "second": pp.optim.sgd(0.2, momentum=0.9)},
        lambda path, leaf: "first" if path.startswith("blocks.0.") else "second",
    )
    params = pp._tree.tree_map(lambda t: t.detach(), nested)
    state = opt.from_torch_state_dict(torch_opt.state_dict(), params)
    buffers = state.states["second"].momentum_buffer["blocks"][1]
    assert torch.equal(buffers["weight"], torch_opt.state[model[1].weight]["momentum_buffer"])
    assert state.states["second"].momentum_buffer["blocks"][0]["weight"] is None
