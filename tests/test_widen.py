"""widen() end to end: function preservation against the original model's own logits, generate(), training,
plan(), and the errors users meet."""

from __future__ import annotations

import copy
import inspect
from fractions import Fraction

import pytest
import torch
from torch import nn

import vwn_transform
from vwn_transform import GHC, UnsupportedModelError, VWNConfig
from vwn_transform.models import GPT, GPTConfig

from hf_models import FAMILIES, tiny_hf

SLOTS = [(2, 3), (1, 2), (2, 8), (8, 64)]  # (m, n); hidden 32 -> slot widths 16, 32, 16, 4


def _ratio(m, n):
    return Fraction(n, m)


def tiny_gpt(**kw):
    fields = dict(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=32, dropout=0.0)
    fields.update(kw)
    return GPT(GPTConfig(**fields)).eval()


def _snapshot(model):
    return (
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        {name: type(mod) for name, mod in model.named_modules()},
        {name: mod.training for name, mod in model.named_modules()},
        sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()),
    )


def _assert_unchanged(model, snap):
    state, classes, training, hooks = snap
    now = model.state_dict()
    assert now.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(now[k], v), f"parameter {k} changed"
    assert {name: type(mod) for name, mod in model.named_modules()} == classes
    assert {name: mod.training for name, mod in model.named_modules()} == training
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == hooks
    assert getattr(model, "vwn_config", None) is None


# ------------------------------------------------------------------------------------------------------------
# function preservation
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("m,n", SLOTS)
def test_hf_preserves_logits_and_greedy_generate(family, m, n):
    model = tiny_hf(family)
    wide = vwn_transform.widen(model, _ratio(m, n), m=m)
    assert type(wide) is not type(model) or wide is not model
    assert isinstance(wide, type(model))
    assert (wide.vwn_config.m, wide.vwn_config.n) == (m, n)
    ids = torch.randint(3, 96, (2, 9))
    with torch.no_grad():
        ref = model(ids).logits
        got = wide(ids).logits
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() <= 1e-5
    out_ref = model.generate(ids[:1], max_new_tokens=6, do_sample=False)
    out_wide = wide.generate(ids[:1], max_new_tokens=6, do_sample=False)
    assert torch.equal(out_ref, out_wide)


OTHER_FAMILIES = ["qwen3", "phi", "opt", "olmo2", "gemma2", "gemma3_text", "stablelm", "qwen2_moe", "granite",
                  "starcoder2", "gptj", "codegen", "falcon", "olmoe", "cohere", "gpt_bigcode", "qwen3_moe"]


@pytest.mark.parametrize("family", OTHER_FAMILIES)
def test_other_hf_families_preserve_logits(family):
    """Families no issue names: the same generic mechanism, one ratio each."""
    model = tiny_hf(family)
    wide = vwn_transform.widen(model, "3/2")
    ids = torch.randint(3, 96, (2, 7))
    with torch.no_grad():
        assert (wide(ids).logits - model(ids).logits).abs().max().item() <= 1e-5


@pytest.mark.parametrize("m,n", SLOTS)
@pytest.mark.parametrize("embedding", ["table", "factorized"])
@pytest.mark.parametrize("dynamic", [True, False])
def test_reference_gpt_preserves_logits(m, n, embedding, dynamic):
    model = tiny_gpt()
    wide = vwn_transform.widen(model, _ratio(m, n), m=m, embedding=embedding, dynamic=dynamic)
    idx = torch.randint(0, 64, (3, 17))
    ref, _ = model(idx)
    got, _ = wide(idx)
    assert (got - ref).abs().max().item() <= 1e-5
    assert torch.equal(model.generate(idx[:1, :4], 6, greedy=True), wide.generate(idx[:1, :4], 6, greedy=True))


def test_widened_state_is_over_width_and_mixing_is_applied():
    """The state between blocks is r*D wide, and perturbing the GHC changes the output (mixing is live)."""
    model = tiny_gpt()
    wide = vwn_transform.widen(model, 4, m=2)
    seen = []
    wide.transformer.h[1].register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape))
    idx = torch.randint(0, 64, (2, 5))
    base, _ = wide(idx)
    assert seen[0] == (2, 5, 4 * 32)
    with torch.no_grad():
        wide.transformer.h[0].vwn_ghc[1].carry.add_(0.1 * torch.randn(8, 8))
    changed, _ = wide(idx)
    assert (changed - base).abs().max() > 1e-3


def test_bf16_model_preserves_logits():
    model = tiny_hf("llama").to(torch.bfloat16)
    wide = vwn_transform.widen(model, "3/2")
    assert wide.model.layers[0].vwn_ghc[0].read.dtype == torch.bfloat16
    ids = torch.randint(3, 96, (2, 7))
    with torch.no_grad():
        ref, got = model(ids).logits.float(), wide(ids).logits.float()
    assert (got - ref).abs().max().item() <= 1e-2 * (1 + ref.abs().max().item())


def test_tied_head_stays_tied_and_state_dict_extends_original():
    model = tiny_hf("gpt2")
    wide = vwn_transform.widen(model, 2)
    assert wide.lm_head.weight is wide.transformer.wte.weight
    keys, wide_keys = set(model.state_dict()), set(wide.state_dict())
    assert keys <= wide_keys
    assert all("vwn" in k for k in wide_keys - keys)
    assert any(k.endswith("wte.vwn_extra") for k in wide_keys)


def test_factorized_and_table_parameter_names():
    wide_t = vwn_transform.widen(tiny_gpt(), 2, embedding="table")
    wide_f = vwn_transform.widen(tiny_gpt(), 2, embedding="factorized")
    assert wide_t.transformer.wte.vwn_extra.shape == (64, 32)
    assert wide_f.transformer.wte.vwn_expand.shape == (64, 32)
    ghc = wide_t.transformer.h[0].vwn_ghc[0]
    names = {n for n, _ in ghc.named_parameters()}
    assert names == {"read", "carry", "write", "proj", "scale_read", "scale_carry", "scale_write", "norm.weight"}


# ------------------------------------------------------------------------------------------------------------
# HF behaviour: class, loss, KV cache, training-mode signature
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "gpt2", "mixtral"])
def test_hf_loss_kv_cache_and_train_mode(family):
    model = tiny_hf(family)
    wide = vwn_transform.widen(model, "3/2")
    ids = torch.randint(3, 96, (2, 8))
    out_ref, out = model(ids, labels=ids), wide(ids, labels=ids)
    assert torch.allclose(out.loss, out_ref.loss, atol=1e-5)
    # incremental decoding with the cache equals a full forward
    with torch.no_grad():
        first = wide(ids[:, :5], use_cache=True)
        step = wide(ids[:, 5:6], past_key_values=first.past_key_values, use_cache=True)
        full = wide(ids[:, :6]).logits
    assert torch.allclose(step.logits[:, -1], full[:, -1], atol=1e-5)
    wide.train()
    loss = wide(ids, labels=ids).loss
    loss.backward()
    assert wide.model.layers[0].vwn_ghc[0].proj.grad is not None if family != "gpt2" else \
        wide.transformer.h[0].vwn_ghc[0].proj.grad is not None


def test_gradient_checkpointing_matches():
    model = tiny_hf("llama")
    wide = vwn_transform.widen(model, 2)
    ids = torch.randint(3, 96, (2, 8))
    wide.train()
    wide(ids, labels=ids).loss.backward()
    ref = {n: p.grad.clone() for n, p in wide.named_parameters() if p.grad is not None}
    wide.zero_grad()
    wide.activation_checkpointing_enable()
    wide(ids, labels=ids).loss.backward()
    for n, g in ref.items():
        assert torch.allclose(dict(wide.named_parameters())[n].grad, g, atol=1e-6), n


def test_gradients_reach_every_new_parameter_and_steps_change_them():
    model = tiny_gpt()
    wide = vwn_transform.widen(model, 4, m=2)
    new = {n: p for n, p in wide.named_parameters() if "vwn" in n}
    assert new
    before = {n: p.detach().clone() for n, p in new.items()}
    # Adam moves every parameter with a non-zero gradient by about lr, however small that gradient is
    opt = torch.optim.Adam(wide.parameters(), lr=1e-2)
    idx = torch.randint(0, 64, (4, 16))
    for step in range(2):
        opt.zero_grad()
        _, loss = wide(idx, idx)
        loss.backward()
        missing = [n for n, p in new.items() if p.grad is None]
        assert not missing, f"no gradient reached {missing}"
        if step == 0:  # with W = 0 at init, the gates and slot norm only receive gradient once W moved
            for n, p in new.items():
                if n.rsplit(".", 1)[-1] in ("read", "carry", "write", "proj", "vwn_reduce"):
                    assert p.grad.abs().sum() > 0, n
        opt.step()
    unchanged = [n for n, p in new.items() if torch.equal(p.detach(), before[n])]
    assert not unchanged, f"parameters not changed by two optimizer steps: {unchanged}"


def test_deepcopy_of_widened_model():
    wide = vwn_transform.widen(tiny_gpt(), 1.5)
    clone = copy.deepcopy(wide)
    idx = torch.randint(0, 64, (2, 6))
    assert torch.equal(wide(idx)[0], clone(idx)[0])
    with torch.no_grad():
        clone.transformer.h[0].vwn_ghc[0].carry.mul_(2)
    assert not torch.equal(wide(idx)[0], clone(idx)[0])


# ------------------------------------------------------------------------------------------------------------
# inplace / untouched originals
# ------------------------------------------------------------------------------------------------------------
def test_inplace_false_leaves_model_untouched_and_inplace_true_rewrites_it():
    model = tiny_gpt()
    snap = _snapshot(model)
    wide = vwn_transform.widen(model, 2)
    assert wide is not model
    _assert_unchanged(model, snap)
    same = vwn_transform.widen(model, 2, inplace=True)
    assert same is model and model.vwn_config.n == 2


def test_plan_reports_without_touching_and_counts_match_widen():
    for kwargs in (dict(ratio="3/2"), dict(ratio=4, m=2, embedding="factorized"), dict(ratio=2, dynamic=False),
                   dict(ratio=2, init="paper")):
        model = tiny_hf("gpt2")
        snap = _snapshot(model)
        p = vwn_transform.plan(model, **kwargs)
        _assert_unchanged(model, snap)
        wide = vwn_transform.widen(model, **kwargs)
        added = sum(t.numel() for t in wide.parameters()) - sum(t.numel() for t in model.parameters())
        assert p.params_added == added, kwargs
        assert p.num_ghc == 4
    text = str(p)
    for needle in ("GPT2LMHeadModel", "transformer.wte", "transformer.wpe", "transformer.h.0", "ln_1 -> attn",
                   "transformer.ln_f", "parameters", "FLOPs"):
        assert needle in text, needle


def test_plan_flops_follow_cost_model():
    from vwn_transform.widen import ghc_flops_per_token, ghc_params

    assert ghc_flops_per_token(1, 2, 3, True) == 48  # 48 D at (2, 3)
    assert ghc_flops_per_token(1, 8, 64, True) == 2592  # 2592 D at (8, 64)
    assert ghc_params(64, 2, 3, True) == 2 * 3 * 7 + 32 * 8
    p = vwn_transform.plan(tiny_gpt(), "3/2")
    assert p.flops_added_per_token == 4 * 48 * 32 + 2 * 32 * 48


def test_parallel_residual_is_one_update():
    p = vwn_transform.plan(tiny_hf("gpt_neox"), 2)
    assert p.num_ghc == 2 and all(b.parallel == [True] for b in p.blocks)
    p = vwn_transform.plan(tiny_hf("gpt_neox", use_parallel_residual=False), 2)
    assert p.num_ghc == 4


# ------------------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ratio,needle", [
    (0.5, "ratio must be >= 1"), (float("nan"), "finite"), (float("inf"), "finite"), ("abc", "'abc'"),
    ("1/0", "'1/0'"), (-2, "-2"), (1.0001, "1.0001"), (10**6, "1000000"), ("", "''"),
])
def test_bad_ratio_is_value_error_naming_value(ratio, needle):
    model = tiny_gpt()
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=None) as exc:
        vwn_transform.widen(model, ratio)
    assert needle in str(exc.value)
    _assert_unchanged(model, snap)


@pytest.mark.parametrize("ratio,m,needle", [(2, 3, "m=3 must divide the hidden size 32"), (64, 32, "n=2048 slots"),
                                            ("3/2", 1, "m=1 does not give an integer n"),
                                            (2, 0, "m must be a positive integer"),
                                            (2, 2.5, "2.5")])
def test_bad_m(ratio, m, needle):
    with pytest.raises(ValueError) as exc:
        vwn_transform.widen(tiny_gpt(), ratio, m=m)
    assert needle in str(exc.value)


def test_bad_options_and_types():
    model = tiny_gpt()
    with pytest.raises(TypeError, match="nn.Module"):
        vwn_transform.widen("gpt2", 2)
    with pytest.raises(TypeError, match="bool"):
        vwn_transform.widen(model, True)
    with pytest.raises(ValueError, match="needs a ratio"):
        vwn_transform.widen(model)
    with pytest.raises(ValueError, match="'kaiming'"):
        vwn_transform.widen(model, 2, init="kaiming")
    with pytest.raises(ValueError, match="'sparse'"):
        vwn_transform.widen(model, 2, embedding="sparse")
    with pytest.raises(ValueError, match="either config"):
        vwn_transform.widen(model, 2, config=VWNConfig(n=4, m=2))
    with pytest.raises(ValueError, match="inplace"):
        vwn_transform.widen(model, 2, inplace="yes")


def test_config_roundtrip_and_validation():
    cfg = VWNConfig(n=3, m=2, dynamic=False, embedding="factorized")
    assert VWNConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.ratio == Fraction(3, 2)
    with pytest.raises(Exception):
        cfg.n = 4  # frozen
    with pytest.raises(ValueError, match="n must be >= m"):
        VWNConfig(n=1, m=2)
    with pytest.raises(ValueError, match="unknown VWNConfig fields"):
        VWNConfig.from_dict({"n": 2, "m": 1, "width": 3})
    wide = vwn_transform.widen(tiny_gpt(), config=VWNConfig(n=4, m=2))
    assert wide.vwn_config.hidden_size == 32 and wide.vwn_config.ratio == 2


@pytest.mark.parametrize("ratio,hidden,m,expected", [
    (8, 64, 8, (8, 64)), ("3/2", 64, None, (2, 3)), (1.5, 64, None, (2, 3)), (Fraction(4, 3), 30, None, (3, 4)),
    (4, 32, None, (1, 4)), ("2.5", 20, None, (2, 5)), (1, 16, None, (1, 1)),
])
def test_choose_slots(ratio, hidden, m, expected):
    from vwn_transform.config import choose_slots

    assert choose_slots(ratio, hidden, m) == expected


# ------------------------------------------------------------------------------------------------------------
# refused models
# ------------------------------------------------------------------------------------------------------------
class PostLNBlock(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.attn = nn.Linear(d, d)
        self.ln1 = nn.LayerNorm(d)
        self.mlp = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)

    def forward(self, x):
        x = self.ln1(x + self.attn(x))
        return self.ln2(x + self.mlp(x))


class TokenModel(nn.Module):
    def __init__(self, block_cls, d=16, layers=2):
        super().__init__()
        self.emb = nn.Embedding(32, d)
        self.blocks = nn.ModuleList(block_cls(d) for _ in range(layers))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 32)

    def forward(self, ids):
        x = self.emb(ids)
        for b in self.blocks:
            x = b(x)
        return self.head(self.norm(x))


class PreLNBlock(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.ff = nn.Linear(d, d)

    def forward(self, x):
        return x + self.ff(self.norm(x))


class HyperConnections(nn.Module):  # what a peer library's wrapper looks like
    def __init__(self, d):
        super().__init__()
        self.inner = PreLNBlock(d)

    def forward(self, x):
        return self.inner(x)


def test_custom_pre_ln_model_is_supported():
    model = TokenModel(PreLNBlock).eval()
    wide = vwn_transform.widen(model, "5/4", m=4)
    ids = torch.randint(0, 32, (2, 5))
    assert torch.allclose(wide(ids), model(ids), atol=1e-6)


def test_post_ln_is_refused_with_clear_message():
    model = TokenModel(PostLNBlock)
    snap = _snapshot(model)
    with pytest.raises(UnsupportedModelError, match="post-LN") as exc:
        vwn_transform.widen(model, 2)
    assert "blocks.0" in str(exc.value) and "pre-norm" in str(exc.value)
    _assert_unchanged(model, snap)


def test_bert_is_refused():
    from transformers import BertConfig, BertForMaskedLM

    model = BertForMaskedLM(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                       intermediate_size=64, max_position_embeddings=32)).eval()
    snap = _snapshot(model)
    with pytest.raises(UnsupportedModelError) as exc:
        vwn_transform.widen(model, 2)
    msg = str(exc.value)
    assert "post-LN" in msg and "bert.encoder.layer.0 (BertLayer)" in msg and "LayerNorm" in msg, msg
    _assert_unchanged(model, snap)


def test_residual_adds_inside_submodules_are_refused():
    model = tiny_hf("bloom", n_embed=32, n_layer=2, n_head=4)  # BloomBlock passes the residual into its MLP
    with pytest.raises(UnsupportedModelError, match="transformer.h.0 \\(BloomBlock\\).*found none.*inside a submodule"):
        vwn_transform.widen(model, 2)


class EmbeddingNormModel(TokenModel):
    def __init__(self):
        super().__init__(PreLNBlock)
        self.emb_norm = nn.LayerNorm(16)

    def forward(self, ids):
        x = self.emb_norm(self.emb(ids))
        for b in self.blocks:
            x = b(x)
        return self.head(self.norm(x))


def test_stream_computed_after_the_embeddings_is_widened_at_the_first_block():
    """An embedding norm between the table and block 0 (BLOOM-style): the stream first has its [..., D] form after
    the norm, so it is widened at block 0's input instead of in the table, and the function is kept."""
    torch.manual_seed(0)
    model = EmbeddingNormModel().eval()
    wide = vwn_transform.widen(model, 2)
    assert wide.vwn_recipe["wrapped"]["entry"] == "blocks.0" and wide.vwn_recipe["wrapped"]["embeddings"] == []
    assert not hasattr(wide.emb, "vwn_extra")
    ids = torch.randint(0, 32, (2, 7))
    with torch.no_grad():
        assert (wide(ids) - model(ids)).abs().max().item() <= 1e-5


def test_plain_mlp_has_no_residual_stream():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
    with pytest.raises(UnsupportedModelError, match="no residual stream|example_inputs"):
        vwn_transform.widen(model, 2, example_inputs=(torch.randn(2, 8),))
    with pytest.raises(UnsupportedModelError, match="example_inputs"):
        vwn_transform.widen(model, 2)  # no embedding to build token inputs from


def test_already_widened_and_hyper_connection_models_are_refused():
    wide = vwn_transform.widen(tiny_gpt(), 2)
    with pytest.raises(UnsupportedModelError, match="already widened"):
        vwn_transform.widen(wide, 2)
    with pytest.raises(UnsupportedModelError, match="hyper-connections"):
        vwn_transform.widen(TokenModel(HyperConnections), 2)


def test_example_inputs_that_fail_are_reported():
    with pytest.raises(UnsupportedModelError, match="probe forward"):
        vwn_transform.widen(tiny_gpt(), 2, example_inputs=(torch.zeros(1, 100, dtype=torch.long),))


# ------------------------------------------------------------------------------------------------------------
# implementation selection and the public API
# ------------------------------------------------------------------------------------------------------------
def test_impl_selection_is_explicit(monkeypatch):
    from vwn_transform import ops

    wide = vwn_transform.widen(tiny_gpt(), 2)
    idx = torch.randint(0, 64, (1, 4))
    ops.reset_implementations_used()
    wide(idx)
    # inside each block the attention's write and the MLP's read run as one fused op
    assert ops.implementations_used() == {"ghc_read_dynamic": "reference", "ghc_write_read_dynamic": "reference",
                                          "ghc_write": "reference"}
    monkeypatch.setenv("VWN_IMPL", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="VWN_IMPL=triton .* TRITON_INTERPRET=1 is not set"):
        wide(idx)
    monkeypatch.setenv("VWN_IMPL", "cuda")
    with pytest.raises(ValueError, match="'cuda'"):
        wide(idx)
    monkeypatch.setenv("VWN_IMPL", "reference")
    wide(idx)


def test_public_api_is_pinned():
    assert set(vwn_transform.__all__) >= {"widen", "plan", "VWNConfig", "GHC", "UnsupportedModelError"}
    assert issubclass(UnsupportedModelError, ValueError)
    sig = inspect.signature(vwn_transform.widen)
    assert list(sig.parameters)[:2] == ["model", "ratio"]
    for name, default in dict(m=None, config=None, dynamic=True, init="preserve", embedding="table",
                              inplace=False).items():
        assert sig.parameters[name].default == default
        assert sig.parameters[name].kind is inspect.Parameter.KEYWORD_ONLY
    assert list(inspect.signature(GHC).parameters)[:5] == ["sublayer", "dim", "n", "m", "dynamic"]
    assert list(inspect.signature(vwn_transform.plan).parameters)[:2] == ["model", "ratio"]


# ------------------------------------------------------------------------------------------------------------
# property-based: odd widths, any (m, n), batch, sequence length and dtype
# ------------------------------------------------------------------------------------------------------------
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@st.composite
def _widen_cases(draw):
    slot = draw(st.integers(1, 9))
    m = draw(st.integers(1, 4))
    n = draw(st.integers(m, 3 * m + 2))
    heads = draw(st.sampled_from([h for h in (1, 2, 3) if (slot * m) % h == 0]))
    return dict(hidden=slot * m, m=m, n=n, heads=heads, batch=draw(st.integers(1, 3)), seq=draw(st.integers(1, 11)),
                dtype=draw(st.sampled_from([torch.float32, torch.float64])), dynamic=draw(st.booleans()),
                embedding=draw(st.sampled_from(["table", "factorized"])))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_widen_cases())
def test_property_widen_preserves_reference_gpt(case):
    model = tiny_gpt(n_embd=case["hidden"], n_head=case["heads"], block_size=16).to(case["dtype"])
    wide = vwn_transform.widen(model, Fraction(case["n"], case["m"]), m=case["m"], dynamic=case["dynamic"],
                               embedding=case["embedding"])
    idx = torch.randint(0, 64, (case["batch"], case["seq"]))
    ref, got = model(idx)[0], wide(idx)[0]
    assert got.dtype == case["dtype"]
    assert (got - ref).abs().max().item() <= 1e-5


class _CacheFussyGPT(GPT):
    """Takes use_cache but refuses use_cache=False: widen() must call the model only as it was probed."""

    def forward(self, idx, targets=None, use_cache=True):
        if not use_cache:
            raise RuntimeError("this model always caches")
        return super().forward(idx, targets)


def test_widen_calls_the_model_only_with_the_probe_inputs():
    # block signatures are traced on first use, also under torch.compile (tests/test_compile_training.py), so
    # widen() does not warm up other signatures such as use_cache=False
    model = _CacheFussyGPT(GPTConfig(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=32)).eval()
    wide = vwn_transform.widen(model, 2)
    idx = torch.randint(0, 64, (1, 6))
    with torch.no_grad():
        assert (wide(idx)[0] - model(idx)[0]).abs().max().item() <= 1e-5
