"""Hugging Face transformers models under polprec: tiny configs, random weights, no downloads.

GPT-2 and BERT tie their output head to the input embedding, BERT computes regression losses
from float labels, T5 declares float32 modules, eval-mode models return caches, and
``gradient_checkpointing_enable()`` recomputes layers in the backward pass. Skipped where
transformers is not installed (it is in the ``test`` extra).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

import polprec as pp

transformers = pytest.importorskip("transformers")

BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32
NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


@pytest.fixture(autouse=True)
def _quiet() -> Any:
    # transformers logs (not warns) about tiny configs; keep the test output readable.
    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    yield
    transformers.logging.set_verbosity(level)


def gpt2(**overrides: Any) -> Any:
    torch.manual_seed(0)
    # fmt: off
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=16, bos_token_id=0,
        eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **overrides,
    )
    # fmt: on
    return transformers.GPT2LMHeadModel(config)


def bert_config(**overrides: Any) -> Any:
    # fmt: off
    return transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=16, **NO_DROPOUT, **overrides,
    )
    # fmt: on


def detached(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in model.named_parameters()}


def lm_loss(model: nn.Module, policy: Any) -> Any:
    def loss(p: Any, ids: torch.Tensor) -> torch.Tensor:
        kwargs = {"input_ids": ids, "use_cache": False}
        logits = pp.apply_with_policy(model, p, kwargs=kwargs, policy=policy).logits.float()
        return nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())

    return loss


IDS = torch.randint(0, 100, (3, 8), generator=torch.Generator().manual_seed(0))
SHORT = IDS[:, :6].contiguous()  # transformers views labels: they must be contiguous


def checkpointing(model: Any, on: bool) -> None:
    """transformers' gradient checkpointing switch (renamed activation_* in v5)."""
    old = not hasattr(model, "activation_checkpointing_enable")
    name = f"{'gradient' if old else 'activation'}_checkpointing_{'enable' if on else 'disable'}"
    getattr(model, name)()


@pytest.mark.parametrize("island", ["lm_head", "transformer.wte", nn.Embedding], ids=str)
@pytest.mark.parametrize("root", ["bf16-true", "bf16-mixed"])
def test_gpt2_islands_on_either_side_of_the_tied_embedding(root: str, island: Any) -> None:
    model = gpt2()
    rules = pp.PolicyRules(root, {island: "32-true"})
    params = pp.cast_params(detached(model), rules, module=model)
    assert "lm_head.weight" not in params and params["transformer.wte.weight"].dtype == F32
    seen: list[torch.dtype] = []
    hook = model.lm_head.register_forward_pre_hook(lambda m, i: seen.append(m.weight.dtype))
    try:
        _, grads, finite, _ = pp.value_and_grad(lm_loss(model, rules))(
            params, IDS, loss_scale=pp.NoOpLossScale()
        )
        per_sample = vmap(grad(lm_loss(model, rules)), in_dims=(None, 0))(params, IDS[:, None])
    finally:
        hook.remove()
    head_in_island = island == "lm_head"
    assert seen[0] == (F32 if head_in_island or root == "bf16-mixed" else BF16)
    assert bool(finite) and grads["transformer.wte.weight"].dtype == F32
    assert per_sample["transformer.wte.weight"].shape == (3, 100, 32)


@pytest.mark.parametrize("root", ["bf16-true", "bf16-mixed"])
def test_bert_masked_lm_head_island(root: str) -> None:
    torch.manual_seed(0)
    model = transformers.BertForMaskedLM(bert_config())
    rules = pp.PolicyRules(root, {"cls": "32-true"})
    params = pp.cast_params(detached(model), rules, module=model)
    ids = SHORT

    def loss(p: Any, ids: torch.Tensor) -> torch.Tensor:
        batch = {"input_ids": ids, "labels": ids}
        return pp.apply_with_policy(model, p, kwargs=batch, policy=rules).loss

    _, grads, finite, _ = pp.value_and_grad(loss)(params, ids, loss_scale=pp.NoOpLossScale())
    assert bool(finite)
    tied = "bert.embeddings.word_embeddings.weight"
    assert params[tied].dtype == grads[tied].dtype == F32


def test_gpt2_params_named_twice_stay_one_tensor() -> None:
    model = gpt2()
    both = dict(model.named_parameters(remove_duplicate=False))
    assert both["lm_head.weight"] is both["transformer.wte.weight"]
    low = pp.cast_params(both, "bf16-true")
    assert low["lm_head.weight"] is low["transformer.wte.weight"]
    _, grads, finite, _ = pp.value_and_grad(lm_loss(model, "bf16-true"))(
        low, IDS, loss_scale=pp.NoOpLossScale()
    )
    assert bool(finite) and grads["lm_head.weight"] is grads["transformer.wte.weight"]


def test_gradient_checkpointing_is_refused_not_wrong() -> None:
    model = gpt2()
    checkpointing(model, on=True)
    model.train()
    params = {k: v + 0.01 for k, v in detached(model).items()}  # after an update
    step = pp.value_and_grad(lm_loss(model, "bf16-mixed"))
    with pytest.raises(RuntimeError, match="gradient checkpointing"):
        step(params, IDS, loss_scale=pp.NoOpLossScale())
    with pytest.raises(RuntimeError, match="gradient_checkpointing_disable"):
        pp.value_and_grad(lm_loss(model, "bf16-true"))(
            pp.cast_params(params, "bf16-true"), IDS, loss_scale=pp.NoOpLossScale()
        )
    checkpointing(model, on=False)
    _, _, finite, _ = step(params, IDS, loss_scale=pp.NoOpLossScale())
    assert bool(finite)


@pytest.mark.parametrize("spec", ["bf16-mixed", "16-mixed"])
def test_bert_regression_labels_keep_their_precision(spec: str) -> None:
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(bert_config(num_labels=1))
    params = detached(model)
    batch = {"input_ids": SHORT, "labels": torch.tensor([212.3, -150.7, 7e4])}
    ref = pp.apply_with_policy(model, params, kwargs=batch, policy="32-true").loss
    loss = pp.apply_with_policy(model, params, kwargs=batch, policy=spec).loss
    assert bool(torch.isfinite(loss))  # a label of 7e4 is inf in float16
    assert abs(float(loss) - float(ref)) < 1e-3 * float(ref)
    true = spec.replace("mixed", "true")
    kept = pp.apply_with_policy(
        model, pp.cast_params(params, true), kwargs=batch, policy=true, keep_dtype=("labels",)
    ).loss
    assert bool(torch.isfinite(kept))


def test_gpt2_per_sample_gradients_match_the_autocast_loop() -> None:
    model = gpt2()
    params = detached(model)
    per_sample = vmap(grad(lm_loss(model, "bf16-mixed")), in_dims=(None, 0))(params, IDS[:, None])

    def plain_loss(p: Any, ids: torch.Tensor) -> torch.Tensor:
        logits = functional_call(model, p, (), {"input_ids": ids, "use_cache": False}).logits
        return nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten()
        )

    def loop(on: bool) -> dict[str, torch.Tensor]:
        grads = []
        for i in range(len(IDS)):
            p = {k: v.clone().requires_grad_() for k, v in params.items()}
            with torch.autocast("cpu", dtype=BF16, enabled=on):
                value = plain_loss(p, IDS[i : i + 1])
            grads.append(dict(zip(p, torch.autograd.grad(value, list(p.values())), strict=True)))
        return {k: torch.stack([g[k] for g in grads]) for k in params}

    def distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
        flat = [(a[k] - b[k]).flatten() for k in params]
        return float(torch.cat(flat).norm() / torch.cat([b[k].flatten() for k in params]).norm())

    full, autocast = loop(False), loop(True)
    ratio = distance(per_sample, full) / distance(autocast, full)
    assert 0.9 < ratio < 1.1, ratio  # 1.4 with the explicit casts polprec made before


def test_eval_mode_caches() -> None:
    model = gpt2().eval()
    params = pp.cast_params(detached(model), "bf16-true")
    out = pp.apply_with_policy(model, params, kwargs={"input_ids": IDS}, policy="bf16-true")
    cache = out.get("cache", out.get("past_key_values"))
    assert out.logits.dtype == F32 and cache is not None
    layer = cache.layers[0] if hasattr(cache, "layers") else None
    if layer is not None:
        assert layer.keys.dtype == BF16  # model state, kept in the compute dtype
    name = "cache" if "cache" in out else "past_key_values"
    step = pp.apply_with_policy(
        model, params, kwargs={"input_ids": IDS[:, -1:], name: cache}, policy="bf16-true"
    )
    assert step.logits.shape == (3, 1, 100)  # the cache goes back in as it came out

    def loss(p: Any, ids: torch.Tensor, use_cache: bool) -> Any:
        kwargs = {"input_ids": ids, "use_cache": use_cache}
        out = pp.apply_with_policy(model, p, kwargs=kwargs, policy="bf16-mixed")
        return out.logits.float().mean(), out

    step_fn = pp.value_and_grad(loss, has_aux=True)
    with pytest.raises(TypeError, match="use_cache=False"):
        vmap(lambda ids: step_fn(params, ids[None], True, loss_scale=pp.NoOpLossScale()))(IDS)
    (_, aux), _, _, _ = vmap(
        lambda ids: step_fn(params, ids[None], False, loss_scale=pp.NoOpLossScale())
    )(IDS)
    assert aux.logits.shape == (3, 1, 8, 100)


def test_bert_layernorm_by_class_name() -> None:
    model = transformers.BertModel(bert_config())
    plan = pp.PolicyRules("bf16-true", {"LayerNorm": "32-true"}).resolve(model)
    norms = [p for p, m in model.named_modules() if isinstance(m, nn.LayerNorm)]
    assert len(norms) == 5 and all(plan[p] == pp.get_policy("32-true") for p in norms)
    assert plan["encoder.layer.0.attention.self.query"] == pp.get_policy("bf16-true")
    with pytest.raises(ValueError, match="did you mean the class 'LayerNorm'"):
        pp.PolicyRules("bf16-true", {"Layernorm": "32-true"}).resolve(model)


def test_t5_keep_in_fp32_modules() -> None:
    torch.manual_seed(0)
    # fmt: off
    config = transformers.T5Config(
        vocab_size=100, d_model=32, d_kv=16, d_ff=64, num_layers=1, num_heads=2,
        decoder_start_token_id=0, dropout_rate=0.0,
    )
    # fmt: on
    model = transformers.T5ForConditionalGeneration(config)
    rules = pp.PolicyRules("16-true").keep_in_fp32(model)
    assert [k for k, _ in rules.rules] == ["*wo*"]
    params = pp.cast_params(detached(model), rules, module=model)
    assert params["encoder.block.0.layer.1.DenseReluDense.wo.weight"].dtype == F32
    assert params["encoder.block.0.layer.1.DenseReluDense.wi.weight"].dtype == F16
    batch = {"input_ids": IDS[:, :5].contiguous(), "labels": IDS[:, 5:].contiguous()}
    loss = pp.apply_with_policy(model, params, kwargs=batch, policy=rules).loss
    assert bool(torch.isfinite(loss)) and loss.dtype == F32


@pytest.mark.parametrize("spec", ["bf16-mixed", "16-mixed", "bf16-true"])
def test_llama_and_vit_train_steps(spec: str) -> None:
    torch.manual_seed(0)
    # fmt: off
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
        tie_word_embeddings=True,
    ))
    # fmt: on
    params = pp.cast_params(detached(llama), spec)
    loss_scale = pp.default_loss_scale(spec)
    _, grads, finite, _ = pp.value_and_grad(lm_loss(llama, spec))(
        params, IDS, loss_scale=loss_scale
    )
    assert (
        bool(finite)
        and grads["model.embed_tokens.weight"].dtype == params["model.embed_tokens.weight"].dtype
    )
    # fmt: off
    vit = transformers.ViTForImageClassification(transformers.ViTConfig(
        image_size=8, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, num_labels=3, **NO_DROPOUT,
    ))
    # fmt: on
    images, labels = torch.randn(3, 3, 8, 8), torch.tensor([0, 1, 2])
    vit_params = pp.cast_params(detached(vit), spec)

    def vit_loss(p: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return pp.apply_with_policy(
            vit, p, kwargs={"pixel_values": x, "labels": y}, policy=spec
        ).loss

    per_sample = vmap(grad(vit_loss), in_dims=(None, 0, 0))(
        vit_params, images[:, None], labels[:, None]
    )
    assert all(bool(torch.isfinite(g).all()) for g in per_sample.values())
