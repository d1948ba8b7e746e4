"""Shared pieces of the fused Triton GHC kernels: when they may run, input checks, launch helpers.

Layout conventions of every kernel (token-major, contiguous):

* ``h`` ``[N, n, d]`` over-width state, ``x``/``z`` ``[N, m, d]`` backbone-width tensors (model dtype);
* coefficients in fp32: per token ``[N, n, n]`` / ``[N, n, m]`` or static ``[n, n]`` / ``[n, m]``.

Two kernel families: the FMA kernels (``triton_write_fma.py``, ``triton_read_fma.py``: per-slot 2-D tiles, unrolled
FMAs, for ``m <= n <= FMA_MAX_N``) and the tensor-core kernels (``triton_tc.py``: per token ``tl.dot`` with the
slot counts padded to 16 by masked loads) for the rest; ``triton_ops.py`` dispatches between them. All mixing and
accumulation runs in fp32.

Triton runs natively on CUDA tensors; on CPU tensors only under ``TRITON_INTERPRET=1`` (set before triton is
imported), which is how CI tests these kernels.
"""

from __future__ import annotations

import contextlib
import os

import torch

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_M, MAX_N = 16, 64
FMA_MAX_N = 8  # slot counts up to this run the FMA kernels (triton_*_fma.py), larger ones the tensor-core ones
# the FMA dynamic read holds n * (2m + n) per-token gate values in registers: above this it spills on sm_90
# (benchmarks/kernel_static_check.py: (2, 8) = 96 compiles clean, (8, 8) = 192 spills KBs)
DYNAMIC_MAX_GATES = 96


def fma_supports(n: int, m: int) -> bool:
    """The FMA write + carry and the FMA static read run at (m, n)."""
    return 1 <= m <= n <= FMA_MAX_N


def fma_dynamic_read_supports(n: int, m: int) -> bool:
    """The FMA dynamic read (gates + mixing), and the write+read built on it, run at (m, n)."""
    return fma_supports(n, m) and n * (2 * m + n) <= DYNAMIC_MAX_GATES


# The tensor-core kernels (``triton_tc``) in two generations: "tc-v1" walks a program's tokens one after the other
# with ``[NP, BD]`` tiles; "tc-v2" (batched) takes BATCHED_TOKENS[NP] tokens at once as ``[TB, NP, BD]`` tiles (TB *
# NP = 128 state rows per tile): the write + carry forward and backward and the dynamic read forward so far. The
# per-token kernels stay at the padded slot counts in PER_TOKEN_TC, where the H200 measured them faster than the
# reference (kernels/measured.py), until the batched ones are measured beside them there (benchmarks/gpu_check.py
# does both; benchmarks/NOTES.md, "Batched tensor-core kernels").
BATCHED_TOKENS = {16: 8, 32: 4, 64: 2}
PER_TOKEN_TC = {16}


def tc_batched_tokens(n: int) -> int:
    """Tokens per program of the batched tensor-core kernels at ``n`` slots, or 1 where the per-token kernels run
    (:data:`PER_TOKEN_TC`)."""
    np_ = pow2(n)
    return 1 if np_ in PER_TOKEN_TC else BATCHED_TOKENS.get(np_, 1)  # n > MAX_N: no kernel runs (check_slots)


@contextlib.contextmanager
def per_token_tc(slot_counts):
    """Within: the per-token tensor-core kernels run at exactly these padded slot counts (:data:`PER_TOKEN_TC`), the
    batched ones elsewhere; restored afterwards (benchmarks and tests run both side by side)."""
    saved = set(PER_TOKEN_TC)
    PER_TOKEN_TC.clear()
    PER_TOKEN_TC.update(slot_counts)
    try:
        yield
    finally:
        PER_TOKEN_TC.clear()
        PER_TOKEN_TC.update(saved)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def why_not_runnable(t: torch.Tensor) -> str | None:
    """None when the Triton kernels can run on ``t``; otherwise the reason, for the error message."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed (pip install 'vwn_transform[triton]')"
    if t.dtype not in SUPPORTED_DTYPES:
        return f"the Triton GHC kernels support {[str(d) for d in SUPPORTED_DTYPES]}, got {t.dtype}"
    if t.device.type == "cuda":
        return None
    if t.device.type == "cpu":
        if interpreting():
            return None
        return ("the tensors are on the CPU and TRITON_INTERPRET=1 is not set (Triton runs on CUDA devices, or on "
                "the CPU only through its interpreter)")
    return f"Triton GHC kernels do not run on {t.device.type} tensors"


def pow2(x: int, floor: int = 16) -> int:
    """The smallest power of two >= max(x, floor): a padded slot count (``tl.dot`` sides are at least 16)."""
    p = floor
    while p < x:
        p *= 2
    return p


def aligned(d: int) -> bool:
    """Whether the slot width ``d`` is a multiple of 16. The Triton JIT specializes integer arguments on that: then
    every state row starts 16 elements in and its loads are vectorized (16-byte bf16 loads). At any other d it
    compiles scalar loads, each element with its own address and predicate registers, and tiles that fit at an
    aligned d spill (up to KBs per thread: benchmarks/NOTES.md, "Unaligned slot widths"), so the launchers choose
    their chunks per alignment. A CPU tensor under the interpreter runs the same chunks."""
    return d % 16 == 0


def check_slots(n: int, m: int) -> None:
    if not (1 <= m <= MAX_M and 1 <= n <= MAX_N):
        raise ValueError(f"the Triton GHC kernels support m <= {MAX_M} and n <= {MAX_N}, got (m, n) = ({m}, {n})")


def contiguous3(t: torch.Tensor, slots: int, d: int, name: str) -> torch.Tensor:
    if t.dim() != 3 or t.shape[1] != slots or t.shape[2] != d:
        raise ValueError(f"{name} must have shape [N, {slots}, {d}], got {list(t.shape)}")
    return t.contiguous()


def state_view(h: torch.Tensor, n: int, m: int) -> tuple[torch.Tensor, int, int]:
    """Validate a launch: ``(h as contiguous [N, n, d], N, d)`` after checking (m, n) against the kernels' range."""
    check_slots(n, m)
    d = h.shape[-1]
    h = contiguous3(h, n, d, "h")
    return h, h.shape[0], d


def interpreter_bt(bt: int) -> int:
    """Tokens per program of the FMA kernels: ``bt`` natively, 128 under the interpreter, whose cost is per
    program and per unrolled op, hardly per element (same code paths: token masking, the loop over d; only the
    block height differs)."""
    return 128 if interpreting() else bt


def launch_kwargs(cfg: dict) -> dict:
    """A launch configuration as kernel keyword arguments (the interpreter ignores num_warps/num_stages)."""
    return cfg if not interpreting() else {k: v for k, v in cfg.items() if k not in ("num_warps", "num_stages")}


# ---------------------------------------------------------------------------------------------------------------
# host-side pieces both kernel families share (torch only)
# ---------------------------------------------------------------------------------------------------------------
def write_coefficients(carry_c, write_c, N: int, n: int, m: int):
    """``(static, carry [.., n, n], write [.., n, m])`` in fp32, contiguous: the maps themselves (static, 2-D) or
    one per token (``[N, n, n]`` / ``[N, n, m]``)."""
    if write_c.dim() == 2:
        return True, carry_c.float().contiguous(), write_c.float().contiguous()
    return False, carry_c.reshape(N, n, n).float().contiguous(), write_c.reshape(N, n, m).float().contiguous()


def gate_maps(norm_weight, proj, gates, scales):
    """``(wg^T [K, d], base [n, K], scales [n, K])`` in fp32, K = 2m + n: the gain folded into the projection (one
    contiguous row per gate column), the stacked maps ``[read | carry | write^T]`` and their gate scales."""
    wgt = (norm_weight.float()[:, None] * proj.float()).t().contiguous()
    return wgt, gates.float().contiguous(), scales.float().contiguous()


def dynamic_read_parameter_grads(g_static, g_scales, g_wg, norm_weight, proj, gates, scales) -> tuple:
    """The dynamic read's parameter gradients in the reference's order (``norm_weight, proj, gates, scales``) from
    the kernels' sums: ``g_static``/``g_scales`` ``[n, K]`` and ``g_wg`` ``[d, K]`` (the gradient of the folded
    projection); each in its parameter's dtype, contiguous (no two outputs alias)."""
    gain, w = norm_weight.float(), proj.float()
    grads = ((g_wg * w).sum(1), g_wg * gain[:, None], g_static, g_scales)
    params = (norm_weight, proj, gates, scales)
    return tuple(g.to(p.dtype).clone(memory_format=torch.contiguous_format) for g, p in zip(grads, params))
