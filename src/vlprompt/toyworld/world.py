"""The toy world's vocabulary, scene records, the pretraining hold-out and the seeded scene sampler.

A :class:`Scene` is a complete, renderer-independent description of one image: one to five :class:`Obj` records
(shape, colour, size, fill, exact position, rotation, jittered RGB) plus a background and a pixel seed. Everything
random about an image is decided here, so ``render(scene, size, domain)`` and ``boxes(scene, size)`` are pure
functions of their arguments, and the same scene can be rendered in any domain or resolution.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Union

import numpy as np

__all__ = [
    "BACKGROUNDS",
    "COLOURS",
    "COMBO_COLOURS",
    "COMBO_SHAPES",
    "DOMAINS",
    "FILLS",
    "FILL_WEIGHTS",
    "HOLDOUT",
    "KINDS",
    "KIND_WEIGHTS",
    "NO_HOLDOUT",
    "POSITIONS",
    "PRETRAIN_DOMAINS",
    "RELATIONS",
    "SHAPES",
    "SIZES",
    "VARY_WEIGHTS",
    "WORLD_VERSION",
    "Holdout",
    "Obj",
    "Scene",
    "as_rng",
    "attribute_values",
    "sample_crowd",
    "sample_scene",
    "vary_scene",
]

# Bumped whenever a change to the sampler, renderer or captions changes what a seed produces; cached datasets and
# corpora record it and are regenerated when it differs.
WORLD_VERSION = 2

# ------------------------------------------------------------------------------------------------- vocabulary
# Fifteen shapes; deliberately similar groups: circle/ellipse/ring/octagon, square/rectangle/diamond,
# pentagon/hexagon/octagon.
SHAPES: tuple[str, ...] = (
    "circle", "ellipse", "ring", "square", "rectangle", "diamond", "triangle", "pentagon", "hexagon",
    "octagon", "star", "cross", "heart", "crescent", "arrow",
)  # fmt: skip

# Twelve named colours (sRGB); close groups: red/crimson/orange, blue/navy/teal, green/lime, pink/purple.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 35, 35),
    "crimson": (145, 15, 50),
    "orange": (245, 135, 20),
    "yellow": (240, 215, 35),
    "lime": (165, 225, 45),
    "green": (30, 140, 55),
    "teal": (15, 140, 140),
    "blue": (45, 95, 235),
    "navy": (25, 35, 115),
    "purple": (135, 50, 185),
    "pink": (245, 130, 195),
    "brown": (125, 75, 35),
}
COLOUR_JITTER = 14  # +- per channel, uniform, per object instance

# Object radius (fraction of the image side) per size word: drawn uniformly in the range.
SIZES: dict[str, tuple[float, float]] = {
    "small": (0.085, 0.11),
    "medium": (0.15, 0.18),
    "large": (0.235, 0.27),
}
FILLS: tuple[str, ...] = ("solid", "striped", "dotted", "checkered", "outlined")
FILL_WEIGHTS: dict[str, float] = {
    "solid": 0.5, "striped": 0.125, "dotted": 0.125, "checkered": 0.125, "outlined": 0.125,
}  # fmt: skip
# Named regions for single-object scenes (a 3 x 3 grid): centre (x, y) as fractions of the image, jittered by
# +-0.05. Captions name a corner in full ("top left") only now and then, otherwise by one of its two sides.
POSITIONS: dict[str, tuple[float, float]] = {
    "left": (0.27, 0.5),
    "right": (0.73, 0.5),
    "top": (0.5, 0.27),
    "bottom": (0.5, 0.73),
    "center": (0.5, 0.5),
    "top left": (0.27, 0.27),
    "top right": (0.73, 0.27),
    "bottom left": (0.27, 0.73),
    "bottom right": (0.73, 0.73),
}
# Relation of objects[0] to objects[1] in "pair" scenes.
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
BACKGROUNDS: tuple[str, ...] = ("white", "grey", "dark", "gradient", "speckled", "grid")
# Rendering modes applied to the same scene ("clean" = the plain rendering).
DOMAINS: tuple[str, ...] = (
    "clean", "noisy", "blurred", "lowcontrast", "pixelated", "inverted", "sketch", "tinted",
)  # fmt: skip

# Scene kinds: one object; 1..5 copies of one object; two objects in a spatial relation; 2..4 different objects.
KINDS: tuple[str, ...] = ("single", "count", "pair", "multi")
KIND_WEIGHTS: dict[str, float] = {"single": 0.45, "count": 0.2, "pair": 0.2, "multi": 0.15}

# The colour x shape grid of the combination dataset (toy_combo: 10 x 12 = 120 classes).
COMBO_COLOURS: tuple[str, ...] = (
    "red", "orange", "yellow", "green", "teal", "blue", "navy", "purple", "pink", "brown",
)  # fmt: skip
COMBO_SHAPES: tuple[str, ...] = (
    "circle", "square", "triangle", "star", "cross", "heart", "crescent", "arrow", "hexagon", "diamond", "ring",
    "ellipse",
)  # fmt: skip


# ---------------------------------------------------------------------------------------------------- records
RGB = tuple[int, int, int]


@dataclass(frozen=True)
class Obj:
    """One object. Geometry is in fractions of the image side, so it renders at any resolution."""

    shape: str
    colour: str
    size: str
    fill: str
    x: float  # centre, 0 = left edge, 1 = right edge
    y: float  # centre, 0 = top edge
    radius: float  # half the extent of the shape's unit outline, fraction of the image side
    angle: float = 0.0  # rotation in degrees (counter-clockwise)
    aspect: float = 1.0  # elongation of ellipse / rectangle / diamond (1 for the others)
    rgb: RGB = (0, 0, 0)  # jittered instance colour
    position: str | None = None  # named region (single-object scenes)


@dataclass(frozen=True)
class Scene:
    """One image's content. ``relation`` (pair scenes) reads ``objects[0] <relation> objects[1]``."""

    kind: str
    objects: tuple[Obj, ...]
    background: str
    bg_rgb: RGB
    seed: int  # pixel-level randomness (background texture, noise, sketch strokes)
    relation: str | None = None

    @property
    def count(self) -> int:
        return len(self.objects)


@dataclass(frozen=True)
class Holdout:
    """What the pretraining corpus never shows, so prompt tuning has something to learn.

    - ``pairs``: (colour, shape) combinations that never occur on any object in any pretraining scene (each colour
      and each shape still occurs with other partners). They are classes of ``toy_combo``.
    - ``domains``: rendering domains never used for pretraining images (nor named in their captions). ``sketch``
      is the analogue of ImageNet-Sketch; ``inverted`` is used by ``toy_shapes_rendition``; ``tinted`` (a colour
      cast over the whole image, as under coloured light) is the look of ``toy_colours``.
    """

    pairs: frozenset[tuple[str, str]] = field(default_factory=frozenset)
    domains: tuple[str, ...] = ()

    def allows(self, colour: str, shape: str) -> bool:
        return (colour, shape) not in self.pairs

    def allows_scene(self, scene: Scene) -> bool:
        return all(self.allows(o.colour, o.shape) for o in scene.objects)


def _holdout_pairs() -> frozenset[tuple[str, str]]:
    # Two colours per combo shape on a stride-3 diagonal of the 10 x 12 grid: 24 of 120 pairs (20%); every combo
    # colour is held out with 2 or 3 shapes, so each colour and each shape keeps most of its partners.
    pairs = set()
    for s, shape in enumerate(COMBO_SHAPES):
        for k in (0, 5):
            pairs.add((COMBO_COLOURS[(3 * s + k) % len(COMBO_COLOURS)], shape))
    return frozenset(pairs)


HOLDOUT = Holdout(pairs=_holdout_pairs(), domains=("sketch", "inverted", "tinted"))
NO_HOLDOUT = Holdout()
# Domain mixture of the pretraining corpus (every domain not held out); downstream train splits are clean only.
PRETRAIN_DOMAINS: dict[str, float] = {"clean": 0.6, "noisy": 0.1, "blurred": 0.1, "lowcontrast": 0.1, "pixelated": 0.1}


# ---------------------------------------------------------------------------------------------------- sampling
Choice = Union[str, Sequence[str], Mapping[str, float], None]


def as_rng(rng: np.random.Generator | int | Sequence[int] | None) -> np.random.Generator:
    """A numpy Generator from a Generator (returned as is), an int seed or a sequence of ints."""
    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(rng)


def _pick(rng: np.random.Generator, value: Choice, default: Sequence[str] | Mapping[str, float], what: str) -> str:
    """A fixed value, a uniform pick from a sequence, or a weighted pick from a {value: weight} mapping."""
    if value is None:
        value = default
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping):
        keys = list(value)
        w = np.asarray([value[k] for k in keys], dtype=float)
        if not len(keys) or w.sum() <= 0:
            raise ValueError(f"empty choice for {what}")
        return keys[int(rng.choice(len(keys), p=w / w.sum()))]
    options = list(value)
    if not options:
        raise ValueError(f"empty choice for {what}")
    return options[int(rng.integers(len(options)))]


def _check(value: str, allowed: Sequence[str] | Mapping[str, Any], what: str) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; use one of {', '.join(allowed)}")


_ELONGATED = {"ellipse": (1.45, 1.8), "rectangle": (1.55, 1.95), "diamond": (1.25, 1.45)}


def _make_obj(
    rng: np.random.Generator, shape: str, colour: str, size: str, fill: str, x: float, y: float,
    radius: float, position: str | None = None,
) -> Obj:  # fmt: skip
    _check(shape, SHAPES, "shape")
    _check(colour, COLOURS, "colour")
    _check(size, SIZES, "size")
    _check(fill, FILLS, "fill")
    lo_hi = _ELONGATED.get(shape)
    aspect = float(rng.uniform(*lo_hi)) if lo_hi else 1.0
    if shape == "crescent":
        angle = float(rng.uniform(0, 360))
    elif shape == "arrow":
        angle = float(rng.uniform(-20, 20))
    else:
        angle = float(rng.uniform(-12, 12))
    if shape in ("ellipse", "rectangle") and rng.random() < 0.3:
        angle += 90.0  # some stand upright
    base = np.asarray(COLOURS[colour])
    rgb = np.clip(base + rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, 3), 0, 255)
    return Obj(shape, colour, size, fill, float(x), float(y), float(radius), angle, aspect,
               (int(rgb[0]), int(rgb[1]), int(rgb[2])), position)  # fmt: skip


def _radius(rng: np.random.Generator, size: str) -> float:
    _check(size, SIZES, "size")
    return float(rng.uniform(*SIZES[size]))


def _place(rng: np.random.Generator, radii: Sequence[float], margin: float = 0.03) -> list[tuple[float, float]]:
    """Non-overlapping centres for objects of the given radii (rejection sampling, restarts if stuck)."""
    return _place_apart(rng, radii, lambda r, cr: r + cr + margin, "without overlap")


def _place_apart(rng: np.random.Generator, radii: Sequence[float], least: Callable[[float, float], float],
                 how: str) -> list[tuple[float, float]]:  # fmt: skip
    """Centres inside the image, each pair of objects of radii ``(r, cr)`` at least ``least(r, cr)`` apart
    (rejection sampling, restarts if stuck); ``how`` says what was asked when it cannot be done."""
    for _ in range(200):
        centres: list[tuple[float, float]] = []
        for r in radii:
            for _ in range(100):
                x, y = rng.uniform(r + 0.02, 1 - r - 0.02, 2)
                if all((x - cx) ** 2 + (y - cy) ** 2 >= least(r, cr) ** 2
                       for (cx, cy), cr in zip(centres, radii)):  # fmt: skip
                    centres.append((float(x), float(y)))
                    break
            else:
                break
        if len(centres) == len(radii):
            return centres
    raise RuntimeError(f"cannot place {len(radii)} objects of radii {radii} {how}")


def sample_scene(
    rng: np.random.Generator | int | Sequence[int] | None = None,
    kind: Choice = None,
    *,
    shape: Choice = None,
    colour: Choice = None,
    size: Choice = None,
    fill: Choice = None,
    position: Choice = None,
    background: Choice = None,
    count: int | Sequence[int] | None = None,
    relation: Choice = None,
    pair: tuple[str, str] | None = None,
    holdout: Holdout | None = None,
    max_tries: int = 1000,
) -> Scene:
    """Draw a random scene. Every keyword is either a fixed value, a sequence to pick from uniformly, a
    ``{value: weight}`` mapping, or None for the world's default distribution.

    - ``kind``: "single" | "count" | "pair" | "multi" (default: :data:`KIND_WEIGHTS`).
    - ``shape`` / ``colour`` / ``size`` / ``fill``: attributes of every object (pair / multi scenes draw each
      object separately from the pool; in pair scenes ``pair=(shape_a, shape_b)`` fixes both shapes).
    - ``position``: named region of a single object; ``count``: number of copies in a count scene (1..5);
      ``relation``: relation of object 0 to object 1 in a pair scene.
    - ``holdout``: scenes with a held-out (colour, shape) object are redrawn.
    """
    rng = as_rng(rng)
    holdout = holdout or NO_HOLDOUT
    if (isinstance(colour, str) and isinstance(shape, str) and not holdout.allows(colour, shape)):
        raise ValueError(f"({colour}, {shape}) is held out; it cannot be sampled with this holdout")
    k = _pick(rng, kind, KIND_WEIGHTS, "kind")  # drawn once, so the holdout does not skew the kind mix
    _check(k, KINDS, "scene kind")
    for _ in range(max_tries):
        scene = _sample_once(rng, k, shape, colour, size, fill, position, background, count, relation, pair)
        if holdout.allows_scene(scene):
            return scene
    raise RuntimeError("could not sample a scene outside the holdout; relax the constraints")


def _sample_once(
    rng: np.random.Generator, k: str, shape: Choice, colour: Choice, size: Choice, fill: Choice,
    position: Choice, background: Choice, count: int | Sequence[int] | None, relation: Choice,
    pair: tuple[str, str] | None,
) -> Scene:  # fmt: skip
    bg = _pick(rng, background, BACKGROUNDS, "background")
    _check(bg, BACKGROUNDS, "background")
    seed = int(rng.integers(2**31 - 1))
    bg_rgb = _background_tone(rng, bg)

    def attrs(size_default: Sequence[str] = tuple(SIZES)) -> tuple[str, str, str, str]:
        s = _pick(rng, shape, SHAPES, "shape")
        c = _pick(rng, colour, tuple(COLOURS), "colour")
        z = _pick(rng, size, size_default, "size")
        f = _pick(rng, fill, FILL_WEIGHTS, "fill")
        return s, c, z, f

    objects: list[Obj] = []
    rel: str | None = None
    if k == "single":
        s, c, z, f = attrs()
        pos = _pick(rng, position, tuple(POSITIONS), "position")
        _check(pos, POSITIONS, "position")
        r = _radius(rng, z)
        px, py = POSITIONS[pos]
        x = float(np.clip(px + rng.uniform(-0.05, 0.05), r + 0.01, 1 - r - 0.01))
        y = float(np.clip(py + rng.uniform(-0.05, 0.05), r + 0.01, 1 - r - 0.01))
        objects.append(_make_obj(rng, s, c, z, f, x, y, r, pos))
    elif k == "count":
        if count is None:
            n = int(rng.integers(1, 6))
        elif isinstance(count, (int, np.integer)):
            n = int(count)
        else:
            options = list(count)
            n = int(options[int(rng.integers(len(options)))])
        if not 1 <= n <= 5:
            raise ValueError(f"count must be 1..5, got {n}")
        # Copies must fit side by side: small objects from 3 copies on, small or medium below.
        fits = ("small", "medium") if n <= 2 else ("small",)
        wanted = [size] if isinstance(size, str) else list(size or fits)
        s, c, _, f = attrs()
        z = _pick(rng, [v for v in wanted if v in fits] or list(fits), fits, "size")
        radii = [_radius(rng, z) for _ in range(n)]
        for (x, y), r in zip(_place(rng, radii), radii):
            objects.append(_make_obj(rng, s, c, z, f, x, y, r))
    elif k == "pair":
        rel = _pick(rng, relation, RELATIONS, "relation")
        _check(rel, RELATIONS, "relation")
        if pair is not None:
            shapes = list(pair)
        else:
            shapes = [_pick(rng, shape, SHAPES, "shape")]
            others = [v for v in (SHAPES if shape is None or isinstance(shape, str) else list(shape)) if v != shapes[0]]
            shapes.append(_pick(rng, others, SHAPES, "shape"))
        zs = [_pick(rng, size, ("small", "medium"), "size") for _ in range(2)]
        rs = [_radius(rng, z) for z in zs]
        a, b = _pair_centres(rng, rel)
        for sh, z, r, (x, y) in zip(shapes, zs, rs, (a, b)):
            c = _pick(rng, colour, tuple(COLOURS), "colour")
            f = _pick(rng, fill, FILL_WEIGHTS, "fill")
            x = float(np.clip(x, r + 0.01, 1 - r - 0.01))
            y = float(np.clip(y, r + 0.01, 1 - r - 0.01))
            objects.append(_make_obj(rng, sh, c, z, f, x, y, r))
    else:  # multi: 2..4 objects with distinct shapes
        n = int(rng.integers(2, 5))
        pool = list(SHAPES) if shape is None or isinstance(shape, str) else list(dict.fromkeys(
            shape if not isinstance(shape, Mapping) else shape.keys()))  # fmt: skip
        if isinstance(shape, str):
            pool = [shape] + [v for v in pool if v != shape]
            chosen = [shape] + [str(v) for v in rng.choice(pool[1:], n - 1, replace=False)]
        else:
            n = min(n, len(pool))
            chosen = [str(v) for v in rng.choice(pool, n, replace=False)]
        zs = [_pick(rng, size, ("small", "medium"), "size") for _ in chosen]
        rs = [_radius(rng, z) for z in zs]
        for sh, z, r, (x, y) in zip(chosen, zs, rs, _place(rng, rs)):
            c = _pick(rng, colour, tuple(COLOURS), "colour")
            f = _pick(rng, fill, FILL_WEIGHTS, "fill")
            objects.append(_make_obj(rng, sh, c, z, f, x, y, r))
    return Scene(k, tuple(objects), bg, bg_rgb, seed, rel)


def sample_crowd(
    rng: np.random.Generator | int | Sequence[int] | None,
    shapes: Sequence[str],
    *,
    radius: tuple[float, float],
    overlap: float = 0.0,
    groups: Sequence[int] | None = None,
    colour: Choice = None,
    fill: Choice = None,
    background: Choice = None,
    size: str = "small",
    holdout: Holdout | None = None,
    max_tries: int = 1000,
) -> Scene:
    """A scene of ``len(shapes)`` objects (kind ``"crowd"``) at any radius and number, which :func:`sample_scene`'s
    kinds cannot draw: many small objects, crowds of copies, objects that overlap.

    - ``shapes``: each object's shape, in drawing order (where objects overlap, a later one covers an earlier one).
    - ``radius``: (low, high) of every object's radius, a fraction of the image side.
    - ``overlap``: 0 places objects apart (as count and multi scenes are); ``f`` in (0, 1) lets two objects' centres
      come as close as ``(1 - f) * (r1 + r2)``, so they may cover each other.
    - ``groups``: objects with the same group number share colour and fill (the copies of a count scene); default:
      each object on its own.
    - ``colour`` / ``fill`` / ``background``: as in :func:`sample_scene`; ``size``: the size word the objects carry.
    - ``holdout``: a scene with a held-out (colour, shape) object is redrawn.

    A new function: the scenes of :func:`sample_scene` and every dataset drawn with it are unchanged.
    """
    rng = as_rng(rng)
    shapes = [str(s) for s in shapes]
    if not shapes:
        raise ValueError("a crowd needs at least one object")
    for s in shapes:
        _check(s, SHAPES, "shape")
    lo, hi = (float(v) for v in radius)
    if not 0 < lo <= hi < 0.5:
        raise ValueError(f"radius must be (low, high) with 0 < low <= high < 0.5, got {radius!r}")
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap!r}")
    group_of = list(range(len(shapes))) if groups is None else [int(g) for g in groups]
    if len(group_of) != len(shapes):
        raise ValueError(f"groups must give one group per object ({len(shapes)}), got {len(group_of)}")
    holdout = holdout or NO_HOLDOUT
    for _ in range(max_tries):
        bg = _pick(rng, background, BACKGROUNDS, "background")
        _check(bg, BACKGROUNDS, "background")
        seed = int(rng.integers(2**31 - 1))
        bg_rgb = _background_tone(rng, bg)
        looks: dict[int, tuple[str, str]] = {}
        for g in dict.fromkeys(group_of):
            looks[g] = (_pick(rng, colour, tuple(COLOURS), "colour"), _pick(rng, fill, FILL_WEIGHTS, "fill"))
        radii = [float(rng.uniform(lo, hi)) for _ in shapes]
        centres = _place(rng, radii) if overlap == 0 else _place_overlapping(rng, radii, overlap)
        objects = tuple(_make_obj(rng, s, looks[g][0], size, looks[g][1], x, y, r)
                        for s, g, r, (x, y) in zip(shapes, group_of, radii, centres))  # fmt: skip
        scene = Scene("crowd", objects, bg, bg_rgb, seed)
        if holdout.allows_scene(scene):
            return scene
    raise RuntimeError("could not sample a crowd outside the holdout; relax the constraints")


def _place_overlapping(rng: np.random.Generator, radii: Sequence[float], overlap: float) -> list[tuple[float, float]]:
    """Centres inside the image whose pairwise distances are at least ``(1 - overlap)`` times the radii's sum."""
    return _place_apart(rng, radii, lambda r, cr: (1 - overlap) * (r + cr), f"with overlap {overlap}")


# Attributes a contrastive "hard-negative group" varies: the group's images share everything else (background,
# domain, pixel noise), so only this attribute tells their captions apart. Shape is what a small ViT learns last.
VARY_WEIGHTS: dict[str, float] = {"shape": 0.5, "position": 0.2, "colour": 0.15, "fill": 0.15}


def vary_scene(scene: Scene, attribute: str, value: str) -> Scene:
    """``scene`` with ``attribute`` of its first object (and of every object sharing that object's value: the
    copies of a count scene) set to ``value``. ``position`` moves the object of a single scene (other kinds are
    returned unchanged). Geometry, jitter and pixel randomness are kept, so only the attribute differs."""
    _check(attribute, VARY_WEIGHTS, "attribute to vary")
    first = scene.objects[0]
    if attribute == "position":
        if scene.kind != "single":
            return scene
        _check(value, POSITIONS, "position")
        px, py = POSITIONS[value]
        r = first.radius
        moved = replace(first, x=float(np.clip(px, r + 0.01, 1 - r - 0.01)),
                        y=float(np.clip(py, r + 0.01, 1 - r - 0.01)), position=value)  # fmt: skip
        return replace(scene, objects=(moved,))
    old = getattr(first, attribute)

    def changed(o: Obj) -> Obj:
        if getattr(o, attribute) != old:
            return o
        if attribute == "shape":
            _check(value, SHAPES, "shape")
            lo_hi = _ELONGATED.get(value)
            return replace(o, shape=value, aspect=float(sum(lo_hi) / 2) if lo_hi else 1.0)
        if attribute == "colour":
            _check(value, COLOURS, "colour")
            jitter = np.asarray(o.rgb) - np.asarray(COLOURS[o.colour])
            rgb = np.clip(np.asarray(COLOURS[value]) + jitter, 0, 255)
            return replace(o, colour=value, rgb=(int(rgb[0]), int(rgb[1]), int(rgb[2])))
        _check(value, FILLS, "fill")
        return replace(o, fill=value)

    return replace(scene, objects=tuple(changed(o) for o in scene.objects))


def attribute_values(attribute: str) -> tuple[str, ...]:
    return {"shape": SHAPES, "position": tuple(POSITIONS), "colour": tuple(COLOURS), "fill": FILLS}[attribute]


def _pair_centres(rng: np.random.Generator, rel: str) -> tuple[tuple[float, float], tuple[float, float]]:
    near, far = rng.uniform(0.2, 0.36), rng.uniform(0.64, 0.8)
    across = rng.uniform(0.32, 0.68)
    off = across + rng.uniform(-0.08, 0.08)
    if rel == "left of":
        return (near, across), (far, off)
    if rel == "right of":
        return (far, across), (near, off)
    if rel == "above":
        return (across, near), (off, far)
    return (across, far), (off, near)  # below


def _background_tone(rng: np.random.Generator, bg: str) -> RGB:
    """Base tone of a background (neutral, so object colours stay unambiguous)."""
    if bg == "dark":
        v = int(rng.integers(30, 60))
    elif bg == "grey":
        v = int(rng.integers(150, 185))
    elif bg in ("white", "grid"):
        v = int(rng.integers(238, 256))
    else:  # gradient start / speckled mean
        v = int(rng.integers(200, 235))
    t = rng.integers(-4, 5, 3)  # a faint warm/cool tint
    return (int(np.clip(v + t[0], 0, 255)), int(np.clip(v + t[1], 0, 255)), int(np.clip(v + t[2], 0, 255)))
