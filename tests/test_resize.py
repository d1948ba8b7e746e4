"""resize_token_embeddings on a widened HF model (issue 18): the wide table follows the vocabulary, old tokens'
logits stay, new tokens behave like the resized original (init="preserve"), ties stay, save/reload is bit-exact;
inputs_embeds of the wrong width is a clear ValueError; num_parameters(exclude_embeddings=True) excludes
vwn_extra.

References are independent of the code under test: the un-widened model resized the same way (same seed, so the
same new rows), widen() run afresh on that resized model, and parameter counts taken by name.
"""

from __future__ import annotations

import json

import pytest
import torch

import vwn_transform
from vwn_transform.modules import WideEmbedding

from hf_models import tiny_hf

RATIO = "5/2"  # m=2 -> n=5 at hidden 32: slot 16, D' = 80, extra slots k=2,3,4 copy backbone slots 0,1,0
D, WIDE, V = 32, 80, 96

CASES = {
    "llama": ("llama", {}),
    "llama-tied": ("llama", dict(tie_word_embeddings=True)),
    "gpt2": ("gpt2", {}),  # tied, with a widened learned position embedding (wpe)
    "gpt2-untied": ("gpt2", dict(tie_word_embeddings=False)),  # its head reads the first D of a padded reduce
    "qwen2": ("qwen2", {}),  # untied
}


def _pair(case, **widen_kw):
    family, kw = CASES[case]
    model = tiny_hf(family, **kw)
    return model, vwn_transform.widen(model, RATIO, m=2, **widen_kw)


def _resize_both(model, wide, n, seed=7, **kw):
    """Resize both with the same RNG state: HF draws the same new base (and head) rows for both."""
    torch.manual_seed(seed)
    model.resize_token_embeddings(n, **kw)
    torch.manual_seed(seed)
    out = wide.resize_token_embeddings(n, **kw)
    emb, ref = wide.get_input_embeddings(), model.get_input_embeddings()
    assert torch.equal(emb.weight, ref.weight)  # precondition of every comparison against the original
    assert torch.equal(wide.get_output_embeddings().weight, model.get_output_embeddings().weight)
    return out


def _logits(model, ids, **kw):
    with torch.no_grad():
        return model(ids, **kw).logits


def _is_tied(model):
    return model.get_output_embeddings().weight is model.get_input_embeddings().weight


def _assert_reloads_bit_exact(wide, folder, ids):
    wide.save_pretrained(folder)
    arch = json.loads((folder / "config.json").read_text())["architectures"]
    assert arch == [wide.vwn_base_class.__name__]  # the swapped class keeps the HF class name
    back = vwn_transform.from_pretrained(folder)
    assert back.config.vocab_size == wide.config.vocab_size
    state, back_state = wide.state_dict(), back.state_dict()
    assert state.keys() == back_state.keys()
    for k, v in state.items():
        assert torch.equal(back_state[k], v), k
    assert torch.equal(_logits(back, ids), _logits(wide, ids))
    assert _is_tied(back) == _is_tied(wide)
    return back


# ------------------------------------------------------------------------------------------------------------
# growing, init="preserve"
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mean_resizing", [True, False])
@pytest.mark.parametrize("case", list(CASES))
def test_grow_keeps_old_logits_and_new_tokens_match_resized_original(case, mean_resizing, tmp_path):
    model, wide = _pair(case)
    tied = _is_tied(model)
    emb = wide.get_input_embeddings()
    extra = emb.vwn_extra
    extra_before = extra.detach().clone()
    old_ids = torch.randint(3, V, (2, 9))
    before = _logits(wide, old_ids)

    returned = _resize_both(model, wide, 111, mean_resizing=mean_resizing)

    assert returned is emb and wide.get_input_embeddings() is emb
    assert emb.vwn_extra is extra  # the same Parameter (an optimizer built before the resize still holds it)
    assert emb.weight.shape == (111, D) and emb.vwn_extra.shape == (111, WIDE - D)
    assert wide.config.vocab_size == 111 and wide.get_output_embeddings().weight.shape == (111, D)
    assert torch.equal(emb.vwn_extra[:V], extra_before)
    # new rows are what widen() builds from the new base rows: compare with widen() of the resized original
    fresh = vwn_transform.widen(model, RATIO, m=2)
    assert torch.equal(emb.vwn_extra, fresh.get_input_embeddings().vwn_extra)
    assert _is_tied(wide) == tied
    if tied:
        assert wide.get_output_embeddings().weight is emb.weight
    if case.startswith("gpt2"):  # a token resize leaves the (widened) position table alone
        wpe = wide.transformer.wpe
        assert wpe.weight.shape == (64, D) and wpe.vwn_extra.shape == (64, WIDE - D)

    after = _logits(wide, old_ids)
    assert after.shape[-1] == 111
    assert (after[..., :V] - before).abs().max().item() <= 1e-5
    new_ids = torch.cat([old_ids, torch.tensor([[96, 104, 110], [110, 100, 97]])], dim=1)
    assert (_logits(wide, new_ids) - _logits(model, new_ids)).abs().max().item() <= 1e-5

    if mean_resizing:  # the save/reload round trip once per model
        _assert_reloads_bit_exact(wide, tmp_path, new_ids)


@pytest.mark.parametrize("case", ["gpt2", "qwen2"])
def test_shrink(case, tmp_path):
    model, wide = _pair(case)
    extra_before = wide.get_input_embeddings().vwn_extra.detach().clone()
    ids = torch.randint(3, 80, (2, 8))
    before = _logits(wide, ids)
    _resize_both(model, wide, 80)
    emb = wide.get_input_embeddings()
    assert emb.weight.shape[0] == emb.vwn_extra.shape[0] == wide.config.vocab_size == 80
    assert torch.equal(emb.vwn_extra, extra_before[:80])
    assert (_logits(wide, ids) - before[..., :80]).abs().max().item() <= 1e-5
    assert (_logits(wide, ids) - _logits(model, ids)).abs().max().item() <= 1e-5
    with pytest.raises(IndexError):
        _logits(wide, torch.tensor([[80]]))  # a removed token is gone from both tables, as in the original
    _assert_reloads_bit_exact(wide, tmp_path, ids)


def test_pad_to_multiple_of_and_repeated_resizes(tmp_path):
    model, wide = _pair("llama-tied")
    _resize_both(model, wide, 100, pad_to_multiple_of=48)  # -> 144
    emb = wide.get_input_embeddings()
    assert emb.weight.shape[0] == emb.vwn_extra.shape[0] == wide.config.vocab_size == 144
    _resize_both(model, wide, None, pad_to_multiple_of=64, seed=8)  # pads the current 144 -> 192
    _resize_both(model, wide, 150, seed=9)  # and back down
    assert emb.weight.shape[0] == emb.vwn_extra.shape[0] == wide.config.vocab_size == 150
    assert wide.lm_head.weight is emb.weight
    assert torch.equal(emb.vwn_extra, vwn_transform.widen(model, RATIO, m=2).get_input_embeddings().vwn_extra)
    ids = torch.tensor([[5, 96, 143, 149, 120, 7]])
    assert (_logits(wide, ids) - _logits(model, ids)).abs().max().item() <= 1e-5
    _assert_reloads_bit_exact(wide, tmp_path, ids)


def test_factorized_embedding_resizes_with_its_base_table(tmp_path):
    model, wide = _pair("gpt2-untied", embedding="factorized")
    expand = wide.transformer.wte.vwn_expand.detach().clone()
    _resize_both(model, wide, 120)
    assert torch.equal(wide.transformer.wte.vwn_expand, expand)  # [D', D]: independent of the vocabulary
    ids = torch.tensor([[3, 96, 119, 50, 110]])
    assert (_logits(wide, ids) - _logits(model, ids)).abs().max().item() <= 1e-5
    _assert_reloads_bit_exact(wide, tmp_path, ids)


def test_resize_keeps_requires_grad_of_the_extra_slots():
    """HF sets requires_grad on the whole embedding module from weight's flag; a frozen base table with
    trainable extra slots stays so."""
    _, wide = _pair("llama")
    emb = wide.get_input_embeddings()
    emb.weight.requires_grad_(False)
    wide.resize_token_embeddings(100)
    assert not emb.weight.requires_grad and emb.vwn_extra.requires_grad


# ------------------------------------------------------------------------------------------------------------
# init="paper": new extra rows follow HF's initializer for new rows
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mean_resizing", [True, False])
def test_paper_init_new_rows_follow_hf_statistics(mean_resizing, tmp_path):
    model, wide = _pair("qwen2", init="paper")
    emb = wide.get_input_embeddings()
    old = emb.vwn_extra.detach().clone()
    wide.resize_token_embeddings(V + 400, mean_resizing=mean_resizing)
    new = emb.vwn_extra.detach()[V:].float()
    assert emb.vwn_extra.shape == (V + 400, WIDE - D)
    assert torch.equal(emb.vwn_extra[:V], old)
    if mean_resizing:  # HF: a normal around the old rows' mean with covariance 1e-9 * theirs (std ~1e-6 here)
        assert (new - old.float().mean(0)).abs().max().item() <= 1e-5
    else:  # HF: N(0, config.initializer_range)
        std = model.config.initializer_range
        assert abs(new.std().item() - std) <= 0.1 * std and abs(new.mean().item()) <= 0.1 * std
        assert new.std(0).min().item() > 0.5 * std  # every extra slot column drawn, not a copy of the mean
        # drawn for the extra slots themselves, not copied from the new base rows (that is init="preserve")
        base = emb.weight.detach()[V:].float()
        copies = torch.cat([base[:, :16], base[:, 16:], base[:, :16]], dim=1)  # slots 2,3,4 <- 0,1,0
        assert (new - copies).abs().max().item() > std
    ids = torch.tensor([[3, 100, 490, 7]])
    _assert_reloads_bit_exact(wide, tmp_path, ids)


# ------------------------------------------------------------------------------------------------------------
# out-of-step tables, inputs_embeds, num_parameters
# ------------------------------------------------------------------------------------------------------------
def test_a_table_resized_behind_the_models_back_is_a_clear_error():
    _, wide = _pair("llama")
    wide.model.resize_token_embeddings(100)  # the inner LlamaModel: HF resizes weight only
    with pytest.raises(RuntimeError, match=r"weight has 100 rows but vwn_extra has 96; .*resize_token_embeddings"):
        _logits(wide, torch.tensor([[3, 4]]))


@pytest.mark.parametrize("case", ["llama", "gpt2"])
def test_inputs_embeds_must_be_over_width(case):
    _, wide = _pair(case)
    emb = wide.get_input_embeddings()
    assert emb.embedding_dim == emb.weight.shape[1] == D  # nn.Embedding's meaning: the width of weight
    assert emb.vwn_width == WIDE
    ids = torch.randint(3, V, (2, 6))
    embeds = emb(ids)
    assert embeds.shape == (2, 6, WIDE)
    assert (_logits(wide, None, inputs_embeds=embeds) - _logits(wide, ids)).abs().max().item() <= 1e-6
    with pytest.raises(ValueError, match=r"inputs_embeds has width 32 .* expects over-width embeddings of width "
                                         r"D' = 80 .*model\.get_input_embeddings\(\)\(input_ids\)"):
        _logits(wide, None, inputs_embeds=torch.randn(2, 6, D))
    with pytest.raises(ValueError, match="inputs_embeds has width 81"):
        _logits(wide, None, inputs_embeds=torch.randn(2, 6, WIDE + 1))


def _count(model, skip):
    return sum(p.numel() for n, p in model.named_parameters() if not n.endswith(skip))


@pytest.mark.parametrize("embedding", ["table", "factorized"])
def test_num_parameters_counts_the_extra_slots_as_embedding(embedding):
    model, wide = _pair("gpt2", embedding=embedding)
    tables = ("wte.weight", "wpe.weight")
    assert model.num_parameters(exclude_embeddings=True) == _count(model, tables)
    assert wide.num_parameters() == _count(wide, ())
    # vwn_extra is a lookup table: embedding. vwn_expand is a [D', D] matmul per token: counted as compute.
    skip = tables + (("wte.vwn_extra", "wpe.vwn_extra") if embedding == "table" else ())
    assert wide.num_parameters(exclude_embeddings=True) == _count(wide, skip)
    wide.transformer.wte.requires_grad_(False)
    trainable = sum(p.numel() for n, p in wide.named_parameters() if p.requires_grad and not n.endswith(skip))
    assert wide.num_parameters(only_trainable=True, exclude_embeddings=True) == trainable


def test_model_class_keeps_name_and_isinstance_and_widen_failure_restores_it(monkeypatch):
    import importlib
    import inspect

    widen_module = importlib.import_module("vwn_transform.widen")  # the attribute vwn_transform.widen is the function

    model = tiny_hf("llama")
    cls = type(model)
    wide = vwn_transform.widen(model, 2)
    assert isinstance(wide, cls) and type(wide) is not cls and type(wide).__name__ == cls.__name__
    assert inspect.signature(wide.forward) == inspect.signature(model.forward)  # generate()/Trainer read it

    def fail(*args, **kwargs):
        raise RuntimeError("injected failure after the class swap")

    monkeypatch.setattr(widen_module, "_record_recipe", fail)
    with pytest.raises(RuntimeError, match="injected failure"):
        vwn_transform.widen(model, 2, inplace=True)
    assert type(model) is cls and getattr(model, "vwn_config", None) is None
