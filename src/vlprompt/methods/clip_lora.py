"""CLIP-LoRA (Zanella and Ben Ayed, CVPR 2024 workshops; released code github.com/MaxZanella/CLIP-LoRA).

LoRA adapters on the query, key and value projections of every encoder layer of both towers: each projection
``W x`` becomes ``W x + (alpha / r) B A dropout(x)``, with ``A`` (r, d_in) random and ``B`` (d_out, r) zero at the
start, so the model equals the frozen one until it trains. Rank 2, alpha 1, dropout 0.25; class features from the
dataset's template ("a photo of a {}." in the release), trained with the family's classification loss. The adapters
come from ``peft`` through the backbone's ``tower_weights`` site; the model's own layers run them (nothing vendored).

Trainable parameters: for every adapted projection of width d, ``r * (d_in + d_out)`` = ``2 r d``; on CLIP ViT-B/16
(text width 512, image width 768, 12 layers each, q/k/v) that is 12 * 3 * 2 * 2 * (512 + 768) = 184,320.

Differences from the released code: the release trains 500 x shots iterations of batch 32 with a per-iteration
cosine schedule down to 1e-6 (16,000 / C epochs for C classes); vlprompt schedules by epochs (the ``field`` recipe
sets ImageNet's 16 epochs: pass ``--epochs`` = 16000 / C for another dataset). Its fp16 autocast is
``--precision fp16`` here (on a GPU).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from vlprompt.backbones.base import SITE_TOWER_WEIGHTS
from vlprompt.methods.base import ClassificationMethod, MethodConfig, require, set_lora_dropout_mode
from vlprompt.methods.registry import register_method
from vlprompt.options import opt
from vlprompt.recipes import Recipe

PROJECTIONS = ("q", "k", "v", "o")
TOWERS = {"both": ("text", "image"), "text": ("text",), "image": ("image",)}


@dataclass
class ClipLoRAConfig(MethodConfig):
    method_name = "clip_lora"
    r: int = opt(2, min=1, help="rank of each adapter")
    alpha: float = opt(1.0, gt=0, help="LoRA alpha: the adapters' output is scaled by alpha / r")
    dropout: float = opt(0.25, min=0, help="dropout on the adapters' input")
    towers: Literal["both", "text", "image"] = "both"
    # Roles of the attention projections adapted in every layer: q, k, v, o (the output projection).
    projections: list[str] = field(default_factory=lambda: ["q", "k", "v"])

    def validate(self) -> None:
        require(self.dropout < 1, f"clip_lora.dropout must be in [0, 1), got {self.dropout}")
        unknown = [p for p in self.projections if p not in PROJECTIONS]
        require(bool(self.projections) and not unknown and len(set(self.projections)) == len(self.projections),
                f"clip_lora.projections must be distinct names from {list(PROJECTIONS)}, got {self.projections}")


class ClipLoRA(ClassificationMethod):
    name = "clip_lora"
    config_class = ClipLoRAConfig
    required_sites = frozenset({SITE_TOWER_WEIGHTS})
    modifies_text = True
    modifies_image = True

    def __init__(self, backbone, config: ClipLoRAConfig, classnames, template="a photo of a {}.") -> None:
        super().__init__(backbone, config, classnames, template)
        weights = backbone.add_lora(config.r, config.alpha, config.dropout, TOWERS[config.towers],
                                    config.projections)  # fmt: skip
        self._train_weights(weights)

    @property
    def cacheable_towers(self) -> frozenset[str]:
        """The tower left without adapters (``towers`` text or image) keeps its features for the whole run."""
        return frozenset({"text", "image"} - set(TOWERS[self.config.towers]))

    def train(self, mode: bool = True):
        super().train(mode)
        set_lora_dropout_mode(self.backbone.model, mode)
        return self


register_method(
    "clip_lora", ClipLoRA, summary="LoRA (peft) on q/k/v of both towers, rank 2",
    aliases=("clip-lora",),
    released=Recipe(train={"optimizer": "adamw", "lr": 2e-4, "weight_decay": 0.01, "batch_size": 32, "epochs": 16,
                           "warmup_epochs": 0},
                    source="CLIP-LoRA (2024) main.py/lora.py: AdamW lr 2e-4, weight decay 0.01, cosine to 1e-6, "
                           "batch 32, 500 x shots iterations (16 epochs on ImageNet's 1,000 classes), rank 2, "
                           "alpha 1, dropout 0.25, q/k/v of both towers"),
)
