"""Every registered method on every backbone that can carry it, through one set of shared checks (PEFT's TEST_CASES
style, parametrised over the registry as timm's tests are over ``list_models()``); a backbone contract check over
every family; and a method registered from this file, trained through the public API."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn

import vlprompt
from vlprompt.backbones import BACKBONES, load_backbone
from vlprompt.backbones.base import SITE_FUSION_WEIGHTS, SITE_JOINT_SPACE, SITE_TOWER_WEIGHTS
from vlprompt.methods.registry import unsupported_reason
from vlprompt.engine.trainer import TrainConfig, make_accelerator, prepare_training, run_training_step
from vlprompt.methods import METHODS, ClassificationMethod, MethodConfig, get_prompt_model
from vlprompt.options import opt
from vlprompt.tasks.batches import ClassificationBatch, DetectionBatch, VQABatch

# The backbones of the matrix: the tiny / micro presets of each kind of family.
BACKBONE_PRESETS = {"clip": "random:tiny", "siglip": "random:siglip-tiny", "grounding-dino": "random:grounding-dino-micro",
                    "vilt": "random:vilt-micro", "bridgetower": "random:bridgetower-micro"}
CLASSES = ["cat", "dog", "red car"]
# Options that keep the cases fast; each method's defining property is tested in its own file.
FAST_OPTIONS = {"deep_prompt": {"n_text": 4, "n_image": 4}, "apt": {"n_prompts": 4}, "dpt": {"top_k": 2},
                "sdpt_native_released": {"n_prototypes": 8}}

TEST_CASES = [
    (name, family) for name, spec in METHODS.items() for family in BACKBONE_PRESETS
    if not unsupported_reason(spec.method_class, BACKBONES[family])
]
# Methods that take no gradient step: nothing to train, or fitted in closed form (checked on its own below).
# Tip-Adapter-F has nothing to train until fitted (tests/test_tip_adapter.py trains it from a fit).
NO_STEP = {"zeroshot", "det_zeroshot", "linear_probe", "tip_adapter", "tip_adapter_f"}
STEP_CASES = [case for case in TEST_CASES if case[0] not in NO_STEP]
# Zero-size prompts: (options, the zero-shot template whose model they must equal) where that identity holds.
ZERO_SIZE = {
    "coop": ({"n_ctx": 0}, "{}."),
    "kgcoop": ({"n_ctx": 0, "init": None}, "{}."),
    "clip_adapter": ({"ratio": 0.0}, None),  # the adapter's share is zero: the frozen image feature
    "cocoop": ({"n_ctx": 0, "init": None}, "{}."),
    "vpt_shallow": ({"n_tokens": 0}, None),
    "vpt_deep": ({"n_tokens": 0}, None),
    "ivlp": ({"n_text": 0, "n_image": 0}, "a photo of a {}."),
    "promptsrc": ({"n_text": 0, "n_image": 0}, "a photo of a {}."),
    "clip_lora": ({}, None),  # LoRA's up-projection starts at zero
    "deep_prompt": ({"n_text": 0, "n_image": 0}, "{}."),
    "maple": ({"n_ctx": 0}, "a photo of a {}."),
    "upt": ({"n_text": 0, "n_image": 0}, "a photo of a {}."),
    "sdpt": ({"n_prototypes": 0}, None),
    "dpt": ({"n_ctx": 0, "n_visual": 0, "cavpt": False}, "{}."),
    "apt": ({"n_prompts": 0}, None),
    "sdpt_native": ({"n_prototypes": 0}, None),
    "det_lora": ({}, None),  # LoRA's up-projection starts at zero
    "det_heads": ({}, None),
    "det_full": ({}, None),
    "apt_native": ({"n_prompts": 0}, None),  # no memory tokens: the head on the frozen encoder
    "deep_prompt_native": ({"n_prompts": 0}, None),
    "lora_native": ({}, None),  # LoRA's up-projection starts at zero
    "full_native": ({}, None),
}


def case_id(case) -> str:
    return f"{case[0]}-{case[1]}"


@pytest.fixture(scope="module")
def dual_encoders():
    """Dual encoders are never changed by a prompt method (frozen towers): built once. A method that adds LoRA
    adapters gets a fresh one (``backbone_for``)."""
    return {family: load_backbone(BACKBONE_PRESETS[family]) for family in ("clip", "siglip")}


def backbone_for(family: str, dual_encoders, name: str = ""):
    # Detection methods may train or extend the detector's own weights (heads, full, LoRA), and CLIP-LoRA injects
    # adapters into the towers: a fresh backbone each time for those.
    adds_weights = name and bool({SITE_TOWER_WEIGHTS, SITE_FUSION_WEIGHTS} & METHODS[name].method_class.required_sites)
    if family in dual_encoders and not adds_weights:
        return dual_encoders[family]
    return load_backbone(BACKBONE_PRESETS[family])


def build(name: str, backbone, options: dict | None = None, seed: int = 0):
    torch.manual_seed(seed)
    return get_prompt_model(backbone, name, CLASSES, config={**FAST_OPTIONS.get(name, {}), **(options or {})})


def inputs_for(backbone, batch: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    if backbone.kind == "fusion_encoder":
        tokens = backbone.tokenize(["how many red circles?", "is the star left of the square?"][:batch])
        mask = (torch.arange(tokens.input_ids.shape[1]) < tokens.lengths.unsqueeze(1)).long()
        pixels = torch.randn(batch, 3, backbone.image_size, backbone.image_size, generator=g)
        targets = torch.zeros(batch, len(CLASSES))
        targets[torch.arange(batch), torch.arange(batch) % len(CLASSES)] = 1.0
        return VQABatch(tokens.input_ids, mask, pixels, targets)
    if backbone.kind == "fusion_detector":
        size = backbone.image_config.shortest_edge
        pixels = torch.randn(batch, 3, size, size, generator=g)
        targets = [{"class_labels": torch.tensor([i % len(CLASSES)]), "boxes": torch.tensor([[0.5, 0.5, 0.3, 0.3]])}
                   for i in range(batch)]  # fmt: skip
        return DetectionBatch(pixels, torch.ones(batch, size, size, dtype=torch.long), targets)
    pixels = torch.randn(batch, 3, backbone.image_size, backbone.image_size, generator=g)
    return ClassificationBatch(torch.arange(batch) % len(CLASSES), pixel_values=pixels)


@torch.no_grad()
def outputs(method, batch) -> torch.Tensor:
    method.eval()
    if isinstance(batch, VQABatch):
        return method(batch.input_ids, batch.attention_mask, batch.pixel_values)
    if isinstance(batch, DetectionBatch):
        scores, boxes = method.predict(batch.pixel_values, batch.pixel_mask)
        return torch.cat([scores.flatten(), boxes.flatten()])
    return method(pixel_values=batch.pixel_values)


# ----------------------------------------------------------------------------------------------- shared checks
@pytest.mark.parametrize("case", STEP_CASES, ids=case_id)
def test_only_the_methods_parameters_receive_gradients_in_a_trainer_step(case, dual_encoders):
    name, family = case
    backbone = backbone_for(family, dual_encoders, name)
    method = build(name, backbone)
    accelerator = make_accelerator("fp32")
    step_module, optimizer = prepare_training(method, TrainConfig(lr=0.05, optimizer="adamw"), accelerator)
    own = method.prompt_parameters()
    before = {n: p.detach().clone() for n, p in own.items()}
    method.train()
    out = run_training_step(step_module, optimizer, inputs_for(backbone), accelerator, list(own.values()))
    assert torch.isfinite(out.loss) and out.losses
    mine = {id(p) for p in own.values()}
    stray = [n for n, p in method.named_parameters() if p.grad is not None and id(p) not in mine]
    assert not stray, f"parameters outside the method received gradients: {stray[:5]}"
    assert any(p.grad is not None for p in own.values())
    assert any(not torch.equal(before[n], p.detach()) for n, p in own.items()), "the step changed nothing"


@pytest.mark.parametrize("case", TEST_CASES, ids=case_id)
def test_save_pretrained_then_from_pretrained_gives_identical_outputs(case, dual_encoders, tmp_path):
    name, family = case
    backbone = backbone_for(family, dual_encoders, name)
    method = build(name, backbone)
    with torch.no_grad():  # move every trained tensor off its initial value: a reload from init would not pass
        for p in method.prompt_parameters().values():
            p.add_(0.01 * torch.randn_like(p))
    batch = inputs_for(backbone)
    expected = outputs(method, batch)
    method.save_pretrained(tmp_path / "prompt")
    other = backbone_for(family, dual_encoders, name)  # fresh where `method` added LoRA adapters
    loaded = vlprompt.PromptMethod.from_pretrained(tmp_path / "prompt", backbone=other)
    assert type(loaded) is type(method) and loaded.registered_name == name
    torch.testing.assert_close(outputs(loaded, batch), expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_the_linear_probe_fits_only_its_head_and_the_zero_shot_models_train_nothing(family, dual_encoders):
    backbone = dual_encoders[family]
    assert build("zeroshot", backbone).num_trainable() == 0
    probe = build("linear_probe", backbone)
    assert set(probe.prompt_parameters()) == {"head.weight", "head.bias"}
    frozen = {n: p.clone() for n, p in backbone.model.named_parameters()}
    g = torch.Generator().manual_seed(0)
    feats, labels = torch.randn(12, backbone.embed_dim, generator=g), torch.arange(12) % len(CLASSES)
    probe.fit_features(feats, labels, feats[:3], labels[:3])
    assert probe.head.weight.abs().sum() > 0
    assert all(torch.equal(p, frozen[n]) for n, p in backbone.model.named_parameters())


ZERO_CASES = [case for case in TEST_CASES if case[0] in ZERO_SIZE]


@pytest.mark.parametrize("case", ZERO_CASES, ids=case_id)
def test_zero_size_prompts_equal_the_bare_model(case, dual_encoders):
    name, family = case
    options, template = ZERO_SIZE[name]
    backbone = backbone_for(family, dual_encoders, name)
    method = build(name, backbone, options)
    if backbone.kind == "fusion_detector":
        bare = get_prompt_model(backbone, "det_zeroshot", CLASSES)
    elif backbone.kind == "fusion_encoder":  # the same head on the untouched encoder
        bare = get_prompt_model(backbone, "fusion_head", CLASSES)
        bare.head.load_state_dict(method.head.state_dict())
    else:
        bare = get_prompt_model(backbone, "zeroshot", CLASSES, template or method.template)
    batch = inputs_for(backbone)
    torch.testing.assert_close(outputs(method, batch), outputs(bare, batch), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", TEST_CASES, ids=case_id)
def test_a_refused_set_classes_leaves_the_model_unchanged(case, dual_encoders):
    name, family = case
    backbone = backbone_for(family, dual_encoders, name)
    method = build(name, backbone, {"class_specific": True} if name == "coop" else None)
    batch = inputs_for(backbone)
    before = outputs(method, batch)
    if backbone.kind == "fusion_detector":
        refused = (["cat", "hot.dog"], None)  # '.' ends a phrase: the detector's prompt refuses it
    elif method.tied_to_classes(method.config):
        refused = (["cat", "zebra"], None)  # a class it was not trained on
    else:
        refused = (["cat", "dog"], "no placeholder here")
    with pytest.raises(ValueError):
        method.set_classes(*refused)
    assert method.classnames == CLASSES and "{}" in method.template
    torch.testing.assert_close(outputs(method, batch), before)


@pytest.mark.parametrize("case", TEST_CASES, ids=case_id)
def test_prompts_stay_fp32_on_bf16_weights(case):
    name, family = case
    backbone = load_backbone(BACKBONE_PRESETS[family])
    backbone.model.to(torch.bfloat16)
    method = build(name, backbone)
    trained = method.prompt_parameters()
    own = {n: p for n, p in trained.items() if not n.startswith("backbone.")}
    assert all(p.dtype == torch.float32 for p in own.values()), {n: p.dtype for n, p in own.items()}
    if backbone.kind == "dual_encoder":
        logits = outputs(method, inputs_for(backbone))
        assert torch.isfinite(logits.float()).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64], ids=["bf16", "float64"])
@pytest.mark.parametrize("case", [c for c in TEST_CASES if c[1] != "grounding-dino"], ids=case_id)
def test_every_method_runs_after_casting_the_whole_model(case, dtype):
    """``method.to(dtype)`` casts prompts, buffers and backbone together (DPT with K < C once failed here)."""
    name, family = case
    backbone = load_backbone(BACKBONE_PRESETS[family])
    method = build(name, backbone).to(dtype)
    logits = outputs(method, inputs_for(backbone))
    assert logits.dtype in (dtype, torch.float32) and torch.isfinite(logits.float()).all()


# ----------------------------------------------------------------------------------------------- backbone contract
@pytest.mark.parametrize("family", sorted(BACKBONE_PRESETS))
def test_without_prompts_the_adapter_gives_the_models_own_outputs(family, dual_encoders):
    backbone = backbone_for(family, dual_encoders)
    model = backbone.model
    batch = inputs_for(backbone)
    with torch.no_grad():
        if backbone.kind == "fusion_encoder":  # tests/test_vilt.py checks the adapter against ViltModel
            from vlprompt.backbones.vilt import PATCH_ORDER_SEED

            sequence, pooled = backbone.encode(batch.input_ids, batch.attention_mask, batch.pixel_values)
            torch.manual_seed(PATCH_ORDER_SEED)
            theirs = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                           pixel_values=batch.pixel_values)  # fmt: skip
            torch.testing.assert_close(pooled, theirs.pooler_output)
            return
        if backbone.kind == "fusion_detector":
            prompt = backbone.category_prompt(CLASSES)
            ours = backbone.detect(batch.pixel_values, prompt, pixel_mask=batch.pixel_mask)
            ids = prompt.input_ids.unsqueeze(0).expand(len(batch), -1)
            theirs = model(pixel_values=batch.pixel_values, input_ids=ids, attention_mask=torch.ones_like(ids),
                           pixel_mask=batch.pixel_mask)  # fmt: skip
            torch.testing.assert_close(ours.logits, theirs.logits)
            torch.testing.assert_close(ours.pred_boxes, theirs.pred_boxes)
            return
        texts = [f"a photo of a {c}." for c in CLASSES]
        enc = backbone.tokenizer(texts, padding="max_length", max_length=backbone.tokenize(texts).input_ids.shape[1],
                                 truncation=True, return_tensors="pt")  # fmt: skip
        text = model.get_text_features(input_ids=enc["input_ids"])
        image = model.get_image_features(pixel_values=batch.pixel_values)
        text = getattr(text, "pooler_output", text)
        image = getattr(image, "pooler_output", image)
        torch.testing.assert_close(backbone.encode_texts(texts), text, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(backbone.encode_image(batch.pixel_values), image, atol=1e-5, rtol=1e-5)


def test_the_matrix_covers_every_registered_method_and_family():
    covered = {name for name, _ in TEST_CASES}
    assert covered == set(METHODS) - {"test_text_shift"}
    assert {family for _, family in TEST_CASES} == set(BACKBONE_PRESETS)
    assert ("sdpt", "siglip") not in TEST_CASES  # refused, with its reason (tests/test_siglip.py)


# ----------------------------------------------------------------------------------------------- a user's own method
@dataclass
class TextShiftConfig(MethodConfig):
    method_name = "test_text_shift"
    scale: float = opt(1.0, gt=0)


class TextShift(ClassificationMethod):
    """A learned vector added to every class's text feature: the smallest method that trains."""

    name = "test_text_shift"
    config_class = TextShiftConfig
    required_sites = frozenset({SITE_JOINT_SPACE})
    modifies_text = True

    def __init__(self, backbone, config, classnames, template="a photo of a {}.") -> None:
        super().__init__(backbone, config, classnames, template)
        self.shift = nn.Parameter(torch.zeros(backbone.embed_dim))

    def text_features(self) -> torch.Tensor:
        return super().text_features() + self.config.scale * self.shift


@pytest.fixture
def registered_text_shift():
    vlprompt.register_method("test_text_shift", TextShift, summary="a test's own method")
    yield "test_text_shift"
    METHODS.pop("test_text_shift")


def test_a_method_registered_in_a_test_file_trains_saves_and_loads_through_the_public_api(
        registered_text_shift, tiny_model_dir, engine_data_root, engine_run_options, tmp_path):  # fmt: skip
    options = engine_run_options(tiny_model_dir, engine_data_root, tmp_path / "run", method=registered_text_shift,
                                 epochs=3, lr=0.05)  # fmt: skip
    final = vlprompt.train(options, progress=False, log=lambda _: None)
    assert final["n"] > 0
    import json

    history = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [h["train_loss"] for h in history if "train_loss" in h]
    assert losses[-1] < losses[0]
    loaded = vlprompt.PromptMethod.from_pretrained(tmp_path / "run")
    assert isinstance(loaded, TextShift) and loaded.shift.abs().sum() > 0
    with pytest.raises(vlprompt.MethodConfigError, match=r"test_text_shift.scale=-1.0 \(must be > 0\)"):
        vlprompt.make_config("test_text_shift", {"scale": -1.0})
