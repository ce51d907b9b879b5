"""What transformers' two-tower models share (``CLIPModel``, ``SiglipModel``, ``Siglip2Model``): ``text_model`` and
``vision_model`` with ``encoder.layers`` of pre-norm blocks, tower configs, and a learned ``logit_scale``.

Family adapters subclass :class:`TransformersTwoTowers` for these and implement only what differs.
"""
from __future__ import annotations

import torch
from torch import nn

from vlprompt.backbones.base import DualEncoderBackbone


class TransformersTwoTowers(DualEncoderBackbone):
    """Dimensions, temperature and attention blocks read from a transformers two-tower model."""

    @property
    def text_width(self) -> int:
        return self.model.config.text_config.hidden_size

    @property
    def vision_width(self) -> int:
        return self.model.config.vision_config.hidden_size

    @property
    def text_layers(self) -> int:
        return len(self.model.text_model.encoder.layers)

    @property
    def vision_layers(self) -> int:
        return len(self.model.vision_model.encoder.layers)

    @property
    def patch_size(self) -> int:
        return self.model.config.vision_config.patch_size

    @property
    def image_size(self) -> int:
        return self.model.config.vision_config.image_size

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale.exp()

    @property
    def device(self) -> torch.device:
        return self.model.logit_scale.device

    def attention_blocks(self, tower: str) -> list[nn.Module]:
        """The self-attention module of every layer of ``tower`` ("text" or "image"), for block-site methods."""
        model = self.model.text_model if tower == "text" else self.model.vision_model
        return [layer.self_attn for layer in model.encoder.layers]
