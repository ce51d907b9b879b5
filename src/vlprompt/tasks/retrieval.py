"""Image-text retrieval on a fusion encoder: Karpathy's split files (data/retrieval.py), a matching score per
text-image pair, recall at 1/5/10 both ways.

A dataset is ``retrieval:<folder>`` holding ``dataset_flickr30k.json`` or ``dataset_coco.json`` and the images.
``train`` (with COCO's ``restval``, as ViLT and METER train) trains, ``val`` validates and ``test`` is the scored split
(a folder without test images scores val). Images are resized to the model's square input and normalised as ViLT's
(0.5 per channel), not augmented (captions say "left" and "right").

- **Training** follows ViLT's image-text matching recipe: every (image, caption) pair of the training split is one
  sample, ranked against K captions of other images drawn at random (uniformly over the split's captions, with
  replacement; seeded per sample and epoch, so every process and a resumed run draw the same) by cross-entropy over
  the K + 1 scores (methods/fusion.py). K is the method's ``negatives`` option: ViLT uses 15, the default 7 keeps a
  CPU step small (``--set method.negatives=15`` for the release's).
- **Evaluation** scores every image with every caption of the split (a fusion encoder has no separate features:
  one forward pass per pair), ``batch_size`` pairs at a time, each process scoring its block of images; recall at
  k from :func:`vlprompt.data.retrieval.recall_at_k`: image-to-text (``i2t_r1/5/10``: one of the image's captions
  in its top k) and text-to-image (``t2i_r1/5/10``). The run's headline ``accuracy`` is the mean of the two R@1
  (``(i2t_r1 + t2i_r1) / 2``); all six recalls are recorded. Validation after an epoch scores the first
  ``VALIDATION_IMAGES`` val images with their captions (all pairs grow as images x captions: Flickr30K's 1K val
  images are 5M pairs); ``vlprompt eval --split val`` scores the whole split.
- There are no classes to sample shots of: ``--shots`` is refused. The method's class names are
  ``RETRIEVAL_LABELS`` (its one output, the matching score).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
from torch.utils.data import Dataset

from vlprompt.data import DatasetError, open_image
from vlprompt.data.retrieval import RetrievalImage, load_retrieval_split, recall_at_k, retrieval_splits
from vlprompt.engine import distributed
from vlprompt.tasks.base import autocast_of, device_of, register_task
from vlprompt.tasks.batches import RETRIEVAL_LABELS, RETRIEVAL_NEGATIVES, RetrievalBatch, StepOutput
from vlprompt.tasks.fusion_inputs import FusionTask, dataset_folder, fusion_transform, tokens_and_mask

SPLITS = ("train", "val", "test")
FORM = "retrieval:<a folder with Karpathy's dataset_flickr30k.json or dataset_coco.json and the images>"
VALIDATION_IMAGES = 100  # val images (with their captions) scored after an epoch


@dataclass
class RetrievalSplits:
    name: str
    train: list[RetrievalImage] = field(default_factory=list)
    val: list[RetrievalImage] = field(default_factory=list)
    test: list[RetrievalImage] = field(default_factory=list)

    def split(self, name: str) -> list[RetrievalImage]:
        if name not in SPLITS:
            raise DatasetError(f"a retrieval dataset has splits train, val and test, not {name!r}")
        return getattr(self, name)


def load_retrieval_splits(dataset: str, root: str | None = None) -> RetrievalSplits:
    """``retrieval:<folder>``: the train (+ restval), val and test images its split file has (at least one)."""
    folder = dataset_folder(dataset, root, FORM)
    present = retrieval_splits(folder)
    read = {s: load_retrieval_split(folder, s) for s in SPLITS if s in present}
    if not read:
        raise DatasetError(f"{dataset}: the split file in {folder} has no train, val or test images (its splits: "
                           f"{sorted(present)})")  # fmt: skip
    return RetrievalSplits(name=f"retrieval_{folder.name}", **read)


@dataclass
class Captions:
    """Every caption of a list of images, image by image: ``image[j]`` is caption j's image, ``first[i]`` / ``count[i]``
    image i's captions."""

    texts: list[str]
    image: torch.Tensor
    first: list[int]
    count: list[int]

    @classmethod
    def of(cls, images: list[RetrievalImage]) -> "Captions":
        texts, owner, first, count = [], [], [], []
        for i, image in enumerate(images):
            first.append(len(texts))
            count.append(len(image.captions))
            texts.extend(image.captions)
            owner.extend([i] * len(image.captions))
        return cls(texts, torch.tensor(owner, dtype=torch.long), first, count)


class RetrievalTrainSet(Dataset):
    """One sample per (image, caption) pair: (pixels, token ids and mask ``(1 + K, T)`` of the caption and K captions
    of other images, caption index). Negatives are drawn from torch's generator, which the trainer seeds per sample
    and epoch."""

    def __init__(self, images: list[RetrievalImage], backbone, transform: Callable, negatives: int) -> None:
        self.images = images
        self.transform = transform
        self.negatives = negatives
        self.captions = Captions.of(images)
        self.input_ids, self.mask = tokens_and_mask(backbone, self.captions.texts)

    def __len__(self) -> int:
        return len(self.captions.texts)

    def __getitem__(self, j: int):
        caps = self.captions
        i = int(caps.image[j])
        others = len(caps.texts) - caps.count[i]
        draws = torch.randint(0, others, (self.negatives,))
        draws = draws + (draws >= caps.first[i]).long() * caps.count[i]  # skip image i's own captions
        chosen = torch.cat([torch.tensor([j]), draws])
        return self.transform(open_image(self.images[i].path)), self.input_ids[chosen], self.mask[chosen], j


@torch.no_grad()
def score_all_pairs(method, images: list[RetrievalImage], backbone, transform: Callable, batch_size: int,
                    accelerator=None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The matching scores ``(images, captions)`` of every image with every caption of ``images``, and each caption's
    image. Pairs go ``batch_size`` at a time, image-major; each process scores its block of images and the rows are
    gathered in order (every process returns the whole matrix)."""
    captions = Captions.of(images)
    ids, mask = tokens_and_mask(backbone, captions.texts)
    n_captions = len(captions.texts)
    block = list(distributed.block_of(len(images)))
    was_training = method.training
    method.eval()
    device = device_of(method, accelerator)
    local = torch.empty(len(block) * n_captions)
    decoded: dict[int, torch.Tensor] = {}  # the images of the current batch of pairs, decoded once
    for start in range(0, local.numel(), batch_size):
        pairs = torch.arange(start, min(start + batch_size, local.numel()))
        rows, cols = (pairs // n_captions).tolist(), pairs % n_captions
        for row in dict.fromkeys(rows):
            if row not in decoded:
                decoded[row] = transform(open_image(images[block[row]].path))
        for row in [r for r in decoded if r < rows[0]]:
            del decoded[row]
        pixels = torch.stack([decoded[row] for row in rows])
        with autocast_of(accelerator):
            scores = method(ids[cols].to(device), mask[cols].to(device), pixels.to(device))
        local[start:start + len(rows)] = scores.float().cpu()
    method.train(was_training)
    matrix = distributed.gather_blocks(local.view(len(block), n_captions) if block else None)
    return matrix, captions.image


def retrieval_metrics(method, images: list[RetrievalImage], backbone, transform: Callable, batch_size: int,
                      accelerator=None) -> dict[str, Any]:  # fmt: skip
    """R@1/5/10 both ways, their headline (the mean of the two R@1) and the split's size."""
    if not images:
        raise ValueError("the retrieval evaluation split is empty")
    scores, caption_image = score_all_pairs(method, images, backbone, transform, batch_size, accelerator)
    recalls = recall_at_k(scores, caption_image)
    return {"accuracy": (recalls["i2t_r1"] + recalls["t2i_r1"]) / 2, **recalls, "n": len(images),
            "n_captions": int(caption_image.numel())}  # fmt: skip


class RetrievalTask(FusionTask):
    name: ClassVar[str] = "retrieval"
    label: ClassVar[str] = "retrieval"
    no_shots_because: ClassVar[str] = "images are ranked against captions"
    dataset_forms: ClassVar[str] = FORM

    def __init__(self, splits: RetrievalSplits, backbone, augment: bool = False, few_shot: bool = False) -> None:
        self.splits = splits
        self._backbone, self._transform = backbone, fusion_transform(backbone)
        self.negatives = RETRIEVAL_NEGATIVES  # until the method says (prepare_training)
        self._train_set: RetrievalTrainSet | None = None

    @classmethod
    def read_splits(cls, dataset: str, root: str | None) -> RetrievalSplits:
        return load_retrieval_splits(dataset, root)

    @property
    def classnames(self) -> list[str]:
        return list(RETRIEVAL_LABELS)

    def run_info(self) -> dict[str, Any]:
        return {"task": "retrieval", "dataset_name": self.splits.name, "num_train": len(self.splits.train),
                "num_val": len(self.splits.val), "num_test": len(self.splits.test)}  # fmt: skip

    def check_before_training(self, method) -> None:
        if method.num_trainable() and len(self.splits.train) < 2:
            raise DatasetError(f"{self.splits.name} has {len(self.splits.train)} training image(s): retrieval trains "
                               "each caption against captions of other images, so it needs at least two")  # fmt: skip
        if not self.splits.test and not self.splits.val:
            raise DatasetError(f"{self.splits.name} has no val or test images to score")

    def prepare_training(self, method, accelerator, eval_batch_size: int) -> None:
        # K is the method's option (the fusion methods' ``negatives``, FusionConfig): its loss ranks what it asks for
        self.negatives = int(method.config.negatives)

    def train_dataset(self) -> Dataset:
        if self._train_set is None or self._train_set.negatives != self.negatives:
            self._train_set = RetrievalTrainSet(self.splits.train, self._backbone, self._transform, self.negatives)
        return self._train_set

    def make_batch(self, raw) -> RetrievalBatch:
        pixels, ids, mask, _ = raw
        return RetrievalBatch(ids, mask, pixels)

    def record_step(self, output: StepOutput, batch: RetrievalBatch) -> None:
        if output.logits is not None:  # the positive caption scored highest among its 1 + K
            self.count_training(float((output.logits.detach().argmax(-1) == 0).sum()), len(batch))

    def _metrics(self, method, images, accelerator, batch_size: int) -> dict[str, Any]:
        return retrieval_metrics(method, images, self._backbone, self._transform, batch_size, accelerator)

    def validate(self, method, accelerator, batch_size: int) -> dict[str, float]:
        if not self.splits.val:
            return {}
        result = self._metrics(method, self.splits.val[:VALIDATION_IMAGES], accelerator, batch_size)
        return {"val_accuracy": result["accuracy"], "val_i2t_r1": result["i2t_r1"], "val_t2i_r1": result["t2i_r1"]}

    def final_metrics(self, method, accelerator, batch_size: int, log) -> dict[str, Any]:
        """Recalls on test (on val for a folder without test images; ``split`` says which)."""
        images, split = (self.splits.test, "test") if self.splits.test else (self.splits.val, "val")
        method.warn_if_untrained()
        n_captions = sum(len(image.captions) for image in images)
        log(f"scoring {len(images)} {split} images x {n_captions} captions ({len(images) * n_captions} pairs)")
        return {"split": split, **self._metrics(method, images, accelerator, batch_size)}

    def evaluate_split(self, method, split: str, accelerator, batch_size: int) -> dict[str, Any]:
        images = self.splits.split(split)
        if not images:
            raise ValueError(f"split {split!r} of {self.splits.name} has no images")
        method.warn_if_untrained()
        return {"dataset": self.splits.name, "split": split, **self._metrics(method, images, accelerator, batch_size)}


register_task(RetrievalTask)
