"""Time the launch parameters of the tensor-core GHC kernels (``kernels/triton_tc.py``) on a GPU: for each padded
slot count (NP 16, 32, 64 via (m, n) = (8, 16), (8, 32), (8, 64)), operand kind (bf16 state, fp32 state) and kernel
key of ``triton_tc.LAUNCH`` at an aligned slot width (D = 2048; the unaligned launches are not timed yet), every
candidate (BD, num_warps) is first checked for correctness at 577 tokens against
the fp64 reference (within twice the eager reference's own error, as ``gpu_check.py``'s parity), then timed at
16384 tokens (``triton.testing.do_bench`` median of the op that launches the kernel: a backward key times the
whole backward with the other keys at their table values). Prints, per key, the table's choice and the fastest
correct candidate; ``--out FILE`` writes every row as JSON.

Two phases, so a candidate that faults the GPU loses nothing else and the timings are not shared with compiles:

* ``check``: one process per (NP, operands, key), all at once (the first native compile of each candidate
  dominates; different CPU cores take different compiles). A process that dies (an illegal memory access kills
  the CUDA context) is restarted after the candidate it was running, which is marked ``crashed``.
* ``time``: one process per (NP, operands), one after the other, timing the candidates that passed (compiles
  now come from Triton's cache).

    python benchmarks/tc_launch_time.py --out /tmp/tc_launch.json          # on the GPU, ~2-3 minutes
    python benchmarks/tc_launch_time.py --np 64 --operands bf16 --key dynamic_fwd
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

CANDIDATES = [(256, 4), (256, 8), (128, 4), (128, 8), (64, 4), (64, 8), (64, 2), (32, 4), (32, 8), (32, 2), (16, 4),
              (16, 8), (16, 2)]
SHAPES = {16: (8, 16), 32: (8, 32), 64: (8, 64)}  # NP -> (m, n)
D = 2048
CHECK_TOKENS, TIME_TOKENS = 577, 16384
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if os.environ.get("VWN_LAUNCH_SMOKE") == "1":  # --smoke: the script itself on the CPU, through the interpreter
    D, CHECK_TOKENS, TIME_TOKENS = 64, 5, 9
KEY_OP = {"write_fwd": "write", "write_bwd": "write_backward", "read_fwd": "read_static",
          "read_bwd": "read_static_backward", "dynamic_fwd": "read_dynamic", "dynamic_fwd_batched": "read_dynamic",
          "write_fwd_batched": "write", "write_bwd_batched": "write_backward",
          "dynamic_bwd_coef": "read_dynamic_backward", "dynamic_bwd_dh": "read_dynamic_backward",
          "dynamic_bwd_dwg": "read_dynamic_backward"}


def _rel(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item() if a.numel() else 0.0


def _table(np_: int, bf16: bool) -> dict:
    """The launch table the host functions read at this script's slot width (D / m: aligned at D = 2048; --smoke's
    d = 8 is not)."""
    from vwn_transform.kernels import triton_common, triton_tc

    return triton_tc.LAUNCH[(np_, bf16, triton_common.aligned(D // SHAPES[np_][0]))]


@contextlib.contextmanager
def _with_launch(np_, bf16, key, bd, warps):
    """Within: one launch candidate, and for the write and dynamic read the kernel the key names (the per-token
    ``write_fwd`` / ``write_bwd`` / ``dynamic_fwd`` or their ``*_batched`` versions) at this NP."""
    from vwn_transform.kernels import triton_common, triton_tc

    table = _table(np_, bf16)
    old, per_token = table[key], set(triton_common.PER_TOKEN_TC)
    if key.endswith("_batched"):
        per_token.discard(np_)
    elif f"{key}_batched" in triton_tc.LAUNCH_KEYS:
        per_token.add(np_)
    table[key] = (bd, warps)
    try:
        with triton_common.per_token_tc(per_token):
            yield
    finally:
        table[key] = old


def child_check(np_, operands, key, candidates) -> None:
    """One JSON line per candidate; ``{"trying": ...}`` first, so the parent knows which one a crash hit."""
    import torch
    from ghc_kernels import op_calls

    from vwn_transform.kernels import reference as ref
    from vwn_transform.kernels import triton_tc as tc

    m, n = SHAPES[np_]
    dtype = torch.bfloat16 if operands == "bf16" else torch.float32
    _, ops = op_calls(CHECK_TOKENS, m, n, D, dtype, DEVICE)
    op = KEY_OP[key]
    want = ops[op](ref)
    exact = ops[op](ref, lambda t: t.double())
    for bd, warps in candidates:
        print(json.dumps(dict(trying=[bd, warps])), flush=True)
        row = dict(np=np_, operands=operands, key=key, bd=bd, warps=warps)
        try:
            with _with_launch(np_, operands == "bf16", key, bd, warps):
                got = ops[op](tc)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            ratios = []  # per output: error against fp64 over the allowed error
            for a, w, e in zip(got, want, exact):
                err, limit = _rel(a, e), 2 * _rel(w, e) + (2e-5 if dtype == torch.float32 else 1e-6)
                ratios.append(err / limit if bool(torch.isfinite(a).all()) else float("inf"))
            row.update(status="ok" if max(ratios) <= 1 else "wrong", err_over_limit=ratios)
        except Exception as e:  # noqa: BLE001 - a launch that does not compile (resources) is a row
            row.update(status="error", error=repr(e)[:200])
            if "illegal" in repr(e) or "CUDA error" in repr(e):
                print(json.dumps(row), flush=True)
                sys.exit(3)  # the context is gone
        print(json.dumps(row), flush=True)


def child_time(np_, operands, plan) -> None:
    import torch
    from ghc_kernels import op_calls, timer

    from vwn_transform.kernels import triton_tc as tc

    bench = timer(DEVICE)
    m, n = SHAPES[np_]
    dtype = torch.bfloat16 if operands == "bf16" else torch.float32
    _, ops = op_calls(TIME_TOKENS, m, n, D, dtype, DEVICE)
    for key, candidates in plan.items():
        op = KEY_OP[key]
        for bd, warps in candidates:
            try:
                with _with_launch(np_, operands == "bf16", key, bd, warps):
                    ms = bench(lambda: ops[op](tc))
                row = dict(np=np_, operands=operands, key=key, bd=bd, warps=warps, ms=ms)
            except Exception as e:  # noqa: BLE001
                row = dict(np=np_, operands=operands, key=key, bd=bd, warps=warps, error=repr(e)[:200])
            print(json.dumps(row), flush=True)


def _lines(text):
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                pass


def _save(path, check, timed) -> None:
    """Every row so far (called after each process: a run stopped at its limit keeps what it finished)."""
    if path:
        with open(path, "w") as f:
            json.dump(dict(check=check, time=timed), f, indent=1)


def check_all(jobs, timeout, path=None) -> list[dict]:
    """Run the check children side by side; restart a dead one after the candidate that killed it."""
    from vwn_transform.kernels import triton_tc

    # tiles above 8192 values exceed the registers at any warp count; batched kernels at most one warp per token
    rows, pending = [], {job: [c for c in CANDIDATES if triton_tc.launch_allowed(job[0], job[2], *c)] for job in jobs}
    deadline = time.time() + timeout
    while pending and time.time() < deadline:
        procs = {}
        for job, cands in pending.items():
            cmd = [sys.executable, os.path.abspath(__file__), "--child", "check", "--np", str(job[0]), "--operands",
                   job[1], "--key", job[2], "--candidates", json.dumps(cands)]
            procs[job] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        nxt = {}
        for job, proc in procs.items():
            try:
                out, _ = proc.communicate(timeout=max(1.0, deadline - time.time()))
            except subprocess.TimeoutExpired:
                proc.kill()
                out, _ = proc.communicate()
            done, trying = set(), None
            for row in _lines(out):
                if "trying" in row:
                    trying = tuple(row["trying"])
                else:
                    rows.append(row)
                    done.add((row["bd"], row["warps"]))
            if proc.returncode != 0 and trying is not None and trying not in done:
                rows.append(dict(np=job[0], operands=job[1], key=job[2], bd=trying[0], warps=trying[1],
                                 status="crashed", error=out.strip().splitlines()[-1][:200] if out.strip() else ""))
                done.add(trying)
            _save(path, rows, [])
            bad = [f"{r['bd']}x{r['warps']} {r['status']}" for r in rows if (r["np"], r["operands"], r["key"]) == job
                   and r.get("status") != "ok"]
            print(f"[tc_launch_time] checked NP={job[0]} {job[1]} {job[2]}: {len(done)} candidates, not correct: "
                  f"{', '.join(bad) or '-'}", flush=True)
            left = [c for c in pending[job] if c not in done]
            if proc.returncode != 0 and left:
                nxt[job] = left
        pending = nxt
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--np", type=int, action="append", choices=sorted(SHAPES), default=None)
    ap.add_argument("--operands", action="append", choices=("bf16", "fp32"), default=None)
    ap.add_argument("--key", action="append", default=None, help="kernel keys of triton_tc.LAUNCH (default: all)")
    ap.add_argument("--out", default=None, help="JSON file for every row")
    ap.add_argument("--timeout", type=float, default=150, help="seconds for the check phase")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU through the Triton interpreter")
    ap.add_argument("--child", choices=("check", "time"), default=None, help=argparse.SUPPRESS)
    ap.add_argument("--candidates", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child == "check":
        child_check(args.np[0], args.operands[0], args.key[0], [tuple(c) for c in json.loads(args.candidates)])
        return 0
    if args.child == "time":
        child_time(args.np[0], args.operands[0], {k: [tuple(c) for c in v] for k, v in
                                                   json.loads(args.candidates).items()})
        return 0

    import torch

    if args.smoke:
        os.environ.update(VWN_LAUNCH_SMOKE="1", TRITON_INTERPRET="1")  # read by the child processes
    elif not torch.cuda.is_available():
        print("no CUDA device: this script times kernels on a GPU (tc_launch_search.py compiles them without one)",
              file=sys.stderr)
        return 2
    from vwn_transform.kernels import triton_tc

    keys = args.key or list(triton_tc.LAUNCH_KEYS)
    bad = [k for k in keys if k not in KEY_OP]
    if bad:
        ap.error(f"--key {bad}: expected some of {list(KEY_OP)}")
    groups = [(np_, ops) for np_ in args.np or sorted(SHAPES) for ops in args.operands or ("bf16", "fp32")]
    t0 = time.time()
    # a batched kernel only where it has a launch (triton_tc.LAUNCH None: the per-token one runs there)
    launched = lambda np_, ops, k: _table(np_, ops == "bf16")[k] is not None  # noqa: E731
    rows = check_all([(np_, ops, k) for np_, ops in groups for k in keys if launched(np_, ops, k)], args.timeout,
                     args.out)
    print(f"[tc_launch_time] check phase: {len(rows)} candidates in {time.time() - t0:.0f} s", flush=True)
    timed = []
    for np_, ops in groups:
        plan = {k: [(r["bd"], r["warps"]) for r in rows if (r["np"], r["operands"], r["key"]) == (np_, ops, k)
                    and r.get("status") == "ok"] for k in keys}
        cmd = [sys.executable, os.path.abspath(__file__), "--child", "time", "--np", str(np_), "--operands", ops,
               "--candidates", json.dumps(plan)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        timed += list(_lines(proc.stdout))
        _save(args.out, rows, timed)
        if proc.returncode:
            print(proc.stderr[-2000:], file=sys.stderr)
    print(f"[tc_launch_time] time phase done at {time.time() - t0:.0f} s", flush=True)
    print("\n| NP | operands | kernel | table (BD, warps): ms | fastest correct: ms | not correct |")
    print("|---|---|---|---|---|---|")
    for np_, ops in groups:
        for k in keys:
            table = _table(np_, ops == "bf16")[k]
            mine = [r for r in timed if (r["np"], r["operands"], r["key"]) == (np_, ops, k) and "ms" in r]
            cur = next((r["ms"] for r in mine if table and (r["bd"], r["warps"]) == tuple(table)), None)
            best = min(mine, key=lambda r: r["ms"], default=None)
            failed = [f"{r['bd']}x{r['warps']} {r['status']}" for r in rows
                      if (r["np"], r["operands"], r["key"]) == (np_, ops, k) and r.get("status") != "ok"]
            cur_text = "-" if cur is None else f"{cur:.3f}"
            best_text = "-" if best is None else "({}, {}): {:.3f}".format(best["bd"], best["warps"], best["ms"])
            print(f"| {np_} | {ops} | {k} | {table}: {cur_text} | {best_text} | {', '.join(failed) or '-'} |",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
