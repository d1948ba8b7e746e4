"""Capture pass: one instrumented forward on a short example finds the model-level structure.

What it records (nothing in the model is changed; hooks are removed and training flags restored):

* **blocks**: the children of one ``nn.ModuleList``/``nn.Sequential`` called in a chain, where the stream
  tensor returned by block i is the tensor given to block i+1. Their call arguments seed the block traces.
* **embeddings**: the modules whose outputs the stream entering block 0 is computed from. Every module with
  parameters that runs before block 0 has its output replaced by a fresh autograd leaf; walking the autograd
  graph of block 0's input back to those leaves gives the exact dataflow (token + position + type embeddings,
  scaling, dropout), whatever the model-level Python code does. When they are all ``nn.Embedding`` tables of the
  stream width, widen() widens their rows (``entry = "embeddings"``); otherwise (patch embeddings, feature
  projections, CLS/register tokens concatenated, ...) the stream is widened at the input of block 0
  (``entry = "block"``), where it first has its ``[..., D]`` form.
* **final**: the first module with parameters called on the last block's output. A final norm or a linear head
  takes the reduce before its own forward; anything else (a pooler, several heads, nothing: the stream is the
  model's output) gets the reduce at the exit of the last block (``final_kind = "block"``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from vwn_transform.config import UnsupportedModelError

__all__ = [
    "ModelStructure", "BlockCall", "ExampleInputs", "check_stream_ends", "default_example_inputs", "diagnose_post_ln",
    "is_norm_module", "primary_output", "probe_model", "run_quietly",
]


@dataclasses.dataclass(frozen=True)
class ExampleInputs:
    """The inputs of the probe forward: ``model(*args, **kwargs)``. Built from what users pass as ``example_inputs``:
    a tensor, a tuple/list of positional inputs, or a dict of keyword inputs (``{"pixel_values": x}``)."""

    args: tuple = ()
    kwargs: dict = dataclasses.field(default_factory=dict)

    @staticmethod
    def of(value) -> "ExampleInputs":
        if isinstance(value, ExampleInputs):
            return value
        if isinstance(value, dict):
            bad = [k for k in value if not isinstance(k, str)]
            if bad:
                raise TypeError(f"example_inputs as a dict must map keyword names (str) to values, got keys {bad}")
            return ExampleInputs((), dict(value))
        if isinstance(value, (tuple, list)):
            return ExampleInputs(tuple(value), {})
        return ExampleInputs((value,), {})

    def __call__(self, model: nn.Module) -> Any:
        return model(*self.args, **self.kwargs)

    def describe(self) -> str:
        def one(v):
            return f"tensor{list(v.shape)} {str(v.dtype).replace('torch.', '')}" if isinstance(v, torch.Tensor) \
                else type(v).__name__
        parts = [one(v) for v in self.args] + [f"{k}={one(v)}" for k, v in self.kwargs.items()]
        return "(" + ", ".join(parts) + ")"

    def to_spec(self) -> dict | None:
        """A JSON-able description (shapes and dtypes of tensors, plain values as they are) from which
        :meth:`from_spec` rebuilds inputs of the same form; None when a value cannot be described."""
        def one(v):
            if isinstance(v, torch.Tensor):
                return {"tensor": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")}
            if v is None or isinstance(v, (bool, int, float, str)):
                return {"value": v}
            raise TypeError(type(v).__name__)
        try:
            return {"args": [one(v) for v in self.args], "kwargs": {k: one(v) for k, v in self.kwargs.items()}}
        except TypeError:
            return None

    @staticmethod
    def from_spec(spec: dict, device: torch.device | str = "cpu") -> "ExampleInputs":
        """Inputs of the form :meth:`to_spec` recorded: floating tensors drawn from a fixed generator, integer and
        bool tensors all ones (valid token ids and attention masks), plain values as recorded."""
        gen = torch.Generator().manual_seed(0)

        def one(entry):
            if "tensor" not in entry:
                return entry["value"]
            dtype = getattr(torch, entry["dtype"])
            shape = entry["tensor"]
            if dtype.is_floating_point:
                return torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
            return torch.ones(shape, dtype=dtype, device=device)
        return ExampleInputs(tuple(one(e) for e in spec.get("args", [])),
                             {k: one(e) for k, e in spec.get("kwargs", {}).items()})


@dataclasses.dataclass
class BlockCall:
    name: str
    module: nn.Module
    args: tuple
    kwargs: dict


@dataclasses.dataclass
class ModelStructure:
    hidden_size: int
    container: str
    blocks: list[BlockCall]
    embeddings: list[str]
    final: str
    final_kind: str  # "norm", "head", or "block": the reduce goes into the last block (the stream's exit)
    head: str | None
    example_inputs: ExampleInputs
    reference_output: torch.Tensor | None  # the model's primary output on example_inputs
    problem: str | None = None  # why the stream's end could not be placed (raised by check_stream_ends)
    entry: str = "embeddings"  # "embeddings": token tables widened; "block": widened at the input of block 0

    @property
    def first_block(self) -> str:
        return self.blocks[0].name

    @property
    def last_block(self) -> str:
        return self.blocks[-1].name


def is_norm_module(module: nn.Module) -> bool:
    """Normalization modules: torch's own, and any class whose name says Norm (LlamaRMSNorm, T5LayerNorm, ...)."""
    if isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)):
        return True
    return "norm" in type(module).__name__.lower()


def _first_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    if hasattr(value, "last_hidden_state"):  # HF ModelOutput
        return value.last_hidden_state
    return None


def _stream_arg(args: tuple, kwargs: dict) -> torch.Tensor | None:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    hs = kwargs.get("hidden_states")
    if isinstance(hs, torch.Tensor):
        return hs
    for v in list(args) + list(kwargs.values()):
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            return v
    return None


def primary_output(out: Any) -> torch.Tensor | None:
    """The tensor a model's output is judged by: ``logits`` for HF outputs, else the first tensor."""
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    return _first_tensor(out)


def _restore_training(model: nn.Module):
    flags = {mod: mod.training for mod in model.modules()}

    def restore():
        for mod, flag in flags.items():
            mod.training = flag

    return restore


def run_quietly(model: nn.Module, example_inputs: ExampleInputs) -> Any:
    """Forward in eval mode without grad; training flags are restored afterwards."""
    restore = _restore_training(model)
    try:
        model.eval()
        with torch.no_grad():
            return example_inputs(model)
    finally:
        restore()


def default_example_inputs(model: nn.Module, seq_len: int = 8) -> ExampleInputs:
    """A token batch ``[1, seq_len]`` for models fed with token ids (first nn.Embedding gives vocab and device)."""
    emb = None
    getter = getattr(model, "get_input_embeddings", None)
    if callable(getter):
        try:
            emb = getter()
        except (NotImplementedError, AttributeError):
            emb = None
    if not isinstance(emb, nn.Embedding):
        emb = next((mod for mod in model.modules() if isinstance(mod, nn.Embedding)), None)
    if emb is None:
        raise UnsupportedModelError(
            f"cannot build example inputs for {type(model).__name__}: expected a token model with an nn.Embedding, "
            "found none; pass example_inputs= to widen()/plan(): the positional inputs (a tensor or a tuple) or the "
            "keyword inputs as a dict, e.g. {'pixel_values': torch.randn(1, 3, 224, 224)}"
        )
    ids = (torch.arange(seq_len, device=emb.weight.device) * 7 + 1) % emb.num_embeddings  # [seq]
    return ExampleInputs((ids.unsqueeze(0),))  # [1, seq]


def probe_model(model: nn.Module, example_inputs=None) -> ModelStructure:
    """Run one forward with hooks and return the model-level structure (see module docstring)."""
    example_inputs = default_example_inputs(model) if example_inputs is None else ExampleInputs.of(example_inputs)
    trace = _record_forward(model, example_inputs)
    calls = trace.calls
    blocks = _find_block_chain(model, calls, trace.outputs, trace.containers)
    first_idx = blocks[0][0]
    stream_in = _stream_arg(calls[first_idx][2], calls[first_idx][3])
    hidden = stream_in.shape[-1]
    module_order = {name: i for i, name in enumerate(trace.names.values())}
    embeddings = sorted(_find_embeddings(stream_in, trace.leaves), key=lambda n: module_order.get(n, 0))
    entry = _stream_entry(model, embeddings, hidden)
    final_name, final_kind, head, problem = _stream_end(trace, blocks, hidden)
    problem = problem or _other_stream_widths(model, trace, blocks, hidden)
    out = primary_output(trace.output)
    return ModelStructure(
        hidden_size=hidden,
        container=blocks[0][1].rsplit(".", 1)[0] if "." in blocks[0][1] else "",
        blocks=[BlockCall(name, calls[i][1], calls[i][2], calls[i][3]) for i, name in blocks],
        embeddings=embeddings,
        final=final_name,
        final_kind=final_kind,
        head=head,
        example_inputs=example_inputs,
        reference_output=None if out is None else out.detach(),
        problem=problem,
        entry=entry,
    )


def _stream_entry(model: nn.Module, embeddings: list[str], hidden: int) -> str:
    """Where the stream is widened: ``"embeddings"`` when it is computed only from ``nn.Embedding`` tables of the
    stream width (their rows gain the extra slots), else ``"block"``: at the input of the first block, where the
    stream first has its ``[..., D]`` form (patch embeddings, feature projections, concatenated CLS tokens...)."""
    if embeddings and all(isinstance(mod, nn.Embedding) and mod.embedding_dim == hidden
                          for mod in map(model.get_submodule, embeddings)):
        return "embeddings"
    return "block"


def _other_stream_widths(model: nn.Module, trace: "_ForwardTrace", blocks: list[tuple[int, str]],
                         hidden: int) -> str | None:
    """A problem when blocks of another container carry a stream of another width (Swin-style stages joined by
    patch merging): VWN widens one residual stream of constant width, and widening one stage alone is not what a
    user asks for."""
    stack = blocks[0][1].rsplit(".", 1)[0] if "." in blocks[0][1] else ""
    for cname, container in trace.containers.items():
        if not stack or cname == stack or cname.startswith(stack + "."):
            continue  # the stack itself, and containers inside its blocks (MoE experts, ...)
        children = {id(c) for c in container.children()}
        for i, (name, mod, args, kwargs) in enumerate(trace.calls):
            if id(mod) not in children or not _holds_norm(mod):
                continue
            inp, out = _stream_arg(args, kwargs), _first_tensor(trace.outputs.get(i))
            if inp is not None and out is not None and inp.shape == out.shape and inp.dim() >= 2 and \
                    inp.shape[-1] != hidden and inp.is_floating_point():
                return (f"{type(model).__name__} has residual blocks of width {inp.shape[-1]} ({name}) besides the "
                        f"stack of width {hidden} ({blocks[0][1]} ...): the stream changes width between stages "
                        "(e.g. Swin's patch merging); VWN widens one residual stream of constant width")
    return None


@dataclasses.dataclass
class _ForwardTrace:
    """One hooked forward: every module call in pre-hook order ``(name, module, args, kwargs)``, the outputs by call
    index, the autograd leaves cut before the first block (``id(leaf) -> module name``), the block containers and
    the model's module names, and the model's output. ``leaf_tensors`` keeps the leaves alive: ``leaves`` is keyed
    by their ids."""

    calls: list[tuple[str, nn.Module, tuple, dict]]
    outputs: dict[int, Any]
    leaves: dict[int, str]
    leaf_tensors: list[torch.Tensor]
    containers: dict[str, nn.Module]
    names: dict[nn.Module, str]
    output: Any


def _record_forward(model: nn.Module, example_inputs: ExampleInputs) -> _ForwardTrace:
    """Run the model once in eval mode with a pre- and post-hook on every module (restoring its training flags and
    removing the hooks afterwards). Before the first block, the output of every module that owns parameters
    becomes an autograd leaf, so the walk back from block 0's input stops at the modules it is computed from."""
    names = {mod: name for name, mod in model.named_modules(remove_duplicate=False)}
    calls: list[tuple[str, nn.Module, tuple, dict]] = []  # pre-hook order
    outputs: dict[int, Any] = {}  # index in calls -> output
    leaves: dict[int, str] = {}  # id(autograd leaf) -> module name
    leaf_tensors: list[torch.Tensor] = []
    first_block_seen = [False]
    containers = {
        name: mod for name, mod in model.named_modules() if isinstance(mod, (nn.ModuleList, nn.Sequential))
    }
    container_children = {id(child): cname for cname, c in containers.items() for child in c.children()}

    def pre_hook(mod, args, kwargs):
        calls.append((names.get(mod, "?"), mod, args, kwargs))
        if id(mod) in container_children:
            first_block_seen[0] = True
        mod._vwn_probe_index = len(calls) - 1

    def post_hook(mod, args, kwargs, out):
        idx = mod.__dict__.pop("_vwn_probe_index", None)
        if idx is not None:
            outputs[idx] = out
        if not first_block_seen[0] and isinstance(out, torch.Tensor) and out.is_floating_point() and \
                any(True for _ in mod.parameters(recurse=False)):
            leaf = out.detach().requires_grad_(True)
            leaves[id(leaf)] = names.get(mod, "?")
            leaf_tensors.append(leaf)
            return leaf
        return out

    handles = []
    restore = _restore_training(model)
    try:
        for mod in model.modules():
            handles.append(mod.register_forward_pre_hook(pre_hook, with_kwargs=True))
            handles.append(mod.register_forward_hook(post_hook, with_kwargs=True))
        model.eval()  # no dropout, no RNG use, no running-stat updates
        with torch.enable_grad():
            try:
                out = example_inputs(model)
            except Exception as exc:  # the user's forward failed on our example: say which input we used
                raise UnsupportedModelError(
                    f"the probe forward of {type(model).__name__} on example inputs {example_inputs.describe()} "
                    f"failed with {type(exc).__name__}: {exc}; pass example_inputs= that the model's forward accepts "
                    "(positional inputs as a tensor or tuple, keyword inputs as a dict)"
                ) from exc
    finally:
        for h in handles:
            h.remove()
        restore()
        for mod in model.modules():
            mod.__dict__.pop("_vwn_probe_index", None)
    return _ForwardTrace(calls, outputs, leaves, leaf_tensors, containers, names, out)


def _stream_end(trace: _ForwardTrace, blocks: list[tuple[int, str]], hidden: int):
    """Where the residual stream leaves the block stack: ``(final module name, "norm" | "head" | "block", the head's
    name or None, the problem or None)``. The first module with parameters after the last block whose input is the
    last block's output is the final module: a norm or a ``hidden``-wide linear head takes the reduce before its
    own forward; anything else (a pooler, several heads, the model's output itself) gets the reduce at the exit of
    the last block (``"block"``), so whatever consumes the stream sees width D. The head is the first
    ``hidden``-wide linear after a final norm."""
    calls = trace.calls
    last_idx = blocks[-1][0]
    block_names = {name for _, name in blocks}
    final_idx = None
    last_out = _first_tensor(trace.outputs.get(last_idx))
    for i in range(last_idx + 1, len(calls)):
        name, mod, args, kwargs = calls[i]
        if any(name == b or name.startswith(b + ".") for b in block_names):
            continue
        if not any(True for _ in mod.parameters(recurse=True)):
            continue
        inp = _stream_arg(args, kwargs)
        if inp is not None and last_out is not None and inp.shape[-1] == hidden and \
                inp.data_ptr() == last_out.data_ptr():
            final_idx = i
            break
    if final_idx is None or _stream_arg(calls[final_idx][2], calls[final_idx][3]).shape != last_out.shape or \
            _holds(trace.output, last_out):
        # no single module takes the whole stream (nothing does, a pooler takes a slice, or the model also returns
        # the stream itself): the reduce goes to the exit of the last block
        return blocks[-1][1], "block", None, None
    final_name, final_mod = calls[final_idx][0], calls[final_idx][1]
    if is_norm_module(final_mod):
        final_kind = "norm"
    elif isinstance(final_mod, nn.Linear) and final_mod.in_features == hidden:
        final_kind = "head"
    else:
        return blocks[-1][1], "block", None, None
    head = None
    for i in range(final_idx + (1 if final_kind == "norm" else 0), len(calls)):
        name, mod = calls[i][0], calls[i][1]
        if isinstance(mod, nn.Linear) and mod.in_features == hidden:
            head = name
            break
    return final_name, final_kind, head, None


def _holds(value: Any, tensor: torch.Tensor, depth: int = 0) -> bool:
    """Whether ``value`` (a model's output: a tensor, a tuple/list/dict or a Hugging Face ModelOutput) contains
    ``tensor`` itself."""
    if value is tensor:
        return True
    if depth > 4:
        return False
    if isinstance(value, dict):  # ModelOutput is an OrderedDict
        return any(_holds(v, tensor, depth + 1) for v in value.values())
    if isinstance(value, (tuple, list)):
        return any(_holds(v, tensor, depth + 1) for v in value)
    return False


def check_stream_ends(model: nn.Module, structure: ModelStructure) -> None:
    """Raise the problem the probe found with the stream (blocks of another width: checked before the blocks are
    traced, as the more fundamental reason)."""
    if structure.problem:
        raise UnsupportedModelError(structure.problem)


def diagnose_post_ln(block: nn.Module, args: tuple, kwargs: dict) -> str | None:
    """Find a BERT-style post-LN sum inside ``block`` numerically: a norm whose input is ``s + M(...)`` for the
    block input ``s`` and the output of some submodule ``M``. Used only to explain a refusal."""
    stream = _stream_arg(args, kwargs)
    if stream is None:
        return None
    seen: list[tuple[str, nn.Module, Any, Any]] = []
    handles = [
        mod.register_forward_hook(lambda mod, a, k, out, name=name: seen.append((name, mod, a, out)), with_kwargs=True)
        for name, mod in block.named_modules() if mod is not block
    ]
    restore = _restore_training(block)
    try:
        block.eval()
        with torch.no_grad():
            block(*args, **kwargs)
    except Exception:
        return None
    finally:
        for h in handles:
            h.remove()
        restore()
    outputs = [(name, _first_tensor(out)) for name, _, _, out in seen]
    for name, mod, a, _ in seen:
        x = _first_tensor(a)
        if not is_norm_module(mod) or x is None or x.shape != stream.shape:
            continue
        for other, out in outputs:
            if other != name and out is not None and out.shape == x.shape and torch.allclose(x, stream + out,
                                                                                              atol=1e-5):
                return f"{name} normalizes the residual sum of the block input and {other}"
    return None


def _holds_norm(module: nn.Module) -> bool:
    """Whether a (block) module holds a normalization among its submodules: pre-norm residual blocks do."""
    return any(is_norm_module(sub) for sub in module.modules())


def _chain_rank(chain: list[tuple[int, str]], calls) -> tuple[bool, int]:
    """Chains of blocks that hold a normalization (pre-norm residual blocks do) rank above any chain without one
    (a ``Sequential`` of same-width linears, e.g. a timestep MLP); then the longer chain."""
    return (bool(chain) and all(_holds_norm(calls[i][1]) for i, _ in chain),
            len(chain))


def _find_block_chain(model, calls, outputs, containers) -> list[tuple[int, str]]:
    """The chain of container children where each block's output stream is the next block's input: the longest
    among chains of blocks holding a norm, else the longest."""
    best: list[tuple[int, str]] = []
    best_container = None
    for cname, container in containers.items():
        children = {id(c): f"{cname}.{n}" if cname else n for n, c in container.named_children()}
        chain: list[tuple[int, str]] = []
        for i, (name, mod, args, kwargs) in enumerate(calls):
            if id(mod) not in children or name != children[id(mod)]:
                continue
            out = _first_tensor(outputs.get(i))
            inp = _stream_arg(args, kwargs)
            if out is None or inp is None or out.shape != inp.shape:
                chain = []
                continue
            if chain:
                prev_out = _first_tensor(outputs.get(chain[-1][0]))
                if prev_out is not inp:
                    chain = []
            chain.append((i, name))
        if _chain_rank(chain, calls) > _chain_rank(best, calls):
            best, best_container = chain, cname
    if not best:
        found = sorted(containers) or ["no nn.ModuleList/nn.Sequential"]
        raise UnsupportedModelError(
            f"{type(model).__name__} has no residual stream: expected a stack of blocks (children of an "
            f"nn.ModuleList or nn.Sequential, each mapping a [..., D] stream to [..., D]) called in sequence; "
            f"found containers {found} and none forms such a chain"
        )
    del best_container
    return best


def _find_embeddings(stream_in: torch.Tensor, leaves: dict[int, str]) -> list[str]:
    """Names of the modules whose (leaf-replaced) outputs the tensor is computed from, in discovery order."""
    found: list[str] = []
    if id(stream_in) in leaves:
        return [leaves[id(stream_in)]]
    seen = set()
    stack = [stream_in.grad_fn] if stream_in.grad_fn is not None else []
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        var = getattr(fn, "variable", None)
        if var is not None and id(var) in leaves:
            if leaves[id(var)] not in found:
                found.append(leaves[id(var)])
            continue
        stack.extend(nxt for nxt, _ in fn.next_functions)
    return found
