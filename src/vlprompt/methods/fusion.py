"""Methods on fusion encoders (ViLT; backbones/vilt.py), native homes of APT: a task head on the pooled output, plus
what each method tunes inside the encoder.

- ``fusion_head``: the head only (the frozen encoder's pooled output, classified or scored).
- ``apt_native``: APT (methods/apt.py's module) on every block's attention output (the ``attention_block`` site):
  ``O' = (O + w E) exp(s)`` with ``E = ReLU(X K~^T) P``, M prompts per block; the released placement on ViLT, and
  its trainable set: besides APT and the head, the pooler and the token-type (modality) embeddings.
- ``deep_prompt_native``: M tokens of the joint sequence at every block (``joint_sequence``): APT's baseline.
- ``lora_native``: LoRA (``peft``) on each block's query and value projections, rank 4 (``fusion_weights``): about
  the 0.15M trainable APT's paper lists for its LoRA baseline on ViLT.
- ``full_native``: every weight of the encoder with the head (``fusion_weights``): the paper's upper reference.

One method serves three tasks; its config's ``task`` picks the head, and a run takes its dataset's task
(:meth:`FusionMethod.bind_task`; the saved config and prompt record it, and loading rebuilds that head). The heads are
the released ViLT recipes', sized by the backbone's ``pooled_width``:

- ``vqa`` (tasks/vqa.py): ViLT's VQA classifier ``Linear(C, 2C) -> LayerNorm -> GELU -> Linear(2C, answers)``, trained
  with ViLT's loss, binary cross-entropy against the soft answer targets times the number of answers. The answers
  are the method's class names: the head is tied to them.
- ``nlvr2`` (tasks/nlvr2.py): ViLT's pair recipe. The statement is encoded with each image, image 0 as image type 1
  and image 1 as type 2 (``image_index``): a model with that third modality type (ViLT's NLVR2 checkpoints) uses
  its own; otherwise the head owns ``image_type_offset`` ``(C,)``, zero-initialised and added to the second image's
  tokens: the stand-in for the type ViLT adds, which it initialises as a copy of the image type. The two pooled
  outputs are concatenated and classified by ``Linear(2C, 2C) -> LayerNorm -> GELU -> Linear(2C, 2)`` with
  cross-entropy; the outputs are ``NLVR2_LABELS`` ("False", "True").
- ``retrieval`` (tasks/retrieval.py): ViLT's image-text matching recipe. A score ``Linear(C, 1)`` on the pooled
  output, initialised from the checkpoint's matching head (``backbone.matching_head()``) when it has one, else
  random. Training ranks each image's positive caption against ``negatives`` (K) sampled captions of other images
  with cross-entropy over the K + 1 scores (ViLT samples 15; the default 7 keeps a CPU step small). ``fusion_head``
  on retrieval keeps a checkpoint's matching head frozen by default, so it trains nothing: the zero-shot retrieval
  baseline (``train_head`` decides; a random score is trained unless ``train_head=false``, and evaluating an
  untrained random score warns).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from vlprompt.backbones.base import KIND_FUSION_ENCODER, SITE_BLOCK, SITE_FUSION_WEIGHTS, SITE_JOINT_SEQUENCE, DeepPrompts
from vlprompt.methods.apt import APTConfig, ApproximatedPrompts
from vlprompt.methods.base import (
    MethodConfig,
    MethodConfigError,
    PromptMethod,
    require,
    set_lora_dropout_mode,
    subset_rows,
)
from vlprompt.methods.registry import register_method
from vlprompt.options import opt
from vlprompt.tasks.batches import (FIXED_TASK_LABELS, RETRIEVAL_NEGATIVES, NLVR2Batch, RetrievalBatch, StepOutput,
                                   VQABatch)

FUSION_TASKS = ("vqa", "nlvr2", "retrieval")
RANDOM_SCORE_SEED = 0  # a random score that never trains is drawn from this seed: the same in training and eval


class VQAHead(nn.Module):
    """ViLT's and METER's VQA classifier on the pooled output: ``Linear(P, 2C) -> LayerNorm -> GELU -> Linear(2C,
    answers)`` for a pooled output of width P and tokens of width C (ViLT: P = C; METER / BridgeTower: P = 2C)."""

    def __init__(self, pooled_width: int, token_width: int, n_answers: int) -> None:
        super().__init__()
        hidden = 2 * token_width
        self.layers = nn.Sequential(nn.Linear(pooled_width, hidden), nn.LayerNorm(hidden), nn.GELU(),
                                    nn.Linear(hidden, n_answers))  # fmt: skip

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.layers(pooled.to(self.layers[0].weight.dtype))


class NLVR2Head(nn.Module):
    """ViLT's NLVR2 classifier on the two pooled outputs of a pair, concatenated; with ``image_type_offset`` ``(C,)``
    (zero-initialised) for the second image when the model has no modality type of its own for it (``own_type``
    False), else None."""

    def __init__(self, pooled_width: int, token_width: int, own_type: bool) -> None:
        super().__init__()
        hidden = 2 * token_width  # ViLT: Linear(2C, 2C); METER / BridgeTower: Linear(4C, 2C)
        self.layers = nn.Sequential(nn.Linear(2 * pooled_width, hidden), nn.LayerNorm(hidden), nn.GELU(),
                                    nn.Linear(hidden, 2))  # fmt: skip
        offset = None if own_type else nn.Parameter(torch.zeros(token_width))
        self.register_parameter("image_type_offset", offset)

    def forward(self, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat([first, second], dim=-1)
        return self.layers(pooled.to(self.layers[0].weight.dtype))


class RetrievalHead(nn.Module):
    """The image-text matching score ``Linear(C, 1)`` on the pooled output: a copy of the checkpoint's matching head
    (``from_checkpoint``), or random (drawn from ``RANDOM_SCORE_SEED`` when ``seeded``: a score that never trains
    is the same wherever the method is rebuilt)."""

    def __init__(self, pooled_width: int, matching: nn.Linear | None, seeded: bool = False) -> None:
        super().__init__()
        if seeded and matching is None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(RANDOM_SCORE_SEED)
                self.score = nn.Linear(pooled_width, 1)
        else:
            self.score = nn.Linear(pooled_width, 1)
        self.from_checkpoint = matching is not None
        if matching is not None:
            if tuple(matching.weight.shape) != (1, pooled_width):
                raise ValueError(f"the checkpoint's matching head has weight {tuple(matching.weight.shape)}; a "
                                 f"retrieval score needs (1, {pooled_width}) on the pooled output")  # fmt: skip
            with torch.no_grad():
                self.score.weight.copy_(matching.weight)
                if matching.bias is not None:
                    self.score.bias.copy_(matching.bias)
                else:
                    self.score.bias.zero_()

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.score(pooled.to(self.score.weight.dtype)).squeeze(-1)


@dataclass
class FusionConfig(MethodConfig):
    """What every method on a fusion encoder takes: the task its head is for (a run sets it from its dataset) and
    retrieval's sampled negatives."""

    task: Literal["vqa", "nlvr2", "retrieval"] = opt(
        "vqa", help="the head: vqa (answers), nlvr2 (image pairs), retrieval (a matching score); a run takes its "
                    "dataset's")  # fmt: skip
    negatives: int = opt(RETRIEVAL_NEGATIVES, min=1,
                         help="retrieval: captions of other images ranked against each positive (ViLT: 15)")


@dataclass
class FusionHeadConfig(FusionConfig):
    method_name = "fusion_head"
    # None: the head trains, except a retrieval score copied from the checkpoint's matching head (zero-shot).
    train_head: bool | None = opt(None, help="train the head; default: yes, except a checkpoint's retrieval score")

    def validate(self) -> None:
        require(self.train_head is not False or self.task == "retrieval",
                f"fusion_head.train_head=false leaves a {self.task} head random: only a retrieval score (the "
                "checkpoint's matching head) may stay frozen")  # fmt: skip


def check_labels(task: str, classnames) -> None:
    """Refuse class names an NLVR2 or retrieval head does not output (its outputs are fixed)."""
    labels = list(FIXED_TASK_LABELS[task])
    if list(classnames) != labels:
        raise ValueError(f"the {task} head outputs {labels}, not {list(classnames)[:5]}: build it with those names "
                         f"(the {task} task's class names)")  # fmt: skip


class FusionMethod(PromptMethod):
    """A task head on a fusion encoder (VQA, NLVR2 or retrieval: ``config.task``), and the hooks a method fills to
    change the encoder (prompts, block adapter)."""

    name = "fusion_head"
    config_class = FusionConfig
    backbone_kind = KIND_FUSION_ENCODER
    task = "vqa"  # the default; an instance's is its config's

    @classmethod
    def supported_tasks(cls) -> tuple[str, ...]:
        return FUSION_TASKS

    @classmethod
    def bind_task(cls, options: dict, task_name: str) -> dict:
        given = options.get("task")
        if given is not None and given != task_name:
            raise MethodConfigError(f"method.task={given} contradicts the dataset's task, {task_name}: the dataset "
                                    f"picks the head; drop method.task, or pass a dataset of task {given}")  # fmt: skip
        return {**options, "task": task_name}

    @classmethod
    def tied_to_classes(cls, config: MethodConfig) -> bool:
        return True  # the head scores its answer vocabulary (or the fixed outputs of a pair / matching head)

    def __init__(self, backbone, config: FusionConfig, classnames, template: str = "{}") -> None:
        super().__init__(backbone, config, classnames, template)
        self.task = config.task
        self.answer_rows: list[int] | None = None
        if self.task == "vqa":
            self.answers = list(self.classnames)
            self.head: nn.Module = VQAHead(backbone.pooled_width, backbone.width, len(self.answers))
            return
        check_labels(self.task, self.classnames)
        self.answers = list(FIXED_TASK_LABELS[self.task])
        if self.task == "nlvr2":
            self.head = NLVR2Head(backbone.pooled_width, backbone.width, own_type=backbone.num_image_types >= 2)
            return
        matching = backbone.matching_head()
        trains = self._trains_head(from_checkpoint=matching is not None)
        self.head = RetrievalHead(backbone.pooled_width, matching, seeded=not trains)
        self.head.requires_grad_(trains)

    def _trains_head(self, from_checkpoint: bool) -> bool:
        """Whether the retrieval score trains (every method but ``fusion_head`` trains its head)."""
        return True

    def _on_classes_changed(self) -> None:
        if self.task == "vqa":
            self.answer_rows = subset_rows(self.answers, self.classnames, "a VQA head",
                                           "Evaluate it on VQA data whose answers it was trained with.")
        else:
            check_labels(self.task, self.classnames)

    @property
    def untrained_score(self) -> bool:
        """A retrieval score that is neither the checkpoint's matching head nor trained: its rankings mean nothing."""
        return (self.task == "retrieval" and not self.head.from_checkpoint
                and not self.head.score.weight.requires_grad)  # fmt: skip

    def warn_if_untrained(self) -> None:
        if self.untrained_score:
            warnings.warn(f"{self.registered_name} scores retrieval with a random, untrained matching head (the "
                          f"{self.backbone.family} checkpoint has none): its recalls are chance; train the head "
                          "(train_head=true) or load a retrieval checkpoint", stacklevel=2)  # fmt: skip

    # ----------------------------------------------------------------- what a method changes in the encoder
    def joint_prompts(self) -> DeepPrompts | None:
        """Tokens for the joint sequence (``joint_sequence``), or None."""
        return None

    def block_adapter(self):
        """The attention-block adapter (``attention_block``), or None."""
        return None

    # ----------------------------------------------------------------- forward and loss
    def pooled(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor,
               pixel_mask: torch.Tensor | None = None, image_index: int = 0,
               image_type_offset: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """The encoder's pooled output ``(B, pooled_width)`` of text-image pairs, with the method's changes."""
        _, pooled = self.backbone.encode(input_ids, attention_mask, pixel_values, pixel_mask,
                                         prompts=self.joint_prompts(), block=self.block_adapter(),
                                         image_index=image_index, image_type_offset=image_type_offset)  # fmt: skip
        return pooled

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor,
                pixel_mask: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """VQA: answer logits ``(B, answers)``. NLVR2: logits ``(B, 2)`` (False, True) of statements about image pairs
        ``pixel_values`` ``(B, 2, 3, H, W)``. Retrieval: the matching score ``(B,)`` of each text-image pair."""
        if self.task == "nlvr2":
            if pixel_values.dim() != 5 or pixel_values.shape[1] != 2:
                raise ValueError(f"an NLVR2 head takes pixel_values (batch, 2, 3, H, W), the two images of each "
                                 f"statement; got {tuple(pixel_values.shape)}")  # fmt: skip
            masks = (None, None) if pixel_mask is None else (pixel_mask[:, 0], pixel_mask[:, 1])
            first = self.pooled(input_ids, attention_mask, pixel_values[:, 0], masks[0], image_index=0)
            second = self.pooled(input_ids, attention_mask, pixel_values[:, 1], masks[1], image_index=1,
                                 image_type_offset=self.head.image_type_offset)  # fmt: skip
            return self.head(first, second)
        pooled = self.pooled(input_ids, attention_mask, pixel_values, pixel_mask)
        if self.task == "retrieval":
            return self.head(pooled)
        logits = self.head(pooled)
        return logits if self.answer_rows is None else logits[:, self.answer_rows]

    def training_step(self, batch) -> StepOutput:
        expected = {"vqa": VQABatch, "nlvr2": NLVR2Batch, "retrieval": RetrievalBatch}[self.task]
        if not isinstance(batch, expected):
            raise TypeError(f"a {self.task} head trains on {expected.__name__}, not {type(batch).__name__}")
        if self.task == "nlvr2":
            logits = self(batch.input_ids, batch.attention_mask, batch.pixel_values, batch.pixel_mask)
            loss = F.cross_entropy(logits.float(), batch.labels.to(logits.device, torch.long))
            return StepOutput({"main": loss}, logits=logits)
        if self.task == "retrieval":
            # ViLT's ranking loss: each image's positive caption (first) against its K sampled negatives
            images, candidates, length = batch.input_ids.shape
            pixels = batch.pixel_values.repeat_interleave(candidates, dim=0)
            masks = None if batch.pixel_mask is None else batch.pixel_mask.repeat_interleave(candidates, dim=0)
            scores = self(batch.input_ids.reshape(-1, length), batch.attention_mask.reshape(-1, length), pixels, masks)
            scores = scores.view(images, candidates)
            loss = F.cross_entropy(scores.float(), torch.zeros(images, dtype=torch.long, device=scores.device))
            return StepOutput({"main": loss}, logits=scores)
        logits = self(batch.input_ids, batch.attention_mask, batch.pixel_values, batch.pixel_mask)
        targets = batch.targets.to(logits.device, torch.float32)
        # ViLT's VQA loss: per-answer binary cross-entropy against the soft scores, summed over answers
        loss = F.binary_cross_entropy_with_logits(logits.float(), targets) * targets.shape[1]
        return StepOutput({"main": loss}, logits=logits)


class FusionHead(FusionMethod):
    """The head alone on the frozen encoder (``fusion_head``)."""

    name = "fusion_head"
    config_class = FusionHeadConfig

    def _trains_head(self, from_checkpoint: bool) -> bool:
        return (not from_checkpoint) if self.config.train_head is None else self.config.train_head


@dataclass
class DeepPromptNativeConfig(FusionConfig):
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
class APTNativeConfig(FusionConfig):
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
class LoRANativeConfig(FusionConfig):
    method_name = "lora_native"
    r: int = opt(4, min=1)
    alpha: float = opt(8.0, gt=0)
    dropout: float = opt(0.0, min=0)
    projections: list[str] = opt(["q", "v"], help="attention projections of every block: q, k, v, o")

    def validate(self) -> None:
        super().validate()
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
class FullNativeConfig(FusionConfig):
    method_name = "full_native"


class FullNative(_EncoderWeights):
    name = "full_native"
    config_class = FullNativeConfig

    def __init__(self, backbone, config: FullNativeConfig, classnames, template: str = "{}") -> None:
        super().__init__(backbone, config, classnames, template)
        self._train_weights(backbone.named_weights())


register_method("fusion_head", FusionHead,
                summary="a task head on a fusion encoder's pooled output (ViLT): VQA, NLVR2 pairs or retrieval")
register_method("apt_native", APTNative, summary="APT on every attention block of a fusion encoder, with a task head")
register_method("deep_prompt_native", DeepPromptNative,
                summary="deep prompts in a fusion encoder's joint sequence, with a task head")
register_method("lora_native", LoRANative,
                summary="LoRA (peft) on a fusion encoder's q/v projections, with a task head")
register_method("full_native", FullNative, summary="every weight of a fusion encoder, with a task head (reference)")
