"""Methods on fusion detectors (Grounding DINO family): the common base and the baselines SDPT is compared with.

A detection method holds the category prompt (category names as phrases, ``[CLS] cat . dog . [SEP]``) and fills the
detector adapter's sites: learned context at the text encoder's input (``det_coop``), a learned offset on the text
encoder's output features (``det_lang_prompt``, GLIP's language prompt tuning), tokens at the fusion layers'
bi-directional attention (``sdpt_native``, ``det_fusion_prompt``), or the detector's own weights (``det_heads``,
``det_full``, ``det_lora``). Training uses the detector's own losses; see ``tasks/detection.py``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from vlprompt.backbones.base import (
    SITE_DETECTION_TEXT,
    SITE_DETECTION_TEXT_FEATURES,
    SITE_DETECTOR,
    SITE_FUSION,
    FusionTokens,
)
from vlprompt.methods.base import (
    MethodConfig,
    MethodConfigError,
    PromptMethod,
    phrase_embedding,
    require,
    set_lora_dropout_mode,
)
from vlprompt.options import opt
from vlprompt.recipes import Recipe
from vlprompt.methods.registry import register_method
from vlprompt.tasks.batches import DetectionBatch, StepOutput

# What the detector reports of its loss besides the total (logged per epoch, not trained on separately).
LOGGED_LOSS_PARTS = ("loss_ce", "loss_bbox", "loss_giou")

DETECTION_TEMPLATE = "{}"  # a category's phrase is its name


class DetectionMethod(PromptMethod):
    """Base of detection methods: a category prompt over a frozen detector, scored per category.

    ``forward(pixel_values, pixel_mask, labels)`` returns the detector's output (with ``loss`` when labels are
    given); ``predict`` gives per-category scores ``(B, Q, C)`` and normalised ``(cx, cy, w, h)`` boxes.
    Subclasses fill :meth:`context` (text-input tokens) and/or :meth:`fusion_tokens`, or unfreeze detector weights.
    """

    task: ClassVar[str] = "detection"
    backbone_kind: ClassVar[str] = "fusion_detector"
    required_sites = frozenset({SITE_DETECTOR})
    modifies_text = True
    modifies_image = True

    def __init__(self, backbone, config: MethodConfig, classnames, template: str = DETECTION_TEMPLATE) -> None:
        super().__init__(backbone, config, classnames, template)
        self._build_text()

    # ----------------------------------------------------------------- category prompt
    def n_context(self) -> int:
        return 0

    def _build_text(self) -> None:
        self.text = self.backbone.category_prompt(self.classnames, self.template, self.n_context())

    def _on_classes_changed(self) -> None:
        self._build_text()

    # ----------------------------------------------------------------- what subclasses fill
    def context(self) -> torch.Tensor | None:
        """Learned word embeddings ``(n, d_text)`` at the start of every phrase, or None."""
        return None

    def fusion_tokens(self, layer: int) -> FusionTokens | None:
        """Tokens for fusion layer ``layer``'s attention, or None."""
        return None

    def text_feature_offset(self) -> torch.Tensor | None:
        """An offset ``(positions, d_text)`` added per token position to the text encoder's output, or None."""
        return None

    uses_fusion: ClassVar[bool] = False

    # ----------------------------------------------------------------- forward
    def forward(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None = None,
                labels: list[dict[str, torch.Tensor]] | None = None, **kwargs: Any):
        if labels is not None:
            top = max((int(t["class_labels"].max()) for t in labels if len(t["class_labels"])), default=-1)
            if top >= len(self.classnames):
                raise ValueError(
                    f"a target has class label {top} but the prompt has {len(self.classnames)} categories "
                    f"({self.classnames}); labels index the method's category list."
                )
        return self.backbone.detect(
            pixel_values, self.text, pixel_mask=pixel_mask, labels=labels, context=self.context(),
            fusion=self.fusion_tokens if self.uses_fusion else None, text_offset=self.text_feature_offset(),
            **kwargs,
        )

    @torch.no_grad()
    def predict(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None = None):
        """Per-category scores ``(B, Q, C)`` and boxes ``(B, Q, 4)`` (normalised cx, cy, w, h)."""
        out = self(pixel_values, pixel_mask)
        return self.backbone.category_scores(out.logits, self.text), out.pred_boxes.float()

    def training_step(self, batch: DetectionBatch) -> StepOutput:
        out = self(batch.pixel_values, batch.pixel_mask, labels=batch.targets)
        parts = out.loss_dict or {}
        logs = {key: float(parts[key].detach()) for key in LOGGED_LOSS_PARTS if key in parts}
        return StepOutput({"detector": out.loss}, logs=logs)

    # ----------------------------------------------------------------- trainable state
    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.model.eval()  # the detector keeps eval behaviour (no dropout / drop-path) in every method
        set_lora_dropout_mode(self.backbone.model, mode)  # det_lora's own dropout is part of what trains
        return self



# --------------------------------------------------------------------------------------------- zero-shot
@dataclass
class DetZeroShotConfig(MethodConfig):
    pass


class DetZeroShot(DetectionMethod):
    """The frozen detector with the category names as its prompt: nothing trains."""

    name = "det_zeroshot"
    config_class = DetZeroShotConfig
    learns = False


# --------------------------------------------------------------------------------------------- CoOp on the text input
@dataclass
class DetCoOpConfig(MethodConfig):
    method_name = "det_coop"
    n_ctx: int = opt(4, min=0)  # learned tokens before every category name (short: one copy per category)
    init_std: float = opt(0.02, gt=0)
    init_phrase: str | None = None  # e.g. "a photo of a": initialise from its word embeddings (n_ctx = its length)

    def validate(self) -> None:
        require(self.n_ctx >= 1 or self.init_phrase, f"det_coop.n_ctx must be >= 1, got {self.n_ctx}")


class DetCoOp(DetectionMethod):
    """CoOp on the detector's text encoder: ``[CLS] v1..vn cat . v1..vn dog . [SEP]`` with shared learned ``v``.

    The vectors replace the BERT word embeddings of placeholder positions (position and type embeddings still
    apply). Each phrase (context + name) is one label, as the detector's loss reads its prompt.
    """

    name = "det_coop"
    config_class = DetCoOpConfig
    required_sites = frozenset({SITE_DETECTOR, SITE_DETECTION_TEXT})

    def __init__(self, backbone, config: DetCoOpConfig, classnames, template: str = DETECTION_TEMPLATE) -> None:
        if config.init_phrase:
            init = phrase_embedding(backbone, config.init_phrase).float()
        else:
            init = torch.randn(config.n_ctx, backbone.text_width) * config.init_std
        self._n = init.shape[0]
        super().__init__(backbone, config, classnames, template)
        self.ctx = nn.Parameter(init)

    def n_context(self) -> int:
        return self._n

    def context(self) -> torch.Tensor:
        return self.ctx


# --------------------------------------------------------------------------------------------- GLIP's prompt tuning
@dataclass
class DetLangPromptConfig(MethodConfig):
    method_name = "det_lang_prompt"
    # GLIP initialises the offset at zero (the tuned model starts as the zero-shot one); > 0 draws N(0, init_std)
    init_std: float = opt(0.0, min=0)


class DetLangPrompt(DetectionMethod):
    """GLIP's language prompt tuning ("language_prompt_v2"): a learned offset per token position, shape
    ``(max_text_len, d_text)``, zero at the start, added to the text encoder's output features before the fusion
    layers; everything else frozen. Trainable = max_text_len * d_text (the positions a prompt can use)."""

    name = "det_lang_prompt"
    config_class = DetLangPromptConfig
    required_sites = frozenset({SITE_DETECTOR, SITE_DETECTION_TEXT_FEATURES})

    def __init__(self, backbone, config: DetLangPromptConfig, classnames, template: str = DETECTION_TEMPLATE) -> None:
        super().__init__(backbone, config, classnames, template)
        self.offset = nn.Parameter(torch.randn(backbone.max_text_len, backbone.text_width) * config.init_std)

    def text_feature_offset(self) -> torch.Tensor:
        return self.offset


# --------------------------------------------------------------------------------------------- deep fusion prompts
def resolve_layers(layers: Any, backbone, method: str) -> list[int]:
    """``"all"`` or a list of fusion-layer indices, checked against the detector's fusion layer count."""
    n = backbone.fusion_layers
    if layers == "all":
        return list(range(n))
    out = [int(j) for j in layers]
    bad = [j for j in out if not 0 <= j < n]
    require(not bad, f"{method}.layers {bad} out of range: this detector has fusion layers 0..{n - 1}")
    return out


def check_layers_option(layers: Any, method: str) -> None:
    ok = layers == "all" or (
        isinstance(layers, (list, tuple)) and len(layers) > 0 and all(isinstance(j, int) for j in layers)
        and len(set(layers)) == len(layers)
    )
    require(ok, f"{method}.layers must be 'all' or a non-empty list of distinct fusion-layer indices, got {layers!r}")


@dataclass
class DetFusionPromptConfig(MethodConfig):
    method_name = "det_fusion_prompt"
    n_tokens: int = opt(16, min=1)  # per modality and layer (same count as SDPT's default prototypes)
    layers: Literal["all"] | list[int] = "all"  # fusion layers that get tokens
    init_std: float = opt(0.02, gt=0)

    def validate(self) -> None:
        check_layers_option(self.layers, "det_fusion_prompt")


class DetFusionPrompt(DetectionMethod):
    """Deep prompts at the fusion layers with *separate* tokens per modality (SDPT's ablation baseline).

    Per chosen layer: vision tokens ``(K, d_v)`` and text tokens ``(K, d_t)``, appended to that layer's
    bi-directional attention input exactly where SDPT puts its prototypes' pre-images, but learned independently.
    Trainable = layers * K * (d_v + d_t).
    """

    name = "det_fusion_prompt"
    config_class = DetFusionPromptConfig
    required_sites = frozenset({SITE_DETECTOR, SITE_FUSION})
    uses_fusion = True

    def __init__(self, backbone, config: DetFusionPromptConfig, classnames, template: str = DETECTION_TEMPLATE) -> None:
        super().__init__(backbone, config, classnames, template)
        self.layers = resolve_layers(config.layers, backbone, self.name)
        site = backbone.fusion_site(0)
        k = config.n_tokens
        self.vision_tokens = nn.Parameter(torch.randn(len(self.layers), k, site.vision_dim) * config.init_std)
        self.text_tokens = nn.Parameter(torch.randn(len(self.layers), k, site.text_dim) * config.init_std)
        self._slot = {layer: i for i, layer in enumerate(self.layers)}

    def fusion_tokens(self, layer: int) -> FusionTokens | None:
        i = self._slot.get(layer)
        if i is None:
            return None
        return FusionTokens(vision=self.vision_tokens[i], text=self.text_tokens[i])


# --------------------------------------------------------------------------------------------- detector weights
@dataclass
class DetHeadsConfig(MethodConfig):
    pass


class DetHeads(DetectionMethod):
    """Head-only tuning: the decoder's box and class heads and the two-stage proposal heads train."""

    name = "det_heads"
    config_class = DetHeadsConfig

    def __init__(self, backbone, config: DetHeadsConfig, classnames, template: str = DETECTION_TEMPLATE) -> None:
        super().__init__(backbone, config, classnames, template)
        self._train_weights(backbone.named_weights("heads"))


@dataclass
class DetFullConfig(MethodConfig):
    pass


class DetFull(DetectionMethod):
    """Full fine-tuning (reference point): every detector weight trains; the checkpoint holds them all."""

    name = "det_full"
    config_class = DetFullConfig

    def __init__(self, backbone, config: DetFullConfig, classnames, template: str = DETECTION_TEMPLATE) -> None:
        super().__init__(backbone, config, classnames, template)
        self._train_weights(backbone.named_weights("all"))


@dataclass
class DetLoRAConfig(MethodConfig):
    method_name = "det_lora"
    r: int = opt(8, min=1)
    alpha: float = opt(16.0, gt=0)
    dropout: float = opt(0.0, min=0)
    target_modules: str | None = None  # regex over module names; None: the encoder/decoder attention projections

    def validate(self) -> None:
        require(self.dropout < 1, "det_lora.dropout must be in [0, 1)")
        if self.target_modules is not None:
            try:
                re.compile(self.target_modules)
            except re.error as err:
                raise MethodConfigError(f"det_lora.target_modules {self.target_modules!r} is not a valid regular "
                                        f"expression ({err}); it is matched against the detector's module names, e.g. "
                                        r"'model\.decoder\.layers\.\d+\.self_attn\.(query|value)'") from None


class DetLoRA(DetectionMethod):
    """LoRA (through ``peft``) on the detector's attention projections (reference point)."""

    name = "det_lora"
    config_class = DetLoRAConfig

    def __init__(self, backbone, config: DetLoRAConfig, classnames, template: str = DETECTION_TEMPLATE) -> None:
        super().__init__(backbone, config, classnames, template)
        self._train_weights(backbone.add_lora(config.r, config.alpha, config.dropout, config.target_modules))


register_method("det_zeroshot", DetZeroShot, summary="frozen detector, category names as the prompt")
register_method("det_coop", DetCoOp, summary="learned context before every category name at the text encoder input")
register_method(
    "det_lang_prompt", DetLangPrompt, aliases=("language_prompt_v2",),
    summary="GLIP's language prompt tuning: a zero-initialised offset per token on the text features",
    released=Recipe(train={"lr": 0.05, "weight_decay": 0.25},
                    source="GLIP (language_prompt_v2): lr 0.05 and weight decay 0.25 recommended for prompt tuning"),
)
register_method("det_fusion_prompt", DetFusionPrompt,
                summary="separate vision / text deep prompts at the fusion layers")
register_method("det_heads", DetHeads, summary="detection heads only")
register_method("det_full", DetFull, summary="full fine-tuning (reference point)")
register_method("det_lora", DetLoRA, summary="LoRA via peft on encoder/decoder attention (reference point)")
