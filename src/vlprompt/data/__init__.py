"""Datasets (CoOp on-disk layout + generic image folders), few-shot sampling and image transforms."""

from .datasets import (
    DATASETS,
    IMAGE_EXTENSIONS,
    DatasetInfo,
    DatasetSplits,
    ImageDataset,
    Sample,
    available_datasets,
    class_names_from_file,
    clean_classname,
    load_dataset,
    open_image,
    read_imagenet_classnames,
    resolve_dataset_name,
    subsample_classes,
)
from .errors import DatasetError
from .fewshot import MAX_VAL_SHOTS, few_shot, few_shot_cache_path
from .transforms import EvalTransform, ImageTransformConfig, TrainTransform, build_transform, pil_to_tensor

__all__ = [
    "DATASETS",
    "IMAGE_EXTENSIONS",
    "MAX_VAL_SHOTS",
    "DatasetError",
    "DatasetInfo",
    "DatasetSplits",
    "EvalTransform",
    "ImageDataset",
    "ImageTransformConfig",
    "Sample",
    "TrainTransform",
    "available_datasets",
    "build_transform",
    "class_names_from_file",
    "clean_classname",
    "few_shot",
    "few_shot_cache_path",
    "load_dataset",
    "open_image",
    "pil_to_tensor",
    "read_imagenet_classnames",
    "resolve_dataset_name",
    "subsample_classes",
]
