"""The fused Triton GHC kernels behind the same functions as :mod:`kernels.reference` (what ``vwn_transform.ops``
dispatches to when the Triton implementation is chosen). Importing this module imports triton.

Which kernels serve an op at (m, n) (``kernels.measured.kernel_id`` names them):

* the FMA kernels ("fma-v1": per-slot tiles, unrolled FMAs) for ``m <= n <= FMA_MAX_N``: the write + carry
  (``triton_write_fma``), the static read (``triton_read_fma``) and, where its gate values fit in registers
  (``triton_read_fma.supports_dynamic``), the dynamic read;
* the tensor-core kernels ("tc-v1", ``triton_tc``) everywhere else (m <= 16, n <= 64); their write (forward and
  backward) and dynamic read forward run batched ("tc-v2") where ``triton_common.tc_batched_tokens`` says so and
  ``triton_tc.LAUNCH`` has a spill-free launch for them.

The write+read of adjacent sublayers is the write followed by the dynamic read, each from its family; its
backward adds the incoming ``dL/dH'`` inside the read's backward (no extra state-sized pass), then runs the
write's backward.
"""

from . import triton_read_fma, triton_tc, triton_write_fma
from .reference import gate_slots

__all__ = ["read_dynamic", "read_dynamic_backward", "read_static", "read_static_backward", "write",
           "write_backward", "write_read_dynamic", "write_read_dynamic_backward"]


def _write_impl(n: int, m: int):
    return triton_write_fma if triton_write_fma.supports(n, m) else triton_tc


def _static_read_impl(read):
    return triton_read_fma if triton_read_fma.supports(*read.shape) else triton_tc


def _dynamic_read_impl(gates):
    return triton_read_fma if triton_read_fma.supports_dynamic(*gate_slots(gates)) else triton_tc


def write(h, z, carry_c, write_c):
    n, m = write_c.shape[-2:]
    return _write_impl(n, m).write(h, z, carry_c, write_c)


def write_backward(h, z, carry_c, write_c, grad_out):
    n, m = write_c.shape[-2:]
    return _write_impl(n, m).write_backward(h, z, carry_c, write_c, grad_out)


def read_static(h, read):
    return _static_read_impl(read).read_static(h, read)


def read_static_backward(h, read, grad_x):
    return _static_read_impl(read).read_static_backward(h, read, grad_x)


def read_dynamic(h, norm_weight, proj, gates, scales, eps):
    return _dynamic_read_impl(gates).read_dynamic(h, norm_weight, proj, gates, scales, eps)


def read_dynamic_backward(h, norm_weight, proj, gates, scales, eps, *rest, **kwargs):
    return _dynamic_read_impl(gates).read_dynamic_backward(h, norm_weight, proj, gates, scales, eps, *rest, **kwargs)


def _check_same_slots(write_c, gates):
    if tuple(write_c.shape[-2:]) != gate_slots(gates):
        raise ValueError(f"the fused write+read needs the same (n, m) on both sides, got "
                         f"{tuple(write_c.shape[-2:])} and {gate_slots(gates)}")


def write_read_dynamic(h, z, carry_c, write_c, norm_weight, proj, gates, scales, eps):
    _check_same_slots(write_c, gates)
    h_new = write(h, z, carry_c, write_c)
    return (h_new,) + _dynamic_read_impl(gates).read_dynamic(h_new, norm_weight, proj, gates, scales, eps)


def write_read_dynamic_backward(h, z, carry_c, write_c, norm_weight, proj, gates, scales, eps, h_new, stats,
                                grad_h_new, grad_x, grad_carry2, grad_write2):
    _check_same_slots(write_c, gates)
    # dL/dH' = the read's gradient + the incoming one, summed in fp32 inside the read's backward
    g_read = _dynamic_read_impl(gates).read_dynamic_backward(
        h_new, norm_weight, proj, gates, scales, eps, stats, grad_x, grad_carry2, grad_write2,
        grad_in=grad_h_new.reshape(h_new.shape))
    return write_backward(h, z, carry_c, write_c, g_read[0]) + tuple(g_read[1:])
