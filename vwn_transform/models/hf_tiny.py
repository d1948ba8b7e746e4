"""Tiny Hugging Face causal LMs built from configs (nothing is downloaded): for tests, examples and the CLI."""

from __future__ import annotations

import torch

__all__ = ["TINY_HF_FIELDS", "TINY_HF_FAMILIES", "tiny_hf_model"]

TINY_HF_FIELDS = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
                      bos_token_id=1, eos_token_id=2)

# model_type -> config fields that family names differently or needs to be tiny
TINY_HF_FAMILIES = {
    "llama": {},
    "qwen2": {},
    "mistral": {},
    "gpt2": dict(n_embd=32, n_layer=2, n_head=4, n_positions=64),
    "gemma": dict(head_dim=8),
    "phi3": {},
    "gpt_neox": dict(use_parallel_residual=True),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "gptj": dict(n_embd=32, n_layer=2, n_head=4, n_positions=64, rotary_dim=4),
    "codegen": dict(n_embd=32, n_layer=2, n_head=4, n_positions=64, rotary_dim=4),
}


def tiny_hf_model(model_type: str, seed: int = 0, **overrides):
    """A randomly initialized ``AutoModelForCausalLM`` of ``model_type`` with a tiny config, in eval mode.

    >>> model = tiny_hf_model("llama")
    >>> type(model).__name__
    'LlamaForCausalLM'
    """
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM

    if model_type not in CONFIG_MAPPING:
        raise ValueError(f"unknown transformers model type {model_type!r}; known causal LM types include "
                         f"{sorted(TINY_HF_FAMILIES)}")
    fields = dict(TINY_HF_FIELDS)
    fields.update(TINY_HF_FAMILIES.get(model_type, {}))
    fields.update(overrides)
    cfg = CONFIG_MAPPING[model_type](**fields)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
