"""Triton device functions shared by the GHC kernels (importing this imports triton)."""

import triton
import triton.language as tl


@triton.jit
def to_output(x, ptr):
    """fp32 ``x`` cast to the element type of ``ptr`` with round-to-nearest-even. bf16 is rounded by hand: the
    interpreter truncates fp32 -> bf16 (twice the error of a rounded cast); on GPU this is a few integer ops."""
    if ptr.dtype.element_ty == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + (((bits >> 16) & 1) + 0x7FFF)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True).to(tl.bfloat16)
    return x.to(ptr.dtype.element_ty)


@triton.jit
def tanh(x):
    """fp32 ``tanh`` without libdevice (the interpreter has none): ``1 - 2 / (exp(2x) + 1)`` (exact limits at
    +-inf) for ``|x| >= 0.3``; below, where that form cancels (absolute error ~1e-7, so a large relative error for
    small x), the odd Taylor series to x^13 (truncation < 1e-9 relative at 0.3)."""
    x2 = x * x
    series = x * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0 + x2 * (
        62.0 / 2835.0 + x2 * (-1382.0 / 155925.0 + x2 * (21844.0 / 6081075.0)))))))
    return tl.where(tl.abs(x) < 0.3, series, 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0))


@triton.jit
def coefficient(ptr, t64, tmask, idx: tl.constexpr, size: tl.constexpr, STATIC: tl.constexpr):
    """Coefficient number ``idx`` of a row-major ``[rows, cols]`` map (``size = rows * cols``) as a ``[BT, 1]``
    fp32 column: one scalar splat over the tokens (``STATIC``: the map itself) or one value per token ``t64``
    (dynamic: ``[N, rows, cols]``)."""
    if STATIC:  # both branches must have one type: splat the scalar to [BT]
        c = tl.zeros_like(t64).to(tl.float32) + tl.load(ptr + idx)
    else:
        c = tl.load(ptr + t64 * size + idx, mask=tmask, other=0.0)
    return c[:, None]
