"""Cross-layer fusion: the write + carry of sublayer l and the coefficients + read of sublayer l+1 in one kernel.

Pass 1 walks the slot width once: it reads ``H`` and ``Z``, forms ``H' = WriteT Z + Carry^T H``, writes ``H'``
and, from the same registers, accumulates the next GHC's per-slot sum of squares and gate projections. After the
coefficients, pass 2 reads ``H'`` once for ``X = Read'^T H'``. Unfused, the next read would read ``H'`` twice
(once for the coefficients, once for ``X``): the fusion saves one full read of the over-width state per
sublayer boundary. Outputs: ``(h_new, x, carry_c, write_c, stats)`` as :func:`triton_write.write` followed by
:func:`triton_read_dynamic.read_dynamic`.

The backward composes the two backward kernels (read of l+1 first, its ``dL/dH'`` added to the incoming one,
then the write of l: the FMA write backward for n <= ``FMA_MAX_N``).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .triton_common import blocks, contiguous3, pow2, state_view
from .triton_helpers import to_output
from .triton_read_dynamic import gates_and_store, wg_chunk, read_dynamic_backward, read_launch
from . import triton_write, triton_write_fma
from .triton_write import coef3, coefficients


@triton.jit
def _write_read_fwd(h_ptr, z_ptr, carry_ptr, write_ptr, hn_ptr, wg_ptr, static_ptr, scale_ptr, x_ptr,
                    carry2_ptr, write2_ptr, stats_ptr, N, n, m, d, eps, inv_sqrt_d,
                    STATIC: tl.constexpr, BT: tl.constexpr, NP: tl.constexpr, MP: tl.constexpr,
                    BD: tl.constexpr):
    K = 2 * m + n
    R: tl.constexpr = BT * NP
    t0 = tl.program_id(0) * BT
    t3 = t0 + tl.arange(0, BT)[:, None, None]
    j3 = tl.arange(0, NP)[None, :, None]
    i3 = tl.arange(0, MP)[None, :, None]
    carry_t = tl.permute(coef3(carry_ptr, t3, N, n, n, STATIC, BT, NP, NP), (0, 2, 1))  # [BT, NP(k), NP(j)]
    wc = coef3(write_ptr, t3, N, n, m, STATIC, BT, NP, MP)  # [BT, NP(k), MP(i)]

    # pass 1: H' chunk by chunk, written once, and the next GHC's statistics from the same registers
    ss = tl.zeros([R], dtype=tl.float32)
    u_r = tl.zeros([R, MP], dtype=tl.float32)
    u_c = tl.zeros([R, NP], dtype=tl.float32)
    u_w = tl.zeros([R, MP], dtype=tl.float32)
    for d0 in range(0, d, BD):
        dd = d0 + tl.arange(0, BD)
        dd3 = d0 + tl.arange(0, BD)[None, None, :]
        hmask = (t3 < N) & (j3 < n) & (dd3 < d)
        h3 = tl.load(h_ptr + t3.to(tl.int64) * n * d + j3 * d + dd3, mask=hmask, other=0.0).to(tl.float32)
        z3 = tl.load(z_ptr + t3.to(tl.int64) * m * d + i3 * d + dd3, mask=(t3 < N) & (i3 < m) & (dd3 < d),
                     other=0.0).to(tl.float32)
        out = tl.dot(carry_t, h3, input_precision="ieee") + tl.dot(wc, z3, input_precision="ieee")  # [BT, NP, BD]
        out = to_output(out, hn_ptr)  # the next GHC sees exactly the stored (model dtype) state
        tl.store(hn_ptr + t3.to(tl.int64) * n * d + j3 * d + dd3, out, mask=hmask)
        o2 = tl.reshape(out.to(tl.float32), (R, BD))
        ss += tl.sum(o2 * o2, axis=1)
        u_r += tl.dot(o2, wg_chunk(wg_ptr, dd, d, K, 0, m, MP), input_precision="ieee")
        u_c += tl.dot(o2, wg_chunk(wg_ptr, dd, d, K, m, n, NP), input_precision="ieee")
        u_w += tl.dot(o2, wg_chunk(wg_ptr, dd, d, K, m + n, m, MP), input_precision="ieee")

    r = tl.arange(0, R)
    tok = t0 + r // NP
    slot = r % NP
    row_ok = (tok < N) & (slot < n)
    c_r = gates_and_store(ss, u_r, u_c, u_w, tok, slot, row_ok, static_ptr, scale_ptr, carry2_ptr, write2_ptr,
                           stats_ptr, n, m, d, eps, inv_sqrt_d, NP, MP)

    tl.debug_barrier()  # H' written by other threads of this program must be visible to the loads below
    read_t = tl.permute(tl.reshape(c_r, (BT, NP, MP)), (0, 2, 1))  # [BT, MP, NP]
    for d0 in range(0, d, BD):
        dd3 = d0 + tl.arange(0, BD)[None, None, :]
        hn3 = tl.load(hn_ptr + t3.to(tl.int64) * n * d + j3 * d + dd3, mask=(t3 < N) & (j3 < n) & (dd3 < d),
                      other=0.0).to(tl.float32)
        x3 = tl.dot(read_t, hn3, input_precision="ieee")  # [BT, MP, BD]
        tl.store(x_ptr + t3.to(tl.int64) * m * d + i3 * d + dd3, to_output(x3, x_ptr),
                 mask=(t3 < N) & (i3 < m) & (dd3 < d))


def write_read_dynamic(h, z, carry_c, write_c, norm_weight, proj, read, carry, write, scale_read, scale_carry,
                       scale_write, eps):
    """``write(h, z, carry_c, write_c)`` then ``read_dynamic`` of the next GHC on the result, fused."""
    n, m = read.shape
    if tuple(write_c.shape[-2:]) != (n, m):
        raise ValueError(f"the fused write+read needs the same (n, m) on both sides, got {tuple(write_c.shape[-2:])} "
                         f"and {(n, m)}")
    h, N, d = state_view(h, n, m)
    z = contiguous3(z, m, d, "z")
    static, cc, wc = coefficients(carry_c, write_c, N, n, m)
    h_new = torch.empty_like(h, dtype=torch.promote_types(h.dtype, z.dtype))  # reference.state_dtype
    # the read outputs (x) take the dtype of the state they read: H'
    gate_inputs, outputs = read_launch(h_new, N, n, m, d, norm_weight, proj, read, carry, write, scale_read,
                                       scale_carry, scale_write)
    if N:
        bt, bd = blocks(n, d)
        _write_read_fwd[(triton.cdiv(N, bt),)](
            h, z, cc, wc, h_new, *gate_inputs, *outputs, N, n, m, d, float(eps), 1.0 / math.sqrt(d), STATIC=static,
            BT=bt, NP=pow2(n), MP=pow2(m), BD=bd)
    return (h_new, *outputs)


def write_read_dynamic_backward(h, z, carry_c, write_c, norm_weight, proj, read, carry, write, scale_read,
                                scale_carry, scale_write, eps, h_new, stats, grad_h_new, grad_x, grad_carry2,
                                grad_write2):
    """Gradients for ``(h, z, carry_c, write_c)`` and the next GHC's nine parameters (its ``dL/dH'`` part folded
    into the write's incoming gradient)."""
    g_read = read_dynamic_backward(h_new, norm_weight, proj, read, carry, write, scale_read, scale_carry,
                                   scale_write, eps, stats, grad_x, grad_carry2, grad_write2)
    g_total = g_read[0].float() + grad_h_new.reshape(g_read[0].shape).float()
    n, m = read.shape
    write_kernels = triton_write_fma if triton_write_fma.supports(n, m) else triton_write
    g_h, g_z, g_cc, g_wc = write_kernels.write_backward(h, z, carry_c, write_c, g_total.to(h_new.dtype))
    return (g_h, g_z, g_cc, g_wc) + tuple(g_read[1:])
