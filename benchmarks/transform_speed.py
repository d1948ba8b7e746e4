"""Wall time of ``vwn_transform.widen()`` on tiny models (CPU), printed as a Markdown table.

Measures only the call itself: imports and model construction are outside the timed region. The original model is
built once per case and widened repeatedly (``widen`` deep-copies by default, so the original is never changed).
One untimed warm-up call per case comes first (it pays one-off costs such as lazy imports inside torch.fx), then
``--runs`` timed calls; the table reports their median and minimum, and the cold first call for reference.

Breakdown columns (also medians):
  * ``plan()``: analysis only (probe forward, block tracing, residual-update matching), no copy and no surgery;
  * ``deepcopy``: ``copy.deepcopy(model)``, which ``widen(inplace=False)`` does once;
  * the remainder (``widen - plan - deepcopy``) is surgery, graph rewrite/compile and the output check.

Usage::

    .venv/bin/python benchmarks/transform_speed.py            # full
    .venv/bin/python benchmarks/transform_speed.py --quick    # fewer runs, skips the 32-layer Llama
"""

from __future__ import annotations

import argparse
import copy
import logging
import platform
import statistics
import time
import warnings

import torch

import vwn_transform
from vwn_transform.models import GPT, GPTConfig

TARGET = "target: 32-layer Llama widens in < 1 s on 2 CPU cores"


def tiny_llama(num_layers: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, max_position_embeddings=128, pad_token_id=0,
                      bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


def reference_gpt(n_layer: int = 6, n_embd: int = 128, seed: int = 0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=256, block_size=128, n_layer=n_layer, n_head=4, n_embd=n_embd)).eval()


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _fmt_ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}"


def bench_case(model, ratio, m, runs: int) -> dict:
    def do_widen():
        return vwn_transform.widen(model, ratio, m=m)

    cold = _time(do_widen)
    wide = do_widen()
    cfg = wide.vwn_config
    del wide
    widen_t = [_time(do_widen) for _ in range(runs)]
    plan_t = [_time(lambda: vwn_transform.plan(model, ratio, m=m)) for _ in range(runs)]
    copy_t = [_time(lambda: copy.deepcopy(model)) for _ in range(runs)]
    return dict(m=cfg.m, n=cfg.n, cold=cold, median=statistics.median(widen_t), min=min(widen_t),
                plan=statistics.median(plan_t), copy=statistics.median(copy_t))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument("--runs", type=int, default=5, help="timed widen() calls per case (default 5)")
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 8, 32], help="Llama depths (default 2 8 32)")
    ap.add_argument("--gpt-layers", type=int, default=6, help="reference GPT n_layer (default 6)")
    ap.add_argument("--gpt-embd", type=int, default=128, help="reference GPT n_embd (default 128)")
    ap.add_argument("--quick", action="store_true", help="3 runs, Llama depths 2 and 8 only")
    args = ap.parse_args(argv)
    if args.quick:
        args.runs = min(args.runs, 3)
        args.layers = [d for d in args.layers if d <= 8] or [2]

    torch.set_num_threads(args.threads)
    logging.getLogger("vwn_transform").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")

    import transformers

    models = []  # (label, builder)
    for depth in args.layers:
        models.append((f"Llama (HF), {depth} layers, D=64", lambda d=depth: tiny_llama(d)))
    models.append((f"GPT (reference), {args.gpt_layers} layers, D={args.gpt_embd}",
                   lambda: reference_gpt(args.gpt_layers, args.gpt_embd)))
    ratios = [(1.5, None), (4, 2)]

    # one global warm-up outside any measurement (lazy imports in torch.fx / transformers)
    vwn_transform.widen(tiny_llama(1), 1.5)

    print(f"## `vwn_transform.widen()` wall time (CPU, torch.set_num_threads({args.threads}))\n")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, Python {platform.python_version()}, "
          f"{platform.machine()}; median / min of {args.runs} runs after one warm-up call; times in ms.\n")
    print("| model | params | r | (m, n) | widen median | widen min | 1st call | plan() | deepcopy | rest |")
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    results = {}
    for label, build in models:
        model = build()
        params = sum(p.numel() for p in model.parameters())
        for ratio, m in ratios:
            r = bench_case(model, ratio, m, args.runs)
            results[(label, ratio, m)] = r
            rest = r["median"] - r["plan"] - r["copy"]
            rlabel = f"{ratio:g}" + (f" (m={m})" if m is not None else "")
            print(f"| {label} | {params:,} | {rlabel} | ({r['m']}, {r['n']}) | {_fmt_ms(r['median'])} | "
                  f"{_fmt_ms(r['min'])} | {_fmt_ms(r['cold'])} | {_fmt_ms(r['plan'])} | {_fmt_ms(r['copy'])} | "
                  f"{_fmt_ms(rest)} |", flush=True)
        del model

    print()
    print(TARGET)
    deep = [(k, v) for k, v in results.items() if k[0].startswith("Llama (HF), 32 layers")]
    if deep:
        worst = max(v["median"] for _, v in deep)
        verdict = "MET" if worst < 1.0 else "NOT MET"
        print(f"result: 32-layer Llama widen() median {worst * 1e3:.0f} ms (slowest ratio) with "
              f"{args.threads} threads -> {verdict}")
    else:
        print("result: 32-layer Llama not run (--quick or --layers without 32)")
    print("\n(`rest` = widen median - plan() median - deepcopy median: surgery, block-graph rewrite and compile, "
          "and the output check forward.)")


if __name__ == "__main__":
    main()
