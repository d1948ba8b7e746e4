"""Capture pass: one instrumented forward on a short example finds the model-level structure.

What it records (nothing in the model is changed; hooks are removed and training flags restored):

* **blocks**: the children of one ``nn.ModuleList``/``nn.Sequential`` called in a chain, where the stream
  tensor returned by block i is the tensor given to block i+1. Their call arguments seed the block traces.
* **embeddings**: the modules whose outputs the stream entering block 0 is computed from. Every module with
  parameters that runs before block 0 has its output replaced by a fresh autograd leaf; walking the autograd
  graph of block 0's input back to those leaves gives the exact dataflow (token + position + type embeddings,
  scaling, dropout), whatever the model-level Python code does.
* **final**: the first module with parameters called on the last block's output (the final norm, or the head
  when a model has none), where the reduce goes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from vwn_transform.config import UnsupportedModelError

__all__ = [
    "ModelStructure", "BlockCall", "check_stream_ends", "default_example_inputs", "diagnose_post_ln", "is_norm_module",
    "primary_output", "probe_model", "run_quietly",
]


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
    final_kind: str  # "norm" or "head"
    head: str | None
    example_inputs: tuple
    reference_output: torch.Tensor | None  # the model's primary output on example_inputs
    problem: str | None = None  # why the final norm/head could not be placed (raised by check_stream_ends)


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


def run_quietly(model: nn.Module, example_inputs: tuple) -> Any:
    """Forward in eval mode without grad; training flags are restored afterwards."""
    restore = _restore_training(model)
    try:
        model.eval()
        with torch.no_grad():
            return model(*example_inputs)
    finally:
        restore()


def default_example_inputs(model: nn.Module, seq_len: int = 8) -> tuple:
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
            "found none; pass example_inputs=(tensor, ...) to widen()/plan()"
        )
    ids = (torch.arange(seq_len, device=emb.weight.device) * 7 + 1) % emb.num_embeddings  # [seq]
    return (ids.unsqueeze(0),)  # [1, seq]


def probe_model(model: nn.Module, example_inputs: tuple | None = None) -> ModelStructure:
    """Run one forward with hooks and return the model-level structure (see module docstring)."""
    example_inputs = _as_input_tuple(model, example_inputs)
    trace = _record_forward(model, example_inputs)
    calls = trace.calls
    blocks = _find_block_chain(model, calls, trace.outputs, trace.containers)
    first_idx = blocks[0][0]
    stream_in = _stream_arg(calls[first_idx][2], calls[first_idx][3])
    hidden = stream_in.shape[-1]
    module_order = {name: i for i, name in enumerate(trace.names.values())}
    embeddings = sorted(_find_embeddings(stream_in, trace.leaves), key=lambda n: module_order.get(n, 0))
    if not embeddings:
        raise UnsupportedModelError(
            f"could not find the embeddings feeding the residual stream of {type(model).__name__}: the input of "
            f"{calls[first_idx][0]} is not computed from any nn.Embedding"
        )
    final_name, final_kind, head, problem = _stream_end(trace, blocks, hidden)
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
    )


def _as_input_tuple(model: nn.Module, example_inputs) -> tuple:
    """``example_inputs`` as a tuple of positional inputs (the model's default inputs when None)."""
    if example_inputs is None:
        return default_example_inputs(model)
    if isinstance(example_inputs, list):
        return tuple(example_inputs)
    if not isinstance(example_inputs, tuple):
        return (example_inputs,)
    return example_inputs


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


def _record_forward(model: nn.Module, example_inputs: tuple) -> _ForwardTrace:
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
                out = model(*example_inputs)
            except Exception as exc:  # the user's forward failed on our example: say which input we used
                shapes = [tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__ for t in example_inputs]
                raise UnsupportedModelError(
                    f"the probe forward of {type(model).__name__} on example inputs {shapes} failed with "
                    f"{type(exc).__name__}: {exc}; pass example_inputs= that the model's forward accepts"
                ) from exc
    finally:
        for h in handles:
            h.remove()
        restore()
        for mod in model.modules():
            mod.__dict__.pop("_vwn_probe_index", None)
    return _ForwardTrace(calls, outputs, leaves, leaf_tensors, containers, names, out)


def _stream_end(trace: _ForwardTrace, blocks: list[tuple[int, str]], hidden: int):
    """Where the residual stream leaves the block stack: ``(final module name, "norm" | "head" | "", the head's
    name or None, the problem or None)``. The first module with parameters after the last block whose input is
    the last block's output is the final module; the head is the first ``hidden``-wide linear from there. A
    problem is reported by :func:`check_stream_ends`, after the blocks were analysed."""
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
    if final_idx is None:
        return "", "", None, (f"expected a final norm or head applied to the residual stream after {blocks[-1][1]}; "
                              "found no module consuming it")
    final_name, final_mod = calls[final_idx][0], calls[final_idx][1]
    final_kind, head, problem = "", None, None
    if is_norm_module(final_mod):
        final_kind = "norm"
    elif isinstance(final_mod, nn.Linear) and final_mod.in_features == hidden:
        final_kind = "head"
    else:
        problem = (f"expected the residual stream after {blocks[-1][1]} to enter a norm or a linear head, "
                   f"found {final_name} ({type(final_mod).__name__})")
    for i in range(final_idx + (1 if final_kind == "norm" else 0), len(calls)):
        name, mod = calls[i][0], calls[i][1]
        if isinstance(mod, nn.Linear) and mod.in_features == hidden:
            head = name
            break
    return final_name, final_kind, head, problem


def check_stream_ends(model: nn.Module, structure: ModelStructure) -> None:
    """The residual stream must start from nn.Embedding outputs of the stream width and end in a norm or head.

    Checked after the blocks were analysed, so a model with unsupported blocks hears about its blocks first.
    """
    if structure.problem:
        raise UnsupportedModelError(structure.problem)
    first = structure.blocks[0].name
    for name in structure.embeddings:
        mod = model.get_submodule(name)
        if not isinstance(mod, nn.Embedding):
            raise UnsupportedModelError(
                f"the residual stream entering {first} is computed from {name} ({type(mod).__name__}); expected "
                "only nn.Embedding modules (token/position/type embeddings) before the first block"
            )
        if mod.embedding_dim != structure.hidden_size:
            raise UnsupportedModelError(
                f"embedding {name} has width {mod.embedding_dim} but the residual stream has width "
                f"{structure.hidden_size}; expected embeddings of the stream width"
            )


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


def _find_block_chain(model, calls, outputs, containers) -> list[tuple[int, str]]:
    """The longest chain of container children where each block's output stream is the next block's input."""
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
        if len(chain) > len(best):
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
