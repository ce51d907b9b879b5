"""MaPLe: deep text prompts, and visual prompts produced from them by a coupling function per depth."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from vlprompt.backbones.base import SITE_IMAGE_SEQUENCE, SITE_TEXT_SEQUENCE, DeepPrompts
from vlprompt.methods.base import ClassificationMethod, MethodConfig, class_prompts, seed_from_placeholder
from vlprompt.options import opt
from vlprompt.methods.registry import register_method
from vlprompt.recipes import Recipe


@dataclass
class MaPLeConfig(MethodConfig):
    method_name = "maple"
    n_ctx: int = opt(2, min=0)
    depth: int | Literal["all"] = opt(9, min=1, tower="both")  # prompted layers in both towers (MaPLe's J)
    # Text prompts replace the first n_ctx words of this sentence, and start from their embeddings (reference).
    placeholder: str = opt("a photo of a {}.", placeholder=True)
    init_from_placeholder: bool = True
    init_std: float = opt(0.02, gt=0)


class MaPLe(ClassificationMethod):
    name = "maple"
    config_class = MaPLeConfig
    required_sites = frozenset({SITE_TEXT_SEQUENCE, SITE_IMAGE_SEQUENCE})
    modifies_text = True
    modifies_image = True

    def __init__(self, backbone, config: MaPLeConfig, classnames, template="a photo of a {}.") -> None:
        super().__init__(backbone, config, classnames, template)
        text = torch.randn(config.depth, config.n_ctx, backbone.text_width) * config.init_std
        seed_from_placeholder(text[0], backbone, config.placeholder, config.init_from_placeholder)
        self.text_prompts = nn.Parameter(text)
        self.couplings = nn.ModuleList(
            nn.Linear(backbone.text_width, backbone.vision_width) for _ in range(config.depth if config.n_ctx else 0)
        )
        self._on_classes_changed()

    def _on_classes_changed(self) -> None:
        self.class_text = class_prompts(self, self.config.placeholder, self.config.n_ctx)

    def visual_prompts(self) -> list[torch.Tensor]:
        """Visual prompts of every depth: the coupling of that depth's text prompts (their only source)."""
        return [coupling(p) for coupling, p in zip(self.couplings, self.text_prompts)]

    def text_features(self) -> torch.Tensor:
        prompts = DeepPrompts(list(self.text_prompts)) if self.config.n_ctx else None
        return self.backbone.encode_class_prompts(self.class_text, prompts)

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        prompts = DeepPrompts(self.visual_prompts()) if self.config.n_ctx else None
        return self.backbone.encode_image(pixel_values, prompts)


register_method(
    "maple", MaPLe, summary="deep text prompts coupled into visual prompts",
    released=Recipe(train={"epochs": 5, "batch_size": 4, "lr": 0.0035},
                    source="MaPLe config vit_b16_c2_ep5_batch4_2ctx: SGD 0.0035, 5 epochs, batch 4"),
)
