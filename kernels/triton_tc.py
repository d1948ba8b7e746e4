"""GHC kernels on tensor cores, for the slot counts the FMA kernels do not unroll (n > ``FMA_MAX_N``, up to
``MAX_N`` = 64 slots and ``MAX_M`` = 16 backbone slots, checked by ``state_view``; any slot width d): the
tensor-core path of ``shared/spec/gpu-kernels.md`` section 3.

A program owns whole tokens (``TPP`` of them, one after the other) and walks the slot width in chunks of ``BD``.
Per token the mixing is a small matrix product with the slot width as the long side, run by ``tl.dot``:

* write + carry: ``H'[n, BD] = Carry^T[n, n] H[n, BD] + WriteT[n, m] Z[m, BD]``;
* read: ``X[m, BD] = Read^T[m, n] H[n, BD]``;
* dynamic gates: ``U[n, 2m+n] = H[n, d] wg[d, 2m+n]`` summed over the chunks, then ``1/rms``, the logits and
  ``static + scale * tanh(logit)`` on the ``[n, 2m+n]`` tile in registers.

The write + carry (forward; backward where it has a spill-free launch: :data:`LAUNCH`) and the dynamic read
forward also come batched ("tc-v2", ``*_batched`` kernels): a program takes ``TB`` tokens at once (``TB * NP`` = 128
state rows per tile) and runs batched 3-D products (the dynamic read's projection as one ``[TB*NP, BD] @ [BD, *]``
product per chunk); which kernels run at which slot count, width and dtype: ``triton_common.BATCHED_TOKENS`` /
``PER_TOKEN_TC``, :data:`LAUNCH` and :func:`_tokens`.

Slot counts are padded to 16 (``NP``, ``MP``: the smallest ``tl.dot`` side) by masked loads, which read nothing
for the padding; the state is read in its own dtype, never copied to fp32 in HBM.

Precision (the reference mixes in fp32): state tiles are exact ``tl.dot`` operands in bf16; the fp32
coefficients are split into bf16 parts by truncating the mantissa (``_split``: hi + lo, or hi + mid + lo where
an fp32 output must match the reference to ~1e-7: the projection behind the gates and the ``dL/dwg`` parameter
gradient), with fp32 accumulation. fp16 and fp32 states use fp32 operands with ``input_precision="tf32x3"``.
Products of two state-dtype tiles (coefficient gradients such as ``dL/dCarry = H dL/dH'^T``) are exact.

Coefficient gradients: per token (dynamic) stored once; summed over a program's tokens into one fp32 partial per
program (static maps, and ``dL/dwg`` per token group and chunk) that torch sums in a fixed order afterwards:
deterministic, no atomics.

The Triton interpreter misreads bf16/fp16 ``tl.dot`` operands, so under ``TRITON_INTERPRET=1`` a split product
runs as one fp32 dot of the parts summed back (:func:`_coef_data`): the same products, exact either way, so the
interpreter checks the same arithmetic (not ``tf32x3``'s rounding, which is fp32-exact there).

Matches :mod:`kernels.reference`; launch parameters: :func:`configs`.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .triton_common import (BATCHED_TOKENS, aligned, contiguous3, dynamic_read_parameter_grads, gate_maps,
                           interpreting, launch_kwargs, pow2, state_view, tc_batched_tokens, write_coefficients)
from .measured import TENSOR_CORE, TENSOR_CORE_BATCHED
from .reference import gate_slots
from .triton_helpers import tanh, to_output

KERNEL_ID = TENSOR_CORE  # measured.py keeps the kernel versions
INTERPRETED = tl.constexpr(interpreting())


# ---------------------------------------------------------------------------------------------------------------
# device helpers: one tl.dot, coefficient splits, mixed products
# ---------------------------------------------------------------------------------------------------------------
@triton.jit
def _coef_data(c, x, acc, PARTS: tl.constexpr, COEF_LEFT: tl.constexpr):
    """``acc + c @ x`` (``COEF_LEFT``) or ``acc + x @ c``: fp32 coefficients ``c`` times a state-dtype tile ``x``,
    accumulated in fp32.

    bf16 ``x``: ``c`` as the sum of PARTS (2 or 3) bf16-exact parts, one bf16 ``tl.dot`` each (relative error of
    ``c`` ~2^-16 with 2 parts, ~2^-24 with 3). Under the interpreter the parts are summed back in fp32 and
    multiplied in one fp32 dot: the same products, exact either way (its ``tl.dot`` misreads bf16 operands, and
    each extra nested call costs it ~0.3 ms). fp16/fp32 ``x``: fp32 operands, ``tf32x3``."""
    if x.dtype == tl.bfloat16:
        # parts: fp32 values with the low 16 mantissa bits cleared, so exactly bf16 (a bit mask, inline: the same on
        # GPU and in the interpreter, whose fp32 -> bf16 cast truncates where the GPU rounds)
        hi = (c.to(tl.uint32, bitcast=True) & 0xFFFF0000).to(tl.float32, bitcast=True)
        rest = c - hi
        mid = (rest.to(tl.uint32, bitcast=True) & 0xFFFF0000).to(tl.float32, bitcast=True)
        lo = ((rest - mid).to(tl.uint32, bitcast=True) & 0xFFFF0000).to(tl.float32, bitcast=True)
        if INTERPRETED:
            parts = hi + mid
            if PARTS == 3:
                parts += lo
            if COEF_LEFT:
                out = tl.dot(parts, x.to(tl.float32), acc, input_precision="ieee")
            else:
                out = tl.dot(x.to(tl.float32), parts, acc, input_precision="ieee")
        elif COEF_LEFT:
            out = tl.dot(hi.to(tl.bfloat16), x, acc)
            out = tl.dot(mid.to(tl.bfloat16), x, out)
            if PARTS == 3:
                out = tl.dot(lo.to(tl.bfloat16), x, out)
        else:
            out = tl.dot(x, hi.to(tl.bfloat16), acc)
            out = tl.dot(x, mid.to(tl.bfloat16), out)
            if PARTS == 3:
                out = tl.dot(x, lo.to(tl.bfloat16), out)
    elif COEF_LEFT:
        out = tl.dot(c, x.to(tl.float32), acc, input_precision="tf32x3")
    else:
        out = tl.dot(x.to(tl.float32), c, acc, input_precision="tf32x3")
    return out


@triton.jit
def _data_data(a, b, acc):
    """``acc + a @ b`` of two state-dtype tiles: exact bf16 products when both are bf16 (in fp32 under the
    interpreter, see :func:`_coef_data`), else fp32 operands with ``tf32x3``."""
    if a.dtype == tl.bfloat16 and b.dtype == tl.bfloat16 and not INTERPRETED:
        out = tl.dot(a, b, acc)
    elif a.dtype == tl.bfloat16 and b.dtype == tl.bfloat16:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="tf32x3")
    return out


# ---------------------------------------------------------------------------------------------------------------
# write + carry
# ---------------------------------------------------------------------------------------------------------------
@triton.jit
def _write_tc_fwd(h_ptr, z_ptr, carry_ptr, write_ptr, out_ptr, N, d,
                  NS: tl.constexpr, MS: tl.constexpr, NP: tl.constexpr, MP: tl.constexpr, STATIC: tl.constexpr,
                  TPP: tl.constexpr, BD: tl.constexpr, PARTS: tl.constexpr):
    pid = tl.program_id(0)
    j = tl.arange(0, NP)  # slot of H / H'
    i = tl.arange(0, MP)  # slot of Z
    jm, im = j < NS, i < MS
    # Carry^T as [k, j] (carry[j, k] at j * n + k) and WriteT [k, i] (write_c[k, i] at k * m + i)
    c_offs = j[None, :] * NS + j[:, None]
    w_offs = j[:, None] * MS + i[None, :]
    c_mask = jm[:, None] & jm[None, :]
    w_mask = jm[:, None] & im[None, :]
    if STATIC:
        carry_t = tl.load(carry_ptr + c_offs, mask=c_mask, other=0.0)
        write_c = tl.load(write_ptr + w_offs, mask=w_mask, other=0.0)
    for t in range(pid * TPP, tl.minimum(pid * TPP + TPP, N)):
        t64 = tl.cast(t, tl.int64)
        if not STATIC:
            carry_t = tl.load(carry_ptr + t64 * (NS * NS) + c_offs, mask=c_mask, other=0.0)
            write_c = tl.load(write_ptr + t64 * (NS * MS) + w_offs, mask=w_mask, other=0.0)
        h_rows = t64 * (NS * d) + j[:, None] * d  # [NP, 1]
        z_rows = t64 * (MS * d) + i[:, None] * d
        for d0 in range(0, d, BD):
            dd = d0 + tl.arange(0, BD)
            dm = (dd < d)[None, :]
            h = tl.load(h_ptr + h_rows + dd[None, :], mask=jm[:, None] & dm, other=0.0)  # [NP, BD]
            z = tl.load(z_ptr + z_rows + dd[None, :], mask=im[:, None] & dm, other=0.0)  # [MP, BD]
            acc = _coef_data(carry_t, h, tl.zeros([NP, BD], dtype=tl.float32), PARTS, True)
            acc = _coef_data(write_c, z, acc, PARTS, True)
            tl.store(out_ptr + h_rows + dd[None, :], to_output(acc, out_ptr), mask=jm[:, None] & dm)


@triton.jit
def _write_tc_bwd(h_ptr, z_ptr, carry_ptr, write_ptr, g_ptr, gh_ptr, gz_ptr, gcarry_ptr, gwrite_ptr, N, d,
                  NS: tl.constexpr, MS: tl.constexpr, NP: tl.constexpr, MP: tl.constexpr, STATIC: tl.constexpr,
                  TPP: tl.constexpr, BD: tl.constexpr):
    pid = tl.program_id(0)
    j = tl.arange(0, NP)
    i = tl.arange(0, MP)
    jm, im = j < NS, i < MS
    # Carry [j, k] and WriteT^T as [i, k] (write_c[k, i] at k * m + i)
    c_offs = j[:, None] * NS + j[None, :]
    wt_offs = j[None, :] * MS + i[:, None]
    c_mask = jm[:, None] & jm[None, :]
    wt_mask = im[:, None] & jm[None, :]
    g_cc = tl.zeros([NP, NP], dtype=tl.float32)  # dL/dCarry[j, k] = sum H_j . dL/dH'_k
    g_wc = tl.zeros([NP, MP], dtype=tl.float32)  # dL/dWriteT[k, i] = sum dL/dH'_k . Z_i
    if STATIC:
        carry = tl.load(carry_ptr + c_offs, mask=c_mask, other=0.0)
        write_tt = tl.load(write_ptr + wt_offs, mask=wt_mask, other=0.0)
    for t in range(pid * TPP, tl.minimum(pid * TPP + TPP, N)):
        t64 = tl.cast(t, tl.int64)
        if not STATIC:
            carry = tl.load(carry_ptr + t64 * (NS * NS) + c_offs, mask=c_mask, other=0.0)
            write_tt = tl.load(write_ptr + t64 * (NS * MS) + wt_offs, mask=wt_mask, other=0.0)
            g_cc = tl.zeros([NP, NP], dtype=tl.float32)
            g_wc = tl.zeros([NP, MP], dtype=tl.float32)
        h_rows = t64 * (NS * d) + j[:, None] * d
        z_rows = t64 * (MS * d) + i[:, None] * d
        for d0 in range(0, d, BD):
            dd = d0 + tl.arange(0, BD)
            dm = (dd < d)[None, :]
            hmask = jm[:, None] & dm
            zmask = im[:, None] & dm
            g = tl.load(g_ptr + h_rows + dd[None, :], mask=hmask, other=0.0)  # dL/dH' [NP, BD]
            h = tl.load(h_ptr + h_rows + dd[None, :], mask=hmask, other=0.0)
            z = tl.load(z_ptr + z_rows + dd[None, :], mask=zmask, other=0.0)
            g_h = _coef_data(carry, g, tl.zeros([NP, BD], dtype=tl.float32), 2, True)
            tl.store(gh_ptr + h_rows + dd[None, :], to_output(g_h, gh_ptr), mask=hmask)
            g_z = _coef_data(write_tt, g, tl.zeros([MP, BD], dtype=tl.float32), 2, True)
            tl.store(gz_ptr + z_rows + dd[None, :], to_output(g_z, gz_ptr), mask=zmask)
            g_cc = _data_data(h, tl.trans(g), g_cc)
            g_wc = _data_data(g, tl.trans(z), g_wc)
        if not STATIC:
            tl.store(gcarry_ptr + t64 * (NS * NS) + c_offs, g_cc, mask=c_mask)
            tl.store(gwrite_ptr + t64 * (NS * MS) + j[:, None] * MS + i[None, :], g_wc,
                     mask=jm[:, None] & im[None, :])
    if STATIC:  # one partial per program: [programs, n, n] / [programs, n, m]
        pid64 = tl.cast(pid, tl.int64)
        tl.store(gcarry_ptr + pid64 * (NS * NS) + c_offs, g_cc, mask=c_mask)
        tl.store(gwrite_ptr + pid64 * (NS * MS) + j[:, None] * MS + i[None, :], g_wc, mask=jm[:, None] & im[None, :])


@triton.jit
def _token_block(N, d, NS: tl.constexpr, MS: tl.constexpr, NP: tl.constexpr, MP: tl.constexpr, TB: tl.constexpr):
    """A batched program's indices: slots ``j`` of H (``[NP]``) and ``i`` of X/Z (``[MP]``) with their masks; its
    ``TB`` tokens (mask ``tm``, int64 ``t64``; program ``p`` takes tokens ``p*TB .. p*TB + TB - 1``); the row offsets
    and masks of its ``[TB, NP, .]`` state tiles (``h_rows``, ``hm``) and ``[TB, MP, .]`` backbone tiles (``x_rows``,
    ``xm``: X or Z), to which a chunk's ``dd[None, None, :]`` is added."""
    tok = tl.program_id(0) * TB + tl.arange(0, TB)
    j = tl.arange(0, NP)
    i = tl.arange(0, MP)
    jm, im, tm, t64 = j < NS, i < MS, tok < N, tok.to(tl.int64)
    h_rows = t64[:, None, None] * (NS * d) + j[None, :, None] * d  # [TB, NP, 1]
    x_rows = t64[:, None, None] * (MS * d) + i[None, :, None] * d  # [TB, MP, 1]
    hm = tm[:, None, None] & jm[None, :, None]
    xm = tm[:, None, None] & im[None, :, None]
    return j, i, jm, im, tm, t64, h_rows, hm, x_rows, xm


@triton.jit
def _write_tc_fwd_batched(h_ptr, z_ptr, carry_ptr, write_ptr, out_ptr, N, d,
                          NS: tl.constexpr, MS: tl.constexpr, NP: tl.constexpr, MP: tl.constexpr,
                          STATIC: tl.constexpr, TB: tl.constexpr, BD: tl.constexpr, PARTS: tl.constexpr):
    """:func:`_write_tc_fwd` on ``TB`` tokens at once ("tc-v2"): ``[TB, NP, BD]`` state tiles, one batched product
    per coefficient map and chunk (``[TB, NP, NP] @ [TB, NP, BD]``)."""
    j, i, jm, im, tm, t64, h_rows, hm, z_rows, zm = _token_block(N, d, NS, MS, NP, MP, TB)
    # Carry^T as [., k, j] (carry[j, k] at j * n + k) and WriteT as [., k, i] (write_c[k, i] at k * m + i)
    c_offs = j[None, None, :] * NS + j[None, :, None]
    w_offs = j[None, :, None] * MS + i[None, None, :]
    c_mask = jm[None, :, None] & jm[None, None, :]
    w_mask = jm[None, :, None] & im[None, None, :]
    if STATIC:  # one map for every token
        carry_t = tl.broadcast_to(tl.load(carry_ptr + c_offs, mask=c_mask, other=0.0), [TB, NP, NP])
        write_c = tl.broadcast_to(tl.load(write_ptr + w_offs, mask=w_mask, other=0.0), [TB, NP, MP])
    else:
        carry_t = tl.load(carry_ptr + t64[:, None, None] * (NS * NS) + c_offs, mask=tm[:, None, None] & c_mask,
                          other=0.0)  # [TB, NP, NP]
        write_c = tl.load(write_ptr + t64[:, None, None] * (NS * MS) + w_offs, mask=tm[:, None, None] & w_mask,
                          other=0.0)  # [TB, NP, MP]
    for d0 in range(0, d, BD):
        dd = d0 + tl.arange(0, BD)
        dm = (dd < d)[None, None, :]
        h = tl.load(h_ptr + h_rows + dd[None, None, :], mask=hm & dm, other=0.0)  # [TB, NP, BD]
        z = tl.load(z_ptr + z_rows + dd[None, None, :], mask=zm & dm, other=0.0)  # [TB, MP, BD]
        acc = _coef_data(carry_t, h, tl.zeros([TB, NP, BD], dtype=tl.float32), PARTS, True)
        acc = _coef_data(write_c, z, acc, PARTS, True)
        tl.store(out_ptr + h_rows + dd[None, None, :], to_output(acc, out_ptr), mask=hm & dm)


@triton.jit
def _write_tc_bwd_batched(h_ptr, z_ptr, carry_ptr, write_ptr, g_ptr, gh_ptr, gz_ptr, gcarry_ptr, gwrite_ptr, N, d,
                          NS: tl.constexpr, MS: tl.constexpr, NP: tl.constexpr, MP: tl.constexpr,
                          STATIC: tl.constexpr, TB: tl.constexpr, BD: tl.constexpr):
    """:func:`_write_tc_bwd` on ``TB`` tokens at once ("tc-v2"): ``dL/dH = Carry dL/dH'`` and ``dL/dZ = WriteT^T
    dL/dH'`` as batched products per chunk, the coefficient gradients in ``[TB, NP, NP]`` / ``[TB, NP, MP]``
    accumulators over the chunks (per token when dynamic; summed over the program's tokens into one partial per
    program when static)."""
    j, i, jm, im, tm, t64, h_rows, hm, z_rows, zm = _token_block(N, d, NS, MS, NP, MP, TB)
    # Carry as [., j, k] (carry[j, k] at j * n + k) and WriteT^T as [., i, k] (write_c[k, i] at k * m + i)
    c_offs = j[None, :, None] * NS + j[None, None, :]
    wt_offs = j[None, None, :] * MS + i[None, :, None]
    c_mask = jm[None, :, None] & jm[None, None, :]
    wt_mask = im[None, :, None] & jm[None, None, :]
    if STATIC:
        carry = tl.broadcast_to(tl.load(carry_ptr + c_offs, mask=c_mask, other=0.0), [TB, NP, NP])
        write_tt = tl.broadcast_to(tl.load(write_ptr + wt_offs, mask=wt_mask, other=0.0), [TB, MP, NP])
    else:
        carry = tl.load(carry_ptr + t64[:, None, None] * (NS * NS) + c_offs, mask=tm[:, None, None] & c_mask,
                        other=0.0)
        write_tt = tl.load(write_ptr + t64[:, None, None] * (NS * MS) + wt_offs, mask=tm[:, None, None] & wt_mask,
                           other=0.0)
    g_cc = tl.zeros([TB, NP, NP], dtype=tl.float32)  # dL/dCarry[t, j, k] = sum_d H_j . dL/dH'_k
    g_wc = tl.zeros([TB, NP, MP], dtype=tl.float32)  # dL/dWriteT[t, k, i] = sum_d dL/dH'_k . Z_i
    for d0 in range(0, d, BD):
        dd = d0 + tl.arange(0, BD)
        dm = (dd < d)[None, None, :]
        g = tl.load(g_ptr + h_rows + dd[None, None, :], mask=hm & dm, other=0.0)  # dL/dH' [TB, NP, BD]
        h = tl.load(h_ptr + h_rows + dd[None, None, :], mask=hm & dm, other=0.0)
        z = tl.load(z_ptr + z_rows + dd[None, None, :], mask=zm & dm, other=0.0)  # [TB, MP, BD]
        g_h = _coef_data(carry, g, tl.zeros([TB, NP, BD], dtype=tl.float32), 2, True)
        tl.store(gh_ptr + h_rows + dd[None, None, :], to_output(g_h, gh_ptr), mask=hm & dm)
        g_z = _coef_data(write_tt, g, tl.zeros([TB, MP, BD], dtype=tl.float32), 2, True)
        tl.store(gz_ptr + z_rows + dd[None, None, :], to_output(g_z, gz_ptr), mask=zm & dm)
        g_cc = _data_data(h, tl.trans(g, (0, 2, 1)), g_cc)  # [TB, NP, BD] @ [TB, BD, NP]
        g_wc = _data_data(g, tl.trans(z, (0, 2, 1)), g_wc)  # [TB, NP, BD] @ [TB, BD, MP]
    cc_offs = j[None, :, None] * NS + j[None, None, :]  # [., j, k]
    wc_offs = j[None, :, None] * MS + i[None, None, :]  # [., k, i]
    wc_mask = jm[None, :, None] & im[None, None, :]
    if STATIC:  # one partial per program: [programs, n, n] / [programs, n, m] (padded tokens added zeros)
        pid64 = tl.cast(tl.program_id(0), tl.int64)
        tl.store(gcarry_ptr + pid64 * (NS * NS) + cc_offs, tl.sum(g_cc, axis=0)[None, :, :], mask=c_mask)
        tl.store(gwrite_ptr + pid64 * (NS * MS) + wc_offs, tl.sum(g_wc, axis=0)[None, :, :], mask=wc_mask)
    else:
        tl.store(gcarry_ptr + t64[:, None, None] * (NS * NS) + cc_offs, g_cc, mask=tm[:, None, None] & c_mask)
        tl.store(gwrite_ptr + t64[:, None, None] * (NS * MS) + wc_offs, g_wc, mask=tm[:, None, None] & wc_mask)


# ---------------------------------------------------------------------------------------------------------------
# static read
# ---------------------------------------------------------------------------------------------------------------
@triton.jit
def _read_tc_fwd(h_ptr, read_ptr, x_ptr, N, d, NS: tl.constexpr, MS: tl.constexpr, NP: tl.constexpr,
                 MP: tl.constexpr, TPP: tl.constexpr, BD: tl.constexpr):
    pid = tl.program_id(0)
    j = tl.arange(0, NP)
    i = tl.arange(0, MP)
    jm, im = j < NS, i < MS
    read_t = tl.load(read_ptr + j[None, :] * MS + i[:, None], mask=im[:, None] & jm[None, :], other=0.0)  # [i, j]
    for t in range(pid * TPP, tl.minimum(pid * TPP + TPP, N)):
        t64 = tl.cast(t, tl.int64)
        h_rows = t64 * (NS * d) + j[:, None] * d
        x_rows = t64 * (MS * d) + i[:, None] * d
        for d0 in range(0, d, BD):
            dd = d0 + tl.arange(0, BD)
            dm = (dd < d)[None, :]
            h = tl.load(h_ptr + h_rows + dd[None, :], mask=jm[:, None] & dm, other=0.0)
            x = _coef_data(read_t, h, tl.zeros([MP, BD], dtype=tl.float32), 2, True)
            tl.store(x_ptr + x_rows + dd[None, :], to_output(x, x_ptr), mask=im[:, None] & dm)


@triton.jit
def _read_tc_bwd(h_ptr, read_ptr, gx_ptr, gh_ptr, gread_ptr, N, d, NS: tl.constexpr, MS: tl.constexpr,
                 NP: tl.constexpr, MP: tl.constexpr, TPP: tl.constexpr, BD: tl.constexpr, PARTS: tl.constexpr):
    pid = tl.program_id(0)
    j = tl.arange(0, NP)
    i = tl.arange(0, MP)
    jm, im = j < NS, i < MS
    r_offs = j[:, None] * MS + i[None, :]
    r_mask = jm[:, None] & im[None, :]
    read = tl.load(read_ptr + r_offs, mask=r_mask, other=0.0)  # [j, i]
    g_read = tl.zeros([NP, MP], dtype=tl.float32)  # sum over tokens of H_j . dL/dX_i
    for t in range(pid * TPP, tl.minimum(pid * TPP + TPP, N)):
        t64 = tl.cast(t, tl.int64)
        h_rows = t64 * (NS * d) + j[:, None] * d
        x_rows = t64 * (MS * d) + i[:, None] * d
        for d0 in range(0, d, BD):
            dd = d0 + tl.arange(0, BD)
            dm = (dd < d)[None, :]
            h = tl.load(h_ptr + h_rows + dd[None, :], mask=jm[:, None] & dm, other=0.0)
            gx = tl.load(gx_ptr + x_rows + dd[None, :], mask=im[:, None] & dm, other=0.0)
            g_h = _coef_data(read, gx, tl.zeros([NP, BD], dtype=tl.float32), PARTS, True)
            tl.store(gh_ptr + h_rows + dd[None, :], to_output(g_h, gh_ptr), mask=jm[:, None] & dm)
            g_read = _data_data(h, tl.trans(gx), g_read)
    tl.store(gread_ptr + tl.cast(pid, tl.int64) * (NS * MS) + r_offs, g_read, mask=r_mask)


# ---------------------------------------------------------------------------------------------------------------
# dynamic read. Gate columns K = 2m + n in three parts: read [.., m] | carry [.., n] | write^T [.., m]; the maps
# base/scale are [n, K] row-major, the folded projection wg^T is [K, d] (one contiguous row per gate column).
# ---------------------------------------------------------------------------------------------------------------
@triton.jit
def _read_dynamic_tc_fwd(h_ptr, wgt_ptr, base_ptr, scale_ptr, x_ptr, carry_ptr, write_ptr, stats_ptr, N, d, eps,
                         inv_sqrt_d, NS: tl.constexpr, MS: tl.constexpr, NP: tl.constexpr, MP: tl.constexpr,
                         TPP: tl.constexpr, BD: tl.constexpr):
    K: tl.constexpr = 2 * MS + NS
    RELOAD_MAPS: tl.constexpr = NP >= 64  # NP <= 32 compiles to the kernel measured as tc-v1
    pid = tl.program_id(0)
    j = tl.arange(0, NP)
    i = tl.arange(0, MP)
    jm, im = j < NS, i < MS
    mask_r = jm[:, None] & im[None, :]  # [NP, MP]
    mask_c = jm[:, None] & jm[None, :]  # [NP, NP]
    # the three parts of the [n, K] maps: read [j, i] at j*K + i, carry [j, k] at j*K + m + k, write^T at m + n + i
    offs_r = j[:, None] * K + i[None, :]
    offs_c = j[:, None] * K + MS + j[None, :]
    offs_w = j[:, None] * K + MS + NS + i[None, :]
    if not RELOAD_MAPS:  # held in registers for all of the program's tokens
        base_r = tl.load(base_ptr + offs_r, mask=mask_r, other=0.0)
        base_c = tl.load(base_ptr + offs_c, mask=mask_c, other=0.0)
        base_w = tl.load(base_ptr + offs_w, mask=mask_r, other=0.0)
        scale_r = tl.load(scale_ptr + offs_r, mask=mask_r, other=0.0)
        scale_c = tl.load(scale_ptr + offs_c, mask=mask_c, other=0.0)
        scale_w = tl.load(scale_ptr + offs_w, mask=mask_r, other=0.0)
    for t in range(pid * TPP, tl.minimum(pid * TPP + TPP, N)):
        t64 = tl.cast(t, tl.int64)
        h_rows = t64 * (NS * d) + j[:, None] * d
        # pass 1: U = H wg (three parts) and the per-slot sum of squares
        sq = tl.zeros([NP], dtype=tl.float32)
        u_r = tl.zeros([NP, MP], dtype=tl.float32)
        u_c = tl.zeros([NP, NP], dtype=tl.float32)
        u_w = tl.zeros([NP, MP], dtype=tl.float32)
        for d0 in range(0, d, BD):
            dd = d0 + tl.arange(0, BD)
            dm = dd < d
            h = tl.load(h_ptr + h_rows + dd[None, :], mask=jm[:, None] & dm[None, :], other=0.0)  # [NP, BD]
            hf = h.to(tl.float32)
            sq += tl.sum(hf * hf, axis=1)
            wg_r = tl.load(wgt_ptr + i[None, :] * d + dd[:, None], mask=dm[:, None] & im[None, :], other=0.0)
            wg_c = tl.load(wgt_ptr + (MS + j[None, :]) * d + dd[:, None], mask=dm[:, None] & jm[None, :], other=0.0)
            wg_w = tl.load(wgt_ptr + (MS + NS + i[None, :]) * d + dd[:, None], mask=dm[:, None] & im[None, :],
                           other=0.0)
            u_r = _coef_data(wg_r, h, u_r, 3, False)  # [NP, BD] @ [BD, MP]
            u_c = _coef_data(wg_c, h, u_c, 3, False)
            u_w = _coef_data(wg_w, h, u_w, 3, False)
        inv_rms = 1.0 / tl.sqrt(sq / d + eps)  # [NP]
        f = (inv_rms * inv_sqrt_d)[:, None]
        stats_rows = t64 * (NS * (K + 1)) + j[:, None] * (K + 1)
        tl.store(stats_ptr + stats_rows + K, inv_rms[:, None], mask=jm[:, None])
        logit_r, logit_c, logit_w = u_r * f, u_c * f, u_w * f
        tl.store(stats_ptr + stats_rows + i[None, :], logit_r, mask=mask_r)
        tl.store(stats_ptr + stats_rows + MS + j[None, :], logit_c, mask=mask_c)
        tl.store(stats_ptr + stats_rows + MS + NS + i[None, :], logit_w, mask=mask_r)
        if RELOAD_MAPS:
            # the static maps and scales per token (L1/L2) rather than in registers through pass 1: at NP = 64 the
            # [n, n] pair alone is 64 fp32 registers per thread at 4 warps, and 4 warps is what this kernel must
            # run with there (DYNAMIC_FWD_WARPS); held, it spilled 160-320 B per thread
            base_r = tl.load(base_ptr + offs_r, mask=mask_r, other=0.0)
            scale_r = tl.load(scale_ptr + offs_r, mask=mask_r, other=0.0)
            base_c = tl.load(base_ptr + offs_c, mask=mask_c, other=0.0)
            scale_c = tl.load(scale_ptr + offs_c, mask=mask_c, other=0.0)
            base_w = tl.load(base_ptr + offs_w, mask=mask_r, other=0.0)
            scale_w = tl.load(scale_ptr + offs_w, mask=mask_r, other=0.0)
        read_c = base_r + scale_r * tanh(logit_r)  # [NP, MP], zero in the padding
        tl.store(carry_ptr + t64 * (NS * NS) + j[:, None] * NS + j[None, :], base_c + scale_c * tanh(logit_c),
                 mask=mask_c)
        tl.store(write_ptr + t64 * (NS * MS) + j[:, None] * MS + i[None, :], base_w + scale_w * tanh(logit_w),
                 mask=mask_r)
        # pass 2 (the token's state again, from L2): X = Read^T H
        read_t = tl.trans(read_c)  # [MP, NP]
        x_rows = t64 * (MS * d) + i[:, None] * d
        for d0 in range(0, d, BD):
            dd = d0 + tl.arange(0, BD)
            dm = (dd < d)[None, :]
            h = tl.load(h_ptr + h_rows + dd[None, :], mask=jm[:, None] & dm, other=0.0)
            x = _coef_data(read_t, h, tl.zeros([MP, BD], dtype=tl.float32), 2, True)
            tl.store(x_ptr + x_rows + dd[None, :], to_output(x, x_ptr), mask=im[:, None] & dm)


@triton.jit
def _read_dynamic_tc_fwd_batched(h_ptr, wgt_ptr, base_ptr, scale_ptr, x_ptr, carry_ptr, write_ptr, stats_ptr, N, d,
                                 eps, inv_sqrt_d, NS: tl.constexpr, MS: tl.constexpr, NP: tl.constexpr,
                                 MP: tl.constexpr, TB: tl.constexpr, BD: tl.constexpr):
    """The dynamic read forward on ``TB`` tokens at once ("tc-v2"): the same arithmetic as
    :func:`_read_dynamic_tc_fwd`, but every load, product and store covers the program's ``TB`` tokens together.
    The per-token kernel walks its tokens one after the other with ``[NP, BD]`` loads (2-4 KB in flight per
    program), which on the H200 left it latency-bound at 9% of the byte floor at (8, 16); here a chunk of the state
    is one ``[TB, NP, BD]`` load (``TB * NP`` = 128 rows), the projection one ``[TB*NP, BD] @ [BD, *]`` product
    (wg read once per program and chunk instead of once per token), and the read one batched ``[TB, MP, NP] @
    [TB, NP, BD]`` product. The maps are loaded once, after pass 1, when the state tiles are gone."""
    K: tl.constexpr = 2 * MS + NS
    j, i, jm, im, tm, t64, h_rows, hm, x_rows, xm = _token_block(N, d, NS, MS, NP, MP, TB)
    # pass 1: U = H wg (three parts, rows = (token, slot)) and the per-slot sum of squares
    sq = tl.zeros([TB, NP], dtype=tl.float32)
    u_r = tl.zeros([TB * NP, MP], dtype=tl.float32)
    u_c = tl.zeros([TB * NP, NP], dtype=tl.float32)
    u_w = tl.zeros([TB * NP, MP], dtype=tl.float32)
    for d0 in range(0, d, BD):
        dd = d0 + tl.arange(0, BD)
        dm = dd < d
        h = tl.load(h_ptr + h_rows + dd[None, None, :], mask=hm & dm[None, None, :], other=0.0)  # [TB, NP, BD]
        hf = h.to(tl.float32)
        sq += tl.sum(hf * hf, axis=2)
        h2 = tl.reshape(h, [TB * NP, BD])  # [TB, NP, BD] -> [TB*NP, BD]: rows (token, slot), row-major
        wg_r = tl.load(wgt_ptr + i[None, :] * d + dd[:, None], mask=dm[:, None] & im[None, :], other=0.0)
        wg_c = tl.load(wgt_ptr + (MS + j[None, :]) * d + dd[:, None], mask=dm[:, None] & jm[None, :], other=0.0)
        wg_w = tl.load(wgt_ptr + (MS + NS + i[None, :]) * d + dd[:, None], mask=dm[:, None] & im[None, :],
                       other=0.0)
        u_r = _coef_data(wg_r, h2, u_r, 3, False)  # [TB*NP, BD] @ [BD, MP]
        u_c = _coef_data(wg_c, h2, u_c, 3, False)
        u_w = _coef_data(wg_w, h2, u_w, 3, False)
    inv_rms = 1.0 / tl.sqrt(sq / d + eps)  # [TB, NP]
    f = (inv_rms * inv_sqrt_d)[:, :, None]
    # [TB*NP, k] -> [TB, NP, k]: back to one row block per token
    logit_r = tl.reshape(u_r, [TB, NP, MP]) * f
    logit_c = tl.reshape(u_c, [TB, NP, NP]) * f
    logit_w = tl.reshape(u_w, [TB, NP, MP]) * f
    mask_r = hm & im[None, None, :]  # [TB, NP, MP]
    mask_c = hm & jm[None, None, :]  # [TB, NP, NP]
    stats_rows = t64[:, None, None] * (NS * (K + 1)) + j[None, :, None] * (K + 1)  # [TB, NP, 1]
    tl.store(stats_ptr + stats_rows + K, inv_rms[:, :, None], mask=hm)
    tl.store(stats_ptr + stats_rows + i[None, None, :], logit_r, mask=mask_r)
    tl.store(stats_ptr + stats_rows + MS + j[None, None, :], logit_c, mask=mask_c)
    tl.store(stats_ptr + stats_rows + MS + NS + i[None, None, :], logit_w, mask=mask_r)
    # the [n, K] maps, as [1, NP, *] tiles broadcast over the tokens
    offs_r = j[None, :, None] * K + i[None, None, :]
    offs_c = j[None, :, None] * K + MS + j[None, None, :]
    offs_w = j[None, :, None] * K + MS + NS + i[None, None, :]
    map_r = jm[None, :, None] & im[None, None, :]
    map_c = jm[None, :, None] & jm[None, None, :]
    read_c = (tl.load(base_ptr + offs_r, mask=map_r, other=0.0)
              + tl.load(scale_ptr + offs_r, mask=map_r, other=0.0) * tanh(logit_r))  # [TB, NP, MP], 0 in padding
    carry_c = (tl.load(base_ptr + offs_c, mask=map_c, other=0.0)
               + tl.load(scale_ptr + offs_c, mask=map_c, other=0.0) * tanh(logit_c))
    tl.store(carry_ptr + t64[:, None, None] * (NS * NS) + j[None, :, None] * NS + j[None, None, :], carry_c,
             mask=mask_c)
    write_c = (tl.load(base_ptr + offs_w, mask=map_r, other=0.0)
               + tl.load(scale_ptr + offs_w, mask=map_r, other=0.0) * tanh(logit_w))
    tl.store(write_ptr + t64[:, None, None] * (NS * MS) + j[None, :, None] * MS + i[None, None, :], write_c,
             mask=mask_r)
    # pass 2 (the program's state again, from L2): X = Read^T H, one batched product per chunk
    read_t = tl.trans(read_c, (0, 2, 1))  # [TB, MP, NP]
    for d0 in range(0, d, BD):
        dd = d0 + tl.arange(0, BD)
        dm = (dd < d)[None, None, :]
        h = tl.load(h_ptr + h_rows + dd[None, None, :], mask=hm & dm, other=0.0)  # [TB, NP, BD]
        x = _coef_data(read_t, h, tl.zeros([TB, MP, BD], dtype=tl.float32), 2, True)  # [TB, MP, BD]
        tl.store(x_ptr + x_rows + dd[None, None, :], to_output(x, x_ptr), mask=xm & dm)


@triton.jit
def _read_dynamic_tc_bwd_coef(h_ptr, gx_ptr, gcarry_ptr, gwrite_ptr, stats_ptr, base_ptr, scale_ptr, readc_ptr,
                              gu_ptr, rowscale_ptr, gstatic_ptr, gscales_ptr, N, d, inv_sqrt_d,
                              NS: tl.constexpr, MS: tl.constexpr, NP: tl.constexpr, MP: tl.constexpr,
                              TPP: tl.constexpr, BD: tl.constexpr):
    K: tl.constexpr = 2 * MS + NS
    pid = tl.program_id(0)
    j = tl.arange(0, NP)
    i = tl.arange(0, MP)
    jm, im = j < NS, i < MS
    mask_r = jm[:, None] & im[None, :]
    mask_c = jm[:, None] & jm[None, :]
    offs_r = j[:, None] * K + i[None, :]
    offs_c = j[:, None] * K + MS + j[None, :]
    offs_w = j[:, None] * K + MS + NS + i[None, :]
    base_r = tl.load(base_ptr + offs_r, mask=mask_r, other=0.0)
    scale_r = tl.load(scale_ptr + offs_r, mask=mask_r, other=0.0)
    scale_c = tl.load(scale_ptr + offs_c, mask=mask_c, other=0.0)
    scale_w = tl.load(scale_ptr + offs_w, mask=mask_r, other=0.0)
    # per-program partials of dL/dstatic = sum g_coef and dL/dscale = sum g_coef * tanh(logit)
    gs_r = tl.zeros([NP, MP], dtype=tl.float32)
    gs_c = tl.zeros([NP, NP], dtype=tl.float32)
    gs_w = tl.zeros([NP, MP], dtype=tl.float32)
    gsc_r = tl.zeros([NP, MP], dtype=tl.float32)
    gsc_c = tl.zeros([NP, NP], dtype=tl.float32)
    gsc_w = tl.zeros([NP, MP], dtype=tl.float32)
    for t in range(pid * TPP, tl.minimum(pid * TPP + TPP, N)):
        t64 = tl.cast(t, tl.int64)
        h_rows = t64 * (NS * d) + j[:, None] * d
        x_rows = t64 * (MS * d) + i[:, None] * d
        g_r = tl.zeros([NP, MP], dtype=tl.float32)  # dL/dRead[j, i] = H_j . gX_i
        for d0 in range(0, d, BD):
            dd = d0 + tl.arange(0, BD)
            dm = (dd < d)[None, :]
            h = tl.load(h_ptr + h_rows + dd[None, :], mask=jm[:, None] & dm, other=0.0)
            gx = tl.load(gx_ptr + x_rows + dd[None, :], mask=im[:, None] & dm, other=0.0)
            g_r = _data_data(h, tl.trans(gx), g_r)
        stats_rows = t64 * (NS * (K + 1)) + j[:, None] * (K + 1)
        inv_rms = tl.load(stats_ptr + stats_rows + K, mask=jm[:, None], other=1.0)  # [NP, 1]
        logit_r = tl.load(stats_ptr + stats_rows + i[None, :], mask=mask_r, other=0.0)
        logit_c = tl.load(stats_ptr + stats_rows + MS + j[None, :], mask=mask_c, other=0.0)
        logit_w = tl.load(stats_ptr + stats_rows + MS + NS + i[None, :], mask=mask_r, other=0.0)
        c_r, c_c, c_w = tanh(logit_r), tanh(logit_c), tanh(logit_w)
        tl.store(readc_ptr + t64 * (NS * MS) + j[:, None] * MS + i[None, :], base_r + scale_r * c_r, mask=mask_r)
        g_c = tl.load(gcarry_ptr + t64 * (NS * NS) + j[:, None] * NS + j[None, :], mask=mask_c, other=0.0)
        g_w = tl.load(gwrite_ptr + t64 * (NS * MS) + j[:, None] * MS + i[None, :], mask=mask_r, other=0.0)
        gs_r += g_r
        gs_c += g_c
        gs_w += g_w
        gsc_r += g_r * c_r
        gsc_c += g_c * c_c
        gsc_w += g_w * c_w
        # through coef = static + scale * tanh(logit), logit = U * inv_rms / sqrt(d)
        gl_r = g_r * scale_r * (1.0 - c_r * c_r)
        gl_c = g_c * scale_c * (1.0 - c_c * c_c)
        gl_w = g_w * scale_w * (1.0 - c_w * c_w)
        f = inv_rms * inv_sqrt_d
        gu_rows = t64 * (NS * K) + j[:, None] * K
        tl.store(gu_ptr + gu_rows + i[None, :], gl_r * f, mask=mask_r)
        tl.store(gu_ptr + gu_rows + MS + j[None, :], gl_c * f, mask=mask_c)
        tl.store(gu_ptr + gu_rows + MS + NS + i[None, :], gl_w * f, mask=mask_r)
        # through 1/rms = (|H_j|^2 / d + eps)^-1/2: dL/dH_j += H_j * (sum_k g_logit logit) * rms^-2 * (-1/d)
        g_inv = (tl.sum(gl_r * logit_r, axis=1) + tl.sum(gl_c * logit_c, axis=1) + tl.sum(gl_w * logit_w, axis=1))
        tl.store(rowscale_ptr + t64 * NS + j[:, None], g_inv[:, None] * inv_rms * inv_rms * (-1.0 / d),
                 mask=jm[:, None])
    out = tl.cast(pid, tl.int64) * (NS * K)
    tl.store(gstatic_ptr + out + offs_r, gs_r, mask=mask_r)
    tl.store(gstatic_ptr + out + offs_c, gs_c, mask=mask_c)
    tl.store(gstatic_ptr + out + offs_w, gs_w, mask=mask_r)
    tl.store(gscales_ptr + out + offs_r, gsc_r, mask=mask_r)
    tl.store(gscales_ptr + out + offs_c, gsc_c, mask=mask_c)
    tl.store(gscales_ptr + out + offs_w, gsc_w, mask=mask_r)


@triton.jit
def _read_dynamic_tc_bwd_state(h_ptr, gx_ptr, readc_ptr, gu_ptr, rowscale_ptr, wgt_ptr, gin_ptr, gh_ptr, gwg_ptr,
                               N, d, NS: tl.constexpr, MS: tl.constexpr, NP: tl.constexpr, MP: tl.constexpr,
                               G_IN: tl.constexpr, BD: tl.constexpr, WHICH: tl.constexpr, PARTS: tl.constexpr):
    """Grid (token groups, slot-width chunks): group g walks tokens g, g + groups, ... at its chunk. Launched twice
    (``WHICH``): ``"dh"`` writes ``dL/dH = Read gX + g_u wg^T + rowscale H (+ dL/dH' incoming)``; ``"dwg"`` sums
    ``dL/dwg^T = g_u^T H`` over the group's tokens into one partial. Both in one program held the [n, n] gate
    gradients in too many forms at once and spilled on sm_90 (benchmarks/NOTES.md); split, neither spills, at the
    cost of reading H and g_u twice."""
    K: tl.constexpr = 2 * MS + NS
    group = tl.program_id(0)
    groups = tl.num_programs(0)
    j = tl.arange(0, NP)
    i = tl.arange(0, MP)
    jm, im = j < NS, i < MS
    mask_r = jm[:, None] & im[None, :]
    mask_c = jm[:, None] & jm[None, :]
    dd = tl.program_id(1) * BD + tl.arange(0, BD)
    dm = (dd < d)[None, :]
    hmask = jm[:, None] & dm
    if WHICH == "dh":  # wg^T parts at this chunk: [MP, BD], [NP, BD], [MP, BD]
        wgt_r = tl.load(wgt_ptr + i[:, None] * d + dd[None, :], mask=im[:, None] & dm, other=0.0)
        wgt_c = tl.load(wgt_ptr + (MS + j[:, None]) * d + dd[None, :], mask=hmask, other=0.0)
        wgt_w = tl.load(wgt_ptr + (MS + NS + i[:, None]) * d + dd[None, :], mask=im[:, None] & dm, other=0.0)
    else:
        gwg_r = tl.zeros([MP, BD], dtype=tl.float32)  # dL/dwg^T = sum over tokens of g_u^T H
        gwg_c = tl.zeros([NP, BD], dtype=tl.float32)
        gwg_w = tl.zeros([MP, BD], dtype=tl.float32)
    for t in range(group, N, groups):
        t64 = tl.cast(t, tl.int64)
        h_offs = t64 * (NS * d) + j[:, None] * d + dd[None, :]
        h = tl.load(h_ptr + h_offs, mask=hmask, other=0.0)  # [NP, BD]
        gu_rows = t64 * (NS * K) + j[:, None] * K
        gu_r = tl.load(gu_ptr + gu_rows + i[None, :], mask=mask_r, other=0.0)  # [NP, MP]
        gu_c = tl.load(gu_ptr + gu_rows + MS + j[None, :], mask=mask_c, other=0.0)  # [NP, NP]
        gu_w = tl.load(gu_ptr + gu_rows + MS + NS + i[None, :], mask=mask_r, other=0.0)  # [NP, MP]
        if WHICH == "dh":
            gx = tl.load(gx_ptr + t64 * (MS * d) + i[:, None] * d + dd[None, :], mask=im[:, None] & dm, other=0.0)
            read_c = tl.load(readc_ptr + t64 * (NS * MS) + j[:, None] * MS + i[None, :], mask=mask_r, other=0.0)
            rowscale = tl.load(rowscale_ptr + t64 * NS + j[:, None], mask=jm[:, None], other=0.0)  # [NP, 1]
            acc = rowscale * h.to(tl.float32)
            if G_IN:
                acc += tl.load(gin_ptr + h_offs, mask=hmask, other=0.0).to(tl.float32)
            acc = _coef_data(read_c, gx, acc, PARTS, True)  # Read gX
            acc = tl.dot(gu_r, wgt_r, acc, input_precision="tf32x3")  # g_u wg^T, fp32 x fp32
            acc = tl.dot(gu_c, wgt_c, acc, input_precision="tf32x3")
            acc = tl.dot(gu_w, wgt_w, acc, input_precision="tf32x3")
            tl.store(gh_ptr + h_offs, to_output(acc, gh_ptr), mask=hmask)
        else:
            gwg_r = _coef_data(tl.trans(gu_r), h, gwg_r, 3, True)
            gwg_c = _coef_data(tl.trans(gu_c), h, gwg_c, 3, True)
            gwg_w = _coef_data(tl.trans(gu_w), h, gwg_w, 3, True)
    if WHICH == "dwg":
        out = tl.cast(group, tl.int64) * (K * d)
        tl.store(gwg_ptr + out + i[:, None] * d + dd[None, :], gwg_r, mask=im[:, None] & dm)
        tl.store(gwg_ptr + out + (MS + j[:, None]) * d + dd[None, :], gwg_c, mask=hmask)
        tl.store(gwg_ptr + out + (MS + NS + i[:, None]) * d + dd[None, :], gwg_w, mask=im[:, None] & dm)


# ---------------------------------------------------------------------------------------------------------------
# launch parameters and host functions
# ---------------------------------------------------------------------------------------------------------------
# (padded slot count NP, every state operand bf16, slot width aligned) -> {kernel: (BD, num_warps)}: per kernel the
# widest chunk that compiled for sm_90a without spills and within 100 KB of shared memory per program at every
# representative (m, n) of that NP, found by benchmarks/tc_launch_search.py (triton 3.7.1; m <= 16 always pads to
# MP = 16). "aligned": d a multiple of 16 (triton_common.aligned); the unaligned launches are narrower (scalar loads).
# None: no candidate compiled without spills; the other form of that kernel runs there (_tokens). E.g. the batched
# write backward holds [TB, NP, NP] carry maps and their gradients in registers: at NP = 64 (TB = 2) every (BD,
# warps) spilled (0.5-26 KB per thread), so the per-token backward runs there under tc-v2 too; changing where a
# batched kernel has a launch changes what kernel_id "tc-v2" names: bump the id with it. Not yet timed on a GPU.
# dynamic_fwd runs 4 warps only (DYNAMIC_FWD_WARPS): on the H200 (triton 3.6.0) its 8-warp launches at NP = 64 gave
# wrong carry coefficients and statistics or an illegal memory access, every 4-warp one was correct
# (benchmarks/tc_launch_time.py, benchmarks/RESULTS.md); at NP = 64 bf16 aligned (64, 4) rather than the widest
# clean (128, 4), which sits at 255 registers.
DYNAMIC_FWD_WARPS = 4
LAUNCH = {
    # aligned slot widths: bf16 searched at (8, 16) / (8, 32) / (8, 64); fp32 re-searched at every shape of
    # tc_launch_search.SHAPES after the gate (--odd, D = 3840) found 8 spills of 12-176 B at (3, 9), (5, 7), (3, 12),
    # (8, 17), (8, 33) (bf16 was clean there, and the H200 rows of measured.py were measured with its entries)
    (16, True, True): {"write_fwd": (256, 4), "write_bwd": (128, 4), "read_fwd": (256, 4), "read_bwd": (128, 4),
                       "dynamic_fwd": (64, 4), "dynamic_bwd_coef": (256, 4), "dynamic_bwd_dh": (128, 4),
                       "dynamic_bwd_dwg": (256, 4), "dynamic_fwd_batched": (64, 4),
                       "write_fwd_batched": (64, 4), "write_bwd_batched": (64, 8)},
    (16, False, True): {"write_fwd": (256, 4), "write_bwd": (32, 4), "read_fwd": (256, 4), "read_bwd": (64, 4),
                        "dynamic_fwd": (32, 4), "dynamic_bwd_coef": (64, 4), "dynamic_bwd_dh": (128, 4),
                        "dynamic_bwd_dwg": (128, 4), "dynamic_fwd_batched": (64, 8),
                        "write_fwd_batched": (64, 8), "write_bwd_batched": (32, 8)},
    (32, True, True): {"write_fwd": (256, 4), "write_bwd": (64, 4), "read_fwd": (256, 4), "read_bwd": (128, 4),
                       "dynamic_fwd": (32, 4), "dynamic_bwd_coef": (256, 4), "dynamic_bwd_dh": (128, 4),
                       "dynamic_bwd_dwg": (128, 4), "dynamic_fwd_batched": (64, 4),
                       "write_fwd_batched": (64, 4), "write_bwd_batched": (16, 4)},
    (32, False, True): {"write_fwd": (128, 8), "write_bwd": (16, 4), "read_fwd": (256, 4), "read_bwd": (64, 4),
                        "dynamic_fwd": (32, 4), "dynamic_bwd_coef": (64, 4), "dynamic_bwd_dh": (128, 4),
                        "dynamic_bwd_dwg": (128, 8), "dynamic_fwd_batched": (32, 8),
                        "write_fwd_batched": (32, 4), "write_bwd_batched": None},
    (64, True, True): {"write_fwd": (128, 4), "write_bwd": (128, 4), "read_fwd": (128, 4), "read_bwd": (128, 4),
                       "dynamic_fwd": (64, 4), "dynamic_bwd_coef": (128, 8), "dynamic_bwd_dh": (64, 4),
                       "dynamic_bwd_dwg": (64, 4), "dynamic_fwd_batched": (64, 4),
                       "write_fwd_batched": (32, 2), "write_bwd_batched": None},
    # write_bwd: no candidate was clean at all of (8, 64), (8, 33), (16, 64), (12, 40); (32, 4) spills 28 B at
    # (8, 33) with static maps, (16, 4) 16 B there with per-token maps
    (64, False, True): {"write_fwd": (64, 4), "write_bwd": (32, 4), "read_fwd": (128, 4), "read_bwd": (128, 8),
                        "dynamic_fwd": (32, 4), "dynamic_bwd_coef": (64, 8), "dynamic_bwd_dh": (64, 8),
                        "dynamic_bwd_dwg": (32, 4), "dynamic_fwd_batched": (32, 8),
                        "write_fwd_batched": (16, 2), "write_bwd_batched": None},
    # unaligned slot widths: searched at d = 255 and (m, n) = (8, 16), (3, 9), (5, 7) / (8, 32), (8, 17) / (8, 64),
    # (8, 33); then the gate found four more spills, so fp32 dynamic_bwd_dwg at NP = 16 is (128, 4), not (256, 4)
    # (16 B at (3, 12)), fp32 read_fwd at NP = 64 (128, 8), not (128, 4) (8 B at (16, 64)), and at NP = 64 the
    # bf16 dynamic_bwd_dh and fp32 dynamic_bwd_dwg (32, 8), not (64, 8) (32 / 112 B at (12, 40)); (32, 8) is clean at
    # (8, 64), (8, 33), (16, 64), (12, 40). These shapes are in tc_launch_search.SHAPES now
    (16, True, False): {"write_fwd": (256, 4), "write_bwd": (128, 8), "read_fwd": (256, 4), "read_bwd": (128, 4),
                        "dynamic_fwd": (32, 4), "dynamic_bwd_coef": (128, 8), "dynamic_bwd_dh": (128, 4),
                        "dynamic_bwd_dwg": (256, 4), "dynamic_fwd_batched": (64, 8),
                        "write_fwd_batched": (64, 8), "write_bwd_batched": (32, 8)},
    (16, False, False): {"write_fwd": (256, 4), "write_bwd": (32, 4), "read_fwd": (256, 4), "read_bwd": (64, 8),
                         "dynamic_fwd": (32, 4), "dynamic_bwd_coef": (64, 4), "dynamic_bwd_dh": (128, 4),
                         "dynamic_bwd_dwg": (128, 4), "dynamic_fwd_batched": (32, 8),
                         "write_fwd_batched": (32, 8), "write_bwd_batched": (16, 8)},
    (32, True, False): {"write_fwd": (128, 8), "write_bwd": (64, 8), "read_fwd": (256, 4), "read_bwd": (128, 8),
                        "dynamic_fwd": (32, 4), "dynamic_bwd_coef": (256, 4), "dynamic_bwd_dh": (128, 8),
                        "dynamic_bwd_dwg": (128, 4), "dynamic_fwd_batched": (64, 8),
                        "write_fwd_batched": (32, 4), "write_bwd_batched": (16, 4)},
    (32, False, False): {"write_fwd": (128, 8), "write_bwd": (16, 4), "read_fwd": (256, 4), "read_bwd": (32, 4),
                         "dynamic_fwd": (16, 4), "dynamic_bwd_coef": (64, 8), "dynamic_bwd_dh": (128, 8),
                         "dynamic_bwd_dwg": (128, 8), "dynamic_fwd_batched": (32, 8),
                         "write_fwd_batched": (16, 4), "write_bwd_batched": None},
    (64, True, False): {"write_fwd": (128, 8), "write_bwd": (64, 4), "read_fwd": (128, 4), "read_bwd": (128, 8),
                        "dynamic_fwd": (64, 4), "dynamic_bwd_coef": (128, 8), "dynamic_bwd_dh": (32, 8),
                        "dynamic_bwd_dwg": (64, 8), "dynamic_fwd_batched": (64, 8),
                        "write_fwd_batched": (16, 2), "write_bwd_batched": None},
    # write_bwd: no candidate was clean at both (8, 64) and (8, 33); (16, 4) is clean at (8, 64) and spills 88 B
    # at (8, 33) with static maps (and the batched backward spills KBs at NP = 64)
    (64, False, False): {"write_fwd": (64, 8), "write_bwd": (16, 4), "read_fwd": (128, 8), "read_bwd": (64, 8),
                         "dynamic_fwd": (16, 4), "dynamic_bwd_coef": (64, 8), "dynamic_bwd_dh": (32, 8),
                         "dynamic_bwd_dwg": (32, 8), "dynamic_fwd_batched": (32, 8),
                         "write_fwd_batched": None, "write_bwd_batched": None},
}
LAUNCH_KEYS = tuple(LAUNCH[(64, True, True)])  # the kernels with launch parameters (what tc_launch_search.py fills in)


def _tokens(key: str, n: int, d: int, bf16: bool, batched: bool | None = None) -> int:
    """Tokens per program of the batched version of kernel ``key`` at (n, d, operand kind), or 1 where the per-token
    one runs. The batched one runs where tc-v2 runs at this NP (:func:`triton_common.tc_batched_tokens`, or as
    ``batched`` says) and has a spill-free launch here (:data:`LAUNCH` not None), and also wherever the per-token
    one has none."""
    np_, batched_key = pow2(n), f"{key}_batched"
    table = LAUNCH[(np_, bool(bf16), aligned(d))]
    if batched_key not in table:
        return 1
    wanted = tc_batched_tokens(n) > 1 if batched is None else batched
    if table[batched_key] is None or (not wanted and table[key] is not None):
        return 1
    return BATCHED_TOKENS[np_]


def launch_allowed(np_: int, key: str, bd: int, warps: int) -> bool:
    """Whether (BD, warps) is a candidate for ``key`` at NP (``tc_launch_search.py``, ``tc_launch_time.py``): a tile
    of at most 8192 values per state operand (NP rows, or TB * NP for a batched kernel), the dynamic read forward at
    DYNAMIC_FWD_WARPS, and the batched write kernels at no more warps than tokens: Triton spreads the warps of a 3-D
    ``tl.dot`` over its batch axis, so warps beyond TB would repeat the same token's product (the batched dynamic
    read's large product, the projection, is 2-D; only its small read product is 3-D)."""
    batched = key.endswith("_batched")
    rows = BATCHED_TOKENS[np_] * np_ if batched else np_
    if rows * bd > 8192 or (key == "dynamic_fwd" and warps != DYNAMIC_FWD_WARPS):
        return False
    return not key.startswith("write_") or not batched or warps <= BATCHED_TOKENS[np_]


def configs(n: int, m: int, d: int, bf16: bool = True) -> dict[str, dict]:
    """Launch parameters per kernel (also what ``benchmarks/kernel_static_check.py`` compiles): ``TPP`` tokens per
    program (8), ``BD`` of the slot width per step of a token's walk and the warps from :data:`LAUNCH`. ``bf16``:
    every state operand is bf16 (split products); otherwise (fp32/fp16 states: fp32 operands, tf32x3, about twice
    the registers) narrower chunks; per slot-width alignment (``triton_common.aligned``). Kernels whose entry is None
    (no spill-free launch) are left out. Under the interpreter, whose cost is per program and per op, a program
    takes 64 tokens (the same chunks, so the walk over d and its ragged last chunk are what the GPU runs)."""
    bd_full = max(16, triton.next_power_of_2(max(d, 1)))
    tpp = 64 if interpreting() else 8
    table = LAUNCH[(pow2(n), bool(bf16), aligned(d))]
    return {k: dict(TPP=tpp, BD=min(bd_full, v[0]), num_warps=v[1], num_stages=1) for k, v in table.items()
            if v is not None}


def _batched_launch(n: int, m: int, d: int, bf16: bool, key: str) -> dict:
    """Launch keyword arguments of a batched ("tc-v2") kernel: its chunk and warps (its tokens per program, ``TB``,
    come from ``triton_common.tc_batched_tokens``)."""
    return launch_kwargs({k: v for k, v in configs(n, m, d, bf16)[key].items() if k != "TPP"})


def _pads(n: int, m: int) -> dict:
    return dict(NS=n, MS=m, NP=pow2(n), MP=pow2(m))


def _parts(out_dtype: torch.dtype) -> int:
    """bf16 parts of the fp32 coefficients in a product with a bf16 tile (:func:`_coef_data`): 2 (~2^-16) when the
    result is rounded to a 16-bit dtype anyway, 3 (~2^-24) when it is stored in fp32 (an fp32 state mixed with a
    bf16 autocast sublayer output)."""
    return 3 if out_dtype == torch.float32 else 2


def _programs(N: int, tpp: int) -> int:
    return max(1, triton.cdiv(N, tpp))


def write(h, z, carry_c, write_c):
    """:func:`kernels.reference.write` on tensor cores: ``[N, n, d], [N, m, d] -> [N, n, d]`` in the dtype of
    ``h`` and ``z`` promoted."""
    n, m = write_c.shape[-2:]
    h, N, d = state_view(h, n, m)
    z = contiguous3(z, m, d, "z")
    static, cc, wc = write_coefficients(carry_c, write_c, N, n, m)
    out = torch.empty_like(h, dtype=torch.promote_types(h.dtype, z.dtype))  # reference.state_dtype
    if N and d:
        bf16 = h.dtype == z.dtype == torch.bfloat16
        tokens = _tokens("write_fwd", n, d, bf16)
        if tokens > 1:
            cfg = _batched_launch(n, m, d, bf16, "write_fwd_batched")
            _write_tc_fwd_batched[(_programs(N, tokens),)](h, z, cc, wc, out, N, d, STATIC=static, TB=tokens,
                                                           PARTS=_parts(out.dtype), **_pads(n, m), **cfg)
        else:
            cfg = configs(n, m, d, bf16)["write_fwd"]
            _write_tc_fwd[(_programs(N, cfg["TPP"]),)](h, z, cc, wc, out, N, d, STATIC=static,
                                                       PARTS=_parts(out.dtype), **_pads(n, m), **launch_kwargs(cfg))
    return out


def write_backward(h, z, carry_c, write_c, grad_out):
    """:func:`kernels.reference.write_backward` on tensor cores."""
    n, m = write_c.shape[-2:]
    h, N, d = state_view(h, n, m)
    z = contiguous3(z, m, d, "z")
    g = contiguous3(grad_out, n, d, "grad_out")
    static, cc, wc = write_coefficients(carry_c, write_c, N, n, m)
    bf16 = h.dtype == z.dtype == torch.bfloat16
    tokens, cfg = _tokens("write_bwd", n, d, bf16), configs(n, m, d, bf16)
    programs = _programs(N, tokens if tokens > 1 else cfg["write_bwd"]["TPP"])
    g_h, g_z = torch.empty_like(h), torch.empty_like(z)
    rows = programs if static else N  # per-program partials (static) or per-token gradients (dynamic)
    g_cc = torch.zeros((rows, n, n), device=h.device, dtype=torch.float32)
    g_wc = torch.zeros((rows, n, m), device=h.device, dtype=torch.float32)
    if N and tokens > 1:
        _write_tc_bwd_batched[(programs,)](h, z, cc, wc, g, g_h, g_z, g_cc, g_wc, N, d, STATIC=static, TB=tokens,
                                           **_pads(n, m), **_batched_launch(n, m, d, bf16, "write_bwd_batched"))
    elif N:
        _write_tc_bwd[(programs,)](h, z, cc, wc, g, g_h, g_z, g_cc, g_wc, N, d, STATIC=static, **_pads(n, m),
                                   **launch_kwargs(cfg["write_bwd"]))
    if static:
        g_cc, g_wc = g_cc.sum(0), g_wc.sum(0)  # a fixed-order reduction over the programs' partials
    return g_h, g_z, g_cc.reshape(carry_c.shape).to(carry_c.dtype), g_wc.reshape(write_c.shape).to(write_c.dtype)


def read_static(h, read):
    """:func:`kernels.reference.read_static` on tensor cores: ``[N, n, d] -> [N, m, d]``."""
    n, m = read.shape
    h, N, d = state_view(h, n, m)
    x = torch.empty((N, m, d), device=h.device, dtype=h.dtype)
    if N and d:
        cfg = configs(n, m, d, h.dtype == torch.bfloat16)["read_fwd"]
        _read_tc_fwd[(_programs(N, cfg["TPP"]),)](h, read.float().contiguous(), x, N, d, **_pads(n, m),
                                                  **launch_kwargs(cfg))
    return x


def read_static_backward(h, read, grad_x):
    """:func:`kernels.reference.read_static_backward` on tensor cores."""
    n, m = read.shape
    h, N, d = state_view(h, n, m)
    gx = contiguous3(grad_x, m, d, "grad_x")
    cfg = configs(n, m, d, h.dtype == gx.dtype == torch.bfloat16)["read_bwd"]
    programs = _programs(N, cfg["TPP"])
    g_h = torch.empty_like(h)
    g_read = torch.zeros((programs, n, m), device=h.device, dtype=torch.float32)
    if N:
        _read_tc_bwd[(programs,)](h, read.float().contiguous(), gx, g_h, g_read, N, d, PARTS=_parts(h.dtype),
                                  **_pads(n, m), **launch_kwargs(cfg))
    return g_h, g_read.sum(0).to(read.dtype)  # a fixed-order sum of the programs' partials


def read_dynamic(h, norm_weight, proj, gates, scales, eps):
    """:func:`kernels.reference.read_dynamic` on tensor cores: ``(x, carry_c, write_c, stats)``; the batched forward
    where ``triton_common.BATCHED_TOKENS`` takes several tokens per program, else the per-token one."""
    n, m = gate_slots(gates)
    h, N, d = state_view(h, n, m)
    K = 2 * m + n
    wgt, base, scales = gate_maps(norm_weight, proj, gates, scales)
    x = torch.empty((N, m, d), device=h.device, dtype=h.dtype)
    carry_c = torch.empty((N, n, n), device=h.device, dtype=torch.float32)
    write_c = torch.empty((N, n, m), device=h.device, dtype=torch.float32)
    stats = torch.empty((N, n, K + 1), device=h.device, dtype=torch.float32)
    if N:
        tokens = _tokens("dynamic_fwd", n, d, h.dtype == torch.bfloat16)
        args = (h, wgt, base, scales, x, carry_c, write_c, stats, N, d, float(eps), 1.0 / math.sqrt(max(d, 1)))
        if tokens > 1:
            _read_dynamic_tc_fwd_batched[(_programs(N, tokens),)](
                *args, **_pads(n, m), TB=tokens, **_batched_launch(n, m, d, h.dtype == torch.bfloat16,
                                                                    "dynamic_fwd_batched"))
        else:
            cfg = configs(n, m, d, h.dtype == torch.bfloat16)["dynamic_fwd"]
            _read_dynamic_tc_fwd[(_programs(N, cfg["TPP"]),)](*args, **_pads(n, m), **launch_kwargs(cfg))
    return x, carry_c, write_c, stats


def _state_groups(N: int, chunks: int) -> int:
    # token groups of the backward's state kernel: about 1024 programs in all natively, each walking its group's
    # tokens; the dL/dwg partials are [groups, K, d] fp32
    target = 4 if interpreting() else max(1, triton.cdiv(1024, chunks))
    return max(1, min(N, target))


def read_dynamic_backward(h, norm_weight, proj, gates, scales, eps, stats, grad_x, grad_carry_c, grad_write_c,
                          grad_in=None):
    """:func:`kernels.reference.read_dynamic_backward` on tensor cores. ``grad_in`` (``[N, n, d]``, optional) is
    added to ``dL/dH`` in fp32 before the one rounding (the fused write+read's gradient of H')."""
    n, m = gate_slots(gates)
    h, N, d = state_view(h, n, m)
    K = 2 * m + n
    gx = contiguous3(grad_x, m, d, "grad_x")
    gcc = grad_carry_c.float().reshape(N, n, n).contiguous()
    gwc = grad_write_c.float().reshape(N, n, m).contiguous()
    stats = stats.float().reshape(N, n, K + 1).contiguous()
    wgt, base, scales = gate_maps(norm_weight, proj, gates, scales)
    cfg = configs(n, m, d, h.dtype == gx.dtype == torch.bfloat16)
    coef_cfg, dh_cfg, dwg_cfg = cfg["dynamic_bwd_coef"], cfg["dynamic_bwd_dh"], cfg["dynamic_bwd_dwg"]
    programs = _programs(N, coef_cfg["TPP"])
    dh_chunks, dwg_chunks = (triton.cdiv(max(d, 1), c["BD"]) for c in (dh_cfg, dwg_cfg))
    dwg_groups = _state_groups(N, dwg_chunks)
    dev = h.device
    read_c = torch.empty((N, n, m), device=dev, dtype=torch.float32)
    g_u = torch.empty((N, n, K), device=dev, dtype=torch.float32)
    rowscale = torch.empty((N, n), device=dev, dtype=torch.float32)
    g_static = torch.zeros((programs, n, K), device=dev, dtype=torch.float32)
    g_scales = torch.zeros((programs, n, K), device=dev, dtype=torch.float32)
    g_h = torch.empty_like(h)
    g_wgt = torch.zeros((dwg_groups, K, d), device=dev, dtype=torch.float32)
    if grad_in is not None:
        grad_in = contiguous3(grad_in, n, d, "grad_in")
    if N:
        _read_dynamic_tc_bwd_coef[(programs,)](
            h, gx, gcc, gwc, stats, base, scales, read_c, g_u, rowscale, g_static, g_scales, N, d,
            1.0 / math.sqrt(max(d, 1)), **_pads(n, m), **launch_kwargs(coef_cfg))
        if d:
            args = (h, gx, read_c, g_u, rowscale, wgt, grad_in if grad_in is not None else h, g_h, g_wgt, N, d)
            for which, c, grid in (("dh", dh_cfg, (_state_groups(N, dh_chunks), dh_chunks)),
                                   ("dwg", dwg_cfg, (dwg_groups, dwg_chunks))):
                kw = {k: v for k, v in launch_kwargs(c).items() if k != "TPP"}
                _read_dynamic_tc_bwd_state[grid](*args, G_IN=grad_in is not None, WHICH=which, PARTS=_parts(h.dtype),
                                                 **_pads(n, m), **kw)
    g_static, g_scales = g_static.sum(0), g_scales.sum(0)  # [n, K], fixed-order sums of the partials
    return (g_h,) + dynamic_read_parameter_grads(g_static, g_scales, g_wgt.sum(0).t(), norm_weight, proj,
                                                 gates, scales)


_TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def static_gate_specs(n: int, m: int, d: int, dtype: str, launched_only: bool = True) -> list[dict]:
    """What ``benchmarks/kernel_static_check.py`` compiles for this (n, m, d, state dtype): every kernel of this
    module as its host function launches it (``launched_only=False``: also those never launched here, with a
    placeholder launch where :data:`LAUNCH` has none: what ``tc_launch_search.py`` starts from)."""
    ptr, f32, bf16 = f"*{dtype}", "*fp32", dtype == "bf16"
    cfg = configs(n, m, d, bf16)
    pads = _pads(n, m)

    def spec(name, fn, args, which, **constexprs):
        # not in cfg: no spill-free launch (LAUNCH None), never launched here (_tokens)
        c = cfg.get(which) or dict(TPP=8, BD=16, num_warps=4, num_stages=1)
        if which in ("dynamic_bwd_dh", "dynamic_bwd_dwg"):
            sizes = dict(BD=c["BD"])
        elif which.endswith("_batched"):
            sizes = dict(BD=c["BD"], TB=BATCHED_TOKENS[pads["NP"]])
        else:
            sizes = dict(TPP=c["TPP"], BD=c["BD"])
        # ids: the kernel_id()s under which the launchers run it (empty: not launched here). tc-v1 runs the per-token
        # kernels (unless one has no spill-free launch here), tc-v2 the batched ones where they are launched and the
        # per-token ones elsewhere (e.g. the dynamic read's backward behind either forward)
        batched_key = which.endswith("_batched")
        ids = {v for v, batched in ((KERNEL_ID, False), (TENSOR_CORE_BATCHED, True))
               if which in cfg and (_tokens(which.removesuffix("_batched"), n, d, bf16, batched) > 1) == batched_key}
        version = TENSOR_CORE_BATCHED if batched_key else KERNEL_ID
        return dict(kernel=f"{name}[{version}]", fn=fn, args=args, constexprs=dict(**pads, **sizes, **constexprs),
                    num_warps=c["num_warps"], num_stages=c["num_stages"], launch=which, ids=ids)

    specs = []
    write_fwd_args = dict(h_ptr=ptr, z_ptr=ptr, carry_ptr=f32, write_ptr=f32, out_ptr=ptr, N=16384, d=d)
    write_bwd_args = dict(h_ptr=ptr, z_ptr=ptr, carry_ptr=f32, write_ptr=f32, g_ptr=ptr, gh_ptr=ptr, gz_ptr=ptr,
                          gcarry_ptr=f32, gwrite_ptr=f32, N=16384, d=d)
    for suffix, fwd, bwd in (("", _write_tc_fwd, _write_tc_bwd), ("_batched", _write_tc_fwd_batched,
                                                                   _write_tc_bwd_batched)):
        for static in (False, True):
            kind = "static" if static else "dynamic"
            specs.append(spec(f"write_fwd{suffix}[{kind}]", fwd, write_fwd_args, f"write_fwd{suffix}", STATIC=static,
                              PARTS=_parts(_TORCH_DTYPES[dtype])))
            specs.append(spec(f"write_bwd{suffix}[{kind}]", bwd, write_bwd_args, f"write_bwd{suffix}", STATIC=static))
    specs += [

        spec("read_static_fwd", _read_tc_fwd, dict(h_ptr=ptr, read_ptr=f32, x_ptr=ptr, N=16384, d=d), "read_fwd"),
        spec("read_static_bwd", _read_tc_bwd,
             dict(h_ptr=ptr, read_ptr=f32, gx_ptr=ptr, gh_ptr=ptr, gread_ptr=f32, N=16384, d=d), "read_bwd",
             PARTS=_parts(_TORCH_DTYPES[dtype])),
        spec("read_dynamic_fwd", _read_dynamic_tc_fwd,
             dict(h_ptr=ptr, wgt_ptr=f32, base_ptr=f32, scale_ptr=f32, x_ptr=ptr, carry_ptr=f32, write_ptr=f32,
                  stats_ptr=f32, N=16384, d=d, eps=1e-6, inv_sqrt_d=0.03), "dynamic_fwd"),
        spec("read_dynamic_fwd_batched", _read_dynamic_tc_fwd_batched,
             dict(h_ptr=ptr, wgt_ptr=f32, base_ptr=f32, scale_ptr=f32, x_ptr=ptr, carry_ptr=f32, write_ptr=f32,
                  stats_ptr=f32, N=16384, d=d, eps=1e-6, inv_sqrt_d=0.03), "dynamic_fwd_batched"),
        spec("read_dynamic_bwd_coef", _read_dynamic_tc_bwd_coef,
             dict(h_ptr=ptr, gx_ptr=ptr, gcarry_ptr=f32, gwrite_ptr=f32, stats_ptr=f32, base_ptr=f32, scale_ptr=f32,
                  readc_ptr=f32, gu_ptr=f32, rowscale_ptr=f32, gstatic_ptr=f32, gscales_ptr=f32, N=16384,
                  d=d, inv_sqrt_d=0.03), "dynamic_bwd_coef"),
    ] + [
        spec(f"read_dynamic_bwd_{which}", _read_dynamic_tc_bwd_state,
             dict(h_ptr=ptr, gx_ptr=ptr, readc_ptr=f32, gu_ptr=f32, rowscale_ptr=f32, wgt_ptr=f32, gin_ptr=ptr,
                  gh_ptr=ptr, gwg_ptr=f32, N=16384, d=d), f"dynamic_bwd_{which}", G_IN=True, WHICH=which,
             PARTS=_parts(_TORCH_DTYPES[dtype]))
        for which in ("dh", "dwg")
    ]
    return [s for s in specs if s["ids"] or not launched_only]
