"""Training and evaluation of detection methods (Grounding DINO family) on COCO-format data.

The same run folder, resume, seeding and safety rules as classification (``engine/trainer.py``, whose run-folder
and resume machinery this reuses); the loss is the detector's own (Hungarian matching, focal loss over the
prompt's text tokens, L1 + GIoU box losses, two-stage proposal losses); evaluation is COCO box AP (mAP@[.5:.95],
AP50, AP75, in percent) computed by pycocotools.
"""
from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from vlprompt.data.coco import (
    DetectionDataset,
    DetectionImage,
    DetectionSplits,
    coco_ground_truth,
    coco_map,
    collate_detection,
    detections_from_scores,
    few_shot_detection,
    is_detection_dataset,
    load_detection_dataset,
)
from vlprompt.data.errors import DatasetError
from vlprompt.engine import checkpoint as ckpt
from vlprompt.engine.trainer import (
    TrainConfig,
    Trainer,
    TrainingError,
    build_optimizer,
    lr_lambda,
    make_accelerator,
    seed_everything,
)

DETECTION_METHODS_HINT = "sdpt_native, det_coop, det_fusion_prompt, det_heads, det_full, det_lora, det_zeroshot"


def load_detection_splits(data) -> DetectionSplits:
    """The detection dataset of ``data`` (``DataOptions``), few-shot sampled when ``data.shots`` is set."""
    if not is_detection_dataset(data.dataset):
        raise DatasetError(
            f"{data.dataset!r} is not a detection dataset; detection methods train and evaluate on "
            "coco:<folder or json> or toydet:<name> (see docs/detection.md)."
        )
    if getattr(data, "subsample", "all") != "all":
        raise DatasetError("--subsample (base-to-novel) applies to classification datasets; use data.categories.")
    splits = load_detection_dataset(data.dataset, data.root, getattr(data, "categories", None))
    if data.shots is not None:
        splits.train = few_shot_detection(splits.train, data.shots, data.seed, len(splits.categories))
    return splits


@torch.no_grad()
def evaluate_detection(
    method, images: Sequence[DetectionImage], category_ids: Sequence[int], categories: Sequence[str],
    accelerator=None, batch_size: int = 8,
) -> dict[str, Any]:
    """COCO box AP of ``method`` on ``images`` (pycocotools), plus the number of images."""
    if not images:
        raise DatasetError("the evaluation split is empty")
    was_training = method.training
    method.eval()
    dataset = DetectionDataset(images, method.backbone.image_config, augment=False)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_detection)
    device = method.backbone.device
    detections: list[dict] = []
    start = 0
    for pixels, mask, _ in loader:
        with _autocast(accelerator):
            scores, boxes = method.predict(pixels.to(device), mask.to(device))
        for i in range(pixels.shape[0]):
            detections += detections_from_scores(images[start + i], scores[i].float().cpu(), boxes[i].float().cpu(),
                                                 category_ids)
        start += pixels.shape[0]
    method.train(was_training)
    result = coco_map(coco_ground_truth(images, category_ids, categories), detections)
    return {**result, "n": len(images)}


def _autocast(accelerator):
    return accelerator.autocast() if accelerator is not None else torch.autocast("cpu", enabled=False)


class DetectionTrainer(Trainer):
    """``Trainer`` for detection methods: detector loss per batch of images + targets, COCO mAP for validation."""

    def __init__(self, method, splits: DetectionSplits, config: TrainConfig, run_dir: str | Path,
                 run_info: dict[str, Any] | None = None, progress: bool = True,
                 log: Callable[[str], None] = print) -> None:
        super().__init__(method, None, config, run_dir, run_info=run_info, progress=progress, log=log)
        self.splits = splits

    def fit(self, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
        if not self.splits.train and self.method.num_trainable():
            raise DatasetError(f"{self.splits.name} has no training images")
        # COCO AP is undefined without ground truth: find that out now, not after training.
        for split in ("val", "test"):
            images = getattr(self.splits, split)
            if images and not any(not crowd for image in images for crowd in image.crowd):
                raise DatasetError(
                    f"the {split} split of {self.splits.name} has no (non-crowd) annotations of the chosen categories "
                    f"({', '.join(self.splits.categories[:5])}), so its COCO AP is undefined; annotate it, choose "
                    "other data.categories, or point the dataset at a folder whose split has them."
                )
        self._prepare_run_dir(resume, overwrite)
        seed_everything(self.config.seed)
        method = self.method.to(self.accelerator.device)
        if method.num_trainable() == 0:  # zero-shot: evaluate only
            return self._finish_detection(method, {"epoch": 0})
        return self._fit_detection(method, resume)

    def _det_loader(self, images, batch_size: int, shuffle: bool, epoch: int, augment: bool) -> DataLoader:
        generator = torch.Generator()
        generator.manual_seed(self.config.seed * 1000 + epoch)
        dataset = DetectionDataset(images, self.method.backbone.image_config, augment=augment)
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=self.config.num_workers,
                          generator=generator, collate_fn=collate_detection)

    def _evaluate_split(self, method, images) -> dict[str, Any]:
        s = self.splits
        return evaluate_detection(method, images, s.category_ids, s.categories, self.accelerator,
                                  self.config.eval_batch_size)

    def _fit_detection(self, method, resume: bool) -> dict[str, Any]:
        cfg = self.config
        optimizer = build_optimizer(method, cfg)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
        start_epoch = self._load_resume_state(method, optimizer, scheduler) if resume else 0
        method, optimizer = self.accelerator.prepare(method, optimizer)
        core = self.accelerator.unwrap_model(method)
        params = list(core.prompt_parameters().values())
        for epoch in range(start_epoch, cfg.epochs):
            seed_everything(cfg.seed * 1000 + epoch)  # flips: identical after a resume
            method.train()
            epoch_start = time.perf_counter()
            loader = self.accelerator.prepare(self._det_loader(self.splits.train, cfg.batch_size, True, epoch, cfg.augment))
            losses: list[float] = []
            parts: dict[str, list[float]] = {}
            for step, (pixels, mask, targets) in enumerate(self._progress(loader, epoch)):
                def diverged(value) -> TrainingError:
                    return TrainingError(self._divergence_message(f"loss became {value}", epoch, step))

                try:
                    with self.accelerator.autocast():
                        out = method(pixels, mask, labels=targets)
                        loss = out.loss
                except ValueError as err:  # the matcher refuses non-finite boxes before any loss exists
                    if "nan" in str(err).lower() or not all(torch.isfinite(p).all() for p in params):
                        raise diverged("nan") from err
                    raise
                if not torch.isfinite(loss):
                    raise diverged(loss.item())
                optimizer.zero_grad(set_to_none=True)
                self.accelerator.backward(loss)
                if cfg.grad_clip is not None:
                    self.accelerator.clip_grad_norm_(params, cfg.grad_clip)
                optimizer.step()
                losses.append(loss.item())
                for key in ("loss_ce", "loss_bbox", "loss_giou"):
                    if out.loss_dict and key in out.loss_dict:
                        parts.setdefault(key, []).append(float(out.loss_dict[key].detach()))
            scheduler.step()
            if not all(torch.isfinite(p).all() for p in params):
                raise TrainingError(self._divergence_message("the prompt parameters became non-finite", epoch, step))
            record = {
                "epoch": epoch + 1,
                "lr": optimizer.param_groups[0]["lr"],
                "train_loss": float(np.mean(losses)),
                **{k: float(np.mean(v)) for k, v in parts.items()},
                "epoch_time_s": time.perf_counter() - epoch_start,
            }
            if self.splits.val and (epoch + 1) % cfg.validate_every == 0:
                val = self._evaluate_split(core, self.splits.val)
                record.update(val_mAP=val["mAP"], val_AP50=val["AP50"])
            self.history.append(record)
            self._save_resume_state(core, optimizer, scheduler, epoch + 1)
            self._write_metrics()
            self.log(
                f"epoch {epoch + 1}/{cfg.epochs} loss {record['train_loss']:.4f}"
                + (f" val mAP {record['val_mAP']:.2f} AP50 {record['val_AP50']:.2f}" if "val_mAP" in record else "")
            )
        core = self.accelerator.unwrap_model(method, keep_fp32_wrapper=False)  # no autocast left on the model
        return self._finish_detection(core, None)

    def _finish_detection(self, method, record: dict[str, Any] | None) -> dict[str, Any]:
        if record is not None:
            if self.splits.val:
                val = self._evaluate_split(method, self.splits.val)
                record.update(val_mAP=val["mAP"], val_AP50=val["AP50"])
            self.history.append(record)
        # COCO ships no test annotations (instances_test2017.json): its final numbers are then the val split's.
        final_split = "test" if self.splits.test else "val" if self.splits.val else None
        final: dict[str, Any] = {"split": final_split or "test"}
        if final_split is None:
            self.log(f"warning: {self.splits.name} has neither a test nor a val split; no final mAP")
        else:
            if final_split == "val":
                self.log(f"note: {self.splits.name} has no test split; the final mAP is on val")
            result = self._evaluate_split(method, getattr(self.splits, final_split))
            final.update(mAP=result["mAP"], AP50=result["AP50"], AP75=result["AP75"], n=result["n"])
        self.history.append(final)
        if self.accelerator.is_main_process:
            ckpt.save_prompt(self.run_dir, method, extra={"final_metrics": final, "task": "detection"})
            self._write_metrics()
        return final


def train_detection(options, resume: bool = False, overwrite: bool = False, progress: bool = True,
                    log=print) -> dict[str, Any]:
    """``vlprompt train`` for a detection method (``options``: ``engine.api.RunOptions``)."""
    from vlprompt.backbones import load_backbone
    from vlprompt.methods import canonical_method_name, get_prompt_model, is_detection_method, make_config

    name = canonical_method_name(options.method)
    if not is_detection_method(name):
        raise DatasetError(
            f"{options.data.dataset!r} is a detection dataset but {name!r} is a classification method; "
            f"use a detection method ({DETECTION_METHODS_HINT})."
        )
    splits = load_detection_splits(options.data)
    backbone = load_backbone(options.model)
    seed_everything(options.train.seed)  # prompt initialisation is part of the seeded run
    method_config = make_config(name, options.method_options, backbone)
    method = get_prompt_model(backbone, name, splits.categories, splits.template, method_config)
    run_info = {
        "task": "detection",
        "model": options.model,
        "method": name,
        "method_options": method_config.to_dict(),
        "data": asdict(options.data),
        "dataset_name": splits.name,
        "categories": splits.categories,
        "num_train": len(splits.train),
        "train_image_ids": [img.id for img in splits.train] if options.data.shots is not None else None,
    }
    trainer = DetectionTrainer(method, splits, options.train, options.output, run_info=run_info, progress=progress,
                               log=log)
    return trainer.fit(resume=resume, overwrite=overwrite)


def evaluate_detection_checkpoint(run_dir: str | Path, data, split: str = "test", model: str | None = None,
                                  batch_size: int = 8, precision: str = "fp32") -> dict[str, Any]:
    """``vlprompt eval`` of a detection run on any COCO-format dataset / split (its categories become the prompt)."""
    from vlprompt.backbones import load_backbone

    saved = ckpt.read_prompt_config(run_dir)
    if not is_detection_dataset(data.dataset):
        raise DatasetError(
            f"{run_dir} holds a detection prompt ({saved['method']}); evaluate it on a detection dataset: "
            f"--dataset coco:<folder or json> or toydet:<name>."
        )
    splits = load_detection_splits(type(data)(**{**asdict(data), "shots": None}))
    backbone = load_backbone(model or saved["backbone"]["name_or_path"])
    method = ckpt.load_prompt(run_dir, backbone, splits.categories, splits.template)
    accelerator = make_accelerator(precision)
    method = method.to(accelerator.device)
    images = splits.split(split)
    if not images:
        raise DatasetError(f"split {split!r} of {splits.name} is empty; choose another --split")
    result = evaluate_detection(method, images, splits.category_ids, splits.categories, accelerator, batch_size)
    return {"dataset": splits.name, "split": split, "mAP": result["mAP"], "AP50": result["AP50"],
            "AP75": result["AP75"], "n": result["n"]}
