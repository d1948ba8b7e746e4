"""widen() on transformers whose residual stream does not start at token tables or end in a norm (issue 19):

* Hugging Face ViT classifier (patch embeddings by convolution, a CLS token concatenated, learned positions; the
  stream ends in a final norm) and BEiT with mean pooling (the stream ends in a pooler): the stream is widened at
  the input of the first block and, for BEiT, reduced at the output of the last; every output within 1e-5 of
  the original (fp32), example inputs as a dict of keyword arguments;
* a hand-written DiT-style stack (patch embedding by a linear, adaptive layer norm conditioning from a timestep and
  a class label into every block, an adaLN final layer): the same, plus gradients of every parameter in training;
* save/load by recipe replay (the recipe records the form of the example inputs) and ONNX export of the widened ViT;
* refusals that name the reason: Swin (its stages change the stream's width), a dict with non-string keys.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import vwn_transform
from vwn_transform import UnsupportedModelError

transformers = pytest.importorskip("transformers")


def tiny_vit(cls_name="ViTForImageClassification"):
    from transformers import ViTConfig

    torch.manual_seed(0)
    cfg = ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
                    num_attention_heads=2, intermediate_size=64, num_labels=5)
    return getattr(transformers, cls_name)(cfg).eval()


def pixels(batch=2, seed=1):
    return torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(seed))  # [B, C, H, W]


def max_diff(a, b) -> float:
    return float((a - b).abs().max())


# ------------------------------------------------------------------------------------------------------------
# a DiT-style stack (Peebles & Xie): adaLN-modulated pre-norm blocks, conditioning into every block
# ------------------------------------------------------------------------------------------------------------
def modulate(x, shift, scale):
    return x * (1 + scale) + shift


class DiTBlock(nn.Module):
    def __init__(self, d, heads=2):
        super().__init__()
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(approximate="tanh"), nn.Linear(4 * d, d))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))

    def forward(self, x, c):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c).unsqueeze(1).chunk(6, dim=-1)  # [B, 1, D] each
        h = modulate(self.norm1(x), shift1, scale1)
        x = x + gate1 * self.attn(h, h, h, need_weights=False)[0]
        return x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    def __init__(self, d, out):
        super().__init__()
        self.norm = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(d, out)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))

    def forward(self, x, c):
        shift, scale = self.ada(c).unsqueeze(1).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


class TinyDiT(nn.Module):
    def __init__(self, d=32, patch=4, channels=3, size=16, layers=2, classes=10):
        super().__init__()
        self.patch = patch
        self.x_embed = nn.Linear(patch * patch * channels, d)
        self.pos = nn.Parameter(torch.randn(1, (size // patch) ** 2, d) * 0.02)
        self.t_embed = nn.Sequential(nn.Linear(32, d), nn.SiLU(), nn.Linear(d, d))  # a chain of same-width linears
        self.y_embed = nn.Embedding(classes, d)  # feeds the conditioning, not the stream
        self.blocks = nn.ModuleList(DiTBlock(d) for _ in range(layers))
        self.final = FinalLayer(d, patch * patch * channels)

    def forward(self, x, t, y):
        b, ch = x.shape[:2]
        p = self.patch
        patches = x.unfold(2, p, p).unfold(3, p, p).permute(0, 2, 3, 1, 4, 5).reshape(b, -1, ch * p * p)  # [B, T, P]
        h = self.x_embed(patches) + self.pos  # [B, T, D]
        freqs = torch.exp(-math.log(10000.0) * torch.arange(16, dtype=torch.float32) / 16)
        temb = torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], dim=-1)  # [B, 32]
        c = self.t_embed(temb) + self.y_embed(y)  # [B, D]
        for blk in self.blocks:
            h = blk(h, c)
        return self.final(h, c)  # [B, T, P]


def dit_inputs(batch=2, seed=2):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 3, 16, 16, generator=g), torch.rand(batch, generator=g) * 1000,
            torch.randint(0, 10, (batch,), generator=g))


# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ratio", [2, 1.5])
def test_vit_classifier_is_preserved_with_dict_inputs(ratio):
    base = tiny_vit()
    x = pixels()
    wide = vwn_transform.widen(base, ratio, example_inputs={"pixel_values": x})
    wrapped = wide.vwn_recipe["wrapped"]
    assert wrapped["entry"] == "vit.layers.0" and wrapped["embeddings"] == [] and "exit" not in wrapped
    assert wrapped["final"] == "vit.layernorm"
    assert wide.vit.layers[0].vwn_expand.shape == (int(32 * ratio), 32)  # [D', D]
    other = pixels(3, seed=5)  # another batch size than the probe's
    with torch.no_grad():
        assert max_diff(wide(pixel_values=other).logits, base(pixel_values=other).logits) <= 1e-5
    assert "at the input of vit.layers.0" in str(vwn_transform.plan(base, ratio, example_inputs={"pixel_values": x}))
    # training: every parameter, the expansion included, gets a finite gradient
    loss = torch.nn.functional.cross_entropy(wide.train()(pixel_values=other).logits, torch.tensor([0, 3, 4]))
    loss.backward()
    missing = [k for k, p in wide.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing


# other vision and audio encoders: (config class, model class, config kwargs, input name, input shape)
FAMILIES = {
    "deit": ("DeiTConfig", "DeiTForImageClassification", dict(image_size=16, patch_size=4, num_labels=3),
             "pixel_values", (2, 3, 16, 16)),
    "dinov2-registers": ("Dinov2WithRegistersConfig", "Dinov2WithRegistersForImageClassification",
                         dict(image_size=16, patch_size=4, mlp_ratio=2, num_register_tokens=2, num_labels=3),
                         "pixel_values", (2, 3, 16, 16)),
    "siglip": ("SiglipVisionConfig", "SiglipVisionModel", dict(image_size=16, patch_size=4), "pixel_values",
               (2, 3, 16, 16)),
    "clip": ("CLIPVisionConfig", "CLIPVisionModel", dict(image_size=16, patch_size=4), "pixel_values",
             (2, 3, 16, 16)),
    "ast-audio": ("ASTConfig", "ASTForAudioClassification", dict(patch_size=4, frequency_stride=4, time_stride=4,
                  max_length=16, num_mel_bins=16, num_labels=3), "input_values", (2, 16, 16)),
    "wav2vec2-audio": ("Wav2Vec2Config", "Wav2Vec2ForSequenceClassification", dict(
        conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=8,
        num_conv_pos_embedding_groups=2, do_stable_layer_norm=True, feat_extract_norm="layer", num_labels=3),
        "input_values", (2, 400)),
}
SIZES = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_vision_and_audio_encoders_are_preserved(family):
    config_cls, model_cls, kwargs, key, shape = FAMILIES[family]
    sizes = {k: v for k, v in SIZES.items() if not (k == "intermediate_size" and "mlp_ratio" in kwargs)}
    torch.manual_seed(0)
    base = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**sizes, **kwargs)).eval()
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(4))
    wide = vwn_transform.widen(base, 1.5, example_inputs={key: x})
    assert "entry" in wide.vwn_recipe["wrapped"]  # widened at the first block's input
    with torch.no_grad():
        want, got = base(**{key: x}), wide(**{key: x})
    for name, value in want.items():
        if isinstance(value, torch.Tensor):
            assert got[name].shape == value.shape and max_diff(got[name], value) <= 1e-5, name


def test_pooled_encoder_gets_the_reduce_at_the_last_block():
    from transformers import BeitConfig, BeitModel

    torch.manual_seed(0)
    base = BeitModel(BeitConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2,
                                num_attention_heads=2, intermediate_size=64, use_mean_pooling=True)).eval()
    x = pixels()
    wide = vwn_transform.widen(base, 1.5, example_inputs={"pixel_values": x})
    assert wide.vwn_recipe["wrapped"]["exit"] == "layers.1"
    with torch.no_grad():
        want, got = base(pixel_values=x), wide(pixel_values=x)
    assert got.last_hidden_state.shape == want.last_hidden_state.shape  # consumers see width D, as before
    assert max_diff(got.last_hidden_state, want.last_hidden_state) <= 1e-5
    assert max_diff(got.pooler_output, want.pooler_output) <= 1e-5


def test_dit_stack_is_preserved_and_trains():
    base = TinyDiT().eval()
    inputs = dit_inputs()
    wide = vwn_transform.widen(base, 1.5, example_inputs=inputs)
    wrapped = wide.vwn_recipe["wrapped"]
    assert wrapped["blocks"] == ["blocks.0", "blocks.1"]  # not the same-width linears of t_embed
    assert wrapped["entry"] == "blocks.0" and wrapped["exit"] == "blocks.1"
    with torch.no_grad():
        assert max_diff(wide(*inputs), base(*inputs)) <= 1e-5
    # training from the paper's init: every parameter gets a finite, non-zero gradient somewhere
    torch.manual_seed(3)
    trained = vwn_transform.widen(TinyDiT(), 2, init="paper", example_inputs=inputs).train()
    loss = trained(*dit_inputs(seed=7)).pow(2).mean()
    loss.backward()
    missing = [k for k, p in trained.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing
    assert trained.blocks[0].vwn_expand.grad.abs().sum() > 0 and trained.blocks[1].vwn_reduce.grad.abs().sum() > 0


@pytest.mark.parametrize("make,inputs,call", [
    (tiny_vit, lambda: {"pixel_values": pixels()}, lambda m, i: m(**i).logits),
    (lambda: TinyDiT().eval(), dit_inputs, lambda m, i: m(*i)),
])
def test_save_and_load_replay_the_recipe(tmp_path, make, inputs, call):
    wide = vwn_transform.widen(make(), 1.5, init="paper", example_inputs=inputs())
    path = vwn_transform.save(wide, tmp_path / "wide.pt")
    loaded = vwn_transform.load(path, make)  # the factory builds the base model; the recipe's inputs probe it
    assert loaded.vwn_recipe["wrapped"] == wide.vwn_recipe["wrapped"]
    x = inputs()
    with torch.no_grad():
        assert max_diff(call(loaded.eval(), x), call(wide.eval(), x)) == 0.0


def test_vit_save_pretrained_round_trip(tmp_path):
    """from_pretrained rebuilds the class config.json names (an image classifier, not a causal LM) and replays the
    recipe with inputs of the recorded form."""
    wide = vwn_transform.widen(tiny_vit(), 1.5, init="paper", example_inputs={"pixel_values": pixels()})
    wide.save_pretrained(tmp_path / "vit")
    back = vwn_transform.from_pretrained(tmp_path / "vit")
    assert type(back).__name__ == "ViTForImageClassification" and back.vwn_recipe["wrapped"]["entry"]
    x = pixels(3, seed=9)
    with torch.no_grad():
        assert max_diff(back.eval()(pixel_values=x).logits, wide.eval()(pixel_values=x).logits) == 0.0


def test_widened_vit_exports_to_onnx(tmp_path):
    pytest.importorskip("onnxruntime")
    base = tiny_vit()
    wide = vwn_transform.widen(base, 2, example_inputs={"pixel_values": pixels()})
    report = vwn_transform.export_onnx(wide, tmp_path / "vit.onnx", example_inputs=(pixels(),))
    assert report.widened and report.input_names == ["pixel_values"]
    assert report.dynamic_axes == {"pixel_values": {0: "batch"}}  # images keep their channels and size
    assert report.checks and all(c.max_abs_diff <= 1e-4 for c in report.checks)


def test_swin_is_refused_because_its_width_changes():
    from transformers import SwinConfig, SwinModel

    model = SwinModel(SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 2],
                                 window_size=4)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UnsupportedModelError, match="changes width between stages"):
        vwn_transform.widen(model, 2, example_inputs={"pixel_values": torch.randn(1, 3, 32, 32)})
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_example_inputs_dict_needs_string_keys():
    with pytest.raises(TypeError, match="keyword names"):
        vwn_transform.widen(tiny_vit(), 2, example_inputs={0: pixels()})
