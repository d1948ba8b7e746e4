"""The op boundary: GHC math as ``torch.library`` custom ops (``torch.ops.vwn.*``).

Passes and modules call these ops, never Python closures, so that Dynamo does not graph-break,
``torch.export`` carries them as opaque nodes, a compile backend can match them by identity and ONNX export
can translate them. Each op has a fake (meta) implementation and a registered autograd formula whose backward
is itself a custom op.

Which implementation runs is chosen explicitly, never by silent fallback:

* ``VWN_IMPL=reference`` (or :func:`set_impl`): the plain-PyTorch math in ``vwn_transform.kernels.reference``.
* ``VWN_IMPL=triton``: the fused Triton kernels (``vwn_transform.kernels.triton_*``; the write + carry by the FMA
  kernels for n <= 8): natively on CUDA tensors, on CPU tensors only under ``TRITON_INTERPRET=1``; anywhere else
  a ``RuntimeError`` that says why.
* ``VWN_IMPL=auto`` (default): never slower than the reference by measurement. On CUDA a Triton kernel runs
  only where the measured table in ``vwn_transform.kernels.measured`` (device, versions and figures in it) says
  that kernel beat the reference forward+backward at that (op, m, n, dtype) and a similar size, and the kernels
  can run there; everything unmeasured runs the reference. On the CPU: the reference.

The choice and its reason are logged whenever they change for an op and are queryable with
:func:`implementations_used` (``reasons=True`` adds the reason).

Autocast: every op (forward and backward) has an AutocastCPU and AutocastCUDA kernel that runs it as outside
autocast, without casting its inputs; ``ghc_write`` promotes the state and sublayer dtypes like ``s + z`` does
(the autocast section at the end of this module says why).

Shapes (flat, as the model carries them): ``h`` ``[..., n*d]``, ``x``/``z`` ``[..., m*d]``. The dynamic reads take a
GHC's three maps and its three gate scales stacked, ``gates``/``scales`` ``[n, 2m+n]`` as ``[read | carry |
write^T]`` (:func:`stack_gates`, built at call time from the module's parameters, which keep their names and
shapes).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import torch

from vwn_transform.kernels import reference
from vwn_transform.kernels.reference import stack_gates

__all__ = [
    "AUTOCAST_DEVICE_TYPES",
    "stack_gates",
    "AUTOCAST_DISPATCH_KEYS",
    "IMPLS",
    "backward_op_names",
    "current_impl",
    "implementations_used",
    "op_names",
    "reset_implementations_used",
    "set_impl",
]

log = logging.getLogger("vwn_transform")

IMPLS = ("auto", "reference", "triton")
_impl_override: str | None = None
_used: dict[str, str] = {}
_reasons: dict[str, str] = {}


def set_impl(impl: str | None) -> None:
    """Select the GHC implementation for this process (``None`` returns control to ``VWN_IMPL``)."""
    global _impl_override
    if impl is not None and impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    _impl_override = impl


def current_impl() -> str:
    """The requested implementation: the :func:`set_impl` override, else ``VWN_IMPL``, else ``auto``."""
    impl = _impl_override if _impl_override is not None else os.environ.get("VWN_IMPL", "auto")
    if impl not in IMPLS:
        raise ValueError(f"VWN_IMPL must be one of {IMPLS}, got {impl!r}")
    return impl


def implementations_used(reasons: bool = False) -> dict[str, str] | dict[str, tuple[str, str]]:
    """``{op name: implementation}`` for every GHC op that has run in this process (its latest call);
    ``reasons=True``: ``{op name: (implementation, why)}``."""
    if reasons:
        return {op: (impl, _reasons.get(op, "")) for op, impl in _used.items()}
    return dict(_used)


def reset_implementations_used() -> None:
    _used.clear()
    _reasons.clear()


def _triton_obstacle(tensor: torch.Tensor, slots: tuple[int, int], others: Sequence[torch.Tensor] = ()) -> str | None:
    from vwn_transform.kernels.triton_common import MAX_M, MAX_N, why_not_runnable

    n, m = slots
    if not (m <= MAX_M and n <= MAX_N):
        return f"(m, n) = ({m}, {n}) is outside the kernels' range m <= {MAX_M}, n <= {MAX_N}"
    for t in (tensor, *others):
        obstacle = why_not_runnable(t)
        if obstacle is not None:
            return obstacle
    return None


def _resolve(op_name: str, tensor: torch.Tensor, slots: tuple[int, int], *others: torch.Tensor):
    """The kernels module to run ``op_name`` with: ``kernels.reference`` or ``kernels.triton_ops``. ``tensor`` is
    the state ``[..., n*d]`` (it picks the device, dtype and size); ``others`` are activations that must also suit
    the kernels (their dtype may differ from the state's, e.g. ``z`` from an autocast sublayer)."""
    requested = current_impl()
    if requested == "triton":
        obstacle = _triton_obstacle(tensor, slots, others)
        if obstacle is not None:
            raise RuntimeError(f"VWN_IMPL=triton was requested for vwn::{op_name}, but {obstacle}; use "
                               "VWN_IMPL=reference or VWN_IMPL=auto")
        chosen, reason = "triton", "requested"
    elif requested == "auto" and tensor.device.type == "cuda":
        obstacle = _triton_obstacle(tensor, slots, others)
        if obstacle is not None:
            chosen, reason = "reference", obstacle
        else:
            from vwn_transform.kernels.measured import auto_choice

            n, m = slots
            width = tensor.shape[-1] if tensor.dim() else 0
            tokens = tensor.numel() // width if width else 0
            chosen, reason = auto_choice(op_name, m, n, tensor.dtype, width // n, tokens)
    else:
        chosen = "reference"
        reason = "requested" if requested == "reference" else f"{tensor.device.type} tensors"
    if _used.get(op_name) != chosen or _reasons.get(op_name) != reason:
        log.info("vwn::%s runs the %s implementation (VWN_IMPL=%s, device %s): %s", op_name, chosen, requested,
                 tensor.device.type, reason)
        _used[op_name] = chosen
        _reasons[op_name] = reason
    if chosen == "triton":
        from vwn_transform.kernels import triton_ops

        return triton_ops
    return reference


def _tokens(h: torch.Tensor, slots: int) -> torch.Tensor:
    # [..., slots*d] -> [N, slots, d]
    if h.shape[-1] % slots:
        raise ValueError(f"last dimension {h.shape[-1]} is not a multiple of the {slots} slots")
    return h.reshape(-1, slots, h.shape[-1] // slots)


def _check_widths(op: str, h: torch.Tensor, n: int, m: int, d: int | None = None,
                  z: torch.Tensor | None = None) -> None:
    """The state ``h`` must be ``[..., n*d]`` (``d`` the slot width: given by a parameter, else ``h``'s width / n) and
    a sublayer output ``z`` ``[..., m*d]``; otherwise a ValueError naming the op, the shapes and the valid width."""
    width = h.shape[-1] if h.dim() else None
    if d is None and width is not None and width % n == 0:
        d = width // n
    if d is None or width != n * d:
        wanted = f"n*d = {n}*{d} = {n * d}" if d is not None else f"a multiple of the n={n} slots"
        raise ValueError(f"vwn::{op}: the over-width state must have last dimension {wanted}, got shape "
                         f"{tuple(h.shape)}; a widened block takes the widened stream (width r*D), not the original")
    if z is not None and (not z.dim() or z.shape[-1] != m * d):
        raise ValueError(f"vwn::{op}: the sublayer output must have last dimension m*d = {m}*{d} = {m * d} (the "
                         f"model width), got shape {tuple(z.shape)}")


def _coef(c: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    # static [rows, cols] stays; dynamic [..., rows, cols] -> [N, rows, cols]
    return c if c.dim() == 2 else c.reshape(-1, rows, cols)


# ----------------------------------------------------------------------------------------------------------
# dynamic read: coefficients + X = Read^T H
# ----------------------------------------------------------------------------------------------------------
@torch.library.custom_op("vwn::ghc_read_dynamic", mutates_args=())
def ghc_read_dynamic(
    h: torch.Tensor, norm_weight: torch.Tensor, proj: torch.Tensor, gates: torch.Tensor, scales: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x [..., m*d], carry_c [..., n, n], write_c [..., n, m], stats [..., n, 2m+n+1])``.

    ``gates`` and ``scales`` are the GHC's maps and gate scales stacked as ``[read | carry | write^T]`` ``[n, 2m+n]``
    (:func:`stack_gates`, at call time: the module keeps its parameters as they are). ``stats`` (pre-tanh logits
    and per-slot 1/rms, non-differentiable) is saved for the backward.
    """
    n, m = reference.gate_slots(gates)
    _check_widths("ghc_read_dynamic", h, n, m, norm_weight.shape[0])
    impl = _resolve("ghc_read_dynamic", h, (n, m))
    lead = h.shape[:-1]
    x, carry_c, write_c, stats = impl.read_dynamic(_tokens(h, n), norm_weight, proj, gates, scales, eps)
    # [N, m, d] -> [..., m*d]; coefficients [N, ., .] -> [..., ., .]
    return (x.reshape(*lead, -1), carry_c.reshape(*lead, n, n), write_c.reshape(*lead, n, m),
            stats.reshape(*lead, n, -1))


@ghc_read_dynamic.register_fake
def _(h, norm_weight, proj, gates, scales, eps):
    n, m = reference.gate_slots(gates)
    _check_widths("ghc_read_dynamic", h, n, m, norm_weight.shape[0])
    lead = h.shape[:-1]
    x = h.new_empty((*lead, h.shape[-1] // n * m))
    ct = reference.compute_dtype(h.dtype)
    return (x, h.new_empty((*lead, n, n), dtype=ct), h.new_empty((*lead, n, m), dtype=ct),
            h.new_empty((*lead, n, 2 * m + n + 1), dtype=ct))


@torch.library.custom_op("vwn::ghc_read_dynamic_backward", mutates_args=())
def ghc_read_dynamic_backward(
    h: torch.Tensor, norm_weight: torch.Tensor, proj: torch.Tensor, gates: torch.Tensor, scales: torch.Tensor,
    eps: float, stats: torch.Tensor, grad_x: torch.Tensor, grad_carry_c: torch.Tensor, grad_write_c: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    n, m = reference.gate_slots(gates)
    impl = _resolve("ghc_read_dynamic_backward", h, (n, m))
    grads = impl.read_dynamic_backward(
        _tokens(h, n), norm_weight, proj, gates, scales, eps, stats.reshape(-1, n, stats.shape[-1]),
        _tokens(grad_x, m), grad_carry_c.reshape(-1, n, n), grad_write_c.reshape(-1, n, m),
    )
    return (grads[0].reshape(h.shape), *grads[1:])


@ghc_read_dynamic_backward.register_fake
def _(h, norm_weight, proj, gates, scales, eps, stats, gx, gc, gw):
    return (torch.empty_like(h),) + tuple(torch.empty_like(p) for p in (norm_weight, proj, gates, scales))


def _read_dynamic_setup(ctx, inputs, output):
    ctx.mark_non_differentiable(output[3])
    ctx.save_for_backward(*inputs[:5], output[3])
    ctx.eps = inputs[5]


def _read_dynamic_bwd(ctx, grad_x, grad_carry_c, grad_write_c, _grad_stats):
    *saved, stats = ctx.saved_tensors
    h, gates = saved[0], saved[3]
    n, m = reference.gate_slots(gates)
    lead = h.shape[:-1]
    # autograd hands None for outputs that did not reach the loss
    if grad_x is None:
        grad_x = h.new_zeros((*lead, h.shape[-1] // n * m))
    if grad_carry_c is None:
        grad_carry_c = torch.zeros_like(stats[..., :n])
    if grad_write_c is None:
        grad_write_c = torch.zeros_like(stats[..., :m])
    grads = torch.ops.vwn.ghc_read_dynamic_backward(*saved, ctx.eps, stats, grad_x, grad_carry_c, grad_write_c)
    return (*grads, None)


torch.library.register_autograd("vwn::ghc_read_dynamic", _read_dynamic_bwd, setup_context=_read_dynamic_setup)


# ----------------------------------------------------------------------------------------------------------
# static read: X = A_read^T H
# ----------------------------------------------------------------------------------------------------------
@torch.library.custom_op("vwn::ghc_read_static", mutates_args=())
def ghc_read_static(h: torch.Tensor, read: torch.Tensor) -> torch.Tensor:
    n, m = read.shape
    _check_widths("ghc_read_static", h, n, m)
    impl = _resolve("ghc_read_static", h, (n, m))
    return impl.read_static(_tokens(h, n), read).reshape(*h.shape[:-1], -1)


@ghc_read_static.register_fake
def _(h, read):
    n, m = read.shape
    _check_widths("ghc_read_static", h, n, m)
    return h.new_empty((*h.shape[:-1], h.shape[-1] // n * m))


@torch.library.custom_op("vwn::ghc_read_static_backward", mutates_args=())
def ghc_read_static_backward(
    h: torch.Tensor, read: torch.Tensor, grad_x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    n, m = read.shape
    impl = _resolve("ghc_read_static_backward", h, (n, m))
    g_h, g_read = impl.read_static_backward(_tokens(h, n), read, _tokens(grad_x, m))
    return g_h.reshape(h.shape), g_read


@ghc_read_static_backward.register_fake
def _(h, read, grad_x):
    return torch.empty_like(h), torch.empty_like(read)


def _read_static_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _read_static_bwd(ctx, grad_x):
    h, read = ctx.saved_tensors
    return tuple(torch.ops.vwn.ghc_read_static_backward(h, read, grad_x))


torch.library.register_autograd("vwn::ghc_read_static", _read_static_bwd, setup_context=_read_static_setup)


# ----------------------------------------------------------------------------------------------------------
# write + carry: H' = WriteT @ Z + Carry^T @ H (static coefficients are 2-D and broadcast over tokens)
# ----------------------------------------------------------------------------------------------------------
@torch.library.custom_op("vwn::ghc_write", mutates_args=())
def ghc_write(h: torch.Tensor, z: torch.Tensor, carry_c: torch.Tensor, write_c: torch.Tensor) -> torch.Tensor:
    n, m = write_c.shape[-2:]
    _check_widths("ghc_write", h, n, m, z=z)
    impl = _resolve("ghc_write", h, (n, m), z)
    out = impl.write(_tokens(h, n), _tokens(z, m), _coef(carry_c, n, n), _coef(write_c, n, m))
    return out.reshape(h.shape)


@ghc_write.register_fake
def _(h, z, carry_c, write_c):
    _check_widths("ghc_write", h, *write_c.shape[-2:], z=z)
    return torch.empty_like(h, dtype=reference.state_dtype(h, z))


@torch.library.custom_op("vwn::ghc_write_backward", mutates_args=())
def ghc_write_backward(
    h: torch.Tensor, z: torch.Tensor, carry_c: torch.Tensor, write_c: torch.Tensor, grad_out: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    n, m = write_c.shape[-2:]
    impl = _resolve("ghc_write_backward", h, (n, m), z, grad_out)
    g_h, g_z, g_c, g_w = impl.write_backward(
        _tokens(h, n), _tokens(z, m), _coef(carry_c, n, n), _coef(write_c, n, m), _tokens(grad_out, n)
    )
    return g_h.reshape(h.shape), g_z.reshape(z.shape), g_c.reshape(carry_c.shape), g_w.reshape(write_c.shape)


@ghc_write_backward.register_fake
def _(h, z, carry_c, write_c, grad_out):
    return torch.empty_like(h), torch.empty_like(z), torch.empty_like(carry_c), torch.empty_like(write_c)


def _write_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _write_bwd(ctx, grad_out):
    return tuple(torch.ops.vwn.ghc_write_backward(*ctx.saved_tensors, grad_out))


torch.library.register_autograd("vwn::ghc_write", _write_bwd, setup_context=_write_setup)


# ----------------------------------------------------------------------------------------------------------
# cross-layer fusion: the write of sublayer l and the dynamic read of sublayer l+1 on its result
# ----------------------------------------------------------------------------------------------------------
@torch.library.custom_op("vwn::ghc_write_read_dynamic", mutates_args=())
def ghc_write_read_dynamic(
    h: torch.Tensor, z: torch.Tensor, carry_c: torch.Tensor, write_c: torch.Tensor, norm_weight: torch.Tensor,
    proj: torch.Tensor, gates: torch.Tensor, scales: torch.Tensor, eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``ghc_write`` followed by the next GHC's ``ghc_read_dynamic``: ``(h_new, x, carry_c, write_c, stats)``."""
    n, m = reference.gate_slots(gates)
    _check_widths("ghc_write_read_dynamic", h, n, m, norm_weight.shape[0], z)
    impl = _resolve("ghc_write_read_dynamic", h, (n, m), z)
    lead = h.shape[:-1]
    h_new, x, cc2, wc2, stats = impl.write_read_dynamic(
        _tokens(h, n), _tokens(z, m), _coef(carry_c, n, n), _coef(write_c, n, m), norm_weight, proj, gates, scales,
        eps)
    # token-major [N, ., .] -> the caller's leading dims
    return (h_new.reshape(h.shape), x.reshape(*lead, -1), cc2.reshape(*lead, n, n), wc2.reshape(*lead, n, m),
            stats.reshape(*lead, n, -1))


@ghc_write_read_dynamic.register_fake
def _(h, z, carry_c, write_c, norm_weight, proj, gates, scales, eps):
    n, m = reference.gate_slots(gates)
    _check_widths("ghc_write_read_dynamic", h, n, m, norm_weight.shape[0], z)
    lead = h.shape[:-1]
    st = reference.state_dtype(h, z)  # h_new and x: h and z promoted
    ct = reference.compute_dtype(st)
    return (torch.empty_like(h, dtype=st), h.new_empty((*lead, h.shape[-1] // n * m), dtype=st),
            h.new_empty((*lead, n, n), dtype=ct), h.new_empty((*lead, n, m), dtype=ct),
            h.new_empty((*lead, n, 2 * m + n + 1), dtype=ct))


@torch.library.custom_op("vwn::ghc_write_read_dynamic_backward", mutates_args=())
def ghc_write_read_dynamic_backward(
    h: torch.Tensor, z: torch.Tensor, carry_c: torch.Tensor, write_c: torch.Tensor, norm_weight: torch.Tensor,
    proj: torch.Tensor, gates: torch.Tensor, scales: torch.Tensor, eps: float, h_new: torch.Tensor,
    stats: torch.Tensor, grad_h_new: torch.Tensor, grad_x: torch.Tensor, grad_carry2: torch.Tensor,
    grad_write2: torch.Tensor,
) -> list[torch.Tensor]:
    n, m = reference.gate_slots(gates)
    impl = _resolve("ghc_write_read_dynamic_backward", h, (n, m), z, h_new, grad_h_new, grad_x)
    grads = impl.write_read_dynamic_backward(
        _tokens(h, n), _tokens(z, m), _coef(carry_c, n, n), _coef(write_c, n, m), norm_weight, proj, gates, scales,
        eps, _tokens(h_new, n), stats.reshape(-1, n, stats.shape[-1]), _tokens(grad_h_new, n), _tokens(grad_x, m),
        grad_carry2.reshape(-1, n, n), grad_write2.reshape(-1, n, m))
    shapes = (h, z, carry_c, write_c)
    return [g.reshape(t.shape) for g, t in zip(grads[:4], shapes)] + \
        [g.clone(memory_format=torch.contiguous_format) for g in grads[4:]]


@ghc_write_read_dynamic_backward.register_fake
def _(h, z, carry_c, write_c, norm_weight, proj, gates, scales, eps, h_new, stats, gh, gx, gc, gw):
    return [torch.empty_like(t) for t in (h, z, carry_c, write_c, norm_weight, proj, gates, scales)]


def _write_read_setup(ctx, inputs, output):
    ctx.mark_non_differentiable(output[4])
    ctx.save_for_backward(*inputs[:8], output[0], output[4])
    ctx.eps = inputs[8]


def _write_read_bwd(ctx, grad_h_new, grad_x, grad_carry2, grad_write2, _grad_stats):
    *saved, h_new, stats = ctx.saved_tensors
    h, z, gates = saved[0], saved[1], saved[6]
    n, m = reference.gate_slots(gates)
    lead = h.shape[:-1]
    # autograd hands None for outputs that did not reach the loss
    grad_h_new = torch.zeros_like(h_new) if grad_h_new is None else grad_h_new
    grad_x = h_new.new_zeros(z.shape) if grad_x is None else grad_x  # x has the shape of z, the dtype of h_new
    grad_carry2 = stats.new_zeros((*lead, n, n)) if grad_carry2 is None else grad_carry2
    grad_write2 = stats.new_zeros((*lead, n, m)) if grad_write2 is None else grad_write2
    grads = torch.ops.vwn.ghc_write_read_dynamic_backward(*saved, ctx.eps, h_new, stats, grad_h_new, grad_x,
                                                          grad_carry2, grad_write2)
    return (*grads, None)


torch.library.register_autograd("vwn::ghc_write_read_dynamic", _write_read_bwd, setup_context=_write_read_setup)


def op_names() -> Sequence[str]:
    """Qualified names of the forward ops (what passes insert and backends match)."""
    return ("vwn::ghc_read_dynamic", "vwn::ghc_read_static", "vwn::ghc_write", "vwn::ghc_write_read_dynamic")


def backward_op_names() -> Sequence[str]:
    """Qualified names of the backward ops (what the registered autograd formulas call)."""
    return tuple(f"{name}_backward" for name in op_names())


# ----------------------------------------------------------------------------------------------------------
# autocast (torch.autocast / torch.amp, HF Trainer bf16=True/fp16=True)
# ----------------------------------------------------------------------------------------------------------
# Without a registration, autocast falls through to the op's CPU/CUDA kernel with autocast still on, so the
# torch ops inside the kernels were autocast one by one (bf16 matmuls in the fp32 mixing, and a crash in the
# reference write's in-place baddbmm_). Every vwn op, forward and backward, therefore has its own kernel for the
# AutocastCPU and AutocastCUDA dispatch keys (registered with Library.impl, as torch.library.register_autocast
# registers its kernel). The policy is "promote", as aten's add/cat have it, and it needs no cast at the op
# boundary:
#
# * No input is cast. The state h keeps its dtype, so the residual stream has the dtype the un-widened model's
#   has under autocast: fp32 for an fp32 model (the embedding output is fp32 and `s + bf16_sublayer_out`
#   promotes to fp32), bf16 for a model that was .to(bf16). The new state H' of ghc_write/ghc_write_read_dynamic
#   is h and z promoted (reference.state_dtype) as `s + z` is, and the read's x takes the dtype of the state it
#   reads, as the sublayer input `s` does. The kernels read h and z each in its own dtype, so promotion costs
#   no extra pass over z (an fp32 copy of a bf16 z would).
# * The kernel runs with autocast disabled: the GHC math is fp32 mixing by design (vwn-math.md; coefficients and
#   stats are fp32), and the small torch ops inside the kernels must not be downcast one by one.
# * Parameters are not cast either: the kernels read them in the mixing precision whatever their dtype.
# * Not torch.library.register_autocast(op, device, cast_inputs): it casts every floating input to one dtype.
#   cast_inputs=bf16 would round the fp32 residual stream and the mixing; cast_inputs=fp32 would turn a bf16
#   model's state into fp32 (twice the bytes, a residual dtype the un-widened model never has), and its casts
#   would hand the op new tensors, which GHC(recompute=True)'s saved-tensor hooks (keyed by tensor identity)
#   cannot tell apart from the coefficients they drop.
# Consequence: an op gives the same result, bit for bit, inside and outside an autocast region for the same
# inputs; autocast only changes the dtypes of what the sublayers hand it. eps (a float) and the tuple outputs
# pass through untouched.
AUTOCAST_DISPATCH_KEYS = {"cpu": "AutocastCPU", "cuda": "AutocastCUDA"}  # device type -> dispatch key
AUTOCAST_DEVICE_TYPES = tuple(AUTOCAST_DISPATCH_KEYS)
_AUTOCAST_LIB = torch.library.Library("vwn", "FRAGMENT")  # module global: the registrations live as long as it


def _register_autocast(qualname: str, device_type: str) -> None:
    namespace, name = qualname.split("::")
    op = getattr(getattr(torch.ops, namespace), name).default
    key = AUTOCAST_DISPATCH_KEYS[device_type]
    excluded = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))

    def run_without_autocast(*args):
        # what torch.library.register_autocast's kernel does, minus the casts: redispatch with this device's
        # autocast key excluded, so the kernel and every torch op inside it run as outside autocast
        with torch._C._ExcludeDispatchKeyGuard(excluded):
            return op(*args)

    _AUTOCAST_LIB.impl(name, run_without_autocast, key)


for _qualname in (*op_names(), *backward_op_names()):
    for _device_type in AUTOCAST_DEVICE_TYPES:
        _register_autocast(_qualname, _device_type)
