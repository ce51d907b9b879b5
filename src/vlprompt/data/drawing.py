"""Detections drawn on their image with Pillow alone: a box per detection in its category's colour, labelled with
the category phrase and the score (what ``vlprompt predict`` writes for a detection run)."""
from __future__ import annotations

import math
from typing import Any, Sequence

from PIL import Image, ImageDraw, ImageFont

# Twelve colours far apart from each other and from grey; category i gets PALETTE[i % 12].
PALETTE = (
    (228, 26, 28), (55, 126, 184), (77, 175, 74), (152, 78, 163), (255, 127, 0), (255, 221, 51),
    (166, 86, 40), (247, 129, 191), (0, 190, 190), (120, 200, 20), (30, 30, 160), (200, 0, 110),
)


def category_colour(index: int) -> tuple[int, int, int]:
    return PALETTE[index % len(PALETTE)]


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1: a scalable font (FreeType)
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()  # older Pillow or no FreeType: the fixed bitmap font


def _text_colour(fill: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black on light label backgrounds, white on dark ones."""
    luminance = 0.299 * fill[0] + 0.587 * fill[1] + 0.114 * fill[2]
    return (0, 0, 0) if luminance > 140 else (255, 255, 255)


def pixel_box(box: Sequence[float], width: int, height: int) -> tuple[int, int, int, int]:
    """The pixel rows and columns a box ``[x0, y0, x1, y1]`` (continuous pixel coordinates: ``x1`` is the right
    edge) covers, inclusive, inside the image: the rectangle its outline is drawn on."""
    x0 = min(max(int(math.floor(box[0])), 0), width - 1)
    y0 = min(max(int(math.floor(box[1])), 0), height - 1)
    x1 = min(max(int(math.ceil(box[2])) - 1, x0), width - 1)
    y1 = min(max(int(math.ceil(box[3])) - 1, y0), height - 1)
    return x0, y0, x1, y1


def draw_detections(image: Image.Image, detections: Sequence[dict[str, Any]]) -> Image.Image:
    """A copy of ``image`` (RGB, same size) with each detection's box outlined in its category's colour and
    labelled ``"<phrase> <score>"``. Detections are dicts with ``box`` ([x0, y0, x1, y1] in the image's pixels),
    ``label``, ``score`` and ``category_index``; the highest-scoring box is drawn last, on top."""
    out = image.convert("RGB")  # always a new image: the caller's is left as it was
    width, height = out.size
    draw = ImageDraw.Draw(out)
    line = max(1, round(min(width, height) / 250))
    font = _font(max(9, round(min(width, height) / 40)))
    pad = max(1, line)
    for det in sorted(detections, key=lambda d: d["score"]):
        colour = category_colour(int(det.get("category_index", 0)))
        x0, y0, x1, y1 = pixel_box(det["box"], width, height)
        draw.rectangle((x0, y0, x1, y1), outline=colour, width=line)
        text = f"{det['label']} {det['score']:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        label_w, label_h = right - left + 2 * pad, bottom - top + 2 * pad
        # above the box when there is room, else just inside its top edge; kept inside the image horizontally
        ty = y0 - label_h if y0 - label_h >= 0 else y0
        tx = max(0, min(x0, width - label_w))
        draw.rectangle((tx, ty, tx + label_w - 1, ty + label_h - 1), fill=colour)
        draw.text((tx + pad - left, ty + pad - top), text, fill=_text_colour(colour), font=font)
    return out
