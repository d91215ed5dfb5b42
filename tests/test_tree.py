"""cast_tree / cast_params / Policy.cast_*, all_finite, select_tree and stack_trees over every
tree shape, and the private tree walk under them (polprec/_tree.py).

Bad input to them: test_audit.py.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import FLOAT_DTYPES, Pair, Registered, make_tree
from helpers import float_leaves
from hypothesis import given
from hypothesis import strategies as st

import polprec as pp
from polprec import _tree
from polprec.testing import assert_trees_all_close, assert_trees_all_equal_dtypes
from polprec.testing import strategies as pst


def test_cast_tree_over_shapes_and_dtypes(tree_shape: str, float_dtype: torch.dtype) -> None:
    tree = make_tree(tree_shape)
    out = pp.cast_tree(tree, float_dtype)
    assert _tree.tree_structure(out) == _tree.tree_structure(tree)
    assert_trees_all_equal_dtypes(out, float_dtype)
    for before, after in zip(_tree.tree_leaves(tree), _tree.tree_leaves(out), strict=True):
        if _tree.is_float_tensor(before):
            assert after.dtype == float_dtype
            if before.dtype == float_dtype:
                assert after is before  # no copy
            torch.testing.assert_close(after.double(), before.to(float_dtype).double())
        else:
            assert after is before  # ints, bools, complex, scalars, strings, None-free leaves


def test_cast_keeps_dict_order_none_and_types() -> None:
    tree = {
        "z": torch.ones(1),
        "a": None,
        "m": Pair(torch.ones(1), None),
        "r": Registered(torch.ones(1), 3),
    }
    out = pp.cast_tree(tree, "bf16")
    assert list(out) == ["z", "a", "m", "r"]
    assert out["a"] is None and out["m"].second is None
    assert isinstance(out["m"], Pair) and isinstance(out["r"], Registered)
    assert out["r"].extra == 3 and out["r"].weight.dtype == torch.bfloat16


def test_policy_cast_methods(tree_shape: str) -> None:
    tree = make_tree(tree_shape)
    policy = pp.Policy("f16", "bf16", "f64")
    assert_trees_all_equal_dtypes(policy.cast_to_param(tree), torch.float16)
    assert_trees_all_equal_dtypes(policy.cast_to_compute(tree), torch.bfloat16)
    assert_trees_all_equal_dtypes(policy.cast_to_output(tree), torch.float64)
    assert_trees_all_equal_dtypes(pp.cast_params(tree, "bf16-true"), torch.bfloat16)
    assert_trees_all_equal_dtypes(pp.cast_params(tree, policy), torch.float16)


def test_single_tensor_and_non_float_single_leaves() -> None:
    x = torch.ones(2)
    assert pp.cast_tree(x, torch.float16).dtype == torch.float16
    i = torch.ones(2, dtype=torch.int64)
    assert pp.cast_tree(i, torch.float16) is i
    assert pp.cast_tree(3.0, torch.float16) == 3.0


def test_cast_is_differentiable_back_to_the_leaf_dtype() -> None:
    w = torch.ones(3, requires_grad=True)
    out = pp.cast_tree({"w": w}, torch.bfloat16)["w"]
    (out * torch.arange(3, dtype=torch.bfloat16)).sum().backward()
    assert w.grad is not None and w.grad.dtype == torch.float32
    assert w.grad.tolist() == [0.0, 1.0, 2.0]


def test_cast_does_not_mutate(tree_shape: str) -> None:
    tree = make_tree(tree_shape)
    versions = [x._version for x in _tree.tree_leaves(tree) if isinstance(x, torch.Tensor)]
    pp.cast_tree(tree, torch.float16)
    assert versions == [x._version for x in _tree.tree_leaves(tree) if isinstance(x, torch.Tensor)]


@given(pst.tensor_trees(), pst.floating_dtypes())
def test_cast_is_idempotent(tree: Any, dtype: torch.dtype) -> None:
    once = pp.cast_tree(tree, dtype)
    twice = pp.cast_tree(once, dtype)
    for a, b in zip(_tree.tree_leaves(once), _tree.tree_leaves(twice), strict=True):
        assert a is b


_WIDER = {
    torch.float16: [torch.float32, torch.float64],
    torch.bfloat16: [torch.float32, torch.float64],
    torch.float32: [torch.float64],
    torch.float64: [],
}


@given(pst.tensor_trees(), st.data())
def test_widening_and_back_is_exact(tree: Any, data: st.DataObject) -> None:
    for narrow, wider in _WIDER.items():
        if not wider:
            continue
        start = pp.cast_tree(tree, narrow)
        wide = data.draw(st.sampled_from(wider))
        back = pp.cast_tree(pp.cast_tree(start, wide), narrow)
        for a, b in zip(float_leaves(start), float_leaves(back), strict=True):
            assert torch.equal(a, b) or (a.isnan().any() and torch.equal(a.isnan(), b.isnan()))


@given(pst.tensor_trees(), pst.floating_dtypes())
def test_non_floating_leaves_are_the_same_objects(tree: Any, dtype: torch.dtype) -> None:
    out = pp.cast_tree(tree, dtype)
    assert _tree.tree_structure(out) == _tree.tree_structure(tree)
    for a, b in zip(_tree.tree_leaves(tree), _tree.tree_leaves(out), strict=True):
        if not _tree.is_float_tensor(a):
            assert a is b


# --- all_finite -------------------------------------------------------------------------


def test_all_finite_shapes(tree_shape: str, float_dtype: torch.dtype) -> None:
    tree = pp.cast_tree(make_tree(tree_shape), float_dtype)
    flag = pp.all_finite(tree)
    assert flag.dtype == torch.bool and flag.dim() == 0 and bool(flag)
    floats = float_leaves(tree)
    if floats:
        poisoned = _tree.tree_map(
            lambda x: x.clone().fill_(float("nan")) if x is floats[-1] else x, tree
        )
        assert not bool(pp.all_finite(poisoned))


@pytest.mark.parametrize("empty", [{}, [], (), None, {"a": None}, [1, "x"]])
def test_all_finite_empty_is_true(empty: Any) -> None:
    flag = pp.all_finite(empty)
    assert flag.dtype == torch.bool and flag.dim() == 0 and bool(flag)


def test_all_finite_complex_and_ints() -> None:
    assert not bool(pp.all_finite([torch.tensor([1 + 1j, complex("inf")])]))
    assert bool(pp.all_finite([torch.tensor([2**62])]))


@given(pst.tensor_trees(pst.tensors(allow_nonfinite=True)))
def test_all_finite_matches_elementwise_definition(tree: Any) -> None:
    expected = all(
        bool(torch.isfinite(x).all())
        for x in _tree.tree_leaves(tree)
        if isinstance(x, torch.Tensor) and (x.is_floating_point() or x.is_complex())
    )
    assert bool(pp.all_finite(tree)) == expected


def test_all_finite_under_vmap() -> None:
    x = torch.ones(3, 4)
    x[1, 2] = float("inf")
    flags = torch.func.vmap(lambda row: pp.all_finite({"x": row}))(x)
    assert flags.tolist() == [True, False, True]


# --- select_tree ------------------------------------------------------------------------


def test_select_tree_shapes(tree_shape: str, float_dtype: torch.dtype) -> None:
    a = pp.cast_tree(make_tree(tree_shape), float_dtype)
    b = _tree.tree_map(lambda x: x + 1 if _tree.is_float_tensor(x) else x, a)
    assert_trees_all_close(pp.select_tree(torch.tensor(True), a, b), a, rtol=0, atol=0)
    assert_trees_all_close(pp.select_tree(torch.tensor(False), a, b), b, rtol=0, atol=0)


@given(pst.tensor_trees(pst.tensors(allow_nonfinite=True), mixed=False), st.booleans())
def test_select_tree_returns_exactly_one_side(tree: Any, pick: bool) -> None:
    other = _tree.tree_map(lambda x: torch.rand_like(x.float()).to(x.dtype), tree)
    out = pp.select_tree(torch.tensor(pick), tree, other)
    expected = tree if pick else other
    for got, want in zip(_tree.tree_leaves(out), _tree.tree_leaves(expected), strict=True):
        assert got.dtype == want.dtype
        assert torch.equal(got.isnan(), want.isnan())
        assert torch.equal(got.nan_to_num(0.0), want.nan_to_num(0.0))


def test_select_tree_under_vmap_and_compile() -> None:
    a = {"w": torch.zeros(3, 2)}
    b = {"w": torch.ones(3, 2)}
    pred = torch.tensor([True, False, True])
    out = torch.func.vmap(pp.select_tree)(pred, a, b)
    assert out["w"][:, 0].tolist() == [0.0, 1.0, 0.0]
    compiled = torch.compile(pp.select_tree, fullgraph=True)
    assert torch.equal(compiled(torch.tensor(False), a, b)["w"], b["w"])


def test_select_tree_keeps_equal_non_tensor_leaves() -> None:
    out = pp.select_tree(
        torch.tensor(False), {"lr": 0.1, "w": torch.ones(1)}, {"lr": 0.1, "w": torch.zeros(1)}
    )
    assert out["lr"] == 0.1 and out["w"].item() == 0.0


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_select_tree_does_not_mutate(dtype: torch.dtype) -> None:
    a, b = {"w": torch.ones(2, dtype=dtype)}, {"w": torch.zeros(2, dtype=dtype)}
    versions = (a["w"]._version, b["w"]._version)
    pp.select_tree(torch.tensor(True), a, b)
    assert (a["w"]._version, b["w"]._version) == versions


# --- stack_trees -----------------------------------------------------------------------


def test_stack_trees_over_shapes(tree_shape: str, float_dtype: torch.dtype) -> None:
    a = pp.cast_tree(make_tree(tree_shape), float_dtype)
    b = _tree.tree_map(lambda x: x + 1 if _tree.is_float_tensor(x) else x, a)
    stacked = pp.stack_trees([a, b])
    assert _tree.tree_structure(stacked) == _tree.tree_structure(a)
    for x, y, s in zip(
        _tree.tree_leaves(a), _tree.tree_leaves(b), _tree.tree_leaves(stacked), strict=True
    ):
        if isinstance(x, torch.Tensor):
            assert torch.equal(s, torch.stack([x, y]))
        else:
            assert s is x


def test_stack_trees_of_states_vmaps_per_member() -> None:
    states = pp.stack_trees(
        [pp.DynamicLossScale(2.0**k, period=3, min_loss_scale=2.0) for k in (2, 5)]
    )
    assert states.loss_scale.tolist() == [4.0, 32.0]
    assert (states.period, states.min_loss_scale) == (3, 2.0)
    out = torch.func.vmap(lambda s, f: s.adjust(f))(states, torch.tensor([False, False]))
    assert out.loss_scale.tolist() == [2.0, 16.0]


def test_select_tree_with_a_python_bool_returns_that_side_after_the_same_checks() -> None:
    # A verdict known in advance, as DynamicLossScale.adjust(True) accepts one.
    on_true, on_false = {"w": torch.ones(2), "n": 3}, {"w": torch.zeros(2), "n": 3}
    assert pp.select_tree(True, on_true, on_false) is on_true
    assert pp.select_tree(False, on_true, on_false) is on_false
    with pytest.raises(ValueError, match="same structure"):
        pp.select_tree(True, [torch.ones(1)], (torch.ones(1),))
    with pytest.raises(ValueError, match="dtype torch.float32 in on_true but torch.float64"):
        pp.select_tree(False, [torch.ones(1)], [torch.ones(1).double()])


def test_select_tree_keeps_identical_objects_that_compare_unequal() -> None:
    nan = float("nan")  # nan != nan, but it is the same object on both sides
    out = pp.select_tree(
        torch.tensor(True), {"v": nan, "w": torch.ones(1)}, {"v": nan, "w": torch.zeros(1)}
    )
    assert out["v"] is nan


def test_stack_trees_keeps_identical_objects_that_compare_unequal() -> None:
    nan = float("nan")
    assert pp.stack_trees([{"v": nan}, {"v": nan}])["v"] is nan


def test_tree_helpers_keep_none_as_structure_not_leaf() -> None:
    t = torch.ones(2)
    tree = {"a": None, "b": t, "c": [None, t]}
    assert _tree.tree_leaves(tree) == [t, t]
    leaves, spec = _tree.tree_flatten(tree)
    assert len(leaves) == 2 and _tree.tree_unflatten(spec, leaves)["a"] is None
    assert _tree.tree_structure(tree).num_leaves == 2
    paths = [p for p, _ in zip(*_tree.tree_flatten_with_path(tree)[:2], strict=True)]
    assert paths == [("b",), ("c", 1)]
    seen: list[Any] = []
    out = _tree.tree_map(lambda x: seen.append(x) or x, tree)
    assert all(x is t for x in seen) and len(seen) == 2  # fn never sees None
    assert out["a"] is None and out["c"][0] is None


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ((), "<root>"),
        (("layer", 0, "weight"), "layer[0].weight"),
        ((0, "w"), "[0].w"),
        (("a b", 1), "['a b'][1]"),
        (("x", "1st", "y"), "x['1st'].y"),
        (("enc", "blocks", 2, "norm"), "enc.blocks[2].norm"),
    ],
)
def test_path_str(path: tuple[Any, ...], expected: str) -> None:
    assert _tree.path_str(path) == expected


def test_register_node_makes_a_class_a_torch_and_polprec_pytree() -> None:
    import torch.utils._pytree as torch_pytree

    class _Box:  # a fresh class per run: a class can be registered only once
        def __init__(self, value: torch.Tensor, tag: str) -> None:
            self.value, self.tag = value, tag

    _tree.register_node(_Box, lambda b: ([b.value], b.tag), lambda ch, tag: _Box(ch[0], tag))
    box = _Box(torch.ones(3), "w")
    leaves, spec = _tree.tree_flatten({"box": box})
    assert len(leaves) == 1 and leaves[0] is box.value
    back = _tree.tree_unflatten(spec, [torch.zeros(3)])["box"]
    assert isinstance(back, _Box) and back.tag == "w" and back.value.sum() == 0
    t_leaves, t_spec = torch_pytree.tree_flatten(box)  # seen by torch.func / torch.compile
    assert t_leaves == [box.value]
    assert torch_pytree.tree_unflatten([torch.full((3,), 2.0)], t_spec).value[0] == 2
    keyed, _ = torch_pytree.tree_flatten_with_path({"box": box})  # keys for compiled walks
    assert keyed == [((torch_pytree.MappingKey("box"), torch_pytree.SequenceKey(0)), box.value)]
    name = torch_pytree.SUPPORTED_SERIALIZED_TYPES[_Box].serialized_type_name
    assert name == f"{_Box.__module__}.{_Box.__qualname__}"  # a stable name for treespec_dumps
    cast = pp.cast_tree(box, torch.float16)  # polprec's own functions walk it too
    assert isinstance(cast, _Box) and cast.value.dtype == torch.float16 and cast.tag == "w"


def test_tuple_fast_path_keeps_non_floating_tensors() -> None:
    pair = (torch.ones(2), torch.arange(3))
    out = pp.cast_tree(pair, torch.float16)
    assert out[0].dtype == torch.float16 and out[1] is pair[1]
    mapping = {"w": torch.ones(2), "steps": torch.arange(3)}
    cast = pp.cast_tree(mapping, torch.bfloat16)
    assert cast["w"].dtype == torch.bfloat16 and cast["steps"] is mapping["steps"]


def test_tree_walks_while_compiling_match_the_eager_ones(
    tree_shape: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What torch.compile traces: the same helpers on torch's own pytree (no inductor needed).
    # There None is a leaf (never a tensor), so compare the other leaves.
    import torch.utils._pytree as torch_pytree

    tree = make_tree(tree_shape)
    eager_leaves, _ = _tree.tree_flatten(tree)
    eager_paths = _tree.tree_flatten_with_path(tree)[0]
    eager_cast = pp.cast_tree(tree, torch.float16)
    twice = _tree.tree_map(lambda a, b: a, tree, tree)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    leaves, spec = _tree.tree_flatten(tree)
    assert isinstance(spec, torch_pytree.TreeSpec)
    assert [id(x) for x in leaves if x is not None] == [id(x) for x in eager_leaves]
    assert _tree.tree_leaves(tree) == leaves
    assert _tree.tree_structure(tree) == spec
    paths, path_leaves, path_spec = _tree.tree_flatten_with_path(tree)
    assert path_spec == spec and [id(x) for x in path_leaves] == [id(x) for x in leaves]
    if tree_shape in ("dict", "nested", "list", "tuple", "mixed"):  # same keys as eager
        assert [p for p, x in zip(paths, leaves, strict=True) if x is not None] == eager_paths
    rebuilt = _tree.tree_unflatten(spec, leaves)
    assert _tree.tree_structure(rebuilt) == spec
    assert_trees_all_equal_dtypes(pp.cast_tree(tree, torch.float16), eager_cast)
    assert_trees_all_close(_tree.tree_map(lambda a, b: a, tree, tree), twice, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["tensor", "tuple", "dict", "list"])
def test_floating_map_and_cast_touch_only_floating_tensors_and_keep_aliases(kind: str) -> None:
    # The single-tensor, tuple and dict shortcuts and the tree walk behind them agree: integer
    # tensors pass through, floating ones are mapped, and a tensor given twice is cast once.
    f, i = torch.ones(3), torch.arange(3)
    trees = {
        "tensor": [f, i],
        "tuple": [(f, i, f)],
        "dict": [{"a": f, "b": i, "c": f}],
        "list": [[f, i, f]],
    }
    for tree in trees[kind]:
        mapped = _tree.map_floating(tree, lambda x: x * 2)
        cast = _tree.cast_floating(tree, torch.float16)
        for out, floating in ((mapped, 2 * f), (cast, f.half())):
            leaves = _tree.tree_leaves(out) if kind != "tensor" else [out]
            inputs = _tree.tree_leaves(tree) if kind != "tensor" else [tree]
            for x, y in zip(inputs, leaves, strict=True):
                if x.is_floating_point():
                    assert torch.equal(y, floating) and y.dtype == floating.dtype
                else:
                    assert y is x
        if kind in ("tuple", "list"):
            assert cast[0] is cast[2]
        if kind == "dict":
            assert cast["a"] is cast["c"]


def test_the_usual_step_walks_no_tree(monkeypatch: pytest.MonkeyPatch) -> None:
    """Params as a dict of tensors (what ``named_parameters`` gives) are taken apart and
    rebuilt without a tree walk: by value_and_grad, apply_with_policy under every kind of
    policy, cast_params and an optimizer step (a plan kept, a state of the same dict)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    params = {k: v.detach() for k, v in model.named_parameters()}
    x = torch.randn(4, 3)
    opt = pp.optim.adamw(1e-2)
    state = opt.init(params)
    loss_scale = pp.DynamicLossScale()
    walks: list[str] = []
    for name in ("tree_flatten", "tree_leaves", "tree_map", "tree_unflatten", "flatten_up_to"):
        walk = getattr(_tree, name)
        monkeypatch.setattr(
            _tree, name, lambda *a, _w=walk, _n=name, **k: (walks.append(_n), _w(*a, **k))[1]
        )
    for spec in ("bf16-mixed", "bf16-true", "32-true"):

        def loss_fn(p: Any, x: torch.Tensor, spec: str = spec) -> torch.Tensor:
            return pp.apply_with_policy(model, p, x, policy=spec).square().mean()

        for _ in range(2):  # the second time with the plan and the layouts kept
            _, grads, finite, loss_scale = pp.value_and_grad(loss_fn)(
                params, x, loss_scale=loss_scale
            )
            params, state = opt.step(params, grads, state, grads_finite=finite)
            assert pp.cast_params(params, spec).keys() == params.keys()
    assert not walks, walks


def test_all_finite_does_not_overflow_on_large_finite_values() -> None:
    """The eager check sums squares in float64: float32's largest values are finite."""
    big = {"w": torch.full((1000,), 3e38), "h": torch.full((8,), 6e4, dtype=torch.float16)}
    assert bool(pp.all_finite(big))
    big["w"][7] = float("inf")
    assert not bool(pp.all_finite(big))
