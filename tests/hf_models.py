"""Tiny Hugging Face causal LMs built from configs (never downloaded), shared by the tests."""

from __future__ import annotations

import torch

TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)

# model_type -> extra config fields
FAMILIES = {
    "llama": {},
    "qwen2": {},
    "mistral": {},
    "gpt2": dict(n_embd=32, n_layer=2, n_head=4, n_positions=64),
    "gemma": dict(head_dim=8),
    "phi3": {},
    "gpt_neox": dict(use_parallel_residual=True),
    "gptj": dict(n_embd=32, n_layer=2, n_head=4, n_positions=64, rotary_dim=4),
    "codegen": dict(n_embd=32, n_layer=2, n_head=4, n_positions=64, rotary_dim=4),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
}


def tiny_hf(model_type: str, seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM, CONFIG_MAPPING

    fields = dict(TINY)
    fields.update(FAMILIES.get(model_type, {}))
    fields.update(overrides)
    cfg = CONFIG_MAPPING[model_type](**fields)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    return model.eval()
