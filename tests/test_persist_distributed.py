"""Save/load by recipe replay (bit-exact), optimizer groups, activation checkpointing, DDP and FSDP2 under torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import vwn_transform
from vwn_transform import CheckpointError
from vwn_transform.models import GPT, GPTConfig

from hf_models import tiny_hf

ROOT = Path(__file__).resolve().parent.parent
CFG = GPTConfig(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=32, dropout=0.0)


def trained_like(model):
    """Move every parameter off its init so a load that drops or reinitializes anything shows."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.02)
    return model


# ------------------------------------------------------------------------------------------------------------
# persistence
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family,ratio,m,extra", [("llama", 2, None, {}), ("gpt2", "3/2", None, {}),
                                                  ("mixtral", 4, 2, {}), ("qwen2", 2, 2, {"mtp": True}),
                                                  ("gemma", 3, 1, {"dynamic": False})])
def test_hf_save_pretrained_from_pretrained_is_bit_exact(family, ratio, m, extra, tmp_path):
    wide = trained_like(vwn_transform.widen(tiny_hf(family), ratio, m=m, **extra))
    wide.save_pretrained(str(tmp_path))
    saved = json.loads((tmp_path / "config.json").read_text())["vwn_recipe"]
    assert saved["vwn_config"] == wide.vwn_config.to_dict()
    assert saved["vwn_transform_version"] == vwn_transform.__version__
    assert saved["wrapped"]["blocks"] and saved["model_class"] == type(wide).__name__
    assert any(p.suffix == ".safetensors" for p in tmp_path.iterdir())

    back = vwn_transform.from_pretrained(tmp_path)
    assert back.vwn_config == wide.vwn_config
    ids = torch.randint(0, wide.config.vocab_size, (2, 11))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, wide(ids).logits)
        if extra.get("mtp"):
            back(ids, labels=ids)
            wide(ids, labels=ids)
            assert torch.equal(back.vwn_mtp.last_losses["mtp_loss"], wide.vwn_mtp.last_losses["mtp_loss"])


def test_from_pretrained_refuses_plain_and_corrupt_checkpoints(tmp_path):
    plain = tmp_path / "plain"
    tiny_hf("llama").save_pretrained(str(plain))
    with pytest.raises(CheckpointError, match="plain LlamaConfig checkpoint"):
        vwn_transform.from_pretrained(plain)
    wide_dir = tmp_path / "wide"
    vwn_transform.widen(tiny_hf("llama"), 2).save_pretrained(str(wide_dir))
    weights = wide_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        vwn_transform.from_pretrained(wide_dir)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        vwn_transform.from_pretrained(tmp_path / "missing")


def test_save_load_plain_module_is_bit_exact(tmp_path):
    wide = trained_like(vwn_transform.widen(GPT(CFG).eval(), 4, m=2, embedding="factorized"))
    path = vwn_transform.save(wide, tmp_path / "wide.pt")
    back = vwn_transform.load(path, lambda: GPT(CFG))
    idx = torch.randint(0, 64, (3, 13))
    with torch.no_grad():
        assert torch.equal(back(idx)[0], wide(idx)[0])
    assert back.lm_head.weight is back.transformer.wte.weight  # the tie survives
    assert [p.name for p in tmp_path.iterdir()] == ["wide.pt"]  # no temporary file left


def test_load_mismatches_name_both_sides(tmp_path):
    wide = vwn_transform.widen(GPT(CFG).eval(), 4, m=2)
    path = vwn_transform.save(wide, tmp_path / "wide.pt")
    other = GPTConfig(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=48, dropout=0.0)
    with pytest.raises(CheckpointError, match=r"n=8, m=2, hidden=32.*width 48"):
        vwn_transform.load(path, lambda: GPT(other))
    deeper = GPTConfig(vocab_size=64, block_size=32, n_layer=3, n_head=2, n_embd=32, dropout=0.0)
    with pytest.raises(CheckpointError, match="does not match the model's architecture"):
        vwn_transform.load(path, lambda: GPT(deeper))
    with pytest.raises(CheckpointError, match=r"already widened \(n=3, m=2.*holds n=8, m=2"):
        vwn_transform.load(path, lambda: vwn_transform.widen(GPT(CFG), "3/2"))
    with pytest.raises(CheckpointError, match="saved from a GPT, but the model to load into is a LlamaForCausalLM"):
        vwn_transform.load(path, lambda: tiny_hf("llama"))


def test_load_corrupt_or_foreign_files(tmp_path):
    wide = vwn_transform.widen(GPT(CFG).eval(), 2)
    path = vwn_transform.save(wide, tmp_path / "wide.pt")
    data = path.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        vwn_transform.load(tmp_path / "cut.pt", lambda: GPT(CFG))
    torch.save({"weights": 1}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a vwn_transform checkpoint"):
        vwn_transform.load(tmp_path / "foreign.pt", lambda: GPT(CFG))
    with pytest.raises(FileNotFoundError):
        vwn_transform.load(tmp_path / "nope.pt", lambda: GPT(CFG))
    with pytest.raises(ValueError, match="not widened"):
        vwn_transform.save(GPT(CFG), tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="does not exist"):
        vwn_transform.save(wide, tmp_path / "no" / "dir.pt")


# ------------------------------------------------------------------------------------------------------------
# optimizer groups and activation checkpointing
# ------------------------------------------------------------------------------------------------------------
def test_param_groups_no_decay_on_static_ghc_matrices():
    wide = vwn_transform.widen(tiny_hf("llama"), 2, m=2)
    decayed, plain = vwn_transform.param_groups(wide, 0.1)
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    static = {n for n, _ in wide.named_parameters() if n.rsplit(".", 1)[-1] in ("read", "carry", "write")
              and ".vwn_ghc." in n}
    assert static and static <= set(plain["names"]) and not static & set(decayed["names"])
    assert "model.layers.0.vwn_ghc.0.proj" in decayed["names"]  # the dynamic projection decays
    assert "model.norm.weight" in plain["names"] and "model.embed_tokens.vwn_extra" in decayed["names"]
    everything = {id(p) for p in wide.parameters()}
    assert {id(p) for g in (decayed, plain) for p in g["params"]} == everything
    custom = vwn_transform.param_groups(wide, 0.1, decay=lambda name, p: "mlp" in name)
    assert all("mlp" in n for n in custom[0]["names"]) and not static & set(custom[0]["names"])
    with pytest.raises(ValueError, match="weight_decay"):
        vwn_transform.param_groups(wide, -1)


def test_block_activation_checkpointing_matches_plain_backward():
    wide = vwn_transform.widen(GPT(CFG), 4, m=2).train()
    idx = torch.randint(0, 64, (2, 12))
    loss = wide(idx, idx)[1]
    loss.backward()
    ref = {n: p.grad.clone() for n, p in wide.named_parameters()}
    wide.zero_grad(set_to_none=True)
    forwards = [type(b).forward for b in wide.transformer.h]
    for block, fwd in zip(wide.transformer.h, forwards):
        block.forward = (lambda b, f: lambda x: checkpoint(f, b, x, use_reentrant=False))(block, fwd)
    loss2 = wide(idx, idx)[1]
    loss2.backward()
    assert torch.equal(loss, loss2)
    for n, p in wide.named_parameters():
        assert torch.allclose(p.grad, ref[n], atol=1e-6), n


# ------------------------------------------------------------------------------------------------------------
# DDP and FSDP2 under torchrun (gloo, 2 processes) vs one process on the same global batch
# ------------------------------------------------------------------------------------------------------------
def _free_port() -> int:
    # a port no other run holds now (pytest-xdist runs two of these tests at once)
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(tmp_path, name, *extra, nproc=None):
    out = tmp_path / f"{name}.pt"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                "--master_port", str(_free_port())] if nproc else [sys.executable]
    proc = subprocess.run([*launcher, str(ROOT / "examples" / "train_fsdp.py"), "--out", str(out), *extra],
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out)


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("single"), "single")


@pytest.mark.parametrize("mode,extra", [("ddp", ()), ("fsdp", ()), ("fsdp", ("--checkpointing",))])
def test_distributed_training_matches_one_process(mode, extra, single_run, tmp_path):
    dist_run = _train(tmp_path, mode, "--mode", mode, *extra, nproc=2)
    ref = single_run
    assert len(dist_run["losses"]) == len(ref["losses"]) == 3
    for a, b in zip(dist_run["losses"], ref["losses"]):
        assert abs(a - b) <= 1e-5
    assert dist_run["params"].keys() == ref["params"].keys()
    moved = 0
    for name, p in ref["params"].items():
        assert (dist_run["params"][name] - p).abs().max().item() <= 1e-5, name
    # and training did move the GHC parameters (a run that skipped the optimizer would also "match")
    init = vwn_transform.widen(tiny_hf("llama", vocab_size=256), 2, m=2)
    for name, p in init.named_parameters():
        if ".vwn_ghc." in name and not torch.equal(p.detach(), ref["params"][name]):
            moved += 1
    assert moved > 0
