"""The graph passes on their own, on small hand-built blocks and graphs (not through widen()):

* ``find_residual_updates`` finds sequential and parallel updates and names the sublayers; a block without one
  raises the specific ``NoResidualUpdateError``;
* ``rewrite_block_graph`` + ``compile_block_graph`` replace every update by the GHC read and write ops: at ratio
  1 (n = m = 1, paper init: read, carry and write are 1) the rewritten block must compute exactly what the
  original computed; with random GHC parameters at (m, n) = (2, 3) it must compute what the GHC modules' own
  ``forward`` computes around the same sublayers (an independent path through the modules' methods);
* the fusion pass (``passes.fusion.FuseWriteRead``, one pass for widen() and the backend) turns each write whose
  result the next dynamic read reads into ``ghc_write_read_dynamic`` with the same outputs, and leaves alone a
  write read twice, static reads, GHCs that recompute, and pairs with different (n, m);
* ``backend.fuse_cross_block`` runs it on an fx graph as Dynamo hands it over (example values in the meta).
"""

from __future__ import annotations

import copy
import operator

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

from vwn_transform import GHC
from vwn_transform.backend import fuse_cross_block
from vwn_transform.kernels import reference as ref
from vwn_transform.passes.block_graph import (
    GHC_CONTAINER,
    CallSpec,
    NoResidualUpdateError,
    compile_block_graph,
    find_residual_updates,
    rewrite_block_graph,
    trace_block,
)
from vwn_transform.passes.fusion import fuse_write_read, is_op


class PreNormBlock(nn.Module):
    """``s = s + attn(ln1(s)); s = s + mlp(ln2(s))``, with a scale argument baked in as a constant."""

    def __init__(self, d=8):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn, self.mlp = nn.Linear(d, d), nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, s, scale=1.0):
        s = s + self.attn(self.ln1(s)) * scale
        return self.mlp(self.ln2(s)) + s  # the stream on the right: f(s) + s


class ParallelBlock(nn.Module):
    """GPT-J style ``s + attn(ln(s)) + mlp(ln(s))``: one update with two terms."""

    def __init__(self, d=8):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.attn, self.mlp = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, s):
        x = self.ln(s)
        return s + self.attn(x) + self.mlp(x)


class NoResidual(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, s):
        return self.lin(s) + 1.0


def traced(block, *args, **kwargs):
    spec, values = CallSpec.from_call(block, args, kwargs)
    graph = trace_block(block, spec)
    return graph, spec, values


def with_ghcs(block, count, n, m, dynamic=True, recompute=False, seed=None):
    """Give ``block`` its ``vwn_ghc`` list of ``count`` GHCs at (m, n) (random parameters when ``seed`` is set)."""
    ghcs = nn.ModuleList(GHC(None, 8, n, m, dynamic=dynamic, recompute=recompute) for _ in range(count))
    if seed is not None:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in ghcs.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5 + (1.0 if p.dim() == 1 else 0.0))
    setattr(block, GHC_CONTAINER, ghcs)
    return list(ghcs)


def rewritten(make, seed, n=1, m=1, **ghc_kwargs):
    """A fresh block with GHCs, its original output on a random stream, and its graph rewritten into the GHC ops:
    ``(block, output, graph, placeholder values, updates)``."""
    torch.manual_seed(seed)
    block = make()
    s = torch.randn(2, 3, 8)
    graph, spec, values = traced(block, s)
    updates = find_residual_updates(graph, block, spec.stream_placeholder(), "test block")
    ghcs = with_ghcs(block, len(updates), n, m, **ghc_kwargs)
    rewrite_block_graph(graph, updates, ghcs)
    return block, block(s), graph, values, updates


def op_counts(graph) -> dict[str, int]:
    names = ("ghc_read_dynamic", "ghc_read_static", "ghc_write", "ghc_write_read_dynamic")
    return {name: sum(is_op(node, name) for node in graph.nodes) for name in names}


@pytest.mark.parametrize("make,sublayers,parallel", [
    (PreNormBlock, [("ln1", "attn"), ("ln2", "mlp")], [False, False]),
    (ParallelBlock, [("ln", "attn", "mlp")], [True]),
])
def test_find_residual_updates(make, sublayers, parallel):
    block = make()
    graph, spec, _ = traced(block, torch.randn(2, 3, 8))
    updates = find_residual_updates(graph, block, spec.stream_placeholder(), "test block")
    assert [u.sublayers for u in updates] == sublayers
    assert [u.parallel for u in updates] == parallel
    assert updates[0].stream.name == spec.stream_placeholder()
    for a, b in zip(updates, updates[1:]):  # each update's result is the next one's stream
        assert b.stream is a.result


def test_no_residual_update_is_a_specific_error():
    block = NoResidual()
    graph, spec, _ = traced(block, torch.randn(2, 8))
    with pytest.raises(NoResidualUpdateError, match="found none"):
        find_residual_updates(graph, block, spec.stream_placeholder(), "test block")


@pytest.mark.parametrize("make", [PreNormBlock, ParallelBlock])
@pytest.mark.parametrize("dynamic", [True, False])
def test_rewrite_at_ratio_one_preserves_the_block(make, dynamic):
    block, want, graph, values, updates = rewritten(make, seed=0, dynamic=dynamic)
    read = "ghc_read_dynamic" if dynamic else "ghc_read_static"
    assert op_counts(graph)[read] == op_counts(graph)["ghc_write"] == len(updates)
    assert all(n.meta.get("vwn_pass") == "rewrite_block_graph" for n in graph.nodes
               if is_op(n, read) or is_op(n, "ghc_write"))
    assert {f"h_{i}" for i in range(len(updates))} <= {n.name for n in graph.nodes}
    fn, src = compile_block_graph(graph, "test")
    assert f"torch.ops.vwn.{read}" in src and "torch.ops.vwn.ghc_write" in src
    # exact up to the order of the adds (a parallel block's s + a + b becomes s + (a + b))
    torch.testing.assert_close(fn(block, *values), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("make", [PreNormBlock, ParallelBlock])
def test_rewrite_computes_what_the_ghc_modules_compute(make):
    """Random GHC parameters at (m, n) = (2, 3): the generated ops must be wired as GHC.forward wires them."""
    torch.manual_seed(1)
    block = make()
    s = torch.randn(2, 3, 8)
    graph, spec, _ = traced(block, s)
    updates = find_residual_updates(graph, block, spec.stream_placeholder(), "test block")
    ghcs = with_ghcs(block, len(updates), n=3, m=2, seed=2)
    rewrite_block_graph(graph, updates, ghcs)
    fn, _ = compile_block_graph(graph, "test")
    h = torch.randn(2, 3, 12)  # [batch, seq, n*d]
    if make is PreNormBlock:
        sublayers = [lambda x: block.attn(block.ln1(x)) * 1.0, lambda x: block.mlp(block.ln2(x))]
    else:
        sublayers = [lambda x: block.attn(block.ln(x)) + block.mlp(block.ln(x))]
    want = h
    for ghc, sublayer in zip(ghcs, sublayers):
        ghc.sublayer = sublayer
        want = ghc(want)
        ghc.sublayer = None
    torch.testing.assert_close(fn(block, h), want, rtol=1e-5, atol=1e-6)


def test_fusion_pass_fuses_adjacent_dynamic_pairs_only():
    block, want, graph, values, updates = rewritten(PreNormBlock, seed=1)
    unfused = copy.deepcopy(graph)
    assert fuse_write_read(graph) == 1
    # update 0's write feeds update 1's read: fused; update 1's write is the block's output: kept
    assert op_counts(graph) == {"ghc_read_dynamic": 1, "ghc_read_static": 0, "ghc_write": 1,
                                "ghc_write_read_dynamic": 1}
    assert sum(n.meta.get("vwn_pass") == "fuse_write_read" for n in graph.nodes) >= 2
    fn, _ = compile_block_graph(graph, "test")
    torch.testing.assert_close(fn(block, *values), want, rtol=1e-6, atol=1e-6)
    assert fuse_write_read(graph) == 0  # nothing left to fuse

    # a write read by two dynamic reads has no single next read to fuse with: left alone
    write0 = next(n for n in unfused.nodes if is_op(n, "ghc_write"))
    read1 = next(n for n in unfused.nodes if is_op(n, "ghc_read_dynamic") and n.args[0] is write0)
    output = next(n for n in unfused.nodes if n.op == "output")
    with unfused.inserting_before(output):
        again = unfused.call_function(read1.target, read1.args)
        extra = unfused.call_function(operator.getitem, (again, 0))
    output.args = ((output.args[0], extra),)
    assert fuse_write_read(unfused) == 0
    assert op_counts(unfused)["ghc_write_read_dynamic"] == 0


@pytest.mark.parametrize("kind", ["static", "recompute"])
def test_fusion_pass_leaves_static_and_recomputing_ghcs_alone(kind):
    kwargs = {"dynamic": False} if kind == "static" else {"recompute": True}
    block, want, graph, values, _ = rewritten(PreNormBlock, seed=3, n=2, m=1, **kwargs)
    before = [n.target for n in graph.nodes]
    assert fuse_write_read(graph) == 0
    assert [n.target for n in graph.nodes] == before
    if kind == "recompute":  # the methods whose hooks drop the coefficients
        assert [n.target for n in graph.nodes if n.op == "call_method"] == ["contract", "expand"] * 2


def _write_read_graph(n_w, m_w, n_r, m_r):
    """An fx GraphModule ``h' = ghc_write(h, z, cc, wc); (x, cc2, wc2, st) = ghc_read_dynamic(h', gain, proj, gates,
    scales, eps)`` with
    example values in the node meta, as Dynamo hands it to the backend."""
    d, N = 6, 5
    g = torch.Generator().manual_seed(3)
    vals = dict(h=torch.randn(N, n_w * d, generator=g), z=torch.randn(N, m_w * d, generator=g),  # [tokens, slots*d]
                cc=torch.randn(N, n_w, n_w, generator=g), wc=torch.randn(N, n_w, m_w, generator=g),
                norm_weight=torch.rand(d, generator=g) + 0.5, proj=torch.randn(d, 2 * m_r + n_r, generator=g),
                gates=torch.randn(n_r, 2 * m_r + n_r, generator=g),  # [read | carry | write^T]
                scales=torch.randn(n_r, 2 * m_r + n_r, generator=g))
    graph = fx.Graph()
    ph = {}
    for name, v in vals.items():
        ph[name] = graph.placeholder(name)
        ph[name].meta["val"] = v
    write = graph.call_function(torch.ops.vwn.ghc_write.default, (ph["h"], ph["z"], ph["cc"], ph["wc"]))
    params = [ph[k] for k in ("norm_weight", "proj", "gates", "scales")]
    read = graph.call_function(torch.ops.vwn.ghc_read_dynamic.default, (write, *params, 1e-6))
    outs = [graph.call_function(operator.getitem, (read, k)) for k in range(4)]
    graph.output((write, *outs))
    return fx.GraphModule(nn.Module(), graph), list(vals.values())


def test_fuse_cross_block_same_outputs_as_the_pair():
    gm, inputs = _write_read_graph(3, 2, 3, 2)
    want = gm(*inputs)
    assert fuse_cross_block(gm) == 1
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert torch.ops.vwn.ghc_write_read_dynamic.default in targets
    assert torch.ops.vwn.ghc_write.default not in targets and torch.ops.vwn.ghc_read_dynamic.default not in targets
    got = gm(*inputs)
    h, z, cc, wc = inputs[:4]
    h_new = ref.write(h.view(5, 3, 6), z.view(5, 2, 6), cc, wc).view(5, 18)
    torch.testing.assert_close(got[0], h_new)  # independent of both graphs: the reference write
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_fuse_cross_block_leaves_different_slot_counts_alone():
    gm, _ = _write_read_graph(3, 2, 4, 2)  # a write at (2, 3) feeding a read at (2, 4): not one model's pair
    before = [n.target for n in gm.graph.nodes]
    assert fuse_cross_block(gm) == 0
    assert [n.target for n in gm.graph.nodes] == before


def test_runner_names_the_failing_pass_and_what_ran_before():
    from vwn_transform.passes.pipeline import FunctionPass, PassError, PassResult, run_passes

    g = fx.Graph()
    x = g.placeholder("x")
    g.output(x)
    ok = FunctionPass("first", lambda graph: PassResult(False), ensures=("a",))
    boom = FunctionPass("second", lambda graph: 1 / 0, requires=("a",))
    with pytest.raises(PassError, match=r"test graph: pass 'second' failed \(ran before it: first\): "
                                        r"ZeroDivisionError"):
        run_passes(g, [ok, boom], "test graph")
    needs = FunctionPass("needs-b", lambda graph: PassResult(False), requires=("b",))
    with pytest.raises(PassError, match=r"pass 'needs-b' requires \['b'\], which nothing before it ensures "
                                        r"\(ran before it: first\)"):
        run_passes(g, [ok, needs], "test graph")
    wrong = FunctionPass("wrong-return", lambda graph: True)
    with pytest.raises(PassError, match="returned bool, expected PassResult"):
        run_passes(g, [wrong], "test graph")
    assert [(n, r.changed) for n, r in run_passes(g, [ok, needs], "test graph", established=("b",))] == \
        [("first", False), ("needs-b", False)]


def test_lowering_runs_the_block_passes_in_order():
    from vwn_transform.passes.block_graph import RewriteResidualUpdates
    from vwn_transform.passes.fusion import FuseWriteRead
    from vwn_transform.passes.pipeline import PassError, run_passes

    block = PreNormBlock()
    graph, spec, _ = traced(block, torch.randn(2, 3, 8))
    updates = find_residual_updates(graph, block, spec.stream_placeholder(), "test block")
    ghcs = with_ghcs(block, len(updates), n=3, m=2)
    with pytest.raises(PassError, match="'fuse_write_read' requires \\['ghc-ops'\\]"):
        run_passes(graph, [FuseWriteRead()], "test block", established=("residual-updates",))
    results = run_passes(graph, [RewriteResidualUpdates(updates, ghcs), FuseWriteRead()], "test block",
                         established=("residual-updates",))
    assert [(n, r.changed, r.count) for n, r in results] == [("rewrite_block_graph", True, 2),
                                                             ("fuse_write_read", True, 1)]


@pytest.mark.parametrize("make", [PreNormBlock, ParallelBlock])
def test_stream_entry_and_exit_passes_preserve_the_block(make):
    """A block that is both the first and the last of a stream not from token tables: widened at its input
    (expand_stream_entry: slot copies) and reduced at its output (reduce_stream_exit: the first slot), it takes and
    returns width D and computes what the original block computes."""
    from vwn_transform.passes.block_graph import lower_block_graph

    torch.manual_seed(4)
    block = make()
    s = torch.randn(2, 3, 8)
    want = block(s)
    graph, spec, values = traced(block, s)
    updates = find_residual_updates(graph, block, spec.stream_placeholder(), "test block")
    ghcs = with_ghcs(block, len(updates), n=2, m=1)
    block.vwn_expand = nn.Parameter(torch.cat([torch.eye(8), torch.eye(8)]))  # [D', D]: both slots copy s
    block.vwn_reduce = nn.Parameter(torch.cat([torch.eye(8), torch.zeros(8, 8)], dim=1))  # [D, D']: slot 0
    block.vwn_group_norm_weight = None
    fn, src = lower_block_graph(graph, updates, ghcs, "test", stream_entry=spec.stream_placeholder(),
                                exit_group_size=8)
    assert "expand_stream" in src and "reduce_stream" in src
    got = fn(block, *values)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    # the passes are what makes it work: without the exit reduce the block returns the over-width state
    graph2, spec2, _ = traced(block, s)
    updates2 = find_residual_updates(graph2, block, spec2.stream_placeholder(), "test block")
    fn2, _ = lower_block_graph(graph2, updates2, ghcs, "test", stream_entry=spec2.stream_placeholder())
    assert fn2(block, *values).shape[-1] == 16
