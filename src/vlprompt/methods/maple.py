"""MaPLe: deep text prompts, and visual prompts produced from them by a coupling function per depth."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vlprompt.backbones.base import SITE_IMAGE_SEQUENCE, SITE_TEXT_SEQUENCE, DeepPrompts
from vlprompt.methods.base import (
    ClassTextPrompts,
    MethodConfig,
    PromptMethod,
    seed_from_placeholder,
    require,
)


@dataclass
class MaPLeConfig(MethodConfig):
    n_ctx: int = 2
    depth: int = 9  # prompted layers in both towers (MaPLe's J)
    # Text prompts replace the first n_ctx words of this sentence, and start from their embeddings (reference).
    placeholder: str = "a photo of a {}."
    init_from_placeholder: bool = True
    init_std: float = 0.02

    def validate(self) -> None:
        require(self.n_ctx >= 0, f"maple.n_ctx must be >= 0, got {self.n_ctx}")
        require(self.depth >= 1, f"maple.depth must be >= 1, got {self.depth}")
        require(self.placeholder.count("{}") == 1, "maple.placeholder needs exactly one '{}' for the class name")


class MaPLe(PromptMethod):
    name = "maple"
    config_class = MaPLeConfig
    required_sites = frozenset({SITE_TEXT_SEQUENCE, SITE_IMAGE_SEQUENCE})
    modifies_text = True
    modifies_image = True

    def __init__(self, backbone, config: MaPLeConfig, classnames, template="a photo of a {}.") -> None:
        super().__init__(backbone, config, classnames, template)
        depth_limit = min(backbone.text_layers, backbone.vision_layers)
        require(config.depth <= depth_limit, f"maple.depth={config.depth} exceeds the towers' {depth_limit} layers")
        text = torch.randn(config.depth, config.n_ctx, backbone.text_width) * config.init_std
        seed_from_placeholder(text[0], backbone, config.placeholder, config.init_from_placeholder)
        self.text_prompts = nn.Parameter(text)
        self.couplings = nn.ModuleList(
            nn.Linear(backbone.text_width, backbone.vision_width) for _ in range(config.depth if config.n_ctx else 0)
        )
        self._on_classes_changed()

    def _on_classes_changed(self) -> None:
        self.class_text = ClassTextPrompts(self.backbone, self.classnames, self.config.placeholder, self.config.n_ctx)

    def visual_prompts(self) -> list[torch.Tensor]:
        """Visual prompts of every depth: the coupling of that depth's text prompts (their only source)."""
        return [coupling(p) for coupling, p in zip(self.couplings, self.text_prompts)]

    def text_features(self) -> torch.Tensor:
        prompts = DeepPrompts(list(self.text_prompts)) if self.config.n_ctx else None
        return self.class_text.features(self.backbone, prompts)

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        prompts = DeepPrompts(self.visual_prompts()) if self.config.n_ctx else None
        return self.backbone.encode_image(pixel_values, prompts)
