"""Image preprocessing with PIL + torch only (torchvision is deliberately not a dependency).

The eval transform reproduces Hugging Face's CLIPImageProcessor (shortest-side bicubic resize with ``int()``
rounding, floor-centred crop, rescale to [0, 1], normalise), so features match what the backbone's own
processor would produce. The train transform is CoOp's: RandomResizedCrop + horizontal flip, following
torchvision's algorithm and RNG calls.

Randomness: the train transform draws only from **torch's global RNG** (``torch.rand``/``torch.randint``), as
torchvision does. ``torch.manual_seed(s)`` makes it reproducible, and DataLoader workers automatically get
distinct, seed-derived torch RNG states.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

__all__ = ["EvalTransform", "ImageTransformConfig", "TrainTransform", "build_transform", "pil_to_tensor"]

_BICUBIC = Image.Resampling.BICUBIC


@dataclass(frozen=True)
class ImageTransformConfig:
    size: int  # square crop size fed to the model
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize_shortest: int | None = None  # shortest side before the centre crop; None = size

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"size must be >= 1, got {self.size}")
        object.__setattr__(self, "mean", _triple(self.mean, "mean"))
        object.__setattr__(self, "std", _triple(self.std, "std"))
        if min(self.std) <= 0:
            raise ValueError(f"std must be positive, got {self.std}")
        if self.resize_shortest is not None and self.resize_shortest < self.size:
            raise ValueError(f"resize_shortest ({self.resize_shortest}) must be >= size ({self.size})")

    @property
    def shortest_edge(self) -> int:
        return self.resize_shortest if self.resize_shortest is not None else self.size

    @classmethod
    def from_image_processor(cls, processor: Any) -> ImageTransformConfig:
        """Read crop size, resize size and mean/std from a transformers image processor (or a processor that
        wraps one in ``.image_processor``). Handles transformers 5 ``SizeDict`` objects, plain dicts and ints.

        Processors that resize straight to a square without cropping (SigLIP-style ``size={"height","width"}``)
        are approximated by shortest-side resize + centre crop of that size.
        """
        if getattr(processor, "image_mean", None) is None and hasattr(processor, "image_processor"):
            processor = processor.image_processor
        size = _size_fields(getattr(processor, "size", None), int_is_square=False)
        crop = _size_fields(getattr(processor, "crop_size", None), int_is_square=True)
        if not getattr(processor, "do_center_crop", True):
            crop = {}
        crop_hw = _square(crop) or _square(size) or size.get("shortest_edge")
        if crop_hw is None:
            raise ValueError(
                f"cannot read an image size from {type(processor).__name__}: crop_size={crop}, size={size}"
            )
        shortest = size.get("shortest_edge") or _square(size) or crop_hw
        mean = getattr(processor, "image_mean", None)
        std = getattr(processor, "image_std", None)
        if mean is None or std is None:
            raise ValueError(f"{type(processor).__name__} has no image_mean/image_std")
        return cls(size=crop_hw, mean=mean, std=std, resize_shortest=max(shortest, crop_hw))


def _triple(values: Any, what: str) -> tuple[float, float, float]:
    if isinstance(values, (int, float)):  # some processors store one value for all channels
        values = (values,) * 3
    vals = tuple(float(v) for v in values)
    if len(vals) != 3:
        raise ValueError(f"{what} must have 3 values (RGB), got {values!r}")
    return vals  # type: ignore[return-value]


def _size_fields(spec: Any, int_is_square: bool) -> dict[str, int]:
    """Normalise an int / dict / SizeDict size spec to the non-empty keys among height, width, shortest_edge.
    A bare int means a square for crop sizes, and the shortest edge for resize sizes (CLIP's legacy format)."""
    if spec is None:
        return {}
    if isinstance(spec, int):
        return {"height": spec, "width": spec} if int_is_square else {"shortest_edge": spec}
    if isinstance(spec, Sequence) and len(spec) == 2:  # (height, width)
        return {"height": int(spec[0]), "width": int(spec[1])}
    get = spec.get if isinstance(spec, Mapping) else (lambda k: getattr(spec, k, None))
    return {k: int(v) for k in ("height", "width", "shortest_edge") if (v := get(k))}


def _square(fields: Mapping[str, int]) -> int | None:
    h, w = fields.get("height"), fields.get("width")
    if h is None or w is None:
        return None
    if h != w:
        raise ValueError(f"only square model inputs are supported, got height={h}, width={w}")
    return h


def pil_to_tensor(img: Image.Image, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """RGB PIL image -> normalised float CHW tensor (`mean`/`std` shaped (3, 1, 1)).

    The arithmetic runs in numpy: the same float32 operations in the same order (so the same values), without
    torch's intra-op thread pool, whose hand-offs made these small per-image operations 5x slower in a training
    process whose other core was busy (docs/benchmarks/data_path.md)."""
    arr = np.asarray(img.convert("RGB"), dtype=np.float32).transpose(2, 0, 1)
    x = np.ascontiguousarray(arr) / np.float32(255.0)
    x -= mean.numpy()
    x /= std.numpy()
    return torch.from_numpy(x)


class _Base:
    def __init__(self, cfg: ImageTransformConfig) -> None:
        self.cfg = cfg
        self.mean = torch.tensor(cfg.mean).view(3, 1, 1)
        self.std = torch.tensor(cfg.std).view(3, 1, 1)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.cfg})"


class EvalTransform(_Base):
    """Resize shortest side (bicubic), centre crop, to tensor, normalise. Deterministic."""

    def __call__(self, img: Image.Image) -> torch.Tensor:
        img = img.convert("RGB")
        w, h = img.size
        s = self.cfg.shortest_edge
        # int() truncation as in transformers' get_resize_output_image_size, to match its output exactly.
        new_w, new_h = (s, int(s * h / w)) if w <= h else (int(s * w / h), s)
        img = img.resize((new_w, new_h), _BICUBIC)
        c = self.cfg.size
        top, left = (new_h - c) // 2, (new_w - c) // 2
        return pil_to_tensor(img.crop((left, top, left + c, top + c)), self.mean, self.std)


class TrainTransform(_Base):
    """RandomResizedCrop(size, scale=(0.08, 1), ratio=(3/4, 4/3), bicubic) + horizontal flip (p=0.5) +
    normalise, drawing from torch's global RNG."""

    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    flip_p: float = 0.5

    def __call__(self, img: Image.Image) -> torch.Tensor:
        img = img.convert("RGB")
        left, top, w, h = self._crop_box(*img.size)
        c = self.cfg.size
        img = img.crop((left, top, left + w, top + h)).resize((c, c), _BICUBIC)
        if torch.rand(1).item() < self.flip_p:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return pil_to_tensor(img, self.mean, self.std)

    def _crop_box(self, width: int, height: int) -> tuple[int, int, int, int]:
        """torchvision's RandomResizedCrop.get_params: 10 tries at a random area/aspect, then a centre crop
        with the aspect ratio clamped into range."""
        area = width * height
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target_area = area * torch.empty(1).uniform_(*self.scale).item()
            aspect = math.exp(torch.empty(1).uniform_(*log_ratio).item())
            w = round(math.sqrt(target_area * aspect))
            h = round(math.sqrt(target_area / aspect))
            if 0 < w <= width and 0 < h <= height:
                top = int(torch.randint(0, height - h + 1, size=(1,)).item())
                left = int(torch.randint(0, width - w + 1, size=(1,)).item())
                return left, top, w, h
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            w, h = width, round(width / self.ratio[0])
        elif in_ratio > self.ratio[1]:
            w, h = round(height * self.ratio[1]), height
        else:
            w, h = width, height
        return (width - w) // 2, (height - h) // 2, w, h


def build_transform(
    cfg: ImageTransformConfig, train: bool, augment: bool = True
) -> Callable[[Image.Image], torch.Tensor]:
    """Train+augment -> TrainTransform; otherwise the deterministic EvalTransform. Both are picklable
    objects (not closures) so DataLoader workers can use them under any start method."""
    return TrainTransform(cfg) if train and augment else EvalTransform(cfg)
