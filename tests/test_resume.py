"""Exact resume: a run saved and loaded part way continues bit for bit.

One checkpoint dict holds the parameters, the ``pp.optim`` state (``state.state_dict()``) and
the loss scale (``state_dict()``); it goes through ``torch.save`` and
``torch.load(weights_only=True)`` into fresh objects. ``n`` steps straight must equal ``k``
steps, save, load, ``n - k`` steps: every parameter, moment, master copy, compensation
buffer, counter, seed and loss-scale tensor, every step's loss, gradient norm and loss scale
compared bit for bit (``torch.equal`` on the bit patterns).
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import optree
import pytest
import torch
from helpers import classification_batches, seeded_mlp
from torch import nn

import polprec as pp

N, K = 12, 5  # steps in all, steps before the save
BATCH = 16
OVERFLOW_AT = (2, 8)  # an inf in the batch: before and after the save


@dataclass(frozen=True)
class Setup:
    """One kind of run: a policy, an optimizer, a loss scale and the step's options."""

    spec: str
    make_opt: Callable[[], pp.optim.Optimizer]
    make_loss_scale: Callable[[], pp.LossScale]
    microbatches: int = 1
    clip: float | None = None
    seed: int = 0  # of stochastic rounding
    overflow_at: tuple[int, ...] = ()


SETUPS = {
    # GradScaler's loop: 16-mixed, a dynamic scale that overflows once by itself (2**19 is
    # too large at step 1), backs off on the injected infs too and grows after 3 finite steps
    # in a row (one growth right after the save: the counter resumes), 4 micro-batches,
    # clipping that is active on every finite step, AdamW.
    "16-mixed-adamw-dynamic-microbatches-clip": Setup(
        "16-mixed",
        lambda: pp.optim.adamw(1e-2),
        lambda: pp.DynamicLossScale(2.0**19, period=3, min_loss_scale=0),
        microbatches=4,
        clip=0.05,
        overflow_at=OVERFLOW_AT,
    ),
    # bfloat16 parameters: stochastic rounding (its bits come from the seed and the step
    # count, which must both resume), master weights, Kahan compensation.
    "bf16-true-stochastic": Setup(
        "bf16-true",
        lambda: pp.optim.adamw(1e-3, rounding="stochastic"),
        pp.NoOpLossScale,
        microbatches=2,
        seed=7,
        overflow_at=OVERFLOW_AT,
    ),
    "bf16-true-master-weights": Setup(
        "bf16-true", lambda: pp.optim.adamw(1e-3), pp.NoOpLossScale, clip=0.5
    ),
    "bf16-true-kahan-sgd-momentum": Setup(
        "bf16-true",
        lambda: pp.optim.sgd(1e-2, momentum=0.9, kahan=True, state_dtype=torch.bfloat16),
        pp.NoOpLossScale,
        microbatches=2,
        overflow_at=OVERFLOW_AT,
    ),
}


def _model() -> nn.Module:
    return seeded_mlp(8, 32, 4)


def _batches(overflow_at: tuple[int, ...]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return classification_batches(N, BATCH, 8, 4, overflow_at, bad=(3, 1))


class Run:
    """What a training script builds at start-up: the module, the step, the optimizer."""

    def __init__(self, setup: Setup) -> None:
        self.setup = setup
        self.model = _model()
        self.policy = pp.get_policy(setup.spec)
        self.opt = setup.make_opt()

        def loss_fn(params: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            logits = pp.apply_with_policy(self.model, params, x, policy=self.policy)
            return nn.functional.cross_entropy(logits, y)

        self.step_grad = pp.value_and_grad(loss_fn, microbatches=setup.microbatches)

    def start(self) -> tuple[Any, Any, pp.LossScale]:
        named = {k: v.detach() for k, v in self.model.named_parameters()}
        params = pp.cast_params(named, self.policy)
        return params, self.opt.init(params, seed=self.setup.seed), self.setup.make_loss_scale()

    def train(self, params: Any, opt_state: Any, loss_scale: Any, batches: Any) -> Any:
        losses, norms, scales = [], [], []
        for x, y in batches:
            loss, grads, finite, loss_scale = self.step_grad(params, x, y, loss_scale=loss_scale)
            if self.setup.clip is not None:
                grads, norm = pp.clip_by_global_norm(grads, self.setup.clip)
                norms.append(norm)
            params, opt_state = self.opt.step(params, grads, opt_state, grads_finite=finite)
            losses.append(loss)
            scales.append(loss_scale)
        return params, opt_state, loss_scale, losses, norms, scales


def _checkpoint(params: Any, opt_state: Any, loss_scale: Any) -> dict[str, Any]:
    """What a script saves, written to bytes and read back as a fresh process would."""
    buffer = io.BytesIO()
    ckpt = {"params": params, "opt": opt_state.state_dict(), "loss_scale": loss_scale.state_dict()}
    torch.save(ckpt, buffer)
    buffer.seek(0)
    loaded: dict[str, Any] = torch.load(buffer, weights_only=True)
    return loaded


def _resume(ckpt: dict[str, Any], opt_state_type: type, loss_scale_type: type) -> Any:
    return (
        ckpt["params"],
        opt_state_type.from_state_dict(ckpt["opt"]),
        loss_scale_type.from_state_dict(ckpt["loss_scale"]),
    )


_BITS = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _same_bits(x: torch.Tensor, y: torch.Tensor) -> bool:
    """``torch.equal``, on the bit patterns of floating tensors: stricter (signed zeros), and
    a skipped step's NaN loss equals itself, which ``torch.equal`` on values never says."""
    if not x.is_floating_point():
        return torch.equal(x, y)
    bits = _BITS[x.element_size()]
    return torch.equal(x.view(bits), y.view(bits))


def _assert_bitwise_equal(a: Any, b: Any) -> None:
    """Same structure and settings, every tensor of the same dtype and bit for bit equal."""
    paths_a, leaves_a, spec_a = optree.tree_flatten_with_path(a, namespace="torch")
    paths_b, leaves_b, spec_b = optree.tree_flatten_with_path(b, namespace="torch")
    assert spec_a == spec_b  # the states' settings are part of the spec
    assert paths_a == paths_b
    for path, x, y in zip(paths_a, leaves_a, leaves_b, strict=True):
        if isinstance(x, torch.Tensor):
            assert x.dtype == y.dtype and x.shape == y.shape, path
            assert _same_bits(x, y), path
        else:
            assert x == y, path


@pytest.mark.parametrize("name", list(SETUPS))
def test_a_resumed_run_continues_bit_for_bit(name: str) -> None:
    setup = SETUPS[name]
    batches = _batches(setup.overflow_at)

    run = Run(setup)
    p, s, ls = run.start()
    straight = run.train(p, s, ls, batches)

    first = Run(setup)
    p, s, ls = first.start()
    p, s, ls, losses_before, _, scales_before = first.train(p, s, ls, batches[:K])
    ckpt = _checkpoint(p, s, ls)
    skips_at_save = int(s.skips)
    counter_at_save = int(getattr(ls, "counter", 0))
    del first, p, s, ls  # nothing survives the "restart" but the checkpoint

    second = Run(setup)
    p, s, ls = _resume(ckpt, type(straight[1]), type(straight[2]))
    resumed = second.train(p, s, ls, batches[K:])

    params, opt_state, loss_scale, losses, norms, scales = straight
    _assert_bitwise_equal(resumed[0], params)
    _assert_bitwise_equal(resumed[1], opt_state)
    _assert_bitwise_equal(resumed[2], loss_scale)
    _assert_bitwise_equal(losses_before + resumed[3], losses)
    _assert_bitwise_equal(norms[K:], resumed[4])
    # every step's loss scale: a power-of-two scale that is off by a step changes no gradient
    _assert_bitwise_equal(scales_before + resumed[5], scales)

    # What the run went through, so that the equalities above cover it.
    assert int(opt_state.step) + int(opt_state.skips) == N
    if setup.overflow_at:
        assert 0 < skips_at_save < int(opt_state.skips)  # skipped steps before and after
    if setup.clip is not None:
        after = torch.stack(norms[K:])
        assert (after[torch.isfinite(after)] > setup.clip).any()  # clipping was active
    if isinstance(loss_scale, pp.DynamicLossScale):
        assert skips_at_save >= 2  # the scale's own overflow and the injected one
        assert counter_at_save == 2  # one finite step short of a growth
        assert float(loss_scale.loss_scale) == 2.0**18  # 19 - 3 overflows + 2 growths
    params_dtype = pp.get_policy(setup.spec).param_dtype
    assert all(v.dtype == params_dtype for v in params.values())


def test_stochastic_rounding_depends_on_the_resumed_seed_and_step() -> None:
    # The seed and the step count that drive stochastic rounding are in the checkpoint; a
    # resume with either changed rounds differently, so the equality above is not vacuous.
    # (SGD without momentum: the step count reaches nothing but the rounding.)
    setup = Setup(
        "bf16-true", lambda: pp.optim.sgd(1e-3, rounding="stochastic"), pp.NoOpLossScale, seed=7
    )
    batches = _batches(())
    run = Run(setup)
    p, s, ls = run.start()
    p, s, ls = run.train(p, s, ls, batches[:K])[:3]
    ckpt = _checkpoint(p, s, ls)
    p, s, ls = _resume(ckpt, pp.optim.SGDState, pp.NoOpLossScale)
    assert int(s.step) == K and int(s.seed) == 7
    exact = run.train(p, s, ls, batches[K:])[0]
    for changed in ({"seed": torch.tensor(8)}, {"step": torch.tensor(0, dtype=torch.int32)}):
        other = pp.optim.SGDState.from_state_dict(ckpt["opt"] | changed)
        moved = run.train(p, other, ls, batches[K:])[0]
        assert any(not torch.equal(moved[k], exact[k]) for k in exact), changed


def test_the_checkpoint_is_plain_data_that_loads_back_exactly() -> None:
    setup = SETUPS["16-mixed-adamw-dynamic-microbatches-clip"]
    run = Run(setup)
    p, s, ls = run.start()
    ckpt = _checkpoint(p, s, ls)
    assert ckpt["opt"]["type"] == "AdamState"
    assert ckpt["loss_scale"]["type"] == "DynamicLossScale"
    assert ckpt["loss_scale"]["period"] == 3 and ckpt["loss_scale"]["min_loss_scale"] == 0.0
    p2, s2, ls2 = _resume(ckpt, pp.optim.AdamState, pp.DynamicLossScale)
    _assert_bitwise_equal((p2, s2, ls2), (p, s, ls))
