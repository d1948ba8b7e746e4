"""Block passes: trace one residual block with its submodules as leaves, find its residual updates, and
rewrite them into GHC form.

Tracing (``trace_block``)
    ``torch.fx`` traces the block's own ``forward`` with every submodule (norms, attention, MLP, MoE) as an
    opaque leaf, so only the block-level dataflow is recorded: the norms, the sublayer calls and the residual
    adds. Hugging Face blocks take ``**kwargs``, caches and flags, which plain ``symbolic_trace`` cannot handle;
    the trace is therefore specialized to one call signature (:class:`CallSpec`): tensors and other objects
    (caches, ``(cos, sin)`` tuples) become placeholders, while ``None``, bools, numbers and strings are baked
    in. A widened block keeps one compiled graph per signature and traces a new one the first time a new
    signature arrives (training vs eval, with or without a KV cache, under gradient checkpointing), also while
    torch.compile traces the model: :class:`BlockRunner` then builds it as plain Python, without a graph break.

Matching (``find_residual_updates``)
    Starting from the stream input ``s``, a residual update is an add tree whose leaves are ``s`` once plus
    terms computed from ``s``: ``s + f(s)``, ``f(s) + s``, or parallel ``f1(s) + f2(s) + s`` (GPT-NeoX, GPT-J).
    Its branch is every node between ``s`` and the terms (usually ``f(norm(s))``; OLMo-2 style
    ``norm(f(s))`` works too). The result of the tree is the next ``s``. A stream that passes through a
    normalization after the add (post-LN, BERT-style ``norm(s + f(s))``) is refused: it is not a residual
    stream the over-width state can carry.

Rewriting (``rewrite_block_graph``), one GHC per update (parallel branches share one), into the
``torch.ops.vwn`` ops with the GHC parameters as ``get_attr`` nodes::

    before:  y = s + f(norm(s))
    after:   gates = stack_gates(vwn_ghc.i.read, vwn_ghc.i.carry, vwn_ghc.i.write)      # [n, 2m+n]
             scales = stack_gates(vwn_ghc.i.scale_read, vwn_ghc.i.scale_carry, vwn_ghc.i.scale_write)
             x, cc, wc, _ = torch.ops.vwn.ghc_read_dynamic(s, vwn_ghc.i.norm.weight, vwn_ghc.i.proj, gates, scales,
                                                           eps)
             y = torch.ops.vwn.ghc_write(s, f(norm(x)), cc, wc)

(a static GHC reads with ``ghc_read_static(s, vwn_ghc.i.read)`` and mixes with its own maps; one with
``recompute=True`` keeps its ``contract``/``expand`` methods, whose hooks drop the coefficients.) Being op calls,
the graph is then fused by the same pass the compile backend runs (``passes.fusion.FuseWriteRead``).

The rewrite changes semantics only through the GHC parameters: with the function-preserving init the block
computes, on the first ``D`` coordinates, exactly what it computed before.
"""

from __future__ import annotations

import dataclasses
import functools
import linecache
import operator
from typing import Any, Callable

import torch
import torch.fx as fx
from torch import nn

from vwn_transform.config import UnsupportedModelError
from vwn_transform.kernels.reference import stack_gates
from vwn_transform.modules import expand_stream, reduce_stream
from vwn_transform.passes.fusion import FuseWriteRead
from vwn_transform.passes.pipeline import GraphPass, PassResult, run_passes

from .probe import is_norm_module

__all__ = [
    "CallSpec",
    "ResidualUpdate",
    "trace_block",
    "find_residual_updates",
    "rewrite_block_graph",
    "lower_block_graph",
    "compile_block_graph",
    "BlockRunner",
    "GHC_CONTAINER",
]

GHC_CONTAINER = "vwn_ghc"
STREAM_EXIT = "vwn_stream_exit"  # node meta: the block's last residual write (its outgoing stream)
_CONST_TYPES = (type(None), bool, int, float, str, torch.dtype, torch.device)
_META_METHODS = {"size", "dim", "ndimension", "numel", "type", "get_device"}
_META_ATTRS = {"shape", "dtype", "device", "ndim", "is_cuda", "requires_grad"}


# ------------------------------------------------------------------------------------------------------------
# call signatures
# ------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class CallSpec:
    """One call signature of a block: which arguments are runtime values and which are baked-in constants."""

    key: tuple
    positional: tuple  # per positional arg: ("dyn", placeholder name) or ("const", value)
    keywords: tuple  # per keyword arg: (name, ("dyn", placeholder) or ("const", value))

    @staticmethod
    def from_call(block: nn.Module, args: tuple, kwargs: dict) -> tuple["CallSpec", list]:
        """Return the spec and the runtime values of its placeholders, in placeholder order."""
        key, values = CallSpec.key_and_values(block, args, kwargs)
        return CallSpec.from_key(key), values

    @staticmethod
    def key_and_values(block: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, list]:
        """The signature key of a call and its runtime values (what :meth:`from_call` computes, without building
        the spec: this is the part of a call that Dynamo traces)."""
        values: list = []
        positional = []
        for a in args:
            if isinstance(a, _CONST_TYPES):
                positional.append(("const", type(a), a))
            else:
                positional.append(("dyn",))
                values.append(a)
        keywords = []
        for name, a in kwargs.items():
            if isinstance(a, _CONST_TYPES):
                keywords.append((name, ("const", type(a), a)))
            else:
                keywords.append((name, ("dyn",)))
                values.append(a)
        return (block.training, tuple(positional), tuple(keywords)), values

    @staticmethod
    def from_key(key: tuple) -> "CallSpec":
        """The spec a key stands for (a key determines its spec: placeholders are named by position/keyword)."""
        _training, positional, keywords = key

        def entry(kind, name):
            return ("const", kind[2]) if kind[0] == "const" else ("dyn", name)

        return CallSpec(key, tuple(entry(k, f"arg{i}") for i, k in enumerate(positional)),
                        tuple((name, entry(k, f"kw_{name}")) for name, k in keywords))

    def placeholder_names(self) -> list[str]:
        names = [e[1] for e in self.positional if e[0] == "dyn"]
        return names + [e[1] for _, e in self.keywords if e[0] == "dyn"]

    def stream_placeholder(self) -> str:
        """The residual stream: the first positional argument, else the ``hidden_states`` keyword."""
        if self.positional:
            kind, name = self.positional[0]
            if kind == "dyn":
                return name
        for name, (kind, ph) in self.keywords:
            if name == "hidden_states" and kind == "dyn":
                return ph
        raise UnsupportedModelError("the block was called without a tensor first argument or hidden_states keyword")


# ------------------------------------------------------------------------------------------------------------
# tracing
# ------------------------------------------------------------------------------------------------------------
class _LeafTracer(fx.Tracer):
    """Traces a block's forward for one CallSpec with every submodule as a leaf."""

    def __init__(self, spec: CallSpec, base_forward: Callable):
        super().__init__()
        self.spec = spec
        self.base_forward = base_forward

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return m is not self.root

    def create_args_for_root(self, root_fn, is_module, concrete_args=None):
        proxies = {name: self.create_proxy("placeholder", name, (), {}) for name in self.spec.placeholder_names()}

        def value(entry):
            return proxies[entry[1]] if entry[0] == "dyn" else entry[1]

        spec, base_forward = self.spec, self.base_forward

        def traced(root):
            args = [value(e) for e in spec.positional]
            kwargs = {name: value(e) for name, e in spec.keywords}
            return base_forward(root, *args, **kwargs)

        return traced, [self.root]


def trace_block(block: nn.Module, spec: CallSpec, base_class: type | None = None) -> fx.Graph:
    """FX graph of ``block.forward`` (of ``base_class``, default the block's class) for one call signature."""
    base_forward = (base_class or type(block)).forward
    tracer = _LeafTracer(spec, base_forward)
    try:
        return tracer.trace(block)
    except UnsupportedModelError:
        raise
    except Exception as exc:
        raise UnsupportedModelError(
            f"could not trace {type(block).__name__}.forward with its submodules as leaves: "
            f"{type(exc).__name__}: {exc}"
        ) from exc


# ------------------------------------------------------------------------------------------------------------
# matching
# ------------------------------------------------------------------------------------------------------------
class NoResidualUpdateError(UnsupportedModelError):
    """A block's own code has no residual update ``s + f(s)`` (callers may diagnose why: e.g. a post-LN block)."""


@dataclasses.dataclass
class ResidualUpdate:
    """``result = stream + sum(terms)``, the terms computed by ``branch`` from ``stream``."""

    stream: fx.Node
    result: fx.Node  # top of the add tree
    tree: list[fx.Node]  # add nodes of the tree, top first
    terms: list[fx.Node]
    branch: list[fx.Node]  # nodes between stream and terms, graph order
    sublayers: tuple[str, ...]  # leaf modules called in the branch, graph order

    @property
    def parallel(self) -> bool:
        return len(self.terms) > 1

    def remapped(self, node_map: dict[fx.Node, fx.Node]) -> "ResidualUpdate":
        """The same update in a copy of its graph (``node_map``: original node -> copied node; terms that are not
        nodes, e.g. constants, stay as they are)."""
        return dataclasses.replace(
            self, stream=node_map[self.stream], result=node_map[self.result], tree=[node_map[t] for t in self.tree],
            terms=[node_map.get(t, t) if isinstance(t, fx.Node) else t for t in self.terms],
            branch=[node_map[b] for b in self.branch])


def _is_add(node: Any) -> bool:
    if not isinstance(node, fx.Node) or node.kwargs:
        return False
    if node.op == "call_function" and node.target in (operator.add, operator.iadd, torch.add):
        return len(node.args) == 2
    return node.op == "call_method" and node.target in ("add", "__add__", "add_") and len(node.args) == 2


def _tree(top: fx.Node) -> tuple[list[fx.Node], list[Any]]:
    """Add nodes (top first) and leaves of the add tree rooted at ``top``; inner adds must have one user."""
    nodes, leaves = [], []

    def visit(node):
        nodes.append(node)
        for a in node.args:
            if _is_add(a) and len(a.users) == 1:
                visit(a)
            else:
                leaves.append(a)

    visit(top)
    return nodes, leaves


def _ancestors(nodes) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    stack = [n for n in nodes if isinstance(n, fx.Node)]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return seen


def _descendants(node: fx.Node, stop: set[fx.Node]) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    stack = [u for u in node.users if u not in stop]
    while stack:
        n = stack.pop()
        if n in seen or n in stop:
            continue
        seen.add(n)
        stack.extend(n.users)
    return seen


def _describe(node: fx.Node) -> str:
    if node.op == "call_module":
        return f"submodule {node.target!r}"
    if node.op == "call_function":
        return f"function {getattr(node.target, '__name__', node.target)}"
    return f"{node.op} {node.target}"


def _is_meta_use(node: fx.Node) -> bool:
    if node.op == "call_method" and node.target in _META_METHODS:
        return True
    return node.op == "call_function" and node.target is getattr and len(node.args) > 1 and node.args[1] in _META_ATTRS


def find_residual_updates(graph: fx.Graph, block: nn.Module, stream_name: str, where: str) -> list[ResidualUpdate]:
    """Match the chain of residual updates starting at placeholder ``stream_name`` (see module docstring)."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    stream = next((n for n in graph.nodes if n.op == "placeholder" and n.target == stream_name), None)
    if stream is None:
        raise UnsupportedModelError(f"{where}: no stream placeholder {stream_name!r} in the traced graph")
    updates: list[ResidualUpdate] = []
    widths = {stream}  # the stream and its width-preserving reshapes
    while True:
        found = None
        alias = _single_alias(stream, widths)
        if alias is not None:  # e.g. OPT: hidden_states.reshape(-1, hidden_states.size(-1))
            stream = alias
            widths.add(alias)
            continue
        for user in list(stream.users):
            if not _is_add(user):
                continue
            top = user
            while len(top.users) == 1 and _is_add(next(iter(top.users))):
                top = next(iter(top.users))
            tree, leaves = _tree(top)
            if sum(1 for leaf in leaves if leaf is stream) != 1:
                continue
            terms = [leaf for leaf in leaves if leaf is not stream]
            term_ancestors = _ancestors(terms)
            if not terms or stream not in term_ancestors:
                continue
            branch = (_descendants(stream, set(tree)) & term_ancestors) | {t for t in terms if isinstance(t, fx.Node)}
            found = (top, tree, terms, branch)
            break
        if found is None:
            break
        top, tree, terms, branch = found
        for user in stream.users:
            if user in tree or user in branch or _is_meta_use(user):
                continue
            raise UnsupportedModelError(
                f"{where}: the residual stream is used by {_describe(user)} outside the residual update "
                f"{_describe(top)}; expected it to feed only the sublayer branch and the add"
            )
        branch_nodes = sorted(branch, key=order.__getitem__)
        sublayers = tuple(n.target for n in branch_nodes if n.op == "call_module")
        updates.append(ResidualUpdate(stream, top, tree, terms, branch_nodes, sublayers))
        stream = top
        widths.add(top)
    if not updates:
        adds = [n for n in graph.nodes if _is_add(n)]
        children = [name for name, _ in block.named_children()]
        raise NoResidualUpdateError(
            f"{where}: expected residual updates s + f(s) in the block's own code (pre-norm: s + f(norm(s))); "
            f"found none ({len(adds)} add(s) in the block's code, none adds the stream to a function of itself). "
            f"A residual add hidden inside a submodule ({', '.join(children)}) cannot be rewritten"
        )
    for user in stream.users:
        if user.op == "output" or _is_meta_use(user):
            continue
        if user.op == "call_module" and is_norm_module(block.get_submodule(user.target)):
            raise UnsupportedModelError(
                f"{where}: the block's residual sum goes through {_describe(user)} (a post-LN block, "
                "norm(s + f(s))); expected pre-norm residual blocks s + f(norm(s))"
            )
        raise UnsupportedModelError(
            f"{where}: after its last residual update the stream is used by {_describe(user)} before the block "
            "returns; expected the block to return the residual sum"
        )
    return updates


_ALIAS_METHODS = {"contiguous", "clone", "float", "to", "type_as"}
_RESHAPE_METHODS = {"reshape", "view"}


def _keeps_width(node: fx.Node, widths: set[fx.Node]) -> bool:
    """Whether ``node`` re-shapes/re-types a stream node and keeps its last dimension."""
    if node.op != "call_method" or not node.args or node.args[0] not in widths:
        return False
    if node.target in _ALIAS_METHODS:
        return True
    if node.target not in _RESHAPE_METHODS:
        return False
    shape = node.args[1:]
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = tuple(shape[0])
    if len(shape) == 1 and isinstance(shape[0], fx.Node):  # x.view(s.shape): the full shape of a stream node
        src = shape[0]
        return src.op == "call_function" and src.target is getattr and src.args[0] in widths
    last = shape[-1] if shape else None
    if not isinstance(last, fx.Node):
        return False
    if last.op == "call_method" and last.target == "size" and last.args[0] in widths:  # x.size(-1)
        return tuple(last.args[1:]) == (-1,)
    return False


def _single_alias(stream: fx.Node, widths: set[fx.Node]) -> fx.Node | None:
    """The one width-preserving reshape the stream flows into, when that is its only real (non-shape) use."""
    real = [u for u in stream.users if not _is_meta_use(u)]
    if len(real) == 1 and _keeps_width(real[0], widths):
        return real[0]
    return None


# ------------------------------------------------------------------------------------------------------------
# rewriting and compiling
# ------------------------------------------------------------------------------------------------------------
def _parameter(graph: fx.Graph, ghc: nn.Module, index: int, name: str) -> fx.Node:
    """``get_attr`` of GHC ``index``'s parameter ``name``, with its shape as the example value (what
    :func:`fusion.slot_counts` reads)."""
    node = graph.get_attr(f"{GHC_CONTAINER}.{index}.{name}")
    param = functools.reduce(getattr, name.split("."), ghc)  # attribute access: also through wrappers (PEFT)
    node.meta["val"] = torch.empty(param.shape, device="meta")
    return node


def _stacked_gates(graph: fx.Graph, ghc: nn.Module, index: int, names: tuple[str, str, str]) -> fx.Node:
    """``stack_gates`` of three parameters of GHC ``index`` (``[n, 2m+n]``, its shape as the example value)."""
    read, carry, write = (_parameter(graph, ghc, index, name) for name in names)
    node = graph.create_node("call_function", stack_gates, (read, carry, write), name=f"{names[0]}_gates_{index}")
    n, m = read.meta["val"].shape
    node.meta["val"] = torch.empty((n, 2 * m + n), device="meta")
    return node


def _emit_read(graph: fx.Graph, ghc: nn.Module, index: int, stream: fx.Node) -> tuple[fx.Node, ...]:
    """The read of GHC ``index`` on ``stream``: ``(x, carry_c, write_c)`` and every node it created last.

    A dynamic GHC is ``torch.ops.vwn.ghc_read_dynamic`` on its parameters, a static one ``ghc_read_static`` with its
    maps as the coefficients; a GHC with ``recompute=True`` keeps its ``contract`` method, whose saved-tensor hooks
    (eager) or checkpoint region (compiled) do the recomputation."""
    i = index
    if getattr(ghc, "recompute", False):
        module = graph.get_attr(f"{GHC_CONTAINER}.{i}")
        read = graph.create_node("call_method", "contract", (module, stream), name=f"ghc_in_{i}")
    elif ghc.dynamic:
        gain, proj = (_parameter(graph, ghc, i, name) for name in ("norm.weight", "proj"))
        maps, gate_scales = ("read", "carry", "write"), ("scale_read", "scale_carry", "scale_write")
        gates, scales = (_stacked_gates(graph, ghc, i, names) for names in (maps, gate_scales))
        read = graph.create_node("call_function", torch.ops.vwn.ghc_read_dynamic.default,
                                 (stream, gain, proj, gates, scales, float(ghc.eps)), name=f"ghc_in_{i}")
    else:
        x = graph.create_node("call_function", torch.ops.vwn.ghc_read_static.default,
                              (stream, _parameter(graph, ghc, i, "read")), name=f"x_{i}")
        carry_c = _parameter(graph, ghc, i, "carry")
        write_c = graph.create_node("call_method", "t", (_parameter(graph, ghc, i, "write"),), name=f"write_c_{i}")
        return x, carry_c, write_c
    x = graph.create_node("call_function", operator.getitem, (read, 0), name=f"x_{i}")
    carry_c = graph.create_node("call_function", operator.getitem, (read, 1), name=f"carry_c_{i}")
    write_c = graph.create_node("call_function", operator.getitem, (read, 2), name=f"write_c_{i}")
    return x, carry_c, write_c


def _emit_write(graph: fx.Graph, ghc: nn.Module, index: int, stream: fx.Node, z: fx.Node, carry_c: fx.Node,
                write_c: fx.Node) -> fx.Node:
    """GHC ``index``'s write of the sublayer output ``z`` into ``stream``: ``torch.ops.vwn.ghc_write`` (the
    ``expand`` method for a GHC that recomputes its coefficients: its hooks drop them)."""
    if getattr(ghc, "recompute", False):
        module = graph.get_attr(f"{GHC_CONTAINER}.{index}")
        return graph.create_node("call_method", "expand", (module, stream, z, carry_c, write_c), name=f"h_{index}")
    return graph.create_node("call_function", torch.ops.vwn.ghc_write.default, (stream, z, carry_c, write_c),
                             name=f"h_{index}")


def rewrite_block_graph(graph: fx.Graph, updates: list[ResidualUpdate], ghcs) -> fx.Graph:
    """Replace update i by the GHC ops of ``ghcs[i]`` (module ``vwn_ghc.i`` of the block): its read before the
    branch, its write instead of the add (see the module docstring). ``ghcs`` are the GHC modules the block will
    hold (their kind, dynamic / static / recompute, and ``eps`` are baked into the graph)."""
    ghcs = list(ghcs)
    if len(ghcs) != len(updates):
        raise ValueError(f"rewrite_block_graph: {len(updates)} residual updates but {len(ghcs)} GHC modules")
    replaced: dict[fx.Node, fx.Node] = {}  # erased add-tree tops -> the write nodes standing in for them
    for i, (upd, ghc) in enumerate(zip(updates, ghcs)):
        stream = replaced.get(upd.stream, upd.stream)
        before = set(graph.nodes)
        with graph.inserting_before(upd.branch[0]):
            x, carry_c, write_c = _emit_read(graph, ghc, i, stream)
        for node in upd.branch:
            if stream in node.all_input_nodes:
                node.replace_input_with(stream, x)
        with graph.inserting_before(upd.result):
            z = upd.terms[0]
            for term in upd.terms[1:]:
                z = graph.call_function(operator.add, (z, term))
            new_stream = _emit_write(graph, ghc, i, stream, z, carry_c, write_c)
        for node in set(graph.nodes) - before:
            node.meta["vwn_pass"] = "rewrite_block_graph"
        upd.result.replace_all_uses_with(new_stream)
        for node in upd.tree:
            graph.erase_node(node)
        replaced[upd.result] = new_stream
    if updates:
        replaced[updates[-1].result].meta[STREAM_EXIT] = True  # where the block's stream leaves it
    graph.lint()
    return graph


class RewriteResidualUpdates(GraphPass):
    """:func:`rewrite_block_graph` as a pass: every residual update becomes the GHC read and write ops."""

    name = "rewrite_block_graph"
    requires = ("residual-updates",)
    ensures = ("ghc-ops",)

    def __init__(self, updates: list[ResidualUpdate], ghcs):
        self.updates, self.ghcs = updates, list(ghcs)

    def run(self, graph: fx.Graph) -> PassResult:
        rewrite_block_graph(graph, self.updates, self.ghcs)
        return PassResult(bool(self.updates), len(self.updates))


class ExpandStreamEntry(GraphPass):
    """The first block of a model whose stream does not start at token tables: its incoming stream ``[..., D]`` is
    widened to ``[..., D']`` by ``expand_stream(s, vwn_expand)`` before anything in the block uses it (the block's
    parameter ``vwn_expand`` ``[D', D]``)."""

    name = "expand_stream_entry"
    requires = ("ghc-ops",)

    def __init__(self, stream_name: str):
        self.stream_name = stream_name

    def run(self, graph: fx.Graph) -> PassResult:
        stream = next((n for n in graph.nodes if n.op == "placeholder" and n.target == self.stream_name), None)
        if stream is None:
            raise UnsupportedModelError(f"no stream placeholder {self.stream_name!r} to widen")
        first = next(n for n in graph.nodes if n.op != "placeholder")
        with graph.inserting_before(first):
            weight = graph.get_attr(ENTRY_EXPAND)
            wide = graph.create_node("call_function", expand_stream, (stream, weight), name="stream_in")
        stream.replace_all_uses_with(wide, delete_user_cb=lambda n: n is not wide)
        for node in (weight, wide):
            node.meta["vwn_pass"] = self.name
        return PassResult(True, 1)


class ReduceStreamExit(GraphPass):
    """The last block of a model whose stream does not end in a norm or a linear head: its outgoing stream is
    reduced to ``[..., D]`` by ``reduce_stream(h, vwn_reduce, vwn_group_norm_weight, vwn_group_size)`` (the block's
    parameters), so whatever consumes it (a pooler, several heads, the caller) sees the width it saw before."""

    name = "reduce_stream_exit"
    requires = ("ghc-ops",)

    def __init__(self, group_size: int):
        self.group_size = group_size

    def run(self, graph: fx.Graph) -> PassResult:
        exits = [n for n in graph.nodes if n.meta.get(STREAM_EXIT)]
        if len(exits) != 1:
            raise UnsupportedModelError(f"expected one outgoing residual stream in the block, found {len(exits)}")
        (out,) = exits
        with graph.inserting_after(out):
            reduce = graph.get_attr(EXIT_REDUCE)
        with graph.inserting_after(reduce):
            gain = graph.get_attr(EXIT_GROUP_NORM)
        with graph.inserting_after(gain):
            narrow = graph.create_node("call_function", reduce_stream, (out, reduce, gain, self.group_size),
                                       name="stream_out")
        out.replace_all_uses_with(narrow, delete_user_cb=lambda n: n is not narrow)
        for node in (reduce, gain, narrow):
            node.meta["vwn_pass"] = self.name
        return PassResult(True, 1)


ENTRY_EXPAND = "vwn_expand"  # parameter of the first block when the stream is widened at its input
EXIT_REDUCE, EXIT_GROUP_NORM = "vwn_reduce", "vwn_group_norm_weight"  # of the last block when reduced at its exit


def lower_block_graph(graph: fx.Graph, updates: list[ResidualUpdate], ghcs, name: str, *,
                      stream_entry: str | None = None, exit_group_size: int | None = None) -> tuple[Callable, str]:
    """The passes from a traced block to its widened forward (:func:`run_passes`: rewrite into the GHC ops of
    ``ghcs``, fuse neighbouring write/read pairs with the pass the compile backend also runs; for the first block
    of a stream widened at its input, ``stream_entry`` names the stream placeholder to expand; for the last block of
    a stream reduced at its exit, ``exit_group_size`` is the reduce's group size), then Python generated from the
    graph. Returns ``(forward, source)``."""
    passes: list[GraphPass] = [RewriteResidualUpdates(updates, ghcs), FuseWriteRead()]
    if stream_entry is not None:
        passes.append(ExpandStreamEntry(stream_entry))
    if exit_group_size is not None:
        passes.append(ReduceStreamExit(exit_group_size))
    run_passes(graph, passes, f"block {name}", established=("residual-updates",))
    return compile_block_graph(graph, name)


def compile_block_graph(graph: fx.Graph, name: str) -> tuple[Callable, str]:
    """Python function ``forward(self, *placeholders)`` generated from the graph, and its source."""
    code = graph.python_code(root_module="self")
    filename = f"<vwn block {name}>"
    globals_ = dict(code.globals)
    exec(compile(code.src, filename, "exec"), globals_)
    linecache.cache[filename] = (len(code.src), None, code.src.splitlines(True), filename)
    return globals_["forward"], code.src


class BlockRunner:
    """Runs a widened block: picks (or builds, once per new call signature) the rewritten graph and calls it.

    Holds no reference to the block (it receives it as ``self``), so deepcopy of a model copies it cheaply.

    Under torch.compile the signature lookup, and the build on a miss, run as plain Python while Dynamo traces
    (``WidenedBlockMixin._vwn_graph_name`` in ``vwn_transform.modules``), so a signature first met under compile
    (train mode, gradient checkpointing, an attention mask that is a tensor under compile and None in eager, ...)
    costs no graph break.
    """

    def __init__(self, name: str, sublayers: list[tuple[str, ...]], expand_input: bool = False,
                 reduce_output_group: int | None = None):
        self.name = name
        self.sublayers = [tuple(s) for s in sublayers]
        self.expand_input = expand_input  # the first block of a stream widened at its input
        self.reduce_output_group = reduce_output_group  # the last block of a stream reduced at its exit
        self._compiled: dict[tuple, Callable] = {}
        self.sources: dict[tuple, str] = {}
        self._names: dict[tuple, str] = {}  # key -> the attribute of this runner that holds its forward

    def build(self, block: nn.Module, spec: CallSpec, base_class: type) -> Callable:
        where = f"{self.name} ({base_class.__name__})"
        graph = trace_block(block, spec, base_class)
        updates = find_residual_updates(graph, block, spec.stream_placeholder(), where)
        found = [u.sublayers for u in updates]
        if found != self.sublayers:
            raise RuntimeError(
                f"{where}: a call with a new signature traced to residual updates {found}, but the block was widened "
                f"with {self.sublayers}; the block's structure depends on its arguments, which VWN cannot follow"
            )
        fn, src = lower_block_graph(graph, updates, getattr(block, GHC_CONTAINER), self.name,
                                    stream_entry=spec.stream_placeholder() if self.expand_input else None,
                                    exit_group_size=self.reduce_output_group)
        self.install(spec.key, fn, src)
        return fn

    def install(self, key: tuple, fn: Callable, source: str) -> None:
        """Use ``fn`` (generated from ``source``) for calls with signature ``key``."""
        self._compiled[key] = fn
        self.sources[key] = source

    def graph_for(self, block: nn.Module, key: tuple) -> Callable:
        """The rewritten forward for signature ``key``, built (traced and lowered) on first use."""
        fn = self._compiled.get(key)
        if fn is None:
            fn = self.build(block, CallSpec.from_key(key), type(block).vwn_base_class)
        return fn

    def graph_name(self, block: nn.Module, key: tuple) -> str:
        """The name of the attribute of this runner that holds ``graph_for(block, key)``."""
        fn = self.graph_for(block, key)
        name = self._names.get(key)
        if name is None:
            name = self._names[key] = f"graph_{len(self._names)}"
        self.__dict__[name] = fn  # a plain function in the instance dict: not bound, called as fn(block, ...)
        return name

    def __call__(self, block: nn.Module, args: tuple, kwargs: dict):
        key, values = CallSpec.key_and_values(block, args, kwargs)
        # block._vwn_graph_name(key) is runner.graph_name(block, key), run as plain Python under torch.compile
        return getattr(self, block._vwn_graph_name(key))(block, *values)

    def __getstate__(self):
        # generated functions are rebuilt on first use after unpickling
        return {"name": self.name, "sublayers": self.sublayers, "expand_input": self.expand_input,
                "reduce_output_group": self.reduce_output_group, "_compiled": {}, "sources": {}, "_names": {}}

    def __setstate__(self, state):
        self.__dict__.update({"_names": {}, "expand_input": False, "reduce_output_group": None, **state})

    def __deepcopy__(self, memo):
        clone = BlockRunner(self.name, self.sublayers, self.expand_input, self.reduce_output_group)
        clone._compiled = dict(self._compiled)
        clone.sources = dict(self.sources)
        return clone
