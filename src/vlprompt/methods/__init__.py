"""Method registry: every method is registered here once, by name, with optional named presets."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vlprompt.methods.base import MethodConfig, MethodConfigError, PromptMethod
from vlprompt.methods.coop import CoOp, CoOpConfig
from vlprompt.methods.ivlp import IVLP, IVLPConfig
from vlprompt.methods.linear_probe import LinearProbe, LinearProbeConfig
from vlprompt.methods.vpt import VPT, VPTConfig
from vlprompt.methods.zeroshot import ZeroShot, ZeroShotConfig


@dataclass(frozen=True)
class MethodSpec:
    """A registered name: a method class plus defaults layered over its config's own."""

    method_class: type[PromptMethod]
    defaults: dict[str, Any] = field(default_factory=dict)
    summary: str = ""


METHODS: dict[str, MethodSpec] = {
    "zeroshot": MethodSpec(ZeroShot, summary="hand-written template(s), no training"),
    "linear_probe": MethodSpec(LinearProbe, summary="logistic regression on frozen image features"),
    "coop": MethodSpec(CoOp, summary="learned text context (16 tokens)"),
    "vpt_shallow": MethodSpec(VPT, {"depth": 1}, summary="visual tokens at the image input"),
    "vpt_deep": MethodSpec(VPT, {"depth": 12}, summary="fresh visual tokens at every image layer"),
    "ivlp": MethodSpec(IVLP, summary="independent deep text + visual prompts"),
}
ALIASES = {"zero_shot": "zeroshot", "zero-shot": "zeroshot", "linear-probe": "linear_probe", "vpt": "vpt_deep",
           "vpt-deep": "vpt_deep", "vpt-shallow": "vpt_shallow", "lp": "linear_probe"}


def canonical_method_name(name: str) -> str:
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key not in METHODS:
        raise MethodConfigError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}")
    return key


def make_config(name: str, options: dict[str, Any] | None = None, backbone=None) -> MethodConfig:
    """The validated config of a registered method: its defaults, preset defaults, then ``options``.

    Depth presets that mean "every layer" follow the backbone when it has fewer layers than ViT-B's 12.
    """
    spec = METHODS[canonical_method_name(name)]
    values = dict(spec.defaults)
    if backbone is not None and "depth" in values and values["depth"] > backbone.vision_layers:
        values["depth"] = backbone.vision_layers
    if backbone is not None and spec.method_class is IVLP:
        values.setdefault("text_depth", backbone.text_layers)
        values.setdefault("image_depth", backbone.vision_layers)
    values.update(options or {})
    return spec.method_class.config_class.from_dict(values)


def get_prompt_model(
    backbone,
    name: str,
    classnames: list[str],
    template: str = "a photo of a {}.",
    config: MethodConfig | dict[str, Any] | None = None,
) -> PromptMethod:
    """Wrap a frozen backbone with a method (PEFT's ``get_peft_model`` for prompts)."""
    spec = METHODS[canonical_method_name(name)]
    if not isinstance(config, MethodConfig):
        config = make_config(name, config, backbone)
    elif not isinstance(config, spec.method_class.config_class):
        raise MethodConfigError(f"{type(config).__name__} is not a config for method {name!r}")
    return spec.method_class(backbone, config, classnames, template)


__all__ = [
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
