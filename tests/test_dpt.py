"""DPT: top-K selection, auxiliary loss, placement, parameter counts, guidance warm-up, learning rates, learning."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vlprompt.backbones import load_backbone
from vlprompt.methods.base import MethodConfigError
from vlprompt.methods.dpt import DPT, DPTConfig
from vlprompt.methods.zeroshot import ZeroShot, ZeroShotConfig
from vlprompt.tasks.batches import ClassificationBatch

TEMPLATE = "a photo of a {}."
MANY = [f"class number {i}" for i in range(12)]  # 12 classes: K = 10 leaves 2 classes out of every top-K


def _dpt(backbone, classnames, template=TEMPLATE, seed=0, **options):
    torch.manual_seed(seed)
    return DPT(backbone, DPTConfig(**options), classnames, template)


def _zeroshot(backbone, classnames, template=TEMPLATE):
    return ZeroShot(backbone, ZeroShotConfig(), classnames, template)


def _encoded(model, pixels, text_feats=None):
    """What one forward pass of ``model`` computes on the image side (the pass ``forward`` and ``training_step``
    share): the prompted image features, each image's top-K class indices ``(B, K)`` and the auxiliary logits
    ``(B, CAVPT layers, K, C)``."""
    feats, _, topk, aux = model._encode(pixels, text_feats)
    return {"feats": feats, "topk": topk, "aux_logits": aux}


def _step(model, pixels, labels):
    """The trainer's call: named loss terms and logits of one batch."""
    return model.training_step(ClassificationBatch(labels, pixel_values=pixels))


@pytest.fixture
def pixels(tiny_backbone):
    g = torch.Generator().manual_seed(0)
    return torch.randn(4, 3, tiny_backbone.image_size, tiny_backbone.image_size, generator=g)


def _expected_count(backbone, n_classes, n_ctx=16, n_visual=10, bottom_limit=None, cavpt=True, cavpt_tokens=10,
                    attn_dim=32):
    d_t, d_v, d, layers = backbone.text_width, backbone.vision_width, backbone.embed_dim, backbone.vision_layers
    b = layers if bottom_limit is None else bottom_limit
    per_cavpt_layer = (
        d * d_v + d_v  # query map Linear(d -> d_v) with bias
        + 2 * d_v * attn_dim  # query / key projections, no bias
        + d_v * d_v  # value projection, no bias
        + cavpt_tokens * d_v  # learned key/value tokens
        + 2 * d_v  # prompt LayerNorm
        + 2 * d_v  # auxiliary LayerNorm
        + d_v * n_classes  # auxiliary Linear(d_v -> C), no bias
    )
    return n_ctx * d_t + (b - 1) * n_visual * d_v + (layers - b + 1) * per_cavpt_layer * cavpt


# ----------------------------------------------------------------------------- parameter counts
def test_trainable_count_vitb16_five_classes():
    backbone = load_backbone("random:vit-b-16")
    model = _dpt(backbone, [f"class {i}" for i in range(5)])
    assert model.num_trainable() == 1_140_224  # methods.md, checked against the released code
    assert model.num_trainable() == _expected_count(backbone, 5)
    assert sum(t.numel() for t in model.prompt_state_dict().values()) == 1_140_224


@pytest.mark.parametrize(
    "options",
    [{}, {"bottom_limit": 1}, {"cavpt": False}, {"n_visual": 0}, {"n_ctx": 4, "cavpt_tokens": 0, "attn_dim": 8}],
)
def test_trainable_count_follows_formula(tiny_backbone, classnames, options):
    model = _dpt(tiny_backbone, classnames, **options)
    assert model.num_trainable() == _expected_count(tiny_backbone, len(classnames), **options)


# ----------------------------------------------------------------------------- zero-size prompts
@torch.no_grad()
def test_without_prompts_and_cavpt_is_zeroshot(tiny_backbone, classnames, pixels):
    zs = _zeroshot(tiny_backbone, classnames, template="{}.")
    dpt = _dpt(tiny_backbone, classnames, n_ctx=0, n_visual=0, cavpt=False)
    assert dpt.num_trainable() == 0
    assert torch.equal(dpt.text_features(), zs.text_features())
    assert torch.equal(dpt.image_features(pixels), zs.image_features(pixels))
    torch.testing.assert_close(dpt(pixels), zs(pixels), atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- top-K and placement
@pytest.mark.parametrize("n_classes", [4, 12])
def test_selects_the_frozen_top_k(tiny_backbone, pixels, n_classes, monkeypatch):
    names = MANY[:n_classes]
    model = _dpt(tiny_backbone, names).train()
    k = min(10, n_classes)
    assert model.k == k
    assert model.ranks_classes() == (k < n_classes)
    monkeypatch.setattr(model, "ranks_classes", lambda: True)  # K = C skips the ranking (next test); force it
    encoded = _encoded(model, pixels)
    topk = encoded["topk"]
    assert topk.shape == (4, k)
    assert all(len(set(row.tolist())) == k for row in topk)
    with torch.no_grad():
        frozen_logits = _zeroshot(tiny_backbone, names)(pixels)  # frozen image vs hand-written template
    expected = frozen_logits.topk(k, dim=-1).indices
    assert torch.equal(topk, expected)
    assert encoded["aux_logits"].shape == (4, 1, k, n_classes)
    # the ranking comes from the frozen model: changing the learned prompts does not change it
    with torch.no_grad():
        for p in model.prompt_parameters().values():
            p.add_(torch.randn_like(p))
    assert torch.equal(_encoded(model, pixels)["topk"], expected)


def _layer_lengths(backbone, run):
    """Sequence length each image layer receives during ``run()``."""
    lengths, handles = [], []
    for layer in backbone.model.vision_model.encoder.layers:
        handles.append(layer.register_forward_pre_hook(lambda mod, args: lengths.append(args[0].shape[1])))
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return lengths


@torch.no_grad()
@pytest.mark.parametrize(
    "options, extra",
    [
        ({}, [10, 4]),  # B = L = 2: visual prompts in layer 0, CAVPT (K = 4) in the last layer
        ({"bottom_limit": 1}, [4, 4]),  # CAVPT in every layer (1-indexed layers 1..L)
        ({"cavpt": False}, [10, 0]),
        ({"n_visual": 3, "cavpt": False, "bottom_limit": 1}, [0, 0]),
    ],
)
def test_tokens_are_appended_per_layer_and_dropped(tiny_backbone, classnames, pixels, options, extra):
    model = _dpt(tiny_backbone, classnames, **options).eval()
    n_image_tokens = (tiny_backbone.image_size // tiny_backbone.patch_size) ** 2 + 1
    lengths = _layer_lengths(tiny_backbone, lambda: model.image_features(pixels))
    # K = C = 4 classes: no frozen ranking pass, one prompted pass only
    assert not model.ranks_classes() and len(lengths) == tiny_backbone.vision_layers
    assert lengths == [n_image_tokens + e for e in extra]


@pytest.mark.parametrize("aux_input", ["attention", "layer_output"])
@pytest.mark.parametrize("bottom_limit", [None, 1])
def test_all_classes_kept_skips_the_frozen_pass_with_the_same_results(tiny_backbone, pixels, monkeypatch, aux_input,
                                                                      bottom_limit):
    """K = C: the frozen ranking only orders the classes, which changes nothing; skipping it is exact."""
    names = MANY[:5]
    labels = torch.tensor([0, 4, 2, 2])

    def run(force_ranking: bool):
        model = _dpt(tiny_backbone, names, top_k=5, aux_input=aux_input, bottom_limit=bottom_limit).train()
        if force_ranking:
            monkeypatch.setattr(model, "ranks_classes", lambda: True)
        lengths = _layer_lengths(tiny_backbone, lambda: model(pixels))
        with torch.no_grad():
            topk = _encoded(model, pixels)["topk"]
        out = _step(model, pixels, labels)
        terms = out.losses
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.prompt_parameters().items()}
        logits = model(pixels).detach()
        torch.testing.assert_close(out.logits.detach(), logits)  # the step's logits are the forward's
        return len(lengths), topk, {k: v.detach() for k, v in terms.items()}, grads, logits

    passes, topk, terms, grads, logits = run(False)
    ranked_passes, ranked_topk, ranked_terms, ranked_grads, ranked_logits = run(True)
    assert passes == tiny_backbone.vision_layers and ranked_passes == 2 * tiny_backbone.vision_layers
    assert torch.equal(topk, torch.arange(5).expand(4, 5))
    assert not torch.equal(ranked_topk, topk)  # the ranking really orders the classes differently
    torch.testing.assert_close(logits, ranked_logits, atol=1e-5, rtol=1e-5)
    assert set(terms) == set(ranked_terms) == {"main", "aux"}
    for key in terms:
        torch.testing.assert_close(terms[key], ranked_terms[key], atol=1e-5, rtol=1e-5)
    for name, grad in grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grad, ranked_grads[name], atol=1e-5, rtol=1e-4, msg=name)


@torch.no_grad()
def test_visual_prompts_sit_after_the_pre_layernorm(tiny_backbone, classnames, pixels):
    """Layer 0's appended tokens are exactly the learned prompts (no LayerNorm / positional embedding applied)."""
    model = _dpt(tiny_backbone, classnames, cavpt=False).eval()
    seen = []
    layer0 = tiny_backbone.model.vision_model.encoder.layers[0]
    handle = layer0.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    try:
        model.image_features(pixels)
    finally:
        handle.remove()
    appended = seen[0][:, -10:]
    assert torch.equal(appended, model.visual_prompts[0].unsqueeze(0).expand(4, -1, -1))
    frozen = tiny_backbone.model.vision_model
    patches = frozen.pre_layrnorm(frozen.embeddings(pixels))
    torch.testing.assert_close(seen[0][:, :-10], patches)


def test_bottom_limit_beyond_tower_rejected(tiny_backbone, classnames):
    with pytest.raises(MethodConfigError, match="bottom_limit"):
        _dpt(tiny_backbone, classnames, bottom_limit=tiny_backbone.vision_layers + 1)


@pytest.mark.parametrize(
    "options, match",
    [
        ({"n_ctx": -1}, "n_ctx"),
        ({"n_visual": -1}, "n_visual"),
        ({"bottom_limit": 0}, "bottom_limit"),
        ({"top_k": 0}, "top_k"),
        ({"aux_input": "patches"}, "aux_input"),
        ({"alpha": -0.1}, "alpha"),
        ({"guidance_epochs": -1}, "guidance_epochs"),
        ({"visual_lr": 0}, "visual_lr"),
    ],
)
def test_invalid_options_rejected(options, match):
    with pytest.raises(MethodConfigError, match=match):
        DPTConfig(**options)


def test_unknown_option_named():
    with pytest.raises(MethodConfigError, match="topk"):
        DPTConfig.from_dict({"topk": 3})


# ----------------------------------------------------------------------------- auxiliary loss
def _two_image_case(tiny_backbone, pixels, **options):
    """12 classes (K = 10); image 0's label is outside its top-K, image 1's label is its 4th-ranked class."""
    model = _dpt(tiny_backbone, MANY, **options).train()
    logits = model(pixels[:2])
    encoded = _encoded(model, pixels[:2])
    topk = encoded["topk"]
    outside = sorted(set(range(12)) - set(topk[0].tolist()))[0]
    labels = torch.tensor([outside, int(topk[1, 3])])
    return model, logits, encoded, labels


@pytest.mark.parametrize("aux_input", ["attention", "layer_output"])
def test_aux_loss_counts_only_ground_truth_tokens(tiny_backbone, pixels, aux_input):
    model, logits, encoded, labels = _two_image_case(tiny_backbone, pixels, aux_input=aux_input)
    aux = encoded["aux_logits"]
    assert aux.shape == (2, 1, 10, 12)
    expected = F.cross_entropy(aux[1, 0, 3].unsqueeze(0), labels[1:])  # image 0 contributes nothing
    torch.testing.assert_close(model.aux_loss(aux, encoded["topk"], labels), expected)
    out = _step(model, pixels[:2], labels)
    terms = out.losses
    assert set(terms) == {"main", "aux"}
    torch.testing.assert_close(out.logits, logits)
    torch.testing.assert_close(terms["main"], F.cross_entropy(logits, labels))
    torch.testing.assert_close(terms["aux"], 0.3 * expected)
    torch.testing.assert_close(out.loss, terms["main"] + terms["aux"])
    # only image 0 (label outside its top-K): no auxiliary term at all
    assert model.aux_loss(aux[:1], encoded["topk"][:1], labels[:1]).item() == 0.0


def test_no_ground_truth_in_top_k_means_plain_cross_entropy(tiny_backbone, pixels):
    model, logits, encoded, labels = _two_image_case(tiny_backbone, pixels)
    out = _step(model, pixels[:1], labels[:1])
    assert out.losses["aux"].item() == 0.0
    loss = out.loss
    torch.testing.assert_close(loss, F.cross_entropy(out.logits, labels[:1]))
    torch.testing.assert_close(out.logits, logits[:1])
    loss.backward()  # still a valid graph


def test_aux_loss_averages_over_layers_and_images():
    aux = torch.randn(3, 2, 4, 6)  # 3 images, 2 CAVPT layers, K = 4, C = 6
    topk = torch.tensor([[0, 1, 2, 3], [5, 4, 3, 2], [1, 2, 3, 4]])
    labels = torch.tensor([2, 0, 4])  # image 1's label is not in its top-K
    rows = torch.stack([aux[0, 0, 2], aux[0, 1, 2], aux[2, 0, 3], aux[2, 1, 3]])
    expected = F.cross_entropy(rows, torch.tensor([2, 2, 4, 4]))
    torch.testing.assert_close(DPT.aux_loss(aux, topk, labels), expected)


# ----------------------------------------------------------------------------- gradients, eval, stash
def test_only_dpt_parameters_get_gradients(tiny_backbone, classnames, pixels):
    model = _dpt(tiny_backbone, classnames, guidance_epochs=1).train()  # guidance on: every loss term is used
    labels = torch.tensor([0, 1, 2, 3])
    out = _step(model, pixels, labels)
    assert set(out.losses) == {"main", "aux", "guidance_text", "guidance_image"}
    out.loss.backward()
    for name, p in model.backbone.named_parameters():
        assert p.grad is None and not p.requires_grad, name
    prompts = model.prompt_parameters()
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(prompts)
    assert not any(n.startswith("backbone.") for n in prompts)
    for name, p in prompts.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} got no gradient"
    per_layer = model.visual_prompts.grad.abs().flatten(1).sum(1)
    assert bool((per_layer > 0).all())


def _state(model):
    """Everything a module holds besides its parameters: plain attributes (by identity) and buffers."""
    attributes = {k: v for k, v in vars(model).items() if k not in ("_parameters", "_buffers", "_modules")}
    return attributes, {n: b.clone() for n, b in model.named_buffers()}


def _assert_same_state(before, after):
    assert before[0].keys() == after[0].keys()
    assert all(after[0][k] is v for k, v in before[0].items())
    assert before[1].keys() == after[1].keys() and all(torch.equal(after[1][k], v) for k, v in before[1].items())


def test_eval_keeps_no_graph_and_loss_falls_back(tiny_backbone, classnames, pixels):
    """forward keeps no state between calls (no stash for a later loss), in eval or train mode; ``loss`` is the
    family's cross-entropy of the logits it is given; the auxiliary term comes only from ``training_step``."""
    model = _dpt(tiny_backbone, classnames).eval()
    before = _state(model)
    logits = model(pixels)
    _assert_same_state(before, _state(model))
    assert not hasattr(model, "_stash")
    labels = torch.tensor([0, 1, 2, 3])
    torch.testing.assert_close(model.loss(logits, labels), F.cross_entropy(logits, labels))
    model.train()
    before = _state(model)
    with torch.no_grad():
        out = model(pixels)
    assert not out.requires_grad
    train_logits = model(pixels)
    assert train_logits.requires_grad
    _assert_same_state(before, _state(model))
    torch.testing.assert_close(model.loss(train_logits, labels), F.cross_entropy(train_logits, labels))
    step = _step(model, pixels, labels)
    _assert_same_state(before, _state(model))
    assert set(step.losses) == {"main", "aux"}
    torch.testing.assert_close(step.losses["main"], model.loss(train_logits, labels))


@torch.no_grad()
def test_passed_text_features_equal_computed_ones(tiny_backbone, classnames, pixels):
    """The engine's evaluation passes class text features once; CAVPT's queries must use them."""
    model = _dpt(tiny_backbone, classnames).eval()
    text = model.text_features()
    assert torch.equal(model(pixels, text_feats=text), model(pixels))
    assert torch.equal(model.image_features(pixels, text), model.image_features(pixels))


# ----------------------------------------------------------------------------- guidance warm-up
def test_guidance_loss_only_during_guidance_epochs(tiny_backbone, classnames, pixels):
    model = _dpt(tiny_backbone, classnames, guidance_epochs=2).train()
    labels = torch.tensor([0, 1, 2, 3])
    for epoch in (0, 1):
        model.on_epoch_start(epoch)
        out = _step(model, pixels, labels)
        logits, terms = out.logits, out.losses
        assert set(terms) == {"main", "guidance_text", "guidance_image", "aux"}
        torch.testing.assert_close(terms["main"], 0.1 * F.cross_entropy(logits, labels))
        with torch.no_grad():
            text = model.text_features()
            frozen = tiny_backbone.encode_image(pixels)
            prompted = model.image_features(pixels, text)
            template = tiny_backbone.encode_texts([TEMPLATE.format(c) for c in classnames])
        torch.testing.assert_close(terms["guidance_text"], F.cross_entropy(model.logits(frozen, text), labels))
        torch.testing.assert_close(
            terms["guidance_image"], F.cross_entropy(model.logits(prompted, template), labels), atol=1e-5, rtol=1e-5
        )
    model.on_epoch_start(2)
    out = _step(model, pixels, labels)
    logits, terms = out.logits, out.losses
    assert set(terms) == {"main", "aux"}
    torch.testing.assert_close(terms["main"], F.cross_entropy(logits, labels))


def test_guidance_off_by_default(tiny_backbone, classnames, pixels):
    model = _dpt(tiny_backbone, classnames).train()
    model.on_epoch_start(0)
    labels = torch.tensor([0, 1, 2, 3])
    steps = []
    lengths = _layer_lengths(tiny_backbone, lambda: steps.append(_step(model, pixels, labels)))
    out = steps[0]
    assert set(out.losses) == {"main", "aux"}  # no guidance terms
    torch.testing.assert_close(out.losses["main"], F.cross_entropy(out.logits, labels))  # unweighted main loss
    # K = C = 4: no frozen pass at all (the frozen image features are only needed by the guidance)
    assert not model.ranks_classes() and len(lengths) == tiny_backbone.vision_layers


# ----------------------------------------------------------------------------- learning rates
def test_param_groups_learning_rates(tiny_backbone, classnames):
    model = _dpt(tiny_backbone, classnames)
    groups = model.param_groups(0.002)
    assert [(g["name"], g["lr"]) for g in groups] == [("text", 0.002), ("visual", 0.01)]
    assert groups[0]["params"] == [model.ctx]
    grouped = [id(p) for g in groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.prompt_parameters().values())  # a partition
    assert [g["lr"] for g in model.param_groups(0.004)] == pytest.approx([0.004, 0.02])
    unscaled = _dpt(tiny_backbone, classnames, scale_lr_with_base=False, text_lr=0.003, visual_lr=0.02)
    assert [g["lr"] for g in unscaled.param_groups(0.1)] == [0.003, 0.02]
    assert [g["name"] for g in _dpt(tiny_backbone, classnames, n_ctx=0).param_groups(0.002)] == ["visual"]


def test_engine_optimizer_uses_param_groups(tiny_backbone, classnames):
    from vlprompt.engine.trainer import TrainConfig, build_optimizer

    model = _dpt(tiny_backbone, classnames)
    optimizer = build_optimizer(model, TrainConfig(lr=0.002))
    assert [g["lr"] for g in optimizer.param_groups] == [0.002, 0.01]


# ----------------------------------------------------------------------------- classes, checkpoints
@torch.no_grad()
def test_set_classes_for_evaluation(tiny_backbone, classnames, pixels):
    model = _dpt(tiny_backbone, classnames).eval()
    before = model(pixels)
    model.set_classes(MANY)  # other class count: inference works, K follows, aux heads keep their size
    assert model.k == 10 and model(pixels).shape == (4, 12)
    assert model.num_aux_classes == 4
    with torch.enable_grad():
        model.train()
        logits = model(pixels)
        assert logits.shape == (4, 12)
        with pytest.raises(ValueError, match="auxiliary heads were built for 4 classes"):
            _step(model, pixels, torch.tensor([0, 1, 2, 3]))
        model.eval()
    model.set_classes(classnames)
    torch.testing.assert_close(model(pixels), before, atol=1e-6, rtol=0)


@torch.no_grad()
def test_prompt_state_dict_round_trip(tiny_backbone, classnames, pixels):
    a = _dpt(tiny_backbone, classnames, seed=0).eval()
    b = _dpt(tiny_backbone, classnames, seed=1).eval()
    assert not torch.equal(a(pixels), b(pixels))
    b.load_prompt_state_dict(a.prompt_state_dict())
    assert torch.equal(a(pixels), b(pixels))


# ----------------------------------------------------------------------------- learning
COLOURS = torch.tensor([[1.0, -1.0, -1.0], [-1.0, 1.0, -1.0], [-1.0, -1.0, 1.0], [1.0, 1.0, 1.0]])


def _colour_images(seed, per_class, size=32, noise=0.2):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(4).repeat_interleave(per_class)
    images = COLOURS[labels][:, :, None, None] + noise * torch.randn(len(labels), 3, size, size, generator=g)
    return images, labels


@torch.no_grad()
def _accuracy(model, images, labels):
    model.eval()
    return (model(images).argmax(-1) == labels).float().mean().item()


@pytest.mark.parametrize("guidance_epochs", [0, 20])
def test_learns_an_easy_task(tiny_backbone, classnames, guidance_epochs):
    train_x, train_y = _colour_images(seed=1, per_class=8)
    test_x, test_y = _colour_images(seed=2, per_class=8)
    zs_test = _accuracy(_zeroshot(tiny_backbone, classnames), test_x, test_y)
    model = _dpt(tiny_backbone, classnames, guidance_epochs=guidance_epochs)
    optimizer = torch.optim.Adam(model.param_groups())  # per-part rates: text 0.002, visual + CAVPT 0.01
    losses = []
    for step in range(40):
        model.on_epoch_start(step)
        model.train()
        loss = _step(model, train_x, train_y).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert _accuracy(model, train_x, train_y) >= 0.9
    assert _accuracy(model, test_x, test_y) >= zs_test + 0.4


def test_engine_trains_and_evaluates(tiny_backbone, tmp_path):
    import json

    from data_fixtures import make_split_json_dataset

    from vlprompt.engine.api import DataOptions, load_splits
    from vlprompt.engine.trainer import TrainConfig, Trainer
    from vlprompt.tasks import ClassificationTask

    # 4 solid-colour classes: 4 training, 2 validation and 2 test images each
    make_split_json_dataset(tmp_path / "data", "eurosat", classnames=("AnnualCrop", "Forest", "Highway", "SeaLake"),
                            per_split=(4, 2, 2), image_size=tiny_backbone.image_size)
    splits = load_splits(DataOptions(dataset="eurosat", root=str(tmp_path / "data")))
    model = _dpt(tiny_backbone, splits.classnames, splits.template, guidance_epochs=1)
    config = TrainConfig(epochs=2, batch_size=8, warmup_epochs=0, augment=False, optimizer="adamw", lr=0.002)
    task = ClassificationTask(splits, tiny_backbone, augment=config.augment)
    result = Trainer(config, tmp_path / "run", progress=False, log=lambda _: None).fit(model, task)
    assert 0 <= result["accuracy"] <= 100 and result["n"] == len(splits.test)
    assert (tmp_path / "run" / "prompt.safetensors").exists()
    assert json.loads((tmp_path / "run" / "results.json").read_text())["final_metrics"] == result
    # every named loss term reached the trainer: the guidance terms in the guidance epoch only
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first, second = records[0], records[1]
    assert {"loss_main", "loss_aux", "loss_guidance_text", "loss_guidance_image"} <= set(first)
    assert {"loss_main", "loss_aux"} <= set(second) and not any(k.startswith("loss_guidance") for k in second)
    assert "val_accuracy" in first and "train_accuracy" in first
    assert not hasattr(model, "_stash")  # evaluation ran in eval mode and kept nothing
