"""One interface for the graph passes and one runner for them.

A pass is an object with a ``name``, the graph properties it ``requires`` and those it ``ensures``, and a
``run(graph)`` that returns a :class:`PassResult` (whether it changed the graph, and a count of what it did).
:func:`run_passes` runs a list of them in order: it checks each pass's requirements against what the passes
before it ensured, lints the graph after every pass that changed it, and on any failure raises
:class:`PassError` naming the pass, the graph and the passes that ran before it.

Properties (strings) used today:

* ``"residual-updates"``: the block graph's residual updates are known (``find_residual_updates``);
* ``"ghc-ops"``: the residual updates are calls of the ``torch.ops.vwn`` GHC ops (ensured by
  ``rewrite_block_graph`` in a block, and what Dynamo captures of a widened model).

Example::

    >>> import torch.fx as fx
    >>> from vwn_transform.passes.pipeline import FunctionPass, PassResult, run_passes
    >>> g = fx.Graph(); x = g.placeholder("x"); _ = g.output(x)
    >>> noop = FunctionPass("noop", lambda graph: PassResult(False))
    >>> [(name, result.changed) for name, result in run_passes(g, [noop], "example graph")]
    [('noop', False)]
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import torch.fx as fx

__all__ = ["FunctionPass", "GraphPass", "PassError", "PassResult", "run_passes"]


@dataclasses.dataclass(frozen=True)
class PassResult:
    changed: bool
    count: int = 0  # what the pass did, in its own unit (updates rewritten, pairs fused)


class PassError(RuntimeError):
    """A pass failed, or ran without what it requires; the message names the pass and what ran before it."""


class GraphPass:
    """Base of the graph passes: subclasses set ``name``/``requires``/``ensures`` and implement :meth:`run`."""

    name: str = "pass"
    requires: tuple[str, ...] = ()
    ensures: tuple[str, ...] = ()

    def run(self, graph: fx.Graph) -> PassResult:
        raise NotImplementedError


class FunctionPass(GraphPass):
    """A pass from a function ``graph -> PassResult``."""

    def __init__(self, name: str, fn: Callable[[fx.Graph], PassResult], requires: Sequence[str] = (),
                 ensures: Sequence[str] = ()):
        self.name, self.fn = name, fn
        self.requires, self.ensures = tuple(requires), tuple(ensures)

    def run(self, graph: fx.Graph) -> PassResult:
        return self.fn(graph)


def run_passes(graph: fx.Graph, passes: Sequence[GraphPass], where: str,
               established: Sequence[str] = ()) -> list[tuple[str, PassResult]]:
    """Run ``passes`` on ``graph`` in order (``where`` names the graph in errors; ``established``: properties
    that hold before the first pass). Returns ``[(pass name, result), ...]``."""
    have = set(established)
    ran: list[tuple[str, PassResult]] = []

    def before() -> str:
        return ", ".join(name for name, _ in ran) or "no pass"

    for p in passes:
        missing = [r for r in p.requires if r not in have]
        if missing:
            raise PassError(f"{where}: pass {p.name!r} requires {missing}, which nothing before it ensures "
                            f"(ran before it: {before()})")
        try:
            result = p.run(graph)
            if not isinstance(result, PassResult):
                raise TypeError(f"returned {type(result).__name__}, expected PassResult")
            if result.changed:
                graph.lint()
        except PassError:
            raise
        except Exception as exc:
            raise PassError(f"{where}: pass {p.name!r} failed (ran before it: {before()}): "
                            f"{type(exc).__name__}: {exc}") from exc
        have.update(p.ensures)
        ran.append((p.name, result))
    return ran
