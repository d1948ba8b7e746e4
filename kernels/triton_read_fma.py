"""GHC reads for small n (``m <= n <= FMA_MAX_N``) by unrolled FMAs on per-slot 2-D tiles: the memory-bound design
of ``shared/spec/gpu-kernels.md`` section 3, as in :mod:`kernels.triton_write_fma`.

* Static read ``X_i = sum_j Read[j, i] H_j``: forward on a 2-D grid (token blocks x slot-width blocks), each
  program reads its H tiles once and writes X once; backward ``dL/dH_j = sum_i Read[j, i] dL/dX_i`` with
  ``dL/dRead[j, i] = sum H_j . dL/dX_i`` as one fp32 partial per program, summed by torch in a fixed order.
* Dynamic read, forward (one kernel): a program owns ``BT`` whole tokens. Pass 1 over the slot width sums
  ``H_j^2`` and ``U_jk = H_j . wg_k`` (``wg = diag(norm_weight) proj``, K = 2m+n gate columns) in fp32 registers;
  then ``1/rms``, the logits and the gated coefficients ``static + scale * tanh(logit)`` are formed in registers
  (carry/write coefficients and ``stats = [logits | 1/rms]`` are stored); pass 2 re-reads the program's tokens
  (from L2: a program's tokens are a few tens of KB) and writes ``X = Read^T H``.
* Dynamic read, backward (two kernels): ``coef`` (per token block, one pass over d) forms ``dL/dRead = H gX^T``
  and from it every per-token gate gradient ``g_u`` and the ``1/rms`` term, plus per-program partials of the
  static/scale gradients; ``state`` (a 2-D grid of token groups x slot-width chunks, each program looping over
  its group's token blocks) writes ``dL/dH_j = sum_i Read[j, i] gX_i + sum_k g_u[j, k] wg_k + rowscale_j H_j
  (+ an incoming gradient, for the fused write+read)`` and keeps ``dL/dwg`` for its chunk in registers, stored
  once per program as a partial that torch sums in a fixed order (deterministic, no atomics).

No padding of the slot counts, no ``tl.dot``, no shared-memory staging, no fp32 copy of the state in HBM; the
state is loaded in its own dtype (bf16/fp16/fp32) and mixed in fp32. Matches :mod:`kernels.reference`
(``read_static``, ``read_dynamic`` and their backwards). Launch parameters: :func:`configs`.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .triton_common import (aligned, contiguous3, dynamic_read_parameter_grads, fma_dynamic_read_supports,
                           fma_supports, gate_maps, interpreter_bt, interpreting, launch_kwargs, state_view)
from .measured import FMA_GATES, FMA_MIXING
from .reference import gate_slots
from .triton_helpers import coefficient, tanh, to_output

KERNEL_ID = FMA_MIXING  # the static read; the dynamic read's kernels are FMA_GATES (measured.py keeps the versions)


supports = fma_supports  # the static read (mixing only) at (m, n)
supports_dynamic = fma_dynamic_read_supports  # the dynamic read (gates + mixing) at (m, n)


# ---------------------------------------------------------------------------------------------------------------
# mixing X = Read^T H with static ([n, m]) or per-token ([N, n, m]) read coefficients
# ---------------------------------------------------------------------------------------------------------------
@triton.jit
def _read_fma_fwd(h_ptr, read_ptr, x_ptr, N, d,
                  NS: tl.constexpr, MS: tl.constexpr, STATIC: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
    t = tl.program_id(0) * BT + tl.arange(0, BT)
    dd = tl.program_id(1) * BD + tl.arange(0, BD)
    tmask = t < N
    mask = tmask[:, None] & (dd < d)[None, :]
    t64 = t.to(tl.int64)
    h_rows = (t64 * (NS * d))[:, None] + dd[None, :]  # slot j of token t: + j * d
    x_rows = (t64 * (MS * d))[:, None] + dd[None, :]
    accs = ()
    for i in tl.static_range(MS):
        accs = accs + (tl.zeros([BT, BD], dtype=tl.float32),)
    for j in tl.static_range(NS):
        hj = tl.load(h_ptr + h_rows + j * d, mask=mask, other=0.0).to(tl.float32)
        new = ()
        for i in tl.static_range(MS):
            new = new + (accs[i] + coefficient(read_ptr, t64, tmask, j * MS + i, NS * MS, STATIC) * hj,)
        accs = new
    for i in tl.static_range(MS):
        tl.store(x_ptr + x_rows + i * d, to_output(accs[i], x_ptr), mask=mask)


@triton.jit
def _read_fma_bwd(h_ptr, read_ptr, gx_ptr, gh_ptr, gread_ptr, N, d,
                  NS: tl.constexpr, MS: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
    # static read: a program owns BT whole tokens and walks the slot width; dL/dRead as one partial per program
    pid = tl.program_id(0)
    t = pid * BT + tl.arange(0, BT)
    tmask = t < N
    t64 = t.to(tl.int64)
    h_base = (t64 * (NS * d))[:, None]
    x_base = (t64 * (MS * d))[:, None]
    g_r = ()
    for p in tl.static_range(NS * MS):
        g_r = g_r + (tl.zeros([BT], dtype=tl.float32),)
    for d0 in range(0, d, BD):
        dd = d0 + tl.arange(0, BD)
        mask = tmask[:, None] & (dd < d)[None, :]
        gxs = ()
        for i in tl.static_range(MS):
            gxs = gxs + (tl.load(gx_ptr + x_base + dd[None, :] + i * d, mask=mask, other=0.0).to(tl.float32),)
        new = ()
        for j in tl.static_range(NS):
            hj = tl.load(h_ptr + h_base + dd[None, :] + j * d, mask=mask, other=0.0).to(tl.float32)
            acc = tl.zeros([BT, BD], dtype=tl.float32)
            for i in tl.static_range(MS):
                acc += coefficient(read_ptr, t64, tmask, j * MS + i, NS * MS, True) * gxs[i]
                new = new + (g_r[j * MS + i] + tl.sum(hj * gxs[i], axis=1),)
            tl.store(gh_ptr + h_base + dd[None, :] + j * d, to_output(acc, gh_ptr), mask=mask)
        g_r = new
    for p in tl.static_range(NS * MS):
        tl.store(gread_ptr + pid * (NS * MS) + p, tl.sum(g_r[p], axis=0))


# ---------------------------------------------------------------------------------------------------------------
# dynamic read: gates from the state, then the mixing
# ---------------------------------------------------------------------------------------------------------------
@triton.jit
def _read_dynamic_fma_fwd(h_ptr, wgt_ptr, base_ptr, scale_ptr, x_ptr, carry_ptr, write_ptr, stats_ptr, N, d, eps,
                          inv_sqrt_d, NS: tl.constexpr, MS: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
    K: tl.constexpr = 2 * MS + NS  # gate columns: [read (m) | carry (n) | write^T (m)]
    t = tl.program_id(0) * BT + tl.arange(0, BT)
    tmask = t < N
    t64 = t.to(tl.int64)
    h_base = (t64 * (NS * d))[:, None]
    # pass 1: per-slot sum of squares and U[j, k] = H_j . wg_k, as [BT] fp32 vectors
    sq = ()
    for j in tl.static_range(NS):
        sq = sq + (tl.zeros([BT], dtype=tl.float32),)
    u = ()
    for p in tl.static_range(NS * K):
        u = u + (tl.zeros([BT], dtype=tl.float32),)
    for d0 in range(0, d, BD):
        dd = d0 + tl.arange(0, BD)
        dmask = dd < d
        mask = tmask[:, None] & dmask[None, :]
        wk = ()
        for k in tl.static_range(K):  # wg^T [K, d]: one contiguous row per gate column
            wk = wk + (tl.load(wgt_ptr + k * d + dd, mask=dmask, other=0.0),)
        new_sq = ()
        new_u = ()
        for j in tl.static_range(NS):
            hj = tl.load(h_ptr + h_base + dd[None, :] + j * d, mask=mask, other=0.0).to(tl.float32)
            new_sq = new_sq + (sq[j] + tl.sum(hj * hj, axis=1),)
            for k in tl.static_range(K):
                new_u = new_u + (u[j * K + k] + tl.sum(hj * wk[k][None, :], axis=1),)
        sq = new_sq
        u = new_u
    # gates in registers; carry/write coefficients and [logits | 1/rms] stored, read coefficients kept
    stats_row = t64 * (NS * (K + 1))
    read_c = ()
    for j in tl.static_range(NS):
        inv_rms = 1.0 / tl.sqrt(sq[j] / d + eps)
        tl.store(stats_ptr + stats_row + j * (K + 1) + K, inv_rms, mask=tmask)
        f = inv_rms * inv_sqrt_d
        for k in tl.static_range(K):
            logit = u[j * K + k] * f
            tl.store(stats_ptr + stats_row + j * (K + 1) + k, logit, mask=tmask)
            c = tl.load(base_ptr + j * K + k) + tl.load(scale_ptr + j * K + k) * tanh(logit)
            if k < MS:
                read_c = read_c + (c[:, None],)
            elif k < MS + NS:
                tl.store(carry_ptr + t64 * (NS * NS) + j * NS + (k - MS), c, mask=tmask)
            else:
                tl.store(write_ptr + t64 * (NS * MS) + j * MS + (k - MS - NS), c, mask=tmask)
    # pass 2: X_i = sum_j Read[j, i] H_j
    x_base = (t64 * (MS * d))[:, None]
    for d0 in range(0, d, BD):
        dd = d0 + tl.arange(0, BD)
        mask = tmask[:, None] & (dd < d)[None, :]
        accs = ()
        for i in tl.static_range(MS):
            accs = accs + (tl.zeros([BT, BD], dtype=tl.float32),)
        for j in tl.static_range(NS):
            hj = tl.load(h_ptr + h_base + dd[None, :] + j * d, mask=mask, other=0.0).to(tl.float32)
            new = ()
            for i in tl.static_range(MS):
                new = new + (accs[i] + read_c[j * MS + i] * hj,)
            accs = new
        for i in tl.static_range(MS):
            tl.store(x_ptr + x_base + dd[None, :] + i * d, to_output(accs[i], x_ptr), mask=mask)


@triton.jit
def _read_dynamic_fma_bwd_coef(h_ptr, gx_ptr, gcarry_ptr, gwrite_ptr, stats_ptr, base_ptr, scale_ptr, readc_ptr,
                               gu_ptr, rowscale_ptr, gstatic_ptr, gscales_ptr, N, d, inv_sqrt_d,
                               NS: tl.constexpr, MS: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
    K: tl.constexpr = 2 * MS + NS
    pid = tl.program_id(0)
    t = pid * BT + tl.arange(0, BT)
    tmask = t < N
    t64 = t.to(tl.int64)
    h_base = (t64 * (NS * d))[:, None]
    x_base = (t64 * (MS * d))[:, None]
    # pass over d: dL/dRead[j, i] = H_j . gX_i
    g_r = ()
    for p in tl.static_range(NS * MS):
        g_r = g_r + (tl.zeros([BT], dtype=tl.float32),)
    for d0 in range(0, d, BD):
        dd = d0 + tl.arange(0, BD)
        mask = tmask[:, None] & (dd < d)[None, :]
        gxs = ()
        for i in tl.static_range(MS):
            gxs = gxs + (tl.load(gx_ptr + x_base + dd[None, :] + i * d, mask=mask, other=0.0).to(tl.float32),)
        new = ()
        for j in tl.static_range(NS):
            hj = tl.load(h_ptr + h_base + dd[None, :] + j * d, mask=mask, other=0.0).to(tl.float32)
            for i in tl.static_range(MS):
                new = new + (g_r[j * MS + i] + tl.sum(hj * gxs[i], axis=1),)
        g_r = new
    # per token: coef = static + scale * tanh(logit) -> gate gradients (masked tokens contribute zeros)
    stats_row = t64 * (NS * (K + 1))
    for j in tl.static_range(NS):
        inv_rms = tl.load(stats_ptr + stats_row + j * (K + 1) + K, mask=tmask, other=1.0)
        g_inv = tl.zeros([BT], dtype=tl.float32)  # sum_k g_logit * logit
        for k in tl.static_range(K):
            logit = tl.load(stats_ptr + stats_row + j * (K + 1) + k, mask=tmask, other=0.0)
            c = tanh(logit)
            scale = tl.load(scale_ptr + j * K + k)
            if k < MS:
                g_coef = g_r[j * MS + k]
                tl.store(readc_ptr + t64 * (NS * MS) + j * MS + k, tl.load(base_ptr + j * K + k) + scale * c,
                         mask=tmask)
            elif k < MS + NS:
                g_coef = tl.load(gcarry_ptr + t64 * (NS * NS) + j * NS + (k - MS), mask=tmask, other=0.0)
            else:
                g_coef = tl.load(gwrite_ptr + t64 * (NS * MS) + j * MS + (k - MS - NS), mask=tmask, other=0.0)
            tl.store(gstatic_ptr + pid * (NS * K) + j * K + k, tl.sum(g_coef, axis=0))
            tl.store(gscales_ptr + pid * (NS * K) + j * K + k, tl.sum(g_coef * c, axis=0))
            g_logit = g_coef * scale * (1.0 - c * c)
            g_inv += g_logit * logit
            tl.store(gu_ptr + t64 * (NS * K) + j * K + k, g_logit * (inv_rms * inv_sqrt_d), mask=tmask)
        # through 1/rms = (|H_j|^2 / d + eps)^-1/2: dL/dH_j += H_j * (sum_k g_logit logit) * rms^-2 * (-1/d)
        tl.store(rowscale_ptr + t64 * NS + j, g_inv * inv_rms * inv_rms * (-1.0 / d), mask=tmask)


@triton.jit
def _read_dynamic_fma_bwd_state(h_ptr, gx_ptr, readc_ptr, gu_ptr, rowscale_ptr, wgt_ptr, gin_ptr, gh_ptr, gwg_ptr,
                                N, d, NS: tl.constexpr, MS: tl.constexpr, G_IN: tl.constexpr, BT: tl.constexpr,
                                BD: tl.constexpr):
    K: tl.constexpr = 2 * MS + NS
    group = tl.program_id(0)
    groups = tl.num_programs(0)
    dd = tl.program_id(1) * BD + tl.arange(0, BD)
    dmask = dd < d
    wk = ()
    g_wg = ()  # dL/dwg_k as [BT, BD] tiles: summed over the tokens once, after the loop (a sum across the token
    # axis is across warps, through shared memory and a barrier: K of them per block was most of this kernel's time)
    for k in tl.static_range(K):
        wk = wk + (tl.load(wgt_ptr + k * d + dd, mask=dmask, other=0.0)[None, :],)
        g_wg = g_wg + (tl.zeros([BT, BD], dtype=tl.float32),)
    for block in range(group, tl.cdiv(N, BT), groups):  # this group's token blocks, in order
        t = block * BT + tl.arange(0, BT)
        tmask = t < N
        t64 = t.to(tl.int64)
        mask = tmask[:, None] & dmask[None, :]
        h_rows = (t64 * (NS * d))[:, None] + dd[None, :]
        x_rows = (t64 * (MS * d))[:, None] + dd[None, :]
        gxs = ()
        for i in tl.static_range(MS):
            gxs = gxs + (tl.load(gx_ptr + x_rows + i * d, mask=mask, other=0.0).to(tl.float32),)
        hs = ()
        gus = ()  # g_u[j, k] as [BT, 1] columns
        for j in tl.static_range(NS):
            hs = hs + (tl.load(h_ptr + h_rows + j * d, mask=mask, other=0.0).to(tl.float32),)
            for k in tl.static_range(K):
                gus = gus + (coefficient(gu_ptr, t64, tmask, j * K + k, NS * K, False),)
        for j in tl.static_range(NS):
            acc = tl.load(rowscale_ptr + t64 * NS + j, mask=tmask, other=0.0)[:, None] * hs[j]
            if G_IN:
                acc += tl.load(gin_ptr + h_rows + j * d, mask=mask, other=0.0).to(tl.float32)
            for i in tl.static_range(MS):
                acc += coefficient(readc_ptr, t64, tmask, j * MS + i, NS * MS, False) * gxs[i]
            for k in tl.static_range(K):
                acc += gus[j * K + k] * wk[k]
            tl.store(gh_ptr + h_rows + j * d, to_output(acc, gh_ptr), mask=mask)
        new = ()
        for k in tl.static_range(K):  # dL/dwg_k += sum over slots of g_u[j, k] H_j, per token row
            acc = g_wg[k]
            for j in tl.static_range(NS):
                acc += gus[j * K + k] * hs[j]
            new = new + (acc,)
        g_wg = new
    for k in tl.static_range(K):
        tl.store(gwg_ptr + group * (K * d) + k * d + dd, tl.sum(g_wg[k], axis=0), mask=dmask)


# ---------------------------------------------------------------------------------------------------------------
# launch parameters and host functions
# ---------------------------------------------------------------------------------------------------------------
def configs(n: int, m: int, d: int) -> dict[str, dict]:
    """Launch parameters per kernel (also what ``benchmarks/kernel_static_check.py`` compiles).

    * ``mix_fwd``: 2-D grid, BT x BD tiles of 8 values per thread (one 16-byte bf16 load) with 4 warps.
    * the others: one token per warp walking the slot width (``dynamic_bwd_state``: a token group's blocks, the
      groups chosen in :func:`_state_groups`), so each per-token accumulator costs one register per thread.
    """
    bd_full = min(256, max(16, triton.next_power_of_2(d)))

    def walk(bt, bd, warps):  # one token per warp, walking the slot width in chunks of bd
        return dict(BT=interpreter_bt(bt), BD=min(bd, max(16, triton.next_power_of_2(d))), num_warps=warps,
                    num_stages=1)

    # chosen by compiling variants for sm_90a at (1,4), (2,3), (4,4), (2,8) (benchmarks/NOTES.md): the widest
    # chunks (16-byte loads need 8 bf16 values per thread: BD 256 with 4 warps) whose per-token gate values
    # (n * (2m + n) of them) and per-slot tiles still fit in registers without spills
    gates = n * (2 * m + n)
    return {
        "mix_fwd": dict(BT=interpreter_bt(max(1, 8 * 32 * 4 // bd_full)), BD=bd_full, num_warps=4, num_stages=1),
        # unaligned slot widths (scalar loads, triton_common.aligned): BD 128 spilled 324-328 B at (5, 7)
        "mix_bwd": walk(4, 128 if aligned(d) or 2 * n + m <= 16 else 64, 4),
        # unaligned slot widths, above 48 gates: BD 64 spilled 136 B at (5, 5) and 784 B at (3, 7) ((2, 8), (4, 6)
        # were clean), the state backward 152 B at (3, 7); BD 32 compiled clean at all four
        "dynamic_fwd": walk(4, 256 if gates <= 24 else 128 if gates <= 48 else 64 if aligned(d) else 32, 4),
        # 8 warps: with 4, ptxas spilled 8-16 B at 72 registers at (2, 3) fp32, (4, 4) fp32 and (2, 8)
        # unaligned slot widths: BD 256 spilled 4 B at (4, 6) (84 gates; (2, 8) and (1, 8) were clean)
        "dynamic_bwd_coef": walk(8, 256 if aligned(d) or gates <= 48 else 128, 8),
        "dynamic_bwd_state": walk(4, 128 if gates <= 24 else 64 if aligned(d) or gates <= 48 else 32, 4),
    }


def _state_groups(N: int, bt: int, chunks: int) -> int:
    # token groups of the backward's state kernel: about 1024 programs in all natively (8 four-warp programs per
    # SM on a 132-SM GPU), each looping over its group's token blocks; the dL/dwg partials are [groups, K, d]
    blocks_ = triton.cdiv(N, bt)
    target = 4 if interpreting() else max(1, triton.cdiv(1024, chunks))
    return max(1, min(blocks_, target))


def read_static(h, read):
    """:func:`kernels.reference.read_static` for ``m <= n <= FMA_MAX_N``: ``[N, n, d] -> [N, m, d]``."""
    n, m = read.shape
    h, N, d = state_view(h, n, m)
    x = torch.empty((N, m, d), device=h.device, dtype=h.dtype)
    if N and d:
        cfg = configs(n, m, d)["mix_fwd"]
        grid = (triton.cdiv(N, cfg["BT"]), triton.cdiv(d, cfg["BD"]))
        _read_fma_fwd[grid](h, read.float().contiguous(), x, N, d, NS=n, MS=m, STATIC=True, **launch_kwargs(cfg))
    return x


def read_static_backward(h, read, grad_x):
    """:func:`kernels.reference.read_static_backward` for ``m <= n <= FMA_MAX_N``."""
    n, m = read.shape
    h, N, d = state_view(h, n, m)
    gx = contiguous3(grad_x, m, d, "grad_x")
    cfg = configs(n, m, d)["mix_bwd"]
    programs = triton.cdiv(N, cfg["BT"])
    g_h = torch.empty_like(h)
    g_read = torch.zeros((max(programs, 1), n, m), device=h.device, dtype=torch.float32)
    if N and d:
        _read_fma_bwd[(programs,)](h, read.float().contiguous(), gx, g_h, g_read, N, d, NS=n, MS=m,
                                   **launch_kwargs(cfg))
    return g_h, g_read.sum(0).to(read.dtype)  # a fixed-order sum of the programs' partials


def read_dynamic(h, norm_weight, proj, gates, scales, eps):
    """:func:`kernels.reference.read_dynamic` where :func:`supports_dynamic`: ``(x, carry_c, write_c, stats)``."""
    n, m = gate_slots(gates)
    h, N, d = state_view(h, n, m)
    K = 2 * m + n
    wgt, base, scales = gate_maps(norm_weight, proj, gates, scales)
    x = torch.empty((N, m, d), device=h.device, dtype=h.dtype)
    carry_c = torch.empty((N, n, n), device=h.device, dtype=torch.float32)
    write_c = torch.empty((N, n, m), device=h.device, dtype=torch.float32)
    stats = torch.empty((N, n, K + 1), device=h.device, dtype=torch.float32)
    if N:
        cfg = configs(n, m, d)["dynamic_fwd"]
        _read_dynamic_fma_fwd[(triton.cdiv(N, cfg["BT"]),)](
            h, wgt, base, scales, x, carry_c, write_c, stats, N, d, float(eps), 1.0 / math.sqrt(max(d, 1)),
            NS=n, MS=m, **launch_kwargs(cfg))
    return x, carry_c, write_c, stats


def read_dynamic_backward(h, norm_weight, proj, gates, scales, eps, stats, grad_x, grad_carry_c, grad_write_c,
                          grad_in=None):
    """:func:`kernels.reference.read_dynamic_backward` where :func:`supports_dynamic`. ``grad_in`` (``[N, n, d]``,
    optional) is added to ``dL/dH`` in fp32 before the one rounding (the fused write+read's gradient of H')."""
    n, m = gate_slots(gates)
    h, N, d = state_view(h, n, m)
    K = 2 * m + n
    gx = contiguous3(grad_x, m, d, "grad_x")
    gcc = grad_carry_c.float().reshape(N, n, n).contiguous()
    gwc = grad_write_c.float().reshape(N, n, m).contiguous()
    stats = stats.float().reshape(N, n, K + 1).contiguous()
    wgt, base, scales = gate_maps(norm_weight, proj, gates, scales)
    coef_cfg, state_cfg = (configs(n, m, d)[k] for k in ("dynamic_bwd_coef", "dynamic_bwd_state"))
    programs = triton.cdiv(N, coef_cfg["BT"])
    chunks = triton.cdiv(max(d, 1), state_cfg["BD"])
    groups = _state_groups(N, state_cfg["BT"], chunks)
    dev = h.device
    read_c = torch.empty((N, n, m), device=dev, dtype=torch.float32)
    g_u = torch.empty((N, n, K), device=dev, dtype=torch.float32)
    rowscale = torch.empty((N, n), device=dev, dtype=torch.float32)
    g_static = torch.zeros((max(programs, 1), n, K), device=dev, dtype=torch.float32)
    g_scales = torch.zeros((max(programs, 1), n, K), device=dev, dtype=torch.float32)
    g_h = torch.empty_like(h)
    g_wgt = torch.zeros((groups, K, d), device=dev, dtype=torch.float32)
    if grad_in is not None:
        grad_in = contiguous3(grad_in, n, d, "grad_in")
    if N:
        _read_dynamic_fma_bwd_coef[(programs,)](
            h, gx, gcc, gwc, stats, base, scales, read_c, g_u, rowscale, g_static, g_scales, N, d,
            1.0 / math.sqrt(max(d, 1)), NS=n, MS=m, **launch_kwargs(coef_cfg))
        if d:
            _read_dynamic_fma_bwd_state[(groups, chunks)](
                h, gx, read_c, g_u, rowscale, wgt, grad_in if grad_in is not None else h, g_h, g_wgt, N, d,
                NS=n, MS=m, G_IN=grad_in is not None, **launch_kwargs(state_cfg))
    g_static, g_scales = g_static.sum(0), g_scales.sum(0)  # [n, K], fixed-order sums of the partials
    return (g_h,) + dynamic_read_parameter_grads(g_static, g_scales, g_wgt.sum(0).t(), norm_weight, proj,
                                                 gates, scales)


def static_gate_specs(n: int, m: int, d: int, dtype: str, dynamic: bool | None = None) -> list[dict]:
    """What ``benchmarks/kernel_static_check.py`` compiles for this (n, m, d, state dtype): every kernel of this
    module as :func:`read_static` / :func:`read_dynamic` and their backwards launch it (the dynamic read where
    :func:`supports_dynamic`, or as ``dynamic`` says)."""
    ptr, f32 = f"*{dtype}", "*fp32"
    cfg = configs(n, m, d)

    def spec(name, fn, args, which, **constexprs):
        c = cfg[which]
        version = KERNEL_ID if name.startswith("read_static") else FMA_GATES
        return dict(kernel=f"{name}[{version}]", fn=fn, args=args,
                    constexprs=dict(NS=n, MS=m, BT=c["BT"], BD=c["BD"], **constexprs),
                    num_warps=c["num_warps"], num_stages=c["num_stages"])

    specs = [
        spec("read_static_fwd", _read_fma_fwd, dict(h_ptr=ptr, read_ptr=f32, x_ptr=ptr, N=16384, d=d),
             "mix_fwd", STATIC=True),
        spec("read_static_bwd", _read_fma_bwd,
             dict(h_ptr=ptr, read_ptr=f32, gx_ptr=ptr, gh_ptr=ptr, gread_ptr=f32, N=16384, d=d), "mix_bwd"),
    ]
    if not (supports_dynamic(n, m) if dynamic is None else dynamic):
        return specs
    return specs + [
        spec("read_dynamic_fwd", _read_dynamic_fma_fwd,
             dict(h_ptr=ptr, wgt_ptr=f32, base_ptr=f32, scale_ptr=f32, x_ptr=ptr, carry_ptr=f32, write_ptr=f32,
                  stats_ptr=f32, N=16384, d=d, eps=1e-6, inv_sqrt_d=0.03), "dynamic_fwd"),
        spec("read_dynamic_bwd_coef", _read_dynamic_fma_bwd_coef,
             dict(h_ptr=ptr, gx_ptr=ptr, gcarry_ptr=f32, gwrite_ptr=f32, stats_ptr=f32, base_ptr=f32, scale_ptr=f32,
                  readc_ptr=f32, gu_ptr=f32, rowscale_ptr=f32, gstatic_ptr=f32, gscales_ptr=f32, N=16384,
                  d=d, inv_sqrt_d=0.03), "dynamic_bwd_coef"),
        spec("read_dynamic_bwd_state", _read_dynamic_fma_bwd_state,
             dict(h_ptr=ptr, gx_ptr=ptr, readc_ptr=f32, gu_ptr=f32, rowscale_ptr=f32, wgt_ptr=f32, gin_ptr=ptr,
                  gh_ptr=ptr, gwg_ptr=f32, N=16384, d=d), "dynamic_bwd_state", G_IN=True),
    ]
