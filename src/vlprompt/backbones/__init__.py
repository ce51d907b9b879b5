"""Backbone adapters, one per model family, and the factory that picks one for a checkpoint."""
from __future__ import annotations

from pathlib import Path

from vlprompt.backbones.base import (
    BACKBONES,
    SITE_LINEAR_PROJECTIONS,
    BackboneLoadError,
    Backbone,
    ClassPrompts,
    DualEncoderBackbone,
    FamilyInfo,
    FusionDetectorBackbone,
    register_backbone,
    SITE_BLOCK,
    SITE_DETECTION_TEXT,
    SITE_DETECTOR,
    SITE_FUSION,
    SITE_IMAGE_SEQUENCE,
    SITE_JOINT_SPACE,
    SITE_TEXT_SEQUENCE,
    SITE_TRANSIENT_IMAGE,
    BlockAdapter,
    DeepPrompts,
    FusionTokens,
    TransientPrompts,
    TokenizedText,
    UnsupportedBackboneError,
)
# Each adapter module registers its model types where it is defined (register_backbone).
from vlprompt.backbones.clip import CLIPBackbone
from vlprompt.backbones.grounding_dino import GroundingDinoBackbone

RANDOM_PREFIX = "random:"


def load_backbone(name_or_path: str | Path) -> Backbone:
    """Load a backbone from a local folder or hub id, or ``random:<preset>`` (a real architecture, random weights).

    Raises :class:`BackboneLoadError` naming what is wrong (missing folder, unsupported model family).
    """
    spec = str(name_or_path)
    if spec.startswith(RANDOM_PREFIX):
        from vlprompt.backbones.grounding_dino_presets import GDINO_PRESETS, random_grounding_dino_backbone
        from vlprompt.backbones.presets import PRESETS, clip_tokenizer, random_clip_model

        preset = spec[len(RANDOM_PREFIX) :]
        if preset in GDINO_PRESETS:
            return random_grounding_dino_backbone(preset)
        if preset not in PRESETS:
            raise BackboneLoadError(
                f"unknown random preset {preset!r}; CLIP: {sorted(PRESETS)}, Grounding DINO: {sorted(GDINO_PRESETS)}"
            )
        model = random_clip_model(preset)
        return CLIPBackbone(model, clip_tokenizer(), None, name_or_path=spec)
    if spec.startswith("embedded:") or spec == "embedded":
        from vlprompt.assets import embedded_model_path

        return CLIPBackbone.from_pretrained(embedded_model_path(spec))
    path = Path(spec).expanduser()
    looks_local = path.exists() or spec.startswith((".", "/", "~")) or spec.count("/") > 1
    if looks_local and not (path / "config.json").exists():
        raise BackboneLoadError(
            f"no model at {spec!r}: expected a folder with config.json (as written by save_pretrained). "
            "Pass a Hugging Face hub id (e.g. openai/clip-vit-base-patch16), a local model folder, or random:<preset>."
        )
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(path) if looks_local else spec)
    except (OSError, ValueError) as err:
        raise BackboneLoadError(f"could not read a model config from {spec!r}: {err}") from err
    family = BACKBONES.get(config.model_type)
    if family is None:
        raise BackboneLoadError(
            f"model type {config.model_type!r} at {spec!r} is not supported; supported families: {sorted(BACKBONES)}."
        )
    # A local folder is recorded absolute, so a run trained from "./clip" still finds it from another directory.
    return family.from_pretrained(str(path.resolve()) if looks_local else spec)


__all__ = [
    "BACKBONES",
    "Backbone",
    "ClassPrompts",
    "DualEncoderBackbone",
    "FamilyInfo",
    "FusionDetectorBackbone",
    "register_backbone",
    "SITE_LINEAR_PROJECTIONS",
    "BackboneLoadError",
    "CLIPBackbone",
    "DeepPrompts",
    "FusionTokens",
    "GroundingDinoBackbone",
    "TokenizedText",
    "UnsupportedBackboneError",
    "load_backbone",
    "SITE_BLOCK",
    "SITE_DETECTION_TEXT",
    "SITE_DETECTOR",
    "SITE_FUSION",
    "SITE_IMAGE_SEQUENCE",
    "SITE_JOINT_SPACE",
    "SITE_TEXT_SEQUENCE",
    "SITE_TRANSIENT_IMAGE",
    "BlockAdapter",
    "TransientPrompts",
]
