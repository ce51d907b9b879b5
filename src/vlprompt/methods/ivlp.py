"""IVLP: independent deep prompts in both towers (text after [SOS], image after the patches)."""
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
from vlprompt.methods.vpt import INITS, visual_prompt_init


@dataclass
class IVLPConfig(MethodConfig):
    n_text: int = 2
    n_image: int = 2
    text_depth: int = 12
    image_depth: int = 12
    # As in the reference code: text prompts replace the first n_text words of this sentence ("[SOS] v1 v2 of a
    # CLASS ." for n_text=2), and the layer-0 prompt starts from those words' embeddings.
    placeholder: str = "a photo of a {}."
    init_from_placeholder: bool = True
    image_init: str = "normal"
    init_std: float = 0.02

    def validate(self) -> None:
        require(self.n_text >= 0 and self.n_image >= 0, "ivlp.n_text and ivlp.n_image must be >= 0")
        require(self.text_depth >= 1 and self.image_depth >= 1, "ivlp depths must be >= 1")
        require(self.image_init in INITS, f"ivlp.image_init must be one of {INITS}")
        require(self.placeholder.count("{}") == 1, "ivlp.placeholder needs exactly one '{}' for the class name")


class IVLP(PromptMethod):
    name = "ivlp"
    config_class = IVLPConfig
    required_sites = frozenset({SITE_TEXT_SEQUENCE, SITE_IMAGE_SEQUENCE})
    modifies_text = True
    modifies_image = True

    def __init__(self, backbone, config: IVLPConfig, classnames, template="a photo of a {}.") -> None:
        super().__init__(backbone, config, classnames, template)
        require(config.text_depth <= backbone.text_layers, f"ivlp.text_depth exceeds {backbone.text_layers} layers")
        require(config.image_depth <= backbone.vision_layers, f"ivlp.image_depth exceeds {backbone.vision_layers}")
        text = torch.randn(config.text_depth, config.n_text, backbone.text_width) * config.init_std
        seed_from_placeholder(text[0], backbone, config.placeholder, config.init_from_placeholder)
        self.text_prompts = nn.Parameter(text)
        shape = (config.image_depth, config.n_image, backbone.vision_width)
        self.image_prompts = nn.Parameter(visual_prompt_init(backbone, shape, config.image_init, config.init_std))
        self._on_classes_changed()

    def _on_classes_changed(self) -> None:
        self.class_text = ClassTextPrompts(self.backbone, self.classnames, self.config.placeholder, self.config.n_text)

    def text_features(self) -> torch.Tensor:
        prompts = DeepPrompts(list(self.text_prompts)) if self.config.n_text else None
        return self.class_text.features(self.backbone, prompts)

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        prompts = DeepPrompts(list(self.image_prompts)) if self.config.n_image else None
        return self.backbone.encode_image(pixel_values, prompts)
