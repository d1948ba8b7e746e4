"""The fused Triton GHC kernels behind the same functions as :mod:`kernels.reference` (what ``vwn_transform.ops``
dispatches to when the Triton implementation is chosen). Importing this module imports triton.

Which kernel serves an op at (m, n) (``kernels.measured.kernel_id`` names it):

* the FMA kernels ("fma-v1": per-slot tiles, unrolled FMAs) for ``m <= n <= FMA_MAX_N``: the write + carry
  (``triton_write_fma``), the static read (``triton_read_fma``), and, where its gate values fit in registers
  (``triton_read_fma.supports_dynamic``), the dynamic read and the write+read of adjacent sublayers, which there
  is the FMA write followed by the FMA dynamic read (its backward adds ``dL/dH'`` inside the read's kernel);
* the padded ``tl.dot`` kernels ("padded-dot-v1") everywhere else.
"""

from . import triton_read_dynamic, triton_read_fma, triton_read_static, triton_write, triton_write_fma
from . import triton_write_read

__all__ = ["read_dynamic", "read_dynamic_backward", "read_static", "read_static_backward", "write",
           "write_backward", "write_read_dynamic", "write_read_dynamic_backward"]


def _write_impl(n: int, m: int):
    return triton_write_fma if triton_write_fma.supports(n, m) else triton_write


def _fma_dynamic(read) -> bool:
    n, m = read.shape
    return triton_read_fma.supports_dynamic(n, m)


def write(h, z, carry_c, write_c):
    n, m = write_c.shape[-2:]
    return _write_impl(n, m).write(h, z, carry_c, write_c)


def write_backward(h, z, carry_c, write_c, grad_out):
    n, m = write_c.shape[-2:]
    return _write_impl(n, m).write_backward(h, z, carry_c, write_c, grad_out)


def read_static(h, read):
    impl = triton_read_fma if triton_read_fma.supports(*read.shape) else triton_read_static
    return impl.read_static(h, read)


def read_static_backward(h, read, grad_x):
    impl = triton_read_fma if triton_read_fma.supports(*read.shape) else triton_read_static
    return impl.read_static_backward(h, read, grad_x)


def read_dynamic(h, norm_weight, proj, read, *rest):
    impl = triton_read_fma if _fma_dynamic(read) else triton_read_dynamic
    return impl.read_dynamic(h, norm_weight, proj, read, *rest)


def read_dynamic_backward(h, norm_weight, proj, read, *rest):
    impl = triton_read_fma if _fma_dynamic(read) else triton_read_dynamic
    return impl.read_dynamic_backward(h, norm_weight, proj, read, *rest)


def write_read_dynamic(h, z, carry_c, write_c, norm_weight, proj, read, carry, write_, scale_read, scale_carry,
                       scale_write, eps):
    if not _fma_dynamic(read):
        return triton_write_read.write_read_dynamic(h, z, carry_c, write_c, norm_weight, proj, read, carry, write_,
                                                    scale_read, scale_carry, scale_write, eps)
    n, m = read.shape
    if tuple(write_c.shape[-2:]) != (n, m):
        raise ValueError(f"the fused write+read needs the same (n, m) on both sides, got {tuple(write_c.shape[-2:])} "
                         f"and {(n, m)}")
    h_new = triton_write_fma.write(h, z, carry_c, write_c)
    return (h_new,) + triton_read_fma.read_dynamic(h_new, norm_weight, proj, read, carry, write_, scale_read,
                                                   scale_carry, scale_write, eps)


def write_read_dynamic_backward(h, z, carry_c, write_c, norm_weight, proj, read, carry, write_, scale_read,
                                scale_carry, scale_write, eps, h_new, stats, grad_h_new, grad_x, grad_carry2,
                                grad_write2):
    if not _fma_dynamic(read):
        return triton_write_read.write_read_dynamic_backward(
            h, z, carry_c, write_c, norm_weight, proj, read, carry, write_, scale_read, scale_carry, scale_write,
            eps, h_new, stats, grad_h_new, grad_x, grad_carry2, grad_write2)
    # dL/dH' = the read's gradient + the incoming one, summed in fp32 inside the read's state kernel
    g_read = triton_read_fma.read_dynamic_backward(h_new, norm_weight, proj, read, carry, write_, scale_read,
                                                   scale_carry, scale_write, eps, stats, grad_x, grad_carry2,
                                                   grad_write2, grad_in=grad_h_new.reshape(h_new.shape))
    return triton_write_fma.write_backward(h, z, carry_c, write_c, g_read[0]) + tuple(g_read[1:])
