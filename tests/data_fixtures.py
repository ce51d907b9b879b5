"""Builders for tiny on-disk datasets in the exact layouts `vlprompt.data` reads (see specs/datasets.md).

Reusable from any test: ``from data_fixtures import make_split_json_dataset``. Images are small and, with
``pattern="color"``, each class is a solid, distinct colour plus a little noise, so even a linear probe on
pooled pixels separates the classes: good for smoke-testing training loops.
"""

from __future__ import annotations

import colorsys
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

try:  # the package may not be installed (src layout); fall back to the checkout's src/
    import vlprompt.data  # noqa: F401
except ImportError:  # pragma: no cover - depends on the environment
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from vlprompt.data import DATASETS, resolve_dataset_name

__all__ = [
    "IMAGENET_ENTRIES",
    "class_color",
    "make_fgvc_aircraft",
    "make_imagefolder",
    "make_imagenet",
    "make_imagenet_variant",
    "make_split_json_dataset",
    "write_corrupt_image",
    "write_image",
    "write_imagenet_classnames",
]

# A few real (wnid, classname) pairs in ImageNet order; names with spaces on purpose.
IMAGENET_ENTRIES: tuple[tuple[str, str], ...] = (
    ("n01440764", "tench"),
    ("n01443537", "goldfish"),
    ("n01484850", "great white shark"),
    ("n01491361", "tiger shark"),
    ("n01494475", "hammerhead shark"),
)
PATTERNS = ("color", "noise")


def class_color(c: int, n: int) -> tuple[int, int, int]:
    """Well-separated RGB colour for class c of n: evenly spaced hues; past 12 classes neighbouring hues
    get alternating brightness so they stay apart."""
    hue = c / n
    value = 1.0 if n <= 12 or c % 2 == 0 else 0.55
    r, g, b = colorsys.hsv_to_rgb(hue, 0.9, value)
    return int(r * 255), int(g * 255), int(b * 255)


def _pixels(rng: np.random.Generator, size: int, color: tuple[int, int, int] | None, noise: int) -> np.ndarray:
    if color is None:
        return rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    base = np.array(color, dtype=np.int16).reshape(1, 1, 3)
    jitter = rng.integers(-noise, noise + 1, size=(size, size, 3), dtype=np.int16)
    return np.clip(base + jitter, 0, 255).astype(np.uint8)


def write_image(
    path: Path,
    color: tuple[int, int, int] | None = (128, 128, 128),
    size: int | tuple[int, int] = 16,
    seed: int = 0,
    noise: int = 8,
) -> Path:
    """Write a small image (format from the suffix). color=None gives uniform random noise."""
    rng = np.random.default_rng(seed)
    w, h = (size, size) if isinstance(size, int) else size
    arr = _pixels(rng, max(w, h), color, noise)[:h, :w]
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(arr)
    if path.suffix.lower() in (".jpg", ".jpeg"):
        img.save(path, quality=95)  # high quality keeps the class colours close to the requested ones
    else:
        img.save(path)
    return path


def write_corrupt_image(path: Path) -> Path:
    """Garbage bytes behind an image file name (what a truncated download looks like to PIL)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x00not an image\xff" * 8)
    return path


def _class_images(
    folder: Path, stem: str, c: int, n: int, count: int, start: int, image_size: int, seed: int, pattern: str,
    suffix: str = ".jpg",
) -> list[Path]:
    if pattern not in PATTERNS:
        raise ValueError(f"pattern must be one of {PATTERNS}, got {pattern!r}")
    color = class_color(c, n) if pattern == "color" else None
    paths = []
    for i in range(start, start + count):
        # A distinct seed per (class, image) so images differ but the whole dataset is reproducible.
        paths.append(write_image(folder / f"{stem}_{i}{suffix}", color, image_size, seed * 100_003 + c * 1009 + i))
    return paths


def make_split_json_dataset(
    root: Path,
    name: str = "eurosat",
    classnames: Sequence[str] = ("AnnualCrop", "Forest", "Highway"),
    per_split: Sequence[int] = (6, 2, 4),
    image_size: int = 16,
    seed: int = 0,
    pattern: str = "color",
) -> Path:
    """Write the CoOp layout of any split-JSON dataset (eurosat, caltech101, oxford_pets, stanford_cars,
    oxford_flowers, food101, sun397, dtd, ucf101) under `root`, and return its dataset folder.

    For name="eurosat": root/eurosat/2750/<Class>/<Class>_<i>.jpg and root/eurosat/split_zhou_EuroSAT.json.
    per_split = images per class in (train, val, test); label = index in `classnames`; class folder = the
    class name with spaces replaced by '_'. pattern="color": a solid distinct colour per class plus small
    noise (classes easily separable); pattern="noise": uniform random pixels (not separable).
    """
    info = DATASETS[resolve_dataset_name(name)]
    if info.split_file is None or info.image_dir is None:
        raise ValueError(f"{name} is not a split-JSON dataset")
    base = Path(root) / info.folder
    image_dir = base / info.image_dir if info.image_dir else base
    split: dict[str, list[list[object]]] = {"train": [], "val": [], "test": []}
    n = len(classnames)
    for c, cname in enumerate(classnames):
        folder_name = cname.replace(" ", "_")
        start = 0
        for s, count in zip(("train", "val", "test"), per_split):
            for p in _class_images(image_dir / folder_name, folder_name, c, n, count, start, image_size, seed, pattern):
                split[s].append([p.relative_to(image_dir).as_posix(), c, cname])
            start += count
    base.mkdir(parents=True, exist_ok=True)
    (base / info.split_file).write_text(json.dumps(split), encoding="utf-8")
    return base


def write_imagenet_classnames(path: Path, entries: Sequence[tuple[str, str]] = IMAGENET_ENTRIES) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{w} {n}\n" for w, n in entries), encoding="utf-8")
    return path


def make_imagenet(
    root: Path,
    entries: Sequence[tuple[str, str]] = IMAGENET_ENTRIES,
    per_split: Sequence[int] = (4, 2),
    image_size: int = 16,
    seed: int = 0,
) -> Path:
    """root/imagenet/{classnames.txt, images/train/<wnid>/*.JPEG, images/val/<wnid>/*.JPEG}; per_split=(train, val)."""
    base = Path(root) / "imagenet"
    write_imagenet_classnames(base / "classnames.txt", entries)
    for c, (wnid, _) in enumerate(entries):
        start = 0
        for split, count in zip(("train", "val"), per_split):
            folder = base / "images" / split / wnid
            _class_images(folder, wnid, c, len(entries), count, start, image_size, seed, "color", ".JPEG")
            start += count
    return base


_VARIANT_DIRS = {
    "imagenetv2": ("imagenetv2", "imagenetv2-matched-frequency-format-val"),
    "imagenet_sketch": ("imagenet-sketch", "images"),
    "imagenet_a": ("imagenet-adversarial", "imagenet-a"),
    "imagenet_r": ("imagenet-rendition", "imagenet-r"),
}


def make_imagenet_variant(
    root: Path,
    name: str,
    wnids: Sequence[str],
    per_class: int = 2,
    entries: Sequence[tuple[str, str]] = IMAGENET_ENTRIES,
    own_classnames: bool = False,
    image_size: int = 16,
) -> Path:
    """Test-only ImageNet variant with images for `wnids`. ImageNetV2 folders are label indices (position of
    the wnid in `entries`). Class names go to root/imagenet/classnames.txt, or into the variant folder when
    own_classnames=True."""
    folder, sub = _VARIANT_DIRS[name]
    base = Path(root) / folder
    write_imagenet_classnames((base if own_classnames else Path(root) / "imagenet") / "classnames.txt", entries)
    index = {w: i for i, (w, _) in enumerate(entries)}
    for wnid in wnids:
        c = index[wnid]
        dirname = str(c) if name == "imagenetv2" else wnid
        _class_images(base / sub / dirname, wnid, c, len(entries), per_class, 0, image_size, 0, "color")
    return base


def make_fgvc_aircraft(
    root: Path,
    variants: Sequence[str] = ("707-320", "A300B4", "Cessna 172", "F-16A/B"),
    per_split: Sequence[int] = (3, 2, 2),
    image_size: int = 16,
) -> Path:
    """root/fgvc_aircraft/{images/<id>.jpg, variants.txt, images_variant_{train,val,test}.txt}."""
    base = Path(root) / "fgvc_aircraft"
    (base / "images").mkdir(parents=True, exist_ok=True)
    (base / "variants.txt").write_text("".join(f"{v}\n" for v in variants), encoding="utf-8")
    next_id = 1000000
    for split, count in zip(("train", "val", "test"), per_split):
        lines = []
        for c, v in enumerate(variants):
            for _ in range(count):
                image_id = f"{next_id:07d}"
                write_image(base / "images" / f"{image_id}.jpg", class_color(c, len(variants)), image_size, next_id)
                lines.append(f"{image_id} {v}\n")
                next_id += 1
        (base / f"images_variant_{split}.txt").write_text("".join(lines), encoding="utf-8")
    return base


def make_imagefolder(
    path: Path,
    classes: Sequence[str] = ("red_apple", "green_pear", "blue_berry"),
    per_class: int | Sequence[int] = 10,
    form: str = "flat",
    image_size: int = 16,
) -> Path:
    """form="flat": path/<class>/*.png with `per_class` images. form="split" / "split_noval":
    path/{train,val,test}/<class>/*.png (without val/ for split_noval); per_class = (train, val, test)."""
    path = Path(path)
    if form == "flat":
        count = per_class if isinstance(per_class, int) else sum(per_class)
        for c, cname in enumerate(classes):
            _class_images(path / cname, cname, c, len(classes), count, 0, image_size, 0, "color", ".png")
        return path
    counts = (per_class, 2, 3) if isinstance(per_class, int) else tuple(per_class)
    splits = ("train", "test") if form == "split_noval" else ("train", "val", "test")
    for c, cname in enumerate(classes):
        start = 0
        for split, count in zip(("train", "val", "test"), counts):
            if split in splits:
                folder = path / split / cname
                _class_images(folder, cname, c, len(classes), count, start, image_size, 0, "color", ".png")
            start += count
    return path


def name_colours_as_the_model_sees_them(model_dir: Path, root: Path, n_colours: int,
                                        per_split: Sequence[int]) -> Path:  # fmt: skip
    """A colour set named so that a model pretrained on bare EuroSAT-like class names (``vlprompt.demo``) knows it:
    each colour gets the bare class name whose text feature the colour's images are closest to (greedy one-to-one).
    Zero-shot with EuroSAT's template ("a centered satellite photo of {}.") is then poor: the gap a prompt closes.
    Returns the data root holding that ``eurosat`` set."""
    import torch
    import torch.nn.functional as F

    from vlprompt.backbones import load_backbone
    from vlprompt.data.synthetic import EUROSAT_CLASSES
    from vlprompt.engine.api import DataOptions, load_splits
    from vlprompt.tasks import ClassificationTask

    backbone = load_backbone(str(model_dir))
    probe_root = root / "probe"
    make_split_json_dataset(probe_root, "eurosat", [f"colour{c}" for c in range(n_colours)], (1, 0, 3), 32, seed=7)
    probe = load_splits(DataOptions(dataset="eurosat", root=str(probe_root)))
    test_set = ClassificationTask(probe, backbone, augment=False).test
    with torch.no_grad():
        images = torch.stack([test_set[i][0] for i in range(len(test_set))])
        labels = torch.tensor([s.label for s in probe.test])
        feats = F.normalize(backbone.encode_image(images), dim=-1)
        colours = F.normalize(torch.stack([feats[labels == c].mean(0) for c in range(n_colours)]), dim=-1)
        names = F.normalize(backbone.encode_texts(EUROSAT_CLASSES), dim=-1)
    similarity = colours @ names.t()
    chosen: dict[int, int] = {}
    while len(chosen) < n_colours:  # greedy one-to-one matching, best pairs first
        masked = similarity.clone()
        masked[list(chosen)] = -2.0
        masked[:, list(chosen.values())] = -2.0
        flat = int(masked.argmax())
        chosen[flat // masked.shape[1]] = flat % masked.shape[1]
    classnames = [EUROSAT_CLASSES[chosen[c]] for c in range(n_colours)]
    data_root = root / "data"
    make_split_json_dataset(data_root, "eurosat", classnames, per_split, image_size=32)
    return data_root
