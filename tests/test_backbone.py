"""The CLIP adapter against transformers' own CLIP code, prompt insertion, tokenizer, loading and identity."""
from __future__ import annotations

import pytest
import torch

from vlprompt.backbones import BackboneLoadError, CLIPBackbone, DeepPrompts, load_backbone
from vlprompt.backbones.base import IMAGE_PROMPTS_FRONT
from vlprompt.backbones.presets import random_clip_model

SOS, EOT = 49406, 49407
CONTEXT = 77
# Class names whose token counts differ (1 to 4 BPE tokens), so the end-of-text positions differ per row.
VARIED_NAMES = ["forest", "annual crop", "herbaceous vegetation land", "a b c d e f"]


@pytest.fixture(scope="module")
def vitb_backbone():
    return load_backbone("random:vit-b-16")


def _ids(backbone, texts):
    """Token ids padded to CLIP's 77 positions, straight from the transformers tokenizer (not the adapter)."""
    ids = backbone.tokenizer(texts, padding="max_length", max_length=CONTEXT, truncation=True, return_tensors="pt")[
        "input_ids"
    ]
    eot = (ids == EOT).int().argmax(dim=1)
    return ids, eot


def _encode_ids(backbone, ids, eot, prompts=None):
    """The adapter's text features of token ids (end-of-text at ``eot``), through its embedded-sequence entry."""
    return backbone.encode_embedded(backbone.embed_tokens(ids), eot + 1, prompts)


def _images(n, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g)


def _reference_text_features(backbone, ids, eot, prompt_layers):
    """Full-77-position text tower written from transformers' modules, with prompts after [SOS].

    ``prompt_layers[j]`` (``(N, d)`` or ``(S, N, d)``, or None) is inserted at layer 0 / replaces positions 1..N at
    layer j. The sequence is cut back to 77 positions (the inserted prompts push out the trailing padding) and every
    layer runs with an explicit full causal mask over all 77 positions: no truncation anywhere.
    """
    tm = backbone.model.text_model
    s = ids.shape[0]

    def expand(t):
        return t.unsqueeze(0).expand(s, -1, -1) if t.dim() == 2 else t

    n = prompt_layers[0].shape[-2]
    x = tm.embeddings.token_embedding(ids)
    x = torch.cat([x[:, :1], expand(prompt_layers[0]), x[:, 1:]], dim=1)[:, :CONTEXT]
    x = x + tm.embeddings.position_embedding.weight[:CONTEXT]
    mask = torch.full((CONTEXT, CONTEXT), torch.finfo(x.dtype).min).triu(1)[None, None]
    for j, layer in enumerate(tm.encoder.layers):
        if 0 < j < len(prompt_layers) and prompt_layers[j] is not None:
            x = torch.cat([x[:, :1], expand(prompt_layers[j]), x[:, 1 + n :]], dim=1)
        x = layer(x, mask)
    rows = torch.arange(s)
    pooled = tm.final_layer_norm(x[rows, eot + n])
    return backbone.model.text_projection(pooled)


# ----------------------------------------------------------------------------- agreement with transformers
@torch.no_grad()
def test_encode_embedded_matches_get_text_features(tiny_backbone):
    words = ["a", "a photo of a dog", "a photo of a herbaceous vegetation land with many words in it"]
    texts = [f"{w}." for w in words]
    tokenized = tiny_backbone.tokenize(texts)
    assert len(set(tokenized.eot_index.tolist())) == 3  # the texts really differ in length
    assert torch.equal(tokenized.eot_index, tokenized.lengths - 1)
    ours = tiny_backbone.encode_embedded(tiny_backbone.embed_tokens(tokenized.input_ids), tokenized.lengths)
    ref = tiny_backbone.model.get_text_features(input_ids=tokenized.input_ids).pooler_output
    assert ours.shape == ref.shape == (3, tiny_backbone.embed_dim)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(tiny_backbone.encode_texts(texts), ref, atol=1e-5, rtol=0)
    # class sentences "{}." built by the backbone are the same token sequences, hence the same features
    class_prompts = tiny_backbone.class_prompts(words, placeholder="{}.")
    assert torch.equal(class_prompts.lengths, tokenized.lengths)
    torch.testing.assert_close(tiny_backbone.encode_class_prompts(class_prompts), ref, atol=1e-5, rtol=0)


@torch.no_grad()
def test_encode_image_matches_get_image_features(tiny_backbone):
    pixels = _images(3, tiny_backbone.image_size)
    ours = tiny_backbone.encode_image(pixels)
    ref = tiny_backbone.model.get_image_features(pixel_values=pixels).pooler_output
    assert ours.shape == ref.shape == (3, tiny_backbone.embed_dim)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- exact truncation with prompts
def _text_prompt_cases(backbone, n_seq, n_tok=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    d, layers = backbone.text_width, backbone.text_layers

    def rnd(*shape):
        return torch.randn(*shape, generator=g) * 0.5

    return {
        "shallow_shared": [rnd(n_tok, d)],
        "shallow_per_sequence": [rnd(n_seq, n_tok, d)],
        "deep_shared": [rnd(n_tok, d) for _ in range(layers)],
        "deep_per_sequence": [rnd(n_seq, n_tok, d) for _ in range(layers)],
        "deep_mixed": [rnd(n_tok, d)] + [rnd(n_seq, n_tok, d) for _ in range(layers - 1)],
    }


@pytest.mark.parametrize(
    "case", ["shallow_shared", "shallow_per_sequence", "deep_shared", "deep_per_sequence", "deep_mixed"]
)
@torch.no_grad()
def test_text_prompts_truncation_is_exact(tiny_backbone, case):
    texts = [f"{c}." for c in VARIED_NAMES]
    ids, eot = _ids(tiny_backbone, texts)
    assert len(set(eot.tolist())) == len(texts)  # different token lengths
    prompt_layers = _text_prompt_cases(tiny_backbone, len(texts))[case]
    ours = _encode_ids(tiny_backbone, ids, eot, DeepPrompts(prompt_layers))
    ref = _reference_text_features(tiny_backbone, ids, eot, prompt_layers)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    # The class-sentence entry point (what methods call) inserts the same prompts at the same place.
    class_prompts = tiny_backbone.class_prompts(VARIED_NAMES, placeholder="{}.")
    via_classes = tiny_backbone.encode_class_prompts(class_prompts, DeepPrompts(prompt_layers))
    torch.testing.assert_close(via_classes, ref, atol=1e-5, rtol=0)
    # The prompts matter (the comparison is not trivially between two unprompted passes).
    plain = _encode_ids(tiny_backbone, ids, eot)
    assert (ours - plain).abs().max() > 1e-3


@pytest.mark.parametrize("case", ["shallow_shared", "deep_per_sequence", "deep_mixed"])
@torch.no_grad()
def test_full_context_mode_is_the_reference_77_position_tower(case, monkeypatch):
    """``truncate_text = False`` (what tests/test_truncation.py compares every method against) runs all 77
    positions and equals the hand-written reference."""
    backbone = load_backbone("random:tiny")
    seen = []
    backbone.model.text_model.encoder.layers[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].shape))
    texts = [f"{c}." for c in VARIED_NAMES]
    ids, eot = _ids(backbone, texts)
    prompt_layers = _text_prompt_cases(backbone, len(texts))[case]
    monkeypatch.setattr(backbone, "truncate_text", False)
    full = _encode_ids(backbone, ids, eot, DeepPrompts(prompt_layers))
    assert seen[-1][1] == CONTEXT
    torch.testing.assert_close(full, _reference_text_features(backbone, ids, eot, prompt_layers), atol=1e-5, rtol=0)


@torch.no_grad()
def test_text_reference_without_prompts_matches_adapter(tiny_backbone):
    """Sanity check of the hand-written reference: zero prompt tokens = transformers' own text features."""
    ids, eot = _ids(tiny_backbone, [f"{c}." for c in VARIED_NAMES])
    empty = torch.zeros(0, tiny_backbone.text_width)
    ref = _reference_text_features(tiny_backbone, ids, eot, [empty])
    expected = tiny_backbone.model.get_text_features(input_ids=ids).pooler_output
    torch.testing.assert_close(ref, expected, atol=1e-5, rtol=0)


@torch.no_grad()
def test_deep_text_prompt_at_later_layer_changes_output(tiny_backbone):
    tokenized = tiny_backbone.tokenize(["forest.", "sea lake."])
    layers = _text_prompt_cases(tiny_backbone, 2)["deep_shared"]
    before = _encode_ids(tiny_backbone, tokenized.input_ids, tokenized.eot_index, DeepPrompts(layers))
    changed = list(layers)
    changed[-1] = torch.randn_like(changed[-1])
    after = _encode_ids(tiny_backbone, tokenized.input_ids, tokenized.eot_index, DeepPrompts(changed))
    assert not torch.allclose(before, after)


def test_text_prompts_validation(tiny_backbone):
    tokenized = tiny_backbone.tokenize(["forest."])
    d = tiny_backbone.text_width

    def encode(prompts):
        return _encode_ids(tiny_backbone, tokenized.input_ids, tokenized.eot_index, prompts)

    too_deep = DeepPrompts([torch.zeros(2, d)] * (tiny_backbone.text_layers + 1))
    with pytest.raises(ValueError, match="lower the prompt depth"):
        encode(too_deep)
    with pytest.raises(ValueError, match=rf"expected \(N=2, {d}\)"):
        encode(DeepPrompts([torch.zeros(2, d + 1)]))
    with pytest.raises(ValueError, match="context"):  # 80 prompt tokens do not fit in 77 positions
        encode(DeepPrompts([torch.zeros(80, d)]))
    with pytest.raises(ValueError, match="per-sequence prompts"):
        encode(DeepPrompts([torch.zeros(3, 2, d)]))


# ----------------------------------------------------------------------------- image prompts
@torch.no_grad()
def test_image_prompt_positions(tiny_backbone):
    """"end" puts the prompts after the patches, "front" between the class token and the patches.

    The vision tower's attention is unmasked and prompts carry no positional embedding, so the pooled class token is
    permutation-invariant in the other tokens: both positions give the same features (up to float rounding). The
    placement itself is checked on the sequence entering layer 0.
    """
    pixels = _images(2, tiny_backbone.image_size)
    g = torch.Generator().manual_seed(1)
    n, w = 3, tiny_backbone.vision_width
    prompt = torch.randn(n, w, generator=g)
    vision = tiny_backbone.model.vision_model
    n_patches = (tiny_backbone.image_size // tiny_backbone.patch_size) ** 2
    seen = []
    handle = vision.encoder.layers[0].register_forward_pre_hook(lambda mod, args: seen.append(args[0].clone()))
    try:
        end = tiny_backbone.encode_image(pixels, DeepPrompts([prompt]), position="end")
        assert IMAGE_PROMPTS_FRONT == "front"
        front = tiny_backbone.encode_image(pixels, DeepPrompts([prompt]), position=IMAGE_PROMPTS_FRONT)
        plain = tiny_backbone.encode_image(pixels)
    finally:
        handle.remove()
    x_end, x_cls, x_plain = seen
    assert x_end.shape == x_cls.shape == (2, 1 + n_patches + n, w)
    normed_prompt = vision.pre_layrnorm(prompt)  # prompts enter before the pre-LayerNorm, with no position
    torch.testing.assert_close(x_end[:, -n:], normed_prompt.expand(2, -1, -1))
    torch.testing.assert_close(x_end[:, : 1 + n_patches], x_plain)
    torch.testing.assert_close(x_cls[:, 1 : 1 + n], normed_prompt.expand(2, -1, -1))
    torch.testing.assert_close(x_cls[:, :1], x_plain[:, :1])
    torch.testing.assert_close(x_cls[:, 1 + n :], x_plain[:, 1:])
    torch.testing.assert_close(end, front, atol=1e-5, rtol=0)
    assert not torch.allclose(end, plain, atol=1e-3)
    with pytest.raises(ValueError, match="position"):
        tiny_backbone.encode_image(pixels, DeepPrompts([prompt]), position="middle")


@pytest.mark.parametrize("position", ["end", "front"])
@torch.no_grad()
def test_deep_image_prompt_replacement(tiny_backbone, position):
    pixels = _images(2, tiny_backbone.image_size)
    g = torch.Generator().manual_seed(2)
    w = tiny_backbone.vision_width
    layers = [torch.randn(4, w, generator=g) for _ in range(tiny_backbone.vision_layers)]
    seen = []
    hooks = [
        layer.register_forward_pre_hook(lambda mod, args: seen.append(args[0].clone()))
        for layer in tiny_backbone.model.vision_model.encoder.layers
    ]
    try:
        base = tiny_backbone.encode_image(pixels, DeepPrompts(layers), position=position)
    finally:
        for h in hooks:
            h.remove()
    start = 1 if position == "front" else 1 + (tiny_backbone.image_size // tiny_backbone.patch_size) ** 2
    assert len({x.shape for x in seen}) == 1  # deep prompts replace, they never grow the sequence
    for j in range(1, tiny_backbone.vision_layers):
        torch.testing.assert_close(seen[j][:, start : start + 4], layers[j].expand(2, -1, -1), atol=0, rtol=0)
    for j in range(1, tiny_backbone.vision_layers):
        changed = list(layers)
        changed[j] = torch.randn_like(changed[j])
        out = tiny_backbone.encode_image(pixels, DeepPrompts(changed), position=position)
        assert not torch.allclose(base, out, atol=1e-5), f"changing the layer-{j} prompt had no effect"
    # A None entry keeps the previous layer's outputs (shallow beyond that layer): differs from replacing them.
    kept = tiny_backbone.encode_image(pixels, DeepPrompts(layers[:1] + [None] * (len(layers) - 1)), position=position)
    shallow = tiny_backbone.encode_image(pixels, DeepPrompts(layers[:1]), position=position)
    torch.testing.assert_close(kept, shallow, atol=0, rtol=0)
    assert not torch.allclose(kept, base, atol=1e-5)


@torch.no_grad()
def test_per_image_prompts_equal_shared_prompts_when_identical(tiny_backbone):
    pixels = _images(3, tiny_backbone.image_size)
    g = torch.Generator().manual_seed(3)
    shared = [torch.randn(2, tiny_backbone.vision_width, generator=g) for _ in range(tiny_backbone.vision_layers)]
    per_image = [t.unsqueeze(0).expand(3, -1, -1).clone() for t in shared]
    a = tiny_backbone.encode_image(pixels, DeepPrompts(shared))
    b = tiny_backbone.encode_image(pixels, DeepPrompts(per_image))
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_image_prompts_validation(tiny_backbone):
    pixels = _images(1, tiny_backbone.image_size)
    w = tiny_backbone.vision_width
    too_deep = DeepPrompts([torch.zeros(2, w)] * (tiny_backbone.vision_layers + 1))
    with pytest.raises(ValueError, match="image prompts given for 3 layers but the image tower has 2"):
        tiny_backbone.encode_image(pixels, too_deep)
    with pytest.raises(ValueError, match=rf"image prompt at layer 0 has shape \(2, {w + 5}\); expected"):
        tiny_backbone.encode_image(pixels, DeepPrompts([torch.zeros(2, w + 5)]))
    with pytest.raises(ValueError, match="layer 1"):  # deep layers must use the same token count
        tiny_backbone.encode_image(pixels, DeepPrompts([torch.zeros(2, w), torch.zeros(3, w)]))
    with pytest.raises(ValueError, match="layer-0 tokens"):
        tiny_backbone.encode_image(pixels, DeepPrompts([None, torch.zeros(2, w)]))


# ----------------------------------------------------------------------------- tokenizer
def test_tokenizer_ids(tiny_backbone):
    tokenized = tiny_backbone.tokenize(["a photo of a dog."])
    expected = [SOS, 320, 1125, 539, 320, 1929, 269, EOT]
    assert tokenized.input_ids.shape == (1, CONTEXT)
    assert tokenized.input_ids[0, :8].tolist() == expected
    assert int(tokenized.eot_index[0]) == 7 and int(tokenized.lengths[0]) == 8
    words = tiny_backbone.tokenize(["a photo of a dog."], special_tokens=False)  # the words' tokens alone
    assert words.input_ids[0].tolist() == expected[1:-1] and int(words.lengths[0]) == 6
    assert tiny_backbone.embed_tokens(tokenized.input_ids).shape == (1, CONTEXT, tiny_backbone.text_width)


# ----------------------------------------------------------------------------- loading
@torch.no_grad()
def test_load_saved_folder_gives_identical_features(tiny_backbone, tiny_model_dir):
    loaded = load_backbone(tiny_model_dir)
    assert isinstance(loaded, CLIPBackbone)
    assert loaded.name_or_path == str(tiny_model_dir)
    texts = ["a photo of a forest.", "sea lake."]
    assert torch.equal(loaded.tokenize(texts).input_ids, tiny_backbone.tokenize(texts).input_ids)
    torch.testing.assert_close(loaded.encode_texts(texts), tiny_backbone.encode_texts(texts), atol=0, rtol=0)
    pixels = _images(2, tiny_backbone.image_size)
    torch.testing.assert_close(loaded.encode_image(pixels), tiny_backbone.encode_image(pixels), atol=0, rtol=0)
    assert not any(p.requires_grad for p in loaded.model.parameters())


def test_load_missing_folder(tmp_path):
    missing = tmp_path / "does_not_exist"
    with pytest.raises(BackboneLoadError, match="config.json") as info:
        load_backbone(missing)
    assert str(missing) in str(info.value)


def test_load_folder_without_config(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(BackboneLoadError, match="config.json"):
        load_backbone(tmp_path)


def test_load_non_clip_model(tmp_path):
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)).save_pretrained(
        tmp_path
    )
    with pytest.raises(BackboneLoadError, match=r"'bert'.*not supported.*clip"):
        load_backbone(tmp_path)


def test_load_backbone_error_is_a_value_error():
    assert issubclass(BackboneLoadError, ValueError)


def test_load_clip_config_without_weights(tmp_path):
    random_clip_model("tiny").config.save_pretrained(tmp_path)
    with pytest.raises(BackboneLoadError):
        load_backbone(tmp_path)


def test_load_clip_folder_without_tokenizer(tmp_path):
    random_clip_model("tiny").save_pretrained(tmp_path)  # weights + config only
    with pytest.raises(BackboneLoadError, match="tokenizer"):
        load_backbone(tmp_path)


# ----------------------------------------------------------------------------- identity
def test_identity_same_architecture_same_hash(tiny_backbone, tiny_model_dir):
    other_seed = CLIPBackbone(random_clip_model("tiny", seed=1), tiny_backbone.tokenizer, name_or_path="x")
    loaded = load_backbone(tiny_model_dir)
    ident = tiny_backbone.identity
    assert ident["family"] == "clip"
    assert ident["name_or_path"] == "random:tiny"
    assert ident["config_hash"] == other_seed.identity["config_hash"] == loaded.identity["config_hash"]
    assert ident["arch"]["text_config"]["hidden_size"] == 32


def test_identity_different_architecture_different_hash(tiny_backbone, vitb_backbone):
    from transformers import CLIPConfig, CLIPModel

    from vlprompt.backbones.presets import PRESETS

    assert tiny_backbone.identity["config_hash"] != vitb_backbone.identity["config_hash"]
    cfg = PRESETS["vit-b-32"]
    config = CLIPConfig(
        text_config=dict(cfg["text_config"], vocab_size=49408, max_position_embeddings=77),
        vision_config=dict(cfg["vision_config"]),
        projection_dim=cfg["projection_dim"],
    )
    with torch.device("meta"):  # only the config matters for identity: no weights allocated
        vitb32 = CLIPBackbone(CLIPModel(config), tiny_backbone.tokenizer, name_or_path="vit-b-32")
    # ViT-B/32 differs from ViT-B/16 only by the patch size: the hash must still tell them apart.
    assert vitb32.identity["config_hash"] != vitb_backbone.identity["config_hash"]


def test_vitb16_dimensions(vitb_backbone):
    assert vitb_backbone.num_parameters() == 149_620_737
    assert (vitb_backbone.text_width, vitb_backbone.vision_width, vitb_backbone.embed_dim) == (512, 768, 512)
    assert (vitb_backbone.text_layers, vitb_backbone.vision_layers) == (12, 12)
    assert (vitb_backbone.patch_size, vitb_backbone.image_size, vitb_backbone.context_length) == (16, 224, 77)


def test_a_local_model_folder_is_recorded_absolute(tiny_model_dir, monkeypatch):
    """A run trained with --model ./clip must find its model again from any other directory (eval, predict)."""
    monkeypatch.chdir(tiny_model_dir.parent)
    backbone = load_backbone(f"./{tiny_model_dir.name}")
    assert backbone.identity["name_or_path"] == str(tiny_model_dir.resolve())


def test_loaded_models_keep_transformers_own_layers_not_hub_kernels(tiny_model_dir):
    """transformers 5 (with the ``kernels`` package it requires) would swap layers for kernels downloaded from the Hub
    the first time a model trains on a GPU: offline that fails every training run (seen on an H200), online it runs
    untested code. A loaded backbone must have kernels off."""
    from transformers.utils import is_kernels_available

    from vlprompt.backbones import load_backbone

    if not is_kernels_available():
        pytest.skip("the kernels package is not installed: transformers cannot switch to hub kernels")
    backbone = load_backbone(str(tiny_model_dir))
    assert backbone.model.use_kernels is False
    backbone.model.train()
    assert backbone.model.use_kernels is False
