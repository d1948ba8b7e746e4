"""WideNet ("Go Wider Instead of Deeper", Xue et al., arXiv 2107.11817) as a transform of an existing model.

WideNet scales width by turning each block's FFN into a mixture of experts, and saves parameters by sharing the
blocks' weights across depth while every block keeps its own normalization. :func:`widenet` does both to a
pre-norm transformer that :func:`vwn_transform.widen` supports:

- every block's FFN (found structurally, see :mod:`vwn_transform.ffn`) becomes a :class:`WideNetMoE`:
  ``num_experts`` copies of that FFN and a linear router; each position goes to its ``top_k`` experts and their
  outputs are summed with the top-k router probabilities renormalized to sum to 1. As the experts start as
  identical copies, any routing reproduces the FFN: with ``share_blocks=False`` the model computes exactly the
  original function (upcycling). Dropless: no capacity limit, no token is dropped.
- ``share_blocks=True``: every parameter of blocks 1..L-1 outside their norm modules is tied to block 0's
  (attention, router and experts); the norms stay per block. The shared weights start as block 0's: averaging the
  blocks' weights would mix unaligned features of a trained model and shrink a random initialization by
  sqrt(L), and no choice preserves a trained model's function, so this mode is for training (WideNet trains from
  scratch). Each block keeps its own module objects (so per-layer attributes such as a KV-cache index or a
  sliding window stay per layer); only the parameter tensors are shared.
- the router's load-balancing loss (Switch Transformer form, ``E * sum_e f_e * P_e``: f_e the fraction of routed
  assignments going to expert e, P_e its mean router probability; 1 when balanced) is summed over the blocks,
  multiplied by ``aux_loss_weight`` and added to the loss the model returns in training mode when it returns one
  (called with labels); ``model.vwn_widenet.last_losses`` holds both parts of the last forward (evaluation losses
  stay plain). Under reentrant activation checkpointing the balancing loss has no gradient (its forward runs
  without grad); non-reentrant checkpointing (transformers' default) is fine.

The top-k weights are ``p_i / stopgrad(sum of the selected p)``: their values are the renormalized probabilities
(so identical experts give exactly the FFN), and their gradient reaches the router also at ``top_k=1``, where a
fully renormalized weight would be the constant 1.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import re
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import UnsupportedModelError
from .ffn import (FFNSite, check_plain, check_preserved, deep_copy_unless, float_in, locate_ffns, positive_int,
                  record_recipe, set_module)
from .training import add_to_loss, returned_loss

__all__ = ["WideNetMoE", "WideNetPlan", "replay_widenet", "widenet", "widenet_plan"]

log = logging.getLogger("vwn_transform")

MAX_EXPERTS = 256


def _tracing() -> bool:
    """Under torch.compile or torch.export (and so ONNX export) the MoE runs its dense form (widenet() logs it)."""
    return torch.compiler.is_compiling() or getattr(torch.compiler, "is_exporting", lambda: False)()


class WideNetMoE(nn.Module):
    """Top-k mixture of ``num_experts`` copies of one FFN; ``last_aux_loss`` is the load-balancing loss of the last
    forward (with its graph, for the model-level hook that adds it to the loss).

    Example:
        >>> import torch
        >>> ffn = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))
        >>> moe = WideNetMoE(ffn, hidden=8, num_experts=4, top_k=2)
        >>> x = torch.randn(2, 5, 8)
        >>> torch.allclose(moe(x), ffn(x), atol=1e-6)  # identical experts: the FFN itself
        True
    """

    def __init__(self, ffn: nn.Module, hidden: int, num_experts: int, top_k: int):
        super().__init__()
        ref = next((p for p in ffn.parameters() if p.is_floating_point()), None)
        kw = {} if ref is None else {"device": ref.device, "dtype": ref.dtype}
        self.hidden, self.num_experts, self.top_k = hidden, num_experts, top_k
        self.router = nn.Linear(hidden, num_experts, bias=False, **kw)
        # logits of O(1) for an RMS-normed input of norm ~sqrt(D): near-uniform, random top-k choices at the start
        nn.init.normal_(self.router.weight, std=hidden ** -0.5)
        self.experts = nn.ModuleList(copy.deepcopy(ffn) for _ in range(num_experts))
        self.last_aux_loss: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.hidden)  # [P, D]: every position routed on its own
        probs = torch.softmax(self.router(flat).float(), dim=-1)  # [P, E]
        top_p, top_i = probs.topk(self.top_k, dim=-1)  # [P, k]
        weights = top_p / top_p.sum(-1, keepdim=True).detach()  # [P, k]: values sum to 1
        if _tracing():
            out = self._dense(flat, top_i, weights)
        else:
            out = self._gathered(flat, top_i, weights)
        if getattr(torch.compiler, "is_exporting", lambda: False)():
            return out.reshape(x.shape)  # an exported (inference) graph has no balancing loss
        counts = F.one_hot(top_i, self.num_experts).sum(dim=(0, 1)).float()  # [E]: assignments per expert
        fraction = counts / max(top_i.numel(), 1)
        self.last_aux_loss = self.num_experts * (fraction * probs.mean(0)).sum()
        return out.reshape(x.shape)

    def _dense(self, flat: torch.Tensor, top_i: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Every expert on every position, weighted by a ``[P, E]`` gate that is zero off the top-k: static
        shapes for torch.compile / torch.export / ONNX, at ``num_experts / top_k`` times the expert compute."""
        gates = torch.zeros(flat.shape[0], self.num_experts, device=flat.device, dtype=weights.dtype)
        gates = gates.scatter(1, top_i, weights)  # [P, E]
        out = None
        for e, expert in enumerate(self.experts):
            y = expert(flat) * gates[:, e:e + 1].to(flat.dtype)  # [P, D]
            out = y if out is None else out + y
        return out

    def _gathered(self, flat: torch.Tensor, top_i: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Each expert on the positions routed to it (data-dependent shapes: eager only)."""
        out = None
        for e, expert in enumerate(self.experts):
            rows, which = (top_i == e).nonzero(as_tuple=True)  # positions routed to e, and their k-slot
            if rows.numel() == 0:
                continue
            y = expert(flat[rows])  # [p_e, D]
            y = y * weights[rows, which].unsqueeze(-1).to(y.dtype)
            out = torch.zeros_like(flat, dtype=y.dtype) if out is None else out
            out = out.index_add(0, rows, y)
        if out is None:  # no positions (an empty batch)
            out = torch.zeros_like(flat)
        return out

    def extra_repr(self) -> str:
        return f"hidden={self.hidden}, num_experts={self.num_experts}, top_k={self.top_k}"

    def __getstate__(self):
        # a deep copy (or pickle) never meets the autograd graph of the last forward's balancing loss (e.g. a
        # block called outside the model, or recomputed by activation checkpointing after the model hook ran)
        state = self.__dict__.copy()
        if isinstance(state.get("last_aux_loss"), torch.Tensor):
            state["last_aux_loss"] = state["last_aux_loss"].detach()
        return state


class WideNetLoss:
    """The model-level hook (``model.vwn_widenet``): after each forward, sums the blocks' load-balancing losses and
    adds ``weight`` x that sum to the returned loss. When the model returns no loss (no labels), the sum, with its
    graph, is left in ``pending_aux_loss`` for a training loop that computes its own loss
    (``loss = my_loss + model.vwn_widenet.weight * model.vwn_widenet.pending_aux_loss``). A plain object whose hook
    is a bound method, so a deep copy of the model rebinds it to the copy; tensors with a graph are never kept
    where a deep copy would meet them."""

    def __init__(self, moe_names: list[str], weight: float):
        self.moe_names, self.weight = list(moe_names), weight
        self.last_aux_loss: torch.Tensor | None = None  # detached, of the last forward
        self.last_losses: dict[str, torch.Tensor] | None = None  # loss before the addition and aux, detached
        self.pending_aux_loss: torch.Tensor | None = None

    def __deepcopy__(self, memo):
        copy = WideNetLoss(self.moe_names, self.weight)
        copy.last_aux_loss, copy.last_losses = self.last_aux_loss, self.last_losses
        return copy

    def on_model_return(self, model, args, kwargs, output):
        parts = []
        for name in self.moe_names:
            moe = model.get_submodule(name)
            if moe.last_aux_loss is not None:
                parts.append(moe.last_aux_loss)
                moe.last_aux_loss = moe.last_aux_loss.detach()  # the graph lives on only in the sum below
        if not parts:
            return None
        aux = torch.stack(parts).sum()
        self.last_aux_loss = aux.detach()
        if not model.training:  # evaluation losses stay the plain loss (the aux value is still recorded)
            loss = returned_loss(output)
            self.pending_aux_loss = None
            self.last_losses = None if loss is None else {"loss": loss.detach(), "aux_loss": aux.detach()}
            return None
        output, before = add_to_loss(output, self.weight * aux)
        self.pending_aux_loss = aux if before is None else None
        self.last_losses = None if before is None else {"loss": before.detach(), "aux_loss": aux.detach()}
        return output


@dataclasses.dataclass
class WideNetPlan:
    """What :func:`widenet` does to a model; ``str(plan)`` is a readable report."""

    model_class: str
    ffns: list[str]
    num_experts: int
    top_k: int
    share_blocks: bool
    aux_loss_weight: float
    params_original: int
    params_after: int
    applied_per_position: int  # weights applied to one position in a forward (a compute measure: each block's
    # router and top_k experts counted per block, shared or not)

    def __str__(self) -> str:
        shown = self.ffns if len(self.ffns) <= 4 else self.ffns[:2] + ["..."] + self.ffns[-1:]
        pct = 100.0 * (self.params_after - self.params_original) / max(self.params_original, 1)
        return "\n".join([
            f"WideNet plan for {self.model_class}",
            f"  {len(self.ffns)} FFNs -> top-{self.top_k} mixtures of {self.num_experts} experts (copies of the FFN): "
            + ", ".join(shown),
            "  blocks: " + ("weights shared across depth (attention, router, experts: block 0's); norms per block"
                            if self.share_blocks else "separate weights (function-preserving upcycling)"),
            f"  load-balancing loss weight {self.aux_loss_weight:g} (summed over blocks, added to a returned loss)",
            f"  parameters: {self.params_original:,} -> {self.params_after:,} ({pct:+.1f}%); weights applied per "
            f"position (compute): {self.applied_per_position:,}",
        ])


def _unique_params(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def _validate(num_experts, top_k, share_blocks, aux_loss_weight) -> None:
    positive_int(num_experts, "num_experts", 2, MAX_EXPERTS)
    positive_int(top_k, "top_k", 1)
    if top_k > num_experts:
        raise ValueError(f"top_k must be at most num_experts ({num_experts}), got {top_k}")
    if not isinstance(share_blocks, bool):
        raise ValueError(f"share_blocks must be True or False, got {share_blocks!r}")
    float_in(aux_loss_weight, "aux_loss_weight", 0.0, 1e3)


def _norm_paths(block: nn.Module) -> list[str]:
    from vwn_transform.passes.probe import is_norm_module

    return [name for name, mod in block.named_modules() if name and is_norm_module(mod)]


def _shared_params(blocks: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module, str, str, nn.Parameter]]:
    """For blocks 1..L-1: (block path, owner module, parameter name, relative path, block 0's parameter) of every parameter
    outside a norm module. Blocks whose parameters differ in name or shape from block 0's are refused."""
    first_name, first = blocks[0]
    source = dict(first.named_parameters(remove_duplicate=False))
    plan = []
    for name, block in blocks[1:]:
        norms = _norm_paths(block)
        mine = {}
        for path, p in block.named_parameters(remove_duplicate=False):
            if any(path == n or path.startswith(n + ".") for n in norms):
                continue
            mine[path] = p
            if path not in source or source[path].shape != p.shape:
                got = tuple(source[path].shape) if path in source else "nothing"
                raise UnsupportedModelError(
                    f"share_blocks=True needs blocks of one form: {name}.{path} has shape {tuple(p.shape)}, "
                    f"{first_name}.{path} has {got}; use share_blocks=False")
        for path, p in mine.items():
            owner_path, _, pname = path.rpartition(".")
            plan.append((name, block.get_submodule(owner_path) if owner_path else block, pname, path, source[path]))
    return plan


def _analyze(model, num_experts, top_k, share_blocks, aux_loss_weight, example_inputs, names=None):
    _validate(num_experts, top_k, share_blocks, aux_loss_weight)
    check_plain(model, "widenet")
    structure, sites = locate_ffns(model, example_inputs, "widenet", names)
    return structure, sites


def _count(model: nn.Module, sites: list[FFNSite], num_experts: int, top_k: int, share: bool,
           hidden: int) -> tuple[int, int, int]:
    """(parameters before, after, used per position after)."""
    before = _unique_params(model)
    ffn = [sum(p.numel() for p in model.get_submodule(s.name).parameters()) for s in sites]
    router = hidden * num_experts
    per_block = [f * (num_experts - 1) + router for f in ffn]
    after = before + sum(per_block)
    active = before + sum(f * (top_k - 1) + router for f in ffn)
    if share and len(sites) > 1:
        blocks = [(s.block, model.get_submodule(s.block)) for s in sites]
        norms = [_norm_paths(b) for _, b in blocks]
        shared = sum(p.numel() for (_, b), ns in zip(blocks[1:], norms[1:]) for path, p in b.named_parameters()
                     if not any(path == n or path.startswith(n + ".") for n in ns))
        after -= shared + sum(per_block[1:])
    return before, after, active


def widenet_plan(model: nn.Module, num_experts: int = 4, top_k: int = 2, *, share_blocks: bool = True,
                 aux_loss_weight: float = 0.01, example_inputs: Any = None) -> WideNetPlan:
    """Report what :func:`widenet` would do to ``model``, without changing it.

    Example:
        >>> import vwn_transform
        >>> from vwn_transform.models import GPT, GPTConfig
        >>> model = GPT(GPTConfig(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=32))
        >>> p = vwn_transform.widenet_plan(model, 4, 2)
        >>> p.ffns
        ['transformer.h.0.mlp', 'transformer.h.1.mlp']
        >>> p.params_after < p.params_original * 4
        True
    """
    structure, sites = _analyze(model, num_experts, top_k, share_blocks, aux_loss_weight, example_inputs)
    before, after, active = _count(model, sites, num_experts, top_k, share_blocks, structure.hidden_size)
    return WideNetPlan(type(model).__name__, [s.name for s in sites], num_experts, top_k, share_blocks,
                       float(aux_loss_weight), before, after, active)



def widenet(model: nn.Module, num_experts: int = 4, top_k: int = 2, *, share_blocks: bool = True,
            aux_loss_weight: float = 0.01, inplace: bool = False, example_inputs: Any = None) -> nn.Module:
    """Turn a pre-norm transformer into its WideNet form (see the module docstring).

    Args:
        model: a model :func:`vwn_transform.widen` supports, with dense FFNs (an FFN that is already a mixture of
            experts is refused: WideNet upcycles dense FFNs).
        num_experts: experts per FFN (2..256), each starting as a copy of the FFN.
        top_k: experts per position (1..num_experts).
        share_blocks: tie every block's non-norm weights to block 0's (WideNet's parameter sharing; not
            function-preserving); ``False``: separate weights per block, exactly the original function.
        aux_loss_weight: weight of the summed load-balancing loss added to a returned loss (0 turns it off).
        inplace: transform ``model`` itself instead of a deep copy.
        example_inputs: probe inputs as for :func:`vwn_transform.widen`.

    Returns:
        The transformed model (same class); ``model.vwn_recipe`` records the transform for save/load, and
        ``model.vwn_widenet.last_losses`` holds the loss parts of the last forward that returned a loss. It can
        then be virtually widened: ``vwn_transform.widen(widenet(model), 2)``.

    Raises:
        ValueError: a bad argument (the message names it and the valid range). UnsupportedModelError: no
        position-wise FFN per block, an FFN that is already an MoE, blocks of different forms with
        share_blocks=True, or a model already transformed. On any error the input model is unchanged.

    Example:
        >>> import torch, vwn_transform
        >>> from vwn_transform.models import GPT, GPTConfig
        >>> model = GPT(GPTConfig(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=32)).eval()
        >>> moe = vwn_transform.widenet(model, 4, 2, share_blocks=False)
        >>> idx = torch.randint(0, 64, (2, 10))
        >>> torch.allclose(moe(idx)[0], model(idx)[0], atol=1e-5)
        True
    """
    return _widenet(model, num_experts, top_k, share_blocks, aux_loss_weight, inplace, example_inputs)


def replay_widenet(base: nn.Module, recipe: dict, inputs) -> nn.Module:
    """Load's replay: the recorded options on the recorded FFNs (the weights are zeros until loaded)."""
    o = recipe.get("options") or {}
    return _widenet(base, o.get("num_experts"), o.get("top_k"), o.get("share_blocks"), o.get("aux_loss_weight"),
                    True, inputs, names=(recipe.get("wrapped") or {}).get("ffn"))


def _widenet(model, num_experts, top_k, share_blocks, aux_loss_weight, inplace, example_inputs, names=None):
    from .widen import _Surgery, check_probe_output

    start = time.perf_counter()
    structure, sites = _analyze(model, num_experts, top_k, share_blocks, aux_loss_weight, example_inputs, names)
    before, after, _ = _count(model, sites, num_experts, top_k, share_blocks, structure.hidden_size)
    target = deep_copy_unless(model, inplace)
    op = _Surgery()
    try:
        for site in sites:
            moe = WideNetMoE(target.get_submodule(site.name), structure.hidden_size, num_experts, top_k)
            set_module(target, site.name, moe, op)
        if share_blocks and len(sites) > 1:
            _tie_blocks(target, sites, op)
        else:
            check_preserved(target, structure, "widenet")
        hook = WideNetLoss([s.name for s in sites], float(aux_loss_weight))
        op.set(target, "vwn_widenet", hook)
        handle = target.register_forward_hook(hook.on_model_return, with_kwargs=True)
        op.on_undo(handle.remove)
        options = {"num_experts": num_experts, "top_k": top_k, "share_blocks": share_blocks,
                   "aux_loss_weight": float(aux_loss_weight)}
        record_recipe(target, type(model).__name__, "widenet", options, {"ffn": [s.name for s in sites]},
                      structure, example_inputs is not None, op)
        if share_blocks:  # not function-preserving: it must still run and return the original's shape
            check_probe_output(target, structure, "widenet(): the shared", values=False)
    except BaseException:
        op.rollback()
        raise
    log.info("widenet: %s, %d FFNs -> top-%d of %d experts, blocks %s; parameters %s -> %s in %.2fs. Routing: "
             "eager runs each expert on its positions; torch.compile/export run every expert on every position "
             "gated by the top-k weights (static shapes, %gx the expert compute)", type(model).__name__, len(sites),
             top_k, num_experts, "shared" if share_blocks else "separate", f"{before:,}", f"{after:,}",
             time.perf_counter() - start, num_experts / top_k)
    return target


def _tie_blocks(model: nn.Module, sites: list[FFNSite], op) -> None:
    """Tie blocks 1..L-1's non-norm parameters to block 0's; for Hugging Face models also declare the ties
    (``_tied_weights_keys`` on each block) so ``save_pretrained`` writes each shared tensor once."""
    blocks = [(s.block, model.get_submodule(s.block)) for s in sites]
    ties = _shared_params(blocks)
    for _, owner, pname, _, src in ties:
        op.set(owner, pname, src)
    if not hasattr(model, "save_pretrained"):
        return
    first = blocks[0][0]
    for name, block in blocks[1:]:
        declared = dict(getattr(block, "_tied_weights_keys", None) or {})
        # keys are regexes searched in the full parameter name (block path + "." + key), values the sources
        mine = {re.escape(path) + "$": f"{first}.{path}" for owner_block, _, _, path, _ in ties
                if owner_block == name}
        op.set(block, "_tied_weights_keys", {**declared, **mine})
