"""GHC write + carry for small n (n <= ``FMA_MAX_N``) by unrolled FMAs on per-slot 2-D tiles (the memory-bound
design of ``shared/spec/gpu-kernels.md`` section 3): ``H'_k = sum_j Carry[j, k] H_j + sum_i WriteT[k, i] Z_i``.

* n and m are ``constexpr`` and every slot loop is ``tl.static_range``: each slot is its own ``[BT, BD]`` tile
  (BT tokens x BD of the slot width), loaded once in its own dtype (bf16/fp16/fp32) and mixed in fp32 registers;
  no padding of the slot counts, no ``tl.dot``, no shared-memory staging, no fp32 copy of the state in HBM.
* Coefficients: per token (dynamic, ``[N, n, n]``/``[N, n, m]``) as ``[BT]`` vectors broadcast over the tile,
  or static (``[n, n]``/``[n, m]``) as scalars.
* Forward: a 2-D grid over (token blocks, slot-width blocks); each program reads its H and Z tiles once and
  writes H' once.
* Backward: a program owns BT whole tokens and walks the slot width. Per chunk it reads ``dL/dH'``, H and Z once
  and writes ``dL/dH = Carry dL/dH'`` and ``dL/dZ = WriteT^T dL/dH'``; the coefficient gradients
  (``dL/dH'_k . H_j`` and ``dL/dH'_k . Z_i`` over the slot width) stay in fp32 registers as ``[BT]`` vectors
  (per token, stored once: dynamic), or are summed over the program's tokens into one per-program partial that
  torch sums in a fixed order afterwards (static: deterministic, no atomics).

Matches :func:`kernels.reference.write` / :func:`kernels.reference.write_backward`. Launch parameters come from
:func:`fwd_config` / :func:`bwd_config` (also what ``benchmarks/kernel_static_check.py`` compiles).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import (aligned, contiguous3, fma_supports, interpreter_bt, launch_kwargs, state_view,
                            write_coefficients)
from .triton_helpers import coefficient, to_output
from .measured import FMA_MIXING

KERNEL_ID = FMA_MIXING  # measured.py keeps the kernel versions


@triton.jit
def _write_fma_fwd(h_ptr, z_ptr, carry_ptr, write_ptr, out_ptr, N, d,
                   NS: tl.constexpr, MS: tl.constexpr, STATIC: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
    t = tl.program_id(0) * BT + tl.arange(0, BT)
    dd = tl.program_id(1) * BD + tl.arange(0, BD)
    tmask = t < N
    mask = tmask[:, None] & (dd < d)[None, :]
    t64 = t.to(tl.int64)
    h_rows = (t64 * (NS * d))[:, None] + dd[None, :]  # slot j of token t: + j * d
    z_rows = (t64 * (MS * d))[:, None] + dd[None, :]
    accs = ()
    for k in tl.static_range(NS):
        accs = accs + (tl.zeros([BT, BD], dtype=tl.float32),)
    for j in tl.static_range(NS):  # Carry^T H: H_j feeds every H'_k
        hj = tl.load(h_ptr + h_rows + j * d, mask=mask, other=0.0).to(tl.float32)
        new = ()
        for k in tl.static_range(NS):
            new = new + (accs[k] + coefficient(carry_ptr, t64, tmask, j * NS + k, NS * NS, STATIC) * hj,)
        accs = new
    for i in tl.static_range(MS):  # WriteT Z
        zi = tl.load(z_ptr + z_rows + i * d, mask=mask, other=0.0).to(tl.float32)
        new = ()
        for k in tl.static_range(NS):
            new = new + (accs[k] + coefficient(write_ptr, t64, tmask, k * MS + i, NS * MS, STATIC) * zi,)
        accs = new
    for k in tl.static_range(NS):
        tl.store(out_ptr + h_rows + k * d, to_output(accs[k], out_ptr), mask=mask)


@triton.jit
def _write_fma_bwd(h_ptr, z_ptr, carry_ptr, write_ptr, g_ptr, gh_ptr, gz_ptr, gcarry_ptr, gwrite_ptr, N, d,
                   NS: tl.constexpr, MS: tl.constexpr, STATIC: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
    pid = tl.program_id(0)
    t = pid * BT + tl.arange(0, BT)
    tmask = t < N
    t64 = t.to(tl.int64)
    h_base = (t64 * (NS * d))[:, None]
    z_base = (t64 * (MS * d))[:, None]
    # coefficient-gradient accumulators, fp32 [BT] per (j, k) and per (k, i)
    g_cc = ()
    for p in tl.static_range(NS * NS):
        g_cc = g_cc + (tl.zeros([BT], dtype=tl.float32),)
    g_wc = ()
    for p in tl.static_range(NS * MS):
        g_wc = g_wc + (tl.zeros([BT], dtype=tl.float32),)
    for d0 in range(0, d, BD):
        dd = d0 + tl.arange(0, BD)
        mask = tmask[:, None] & (dd < d)[None, :]
        h_rows = h_base + dd[None, :]
        z_rows = z_base + dd[None, :]
        gs = ()
        for k in tl.static_range(NS):
            gs = gs + (tl.load(g_ptr + h_rows + k * d, mask=mask, other=0.0).to(tl.float32),)
        # dL/dH_j = sum_k Carry[j, k] dL/dH'_k; dL/dCarry[j, k] += dL/dH'_k . H_j
        new_cc = ()
        for j in tl.static_range(NS):
            hj = tl.load(h_ptr + h_rows + j * d, mask=mask, other=0.0).to(tl.float32)
            acc = tl.zeros([BT, BD], dtype=tl.float32)
            for k in tl.static_range(NS):
                acc += coefficient(carry_ptr, t64, tmask, j * NS + k, NS * NS, STATIC) * gs[k]
                new_cc = new_cc + (g_cc[j * NS + k] + tl.sum(hj * gs[k], axis=1),)
            tl.store(gh_ptr + h_rows + j * d, to_output(acc, gh_ptr), mask=mask)
        g_cc = new_cc
        # dL/dZ_i = sum_k WriteT[k, i] dL/dH'_k; dL/dWriteT[k, i] += dL/dH'_k . Z_i
        for i in tl.static_range(MS):
            zi = tl.load(z_ptr + z_rows + i * d, mask=mask, other=0.0).to(tl.float32)
            acc = tl.zeros([BT, BD], dtype=tl.float32)
            new_wc = ()
            for p in tl.static_range(NS * MS):  # p = k * MS + i'
                if p % MS == i:
                    acc += coefficient(write_ptr, t64, tmask, p, NS * MS, STATIC) * gs[p // MS]
                    new_wc = new_wc + (g_wc[p] + tl.sum(gs[p // MS] * zi, axis=1),)
                else:
                    new_wc = new_wc + (g_wc[p],)
            g_wc = new_wc
            tl.store(gz_ptr + z_rows + i * d, to_output(acc, gz_ptr), mask=mask)
    if STATIC:
        # one fp32 partial per program: [programs, n*n] and [programs, n*m], summed in order by torch
        for p in tl.static_range(NS * NS):
            tl.store(gcarry_ptr + pid * (NS * NS) + p, tl.sum(g_cc[p], axis=0))
        for p in tl.static_range(NS * MS):
            tl.store(gwrite_ptr + pid * (NS * MS) + p, tl.sum(g_wc[p], axis=0))
    else:
        for p in tl.static_range(NS * NS):
            tl.store(gcarry_ptr + t64 * (NS * NS) + p, g_cc[p], mask=tmask)
        for p in tl.static_range(NS * MS):
            tl.store(gwrite_ptr + t64 * (NS * MS) + p, g_wc[p], mask=tmask)


def fwd_config(n: int, m: int, d: int) -> dict:
    """Launch parameters of the forward: ``BT`` tokens x ``BD`` of the slot width per program, 4 warps: 8 values of
    each [BT, BD] tile per thread (one 16-byte bf16 load), so the n accumulators and the n + m input tiles fit in
    registers (the compiler issues all loads up front)."""
    bd = min(256, max(16, triton.next_power_of_2(d)))
    return dict(BT=interpreter_bt(max(1, 8 * 32 * 4 // bd)), BD=bd, num_warps=4, num_stages=1)


def bwd_config(n: int, m: int, d: int) -> dict:
    """Launch parameters of the backward: one token per warp (BT = 4 warps), so each per-token coefficient
    gradient accumulator costs one register per thread; BD 256 (n <= 4), 128 (up to 96 accumulators n(n+m)) or
    32 ((8, 8): 128 accumulators; BD 128 spilled 12 B in fp32, BD 64 96 B in bf16) of the slot width per step of
    the loop over d. At an unaligned slot width (``triton_common.aligned``: scalar loads) narrower: 128 up to 32
    accumulators, 64 up to 48, else 32 (sm_90a: BD 256 spilled 20-24 B at (2,3) bf16 and (1,4) fp32, BD 128 332-348
    B at (3,5), BD 64 504-516 B at (5,7); benchmarks/NOTES.md, "Unaligned slot widths")."""
    accumulators = n * (n + m)
    if aligned(d):
        bd = 256 if n <= 4 else 128 if accumulators <= 96 else 32
    else:
        bd = 128 if accumulators <= 32 else 64 if accumulators <= 48 else 32
    bd = min(bd, max(16, triton.next_power_of_2(d)))
    return dict(BT=interpreter_bt(4), BD=bd, num_warps=4, num_stages=1)


supports = fma_supports  # (m, n) where these kernels run


def write(h, z, carry_c, write_c):
    """:func:`kernels.reference.write` for n <= ``FMA_MAX_N``: ``[N, n, d], [N, m, d] -> [N, n, d]`` in the dtype
    of ``h`` and ``z`` promoted (each loaded in its own dtype)."""
    n, m = write_c.shape[-2:]
    h, N, d = state_view(h, n, m)
    z = contiguous3(z, m, d, "z")
    static, cc, wc = write_coefficients(carry_c, write_c, N, n, m)
    out = torch.empty_like(h, dtype=torch.promote_types(h.dtype, z.dtype))  # reference.state_dtype
    if N and d:
        cfg = fwd_config(n, m, d)
        grid = (triton.cdiv(N, cfg["BT"]), triton.cdiv(d, cfg["BD"]))
        _write_fma_fwd[grid](h, z, cc, wc, out, N, d, NS=n, MS=m, STATIC=static, **launch_kwargs(cfg))
    return out


def write_backward(h, z, carry_c, write_c, grad_out):
    """:func:`kernels.reference.write_backward` for n <= ``FMA_MAX_N``."""
    n, m = write_c.shape[-2:]
    h, N, d = state_view(h, n, m)
    z = contiguous3(z, m, d, "z")
    g = contiguous3(grad_out, n, d, "grad_out")
    static, cc, wc = write_coefficients(carry_c, write_c, N, n, m)
    cfg = bwd_config(n, m, d)
    programs = triton.cdiv(N, cfg["BT"])
    g_h, g_z = torch.empty_like(h), torch.empty_like(z)
    rows = programs if static else N  # per-program partials (static) or per-token gradients (dynamic)
    g_cc = torch.empty((rows, n, n), device=h.device, dtype=torch.float32)
    g_wc = torch.empty((rows, n, m), device=h.device, dtype=torch.float32)
    if N:
        if d:
            _write_fma_bwd[(programs,)](h, z, cc, wc, g, g_h, g_z, g_cc, g_wc, N, d, NS=n, MS=m, STATIC=static,
                                        **launch_kwargs(cfg))
        else:
            g_cc.zero_(), g_wc.zero_()
    if static:
        g_cc, g_wc = g_cc.sum(0), g_wc.sum(0)  # a fixed-order reduction over the programs' partials
    return g_h, g_z, g_cc.reshape(carry_c.shape).to(carry_c.dtype), g_wc.reshape(write_c.shape).to(write_c.dtype)


def static_gate_specs(n: int, m: int, d: int, dtype: str) -> list[dict]:
    """What ``benchmarks/kernel_static_check.py`` compiles for this (n, m, d, state dtype): the kernels exactly as
    :func:`write` / :func:`write_backward` launch them (dynamic and static coefficients)."""
    ptr, f32 = f"*{dtype}", "*fp32"
    specs = []
    for static in (False, True):
        kind = "static" if static else "dynamic"
        fwd, bwd = fwd_config(n, m, d), bwd_config(n, m, d)
        specs.append(dict(kernel=f"write_fwd[{KERNEL_ID},{kind}]", fn=_write_fma_fwd,
                          args=dict(h_ptr=ptr, z_ptr=ptr, carry_ptr=f32, write_ptr=f32, out_ptr=ptr, N=16384, d=d),
                          constexprs=dict(NS=n, MS=m, STATIC=static, BT=fwd["BT"], BD=fwd["BD"]),
                          num_warps=fwd["num_warps"], num_stages=fwd["num_stages"]))
        specs.append(dict(kernel=f"write_bwd[{KERNEL_ID},{kind}]", fn=_write_fma_bwd,
                          args=dict(h_ptr=ptr, z_ptr=ptr, carry_ptr=f32, write_ptr=f32, g_ptr=ptr, gh_ptr=ptr,
                                    gz_ptr=ptr, gcarry_ptr=f32, gwrite_ptr=f32, N=16384, d=d),
                          constexprs=dict(NS=n, MS=m, STATIC=static, BT=bwd["BT"], BD=bwd["BD"]),
                          num_warps=bwd["num_warps"], num_stages=bwd["num_stages"]))
    return specs
