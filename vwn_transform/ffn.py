"""What the FFN width transforms (:mod:`~vwn_transform.widenet`, :mod:`~vwn_transform.adaptive_width`) share with
widen(): the probe and block matching that find each block's feed-forward sublayer, the recipe that save/load
replays (built with widen()'s ``recipe_fields``/``install_recipe``), refusals and argument checks. Their extra loss
terms are added with :func:`vwn_transform.training.add_to_loss`, as MTP's are.

Finding the FFN is structural, not a table of module names: the probe finds the blocks, the block graph pass finds
their residual updates and the leaf modules each update's branch calls; of those, the FFN is the one non-norm
sublayer that maps every position independently (its output at one position does not change when the other
positions' inputs change: attention fails this, an MLP passes it). Exactly one such sublayer per block is required.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import re
from typing import Any

import torch
from torch import nn

from .config import UnsupportedModelError
from .lora import peft_module
from .modules import is_vwn_module
from vwn_transform.passes.probe import ModelStructure, _restore_training, is_norm_module, probe_model, run_quietly

__all__ = ["FFNSite", "locate_ffns", "TRANSFORMS"]

log = logging.getLogger("vwn_transform")

# names of the width transforms a recipe can name (``recipe["transform"]``); widen() is the recipe with vwn_config
TRANSFORMS = ("widenet", "adaptive_width")
# an FFN that already routes tokens to experts
_MOE_NAME = re.compile(r"moe|expert|router|sparse", re.IGNORECASE)


@dataclasses.dataclass
class FFNSite:
    """One block's feed-forward sublayer."""

    block: str  # module path of the block
    name: str  # module path of the FFN (``model.layers.0.mlp``)
    update: int  # index of the block's residual update whose branch calls it
    input_shape: tuple[int, ...]  # shape of its input on the probe forward


def check_plain(model: nn.Module, who: str) -> None:
    """Refuse a model another transform (or PEFT) already changed; ``who`` names the caller in the message."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{who}() expects a torch.nn.Module, got {type(model).__name__}")
    found = peft_module(model)
    if found is not None:
        raise UnsupportedModelError(
            f"{found[0] or 'the model'} is a {type(found[1]).__name__} from peft: {who}() takes the plain model "
            "(merge the adapter first: peft_model.merge_and_unload())")
    if getattr(model, "vwn_config", None) is not None or any(is_vwn_module(m) for m in model.modules()):
        raise UnsupportedModelError(
            f"{type(model).__name__} is already widened by vwn_transform.widen(); apply {who}() to the original model "
            f"first and widen() the result ({who} then widen composes; the other order does not)")
    recipe = getattr(model, "vwn_recipe", None)
    if isinstance(recipe, dict) and recipe.get("transform") in TRANSFORMS:
        raise UnsupportedModelError(
            f"{type(model).__name__} was already transformed by vwn_transform.{recipe['transform']}(); {who}() takes "
            "a model no width transform has changed")


def _token_wise(module: nn.Module, x: torch.Tensor, hidden: int) -> tuple[bool, str]:
    """Whether ``module`` maps each position of ``x [..., hidden]`` independently, shape-preserving; and why not."""
    if x.dim() < 2 or x.shape[-1] != hidden or x.numel() // hidden < 2:
        return False, f"its input has shape {tuple(x.shape)}"
    restore = _restore_training(module)
    try:
        module.eval()
        with torch.no_grad():
            y = module(x)
            if not isinstance(y, torch.Tensor) or y.shape != x.shape:
                return False, f"it returns {tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__}"
            rows = y.reshape(-1, hidden)  # [P, D]
            gen = torch.Generator(device="cpu").manual_seed(0)
            # keep the first and then the last position, change all others: causal attention leaves the first
            # position alone and mixes into the last; bidirectional attention mixes into both
            for keep in (0, rows.shape[0] - 1):
                other = x.clone()
                flat = other.view(-1, hidden)  # [P, D]
                noise = torch.randn(flat.shape, generator=gen).to(device=x.device, dtype=x.dtype)
                changed = torch.arange(flat.shape[0], device=x.device) != keep  # [P]
                flat[changed] = noise[changed] * (x.float().std().to(x.dtype) + 1) + 0.5
                y2 = module(other).reshape(-1, hidden)  # [P, D]
                tol = 1e-5 * (1.0 + float(rows.abs().max()))
                if float((y2[keep] - rows[keep]).abs().max()) > tol:
                    return False, "its output at one position depends on the other positions"
    finally:
        restore()
    return True, ""


def locate_ffns(model: nn.Module, example_inputs: Any, who: str, names: list[str] | None = None
                ) -> tuple[ModelStructure, list[FFNSite]]:
    """Probe ``model`` and find one position-wise FFN sublayer per block (see the module docstring). ``names``:
    the FFNs a recipe recorded (a load replays on zeroed weights, where every sublayer looks position-wise): each
    block's FFN is then the candidate of that name."""
    from .widen import analyze_blocks

    structure = probe_model(model, example_inputs)
    hidden = structure.hidden_size
    blocks = analyze_blocks(structure)
    candidates: list[tuple[str, int, str]] = []  # (block, update index, full module path)
    for b in blocks:
        block = model.get_submodule(b.name)
        for ui, update in enumerate(b.updates):
            for sub in update.sublayers:
                mod = block.get_submodule(sub)
                # an FFN has weights: dropout and activations around it are position-wise too, but not FFNs
                if not is_norm_module(mod) and any(True for _ in mod.parameters()):
                    candidates.append((b.name, ui, f"{b.name}.{sub}"))
    inputs: dict[str, tuple] = {}

    def capture(name):
        def hook(mod, args, kwargs):
            inputs.setdefault(name, (args, kwargs))
        return hook

    handles = [model.get_submodule(name).register_forward_pre_hook(capture(name), with_kwargs=True)
               for _, _, name in candidates]
    try:
        run_quietly(model, structure.example_inputs)
    finally:
        for h in handles:
            h.remove()
    sites, why = [], {}
    for b in blocks:
        found = []
        for block_name, ui, name in candidates:
            if block_name != b.name:
                continue
            args, kwargs = inputs.get(name, ((), {}))
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            extra = [k for k, v in kwargs.items() if isinstance(v, torch.Tensor)]
            if len(args) != 1 or len(tensors) != 1 or extra:
                why[name] = "it takes more than the normed stream"
                continue
            if names is not None:
                ok, reason = name in names, "not the recorded FFN"
            else:
                ok, reason = _token_wise(model.get_submodule(name), tensors[0], hidden)
            if ok:
                found.append(FFNSite(b.name, name, ui, tuple(tensors[0].shape)))
            else:
                why[name] = reason
        if len(found) != 1:
            seen = ", ".join(f"{n.rsplit('.', 1)[-1]} ({r})" for n, r in why.items() if n.startswith(b.name + ".")) \
                or "none"
            raise UnsupportedModelError(
                f"{who}() needs one position-wise feed-forward sublayer per block; {b.name} "
                f"({type(model.get_submodule(b.name)).__name__}) has "
                + ("none: " + seen if not found else f"{len(found)}: {', '.join(s.name for s in found)}"))
        site = found[0]
        ffn = model.get_submodule(site.name)
        for sub_name, sub in ffn.named_modules():
            if _MOE_NAME.search(type(sub).__name__) or _MOE_NAME.search(sub_name.rsplit(".", 1)[-1]):
                raise UnsupportedModelError(
                    f"{site.name} ({type(ffn).__name__}) is already a mixture of experts ({sub_name or 'itself'}: "
                    f"{type(sub).__name__}); {who}() transforms dense FFNs")
        sites.append(site)
    return structure, sites


def set_module(root: nn.Module, path: str, value: nn.Module, op) -> None:
    """Replace the submodule at ``path`` (through ``op``, so a failure later undoes it)."""
    parent, _, attr = path.rpartition(".")
    op.set(root.get_submodule(parent) if parent else root, attr, value)


def record_recipe(model: nn.Module, original_class: str, transform: str, options: dict, wrapped: dict,
                  structure: ModelStructure, inputs_given: bool, op) -> dict:
    """``model.vwn_recipe`` (and ``config.vwn_recipe`` for Hugging Face models) for a width transform: what
    :func:`vwn_transform.load` / :func:`vwn_transform.from_pretrained` replay."""
    from .widen import install_recipe, recipe_fields

    recipe = {"transform": transform, "options": options,
              **recipe_fields(model, original_class, structure, inputs_given), "wrapped": wrapped}
    install_recipe(model, recipe, op)
    return recipe


def check_preserved(model: nn.Module, structure: ModelStructure, who: str) -> None:
    """The transformed model must reproduce the original's output on the probe input (to float rounding)."""
    from .widen import check_probe_output

    check_probe_output(model, structure, f"{who}(): the transformed", values=True)


def deep_copy_unless(model: nn.Module, inplace: bool) -> nn.Module:
    if not isinstance(inplace, bool):
        raise ValueError(f"inplace must be True or False, got {inplace!r}")
    return model if inplace else copy.deepcopy(model)


def positive_int(value: Any, name: str, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be an integer {bound}, got {value!r}")
    return value


def float_in(value: Any, name: str, low: float, high: float, *, low_open=False, high_open=False) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if isinstance(value, bool) or not (v > low if low_open else v >= low) or not (v < high if high_open else v <= high):
        lo, hi = ("(" if low_open else "["), (")" if high_open else "]")
        raise ValueError(f"{name} must be in {lo}{low:g}, {high:g}{hi}, got {value!r}")
    return v

