"""The one fusion pass of the GHC ops, used by ``widen()`` (inside each block) and by the ``vwn`` compile backend
(across blocks, on what Dynamo captured).

``FuseWriteRead``: where the state a ``vwn::ghc_write`` produces is read by exactly one ``vwn::ghc_read_dynamic``
(the write of sublayer l, the read of sublayer l+1), the pair becomes one ``vwn::ghc_write_read_dynamic`` (its
output 0 is the new state, outputs 1..4 are the read's). Semantics are preserved exactly; the fused op saves one
pass over the new state. Only pairs with the same slot counts (n, m) on both sides are fused (the fused op mixes
both with one (n, m)); the slot counts come from the nodes' example values (``meta["val"]`` or Dynamo's
``meta["example_value"]``: coefficients ``[..., n, m]``, stacked gates ``[n, 2m+n]``) or, for coefficients, from
the gates of the read op that produced them.

Example (the pass on a graph written by hand)::

    >>> import operator, torch, torch.fx as fx
    >>> import vwn_transform.ops  # registers torch.ops.vwn.*
    >>> from vwn_transform.passes.fusion import fuse_write_read
    >>> g = fx.Graph()
    >>> h, z, cc, wc, *p = [g.placeholder(k) for k in ("h", "z", "cc", "wc", "norm_weight", "proj", "gates",
    ...                                                 "scales")]
    >>> for node, shape in ((wc, (5, 3, 2)), (p[2], (3, 7))):  # (n, m) = (3, 2): gates [n, 2m+n]
    ...     node.meta["val"] = torch.empty(shape, device="meta")
    >>> h2 = g.call_function(torch.ops.vwn.ghc_write.default, (h, z, cc, wc))
    >>> read = g.call_function(torch.ops.vwn.ghc_read_dynamic.default, (h2, *p, 1e-6))
    >>> _ = g.output((h2, g.call_function(operator.getitem, (read, 0))))
    >>> fuse_write_read(g)
    1
    >>> [n.target.__name__ for n in g.nodes if n.op == "call_function" and n.target is not operator.getitem]
    ['ghc_write_read_dynamic.default']
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

import vwn_transform.ops  # noqa: F401  (registers torch.ops.vwn.*)

from vwn_transform.kernels.reference import gate_slots

from .pipeline import GraphPass, PassResult, run_passes

__all__ = ["FuseWriteRead", "fuse_write_read", "gate_slot_counts", "is_op", "slot_counts"]

# the positions of the arguments the pass reads, by op (the schemas in vwn_transform/ops.py)
_WRITE_ARGS = 4  # h, z, carry_c, write_c
_READ_ARGS = 6  # h, norm_weight, proj, gates, scales, eps
_GATES = {"ghc_read_dynamic": 3, "ghc_write_read_dynamic": 6}  # where the stacked gates [n, 2m+n] are
_WRITE_COEFFICIENTS = {"ghc_read_dynamic": 2, "ghc_write_read_dynamic": 3}  # output index of write_c [..., n, m]


def is_op(node, name: str) -> bool:
    """Whether ``node`` calls ``torch.ops.vwn.<name>`` (the packet or its default overload)."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return False
    packet = getattr(torch.ops.vwn, name)
    return node.target is packet or node.target is packet.default


def _op_name(node: fx.Node) -> str | None:
    return next((name for name in _GATES if is_op(node, name)), None)


def _example_value(node):
    return node.meta.get("val", node.meta.get("example_value")) if isinstance(node, fx.Node) else None


def _example_shape(node) -> tuple | None:
    shape = getattr(_example_value(node), "shape", None)
    return tuple(shape) if shape is not None else None


def gate_slot_counts(gates) -> tuple[int, int] | None:
    """``(n, m)`` of a node holding stacked gates ``[n, 2m+n]`` (from its example value, read as the ops read it:
    ``kernels.reference.gate_slots``); None when unknown or not gates."""
    val = _example_value(gates)
    if not isinstance(val, torch.Tensor):
        return None
    try:
        return gate_slots(val)
    except ValueError:
        return None


def slot_counts(node) -> tuple[int, int] | None:
    """``(n, m)`` of a node holding write coefficients ``[..., n, m]``: from its example value, else (coefficients
    a dynamic read returned) from that op's gates. None when unknown."""
    shape = _example_shape(node)
    if shape is not None:
        return tuple(shape[-2:]) if len(shape) >= 2 else None
    if isinstance(node, fx.Node) and node.op == "call_function" and node.target is operator.getitem:
        source, index = node.args
        name = _op_name(source) if isinstance(source, fx.Node) else None
        if name is not None and _WRITE_COEFFICIENTS.get(name) == index:
            return gate_slot_counts(source.args[_GATES[name]])
    return None


def _fusable_read(write: fx.Node) -> fx.Node | None:
    """The one dynamic read of ``write``'s result that can be fused with it, or None."""
    reads = [u for u in write.users if is_op(u, "ghc_read_dynamic") and u.args and u.args[0] is write]
    if len(reads) != 1:
        return None
    read = reads[0]
    if len(read.args) != _READ_ARGS or read.kwargs or write.kwargs or len(write.args) != _WRITE_ARGS:
        return None  # only the positional form the GHC modules and the block rewrite emit
    write_slots, read_slots = slot_counts(write.args[3]), gate_slot_counts(read.args[3])
    if write_slots is None or write_slots != read_slots:
        return None
    return read


def _place_fused(graph: fx.Graph, write: fx.Node, read: fx.Node) -> fx.Node | None:
    """Where the fused node goes: at the write, with the read's parameters moved up when they are bare
    ``get_attr``s (so the new state is defined where its users expect it); else at the read, provided no other
    user of the write comes before the read. None when neither works."""
    order = {node: i for i, node in enumerate(graph.nodes)}
    late = [a for a in read.all_input_nodes if a is not write and order[a] > order[write]]
    if all(a.op == "get_attr" for a in late):
        for a in late:
            write.prepend(a)
        return write
    if any(order[u] < order[read] for u in write.users if u is not read):
        return None
    return read


def _fuse_pairs(graph: fx.Graph) -> int:
    count = 0
    for write in list(graph.nodes):
        if not is_op(write, "ghc_write"):
            continue
        read = _fusable_read(write)
        anchor = _place_fused(graph, write, read) if read is not None else None
        if anchor is None:
            continue
        with graph.inserting_before(anchor):
            # named after the nodes they stand for (fx suffixes a taken name)
            fused = graph.create_node("call_function", torch.ops.vwn.ghc_write_read_dynamic.default,
                                      (*write.args, *read.args[1:]), name=f"fused_{write.name}")
            h_new = graph.create_node("call_function", operator.getitem, (fused, 0), name=write.name)
        for node in (fused, h_new):
            node.meta["vwn_pass"] = FuseWriteRead.name
        for user in list(read.users):
            if user.op == "call_function" and user.target is operator.getitem:
                user.args = (fused, user.args[1] + 1)
                user.meta["vwn_pass"] = FuseWriteRead.name
            else:  # the read's tuple used whole: rebuild it from the fused outputs
                with graph.inserting_before(user):
                    parts = [graph.call_function(operator.getitem, (fused, k)) for k in range(1, 5)]
                    whole = graph.call_function(tuple, ([*parts],))
                user.replace_input_with(read, whole)
        write.replace_all_uses_with(h_new, delete_user_cb=lambda n: n is not fused)
        graph.erase_node(read)
        graph.erase_node(write)
        count += 1
    return count


class FuseWriteRead(GraphPass):
    """``h' = ghc_write(h, z, cc, wc); read = ghc_read_dynamic(h', *params, eps)`` -> one
    ``ghc_write_read_dynamic`` (see the module docstring)."""

    name = "fuse_write_read"
    requires = ("ghc-ops",)

    def run(self, graph: fx.Graph) -> PassResult:
        count = _fuse_pairs(graph)
        return PassResult(count > 0, count)


def fuse_write_read(graph: fx.Graph, where: str = "graph") -> int:
    """:class:`FuseWriteRead` run on ``graph`` (a graph of ``torch.ops.vwn`` calls) through the pass runner.
    Returns the number of pairs fused; recompile the owning GraphModule when it is not 0."""
    (_, result), = run_passes(graph, [FuseWriteRead()], where, established=("ghc-ops",))
    return result.count
