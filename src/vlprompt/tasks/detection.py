"""Detection on a fusion detector (Grounding DINO family) with COCO-format data.

The loss is the detector's own (Hungarian matching, focal loss over the prompt's text tokens, L1 + GIoU box losses,
two-stage proposal losses), returned by the method's ``training_step``; evaluation is COCO box AP (mAP@[.5:.95],
AP50, AP75, in percent) computed by pycocotools.
"""
from __future__ import annotations

from typing import Any, Callable, ClassVar, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from vlprompt.data.coco import (
    DetectionDataset,
    DetectionImage,
    DetectionSplits,
    coco_ground_truth,
    coco_map,
    collate_detection,
    target_box_count,
    detections_from_scores,
    few_shot_detection,
    is_detection_dataset,
    load_detection_dataset,
    warn_short_categories,
)
from vlprompt.data.errors import DatasetError
from vlprompt.engine import distributed
from vlprompt.tasks.base import Task, autocast_of, register_task
from vlprompt.tasks.batches import DetectionBatch


def load_detection_splits(data) -> DetectionSplits:
    """The detection dataset of ``data`` (``DataOptions``), few-shot sampled when ``data.shots`` is set."""
    if not is_detection_dataset(data.dataset):
        raise DatasetError(
            f"{data.dataset!r} is not a detection dataset; detection methods train and evaluate on "
            "coco:<folder or json> or toydet:<name> (see docs/detection.md)."
        )
    if data.subsample != "all":
        raise DatasetError("--subsample (base-to-novel) applies to classification datasets; use data.categories.")
    splits = load_detection_dataset(data.dataset, data.root, data.categories)
    if data.shots is not None:
        splits.train = few_shot_detection(splits.train, data.shots, data.seed, len(splits.categories))
        warn_short_categories(splits, data.shots)
    return splits


@torch.no_grad()
def evaluate_detection(
    method, images: Sequence[DetectionImage], category_ids: Sequence[int], categories: Sequence[str],
    accelerator=None, batch_size: int = 8, num_workers: int = 0,
) -> dict[str, Any]:
    """COCO box AP of ``method`` on ``images`` (pycocotools), plus the number of images. In a job of several
    processes each scores its block of the images and the detections are gathered before AP is computed."""
    if not images:
        raise DatasetError("the evaluation split is empty")
    was_training = method.training
    method.eval()
    mine = [images[i] for i in distributed.block_of(len(images))]
    dataset = DetectionDataset(mine, method.backbone.image_config, augment=False)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_detection,
                        num_workers=num_workers, multiprocessing_context=distributed.loader_worker_context(num_workers))
    device = method.backbone.device
    detections: list[dict] = []
    start = 0
    for pixels, mask, _ in loader:
        with autocast_of(accelerator):
            scores, boxes = method.predict(pixels.to(device), mask.to(device))
        for i in range(pixels.shape[0]):
            detections += detections_from_scores(mine[start + i], scores[i].float().cpu(), boxes[i].float().cpu(),
                                                 category_ids)
        start += pixels.shape[0]
    detections = [d for part in distributed.gather_objects(detections) for d in part]
    method.train(was_training)
    result = coco_map(coco_ground_truth(images, category_ids, categories), detections)
    return {**result, "n": len(images)}


# What `vlprompt predict` keeps by default: a category score is the mean sigmoid token logit over its phrase (the
# detector adapter's category_scores), so it reads on the same 0..1 scale as Grounding DINO's box threshold (0.35 in
# its demo, on the highest token); the phrase mean is lower than that maximum, hence a little lower here.
DEFAULT_SCORE_THRESHOLD = 0.3


def detections_in_image(scores: torch.Tensor, boxes: torch.Tensor, categories: Sequence[str], width: int,
                        height: int, threshold: float = DEFAULT_SCORE_THRESHOLD,
                        max_boxes: int | None = None) -> list[dict[str, Any]]:
    """The detections of one image, best first, from per-category scores ``(Q, C)`` and normalised cx, cy, w, h boxes
    ``(Q, 4)``: one per query, labelled with its highest-scoring category, kept when that score is at least
    ``threshold`` (at most ``max_boxes`` of them). Each is ``{"label", "category_index", "score", "box"}`` with
    ``box`` = ``[x0, y0, x1, y1]`` in the image's pixels (``width`` x ``height``), clipped to the image.

    (COCO evaluation, :func:`detections_from_scores`, scores every query x category pair instead: AP rewards the
    extra guesses, a picture of them would show each box several times.)"""
    best, category = scores.float().max(dim=1)
    order = best.argsort(descending=True, stable=True).tolist()
    kept = [q for q in order if float(best[q]) >= threshold]
    if max_boxes is not None:
        kept = kept[:max_boxes]
    out = []
    for q in kept:
        cx, cy, w, h = boxes[q].float().tolist()
        x0, x1 = (min(max(v * width, 0.0), float(width)) for v in (cx - w / 2, cx + w / 2))
        y0, y1 = (min(max(v * height, 0.0), float(height)) for v in (cy - h / 2, cy + h / 2))
        c = int(category[q])
        out.append({"label": categories[c], "category_index": c, "score": float(best[q]), "box": [x0, y0, x1, y1]})
    return out


class DetectionTask(Task):
    """Few-shot / full detection of a ``DetectionSplits`` with a detection method."""

    name: ClassVar[str] = "detection"
    dataset_forms: ClassVar[str] = "coco:<folder or json> or toydet:<name>"
    collate_fn = staticmethod(collate_detection)

    def __init__(self, splits: DetectionSplits, backbone, augment: bool = True, few_shot: bool = False) -> None:
        self.splits = splits
        self.augment = augment
        self.few_shot = few_shot  # the run records which training images a few-shot draw picked
        self.image_config = backbone.image_config
        self._box_counts: list[int] | None = None

    @classmethod
    def load_data(cls, data) -> DetectionSplits:
        return load_detection_splits(data)

    @property
    def classnames(self) -> list[str]:
        return list(self.splits.categories)

    @property
    def template(self) -> str:
        return self.splits.template

    def run_info(self) -> dict[str, Any]:
        return {"task": "detection", "dataset_name": self.splits.name, "categories": self.splits.categories,
                "num_train": len(self.splits.train),
                "train_image_ids": [img.id for img in self.splits.train] if self.few_shot else None}

    def check_before_training(self, method) -> None:
        if not self.splits.train and method.num_trainable():
            raise DatasetError(f"{self.splits.name} has no training images")
        # COCO AP is undefined without ground truth: find that out now, not after training.
        for split in ("val", "test"):
            images = self.splits.split(split)
            if images and not any(not crowd for image in images for crowd in image.crowd):
                raise DatasetError(
                    f"the {split} split of {self.splits.name} has no (non-crowd) annotations of the chosen categories "
                    f"({', '.join(self.splits.categories[:5])}), so its COCO AP is undefined; annotate it, choose "
                    "other data.categories, or point the dataset at a folder whose split has them."
                )

    def train_dataset(self) -> Dataset:
        return DetectionDataset(self.splits.train, self.image_config, augment=self.augment)

    def loss_weight(self, indices: Sequence[int]) -> float:
        # The detector's loss is a sum over the batch's target boxes divided by their number (at least 1).
        if self._box_counts is None:
            self._box_counts = [target_box_count(image) for image in self.splits.train]
        return float(max(sum(self._box_counts[i] for i in indices), 1))

    def make_batch(self, raw) -> DetectionBatch:
        pixels, mask, targets = raw
        return DetectionBatch(pixels, mask, targets)

    def _evaluate(self, method, images, accelerator, batch_size: int) -> dict[str, Any]:
        s = self.splits
        return evaluate_detection(method, images, s.category_ids, s.categories, accelerator, batch_size,
                                  self.num_workers)

    def validate(self, method, accelerator, batch_size: int) -> dict[str, float]:
        if not self.splits.val:
            return {}
        val = self._evaluate(method, self.splits.val, accelerator, batch_size)
        return {"val_mAP": val["mAP"], "val_AP50": val["AP50"]}

    def final_metrics(self, method, accelerator, batch_size: int, log: Callable[[str], None]) -> dict[str, Any]:
        # COCO ships no test annotations (instances_test2017.json): its final numbers are then the val split's.
        final_split = "test" if self.splits.test else "val" if self.splits.val else None
        final: dict[str, Any] = {"split": final_split or "test"}
        if final_split is None:
            log(f"warning: {self.splits.name} has neither a test nor a val split; no final mAP")
            return final
        if final_split == "val":
            log(f"note: {self.splits.name} has no test split; the final mAP is on val")
        result = self._evaluate(method, self.splits.split(final_split), accelerator, batch_size)
        final.update(mAP=result["mAP"], AP50=result["AP50"], AP75=result["AP75"], n=result["n"])
        return final

    def evaluate_split(self, method, split: str, accelerator, batch_size: int) -> dict[str, Any]:
        images = self.splits.split(split)
        if not images:
            raise DatasetError(f"split {split!r} of {self.splits.name} is empty; choose another --split")
        result = self._evaluate(method, images, accelerator, batch_size)
        return {"dataset": self.splits.name, "split": split, "mAP": result["mAP"], "AP50": result["AP50"],
                "AP75": result["AP75"], "n": result["n"]}  # fmt: skip


register_task(DetectionTask)
