"""Plain-PyTorch GHC math: the executable spec of ``shared/spec/vwn-math.md``.

Every function works on token-major 3-D views:

* ``h``  ``[N, n, d]``  over-width state, N tokens, n slots of width d = D/m (model dtype)
* ``z``  ``[N, m, d]``  backbone sublayer output cut into m slots (model dtype)
* coefficient tensors are fp32: ``read_c``/``write_c`` ``[N, n, m]``, ``carry_c`` ``[N, n, n]``;
  static GHC passes the parameters themselves (``[n, m]``, ``[n, n]``), which broadcast over tokens.

``write_c`` is ``B(H)^T``: row k holds the weights with which backbone slot i is written into virtual slot k.
Mixing always runs in fp32; outputs are cast back to the model dtype. Backward functions recompute the
coefficients from ``h`` instead of saving them (they are cheap: a slot RMS and a ``d x (2m+n)`` matmul).

This module knows nothing of fx, modules or configs.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "dynamic_coefficients",
    "read_dynamic",
    "read_dynamic_backward",
    "read_static",
    "read_static_backward",
    "write",
    "write_backward",
]


def _split(c: torch.Tensor, m: int, n: int):
    # c: [N, n, 2m+n] -> read part [N, n, m], carry part [N, n, n], write part [N, n, m]
    return c[..., :m], c[..., m : m + n], c[..., m + n :]


def dynamic_coefficients(h, norm_weight, proj, read, carry, write, scale_read, scale_carry, scale_write, eps):
    """Coefficients of a dynamic GHC.

    Returns ``(read_c, carry_c, write_c, c, y)``: the three gated coefficient tensors (fp32), the tanh
    activations ``c`` ``[N, n, 2m+n]`` and the un-gained normalized slots ``y`` ``[N, n, d]`` (both needed by
    the backward).
    """
    n, m = read.shape
    d = h.shape[-1]
    hf = h.float()
    # RMS over each slot's d features; the gain g is shared by all slots.
    inv_rms = torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)  # [N, n, 1]
    y = hf * inv_rms  # [N, n, d]
    logits = torch.matmul(y * norm_weight.float(), proj.float()) * (1.0 / math.sqrt(d))  # [N, n, 2m+n]
    c = torch.tanh(logits)
    c_read, c_carry, c_write = _split(c, m, n)
    read_c = read.float() + scale_read.float() * c_read  # [N, n, m]
    carry_c = carry.float() + scale_carry.float() * c_carry  # [N, n, n]
    write_c = write.float().t() + scale_write.float().t() * c_write  # [N, n, m] = B(H)^T
    return read_c, carry_c, write_c, c, y


def _read(hf: torch.Tensor, read_c: torch.Tensor) -> torch.Tensor:
    # X = Read^T @ H: [.., n, m]^T @ [N, n, d] -> [N, m, d]
    return torch.matmul(read_c.transpose(-1, -2), hf)


def read_dynamic(h, norm_weight, proj, read, carry, write, scale_read, scale_carry, scale_write, eps):
    """Dynamic GHC read: returns ``(x [N, m, d] model dtype, carry_c [N, n, n], write_c [N, n, m])``."""
    read_c, carry_c, write_c, _, _ = dynamic_coefficients(
        h, norm_weight, proj, read, carry, write, scale_read, scale_carry, scale_write, eps
    )
    x = _read(h.float(), read_c).to(h.dtype)
    return x, carry_c, write_c


def read_dynamic_backward(
    h, norm_weight, proj, read, carry, write, scale_read, scale_carry, scale_write, eps,
    grad_x, grad_carry_c, grad_write_c,
):
    """Gradients of :func:`read_dynamic` with respect to ``h`` and the nine parameters (same order)."""
    n, m = read.shape
    d = h.shape[-1]
    hf = h.float()
    read_c, _, _, c, y = dynamic_coefficients(
        h, norm_weight, proj, read, carry, write, scale_read, scale_carry, scale_write, eps
    )
    gx = grad_x.float()  # [N, m, d]
    g_read_c = torch.matmul(hf, gx.transpose(-1, -2))  # [N, n, m]: hf[t, j] . gx[t, i]
    g_h = torch.matmul(read_c, gx)  # [N, n, d] through X = Read^T H
    g_carry_c = grad_carry_c.float()
    g_write_c = grad_write_c.float()

    c_read, c_carry, c_write = _split(c, m, n)
    g_read = g_read_c.sum(0)
    g_carry = g_carry_c.sum(0)
    g_write = g_write_c.sum(0).t()
    g_scale_read = (g_read_c * c_read).sum(0)
    g_scale_carry = (g_carry_c * c_carry).sum(0)
    g_scale_write = (g_write_c * c_write).sum(0).t()

    g_c = torch.cat(
        [g_read_c * scale_read.float(), g_carry_c * scale_carry.float(), g_write_c * scale_write.float().t()], -1
    )  # [N, n, 2m+n]
    g_logits = g_c * (1.0 - c * c) * (1.0 / math.sqrt(d))
    gain = norm_weight.float()
    yg = y * gain  # [N, n, d]
    k = g_logits.shape[-1]
    g_proj = yg.reshape(-1, d).t() @ g_logits.reshape(-1, k)  # [d, 2m+n]
    g_yg = torch.matmul(g_logits, proj.float().t())  # [N, n, d]
    g_norm_weight = (g_yg * y).reshape(-1, d).sum(0)
    g_y = g_yg * gain
    # RMSNorm backward: dx = inv_rms * (dy - y * mean(y * dy))
    inv_rms = torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    g_h = g_h + inv_rms * (g_y - y * (g_y * y).mean(-1, keepdim=True))

    grads = (g_h, g_norm_weight, g_proj, g_read, g_carry, g_write, g_scale_read, g_scale_carry, g_scale_write)
    inputs = (h, norm_weight, proj, read, carry, write, scale_read, scale_carry, scale_write)
    return tuple(g.to(t.dtype) for g, t in zip(grads, inputs))


def read_static(h, read):
    """Static GHC read ``X = A_read^T H``: ``[N, n, d] -> [N, m, d]``."""
    return _read(h.float(), read.float()).to(h.dtype)


def read_static_backward(h, read, grad_x):
    gx = grad_x.float()
    hf = h.float()
    n, d = hf.shape[-2:]
    m = gx.shape[-2]
    g_h = torch.matmul(read.float(), gx)  # [N, n, d]
    # sum over tokens of hf[t] @ gx[t]^T as one GEMM: [n, N*d] @ [N*d, m]
    g_read = hf.transpose(0, 1).reshape(n, -1) @ gx.transpose(0, 1).reshape(m, -1).t()
    return g_h.to(h.dtype), g_read.to(read.dtype)


def write(h, z, carry_c, write_c):
    """``H' = WriteT @ Z + Carry^T @ H``: ``[N, n, d], [N, m, d] -> [N, n, d]`` in the dtype of ``h``."""
    out = torch.matmul(write_c.float(), z.float()) + torch.matmul(carry_c.float().transpose(-1, -2), h.float())
    return out.to(h.dtype)


def write_backward(h, z, carry_c, write_c, grad_out):
    """Gradients of :func:`write` with respect to ``h, z, carry_c, write_c``.

    When the coefficients are static (2-D), their gradients are summed over tokens.
    """
    g = grad_out.float()  # [N, n, d]
    hf, zf = h.float(), z.float()
    wc, cc = write_c.float(), carry_c.float()
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
