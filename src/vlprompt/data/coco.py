"""COCO-format detection data: reading, category prompts, seeded K-shot sampling, batching, and COCO mAP.

Datasets are named like classification ones (``--dataset``):

- ``coco:<folder or file>``: COCO JSON (``images``, ``annotations`` with ``[x, y, w, h]`` boxes, ``categories``) and
  its images. A folder may hold, per split (train / val / test), any of
  ``<split>/annotations.json`` (images relative to ``<split>/``; what ``vlprompt.toyworld`` exports),
  ``annotations/instances_<split>2017.json`` with images in ``<split>2017/`` (COCO's own layout), or
  ``<split>.json`` (images relative to the folder). A single JSON file serves every split.
  A relative path is looked up under ``--data-root`` when given.
- ``toydet:shapes``: multi-object scenes of the procedural toy world (the 15 shapes are the categories), exported
  in the first layout on first use under the toy root (``$VLPROMPT_TOY_ROOT`` or ``~/.cache/vlprompt/toyworld``).
- ``toydet:looks``, ``toydet:novel``, ``toydet:small``, ``toydet:clutter``, ``toydet:fine``, ``toydet:count``: the
  ODinW-style suite of the toy world (``vlprompt.toyworld.detection_sets``), each a different shift from the toy
  detector's pretraining, written the same way (``toydet:suite`` names all six in ``vlprompt bench``).

Category names (underscores read as spaces) become the detector's text prompt, one phrase each, in the order of
their ids; ``data.categories`` restricts training and evaluation to a subset (unknown names are an error).
Few-shot: ``K`` images per category, drawn with a seed (an image counts for every category it shows; all its
annotations of the chosen categories are kept).
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from .datasets import clean_classname, open_image
from .errors import DatasetError

SPLITS = ("train", "val", "test")
# toydet:<name> -> how it is generated (images per split, image size, seed)
TOY_DETECTION = {"shapes": dict(n_train=120, n_val=24, n_test=48, size=64, seed=0)}
MAX_DETECTIONS = 100  # per image, as COCO evaluates
# how far a box may reach past its image before it is said (annotation tools round outward by a pixel or so)
BOX_SLACK_PX = 2.0


def is_detection_dataset(name: str) -> bool:
    from vlprompt.specs import DatasetSpec, SpecError

    try:
        return DatasetSpec.parse(str(name)).task == "detection"
    except SpecError:
        return False


@dataclass
class DetectionImage:
    """One image with its boxes (absolute ``[x, y, w, h]``) and category indices (into the dataset's list)."""

    id: int
    path: Path
    width: int
    height: int
    file_name: str = ""
    boxes: list[list[float]] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    crowd: list[bool] = field(default_factory=list)

    def subset(self, keep: set[int], remap: dict[int, int]) -> "DetectionImage":
        rows = [i for i, c in enumerate(self.labels) if c in keep]
        return DetectionImage(
            self.id, self.path, self.width, self.height, self.file_name,
            [self.boxes[i] for i in rows], [remap[self.labels[i]] for i in rows], [self.crowd[i] for i in rows],
        )


def _split_images(split: str) -> property:
    def get(self: "DetectionSplits") -> list[DetectionImage]:
        return self.split(split)

    def put(self: "DetectionSplits", images: list[DetectionImage]) -> None:
        self._images[split] = images
        self._unreadable.pop(split, None)

    return property(get, put, doc=f"the {split} split's images; an error if its image files cannot be read")


class DetectionSplits:
    """A detection dataset's categories and its three splits. A split whose image files are missing or unreadable is
    an error only when it is used: evaluating on val needs no training images (COCO is often downloaded without
    train2017/)."""

    train = _split_images("train")
    val = _split_images("val")
    test = _split_images("test")

    def __init__(self, name: str, categories: list[str], category_ids: list[int], train: list[DetectionImage],
                 val: list[DetectionImage], test: list[DetectionImage], template: str = "{}",
                 unreadable: dict[str, str] | None = None) -> None:
        self.name = name
        self.categories = categories  # names, the prompt's phrases (index = label)
        self.category_ids = category_ids  # the COCO id of each
        self.template = template
        self._images = {"train": train, "val": val, "test": test}
        self._unreadable = dict(unreadable or {})  # split -> why its images cannot be read

    def split(self, name: str) -> list[DetectionImage]:
        if name not in SPLITS:
            raise DatasetError(f"unknown split {name!r}; choose one of {SPLITS}")
        if name in self._unreadable:
            raise DatasetError(self._unreadable[name])
        return self._images[name]


# ---------------------------------------------------------------------------------------------------- reading
def _split_sources(base: Path) -> dict[str, tuple[Path, Path]]:
    if base.is_file():
        return {s: (base, base.parent) for s in SPLITS}
    found: dict[str, tuple[Path, Path]] = {}
    for split in SPLITS:
        candidates = [
            (base / split / "annotations.json", base / split),
            (base / "annotations" / f"instances_{split}2017.json", base / f"{split}2017"),
            (base / f"{split}.json", base),
        ]
        for json_path, image_dir in candidates:
            if json_path.is_file():
                found[split] = (json_path, image_dir)
                break
    if not found and (base / "annotations.json").is_file():
        found = {s: (base / "annotations.json", base) for s in SPLITS}
    return found


def _parse_annotation(ann: Any) -> tuple[int, int, Any]:
    """(image_id, category_id, bbox) with integer ids and a 4-number bbox as floats (any other bbox as given)."""
    if not isinstance(ann, dict):
        raise TypeError("not an object")
    bbox = ann.get("bbox")
    if isinstance(bbox, (list, tuple)) and len(bbox) == 4:
        bbox = [float(v) for v in bbox]  # None or a string raise here
        if not all(math.isfinite(v) for v in bbox):  # JSON's NaN / Infinity: a box no metric can score
            raise ValueError(f"bbox {bbox} is not finite: fix or remove it")
    return int(ann.get("image_id", -1)), int(ann.get("category_id", -1)), bbox


def _parse_category(entry: Any, json_path: Path) -> tuple[int, str]:
    """``(id, name)`` of a category entry; its name is the detector's text prompt: non-blank text (or a number)."""
    try:
        category_id, name = int(entry["id"]), entry["name"]
    except (KeyError, TypeError, ValueError) as err:
        raise DatasetError(f"{json_path}: the category entry {str(entry)[:80]} is malformed ({type(err).__name__}: "
                           f"{err}); each needs an integer 'id' and a 'name'.") from err
    if isinstance(name, int) and not isinstance(name, bool):  # digit classes ("name": 7) read as their text
        name = str(name)
    if not isinstance(name, str) or not clean_classname(name).strip():
        raise DatasetError(f"{json_path}: category {category_id} has the name {name!r}; each name must be non-empty "
                           "text, since it is the detector's prompt for that category.")
    return category_id, clean_classname(name)


def read_coco(json_path: Path, image_dir: Path) -> tuple[list[tuple[int, str]], list[DetectionImage]]:
    """Categories ``[(id, name)]`` sorted by id and the images of one COCO JSON file, checked; the image files are
    not opened (:func:`check_image_files` does that, when the split is used)."""
    try:
        data = json.loads(Path(json_path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DatasetError(f"{json_path} is not valid JSON ({err}).") from err
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(data, dict) or k not in data]
    if missing:
        raise DatasetError(
            f"{json_path} is not a COCO detection file: it lacks {missing} (a COCO file holds lists 'images', "
            "'annotations' and 'categories')."
        )
    not_lists = [k for k in ("images", "annotations", "categories") if not isinstance(data[k], list)]
    if not_lists:
        raise DatasetError(f"{json_path}: " + ", ".join(f"'{k}' is {type(data[k]).__name__}" for k in not_lists)
                           + "; a COCO detection file holds lists 'images', 'annotations' and 'categories'.")
    categories = [_parse_category(c, json_path) for c in data["categories"]]
    categories.sort()
    names = [n for _, n in categories]
    lowered = [n.lower() for n in names]  # the detectors' text towers are uncased: "Cat" and "cat" are one phrase
    duplicates = sorted({n for n in names if lowered.count(n.lower()) > 1})
    if duplicates:
        raise DatasetError(f"{json_path}: category names {duplicates} occur more than once (ignoring case); names "
                           "must be unique, since each is a text prompt.")
    cat_index = {cid: i for i, (cid, _) in enumerate(categories)}
    images: dict[int, DetectionImage] = {}
    for img in data["images"]:
        try:
            image_id, file_name = int(img["id"]), str(img["file_name"])
        except (KeyError, TypeError, ValueError) as err:
            raise DatasetError(f"{json_path}: the image entry {str(img)[:80]} is malformed ({type(err).__name__}: "
                               f"{err}); each needs an integer 'id' and a 'file_name'.") from err
        if image_id in images:
            raise DatasetError(f"{json_path}: image id {image_id} is used by more than one image ("
                               f"{images[image_id].file_name} and {file_name}); ids must be unique.")
        images[image_id] = DetectionImage(
            image_id, image_dir / file_name, int(img.get("width") or 0), int(img.get("height") or 0), file_name
        )
    degenerate: list[Any] = []
    for ann in data["annotations"]:
        try:
            image_id, category_id, bbox = _parse_annotation(ann)
        except (TypeError, ValueError) as err:
            which = f"annotation {ann.get('id')}" if isinstance(ann, dict) else f"the annotation entry {ann!r:.80}"
            raise DatasetError(f"{json_path}: {which} is malformed ({err}); each needs integer 'image_id' and "
                               "'category_id' and a numeric 'bbox' [x, y, w, h].") from err
        image = images.get(image_id)
        if image is None:
            raise DatasetError(f"{json_path}: annotation {ann.get('id')} refers to image_id {ann.get('image_id')}, "
                               "which is not in 'images'.")
        if category_id not in cat_index:
            raise DatasetError(f"{json_path}: annotation {ann.get('id')} has category_id {ann.get('category_id')}, "
                               "which is not in 'categories'.")
        if not isinstance(bbox, list) or len(bbox) != 4:
            raise DatasetError(f"{json_path}: annotation {ann.get('id')} has bbox {bbox!r}; expected [x, y, w, h].")
        x, y, w, h = bbox
        if w <= 0 or h <= 0:
            degenerate.append(ann.get("id"))  # skipped, as COCO training pipelines do; said below
            continue
        image.boxes.append([x, y, w, h])
        image.labels.append(cat_index[category_id])
        image.crowd.append(bool(ann.get("iscrowd", 0)))
    if degenerate:
        warnings.warn(f"{json_path}: {len(degenerate)} annotation(s) with a zero or negative box width or height are "
                      f"skipped (ids {degenerate[:5]}{' ...' if len(degenerate) > 5 else ''}); boxes are "
                      "[x, y, width, height].", stacklevel=2)
    out = list(images.values())
    return categories, out


def check_image_files(images: Sequence[DetectionImage], json_path: Path, image_dir: Path) -> None:
    """Every image file exists and is readable; sizes the JSON leaves out are read from the files. Boxes that reach
    well past their image are said (they are clipped): the mark of boxes written as corners, not [x, y, w, h]."""
    absent = [str(i.path) for i in images if not i.path.is_file()]
    if absent:
        raise DatasetError(
            f"{len(absent)} image(s) listed in {json_path} are missing, e.g. {absent[:3]}; file_name is read relative "
            f"to {image_dir}."
        )
    for image in images:
        if not image.width or not image.height:
            try:
                with Image.open(image.path) as im:
                    image.width, image.height = im.size
            except (OSError, ValueError, SyntaxError) as err:
                raise DatasetError(
                    f"cannot read image {image.path}, listed in {json_path} ({type(err).__name__}: {err}); the file "
                    "is corrupt or not an image: replace it, or remove it and its annotations from the JSON."
                ) from err
    outside = [(image, box) for image in images for box in image.boxes if _reaches_past(box, image)]
    if outside:
        image, box = outside[0]
        warnings.warn(f"{json_path}: {len(outside)} box(es) reach more than {BOX_SLACK_PX} px past their image, e.g. "
                      f"{box} in {image.file_name} ({image.width} x {image.height}); they are clipped. COCO boxes are "
                      "[x, y, width, height]: if these were written as corners [x0, y0, x1, y1], convert them.",
                      stacklevel=2)


def _reaches_past(box: Sequence[float], image: DetectionImage) -> bool:
    x, y, w, h = box
    return min(x, y) < -BOX_SLACK_PX or x + w > image.width + BOX_SLACK_PX or y + h > image.height + BOX_SLACK_PX


def toy_detection_names() -> list[str]:
    """Every ``toydet:<name>`` set: ``shapes`` and the ODinW-style suite's sets."""
    from vlprompt.toyworld.detection_sets import DETECTION_SUITE

    return [*TOY_DETECTION, *DETECTION_SUITE]


def toy_detection_folder(name: str, root: str | Path | None = None) -> Path:
    """The toy-world detection set ``name`` (generated on first use) in the ``<split>/annotations.json`` layout."""
    from vlprompt.toyworld.detection_sets import DETECTION_SUITE, SUITE_NAME, materialize_detection_set

    if root is None:
        from vlprompt.toyworld.suite import default_toy_root

        root = default_toy_root()
    key = name.strip().lower()
    if key == SUITE_NAME:
        raise DatasetError(f"toydet:{SUITE_NAME} names the {len(DETECTION_SUITE)} sets of the toy detection suite; "
                           "bench them with `vlprompt bench --datasets toydet:suite`, or train on one: "
                           + ", ".join(f"toydet:{n}" for n in DETECTION_SUITE))  # fmt: skip
    if key in DETECTION_SUITE:
        return materialize_detection_set(key, root)
    if name not in TOY_DETECTION:
        raise DatasetError(f"unknown toy detection set {name!r}; available: {', '.join(toy_detection_names())} (as "
                           f"toydet:<name>; toydet:{SUITE_NAME} for the suite's sets in vlprompt bench)")  # fmt: skip
    spec = TOY_DETECTION[name]
    folder = Path(root).expanduser() / "detection" / f"{name}-{spec['size']}px-seed{spec['seed']}"
    return write_toy_detection(folder, spec["n_train"], spec["n_val"], spec["n_test"], spec["size"], spec["seed"])


def write_toy_detection(folder: str | Path, n_train: int, n_val: int, n_test: int, size: int = 64,
                        seed: int = 0) -> Path:
    """Export toy-world scenes as COCO: ``folder/<split>/images/*.png`` + ``folder/<split>/annotations.json``.

    Reuses complete splits (their ``annotations.json`` is written last)."""
    from vlprompt.toyworld.corpus import write_detection_set

    folder = Path(folder).expanduser()
    for offset, (split, n) in enumerate((("train", n_train), ("val", n_val), ("test", n_test))):
        if n <= 0 or (folder / split / "annotations.json").is_file():
            continue
        write_detection_set(folder / split, n, seed=seed * 1000 + offset, size=size)
    return folder


def load_detection_dataset(spec: str, root: str | Path | None = None,
                           categories: Sequence[str] | None = None) -> DetectionSplits:
    """Read a ``coco:<path>`` or ``toydet:<name>`` dataset (see the module docstring)."""
    from vlprompt.specs import DatasetSpec, SpecError

    try:
        parsed = DatasetSpec.parse(str(spec))
    except SpecError as err:
        raise DatasetError(str(err)) from None
    if parsed.scheme == "toydet":
        base = toy_detection_folder(parsed.name, root)
    elif parsed.scheme == "coco":
        base = Path(parsed.name).expanduser()
        if not base.is_absolute() and root is not None and not base.exists():
            base = Path(root).expanduser() / base
    else:
        raise DatasetError(f"{spec!r} is not a detection dataset; use coco:<folder or json> or toydet:<name>.")
    if not base.exists():
        raise DatasetError(f"detection dataset {base} does not exist; pass coco:<folder or file> (see docs/detection.md).")
    sources = _split_sources(base)
    if not sources:
        raise DatasetError(
            f"no COCO annotation file found in {base}: expected <split>/annotations.json, "
            "annotations/instances_<split>2017.json (+ <split>2017/), <split>.json or annotations.json."
        )
    splits: dict[str, list[DetectionImage]] = {}
    unreadable: dict[str, str] = {}
    all_categories: list[tuple[int, str]] | None = None
    for split in SPLITS:
        if split not in sources:
            splits[split] = []
            continue
        cats, images = read_coco(*sources[split])
        if all_categories is None:
            all_categories = cats
        elif cats != all_categories:
            raise DatasetError(f"{sources[split][0]} has other categories than the dataset's other splits.")
        try:
            check_image_files(images, *sources[split])
        except DatasetError as err:  # an error when the split is used (DetectionSplits)
            unreadable[split] = str(err)
        splits[split] = images
    assert all_categories is not None
    names = [n for _, n in all_categories]
    chosen = list(range(len(names)))
    if isinstance(categories, str):  # `--set data.categories=cat,dog` gives one string
        categories = [c for c in categories.split(",") if c.strip()]
    if categories:
        wanted = [clean_classname(str(c)) for c in categories]
        unknown = [c for c in wanted if c not in names]
        if unknown:
            raise DatasetError(f"unknown category names {unknown}; the dataset has {names}.")
        repeated = sorted({c for c in wanted if wanted.count(c) > 1})
        if repeated:
            raise DatasetError(f"categories {repeated} are listed more than once in data.categories.")
        chosen = [names.index(c) for c in wanted]
    remap = {old: new for new, old in enumerate(chosen)}
    keep = set(chosen)
    subset = {s: [img.subset(keep, remap) for img in images] for s, images in splits.items()}
    return DetectionSplits(
        name=spec, categories=[names[i] for i in chosen], category_ids=[all_categories[i][0] for i in chosen],
        train=subset["train"], val=subset["val"], test=subset["test"], unreadable=unreadable,
    )


# ---------------------------------------------------------------------------------------------------- few-shot
def few_shot_detection(images: Sequence[DetectionImage], k: int, seed: int, n_categories: int) -> list[DetectionImage]:
    """``k`` images per category, drawn with ``seed`` (the same seed always picks the same images).

    Categories are visited in order; an image already chosen counts for every category it shows.
    """
    if k < 1:
        raise DatasetError(f"shots must be an integer >= 1, got {k}; to train on all images, leave out --shots "
                           "(data.shots).")
    by_id = sorted(images, key=lambda i: i.id)
    chosen: list[DetectionImage] = []
    chosen_ids: set[int] = set()
    for c in range(n_categories):
        have = sum(1 for img in chosen if c in _positive(img))
        candidates = [img for img in by_id if c in _positive(img) and img.id not in chosen_ids]
        order = np.random.default_rng([seed, c]).permutation(len(candidates))
        for i in order[: max(k - have, 0)]:
            chosen.append(candidates[int(i)])
            chosen_ids.add(candidates[int(i)].id)
    return sorted(chosen, key=lambda i: i.id)


def warn_short_categories(splits: DetectionSplits, shots: int) -> None:
    """Say which categories a few-shot draw of ``splits.train`` could not give ``shots`` images (they keep all they
    have), as classification does for its classes."""
    counts = [0] * len(splits.categories)
    for image in splits.train:
        for c in _positive(image):
            counts[c] += 1
    short = [(name, n) for name, n in zip(splits.categories, counts) if n < shots]
    if short:
        examples = ", ".join(f"{name!r}: {n}" for name, n in short[:5])
        warnings.warn(f"{splits.name}: {len(short)} of {len(counts)} categories have fewer than {shots} training "
                      f"images ({examples}{', ...' if len(short) > 5 else ''}); using all of their images.",
                      stacklevel=3)


def _positive(image: DetectionImage) -> set[int]:
    return {c for c, crowd in zip(image.labels, image.crowd) if not crowd}


# ---------------------------------------------------------------------------------------------------- tensors
def target_boxes(item: DetectionImage, width: int, height: int) -> tuple[list[int], torch.Tensor]:
    """The annotation rows a training target keeps and their boxes as normalised (cx, cy, w, h): crowd boxes left
    out, corners clipped to the image (clamping centre and size separately would shift a box that overhangs),
    boxes with nothing left inside dropped."""
    rows = [i for i, crowd in enumerate(item.crowd) if not crowd]
    boxes = torch.tensor([item.boxes[i] for i in rows], dtype=torch.float32).reshape(-1, 4)
    x0 = (boxes[:, 0] / width).clamp(0, 1)
    y0 = (boxes[:, 1] / height).clamp(0, 1)
    x1 = ((boxes[:, 0] + boxes[:, 2]) / width).clamp(0, 1)
    y1 = ((boxes[:, 1] + boxes[:, 3]) / height).clamp(0, 1)
    keep = (x1 > x0) & (y1 > y0)
    kept_rows = [r for r, kept in zip(rows, keep.tolist()) if kept]
    return kept_rows, torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=1)[keep]


def target_box_count(item: DetectionImage) -> int:
    """How many boxes the image's training target holds (:func:`target_boxes`), from its annotation alone."""
    if item.width and item.height:
        return len(target_boxes(item, item.width, item.height)[0])
    return sum(1 for box, crowd in zip(item.boxes, item.crowd) if not crowd and box[2] > 0 and box[3] > 0)


def detector_input_size(width: int, height: int, image_config) -> tuple[int, int]:
    """The size an image of ``width`` x ``height`` is resized to for the detector: its shortest edge to
    ``shortest_edge``, unless that makes the longest edge exceed ``longest_edge`` (then that edge is capped)."""
    scale = image_config.shortest_edge / min(width, height)
    if max(width, height) * scale > image_config.longest_edge:
        scale = image_config.longest_edge / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def detection_pixels(image: Image.Image, image_config) -> torch.Tensor:
    """An RGB image as the detector reads it: ``(3, H, W)``, resized (:func:`detector_input_size`) and normalised.
    Predicted boxes are normalised to this whole image, so they map back to the original by its width and height."""
    image = image.resize(detector_input_size(*image.size, image_config), Image.Resampling.BILINEAR)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(image_config.mean).view(3, 1, 1)
    std = torch.tensor(image_config.std).view(3, 1, 1)
    return (pixels - mean) / std


class DetectionDataset(torch.utils.data.Dataset):
    """``(pixels (3, H, W), target)``: DETR-style resize (shortest edge, capped longest edge), normalised; target
    ``class_labels`` and ``boxes`` (normalised cx, cy, w, h; crowd boxes left out), plus ``image_id``.

    ``augment``: random horizontal flip (torch's global RNG, so the trainer's per-epoch seed makes it repeatable).
    """

    def __init__(self, images: Sequence[DetectionImage], image_config, augment: bool = False) -> None:
        self.images = list(images)
        self.config = image_config
        self.augment = augment

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        item = self.images[index]
        image = open_image(item.path, orient=False)  # COCO boxes are in the stored pixels
        width, height = image.size
        if item.width and item.height and (item.width, item.height) != (width, height):
            # Evaluation maps predictions back with the JSON's size: both must describe the same pixels.
            raise DatasetError(
                f"{item.path} is {width}x{height} px but its COCO entry says {item.width}x{item.height} (a resized or "
                "EXIF-rotated copy?); fix the image's width/height in the JSON or restore the original file."
            )
        pixels = detection_pixels(image, self.config)
        rows, cxcywh = target_boxes(item, width, height)
        if self.augment and float(torch.rand(())) < 0.5:
            pixels = pixels.flip(-1)
            if len(rows):
                cxcywh[:, 0] = 1 - cxcywh[:, 0]
        target = {
            "class_labels": torch.tensor([item.labels[i] for i in rows], dtype=torch.long),
            "boxes": cxcywh,
            "image_id": torch.tensor(item.id),
        }
        return pixels, target


def collate_detection(batch):
    """Pad a batch to its largest image: ``(pixel_values, pixel_mask (1 = image), targets)``."""
    height = max(p.shape[1] for p, _ in batch)
    width = max(p.shape[2] for p, _ in batch)
    pixels = torch.zeros(len(batch), 3, height, width)
    mask = torch.zeros(len(batch), height, width, dtype=torch.long)
    for i, (p, _) in enumerate(batch):
        pixels[i, :, : p.shape[1], : p.shape[2]] = p
        mask[i, : p.shape[1], : p.shape[2]] = 1
    return pixels, mask, [t for _, t in batch]


# ---------------------------------------------------------------------------------------------------- evaluation
def coco_ground_truth(images: Sequence[DetectionImage], category_ids: Sequence[int],
                      categories: Sequence[str]) -> dict[str, Any]:
    """A COCO dict of ``images`` (labels = indices into ``category_ids``) for pycocotools."""
    out_images, annotations = [], []
    for img in images:
        out_images.append({"id": img.id, "width": img.width, "height": img.height, "file_name": img.file_name})
        for box, label, crowd in zip(img.boxes, img.labels, img.crowd):
            annotations.append({
                "id": len(annotations) + 1, "image_id": img.id, "category_id": int(category_ids[label]),
                "bbox": list(box), "area": float(box[2] * box[3]), "iscrowd": int(crowd),
            })
    cats = [{"id": int(i), "name": n} for i, n in zip(category_ids, categories)]
    return {"info": {}, "licenses": [], "images": out_images, "annotations": annotations, "categories": cats}


def detections_from_scores(image: DetectionImage, scores: torch.Tensor, boxes: torch.Tensor,
                           category_ids: Sequence[int], max_detections: int = MAX_DETECTIONS) -> list[dict]:
    """COCO results for one image from per-category scores ``(Q, C)`` and normalised cx, cy, w, h boxes ``(Q, 4)``."""
    n_queries, n_cats = scores.shape
    top = scores.reshape(-1).topk(min(max_detections, n_queries * n_cats))
    out = []
    for score, flat in zip(top.values.tolist(), top.indices.tolist()):
        q, c = divmod(flat, n_cats)
        cx, cy, w, h = boxes[q].tolist()
        out.append({
            "image_id": image.id, "category_id": int(category_ids[c]), "score": float(score),
            "bbox": [(cx - w / 2) * image.width, (cy - h / 2) * image.height, w * image.width, h * image.height],
        })
    return out


def coco_map(ground_truth: dict[str, Any], detections: list[dict]) -> dict[str, Any]:
    """COCO box AP through pycocotools: ``mAP`` (AP@[.5:.95]), ``AP50``, ``AP75`` in percent, and its summary text."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if not any(not a.get("iscrowd", 0) for a in ground_truth["annotations"]):  # crowd regions are ignored by COCO AP
        raise DatasetError("the evaluation split has no (non-crowd) annotations of the chosen categories; COCO AP is "
                           "undefined.")
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        gt = COCO()
        gt.dataset = ground_truth
        gt.createIndex()
        if not detections:
            return {"mAP": 0.0, "AP50": 0.0, "AP75": 0.0, "summary": "no detections"}
        dt = gt.loadRes(detections)
        evaluator = COCOeval(gt, dt, "bbox")
        evaluator.params.imgIds = [img["id"] for img in ground_truth["images"]]
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = [max(float(s), 0.0) * 100.0 for s in evaluator.stats]
    summary = "\n".join(line for line in buffer.getvalue().splitlines() if line.startswith(" Average"))
    return {"mAP": stats[0], "AP50": stats[1], "AP75": stats[2], "summary": summary}
