"""Loss-scale states: the adjust rule, its bounds and hysteresis, GradScaler parity,
construction, pytree/vmap/compile round trips, state dicts, GradScaler interop, ``.to()``.

Applying a state to a loss and to gradients: test_scaling.py. Bad input: test_audit.py.
"""

from __future__ import annotations

import io
import math
import random
from typing import Any

import pytest
import torch
from helpers import trajectory
from hypothesis import given
from hypothesis import strategies as st

import polprec as pp
from polprec import _tree
from polprec.testing import assert_trees_all_close
from polprec.testing import strategies as pst

T, F = torch.tensor(True), torch.tensor(False)


# --- the adjust rule: jmp's numbers, bounds, hysteresis -------------------------------


def test_jmp_period_two_trajectory() -> None:
    scales, counters = trajectory(
        pp.DynamicLossScale(2.0**15, period=2), [True, True, True, False, True, True]
    )
    assert scales == [32768, 65536, 65536, 32768, 32768, 65536]
    assert counters == [1, 0, 1, 0, 1, 0]


def test_adjust_accepts_python_bool() -> None:
    assert float(pp.DynamicLossScale(8.0).adjust(False).loss_scale) == 4.0


@pytest.mark.parametrize("factor", [2, 3])
@pytest.mark.parametrize("min_loss_scale", [1.0, 2.0, 0.5])
def test_overflows_clamp_at_min_loss_scale(factor: int, min_loss_scale: float) -> None:
    state = pp.DynamicLossScale(10.0, factor=factor, min_loss_scale=min_loss_scale)
    for _ in range(100):
        state = state.adjust(F)
    assert float(state.loss_scale) == min_loss_scale
    assert state.min_loss_scale == min_loss_scale  # the setting survived 100 rebuilds


def test_inf_guard_and_max_loss_scale() -> None:
    big = pp.DynamicLossScale(2.0**127, period=1)
    assert float(big.adjust(T).loss_scale) == 2.0**127  # 2**128 is inf in float32
    capped = pp.DynamicLossScale(2.0**10, period=1, max_loss_scale=2.0**12)
    scales, counters = trajectory(capped, [True] * 5)
    assert scales == [2.0**11, 2.0**12, 2.0**12, 2.0**12, 2.0**12]
    assert counters == [0] * 5
    odd_cap = pp.DynamicLossScale(8.0, period=1, max_loss_scale=100.0)
    assert trajectory(odd_cap, [True] * 4)[0] == [16, 32, 64, 64]


@given(pst.loss_scales(), st.lists(st.booleans(), max_size=50))
def test_scale_stays_in_bounds_and_finite(state: Any, flags: list[bool]) -> None:
    for flag in flags:
        state = state.adjust(torch.tensor(flag))
        value = float(state.loss_scale)
        assert math.isfinite(value)
        assert value > 0
        if isinstance(state, pp.DynamicLossScale):
            assert value >= state.min_loss_scale
            if state.max_loss_scale is not None:
                assert value <= state.max_loss_scale
            assert 0 <= int(state.counter) < state.period


def test_hysteresis_follows_megatron() -> None:
    # Megatron-LM's DynamicGradScaler: back off on the h-th overflow since the last growth,
    # then on every further overflow until the scale grows again.
    state = pp.DynamicLossScale(2.0**10, period=2, hysteresis=3)
    flags = [False, False, False, False, True, True, False, True, False, False]
    scales, counters = trajectory(state, flags)
    assert scales == [1024, 1024, 512, 256, 256, 512, 512, 512, 512, 256]
    assert counters == [0, 0, 0, 0, 1, 0, 0, 1, 0, 0]


def _megatron_reference(scale: float, flags: list[bool], period: int, h: int) -> list[float]:
    growth_tracker, tracker, out = 0, h, []
    for finite in flags:
        if not finite:
            growth_tracker = 0
            tracker -= 1
            if tracker <= 0:
                scale = max(scale * 0.5, 1.0)
        else:
            growth_tracker += 1
            if growth_tracker == period:
                growth_tracker, tracker = 0, h
                scale = scale * 2.0
        out.append(scale)
    return out


@given(st.lists(st.booleans(), max_size=60), st.integers(1, 4), st.integers(1, 4))
def test_hysteresis_matches_reference_implementation(
    flags: list[bool], period: int, h: int
) -> None:
    state = pp.DynamicLossScale(2.0**8, period=period, hysteresis=h)
    assert trajectory(state, flags)[0] == _megatron_reference(2.0**8, flags, period, h)


# --- GradScaler parity and the fused update -------------------------------------------


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(
    ("init_scale", "period"), [(2.0**16, 3), (1.0, 1), (2.0**120, 2), (8.0, 5)]
)
def test_parity_with_grad_scaler(seed: int, init_scale: float, period: int) -> None:
    rng = random.Random(seed)
    flags = [rng.random() > 0.3 for _ in range(60)]
    weight = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([weight], lr=0.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=period)
    state = pp.DynamicLossScale(init_scale, period=period, factor=2, min_loss_scale=0)
    for flag in flags:
        opt.zero_grad()
        loss = (weight * (1.0 if flag else float("inf"))).sum()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        state = state.adjust(torch.tensor(flag))
        assert float(state.loss_scale) == scaler.get_scale()
        assert int(state.counter) == scaler.state_dict()["_growth_tracker"]


@given(pst.loss_scales(), st.lists(st.booleans(), max_size=40))
def test_fused_and_transform_safe_adjust_agree(state: Any, flags: list[bool]) -> None:
    # Eager adjust runs torch's fused GradScaler kernel where it applies; under vmap the
    # torch.where rule runs. Both must give the same trajectory and the same state.
    batched = _tree.tree_map(lambda x: x[None], state)
    step = torch.func.vmap(lambda s, f: s.adjust(f))
    for flag in flags:
        state = state.adjust(torch.tensor(flag))
        batched = step(batched, torch.tensor([flag]))
        for a, b in zip(_tree.tree_leaves(state), _tree.tree_leaves(batched), strict=True):
            assert torch.equal(a, b[0])


def test_fused_adjust_is_used_for_the_defaults() -> None:
    assert pp.DynamicLossScale()._fusable()
    assert pp.DynamicLossScale(factor=4.0)._fusable()
    assert not pp.DynamicLossScale(factor=3.0)._fusable()
    assert not pp.DynamicLossScale(hysteresis=2)._fusable()
    assert not pp.DynamicLossScale(max_loss_scale=2.0**20)._fusable()


# --- construction, scale / unscale, immutability --------------------------------------


@pytest.mark.parametrize(
    "initial",
    [
        2.0**15,
        32768,
        torch.tensor(2.0**15, dtype=torch.float16),
        torch.tensor(32768),
        torch.tensor(2.0**15, dtype=torch.float64),
    ],
)
def test_initial_scale_types_are_stored_as_float32(initial: Any) -> None:
    for state in (pp.DynamicLossScale(initial), pp.StaticLossScale(initial)):
        assert state.loss_scale.dtype == torch.float32
        assert state.loss_scale.dim() == 0
        assert float(state.loss_scale) == 32768.0
    dyn = pp.DynamicLossScale(initial, period=1)
    assert float(dyn.adjust(T).loss_scale) == 65536.0  # float16 scale adjusts (jmp issue 47)
    assert dyn.counter.dtype == torch.int32


def test_dynamic_defaults_follow_jmp_and_bounds_may_meet() -> None:
    state = pp.DynamicLossScale()
    assert (state.period, state.factor, state.min_loss_scale) == (2000, 2.0, 1.0)
    assert float(state.loss_scale) == 2.0**15 and state.max_loss_scale is None
    assert int(state.counter) == 0 and int(state.hysteresis_tracker) == state.hysteresis == 1
    pinned = pp.DynamicLossScale(4.0, period=1, min_loss_scale=4.0, max_loss_scale=4.0)
    for finite in (True, False, True):
        pinned = pinned.adjust(torch.tensor(finite))
        assert float(pinned.loss_scale) == 4.0  # min == max: a fixed scale
    tracked = pp.DynamicLossScale(hysteresis=3, hysteresis_tracker=1)
    assert int(tracked.hysteresis_tracker) == 1  # an explicit tracker wins over the default
    assert tracked.counter.dtype == tracked.hysteresis_tracker.dtype == torch.int32


def test_dynamic_scale_and_unscale() -> None:
    state = pp.DynamicLossScale(8.0)
    tree = {"w": torch.tensor([1.0, 3.0]), "n": torch.tensor([2])}
    scaled = state.scale(tree)
    assert scaled["w"].tolist() == [8.0, 24.0]
    assert scaled["n"] is tree["n"]
    assert state.unscale(scaled)["w"].tolist() == [1.0, 3.0]


@given(pst.tensor_trees(pst.tensors(max_magnitude=1e3)), st.integers(0, 8))
def test_unscale_of_scale_is_exact_for_powers_of_two(tree: Any, exponent: int) -> None:
    state = pp.StaticLossScale(2.0**exponent)
    back = state.unscale(state.scale(tree))
    for a, b in zip(_tree.tree_leaves(tree), _tree.tree_leaves(back), strict=True):
        if _tree.is_float_tensor(a):
            assert b.dtype == a.dtype
            if torch.isfinite(state.scale(a)).all():  # no overflow in the leaf's dtype
                assert torch.equal(a, b)
        else:
            assert a is b


def test_states_are_immutable() -> None:
    state = pp.DynamicLossScale()
    with pytest.raises(AttributeError):
        state.period = 3  # type: ignore[misc]
    before = (state.loss_scale.clone(), state.counter.clone(), state.loss_scale._version)
    state.adjust(F)
    state.adjust(T)
    assert torch.equal(state.loss_scale, before[0])
    assert torch.equal(state.counter, before[1])
    assert state.loss_scale._version == before[2]


def test_to_moves_every_state_tensor_and_keeps_the_settings() -> None:
    state = pp.DynamicLossScale(8.0, 3, period=5, hysteresis=2)
    moved = state.to("meta")  # a device without data: shows the move without a GPU
    assert {t.device.type for t in _tree.tree_leaves(moved)} == {"meta"}
    assert (moved.period, moved.hysteresis, type(moved)) == (5, 2, pp.DynamicLossScale)
    assert pp.StaticLossScale(2.0).to("meta").loss_scale.device.type == "meta"
    assert state.loss_scale.device.type == "cpu"  # the original is untouched
    on_cpu = pp.DynamicLossScale(period=3).to("cpu")
    assert on_cpu.loss_scale.device.type == "cpu"
    assert on_cpu.period == 3


# --- pytrees: flatten/unflatten, vmap, stacking, compile ------------------------------


def test_config_survives_pytree_round_trips() -> None:
    state = pp.DynamicLossScale(
        4.0, 1, period=7, factor=3.0, min_loss_scale=0.5, max_loss_scale=1e6, hysteresis=2
    )
    leaves, spec = _tree.tree_flatten(state)
    assert len(leaves) == 3
    rebuilt = _tree.tree_unflatten(spec, leaves)
    import torch.utils._pytree as torch_pytree

    t_leaves, t_spec = torch_pytree.tree_flatten(state)
    via_torch = torch_pytree.tree_unflatten(t_leaves, t_spec)
    stacked = _tree.tree_map(lambda *xs: torch.stack(xs), state, state)
    vmapped = torch.func.vmap(lambda s: s.adjust(torch.tensor(True)))(stacked)
    for s in (rebuilt, via_torch, stacked, vmapped):
        assert (s.period, s.factor, s.min_loss_scale, s.max_loss_scale, s.hysteresis) == (
            7,
            3.0,
            0.5,
            1e6,
            2,
        )


def test_subclasses_of_loss_scales_are_pytrees_too() -> None:
    class Tagged(pp.StaticLossScale):  # registered when defined (fresh class per run)
        pass

    state = Tagged(8.0)
    leaves, spec = _tree.tree_flatten(state)
    assert len(leaves) == 1 and float(leaves[0]) == 8.0
    back = _tree.tree_unflatten(spec, [torch.tensor(2.0)])
    assert type(back) is Tagged and float(back.loss_scale) == 2.0
    stacked = pp.stack_trees([Tagged(2.0), Tagged(4.0)])
    scaled = torch.func.vmap(lambda s: pp.scale_loss(torch.tensor(1.0), s))(stacked)
    assert scaled.tolist() == [2.0, 4.0]


def test_vmap_gives_each_member_its_own_scale() -> None:
    states = _tree.tree_map(
        lambda *xs: torch.stack(xs), *[pp.DynamicLossScale(2.0**k, period=2) for k in (4, 5, 6)]
    )
    grads = {"w": torch.tensor([[1.0, 2.0], [float("inf"), 1.0], [4.0, 8.0]])}

    def member(state: pp.DynamicLossScale, g: Any) -> tuple[Any, torch.Tensor, pp.DynamicLossScale]:
        out, ok = pp.unscale_and_check(g, state)
        return out, ok, state.adjust(ok)

    out, ok, new = torch.func.vmap(member)(states, grads)
    assert ok.tolist() == [True, False, True]
    assert new.loss_scale.tolist() == [16.0, 16.0, 64.0]
    assert new.counter.tolist() == [1, 0, 1]
    assert out["w"][0].tolist() == [1 / 16, 2 / 16]
    assert out["w"][2].tolist() == [4 / 64, 8 / 64]


@pytest.mark.slow
def test_compiled_adjust_unscale_select_matches_eager() -> None:
    def step(
        params: Any, grads: Any, state: pp.DynamicLossScale
    ) -> tuple[Any, pp.DynamicLossScale]:
        g, ok = pp.unscale_and_check(grads, state)
        new = _tree.tree_map(lambda p, d: p - 0.1 * d, params, g)
        return pp.select_tree(ok, new, params), state.adjust(ok)

    compiled = torch.compile(step, fullgraph=True)
    params = {"w": torch.ones(4), "b": torch.zeros(2)}
    state = pp.DynamicLossScale(2.0**10, period=2, min_loss_scale=1.0)
    for k in range(6):
        grads = {
            "w": torch.full((4,), 1024.0 * k),
            "b": torch.ones(2) * (float("nan") if k == 3 else 1.0),
        }
        p_c, s_c = compiled(params, grads, state)
        p_e, s_e = step(params, grads, state)
        assert_trees_all_close(p_c, p_e, dtype=torch.float32)
        assert float(s_c.loss_scale) == float(s_e.loss_scale)
        assert int(s_c.counter) == int(s_e.counter)
        assert s_c.min_loss_scale == 1.0
        if k == 3:
            assert_trees_all_close(p_c, params, rtol=0, atol=0)
        params, state = p_c, s_c


# --- state dicts and GradScaler interop -----------------------------------------------


@pytest.mark.parametrize(
    "state",
    [
        pp.NoOpLossScale(),
        pp.StaticLossScale(64.0),
        pp.DynamicLossScale(
            8.0, 3, period=5, factor=4.0, min_loss_scale=2.0, max_loss_scale=2.0**20, hysteresis=2
        ),
    ],
    ids=["noop", "static", "dynamic"],
)
def test_state_dict_survives_torch_save_weights_only(state: Any) -> None:
    buffer = io.BytesIO()
    torch.save(state.state_dict(), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    restored = type(state).from_state_dict(loaded)
    assert restored.state_dict().keys() == state.state_dict().keys()
    for key, value in state.state_dict().items():
        got = restored.state_dict()[key]
        assert torch.equal(got, value) if isinstance(value, torch.Tensor) else got == value
    assert type(state.load_state_dict(loaded)) is type(state)


def test_grad_scaler_state_dict_round_trip() -> None:
    scaler = torch.amp.GradScaler(
        "cpu", init_scale=512.0, growth_factor=4.0, backoff_factor=0.25, growth_interval=7
    )
    state = pp.DynamicLossScale.from_grad_scaler_state_dict(scaler.state_dict())
    assert (
        float(state.loss_scale),
        state.factor,
        state.period,
        int(state.counter),
        state.min_loss_scale,
    ) == (512.0, 4.0, 7, 0, 0.0)
    other = torch.amp.GradScaler("cpu")
    other.load_state_dict(state.adjust(F).to_grad_scaler_state_dict())
    assert other.get_scale() == 128.0
    assert other.state_dict()["growth_interval"] == 7


def test_grad_scaler_conversion_reads_every_field() -> None:
    sd = {
        "scale": torch.tensor(512.0),  # GradScaler may hold its scale as a tensor
        "growth_factor": 4.0,
        "backoff_factor": 0.25,
        "growth_interval": 9,
        "_growth_tracker": 5,
    }
    state = pp.DynamicLossScale.from_grad_scaler_state_dict(sd, max_loss_scale=2.0**20)
    assert float(state.loss_scale) == 512.0
    assert int(state.counter) == 5
    assert state.max_loss_scale == 2.0**20
    back = state.to_grad_scaler_state_dict()
    assert back == {
        "scale": 512.0,
        "growth_factor": 4.0,
        "backoff_factor": 0.25,
        "growth_interval": 9,
        "_growth_tracker": 5,
    }


def test_grad_scaler_conversion_tolerates_float32_rounded_backoff() -> None:
    sd = {
        "scale": 8.0,
        "growth_factor": 3.0,
        "backoff_factor": float(torch.tensor(1 / 3)),
        "growth_interval": 2,
        "_growth_tracker": 0,
    }
    assert pp.DynamicLossScale.from_grad_scaler_state_dict(sd).factor == 3.0
