"""Static GHC read ``X = A_read^T H`` (one pass over the state) and its backward (``dL/dH = A_read gX`` per token,
``dL/dA_read = sum_t H gX^T`` as one fp32 partial sum per program, summed with torch). Matches
:func:`kernels.reference.read_static` / :func:`kernels.reference.read_static_backward`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import blocks, contiguous3, pow2, state_view
from .triton_helpers import to_output


@triton.jit
def _read_static_fwd(h_ptr, read_ptr, x_ptr, N, n, m, d,
                     BT: tl.constexpr, NP: tl.constexpr, MP: tl.constexpr, BD: tl.constexpr):
    t0 = tl.program_id(0) * BT
    t3 = t0 + tl.arange(0, BT)[:, None, None]
    j3 = tl.arange(0, NP)[None, :, None]
    i3 = tl.arange(0, MP)[None, :, None]
    a = tl.arange(0, MP)[None, :, None]
    b = tl.arange(0, NP)[None, None, :]
    read_t = tl.load(read_ptr + b * m + a, mask=(a < m) & (b < n), other=0.0).to(tl.float32)  # [1, MP, NP]
    read_t = tl.broadcast_to(read_t, (BT, MP, NP))
    for d0 in range(0, d, BD):
        dd3 = d0 + tl.arange(0, BD)[None, None, :]
        h3 = tl.load(h_ptr + t3.to(tl.int64) * n * d + j3 * d + dd3, mask=(t3 < N) & (j3 < n) & (dd3 < d),
                     other=0.0).to(tl.float32)
        x3 = tl.dot(read_t, h3, input_precision="ieee")  # [BT, MP, BD]
        tl.store(x_ptr + t3.to(tl.int64) * m * d + i3 * d + dd3, to_output(x3, x_ptr),
                 mask=(t3 < N) & (i3 < m) & (dd3 < d))


@triton.jit
def _read_static_bwd(h_ptr, read_ptr, gx_ptr, gh_ptr, gread_ptr, N, n, m, d,
                     BT: tl.constexpr, NP: tl.constexpr, MP: tl.constexpr, BD: tl.constexpr):
    pid = tl.program_id(0)
    t0 = pid * BT
    t3 = t0 + tl.arange(0, BT)[:, None, None]
    j3 = tl.arange(0, NP)[None, :, None]
    i3 = tl.arange(0, MP)[None, :, None]
    a = tl.arange(0, NP)[None, :, None]
    b = tl.arange(0, MP)[None, None, :]
    rd = tl.broadcast_to(tl.load(read_ptr + a * m + b, mask=(a < n) & (b < m), other=0.0).to(tl.float32),
                         (BT, NP, MP))
    g_read = tl.zeros([BT, NP, MP], dtype=tl.float32)
    for d0 in range(0, d, BD):
        dd3 = d0 + tl.arange(0, BD)[None, None, :]
        hmask = (t3 < N) & (j3 < n) & (dd3 < d)
        gx3 = tl.load(gx_ptr + t3.to(tl.int64) * m * d + i3 * d + dd3, mask=(t3 < N) & (i3 < m) & (dd3 < d),
                      other=0.0).to(tl.float32)
        h3 = tl.load(h_ptr + t3.to(tl.int64) * n * d + j3 * d + dd3, mask=hmask, other=0.0).to(tl.float32)
        gh = tl.dot(rd, gx3, input_precision="ieee")  # [BT, NP, BD]
        tl.store(gh_ptr + t3.to(tl.int64) * n * d + j3 * d + dd3, to_output(gh, gh_ptr), mask=hmask)
        g_read += tl.dot(h3, tl.permute(gx3, (0, 2, 1)), input_precision="ieee")  # [BT, NP, MP]
    r2 = tl.arange(0, NP)[:, None]
    c2 = tl.arange(0, MP)[None, :]
    tl.store(gread_ptr + pid * n * m + r2 * m + c2, tl.sum(g_read, axis=0), mask=(r2 < n) & (c2 < m))


def read_static(h, read):
    """Triton version of :func:`kernels.reference.read_static`: ``[N, n, d] -> [N, m, d]``."""
    n, m = read.shape
    h, N, d = state_view(h, n, m)
    x = torch.empty((N, m, d), device=h.device, dtype=h.dtype)
    if N:
        bt, bd = blocks(n, d)
        _read_static_fwd[(triton.cdiv(N, bt),)](h, read.float().contiguous(), x, N, n, m, d, BT=bt, NP=pow2(n),
                                                MP=pow2(m), BD=bd)
    return x


def read_static_backward(h, read, grad_x):
    """Triton version of :func:`kernels.reference.read_static_backward`."""
    n, m = read.shape
    h, N, d = state_view(h, n, m)
    gx = contiguous3(grad_x, m, d, "grad_x")
    bt, bd = blocks(n, d)
    programs = triton.cdiv(N, bt)
    g_h = torch.empty_like(h)
    g_read = torch.zeros((max(programs, 1), n, m), device=h.device, dtype=torch.float32)
    if N:
        _read_static_bwd[(programs,)](h, read.float().contiguous(), gx, g_h, g_read, N, n, m, d, BT=bt,
                                      NP=pow2(n), MP=pow2(m), BD=bd)
    return g_h, g_read.sum(0).to(read.dtype)
