"""Search the launch parameters of the tensor-core GHC kernels (``kernels/triton_tc.py``) without a GPU: for each
padded slot count NP in {16, 32, 64} (m <= 16 always pads to MP = 16), operand kind (bf16; fp32 for fp32/fp16
states), slot-width alignment (``triton_common.aligned``: d a multiple of 16 or not, which Triton compiles
differently) and kernel, compile candidate (BD, num_warps) pairs for sm_90a, widest chunk first, and keep the first
that has no spills and at most 100 KB of shared memory per program (``kernel_static_check.compile_one``) at every
representative (m, n) of that NP. Prints the table that ``triton_tc.LAUNCH`` holds.

    python benchmarks/tc_launch_search.py            # ~40 minutes on 2 cores (unaligned alone: ~15)
    python benchmarks/tc_launch_search.py --np 64 --operands bf16 --alignment unaligned
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)  # compile for the GPU, not the interpreter
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import kernel_static_check as gate  # noqa: E402

# widest chunk first; 2 warps for the batched kernels at NP = 64 (two tokens per program, one warp each)
CANDIDATES = [(256, 4), (128, 4), (128, 8), (64, 4), (64, 8), (64, 2), (32, 4), (32, 8), (32, 2), (16, 4), (16, 8),
              (16, 2)]
# representative (m, n) per padded slot count: the largest and the smallest n that pad to it (n = 9 is the smallest
# the tensor-core write runs at; (5, 7) stands for the dynamic reads with too many gates for the FMA kernel, n <= 8).
# Only the masks differ between them, but those change what ptxas keeps in registers: at (8, 33) a launch that was
# clean at (8, 64) spilled; (3, 12), (16, 64) and (12, 40) were added after the gate found spills there.
SHAPES = {16: [(8, 16), (3, 9), (5, 7), (3, 12)], 32: [(8, 32), (8, 17)],
          64: [(8, 64), (8, 33), (16, 64), (12, 40)]}
# a slot width per alignment: only d % 16 == 0 or not reaches the compiled code (d is a runtime argument)
WIDTHS = {"aligned": 256, "unaligned": 255}


def search(np_: int, operands: str, alignment: str = "aligned", keys=None) -> dict[str, tuple[int, int]]:
    from vwn_transform.kernels import triton_tc
    from vwn_transform.kernels.triton_common import FMA_MAX_N

    dtype = "bf16" if operands == "bf16" else "fp32"
    d = WIDTHS[alignment]
    # at n <= FMA_MAX_N only the dynamic read runs on tensor cores (the FMA kernels take the rest)
    specs = [s for m, n in SHAPES[np_] for s in triton_tc.static_gate_specs(n, m, d, dtype, launched_only=False)
             if n > FMA_MAX_N or s["kernel"].startswith("read_dynamic")]
    chosen = {}
    for key in keys or triton_tc.LAUNCH_KEYS:
        variants = [s for s in specs if s["launch"] == key]  # e.g. the write's static and dynamic kernels, per shape
        if not variants:
            raise ValueError(f"no kernel has the launch key {key!r} at NP={np_}")
        for bd, warps in CANDIDATES:
            if not triton_tc.launch_allowed(np_, key, bd, warps):
                continue
            ok = True
            for spec in variants:
                spec = dict(spec, num_warps=warps, constexprs=dict(spec["constexprs"], BD=bd))
                r = gate.compile_one(spec)
                ok = (r.get("spill_stores") == 0 and r.get("spill_loads") == 0
                      and r.get("smem_bytes", 1 << 30) <= gate.SMEM_LIMIT)
                print(f"  NP={np_} {operands} {alignment} {spec['kernel']} n={spec['constexprs']['NS']} BD={bd} "
                      f"warps={warps}: {r.get('registers')} regs, {r.get('spill_stores')} B spill, "
                      f"{r.get('smem_bytes')} B smem", file=sys.stderr, flush=True)
                if not ok:
                    break
            if ok:
                chosen[key] = (bd, warps)
                break
        else:
            chosen[key] = None
    return chosen


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--np", type=int, action="append", choices=sorted(SHAPES), default=None)
    ap.add_argument("--operands", action="append", choices=("bf16", "fp32"), default=None)
    ap.add_argument("--alignment", action="append", choices=sorted(WIDTHS), default=None)
    ap.add_argument("--key", action="append", default=None, help="only these LAUNCH keys")
    args = ap.parse_args(argv)
    from vwn_transform.kernels import triton_tc

    unknown = sorted(set(args.key or ()) - set(triton_tc.LAUNCH_KEYS))
    if unknown:
        ap.error(f"--key {unknown}: expected some of {list(triton_tc.LAUNCH_KEYS)}")
    missing = False
    print("LAUNCH = {")
    for alignment in args.alignment or sorted(WIDTHS):
        for np_ in args.np or sorted(SHAPES):
            for operands in args.operands or ("bf16", "fp32"):
                chosen = search(np_, operands, alignment, args.key)
                # None is allowed for a batched kernel (its per-token form runs there), not for a per-token one
                missing |= any(v is None for k, v in chosen.items() if not k.endswith("_batched"))
                print(f"    ({np_}, {operands == 'bf16'}, {alignment == 'aligned'}): {chosen},", flush=True)
    print("}")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
