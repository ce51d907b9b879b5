"""Dataset readers for the CoOp on-disk layout (see specs/datasets.md), plus a generic image-folder reader.

Every reader returns a :class:`DatasetSplits` of :class:`Sample` records (absolute path, label, class name).
Readers never open images and stat only a handful of files, so loading even SUN397 / ImageNet is cheap;
broken image files surface later, in :class:`ImageDataset`, as a :class:`DatasetError` naming the file.
"""

from __future__ import annotations

import json
import math
import os
import random
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from .errors import DatasetError

__all__ = [
    "DATASETS",
    "IMAGE_EXTENSIONS",
    "DatasetInfo",
    "DatasetSplits",
    "ImageDataset",
    "Sample",
    "available_datasets",
    "class_names_from_file",
    "clean_classname",
    "load_dataset",
    "open_image",
    "read_imagenet_classnames",
    "resolve_dataset_name",
    "subsample_classes",
]

SPLITS: tuple[str, ...] = ("train", "val", "test")
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
)
IMAGENET_TEMPLATE = "a photo of a {}."
IMAGEFOLDER_TEMPLATE = "a photo of a {}."
# Seeded split ratios for a flat <path>/<class>/* image folder, and the val share carved from train otherwise.
IMAGEFOLDER_RATIOS: tuple[float, float, float] = (0.7, 0.1, 0.2)
IMAGEFOLDER_VAL_FRACTION = 0.2
IMAGEFOLDER_SEED = 0


# --------------------------------------------------------------------------------------------------- records
@dataclass(frozen=True)
class Sample:
    path: Path  # absolute path to the image file
    label: int
    classname: str


@dataclass
class DatasetSplits:
    """A dataset's class list, prompt template and its three splits.

    Convention for datasets without a separate validation set (ImageNet, like CoOp): ``val`` is the same list
    of samples as ``test``. Test-only datasets (ImageNetV2/Sketch/A/R) have empty ``train`` and ``val``.
    """

    name: str  # canonical dataset name, e.g. "eurosat" (or "eurosat[base]" after subsample_classes)
    classnames: list[str]  # index = label
    template: str  # e.g. "a centered satellite photo of {}."
    train: list[Sample]
    val: list[Sample]
    test: list[Sample]

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def split(self, name: str) -> list[Sample]:
        if name not in SPLITS:
            raise DatasetError(f"unknown split {name!r}: use one of {', '.join(SPLITS)}")
        samples: list[Sample] = getattr(self, name)
        return samples


Loader = Callable[["DatasetInfo", Path], DatasetSplits]


@dataclass(frozen=True)
class DatasetInfo:
    """Registry entry: where a dataset lives under the data root and how to read it."""

    name: str  # canonical lower-case key
    display: str  # human name used in messages, e.g. "EuroSAT"
    folder: str  # folder under the data root ("" for imagefolder: the path given is the dataset)
    template: str
    layout: str  # what the folder must contain, for error messages
    loader: Loader = field(repr=False, compare=False)
    image_dir: str | None = None  # split-JSON datasets: image folder inside `folder` ("" = the folder itself)
    split_file: str | None = None  # split-JSON datasets: split file inside `folder`

    def load(self, root: str | Path) -> DatasetSplits:
        return self.loader(self, _abspath(root))


# --------------------------------------------------------------------------------------------------- helpers
def _abspath(path: str | Path) -> Path:
    # abspath (not resolve) keeps the user's symlinked layout visible in paths and messages.
    return Path(os.path.abspath(Path(path).expanduser()))


def clean_classname(name: str) -> str:
    """CoOp writes some class names with underscores ("Apply_Eye_Makeup") and always replaces them by spaces
    before prompting; doing it once here means every prompt builder sees natural-language names."""
    return " ".join(name.replace("_", " ").split())


def _dataset_dir(info: DatasetInfo, root: Path) -> Path:
    hint = f"Pass --data-root pointing at the folder that contains {info.folder}/."
    if not root.is_dir():
        raise DatasetError(f"data root {root} does not exist or is not a folder. {hint}")
    base = root / info.folder
    if not base.is_dir():
        raise DatasetError(
            f"{info.display} not found: expected folder {base} with {info.layout} (the CoOp layout). {hint}"
        )
    return base


def _require_dir(path: Path, info: DatasetInfo, what: str) -> Path:
    if not path.is_dir():
        raise DatasetError(
            f"{info.display}: {what} folder {path} is missing; the {info.folder}/ folder must contain "
            f"{info.layout} (the CoOp layout). Extract the images there unchanged."
        )
    return path


def _require_file(path: Path, info: DatasetInfo, what: str) -> Path:
    if not path.is_file():
        raise DatasetError(
            f"{info.display}: {what} {path} is missing; expected {info.layout} (the CoOp layout). "
            f"Download it (CoOp's DATASETS.md links every split file) and put it at that path."
        )
    return path


def _is_image(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _list_images(folder: Path) -> list[Path]:
    """Image files directly inside `folder`, sorted by name so listings are identical on every machine."""
    with os.scandir(folder) as it:
        names = [e.name for e in it if _is_image(e.name) and e.is_file()]
    return [folder / n for n in sorted(names)]


def _list_subdirs(folder: Path) -> list[str]:
    with os.scandir(folder) as it:
        return sorted(e.name for e in it if not e.name.startswith(".") and e.is_dir())


def _read_lines(path: Path) -> list[tuple[int, str]]:
    """Non-blank stripped lines with their 1-based line numbers (for error messages)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path} is not UTF-8 text ({e}); replace it with the original file.") from e
    return [(i, line.strip()) for i, line in enumerate(text.splitlines(), 1) if line.strip()]


def _check_exists(samples: Sequence[Sample], info: DatasetInfo, split: str, source: Path) -> None:
    # Only the first item is checked: stat-ing 100k SUN397 files would make loading slow, and a wrong image
    # folder or a split file for another release already shows up on the first item.
    if samples and not samples[0].path.exists():
        raise DatasetError(
            f"{info.display}: image {samples[0].path}, listed first in the {split!r} split of {source}, does not "
            f"exist; the image folder and the split file may not match (check that the images were extracted "
            f"into the expected folder and that the split file belongs to this dataset)."
        )


# --------------------------------------------------------------------------------------------- split-JSON
def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path} is not valid JSON ({e}); re-download the split file.") from e


def _parse_split_items(data: Any, split: str, path: Path) -> list[tuple[str, int, str]]:
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected a JSON object with keys train/val/test; re-download the split file.")
    if split not in data:
        if split == "val":  # tolerate hand-made split files without a validation set
            return []
        raise DatasetError(f"{path}: missing the {split!r} key; expected keys train/val/test.")
    items = data[split]
    if not isinstance(items, list):
        raise DatasetError(f"{path}: {split!r} must be a list of [relative_image_path, label, classname].")
    parsed: list[tuple[str, int, str]] = []
    for i, item in enumerate(items):
        ok = (
            isinstance(item, (list, tuple))
            and len(item) == 3
            and isinstance(item[0], str)
            and isinstance(item[1], int)
            and not isinstance(item[1], bool)
            and isinstance(item[2], str)
        )
        if not ok:
            raise DatasetError(
                f"{path}: item {i} of {split!r} is {item!r}; expected [relative_image_path, label, classname]. "
                f"The split file is malformed: re-download it."
            )
        parsed.append((item[0], item[1], item[2]))
    return parsed


def _classnames_from_labels(pairs: Iterable[tuple[int, str]], source: Path) -> list[str]:
    """label -> name table from (label, name) pairs; labels must be 0..n-1 and each must have one name."""
    names: dict[int, str] = {}
    for label, name in pairs:
        known = names.setdefault(label, name)
        if known != name:
            raise DatasetError(
                f"{source}: label {label} is used for two class names ({known!r} and {name!r}); the split file "
                f"is inconsistent: re-download it or fix the labels."
            )
    if not names:
        raise DatasetError(f"{source}: contains no items; re-download the split file.")
    missing = sorted(set(range(len(names))) - names.keys())
    if missing:
        extra = sorted(set(names) - set(range(len(names))))
        raise DatasetError(
            f"{source}: labels must be contiguous 0..{len(names) - 1} (one per class), but labels {missing[:5]} "
            f"are missing and {extra[:5]} are out of range; the split file is inconsistent: re-download it."
        )
    return [clean_classname(names[i]) for i in range(len(names))]


def _load_split_json(info: DatasetInfo, root: Path) -> DatasetSplits:
    assert info.image_dir is not None and info.split_file is not None
    base = _dataset_dir(info, root)
    image_dir = base / info.image_dir if info.image_dir else base
    if not image_dir.is_dir():
        raise DatasetError(
            f"{info.display}: image folder {image_dir} is missing; expected {info.layout} (the CoOp layout). "
            f"Extract the images into {image_dir}."
        )
    split_path = _require_file(base / info.split_file, info, "split file")
    data = _read_json(split_path)
    raw = {s: _parse_split_items(data, s, split_path) for s in SPLITS}
    classnames = _classnames_from_labels(((lb, n) for s in SPLITS for _, lb, n in raw[s]), split_path)
    splits = {
        s: [Sample(image_dir / rel, label, classnames[label]) for rel, label, _ in raw[s]] for s in SPLITS
    }
    for s in SPLITS:
        _check_exists(splits[s], info, s, split_path)
    return DatasetSplits(info.name, classnames, info.template, splits["train"], splits["val"], splits["test"])


# ---------------------------------------------------------------------------------------------- ImageNet
def read_imagenet_classnames(path: str | Path) -> list[tuple[str, str]]:
    """Parse ImageNet's classnames.txt: lines ``wnid class name with spaces``, label = line order."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"ImageNet class file {path} is missing; expected lines 'wnid classname'.")
    entries: list[tuple[str, str]] = []
    seen: set[str] = set()
    for lineno, line in _read_lines(path):
        parts = line.split(maxsplit=1)
        if len(parts) != 2:
            raise DatasetError(f"{path}:{lineno}: expected 'wnid classname', got {line!r}; fix or re-download it.")
        wnid, name = parts
        if wnid in seen:
            raise DatasetError(f"{path}:{lineno}: wnid {wnid} listed twice; fix or re-download the file.")
        seen.add(wnid)
        entries.append((wnid, clean_classname(name)))
    if not entries:
        raise DatasetError(f"{path} is empty; expected 1000 lines 'wnid classname'.")
    return entries


def class_names_from_file(path: str | Path) -> list[str]:
    """Class names from a text file: one per line, or ``wnid classname`` lines (ImageNet style) when every
    line's first token looks like a WordNet id (n + 8 digits)."""
    lines = [line for _, line in _read_lines(Path(path))]
    if lines and all(_looks_like_wnid(line.split()[0]) and len(line.split()) > 1 for line in lines):
        return [name for _, name in read_imagenet_classnames(path)]
    return [clean_classname(line) for line in lines]


def _looks_like_wnid(token: str) -> bool:
    return len(token) == 9 and token[0] == "n" and token[1:].isdigit()


def _imagenet_classnames(info: DatasetInfo, base: Path, root: Path) -> list[tuple[str, str]]:
    # The shifted ImageNet variants reuse ImageNet's class file; a copy inside their own folder wins so they
    # can be used without the (large) ImageNet folder present.
    candidates = [base / "classnames.txt", root / "imagenet" / "classnames.txt"]
    for c in candidates:
        if c.is_file():
            return read_imagenet_classnames(c)
    raise DatasetError(
        f"{info.display} needs ImageNet's classnames.txt (lines 'wnid classname'): expected "
        f"{candidates[1]} or {candidates[0]}. Copy CoOp's imagenet/classnames.txt to one of them."
    )


def _samples_by_wnid(
    folder: Path, entries: Sequence[tuple[str, str]], info: DatasetInfo, require_all: bool
) -> list[Sample]:
    """Samples from ``folder/<wnid>/*``; label = position of the wnid in `entries`."""
    present = set(_list_subdirs(folder))
    known = {wnid for wnid, _ in entries}
    unknown = sorted(present - known)
    if unknown:
        raise DatasetError(
            f"{info.display}: {folder} has class folders not in classnames.txt ({', '.join(unknown[:5])}); "
            f"expected one folder per ImageNet wnid. Use the classnames.txt that matches these images."
        )
    if require_all:
        missing = [w for w, _ in entries if w not in present]
        if missing:
            raise DatasetError(
                f"{info.display}: {len(missing)} class folders are missing under {folder} "
                f"(e.g. {', '.join(missing[:5])}); expected {folder}/<wnid>/ for every line of classnames.txt. "
                f"The images may be incompletely extracted."
            )
    samples: list[Sample] = []
    for label, (wnid, name) in enumerate(entries):
        if wnid in present:
            samples += [Sample(p, label, name) for p in _list_images(folder / wnid)]
    return samples


def _load_imagenet(info: DatasetInfo, root: Path) -> DatasetSplits:
    base = _dataset_dir(info, root)
    entries = read_imagenet_classnames(_require_file(base / "classnames.txt", info, "class file"))
    train = _samples_by_wnid(_require_dir(base / "images" / "train", info, "train"), entries, info, True)
    test = _samples_by_wnid(_require_dir(base / "images" / "val", info, "val"), entries, info, True)
    # CoOp evaluates on the official val set and has no separate validation split: val = test by convention.
    return DatasetSplits(info.name, [n for _, n in entries], info.template, train, list(test), test)


def _load_imagenetv2(info: DatasetInfo, root: Path) -> DatasetSplits:
    base = _dataset_dir(info, root)
    entries = _imagenet_classnames(info, base, root)
    folder = _require_dir(base / "imagenetv2-matched-frequency-format-val", info, "image")
    dirs = _list_subdirs(folder)
    bad = [d for d in dirs if not (d.isdigit() and int(d) < len(entries))]
    if bad:
        raise DatasetError(
            f"{info.display}: {folder} must contain folders named by label index 0..{len(entries) - 1}, found "
            f"{', '.join(bad[:5])}; use the 'matched-frequency-format-val' release unchanged."
        )
    test: list[Sample] = []
    for label in sorted(int(d) for d in dirs):
        name = entries[label][1]
        test += [Sample(p, label, name) for p in _list_images(folder / str(label))]
    return DatasetSplits(info.name, [n for _, n in entries], info.template, [], [], test)


def _load_imagenet_sketch(info: DatasetInfo, root: Path) -> DatasetSplits:
    base = _dataset_dir(info, root)
    entries = _imagenet_classnames(info, base, root)
    test = _samples_by_wnid(_require_dir(base / "images", info, "image"), entries, info, False)
    return DatasetSplits(info.name, [n for _, n in entries], info.template, [], [], test)


def _imagenet_subset_loader(subdir: str) -> Loader:
    """ImageNet-A/R hold 200 of the 1000 classes: keep the wnids present, in ImageNet order, relabelled 0..n-1,
    so logits are computed over those 200 class names only (the standard protocol)."""

    def load(info: DatasetInfo, root: Path) -> DatasetSplits:
        base = _dataset_dir(info, root)
        entries = _imagenet_classnames(info, base, root)
        folder = _require_dir(base / subdir, info, "image")
        present = set(_list_subdirs(folder))
        subset = [(w, n) for w, n in entries if w in present]
        if not subset:
            raise DatasetError(
                f"{info.display}: no class folders found under {folder}; expected {folder}/<wnid>/ folders."
            )
        test = _samples_by_wnid(folder, subset, info, True)
        return DatasetSplits(info.name, [n for _, n in subset], info.template, [], [], test)

    return load


# ------------------------------------------------------------------------------------------ FGVC Aircraft
def _load_fgvc_aircraft(info: DatasetInfo, root: Path) -> DatasetSplits:
    base = _dataset_dir(info, root)
    image_dir = _require_dir(base / "images", info, "image")
    variants_file = _require_file(base / "variants.txt", info, "class file")
    classnames = [name for _, name in _read_lines(variants_file)]
    if not classnames:
        raise DatasetError(f"{variants_file} is empty; expected one aircraft variant per line.")
    label_of = {name: i for i, name in enumerate(classnames)}
    splits: dict[str, list[Sample]] = {}
    for s in SPLITS:
        split_file = _require_file(base / f"images_variant_{s}.txt", info, "split file")
        samples: list[Sample] = []
        for lineno, line in _read_lines(split_file):
            parts = line.split(maxsplit=1)
            if len(parts) != 2 or parts[1] not in label_of:
                raise DatasetError(
                    f"{split_file}:{lineno}: expected 'imageid variant' with a variant from {variants_file}, got "
                    f"{line!r}; the split files and variants.txt may come from different releases."
                )
            samples.append(Sample(image_dir / f"{parts[0]}.jpg", label_of[parts[1]], clean_classname(parts[1])))
        _check_exists(samples, info, s, split_file)
        splits[s] = samples
    names = [clean_classname(n) for n in classnames]
    return DatasetSplits(info.name, names, info.template, splits["train"], splits["val"], splits["test"])


# ------------------------------------------------------------------------------------------- image folder
def _folder_classes(folder: Path) -> list[str]:
    classes = _list_subdirs(folder)
    if not classes:
        raise DatasetError(
            f"no class folders found in {folder}: an image-folder dataset must be laid out as "
            f"<path>/<class>/*.jpg or <path>/{{train,val,test}}/<class>/*.jpg."
        )
    return classes


def _folder_images(folder: Path, classes: Sequence[str], strict: bool) -> list[list[Path]]:
    """Per-class image lists for ``folder/<class>/*``; a class folder absent from a split is an empty list."""
    unknown = sorted(set(_list_subdirs(folder)) - set(classes))
    train_files = [name for name in unknown if (folder.parent / "train" / name).is_file()]
    if train_files:
        raise DatasetError(f"{folder.parent / 'train' / train_files[0]} is a file, not a class folder; every split "
                           f"holds <class>/ folders of images: make it a folder or remove it.")  # fmt: skip
    if unknown:
        raise DatasetError(
            f"{folder} has class folders that are not in train/ ({', '.join(unknown[:5])}); every split must "
            f"use the class folder names of train/."
        )
    out: list[list[Path]] = []
    for c in classes:
        images = _list_images(folder / c) if (folder / c).is_dir() else []
        if strict and not images:
            raise DatasetError(
                f"class folder {folder / c} contains no images ({', '.join(sorted(IMAGE_EXTENSIONS))}); "
                f"add images or remove the folder."
            )
        out.append(images)
    return out


def _seeded_partition(paths: list[Path], fractions: Sequence[float], seed: int) -> list[list[Path]]:
    """Shuffle `paths` with `seed`; return [rest, part_1, ..., part_k] where part_i holds round(f_i * n)
    images and `rest` the remainder (kept non-empty, so no class vanishes from train). Parts are sorted."""
    shuffled = list(paths)
    random.Random(seed).shuffle(shuffled)
    counts = [round(f * len(shuffled)) for f in fractions]
    while counts and sum(counts) >= len(shuffled) and sum(counts) > 0:
        counts[counts.index(max(counts))] -= 1  # give one back to train
    parts, start = [], len(shuffled) - sum(counts)
    rest = sorted(shuffled[:start])
    for n in counts:
        parts.append(sorted(shuffled[start : start + n]))
        start += n
    return [rest, *parts]


def _to_samples(per_class: Sequence[Sequence[Path]], names: Sequence[str]) -> list[Sample]:
    return [Sample(p, label, names[label]) for label, paths in enumerate(per_class) for p in paths]


def _load_imagefolder(info: DatasetInfo, path: Path) -> DatasetSplits:
    if not path.is_dir():
        raise DatasetError(
            f"image folder {path} does not exist; pass imagefolder:<path> with <path>/<class>/*.jpg or "
            f"<path>/{{train,val,test}}/<class>/*.jpg."
        )
    name = f"imagefolder_{path.name or 'root'}"
    # train/ holding class folders is the split layout; a class that is itself called "train" holds images.
    if (path / "train").is_dir() and any(child.is_dir() for child in (path / "train").iterdir()):
        classes = _folder_classes(path / "train")
        names = [clean_classname(c) for c in classes]
        if not (path / "test").is_dir():
            raise DatasetError(
                f"{path} has train/ but no test/; expected {path}/test/<class>/*.jpg next to train/ "
                f"(val/ is optional), or put class folders directly in {path}."
            )
        train = _folder_images(path / "train", classes, strict=True)
        test = _folder_images(path / "test", classes, strict=False)
        if (path / "val").is_dir():
            val = _folder_images(path / "val", classes, strict=False)
        else:  # carve a seeded share of train per class, so every class keeps validation images
            cut = [_seeded_partition(p, [IMAGEFOLDER_VAL_FRACTION], _class_seed(c)) for c, p in zip(classes, train)]
            train, val = [c[0] for c in cut], [c[1] for c in cut]
    else:
        split_folders = [split for split in ("val", "test") if (path / split).is_dir()]
        if split_folders and not (path / "train").is_dir():  # not a class called "test": the split layout, half made
            raise DatasetError(f"{path} has {'/ and '.join(split_folders)}/ but no train/; expected "
                               f"{path}/train/<class>/*.jpg next to them, or class folders directly in {path}.")
        classes = _folder_classes(path)
        names = [clean_classname(c) for c in classes]
        per_class = _folder_images(path, classes, strict=True)
        _, f_val, f_test = IMAGEFOLDER_RATIOS
        cut = [_seeded_partition(p, [f_val, f_test], _class_seed(c)) for c, p in zip(classes, per_class)]
        train, val, test = [c[0] for c in cut], [c[1] for c in cut], [c[2] for c in cut]
    if len(names) < 2:
        raise DatasetError(f"image folder {path} has one class ({names[0]!r}); classification needs at least two "
                           "class folders")  # fmt: skip
    return DatasetSplits(
        name, names, info.template, _to_samples(train, names), _to_samples(val, names), _to_samples(test, names)
    )


def _class_seed(folder: str) -> int:
    """A seed per class folder *name*, so adding or removing a class leaves every other class's split as it was."""
    return IMAGEFOLDER_SEED + zlib.crc32(folder.encode("utf-8"))


# ---------------------------------------------------------------------------------------------- registry
def _split_json(name: str, display: str, folder: str, image_dir: str, split_file: str, template: str) -> DatasetInfo:
    where = f"{image_dir}/" if image_dir else "the images"
    layout = f"{where} and {split_file}"
    return DatasetInfo(name, display, folder, template, layout, _load_split_json, image_dir, split_file)


_IMAGENET_CLS = "ImageNet's classnames.txt (here or in imagenet/)"
DATASETS: dict[str, DatasetInfo] = {
    info.name: info
    for info in [
        DatasetInfo(
            "imagenet", "ImageNet", "imagenet", IMAGENET_TEMPLATE,
            "classnames.txt and images/train/<wnid>/, images/val/<wnid>/", _load_imagenet,
        ),
        _split_json("caltech101", "Caltech101", "caltech-101", "101_ObjectCategories",
                    "split_zhou_Caltech101.json", "a photo of a {}."),
        _split_json("oxford_pets", "OxfordPets", "oxford_pets", "images",
                    "split_zhou_OxfordPets.json", "a photo of a {}, a type of pet."),
        _split_json("stanford_cars", "StanfordCars", "stanford_cars", "",
                    "split_zhou_StanfordCars.json", "a photo of a {}."),
        _split_json("oxford_flowers", "OxfordFlowers", "oxford_flowers", "jpg",
                    "split_zhou_OxfordFlowers.json", "a photo of a {}, a type of flower."),
        _split_json("food101", "Food101", "food-101", "images",
                    "split_zhou_Food101.json", "a photo of {}, a type of food."),
        DatasetInfo(
            "fgvc_aircraft", "FGVCAircraft", "fgvc_aircraft", "a photo of a {}, a type of aircraft.",
            "images/, variants.txt and images_variant_{train,val,test}.txt", _load_fgvc_aircraft,
        ),
        _split_json("sun397", "SUN397", "sun397", "SUN397", "split_zhou_SUN397.json", "a photo of a {}."),
        _split_json("dtd", "DTD", "dtd", "images", "split_zhou_DescribableTextures.json", "{} texture."),
        _split_json("eurosat", "EuroSAT", "eurosat", "2750",
                    "split_zhou_EuroSAT.json", "a centered satellite photo of {}."),
        _split_json("ucf101", "UCF101", "ucf101", "UCF-101-midframes",
                    "split_zhou_UCF101.json", "a photo of a person doing {}."),
        DatasetInfo(
            "imagenetv2", "ImageNetV2", "imagenetv2", IMAGENET_TEMPLATE,
            f"imagenetv2-matched-frequency-format-val/<label index>/ and {_IMAGENET_CLS}", _load_imagenetv2,
        ),
        DatasetInfo(
            "imagenet_sketch", "ImageNet-Sketch", "imagenet-sketch", IMAGENET_TEMPLATE,
            f"images/<wnid>/ and {_IMAGENET_CLS}", _load_imagenet_sketch,
        ),
        DatasetInfo(
            "imagenet_a", "ImageNet-A", "imagenet-adversarial", IMAGENET_TEMPLATE,
            f"imagenet-a/<wnid>/ and {_IMAGENET_CLS}", _imagenet_subset_loader("imagenet-a"),
        ),
        DatasetInfo(
            "imagenet_r", "ImageNet-R", "imagenet-rendition", IMAGENET_TEMPLATE,
            f"imagenet-r/<wnid>/ and {_IMAGENET_CLS}", _imagenet_subset_loader("imagenet-r"),
        ),
        DatasetInfo(
            "imagefolder", "image folder", "", IMAGEFOLDER_TEMPLATE,
            "<class>/*.jpg or {train,val,test}/<class>/*.jpg", _load_imagefolder,
        ),
    ]
}  # fmt: skip


def _compact(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


# Names are matched after lower-casing and dropping every non-alphanumeric character, so "EuroSAT",
# "caltech-101", "OxfordPets", "ImageNet-Sketch" and "imagenet_sketch" all work; these are extra spellings.
_ALIASES: dict[str, str] = {
    **{_compact(k): k for k in DATASETS},
    **{_compact(info.display): k for k, info in DATASETS.items()},
    **{_compact(info.folder): k for k, info in DATASETS.items() if info.folder},
    "caltech": "caltech101",
    "pets": "oxford_pets",
    "cars": "stanford_cars",
    "flowers": "oxford_flowers",
    "flowers102": "oxford_flowers",
    "oxfordflowers102": "oxford_flowers",
    "food": "food101",
    "aircraft": "fgvc_aircraft",
    "describabletextures": "dtd",
    "textures": "dtd",
    "imagenetadversarial": "imagenet_a",
    "imagenetrendition": "imagenet_r",
    "folder": "imagefolder",
}


def available_datasets() -> list[str]:
    return sorted(DATASETS)


def resolve_dataset_name(name: str) -> str:
    """Canonical registry key for a user-typed dataset name (case/punctuation-insensitive, with aliases)."""
    key = _ALIASES.get(_compact(name))
    if key is None:
        raise DatasetError(
            f"unknown dataset {name!r}; available: {', '.join(available_datasets())} "
            f"(or imagefolder:<path> for your own <class>/*.jpg folders, or toy:<name> for the procedural toy suite)."
        )
    return key


def load_dataset(name: str, root: str | Path | None = None) -> DatasetSplits:
    """Load a dataset from the data root (the folder containing e.g. ``eurosat/``).

    ``imagefolder:<path>`` loads a generic image folder; a relative <path> is taken relative to the working
    directory when it exists there, otherwise relative to `root`. Plain ``imagefolder`` uses `root` itself.
    """
    from vlprompt.specs import DatasetSpec, SpecError

    try:
        spec = DatasetSpec.parse(name)
    except SpecError as err:
        raise DatasetError(str(err)) from None
    if spec.scheme == "toy":
        # The procedural toy world's suite: generated on first use under root (default: the toy cache folder).
        from vlprompt.toyworld.suite import load_toy

        return load_toy(spec.name, root)
    if spec.task == "detection":
        raise DatasetError(f"{name!r} is a detection dataset; classification reads CoOp dataset names, toy:<name> "
                           "or imagefolder:<path>.")  # fmt: skip
    key = resolve_dataset_name("imagefolder" if spec.scheme == "imagefolder" else spec.name)
    info = DATASETS[key]
    if key == "imagefolder":
        return info.load(_imagefolder_path(spec.name, root))
    if root is None:
        raise DatasetError(f"{info.display}: no data root given. Pass --data-root pointing at the folder that "
                           f"contains {info.folder}/.")
    return info.load(root)


def _imagefolder_path(arg: str, root: str | Path | None) -> Path:
    if not arg:
        if root is None:
            raise DatasetError("imagefolder needs a path: use imagefolder:<path> or pass --data-root.")
        return _abspath(root)
    path = Path(arg).expanduser()
    if path.is_absolute() or root is None or path.exists():
        return _abspath(path)
    return _abspath(Path(root) / path)


# ------------------------------------------------------------------------------------------ base / novel
def subsample_classes(splits: DatasetSplits, which: str) -> DatasetSplits:
    """Base-to-novel protocol: base = first ceil(n/2) labels, novel ("new" accepted too) = the rest, relabelled
    from 0 so a model trained on base sees a dense label space; "all" returns `splits` unchanged."""
    which = which.lower()
    if which == "all":
        return splits
    if which not in ("base", "novel", "new"):
        raise DatasetError(f"unknown class subset {which!r}: use 'all', 'base' or 'novel'.")
    n = len(splits.classnames)
    m = math.ceil(n / 2)
    keep = list(range(m)) if which == "base" else list(range(m, n))
    if not keep:
        raise DatasetError(f"{splits.name} has {n} class(es): --subsample {which} leaves none (base-to-novel splits "
                           "the classes in two halves, so it needs at least two)")  # fmt: skip
    relabel = {old: new for new, old in enumerate(keep)}

    def sub(samples: list[Sample]) -> list[Sample]:
        return [replace(s, label=relabel[s.label]) for s in samples if s.label in relabel]

    tag = "base" if which == "base" else "novel"
    return DatasetSplits(
        f"{splits.name}[{tag}]",
        [splits.classnames[i] for i in keep],
        splits.template,
        sub(splits.train),
        sub(splits.val),
        sub(splits.test),
    )


# ---------------------------------------------------------------------------------------- torch dataset
class ImageDataset(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """Samples -> (transformed image tensor, label). Images are opened lazily, one per item, unless ``decoded``
    holds them already (:func:`decode_images`: the transform then runs from memory)."""

    def __init__(self, samples: list[Sample], transform: Callable[[Image.Image], torch.Tensor],
                 decoded: Sequence[Image.Image] | None = None) -> None:  # fmt: skip
        if decoded is not None and len(decoded) != len(samples):
            raise ValueError(f"{len(decoded)} decoded images for {len(samples)} samples")
        self.samples = samples
        self.transform = transform
        self.decoded = decoded

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        sample = self.samples[i]
        image = self.decoded[i] if self.decoded is not None else open_image(sample.path)
        return self.transform(image), sample.label


def decoded_size_bytes(samples: Sequence[Sample]) -> int:
    """The memory the samples' images take decoded as RGB, from their headers (no pixel is decoded): PIL keeps an
    RGB pixel in 4 bytes."""
    total = 0
    for sample in samples:
        try:
            with Image.open(sample.path) as im:
                width, height = im.size
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            continue  # open_image names the bad file when it is read
        total += width * height * 4
    return total


def decode_images(samples: Sequence[Sample]) -> list[Image.Image]:
    """Every sample's image, decoded (RGB, full resolution: augmentation from memory crops what it would crop from
    the file)."""
    return [open_image(sample.path) for sample in samples]


# Integer modes PIL keeps at more than 8 bits per sample: their values span 0..65535 (16-bit PNG and TIFF files).
WIDE_INTEGER_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


DATASET_IMAGE_FIX = ("remove it (from the dataset, with its split entry if it has one) or replace it with a valid "
                     "copy")


def open_image(path: Path, orient: bool = True, fix: str = DATASET_IMAGE_FIX) -> Image.Image:
    """Open an image as 8-bit RGB, turning PIL's many failure types into one DatasetError that names the file.

    Pixels as a viewer shows them: ``orient`` applies the EXIF orientation (a phone photo stored sideways comes out
    upright, as transformers' ``load_image`` does; detection turns it off, its boxes are in stored pixels);
    transparency is composited on white (as transformers' image processors do); 16-bit grey levels are scaled to
    8 bits (PIL's plain conversion would saturate everything above 255). Floating-point images, whose value range
    no file states, are refused by name. ``fix`` ends the message for a file that cannot be decoded (the default
    speaks of a dataset's image)."""
    try:
        with Image.open(path) as im:
            return _to_rgb(ImageOps.exif_transpose(im) if orient else im, path)  # the decode runs inside the try
    except FileNotFoundError as e:
        raise DatasetError(
            f"image file {path} does not exist; the dataset folder changed after loading, restore the file or "
            f"clear the few-shot cache."
        ) from e
    except DatasetError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DatasetError(
            f"cannot read image {path} ({type(e).__name__}: {e}); the file is corrupt or not an image: {fix}."
        ) from e


def _to_rgb(im: Image.Image, path: Path) -> Image.Image:
    if im.mode == "F":
        raise DatasetError(f"{path} holds floating-point pixels (PIL mode F), whose range the file does not state; "
                           "save it as an 8- or 16-bit PNG or JPEG.")  # fmt: skip
    if im.mode in WIDE_INTEGER_MODES:
        values = np.asarray(im, dtype=np.int64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise DatasetError(f"{path} holds {im.mode} pixels outside 0..65535 (a 32-bit image); save it as an 8- "
                               "or 16-bit PNG or JPEG.")  # fmt: skip
        grey = np.round(values / 257.0).astype(np.uint8)  # 65535 -> 255, 32896 -> 128
        return Image.fromarray(grey).convert("RGB")
    if "A" in im.getbands() or im.info.get("transparency") is not None:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")
