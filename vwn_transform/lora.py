"""LoRA fine-tuning of widened models with Hugging Face PEFT (``pip install peft``; tested with peft 0.21).

``get_peft_model`` freezes every parameter that is not a LoRA weight, so without help the VWN parameters never
train. They live in three kinds of places (``vwn_*`` names, see :mod:`vwn_transform.modules`):

- the GHC modules ``<block>.vwn_ghc.<i>`` (whole modules that hold nothing else);
- the input embedding(s): ``vwn_extra`` (or ``vwn_expand``) next to the base table ``weight``;
- the final norm: ``vwn_reduce`` (and ``vwn_group_norm_weight``) next to the norm's own ``weight``/``bias``.

PEFT trains and saves extra parameters only module by module (``LoraConfig(modules_to_save=...)``), so
:func:`peft_modules_to_save` names the GHC modules one by one (PEFT cannot wrap the ``vwn_ghc`` ModuleList) and the
embedding and final-norm modules that carry VWN parameters. PEFT replaces each by a wrapper holding a trainable
copy; the copies are what the model runs, what ``save_pretrained`` writes and what ``merge_and_unload`` keeps.

The embedding and final-norm copies also copy the base parameters of those modules (the embedding table, often
tied to the head, and the norm gain): :func:`share_base_weights` points the copies back at the frozen originals,
so the table is neither trained nor held twice and a tied head stays tied. The adapter file still holds those
base tensors (PEFT saves whole modules); they are the base model's own values, so loading them changes nothing.

As for any ``modules_to_save`` entry, PEFT also keeps a frozen copy of each wrapped module as it was before
fine-tuning (``<name>.original_module``, what ``disable_adapter()`` runs), and it warns when a tied embedding is
listed. Do not set ``ensure_weight_tying=True``, and do not also list these modules in ``target_modules``.
"""

from __future__ import annotations

from torch import nn

from .config import UnsupportedModelError
from .modules import GHC

__all__ = ["peft_modules_to_save", "share_base_weights"]

_VWN_PREFIX = "vwn_"


def _is_vwn_name(name: str) -> bool:
    """A parameter/module path with a ``vwn_*`` component (added by widen())."""
    return any(part.startswith(_VWN_PREFIX) for part in name.split("."))


def peft_module(model: nn.Module) -> tuple[str, nn.Module] | None:
    """The first ``(name, module)`` of ``model`` defined by peft (a PeftModel, an injected LoRA layer), or None."""
    return next(((name, mod) for name, mod in model.named_modules()
                 if type(mod).__module__.split(".")[0] == "peft"), None)


def peft_modules_to_save(model: nn.Module) -> list[str]:
    """The module names to pass as ``LoraConfig(modules_to_save=...)`` so that LoRA fine-tuning trains and saves
    every VWN parameter of a widened model.

    Derived from the model itself: every GHC module, and every other module that directly holds a ``vwn_*``
    parameter (the widened embeddings and the final norm). Names are full module paths; PEFT matches them as
    suffixes, so they stay valid once the model sits inside a ``PeftModel``. After ``get_peft_model`` call
    :func:`share_base_weights` (the embedding table and the final norm's own weights then stay frozen and shared).

    Raises:
        TypeError: ``model`` is not an nn.Module.
        ValueError: the model is not widened, or is already a PEFT model (call this on the widened model before
            ``get_peft_model``).
        UnsupportedModelError: the model was widened with ``mtp=True`` (its hooks sit on the final norm, which
            PEFT would replace), or a VWN parameter sits where PEFT cannot wrap it.

    Example:
        >>> import torch, vwn_transform
        >>> from peft import LoraConfig, get_peft_model
        >>> from vwn_transform.models.hf_tiny import tiny_hf_model
        >>> wide = vwn_transform.widen(tiny_hf_model("llama"), 1.5)
        >>> names = vwn_transform.peft_modules_to_save(wide)
        >>> names[:3]
        ['model.embed_tokens', 'model.layers.0.vwn_ghc.0', 'model.layers.0.vwn_ghc.1']
        >>> peft_model = get_peft_model(wide, LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
        ...                                              modules_to_save=names))
        >>> shared = vwn_transform.lora.share_base_weights(peft_model)
        >>> all(p.requires_grad for n, p in peft_model.named_parameters()
        ...     if "vwn_" in n and ".original_module." not in n)
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"peft_modules_to_save expects a torch.nn.Module, got {type(model).__name__}")
    if peft_module(model) is not None:
        raise ValueError(
            f"{type(model).__name__} already carries PEFT modules; call peft_modules_to_save(widened_model) before "
            "get_peft_model(widened_model, LoraConfig(..., modules_to_save=names))"
        )
    cfg = getattr(model, "vwn_config", None)
    if cfg is None:
        raise ValueError(f"{type(model).__name__} is not widened (no vwn_config); widen it with "
                         "vwn_transform.widen(model, ratio) first")
    if cfg.mtp:
        raise UnsupportedModelError(
            "LoRA fine-tuning of a model widened with mtp=True is not supported: the next-2-token hooks sit on the "
            "final norm, which PEFT replaces by a trainable copy; widen without mtp for LoRA fine-tuning"
        )
    modules = dict(model.named_modules())
    ghcs = sorted((n for n, m in modules.items() if isinstance(m, GHC)), key=len)  # outermost first
    order = {name: i for i, name in enumerate(modules)}
    targets: list[str] = []
    for pname, _ in model.named_parameters():
        if not _is_vwn_name(pname):
            continue
        owner = pname.rpartition(".")[0]
        target = next((g for g in ghcs if owner == g or owner.startswith(g + ".")), owner)
        holder = modules.get(target)
        if not target or isinstance(holder, (nn.ModuleList, nn.ModuleDict, nn.ParameterList, nn.ParameterDict)):
            raise UnsupportedModelError(
                f"parameter {pname!r} sits on {target or 'the root module'} "
                f"({type(holder).__name__}), which PEFT modules_to_save cannot wrap"
            )
        if target not in targets:
            targets.append(target)
    targets.sort(key=order.__getitem__)
    # PEFT matches modules_to_save entries as name suffixes: each name must select its own module only
    for target in targets:
        clash = [n for n in modules if n != target and n.endswith(target)]
        if clash:
            raise UnsupportedModelError(f"modules_to_save entry {target!r} would also select {clash[:3]} (PEFT "
                                        "matches the entries as name suffixes)")
    return targets


def share_base_weights(peft_model: nn.Module) -> list[str]:
    """Point the base (non-``vwn_*``) parameters inside PEFT's trainable copies of VWN modules back at the frozen
    originals; returns the names of the parameters shared.

    ``get_peft_model`` copies each ``modules_to_save`` module whole, so the copy of a widened embedding holds a
    trainable duplicate of the embedding table (untied from a tied head) and the copy of the final norm a
    trainable norm gain. After this call they are the base model's own frozen parameters again: only LoRA and VWN
    parameters train, the table is held once, a tied head stays tied, and ``merge_and_unload()`` returns the
    model with the original table. Call it after ``get_peft_model`` (and, to save memory, after
    ``PeftModel.from_pretrained``), and again after PEFT calls that set ``requires_grad`` on whole adapter
    modules (``enable_adapter_layers``, leaving ``disable_adapter()``, ``set_adapter``). Do not use it when you
    list the embedding in ``modules_to_save`` to fine-tune the table itself.

    Raises:
        TypeError: ``peft_model`` is not an nn.Module.
        ValueError: the model has no PEFT modules_to_save copies of VWN modules, or a PEFT config asks for
            ``ensure_weight_tying`` (PEFT would tie the head to the trainable copy of the table).
    """
    if not isinstance(peft_model, nn.Module):
        raise TypeError(f"share_base_weights expects a torch.nn.Module, got {type(peft_model).__name__}")
    try:
        from peft.utils.other import ModulesToSaveWrapper
    except ImportError as exc:
        raise ImportError("share_base_weights needs peft: pip install peft") from exc
    configs = getattr(peft_model, "peft_config", None) or {}
    tying = sorted(name for name, c in configs.items() if getattr(c, "ensure_weight_tying", False))
    if tying:
        raise ValueError(f"adapter(s) {tying} set ensure_weight_tying=True: PEFT then ties the head to the "
                         "trainable copy of the embedding table; leave it False (share_base_weights keeps a tied "
                         "head tied to the frozen table)")
    shared: list[str] = []
    wrappers = 0
    for wname, wrapper in peft_model.named_modules():
        if not isinstance(wrapper, ModulesToSaveWrapper):
            continue
        original = wrapper.original_module
        if not any(_is_vwn_name(f"{wname}.{n}") for n, _ in original.named_parameters()):
            continue  # a modules_to_save entry of the user's own: left alone
        wrappers += 1
        for adapter, clone in wrapper.modules_to_save.items():
            for local, param in list(clone.named_parameters()):
                if _is_vwn_name(f"{wname}.{local}"):
                    continue
                owner, _, pname = local.rpartition(".")
                source = original.get_submodule(owner) if owner else original
                base = getattr(source, pname)
                base.requires_grad_(False)  # again too: PEFT's enable/disable calls set it on whole copies
                if param is not base:
                    setattr(clone.get_submodule(owner) if owner else clone, pname, base)
                shared.append(f"{wname}.modules_to_save.{adapter}.{local}")
    if not wrappers:
        raise ValueError(f"{type(peft_model).__name__} has no PEFT copies of VWN modules; build it with "
                         "get_peft_model(wide, LoraConfig(..., modules_to_save=vwn_transform.peft_modules_to_save("
                         "wide)))")
    return shared
