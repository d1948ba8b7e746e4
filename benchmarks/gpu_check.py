"""One GPU command: device check, native-kernel parity, kernel table and end-to-end training steps, each stage in
its own process under its own timeout (a hang or crash loses one stage), results under ``--out DIR``.

Stages (timeouts in seconds, each a maximum: under 10 minutes in all; the first full run on the H200 took
168 s, before the batched A/B rows and the profile stage):

* ``env`` (30): device, torch/triton versions, device copy GB/s, bf16 GEMM TFLOP/s.
* ``parity`` (150): every GHC op forward and backward through the kernels ``VWN_IMPL=triton`` runs (native
  Triton), against the plain-PyTorch reference and an fp64 reference: (1,4), (2,3), (8,16), (8,32) (where the
  batched tensor-core write backward runs), (8,64), bf16 and fp32, 577 and 16384 tokens, D=2048, and (2,3),
  (3,12), (8,64) at 577 tokens and D=2040 (slot widths that are not multiples of 16: ``triton_common.aligned``):
  each output within twice the reference's own error against fp64 (at least 2e-5 relative for fp32 outputs). One
  process per (m, n), dtype and width, all at once: the first native compile of
  each kernel dominates this stage, and the compiles of different shapes then run on different CPU cores (the
  later stages find them in Triton's cache). Failures are marked; timing goes on.
* ``kernels`` (120): per op and (m, n) in (1,4), (2,3), (8,16), (8,64) at D=2048, 16384 tokens, bf16: eager
  reference and ours (``--inductor``: also the inductor-compiled reference), forward and forward+backward ms
  (``triton.testing.do_bench`` median), GB/s and % of the byte floor at the measured copy bandwidth, and the
  kernel id that ran. Where the tensor-core write and dynamic read run their per-token kernels ("tc-v1"), the
  batched ones ("tc-v2") are checked (parity) and timed (kernels) beside them, same process and inputs
  (``--no-batched-ab``: not).
  With ``liger_kernel`` importable, its mHC pre/post at n=4 as an anchor row.
* ``e2e`` (90): Llama D=2048, 4 layers, batch 4 x 2048, bf16, AdamW, eager: baseline, r=1.5 (2,3), r=4 (2,8),
  r=8 (8,64), each widened model with the reference ops and with ours: step ms (median of 5 after 2 warm-up),
  overhead vs the baseline measured in the same stage, peak GiB.
* ``profile`` (45): one profiled training step of the baseline and of r=1.5 (2,3) with ours, device time per
  kernel name, sorted by what the widened step adds: where the overhead goes (the top rows in the summary).
* ``compiled`` (150): the same step under ``torch.compile`` for the baseline (inductor) and r=1.5 (reference and
  ours, each under inductor and under ``backend="vwn"``).

Each stage writes ``DIR/<stage>.json`` and ``DIR/<stage>.log``, and its rows as they finish to
``DIR/<stage>.partial.json``, so a stage stopped at its timeout (a first native compile can take tens of
seconds) still reports what it finished; ``--timeout STAGE=SECONDS`` overrides one. The
parent prints one compact table last, writes it to ``DIR/summary.md`` and appends it, with the device and
versions, to ``benchmarks/RESULTS.md``.

Usage::

    python benchmarks/gpu_check.py --out /tmp/gpu                    # on the GPU
    python benchmarks/gpu_check.py --out /tmp/gpu --only kernels --slots "2,3;8,64" --timeout kernels=200
    TRITON_INTERPRET=1 python benchmarks/gpu_check.py --out /tmp/smoke --smoke   # the script itself, on the CPU
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
# benchmarks/ helpers only: vwn_transform is imported as installed (`pip install .` or the editable install of the
# Makefile). The repository root is deliberately not put on sys.path: its vwn_transform/ folder lacks the kernels/
# and passes/ subpackages, which the install maps in.
sys.path.insert(0, HERE)

STAGES = {"env": 30, "parity": 150, "kernels": 120, "e2e": 90, "profile": 45, "compiled": 150}
# unaligned_parity: parity also at a slot width d = D/m that is not a multiple of 16 (scalar loads, narrower chunks:
# triton_common.aligned), fewer tokens
FULL = dict(tokens=(577, 16384), D=2048, slots=[(1, 4), (2, 3), (8, 16), (8, 64)], parity_slots=[(1, 4), (2, 3),
            (8, 16), (8, 32), (8, 64)], unaligned_parity=dict(D=2040, tokens=(577,), slots=[(2, 3), (3, 12), (8, 64)]),
            e2e=dict(hidden=2048, layers=4, batch=4, seq=2048, heads=16, vocab=32000))
SMOKE = dict(tokens=(1, 33), D=48, slots=[(1, 4), (2, 3)], parity_slots=[(2, 3), (1, 4)],
             unaligned_parity=dict(D=40, tokens=(33,), slots=[(2, 3)]),
             e2e=dict(hidden=48, layers=2, batch=2, seq=16, heads=2, vocab=128))
E2E_CASES = [("baseline", None, None), ("r=1.5 (2,3)", 1.5, None), ("r=4 (2,8)", 4, 2), ("r=8 (8,64)", 8, 8)]


class Rows(list):
    """A stage's result rows, also written to ``DIR/<stage>.partial.json`` at every append: a stage killed at its
    timeout (a long Triton compile, a hang) still reports the rows it finished."""

    path: str | None = None

    def append(self, row) -> None:
        super().append(row)
        if Rows.path:
            with open(Rows.path, "w") as f:
                json.dump(list(self), f, default=str)


def _sizes(args):
    return SMOKE if args.smoke else FULL


def _device():
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# ---------------------------------------------------------------------------------------------------------------
# stages (each runs in its own process and returns a JSON-able dict)
# ---------------------------------------------------------------------------------------------------------------
def stage_env(args) -> dict:
    import torch
    import triton
    from ghc_kernels import copy_bandwidth, timer

    device = _device()
    bench = timer(device)
    size = 8192 if device == "cuda" else 256
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    ms = bench(lambda: a @ a)
    return dict(device=torch.cuda.get_device_name() if device == "cuda" else "CPU (smoke run)",
                torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda,
                copy_gbs=copy_bandwidth(device, bench) / 1e9, gemm_tflops=2 * size ** 3 / (ms * 1e-3) / 1e12)


def _op_outputs(lib, case, cast):
    """Every op forward and backward of ``lib`` on one case: {name: tuple of tensors}."""
    h, z, p, gx, gcc, gwc, gout, cc, wc = (case[k] for k in ("h", "z", "p", "gx", "gcc", "gwc", "gout", "cc", "wc"))
    from ghc_kernels import read_params

    P = read_params(p)
    hh, zz, gxx, gg = cast(h), cast(z), cast(gx), cast(gout)
    fwd = lib.read_dynamic(hh, *P, 1e-6)
    stats = case["stats"].to(fwd[3].dtype)  # both backwards from the same statistics
    wr = lib.write_read_dynamic(hh, zz, cc, wc, *P, 1e-6)
    return {
        "read_dynamic": fwd, "read_dynamic_bwd": lib.read_dynamic_backward(hh, *P, 1e-6, stats, gxx, gcc, gwc),
        "read_static": (lib.read_static(hh, p["read"]),),
        "read_static_bwd": lib.read_static_backward(hh, p["read"], gxx),
        "write": (lib.write(hh, zz, cc, wc),), "write_bwd": lib.write_backward(hh, zz, cc, wc, gg),
        "write_read_dynamic": wr[:1] + wr[2:4],
        "write_read_dynamic_bwd": lib.write_read_dynamic_backward(
            hh, zz, cc, wc, *P, 1e-6, cast(case["h_new"]), case["stats_new"], gg, gxx, gcc, gwc),
    }


def batched_tc():
    """Within: the tensor-core write and dynamic read take their batched kernels ("tc-v2") at every slot count."""
    from vwn_transform.kernels.triton_common import per_token_tc

    return per_token_tc(set())


def _batched_ops(m: int, n: int) -> tuple[str, ...]:
    """The ops (and their ``_bwd`` names) whose kernels at (m, n) change when the batched tensor-core kernels are
    switched on: there the per-token ones ("tc-v1") run now, and the batched ones are checked and timed beside
    them (``--no-batched-ab``: not). Derived from ``kernel_id``, so it follows the dispatch."""
    from vwn_transform.kernels.measured import OPS, kernel_id

    now = {op: kernel_id(op, m, n) for op in OPS}
    with batched_tc():
        changed = [op for op in OPS if kernel_id(op, m, n) != now[op]]
    return tuple(name for op in changed for name in (op, f"{op}_bwd"))


def stage_parity(args) -> dict:
    import torch
    from ghc_kernels import make_case, read_params

    from vwn_transform.kernels import reference as ref
    from vwn_transform.kernels import triton_ops as tri
    from vwn_transform.kernels.measured import kernel_id

    sizes, device = _sizes(args), _device()
    rows = Rows()
    dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32}
    shape = sizes["unaligned_parity"] if args.unaligned else dict(sizes, slots=sizes["parity_slots"])
    D = shape["D"]
    for m, n, N in [(m, n, N) for m, n in args.slots or shape["slots"] for N in shape["tokens"]]:
        for dtype in [dtypes[args.dtype]] if args.dtype else dtypes.values():
            d, h, z, p = make_case(N, m, n, D, dtype, device)
            g = torch.Generator(device="cpu").manual_seed(1)
            rnd = lambda *s: torch.randn(*s, generator=g).to(device)  # noqa: E731
            case = dict(h=h, z=z, p=p, gx=rnd(N, m, d).to(dtype), gcc=rnd(N, n, n), gwc=rnd(N, n, m),
                        gout=rnd(N, n, d).to(dtype), cc=rnd(N, n, n), wc=rnd(N, n, m))
            P = read_params(p)
            case["stats"] = ref.read_dynamic(h, *P, 1e-6)[3]
            case["h_new"] = ref.write(h, z, case["cc"], case["wc"])
            case["stats_new"] = ref.read_dynamic(case["h_new"], *P, 1e-6)[3]
            try:
                got = _op_outputs(tri, case, lambda t: t)
            except Exception as e:  # noqa: BLE001 - a failed op is a row, the stage goes on
                rows.append(dict(op="*", m=m, n=n, D=D, dtype=str(dtype), N=N, ok=False, error=repr(e)[:300]))
                continue
            want = _op_outputs(ref, case, lambda t: t)
            exact = _op_outputs(ref, case, lambda t: t.double())
            batched_ops = _batched_ops(m, n) if args.batched_ab else ()
            if batched_ops:  # the batched kernels beside the per-token ones, as rows "<op>[tc-v2]"
                try:
                    with batched_tc():
                        batched = _op_outputs(tri, case, lambda t: t)
                except Exception as e:  # noqa: BLE001
                    rows.append(dict(op="*[tc-v2]", m=m, n=n, D=D, dtype=str(dtype), N=N, ok=False,
                                     error=repr(e)[:300]))
                else:
                    for op in batched_ops:
                        got[f"{op}[tc-v2]"] = batched[op]
                        want[f"{op}[tc-v2]"], exact[f"{op}[tc-v2]"] = want[op], exact[op]
            for op in want:
                worst, limit_worst, ok, errs = 0.0, 0.0, True, []
                for a, w, e in zip(got[op], want[op], exact[op]):
                    err = _rel(a, e)
                    # fp32 outputs (all of an fp32 state's; a bf16 state's coefficients and their gradients):
                    # within 2e-5 at least. On the H200 the bf16 tensor-core sums of dL/dRead at (8, 16) came
                    # 2.4e-6 from fp64 where the eager reference was 3.6e-7 (the MMA's fp32 accumulation).
                    limit = (max(2e-5, 2 * _rel(w, e)) if a.dtype == torch.float32
                             else 2 * _rel(w, e) + 1e-6)
                    ok = ok and bool(torch.isfinite(a).all()) and a.shape == w.shape and err <= limit
                    worst, limit_worst = max(worst, err), max(limit_worst, limit)
                    errs.append((err, limit))  # per output: which one failed
                with batched_tc() if op.endswith("[tc-v2]") else contextlib.nullcontext():
                    kernel = kernel_id(op.removesuffix("[tc-v2]").removesuffix("_bwd"), m, n)
                rows.append(dict(op=op, m=m, n=n, D=D, dtype=str(dtype).removeprefix("torch."), N=N, ok=ok,
                                 rel_err=worst, limit=limit_worst, errs=errs, kernel=kernel))
    return dict(rows=rows, failed=sum(not r["ok"] for r in rows))


def _rel(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item() if a.numel() else 0.0


def stage_kernels(args) -> dict:
    import torch
    from ghc_kernels import OPS, byte_floors, copy_bandwidth, op_calls, timer

    from vwn_transform.kernels import reference as ref
    from vwn_transform.kernels import triton_ops as tri
    from vwn_transform.kernels.measured import kernel_id

    sizes, device = _sizes(args), _device()
    bench = timer(device)
    bandwidth = copy_bandwidth(device, bench)
    N, dtype = sizes["tokens"][-1], torch.bfloat16
    libs = {"eager": ref, "triton": tri}
    if args.inductor:
        names = OPS + tuple(op + "_backward" for op in OPS)
        libs["inductor"] = type("Inductor", (), {k: staticmethod(torch.compile(getattr(ref, k), dynamic=False))
                                                 for k in names})
    rows = Rows()
    for m, n in args.slots or sizes["slots"]:
        d, calls = op_calls(N, m, n, sizes["D"], dtype, device)
        ops = {op: (calls[op], calls[op + "_backward"]) for op in OPS}  # name: (forward, backward)
        batched = _batched_ops(m, n) if args.batched_ab else ()
        for op, (fwd, bwd) in ops.items():
            bytes_f, bytes_b = byte_floors(op, N, m, n, d, dtype.itemsize)  # gpu-kernels.md section 3
            # (impl, lib, dispatch): the batched kernels beside the per-token ones, same process and inputs
            variants = [(impl, lib, contextlib.nullcontext) for impl, lib in libs.items()]
            variants += [("triton-batched", tri, batched_tc)] if op in batched else []
            for impl, lib, dispatch in variants:
                try:
                    with dispatch():
                        ms_f = bench(lambda: fwd(lib))
                        ms_b = bench(lambda: bwd(lib))
                        kernel = kernel_id(op, m, n) if lib is tri else ""
                except Exception as e:  # noqa: BLE001
                    rows.append(dict(op=op, m=m, n=n, impl=impl, error=repr(e)[:300]))
                    continue
                floor_f, floor_fb = bytes_f / bandwidth * 1e3, (bytes_f + bytes_b) / bandwidth * 1e3
                rows.append(dict(op=op, m=m, n=n, D=sizes["D"], tokens=N, impl=impl, fwd_ms=ms_f,
                                 fwd_bwd_ms=ms_f + ms_b, fwd_gbs=bytes_f / (ms_f * 1e-3) / 1e9,
                                 fwd_floor_pct=100 * floor_f / ms_f, fwd_bwd_floor_pct=100 * floor_fb / (ms_f + ms_b),
                                 kernel=kernel))
    rows += _liger_anchor(args, bench, device)
    return dict(rows=rows, copy_gbs=bandwidth / 1e9)


def _liger_anchor(args, bench, device) -> list[dict]:
    """Liger-Kernel's mHC pre/post at n=4 beside our GHC at (1, 4), when liger_kernel is importable."""
    try:
        from liger_kernel.ops import mhc  # noqa: F401
    except Exception as e:  # noqa: BLE001 - not installed: a row saying so
        return [dict(op="liger mHC n=4", m=1, n=4, impl="liger", error=f"not measured: {type(e).__name__}")]
    return [dict(op="liger mHC n=4", m=1, n=4, impl="liger",
                 error="liger_kernel is importable but its mHC entry points are not wired into this check yet")]


def _llama(e2e, device):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=e2e["hidden"], intermediate_size=int(e2e["hidden"] * 2.75),
                      num_hidden_layers=e2e["layers"], num_attention_heads=e2e["heads"],
                      num_key_value_heads=e2e["heads"], vocab_size=e2e["vocab"], max_position_embeddings=e2e["seq"],
                      attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(device):  # initialized where it runs (a CPU init of ~340M parameters takes seconds)
        return LlamaForCausalLM(cfg).to(torch.bfloat16)


def _training_step(e2e, device, ids, ratio, m=None, backend=None):
    """One AdamW training step of the e2e Llama (widened at ``ratio`` with ``m`` unless None), eager or under
    ``torch.compile(backend=...)``, as a function; the model is built afresh on ``device``."""
    import torch

    import vwn_transform

    base = _llama(e2e, device)
    model = base if ratio is None else vwn_transform.widen(base, ratio, m=m)
    del base
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    run = model
    if backend:
        options = {"inner": "aot_eager"} if backend == "vwn" and device != "cuda" else None
        run = torch.compile(model, backend=backend, options=options)

    def step():
        run(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _steps(args, compiled: bool) -> dict:
    import torch

    from vwn_transform import ops

    sizes, device = _sizes(args), _device()
    e2e = sizes["e2e"]
    ids = torch.randint(0, e2e["vocab"], (e2e["batch"], e2e["seq"]), device=device)
    inductor = "inductor" if device == "cuda" else "aot_eager"
    if compiled:  # (model, ratio, m, ops, backend): the widened step under inductor and under backend="vwn"
        runs = [("baseline", None, None, "-", inductor)]
        runs += [("r=1.5 (2,3)", 1.5, None, impl, backend) for impl in args.impls.split(",")
                 for backend in (inductor, "vwn")]
    else:
        runs = [(name, ratio, m, impl, None) for name, ratio, m in E2E_CASES if _wanted(args, ratio)
                for impl in (["-"] if ratio is None else args.impls.split(","))]
    rows = Rows()
    for name, ratio, m, impl, backend in runs:
        step = _training_step(e2e, device, ids, ratio, m, backend)
        ops.set_impl(None if impl == "-" else impl)
        ops.reset_implementations_used()
        try:
            for _ in range(2):
                step()
            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            times = []
            for _ in range(5 if not args.smoke else 2):
                t0 = time.perf_counter()
                step()
                if device == "cuda":
                    torch.cuda.synchronize()
                times.append((time.perf_counter() - t0) * 1e3)
            peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device == "cuda" else float("nan")
            rows.append(dict(model=name, impl=impl, compiled=backend or False, step_ms=statistics.median(times),
                             peak_gib=peak, used=ops.implementations_used()))
        except Exception as e:  # noqa: BLE001
            rows.append(dict(model=name, impl=impl, compiled=backend or False, error=repr(e)[:300]))
        finally:
            ops.set_impl(None)
        del step
        if compiled:
            torch._dynamo.reset()  # each model compiles afresh, no recompile limit reached across models
        if device == "cuda":
            torch.cuda.empty_cache()
    return dict(rows=rows, shape=e2e)  # overheads against the baseline: summary()


def stage_profile(args) -> dict:
    """Where a widened step's extra time goes: one profiled training step (after 2 warm-up steps) of the baseline
    and of r=1.5 (2,3) with our kernels, device time summed per kernel name; rows sorted by widened minus
    baseline, so the top rows are the overhead (GHC kernels, small parameter ops, copies)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from vwn_transform import ops

    sizes, device = _sizes(args), _device()
    e2e = sizes["e2e"]
    ids = torch.randint(0, e2e["vocab"], (e2e["batch"], e2e["seq"]), device=device)
    activity = ProfilerActivity.CUDA if device == "cuda" else ProfilerActivity.CPU
    per_model = {}
    for name, ratio, impl in (("baseline", None, "-"), ("r=1.5 (2,3)", 1.5, "triton")):
        step = _training_step(e2e, device, ids, ratio)
        ops.set_impl(None if impl == "-" else impl)
        try:
            for _ in range(2):
                step()
            if device == "cuda":
                torch.cuda.synchronize()
            with profile(activities=[activity]) as prof:
                step()
                if device == "cuda":
                    torch.cuda.synchronize()
        finally:
            ops.set_impl(None)
        kernels = {}
        for ev in prof.key_averages():
            if device == "cuda":
                us = getattr(ev, "self_device_time_total", None)
                us = ev.self_cuda_time_total if us is None else us
            else:
                us = ev.self_cpu_time_total
            if us > 0:
                kernels[ev.key] = (us / 1e3, ev.count)
        per_model[name] = kernels
        del step
        if device == "cuda":
            torch.cuda.empty_cache()
    base, wide = per_model["baseline"], per_model["r=1.5 (2,3)"]
    rows = Rows()
    for key in sorted(set(base) | set(wide), key=lambda k: -(wide.get(k, (0, 0))[0] - base.get(k, (0, 0))[0])):
        (b_ms, b_n), (w_ms, w_n) = base.get(key, (0.0, 0)), wide.get(key, (0.0, 0))
        rows.append(dict(kernel=key[:120], baseline_ms=b_ms, widened_ms=w_ms, delta_ms=w_ms - b_ms,
                         baseline_calls=b_n, widened_calls=w_n))
    totals = {name: sum(ms for ms, _ in k.values()) for name, k in per_model.items()}
    calls = {name: sum(n for _, n in k.values()) for name, k in per_model.items()}
    return dict(rows=rows, device_ms=totals, calls=calls, shape=e2e)


def _wanted(args, ratio) -> bool:
    """``--ratios``: the e2e models to run (1 = the baseline, always run when it is listed or no list is given)."""
    if not args.ratios:
        return True
    return float(ratio or 1) in {float(r) for r in args.ratios.split(",")}


def stage_e2e(args) -> dict:
    return _steps(args, compiled=False)


def stage_compiled(args) -> dict:
    return _steps(args, compiled=True)


# ---------------------------------------------------------------------------------------------------------------
# parent: run each stage in its own process, then the summary
# ---------------------------------------------------------------------------------------------------------------
def summary(out: str, results: dict) -> str:
    env = results.get("env", {})
    lines = [f"### gpu_check {time.strftime('%Y-%m-%d %H:%M')}: {env.get('device', '?')}, torch "
             f"{env.get('torch', '?')}, triton {env.get('triton', '?')}", ""]
    if "copy_gbs" in env:
        lines.append(f"copy {env['copy_gbs']:.0f} GB/s, bf16 GEMM {env['gemm_tflops']:.0f} TFLOP/s")
    for stage, res in results.items():
        if "error" in res:
            lines.append(f"- stage {stage}: **{res['error'][:300]}** (logs: {out}/{stage}*.log)")
    par = results.get("parity", {}).get("rows", [])
    if par:
        bad = [r for r in par if not r["ok"]]
        lines.append(f"- parity: {len(par) - len(bad)}/{len(par)} op x shape x dtype x tokens rows pass"
                     + "".join(f"; FAIL {r['op']} ({r['m']},{r['n']}) D={r.get('D')} {r['dtype']} N={r['N']} "
                               f"{r.get('errs') or r.get('rel_err') or str(r.get('error'))[:120]}" for r in bad[:6]))
    kern = [r for r in results.get("kernels", {}).get("rows", []) if "fwd_ms" in r]
    if kern:
        lines += ["", "| op | (m,n) | impl | kernel | fwd ms | fwd+bwd ms | fwd % floor | fwd+bwd % floor |",
                  "|---|---|---|---|---:|---:|---:|---:|"]
        lines += [f"| {r['op']} | ({r['m']},{r['n']}) | {r['impl']} | {r['kernel']} | {r['fwd_ms']:.3f} | "
                  f"{r['fwd_bwd_ms']:.3f} | {r['fwd_floor_pct']:.0f}% | {r['fwd_bwd_floor_pct']:.0f}% |" for r in kern]
    steps = results.get("e2e", {}).get("rows", []) + results.get("compiled", {}).get("rows", [])
    if steps:
        lines += ["", "| model | ops | compiled | step ms | overhead | peak GiB | GHC ops ran as |",
                  "|---|---|---|---:|---:|---:|---|"]
        for r in steps:
            if "step_ms" not in r:
                lines.append(f"| {r['model']} | {r['impl']} | {r['compiled']} | {r['error'][:160]} | | | |")
                continue
            ran = ", ".join(f"{v} x{list(r['used'].values()).count(v)}" for v in sorted(set(r["used"].values())))
            # against the baseline of the same stage (eager or compiled), also when the stage stopped early
            base = next((b["step_ms"] for b in steps if b["model"] == "baseline" and "step_ms" in b
                         and (b["compiled"] is False) == (r["compiled"] is False)), None)
            overhead = f"{100 * (r['step_ms'] / base - 1):+.1f}%" if base else "-"
            lines.append(f"| {r['model']} | {r['impl']} | {r['compiled']} | {r['step_ms']:.1f} | "
                         f"{overhead} | {r['peak_gib']:.2f} | {ran or '-'} |")
    prof = results.get("profile", {})
    if prof.get("rows") and "device_ms" in prof:
        total, calls = prof["device_ms"], prof["calls"]
        lines += ["", "profiled step, device ms (calls): " + ", ".join(
            f"{name} {ms:.1f} ({calls.get(name, 0)})" for name, ms in total.items()),
            "", "| what r=1.5 adds: kernel | baseline ms (calls) | widened ms (calls) | delta ms |",
            "|---|---:|---:|---:|"]
        lines += [f"| {r['kernel'][:70]} | {r['baseline_ms']:.2f} ({r['baseline_calls']}) | {r['widened_ms']:.2f} "
                  f"({r['widened_calls']}) | {r['delta_ms']:+.2f} |" for r in prof["rows"][:15]]
    return "\n".join(lines) + "\n"


def _stage_files(out: str, stage: str, part: str | None) -> tuple[str, str, str]:
    """(result JSON, partial-rows JSON, log) of one stage process."""
    name = stage if part is None else f"{stage}.{part}"
    return (os.path.join(out, f"{name}.json"), os.path.join(out, f"{name}.partial.json"),
            os.path.join(out, f"{name}.log"))


def run_stage_child(args) -> int:
    fn = globals()[f"stage_{args.stage}"]
    path, Rows.path, _ = _stage_files(args.out, args.stage, args.part)
    try:
        result = fn(args)
    except Exception:  # noqa: BLE001 - the parent reports it
        result = dict(error=traceback.format_exc().strip().splitlines()[-1][:300])
        print(traceback.format_exc(), file=sys.stderr)
    with open(path, "w") as f:
        json.dump(result, f, indent=1, default=str)
    return 0


def _slots_text(slots) -> str:
    return ";".join(f"{m},{n}" for m, n in slots)


def _run_parts(out: str, stage: str, parts: dict, timeout: float) -> dict:
    """Run a stage's processes side by side under one deadline; merge their results. A process stopped at the
    deadline or crashed contributes the rows it finished (its partial JSON) and an error naming it."""
    procs = {}
    for part, cmd in parts.items():
        log = open(_stage_files(out, stage, part)[2], "w")
        procs[part] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log)
    deadline = time.time() + timeout
    merged, errors = {}, []
    for part, (proc, log) in procs.items():
        try:
            proc.wait(timeout=max(0.0, deadline - time.time()))
            stopped = False
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            stopped = True
        log.close()
        path, partial, _ = _stage_files(out, stage, part)
        if not stopped and os.path.exists(path):
            res = json.load(open(path))
        else:
            res = {"error": f"timed out after {timeout:.0f} s" if stopped else "crashed: no result"}
        if "error" in res and "rows" not in res and os.path.exists(partial):
            res["rows"] = json.load(open(partial))  # what the process finished before it was stopped
            res["error"] += f" ({len(res['rows'])} rows finished, kept)"
        if "error" in res:
            errors.append(res["error"] if part is None else f"{part}: {res['error']}")
        for key, value in res.items():
            if key == "rows":
                merged.setdefault("rows", []).extend(value)
            elif key not in ("error", "failed"):
                merged[key] = value
    if "rows" in merged:
        merged["failed"] = sum(not r.get("ok", True) for r in merged["rows"])
    if errors:
        merged["error"] = "; ".join(errors)
    return merged


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for the per-stage JSON, logs and summary.md")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (needs TRITON_INTERPRET=1)")
    ap.add_argument("--only", action="append", choices=list(STAGES), default=None, help="run only these stages")
    ap.add_argument("--slots", default=None, help='(m, n) pairs for parity/kernels, e.g. "2,3;8,64"')
    ap.add_argument("--inductor", action="store_true", help="kernels: also the inductor-compiled reference")
    ap.add_argument("--ratios", default=None, help='e2e: the models to run, e.g. "1,1.5,4" (1: the baseline)')
    ap.add_argument("--impls", default="reference,triton",
                    help='e2e/compiled: the GHC implementations of the widened models (VWN_IMPL values, '
                         'e.g. "reference,auto")')
    ap.add_argument("--no-results-md", action="store_true", help="do not append to benchmarks/RESULTS.md")
    ap.add_argument("--no-batched-ab", dest="batched_ab", action="store_false",
                    help="parity/kernels: skip the batched tensor-core kernels ('tc-v2') beside the "
                         "per-token ones where those run")
    ap.add_argument("--timeout", action="append", default=[], metavar="STAGE=SECONDS",
                    help=f"override a stage's timeout (defaults: {STAGES})")
    ap.add_argument("--stage", default=None, help=argparse.SUPPRESS)  # child process
    ap.add_argument("--part", default=None, help=argparse.SUPPRESS)  # child process: one of a stage's parts
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default=None, help=argparse.SUPPRESS)  # parity part
    ap.add_argument("--unaligned", action="store_true", help=argparse.SUPPRESS)  # parity part: unaligned_parity
    args = ap.parse_args(argv)
    if args.slots:
        args.slots = [tuple(int(x) for x in part.split(",")) for part in args.slots.split(";")]
    bad = [i for i in args.impls.split(",") if i not in ("reference", "triton", "auto")]
    if bad:
        ap.error(f"--impls {args.impls!r}: {bad} not among reference, triton, auto")
    known = {1.0} | {float(r) for _, r, _ in E2E_CASES if r}
    if args.ratios and not {float(r) for r in args.ratios.split(",")} <= known:
        ap.error(f"--ratios {args.ratios!r}: expected some of {sorted(known)}")
    os.makedirs(args.out, exist_ok=True)
    if args.stage:
        return run_stage_child(args)
    timeouts = dict(STAGES)
    for item in args.timeout:
        name, _, seconds = item.partition("=")
        if name not in STAGES or not seconds.replace(".", "", 1).isdigit():
            ap.error(f"--timeout {item!r}: expected STAGE=SECONDS with STAGE one of {list(STAGES)}")
        timeouts[name] = float(seconds)

    import torch

    if not torch.cuda.is_available() and not args.smoke:
        print("no CUDA device: gpu_check measures GPU kernels (use --smoke with TRITON_INTERPRET=1 to check the "
              "script on the CPU)", file=sys.stderr)
        return 2
    if args.smoke and not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        print("--smoke on the CPU needs TRITON_INTERPRET=1 in the environment", file=sys.stderr)
        return 2
    results = {}
    for stage, timeout in timeouts.items():
        if args.only and stage not in args.only:
            continue
        cmd = [sys.executable, os.path.abspath(__file__), "--out", args.out, "--stage", stage]
        cmd += ["--smoke"] * args.smoke + ["--inductor"] * args.inductor + ["--impls", args.impls]
        cmd += ["--no-batched-ab"] * (not args.batched_ab)
        cmd += ["--ratios", args.ratios] if args.ratios else []
        parts = {None: cmd + (["--slots", _slots_text(args.slots)] if args.slots else [])}
        if stage == "parity":  # one process per (m, n) and dtype: their first compiles run side by side
            slots = args.slots or _sizes(args)["parity_slots"]
            parts = {f"{m}x{n}.{dt}": cmd + ["--slots", f"{m},{n}", "--dtype", dt, "--part", f"{m}x{n}.{dt}"]
                     for m, n in slots for dt in ("bf16", "fp32")}
            if not args.slots:  # and at an unaligned slot width
                parts.update({f"{m}x{n}.unaligned.{dt}": cmd + ["--slots", f"{m},{n}", "--dtype", dt, "--unaligned",
                                                                "--part", f"{m}x{n}.unaligned.{dt}"]
                              for m, n in _sizes(args)["unaligned_parity"]["slots"] for dt in ("bf16", "fp32")})
        t0 = time.time()
        print(f"[gpu_check] stage {stage} (timeout {timeout} s, {len(parts)} process(es)) ...", flush=True)
        results[stage] = _run_parts(args.out, stage, parts, timeout * (4 if args.smoke else 1))
        with open(_stage_files(args.out, stage, None)[0], "w") as f:  # the merged result of the stage's parts
            json.dump(results[stage], f, indent=1, default=str)
        print(f"[gpu_check] stage {stage}: {results[stage].get('error', 'done')} in {time.time() - t0:.0f} s",
              flush=True)
    text = summary(args.out, results)
    print("\n" + text)
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(text)
    if not args.smoke and not args.no_results_md:
        with open(os.path.join(HERE, "RESULTS.md"), "a") as f:
            f.write("\n" + text)
    bad = [s for s, r in results.items() if "error" in r] + (["parity"] if results.get("parity", {}).get("failed")
                                                             else [])
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
