"""Zero-shot CLIP: hand-written templates (optionally an ensemble), no training."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from vlprompt.backbones.base import SITE_JOINT_SPACE
from vlprompt.methods.base import ClassificationMethod, MethodConfig, require
from vlprompt.methods.registry import register_method

# CLIP's 7-template ensemble used by CoOp-family code bases for ImageNet-like data.
ENSEMBLE_TEMPLATES = [
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
]


@dataclass
class ZeroShotConfig(MethodConfig):
    method_name = "zeroshot"
    # Empty: the dataset's own template. "ensemble": the dataset template plus CLIP's 7 templates. Otherwise a
    # list of templates with one "{}" each; features are the mean of the normalised per-template features.
    templates: list[str] | str = field(default_factory=list)

    def validate(self) -> None:
        if isinstance(self.templates, str):
            require(self.templates == "ensemble", "zeroshot.templates must be a list of templates or 'ensemble'")
            return
        for t in self.templates:
            require("{}" in t, f"template {t!r} has no '{{}}' placeholder for the class name")


class ZeroShot(ClassificationMethod):
    name = "zeroshot"
    config_class = ZeroShotConfig
    required_sites = frozenset({SITE_JOINT_SPACE})  # image (and text) features in a shared embedding space
    learns = False

    def _templates(self) -> list[str]:
        if self.config.templates == "ensemble":
            return [self.template] + ENSEMBLE_TEMPLATES
        return list(self.config.templates) or [self.template]

    def text_features(self) -> torch.Tensor:
        templates = self._templates()
        if len(templates) == 1:
            return self.backbone.encode_texts([templates[0].format(c) for c in self.classnames])
        per_template = [
            F.normalize(self.backbone.encode_texts([t.format(c) for c in self.classnames]), dim=-1)
            for t in templates
        ]
        return torch.stack(per_template).mean(0)


register_method("zeroshot", ZeroShot, summary="hand-written template(s), no training",
                aliases=("zero_shot", "zero-shot"))
