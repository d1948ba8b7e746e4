"""Activation memory of widened models vs their original, with and without block activation checkpointing,
printed as a Markdown table of bytes and ratios.

What is measured: the bytes of tensors the autograd graph keeps alive for the backward after one training
forward (``loss = model(ids, labels=ids).loss``), counted with ``torch.autograd.graph.saved_tensors_hooks``,
deduplicated by storage, parameters excluded. With checkpointing (``torch.utils.checkpoint`` of every block,
non-reentrant) a block keeps only its inputs: the count then is what is saved outside the blocks plus each
block's input. The "GHC recompute" column is ``VWNConfig(recompute=True)``: the dynamic GHC coefficients and
read statistics are recomputed in the backward instead of stored. The torch.compile table compiles the same
models (``backend="inductor"``, ``--backend`` to change it) with and without recompute and counts what the
compiled graphs save the same way (AOT autograd saves its tensors with ``ctx.save_for_backward``, which the
hooks see); there the recompute is done by AOT autograd's partitioner. This is the allocator-independent part
of peak memory that VWN changes (the r*D-wide state is saved around every GHC); the count is the same on any
device, so it runs on the CPU. A real checkpointed backward is run too, to check the wiring computes the same
gradients.

Model: Llama-style, ``LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4,
num_attention_heads=4, vocab_size=256)``, batch 8 x 128 tokens, fp32; widened at r=1.5 (2, 3) and r=8 (1, 8),
dynamic GHC.

Usage::

    .venv/bin/python benchmarks/memory.py                 # both tables (compiling takes a few minutes on a CPU)
    .venv/bin/python benchmarks/memory.py --backend none  # eager table only
"""

from __future__ import annotations

import argparse
import logging
import warnings

import torch
from torch.utils.checkpoint import checkpoint

import vwn_transform


def build_llama(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=args.hidden, intermediate_size=int(args.hidden * 2.6875),
                      num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=4, vocab_size=256,
                      max_position_embeddings=max(128, args.seq), pad_token_id=0, bos_token_id=1, eos_token_id=2,
                      attn_implementation="sdpa")
    torch.manual_seed(args.seed)
    return LlamaForCausalLM(cfg).train()


def blocks_of(model):
    return [model.get_submodule(b) for b in model.vwn_recipe["wrapped"]["blocks"]] if hasattr(model, "vwn_recipe") \
        else list(model.model.layers)


def saved_bytes(model, ids, checkpointed: bool) -> int:
    """Bytes kept alive for the backward after one forward (see module docstring)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}
    inside = [0]  # > 0 while a block runs (its saved tensors are recomputed when checkpointed)

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params and not (checkpointed and inside[0]):
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    def enter(module, args, kwargs):
        if checkpointed:
            for a in list(args) + list(kwargs.values()):
                if isinstance(a, torch.Tensor) and a.is_floating_point():
                    seen[a.untyped_storage().data_ptr()] = a.untyped_storage().nbytes()  # the block input
        inside[0] += 1

    def leave(module, args, output):
        inside[0] -= 1

    handles = []
    for block in blocks_of(model):
        handles.append(block.register_forward_pre_hook(enter, with_kwargs=True))
        handles.append(block.register_forward_hook(leave))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(input_ids=ids, labels=ids).loss
    finally:
        for h in handles:
            h.remove()
    del loss
    return sum(seen.values())


def recompute_saving(model, ids) -> int:
    """Bytes ``VWNConfig(recompute=True)`` keeps out of storage (the GHC coefficients and read statistics),
    counted by the recompute hooks themselves (an outer saved-tensor hook cannot see inside them)."""
    from vwn_transform.modules import GHC, _Recomputed

    ghcs = [g for g in model.modules() if isinstance(g, GHC)]
    if not ghcs:
        return 0
    for g in ghcs:
        g.recompute = g.dynamic
    before = _Recomputed.dropped_bytes
    try:
        model(input_ids=ids, labels=ids)
    finally:
        for g in ghcs:
            g.recompute = False
    return _Recomputed.dropped_bytes - before


def compiled_saved_bytes(model, ids, backend: str, recompute: bool) -> tuple[int, list[torch.Tensor]]:
    """Bytes the compiled model keeps for the backward after one forward, and its gradients after the backward.
    ``recompute`` sets ``GHC.recompute`` on every dynamic GHC for this call."""
    from vwn_transform.modules import GHC

    ghcs = [g for g in model.modules() if isinstance(g, GHC)]
    for g in ghcs:
        g.recompute = recompute and g.dynamic
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    torch._dynamo.reset()
    fast = torch.compile(model, backend=backend)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = fast(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad(set_to_none=True)
    finally:
        for g in ghcs:
            g.recompute = False
    return sum(seen.values()), grads


def eager_grads(model, ids) -> list[torch.Tensor]:
    model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return grads


def checkpointed_grads_match(model, ids) -> bool:
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    ref = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    saved = {}
    for block in blocks_of(model):
        fwd = block.forward
        saved[block] = fwd
        block.forward = (lambda f: lambda *a, **k: checkpoint(f, *a, use_reentrant=False, **k))(fwd)
    try:
        model(input_ids=ids, labels=ids).loss.backward()
    finally:
        for block, fwd in saved.items():
            block.forward = fwd
    ok = all(torch.allclose(p.grad, r, atol=1e-5) for p, r in zip(model.parameters(), ref))
    model.zero_grad(set_to_none=True)
    return ok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--backend", default="inductor",
                    help="torch.compile backend of the compiled table (inductor, aot_eager, vwn), 'none' to skip it")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("torch").setLevel(logging.ERROR)

    base = build_llama(args)
    cases = {"baseline": base, "r=1.5 (2,3)": vwn_transform.widen(base, 1.5).train(),
             "r=8 (1,8)": vwn_transform.widen(base, 8, m=1).train()}
    ids = torch.randint(0, 256, (args.batch, args.seq), generator=torch.Generator().manual_seed(args.seed))
    rows = {name: (saved_bytes(m, ids, False), saved_bytes(m, ids, True), recompute_saving(m, ids))
            for name, m in cases.items()}
    ok = {name: checkpointed_grads_match(m, ids) for name, m in cases.items()}

    print(f"\nActivation memory kept for backward, Llama D={args.hidden} x {args.layers} layers, batch {args.batch} x "
          f"{args.seq}, fp32\n")
    print("| model | no recompute (MB) | ratio | GHC recompute (MB) | ratio | block checkpointing (MB) | ratio | "
          "checkpointed grads match |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    b_plain, b_ckpt, _ = rows["baseline"]
    for name, (plain, ckpt, dropped) in rows.items():
        rec = plain - dropped
        print(f"| {name} | {plain / 2**20:.1f} | {plain / b_plain:.2f}x | {rec / 2**20:.1f} | {rec / b_plain:.2f}x | "
              f"{ckpt / 2**20:.1f} | {ckpt / b_ckpt:.2f}x | {'yes' if ok[name] else 'NO'} |")

    if args.backend == "none":
        return
    print(f"\nGHC recompute under torch.compile(backend={args.backend!r}), same model and batch (gradients compared "
          "with eager, max abs difference)\n")
    print("| model | eager: saved by recompute (MB) | compiled: no recompute (MB) | compiled: recompute (MB) | "
          "compiled: saved by recompute (MB) | grads vs eager |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, m in cases.items():
        if name == "baseline":
            continue
        want = eager_grads(m, ids)
        plain, _ = compiled_saved_bytes(m, ids, args.backend, recompute=False)
        rec, grads = compiled_saved_bytes(m, ids, args.backend, recompute=True)
        diff = max((g - w).abs().max().item() for g, w in zip(grads, want))
        print(f"| {name} | {rows[name][2] / 2**20:.2f} | {plain / 2**20:.1f} | {rec / 2**20:.1f} | "
              f"{(plain - rec) / 2**20:.2f} | {diff:.1e} |")


if __name__ == "__main__":
    main()
