"""The founding methods' defining properties: SDPT, UPT, MaPLe, CoCoOp, APT (and APT's deep-prompt baseline).

Each test proves what makes a method *that* method (methods.md), not just that it runs:
- SDPT: the inverse projections are exact pre-images (text) / least-squares pre-images (image) of the same
  prototypes, computed once; gradients of both towers meet on one tensor; K=0 is zero-shot.
- UPT: every output prompt depends on every shared token (real token mixing, unlike the released code).
- MaPLe: visual prompts are *made* from text prompts by the couplings; n=2 prompts reproduce "a photo of a {}.".
- CoCoOp: chunked / checkpointed computation is exact; the meta-net sees the L2-normalised image feature.
- APT: zero prompts is zero-shot; B=0 and s=0 at init; the per-token term keeps the causal truncation exact.
- End to end: each trains through ``vlprompt.engine.api.train`` and beats zero-shot on an easy task, with a
  tiny CLIP that knows the class names (``vlprompt.demo.pretrain_tiny_clip``) but not the dataset's template.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from vlprompt.backbones import CLIPBackbone, DeepPrompts, load_backbone
from vlprompt.backbones.presets import PRESETS, clip_tokenizer
from vlprompt.methods import get_prompt_model

SATELLITE = "a centered satellite photo of {}."  # EuroSAT's template: not the placeholder of any method


def _model(backbone, name, classnames, config=None, template="a photo of a {}.", seed=0):
    torch.manual_seed(seed)
    return get_prompt_model(backbone, name, classnames, template, config or {})


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture
def pixels(tiny_backbone):
    g = torch.Generator().manual_seed(0)
    return torch.randn(4, 3, tiny_backbone.image_size, tiny_backbone.image_size, generator=g)


@pytest.fixture(scope="module")
def vitb_backbone():
    return load_backbone("random:vit-b-16")


def _randomise_final_norms(backbone: CLIPBackbone, seed: int) -> CLIPBackbone:
    """Give both towers' final LayerNorms a non-trivial affine (random CLIPs start at gamma=1, beta=0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for norm in (backbone.model.text_model.final_layer_norm, backbone.model.vision_model.post_layernorm):
            norm.weight.copy_(0.5 + torch.rand(norm.weight.shape, generator=g))
            norm.bias.copy_(0.1 * torch.randn(norm.bias.shape, generator=g))
    return backbone


@pytest.fixture(scope="module")
def affine_backbone():
    """A private tiny CLIP (d=24 < widths 32 / 48) whose final LayerNorms have a random affine."""
    return _randomise_final_norms(load_backbone("random:tiny"), seed=1)


@pytest.fixture(scope="module")
def narrow_vision_backbone():
    """A tiny CLIP whose image tower (width 16) is narrower than the joint space (d=24): W_v is not onto."""
    from transformers import CLIPConfig, CLIPModel

    cfg = PRESETS["tiny"]
    config = CLIPConfig(
        text_config=dict(cfg["text_config"], vocab_size=49408, max_position_embeddings=77),
        vision_config=dict(cfg["vision_config"], hidden_size=16, intermediate_size=32),
        projection_dim=cfg["projection_dim"],
    )
    torch.manual_seed(0)
    backbone = CLIPBackbone(CLIPModel(config).eval(), clip_tokenizer(), name_or_path="narrow-vision")
    assert backbone.vision_width < backbone.embed_dim < backbone.text_width
    return _randomise_final_norms(backbone, seed=2)


def _pre_norm(tokens: torch.Tensor, norm) -> torch.Tensor:
    """Undo the inverse's last step: tokens -> the vector the final LayerNorm's affine maps them to."""
    return tokens * norm.weight + norm.bias


# =============================================================================================== SDPT
@torch.no_grad()
def test_sdpt_text_inverse_round_trips_to_the_prototypes(affine_backbone, classnames):
    bb = affine_backbone
    sdpt = _model(bb, "sdpt", classnames, {"n_prototypes": 5})
    tokens = sdpt.text_tokens()
    assert tokens.shape == (bb.text_layers, 5, bb.text_width)
    forward = _pre_norm(tokens, bb.model.text_model.final_layer_norm) @ bb.model.text_projection.weight.t()
    assert _relative_error(forward, sdpt.prototypes) < 1e-4


@torch.no_grad()
def test_sdpt_image_inverse_is_the_least_squares_solution(affine_backbone, classnames):
    """d=24 < d_v=48: y W_v^T = P is under-determined; the pseudo-inverse gives its minimum-norm exact solution."""
    bb = affine_backbone
    sdpt = _model(bb, "sdpt", classnames, {"n_prototypes": 5})
    w_v = bb.model.visual_projection.weight  # (d, d_v): features = x @ W_v^T
    pre = _pre_norm(sdpt.image_tokens(), bb.model.vision_model.post_layernorm)
    p = sdpt.prototypes.reshape(-1, bb.embed_dim)
    lstsq = torch.linalg.lstsq(w_v.double(), p.t().double(), driver="gelsd").solution.t().float()
    assert _relative_error(pre.reshape(-1, bb.vision_width), lstsq) < 1e-4
    # invertible direction: the round trip is exact
    assert _relative_error(pre @ w_v.t(), sdpt.prototypes) < 1e-4


@torch.no_grad()
def test_sdpt_image_inverse_is_only_least_squares_when_the_tower_is_narrower(narrow_vision_backbone, classnames):
    """d=24 > d_v=16: the image tower reaches only a 16-dim subspace of the joint space. The inverse then gives
    the least-squares pre-image: its forward image is the orthogonal projection of P onto W_v's range, and the
    residual is orthogonal to that range (and not zero). The text side (d_t=32 > d) still round-trips exactly."""
    bb = narrow_vision_backbone
    sdpt = _model(bb, "sdpt", classnames, {"n_prototypes": 6})
    w_v = bb.model.visual_projection.weight.double()  # (24, 16)
    p = sdpt.prototypes.reshape(-1, bb.embed_dim).double()
    pre = _pre_norm(sdpt.image_tokens(), bb.model.vision_model.post_layernorm).reshape(-1, bb.vision_width).double()

    lstsq = torch.linalg.lstsq(w_v, p.t()).solution.t()
    assert _relative_error(pre, lstsq) < 1e-4
    reached = pre @ w_v.t()
    projector = w_v @ torch.linalg.solve(w_v.t() @ w_v, w_v.t())  # orthogonal projector onto range(W_v)
    assert _relative_error(reached, p @ projector) < 1e-4
    residual = p - reached
    assert residual.norm() > 0.2 * p.norm()  # the round trip is *not* exact here
    assert float((residual @ w_v).abs().max()) < 1e-4 * float(residual.norm())  # residual is orthogonal to the range

    text = _pre_norm(sdpt.text_tokens(), bb.model.text_model.final_layer_norm) @ bb.model.text_projection.weight.t()
    assert _relative_error(text, sdpt.prototypes) < 1e-4


def test_sdpt_both_towers_train_the_same_prototypes(affine_backbone, classnames, pixels):
    bb = affine_backbone
    sdpt = _model(bb, "sdpt", classnames, {"n_prototypes": 4})
    assert set(sdpt.prompt_parameters()) == {"prototypes"}  # one tensor drives both towers
    labels = torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        frozen_image = bb.encode_image(pixels)
        frozen_text = bb.encode_texts([sdpt.template.format(c) for c in classnames])

    text_only = sdpt.loss(sdpt(image_feats=frozen_image), labels)
    (grad_text,) = torch.autograd.grad(text_only, sdpt.prototypes)
    image_only = sdpt.loss(sdpt(pixel_values=pixels, text_feats=frozen_text), labels)
    (grad_image,) = torch.autograd.grad(image_only, sdpt.prototypes)
    for grad in (grad_text, grad_image):
        per_depth = grad.abs().flatten(1).sum(1)
        assert bool((per_depth > 0).all()), per_depth
    assert not torch.allclose(grad_text, grad_image)  # two different paths into the same parameters


def test_sdpt_pseudo_inverse_is_computed_once(classnames, pixels):
    bb = load_backbone("random:tiny")  # private copy: this test changes a projection weight
    sdpt = _model(bb, "sdpt", classnames, {"n_prototypes": 3})
    optimizer = torch.optim.SGD([sdpt.prototypes], lr=0.1)
    labels = torch.tensor([0, 1, 2, 3])
    for _ in range(3):
        loss = sdpt.loss(sdpt(pixels), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert (sdpt.to_text.computations, sdpt.to_image.computations) == (1, 1)

    with torch.no_grad():
        bb.model.text_projection.weight.mul_(1.5)
    for _ in range(2):
        sdpt.loss(sdpt(pixels), labels).backward()
    assert (sdpt.to_text.computations, sdpt.to_image.computations) == (2, 1)
    with torch.no_grad():  # the recomputed inverse follows the new weight
        forward = sdpt.text_tokens() @ bb.model.text_projection.weight.t()  # gamma=1, beta=0 on random:tiny
        assert _relative_error(forward, sdpt.prototypes) < 1e-4
    assert (sdpt.to_text.computations, sdpt.to_image.computations) == (2, 1)


@pytest.mark.parametrize("template", ["a photo of a {}.", SATELLITE])
@torch.no_grad()
def test_sdpt_without_prototypes_is_zeroshot(tiny_backbone, classnames, pixels, template):
    zs = _model(tiny_backbone, "zeroshot", classnames, template=template)
    sdpt = _model(tiny_backbone, "sdpt", classnames, {"n_prototypes": 0}, template=template)
    assert sdpt.num_trainable() == 0
    assert torch.equal(sdpt.text_features(), zs.text_features())
    assert torch.equal(sdpt.image_features(pixels), zs.image_features(pixels))
    assert torch.equal(sdpt(pixels), zs(pixels))


# =============================================================================================== UPT
def _dependency(outputs: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """``D[i, j] = || d <r_i, outputs[i]> / d inputs[j] ||`` for a random direction ``r_i`` per output row: non-zero
    exactly when output row i depends on input row j (almost surely; a random probe of the Jacobian block)."""
    g = torch.Generator().manual_seed(0)
    probes = torch.randn(outputs.shape, generator=g)
    rows = []
    for i in range(outputs.shape[0]):
        (grad,) = torch.autograd.grad((outputs[i] * probes[i]).sum(), inputs, retain_graph=True)
        rows.append(grad.norm(dim=-1))
    return torch.stack(rows)


def test_upt_every_prompt_depends_on_every_shared_token(tiny_backbone, classnames):
    upt = _model(tiny_backbone, "upt", classnames)
    n_t, n_v = upt.config.n_text, upt.config.n_image
    text, visual = upt.prompts()
    assert text.shape == (n_t, tiny_backbone.text_width) and visual.shape == (n_v, tiny_backbone.vision_width)
    dep = torch.cat([_dependency(text, upt.shared), _dependency(visual, upt.shared)])  # (n_t + n_v, n_t + n_v)
    scale = float(dep.max())
    assert bool((dep > 1e-4 * scale).all()), dep
    # the same for text-only and visual-only outputs: both halves of U reach both modalities
    assert bool((dep[:n_t, n_t:] > 0).all()) and bool((dep[n_t:, :n_t] > 0).all())


def test_upt_dependency_check_catches_the_released_no_mixing_attention(tiny_backbone, classnames):
    """The released code's attention lacks ``batch_first``: one (1, 8, d) sequence is read as 8 sequences of
    length 1, so token i's output depends on token i only. The same check must see that (diagonal dependency)."""
    upt = _model(tiny_backbone, "upt", classnames)
    released = copy.deepcopy(upt.net)
    released.attn.batch_first = False  # what `nn.MultiheadAttention(d, h)` (the reference) does with (1, 8, d)
    shared = upt.shared.detach().clone().requires_grad_(True)
    dep = _dependency(released(shared), shared)
    off_diagonal = dep - torch.diag(torch.diagonal(dep))
    assert bool((torch.diagonal(dep) > 0).all())
    assert float(off_diagonal.abs().max()) == 0.0


@pytest.mark.parametrize("placeholder", ["a photo of a {}.", "{}."])
@torch.no_grad()
def test_upt_without_tokens_is_zeroshot_with_its_placeholder(tiny_backbone, classnames, pixels, placeholder):
    """UPT's text prompts replace the first n_text words of its placeholder; with none, the text is that
    placeholder sentence, whatever the dataset's template, and the image tower is untouched."""
    zs = _model(tiny_backbone, "zeroshot", classnames, template=placeholder)
    upt = _model(tiny_backbone, "upt", classnames, {"n_text": 0, "n_image": 0, "placeholder": placeholder},
                 template=SATELLITE)
    assert torch.equal(upt.text_features(), zs.text_features())
    assert torch.equal(upt.image_features(pixels), zs.image_features(pixels))
    assert torch.equal(upt(pixels), zs(pixels))


@pytest.mark.parametrize(
    "name, config",
    [("upt", {"n_text": 0, "n_image": 0}), ("maple", {"n_ctx": 0}), ("cocoop", {"n_ctx": 0, "init": None})],
)
def test_zero_size_prompts_train_nothing(tiny_backbone, classnames, name, config):
    assert _model(tiny_backbone, name, classnames, config).num_trainable() == 0


# =============================================================================================== MaPLe
def test_maple_visual_prompts_come_only_from_text_prompts(tiny_backbone, classnames, pixels):
    bb = tiny_backbone
    maple = _model(bb, "maple", classnames)
    n, depth = maple.config.n_ctx, maple.config.depth
    params = maple.prompt_parameters()
    for pname, p in params.items():  # no free visual prompt of any depth
        assert not (p.dim() >= 2 and p.shape[-1] == bb.vision_width), (pname, tuple(p.shape))
    assert tuple(params["text_prompts"].shape) == (depth, n, bb.text_width)
    couplings = [p for pname, p in params.items() if pname.startswith("couplings.")]
    assert len(couplings) == 2 * depth
    assert [tuple(v.shape) for v in maple.visual_prompts()] == [(n, bb.vision_width)] * depth

    labels = torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        frozen_image = bb.encode_image(pixels)
        frozen_text = bb.encode_texts([maple.template.format(c) for c in classnames])

    image_only = maple.loss(maple(pixel_values=pixels, text_feats=frozen_text), labels)
    image_only.backward()
    per_depth = maple.text_prompts.grad.abs().flatten(1).sum(1)
    assert bool((per_depth > 0).all()), per_depth
    for p in couplings:
        assert p.grad is not None and p.grad.abs().sum() > 0

    maple.zero_grad(set_to_none=True)
    text_only = maple.loss(maple(image_feats=frozen_image), labels)
    text_only.backward()
    per_depth = maple.text_prompts.grad.abs().flatten(1).sum(1)
    assert bool((per_depth > 0).all()), per_depth
    for p in couplings:
        assert p.grad is None or not p.grad.any()


@torch.no_grad()
def test_maple_two_prompts_from_placeholder_are_the_template(tiny_backbone, classnames):
    """n=2, depth 1, init from "a photo of a {}.": [SOS] a photo of a CLASS . [EOS] is that very sentence."""
    maple = _model(tiny_backbone, "maple", classnames, {"depth": 1})
    expected = tiny_backbone.encode_texts([f"a photo of a {c}." for c in classnames])
    assert torch.equal(maple.text_features(), expected)


# =============================================================================================== CoCoOp
def _cocoop(backbone, classnames, config=None):
    """CoCoOp whose meta-net is alive. On tiny CLIPs (d=24) the meta-net's hidden layer has d // 16 = 1 ReLU unit,
    which a random init may leave dead for every image (then every image gets the same shift and the per-image
    properties hold vacuously). A positive hidden bias keeps it active for unit-norm inputs."""
    cocoop = _model(backbone, "cocoop", classnames, config)
    with torch.no_grad():
        cocoop.meta_net[0].bias.fill_(0.5)
    return cocoop


def _cocoop_logits_and_grads(backbone, classnames, image_feats, labels, **config):
    cocoop = _cocoop(backbone, classnames, config)
    logits = cocoop(image_feats=image_feats)
    cocoop.loss(logits, labels).backward()
    return logits.detach(), {n: p.grad.clone() for n, p in cocoop.prompt_parameters().items()}


@pytest.mark.parametrize("checkpoint_chunks", [False, True])
def test_cocoop_chunking_is_exact(tiny_backbone, classnames, checkpoint_chunks):
    g = torch.Generator().manual_seed(3)
    pixels = torch.randn(5, 3, tiny_backbone.image_size, tiny_backbone.image_size, generator=g)
    labels = torch.tensor([0, 1, 2, 3, 0])
    with torch.no_grad():
        image_feats = tiny_backbone.encode_image(pixels)
    reference, ref_grads = _cocoop_logits_and_grads(
        tiny_backbone, classnames, image_feats, labels, chunk_size=8, checkpoint_chunks=False
    )
    assert reference.shape == (5, 4)
    for chunk in (1, 2, 3):
        logits, grads = _cocoop_logits_and_grads(
            tiny_backbone, classnames, image_feats, labels, chunk_size=chunk, checkpoint_chunks=checkpoint_chunks
        )
        torch.testing.assert_close(logits, reference, atol=1e-5, rtol=0)
        assert set(grads) == set(ref_grads)
        for name, grad in grads.items():
            assert ref_grads[name].abs().sum() > 0, name
            torch.testing.assert_close(grad, ref_grads[name], atol=1e-5, rtol=1e-4)
    # from pixels: the frozen image tower under no_grad, the same logits
    cocoop = _cocoop(tiny_backbone, classnames, {"chunk_size": 2, "checkpoint_chunks": checkpoint_chunks})
    torch.testing.assert_close(cocoop(pixel_values=pixels).detach(), reference, atol=1e-5, rtol=0)


def test_cocoop_shared_prefix_text_pass_is_exact(tiny_backbone, classnames, monkeypatch):
    """[SOS][context] runs once per image and only the class tokens per (image, class): the same logits and gradients
    as running every (image, class) sequence whole."""
    from vlprompt.backbones.base import DualEncoderBackbone
    from vlprompt.backbones.clip import CLIPBackbone

    g = torch.Generator().manual_seed(5)
    image_feats = torch.randn(3, tiny_backbone.embed_dim, generator=g)
    labels = torch.tensor([0, 3, 1])
    shared, shared_grads = _cocoop_logits_and_grads(tiny_backbone, classnames, image_feats, labels)
    # the generic (reference) form: every (image, class) sequence run whole
    monkeypatch.setattr(CLIPBackbone, "encode_class_prompts_per_image",
                        DualEncoderBackbone.encode_class_prompts_per_image)
    whole, whole_grads = _cocoop_logits_and_grads(tiny_backbone, classnames, image_feats, labels)
    torch.testing.assert_close(shared, whole, atol=1e-5, rtol=0)
    for name, grad in whole_grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(shared_grads[name], grad, atol=1e-5, rtol=1e-4)


def test_shared_prefix_text_encoding_matches_whole_sequences(tiny_backbone):
    from vlprompt.backbones.base import DualEncoderBackbone

    names = ["x", "a much longer class name with many words", "red circle"]
    texts = [f"{n}." for n in names]
    prompts_of = tiny_backbone.class_prompts(names, placeholder="{}.", n_replaced=0)
    tok = tiny_backbone.tokenize(texts)
    assert torch.equal(prompts_of.input_ids.cpu(), tok.input_ids) and torch.equal(prompts_of.lengths.cpu(), tok.lengths)
    prefixes = torch.randn(2, 3, tiny_backbone.text_width, generator=torch.Generator().manual_seed(0))
    whole = tiny_backbone.encode_embedded(
        tiny_backbone.embed_tokens(tok.input_ids.repeat(2, 1)),
        tok.lengths.repeat(2),
        DeepPrompts([prefixes.repeat_interleave(len(texts), dim=0)]),
    ).view(2, len(texts), -1)
    fast = tiny_backbone.encode_class_prompts_per_image(prompts_of, prefixes)
    torch.testing.assert_close(fast, whole, atol=1e-5, rtol=0)
    generic = DualEncoderBackbone.encode_class_prompts_per_image(tiny_backbone, prompts_of, prefixes)
    torch.testing.assert_close(generic, whole, atol=1e-5, rtol=0)
    too_long = torch.zeros(1, tiny_backbone.context_length, tiny_backbone.text_width)
    with pytest.raises(ValueError, match="text context"):
        tiny_backbone.encode_class_prompts_per_image(prompts_of, too_long)


@pytest.mark.parametrize("batch, budget, per_chunk, recomputed", [(5, 8, 2, 3), (2, 8, 2, 0), (5, 128, 32, 0),
                                                                  (3, 2, 1, 3)])
def test_cocoop_auto_chunks_batch_images_and_recompute_only_with_several_chunks(
    tiny_backbone, classnames, monkeypatch, batch, budget, per_chunk, recomputed
):
    """Default chunk_size None: as many images as fit in max_chunk_sequences sequences (at least one); activations
    are recomputed in the backward only when the batch takes several chunks. Same logits and gradients."""
    from vlprompt.methods import cocoop as cocoop_module

    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        image_feats = tiny_backbone.encode_image(
            torch.randn(batch, 3, tiny_backbone.image_size, tiny_backbone.image_size, generator=g)
        )
    labels = torch.arange(batch) % len(classnames)
    reference, ref_grads = _cocoop_logits_and_grads(
        tiny_backbone, classnames, image_feats, labels, chunk_size=batch, checkpoint_chunks=False
    )
    calls = []
    real = cocoop_module.checkpoint
    monkeypatch.setattr(cocoop_module, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert _cocoop(tiny_backbone, classnames, {"max_chunk_sequences": budget}).images_per_chunk() == per_chunk
    logits, grads = _cocoop_logits_and_grads(tiny_backbone, classnames, image_feats, labels, max_chunk_sequences=budget)
    assert len(calls) == recomputed
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_cocoop_meta_net_sees_the_normalised_image_feature(tiny_backbone, classnames, pixels):
    cocoop = _cocoop(tiny_backbone, classnames)
    feats = tiny_backbone.encode_image(pixels)
    torch.testing.assert_close(cocoop.instance_contexts(5 * feats), cocoop.instance_contexts(feats), atol=1e-6, rtol=0)
    torch.testing.assert_close(cocoop(image_feats=5 * feats), cocoop(image_feats=feats), atol=1e-5, rtol=0)
    # the meta-net itself is not scale invariant: feeding it the raw feature would change the logits
    raw = cocoop.meta_net(feats)
    assert not torch.allclose(raw, cocoop.meta_net(5 * feats), atol=1e-3)


@torch.no_grad()
def test_cocoop_prompts_are_per_image(tiny_backbone, classnames, pixels):
    cocoop = _cocoop(tiny_backbone, classnames)
    feats = tiny_backbone.encode_image(pixels)
    contexts = cocoop.instance_contexts(feats)
    assert contexts.shape == (4, cocoop.config.n_ctx, tiny_backbone.text_width)
    for i in range(4):
        for j in range(i + 1, 4):
            assert not torch.allclose(contexts[i], contexts[j], atol=1e-6), (i, j)
    per_image_text = cocoop._chunk_text_features(contexts)  # (B, C, d): each image's own class features
    assert per_image_text.shape == (4, len(classnames), tiny_backbone.embed_dim)
    assert not torch.allclose(per_image_text[0], per_image_text[1], atol=1e-6)


# =============================================================================================== APT
@pytest.mark.parametrize("template", ["a photo of a {}.", SATELLITE])
@torch.no_grad()
def test_apt_without_prompts_is_zeroshot(tiny_backbone, classnames, pixels, template):
    zs = _model(tiny_backbone, "zeroshot", classnames, template=template)
    apt = _model(tiny_backbone, "apt", classnames, {"n_prompts": 0}, template=template)
    assert apt.num_trainable() == 0
    assert not apt.modifies_text and not apt.modifies_image
    assert torch.equal(apt.text_features(), zs.text_features())
    assert torch.equal(apt.image_features(pixels), zs.image_features(pixels))
    assert torch.equal(apt(pixels), zs(pixels))


def _apt_reference(x, attn_out, prompts, keys, log_scale):
    scores = torch.relu(x @ keys.t())
    gate = scores.amax(dim=-1, keepdim=True)
    return (attn_out + gate * (scores @ prompts)) * log_scale.exp()


@torch.no_grad()
def test_apt_starts_with_unmodulated_keys(tiny_backbone, classnames):
    """B=0 and s=0 at init, so K~ = P + (P A^T) B^T = P and O' = O + w * ReLU(X P^T) P."""
    apt = _model(tiny_backbone, "apt", classnames, {"n_prompts": 6, "rank": 3})
    g = torch.Generator().manual_seed(0)
    for tower, width in ((apt.text_apt, tiny_backbone.text_width), (apt.image_apt, tiny_backbone.vision_width)):
        assert not tower.up.any() and not tower.log_scale.any()
        assert tower.prompts.shape[1:] == (6, width) and tower.down.shape[1:] == (3, width)
        x, out = torch.randn(2, 7, width, generator=g), torch.randn(2, 7, width, generator=g)
        for layer in range(tower.prompts.shape[0]):
            p = tower.prompts[layer]
            expected = _apt_reference(x, out, p, p, tower.log_scale[layer])
            torch.testing.assert_close(tower(layer, x, out), expected, atol=1e-6, rtol=1e-6)
        # once B and s move, the keys are modulated: K~ = P + (P A^T) B^T, output scaled by exp(s)
        tower.up.normal_(generator=g)
        tower.log_scale.fill_(0.3)
        p = tower.prompts[0]
        keys = p + (p @ tower.down[0].t()) @ tower.up[0].t()
        torch.testing.assert_close(
            tower(0, x, out), _apt_reference(x, out, p, keys, tower.log_scale[0]), atol=1e-5, rtol=1e-5
        )
        assert not torch.allclose(tower(0, x, out), _apt_reference(x, out, p, p, tower.log_scale[0]))


@torch.no_grad()
def test_apt_on_image_tower_leaves_text_as_zeroshot(tiny_backbone, classnames, pixels):
    zs = _model(tiny_backbone, "zeroshot", classnames, template=SATELLITE)
    image_only = _model(tiny_backbone, "apt", classnames, {"n_prompts": 8, "towers": "image"}, template=SATELLITE)
    assert image_only.text_apt is None and not image_only.modifies_text and image_only.modifies_image
    assert torch.equal(image_only.text_features(), zs.text_features())
    assert not torch.allclose(image_only.image_features(pixels), zs.image_features(pixels), atol=1e-4)
    text_only = _model(tiny_backbone, "apt", classnames, {"n_prompts": 8, "towers": "text"}, template=SATELLITE)
    assert text_only.image_apt is None and not text_only.modifies_image and text_only.modifies_text
    assert torch.equal(text_only.image_features(pixels), zs.image_features(pixels))
    assert not torch.allclose(text_only.text_features(), zs.text_features(), atol=1e-4)


@torch.no_grad()
def test_apt_keeps_the_causal_truncation_exact(tiny_backbone, classnames):
    """The adapter runs the text tower only up to the last end-of-text token. With APT's per-token term that is
    exact: the same features as running all 77 positions (forced here by a dummy row whose EOT is at 76)."""
    bb = tiny_backbone
    apt = _model(bb, "apt", classnames, {"n_prompts": 8})
    apt.text_apt.up.normal_(generator=torch.Generator().manual_seed(1))  # a fully general (trained-like) state
    class_text = apt.class_text  # ClassPrompts: token ids and lengths (end-of-text included) of the class sentences
    embeds = bb.embed_tokens(class_text.input_ids)
    assert embeds.shape[1] == bb.context_length == 77 and int(class_text.lengths.max()) - 1 < 20

    def truncated_and_full(block):
        truncated = bb.encode_embedded(embeds, class_text.lengths, block=block)
        full_embeds = torch.cat([embeds, embeds[:1]])
        full_lengths = torch.cat([class_text.lengths, torch.tensor([bb.context_length])])  # EOT at position 76
        return truncated, bb.encode_embedded(full_embeds, full_lengths, block=block)[: len(classnames)]

    truncated, full = truncated_and_full(apt.text_apt)
    torch.testing.assert_close(truncated, full, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(apt.text_features(), truncated, atol=0, rtol=0)
    # a term that mixed tokens (not per-token) would break it: the comparison is sensitive
    mixing = lambda layer, x, out: out + x.mean(dim=1, keepdim=True)  # noqa: E731
    truncated, full = truncated_and_full(mixing)
    assert not torch.allclose(truncated, full, atol=1e-3)


# =============================================================================================== deep prompts
def test_deep_prompt_baseline_counts_and_runs(tiny_backbone, classnames, pixels):
    bb = tiny_backbone
    model = _model(bb, "deep_prompt", classnames)
    depth, m = model.config.text_depth, model.config.n_text
    assert (depth, model.config.image_depth, m, model.config.n_image) == (bb.text_layers, bb.vision_layers, 50, 50)
    assert model.num_trainable() == depth * m * (bb.text_width + bb.vision_width)
    logits = model(pixels)
    assert logits.shape == (4, len(classnames)) and bool(torch.isfinite(logits).all())
    model.loss(logits, torch.tensor([0, 1, 2, 3])).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.prompt_parameters().values())


# =============================================================================================== shared
FOUNDING = [
    ("cocoop", {}),
    ("maple", {}),
    ("upt", {}),
    ("sdpt", {}),
    ("apt", {"n_prompts": 8}),
]


@pytest.mark.parametrize("name, config", FOUNDING)
def test_only_own_parameters_get_gradients(tiny_backbone, classnames, pixels, name, config):
    if name == "cocoop":
        model = _cocoop(tiny_backbone, classnames, config)
    else:
        model = _model(tiny_backbone, name, classnames, config)
    model.loss(model(pixels), torch.tensor([0, 1, 2, 3])).backward()
    for pname, p in model.backbone.named_parameters():
        assert p.grad is None, f"backbone parameter {pname} received a gradient"
        assert not p.requires_grad, f"backbone parameter {pname} is trainable"
    own = model.prompt_parameters()
    assert own and not any(n.startswith("backbone.") for n in own)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(own)
    for pname, p in own.items():
        assert p.grad is not None, f"{pname} got no gradient"
        if name == "apt" and pname.endswith(".down"):
            assert not p.grad.any()  # A gets no gradient while B = 0 (LoRA-style start)
        else:
            assert p.grad.abs().sum() > 0, f"{pname} got a zero gradient"


def _apt_count(layers: int, width: int, m: int, r: int) -> int:
    return layers * (m * width + 2 * r * width + 1)


def _expected_counts(bb, depth_cap: int) -> dict[str, int]:
    d_t, d_v, d = bb.text_width, bb.vision_width, bb.embed_dim
    depth = min(9, depth_cap)  # MaPLe's and SDPT's J=9, capped to the backbone
    hidden = d // 16
    upt_net = 4 * d_t * d_t + 4 * d_t + 2 * 2 * d_t + 2 * (d_t * d_t + d_t)  # attention, 2 norms, 2 linears
    return {
        "cocoop": 4 * d_t + (d * hidden + hidden) + (hidden * d_t + d_t),
        "maple": depth * 2 * d_t + depth * (d_t * d_v + d_v),
        "upt": 8 * d_t + upt_net + (d_t * d_v + d_v),
        "sdpt": depth * 4 * d,
        "apt": _apt_count(bb.text_layers, d_t, 50, 4) + _apt_count(bb.vision_layers, d_v, 50, 4),
        "deep_prompt": 50 * (bb.text_layers * d_t + bb.vision_layers * d_v),
    }


def test_parameter_counts_follow_formula_tiny(tiny_backbone, classnames):
    expected = _expected_counts(tiny_backbone, depth_cap=2)
    for name, count in expected.items():
        model = _model(tiny_backbone, name, classnames)
        assert model.num_trainable() == count, name
        assert sum(t.numel() for t in model.prompt_state_dict().values()) == count


def test_parameter_counts_vitb16_reference_numbers(vitb_backbone, classnames):
    names = _expected_counts(vitb_backbone, 12)
    counts = {name: _model(vitb_backbone, name, classnames).num_trainable() for name in names}
    assert counts["maple"] == 3_555_072
    assert counts["upt"] == 1_976_064
    assert counts["cocoop"] == 35_360
    assert counts["sdpt"] == 18_432 == 9 * 4 * 512
    assert counts["apt"] == 12 * (50 * 512 + 2 * 4 * 512 + 1) + 12 * (50 * 768 + 2 * 4 * 768 + 1) == 890_904
    assert counts["deep_prompt"] == 12 * 50 * (512 + 768) == 768_000
    assert counts == _expected_counts(vitb_backbone, 12)


# =============================================================================================== end to end
E2E_COLOURS = 5  # colour classes of the make_split_json_dataset set
E2E_PER_SPLIT = (4, 2, 6)  # train / val / test images per class
E2E_PRETRAIN_STEPS = 40


def _quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module")
def knowing_world(tmp_path_factory):
    """A tiny CLIP pretrained on bare EuroSAT-like class names (demo), and a colour set named so that the model's
    knowledge is right: each colour gets the bare class name whose text feature the colour's images are closest to.
    Zero-shot with EuroSAT's template ("a centered satellite photo of {}.") is then poor: the gap to close.
    Returns (model folder, data root)."""
    from data_fixtures import name_colours_as_the_model_sees_them

    from vlprompt.demo import pretrain_tiny_clip

    root = tmp_path_factory.mktemp("founding_e2e")
    model_dir = pretrain_tiny_clip(root / "model", root / "work", steps=E2E_PRETRAIN_STEPS)
    return model_dir, name_colours_as_the_model_sees_them(model_dir, root, E2E_COLOURS, E2E_PER_SPLIT)


def _train(knowing_world, tmp_path, method, method_options=None, template=None, **train_options):
    from vlprompt.engine.api import DataOptions, RunOptions, TrainConfig, train

    model_dir, data_root = knowing_world
    train_options = {"epochs": 1, "batch_size": 8, "warmup_epochs": 0, "optimizer": "adamw", "augment": False,
                     **train_options}
    options = RunOptions(
        model=str(model_dir),
        method=method,
        method_options=dict(method_options or {}),
        data=DataOptions(dataset="eurosat", root=str(data_root)),
        train=TrainConfig(**train_options),
        output=str(tmp_path / method),
    )
    return train(options, progress=False, log=_quiet)


@pytest.fixture(scope="module")
def zeroshot_accuracy(knowing_world, tmp_path_factory):
    return _train(knowing_world, tmp_path_factory.mktemp("zs"), "zeroshot")["accuracy"]


def test_pretrained_clip_knows_the_names_but_not_the_template(knowing_world, zeroshot_accuracy):
    """The premise of the end-to-end tests: bare class names work, EuroSAT's template does not."""
    from torch.utils.data import DataLoader

    from vlprompt.engine.api import DataOptions, load_splits
    from vlprompt.tasks import ClassificationTask
    from vlprompt.tasks.classification import evaluate

    model_dir, data_root = knowing_world
    backbone = load_backbone(str(model_dir))
    splits = load_splits(DataOptions(dataset="eurosat", root=str(data_root)))
    test_set = ClassificationTask(splits, backbone, augment=False).test
    bare = get_prompt_model(backbone, "zeroshot", splits.classnames, "{}")  # the pretraining's bare names
    assert evaluate(bare, DataLoader(test_set, batch_size=64))["accuracy"] >= 80.0
    assert zeroshot_accuracy <= 40.0


@torch.no_grad()
def test_zeroshot_single_custom_template_is_used(tiny_backbone, classnames):
    zs = _model(tiny_backbone, "zeroshot", classnames, {"templates": ["{}"]}, template=SATELLITE)
    assert torch.equal(zs.text_features(), tiny_backbone.encode_texts(list(classnames)))


# method, method options, training options: short AdamW schedules (5 epochs of 3 steps) on 20 training images
E2E_RUNS = [
    ("cocoop", {}, {"lr": 0.01, "epochs": 5}),
    ("maple", {}, {"lr": 0.01, "epochs": 5}),
    ("upt", {}, {"lr": 0.002, "epochs": 5}),
    ("sdpt", {}, {"lr": 0.03, "epochs": 5}),
    ("apt", {"n_prompts": 8}, {"lr": 0.01, "epochs": 5}),
]


@pytest.mark.parametrize("method, method_options, train_options", E2E_RUNS, ids=[r[0] for r in E2E_RUNS])
def test_founding_method_beats_zeroshot_end_to_end(
    knowing_world, zeroshot_accuracy, tmp_path, method, method_options, train_options
):
    result = _train(knowing_world, tmp_path, method, method_options, **train_options)
    print(f"{method}: test accuracy {result['accuracy']:.1f}% (zero-shot {zeroshot_accuracy:.1f}%)")
    assert result["n"] == E2E_COLOURS * E2E_PER_SPLIT[2]
    assert result["accuracy"] >= zeroshot_accuracy + 40.0, (method, result["accuracy"], zeroshot_accuracy)
