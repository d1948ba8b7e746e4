"""Adaptive Width ("Adaptive Width Neural Networks", Errica et al., arXiv 2501.15889, ICLR 2026) for the FFNs of an
existing transformer: each FFN learns its hidden width during training, and the trained model truncates cheaply.

Per FFN (found structurally, see :mod:`vwn_transform.ffn`) a learned rate ``lambda = softplus(aw_rate + c)`` sets a
discretized exponential importance over the hidden units, 0-based ``i`` (``aw_rate`` starts at 0 and the constant
``c = softplus^-1(lambda0)`` is fixed by the original width, so weight decay on ``aw_rate`` pulls towards the
original width, not towards lambda = softplus(0) = 0.69, a width of 5; the rate stays float32 when the model is
cast, so a cast never moves a width boundary):

    p(i) = exp(-lambda i) (1 - exp(-lambda)),    width D = floor(-ln(1 - k) / lambda) + 2  (k = quantile, 0.9),
    f(i) = p(i) / sum_{j < D} p(j) for i < D, 0 beyond,

and the hidden activations (after the nonlinearity and any gate, i.e. the input of the FFN's output projection)
are multiplied by ``D f(i)``. This is the paper's importance up to the constant D: its mean over the active units
is 1, so a converted model keeps its weights' magnitudes (the paper's ``f`` alone would need output weights
~1/f ~ D times larger, and Adam's steps would be ~D times smaller relative to them). The gradient reaches
``lambda`` through ``f``; D itself is an integer. When lambda falls the width grows, when it rises it shrinks.

Where the paper reallocates the layers on every forward (and resets the optimizer state of resized tensors), the
FFN here holds a fixed ``capacity`` of units (default 1.5x the original width) and masks the units beyond D: the
tensors keep their shapes, so optimizers, DDP/FSDP, ``torch.compile`` and checkpoints need nothing special, at
the price of computing the masked units. Growth stops at the capacity (:func:`width_report` says which layers
are there); new units start with the input weights' scale and zero output weights, so growing changes nothing
until they train.

Conversion is function-preserving: the initial rate puts D exactly at the original width H
(``lambda0 = -ln(1 - k) / (H - 1.5)``), and the output projection's columns are divided by the initial scale.

Loss terms: the paper trains on its ELBO, the data loss minus ``[log p(theta) + log p(lambda)] / N`` with a
Gaussian prior N(0, sigma_theta^2) on the weights and optionally a Gaussian prior on each lambda. With
``num_observations=N`` these terms (over the FFNs' active weights, sigma_theta=``weight_prior_std``, lambda prior
``rate_prior=(mean, std)`` when given) are added to the loss the model returns; without it (the default, as the
paper's own transformer runs) the plain loss is trained.

:func:`truncate_width` removes, per FFN, the least important units beyond the smallest width holding ``keep``
of the importance mass, folds the renormalization into the output projection (the kept units contribute exactly
what they did) and reports the output change on the probe input.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import UnsupportedModelError
from .ffn import FFNSite, check_plain, check_preserved, deep_copy_unless, float_in, locate_ffns, record_recipe
from .training import add_to_loss

__all__ = ["ImportanceScaled", "WidthEntry", "adaptive_width", "truncate_width", "width_report"]

log = logging.getLogger("vwn_transform")


# ------------------------------------------------------------------------------------------------------------
# projections: nn.Linear (weight [out, in]) and transformers' Conv1D (weight [in, out], GPT-2)
# ------------------------------------------------------------------------------------------------------------
def _layout(mod: nn.Module) -> str | None:
    if isinstance(mod, nn.Linear):
        return "linear"
    if type(mod).__name__ == "Conv1D" and getattr(mod, "weight", None) is not None and mod.weight.dim() == 2:
        return "conv1d"
    return None


def _in_out(mod: nn.Module) -> tuple[int, int]:
    w = mod.weight
    return (w.shape[1], w.shape[0]) if _layout(mod) == "linear" else (w.shape[0], w.shape[1])


def _unit_axis(mod: nn.Module, side: str) -> int:
    """The weight axis of the hidden units: ``side="out"`` for an input projection, ``"in"`` for the output one."""
    linear = _layout(mod) == "linear"
    return (0 if linear else 1) if side == "out" else (1 if linear else 0)


def _set_units(mod: nn.Module, side: str, weight: torch.Tensor, bias: torch.Tensor | None, op) -> None:
    op.set(mod, "weight", nn.Parameter(weight, requires_grad=mod.weight.requires_grad))
    if side == "out" and mod.bias is not None and bias is not None:
        op.set(mod, "bias", nn.Parameter(bias, requires_grad=mod.bias.requires_grad))
    units = weight.shape[_unit_axis(mod, side)]
    if _layout(mod) == "linear":
        op.set(mod, "out_features" if side == "out" else "in_features", units)
    elif side == "out":
        op.set(mod, "nf", units)
    elif hasattr(mod, "nx"):
        op.set(mod, "nx", units)


@torch.no_grad()
def _resize_units(mod: nn.Module, side: str, units: int, op, scale: torch.Tensor | None = None) -> None:
    """Keep the first ``units`` hidden units of a projection, or append new ones (an input projection's new units
    get random weights of its current scale and zero bias; an output projection's new units zero weights).
    ``scale [kept]``: multiplies the kept units' output-projection weights (``side="in"``)."""
    axis = _unit_axis(mod, side)
    w = mod.weight.detach()
    have = w.shape[axis]
    kept = w.narrow(axis, 0, min(have, units)).clone()
    if scale is not None:
        shape = [1, 1]
        shape[axis] = -1
        kept = kept * scale.to(kept.dtype).reshape(shape)
    if units > have:
        shape = list(w.shape)
        shape[axis] = units - have
        extra = torch.zeros(shape, dtype=w.dtype, device=w.device)
        if side == "out":
            extra.normal_(0.0, float(w.float().std()) or 0.02)
        kept = torch.cat([kept, extra], dim=axis)
    bias = None
    if side == "out" and mod.bias is not None:
        b = mod.bias.detach()
        bias = torch.cat([b[:units], b.new_zeros(max(units - have, 0))])
    _set_units(mod, side, kept.contiguous(), bias, op)


# ------------------------------------------------------------------------------------------------------------
# the importance
# ------------------------------------------------------------------------------------------------------------
def _inverse_softplus(x: float) -> float:
    return x + math.log(-math.expm1(-x))


def importance(rate_raw: torch.Tensor, capacity: int, quantile: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(f [capacity] float32, width D)`` for a raw rate (see the module docstring); D is capped at capacity.

    >>> f, width = importance(torch.tensor(_inverse_softplus(0.5)), 16, 0.9)
    >>> int(width), round(float(f.sum()), 6), bool((f[:-1] >= f[1:]).all())
    (6, 1.0, True)
    """
    lam = F.softplus(rate_raw.float())
    width = torch.clamp(torch.floor(-math.log1p(-quantile) / lam) + 2, max=capacity)
    i = torch.arange(capacity, device=rate_raw.device, dtype=torch.float32)  # [capacity]
    p = torch.exp(-lam * i) * (-torch.expm1(-lam))  # [capacity]: e^{-lambda i}(1 - e^{-lambda})
    p = torch.where(i < width, p, torch.zeros_like(p))
    return p / p.sum(), width


def _rate_offset(width: int, quantile: float) -> float:
    """``softplus^-1(lambda0)`` with ``lambda0 = -ln(1 - k) / (width - 1.5)``: ``floor(-ln(1-k)/lambda0) + 2 == width``."""
    return _inverse_softplus(-math.log1p(-quantile) / (width - 1.5))


class ImportanceScaled:
    """Mixin swapped onto an FFN's output projection: its input (the hidden activations) is multiplied by
    ``D f(i)`` first. Attributes: ``aw_rate`` (the learned rate, 0 at conversion), ``aw_quantile``,
    ``aw_original_width``; ``aw_lambda()`` is ``softplus(aw_rate + c)``."""

    aw_rate: nn.Parameter
    aw_quantile: float
    aw_original_width: int

    @property
    def aw_capacity(self) -> int:
        return _in_out(self)[0]

    @property
    def aw_rate_offset(self) -> float:
        return _rate_offset(self.aw_original_width, self.aw_quantile)

    def aw_lambda(self) -> torch.Tensor:
        return F.softplus(self.aw_rate.float() + self.aw_rate_offset)

    def aw_importance(self) -> tuple[torch.Tensor, torch.Tensor]:
        return importance(self.aw_rate.float() + self.aw_rate_offset, self.aw_capacity, self.aw_quantile)

    def _apply(self, fn, *args, **kwargs):
        # .to(dtype) / .half(): the rate stays float32 (rounded to bf16 it could move a width boundary)
        rate = self._parameters.get("aw_rate")
        kept = rate.detach().clone() if rate is not None else None
        out = super()._apply(fn, *args, **kwargs)
        new = self._parameters.get("aw_rate")
        if kept is not None and new is not None and new.dtype != torch.float32:
            new.data = kept.to(device=new.device)
        return out

    def aw_scale(self) -> torch.Tensor:
        f, width = self.aw_importance()
        return f * width  # [capacity]: mean 1 over the active units

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return super().forward(hidden * self.aw_scale().to(hidden.dtype))


# ------------------------------------------------------------------------------------------------------------
# the model-level loss hook
# ------------------------------------------------------------------------------------------------------------
class AdaptiveWidthLoss:
    """``model.vwn_adaptive``: the names of the adapted FFNs' projections and the prior settings; after a forward
    that returns a loss it adds the ELBO's prior terms (when ``num_observations`` is set) and keeps the parts in
    ``last_losses``. A plain object with a bound-method hook (a deep copy of the model rebinds it)."""

    def __init__(self, sites: list[dict], num_observations: float | None, weight_prior_std: float,
                 rate_prior: tuple[float, float] | None):
        self.sites = sites  # [{"ffn", "up": [...], "down"}]
        self.num_observations, self.weight_prior_std, self.rate_prior = num_observations, weight_prior_std, rate_prior
        self.last_losses: dict[str, torch.Tensor] | None = None
        self.last_truncation: dict | None = None

    def prior_loss(self, model: nn.Module) -> torch.Tensor:
        """``-[log p(theta) + log p(lambda)] / N`` over the adapted FFNs (constants dropped)."""
        total = None
        for site in self.sites:
            down = model.get_submodule(site["down"])
            f, _ = down.aw_importance()
            active = (f > 0).to(down.weight.dtype)  # [capacity]
            terms = []
            for mod, side in [(model.get_submodule(n), "out") for n in site["up"]] + [(down, "in")]:
                axis = _unit_axis(mod, side)
                per_unit = mod.weight.pow(2).sum(dim=1 - axis)  # [capacity]
                terms.append((per_unit * active).sum())
                if mod.bias is not None:
                    terms.append((mod.bias.pow(2) * active).sum() if side == "out" else mod.bias.pow(2).sum())
            layer = torch.stack([t.float() for t in terms]).sum() / (2 * self.weight_prior_std ** 2)
            if self.rate_prior is not None:
                mean, std = self.rate_prior
                lam = down.aw_lambda()
                layer = layer + (lam - mean) ** 2 / (2 * std ** 2)
            total = layer if total is None else total + layer
        return total / self.num_observations

    def on_model_return(self, model, args, kwargs, output):
        if self.num_observations is None or not model.training:  # evaluation losses stay the plain loss
            return None
        prior = self.prior_loss(model)
        output, before = add_to_loss(output, prior)
        self.last_losses = None if before is None else {"loss": before.detach(), "prior_loss": prior.detach()}
        return output


# ------------------------------------------------------------------------------------------------------------
# finding an FFN's projections
# ------------------------------------------------------------------------------------------------------------
def _projections(model: nn.Module, site: FFNSite, hidden: int) -> tuple[list[str], str, int]:
    """(input projections, output projection, hidden width H) of one FFN, by the order its Linear/Conv1D
    submodules run on a probe input: the last one maps H -> D (the output projection); every other one D -> H."""
    ffn = model.get_submodule(site.name)
    order: list[str] = []
    handles = []
    for name, mod in ffn.named_modules():
        if _layout(mod):
            handles.append(mod.register_forward_hook(lambda m, a, o, name=name: order.append(name)))
    ref = next((p for p in ffn.parameters() if p.is_floating_point()), None)
    x = torch.randn(site.input_shape, generator=torch.Generator().manual_seed(0)).to(
        device=ref.device if ref is not None else "cpu", dtype=ref.dtype if ref is not None else torch.float32)
    try:
        with torch.no_grad():
            ffn(x)
    finally:
        for h in handles:
            h.remove()
    names = list(dict.fromkeys(order))
    if len(names) < 2 or len(names) != len(order):
        raise UnsupportedModelError(
            f"adaptive_width() needs an FFN of linear projections D -> H -> D; {site.name} "
            f"({type(ffn).__name__}) runs {len(names)} linear layer(s)"
            + (" more than once each" if len(names) != len(order) else ""))
    down = names[-1]
    width, out = _in_out(ffn.get_submodule(down))
    if out != hidden:
        raise UnsupportedModelError(f"{site.name}.{down} maps {width} -> {out}; the output projection of an FFN "
                                    f"must return the stream width {hidden}")
    for name in names[:-1]:
        i, o = _in_out(ffn.get_submodule(name))
        if i != hidden or o != width:
            hint = " (a fused gate/up projection: its units are not one hidden unit each)" if o == 2 * width else ""
            raise UnsupportedModelError(
                f"adaptive_width() needs every input projection of {site.name} to map {hidden} -> {width} (the output "
                f"projection's input width); {name} maps {i} -> {o}{hint}")
    if width < 3:
        raise UnsupportedModelError(f"{site.name} has {width} hidden units; adaptive_width() needs at least 3")
    inside = {id(m) for n in names for m in ffn.get_submodule(n).modules()}  # the projections and their parts
    for name, mod in ffn.named_modules():
        if id(mod) in inside:
            continue
        for pname, p in mod.named_parameters(recurse=False):
            if width in p.shape:  # a per-hidden-unit parameter (an inner norm, a channel scale) we would not resize
                raise UnsupportedModelError(
                    f"adaptive_width() resizes only the linear projections of {site.name}; "
                    f"{(name + '.') if name else ''}{pname} {tuple(p.shape)} is a per-hidden-unit parameter of "
                    f"{type(mod).__name__} between them")
    prefix = site.name + "."
    return [prefix + n for n in names[:-1]], prefix + down, width


# ------------------------------------------------------------------------------------------------------------
# public entry points
# ------------------------------------------------------------------------------------------------------------
def _options(quantile, max_width, num_observations, weight_prior_std, rate_prior) -> dict:
    q = float_in(quantile, "quantile", 0.0, 1.0, low_open=True, high_open=True)
    if max_width is not None:
        float_in(max_width, "max_width", 1.0, 64.0)
    n = None if num_observations is None else float_in(num_observations, "num_observations", 0.0, 1e15,
                                                           low_open=True)
    s = float_in(weight_prior_std, "weight_prior_std", 0.0, 1e6, low_open=True)
    prior = None
    if rate_prior is not None:
        if not isinstance(rate_prior, (tuple, list)) or len(rate_prior) != 2:
            raise ValueError(f"rate_prior must be a (mean, std) pair or None, got {rate_prior!r}")
        prior = [float_in(rate_prior[0], "rate_prior mean", 0.0, 1e3),
                 float_in(rate_prior[1], "rate_prior std", 0.0, 1e3, low_open=True)]
    return {"quantile": q, "max_width": None if max_width is None else float(max_width), "num_observations": n,
            "weight_prior_std": s, "rate_prior": prior}


def adaptive_width(model: nn.Module, *, quantile: float = 0.9, max_width: float | None = 1.5,
                   num_observations: float | None = None, weight_prior_std: float = 1.0,
                   rate_prior: tuple[float, float] | None = None, inplace: bool = False,
                   example_inputs: Any = None) -> nn.Module:
    """Give every FFN of a pre-norm transformer a learned hidden width (see the module docstring).

    Args:
        model: a model :func:`vwn_transform.widen` supports, whose FFNs are linear projections D -> H -> D (plain
            or gated); fused gate/up projections and mixtures of experts are refused.
        quantile: k, the importance mass that sets the width (the paper uses 0.9).
        max_width: capacity per FFN as a multiple of its original width (1..64); the width can grow up to it.
        num_observations: N of the ELBO; when set, the prior terms divided by N are added to a returned loss.
        weight_prior_std: sigma of the Gaussian prior on the FFN weights (with ``num_observations``).
        rate_prior: ``(mean, std)`` of a Gaussian prior on each rate lambda, or None.
        inplace: transform ``model`` itself instead of a deep copy.
        example_inputs: probe inputs as for :func:`vwn_transform.widen`.

    Returns:
        The model with adaptive FFNs; it computes the original function (checked on the probe input).
        :func:`width_report` shows the widths, :func:`truncate_width` removes the unimportant units, and it can
        be virtually widened: ``vwn_transform.widen(adaptive_width(model), 2)``.

    Example:
        >>> import torch, vwn_transform
        >>> from vwn_transform.models import GPT, GPTConfig
        >>> model = GPT(GPTConfig(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=32)).eval()
        >>> aw = vwn_transform.adaptive_width(model)
        >>> idx = torch.randint(0, 64, (2, 10))
        >>> torch.allclose(aw(idx)[0], model(idx)[0], atol=1e-5)
        True
        >>> [(e.width, e.capacity) for e in vwn_transform.width_report(aw)]
        [(128, 192), (128, 192)]
    """
    options = _options(quantile, max_width, num_observations, weight_prior_std, rate_prior)
    return _adaptive_width(model, options, None, inplace, example_inputs)


def replay_adaptive_width(base: nn.Module, recipe: dict, inputs) -> nn.Module:
    """Load's replay: the recorded options, FFNs and per-FFN capacities (the weights are zeros until loaded)."""
    o = dict(recipe.get("options") or {})
    capacities = o.pop("capacities", None)
    options = _options(o.get("quantile"), o.get("max_width"), o.get("num_observations"), o.get("weight_prior_std"),
                       o.get("rate_prior"))
    return _adaptive_width(base, options, capacities, True, inputs, names=(recipe.get("wrapped") or {}).get("ffn"))


def _adaptive_width(model, options: dict, capacities: dict | None, inplace: bool, example_inputs, names=None):
    from .widen import _Surgery

    start = time.perf_counter()
    check_plain(model, "adaptive_width")
    structure, sites = locate_ffns(model, example_inputs, "adaptive_width", names)
    hidden = structure.hidden_size
    found = [(site, *_projections(model, site, hidden)) for site in sites]
    target = deep_copy_unless(model, inplace)
    op = _Surgery()
    k = options["quantile"]
    caps = {}
    try:
        for site, ups, down_name, width in found:
            cap = (capacities or {}).get(site.name)
            cap = int(cap) if cap is not None else max(width, math.ceil(width * (options["max_width"] or 1.0)))
            down = target.get_submodule(down_name)
            raw = torch.tensor(_rate_offset(width, k), dtype=torch.float32, device=down.weight.device)
            f, w0 = importance(raw, width, k)
            if int(w0) != width:  # the formula above guarantees it; a guard against rounding surprises
                raise RuntimeError(f"initial width {int(w0)} != {width} for {site.name}")
            _resize_units(down, "in", width, op, scale=1.0 / (f * width))  # fold the initial scale out
            _resize_units(down, "in", cap, op)
            for up in ups:
                _resize_units(target.get_submodule(up), "out", cap, op)
            op.set(down, "aw_rate", nn.Parameter(torch.zeros_like(raw)))  # lambda = softplus(0 + offset) = lambda0
            op.set(down, "aw_quantile", k)
            op.set(down, "aw_original_width", width)
            op.swap(down, ImportanceScaled)
            caps[site.name] = cap
        if capacities is None:
            check_preserved(target, structure, "adaptive_width")
        hook_sites = [{"ffn": s.name, "up": ups, "down": d} for s, ups, d, _ in found]
        rate_prior = tuple(options["rate_prior"]) if options["rate_prior"] else None
        hook = AdaptiveWidthLoss(hook_sites, options["num_observations"], options["weight_prior_std"], rate_prior)
        op.set(target, "vwn_adaptive", hook)
        handle = target.register_forward_hook(hook.on_model_return, with_kwargs=True)
        op.on_undo(handle.remove)
        record_recipe(target, type(model).__name__, "adaptive_width", {**options, "capacities": caps},
                      {"ffn": [s.name for s in sites]}, structure, example_inputs is not None, op)
    except BaseException:
        op.rollback()
        raise
    log.info("adaptive_width: %s, %d FFNs (widths %s, capacity %s) in %.2fs", type(model).__name__, len(found),
             sorted({w for *_, w in found}), sorted(set(caps.values())), time.perf_counter() - start)
    return target


def _adaptive_recipe(recipe: dict) -> dict:
    """The adaptive_width recipe in a model's recipe: itself, or the one widen() recorded as ``before``."""
    if recipe.get("transform") == "adaptive_width":
        return recipe
    before = recipe.get("before")
    if isinstance(before, dict):
        return _adaptive_recipe(before)
    raise ValueError("the model's vwn_recipe records no adaptive_width transform")


def _with_capacities(recipe: dict, widths: dict[str, int]) -> dict:
    """A copy of ``recipe`` whose adaptive_width part records ``widths`` as the FFNs' capacities."""
    if recipe.get("transform") == "adaptive_width":
        options = recipe["options"]
        return {**recipe, "options": {**options, "capacities": {**options["capacities"], **widths}}}
    return {**recipe, "before": _with_capacities(recipe["before"], widths)}


@dataclasses.dataclass
class WidthEntry:
    """One adaptive FFN in :func:`width_report`."""

    name: str
    width: int  # current width D (units with non-zero importance)
    capacity: int  # units allocated
    original: int  # width at conversion
    rate: float  # lambda
    mass_in_original: float  # importance mass on the first `original` units

    def __str__(self) -> str:
        at_cap = "  (at capacity)" if self.width >= self.capacity else ""
        return (f"{self.name}: width {self.width} of {self.capacity} allocated (original {self.original}), "
                f"lambda {self.rate:.4g}, mass in the original units {self.mass_in_original:.3f}{at_cap}")


def _hook(model: nn.Module, who: str) -> AdaptiveWidthLoss:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{who}() expects a torch.nn.Module, got {type(model).__name__}")
    hook = getattr(model, "vwn_adaptive", None)
    if not isinstance(hook, AdaptiveWidthLoss):
        raise ValueError(f"{type(model).__name__} has no adaptive FFNs; convert it with "
                         "vwn_transform.adaptive_width(model) first")
    return hook


@torch.no_grad()
def width_report(model: nn.Module) -> list[WidthEntry]:
    """Per adaptive FFN: current width, allocated capacity, original width, rate and importance mass.

    Example:
        >>> import vwn_transform
        >>> from vwn_transform.models import GPT, GPTConfig
        >>> aw = vwn_transform.adaptive_width(GPT(GPTConfig(vocab_size=64, block_size=32, n_layer=2, n_head=2,
        ...                                                 n_embd=32)))
        >>> print(vwn_transform.width_report(aw)[0])  # doctest: +ELLIPSIS
        transformer.h.0.mlp: width 128 of 192 allocated (original 128), lambda 0.0182, mass in the original units 1.000
    """
    entries = []
    for site in _hook(model, "width_report").sites:
        down = model.get_submodule(site["down"])
        f, width = down.aw_importance()
        entries.append(WidthEntry(site["ffn"], int(width), down.aw_capacity, down.aw_original_width,
                                  float(down.aw_lambda()),
                                  float(f[: down.aw_original_width].sum())))
    return entries


def truncate_width(model: nn.Module, keep: float = 0.9, *, inplace: bool = False) -> nn.Module:
    """Remove each adaptive FFN's least important hidden units, keeping the smallest width that holds ``keep`` of
    its importance mass; the kept units contribute exactly what they did (the renormalization is folded into the
    output projection). The output change on the probe input, the widths and parameter counts are logged and
    kept in ``model.vwn_adaptive.last_truncation``; the widths are recorded in the recipe, so save/load rebuilds
    the truncated shapes.

    Example:
        >>> import torch, vwn_transform
        >>> from vwn_transform.models import GPT, GPTConfig
        >>> aw = vwn_transform.adaptive_width(GPT(GPTConfig(vocab_size=64, block_size=32, n_layer=2, n_head=2,
        ...                                                 n_embd=32)))
        >>> small = vwn_transform.truncate_width(aw, keep=0.5)
        >>> [e.capacity for e in vwn_transform.width_report(small)]
        [33, 33]
        >>> small.vwn_adaptive.last_truncation["params_after"] < small.vwn_adaptive.last_truncation["params_before"]
        True
    """
    from vwn_transform.passes.probe import ExampleInputs, default_example_inputs, primary_output, run_quietly
    from .widen import _Surgery, install_recipe

    _hook(model, "truncate_width")
    keep = float_in(keep, "keep", 0.0, 1.0, low_open=True)
    target = deep_copy_unless(model, inplace)
    hook = target.vwn_adaptive
    recipe = target.vwn_recipe
    spec = recipe.get("example_inputs") or _adaptive_recipe(recipe).get("example_inputs")
    ref = next(target.parameters())
    inputs = ExampleInputs.from_spec(spec, ref.device) if spec else default_example_inputs(target)
    before_out = primary_output(run_quietly(target, inputs))
    params_before = sum(p.numel() for p in {id(p): p for p in target.parameters()}.values())
    op = _Surgery()
    widths = {}
    try:
        with torch.no_grad():
            for site in hook.sites:
                down = target.get_submodule(site["down"])
                f, width = down.aw_importance()
                kept = int(torch.searchsorted(torch.cumsum(f, 0), torch.tensor(keep, device=f.device)).item()) + 1
                kept = max(1, min(kept, int(width)))
                new_f = f[:kept] / f[:kept].sum()  # the importance over the kept units
                fold = (f[:kept] * width) / (new_f * kept)  # old scale / new scale, [kept]
                _resize_units(down, "in", kept, op, scale=fold)
                for up in site["up"]:
                    _resize_units(target.get_submodule(up), "out", kept, op)
                widths[site["ffn"]] = kept
        after_out = primary_output(run_quietly(target, inputs))
        install_recipe(target, _with_capacities(recipe, widths), op)
    except BaseException:
        op.rollback()
        raise
    params_after = sum(p.numel() for p in {id(p): p for p in target.parameters()}.values())
    change = float((after_out.float() - before_out.float()).abs().max()) if before_out is not None else float("nan")
    scale = float(before_out.float().abs().max()) if before_out is not None else float("nan")
    hook.last_truncation = {"keep": keep, "widths": widths, "params_before": params_before,
                            "params_after": params_after, "max_abs_output_change": change,
                            "max_abs_output": scale}
    log.info("truncate_width(keep=%g): widths %s; parameters %s -> %s; probe output max abs change %.3g (output "
             "max abs %.3g)", keep, widths, f"{params_before:,}", f"{params_after:,}", change, scale)
    return target
