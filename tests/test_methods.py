"""Prompt methods: zero-size prompts, frozen backbone, parameter counts, CoOp options, configs, checkpoints, learning."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vlprompt.backbones import load_backbone
from vlprompt.methods import METHODS, MethodConfigError, get_prompt_model, make_config
from vlprompt.methods.zeroshot import ENSEMBLE_TEMPLATES
from vlprompt.tasks.batches import ClassificationBatch

PLAIN = "{}."


@pytest.fixture(scope="module")
def vitb_backbone():
    return load_backbone("random:vit-b-16")


@pytest.fixture
def pixels(tiny_backbone):
    g = torch.Generator().manual_seed(0)
    return torch.randn(4, 3, tiny_backbone.image_size, tiny_backbone.image_size, generator=g)


def _model(backbone, name, classnames, config=None, template="a photo of a {}.", seed=0):
    torch.manual_seed(seed)
    return get_prompt_model(backbone, name, classnames, template, config or {})


def _exactly_equal(a, b):
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- zero-size prompts
@pytest.mark.parametrize("class_position", ["end", "middle", "front"])
@torch.no_grad()
def test_coop_without_context_is_zeroshot(tiny_backbone, classnames, pixels, class_position):
    zs = _model(tiny_backbone, "zeroshot", classnames, template=PLAIN)
    coop = _model(tiny_backbone, "coop", classnames, {"n_ctx": 0, "class_position": class_position})
    assert coop.num_trainable() == 0
    assert torch.equal(coop.text_features(), zs.text_features())
    _exactly_equal(coop(pixels), zs(pixels))


@pytest.mark.parametrize("name", ["vpt_shallow", "vpt_deep"])
@torch.no_grad()
def test_vpt_without_tokens_is_zeroshot(tiny_backbone, classnames, pixels, name):
    zs = _model(tiny_backbone, "zeroshot", classnames, template=PLAIN)
    vpt = _model(tiny_backbone, name, classnames, {"n_tokens": 0}, template=PLAIN)
    assert vpt.num_trainable() == 0
    assert torch.equal(vpt.image_features(pixels), zs.image_features(pixels))
    _exactly_equal(vpt(pixels), zs(pixels))


@torch.no_grad()
def test_ivlp_without_tokens_is_zeroshot(tiny_backbone, classnames, pixels):
    zs = _model(tiny_backbone, "zeroshot", classnames, template=PLAIN)
    ivlp = _model(tiny_backbone, "ivlp", classnames, {"n_text": 0, "n_image": 0, "placeholder": "{}."})
    assert ivlp.num_trainable() == 0
    assert torch.equal(ivlp.text_features(), zs.text_features())
    assert torch.equal(ivlp.image_features(pixels), zs.image_features(pixels))
    _exactly_equal(ivlp(pixels), zs(pixels))


@torch.no_grad()
def test_ivlp_text_placeholder_follows_spec(tiny_backbone, classnames):
    """methods.md: IVLP's n=2 prompt is [SOS] v1 v2 of a CLASS . [EOS]; with v = the words "a photo" (and no
    deeper text prompts) that is exactly the sentence "a photo of a CLASS."."""
    ivlp = _model(tiny_backbone, "ivlp", classnames, {"text_depth": 1})
    expected = tiny_backbone.encode_texts([f"a photo of a {c}." for c in classnames])
    torch.testing.assert_close(ivlp.text_features(), expected, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- frozen backbone
@pytest.mark.parametrize(
    "name, config",
    [("coop", {"n_ctx": 4}), ("vpt_deep", {"n_tokens": 4}), ("vpt_shallow", {"n_tokens": 4}), ("ivlp", {})],
)
def test_only_prompts_get_gradients(tiny_backbone, classnames, pixels, name, config):
    model = _model(tiny_backbone, name, classnames, config)
    labels = torch.tensor([0, 1, 2, 3])
    loss = model.loss(model(pixels), labels)
    loss.backward()
    for pname, p in model.backbone.named_parameters():
        assert p.grad is None, f"backbone parameter {pname} received a gradient"
        assert not p.requires_grad, f"backbone parameter {pname} is trainable"
    prompts = model.prompt_parameters()
    assert prompts and all(not n.startswith("backbone.") for n in prompts)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(prompts)
    for pname, p in prompts.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"prompt {pname} got no gradient"
        if p.dim() == 3:  # deep prompts: every layer's set must receive gradient
            per_layer = p.grad.abs().flatten(1).sum(1)
            assert bool((per_layer > 0).all()), f"{pname}: layers without gradient {per_layer.tolist()}"


# ----------------------------------------------------------------------------- parameter counts
def _expected_counts(backbone, n_classes):
    d_t, d_v, d, layers_v, layers_t = (
        backbone.text_width,
        backbone.vision_width,
        backbone.embed_dim,
        backbone.vision_layers,
        backbone.text_layers,
    )
    return {
        ("coop", ()): 16 * d_t,
        ("coop", (("class_specific", True),)): n_classes * 16 * d_t,
        ("vpt_deep", ()): 8 * d_v * layers_v,
        ("vpt_shallow", ()): 8 * d_v,
        ("ivlp", ()): 2 * d_t * layers_t + 2 * d_v * layers_v,
        ("linear_probe", ()): n_classes * d + n_classes,
        ("zeroshot", ()): 0,
    }


@pytest.mark.parametrize("which", ["tiny", "vitb"])
def test_parameter_counts_follow_formula(request, classnames, which):
    backbone = request.getfixturevalue("tiny_backbone" if which == "tiny" else "vitb_backbone")
    for (name, options), expected in _expected_counts(backbone, len(classnames)).items():
        model = _model(backbone, name, classnames, dict(options))
        assert model.num_trainable() == expected, (name, options)
        assert sum(t.numel() for t in model.prompt_state_dict().values()) == expected


def test_parameter_counts_vitb16_reference_numbers(vitb_backbone, classnames):
    clip_methods = [n for n, spec in METHODS.items() if spec.method_class.backbone_kind == vitb_backbone.kind
                    and spec.method_class.required_sites <= vitb_backbone.sites]
    counts = {name: _model(vitb_backbone, name, classnames).num_trainable() for name in clip_methods}
    assert counts["coop"] == 8_192
    assert counts["vpt_deep"] == 73_728
    assert counts["vpt_shallow"] == 6_144
    assert counts["ivlp"] == 30_720
    assert counts["linear_probe"] == 4 * 512 + 4
    assert counts["zeroshot"] == 0
    specific = _model(vitb_backbone, "coop", classnames, {"class_specific": True, "n_ctx": 16})
    assert specific.num_trainable() == 4 * 16 * 512


def test_deep_presets_follow_backbone_depth(tiny_backbone, classnames):
    assert make_config("vpt_deep", {}, tiny_backbone).depth == tiny_backbone.vision_layers
    assert make_config("vpt_shallow", {}, tiny_backbone).depth == 1
    ivlp = make_config("ivlp", {}, tiny_backbone)
    assert (ivlp.text_depth, ivlp.image_depth) == (tiny_backbone.text_layers, tiny_backbone.vision_layers)
    layers = tiny_backbone.vision_layers
    with pytest.raises(MethodConfigError, match=rf"vpt\.depth={layers + 1} exceeds the {layers} layers of the image "
                                                rf"tower.*use at most {layers} \(or 'all'\)"):
        _model(tiny_backbone, "vpt_deep", classnames, {"depth": layers + 1})


class _DeeperThanViTB:
    """What make_config asks of a backbone, for a ViT-L/14-like one: 12 text and 24 image layers."""

    kind = "dual_encoder"
    family = "clip"
    sites = frozenset()

    def layers(self, tower):
        return {"text": 12, "image": 24, "both": 12}[tower]

    def why_missing(self, site):
        return ""


def test_deep_presets_reach_every_layer_of_a_tower_deeper_than_vit_b():
    """ViT-L/14: 12 text and 24 image layers. "Deep" is J = L, not ViT-B's 12; MaPLe keeps its paper depth 9."""
    deeper = _DeeperThanViTB()
    assert make_config("vpt_deep", {}, deeper).depth == 24
    for name in ("ivlp", "deep_prompt"):
        config = make_config(name, {}, deeper)
        assert (config.text_depth, config.image_depth) == (12, 24)
    assert make_config("maple", {}, deeper).depth == 9
    assert make_config("vpt_deep", {"depth": 6}, deeper).depth == 6  # an explicit depth is kept
    assert make_config("vpt_deep", {"depth": "all"}, deeper).depth == 24
    with pytest.raises(MethodConfigError, match="exceeds the 24 layers of the image tower"):
        make_config("vpt_deep", {"depth": 25}, deeper)
    assert make_config("vpt_deep").depth == 12  # no backbone to count on: the config's default


# ----------------------------------------------------------------------------- CoOp options
def test_coop_phrase_init(tiny_backbone, classnames):
    coop = _model(tiny_backbone, "coop", classnames, {"init": "a photo of a"})
    assert coop.config.n_ctx == 4
    assert coop.ctx.shape == (4, tiny_backbone.text_width)
    words = torch.tensor([320, 1125, 539, 320])  # "a photo of a"
    assert torch.equal(coop.ctx.detach(), tiny_backbone.embed_tokens(words))


@torch.no_grad()
def test_coop_phrase_init_equals_zeroshot_template(tiny_backbone, classnames, pixels):
    coop = _model(tiny_backbone, "coop", classnames, {"init": "a photo of a", "class_position": "end"})
    zs = _model(tiny_backbone, "zeroshot", classnames, template="a photo of a {}.")
    assert torch.equal(coop.text_features(), zs.text_features())
    _exactly_equal(coop(pixels), zs(pixels))


@torch.no_grad()
def test_coop_class_positions_differ(tiny_backbone, classnames):
    feats = {
        pos: _model(tiny_backbone, "coop", classnames, {"n_ctx": 4, "class_position": pos}).text_features()
        for pos in ("end", "middle", "front")
    }
    assert not torch.allclose(feats["end"], feats["middle"])
    assert not torch.allclose(feats["end"], feats["front"])
    assert not torch.allclose(feats["middle"], feats["front"])


@torch.no_grad()
def test_coop_front_with_phrase_matches_written_sentence(tiny_backbone, classnames):
    """Class position "front": [SOS][CLASS][ctx][.][EOS]; with ctx = the words of "is a photo" it is that sentence."""
    coop = _model(tiny_backbone, "coop", classnames, {"init": "is a photo", "class_position": "front"})
    expected = tiny_backbone.encode_texts([f"{c} is a photo." for c in classnames])
    torch.testing.assert_close(coop.text_features(), expected, atol=1e-5, rtol=0)


@torch.no_grad()
def test_coop_middle_with_phrase_matches_written_sentence(tiny_backbone, classnames):
    """Class position "middle": [SOS][ctx[:M/2]][CLASS][ctx[M/2:]][.][EOS]."""
    coop = _model(tiny_backbone, "coop", classnames, {"init": "a photo of a", "class_position": "middle"})
    expected = tiny_backbone.encode_texts([f"a photo {c} of a." for c in classnames])
    torch.testing.assert_close(coop.text_features(), expected, atol=1e-5, rtol=0)


@torch.no_grad()
def test_coop_set_classes(tiny_backbone, classnames, pixels):
    coop = _model(tiny_backbone, "coop", classnames, {"n_ctx": 4})
    assert coop(pixels).shape == (4, 4)
    before = coop.text_features()
    coop.set_classes(["river", "pasture", "industrial buildings"])
    assert coop(pixels).shape == (4, 3)
    assert coop.text_features().shape == (3, tiny_backbone.embed_dim)
    coop.set_classes(classnames)
    _exactly_equal(coop.text_features(), before)


def test_class_specific_coop_refuses_other_classes(tiny_backbone, classnames):
    coop = _model(tiny_backbone, "coop", classnames, {"n_ctx": 4, "class_specific": True})
    assert coop.ctx.shape == (4, 4, tiny_backbone.text_width)
    with pytest.raises(ValueError, match="class-specific"):
        coop.set_classes(["river", "pasture"])
    with pytest.raises(ValueError, match="class-specific"):  # same count, other names: still refused
        coop.set_classes(["river", "pasture", "industrial buildings", "residential"])
    coop.set_classes(list(classnames))  # its own classes (e.g. with another template): allowed
    assert coop.text_features().shape == (4, tiny_backbone.embed_dim)


@torch.no_grad()
def test_refused_set_classes_leaves_model_unchanged(tiny_backbone, classnames):
    coop = _model(tiny_backbone, "coop", classnames, {"n_ctx": 4, "class_specific": True})
    before = coop.text_features()
    with pytest.raises(ValueError):
        coop.set_classes(["river", "pasture"])
    assert coop.classnames == classnames
    assert len(coop.class_text) == len(classnames)  # the derived class sentences are the previous classes' too
    torch.testing.assert_close(coop.text_features(), before, atol=0, rtol=0)


# ----------------------------------------------------------------------------- config validation
def test_unknown_option_is_named(tiny_backbone, classnames):
    with pytest.raises(MethodConfigError, match="n_ctxx"):
        _model(tiny_backbone, "coop", classnames, {"n_ctxx": 4})
    with pytest.raises(MethodConfigError, match="n_tokenz"):
        _model(tiny_backbone, "vpt_deep", classnames, {"n_tokenz": 4})


@pytest.mark.parametrize(
    "name, options, match",
    [
        ("coop", {"n_ctx": -1}, r"invalid options: coop\.n_ctx=-1 \(must be >= 0\)"),
        ("coop", {"class_position": "left"}, r"coop\.class_position='left' \(expected one of 'end', 'middle'"),
        ("coop", {"init_std": 0.0}, r"coop\.init_std=0\.0 \(must be > 0\)"),
        ("vpt_deep", {"n_tokens": -2}, r"vpt\.n_tokens=-2 \(must be >= 0\)"),
        ("vpt_deep", {"init": "xavier"}, r"vpt\.init='xavier' \(expected one of 'normal', 'uniform'\)"),
        ("vpt_deep", {"depth": 0}, r"vpt\.depth=0 \(must be >= 1\)"),
        ("ivlp", {"n_text": -1}, r"ivlp\.n_text=-1 \(must be >= 0\)"),
        ("ivlp", {"image_init": "zeros"}, r"ivlp\.image_init='zeros' \(expected one of 'normal', 'uniform'\)"),
        ("ivlp", {"n_text": 5}, "cannot replace 5 tokens of the placeholder"),  # "a photo of a {}." has only 4 words
        ("ivlp", {"placeholder": "a photo"}, r"ivlp\.placeholder='a photo' \(needs exactly one '\{\}'"),
        ("linear_probe", {"c_values": [1.0, -1.0]}, r"linear_probe\.c_values=\[1\.0, -1\.0\] \(each item must be > 0"),
    ],
)
def test_invalid_options_rejected(tiny_backbone, classnames, name, options, match):
    with pytest.raises(MethodConfigError, match=match):
        _model(tiny_backbone, name, classnames, options)


@pytest.mark.parametrize("init", [5, "   "])
def test_coop_bad_init_rejected(tiny_backbone, classnames, init):
    with pytest.raises(MethodConfigError, match="init"):
        _model(tiny_backbone, "coop", classnames, {"init": init})


def test_unknown_method_lists_available(tiny_backbone, classnames):
    with pytest.raises(MethodConfigError) as info:
        _model(tiny_backbone, "cocoop-xl", classnames)
    message = str(info.value)
    assert "cocoop-xl" in message
    for name in METHODS:
        assert name in message


def test_aliases(tiny_backbone, classnames):
    assert type(_model(tiny_backbone, "zero-shot", classnames)).__name__ == "ZeroShot"
    assert _model(tiny_backbone, "vpt-shallow", classnames).config.depth == 1


# ----------------------------------------------------------------------------- zero-shot
@torch.no_grad()
def test_zeroshot_ensemble(tiny_backbone, classnames, pixels):
    single = _model(tiny_backbone, "zeroshot", classnames)
    ensemble = _model(tiny_backbone, "zeroshot", classnames, {"templates": "ensemble"})
    t_single, t_ens = single.text_features(), ensemble.text_features()
    assert t_ens.shape == t_single.shape == (4, tiny_backbone.embed_dim)
    assert not torch.allclose(F.normalize(t_single, dim=-1), F.normalize(t_ens, dim=-1), atol=1e-3)
    # the mean of the normalised features of the dataset template and CLIP's 7 templates
    templates = ["a photo of a {}."] + ENSEMBLE_TEMPLATES
    expected = torch.stack(
        [F.normalize(tiny_backbone.encode_texts([t.format(c) for c in classnames]), dim=-1) for t in templates]
    ).mean(0)
    torch.testing.assert_close(t_ens, expected, atol=1e-6, rtol=0)
    assert ensemble(pixels).shape == (4, 4)
    custom = _model(tiny_backbone, "zeroshot", classnames, {"templates": ["a photo of a {}.", "{}."]})
    assert not torch.allclose(custom.text_features(), t_ens)


@pytest.mark.parametrize("templates", [["a photo of a thing."], ["{}.", "no placeholder"], "all"])
def test_zeroshot_rejects_bad_templates(tiny_backbone, classnames, templates):
    with pytest.raises(MethodConfigError):
        _model(tiny_backbone, "zeroshot", classnames, {"templates": templates})


# ----------------------------------------------------------------------------- linear probe
def test_linear_probe_fits_separable_features(tiny_backbone, classnames):
    g = torch.Generator().manual_seed(0)
    d = tiny_backbone.embed_dim
    centers = torch.randn(4, d, generator=g) * 3

    def sample(n):
        y = torch.arange(4).repeat_interleave(n)
        return centers[y] + 0.3 * torch.randn(len(y), d, generator=g), y

    x_train, y_train = sample(10)
    x_val, y_val = sample(5)
    probe = _model(tiny_backbone, "linear_probe", classnames, {"c_values": [0.01, 1.0, 100.0]})
    assert probe.fits_features
    result = probe.fit_features(x_train, y_train, x_val, y_val)
    assert probe.chosen_c in (0.01, 1.0, 100.0) and result["c"] == probe.chosen_c
    assert result["val_acc"] == 1.0
    with torch.no_grad():
        acc = (probe(image_feats=x_train).argmax(-1) == y_train).float().mean().item()
    assert acc == 1.0
    with pytest.raises(ValueError, match="linear probe"):
        probe.set_classes(["a", "b"])


# ----------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("name", ["coop", "vpt_deep", "ivlp", "linear_probe"])
@torch.no_grad()
def test_prompt_state_dict_round_trip(tiny_backbone, classnames, pixels, name):
    a = _model(tiny_backbone, name, classnames, seed=0)
    b = _model(tiny_backbone, name, classnames, seed=1)
    if name == "linear_probe":  # zero-initialised: make the two differ
        a.head.weight.normal_()
        a.head.bias.normal_()
    state = a.prompt_state_dict()
    assert state and not any(k.startswith("backbone.") for k in state)
    assert set(state) == set(a.prompt_parameters())
    assert sum(t.numel() for t in state.values()) == a.num_trainable()
    assert not torch.equal(a(pixels), b(pixels))
    b.load_prompt_state_dict(state)
    assert torch.equal(a(pixels), b(pixels))
    # the state dict is a copy: changing it does not change the model
    next(iter(state.values())).add_(1.0)
    assert torch.equal(a(pixels), b(pixels))


def test_load_state_from_other_method_rejected(tiny_backbone, classnames):
    coop = _model(tiny_backbone, "coop", classnames)
    vpt = _model(tiny_backbone, "vpt_deep", classnames)
    with pytest.raises(ValueError, match=r"missing \['ctx'\].*unexpected \['prompts'\].*another method"):
        coop.load_prompt_state_dict(vpt.prompt_state_dict())


def test_load_state_with_wrong_shape_rejected(tiny_backbone, classnames):
    coop4 = _model(tiny_backbone, "coop", classnames, {"n_ctx": 4})
    coop8 = _model(tiny_backbone, "coop", classnames, {"n_ctx": 8})
    before = coop4.ctx.detach().clone()
    with pytest.raises(ValueError, match=r"'ctx' has shape \(8, 32\) but this model needs \(4, 32\)"):
        coop4.load_prompt_state_dict(coop8.prompt_state_dict())
    assert torch.equal(coop4.ctx.detach(), before)


# ----------------------------------------------------------------------------- learning
# Constant-colour images (one colour per class) plus noise: the random tiny vision tower pools patches almost
# uniformly, so colour is a feature it keeps apart (random-noise "images" all map to nearly the same feature).
COLOURS = torch.tensor([[1.0, -1.0, -1.0], [-1.0, 1.0, -1.0], [-1.0, -1.0, 1.0], [1.0, 1.0, 1.0]])


def _colour_images(seed, per_class, size=32, noise=0.2):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(4).repeat_interleave(per_class)
    images = COLOURS[labels][:, :, None, None] + noise * torch.randn(len(labels), 3, size, size, generator=g)
    return images, labels


def _accuracy(model, images, labels):
    with torch.no_grad():
        return (model(images).argmax(-1) == labels).float().mean().item()


@pytest.mark.parametrize(
    "name, config, lr",
    [
        # The random tiny text tower is a rough landscape: large steps in the token-embedding space (whose scale is
        # 0.02) overshoot, so CoOp uses a smaller Adam step than VPT.
        ("coop", {"n_ctx": 8}, 0.01),
        ("vpt_deep", {"n_tokens": 8}, 0.05),
    ],
)
def test_prompts_learn_an_easy_task(tiny_backbone, classnames, name, config, lr):
    train_x, train_y = _colour_images(seed=1, per_class=8)
    test_x, test_y = _colour_images(seed=2, per_class=8)
    zeroshot = _model(tiny_backbone, "zeroshot", classnames)
    zs_train, zs_test = _accuracy(zeroshot, train_x, train_y), _accuracy(zeroshot, test_x, test_y)

    model = _model(tiny_backbone, name, classnames, config, seed=0)
    optimizer = torch.optim.Adam(list(model.prompt_parameters().values()), lr=lr)
    cached = {}
    with torch.no_grad():  # the untouched tower is computed once
        if "image" in model.cacheable_towers:
            cached["image_feats"] = model.image_features(train_x)
        if "text" in model.cacheable_towers:
            cached["text_feats"] = model.text_features()
    assert len(cached) == 1  # CoOp leaves the image tower alone, VPT the text tower
    losses = []
    for _ in range(40):
        inputs = {} if "image_feats" in cached else {"pixel_values": train_x}
        loss = model.training_step(ClassificationBatch(train_y, **inputs, **cached)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    train_acc, test_acc = _accuracy(model, train_x, train_y), _accuracy(model, test_x, test_y)
    assert losses[-1] < 0.9 * losses[0]
    assert train_acc >= zs_train + 0.4, (train_acc, zs_train)
    assert test_acc >= zs_test + 0.4, (test_acc, zs_test)


def test_training_mode_leaves_the_frozen_towers_in_eval_mode(classnames):
    """With attention dropout in the config, a tower switched to training mode would no longer be frozen."""
    from transformers.models.clip.modeling_clip import CLIPAttention

    backbone = load_backbone("random:tiny")
    attentions = [m for m in backbone.model.modules() if isinstance(m, CLIPAttention)]
    assert attentions
    for attention in attentions:
        attention.dropout = 0.5  # what attention_dropout=0.5 in the config sets
    for name in ("coop", "vpt_deep", "maple"):
        method = _model(backbone, name, classnames).train()
        assert method.training and not any(m.training for m in backbone.model.modules())
        images = torch.randn(2, 3, backbone.image_size, backbone.image_size)
        with torch.no_grad():
            torch.testing.assert_close(method(images), method(images), atol=0, rtol=0)


def test_class_specific_contexts_start_from_a_draw_per_class(tiny_backbone, classnames):
    coop = _model(tiny_backbone, "coop", classnames, {"class_specific": True, "n_ctx": 4})
    assert coop.ctx.shape == (len(classnames), 4, tiny_backbone.text_width)
    assert not torch.equal(coop.ctx[0], coop.ctx[1])


@pytest.mark.parametrize("name,options", [("coop", {"class_position": "middle"}), ("coop", {"init": "a photo of a"}),
                                          ("cocoop", {"init": "a photo of a"})])
def test_prompts_stay_fp32_on_a_bfloat16_backbone(classnames, name, options):
    backbone = load_backbone("random:tiny")
    backbone.model.to(torch.bfloat16)
    method = _model(backbone, name, classnames, options)
    assert all(p.dtype == torch.float32 for p in method.prompt_parameters().values())
    images = torch.randn(2, 3, backbone.image_size, backbone.image_size, dtype=torch.bfloat16)
    logits = method(images)
    assert logits.shape == (2, len(classnames)) and torch.isfinite(logits.float()).all()


@torch.no_grad()
def test_class_tied_methods_score_a_subset_of_their_classes_exactly(tiny_backbone, classnames, pixels):
    """ImageNet-A / -R: 200 of ImageNet's 1000 classes; CoOp reports the linear probe on them."""
    subset = [classnames[2], classnames[0]]
    probe = _model(tiny_backbone, "linear_probe", classnames)
    probe.head.weight.normal_()
    probe.head.bias.normal_()
    full = probe(pixels)
    probe.set_classes(subset)
    torch.testing.assert_close(probe(pixels), full[:, [2, 0]], atol=0, rtol=0)
    for position in ("end", "middle"):
        coop = _model(tiny_backbone, "coop", classnames, {"n_ctx": 4, "class_specific": True,
                                                          "class_position": position})
        full = coop.text_features()
        coop.set_classes(subset)
        torch.testing.assert_close(coop.text_features(), full[[2, 0]], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="subset"):
        probe.set_classes([classnames[0], "zebra"])
