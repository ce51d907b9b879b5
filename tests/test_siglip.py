"""The SigLIP / SigLIP 2 adapters against transformers' own models (tiny random presets, CPU, fast)."""
from __future__ import annotations

import pytest
import torch

from vlprompt.backbones import (
    BackboneLoadError,
    DeepPrompts,
    UnsupportedBackboneError,
    load_backbone,
)
from vlprompt.backbones.siglip import Siglip2Backbone, SiglipBackbone, patchify
from vlprompt.backbones.siglip_presets import random_siglip_model, save_random_siglip

TEXTS = ["a photo of a cat.", "red car", "a blurry photo of a big zebra"]
ATOL = 1e-5


@pytest.fixture(scope="module")
def siglip() -> SiglipBackbone:
    return load_backbone("random:siglip-tiny")


@pytest.fixture(scope="module")
def siglip2() -> Siglip2Backbone:
    return load_backbone("random:siglip2-tiny")


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _prompts(backbone: SiglipBackbone, tower: str, n: int, depth: int = 1, seed: int = 0) -> DeepPrompts:
    width = backbone.text_width if tower == "text" else backbone.vision_width
    g = torch.Generator().manual_seed(seed)
    return DeepPrompts([torch.randn(n, width, generator=g) for _ in range(depth)])


def _text(backbone: SiglipBackbone, prompts: DeepPrompts | None = None, block=None) -> torch.Tensor:
    tokens = backbone.tokenize(TEXTS)
    return backbone.encode_embedded(backbone.embed_tokens(tokens.input_ids), tokens.lengths, prompts, block)


# ----------------------------------------------------------------------------- the family as declared
def test_registered_and_declared(siglip):
    assert isinstance(siglip, SiglipBackbone) and siglip.family == "siglip"
    assert siglip.info.scoring == "sigmoid" and siglip.text_prefix_tokens == 0
    assert siglip.info.image_prompt_positions == ("end", "front")
    assert siglip.embed_dim == siglip.vision_width == 48 and siglip.text_width == 32
    assert siglip.context_length == 64 and siglip.image_size == 32 and siglip.patch_size == 8


def test_tokenize_pads_to_the_context_and_counts_the_end_token(siglip):
    tokens = siglip.tokenize(["A photo of a Cat!", "zebra"])
    eos = siglip.tokenizer.eos_token_id
    assert tokens.input_ids.shape == (2, siglip.context_length)
    assert tokens.lengths.tolist() == [6, 6]  # a photo of a cat </s> / z e b r a </s>
    assert (tokens.input_ids[0, 5:] == eos).all()  # SigLIP pads with </s>
    words = siglip.tokenize(["a photo of a"], special_tokens=False)
    assert words.lengths.tolist() == [4] and words.input_ids.shape == (1, 4)


def test_too_long_text_is_truncated_keeping_its_end_token(siglip):
    tokens = siglip.tokenize([" ".join(["cat"] * 100)])
    assert tokens.lengths.tolist() == [siglip.context_length]
    assert int(tokens.input_ids[0, -1]) == siglip.tokenizer.eos_token_id


# ----------------------------------------------------------------------------- equal to transformers' model
def test_text_features_equal_get_text_features(siglip):
    tokens = siglip.tokenize(TEXTS)
    with torch.no_grad():
        ours = siglip.encode_texts(TEXTS)
        theirs = siglip.model.get_text_features(input_ids=tokens.input_ids).pooler_output
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


def test_image_features_equal_get_image_features(siglip, pixels):
    with torch.no_grad():
        ours = siglip.encode_image(pixels)
        theirs = siglip.model.get_image_features(pixel_values=pixels).pooler_output
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


def test_score_equals_the_models_logits_per_image(siglip, pixels):
    tokens = siglip.tokenize(TEXTS)
    with torch.no_grad():
        ours = siglip.score(siglip.encode_image(pixels), siglip.encode_texts(TEXTS))
        theirs = siglip.model(input_ids=tokens.input_ids, pixel_values=pixels).logits_per_image
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


def test_trailing_padding_may_be_short_or_missing(siglip):
    """Sequences handed over cut after their content are padded back to the context: the same features."""
    tokens = siglip.tokenize(TEXTS)
    width = int(tokens.lengths.max())
    with torch.no_grad():
        full = siglip.encode_embedded(siglip.embed_tokens(tokens.input_ids), tokens.lengths)
        cut = siglip.encode_embedded(siglip.embed_tokens(tokens.input_ids[:, :width]), tokens.lengths)
    torch.testing.assert_close(cut, full, atol=ATOL, rtol=0)


# ----------------------------------------------------------------------------- text prompts
def test_text_prompts_go_first_with_positions_as_the_models_encoder_runs_them(siglip):
    """[prompts][words][</s>][padding] to the context, position embeddings on every position, the model's own
    (unmasked) encoder, last position, head."""
    text = siglip.model.text_model
    prompts = _prompts(siglip, "text", 3)
    tokens = siglip.tokenize(TEXTS)
    with torch.no_grad():
        ours = _text(siglip, prompts)
        words = siglip.embed_tokens(tokens.input_ids)
        sequence = torch.cat([prompts.tokens[0].expand(len(TEXTS), -1, -1), words], dim=1)[:, : siglip.context_length]
        hidden = text.encoder(inputs_embeds=sequence + text.embeddings.position_embedding.weight).last_hidden_state
        reference = text.head(text.final_layer_norm(hidden)[:, -1])
        plain = _text(siglip)
    torch.testing.assert_close(ours, reference, atol=ATOL, rtol=0)
    assert not torch.allclose(ours, plain, atol=1e-4)


def test_deep_text_prompt_replaces_at_later_layers(siglip):
    shallow = _prompts(siglip, "text", 2, depth=1)
    later = _prompts(siglip, "text", 2, depth=2, seed=5).tokens
    deep = DeepPrompts([shallow.tokens[0], later[0]])
    other = DeepPrompts([shallow.tokens[0], later[1]])
    with torch.no_grad():
        a, b, c = _text(siglip, shallow), _text(siglip, deep), _text(siglip, other)
    assert not torch.allclose(a, b, atol=1e-4) and not torch.allclose(b, c, atol=1e-4)


def test_per_sequence_text_prompts_equal_shared_ones_when_identical(siglip):
    shared = _prompts(siglip, "text", 2)
    per_row = DeepPrompts([shared.tokens[0].expand(len(TEXTS), -1, -1).clone()])
    with torch.no_grad():
        torch.testing.assert_close(_text(siglip, per_row), _text(siglip, shared), atol=ATOL, rtol=0)


def test_text_prompts_that_overflow_the_context_are_refused(siglip):
    longest = int(siglip.tokenize(TEXTS).lengths.max())
    too_many = siglip.context_length - longest + 1
    with pytest.raises(ValueError, match="text context is 64: use fewer prompt tokens or shorter class names"):
        _text(siglip, _prompts(siglip, "text", too_many))
    with torch.no_grad():
        _text(siglip, _prompts(siglip, "text", too_many - 1))  # exactly full is fine


def test_a_tokenizer_with_a_start_token_keeps_it_first(siglip):
    """A tokenizer that puts a start token before the words (a Gemma one with <bos>): prompts go after it."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    backend = siglip.tokenizer.backend_tokenizer.__class__.from_str(siglip.tokenizer.backend_tokenizer.to_str())
    backend.post_processor = processors.TemplateProcessing(single="<unk> $A </s>",
                                                           special_tokens=[("<unk>", 2), ("</s>", 1)])  # fmt: skip
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", pad_token="</s>")
    started = SiglipBackbone(siglip.model, tokenizer, name_or_path="start")
    assert started.text_prefix_tokens == 1 and SiglipBackbone.text_prefix_tokens == 0
    tokens = started.tokenize(TEXTS)
    prompts = _prompts(started, "text", 2)
    text = siglip.model.text_model
    with torch.no_grad():
        plain = started.encode_texts(TEXTS)
        torch.testing.assert_close(plain, siglip.model.get_text_features(input_ids=tokens.input_ids).pooler_output,
                                   atol=ATOL, rtol=0)  # fmt: skip
        ours = _text(started, prompts)
        words = started.embed_tokens(tokens.input_ids)
        ctx = prompts.tokens[0].expand(len(TEXTS), -1, -1)
        sequence = torch.cat([words[:, :1], ctx, words[:, 1:]], dim=1)[:, : started.context_length]
        hidden = text.encoder(inputs_embeds=sequence + text.embeddings.position_embedding.weight).last_hidden_state
        torch.testing.assert_close(ours, text.head(text.final_layer_norm(hidden)[:, -1]), atol=ATOL, rtol=0)


@pytest.mark.parametrize("class_position", ["middle", "front"])
def test_context_around_class_names(siglip, class_position):
    classes = siglip.class_prompts(["cat", "red car"], "{}.")
    context = _prompts(siglip, "text", 4, seed=7)
    with torch.no_grad():
        around = siglip.encode_class_prompts(classes, context, class_position=class_position)
        before = siglip.encode_class_prompts(classes, context)
    assert around.shape == before.shape == (2, siglip.embed_dim)
    assert not torch.allclose(around, before, atol=1e-4)


# ----------------------------------------------------------------------------- image prompts
def test_image_prompts_act_through_attention_and_are_dropped_before_the_head(siglip, pixels):
    vision = siglip.model.vision_model
    prompts = _prompts(siglip, "image", 3)
    with torch.no_grad():
        ours = siglip.encode_image(pixels, prompts)
        patches = vision.embeddings(pixels)
        sequence = torch.cat([patches, prompts.tokens[0].expand(len(pixels), -1, -1)], dim=1)
        hidden = vision.encoder(inputs_embeds=sequence).last_hidden_state[:, : patches.shape[1]]
        reference = vision.head(vision.post_layernorm(hidden))
        plain = siglip.encode_image(pixels)
    torch.testing.assert_close(ours, reference, atol=ATOL, rtol=0)
    assert not torch.allclose(ours, plain, atol=1e-4)


def _layer_inputs(backbone: SiglipBackbone, run) -> list[torch.Tensor]:
    """The input of every image layer during ``run()``."""
    seen: list[torch.Tensor] = []
    layers = backbone.model.vision_model.encoder.layers
    hooks = [layer.register_forward_pre_hook(lambda mod, args: seen.append(args[0].clone())) for layer in layers]
    try:
        with torch.no_grad():
            run()
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def test_image_prompt_positions(siglip, pixels):
    """"end" puts the prompts after the patches, "front" before them (no class token).

    As in CLIP, the tower's attention is unmasked and prompts carry no position embedding; here the pooling head
    also attends over the patches without order, so both positions give the same features (up to float rounding):
    the placement itself is checked on the sequence entering layer 0.
    """
    prompts = _prompts(siglip, "image", 2)
    n, n_patches = 2, (siglip.image_size // siglip.patch_size) ** 2
    with torch.no_grad():
        patches = siglip.model.vision_model.embeddings(pixels)
        end = siglip.encode_image(pixels, prompts, position="end")
        front = siglip.encode_image(pixels, prompts, position="front")
    x_end = _layer_inputs(siglip, lambda: siglip.encode_image(pixels, prompts, position="end"))[0]
    x_front = _layer_inputs(siglip, lambda: siglip.encode_image(pixels, prompts, position="front"))[0]
    assert x_end.shape == x_front.shape == (2, n_patches + n, siglip.vision_width)
    torch.testing.assert_close(x_end[:, :n_patches], patches)
    torch.testing.assert_close(x_end[:, n_patches:], prompts.tokens[0].expand(2, -1, -1))
    torch.testing.assert_close(x_front[:, :n], prompts.tokens[0].expand(2, -1, -1))
    torch.testing.assert_close(x_front[:, n:], patches)
    torch.testing.assert_close(end, front, atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="position"):
        siglip.encode_image(pixels, prompts, position="middle")


@pytest.mark.parametrize("position", ["end", "front"])
def test_deep_image_prompt_replaces_at_later_layers(siglip, pixels, position):
    first, second, third = _prompts(siglip, "image", 2, depth=3, seed=3).tokens

    def run(*layers: torch.Tensor) -> torch.Tensor:
        return siglip.encode_image(pixels, DeepPrompts(list(layers)), position=position)

    with torch.no_grad():
        shallow, deep, other = run(first), run(first, second), run(first, third)
    assert not torch.allclose(shallow, deep, atol=1e-4) and not torch.allclose(deep, other, atol=1e-4)
    inputs = _layer_inputs(siglip, lambda: run(first, second))
    at = slice(0, 2) if position == "front" else slice(-2, None)
    torch.testing.assert_close(inputs[1][:, at], second.expand(2, -1, -1))  # layer 1's input: replaced


def test_image_prompts_validation(siglip, pixels):
    with pytest.raises(ValueError, match="lower the prompt depth"):
        siglip.encode_image(pixels, _prompts(siglip, "image", 2, depth=siglip.vision_layers + 1))
    with pytest.raises(ValueError, match="expected"):
        siglip.encode_image(pixels, DeepPrompts([torch.randn(2, siglip.vision_width + 1)]))


# ----------------------------------------------------------------------------- APT's blocks, DPT's transient tokens
class _ScaleBlocks:
    def __init__(self) -> None:
        self.layers: list[int] = []

    def __call__(self, layer: int, x: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        self.layers.append(layer)
        return attn_out * 1.5


class _Transient:
    def __init__(self, width: int, layer: int = 1, n: int = 3) -> None:
        self.width, self.layer, self.n = width, layer, n
        self.seen: list[tuple[int, tuple[int, ...]]] = []

    def tokens(self, layer: int, hidden: torch.Tensor) -> torch.Tensor | None:
        if layer != self.layer:
            return None
        return torch.randn(hidden.shape[0], self.n, self.width, generator=torch.Generator().manual_seed(layer))

    def outputs(self, layer: int, out: torch.Tensor) -> None:
        self.seen.append((layer, tuple(out.shape)))


def test_block_hooks_change_both_towers_and_are_removed(siglip, pixels):
    with torch.no_grad():
        text_blocks, image_blocks = _ScaleBlocks(), _ScaleBlocks()
        changed_text = _text(siglip, block=text_blocks)
        changed_image = siglip.encode_image(pixels, block=image_blocks)
        plain_text, plain_image = _text(siglip), siglip.encode_image(pixels)
    assert text_blocks.layers == list(range(siglip.text_layers))
    assert image_blocks.layers == list(range(siglip.vision_layers))
    assert not torch.allclose(changed_text, plain_text, atol=1e-4)
    assert not torch.allclose(changed_image, plain_image, atol=1e-4)
    assert len(siglip.attention_blocks("text")) == siglip.text_layers
    assert all(not block._forward_hooks for block in siglip.attention_blocks("image"))


def test_transient_tokens_run_one_layer_and_change_features(siglip, pixels):
    transient = _Transient(siglip.vision_width)
    with torch.no_grad():
        changed = siglip.encode_image(pixels, transient=transient)
        plain = siglip.encode_image(pixels)
    assert transient.seen == [(1, (2, 3, siglip.vision_width))]
    assert not torch.allclose(changed, plain, atol=1e-4)


# ----------------------------------------------------------------------------- scoring and loss
def test_loss_is_the_per_class_sigmoid_loss(siglip):
    logits = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 2, 1, 2])
    targets = torch.nn.functional.one_hot(labels, 3).float()
    by_hand = -(targets * torch.log(torch.sigmoid(logits)) + (1 - targets) * torch.log(1 - torch.sigmoid(logits)))
    torch.testing.assert_close(siglip.loss(logits, labels), by_hand.sum(-1).mean())
    torch.testing.assert_close(siglip.probabilities(logits), torch.sigmoid(logits))


def test_logit_scale_and_bias_are_the_models(siglip):
    torch.testing.assert_close(siglip.logit_scale, siglip.model.logit_scale.exp())
    assert siglip.logit_bias is siglip.model.logit_bias


def test_joint_space_is_refused_with_the_reason(siglip):
    with pytest.raises(UnsupportedBackboneError, match="attention-pooling head"):
        siglip.joint_space()


# ----------------------------------------------------------------------------- loading and identity
@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory):
    return save_random_siglip(tmp_path_factory.mktemp("siglip_tiny"), "siglip-tiny")


def test_saved_folder_round_trips(siglip, siglip_dir, pixels):
    loaded = load_backbone(siglip_dir)
    assert type(loaded) is SiglipBackbone
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_texts(TEXTS), siglip.encode_texts(TEXTS), atol=ATOL, rtol=0)
        torch.testing.assert_close(loaded.encode_image(pixels), siglip.encode_image(pixels), atol=ATOL, rtol=0)
    assert loaded.tokenize(TEXTS).input_ids.equal(siglip.tokenize(TEXTS).input_ids)
    assert tuple(loaded.image_processor.image_mean) == (0.5, 0.5, 0.5)
    identity = loaded.identity
    assert identity["family"] == "siglip" and identity["name_or_path"] == str(siglip_dir)
    assert identity["config_hash"] == siglip.identity["config_hash"]


def test_identity_differs_from_tiny_clip(siglip):
    clip = load_backbone("random:tiny")
    assert siglip.identity["config_hash"] != clip.identity["config_hash"]
    assert siglip.identity["arch"]["model_type"] == "siglip"


def test_folder_without_tokenizer_is_refused(tmp_path):
    random_siglip_model("siglip-tiny").save_pretrained(tmp_path)  # weights + config only
    with pytest.raises(BackboneLoadError, match="tokenizer"):
        load_backbone(tmp_path)


def test_folder_config_without_weights_is_refused(tmp_path):
    random_siglip_model("siglip-tiny").config.save_pretrained(tmp_path)
    with pytest.raises(BackboneLoadError, match="weights"):
        load_backbone(tmp_path)


def test_folder_without_image_processor_loads_without_one(tmp_path):
    from vlprompt.backbones.siglip_presets import siglip_tokenizer

    random_siglip_model("siglip-tiny").save_pretrained(tmp_path)
    siglip_tokenizer(64).save_pretrained(tmp_path)
    assert load_backbone(tmp_path).image_processor is None


def test_sentencepiece_tokenizer_without_the_package_names_the_fix(tmp_path):
    import importlib.util
    import json

    if importlib.util.find_spec("sentencepiece") is not None:
        pytest.skip("sentencepiece is installed")
    random_siglip_model("siglip-tiny").save_pretrained(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "SiglipTokenizer"}))
    (tmp_path / "spiece.model").write_bytes(b"")
    with pytest.raises(BackboneLoadError, match="pip install sentencepiece"):
        load_backbone(tmp_path)


# ----------------------------------------------------------------------------- SigLIP 2 (NaFlex) at a fixed size
def test_siglip2_features_equal_the_models(siglip2, pixels):
    patches, spatial_shapes = patchify(pixels, siglip2.patch_size)
    mask = torch.ones(patches.shape[:2], dtype=torch.long)
    tokens = siglip2.tokenize(TEXTS)
    with torch.no_grad():
        image = siglip2.model.get_image_features(pixel_values=patches, pixel_attention_mask=mask,
                                                 spatial_shapes=spatial_shapes).pooler_output  # fmt: skip
        text = siglip2.model.get_text_features(input_ids=tokens.input_ids).pooler_output
        torch.testing.assert_close(siglip2.encode_image(pixels), image, atol=ATOL, rtol=0)
        torch.testing.assert_close(siglip2.encode_texts(TEXTS), text, atol=ATOL, rtol=0)
        prompted = siglip2.encode_image(pixels, _prompts(siglip2, "image", 2))
    assert siglip2.family == "siglip2" and siglip2.image_size == 32
    assert not torch.allclose(prompted, siglip2.encode_image(pixels), atol=1e-4)


def test_patchify_matches_the_siglip2_image_processor_layout():
    from transformers.models.siglip2.image_processing_pil_siglip2 import convert_image_to_patches

    image = torch.randn(3, 16, 24)
    ours, shapes = patchify(image.unsqueeze(0), 8)
    theirs = convert_image_to_patches(image.numpy(), 8)
    torch.testing.assert_close(ours[0], torch.from_numpy(theirs))
    assert shapes.tolist() == [[2, 3]]


def test_siglip2_folder_round_trips_with_a_square_processor(siglip2, tmp_path, pixels):
    loaded = load_backbone(save_random_siglip(tmp_path, "siglip2-tiny"))
    assert type(loaded) is Siglip2Backbone
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(pixels), siglip2.encode_image(pixels), atol=ATOL, rtol=0)
    size = loaded.image_processor.size
    assert (size.height, size.width) == (32, 32)
    assert loaded.identity["config_hash"] != load_backbone("random:siglip-tiny").identity["config_hash"]


# ----------------------------------------------------------------------------- every classification method
def _classification_methods() -> list[str]:
    from vlprompt.methods import METHODS

    return [name for name, spec in METHODS.items() if spec.method_class.task == "classification"]


@pytest.mark.parametrize("name", _classification_methods())
def test_every_classification_method_runs_or_is_refused(siglip, pixels, name):
    from vlprompt.methods import get_prompt_model, method_class

    classnames = ["cat", "dog", "red car"]
    if "linear_projections" in method_class(name).required_sites:  # SDPT
        with pytest.raises(UnsupportedBackboneError, match="attention-pooling head"):
            get_prompt_model(siglip, name, classnames)
        return
    method = get_prompt_model(siglip, name, classnames)  # a linear probe runs on its initial head (no fitting)
    method.eval()
    with torch.no_grad():
        logits = method(pixel_values=pixels)
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()
