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
  starts unmeasured (so the FMA write kernels, not yet measured on a GPU, are never picked by ``auto``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["KERNEL_IDS", "MEASURED", "MEASURED_ON", "Measurement", "auto_choice", "base_op", "kernel_id"]

MEASURED_ON = "NVIDIA H200, torch 2.11.0+cu130, triton 3.6.0, 2026-11-28"

# The Triton kernel each op dispatches to under VWN_IMPL=triton; a measurement only counts for the kernel it
# measured. "padded-dot-v1": the first kernels (3-D tiles padded to 16 slots, tl.dot in fp32); "fma-v1": unrolled
# FMAs on per-slot tiles (kernels/triton_write_fma.py, kernels/triton_read_fma.py), for m <= n <= FMA_MAX_N (the
# dynamic read and the fused write+read only where triton_read_fma.supports_dynamic; elsewhere the fused
# write+read's backward still runs the FMA write backward: "padded-dot-v1+fma-v1").
KERNEL_IDS = {
    "read_dynamic": "padded-dot-v1",
    "read_static": "padded-dot-v1",
    "write": "padded-dot-v1",
    "write_read_dynamic": "padded-dot-v1",
}
FMA_KERNEL_IDS = {"write": "fma-v1", "write_read_dynamic": "padded-dot-v1+fma-v1"}


def kernel_id(op: str, m: int, n: int) -> str:
    """Which Triton kernel ``VWN_IMPL=triton`` runs for ``op`` at (m, n)."""
    from .triton_common import fma_dynamic_read_supports, fma_supports

    if not fma_supports(n, m):
        return KERNEL_IDS[op]
    if op == "read_static" or (op in ("read_dynamic", "write_read_dynamic") and fma_dynamic_read_supports(n, m)):
        return "fma-v1"
    return FMA_KERNEL_IDS.get(op, KERNEL_IDS[op])


@dataclass(frozen=True)
class Measurement:
    op: str  # "read_dynamic", "read_static", "write", "write_read_dynamic"
    m: int
    n: int
    dtype: torch.dtype
    D: int  # backbone width: slot width d = D / m
    tokens: int
    kernel: str  # KERNEL_IDS value of the Triton kernel measured
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


# shared/spec/gpu-kernels.md section 0 (H200, 16384 tokens, D=2048, bf16). Only read_static at (8, 64) was
# faster forward+backward (2.51 vs 5.06 ms). read_static at (2, 3) was faster forward only (0.60 vs 1.07 ms) and
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
