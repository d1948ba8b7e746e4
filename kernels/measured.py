"""What ``VWN_IMPL=auto`` picks on CUDA: the measured speed of the Triton kernels against the reference.

``auto`` runs a Triton kernel only where a GPU measurement says it beat the plain-PyTorch reference forward +
backward at that (op, m, n, dtype) and a similar size, with the very kernel that ships now; everything
unmeasured runs the reference. Adding a row needs a measurement (``benchmarks/gpu_check.py`` /
``benchmarks/ghc_kernels.py``), never a guess. Importing this module imports only torch.

Rows: :data:`MEASURED` (``shared/spec/gpu-kernels.md`` section 0). A row applies to a call when

* the op (forward or its backward: both follow the forward+backward figure, so a model never pays a slow
  backward for a fast forward), m, n and the state dtype are the row's;
* the slot width ``d = D/m`` is within a factor 2 of the measured one and the call has at least a quarter of
  the measured tokens (decode-sized calls, where launch latency dominates, were not measured);
* the Triton kernel that would run is the one that was measured (:func:`kernel_id`): a rewritten kernel
  starts unmeasured (so the FMA and tensor-core kernels, not yet measured on a GPU, are never picked by
  ``auto``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["MEASURED", "MEASURED_ON", "OPS", "Measurement", "auto_choice", "base_op", "kernel_id"]

MEASURED_ON = "NVIDIA H200, torch 2.11.0+cu130, triton 3.6.0, 2026-11-28"

OPS = ("read_dynamic", "read_static", "write", "write_read_dynamic")


def kernel_id(op: str, m: int, n: int) -> str:
    """Which Triton kernel ``VWN_IMPL=triton`` runs for ``op`` at (m, n); a measurement only counts for the kernel
    it measured. "fma-v1": unrolled FMAs on per-slot tiles (``kernels/triton_write_fma.py``,
    ``kernels/triton_read_fma.py``) for ``m <= n <= FMA_MAX_N`` (the dynamic read only where its gate values fit
    in registers); "tc-v1": the tensor-core kernels (``kernels/triton_tc.py``) everywhere else. The write+read of
    adjacent sublayers is the write then the dynamic read: "fma-v1+tc-v1" where the two come from different
    families. (The rows of :data:`MEASURED` measured "padded-dot-v1", the first kernels, since removed.)"""
    from .triton_common import fma_dynamic_read_supports, fma_supports

    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; expected one of {OPS}")
    mixing = "fma-v1" if fma_supports(n, m) else "tc-v1"
    gates = "fma-v1" if fma_dynamic_read_supports(n, m) else "tc-v1"
    if op in ("write", "read_static"):
        return mixing
    if op == "read_dynamic":
        return gates
    return mixing if mixing == gates else f"{mixing}+{gates}"


@dataclass(frozen=True)
class Measurement:
    op: str  # "read_dynamic", "read_static", "write", "write_read_dynamic"
    m: int
    n: int
    dtype: torch.dtype
    D: int  # backbone width: slot width d = D / m
    tokens: int
    kernel: str  # kernel_id() of the Triton kernel measured
    reference_ms: tuple[float, float]  # eager reference: forward, forward+backward (do_bench median)
    triton_ms: tuple[float, float]

    @property
    def d(self) -> int:
        return self.D // self.m

    @property
    def triton_faster(self) -> bool:
        return self.triton_ms[1] < self.reference_ms[1]


def _row(op, m, n, reference_ms, triton_ms):
    return Measurement(op, m, n, torch.bfloat16, 2048, 16384, "padded-dot-v1", reference_ms, triton_ms)


# shared/spec/gpu-kernels.md section 0 (H200, 16384 tokens, D=2048, bf16), all of the padded tl.dot kernels that
# the FMA and tensor-core kernels replaced: so none applies now, and auto runs the reference everywhere until
# benchmarks/gpu_check.py measures the kernels that ship. Only read_static at (8, 64) was faster forward+backward
# (2.51 vs 5.06 ms). read_static at (2, 3) was faster forward only (0.60 vs 1.07 ms) and
# slower forward+backward (3.88 vs 3.31 ms), so it stays on the reference.
MEASURED: tuple[Measurement, ...] = (
    _row("read_dynamic", 2, 3, (1.42, 2.87), (1.60, 5.89)),
    _row("read_static", 2, 3, (1.07, 3.31), (0.60, 3.88)),
    _row("write", 2, 3, (1.84, 4.03), (1.45, 51.0)),
    _row("read_dynamic", 8, 64, (5.24, 14.07), (65.3, 83.9)),
    _row("read_static", 8, 64, (1.40, 5.06), (0.57, 2.51)),
    _row("write", 8, 64, (3.00, 8.29), (72.6, 276.7)),
)


def base_op(op_name: str) -> str:
    """``"ghc_read_static_backward"`` -> ``"read_static"``: the op whose forward+backward a call belongs to."""
    name = op_name.removeprefix("ghc_")
    return name.removesuffix("_backward")


def _applies(row: Measurement, d: int, tokens: int) -> bool:
    return row.d / 2 <= d <= row.d * 2 and tokens >= row.tokens // 4


def auto_choice(op_name: str, m: int, n: int, dtype: torch.dtype, d: int, tokens: int,
                kernel_ids: dict[str, str] | None = None) -> tuple[str, str]:
    """``("triton" | "reference", reason)`` for ``VWN_IMPL=auto`` on CUDA, from :data:`MEASURED`
    (``kernel_ids``: ``{op: kernel}`` instead of :func:`kernel_id`, for tests)."""
    op = base_op(op_name)
    kernel = kernel_ids.get(op) if kernel_ids is not None else kernel_id(op, m, n)
    rows = [r for r in MEASURED if (r.op, r.m, r.n, r.dtype) == (op, m, n, dtype)]
    where = f"{op} at (m, n) = ({m}, {n}), {str(dtype).removeprefix('torch.')}"
    if not rows:
        return "reference", f"no measurement of {where} (unmeasured runs the reference)"
    sized = [r for r in rows if _applies(r, d, tokens)]
    if not sized:
        r = rows[0]
        return "reference", (f"{where} was measured at slot width {r.d} and {r.tokens} tokens, not near d={d} with "
                             f"{tokens} tokens (unmeasured runs the reference)")
    r = sized[0]
    if r.kernel != kernel:
        return "reference", (f"{where} was measured with the Triton kernel {r.kernel!r}, which is no longer the one "
                             f"that runs ({kernel!r}; unmeasured runs the reference)")
    figures = (f"triton {r.triton_ms[1]} ms vs reference {r.reference_ms[1]} ms forward+backward at {r.tokens} "
               f"tokens, D={r.D} on {MEASURED_ON}")
    if r.triton_faster:
        return "triton", f"measured faster: {figures}"
    return "reference", f"measured slower: {figures}"
