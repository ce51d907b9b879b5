"""Image-text retrieval data as the field uses it (Karpathy's split files for Flickr30K and COCO) and its recall.

Layout: ``<root>/dataset_flickr30k.json`` or ``dataset_coco.json``: ``{"images": [{"filename", "split":
"train"|"val"|"test"|"restval", "sentences": [{"raw"}, ...], "filepath" (COCO: "train2014"|"val2014")}]}``, five
captions per image; the images under ``<root>/<filepath>/`` (COCO) or ``<root>/images/`` / ``<root>/`` (Flickr30K).
Training uses ``train`` (and COCO's ``restval``, as ViLT and METER do); the 1K (Flickr30K) or 5K (COCO) test images
are scored by recall at 1/5/10 in both directions.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from vlprompt.data.errors import DatasetError

SPLIT_FILES = ("dataset_flickr30k.json", "dataset_coco.json")
TRAIN_SPLITS = ("train", "restval")


@dataclass
class RetrievalImage:
    path: Path
    captions: list[str]


def _image_path(root: Path, item: dict) -> Path:
    name = item["filename"]
    for folder in ([root / item["filepath"]] if item.get("filepath") else []) + [root / "images", root]:
        if (folder / name).is_file():
            return folder / name
    return (root / item["filepath"] if item.get("filepath") else root / "images") / name


def _split_file(root: Path) -> tuple[Path, list]:
    """Karpathy's split file in ``root`` and its image entries."""
    files = [root / name for name in SPLIT_FILES if (root / name).is_file()]
    if not files:
        raise DatasetError(f"{root} holds neither {' nor '.join(SPLIT_FILES)}: a retrieval folder holds Karpathy's "
                           "split file and the images")
    path = files[0]
    try:
        items = json.loads(path.read_text(encoding="utf-8"))["images"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        raise DatasetError(f"{path} is not a Karpathy split file ({type(err).__name__}): it needs an 'images' list") \
            from None  # fmt: skip
    if not isinstance(items, list):
        raise DatasetError(f"{path} is not a Karpathy split file: its 'images' is not a list")
    _check_entries(path, items)
    return path, items


def _check_entries(path: Path, items: list) -> None:
    """Each image entry's split is one of Karpathy's (a typo would drop the image from every split without a word),
    its captions are text, and no image is listed twice."""
    seen: set[tuple[str, str]] = set()
    for number, item in enumerate(items):
        if not isinstance(item, dict):
            raise DatasetError(f"{path}: image entry {number} is {str(item)[:60]!r}, not an object with filename, "
                               "split and sentences")
        split = item.get("split")
        if split not in (*TRAIN_SPLITS, "val", "test"):
            raise DatasetError(f"{path}: image entry {number} ({item.get('filename')}) has the split {split!r}; "
                               f"Karpathy's splits are {', '.join((*TRAIN_SPLITS, 'val', 'test'))}")
        sentences = item.get("sentences")
        if isinstance(sentences, list):
            bad = [s.get("raw") if isinstance(s, dict) else s for s in sentences
                   if not (isinstance(s, dict) and isinstance(s.get("raw"), str) and s["raw"].strip())]
            if bad:
                raise DatasetError(f"{path}: image entry {number} ({item.get('filename')}) has the caption "
                                   f"{bad[0]!r}; each sentence needs its text as 'raw'")
        key = (str(item.get("filepath") or ""), str(item.get("filename")))
        if key in seen:
            raise DatasetError(f"{path}: image entry {number} lists {'/'.join(k for k in key if k)} again; each "
                               "image has one entry with all its captions")
        seen.add(key)


def retrieval_splits(root: str | Path) -> set[str]:
    """The splits the split file in ``root`` has images of ("restval" counts as "train")."""
    _, items = _split_file(Path(root))
    names = {str(item.get("split")) for item in items if isinstance(item, dict)}
    return {"train" if name in TRAIN_SPLITS else name for name in names}


def load_retrieval_split(root: str | Path, split: str) -> list[RetrievalImage]:
    """The images of ``split`` ("train" also takes COCO's "restval") with their captions."""
    root = Path(root)
    path, items = _split_file(root)
    wanted = TRAIN_SPLITS if split == "train" else (split,)
    images = []
    for number, item in enumerate(items):
        try:
            if item["split"] not in wanted:
                continue
            captions = [s["raw"] for s in item["sentences"]]
            image = RetrievalImage(_image_path(root, item), captions)
        except (KeyError, TypeError):
            raise DatasetError(f"{path}: image entry {number} needs filename, split and sentences[].raw") from None
        if not captions:
            raise DatasetError(f"{path}: image entry {number} ({item['filename']}) has no captions")
        images.append(image)
    if not images:
        raise DatasetError(f"{path} has no {split} images; its splits are "
                           f"{sorted({str(i.get('split')) for i in items if isinstance(i, dict)})}")  # fmt: skip
    missing = [i.path for i in images if not i.path.is_file()]
    if missing:
        raise DatasetError(f"{len(missing)} of {len(images)} {split} images are missing, e.g. {missing[0]}")
    return images


def recall_at_k(scores: torch.Tensor, caption_image: torch.Tensor, ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    """Recall (%) at each k both ways from ``scores`` ``(images, captions)`` (higher: more similar) and the image
    index of every caption: image-to-text counts an image found when any of its captions ranks in its top k;
    text-to-image, when a caption's own image ranks in its top k."""
    n_images, n_captions = scores.shape
    if caption_image.shape != (n_captions,):
        raise ValueError(f"caption_image has shape {tuple(caption_image.shape)}; expected ({n_captions},)")
    own = caption_image.unsqueeze(0) == torch.arange(n_images).unsqueeze(1)  # (images, captions): caption of image
    # image -> text: the best rank among the image's captions
    order = scores.argsort(dim=1, descending=True)
    ranks_of_captions = torch.empty_like(order)
    ranks_of_captions.scatter_(1, order, torch.arange(n_captions).expand(n_images, -1))
    best_caption_rank = torch.where(own, ranks_of_captions, torch.full_like(ranks_of_captions, n_captions)).amin(1)
    # text -> image: the rank of the caption's own image
    image_order = scores.t().argsort(dim=1, descending=True)
    image_rank = (image_order == caption_image.unsqueeze(1)).float().argmax(dim=1)
    out = {}
    for k in ks:
        out[f"i2t_r{k}"] = 100.0 * float((best_caption_rank < k).float().mean())
        out[f"t2i_r{k}"] = 100.0 * float((image_rank < k).float().mean())
    return out
