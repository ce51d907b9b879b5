"""UPT: one tiny network turns a shared token matrix into both the text and the visual prompts.

The released code builds its attention without ``batch_first``, so the 8 shared tokens are treated as a batch of
length-1 sequences and never attend to each other. Here they really mix by default (the paper's point): every output
prompt depends on every shared token (tested). ``mix_tokens=false`` reproduces the released network (each token
alone through the attention), so a checkpoint of the released code gives its own logits (``vlprompt import --from
upt`` switches it on, with the released single head).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vlprompt.backbones.base import IMAGE_PROMPTS_FRONT, SITE_IMAGE_SEQUENCE, SITE_TEXT_SEQUENCE, DeepPrompts
from vlprompt.methods.base import ClassificationMethod, MethodConfig, class_prompts, require, seed_from_placeholder
from vlprompt.options import opt
from vlprompt.methods.registry import register_method
from vlprompt.recipes import Recipe


@dataclass
class UPTConfig(MethodConfig):
    method_name = "upt"
    n_text: int = opt(4, min=0)
    n_image: int = opt(4, min=0)
    n_heads: int = opt(8, min=1)  # heads of the tiny network's self-attention (must divide the text width)
    # True: the shared tokens attend to each other (the paper); False: each alone, as the released code runs them.
    mix_tokens: bool = True
    placeholder: str = opt("a photo of a {}.", placeholder=True)  # prompts replace its first n_text words
    init_from_placeholder: bool = True  # text half of U starts from those words' embeddings
    init_std: float = opt(0.02, gt=0)


class UnifiedPromptNet(nn.Module):
    """The reference's tiny net: ``a = norm1(U + attn(U))``, ``f = a + linear2(relu(linear1(norm2(a))))``."""

    def __init__(self, width: int, n_heads: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(width, n_heads, batch_first=True)
        self.norm1 = nn.LayerNorm(width)
        self.norm2 = nn.LayerNorm(width)
        self.linear1 = nn.Linear(width, width)
        self.linear2 = nn.Linear(width, width)

    def forward(self, tokens: torch.Tensor, mix: bool = True) -> torch.Tensor:
        # mix: one sequence of all shared tokens, which attend to each other; otherwise each token is its own
        # length-1 sequence (the released code's layout), so attention only maps it through values and output.
        x = tokens.unsqueeze(0) if mix else tokens.unsqueeze(1)
        a = self.norm1(x + self.attn(x, x, x, need_weights=False)[0])
        f = a + self.linear2(F.relu(self.linear1(self.norm2(a))))
        return f.squeeze(0) if mix else f.squeeze(1)


class UPT(ClassificationMethod):
    name = "upt"
    config_class = UPTConfig
    required_sites = frozenset({SITE_TEXT_SEQUENCE, SITE_IMAGE_SEQUENCE})
    modifies_text = True
    modifies_image = True

    def __init__(self, backbone, config: UPTConfig, classnames, template="a photo of a {}.") -> None:
        super().__init__(backbone, config, classnames, template)
        width = backbone.text_width
        require(width % config.n_heads == 0, f"upt.n_heads={config.n_heads} must divide the text width {width}")
        shared = torch.randn(config.n_text + config.n_image, width) * config.init_std
        seed_from_placeholder(shared[: config.n_text], backbone, config.placeholder, config.init_from_placeholder)
        self.shared = nn.Parameter(shared)
        # Zero-size prompts: no network either, so nothing trains and the model is exactly zero-shot.
        has_prompts = config.n_text + config.n_image > 0
        self.net = UnifiedPromptNet(width, config.n_heads) if has_prompts else None
        self.visual_proj = nn.Linear(width, backbone.vision_width) if has_prompts else None
        self._on_classes_changed()

    def _on_classes_changed(self) -> None:
        self.class_text = class_prompts(self, self.config.placeholder, self.config.n_text)

    def prompts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(text prompts ``(n_text, d_t)``, visual prompts ``(n_image, d_v)``) from one pass of the tiny net."""
        mixed = self.net(self.shared, mix=self.config.mix_tokens)
        return mixed[: self.config.n_text], self.visual_proj(mixed[self.config.n_text :])

    def text_features(self) -> torch.Tensor:
        if self.config.n_text == 0:
            return self.backbone.encode_class_prompts(self.class_text)
        return self.backbone.encode_class_prompts(self.class_text, DeepPrompts([self.prompts()[0]]))

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.config.n_image == 0:
            return self.backbone.encode_image(pixel_values)
        # Before the patches (after the class token where the family has one), as the reference puts them.
        return self.backbone.encode_image(pixel_values, DeepPrompts([self.prompts()[1]]), position=IMAGE_PROMPTS_FRONT)


register_method(
    "upt", UPT, summary="one tiny network makes both modalities' prompts",
    released=Recipe(source="UPT paper: SGD 0.002, cosine, 1 warm-up epoch, batch 32 (the engine's defaults)"),
)
