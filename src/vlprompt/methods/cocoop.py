"""CoCoOp: CoOp contexts shifted per image by a meta-network on the (normalised) image feature.

Each image has its own prompts, so the text tower runs for ``batch x classes`` sequences. The authors trained
with batch size 1 for memory; here the images of a batch go through the text tower together, in chunks of at most
``max_chunk_sequences`` (128) sequences (one image's classes at least), and when a batch takes several chunks each
chunk's text-tower activations are recomputed in the backward pass (activation checkpointing). Peak memory
therefore follows one chunk (``max(classes, 128)`` sequences), not the batch, and a batch that fits in one chunk
(e.g. 8 images x 10 classes) pays neither the per-image loop nor the recomputation. Every chunking gives the same
logits and gradients (tested).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from vlprompt.backbones.base import SITE_TEXT_SEQUENCE, DeepPrompts
from vlprompt.methods.base import ClassificationMethod, MethodConfig, class_prompts, phrase_embedding, require
from vlprompt.options import opt
from vlprompt.methods.registry import register_method
from vlprompt.recipes import Recipe


@dataclass
class CoCoOpConfig(MethodConfig):
    method_name = "cocoop"
    n_ctx: int = opt(4, min=0)
    init: str | None = "a photo of a"  # fixes n_ctx to the phrase's token count; None: N(0, init_std)
    init_std: float = opt(0.02, gt=0)
    # Images whose classes run through the text tower together (memory ~ chunk x classes sequences). None: as many
    # as keep a chunk within max_chunk_sequences sequences, at least one image.
    chunk_size: int | None = opt(None, min=1)
    max_chunk_sequences: int = opt(128, min=1)
    checkpoint_chunks: bool = True  # with several chunks, recompute each in backward: memory ~ one chunk

    def validate(self) -> None:
        require(
            self.init is None or (isinstance(self.init, str) and self.init.strip() != ""),
            "cocoop.init must be a non-empty phrase or null",
        )


class CoCoOp(ClassificationMethod):
    name = "cocoop"
    config_class = CoCoOpConfig
    required_sites = frozenset({SITE_TEXT_SEQUENCE})
    modifies_text = True
    conditions_text_on_image = True  # text features depend on the image: never cached per class

    def __init__(self, backbone, config: CoCoOpConfig, classnames, template="a photo of a {}.") -> None:
        super().__init__(backbone, config, classnames, template)
        if config.init:
            ctx = phrase_embedding(backbone, config.init).float()  # prompts train in fp32 whatever the weights' dtype
            config.n_ctx = ctx.shape[0]
        else:
            ctx = torch.randn(config.n_ctx, backbone.text_width) * config.init_std
        self.ctx = nn.Parameter(ctx)
        hidden = max(backbone.embed_dim // 16, 1)
        self.meta_net = (
            nn.Sequential(
                nn.Linear(backbone.embed_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, backbone.text_width)
            )
            if config.n_ctx
            else None  # no context to shift: nothing to learn
        )
        self._on_classes_changed()

    def _on_classes_changed(self) -> None:
        self.class_text = class_prompts(self)

    def instance_contexts(self, image_feats: torch.Tensor) -> torch.Tensor:
        """Per-image contexts ``(B, M, d_t)``: the shared context plus the meta-network's shift."""
        shift = self.meta_net(F.normalize(image_feats, dim=-1).to(self.ctx.dtype))
        return self.ctx.unsqueeze(0) + shift.unsqueeze(1)

    def text_features(self) -> torch.Tensor:
        """Class features without the image shift (the bare context): for inspection, not used for logits."""
        return self.backbone.encode_class_prompts(self.class_text, DeepPrompts([self.ctx]) if self.config.n_ctx else None)

    def forward(self, pixel_values=None, image_feats=None, text_feats=None) -> torch.Tensor:
        if image_feats is None:
            with torch.no_grad():
                image_feats = self.image_features(pixel_values)  # the image tower is frozen and unprompted
        if self.meta_net is None:
            return self.logits(image_feats, self.text_features())
        contexts = self.instance_contexts(image_feats)
        size = self.images_per_chunk()
        # One chunk: checkpointing would hold the same activations at its peak (during the recomputation), so it
        # would only cost time. Several chunks: only one chunk's activations at a time.
        recompute = self.config.checkpoint_chunks and len(image_feats) > size
        rows = []
        for start in range(0, len(image_feats), size):
            chunk = contexts[start : start + size]
            if recompute and torch.is_grad_enabled() and chunk.requires_grad:
                feats = checkpoint(self._chunk_text_features, chunk, use_reentrant=False)
            else:
                feats = self._chunk_text_features(chunk)
            rows.append(self.logits(image_feats[start : start + len(chunk)], feats))  # feats (b, C, d)
        return torch.cat(rows)

    def images_per_chunk(self) -> int:
        if self.config.chunk_size is not None:
            return self.config.chunk_size
        return max(1, self.config.max_chunk_sequences // len(self.classnames))

    def _chunk_text_features(self, contexts: torch.Tensor) -> torch.Tensor:
        """Text features ``(b, C, d)`` of every class under each of ``b`` per-image contexts."""
        return self.backbone.encode_class_prompts_per_image(self.class_text, contexts)


register_method(
    "cocoop", CoCoOp, summary="CoOp + per-image context shift from a meta-network",
    released=Recipe(train={"epochs": 10, "batch_size": 1},
                    source="CoCoOp config vit_b16_c4_ep10_batch1_ctxv1: SGD 0.002, 10 epochs, batch 1"),
)
