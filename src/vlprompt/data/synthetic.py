"""A tiny generated image-classification set written in the standard (CoOp) on-disk layout.

Until the procedural toy world lands, this is what the demo and smoke tests train on: each class is a colour
with a class-specific stripe pattern plus noise, so it is separable but not trivially so at low resolution.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

# EuroSAT's ten class names, so the generated set reads like the real one.
EUROSAT_CLASSES = [
    "Annual Crop Land", "Forest", "Herbaceous Vegetation Land", "Highway or Road", "Industrial Buildings",
    "Pasture Land", "Permanent Crop Land", "Residential Buildings", "River", "Sea or Lake",
]


def _class_image(rng: np.random.Generator, label: int, n_classes: int, size: int) -> np.ndarray:
    hue = label / n_classes
    base = np.array([np.sin(2 * np.pi * (hue + k / 3)) * 0.5 + 0.5 for k in range(3)])
    yy, xx = np.mgrid[0:size, 0:size] / size
    angle = np.pi * label / n_classes
    stripes = 0.5 + 0.5 * np.sin(2 * np.pi * (2 + label % 3) * (np.cos(angle) * xx + np.sin(angle) * yy)
                                 + rng.uniform(0, 2 * np.pi))
    img = base[None, None, :] * (0.6 + 0.4 * stripes[..., None])
    img = img + rng.normal(0, 0.08, img.shape)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def make_synthetic_eurosat(
    root: str | Path,
    per_split: tuple[int, int, int] = (16, 4, 10),
    classnames: list[str] | None = None,
    image_size: int = 32,
    seed: int = 0,
) -> Path:
    """Write ``root/eurosat/{2750/<class>/*.jpg, split_zhou_EuroSAT.json}``; returns ``root``."""
    classnames = classnames or EUROSAT_CLASSES
    rng = np.random.default_rng(seed)
    base = Path(root) / "eurosat"
    split = {"train": [], "val": [], "test": []}
    for label, name in enumerate(classnames):
        folder = name.replace(" ", "")
        (base / "2750" / folder).mkdir(parents=True, exist_ok=True)
        i = 0
        for split_name, count in zip(("train", "val", "test"), per_split):
            for _ in range(count):
                rel = f"{folder}/{folder}_{i}.jpg"
                Image.fromarray(_class_image(rng, label, len(classnames), image_size)).save(base / "2750" / rel, quality=95)
                split[split_name].append([rel, label, name])
                i += 1
    (base / "split_zhou_EuroSAT.json").write_text(json.dumps(split))
    return Path(root)
