"""High-level jobs shared by the CLI, the benchmarks and users' scripts: train, evaluate, predict."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from vlprompt.backbones import load_backbone
from vlprompt.data import (
    DatasetError,
    DatasetSplits,
    ImageDataset,
    ImageTransformConfig,
    build_transform,
    few_shot,
    load_dataset,
    subsample_classes,
)
from vlprompt.engine import checkpoint as ckpt
from vlprompt.engine.trainer import (
    TrainConfig,
    TrainData,
    Trainer,
    check_precision,
    evaluate,
    make_accelerator,
    seed_everything,
)
from vlprompt.data.coco import is_detection_dataset
from vlprompt.methods import canonical_method_name, get_prompt_model, is_detection_method, make_config

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class DataOptions:
    dataset: str = "toy:shapes"  # the embedded toy suite: runs with no download
    root: str | None = None  # folder holding the datasets; toy:<name> datasets default to the toy cache folder
    shots: int | None = None  # images per class for training; None = the full train split
    seed: int = 1  # few-shot sampling seed
    subsample: str = "all"  # "all" | "base" | "novel" (base-to-novel protocol)
    cache_dir: str | None = None  # few-shot split cache; default <root>/.vlprompt_splits
    categories: list[str] | None = None  # detection: train/evaluate on these category names only (default: all)


@dataclass
class RunOptions:
    model: str = "embedded"  # the shipped toy CLIP (vlprompt/assets): no download
    method: str = "coop"
    method_options: dict[str, Any] = field(default_factory=dict)
    data: DataOptions = field(default_factory=DataOptions)
    train: TrainConfig = field(default_factory=TrainConfig)
    output: str = "runs/default"


def transform_config(backbone) -> ImageTransformConfig:
    if backbone.image_processor is not None:
        return ImageTransformConfig.from_image_processor(backbone.image_processor)
    return ImageTransformConfig(size=backbone.image_size, mean=OPENAI_MEAN, std=OPENAI_STD)


def load_splits(options: DataOptions) -> DatasetSplits:
    splits = load_dataset(options.dataset, options.root)
    splits = subsample_classes(splits, options.subsample)
    if options.shots is not None:
        cache = options.cache_dir or str(Path(options.root or _toy_root()) / ".vlprompt_splits")
        splits = few_shot(splits, options.shots, options.seed, cache_dir=cache)
    return splits


def _toy_root() -> Path:
    from vlprompt.toyworld.suite import default_toy_root

    return default_toy_root()


def build_train_data(splits: DatasetSplits, backbone, augment: bool) -> TrainData:
    tcfg = transform_config(backbone)
    eval_tf = build_transform(tcfg, train=False)
    train_tf = build_transform(tcfg, train=True, augment=augment)
    return TrainData(
        train=ImageDataset(splits.train, train_tf),
        train_eval=ImageDataset(splits.train, eval_tf),
        val=ImageDataset(splits.val, eval_tf) if splits.val else None,
        test=ImageDataset(splits.test, eval_tf) if splits.test else None,
    )


def _run_backbone(model: str | None, saved: dict[str, Any]):
    """The model a run was trained on, or ``model`` instead; the error says how to point at a moved model."""
    from vlprompt.backbones import BackboneLoadError

    if model:
        return load_backbone(model)
    recorded = saved["backbone"]["name_or_path"]
    try:
        return load_backbone(recorded)
    except BackboneLoadError as err:
        raise BackboneLoadError(f"{err} (the model this run was trained on, as recorded in its prompt_config.json; "
                                "if it moved, pass --model <its folder>)") from err


def train(options: RunOptions, resume: bool = False, overwrite: bool = False, progress: bool = True, log=print) -> dict[str, Any]:
    """Train ``options.method`` on ``options.data`` and write the run folder; returns the final test metrics."""
    canonical_method_name(options.method)  # fail on a typo before any loading
    check_precision(options.train.precision)  # and on fp16 without a GPU
    if is_detection_method(options.method) or is_detection_dataset(options.data.dataset):
        from vlprompt.engine.detection import train_detection  # COCO-format data, detector losses, COCO mAP

        return train_detection(options, resume=resume, overwrite=overwrite, progress=progress, log=log)
    splits = load_splits(options.data)
    backbone = load_backbone(options.model)
    seed_everything(options.train.seed)  # prompt initialisation is part of the seeded run
    method_config = make_config(options.method, options.method_options, backbone)
    method = get_prompt_model(backbone, options.method, splits.classnames, splits.template, method_config)
    if not splits.train and (method.num_trainable() > 0 or getattr(method, "fits_features", False)):
        raise DatasetError(
            f"{splits.name} has no training images (a test-only dataset such as a domain-shift variant): train on its "
            f"source dataset, then `vlprompt eval RUN --dataset {options.data.dataset}`."
        )
    data = build_train_data(splits, backbone, options.train.augment)
    run_info = {
        "model": options.model,
        "method": canonical_method_name(options.method),
        "method_options": method_config.to_dict(),
        "data": asdict(options.data),
        "dataset_name": splits.name,
        "num_train": len(splits.train),
    }
    trainer = Trainer(method, data, options.train, options.output, run_info=run_info, progress=progress, log=log)
    return trainer.fit(resume=resume, overwrite=overwrite)


def evaluate_checkpoint(
    run_dir: str | Path,
    data: DataOptions,
    split: str = "test",
    model: str | None = None,
    batch_size: int = 64,
    precision: str = "fp32",
) -> dict[str, Any]:
    """Evaluate a saved prompt on any dataset / split (cross-dataset and domain-shift evaluation).

    ``precision`` "bf16" (or "fp16" on a GPU) runs the forward passes under autocast, as training does.
    """
    check_precision(precision)
    saved = ckpt.read_prompt_config(run_dir)
    if saved.get("task") == "detection":
        from vlprompt.engine.detection import evaluate_detection_checkpoint

        return evaluate_detection_checkpoint(run_dir, data, split, model, batch_size, precision)
    if is_detection_dataset(data.dataset):
        raise DatasetError(f"{data.dataset!r} is a detection dataset, but {run_dir} holds a classification prompt "
                           f"({saved.get('method')}); evaluate it on a classification dataset.")
    backbone = _run_backbone(model, saved)
    splits = load_splits(data)
    method = ckpt.load_prompt(run_dir, backbone, splits.classnames, splits.template)
    samples = splits.split(split)
    if not samples:
        raise ValueError(f"split {split!r} of {splits.name} is empty; choose another --split")
    dataset = ImageDataset(samples, build_transform(transform_config(backbone), train=False))
    accelerator = make_accelerator(precision)
    method = method.to(accelerator.device)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    result = evaluate(method, loader, accelerator)
    return {"dataset": splits.name, "split": split, "accuracy": result["accuracy"], "n": result["n"]}


@torch.no_grad()
def predict(
    run_dir: str | Path,
    images: list[str | Path],
    k: int = 5,
    model: str | None = None,
    classnames: list[str] | None = None,
) -> list[dict[str, Any]]:
    """Top-k labels and probabilities for image files."""
    from vlprompt.data import Sample

    saved = ckpt.read_prompt_config(run_dir)
    if saved.get("task") == "detection":
        raise ValueError(
            f"{run_dir} holds a detection prompt; score it with `vlprompt eval {run_dir} --dataset coco:<path>`."
        )
    backbone = _run_backbone(model, saved)
    method = ckpt.load_prompt(run_dir, backbone, classnames)
    method.eval()
    samples = [Sample(path=Path(p).resolve(), label=0, classname="") for p in images]
    for sample in samples:
        if not sample.path.exists():
            raise FileNotFoundError(f"image {sample.path} does not exist")
    dataset = ImageDataset(samples, build_transform(transform_config(backbone), train=False))
    text_feats = None if method.fits_features else method.text_features()
    out = []
    k = min(k, len(method.classnames))
    for sample, (pixels, _) in zip(samples, dataset):
        probs = method(pixel_values=pixels.unsqueeze(0), text_feats=text_feats).softmax(-1)[0]
        top = probs.topk(k)
        out.append(
            {
                "image": str(sample.path),
                "top": [
                    {"label": method.classnames[i], "probability": float(p)}
                    for p, i in zip(top.values.tolist(), top.indices.tolist())
                ],
            }
        )
    return out
