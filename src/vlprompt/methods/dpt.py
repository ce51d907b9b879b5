"""DPT: Dual-modality Prompt Tuning (Xing et al., TMM 2023; released code github.com/fanrena/DPT).

Three learned parts on a frozen CLIP (see docs/methods/dpt.md):

* **Text**: CoOp, ``n_ctx`` (16) generic context vectors after ``[SOS]`` of ``"{class}."``
  (the reference placeholder ``"X X ... X {class}."``).
* **Visual prompts**: ``n_visual`` (10) tokens per layer in the image layers *before* the CAVPT layers, appended
  after CLIP's pre-LayerNorm to that layer's input, run through the layer and dropped (the adapter's
  ``image_transient`` site), so every layer sees a fresh set.
* **CAVPT** (class-aware visual prompts) in the last layer(s): a frozen zero-shot pass ranks the classes per image;
  the learned (unnormalised) text features of the top ``K = min(top_k, C)`` classes, mapped to ``d_v``, attend
  over that layer's (detached) input tokens plus ``cavpt_tokens`` learned tokens; ``LayerNorm(attention + query)``
  gives K prompts appended to that layer's input (transient). An auxiliary head classifies the cross-attention
  output of each token; its cross-entropy counts only the token whose class is the ground truth.

Layer indexing. ``bottom_limit`` is the released code's ``BOTTOMLIMIT`` = B, counted from 1: visual prompts go to
layers ``1..B-1`` and CAVPT to layers ``B..L`` (1-indexed), i.e. 0-indexed image layers ``0..B-2`` get visual
prompts and ``B-1..L-1`` get CAVPT. ``None`` means B = L: visual prompts in every layer but the last, CAVPT in the
last one.

How the trainer drives it. ``forward`` returns the main logits; :meth:`training_step` runs the same forward and
returns every loss term by name (main, auxiliary, and during the guidance warm-up the two guidance terms). The
trainer calls :meth:`on_epoch_start` before every epoch (the "general knowledge guidance" warm-up lasts
``guidance_epochs`` epochs).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from vlprompt.backbones.base import SITE_TEXT_SEQUENCE, SITE_TRANSIENT_IMAGE, DeepPrompts
from vlprompt.methods.base import ClassificationMethod, MethodConfig, class_prompts, require
from vlprompt.options import opt
from vlprompt.methods.registry import register_method
from vlprompt.recipes import Recipe
from vlprompt.tasks.batches import ClassificationBatch, StepOutput

# The engine's (and CoOp's) default base learning rate; ``param_groups`` scales both parts by base_lr / this.
REFERENCE_LR = 0.002


@dataclass
class DPTConfig(MethodConfig):
    method_name = "dpt"
    # text side (CoOp)
    n_ctx: int = opt(16, min=0)
    ctx_init_std: float = opt(0.02, gt=0)
    # visual prompts (appended after the pre-LayerNorm, run, dropped) in 0-indexed layers 0..B-2
    n_visual: int = opt(10, min=0)
    visual_init_std: float = opt(0.02, gt=0)
    # B, 1-indexed as the released BOTTOMLIMIT: CAVPT in layers B..L (1-indexed). None: B = L (last layer only).
    bottom_limit: int | None = opt(None, min=1)
    # class-aware visual prompts
    cavpt: bool = True
    top_k: int = opt(10, min=1, help="K = min(top_k, number of classes); disable CAVPT with dpt.cavpt=false")
    cavpt_tokens: int = opt(10, min=0)  # learned key/value tokens per CAVPT layer
    attn_dim: int = opt(32, min=1)  # query/key projection width
    cavpt_init_std: float = opt(0.02, gt=0)
    alpha: float = opt(0.3, min=0)  # weight of the auxiliary loss
    # "attention": the auxiliary head reads the cross-attention output of each class-aware token (released code);
    # "layer_output": it reads those tokens' outputs of the transformer layer they were appended to.
    aux_input: Literal["attention", "layer_output"] = "attention"
    # "general knowledge guidance": during the first guidance_epochs epochs the loss is
    # guidance_main_weight * CE(main) + CE(frozen image vs learned text) + CE(prompted image vs template text).
    # The released scripts use 30 of 60 epochs; the default 0 turns the warm-up off (see docs/methods/dpt.md).
    guidance_epochs: int = opt(0, min=0)
    guidance_main_weight: float = opt(0.1, min=0)
    # per-part learning rates (param_groups); scaled by train.lr / 0.002 when scale_lr_with_base is true
    text_lr: float = opt(0.002, gt=0)
    visual_lr: float = opt(0.01, gt=0)
    scale_lr_with_base: bool = True

    def validate(self) -> None:
        for name in ("ctx_init_std", "visual_init_std", "cavpt_init_std", "text_lr", "visual_lr"):
            value = getattr(self, name)
            require(math.isfinite(value), f"dpt.{name} must be a finite positive number, got {value!r}")


class CAVPTLayer(nn.Module):
    """Class-aware visual prompts of one image layer, plus that layer's auxiliary classifier.

    Parameters (ViT-B/16, C classes): query map ``Linear(d, d_v)`` with bias, query/key projections
    ``Linear(d_v, attn_dim)`` without bias, value projection ``Linear(d_v, d_v)`` without bias, ``cavpt_tokens``
    key/value tokens, the prompt LayerNorm, and the auxiliary head ``LayerNorm(d_v) -> Linear(d_v, C)`` (no bias).
    Module roles follow the released ``CAVPT``/``Attention`` (meta_nets, qmlp, kmlp, vmlp, ctx, lns2, lns,
    classfiers).
    """

    def __init__(self, embed_dim: int, width: int, n_classes: int, n_tokens: int, attn_dim: int, std: float) -> None:
        super().__init__()
        self.query_map = nn.Linear(embed_dim, width)
        self.q_proj = nn.Linear(width, attn_dim, bias=False)
        self.k_proj = nn.Linear(width, attn_dim, bias=False)
        self.v_proj = nn.Linear(width, width, bias=False)
        self.tokens = nn.Parameter(torch.randn(n_tokens, width) * std) if n_tokens else None
        self.prompt_norm = nn.LayerNorm(width)
        self.aux_norm = nn.LayerNorm(width)
        self.aux_head = nn.Linear(width, n_classes, bias=False)

    def forward(self, hidden: torch.Tensor, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``hidden`` (B, T, d_v): the layer's input; ``queries`` (B, K, d): learned text features of the top-K.

        Returns the class-aware prompts ``(B, K, d_v)`` and the cross-attention output ``(B, K, d_v)``.
        """
        dtype = self.query_map.weight.dtype
        q = self.query_map(queries.to(dtype))
        kv = hidden.detach().to(dtype)
        if self.tokens is not None:
            kv = torch.cat([kv, self.tokens.unsqueeze(0).expand(kv.shape[0], -1, -1)], dim=1)
        scores = self.q_proj(q) @ self.k_proj(kv).transpose(1, 2) / math.sqrt(self.q_proj.out_features)
        attended = self.v_proj(scores.softmax(dim=-1) @ kv)
        return self.prompt_norm(attended + q), attended

    def aux_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.aux_head(self.aux_norm(x.to(self.aux_head.weight.dtype))).float()


class _DPTTransient:
    """The adapter's ``TransientPrompts`` for one forward pass: visual prompts below B-1, CAVPT from B-1 on."""

    def __init__(self, method: "DPT", queries: torch.Tensor | None) -> None:
        self.method = method
        self.queries = queries  # (B, K, d) or None without CAVPT
        self.aux_inputs: list[torch.Tensor] = []  # per CAVPT layer, (B, K, d_v)

    def tokens(self, layer: int, hidden: torch.Tensor) -> torch.Tensor | None:
        m = self.method
        first = m.cavpt_start
        if layer < first:
            if m.visual_prompts is None:
                return None
            return m.visual_prompts[layer].unsqueeze(0).expand(hidden.shape[0], -1, -1)
        if m.cavpt_layers is None or self.queries is None:
            return None
        prompts, attended = m.cavpt_layers[layer - first](hidden, self.queries)
        if m.config.aux_input == "attention":
            self.aux_inputs.append(attended)
        return prompts

    def outputs(self, layer: int, out: torch.Tensor) -> None:
        if self.method.config.aux_input == "layer_output" and layer >= self.method.cavpt_start:
            self.aux_inputs.append(out)

    def aux_logits(self) -> torch.Tensor | None:
        """``(B, n_cavpt_layers, K, C)`` float logits of the auxiliary heads, or None."""
        heads = self.method.cavpt_layers
        if heads is None or not self.aux_inputs:
            return None
        return torch.stack([head.aux_logits(x) for head, x in zip(heads, self.aux_inputs)], dim=1)


class DPT(ClassificationMethod):
    name = "dpt"
    config_class = DPTConfig
    required_sites = frozenset({SITE_TEXT_SEQUENCE, SITE_TRANSIENT_IMAGE})
    modifies_text = True
    modifies_image = True

    def __init__(self, backbone, config: DPTConfig, classnames, template="a photo of a {}.") -> None:
        super().__init__(backbone, config, classnames, template)
        layers = backbone.vision_layers
        bottom = layers if config.bottom_limit is None else config.bottom_limit
        require(
            bottom <= layers,
            f"dpt.bottom_limit={bottom} exceeds the image tower's {layers} layers (CAVPT goes to layers "
            f"bottom_limit..{layers}, counted from 1)",
        )
        self.cavpt_start = bottom - 1  # 0-indexed first CAVPT layer; visual prompts in layers 0..cavpt_start-1
        self.ctx = (
            nn.Parameter(torch.randn(config.n_ctx, backbone.text_width) * config.ctx_init_std) if config.n_ctx else None
        )
        self.visual_prompts = None
        if config.n_visual and self.cavpt_start > 0:
            shape = (self.cavpt_start, config.n_visual, backbone.vision_width)
            self.visual_prompts = nn.Parameter(torch.randn(*shape) * config.visual_init_std)
        self.cavpt_layers = None
        if config.cavpt:
            self.cavpt_layers = nn.ModuleList(
                CAVPTLayer(
                    backbone.embed_dim,
                    backbone.vision_width,
                    len(self.classnames),
                    config.cavpt_tokens,
                    config.attn_dim,
                    config.cavpt_init_std,
                )
                for _ in range(layers - self.cavpt_start)
            )
        self._epoch = 0
        self._on_classes_changed()

    # ----------------------------------------------------------------- classes
    @property
    def num_aux_classes(self) -> int | None:
        """Classes of the auxiliary heads (fixed at construction), or None without CAVPT."""
        return None if self.cavpt_layers is None else self.cavpt_layers[0].aux_head.out_features

    @property
    def k(self) -> int:
        """Class-aware prompts per image: ``min(top_k, C)``."""
        return min(self.config.top_k, len(self.classnames))

    def _on_classes_changed(self) -> None:
        """Any label set is accepted: top-K and the queries follow the classes. The auxiliary heads keep the size
        they were built with; they only matter for the training loss, which refuses a different class count."""
        self.class_text = class_prompts(self)
        with torch.no_grad():
            template = self.backbone.encode_texts([self.template.format(c) for c in self.classnames])
        # hand-written-template text features (normalised): the frozen ranking and the guidance target
        self.register_buffer("template_text", F.normalize(template.float(), dim=-1), persistent=False)

    # ----------------------------------------------------------------- epochs
    def on_epoch_start(self, epoch: int) -> None:
        """0-indexed epoch about to start; the guidance warm-up is active while ``epoch < guidance_epochs``."""
        self._epoch = int(epoch)

    @property
    def guidance_active(self) -> bool:
        return self._epoch < self.config.guidance_epochs

    # ----------------------------------------------------------------- features
    def text_features(self) -> torch.Tensor:
        prompts = DeepPrompts([self.ctx]) if self.ctx is not None else None
        return self.backbone.encode_class_prompts(self.class_text, prompts)

    @torch.no_grad()
    def frozen_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.backbone.encode_image(pixel_values)

    @torch.no_grad()
    def top_k_classes(self, frozen_image_feats: torch.Tensor) -> torch.Tensor:
        """Indices ``(B, K)`` of the K best classes of frozen image features vs the hand-written template."""
        # In float32 on both sides: the template features follow the module's dtype (.to(bf16) / .double()).
        scores = F.normalize(frozen_image_feats.float(), dim=-1) @ self.template_text.float().t()
        return scores.topk(self.k, dim=-1).indices

    def ranks_classes(self) -> bool:
        """Whether CAVPT needs the frozen zero-shot pass: only when it keeps fewer classes than there are.

        With ``K = C`` every image's top-K is every class, and nothing depends on their order: each class-aware
        prompt is computed from its own query, the prompts are appended without positional embeddings to an
        unmasked layer (the other tokens' outputs do not depend on their order), and the auxiliary loss picks, per
        image, the token of its label. So the frozen image pass (a whole extra forward of the image tower) is skipped
        and the classes are taken in index order: the same logits, losses and gradients (up to float summation
        order; tested)."""
        return self.k < len(self.classnames)

    def image_features(
        self, pixel_values: torch.Tensor, text_feats: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Prompted image features ``(B, d)``; ``text_feats`` (learned, unnormalised) are computed if not given."""
        return self._encode(pixel_values, text_feats)[0]

    def _encode(self, pixel_values: torch.Tensor, text_feats: torch.Tensor | None, need_frozen: bool = False):
        frozen = topk = queries = None
        ranking = self.cavpt_layers is not None and self.ranks_classes()
        if ranking or need_frozen:
            frozen = self.frozen_image_features(pixel_values)
        if self.cavpt_layers is not None:
            if text_feats is None:
                text_feats = self.text_features()
            if ranking:
                topk = self.top_k_classes(frozen)
            else:  # K = C: every class, in any order (see ranks_classes)
                every = torch.arange(len(self.classnames), device=pixel_values.device)
                topk = every.unsqueeze(0).expand(pixel_values.shape[0], -1)
            queries = text_feats[topk]  # (B, K, d): learned text features of each image's top-K classes
        if self.visual_prompts is None and queries is None:
            return self.backbone.encode_image(pixel_values), frozen, topk, None
        transient = _DPTTransient(self, queries)
        feats = self.backbone.encode_image(pixel_values, transient=transient)
        return feats, frozen, topk, transient.aux_logits()

    # ----------------------------------------------------------------- forward and loss
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        image_feats: torch.Tensor | None = None,
        text_feats: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Main logits ``(B, C)``."""
        if text_feats is None:
            text_feats = self.text_features()
        if image_feats is not None:  # features from image_features(): plain logits
            return self.logits(image_feats, text_feats)
        if pixel_values is None:
            raise ValueError("pass pixel_values or precomputed image_feats")
        return self.logits(self._encode(pixel_values, text_feats)[0], text_feats)

    def training_step(self, batch: ClassificationBatch) -> StepOutput:
        """Main loss + alpha * auxiliary CE; during the guidance warm-up the main loss is weighted
        ``guidance_main_weight`` and the two guidance terms are added (the auxiliary term stays, as released)."""
        if batch.pixel_values is None:
            raise ValueError("DPT prompts the image tower: it trains on pixels, not cached image features")
        text_feats = self.text_features()
        guidance = self.guidance_active
        feats, frozen, topk, aux = self._encode(batch.pixel_values, text_feats, need_frozen=guidance)
        logits = self.logits(feats, text_feats)
        labels = batch.labels
        main = self.loss(logits, labels)
        terms: dict[str, torch.Tensor] = {}
        if guidance:
            terms["main"] = self.config.guidance_main_weight * main
            terms["guidance_text"] = self.loss(self.logits(frozen, text_feats), labels)
            terms["guidance_image"] = self.loss(self.logits(feats, self.template_text), labels)
        else:
            terms["main"] = main
        if self.cavpt_layers is not None and self.config.alpha > 0:
            if self.num_aux_classes != len(self.classnames):
                raise ValueError(
                    f"DPT's auxiliary heads were built for {self.num_aux_classes} classes but the method now has "
                    f"{len(self.classnames)}: set_classes to another label set is for evaluation only. Train a new "
                    "DPT for these classes (or set dpt.alpha=0 to train without the auxiliary loss)."
                )
            terms["aux"] = self.config.alpha * self.aux_loss(aux, topk, labels)
        return StepOutput(terms, logits=logits)

    @staticmethod
    def aux_loss(aux_logits: torch.Tensor | None, topk: torch.Tensor | None, labels: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of the auxiliary logits of the tokens whose class is the ground truth.

        ``aux_logits`` (B, layers, K, C), ``topk`` (B, K). Images whose label is not among their top-K contribute no
        term; if no image does, the result is 0. Each CAVPT layer of a matching image contributes one term.
        """
        if aux_logits is None or topk is None:
            return torch.zeros((), device=labels.device)
        match = topk == labels.unsqueeze(1)  # (B, K): at most one True per row
        if not bool(match.any()):
            return aux_logits.sum() * 0.0
        picked = aux_logits.permute(0, 2, 1, 3)[match]  # (n, layers, C)
        targets = labels.unsqueeze(1).expand(-1, topk.shape[1])[match]  # (n,)
        targets = targets.unsqueeze(1).expand(-1, picked.shape[1])
        return F.cross_entropy(picked.reshape(-1, picked.shape[-1]), targets.reshape(-1))

    # ----------------------------------------------------------------- optimisation
    def param_groups(self, base_lr: float | None = None) -> list[dict[str, Any]]:
        """Text context at ``text_lr``; visual prompts and CAVPT at ``visual_lr``.

        With ``scale_lr_with_base`` (default) both are multiplied by ``base_lr / 0.002`` so the engine's ``train.lr``
        still scales the whole method (the engine's default 0.002 gives exactly text_lr / visual_lr).
        """
        scale = 1.0
        if base_lr is not None and self.config.scale_lr_with_base:
            scale = base_lr / REFERENCE_LR
        text = [self.ctx] if self.ctx is not None else []
        visual = [p for n, p in self.prompt_parameters().items() if n != "ctx"]
        groups = []
        if text:
            groups.append({"params": text, "lr": self.config.text_lr * scale, "name": "text"})
        if visual:
            groups.append({"params": visual, "lr": self.config.visual_lr * scale, "name": "visual"})
        return groups


register_method(
    "dpt", DPT, summary="CoOp text prompt + deep visual prompts + class-aware visual prompts (CAVPT)",
    released=Recipe(train={"epochs": 60}, method_options={"guidance_epochs": 30},
                    source="DPT scripts: SGD, batch 32, 60 epochs with 30 of general-knowledge guidance; lr 0.002 "
                           "text / 0.01 visual (param_groups)"),
)
