"""What the VQA, NLVR2 and retrieval tasks share: the dataset folder, the image transform (the model's square input
and its own normalisation, no augmentation), token ids with their padding mask, and :class:`FusionTask` (whole
training splits, no augmentation, a running training score, sharded evaluation loaders)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from vlprompt.data import DatasetError, ImageTransformConfig, build_transform
from vlprompt.engine import distributed
from vlprompt.tasks.base import Task


def dataset_folder(dataset: str, root: str | None, form: str) -> Path:
    """The folder of ``<scheme>:<folder>`` (a relative folder is read under ``root`` when it is not found as
    written), or of a toy set ``toy:<task>`` (generated on first use under ``root``, default the toy cache folder);
    ``form`` is what the error asks for."""
    from vlprompt.specs import DatasetSpec

    spec = DatasetSpec.parse(dataset)
    if spec.scheme == "toy":
        from vlprompt.toyworld.fusion_sets import materialize_fusion_set
        from vlprompt.toyworld.suite import default_toy_root

        return materialize_fusion_set(spec.name.lower(), Path(root).expanduser() if root else default_toy_root())
    folder = Path(dataset.split(":", 1)[1]).expanduser()
    if not folder.is_dir() and root and (Path(root) / folder).is_dir():
        folder = Path(root) / folder
    if not folder.is_dir():
        raise DatasetError(f"{dataset}: {folder} is not a folder; pass {form}")
    return folder


def refuse_shots(data, task: str, why: str) -> None:
    if data.shots is not None:
        raise DatasetError(f"--shots samples training images per class, and {task} has no classes to sample "
                           f"({why}): train on the whole split (leave --shots out)")  # fmt: skip


def fusion_transform(backbone) -> Callable:
    return build_transform(ImageTransformConfig(size=backbone.image_size, mean=backbone.image_mean,
                                                std=backbone.image_std), train=False)


def tokens_and_mask(backbone, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids ``(N, T)`` of ``texts`` and their padding mask (1 = a token)."""
    if not texts:
        return torch.zeros(0, 1, dtype=torch.long), torch.zeros(0, 1, dtype=torch.long)
    tokens = backbone.tokenize(list(texts))
    positions = torch.arange(tokens.input_ids.shape[1])
    return tokens.input_ids, (positions < tokens.lengths.unsqueeze(1)).long()


class FusionTask(Task):
    """A fusion-encoder task: trained on its whole training split (no classes to sample shots of), never augmented
    (a flip swaps "left" and "right" in questions, statements and captions), with a training score summed over
    processes and evaluation loaders sharded over them."""

    # The name of the epoch's training score in the metrics, and what --shots is refused with.
    train_metric: ClassVar[str] = "train_accuracy"
    label: ClassVar[str] = ""
    no_shots_because: ClassVar[str] = ""

    augment: bool = False
    _training_score: float = 0.0
    _training_seen: int = 0

    @classmethod
    def load_data(cls, data) -> Any:
        refuse_shots(data, cls.label, cls.no_shots_because)
        if data.subsample != "all":
            raise DatasetError(f"--subsample (base-to-novel) splits a classification dataset's classes; {cls.label} "
                               "has none: leave --subsample out")
        return cls.read_splits(data.dataset, data.root)

    @classmethod
    def read_splits(cls, dataset: str, root: str | None) -> Any:
        """The dataset's splits (the folder of ``dataset``, a relative one read under ``root``)."""
        raise NotImplementedError

    @property
    def template(self) -> str:
        return "{}"

    def configure(self, config) -> None:
        super().configure(config)
        self.augment = False

    def start_epoch(self) -> None:
        self._training_score, self._training_seen = 0.0, 0

    def count_training(self, score: float, seen: int) -> None:
        """Add a batch's training score (correct answers, or summed soft scores) over ``seen`` examples."""
        self._training_score += score
        self._training_seen += seen

    def epoch_metrics(self) -> dict[str, float]:
        totals = torch.tensor([self._training_score, self._training_seen], dtype=torch.float64)
        score, seen = distributed.sum_over_processes(totals).tolist()
        return {self.train_metric: 100.0 * score / seen} if seen else {}

    def eval_loader(self, dataset: Dataset, batch_size: int) -> DataLoader:
        return DataLoader(distributed.shard(dataset), batch_size=batch_size, shuffle=False,
                          num_workers=self.num_workers,
                          multiprocessing_context=distributed.loader_worker_context(self.num_workers))
