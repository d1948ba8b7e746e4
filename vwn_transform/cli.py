"""The ``vwn`` command line: ``vwn demo``, ``vwn study``, ``vwn plan``, ``vwn widen`` and ``vwn export``.

Bad arguments print one line (``vwn: error: ...``) and exit with status 2; a failure while running prints one
line and exits with status 1. ``VWN_TRACEBACK=1`` shows the full traceback instead.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger("vwn_transform")

EXAMPLES = {
    "demo": "examples:\n  vwn demo                      # ~5 min on 2 CPU cores: GPT vs its r=4 (m=2) twin\n"
            "  vwn demo --quick              # under a minute\n"
            "  vwn demo --ratio 3/2 --steps 300 --out runs/r1.5 --mtp",
    "study": "examples:\n  vwn study                     # r = 1, 1.5, 2, 4, 8\n"
             "  vwn study --ratios 1,2,4 --steps 200 --quick",
    "plan": "examples:\n  vwn plan --gpt --ratio 3/2\n  vwn plan --hf llama --tiny --ratio 8 --m 8\n"
            "  vwn plan path/to/hf_checkpoint --ratio 2",
    "widen": "examples:\n  vwn widen --hf qwen2 --tiny --ratio 1.5 --out widened_qwen2\n"
             "  vwn widen path/to/hf_checkpoint --ratio 4 --m 2 --out widened",
    "export": "examples:\n  vwn export --hf llama --tiny --ratio 1.5 --out llama_vwn.onnx\n"
              "  vwn export --gpt --ratio 4 --m 2 --out gpt_vwn.onnx\n"
              "  vwn export path/to/hf_checkpoint --plain --out original.onnx",
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


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _add_model_args(p: argparse.ArgumentParser, ratio_required: bool) -> None:
    src = p.add_argument_group("model (give exactly one)")
    src.add_argument("checkpoint", nargs="?", help="a local Hugging Face checkpoint directory")
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
        else:
            p.add_argument("--ratios", type=_ratios, default=_ratios("1,1.5,2,4,8"),
                           help="comma-separated ratios; 1 is the baseline (default 1,1.5,2,4,8)")
        p.add_argument("--m", type=_positive_int, default=2, help="slots per original width (default 2)")
        p.add_argument("--steps", type=_positive_int, help="training steps per model (default 550, --quick 80)")
        p.add_argument("--quick", action="store_true", help="a small model and budget (under a minute)")
        p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
        p.add_argument("--out", default=f"vwn_{name}_out", help=f"output folder (default vwn_{name}_out)")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--no-progress", action="store_true", help="no progress bars")

    p = add("plan", "show what widen() would do to a model, without changing it")
    _add_model_args(p, ratio_required=True)

    p = add("widen", "widen a model and save it")
    _add_model_args(p, ratio_required=True)
    p.add_argument("--out", required=True, help="output folder")

    p = add("export", "export a (widened) model to ONNX, verified in onnxruntime")
    _add_model_args(p, ratio_required=False)
    p.add_argument("--plain", action="store_true", help="export the model without widening it")
    p.add_argument("--out", required=True, help="the .onnx file to write")
    p.add_argument("--opset", type=int, default=20)
    p.add_argument("--no-verify", action="store_true", help="skip the onnxruntime check")
    p.add_argument("--fixed-shapes", action="store_true", help="no dynamic batch/sequence axes")
    return parser


# ------------------------------------------------------------------------------------------------------------
# commands
# ------------------------------------------------------------------------------------------------------------
def load_model(args):
    """The model named by ``checkpoint`` / ``--hf TYPE --tiny`` / ``--gpt``, in eval mode, and its kind."""
    given = [x for x in (args.checkpoint, args.hf, args.gpt or None) if x]
    if len(given) != 1:
        raise CLIError("give exactly one model: a checkpoint directory, --hf TYPE --tiny, or --gpt")
    if args.gpt:
        import torch

        from .models import GPT, GPTConfig

        torch.manual_seed(0)
        return GPT(GPTConfig(vocab_size=256, block_size=128, n_layer=4, n_head=4, n_embd=128)).eval(), "gpt"
    if args.hf:
        if not args.tiny:
            raise CLIError(f"--hf {args.hf} builds a randomly initialized model and needs --tiny (a real "
                           "checkpoint is loaded from its directory: vwn plan path/to/checkpoint)")
        from .models.hf_tiny import tiny_hf_model

        return tiny_hf_model(args.hf), "hf"
    path = Path(args.checkpoint)
    if not path.is_dir():
        raise CLIError(f"checkpoint {str(path)!r} is not a directory (expected a Hugging Face checkpoint folder "
                       "with config.json)")
    if not (path / "config.json").is_file():
        raise CLIError(f"{str(path)!r} has no config.json; is it a Hugging Face checkpoint folder?")
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise CLIError("loading a checkpoint needs transformers: pip install 'vwn_transform[hf]'") from None
    return AutoModelForCausalLM.from_pretrained(str(path)).eval(), "hf"


def _widen_kwargs(args) -> dict:
    return dict(m=args.m, dynamic=not args.static, init=args.init)


def cmd_plan(args) -> int:
    from .widen import plan

    model, _ = load_model(args)
    print(plan(model, args.ratio, **_widen_kwargs(args)))
    return 0


def cmd_widen(args) -> int:
    from .widen import widen

    model, kind = load_model(args)
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CLIError(f"output folder {str(out)!r} exists and is not empty; choose a new folder")
    wide = widen(model, args.ratio, **_widen_kwargs(args), inplace=True)
    out.mkdir(parents=True, exist_ok=True)
    if kind == "hf":
        wide.save_pretrained(str(out))  # config.json records the recipe; load with vwn_transform.from_pretrained
        how = f"vwn_transform.from_pretrained({str(out)!r})"
    else:
        import dataclasses

        from .persist import save

        save(wide, out / "model.pt")
        (out / "gpt_config.json").write_text(json.dumps(dataclasses.asdict(wide.config), indent=2))
        how = (f"vwn_transform.load({str(out / 'model.pt')!r}, lambda: GPT(GPTConfig(**json.load(open("
               f"{str(out / 'gpt_config.json')!r})))))")
    print(f"widened {type(model).__name__} to r={args.ratio} (m={wide.vwn_config.m}, n={wide.vwn_config.n}); "
          f"saved to {out}/; load it back with {how}")
    return 0


def cmd_export(args) -> int:
    if args.plain and args.ratio is not None:
        raise CLIError("--plain exports the model as it is; drop --ratio (or drop --plain to widen first)")
    if not args.plain and args.ratio is None:
        raise CLIError("give --ratio to widen before exporting, or --plain to export the model as it is")
    try:
        from .onnx import export_onnx
    except ImportError as exc:
        raise CLIError(f"vwn export needs the ONNX extra: pip install 'vwn_transform[onnx]' ({exc})") from None
    model, kind = load_model(args)
    if not args.plain:
        from .widen import widen

        model = widen(model, args.ratio, **_widen_kwargs(args), inplace=True)
    example = None
    if kind == "gpt":
        import torch

        example = (torch.randint(0, 256, (2, 8)),)
    report = export_onnx(model, args.out, example_inputs=example, dynamic=not args.fixed_shapes,
                         opset=args.opset, verify=not args.no_verify)
    print(report)
    return 0


def _demo_settings(args):
    from .demo import DemoSettings

    overrides = {"seed": args.seed, "device": args.device}
    if args.steps is not None:
        overrides["steps"] = args.steps
        overrides["eval_every"] = max(1, min(50 if not args.quick else 20, args.steps // 4 or 1))
    settings = DemoSettings.quick(**overrides) if args.quick else DemoSettings(**{"steps": 550, **overrides})
    return settings


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(_demo_settings(args), args.out, ratio=args.ratio, m=args.m, mtp=args.mtp, export=not args.no_onnx,
             progress=not args.no_progress)
    return 0


def cmd_study(args) -> int:
    from .demo import run_study

    run_study(_demo_settings(args), args.out, ratios=args.ratios, m=args.m, progress=not args.no_progress)
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
        except ImportError:
            pass
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("vwn: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # one line for users; VWN_TRACEBACK=1 for developers
        if os.environ.get("VWN_TRACEBACK"):
            raise
        message = " ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__
        print(f"vwn: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
