"""The engine computes a tower a method leaves untouched once, for every registered CLIP method.

Counted with hooks on each tower's first layer during whole engine runs (2 epochs, training augmentation off,
evaluation batches of 2 so that "once per evaluation" and "once per batch" differ):

- class text features: methods that leave the text tower alone get them once for training and once per evaluation
  pass, never per step or per batch; methods that change it run it once per training step and once per evaluation
  pass (CoCoOp, whose text depends on each image, is the exception);
- image features: methods that leave the image tower alone get the training images encoded once (no augmentation)
  and never again; every other method encodes every training image once per epoch (one pass: no duplicate work).
"""
from __future__ import annotations

import pytest
import torch

from vlprompt.backbones import CLIPBackbone, load_backbone
from vlprompt.engine.api import DataOptions, load_splits
from vlprompt.engine.trainer import TrainConfig, Trainer, seed_everything
from vlprompt.methods import METHODS, get_prompt_model
from vlprompt.tasks import ClassificationTask

from data_fixtures import make_split_json_dataset

CLASSES = ["forest", "annual crop", "herbaceous vegetation land", "a b c d e f"]
PER_SPLIT = (2, 1, 2)
N_TRAIN, N_VAL, N_TEST = (len(CLASSES) * k for k in PER_SPLIT)
EPOCHS, BATCH, EVAL_BATCH = 2, 4, 2
STEPS = EPOCHS * -(-N_TRAIN // BATCH)
CLIP_METHODS = [
    name for name, spec in METHODS.items()
    # Fitted methods get their features from the fit (and keep their own frozen class features): not engine caching.
    if not spec.method_class.fits_features and spec.method_class.backbone_kind == CLIPBackbone.info.kind
    and spec.method_class.required_sites <= CLIPBackbone.info.sites
]
OPTIONS = {"coop": {"n_ctx": 4}, "vpt_shallow": {"n_tokens": 2}, "vpt_deep": {"n_tokens": 2},
           "dpt": {"n_ctx": 4, "n_visual": 2}, "apt": {"n_prompts": 4}, "deep_prompt": {"n_text": 8, "n_image": 4}}
# The towers each method leaves untouched (its cacheable_towers); every other registered CLIP method changes both.
UNTOUCHED = {"zeroshot": {"text", "image"}, "coop": {"image"}, "cocoop": {"image"}, "vpt_shallow": {"text"},
             "vpt_deep": {"text"}, "kgcoop": {"image"}, "clip_adapter": {"text", "image"}}
# The frozen model's passes a method's loss needs beyond its own (PromptSRC's regularisation targets): the class
# features of each of its 60 templates once per run, and the frozen image features of every training image per epoch.
FROZEN_PASSES = {"promptsrc": {"text": 60, "images": EPOCHS * N_TRAIN}}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("caching")
    make_split_json_dataset(root, "eurosat", classnames=CLASSES, per_split=PER_SPLIT, image_size=32)
    return root


@pytest.mark.parametrize("name", sorted(CLIP_METHODS))
def test_untouched_towers_are_computed_once(name, data_root, tmp_path):
    backbone = load_backbone("random:tiny")
    calls = {"text": 0, "text_grad": 0, "images": 0}

    def text_hook(module, args):
        calls["text_grad" if torch.is_grad_enabled() else "text"] += 1

    def image_hook(module, args):
        calls["images"] += args[0].shape[0]

    backbone.model.text_model.encoder.layers[0].register_forward_pre_hook(text_hook)
    backbone.model.vision_model.encoder.layers[0].register_forward_pre_hook(image_hook)
    splits = load_splits(DataOptions(dataset="eurosat", root=str(data_root)))
    seed_everything(1)
    method = get_prompt_model(backbone, name, splits.classnames, splits.template, dict(OPTIONS.get(name, {})))
    calls.update(text=0, text_grad=0, images=0)  # count the engine's work, not the method's construction
    config = TrainConfig(epochs=EPOCHS, batch_size=BATCH, eval_batch_size=EVAL_BATCH, warmup_epochs=0, lr=0.01,
                         augment=False)
    task = ClassificationTask(splits, backbone, augment=False)
    Trainer(config, tmp_path, progress=False, log=lambda _: None).fit(method, task)

    trains = method.num_trainable() > 0
    eval_passes = (EPOCHS + 1) if trains else 2  # validation after each epoch + test; zero-shot: validation + test
    eval_images = (EPOCHS * N_VAL + N_TEST) if trains else N_VAL + N_TEST
    cacheable = method.cacheable_towers  # the towers the method declares untouched while it trains
    assert cacheable == UNTOUCHED.get(name, set())
    for key, count in FROZEN_PASSES.get(name, {}).items():
        calls[key] -= count
    if not method.conditions_text_on_image:
        if "text" not in cacheable and trains:
            assert calls["text_grad"] == STEPS  # once per step, with gradients
            assert calls["text"] == eval_passes  # once per evaluation pass, not per batch
        else:
            assert calls["text_grad"] == 0
            assert calls["text"] == (1 if trains else 0) + eval_passes  # once for training + once per pass
    if "image" in cacheable and trains:
        assert calls["images"] == N_TRAIN + eval_images  # training images encoded once, for the cache
    else:
        assert calls["images"] == (EPOCHS * N_TRAIN if trains else 0) + eval_images
