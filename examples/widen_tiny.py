"""Widen a tiny Hugging Face Llama and the project's reference GPT; print the plan and show the logits match.

Run: .venv/bin/python examples/widen_tiny.py   (after `make install`; about 10 s)
"""

from __future__ import annotations

import logging
import time

import torch

import vwn_transform
from vwn_transform.models import GPT, GPTConfig


def compare(name: str, original, widened, inputs, logits_of) -> None:
    with torch.no_grad():
        ref, got = logits_of(original(*inputs)), logits_of(widened(*inputs))
    diff = (got - ref).abs().max().item()
    print(f"{name}: logits {tuple(got.shape)}, max |widened - original| = {diff:.2e}  "
          f"({'match' if diff <= 1e-5 else 'MISMATCH'})")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    torch.manual_seed(0)

    # 1. the reference GPT at r = 1.5: (m, n) = (2, 3)
    gpt = GPT(GPTConfig(vocab_size=256, block_size=64, n_layer=4, n_head=4, n_embd=128)).eval()
    print(vwn_transform.plan(gpt, "3/2"), "\n")
    start = time.perf_counter()
    wide_gpt = vwn_transform.widen(gpt, "3/2")
    print(f"widen() took {time.perf_counter() - start:.2f} s")
    idx = torch.randint(0, 256, (2, 48))
    compare("reference GPT r=1.5", gpt, wide_gpt, (idx,), lambda out: out[0])
    same = torch.equal(gpt.generate(idx[:1, :8], 16, greedy=True), wide_gpt.generate(idx[:1, :8], 16, greedy=True))
    print(f"reference GPT greedy generation identical: {same}\n")

    # 2. a tiny Hugging Face Llama at r = 4 with m = 2: (m, n) = (2, 8)
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)).eval()
    print(vwn_transform.plan(llama, 4, m=2), "\n")
    wide_llama = vwn_transform.widen(llama, 4, m=2)
    ids = torch.randint(0, 256, (2, 32))
    compare("HF Llama r=4 (m=2)", llama, wide_llama, (ids,), lambda out: out.logits)
    a = llama.generate(ids[:1, :8], max_new_tokens=16, do_sample=False)
    b = wide_llama.generate(ids[:1, :8], max_new_tokens=16, do_sample=False)
    print(f"HF Llama greedy generate() with KV cache identical: {torch.equal(a, b)}")
    print(f"widened model is still a {type(llama).__name__}: {isinstance(wide_llama, LlamaForCausalLM)}; "
          f"loss with labels = {wide_llama(ids, labels=ids).loss.item():.4f} "
          f"(original {llama(ids, labels=ids).loss.item():.4f})")


if __name__ == "__main__":
    main()
