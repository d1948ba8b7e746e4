"""ONNX export of (widened) models through ``torch.onnx.export(..., dynamo=True)``.

The ``torch.ops.vwn.*`` GHC ops are translated into standard ONNX ops by :data:`translation_table` (written in
onnxscript), so the file runs on any onnxruntime without custom kernels. Importing this module needs the
``onnx`` extra (``pip install 'vwn_transform[onnx]'``); :func:`vwn_transform.export_onnx` imports it lazily.

The translations mirror ``kernels/reference.py``: the state is reshaped token-major to ``[N, n, d]``, mixing
runs in float32, outputs are cast back to the state's dtype.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
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

__all__ = ["ExportReport", "ONNXVerificationError", "export_onnx", "translation_table"]

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


def ghc_read_static(h, read):
    """``X = A_read^T H``: ``[..., n*d] -> [..., m*d]``."""
    n = op.Shape(read, start=0, end=1)
    h3 = _slots_view(op.Cast(h, to=_FLOAT), n)  # [N, n, d]
    x = op.MatMul(op.Transpose(op.Cast(read, to=_FLOAT), perm=[1, 0]), h3)  # [m, n] @ [N, n, d] -> [N, m, d]
    return op.CastLike(op.Reshape(x, _lead_shape(h, op.Constant(value_ints=[-1]))), h)


def ghc_read_dynamic(h, norm_weight, proj, read, carry, write, scale_read, scale_carry, scale_write, eps: float):
    """Dynamic coefficients and ``X = Read^T H``; returns ``(x, carry_c, write_c, stats)`` like the op."""
    n = op.Shape(read, start=0, end=1)
    m = op.Shape(read, start=1, end=2)
    h3 = _slots_view(op.Cast(h, to=_FLOAT), n)  # [N, n, d]
    d = op.Cast(op.Shape(h3, start=2), to=_FLOAT)
    inv_rms = op.Reciprocal(op.Sqrt(op.Add(op.ReduceMean(op.Mul(h3, h3), [-1], keepdims=1),
                                           op.Constant(value_float=eps))))  # [N, n, 1]
    y = op.Mul(op.Mul(h3, inv_rms), op.Cast(norm_weight, to=_FLOAT))  # RMS-normed slots times the gain
    logits = op.Div(op.MatMul(y, op.Cast(proj, to=_FLOAT)), op.Sqrt(d))  # [N, n, 2m+n]
    c = op.Tanh(logits)
    last = op.Constant(value_ints=[-1])
    mn = op.Add(m, n)
    c_read = op.Slice(c, op.Constant(value_ints=[0]), m, last)
    c_carry = op.Slice(c, m, mn, last)
    c_write = op.Slice(c, mn, op.Add(mn, m), last)
    read_c = op.Add(op.Cast(read, to=_FLOAT), op.Mul(op.Cast(scale_read, to=_FLOAT), c_read))  # [N, n, m]
    carry_c = op.Add(op.Cast(carry, to=_FLOAT), op.Mul(op.Cast(scale_carry, to=_FLOAT), c_carry))  # [N, n, n]
    write_c = op.Add(op.Transpose(op.Cast(write, to=_FLOAT), perm=[1, 0]),
                     op.Mul(op.Transpose(op.Cast(scale_write, to=_FLOAT), perm=[1, 0]), c_write))  # [N, n, m]
    x = op.MatMul(op.Transpose(read_c, perm=[0, 2, 1]), h3)  # [N, m, d]
    x_out = op.CastLike(op.Reshape(x, _lead_shape(h, last)), h)
    stats = op.Concat(logits, inv_rms, axis=-1)
    return (x_out, op.Reshape(carry_c, _lead_shape(h, n, n)), op.Reshape(write_c, _lead_shape(h, n, m)),
            op.Reshape(stats, _lead_shape(h, n, last)))


def ghc_write(h, z, carry_c, write_c):
    """``H' = WriteT Z + Carry^T H``; static (2-D) coefficients broadcast over tokens."""
    n = op.Shape(write_c, start=-2, end=-1)
    m = op.Shape(write_c, start=-1)
    minus1 = op.Constant(value_ints=[-1])
    h3 = _slots_view(op.Cast(h, to=_FLOAT), n)  # [N, n, d]
    z3 = _slots_view(op.Cast(z, to=_FLOAT), m)  # [N, m, d]
    cc = op.Reshape(op.Cast(carry_c, to=_FLOAT), op.Concat(minus1, n, n, axis=0))  # [N or 1, n, n]
    wc = op.Reshape(op.Cast(write_c, to=_FLOAT), op.Concat(minus1, n, m, axis=0))  # [N or 1, n, m]
    out = op.Add(op.MatMul(wc, z3), op.MatMul(op.Transpose(cc, perm=[0, 2, 1]), h3))  # [N, n, d]
    return op.CastLike(op.Reshape(out, op.Shape(h)), h)


def ghc_write_read_dynamic(h, z, carry_c, write_c, norm_weight, proj, read, carry, write, scale_read, scale_carry,
                           scale_write, eps: float):
    """The cross-layer fused op: ``ghc_write`` then the next GHC's ``ghc_read_dynamic`` on its result."""
    h_new = ghc_write(h, z, carry_c, write_c)
    x, carry_out, write_out, stats = ghc_read_dynamic(h_new, norm_weight, proj, read, carry, write, scale_read,
                                                      scale_carry, scale_write, eps)
    return h_new, x, carry_out, write_out, stats


#: ``torch.ops.vwn.*`` overload -> onnxscript translation, for ``torch.onnx.export(custom_translation_table=...)``.
translation_table = {
    torch.ops.vwn.ghc_read_static.default: ghc_read_static,
    torch.ops.vwn.ghc_read_dynamic.default: ghc_read_dynamic,
    torch.ops.vwn.ghc_write.default: ghc_write,
    torch.ops.vwn.ghc_write_read_dynamic.default: ghc_write_read_dynamic,
}


# ------------------------------------------------------------------------------------------------------------
# export
# ------------------------------------------------------------------------------------------------------------
class ONNXVerificationError(RuntimeError):
    """onnxruntime's outputs differ from eager PyTorch; ``.report`` holds the measurements."""

    def __init__(self, message: str, report: "ExportReport"):
        super().__init__(message)
        self.report = report


@dataclasses.dataclass
class VerifyCheck:
    shapes: dict[str, tuple[int, ...]]
    max_abs_diff: float
    max_rel_diff: float


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

    @property
    def max_abs_diff(self) -> float:
        return max((c.max_abs_diff for c in self.checks), default=float("nan"))

    @property
    def max_rel_diff(self) -> float:
        return max((c.max_rel_diff for c in self.checks), default=float("nan"))

    def __str__(self) -> str:
        lines = [
            f"ONNX export: {self.path} ({self.file_size_bytes / 1e6:.2f} MB, opset {self.opset}, "
            f"{self.export_seconds:.1f} s)",
            f"  inputs {self.input_names} (exported at {self.export_shapes}), outputs {self.output_names}",
            f"  dynamic axes: {self.dynamic_axes or 'none'}",
            f"  widened by vwn_transform: {'yes' if self.widened else 'no'}",
        ]
        lines += [f"  note: {n}" for n in self.notes]
        if self.checks:
            lines.append(f"  verified with onnxruntime providers {self.providers}:")
            for c in self.checks:
                lines.append(f"    {c.shapes}: max abs diff {c.max_abs_diff:.2e}, max rel diff {c.max_rel_diff:.2e}")
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


def _check_dtype(model: nn.Module) -> None:
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point() and t.dtype != torch.float32:
            raise ValueError(
                f"export_onnx supports float32 models; {name!r} is {t.dtype}. Call model.float() first "
                "(float16/bfloat16 ONNX export is not supported yet)"
            )


def _import_onnxruntime():
    try:
        import onnxruntime
    except ImportError as exc:
        raise ImportError("verifying an ONNX export needs onnxruntime: pip install 'vwn_transform[onnx]' (or pass "
                          "verify=False)") from exc
    return onnxruntime


def _resolve_providers(providers: Sequence[str] | None) -> list[str]:
    ort = _import_onnxruntime()

    available = ort.get_available_providers()
    requested = list(providers) if providers is not None else ["CPUExecutionProvider"]
    if not requested or not all(isinstance(p, str) for p in requested):
        raise ValueError(f"providers must be a non-empty list of provider names, got {providers!r}")
    missing = [p for p in requested if p not in available]
    if missing:
        raise ValueError(f"execution provider(s) {missing} are not available in this onnxruntime; available: "
                         f"{available}")
    return requested


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


def export_onnx(model: nn.Module, path, *, example_inputs: tuple | None = None, dynamic: bool = True,
                opset: int = 20, verify: bool = True, providers: Sequence[str] | None = None,
                atol: float = 1e-4) -> ExportReport:
    """Export ``model`` to a standard ONNX file and (by default) verify it in onnxruntime.

    Hugging Face causal LMs export with inputs ``input_ids`` and ``attention_mask`` and output ``logits``,
    batch and sequence dynamic. Other modules need ``example_inputs`` (their output's primary tensor, e.g. the
    logits of the reference GPT's ``(logits, loss)``, becomes ``logits``). The file is written to a temporary
    name next to ``path`` and moved into place only when export, checking and verification succeed.

    Args:
        model: a float32 module, widened by vwn_transform or not.
        path: the ``.onnx`` file to write.
        example_inputs: positional example inputs; default for HF causal LMs a ``[2, 8]`` token batch.
        dynamic: batch and sequence axes dynamic (first two dims of every input).
        opset: ONNX opset version.
        verify: run the file in onnxruntime at two shapes unlike the export shapes and compare with eager
            PyTorch; raise :class:`ONNXVerificationError` if the max abs difference exceeds ``atol``.
        providers: onnxruntime execution providers (default CPU). One that is unavailable is an error.

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
    if not isinstance(model, nn.Module):
        raise TypeError(f"export_onnx expects a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(opset, int) or isinstance(opset, bool) or not 18 <= opset <= 23:
        raise ValueError(f"opset must be an int between 18 and 23, got {opset!r}")
    target = _check_path(path)
    _check_dtype(model)
    chosen = _resolve_providers(providers) if verify else []

    hf = _is_hf_causal_lm(model)
    notes: list[str] = []
    widened = getattr(model, "vwn_config", None) is not None
    if not widened:
        notes.append("the model was not widened by vwn_transform; it is exported as it is")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
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
        names = ["input_ids", "attention_mask"]
    else:
        if example_inputs is None:
            raise ValueError(
                f"export_onnx needs example_inputs for a {type(model).__name__} (only Hugging Face causal LMs get "
                "default token inputs), e.g. example_inputs=(torch.randint(0, vocab, (2, 8)),)"
            )
        example_inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
        if not all(isinstance(t, torch.Tensor) for t in example_inputs):
            raise TypeError("example_inputs must be tensors")
        params = [p for p in inspect.signature(model.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        names = [p.name for p in params[:len(example_inputs)]]
        names += [f"input_{i}" for i in range(len(names), len(example_inputs))]

    dynamic_dims: dict[str, dict[int, str]] = {}
    dynamic_shapes = None
    if dynamic:
        batch = torch.export.Dim("batch")
        max_pos = _max_positions(model)
        seq = torch.export.Dim("sequence", max=max_pos) if max_pos else torch.export.Dim("sequence")
        spec = []
        for name, t in zip(names, example_inputs):
            dims = {0: batch, 1: seq} if t.dim() >= 2 else ({0: batch} if t.dim() == 1 else {})
            spec.append(dims)
            dynamic_dims[name] = {k: ("batch" if k == 0 else "sequence") for k in dims}
        dynamic_shapes = (tuple(spec),)  # one entry for the wrapper's *inputs

    training = {mod: mod.training for mod in model.modules()}  # restored in `finally`
    wrapper = _Logits(model, hf).eval()
    tmp = writable_temp_file(target)  # a folder that cannot be written names `path`, not the temp file
    start = time.perf_counter()
    try:
        model.eval()
        with _export_friendly_experts(model, notes), _quiet_exporter(), torch.no_grad():
            program = torch.onnx.export(
                wrapper, example_inputs, dynamo=True, custom_translation_table=translation_table,
                dynamic_shapes=dynamic_shapes, opset_version=opset, input_names=names, output_names=["logits"],
                verbose=False,
            )
            program.save(str(tmp))
            elapsed = time.perf_counter() - start
            _onnx.checker.check_model(str(tmp), full_check=True)
            proto = _onnx.load(str(tmp), load_external_data=False)
            custom = sorted({n.domain for n in proto.graph.node if n.domain not in ("", "ai.onnx")})
            if custom or proto.functions:
                raise RuntimeError(f"the exported graph uses custom domains {custom} or functions; expected only "
                                   "standard ONNX ops")
            report = ExportReport(
                path=str(target), opset=opset, file_size_bytes=tmp.stat().st_size, input_names=names,
                output_names=["logits"], export_shapes={n: tuple(t.shape) for n, t in zip(names, example_inputs)},
                dynamic_axes=dynamic_dims, widened=widened, notes=notes, providers=[], checks=[],
                export_seconds=elapsed,
            )
            if verify:
                _verify(wrapper, tmp, report, example_inputs, names, dynamic_dims, chosen, _max_positions(model))
        if verify and report.max_abs_diff > atol:
            raise ONNXVerificationError(
                f"onnxruntime output differs from eager PyTorch by {report.max_abs_diff:.3g} (> atol {atol:g}); "
                f"nothing was written to {str(target)!r}", report)
        os.replace(tmp, target)
    finally:
        for mod, flag in training.items():
            mod.training = flag
        if tmp.exists():
            tmp.unlink()
    log.info("%s", report)
    return report


def _verify(wrapper, tmp: Path, report: ExportReport, example: tuple, names: list[str],
            dynamic_dims: dict[str, dict[int, str]], providers: list[str], max_seq: int | None) -> None:
    ort = _import_onnxruntime()
    session = ort.InferenceSession(str(tmp), providers=providers)
    ran = session.get_providers()
    dropped = [p for p in providers if p not in ran]
    if dropped:
        raise RuntimeError(f"onnxruntime did not run the requested provider(s) {dropped} (it ran {ran}); "
                           "refusing a silent fallback")
    report.providers = ran
    gen = torch.Generator().manual_seed(0)
    variants = [_variant(example, names, dynamic_dims, bump, gen, max_seq) for bump in (0, 1)] if dynamic_dims \
        else [example]
    for inputs in variants:
        with torch.no_grad():
            ref = wrapper(*inputs).float().cpu().numpy()
        got = session.run(["logits"], {n: t.cpu().numpy() for n, t in zip(names, inputs)})[0]
        if got.shape != ref.shape:
            raise RuntimeError(f"onnxruntime returned logits of shape {got.shape}, PyTorch {ref.shape}")
        diff = float(abs(got - ref).max())
        scale = float(abs(ref).max()) or 1.0
        report.checks.append(VerifyCheck({n: tuple(t.shape) for n, t in zip(names, inputs)}, diff, diff / scale))
