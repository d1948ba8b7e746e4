"""GHC kernel benchmark: eager reference vs torch.compile(reference) (inductor) vs the fused Triton kernels, and a
12-layer end-to-end training step; prints Markdown tables. Meant for a CUDA GPU (H100/H200); ``--smoke`` runs
tiny shapes on the CPU through the Triton interpreter to check the script itself (timings meaningless there).

Per kernel, for (m, n) in {(2, 3), (8, 16), (8, 64)}, D in {2048, 4096}, 16384 tokens, bf16: forward and
forward+backward milliseconds (``triton.testing.do_bench``, median), achieved GB/s over the kernel's byte floor
(the bytes it must move at minimum: every input read once, every output written once), and that floor's time at
the measured device copy bandwidth as a fraction of the measured time ("% of floor": 100% = as fast as the
bytes allow).

End to end: Llama-style stack, 12 layers, D=2048, FFN 5632, 16 heads, batch 4 x 2048, bf16, one training step
(forward, backward, AdamW), baseline vs widened r=1.5 (2, 3) and r=8 (8, 64) with the Triton kernels: step time
overhead and peak memory.

Usage::

    python benchmarks/ghc_kernels.py                 # on the GPU; results go in benchmarks/RESULTS.md
    TRITON_INTERPRET=1 python benchmarks/ghc_kernels.py --smoke
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch


def timer(device: str):
    if device == "cuda":
        from triton.testing import do_bench

        return lambda fn: do_bench(fn, warmup=10, rep=50, return_mode="median")

    def cpu_bench(fn, reps=3):
        fn()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    return cpu_bench


def copy_bandwidth(device: str, bench) -> float:
    """Device copy bandwidth in bytes/s (read + write of a 1 GiB buffer; 16 MiB on the CPU smoke run)."""
    size = (1 << 30) if device == "cuda" else (1 << 24)
    src = torch.empty(size, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    return 2 * size / (ms * 1e-3)


def make_case(N, m, n, D, dtype, device):
    d = D // m
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device)

    p = dict(norm_weight=rnd(d).abs() + 0.5, proj=rnd(d, 2 * m + n, scale=0.05), read=rnd(n, m), carry=rnd(n, n),
             write=rnd(m, n), scale_read=rnd(n, m), scale_carry=rnd(n, n), scale_write=rnd(m, n))
    h = rnd(N, n, d).to(dtype)
    z = rnd(N, m, d).to(dtype)
    return d, h, z, p


def read_params(p):
    """The dynamic read's parameter arguments: ``(norm_weight, proj, gates, scales)``, the maps and the gate scales
    stacked ``[read | carry | write^T]`` as the ops take them."""
    from vwn_transform.ops import stack_gates

    return (p["norm_weight"], p["proj"], stack_gates(p["read"], p["carry"], p["write"]),
            stack_gates(p["scale_read"], p["scale_carry"], p["scale_write"]))


OPS = ("read_dynamic", "read_static", "write", "write_read_dynamic")  # each also with its "_backward"


def op_calls(N, m, n, D, dtype, device):
    """Every GHC op forward and backward on one random case: ``(d, {name: fn(lib, cast=identity)})``, names as the
    kernel libraries spell them (``read_dynamic``, ``read_dynamic_backward``, ...). ``cast`` is applied to the
    state-sized inputs (e.g. ``torch.Tensor.double`` for an fp64 reference); the coefficients, statistics and
    parameters are fp32 from the reference."""
    from vwn_transform.kernels import reference as ref

    d, h, z, p = make_case(N, m, n, D, dtype, device)
    P = read_params(p)
    _, cc, wc, stats = ref.read_dynamic(h, *P, 1e-6)
    h_new = ref.write(h, z, cc, wc)
    stats_new = ref.read_dynamic(h_new, *P, 1e-6)[3]
    g = torch.Generator(device="cpu").manual_seed(3)
    gx = torch.randn(N, m, d, generator=g).to(device, dtype)
    gout = torch.randn(N, n, d, generator=g).to(device, dtype)
    gcc, gwc = torch.randn(N, n, n, generator=g).to(device), torch.randn(N, n, m, generator=g).to(device)

    def same(t):
        return t

    return d, {
        "read_dynamic": lambda L, c=same: L.read_dynamic(c(h), *P, 1e-6),
        "read_dynamic_backward": lambda L, c=same: L.read_dynamic_backward(c(h), *P, 1e-6, stats, c(gx), gcc, gwc),
        "read_static": lambda L, c=same: L.read_static(c(h), p["read"]),
        "read_static_backward": lambda L, c=same: L.read_static_backward(c(h), p["read"], c(gx)),
        "write": lambda L, c=same: L.write(c(h), c(z), cc, wc),
        "write_backward": lambda L, c=same: L.write_backward(c(h), c(z), cc, wc, c(gout)),
        "write_read_dynamic": lambda L, c=same: L.write_read_dynamic(c(h), c(z), cc, wc, *P, 1e-6),
        "write_read_dynamic_backward": lambda L, c=same: L.write_read_dynamic_backward(
            c(h), c(z), cc, wc, *P, 1e-6, c(h_new), stats_new, c(gout), c(gx), gcc, gwc),
    }


def byte_floors(op: str, N: int, m: int, n: int, d: int, elem: int) -> tuple[int, int]:
    """(forward, backward) bytes ``op`` must move at least (``shared/spec/gpu-kernels.md`` section 3): every input
    read once, every output written once; state elements of ``elem`` bytes, fp32 coefficients."""
    state, narrow, K = N * n * d * elem, N * m * d * elem, 2 * m + n
    coef = N * n * (n + m) * 4  # carry + write coefficients
    gates = N * n * (K + 1) * 4  # stats: logits + 1/rms
    return {
        "read_static": (state + narrow, 2 * state + narrow),
        "read_dynamic": (state + narrow + coef + gates, 2 * state + narrow + coef + gates),
        "write": (2 * state + narrow + coef, 3 * state + 2 * narrow + 2 * coef),
        "write_read_dynamic": (2 * state + 2 * narrow + 2 * coef + gates, 4 * state + 3 * narrow + 3 * coef + gates),
    }[op]


def kernel_rows(args, device, bench, bandwidth):
    from vwn_transform.kernels import reference as ref
    from vwn_transform.kernels import triton_ops as tri

    compiled = {name: torch.compile(getattr(ref, name), fullgraph=True, dynamic=False)
                for name in ("read_dynamic", "read_dynamic_backward", "read_static", "read_static_backward", "write",
                             "write_backward")}
    dtype = torch.bfloat16
    rows = []
    for D in args.widths:
        for m, n in args.slots:
            N = args.tokens
            d, calls = op_calls(N, m, n, D, dtype, device)
            cases = {name: (calls[name], calls[name + "_backward"])
                     for name in ("read_dynamic", "read_static", "write")}
            for name, (fwd, bwd) in cases.items():
                bytes_f, bytes_b = byte_floors(name, N, m, n, d, dtype.itemsize)
                libs = {"eager": ref, "inductor": None, "triton": tri}
                for impl, lib in libs.items():
                    if impl == "inductor":
                        lib = type("Compiled", (), {k: staticmethod(v) for k, v in compiled.items()})
                    if args.smoke and impl == "inductor":
                        continue  # inductor on the CPU smoke run only adds compile time
                    ms_f = bench(lambda: fwd(lib))
                    ms_fb = ms_f + bench(lambda: bwd(lib))
                    floor_f = bytes_f / bandwidth * 1e3
                    floor_fb = (bytes_f + bytes_b) / bandwidth * 1e3
                    rows.append((f"{name}", f"({m},{n})", D, impl, ms_f, bytes_f / (ms_f * 1e-3) / 1e9,
                                 100 * floor_f / ms_f, ms_fb, 100 * floor_fb / ms_fb))
    return rows


def end_to_end(args, device, bench):
    from transformers import LlamaConfig, LlamaForCausalLM

    import vwn_transform
    from vwn_transform import ops

    cfg = LlamaConfig(hidden_size=args.e2e_hidden, intermediate_size=int(args.e2e_hidden * 2.75),
                      num_hidden_layers=args.e2e_layers, num_attention_heads=16 if not args.smoke else 2,
                      num_key_value_heads=16 if not args.smoke else 2, vocab_size=32000 if not args.smoke else 256,
                      max_position_embeddings=args.e2e_seq, attn_implementation="sdpa")
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg).to(device, torch.bfloat16)
    ids = torch.randint(0, cfg.vocab_size, (args.e2e_batch, args.e2e_seq), device=device)
    models = {"baseline": base, "r=1.5 (2,3)": vwn_transform.widen(base, 1.5),
              "r=8 (8,64)": vwn_transform.widen(base, 8, m=8)}
    rows = []
    ops.set_impl("triton")
    try:
        for name, model in models.items():
            model.train()
            opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

            def step():
                model(input_ids=ids, labels=ids).loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            step()
            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            ms = bench(step)
            peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
            rows.append((name, ms, peak))
    finally:
        ops.set_impl(None)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (Triton interpreter)")
    ap.add_argument("--no-e2e", action="store_true")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.smoke:
        raise SystemExit("no CUDA device: this benchmark measures GPU kernels (use --smoke to check the script on "
                         "the CPU under TRITON_INTERPRET=1)")
    if args.smoke and os.environ.get("TRITON_INTERPRET") != "1" and device == "cpu":
        raise SystemExit("--smoke on the CPU needs TRITON_INTERPRET=1 in the environment")
    if args.smoke:
        args.tokens, args.widths, args.slots = 64, [64], [(2, 3), (8, 16)]
        args.e2e_hidden, args.e2e_layers, args.e2e_batch, args.e2e_seq = 64, 2, 2, 32
    else:
        args.tokens, args.widths, args.slots = 16384, [2048, 4096], [(2, 3), (8, 16), (8, 64)]
        args.e2e_hidden, args.e2e_layers, args.e2e_batch, args.e2e_seq = 2048, 12, 4, 2048
    bench = timer(device)
    bandwidth = copy_bandwidth(device, bench)
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (interpreter smoke run)"
    import triton

    print(f"device: {name}; torch {torch.__version__}, triton {triton.__version__}; copy bandwidth "
          f"{bandwidth / 1e9:.0f} GB/s; {args.tokens} tokens, bf16\n")
    print("| kernel | (m,n) | D | impl | fwd ms | fwd GB/s | fwd % of floor | fwd+bwd ms | fwd+bwd % of floor |")
    print("|---|---|---:|---|---:|---:|---:|---:|---:|")
    for row in kernel_rows(args, device, bench, bandwidth):
        k, mn, D, impl, ms_f, gbs, pf, ms_fb, pfb = row
        print(f"| {k} | {mn} | {D} | {impl} | {ms_f:.3f} | {gbs:.0f} | {pf:.0f}% | {ms_fb:.3f} | {pfb:.0f}% |",
              flush=True)
    if not args.no_e2e:
        rows = end_to_end(args, device, bench)
        base_ms = rows[0][1]
        print(f"\nEnd to end: {args.e2e_layers} layers, D={args.e2e_hidden}, batch {args.e2e_batch} x {args.e2e_seq}, "
              "bf16, one training step (Triton GHC kernels)\n")
        print("| model | step ms | overhead | peak memory (GiB) |")
        print("|---|---:|---:|---:|")
        for name, ms, peak in rows:
            print(f"| {name} | {ms:.1f} | {100 * (ms / base_ms - 1):+.1f}% | {peak:.2f} |")


if __name__ == "__main__":
    main()
