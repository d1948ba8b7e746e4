"""The fused Triton GHC kernels behind the same functions as :mod:`kernels.reference` (what ``vwn_transform.ops``
dispatches to when the Triton implementation is chosen). Importing this module imports triton.

The write + carry runs the FMA kernels (``triton_write_fma``) for n <= ``FMA_MAX_N`` and the padded ``tl.dot``
kernels (``triton_write``) above; the reads and the fused write+read run the padded ``tl.dot`` kernels
(``kernels.measured.kernel_id`` names which kernel serves which (op, m, n)).
"""

from . import triton_write, triton_write_fma
from .triton_read_dynamic import read_dynamic, read_dynamic_backward
from .triton_read_static import read_static, read_static_backward
from .triton_write_read import write_read_dynamic, write_read_dynamic_backward

__all__ = ["read_dynamic", "read_dynamic_backward", "read_static", "read_static_backward", "write",
           "write_backward", "write_read_dynamic", "write_read_dynamic_backward"]


def write(h, z, carry_c, write_c):
    n, m = write_c.shape[-2:]
    impl = triton_write_fma if triton_write_fma.supports(n, m) else triton_write
    return impl.write(h, z, carry_c, write_c)


def write_backward(h, z, carry_c, write_c, grad_out):
    n, m = write_c.shape[-2:]
    impl = triton_write_fma if triton_write_fma.supports(n, m) else triton_write
    return impl.write_backward(h, z, carry_c, write_c, grad_out)
