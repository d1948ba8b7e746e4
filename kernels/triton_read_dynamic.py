"""Fused dynamic GHC read (vwn-math.md): one program computes, for BT tokens,

* pass 1 over the state: the per-slot sum of squares and ``U = H @ (g * W)`` for the read, carry and write gates;
* in registers: ``1/rms``, ``logits = U / rms / sqrt(d)``, ``coef = static + scale * tanh(logits)``;
* pass 2 over the state: ``X = Read^T H``.

Outputs match :func:`kernels.reference.read_dynamic`: ``x`` ``[N, m, d]`` (model dtype), ``carry_c``
``[N, n, n]``, ``write_c`` ``[N, n, m]`` and ``stats = [logits | 1/rms]`` ``[N, n, 2m+n+1]`` (fp32).

The backward kernel recomputes nothing but ``tanh``: from ``stats`` and ``grad_x`` it forms the coefficient
gradients (pass 1: ``dL/dRead = H gX^T``) and ``dL/dH`` (pass 2); the parameter gradients are small reductions
over tokens plus one GEMM, done with torch on the kernel's ``g_coef`` output.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .triton_common import blocks, contiguous3, pow2, state_view
from .triton_helpers import tanh, to_output


@triton.jit
def _load_cols(ptr, rows, row_stride, col0, ncols, COLS: tl.constexpr, row_mask):
    # [R, COLS] fp32 block of a row-major matrix: columns col0 .. col0+ncols-1, zero padded
    c = tl.arange(0, COLS)[None, :]
    return tl.load(ptr + rows[:, None] * row_stride + col0 + c, mask=row_mask[:, None] & (c < ncols),
                   other=0.0).to(tl.float32)


@triton.jit
def wg_chunk(wg_ptr, dd, d, K, col0, ncols, COLS: tl.constexpr):
    # [BD, COLS] chunk of wg [d, K]: rows dd, columns col0 .. col0+ncols-1
    c = tl.arange(0, COLS)[None, :]
    return tl.load(wg_ptr + dd[:, None] * K + col0 + c, mask=(dd[:, None] < d) & (c < ncols), other=0.0)


@triton.jit
def gates_and_store(ss, u_r, u_c, u_w, tok, slot, row_ok, static_ptr, scale_ptr, carry_ptr, write_ptr, stats_ptr,
                     n, m, d, eps, inv_sqrt_d, NP: tl.constexpr, MP: tl.constexpr):
    """From the per-row sum of squares and gate projections ``U`` of rows (token, slot): ``1/rms``, the logits
    and ``coef = static + scale * tanh(logits)``; stores carry/write coefficients and ``[logits | 1/rms]``,
    returns the read coefficients ``[R, MP]`` (fp32)."""
    K = 2 * m + n
    inv_rms = 1.0 / tl.sqrt(ss / d + eps)  # [R]
    f = (inv_rms * inv_sqrt_d)[:, None]
    l_r, l_c, l_w = u_r * f, u_c * f, u_w * f  # logits
    c_r = _load_cols(static_ptr, slot, K, 0, m, MP, row_ok) + _load_cols(scale_ptr, slot, K, 0, m, MP, row_ok) * tanh(l_r)
    c_c = _load_cols(static_ptr, slot, K, m, n, NP, row_ok) + _load_cols(scale_ptr, slot, K, m, n, NP, row_ok) * tanh(l_c)
    c_w = _load_cols(static_ptr, slot, K, m + n, m, MP, row_ok) + \
        _load_cols(scale_ptr, slot, K, m + n, m, MP, row_ok) * tanh(l_w)
    cm = tl.arange(0, MP)[None, :]
    cn = tl.arange(0, NP)[None, :]
    srow = (tok.to(tl.int64) * n + slot)[:, None]  # [R, 1] row index into [N*n, .]
    ok = row_ok[:, None]
    tl.store(stats_ptr + srow * (K + 1) + cm, l_r, mask=ok & (cm < m))
    tl.store(stats_ptr + srow * (K + 1) + m + cn, l_c, mask=ok & (cn < n))
    tl.store(stats_ptr + srow * (K + 1) + m + n + cm, l_w, mask=ok & (cm < m))
    tl.store(stats_ptr + srow * (K + 1) + K, inv_rms[:, None], mask=ok)
    tl.store(carry_ptr + srow * n + cn, c_c, mask=ok & (cn < n))
    tl.store(write_ptr + srow * m + cm, c_w, mask=ok & (cm < m))
    return c_r


@triton.jit
def _read_dynamic_fwd(h_ptr, wg_ptr, static_ptr, scale_ptr, x_ptr, carry_ptr, write_ptr, stats_ptr,
                      N, n, m, d, eps, inv_sqrt_d,
                      BT: tl.constexpr, NP: tl.constexpr, MP: tl.constexpr, BD: tl.constexpr):
    K = 2 * m + n
    R: tl.constexpr = BT * NP
    t0 = tl.program_id(0) * BT
    r = tl.arange(0, R)
    tok = t0 + r // NP  # [R]: rows are (token, slot) pairs
    slot = r % NP
    row_ok = (tok < N) & (slot < n)
    row_base = tok.to(tl.int64) * n * d + slot * d  # [R]

    # pass 1: sum of squares and the three gate projections
    ss = tl.zeros([R], dtype=tl.float32)
    u_r = tl.zeros([R, MP], dtype=tl.float32)
    u_c = tl.zeros([R, NP], dtype=tl.float32)
    u_w = tl.zeros([R, MP], dtype=tl.float32)
    for d0 in range(0, d, BD):
        dd = d0 + tl.arange(0, BD)
        hc = tl.load(h_ptr + row_base[:, None] + dd[None, :], mask=row_ok[:, None] & (dd[None, :] < d),
                     other=0.0).to(tl.float32)  # [R, BD]
        ss += tl.sum(hc * hc, axis=1)
        u_r += tl.dot(hc, wg_chunk(wg_ptr, dd, d, K, 0, m, MP), input_precision="ieee")
        u_c += tl.dot(hc, wg_chunk(wg_ptr, dd, d, K, m, n, NP), input_precision="ieee")
        u_w += tl.dot(hc, wg_chunk(wg_ptr, dd, d, K, m + n, m, MP), input_precision="ieee")

    c_r = gates_and_store(ss, u_r, u_c, u_w, tok, slot, row_ok, static_ptr, scale_ptr, carry_ptr, write_ptr,
                           stats_ptr, n, m, d, eps, inv_sqrt_d, NP, MP)

    # pass 2: X[t] = Read[t]^T H[t], batched over the BT tokens
    read_t = tl.permute(tl.reshape(c_r, (BT, NP, MP)), (0, 2, 1))  # [BT, MP, NP]
    t3 = t0 + tl.arange(0, BT)[:, None, None]
    j3 = tl.arange(0, NP)[None, :, None]
    i3 = tl.arange(0, MP)[None, :, None]
    for d0 in range(0, d, BD):
        dd3 = d0 + tl.arange(0, BD)[None, None, :]
        h3 = tl.load(h_ptr + t3.to(tl.int64) * n * d + j3 * d + dd3, mask=(t3 < N) & (j3 < n) & (dd3 < d),
                     other=0.0).to(tl.float32)  # [BT, NP, BD]
        x3 = tl.dot(read_t, h3, input_precision="ieee")  # [BT, MP, BD]
        tl.store(x_ptr + t3.to(tl.int64) * m * d + i3 * d + dd3, to_output(x3, x_ptr),
                 mask=(t3 < N) & (i3 < m) & (dd3 < d))


@triton.jit
def _read_dynamic_bwd(h_ptr, gx_ptr, gcarry_ptr, gwrite_ptr, stats_ptr, wg_ptr, static_ptr, scale_ptr,
                      gh_ptr, gcoef_ptr, N, n, m, d, inv_sqrt_d,
                      BT: tl.constexpr, NP: tl.constexpr, MP: tl.constexpr, BD: tl.constexpr):
    K = 2 * m + n
    R: tl.constexpr = BT * NP
    t0 = tl.program_id(0) * BT
    r = tl.arange(0, R)
    tok = t0 + r // NP
    slot = r % NP
    row_ok = (tok < N) & (slot < n)
    t3 = t0 + tl.arange(0, BT)[:, None, None]
    j3 = tl.arange(0, NP)[None, :, None]
    i3 = tl.arange(0, MP)[None, :, None]

    # pass 1: dL/dRead[t] = H[t] gX[t]^T  [NP, MP]
    g_read3 = tl.zeros([BT, NP, MP], dtype=tl.float32)
    for d0 in range(0, d, BD):
        dd3 = d0 + tl.arange(0, BD)[None, None, :]
        h3 = tl.load(h_ptr + t3.to(tl.int64) * n * d + j3 * d + dd3, mask=(t3 < N) & (j3 < n) & (dd3 < d),
                     other=0.0).to(tl.float32)  # [BT, NP, BD]
        gx3 = tl.load(gx_ptr + t3.to(tl.int64) * m * d + i3 * d + dd3, mask=(t3 < N) & (i3 < m) & (dd3 < d),
                      other=0.0).to(tl.float32)  # [BT, MP, BD]
        g_read3 += tl.dot(h3, tl.permute(gx3, (0, 2, 1)), input_precision="ieee")
    g_r = tl.reshape(g_read3, (R, MP))

    srow = tok.to(tl.int64) * n + slot  # [R]
    l_r = _load_cols(stats_ptr, srow, K + 1, 0, m, MP, row_ok)
    l_c = _load_cols(stats_ptr, srow, K + 1, m, n, NP, row_ok)
    l_w = _load_cols(stats_ptr, srow, K + 1, m + n, m, MP, row_ok)
    inv_rms = tl.load(stats_ptr + srow * (K + 1) + K, mask=row_ok, other=1.0)  # [R]
    g_c = _load_cols(gcarry_ptr, srow, n, 0, n, NP, row_ok)
    g_w = _load_cols(gwrite_ptr, srow, m, 0, m, MP, row_ok)

    cm = tl.arange(0, MP)[None, :]
    cn = tl.arange(0, NP)[None, :]
    ok = row_ok[:, None]
    tl.store(gcoef_ptr + srow[:, None] * K + cm, g_r, mask=ok & (cm < m))
    tl.store(gcoef_ptr + srow[:, None] * K + m + cn, g_c, mask=ok & (cn < n))
    tl.store(gcoef_ptr + srow[:, None] * K + m + n + cm, g_w, mask=ok & (cm < m))

    th_r, th_c, th_w = tanh(l_r), tanh(l_c), tanh(l_w)
    gl_r = g_r * _load_cols(scale_ptr, slot, K, 0, m, MP, row_ok) * (1.0 - th_r * th_r)  # through tanh
    gl_c = g_c * _load_cols(scale_ptr, slot, K, m, n, NP, row_ok) * (1.0 - th_c * th_c)
    gl_w = g_w * _load_cols(scale_ptr, slot, K, m + n, m, MP, row_ok) * (1.0 - th_w * th_w)
    f = (inv_rms * inv_sqrt_d)[:, None]
    gu_r, gu_c, gu_w = gl_r * f, gl_c * f, gl_w * f  # through logits = U * inv_rms / sqrt(d)
    # through inv_rms = (|h|^2/d + eps)^(-1/2): dL/dh += (sum_k gl * logits / inv_rms) * (-inv_rms^3 / d) * h
    g_inv = (tl.sum(gl_r * l_r, axis=1) + tl.sum(gl_c * l_c, axis=1) + tl.sum(gl_w * l_w, axis=1)) / inv_rms
    alpha = g_inv * inv_rms * inv_rms * inv_rms * (-1.0 / d)  # [R]
    c_r = _load_cols(static_ptr, slot, K, 0, m, MP, row_ok) + _load_cols(scale_ptr, slot, K, 0, m, MP, row_ok) * th_r
    read3 = tl.reshape(c_r, (BT, NP, MP))

    # pass 2: dL/dH = Read gX + gU wg^T + alpha * H
    row_base = tok.to(tl.int64) * n * d + slot * d
    for d0 in range(0, d, BD):
        dd = d0 + tl.arange(0, BD)
        dd3 = d0 + tl.arange(0, BD)[None, None, :]
        gx3 = tl.load(gx_ptr + t3.to(tl.int64) * m * d + i3 * d + dd3, mask=(t3 < N) & (i3 < m) & (dd3 < d),
                      other=0.0).to(tl.float32)  # [BT, MP, BD]
        gh = tl.reshape(tl.dot(read3, gx3, input_precision="ieee"), (R, BD))
        gh += tl.dot(gu_r, tl.trans(wg_chunk(wg_ptr, dd, d, K, 0, m, MP)), input_precision="ieee")
        gh += tl.dot(gu_c, tl.trans(wg_chunk(wg_ptr, dd, d, K, m, n, NP)), input_precision="ieee")
        gh += tl.dot(gu_w, tl.trans(wg_chunk(wg_ptr, dd, d, K, m + n, m, MP)), input_precision="ieee")
        hmask = row_ok[:, None] & (dd[None, :] < d)
        hc = tl.load(h_ptr + row_base[:, None] + dd[None, :], mask=hmask, other=0.0).to(tl.float32)
        gh += alpha[:, None] * hc
        tl.store(gh_ptr + row_base[:, None] + dd[None, :], to_output(gh, gh_ptr), mask=hmask)


def _stacked(a_read, a_carry, a_write):
    # [n, 2m+n] fp32: [read | carry | write^T], as the reference stacks them
    return torch.cat([a_read.float(), a_carry.float(), a_write.float().t()], dim=1).contiguous()


def read_launch(h, N, n, m, d, norm_weight, proj, read, carry, write, scale_read, scale_carry, scale_write):
    """What every kernel ending in a dynamic read takes and fills: ``(wg, static maps, scales)`` (fp32) and the
    empty outputs ``(x [N, m, d] model dtype, carry_c [N, n, n], write_c [N, n, m], stats [N, n, 2m+n+1])``."""
    wg = (norm_weight.float()[:, None] * proj.float()).contiguous()  # [d, K]: the gain folded into W
    gate_inputs = (wg, _stacked(read, carry, write), _stacked(scale_read, scale_carry, scale_write))
    outputs = (torch.empty((N, m, d), device=h.device, dtype=h.dtype),
               torch.empty((N, n, n), device=h.device, dtype=torch.float32),
               torch.empty((N, n, m), device=h.device, dtype=torch.float32),
               torch.empty((N, n, 2 * m + n + 1), device=h.device, dtype=torch.float32))
    return gate_inputs, outputs


def read_dynamic(h, norm_weight, proj, read, carry, write, scale_read, scale_carry, scale_write, eps):
    """Triton version of :func:`kernels.reference.read_dynamic` (same arguments, shapes and outputs)."""
    n, m = read.shape
    h, N, d = state_view(h, n, m)
    gate_inputs, outputs = read_launch(h, N, n, m, d, norm_weight, proj, read, carry, write, scale_read,
                                       scale_carry, scale_write)
    if N:
        bt, bd = blocks(n, d)
        _read_dynamic_fwd[(triton.cdiv(N, bt),)](h, *gate_inputs, *outputs, N, n, m, d, float(eps), 1.0 / math.sqrt(d),
                                                 BT=bt, NP=pow2(n), MP=pow2(m), BD=bd)
    return outputs


def read_dynamic_backward(h, norm_weight, proj, read, carry, write, scale_read, scale_carry, scale_write, eps,
                          stats, grad_x, grad_carry_c, grad_write_c):
    """Triton version of :func:`kernels.reference.read_dynamic_backward`."""
    n, m = read.shape
    h, N, d = state_view(h, n, m)
    K = 2 * m + n
    gain, w = norm_weight.float(), proj.float()
    wg = (gain[:, None] * w).contiguous()
    scales = _stacked(scale_read, scale_carry, scale_write)
    g_h = torch.empty_like(h)
    g_coef = torch.empty((N, n, K), device=h.device, dtype=torch.float32)
    stats = stats.reshape(N, n, K + 1).float().contiguous()
    if N:
        bt, bd = blocks(n, d)
        _read_dynamic_bwd[(triton.cdiv(N, bt),)](
            h, contiguous3(grad_x, m, d, "grad_x"), grad_carry_c.reshape(N, n, n).float().contiguous(),
            grad_write_c.reshape(N, n, m).float().contiguous(), stats, wg, _stacked(read, carry, write), scales,
            g_h, g_coef, N, n, m, d, 1.0 / math.sqrt(d), BT=bt, NP=pow2(n), MP=pow2(m), BD=bd)
    # parameter gradients: sums over tokens of [N, n, K] tensors and one GEMM for the projection
    logits, inv_rms = stats[..., :K], stats[..., K:]
    c = torch.tanh(logits)
    g_static = g_coef.sum(0)  # [n, K]
    g_scales = (g_coef * c).sum(0)
    g_u = g_coef * scales * (1.0 - c * c) * (inv_rms / math.sqrt(d))  # [N, n, K]
    g_wg = (g_u.reshape(-1, K).t() @ h.reshape(-1, d).float()).t()  # [d, K]
    g_proj = g_wg * gain[:, None]
    g_norm_weight = (g_wg * w).sum(1)
    grads = (g_h, g_norm_weight, g_proj, g_static[:, :m], g_static[:, m:m + n], g_static[:, m + n:].t(),
             g_scales[:, :m], g_scales[:, m:m + n], g_scales[:, m + n:].t())
    inputs = (h, norm_weight, proj, read, carry, write, scale_read, scale_carry, scale_write)
    return tuple(g if i == 0 else g.to(t.dtype).contiguous().clone() for i, (g, t) in enumerate(zip(grads, inputs)))
