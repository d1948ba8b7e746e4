"""Fused GHC write + carry: ``H' = WriteT Z + Carry^T H`` in one pass over the state (reads ``H`` and ``Z`` once,
writes ``H'`` once), per-token (dynamic, ``[N, n, n]``/``[N, n, m]``) or static (``[n, n]``/``[n, m]``, STATIC=1)
coefficients. Matches :func:`kernels.reference.write` / :func:`kernels.reference.write_backward`.

The backward reads ``dL/dH'``, ``H`` and ``Z`` once and writes ``dL/dH = Carry dL/dH'`` and
``dL/dZ = WriteT^T dL/dH'``; the coefficient gradients (``dL/dH' H^T`` and ``dL/dH' Z^T`` per token) are
accumulated in fp32 over the slot width, stored per token (dynamic) or as one partial sum per program (static,
summed over programs with torch).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import blocks, contiguous3, pow2, state_view
from .triton_helpers import to_output


@triton.jit
def coef3(ptr, t3, N, rows, cols, STATIC: tl.constexpr, BT: tl.constexpr, RP: tl.constexpr, CP: tl.constexpr):
    # [BT, RP, CP] fp32 coefficients: per token ([N, rows, cols]) or one static [rows, cols] for every token
    a = tl.arange(0, RP)[None, :, None]
    b = tl.arange(0, CP)[None, None, :]
    if STATIC:
        c = tl.load(ptr + a * cols + b, mask=(a < rows) & (b < cols), other=0.0).to(tl.float32)  # [1, RP, CP]
        return tl.broadcast_to(c, (BT, RP, CP))
    return tl.load(ptr + t3.to(tl.int64) * rows * cols + a * cols + b, mask=(t3 < N) & (a < rows) & (b < cols),
                   other=0.0).to(tl.float32)


@triton.jit
def _write_fwd(h_ptr, z_ptr, carry_ptr, write_ptr, out_ptr, N, n, m, d,
               STATIC: tl.constexpr, BT: tl.constexpr, NP: tl.constexpr, MP: tl.constexpr, BD: tl.constexpr):
    t0 = tl.program_id(0) * BT
    t3 = t0 + tl.arange(0, BT)[:, None, None]
    j3 = tl.arange(0, NP)[None, :, None]
    i3 = tl.arange(0, MP)[None, :, None]
    carry_t = tl.permute(coef3(carry_ptr, t3, N, n, n, STATIC, BT, NP, NP), (0, 2, 1))  # [BT, NP(k), NP(j)]
    wc = coef3(write_ptr, t3, N, n, m, STATIC, BT, NP, MP)  # [BT, NP(k), MP(i)]
    for d0 in range(0, d, BD):
        dd3 = d0 + tl.arange(0, BD)[None, None, :]
        hmask = (t3 < N) & (j3 < n) & (dd3 < d)
        h3 = tl.load(h_ptr + t3.to(tl.int64) * n * d + j3 * d + dd3, mask=hmask, other=0.0).to(tl.float32)
        z3 = tl.load(z_ptr + t3.to(tl.int64) * m * d + i3 * d + dd3, mask=(t3 < N) & (i3 < m) & (dd3 < d),
                     other=0.0).to(tl.float32)
        out = tl.dot(carry_t, h3, input_precision="ieee") + tl.dot(wc, z3, input_precision="ieee")  # [BT, NP, BD]
        tl.store(out_ptr + t3.to(tl.int64) * n * d + j3 * d + dd3, to_output(out, out_ptr), mask=hmask)


@triton.jit
def _write_bwd(h_ptr, z_ptr, carry_ptr, write_ptr, g_ptr, gh_ptr, gz_ptr, gcarry_ptr, gwrite_ptr, N, n, m, d,
               STATIC: tl.constexpr, BT: tl.constexpr, NP: tl.constexpr, MP: tl.constexpr, BD: tl.constexpr):
    pid = tl.program_id(0)
    t0 = pid * BT
    t3 = t0 + tl.arange(0, BT)[:, None, None]
    j3 = tl.arange(0, NP)[None, :, None]
    i3 = tl.arange(0, MP)[None, :, None]
    cc = coef3(carry_ptr, t3, N, n, n, STATIC, BT, NP, NP)  # [BT, NP(j), NP(k)]
    wc_t = tl.permute(coef3(write_ptr, t3, N, n, m, STATIC, BT, NP, MP), (0, 2, 1))  # [BT, MP(i), NP(k)]
    g_cc = tl.zeros([BT, NP, NP], dtype=tl.float32)
    g_wc = tl.zeros([BT, NP, MP], dtype=tl.float32)
    for d0 in range(0, d, BD):
        dd3 = d0 + tl.arange(0, BD)[None, None, :]
        hmask = (t3 < N) & (j3 < n) & (dd3 < d)
        zmask = (t3 < N) & (i3 < m) & (dd3 < d)
        g3 = tl.load(g_ptr + t3.to(tl.int64) * n * d + j3 * d + dd3, mask=hmask, other=0.0).to(tl.float32)
        h3 = tl.load(h_ptr + t3.to(tl.int64) * n * d + j3 * d + dd3, mask=hmask, other=0.0).to(tl.float32)
        z3 = tl.load(z_ptr + t3.to(tl.int64) * m * d + i3 * d + dd3, mask=zmask, other=0.0).to(tl.float32)
        gh = tl.dot(cc, g3, input_precision="ieee")  # [BT, NP, BD]
        gz = tl.dot(wc_t, g3, input_precision="ieee")  # [BT, MP, BD]
        tl.store(gh_ptr + t3.to(tl.int64) * n * d + j3 * d + dd3, to_output(gh, gh_ptr), mask=hmask)
        tl.store(gz_ptr + t3.to(tl.int64) * m * d + i3 * d + dd3, to_output(gz, gz_ptr), mask=zmask)
        g_cc += tl.dot(h3, tl.permute(g3, (0, 2, 1)), input_precision="ieee")  # [BT, NP(j), NP(k)]
        g_wc += tl.dot(g3, tl.permute(z3, (0, 2, 1)), input_precision="ieee")  # [BT, NP(k), MP(i)]
    a = tl.arange(0, NP)[:, None]
    bn = tl.arange(0, NP)[None, :]
    bm = tl.arange(0, MP)[None, :]
    if STATIC:
        # one partial sum per program: [programs, n, n] and [programs, n, m]
        tl.store(gcarry_ptr + pid * n * n + a * n + bn, tl.sum(g_cc, axis=0), mask=(a < n) & (bn < n))
        tl.store(gwrite_ptr + pid * n * m + a * m + bm, tl.sum(g_wc, axis=0), mask=(a < n) & (bm < m))
    else:
        a3 = tl.arange(0, NP)[None, :, None]
        bn3 = tl.arange(0, NP)[None, None, :]
        bm3 = tl.arange(0, MP)[None, None, :]
        tl.store(gcarry_ptr + t3.to(tl.int64) * n * n + a3 * n + bn3, g_cc, mask=(t3 < N) & (a3 < n) & (bn3 < n))
        tl.store(gwrite_ptr + t3.to(tl.int64) * n * m + a3 * m + bm3, g_wc, mask=(t3 < N) & (a3 < n) & (bm3 < m))


def coefficients(carry_c, write_c, N, n, m):
    static = write_c.dim() == 2
    if static:
        return True, carry_c.float().contiguous(), write_c.float().contiguous()
    return False, carry_c.reshape(N, n, n).float().contiguous(), write_c.reshape(N, n, m).float().contiguous()


def write(h, z, carry_c, write_c):
    """Triton version of :func:`kernels.reference.write`: ``[N, n, d], [N, m, d] -> [N, n, d]`` in the dtype of
    ``h`` and ``z`` promoted (the kernel loads each in its own dtype)."""
    n, m = write_c.shape[-2:]
    h, N, d = state_view(h, n, m)
    z = contiguous3(z, m, d, "z")
    static, cc, wc = coefficients(carry_c, write_c, N, n, m)
    out = torch.empty_like(h, dtype=torch.promote_types(h.dtype, z.dtype))  # reference.state_dtype
    if N:
        bt, bd = blocks(n, d)
        _write_fwd[(triton.cdiv(N, bt),)](h, z, cc, wc, out, N, n, m, d, STATIC=static, BT=bt, NP=pow2(n),
                                          MP=pow2(m), BD=bd)
    return out


def write_backward(h, z, carry_c, write_c, grad_out):
    """Triton version of :func:`kernels.reference.write_backward`."""
    n, m = write_c.shape[-2:]
    h, N, d = state_view(h, n, m)
    z = contiguous3(z, m, d, "z")
    g = contiguous3(grad_out, n, d, "grad_out")
    static, cc, wc = coefficients(carry_c, write_c, N, n, m)
    bt, bd = blocks(n, d)
    programs = triton.cdiv(N, bt)
    g_h, g_z = torch.empty_like(h), torch.empty_like(z)
    if static:
        g_cc = torch.zeros((max(programs, 1), n, n), device=h.device, dtype=torch.float32)
        g_wc = torch.zeros((max(programs, 1), n, m), device=h.device, dtype=torch.float32)
    else:
        g_cc = torch.empty((N, n, n), device=h.device, dtype=torch.float32)
        g_wc = torch.empty((N, n, m), device=h.device, dtype=torch.float32)
    if N:
        _write_bwd[(programs,)](h, z, cc, wc, g, g_h, g_z, g_cc, g_wc, N, n, m, d, STATIC=static, BT=bt,
                                NP=pow2(n), MP=pow2(m), BD=bd)
    if static:
        g_cc, g_wc = g_cc.sum(0), g_wc.sum(0)
    return g_h, g_z, g_cc.reshape(carry_c.shape).to(carry_c.dtype), g_wc.reshape(write_c.shape).to(write_c.dtype)
