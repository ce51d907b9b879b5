"""Method registry: every method is registered here once, by name, with optional named presets."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from vlprompt.backbones.base import SITE_IMAGE_SEQUENCE, SITE_TEXT_SEQUENCE
from vlprompt.methods.apt import APT, APTConfig
from vlprompt.methods.base import MethodConfig, MethodConfigError, PromptMethod
from vlprompt.methods.cocoop import CoCoOp, CoCoOpConfig
from vlprompt.methods.coop import CoOp, CoOpConfig
from vlprompt.methods.detection import (
    DetCoOp,
    DetCoOpConfig,
    DetFull,
    DetFullConfig,
    DetFusionPrompt,
    DetFusionPromptConfig,
    DetHeads,
    DetHeadsConfig,
    DetLoRA,
    DetLoRAConfig,
    DetZeroShot,
    DetZeroShotConfig,
    DetectionMethod,
)
from vlprompt.methods.dpt import DPT, DPTConfig
from vlprompt.methods.ivlp import IVLP, IVLPConfig
from vlprompt.methods.linear_probe import LinearProbe, LinearProbeConfig
from vlprompt.methods.maple import MaPLe, MaPLeConfig
from vlprompt.methods.sdpt import SDPT, SDPTConfig
from vlprompt.methods.sdpt_native import SDPTNative, SDPTNativeConfig
from vlprompt.methods.upt import UPT, UPTConfig
from vlprompt.methods.vpt import VPT, VPTConfig
from vlprompt.methods.zeroshot import ZeroShot, ZeroShotConfig


@dataclass(frozen=True)
class MethodSpec:
    """A registered name: a method class plus defaults layered over its config's own."""

    method_class: type[PromptMethod]
    defaults: dict[str, Any] = field(default_factory=dict)
    summary: str = ""


# A preset depth that means every layer of the tower it prompts, whatever the backbone's depth (J = L).
ALL_LAYERS = "all"
DEPTH_KEYS = ("depth", "text_depth", "image_depth")

METHODS: dict[str, MethodSpec] = {
    "zeroshot": MethodSpec(ZeroShot, summary="hand-written template(s), no training"),
    "linear_probe": MethodSpec(LinearProbe, summary="logistic regression on frozen image features"),
    "coop": MethodSpec(CoOp, summary="learned text context (16 tokens)"),
    "vpt_shallow": MethodSpec(VPT, {"depth": 1}, summary="visual tokens at the image input"),
    "vpt_deep": MethodSpec(VPT, {"depth": ALL_LAYERS}, summary="fresh visual tokens at every image layer"),
    "ivlp": MethodSpec(IVLP, {"text_depth": ALL_LAYERS, "image_depth": ALL_LAYERS},
                       summary="independent deep text + visual prompts"),
    "cocoop": MethodSpec(CoCoOp, summary="CoOp + per-image context shift from a meta-network"),
    "maple": MethodSpec(MaPLe, summary="deep text prompts coupled into visual prompts"),
    "upt": MethodSpec(UPT, summary="one tiny network makes both modalities' prompts"),
    "sdpt": MethodSpec(SDPT, summary="unified joint-space prototypes, pseudo-inverse into both towers"),
    "dpt": MethodSpec(DPT, summary="CoOp text prompt + deep visual prompts + class-aware visual prompts (CAVPT)"),
    "apt": MethodSpec(APT, summary="approximated prompts: additive term on every attention block"),
    # APT's baseline: plain deep prompts of the same count in both towers (IVLP with random init, no fixed words).
    "deep_prompt": MethodSpec(
        IVLP,
        {"n_text": 50, "n_image": 50, "placeholder": "{}.", "init_from_placeholder": False, "text_depth": ALL_LAYERS,
         "image_depth": ALL_LAYERS},
        summary="deep prompts in both towers (APT's baseline, same prompt count)",
    ),
    # Fusion detectors (Grounding DINO family): SDPT's native form, its baselines and reference points.
    "sdpt_native": MethodSpec(SDPTNative, summary="unified prototypes in fusion attention, pseudo-inverse into both modalities"),
    "sdpt_native_released": MethodSpec(
        SDPTNative, {"n_prototypes": 700, "layers": "all", "mask_text_prototypes": True},
        summary="sdpt_native with the released settings (K=700, all fusion layers, text prototypes masked)",
    ),
    "det_zeroshot": MethodSpec(DetZeroShot, summary="frozen detector, category names as the prompt"),
    "det_coop": MethodSpec(DetCoOp, summary="learned context before every category name at the text encoder input"),
    "det_fusion_prompt": MethodSpec(DetFusionPrompt, summary="separate vision / text deep prompts at the fusion layers"),
    "det_heads": MethodSpec(DetHeads, summary="detection heads only"),
    "det_full": MethodSpec(DetFull, summary="full fine-tuning (reference point)"),
    "det_lora": MethodSpec(DetLoRA, summary="LoRA via peft on encoder/decoder attention (reference point)"),
}
ALIASES = {"zero_shot": "zeroshot", "zero-shot": "zeroshot", "linear-probe": "linear_probe", "vpt": "vpt_deep",
           "vpt-deep": "vpt_deep", "vpt-shallow": "vpt_shallow", "lp": "linear_probe",
           "sdpt-native": "sdpt_native"}


def canonical_method_name(name: str) -> str:
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key not in METHODS:
        raise MethodConfigError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}")
    return key


def make_config(name: str, options: dict[str, Any] | None = None, backbone=None) -> MethodConfig:
    """The validated config of a registered method: its defaults, preset defaults, then ``options``.

    Default depths deeper than the backbone (ViT-B's 12, MaPLe's 9, ...) are capped to its layer count, so presets
    also run on smaller models; a depth the user asks for explicitly is never changed (too deep is an error).
    """
    spec = METHODS[canonical_method_name(name)]
    config_class = spec.method_class.config_class
    values = dict(spec.defaults)
    options = dict(options or {})
    own_defaults = {f.name: f.default for f in dataclasses.fields(config_class)}
    if backbone is not None:
        defaults = {**own_defaults, **spec.defaults}
        for key, limit in _depth_limits(spec.method_class, backbone).items():
            if key not in defaults or key in options:
                continue
            if defaults[key] == ALL_LAYERS or (isinstance(defaults[key], int) and defaults[key] > limit):
                values[key] = limit
    for key in DEPTH_KEYS:  # no backbone to count layers on: the config's own default (ViT-B's 12)
        if values.get(key) == ALL_LAYERS:
            values[key] = own_defaults[key]
    values.update(options)
    return config_class.from_dict(values)


def is_detection_method(name: str) -> bool:
    """Whether a registered method works on detectors (trained and evaluated by ``engine/detection.py``)."""
    return getattr(METHODS[canonical_method_name(name)].method_class, "task", "classification") == "detection"


def _depth_limits(method_class: type[PromptMethod], backbone) -> dict[str, int]:
    sites = method_class.required_sites
    both = min(backbone.text_layers, backbone.vision_layers)
    depth = backbone.vision_layers if SITE_TEXT_SEQUENCE not in sites else (
        backbone.text_layers if SITE_IMAGE_SEQUENCE not in sites else both
    )
    return {"depth": depth, "text_depth": backbone.text_layers, "image_depth": backbone.vision_layers}


def get_prompt_model(
    backbone,
    name: str,
    classnames: list[str],
    template: str | None = None,
    config: MethodConfig | dict[str, Any] | None = None,
) -> PromptMethod:
    """Wrap a frozen backbone with a method (PEFT's ``get_peft_model`` for prompts).

    ``template`` None: the method's own default (``"a photo of a {}."`` for CLIP methods, the bare name for detection
    methods, whose category phrases are the names).
    """
    spec = METHODS[canonical_method_name(name)]
    if not isinstance(config, MethodConfig):
        config = make_config(name, config, backbone)
    elif not isinstance(config, spec.method_class.config_class):
        raise MethodConfigError(f"{type(config).__name__} is not a config for method {name!r}")
    if template is None:
        method = spec.method_class(backbone, config, classnames)
    else:
        method = spec.method_class(backbone, config, classnames, template)
    method.registered_name = canonical_method_name(name)  # e.g. "vpt_deep" rather than the class's "vpt"
    return method


__all__ = [
    "APT", "APTConfig", "DetCoOp", "DetCoOpConfig", "DetFull", "DetFullConfig", "DetFusionPrompt",
    "DetFusionPromptConfig", "DetHeads", "DetHeadsConfig", "DetLoRA", "DetLoRAConfig", "DetZeroShot",
    "DetZeroShotConfig", "DetectionMethod", "SDPTNative", "SDPTNativeConfig", "is_detection_method", "CoCoOp", "CoCoOpConfig", "CoOp", "CoOpConfig", "DPT", "DPTConfig", "IVLP", "IVLPConfig",
    "LinearProbe", "LinearProbeConfig", "MaPLe", "MaPLeConfig", "SDPT", "SDPTConfig", "UPT", "UPTConfig", "VPT",
    "VPTConfig", "ZeroShot", "ZeroShotConfig",
    "ALIASES",
    "METHODS",
    "MethodConfig",
    "MethodConfigError",
    "MethodSpec",
    "PromptMethod",
    "canonical_method_name",
    "get_prompt_model",
    "make_config",
]
