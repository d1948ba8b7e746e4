"""WideNet (vwn_transform.widenet) and Adaptive Width (vwn_transform.adaptive_width): function preservation
against the original model's own logits, the MoE and the importance against independent re-computations from the
weights, training, save/load by recipe replay, composition with widen(), and bad input."""

import math

import pytest
import torch
import torch.nn.functional as F

import vwn_transform
from vwn_transform import UnsupportedModelError
from vwn_transform.models import GPT, GPTConfig
from vwn_transform.models.hf_tiny import tiny_hf_model
from vwn_transform.widenet import WideNetMoE

CFG = GPTConfig(vocab_size=64, block_size=32, n_layer=3, n_head=2, n_embd=32)


def gpt(seed=0):
    torch.manual_seed(seed)
    return GPT(CFG).eval()


def ids(vocab=64, shape=(2, 9), seed=1):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def same_state(model, saved):
    now = model.state_dict()
    return now.keys() == saved.keys() and all(torch.equal(now[k], saved[k]) for k in now)


# ------------------------------------------------------------------------------------------------------------
# WideNet
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["gpt", "llama", "gpt2", "gpt_neox", "phi3"])
def test_widenet_separate_blocks_preserves_the_original_logits(family):
    model = gpt() if family == "gpt" else tiny_hf_model(family)
    x = ids(64 if family == "gpt" else 90)
    moe = vwn_transform.widenet(model, 4, 2, share_blocks=False)
    got = moe(x)[0] if family == "gpt" else moe(x).logits
    ref = model(x)[0] if family == "gpt" else model(x).logits
    assert torch.allclose(got, ref, atol=1e-5), float((got - ref).abs().max())
    assert all(type(model.get_submodule(n)).__name__ != "WideNetMoE" for n, _ in model.named_modules() if n)


def test_widenet_moe_matches_an_independent_top_k_mixture():
    torch.manual_seed(0)
    ffn = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8))
    moe = WideNetMoE(ffn, hidden=8, num_experts=5, top_k=2)
    with torch.no_grad():  # make the experts differ, so the routing matters
        for e, expert in enumerate(moe.experts):
            expert[0].weight.add_(0.3 * e)
    x = torch.randn(3, 7, 8)
    got = moe(x)
    moe.requires_grad_(False)
    flat = x.reshape(-1, 8)
    ref = torch.zeros_like(flat)
    probs = torch.softmax(flat @ moe.router.weight.T, dim=-1)
    counts = torch.zeros(5)
    for t in range(flat.shape[0]):
        order = sorted(range(5), key=lambda e: -float(probs[t, e]))[:2]
        total = sum(float(probs[t, e]) for e in order)
        for e in order:
            ref[t] += float(probs[t, e]) / total * moe.experts[e](flat[t:t + 1])[0]
            counts[e] += 1
    assert torch.allclose(got.reshape(-1, 8), ref, atol=1e-5)
    aux = 5 * float(((counts / counts.sum()) * probs.mean(0)).sum())
    assert abs(float(moe.last_aux_loss.detach()) - aux) < 1e-5


def test_widenet_aux_loss_is_added_to_the_returned_loss_and_trains():
    moe = vwn_transform.widenet(gpt(), 4, 2, share_blocks=False, aux_loss_weight=0.05).train()
    x = ids()
    logits, loss = moe(x, x)
    ce = F.cross_entropy(logits.flatten(0, 1), x.flatten())
    parts = moe.vwn_widenet.last_losses
    assert torch.allclose(parts["loss"], ce.detach(), atol=1e-6)
    assert 3 * 0.99 < float(parts["aux_loss"]) < 3 * 5  # three blocks, each >= ~1 (1 when balanced)
    assert torch.allclose(loss.detach(), ce.detach() + 0.05 * parts["aux_loss"], atol=1e-6)
    loss.backward()
    router = moe.get_submodule("transformer.h.0.mlp.router").weight
    assert router.grad is not None and float(router.grad.abs().sum()) > 0
    logits2, none = moe(x)  # no labels: no loss, the aux sum waits with its graph
    assert none is None and moe.vwn_widenet.pending_aux_loss.requires_grad


def test_widenet_shared_blocks_tie_weights_keep_norms_and_count_parameters():
    model = gpt()
    p = vwn_transform.widenet_plan(model, 4, 2)
    shared = vwn_transform.widenet(model, 4, 2)
    blocks = shared.transformer.h
    assert blocks[2].attn.c_attn.weight is blocks[0].attn.c_attn.weight
    assert blocks[1].mlp.experts[3].c_fc.weight is blocks[0].mlp.experts[3].c_fc.weight
    assert blocks[1].mlp.router.weight is blocks[0].mlp.router.weight
    assert blocks[1].ln_1.weight is not blocks[0].ln_1.weight  # norms stay per block
    unique = sum(t.numel() for t in {id(t): t for t in shared.parameters()}.values())
    assert unique == p.params_after
    per_block_ffn = sum(t.numel() for t in model.transformer.h[0].mlp.parameters())
    # one shared block with 4 experts and a router instead of 3 blocks, plus the other blocks' own norms
    norms = sum(t.numel() for b in model.transformer.h[1:] for n in ("ln_1", "ln_2") for t in getattr(b, n).parameters())
    block = sum(t.numel() for t in model.transformer.h[0].parameters())
    outside = sum(t.numel() for t in model.parameters()) - 3 * block
    assert unique == outside + block + 3 * per_block_ffn + 32 * 4 + norms
    opt = torch.optim.AdamW(shared.parameters(), 1e-2)
    x = ids()
    shared.train()
    _, loss = shared(x, x)
    loss.backward()
    opt.step()
    assert blocks[2].attn.c_attn.weight is blocks[0].attn.c_attn.weight  # still one tensor after a step


def test_widenet_shared_hf_model_generates_with_its_cache():
    shared = vwn_transform.widenet(tiny_hf_model("llama"), 4, 2)
    x = ids(90, (1, 5))
    with_cache = shared.generate(x, max_new_tokens=6, do_sample=False, use_cache=True)
    without = shared.generate(x, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(with_cache, without)
    assert [b.self_attn.layer_idx for b in shared.model.layers] == [0, 1]


@pytest.mark.parametrize("share", [False, True])
def test_widenet_save_load_and_widen_round_trips(tmp_path, share):
    moe = vwn_transform.widenet(gpt(), 4, 2, share_blocks=share).train()
    opt = torch.optim.AdamW(moe.parameters(), 1e-2)
    x = ids()
    for _ in range(2):
        moe(x, x)[1].backward()
        opt.step()
        opt.zero_grad()
    moe.eval()
    back = vwn_transform.load(vwn_transform.save(moe, tmp_path / "m.pt"), lambda: GPT(CFG))
    assert torch.equal(back(x)[0], moe(x)[0])
    assert (back.transformer.h[1].attn.c_attn.weight is back.transformer.h[0].attn.c_attn.weight) == share
    wide = vwn_transform.widen(moe, 2)
    back = vwn_transform.load(vwn_transform.save(wide, tmp_path / "w.pt"), lambda: GPT(CFG))
    assert torch.equal(back(x)[0], wide(x)[0])
    assert back.vwn_recipe["before"]["transform"] == "widenet"


@pytest.mark.parametrize("share", [False, True])
def test_widenet_save_pretrained_round_trip(tmp_path, share):
    moe = vwn_transform.widenet(tiny_hf_model("llama"), 4, 2, share_blocks=share)
    with torch.no_grad():
        for p in moe.parameters():
            p.add_(0.01 * torch.randn_like(p))  # "trained" weights, differing from any initialization
    moe.save_pretrained(tmp_path / "m")
    back = vwn_transform.from_pretrained(tmp_path / "m")
    x = ids(90, (1, 7))
    assert torch.equal(back(x).logits, moe(x).logits)
    assert (back.model.layers[1].mlp.router.weight is back.model.layers[0].mlp.router.weight) == share


@pytest.mark.parametrize("transform, kwargs, match", [
    ("widenet", dict(num_experts=1), "num_experts must be an integer between 2 and 256, got 1"),
    ("widenet", dict(num_experts="4"), "num_experts must be an integer"),
    ("widenet", dict(num_experts=4, top_k=5), "top_k must be at most num_experts"),
    ("widenet", dict(num_experts=4, top_k=0), "top_k must be an integer >= 1"),
    ("widenet", dict(share_blocks="yes"), "share_blocks must be True or False"),
    ("widenet", dict(aux_loss_weight=-1), r"aux_loss_weight must be in \[0, 1000\]"),
    ("widenet", dict(inplace=1), "inplace must be True or False"),
    ("adaptive_width", dict(quantile=1.0), r"quantile must be in \(0, 1\), got 1.0"),
    ("adaptive_width", dict(quantile=0), r"quantile must be in \(0, 1\)"),
    ("adaptive_width", dict(max_width=0.5), r"max_width must be in \[1, 64\], got 0.5"),
    ("adaptive_width", dict(num_observations=0), "num_observations must be in"),
    ("adaptive_width", dict(rate_prior=(0.1,)), "rate_prior must be a \\(mean, std\\) pair"),
    ("adaptive_width", dict(weight_prior_std=-1), "weight_prior_std must be in"),
])
def test_bad_arguments_are_named_and_leave_the_model_alone(transform, kwargs, match):
    model = gpt()
    before = state(model)
    with pytest.raises(ValueError, match=match):
        getattr(vwn_transform, transform)(model, **kwargs)
    assert same_state(model, before)


def test_widenet_refuses_moe_models_and_transformed_models():
    with pytest.raises(UnsupportedModelError, match="already a mixture of experts"):
        vwn_transform.widenet(tiny_hf_model("mixtral"))
    once = vwn_transform.widenet(gpt(), share_blocks=False)
    with pytest.raises(UnsupportedModelError, match="already transformed by vwn_transform.widenet"):
        vwn_transform.widenet(once)
    with pytest.raises(UnsupportedModelError, match="already widened"):
        vwn_transform.widenet(vwn_transform.widen(gpt(), 2))
    with pytest.raises(UnsupportedModelError, match="already transformed by vwn_transform.widenet"):
        vwn_transform.adaptive_width(once)


# ------------------------------------------------------------------------------------------------------------
# Adaptive Width
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["gpt", "llama", "gpt2", "gptj"])
def test_adaptive_width_preserves_the_original_logits(family):
    model = gpt() if family == "gpt" else tiny_hf_model(family)
    x = ids(64 if family == "gpt" else 90)
    aw = vwn_transform.adaptive_width(model)
    got = aw(x)[0] if family == "gpt" else aw(x).logits
    ref = model(x)[0] if family == "gpt" else model(x).logits
    assert torch.allclose(got, ref, atol=1e-5), float((got - ref).abs().max())
    report = vwn_transform.width_report(aw)
    assert len(report) == 3 if family == "gpt" else 2
    assert all(e.width == e.original and e.capacity == math.ceil(1.5 * e.original) for e in report)


def _paper_importance(lam, capacity, k):
    """f(i) = e^{-lam i}(1 - e^{-lam}) over i < D = floor(-ln(1-k)/lam) + 2, renormalized (written from the
    paper's definition with plain floats)."""
    width = min(int(math.floor(-math.log(1 - k) / lam)) + 2, capacity)
    p = [math.exp(-lam * i) * (1 - math.exp(-lam)) for i in range(width)]
    total = sum(p)
    return [v / total for v in p] + [0.0] * (capacity - width), width


def test_adaptive_width_scales_hidden_units_by_the_papers_importance():
    aw = vwn_transform.adaptive_width(gpt(), quantile=0.8)
    mlp = aw.transformer.h[1].mlp
    with torch.no_grad():
        mlp.c_proj.aw_rate.fill_(math.log(math.expm1(0.05)) - mlp.c_proj.aw_rate_offset)  # lambda = 0.05
    f, width = _paper_importance(0.05, mlp.c_proj.weight.shape[1], 0.8)
    assert width == int(-math.log(0.2) / 0.05) + 2 == 34
    x = torch.randn(2, 5, 32)
    hidden = F.gelu(mlp.c_fc(x))  # [2, 5, capacity]
    scale = torch.tensor(f) * width
    ref = F.linear(hidden * scale, mlp.c_proj.weight, mlp.c_proj.bias)
    assert torch.allclose(mlp(x), ref, atol=1e-5)
    assert vwn_transform.width_report(aw)[1].width == 34


def test_adaptive_width_learns_the_width_and_adds_the_prior_terms():
    aw = vwn_transform.adaptive_width(gpt(), num_observations=1000.0, weight_prior_std=2.0,
                                      rate_prior=(0.01, 0.02)).train()
    x = ids()
    logits, loss = aw(x, x)
    ce = F.cross_entropy(logits.flatten(0, 1), x.flatten())
    prior = 0.0
    for b in aw.transformer.h:
        f, _ = b.mlp.c_proj.aw_importance()
        active = (f > 0).float()
        sq = (b.mlp.c_fc.weight.pow(2).sum(1) * active).sum() + (b.mlp.c_fc.bias.pow(2) * active).sum() \
            + (b.mlp.c_proj.weight.pow(2).sum(0) * active).sum() + b.mlp.c_proj.bias.pow(2).sum()
        lam = F.softplus(b.mlp.c_proj.aw_rate + b.mlp.c_proj.aw_rate_offset)
        prior = prior + sq / (2 * 2.0 ** 2) + (lam - 0.01) ** 2 / (2 * 0.02 ** 2)
    assert torch.allclose(loss, ce + prior / 1000.0, atol=1e-5)
    opt = torch.optim.Adam(aw.parameters(), 3e-2)
    widths = [e.width for e in vwn_transform.width_report(aw)]
    for _ in range(15):
        opt.zero_grad()
        aw(x, x)[1].backward()
        assert float(aw.transformer.h[0].mlp.c_proj.aw_rate.grad.abs()) > 0
        opt.step()
    assert [e.width for e in vwn_transform.width_report(aw)] != widths


def test_truncate_width_keeps_the_kept_units_contribution_exactly(tmp_path):
    aw = vwn_transform.adaptive_width(gpt())
    with torch.no_grad():
        for b in aw.transformer.h:
            # lambda = 0.03: width floor(2.30/0.03)+2 = 78 of 192
            b.mlp.c_proj.aw_rate.fill_(math.log(math.expm1(0.03)) - b.mlp.c_proj.aw_rate_offset)
    small = vwn_transform.truncate_width(aw, keep=0.7)
    kept = [e.capacity for e in vwn_transform.width_report(small)]
    f, width = _paper_importance(0.03, 192, 0.9)
    cum, expect = 0.0, None
    for i, v in enumerate(f):
        cum += v
        if cum >= 0.7 - 1e-9:
            expect = i + 1
            break
    assert kept == [expect] * 3 and expect < width
    # reference: the untruncated model with the dropped units' output weights zeroed
    ref_model = vwn_transform.truncate_width(aw, keep=1.0)  # a copy; keep=1 drops nothing that has mass
    with torch.no_grad():
        for b in ref_model.transformer.h:
            b.mlp.c_proj.weight[:, expect:] = 0
    x = ids()
    assert torch.allclose(small(x)[0], ref_model(x)[0], atol=1e-5)
    t = small.vwn_adaptive.last_truncation
    assert t["params_after"] < t["params_before"] and t["max_abs_output_change"] > 0
    back = vwn_transform.load(vwn_transform.save(small, tmp_path / "s.pt"), lambda: GPT(CFG))
    assert torch.equal(back(x)[0], small(x)[0])
    assert [e.capacity for e in vwn_transform.width_report(back)] == kept


def test_adaptive_width_save_pretrained_and_widen_round_trips(tmp_path):
    aw = vwn_transform.adaptive_width(tiny_hf_model("gpt2"))
    with torch.no_grad():
        for p in aw.parameters():
            p.add_(0.01 * torch.randn_like(p))
    aw.save_pretrained(tmp_path / "a")
    back = vwn_transform.from_pretrained(tmp_path / "a")
    x = ids(90, (1, 7))
    assert torch.equal(back(x).logits, aw(x).logits)
    wide = vwn_transform.widen(aw, 1.5)
    assert torch.allclose(wide(x).logits, aw(x).logits, atol=1e-5)  # widen() preserves the AW model's function
    wide.save_pretrained(tmp_path / "w")
    back = vwn_transform.from_pretrained(tmp_path / "w")
    assert torch.equal(back(x).logits, wide(x).logits)


def test_adaptive_width_refusals():
    with pytest.raises(UnsupportedModelError, match="fused gate/up projection"):
        vwn_transform.adaptive_width(tiny_hf_model("phi3"))
    with pytest.raises(ValueError, match="has no adaptive FFNs"):
        vwn_transform.width_report(gpt())
    with pytest.raises(ValueError, match=r"keep must be in \(0, 1\]"):
        vwn_transform.truncate_width(vwn_transform.adaptive_width(gpt()), keep=0)
    aw = vwn_transform.adaptive_width(gpt())
    with pytest.raises(UnsupportedModelError, match="already transformed by vwn_transform.adaptive_width"):
        vwn_transform.widenet(aw)


def test_width_transforms_on_a_vision_transformer_round_trip_through_save_pretrained(tmp_path):
    """A ViT: example inputs are pixels, and transformers saves it under renamed checkpoint keys."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=64, num_labels=5)
    vit = transformers.ViTForImageClassification(cfg).eval()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    for i, make in enumerate([lambda m: vwn_transform.widenet(m, 3, 2, share_blocks=False,
                                                               example_inputs={"pixel_values": x}),
                              lambda m: vwn_transform.adaptive_width(m, example_inputs={"pixel_values": x})]):
        t = make(vit)
        assert torch.allclose(t(pixel_values=x).logits, vit(pixel_values=x).logits, atol=1e-5)
        t.save_pretrained(tmp_path / str(i))
        back = vwn_transform.from_pretrained(tmp_path / str(i))
        assert torch.equal(back(pixel_values=x).logits, t(pixel_values=x).logits)


def test_width_transforms_export_to_onnx_and_compile(tmp_path):
    """WideNet runs its dense, static-shape form under torch.export/compile (ONNX export verified in onnxruntime;
    Adaptive Width's importance is plain tensor math and exports like any model: checked by hand, not here)."""
    x = ids()
    moe = vwn_transform.widenet(gpt(), 4, 2)
    assert vwn_transform.export_onnx(moe, tmp_path / "widenet.onnx", example_inputs=(x,)).max_abs_diff <= 1e-4
    moe.train()
    compiled = torch.compile(moe, backend="aot_eager")
    got, ref = compiled(x, x)[1], moe(x, x)[1]
    assert torch.allclose(got, ref, atol=1e-5)


def test_adaptive_width_rate_starts_at_zero_for_weight_decay_and_stays_float32():
    aw = vwn_transform.adaptive_width(gpt())
    proj = aw.transformer.h[0].mlp.c_proj
    assert float(proj.aw_rate.detach()) == 0.0  # decay pulls towards the original width, not towards lambda = 0.69
    lam0 = -math.log(0.1) / (128 - 1.5)
    assert abs(float(proj.aw_lambda()) - lam0) < 1e-6
    with torch.no_grad():
        proj.aw_rate.fill_(0.123456789)
    half = aw.to(torch.bfloat16)
    assert half.transformer.h[0].mlp.c_proj.aw_rate.dtype == torch.float32
    assert float(half.transformer.h[0].mlp.c_proj.aw_rate) == torch.tensor(0.123456789).item()
    assert half.transformer.h[0].mlp.c_proj.weight.dtype == torch.bfloat16


def test_truncate_width_of_a_widened_adaptive_model_round_trips(tmp_path):
    wide = vwn_transform.widen(vwn_transform.adaptive_width(gpt()), 2)
    with torch.no_grad():
        for b in wide.transformer.h:
            b.mlp.c_proj.aw_rate.fill_(0.5)
    small = vwn_transform.truncate_width(wide, keep=0.8)
    caps = [e.capacity for e in vwn_transform.width_report(small)]
    assert small.vwn_recipe["before"]["options"]["capacities"]["transformer.h.0.mlp"] == caps[0] < 192
    assert wide.vwn_recipe["before"]["options"]["capacities"]["transformer.h.0.mlp"] == 192  # input untouched
    back = vwn_transform.load(vwn_transform.save(small, tmp_path / "s.pt"), lambda: GPT(CFG))
    x = ids()
    assert torch.equal(back(x)[0], small(x)[0])


def test_extra_loss_terms_only_in_training_mode():
    moe = vwn_transform.widenet(gpt(), 4, 2, share_blocks=False).eval()
    aw = vwn_transform.adaptive_width(gpt(), num_observations=10.0).eval()
    x = ids()
    for model in (moe, aw):
        logits, loss = model(x, x)
        assert torch.allclose(loss, F.cross_entropy(logits.flatten(0, 1), x.flatten()), atol=1e-6)
    assert moe.vwn_widenet.last_losses["aux_loss"] > 0
