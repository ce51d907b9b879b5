"""The task contract: a task owns its data, its batches, its metrics and its evaluation; the trainer owns the rest.

``Trainer.fit(method, task)`` (engine/trainer.py) asks a task for the dataset of an epoch and turns each raw item
into the batch the method's ``training_step`` takes; the task records what it measures per step (training
accuracy) and scores the validation and final splits. Tasks register by name; a method names its task
(``PromptMethod.task``).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable, ClassVar, Sequence

import torch
from torch.utils.data import Dataset

from vlprompt.tasks.batches import StepOutput

TASKS: dict[str, type["Task"]] = {}


def register_task(task_class: type["Task"]) -> type["Task"]:
    TASKS[task_class.name] = task_class
    return task_class


def task_class(name: str) -> type["Task"]:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known: {sorted(TASKS)}")
    return TASKS[name]


def autocast_of(accelerator):
    """The accelerator's autocast (mixed precision), or a no-op context without one."""
    return accelerator.autocast() if accelerator is not None else torch.autocast("cpu", enabled=False)


def device_of(method, accelerator) -> torch.device:
    # Evaluation loaders are not passed through accelerator.prepare (no sharding of the test set), so their
    # batches arrive on the CPU and go to the method's device here.
    if accelerator is not None:
        return accelerator.device
    return method.backbone.device


class Task(ABC):
    """What one kind of problem needs beyond optimisation: data, batches, metrics, evaluation."""

    name: ClassVar[str] = ""
    # The dataset names this task reads, for error messages that name the fix.
    dataset_forms: ClassVar[str] = ""
    # How raw dataset items are stacked into a batch (None: torch's default collate).
    collate_fn: ClassVar[Callable[[list], Any] | None] = None

    @classmethod
    @abstractmethod
    def load_data(cls, data) -> Any:
        """The splits of ``data`` (``engine.api.DataOptions``) this task trains and scores on (few-shot sampled
        when ``data.shots`` is set)."""

    @property
    @abstractmethod
    def classnames(self) -> list[str]:
        """The labels the method is built for (class or category names)."""

    @property
    @abstractmethod
    def template(self) -> str:
        """The dataset's hand-written template for a label."""

    @abstractmethod
    def run_info(self) -> dict[str, Any]:
        """What the run folder records about the data (name, sizes)."""

    augment: bool = True
    num_workers: int = 0
    cache_images: bool | None = None
    image_cache_gib: float = 4.0

    def configure(self, config) -> None:
        """Take the run's data options (``TrainConfig``): training augmentation, loader worker processes, the
        decoded-image cache."""
        self.augment = config.augment
        self.num_workers = config.num_workers
        self.cache_images = config.cache_images
        self.image_cache_gib = config.image_cache_gib

    def check_before_training(self, method) -> None:
        """Refuse, before anything is written, data this method cannot train or be scored on."""

    def prepare_training(self, method, accelerator, eval_batch_size: int) -> None:
        """Work done once per run before the first epoch (caching untouched towers)."""

    @abstractmethod
    def train_dataset(self) -> Dataset:
        """The dataset the trainer draws training batches from (seeded shuffle per epoch)."""

    @abstractmethod
    def make_batch(self, raw: Any) -> Any:
        """The batch ``training_step`` takes, from one collated item of :meth:`train_dataset`."""

    def loss_weight(self, indices: Sequence[int]) -> float:
        """What the training loss of the samples at ``indices`` (of :meth:`train_dataset`) is normalised by: the
        number of samples for a per-sample mean. A job of several processes weights each process's loss by its
        slice's weight over the global batch's, which makes the summed gradient the global batch's."""
        return float(len(indices))

    def start_epoch(self) -> None:
        """Reset per-epoch training metrics."""

    def record_step(self, output: StepOutput, batch: Any) -> None:
        """Accumulate per-step training metrics."""

    def epoch_metrics(self) -> dict[str, float]:
        """The epoch's training metrics (e.g. training accuracy)."""
        return {}

    def fit_features(self, method, accelerator, eval_batch_size: int) -> dict[str, Any]:
        """Fit a method that is fitted on features (``method.fits_features``); returns what to log."""
        raise NotImplementedError(f"the {self.name} task has no feature-fitted methods")

    @abstractmethod
    def validate(self, method, accelerator, batch_size: int) -> dict[str, float]:
        """Validation metrics (``val_*``), or {} without a validation split."""

    @abstractmethod
    def final_metrics(self, method, accelerator, batch_size: int, log: Callable[[str], None]) -> dict[str, Any]:
        """The run's final metrics (with the ``split`` they are on)."""

    @abstractmethod
    def evaluate_split(self, method, split: str, accelerator, batch_size: int) -> dict[str, Any]:
        """Metrics of a saved prompt on one split (``vlprompt eval``)."""
