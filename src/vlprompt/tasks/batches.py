"""What a task hands a method's ``training_step``, and what the step hands back (no heavy imports: methods use it)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

# The fixed outputs of the fusion heads whose labels are not a dataset's vocabulary (the class names of their tasks).
NLVR2_LABELS = ("False", "True")  # an NLVR2 head's two logits, in order: the statement is false / true of the pair
RETRIEVAL_LABELS = ("match",)  # a retrieval head's one output: how well a text matches an image
# Tasks whose heads have fixed outputs: their class names whatever the dataset.
FIXED_TASK_LABELS = {"nlvr2": NLVR2_LABELS, "retrieval": RETRIEVAL_LABELS}
RETRIEVAL_NEGATIVES = 7  # K, the captions of other images a retrieval batch ranks each positive against (ViLT: 15)


@dataclass
class ClassificationBatch:
    """Labelled images, as pixels or as cached features of an untouched image tower; ``text_feats`` are the cached
    class features when the method leaves the text tower untouched."""

    labels: torch.Tensor
    pixel_values: torch.Tensor | None = None
    image_feats: torch.Tensor | None = None
    text_feats: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass
class DetectionBatch:
    """Images with their padding mask and DETR-format targets (``class_labels`` index the category prompt)."""

    pixel_values: torch.Tensor
    pixel_mask: torch.Tensor
    targets: list[dict[str, torch.Tensor]]

    def __len__(self) -> int:
        return int(self.pixel_values.shape[0])


@dataclass
class VQABatch:
    """Questions (token ids and padding mask) about images, with soft answer targets ``(B, answers)`` (min(1, k/3)
    for an answer k annotators gave; zeros where unknown)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    pixel_values: torch.Tensor
    targets: torch.Tensor
    pixel_mask: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


@dataclass
class NLVR2Batch:
    """Statements (token ids and padding mask) about image pairs ``pixel_values`` ``(B, 2, 3, H, W)``, with their
    labels ``(B,)`` (1: the statement is true of the pair)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    pixel_values: torch.Tensor
    labels: torch.Tensor
    pixel_mask: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


@dataclass
class RetrievalBatch:
    """Images ``(B, 3, H, W)`` each with candidate captions ``input_ids`` / ``attention_mask`` ``(B, 1 + K, T)``: its
    own caption first, then K captions of other images (the negatives a matching score ranks it against)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    pixel_values: torch.Tensor
    pixel_mask: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


@dataclass
class StepOutput:
    """One training step's named loss terms (their sum is minimised), the logits if the task scores them (training
    accuracy), and scalars worth logging that are not part of the loss."""

    losses: dict[str, torch.Tensor]
    logits: torch.Tensor | None = None
    logs: dict[str, float] = field(default_factory=dict)

    @property
    def loss(self) -> torch.Tensor:
        return sum(self.losses.values())  # type: ignore[return-value]

    def describe(self) -> dict[str, Any]:
        return {name: float(value.detach()) for name, value in self.losses.items()} | self.logs
