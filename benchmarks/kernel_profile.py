"""Where the time of each GHC op goes on a GPU: every op's forward and backward, ours (``VWN_IMPL=triton``'s
kernels) and the eager reference, under ``torch.profiler``; prints per call the device time of each kernel and
of all of them together (a backward of several kernels and torch reductions shows which part is slow).

    python benchmarks/kernel_profile.py                         # (2,3), (8,16), (8,64); D=2048, 16384 tokens, bf16
    python benchmarks/kernel_profile.py --slots "2,3" --impl triton --op read_dynamic_backward
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

CALLS = 10


def profile(fn, device):
    import torch
    from torch.profiler import ProfilerActivity, profile as torch_profile

    for _ in range(3):
        fn()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        for _ in range(CALLS):
            fn()
        if device == "cuda":
            torch.cuda.synchronize()
    per_kernel = defaultdict(float)
    for ev in prof.key_averages():
        us = ev.device_time_total if device == "cuda" else ev.self_cpu_time_total
        kind = getattr(getattr(ev, "device_type", None), "name", "CUDA")
        if device == "cuda" and kind != "CUDA":  # kernels only: an operator's device time is its kernels' again
            continue
        if us > 0:
            per_kernel[ev.key] += us / CALLS
    return dict(sorted(per_kernel.items(), key=lambda kv: -kv[1]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--slots", default="2,3;8,16;8,64", help='(m, n) pairs, e.g. "2,3;8,64"')
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--D", type=int, default=2048)
    ap.add_argument("--impl", action="append", choices=("triton", "eager"), default=None)
    ap.add_argument("--op", action="append", default=None, help="ops to profile (default: all)")
    ap.add_argument("--top", type=int, default=6, help="kernels listed per op")
    args = ap.parse_args(argv)

    import torch
    from ghc_kernels import op_calls

    from vwn_transform.kernels import reference as ref
    from vwn_transform.kernels import triton_ops as tri

    device = "cuda" if torch.cuda.is_available() else "cpu"
    libs = {"triton": tri, "eager": ref}
    for part in args.slots.split(";"):
        m, n = (int(x) for x in part.split(","))
        _, ops = op_calls(args.tokens, m, n, args.D, torch.bfloat16, device)
        for op, fn in ops.items():
            if args.op and op not in args.op:
                continue
            for impl in args.impl or ("triton", "eager"):
                kernels = profile(lambda: fn(libs[impl]), device)
                total = sum(kernels.values())
                top = "; ".join(f"{k[:60]} {us:.0f}" for k, us in list(kernels.items())[:args.top])
                print(f"({m},{n}) {op} {impl}: {total:.0f} us/call in {len(kernels)} kernels: {top}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
