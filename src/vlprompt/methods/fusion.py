"""Methods on fusion encoders (ViLT; backbones/vilt.py), native homes of APT: a VQA head on the pooled output, plus
what each method tunes inside the encoder.

- ``fusion_head``: the head only (the frozen encoder's pooled output, classified).
- ``apt_native``: APT (methods/apt.py's module) on every block's attention output (the ``attention_block`` site):
  ``O' = (O + w E) exp(s)`` with ``E = ReLU(X K~^T) P``, M prompts per block; the released placement on ViLT, and
  its trainable set: besides APT and the head, the pooler and the token-type (modality) embeddings.
- ``deep_prompt_native``: M tokens of the joint sequence at every block (``joint_sequence``): APT's baseline.
- ``lora_native``: LoRA (``peft``) on each block's query and value projections, rank 4 (``fusion_weights``): about
  the 0.15M trainable APT's paper lists for its LoRA baseline on ViLT.
- ``full_native``: every weight of the encoder with the head (``fusion_weights``): the paper's upper reference.

The head is ViLT's VQA classifier: ``Linear(C, 2C) -> LayerNorm -> GELU -> Linear(2C, answers)``, trained with
ViLT's loss, binary cross-entropy against the soft answer targets, times the number of answers. The answers are the
method's class names: the head is tied to them.

The VQA task that trains and scores them is tasks/vqa.py. Not here yet (issue 17): NLVR2-style pairs and retrieval
heads.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from vlprompt.backbones.base import KIND_FUSION_ENCODER, SITE_BLOCK, SITE_FUSION_WEIGHTS, SITE_JOINT_SEQUENCE, DeepPrompts
from vlprompt.methods.apt import APTConfig, ApproximatedPrompts
from vlprompt.methods.base import MethodConfig, PromptMethod, require, set_lora_dropout_mode, subset_rows
from vlprompt.methods.registry import register_method
from vlprompt.options import opt
from vlprompt.tasks.batches import StepOutput, VQABatch


class VQAHead(nn.Module):
    """ViLT's VQA classifier on the pooled output."""

    def __init__(self, width: int, n_answers: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(width, 2 * width), nn.LayerNorm(2 * width), nn.GELU(),
                                    nn.Linear(2 * width, n_answers))  # fmt: skip

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.layers(pooled.to(self.layers[0].weight.dtype))


@dataclass
class FusionHeadConfig(MethodConfig):
    method_name = "fusion_head"


class FusionMethod(PromptMethod):
    """A VQA head on a fusion encoder, and the hooks a method fills to change the encoder (prompts, block adapter)."""

    name = "fusion_head"
    config_class = FusionHeadConfig
    backbone_kind = KIND_FUSION_ENCODER
    task = "vqa"

    @classmethod
    def tied_to_classes(cls, config: MethodConfig) -> bool:
        return True  # the head scores its answer vocabulary

    def __init__(self, backbone, config: MethodConfig, classnames, template: str = "{}") -> None:
        super().__init__(backbone, config, classnames, template)
        self.answers = list(self.classnames)
        self.head = VQAHead(backbone.width, len(self.answers))
        self.answer_rows: list[int] | None = None

    def _on_classes_changed(self) -> None:
        self.answer_rows = subset_rows(self.answers, self.classnames, "a VQA head")

    # ----------------------------------------------------------------- what a method changes in the encoder
    def joint_prompts(self) -> DeepPrompts | None:
        """Tokens for the joint sequence (``joint_sequence``), or None."""
        return None

    def block_adapter(self):
        """The attention-block adapter (``attention_block``), or None."""
        return None

    # ----------------------------------------------------------------- forward and loss
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor,
                pixel_mask: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """Answer logits ``(B, answers)``."""
        _, pooled = self.backbone.encode(input_ids, attention_mask, pixel_values, pixel_mask,
                                         prompts=self.joint_prompts(), block=self.block_adapter())  # fmt: skip
        logits = self.head(pooled)
        return logits if self.answer_rows is None else logits[:, self.answer_rows]

    def training_step(self, batch: VQABatch) -> StepOutput:
        logits = self(batch.input_ids, batch.attention_mask, batch.pixel_values, batch.pixel_mask)
        targets = batch.targets.to(logits.device, torch.float32)
        # ViLT's VQA loss: per-answer binary cross-entropy against the soft scores, summed over answers
        loss = F.binary_cross_entropy_with_logits(logits.float(), targets) * targets.shape[1]
        return StepOutput({"main": loss}, logits=logits)




@dataclass
class DeepPromptNativeConfig(MethodConfig):
    method_name = "deep_prompt_native"
    n_prompts: int = opt(50, min=0)  # M tokens at every block
    depth: int | Literal["all"] = opt("all", min=1, help="blocks that receive fresh tokens (1: shallow)")
    init_std: float = opt(0.02, gt=0)


class DeepPromptNative(FusionMethod):
    name = "deep_prompt_native"
    config_class = DeepPromptNativeConfig
    required_sites = frozenset({SITE_JOINT_SEQUENCE})

    def __init__(self, backbone, config: DeepPromptNativeConfig, classnames, template: str = "{}") -> None:
        super().__init__(backbone, config, classnames, template)
        depth = backbone.num_layers if config.depth == "all" else int(config.depth)
        if depth > backbone.num_layers:
            from vlprompt.methods.base import MethodConfigError

            raise MethodConfigError(f"deep_prompt_native.depth={depth} exceeds the {backbone.num_layers} blocks of "
                                    f"this {backbone.family} backbone; use at most {backbone.num_layers} (or 'all')")
        config.depth = depth
        self.prompts = nn.Parameter(torch.randn(depth, config.n_prompts, backbone.width) * config.init_std)

    def joint_prompts(self) -> DeepPrompts | None:
        return DeepPrompts(list(self.prompts)) if self.config.n_prompts else None


class _EncoderWeights(FusionMethod):
    """A method that trains some of the encoder's own weights (``PromptMethod._train_weights``): they join its
    trained tensors and its saved state under ``backbone.model.<name>``."""

    required_sites = frozenset({SITE_FUSION_WEIGHTS})


@dataclass
class APTNativeConfig(MethodConfig):
    method_name = "apt_native"
    n_prompts: int = opt(50, min=0)  # M per block; the release uses 50, its README's counts match 200
    rank: int = opt(4, min=0)
    init_std: float = opt(0.02, gt=0)
    # The release also trains the encoder's pooler and its token-type (modality) embeddings besides APT and the head.
    train_pooler: bool = True
    train_token_types: bool = True


class APTNative(_EncoderWeights):
    name = "apt_native"
    config_class = APTNativeConfig
    required_sites = frozenset({SITE_BLOCK, SITE_FUSION_WEIGHTS})

    def __init__(self, backbone, config: APTNativeConfig, classnames, template: str = "{}") -> None:
        super().__init__(backbone, config, classnames, template)
        module_config = APTConfig(n_prompts=config.n_prompts, rank=config.rank, init_std=config.init_std)
        # one set of M approximated prompts per attach point (ViLT: a block's attention; BridgeTower: each self- and
        # cross-attention of both streams)
        n_points = len(backbone.attach_points())
        self.apt = ApproximatedPrompts(n_points, backbone.width, module_config) if config.n_prompts else None
        parts = [part for part, wanted in (("pooler", config.train_pooler),
                                           ("token_types", config.train_token_types)) if wanted]  # fmt: skip
        self._train_weights(backbone.named_weights(parts) if parts else {})

    def block_adapter(self):
        return self.apt


@dataclass
class LoRANativeConfig(MethodConfig):
    method_name = "lora_native"
    r: int = opt(4, min=1)
    alpha: float = opt(8.0, gt=0)
    dropout: float = opt(0.0, min=0)
    projections: list[str] = opt(["q", "v"], help="attention projections of every block: q, k, v, o")

    def validate(self) -> None:
        require(self.dropout < 1, f"lora_native.dropout must be in [0, 1), got {self.dropout}")
        require(bool(self.projections) and len(set(self.projections)) == len(self.projections)
                and set(self.projections) <= {"q", "k", "v", "o"},
                f"lora_native.projections must be distinct names from q, k, v, o, got {self.projections}")  # fmt: skip


class LoRANative(_EncoderWeights):
    name = "lora_native"
    config_class = LoRANativeConfig

    def __init__(self, backbone, config: LoRANativeConfig, classnames, template: str = "{}") -> None:
        super().__init__(backbone, config, classnames, template)
        self._train_weights(backbone.add_lora(config.r, config.alpha, config.dropout, config.projections))

    def train(self, mode: bool = True):
        super().train(mode)
        set_lora_dropout_mode(self.backbone.model, mode)
        return self


@dataclass
class FullNativeConfig(MethodConfig):
    method_name = "full_native"


class FullNative(_EncoderWeights):
    name = "full_native"
    config_class = FullNativeConfig

    def __init__(self, backbone, config: FullNativeConfig, classnames, template: str = "{}") -> None:
        super().__init__(backbone, config, classnames, template)
        self._train_weights(backbone.named_weights())


register_method("fusion_head", FusionMethod, summary="VQA head on a fusion encoder's pooled output (ViLT)")
register_method("apt_native", APTNative, summary="APT on every attention block of a fusion encoder, with a VQA head")
register_method("deep_prompt_native", DeepPromptNative,
                summary="deep prompts in a fusion encoder's joint sequence, with a VQA head")
register_method("lora_native", LoRANative, summary="LoRA (peft) on a fusion encoder's q/v projections, with a VQA head")
register_method("full_native", FullNative, summary="every weight of a fusion encoder, with a VQA head (reference)")
