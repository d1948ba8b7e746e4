"""Next-2-token prediction: next-token logits untouched, the loss is next + weight * next-2, the MTP loss trains."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vwn_transform
from vwn_transform import UnsupportedModelError, VWNConfig
from vwn_transform.models import GPT, GPTConfig

from hf_models import tiny_hf


def tiny_gpt():
    return GPT(GPTConfig(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=32, dropout=0.0)).eval()


@pytest.mark.parametrize("ratio,m", [(4, 2), ("3/2", None)])
def test_gpt_next_token_logits_equal_the_original_and_loss_adds_mtp(ratio, m):
    base = tiny_gpt()
    wide = vwn_transform.widen(base, ratio, m=m, mtp=True)
    assert wide.vwn_config.mtp and wide.vwn_config.mtp_weight == 0.3
    idx = torch.randint(0, 64, (3, 12))
    targets = torch.randint(0, 64, (3, 12))
    with torch.no_grad():
        logits, loss = wide(idx, targets)
        ref_logits, ref_loss = base(idx, targets)
    assert (logits - ref_logits).abs().max().item() <= 1e-5
    parts = wide.vwn_mtp.last_losses
    assert abs(parts["next_token_loss"].item() - ref_loss.item()) <= 1e-5
    assert abs(loss.item() - (ref_loss.item() + 0.3 * parts["mtp_loss"].item())) <= 1e-5
    # without labels the model is exactly the MTP-less widened model
    plain = vwn_transform.widen(base, ratio, m=m)
    with torch.no_grad():
        assert torch.equal(wide(idx)[0], plain(idx)[0])
        assert wide(idx)[1] is None


def test_mtp_loss_targets_the_token_after_next():
    # recompute the MTP loss by hand from the MTP module's pieces and the model's own output path
    wide = vwn_transform.widen(tiny_gpt(), 2, m=2, mtp=True)
    idx = torch.randint(0, 64, (2, 10))
    targets = torch.roll(idx, -1, dims=1)
    captured = {}

    def keep(key):
        def hook(module, args):
            captured.setdefault(key, args[0])  # the first call: the model's own forward, not the MTP path
        return hook

    h_final = wide.transformer.ln_f.register_forward_pre_hook(keep("state"))
    h_first = wide.transformer.h[0].register_forward_pre_hook(keep("emb"))
    with torch.no_grad():
        wide(idx, targets)
        h_final.remove()
        h_first.remove()
        x = wide.vwn_mtp.fused_input(captured["state"], captured["emb"])
        logits = wide.lm_head(wide.transformer.ln_f(wide.vwn_mtp.block(x)))  # [B, T, V]
        want = F.cross_entropy(logits[:, :-1].flatten(0, 1), targets[:, 1:].flatten())
    assert abs(wide.vwn_mtp.last_losses["mtp_loss"].item() - want.item()) <= 1e-5


@pytest.mark.parametrize("family", ["llama", "gpt2", "mixtral"])
def test_hf_mtp_keeps_logits_and_generate(family):
    model = tiny_hf(family)
    wide = vwn_transform.widen(model, 2, m=2, mtp=True)
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        out = wide(ids, labels=ids)
        ref = model(ids, labels=ids)
        assert (out.logits - ref.logits).abs().max().item() <= 1e-5
        assert abs(wide.vwn_mtp.last_losses["next_token_loss"].item() - ref.loss.item()) <= 1e-5
        assert abs(out.loss.item() - ref.loss.item() - 0.3 * wide.vwn_mtp.last_losses["mtp_loss"].item()) <= 1e-5
        gen = wide.generate(ids[:1, :4], max_new_tokens=5, do_sample=False)
        ref_gen = model.generate(ids[:1, :4], max_new_tokens=5, do_sample=False)
    assert torch.equal(gen, ref_gen)


def test_mtp_loss_trains_on_a_toy_sequence():
    torch.manual_seed(0)
    wide = vwn_transform.widen(tiny_gpt(), 4, m=2, mtp=True, mtp_weight=0.5).train()
    seq = (torch.arange(17) * 3 % 11).repeat(4, 1)  # [4, 17], period 11
    opt = torch.optim.AdamW(wide.parameters(), lr=3e-3)
    first = None
    for _ in range(25):
        loss = wide(seq[:, :-1], seq[:, 1:])[1]
        loss.backward()
        assert wide.vwn_mtp.fuse.weight.grad.abs().sum() > 0  # the MTP path is trained through the total loss
        opt.step()
        opt.zero_grad()
        first = first or wide.vwn_mtp.last_losses["mtp_loss"].item()
    last = wide.vwn_mtp.last_losses["mtp_loss"].item()
    assert last < 0.5 * first


def test_mtp_survives_deepcopy():
    wide = vwn_transform.widen(tiny_gpt(), 2, mtp=True)
    twin = copy.deepcopy(wide)
    idx = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        twin(idx, idx)
    assert twin.vwn_mtp.last_losses is not None
    assert wide.vwn_mtp.last_losses is None  # the copy's hooks feed the copy's own MTP module


class _NoLabels(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = tiny_gpt()

    def forward(self, idx):
        return self.inner(idx)[0]


def test_mtp_needs_labels_or_targets_and_leaves_model_untouched():
    model = _NoLabels()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UnsupportedModelError, match="`labels`.*`targets`"):
        vwn_transform.widen(model, 2, mtp=True, inplace=True)
    assert getattr(model, "vwn_config", None) is None and not hasattr(model, "vwn_mtp")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert not model._forward_hooks and not model._forward_pre_hooks


@pytest.mark.parametrize("bad", [{"mtp": "yes"}, {"mtp_weight": -0.1}, {"mtp_weight": float("nan")},
                                 {"mtp_weight": True}])
def test_mtp_config_validation(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        VWNConfig(n=4, m=2, **bad)
    with pytest.raises(ValueError, match=next(iter(bad))):
        vwn_transform.widen(tiny_gpt(), 2, **bad)


def test_plan_mentions_mtp():
    text = str(vwn_transform.plan(tiny_gpt(), 2, mtp=True))
    assert "next-2-token prediction" in text
