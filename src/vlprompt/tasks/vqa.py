"""Visual question answering on a fusion encoder: VQA v2 data (data/vqa.py), answer-vocabulary batches, VQA accuracy.

A dataset is ``vqa:<folder>`` in the VQA v2 layout: the ``train2014`` questions, annotations and images train; the
``val2014`` ones validate and are the scored split (VQA v2's test splits have no public answers). The answer
vocabulary is the training answers given at least ``ANSWER_MIN_COUNT`` times (ViLT's 3,129 on VQA v2; a small
folder keeps every answer given at least twice). Images are resized to the model's square input and normalised
with the model's own statistics (ViLT: 0.5 per channel). A prediction is the highest-scoring answer; its VQA
accuracy is the official leave-one-annotator-out score.
"""
from __future__ import annotations

import hashlib

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
from torch.utils.data import Dataset

from vlprompt.data import DatasetError, open_image
from vlprompt.data.vqa import VQAExample, build_vocabulary, load_vqa_split, vqa_accuracy
from vlprompt.engine import distributed
from vlprompt.tasks.base import autocast_of, device_of, register_task
from vlprompt.tasks.fusion_inputs import FusionTask, dataset_folder, fusion_transform
from vlprompt.tasks.batches import StepOutput, VQABatch

TRAIN_SPLIT, EVAL_SPLIT = "train2014", "val2014"
ANSWER_MIN_COUNT = 9  # ViLT / METER keep the VQA v2 answers given 9 times or more
SMALL_SET_MIN_COUNT = 2  # below this many training questions the vocabulary keeps answers given twice
SMALL_SET_QUESTIONS = 10_000


@dataclass
class VQASplits:
    name: str
    answers: list[str]
    train: list[VQAExample] = field(default_factory=list)
    val: list[VQAExample] = field(default_factory=list)
    template: str = "{}"

    def split(self, name: str) -> list[VQAExample]:
        if name in ("val", "test"):  # the scored split is the validation one
            return self.val
        if name == "train":
            return self.train
        raise DatasetError(f"a VQA dataset has splits train and val (scored as test), not {name!r}")


def load_vqa_splits(dataset: str, root: str | None = None) -> VQASplits:
    """``vqa:<folder>`` (a relative folder is read under ``root`` when it is not found as written) or ``toy:vqa``."""
    folder = dataset_folder(dataset, root, "vqa:<a folder in the VQA v2 layout>")
    train = load_vqa_split(folder, TRAIN_SPLIT).examples
    val_file = folder / f"v2_OpenEnded_mscoco_{EVAL_SPLIT}_questions.json"
    val = load_vqa_split(folder, EVAL_SPLIT).examples if val_file.is_file() else []
    min_count = ANSWER_MIN_COUNT if len(train) >= SMALL_SET_QUESTIONS else SMALL_SET_MIN_COUNT
    vocabulary = build_vocabulary(train, min_count)
    return VQASplits(name=f"vqa_{folder.name}", answers=list(vocabulary), train=train, val=val)


class VQADataset(Dataset):
    """(pixels, token ids, padding mask, soft targets, example index) per question."""

    def __init__(self, examples: list[VQAExample], backbone, answers: list[str], transform: Callable) -> None:
        self.examples = examples
        self.transform = transform
        vocabulary = {a: i for i, a in enumerate(answers)}
        self.targets = torch.zeros(len(examples), len(answers))
        for i, example in enumerate(examples):
            for index, score in example.targets(vocabulary).items():
                self.targets[i, index] = score
        tokens = backbone.tokenize([e.question for e in examples]) if examples else None
        self.input_ids = tokens.input_ids if tokens is not None else torch.zeros(0, 1, dtype=torch.long)
        positions = torch.arange(self.input_ids.shape[1])
        self.mask = (positions < tokens.lengths.unsqueeze(1)).long() if tokens is not None else self.input_ids

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int):
        pixels = self.transform(open_image(self.examples[i].image))
        return pixels, self.input_ids[i], self.mask[i], self.targets[i], i


@torch.no_grad()
def evaluate_vqa(method, loader, examples: list[VQAExample], accelerator=None, sharded: bool = False) -> dict:
    """VQA accuracy (%) of the highest-scoring answers, with the number of questions."""
    was_training = method.training
    method.eval()
    device = device_of(method, accelerator)
    score, seen = 0.0, 0
    for pixels, ids, mask, _, index in loader:
        with autocast_of(accelerator):
            logits = method(ids.to(device), mask.to(device), pixels.to(device))
        for row, i in zip(logits.argmax(-1).tolist(), index.tolist()):
            score += vqa_accuracy(method.classnames[row], examples[i].answers)
            seen += 1
    method.train(was_training)
    if sharded:
        score, seen = distributed.sum_over_processes(torch.tensor([score, seen], dtype=torch.float64)).tolist()
    if seen == 0:
        raise ValueError("the VQA evaluation split is empty")
    return {"vqa_accuracy": 100.0 * score / seen, "n": int(seen)}


class VQATask(FusionTask):
    name: ClassVar[str] = "vqa"
    train_metric: ClassVar[str] = "train_vqa_score"
    label: ClassVar[str] = "VQA"
    no_shots_because: ClassVar[str] = "its answers are a vocabulary, not classes of images"
    dataset_forms: ClassVar[str] = "vqa:<a folder in the VQA v2 layout>"

    def __init__(self, splits: VQASplits, backbone, augment: bool = False, few_shot: bool = False) -> None:
        self.splits = splits
        self.few_shot = few_shot
        transform = fusion_transform(backbone)
        self.train_set = VQADataset(splits.train, backbone, splits.answers, transform)
        self.val = VQADataset(splits.val, backbone, splits.answers, transform) if splits.val else None
        self._backbone, self._transform = backbone, transform

    @classmethod
    def read_splits(cls, dataset: str, root: str | None) -> VQASplits:
        return load_vqa_splits(dataset, root)

    @property
    def classnames(self) -> list[str]:
        return list(self.splits.answers)

    @property
    def template(self) -> str:
        return self.splits.template

    def run_info(self) -> dict[str, Any]:
        # the answers' digest, not only their count: a resume onto answers changed in place would give the head's
        # rows other meanings
        digest = hashlib.sha256("\n".join(self.splits.answers).encode()).hexdigest()[:16]
        return {"task": "vqa", "dataset_name": self.splits.name, "num_train": len(self.splits.train),
                "num_answers": len(self.splits.answers), "answers_digest": digest}  # fmt: skip

    def check_before_training(self, method) -> None:
        if not self.splits.train and method.num_trainable():
            raise DatasetError(f"{self.splits.name} has no training questions")
        if not self.splits.val:  # the run would end without a score
            raise DatasetError(f"{self.splits.name} has no {EVAL_SPLIT} questions to score (v2_OpenEnded_mscoco_"
                               f"{EVAL_SPLIT}_questions.json and v2_mscoco_{EVAL_SPLIT}_annotations.json): add them")

    def train_dataset(self) -> Dataset:
        return self.train_set

    def make_batch(self, raw) -> VQABatch:
        pixels, ids, mask, targets, _ = raw
        return VQABatch(ids, mask, pixels, targets)

    def record_step(self, output: StepOutput, batch: VQABatch) -> None:
        if output.logits is not None:  # training VQA score: the soft target of the chosen answer
            chosen = output.logits.detach().argmax(-1)
            self.count_training(float(batch.targets[torch.arange(len(batch)), chosen.to(batch.targets.device)].sum()),
                                len(batch))  # fmt: skip

    def validate(self, method, accelerator, batch_size: int) -> dict[str, float]:
        if self.val is None:
            return {}
        result = evaluate_vqa(method, self.eval_loader(self.val, batch_size), self.splits.val, accelerator, True)
        return {"val_vqa_accuracy": result["vqa_accuracy"]}

    def final_metrics(self, method, accelerator, batch_size: int, log) -> dict[str, Any]:
        final: dict[str, Any] = {"split": "test"}
        if self.val is not None:
            result = evaluate_vqa(method, self.eval_loader(self.val, batch_size), self.splits.val, accelerator, True)
            # "accuracy" is the run's headline metric wherever runs are compared (bench, eval)
            final.update(accuracy=result["vqa_accuracy"], vqa_accuracy=result["vqa_accuracy"], n=result["n"])
        return final

    def evaluate_split(self, method, split: str, accelerator, batch_size: int) -> dict[str, Any]:
        examples = self.splits.split(split)
        if not examples:
            raise ValueError(f"split {split!r} of {self.splits.name} is empty")
        dataset = VQADataset(examples, self._backbone, self.splits.answers, self._transform)
        result = evaluate_vqa(method, self.eval_loader(dataset, batch_size), examples, None, True)
        return {"dataset": self.splits.name, "split": split, "accuracy": result["vqa_accuracy"], "n": result["n"]}


register_task(VQATask)
