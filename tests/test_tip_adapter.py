"""Tip-Adapter (training-free): what makes it that method (tests/test_matrix.py runs the shared checks).

- alpha 0 is zero-shot exactly; logits equal an independent computation of
  alpha exp(-beta (1 - f K^T)) V + the backbone's own zero-shot scoring (CLIP and SigLIP);
- the cache holds exactly the L2-normalised training features and their one-hot labels; nothing is trainable;
- the (alpha, beta) search picks the grid point with the best validation accuracy on a constructed case whose answer
  is known, and keeps the configured 1.0 / 5.5 without validation images;
- a saved model reloads with identical logits; it refuses new class names but scores a subset of its classes;
- fitted through ``vlprompt.train`` on the embedded model's toy:colours it is no worse than zero-shot (-2 points).
Tip-Adapter-F: the fit makes its keys the only trainable tensor (N x d) with Tip-Adapter's logits; steps change the
keys only and the logits keep the cache formula; alpha / beta are searched again at the end; keys reload in place
(a resume keeps training them) and round-trip; trained through the engine it beats the training-free cache.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import vlprompt
import vlprompt.methods.tip_adapter  # noqa: F401  (registers "tip_adapter")
from vlprompt.backbones import load_backbone
from vlprompt.methods import get_prompt_model
from vlprompt.engine.trainer import TrainConfig, make_accelerator, prepare_training, run_training_step
from vlprompt.methods.tip_adapter import TipAdapter, TipAdapterF
from vlprompt.tasks.batches import ClassificationBatch

PHOTO = "a photo of a {}."


def _model(backbone, classnames, config=None, name="tip_adapter"):
    return get_prompt_model(backbone, name, classnames, PHOTO, config or {})


def _feats(backbone, n, seed):
    return torch.randn(n, backbone.embed_dim, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def pixels(tiny_backbone):
    g = torch.Generator().manual_seed(0)
    return torch.randn(4, 3, tiny_backbone.image_size, tiny_backbone.image_size, generator=g)


@pytest.fixture
def fitted(tiny_backbone, classnames):
    """A Tip-Adapter fitted on 12 random features (3 per class), no validation: alpha 1.0, beta 5.5."""
    method = _model(tiny_backbone, classnames)
    train = _feats(tiny_backbone, 12, 1)
    labels = torch.arange(12) % len(classnames)
    method.fit_features(train, labels, train[:0], labels[:0])
    return method, train, labels


def test_defaults_and_option_checks(tiny_backbone, classnames):
    method = _model(tiny_backbone, classnames)
    assert isinstance(method, TipAdapter) and _model(tiny_backbone, classnames, name="tip-adapter").name == "tip_adapter"
    assert (method.config.alpha, method.config.beta) == (1.0, 5.5)
    assert method.config.betas == [float(b) for b in range(1, 11)]
    assert method.config.alphas == [0.1, 0.5, 1.0, 2.0, 3.0, 5.0]
    assert method.num_trainable() == 0 and not method.prompt_parameters()
    assert method.tied_to_classes(method.config) and method.fits_features
    for bad in ({"alphas": []}, {"betas": []}, {"betas": [0.0]}, {"alphas": [-1.0]}, {"beta": 0.0}):
        with pytest.raises(vlprompt.MethodConfigError, match="tip_adapter"):
            _model(tiny_backbone, classnames, bad)


def test_with_alpha_zero_the_logits_are_zero_shots_exactly(tiny_backbone, classnames, pixels):
    method = _model(tiny_backbone, classnames, {"alpha": 0.0})
    train = _feats(tiny_backbone, 8, 1)
    info = method.fit_features(train, torch.arange(8) % len(classnames), train[:0], torch.zeros(0, dtype=torch.long))
    assert info == {"alpha": 0.0, "beta": 5.5} and method.cache_keys.shape[0] == 8
    zeroshot = _model(tiny_backbone, classnames, name="zeroshot")
    with torch.no_grad():
        assert torch.equal(method(pixel_values=pixels), zeroshot(pixel_values=pixels))


@pytest.mark.parametrize("preset", ["random:tiny", "random:siglip-tiny"])
def test_logits_are_the_cache_term_plus_the_backbones_zero_shot_scoring(preset, classnames):
    backbone = load_backbone(preset)
    method = _model(backbone, classnames)
    train, labels = _feats(backbone, 10, 1), torch.arange(10) % len(classnames)
    method.fit_features(train, labels, train[:0], labels[:0])
    test = _feats(backbone, 5, 2)
    with torch.no_grad():
        got = method(image_feats=test)
        # independently: keys / values / zero-shot written out
        text = backbone.encode_texts([PHOTO.format(c) for c in classnames])
        f = test / test.norm(dim=-1, keepdim=True)
        keys = train / train.norm(dim=-1, keepdim=True)
        values = torch.eye(len(classnames))[labels]
        zero_shot = backbone.logit_scale * f @ (text / text.norm(dim=-1, keepdim=True)).t()
        if backbone.logit_bias is not None:
            zero_shot = zero_shot + backbone.logit_bias
        expected = 1.0 * torch.exp(-5.5 * (1 - f @ keys.t())) @ values + zero_shot
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, zero_shot, atol=1e-3)  # the cache term is really there


def test_the_cache_holds_the_normalised_training_features_and_one_hot_labels(fitted, classnames):
    method, train, labels = fitted
    assert torch.equal(method.cache_keys, F.normalize(train, dim=-1))
    assert torch.equal(method.cache_values, F.one_hot(labels, len(classnames)).float())
    assert torch.allclose(method.cache_keys.norm(dim=-1), torch.ones(len(train)))
    assert (float(method.alpha), float(method.beta)) == (1.0, 5.5)
    assert method.num_trainable() == 0


def test_the_search_picks_the_best_validation_accuracy_on_a_known_case(tiny_backbone, monkeypatch):
    """Class text features are the basis vectors e0, e1, e2; training image k of class c points at e_{(c+1) % 3}
    (zero-shot gets every one wrong) plus noise in the other dimensions. Class 0 has four images, 1 and 2 one each;
    validation is the images of classes 1 and 2. Only (alpha 1000, beta 50) gets them right: a tiny alpha leaves
    zero-shot's wrong answer, a flat beta (0.01) makes the cache a class count (class 0 wins)."""
    d = tiny_backbone.embed_dim
    method = _model(tiny_backbone, ["a", "b", "c"], {"alphas": [0.001, 1000.0], "betas": [0.01, 50.0]})
    basis = torch.eye(d)[:3]
    monkeypatch.setattr(method, "_template_features", lambda names: basis[: len(names)])
    labels = torch.tensor([0, 0, 0, 0, 1, 2])
    noise = 0.3 * _feats(tiny_backbone, 6, 3)
    noise[:, :3] = 0
    feats = basis[(labels + 1) % 3] + noise
    val_feats, val_labels = feats[4:], labels[4:]
    # the premise: zero-shot is wrong on every validation image
    zero_shot = tiny_backbone.score(val_feats, basis)
    assert (zero_shot.argmax(-1) != val_labels).all()
    info = method.fit_features(feats, labels, val_feats, val_labels)
    assert info == {"alpha": 1000.0, "beta": 50.0, "val_acc": 1.0}
    # every other grid point is worse, computed independently
    f, k = F.normalize(val_feats, dim=-1), F.normalize(feats, dim=-1)
    for a in (0.001, 1000.0):
        for b in (0.01, 50.0):
            logits = zero_shot + a * torch.exp(-b * (1 - f @ k.t())) @ F.one_hot(labels, 3).float()
            acc = (logits.argmax(-1) == val_labels).float().mean().item()
            assert acc == (1.0 if (a, b) == (1000.0, 50.0) else 0.0), (a, b, acc)
    with torch.no_grad():
        assert torch.equal(method(image_feats=val_feats).argmax(-1), val_labels)


def test_save_pretrained_round_trips_with_identical_logits(tiny_backbone, classnames, pixels, tmp_path):
    method = _model(tiny_backbone, classnames, {"alphas": [0.5, 2.0], "betas": [3.0, 7.0]})
    train, labels = _feats(tiny_backbone, 12, 1), torch.arange(12) % len(classnames)
    val, val_labels = _feats(tiny_backbone, 8, 4), torch.arange(8) % len(classnames)
    info = method.fit_features(train, labels, val, val_labels)
    method.eval()
    with torch.no_grad():
        expected = method(pixel_values=pixels)
    method.save_pretrained(tmp_path / "prompt")
    loaded = TipAdapter.from_pretrained(tmp_path / "prompt", backbone=tiny_backbone)
    assert type(loaded) is TipAdapter and loaded.config == method.config
    assert (float(loaded.alpha), float(loaded.beta)) == (info["alpha"], info["beta"])
    assert torch.equal(loaded.cache_keys, method.cache_keys) and torch.equal(loaded.cache_values, method.cache_values)
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(loaded(pixel_values=pixels), expected)


def test_refuses_new_class_names_but_scores_a_subset(fitted, classnames, pixels, tmp_path):
    method, _, _ = fitted
    with torch.no_grad():
        full = method(pixel_values=pixels)
    with pytest.raises(ValueError, match="tied to the 4 classes"):
        method.set_classes([classnames[0], "zebra"])
    assert method.classnames == classnames
    subset = [classnames[2], classnames[0]]
    method.set_classes(subset)
    with torch.no_grad():
        torch.testing.assert_close(method(pixel_values=pixels), full[:, [2, 0]], atol=1e-5, rtol=1e-5)
    method.set_classes(classnames)  # back to all of them: the zero-shot features are recomputed for the full set
    with torch.no_grad():
        assert torch.equal(method(pixel_values=pixels), full)
    # a saved model loaded onto a subset
    method.save_pretrained(tmp_path / "prompt")
    loaded = TipAdapter.from_pretrained(tmp_path / "prompt", backbone=method.backbone, classnames=subset)
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values=pixels), full[:, [2, 0]], atol=1e-5, rtol=1e-5)


def test_fitted_on_the_embedded_model_it_is_no_worse_than_zero_shot(tmp_path):
    """16 shots of toy:colours, seed 1: the cache plus zero-shot, alpha / beta searched on the validation split."""
    from vlprompt.engine.api import DataOptions, RunOptions

    data = DataOptions(dataset="toy:colours", shots=16, seed=1)
    results = {
        name: vlprompt.train(RunOptions(model="embedded", method=name, data=data, output=str(tmp_path / name)),
                             progress=False, log=lambda _: None)  # fmt: skip
        for name in ("zeroshot", "tip_adapter")
    }
    tip, zs = results["tip_adapter"]["accuracy"], results["zeroshot"]["accuracy"]
    print(f"toy:colours test accuracy: tip_adapter {tip:.1f}%, zeroshot {zs:.1f}%")
    assert tip >= zs - 2.0, (tip, zs)
    loaded = vlprompt.PromptMethod.from_pretrained(tmp_path / "tip_adapter")
    assert isinstance(loaded, TipAdapter) and loaded.cache_keys.shape[0] > 0


# =============================================================================================== Tip-Adapter-F
def _fitted_f(backbone, classnames, config=None):
    method = _model(backbone, classnames, config, name="tip_adapter_f")
    train, labels = _feats(backbone, 12, 1), torch.arange(12) % len(classnames)
    val, val_labels = _feats(backbone, 8, 4), torch.arange(8) % len(classnames)
    method.fit_features(train, labels, val, val_labels)
    return method, train, labels, val, val_labels


def test_tip_adapter_f_starts_as_the_fitted_cache_with_its_keys_as_the_only_trainable_tensor(tiny_backbone, classnames):
    method = _model(tiny_backbone, classnames, name="tip_adapter_f")
    assert isinstance(method, TipAdapterF) and method.trains_after_fit and method.fits_features
    assert method.num_trainable() == 0  # nothing to train before the fit
    method, train, labels, val, val_labels = _fitted_f(tiny_backbone, classnames)
    assert set(method.prompt_parameters()) == {"cache_keys"}
    assert method.num_trainable() == 12 * tiny_backbone.embed_dim  # N x d
    assert torch.equal(method.cache_keys.detach(), F.normalize(train, dim=-1))
    # Its logits right after the fit are training-free Tip-Adapter's with the same alpha / beta.
    plain = _model(tiny_backbone, classnames)
    plain.fit_features(train, labels, val, val_labels)
    assert (float(plain.alpha), float(plain.beta)) == (float(method.alpha), float(method.beta))
    with torch.no_grad():
        assert torch.equal(method(image_feats=val), plain(image_feats=val))


def test_tip_adapter_f_steps_train_the_keys_only_and_the_logits_keep_the_cache_formula(tiny_backbone, classnames):
    method, train, labels, _, _ = _fitted_f(tiny_backbone, classnames)
    frozen = {n: p.clone() for n, p in tiny_backbone.model.named_parameters()}
    values, keys_before = method.cache_values.clone(), method.cache_keys.detach().clone()
    accelerator = make_accelerator("fp32")
    step_module, optimizer = prepare_training(method, TrainConfig(lr=0.01, optimizer="adamw"), accelerator)
    params = list(method.prompt_parameters().values())
    batch = ClassificationBatch(labels, image_feats=train, text_feats=method.text_features())
    method.train()
    losses = [float(run_training_step(step_module, optimizer, batch, accelerator, params).loss.detach())
              for _ in range(15)]  # fmt: skip
    assert losses[-1] < losses[0], losses
    assert not torch.equal(method.cache_keys.detach(), keys_before) and torch.equal(method.cache_values, values)
    assert all(torch.equal(p, frozen[n]) for n, p in tiny_backbone.model.named_parameters())
    # The trained keys enter the same formula (an independent computation).
    method.eval()
    f = F.normalize(train, dim=-1)
    cache = float(method.alpha) * torch.exp(-float(method.beta) * (1 - f @ method.cache_keys.detach().t())) @ values
    zeroshot = tiny_backbone.score(train, method.zero_shot_text_features())
    with torch.no_grad():
        torch.testing.assert_close(method(image_feats=train), zeroshot + cache, atol=1e-5, rtol=1e-5)


def test_tip_adapter_f_searches_alpha_beta_again_with_the_trained_keys(tiny_backbone, classnames, monkeypatch):
    method, *_ = _fitted_f(tiny_backbone, classnames)
    searched = []
    monkeypatch.setattr(method, "search_alpha_beta", lambda feats, labels: searched.append((feats, labels)))
    method.on_train_end()
    assert len(searched) == 1 and searched[0][0].shape == (8, tiny_backbone.embed_dim)


def test_tip_adapter_f_reloads_its_trained_keys_in_place_and_round_trips(tiny_backbone, classnames, pixels, tmp_path):
    method, *_ = _fitted_f(tiny_backbone, classnames)
    keys = method.cache_keys
    with torch.no_grad():
        keys.add_(0.05 * torch.randn(keys.shape, generator=torch.Generator().manual_seed(3)))
    state = method.prompt_state_dict()
    method.load_prompt_state_dict(state)  # as a resume does, with the optimiser already built over the keys
    assert method.cache_keys is keys
    method.eval()
    with torch.no_grad():
        expected = method(pixel_values=pixels)
    method.save_pretrained(tmp_path / "prompt")
    loaded = TipAdapterF.from_pretrained(tmp_path / "prompt", backbone=tiny_backbone)
    assert type(loaded) is TipAdapterF and torch.equal(loaded.cache_keys.detach(), keys.detach())
    assert loaded.num_trainable() == keys.numel()
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(loaded(pixel_values=pixels), expected)


def test_tip_adapter_f_trained_through_the_engine_beats_the_training_free_cache(tmp_path):
    """16 shots of toy:colours, seed 1, the toy recipe: the fit, 10 epochs on the keys, the search again."""
    from vlprompt.engine.api import DataOptions, RunOptions

    data = DataOptions(dataset="toy:colours", shots=16, seed=1)
    results = {
        name: vlprompt.train(RunOptions(model="embedded", method=name, data=data, output=str(tmp_path / name)),
                             progress=False, log=lambda _: None)["accuracy"]  # fmt: skip
        for name in ("tip_adapter", "tip_adapter_f")
    }
    print(f"toy:colours test accuracy: {results}")
    assert results["tip_adapter_f"] > results["tip_adapter"], results
    import json

    history = [json.loads(line) for line in (tmp_path / "tip_adapter_f" / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history if "train_loss" in h] == list(range(1, 11))
