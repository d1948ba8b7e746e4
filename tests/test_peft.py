"""LoRA fine-tuning of widened models with PEFT (issue 18, item 4): vwn_transform.peft_modules_to_save."""

import doctest
import warnings

import pytest
import torch

import vwn_transform
from vwn_transform import UnsupportedModelError, VWNConfig, peft_modules_to_save
from vwn_transform.lora import share_base_weights
from hf_models import tiny_hf

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

# PEFT warns whenever a tied embedding is in modules_to_save (Gemma); share_base_weights keeps the tie
pytestmark = pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`:UserWarning")

CASES = [
    ("llama", dict(ratio=1.5)),
    ("llama", dict(ratio=4, m=2)),
    ("gpt2", dict(ratio=1.5)),
    ("gpt2", dict(ratio=4, m=2)),
    ("gemma", dict(ratio=1.5)),
    ("gemma", dict(ratio=4, m=2)),
    # factorized embedding (vwn_expand) and the reduce's group norm (vwn_group_norm_weight), random paper init
    ("qwen2", dict(config=VWNConfig(n=4, m=2, init="paper", embedding="factorized"))),
]


def _widen(family, recipe, seed=0):
    torch.manual_seed(seed)  # paper init draws the VWN parameters: a different seed gives different ones
    return vwn_transform.widen(tiny_hf(family), **recipe)


def _is_vwn(name):
    return any(part.startswith("vwn_") for part in name.split("."))


def _lora_config(names):
    return LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", modules_to_save=names)


def _peft(wide):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns that a tied embedding is in modules_to_save (Gemma, GPT-2)
        model = get_peft_model(wide, _lora_config(peft_modules_to_save(wide)))
    share_base_weights(model)
    return model


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("family,recipe", CASES, ids=[f"{f}-{i}" for i, (f, _) in enumerate(CASES)])
def test_lora_trains_vwn_parameters_and_round_trips(family, recipe, tmp_path):
    wide = _widen(family, recipe)
    tied = wide.get_input_embeddings().weight is wide.get_output_embeddings().weight
    vwn_names = sorted(n for n, _ in wide.named_parameters() if _is_vwn(n))
    base_names = [n for n, _ in wide.named_parameters() if not _is_vwn(n)]
    assert vwn_names and base_names
    wide.save_pretrained(tmp_path / "base")  # the widened base, for vwn_transform.from_pretrained below

    names = peft_modules_to_save(wide)
    modules = dict(wide.named_modules())
    assert all(isinstance(modules[n], vwn_transform.GHC) or any(k.startswith("vwn_") for k, _ in
               modules[n].named_parameters(recurse=False)) for n in names)
    assert all(any(p.startswith(n + ".") for n in names) for p in vwn_names)  # every VWN parameter is covered

    model = _peft(wide)
    params = dict(model.named_parameters(remove_duplicate=False))
    active = {n: p for n, p in params.items() if ".original_module." not in n}
    # every VWN parameter the model runs is trainable (PEFT keeps its frozen pre-fine-tuning copy under
    # original_module, for disable_adapter()); the trained copies are exactly the widened model's VWN parameters
    trained_vwn = {n for n, p in active.items() if _is_vwn(n)}
    assert all(active[n].requires_grad for n in trained_vwn)
    assert sorted(n.removeprefix("base_model.model.").replace(".modules_to_save.default", "")
                  for n in trained_vwn) == vwn_names
    lora = [n for n in active if ".lora_" in n]
    assert lora and all(active[n].requires_grad for n in lora)
    frozen = [n for n in active if n not in trained_vwn and n not in lora]
    assert len(frozen) >= len(base_names)  # the base weights (and the embedding/norm copies' shared ones) ...
    assert not [n for n in frozen if active[n].requires_grad]  # ... are all frozen
    assert not [n for n, p in params.items() if ".original_module." in n and p.requires_grad]
    if tied:  # the embedding copy reads the base table, which is still the head's weight
        assert model.get_input_embeddings().modules_to_save["default"].weight is model.get_output_embeddings().weight

    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in params.items()}
    opt = torch.optim.Adam(trainable.values(), lr=1e-2)
    ids = torch.randint(3, 96, (2, 9))
    model.train()
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    changed = {n for n, p in params.items() if not torch.equal(p.detach(), before[n])}
    assert trained_vwn <= changed, sorted(trained_vwn - changed)  # every VWN parameter trained
    assert not changed - set(trainable), sorted(changed - set(trainable))  # nothing frozen moved
    ref = _logits(model, ids)

    model.save_pretrained(tmp_path / "adapter")
    # onto a freshly widened base (same recipe; paper init draws other VWN values: the adapter overwrites all)
    back = PeftModel.from_pretrained(_widen(family, recipe, seed=1), tmp_path / "adapter")
    assert torch.equal(_logits(back, ids), ref)
    # onto the widened base saved with save_pretrained and loaded with vwn_transform.from_pretrained
    loaded = PeftModel.from_pretrained(vwn_transform.from_pretrained(tmp_path / "base"), tmp_path / "adapter")
    assert torch.equal(_logits(loaded, ids), ref)

    share_base_weights(back)  # a loaded model holds the table once too, and merges with the head still tied
    merged = back.merge_and_unload()
    assert not any(type(mod).__module__.startswith("peft") for mod in merged.modules())
    assert type(merged).__name__ == type(wide).__name__
    if tied:
        assert merged.get_input_embeddings().weight is merged.get_output_embeddings().weight
    out = _logits(merged, ids)
    assert torch.allclose(out, ref, rtol=0, atol=1e-6), float((out - ref).abs().max())
    # the merged model is a plain widened model again: it saves and reloads with vwn_transform.from_pretrained
    merged.save_pretrained(tmp_path / "merged")
    assert torch.equal(_logits(vwn_transform.from_pretrained(tmp_path / "merged"), ids), out)


def test_share_base_weights_refreezes_after_peft_toggles_grads():
    model = _peft(_widen("gemma", dict(ratio=2)))
    head = model.get_output_embeddings().weight  # tied to the embedding table
    assert not head.requires_grad
    with model.disable_adapter():
        pass  # leaving it, PEFT sets requires_grad on the whole modules_to_save copies again
    assert head.requires_grad
    shared = share_base_weights(model)
    assert not head.requires_grad
    assert sorted(shared) == ["base_model.model.model.embed_tokens.modules_to_save.default.weight",
                              "base_model.model.model.norm.modules_to_save.default.weight"]


def test_share_base_weights_errors():
    with pytest.raises(TypeError, match="nn.Module, got str"):
        share_base_weights("model")
    plain = get_peft_model(tiny_hf("llama"), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="no PEFT copies of VWN modules; build it with get_peft_model"):
        share_base_weights(plain)
    wide = _widen("gemma", dict(ratio=2))
    cfg = LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=peft_modules_to_save(wide),
                     ensure_weight_tying=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tied = get_peft_model(wide, cfg)
    with pytest.raises(ValueError, match=r"\['default'\] set ensure_weight_tying=True"):
        share_base_weights(tied)


def test_peft_modules_to_save_errors():
    with pytest.raises(TypeError, match="nn.Module, got int"):
        peft_modules_to_save(3)
    with pytest.raises(ValueError, match=r"not widened \(no vwn_config\); widen it with vwn_transform.widen"):
        peft_modules_to_save(tiny_hf("llama"))
    wide = _widen("llama", dict(ratio=2))
    names = peft_modules_to_save(wide)
    model = get_peft_model(wide, _lora_config(names))
    with pytest.raises(ValueError, match="already carries PEFT modules; call peft_modules_to_save"):
        peft_modules_to_save(model)
    with pytest.raises(UnsupportedModelError, match="mtp=True is not supported"):
        peft_modules_to_save(vwn_transform.widen(tiny_hf("llama"), 2, mtp=True))


@pytest.mark.parametrize("call", ["widen", "plan"])
def test_widen_refuses_peft_model_before_changing_it(call):
    model = get_peft_model(tiny_hf("llama"), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    classes = {n: type(m) for n, m in model.named_modules()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    kwargs = dict(inplace=True) if call == "widen" else {}
    with pytest.raises(UnsupportedModelError, match=r"PeftModel from peft: widen\(\) takes the plain model\. Either "
                       r"merge the adapter first \(widen\(peft_model\.merge_and_unload\(\), \.\.\.\)\), or widen "
                       r"first and then apply LoRA"):
        getattr(vwn_transform, call)(model, 2, **kwargs)
    assert {n: type(m) for n, m in model.named_modules()} == classes
    assert getattr(model.get_base_model(), "vwn_config", None) is None
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], v) for k, v in state.items())
    # merged first, the plain model widens
    wide = vwn_transform.widen(model.merge_and_unload(), 2)
    assert type(wide).__name__ == "LlamaForCausalLM" and wide.vwn_recipe["model_class"] == "LlamaForCausalLM"


def test_lora_injected_without_peft_model_is_refused():
    from peft import inject_adapter_in_model

    model = inject_adapter_in_model(LoraConfig(r=2, target_modules=["q_proj"]), tiny_hf("llama"))
    with pytest.raises(UnsupportedModelError, match=r"model\.layers\.0\.self_attn\.q_proj is a Linear from peft"):
        vwn_transform.widen(model, 2)


def test_public_api_and_docstring_example():
    assert "peft_modules_to_save" in vwn_transform.__all__
    assert vwn_transform.peft_modules_to_save is vwn_transform.lora.peft_modules_to_save
    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for test in finder.find(peft_modules_to_save, "peft_modules_to_save", globs={}):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            runner.run(test)
    assert runner.failures == 0 and runner.tries > 0
