"""CoOp: learnable context vectors in the text token-embedding space, ``[SOS][v1..vM][CLASS][.][EOS]``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from vlprompt.backbones.base import SITE_TEXT_SEQUENCE, DeepPrompts
from vlprompt.methods.base import (
    ClassificationMethod,
    MethodConfig,
    class_prompts,
    phrase_embedding,
    require,
    subset_rows,
)
from vlprompt.options import opt
from vlprompt.methods.registry import register_method
from vlprompt.recipes import Recipe


@dataclass
class CoOpConfig(MethodConfig):
    method_name = "coop"
    n_ctx: int = opt(16, min=0)
    init: str | None = None  # a phrase such as "a photo of a" (fixes n_ctx to its token count), or None: N(0, std)
    init_std: float = opt(0.02, gt=0)
    class_specific: bool = False  # one context per class instead of one shared context
    class_position: Literal["end", "middle", "front"] = "end"

    def validate(self) -> None:
        require(
            self.init is None or (isinstance(self.init, str) and self.init.strip() != ""),
            f"coop.init must be a non-empty phrase such as 'a photo of a', or null for random init (got {self.init!r})",
        )


class CoOp(ClassificationMethod):
    name = "coop"
    config_class = CoOpConfig
    required_sites = frozenset({SITE_TEXT_SEQUENCE})
    modifies_text = True

    @classmethod
    def tied_to_classes(cls, config: CoOpConfig) -> bool:
        return bool(config.class_specific)

    def __init__(self, backbone, config: CoOpConfig, classnames, template="a photo of a {}.") -> None:
        super().__init__(backbone, config, classnames, template)
        require(config.class_position in backbone.info.class_positions,
                f"coop.class_position={config.class_position!r} is not offered by the {backbone.family} backbone "
                f"(it offers {backbone.info.class_positions})")  # fmt: skip
        self.trained_classnames = list(self.classnames)
        if config.init:
            ctx = phrase_embedding(backbone, config.init).float()  # prompts train in fp32 whatever the weights' dtype
            config.n_ctx = ctx.shape[0]
            if config.class_specific:
                ctx = ctx.unsqueeze(0).repeat(len(self.classnames), 1, 1)
        elif config.class_specific:  # each class its own draw, as the released CoOp
            ctx = torch.randn(len(self.classnames), config.n_ctx, backbone.text_width) * config.init_std
        else:
            ctx = torch.randn(config.n_ctx, backbone.text_width) * config.init_std
        self.ctx = nn.Parameter(ctx)
        self._on_classes_changed()

    def _on_classes_changed(self) -> None:
        # Class-specific contexts belong to their classes: a subset of them can be scored (ImageNet-A/R), others not.
        self.class_rows = (subset_rows(self.trained_classnames, self.classnames, "class-specific CoOp (use "
                                       "class_specific=false for transfer)") if self.config.class_specific else None)
        self.class_text = class_prompts(self)

    def context(self) -> torch.Tensor:
        """The learned context: ``(M, d)`` shared, or ``(C, M, d)`` for the classes being scored."""
        return self.ctx if self.class_rows is None else self.ctx[self.class_rows]

    def text_features(self) -> torch.Tensor:
        if self.config.n_ctx == 0:
            return self.backbone.encode_class_prompts(self.class_text)
        return self.backbone.encode_class_prompts(self.class_text, DeepPrompts([self.context()]),
                                                  class_position=self.config.class_position)  # fmt: skip


register_method(
    "coop", CoOp, summary="learned text context (16 tokens)",
    released=Recipe(epochs_by_shots={1: 50, 2: 100, 4: 100, 8: 200, 16: 200},
                    source="CoOp (IJCV 2022) scripts: SGD 0.002, batch 32; 50 / 100 / 200 epochs for 1 / 2-4 / 8-16 "
                           "shots (ImageNet: 50)"),
)
