"""The checkpoint layouts of the released trainers, read from their code (KaiyangZhou/CoOp trainers/coop.py and
cocoop.py; muzairkhattak/multimodal-prompt-learning trainers/maple.py, independentVL.py, vpt.py and clip/model.py).

Conventions they share: the text context replaces the words of "a photo of a" (or of "X X ... X" when it has more
than 4 tokens or no init phrase) right after [SOS]; ``token_prefix`` is [SOS]'s embedding and ``token_suffix`` the
embeddings after the context, of the sentence "<prefix words> <class name>." tokenised to 77 positions padded with
id 0. Visual prompts are appended after the patches, after the positional embedding and before the pre-LayerNorm;
a deep layer i replaces them (``VPT_shallow`` of block i, i >= 1).
"""
from __future__ import annotations

import re
from typing import Any

import torch

from vlprompt.interop.base import ReferenceError, ReferenceLayout

PHOTO = "a photo of a {}."
PHOTO_WORDS = 4  # the released init phrase "a photo of a" is used only for contexts of at most 4 tokens


def released_embeddings(backbone, sentences: list[str]) -> torch.Tensor:
    """Token embeddings ``(C, 77, d)`` of sentences as CLIP's own ``clip.tokenize`` pads them (id 0 after [EOS])."""
    tokens = backbone.tokenize(sentences)
    ids = tokens.input_ids.clone()
    positions = torch.arange(ids.shape[1]).unsqueeze(0)
    ids[positions >= tokens.lengths.unsqueeze(1)] = 0
    with torch.no_grad():
        return backbone.embed_tokens(ids.to(backbone.device)).detach().float().cpu()


def context_sentences(classnames: list[str], n_ctx: int, phrase_words: bool) -> list[str]:
    prefix = "a photo of a" if phrase_words else " ".join(["X"] * n_ctx)
    return [f"{prefix} {name}." if prefix else f"{name}." for name in classnames]


def class_buffers(method, n_ctx: int, phrase_words: bool, key_prefix: str = "") -> dict[str, torch.Tensor]:
    """``token_prefix`` / ``token_suffix`` of the released prompt learners for ``method``'s class names."""
    embeds = released_embeddings(method.backbone, context_sentences(method.classnames, n_ctx, phrase_words))
    return {f"{key_prefix}token_prefix": embeds[:, :1], f"{key_prefix}token_suffix": embeds[:, 1 + n_ctx:]}


def deep_keys(state: dict[str, torch.Tensor], pattern: str) -> dict[int, str]:
    """``{layer: key}`` of the keys matching ``pattern`` (one ``(\\d+)`` group: the layer)."""
    found = {}
    for key in state:
        match = re.fullmatch(pattern, key)
        if match:
            found[int(match.group(1))] = key
    return found


def contiguous(layers: dict[int, str], first: int, what: str) -> list[str]:
    """The keys of layers first, first+1, ... in order; a gap means a layout this trainer never writes."""
    order = sorted(layers)
    if order and order != list(range(first, first + len(order))):
        raise ReferenceError(f"{what} are at layers {order}; the released trainer prompts layers {first}.."
                             f"{first + len(order) - 1} without gaps")  # fmt: skip
    return [layers[i] for i in order]


def check_placeholder(trainer: str, n_ctx: int, placeholder: str) -> None:
    """The released prompt learners put a context of at most 4 tokens in "a photo of a {}." and a longer one in
    "X ... X {}.": a prompt trained in another sentence cannot be reproduced by that code."""
    expected = PHOTO if n_ctx <= PHOTO_WORDS else "{}."
    if placeholder != expected:
        raise ReferenceError(f"the released {trainer} places a {n_ctx}-token context in {expected!r}; this prompt was "
                             f"trained with placeholder {placeholder!r}, which that code cannot reproduce")


# --------------------------------------------------------------------------------------------- CoOp
class CoOpLayout(ReferenceLayout):
    repository = "CoOp (KaiyangZhou/CoOp, trainers/coop.py)"
    method = "coop"
    registered_name = "prompt_learner"
    recomputed = {"token_prefix": "[SOS] embedding per class", "token_suffix": "embeddings after the context"}

    def claims(self, state) -> bool:
        return "ctx" in state and not any(k.startswith("meta_net.") for k in state)

    def known_keys(self, state) -> list[str]:
        return ["ctx", "token_prefix", "token_suffix"]

    def options(self, state, backbone) -> dict[str, Any]:
        ctx = state["ctx"]
        if ctx.dim() not in (2, 3):
            raise ReferenceError(f"ctx has shape {tuple(ctx.shape)}; CoOp saves (M, width) or (classes, M, width)")
        return {"n_ctx": int(ctx.shape[-2]), "init": None, "class_specific": ctx.dim() == 3}

    def to_vlprompt(self, state, options):
        return {"ctx": ("ctx", state["ctx"])}

    def from_vlprompt(self, method):
        return {"ctx": method.ctx}

    def notes(self, options):
        return ["the checkpoint does not record CoOp's CLASS_TOKEN_POSITION: the class name goes at the end unless "
                "you set class_position (middle, front)"]

    def export_notes(self, method) -> list[str]:
        position = method.config.class_position
        if position == "end":
            return []
        return [f"the file does not record the class position: run the released CoOp with CLASS_TOKEN_POSITION "
                f"{position} (and import it back with --set method.class_position={position})"]

    def recompute_buffers(self, method):
        return class_buffers(method, method.config.n_ctx, phrase_words=False)

    def check_exportable(self, method) -> None:
        pass


# --------------------------------------------------------------------------------------------- CoCoOp
META = {"meta_net.linear1.weight": "meta_net.0.weight", "meta_net.linear1.bias": "meta_net.0.bias",
        "meta_net.linear2.weight": "meta_net.2.weight", "meta_net.linear2.bias": "meta_net.2.bias"}


class CoCoOpLayout(ReferenceLayout):
    repository = "CoCoOp (KaiyangZhou/CoOp, trainers/cocoop.py)"
    method = "cocoop"
    registered_name = "prompt_learner"
    recomputed = CoOpLayout.recomputed

    def claims(self, state) -> bool:
        return "ctx" in state and "meta_net.linear1.weight" in state

    def known_keys(self, state) -> list[str]:
        return ["ctx", "token_prefix", "token_suffix", *META]

    def options(self, state, backbone) -> dict[str, Any]:
        return {"n_ctx": int(state["ctx"].shape[0]), "init": None}

    def to_vlprompt(self, state, options):
        return {"ctx": ("ctx", state["ctx"]), **{theirs: (ours, state[theirs]) for theirs, ours in META.items()}}

    def from_vlprompt(self, method):
        own = dict(method.named_parameters())
        return {"ctx": method.ctx, **{theirs: own[ours] for theirs, ours in META.items()}}

    def recompute_buffers(self, method):
        # CoCoOp's configs start from "a photo of a" (4 tokens); its buffers are the same with "X X X X"
        return class_buffers(method, method.config.n_ctx, phrase_words=method.config.n_ctx == PHOTO_WORDS)

    def check_exportable(self, method) -> None:
        pass


# --------------------------------------------------------------------------------------------- MaPLe
class MaPLeLayout(ReferenceLayout):
    repository = "MaPLe (muzairkhattak/multimodal-prompt-learning, trainers/maple.py)"
    method = "maple"
    registered_name = "MultiModalPromptLearner"
    whole_model = True
    recomputed = {"prompt_learner.token_prefix": "[SOS] embedding per class",
                  "prompt_learner.token_suffix": "embeddings after the context"}

    def claims(self, state) -> bool:
        return "prompt_learner.ctx" in state and "prompt_learner.proj.weight" in state

    def known_keys(self, state) -> list[str]:
        fixed = ["prompt_learner.ctx", "prompt_learner.proj.weight", "prompt_learner.proj.bias", *self.recomputed]
        deep = [k for k in state if re.fullmatch(r"prompt_learner\.compound_prompts_text\.\d+", k)
                or re.fullmatch(r"prompt_learner\.compound_prompt_projections\.\d+\.(weight|bias)", k)]  # fmt: skip
        return fixed + deep

    def is_prompt(self, key: str) -> bool:
        return key.startswith("prompt_learner.")

    def _deep(self, state) -> tuple[list[str], list[str], list[str]]:
        text = contiguous(deep_keys(state, r"prompt_learner\.compound_prompts_text\.(\d+)"), 0,
                          "compound_prompts_text")  # fmt: skip
        weights = contiguous(deep_keys(state, r"prompt_learner\.compound_prompt_projections\.(\d+)\.weight"), 0,
                             "compound_prompt_projections")  # fmt: skip
        biases = contiguous(deep_keys(state, r"prompt_learner\.compound_prompt_projections\.(\d+)\.bias"), 0,
                            "compound_prompt_projections")  # fmt: skip
        if not len(text) == len(weights) == len(biases):
            raise ReferenceError(f"{len(text)} compound text prompts but {len(weights)} projection weights and "
                                 f"{len(biases)} biases: MaPLe saves one projection (weight and bias) per deep "
                                 "prompt")  # fmt: skip
        return text, weights, biases

    def options(self, state, backbone) -> dict[str, Any]:
        n_ctx = int(state["prompt_learner.ctx"].shape[0])
        text, _, _ = self._deep(state)
        return {"n_ctx": n_ctx, "depth": 1 + len(text), "placeholder": PHOTO if n_ctx <= PHOTO_WORDS else "{}.",
                "init_from_placeholder": False}

    def to_vlprompt(self, state, options):
        text, weights, biases = self._deep(state)
        # vlprompt stacks the layer-0 context and the deeper ones into one (depth, M, width) tensor
        stacked = torch.stack([state["prompt_learner.ctx"], *(state[k] for k in text)])
        out = {"prompt_learner.ctx": ("text_prompts", stacked)}
        out.update({k: ("text_prompts", stacked) for k in text})
        out["prompt_learner.proj.weight"] = ("couplings.0.weight", state["prompt_learner.proj.weight"])
        out["prompt_learner.proj.bias"] = ("couplings.0.bias", state["prompt_learner.proj.bias"])
        for j, (w, b) in enumerate(zip(weights, biases), start=1):
            out[w] = (f"couplings.{j}.weight", state[w])
            out[b] = (f"couplings.{j}.bias", state[b])
        return out

    def from_vlprompt(self, method):
        prompts = method.text_prompts
        out = {"prompt_learner.ctx": prompts[0], "prompt_learner.proj.weight": method.couplings[0].weight,
               "prompt_learner.proj.bias": method.couplings[0].bias}  # fmt: skip
        for j in range(1, prompts.shape[0]):
            out[f"prompt_learner.compound_prompts_text.{j - 1}"] = prompts[j]
            out[f"prompt_learner.compound_prompt_projections.{j - 1}.weight"] = method.couplings[j].weight
            out[f"prompt_learner.compound_prompt_projections.{j - 1}.bias"] = method.couplings[j].bias
        return out

    def notes(self, options):
        return [f"the text context replaces the words of {options['placeholder']!r} after [SOS], as the released "
                "prompt learner builds it for this context length"]

    def recompute_buffers(self, method):
        n = method.config.n_ctx
        return class_buffers(method, n, phrase_words=n <= PHOTO_WORDS, key_prefix="prompt_learner.")

    def check_exportable(self, method) -> None:
        check_placeholder("MaPLe", method.config.n_ctx, method.config.placeholder)


# --------------------------------------------------------------------------------------------- IVLP and VPT
TEXT_DEEP = r"text_encoder\.transformer\.resblocks\.(\d+)\.VPT_shallow"
IMAGE_DEEP = r"image_encoder\.transformer\.resblocks\.(\d+)\.VPT_shallow"


class IVLPLayout(ReferenceLayout):
    repository = "IVLP (muzairkhattak/multimodal-prompt-learning, trainers/independentVL.py)"
    method = "ivlp"
    registered_name = "VLPromptLearner"
    whole_model = True
    recomputed = MaPLeLayout.recomputed

    def claims(self, state) -> bool:
        return "prompt_learner.ctx" in state and "prompt_learner.proj.weight" not in state

    def known_keys(self, state) -> list[str]:
        deep = [k for k in state if re.fullmatch(TEXT_DEEP, k) or re.fullmatch(IMAGE_DEEP, k)]
        return ["prompt_learner.ctx", "image_encoder.VPT", *self.recomputed, *deep]

    def is_prompt(self, key: str) -> bool:
        return key == "image_encoder.VPT" or key.endswith(".VPT_shallow") or key.startswith("prompt_learner.")

    def options(self, state, backbone) -> dict[str, Any]:
        n_text = int(state["prompt_learner.ctx"].shape[0])
        image = state.get("image_encoder.VPT")
        text_deep = contiguous(deep_keys(state, TEXT_DEEP), 1, "text VPT_shallow prompts")
        image_deep = contiguous(deep_keys(state, IMAGE_DEEP), 1, "image VPT_shallow prompts")
        return {"n_text": n_text, "n_image": 0 if image is None else int(image.shape[0]),
                "text_depth": 1 + len(text_deep), "image_depth": 1 + len(image_deep),
                "placeholder": PHOTO if n_text <= PHOTO_WORDS else "{}.", "init_from_placeholder": False}  # fmt: skip

    def to_vlprompt(self, state, options):
        text_deep = contiguous(deep_keys(state, TEXT_DEEP), 1, "text VPT_shallow prompts")
        image_deep = contiguous(deep_keys(state, IMAGE_DEEP), 1, "image VPT_shallow prompts")
        text = torch.stack([state["prompt_learner.ctx"], *(state[k] for k in text_deep)])
        out = {k: ("text_prompts", text) for k in ["prompt_learner.ctx", *text_deep]}
        if "image_encoder.VPT" in state:
            image = torch.stack([state["image_encoder.VPT"], *(state[k] for k in image_deep)])
            out.update({k: ("image_prompts", image) for k in ["image_encoder.VPT", *image_deep]})
        return out

    def from_vlprompt(self, method):
        out = {"prompt_learner.ctx": method.text_prompts[0]}
        out.update({f"text_encoder.transformer.resblocks.{j}.VPT_shallow": method.text_prompts[j]
                    for j in range(1, method.text_prompts.shape[0])})  # fmt: skip
        if method.config.n_image:
            out["image_encoder.VPT"] = method.image_prompts[0]
            out.update({f"image_encoder.transformer.resblocks.{j}.VPT_shallow": method.image_prompts[j]
                        for j in range(1, method.image_prompts.shape[0])})  # fmt: skip
        return out

    def notes(self, options):
        return MaPLeLayout.notes(self, {"placeholder": options["placeholder"]})

    def recompute_buffers(self, method):
        n = method.config.n_text
        return class_buffers(method, n, phrase_words=n <= PHOTO_WORDS, key_prefix="prompt_learner.")

    def check_exportable(self, method) -> None:
        check_placeholder("IVLP", method.config.n_text, method.config.placeholder)


class VPTLayout(ReferenceLayout):
    repository = "VPT (muzairkhattak/multimodal-prompt-learning, trainers/vpt.py)"
    method = "vpt_deep"
    exports = ("vpt_deep", "vpt_shallow")
    registered_name = "prompt_learner"
    whole_model = True

    def claims(self, state) -> bool:
        return "image_encoder.VPT" in state and not any(k.startswith("prompt_learner.") for k in state)

    def known_keys(self, state) -> list[str]:
        return ["image_encoder.VPT", *(k for k in state if re.fullmatch(IMAGE_DEEP, k))]

    def is_prompt(self, key: str) -> bool:
        return key == "image_encoder.VPT" or key.endswith(".VPT_shallow")

    def options(self, state, backbone) -> dict[str, Any]:
        deep = contiguous(deep_keys(state, IMAGE_DEEP), 1, "image VPT_shallow prompts")
        return {"n_tokens": int(state["image_encoder.VPT"].shape[0]), "depth": 1 + len(deep)}

    def template(self, options):
        return PHOTO  # the released VPT scores every class with fixed "a photo of a <class>." features

    def to_vlprompt(self, state, options):
        deep = contiguous(deep_keys(state, IMAGE_DEEP), 1, "image VPT_shallow prompts")
        stacked = torch.stack([state["image_encoder.VPT"], *(state[k] for k in deep)])
        return {k: ("prompts", stacked) for k in ["image_encoder.VPT", *deep]}

    def from_vlprompt(self, method):
        out = {"image_encoder.VPT": method.prompts[0]}
        out.update({f"image_encoder.transformer.resblocks.{j}.VPT_shallow": method.prompts[j]
                    for j in range(1, method.prompts.shape[0])})  # fmt: skip
        return out

    def notes(self, options):
        return ["the released VPT scores with the fixed template 'a photo of a {}.': the imported prompt uses it",
                "visual prompts are placed as the MaPLe repository places them (after the patches, before the "
                "pre-LayerNorm), which is vlprompt's vpt_deep"]

    def check_exportable(self, method) -> None:
        if method.config.placement != "embeddings":
            raise ReferenceError(f"the released VPT places its tokens before the pre-LayerNorm; this prompt was "
                                 f"trained with placement={method.config.placement} (export it --to dpt_vpt)")
        if method.template != PHOTO:
            raise ReferenceError(f"the released VPT scores with {PHOTO!r}; this prompt was trained with template "
                                 f"{method.template!r}: its logits there would differ")  # fmt: skip


# --------------------------------------------------------------------------------------------- UPT
# The prompt learner's tiny network, their name -> vlprompt's (UPT's trainers/unified.py, released 2025-05-02).
UPT_NET = {f"{theirs}.{p}": f"{ours}.{p}" for theirs, ours in (("norm1", "net.norm1"), ("norm2", "net.norm2"),
           ("linear1", "net.linear1"), ("linear2", "net.linear2"), ("mlp", "visual_proj")) for p in ("weight", "bias")}
UPT_NET.update({f"self_attn.{p}": f"net.attn.{p}" for p in ("in_proj_weight", "in_proj_bias", "out_proj.weight",
                                                            "out_proj.bias")})  # fmt: skip
UPT_TEXT_TOKENS = 4  # the released learner takes rows [:4] as the text prompt and [4:] as the visual one


class UPTLayout(ReferenceLayout):
    repository = "UPT (yuhangzang/UPT, trainers/unified.py)"
    method = "upt"
    registered_name = "prompt_learner"
    recomputed = CoOpLayout.recomputed

    def claims(self, state) -> bool:
        return "uni_ctx" in state

    def known_keys(self, state) -> list[str]:
        return ["uni_ctx", "token_prefix", "token_suffix", *UPT_NET]

    def options(self, state, backbone) -> dict[str, Any]:
        shared = state["uni_ctx"]
        if shared.dim() != 3 or shared.shape[0] != 1 or shared.shape[1] != 2 * UPT_TEXT_TOKENS:
            raise ReferenceError(f"uni_ctx has shape {tuple(shared.shape)}; the released UPT runs only with 4 context "
                                 f"tokens, saving (1, 8, width)")  # fmt: skip
        return {"n_text": UPT_TEXT_TOKENS, "n_image": UPT_TEXT_TOKENS, "n_heads": 1, "mix_tokens": False,
                "placeholder": PHOTO, "init_from_placeholder": False}  # fmt: skip

    def to_vlprompt(self, state, options):
        return {"uni_ctx": ("shared", state["uni_ctx"][0]),
                **{theirs: (ours, state[theirs]) for theirs, ours in UPT_NET.items()}}  # fmt: skip

    def from_vlprompt(self, method):
        own = dict(method.named_parameters())
        return {"uni_ctx": method.shared.unsqueeze(0), **{theirs: own[ours] for theirs, ours in UPT_NET.items()}}

    def notes(self, options):
        return ["behaviour option mix_tokens=false switched on: the released network runs each shared token alone "
                "through its attention (no mixing), and this reproduces its logits; its single attention head too"]

    def recompute_buffers(self, method):
        return class_buffers(method, UPT_TEXT_TOKENS, phrase_words=True)

    def check_exportable(self, method) -> None:
        cfg = method.config
        if (cfg.n_text, cfg.n_image, cfg.n_heads, cfg.mix_tokens, cfg.placeholder) != (4, 4, 1, False, PHOTO):
            raise ReferenceError("the released UPT runs 4 + 4 tokens through one unmixed attention head in 'a photo "
                                 "of a {}.': train with --set method.mix_tokens=false --set method.n_heads=1 (and "
                                 "4 + 4 tokens) to export to it")  # fmt: skip


# --------------------------------------------------------------------------------------------- DPT repository
DPT_TEXT, DPT_VISUAL, DPT_CAVPT = "prompt_learner", "image_encoder.transformer.ctx_learner", \
    "image_encoder.transformer.extractor"
# One CAVPT layer's modules: released name -> vlprompt's (CAVPTLayer documents the roles).
DPT_CAVPT_PARTS = {"meta_nets.{i}.weight": "query_map.weight", "meta_nets.{i}.bias": "query_map.bias",
                   "attns.{i}.qmlp.weight": "q_proj.weight", "attns.{i}.kmlp.weight": "k_proj.weight",
                   "attns.{i}.vmlp.weight": "v_proj.weight", "lns.{i}.weight": "aux_norm.weight",
                   "lns.{i}.bias": "aux_norm.bias", "lns2.{i}.weight": "prompt_norm.weight",
                   "lns2.{i}.bias": "prompt_norm.bias", "classfiers.{i}.weight": "aux_head.weight"}  # fmt: skip


class DPTLayout(ReferenceLayout):
    repository = "DPT (fanrena/DPT, trainers/DPT.py)"
    method = "dpt"
    files = (DPT_TEXT, DPT_VISUAL, DPT_CAVPT)
    recomputed = {f"{DPT_TEXT}.token_prefix": "[SOS] embedding per class",
                  f"{DPT_TEXT}.token_suffix": "embeddings after the context"}

    def claims(self, state) -> bool:
        return f"{DPT_TEXT}.ctx" in state and f"{DPT_CAVPT}.ctx" in state

    def _cavpt_layers(self, state) -> int:
        return int(state[f"{DPT_CAVPT}.ctx"].shape[0])

    def known_keys(self, state) -> list[str]:
        n = self._cavpt_layers(state) if f"{DPT_CAVPT}.ctx" in state else 0
        cavpt = [f"{DPT_CAVPT}.{part.format(i=i)}" for i in range(n) for part in DPT_CAVPT_PARTS]
        return [f"{DPT_TEXT}.ctx", f"{DPT_VISUAL}.ctx", f"{DPT_CAVPT}.ctx", *self.recomputed, *cavpt]

    def options(self, state, backbone) -> dict[str, Any]:
        visual = state[f"{DPT_VISUAL}.ctx"]
        bottom = int(visual.shape[0]) + 1  # BOTTOMLIMIT: visual prompts in layers 1..B-1, CAVPT in B..L
        n_cavpt = self._cavpt_layers(state)
        if bottom - 1 + n_cavpt != backbone.vision_layers:
            raise ReferenceError(f"the checkpoint prompts {bottom - 1} layers and has {n_cavpt} CAVPT layers, "
                                 f"{bottom - 1 + n_cavpt} in all; this backbone's image tower has "
                                 f"{backbone.vision_layers}: pass the CLIP it was trained on as --model")  # fmt: skip
        return {"n_ctx": int(state[f"{DPT_TEXT}.ctx"].shape[0]), "n_visual": int(visual.shape[1]),
                "bottom_limit": bottom, "cavpt": True, "cavpt_tokens": int(state[f"{DPT_CAVPT}.ctx"].shape[1]),
                "attn_dim": int(state[f"{DPT_CAVPT}.attns.0.qmlp.weight"].shape[0]), "aux_input": "attention"}  # fmt: skip

    def to_vlprompt(self, state, options):
        out = {f"{DPT_TEXT}.ctx": ("ctx", state[f"{DPT_TEXT}.ctx"]),
               f"{DPT_VISUAL}.ctx": ("visual_prompts", state[f"{DPT_VISUAL}.ctx"])}  # fmt: skip
        tokens = state[f"{DPT_CAVPT}.ctx"]
        for i in range(self._cavpt_layers(state)):
            for theirs, ours in DPT_CAVPT_PARTS.items():
                key = f"{DPT_CAVPT}.{theirs.format(i=i)}"
                out[key] = (f"cavpt_layers.{i}.{ours}", state[key])
        # the learned key/value tokens of every CAVPT layer are one (layers, tokens, width) tensor there
        out[f"{DPT_CAVPT}.ctx"] = [(f"cavpt_layers.{i}.tokens", tokens[i]) for i in range(tokens.shape[0])]
        return out

    def notes(self, options):
        return [f"the checkpoint does not record CPN (classes whose prompts CAVPT builds): top_k={10} as released "
                "unless you set it", "the frozen ranking pass uses the dataset's template (the released "
                "CUSTOM_TEMPLATES); pass --dataset or --template so that it is the same"]

    def from_vlprompt(self, method):
        own = dict(method.named_parameters())
        out = {f"{DPT_TEXT}.ctx": method.ctx, f"{DPT_VISUAL}.ctx": method.visual_prompts,
               f"{DPT_CAVPT}.ctx": torch.stack([layer.tokens for layer in method.cavpt_layers])}  # fmt: skip
        for i in range(len(method.cavpt_layers)):
            for theirs, ours in DPT_CAVPT_PARTS.items():
                out[f"{DPT_CAVPT}.{theirs.format(i=i)}"] = own[f"cavpt_layers.{i}.{ours}"]
        return out

    def recompute_buffers(self, method):
        return class_buffers(method, method.config.n_ctx, phrase_words=False, key_prefix=f"{DPT_TEXT}.")

    def check_exportable(self, method) -> None:
        cfg = method.config
        if not cfg.cavpt or method.visual_prompts is None or not cfg.cavpt_tokens or cfg.aux_input != "attention":
            raise ReferenceError("the released DPT always has visual prompts, CAVPT with its learned tokens and the "
                                 "auxiliary head on the attention output; this prompt lacks one of them")


class DPTVPTLayout(ReferenceLayout):
    repository = "VPT-deep baseline of the DPT repository (fanrena/DPT, trainers/VPT.py)"
    method = "vpt_deep"
    exports = ("vpt_deep", "vpt_shallow")
    files = (DPT_VISUAL,)

    def claims(self, state) -> bool:
        return f"{DPT_VISUAL}.ctx" in state and len(state) == 1

    def known_keys(self, state) -> list[str]:
        return [f"{DPT_VISUAL}.ctx"]

    def options(self, state, backbone) -> dict[str, Any]:
        ctx = state[f"{DPT_VISUAL}.ctx"]
        return {"n_tokens": int(ctx.shape[1]), "depth": int(ctx.shape[0]), "placement": "after_pre_norm"}

    def to_vlprompt(self, state, options):
        return {f"{DPT_VISUAL}.ctx": ("prompts", state[f"{DPT_VISUAL}.ctx"])}

    def from_vlprompt(self, method):
        return {f"{DPT_VISUAL}.ctx": method.prompts}

    def notes(self, options):
        return ["behaviour option placement=after_pre_norm switched on: this baseline appends its tokens after the "
                "pre-LayerNorm at every layer (vlprompt's vpt_deep places them before it by default, as the MaPLe "
                "repository), and scores with the dataset's template"]

    def check_exportable(self, method) -> None:
        if method.config.placement != "after_pre_norm":
            raise ReferenceError("this baseline appends its tokens after the pre-LayerNorm: train with --set "
                                 "method.placement=after_pre_norm to export to it")


LAYOUTS: dict[str, ReferenceLayout] = {"coop": CoOpLayout(), "cocoop": CoCoOpLayout(), "maple": MaPLeLayout(),
                                       "ivlp": IVLPLayout(), "vpt": VPTLayout(), "upt": UPTLayout(),
                                       "dpt": DPTLayout(), "dpt_vpt": DPTVPTLayout()}  # fmt: skip
