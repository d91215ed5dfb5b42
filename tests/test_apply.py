"""apply_with_policy, autocast, full_precision and value_and_grad under eager, grad, vmap, compile.

Bad input to them: test_audit.py.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import Block, make_tree
from helpers import block_batch, mse_loss_fn
from torch import nn
from torch.func import functional_call, grad, stack_module_state, vmap

import polprec as pp
from polprec import _tree
from polprec.testing import (
    assert_matches_full_precision,
    assert_trees_all_close,
    assert_trees_all_equal_dtypes,
)

POLICIES = ["bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true", "32-true"]


@pytest.fixture
def block() -> Block:
    torch.manual_seed(0)
    return Block()


@pytest.mark.parametrize("spec", POLICIES)
def test_eager_dtypes_and_accuracy(block: Block, spec: str) -> None:
    policy = pp.get_policy(spec)
    x, y = block_batch()
    params = dict(block.named_parameters())

    def forward(p: Any, x: torch.Tensor, *, policy: pp.Policy) -> torch.Tensor:
        return pp.apply_with_policy(block, p, x, policy=policy)

    block.seen.clear()
    out, ref = assert_matches_full_precision(forward, params, x, policy=policy)
    assert block.seen[0] == policy.compute_dtype  # dtype inside the first Linear
    assert out.dtype == policy.output_dtype
    assert ref.dtype == torch.float32

    low = pp.cast_params(params, policy)
    _loss, grads, finite, _ = pp.value_and_grad(mse_loss_fn(block, policy))(
        low, x, y, loss_scale=pp.default_loss_scale(policy)
    )
    assert bool(finite)
    assert_trees_all_equal_dtypes(grads, policy.param_dtype)
    _, ref_grads, _, _ = pp.value_and_grad(mse_loss_fn(block, "32-true"))(
        params, x, y, loss_scale=pp.NoOpLossScale()
    )
    rel = _relative_error(grads, ref_grads)
    assert rel < {torch.bfloat16: 0.1, torch.float16: 0.02}.get(policy.compute_dtype, 1e-4), rel


def _relative_error(a: Any, b: Any) -> float:
    la = torch.cat([x.detach().double().flatten() for x in _tree.tree_leaves(a)])
    lb = torch.cat([x.detach().double().flatten() for x in _tree.tree_leaves(b)])
    return float((la - lb).norm() / lb.norm())


def test_policy_spec_strings_and_output_dtype(block: Block) -> None:
    x, _ = block_batch()
    out = pp.apply_with_policy(block, dict(block.named_parameters()), x, policy="c=bf16")
    assert out.dtype == torch.bfloat16  # jmp grammar: output follows compute


def test_inputs_and_params_are_not_mutated(block: Block) -> None:
    x, y = block_batch()
    params = dict(block.named_parameters())
    tensors = [*params.values(), x, y]
    versions = [t._version for t in tensors]
    snapshot = [t.detach().clone() for t in tensors]
    for spec in ("bf16-mixed", "16-true", "64-true"):
        pp.value_and_grad(mse_loss_fn(block, spec))(
            pp.cast_params(params, spec), x, y, loss_scale=pp.DynamicLossScale()
        )
        vmap(grad(mse_loss_fn(block, spec)), in_dims=(None, 0, 0))(params, x[:, None], y[:, None])
    assert [t._version for t in tensors] == versions
    assert all(torch.equal(t, s) for t, s in zip(tensors, snapshot, strict=True))
    assert list(params) == [n for n, _ in block.named_parameters()]


def test_per_sample_gradients_under_vmap_grad(block: Block) -> None:
    x, y = block_batch()
    params = dict(block.named_parameters())

    def per_sample(spec: str) -> Any:
        fn = mse_loss_fn(block, spec)
        return vmap(grad(lambda p, xi, yi: fn(p, xi[None], yi[None])), in_dims=(None, 0, 0))(
            params, x, y
        )

    block.seen.clear()
    low = per_sample("bf16-mixed")
    assert block.seen == [torch.bfloat16]  # autocast alone would run float32 here
    ref = per_sample("32-true")
    assert_trees_all_equal_dtypes(low, torch.float32)
    for name in params:
        assert low[name].shape == (len(x), *params[name].shape)
    assert _relative_error(low, ref) < 0.05


def test_autocast_alone_loses_the_dtype_under_vmap(block: Block) -> None:
    # The pytorch bugs polprec works around (192617, 184890); if torch fixes them this
    # test fails and the explicit casts under transforms can be revisited.
    x, y = block_batch()
    params = dict(block.named_parameters())
    lin = nn.Linear(8, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = vmap(lambda xi: functional_call(lin, dict(lin.named_parameters()), (xi,)))(x)
    assert out.dtype == torch.float32

    def plain(p: Any, xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return ((functional_call(block, p, (xi[None],)).float() - yi) ** 2).mean()

    with pytest.raises(RuntimeError, match="expected scalar type"):
        vmap(grad(plain), in_dims=(None, 0, 0))(params, x, y)


def test_ensemble_members_keep_their_own_loss_scale() -> None:
    torch.manual_seed(0)
    members = [nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 1)) for _ in range(3)]
    params, _buffers = stack_module_state(members)
    base = members[0].to("meta")
    policy = pp.get_policy("16-mixed")

    def loss_fn(p: Any, x: torch.Tensor) -> torch.Tensor:
        return pp.apply_with_policy(base, p, x, policy=policy).float().pow(2).mean()

    step = pp.value_and_grad(loss_fn)
    scales = _tree.tree_map(lambda *s: torch.stack(s), *[pp.DynamicLossScale(2.0**10)] * 3)
    x = torch.randn(3, 5, 4)
    x[1, 0, 0] = 1e30  # member 1's batch overflows float16

    def member(p: Any, xb: torch.Tensor, ls: pp.DynamicLossScale) -> Any:
        return step(p, xb, loss_scale=ls)

    _loss, grads, finite, new_scales = vmap(member)(params, x, scales)
    assert finite.tolist() == [True, False, True]
    assert new_scales.loss_scale.tolist() == [2.0**10, 2.0**9, 2.0**10]
    assert new_scales.counter.tolist() == [1, 0, 1]
    assert_trees_all_equal_dtypes(grads, torch.float32)
    assert bool(torch.isfinite(grads["0.weight"][0]).all())


@pytest.mark.slow
def test_compiled_full_step_matches_eager_and_skips_nan() -> None:
    # No attention here: torch 2.13 cannot compile torch.func.grad through CPU SDPA
    # ("derivative for aten::_scaled_dot_product_flash_attention_for_cpu_backward").
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 1))
    policy = pp.get_policy("16-mixed")
    # Plain tensors, as in a functional loop (dynamo warns about .grad of non-leaf inputs).
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_fn(p: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = pp.apply_with_policy(model, p, (x,), policy=policy).squeeze(-1).mean(-1)
        return ((out - y) ** 2).mean()

    step_grad = pp.value_and_grad(loss_fn)

    def train_step(p: Any, x: torch.Tensor, y: torch.Tensor, ls: pp.DynamicLossScale) -> Any:
        loss, grads, finite, ls = step_grad(p, x, y, loss_scale=ls)
        new = _tree.tree_map(lambda w, g: w - 0.05 * g, p, grads)
        return loss, pp.select_tree(finite, new, p), ls

    compiled = torch.compile(train_step, fullgraph=True)
    x, y = block_batch()
    state = pp.DynamicLossScale(2.0**12)
    loss_c, params_c, state_c = compiled(params, x, y, state)
    loss_e, params_e, state_e = train_step(params, x, y, state)
    assert_trees_all_close(loss_c, loss_e, dtype=torch.float16)
    assert_trees_all_close(params_c, params_e, rtol=1e-3, atol=1e-4)
    assert float(state_c.loss_scale) == float(state_e.loss_scale) == 2.0**12
    bad = x.clone()
    bad[0, 0, 0] = float("nan")
    _, params_n, state_n = compiled(params_c, bad, y, state_c)
    assert_trees_all_close(params_n, params_c, rtol=0, atol=0)
    assert float(state_n.loss_scale) == 2.0**11


def test_full_precision_region_runs_float32() -> None:
    class Scatter(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.seen: list[torch.dtype] = []

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.lin(x)
            return self.pool(h, torch.tensor([0, 1, 0]))

        @pp.full_precision()
        def pool(self, h: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
            self.seen.append(h.dtype)
            out = torch.zeros(2, h.shape[-1], dtype=h.dtype).index_add(0, index, h)
            self.seen.append((out @ out.T).dtype)  # autocast is off inside
            return out

    model = Scatter()
    params = dict(model.named_parameters())
    out = pp.apply_with_policy(model, params, torch.randn(3, 4), policy="bf16-mixed")
    assert model.seen == [torch.float32, torch.float32]
    assert out.dtype == torch.float32
    model.seen.clear()
    vmap(lambda x: pp.apply_with_policy(model, params, x, policy="bf16-true"))(torch.randn(2, 3, 4))
    assert model.seen == [torch.float32, torch.float32]


def test_full_precision_as_context_manager() -> None:
    a = torch.randn(4, 4)
    with pp.autocast("bf16-mixed", "cpu"):
        assert (a @ a).dtype == torch.bfloat16
        with pp.full_precision():
            assert (a @ a).dtype == torch.float32
        assert (a @ a).dtype == torch.bfloat16


def test_autocast_is_a_noop_for_full_precision_policies() -> None:
    a = torch.randn(2, 2)
    for spec in ("32-true", "64-true", "bf16-true"):
        with pp.autocast(spec, "cpu"):
            out = a @ a
        assert out.dtype == (torch.bfloat16 if spec == "bf16-true" else torch.float32)


def test_value_and_grad_has_aux_and_non_float_leaves() -> None:
    def loss_fn(p: Any, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        pred = p["w"] * x
        return pred.sum(), {"pred": pred, "steps": p["steps"] + 1}

    params = {"w": torch.ones(3), "steps": torch.tensor(4)}
    (loss, aux), grads, finite, state = pp.value_and_grad(loss_fn, has_aux=True)(
        params, torch.arange(3.0), loss_scale=pp.StaticLossScale(8.0)
    )
    assert float(loss) == 3.0
    assert aux["pred"].tolist() == [0.0, 1.0, 2.0]
    assert int(aux["steps"]) == 5
    assert grads["w"].tolist() == [0.0, 1.0, 2.0]
    assert grads["steps"] is None
    assert not loss.requires_grad
    assert bool(finite)
    assert isinstance(state, pp.StaticLossScale)


@pytest.mark.parametrize("shape", ["nested", "list", "tuple", "namedtuple", "registered", "mixed"])
def test_value_and_grad_keeps_the_structure_of_any_params_tree(shape: str) -> None:
    params = make_tree(shape)
    floats = [x for x in _tree.tree_leaves(params) if _tree.is_float_tensor(x)]

    def loss_fn(p: Any) -> torch.Tensor:
        leaves = [x for x in _tree.tree_leaves(p) if _tree.is_float_tensor(x)]
        return sum((x**2).sum() for x in leaves)  # type: ignore[return-value]

    _, grads, finite, _ = pp.value_and_grad(loss_fn)(params, loss_scale=pp.StaticLossScale(4.0))
    assert _tree.tree_structure(grads) == _tree.tree_structure(
        _tree.tree_map(lambda x: x if _tree.is_float_tensor(x) else None, params)
    )
    got = [g for g in _tree.tree_leaves(grads) if g is not None]
    assert len(got) == len(floats) and bool(finite)
    for g, x in zip(got, floats, strict=True):
        assert torch.equal(g, 2 * x)


def test_value_and_grad_unused_parameter_gets_zero_grad() -> None:
    step = pp.value_and_grad(lambda p: (p["a"] ** 2).sum())
    _, grads, _, _ = step(
        {"a": torch.ones(2), "unused": torch.ones(3)}, loss_scale=pp.NoOpLossScale()
    )
    assert grads["unused"].tolist() == [0.0, 0.0, 0.0]


def test_value_and_grad_shared_gradient_buffers_are_not_unscaled_twice() -> None:
    # (a + b).sum() hands the same gradient tensor to a and b: the in-place fast path must
    # not unscale it twice.
    step = pp.value_and_grad(lambda p: (p["a"] + p["b"]).sum())
    _, grads, _, _ = step(
        {"a": torch.ones(1), "b": torch.ones(1)}, loss_scale=pp.StaticLossScale(4.0)
    )
    assert grads["a"].tolist() == [1.0]
    assert grads["b"].tolist() == [1.0]


def test_value_and_grad_eager_and_transform_paths_agree(block: Block) -> None:
    x, y = block_batch()
    params = dict(block.named_parameters())
    step = pp.value_and_grad(mse_loss_fn(block, "32-true"))
    loss_e, grads_e, _, _ = step(params, x, y, loss_scale=pp.StaticLossScale(2.0**8))
    # Inside vmap (batch of one) the torch.func path runs.
    loss_v, grads_v, _, _ = vmap(
        lambda xb, yb: step(params, xb, yb, loss_scale=pp.StaticLossScale(2.0**8))
    )(x[None], y[None])
    assert_trees_all_close(loss_v[0], loss_e, dtype=torch.float32)
    assert_trees_all_close(_tree.tree_map(lambda g: g[0], grads_v), grads_e, rtol=1e-4, atol=1e-6)


def test_bfloat16_params_halve_parameter_and_gradient_bytes(block: Block) -> None:
    def nbytes(tree: Any) -> int:
        return sum(x.numel() * x.element_size() for x in _tree.tree_leaves(tree))

    x, y = block_batch()
    full = {k: v.detach() for k, v in block.named_parameters()}
    half = pp.cast_params(full, "bf16-true")
    _, g_full, _, _ = pp.value_and_grad(mse_loss_fn(block, "32-true"))(
        full, x, y, loss_scale=pp.NoOpLossScale()
    )
    _, g_half, _, _ = pp.value_and_grad(mse_loss_fn(block, "bf16-true"))(
        half, x, y, loss_scale=pp.NoOpLossScale()
    )
    assert nbytes(half) * 2 == nbytes(full)
    assert nbytes(g_half) * 2 == nbytes(g_full)


@pytest.mark.slow
def test_a_full_precision_step_compiles_in_one_graph() -> None:
    # No autocast, no transforms: the do-nothing context managers must be traceable too.
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 3))
    policy = pp.get_policy("32-true")
    params = {k: v.detach() for k, v in model.named_parameters()}
    opt = pp.optim.sgd(0.1, momentum=0.9)

    def loss_fn(p: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with pp.autocast(policy, "cpu"):  # a no-op for float32 compute
            return nn.functional.cross_entropy(pp.apply_with_policy(model, p, x, policy=policy), y)

    step_grad = pp.value_and_grad(loss_fn)

    def step(p: Any, s: Any, x: torch.Tensor, y: torch.Tensor) -> Any:
        loss, grads, finite, _ = step_grad(p, x, y, loss_scale=pp.NoOpLossScale())
        return (*opt.step(p, grads, s, grads_finite=finite), loss)

    x, y = torch.randn(4, 8), torch.randint(0, 3, (4,))
    got = torch.compile(step, fullgraph=True)(params, opt.init(params), x, y)
    want = step(params, opt.init(params), x, y)
    assert_trees_all_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("policy", ["32-true", "bf16-true", "64-true"])
def test_a_policy_without_autocast_switches_off_an_enclosing_one(policy: str) -> None:
    # Inside a user's torch.autocast region the policy's dtypes still decide: autocast is
    # switched off for the call (and entered not at all when it is off already).
    torch.manual_seed(0)
    lin = nn.Linear(8, 4)
    params = pp.cast_params(dict(lin.named_parameters()), policy)
    x = torch.randn(3, 8)
    plain = pp.apply_with_policy(lin, params, x, policy=policy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = pp.apply_with_policy(lin, params, x, policy=policy)
        assert torch.is_autocast_enabled("cpu")  # restored after the call
    assert inside.dtype == plain.dtype == pp.get_policy(policy).output_dtype
    assert torch.equal(inside, plain)


@pytest.mark.slow
def test_a_compiled_step_does_not_recompile_once_the_wrapper_classes_are_known(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The eager refusal of DDP/FSDP modules learns FSDP's classes on first use; while tracing
    # it must not, or the learned classes become a guard that recompiles the whole step.
    import torch.distributed.fsdp

    from polprec import _wrapped

    monkeypatch.setattr(_wrapped, "_FSDP", [])
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_fn(p: Any, x: torch.Tensor) -> torch.Tensor:
        return pp.apply_with_policy(model, p, x, policy="bf16-mixed").float().pow(2).mean()

    step = torch.compile(pp.value_and_grad(loss_fn), fullgraph=True, backend="aot_eager")
    x = torch.randn(5, 4)
    step(params, x, loss_scale=pp.NoOpLossScale())
    pp.apply_with_policy(model, params, x, policy="bf16-mixed")  # an eager call learns them
    with torch._dynamo.config.patch(error_on_recompile=True):
        loss, _, finite, _ = step(params, x, loss_scale=pp.NoOpLossScale())
    assert bool(finite) and loss.dim() == 0


def test_autocast_defaults_to_the_default_device_and_works_under_vmap() -> None:
    a = torch.randn(3, 4, 4)
    with pp.autocast("bf16-mixed"):  # torch's default device: the CPU here
        assert (a[0] @ a[0]).dtype == torch.bfloat16
    for spec, dtype in (("bf16-mixed", torch.bfloat16), ("16-mixed", torch.float16)):

        def square(x: torch.Tensor, spec: str = spec) -> torch.Tensor:
            with pp.autocast(spec, "cpu"):
                return x @ x

        assert vmap(square)(a).dtype == dtype  # the policy's dtype, not autocast's default


def test_the_required_policy_shows_in_the_signature() -> None:
    import inspect

    policy = inspect.signature(pp.apply_with_policy).parameters["policy"]
    assert repr(policy.default) == "<required>" and "policy: " in str(policy)


@pytest.mark.parametrize("rules", [False, True], ids=["policy", "rules"])
def test_strict_calls_need_every_parameter_and_buffer(rules: bool) -> None:
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    policy: Any = pp.PolicyRules("32-true") if rules else "32-true"
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())
    x = torch.randn(4, 3)
    with pytest.raises(RuntimeError, match="Missing key"):
        pp.apply_with_policy(model, params, x, policy=policy, strict=True)
    out = pp.apply_with_policy(model, (params, buffers), x, policy=policy, strict=True)
    assert out.shape == (4, 2)


def test_a_module_without_parameters_runs_on_its_inputs_device() -> None:
    out = pp.apply_with_policy(nn.Softmax(-1), {}, torch.randn(2, 3), policy="bf16-mixed")
    assert out.dtype == torch.float32 and torch.allclose(out.sum(-1), torch.ones(2))


def test_the_first_positional_input_can_be_kept() -> None:
    seen: list[torch.dtype] = []

    class Two(nn.Module):
        def forward(self, a: torch.Tensor, b: torch.Tensor, *, c: torch.Tensor) -> torch.Tensor:
            seen.extend([a.dtype, b.dtype, c.dtype])
            return a.float() + b.float() + c.float()

    x = torch.ones(2)
    pp.apply_with_policy(Two(), {}, (x, x), {"c": x}, policy="bf16-true", keep_dtype=(0,))
    assert seen == [torch.float32, torch.bfloat16, torch.bfloat16]
    seen.clear()
    pp.apply_with_policy(Two(), {}, (x, x), {"c": x}, policy="bf16-true", keep_dtype=("c",))
    assert seen == [torch.bfloat16, torch.bfloat16, torch.float32]


def test_a_tensor_under_two_buffer_names_may_be_given_under_both() -> None:
    model = nn.BatchNorm1d(3)
    model.register_buffer("alias", model.running_mean)  # one buffer, two names
    buffers = dict(model.named_buffers(remove_duplicate=False))
    assert {"alias", "running_mean"} <= set(buffers)
    out = pp.apply_with_policy(
        model.eval(), (dict(model.named_parameters()), buffers), torch.randn(4, 3), policy=32
    )
    assert out.shape == (4, 3)


def test_islands_leave_no_call_of_their_own_on_the_modules() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    rules = pp.PolicyRules("bf16-true", {nn.LayerNorm: "32-true"})
    params = rules.cast_params(dict(model.named_parameters()), module=model)
    pp.apply_with_policy(model, params, torch.randn(2, 3), policy=rules)
    assert all("_call_impl" not in m.__dict__ for m in model.modules())


def test_an_island_called_with_keyword_arguments_gets_them() -> None:
    class Gate(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x: torch.Tensor, *, scale: torch.Tensor) -> torch.Tensor:
            return self.lin(x) * scale

    class Outer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gate = Gate()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.gate(x, scale=torch.tensor(2.0))

    model = Outer()
    rules = pp.PolicyRules("bf16-true", {Gate: "32-true"})
    params = rules.cast_params(dict(model.named_parameters()), module=model)
    x = torch.randn(2, 3)
    out = pp.apply_with_policy(model, params, x, policy=rules)
    assert torch.allclose(out.float(), model(x), atol=2e-2)


def test_a_modules_names_are_read_once_while_it_keeps_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from polprec import _context

    reads: list[int] = []
    names = _context._names
    monkeypatch.setattr(_context, "_names", lambda m: (reads.append(1), names(m))[1])
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    params = {k: v.detach() for k, v in model.named_parameters()}
    x = torch.randn(4, 3)
    for _ in range(3):
        pp.apply_with_policy(model, params, x, policy="32-true")
    assert len(reads) == 1
    model.register_parameter("extra", nn.Parameter(torch.zeros(1)))
    pp.apply_with_policy(model, params | {"extra": torch.ones(1)}, x, policy="32-true")
    assert len(reads) == 2  # a name it did not know: read again, and known since
    pp.apply_with_policy(model, params | {"extra": torch.ones(1)}, x, policy="32-true")
    assert len(reads) == 2


def test_a_second_positional_input_is_told_to_join_the_first_in_a_tuple() -> None:
    model = nn.Linear(3, 2)
    params = {k: v.detach() for k, v in model.named_parameters()}
    x = torch.ones(1, 3)
    with pytest.raises(TypeError) as err:
        pp.apply_with_policy(model, params, x, x, policy=32)  # type: ignore[arg-type]
    assert str(err.value) == (
        "apply_with_policy got a tensor where kwargs goes: a module with several positional "
        "inputs takes them as one tuple, as functional_call does: "
        "apply_with_policy(module, params, (x, y), policy=...)"
    )


def test_removing_a_call_that_was_never_set_changes_nothing() -> None:
    from polprec import _context

    model = nn.Linear(2, 2)
    _context.set_call(model, None)
    assert "_call_impl" not in model.__dict__
    _context.set_call(model, model.forward)
    assert model.__dict__["_call_impl"] == model.forward
    _context.set_call(model, None)
    assert "_call_impl" not in model.__dict__
