"""PromptSRC: self-regulating prompts (Khattak et al., ICCV 2023; released code github.com/muzairkhattak/PromptSRC).

IVLP-style deep prompts in both towers (4 text + 4 image tokens at layers 0..8, the text ones starting from the
words "a photo of a"), trained with three regularisers that keep the prompted model close to the frozen one:

    loss = CE
         + text_weight  * mean |normalise(prompted text features) - normalise(frozen ensemble text features)|
         + image_weight * mean |normalise(prompted image features) - normalise(frozen image features)|
         + KL(frozen logits || prompted logits), summed and divided by the number of logits

The frozen text features are the frozen model's features averaged over a template ensemble (the 60 ImageNet
templates of CLIP's prompt-engineering notebook, as released: "textual diversity"); the frozen logits score the
frozen image features against them. After each epoch e = 1..N the prompts are added to a running aggregate with
weight g(e) = N(e; gpa_mean, gpa_std) normalised over the N epochs (Gaussian prompt aggregation); when training
ends the aggregate becomes the prompt.

Choices, stated:
- The aggregate is a running weighted mean kept in log space, so it equals the normalised sum exactly whatever
  the weights' scale (g(1) for mean 15 and std 1 is about 1e-43). It is saved with every epoch's resume state.
- The KL term uses the softmax of the family's logits on every backbone (SigLIP's sigmoid logits included: its
  bias cancels in a softmax), as the released code does for CLIP.
- The released base-to-novel settings (20 epochs, gpa_mean 15, gpa_std 1) are the defaults; its few-shot configs
  train 50 epochs with gpa_mean 30 and gpa_std 30 (or 45 and 5 for five datasets): set them with ``--set``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from vlprompt.methods.base import require
from vlprompt.methods.ivlp import IVLP, IVLPConfig
from vlprompt.methods.registry import register_method
from vlprompt.options import opt
from vlprompt.recipes import Recipe
from vlprompt.tasks.batches import ClassificationBatch, StepOutput

# The 60 ImageNet templates of CLIP's prompt-engineering notebook that PromptSRC's release averages over.
IMAGENET_TEMPLATES_60 = (
    "a photo of a {}.", "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.",
    "a photo of the hard to see {}.", "a low resolution photo of the {}.", "a rendering of a {}.", "graffiti of a {}.",
    "a bad photo of the {}.", "a cropped photo of the {}.", "a tattoo of a {}.", "the embroidered {}.",
    "a photo of a hard to see {}.", "a bright photo of a {}.", "a photo of a clean {}.", "a photo of a dirty {}.",
    "a dark photo of the {}.", "a drawing of a {}.", "a photo of my {}.", "the plastic {}.",
    "a photo of the cool {}.", "a close-up photo of a {}.", "a black and white photo of the {}.",
    "a painting of the {}.", "a painting of a {}.", "a pixelated photo of the {}.", "a sculpture of the {}.",
    "a bright photo of the {}.", "a cropped photo of a {}.", "a plastic {}.", "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.", "a blurry photo of the {}.", "a photo of the {}.", "a good photo of the {}.",
    "a rendering of the {}.", "a {} in a video game.", "a photo of one {}.", "a doodle of a {}.",
    "a close-up photo of the {}.", "the origami {}.", "the {} in a video game.", "a sketch of a {}.",
    "a doodle of the {}.", "a origami {}.", "a low resolution photo of a {}.", "the toy {}.",
    "a rendition of the {}.", "a photo of the clean {}.", "a photo of a large {}.", "a rendition of a {}.",
    "a photo of a nice {}.", "a photo of a weird {}.", "a blurry photo of a {}.", "a cartoon {}.", "art of a {}.",
    "a sketch of the {}.", "a embroidered {}.", "a pixelated photo of a {}.", "itap of the {}.",
)
ENSEMBLES = {"imagenet60": IMAGENET_TEMPLATES_60}


@dataclass
class PromptSRCConfig(IVLPConfig):
    method_name = "promptsrc"
    n_text: int = opt(4, min=0)
    n_image: int = opt(4, min=0)
    text_depth: int | Literal["all"] = opt(9, min=1, tower="text")
    image_depth: int | Literal["all"] = opt(9, min=1, tower="image")
    text_weight: float = opt(25.0, min=0, help="weight of the L1 distance to the frozen ensemble text features")
    image_weight: float = opt(10.0, min=0, help="weight of the L1 distance to the frozen image features")
    logit_weight: float = opt(1.0, min=0, help="weight of KL(frozen logits || prompted logits)")
    # "imagenet60" (the release's ensemble), or a list of templates with one "{}" each.
    text_templates: list[str] | str = field(default="imagenet60")
    gpa_mean: float = opt(15.0, help="epoch (1-based) at the centre of the Gaussian prompt aggregation")
    gpa_std: float = opt(1.0, gt=0, help="spread, in epochs, of the Gaussian prompt aggregation")

    def validate(self) -> None:
        require(math.isfinite(self.gpa_mean), f"promptsrc.gpa_mean must be a finite number, got {self.gpa_mean!r}")
        if isinstance(self.text_templates, str):
            require(self.text_templates in ENSEMBLES, f"promptsrc.text_templates must be a list of templates or one "
                                                      f"of {sorted(ENSEMBLES)}, got {self.text_templates!r}")
            return
        require(len(self.text_templates) > 0, "promptsrc.text_templates needs at least one template")
        for template in self.text_templates:
            require(isinstance(template, str) and template.count("{}") == 1 and _formats(template),
                    f"promptsrc.text_templates: {template!r} needs exactly one '{{}}' where the class name goes "
                    "and no other braces")


def _formats(template: str) -> bool:
    try:
        template.format("x")
    except (IndexError, KeyError, ValueError):
        return False
    return True


def gaussian_log_weight(epoch: int, mean: float, std: float) -> float:
    """log N(epoch; mean, std): the log of an epoch's unnormalised aggregation weight."""
    return -0.5 * ((epoch - mean) / std) ** 2 - math.log(std * math.sqrt(2 * math.pi))


class PromptSRC(IVLP):
    name = "promptsrc"
    config_class = PromptSRCConfig

    def __init__(self, backbone, config: PromptSRCConfig, classnames, template="a photo of a {}.") -> None:
        super().__init__(backbone, config, classnames, template)
        self._frozen_key: tuple | None = None
        self._frozen_text: torch.Tensor | None = None
        self.reset_aggregate()

    # ----------------------------------------------------------------- the frozen model's targets
    def templates(self) -> tuple[str, ...]:
        chosen = self.config.text_templates
        return ENSEMBLES[chosen] if isinstance(chosen, str) else tuple(chosen)

    @torch.no_grad()
    def frozen_text_features(self) -> torch.Tensor:
        """Normalised mean over the template ensemble of the frozen model's class features ``(C, d)``, computed
        once per class set (lazily: evaluation on other classes never needs them)."""
        key = (tuple(self.classnames), self.templates(), str(self.backbone.device))
        if self._frozen_key != key or self._frozen_text is None:
            per_template = [self.backbone.encode_texts([t.format(c) for c in self.classnames]).float()
                            for t in self.templates()]  # fmt: skip
            self._frozen_text = F.normalize(torch.stack(per_template).mean(0), dim=-1)
            self._frozen_key = key
        return self._frozen_text

    def regularisers(self, text_feats: torch.Tensor, image_feats: torch.Tensor, logits: torch.Tensor,
                     pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:  # fmt: skip
        """The three unweighted self-regularising terms of a batch (names: text_l1, image_l1, logits_kl)."""
        frozen_text = self.frozen_text_features()
        with torch.no_grad():
            frozen_image = self.backbone.encode_image(pixel_values).float()
            frozen_logits = self.backbone.score(frozen_image, frozen_text.to(frozen_image.dtype)).float()
        text_l1 = F.l1_loss(F.normalize(text_feats.float(), dim=-1), frozen_text)
        image_l1 = F.l1_loss(F.normalize(image_feats.float(), dim=-1), F.normalize(frozen_image, dim=-1))
        kl = F.kl_div(F.log_softmax(logits.float(), dim=-1), F.log_softmax(frozen_logits, dim=-1), reduction="sum",
                      log_target=True) / logits.numel()  # fmt: skip
        return {"text_l1": text_l1, "image_l1": image_l1, "logits_kl": kl}

    def training_step(self, batch: ClassificationBatch) -> StepOutput:
        text_feats = self.text_features()
        image_feats = self.image_features(batch.pixel_values)
        logits = self.logits(image_feats, text_feats)
        terms = self.regularisers(text_feats, image_feats, logits, batch.pixel_values)
        cfg = self.config
        weights = {"text_l1": cfg.text_weight, "image_l1": cfg.image_weight, "logits_kl": cfg.logit_weight}
        return StepOutput({"main": self.loss(logits, batch.labels),
                           **{name: weights[name] * value for name, value in terms.items()}}, logits=logits)  # fmt: skip

    # ----------------------------------------------------------------- Gaussian prompt aggregation
    def reset_aggregate(self) -> None:
        self._aggregate = {n: torch.zeros_like(p.detach()) for n, p in self.prompt_parameters().items()}
        self._log_total = -math.inf  # log of the weights added so far

    @torch.no_grad()
    def on_epoch_end(self, epoch: int) -> None:
        """Add the prompts after ``epoch`` (0-indexed) with weight g(epoch + 1) to the running weighted mean."""
        log_weight = gaussian_log_weight(epoch + 1, self.config.gpa_mean, self.config.gpa_std)
        log_total = float(torch.logaddexp(torch.tensor(self._log_total, dtype=torch.float64),
                                          torch.tensor(log_weight, dtype=torch.float64)))  # fmt: skip
        share = math.exp(log_weight - log_total)  # this epoch's share of the weights so far
        for n, p in self.prompt_parameters().items():
            mean = self._aggregate[n].to(p.device, torch.float32)
            self._aggregate[n] = mean + share * (p.detach().float() - mean)
        self._log_total = log_total

    def aggregated_prompts(self) -> dict[str, torch.Tensor]:
        """The Gaussian-weighted mean of the prompts at the epochs seen so far (empty before the first)."""
        if self._log_total == -math.inf:
            return {}
        return {n: t.clone() for n, t in self._aggregate.items()}

    @torch.no_grad()
    def on_train_end(self) -> None:
        aggregate = self.aggregated_prompts()
        for n, p in self.prompt_parameters().items():
            if n in aggregate:
                p.copy_(aggregate[n].to(p.device, p.dtype))

    def training_state(self) -> dict[str, torch.Tensor]:
        return {**{f"gpa.{n}": t for n, t in self._aggregate.items()},
                "gpa.log_total": torch.tensor(self._log_total, dtype=torch.float64)}  # fmt: skip

    def load_training_state(self, state: dict[str, torch.Tensor]) -> None:
        if not state:
            self.reset_aggregate()
            return
        own = self.prompt_parameters()
        self._aggregate = {n: state[f"gpa.{n}"].to(p.device, torch.float32).clone() for n, p in own.items()}
        self._log_total = float(state["gpa.log_total"])


register_method(
    "promptsrc", PromptSRC, summary="IVLP prompts regularised toward the frozen model, Gaussian-aggregated",
    aliases=("prompt_src", "prompt-src"),
    released=Recipe(train={"epochs": 20, "batch_size": 4, "lr": 0.0025},
                    source="PromptSRC (ICCV 2023) configs/trainers/PromptSRC/vit_b16_c2_ep20_batch4_4+4ctx.yaml: SGD "
                           "0.0025, cosine, 20 epochs, batch 4, 1 constant warm-up epoch at 1e-5; 4+4 tokens at depth "
                           "9; weights 25 / 10; GPA mean 15, std 1 (few-shot: 50 epochs, GPA 30 / 30)"),
)
