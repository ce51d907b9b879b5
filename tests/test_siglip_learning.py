"""On the tiny SigLIP, every classification method it supports trains with SigLIP's own sigmoid loss and beats
zero-shot on an easy task.

The easy task is the CLIP founding tests' (tests/test_founding_methods.py) in SigLIP form: a tiny SigLIP pretrained
with its sigmoid loss on bare EuroSAT-like class names of generated images (``vlprompt.demo.pretrain_tiny_model``,
from SigLIP's published initial temperature and bias), and colours named as that model sees them. Zero-shot with the
dataset's own template ("a centered satellite photo of {}.") falls short of what the model knows; each method must
beat it. Recipes: AdamW, 30 epochs of 20 images, the learning rate per method (as papers tune per method). At 15
epochs IVLP, MaPLe and APT ended at or below zero-shot for some data orders (run seeds 1-3); at 30 each beat it for
all three seeds.
"""
import pytest
import torch

import vlprompt
from vlprompt.backbones import BACKBONES
from vlprompt.methods import METHODS
from vlprompt.methods.registry import unsupported_reason

PRETRAIN_STEPS = 150
EPOCHS = 30
COLOURS, PER_SPLIT = 5, (4, 2, 6)  # classes; train / val / test images per class
LEARNING_RATES = {"linear_probe": 0.01, "coop": 0.03, "vpt_shallow": 0.03, "vpt_deep": 0.01, "ivlp": 0.03,
                  "deep_prompt": 0.01, "cocoop": 0.01, "maple": 0.03, "upt": 0.01, "dpt": 0.001, "apt": 0.01,
                  "kgcoop": 0.01, "clip_adapter": 0.03, "tip_adapter": 0.01,  # tip_adapter: fitted, no steps
                  "tip_adapter_f": 0.01, "promptsrc": 0.03, "clip_lora": 0.01}
# Shallow VPT's default 8 tokens in the first layer plateau at zero-shot accuracy on this tiny SigLIP (60% on train,
# val and test at lr 0.01 to 0.3 and seeds 1-3, measured once the data order became per-run seeded); 16 tokens learn.
# KgCoOp pulls its prompt toward the hand-crafted (template) features, which this model reads at zero-shot's 60%:
# the released weight 8 holds it there (60% at lr 0.01-0.1), weight 1 lets the sigmoid loss move it (100%).
# PromptSRC pulls its text features toward the frozen model's over a template ensemble: with the release's 60 ImageNet
# templates, which this model never saw, it ends at 40% (gpa_mean 15 or 30, lr 0.01-0.03); with the ensemble
# being the bare names it knows, 100% (lr 0.01 and 0.03); so do weights 1 / 1 with the 60 templates.
METHOD_OPTIONS = {"vpt_shallow": {"n_tokens": 16}, "kgcoop": {"weight": 1.0}, "promptsrc": {"text_templates": ["{}"]}}
SUPPORTED = [name for name, spec in METHODS.items()
             if not unsupported_reason(spec.method_class, BACKBONES["siglip"]) and name != "zeroshot"]


@pytest.fixture(scope="module")
def knowing_siglip(tmp_path_factory):
    from data_fixtures import name_colours_as_the_model_sees_them

    from vlprompt.backbones import load_backbone
    from vlprompt.demo import pretrain_tiny_model

    root = tmp_path_factory.mktemp("siglip_e2e")
    model_dir = pretrain_tiny_model(root / "model", root / "work", steps=PRETRAIN_STEPS, preset="siglip-tiny")
    data_root = name_colours_as_the_model_sees_them(model_dir, root, COLOURS, PER_SPLIT)
    backbone = load_backbone(str(model_dir))
    splits = vlprompt.load_splits(vlprompt.DataOptions("eurosat", root=str(data_root)))
    return backbone, splits, vlprompt.ClassificationTask(splits, backbone, augment=False), root


def accuracy(knowing_siglip, name: str, lr: float = 0.01, template: str | None = None) -> float:
    backbone, splits, task, root = knowing_siglip
    torch.manual_seed(0)
    method_config = vlprompt.make_config(name, METHOD_OPTIONS.get(name, {}), backbone)
    method = vlprompt.get_prompt_model(backbone, name, splits.classnames, template or splits.template, method_config)
    config = vlprompt.TrainConfig(epochs=EPOCHS, batch_size=8, lr=lr, optimizer="adamw", warmup_epochs=0, augment=False)
    folder = root / (name if template is None else f"{name}-{len(template)}")
    try:
        return vlprompt.Trainer(config, folder, progress=False, log=lambda _: None).fit(method, task)["accuracy"]
    finally:
        if backbone.has_lora():  # CLIP-LoRA's adapters: the next method runs on the model as pretrained
            backbone.remove_lora()


@pytest.fixture(scope="module")
def zero_shot(knowing_siglip) -> float:
    return accuracy(knowing_siglip, "zeroshot")


def test_the_pretrained_siglip_knows_the_names_but_not_the_template(knowing_siglip, zero_shot):
    assert knowing_siglip[0].info.scoring == "sigmoid"
    bare = accuracy(knowing_siglip, "zeroshot", template="{}")  # the pretraining's bare names
    print(f"zero-shot: bare names {bare:.1f}%, the dataset's template {zero_shot:.1f}%")
    assert bare >= zero_shot + 20.0
    assert zero_shot <= 80.0


def test_every_supported_method_has_a_recipe():
    assert set(SUPPORTED) == set(LEARNING_RATES) and "sdpt" not in SUPPORTED


@pytest.mark.parametrize("name", SUPPORTED)
def test_trains_with_the_sigmoid_loss_and_beats_zero_shot(name, knowing_siglip, zero_shot):
    tuned = accuracy(knowing_siglip, name, LEARNING_RATES[name])
    print(f"{name}: test accuracy {tuned:.1f}% (zero-shot {zero_shot:.1f}%)")  # shown with pytest -s
    assert tuned > zero_shot
