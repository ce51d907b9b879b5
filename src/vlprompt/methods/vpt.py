"""VPT: learnable visual tokens in the image tower, shallow (input only) or deep (fresh tokens per layer)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from typing import Literal

from vlprompt.backbones.base import SITE_IMAGE_SEQUENCE, SITE_TRANSIENT_IMAGE, DeepPrompts, UnsupportedBackboneError
from vlprompt.methods.base import ClassificationMethod, MethodConfig
from vlprompt.options import opt
from vlprompt.methods.registry import register_method
from vlprompt.recipes import Recipe

INITS = ("normal", "uniform")
Init = Literal["normal", "uniform"]


@dataclass
class VPTConfig(MethodConfig):
    method_name = "vpt"
    n_tokens: int = opt(8, min=0)
    # layers that receive fresh tokens: 1 = shallow, "all" (or L) = deep through every layer
    depth: int | Literal["all"] = opt(12, min=1, tower="image")
    init: Init = "normal"  # "normal": N(0, init_std); "uniform": VPT's U(-a, a), a = sqrt(6 / (3 * patch^2 + d_v))
    init_std: float = opt(0.02, gt=0)
    # Where the tokens enter: "embeddings" (after the patches, before the pre-LayerNorm, as the MaPLe repository's
    # VPT); "after_pre_norm" (appended after the pre-LayerNorm to each prompted layer's input and dropped from its
    # output, as the DPT repository's VPT-deep baseline).
    placement: Literal["embeddings", "after_pre_norm"] = "embeddings"


def visual_prompt_init(backbone, shape: tuple[int, ...], init: str, std: float) -> torch.Tensor:
    if init == "uniform":
        bound = math.sqrt(6.0 / (3 * backbone.patch_size**2 + backbone.vision_width))
        return torch.empty(*shape).uniform_(-bound, bound)
    return torch.randn(*shape) * std


class VPT(ClassificationMethod):
    name = "vpt"
    config_class = VPTConfig
    required_sites = frozenset({SITE_IMAGE_SEQUENCE})
    modifies_image = True

    def __init__(self, backbone, config: VPTConfig, classnames, template="a photo of a {}.") -> None:
        super().__init__(backbone, config, classnames, template)
        if config.placement == "after_pre_norm" and SITE_TRANSIENT_IMAGE not in backbone.sites:
            raise UnsupportedBackboneError(f"vpt.placement=after_pre_norm needs the {SITE_TRANSIENT_IMAGE} site, which "
                                           f"the {backbone.family} backbone does not offer; use placement=embeddings")
        shape = (config.depth, config.n_tokens, backbone.vision_width)
        self.prompts = nn.Parameter(visual_prompt_init(backbone, shape, config.init, config.init_std))

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.config.n_tokens == 0:
            return self.backbone.encode_image(pixel_values)
        if self.config.placement == "after_pre_norm":
            return self.backbone.encode_image(pixel_values, transient=_LayerTokens(self.prompts))
        return self.backbone.encode_image(pixel_values, DeepPrompts(list(self.prompts)))


class _LayerTokens:
    """``TransientPrompts`` of fresh tokens per layer: layer j gets ``prompts[j]`` appended to its input (after the
    pre-LayerNorm) and their outputs dropped; layers past the depth run unprompted."""

    def __init__(self, prompts: torch.Tensor) -> None:
        self.prompts = prompts

    def tokens(self, layer: int, hidden: torch.Tensor) -> torch.Tensor | None:
        if layer >= self.prompts.shape[0]:
            return None
        return self.prompts[layer].unsqueeze(0).expand(hidden.shape[0], -1, -1)

    def outputs(self, layer: int, out: torch.Tensor) -> None:
        pass


register_method("vpt_shallow", VPT, {"depth": 1}, summary="visual tokens at the image input",
                aliases=("vpt-shallow",))
register_method("vpt_deep", VPT, {"depth": "all"}, summary="fresh visual tokens at every image layer",
                aliases=("vpt", "vpt-deep"),
                released=Recipe(train={"epochs": 5, "batch_size": 4, "lr": 0.0025},
                                source="MaPLe repository, VPT config vit_b16_c2_ep5_batch4_4: SGD 0.0025, 5 epochs, "
                                       "batch 4"))  # fmt: skip
