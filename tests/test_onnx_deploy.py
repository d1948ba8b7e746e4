"""ONNX for deployment: half precision (GHC mixing kept in float32 inside the graph), decoders with a KV cache
that onnxruntime decodes greedily token for token like ``generate(do_sample=False)``, and execution providers
that must really run (no silent CPU fallback)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import vwn_transform
import vwn_transform.onnx as vonnx
from vwn_transform.models import GPT, GPTConfig
from vwn_transform.onnx import export_onnx, generate

from hf_models import tiny_hf

FLOAT, FLOAT16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16


def _ghc_nodes(proto):
    """The nodes the GHC translations emitted (the exporter records the torch op in the node's namespace)."""
    out = []
    for node in proto.graph.node:
        namespace = {p.key: p.value for p in node.metadata_props}.get("namespace", "")
        if "vwn.ghc_" in namespace:
            out.append(node)
    return out


def _elem_types(proto):
    inferred = onnx.shape_inference.infer_shapes(proto)
    types = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        types[vi.name] = vi.type.tensor_type.elem_type
    for init in inferred.graph.initializer:
        types[init.name] = init.data_type
    return types


def _cast_to(node):
    return {a.name: a.i for a in node.attribute}.get("to") if node.op_type == "Cast" else None


def _assert_ghc_mixing_in_float32(path):
    proto = onnx.load(str(path))
    types = _elem_types(proto)
    ghc = _ghc_nodes(proto)
    assert ghc, "no GHC nodes found in the graph"
    # the half-precision state enters the GHC through a Cast to float32 ...
    assert any(_cast_to(n) == FLOAT and types.get(n.input[0]) == FLOAT16 for n in ghc)
    # ... every mixing op computes in float32 ...
    mixing = [n for n in ghc if n.op_type in ("MatMul", "Tanh", "ReduceMean", "Reciprocal")]
    assert mixing
    for node in mixing:
        data = node.input[:1] if node.op_type == "ReduceMean" else node.input  # (ReduceMean's axes are int64)
        assert all(types.get(i) == FLOAT for i in data), (node.op_type, node.name, [types.get(i) for i in data])
    # ... and its results go back to float16 (the model dtype) through a Cast
    ghc_out = {o for n in ghc for o in n.output}
    assert any(_cast_to(n) == FLOAT16 and n.input[0] in ghc_out for n in proto.graph.node)
    # the lean translations ran: constant-shape views, no Shape arithmetic
    assert not any(n.op_type in ("Shape", "ReduceMean") for n in ghc)


# ------------------------------------------------------------------------------------------------------------
# half precision
# ------------------------------------------------------------------------------------------------------------
def test_float16_llama_exports_verifies_and_leaves_the_model_float32(tmp_path):
    wide = vwn_transform.widen(tiny_hf("llama", num_hidden_layers=1), 2)  # one layer: a shorter export
    before = {k: v.clone() for k, v in wide.state_dict().items()}
    path = tmp_path / "llama16.onnx"
    report = export_onnx(wide, path, dtype=torch.float16)
    assert report.dtype == "float16" and "float16" in str(report)
    assert any("converted copy" in n for n in report.notes)
    assert f"{vonnx.HALF_TOLERANCE_FACTOR:g} x PyTorch's own float16-vs-float32 error" in str(report)
    for c in report.checks:  # tolerance derived from PyTorch's own half-precision error
        assert c.reference_error > 0 and c.tolerance == max(1e-4, vonnx.HALF_TOLERANCE_FACTOR * c.reference_error)
        assert c.max_abs_diff <= c.tolerance
    assert all(v.dtype == torch.float32 for v in wide.state_dict().values())
    assert all(torch.equal(v, wide.state_dict()[k]) for k, v in before.items())
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.get_outputs()[0].type == "tensor(float16)"
    ids = torch.randint(0, wide.config.vocab_size, (2, 9))
    got = session.run(["logits"], {"input_ids": ids.numpy(), "attention_mask": np.ones((2, 9), np.int64)})[0]
    with torch.no_grad():
        want = wide(input_ids=ids, use_cache=False).logits  # float32
    assert np.abs(got.astype(np.float32) - want.numpy()).max() <= 4e-3
    _assert_ghc_mixing_in_float32(path)


def test_float16_gpt2_decoder_with_kv_cache(tmp_path):
    wide = vwn_transform.widen(tiny_hf("gpt2", n_layer=1), 2)  # one layer: a shorter export
    path = tmp_path / "gpt2_16.onnx"
    report = export_onnx(wide, path, dtype=torch.float16, kv_cache=True)
    assert report.kv_cache and report.dtype == "float16"
    assert all(c.tokens_match and c.max_abs_diff <= c.tolerance and c.reference_error > 0 for c in report.checks)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    types = {i.name: i.type for i in session.get_inputs()}
    assert types["past_key_values.0.key"] == "tensor(float16)" and types["input_ids"] == "tensor(int64)"
    _assert_ghc_mixing_in_float32(path)


@pytest.mark.parametrize("dtype,error,match", [
    (torch.int8, ValueError, "dtype must be torch.float32, torch.float16 or torch.bfloat16"),
    (torch.float64, ValueError, "dtype must be torch.float32, torch.float16 or torch.bfloat16"),
    ("fp8", ValueError, r"got 'fp8'"),
    (16, TypeError, "dtype must be torch.float32"),
])
def test_bad_dtype_argument(dtype, error, match, tmp_path):
    with pytest.raises(error, match=match):
        export_onnx(tiny_hf("llama"), tmp_path / "x.onnx", dtype=dtype)
    assert list(tmp_path.iterdir()) == []


def test_bfloat16_on_the_cpu_provider_is_refused_with_the_reason(tmp_path):
    with pytest.raises(ValueError, match=r"bfloat16 cannot be verified on onnxruntime's CPUExecutionProvider.*"
                                         r"CUDAExecutionProvider.*verify=False"):
        export_onnx(tiny_hf("llama"), tmp_path / "x.onnx", dtype=torch.bfloat16)
    assert list(tmp_path.iterdir()) == []


def test_generic_translations_still_export_and_verify(tmp_path, monkeypatch):
    # the fallback of the lean translations (used when a rank or size is not static), through the whole table:
    # dynamic read, write + read, write; an odd slot width, a fractional ratio
    monkeypatch.setattr(vonnx, "translation_table", vonnx._generic_translation_table)
    cfg = GPTConfig(vocab_size=50, block_size=16, n_layer=1, n_head=3, n_embd=33, dropout=0.0)
    wide = vwn_transform.widen(GPT(cfg).eval(), "5/3")
    report = export_onnx(wide, tmp_path / "g.onnx", example_inputs=(torch.randint(0, 50, (2, 7)),))
    assert report.max_abs_diff <= 1e-4
    ghc = _ghc_nodes(onnx.load(str(tmp_path / "g.onnx")))
    assert any(n.op_type == "Shape" for n in ghc)  # the generic form really ran


# ------------------------------------------------------------------------------------------------------------
# KV cache
# ------------------------------------------------------------------------------------------------------------
def test_kv_cache_decoder_names_shapes_padding_and_generate(tmp_path):
    # Mistral with a sliding window shorter than prompt + new tokens: the window matters (checked at the end)
    model = tiny_hf("mistral", sliding_window=4)
    wide = vwn_transform.widen(model, 2)
    path = tmp_path / "mistral_kv.onnx"
    report = export_onnx(wide, path, kv_cache=True)
    layers = wide.config.num_hidden_layers
    past = [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    assert report.input_names == ["input_ids", "attention_mask", "position_ids"] + past
    assert report.output_names == ["logits"] + [p.replace("past_key_values", "present") for p in past]
    assert [c.shapes["input_ids"] for c in report.checks] == [(2, 7), (1, 4)]
    assert all(c.tokens_match and c.steps == 5 and c.max_abs_diff <= 1e-4 for c in report.checks)
    assert "tokens equal" in str(report)

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    key = next(i for i in session.get_inputs() if i.name == "past_key_values.0.key")
    assert key.shape == ["batch", wide.config.num_key_value_heads, "past_sequence",
                         wide.config.hidden_size // wide.config.num_attention_heads]
    # first step: empty past tensors
    ids = torch.randint(3, 96, (2, 6))
    feeds = {"input_ids": ids.numpy(), "attention_mask": np.ones((2, 6), np.int64),
             "position_ids": np.tile(np.arange(6), (2, 1))}
    feeds.update({p: np.zeros((2, 2, 0, 8), np.float32) for p in past})
    outs = session.run(None, feeds)
    assert outs[1].shape == (2, 2, 6, 8)
    with torch.no_grad():
        want = wide(input_ids=ids, use_cache=False).logits
    assert np.abs(outs[0] - want.numpy()).max() <= 1e-4

    # vwn_transform.onnx.generate == transformers' greedy generate, with left padding, from a path or a session
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with torch.no_grad():
        hf = wide.generate(ids, attention_mask=mask, max_new_tokens=7, do_sample=False, eos_token_id=None,
                           pad_token_id=0)
    assert torch.equal(generate(path, ids, 7, attention_mask=mask), hf)
    got = generate(session, ids.numpy(), 7, attention_mask=mask.numpy())
    assert isinstance(got, np.ndarray) and np.array_equal(got, hf.numpy())
    # eos ends a row, and decoding once every row has it
    eos = int(hf[1, 6 + 2])
    out = generate(session, ids[1:], 7, eos_token_id=eos)
    assert out.shape[1] <= 6 + 3 and int(out[0, -1]) == eos
    # the sliding window changes the result: a test that would notice if the export dropped it
    with torch.no_grad():
        windowed = wide(input_ids=ids, use_cache=False).logits
        model.config.sliding_window = None
        wide.config.sliding_window = None
        full = wide(input_ids=ids, use_cache=False).logits
    assert (windowed - full).abs().max() > 1e-3


def test_kv_cache_moe(tmp_path):
    wide = vwn_transform.widen(tiny_hf("mixtral", num_hidden_layers=1), 2)  # one layer: a shorter export
    report = export_onnx(wide, tmp_path / "mixtral.onnx", kv_cache=True)
    assert all(c.tokens_match and c.max_abs_diff <= 1e-4 for c in report.checks), str(report)
    assert any("batched_mm" in n for n in report.notes)


def test_kv_cache_bad_use(tmp_path):
    gpt = GPT(GPTConfig(vocab_size=64, block_size=32, n_layer=1, n_head=2, n_embd=32))
    with pytest.raises(ValueError, match="kv_cache=True needs a Hugging Face causal LM.*got GPT"):
        export_onnx(gpt, tmp_path / "g.onnx", kv_cache=True, example_inputs=(torch.zeros(1, 2, dtype=torch.long),))
    with pytest.raises(ValueError, match="leave example_inputs=None"):
        export_onnx(tiny_hf("llama"), tmp_path / "l.onnx", kv_cache=True,
                    example_inputs=(torch.zeros(1, 2, dtype=torch.long),))
    with pytest.raises(ValueError, match="needs dynamic=True"):
        export_onnx(tiny_hf("llama"), tmp_path / "l.onnx", kv_cache=True, dynamic=False)
    with pytest.raises(TypeError, match="kv_cache must be True or False"):
        export_onnx(tiny_hf("llama"), tmp_path / "l.onnx", kv_cache="yes")
    assert list(tmp_path.iterdir()) == []


def _identity_model(path):
    x = onnx.helper.make_tensor_value_info("input_ids", onnx.TensorProto.INT64, ["b", "s"])
    y = onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.INT64, ["b", "s"])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["input_ids"], ["logits"])], "g", [x], [y])
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 20)], ir_version=10), str(path))


def test_generate_bad_input(tmp_path):
    _identity_model(tmp_path / "plain.onnx")
    with pytest.raises(ValueError, match="not a KV-cache decoder.*kv_cache=True"):
        generate(tmp_path / "plain.onnx", torch.zeros(1, 3, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="max_new_tokens must be a positive int"):
        generate(tmp_path / "plain.onnx", torch.zeros(1, 3, dtype=torch.long), 0)
    with pytest.raises(ValueError, match="no ONNX file at"):
        generate(tmp_path / "missing.onnx", torch.zeros(1, 3, dtype=torch.long), 2)
    with pytest.raises(TypeError, match="path or an onnxruntime.InferenceSession"):
        generate(3, torch.zeros(1, 3, dtype=torch.long), 2)


# ------------------------------------------------------------------------------------------------------------
# providers: a requested provider must run, never a silent CPU fallback
# ------------------------------------------------------------------------------------------------------------
def test_cuda_request_on_the_cpu_build_names_the_gpu_extra(tmp_path):
    with pytest.raises(ValueError, match=r"\['CUDAExecutionProvider'\] are not available.*vwn_transform\[onnx-gpu\]"):
        export_onnx(nn.Linear(4, 4), tmp_path / "x.onnx", example_inputs=(torch.randn(2, 3, 4),),
                    providers=["CUDAExecutionProvider"])
    assert list(tmp_path.iterdir()) == []


def test_silent_fallback_to_the_cpu_is_detected(tmp_path, monkeypatch):
    # onnxruntime-gpu lists CUDA as available even when its CUDA libraries are missing, then runs on the CPU
    # with only a warning: pretend CUDA is available so that onnxruntime (CPU build) falls back
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA: no fallback to provoke")
    monkeypatch.setattr(vonnx, "_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    with pytest.raises(RuntimeError, match=r"did not run the requested provider\(s\) \['CUDAExecutionProvider'\] "
                                           r"\(it ran \['CPUExecutionProvider'\]\).*fell back silently"):
        export_onnx(nn.Linear(4, 4), tmp_path / "x.onnx", example_inputs=(torch.randn(2, 3, 4),),
                    providers=["CUDAExecutionProvider"])
    assert list(tmp_path.iterdir()) == []
    _identity_model(tmp_path / "plain.onnx")
    with pytest.raises(RuntimeError, match="fell back silently"):
        generate(tmp_path / "plain.onnx", torch.zeros(1, 3, dtype=torch.long), 2,
                 providers=["CUDAExecutionProvider"])


@pytest.mark.gpu
def test_cuda_provider_verifies_on_the_gpu(tmp_path):
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("needs onnxruntime-gpu (pip install 'vwn_transform[onnx-gpu]') and a CUDA device")
    wide = vwn_transform.widen(tiny_hf("llama"), 2)
    report = export_onnx(wide, tmp_path / "g.onnx", providers=["CUDAExecutionProvider"], dtype=torch.float16,
                         kv_cache=True)
    assert report.providers[0] == "CUDAExecutionProvider"
    assert all(c.tokens_match for c in report.checks)
