"""The `vwn` console script (through subprocess, as users run it) and the demo's analysis functions."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vwn_experiments import fit_log_linear, token_efficiency, tokens_to_reach

VWN = Path(sys.executable).parent / "vwn"  # the installed console script


def run_vwn(*args, cwd=None, timeout=300):
    assert VWN.is_file(), f"the console script is not installed at {VWN} (pip install -e .)"
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    env.pop("VWN_TRACEBACK", None)
    return subprocess.run([str(VWN), *map(str, args)], capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          env=env)


def assert_one_line_error(proc, status, *needles):
    assert proc.returncode == status, (proc.returncode, proc.stdout[-500:], proc.stderr[-2000:])
    err = proc.stderr.strip()
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err


# ------------------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------------------
def test_help_lists_commands_with_examples(capsys):
    sub = run_vwn("demo", "--help")  # the installed console script (one subprocess: CI time)
    assert sub.returncode == 0 and "examples:" in sub.stdout and "vwn demo" in sub.stdout
    from vwn_transform.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    top = capsys.readouterr().out
    for command in ("demo", "study", "plan", "widen", "export"):
        assert command in top
        with pytest.raises(SystemExit) as exc:
            main([command, "--help"])
        assert exc.value.code == 0
        out = capsys.readouterr().out
        assert "examples:" in out and f"vwn {command}" in out


def test_demo_quick_writes_results_plot_and_onnx(tmp_path):
    out = tmp_path / "demo"
    proc = run_vwn("demo", "--quick", "--steps", 5, "--out", out, "--no-progress", "--mtp")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert (results["m"], results["n"], results["ratio"]) == (2, 8, "4")
    assert results["settings"]["steps"] == 5 and results["mtp"] is True
    assert len(results["tokens"]) == len(results["val_loss"]["baseline"]) == len(results["val_loss"]["widened"])
    assert results["tokens"][0] == 0 and results["tokens"][-1] == 5 * results["settings"]["batch_size"] * \
        results["settings"]["block_size"]
    # same seed, same weights at step 0: the function-preserving twin starts at the baseline's loss
    assert abs(results["val_loss"]["baseline"][0] - results["val_loss"]["widened"][0]) <= 1e-5
    assert len(results["val_mtp_loss"]) == len(results["tokens"])
    assert (out / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert results["onnx"]["max_abs_diff"] <= 1e-4 and (out / "widened.onnx").is_file()
    assert "token efficiency" in proc.stdout and "| tokens |" in proc.stdout


def test_study_quick_fits_and_plots(tmp_path):
    out = tmp_path / "study"
    proc = run_vwn("study", "--quick", "--steps", 3, "--ratios", "1,2,4", "--out", out, "--no-progress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "study.json").read_text())
    assert results["ratios"] == ["1", "2", "4"] and results["fit_r_ge_2"]["points"] == 2
    assert (out / "study.png").read_bytes()[:4] == b"\x89PNG"
    assert "log2(r)" in proc.stdout


def in_process(*args):
    """The CLI's main() in this process (the console script's code path without the interpreter start-up)."""
    from vwn_transform.cli import main

    return main([str(a) for a in args])


def test_plan_widen_export(tmp_path, capsys):
    assert in_process("plan", "--hf", "llama", "--tiny", "--ratio", "3/2") == 0
    out = capsys.readouterr().out
    assert "r = n/m = 3/2" in out and "LlamaForCausalLM" in out

    out = tmp_path / "wide_gpt"
    assert in_process("widen", "--gpt", "--ratio", 4, "--m", 2, "--out", out) == 0
    import torch

    import vwn_transform
    from vwn_transform.models import GPT, GPTConfig

    cfg = json.loads((out / "gpt_config.json").read_text())
    back = vwn_transform.load(out / "model.pt", lambda: GPT(GPTConfig(**cfg)))
    assert (back.vwn_config.n, back.vwn_config.m) == (8, 2)
    torch.manual_seed(0)  # the CLI's reference GPT: same seed, same init, function-preserving widen
    base = GPT(GPTConfig(**cfg)).eval()
    idx = torch.randint(0, 256, (1, 9))
    with torch.no_grad():
        assert (back(idx)[0] - base(idx)[0]).abs().max().item() <= 1e-5

    out = tmp_path / "wide_qwen"
    assert in_process("widen", "--hf", "qwen2", "--tiny", "--ratio", 2, "--out", out) == 0
    assert (out / "config.json").is_file() and any(out.glob("*.safetensors"))
    assert vwn_transform.from_pretrained(out).vwn_config.n == 2

    target = tmp_path / "llama.onnx"
    proc = run_vwn("export", "--hf", "llama", "--tiny", "--ratio", "1.5", "--out", target)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert target.is_file() and "max abs diff" in proc.stdout and "widened by vwn_transform: yes" in proc.stdout


BAD_ARGUMENTS = [
    (("demo", "--steps", "0"), 2, ["--steps", "positive integer"]),
    (("demo", "--ratio", "abc"), 2, ["abc"]),
    (("study", "--ratios", ","), 2, ["comma-separated"]),
    (("plan", "--gpt", "--ratio", "-2"), 2, ["-2"]),
    (("plan", "--ratio", "2"), 1, ["exactly one model"]),
    (("plan", "--gpt", "--hf", "llama", "--ratio", "2"), 1, ["exactly one model"]),
    (("plan", "--hf", "llama", "--ratio", "2"), 1, ["--tiny"]),
    (("plan", "--hf", "not_a_model", "--tiny", "--ratio", "2"), 1, ["not_a_model"]),
    (("plan", "/nonexistent/checkpoint", "--ratio", "2"), 1, ["/nonexistent/checkpoint"]),
    (("plan", "--gpt", "--ratio", "5/3"), 1, ["5/3"]),  # D=128: n = 5m/3 needs 3 | m, and m must divide 128
    (("export", "--gpt", "--out", "x.onnx"), 1, ["--ratio", "--plain"]),
    (("demo", "--device", "cuda:0", "--quick"), 1, ["CUDA is not available"]),
    (("nonsense",), 2, ["invalid choice"]),
    (("demo", "--pretrain-steps", "-1"), 2, ["--pretrain-steps", ">= 0"]),
    (("demo", "--lr", "0"), 2, ["--lr", "learning rate > 0", "'0'"]),
    (("study", "--lr", "nan"), 2, ["--lr", "'nan'"]),
]


def test_learning_rate_reaches_the_demo_settings():
    from vwn_transform.cli import _demo_settings, build_parser

    default = _demo_settings(build_parser().parse_args(["demo"]))
    chosen = _demo_settings(build_parser().parse_args(["demo", "--lr", "5e-3", "--quick"]))
    assert chosen.lr == 5e-3 and default.lr == __import__("vwn_experiments").DemoSettings().lr
    demo_help = next(a for a in build_parser()._subparsers._group_actions[0].choices["demo"]._actions
                     if "--lr" in a.option_strings).help
    stated = __import__("re").search(r"default ([0-9.e-]+)", demo_help)
    assert stated and float(stated.group(1)) == default.lr, demo_help  # the help states the recipe's default


def test_gpu_device_picks_the_gpu_preset_and_flags_still_apply():
    from vwn_experiments import DemoSettings
    from vwn_transform.cli import _demo_settings, build_parser

    gpu = _demo_settings(build_parser().parse_args(["demo", "--device", "cuda"]))
    assert (gpu.n_layer, gpu.n_embd, gpu.steps, gpu.device) == (8, 512, 1500, "cuda")
    assert gpu.tokens_per_step > 4 * DemoSettings().tokens_per_step
    tuned = _demo_settings(build_parser().parse_args(["study", "--device", "cuda:1", "--steps", "300", "--lr", "2e-3"]))
    assert (tuned.n_embd, tuned.steps, tuned.lr, tuned.device) == (512, 300, 2e-3, "cuda:1")
    quick = _demo_settings(build_parser().parse_args(["demo", "--device", "cuda", "--quick"]))
    assert quick.n_embd == DemoSettings.quick().n_embd  # --quick wins
    assert _demo_settings(build_parser().parse_args(["demo"])).n_embd == DemoSettings().n_embd


def run_in_process(args, capsys):
    from vwn_transform.cli import main

    try:
        status = main(list(args))
    except SystemExit as exc:
        status = exc.code
    return status, capsys.readouterr().err


@pytest.mark.parametrize("args,status,needles", BAD_ARGUMENTS)
def test_bad_arguments_one_line_nonzero(args, status, needles, tmp_path, monkeypatch, capsys):
    # in-process (the same main() the console script runs) to keep the suite fast; a few also run as the real
    # console script below
    if args[:2] == ("demo", "--device") and __import__("torch").cuda.is_available():
        args, needles = ("demo", "--device", "tpu", "--quick"), ["tpu"]
    monkeypatch.chdir(tmp_path)
    got_status, err = run_in_process(args, capsys)
    assert got_status == status, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert all(needle in err for needle in needles), err
    assert not any(tmp_path.iterdir())  # nothing written


@pytest.mark.parametrize("case", [0, 4, 12])
def test_bad_arguments_through_the_console_script(case, tmp_path):
    args, status, needles = BAD_ARGUMENTS[case]
    assert_one_line_error(run_vwn(*args, cwd=tmp_path), status, *needles)
    assert not any(tmp_path.iterdir())


def test_widen_refuses_a_non_empty_output_folder(tmp_path):
    (tmp_path / "keep.txt").write_text("user data")
    assert_one_line_error(run_vwn("widen", "--gpt", "--ratio", 2, "--out", tmp_path), 1, "not empty")
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


# ------------------------------------------------------------------------------------------------------------
# analysis on synthetic data
# ------------------------------------------------------------------------------------------------------------
TOKENS = [0, 100, 200, 300, 400]


def test_token_efficiency_interpolates():
    base = [5.0, 4.0, 3.0, 2.5, 2.0]
    wide = [5.0, 3.0, 2.2, 1.9, 1.8]  # reaches 2.0 between 200 (2.2) and 300 (1.9): 200 + 100 * 0.2/0.3
    assert tokens_to_reach(TOKENS, wide, 2.0) == pytest.approx(200 + 100 * 0.2 / 0.3)
    assert token_efficiency(TOKENS, base, wide) == pytest.approx(400 / (200 + 100 * 0.2 / 0.3))
    assert token_efficiency(TOKENS, base, base) == pytest.approx(1.0)


def test_token_efficiency_non_monotone_and_not_reached():
    base = [5.0, 3.0, 1.9, 2.1, 2.0]  # the baseline first reaches its final 2.0 between 100 and 200
    wide = [5.0, 2.5, 2.4, 2.3, 2.0]  # the widened model only at 400
    assert token_efficiency(TOKENS, base, wide) == pytest.approx((100 + 100 * 1.0 / 1.1) / 400)
    assert token_efficiency(TOKENS, base, [5.0, 4.0, 3.0, 2.5, 2.1]) is None
    with pytest.raises(ValueError, match="equal length"):
        tokens_to_reach([0, 1], [1.0], 0.5)


def test_log_linear_fit_recovers_the_law_and_matches_numpy():
    ratios = [2, 4, 8]
    exact = [1.6212 - 0.0069 * math.log2(r) for r in ratios]
    fit = fit_log_linear(ratios, exact)
    assert fit["a"] == pytest.approx(1.6212) and fit["b"] == pytest.approx(0.0069) and fit["r2"] == pytest.approx(1)
    noisy = [2.10, 2.07, 2.06, 2.02]
    rs = [2, 4, 8, 16]
    fit = fit_log_linear(rs, noisy)
    slope, intercept = np.polyfit(np.log2(rs), noisy, 1)
    pred = intercept + slope * np.log2(rs)
    r2 = 1 - ((np.array(noisy) - pred) ** 2).sum() / ((np.array(noisy) - np.mean(noisy)) ** 2).sum()
    assert fit["a"] == pytest.approx(intercept) and fit["b"] == pytest.approx(-slope) and fit["r2"] == pytest.approx(r2)
    with pytest.raises(ValueError, match="two distinct"):
        fit_log_linear([2, 2], [1.0, 1.1])


def test_demo_with_an_impossible_ratio_writes_nothing(tmp_path):
    # D=64 in --quick: r = 5/3 needs m divisible by 3
    assert_one_line_error(run_vwn("demo", "--quick", "--ratio", "5/3", "--out", tmp_path / "x"), 1, "5/3")
    assert not any(tmp_path.iterdir())


def test_plan_and_export_a_local_checkpoint_directory(tmp_path, capsys):
    from hf_models import tiny_hf

    ckpt = tmp_path / "ckpt"
    tiny_hf("mistral").save_pretrained(str(ckpt))
    assert in_process("plan", ckpt, "--ratio", 2, "--m", 2) == 0
    assert "MistralForCausalLM" in capsys.readouterr().out
    target = tmp_path / "plain.onnx"
    assert in_process("export", ckpt, "--plain", "--out", target) == 0
    assert "widened by vwn_transform: no" in capsys.readouterr().out and target.is_file()


# ------------------------------------------------------------------------------------------------------------
# demo robustness: optional dependencies checked before training, numbers kept when a later step fails
# ------------------------------------------------------------------------------------------------------------
def test_demo_without_matplotlib_fails_before_training(tmp_path, monkeypatch):
    from vwn_experiments import shakespeare as demo

    def no_matplotlib():
        raise ImportError("plots need matplotlib: pip install 'vwn_transform[demo]'")

    trained = []
    monkeypatch.setattr(demo, "_pyplot", no_matplotlib)
    monkeypatch.setattr(demo, "train_models", lambda *a, **k: trained.append(1))
    with pytest.raises(ImportError, match="matplotlib"):
        demo.run_demo(demo.DemoSettings.quick(steps=2), tmp_path / "out", export=False, progress=False,
                      echo=lambda _: None)
    assert not trained and not (tmp_path / "out").exists()


def test_demo_keeps_results_json_when_the_export_fails(tmp_path, monkeypatch):
    import torch

    import vwn_transform.onnx
    from vwn_experiments import shakespeare as demo

    def broken_export(*args, **kwargs):
        raise RuntimeError("onnxruntime exploded")

    monkeypatch.setattr(vwn_transform.onnx, "export_onnx", broken_export)
    threads = torch.get_num_threads()
    with pytest.raises(RuntimeError, match="exploded"):
        demo.run_demo(demo.DemoSettings.quick(steps=2, eval_every=1), tmp_path, progress=False,
                      echo=lambda _: None, threads=1)
    results = json.loads((tmp_path / "results.json").read_text())
    assert len(results["val_loss"]["baseline"]) == 3 and "exploded" in results["onnx"]
    assert (tmp_path / "loss_curves.png").is_file()
    assert torch.get_num_threads() == threads  # the caller's thread setting is restored


def test_demo_continued_pretraining_widens_the_trained_baseline(tmp_path, monkeypatch):
    """--pretrain-steps: the baseline trains alone first, its widened twin starts from the trained weights at the
    same loss (function-preserving), and both continue on batches the pretraining did not use."""
    from vwn_experiments import shakespeare as demo

    with pytest.raises(ValueError, match="pretrain_steps must be an int >= 0"):
        demo.run_demo(demo.DemoSettings.quick(steps=2), tmp_path / "bad", export=False, progress=False,
                      echo=lambda _: None, pretrain_steps=-1)
    assert not (tmp_path / "bad").exists()
    seen = []
    original = demo.Batches.train_batch
    monkeypatch.setattr(demo.Batches, "train_batch", lambda self, step: seen.append(step) or original(self, step))
    lines = []
    results = demo.run_demo(demo.DemoSettings.quick(steps=3, eval_every=1), tmp_path / "out", export=False,
                            progress=False, echo=lines.append, threads=1, pretrain_steps=4)
    pre = results["pretrain"]
    assert results["pretrain_steps"] == 4 and pre["steps"] == 4 and len(pre["val_loss"]) == 5  # steps 0..4
    assert pre["val_loss"][-1] < pre["val_loss"][0]  # the baseline did train
    lb, lw = results["val_loss"]["baseline"], results["val_loss"]["widened"]
    assert abs(lb[0] - pre["val_loss"][-1]) <= 1e-6  # the second phase starts where the first ended
    assert abs(lw[0] - lb[0]) <= 1e-5  # ... for the widened twin too (function-preserving)
    assert results["tokens"][0] == 0 and len(lb) == 4
    assert any("continued pretraining" in line for line in lines)
    assert "after 4 steps of baseline pretraining" in demo.format_demo_table(results)
    # pretraining reads batches 0..3; the second phase 4..6 (once per step, shared by the twins)
    assert seen == [0, 1, 2, 3, 4, 5, 6]


def test_demo_thread_choice(monkeypatch):
    import torch

    from vwn_experiments import DEFAULT_CPU_THREADS, choose_threads

    cpu = torch.device("cpu")
    assert choose_threads(3, cpu) == (3, "--threads")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert choose_threads(None, cpu)[0] == DEFAULT_CPU_THREADS
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert choose_threads(None, cpu) == (torch.get_num_threads(), "OMP_NUM_THREADS")
    with pytest.raises(ValueError, match="threads must be a positive int, got 0"):
        choose_threads(0, cpu)


@pytest.mark.parametrize("transform", ["adaptive_width", "widenet"])
def test_demo_trains_the_other_width_transforms(tmp_path, transform):
    from vwn_transform.cli import main

    out = tmp_path / transform
    assert main(["demo", "--quick", "--steps", "3", "--transform", transform, "--out", str(out), "--no-progress",
                 "--threads", "1"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["transform"] == transform and results["ratio"] is None and "onnx" not in results
    base, twin = results["val_loss"]["baseline"], results["val_loss"]["widened"]
    assert len(base) == len(twin) == len(results["tokens"]) and all(math.isfinite(v) for v in base + twin)
    if transform == "adaptive_width":  # function-preserving: both start at the same loss
        assert abs(base[0] - twin[0]) <= 1e-5
        assert len(results["widths"]) == results["settings"]["n_layer"]
        sizes = [row["params"] for row in results["truncation"]]
        assert sizes == sorted(sizes, reverse=True) and sizes[-1] < sizes[0]  # less mass kept: fewer parameters
    else:  # blocks shared from block 0: a different function, and fewer parameters than the baseline's blocks
        assert twin[0] != base[0]
    assert (out / "loss_curves.png").is_file()
    from vwn_experiments.shakespeare import format_demo_table

    assert f"| {transform} val loss |" in format_demo_table(results)  # not "widened": the twin is named
