"""Image classification on a dual encoder: its data, batches (with untouched towers cached), accuracy.

What the task saves work on: a tower the method leaves untouched (``method.cacheable_towers``) is computed once,
never per step: class text features for image-side methods; image features for text-side methods when training
augmentation is off. Evaluation computes class features once, not per batch.
"""
from __future__ import annotations

import time
from typing import Any, ClassVar, Iterable

import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from vlprompt.data import DatasetError, DatasetSplits, ImageDataset, build_transform
from vlprompt.data.datasets import decode_images, decoded_size_bytes
from vlprompt.engine import distributed
from vlprompt.tasks.base import Task, autocast_of, device_of, register_task
from vlprompt.tasks.batches import ClassificationBatch, StepOutput

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def transform_config(backbone):
    """The backbone's own image preprocessing, or its image size with OpenAI's statistics when it ships none."""
    from vlprompt.data import ImageTransformConfig

    if backbone.image_processor is not None:
        return ImageTransformConfig.from_image_processor(backbone.image_processor)
    return ImageTransformConfig(size=backbone.image_size, mean=OPENAI_MEAN, std=OPENAI_STD)


@torch.no_grad()
def image_features_of(method, loader: Iterable, accelerator=None,
                      sharded: bool = False) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Image features and labels of a whole loader (frozen or prompted image tower, no gradient). ``sharded``: the
    loader reads this process's block of a dataset (``distributed.shard``) in a job of several processes, and the
    blocks are gathered: every process gets all features, in the dataset's order (every process must call it)."""
    feats, labels = [], []
    device = device_of(method, accelerator)
    for pixels, y in loader:
        with autocast_of(accelerator):
            feats.append(method.image_features(pixels.to(device)).float().cpu())
        labels.append(y.cpu())
    if not sharded:
        return torch.cat(feats), torch.cat(labels)
    local_feats = torch.cat(feats) if feats else None  # None: an empty block (fewer images than processes)
    local_labels = torch.cat(labels) if labels else None
    return distributed.gather_blocks(local_feats), distributed.gather_blocks(local_labels)


@torch.no_grad()
def evaluate(method, loader: Iterable, accelerator=None, num_classes: int | None = None,
             sharded: bool = False) -> dict[str, Any]:  # fmt: skip
    """Top-1 accuracy (and per-class accuracy) of ``method`` on a loader of ``(pixels, labels)``. ``sharded``: the
    loader reads this process's block of a dataset in a job of several processes; the counts are summed over the
    processes (every process must call it)."""
    was_training = method.training
    method.eval()
    text_feats = None
    if not method.fits_features and not method.conditions_text_on_image:
        with autocast_of(accelerator):
            text_feats = method.text_features()  # class features once per evaluation, not per batch
    correct = total = 0
    n_classes = num_classes or len(method.classnames)
    per_class_correct = torch.zeros(n_classes)
    per_class_total = torch.zeros(n_classes)
    device = device_of(method, accelerator)
    for pixels, labels in loader:
        with autocast_of(accelerator):
            logits = method(pixel_values=pixels.to(device), text_feats=text_feats)
        pred = logits.argmax(-1).cpu()
        labels = labels.cpu()
        correct += int((pred == labels).sum())
        total += len(labels)
        per_class_total += torch.bincount(labels, minlength=n_classes).float()
        per_class_correct += torch.bincount(labels[pred == labels], minlength=n_classes).float()
    method.train(was_training)
    if sharded:  # one block per process (``distributed.shard``): the counts add up
        counts = distributed.sum_over_processes(torch.cat([torch.tensor([correct, total], dtype=torch.float64),
                                                           per_class_correct.double(), per_class_total.double()]))
        correct, total = int(counts[0]), int(counts[1])
        per_class_correct, per_class_total = counts[2:2 + n_classes].float(), counts[2 + n_classes:].float()
    if total == 0:
        raise ValueError("evaluation split is empty")
    per_class = (per_class_correct / per_class_total.clamp(min=1)).tolist()
    return {"accuracy": 100.0 * correct / total, "n": total, "per_class_accuracy": [100.0 * a for a in per_class]}


class ClassificationTask(Task):
    """Few-shot / full classification of a ``DatasetSplits`` with a classification method."""

    name: ClassVar[str] = "classification"
    dataset_forms: ClassVar[str] = "toy:<name>, imagefolder:<path> or a CoOp dataset name"

    def __init__(self, splits: DatasetSplits, backbone, augment: bool = True, few_shot: bool = False) -> None:
        self.splits = splits
        self.augment = augment
        self._transforms = transform_config(backbone)
        eval_tf = build_transform(self._transforms, train=False)
        self.train_eval = ImageDataset(splits.train, eval_tf)  # no augmentation: feature caching, linear probe
        self.val = ImageDataset(splits.val, eval_tf) if splits.val else None
        self.test = ImageDataset(splits.test, eval_tf) if splits.test else None
        self._eval_tf = eval_tf
        self.few_shot = few_shot
        self._text_feats: torch.Tensor | None = None
        self._cached_images = False
        self._decoded: list | None = None
        self._correct = self._seen = 0

    @classmethod
    def load_data(cls, data) -> DatasetSplits:
        from vlprompt.engine.api import load_splits

        return load_splits(data)

    # ----------------------------------------------------------------- what the run records
    @property
    def classnames(self) -> list[str]:
        return list(self.splits.classnames)

    @property
    def template(self) -> str:
        return self.splits.template

    def run_info(self) -> dict[str, Any]:
        per_class = torch.bincount(torch.tensor([s.label for s in self.splits.train], dtype=torch.long),
                                   minlength=len(self.splits.classnames)).tolist()  # fmt: skip
        # What the run trained on, which --shots above a class's image count does not say.
        return {"dataset_name": self.splits.name, "num_train": len(self.splits.train),
                "train_images_per_class": {"min": min(per_class), "max": max(per_class)}}

    def check_before_training(self, method) -> None:
        if not self.splits.train and (method.num_trainable() > 0 or method.fits_features):
            raise DatasetError(
                f"{self.splits.name} has no training images (a test-only dataset such as a domain-shift variant): "
                "train on its source dataset, then `vlprompt eval RUN --dataset <this dataset>`."
            )

    # ----------------------------------------------------------------- training batches
    def prepare_training(self, method, accelerator, eval_batch_size: int) -> None:
        """Compute the towers the method leaves untouched once for the whole run."""
        towers = method.cacheable_towers
        self._text_feats = None
        if "text" in towers:
            with torch.no_grad(), accelerator.autocast():
                self._text_feats = method.text_features().detach()
        self._cached_images = "image" in towers and not self.augment
        if self._cached_images:
            loader = self._eval_loader(self.train_eval, eval_batch_size)
            self._image_cache = TensorDataset(*image_features_of(method, loader, accelerator, sharded=True))
        self._decoded = None
        if not self._cached_images and self._should_decode_once():
            self._decoded = decode_images(self.splits.train)

    def _should_decode_once(self) -> bool:
        """Whether the training images are decoded once for the run (``TrainConfig.cache_images``)."""
        if self.cache_images is not None:
            return self.cache_images
        budget = self.image_cache_gib * 2**30
        return self.few_shot and decoded_size_bytes(self.splits.train) <= budget

    @property
    def train_set(self) -> Dataset:
        """Training images, augmented (random resized crop + flip) when ``augment`` is on."""
        return ImageDataset(self.splits.train, build_transform(self._transforms, train=True, augment=self.augment),
                            decoded=self._decoded)

    def train_dataset(self) -> Dataset:
        return self._image_cache if self._cached_images else self.train_set

    def make_batch(self, raw) -> ClassificationBatch:
        inputs, labels = raw
        if self._cached_images:
            return ClassificationBatch(labels, image_feats=inputs, text_feats=self._text_feats)
        return ClassificationBatch(labels, pixel_values=inputs, text_feats=self._text_feats)

    def start_epoch(self) -> None:
        self._correct = self._seen = 0

    def record_step(self, output: StepOutput, batch: ClassificationBatch) -> None:
        if output.logits is not None:
            self._correct += int((output.logits.argmax(-1) == batch.labels).sum())
            self._seen += len(batch)

    def epoch_metrics(self) -> dict[str, float]:
        correct, seen = distributed.sum_over_processes(torch.tensor([self._correct, self._seen],
                                                                    dtype=torch.float64)).tolist()  # fmt: skip
        return {"train_accuracy": 100.0 * correct / seen} if seen else {}

    # ----------------------------------------------------------------- fitted methods (linear probe)
    def fit_features(self, method, accelerator, eval_batch_size: int) -> dict[str, Any]:
        start = time.perf_counter()
        train_f, train_y = image_features_of(method, self._eval_loader(self.train_eval, eval_batch_size), accelerator,
                                             sharded=True)  # fmt: skip
        if self.val is not None and len(self.val):
            val_f, val_y = image_features_of(method, self._eval_loader(self.val, eval_batch_size), accelerator,
                                             sharded=True)  # fmt: skip
        else:
            val_f, val_y = train_f[:0], train_y[:0]
        info = method.fit_features(train_f, train_y, val_f, val_y)
        return {"train_time_s": time.perf_counter() - start, **info}

    # ----------------------------------------------------------------- evaluation
    def _eval_loader(self, dataset: Dataset, batch_size: int) -> DataLoader:
        """This process's block of ``dataset`` (all of it in a single process), in order."""
        return DataLoader(distributed.shard(dataset), batch_size=batch_size, shuffle=False,
                          num_workers=self.num_workers,
                          multiprocessing_context=distributed.loader_worker_context(self.num_workers))

    def validate(self, method, accelerator, batch_size: int) -> dict[str, float]:
        if self.val is None or not len(self.val):
            return {}
        loader = self._eval_loader(self.val, batch_size)
        return {"val_accuracy": evaluate(method, loader, accelerator, sharded=True)["accuracy"]}

    def final_metrics(self, method, accelerator, batch_size: int, log) -> dict[str, Any]:
        final: dict[str, Any] = {"split": "test"}
        if self.test is not None and len(self.test):
            result = evaluate(method, self._eval_loader(self.test, batch_size), accelerator, sharded=True)
            final.update(accuracy=result["accuracy"], n=result["n"])
        return final

    def evaluate_split(self, method, split: str, accelerator, batch_size: int) -> dict[str, Any]:
        samples = self.splits.split(split)
        if not samples:
            raise ValueError(f"split {split!r} of {self.splits.name} is empty; choose another --split")
        loader = self._eval_loader(ImageDataset(samples, self._eval_tf), batch_size)
        result = evaluate(method, loader, accelerator, sharded=True)
        return {"dataset": self.splits.name, "split": split, "accuracy": result["accuracy"], "n": result["n"]}


register_task(ClassificationTask)
