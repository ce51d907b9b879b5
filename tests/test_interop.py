"""Checkpoints of the research code in and out (vlprompt.interop).

For each released trainer a checkpoint is built with random values, laid out exactly as that trainer saves it
(Dassl's ``{"state_dict", "epoch", "optimizer", "scheduler", "val_result"}``; the prompt learner's own state dict for
CoOp and CoCoOp, the whole custom CLIP's for MaPLe, IVLP and VPT, frozen weights included):
- importing it accounts for every key (used, a recomputed buffer, a frozen CLIP weight, trainer state);
- export then import is the identity on the tensors;
- for CoOp (shared and class-specific), CoCoOp and MaPLe, the imported prompt's logits equal the released forward
  pass written here from its definition (the prompt learners' sentence built from token_prefix / ctx /
  token_suffix, deep prompts replacing positions layer by layer, visual prompts appended before the
  pre-LayerNorm), run on the same transformers CLIP modules, within 1e-5 relative;
- faults: a checkpoint of another method, width or patch size, a folder, a file that is no checkpoint, a gap in
  the prompted layers; all refused naming the fix.
"""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import vlprompt
from vlprompt.backbones import load_backbone
from vlprompt.interop import LAYOUTS, ReferenceError, from_reference, read_checkpoint, save_reference, to_reference
from vlprompt.interop.layouts import released_embeddings

CLASSES = ["annual crop", "forest", "sea lake"]
CONTEXT = 77


@pytest.fixture(scope="module")
def backbone():
    return load_backbone("random:tiny")


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _trainer_state(params: list[torch.Tensor]) -> dict:
    optimizer = torch.optim.SGD(params, lr=0.002, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 5)
    return {"epoch": 5, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "val_result": None}


def _buffers(backbone, n_ctx: int, phrase: bool, prefix: str = "") -> dict[str, torch.Tensor]:
    words = "a photo of a" if phrase else " ".join(["X"] * n_ctx)
    embeds = released_embeddings(backbone, [f"{words} {c}." for c in CLASSES])
    return {f"{prefix}token_prefix": embeds[:, :1].clone(), f"{prefix}token_suffix": embeds[:, 1 + n_ctx:].clone()}


def _frozen_clip(backbone, seed: int = 9) -> dict[str, torch.Tensor]:
    """A few frozen weights as OpenAI CLIP names them inside the released custom CLIP (shapes of this backbone)."""
    g, dv, dt = _g(seed), backbone.vision_width, backbone.text_width
    return {
        "image_encoder.conv1.weight": torch.randn(dv, 3, backbone.patch_size, backbone.patch_size, generator=g),
        "image_encoder.class_embedding": torch.randn(dv, generator=g),
        "image_encoder.transformer.resblocks.0.attn.in_proj_weight": torch.randn(3 * dv, dv, generator=g),
        "image_encoder.proj": torch.randn(dv, backbone.embed_dim, generator=g),
        "text_encoder.positional_embedding": torch.randn(CONTEXT, dt, generator=g),
        "text_encoder.transformer.resblocks.0.ln_1.weight": torch.randn(dt, generator=g),
        "text_encoder.text_projection": torch.randn(dt, backbone.embed_dim, generator=g),
        "logit_scale": torch.tensor(4.6052),
    }


def coop_checkpoint(backbone, n_ctx=4, class_specific=False, seed=1) -> dict:
    shape = (len(CLASSES), n_ctx, backbone.text_width) if class_specific else (n_ctx, backbone.text_width)
    ctx = torch.randn(*shape, generator=_g(seed)) * 0.1
    return {"state_dict": {"ctx": ctx, **_buffers(backbone, n_ctx, False)}, **_trainer_state([ctx])}


def cocoop_checkpoint(backbone, n_ctx=4, seed=2) -> dict:
    g, e, dt = _g(seed), backbone.embed_dim, backbone.text_width
    hidden = e // 16
    state = {"ctx": torch.randn(n_ctx, dt, generator=g) * 0.1,
             "meta_net.linear1.weight": torch.randn(hidden, e, generator=g) * 0.3,
             "meta_net.linear1.bias": torch.rand(hidden, generator=g) * 0.5,  # keeps the ReLU units alive
             "meta_net.linear2.weight": torch.randn(dt, hidden, generator=g) * 0.3,
             "meta_net.linear2.bias": torch.randn(dt, generator=g) * 0.1,
             **_buffers(backbone, n_ctx, n_ctx == 4)}  # fmt: skip
    return {"state_dict": state, **_trainer_state([state["ctx"]])}


def maple_checkpoint(backbone, n_ctx=2, depth=2, seed=3) -> dict:
    g, dt, dv = _g(seed), backbone.text_width, backbone.vision_width
    state = {"prompt_learner.ctx": torch.randn(n_ctx, dt, generator=g) * 0.1,
             "prompt_learner.proj.weight": torch.randn(dv, dt, generator=g) * 0.1,
             "prompt_learner.proj.bias": torch.randn(dv, generator=g) * 0.1}  # fmt: skip
    for i in range(depth - 1):
        state[f"prompt_learner.compound_prompts_text.{i}"] = torch.randn(n_ctx, dt, generator=g) * 0.1
        state[f"prompt_learner.compound_prompt_projections.{i}.weight"] = torch.randn(dv, dt, generator=g) * 0.1
        state[f"prompt_learner.compound_prompt_projections.{i}.bias"] = torch.randn(dv, generator=g) * 0.1
    state.update(_buffers(backbone, n_ctx, n_ctx <= 4, "prompt_learner."))
    state.update(_frozen_clip(backbone))
    return {"state_dict": state, **_trainer_state([state["prompt_learner.ctx"]])}


def ivlp_checkpoint(backbone, n_text=2, n_image=3, text_depth=2, image_depth=2, seed=4) -> dict:
    g, dt, dv = _g(seed), backbone.text_width, backbone.vision_width
    state = {"prompt_learner.ctx": torch.randn(n_text, dt, generator=g) * 0.1,
             "image_encoder.VPT": torch.randn(n_image, dv, generator=g) * 0.1}  # fmt: skip
    for i in range(1, text_depth):
        state[f"text_encoder.transformer.resblocks.{i}.VPT_shallow"] = torch.randn(n_text, dt, generator=g) * 0.1
    for i in range(1, image_depth):
        state[f"image_encoder.transformer.resblocks.{i}.VPT_shallow"] = torch.randn(n_image, dv, generator=g) * 0.1
    state.update(_buffers(backbone, n_text, n_text <= 4, "prompt_learner."))
    state.update(_frozen_clip(backbone))
    return {"state_dict": state, **_trainer_state([state["prompt_learner.ctx"]])}


def vpt_checkpoint(backbone, n_tokens=3, depth=2, seed=5) -> dict:
    g, dv = _g(seed), backbone.vision_width
    state = {"image_encoder.VPT": torch.randn(n_tokens, dv, generator=g) * 0.1}
    for i in range(1, depth):
        state[f"image_encoder.transformer.resblocks.{i}.VPT_shallow"] = torch.randn(n_tokens, dv, generator=g) * 0.1
    state.update(_frozen_clip(backbone))
    return {"state_dict": state, **_trainer_state([state["image_encoder.VPT"]])}


def upt_checkpoint(backbone, seed=6) -> dict:
    """UPT's prompt learner: uni_ctx (1, 8, d), a one-head nn.MultiheadAttention, two LayerNorms, the feed-forward
    linear1 / linear2 and the visual ``mlp``."""
    g, d, dv = _g(seed), backbone.text_width, backbone.vision_width

    def r(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    state = {"uni_ctx": r(1, 8, d, scale=0.5), "self_attn.in_proj_weight": r(3 * d, d),
             "self_attn.in_proj_bias": r(3 * d), "self_attn.out_proj.weight": r(d, d), "self_attn.out_proj.bias": r(d),
             "norm1.weight": 1 + r(d), "norm1.bias": r(d), "norm2.weight": 1 + r(d), "norm2.bias": r(d),
             "linear1.weight": r(d, d), "linear1.bias": r(d), "linear2.weight": r(d, d), "linear2.bias": r(d),
             "mlp.weight": r(dv, d), "mlp.bias": r(dv), **_buffers(backbone, 4, True)}  # fmt: skip
    return {"state_dict": state, **_trainer_state([state["uni_ctx"]])}


BUILDERS = {"coop": coop_checkpoint, "cocoop": cocoop_checkpoint, "maple": maple_checkpoint,
            "ivlp": ivlp_checkpoint, "vpt": vpt_checkpoint, "upt": upt_checkpoint}  # fmt: skip
CASES = {"coop": ("coop", {}), "coop_class_specific": ("coop", {"class_specific": True}), "cocoop": ("cocoop", {}),
         "maple": ("maple", {}), "maple_deep3_ctx6": ("maple", {"n_ctx": 6, "depth": 2}), "ivlp": ("ivlp", {}),
         "vpt": ("vpt", {}), "vpt_shallow": ("vpt", {"depth": 1}), "upt": ("upt", {})}  # fmt: skip


def _write(tmp_path, checkpoint: dict, name: str = "model.pth.tar-5"):
    path = tmp_path / name
    torch.save(checkpoint, path)
    return path


# ---------------------------------------------------------------------------------------------- every key, round trip
@pytest.mark.parametrize("case", sorted(CASES))
def test_every_key_is_accounted_for_and_export_then_import_is_the_identity(case, backbone, tmp_path):
    repo, kwargs = CASES[case]
    checkpoint = BUILDERS[repo](backbone, **kwargs)
    path = _write(tmp_path, checkpoint)
    method, report = from_reference(path, repo, backbone, CLASSES)
    state = checkpoint["state_dict"]
    assert set(report.used) | set(report.recomputed) | set(report.frozen) == set(state)
    assert not (set(report.used) & set(report.recomputed)) and not (set(report.used) & set(report.frozen))
    assert report.trainer_state == ["epoch", "optimizer", "scheduler", "val_result"]
    assert method.registered_name == LAYOUTS[repo].method and report.method == method.registered_name
    assert not [n for n in report.notes if "differs" in n]  # the buffers are this backbone's: no mismatch note
    # every used tensor is in the method, unchanged
    exported = to_reference(method, repo, epoch=5)
    assert exported["epoch"] == 5 and set(exported) == {"state_dict", "epoch", "optimizer", "scheduler"}
    for key in report.used:
        assert torch.equal(exported["state_dict"][key], state[key].float()), key
    for key in report.recomputed:  # the buffers written back are the released code's for these class names
        torch.testing.assert_close(exported["state_dict"][key], state[key])
    # and back again
    again_path = save_reference(method, repo, tmp_path / "exported.pth.tar-5", epoch=5)
    again, _ = from_reference(again_path, repo, backbone, CLASSES)
    mine, theirs = method.prompt_state_dict(), again.prompt_state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


# ---------------------------------------------------------------------------------------------- the released forward
def _causal(length: int) -> torch.Tensor:
    return torch.full((length, length), float("-inf")).triu(1)[None, None]


def released_text_features(model, prefix, ctx, suffix, eot, deep=()) -> torch.Tensor:
    """CLIP's text tower over [prefix, ctx, suffix] (77 positions), deep contexts replacing positions 1..1+M at
    layers 1.., pooled at each sentence's end-of-text token (argmax of the ids in the released code)."""
    tm = model.text_model
    x = torch.cat([prefix, ctx, suffix], dim=1)
    x = x + tm.embeddings.position_embedding.weight[: x.shape[1]]
    n = ctx.shape[1]
    for j, layer in enumerate(tm.encoder.layers):
        if 1 <= j <= len(deep):
            x = torch.cat([x[:, :1], deep[j - 1].expand(x.shape[0], -1, -1), x[:, 1 + n:]], dim=1)
        x = layer(x, _causal(x.shape[1]))
        x = x[0] if isinstance(x, tuple) else x
    x = tm.final_layer_norm(x)
    return model.text_projection(x[torch.arange(x.shape[0]), eot])


def released_image_features(model, pixels, first=None, deep=(), front=False) -> torch.Tensor:
    """CLIP's image tower with visual prompts appended after the patches (UPT: between the class token and the
    patches) before the pre-LayerNorm, the last M positions replaced at layers 1.."""
    vm = model.vision_model
    x = vm.embeddings(pixels)
    if first is not None and front:
        x = torch.cat([x[:, :1], first.expand(x.shape[0], -1, -1), x[:, 1:]], dim=1)
    elif first is not None:
        x = torch.cat([x, first.expand(x.shape[0], -1, -1)], dim=1)
    x = vm.pre_layrnorm(x)
    for j, layer in enumerate(vm.encoder.layers):
        if 1 <= j <= len(deep):
            x = torch.cat([x[:, : x.shape[1] - deep[j - 1].shape[0]], deep[j - 1].expand(x.shape[0], -1, -1)], 1)
        x = layer(x, None)
        x = x[0] if isinstance(x, tuple) else x
    return model.visual_projection(vm.post_layernorm(x[:, 0]))


def _scores(model, image, text) -> torch.Tensor:
    return model.logit_scale.exp() * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).t()


def _eot(backbone, n_ctx: int, phrase: bool) -> torch.Tensor:
    words = "a photo of a" if phrase else " ".join(["X"] * n_ctx)
    return backbone.tokenize([f"{words} {c}." for c in CLASSES]).lengths - 1


@pytest.fixture(scope="module")
def pixels(backbone):
    return torch.randn(2, 3, backbone.image_size, backbone.image_size, generator=_g(11))


@pytest.mark.parametrize("class_specific", [False, True])
@torch.no_grad()
def test_coop_logits_equal_the_released_forward(backbone, pixels, tmp_path, class_specific):
    checkpoint = coop_checkpoint(backbone, class_specific=class_specific)
    method, _ = from_reference(_write(tmp_path, checkpoint), "coop", backbone, CLASSES)
    s, model = checkpoint["state_dict"], backbone.model
    ctx = s["ctx"] if class_specific else s["ctx"].expand(len(CLASSES), -1, -1)
    text = released_text_features(model, s["token_prefix"], ctx, s["token_suffix"], _eot(backbone, 4, False))
    expected = _scores(model, released_image_features(model, pixels), text)
    torch.testing.assert_close(method.eval()(pixel_values=pixels), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("position", ["middle", "front"])
@torch.no_grad()
def test_coop_with_the_class_name_inside_the_context_equals_the_released_forward(backbone, pixels, tmp_path,
                                                                                  position):  # fmt: skip
    """CoOp's CLASS_TOKEN_POSITION middle / front: the released learner cuts the class name's tokens (its BPE length)
    from the front of token_suffix and puts them between the context halves, or before the context."""
    checkpoint = coop_checkpoint(backbone)
    method, _ = from_reference(_write(tmp_path, checkpoint), "coop", backbone, CLASSES,
                               options={"class_position": position})  # fmt: skip
    s, model = checkpoint["state_dict"], backbone.model
    name_lens = backbone.tokenize(CLASSES, special_tokens=False).lengths
    rows = []
    for i, name_len in enumerate(name_lens.tolist()):
        prefix, suffix, ctx = s["token_prefix"][i:i + 1], s["token_suffix"][i:i + 1], s["ctx"].unsqueeze(0)
        name, rest = suffix[:, :name_len], suffix[:, name_len:]
        if position == "middle":
            rows.append(torch.cat([prefix, ctx[:, :2], name, ctx[:, 2:], rest], dim=1))
        else:
            rows.append(torch.cat([prefix, name, ctx, rest], dim=1))
    sentences = torch.cat(rows)
    eot = _eot(backbone, 4, False)
    text = released_text_features(model, sentences[:, :1], sentences[:, 1:5], sentences[:, 5:], eot)
    expected = _scores(model, released_image_features(model, pixels), text)
    torch.testing.assert_close(method.eval()(pixel_values=pixels), expected, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_cocoop_logits_equal_the_released_forward(backbone, pixels, tmp_path):
    checkpoint = cocoop_checkpoint(backbone)
    method, _ = from_reference(_write(tmp_path, checkpoint), "cocoop", backbone, CLASSES)
    s, model = checkpoint["state_dict"], backbone.model
    image = released_image_features(model, pixels)
    normed = F.normalize(image, dim=-1)
    hidden = F.relu(normed @ s["meta_net.linear1.weight"].t() + s["meta_net.linear1.bias"])
    shifts = hidden @ s["meta_net.linear2.weight"].t() + s["meta_net.linear2.bias"]  # (B, d_t)
    rows = []
    for b in range(len(pixels)):  # the released loop: one text pass per image with its shifted context
        ctx = (s["ctx"] + shifts[b]).expand(len(CLASSES), -1, -1)
        text = released_text_features(model, s["token_prefix"], ctx, s["token_suffix"], _eot(backbone, 4, True))
        rows.append(_scores(model, image[b : b + 1], text))
    torch.testing.assert_close(method.eval()(pixel_values=pixels), torch.cat(rows), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n_ctx, depth", [(2, 2), (6, 2), (2, 1)])
@torch.no_grad()
def test_maple_logits_equal_the_released_forward(backbone, pixels, tmp_path, n_ctx, depth):
    checkpoint = maple_checkpoint(backbone, n_ctx=n_ctx, depth=depth)
    method, _ = from_reference(_write(tmp_path, checkpoint), "maple", backbone, CLASSES)
    s, model = checkpoint["state_dict"], backbone.model
    ctx = s["prompt_learner.ctx"]
    text_deep = [s[f"prompt_learner.compound_prompts_text.{i}"] for i in range(depth - 1)]
    visual_deep = [text_deep[i] @ s[f"prompt_learner.compound_prompt_projections.{i}.weight"].t()
                   + s[f"prompt_learner.compound_prompt_projections.{i}.bias"] for i in range(depth - 1)]  # fmt: skip
    shared = ctx @ s["prompt_learner.proj.weight"].t() + s["prompt_learner.proj.bias"]
    text = released_text_features(model, s["prompt_learner.token_prefix"], ctx.expand(len(CLASSES), -1, -1),
                                  s["prompt_learner.token_suffix"], _eot(backbone, n_ctx, n_ctx <= 4), text_deep)
    image = released_image_features(model, pixels, shared, visual_deep)
    torch.testing.assert_close(method.eval()(pixel_values=pixels), _scores(model, image, text), rtol=1e-5,
                               atol=1e-5)  # fmt: skip


@torch.no_grad()
def test_ivlp_and_vpt_logits_equal_the_same_construction(backbone, pixels, tmp_path):
    """IVLP and VPT are written by the same clip/model.py blocks: checked with the same released-forward helpers."""
    checkpoint = ivlp_checkpoint(backbone)
    method, _ = from_reference(_write(tmp_path, checkpoint, "ivlp.pth"), "ivlp", backbone, CLASSES)
    s, model = checkpoint["state_dict"], backbone.model
    text = released_text_features(model, s["prompt_learner.token_prefix"],
                                  s["prompt_learner.ctx"].expand(len(CLASSES), -1, -1),
                                  s["prompt_learner.token_suffix"], _eot(backbone, 2, True),
                                  [s["text_encoder.transformer.resblocks.1.VPT_shallow"]])  # fmt: skip
    image = released_image_features(model, pixels, s["image_encoder.VPT"],
                                     [s["image_encoder.transformer.resblocks.1.VPT_shallow"]])  # fmt: skip
    torch.testing.assert_close(method.eval()(pixel_values=pixels), _scores(model, image, text), rtol=1e-5, atol=1e-5)

    checkpoint = vpt_checkpoint(backbone)
    method, report = from_reference(_write(tmp_path, checkpoint, "vpt.pth"), "vpt", backbone, CLASSES,
                                    template="a centered satellite photo of {}.")  # fmt: skip
    assert method.template == "a photo of a {}." and any("fixed template" in n for n in report.notes)
    s = checkpoint["state_dict"]
    text = backbone.encode_texts([f"a photo of a {c}." for c in CLASSES])
    image = released_image_features(model, pixels, s["image_encoder.VPT"],
                                     [s["image_encoder.transformer.resblocks.1.VPT_shallow"]])  # fmt: skip
    torch.testing.assert_close(method.eval()(pixel_values=pixels), _scores(model, image, text), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_upt_logits_equal_the_released_unmixed_network(backbone, pixels, tmp_path):
    checkpoint = upt_checkpoint(backbone)
    method, report = from_reference(_write(tmp_path, checkpoint), "upt", backbone, CLASSES)
    assert method.config.mix_tokens is False and method.config.n_heads == 1
    assert any("mix_tokens=false" in n for n in report.notes)
    s, model, d = checkpoint["state_dict"], backbone.model, backbone.text_width
    x = s["uni_ctx"][0]  # (8, d): a batch of 8 length-1 sequences in the released attention
    value = x @ s["self_attn.in_proj_weight"][2 * d:].t() + s["self_attn.in_proj_bias"][2 * d:]
    attended = value @ s["self_attn.out_proj.weight"].t() + s["self_attn.out_proj.bias"]  # softmax over 1 key = 1
    a = F.layer_norm(x + attended, (d,), s["norm1.weight"], s["norm1.bias"])
    hidden = F.relu(F.layer_norm(a, (d,), s["norm2.weight"], s["norm2.bias"]) @ s["linear1.weight"].t()
                    + s["linear1.bias"])  # fmt: skip
    f = a + hidden @ s["linear2.weight"].t() + s["linear2.bias"]
    text_prompt, visual_prompt = f[:4], f[4:] @ s["mlp.weight"].t() + s["mlp.bias"]
    text = released_text_features(model, s["token_prefix"], text_prompt.expand(len(CLASSES), -1, -1),
                                  s["token_suffix"], _eot(backbone, 4, True))  # fmt: skip
    image = released_image_features(model, pixels, visual_prompt, front=True)
    torch.testing.assert_close(method.eval()(pixel_values=pixels), _scores(model, image, text), rtol=1e-5, atol=1e-5)
    # the same tensors with the paper's mixing give other logits: the option is what reproduces the release
    mixed = vlprompt.get_prompt_model(backbone, "upt", CLASSES, config={**method.config.to_dict(),
                                                                        "mix_tokens": True})  # fmt: skip
    mixed.load_prompt_state_dict(method.prompt_state_dict())
    assert not torch.allclose(mixed.eval()(pixel_values=pixels), method(pixel_values=pixels), atol=1e-4)


# ---------------------------------------------------------------------------------------------- DPT repository
def dpt_files(backbone, tmp_path, n_ctx=4, n_visual=3, cavpt_layers=1, tokens=5, epoch=60, seed=7):
    """DPT's three registered models, each in its own folder as the trainer saves them."""
    g, dt, dv, e = _g(seed), backbone.text_width, backbone.vision_width, backbone.embed_dim
    bottom = backbone.vision_layers - cavpt_layers  # layers with plain visual prompts (BOTTOMLIMIT - 1)

    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.1

    text = {"ctx": r(n_ctx, dt), **_buffers(backbone, n_ctx, False)}
    visual = {"ctx": r(bottom, n_visual, dv)}
    extractor = {"ctx": r(cavpt_layers, tokens, dv)}
    for i in range(cavpt_layers):
        extractor.update({f"meta_nets.{i}.weight": r(dv, e), f"meta_nets.{i}.bias": r(dv),
                          f"attns.{i}.qmlp.weight": r(32, dv), f"attns.{i}.kmlp.weight": r(32, dv),
                          f"attns.{i}.vmlp.weight": r(dv, dv), f"lns.{i}.weight": 1 + r(dv), f"lns.{i}.bias": r(dv),
                          f"lns2.{i}.weight": 1 + r(dv), f"lns2.{i}.bias": r(dv),
                          f"classfiers.{i}.weight": r(len(CLASSES), dv)})  # fmt: skip
    merged = {}
    for name, state in (("prompt_learner", text), ("image_encoder.transformer.ctx_learner", visual),
                        ("image_encoder.transformer.extractor", extractor)):  # fmt: skip
        (tmp_path / "dpt_out" / name).mkdir(parents=True, exist_ok=True)
        torch.save({"state_dict": state, **_trainer_state([state["ctx"]])},
                   tmp_path / "dpt_out" / name / f"model.pth.tar-{epoch}")  # fmt: skip
        merged.update({f"{name}.{k}": v for k, v in state.items()})
    return tmp_path / "dpt_out", merged


def test_dpt_reads_its_three_models_with_every_key_and_round_trips(backbone, tmp_path, pixels):
    folder, merged = dpt_files(backbone, tmp_path)
    torch.save({}, folder / "prompt_learner" / "model.pth.tar-30")  # an earlier epoch of one model only: ignored
    method, report = from_reference(folder, "dpt", backbone, CLASSES)
    assert set(report.used) | set(report.recomputed) == set(merged) and not report.frozen
    assert method.config.bottom_limit == backbone.vision_layers and method.config.n_visual == 3
    assert method.config.cavpt_tokens == 5
    assert torch.equal(method.cavpt_layers[0].tokens.detach(), merged["image_encoder.transformer.extractor.ctx"][0])
    exported = tmp_path / "exported"
    save_reference(method, "dpt", exported, epoch=60)
    assert sorted(p.name for p in exported.iterdir()) == ["image_encoder.transformer.ctx_learner",
                                                          "image_encoder.transformer.extractor", "prompt_learner"]
    again, _ = from_reference(exported / "prompt_learner" / "model.pth.tar-60", "dpt", backbone, CLASSES)
    mine, theirs = method.prompt_state_dict(), again.prompt_state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    with torch.no_grad():
        assert torch.equal(again.eval()(pixel_values=pixels), method.eval()(pixel_values=pixels))
    (tmp_path / "partial" / "prompt_learner").mkdir(parents=True)
    with pytest.raises(ReferenceError, match="partial lacks image_encoder.transformer.ctx_learner, "
                                             "image_encoder.transformer.extractor: this trainer saves one model"):
        from_reference(tmp_path / "partial", "dpt", backbone, CLASSES)


@torch.no_grad()
def test_dpt_logits_equal_the_released_forward(backbone, pixels, tmp_path):
    """The released CustomCLIP_Selected_CoVPTDeep at evaluation: rank classes with the frozen image features against
    the template features, CoOp text features, visual prompts appended after the pre-LayerNorm and dropped per
    bottom layer, then CAVPT: the learned text features of the top K classes, mapped, attend over the layer's tokens
    plus the learned ones; LayerNorm(attention + query) are appended for that layer and dropped."""
    folder, s = dpt_files(backbone, tmp_path, tokens=5)
    template = "a centered satellite photo of {}."
    method, _ = from_reference(folder, "dpt", backbone, CLASSES, template=template, options={"top_k": 2})
    model, vm = backbone.model, backbone.model.vision_model
    frozen = F.normalize(released_image_features(model, pixels), dim=-1)
    template_feats = F.normalize(backbone.encode_texts([template.format(c) for c in CLASSES]), dim=-1)
    top = (frozen @ template_feats.t()).sort(dim=-1, descending=True).indices[:, :2]
    ctx = s["prompt_learner.ctx"].expand(len(CLASSES), -1, -1)
    text = released_text_features(model, s["prompt_learner.token_prefix"], ctx, s["prompt_learner.token_suffix"],
                                  _eot(backbone, 4, False))  # fmt: skip
    selected = text[top]  # (B, K, d): learned, unnormalised
    e = "image_encoder.transformer.extractor."
    visual = s["image_encoder.transformer.ctx_learner.ctx"]
    x = vm.pre_layrnorm(vm.embeddings(pixels))
    for i, layer in enumerate(vm.encoder.layers):
        if i < visual.shape[0]:
            extra = visual[i].expand(len(pixels), -1, -1)
        else:
            j = i - visual.shape[0]
            query = selected @ s[f"{e}meta_nets.{j}.weight"].t() + s[f"{e}meta_nets.{j}.bias"]
            keys = torch.cat([x, s[f"{e}ctx"][j].expand(len(pixels), -1, -1)], dim=1)
            u = (query @ s[f"{e}attns.{j}.qmlp.weight"].t()) @ (keys @ s[f"{e}attns.{j}.kmlp.weight"].t()).transpose(1, 2)
            attended = ((u / 32 ** 0.5).softmax(-1) @ keys) @ s[f"{e}attns.{j}.vmlp.weight"].t()
            extra = F.layer_norm(attended + query, (query.shape[-1],), s[f"{e}lns2.{j}.weight"], s[f"{e}lns2.{j}.bias"])
        out = layer(torch.cat([x, extra], dim=1), None)
        x = (out[0] if isinstance(out, tuple) else out)[:, : x.shape[1]]
    image = model.visual_projection(vm.post_layernorm(x[:, 0]))
    torch.testing.assert_close(method.eval()(pixel_values=pixels), _scores(model, image, text), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_the_dpt_repositorys_vpt_deep_baseline_is_read_with_its_placement(backbone, pixels, tmp_path):
    ctx = torch.randn(backbone.vision_layers, 3, backbone.vision_width, generator=_g(8)) * 0.1
    folder = tmp_path / "vpt_out" / "image_encoder.transformer.ctx_learner"
    folder.mkdir(parents=True)
    torch.save({"state_dict": {"ctx": ctx}, **_trainer_state([ctx])}, folder / "model.pth.tar-50")
    method, report = from_reference(folder / "model.pth.tar-50", "dpt_vpt", backbone, CLASSES,
                                    template="a centered satellite photo of {}.")  # fmt: skip
    assert method.config.placement == "after_pre_norm" and method.config.depth == backbone.vision_layers
    assert any("placement=after_pre_norm" in n for n in report.notes)
    # the released Transformer_VPTD: after the pre-LayerNorm, at every layer drop the previous tokens, append ctx[i]
    vm, model = backbone.model.vision_model, backbone.model
    x = vm.pre_layrnorm(vm.embeddings(pixels))
    for i, layer in enumerate(vm.encoder.layers):
        if i:
            x = x[:, :-3]
        x = layer(torch.cat([x, ctx[i].expand(len(pixels), -1, -1)], dim=1), None)
        x = x[0] if isinstance(x, tuple) else x
    image = model.visual_projection(vm.post_layernorm(x[:, 0]))
    text = backbone.encode_texts([f"a centered satellite photo of {c}." for c in CLASSES])
    torch.testing.assert_close(method.eval()(pixel_values=pixels), _scores(model, image, text), rtol=1e-5, atol=1e-5)
    exported = to_reference(method, "dpt_vpt")["state_dict"]
    assert torch.equal(exported["image_encoder.transformer.ctx_learner.ctx"], ctx)
    plain = vlprompt.get_prompt_model(backbone, "vpt_deep", CLASSES, config={"n_tokens": 3})
    with pytest.raises(ReferenceError, match="placement=after_pre_norm"):
        to_reference(plain, "dpt_vpt")


# ---------------------------------------------------------------------------------------------- faults
def test_a_checkpoint_of_another_method_is_refused_naming_the_right_one(backbone, tmp_path):
    path = _write(tmp_path, maple_checkpoint(backbone))
    with pytest.raises(ReferenceError, match="not a ivlp checkpoint.*looks like a maple checkpoint: use --from maple"):
        from_reference(path, "ivlp", backbone, CLASSES)
    path = _write(tmp_path, cocoop_checkpoint(backbone), "cocoop.pth")
    with pytest.raises(ReferenceError, match="not a coop checkpoint.*meta_net.*use --from cocoop"):
        from_reference(path, "coop", backbone, CLASSES)


def test_a_checkpoint_of_another_width_or_patch_size_is_refused(backbone, tmp_path):
    wide = load_backbone("random:vit-b-16")
    path = _write(tmp_path, coop_checkpoint(wide))
    with pytest.raises(ReferenceError, match=r"ctx has shape \(4, 512\).*needs \(4, 32\).*another CLIP"):
        from_reference(path, "coop", backbone, CLASSES)
    deep = ivlp_checkpoint(backbone, text_depth=3)  # the tiny text tower has 2 layers
    with pytest.raises(ReferenceError, match=r"'text_depth': 3.*exceeds the 2 layers.*pass the CLIP it was trained on"):
        from_reference(_write(tmp_path, deep, "deep.pth"), "ivlp", backbone, CLASSES)
    checkpoint = maple_checkpoint(backbone)
    checkpoint["state_dict"]["image_encoder.conv1.weight"] = torch.zeros(backbone.vision_width, 3, 16, 16)
    with pytest.raises(ReferenceError, match="16-pixel patches; this backbone has 8"):
        from_reference(_write(tmp_path, checkpoint, "m.pth"), "maple", backbone, CLASSES)


def test_other_class_names_and_a_clashing_option_are_reported(backbone, tmp_path):
    path = _write(tmp_path, coop_checkpoint(backbone))
    _, report = from_reference(path, "coop", backbone, ["cat", "dog"])
    assert any("holds 3 classes, you gave 2" in n for n in report.notes)
    _, report = from_reference(path, "coop", backbone, list(reversed(CLASSES)))
    assert any("token_suffix differs" in n for n in report.notes)
    with pytest.raises(ReferenceError, match="fixes n_ctx=4 by its tensors"):
        from_reference(path, "coop", backbone, CLASSES, options={"n_ctx": 8})
    method, _ = from_reference(path, "coop", backbone, CLASSES, options={"class_position": "middle"})
    assert method.config.class_position == "middle"


def test_files_that_are_not_checkpoints_are_refused(backbone, tmp_path):
    (tmp_path / "run" / "prompt_learner").mkdir(parents=True)
    torch.save(coop_checkpoint(backbone), tmp_path / "run" / "prompt_learner" / "model.pth.tar-50")
    with pytest.raises(ReferenceError, match="is a folder: pass one of its files, e.g. model.pth.tar-50"):
        read_checkpoint(tmp_path / "run" / "prompt_learner")
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(ReferenceError, match=r"cannot be read as a torch checkpoint \(UnpicklingError\): is it a"):
        read_checkpoint(tmp_path / "notes.txt")
    with pytest.raises(ReferenceError, match="unknown repository 'kgcoop'"):
        from_reference(tmp_path / "run" / "prompt_learner" / "model.pth.tar-50", "kgcoop", backbone, CLASSES)
    checkpoint = ivlp_checkpoint(backbone, text_depth=2)
    state = checkpoint["state_dict"]
    state["text_encoder.transformer.resblocks.3.VPT_shallow"] = state.pop("text_encoder.transformer.resblocks.1."
                                                                          "VPT_shallow")  # fmt: skip
    with pytest.raises(ReferenceError, match=r"at layers \[3\]"):
        from_reference(_write(tmp_path, checkpoint, "gap.pth"), "ivlp", backbone, CLASSES)


def test_trainer_objects_pickled_beside_the_tensors_are_read_without_running_code(backbone, tmp_path, monkeypatch):
    """Dassl pickles its warm-up scheduler (a class of its own, holding the cosine scheduler it hands over to) in
    the checkpoint; those classes are not importable here and no code of the file may run."""
    import sys
    import types

    module = types.ModuleType("dassl_like_scheduler")

    class ConstantWarmupScheduler:
        def __init__(self) -> None:
            self.warmup_epoch, self.successor = 1, {"T_max": 50}

    ConstantWarmupScheduler.__module__ = module.__name__
    ConstantWarmupScheduler.__qualname__ = "ConstantWarmupScheduler"
    module.ConstantWarmupScheduler = ConstantWarmupScheduler
    monkeypatch.setitem(sys.modules, module.__name__, module)
    checkpoint = coop_checkpoint(backbone)
    checkpoint["scheduler"] = ConstantWarmupScheduler()
    path = _write(tmp_path, checkpoint)
    monkeypatch.delitem(sys.modules, module.__name__)  # as on a machine without Dassl
    method, report = from_reference(path, "coop", backbone, CLASSES)
    assert torch.equal(method.ctx.detach(), checkpoint["state_dict"]["ctx"]) and "scheduler" in report.trainer_state


def test_incomplete_files_and_unequal_layers_are_refused_in_one_line(backbone, tmp_path):
    checkpoint = cocoop_checkpoint(backbone)
    del checkpoint["state_dict"]["meta_net.linear2.bias"]
    with pytest.raises(ReferenceError, match="lacks meta_net.linear2.bias, which a cocoop checkpoint holds"):
        from_reference(_write(tmp_path, checkpoint, "c.pth"), "cocoop", backbone, CLASSES)
    checkpoint = ivlp_checkpoint(backbone, n_text=2, text_depth=2)
    checkpoint["state_dict"]["text_encoder.transformer.resblocks.1.VPT_shallow"] = torch.zeros(4, backbone.text_width)
    with pytest.raises(ReferenceError, match="per-layer tensors do not agree in shape"):
        from_reference(_write(tmp_path, checkpoint, "i.pth"), "ivlp", backbone, CLASSES)
    checkpoint = maple_checkpoint(backbone)
    del checkpoint["state_dict"]["prompt_learner.compound_prompt_projections.0.bias"]
    with pytest.raises(ReferenceError, match="1 compound text prompts but 1 projection weights and 0 biases"):
        from_reference(_write(tmp_path, checkpoint, "m.pth"), "maple", backbone, CLASSES)
    with pytest.raises(ReferenceError, match="invalid options.*check the method options you set"):
        from_reference(_write(tmp_path, coop_checkpoint(backbone), "o.pth"), "coop", backbone, CLASSES,
                       options={"class_position": "centre"})  # fmt: skip


def test_import_never_mixes_into_a_started_run_and_export_says_what_the_file_cannot(backbone, tiny_model_dir,
                                                                                     tmp_path, capsys):  # fmt: skip
    from vlprompt.cli import main

    path = _write(tmp_path, coop_checkpoint(load_backbone(str(tiny_model_dir))))
    started = tmp_path / "started"
    (started / "checkpoint-last").mkdir(parents=True)
    (started / "metrics.jsonl").write_text('{"epoch": 1}\n')
    args = ["import", "--from", "coop", str(path), "--model", str(tiny_model_dir), "--classnames", ",".join(CLASSES),
            "--output", str(started)]  # fmt: skip
    assert main(args) == 2
    assert "already holds a prompt or a run (metrics.jsonl, checkpoint-last)" in capsys.readouterr().err
    assert not (started / "prompt.safetensors").exists()
    assert main(args + ["--set", "train.epochs=3"]) == 2 and "import reads method options only" in \
        capsys.readouterr().err  # fmt: skip
    assert main(args + ["--overwrite"]) == 0
    assert not (started / "checkpoint-last").exists() and (started / "prompt.safetensors").exists()
    capsys.readouterr()
    middle = tmp_path / "middle"
    assert main(["import", "--from", "coop", str(path), "--model", str(tiny_model_dir), "--classnames",
                 ",".join(CLASSES), "--output", str(middle), "--set", "method.class_position=middle"]) == 0
    capsys.readouterr()
    assert main(["export", str(middle), "--to", "coop", "--output", str(tmp_path / "m.pth.tar-1")]) == 0
    assert "CLASS_TOKEN_POSITION middle" in capsys.readouterr().out
    (tmp_path / "afile").write_text("x")
    assert main(["export", str(middle), "--to", "coop", "--output", str(tmp_path / "afile" / "m.pth")]) == 2
    assert "cannot write" in capsys.readouterr().err


def test_a_prompt_the_released_code_cannot_reproduce_is_not_exported(backbone):
    placed = vlprompt.get_prompt_model(backbone, "vpt_deep", CLASSES, "a photo of a {}.",
                                       config={"n_tokens": 2, "placement": "after_pre_norm"})  # fmt: skip
    with pytest.raises(ReferenceError, match="placement=after_pre_norm.*--to dpt_vpt"):
        to_reference(placed, "vpt")
    method = vlprompt.get_prompt_model(backbone, "maple", CLASSES, config={"n_ctx": 2, "placeholder": "{}."})
    with pytest.raises(ReferenceError, match="places a 2-token context in 'a photo of a {}.'"):
        to_reference(method, "maple")
    coop = vlprompt.get_prompt_model(backbone, "coop", CLASSES, config={"n_ctx": 2})
    with pytest.raises(ReferenceError, match="cannot be written as a maple checkpoint.*choose --to coop"):
        to_reference(coop, "maple")


# ---------------------------------------------------------------------------------------------- command line
def test_import_and_export_through_the_command_line(backbone, tiny_model_dir, tmp_path, capsys):
    from vlprompt.cli import main

    checkpoint = maple_checkpoint(load_backbone(str(tiny_model_dir)))
    path = _write(tmp_path, checkpoint)
    (tmp_path / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    code = main(["import", "--from", "maple", str(path), "--model", str(tiny_model_dir), "--classnames-file",
                 str(tmp_path / "classes.txt"), "--output", str(tmp_path / "imported")])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "read a MaPLe" in out and "frozen CLIP weight(s) not read" in out
    report = json.loads((tmp_path / "imported" / "import_report.json").read_text())
    assert set(report["used"]) | set(report["recomputed"]) | set(report["frozen"]) == set(checkpoint["state_dict"])
    loaded = vlprompt.PromptMethod.from_pretrained(tmp_path / "imported")
    assert loaded.registered_name == "maple" and loaded.classnames == CLASSES
    code = main(["export", str(tmp_path / "imported"), "--to", "maple", "--output", str(tmp_path / "back.pth.tar-5")])
    out, err = capsys.readouterr()
    assert code == 0, err
    back = torch.load(tmp_path / "back.pth.tar-5", weights_only=True)["state_dict"]
    assert torch.equal(back["prompt_learner.ctx"], checkpoint["state_dict"]["prompt_learner.ctx"])
    code = main(["import", "--from", "coop", str(path), "--model", str(tiny_model_dir), "--classnames", "a,b",
                 "--output", str(tmp_path / "wrong")])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 2 and err.count("\n") == 1 and "use --from maple" in err, err
    assert not (tmp_path / "wrong").exists()
