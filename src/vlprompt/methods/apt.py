"""APT: approximated prompt tuning: the effect of prompt tokens on each attention block, added cheaply.

Instead of attending over ``N + M`` tokens in every layer (deep prompts), each block's attention output gets an
additive term computed from its own input and ``M`` learnable tokens (methods.md, "APT"):
``K~ = P + (P A^T) B^T``; ``S = ReLU(X K~^T)``; ``E = S P``; ``w = max_j S`` (no gradient);
``O' = (O + w * E) * exp(s)``. The cost is ``O(T * M * C)`` per block instead of a global attention over the
prompts. On CLIP it is applied to both towers' blocks (``towers``). The term is per token, so the causal text
tower stays causal and its exact end-of-text truncation still holds.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from vlprompt.backbones.base import SITE_BLOCK
from vlprompt.methods.base import ClassificationMethod, MethodConfig, class_prompts
from vlprompt.options import opt
from vlprompt.methods.registry import register_method


@dataclass
class APTConfig(MethodConfig):
    method_name = "apt"
    n_prompts: int = opt(50, min=0)  # M per block (released: 50..200)
    rank: int = opt(4, min=0)  # r of the low-rank modulation A (r x C), B (C x r)
    towers: Literal["both", "image", "text"] = "both"
    init_std: float = opt(0.02, gt=0)  # prompts P ~ N(0, init_std)


class ApproximatedPrompts(nn.Module):
    """APT's parameters for every block of one tower, and the block-output change they make."""

    def __init__(self, layers: int, width: int, config: APTConfig) -> None:
        super().__init__()
        m, r = config.n_prompts, config.rank
        self.prompts = nn.Parameter(torch.randn(layers, m, width) * config.init_std)
        self.down = nn.Parameter(torch.randn(layers, r, width))  # A ~ N(0, 1)
        self.up = nn.Parameter(torch.zeros(layers, width, r))  # B = 0: K~ starts equal to P
        self.log_scale = nn.Parameter(torch.zeros(layers))  # s, O' = (...) * exp(s)

    def __call__(self, layer: int, x: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        p = self.prompts[layer].to(x.dtype)
        keys = p + (p @ self.down[layer].to(x.dtype).t()) @ self.up[layer].to(x.dtype).t()  # (M, C)
        scores = torch.relu(x @ keys.t())  # (B, T, M)
        effect = scores @ p  # (B, T, C)
        gate = scores.detach().amax(dim=-1, keepdim=True)
        return (attn_out + gate * effect) * self.log_scale[layer].exp().to(attn_out.dtype)


class APT(ClassificationMethod):
    name = "apt"
    config_class = APTConfig
    required_sites = frozenset({SITE_BLOCK})

    def __init__(self, backbone, config: APTConfig, classnames, template="a photo of a {}.") -> None:
        super().__init__(backbone, config, classnames, template)
        enabled = config.n_prompts > 0
        self.text_apt = (
            ApproximatedPrompts(backbone.text_layers, backbone.text_width, config)
            if enabled and config.towers in ("both", "text")
            else None
        )
        self.image_apt = (
            ApproximatedPrompts(backbone.vision_layers, backbone.vision_width, config)
            if enabled and config.towers in ("both", "image")
            else None
        )
        self._on_classes_changed()

    def _on_classes_changed(self) -> None:
        self.class_text = class_prompts(self, self.template)

    @property
    def modifies_text(self) -> bool:  # type: ignore[override]
        return self.text_apt is not None

    @property
    def modifies_image(self) -> bool:  # type: ignore[override]
        return self.image_apt is not None

    def text_features(self) -> torch.Tensor:
        return self.backbone.encode_class_prompts(self.class_text, block=self.text_apt)

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.backbone.encode_image(pixel_values, block=self.image_apt)


register_method("apt", APT, summary="approximated prompts: additive term on every attention block")
