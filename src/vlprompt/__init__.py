"""vlprompt: parameter-efficient multi-modal prompt tuning of vision-language models.

The public API (imported on first use, so ``import vlprompt`` stays cheap)::

    backbone = vlprompt.load_backbone("embedded")            # or a CLIP/SigLIP folder, hub id, random:<preset>
    model = vlprompt.get_prompt_model(backbone, "coop", classnames, template, {"n_ctx": 4})
    vlprompt.Trainer(vlprompt.TrainConfig(epochs=5), "runs/x").fit(model, vlprompt.ClassificationTask(splits, backbone))
    model.save_pretrained("prompts/x"); vlprompt.PromptMethod.from_pretrained("prompts/x")
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.2.0"

# public name -> the module that defines it
_EXPORTS = {
    "load_backbone": "vlprompt.backbones",
    "register_backbone": "vlprompt.backbones.base",
    "register_random_preset": "vlprompt.backbones.base",
    "Backbone": "vlprompt.backbones.base",
    "DualEncoderBackbone": "vlprompt.backbones.base",
    "FusionDetectorBackbone": "vlprompt.backbones.base",
    "FamilyInfo": "vlprompt.backbones.base",
    "DeepPrompts": "vlprompt.backbones.base",
    "get_prompt_model": "vlprompt.methods",
    "register_method": "vlprompt.methods",
    "make_config": "vlprompt.methods",
    "METHODS": "vlprompt.methods",
    "PromptMethod": "vlprompt.methods",
    "ClassificationMethod": "vlprompt.methods",
    "DetectionMethod": "vlprompt.methods",
    "MethodConfig": "vlprompt.methods",
    "MethodConfigError": "vlprompt.methods",
    "opt": "vlprompt.options",
    "from_reference": "vlprompt.interop",
    "to_reference": "vlprompt.interop",
    "save_reference": "vlprompt.interop",
    "Trainer": "vlprompt.engine.trainer",
    "TrainConfig": "vlprompt.engine.trainer",
    "TrainingError": "vlprompt.engine.trainer",
    "Task": "vlprompt.tasks",
    "ClassificationTask": "vlprompt.tasks",
    "DetectionTask": "vlprompt.tasks",
    "ClassificationBatch": "vlprompt.tasks",
    "DetectionBatch": "vlprompt.tasks",
    "StepOutput": "vlprompt.tasks",
    "DataOptions": "vlprompt.engine.api",
    "RunOptions": "vlprompt.engine.api",
    "load_splits": "vlprompt.engine.api",
    "train": "vlprompt.engine.api",
    "evaluate_checkpoint": "vlprompt.engine.api",
    "predict": "vlprompt.engine.api",
    "predict_images": "vlprompt.engine.api",
    "predict_detections": "vlprompt.engine.api",
    "load_dataset": "vlprompt.data",
    "ModelSpec": "vlprompt.specs",
    "DatasetSpec": "vlprompt.specs",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'vlprompt' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
