"""IVLP: independent deep prompts in both towers (text after [SOS], image after the patches)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from vlprompt.backbones.base import SITE_IMAGE_SEQUENCE, SITE_TEXT_SEQUENCE, DeepPrompts
from vlprompt.methods.base import ClassificationMethod, MethodConfig, class_prompts, seed_from_placeholder
from vlprompt.methods.vpt import Init, visual_prompt_init
from vlprompt.options import opt
from vlprompt.methods.registry import register_method
from vlprompt.recipes import Recipe


@dataclass
class IVLPConfig(MethodConfig):
    method_name = "ivlp"
    n_text: int = opt(2, min=0)
    n_image: int = opt(2, min=0)
    text_depth: int | Literal["all"] = opt(12, min=1, tower="text")
    image_depth: int | Literal["all"] = opt(12, min=1, tower="image")
    # As in the reference code: text prompts replace the first n_text words of this sentence ("[SOS] v1 v2 of a
    # CLASS ." for n_text=2), and the layer-0 prompt starts from those words' embeddings.
    placeholder: str = opt("a photo of a {}.", placeholder=True)
    init_from_placeholder: bool = True
    image_init: Init = "normal"
    init_std: float = opt(0.02, gt=0)


class IVLP(ClassificationMethod):
    name = "ivlp"
    config_class = IVLPConfig
    required_sites = frozenset({SITE_TEXT_SEQUENCE, SITE_IMAGE_SEQUENCE})
    modifies_text = True
    modifies_image = True

    def __init__(self, backbone, config: IVLPConfig, classnames, template="a photo of a {}.") -> None:
        super().__init__(backbone, config, classnames, template)
        text = torch.randn(config.text_depth, config.n_text, backbone.text_width) * config.init_std
        seed_from_placeholder(text[0], backbone, config.placeholder, config.init_from_placeholder)
        self.text_prompts = nn.Parameter(text)
        shape = (config.image_depth, config.n_image, backbone.vision_width)
        self.image_prompts = nn.Parameter(visual_prompt_init(backbone, shape, config.image_init, config.init_std))
        self._on_classes_changed()

    def _on_classes_changed(self) -> None:
        self.class_text = class_prompts(self, self.config.placeholder, self.config.n_text)

    def text_features(self) -> torch.Tensor:
        prompts = DeepPrompts(list(self.text_prompts)) if self.config.n_text else None
        return self.backbone.encode_class_prompts(self.class_text, prompts)

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        prompts = DeepPrompts(list(self.image_prompts)) if self.config.n_image else None
        return self.backbone.encode_image(pixel_values, prompts)


register_method("ivlp", IVLP, {"text_depth": "all", "image_depth": "all"},
                summary="independent deep text + visual prompts",
                released=Recipe(train={"epochs": 5, "batch_size": 4, "lr": 0.0035},
                                source="MaPLe repository, IVLP config vit_b16_c2_ep5_batch4_2+2ctx: SGD 0.0035, 5 "
                                       "epochs, batch 4"))  # fmt: skip
# APT's baseline: plain deep prompts of the same count in both towers (IVLP with random init, no fixed words).
register_method(
    "deep_prompt", IVLP,
    {"n_text": 50, "n_image": 50, "placeholder": "{}.", "init_from_placeholder": False, "text_depth": "all",
     "image_depth": "all"},
    summary="deep prompts in both towers (APT's baseline, same prompt count)",
)
