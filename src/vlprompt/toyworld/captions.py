"""Templated English captions and question/answer pairs from a scene description (deterministic given a seed).

Captions vary word order, articles, prefixes, synonyms and how much they say (partial descriptions), but the
canonical class words dominate: a shape is named by its own word in about 85% of the mentions, a colour by its
name (45% for the four colours with a commoner neighbour: crimson, navy, teal, lime), counts mostly by number
words ("three"), so zero-shot classification with class names is meaningful, but not always easy.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .world import Obj, Scene, as_rng

__all__ = ["NUMBER_WORDS", "caption", "noun", "plural", "qa"]

NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six")

# (word, weight): the canonical word first, with most of the weight.
_SHAPE_WORDS: dict[str, tuple[tuple[str, float], ...]] = {
    "circle": (("circle", 0.85), ("disc", 0.15)),
    "ellipse": (("ellipse", 0.85), ("oval", 0.15)),
    "ring": (("ring", 0.85), ("donut", 0.15)),
    "diamond": (("diamond", 0.85), ("rhombus", 0.15)),
    "star": (("star", 0.85), ("five-pointed star", 0.15)),
    "cross": (("cross", 0.85), ("plus sign", 0.15)),
    "heart": (("heart", 0.85), ("heart shape", 0.15)),
    "crescent": (("crescent", 0.85), ("crescent moon", 0.15)),
}
_SIZE_WORDS = {
    "small": (("small", 0.7), ("little", 0.15), ("tiny", 0.15)),
    "medium": (("medium", 0.5), ("medium-sized", 0.5)),
    "large": (("large", 0.65), ("big", 0.3), ("huge", 0.05)),
}
_FILL_WORDS = {
    "solid": (("solid", 0.6), ("filled", 0.4)),
    "striped": (("striped", 1.0),),
    "dotted": (("dotted", 0.7), ("polka-dot", 0.3)),
    "checkered": (("checkered", 0.8), ("checkerboard", 0.2)),
    "outlined": (("outlined", 0.7), ("hollow", 0.3)),
}
# Colours with a close, more common neighbour are often called by the coarser word, as people do ("a red star" for
# a crimson one): the specific word in 45% of mentions. The other colours are always called by their name.
_COLOUR_WORDS: dict[str, tuple[tuple[str, float], ...]] = {
    "crimson": (("crimson", 0.45), ("dark red", 0.25), ("red", 0.3)),
    "navy": (("navy", 0.45), ("dark blue", 0.25), ("blue", 0.3)),
    "teal": (("teal", 0.45), ("blue-green", 0.25), ("green", 0.15), ("blue", 0.15)),
    "lime": (("lime", 0.45), ("light green", 0.3), ("green", 0.25)),
}
_SIDE_PHRASES = {
    "left": ("on the left", "on the left side", "at the left of the image"),
    "right": ("on the right", "on the right side", "at the right of the image"),
    "top": ("at the top", "at the top of the image", "near the top"),
    "bottom": ("at the bottom", "at the bottom of the image", "near the bottom"),
    "center": ("in the center", "at the center of the image", "in the middle"),
}
P_FULL_CORNER = 0.15  # a corner position is named in full this often, otherwise by one of its sides


def _position_phrase(rng: np.random.Generator, position: str) -> str:
    if position in _SIDE_PHRASES:
        return _one(rng, _SIDE_PHRASES[position])
    if rng.random() < P_FULL_CORNER:
        return _one(rng, (f"in the {position} corner", f"at the {position}", f"at the {position} of the image"))
    return _one(rng, _SIDE_PHRASES[_one(rng, position.split())])


def _colour_word(rng: np.random.Generator, colour: str) -> str:
    return _w(rng, _COLOUR_WORDS.get(colour, ((colour, 1.0),)))


_BACKGROUND_PHRASES = {
    "white": ("on a white background", "on white"),
    "grey": ("on a grey background", "on grey"),
    "dark": ("on a dark background", "on a black background"),
    "gradient": ("on a gradient background", "on a shaded background"),
    "speckled": ("on a speckled background", "on a grainy speckled background"),
    "grid": ("on a grid background", "on grid paper"),
}
_RELATION_PHRASES = {
    "left of": ("to the left of", "left of", "on the left of"),
    "right of": ("to the right of", "right of", "on the right of"),
    "above": ("above", "over", "on top of"),
    "below": ("below", "under", "beneath"),
}
_INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
_PREFIXES = (("", 0.3), ("a photo of ", 0.25), ("an image of ", 0.1), ("a picture of ", 0.1), ("there is ", 0.1),
             ("this is ", 0.05), ("a rendering of ", 0.05), ("a graphic of ", 0.05))  # fmt: skip
_DOMAIN_PREFIXES = {
    "noisy": ("a noisy photo of ", "a noisy image of "),
    "blurred": ("a blurry photo of ", "a blurred image of "),
    "lowcontrast": ("a low contrast photo of ", "a faded low contrast image of "),
    "pixelated": ("a pixelated photo of ", "a pixelated image of "),
    "inverted": ("an inverted photo of ", "a negative image of "),
    "sketch": ("a sketch of ", "a pencil sketch of "),
}


def _w(rng: np.random.Generator, options: Sequence[tuple[str, float]]) -> str:
    p = np.asarray([w for _, w in options], dtype=float)
    return options[int(rng.choice(len(options), p=p / p.sum()))][0]


def _one(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _article(phrase: str) -> str:
    return ("an " if phrase[:1] in "aeiou" else "a ") + phrase


def plural(word: str) -> str:
    """Plural of a (possibly multi-word) shape noun: "cross" -> "crosses", "plus sign" -> "plus signs"."""
    if word.endswith(("s", "x", "sh", "ch")):
        return word + "es"
    return word + "s"


def _shape_word(rng: np.random.Generator, shape: str) -> str:
    return _w(rng, _SHAPE_WORDS.get(shape, ((shape, 1.0),)))


def noun(
    rng: np.random.Generator, obj: Obj, *, p_colour: float = 0.8, p_size: float = 0.3, p_fill: float = 0.3,
    p_shape: float = 0.92, article: bool = True, count: int | None = None,
) -> str:  # fmt: skip
    """A noun phrase for an object ("a small red striped star"; with ``count`` a numbered one: "three stars",
    "one star"), each attribute included with the given probability; with the shape left out the head noun is
    "shape" / "object"."""
    adjectives = []
    if rng.random() < p_size:
        adjectives.append(_w(rng, _SIZE_WORDS[obj.size]))
    colour_word = _colour_word(rng, obj.colour) if rng.random() < p_colour else None
    fill_word = None
    if rng.random() < (p_fill if obj.fill != "solid" else p_fill * 0.4):
        fill_word = _w(rng, _FILL_WORDS[obj.fill])
    named = rng.random() < p_shape or (colour_word is None and not adjectives and fill_word is None)
    head = _shape_word(rng, obj.shape) if named else _one(rng, ("shape", "object"))
    if count is not None and count != 1:
        head = plural(head)
    if colour_word and rng.random() < 0.12 and count is None:  # "a star in red" / "a red-coloured star"
        post = [colour_word]
        colour_word = None
    else:
        post = []
    if colour_word:
        adjectives.append(colour_word)
    if fill_word:
        adjectives.append(fill_word)
    phrase = " ".join([*adjectives, head])
    if post:
        phrase += " in " + post[0]
    if count is not None:
        return _count_word(rng, count) + " " + phrase
    return _article(phrase) if article else phrase


def _count_word(rng: np.random.Generator, n: int) -> str:
    return str(n) if rng.random() < 0.1 else NUMBER_WORDS[n]


def _prefix(rng: np.random.Generator, domain: str) -> str:
    if domain in _DOMAIN_PREFIXES and rng.random() < 0.6:
        return _one(rng, _DOMAIN_PREFIXES[domain])
    return _w(rng, _PREFIXES)


def _finish(rng: np.random.Generator, text: str, scene: Scene, p_background: float = 0.2) -> str:
    if rng.random() < p_background:
        text += " " + _one(rng, _BACKGROUND_PHRASES[scene.background])
    return text + ("." if rng.random() < 0.5 else "")


def caption(scene: Scene, rng: np.random.Generator | int | Sequence[int] | None = None, domain: str = "clean") -> str:
    """A random English caption of the scene (naming the rendering domain now and then when it is not clean)."""
    rng = as_rng(rng)
    prefix = _prefix(rng, domain)
    objs = scene.objects
    if scene.kind == "single":
        o = objs[0]
        r = rng.random()
        if r < 0.1:  # size or texture said in a trailing clause instead of as an adjective
            text = noun(rng, o, p_size=0.0, p_fill=0.0)
            text += " " + _one(rng, (f"with {_article(o.fill)} texture", f"with {_article(o.fill)} fill",
                                     f"of {o.size} size"))  # fmt: skip
        else:
            text = noun(rng, o, p_size=0.4, p_fill=0.45)
            if r < 0.5:
                text += " " + _position_phrase(rng, o.position or "center")
        return _finish(rng, prefix + text, scene, 0.25)
    if scene.kind == "count":
        n, o = len(objs), objs[0]
        r = rng.random()
        if r < 0.55:
            if prefix in ("there is ", "this is ") and n > 1:
                prefix = "there are " if prefix == "there is " else "these are "
            text = prefix + noun(rng, o, p_colour=0.5, p_size=0.15, p_fill=0.2, count=n)
        elif r < 0.75:
            what = noun(rng, o, p_colour=0.4, p_size=0.0, p_fill=0.1, count=n)
            text = ("there is " if n == 1 else "there are ") + what
        elif r < 0.9:
            head = ("object" if rng.random() < 0.5 else "shape") + ("" if n == 1 else "s")
            colour = f"{_colour_word(rng, o.colour)} " if rng.random() < 0.4 else ""
            text = prefix + f"{_count_word(rng, n)} {colour}{head}"
        else:
            text = prefix + (
                f"a single {_shape_word(rng, o.shape)}" if n == 1
                else f"a group of {NUMBER_WORDS[n]} {plural(_shape_word(rng, o.shape))}"
            )  # fmt: skip
        return _finish(rng, text, scene, 0.15)
    if scene.kind == "pair":
        a, b = objs
        rel = scene.relation or "left of"
        r = rng.random()
        na = noun(rng, a, p_colour=0.5, p_size=0.1, p_fill=0.15)
        nb = noun(rng, b, p_colour=0.5, p_size=0.1, p_fill=0.15)
        if r < 0.55:
            text = f"{na} {_one(rng, _RELATION_PHRASES[rel])} {nb}"
        elif r < 0.85:
            text = f"{nb} {_one(rng, _RELATION_PHRASES[_INVERSE[rel]])} {na}"
        else:
            text = f"{na} and {nb}"
        return _finish(rng, prefix + text, scene, 0.1)
    # multi
    parts = [noun(rng, o, p_colour=0.6, p_size=0.1, p_fill=0.15) for o in objs]
    order = rng.permutation(len(parts))
    parts = [parts[i] for i in order]
    listing = ", ".join(parts[:-1]) + (" and " if len(parts) > 1 else "") + parts[-1]
    if rng.random() < 0.25:
        text = f"{NUMBER_WORDS[len(objs)]} shapes: {listing}"
    else:
        text = prefix + listing
    return _finish(rng, text, scene, 0.15)


def qa(scene: Scene, rng: np.random.Generator | int | Sequence[int] | None = None, n: int | None = 3
       ) -> list[tuple[str, str]]:  # fmt: skip
    """Question/answer pairs about the scene ("what colour is the star?" -> "red", "how many circles are
    there?" -> "three"); ``n`` random ones (all candidates when None), deterministic given the seed."""
    rng = as_rng(rng)
    objs = scene.objects
    shapes = [o.shape for o in objs]
    colours = [o.colour for o in objs]
    cands: list[tuple[str, str]] = []
    for o in objs:
        if shapes.count(o.shape) == 1:
            cands.append((f"what colour is the {o.shape}?", o.colour))
            cands.append((f"what texture does the {o.shape} have?", o.fill))
            cands.append((f"how big is the {o.shape}?", o.size))
        if colours.count(o.colour) == 1:
            cands.append((f"what shape is the {o.colour} object?", o.shape))
    for s in dict.fromkeys(shapes):
        cands.append((f"how many {plural(s)} are there?", NUMBER_WORDS[shapes.count(s)]))
    absent = [s for s in ("circle", "square", "triangle", "star") if s not in shapes]
    if absent:
        s = absent[int(rng.integers(len(absent)))]
        cands.append((f"how many {plural(s)} are there?", "zero"))
        cands.append((f"is there a {s}?", "no"))
    cands.append((f"is there a {shapes[0]}?", "yes"))
    cands.append(("how many objects are there?", NUMBER_WORDS[len(objs)]))
    cands.append(("what colour is the background?" if scene.background in ("white", "grey", "dark")
                  else "what kind of background is it?", scene.background))  # fmt: skip
    if scene.kind == "single" and objs[0].position:
        cands.append((f"where is the {objs[0].shape}?", objs[0].position))
    if scene.kind == "pair" and scene.relation:
        a, b = objs
        cands.append((f"where is the {a.shape} relative to the {b.shape}?", scene.relation))
        rel = _one(rng, ("left of", "right of", "above", "below"))
        cands.append((f"is the {a.shape} {rel} the {b.shape}?", "yes" if rel == scene.relation else "no"))
    if n is None or n >= len(cands):
        return cands
    idx = sorted(rng.choice(len(cands), n, replace=False).tolist())
    return [cands[i] for i in idx]
