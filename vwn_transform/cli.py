"""The ``vwn`` command line: ``vwn demo``, ``vwn study``, ``vwn plan``, ``vwn widen`` and ``vwn export``.

Bad arguments print one line (``vwn: error: ...``) and exit with status 2; a failure while running prints one
line and exits with status 1. ``VWN_TRACEBACK=1`` shows the full traceback instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import re
import shutil
import sys
import tempfile
from fractions import Fraction
from pathlib import Path
from typing import Any

log = logging.getLogger("vwn_transform")

EXAMPLES = {
    "demo": "examples:\n  vwn demo                      # ~6 min on 2 CPU cores (1 thread): GPT vs its r=4 (m=2) twin\n"
            "  vwn demo --quick              # under a minute\n"
            "  vwn demo --ratio 3/2 --steps 300 --out runs/r1.5 --mtp\n"
            "  vwn demo --pretrain-steps 550     # widen a trained baseline and keep training both",
    "study": "examples:\n  vwn study                     # r = 1, 1.5, 2, 4, 8\n"
             "  vwn study --ratios 1,2,4 --steps 200 --quick",
    "plan": "examples:\n  vwn plan --gpt --ratio 3/2\n  vwn plan --hf llama --tiny --ratio 8 --m 8\n"
            "  vwn plan path/to/hf_checkpoint --ratio 2",
    "widen": "examples:\n  vwn widen --hf qwen2 --tiny --ratio 1.5 --out widened_qwen2\n"
             "  vwn widen path/to/hf_checkpoint --ratio 4 --m 2 --out widened\n"
             "  vwn widen Qwen/Qwen2.5-0.5B --ratio 1.5 --out qwen_vwn    # a Hugging Face model id",
    "export": "examples:\n  vwn export --hf llama --tiny --ratio 1.5 --out llama_vwn.onnx\n"
              "  vwn export --gpt --ratio 4 --m 2 --out gpt_vwn.onnx\n"
              "  vwn export path/to/hf_checkpoint --plain --out original.onnx\n"
              "  vwn export widened_qwen2 --out qwen2_vwn.onnx    # a folder written by vwn widen\n"
              "  vwn export widened_qwen2 --kv-cache --dtype float16 --out qwen2_kv.onnx",
}


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 1."""


# ------------------------------------------------------------------------------------------------------------
# argument helpers
# ------------------------------------------------------------------------------------------------------------
def _ratio(text: str):
    from .config import parse_ratio

    try:
        return parse_ratio(text)
    except (ValueError, TypeError, ZeroDivisionError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _ratios(text: str):
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of ratios like 1,1.5,2,4,8, got {text!r}")
    return [_ratio(p) for p in parts]


def _int_at_least(minimum: int, what: str):
    """An argparse type: an integer >= ``minimum`` (``what`` names the valid values in the error)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse


_non_negative_int = _int_at_least(0, "an integer >= 0")
_positive_int = _int_at_least(1, "a positive integer")


def _learning_rate(text: str) -> float:
    """An argparse type: a finite learning rate > 0."""
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a learning rate > 0 such as 4e-3, got {text!r}")
    return value


def _add_model_args(p: argparse.ArgumentParser, ratio_required: bool) -> None:
    src = p.add_argument_group("model (give exactly one)")
    src.add_argument("checkpoint", nargs="?",
                     help="a checkpoint folder (save_pretrained, or vwn widen output; widened ones load with their "
                          "VWN weights) or a Hugging Face model id")
    src.add_argument("--hf", metavar="TYPE", help="a transformers model type (llama, qwen2, gpt2, ...) with --tiny")
    src.add_argument("--tiny", action="store_true", help="with --hf: a tiny randomly initialized config")
    src.add_argument("--gpt", action="store_true", help="the project's reference GPT (4 layers, D=128)")
    w = p.add_argument_group("widening")
    w.add_argument("--ratio", type=_ratio, required=ratio_required, help="expansion ratio r: 2, 1.5, 3/2, ...")
    w.add_argument("--m", type=_positive_int, help="slots the original width is split into (default: smallest)")
    w.add_argument("--static", action="store_true", help="static GHC (no input-dependent coefficients)")
    w.add_argument("--init", choices=("preserve", "paper"), default="preserve")


class _Parser(argparse.ArgumentParser):
    """Bad arguments: one line and exit status 2 (argparse's default prints the whole usage first)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="vwn", description="Virtual Width Networks for existing transformers (arXiv 2511.11238).",
        epilog="examples:\n  vwn demo --quick\n  vwn plan --hf llama --tiny --ratio 3/2\n"
               "run 'vwn COMMAND --help' for each command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the toolkit does")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_text, description=help_text, epilog=EXAMPLES[name],
                              formatter_class=argparse.RawDescriptionHelpFormatter)

    for name, help_text in (("demo", "train the reference GPT and its widened twin on Shakespeare bytes"),
                            ("study", "train at several expansion ratios and fit loss = a - b log2(r)")):
        p = add(name, help_text)
        if name == "demo":
            p.add_argument("--ratio", type=_ratio, default=_ratio("4"), help="expansion ratio (default 4)")
            p.add_argument("--mtp", action="store_true", help="add next-2-token prediction to the widened twin")
            p.add_argument("--no-onnx", action="store_true", help="skip the ONNX export of the widened twin")
            p.add_argument("--transform", choices=["vwn", "widenet", "adaptive_width"], default="vwn",
                           help="the twin: virtual width (vwn, default), WideNet (MoE FFNs, blocks shared) or "
                                "Adaptive Width (learned FFN widths); --ratio/--m/--mtp/ONNX apply to vwn")
            p.add_argument("--pretrain-steps", type=_non_negative_int, default=0, metavar="K",
                           help="continued pretraining: train the baseline alone for K steps, then widen it "
                                "(function-preserving) and continue both for --steps steps (default 0)")
        else:
            p.add_argument("--ratios", type=_ratios, default=_ratios("1,1.5,2,4,8"),
                           help="comma-separated ratios; 1 is the baseline (default 1,1.5,2,4,8)")
        p.add_argument("--m", type=_positive_int, default=2, help="slots per original width (default 2)")
        p.add_argument("--steps", type=_positive_int, help="training steps per model (default 550, --quick 80)")
        p.add_argument("--lr", type=_learning_rate,
                       help="peak learning rate of every model (default 6e-3: the baseline's learning-rate sweep, "
                            "README 'Results')")
        p.add_argument("--quick", action="store_true", help="a small model and budget (under a minute)")
        p.add_argument("--device", default="cpu",
                       help="cpu, cuda, cuda:N or auto (default cpu); on a GPU (without --quick) a larger preset: "
                            "8 layers, D=512, 1500 steps of 64 x 256 bytes, lr 1e-3")
        p.add_argument("--out", default=f"vwn_{name}_out", help=f"output folder (default vwn_{name}_out)")
        p.add_argument("--seed", type=int, default=0, help="seed for the initial weights and the batch order "
                                                          "(default 0)")
        p.add_argument("--no-progress", action="store_true", help="no progress bars")
        p.add_argument("--threads", type=_positive_int,
                       help="CPU threads (default: OMP_NUM_THREADS when set, else 1: robust on a shared machine and "
                            "reproducible; on an idle machine 2 threads are up to 21%% faster)")

    p = add("plan", "show what widen() would do to a model, without changing it")
    _add_model_args(p, ratio_required=True)

    p = add("widen", "widen a model and save it")
    _add_model_args(p, ratio_required=True)
    p.add_argument("--out", required=True, help="output folder")

    p = add("export", "export a (widened) model to ONNX, verified in onnxruntime; a widened checkpoint exports as "
                      "it is")
    _add_model_args(p, ratio_required=False)
    p.add_argument("--plain", action="store_true", help="export the model as it is, without widening it")
    p.add_argument("--out", required=True, help="the .onnx file to write")
    p.add_argument("--opset", type=int, default=20, help="ONNX opset version (default 20)")
    p.add_argument("--no-verify", action="store_true", help="skip the onnxruntime check")
    p.add_argument("--fixed-shapes", action="store_true", help="no dynamic batch/sequence axes")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                   help="precision of the exported weights and activations (GHC mixing stays float32; default "
                        "float32)")
    p.add_argument("--kv-cache", action="store_true",
                   help="Hugging Face models: a decoder with past_key_values inputs and present outputs, verified "
                        "by greedy decoding against generate()")
    return parser


# ------------------------------------------------------------------------------------------------------------
# commands
# ------------------------------------------------------------------------------------------------------------
# A Hugging Face Hub model id: "name" or "owner/name" (what transformers resolves when it is not a local folder)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[A-Za-z0-9][\w.\-]*)?$")
# what a causal LM checkpoint needs from the Hub (no optimizer states, no other frameworks' weights)
_HUB_FILES = ["*.json", "*.safetensors", "pytorch_model*.bin", "*.model", "*.txt", "*.tiktoken"]


@dataclasses.dataclass
class LoadedModel:
    """A model the CLI loaded, what kind it is (``"gpt"`` or ``"hf"``) and how to name it in messages."""

    model: Any
    kind: str
    source: str
    folder: Path | None = None

    @property
    def widened(self) -> bool:
        return getattr(self.model, "vwn_config", None) is not None

    def widening(self) -> str:
        """How a widened model was widened, for messages: ``r = 3/2, m=2, n=3, dynamic GHC``."""
        cfg = self.model.vwn_config
        return f"r = {Fraction(cfg.n, cfg.m)}, m={cfg.m}, n={cfg.n}, {'dynamic' if cfg.dynamic else 'static'} GHC"

    def load_hint(self) -> str:
        """The Python call that loads this (widened) model back."""
        if self.kind == "gpt" and self.folder is not None:
            return (f"vwn_transform.load({str(self.folder / 'model.pt')!r}, lambda: GPT(GPTConfig(**json.load(open("
                    f"{str(self.folder / 'gpt_config.json')!r})))))")
        return f"vwn_transform.from_pretrained({str(self.folder or self.source)!r})"


def load_model(args) -> LoadedModel:
    """The model named by ``checkpoint`` / ``--hf TYPE --tiny`` / ``--gpt``, in eval mode.

    A checkpoint is a folder written by ``save_pretrained`` (plain or widened: a ``vwn_recipe`` in config.json
    loads through :func:`vwn_transform.from_pretrained`), a folder written by ``vwn widen --gpt`` (model.pt and
    gpt_config.json), or a Hugging Face model id, downloaded by huggingface_hub. Every weight must load:
    missing or unexpected weights and truncated files are errors that name them.
    """
    given = [x for x in (args.checkpoint, args.hf, args.gpt or None) if x]
    if len(given) != 1:
        raise CLIError("give exactly one model: a checkpoint folder or Hugging Face model id, --hf TYPE --tiny, "
                       "or --gpt")
    if args.gpt:
        import torch

        from .models import GPT, GPTConfig

        torch.manual_seed(0)
        model = GPT(GPTConfig(vocab_size=256, block_size=128, n_layer=4, n_head=4, n_embd=128)).eval()
        return LoadedModel(model, "gpt", "the reference GPT (--gpt)")
    if args.hf:
        if not args.tiny:
            raise CLIError(f"--hf {args.hf} builds a randomly initialized model and needs --tiny (a real "
                           "checkpoint is loaded from its folder or model id: vwn plan path/to/checkpoint)")
        from .models.hf_tiny import tiny_hf_model

        return LoadedModel(tiny_hf_model(args.hf), "hf", f"a tiny {args.hf} (--hf {args.hf} --tiny)")
    folder = _resolve_checkpoint(args.checkpoint)
    return _load_folder(folder, args.checkpoint)


def _resolve_checkpoint(text: str) -> Path:
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CLIError(f"checkpoint {text!r} is a file; expected a checkpoint folder (written by save_pretrained or "
                       "vwn widen) or a Hugging Face model id")
    if not _HUB_ID.match(text):
        raise CLIError(f"checkpoint {text!r} does not exist (expected a checkpoint folder written by save_pretrained "
                       "or vwn widen, or a Hugging Face model id like 'gpt2')")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CLIError(f"{text!r} is not a local folder, and resolving it as a Hugging Face model id needs "
                       "transformers: pip install 'vwn_transform[hf]'") from None
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    print(f"vwn: {text!r} is not a local folder; resolving it as a Hugging Face model id"
          f"{' (offline: cache only)' if offline else ''} ...", file=sys.stderr, flush=True)
    try:
        return Path(snapshot_download(text, allow_patterns=_HUB_FILES))
    except Exception as exc:  # no network, unknown repo, gated repo: one message that says which and what to do
        first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
        why = "HF_HUB_OFFLINE is set and it is not in the local cache" if offline else f"{type(exc).__name__}: {first}"
        raise CLIError(f"{text!r} is neither a local folder nor a Hugging Face model id that could be fetched ({why})"
                       "; without network access, download the checkpoint elsewhere and pass its folder") from None


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CLIError(f"{str(path)!r} is not readable JSON (truncated or corrupt?): {exc}") from None
    if not isinstance(value, dict):
        raise CLIError(f"{str(path)!r} holds a {type(value).__name__}, expected a JSON object")
    return value


def _load_folder(folder: Path, source: str) -> LoadedModel:
    if (folder / "config.json").is_file():
        config = _read_json(folder / "config.json")
        from . import persist

        try:
            if isinstance(config.get("vwn_recipe"), dict):
                log.info("%s holds a widened model (vwn_recipe in config.json): vwn_transform.from_pretrained", folder)
                model = persist.from_pretrained(folder)
            else:
                model = persist.load_plain_pretrained(folder)
        except ImportError as exc:
            raise CLIError(f"loading {source!r} needs transformers: pip install 'vwn_transform[hf]' ({exc})") from None
        return LoadedModel(model.eval(), "hf", source, folder)
    gpt_config = folder / "gpt_config.json"
    if gpt_config.is_file():
        from .models import GPT, GPTConfig
        from .persist import load

        fields = _read_json(gpt_config)
        try:
            GPTConfig(**fields)
        except (TypeError, ValueError) as exc:
            raise CLIError(f"{str(gpt_config)!r} is not a GPTConfig: {exc}") from None
        weights = folder / "model.pt"
        if not weights.is_file():
            raise CLIError(f"{str(folder)!r} has gpt_config.json but no model.pt (the weights vwn widen --gpt writes)")
        model = load(weights, lambda: GPT(GPTConfig(**fields)))
        return LoadedModel(model.eval(), "gpt", source, folder)
    raise CLIError(f"{str(folder)!r} has no config.json (a Hugging Face checkpoint) and no gpt_config.json + model.pt "
                   "(written by vwn widen --gpt)")


def _refuse_widened(loaded: LoadedModel, command: str) -> None:
    if not loaded.widened:
        return
    raise CLIError(
        f"{loaded.source} is already widened by vwn_transform ({loaded.widening()}); {command} works on original "
        f"models. Export it as it is "
        f"with 'vwn export {loaded.source} --out model.onnx', or load it in Python with {loaded.load_hint()}")


def _widen_kwargs(args) -> dict:
    return dict(m=args.m, dynamic=not args.static, init=args.init)


def cmd_plan(args) -> int:
    from .widen import plan

    loaded = load_model(args)
    _refuse_widened(loaded, "vwn plan")
    print(plan(loaded.model, args.ratio, **_widen_kwargs(args)))
    return 0


def _check_out_folder(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {str(out)!r} is a file; give a new folder")
    if out.is_dir() and any(out.iterdir()):
        raise CLIError(f"output folder {str(out)!r} exists and is not empty; choose a new folder")


def cmd_widen(args) -> int:
    from .widen import widen

    out = Path(args.out)
    _check_out_folder(out)  # before loading anything
    loaded = load_model(args)
    _refuse_widened(loaded, "vwn widen")
    model = loaded.model
    original = type(model).__name__
    wide = widen(model, args.ratio, **_widen_kwargs(args), inplace=True)
    # written into a temporary sibling folder and moved into place: a failure leaves no half-written --out
    out.parent.mkdir(parents=True, exist_ok=True)
    from .persist import apply_umask, save

    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        if loaded.kind == "hf":
            wide.save_pretrained(str(tmp))  # config.json records the recipe
        else:
            save(wide, tmp / "model.pt")
            (tmp / "gpt_config.json").write_text(json.dumps(dataclasses.asdict(wide.config), indent=2))
        apply_umask(tmp)  # mkdtemp made the folder 0700 and safetensors writes 0600 files
        if out.is_dir():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    saved = LoadedModel(wide, loaded.kind, str(out), out)
    print(f"widened {original} to r={Fraction(wide.vwn_config.n, wide.vwn_config.m)} (m={wide.vwn_config.m}, "
          f"n={wide.vwn_config.n}); saved to {out}/; load it back with {saved.load_hint()}, or run "
          f"'vwn export {out} --out model.onnx'")
    return 0


def cmd_export(args) -> int:
    if args.plain and args.ratio is not None:
        raise CLIError("--plain exports the model as it is; drop --ratio (or drop --plain to widen first)")
    try:
        from .onnx import export_onnx
    except ImportError as exc:
        raise CLIError(f"vwn export needs the ONNX extra: pip install 'vwn_transform[onnx]' ({exc})") from None
    loaded = load_model(args)
    model = loaded.model
    if loaded.widened:
        if args.ratio is not None:
            raise CLIError(f"{loaded.source} is already widened ({loaded.widening()}); drop --ratio to export it as "
                           "it is")
        log.info("%s is widened: exporting it as it is", loaded.source)
    elif not args.plain and args.ratio is None:
        raise CLIError("give --ratio to widen before exporting, or --plain to export the model as it is")
    elif not args.plain:
        from .widen import widen

        model = widen(model, args.ratio, **_widen_kwargs(args), inplace=True)
    example = None
    if loaded.kind == "gpt":
        import torch

        cfg = model.config
        example = (torch.randint(0, cfg.vocab_size, (2, min(8, cfg.block_size))),)
    if args.kv_cache and loaded.kind != "hf":
        raise CLIError("--kv-cache exports Hugging Face causal LMs; the reference GPT has no KV cache")
    report = export_onnx(model, args.out, example_inputs=example, dynamic=not args.fixed_shapes,
                         opset=args.opset, verify=not args.no_verify, dtype=args.dtype, kv_cache=args.kv_cache)
    print(report)
    return 0


def _demo_settings(args):
    from vwn_experiments import DemoSettings

    overrides = {"seed": args.seed, "device": args.device}
    if args.lr is not None:
        overrides["lr"] = args.lr
    if args.steps is not None:
        overrides["steps"] = args.steps
        overrides["eval_every"] = max(1, min(50 if not args.quick else 20, args.steps // 4 or 1))
    if args.quick:
        return DemoSettings.quick(**overrides)
    if _wants_gpu(args.device):  # the GPU preset: a larger model and budget (DemoSettings.gpu)
        return DemoSettings.gpu(**overrides)
    return DemoSettings(**{"steps": 550, **overrides})


def _wants_gpu(device: str) -> bool:
    import torch

    return device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())


def cmd_demo(args) -> int:
    from vwn_experiments import run_demo

    run_demo(_demo_settings(args), args.out, ratio=args.ratio, m=args.m, mtp=args.mtp, export=not args.no_onnx,
             progress=not args.no_progress, threads=args.threads, pretrain_steps=args.pretrain_steps,
             transform=args.transform)
    return 0


def cmd_study(args) -> int:
    from vwn_experiments import run_study

    run_study(_demo_settings(args), args.out, ratios=args.ratios, m=args.m, progress=not args.no_progress,
              threads=args.threads)
    return 0


COMMANDS = {"demo": cmd_demo, "study": cmd_study, "plan": cmd_plan, "widen": cmd_widen, "export": cmd_export}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``vwn`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(name)s: %(message)s")
    if not args.verbose:
        import warnings

        warnings.filterwarnings("ignore")
        logging.getLogger("torch").setLevel(logging.ERROR)
        try:
            import transformers

            transformers.logging.set_verbosity_error()
            if not sys.stderr.isatty():  # loading/saving bars are feedback in a terminal, noise in a log file
                transformers.utils.logging.disable_progress_bar()
        except ImportError:
            pass
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("vwn: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `vwn plan ... | head`: the reader left; not an error worth a message
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # Python would otherwise complain again when it flushes at exit
        return 1
    except Exception as exc:  # one line for users; VWN_TRACEBACK=1 for developers
        if os.environ.get("VWN_TRACEBACK"):
            raise
        message = " ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__
        print(f"vwn: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
