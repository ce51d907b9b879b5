"""CoOp: learnable context vectors in the text token-embedding space, ``[SOS][v1..vM][CLASS][.][EOS]``."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vlprompt.backbones.base import SITE_TEXT_SEQUENCE, DeepPrompts
from vlprompt.methods.base import (
    ClassTextPrompts,
    MethodConfig,
    PromptMethod,
    phrase_embedding,
    require,
    subset_rows,
)

CLASS_POSITIONS = ("end", "middle", "front")


@dataclass
class CoOpConfig(MethodConfig):
    n_ctx: int = 16
    init: str | None = None  # a phrase such as "a photo of a" (fixes n_ctx to its token count), or None: N(0, std)
    init_std: float = 0.02
    class_specific: bool = False  # one context per class instead of one shared context
    class_position: str = "end"

    def validate(self) -> None:
        require(self.n_ctx >= 0, f"coop.n_ctx must be >= 0, got {self.n_ctx}")
        require(self.class_position in CLASS_POSITIONS, f"coop.class_position must be one of {CLASS_POSITIONS}")
        require(self.init_std > 0, "coop.init_std must be > 0")
        require(
            self.init is None or (isinstance(self.init, str) and self.init.strip() != ""),
            f"coop.init must be a non-empty phrase such as 'a photo of a', or null for random init (got {self.init!r})",
        )


class CoOp(PromptMethod):
    name = "coop"
    config_class = CoOpConfig
    required_sites = frozenset({SITE_TEXT_SEQUENCE})
    modifies_text = True

    @classmethod
    def tied_to_classes(cls, config: CoOpConfig) -> bool:
        return bool(config.class_specific)

    def __init__(self, backbone, config: CoOpConfig, classnames, template="a photo of a {}.") -> None:
        super().__init__(backbone, config, classnames, template)
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
        self.class_text = ClassTextPrompts(self.backbone, self.classnames)
        if self.config.class_position != "end":
            names = self.backbone.tokenize(self.classnames)
            self.name_lengths = (names.eot_index - 1).tolist()

    def context(self) -> torch.Tensor:
        """The learned context: ``(M, d)`` shared, or ``(C, M, d)`` for the classes being scored."""
        return self.ctx if self.class_rows is None else self.ctx[self.class_rows]

    def text_features(self) -> torch.Tensor:
        if self.config.n_ctx == 0:
            return self.class_text.features(self.backbone, None)
        if self.config.class_position == "end":
            return self.class_text.features(self.backbone, DeepPrompts([self.context()]))
        embeds, eot = self._arranged_sequences()
        return self.backbone.encode_text(embeds, eot)

    def _arranged_sequences(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``[SOS][CLASS][ctx][.][EOS]`` (front) or ``[SOS][ctx/2][CLASS][ctx/2][.][EOS]`` (middle)."""
        tok = self.class_text.tokenized
        word = self.backbone.embed_tokens(tok.input_ids)
        n_classes = word.shape[0]
        ctx = self.context().to(word.dtype)  # the word embeddings' dtype: half-precision weights take fp32 prompts
        ctx = ctx if ctx.dim() == 3 else ctx.unsqueeze(0).expand(n_classes, -1, -1)
        half = self.config.n_ctx // 2
        rows = []
        for i, length in enumerate(self.name_lengths):
            sos, name, rest = word[i, :1], word[i, 1 : 1 + length], word[i, 1 + length :]
            if self.config.class_position == "front":
                rows.append(torch.cat([sos, name, ctx[i], rest]))
            else:
                rows.append(torch.cat([sos, ctx[i, :half], name, ctx[i, half:], rest]))
        return torch.stack(rows), tok.eot_index + self.config.n_ctx
