"""KgCoOp: Knowledge-guided Context Optimization (Yao et al., CVPR 2023; released code github.com/htyao89/KgCoOp).

CoOp's learned context (here 4 tokens initialised from "a photo of a") trained with an extra term that keeps the
learned class text features close to the frozen model's hand-crafted ones:

    loss = main + weight * (1 - mean over classes of cos(learned_c, hand_crafted_c))

The paper writes the term as the squared Euclidean distance between the L2-normalised features, which is twice
``1 - cos``; the released code (and this module) uses ``1 - cos`` with ``weight`` (the released ``W``) = 8.0.
The hand-crafted features come from the dataset's template and the frozen backbone, computed once per class set.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vlprompt.methods.base import require
from vlprompt.methods.coop import CoOp, CoOpConfig
from vlprompt.methods.registry import register_method
from vlprompt.options import opt
from vlprompt.recipes import Recipe
from vlprompt.tasks.batches import ClassificationBatch, StepOutput


@dataclass
class KgCoOpConfig(CoOpConfig):
    method_name = "kgcoop"
    n_ctx: int = opt(4, min=0)  # set by ``init`` when one is given: "a photo of a" is 4 tokens
    init: str | None = "a photo of a"  # the released context init (CTX_INIT: True)
    # lambda of the paper, W of the released scripts: the weight of 1 - mean cosine to the hand-crafted features
    weight: float = opt(8.0, min=0)

    def validate(self) -> None:
        # CoOp's own check names its option "coop.init"; this config's messages name "kgcoop.*"
        require(
            self.init is None or (isinstance(self.init, str) and self.init.strip() != ""),
            f"kgcoop.init must be a non-empty phrase such as 'a photo of a', or null for random init "
            f"(got {self.init!r})",
        )
        require(math.isfinite(self.weight), f"kgcoop.weight must be a finite number, got {self.weight!r}")


class KgCoOp(CoOp):
    name = "kgcoop"
    config_class = KgCoOpConfig

    def _on_classes_changed(self) -> None:
        super()._on_classes_changed()
        # The regulariser's target: the frozen model's features of the dataset's template, fixed for a class set.
        with torch.no_grad():
            hand_crafted = self.backbone.encode_texts([self.template.format(c) for c in self.classnames])
        self.register_buffer("hand_crafted", F.normalize(hand_crafted.float(), dim=-1), persistent=False)

    def knowledge_loss(self, text_feats: torch.Tensor) -> torch.Tensor:
        """``1 - mean_c cos(text_feats_c, hand_crafted_c)`` (unweighted) of learned class features ``(C, d)``."""
        learned = F.normalize(text_feats.float(), dim=-1)
        return 1.0 - (learned * self.hand_crafted).sum(-1).mean()

    def training_step(self, batch: ClassificationBatch) -> StepOutput:
        # One text pass serves both the logits and the regulariser (the text tower is never cached: CoOp changes it).
        text_feats = self.text_features()
        logits = self(pixel_values=batch.pixel_values, image_feats=batch.image_feats, text_feats=text_feats)
        terms = {"main": self.loss(logits, batch.labels), "kg": self.config.weight * self.knowledge_loss(text_feats)}
        return StepOutput(terms, logits=logits)


register_method(
    "kgcoop", KgCoOp, summary="CoOp kept close to the hand-crafted class features (4 tokens, lambda 8)",
    aliases=("kg-coop", "kg_coop"),
    released=Recipe(train={"epochs": 100, "batch_size": 128},
                    source="KgCoOp (CVPR 2023) configs/trainers/KgCoOp/vit_b16_ep100_ctxv1.yaml and "
                           "scripts/base2new_train.sh: SGD 0.002, cosine, 100 epochs, batch 128, 1 constant warm-up "
                           "epoch at 1e-5, 4 context tokens from 'a photo of a', W 8.0"),
)
