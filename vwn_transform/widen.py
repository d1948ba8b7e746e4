"""``widen()`` and ``plan()``: orchestration of the capture, matching and rewrite passes."""

from __future__ import annotations

import copy
import dataclasses
import logging
import re
import time
from fractions import Fraction
from typing import Any

import torch
from torch import nn

from vwn_transform.config import MAX_SLOTS, UnsupportedModelError, VWNConfig, choose_slots, parse_ratio
from vwn_transform.lora import peft_module
from vwn_transform.mtp import attach_mtp, label_convention
from vwn_transform.modules import (
    GHC,
    ReduceMixin,
    SliceInputMixin,
    WideEmbedding,
    WidenedBlockMixin,
    is_vwn_module,
    swap_class,
    swap_model_class,
)
from vwn_transform.passes.block_graph import (
    ENTRY_EXPAND,
    EXIT_GROUP_NORM,
    EXIT_REDUCE,
    GHC_CONTAINER,
    BlockRunner,
    CallSpec,
    NoResidualUpdateError,
    ResidualUpdate,
    find_residual_updates,
    lower_block_graph,
    trace_block,
)
from vwn_transform.passes.probe import (
    ModelStructure,
    check_stream_ends,
    diagnose_post_ln,
    primary_output,
    probe_model,
    run_quietly,
)

__all__ = ["widen", "plan", "WidenPlan", "ghc_params", "ghc_flops_per_token"]

log = logging.getLogger("vwn_transform")

# Names used by public hyper-connection libraries (HC, mHC, Frac-Connections) for their modules and parameters.
_HC_MODULE = re.compile(r"hyper.?connect|manifold.?constrained|frac.?connect|\bmhc", re.IGNORECASE)
_HC_PARAM = re.compile(r"(^|\.)(static|dynamic)_(alpha|beta)$")


# ------------------------------------------------------------------------------------------------------------
# cost model (vwn-math.md, "Costs per GHC module")
# ------------------------------------------------------------------------------------------------------------
def ghc_params(hidden: int, m: int, n: int, dynamic: bool) -> int:
    """Parameters of one GHC module: ``2n(2m+n) + (D/m)(2m+n+1)`` dynamic, ``nm + n^2 + mn`` static."""
    if dynamic:
        return 2 * n * (2 * m + n) + (hidden // m) * (2 * m + n + 1)
    return 2 * n * m + n * n


def ghc_flops_per_token(hidden: int, m: int, n: int, dynamic: bool) -> int:
    """FLOPs of one GHC module per token: ``(2nD/m)(3m+2n+2) + 2nD`` dynamic; read + carry + write static."""
    if dynamic:
        return (2 * n * hidden // m) * (3 * m + 2 * n + 2) + 2 * n * hidden
    return (2 * n * hidden // m) * (m + n) + 2 * n * hidden


@dataclasses.dataclass
class EmbeddingPlan:
    name: str
    kind: str
    num_embeddings: int
    tied_to: str | None


@dataclasses.dataclass
class BlockPlan:
    name: str
    kind: str
    updates: list[tuple[str, ...]]  # per residual update: the submodules its branch calls
    parallel: list[bool]  # per residual update: several branches summed into one update (GPT-NeoX, GPT-J)


@dataclasses.dataclass
class WidenPlan:
    """What widen() does to a model; ``str(plan)`` is a readable report."""

    model_class: str
    config: VWNConfig
    embeddings: list[EmbeddingPlan]
    blocks: list[BlockPlan]
    final: str
    final_kind: str
    head: str | None
    params_original: int
    params_added: int
    flops_original_per_token: int
    flops_added_per_token: int
    entry: str = "embeddings"  # or "block": the stream is widened at the input of the first block

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def num_ghc(self) -> int:
        return sum(len(b.updates) for b in self.blocks)

    def __str__(self) -> str:
        c = self.config
        d = c.hidden_size
        lines = [
            f"VWN plan for {self.model_class}",
            f"  ratio r = n/m = {c.n}/{c.m} = {float(c.ratio):g}; hidden D = {d}, slot width d = {d // c.m}, "
            f"over-width D' = {c.n * d // c.m}",
            f"  GHC: {'dynamic' if c.dynamic else 'static'}, init={c.init}, embedding={c.embedding}, "
            f"group norm={'on' if c.use_group_norm() else 'off'}",
        ]
        if self.entry == "block":
            lines.append(f"  stream widened D -> D' at the input of {self.blocks[0].name} (factorized expansion: it "
                         "does not start at token tables)")
        else:
            lines.append("  embeddings widened:")
        for e in self.embeddings:
            tie = f", tied to {e.tied_to}" if e.tied_to else ""
            lines.append(f"    {e.name} ({e.kind}, {e.num_embeddings} rows{tie})")
        lines.append(f"  residual sublayers: {self.num_ghc} GHC modules in {len(self.blocks)} blocks")
        shown = self.blocks if len(self.blocks) <= 4 else self.blocks[:2] + [None] + self.blocks[-1:]
        for b in shown:
            if b is None:
                lines.append(f"    ... {len(self.blocks) - 3} more blocks of the same form")
                continue
            ups = "; ".join(" -> ".join(u) + (" (parallel)" if par else "") for u, par in zip(b.updates, b.parallel))
            lines.append(f"    {b.name} ({b.kind}): {ups}")
        where = {"norm": "before the final norm", "head": "before the head (no final norm)",
                 "block": "at the output of the last block"}[self.final_kind]
        lines.append(f"  reduce D' -> D inserted {where}: {self.final}")
        if self.head:
            lines.append(f"  head: {self.head}")
        if c.mtp:
            lines.append(f"  next-2-token prediction: one extra VWN layer (a copy of {self.blocks[-1].name}), "
                         f"loss weight {c.mtp_weight} (its parameters are not in the counts below)")
        pct = 100.0 * self.params_added / max(self.params_original, 1)
        fpct = 100.0 * self.flops_added_per_token / max(self.flops_original_per_token, 1)
        lines.append(f"  parameters: {self.params_original:,} + {self.params_added:,} ({pct:.2f}%)")
        lines.append(
            f"  FLOPs/token (matmuls, excluding attention scores): {self.flops_original_per_token:,} + "
            f"{self.flops_added_per_token:,} ({fpct:.2f}%)"
        )
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------------
# analysis (touches nothing)
# ------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _BlockAnalysis:
    name: str
    spec: CallSpec
    graph: Any
    updates: list[ResidualUpdate]


def _check_not_widened(model: nn.Module) -> None:
    if getattr(model, "vwn_config", None) is not None or any(is_vwn_module(mod) for mod in model.modules()):
        raise UnsupportedModelError(
            f"{type(model).__name__} is already widened by vwn_transform (it has vwn_config / VWN modules); "
            "expected an original, un-widened model"
        )
    for name, mod in model.named_modules():
        if _HC_MODULE.search(type(mod).__name__):
            raise UnsupportedModelError(
                f"{name or 'the model'} is a {type(mod).__name__}: the model already carries hyper-connections; "
                "expected a plain residual transformer"
            )
    for name, _ in model.named_parameters():
        if _HC_PARAM.search(name):
            raise UnsupportedModelError(
                f"parameter {name!r} looks like a hyper-connection weight (static/dynamic alpha/beta): the model "
                "already carries hyper-connections; expected a plain residual transformer"
            )


def _check_not_peft(model: nn.Module) -> None:
    """Refuse a model carrying PEFT modules (a PeftModel, or LoRA layers injected into the model): its widened form
    would record the wrapper as the model class, and neither the adapter nor the merged model would reload."""
    found = peft_module(model)
    if found is not None:
        name, mod = found
        raise UnsupportedModelError(
            f"{name or 'the model'} is a {type(mod).__name__} from peft: widen() takes the plain model. Either merge "
            "the adapter first (widen(peft_model.merge_and_unload(), ...)), or widen first and then apply LoRA with "
            "get_peft_model(wide, LoraConfig(..., modules_to_save=vwn_transform.peft_modules_to_save(wide)))"
        )


def _resolve_config(config, ratio, m, dynamic, init, embedding, mtp=False, mtp_weight=0.3
                    ) -> tuple[VWNConfig | None, dict]:
    """Validate what can be validated before looking at the model."""
    if config is not None:
        if not isinstance(config, VWNConfig):
            raise TypeError(f"config must be a VWNConfig, got {type(config).__name__}")
        if ratio is not None or m is not None or mtp:
            raise ValueError("pass either config=VWNConfig(...) or ratio=/m=/mtp=, not both")
        return config, {}
    if ratio is None:
        raise ValueError("widen() needs a ratio (e.g. 1.5, '3/2', 4) or a config=VWNConfig(n=..., m=...)")
    r = parse_ratio(ratio)
    if r > MAX_SLOTS:
        raise ValueError(f"ratio {_ratio_text(ratio)} needs more than the {MAX_SLOTS} supported slots; the paper uses "
                         "ratios up to 8")
    # validates dynamic/init/embedding now, before any work on the model
    VWNConfig(n=1, m=1, dynamic=dynamic, init=init, embedding=embedding, mtp=mtp, mtp_weight=mtp_weight)
    return None, dict(ratio=ratio, m=m, dynamic=dynamic, init=init, embedding=embedding, mtp=mtp,
                      mtp_weight=mtp_weight)


def _ratio_text(ratio) -> str:
    """A ratio as the user would write it (``10000``, ``3/2``), not ``Fraction(10000, 1)``."""
    return str(ratio) if isinstance(ratio, Fraction) else repr(ratio)


def _warn_unusual(cfg: VWNConfig, params_original: int, params_added: int, model_name: str) -> None:
    """Legal but almost certainly unintended widenings: logged as warnings (the model is still widened)."""
    if cfg.n == cfg.m:
        log.warning("ratio 1 ((m, n) = (%d, %d)) adds %s GHC parameters but no width: the over-width state is as "
                    "wide as the backbone (the study's baseline; use ratio > 1 to widen)", cfg.m, cfg.n,
                    f"{params_added:,}")
    if params_original and params_added > 10 * params_original:
        log.warning("ratio %s multiplies the parameters of %s by %.0fx (%s added to %s); the paper uses ratios up "
                    "to 8 with n <= 64 slots", Fraction(cfg.n, cfg.m), model_name,
                    (params_original + params_added) / params_original, f"{params_added:,}", f"{params_original:,}")


def _analyze(model, config, ratio, m, dynamic, init, embedding, example_inputs, mtp=False, mtp_weight=0.3):
    if not isinstance(model, nn.Module):
        raise TypeError(f"widen() expects a torch.nn.Module, got {type(model).__name__}")
    fixed, pending = _resolve_config(config, ratio, m, dynamic, init, embedding, mtp, mtp_weight)
    _check_not_peft(model)
    _check_not_widened(model)
    structure = probe_model(model, example_inputs)
    d = structure.hidden_size
    if fixed is None:
        mm, n = choose_slots(pending["ratio"], d, pending["m"])
        cfg = VWNConfig(n=n, m=mm, dynamic=pending["dynamic"], init=pending["init"],
                        embedding=pending["embedding"], hidden_size=d, mtp=pending["mtp"],
                        mtp_weight=pending["mtp_weight"])
    else:
        if fixed.hidden_size is not None and fixed.hidden_size != d:
            raise ValueError(f"config.hidden_size={fixed.hidden_size} but the model's residual stream has width {d}")
        if d % fixed.m:
            raise ValueError(f"config.m={fixed.m} must divide the model's hidden size {d}")
        cfg = fixed.replace(hidden_size=d)

    check_stream_ends(model, structure)  # a stream whose width changes between stages: refused before its blocks
    blocks = analyze_blocks(structure)
    if cfg.mtp and (structure.entry != "embeddings" or structure.final_kind == "block"):
        raise UnsupportedModelError(
            f"mtp=True needs a token language model (a stream from token tables into a final norm or head); "
            f"{type(model).__name__}'s stream starts at {structure.embeddings or 'its inputs'} and ends "
            f"{'at ' + structure.final if structure.final_kind != 'block' else 'in a pooler or other consumer'}")
    return cfg, structure, blocks


def analyze_blocks(structure: ModelStructure) -> list[_BlockAnalysis]:
    """Trace every block the probe found and match its residual updates (the rewrite's input; also what the
    width transforms use to find each block's FFN). Post-LN blocks and blocks without a residual update are
    refused with an :class:`UnsupportedModelError` that says what was found."""
    blocks = []
    for call in structure.blocks:
        spec, _ = CallSpec.from_call(call.module, call.args, call.kwargs)
        where = f"{call.name} ({type(call.module).__name__})"
        graph = trace_block(call.module, spec)
        try:
            updates = find_residual_updates(graph, call.module, spec.stream_placeholder(), where)
        except UnsupportedModelError as exc:
            post_ln = diagnose_post_ln(call.module, call.args, call.kwargs) \
                if isinstance(exc, NoResidualUpdateError) else None
            if post_ln:
                raise UnsupportedModelError(
                    f"{where} is a post-LN block: {post_ln} (BERT-style norm(s + f(s))); expected pre-norm "
                    "residual blocks s + f(norm(s))"
                ) from exc
            raise
        blocks.append(_BlockAnalysis(call.name, spec, graph, updates))
    return blocks


def _count_added(model: nn.Module, cfg: VWNConfig, structure: ModelStructure, num_ghc: int) -> int:
    d, n, m = cfg.hidden_size, cfg.n, cfg.m
    wide = n * d // m
    added = num_ghc * ghc_params(d, m, n, cfg.dynamic)
    if structure.entry == "block":
        added += wide * d  # the expansion at the first block's input
    else:
        for name in structure.embeddings:
            emb = model.get_submodule(name)
            added += emb.num_embeddings * (wide - d) if cfg.embedding == "table" else wide * d
    added += d * wide + (wide if cfg.use_group_norm() else 0)
    return added


def _build_plan(model, cfg, structure, blocks) -> WidenPlan:
    d, n, m = cfg.hidden_size, cfg.n, cfg.m
    wide = n * d // m
    params = {id(p): p for p in model.parameters()}
    params_original = sum(p.numel() for p in params.values())
    emb_weights = {id(mod.weight) for mod in model.modules() if isinstance(mod, nn.Embedding)}
    head_mod = model.get_submodule(structure.head) if structure.head else None
    tied_head = head_mod is not None and id(head_mod.weight) in emb_weights
    # ~2 FLOPs per weight per token for every matmul weight; a tied head is counted through its table
    flops_original = 2 * sum(p.numel() for i, p in params.items() if i not in emb_weights and p.dim() >= 2)
    if tied_head:
        flops_original += 2 * head_mod.weight.numel()
    num_ghc = sum(len(b.updates) for b in blocks)
    flops_added = num_ghc * ghc_flops_per_token(d, m, n, cfg.dynamic) + 2 * d * wide
    if structure.entry == "block":
        flops_added += 2 * d * wide
    elif cfg.embedding == "factorized":
        flops_added += 2 * d * wide * len(structure.embeddings)
    embeddings = []
    for name in (structure.embeddings if structure.entry == "embeddings" else []):
        emb = model.get_submodule(name)
        tied = structure.head if head_mod is not None and head_mod.weight is emb.weight else None
        embeddings.append(EmbeddingPlan(name, type(emb).__name__, emb.num_embeddings, tied))
    return WidenPlan(
        model_class=type(model).__name__,
        config=cfg,
        embeddings=embeddings,
        blocks=[BlockPlan(b.name, type(model.get_submodule(b.name)).__name__, [u.sublayers for u in b.updates],
                          [u.parallel for u in b.updates]) for b in blocks],
        final=structure.final,
        final_kind=structure.final_kind,
        head=structure.head,
        entry=structure.entry,
        params_original=params_original,
        params_added=_count_added(model, cfg, structure, num_ghc),
        flops_original_per_token=flops_original,
        flops_added_per_token=flops_added,
    )


def plan(model: nn.Module, ratio: Any = None, *, m: int | None = None, config: VWNConfig | None = None,
         dynamic: bool = True, init: str = "preserve", embedding: str = "table",
         example_inputs: Any = None, mtp: bool = False, mtp_weight: float = 0.3) -> WidenPlan:
    """Report what :func:`widen` would do to ``model``, without changing it.

    Example:
        >>> import vwn_transform
        >>> from vwn_transform.models import GPT, GPTConfig
        >>> model = GPT(GPTConfig(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=32))
        >>> p = vwn_transform.plan(model, "3/2")
        >>> (p.config.m, p.config.n, p.num_ghc)
        (2, 3, 4)
        >>> print(p)  # doctest: +ELLIPSIS
        VWN plan for GPT...
    """
    cfg, structure, blocks = _analyze(model, config, ratio, m, dynamic, init, embedding, example_inputs, mtp,
                                      mtp_weight)
    result = _build_plan(model, cfg, structure, blocks)
    _warn_unusual(cfg, result.params_original, result.params_added, result.model_class)
    return result


# ------------------------------------------------------------------------------------------------------------
# surgery (every change is recorded in an undo log, so a failure leaves the model as it was)
# ------------------------------------------------------------------------------------------------------------
class _Surgery:
    def __init__(self):
        self._undo: list = []

    def set(self, module: nn.Module, name: str, value) -> None:
        had = name in module.__dict__ or name in module._parameters or name in module._modules
        old = getattr(module, name, None)
        setattr(module, name, value)
        self._undo.append(lambda: setattr(module, name, old) if had else delattr(module, name))

    def swap(self, module: nn.Module, mixin: type) -> None:
        old = swap_class(module, mixin)
        self._undo.append(lambda: setattr(module, "__class__", old))

    def on_undo(self, undo) -> None:
        """Run ``undo()`` (with the other undo steps, newest first) if the surgery is rolled back."""
        self._undo.append(undo)

    def rollback(self) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()


def _float_param(module: nn.Module) -> torch.Tensor | None:
    return next((p for p in module.parameters() if p.is_floating_point()), None)


@torch.no_grad()
def _expansion(cfg: VWNConfig, ref: torch.Tensor) -> torch.Tensor:
    """The factorized expansion ``[D', D]`` (dtype and device of ``ref``): virtual slot k reads backbone slot
    k mod m (function-preserving init), or, with init="paper", the first m slots the identity and the rest
    N(0, 1/D)."""
    d, n, m = cfg.hidden_size, cfg.n, cfg.m
    slot = d // m
    expand = torch.zeros(n * slot, d, dtype=ref.dtype, device=ref.device)
    eye = torch.eye(slot, dtype=ref.dtype, device=ref.device)
    for k in range(n):
        if k < m or cfg.init == "preserve":
            expand[k * slot:(k + 1) * slot, (k % m) * slot:(k % m + 1) * slot] = eye
    if cfg.init == "paper":
        expand[d:].normal_(0.0, d ** -0.5)
    return expand


@torch.no_grad()
def _widen_embedding(emb: nn.Embedding, cfg: VWNConfig, op: _Surgery) -> None:
    d, n, m = cfg.hidden_size, cfg.n, cfg.m
    slot = d // m
    wide = n * slot
    w = emb.weight
    if cfg.embedding == "table":
        extra = torch.empty(emb.num_embeddings, wide - d, dtype=w.dtype, device=w.device)
        if cfg.init == "preserve":
            # extra virtual slot k (k >= m) starts as a copy of backbone slot k mod m, as HC replicates streams
            for k in range(m, n):
                src = (k % m) * slot
                extra[:, (k - m) * slot:(k - m + 1) * slot] = w[:, src:src + slot]
        else:
            extra.normal_(0.0, float(w.float().std()) or 0.02)
            if emb.padding_idx is not None:
                extra[emb.padding_idx] = 0
        op.set(emb, "vwn_extra", nn.Parameter(extra))
    else:
        op.set(emb, "vwn_expand", nn.Parameter(_expansion(cfg, w)))
    op.set(emb, "vwn_mode", cfg.embedding)
    op.swap(emb, WideEmbedding)


@torch.no_grad()
def _reduce_parameters(cfg: VWNConfig, ref: torch.Tensor) -> tuple[nn.Parameter, nn.Parameter | None]:
    """``(vwn_reduce [D, D'], vwn_group_norm_weight [D'] or None)``: the reduce reads the first m slots
    (function-preserving init) or is N(0, 1/D') (init="paper")."""
    d = cfg.hidden_size
    wide = cfg.n * d // cfg.m
    reduce = torch.zeros(d, wide, dtype=ref.dtype, device=ref.device)
    if cfg.init == "preserve":
        reduce[:, :d] = torch.eye(d, dtype=ref.dtype, device=ref.device)
    else:
        reduce.normal_(0.0, wide ** -0.5)
    group = nn.Parameter(torch.ones(wide, dtype=ref.dtype, device=ref.device)) if cfg.use_group_norm() else None
    return nn.Parameter(reduce), group


def _widen_final(final: nn.Module, cfg: VWNConfig, ref: torch.Tensor, op: _Surgery) -> None:
    reduce, group = _reduce_parameters(cfg, ref)
    op.set(final, "vwn_reduce", reduce)
    op.set(final, "vwn_group_size", cfg.hidden_size)
    op.set(final, "vwn_group_norm_weight", group)
    op.swap(final, ReduceMixin)


def _widen_block(block: nn.Module, analysis: _BlockAnalysis, cfg: VWNConfig, op: _Surgery, *,
                 stream_entry: bool = False, stream_exit: bool = False) -> None:
    """Swap in the widened forward of one block. ``stream_entry``: the first block of a stream widened at its input
    (it gains ``vwn_expand`` ``[D', D]``); ``stream_exit``: the last block of a stream reduced at its exit (it
    gains ``vwn_reduce`` and ``vwn_group_norm_weight``)."""
    ref = _float_param(block)
    ghcs = nn.ModuleList(
        GHC(None, cfg.hidden_size, cfg.n, cfg.m, dynamic=cfg.dynamic, eps=cfg.eps, recompute=cfg.recompute)
        for _ in analysis.updates
    )
    if ref is not None:
        ghcs.to(dtype=ref.dtype, device=ref.device)
    ref = ref if ref is not None else next(ghcs.parameters())
    if stream_entry:
        op.set(block, ENTRY_EXPAND, nn.Parameter(_expansion(cfg, ref)))
    if stream_exit:
        reduce, group = _reduce_parameters(cfg, ref)
        op.set(block, EXIT_REDUCE, reduce)
        op.set(block, EXIT_GROUP_NORM, group)
    graph = copy.deepcopy(analysis.graph)  # the analysis stays reusable
    node_map = dict(zip(analysis.graph.nodes, graph.nodes))
    updates = [u.remapped(node_map) for u in analysis.updates]
    group_size = cfg.hidden_size if stream_exit else None
    fn, src = lower_block_graph(graph, updates, ghcs, analysis.name,
                                stream_entry=analysis.spec.stream_placeholder() if stream_entry else None,
                                exit_group_size=group_size)
    runner = BlockRunner(analysis.name, [u.sublayers for u in analysis.updates], stream_entry, group_size)
    runner.install(analysis.spec.key, fn, src)
    op.set(block, GHC_CONTAINER, ghcs)
    op.set(block, "vwn_runner", runner)
    op.swap(block, WidenedBlockMixin)


def _pad_final_output(target: nn.Module, structure: ModelStructure, op: _Surgery) -> None:
    op.set(target.get_submodule(structure.final), "vwn_pad_output", True)
    head = target.get_submodule(structure.head)
    op.set(head, "vwn_in_features", structure.hidden_size)
    op.swap(head, SliceInputMixin)


def check_probe_output(target: nn.Module, structure: ModelStructure, label: str, values: bool,
                       hint: str = "") -> None:
    """Run the probe inputs through a rewritten model: its output must have the original's shape and, when
    ``values``, the original's values to float rounding; else an :class:`UnsupportedModelError` starting with
    ``label`` (e.g. "the widened") and ending with ``hint``."""
    got = primary_output(run_quietly(target, structure.example_inputs))
    ref = structure.reference_output
    if got is None or ref is None:
        return
    if got.shape != ref.shape:
        raise UnsupportedModelError(
            f"{label} {type(target).__name__} returns shape {tuple(got.shape)} on the probe input, the "
            f"original {tuple(ref.shape)}"
        )
    if not values or not ref.is_floating_point():
        return
    tol = (1e-4 if ref.dtype in (torch.float32, torch.float64) else 2e-2) * (1.0 + float(ref.abs().max()))
    diff = float((got.float() - ref.float()).abs().max())
    if not diff <= tol:
        raise UnsupportedModelError(
            f"{label} {type(target).__name__} does not reproduce the original output on the probe input "
            f"(max abs difference {diff:.3g} > {tol:.3g}){hint}"
        )


def _check_output(target: nn.Module, structure: ModelStructure, cfg: VWNConfig) -> None:
    """Run the probe inputs through the widened model; with init='preserve' the output must be the original's."""
    check_probe_output(target, structure, "the widened", cfg.init == "preserve",
                       "; its model-level code uses the residual stream in a way the rewrite does not follow")


def _hook_model(target: nn.Module, op: _Surgery) -> None:
    """A Hugging Face model gets :class:`~vwn_transform.modules.WideModelMixin` (same class name, same forward
    signature): ``resize_token_embeddings`` resizes the wide table too, ``inputs_embeds`` of the wrong width is a
    clear ValueError, ``num_parameters(exclude_embeddings=True)`` excludes ``vwn_extra``."""
    if not callable(getattr(target, "resize_token_embeddings", None)):
        return
    try:
        emb = target.get_input_embeddings()
    except (AttributeError, NotImplementedError) as exc:
        log.info("%s has no get_input_embeddings() (%s): resize_token_embeddings will not resize the wide table",
                 type(target).__name__, exc)
        return
    if isinstance(emb, WideEmbedding):
        old = swap_model_class(target)
        op.on_undo(lambda: setattr(target, "__class__", old))


def _record_recipe(target: nn.Module, original: nn.Module, structure: ModelStructure, blocks, cfg: VWNConfig,
                   op: _Surgery, inputs_given: bool = False) -> None:
    """``model.vwn_recipe``: what save/load needs to replay widen() (and, for HF models, ``config.vwn_recipe``,
    which ``save_pretrained`` writes into config.json). ``inputs_given``: the user passed example_inputs, whose form
    (shapes, dtypes, keywords) the recipe records so that a replay can probe the model the same way."""
    wrapped = {"embeddings": list(structure.embeddings) if structure.entry == "embeddings" else [],
               "blocks": [b.name for b in blocks], "final": structure.final, "head": structure.head}
    if structure.entry == "block":
        wrapped["entry"] = structure.first_block  # the stream is widened at this block's input
    if structure.final_kind == "block":
        wrapped["exit"] = structure.last_block  # and reduced at this block's output
    recipe = {"vwn_config": cfg.to_dict(), **recipe_fields(target, type(original).__name__, structure, inputs_given),
              "wrapped": wrapped}
    before = getattr(original, "vwn_recipe", None)
    if isinstance(before, dict) and before.get("transform"):
        recipe["before"] = before  # widen() of a WideNet / Adaptive Width model: load replays that first
    install_recipe(target, recipe, op)


def recipe_fields(target: nn.Module, original_class: str, structure: ModelStructure, inputs_given: bool) -> dict:
    """What every recipe records besides its transform: the toolkit version, the original class, the form of
    the user's example inputs (so a replay probes the model the same way) and the attention implementation."""
    from vwn_transform import __version__

    fields = {"vwn_transform_version": __version__, "model_class": original_class}
    spec = structure.example_inputs.to_spec() if inputs_given else None
    if spec is not None:
        fields["example_inputs"] = spec
    attn = getattr(getattr(target, "config", None), "_attn_implementation", None)
    if isinstance(attn, str):
        fields["attn_implementation"] = attn  # a runtime choice HF does not save; replayed for exact logits
    return fields


def install_recipe(target: nn.Module, recipe: dict, op: _Surgery) -> None:
    """``target.vwn_recipe = recipe``, and for Hugging Face models ``config.vwn_recipe`` (``save_pretrained``
    writes it into config.json); both undone through ``op``."""
    op.set(target, "vwn_recipe", recipe)
    hf_config = getattr(target, "config", None)
    if hf_config is not None and hasattr(hf_config, "to_json_string"):
        had = "vwn_recipe" in hf_config.__dict__
        old = hf_config.__dict__.get("vwn_recipe")
        hf_config.vwn_recipe = recipe
        op.on_undo(lambda: setattr(hf_config, "vwn_recipe", old) if had else delattr(hf_config, "vwn_recipe"))


def _check_widened_output(target: nn.Module, model_name: str, structure, cfg: VWNConfig, op) -> None:
    """Run the widened model on the probe input and compare with the original's output (``_check_output``). Some
    model code (GPT-2, GPTBigCode) reshapes the final normed state with the width it read off the embedding
    output and fails when the reduce returns D features: then, explicitly and logged, the reduce's output is padded
    back to D' and the head reads its first D features; any other failure is an :class:`UnsupportedModelError`."""
    try:
        _check_output(target, structure, cfg)
        return
    except UnsupportedModelError:
        raise
    except Exception as exc:
        if structure.final_kind != "norm" or structure.head is None:
            raise UnsupportedModelError(
                f"the widened {model_name} fails on the probe input: {type(exc).__name__}: {exc}") from exc
        first = exc
    log.info("%s fails when %s returns %d features (%s: %s); padding the reduce output to D' and slicing it at %s",
             model_name, structure.final, cfg.hidden_size, type(first).__name__, first, structure.head)
    _pad_final_output(target, structure, op)
    try:
        _check_output(target, structure, cfg)
    except UnsupportedModelError:
        raise
    except Exception as exc2:
        raise UnsupportedModelError(
            f"the widened {model_name} fails on the probe input: {type(first).__name__}: {first}") from exc2


def widen(model: nn.Module, ratio: Any = None, *, m: int | None = None, config: VWNConfig | None = None,
          dynamic: bool = True, init: str = "preserve", embedding: str = "table", inplace: bool = False,
          example_inputs: Any = None, mtp: bool = False, mtp_weight: float = 0.3) -> nn.Module:
    """Rewrite a pre-norm transformer into its Virtual-Width form.

    Args:
        model: a pre-norm transformer: a Hugging Face causal LM, the reference :class:`~vwn_transform.models.GPT`,
            a vision/audio encoder or classifier, a DiT-style stack, or any module whose blocks compute
            ``s + f(norm(s))``. A stream that does not start at token tables is widened at the first block's input;
            one that no single module consumes after the last block is reduced at the last block's output.
        ratio: virtual-width ratio r = n/m: int, float, Fraction or a string such as ``"3/2"``.
        m: slots per backbone vector; default the smallest m dividing the hidden size with ``ratio*m`` integer.
        config: a full :class:`VWNConfig` instead of ratio/m/dynamic/init/embedding.
        dynamic: input-dependent GHC coefficients (the paper's default).
        init: ``"preserve"``: the widened model computes what the original computed (to float rounding);
            ``"paper"``: the paper's initialization for training from scratch.
        embedding: ``"table"`` or ``"factorized"``.
        inplace: rewrite ``model`` itself instead of a deep copy.
        example_inputs: inputs for the probe forward: a tensor or a tuple of positional inputs, or a dict of keyword
            inputs (``{"pixel_values": x}``); default a ``[1, 8]`` batch of token ids. Their form is recorded in
            the recipe, so that loading a checkpoint probes the model the same way.
        mtp: add next-2-token prediction (:mod:`vwn_transform.mtp`): when the model is called with labels
            (``labels`` or ``targets``), its loss becomes next-token loss + ``mtp_weight`` x next-2-token loss;
            without labels it computes exactly what it would without MTP.
        mtp_weight: weight of the next-2-token loss (default 0.3).

    Returns:
        The widened model, of the same class (``model.vwn_config`` records the config). widen() runs the probe
        input through it once and, with ``init="preserve"``, checks that it reproduces the original output.

    Raises:
        TypeError: ``model`` is not an nn.Module.
        ValueError: a bad ratio, m or option (the message names the value and what is valid).
        UnsupportedModelError: the structure cannot be widened (post-LN, no residual stream, already widened).
        On any error the input model is unchanged.

    Example:
        >>> import torch, vwn_transform
        >>> from vwn_transform.models import GPT, GPTConfig
        >>> model = GPT(GPTConfig(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=32)).eval()
        >>> wide = vwn_transform.widen(model, 1.5)
        >>> idx = torch.randint(0, 64, (2, 10))
        >>> torch.allclose(wide(idx)[0], model(idx)[0], atol=1e-5)
        True
    """
    start = time.perf_counter()
    if not isinstance(inplace, bool):
        raise ValueError(f"inplace must be True or False, got {inplace!r}")
    cfg, structure, blocks = _analyze(model, config, ratio, m, dynamic, init, embedding, example_inputs, mtp,
                                      mtp_weight)
    if cfg.mtp:
        label_convention(model)  # refuse before any work on the model
    params_original = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    _warn_unusual(cfg, params_original, _count_added(model, cfg, structure, sum(len(b.updates) for b in blocks)),
                  type(model).__name__)
    target = model if inplace else copy.deepcopy(model)
    op = _Surgery()
    try:
        if structure.entry == "embeddings":
            for name in structure.embeddings:
                _widen_embedding(target.get_submodule(name), cfg, op)
        for i, analysis in enumerate(blocks):
            _widen_block(target.get_submodule(analysis.name), analysis, cfg, op,
                         stream_entry=i == 0 and structure.entry == "block",
                         stream_exit=i == len(blocks) - 1 and structure.final_kind == "block")
        if structure.final_kind != "block":
            final = target.get_submodule(structure.final)
            ref = _float_param(final)
            _widen_final(final, cfg, ref if ref is not None else _float_param(target), op)
        op.set(target, "vwn_config", cfg)
        _check_widened_output(target, type(model).__name__, structure, cfg, op)
        if cfg.mtp:
            attach_mtp(target, structure, cfg, op)
        _hook_model(target, op)
        _record_recipe(target, model, structure, blocks, cfg, op, inputs_given=example_inputs is not None)
    except BaseException:
        op.rollback()
        raise
    log.info("widened %s to r=%s ((m, n) = (%d, %d)): %d GHC modules, %s, reduce %s in %.2fs",
             type(model).__name__, Fraction(cfg.n, cfg.m), cfg.m, cfg.n, sum(len(b.updates) for b in blocks),
             f"{len(structure.embeddings)} embeddings" if structure.entry == "embeddings"
             else f"stream expanded at the input of {structure.first_block}",
             f"at the output of {structure.last_block}" if structure.final_kind == "block" else f"at {structure.final}",
             time.perf_counter() - start)
    return target
