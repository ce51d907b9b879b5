"""An ODinW-style suite of toy detection sets: each one a different shift from the toy detector's pretraining.

The toy Grounding DINO (``pretraining/gdino_pretrain.py``) is pretrained on clean 64 px scenes of 12 of the world's
15 shapes, prompted with the shape names: octagon, heart and arrow never appear (their names are never grounded), and
the world's held-out colour x shape pairs and looks (sketch, inverted, tinted) are left out. ODinW measures how a
grounding detector transfers to small datasets unlike its pretraining; here each set moves one thing away from it:

========== ========================================================= =====================================
name       shift from the pretraining                                stands for (ODinW)
========== ========================================================= =====================================
looks      the same kind of scenes drawn in the held-out looks       thermalDogsAndPeople, Aquarium
           (sketch, inverted, tinted)                                (other imaging: thermal, underwater)
novel      new category words: octagon, heart, arrow, never grounded NorthAmericaMushrooms, pothole
small      4-8 objects a third of the pretraining's smallest size    AerialMaritimeDrone
clutter    overlapping (occluded) objects among unlabelled           Aquarium, BCCD (ODinW-35)
           distractor shapes on busy backgrounds
fine       fill + shape phrases as categories ("striped circle"      ChessPieces (ODinW-35: "white bishop"
           vs "dotted circle"): an attribute never grounded          vs "black bishop")
count      crowds of 6-12 copies of one or two shapes per image      PKLot (ODinW-35), EgoHands
========== ========================================================= =====================================

Every set is COCO-format in the ``<folder>/<split>/annotations.json`` + ``images/`` layout the coco reader loads
(train / val / test), a pure function of ``(seed, sizes, image size)``, written to a temporary folder and renamed,
cached under the toy root as ``toydet_<name>`` with a manifest (``toyworld.json``) whose change rebuilds it. Only
the held-out shift differs from the pretraining: no set shows a held-out colour x shape pair, and only ``looks`` a
held-out look. ``toydet:<name>`` names a set, ``toydet:suite`` all six (``vlprompt bench``).
"""
from __future__ import annotations

import json
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .render import boxes, render_array, visible_boxes
from .suite import write_once
from .world import HOLDOUT, WORLD_VERSION, Obj, Scene, sample_crowd, sample_scene

__all__ = [
    "DETECTION_SUITE",
    "SUITE_NAME",
    "DetectionSetSpec",
    "detection_scene",
    "detection_set_fingerprint",
    "detection_set_folder",
    "materialize_detection_set",
    "suite_dataset_names",
]

DETECTION_SETS_VERSION = 1  # bumped when a code change alters what a set draws (its manifest then rebuilds it)
SUITE_NAME = "suite"  # toydet:suite: every set below
SPLITS = ("train", "val", "test")
IMAGE_SIZE = 64  # the toy detector's pretraining size
# train / val / test images: 10 shots per category and "all" (the whole train split) from train; a zero-shot pass of
# the 1M-parameter toy detector over a test split takes a few seconds on a CPU.
DEFAULT_SIZES = (240, 60, 120)
# Scene kinds of the sets drawn with the world's own sampler: the pretraining's held-in test mix.
TEST_KINDS = {"multi": 0.6, "pair": 0.2, "count": 0.2}
HELD_OUT_LOOKS = ("sketch", "inverted", "tinted")
BUSY_BACKGROUNDS = ("speckled", "grid", "gradient")


@dataclass(frozen=True)
class DetectionSetSpec:
    """One set: its categories (the prompt's phrases, in id order), how a scene is drawn (``draw`` and ``params``,
    read by :func:`detection_scene`), what it tests and which ODinW datasets it stands for."""

    name: str
    categories: tuple[str, ...]
    draw: str  # "world" (sample_scene), "crowd" (sample_crowd), "fine" (fill + shape phrases)
    params: Mapping[str, Any] = field(default_factory=dict)
    shift: str = ""
    analogue: str = ""
    sizes: tuple[int, int, int] = DEFAULT_SIZES

    @property
    def folder(self) -> str:
        return f"toydet_{self.name}"


_SPECS = (
    DetectionSetSpec(
        "looks", ("circle", "square", "triangle", "star", "cross"), "world",
        {"kinds": TEST_KINDS, "domains": HELD_OUT_LOOKS},
        shift="held-out looks: each image drawn as a sketch, colour-inverted or under a coloured tint (never in "
              "pretraining); shapes and scenes as in pretraining",
        analogue="thermalDogsAndPeople, Aquarium (another imaging modality)"),
    DetectionSetSpec(
        "novel", ("octagon", "heart", "arrow"), "world", {"kinds": TEST_KINDS, "domains": ("clean",)},
        shift="new category words: scenes of the three held-out shapes only, prompted with their names, which the "
              "pretraining never grounds",
        analogue="NorthAmericaMushrooms, pothole (category names a detector has not grounded)"),
    DetectionSetSpec(
        "small", ("circle", "square", "triangle", "star"), "crowd",
        {"objects": (4, 8), "radius": (0.045, 0.065)},
        shift="small objects: 4-8 per image, 6-8 px across (pretraining's smallest are 11-14 px)",
        analogue="AerialMaritimeDrone (small objects seen from far away)"),
    DetectionSetSpec(
        "clutter", ("circle", "triangle", "star", "cross"), "crowd",
        {"objects": (3, 5), "distractors": ("pentagon", "hexagon", "crescent", "diamond", "ellipse"),
         "n_distractors": (2, 4), "radius": (0.1, 0.17), "overlap": 0.45, "min_visible": 0.5,
         "backgrounds": BUSY_BACKGROUNDS},
        shift="clutter and occlusion: 3-5 objects among 2-4 unlabelled distractor shapes, overlapping (boxes are of "
              "the visible parts; every labelled object at least half visible) on busy backgrounds",
        analogue="Aquarium, BCCD (crowded scenes, overlapping instances)"),
    DetectionSetSpec(
        "fine", ("striped circle", "dotted circle", "striped square", "dotted square"), "fine",
        {"objects": (2, 4), "shapes": ("circle", "square"), "fills": ("striped", "dotted"), "radius": (0.12, 0.16)},
        shift="fine attributes: categories are fill + shape phrases, so the detector must tell a striped circle from "
              "a dotted one (pretraining grounds shape names only)",
        analogue="ChessPieces (ODinW-35: 'white bishop' vs 'black bishop')"),
    DetectionSetSpec(
        "count", ("circle", "triangle", "star"), "crowd",
        {"copies": (6, 12), "groups": (1, 2), "radius": (0.065, 0.085)},
        shift="counts: crowds of 6-12 identical copies of one or two shapes per image (pretraining shows at most 5)",
        analogue="PKLot (ODinW-35: dozens of cars per image), EgoHands"),
)
DETECTION_SUITE: dict[str, DetectionSetSpec] = {s.name: s for s in _SPECS}


def suite_dataset_names() -> list[str]:
    """The suite's datasets as ``toydet:<name>``, in the suite's order."""
    return [f"toydet:{name}" for name in DETECTION_SUITE]


def _spec(name: str) -> DetectionSetSpec:
    key = name.strip().lower()
    if key not in DETECTION_SUITE:
        raise ValueError(f"unknown toy detection suite set {name!r}; choose one of {', '.join(DETECTION_SUITE)}")
    return DETECTION_SUITE[key]


# ------------------------------------------------------------------------------------------------------ scenes
def _rng(seed: int, name: str, split: str, i: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(f"toydet:{name}".encode()), SPLITS.index(split), i])


def _between(rng: np.random.Generator, bounds: Sequence[int]) -> int:
    lo, hi = bounds
    return int(rng.integers(lo, hi + 1))


def _crowd_scene(spec: DetectionSetSpec, rng: np.random.Generator) -> Scene:
    p = spec.params
    cats = list(spec.categories)
    if "copies" in p:  # crowds: one or two groups of identical copies, each group its own shape
        n_groups = min(_between(rng, p["groups"]), len(cats))
        total = _between(rng, p["copies"])
        group_shapes = [str(s) for s in rng.choice(cats, n_groups, replace=False)]
        cut: list[int] = []
        if n_groups > 1:  # where the copies split between the groups
            cut = sorted(int(c) for c in rng.choice(np.arange(1, total), n_groups - 1, replace=False))
        counts = np.diff([0, *cut, total]).tolist()
        shapes = [s for s, k in zip(group_shapes, counts) for _ in range(k)]
        groups = [g for g, k in enumerate(counts) for _ in range(k)]
        return sample_crowd(rng, shapes, radius=p["radius"], groups=groups, holdout=HOLDOUT)
    shapes = [str(s) for s in rng.choice(cats, _between(rng, p["objects"]))]
    if "distractors" in p:
        shapes += [str(s) for s in rng.choice(list(p["distractors"]), _between(rng, p["n_distractors"]))]
        shapes = [shapes[int(k)] for k in rng.permutation(len(shapes))]  # distractors may cover labelled objects
    background = list(p["backgrounds"]) if "backgrounds" in p else None
    for _ in range(100):
        scene = sample_crowd(rng, shapes, radius=p["radius"], overlap=p.get("overlap", 0.0), background=background,
                             holdout=HOLDOUT)  # fmt: skip
        if "min_visible" not in p or all(b["visible"] >= p["min_visible"]
                                         for b, o in zip(visible_boxes(scene, IMAGE_SIZE), scene.objects)
                                         if o.shape in spec.categories):  # fmt: skip
            return scene
    raise RuntimeError(f"toydet:{spec.name}: could not draw a scene with every labelled object visible enough")


def _label(spec: DetectionSetSpec, obj: Obj) -> str | None:
    """The category an object is annotated as, or None for an unlabelled distractor."""
    name = f"{obj.fill} {obj.shape}" if spec.draw == "fine" else obj.shape
    return name if name in spec.categories else None


def detection_scene(name: str, split: str, i: int, seed: int = 0) -> tuple[Scene, str]:
    """(scene, look) of image ``i`` of ``split`` in the suite set ``name``: a pure function of its arguments."""
    spec = _spec(name)
    rng = _rng(seed, spec.name, split, i)
    p = spec.params
    if spec.draw == "world":
        scene = sample_scene(rng, dict(p["kinds"]), shape=tuple(spec.categories), holdout=HOLDOUT)
        domains = list(p["domains"])
        return scene, domains[int(rng.integers(len(domains)))]
    if spec.draw == "fine":
        shapes = [str(s) for s in rng.choice(list(p["shapes"]), _between(rng, p["objects"]))]
        return sample_crowd(rng, shapes, radius=p["radius"], fill=list(p["fills"]), holdout=HOLDOUT), "clean"
    return _crowd_scene(spec, rng), "clean"


def annotations_of(spec: DetectionSetSpec, scene: Scene, size: int) -> list[tuple[str, list[float], dict[str, Any]]]:
    """(category, [x, y, w, h], attributes) of each labelled object: boxes of what is visible where objects overlap."""
    found = visible_boxes(scene, size) if spec.params.get("overlap") else boxes(scene, size)
    out = []
    for obj, b in zip(scene.objects, found):
        category = _label(spec, obj)
        bbox = [float(v) for v in b["bbox"]]  # type: ignore[union-attr]
        if category is None or bbox[2] <= 0 or bbox[3] <= 0:
            continue
        attributes = {"colour": obj.colour, "fill": obj.fill, "shape": obj.shape}
        if "visible" in b:
            attributes["visible"] = b["visible"]
        out.append((category, bbox, attributes))
    return out


# ------------------------------------------------------------------------------------------------------ folders
def _manifest(spec: DetectionSetSpec, seed: int, image_size: int, sizes: Sequence[int]) -> dict[str, Any]:
    return {
        "world_version": WORLD_VERSION, "detection_sets_version": DETECTION_SETS_VERSION, "name": spec.folder,
        "seed": seed, "image_size": image_size, "sizes": list(sizes), "categories": list(spec.categories),
        # any change to how the set draws its scenes rebuilds it
        "definition_crc": zlib.crc32(repr((spec.draw, sorted(spec.params.items()))).encode()),
    }  # fmt: skip


def detection_set_folder(name: str, root: str | Path, seed: int = 0) -> Path:
    spec = _spec(name)
    return Path(root).expanduser() / (spec.folder if seed == 0 else f"{spec.folder}_seed{seed}")


def detection_set_fingerprint(name: str, seed: int = 0, image_size: int = IMAGE_SIZE) -> str:
    """A short digest of what decides a suite set's content (its manifest at the default sizes): results on an older
    definition of a set are told apart from results on the current one."""
    spec = _spec(name)
    manifest = _manifest(spec, seed, image_size, spec.sizes)
    return f"{zlib.crc32(json.dumps(manifest, sort_keys=True).encode()):08x}"


def _write_split(folder: Path, spec: DetectionSetSpec, split: str, n: int, seed: int, size: int) -> None:
    (folder / "images").mkdir(parents=True)
    category_id = {c: k + 1 for k, c in enumerate(spec.categories)}
    images, annotations = [], []
    for i in range(n):
        scene, look = detection_scene(spec.name, split, i, seed)
        name = f"images/{i:05d}.png"
        Image.fromarray(render_array(scene, size, look)).save(folder / name, compress_level=1)
        images.append({"id": i + 1, "file_name": name, "width": size, "height": size, "look": look})
        for category, (x, y, w, h), attributes in annotations_of(spec, scene, size):
            annotations.append({
                "id": len(annotations) + 1, "image_id": i + 1, "category_id": category_id[category],
                "bbox": [x, y, w, h], "area": round(w * h, 2), "iscrowd": 0, "attributes": attributes,
            })  # fmt: skip
    categories = [{"id": k, "name": c, "supercategory": "shape"} for c, k in category_id.items()]
    data = {"info": {"description": f"toydet:{spec.name}: {spec.shift}"}, "images": images,
            "annotations": annotations, "categories": categories}  # fmt: skip
    (folder / "annotations.json").write_text(json.dumps(data), encoding="utf-8")


def materialize_detection_set(name: str, root: str | Path, seed: int = 0, image_size: int = IMAGE_SIZE,
                              sizes: Sequence[int] | None = None) -> Path:  # fmt: skip
    """Write the suite set ``name`` under ``root`` (``toydet_<name>``) and return its folder; a complete folder with
    the same settings is reused, one with other settings (or of another definition) is rebuilt. ``sizes``: images
    per split (train, val, test), default the set's."""
    spec = _spec(name)
    sizes = tuple(int(v) for v in (sizes if sizes is not None else spec.sizes))
    if len(sizes) != 3 or min(sizes) < 0:
        raise ValueError(f"sizes must be three non-negative image counts (train, val, test), got {sizes!r}")
    root = Path(root).expanduser()
    target = detection_set_folder(spec.name, root, seed)
    manifest = _manifest(spec, seed, image_size, sizes)

    def write(tmp: Path) -> None:
        for split, n in zip(SPLITS, sizes):
            _write_split(tmp / split, spec, split, n, seed, image_size)

    return write_once(root, target, manifest, write)
