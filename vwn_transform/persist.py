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

__all__ = ["CheckpointError", "apply_umask", "check_safetensors", "from_pretrained", "load", "load_plain_pretrained", "save",
           "writable_temp_file"]

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
    tmp = writable_temp_file(target)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def writable_temp_file(target: Path) -> Path:
    """An empty temporary file next to ``target`` (same folder, so ``os.replace`` onto it is atomic), with the
    permissions a plain ``open(target, "w")`` would give (``mkstemp`` creates files with mode 0600, which would
    make saved models unreadable to the user's group). A folder that cannot be written names ``target``."""
    target = Path(target)
    try:
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as exc:
        raise PermissionError(f"cannot write {str(target)!r}: {exc.strerror or exc} in the folder "
                              f"{str(target.parent)!r}") from None
    os.close(fd)
    apply_umask(Path(name))
    return Path(name)


def apply_umask(path: Path) -> None:
    """Give ``path`` (and, for a folder, everything under it) the mode a plain ``open``/``mkdir`` would have given:
    0666/0777 less the umask (``mkstemp``/``mkdtemp`` and safetensors create 0600/0700)."""
    umask = os.umask(0)
    os.umask(umask)
    for p in (path, *path.rglob("*")) if path.is_dir() else (path,):
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)


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
    """Rebuild the transformed model from its base: a recipe's ``before`` (the transform applied before widen())
    first, then the recipe itself (widen() with ``vwn_config``, or the width transform it names)."""
    from .widen import widen

    saved_class = recipe.get("model_class")
    if saved_class and type(base).__name__ != saved_class:
        raise CheckpointError(f"{where} was saved from a {saved_class}, but the model to load into is a "
                              f"{type(base).__name__}")
    existing = getattr(base, "vwn_config", None)
    if existing is not None:
        raise CheckpointError(f"the model to load into is already widened ({_describe(existing)}); the factory "
                              f"must build the base model. {where} holds {_recipe_text(recipe)}")
    if isinstance(recipe.get("before"), dict):
        base = _replay(base, recipe["before"], where)
    inputs = None
    if recipe.get("example_inputs"):  # the form of the inputs widen() was probed with (non-token models)
        from .passes.probe import ExampleInputs

        ref = next((p for p in base.parameters()), None)
        inputs = ExampleInputs.from_spec(recipe["example_inputs"], ref.device if ref is not None else "cpu")
    try:
        if recipe.get("transform"):
            wide = _replay_transform(base, recipe, inputs, where)
        else:
            wide = widen(base, config=VWNConfig.from_dict(recipe["vwn_config"]), inplace=True, example_inputs=inputs)
    except ValueError as exc:  # includes UnsupportedModelError
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"{where} holds {_recipe_text(recipe)}; replaying that recipe on the "
                              f"{type(base).__name__} to load into failed: {exc}") from exc
    saved, rebuilt = recipe.get("wrapped"), wide.vwn_recipe["wrapped"]
    if saved and saved != rebuilt:
        diff = {k: (saved.get(k), rebuilt.get(k)) for k in saved if saved.get(k) != rebuilt.get(k)}
        raise CheckpointError(f"{where} does not match the model's architecture: saved vs rebuilt {diff}")
    return wide


def _replay_transform(base: nn.Module, recipe: dict, inputs, where: str) -> nn.Module:
    from .ffn import TRANSFORMS

    name = recipe["transform"]
    if name == "widenet":
        from .widenet import replay_widenet

        return replay_widenet(base, recipe, inputs)
    if name == "adaptive_width":
        from .adaptive_width import replay_adaptive_width

        return replay_adaptive_width(base, recipe, inputs)
    raise CheckpointError(f"{where} names the transform {name!r}; this vwn_transform knows {list(TRANSFORMS)} and "
                          "widen()")


def _recipe_text(recipe: dict) -> str:
    """What a recipe does, for messages: ``n=4, m=2, ...`` for widen(), ``widenet {...}`` for a width transform."""
    if recipe.get("transform"):
        text = f"{recipe['transform']} {recipe.get('options') or {}}"
    else:
        text = _describe(VWNConfig.from_dict(recipe["vwn_config"]))
    before = recipe.get("before")
    return f"{_recipe_text(before)}, then widen() with {text}" if isinstance(before, dict) else text


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
        raise CheckpointError(
            f"{where} ({_recipe_text(recipe)}) does not fit the model rebuilt from it: "
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


def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"{str(index)!r} is not a readable safetensors index (truncated or corrupt?): "
                                  f"{type(exc).__name__}: {exc}") from exc
    else:
        names = ["model.safetensors"]
    files = [folder / name for name in names]
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"{str(folder)!r} has no {f.name} (expected the weights save_pretrained writes)")
    return files


def check_safetensors(folder) -> list[Path]:
    """The safetensors weight files of a ``save_pretrained`` folder, each checked to be complete (its header is
    read, no tensor data): a truncated or corrupt file raises :class:`CheckpointError` naming it. A folder with
    no safetensors weights (only legacy ``pytorch_model.bin``) returns ``[]``."""
    from safetensors import SafetensorError, safe_open

    folder = Path(folder)
    if not (folder / "model.safetensors.index.json").is_file() and not (folder / "model.safetensors").is_file():
        return []
    files = _safetensors_files(folder)
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as handle:
                handle.keys()
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{str(f)!r} is not a readable safetensors file (truncated or corrupt?): {exc}"
                                  ) from exc
    return files


def _read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for f in _safetensors_files(folder):
        try:
            state.update(load_file(str(f)))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{str(f)!r} is not a readable safetensors file (truncated or corrupt?): {exc}"
                                  ) from exc
    return state


def _hf_model_class(config):
    """The class that config.json's ``architectures`` names (what ``save_pretrained`` wrote: a causal LM, an image
    classifier, a vision encoder...), else ``AutoModelForCausalLM``."""
    import transformers

    names = getattr(config, "architectures", None) or []
    cls = getattr(transformers, names[0], None) if names else None
    if isinstance(cls, type) and hasattr(cls, "from_pretrained"):
        return cls
    return transformers.AutoModelForCausalLM


def _hf_load(folder: Path, config, allowed_unexpected, strict: bool, kwargs: dict) -> nn.Module:
    """transformers' ``from_pretrained`` of the class config.json names (:func:`_hf_model_class`) with its load
    report turned into an error: missing, unexpected (other than ``allowed_unexpected(key)``) or mismatched weights
    raise :class:`CheckpointError` naming them; with ``strict=False`` they are logged as a warning instead."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its report is checked below, and raised or logged by us
    try:
        model, info = _hf_model_class(config).from_pretrained(str(folder), config=config, output_loading_info=True,
                                                              **kwargs)
    except (OSError, ValueError) as exc:  # transformers' own messages name what is wrong; add the folder
        first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
        raise CheckpointError(f"transformers could not load {str(folder)!r}: {first}") from exc
    finally:
        hf_logging.set_verbosity(verbosity)
    missing = sorted(info.get("missing_keys") or ())
    unexpected = sorted(k for k in info.get("unexpected_keys") or () if not allowed_unexpected(k))
    mismatched = sorted(info.get("mismatched_keys") or ())
    errors = list(info.get("error_msgs") or ()) + [f"{k}: {v}" for k, v in (info.get("conversion_errors") or {}).items()]
    if missing or unexpected or mismatched or errors:
        problem = (f"{str(folder)!r} does not match the {type(model).__name__} its config.json describes: "
                   f"{len(missing)} missing weights {missing[:5]}, {len(unexpected)} unexpected weights "
                   f"{unexpected[:5]}, shape mismatches {mismatched[:5]}" + (f", errors {errors[:3]}" if errors else ""))
        if strict:
            raise CheckpointError(problem + "; the missing weights would be randomly initialized (pass "
                                  "strict=False to load anyway)")
        log.warning("%s; loading anyway (strict=False): missing weights are randomly initialized", problem)
    return model


def load_plain_pretrained(path, *, strict: bool = True, **kwargs: Any) -> nn.Module:
    """Load an un-widened Hugging Face causal LM from a ``save_pretrained`` folder, strictly: a truncated file,
    or a missing, unexpected or mismatched weight raises :class:`CheckpointError` naming it (transformers would
    log them and initialize the missing weights randomly). ``strict=False`` logs them as a warning instead.
    ``kwargs`` go to transformers' ``from_pretrained``. A folder holding a widened model is refused: load it
    with :func:`from_pretrained`.

    Example:
        >>> import tempfile, torch
        >>> from vwn_transform.models.hf_tiny import tiny_hf_model
        >>> from vwn_transform.persist import load_plain_pretrained
        >>> model, folder = tiny_hf_model("llama"), tempfile.mkdtemp()
        >>> model.save_pretrained(folder)
        >>> ids = torch.randint(0, 96, (1, 6))
        >>> back = load_plain_pretrained(folder).eval()  # transformers picks sdpa attention: rounding differs
        >>> torch.allclose(back(ids).logits, model(ids).logits, atol=1e-5)
        True
    """
    try:
        from transformers import AutoConfig
    except ImportError as exc:
        raise ImportError("loading a Hugging Face checkpoint needs transformers: pip install 'vwn_transform[hf]'"
                          ) from exc
    folder = _checkpoint_folder(path)
    config = AutoConfig.from_pretrained(str(folder))
    if isinstance(getattr(config, "vwn_recipe", None), dict):
        raise CheckpointError(f"{str(folder)!r} holds a model widened by vwn_transform (vwn_recipe in "
                              "config.json); load it with vwn_transform.from_pretrained")
    check_safetensors(folder)
    return _hf_load(folder, config, lambda key: False, strict, kwargs)


def _checkpoint_folder(path) -> Path:
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{str(folder)!r} has no config.json (expected a folder written by save_pretrained)")
    return folder


def _vwn_keys_as_loaded(base: nn.Module, state: dict[str, torch.Tensor], every_key: bool = False
                        ) -> dict[str, torch.Tensor]:
    """The ``*.vwn_*`` keys of a checkpoint under the module paths of the loaded model. transformers 5 saves some
    models under their original checkpoint names (ViT's ``vit.layers.0`` as ``vit.encoder.layer.0``) and renames
    them when loading; the VWN weights, which live on the same modules, were saved renamed too and are renamed here
    with transformers' own mapping for this model (``every_key``: every key, for a width-transform checkpoint that is
    loaded without transformers' loader)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:  # transformers without checkpoint conversions: saved names are the module paths
        return state
    transforms = get_model_conversion_mapping(base)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    if not renamings:
        return state
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    meta = base.state_dict()
    renamed = {}
    for key, value in state.items():
        if every_key or ".vwn_" in key or key.startswith("vwn_"):
            key = rename_source_key(key, renamings, converters, getattr(base, "base_model_prefix", None), meta)[0]
        renamed[key] = value
    return renamed


def from_pretrained(path, *, strict: bool = True, **kwargs: Any) -> nn.Module:
    """Load a widened Hugging Face model (a causal LM, an image classifier, an encoder: the class config.json names)
    saved with ``model.save_pretrained(path)``.

    transformers loads the base model's weights (with its own checkpoint conversions, no initialization of
    loaded weights), widen() is replayed with the recipe stored in config.json (``vwn_recipe``), and the
    ``*.vwn_*`` weights are loaded from the same safetensors files. Every weight of the rebuilt model must come
    from the checkpoint and every weight in the checkpoint must be used: otherwise :class:`CheckpointError`
    names them (``strict=False`` logs them as a warning instead; missing weights are then randomly
    initialized). ``kwargs`` go to transformers' ``from_pretrained`` (e.g. ``dtype=torch.bfloat16``).

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
        from transformers import AutoConfig
    except ImportError as exc:
        raise ImportError("from_pretrained needs transformers: pip install 'vwn_transform[hf]'") from exc
    if not isinstance(strict, bool):
        raise TypeError(f"strict must be True or False, got {strict!r}")
    folder = _checkpoint_folder(path)
    config = AutoConfig.from_pretrained(str(folder))
    recipe = getattr(config, "vwn_recipe", None)
    if not isinstance(recipe, dict) or ("vwn_config" not in recipe and not recipe.get("transform")):
        raise CheckpointError(f"{str(folder)!r} holds a plain {type(config).__name__} checkpoint (no vwn_recipe in "
                              "config.json); load it with transformers and widen it")
    state = _read_safetensors(folder)  # also fails early on a truncated or corrupt file
    del config.vwn_recipe  # the base model is built plain; widen() records the recipe again
    if recipe.get("transform") or recipe.get("before"):
        return _from_pretrained_rebuilt(folder, config, recipe, state, kwargs, strict)
    # the saved model's attention implementation, unless the caller chooses: eager vs sdpa differ in rounding
    attn = recipe.get("attn_implementation")
    if attn and "attn_implementation" not in kwargs:
        kwargs["attn_implementation"] = attn
    # the *.vwn_* keys are "unexpected" for the base model by design; they are checked against the rebuilt
    # widened model below
    base = _hf_load(folder, config, lambda key: ".vwn_" in key or key.startswith("vwn_"), strict, kwargs)
    base_keys = set(base.state_dict())
    state = _vwn_keys_as_loaded(base, state)
    wide = _replay(base.eval(), recipe, repr(str(folder)))
    added = {k: v for k, v in wide.state_dict().items() if k not in base_keys}
    missing = sorted(k for k in added if k not in state)
    wrong = [(k, tuple(state[k].shape), tuple(v.shape)) for k, v in added.items() if k in state and
             state[k].shape != v.shape]
    unused = sorted(k for k in state if (".vwn_" in k or k.startswith("vwn_")) and k not in added)
    if missing or wrong or unused:
        cfg = VWNConfig.from_dict(recipe["vwn_config"])
        problem = (f"{str(folder)!r} ({_describe(cfg)}) does not fit the rebuilt model ({_describe(wide.vwn_config)}): "
                   f"missing {missing[:5]}, shape mismatches {wrong[:5]}, unexpected {unused[:5]}")
        if strict or wrong:
            raise CheckpointError(problem)
        log.warning("%s; loading anyway (strict=False)", problem)
    wide.load_state_dict({k: state[k] for k in added if k in state}, strict=False)
    return wide


def _from_pretrained_rebuilt(folder: Path, config, recipe: dict, state: dict[str, torch.Tensor],
                             kwargs: dict, strict: bool) -> nn.Module:
    """A checkpoint of a width transform (WideNet, Adaptive Width, or widen() of one): its FFN weights live under
    other names than the base model's, so transformers cannot load the base from it. The base is built from
    config.json alone, the recipe replayed, and every weight loaded from the safetensors files (strictly, unless
    ``strict=False``: then missing or unexpected weights are logged; a shape mismatch is always an error)."""
    allowed = {"dtype", "torch_dtype", "attn_implementation"}
    other = sorted(set(kwargs) - allowed)
    if other:
        raise TypeError(f"from_pretrained of a {recipe.get('transform') or 'transformed'} checkpoint takes only "
                        f"{sorted(allowed)} as keyword arguments, got {other}")
    dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
    if isinstance(dtype, str) and dtype != "auto":
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"dtype {dtype!r} is not a torch dtype (e.g. 'bfloat16', torch.float16, 'auto')")
        dtype = getattr(torch, dtype)
    attn = kwargs.get("attn_implementation", recipe.get("attn_implementation"))
    build = {"attn_implementation": attn} if attn else {}
    base = _hf_model_class(config)._from_config(config, **build)
    state = _vwn_keys_as_loaded(base, state, every_key=True)  # saved under transformers' checkpoint names
    where = repr(str(folder))
    wide = _replay(base.eval(), recipe, where)
    try:
        _load_weights(wide, state, recipe, where)  # "auto" / None: the checkpoint's dtype
    except CheckpointError as exc:
        expected = wide.state_dict()
        if strict or any(k in expected and state[k].shape != expected[k].shape for k in state):
            raise
        log.warning("%s; loading anyway (strict=False): missing weights keep their initialization", exc)
        wide.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)
    if isinstance(dtype, torch.dtype):
        wide.to(dtype)
    return wide
