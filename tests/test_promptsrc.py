"""PromptSRC: what makes it that method (tests/test_matrix.py runs the shared checks on every backbone).

- The released defaults: 4 + 4 tokens at depth 9, weights 25 / 10 / 1, Gaussian aggregation at epoch 15 (std 1),
  the 60 ImageNet templates; on ViT-B/16 it trains 9 x 4 x (512 + 768) = 46,080 numbers.
- The three regularisers equal an independent computation (L1 to the frozen ensemble text features, L1 to the frozen
  image features, KL(frozen || prompted) summed over the logits and divided by their number), and the loss adds
  them with their weights; with zero-size prompts and the model's own template as the ensemble all three are zero.
- The aggregated prompt equals the Gaussian-weighted mean of the per-epoch prompts (normalised over the epochs),
  also when the weights are far below float32's range; training ends on it; it survives a resume exactly.
"""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

import vlprompt
from vlprompt.backbones import load_backbone
from vlprompt.methods import get_prompt_model
from vlprompt.methods.promptsrc import IMAGENET_TEMPLATES_60, PromptSRC
from vlprompt.tasks.batches import ClassificationBatch

PHOTO = "a photo of a {}."


def _model(backbone, classnames, config=None, seed=0):
    torch.manual_seed(seed)
    return get_prompt_model(backbone, "promptsrc", classnames, PHOTO, config or {})


@pytest.fixture
def batch(tiny_backbone):
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(4, 3, tiny_backbone.image_size, tiny_backbone.image_size, generator=g)
    return ClassificationBatch(torch.tensor([0, 1, 2, 3]), pixel_values=pixels)


def _perturb(method, scale=0.05, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in method.prompt_parameters().values():
            p.add_(scale * torch.randn(p.shape, generator=g))


def test_defaults_are_the_released_ones_and_the_count_follows_the_formula(classnames):
    backbone = load_backbone("random:vit-b-16")
    method = _model(backbone, classnames)
    cfg = method.config
    assert (cfg.n_text, cfg.n_image, cfg.text_depth, cfg.image_depth) == (4, 4, 9, 9)
    assert (cfg.text_weight, cfg.image_weight, cfg.logit_weight, cfg.gpa_mean, cfg.gpa_std) == (25, 10, 1, 15, 1)
    assert cfg.placeholder == PHOTO and len(IMAGENET_TEMPLATES_60) == len(set(IMAGENET_TEMPLATES_60)) == 60
    assert method.num_trainable() == 9 * 4 * (512 + 768) == 46_080
    # the text prompt's first layer starts from the words "a photo of a"
    assert torch.equal(method.text_prompts[0].detach(), backbone.phrase_embeddings("a photo of a"))


@pytest.mark.parametrize("bad", [{"text_templates": "coco"}, {"text_templates": []}, {"text_templates": ["no slot"]},
                                 {"gpa_std": 0.0}, {"text_weight": -1.0}, {"gpa_mean": float("nan")},
                                 {"text_templates": ["art of {} {x}"]}, {"text_templates": ["a {} {0}"]}])
def test_bad_options_are_refused_naming_the_option(tiny_backbone, classnames, bad):
    with pytest.raises(vlprompt.MethodConfigError, match="promptsrc"):
        _model(tiny_backbone, classnames, bad)


def test_the_regularisers_equal_an_independent_computation_and_the_loss_weights_them(tiny_backbone, classnames,
                                                                                         batch):  # fmt: skip
    method = _model(tiny_backbone, classnames, {"text_templates": [PHOTO, "a drawing of a {}.", "the {}."]})
    _perturb(method)
    method.train()
    out = method.training_step(batch)
    with torch.no_grad():
        text = method.text_features()
        image = method.image_features(batch.pixel_values)
        logits = tiny_backbone.score(image, text)
        ensemble = torch.stack([tiny_backbone.encode_texts([t.format(c) for c in classnames])
                                for t in method.config.text_templates]).mean(0)  # fmt: skip
        frozen_text = F.normalize(ensemble, dim=-1)
        frozen_image = tiny_backbone.encode_image(batch.pixel_values)
        frozen_logits = tiny_backbone.score(frozen_image, frozen_text)
        text_l1 = (F.normalize(text, dim=-1) - frozen_text).abs().mean()
        image_l1 = (F.normalize(image, dim=-1) - F.normalize(frozen_image, dim=-1)).abs().mean()
        p_frozen = frozen_logits.softmax(-1)
        kl = (p_frozen * (p_frozen.log() - logits.log_softmax(-1))).sum() / logits.numel()
        ce = F.cross_entropy(logits, batch.labels)
    losses = {k: v.detach() for k, v in out.losses.items()}
    torch.testing.assert_close(losses["main"], ce)
    torch.testing.assert_close(losses["text_l1"], 25 * text_l1)
    torch.testing.assert_close(losses["image_l1"], 10 * image_l1)
    torch.testing.assert_close(losses["logits_kl"], kl, atol=1e-7, rtol=1e-4)
    assert float(text_l1) > 0 and float(image_l1) > 0 and float(kl) > 0


def test_with_zero_size_prompts_and_the_models_own_template_every_regulariser_is_zero(tiny_backbone, classnames,
                                                                                      batch):  # fmt: skip
    method = _model(tiny_backbone, classnames, {"n_text": 0, "n_image": 0, "text_templates": [PHOTO]})
    method.train()
    terms = method.training_step(batch).losses
    for name in ("text_l1", "image_l1", "logits_kl"):
        assert abs(float(terms[name])) < 1e-6, (name, float(terms[name]))
    # with the release's 60-template ensemble the frozen text target differs from one template's features
    ensemble = _model(tiny_backbone, classnames, {"n_text": 0, "n_image": 0})
    assert float(ensemble.training_step(batch).losses["text_l1"]) > 0


def _gauss(e, mean, std):
    return math.exp(-0.5 * ((e - mean) / std) ** 2) / (std * math.sqrt(2 * math.pi))


@pytest.mark.parametrize("mean, std, epochs", [(3.0, 2.0, 5), (15.0, 1.0, 20), (15.0, 1.0, 4), (30.0, 30.0, 7)])
def test_the_aggregate_is_the_gaussian_weighted_mean_of_the_per_epoch_prompts(tiny_backbone, classnames, mean, std,
                                                                               epochs):  # fmt: skip
    method = _model(tiny_backbone, classnames, {"gpa_mean": mean, "gpa_std": std})
    per_epoch = []
    g = torch.Generator().manual_seed(2)
    for epoch in range(epochs):
        with torch.no_grad():
            for p in method.prompt_parameters().values():
                p.copy_(torch.randn(p.shape, generator=g))
        per_epoch.append({n: p.detach().clone().double() for n, p in method.prompt_parameters().items()})
        method.on_epoch_end(epoch)
    # g(e) for e = 1..N, normalised over the N epochs; in log space where float64 underflows (15, 1, 4 epochs)
    logs = [-0.5 * ((e - mean) / std) ** 2 for e in range(1, epochs + 1)]
    top = max(logs)
    weights = [math.exp(x - top) for x in logs]
    weights = [w / sum(weights) for w in weights]
    if epochs == 20:  # the released normalisation, computed directly, agrees
        direct = [_gauss(e, mean, std) for e in range(1, epochs + 1)]
        assert max(abs(a - b / sum(direct)) for a, b in zip(weights, direct)) < 1e-12
    aggregate = method.aggregated_prompts()
    for name in aggregate:
        expected = sum(w * state[name] for w, state in zip(weights, per_epoch))
        torch.testing.assert_close(aggregate[name].double(), expected, atol=1e-6, rtol=1e-5)
    method.on_train_end()
    for name, p in method.prompt_parameters().items():
        assert torch.equal(p.detach(), aggregate[name])


def test_a_second_fresh_run_of_the_same_method_object_starts_a_fresh_aggregate(tiny_model_dir, engine_data_root,
                                                                                 engine_run_options, tmp_path):  # fmt: skip
    from vlprompt.engine.api import load_splits
    from vlprompt.engine.trainer import Trainer
    from vlprompt.tasks import ClassificationTask

    options = engine_run_options(tiny_model_dir, engine_data_root, tmp_path / "one", method="promptsrc",
                                 method_options={"text_depth": 1, "image_depth": 1, "gpa_mean": 1.0}, epochs=2)
    backbone = load_backbone(str(tiny_model_dir))
    splits = load_splits(options.data)
    method = vlprompt.get_prompt_model(backbone, "promptsrc", splits.classnames, splits.template,
                                       dict(options.method_options))  # fmt: skip
    for run in ("one", "two"):
        Trainer(options.train, tmp_path / run, progress=False, log=lambda _: None).fit(
            method, ClassificationTask(splits, backbone, augment=False))
        expected = math.log(sum(_gauss(e, 1.0, 1.0) for e in (1, 2)))  # this run's two epochs only
        assert method._log_total == pytest.approx(expected), run


def test_the_aggregate_survives_a_training_state_round_trip(tiny_backbone, classnames):
    method = _model(tiny_backbone, classnames)
    for epoch in range(3):
        _perturb(method, seed=epoch)
        method.on_epoch_end(epoch)
    state = method.training_state()
    other = _model(tiny_backbone, classnames, seed=5)
    other.load_training_state(state)
    assert other.aggregated_prompts().keys() == method.aggregated_prompts().keys()
    for name, value in method.aggregated_prompts().items():
        assert torch.equal(other.aggregated_prompts()[name], value)
    other.load_training_state({})  # a state saved before the method kept one: a fresh aggregate
    assert other.aggregated_prompts() == {}


def test_a_run_interrupted_after_an_epoch_resumes_to_the_same_aggregated_prompt(tiny_model_dir, engine_data_root,
                                                                                  engine_run_options, tmp_path,
                                                                                  monkeypatch):  # fmt: skip
    options = {"method": "promptsrc", "method_options": {"text_depth": 2, "image_depth": 2, "gpa_mean": 2.0},
               "epochs": 3, "lr": 0.01, "optimizer": "adamw", "augment": False}  # fmt: skip
    straight = vlprompt.train(engine_run_options(tiny_model_dir, engine_data_root, tmp_path / "straight", **options),
                              progress=False, log=lambda _: None)  # fmt: skip

    original = PromptSRC.on_epoch_end

    def crash_in_the_second_epoch(self, epoch):
        original(self, epoch)
        if epoch == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(PromptSRC, "on_epoch_end", crash_in_the_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        vlprompt.train(engine_run_options(tiny_model_dir, engine_data_root, tmp_path / "resumed", **options),
                       progress=False, log=lambda _: None)  # fmt: skip
    monkeypatch.setattr(PromptSRC, "on_epoch_end", original)
    state = json.loads((tmp_path / "resumed" / "checkpoint-last" / "state.json").read_text())
    assert state["epochs_done"] == 1
    resumed = vlprompt.train(engine_run_options(tiny_model_dir, engine_data_root, tmp_path / "resumed", **options),
                             resume=True, progress=False, log=lambda _: None)  # fmt: skip
    assert resumed["accuracy"] == straight["accuracy"]
    a = vlprompt.PromptMethod.from_pretrained(tmp_path / "straight")
    b = vlprompt.PromptMethod.from_pretrained(tmp_path / "resumed")
    for (name, p), q in zip(a.prompt_parameters().items(), b.prompt_parameters().values()):
        torch.testing.assert_close(q, p, atol=1e-6, rtol=1e-5, msg=name)
