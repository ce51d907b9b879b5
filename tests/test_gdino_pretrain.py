"""Pretraining the toy Grounding DINO (pretraining/gdino_pretrain.py): labels, learning, what it saves, its config."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vlprompt.backbones import load_backbone
from vlprompt.backbones.grounding_dino_presets import bert_tokenizer
from vlprompt.pretraining.gdino_pretrain import (
    ZERO_SHOT_FILE,
    DetectorPretrainConfig,
    PromptBuilder,
    build_detector,
    image_config_of,
    load_scene_cache,
    make_batch,
    pretrain_detector,
    sample_batch,
    save_detector,
    scene_cache,
)
from vlprompt.toyworld.world import SHAPES

MICRO = dict(n_scenes=16, swin_embed_dim=8, swin_heads=(1, 1, 2), text_width=16, text_heads=2, d_model=32, heads=2,
             ffn_dim=32, encoder_layers=1, decoder_layers=2, num_queries=8, n_points=2, batch_size=4, steps=2,
             warmup_steps=1, log_every=1, eval_every=0, eval_images=3, test_images=3, threads=1)  # fmt: skip


@pytest.fixture(scope="module")
def micro_scenes(tmp_path_factory):
    config = DetectorPretrainConfig(**MICRO)
    return config, load_scene_cache(scene_cache(config, tmp_path_factory.mktemp("gdino_cache")))


def _batch(config, images, objects, seed=0):
    tokenizer = bert_tokenizer()
    prompts = PromptBuilder(tokenizer, config.shapes)
    mapping = {SHAPES.index(s): k for k, s in enumerate(config.shapes)}
    generator = torch.Generator().manual_seed(seed)
    index, flips, orders = sample_batch(generator, len(images), config.batch_size, len(config.shapes), True)
    return make_batch(images, objects, index, flips, orders, mapping, prompts, image_config_of(config)), orders, index


def test_scenes_hold_no_held_out_shape_and_labels_point_at_each_object_s_phrase(micro_scenes):
    config, (images, objects) = micro_scenes
    held = {SHAPES.index(s) for s in config.holdout_shapes}
    assert images.shape == (16, 64, 64, 3) and all(o[0] not in held for objs in objects for o in objs)
    batch, orders, index = _batch(config, images, objects)
    tokenizer = bert_tokenizer()
    for row, (order, i) in enumerate(zip(orders, index.tolist())):
        # the phrase a label names (its place in this image's prompt) is the object's shape
        text = tokenizer.decode(batch["input_ids"][row][batch["attention_mask"][row].bool()], skip_special_tokens=True)
        phrases = [p.strip() for p in text.split(".") if p.strip()]
        assert phrases == [config.shapes[c] for c in order]
        got = sorted(phrases[k] for k in batch["labels"][row]["class_labels"].tolist())
        assert got == sorted(SHAPES[o[0]] for o in objects[i])
        boxes = batch["labels"][row]["boxes"]
        assert ((boxes > 0) & (boxes <= 1)).all()


def test_a_few_steps_reduce_the_loss_on_a_fixed_batch(micro_scenes):
    config, (images, objects) = micro_scenes
    torch.manual_seed(0)
    model = build_detector(config, len(bert_tokenizer())).train()
    batch, _, _ = _batch(config, images, objects)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(6):
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.8 * losses[0], losses


def test_a_saved_detector_loads_through_the_project_loader_with_identical_outputs(micro_scenes, tmp_path):
    config, (images, objects) = micro_scenes
    model = build_detector(config, len(bert_tokenizer())).eval()
    save_detector(model, bert_tokenizer(), image_config_of(config), tmp_path)
    backbone = load_backbone(str(tmp_path))
    assert backbone.image_config == image_config_of(config)
    batch, _, _ = _batch(config, images, objects)
    prompt = backbone.category_prompt(config.shapes)
    pixels = batch["pixel_values"]
    with torch.no_grad():
        loaded = backbone.detect(pixels, prompt)
        ids = prompt.input_ids.unsqueeze(0).expand(len(pixels), -1)
        fresh = model(pixel_values=pixels, input_ids=ids, attention_mask=torch.ones_like(ids))
    torch.testing.assert_close(loaded.logits, fresh.logits, rtol=0, atol=0)
    torch.testing.assert_close(loaded.pred_boxes, fresh.pred_boxes, rtol=0, atol=0)


def test_pretraining_writes_a_model_folder_and_repeats_exactly(tmp_path):
    cache = tmp_path / "cache"
    first = pretrain_detector(DetectorPretrainConfig(**MICRO), tmp_path / "a", cache, log=lambda _: None)
    second = pretrain_detector(DetectorPretrainConfig(**MICRO), tmp_path / "b", cache, log=lambda _: None)
    for name in ("config.json", "model.safetensors", "preprocessor_config.json", "pretrain_config.json",
                 "pretrain_log.json", ZERO_SHOT_FILE):  # fmt: skip
        assert (first / name).is_file(), name
    zero_shot = json.loads((first / ZERO_SHOT_FILE).read_text())
    assert zero_shot["split"] == "test" and zero_shot["n"] == 3 and 0 <= zero_shot["mAP"] <= 100
    assert zero_shot["categories"] == DetectorPretrainConfig(**MICRO).shapes
    a = json.loads((first / "pretrain_log.json").read_text())["train"]
    b = json.loads((second / "pretrain_log.json").read_text())["train"]
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert (first / "model.safetensors").read_bytes() == (second / "model.safetensors").read_bytes()


@pytest.mark.parametrize("values, message", [
    (dict(d_model=96, heads=5), "d_model 96 must be a multiple of its heads 5"),
    (dict(d_model=48), "d_model 48 must be a multiple of 32"),
    (dict(holdout_shapes=("circle", "blob")), "unknown: ['blob']"),
    (dict(domains={"clean": 0.5, "sketch": 0.5}), "held out of pretraining"),
    (dict(lr=-1.0), "lr must be a positive number"),
    (dict(steps=0), "steps must be an integer >= 1"),
    (dict(swin_out_indices=(2, 4)), "swin_out_indices [2, 4] must be increasing stage numbers 1..3"),
    (dict(num_feature_levels=2), "num_feature_levels 2 must be >="),
    (dict(kinds={"multi": 1.0, "crowd": 1.0}), "kinds: unknown ['crowd']"),
])  # fmt: skip
def test_the_config_refuses_bad_values_in_one_line(values, message):
    with pytest.raises(ValueError) as err:
        DetectorPretrainConfig(**values)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_lists_from_the_command_line_become_tuples():
    config = DetectorPretrainConfig(swin_depths=[1, 1, 1], holdout_shapes=["star"])
    assert config.swin_depths == (1, 1, 1) and "star" not in config.shapes and len(config.shapes) == 14
    assert np.isclose(sum(config.kinds.values()), 1.0)


def test_class_loss_weight_one_is_the_detector_s_own_total(micro_scenes):
    from vlprompt.pretraining.gdino_pretrain import weighted_loss

    config, (images, objects) = micro_scenes
    model = build_detector(config, len(bert_tokenizer())).train()
    batch, _, _ = _batch(config, images, objects)
    with torch.no_grad():
        out = model(**batch)
    torch.testing.assert_close(weighted_loss(out.loss_dict, model.config, 1.0), out.loss)
    class_terms = sum(v for k, v in out.loss_dict.items() if k.startswith("loss_ce"))
    torch.testing.assert_close(weighted_loss(out.loss_dict, model.config, 3.0), out.loss + 4.0 * class_terms)


def test_the_shipped_toy_detector_loads_by_name_and_finds_its_pretraining_shapes(tmp_path):
    from vlprompt.backbones.grounding_dino import GroundingDinoBackbone
    from vlprompt.data.coco import load_detection_dataset
    from vlprompt.methods import get_prompt_model
    from vlprompt.recipes import carried_recipe
    from vlprompt.tasks.detection import evaluate_detection
    from vlprompt.toyworld.corpus import write_detection_set

    backbone = load_backbone("embedded-detector")
    assert isinstance(backbone, GroundingDinoBackbone) and backbone.num_parameters() == 1_062_963
    assert carried_recipe("embedded-detector").name == "toy"
    stored = json.loads((backbone_folder("embedded-detector") / ZERO_SHOT_FILE).read_text())
    shapes = stored["categories"]  # the 12 pretraining shapes, as the build scored them
    write_detection_set(tmp_path / "test", 24, seed=12345, size=64, shapes=shapes)
    splits = load_detection_dataset(f"coco:{tmp_path}", categories=shapes)
    method = get_prompt_model(backbone, "det_zeroshot", splits.categories)
    result = evaluate_detection(method, splits.split("test"), splits.category_ids, splits.categories)
    assert result["mAP"] > 40, result  # the build scored 66.2 on 300 such scenes; a random detector scores about 0


def backbone_folder(name: str):
    from vlprompt.recipes import model_folder

    return model_folder(name)
