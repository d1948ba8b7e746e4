"""Training-step time and peak memory, baseline vs widened model, under eager, torch.compile (inductor) and
torch.compile(backend="vwn"); prints a Markdown table.

CPU (default here): Llama-style D=256, 4 layers, batch 8 x 128, fp32; peak memory is not measured on the CPU.
GPU (``--gpu``, when lent): 12 layers, D=2048, batch 4 x 2048, bf16; peak memory from
``torch.cuda.max_memory_allocated``. Steps of all variants are interleaved after a warm-up that includes the
compilation; the headline figures are ratios of medians.

Targets (GPU): ``backend="vwn"`` at least 1.3x faster than plain inductor on the widened model's step; the widened
model's step at r=1.5 within 5% of the baseline's compiled step.

Usage::

    .venv/bin/python benchmarks/compile_step.py [--steps 10] [--quick]
    python benchmarks/compile_step.py --gpu        # on the GPU machine; record in benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
import warnings

import torch

import vwn_transform


def build(args, device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=args.hidden, intermediate_size=int(args.hidden * 2.6875),
                      num_hidden_layers=args.layers, num_attention_heads=max(4, args.hidden // 128),
                      num_key_value_heads=max(4, args.hidden // 128), vocab_size=args.vocab,
                      max_position_embeddings=args.seq, attn_implementation="sdpa")
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(device, dtype)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--quick", action="store_true", help="2 layers, 4 measured steps, r=1.5 only")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("torch").setLevel(logging.ERROR)
    if args.gpu:
        if not torch.cuda.is_available():
            raise SystemExit("--gpu: no CUDA device here")
        device, dtype = "cuda", torch.bfloat16
        args.hidden, args.layers, args.batch, args.seq, args.vocab = 2048, 12, 4, 2048, 32000
    else:
        device, dtype = "cpu", torch.float32
        args.hidden, args.layers, args.batch, args.seq, args.vocab = 256, 4, 8, 128, 256
    if args.quick:
        args.layers, args.steps = 2, 4
    base = build(args, device, dtype)
    models = {"baseline": base, "r=1.5 (2,3)": vwn_transform.widen(base, 1.5)}
    if not args.quick:
        models["r=4 (2,8)"] = vwn_transform.widen(base, 4, m=2)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), device=device)

    variants = {}
    for name, model in models.items():
        model.train()
        modes = {"eager": model, "inductor": torch.compile(model)}
        if name != "baseline":
            modes["vwn"] = torch.compile(model, backend="vwn")
        for mode, fn in modes.items():
            opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

            def step(fn=fn, opt=opt):
                fn(input_ids=ids, labels=ids).loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            variants[(name, mode)] = step

    def timed(step) -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    compile_s = {key: timed(step) for key, step in variants.items()}  # warm-up incl. compilation
    for step in variants.values():
        step()
    times = {key: [] for key in variants}
    peaks = {}
    keys = list(variants)
    for i in range(args.steps):
        for key in (keys if i % 2 == 0 else keys[::-1]):
            if device == "cuda" and i == 0:
                torch.cuda.reset_peak_memory_stats()
            times[key].append(timed(variants[key]))
            if device == "cuda" and i == 0:
                peaks[key] = torch.cuda.max_memory_allocated() / 2**30
    med = {key: statistics.median(t) for key, t in times.items()}
    where = torch.cuda.get_device_name() if device == "cuda" else "CPU, 2 threads" if torch.get_num_threads() == 2 \
        else f"CPU, {torch.get_num_threads()} threads"
    print(f"\nTraining step, Llama D={args.hidden} x {args.layers} layers, batch {args.batch} x {args.seq}, {dtype}, "
          f"{where}; median of {args.steps} interleaved steps\n")
    print("| model | mode | step ms | vs baseline (same mode) | vs inductor (same model) | first step s | peak GiB |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for (name, mode), t in med.items():
        base_t = med.get(("baseline", mode), med[("baseline", "inductor")] if mode == "vwn" else None)
        ind = med[(name, "inductor")]
        peak = f"{peaks[(name, mode)]:.2f}" if (name, mode) in peaks else "n/a"
        print(f"| {name} | {mode} | {t * 1e3:.1f} | {t / base_t:.2f}x | {t / ind:.2f}x | "
              f"{compile_s[(name, mode)]:.1f} | {peak} |", flush=True)


if __name__ == "__main__":
    main()
