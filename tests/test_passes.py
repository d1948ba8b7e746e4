"""The graph passes on their own, on small hand-built blocks and graphs (not through widen()):

* ``find_residual_updates`` finds sequential and parallel updates and names the sublayers; a block without one
  raises the specific ``NoResidualUpdateError``;
* ``rewrite_block_graph`` + ``compile_block_graph`` replace every update by ``contract``/``expand`` calls: with
  stand-in GHCs whose contract is the identity and whose expand is ``h + z``, the rewritten block must compute
  exactly what the original computed (an independent check of the rewiring, no VWN math involved);
* ``fuse_write_read`` turns each expand whose result the next GHC contracts into one ``expand_contract`` (same
  output with stand-ins that record calls), and leaves an expand with two consumers alone;
* ``backend.fuse_cross_block`` fuses ``ghc_write`` -> ``ghc_read_dynamic`` op pairs of an fx graph into the fused
  op with the same outputs as the pair (reference kernels), and leaves pairs with different (n, m) alone.
"""

from __future__ import annotations

import copy
import operator

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

from vwn_transform.backend import fuse_cross_block
from vwn_transform.kernels import reference as ref
from vwn_transform.passes.block_graph import (
    GHC_CONTAINER,
    CallSpec,
    NoResidualUpdateError,
    compile_block_graph,
    find_residual_updates,
    fuse_write_read,
    rewrite_block_graph,
    trace_block,
)


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


class IdentityGHC(nn.Module):
    """Stand-in GHC: contract is the identity (no coefficients), expand is the plain residual add."""

    def __init__(self, calls: list):
        super().__init__()
        self.calls = calls

    def contract(self, h):
        self.calls.append(("contract", self))
        return h, None, None

    def expand(self, h, z, carry_c, write_c):
        self.calls.append(("expand", self))
        return h + z

    def expand_contract(self, h, z, carry_c, write_c, nxt):
        self.calls.append(("expand_contract", self))
        h_new = h + z
        return h_new, nxt.contract(h_new)


def traced(block, *args, **kwargs):
    spec, values = CallSpec.from_call(block, args, kwargs)
    graph = trace_block(block, spec)
    return graph, spec, values


def rewritten(make, seed):
    """A fresh block, its output on a random stream, and its graph rewritten into GHC form:
    ``(block, output, graph, placeholder values, updates)``."""
    torch.manual_seed(seed)
    block = make()
    s = torch.randn(2, 3, 8)
    graph, spec, values = traced(block, s)
    updates = find_residual_updates(graph, block, spec.stream_placeholder(), "test block")
    rewrite_block_graph(graph, updates)
    return block, block(s), graph, values, updates


def widened_with_stand_ins(block, updates):
    calls: list = []
    setattr(block, GHC_CONTAINER, nn.ModuleList(IdentityGHC(calls) for _ in updates))
    return calls


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
def test_rewrite_preserves_the_block_with_identity_ghcs(make):
    block, want, graph, values, updates = rewritten(make, seed=0)
    targets = [n.target for n in graph.nodes if n.op == "call_method"]
    assert targets.count("contract") == targets.count("expand") == len(updates)
    names = {n.name for n in graph.nodes}
    assert {f"ghc_in_{i}" for i in range(len(updates))} <= names and {f"h_{i}" for i in range(len(updates))} <= names
    assert all(n.meta.get("vwn_pass") == "rewrite_block_graph" for n in graph.nodes
               if n.op == "call_method" and n.target in ("contract", "expand"))
    calls = widened_with_stand_ins(block, updates)
    fn, src = compile_block_graph(graph, "test")
    assert "contract" in src and "expand" in src
    # exact up to the order of the adds (a parallel block's s + a + b becomes s + (a + b))
    torch.testing.assert_close(fn(block, *values), want, rtol=1e-6, atol=1e-6)
    assert [c[0] for c in calls] == ["contract", "expand"] * len(updates)


def test_fuse_write_read_fuses_adjacent_pairs_only():
    block, want, graph, values, updates = rewritten(PreNormBlock, seed=1)
    unfused = copy.deepcopy(graph)
    assert fuse_write_read(graph) is True
    targets = [n.target for n in graph.nodes if n.op == "call_method"]
    # update 0's expand feeds update 1's contract: fused; update 1's expand is the block's output: kept
    assert targets == ["contract", "expand_contract", "expand"], targets
    calls = widened_with_stand_ins(block, updates)
    fn, _ = compile_block_graph(graph, "test")
    torch.testing.assert_close(fn(block, *values), want, rtol=0, atol=0)
    ghcs = list(getattr(block, GHC_CONTAINER))
    assert calls == [("contract", ghcs[0]), ("expand_contract", ghcs[0]), ("contract", ghcs[1]), ("expand", ghcs[1])]
    assert fuse_write_read(graph) is False  # nothing left to fuse

    # an expand contracted by two GHCs has no single next read to fuse with: left alone
    expand0 = next(n for n in unfused.nodes if n.op == "call_method" and n.target == "expand")
    contract1 = next(n for n in unfused.nodes if n.op == "call_method" and n.target == "contract" and
                     n.args[1] is expand0)
    output = next(n for n in unfused.nodes if n.op == "output")
    with unfused.inserting_before(output):
        again = unfused.call_method("contract", (contract1.args[0], expand0))
        extra = unfused.call_function(operator.getitem, (again, 0))
    output.args = ((output.args[0], extra),)
    assert fuse_write_read(unfused) is False
    assert [n.target for n in unfused.nodes if n.op == "call_method"].count("expand_contract") == 0


def _write_read_graph(n_w, m_w, n_r, m_r):
    """An fx GraphModule ``h' = ghc_write(h, z, cc, wc); (x, cc2, wc2, st) = ghc_read_dynamic(h', *params)`` with
    example values in the node meta, as Dynamo hands it to the backend."""
    d, N = 6, 5
    g = torch.Generator().manual_seed(3)
    vals = dict(h=torch.randn(N, n_w * d, generator=g), z=torch.randn(N, m_w * d, generator=g),  # [tokens, slots*d]
                cc=torch.randn(N, n_w, n_w, generator=g), wc=torch.randn(N, n_w, m_w, generator=g),
                norm_weight=torch.rand(d, generator=g) + 0.5, proj=torch.randn(d, 2 * m_r + n_r, generator=g),
                read=torch.randn(n_r, m_r, generator=g), carry=torch.randn(n_r, n_r, generator=g),
                write=torch.randn(m_r, n_r, generator=g), scale_read=torch.randn(n_r, m_r, generator=g),
                scale_carry=torch.randn(n_r, n_r, generator=g), scale_write=torch.randn(m_r, n_r, generator=g))
    graph = fx.Graph()
    ph = {}
    for name, v in vals.items():
        ph[name] = graph.placeholder(name)
        ph[name].meta["val"] = v
    write = graph.call_function(torch.ops.vwn.ghc_write.default, (ph["h"], ph["z"], ph["cc"], ph["wc"]))
    params = [ph[k] for k in ("norm_weight", "proj", "read", "carry", "write", "scale_read", "scale_carry",
                              "scale_write")]
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
    from vwn_transform.passes.block_graph import FuseWriteRead, RewriteResidualUpdates
    from vwn_transform.passes.pipeline import PassError, run_passes

    block = PreNormBlock()
    graph, spec, _ = traced(block, torch.randn(2, 3, 8))
    updates = find_residual_updates(graph, block, spec.stream_placeholder(), "test block")
    with pytest.raises(PassError, match="'fuse_write_read' requires \\['ghc-form'\\]"):
        run_passes(graph, [FuseWriteRead()], "test block", established=("residual-updates",))
    results = run_passes(graph, [RewriteResidualUpdates(updates), FuseWriteRead()], "test block",
                         established=("residual-updates",))
    assert [(n, r.changed, r.count) for n, r in results] == [("rewrite_block_graph", True, 2),
                                                             ("fuse_write_read", True, 1)]
