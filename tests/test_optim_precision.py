"""The precision options of polprec.optim: what each keeps of updates a 16-bit value loses.

A constant gradient with a learning rate whose updates fall far under half a 16-bit spacing
is the case built for it: nearest rounding stalls, master weights, stochastic rounding (on
average) and Kahan compensation follow the float32 trajectory. Then stochastic rounding's
own promises (unbiased, reproducible from the state, no global generator, compilable) and
the bytes per parameter of each mode.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import polprec as pp
from polprec import _dtensor
from polprec.optim import _rounding

BF16, F16 = torch.bfloat16, torch.float16


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Any:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _train(opt: Any, dtype: torch.dtype, *, steps: int, n: int = 4096) -> tuple[Any, Any]:
    """``steps`` updates of ``n`` parameters at 1.0 with a constant gradient of 1."""
    params = {"w": torch.ones(n, dtype=dtype)}
    state = opt.init(params, seed=1)
    grads = {"w": torch.ones(n, dtype=dtype)}
    for _ in range(steps):
        params, state = opt.step(params, grads, state, grads_finite=torch.tensor(True))
    return params, state


# lr * steps = 0.02: every update is far below half a spacing under 1.0 (2**-9 for bfloat16,
# 2**-12 for float16)
CASES = {BF16: 1e-4, F16: 1e-5}
STEPS = 200


@pytest.mark.parametrize("dtype", [BF16, F16], ids=str)
def test_nearest_rounding_stalls(dtype: torch.dtype) -> None:
    params, state = _train(pp.optim.sgd(CASES[dtype], master_weights=False), dtype, steps=STEPS)
    assert state.master is None and state.compensation is None
    assert torch.all(params["w"] == 1.0)


@pytest.mark.parametrize("dtype", [BF16, F16], ids=str)
def test_master_weights_keep_small_updates(dtype: torch.dtype) -> None:
    lr = CASES[dtype]
    params, state = _train(pp.optim.sgd(lr), dtype, steps=STEPS)  # on by default for 16-bit
    expected = 1.0 - lr * STEPS
    assert state.master["w"].dtype == torch.float32
    torch.testing.assert_close(state.master["w"], torch.full_like(state.master["w"], expected))
    assert torch.equal(params["w"], state.master["w"].to(dtype))


@pytest.mark.parametrize("dtype", [BF16, F16], ids=str)
@pytest.mark.parametrize("moments", ["f32", "16-bit"])
def test_stochastic_rounding_keeps_small_updates_on_average(
    dtype: torch.dtype, moments: str
) -> None:
    lr = CASES[dtype]
    state_dtype = dtype if moments == "16-bit" else None  # the update runs in float32 anyway
    opt = pp.optim.sgd(lr, rounding="stochastic", state_dtype=state_dtype)
    params, state = _train(opt, dtype, steps=STEPS)
    assert state.master is None and state.seed is not None
    mean = params["w"].double().mean().item()
    # per step each element moves one spacing with probability lr/spacing: the mean is
    # 1 - lr * steps up to sampling noise (4096 elements)
    assert abs(mean - (1.0 - lr * STEPS)) < 0.05 * lr * STEPS
    assert len(params["w"].unique()) > 3  # they spread over neighbouring values


@pytest.mark.parametrize("dtype", [BF16, F16], ids=str)
@pytest.mark.parametrize("state_dtype", [None, BF16], ids=["f32-moments", "bf16-moments"])
def test_kahan_keeps_small_updates(dtype: torch.dtype, state_dtype: Any) -> None:
    lr = CASES[dtype]
    opt = pp.optim.adam(lr, kahan=True, state_dtype=state_dtype)
    params, state = _train(opt, dtype, steps=STEPS, n=16)
    assert state.master is None and state.compensation["w"].dtype == dtype
    total = params["w"].double() + state.compensation["w"].double()
    # float32 parameters with the same settings (Kahan does not act on them) are the target; a
    # 16-bit compensation holds the running sum to its own 8 (bfloat16) or 11 (float16) bits:
    # within 2% of the total change (nearest rounding is 100% off: it does not move)
    reference = _train(opt, torch.float32, steps=STEPS, n=16)[0]["w"].double()
    assert abs(reference[0].item() - (1 - lr * STEPS)) < 0.05 * lr * STEPS
    torch.testing.assert_close(total, reference, rtol=0, atol=0.02 * lr * STEPS)
    spacing = 2.0**-8 if dtype == BF16 else 2.0**-11
    assert torch.all((params["w"].double() - reference).abs() <= spacing)


def test_the_options_act_on_16_bit_parameters_only() -> None:
    params = {"h": torch.ones(2, dtype=BF16), "f": torch.ones(2), "d": torch.ones(2).double()}
    for kwargs in ({"master_weights": True}, {"kahan": True}, {"rounding": "stochastic"}):
        state = pp.optim.adamw(**kwargs).init(params)
        kept = state.master if "master_weights" in kwargs else state.compensation
        if kept is not None:
            assert kept["f"] is None and kept["d"] is None and kept["h"] is not None
        assert (
            state.exp_avg["h"].dtype == torch.float32 and state.exp_avg["f"].dtype == torch.float32
        )
        assert state.exp_avg["d"].dtype == torch.float64  # a parameter's own dtype
    assert pp.optim.adamw().init({"f": torch.ones(2)}).master is None
    # None: master copies unless Kahan or stochastic rounding replace them
    assert pp.optim.adamw(kahan=True).init(params).master is None
    assert pp.optim.adamw(rounding="stochastic").init(params).master is None
    assert (
        pp.optim.adamw(rounding="stochastic", master_weights=True).init(params).master is not None
    )


def test_state_dtype_sets_the_moments_dtype() -> None:
    params = {"w": torch.randn(64)}
    grads = {"w": torch.randn(64)}
    ref = pp.optim.adamw(1e-2)
    low = pp.optim.adamw(1e-2, state_dtype="bf16")
    a, sa = params, ref.init(params)
    b, sb = params, low.init(params)
    for _ in range(20):
        a, sa = ref.step(a, grads, sa)
        b, sb = low.step(b, grads, sb)
    assert sb.exp_avg["w"].dtype == BF16 and b["w"].dtype == torch.float32
    torch.testing.assert_close(b["w"], a["w"], rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("dtype", [BF16, F16], ids=str)
@pytest.mark.parametrize("name", ["adam", "sgd"])
def test_16_bit_parameters_with_float32_moments_update_in_float32(
    name: str, dtype: torch.dtype
) -> None:
    """Without master copies the update is computed in float32 and rounded once: a float32
    step on the same values, rounded to the parameter's dtype."""
    make = {"adam": pp.optim.adam, "sgd": lambda lr, **k: pp.optim.sgd(lr, momentum=0.9, **k)}
    opt = make[name](1e-2, master_weights=False)
    gen = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(256, generator=gen).to(dtype)}
    grads = {"w": torch.randn(256, generator=gen).to(dtype)}
    wide = {"w": params["w"].float()}
    got, got_state = opt.step(params, grads, opt.init(params))
    want, want_state = opt.step(wide, {"w": grads["w"].float()}, opt.init(wide))
    assert got["w"].dtype == dtype and torch.equal(got["w"], want["w"].to(dtype))
    moment = "exp_avg" if name == "adam" else "momentum_buffer"
    assert torch.equal(getattr(got_state, moment)["w"], getattr(want_state, moment)["w"])


# --- stochastic rounding ---------------------------------------------------------------------


def test_the_random_bits_of_a_state_never_change() -> None:
    """A checkpoint resumes with the same rounding in every polprec version: the hash is
    lowbias32 (against a reference in Python integers) and one leaf's bits are fixed values."""

    def lowbias32(x: int) -> int:
        x ^= x >> 16
        x = (x * 0x21F0AAAD) & 0xFFFFFFFF
        x ^= x >> 15
        x = (x * 0x735A2D97) & 0xFFFFFFFF
        return x ^ (x >> 15)

    values = [0, 1, 2, 12345, 0xDEADBEEF, 0x80000000, 0xFFFFFFFF]
    assert _rounding._mix(torch.tensor(values)).tolist() == [lowbias32(v) for v in values]

    def fnv1a(path: str) -> int:  # 32-bit FNV-1a over the code points
        h = 0x811C9DC5
        for char in path:
            h = ((h ^ ord(char)) * 0x01000193) & 0xFFFFFFFF
        return h

    for path in ["blocks.0.w", "", "wte.weight", "é.ü"]:
        assert _rounding.path_key(path) == fnv1a(path), path
    assert _rounding.path_key("blocks.0.w") == 497573778
    key = _rounding.leaf_key(
        torch.tensor(3), torch.tensor(5, dtype=torch.int32), _rounding.path_key("blocks.0.w")
    )
    assert int(key) == 3186691405
    bits = _rounding.random_bits(torch.arange(4), key)
    assert bits.tolist() == [3490052714, 1165919775, 3075398042, 1066235247]


def test_float16_subnormals_round_up_with_exactly_their_fraction() -> None:
    """Below float16's smallest normal the grid is 2**-24 apart: halfway between two of its
    points, half of an even spread of random bits rounds up, not one more."""
    bits = torch.arange(256, dtype=torch.int64) << 24  # uniform values 0, 1/256, ..., 255/256
    x = torch.full((256,), 2.0**-24 * 2.5)  # 2.5 grid points: halfway between 2 and 3
    out = _rounding.stochastic_round(x, F16, bits).float() / 2.0**-24
    assert sorted(set(out.tolist())) == [2.0, 3.0] and int((out == 3.0).sum()) == 128


def test_kahan_compensation_takes_stochastic_rounding_too() -> None:
    opt = pp.optim.sgd(1e-3, kahan=True, rounding="stochastic")
    params = {"w": torch.full((512,), 1.0, dtype=BF16)}
    grads = {"w": torch.full((512,), 1.0, dtype=BF16)}
    runs = [opt.step(params, grads, opt.init(params, seed=seed)) for seed in (1, 2)]
    assert not torch.equal(runs[0][0]["w"], runs[1][0]["w"])
    for new, state in runs:  # whatever the rounding, value + compensation is the float32 sum
        total = new["w"].float() + state.compensation["w"].float()
        torch.testing.assert_close(total, torch.full((512,), 1.0 - 1e-3), rtol=0, atol=1e-5)


def _round(x: torch.Tensor, dtype: torch.dtype, seed: int = 0, step: int = 1) -> torch.Tensor:
    key = _rounding.leaf_key(torch.tensor(seed), torch.tensor(step, dtype=torch.int32), 0)
    return _rounding.stochastic_round(
        x, dtype, _rounding.random_bits(_dtensor.global_indices(x), key)
    )


@pytest.mark.parametrize(
    ("dtype", "base", "spacing"),
    [
        (BF16, 1.0, 2.0**-7),
        (BF16, -3.0, 2.0**-6),
        (BF16, 2.0**-130, 2.0**-133),  # a bfloat16 subnormal
        (F16, 1.0, 2.0**-10),
        (F16, -100.0, 2.0**-4),
        (F16, 2.0**-20, 2.0**-24),  # a float16 subnormal
    ],
)
@pytest.mark.parametrize("fraction", [0.25, 0.5, 0.875])
def test_stochastic_rounding_is_unbiased(
    dtype: torch.dtype, base: float, spacing: float, fraction: float
) -> None:
    n = 1 << 16
    away = math.copysign(spacing * fraction, base)  # towards larger magnitude
    x = torch.full((n,), base + away, dtype=torch.float32)
    assert x[0].item() == base + away  # exact in float32
    out = _round(x, dtype, seed=7)
    rounded_away = (out.double() != base).double()
    assert set(out.double().unique().tolist()) <= {base, base + math.copysign(spacing, base)}
    # up with probability `fraction`: within 5 standard deviations of it
    assert abs(rounded_away.mean().item() - fraction) < 5 * math.sqrt(fraction * (1 - fraction) / n)


@given(st.floats(min_value=-(2.0**127), max_value=2.0**127, width=32), st.sampled_from([BF16, F16]))
def test_stochastic_rounding_picks_a_neighbour(value: float, dtype: torch.dtype) -> None:
    if dtype == F16 and abs(value) > 65000:
        value = math.copysign(65000.0, value)
    x = torch.tensor([value] * 8, dtype=torch.float32)
    out = _round(x, dtype).to(torch.float32)
    nearest = x.to(dtype)
    other = torch.nextafter(
        nearest, torch.where(nearest.float() < x, torch.inf, -torch.inf).to(dtype)
    )
    low = torch.minimum(nearest.float(), other.float())
    high = torch.maximum(nearest.float(), other.float())
    assert torch.all((out >= low) & (out <= high))
    if nearest.float()[0] == x[0]:  # representable: kept exactly
        assert torch.equal(out, x)


def test_stochastic_rounding_bits_come_from_the_state_alone() -> None:
    x = torch.full((1000,), 1.0 + 2.0**-9)
    before = torch.random.get_rng_state()
    a, b = _round(x, BF16), _round(x, BF16)
    assert torch.equal(a, b)
    assert torch.equal(torch.random.get_rng_state(), before)  # torch's generator untouched
    assert not torch.equal(a, _round(x, BF16, step=2))
    assert not torch.equal(a, _round(x, BF16, seed=1))
    bits = _rounding.random_bits(
        _dtensor.global_indices(torch.empty(1 << 16)),
        _rounding.leaf_key(torch.tensor(0), torch.tensor(1), _rounding.path_key("w")),
    )
    counts = torch.bincount((bits >> 28).flatten(), minlength=16).double()  # the top 4 bits
    expected = (1 << 16) / 16
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 50  # 15 degrees of freedom: p < 1e-5 above 50


def test_stochastic_rounding_is_reproducible_from_the_state() -> None:
    opt = pp.optim.adamw(1e-3, rounding="stochastic")
    a, sa = _train(opt, BF16, steps=5, n=256)
    b, sb = _train(opt, BF16, steps=5, n=256)
    assert torch.equal(a["w"], b["w"]) and torch.equal(sa.seed, sb.seed)
    params = {"w": torch.ones(256, dtype=BF16)}
    other = opt.init(params, seed=2)
    grads = {"w": torch.ones(256, dtype=BF16)}
    for _ in range(5):
        params, other = opt.step(params, grads, other)
    assert not torch.equal(params["w"], a["w"])


@pytest.mark.slow
def test_stochastic_rounding_compiles_to_the_same_bits() -> None:
    opt = pp.optim.sgd(1e-3, momentum=0.9, rounding="stochastic")
    params = {"w": torch.randn(1000).to(BF16)}
    grads = {"w": torch.randn(1000).to(BF16)}
    state = opt.init(params, seed=5)

    def step(p: Any, s: Any, lr: torch.Tensor) -> Any:
        return opt.step(p, grads, s, lr=lr, grads_finite=torch.tensor(True))

    compiled = torch.compile(step, fullgraph=True)
    eager, comp = (params, state), (params, state)
    for t in range(3):
        lr = torch.tensor(1e-3 * (t + 1))
        eager, comp = step(*eager, lr), compiled(*comp, lr)
    # the random bits are integer arithmetic, exact under inductor; the values they round may
    # differ in float32's last bit, which moves a bfloat16 result only at a rounding boundary
    mismatch = (eager[0]["w"] != comp[0]["w"]).float().mean().item()
    assert mismatch < 0.01
    assert int(comp[1].step) == 3


# --- memory ----------------------------------------------------------------------------------


def bytes_per_parameter(policy: str, **options: Any) -> float:
    """Parameters, gradients and optimizer state, in bytes per parameter, from the tensors."""
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 10))
    params = pp.cast_params({k: v.detach() for k, v in model.named_parameters()}, policy)
    grads = pp._tree.tree_map(torch.zeros_like, params)  # value_and_grad: one per parameter
    state = pp.optim.adamw(**options).init(params)
    count = sum(p.numel() for p in params.values())
    tensors = [*params.values(), *grads.values(), *pp._tree.tree_leaves(state)]
    per_step = sum(t.numel() * t.element_size() for t in tensors if t.dim() > 0)
    return per_step / count


@pytest.mark.parametrize(
    ("policy", "options", "expected"),
    [
        ("32-true", {}, 16),
        ("bf16-mixed", {}, 16),
        ("bf16-true", {"master_weights": False}, 12),
        ("bf16-true", {}, 16),  # master weights
        ("bf16-true", {"kahan": True, "state_dtype": "bf16"}, 10),
        ("bf16-true", {"rounding": "stochastic", "state_dtype": "bf16"}, 8),
    ],
)
def test_bytes_per_parameter(policy: str, options: dict[str, Any], expected: int) -> None:
    assert bytes_per_parameter(policy, **options) == expected
