"""NLVR2 as released: statements about a pair of images, true or false (``../shared/specs/datasets.md``).

Layout::

    <root>/<split>.json                 JSON lines: {"identifier", "sentence", "label": "True"|"False",
                                                     "directory" (train only), ...}
    <root>/<split>/[<directory>/]<pair>-img0.png, -img1.png     (or under <root>/images/<split>/)

where ``<pair>`` is the identifier without its last field (``dev-850-0-0`` -> ``dev-850-0``): the NLVR2 images of
train are spread over numbered directories, those of dev and test-P are not. The metric is accuracy.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from vlprompt.data.errors import DatasetError

LABELS = {"True": True, "False": False}
IMAGE_SUFFIXES = ("-img0.png", "-img1.png")


@dataclass
class NLVR2Example:
    identifier: str
    sentence: str
    label: bool
    images: tuple[Path, Path]


def pair_images(root: Path, split: str, identifier: str, directory: str | None) -> tuple[Path, Path]:
    """The two image files of an example (the first place that holds both; else where they should be)."""
    pair = identifier.rsplit("-", 1)[0]
    folders = [root / split, root / "images" / split]
    if directory is not None:
        folders = [f / str(directory) for f in folders] + folders
    for folder in folders:
        paths = tuple(folder / f"{pair}{suffix}" for suffix in IMAGE_SUFFIXES)
        if all(p.is_file() for p in paths):
            return paths  # type: ignore[return-value]
    return tuple(folders[0] / f"{pair}{suffix}" for suffix in IMAGE_SUFFIXES)  # type: ignore[return-value]


def load_nlvr2_split(root: str | Path, split: str) -> list[NLVR2Example]:
    """The examples of ``split`` (``train``, ``dev``, ``test1``), each with its two image paths."""
    root = Path(root)
    path = root / f"{split}.json"
    if not path.is_file():
        raise DatasetError(f"{path} does not exist: an NLVR2 folder holds <split>.json (JSON lines) and the images")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DatasetError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start}); NLVR2 files are UTF-8 "
                           "JSON lines: re-save it as UTF-8") from None
    examples = []
    seen: set[str] = set()
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            raise DatasetError(f"{path}, line {number}: not valid JSON ({err.msg}); NLVR2 files hold one JSON object "
                               "per line") from None
        if isinstance(item, list):
            raise DatasetError(f"{path}, line {number}: a JSON array; NLVR2 files hold one JSON object per line "
                               "(JSON lines), not one array")
        try:
            identifier, sentence, label = item["identifier"], item["sentence"], item["label"]
        except (KeyError, TypeError):
            raise DatasetError(f"{path}, line {number}: an example needs identifier, sentence and label") from None
        if isinstance(label, bool):
            raise DatasetError(f"{path}, line {number}: label {str(label).lower()} is a JSON boolean; NLVR2 writes "
                               f"the string \"{label}\"")
        if not isinstance(label, str) or label not in LABELS:
            raise DatasetError(f"{path}, line {number}: label {label!r} is not \"True\" or \"False\"")
        if not isinstance(identifier, str) or not identifier:
            raise DatasetError(f"{path}, line {number}: identifier {identifier!r} is not text like "
                               "\"dev-850-0-0\"")
        if not isinstance(sentence, str) or not sentence.strip():
            raise DatasetError(f"{path}, line {number}: sentence {sentence!r} is not a statement (text)")
        if identifier in seen:
            raise DatasetError(f"{path}, line {number}: identifier {identifier} occurs twice; each example has its own")
        seen.add(identifier)
        images = pair_images(root, split, identifier, item.get("directory"))
        examples.append(NLVR2Example(identifier, sentence, LABELS[label], images))
    if not examples:
        raise DatasetError(f"{path} holds no examples")
    missing = [p for e in examples for p in e.images if not p.is_file()]
    if missing:
        raise DatasetError(f"{len(missing)} image(s) of {split} are missing, e.g. {missing[0]}; put the NLVR2 "
                           f"{split} images under {root / split}")
    return examples
