"""vwn_transform: turn an existing transformer into its Virtual Width Network form (arXiv 2511.11238).

>>> import vwn_transform
>>> sorted(vwn_transform.__all__)[:3]
['CheckpointError', 'GHC', 'UnsupportedModelError']
"""

from .config import UnsupportedModelError, VWNConfig
from .modules import GHC
from .lora import peft_modules_to_save
from .persist import CheckpointError, from_pretrained, load, save
from .training import param_groups
from .widen import WidenPlan, plan, widen
from .widenet import widenet, widenet_plan
from .adaptive_width import adaptive_width, truncate_width, width_report

__version__ = "0.1.0"

__all__ = ["CheckpointError", "GHC", "UnsupportedModelError", "VWNConfig", "WidenPlan", "adaptive_width",
           "export_onnx", "from_pretrained", "load", "param_groups", "peft_modules_to_save", "plan", "save",
           "truncate_width", "widen", "widenet", "widenet_plan", "width_report", "__version__"]


def export_onnx(model, path, *, example_inputs=None, dynamic=True, opset=20, verify=True, providers=None,
                atol=1e-4, dtype="float32", kv_cache=False):
    """Export a (widened) model to ONNX and verify it in onnxruntime; see :func:`vwn_transform.onnx.export_onnx`.

    Needs the ONNX extra: ``pip install 'vwn_transform[onnx]'`` (imported only when called).
    """
    try:
        from .onnx import export_onnx as _export
    except ImportError as exc:
        raise ImportError(
            f"export_onnx needs the ONNX extra: pip install 'vwn_transform[onnx]' (missing: {exc})"
        ) from exc
    return _export(model, path, example_inputs=example_inputs, dynamic=dynamic, opset=opset, verify=verify,
                   providers=providers, atol=atol, dtype=dtype, kv_cache=kv_cache)
