"""ONNX export of (widened) models through ``torch.onnx.export(..., dynamo=True)``.

The ``torch.ops.vwn.*`` GHC ops are translated into standard ONNX ops by :data:`translation_table` (written in
onnxscript), so the file runs on any onnxruntime without custom kernels. Importing this module needs the
``onnx`` extra (``pip install 'vwn_transform[onnx]'``); :func:`vwn_transform.export_onnx` imports it lazily.

The translations mirror ``kernels/reference.py``: the state is viewed as ``[..., n, d]``, mixing runs in float32
(a half-precision state is cast to float32 on the way in), outputs are cast back to the state's dtype (the new
state to ``h`` and ``z`` promoted).

Half precision (``dtype=``), decoders with a KV cache (``kv_cache=True``) and greedy decoding of those in
onnxruntime (:func:`generate`) are described in :func:`export_onnx`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import logging
import math
import os
import time
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from vwn_transform.persist import writable_temp_file

try:
    import onnx as _onnx
    from onnxscript import opset20 as op
except ImportError as exc:  # pragma: no cover - exercised through export_onnx's own check
    raise ImportError(
        f"vwn_transform.onnx needs the ONNX extra ({exc.name} is missing): pip install 'vwn_transform[onnx]' "
        "(onnx, onnxruntime, onnxscript)"
    ) from exc

__all__ = ["ExportReport", "HALF_TOLERANCE_FACTOR", "ONNXVerificationError", "export_onnx", "generate",
           "translation_table"]

log = logging.getLogger("vwn_transform")

_FLOAT = 1  # onnx.TensorProto.FLOAT: the mixing precision


# ------------------------------------------------------------------------------------------------------------
# translations of the GHC ops (standard ONNX, opset 20)
# ------------------------------------------------------------------------------------------------------------
def _slots_view(t, slots):
    # [..., slots*d] -> [N, slots, d]
    d = op.Div(op.Shape(t, start=-1), slots)
    return op.Reshape(t, op.Concat(op.Constant(value_ints=[-1]), slots, d, axis=0))


def _lead_shape(h, *tail):
    # the leading dims of h followed by ``tail`` (1-D int64 tensors)
    return op.Concat(op.Shape(h, end=-1), *tail, axis=0)


# The translations below are the lean form (benchmarks/NOTES.md, "Lean GHC translations"): the state is viewed as
# ``[..., slots, d]`` with a constant-shape Reshape (leading dims kept, no Shape/Concat), the RMS norm is folded
# into the small ``[d, 2m+n]`` projection (``rmsnorm(H) g @ W / sqrt(d) == (H @ (g W)) / sqrt(|H|^2 + eps d)``,
# as kernels/reference.py does), so the state is read by one sum of squares and two MatMuls and never scaled;
# weight-only subexpressions (g W, the stacked static maps) are constant-folded by onnxruntime. They need the
# state's rank and the parameters' sizes to be static, which the dynamo exporter provides; otherwise the
# generic translations (``_*_generic``) run.
def _static_ints(t) -> list[int] | None:
    shape = getattr(t, "shape", None)
    if shape is None:
        return None
    try:
        return [d if isinstance(d, int) else None for d in shape]
    except TypeError:
        return None


def _f32(t):
    # a float32 value as it is (no Cast node), anything else cast to float32, the mixing precision
    return t if int(getattr(t, "dtype", None) or 0) == _FLOAT else op.Cast(t, to=_FLOAT)


def _view(t, rank: int, tail: list[int]):
    # [..., slots*d] -> [..., slots, d]: leading dims copied (0), constant shape
    return op.Reshape(t, op.Constant(value_ints=[0] * (rank - 1) + tail))


def _merge_last(t, rank: int):
    # [..., slots, d] -> [..., slots*d]
    return op.Reshape(t, op.Constant(value_ints=[0] * (rank - 1) + [-1]))


def _lean_dims(h, *params):
    """``(rank of h, sizes of each param)`` or None when the lean form cannot be used: the rank of ``h`` and the
    last two sizes of every param (coefficients may have dynamic leading dims) must be static."""
    hs = _static_ints(h)
    sizes = [_static_ints(p) for p in params]
    if hs is None or len(hs) < 1 or any(s is None or None in s[-2:] for s in sizes):
        return None
    return len(hs), sizes


def ghc_read_static(h, read):
    """``X = A_read^T H``: ``[..., n*d] -> [..., m*d]``."""
    dims = _lean_dims(h, read)
    if dims is None:
        return _read_static_generic(h, read)
    rank, [[n, m]] = dims
    h4 = _view(_f32(h), rank, [n, -1])  # [..., n, d]
    x = op.MatMul(op.Transpose(_f32(read), perm=[1, 0]), h4)  # [m, n] @ [..., n, d] -> [..., m, d]
    return op.CastLike(_merge_last(x, rank), h)


def ghc_read_dynamic(h, norm_weight, proj, gates, scales, eps: float):
    """Dynamic coefficients and ``X = Read^T H``; returns ``(x, carry_c, write_c, stats)`` like the op. ``gates`` and
    ``scales`` are the stacked ``[read | carry | write^T]`` ``[n, 2m+n]``."""
    dims = _lean_dims(h, norm_weight, gates)
    if dims is None:
        return _read_dynamic_generic(h, norm_weight, proj, gates, scales, eps)
    rank, [[d], [n, k]] = dims
    return _read_dynamic_lean(h, rank, d, n, (k - n) // 2, norm_weight, proj, gates, scales, eps)


def _read_dynamic_lean(h, rank, d, n, m, norm_weight, proj, gates, scales, eps):
    h4 = _view(_f32(h), rank, [n, d])  # [..., n, d]
    wg = op.Mul(op.Unsqueeze(_f32(norm_weight), op.Constant(value_ints=[1])), _f32(proj))  # [d, 2m+n] (folded)
    u = op.MatMul(h4, wg)  # [..., n, 2m+n]
    # |h|^2 as ReduceSum(h*h): onnxruntime's CPU ReduceSumSquare over the last axis is ~1.5x slower than the two
    # nodes together (benchmarks/NOTES.md, "Sum of squares")
    sq_eps = op.Add(op.ReduceSum(op.Mul(h4, h4), op.Constant(value_ints=[-1]), keepdims=1),
                    op.Constant(value_float=eps * d))  # [..., n, 1]: |h|^2 + eps d
    logits = op.Div(u, op.Sqrt(sq_eps))  # = (H @ g W) * inv_rms / sqrt(d)
    coef = op.Add(_f32(gates), op.Mul(_f32(scales), op.Tanh(logits)))  # [..., n, 2m+n] = [Read | Carry | WriteT]
    last = op.Constant(value_ints=[-1])
    read_c, carry_c, write_c = (op.Slice(coef, op.Constant(value_ints=[a]), op.Constant(value_ints=[b]), last)
                                for a, b in ((0, m), (m, m + n), (m + n, 2 * m + n)))
    x = op.MatMul(op.Transpose(read_c, perm=list(range(rank - 1)) + [rank, rank - 1]), h4)  # [..., m, d]
    inv_rms = op.Mul(op.Reciprocal(op.Sqrt(sq_eps)), op.Constant(value_float=math.sqrt(d)))  # 1/rms
    stats = op.Concat(logits, inv_rms, axis=-1)  # only the backward needs it: pruned from inference graphs
    return op.CastLike(_merge_last(x, rank), h), carry_c, write_c, stats


def ghc_write(h, z, carry_c, write_c):
    """``H' = WriteT Z + Carry^T H``; static (2-D) coefficients broadcast over tokens."""
    dims = _lean_dims(h, write_c, carry_c)
    if dims is None:
        return _write_generic(h, z, carry_c, write_c)
    rank, [wshape, cshape] = dims
    return _write_lean(h, z, carry_c, write_c, rank, wshape[-2], wshape[-1], len(cshape))


def _write_lean(h, z, carry_c, write_c, rank, n, m, coef_rank):
    h4 = _view(_f32(h), rank, [n, -1])  # [..., n, d]
    z4 = _view(_f32(z), rank, [m, -1])  # [..., m, d]
    cc_t = op.Transpose(_f32(carry_c), perm=list(range(coef_rank - 2)) + [coef_rank - 1, coef_rank - 2])
    out = op.Add(op.MatMul(_f32(write_c), z4), op.MatMul(cc_t, h4))  # [..., n, d]
    return _cast_promoted(_merge_last(out, rank), h, z)


def ghc_write_read_dynamic(h, z, carry_c, write_c, norm_weight, proj, gates, scales, eps: float):
    """The cross-layer fused op: ``ghc_write`` then the next GHC's ``ghc_read_dynamic`` on its result."""
    dims = _lean_dims(h, write_c, carry_c, norm_weight, gates)
    if dims is None:
        return _write_read_dynamic_generic(h, z, carry_c, write_c, norm_weight, proj, gates, scales, eps)
    rank, [wshape, cshape, [d], [n, k]] = dims
    h_new = _write_lean(h, z, carry_c, write_c, rank, wshape[-2], wshape[-1], len(cshape))
    x, carry_out, write_out, stats = _read_dynamic_lean(h_new, rank, d, n, (k - n) // 2, norm_weight, proj, gates,
                                                        scales, eps)
    return h_new, x, carry_out, write_out, stats


# generic translations: any rank, sizes from Shape ops (the fallback of the lean ones)
def _read_static_generic(h, read):
    """``X = A_read^T H``: ``[..., n*d] -> [..., m*d]``."""
    n = op.Shape(read, start=0, end=1)
    h3 = _slots_view(op.Cast(h, to=_FLOAT), n)  # [N, n, d]
    x = op.MatMul(op.Transpose(op.Cast(read, to=_FLOAT), perm=[1, 0]), h3)  # [m, n] @ [N, n, d] -> [N, m, d]
    return op.CastLike(op.Reshape(x, _lead_shape(h, op.Constant(value_ints=[-1]))), h)


def _read_dynamic_generic(h, norm_weight, proj, gates, scales, eps: float):
    """Dynamic coefficients and ``X = Read^T H``; returns ``(x, carry_c, write_c, stats)`` like the op."""
    n = op.Shape(gates, start=0, end=1)
    m = op.Div(op.Sub(op.Shape(gates, start=1, end=2), n), op.Constant(value_ints=[2]))  # K = 2m + n
    h3 = _slots_view(op.Cast(h, to=_FLOAT), n)  # [N, n, d]
    d = op.Cast(op.Shape(h3, start=2), to=_FLOAT)
    inv_rms = op.Reciprocal(op.Sqrt(op.Add(op.ReduceMean(op.Mul(h3, h3), [-1], keepdims=1),
                                           op.Constant(value_float=eps))))  # [N, n, 1]
    y = op.Mul(op.Mul(h3, inv_rms), op.Cast(norm_weight, to=_FLOAT))  # RMS-normed slots times the gain
    logits = op.Div(op.MatMul(y, op.Cast(proj, to=_FLOAT)), op.Sqrt(d))  # [N, n, 2m+n]
    coef = op.Add(op.Cast(gates, to=_FLOAT), op.Mul(op.Cast(scales, to=_FLOAT), op.Tanh(logits)))  # [N, n, 2m+n]
    last = op.Constant(value_ints=[-1])
    mn = op.Add(m, n)
    read_c = op.Slice(coef, op.Constant(value_ints=[0]), m, last)  # [N, n, m]
    carry_c = op.Slice(coef, m, mn, last)  # [N, n, n]
    write_c = op.Slice(coef, mn, op.Add(mn, m), last)  # [N, n, m]
    x = op.MatMul(op.Transpose(read_c, perm=[0, 2, 1]), h3)  # [N, m, d]
    x_out = op.CastLike(op.Reshape(x, _lead_shape(h, last)), h)
    stats = op.Concat(logits, inv_rms, axis=-1)
    return (x_out, op.Reshape(carry_c, _lead_shape(h, n, n)), op.Reshape(write_c, _lead_shape(h, n, m)),
            op.Reshape(stats, _lead_shape(h, n, last)))


def _write_generic(h, z, carry_c, write_c):
    """``H' = WriteT Z + Carry^T H``; static (2-D) coefficients broadcast over tokens."""
    n = op.Shape(write_c, start=-2, end=-1)
    m = op.Shape(write_c, start=-1)
    minus1 = op.Constant(value_ints=[-1])
    h3 = _slots_view(op.Cast(h, to=_FLOAT), n)  # [N, n, d]
    z3 = _slots_view(op.Cast(z, to=_FLOAT), m)  # [N, m, d]
    cc = op.Reshape(op.Cast(carry_c, to=_FLOAT), op.Concat(minus1, n, n, axis=0))  # [N or 1, n, n]
    wc = op.Reshape(op.Cast(write_c, to=_FLOAT), op.Concat(minus1, n, m, axis=0))  # [N or 1, n, m]
    out = op.Add(op.MatMul(wc, z3), op.MatMul(op.Transpose(cc, perm=[0, 2, 1]), h3))  # [N, n, d]
    return _cast_promoted(op.Reshape(out, op.Shape(h)), h, z)


def _write_read_dynamic_generic(h, z, carry_c, write_c, norm_weight, proj, gates, scales, eps: float):
    h_new = _write_generic(h, z, carry_c, write_c)
    x, carry_out, write_out, stats = _read_dynamic_generic(h_new, norm_weight, proj, gates, scales, eps)
    return h_new, x, carry_out, write_out, stats


def _cast_promoted(out, h, z):
    """``out`` (fp32) cast to the dtype of ``h`` and ``z`` promoted, like ``kernels.reference.state_dtype``: an
    fp16 state with an fp32 sublayer output gives an fp32 state. (The exporter's values carry their dtype.)"""
    hd, zd = getattr(h, "dtype", None), getattr(z, "dtype", None)
    if hd is None or zd is None or hd == zd or not hasattr(hd, "itemsize"):
        return op.CastLike(out, h)
    if hd.itemsize != zd.itemsize:
        return op.CastLike(out, h if hd.itemsize > zd.itemsize else z)
    return out  # float16 with bfloat16 promotes to float32, the mixing precision


#: ``torch.ops.vwn.*`` overload -> onnxscript translation, for ``torch.onnx.export(custom_translation_table=...)``.
translation_table = {
    torch.ops.vwn.ghc_read_static.default: ghc_read_static,
    torch.ops.vwn.ghc_read_dynamic.default: ghc_read_dynamic,
    torch.ops.vwn.ghc_write.default: ghc_write,
    torch.ops.vwn.ghc_write_read_dynamic.default: ghc_write_read_dynamic,
}

# the generic translations as a table (benchmarks/onnx_latency.py --compare-generic measures lean vs generic)
_generic_translation_table = {
    torch.ops.vwn.ghc_read_static.default: _read_static_generic,
    torch.ops.vwn.ghc_read_dynamic.default: _read_dynamic_generic,
    torch.ops.vwn.ghc_write.default: _write_generic,
    torch.ops.vwn.ghc_write_read_dynamic.default: _write_read_dynamic_generic,
}


# ------------------------------------------------------------------------------------------------------------
# export
# ------------------------------------------------------------------------------------------------------------
#: A half-precision export is verified against the PyTorch model in the same dtype with the tolerance
#: ``HALF_TOLERANCE_FACTOR x`` (the PyTorch model's own half-vs-float32 error on the same inputs): onnxruntime
#: may round differently from PyTorch, but by no more than a few times what half precision itself costs.
HALF_TOLERANCE_FACTOR = 4.0

_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


class ONNXVerificationError(RuntimeError):
    """onnxruntime's outputs differ from eager PyTorch; ``.report`` holds the measurements."""

    def __init__(self, message: str, report: "ExportReport"):
        super().__init__(message)
        self.report = report


@dataclasses.dataclass
class VerifyCheck:
    """One verification run. ``tolerance`` is what ``max_abs_diff`` was held to; for half-precision exports
    ``reference_error`` is the PyTorch model's own half-vs-float32 max abs difference on the same inputs. For a
    KV-cache export, ``steps`` decode steps were run and ``tokens_match`` says whether onnxruntime's greedy tokens
    equal ``generate(do_sample=False)``'s."""

    shapes: dict[str, tuple[int, ...]]
    max_abs_diff: float
    max_rel_diff: float
    tolerance: float | None = None
    reference_error: float | None = None
    steps: int | None = None
    tokens_match: bool | None = None


@dataclasses.dataclass
class ExportReport:
    """What :func:`export_onnx` wrote and measured; ``str(report)`` is readable."""

    path: str
    opset: int
    file_size_bytes: int
    input_names: list[str]
    output_names: list[str]
    export_shapes: dict[str, tuple[int, ...]]
    dynamic_axes: dict[str, dict[int, str]]
    widened: bool
    notes: list[str]
    providers: list[str]  # execution providers that actually ran the verification
    checks: list[VerifyCheck]
    export_seconds: float
    dtype: str = "float32"
    kv_cache: bool = False
    tolerance_rule: str = ""

    @property
    def max_abs_diff(self) -> float:
        return max((c.max_abs_diff for c in self.checks), default=float("nan"))

    @property
    def max_rel_diff(self) -> float:
        return max((c.max_rel_diff for c in self.checks), default=float("nan"))

    def __str__(self) -> str:
        kind = "decoder with KV cache" if self.kv_cache else "logits"
        lines = [
            f"ONNX export: {self.path} ({self.file_size_bytes / 1e6:.2f} MB, opset {self.opset}, {self.dtype}, "
            f"{kind}, {self.export_seconds:.1f} s)",
            f"  inputs {self.input_names} (exported at {self.export_shapes}), outputs {self.output_names}",
            f"  dynamic axes: {self.dynamic_axes or 'none'}",
            f"  widened by vwn_transform: {'yes' if self.widened else 'no'}",
        ]
        lines += [f"  note: {n}" for n in self.notes]
        if self.checks:
            lines.append(f"  verified with onnxruntime providers {self.providers}; tolerance: {self.tolerance_rule}")
            for c in self.checks:
                line = f"    {c.shapes}: max abs diff {c.max_abs_diff:.2e}, max rel diff {c.max_rel_diff:.2e}"
                if c.tolerance is not None:
                    line += f" (tolerance {c.tolerance:.2e}"
                    if c.reference_error is not None:
                        line += f"; PyTorch {self.dtype} vs float32: {c.reference_error:.2e}"
                    line += ")"
                if c.steps is not None:
                    line += f", {c.steps} greedy steps, tokens {'equal' if c.tokens_match else 'DIFFER'}"
                lines.append(line)
        else:
            lines.append("  not verified (verify=False)")
        return "\n".join(lines)


class _Logits(nn.Module):
    """Wraps a model so the exported graph has tensor inputs and one ``logits`` output."""

    def __init__(self, model: nn.Module, hf: bool):
        super().__init__()
        self.model = model
        self.hf = hf

    def forward(self, *inputs):
        if self.hf:
            input_ids, attention_mask = inputs
            return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        from vwn_transform.passes.probe import primary_output

        return primary_output(self.model(*inputs))


class _CachedDecoder(nn.Module):
    """A Hugging Face causal LM as a decoder with flat cache tensors: ``(input_ids, attention_mask,
    [position_ids,] past.0.key, past.0.value, ...) -> (logits, present.0.key, present.0.value, ...)``.

    The past tensors fill a ``DynamicCache`` of full (non-sliding) layers; sliding-window attention is applied by
    the model's mask, so every present tensor is ``[batch, kv_heads, past + sequence, head_dim]``."""

    def __init__(self, model: nn.Module, layers: int, position_ids: bool):
        super().__init__()
        self.model = model
        self.layers = layers
        self.position_ids = position_ids

    def forward(self, *inputs):
        from transformers import DynamicCache

        input_ids, attention_mask = inputs[:2]
        k = 3 if self.position_ids else 2
        past = inputs[k:]
        cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(self.layers)])
        kwargs = dict(position_ids=inputs[2]) if self.position_ids else {}
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache, use_cache=True,
                         **kwargs)
        present = []
        for layer in out.past_key_values.layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


def _is_hf_causal_lm(model: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return False
    return isinstance(model, PreTrainedModel) and callable(getattr(model, "get_output_embeddings", None)) and \
        model.get_output_embeddings() is not None


def _max_positions(model: nn.Module) -> int | None:
    cfg = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "block_size"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 1:
            return value
    return None


def _check_path(path) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"path {str(p)!r} is a directory; give a file name such as {str(p / 'model.onnx')!r}")
    parent = p.parent if str(p.parent) else Path(".")
    if parent.exists() and not parent.is_dir():
        raise ValueError(f"cannot write {str(p)!r}: {str(parent)!r} is a file, not a folder")
    if not parent.is_dir():
        raise ValueError(f"cannot write {str(p)!r}: the folder {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK):
        raise PermissionError(f"cannot write {str(p)!r}: the folder {str(parent)!r} is not writable")
    if p.exists() and not os.access(p, os.W_OK):
        raise PermissionError(f"cannot write {str(p)!r}: the file exists and is not writable")
    return p


def _check_export_dtype(dtype) -> torch.dtype:
    valid = "torch.float32, torch.float16 or torch.bfloat16 (or the strings 'float32', 'float16', 'bfloat16')"
    if isinstance(dtype, str):
        by_name = {name: dt for dt, name in _DTYPES.items()}
        if dtype not in by_name:
            raise ValueError(f"dtype must be {valid}, got {dtype!r}")
        return by_name[dtype]
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be {valid}, got {type(dtype).__name__} {dtype!r}")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be {valid}, got {dtype}")
    return dtype


def _float_dtypes(model: nn.Module) -> set[torch.dtype]:
    return {t.dtype for t in list(model.parameters()) + list(model.buffers()) if t.is_floating_point()}


def _in_dtype(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``model`` itself when every floating tensor already is ``dtype``, else a converted copy (the user's model
    is never changed)."""
    if _float_dtypes(model) <= {dtype}:
        return model
    return copy.deepcopy(model).to(dtype)


def _import_onnxruntime():
    try:
        import onnxruntime
    except ImportError as exc:
        raise ImportError("verifying an ONNX export needs onnxruntime: pip install 'vwn_transform[onnx]' (or pass "
                          "verify=False)") from exc
    return onnxruntime


def _available_providers() -> list[str]:
    return _import_onnxruntime().get_available_providers()


def _resolve_providers(providers: Sequence[str] | None) -> list[str]:
    available = _available_providers()
    requested = list(providers) if providers is not None else ["CPUExecutionProvider"]
    if isinstance(providers, str) or not requested or not all(isinstance(p, str) for p in requested):
        raise ValueError(f"providers must be a non-empty list of provider names, got {providers!r}")
    missing = [p for p in requested if p not in available]
    if missing:
        hint = (" (CUDAExecutionProvider needs the onnxruntime-gpu build: pip install 'vwn_transform[onnx-gpu]', "
                "which replaces onnxruntime)" if "CUDAExecutionProvider" in missing else "")
        raise ValueError(f"execution provider(s) {missing} are not available in this onnxruntime; available: "
                         f"{available}{hint}")
    return requested


def _session(path_or_bytes, providers: list[str]):
    """An onnxruntime session that runs on the requested providers, or an error: onnxruntime falls back to the
    CPU silently (with a warning) when e.g. the CUDA libraries are missing; that is refused here."""
    import warnings

    ort = _import_onnxruntime()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallback warning: checked below instead
        try:
            session = ort.InferenceSession(str(path_or_bytes), providers=providers)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
            if "NOT_IMPLEMENTED" in str(exc):
                raise RuntimeError(f"onnxruntime providers {providers} cannot run this graph: {exc}") from exc
            raise
    ran = session.get_providers()
    dropped = [p for p in providers if p not in ran]
    if dropped:
        raise RuntimeError(
            f"onnxruntime did not run the requested provider(s) {dropped} (it ran {ran}): it fell back silently, "
            "e.g. because the CUDA/cuDNN libraries onnxruntime-gpu needs are missing; refusing the fallback")
    return session


@contextlib.contextmanager
def _quiet_exporter():
    """Silence the exporter's known, harmless noise (nothing the user can act on): torchvision op registrations
    it skips, a pytree deprecation inside torch, and dynamic-axis renames. Anything else still shows."""
    import warnings

    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
            warnings.filterwarnings("ignore", message=r".*The axis name: .* will not be used", category=UserWarning)
            yield
    finally:
        registration.setLevel(level)


@contextlib.contextmanager
def _export_friendly_experts(model: nn.Module, notes: list[str]):
    """transformers' default MoE path (``grouped_mm``) is a custom op with no ONNX translation; ``batched_mm``
    computes the same with standard ops (every expert on every token). Switched explicitly, noted, restored."""
    getter = getattr(model, "get_experts_implementation", None)
    current = getter() if callable(getter) else {}
    if not any(v == "grouped_mm" for v in current.values()):
        yield
        return
    model.set_experts_implementation({k: ("batched_mm" if v == "grouped_mm" else v) for k, v in current.items()})
    notes.append("MoE experts exported with transformers' 'batched_mm' implementation (standard ops; every "
                 "expert runs on every token) instead of 'grouped_mm'")
    log.info("export_onnx: %s", notes[-1])
    try:
        yield
    finally:
        model.set_experts_implementation(current)


@contextlib.contextmanager
def _eval_restored(*models: nn.Module):
    training = {mod: mod.training for model in models for mod in model.modules()}
    try:
        for model in models:
            model.eval()
        yield
    finally:
        for mod, flag in training.items():
            mod.training = flag


def _variant(example: tuple, names: list[str], dynamic_dims: dict[str, dict[int, str]], bump: int,
             generator: torch.Generator, max_seq: int | None = None) -> tuple:
    """Inputs shaped unlike the export example: every dynamic dim moved (batch -> 1 or +1, sequence -> -3 or
    +9, kept within ``[1, max_seq]`` and away from the export size where the range allows)."""
    sizes: dict[str, int] = {}
    for name, t in zip(names, example):
        for dim, axis in dynamic_dims.get(name, {}).items():
            if axis not in sizes:
                base = t.shape[dim]
                if axis == "batch":
                    sizes[axis] = 1 if bump == 0 else base + 1
                    continue
                want = max(1, base - 3) if bump == 0 else base + 9
                if max_seq is not None and want > max_seq:
                    want = max_seq if max_seq != base else max(1, base - 1)
                sizes[axis] = want
    out = []
    for name, t in zip(names, example):
        shape = list(t.shape)
        for dim, axis in dynamic_dims.get(name, {}).items():
            shape[dim] = sizes[axis]
        if name == "attention_mask":
            out.append(torch.ones(shape, dtype=t.dtype))
        elif t.is_floating_point():
            out.append(torch.randn(shape, generator=generator, dtype=t.dtype))
        else:
            lo, hi = int(t.min()), int(t.max())
            out.append(torch.randint(lo, hi + 1, shape, generator=generator, dtype=t.dtype))
    return tuple(out)


def _cache_layout(model: nn.Module) -> tuple[int, int, int]:
    """``(layers, kv_heads, head_dim)`` of a Hugging Face causal LM's KV cache, read from one eager call; a model
    whose cache is not a plain key/value cache per layer is refused by name."""
    from transformers import DynamicCache

    family = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    ids = torch.full((1, 2), 3, dtype=torch.long, device=device)
    try:
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)
    except TypeError as exc:
        raise ValueError(f"kv_cache=True: the {family} model does not take a KV cache ({exc})") from exc
    cache = getattr(out, "past_key_values", None)
    layers = getattr(cache, "layers", None)
    if not isinstance(cache, DynamicCache) or not layers or not all(
            isinstance(getattr(la, "keys", None), torch.Tensor) and la.keys.dim() == 4 for la in layers):
        raise ValueError(
            f"kv_cache=True supports models whose cache is a key/value tensor pair per layer (a transformers "
            f"DynamicCache); the {family} model returned {type(cache).__name__} (e.g. a recurrent or linear-"
            "attention state), which this export does not flatten. Export it with kv_cache=False")
    shapes = {tuple(la.keys.shape[i] for i in (1, 3)) for la in layers}
    if len(shapes) != 1:
        raise ValueError(f"kv_cache=True: the {family} model's layers have different KV shapes {sorted(shapes)} "
                         "(kv_heads, head_dim); this export needs one shape for every layer")
    kv_heads, head_dim = shapes.pop()
    return len(layers), kv_heads, head_dim


def export_onnx(model: nn.Module, path, *, example_inputs: tuple | None = None, dynamic: bool = True,
                opset: int = 20, verify: bool = True, providers: Sequence[str] | None = None,
                atol: float = 1e-4, dtype: torch.dtype | str = torch.float32, kv_cache: bool = False) -> ExportReport:
    """Export ``model`` to a standard ONNX file and (by default) verify it in onnxruntime.

    Hugging Face causal LMs export with inputs ``input_ids`` and ``attention_mask`` and output ``logits``,
    batch and sequence dynamic. Other modules need ``example_inputs`` (their output's primary tensor, e.g. the
    logits of the reference GPT's ``(logits, loss)``, becomes ``logits``). The file is written to a temporary
    name next to ``path`` and moved into place only when export, checking and verification succeed.

    With ``kv_cache=True`` (Hugging Face causal LMs) the file is a decoder with a KV cache, named as Optimum and
    onnxruntime-genai name it: inputs ``input_ids``, ``attention_mask`` (``[batch, past + sequence]``),
    ``position_ids`` (where the model takes them) and ``past_key_values.N.key`` / ``past_key_values.N.value``,
    outputs ``logits`` and ``present.N.key`` / ``present.N.value``, cache tensors ``[batch, kv_heads, seq,
    head_dim]``; the first step takes empty past tensors (``seq = 0``). :func:`generate` runs it greedily.

    Args:
        model: a module, widened by vwn_transform or not; it is not changed (a model in another dtype than
            ``dtype`` is converted on a copy).
        path: the ``.onnx`` file to write.
        example_inputs: positional example inputs; default for HF causal LMs a ``[2, 8]`` token batch. Not used
            with ``kv_cache=True``.
        dynamic: batch and sequence axes dynamic (first two dims of every input).
        opset: ONNX opset version.
        verify: run the file in onnxruntime and compare with eager PyTorch (raise :class:`ONNXVerificationError`
            beyond the tolerance): at two shapes unlike the export shapes, or, with ``kv_cache=True``, by greedy
            step-by-step decoding that must give ``generate(do_sample=False)``'s tokens, for a left-padded batch
            of 2 and a batch of 1.
        providers: onnxruntime execution providers (default CPU). One that is unavailable, or a session that
            fell back to another provider, is an error.
        atol: the float32 tolerance (max abs difference of the logits).
        dtype: ``torch.float32`` (default), ``torch.float16`` or ``torch.bfloat16``: the precision of the
            exported weights, activations and cache; the GHC mixing stays in float32 inside the graph, as in
            PyTorch. Half precision is verified against the PyTorch model in that dtype with the tolerance
            ``max(atol, HALF_TOLERANCE_FACTOR x the PyTorch model's own half-vs-float32 error)`` on the same
            inputs. onnxruntime's CPU provider has no bfloat16 kernels for common ops: a bfloat16 export is
            verified on ``CUDAExecutionProvider`` or exported with ``verify=False``.
        kv_cache: export the decoder with a KV cache (Hugging Face causal LMs).

    Example:
        >>> import tempfile, os, torch, vwn_transform
        >>> from vwn_transform.models import GPT, GPTConfig
        >>> gpt = GPT(GPTConfig(vocab_size=64, block_size=32, n_layer=1, n_head=2, n_embd=32)).eval()
        >>> wide = vwn_transform.widen(gpt, "3/2")
        >>> out = os.path.join(tempfile.mkdtemp(), "gpt.onnx")
        >>> report = vwn_transform.export_onnx(wide, out, example_inputs=(torch.randint(0, 64, (2, 8)),))
        >>> report.max_abs_diff < 1e-4
        True
    """
    target, dtype, chosen, hf = _check_export_request(model, path, example_inputs, dynamic, opset, verify, providers,
                                                      dtype, kv_cache)
    notes = _export_notes(model, dtype)
    widened = getattr(model, "vwn_config", None) is not None
    half = dtype != torch.float32
    target_model = _in_dtype(model, dtype)
    # the float32 reference of a half-precision export (the user's model itself when it is float32)
    reference32 = _in_dtype(model, torch.float32) if half and verify else None
    device = next((p.device for p in target_model.parameters()), torch.device("cpu"))
    max_pos = _max_positions(model)

    with _eval_restored(*{id(m): m for m in (model, target_model, reference32) if m is not None}.values()), \
            _export_friendly_experts(target_model, notes):
        if kv_cache:
            graph = _cached_decoder_graph(target_model, device, dtype, max_pos)
        else:
            graph = _logits_graph(target_model, hf, example_inputs, device, dtype, dynamic, max_pos)
        tmp = writable_temp_file(target)  # a folder that cannot be written names `path`, not the temp file
        try:
            report = _export_to(tmp, graph, opset)
            report = dataclasses.replace(
                report, path=str(target), widened=widened, notes=notes, dtype=_DTYPES[dtype], kv_cache=kv_cache,
                tolerance_rule=(f"max(atol {atol:g}, {HALF_TOLERANCE_FACTOR:g} x PyTorch's own {_DTYPES[dtype]}-"
                                "vs-float32 error on the same inputs)") if half else f"atol {atol:g}")
            if verify:
                session = _session(tmp, chosen)
                report.providers = session.get_providers()
                with torch.no_grad():
                    if kv_cache:
                        _verify_decoding(session, target_model, reference32, report, atol)
                    else:
                        ref_wrapper = _Logits(reference32, hf).eval() if reference32 is not None else None
                        _verify(graph.wrapper, ref_wrapper, session, report, graph.example_inputs, graph.names,
                                graph.dynamic_dims, max_pos, atol)
            _raise_if_unverified(report, target)
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                tmp.unlink()
    log.info("%s", report)
    return report


def _check_export_request(model, path, example_inputs, dynamic, opset, verify, providers, dtype, kv_cache):
    """Every argument of :func:`export_onnx` checked before anything is built: ``(target path, dtype, the
    onnxruntime providers to verify on, whether the model is a Hugging Face causal LM)``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"export_onnx expects a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(opset, int) or isinstance(opset, bool) or not 18 <= opset <= 23:
        raise ValueError(f"opset must be an int between 18 and 23, got {opset!r}")
    target = _check_path(path)
    dtype = _check_export_dtype(dtype)
    if not isinstance(kv_cache, bool):
        raise TypeError(f"kv_cache must be True or False, got {kv_cache!r}")
    chosen = _resolve_providers(providers) if verify else []
    if verify and dtype == torch.bfloat16 and all(p == "CPUExecutionProvider" for p in chosen):
        raise ValueError(
            "dtype=torch.bfloat16 cannot be verified on onnxruntime's CPUExecutionProvider: it has no bfloat16 "
            "kernels for ops every transformer graph uses (Where, Softmax, ...). Verify it with "
            "providers=['CUDAExecutionProvider'] (onnxruntime-gpu), export with verify=False, or use "
            "dtype=torch.float16")
    hf = _is_hf_causal_lm(model)
    if kv_cache:
        if not hf:
            raise ValueError(f"kv_cache=True needs a Hugging Face causal LM (a transformers PreTrainedModel with an "
                             f"output embedding), got {type(model).__name__}; export it with kv_cache=False")
        if example_inputs is not None:
            raise ValueError("kv_cache=True makes its own example inputs; leave example_inputs=None")
        if not dynamic:
            raise ValueError("kv_cache=True needs dynamic=True (the cache length changes every step)")
    return target, dtype, chosen, hf


def _export_notes(model: nn.Module, dtype: torch.dtype) -> list[str]:
    """What the report should tell about the source model: not widened, converted from another dtype."""
    notes = []
    if getattr(model, "vwn_config", None) is None:
        notes.append("the model was not widened by vwn_transform; it is exported as it is")
    source_dtypes = _float_dtypes(model)
    if not source_dtypes <= {dtype}:
        notes.append(f"exported in {_DTYPES[dtype]} from a converted copy of the "
                     f"{'/'.join(sorted(str(d).replace('torch.', '') for d in source_dtypes))} model")
    return notes


@dataclasses.dataclass
class _ExportGraph:
    """What torch.onnx.export traces: the wrapper module, its example inputs, the ONNX input/output names and the
    dynamic axes (as torch.export dims, and as names per input for the report)."""

    wrapper: nn.Module
    example_inputs: tuple
    names: list[str]
    output_names: list[str]
    dynamic_shapes: tuple | None
    dynamic_dims: dict[str, dict[int, str]]


def _cached_decoder_graph(model: nn.Module, device, dtype, max_pos: int | None) -> _ExportGraph:
    """The KV-cache decoder: ``input_ids``, ``attention_mask`` (``[batch, past + sequence]``), ``position_ids``
    where the model takes them, ``past_key_values.N.key/value``; outputs ``logits`` and ``present.N.key/value``."""
    layers, kv_heads, head_dim = _cache_layout(model)
    takes_positions = "position_ids" in inspect.signature(model.forward).parameters
    wrapper = _CachedDecoder(model, layers, takes_positions).eval()
    vocab = model.get_input_embeddings().num_embeddings
    batch, seq, past = 2, 3, 5  # export sizes away from 0/1, which torch.export would specialize
    ids = (torch.arange(batch * seq, device=device).reshape(batch, seq) * 5 + 3) % vocab  # [batch, seq]
    example_inputs = (ids, torch.ones(batch, past + seq, dtype=torch.long, device=device))
    names = ["input_ids", "attention_mask"]
    if takes_positions:
        example_inputs += (torch.arange(past, past + seq, device=device).expand(batch, seq).contiguous(),)
        names.append("position_ids")
    gen = torch.Generator().manual_seed(0)
    example_inputs += tuple(torch.randn(batch, kv_heads, past, head_dim, generator=gen).to(device, dtype)
                            for _ in range(2 * layers))
    names += [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    output_names = ["logits"] + [f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    b = torch.export.Dim("batch")
    s = torch.export.Dim("sequence", max=max_pos) if max_pos else torch.export.Dim("sequence")
    p = torch.export.Dim("past_sequence", max=max_pos) if max_pos else torch.export.Dim("past_sequence")
    t = torch.export.Dim("total_sequence", max=max_pos) if max_pos else torch.export.Dim("total_sequence")
    spec = [{0: b, 1: s}, {0: b, 1: t}] + ([{0: b, 1: s}] if takes_positions else [])
    spec += [{0: b, 2: p}] * (2 * layers)
    axis_name = {b: "batch", s: "sequence", p: "past_sequence", t: "total_sequence"}
    dynamic_dims = {n: {d: axis_name[dim] for d, dim in sp.items()} for n, sp in zip(names, spec)}
    return _ExportGraph(wrapper, example_inputs, names, output_names, (tuple(spec),), dynamic_dims)


def _logits_graph(model: nn.Module, hf: bool, example_inputs, device, dtype, dynamic: bool,
                  max_pos: int | None) -> _ExportGraph:
    """The plain graph: the model's inputs (HF: ``input_ids``, ``attention_mask``) to ``logits``; with ``dynamic``
    the first axis of every input is ``batch`` and, for inputs of rank 2 or 3, the second is ``sequence``."""
    example_inputs, names = _plain_inputs(model, hf, example_inputs, device, dtype)
    dynamic_dims, dynamic_shapes = {}, None
    if dynamic:
        batch_dim = torch.export.Dim("batch")
        seq_dim = torch.export.Dim("sequence", max=max_pos) if max_pos else torch.export.Dim("sequence")
        spec = []
        for name, x in zip(names, example_inputs):
            # axis 1 is a sequence for token ids [B, T] and features [B, T, F]; images [B, C, H, W] (rank >= 4)
            # keep their sizes, only the batch varies
            dims = {0: batch_dim, 1: seq_dim} if 2 <= x.dim() <= 3 else ({0: batch_dim} if x.dim() >= 1 else {})
            spec.append(dims)
            dynamic_dims[name] = {k: ("batch" if k == 0 else "sequence") for k in dims}
        dynamic_shapes = (tuple(spec),)  # one entry for the wrapper's *inputs
    return _ExportGraph(_Logits(model, hf).eval(), example_inputs, names, ["logits"], dynamic_shapes, dynamic_dims)


def _export_to(tmp: Path, graph: _ExportGraph, opset: int) -> ExportReport:
    """Export ``graph`` to ``tmp``, check it with onnx's full checker and that it uses only standard ONNX ops; the
    report's export fields (the caller fills in the rest)."""
    start = time.perf_counter()
    with _quiet_exporter(), torch.no_grad():
        program = torch.onnx.export(
            graph.wrapper, graph.example_inputs, dynamo=True, custom_translation_table=translation_table,
            dynamic_shapes=graph.dynamic_shapes, opset_version=opset, input_names=graph.names,
            output_names=graph.output_names, verbose=False,
        )
        program.save(str(tmp))
    elapsed = time.perf_counter() - start
    _onnx.checker.check_model(str(tmp), full_check=True)
    proto = _onnx.load(str(tmp), load_external_data=False)
    custom = sorted({n.domain for n in proto.graph.node if n.domain not in ("", "ai.onnx")})
    if custom or proto.functions:
        raise RuntimeError(f"the exported graph uses custom domains {custom} or functions; expected only standard "
                           "ONNX ops")
    return ExportReport(
        path=str(tmp), opset=opset, file_size_bytes=tmp.stat().st_size, input_names=graph.names,
        output_names=graph.output_names,
        export_shapes={n: tuple(x.shape) for n, x in zip(graph.names, graph.example_inputs)},
        dynamic_axes=graph.dynamic_dims, widened=False, notes=[], providers=[], checks=[], export_seconds=elapsed,
        dtype="", kv_cache=False, tolerance_rule="")


def _raise_if_unverified(report: ExportReport, target: Path) -> None:
    """:class:`ONNXVerificationError` naming the first check beyond its tolerance (nothing is written then)."""
    bad = [c for c in report.checks if c.max_abs_diff > c.tolerance or c.tokens_match is False]
    if bad:
        c = bad[0]
        what = (f"greedy tokens differ from generate(do_sample=False) at {c.shapes}" if c.tokens_match is False
                else f"onnxruntime output differs from eager PyTorch by {c.max_abs_diff:.3g} (> tolerance "
                f"{c.tolerance:.3g}) at {c.shapes}")
        raise ONNXVerificationError(f"{what}; nothing was written to {str(target)!r}\n{report}", report)


def _plain_inputs(model: nn.Module, hf: bool, example_inputs, device, dtype) -> tuple[tuple, list[str]]:
    if hf:
        if example_inputs is None:
            vocab = model.get_input_embeddings().num_embeddings
            ids = (torch.arange(16, device=device).reshape(2, 8) * 5 + 3) % vocab  # [2, 8]
            example_inputs = (ids, torch.ones_like(ids))
        elif not isinstance(example_inputs, (tuple, list)) or len(example_inputs) not in (1, 2):
            raise ValueError("example_inputs for a Hugging Face causal LM must be (input_ids,) or "
                             f"(input_ids, attention_mask), got {type(example_inputs).__name__}")
        example_inputs = tuple(example_inputs)
        if len(example_inputs) == 1:
            example_inputs = (example_inputs[0], torch.ones_like(example_inputs[0]))
        return example_inputs, ["input_ids", "attention_mask"]
    if example_inputs is None:
        raise ValueError(
            f"export_onnx needs example_inputs for a {type(model).__name__} (only Hugging Face causal LMs get "
            "default token inputs), e.g. example_inputs=(torch.randint(0, vocab, (2, 8)),)"
        )
    example_inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    if not all(isinstance(t, torch.Tensor) for t in example_inputs):
        raise TypeError("example_inputs must be tensors")
    # floating inputs (e.g. embeddings) in the export dtype
    example_inputs = tuple(t.to(dtype) if t.is_floating_point() else t for t in example_inputs)
    params = [p for p in inspect.signature(model.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    names = [p.name for p in params[:len(example_inputs)]]
    names += [f"input_{i}" for i in range(len(names), len(example_inputs))]
    return example_inputs, names


def _numpy(t: torch.Tensor):
    return t.detach().cpu().numpy()


def _verify(wrapper, ref_wrapper, session, report: ExportReport, example: tuple, names: list[str],
            dynamic_dims: dict[str, dict[int, str]], max_seq: int | None, atol: float) -> None:
    gen = torch.Generator().manual_seed(0)
    variants = [_variant(example, names, dynamic_dims, bump, gen, max_seq) for bump in (0, 1)] if dynamic_dims \
        else [example]
    device = example[0].device
    for inputs in variants:
        inputs = tuple(t.to(device) for t in inputs)
        with torch.no_grad():
            ref = wrapper(*inputs).float().cpu()
        got = torch.from_numpy(session.run(["logits"], {n: _numpy(t) for n, t in zip(names, inputs)})[0]).float()
        if got.shape != ref.shape:
            raise RuntimeError(f"onnxruntime returned logits of shape {tuple(got.shape)}, PyTorch {tuple(ref.shape)}")
        diff = float((got - ref).abs().max())
        scale = float(ref.abs().max()) or 1.0
        check = VerifyCheck({n: tuple(t.shape) for n, t in zip(names, inputs)}, diff, diff / scale, tolerance=atol)
        if ref_wrapper is not None:  # half precision: the tolerance follows PyTorch's own rounding error
            with torch.no_grad():
                ref32 = ref_wrapper(*(t.float() if t.is_floating_point() else t for t in inputs)).float().cpu()
            check.reference_error = float((ref - ref32).abs().max())
            check.tolerance = max(atol, HALF_TOLERANCE_FACTOR * check.reference_error)
        report.checks.append(check)


# ------------------------------------------------------------------------------------------------------------
# KV-cache decoding in onnxruntime
# ------------------------------------------------------------------------------------------------------------
_ORT_FLOAT = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(bfloat16)": "bfloat16"}


def _decode(session, input_ids, attention_mask, max_new_tokens: int, forced=None, eos_token_id=None):
    """Greedy decoding of a KV-cache export: ``(sequences [B, P + new], [logits of each step [B, vocab]])``.
    ``forced`` ([B, new]) feeds those tokens instead of the argmax (teacher forcing, for verification)."""
    import numpy as np

    inputs = {i.name: i for i in session.get_inputs()}
    past_names = [n for n in inputs if n.startswith("past_key_values.")]
    if "input_ids" not in inputs or not past_names:
        raise ValueError("this ONNX file is not a KV-cache decoder (inputs input_ids and past_key_values.N.key/"
                         f"value expected, it has {sorted(inputs)}); export it with export_onnx(..., kv_cache=True)")
    ids = np.asarray(input_ids, dtype=np.int64)
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise ValueError(f"input_ids must be [batch, sequence] with sequence >= 1, got shape {ids.shape}")
    batch = ids.shape[0]
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, dtype=np.int64)
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask shape {mask.shape} differs from input_ids shape {ids.shape}")
    # position ids as transformers' generate() makes them: count of attended tokens so far, 1 on padding
    positions = np.where(mask == 0, 1, np.cumsum(mask, axis=-1) - 1)
    past = {}
    for name in past_names:
        info = inputs[name]
        kv_heads, head_dim = info.shape[1], info.shape[3]
        if info.type == "tensor(bfloat16)":
            raise ValueError("this decoder's cache is bfloat16, which numpy cannot hold; feed it through "
                             "onnxruntime's OrtValue API or export with dtype=torch.float16")
        past[name] = np.zeros((batch, kv_heads, 0, head_dim), dtype=_ORT_FLOAT.get(info.type, "float32"))
    output_names = [o.name for o in session.get_outputs()]
    present = [n for n in output_names if n.startswith("present.")]
    sequences, step_logits = ids, []
    step_ids, done = ids, np.zeros(batch, dtype=bool)
    for step in range(max_new_tokens):
        feeds = {"input_ids": step_ids, "attention_mask": mask, **past}
        if "position_ids" in inputs:
            feeds["position_ids"] = positions[:, -step_ids.shape[1]:]
        outs = dict(zip(output_names, session.run(output_names, feeds)))
        logits = outs["logits"][:, -1].astype(np.float32)  # [B, vocab]
        step_logits.append(logits)
        nxt = logits.argmax(-1) if forced is None else np.asarray(forced)[:, step]
        if eos_token_id is not None:
            nxt = np.where(done, eos_token_id, nxt)
            done |= nxt == eos_token_id
        sequences = np.concatenate([sequences, nxt[:, None]], axis=1)
        if eos_token_id is not None and done.all():
            break
        past = {p.replace("present.", "past_key_values."): outs[p] for p in present}
        step_ids = nxt[:, None].astype(np.int64)
        mask = np.concatenate([mask, np.ones((batch, 1), dtype=np.int64)], axis=1)
        positions = np.concatenate([positions, positions[:, -1:] + 1], axis=1)
    return sequences, step_logits


def generate(path_or_session, input_ids, max_new_tokens: int, *, attention_mask=None, eos_token_id=None,
             providers: Sequence[str] | None = None):
    """Greedy decoding with a KV-cache ONNX file written by ``export_onnx(..., kv_cache=True)``.

    Runs the prompt once with empty past tensors, then one token per step feeding ``present.*`` back as
    ``past_key_values.*``; the tokens equal ``model.generate(input_ids, do_sample=False)``'s. Left padding is
    supported through ``attention_mask`` (position ids are computed as transformers does). With
    ``eos_token_id``, a row that produced it keeps producing it and decoding stops when every row has.

    Args:
        path_or_session: the ``.onnx`` file, or an ``onnxruntime.InferenceSession`` of it.
        input_ids: ``[batch, sequence]`` prompt tokens (torch tensor or numpy array).
        max_new_tokens: how many tokens to add.
        attention_mask: ``[batch, sequence]``, 0 on (left) padding; default all ones.
        eos_token_id: optional token that ends a row.
        providers: onnxruntime execution providers when a path is given (default CPU); a silent fallback to
            another provider is an error.

    Returns:
        ``[batch, sequence + new]`` tokens, a torch tensor if ``input_ids`` was one, else a numpy array.

    Example:
        >>> import os, tempfile, torch, vwn_transform
        >>> from vwn_transform.models.hf_tiny import tiny_hf_model
        >>> from vwn_transform.onnx import export_onnx, generate
        >>> wide = vwn_transform.widen(tiny_hf_model("llama", num_hidden_layers=1), 2)
        >>> path = os.path.join(tempfile.mkdtemp(), "decoder.onnx")
        >>> report = export_onnx(wide, path, kv_cache=True)
        >>> prompt = torch.tensor([[5, 17, 42, 8]])
        >>> tokens = generate(path, prompt, max_new_tokens=6)
        >>> tokens.shape
        torch.Size([1, 10])
        >>> torch.equal(tokens, wide.generate(prompt, max_new_tokens=6, do_sample=False, eos_token_id=None,
        ...                                   pad_token_id=0))
        True
    """
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if isinstance(path_or_session, (str, os.PathLike)):
        if not Path(path_or_session).is_file():
            raise ValueError(f"no ONNX file at {str(path_or_session)!r}")
        session = _session(path_or_session, _resolve_providers(providers))
    elif hasattr(path_or_session, "run") and hasattr(path_or_session, "get_inputs"):
        session = path_or_session
    else:
        raise TypeError(f"path_or_session must be a path or an onnxruntime.InferenceSession, got "
                        f"{type(path_or_session).__name__}")
    as_torch = isinstance(input_ids, torch.Tensor)
    ids = _numpy(input_ids) if as_torch else input_ids
    mask = _numpy(attention_mask) if isinstance(attention_mask, torch.Tensor) else attention_mask
    sequences, _ = _decode(session, ids, mask, max_new_tokens, eos_token_id=eos_token_id)
    return torch.from_numpy(sequences) if as_torch else sequences


def _verify_decoding(session, model: nn.Module, reference32: nn.Module | None, report: ExportReport,
                     atol: float, new_tokens: int = 5) -> None:
    """Greedy decoding in onnxruntime vs ``model.generate(do_sample=False)``: a left-padded batch of 2 and a batch
    of 1, every step's last-position logits compared, and the tokens (onnxruntime is teacher-forced along
    PyTorch's tokens so that the logits of every step stay comparable; its own argmax must equal them)."""
    import numpy as np

    vocab = model.get_input_embeddings().num_embeddings
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(0)
    prompts = []
    ids = torch.randint(3, vocab, (2, 7), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding
    prompts.append((ids, mask))
    ids = torch.randint(3, vocab, (1, 4), generator=gen)
    prompts.append((ids, torch.ones_like(ids)))
    pad = getattr(model.generation_config, "pad_token_id", None)
    for ids, mask in prompts:
        with torch.no_grad():  # plain greedy: no end of sequence (eos_token_id=None), no repetition penalty
            out = model.generate(ids.to(device), attention_mask=mask.to(device), max_new_tokens=new_tokens,
                                 do_sample=False, num_beams=1, eos_token_id=None, repetition_penalty=1.0,
                                 pad_token_id=0 if pad is None else pad, output_logits=True,
                                 return_dict_in_generate=True)
        want_tokens = _numpy(out.sequences[:, ids.shape[1]:])
        want = torch.stack([lg.float().cpu() for lg in out.logits])  # [steps, B, vocab]
        _, got_steps = _decode(session, _numpy(ids), _numpy(mask), want_tokens.shape[1], forced=want_tokens)
        got = torch.from_numpy(np.stack(got_steps))
        diff = float((got - want).abs().max())
        check = VerifyCheck({"input_ids": tuple(ids.shape)}, diff, diff / (float(want.abs().max()) or 1.0),
                            tolerance=atol, steps=want_tokens.shape[1])
        if reference32 is not None:
            full = out.sequences
            full_mask = torch.cat([mask.to(device), torch.ones_like(full[:, ids.shape[1]:])], dim=1)
            with torch.no_grad():
                ref = reference32(input_ids=full, attention_mask=full_mask, use_cache=False).logits.float().cpu()
            ref_steps = ref[:, ids.shape[1] - 1:-1].transpose(0, 1)  # the logits that chose each new token
            check.reference_error = float((want - ref_steps).abs().max())
            check.tolerance = max(atol, HALF_TOLERANCE_FACTOR * check.reference_error)
        argmax = got.argmax(-1).numpy().T  # [B, steps]
        mismatch = argmax != want_tokens
        if half_ok := (reference32 is not None and mismatch.any()):
            # half precision: a different argmax is accepted only at a near tie (within the tolerance)
            picked = got.gather(-1, torch.from_numpy(want_tokens.T.copy()).unsqueeze(-1)).squeeze(-1)
            gap = (got.max(-1).values - picked).numpy().T
            half_ok = bool((gap[mismatch] <= check.tolerance).all())
            if half_ok:
                report.notes.append(f"{int(mismatch.sum())} greedy step(s) at {tuple(ids.shape)} picked another "
                                    "token at a near tie (logit gap within the tolerance)")
        check.tokens_match = bool(not mismatch.any() or half_ok)
        report.checks.append(check)
