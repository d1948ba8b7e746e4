"""GHC math: the plain-PyTorch reference (the executable spec) and the fused Triton kernels.

``reference`` imports only torch; the Triton kernels (``triton_ops`` and the ``triton_*`` files, one op per file)
import triton and are loaded on demand by ``vwn_transform.ops``.
"""

from . import reference

__all__ = ["reference"]
