"""The current methods' defining properties: KgCoOp and CLIP-Adapter (methods.md, "Current methods").

Each test proves what makes a method *that* method, not just that it runs (tests/test_matrix.py runs the shared
checks on every backbone):
- KgCoOp: the loss is CoOp's plus weight x (1 - mean cosine to the frozen template features), computed here
  independently; the term is zero when the context is the init phrase and the template is that phrase; its gradient
  pulls the class features back to the hand-crafted ones; weight 0 is CoOp exactly.
- CLIP-Adapter: logits are the backbone's scoring of ratio x ReLU(W2 ReLU(W1 f)) + (1 - ratio) x f; ratio 0 is
  zero-shot exactly; it scores class names it was not trained on; cached image features give the same logits.
- Both: parameter counts follow the formulas (ViT-B/16: 2,048 and 131,072), a few steps lower the loss, a saved
  prompt reloads with identical logits, and a run on the embedded model's toy:colours beats chance clearly.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import vlprompt
from vlprompt.backbones import load_backbone
from vlprompt.engine.trainer import TrainConfig, make_accelerator, prepare_training, run_training_step
from vlprompt.methods import ClipAdapter, KgCoOp, get_prompt_model
from vlprompt.tasks.batches import ClassificationBatch

PHOTO = "a photo of a {}."  # KgCoOp's init phrase "a photo of a" followed by the class name: the init's own sentence
SATELLITE = "a centered satellite photo of {}."  # EuroSAT's template: differs from the init phrase


def _model(backbone, name, classnames, config=None, template=PHOTO, seed=0):
    torch.manual_seed(seed)
    return get_prompt_model(backbone, name, classnames, template, config or {})


@pytest.fixture
def pixels(tiny_backbone):
    g = torch.Generator().manual_seed(0)
    return torch.randn(4, 3, tiny_backbone.image_size, tiny_backbone.image_size, generator=g)


@pytest.fixture
def batch(pixels):
    return ClassificationBatch(torch.tensor([0, 1, 2, 3]), pixel_values=pixels)


@pytest.fixture(scope="module")
def vitb_backbone():
    return load_backbone("random:vit-b-16")


def _perturb(method, scale: float = 0.05, seed: int = 1) -> None:
    """Move every trained tensor off its initial value (a reload from init, or an init identity, would not pass)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in method.prompt_parameters().values():
            p.add_(scale * torch.randn(p.shape, generator=g))


def _hand_crafted(backbone, template, classnames) -> torch.Tensor:
    with torch.no_grad():
        return backbone.encode_texts([template.format(c) for c in classnames])


# =============================================================================================== KgCoOp
def test_kgcoop_defaults_are_the_released_ones(tiny_backbone, classnames):
    kg = _model(tiny_backbone, "kgcoop", classnames)
    assert (kg.config.weight, kg.config.init, kg.config.n_ctx) == (8.0, "a photo of a", 4)
    assert torch.equal(kg.ctx.detach(), tiny_backbone.phrase_embeddings("a photo of a"))
    assert set(kg.prompt_parameters()) == {"ctx"}  # the hand-crafted features are a buffer, not trained


@pytest.mark.parametrize("weight", [8.0, 2.5])
def test_kgcoop_regulariser_is_weight_times_one_minus_mean_cosine(tiny_backbone, classnames, batch, weight):
    kg = _model(tiny_backbone, "kgcoop", classnames, {"weight": weight}, template=SATELLITE)
    _perturb(kg)
    out = kg.training_step(batch)
    assert set(out.losses) == {"main", "kg"}
    learned = kg.text_features()
    hand = _hand_crafted(tiny_backbone, SATELLITE, classnames)
    expected = weight * (1.0 - F.cosine_similarity(learned, hand, dim=-1).mean())
    assert float(expected.detach()) > 1e-3  # a real distance: the template is not the context's sentence
    torch.testing.assert_close(out.losses["kg"], expected, atol=1e-6, rtol=1e-5)
    # the squared Euclidean distance of the normalised features (the paper's form) is twice 1 - cos
    paper = (F.normalize(learned, dim=-1) - F.normalize(hand, dim=-1)).pow(2).sum(-1).mean()
    torch.testing.assert_close(out.losses["kg"], weight * paper / 2, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.losses["main"], F.cross_entropy(out.logits, batch.labels))
    torch.testing.assert_close(out.loss, out.losses["main"] + out.losses["kg"])


def test_kgcoop_regulariser_is_zero_when_the_context_is_the_template_phrase(tiny_backbone, classnames, batch):
    kg = _model(tiny_backbone, "kgcoop", classnames, template=PHOTO)
    with torch.no_grad():
        torch.testing.assert_close(kg.text_features(), _hand_crafted(tiny_backbone, PHOTO, classnames),
                                   atol=1e-5, rtol=1e-5)  # fmt: skip
        assert abs(float(kg.training_step(batch).losses["kg"])) < 1e-6
        # under another template the same context is at a distance
        kg.set_classes(classnames, SATELLITE)
        assert float(kg.training_step(batch).losses["kg"]) > 1e-3


def test_kgcoop_regulariser_gradient_pulls_the_features_back_to_the_hand_crafted_ones(tiny_backbone, classnames):
    kg = _model(tiny_backbone, "kgcoop", classnames, template=PHOTO)
    init = kg.ctx.detach().clone()  # where the term is zero (previous test)
    _perturb(kg, scale=0.05)
    hand = F.normalize(_hand_crafted(tiny_backbone, PHOTO, classnames), dim=-1)

    def cosines() -> torch.Tensor:
        return (F.normalize(kg.text_features(), dim=-1) * hand).sum(-1)

    with torch.no_grad():
        before_cos = cosines()
    term = kg.knowledge_loss(kg.text_features())
    term.backward()
    # first order: a step down the gradient moves the context toward the init phrase
    assert float((kg.ctx.grad * (kg.ctx.detach() - init)).sum()) > 0
    optimizer = torch.optim.SGD([kg.ctx], lr=0.01)
    for _ in range(10):
        optimizer.zero_grad()
        kg.knowledge_loss(kg.text_features()).backward()
        optimizer.step()
    with torch.no_grad():
        after = kg.knowledge_loss(kg.text_features())
        after_cos = cosines()
    assert float(after) < 0.5 * float(term.detach())
    assert bool((after_cos > before_cos).all()), (before_cos, after_cos)  # every class comes closer


def test_kgcoop_with_weight_zero_is_coop(tiny_backbone, classnames, batch):
    kg = _model(tiny_backbone, "kgcoop", classnames, {"weight": 0.0}, template=SATELLITE, seed=3)
    coop = _model(tiny_backbone, "coop", classnames, {"init": "a photo of a"}, template=SATELLITE, seed=3)
    _perturb(kg)
    _perturb(coop)
    assert torch.equal(kg.ctx.detach(), coop.ctx.detach())
    kg_out, coop_out = kg.training_step(batch), coop.training_step(batch)
    assert torch.equal(kg_out.logits, coop_out.logits)
    assert torch.equal(kg_out.loss, coop_out.loss)
    kg_out.loss.backward()
    coop_out.loss.backward()
    assert torch.equal(kg.ctx.grad, coop.ctx.grad)
    with torch.no_grad():
        assert torch.equal(kg(pixel_values=batch.pixel_values), coop(pixel_values=batch.pixel_values))


def test_kgcoop_recomputes_the_hand_crafted_features_for_new_classes(tiny_backbone, classnames):
    kg = _model(tiny_backbone, "kgcoop", classnames)
    others = ["pasture", "river", "industrial"]
    kg.set_classes(others, SATELLITE)
    torch.testing.assert_close(kg.hand_crafted, F.normalize(_hand_crafted(tiny_backbone, SATELLITE, others), dim=-1))


# =============================================================================================== CLIP-Adapter
def test_clip_adapter_logits_are_the_residual_adapter_then_the_backbones_scoring(tiny_backbone, classnames, pixels):
    adapter = _model(tiny_backbone, "clip_adapter", classnames, template=SATELLITE)
    assert adapter.config.ratio == 0.2 and adapter.config.reduction == 4
    w1, w2 = adapter.down.weight.detach(), adapter.up.weight.detach()
    d = tiny_backbone.embed_dim
    assert w1.shape == (d // 4, d) and w2.shape == (d, d // 4)
    assert adapter.down.bias is None and adapter.up.bias is None
    with torch.no_grad():
        f = tiny_backbone.encode_image(pixels)
        adapted = 0.2 * F.relu(F.relu(f @ w1.t()) @ w2.t()) + 0.8 * f
        expected = tiny_backbone.score(adapted, _hand_crafted(tiny_backbone, SATELLITE, classnames))
        torch.testing.assert_close(adapter(pixel_values=pixels), expected, atol=1e-5, rtol=1e-5)
        # the task caches the frozen image tower: the adapter still applies to cached features
        cached = adapter(image_feats=adapter.image_features(pixels), text_feats=adapter.text_features())
        assert torch.equal(cached, adapter(pixel_values=pixels))
    assert adapter.cacheable_towers == {"text", "image"}


def test_clip_adapter_with_ratio_zero_is_zero_shot(tiny_backbone, classnames, pixels):
    adapter = _model(tiny_backbone, "clip_adapter", classnames, {"ratio": 0.0}, template=SATELLITE)
    _perturb(adapter)
    zeroshot = _model(tiny_backbone, "zeroshot", classnames, template=SATELLITE)
    with torch.no_grad():
        assert torch.equal(adapter(pixel_values=pixels), zeroshot(pixel_values=pixels))


def test_clip_adapter_scores_class_names_it_was_not_trained_on(tiny_backbone, classnames, pixels):
    adapter = _model(tiny_backbone, "clip_adapter", classnames)
    _perturb(adapter)
    assert not ClipAdapter.tied_to_classes(adapter.config)
    others = ["pasture", "river", "industrial"]
    adapter.set_classes(others, SATELLITE)
    with torch.no_grad():
        logits = adapter(pixel_values=pixels)
        expected = tiny_backbone.score(adapter.adapt(tiny_backbone.encode_image(pixels)),
                                       _hand_crafted(tiny_backbone, SATELLITE, others))  # fmt: skip
    assert logits.shape == (len(pixels), len(others))
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("options", [{"reduction": 0}, {"ratio": 1.5}, {"ratio": -0.1}, {"reduction": 1000}])
def test_clip_adapter_refuses_bad_options(tiny_backbone, classnames, options):
    with pytest.raises(vlprompt.MethodConfigError, match="clip_adapter"):
        _model(tiny_backbone, "clip_adapter", classnames, options)


# =============================================================================================== both
@pytest.mark.parametrize("which", ["tiny", "vitb"])
def test_trainable_parameter_counts_follow_the_formulas(request, classnames, which):
    backbone = request.getfixturevalue("tiny_backbone" if which == "tiny" else "vitb_backbone")
    kg = _model(backbone, "kgcoop", classnames)
    adapter = _model(backbone, "clip_adapter", classnames)
    d = backbone.embed_dim
    assert kg.num_trainable() == 4 * backbone.text_width
    assert adapter.num_trainable() == 2 * d * (d // 4)
    if which == "vitb":
        assert (kg.num_trainable(), adapter.num_trainable()) == (2_048, 131_072)  # 4 x 512; 2 x 512 x 128


def _cached_feature_batch(method, n: int = 8) -> ClassificationBatch:
    """Image features as the task caches them for a method that leaves both towers frozen. Distinct random features:
    a random CLIP maps noise images to nearly one direction (cosines ~0.98), leaving an image-side method little to
    separate."""
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(n, method.backbone.embed_dim, generator=g)
    return ClassificationBatch(torch.arange(n) % len(method.classnames), image_feats=feats,
                               text_feats=method.text_features())  # fmt: skip


@pytest.mark.parametrize("name, lr", [("kgcoop", 0.01), ("clip_adapter", 0.05)])
def test_a_few_steps_lower_the_loss(tiny_backbone, classnames, batch, name, lr):
    method = _model(tiny_backbone, name, classnames, template=SATELLITE)
    if name == "clip_adapter":
        batch = _cached_feature_batch(method)
    accelerator = make_accelerator("fp32")
    step_module, optimizer = prepare_training(method, TrainConfig(lr=lr, optimizer="adamw"), accelerator)
    params = list(method.prompt_parameters().values())
    method.train()
    losses = [float(run_training_step(step_module, optimizer, batch, accelerator, params).loss.detach())
              for _ in range(20)]  # fmt: skip
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.parametrize("name, cls", [("kgcoop", KgCoOp), ("clip_adapter", ClipAdapter)])
def test_save_pretrained_round_trips_with_identical_logits(tiny_backbone, classnames, pixels, tmp_path, name, cls):
    options = {"weight": 3.0} if name == "kgcoop" else {"ratio": 0.4}
    method = _model(tiny_backbone, name, classnames, options, template=SATELLITE)
    _perturb(method)
    method.eval()
    with torch.no_grad():
        expected = method(pixel_values=pixels)
    method.save_pretrained(tmp_path / "prompt")
    loaded = cls.from_pretrained(tmp_path / "prompt", backbone=tiny_backbone)
    assert type(loaded) is cls and loaded.registered_name == name
    assert loaded.config == method.config and loaded.template == SATELLITE
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(loaded(pixel_values=pixels), expected)


# =============================================================================================== learning
@pytest.mark.parametrize("name", ["kgcoop", "clip_adapter", "promptsrc", "clip_lora"])
def test_trained_on_the_embedded_model_each_beats_chance_clearly(tmp_path, name):
    """16 shots of toy:colours, seed 1, the toy recipe the embedded model carries (AdamW, 10 epochs)."""
    from vlprompt.engine.api import DataOptions, RunOptions, load_splits

    data = DataOptions(dataset="toy:colours", shots=16, seed=1)
    chance = 100.0 / len(load_splits(data).classnames)
    result = vlprompt.train(RunOptions(model="embedded", method=name, data=data, output=str(tmp_path / name)),
                            progress=False, log=lambda _: None)  # fmt: skip
    print(f"{name}: toy:colours test accuracy {result['accuracy']:.1f}% (chance {chance:.1f}%)")
    assert result["accuracy"] >= 4 * chance, (name, result["accuracy"], chance)
