"""FSDP2 policies per layer and for the root, on real gloo processes (``helpers.spawn``).

``to_fsdp_mixed_precision(root=False)`` on a transformer's layers and the default one on its
root: activations in the compute dtype between the layers, the output dtype out of the root,
gradients reduced in float32 unless asked otherwise.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from helpers import spawn
from torch import nn

import polprec as pp
from polprec.testing import assert_trees_all_close

# --- models --------------------------------------------------------------------------------


class _TinyGPT(nn.Module):
    """Embedding -> two TransformerEncoderLayers -> LayerNorm -> Linear: a small transformer."""

    def __init__(self, vocab: int = 32, d: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(d, 2, 2 * d, dropout=0.0, batch_first=True) for _ in range(2)
        )
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        for layer in self.layers:
            h = layer(h)
        return self.head(self.norm(h))


def _tiny_gpt(dtype: torch.dtype) -> _TinyGPT:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return _TinyGPT().to(dtype)


# --- to_fsdp_mixed_precision on a transformer's layers and root ----------------------------


def _recording_reduce_scatter(reduced: list[torch.dtype]) -> None:
    """Record the dtype of every gradient FSDP2 reduce-scatters (in this process)."""
    name = "reduce_scatter_single" if hasattr(dist, "reduce_scatter_single") else None
    name = name or "reduce_scatter_tensor"
    original = getattr(dist, name)

    def recording(*args: Any, **kwargs: Any) -> Any:
        reduced.append((kwargs["input"] if "input" in kwargs else args[1]).dtype)
        return original(*args, **kwargs)

    setattr(dist, name, recording)


def _record(seen: dict[str, str], name: str, pick: Callable[..., torch.Tensor]) -> Any:
    """A forward (pre-)hook that records the dtype of what ``pick`` takes from its arguments."""

    def hook(module: nn.Module, *args: Any) -> None:
        seen.setdefault(name, str(pick(*args).dtype))

    return hook


def _fsdp_layers_worker(rank: int, _: Any) -> dict[str, Any]:
    from torch.distributed.fsdp import fully_shard

    reduced: list[torch.dtype] = []
    _recording_reduce_scatter(reduced)
    tokens = torch.randint(0, 32, (2, 6), generator=torch.Generator().manual_seed(0))
    out: dict[str, Any] = {}
    for spec, reduce_dtype in [("bf16-mixed", None), ("bf16-true", None), ("bf16-true", "bf16")]:
        policy = pp.get_policy(spec)
        model = _tiny_gpt(policy.param_dtype)
        reference = _tiny_gpt(policy.compute_dtype)  # unsharded, all in the compute dtype
        seen: dict[str, str] = {}
        model.layers[1].register_forward_hook(_record(seen, "layer output", lambda i, o: o))
        model.norm.register_forward_pre_hook(_record(seen, "norm input", lambda i: i[0]))
        for layer in model.layers:
            fully_shard(
                layer,
                mp_policy=pp.to_fsdp_mixed_precision(policy, reduce_dtype=reduce_dtype, root=False),
            )
        fully_shard(model, mp_policy=pp.to_fsdp_mixed_precision(policy, reduce_dtype=reduce_dtype))
        reduced.clear()
        logits = model(tokens)
        nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten()).backward()
        ref_logits = reference(tokens)
        nn.functional.cross_entropy(ref_logits.float().flatten(0, 1), tokens.flatten()).backward()
        out[f"{spec} {reduce_dtype}"] = {
            "seen": seen,
            "output_dtype": str(logits.dtype),
            "reduced": sorted({str(d) for d in reduced}),
            "grad_dtypes": sorted({str(p.grad.dtype) for p in model.parameters()}),
            "grads": {n: p.grad.full_tensor().float() for n, p in model.named_parameters()},
            "reference_grads": {n: p.grad.float() for n, p in reference.named_parameters()},
        }
    return out


@pytest.mark.slow
def test_fsdp2_policy_per_layer_and_root_trains_a_transformer(tmp_path: Path) -> None:
    for r in spawn(_fsdp_layers_worker, tmp_path, None):
        for case, got in r.items():
            spec, reduce_dtype = case.split()
            param = str(pp.get_policy(spec).param_dtype)
            # Between the layers and into the root's LayerNorm: the compute dtype; out of the
            # root: the output dtype.
            assert got["seen"] == {"layer output": "torch.bfloat16", "norm input": "torch.bfloat16"}
            assert got["output_dtype"] == "torch.float32"
            assert got["grad_dtypes"] == [param]
            # float32 reduction by default, also for bfloat16 parameters; or as asked.
            assert got["reduced"] == (
                ["torch.float32"] if reduce_dtype == "None" else ["torch.bfloat16"]
            )
            scale = max(float(g.abs().max()) for g in got["reference_grads"].values())
            assert_trees_all_close(
                got["grads"], got["reference_grads"], rtol=0.05, atol=0.05 * scale
            )
