"""Gradient accumulation: ``value_and_grad(..., microbatches=k)`` against GradScaler's loop."""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch
from torch import nn
from torch.func import stack_module_state, vmap

import polprec as pp
from polprec import _tree
from polprec.testing import assert_trees_all_close, assert_trees_all_equal_dtypes


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.Linear(16, 3))


def _data(n: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def _loss_fn(model: nn.Module, policy: Any) -> Any:
    def loss_fn(params: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = pp.apply_with_policy(model, params, x, policy=policy)
        return nn.functional.cross_entropy(logits, y)

    return loss_fn


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


@pytest.mark.parametrize("k", [2, 3, 4])
@pytest.mark.parametrize("spec", ["32-true", "bf16-mixed", "16-mixed"])
def test_gradients_equal_the_full_batch_for_a_mean_loss(k: int, spec: str) -> None:
    model = _model()
    params = _params(model)
    x, y = _data()
    loss_fn = _loss_fn(model, spec)
    full = pp.value_and_grad(loss_fn)
    accumulated = pp.value_and_grad(loss_fn, microbatches=k)
    state = pp.default_loss_scale(spec)
    loss_f, grads_f, ok_f, _ = full(params, x, y, loss_scale=state)
    loss_a, grads_a, ok_a, _ = accumulated(params, x, y, loss_scale=state)
    assert bool(ok_f) and bool(ok_a)
    assert_trees_all_equal_dtypes(grads_a, torch.float32)
    # The chunks compute in the policy's dtype; their mean equals the full batch's mean.
    tolerance = {"32-true": 1e-5, "bf16-mixed": 2e-2, "16-mixed": 2e-3}[spec]
    assert_trees_all_close(loss_a, loss_f, rtol=tolerance, atol=tolerance)
    assert_trees_all_close(grads_a, grads_f, rtol=tolerance, atol=tolerance)


def _grad_scaler_trajectory(
    model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], k: int, lr: float
) -> tuple[list[float], list[int], list[dict[str, torch.Tensor]]]:
    """The torch.amp loop: ``scaler.scale(loss / k).backward()`` per chunk, one step/update."""
    model = nn.Sequential(*[m for m in model])  # the same modules, trained in place below
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=3)
    scales, counters, params = [], [], []
    for x, y in batches:
        opt.zero_grad()
        for xc, yc in zip(x.chunk(k), y.chunk(k), strict=True):
            with torch.autocast("cpu", dtype=torch.float16):
                loss = nn.functional.cross_entropy(model(xc), yc)
            scaler.scale(loss / k).backward()
        scaler.step(opt)
        scaler.update()
        sd = scaler.state_dict()
        scales.append(sd["scale"])
        counters.append(sd["_growth_tracker"])
        params.append({n: p.detach().clone() for n, p in model.named_parameters()})
    return scales, counters, params


def test_loss_scale_follows_grad_scaler_with_overflows_in_single_micro_batches() -> None:
    k, lr = 4, 0.1
    x, y = _data(16)
    batches = []
    for step in range(12):
        xs = x + 0.01 * step
        if step in (2, 7):  # one micro-batch of four overflows float16, the others do not
            xs = xs.clone()
            xs[4 * (step % k), 0] = 1e6
        if step == 9:  # two of them
            xs = xs.clone()
            xs[0, 1] = float("inf")
            xs[12, 2] = -1e6
        batches.append((xs, y))
    torch_scales, torch_counters, torch_params = _grad_scaler_trajectory(_model(), batches, k, lr)

    model = _model()
    params = _params(model)
    step_grad = pp.value_and_grad(_loss_fn(model, "16-mixed"), microbatches=k)
    state = pp.DynamicLossScale(2.0**8, period=3, min_loss_scale=0.0)
    scales, counters, flags = [], [], []
    for (xs, ys), expected in zip(batches, torch_params, strict=True):
        _, grads, finite, state = step_grad(params, xs, ys, loss_scale=state)
        new = {n: p - lr * grads[n] for n, p in params.items()}
        params = pp.select_tree(finite, new, params)
        scales.append(float(state.loss_scale))
        counters.append(int(state.counter))
        flags.append(bool(finite))
        assert_trees_all_close(params, expected, rtol=1e-3, atol=1e-4)
    assert flags == [s not in (2, 7, 9) for s in range(12)]
    assert scales == torch_scales
    assert counters == torch_counters  # one adjust per step: not k times too fast


@pytest.mark.parametrize(
    ("args", "kwargs", "fragment"),
    [
        ((torch.ones(10, 6), torch.zeros(10, dtype=torch.long)), {}, "positional argument 0"),
        ((torch.ones(8, 6), torch.zeros(9, dtype=torch.long)), {}, "positional argument 1"),
    ],
)
def test_a_leading_dimension_the_chunks_do_not_divide_is_an_error(
    args: tuple[Any, ...], kwargs: dict[str, Any], fragment: str
) -> None:
    model = _model()
    step = pp.value_and_grad(_loss_fn(model, "32-true"), microbatches=4)
    with pytest.raises(ValueError, match="microbatches=4 cannot split") as info:
        step(_params(model), *args, loss_scale=pp.NoOpLossScale(), **kwargs)
    assert fragment in str(info.value)
    assert "is not divisible by 4" in str(info.value)


def test_nested_and_keyword_arguments_are_split_and_named() -> None:
    seen: list[tuple[Any, ...]] = []

    def loss_fn(params: Any, batch: dict[str, Any], *, weight: torch.Tensor, tag: str) -> Any:
        seen.append((batch["x"].shape, batch["n"], weight.shape, tag))
        return (params["w"] * batch["x"]).sum() * weight

    step = pp.value_and_grad(loss_fn, microbatches=2)
    params = {"w": torch.ones(3)}
    batch = {"x": torch.ones(4, 3), "n": 7}
    loss, grads, _, _ = step(
        params, batch, weight=torch.tensor(2.0), tag="a", loss_scale=pp.NoOpLossScale()
    )
    # 0-dim tensors and non-tensors go to every chunk as they are
    assert seen == [(torch.Size([2, 3]), 7, torch.Size([]), "a")] * 2
    assert float(loss) == 12.0  # the mean of the two chunks' losses (2 * 3 * 2 each)
    assert grads["w"].tolist() == [4.0] * 3  # (2 + 2) / 2 * weight 2
    with pytest.raises(ValueError, match="keyword argument 'batch' at x: its leading dimension 3"):
        step(
            params,
            batch={"x": torch.ones(3, 3), "n": 1},
            weight=torch.tensor(1.0),
            tag="b",
            loss_scale=pp.NoOpLossScale(),
        )


def test_has_aux_stacks_the_chunks_aux() -> None:
    model = _model()
    policy = pp.get_policy("bf16-mixed")

    def loss_fn(params: Any, x: torch.Tensor, y: torch.Tensor) -> Any:
        logits = pp.apply_with_policy(model, params, x, policy=policy)
        return nn.functional.cross_entropy(logits, y), {"logits": logits, "name": "mlp"}

    x, y = _data(12)
    (loss, aux), _, _, _ = pp.value_and_grad(loss_fn, has_aux=True, microbatches=3)(
        _params(model), x, y, loss_scale=pp.NoOpLossScale()
    )
    assert aux["name"] == "mlp"
    assert aux["logits"].shape == (3, 4, 3)  # k chunks stacked along a new leading dim
    full = pp.apply_with_policy(model, _params(model), x, policy=policy)
    assert_trees_all_close(aux["logits"].reshape(12, 3), full, dtype=torch.bfloat16)
    assert loss.dtype == torch.float32


def test_inputs_are_not_modified_and_the_eager_and_transform_paths_agree() -> None:
    model = _model()
    params = _params(model)
    x, y = _data(8)
    versions = [t._version for t in (*params.values(), x, y)]
    # float32 compute: under vmap a mixed policy casts explicitly instead of autocasting
    step = pp.value_and_grad(_loss_fn(model, "32-true"), microbatches=2)
    state = pp.DynamicLossScale(2.0**10)
    loss, grads, finite, new = step(params, x, y, loss_scale=state)
    assert [t._version for t in (*params.values(), x, y)] == versions
    # Inside vmap (a batch of one) the same step takes the plain-op path.
    batched = vmap(lambda p, xb, yb, s: step(p, xb, yb, loss_scale=s))
    one = _tree.tree_map(lambda t: t[None], (params, x, y, state))
    loss_v, grads_v, finite_v, new_v = batched(*one)
    assert_trees_all_close(grads, _tree.tree_map(lambda t: t[0], grads_v), rtol=1e-6, atol=1e-7)
    assert_trees_all_close(loss, loss_v[0], rtol=1e-6, atol=1e-7)
    assert bool(finite) == bool(finite_v[0])
    assert float(new.loss_scale) == float(new_v.loss_scale[0])
    assert int(new.counter) == int(new_v.counter[0]) == 1


def test_ensemble_members_accumulate_with_their_own_loss_scale() -> None:
    torch.manual_seed(0)
    members = [nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 1)) for _ in range(3)]
    params, _ = stack_module_state(members)
    base = members[0].to("meta")

    def loss_fn(p: Any, x: torch.Tensor) -> torch.Tensor:
        return pp.apply_with_policy(base, p, x, policy="16-mixed").float().pow(2).mean()

    step = pp.value_and_grad(loss_fn, microbatches=2)
    scales = pp.stack_trees([pp.DynamicLossScale(2.0**10, period=1)] * 3)
    x = torch.randn(3, 6, 4)
    x[2, 4, 0] = 1e30  # the second micro-batch of member 2 overflows
    _, grads, finite, new = vmap(lambda p, xb, s: step(p, xb, loss_scale=s))(params, x, scales)
    assert finite.tolist() == [True, True, False]
    assert new.loss_scale.tolist() == [2.0**11, 2.0**11, 2.0**9]
    assert bool(torch.isfinite(grads["0.weight"][:2]).all())


def test_microbatches_must_be_a_positive_int() -> None:
    for bad, exc in ((0, ValueError), (2.0, TypeError), (True, TypeError)):
        with pytest.raises(exc, match="microbatches must be an int >= 1"):
            pp.value_and_grad(len, microbatches=bad)  # type: ignore[arg-type]


@pytest.mark.slow
def test_compiled_accumulating_step_with_clipping_matches_eager() -> None:
    model = _model()
    params = _params(model)
    step_grad = pp.value_and_grad(_loss_fn(model, "16-mixed"), microbatches=2)

    def train_step(p: Any, x: torch.Tensor, y: torch.Tensor, ls: pp.DynamicLossScale) -> Any:
        loss, grads, finite, ls = step_grad(p, x, y, loss_scale=ls)
        grads, norm = pp.clip_by_global_norm(grads, 0.5)
        new = _tree.tree_map(lambda w, g: w - 0.1 * g, p, grads)
        return loss, norm, pp.select_tree(finite, new, p), ls

    compiled = torch.compile(train_step, fullgraph=True)
    x, y = _data(8)
    state = pp.DynamicLossScale(2.0**10, period=2, min_loss_scale=0.0)
    for k in range(3):
        xs = x.clone()
        if k == 1:
            xs[5, 0] = float("nan")  # only the second micro-batch
        got = compiled(params, xs, y, state)
        want = train_step(params, xs, y, state)
        assert_trees_all_close(got[:3], want[:3], rtol=1e-3, atol=1e-4)
        assert float(got[3].loss_scale) == float(want[3].loss_scale)
        assert int(got[3].counter) == int(want[3].counter)
        params, state = got[2], got[3]
    assert float(state.loss_scale) == 2.0**9 and int(state.counter) == 1


def test_16_bit_parameters_get_16_bit_gradients_and_loss() -> None:
    """The chunks' gradients are summed in float32 and returned in each parameter's dtype; the
    loss is the chunks' mean in the chunks' dtype."""

    def loss_fn(params: Any, x: torch.Tensor) -> torch.Tensor:
        return ((x @ params["w"] + params["b"]) ** 2).mean()  # bfloat16 throughout

    gen = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(6, 3, generator=gen), "b": torch.randn(3, generator=gen)}
    params = {k: v.bfloat16() for k, v in params.items()}
    x = torch.randn(8, 6, generator=gen).bfloat16()
    loss, grads, finite, _ = pp.value_and_grad(loss_fn, microbatches=2)(
        params, x, loss_scale=pp.NoOpLossScale()
    )
    full_loss, full_grads, _, _ = pp.value_and_grad(loss_fn)(
        params, x, loss_scale=pp.NoOpLossScale()
    )
    assert bool(finite) and loss.dtype == torch.bfloat16
    assert_trees_all_equal_dtypes(grads, torch.bfloat16)
    assert_trees_all_close(grads, full_grads, dtype=torch.bfloat16)
    assert_trees_all_close(loss, full_loss, dtype=torch.bfloat16)


def test_a_top_level_argument_is_named_without_a_path() -> None:
    step = pp.value_and_grad(lambda p, x: (p["w"] * x).sum(), microbatches=2)
    with pytest.raises(
        ValueError,
        match=r"microbatches=2 cannot split positional argument 0: its leading dimension 3 ",
    ):
        step({"w": torch.ones(1)}, torch.ones(3), loss_scale=pp.NoOpLossScale())


@pytest.mark.parametrize("k", [1, 2])
def test_under_vmap_aux_and_keyword_arguments_reach_the_loss(k: int) -> None:
    """The transform path (torch.func.grad inside vmap): keyword arguments, aux with tensors."""

    def loss_fn(params: Any, x: torch.Tensor, *, scale: torch.Tensor) -> Any:
        out = (params["w"] * x).sum(-1)
        return out.mean() * scale, {"out": out}

    step = pp.value_and_grad(loss_fn, has_aux=True, microbatches=k)
    params = {"w": torch.ones(3)}
    x = torch.arange(24.0).reshape(2, 4, 3)  # two examples of a batch of 4

    def one(xb: torch.Tensor) -> Any:
        return step(params, xb, scale=torch.tensor(2.0), loss_scale=pp.NoOpLossScale())

    (loss, aux), grads, finite, _ = vmap(one)(x)
    for i in range(2):
        (want_loss, want_aux), want, _, _ = one(x[i])
        assert_trees_all_close(loss[i], want_loss, rtol=1e-6, atol=0)
        assert_trees_all_close(grads["w"][i], want["w"], rtol=1e-6, atol=0)
        assert_trees_all_close(aux["out"][i], want_aux["out"], rtol=0, atol=0)
        assert not want_aux["out"].requires_grad  # aux is detached in eager mode too
    assert bool(finite.all())
    assert torch.equal(grads["w"][0], 2.0 * x[0].mean(0))


def test_under_vmap_aux_that_is_not_tensors_is_refused_clearly() -> None:
    class DynamicCache:  # what a transformers model in eval mode returns beside its logits
        pass

    params = {"w": torch.ones(3)}
    for aux, fragment in (
        ({"out": torch.ones(1), "name": "mlp"}, "aux holds a str at aux.name: inside vmap"),
        ([torch.ones(1), DynamicCache()], "aux holds a DynamicCache at aux[1]"),
    ):
        step = pp.value_and_grad(lambda p, x, aux=aux: ((p["w"] * x).sum(), aux), has_aux=True)
        with pytest.raises(TypeError, match=re.escape(fragment)) as info:
            vmap(lambda x, step=step: step(params, x, loss_scale=pp.NoOpLossScale()))(
                torch.ones(2, 3)
            )
        assert ("use_cache=False" in str(info.value)) == isinstance(aux, list)
