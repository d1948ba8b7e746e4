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
