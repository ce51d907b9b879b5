"""Backbone adapters, one per model family, and the factory that picks one for a checkpoint."""
from __future__ import annotations

from pathlib import Path

from vlprompt.backbones.base import (
    BACKBONES,
    SITE_LINEAR_PROJECTIONS,
    SITE_TOWER_WEIGHTS,
    BackboneLoadError,
    Backbone,
    ClassPrompts,
    DualEncoderBackbone,
    FamilyInfo,
    FusionDetectorBackbone,
    FusionEncoderBackbone,
    SITE_JOINT_SEQUENCE,
    SITE_FUSION_WEIGHTS,
    register_backbone,
    SITE_BLOCK,
    SITE_DETECTION_TEXT,
    SITE_DETECTION_TEXT_FEATURES,
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
# Each adapter module registers its model types where it is defined (register_backbone), each presets module its
# random:<preset> architectures (register_random_preset).
from vlprompt.backbones.base import RANDOM_PRESETS, register_random_preset
from vlprompt.backbones.clip import CLIPBackbone
from vlprompt.backbones.grounding_dino import GroundingDinoBackbone
from vlprompt.backbones import presets as _clip_presets, grounding_dino_presets as _gdino_presets  # noqa: F401
from vlprompt.backbones import siglip as _siglip, siglip_presets as _siglip_presets  # noqa: F401
from vlprompt.backbones import vilt as _vilt, vilt_presets as _vilt_presets  # noqa: F401
from vlprompt.backbones import bridgetower as _bridgetower, bridgetower_presets as _bridgetower_presets  # noqa: F401

RANDOM_PREFIX = "random:"


def load_backbone(name_or_path: str | Path) -> Backbone:
    """Load a backbone from a model name (``vlprompt.specs.ModelSpec``): ``embedded[:<name>]``, ``random:<preset>``
    (a real architecture, random weights), a local folder, or a hub id (``org/name`` or ``hf-hub:org/name``).

    Raises :class:`BackboneLoadError` naming what is wrong (missing folder, unsupported model family).
    """
    from vlprompt.specs import ModelSpec, SpecError

    try:
        spec = ModelSpec.parse(name_or_path)
    except SpecError as err:
        raise BackboneLoadError(str(err)) from None
    if spec.scheme == "random":
        build = RANDOM_PRESETS.get(spec.name)
        if build is None:
            raise BackboneLoadError(f"unknown random preset {spec.name!r}; available: {sorted(RANDOM_PRESETS)}")
        return build()
    if spec.scheme == "embedded":
        try:
            location = spec.load_name
        except SpecError as err:
            raise BackboneLoadError(str(err)) from None
    else:
        location = spec.load_name
    if spec.scheme != "hub" and not (Path(location) / "config.json").exists():
        raise BackboneLoadError(
            f"no model at {str(name_or_path)!r}: expected a folder with config.json (as written by save_pretrained). "
            "Pass a Hugging Face hub id (e.g. openai/clip-vit-base-patch16), a local model folder, embedded, or "
            "random:<preset>."
        )
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(location))
    except (OSError, ValueError) as err:
        raise BackboneLoadError(f"could not read a model config from {str(name_or_path)!r}: {err}") from err
    family = BACKBONES.get(config.model_type)
    if family is None:
        raise BackboneLoadError(
            f"model type {config.model_type!r} at {str(name_or_path)!r} is not supported; supported families: "
            f"{sorted(BACKBONES)}."
        )
    # A local folder is recorded absolute (ModelSpec resolves it): a run trained from "./clip" still finds it later.
    return family.from_pretrained(str(location))


__all__ = [
    "BACKBONES",
    "RANDOM_PRESETS",
    "register_random_preset",
    "Backbone",
    "ClassPrompts",
    "DualEncoderBackbone",
    "FamilyInfo",
    "FusionDetectorBackbone",
    "FusionEncoderBackbone",
    "SITE_JOINT_SEQUENCE",
    "SITE_FUSION_WEIGHTS",
    "register_backbone",
    "SITE_LINEAR_PROJECTIONS",
    "SITE_TOWER_WEIGHTS",
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
    "SITE_DETECTION_TEXT_FEATURES",
    "SITE_DETECTOR",
    "SITE_FUSION",
    "SITE_IMAGE_SEQUENCE",
    "SITE_JOINT_SPACE",
    "SITE_TEXT_SEQUENCE",
    "SITE_TRANSIENT_IMAGE",
    "BlockAdapter",
    "TransientPrompts",
]
