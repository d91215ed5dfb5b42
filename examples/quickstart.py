"""The README's quickstart as a script: a few steps of a bf16-mixed MLP on random data."""

from __future__ import annotations

import torch

import polprec as pp


def main() -> None:
    torch.manual_seed(0)
    policy = pp.get_policy("bf16-mixed")
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 10))
    params = pp.cast_params({k: p.detach() for k, p in model.named_parameters()}, policy)
    loss_scale = pp.default_loss_scale(policy)
    opt = pp.optim.adamw(1e-2)
    opt_state = opt.init(params)

    def loss_fn(params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = pp.apply_with_policy(model, params, x, policy=policy)
        return torch.nn.functional.cross_entropy(logits, y)

    step_grad = pp.value_and_grad(loss_fn)
    x, y = torch.randn(256, 64), torch.randint(0, 10, (256,))
    for step in range(20):
        loss, grads, finite, loss_scale = step_grad(params, x, y, loss_scale=loss_scale)
        params, opt_state = opt.step(params, grads, opt_state, grads_finite=finite)
        if step % 5 == 0 or step == 19:
            print(f"step {step:2d}  loss {float(loss):.4f}  finite {bool(finite)}")
    print(f"policy: {policy}")


if __name__ == "__main__":
    main()
