"""``torch.compile(model, backend="vwn")``: the GHC-aware compile backend.

Registered through the ``torch_dynamo_backends`` entry point (so ``backend="vwn"`` works in a fresh interpreter
without importing vwn_transform) and importable as :func:`vwn_backend` for explicit use.

What it does with the graph Dynamo captured (the whole model, blocks inlined):

1. ``fuse_write_read`` (:mod:`vwn_transform.passes.fusion`, the pass widen() runs inside each block): every
   ``vwn::ghc_write`` whose result is the state the next ``vwn::ghc_read_dynamic`` reads (here: the last sublayer
   of block l feeding the first of block l+1; pairs inside a block are already fused by widen()) becomes one
   ``vwn::ghc_write_read_dynamic``. AOT autograd then traces the fused op's registered backward, so the backward
   graph carries the fused backward op too. Semantics are preserved exactly.
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
import os
from typing import Any, Callable

import torch
import torch.fx as fx

import vwn_transform.ops  # noqa: F401  (registers torch.ops.vwn.*)
from vwn_transform.passes.fusion import FuseWriteRead, fuse_write_read

log = logging.getLogger("vwn_transform")

__all__ = ["vwn_backend", "fuse_cross_block", "INNER_COMPILERS"]

INNER_COMPILERS = ("inductor", "aot_eager", "eager")


def _debug(title: str, gm: fx.GraphModule) -> None:
    if os.environ.get("VWN_DEBUG", "0") not in ("", "0"):
        log.warning("VWN_DEBUG %s:\n%s", title, gm.print_readable(print_output=False))


def fuse_cross_block(gm: fx.GraphModule) -> int:
    """:class:`~vwn_transform.passes.fusion.FuseWriteRead` on a captured ``gm`` (recompiled when it changed).
    Returns the number of write+read pairs fused."""
    count = fuse_write_read(gm.graph, "backend 'vwn' graph")
    if count:
        gm.recompile()
    return count


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
    _debug(f"graph before {FuseWriteRead.name}", gm)
    fused = fuse_cross_block(gm) if fuse else 0
    _debug(f"graph after {FuseWriteRead.name} ({fused} pairs fused)", gm)
    log.info("backend 'vwn': %d cross-block write+read pairs fused; inner compiler %s", fused, inner)
    compiler = _inner_compiler(inner)
    if inner == "inductor" and options:
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, example_inputs, config_patches=options)
    return compiler(gm, example_inputs)
