"""VPT: learnable visual tokens in the image tower, shallow (input only) or deep (fresh tokens per layer)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from vlprompt.backbones.base import SITE_IMAGE_SEQUENCE, DeepPrompts
from vlprompt.methods.base import MethodConfig, PromptMethod, require

INITS = ("normal", "uniform")


@dataclass
class VPTConfig(MethodConfig):
    n_tokens: int = 8
    depth: int = 12  # layers that receive fresh tokens: 1 = shallow, L = deep through every layer
    init: str = "normal"  # "normal": N(0, init_std); "uniform": VPT's U(-a, a), a = sqrt(6 / (3 * patch^2 + d_v))
    init_std: float = 0.02

    def validate(self) -> None:
        require(self.n_tokens >= 0, f"vpt.n_tokens must be >= 0, got {self.n_tokens}")
        require(self.depth >= 1, f"vpt.depth must be >= 1, got {self.depth}")
        require(self.init in INITS, f"vpt.init must be one of {INITS}")


def visual_prompt_init(backbone, shape: tuple[int, ...], init: str, std: float) -> torch.Tensor:
    if init == "uniform":
        bound = math.sqrt(6.0 / (3 * backbone.patch_size**2 + backbone.vision_width))
        return torch.empty(*shape).uniform_(-bound, bound)
    return torch.randn(*shape) * std


class VPT(PromptMethod):
    name = "vpt"
    config_class = VPTConfig
    required_sites = frozenset({SITE_IMAGE_SEQUENCE})
    modifies_image = True

    def __init__(self, backbone, config: VPTConfig, classnames, template="a photo of a {}.") -> None:
        super().__init__(backbone, config, classnames, template)
        require(
            config.depth <= backbone.vision_layers,
            f"vpt.depth={config.depth} exceeds the image tower's {backbone.vision_layers} layers",
        )
        shape = (config.depth, config.n_tokens, backbone.vision_width)
        self.prompts = nn.Parameter(visual_prompt_init(backbone, shape, config.init, config.init_std))

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.config.n_tokens == 0:
            return self.backbone.encode_image(pixel_values)
        return self.backbone.encode_image(pixel_values, DeepPrompts(list(self.prompts)))
