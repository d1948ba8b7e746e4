"""nn.Modules that hold VWN parameters: the GHC module and the class mixins widen() swaps onto existing modules.

widen() keeps every original module where it was (same path, same parameters, same class by ``isinstance``):
it swaps the module's class to a generated subclass that adds the VWN behaviour and registers the new
parameters next to the old ones. So ``model.embed_tokens.weight`` stays the tied head's parameter and the
state_dict of a widened model is the original one plus ``*.vwn_*`` entries.
"""

from __future__ import annotations

import functools
import inspect
import types

import torch
import torch.nn.functional as F
from torch import nn

import vwn_transform.ops  # registers torch.ops.vwn.*; stack_gates

__all__ = ["GHC", "SlotRMSNorm", "WideEmbedding", "WideModelMixin", "expand_stream", "is_vwn_module", "reduce_stream",
           "swap_class", "swap_model_class"]


class SlotRMSNorm(nn.Module):
    """RMS norm over each slot of width ``d``; its gain is shared by all slots. Holds ``weight`` ``[d]``."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        # h: [..., n, d] -> normalized over d
        hf = h.float()
        return (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()).to(h.dtype)


class GHC(nn.Module):
    """Generalized Hyper-Connection around one residual sublayer (vwn-math.md).

    ``forward(h)`` takes the over-width state ``[..., n*dim/m]``, reads the backbone input ``x`` ``[..., dim]``,
    calls ``sublayer(x)`` and writes its output back: ``H' = B(H)^T Z + Carry(H)^T H``.
    Parameters: ``read`` (n, m), ``carry`` (n, n), ``write`` (m, n); when dynamic also ``proj`` (dim/m, 2m+n),
    ``scale_read``, ``scale_carry``, ``scale_write`` and ``norm.weight`` (dim/m). Paper init by default
    (which is also the function-preserving one: the first m slots follow the original residual stream).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from vwn_transform import GHC
        >>> ffn = nn.Sequential(nn.LayerNorm(64), nn.Linear(64, 64))
        >>> ghc = GHC(ffn, dim=64, n=3, m=2)          # ratio 1.5, slot width 32
        >>> h = torch.randn(2, 5, 96)                   # [batch, seq, n*dim/m]
        >>> ghc(h).shape
        torch.Size([2, 5, 96])

    ``contract(h)`` and ``expand(h, z, carry_c, write_c)`` are the two halves, for code where the sublayer is not
    one callable. (widen() does not call them: its block rewrite calls the ops they call, with this module's
    parameters, so that one fusion pass serves widened blocks and the compile backend; see
    ``vwn_transform.passes.block_graph``.)

    ``recompute=True`` (dynamic GHC only): the mixing coefficients and the read statistics are not kept for the
    backward; they are recomputed there from the state (which is kept anyway), once per GHC call. It saves
    ``N * n * (3m + 2n + 1)`` fp32 values per GHC call (``benchmarks/memory.py``) for one more read of the state
    in the backward. Eager mode drops them with saved-tensor hooks (:class:`_Recomputed`); under torch.compile,
    where those hooks do not reach inside the compiled graph, the read runs as a ``torch.utils.checkpoint``
    region, which AOT autograd's partitioner recomputes in the backward (once per GHC call, as in eager; the
    read's output ``x`` then is recomputed too rather than kept by the sublayer). Same gradients either way.
    """

    def __init__(self, sublayer: nn.Module | None, dim: int, n: int, m: int, dynamic: bool = True,
                 eps: float = 1e-6, recompute: bool = False):
        super().__init__()
        for name, v in (("dim", dim), ("n", n), ("m", m)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"GHC {name} must be a positive int, got {v!r}")
        if dim % m:
            raise ValueError(f"GHC m={m} must divide dim={dim} (slot width = dim/m)")
        if n < m:
            raise ValueError(f"GHC needs n >= m, got n={n}, m={m}")
        if sublayer is not None and not callable(sublayer):
            raise TypeError(f"GHC sublayer must be callable or None, got {type(sublayer).__name__}")
        self.sublayer = sublayer
        self.dim, self.n, self.m, self.dynamic, self.eps = dim, n, m, dynamic, eps
        self.recompute = bool(recompute) and dynamic
        d = dim // m
        self.read = nn.Parameter(torch.empty(n, m))
        self.carry = nn.Parameter(torch.empty(n, n))
        self.write = nn.Parameter(torch.empty(m, n))
        if dynamic:
            self.proj = nn.Parameter(torch.empty(d, 2 * m + n))
            self.scale_read = nn.Parameter(torch.empty(n, m))
            self.scale_carry = nn.Parameter(torch.empty(n, n))
            self.scale_write = nn.Parameter(torch.empty(m, n))
            self.norm = SlotRMSNorm(d, eps)
        self.reset_parameters()

    @property
    def slot_width(self) -> int:
        return self.dim // self.m

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Paper init: read ``[I_m; 0]``, carry ``I_n``, write ``B[i, k] = (k mod m == i)``, ``W = 0``, gates 1."""
        n, m = self.n, self.m
        self.read.zero_()
        self.read[:m].copy_(torch.eye(m))
        self.carry.copy_(torch.eye(n))
        k = torch.arange(n)
        self.write.copy_((k[None, :] % m == torch.arange(m)[:, None]).to(self.write.dtype))
        if self.dynamic:
            self.proj.zero_()
            self.scale_read.fill_(1.0)
            self.scale_carry.fill_(1.0)
            self.scale_write.fill_(1.0)
            self.norm.weight.fill_(1.0)

    def _check_state(self, h: torch.Tensor) -> None:
        width = self.n * self.slot_width
        if h.shape[-1] != width:
            raise ValueError(
                f"GHC expects an over-width state of last dimension n*dim/m = {self.n}*{self.dim}/{self.m} = "
                f"{width}, got shape {tuple(h.shape)}"
            )

    def stacked_gates(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(gates, scales)``: the maps and the gate scales stacked as ``[read | carry | write^T]`` ``[n, 2m+n]``,
        what ``torch.ops.vwn.ghc_read_dynamic`` takes (built per call; differentiable into the parameters)."""
        return (vwn_transform.ops.stack_gates(self.read, self.carry, self.write),
                vwn_transform.ops.stack_gates(self.scale_read, self.scale_carry, self.scale_write))

    def _read_dynamic(self, h: torch.Tensor, gates: torch.Tensor | None = None, scales: torch.Tensor | None = None):
        if gates is None:
            gates, scales = self.stacked_gates()
        return torch.ops.vwn.ghc_read_dynamic(h, self.norm.weight, self.proj, gates, scales, self.eps)

    def _read_coefficients(self, h: torch.Tensor):
        x, carry_c, write_c, _stats = self._read_dynamic(h)
        return x, carry_c, write_c

    def contract(self, h: torch.Tensor):
        """``h [..., n*d] -> (x [..., m*d], carry_c, write_c)``: the backbone input and the mixing coefficients."""
        self._check_state(h)
        if self.dynamic:
            if self.recompute and torch.is_grad_enabled() and torch.compiler.is_compiling():
                # Dynamo turns the region into a tag_activation_checkpoint op; AOT autograd tags the read node
                # "must recompute", so the partitioner saves none of its outputs and reruns it in the backward,
                # once for both the write's backward (coefficients) and the read's (stats)
                return torch.utils.checkpoint.checkpoint(self._read_coefficients, h, use_reentrant=False)
            if self.recompute and torch.is_grad_enabled():
                recomputed = _Recomputed(self, h)
                gates, scales = self.stacked_gates()
                # the state and the stacked gates are kept; everything else the read op saves (its stats) is dropped
                with recomputed.hooks(keep=(h, gates, scales)):
                    x, carry_c, write_c, stats = self._read_dynamic(h, gates, scales)
                recomputed.mark(carry_c=carry_c, write_c=write_c, stats=stats)
                return x, carry_c, write_c
            x, carry_c, write_c, _stats = self._read_dynamic(h)
            return x, carry_c, write_c
        return torch.ops.vwn.ghc_read_static(h, self.read), self.carry, self.write.t()

    def expand(self, h: torch.Tensor, z: torch.Tensor, carry_c: torch.Tensor, write_c: torch.Tensor):
        """``H' = WriteT Z + Carry^T H``: ``[..., n*d]``, ``[..., m*d]`` -> ``[..., n*d]``."""
        if z.shape[-1] != self.dim:
            raise ValueError(f"GHC sublayer output must have last dimension dim={self.dim}, got {tuple(z.shape)}")
        recomputed = _Recomputed.of(carry_c) if self.recompute and not torch.compiler.is_compiling() else None
        if recomputed is not None and torch.is_grad_enabled():
            with recomputed.hooks(keep=(h, z)):  # the coefficients are dropped, recomputed in the backward
                return torch.ops.vwn.ghc_write(h, z, carry_c, write_c)
        return torch.ops.vwn.ghc_write(h, z, carry_c, write_c)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.sublayer is None:
            raise RuntimeError("this GHC has no sublayer; call contract()/expand() around the sublayer yourself")
        x, carry_c, write_c = self.contract(h)
        return self.expand(h, self.sublayer(x), carry_c, write_c)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, n={self.n}, m={self.m}, dynamic={self.dynamic}"


class _Recomputed:
    """The read outputs of one dynamic GHC call that the backward gets by recomputation instead of storage
    (eager mode; under torch.compile, see :class:`GHC`).

    Saved-tensor hooks replace the coefficient tensors (and the read op's stats) by a name when autograd saves
    them; the first unpack in the backward reruns the read op on the kept state, without grad, and serves every
    name from that one result. The parameters and the state are kept as they are.
    """

    #: bytes of saved tensors replaced by recomputation since the process started (benchmarks and tests read it;
    #: an outer saved-tensor hook cannot see inside these hooks)
    dropped_bytes = 0

    def __init__(self, ghc: "GHC", h: torch.Tensor):
        self.ghc, self.h = ghc, h
        self.ids: dict[int, str] = {}
        self.values: dict[str, torch.Tensor] | None = None

    @classmethod
    def of(cls, carry_c: torch.Tensor) -> "_Recomputed | None":
        return getattr(carry_c, "_vwn_recomputed", None)

    def mark(self, **named: torch.Tensor) -> None:
        for name, t in named.items():
            self.ids[id(t)] = name
        named["carry_c"]._vwn_recomputed = self  # expand() finds its read through the coefficient tensor

    def hooks(self, keep: tuple):
        kept = {id(t) for t in keep} | {id(p) for p in self.ghc.parameters()}

        def pack(t):
            if id(t) in kept:
                return t
            _Recomputed.dropped_bytes += t.untyped_storage().nbytes()
            return self.ids.get(id(t), "stats")  # the read op's only other saved tensor is its stats output

        def unpack(saved):
            return saved if isinstance(saved, torch.Tensor) else self.get(saved)

        return torch.autograd.graph.saved_tensors_hooks(pack, unpack)

    def get(self, name: str) -> torch.Tensor:
        if self.values is None:
            with torch.no_grad():
                _x, carry_c, write_c, stats = self.ghc._read_dynamic(self.h)
            self.values = {"carry_c": carry_c, "write_c": write_c, "stats": stats}
        return self.values[name]


# ------------------------------------------------------------------------------------------------------------
# class mixins swapped onto existing modules
# ------------------------------------------------------------------------------------------------------------
class VWNMixin:
    """Marker base of every class widen() swaps onto a module."""

    vwn_base_class: type


class WideEmbedding(VWNMixin, nn.Embedding):
    """An embedding whose output is over-width ``[..., D']``.

    table:      ``[lookup(ids) | vwn_extra[ids]]`` (the original table is block 0, so a tied head stays tied)
    factorized: ``lookup(ids) @ vwn_expand^T`` with ``vwn_expand`` ``[D', D]``

    Swapped in *below* the module's own class (``VWNOPTLearnedPositionalEmbedding(OPTLearned..., WideEmbedding)``)
    so it sees the indices that reach ``nn.Embedding.forward`` after any subclass logic (position offsets,
    scaling), and the subclass's post-processing (e.g. Gemma 3's embedding scale) applies to all slots.

    ``embedding_dim`` keeps its ``nn.Embedding`` meaning, the width of ``weight`` (``D``): ``weight`` is still
    ``[num_embeddings, embedding_dim]``, the tied head's parameter, and what resizing, sharding and quantization
    code reads. The width of the output is ``vwn_width`` (``D'``).
    """

    vwn_mode: str

    @property
    def vwn_width(self) -> int:
        """``D'``: the width of this embedding's output (``embedding_dim`` is the width of ``weight``, ``D``)."""
        if self.vwn_mode == "table":
            return self.weight.shape[1] + self.vwn_extra.shape[1]
        return self.vwn_expand.shape[0]

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        base = super().forward(input)  # [..., D]
        if self.vwn_mode == "table":
            if self.vwn_extra.shape[0] != self.weight.shape[0]:
                raise RuntimeError(
                    f"the wide table is out of step: weight has {self.weight.shape[0]} rows but vwn_extra has "
                    f"{self.vwn_extra.shape[0]}; resize the vocabulary with model.resize_token_embeddings(n) on the "
                    "widened top-level model, which resizes both"
                )
            extra = F.embedding(input, self.vwn_extra)  # [..., D' - D]
            return torch.cat([base, extra.to(base.dtype)], dim=-1)  # [..., D']
        return F.linear(base, self.vwn_expand.to(base.dtype))  # [..., D']

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, vwn_width={self.vwn_width}, vwn_mode={self.vwn_mode}"


def preserve_extra_slots(rows: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """The extra slots of the function-preserving wide table for base rows ``[R, D]``: ``[R, D' - D]``, extra
    virtual slot ``k`` (``m <= k < n``) a copy of backbone slot ``k mod m`` (as widen() builds them)."""
    slot = rows.shape[1] // m
    if n == m:
        return rows.new_empty(rows.shape[0], 0)
    return torch.cat([rows[:, (k % m) * slot:(k % m + 1) * slot] for k in range(m, n)], dim=1)  # [R, (n-m)*slot]


class ReduceMixin(VWNMixin):
    """Applies the over-width reduce ``W_reduce @ group_norm(h')`` before the module's own forward.

    With ``vwn_pad_output`` the result is zero-padded back to ``D'`` (for models whose code reshapes the
    normed state with the width it saw at the embedding, like GPT-2); the head then reads the first ``D``.
    """

    vwn_group_size: int
    vwn_pad_output: bool = False

    def forward(self, hidden_states, *args, **kwargs):
        wide = hidden_states.shape[-1]
        x = reduce_stream(hidden_states, self.vwn_reduce, getattr(self, "vwn_group_norm_weight", None),
                          self.vwn_group_size)  # [..., D]
        out = super().forward(x, *args, **kwargs)
        if self.vwn_pad_output:
            out = F.pad(out, (0, wide - out.shape[-1]))  # [..., D] -> [..., D'] (zeros)
        return out


def expand_stream(h: torch.Tensor, expand: torch.Tensor) -> torch.Tensor:
    """The stream widened where it enters the block stack (models whose stream does not start at token tables):
    ``h [..., D] @ expand^T -> [..., D']`` (``expand`` ``[D', D]``; function-preserving init: virtual slot k a copy
    of backbone slot k mod m)."""
    return F.linear(h, expand.to(h.dtype))  # [..., D']


def reduce_stream(h: torch.Tensor, reduce: torch.Tensor, group_norm_weight: torch.Tensor | None,
                  group_size: int) -> torch.Tensor:
    """The over-width reduce ``W_reduce @ group_norm(h')``: ``[..., D'] -> [..., D]`` (``reduce`` ``[D, D']``; the RMS
    group norm over groups of ``group_size`` only when ``group_norm_weight`` is given)."""
    if group_norm_weight is not None:
        hf = h.float().unflatten(-1, (-1, group_size))  # [..., D'] -> [..., D'/D, D]
        hf = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + 1e-6)
        h = (hf.flatten(-2) * group_norm_weight.float()).to(h.dtype)  # [..., D']
    return F.linear(h, reduce.to(h.dtype))  # [..., D]


class SliceInputMixin(VWNMixin):
    """A head fed by a padded reduce: reads the first ``vwn_in_features`` features of its input."""

    vwn_in_features: int

    def forward(self, input, *args, **kwargs):
        return super().forward(input[..., : self.vwn_in_features], *args, **kwargs)


class WidenedBlockMixin(VWNMixin):
    """A residual block whose forward runs the rewritten graph (see ``passes.block_graph``)."""

    def forward(self, *args, **kwargs):
        return self.vwn_runner(self, args, kwargs)

    @torch.compiler.assume_constant_result
    def _vwn_graph_name(self, key: tuple) -> str:
        """``self.vwn_runner.graph_name(self, key)``, which Dynamo runs as plain Python when it meets it while
        tracing and whose result (a string) it treats as a constant; the traced code then reads the runner
        attribute of that name (guarded) and inlines the generated forward.

        The lookup, and on a miss the torch.fx trace and lowering of a new signature, depend only on the block
        and the key (constants and types); none of it runs on tensors. Traced by Dynamo instead, a miss would be
        a graph break (Dynamo cannot trace torch.fx's tracer), so every signature first met under torch.compile
        would break the graph.

        A method of the block, not a function taking the runner and the block: Dynamo passes the object a
        constant method is bound to as it is, but before torch 2.13 it converts every argument with
        ``as_python_constant()``, which a user-defined object (the runner) or a module (the block) does not
        have (``AsPythonConstantNotImplementedError: UserDefinedObjectVariable(BlockRunner) is not a constant``).
        """
        return self.vwn_runner.graph_name(self, key)


_class_cache: dict[tuple[type, type], type] = {}


def swap_class(module: nn.Module, mixin: type) -> type:
    """Give ``module`` a generated subclass of its class that adds ``mixin``; returns the old class.

    A mixin that is itself a module class (``WideEmbedding``) goes *below* the module's class in the MRO, so
    the class's own forward runs first and calls into it; a plain mixin goes first and wraps the forward.
    """
    base = type(module)
    key = (mixin, base)
    cls = _class_cache.get(key)
    if cls is None:
        if issubclass(mixin, nn.Module):
            module_base = next(b for b in mixin.__bases__ if issubclass(b, nn.Module))
            if not issubclass(base, module_base):
                raise TypeError(f"{mixin.__name__} applies to {module_base.__name__} modules, got {base.__name__}")
            bases = (mixin,) if base is module_base else (base, mixin)
        else:
            bases = (mixin, base)
        cls = type(f"VWN{base.__name__}", bases, {"vwn_base_class": base, "__module__": base.__module__})
        _class_cache[key] = cls
    module.__class__ = cls
    return base


class WideModelMixin(VWNMixin):
    """Swapped onto a widened Hugging Face model (``swap_model_class``): keeps the HF model API that touches the
    vocabulary or the embedding width consistent with the wide table.

    - ``resize_token_embeddings``: HF resizes ``weight`` (and an untied head); the extra slots of the wide table
      (``vwn_extra``) follow: old rows are kept, new rows are built the way widen() builds them (init="preserve":
      copies of the new base row's slots, so the widened model stays function-preserving relative to the
      resized original; init="paper": HF's own initializer for new rows, applied to the extra slots). An untied
      head that widen() had changed gets its VWN class back after HF replaced it by a plain ``nn.Linear``.
    - ``forward``: ``inputs_embeds`` must be over-width (``D'``); anything else is a ValueError saying so.
    - ``num_parameters(exclude_embeddings=True)``: ``vwn_extra`` is an embedding table and is excluded too.
      ``vwn_expand`` (embedding="factorized") is a per-token matmul and stays counted, as it costs compute.
    """

    def _vwn_check_inputs_embeds(self, embeds) -> None:
        # the WideEmbedding itself, or inside a wrapper (PEFT's ModulesToSaveWrapper holds copies of it)
        emb = next((mod for mod in self.get_input_embeddings().modules() if isinstance(mod, WideEmbedding)), None)
        wide = emb.vwn_width if emb is not None else None
        got = embeds.shape[-1] if isinstance(embeds, torch.Tensor) and embeds.dim() >= 1 else None
        if wide is not None and got != wide:
            shape = tuple(embeds.shape) if isinstance(embeds, torch.Tensor) else type(embeds).__name__
            raise ValueError(
                f"inputs_embeds has width {got} (shape {shape}), but this widened {type(self).__name__} expects "
                f"over-width embeddings of width D' = {wide} (hidden size D = {emb.weight.shape[1]} widened by "
                f"vwn_transform); build them with model.get_input_embeddings()(input_ids), which returns width {wide}"
            )

    @torch.no_grad()
    def _vwn_resize_extra(self, emb: WideEmbedding, old_rows: int, mean_resizing: bool) -> None:
        rows = emb.weight.shape[0]
        extra = emb.vwn_extra
        if extra.shape[0] == rows:
            return
        keep = min(old_rows, extra.shape[0], rows)
        new = torch.empty(rows, extra.shape[1], dtype=extra.dtype, device=extra.device)
        new[:keep] = extra[:keep]
        added = rows - keep
        if added:
            cfg = self.vwn_config
            if cfg.init == "preserve":
                new[keep:] = preserve_extra_slots(emb.weight[keep:], cfg.n, cfg.m).to(new.dtype)
            elif mean_resizing:
                # HF's initializer for new rows (mean and covariance of the old rows), on the extra slots
                self._init_added_embeddings_weights_with_mean(types.SimpleNamespace(weight=extra[:keep]),
                                                              types.SimpleNamespace(weight=new), keep, added)
            else:
                fresh = nn.Embedding(added, extra.shape[1], device=extra.device, dtype=extra.dtype)
                self._init_weights(fresh)  # HF's init of new rows (normal, std = config.initializer_range)
                new[keep:] = fresh.weight
        extra.data = new  # same Parameter (optimizer state and requires_grad stay attached), new rows

    def resize_token_embeddings(self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None,
                                mean_resizing: bool = True):
        emb = self.get_input_embeddings()
        if not isinstance(emb, WideEmbedding):
            return super().resize_token_embeddings(new_num_tokens, pad_to_multiple_of, mean_resizing)
        old_rows = emb.weight.shape[0]
        head = self.get_output_embeddings()
        # HF sets requires_grad on the whole embedding module from weight's flag; the VWN parameters keep theirs
        flags = {name: p.requires_grad for name, p in emb.named_parameters(recurse=False) if name != "weight"}
        out = super().resize_token_embeddings(new_num_tokens, pad_to_multiple_of, mean_resizing)
        for name, flag in flags.items():
            getattr(emb, name).requires_grad_(flag)
        if emb.vwn_mode == "table":
            self._vwn_resize_extra(emb, old_rows, mean_resizing)
        new_head = self.get_output_embeddings()
        if head is not None and new_head is not head and isinstance(head, VWNMixin) and \
                type(new_head) is head.vwn_base_class:
            # an untied head was rebuilt by HF as a plain module: give it back its VWN class and attributes
            for name, value in vars(head).items():
                if name.startswith("vwn_") and name not in new_head.__dict__:
                    setattr(new_head, name, value)
            for store in ("_parameters", "_buffers", "_modules"):
                for name, value in getattr(head, store).items():
                    if name.startswith("vwn_"):
                        getattr(new_head, store)[name] = value
            new_head.__class__ = type(head)
        return out

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        total = super().num_parameters(only_trainable=only_trainable, exclude_embeddings=exclude_embeddings)
        if exclude_embeddings:
            for mod in self.modules():
                extra = mod._parameters.get("vwn_extra") if isinstance(mod, WideEmbedding) else None
                if extra is not None and (extra.requires_grad or not only_trainable):
                    total -= extra.numel()
        return total


_model_class_cache: dict[type, type] = {}


def swap_model_class(model: nn.Module) -> type:
    """Give a widened Hugging Face model a generated subclass of its class with :class:`WideModelMixin`; returns
    the old class.

    The subclass keeps the class's name and qualified name (``save_pretrained`` writes the name into
    config.json's ``architectures``), and its ``forward`` wraps the class's own with ``functools.wraps``, so
    ``inspect.signature(model.forward)`` (read by generate(), Trainer and PEFT) is unchanged.
    """
    base = type(model)
    cls = _model_class_cache.get(base)
    if cls is None:
        base_forward = base.forward
        params = list(inspect.signature(base_forward).parameters)
        pos = params.index("inputs_embeds") - 1 if "inputs_embeds" in params else None  # -1: self

        @functools.wraps(base_forward)
        def forward(self, *args, **kwargs):
            embeds = kwargs.get("inputs_embeds")
            if embeds is None and pos is not None and len(args) > pos:
                embeds = args[pos]
            if embeds is not None:
                self._vwn_check_inputs_embeds(embeds)
            return base_forward(self, *args, **kwargs)

        cls = type(base.__name__, (WideModelMixin, base), {
            "vwn_base_class": base, "forward": forward,
            "__module__": base.__module__, "__qualname__": base.__qualname__,
        })
        _model_class_cache[base] = cls
    model.__class__ = cls
    return base


def is_vwn_module(module: nn.Module) -> bool:
    return isinstance(module, (VWNMixin, GHC))
