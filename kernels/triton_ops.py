"""The fused Triton GHC kernels behind the same functions as :mod:`kernels.reference` (what ``vwn_transform.ops``
dispatches to when the Triton implementation is chosen). Importing this module imports triton."""

from .triton_read_dynamic import read_dynamic, read_dynamic_backward
from .triton_read_static import read_static, read_static_backward
from .triton_write import write, write_backward
from .triton_write_read import write_read_dynamic, write_read_dynamic_backward

__all__ = ["read_dynamic", "read_dynamic_backward", "read_static", "read_static_backward", "write",
           "write_backward", "write_read_dynamic", "write_read_dynamic_backward"]
