"""Per-sample gradients under bf16-mixed: how far from float32, against torch.autocast's loop.

The anchor is what torch.amp gives: an eager loop over the examples, each under
``torch.autocast`` with float32 parameters. Against the float32 per-sample gradients (the same
loop without autocast), the relative error ``||g - g_fp32|| / ||g_fp32||`` over every
parameter and example of

* ``autocast loop``: the anchor;
* ``polprec vmap``: ``vmap(grad(loss))`` with ``pp.apply_with_policy(..., policy="bf16-mixed")``;
* ``explicit casts``: the same ``vmap(grad(loss))`` with the parameters and inputs cast to
  bfloat16 explicitly inside the loss, which is what polprec did under transforms before
  :class:`polprec._autocast_mode.AutocastMode` (LayerNorm, softmax and losses then run in
  bfloat16 where autocast keeps float32 operands);

and the ratio of each to the anchor (1.00: as close to float32 as autocast's loop). The
geometric mean over ``--seeds`` models of each kind is the line that matters; single seeds
vary, because two bfloat16 computations that round differently are each about as far from
float32. Models: a tiny GPT-2 (transformers, when installed; random weights), and torch's
``nn.TransformerEncoderLayer`` with post- and pre-norm. Run:
``python benchmarks/per_sample_error.py [--seeds 10] [--samples 32]``.
"""

from __future__ import annotations

import argparse
import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

import polprec as pp

Batch = tuple[torch.Tensor, torch.Tensor]
Forward = Callable[[Any, torch.Tensor, Any], torch.Tensor]  # (params, x, policy) -> loss


def gpt2(seed: int, n: int) -> tuple[nn.Module, Forward, Batch]:
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    # fmt: off
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=16, bos_token_id=0,
        eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    # fmt: on
    model = transformers.GPT2LMHeadModel(config)
    ids = torch.randint(0, 100, (n, 12))

    def loss(p: Any, x: torch.Tensor, y: torch.Tensor, policy: Any) -> torch.Tensor:
        kwargs = {"input_ids": x, "use_cache": False, "return_dict": False}
        if policy is None:
            logits = functional_call(model, p, (), kwargs)[0]
        else:
            logits = pp.apply_with_policy(model, p, kwargs=kwargs, policy=policy)[0]
        return nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), y[:, 1:].flatten())

    return model, loss, (ids, ids)


def encoder(norm_first: bool) -> Callable[[int, int], tuple[nn.Module, Forward, Batch]]:
    def make(seed: int, n: int) -> tuple[nn.Module, Forward, Batch]:
        torch.manual_seed(seed)
        model = nn.TransformerEncoderLayer(
            32, 2, 64, dropout=0.0, batch_first=True, norm_first=norm_first
        )

        def loss(p: Any, x: torch.Tensor, y: torch.Tensor, policy: Any) -> torch.Tensor:
            if policy is None:
                out = functional_call(model, p, (x,))
            else:
                out = pp.apply_with_policy(model, p, x, policy=policy)
            return ((out.float() - y) ** 2).mean()

        return model, loss, (torch.randn(n, 6, 32), torch.randn(n, 6, 32))

    return make


def per_sample(loss: Forward, params: Any, batch: Batch, how: str) -> list[torch.Tensor]:
    x, y = batch
    if how in ("float32", "autocast loop"):
        out: list[list[torch.Tensor]] = []
        for i in range(len(x)):
            p = {k: v.clone().requires_grad_() for k, v in params.items()}
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=how != "float32"):
                value = loss(p, x[i : i + 1], y[i : i + 1], None)
            out.append(list(torch.autograd.grad(value, list(p.values()), allow_unused=True)))
        return [torch.stack(gs) for gs in zip(*out, strict=True)]

    def one(p: Any, xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        if how == "explicit casts":
            p = pp.get_policy("bf16-true").cast_to_compute(p)
            xi = xi.to(torch.bfloat16) if xi.is_floating_point() else xi
            return loss(p, xi[None], yi[None], "bf16-true")
        return loss(p, xi[None], yi[None], "bf16-mixed")

    grads = vmap(grad(one), in_dims=(None, 0, 0))(params, x, y)
    return list(grads.values())


def relative_error(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    da = torch.cat([t.double().flatten() for t in a])
    db = torch.cat([t.double().flatten() for t in b])
    return float((da - db).norm() / db.norm())


CANDIDATES = ("autocast loop", "polprec vmap", "explicit casts")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--samples", type=int, default=32)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message="There is a performance drop")
    models: dict[str, Callable[[int, int], tuple[nn.Module, Forward, Batch]]] = {
        "encoder post-norm": encoder(False),
        "encoder pre-norm": encoder(True),
    }
    try:
        import transformers  # noqa: F401

        models = {"gpt2 (tiny)": gpt2, **models}
    except ImportError:
        print("transformers is not installed: no GPT-2 row")
    print(f"polprec {pp.__version__}, torch {torch.__version__}; relative error to float32")
    print(f"{'model':20} {'seed':>4} " + " ".join(f"{c:>15}" for c in CANDIDATES) + "  ratios")
    for name, make in models.items():
        logs: dict[str, list[float]] = {c: [] for c in CANDIDATES}
        for seed in range(args.seeds):
            model, loss, batch = make(seed, args.samples)
            params = {k: v.detach() for k, v in model.named_parameters()}
            ref = per_sample(loss, params, batch, "float32")
            errors = {
                c: relative_error(per_sample(loss, params, batch, c), ref) for c in CANDIDATES
            }
            for c, e in errors.items():
                logs[c].append(math.log(e))
            ratios = " ".join(f"{errors[c] / errors['autocast loop']:.2f}" for c in CANDIDATES[1:])
            print(
                f"{name:20} {seed:>4} "
                + " ".join(f"{errors[c]:15.3e}" for c in CANDIDATES)
                + f"  {ratios}"
            )
        mean = {c: math.exp(sum(v) / len(v)) for c, v in logs.items()}
        ratios = " ".join(f"{mean[c] / mean['autocast loop']:.2f}" for c in CANDIDATES[1:])
        print(
            f"{name:20} {'geo':>4} "
            + " ".join(f"{mean[c]:15.3e}" for c in CANDIDATES)
            + f"  {ratios}"
        )


if __name__ == "__main__":
    main()
