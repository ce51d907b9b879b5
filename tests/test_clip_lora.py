"""CLIP-LoRA: what makes it that method (tests/test_matrix.py runs the shared checks on CLIP and SigLIP).

- The released defaults (rank 2, alpha 1, dropout 0.25, q/k/v of every layer of both towers); the trainable count
  is 2 r (d_in + d_out)/2 per projection: 184,320 on ViT-B/16.
- At initialisation it is the frozen model exactly; an adapted projection computes W x + b + (alpha / r) B A x
  (an independent computation); training changes the adapters only; the adapters' dropout trains while the towers
  keep eval behaviour; ``towers`` limits the adapters to one tower, whose partner is then cached.
- A backbone takes one set of adapters (a second is refused, naming the fix); ``remove_lora`` restores it; a saved
  model reloads onto a fresh backbone with identical logits; bad options are refused.
"""
from __future__ import annotations

import pytest
import torch

import vlprompt
from vlprompt.backbones import load_backbone
from vlprompt.engine.trainer import TrainConfig, make_accelerator, prepare_training, run_training_step
from vlprompt.methods import ClipLoRA, get_prompt_model
from vlprompt.tasks.batches import ClassificationBatch

PHOTO = "a photo of a {}."


@pytest.fixture
def backbone():
    """A fresh tiny CLIP per test: CLIP-LoRA injects its adapters into the backbone it is built on."""
    return load_backbone("random:tiny")


@pytest.fixture
def batch(backbone):
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(4, 3, backbone.image_size, backbone.image_size, generator=g)
    return ClassificationBatch(torch.tensor([0, 1, 2, 3]), pixel_values=pixels)


def _model(backbone, classnames, config=None, seed=0):
    torch.manual_seed(seed)
    return get_prompt_model(backbone, "clip_lora", classnames, PHOTO, config or {})


def _perturb(method, scale=0.05, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in method.prompt_parameters().values():
            p.add_(scale * torch.randn(p.shape, generator=g))


def test_defaults_are_the_released_ones_and_only_adapters_of_qkv_in_both_towers_train(backbone, classnames):
    method = _model(backbone, classnames)
    assert isinstance(method, ClipLoRA)
    cfg = method.config
    assert (cfg.r, cfg.alpha, cfg.dropout, cfg.towers, cfg.projections) == (2, 1.0, 0.25, "both", ["q", "k", "v"])
    names = list(method.prompt_parameters())
    assert names and all("lora_" in n and n.startswith("backbone.model.") for n in names)
    adapted = {n.split(".lora_")[0] for n in names}
    layers = backbone.text_layers + backbone.vision_layers
    assert len(adapted) == 3 * layers
    assert all(n.split(".")[-1] in ("q_proj", "k_proj", "v_proj") for n in adapted)
    assert sum("text_model" in n for n in adapted) == 3 * backbone.text_layers
    assert not any(p.requires_grad for n, p in backbone.model.named_parameters() if "lora_" not in n)


def test_the_trainable_count_follows_the_formula_on_vit_b16(classnames):
    method = _model(load_backbone("random:vit-b-16"), classnames)
    # 12 layers x 3 projections x r x (d_in + d_out) per tower, r = 2: text width 512, image width 768
    assert method.num_trainable() == 12 * 3 * 2 * (2 * 512 + 2 * 768) == 184_320


def test_at_initialisation_it_is_the_frozen_model_exactly(backbone, classnames, batch):
    zeroshot = get_prompt_model(backbone, "zeroshot", classnames, PHOTO)
    with torch.no_grad():
        before = zeroshot(pixel_values=batch.pixel_values)
    method = _model(backbone, classnames).eval()
    with torch.no_grad():
        assert torch.equal(method(pixel_values=batch.pixel_values), before)


def test_an_adapted_projection_adds_the_scaled_low_rank_product(backbone, classnames):
    method = _model(backbone, classnames, {"r": 4, "alpha": 3.0}).eval()
    _perturb(method)
    layer = backbone.encoder_layers("image")[1].self_attn.k_proj
    a = layer.lora_A["default"].weight
    b = layer.lora_B["default"].weight
    base = layer.get_base_layer()
    x = torch.randn(2, 5, base.in_features, generator=torch.Generator().manual_seed(3))
    expected = x @ base.weight.t() + base.bias + (3.0 / 4) * (x @ a.t() @ b.t())
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected.detach(), atol=1e-5, rtol=1e-5)


def test_training_changes_the_adapters_only(backbone, classnames, batch):
    method = _model(backbone, classnames)
    frozen = {n: p.clone() for n, p in backbone.model.named_parameters() if "lora_" not in n}
    adapters = {n: p.detach().clone() for n, p in method.prompt_parameters().items()}
    accelerator = make_accelerator("fp32")
    step_module, optimizer = prepare_training(method, TrainConfig(lr=0.01, optimizer="adamw"), accelerator)
    params = list(method.prompt_parameters().values())
    method.train()
    losses = [float(run_training_step(step_module, optimizer, batch, accelerator, params).loss.detach())
              for _ in range(10)]  # fmt: skip
    assert losses[-1] < losses[0], losses
    assert all(torch.equal(p, frozen[n]) for n, p in backbone.model.named_parameters() if "lora_" not in n)
    changed = [n for n, p in method.prompt_parameters().items() if not torch.equal(p.detach(), adapters[n])]
    assert len(changed) == len(adapters)  # every A and B moved (B from zero first, then A through B)


def test_the_adapters_dropout_trains_while_the_towers_stay_in_eval_mode(backbone, classnames):
    method = _model(backbone, classnames).train()
    dropouts = [m for n, m in backbone.model.named_modules() if n.endswith("lora_dropout.default")]
    others = [m for n, m in backbone.model.named_modules() if "lora_dropout" not in n]
    assert dropouts and all(m.training for m in dropouts) and not any(m.training for m in others)
    method.eval()
    assert not any(m.training for m in dropouts)


@pytest.mark.parametrize("towers, cached", [("image", {"text"}), ("text", {"image"}), ("both", set())])
def test_adapting_one_tower_leaves_the_other_to_the_feature_cache(backbone, classnames, towers, cached):
    method = _model(backbone, classnames, {"towers": towers})
    assert method.cacheable_towers == frozenset(cached)
    names = list(method.prompt_parameters())
    if towers != "both":
        other = "text_model" if towers == "image" else "vision_model"
        assert names and not any(other in n for n in names)


def test_one_set_of_adapters_per_backbone_and_remove_lora_restores_it(backbone, classnames, batch):
    zeroshot = get_prompt_model(backbone, "zeroshot", classnames, PHOTO)
    with torch.no_grad():
        before = zeroshot(pixel_values=batch.pixel_values)
    method = _model(backbone, classnames)
    _perturb(method)
    with pytest.raises(ValueError, match="already carries LoRA adapters.*load a fresh backbone"):
        _model(backbone, classnames)
    backbone.remove_lora()
    assert not backbone.has_lora() and not hasattr(backbone.model, "peft_config")
    with torch.no_grad():
        assert torch.equal(zeroshot(pixel_values=batch.pixel_values), before)


def test_save_pretrained_reloads_onto_a_fresh_backbone_with_identical_logits(backbone, classnames, batch, tmp_path):
    method = _model(backbone, classnames, {"r": 3, "projections": ["q", "v", "o"]})
    _perturb(method)
    method.eval()
    with torch.no_grad():
        expected = method(pixel_values=batch.pixel_values)
    method.save_pretrained(tmp_path / "prompt")
    loaded = ClipLoRA.from_pretrained(tmp_path / "prompt", backbone=load_backbone("random:tiny"))
    assert loaded.config == method.config and loaded.num_trainable() == method.num_trainable()
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(loaded(pixel_values=batch.pixel_values), expected)


@pytest.mark.parametrize("bad", [{"r": 0}, {"dropout": 1.0}, {"projections": []}, {"projections": ["q", "x"]},
                                 {"projections": ["q", "q"]}, {"towers": "audio"}, {"alpha": 0.0}])
def test_bad_options_are_refused_naming_the_option(backbone, classnames, bad):
    with pytest.raises(vlprompt.MethodConfigError, match="clip_lora"):
        _model(backbone, classnames, bad)
    assert not backbone.has_lora()  # a refused config injects nothing
