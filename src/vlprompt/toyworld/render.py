"""Rendering scenes to small RGB images (PIL polygons at 3x supersampling, numpy compositing), and object boxes.

``render(scene, size, domain)`` is a pure function of its arguments: every random choice (background texture,
noise, sketch strokes) is seeded from ``scene.seed``. Domains are rendering / post-processing modes of the same
scene, so a domain-shifted copy of a dataset shows the same scenes with the same classes:

- ``clean``: the plain rendering;
- ``noisy``: additive Gaussian pixel noise (sigma 28/255);
- ``blurred``: Gaussian blur (radius ~1 px at 48 px);
- ``lowcontrast``: contrast compressed to 30% around light grey;
- ``pixelated``: box-downsampled by 3 and blown up with nearest neighbour;
- ``inverted``: photographic negative (colours become their complements);
- ``sketch``: dark hand-drawn-looking outlines of the shapes on paper white; no colour, fill or background;
- ``tinted``: a colour cast over the whole image (per-channel gains 0.8..1.2 and brightness 0.8..1.12), as under
  coloured light; the neutral background shows the cast, so it can be discounted.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .world import DOMAINS, SHAPES, Obj, Scene

__all__ = ["SUPERSAMPLE", "boxes", "render", "render_array", "shape_outline", "visible_boxes"]

SUPERSAMPLE = 3  # draw at 3x the output size, then box-downsample: anti-aliased edges
MIN_SIZE, MAX_SIZE = 16, 256


# ----------------------------------------------------------------------------------------------- geometry
def _regular(n: int, start_deg: float, r: float = 1.0) -> np.ndarray:
    t = np.deg2rad(start_deg + 360.0 * np.arange(n) / n)
    return np.stack([r * np.cos(t), r * np.sin(t)], 1)


def _circle(n: int = 48, r: float = 1.0, cx: float = 0.0, cy: float = 0.0) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], 1)


def _arc(cx: float, cy: float, r: float, a0: float, a1: float, n: int) -> np.ndarray:
    t = np.deg2rad(np.linspace(a0, a1, n))
    return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], 1)


def _heart() -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, 60, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))  # y grows downwards
    pts = np.stack([x, y + 2.5], 1) / 16.5
    return pts


def _crescent() -> np.ndarray:
    # Unit disc minus a disc of radius r2 centred at (d, 0); outer arc on the left, inner arc back.
    d, r2 = 0.45, 0.85
    xi = (1 - r2**2 + d**2) / (2 * d)
    yi = math.sqrt(1 - xi**2)
    a_out = math.degrees(math.atan2(yi, xi))
    a_in = math.degrees(math.atan2(yi, xi - d))
    outer = _arc(0, 0, 1, a_out, 360 - a_out, 40)
    inner = _arc(d, 0, r2, 360 - a_in, a_in, 40)
    pts = np.concatenate([outer, inner])
    pts[:, 0] += 0.25  # centre the visible body
    return pts


@lru_cache(maxsize=None)
def _unit(shape: str, aspect_key: int) -> tuple[np.ndarray, np.ndarray | None]:
    """(outline, hole or None) in unit coordinates (x right, y down), fitting the unit disc."""
    aspect = aspect_key / 1000.0
    hole = None
    if shape == "circle":
        pts = _circle()
    elif shape == "ellipse":
        pts = _circle() * np.array([1.0, 1.0 / aspect])
    elif shape == "ring":
        pts, hole = _circle(), _circle(r=0.56)
    elif shape == "square":
        pts = np.array([[-0.78, -0.78], [0.78, -0.78], [0.78, 0.78], [-0.78, 0.78]])
    elif shape == "rectangle":
        h = 0.95 / aspect
        pts = np.array([[-0.95, -h], [0.95, -h], [0.95, h], [-0.95, h]])
    elif shape == "diamond":
        w = 1.0 / aspect
        pts = np.array([[0.0, -1.0], [w, 0.0], [0.0, 1.0], [-w, 0.0]])
    elif shape == "triangle":
        pts = _regular(3, -90) + np.array([0.0, 0.15])
    elif shape == "pentagon":
        pts = _regular(5, -90) + np.array([0.0, 0.05])
    elif shape == "hexagon":
        pts = _regular(6, -90)
    elif shape == "octagon":
        pts = _regular(8, -90 + 22.5)
    elif shape == "star":
        outer, inner = _regular(5, -90), _regular(5, -90 + 36, 0.42)
        pts = np.stack([outer, inner], 1).reshape(-1, 2) + np.array([0.0, 0.08])
    elif shape == "cross":
        a, b = 0.3, 0.95
        pts = np.array([[-a, -b], [a, -b], [a, -a], [b, -a], [b, a], [a, a], [a, b], [-a, b], [-a, a], [-b, a],
                        [-b, -a], [-a, -a]])  # fmt: skip
    elif shape == "heart":
        pts = _heart()
    elif shape == "crescent":
        pts = _crescent()
    elif shape == "arrow":
        pts = np.array([[-1.0, -0.22], [0.2, -0.22], [0.2, -0.62], [1.0, 0.0], [0.2, 0.62], [0.2, 0.22],
                        [-1.0, 0.22]])  # fmt: skip
    else:
        raise ValueError(f"unknown shape {shape!r}; use one of {', '.join(SHAPES)}")
    return pts.astype(np.float64), None if hole is None else hole.astype(np.float64)


def shape_outline(obj: Obj, scale: float) -> tuple[np.ndarray, np.ndarray | None]:
    """The object's outline (and hole) in pixel coordinates of a ``scale`` x ``scale`` canvas."""
    pts, hole = _unit(obj.shape, int(round(obj.aspect * 1000)))
    t = math.radians(obj.angle)
    rot = np.array([[math.cos(t), math.sin(t)], [-math.sin(t), math.cos(t)]])  # counter-clockwise on screen
    centre = np.array([obj.x, obj.y]) * scale
    r = obj.radius * scale

    def place(p: np.ndarray) -> np.ndarray:
        return (p @ rot) * r + centre

    return place(pts), None if hole is None else place(hole)


def boxes(scene: Scene, size: int = 48) -> list[dict[str, object]]:
    """COCO-style boxes of the scene's objects at ``size`` px: ``{"bbox": [x, y, w, h], "category": shape,
    "colour": ..., "fill": ..., "size": ...}``, clipped to the image, in object order."""
    out: list[dict[str, object]] = []
    for o in scene.objects:
        pts, _ = shape_outline(o, float(size))
        x0, y0 = np.clip(pts.min(0), 0, size)
        x1, y1 = np.clip(pts.max(0), 0, size)
        out.append({
            "bbox": [round(float(x0), 2), round(float(y0), 2), round(float(x1 - x0), 2), round(float(y1 - y0), 2)],
            "category": o.shape, "colour": o.colour, "fill": o.fill, "size": o.size,
        })  # fmt: skip
    return out


# --------------------------------------------------------------------------------------------- rasterising
@lru_cache(maxsize=8)
def _grid(n: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)
    return xx, yy


def _background(scene: Scene, n: int, rng: np.random.Generator) -> np.ndarray:
    """The background at the output resolution ``n`` (float32, 0..255)."""
    base = np.asarray(scene.bg_rgb, dtype=np.float32)
    img = np.empty((n, n, 3), np.float32)
    img[:] = base
    if scene.background == "gradient":
        xx, yy = _grid(n)
        other = base - rng.uniform(60, 110)  # towards mid grey
        theta = rng.uniform(0, 2 * np.pi)
        t = np.cos(theta) * xx + np.sin(theta) * yy
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        img = base + (other - base) * t[..., None]
    elif scene.background == "speckled":
        k = max(n // 8, 2)
        coarse = rng.normal(0, 22, (k, k)).astype(np.float32)
        coarse_img = np.asarray(Image.fromarray(coarse).resize((n, n), Image.BILINEAR))[..., None]
        img = img + coarse_img + rng.normal(0, 16, (n, n, 1)).astype(np.float32)
    elif scene.background == "grid":
        xx, yy = _grid(n)
        step = n / rng.uniform(5, 8)
        off = rng.uniform(0, step, 2)
        line = (((xx + off[0]) % step) < 1) | (((yy + off[1]) % step) < 1)
        img[line] = base - rng.uniform(45, 75)
    return img


def _pattern(fill: str, obj: Obj, n: int, sy: slice, sx: slice) -> np.ndarray:
    """1 where the object colour shows, 0 where the pale tint shows (object-centred, unrotated), on the crop."""
    xx, yy = _grid(n)
    period = max(4.0 * SUPERSAMPLE, 0.5 * obj.radius * n)  # at least 4 output pixels
    dx, dy = xx[sy, sx] - obj.x * n, yy[sy, sx] - obj.y * n
    if fill == "striped":
        return (((dx + dy) / period) % 1.0 < 0.5).astype(np.float32)
    if fill == "checkered":
        return ((np.floor(dx / period) + np.floor(dy / period)) % 2 == 0).astype(np.float32)
    if fill == "dotted":
        u, v = (dx / period) % 1.0 - 0.5, (dy / period) % 1.0 - 0.5
        return (u * u + v * v < 0.3**2).astype(np.float32)
    return np.ones(dx.shape, np.float32)


def _erode(mask: np.ndarray, k: int) -> np.ndarray:
    """Grey erosion with a (2k+1)^2 square (separable running minimum)."""
    out = mask
    for axis in (0, 1):
        padded = np.pad(out, [(k, k) if a == axis else (0, 0) for a in (0, 1)], constant_values=0)
        length = out.shape[axis]
        res = out.copy()
        for s in range(2 * k + 1):
            sl = [slice(None), slice(None)]
            sl[axis] = slice(s, s + length)
            np.minimum(res, padded[tuple(sl)], out=res)
        out = res
    return out


def _mask(obj: Obj, n: int) -> tuple[np.ndarray, int, int]:
    """Coverage (0..1) of the object on the supersampled n x n canvas, cropped to its bounding box (+margin) with
    the crop's corner (x0, y0) on a multiple of SUPERSAMPLE, so the crop downsamples onto whole output pixels."""
    pts, hole = shape_outline(obj, float(n))
    ss = SUPERSAMPLE
    x0, y0 = (np.floor(pts.min(0)).astype(int) - 2) // ss * ss
    x1, y1 = -(-(np.ceil(pts.max(0)).astype(int) + 3) // ss) * ss
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, n), min(y1, n)
    w, h = max(x1 - x0, ss), max(y1 - y0, ss)
    im = Image.new("L", (w, h), 0)
    d = ImageDraw.Draw(im)
    off = np.array([x0, y0])
    d.polygon([tuple(p) for p in (pts - off).tolist()], fill=255)
    if hole is not None:
        d.polygon([tuple(p) for p in (hole - off).tolist()], fill=0)
    return np.asarray(im, dtype=np.float32) * (1.0 / 255.0), int(x0), int(y0)


def _down(a: np.ndarray) -> np.ndarray:
    """Box-downsample the first two axes by SUPERSAMPLE."""
    ss = SUPERSAMPLE
    h, w = a.shape[0] // ss, a.shape[1] // ss
    return a.reshape(h, ss, w, ss, *a.shape[2:]).mean((1, 3))


def _draw_objects(img: np.ndarray, scene: Scene, size: int) -> None:
    """Composite the objects onto the output-resolution image: coverage and premultiplied colour are computed
    at SUPERSAMPLE x resolution in each object's crop and box-averaged (exact over a flat background)."""
    n = size * SUPERSAMPLE
    for obj in scene.objects:
        a, x0, y0 = _mask(obj, n)
        rgb = np.asarray(obj.rgb, np.float32)
        if obj.fill == "outlined":
            k = max(int(round(0.2 * obj.radius * n)), SUPERSAMPLE)
            a = a - _erode(a, k)
        if obj.fill in ("solid", "outlined"):
            premult = a[..., None] * rgb
        else:
            h, w = a.shape
            pat = _pattern(obj.fill, obj, n, slice(y0, y0 + h), slice(x0, x0 + w))[..., None]
            tint = 0.25 * rgb + 0.75 * 250.0
            premult = a[..., None] * (tint + pat * (rgb - tint))
        a_lo, p_lo = _down(a)[..., None], _down(premult)
        sy = slice(y0 // SUPERSAMPLE, y0 // SUPERSAMPLE + a_lo.shape[0])
        sx = slice(x0 // SUPERSAMPLE, x0 // SUPERSAMPLE + a_lo.shape[1])
        img[sy, sx] = img[sy, sx] * (1 - a_lo) + p_lo


def _draw_sketch(scene: Scene, size: int, rng: np.random.Generator) -> np.ndarray:
    n = size * SUPERSAMPLE
    paper = float(rng.uniform(236, 252))
    im = Image.new("L", (n, n), int(paper))
    d = ImageDraw.Draw(im)
    width = max(1, int(round(n / 48 * 1.4)))
    for obj in scene.objects:
        ink = int(rng.uniform(30, 110))
        outline, hole = shape_outline(obj, float(n))
        for poly in (outline, hole):
            if poly is None:
                continue
            for stroke in range(2):  # two slightly different passes: a hand-drawn look
                jitter = rng.normal(0, 0.035 * obj.radius * n, poly.shape)
                p = poly + jitter
                closed = np.concatenate([p, p[:1]])
                d.line([tuple(q) for q in closed.tolist()], fill=ink if stroke == 0 else min(ink + 50, 200),
                       width=width, joint="curve")  # fmt: skip
    arr = np.asarray(im.reduce(SUPERSAMPLE), dtype=np.float32)
    return np.repeat(arr[..., None], 3, 2)


def _coverage(obj: Obj, n: int) -> np.ndarray:
    """What the object paints on the supersampled n x n canvas (0..1): its shape, or only the rim when outlined."""
    a, x0, y0 = _mask(obj, n)
    if obj.fill == "outlined":
        a = a - _erode(a, max(int(round(0.2 * obj.radius * n)), SUPERSAMPLE))
    full = np.zeros((n, n), np.float32)
    full[y0:y0 + a.shape[0], x0:x0 + a.shape[1]] = a
    return full


def visible_boxes(scene: Scene, size: int = 48) -> list[dict[str, object]]:
    """:func:`boxes` of the parts left visible where objects overlap (a later object covers an earlier one), as
    COCO annotates occluded objects, with ``"visible"``: the fraction of the object's painted area left in view.

    An object nothing covers keeps its exact outline box; a covered one gets the box of its visible pixels (those
    still at least half covered by it, at the renderer's 3x supersampling), within its outline box. Background and
    domain do not matter: this is geometry only."""
    n = size * SUPERSAMPLE
    covers = [_coverage(o, n) for o in scene.objects]
    out = boxes(scene, size)
    hidden = np.zeros((n, n), np.float32)  # how much of each pixel the objects drawn later cover
    for i in range(len(covers) - 1, -1, -1):
        own = covers[i]
        seen = own * (1.0 - hidden)
        area = float(own.sum())
        out[i]["visible"] = round(float(seen.sum()) / area, 4) if area > 0 else 0.0
        if float((own * hidden).max(initial=0.0)) > 0:
            ys, xs = np.nonzero(seen >= 0.5)
            if len(xs):
                x0, y0, w, h = out[i]["bbox"]  # type: ignore[misc]
                vx0, vy0 = max(xs.min() / SUPERSAMPLE, x0), max(ys.min() / SUPERSAMPLE, y0)
                vx1, vy1 = min((xs.max() + 1) / SUPERSAMPLE, x0 + w), min((ys.max() + 1) / SUPERSAMPLE, y0 + h)
                out[i]["bbox"] = [round(float(vx0), 2), round(float(vy0), 2), round(float(max(vx1 - vx0, 0.0)), 2),
                                  round(float(max(vy1 - vy0, 0.0)), 2)]  # fmt: skip
            else:
                out[i]["bbox"] = [0.0, 0.0, 0.0, 0.0]
        hidden = 1.0 - (1.0 - hidden) * (1.0 - own)
    return out


def render_array(scene: Scene, size: int = 48, domain: str = "clean") -> np.ndarray:
    """The scene as an (size, size, 3) uint8 array (see :func:`render`)."""
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise ValueError(f"image size must be in {MIN_SIZE}..{MAX_SIZE} px, got {size}")
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; use one of {', '.join(DOMAINS)}")
    rng = np.random.default_rng(scene.seed)
    if domain == "sketch":
        img = _draw_sketch(scene, size, rng)
    else:
        img = _background(scene, size, rng)
        _draw_objects(img, scene, size)
    post = np.random.default_rng((scene.seed, DOMAINS.index(domain)))
    if domain == "sketch":
        img = img + post.normal(0, 3, img.shape)  # paper grain
    elif domain == "noisy":
        img = img + post.normal(0, 28, img.shape)
    elif domain == "blurred":
        pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
        return np.asarray(pil.filter(ImageFilter.GaussianBlur(radius=1.1 * size / 48)))
    elif domain == "lowcontrast":
        img = 175.0 + 0.3 * (img - 175.0)
    elif domain == "pixelated":
        f = 3
        m = size // f
        small = img[: m * f, : m * f].reshape(m, f, m, f, 3).mean((1, 3))
        pil = Image.fromarray(np.clip(small, 0, 255).astype(np.uint8)).resize((size, size), Image.NEAREST)
        return np.asarray(pil)
    elif domain == "inverted":
        img = 255.0 - img
    elif domain == "tinted":  # coloured light: per-channel gains around a random brightness
        img = img * (post.uniform(0.8, 1.12) * post.uniform(0.8, 1.2, 3))
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


def render(scene: Scene, size: int = 48, domain: str = "clean") -> Image.Image:
    """The scene as a ``size`` x ``size`` RGB PIL image rendered in ``domain`` (see the module docstring)."""
    return Image.fromarray(render_array(scene, size, domain), "RGB")
