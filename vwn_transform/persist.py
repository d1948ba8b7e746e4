"""Save and load widened models by recipe replay.

A widened model records how it was made in ``model.vwn_recipe`` (the :class:`VWNConfig`, the toolkit version,
the original class and the modules that were wrapped). Loading rebuilds the base architecture without
initializing it, replays :func:`~vwn_transform.widen` with the recipe, checks that the rebuilt model wraps the
same modules, and loads the weights: the loaded model's outputs equal the saved model's bit for bit.

- Hugging Face models: ``model.save_pretrained(dir)`` (config.json carries ``vwn_recipe``) and
  :func:`from_pretrained`.
- Any module: :func:`save` and :func:`load` with a factory that builds the base model.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .config import VWNConfig

log = logging.getLogger("vwn_transform")

__all__ = ["CheckpointError", "from_pretrained", "load", "save"]

_FORMAT = "vwn_transform.checkpoint"
_FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: corrupt, truncated, not ours, or not matching the model."""


def _recipe_of(model: nn.Module) -> dict:
    recipe = getattr(model, "vwn_recipe", None)
    if recipe is None:
        raise ValueError(f"{type(model).__name__} was not widened by vwn_transform (no vwn_recipe); save plain "
                         "models with torch.save(model.state_dict(), path)")
    return recipe


def _unique_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() if v.device.type != "cpu" else v.detach()
            for k, v in model.state_dict().items()}


def save(model: nn.Module, path) -> Path:
    """Write a widened model's weights and recipe to one file (atomically: a temporary file is moved into place).

    Example:
        >>> import os, tempfile, torch, vwn_transform
        >>> from vwn_transform.models import GPT, GPTConfig
        >>> cfg = GPTConfig(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=32)
        >>> wide = vwn_transform.widen(GPT(cfg).eval(), "3/2")
        >>> path = vwn_transform.save(wide, os.path.join(tempfile.mkdtemp(), "wide.pt"))
        >>> back = vwn_transform.load(path, lambda: GPT(cfg))
        >>> idx = torch.randint(0, 64, (1, 8))
        >>> torch.equal(back(idx)[0], wide(idx)[0])
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"save expects a torch.nn.Module, got {type(model).__name__}")
    recipe = _recipe_of(model)
    target = Path(path)
    if target.is_dir():
        raise ValueError(f"path {str(target)!r} is a directory; give a file name such as {str(target / 'model.pt')!r}")
    if not target.parent.is_dir():
        raise ValueError(f"cannot write {str(target)!r}: the folder {str(target.parent)!r} does not exist")
    payload = {"format": _FORMAT, "format_version": _FORMAT_VERSION, "recipe": json.dumps(recipe),
               "state_dict": _unique_state(model)}
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _read_checkpoint(path) -> tuple[dict, dict[str, torch.Tensor]]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no checkpoint at {str(p)!r}")
    try:
        payload = torch.load(p, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise CheckpointError(f"{str(p)!r} is not a readable checkpoint (truncated or corrupt?): "
                              f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
    if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
        raise CheckpointError(f"{str(p)!r} is not a vwn_transform checkpoint (written by vwn_transform.save)")
    if payload.get("format_version") != _FORMAT_VERSION:
        raise CheckpointError(f"{str(p)!r} has checkpoint format version {payload.get('format_version')!r}; this "
                              f"vwn_transform reads version {_FORMAT_VERSION}")
    try:
        recipe = json.loads(payload["recipe"])
        state = payload["state_dict"]
    except (KeyError, TypeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{str(p)!r} is missing its recipe or weights") from exc
    return recipe, state


def _zero_floats(model: nn.Module) -> None:
    # the parameters are overwritten by the checkpoint; zeros only keep the replay's probe forward finite.
    # Buffers keep the values their modules computed (rotary inv_freq and other non-persistent buffers are not
    # in the checkpoint).
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point():
                p.zero_()


def _replay(base: nn.Module, recipe: dict, where: str) -> nn.Module:
    from .widen import widen

    cfg = VWNConfig.from_dict(recipe["vwn_config"])
    saved_class = recipe.get("model_class")
    if saved_class and type(base).__name__ != saved_class:
        raise CheckpointError(f"{where} was saved from a {saved_class}, but the model to load into is a "
                              f"{type(base).__name__}")
    existing = getattr(base, "vwn_config", None)
    if existing is not None:
        raise CheckpointError(f"the model to load into is already widened ({_describe(existing)}); the factory "
                              f"must build the base model. {where} holds {_describe(cfg)}")
    try:
        wide = widen(base, config=cfg, inplace=True)
    except ValueError as exc:  # includes UnsupportedModelError
        raise CheckpointError(f"{where} holds {_describe(cfg)}; replaying that recipe on the {type(base).__name__} "
                              f"to load into failed: {exc}") from exc
    saved, rebuilt = recipe.get("wrapped"), wide.vwn_recipe["wrapped"]
    if saved and saved != rebuilt:
        diff = {k: (saved.get(k), rebuilt.get(k)) for k in saved if saved.get(k) != rebuilt.get(k)}
        raise CheckpointError(f"{where} does not match the model's architecture: saved vs rebuilt {diff}")
    return wide


def _describe(cfg: VWNConfig) -> str:
    return f"n={cfg.n}, m={cfg.m}, hidden={cfg.hidden_size}, dynamic={cfg.dynamic}"


def _load_weights(model: nn.Module, state: dict[str, torch.Tensor], recipe: dict, where: str) -> None:
    expected = model.state_dict()
    aliases = _aliases(model)
    missing = [k for k in expected if k not in state and not any(a in state for a in aliases.get(k, ()))]
    unexpected = [k for k in state if k not in expected]
    wrong = [(k, tuple(state[k].shape), tuple(expected[k].shape)) for k in state
             if k in expected and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        cfg = VWNConfig.from_dict(recipe["vwn_config"])
        have = getattr(model, "vwn_config", None)
        raise CheckpointError(
            f"{where} ({_describe(cfg)}) does not fit the rebuilt model ({_describe(have) if have else 'plain'}): "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}, shape mismatches {wrong[:5]}"
        )
    dtype = next((t.dtype for t in state.values() if t.is_floating_point()), None)
    if dtype is not None:
        model.to(dtype)
    model.load_state_dict(state, strict=False)  # tied aliases are covered by their source (checked above)


def _aliases(model: nn.Module) -> dict[str, tuple[str, ...]]:
    """state_dict key -> other keys naming the same tensor (tied weights)."""
    by_id: dict[int, list[str]] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        by_id.setdefault(id(t), []).append(name)
    return {n: tuple(o for o in names if o != n) for names in by_id.values() for n in names}


def load(path, model_factory: Callable[[], nn.Module]) -> nn.Module:
    """Rebuild a model saved with :func:`save`: ``model_factory()`` builds the base (un-widened) model, widen()
    is replayed with the saved recipe, and the weights are loaded. Raises :class:`CheckpointError` when the file
    is corrupt or does not match the model (the message names both), leaving nothing half-loaded."""
    if not callable(model_factory):
        raise TypeError(f"model_factory must be a callable returning the base model, got {type(model_factory).__name__}")
    recipe, state = _read_checkpoint(path)
    base = model_factory()
    if not isinstance(base, nn.Module):
        raise TypeError(f"model_factory returned {type(base).__name__}, expected an nn.Module")
    _zero_floats(base)
    wide = _replay(base.eval(), recipe, repr(str(path)))
    _load_weights(wide, state, recipe, repr(str(path)))
    return wide


def _read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else \
        ["model.safetensors"]
    state: dict[str, torch.Tensor] = {}
    for name in files:
        f = folder / name
        if not f.is_file():
            raise CheckpointError(f"{str(folder)!r} has no {name} (expected the weights save_pretrained writes)")
        try:
            state.update(load_file(str(f)))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{str(f)!r} is not a readable safetensors file (truncated or corrupt?): {exc}"
                                  ) from exc
    return state


def from_pretrained(path, **kwargs: Any) -> nn.Module:
    """Load a widened Hugging Face causal LM saved with ``model.save_pretrained(path)``.

    transformers loads the base model's weights (with its own checkpoint conversions, no initialization of
    loaded weights), widen() is replayed with the recipe stored in config.json (``vwn_recipe``), and the
    ``*.vwn_*`` weights are loaded from the same safetensors files. ``kwargs`` go to transformers'
    ``from_pretrained`` (e.g. ``dtype=torch.bfloat16``).

    Example:
        >>> import tempfile, torch, vwn_transform
        >>> from vwn_transform.models.hf_tiny import tiny_hf_model
        >>> wide = vwn_transform.widen(tiny_hf_model("llama"), 2)
        >>> folder = tempfile.mkdtemp()
        >>> wide.save_pretrained(folder)
        >>> back = vwn_transform.from_pretrained(folder)
        >>> ids = torch.randint(0, 96, (1, 6))
        >>> torch.equal(back(ids).logits, wide(ids).logits)
        True
    """
    try:
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError as exc:
        raise ImportError("from_pretrained needs transformers: pip install 'vwn_transform[hf]'") from exc
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{str(folder)!r} has no config.json (expected a folder written by save_pretrained)")
    config = AutoConfig.from_pretrained(str(folder))
    recipe = getattr(config, "vwn_recipe", None)
    if not isinstance(recipe, dict) or "vwn_config" not in recipe:
        raise CheckpointError(f"{str(folder)!r} holds a plain {type(config).__name__} checkpoint (no vwn_recipe in "
                              "config.json); load it with transformers and widen it")
    state = _read_safetensors(folder)  # also fails early on a truncated or corrupt file
    del config.vwn_recipe  # the base model is built plain; widen() records the recipe again
    # the saved model's attention implementation, unless the caller chooses: eager vs sdpa differ in rounding
    attn = recipe.get("attn_implementation")
    if attn and "attn_implementation" not in kwargs:
        kwargs["attn_implementation"] = attn
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the *.vwn_* keys are "unexpected" for the base model by design
    try:
        base = AutoModelForCausalLM.from_pretrained(str(folder), config=config, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
    base_keys = set(base.state_dict())
    wide = _replay(base.eval(), recipe, repr(str(folder)))
    added = {k: v for k, v in wide.state_dict().items() if k not in base_keys}
    missing = sorted(k for k in added if k not in state)
    wrong = [(k, tuple(state[k].shape), tuple(v.shape)) for k, v in added.items() if k in state and
             state[k].shape != v.shape]
    if missing or wrong:
        cfg = VWNConfig.from_dict(recipe["vwn_config"])
        raise CheckpointError(f"{str(folder)!r} ({_describe(cfg)}) does not fit the rebuilt model "
                              f"({_describe(wide.vwn_config)}): missing {missing[:5]}, shape mismatches {wrong[:5]}")
    wide.load_state_dict({k: state[k] for k in added}, strict=False)
    return wide
