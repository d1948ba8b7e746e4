"""CPU eager training-step overhead of a widened model vs its original, printed as a Markdown table.

One training step = forward + backward (``loss = model(input_ids, labels=input_ids).loss``) + ``AdamW.step()`` +
``zero_grad(set_to_none=True)``. Baseline and widened steps are INTERLEAVED in one process (warm-up steps for
each first, then alternating measured steps, with the order flipped every pair so neither side always runs
first), so machine noise hits both alike. The headline is the ratio of medians widened / baseline; absolute ms
are reported too (CPU eager, ``torch.set_num_threads(--threads)``).

Model: Llama-style, transformers ``LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4,
num_attention_heads=4, num_key_value_heads=4, vocab_size=256, attn_implementation="sdpa")``; batch 8 x 128 tokens.
Cases: ``widen(model, 1.5)`` -> (m, n) = (2, 3) and ``widen(model, 4, m=2)`` -> (m, n) = (2, 8), dynamic GHC.

Usage::

    .venv/bin/python benchmarks/step_overhead.py             # full: 3 warm-up + 10 measured steps each
    .venv/bin/python benchmarks/step_overhead.py --quick     # 1 warm-up + 4 measured steps each
    .venv/bin/python benchmarks/step_overhead.py --profile   # plus torch.profiler top ops of one widened step
"""

from __future__ import annotations

import argparse
import logging
import platform
import statistics
import time
import warnings

import torch

import vwn_transform

TARGETS = {(3, 2): 1.25, (8, 2): 1.5}  # (n, m) -> max widened/baseline step-time ratio


def build_llama(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                      num_attention_heads=4, num_key_value_heads=4, vocab_size=256,
                      max_position_embeddings=max(128, args.seq), pad_token_id=0, bos_token_id=1, eos_token_id=2,
                      attn_implementation="sdpa")
    torch.manual_seed(args.seed)
    return LlamaForCausalLM(cfg)


class Trainer:
    """One model + its AdamW; ``step()`` runs forward, backward and the optimizer step and returns seconds."""

    def __init__(self, model, lr: float = 1e-4):
        self.model = model.train()
        self.opt = torch.optim.AdamW(model.parameters(), lr=lr)
        self.losses: list[float] = []

    def run(self, input_ids) -> float:
        loss = self.model(input_ids, labels=input_ids).loss
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    def step(self, input_ids) -> float:
        t0 = time.perf_counter()
        self.losses.append(self.run(input_ids))
        return time.perf_counter() - t0


def interleaved(base: Trainer, wide: Trainer, input_ids, warmup: int, steps: int) -> tuple[list[float], list[float]]:
    for _ in range(warmup):
        base.step(input_ids)
        wide.step(input_ids)
    tb, tw = [], []
    for i in range(steps):
        if i % 2 == 0:
            tb.append(base.step(input_ids))
            tw.append(wide.step(input_ids))
        else:
            tw.append(wide.step(input_ids))
            tb.append(base.step(input_ids))
    return tb, tw


def _profile(trainer: Trainer, input_ids, steps: int = 1):
    from torch.profiler import ProfilerActivity, profile

    for _ in range(2):  # warm (the first step also creates the AdamW state)
        trainer.run(input_ids)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
        for _ in range(steps):
            trainer.run(input_ids)
    return prof.key_averages()


def profile_step(trainer: Trainer, input_ids, label: str, baseline=None, steps: int = 1, top: int = 15) -> None:
    """Top ``top`` ops by self CPU time of ``steps`` widened steps; with ``baseline`` (key_averages of as many
    baseline steps) also a table of the same ops' self CPU time per step in baseline and widened, and the difference."""
    wide = _profile(trainer, input_ids, steps)
    what = "one widened training step" if steps == 1 else f"{steps} widened training steps (totals)"
    print(f"\n### torch.profiler: {what}, {label} (top {top} by self CPU time)\n")
    print("```")
    print(wide.table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=48))
    print("```")
    if baseline is None:
        return
    base = {e.key: e for e in baseline}
    total_w = sum(e.self_cpu_time_total for e in wide) / 1e3 / steps
    total_b = sum(e.self_cpu_time_total for e in baseline) / 1e3 / steps
    rows = sorted(wide, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    print(f"\nSame ops, baseline vs widened, per step (self CPU ms, mean of {steps} profiled step(s) each; total "
          f"self CPU per step: baseline {total_b:.1f} ms, widened {total_w:.1f} ms; single profiled steps are noisy, "
          "use --profile-steps 3 for steadier numbers):\n")
    print("| op | calls/step (base / wide) | baseline ms | widened ms | added ms |")
    print("|---|---:|---:|---:|---:|")
    for e in rows:
        b = base.get(e.key)
        bms = b.self_cpu_time_total / 1e3 / steps if b is not None else 0.0
        bcalls = b.count // steps if b is not None else 0
        wms = e.self_cpu_time_total / 1e3 / steps
        print(f"| `{e.key}` | {bcalls} / {e.count // steps} | {bms:.1f} | {wms:.1f} | {wms - bms:+.1f} |")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument("--warmup", type=int, default=3, help="warm-up steps per model (default 3)")
    ap.add_argument("--steps", type=int, default=10, help="measured steps per model (default 10)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--intermediate", type=int, default=688)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cases", nargs="+", default=["1.5", "4:2"],
                    help="ratio[:m] per case (default: 1.5 4:2, i.e. r=1.5 and r=4 with m=2)")
    ap.add_argument("--quick", action="store_true", help="1 warm-up + 4 measured steps per model")
    ap.add_argument("--profile", action="store_true",
                    help="also print torch.profiler top-15 ops (self CPU time) of one widened step per case")
    ap.add_argument("--profile-steps", type=int, default=1,
                    help="steps inside the profiler per model (default 1: the table is one step)")
    ap.add_argument("--profile-only", action="store_true", help="skip the timing table, only --profile")
    args = ap.parse_args(argv)
    if args.quick:
        args.warmup, args.steps = 1, 4
    if args.profile_only:
        args.profile = True

    torch.set_num_threads(args.threads)
    logging.getLogger("vwn_transform").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    import transformers

    cases = []
    for spec in args.cases:
        ratio, _, m = spec.partition(":")
        cases.append((float(ratio) if "." in ratio else int(ratio), int(m) if m else None))

    original = build_llama(args)
    widened = []
    for ratio, m in cases:  # widen the untouched original (before any training step)
        wide = vwn_transform.widen(original, ratio, m=m)
        p = vwn_transform.plan(original, ratio, m=m)
        widened.append((ratio, m, wide, p))
    g = torch.Generator().manual_seed(args.seed + 1)
    input_ids = torch.randint(0, 256, (args.batch, args.seq), generator=g)

    nparams = sum(p.numel() for p in original.parameters())
    print("## Training-step overhead of `widen()`: widened vs original, CPU eager\n")
    print(f"Llama (HF LlamaForCausalLM, sdpa) D={args.hidden}, FFN={args.intermediate}, {args.layers} layers, "
          f"vocab 256, {nparams:,} params; batch {args.batch} x {args.seq} tokens.")
    print(f"Step = forward + backward + AdamW.step() + zero_grad; fp32; torch.set_num_threads({args.threads}); "
          f"torch {torch.__version__}, transformers {transformers.__version__}, {platform.machine()}.")
    print(f"Interleaved in one process: {args.warmup} warm-up steps each, then {args.steps} measured steps each "
          f"(alternating, order flipped every pair). GHC dynamic, init=preserve.\n")

    if not args.profile_only:
        print("| case | (m, n) | params added | matmul FLOPs added | baseline ms (median) | widened ms (median) | "
              "ratio widened/baseline | ratio (min/min) | target | verdict |")
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
        base = Trainer(original)
        for ratio, m, wide, p in widened:
            c = wide.vwn_config
            tb, tw = interleaved(base, Trainer(wide), input_ids, args.warmup, args.steps)
            mb, mw = statistics.median(tb), statistics.median(tw)
            ratio_med = mw / mb
            target = TARGETS.get((c.n, c.m))
            verdict = "" if target is None else ("MET" if ratio_med <= target else "NOT MET")
            label = f"r={ratio:g}" + (f", m={m}" if m is not None else "")
            padd = 100.0 * p.params_added / p.params_original
            fadd = 100.0 * p.flops_added_per_token / p.flops_original_per_token
            print(f"| {label} | ({c.m}, {c.n}) | +{padd:.2f}% | +{fadd:.2f}% | {mb * 1e3:.1f} | {mw * 1e3:.1f} | "
                  f"**{ratio_med:.3f}x** | {min(tw) / min(tb):.3f}x | "
                  f"{'' if target is None else f'<= {target}x'} | {verdict} |", flush=True)
        print()
        print("targets: widened/baseline step time <= 1.25x at r=1.5 ((m, n) = (2, 3)) and <= 1.5x at r=4, m=2 "
              "((m, n) = (2, 8))")
        print("(matmul FLOPs added: vwn_transform.plan()'s count, excluding attention scores; the step ratio also "
              "pays for the wide residual stream's elementwise/memory traffic and the AdamW update of added "
              "parameters.)")

    if args.profile:
        baseline = _profile(Trainer(original), input_ids, args.profile_steps)
        for ratio, m, wide, _ in widened:
            c = wide.vwn_config
            label = f"r={ratio:g}" + (f", m={m}" if m is not None else "") + f" ((m, n) = ({c.m}, {c.n}))"
            profile_step(Trainer(wide), input_ids, label, baseline, args.profile_steps)


if __name__ == "__main__":
    main()
