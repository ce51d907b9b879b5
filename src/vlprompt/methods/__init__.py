"""Methods: each module defines one method (config dataclass + prompt model) and registers its names there."""
from __future__ import annotations

# Importing a method module registers it (register_method at its end); this order is the registry's order.
from vlprompt.methods import (  # noqa: F401
    zeroshot, linear_probe, coop, vpt, ivlp, cocoop, maple, upt, sdpt, dpt, apt, kgcoop, clip_adapter, tip_adapter,
    promptsrc, clip_lora, fusion,
)
from vlprompt.methods import detection, sdpt_native  # noqa: F401
from vlprompt.methods.apt import APT, APTConfig
from vlprompt.methods.base import ClassificationMethod, MethodConfig, MethodConfigError, PromptMethod
from vlprompt.methods.clip_adapter import ClipAdapter, ClipAdapterConfig
from vlprompt.methods.clip_lora import ClipLoRA, ClipLoRAConfig
from vlprompt.methods.cocoop import CoCoOp, CoCoOpConfig
from vlprompt.methods.coop import CoOp, CoOpConfig
from vlprompt.methods.detection import (
    DetCoOp,
    DetCoOpConfig,
    DetectionMethod,
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
)
from vlprompt.methods.dpt import DPT, DPTConfig
from vlprompt.methods.ivlp import IVLP, IVLPConfig
from vlprompt.methods.kgcoop import KgCoOp, KgCoOpConfig
from vlprompt.methods.linear_probe import LinearProbe, LinearProbeConfig
from vlprompt.methods.maple import MaPLe, MaPLeConfig
from vlprompt.methods.tip_adapter import TipAdapter, TipAdapterConfig, TipAdapterF, TipAdapterFConfig
from vlprompt.methods.registry import (
    ALIASES,
    ALL_LAYERS,
    METHODS,
    MethodSpec,
    canonical_method_name,
    depth_fields,
    get_prompt_model,
    is_detection_method,
    make_config,
    method_class,
    method_task,
    register_method,
)
from vlprompt.methods.sdpt import SDPT, SDPTConfig
from vlprompt.methods.promptsrc import PromptSRC, PromptSRCConfig
from vlprompt.methods.sdpt_native import SDPTNative, SDPTNativeConfig
from vlprompt.methods.upt import UPT, UPTConfig
from vlprompt.methods.vpt import VPT, VPTConfig
from vlprompt.methods.zeroshot import ZeroShot, ZeroShotConfig

__all__ = [
    "ALIASES", "ALL_LAYERS", "APT", "APTConfig", "ClassificationMethod", "ClipAdapter", "ClipAdapterConfig", "ClipLoRA", "ClipLoRAConfig",
    "CoCoOp", "CoCoOpConfig", "CoOp", "CoOpConfig", "DPT", "DPTConfig", "DetCoOp", "DetCoOpConfig", "DetFull",
    "DetFullConfig", "DetFusionPrompt", "DetFusionPromptConfig", "DetHeads", "DetHeadsConfig", "DetLoRA",
    "DetLoRAConfig", "DetZeroShot", "DetZeroShotConfig", "DetectionMethod", "IVLP", "IVLPConfig", "KgCoOp",
    "KgCoOpConfig", "LinearProbe", "LinearProbeConfig", "METHODS",
    "MaPLe", "MaPLeConfig", "MethodConfig", "PromptSRC", "PromptSRCConfig", "MethodConfigError", "MethodSpec", "PromptMethod", "SDPT", "SDPTConfig",
    "SDPTNative", "SDPTNativeConfig", "TipAdapter", "TipAdapterConfig", "TipAdapterF", "TipAdapterFConfig", "UPT", "UPTConfig", "VPT", "VPTConfig",
    "ZeroShot", "ZeroShotConfig",
    "canonical_method_name", "depth_fields", "get_prompt_model", "is_detection_method", "make_config",
    "method_class", "method_task", "register_method",
]
