"""CLIP-Adapter (Gao et al., IJCV 2024; released code github.com/gaopengcuhk/CLIP-Adapter): a residual bottleneck
on the image feature in the joint space,

    A(f) = ReLU(W2 ReLU(W1 f)),  W1 (d/r, d), W2 (d, d/r), no biases;   f' = ratio * A(f) + (1 - ratio) * f,

scored against frozen class features of the dataset's template by the backbone's own scoring, trained with the
family's loss (CLIP: cross-entropy). The adapter sees image features only, so a trained adapter scores any class
names (unlike the linear probe's head).

Both towers stay frozen: ``image_features`` is the frozen image tower and the adapter is applied in ``logits``, so
the task computes the class features once per run (and once per evaluation pass) and, with augmentation off, the
training images' features once, as for zero-shot; only the adapter runs per step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vlprompt.backbones.base import SITE_JOINT_SPACE
from vlprompt.methods.base import ClassificationMethod, MethodConfig, require
from vlprompt.methods.registry import register_method
from vlprompt.options import opt


@dataclass
class ClipAdapterConfig(MethodConfig):
    method_name = "clip_adapter"
    reduction: int = opt(4, min=1)  # bottleneck width d / reduction
    ratio: float = opt(0.2, min=0, max=1)  # residual ratio: the adapter's share of the final image feature


class ClipAdapter(ClassificationMethod):
    name = "clip_adapter"
    config_class = ClipAdapterConfig
    required_sites = frozenset({SITE_JOINT_SPACE})  # image and class features in one space, scored by the family

    def __init__(self, backbone, config: ClipAdapterConfig, classnames, template="a photo of a {}.") -> None:
        super().__init__(backbone, config, classnames, template)
        d = backbone.embed_dim
        hidden = d // config.reduction
        require(hidden >= 1, f"clip_adapter.reduction={config.reduction} leaves no bottleneck unit of the "
                             f"{d}-dim joint space; use at most {d}")  # fmt: skip
        # nn.Linear's own initialisation, as released; drawn on the CPU so a seed gives the same adapter on any
        # device, and kept fp32 whatever the backbone's dtype
        self.down = nn.Linear(d, hidden, bias=False).to(backbone.device)
        self.up = nn.Linear(hidden, d, bias=False).to(backbone.device)

    # text_features: the base's (the dataset's template on the frozen text tower). The text tower is declared
    # untouched, so the task computes them once per run and once per evaluation pass, as for zero-shot: no copy is
    # kept here.

    def adapt(self, image_feats: torch.Tensor) -> torch.Tensor:
        """``ratio * A(f) + (1 - ratio) * f`` of frozen image features ``(B, d)``."""
        f = image_feats.to(self.down.weight.dtype)  # a half-precision backbone's features meet the fp32 adapter
        residual = F.relu(self.up(F.relu(self.down(f))))
        ratio = self.config.ratio
        return ratio * residual + (1.0 - ratio) * f

    def logits(self, image_feats: torch.Tensor, text_feats: torch.Tensor) -> torch.Tensor:
        return self.backbone.score(self.adapt(image_feats), text_feats)


register_method(
    "clip_adapter", ClipAdapter, summary="residual bottleneck adapter on the image feature (ratio 0.2)",
    aliases=("clip-adapter",),
    # The repository holds only clip_adapter.py and a README that defers to CoOp's commands: no stated learning
    # rate, epochs or batch size, so the engine's defaults (CoOp's) apply.
    released=None,
)
