"""Static gate for the Triton GHC kernels, no GPU needed: compile every shipped kernel for sm_90a (H100/H200) on
the CPU, with the launch parameters its launcher uses, and read registers, spills, shared memory and tensor-core
instructions (``shared/spec/gpu-kernels.md`` section 4).

Per kernel: ``triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32))``
(pointers and integer arguments divisible by 16 specialized as the JIT specializes them at a launch), then the
bundled ``ptxas -v --gpu-name=sm_90a`` on the PTX (registers, spill stores/loads), ``metadata.shared`` (shared
memory per program) and a count of ``mma.sync``/``wgmma`` instructions in the PTX. Exit status 1 on any spill, on
more than 100 KB of shared memory per program, or on a compile that failed or timed out.

Shapes: (m, n) in {(1,4), (2,3), (4,4), (8,16), (8,64), (16,64)}, D in {2048, 4096, 2040} (slot width d = D/m;
D = 2040 gives a d that is not a multiple of 16 at every m above, which Triton compiles with scalar loads and the
launchers give narrower chunks: ``triton_common.aligned``), bf16 and fp32 states, 16384 tokens. ``--odd`` adds
slot counts between the powers of two, where the padding masks change what ptxas keeps in registers.
``--kernels dispatched`` (default) compiles what ``VWN_IMPL=triton`` runs at each (m, n): the FMA kernels
("fma-v1") where they run, the tensor-core kernels ("tc-v1") for the rest; ``--kernels tc`` the tensor-core
kernels everywhere; ``--kernels all`` both families wherever they compile.
(The first, padded ``tl.dot`` kernels, "padded-dot-v1", failed this gate everywhere; their figures are in
``benchmarks/NOTES.md``.) Identical compiles (same kernel, constexprs and argument types) are done once.

Usage::

    python benchmarks/kernel_static_check.py                   # everything (minutes; a cold Triton cache more)
    python benchmarks/kernel_static_check.py --quick           # the CI subset (tests/test_static_gate.py)
    python benchmarks/kernel_static_check.py --odd --D 2040    # odd slot counts, unaligned slot widths too
    python benchmarks/kernel_static_check.py --only write_fwd --slots 2,3 --D 2048 --dtype bf16 --json out.json

Must run without ``TRITON_INTERPRET=1`` (the interpreter replaces compilation): run as a program, it unsets it.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import re
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

SLOTS = [(1, 4), (2, 3), (4, 4), (8, 16), (8, 64), (16, 64)]  # (m, n)
ODD_SLOTS = [(3, 5), (5, 7), (3, 9), (3, 12), (8, 17), (8, 33), (12, 40)]  # --odd
WIDTHS = [2048, 4096, 2040]  # 2040: an unaligned slot width at every m of SLOTS
DTYPES = ["bf16", "fp32"]
TOKENS = 16384
SMEM_LIMIT = 100 * 1024
# --quick (CI): what runs at (2,3) (the FMA kernels) and at (8,64) (the tensor-core ones), bf16 (each compiles in
# seconds)
QUICK = dict(slots=[(2, 3), (8, 64)], widths=[2048], dtypes=["bf16"], only=["[fma", "[tc"])


# ----------------------------------------------------------------------------------------------------------------
# what the launchers launch
# ----------------------------------------------------------------------------------------------------------------
def kernel_specs(m: int, n: int, d: int, dtype: str, which: str = "dispatched") -> list[dict]:
    """The kernels ``VWN_IMPL=triton`` launches at (m, n, d, dtype) (``which="dispatched"``: the FMA kernels where
    they run, the tensor-core ones for the rest); ``"tc"``: the tensor-core kernels; ``"all"``: both families
    wherever they compile, including shapes the dispatcher keeps them from (e.g. the FMA dynamic read at (8, 8),
    whose gate values spill)."""
    from vwn_transform.kernels import triton_read_fma, triton_tc, triton_write_fma
    from vwn_transform.kernels.measured import kernel_id

    tc = triton_tc.static_gate_specs(n, m, d, dtype)
    if which == "tc":
        return tc
    fma = []
    if triton_write_fma.supports(n, m):
        fma += triton_write_fma.static_gate_specs(n, m, d, dtype)
    if triton_read_fma.supports(n, m):
        fma += triton_read_fma.static_gate_specs(n, m, d, dtype, dynamic=True if which == "all" else None)
    if which == "all":
        return fma + tc
    # the family that runs each op here, as the dispatcher decides it (kernels.measured.kernel_id)
    runs = {prefix: kernel_id(op, m, n) for prefix, op in (("write_", "write"), ("read_static", "read_static"),
                                                            ("read_dynamic", "read_dynamic"))}

    def dispatched(spec: dict) -> bool:
        # a spec's "ids": the kernel ids it runs under (e.g. one backward behind two forwards), else its name's
        name, ids = spec["kernel"], spec.get("ids")
        return any(name.startswith(prefix) and (family in ids if ids else f"[{family}" in name)
                   for prefix, family in runs.items())

    return [s for s in fma + tc if dispatched(s)]


# ----------------------------------------------------------------------------------------------------------------
# compile + ptxas
# ----------------------------------------------------------------------------------------------------------------
def _signature(spec: dict):
    """(signature, constexprs, attrs) as the JIT would specialize a launch with these arguments."""
    fn = spec["fn"]
    constexprs = dict(spec["constexprs"])
    signature, attrs = {}, {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        value = spec["args"][name]
        if isinstance(value, str):  # a pointer: tensors from torch are 16-byte aligned
            signature[name] = value
            attrs[(fn.arg_names.index(name),)] = [["tt.divisibility", 16]]
        elif isinstance(value, bool) or isinstance(value, float):
            signature[name] = "fp32"
        elif value == 1:  # the JIT turns integer arguments equal to 1 into constants
            signature[name] = "constexpr"
            constexprs[name] = 1
        else:
            signature[name] = "i32" if abs(value) < 2 ** 31 else "i64"
            if value % 16 == 0:
                attrs[(fn.arg_names.index(name),)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs


def _ptxas() -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no ptxas at {path} (the triton wheel bundles one)")
    return path


def parse_ptxas(text: str) -> dict:
    """Registers and spill bytes from ``ptxas -v`` output."""
    regs = re.search(r"Used (\d+) registers", text)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    if regs is None or spill is None:
        raise ValueError(f"unexpected ptxas output: {text!r}")
    return dict(registers=int(regs.group(1)), spill_stores=int(spill.group(1)), spill_loads=int(spill.group(2)))


def count_mma(ptx: str) -> int:
    return len(re.findall(r"^\s*(?:@!?%p\d+\s+)?(?:mma\.sync|wgmma\.mma_async)", ptx, flags=re.M))


def compile_one(spec: dict) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if not hasattr(spec["fn"], "arg_names") or type(spec["fn"]).__name__ == "InterpretedFunction":
        raise RuntimeError("the kernels were imported under TRITON_INTERPRET=1; run this script as a program")
    signature, constexprs, attrs = _signature(spec)
    t0 = time.time()
    k = triton.compile(ASTSource(spec["fn"], signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=spec["num_warps"], num_stages=spec["num_stages"]))
    ptx = k.asm["ptx"]
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        out = subprocess.run([_ptxas(), "-v", "--gpu-name=sm_90a", src, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True, check=True)
    stats = parse_ptxas(out.stdout + out.stderr)
    return dict(**stats, smem_bytes=int(k.metadata.shared), mma_instructions=count_mma(ptx),
                v4_loads=len(re.findall(r"ld\.global(?:\.\w+)*\.v4", ptx)), seconds=round(time.time() - t0, 1))


def _child(spec, queue):
    try:
        queue.put(("ok", compile_one(spec)))
    except BaseException as e:  # noqa: BLE001 - reported as a failed row
        queue.put(("error", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]))


def compile_with_timeout(spec: dict, timeout: float) -> dict:
    """compile_one in a forked child, so a compile that runs away costs ``timeout`` seconds, not the run."""
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(spec, queue))
    proc.start()
    try:
        status, result = queue.get(timeout=timeout)
    except Exception:  # queue.Empty: timed out
        status, result = "error", f"timeout after {timeout:.0f} s"
    proc.join(5)
    if proc.is_alive():
        proc.kill()
        proc.join()
    return result if status == "ok" else dict(error=result)


# ----------------------------------------------------------------------------------------------------------------
def _slots(text: str) -> list[tuple[int, int]]:
    """``"m,n;m,n"`` -> [(m, n), ...], each within the kernels' range (1 <= m <= 16, 1 <= n <= 64)."""
    from vwn_transform.kernels.triton_common import MAX_M, MAX_N

    out = []
    for part in text.split(";"):
        try:
            m, n = (int(x) for x in part.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{part!r}: expected two integers 'm,n', e.g. '2,3;8,64'") from None
        if not (1 <= m <= MAX_M and 1 <= n <= MAX_N):
            raise argparse.ArgumentTypeError(f"(m, n) = ({m}, {n}): the kernels cover 1 <= m <= {MAX_M}, "
                                             f"1 <= n <= {MAX_N}")
        out.append((m, n))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="the CI subset: the dispatched kernels at (2,3) "
                                                         "and (8,64), D=2048, bf16")
    ap.add_argument("--kernels", choices=("dispatched", "tc", "all"), default="dispatched")
    ap.add_argument("--only", action="append", default=None, help="kernel name prefix/substring (repeatable)")
    ap.add_argument("--slots", type=_slots, default=None, help='(m, n) pairs: "2,3;8,64"')
    ap.add_argument("--odd", action="store_true", help=f"add the odd slot counts {ODD_SLOTS}")
    ap.add_argument("--D", type=int, action="append", default=None)
    ap.add_argument("--dtype", action="append", choices=DTYPES, default=None)
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per compile")
    ap.add_argument("--json", default=None, help="write the rows as a JSON list to this file")
    args = ap.parse_args(argv)

    slots, widths, dtypes, only = SLOTS, WIDTHS, DTYPES, None
    if args.quick:
        slots, widths, dtypes, only = QUICK["slots"], QUICK["widths"], QUICK["dtypes"], QUICK["only"]
    slots = (args.slots or slots) + (ODD_SLOTS if args.odd else [])
    widths = args.D or widths
    dtypes = args.dtype or dtypes
    only = args.only or only
    too_narrow = [(D, m) for D in widths for m, _ in slots if D < m]
    if too_narrow:
        ap.error(f"--D {too_narrow[0][0]} is narrower than m = {too_narrow[0][1]} slots (d = D/m must be >= 1)")

    rows, done = [], {}
    for m, n in slots:
        for D in widths:
            d = D // m
            for dtype in dtypes:
                for spec in kernel_specs(m, n, d, dtype, args.kernels):
                    if only and not any(o in spec["kernel"] for o in only):
                        continue
                    sig, consts, _ = _signature(spec)
                    key = (spec["kernel"], spec["fn"].__name__, tuple(sorted(sig.items())),
                           tuple(sorted((k, str(v)) for k, v in consts.items())), spec["num_warps"],
                           spec["num_stages"], d % 16 == 0)
                    if key not in done:
                        done[key] = compile_with_timeout(spec, args.timeout)
                    result = done[key]
                    row = dict(kernel=spec["kernel"], m=m, n=n, D=D, dtype=dtype,
                               registers=result.get("registers"), spill_bytes=result.get("spill_stores"),
                               smem_bytes=result.get("smem_bytes"), mma_instructions=result.get("mma_instructions"),
                               spill_loads=result.get("spill_loads"), v4_loads=result.get("v4_loads"),
                               num_warps=spec["num_warps"], num_stages=spec["num_stages"],
                               constexprs={k: v for k, v in spec["constexprs"].items()},
                               compile_seconds=result.get("seconds"), error=result.get("error"))
                    row["ok"] = (row["error"] is None and row["spill_bytes"] == 0 and row["spill_loads"] == 0
                                 and row["smem_bytes"] <= SMEM_LIMIT)
                    rows.append(row)
                    print(f"  {row['kernel']} (m,n)=({m},{n}) D={D} {dtype}: "
                          + (row["error"] or f"{row['registers']} regs, {row['spill_bytes']} B spill, "
                                              f"{row['smem_bytes'] // 1024} KB smem"), file=sys.stderr, flush=True)

    print("| kernel | (m,n) | D | dtype | registers | spill stores B | smem KB | mma | ld.v4 | gate |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|---|")
    for r in rows:
        if r["error"]:
            print(f"| {r['kernel']} | ({r['m']},{r['n']}) | {r['D']} | {r['dtype']} | | | | | | FAIL: {r['error']} |")
            continue
        print(f"| {r['kernel']} | ({r['m']},{r['n']}) | {r['D']} | {r['dtype']} | {r['registers']} | "
              f"{r['spill_bytes']} | {r['smem_bytes'] / 1024:.0f} | {r['mma_instructions']} | {r['v4_loads']} | "
              f"{'ok' if r['ok'] else 'FAIL'} |")
    failed = [r for r in rows if not r["ok"]]
    print(f"\n{len(rows)} rows ({len(done)} compiles), {len(failed)} failing the gate (spills, "
          f"> {SMEM_LIMIT // 1024} KB shared memory per program, or no compile)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if not rows:
        print("no kernel matched the filters", file=sys.stderr)
        return 2
    return 1 if failed else 0


if __name__ == "__main__":
    # before the kernel modules are imported (main imports them): compiling needs the real jit, not the
    # interpreter's (the variable is read when a kernel is decorated)
    os.environ.pop("TRITON_INTERPRET", None)
    sys.exit(main())
