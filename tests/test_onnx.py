"""ONNX export: widened models run in onnxruntime with eager PyTorch's outputs at shapes unlike the export shapes,
the file holds only standard ONNX ops, and bad input fails clearly without leaving files behind."""

from __future__ import annotations

import os
import subprocess
import sys
from fractions import Fraction

import numpy as np
import pytest
import torch
from torch import nn

import onnx  # the ONNX extra is pinned in requirements.txt: the tests need it
import onnxruntime as ort

import vwn_transform
from vwn_transform.models import GPT, GPTConfig
from vwn_transform.onnx import ONNXVerificationError, translation_table

from hf_models import tiny_hf

SHAPES = [(1, 5), (3, 17)]  # the check shapes; the export example is [2, 8]


def tiny_gpt():
    return GPT(GPTConfig(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=32, dropout=0.0)).eval()


def _build(name):
    return tiny_gpt() if name == "gpt" else tiny_hf(name)


def _eager_logits(model, ids, hf):
    with torch.no_grad():
        if hf:
            return model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
        out = model(ids)
        return out[0] if isinstance(out, tuple) else out


def _ort_logits(session, ids, hf):
    feeds = {"input_ids": ids.numpy(), "attention_mask": np.ones(ids.shape, dtype=np.int64)} if hf else \
        {session.get_inputs()[0].name: ids.numpy()}
    return torch.from_numpy(session.run(["logits"], feeds)[0])


def _assert_standard_onnx(path):
    onnx.checker.check_model(path, full_check=True)
    proto = onnx.load(path)
    domains = {node.domain for node in proto.graph.node}
    assert domains <= {"", "ai.onnx"}, f"custom domains in the graph: {domains}"
    assert not proto.functions
    assert not any(node.op_type.startswith("ghc") for node in proto.graph.node)


# CI time: r=4 on one family (the lean translations do not depend on the family); the MoE family (mixtral)
# exports and verifies in test_onnx_deploy.test_kv_cache_moe, GPT-2 with a KV cache in test_onnx_deploy too
@pytest.mark.parametrize("name,m,n", [(name, 2, 3) for name in ("gpt", "llama", "gpt2", "gemma")] + [("gpt", 2, 8)])
def test_widened_model_runs_in_onnxruntime_like_eager(name, m, n, tmp_path):
    original = _build(name)
    wide = vwn_transform.widen(original, Fraction(n, m), m=m)
    assert (wide.vwn_config.m, wide.vwn_config.n) == (m, n)
    hf = name != "gpt"
    path = tmp_path / f"{name}.onnx"
    example = None if hf else (torch.randint(0, 64, (2, 8)),)
    report = vwn_transform.export_onnx(wide, path, example_inputs=example)

    assert path.is_file() and report.file_size_bytes == path.stat().st_size
    assert report.widened and report.opset == 20
    assert report.providers == ["CPUExecutionProvider"]
    assert [c.shapes[report.input_names[0]] for c in report.checks] == SHAPES
    assert report.output_names == ["logits"]
    assert report.input_names == (["input_ids", "attention_mask"] if hf else ["idx"])
    _assert_standard_onnx(str(path))

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.get_providers() == ["CPUExecutionProvider"]
    vocab = 64 if not hf else original.config.vocab_size
    gen = torch.Generator().manual_seed(1)
    for shape in SHAPES:  # one file, two shapes unlike the export shape
        ids = torch.randint(0, vocab, shape, generator=gen)
        got = _ort_logits(session, ids, hf)
        want = _eager_logits(wide, ids, hf)
        assert got.shape == want.shape
        assert (got - want).abs().max().item() <= 1e-4
        # and, the init being function-preserving, the original model's own logits
        assert (got - _eager_logits(original, ids, hf)).abs().max().item() <= 1e-4


def test_padded_attention_mask_matches_eager(tmp_path):
    wide = vwn_transform.widen(tiny_hf("llama"), 2)
    path = tmp_path / "llama.onnx"
    vwn_transform.export_onnx(wide, path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ids = torch.randint(0, wide.config.vocab_size, (3, 11))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    mask[2, :1] = 0
    got = torch.from_numpy(session.run(["logits"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0])
    with torch.no_grad():
        want = wide(input_ids=ids, attention_mask=mask, use_cache=False).logits
    keep = mask.bool()  # padded positions are don't-care
    assert (got[keep] - want[keep]).abs().max().item() <= 1e-4


def test_plain_model_exports_too_and_the_report_says_so(tmp_path):
    model = tiny_hf("qwen2")  # a family no other ONNX test uses
    report = vwn_transform.export_onnx(model, tmp_path / "plain.onnx")
    assert not report.widened
    assert any("not widened" in note for note in report.notes)
    assert report.max_abs_diff <= 1e-4
    assert "widened by vwn_transform: no" in str(report)
    _assert_standard_onnx(str(tmp_path / "plain.onnx"))


def test_static_ghc_and_odd_sizes_and_fixed_shapes(tmp_path):
    # static GHC (read_static op), an odd hidden size split in 3 slots, 1.5x, and dynamic=False
    cfg = GPTConfig(vocab_size=50, block_size=16, n_layer=3, n_head=3, n_embd=33, dropout=0.0)
    wide = vwn_transform.widen(GPT(cfg).eval(), "5/3", dynamic=False)
    ids = torch.randint(0, 50, (2, 7))
    report = vwn_transform.export_onnx(wide, tmp_path / "s.onnx", example_inputs=(ids,), dynamic=False)
    assert report.dynamic_axes == {} and [c.shapes["idx"] for c in report.checks] == [(2, 7)]
    session = ort.InferenceSession(str(tmp_path / "s.onnx"), providers=["CPUExecutionProvider"])
    got = _ort_logits(session, ids, hf=False)
    assert (got - _eager_logits(wide, ids, hf=False)).abs().max().item() <= 1e-4


def test_translation_table_covers_every_vwn_op():
    ops = {name for name in dir(torch.ops.vwn) if name.startswith("ghc_") and not name.endswith("_backward")}
    assert {overload._schema.name.split("::")[1] for overload in translation_table} == ops


def test_export_leaves_model_untouched(tmp_path):
    # a bfloat16 model in training mode: exported (float32 by default) from a converted copy, the model unchanged
    wide = vwn_transform.widen(tiny_gpt(), 2).to(torch.bfloat16).train()
    before = {k: v.clone() for k, v in wide.state_dict().items()}
    report = vwn_transform.export_onnx(wide, tmp_path / "g.onnx", example_inputs=(torch.randint(0, 64, (2, 8)),))
    assert report.dtype == "float32" and any("converted copy of the bfloat16 model" in n for n in report.notes)
    assert report.max_abs_diff <= 1e-4
    assert all(mod.training for mod in wide.modules())
    assert all(torch.equal(v, wide.state_dict()[k]) and v.dtype == wide.state_dict()[k].dtype
               for k, v in before.items())


# ------------------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------------------
def _ids():
    return (torch.randint(0, 64, (2, 8)),)


def test_missing_example_inputs_for_a_plain_module(tmp_path):
    with pytest.raises(ValueError, match="needs example_inputs for a GPT"):
        vwn_transform.export_onnx(tiny_gpt(), tmp_path / "g.onnx")
    assert list(tmp_path.iterdir()) == []


def test_unwritable_paths(tmp_path):
    a_file = tmp_path / "not_a_folder.txt"
    a_file.write_text("x")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        vwn_transform.export_onnx(tiny_gpt(), a_file / "g.onnx", example_inputs=_ids())
    with pytest.raises(ValueError, match="does not exist"):
        vwn_transform.export_onnx(tiny_gpt(), tmp_path / "missing" / "g.onnx", example_inputs=_ids())
    with pytest.raises(ValueError, match="is a directory"):
        vwn_transform.export_onnx(tiny_gpt(), tmp_path, example_inputs=_ids())
    with pytest.raises(TypeError, match="path must be"):
        vwn_transform.export_onnx(tiny_gpt(), 3, example_inputs=_ids())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not_a_folder.txt"]


def test_unavailable_provider_is_an_error_not_a_fallback(tmp_path):
    with pytest.raises(ValueError, match=r"\['CUDAExecutionProvider'\] are not available"):
        vwn_transform.export_onnx(tiny_gpt(), tmp_path / "g.onnx", example_inputs=_ids(),
                                  providers=["CUDAExecutionProvider"])
    with pytest.raises(ValueError, match="non-empty list"):
        vwn_transform.export_onnx(tiny_gpt(), tmp_path / "g.onnx", example_inputs=_ids(), providers=[])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("opset", [17, 24, "20", True])
def test_bad_opset(opset, tmp_path):
    with pytest.raises(ValueError, match="opset must be an int between 18 and 23"):
        vwn_transform.export_onnx(tiny_gpt(), tmp_path / "g.onnx", example_inputs=_ids(), opset=opset)


def test_bad_example_inputs(tmp_path):
    with pytest.raises(TypeError, match="example_inputs must be tensors"):
        vwn_transform.export_onnx(tiny_gpt(), tmp_path / "g.onnx", example_inputs=([1, 2, 3],))
    with pytest.raises(ValueError, match=r"\(input_ids,\) or \(input_ids, attention_mask\)"):
        vwn_transform.export_onnx(tiny_hf("llama"), tmp_path / "l.onnx", example_inputs=(1, 2, 3))
    with pytest.raises(TypeError, match="expects a torch.nn.Module"):
        vwn_transform.export_onnx("model", tmp_path / "l.onnx")


class _ExportsDifferently(nn.Module):
    """Computes one thing eagerly and another while being exported: verification must catch it."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        y = self.lin(x)
        return y * 2 if torch.compiler.is_exporting() else y * 3


def test_verification_failure_raises_and_writes_nothing(tmp_path):
    target = tmp_path / "bad.onnx"
    with pytest.raises(ONNXVerificationError, match="differs from eager PyTorch") as info:
        vwn_transform.export_onnx(_ExportsDifferently(), target, example_inputs=(torch.randn(2, 8, 4),))
    assert info.value.report.max_abs_diff > 1e-4
    assert list(tmp_path.iterdir()) == []  # neither the target nor the temporary file


def test_missing_onnx_extra_names_the_extra():
    code = ("import sys; sys.modules['onnxscript'] = None\n"
            "import torch, vwn_transform\n"
            "from vwn_transform.models import GPT, GPTConfig\n"
            "try:\n"
            "    vwn_transform.export_onnx(GPT(GPTConfig(n_layer=1, n_embd=16, n_head=2)), 'x.onnx',\n"
            "                              example_inputs=(torch.zeros(1, 2, dtype=torch.long),))\n"
            "except ImportError as e:\n"
            "    print('IMPORT-ERROR:', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(__file__))
    assert "IMPORT-ERROR:" in out.stdout, out.stderr[-2000:]
    assert "pip install 'vwn_transform[onnx]'" in out.stdout


def test_export_at_the_maximum_sequence_length_verifies_within_it(tmp_path):
    wide = vwn_transform.widen(tiny_gpt(), 2)  # block_size 32
    report = vwn_transform.export_onnx(wide, tmp_path / "g.onnx", example_inputs=(torch.randint(0, 64, (2, 32)),))
    seqs = [c.shapes["idx"][1] for c in report.checks]
    assert all(s <= 32 for s in seqs) and 32 not in seqs and len(set(seqs)) == 2
    assert report.max_abs_diff <= 1e-4
