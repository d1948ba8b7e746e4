"""The command line on its own outputs, as users round-trip them: widen -> train -> save -> plan/widen/export, and
checkpoints that are truncated, incomplete or carry foreign weights (issue 12; strict loading of issue 18)."""

from __future__ import annotations

import json
import logging
import os
import stat

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import vwn_transform
from vwn_transform import CheckpointError
from vwn_transform.cli import main
from vwn_transform.models import GPT, GPTConfig
from vwn_transform.models.hf_tiny import tiny_hf_model
from vwn_transform.persist import load_plain_pretrained


def cli(capsys, *args):
    """main() in this process; returns (status, stdout, stderr)."""
    try:
        status = main([str(a) for a in args])
    except SystemExit as exc:
        status = exc.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def one_line_error(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("vwn")]
    assert lines and "Traceback" not in err, err
    return lines[-1]


def onnx_logits(path, ids: torch.Tensor, with_mask: bool) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": ids.numpy()} if with_mask else {session.get_inputs()[0].name: ids.numpy()}
    if with_mask:
        feeds["attention_mask"] = np.ones_like(feeds["input_ids"])
    return session.run(["logits"], feeds)[0]


@torch.no_grad()
def perturb(model: torch.nn.Module, seed: int = 1) -> None:
    """Stand-in for training: move every floating parameter, the VWN ones included, off its initial value."""
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.is_floating_point():
            p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def test_trained_widened_hf_checkpoint_round_trips_through_export_and_from_pretrained(tmp_path, capsys):
    base_dir, trained_dir = tmp_path / "X", tmp_path / "Xt"
    status, out, err = cli(capsys, "widen", "--hf", "gpt2", "--tiny", "--ratio", 2, "--out", base_dir)
    assert status == 0, err
    wide = vwn_transform.from_pretrained(base_dir)
    perturb(wide)  # "training"
    wide.eval().save_pretrained(str(trained_dir))
    ids = torch.randint(0, wide.config.vocab_size, (2, 7))
    with torch.no_grad():
        want = wide(ids).logits
        plain = tiny_hf_model("gpt2").eval()
        plain.load_state_dict({k: v for k, v in wide.state_dict().items() if ".vwn_" not in k}, strict=False)
        without_vwn = plain(ids).logits  # what the old CLI exported: the base architecture with the base weights
    assert (want - without_vwn).abs().max() > 1e-2  # the VWN weights matter, so losing them would show

    back = vwn_transform.from_pretrained(trained_dir)
    with torch.no_grad():
        assert torch.equal(back(ids).logits, want)

    # a widened checkpoint exports as it is (--plain as the user typed it; without a flag in the GPT test)
    target = tmp_path / "m.onnx"
    status, out, err = cli(capsys, "export", trained_dir, "--plain", "--out", target)
    assert status == 0, err
    assert "widened by vwn_transform: yes" in out
    got = onnx_logits(target, ids, with_mask=True)
    assert np.abs(got - want.numpy()).max() <= 1e-4

    for command in (["plan", trained_dir, "--ratio", 2], ["widen", trained_dir, "--ratio", 2, "--out", tmp_path / "XX"]):
        status, _, err = cli(capsys, *command)
        line = one_line_error(err)
        assert status == 1 and "already widened" in line and "vwn export" in line and "from_pretrained" in line, line
    assert not (tmp_path / "XX").exists()
    status, _, err = cli(capsys, "export", trained_dir, "--ratio", 2, "--out", tmp_path / "x.onnx")
    assert status == 1 and "already widened" in one_line_error(err) and "drop --ratio" in err
    assert not (tmp_path / "x.onnx").exists()


def test_widened_gpt_folder_reads_back_in_plan_widen_export(tmp_path, capsys):
    folder = tmp_path / "G"
    status, out, err = cli(capsys, "widen", "--gpt", "--ratio", "3/2", "--out", folder)
    assert status == 0, err
    cfg = GPTConfig(**json.loads((folder / "gpt_config.json").read_text()))
    wide = vwn_transform.load(folder / "model.pt", lambda: GPT(cfg))
    perturb(wide)
    vwn_transform.save(wide.eval(), folder / "model.pt")  # "trained" weights in the same folder
    for command in (["plan", folder, "--ratio", 2], ["widen", folder, "--ratio", 2, "--out", tmp_path / "GG"]):
        status, _, err = cli(capsys, *command)
        assert status == 1 and "already widened" in one_line_error(err) and "vwn_transform.load(" in err, err
    target = tmp_path / "g.onnx"
    status, out, err = cli(capsys, "export", folder, "--out", target)
    assert status == 0, err
    idx = torch.randint(0, cfg.vocab_size, (2, 9))
    with torch.no_grad():
        want = wide(idx)[0].numpy()
    assert np.abs(onnx_logits(target, idx, with_mask=False) - want).max() <= 1e-4

    (folder / "model.pt").unlink()
    status, _, err = cli(capsys, "export", folder, "--out", tmp_path / "h.onnx")
    assert status == 1 and "no model.pt" in one_line_error(err)


def test_truncated_checkpoints_name_the_file(tmp_path, capsys):
    plain, wide = tmp_path / "plain", tmp_path / "wide"
    tiny_hf_model("llama").save_pretrained(str(plain))
    vwn_transform.widen(tiny_hf_model("llama"), 2).save_pretrained(str(wide))
    for folder in (plain, wide):
        weights = folder / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        status, _, err = cli(capsys, "plan", folder, "--ratio", 2)
        line = one_line_error(err)
        assert status == 1 and str(weights) in line and "truncated or corrupt" in line, line
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    status, _, err = cli(capsys, "plan", tmp_path / "bad", "--ratio", 2)
    assert status == 1 and "config.json" in one_line_error(err) and "not readable JSON" in err


def _rewrite_weights(folder, edit):
    weights = folder / "model.safetensors"
    state = load_file(str(weights))
    edit(state)
    save_file(state, str(weights), metadata={"format": "pt"})


@pytest.mark.parametrize("widened", [False, True])
def test_missing_and_unexpected_weights_are_errors(widened, tmp_path, capsys, caplog):
    model = tiny_hf_model("llama")
    if widened:
        model = vwn_transform.widen(model, "3/2")
    load = vwn_transform.from_pretrained if widened else load_plain_pretrained
    missing_dir, extra_dir = tmp_path / "missing", tmp_path / "extra"
    for folder in (missing_dir, extra_dir):
        model.save_pretrained(str(folder))
    dropped = "model.layers.1.mlp.down_proj.weight"
    _rewrite_weights(missing_dir, lambda s: s.pop(dropped))
    _rewrite_weights(extra_dir, lambda s: s.update({"model.layers.7.mystery.weight": torch.zeros(3)}))

    with pytest.raises(CheckpointError, match=rf"missing weights \['{dropped}'\]"):
        load(missing_dir)
    with pytest.raises(CheckpointError, match=r"unexpected weights \['model.layers.7.mystery.weight'\]"):
        load(extra_dir)
    status, _, err = cli(capsys, "export", missing_dir, "--plain", "--out", tmp_path / "m.onnx")
    assert status == 1 and dropped in one_line_error(err)
    assert not (tmp_path / "m.onnx").exists()

    with caplog.at_level(logging.WARNING, logger="vwn_transform"):
        loose = load(missing_dir, strict=False)  # the explicit opt-out: loads, and says what is missing
    assert dropped in caplog.text and "strict=False" in caplog.text
    assert loose.model.layers[1].mlp.down_proj.weight.shape == model.model.layers[1].mlp.down_proj.weight.shape


def test_widened_checkpoint_missing_a_vwn_weight(tmp_path):
    folder = tmp_path / "w"
    vwn_transform.widen(tiny_hf_model("qwen2"), 2).save_pretrained(str(folder))
    _rewrite_weights(folder, lambda s: s.pop("model.norm.vwn_reduce"))
    with pytest.raises(CheckpointError, match=r"missing \['model.norm.vwn_reduce'\]"):
        vwn_transform.from_pretrained(folder)


def test_model_id_without_network_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))  # an empty cache
    status, _, err = cli(capsys, "plan", "someone/no-such-model", "--ratio", 2)
    line = one_line_error(err)
    assert status == 1 and "'someone/no-such-model'" in line and "Hugging Face model id" in line
    assert "HF_HUB_OFFLINE" in line
    status, _, err = cli(capsys, "plan", str(tmp_path / "not" / "there"), "--ratio", 2)
    assert status == 1 and "does not exist" in one_line_error(err)


def test_written_files_respect_the_umask(tmp_path, capsys):
    old = os.umask(0o022)
    try:
        status, _, err = cli(capsys, "widen", "--hf", "llama", "--tiny", "--ratio", 2, "--out", tmp_path / "w")
        assert status == 0, err
        status, _, err = cli(capsys, "widen", "--gpt", "--ratio", 2, "--out", tmp_path / "g")
        assert status == 0, err
        from vwn_transform.persist import writable_temp_file

        onnx_tmp = writable_temp_file(tmp_path / "g.onnx")  # what export_onnx writes and renames into place
    finally:
        os.umask(old)
    written = [*(tmp_path / "w").iterdir(), *(tmp_path / "g").iterdir(), onnx_tmp]
    assert any(p.name == "model.safetensors" for p in written)
    for p in written:
        assert stat.S_IMODE(p.stat().st_mode) == 0o644, (p, oct(p.stat().st_mode))
    for folder in (tmp_path / "w", tmp_path / "g"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o755


@pytest.mark.parametrize("args,needles", [
    (["plan", "--gpt", "--ratio", "10000"], ["ratio 10000 needs more than", "1024"]),
    (["plan", "--gpt", "--ratio", "3/0"], ["'3/0' divides by zero"]),
])
def test_ratio_messages(args, needles, capsys):
    status, _, err = cli(capsys, *args)
    line = one_line_error(err)
    assert status in (1, 2) and all(n in line for n in needles) and "Fraction(" not in line, line


def test_out_paths_that_cannot_be_written(tmp_path, capsys):
    (tmp_path / "afile").write_text("keep")
    status, _, err = cli(capsys, "widen", "--gpt", "--ratio", 2, "--out", tmp_path / "afile")
    assert status == 1 and "is a file" in one_line_error(err)
    assert (tmp_path / "afile").read_text() == "keep"
    locked = tmp_path / "locked"
    locked.mkdir()
    target = locked / "m.onnx"
    from vwn_transform.persist import writable_temp_file

    os.chmod(locked, 0o500)
    try:
        if os.access(locked, os.W_OK):  # root ignores the mode: make the folder unusable another way
            os.chmod(locked, 0o700)
            locked.rmdir()
            locked.write_text("now a file")
            target = locked / "m.onnx"
        with pytest.raises((PermissionError, ValueError)) as exc:
            writable_temp_file(target)
        assert str(target) in str(exc.value) and ".tmp" not in str(exc.value)
    finally:
        if locked.is_dir():
            os.chmod(locked, 0o700)


def test_unusual_ratios_warn(caplog):
    model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=16)).eval()
    with caplog.at_level(logging.WARNING, logger="vwn_transform"):
        vwn_transform.widen(model, 1)
    assert "ratio 1" in caplog.text and "no width" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vwn_transform"):
        vwn_transform.plan(model, 64, m=1)
    assert "multiplies the parameters" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vwn_transform"):
        vwn_transform.widen(model, 2)
    assert caplog.text == ""


def test_export_onnx_from_python_prints_no_exporter_noise(tmp_path, capfd):
    import warnings

    model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=16)).eval()
    wide = vwn_transform.widen(model, 2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        vwn_transform.export_onnx(wide, tmp_path / "m.onnx", example_inputs=(torch.randint(0, 64, (2, 8)),))
    err = capfd.readouterr().err
    assert "torchvision" not in err, err
    noisy = [str(w.message) for w in caught if issubclass(w.category, (FutureWarning, UserWarning))]
    assert not noisy, noisy


def test_plain_checkpoint_folder_widens_and_reloads(tmp_path, capsys):
    original = tiny_hf_model("qwen3").eval()
    original.save_pretrained(str(tmp_path / "P"))
    status, out, err = cli(capsys, "plan", tmp_path / "P", "--ratio", "3/2")
    assert status == 0 and "Qwen3ForCausalLM" in out and "3/2" in out, err
    status, out, err = cli(capsys, "widen", tmp_path / "P", "--ratio", "3/2", "--out", tmp_path / "W")
    assert status == 0 and "from_pretrained" in out, err
    back = vwn_transform.from_pretrained(tmp_path / "W")
    assert (back.vwn_config.m, back.vwn_config.n) == (2, 3)
    ids = torch.randint(0, original.config.vocab_size, (2, 6))
    with torch.no_grad():
        assert (back(ids).logits - original(ids).logits).abs().max() <= 1e-5


def test_export_kv_cache_needs_a_hugging_face_model(tmp_path, capsys):
    status, _, err = cli(capsys, "export", "--gpt", "--ratio", 2, "--kv-cache", "--out", tmp_path / "k.onnx")
    assert status == 1 and "--kv-cache exports Hugging Face causal LMs" in one_line_error(err)
    status, _, err = cli(capsys, "export", "--gpt", "--ratio", 2, "--dtype", "float64", "--out", tmp_path / "k.onnx")
    assert status == 2 and "float64" in err
    assert not any(tmp_path.iterdir())
