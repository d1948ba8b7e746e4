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
  starts unmeasured.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["FMA_GATES", "FMA_MIXING", "MEASURED", "MEASURED_ON", "OPS", "TENSOR_CORE", "TENSOR_CORE_BATCHED",
           "Measurement", "auto_choice", "base_op", "kernel_id"]

MEASURED_ON = "NVIDIA H200, torch 2.11.0+cu130, triton 3.6.0, 2026-11-28"

OPS = ("read_dynamic", "read_static", "write", "write_read_dynamic")


# Kernel versions: a measurement only counts for the version it measured, so a rewritten kernel bumps its id.
FMA_MIXING = "fma-v1"  # the FMA write + carry (kernels/triton_write_fma.py) and static read (triton_read_fma.py)
# the FMA dynamic read (triton_read_fma.py); v2: the backward's state kernel sums dL/dwg over a program's tokens
# once at its end instead of once per token block (v1 on the H200: 0.63 ms of a 0.77 ms backward at (2, 3) went to
# those cross-warp sums; v2's forward+backward 0.43 ms against v1's 0.90)
FMA_GATES = "fma-v2"
# kernels/triton_tc.py (at NP = 64 its dynamic read forward now reloads the maps per token and runs 4 warps; NP <= 32
# compiles to the kernel measured)
TENSOR_CORE = "tc-v1"
# the batched tensor-core kernels (several tokens per program, triton_common.BATCHED_TOKENS): the write + carry
# forward and backward and the dynamic read forward (its backward is tc-v1's), each where it has a spill-free launch
# in triton_tc.LAUNCH (not: the write backward at 64 slots, fp32 states' at 32, and at 64 slots with an unaligned
# width the fp32 write forward); the per-token tc-v1 kernel runs in its place there
TENSOR_CORE_BATCHED = "tc-v2"


def kernel_id(op: str, m: int, n: int) -> str:
    """Which Triton kernel ``VWN_IMPL=triton`` runs for ``op`` at (m, n); a measurement only counts for the kernel
    it measured. :data:`FMA_MIXING` / :data:`FMA_GATES`: unrolled FMAs on per-slot tiles
    (``kernels/triton_write_fma.py``, ``kernels/triton_read_fma.py``) for ``m <= n <= FMA_MAX_N`` (the dynamic read
    only where its gate values fit in registers); :data:`TENSOR_CORE`: the tensor-core kernels
    (``kernels/triton_tc.py``) everywhere else, :data:`TENSOR_CORE_BATCHED` for their write and dynamic read where
    those take several tokens per program. The write+read of adjacent sublayers is the write then the dynamic
    read: ``"<write>+<read>"`` where the two ids differ. (Rows measured before tc-v1/fma-v1 measured the padded
    ``tl.dot`` kernels, "padded-dot-v1", since removed.)"""
    from .triton_common import fma_dynamic_read_supports, fma_supports, tc_batched_tokens

    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; expected one of {OPS}")
    tensor_core = TENSOR_CORE_BATCHED if tc_batched_tokens(n) > 1 else TENSOR_CORE  # write, dynamic read
    mixing = FMA_MIXING if fma_supports(n, m) else tensor_core
    gates = FMA_GATES if fma_dynamic_read_supports(n, m) else tensor_core
    if op == "read_static":
        return FMA_MIXING if fma_supports(n, m) else TENSOR_CORE
    if op == "write":
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


def _row(op, m, n, kernel, reference_ms, triton_ms):
    return Measurement(op, m, n, torch.bfloat16, 2048, 16384, kernel, reference_ms, triton_ms)


# benchmarks/gpu_check.py on the NVIDIA H200 above (copy 4246 GB/s), 16384 tokens, D=2048, bf16 state, eager
# reference vs Triton, (forward, forward+backward) ms, do_bench medians; benchmarks/RESULTS.md has the runs (run 1:
# fma-v1 and tc-v1 rows; run 3: the fma-v2 dynamic read). (8, 64) has no row: its tensor-core dynamic read forward
# faulted at 8 warps in run 1, and the 4-warp launch that replaced it (correct there) was not timed.
MEASURED: tuple[Measurement, ...] = (
    _row("read_static", 1, 4, "fma-v1", (0.705, 2.781), (0.088, 0.256)),
    _row("write", 1, 4, "fma-v1", (3.862, 6.736), (0.175, 0.445)),
    _row("read_dynamic", 1, 4, "fma-v2", (1.584, 4.526), (0.254, 0.692)),
    _row("write_read_dynamic", 1, 4, "fma-v1+fma-v2", (5.505, 12.662), (0.429, 1.238)),
    _row("read_static", 2, 3, "fma-v1", (1.071, 3.308), (0.048, 0.139)),
    _row("write", 2, 3, "fma-v1", (1.836, 4.028), (0.073, 0.205)),
    _row("read_dynamic", 2, 3, "fma-v2", (1.421, 2.865), (0.135, 0.430)),
    _row("write_read_dynamic", 2, 3, "fma-v1+fma-v2", (3.288, 7.455), (0.205, 0.644)),
    _row("read_static", 8, 16, "tc-v1", (0.524, 1.866), (0.060, 0.261)),
    _row("write", 8, 16, "tc-v1", (0.992, 2.699), (0.111, 0.568)),
    _row("read_dynamic", 8, 16, "tc-v1", (1.101, 2.985), (0.651, 1.253)),
    _row("write_read_dynamic", 8, 16, "tc-v1", (2.091, 6.344), (0.762, 2.026)),
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
