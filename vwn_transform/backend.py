"""``torch.compile(model, backend="vwn")``: the GHC-aware compile backend.

Registered through the ``torch_dynamo_backends`` entry point (so ``backend="vwn"`` works in a fresh interpreter
without importing vwn_transform) and importable as :func:`vwn_backend` for explicit use.

What it does with the graph Dynamo captured (the whole model, blocks inlined):

1. ``fuse_cross_block``: every ``vwn::ghc_write`` whose result is the state the next ``vwn::ghc_read_dynamic``
   reads (the last sublayer of block l feeding the first of block l+1; pairs inside a block are already fused
   by widen()) becomes one ``vwn::ghc_write_read_dynamic``. AOT autograd then traces the fused op's registered
   backward, so the backward graph carries the fused backward op too. Semantics are preserved exactly.
2. The graph goes to the inner compiler (``options={"inner": "inductor"}`` by default; ``"aot_eager"`` or
   ``"eager"`` for debugging). The ``vwn::*`` ops stay opaque calls there and run the implementation that
   ``VWN_IMPL`` selects (see :mod:`vwn_transform.ops`: ``auto`` follows the measured table on CUDA and runs the
   reference on the CPU; Triton on the CPU only under ``TRITON_INTERPRET=1`` with ``VWN_IMPL=triton``).

Each node a pass creates records ``node.meta["vwn_pass"]``; ``VWN_DEBUG=1`` writes the graph before and after each
pass to the ``vwn_transform`` logger.

Example:
    >>> import torch, vwn_transform
    >>> from vwn_transform.models import GPT, GPTConfig
    >>> wide = vwn_transform.widen(GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32)), 2)
    >>> fast = torch.compile(wide, backend="vwn", options={"inner": "aot_eager"})
    >>> idx = torch.randint(0, 64, (2, 8))
    >>> torch.allclose(fast(idx)[0], wide(idx)[0], atol=1e-5)
    True
"""

from __future__ import annotations

import logging
import operator
import os
from typing import Any, Callable

import torch
import torch.fx as fx

import vwn_transform.ops  # noqa: F401  (registers torch.ops.vwn.*)
from vwn_transform.passes.pipeline import GraphPass, PassResult, run_passes

log = logging.getLogger("vwn_transform")

__all__ = ["vwn_backend", "fuse_cross_block", "FuseCrossBlock", "INNER_COMPILERS"]

INNER_COMPILERS = ("inductor", "aot_eager", "eager")
_WRITE = (torch.ops.vwn.ghc_write, torch.ops.vwn.ghc_write.default)
_READ_DYNAMIC = (torch.ops.vwn.ghc_read_dynamic, torch.ops.vwn.ghc_read_dynamic.default)


def _debug(title: str, gm: fx.GraphModule) -> None:
    if os.environ.get("VWN_DEBUG", "0") not in ("", "0"):
        log.warning("VWN_DEBUG %s:\n%s", title, gm.print_readable(print_output=False))


def _meta_shape(node: fx.Node):
    val = node.meta.get("example_value", node.meta.get("val"))
    return getattr(val, "shape", None)


class FuseCrossBlock(GraphPass):
    """``h' = ghc_write(h, z, cc, wc); read = ghc_read_dynamic(h', *params, eps)`` -> one
    ``ghc_write_read_dynamic`` (its output 0 is ``h'``, outputs 1..4 are the read's). Only pairs with the same
    (n, m) on both sides (the same model) are fused."""

    name = "fuse_cross_block"
    requires = ("ghc-ops",)

    def run(self, graph: fx.Graph) -> PassResult:
        count = _fuse_cross_block(graph)
        return PassResult(count > 0, count)


def fuse_cross_block(gm: fx.GraphModule) -> int:
    """:class:`FuseCrossBlock` on ``gm`` (recompiled when changed). Returns the number of pairs fused."""
    (_, result), = run_passes(gm.graph, [FuseCrossBlock()], "backend 'vwn' graph", established=("ghc-ops",))
    if result.changed:
        gm.recompile()
    return result.count


def _fuse_cross_block(graph: fx.Graph) -> int:
    fused_count = 0
    for write in list(graph.nodes):
        if write.op != "call_function" or write.target not in _WRITE:
            continue
        reads = [u for u in write.users if u.op == "call_function" and u.target in _READ_DYNAMIC and
                 u.args and u.args[0] is write]
        if len(reads) != 1:
            continue
        read = reads[0]
        if len(read.args) != 10 or read.kwargs or write.kwargs or len(write.args) != 4:
            continue  # only the positional form the GHC modules emit
        read_shape = _meta_shape(read.args[3])  # the next GHC's static read [n, m]
        write_shape = _meta_shape(write.args[3])  # write coefficients [..., n, m]
        if read_shape is None or write_shape is None or tuple(read_shape) != tuple(write_shape[-2:]):
            continue
        with graph.inserting_before(read):
            fused = graph.call_function(torch.ops.vwn.ghc_write_read_dynamic.default,
                                        (*write.args, *read.args[1:]))
            h_new = graph.call_function(operator.getitem, (fused, 0))
        for node in (fused, h_new):
            node.meta["vwn_pass"] = "fuse_cross_block"
        for user in list(read.users):
            if user.op == "call_function" and user.target is operator.getitem:
                user.args = (fused, user.args[1] + 1)
                user.meta["vwn_pass"] = "fuse_cross_block"
            else:  # the read's tuple used whole: rebuild it from the fused outputs
                with graph.inserting_before(user):
                    parts = [graph.call_function(operator.getitem, (fused, k)) for k in range(1, 5)]
                    tup = graph.call_function(tuple, ([*parts],))
                user.replace_input_with(read, tup)
        write.replace_all_uses_with(h_new, delete_user_cb=lambda n: n is not fused)
        graph.erase_node(read)
        graph.erase_node(write)
        fused_count += 1
    return fused_count


def _inner_compiler(inner: str) -> Callable:
    if inner == "inductor":
        from torch._inductor.compile_fx import compile_fx

        return compile_fx
    if inner == "aot_eager":
        from torch._dynamo.backends.registry import lookup_backend

        return lookup_backend("aot_eager")
    return lambda gm, example_inputs: gm.forward


def vwn_backend(gm: fx.GraphModule, example_inputs: list[Any], options: dict | None = None, **_: Any):
    """The ``vwn`` Dynamo backend (see the module docstring). ``options``: ``{"inner": "inductor" | "aot_eager" |
    "eager", "fuse": True}``; other keys go to inductor as its options."""
    options = dict(options or {})
    inner = options.pop("inner", "inductor")
    fuse = options.pop("fuse", True)
    if inner not in INNER_COMPILERS:
        raise ValueError(f"backend 'vwn': options['inner'] must be one of {INNER_COMPILERS}, got {inner!r}")
    if not isinstance(fuse, bool):
        raise ValueError(f"backend 'vwn': options['fuse'] must be True or False, got {fuse!r}")
    if options and inner != "inductor":
        raise ValueError(f"backend 'vwn': options {sorted(options)} are inductor options, but inner={inner!r}")
    _debug("graph before fuse_cross_block", gm)
    fused = fuse_cross_block(gm) if fuse else 0
    _debug(f"graph after fuse_cross_block ({fused} pairs fused)", gm)
    log.info("backend 'vwn': %d cross-block write+read pairs fused; inner compiler %s", fused, inner)
    compiler = _inner_compiler(inner)
    if inner == "inductor" and options:
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, example_inputs, config_patches=options)
    return compiler(gm, example_inputs)
