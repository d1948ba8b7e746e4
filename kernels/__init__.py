"""GHC math: the plain-PyTorch reference (the executable spec); fused Triton kernels come later."""

from . import reference

__all__ = ["reference"]
