"""SDPT native and its baselines on a small randomly initialised Grounding DINO; COCO-format data and COCO mAP."""
from __future__ import annotations

import json
import re
import shutil

import pytest
import torch

from vlprompt.backbones import UnsupportedBackboneError, load_backbone
from vlprompt.backbones.grounding_dino_presets import random_grounding_dino_backbone
from vlprompt.data import DatasetError
from vlprompt.data.coco import (
    DetectionDataset,
    coco_ground_truth,
    coco_map,
    collate_detection,
    few_shot_detection,
    load_detection_dataset,
    write_toy_detection,
)
from vlprompt.engine import CheckpointError, TrainingError
from vlprompt.engine.checkpoint import load_prompt, save_prompt
from vlprompt.methods import METHODS, MethodConfigError, get_prompt_model

CATEGORIES = ["circle", "square", "star"]


@pytest.fixture(scope="module")
def detector():
    """Frozen micro Grounding DINO (d_model 32, E = 32); tests must not change its weights."""
    return load_backbone("random:grounding-dino-micro")


@pytest.fixture(scope="module")
def toy_det(tmp_path_factory):
    """Toy-world scenes in COCO format: 8 train, 4 val, 6 test images of 64 px."""
    return write_toy_detection(tmp_path_factory.mktemp("toydet"), 8, 4, 6, size=64, seed=0)


@pytest.fixture(scope="module")
def batch(detector, toy_det):
    splits = load_detection_dataset(f"coco:{toy_det}")
    dataset = DetectionDataset(splits.train[:4], detector.image_config)
    pixels, mask, targets = collate_detection([dataset[i] for i in range(4)])
    return splits, pixels, mask, targets


def sdpt(backbone, categories=CATEGORIES, **options):
    torch.manual_seed(0)
    return get_prompt_model(backbone, "sdpt_native", categories, config=options)


def raw_outputs(backbone, method, pixels, mask):
    """The detector called directly (no hooks) with the same prompt ids."""
    ids = method.text.input_ids.unsqueeze(0).expand(pixels.shape[0], -1)
    return backbone.model(pixel_values=pixels, input_ids=ids, attention_mask=torch.ones_like(ids), pixel_mask=mask)


# ------------------------------------------------------------------------------------------------ SDPT native
@torch.no_grad()
def test_zero_prototypes_leave_the_detector_unchanged(detector, batch):
    _, pixels, mask, _ = batch
    method = sdpt(detector, n_prototypes=0)
    assert method.num_trainable() == 0
    out = method(pixels, mask)
    ref = raw_outputs(detector, method, pixels, mask)
    assert torch.equal(out.logits, ref.logits) and torch.equal(out.pred_boxes, ref.pred_boxes)
    with_k = sdpt(detector, n_prototypes=4)(pixels, mask)
    assert not torch.allclose(with_k.pred_boxes, ref.pred_boxes)


@pytest.mark.parametrize("ffn, exact", [(64, True), (32, True), (128, False)])
def test_preimages_reproduce_prototypes(ffn, exact):
    """E = ffn // 2 vs d_model 32: E <= 32 is exact; E = 64 > 32 is the least-squares solution."""
    backbone = random_grounding_dino_backbone("grounding-dino-micro", encoder_ffn_dim=ffn)
    method = sdpt(backbone, n_prototypes=5)
    for slot, layer in enumerate(method.layers):
        site = backbone.fusion_site(layer)
        p = method.prototypes[slot].detach().double()
        v, t = (x.detach().double() for x in method.prototype_tokens(slot))
        for tokens, linear in ((v, site.vision_query), (t, site.text_key)):
            w, b = linear.weight.double(), linear.bias.double()
            forward = tokens @ w.t() + b
            if exact:
                assert torch.allclose(forward, p, atol=1e-4)
            else:
                assert not torch.allclose(forward, p, atol=1e-2)  # E > width: not every P has a pre-image
                # normal equations: the residual is orthogonal to the projection's range ...
                assert torch.allclose((forward - p) @ w, torch.zeros_like(tokens), atol=1e-4)
                # ... so the forward projection is the least-squares fit (same as lstsq's)
                best = torch.linalg.lstsq(w, (p - b).t()).solution.t()
                assert torch.allclose(forward, best @ w.t() + b, atol=1e-4)


def _attention_probe(backbone, layer=0):
    """Record the raw (unsliced) attention weights of one fusion layer: this hook runs before the adapter's."""
    seen = {}

    def hook(module, args, kwargs, output):
        (_, v_w), (_, t_w) = output
        seen["vision"], seen["text"] = v_w.detach(), t_w.detach()

    attn = backbone.model.model.encoder.layers[layer].fusion_layer.attn
    return seen, attn.register_forward_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("masked", [False, True])
@torch.no_grad()
def test_image_queries_attend_to_text_prototypes_unless_masked(detector, batch, masked):
    _, pixels, mask, _ = batch
    k = 3
    method = sdpt(detector, n_prototypes=k, mask_text_prototypes=masked)
    seen, handle = _attention_probe(detector)
    try:
        method(pixels, mask)
    finally:
        handle.remove()
    n_text = method.text.input_ids.numel()
    vision, text = seen["vision"], seen["text"]  # (B*h, N_v + K, N_t + K), (B*h, N_t + K, N_v + K)
    n_vision = vision.shape[1] - k
    assert vision.shape[2] == n_text + k and text.shape[1] == n_text + k
    to_text_prototypes = vision[:, :n_vision, n_text:].sum(-1)
    if masked:
        assert torch.all(to_text_prototypes == 0)
    else:
        assert torch.all(to_text_prototypes > 0)
    assert torch.all(text[:, :n_text, n_vision:].sum(-1) > 0)  # text queries always see the vision prototypes


@torch.no_grad()
def test_masked_text_prototypes_have_no_effect(detector, batch):
    """Released behaviour: with the text-side prototypes masked, only the vision-side ones change anything."""
    from vlprompt.backbones.base import FusionTokens

    _, pixels, mask, _ = batch
    method = sdpt(detector, n_prototypes=4, mask_text_prototypes=True)
    out = method(pixels, mask)

    def vision_only(layer):
        v, _ = method.prototype_tokens(method.layers.index(layer))
        return FusionTokens(vision=v)

    ref = detector.detect(pixels, method.text, pixel_mask=mask, fusion=vision_only)
    assert torch.allclose(out.pred_boxes, ref.pred_boxes, atol=1e-6)


def test_only_prototypes_train(detector, batch):
    splits, pixels, mask, targets = batch
    method = sdpt(detector, splits.categories, n_prototypes=4, layers=[1])
    assert set(method.prompt_parameters()) == {"prototypes"}
    assert method.num_trainable() == 1 * 4 * detector.fusion_site(1).embed_dim
    assert not any(p.requires_grad for p in detector.model.parameters())
    method.train()
    assert not detector.model.training  # the detector keeps eval behaviour
    method(pixels, mask, labels=targets).loss.backward()
    assert method.prototypes.grad is not None and method.prototypes.grad.abs().sum() > 0
    assert all(p.grad is None for p in detector.model.parameters())


@torch.no_grad()
def test_batch_of_several_images(detector, batch):
    _, pixels, mask, _ = batch
    for masked in (False, True):
        method = sdpt(detector, n_prototypes=4, mask_text_prototypes=masked)
        scores, boxes = method.predict(pixels, mask)
        assert scores.shape == (4, detector.model.config.num_queries, len(CATEGORIES))
        for i in range(pixels.shape[0]):
            s, b = method.predict(pixels[i : i + 1], mask[i : i + 1])
            assert torch.allclose(s, scores[i : i + 1], atol=1e-5) and torch.allclose(b, boxes[i : i + 1], atol=1e-5)


def test_loss_falls_fitting_toy_scenes(detector, batch):
    splits, pixels, mask, targets = batch
    method = sdpt(detector, splits.categories, n_prototypes=8)
    optimizer = torch.optim.Adam([method.prototypes], lr=0.05)
    losses = []
    for _ in range(12):
        loss = method(pixels, mask, labels=targets).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert min(losses[-3:]) < 0.8 * losses[0], losses


def test_pseudo_inverses_are_computed_once():
    backbone = load_backbone("random:grounding-dino-micro")  # its weights are changed below
    method = sdpt(backbone, n_prototypes=2)
    pixels = torch.randn(2, 3, 64, 64)
    assert method.pinv_computations() == 0
    for _ in range(3):
        method(pixels).pred_boxes.sum().backward()
    per_projection = 2 * len(method.layers)  # vision query + text key per layer
    assert method.pinv_computations() == per_projection
    with torch.no_grad():  # a changed projection weight is noticed and only that pre-image is recomputed
        backbone.fusion_site(0).vision_query.weight.mul_(1.5)
    method(pixels)
    assert method.pinv_computations() == per_projection + 1


@torch.no_grad()
def test_save_load_gives_identical_outputs(detector, batch, tmp_path):
    _, pixels, mask, _ = batch
    method = sdpt(detector, n_prototypes=4, init="normal", init_scale=0.5)
    save_prompt(tmp_path / "run", method)
    files = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert files == ["prompt.safetensors", "prompt_config.json"]
    fresh = load_backbone("random:grounding-dino-micro")
    loaded = load_prompt(tmp_path / "run", fresh)
    assert loaded.config == method.config and loaded.classnames == CATEGORIES
    a, b = method.predict(pixels, mask), loaded.predict(pixels, mask)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # another architecture or family is refused, naming what differs
    with pytest.raises(CheckpointError, match="encoder_ffn_dim"):
        load_prompt(tmp_path / "run", random_grounding_dino_backbone("grounding-dino-micro", encoder_ffn_dim=128))
    with pytest.raises(CheckpointError, match="clip"):
        load_prompt(tmp_path / "run", load_backbone("random:tiny"))


def test_mm_grounding_dino_shares_the_adapter():
    backbone = load_backbone("random:mm-grounding-dino-micro")
    assert backbone.family == "mm-grounding-dino"
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        zero = sdpt(backbone, n_prototypes=0)(pixels)
        ref = raw_outputs(backbone, sdpt(backbone, n_prototypes=0), pixels, None)
        assert torch.equal(zero.pred_boxes, ref.pred_boxes)
        assert not torch.allclose(sdpt(backbone, n_prototypes=4)(pixels).pred_boxes, ref.pred_boxes)


def test_config_errors(detector):
    with pytest.raises(MethodConfigError, match=r"det_lora.target_modules '\(\[' is not a valid regular expression"):
        get_prompt_model(detector, "det_lora", ["circle"], config={"target_modules": "(["})
    with pytest.raises(MethodConfigError, match="layers"):
        sdpt(detector, layers=[0, 5])
    with pytest.raises(MethodConfigError, match="layers"):
        sdpt(detector, layers="some")
    with pytest.raises(MethodConfigError, match="n_prototypes"):
        sdpt(detector, n_prototypes=-1)
    with pytest.raises(MethodConfigError, match="options"):
        sdpt(detector, prototypes=3)
    with pytest.raises(ValueError, match="phrase"):
        sdpt(detector, ["dog. cat"])


# ------------------------------------------------------------------------------------------------ baselines
def test_baselines_train_what_they_say(batch):
    splits, pixels, mask, targets = batch
    counts = {}
    for name in ("det_zeroshot", "det_coop", "det_lang_prompt", "det_fusion_prompt", "det_heads", "det_full",
                 "det_lora"):
        backbone = load_backbone("random:grounding-dino-micro")  # fresh: weight methods unfreeze / inject
        torch.manual_seed(0)
        method = get_prompt_model(backbone, name, splits.categories)
        counts[name] = method.num_trainable()
        if counts[name]:
            method(pixels, mask, labels=targets).loss.backward()
            trained = method.prompt_parameters()
            with_grad = [p.grad is not None for p in trained.values()]
            # weight methods: transformers detaches the two-stage proposal boxes, so that head gets no gradient
            all_learn = ("det_coop", "det_lang_prompt", "det_fusion_prompt", "det_lora")
            assert all(with_grad) if name in all_learn else any(with_grad), name
            others = [p for p in backbone.model.parameters() if all(p is not q for q in trained.values())]
            assert all(p.grad is None for p in others), name
        if name == "det_lora":
            assert all("lora_" in n for n in method.prompt_parameters())
    site = backbone.fusion_site(0)
    layers = backbone.fusion_layers
    assert counts["det_zeroshot"] == 0
    assert counts["det_coop"] == 4 * backbone.text_width
    assert counts["det_lang_prompt"] == backbone.max_text_len * backbone.text_width
    assert counts["det_fusion_prompt"] == layers * 16 * (site.vision_dim + site.text_dim)
    assert counts["det_heads"] == sum(p.numel() for p in backbone.named_weights("heads").values())
    assert counts["det_full"] == backbone.num_parameters()
    assert 0 < counts["det_lora"] < counts["det_full"]


@torch.no_grad()
def test_coop_context_fills_every_phrase(detector, batch):
    _, pixels, mask, _ = batch
    method = get_prompt_model(detector, "det_coop", CATEGORIES, config={"n_ctx": 2})
    ids, ctx = method.text.input_ids, method.text.context_index
    assert method.text.n_context == 2
    assert ctx.tolist().count(0) == ctx.tolist().count(1) == len(CATEGORIES)
    assert method.text.label_map.sum(1).tolist() == [2 + len(detector.phrase_ids(c)) for c in CATEGORIES]
    embeddings = detector.model.model.text_backbone.get_input_embeddings()
    with detector._context_hook(ctx, method.ctx):  # what the BERT embedding layer hands on during detect()
        words = embeddings(ids.unsqueeze(0))[0]
    assert torch.equal(words[ctx >= 0], method.ctx[ctx[ctx >= 0]])
    assert torch.equal(words[ctx < 0], embeddings.weight[ids[ctx < 0]])
    before = method.predict(pixels, mask)[0]
    method.ctx.add_(torch.randn_like(method.ctx))  # (a constant shift would vanish in BERT's LayerNorm)
    assert not torch.allclose(method.predict(pixels, mask)[0], before)


def test_language_prompt_starts_at_zero_shot_and_offsets_each_token_of_the_text_features(detector, batch):
    splits, pixels, mask, targets = batch
    zero_shot = get_prompt_model(detector, "det_zeroshot", splits.categories)
    method = get_prompt_model(detector, "language_prompt_v2", splits.categories)  # GLIP's name for it
    assert method.name == "det_lang_prompt" and not method.offset.any()
    with torch.no_grad():  # zero-initialised: exactly the frozen detector
        assert torch.equal(method.predict(pixels, mask)[0], zero_shot.predict(pixels, mask)[0])
    # what reaches the projection to d_model: the text encoder's output plus the offset row of each position
    positions = method.text.input_ids.numel()
    torch.manual_seed(0)
    offset = torch.randn_like(method.offset)
    seen = []
    # a forward hook sees the arguments the projection ran on, after the method's own pre-hook
    hook = detector.model.model.text_projection.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    try:
        with torch.no_grad():
            method.offset.copy_(offset)
            method(pixels, mask)
            method.offset.zero_()
            method(pixels, mask)
    finally:
        hook.remove()
    assert torch.allclose(seen[0] - seen[1], offset[:positions].expand_as(seen[0]), atol=1e-6)
    # the detector's loss trains the rows of the prompt's positions only
    method(pixels, mask, labels=targets).loss.backward()
    grad = method.offset.grad
    assert grad[:positions].abs().sum() > 0 and not grad[positions:].any()
    assert all(p.grad is None for p in detector.model.parameters())


def test_unsupported_pairs_fail_clearly(detector, tiny_backbone):
    # get_prompt_model refuses a method written for another kind of backbone, naming both kinds
    with pytest.raises(MethodConfigError, match="'sdpt_native' works on fusion detector models.*dual encoder model"):
        get_prompt_model(tiny_backbone, "sdpt_native", CATEGORIES)
    with pytest.raises(MethodConfigError, match="'coop' works on dual encoder models.*fusion detector model"):
        get_prompt_model(detector, "coop", CATEGORIES)
    # built directly, a method still names the site the backbone lacks
    sdpt_native, coop = METHODS["sdpt_native"].method_class, METHODS["coop"].method_class
    with pytest.raises(UnsupportedBackboneError, match="fusion_attention"):
        sdpt_native(tiny_backbone, sdpt_native.config_class(), CATEGORIES)
    with pytest.raises(UnsupportedBackboneError, match="text_sequence"):
        coop(detector, coop.config_class(), CATEGORIES)
    detection = {n for n, s in METHODS.items() if getattr(s.method_class, "task", "") == "detection"}
    assert {"sdpt_native", "det_coop", "det_lang_prompt", "det_fusion_prompt", "det_heads", "det_full",
            "det_lora"} <= detection
    for name in detection:
        assert not METHODS[name].method_class.required_sites <= tiny_backbone.sites
        assert METHODS[name].method_class.required_sites <= detector.sites


def test_nan_loss_stops_training(detector, toy_det, tmp_path):
    from vlprompt.engine.api import DataOptions, RunOptions
    from vlprompt.engine.trainer import TrainConfig, Trainer
    from vlprompt.tasks.detection import DetectionTask, load_detection_splits

    options = RunOptions(model="random:grounding-dino-micro", method="sdpt_native",
                         data=DataOptions(dataset=f"coco:{toy_det}", shots=1),
                         train=TrainConfig(epochs=1, batch_size=4))
    splits = load_detection_splits(options.data)
    method = sdpt(detector, splits.categories, n_prototypes=2)
    with torch.no_grad():
        method.prototypes.fill_(float("nan"))
    task = DetectionTask(splits, detector, augment=options.train.augment, few_shot=False)
    trainer = Trainer(options.train, tmp_path / "run", progress=False, log=lambda s: None)
    with pytest.raises(TrainingError, match="loss became nan"):
        trainer.fit(method, task)


# ------------------------------------------------------------------------------------------------ data
def test_few_shot_is_seeded_and_covers_categories(toy_det):
    splits = load_detection_dataset(f"coco:{toy_det}")
    a = few_shot_detection(splits.train, 1, seed=1, n_categories=len(splits.categories))
    b = few_shot_detection(splits.train, 1, seed=1, n_categories=len(splits.categories))
    c = few_shot_detection(splits.train, 2, seed=2, n_categories=len(splits.categories))
    assert [i.id for i in a] == [i.id for i in b]
    present = {label for img in splits.train for label in img.labels}
    assert present == {label for img in a for label in img.labels}  # every category shown is represented
    assert len(c) >= len(a)


def test_category_subset_and_errors(toy_det, tmp_path):
    splits = load_detection_dataset(f"coco:{toy_det}", categories=["star", "circle"])
    assert splits.categories == ["star", "circle"] and splits.category_ids == [11, 1]
    assert all(set(img.labels) <= {0, 1} for img in splits.train)
    with pytest.raises(DatasetError, match="unknown category names \\['zebra'\\]"):
        load_detection_dataset(f"coco:{toy_det}", categories=["zebra"])
    with pytest.raises(DatasetError, match="does not exist"):
        load_detection_dataset(f"coco:{tmp_path / 'nothing'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no COCO annotation file"):
        load_detection_dataset(f"coco:{tmp_path / 'empty'}")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"images": []}))
    with pytest.raises(DatasetError, match="lacks \\['annotations', 'categories'\\]"):
        load_detection_dataset(f"coco:{bad}")
    broken = shutil.copytree(toy_det / "test", tmp_path / "broken" / "test")
    data = json.loads((broken / "annotations.json").read_text())
    data["annotations"][0]["image_id"] = 999
    (broken / "annotations.json").write_text(json.dumps(data))
    with pytest.raises(DatasetError, match="image_id 999"):
        load_detection_dataset(f"coco:{broken.parent}")
    data["annotations"][0]["image_id"] = 1
    (broken / "annotations.json").write_text(json.dumps(data))
    (broken / data["images"][0]["file_name"]).unlink()
    with pytest.raises(DatasetError, match="missing"):
        load_detection_dataset(f"coco:{broken.parent}").test


def test_a_split_whose_images_are_missing_is_an_error_only_where_it_is_used(toy_det, tmp_path):
    """COCO is often downloaded as val2017/ and the annotations only: evaluating on val needs no training images."""
    root = shutil.copytree(toy_det, tmp_path / "data")
    shutil.rmtree(root / "train" / "images")
    splits = load_detection_dataset(f"coco:{root}")
    assert len(splits.split("val")) == len(load_detection_dataset(f"coco:{toy_det}").val)
    for use in (lambda: splits.train, lambda: splits.split("train")):
        with pytest.raises(DatasetError, match=r"image\(s\) listed in .*train.*annotations.json are missing"):
            use()
    splits.train = splits.val  # a split set anew (a few-shot draw) is what it was set to
    assert splits.train == splits.val


def test_a_numeric_category_name_is_read_as_its_text(toy_det, tmp_path):
    root = shutil.copytree(toy_det, tmp_path / "data")
    for split in ("train", "val", "test"):
        _edit_split(root, split, lambda d: d["categories"][0].__setitem__("name", 7))
    assert load_detection_dataset(f"coco:{root}").categories[0] == "7"


def test_categories_given_as_one_string_are_split_at_commas(toy_det):
    """`--set data.categories=star` gives a string: it is one name (or several, comma-separated), not its letters."""
    assert load_detection_dataset(f"coco:{toy_det}", categories="star").categories == ["star"]
    assert load_detection_dataset(f"coco:{toy_det}", categories="star,circle").categories == ["star", "circle"]


def test_boxes_of_zero_width_or_height_are_skipped_with_a_warning(toy_det, tmp_path):
    root = shutil.copytree(toy_det, tmp_path / "data")
    _edit_split(root, "test", lambda d: d["annotations"][0]["bbox"].__setitem__(2, 0))
    kept = sum(len(image.boxes) for image in load_detection_dataset(f"coco:{toy_det}").test)
    with pytest.warns(UserWarning, match=r"1 annotation\(s\) with a zero or negative box width or height are skipped"):
        splits = load_detection_dataset(f"coco:{root}")
    assert sum(len(image.boxes) for image in splits.test) == kept - 1  # and not scored in evaluation either


def test_boxes_reaching_past_their_image_are_said_as_corner_boxes_would_be(toy_det, tmp_path):
    root = shutil.copytree(toy_det, tmp_path / "data")

    def as_corners(data):  # [x, y, w, h] -> [x0, y0, x1, y1], a common mistake
        for annotation in data["annotations"]:
            x, y, w, h = annotation["bbox"]
            annotation["bbox"] = [x, y, x + w + 40, y + h + 40]

    _edit_split(root, "val", as_corners)
    with pytest.warns(UserWarning, match=r"val/annotations.json: \d+ box\(es\) reach more than 2.0 px past their "
                                         r"image, .*written as corners \[x0, y0, x1, y1\], convert them"):
        load_detection_dataset(f"coco:{root}")


def test_asking_more_shots_than_a_category_has_warns_naming_it(toy_det):
    from vlprompt.engine.api import DataOptions
    from vlprompt.tasks.detection import load_detection_splits

    with pytest.warns(UserWarning, match=r"categories have fewer than 50 training images \(.*using all of their"):
        splits = load_detection_splits(DataOptions(dataset=f"coco:{toy_det}", shots=50))
    assert len(splits.train) == len(load_detection_dataset(f"coco:{toy_det}").train)


def test_coco_map_of_perfect_and_shifted_detections(toy_det):
    splits = load_detection_dataset(f"coco:{toy_det}")
    gt = coco_ground_truth(splits.test, splits.category_ids, splits.categories)
    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
               for a in gt["annotations"]]
    result = coco_map(gt, perfect)
    assert result["mAP"] == pytest.approx(100.0) and result["AP50"] == pytest.approx(100.0)
    shifted = [dict(d, bbox=[d["bbox"][0] + 0.3 * d["bbox"][2], *d["bbox"][1:]]) for d in perfect]
    result = coco_map(gt, shifted)  # IoU ~0.54: counts at 0.5, not at 0.75
    assert result["AP50"] == pytest.approx(100.0) and result["AP75"] == 0.0 and 0 < result["mAP"] < 50


def test_det_lora_dropout_trains_while_the_detector_stays_in_eval_mode(batch):
    splits = batch[0]
    backbone = load_backbone("random:grounding-dino-micro")
    method = get_prompt_model(backbone, "det_lora", splits.categories, config={"dropout": 0.5}).train()
    dropouts = [m for n, m in backbone.model.named_modules() if n.endswith("lora_dropout")]
    assert dropouts and all(m.training for m in dropouts)
    others = [m for n, m in backbone.model.named_modules() if "lora_dropout" not in n]
    assert not any(m.training for m in others)
    method.eval()
    assert not any(m.training for m in backbone.model.modules())


# ------------------------------------------------------------------------------------------------ bad COCO input
def _edit_split(root, split, edit):
    path = root / split / "annotations.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def test_malformed_or_ambiguous_coco_files_are_named(toy_det, tmp_path):
    cases = [
        (lambda d: d["categories"][0].pop("name"), "is malformed (KeyError: 'name')"),
        (lambda d: d["annotations"][0].__setitem__("bbox", [1, None, 3, 4]), "is malformed"),
        (lambda d: d["categories"].append({"id": 999, "name": d["categories"][0]["name"].upper()}),
         "more than once (ignoring case)"),
        # JSON's NaN and Infinity: such a box was dropped in training but scored in evaluation
        (lambda d: d["annotations"][0]["bbox"].__setitem__(2, float("nan")), "nan, "),  # [x, y, nan, h]
        (lambda d: d["annotations"][0]["bbox"].__setitem__(3, float("inf")), "inf] is not finite: fix or remove it"),
        (lambda d: d.__setitem__("images", None), "'images' is NoneType; a COCO detection file holds lists"),
        (lambda d: d.__setitem__("annotations", {}), "'annotations' is dict"),
        (lambda d: d["annotations"].append(5), "the annotation entry 5 is malformed"),
        (lambda d: d["images"][1].__setitem__("id", d["images"][0]["id"]), "is used by more than one image"),
        (lambda d: d["categories"][0].__setitem__("name", None), "has the name None; each name must be non-empty"),
        (lambda d: d["categories"][0].__setitem__("name", " _ "), "has the name ' _ '; each name must be non-empty"),
    ]
    for i, (edit, message) in enumerate(cases):
        root = shutil.copytree(toy_det, tmp_path / str(i))
        _edit_split(root, "train", edit)
        with pytest.raises(DatasetError, match=re.escape(message)):
            load_detection_dataset(f"coco:{root}")
    with pytest.raises(DatasetError, match="listed more than once"):
        load_detection_dataset(f"coco:{toy_det}", categories=["circle", "circle"])


def test_an_overhanging_box_is_clipped_at_its_corners(toy_det, detector, tmp_path):
    splits = load_detection_dataset(f"coco:{toy_det}")
    image = splits.train[0]
    width = image.width
    image.boxes, image.labels, image.crowd = [[width - 10, 0, 30, 20], [width + 5, 0, 10, 10]], [0, 1], [False, False]
    target = DetectionDataset([image], detector.image_config)[0][1]
    torch.testing.assert_close(target["boxes"], torch.tensor([[(width - 5) / width, 10 / image.height,
                                                               10 / width, 20 / image.height]]))
    assert target["class_labels"].tolist() == [0]  # the box wholly outside the image is dropped


def test_an_image_whose_size_disagrees_with_its_json_is_named(toy_det, detector):
    splits = load_detection_dataset(f"coco:{toy_det}")
    image = splits.train[0]
    image.width += 1
    with pytest.raises(DatasetError, match="COCO entry says"):
        DetectionDataset([image], detector.image_config)[0]


def test_an_unannotated_test_split_is_refused_before_training(toy_det, tmp_path):
    from vlprompt.engine.api import DataOptions, RunOptions, TrainConfig, train

    root = shutil.copytree(toy_det, tmp_path / "data")
    _edit_split(root, "test", lambda d: d.__setitem__("annotations", []))
    options = RunOptions(model="random:grounding-dino-micro", method="det_coop",
                         data=DataOptions(dataset=f"coco:{root}"), train=TrainConfig(epochs=1, batch_size=4),
                         output=str(tmp_path / "run"))
    with pytest.raises(DatasetError, match="test split .* no \\(non-crowd\\) annotations"):
        train(options, progress=False, log=lambda _: None)
    assert not (tmp_path / "run").exists()
