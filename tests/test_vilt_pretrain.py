"""Pretraining the toy ViLT (pretraining/vilt_pretrain.py): what it starts from, what it masks, what it saves."""
from __future__ import annotations

import json

import pytest
import torch

from vlprompt.assets import embedded_model_path
from vlprompt.backbones.vilt import ViltBackbone
from vlprompt.pretraining.vilt_pretrain import (
    SPECIAL_TOKENS,
    ZERO_SHOT_FILE,
    ViltPretrainConfig,
    build_model,
    init_from_clip_vision,
    mask_tokens,
    pretrain_vilt,
    rank_output_from_itm,
    write_wordpiece_tokenizer,
)

TINY = dict(n_pairs=64, width=32, layers=2, heads=2, intermediate=64, batch_size=8, steps=3, warmup_steps=1,
            init_from_clip=False, vocab_captions=50, log_every=1, eval_retrieval_images=2)  # fmt: skip


def test_vilt_blocks_started_from_the_toy_clip_compute_its_image_blocks(tmp_path):
    from transformers import CLIPModel

    config = ViltPretrainConfig()  # the shipped size: the toy CLIP's image tower
    model, _ = build_model(config, vocab_size=40)
    init_from_clip_vision(model.vilt, embedded_model_path("embedded"))
    clip = CLIPModel.from_pretrained(str(embedded_model_path("embedded"))).vision_model.eval()
    model.eval()
    x = torch.randn(2, 17, config.width)
    for clip_layer, vilt_layer in zip(clip.encoder.layers, model.vilt.encoder.layer):
        expected = clip_layer(x, None)
        expected = expected[0] if isinstance(expected, tuple) else expected
        got = vilt_layer(x)
        got = got[0] if isinstance(got, tuple) else got
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        x = expected
    torch.testing.assert_close(model.vilt.embeddings.patch_embeddings.projection.weight,
                               clip.embeddings.patch_embedding.weight)  # fmt: skip


def test_a_clip_of_another_size_is_refused():
    model, _ = build_model(ViltPretrainConfig(**TINY), vocab_size=40)
    with pytest.raises(ValueError, match="set init_from_clip=false or match layers"):
        init_from_clip_vision(model.vilt, embedded_model_path("embedded"))


def test_masking_touches_only_word_tokens_and_labels_only_what_it_masked():
    ids = torch.tensor([[2, 10, 11, 12, 13, 3, 0, 0]] * 200)
    mask = (ids != 0).long()
    masked, labels = mask_tokens(ids, mask, 0.5, mask_id=4, vocab_size=30, first_word_id=len(SPECIAL_TOKENS),
                                 generator=torch.Generator().manual_seed(0))  # fmt: skip
    chosen = labels != -100
    assert not chosen[:, [0, 5, 6, 7]].any()  # [CLS], [SEP] and padding are never masked
    assert torch.equal(labels[chosen], ids[chosen])
    assert torch.equal(masked[~chosen], ids[~chosen])
    share_masked = (masked[chosen] == 4).float().mean().item()
    assert 0.7 < share_masked < 0.9  # BERT's 80% [MASK]
    assert 0.4 < chosen[:, 1:5].float().mean().item() < 0.6


def test_the_rank_output_keeps_the_itm_heads_match_probability():
    itm = torch.nn.Linear(8, 2)
    rank = rank_output_from_itm(itm)
    pooled = torch.randn(5, 8)
    torch.testing.assert_close(torch.sigmoid(rank(pooled)).squeeze(-1), itm(pooled).softmax(-1)[:, 1])


def test_the_tokenizer_spells_out_words_it_does_not_know(tmp_path):
    tok = write_wordpiece_tokenizer(tmp_path, ["red", "star"], max_length=16)
    ids = tok("a red zebra star")["input_ids"]
    assert tok.unk_token_id not in ids
    assert tok.convert_ids_to_tokens(ids)[2] == "red"


def test_a_tiny_pretraining_writes_a_vilt_folder_the_backbone_loads(tmp_path):
    out = pretrain_vilt(ViltPretrainConfig(**TINY), tmp_path / "model", tmp_path / "cache", log=lambda _: None)
    backbone = ViltBackbone.from_pretrained(out)
    assert backbone.width == 32 and backbone.num_layers == 2
    zero_shot = json.loads((out / ZERO_SHOT_FILE).read_text())
    assert {"i2t_r1", "t2i_r1", "i2t_r10"} <= set(zero_shot) and zero_shot["images"] == 2
    assert json.loads((out / "pretrain_config.json").read_text())["steps"] == 3
    assert not (out / "tokenizer_src").exists()
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert "rank_output.weight" in f.keys()


@pytest.mark.parametrize("field, value, message", [
    ("steps", 0, "steps must be a positive integer"),
    ("itm_negatives", 1.5, "itm_negatives must be a number in its range"),
    ("width", 31, "width 31 a multiple of heads"),
    ("batch_size", 1000, "larger than the corpus"),
])  # fmt: skip
def test_bad_pretraining_values_are_named(field, value, message):
    with pytest.raises(ValueError, match=message):
        ViltPretrainConfig(**{**TINY, field: value})


def test_the_shipped_toy_vilt_loads_by_name_and_matches_captions_to_their_images():
    from vlprompt.backbones import load_backbone
    from vlprompt.pretraining.vilt_pretrain import retrieval_test_set
    from vlprompt.recipes import carried_recipe

    backbone = load_backbone("embedded-vilt")
    assert isinstance(backbone, ViltBackbone) and backbone.matching_head() is not None
    assert carried_recipe("embedded-vilt").name == "toy"
    images, captions, owners = retrieval_test_set(8, backbone.image_size)
    tokens = backbone.tokenize(captions)
    mask = (torch.arange(tokens.input_ids.shape[1]) < tokens.lengths.unsqueeze(1)).long()
    with torch.no_grad():
        _, pooled = backbone.encode(tokens.input_ids, mask, torch.stack([images[i] for i in owners.tolist()]))
        own = backbone.matching_head()(pooled).squeeze(-1)
        shifted = torch.stack([images[(i + 1) % 8] for i in owners.tolist()])  # every caption with another image
        _, pooled = backbone.encode(tokens.input_ids, mask, shifted)
        other = backbone.matching_head()(pooled).squeeze(-1)
    assert (own > other).float().mean() > 0.8  # pretrained matching: 40 captions, each with its image and another
