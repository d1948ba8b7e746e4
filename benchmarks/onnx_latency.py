"""onnxruntime CPU inference latency of widened models vs their original, printed as a Markdown table.

Each model is exported with :func:`vwn_transform.export_onnx` (dynamic batch/sequence, verified), then run in
one onnxruntime ``InferenceSession`` (CPUExecutionProvider, ``intra_op_num_threads=--threads``) at batch 1 x
sequence 128 and batch 8 x sequence 512. Baseline and widened sessions are timed INTERLEAVED (alternating runs,
order flipped every pair) so machine noise hits both alike; the headline is the ratio of medians
widened / baseline. Absolute milliseconds are printed for context only (CPU).

Model: Llama-style, ``LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4,
num_attention_heads=4, vocab_size=256)``; widened at r=1.5 (m, n) = (2, 3) and r=4 (2, 8), dynamic GHC,
function-preserving init.

``--compare-generic`` also exports the widened models with the generic GHC translations (the ones before the
lean form, ``vwn_transform.onnx._generic_translation_table``) and times them in the same interleaved loop, so
before/after ratios come from one run. ``--dtype float16`` exports half precision; ``--provider cuda`` runs
onnxruntime-gpu's CUDAExecutionProvider (an error if it is unavailable or falls back to the CPU).

Usage::

    .venv/bin/python benchmarks/onnx_latency.py            # 10 measured runs per shape
    .venv/bin/python benchmarks/onnx_latency.py --quick    # 3 measured runs, batch 8 x 512 skipped
    .venv/bin/python benchmarks/onnx_latency.py --quick --runs 20 --compare-generic
"""

from __future__ import annotations

import argparse
import logging
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

import vwn_transform


def build_llama(hidden: int, layers: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=int(hidden * 2.6875), num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=4, vocab_size=256, max_position_embeddings=1024,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2, attn_implementation="eager")
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


def session_for(path: Path, threads: int, provider: str):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=[provider])
    if sess.get_providers()[0] != provider:
        raise SystemExit(f"onnxruntime ran {sess.get_providers()}, not {provider}")
    return sess


def timed(sess, feeds) -> float:
    t0 = time.perf_counter()
    sess.run(["logits"], feeds)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--compare-generic", action="store_true",
                    help="also time the widened models exported with the generic GHC translations")
    ap.add_argument("--dtype", choices=["float32", "float16"], default="float32")
    ap.add_argument("--provider", choices=["cpu", "cuda"], default="cpu")
    args = ap.parse_args()
    provider = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}[args.provider]
    warnings.filterwarnings("ignore")
    logging.getLogger("torch").setLevel(logging.ERROR)
    runs = args.runs if (not args.quick or args.runs != 10) else 3
    shapes = [(1, 128)] if args.quick else [(1, 128), (8, 512)]

    base = build_llama(args.hidden, args.layers, args.seed)
    import vwn_transform.onnx as vonnx

    cases = {"baseline": (base, False), "r=1.5 (2,3)": (vwn_transform.widen(base, 1.5), False),
             "r=4 (2,8)": (vwn_transform.widen(base, 4, m=2), False)}
    if args.compare_generic:
        cases["r=1.5 (2,3) generic"] = (cases["r=1.5 (2,3)"][0], True)
        cases["r=4 (2,8) generic"] = (cases["r=4 (2,8)"][0], True)
    tmp = Path(tempfile.mkdtemp(prefix="vwn_onnx_latency_"))
    sessions, sizes = {}, {}
    lean_table = vonnx.translation_table
    for i, (name, (model, generic)) in enumerate(cases.items()):
        path = tmp / f"model{i}.onnx"
        vonnx.translation_table = vonnx._generic_translation_table if generic else lean_table
        try:
            report = vonnx.export_onnx(model, path, dtype=getattr(torch, args.dtype), providers=[provider])
        finally:
            vonnx.translation_table = lean_table
        sizes[name] = report.file_size_bytes / 1e6
        sessions[name] = session_for(path, args.threads, provider)
        import onnx

        nodes = len(onnx.load(str(path), load_external_data=False).graph.node)
        print(f"exported {name}: {sizes[name]:.1f} MB, {nodes} nodes, verify max abs diff "
              f"{report.max_abs_diff:.1e}", flush=True)

    print(f"\nonnxruntime {provider} latency, {args.dtype}, Llama D={args.hidden} x {args.layers} layers, "
          f"{args.threads} threads, {platform.processor() or platform.machine()}, median of {runs} interleaved "
          "runs\n")
    print("| shape | model | ms (median) | ratio vs baseline |")
    print("|---|---|---|---|")
    rng = np.random.default_rng(args.seed)
    for batch, seq in shapes:
        feeds = {"input_ids": rng.integers(0, 256, (batch, seq), dtype=np.int64),
                 "attention_mask": np.ones((batch, seq), dtype=np.int64)}
        for sess in sessions.values():  # warm-up
            timed(sess, feeds)
        times = {name: [] for name in sessions}
        order = list(sessions)
        for i in range(runs):
            for name in (order if i % 2 == 0 else order[::-1]):
                times[name].append(timed(sessions[name], feeds))
        med = {name: statistics.median(t) for name, t in times.items()}
        for name in sessions:
            print(f"| {batch}x{seq} | {name} | {med[name] * 1e3:.1f} | {med[name] / med['baseline']:.2f}x |",
                  flush=True)


if __name__ == "__main__":
    main()
