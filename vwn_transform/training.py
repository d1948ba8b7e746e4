"""Training helpers for widened models."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

__all__ = ["add_to_loss", "param_groups", "returned_loss", "STATIC_GHC_MATRICES"]

#: parameter names of the static GHC matrices; the paper applies no weight decay to them
STATIC_GHC_MATRICES = ("read", "carry", "write")


def _is_static_ghc(module: nn.Module, local_name: str) -> bool:
    from .modules import GHC

    return isinstance(module, GHC) and local_name in STATIC_GHC_MATRICES


def param_groups(model: nn.Module, weight_decay: float, *,
                 decay: Callable[[str, nn.Parameter], bool] | None = None) -> list[dict]:
    """Optimizer parameter groups: no weight decay on the static GHC matrices (``read``, ``carry``, ``write``),
    as the paper prescribes; elsewhere ``decay(name, param)`` decides (default: matrices and embeddings decay,
    vectors such as biases and norm gains do not).

    Returns ``[{"params": decayed, "weight_decay": weight_decay, "names": [...]},
    {"params": not_decayed, "weight_decay": 0.0, "names": [...]}]``; parameters shared between modules (tied
    embeddings) appear once, and frozen parameters are left out.

    Example:
        >>> import torch, vwn_transform
        >>> from vwn_transform.models import GPT, GPTConfig
        >>> wide = vwn_transform.widen(GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=32)), 2)
        >>> groups = vwn_transform.param_groups(wide, weight_decay=0.1)
        >>> opt = torch.optim.AdamW(groups, lr=1e-3)
        >>> any(n.endswith("vwn_ghc.0.carry") for n in groups[1]["names"])
        True
    """
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or not weight_decay >= 0:
        raise ValueError(f"weight_decay must be a float >= 0, got {weight_decay!r}")
    if decay is not None and not callable(decay):
        raise TypeError(f"decay must be a callable (name, param) -> bool, got {type(decay).__name__}")
    rule = decay or (lambda name, p: p.dim() >= 2)
    groups = ({"params": [], "weight_decay": float(weight_decay), "names": []},
              {"params": [], "weight_decay": 0.0, "names": []})
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for local, p in module.named_parameters(recurse=False):
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            name = f"{module_name}.{local}" if module_name else local
            no_decay = _is_static_ghc(module, local) or not rule(name, p)
            group = groups[1] if no_decay else groups[0]
            group["params"].append(p)
            group["names"].append(name)
    return list(groups)


def returned_loss(output: Any) -> torch.Tensor | None:
    """The loss a model output carries (see :func:`add_to_loss`), or None."""
    if isinstance(output, tuple):
        return next((v for v in output if isinstance(v, torch.Tensor) and v.dim() == 0), None)
    if hasattr(output, "get"):
        loss = output.get("loss")
        return loss if isinstance(loss, torch.Tensor) else None
    return None


def add_to_loss(output: Any, term: torch.Tensor) -> tuple[Any, torch.Tensor | None]:
    """``output`` with ``term`` added to the loss it carries (a ``loss`` field of a ModelOutput/dict, or the
    scalar of a tuple such as nanoGPT's ``(logits, loss)``); ``(output, None)`` when it carries no loss (no
    labels were given). Returns the new output and the loss before the addition."""
    if isinstance(output, tuple):
        idx = next((i for i, v in enumerate(output) if isinstance(v, torch.Tensor) and v.dim() == 0), None)
        if idx is None:
            return output, None
        before = output[idx]
        return output[:idx] + (before + term,) + output[idx + 1:], before
    before = returned_loss(output)
    if before is not None:
        output["loss"] = before + term
    return output, before
