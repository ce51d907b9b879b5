"""The downstream classification suite: analogues of the field's 11 datasets plus domain-shifted variants.

Each dataset is written once, deterministically, in the standard CoOp split-JSON layout::

    <root>/toy_<name>/images/<class_folder>/<index>.png
    <root>/toy_<name>/split_toy_<name>.json      {"train"|"val"|"test": [[rel_path, label, classname], ...]}
    <root>/toy_<name>/toyworld.json              manifest (settings + world version), written last

so every reader, few-shot sampler and engine path works on it unchanged. :func:`load_toy` materializes on
first use and returns :class:`~vlprompt.data.datasets.DatasetSplits`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..data.datasets import DatasetSplits, Sample, clean_classname
from ..data.errors import DatasetError
from .corpus import _replace_dir
from .render import render_array
from .world import (
    BACKGROUNDS, COLOURS, COMBO_COLOURS, COMBO_SHAPES, FILLS, HOLDOUT, POSITIONS, RELATIONS, SIZES, WORLD_VERSION,
    Scene, sample_scene,
)  # fmt: skip

__all__ = [
    "DEFAULT_IMAGE_SIZE",
    "SUITE",
    "TOY_ROOT_ENV",
    "ToyDatasetSpec",
    "default_toy_root",
    "load_toy",
    "materialize",
    "materialize_suite",
    "resolve_toy_name",
    "toy_fingerprint",
    "toy_dataset_names",
    "toy_scene",
]

DEFAULT_IMAGE_SIZE = 48
TOY_ROOT_ENV = "VLPROMPT_TOY_ROOT"
SPLIT_NAMES = ("train", "val", "test")
MANIFEST = "toyworld.json"


@dataclass(frozen=True)
class ToyDatasetSpec:
    """One toy dataset: its classes, prompt template, how a class's scenes are drawn, and split sizes.

    A scene of class ``label`` is ``sample_scene(rng, **scene, **class_kwargs[label])``, rendered in a domain
    drawn uniformly from ``domains``. A variant (``source`` set) is test-only with the source's classes; with
    ``paired=True`` it shows exactly the source's test scenes, only in other domains.
    """

    name: str
    classnames: tuple[str, ...]
    template: str
    class_kwargs: tuple[Mapping[str, Any], ...]
    counts: tuple[int, int, int]  # per class: train, val, test
    scene: Mapping[str, Any] = field(default_factory=dict)
    domains: tuple[str, ...] = ("clean",)
    tests: str = ""  # what the dataset probes
    analogue: str = ""  # which of the field's datasets it stands in for
    source: str | None = None
    paired: bool = False
    # Draw the scenes of this dataset's name instead of its own (the same scenes in another look: benchmarks).
    scene_key: str | None = None

    @property
    def folder(self) -> str:
        return f"toy_{self.name}"

    @property
    def split_file(self) -> str:
        return f"split_toy_{self.name}.json"

    @property
    def num_classes(self) -> int:
        return len(self.classnames)


# ---------------------------------------------------------------------------------------------------- the suite
_COARSE_SHAPES = ("circle", "square", "triangle", "star", "cross", "heart", "crescent", "arrow")
_FINE_SHAPES = ("circle", "ellipse", "ring", "octagon", "hexagon", "pentagon", "square", "rectangle", "diamond")
_NUMBERS = ("one", "two", "three", "four", "five")
_RELATION_CLASSES = tuple(
    (a, rel, b) for a, b in (("circle", "square"), ("triangle", "star")) for rel in RELATIONS
)  # fmt: skip
_BIG = ("medium", "large")
# toy_combo's shapes: the first 10 of the pretraining grid's 12 (100 classes, 20 of the 24 held-out pairs). CoCoOp's
# cost grows with the square of the class count (its text tower runs per image and class), and 120 classes made it
# alone take more than the full bench's 3-hour budget.
_COMBO_SUITE_SHAPES = COMBO_SHAPES[:10]


def _spec(name: str, classnames: Sequence[str], template: str, kwargs: Sequence[Mapping[str, Any]],
          counts: tuple[int, int, int], **rest: Any) -> ToyDatasetSpec:  # fmt: skip
    return ToyDatasetSpec(name, tuple(classnames), template, tuple(kwargs), counts, **rest)


def _shape_variant(name: str, domains: tuple[str, ...], tests: str, analogue: str, paired: bool = True,
                   **scene: Any) -> ToyDatasetSpec:  # fmt: skip
    base = _SHAPES_SPEC
    return ToyDatasetSpec(
        name, base.classnames, base.template, base.class_kwargs, (0, 0, base.counts[2]), {**base.scene, **scene},
        domains, tests, analogue, source=base.name, paired=paired,
    )


_SHAPES_SPEC = _spec(
    "shapes", _COARSE_SHAPES, "a photo of a {}.", [{"shape": s} for s in _COARSE_SHAPES], (32, 8, 40),
    scene={"kind": "single", "size": _BIG},
    tests="generic object recognition: 8 dissimilar shapes, any colour / fill / position / background",
    analogue="ImageNet (source of the domain-generalisation variants), Caltech101",
)
_SPECS: list[ToyDatasetSpec] = [
    _SHAPES_SPEC,
    _spec("fine_shapes", _FINE_SHAPES, "a photo of a {}, a type of shape.", [{"shape": s} for s in _FINE_SHAPES],
          (32, 8, 40), scene={"kind": "single", "size": _BIG},
          tests="fine-grained shapes: circle/ellipse/ring/octagon, pentagon/hexagon, square/rectangle/diamond",
          analogue="FGVCAircraft, StanfordCars (fine-grained)"),
    _spec("colours", tuple(COLOURS), "a photo of a {} object.", [{"colour": c} for c in COLOURS], (32, 8, 30),
          scene={"kind": "single", "size": _BIG, "fill": {"solid": 0.7, "striped": 0.1, "dotted": 0.1,
                                                         "checkered": 0.1}}, domains=("tinted",),
          tests="colour naming incl. close colours (red/crimson/orange, blue/navy/teal, green/lime, pink/purple) "
                "under coloured light (the held-out tinted domain)",
          analogue="OxfordFlowers, OxfordPets (appearance-defined categories)"),
    _spec("combo", [f"{c} {s}" for c in COMBO_COLOURS for s in _COMBO_SUITE_SHAPES], "a photo of a {}.",
          [{"colour": c, "shape": s} for c in COMBO_COLOURS for s in _COMBO_SUITE_SHAPES], (16, 4, 10),
          scene={"kind": "single", "size": _BIG},
          tests="100 colour x shape compositions, 20 of them never seen in pretraining (HOLDOUT.pairs)",
          analogue="SUN397, Food101 (many classes), compositional generalisation"),
    _spec("texture", FILLS, "{} texture.", [{"fill": f} for f in FILLS], (32, 8, 60),
          scene={"kind": "single", "size": _BIG},
          tests="fill / texture of one object: solid, striped, dotted, checkered, outlined",
          analogue="DTD (DescribableTextures)"),
    _spec("count", _NUMBERS, "a photo of {} objects.", [{"count": i + 1} for i in range(5)], (32, 8, 60),
          scene={"kind": "count"}, domains=("sketch",),
          tests="counting 1..5 copies of one shape, drawn as sketches (a look held out of pretraining)",
          analogue="CLEVR-count (VTAB: another renderer's images); structural, like UCF101"),
    _spec("relation", [f"{a} {r} {b}" for a, r, b in _RELATION_CLASSES], "a photo of a {}.",
          [{"pair": (a, b), "relation": r} for a, r, b in _RELATION_CLASSES], (32, 8, 40),
          scene={"kind": "pair"}, domains=("sketch",),
          tests="spatial relation between two objects (circle/square and triangle/star pairs, 4 relations), "
                "drawn as sketches (held-out look)",
          analogue="UCF101 (relations / interactions between entities, in video frames: another look)"),
    _spec("position", tuple(POSITIONS), "a shape at the {} of the image.", [{"position": p} for p in POSITIONS],
          (32, 8, 40), scene={"kind": "single", "size": ("small", "medium")}, domains=("sketch",),
          tests="where a single object is, on a 3 x 3 grid (corners are rarely named in full in pretraining), "
                "drawn as sketches (held-out look)",
          analogue="EuroSAT (layout-level classes, unusual template, imagery unlike web photos)"),
    _spec("size", tuple(SIZES), "a photo of a {} shape.", [{"size": z} for z in SIZES], (32, 8, 100),
          scene={"kind": "single"}, domains=("tinted",),
          tests="absolute object size: small, medium, large, under coloured light (held-out look)",
          analogue="EuroSAT-like coarse property (3 classes)"),
    _spec("background", BACKGROUNDS, "a photo of an object on a {} background.",
          [{"background": b} for b in BACKGROUNDS], (32, 8, 50), scene={"kind": "single", "size": ("small", "medium")},
          domains=("tinted",),
          tests="scene context instead of the object: white, grey, dark, gradient, speckled, grid background, "
                "under coloured light (held-out look)",
          analogue="SUN397 (scene / context recognition)"),
]
_SPECS += [
    _shape_variant("shapes_v2", ("clean",), "a fresh sample of the same distribution (new seed)",
                   "ImageNetV2", paired=False),
    _shape_variant("shapes_sketch", ("sketch",), "held-out sketch domain (never in pretraining)",
                   "ImageNet-Sketch"),
    _shape_variant("shapes_noisy", ("noisy",), "heavy pixel noise on small objects: hard examples",
                   "ImageNet-A", paired=False, size=("small", "medium")),
    _shape_variant("shapes_lowcontrast", ("lowcontrast",), "contrast compressed to 30%", "ImageNet-A / -C"),
    _shape_variant("shapes_rendition", ("pixelated", "inverted"),
                   "other renditions: pixelated, or colour-inverted (held out)", "ImageNet-R"),
]
SUITE: dict[str, ToyDatasetSpec] = {s.name: s for s in _SPECS}


def toy_dataset_names(include_variants: bool = True) -> list[str]:
    return [n for n, s in SUITE.items() if include_variants or s.source is None]


def resolve_toy_name(name: str) -> str:
    """``shapes``, ``toy_shapes``, ``toy:shapes``, ``Toy-Shapes`` -> ``shapes``."""
    key = name.strip().lower().replace("-", "_")
    for prefix in ("toy:", "toy_"):
        if key.startswith(prefix):
            key = key[len(prefix):]
    if key not in SUITE:
        raise DatasetError(f"unknown toy dataset {name!r}; available: {', '.join(SUITE)} (as toy:<name>)")
    return key


def default_toy_root() -> Path:
    """``$VLPROMPT_TOY_ROOT`` if set, else ``~/.cache/vlprompt/toyworld``."""
    env = os.environ.get(TOY_ROOT_ENV)
    return Path(env).expanduser() if env else Path("~/.cache/vlprompt/toyworld").expanduser()


# ------------------------------------------------------------------------------------------------ generation
def _class_folder(classname: str) -> str:
    return classname.replace(" ", "_")


def _rng(seed: int, spec: ToyDatasetSpec, split: str, label: int, i: int, what: int = 0) -> np.random.Generator:
    # Paired variants draw their scenes exactly like the source's test split.
    key = spec.scene_key or (spec.source if (spec.source and spec.paired) else spec.name)
    split_id = SPLIT_NAMES.index(split)
    return np.random.default_rng([seed, zlib.crc32(key.encode()), split_id, label, i, what])


def toy_scene(name: str, split: str, label: int, i: int, seed: int = 0) -> tuple[Scene, str]:
    """(scene, domain) of image ``i`` of class ``label`` in ``split`` of toy dataset ``name``."""
    spec = SUITE[resolve_toy_name(name)]
    scene = sample_scene(_rng(seed, spec, split, label, i), **{**spec.scene, **spec.class_kwargs[label]})
    drng = _rng(seed, spec, split, label, i, 1)
    domain = spec.domains[int(drng.integers(len(spec.domains)))]
    return scene, domain


def _manifest(spec: ToyDatasetSpec, seed: int, image_size: int, counts: tuple[int, int, int]) -> dict[str, Any]:
    return {
        "world_version": WORLD_VERSION, "name": spec.folder, "seed": seed, "image_size": image_size,
        "counts_per_class": list(counts), "classnames": list(spec.classnames), "template": spec.template,
        "domains": list(spec.domains), "source": f"toy_{spec.source}" if spec.source else None,
        # any change to how the spec draws scenes rebuilds the folder (renderer changes bump WORLD_VERSION)
        "spec_crc": zlib.crc32(repr((spec.scene, spec.class_kwargs, spec.source, spec.paired)
                                     + ((spec.scene_key,) if spec.scene_key else ())).encode()),
        "holdout_pairs_in_classes": sorted(c for c, kw in zip(spec.classnames, spec.class_kwargs)
                                           if (kw.get("colour"), kw.get("shape")) in HOLDOUT.pairs),
    }  # fmt: skip


def toy_fingerprint(name: str, seed: int = 0, image_size: int = DEFAULT_IMAGE_SIZE) -> str:
    """A short digest of everything that decides a toy dataset's images and splits (its manifest): results measured
    on an older version of a dataset are told apart from results on the current one."""
    spec = SUITE[resolve_toy_name(name)]
    manifest = _manifest(spec, seed, image_size, spec.counts)
    return f"{zlib.crc32(json.dumps(manifest, sort_keys=True).encode()):08x}"


def _read_manifest(folder: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _effective_counts(spec: ToyDatasetSpec, counts: Sequence[int] | None) -> tuple[int, int, int]:
    if counts is None:
        return spec.counts
    c = tuple(int(v) for v in counts)
    if len(c) != 3 or min(c) < 0:
        raise ValueError(f"counts must be three non-negative ints (train, val, test), got {counts!r}")
    if spec.source is not None:  # variants are test-only
        c = (0, 0, c[2])
    return c  # type: ignore[return-value]


def materialize(
    name: str, root: str | Path | None = None, seed: int = 0, image_size: int = DEFAULT_IMAGE_SIZE,
    counts: Sequence[int] | None = None,
) -> Path:  # fmt: skip
    """Write toy dataset ``name`` under ``root`` (default :func:`default_toy_root`) and return its folder
    ``<root>/toy_<name>``. Idempotent: a complete folder with the same settings is reused as is; a folder
    with other settings (or from another world version) is rebuilt. Atomic: built in a temp folder, then
    renamed. ``counts`` (train, val, test per class) overrides the spec's split sizes (e.g. for quick tests)."""
    spec = SUITE[resolve_toy_name(name)]
    root = Path(root).expanduser() if root is not None else default_toy_root()
    c = _effective_counts(spec, counts)
    target = root / spec.folder
    manifest = _manifest(spec, seed, image_size, c)
    existing = _read_manifest(target)
    if existing == manifest:
        return target
    if existing is not None or target.exists():
        warnings.warn(f"{target} was built with other settings or is incomplete; rebuilding it", stacklevel=2)

    def write(tmp: Path) -> None:
        split: dict[str, list[list[Any]]] = {s: [] for s in SPLIT_NAMES}
        for label, cname in enumerate(spec.classnames):
            folder = _class_folder(cname)
            (tmp / "images" / folder).mkdir(parents=True)
            index = 0
            for split_name, n in zip(SPLIT_NAMES, c):
                for i in range(n):
                    scene, domain = toy_scene(spec.name, split_name, label, i, seed)
                    rel = f"{folder}/{index:04d}.png"
                    Image.fromarray(render_array(scene, image_size, domain)).save(tmp / "images" / rel,
                                                                                   compress_level=1)
                    split[split_name].append([rel, label, cname])
                    index += 1
        (tmp / spec.split_file).write_text(json.dumps(split), encoding="utf-8")

    return write_once(root, target, manifest, write)


def write_once(root: Path, target: Path, manifest: dict[str, Any], write: Callable[[Path], None]) -> Path:
    """``target`` as ``write(folder)`` fills it, marked complete by ``manifest`` (its MANIFEST file): reused as is
    when the manifests are equal; otherwise built in a temporary folder under ``root`` and renamed into place, so a
    crash leaves no half-written target (and another process that finished it first wins)."""
    if _read_manifest(target) == manifest:
        return target
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=root))
    except OSError as err:
        why = "a file is in the way" if root.exists() and not root.is_dir() else (err.strerror or str(err))
        raise DatasetError(f"cannot write the toy world's datasets in {root} ({why}); pass a writable "
                           f"folder as --data-root (or set ${TOY_ROOT_ENV}).") from None
    try:
        write(tmp)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")  # last: marks complete
        _replace_dir(tmp, target, lambda: _read_manifest(target) == manifest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def materialize_suite(
    root: str | Path | None = None, seed: int = 0, image_size: int = DEFAULT_IMAGE_SIZE,
    names: Sequence[str] | None = None, counts: Sequence[int] | None = None,
) -> dict[str, Path]:  # fmt: skip
    """Materialize every toy dataset (or ``names``); returns {name: folder}."""
    return {n: materialize(n, root, seed, image_size, counts) for n in (names or list(SUITE))}


def load_toy(
    name: str, root: str | Path | None = None, seed: int = 0, image_size: int = DEFAULT_IMAGE_SIZE,
    counts: Sequence[int] | None = None,
) -> DatasetSplits:  # fmt: skip
    """The toy dataset as :class:`DatasetSplits` (named ``toy_<name>``), materializing it first if needed."""
    spec = SUITE[resolve_toy_name(name)]
    base = materialize(spec.name, root, seed, image_size, counts)
    data = json.loads((base / spec.split_file).read_text(encoding="utf-8"))
    names = [clean_classname(c) for c in spec.classnames]
    splits: dict[str, list[Sample]] = {}
    for s in SPLIT_NAMES:
        items = data.get(s, [])
        for rel, label, cname in items[:1]:
            if clean_classname(cname) != names[label]:
                raise DatasetError(f"{base / spec.split_file}: label {label} is {cname!r}, expected {names[label]!r}")
        splits[s] = [Sample(base / "images" / rel, int(label), names[int(label)]) for rel, label, _ in items]
    return DatasetSplits(spec.folder, names, spec.template, splits["train"], splits["val"], splits["test"])
