"""torch.compile(backend="vwn"): entry-point registration, cross-block fusion, compiled == eager (forward and
5 training steps), no graph breaks, no recompile per sequence length, provenance and VWN_DEBUG, Triton lowering
under the interpreter."""

from __future__ import annotations

import logging
import subprocess
import sys
from fractions import Fraction

import pytest
import torch

import vwn_transform
from vwn_transform import ops
from vwn_transform.backend import fuse_cross_block, vwn_backend
from vwn_transform.models import GPT, GPTConfig

from hf_models import tiny_hf

FAST = {"inner": "aot_eager"}  # AOT autograd without inductor's C++ compile: most tests use it to stay quick


def tiny_gpt(layers=2):
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=64, block_size=32, n_layer=layers, n_head=2, n_embd=32, dropout=0.0))


def build(name, m, n):
    base = tiny_gpt(3) if name == "gpt" else tiny_hf(name)
    return vwn_transform.widen(base, Fraction(n, m), m=m, init="paper")


def loss_of(model, idx, hf):
    if hf:
        return model(input_ids=idx, labels=idx).loss
    return model(idx[:, :-1], idx[:, 1:])[1]


def test_backend_resolves_in_a_fresh_interpreter_without_importing_vwn_transform():
    code = ("import sys, torch\n"
            "from torch._dynamo.backends.registry import lookup_backend\n"
            "assert 'vwn_transform' not in sys.modules\n"
            "fn = lookup_backend('vwn')\n"
            "print(fn.__module__, fn.__name__)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["vwn_transform.backend", "vwn_backend"]


# CI time: (2, 8) on the reference GPT only (the HF family adds Dynamo tracing of its attention, not other slots)
@pytest.mark.parametrize("name,m,n", [("gpt", 2, 3), ("gpt", 2, 8), ("llama", 2, 3)])
def test_compiled_matches_eager_forward_and_five_training_steps(name, m, n):
    hf = name != "gpt"
    eager = build(name, m, n).train()
    compiled_model = build(name, m, n).train()
    compiled_model.load_state_dict(eager.state_dict())
    fast = torch.compile(compiled_model, backend="vwn", options=FAST)
    vocab = 64 if not hf else eager.config.vocab_size
    idx = torch.randint(0, vocab, (2, 13), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = eager(idx[:, :-1])[0] if not hf else eager(input_ids=idx).logits
        got = fast(idx[:, :-1])[0] if not hf else fast(input_ids=idx).logits
    assert (got - want).abs().max().item() <= 1e-5
    opt_e = torch.optim.AdamW(vwn_transform.param_groups(eager, 0.1), lr=1e-3)
    opt_c = torch.optim.AdamW(vwn_transform.param_groups(compiled_model, 0.1), lr=1e-3)
    for step in range(5):
        le, lc = loss_of(eager, idx, hf), loss_of(fast, idx, hf)
        assert abs(le.item() - lc.item()) <= 1e-5, step
        le.backward()
        lc.backward()
        opt_e.step()
        opt_c.step()
        opt_e.zero_grad()
        opt_c.zero_grad()
    params_c = dict(compiled_model.named_parameters())
    for k, p in eager.named_parameters():
        assert (params_c[k] - p).abs().max().item() <= 1e-5, k


def test_inductor_default_path_on_cpu_forward_and_backward():
    eager = build("gpt", 2, 3).train()
    model = build("gpt", 2, 3).train()
    model.load_state_dict(eager.state_dict())
    fast = torch.compile(model, backend="vwn")  # inner compiler: inductor
    idx = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(5))
    want, got = loss_of(eager, idx, hf=False), loss_of(fast, idx, hf=False)
    assert abs(want.item() - got.item()) <= 1e-5
    want.backward()
    got.backward()
    grads = dict(model.named_parameters())
    for k, p in eager.named_parameters():
        assert (grads[k].grad - p.grad).abs().max().item() <= 1e-5, k


class _Recorder:
    """Wraps the backend to keep the graph after its passes."""

    def __init__(self, options):
        self.options, self.graphs = options, []

    def __call__(self, gm, example_inputs, **kwargs):
        fn = vwn_backend(gm, example_inputs, options=dict(self.options))
        self.graphs.append(gm)
        return fn


def test_cross_block_pairs_are_fused_with_provenance_and_debug_dump(monkeypatch, caplog):
    wide = build("gpt", 2, 8)  # 3 blocks: 2 block boundaries
    recorder = _Recorder(FAST)
    monkeypatch.setenv("VWN_DEBUG", "1")
    with caplog.at_level(logging.WARNING, logger="vwn_transform"):
        torch.compile(wide, backend=recorder)(torch.randint(0, 64, (2, 8)))
    (gm,) = recorder.graphs
    targets = [node.target for node in gm.graph.nodes if node.op == "call_function"]
    # 3 pairs fused by widen() inside the blocks, 2 across them by the backend (the same pass); one read at the
    # start and one write at the end stay unfused
    assert targets.count(torch.ops.vwn.ghc_write_read_dynamic.default) == 5
    assert targets.count(torch.ops.vwn.ghc_write.default) == targets.count(torch.ops.vwn.ghc_read_dynamic.default) == 1
    assert sum(node.meta.get("vwn_pass") == "fuse_write_read" for node in gm.graph.nodes) >= 4
    assert any("VWN_DEBUG graph before fuse_write_read" in r.message for r in caplog.records)
    assert any("VWN_DEBUG graph after fuse_write_read (2 pairs fused)" in r.message for r in caplog.records)


@pytest.mark.parametrize("name", ["gpt", "llama", "mixtral"])
def test_no_graph_breaks(name):
    wide = build(name, 2, 3).eval()
    hf = name != "gpt"
    idx = torch.randint(0, 64, (2, 8))
    kwargs = {"input_ids": idx, "use_cache": False} if hf else {}
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(wide)(**kwargs) if hf else torch._dynamo.explain(wide)(idx)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_second_sequence_length_does_not_recompile_per_length():
    torch._dynamo.reset()
    wide = build("gpt", 2, 3).eval()
    recorder = _Recorder(FAST)
    fast = torch.compile(wide, backend=recorder)
    with torch.no_grad():
        for length in (8, 11, 16, 23, 30):
            fast(torch.randint(0, 64, (2, length)))
    assert len(recorder.graphs) <= 2  # the first shape, then one graph dynamic in the sequence length


def test_triton_lowering_under_the_interpreter_matches_eager():
    wide = build("gpt", 2, 3).train()
    idx = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(8))
    want = loss_of(wide, idx, hf=False)
    want.backward()
    grads = {k: p.grad.clone() for k, p in wide.named_parameters()}
    wide.zero_grad()
    ops.set_impl("triton")
    ops.reset_implementations_used()
    try:
        got = loss_of(torch.compile(wide, backend="vwn", options=FAST), idx, hf=False)
        got.backward()
        used = ops.implementations_used()
    finally:
        ops.set_impl(None)
    assert used["ghc_write_read_dynamic"] == "triton" and used["ghc_write_read_dynamic_backward"] == "triton"
    assert abs(got.item() - want.item()) <= 1e-5
    for k, p in wide.named_parameters():
        assert (p.grad - grads[k]).abs().max().item() <= 1e-5, k


def test_fuse_pass_leaves_mismatched_pairs_alone():
    # a write whose result is not read by a dynamic read (the last block) is not touched
    wide = build("gpt", 2, 3)
    recorder = _Recorder({"inner": "eager", "fuse": False})
    torch.compile(wide, backend=recorder)(torch.randint(0, 64, (1, 5)))
    (gm,) = recorder.graphs
    before = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert before.count(torch.ops.vwn.ghc_write_read_dynamic.default) == 3  # widen()'s, inside the blocks
    assert fuse_cross_block(gm) == 2 and fuse_cross_block(gm) == 0  # idempotent


@pytest.mark.parametrize("options,match", [({"inner": "tvm"}, "must be one of"), ({"fuse": "yes"}, "True or False"),
                                           ({"inner": "eager", "max_autotune": True}, "inductor options")])
def test_bad_options(options, match):
    gm = torch.fx.symbolic_trace(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match=match):
        vwn_backend(gm, [torch.randn(1, 2)], options=options)
