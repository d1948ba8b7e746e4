"""Next-2-token prediction (MTP) for widened models (vwn-math.md, "Multi-token prediction").

For position t the MTP module takes the last over-width state ``H_L[t]`` and the over-width embedding of token
t+1, normalizes each slot of both, concatenates them slot by slot and applies one linear ``2*d_b -> d_b`` shared
by all slots; one extra VWN layer (a copy of the model's last widened block) follows, then the model's own output
path (reduce, final norm, head). Its logits at t predict token t+2.

It is wired in with forward hooks that only act when the model is called with labels (Hugging Face ``labels``,
unshifted) or targets (nanoGPT ``targets``, already shifted by one): then the returned loss becomes
``next_token_loss + mtp_weight * next_2_token_loss`` and ``model.vwn_mtp.last_losses`` holds both parts
(detached). Without labels (generate(), ONNX export, plain inference) the model computes exactly what it did
without MTP.
"""

from __future__ import annotations

import copy
import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import UnsupportedModelError
from .modules import SlotRMSNorm
from .training import add_to_loss

__all__ = ["MTPModule", "attach_mtp"]

# positional/keyword arguments of the block that refer to the KV cache: the extra layer must not touch it
_CACHE_KWARGS = ("past_key_values", "past_key_value", "layer_past")


def label_convention(model: nn.Module) -> tuple[str, int, int]:
    """(argument name, shift from the next-token label to the next-2-token label, ignore index)."""
    params = inspect.signature(model.forward).parameters
    if "labels" in params:
        return "labels", 2, -100  # HF: labels[t] is token t itself; the model shifts by one
    if "targets" in params:
        return "targets", 1, -1  # nanoGPT: targets[t] is token t+1 already
    raise UnsupportedModelError(
        f"mtp=True needs the model's forward to take `labels` (Hugging Face convention) or `targets` (nanoGPT "
        f"convention); {type(model).__name__}.forward takes {list(params)}"
    )


def _is_cache(value: Any) -> bool:
    return type(value).__name__.endswith("Cache")  # transformers' DynamicCache, StaticCache, EncoderDecoderCache...


def _wide_arg(args: tuple, kwargs: dict, wide: int) -> tuple[Any, torch.Tensor] | None:
    """The over-width stream among a block's inputs: (position or keyword, tensor)."""
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor) and a.dim() >= 2 and a.shape[-1] == wide:
            return i, a
    for k, a in kwargs.items():
        if isinstance(a, torch.Tensor) and a.dim() >= 2 and a.shape[-1] == wide:
            return k, a
    return None


class MTPModule(nn.Module):
    """The next-2-token predictor; ``last_losses`` holds the parts of the last labelled forward.

    Its hooks are bound methods (not closures) so ``copy.deepcopy`` of the widened model rebinds them to the
    copy's own MTP module; the final norm and head are looked up by name on the model being called.
    """

    def __init__(self, block: nn.Module, n: int, slot: int, eps: float, weight: float, ref: torch.Tensor,
                 label_name: str, label_pos: int, shift: int, ignore_index: int, final: str, head: str | None):
        super().__init__()
        self.n, self.slot, self.weight = n, slot, weight
        self.label_name, self.label_pos, self.shift, self.ignore_index = label_name, label_pos, shift, ignore_index
        self.final_name, self.head_name = final, head
        self.state_norm = SlotRMSNorm(slot, eps).to(device=ref.device, dtype=ref.dtype)
        self.embed_norm = SlotRMSNorm(slot, eps).to(device=ref.device, dtype=ref.dtype)
        self.fuse = nn.Linear(2 * slot, slot, bias=False, device=ref.device, dtype=ref.dtype)
        nn.init.normal_(self.fuse.weight, std=(2 * slot) ** -0.5)
        self.block = block
        self.last_losses: dict[str, torch.Tensor] | None = None
        self._clear()

    def _clear(self) -> None:
        # per-forward captures, set only while a labelled forward runs
        self._active = False
        self._embedded: torch.Tensor | None = None
        self._final_state: torch.Tensor | None = None
        self._block_call: tuple | None = None

    @property
    def wide(self) -> int:
        return self.n * self.slot

    def fused_input(self, state: torch.Tensor, embedded: torch.Tensor) -> torch.Tensor:
        """``[B, T, n*d_b]`` state at t and embedding at t (shifted here to t+1) -> the extra layer's input."""
        nxt = F.pad(embedded[:, 1:], (0, 0, 0, 1))  # [B, T, D']: embedding of token t+1 (zeros at the end)
        s = self.state_norm(state.unflatten(-1, (self.n, self.slot)))  # [B, T, n, d_b]
        e = self.embed_norm(nxt.unflatten(-1, (self.n, self.slot)))  # [B, T, n, d_b]
        fused = self.fuse(torch.cat([s, e.to(s.dtype)], dim=-1))  # [B, T, n, 2 d_b] -> [B, T, n, d_b]
        return fused.flatten(-2)  # [B, T, D']

    def forward(self, *args, **kwargs):  # pragma: no cover - runs through the hooks
        raise RuntimeError("MTPModule runs inside the widened model's forward when labels are given")

    # ---- hooks ----
    def _labels(self, args, kwargs):
        return kwargs.get(self.label_name, args[self.label_pos] if len(args) > self.label_pos else None)

    def on_model_call(self, module, args, kwargs):
        self._clear()
        self._active = isinstance(self._labels(args, kwargs), torch.Tensor)

    def on_first_block(self, module, args, kwargs):
        if self._active:
            found = _wide_arg(args, kwargs, self.wide)
            self._embedded = None if found is None else found[1]

    def on_last_block(self, module, args, kwargs):
        if self._active:
            self._block_call = (args, kwargs)

    def on_final(self, module, args, kwargs):
        if self._active:
            found = _wide_arg(args, kwargs, self.wide)
            self._final_state = None if found is None else found[1]

    def on_model_return(self, module, args, kwargs, output):
        if not self._active:
            return None
        labels = self._labels(args, kwargs)
        captured = (self._embedded, self._final_state, self._block_call)
        self._clear()
        if any(c is None for c in captured):
            raise RuntimeError("MTP could not capture the over-width embedding, last state or last block call")
        embedded, state, (b_args, b_kwargs) = captured
        x = self.fused_input(state, embedded)  # [B, T, D']
        pos, _ = _wide_arg(b_args, b_kwargs, self.wide)
        # the extra layer must neither read nor extend the model's KV cache (passed by keyword or position)
        b_args = [None if _is_cache(a) else a for a in b_args]
        b_kwargs = {k: v for k, v in b_kwargs.items() if k not in _CACHE_KWARGS and not _is_cache(v)}
        if "use_cache" in b_kwargs:
            b_kwargs["use_cache"] = False
        if isinstance(pos, int):
            b_args[pos] = x
        else:
            b_kwargs[pos] = x
        out = self.block(*b_args, **b_kwargs)
        h = out[0] if isinstance(out, (tuple, list)) else out  # [B, T, D']
        y = module.get_submodule(self.final_name)(h)
        logits = module.get_submodule(self.head_name)(y) if self.head_name else y  # [B, T, V]
        future = labels[:, self.shift:]  # [B, T-shift]: token t+2 for position t
        mtp_loss = F.cross_entropy(logits[:, : future.shape[1]].flatten(0, 1).float(), future.flatten(),
                                   ignore_index=self.ignore_index)
        output, next_loss = add_to_loss(output, self.weight * mtp_loss)
        if next_loss is None:
            raise RuntimeError(f"MTP: {type(module).__name__} returned no scalar loss to add to")
        self.last_losses = {"next_token_loss": next_loss.detach(), "mtp_loss": mtp_loss.detach()}
        return output


def attach_mtp(model: nn.Module, structure, cfg, op) -> MTPModule:
    """Add ``model.vwn_mtp`` and its hooks (undone through ``op`` if widen() fails later)."""
    name, shift, ignore = label_convention(model)
    slot = cfg.hidden_size // cfg.m
    first = model.get_submodule(structure.blocks[0].name)
    last = model.get_submodule(structure.blocks[-1].name)
    final = model.get_submodule(structure.final)
    head = structure.head if structure.head and structure.head != structure.final else None
    ref = next(p for p in last.parameters() if p.is_floating_point())
    label_pos = list(inspect.signature(model.forward).parameters).index(name)
    mtp = MTPModule(copy.deepcopy(last), cfg.n, slot, cfg.eps, cfg.mtp_weight, ref, name, label_pos, shift, ignore,
                    structure.final, head)
    op.set(model, "vwn_mtp", mtp)
    handles = [
        model.register_forward_pre_hook(mtp.on_model_call, with_kwargs=True),
        first.register_forward_pre_hook(mtp.on_first_block, with_kwargs=True),
        last.register_forward_pre_hook(mtp.on_last_block, with_kwargs=True),
        final.register_forward_pre_hook(mtp.on_final, with_kwargs=True),
        model.register_forward_hook(mtp.on_model_return, with_kwargs=True),
    ]
    op.on_undo(lambda: [h.remove() for h in handles])
    return mtp
