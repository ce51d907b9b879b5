"""NLVR2 on a fusion encoder: statements about image pairs (data/nlvr2.py), true or false, scored by accuracy.

A dataset is ``nlvr2:<folder>`` in the NLVR2 layout: ``train.json`` trains, ``dev.json`` validates, and the public
test split (``test1.json``, NLVR2's test-P; a file named ``test-P.json`` or ``test.json`` is read the same way) is the
scored split; a folder without one scores dev. Each example is the statement with its two images, resized to the
model's square input and normalised as ViLT's (0.5 per channel), not augmented: a flip would swap "left" and
"right" in the statements. The method's head is the NLVR2 head (methods/fusion.py): its class names are
``NLVR2_LABELS`` ("False", "True"), a prediction the higher of the two logits. NLVR2 has no classes to sample
shots of: ``--shots`` is refused.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
from torch.utils.data import Dataset

from vlprompt.data import DatasetError, open_image
from vlprompt.data.nlvr2 import NLVR2Example, load_nlvr2_split
from vlprompt.engine import distributed
from vlprompt.tasks.base import autocast_of, device_of, register_task
from vlprompt.tasks.batches import NLVR2_LABELS, NLVR2Batch, StepOutput
from vlprompt.tasks.fusion_inputs import FusionTask, dataset_folder, fusion_transform, tokens_and_mask

TRAIN_SPLIT, VAL_SPLIT = "train", "dev"
TEST_SPLITS = ("test1", "test-P", "test")  # the public test split (test-P) under the names it is found as
FORM = "nlvr2:<a folder in the NLVR2 layout>"


@dataclass
class NLVR2Splits:
    name: str
    train: list[NLVR2Example] = field(default_factory=list)
    val: list[NLVR2Example] = field(default_factory=list)  # dev
    test: list[NLVR2Example] = field(default_factory=list)  # test-P
    test_file: str = ""  # the test split's name in the folder ("" without one)

    def split(self, name: str) -> list[NLVR2Example]:
        if name == "train":
            return self.train
        if name in ("val", "dev"):
            return self.val
        if name == "test":
            if not self.test_file:
                raise DatasetError(f"{self.name} has no test split ({', '.join(f'{s}.json' for s in TEST_SPLITS)}); "
                                   "score its dev split with --split val")  # fmt: skip
            return self.test
        raise DatasetError(f"an NLVR2 dataset has splits train, val (dev) and test (test-P), not {name!r}")


def load_nlvr2_splits(dataset: str, root: str | None = None) -> NLVR2Splits:
    """``nlvr2:<folder>``: the splits its folder holds (at least one)."""
    folder = dataset_folder(dataset, root, FORM)
    test_file = next((s for s in TEST_SPLITS if (folder / f"{s}.json").is_file()), "")
    present = [s for s in (TRAIN_SPLIT, VAL_SPLIT) if (folder / f"{s}.json").is_file()]
    present += [test_file] if test_file else []
    if not present:
        raise DatasetError(f"{dataset}: {folder} holds none of train.json, dev.json, test1.json: an NLVR2 folder holds "
                           "<split>.json (JSON lines: identifier, sentence, label) and each split's images")  # fmt: skip
    read = {s: load_nlvr2_split(folder, s) for s in present}
    return NLVR2Splits(name=f"nlvr2_{folder.name}", train=read.get(TRAIN_SPLIT, []), val=read.get(VAL_SPLIT, []),
                       test=read.get(test_file, []), test_file=test_file)  # fmt: skip


class NLVR2Dataset(Dataset):
    """(both images ``(2, 3, H, W)``, token ids, padding mask, label, example index) per statement."""

    def __init__(self, examples: list[NLVR2Example], backbone, transform: Callable) -> None:
        self.examples = examples
        self.transform = transform
        self.input_ids, self.mask = tokens_and_mask(backbone, [e.sentence for e in examples])
        self.labels = torch.tensor([int(e.label) for e in examples], dtype=torch.long)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int):
        pixels = torch.stack([self.transform(open_image(path)) for path in self.examples[i].images])
        return pixels, self.input_ids[i], self.mask[i], self.labels[i], i


@torch.no_grad()
def evaluate_nlvr2(method, loader, accelerator=None, sharded: bool = False) -> dict[str, Any]:
    """Accuracy (%) of the higher logit, with the number of statements (summed over the job's processes)."""
    was_training = method.training
    method.eval()
    device = device_of(method, accelerator)
    correct, seen = 0, 0
    for pixels, ids, mask, labels, _ in loader:
        with autocast_of(accelerator):
            logits = method(ids.to(device), mask.to(device), pixels.to(device))
        correct += int((logits.argmax(-1).cpu() == labels).sum())
        seen += int(labels.shape[0])
    method.train(was_training)
    if sharded:
        correct, seen = distributed.sum_over_processes(torch.tensor([correct, seen], dtype=torch.float64)).tolist()
    if seen == 0:
        raise ValueError("the NLVR2 evaluation split is empty")
    return {"accuracy": 100.0 * correct / seen, "n": int(seen)}


class NLVR2Task(FusionTask):
    name: ClassVar[str] = "nlvr2"
    label: ClassVar[str] = "NLVR2"
    no_shots_because: ClassVar[str] = "its statements are true or false of image pairs"
    dataset_forms: ClassVar[str] = FORM

    def __init__(self, splits: NLVR2Splits, backbone, augment: bool = False, few_shot: bool = False) -> None:
        self.splits = splits
        self._backbone, self._transform = backbone, fusion_transform(backbone)
        self.train_set = NLVR2Dataset(splits.train, backbone, self._transform)
        self.val = NLVR2Dataset(splits.val, backbone, self._transform) if splits.val else None
        self.test = NLVR2Dataset(splits.test, backbone, self._transform) if splits.test else None

    @classmethod
    def read_splits(cls, dataset: str, root: str | None) -> NLVR2Splits:
        return load_nlvr2_splits(dataset, root)

    @property
    def classnames(self) -> list[str]:
        return list(NLVR2_LABELS)

    def run_info(self) -> dict[str, Any]:
        return {"task": "nlvr2", "dataset_name": self.splits.name, "num_train": len(self.splits.train),
                "num_dev": len(self.splits.val), "num_test": len(self.splits.test)}  # fmt: skip

    def check_before_training(self, method) -> None:
        if not self.splits.train and method.num_trainable():
            raise DatasetError(f"{self.splits.name} has no training statements (train.json)")
        if self.test is None and self.val is None:
            raise DatasetError(f"{self.splits.name} has no dev or test statements (dev.json, test1.json) to score")

    def train_dataset(self) -> Dataset:
        return self.train_set

    def make_batch(self, raw) -> NLVR2Batch:
        pixels, ids, mask, labels, _ = raw
        return NLVR2Batch(ids, mask, pixels, labels)

    def record_step(self, output: StepOutput, batch: NLVR2Batch) -> None:
        if output.logits is not None:
            chosen = output.logits.detach().argmax(-1)
            self.count_training(float((chosen == batch.labels.to(chosen.device)).sum()), len(batch))

    def validate(self, method, accelerator, batch_size: int) -> dict[str, float]:
        if self.val is None:
            return {}
        result = evaluate_nlvr2(method, self.eval_loader(self.val, batch_size), accelerator, True)
        return {"val_accuracy": result["accuracy"]}

    def final_metrics(self, method, accelerator, batch_size: int, log) -> dict[str, Any]:
        """Accuracy on test-P, or on dev for a folder without a test split (``split`` says which)."""
        scored, split = (self.test, "test") if self.test is not None else (self.val, "val")
        result = evaluate_nlvr2(method, self.eval_loader(scored, batch_size), accelerator, True)
        # "accuracy" is the run's headline metric wherever runs are compared (bench, eval)
        return {"split": split, "accuracy": result["accuracy"], "n": result["n"]}

    def evaluate_split(self, method, split: str, accelerator, batch_size: int) -> dict[str, Any]:
        examples = self.splits.split(split)
        if not examples:
            wanted = {"train": "train.json", "val": "dev.json", "dev": "dev.json"}.get(split, f"{split}.json")
            raise ValueError(f"split {split!r} of {self.splits.name} is empty: its folder has no {wanted}")
        dataset = NLVR2Dataset(examples, self._backbone, self._transform)
        result = evaluate_nlvr2(method, self.eval_loader(dataset, batch_size), accelerator, True)
        return {"dataset": self.splits.name, "split": split, "accuracy": result["accuracy"], "n": result["n"]}


register_task(NLVR2Task)
