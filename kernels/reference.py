"""Plain-PyTorch GHC math: the executable spec of ``shared/spec/vwn-math.md``.

Every function works on token-major 3-D views:

* ``h``  ``[N, n, d]``  over-width state, N tokens, n slots of width d = D/m (model dtype)
* ``z``  ``[N, m, d]``  backbone sublayer output cut into m slots (model dtype; under autocast it may be
  narrower than ``h``, and :func:`write` promotes like ``h + z``)
* coefficient tensors are in the mixing precision (fp32; fp64 for fp64 states): ``read_c``/``write_c`` ``[N, n, m]``, ``carry_c`` ``[N, n, n]``;
  static GHC passes the parameters themselves (``[n, m]``, ``[n, n]``), which broadcast over tokens.

``write_c`` is ``B(H)^T``: row k holds the weights with which backbone slot i is written into virtual slot k.
Mixing runs in fp32 (fp64 for fp64 states, so gradcheck is meaningful); outputs are cast back to the model
dtype. Backward functions recompute the
coefficients from ``h`` instead of saving them (they are cheap: a slot RMS and a ``d x (2m+n)`` matmul).

This module knows nothing of fx, modules or configs.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "dynamic_coefficients",
    "gate_slots",
    "stack_gates",
    "read_dynamic",
    "read_dynamic_backward",
    "read_static",
    "read_static_backward",
    "state_dtype",
    "write",
    "write_backward",
    "write_read_dynamic",
    "write_read_dynamic_backward",
]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Mixing precision: fp32 for fp32/bf16/fp16 states, fp64 for fp64 states."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _split(c: torch.Tensor, m: int, n: int):
    # c: [N, n, 2m+n] -> read part [N, n, m], carry part [N, n, n], write part [N, n, m]
    return c[..., :m], c[..., m : m + n], c[..., m + n :]


def stack_gates(read: torch.Tensor, carry: torch.Tensor, write: torch.Tensor) -> torch.Tensor:
    """The three maps of a GHC side by side, as the dynamic-read ops take them: ``[read | carry | write^T]``,
    ``[n, m], [n, n], [m, n] -> [n, 2m+n]`` (the ``gates`` from ``read``/``carry``/``write``, the ``scales`` from
    ``scale_read``/``scale_carry``/``scale_write``). Differentiable: autograd splits the gradient back."""
    n, m = read.shape
    if tuple(carry.shape) != (n, n) or tuple(write.shape) != (m, n):
        raise ValueError(f"stack_gates: expected read [n, m], carry [n, n], write [m, n]; got {tuple(read.shape)}, "
                         f"{tuple(carry.shape)}, {tuple(write.shape)}")
    return torch.cat([read, carry, write.t()], dim=1)


def gate_slots(gates: torch.Tensor) -> tuple[int, int]:
    """``(n, m)`` of stacked gates ``[n, 2m+n]`` (:func:`stack_gates`)."""
    if gates.dim() != 2 or (gates.shape[1] - gates.shape[0]) % 2 or gates.shape[1] <= gates.shape[0]:
        raise ValueError(f"gates must be [read | carry | write^T] of shape [n, 2m+n] with m >= 1, got "
                         f"{tuple(gates.shape)}")
    n = gates.shape[0]
    return n, (gates.shape[1] - n) // 2


def dynamic_coefficients(h, norm_weight, proj, gates, scales, eps):
    """Coefficients of a dynamic GHC (``gates``/``scales`` ``[n, 2m+n]``, :func:`stack_gates`).

    Returns ``(coef, stats)``: the gated coefficients ``coef = [Read | Carry | WriteT]`` ``[N, n, 2m+n]`` and
    ``stats = [logits | 1/rms]`` ``[N, n, 2m+n+1]`` (mixing precision), all the backward needs besides ``h``.

    ``rmsnorm(H) * g @ W == (H @ (g[:, None] * W)) * inv_rms``: the gain and the normalization are folded into
    the small ``d x (2m+n)`` matrix and the ``[N, n, 2m+n]`` result, so no ``[N, n, d]`` temporary is made; the
    three gates are applied as one ``addcmul`` on the stacked maps.
    """
    ct = compute_dtype(h.dtype)
    d = h.shape[-1]
    hf = h.to(ct)
    sq_norm = torch.linalg.vector_norm(hf, dim=-1, keepdim=True).square()  # [N, n, 1]
    inv_rms = torch.rsqrt(sq_norm * (1.0 / d) + eps)  # [N, n, 1]
    wg = norm_weight.to(ct)[:, None] * proj.to(ct)  # [d, 2m+n]
    # H @ wg as [N*n, d] @ ([2m+n, d] contiguous)^T: CPU GEMMs run this skinny product ~2x faster than with wg
    # itself as the right operand (benchmarks/NOTES.md)
    u = torch.matmul(hf, wg.t().contiguous().t())  # [N, n, 2m+n]
    logits = u * (inv_rms * (1.0 / math.sqrt(d)))
    coef = torch.addcmul(gates.to(ct), scales.to(ct), torch.tanh(logits))
    return coef, torch.cat([logits, inv_rms], dim=-1)


def _read(hf: torch.Tensor, read_c: torch.Tensor) -> torch.Tensor:
    # X = Read^T @ H: [.., n, m]^T @ [N, n, d] -> [N, m, d]
    return torch.matmul(read_c.transpose(-1, -2), hf)


def read_dynamic(h, norm_weight, proj, gates, scales, eps):
    """Dynamic GHC read (``gates``/``scales``: the stacked maps and gate scales, ``[n, 2m+n]``).

    Returns ``(x [N, m, d] model dtype, carry_c [N, n, n], write_c [N, n, m], stats [N, n, 2m+n+1])``; ``stats``
    (pre-tanh logits and per-slot 1/rms) is what :func:`read_dynamic_backward` needs, so it does not recompute.
    """
    ct = compute_dtype(h.dtype)
    n, m = gate_slots(gates)
    coef, stats = dynamic_coefficients(h, norm_weight, proj, gates, scales, eps)
    read_c, carry_c, write_c = _split(coef, m, n)
    x = _read(h.to(ct), read_c).to(h.dtype)
    # clones: outputs of a custom op may not alias each other (slices of one tensor would, e.g. at n = m = 1)
    return x, carry_c.clone(), write_c.clone(), stats


def read_dynamic_backward(h, norm_weight, proj, gates, scales, eps, stats, grad_x, grad_carry_c, grad_write_c):
    """Gradients of :func:`read_dynamic` with respect to ``h, norm_weight, proj, gates, scales``."""
    ct = compute_dtype(h.dtype)
    n, m = gate_slots(gates)
    d = h.shape[-1]
    hf = h.to(ct)
    logits, inv_rms = stats[..., :-1], stats[..., -1:]  # [N, n, 2m+n], [N, n, 1]
    c = torch.tanh(logits)
    scales_f = scales.to(ct)  # [n, 2m+n]
    read_c = torch.addcmul(gates[:, :m].to(ct), scales_f[:, :m], c[..., :m])  # [N, n, m]
    gx = grad_x.to(ct)  # [N, m, d]
    g_read_c = torch.matmul(hf, gx.transpose(-1, -2))  # [N, n, m]: hf[t, j] . gx[t, i]
    g_h = torch.matmul(read_c, gx)  # [N, n, d] through X = Read^T H
    g_coef = torch.cat([g_read_c, grad_carry_c.to(ct), grad_write_c.to(ct)], dim=-1)  # [N, n, 2m+n]
    k = g_coef.shape[-1]
    g_static = g_coef.sum(0)  # [n, 2m+n]
    g_scales = (g_coef * c).sum(0)  # [n, 2m+n]
    g_logits = g_coef * scales_f * (1.0 - c * c)  # through tanh
    # logits = u * inv_rms / sqrt(d) with u = H @ wg
    g_u = g_logits * (inv_rms * (1.0 / math.sqrt(d)))  # [N, n, 2m+n]
    g_wg = (g_u.reshape(-1, k).t() @ hf.reshape(-1, d)).t()  # [d, 2m+n]; this operand order is ~4x faster on CPU
    gain, w = norm_weight.to(ct), proj.to(ct)
    g_proj = g_wg * gain[:, None]
    g_norm_weight = (g_wg * w).sum(1)
    g_h.view(-1, d).addmm_(g_u.reshape(-1, k), (gain[:, None] * w).t())  # through u = H @ wg
    # through inv_rms = (|h|^2/d + eps)^(-1/2): d inv_rms / d h = -inv_rms^3 h / d;
    # dL/d inv_rms = sum_k g_logits * u / sqrt(d) = sum_k g_logits * logits / inv_rms
    g_inv = (g_logits * logits).sum(-1, keepdim=True) / inv_rms  # [N, n, 1]
    g_h.addcmul_(hf, g_inv * inv_rms.pow(3) * (-1.0 / d))

    grads = (g_h, g_norm_weight, g_proj, g_static, g_scales)
    inputs = (h, norm_weight, proj, gates, scales)
    # contiguous copies, so that no two outputs alias and every output has the strides of the fake (meta) kernel
    return (g_h.to(h.dtype),) + tuple(g.to(t.dtype).clone(memory_format=torch.contiguous_format)
                                      for g, t in zip(grads[1:], inputs[1:]))


def read_static(h, read):
    """Static GHC read ``X = A_read^T H``: ``[N, n, d] -> [N, m, d]``."""
    ct = compute_dtype(h.dtype)
    return _read(h.to(ct), read.to(ct)).to(h.dtype)


def read_static_backward(h, read, grad_x):
    ct = compute_dtype(h.dtype)
    gx = grad_x.to(ct)
    hf = h.to(ct)
    n, d = hf.shape[-2:]
    m = gx.shape[-2]
    g_h = torch.matmul(read.to(ct), gx)  # [N, n, d]
    # sum over tokens of hf[t] @ gx[t]^T as one GEMM: [n, N*d] @ [N*d, m]
    g_read = hf.transpose(0, 1).reshape(n, -1) @ gx.transpose(0, 1).reshape(m, -1).t()
    return g_h.to(h.dtype), g_read.to(read.dtype)


def state_dtype(h: torch.Tensor, z: torch.Tensor) -> torch.dtype:
    """dtype of the new state ``H'``: ``h`` and ``z`` promoted, as ``h + z`` is in the un-widened model (an fp32
    residual stream stays fp32 when an autocast sublayer returns bf16)."""
    return torch.promote_types(h.dtype, z.dtype)


def write(h, z, carry_c, write_c):
    """``H' = WriteT @ Z + Carry^T @ H``: ``[N, n, d], [N, m, d] -> [N, n, d]`` in :func:`state_dtype` (the dtype
    of ``h`` and ``z`` promoted; ``h`` and ``z`` may differ, e.g. an fp32 state and a bf16 autocast sublayer).

    Two batched matmuls, the second accumulating in place (stacking ``[H ; Z]`` into one operand instead costs a
    concatenation that is slower than the second small-matrix bmm; benchmarks/NOTES.md).
    """
    out_dtype = state_dtype(h, z)
    ct = compute_dtype(out_dtype)
    out = torch.matmul(carry_c.to(ct).transpose(-1, -2), h.to(ct))  # [N, n, d]
    zf, wc = z.to(ct), write_c.to(ct)
    if wc.dim() == 3:
        out.baddbmm_(wc, zf)  # += WriteT @ Z without a temporary
    else:
        out += torch.matmul(wc, zf)
    return out.to(out_dtype)


def write_backward(h, z, carry_c, write_c, grad_out):
    """Gradients of :func:`write` with respect to ``h, z, carry_c, write_c``.

    When the coefficients are static (2-D), their gradients are summed over tokens. Each gradient has the dtype of
    its input.
    """
    ct = compute_dtype(state_dtype(h, z))
    g = grad_out.to(ct)  # [N, n, d]
    hf, zf = h.to(ct), z.to(ct)
    wc, cc = write_c.to(ct), carry_c.to(ct)
    g_z = torch.matmul(wc.transpose(-1, -2), g)  # [N, m, d]
    g_h = torch.matmul(cc, g)  # [N, n, d]
    if write_c.dim() == 2:
        n, m = wc.shape
        g_flat = g.transpose(0, 1).reshape(n, -1)  # [n, N*d]
        g_write_c = g_flat @ zf.transpose(0, 1).reshape(m, -1).t()  # [n, m]
        g_carry_c = hf.transpose(0, 1).reshape(n, -1) @ g_flat.t()  # [n, n]
    else:
        g_write_c = torch.matmul(g, zf.transpose(-1, -2))  # [N, n, m]
        g_carry_c = torch.matmul(hf, g.transpose(-1, -2))  # [N, n, n]
    return g_h.to(h.dtype), g_z.to(z.dtype), g_carry_c.to(carry_c.dtype), g_write_c.to(write_c.dtype)


def write_read_dynamic(h, z, carry_c, write_c, norm_weight, proj, gates, scales, eps):
    """:func:`write` then the next GHC's :func:`read_dynamic` on its result (the unfused meaning of the
    cross-layer fused op): ``(h_new, x, carry_c, write_c, stats)``."""
    h_new = write(h, z, carry_c, write_c)
    return (h_new,) + read_dynamic(h_new, norm_weight, proj, gates, scales, eps)


def write_read_dynamic_backward(h, z, carry_c, write_c, norm_weight, proj, gates, scales, eps, h_new, stats,
                                grad_h_new, grad_x, grad_carry2, grad_write2):
    """Gradients of :func:`write_read_dynamic`: ``(h, z, carry_c, write_c)`` then the four read parameters
    ``(norm_weight, proj, gates, scales)``."""
    g_read = read_dynamic_backward(h_new, norm_weight, proj, gates, scales, eps, stats, grad_x, grad_carry2,
                                   grad_write2)
    ct = compute_dtype(h_new.dtype)
    # dL/dH' summed in the mixing precision, rounded to the dtype of H' as autograd would sum it unfused
    g_total = (g_read[0].to(ct) + grad_h_new.to(ct)).to(h_new.dtype)
    return write_backward(h, z, carry_c, write_c, g_total) + tuple(g_read[1:])
