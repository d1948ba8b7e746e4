"""Tiny Hugging Face causal LMs for the tests (see vwn_transform.models.hf_tiny)."""

from vwn_transform.models.hf_tiny import TINY_HF_FAMILIES, tiny_hf_model as tiny_hf

# the families the core issue names; tests parametrize over these
FAMILIES = {k: TINY_HF_FAMILIES[k] for k in
            ("llama", "qwen2", "mistral", "gpt2", "gemma", "phi3", "gpt_neox", "mixtral")}

__all__ = ["FAMILIES", "tiny_hf"]
