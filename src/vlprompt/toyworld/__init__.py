"""A procedural image-text world: the embedded default for pretraining and evaluating prompt tuning offline.

- :mod:`.world`: vocabulary (15 shapes, 12 colours, sizes, fills, positions, relations, backgrounds, domains),
  :class:`Scene` records, the pretraining :data:`HOLDOUT` and the seeded :func:`sample_scene`.
- :mod:`.render`: :func:`render` (scene, size, domain) -> PIL image; :func:`boxes` (COCO [x, y, w, h]).
- :mod:`.captions`: :func:`caption` and :func:`qa` from a scene.
- :mod:`.corpus`: :func:`pretraining_pairs` / :class:`PretrainingCorpus` (world minus the holdout), a cached
  ``.npy`` variant, and COCO detection sets.
- :mod:`.suite`: the downstream classification :data:`SUITE` in the CoOp layout: :func:`materialize`,
  :func:`load_toy`.

See docs/toyworld.md.
"""

from .captions import caption, qa
from .corpus import (
    PretrainingCorpus,
    coco_detection,
    load_pretraining_cache,
    pretraining_pairs,
    write_detection_set,
    write_pretraining_cache,
)
from .render import boxes, render, render_array
from .suite import (
    SUITE,
    ToyDatasetSpec,
    default_toy_root,
    load_toy,
    materialize,
    materialize_suite,
    resolve_toy_name,
    toy_dataset_names,
    toy_scene,
)
from .world import (
    BACKGROUNDS,
    COLOURS,
    COMBO_COLOURS,
    COMBO_SHAPES,
    DOMAINS,
    FILLS,
    HOLDOUT,
    NO_HOLDOUT,
    POSITIONS,
    PRETRAIN_DOMAINS,
    RELATIONS,
    SHAPES,
    SIZES,
    WORLD_VERSION,
    Holdout,
    Obj,
    Scene,
    sample_scene,
)

__all__ = [
    "BACKGROUNDS",
    "COLOURS",
    "COMBO_COLOURS",
    "COMBO_SHAPES",
    "DOMAINS",
    "FILLS",
    "HOLDOUT",
    "NO_HOLDOUT",
    "POSITIONS",
    "PRETRAIN_DOMAINS",
    "RELATIONS",
    "SHAPES",
    "SIZES",
    "SUITE",
    "WORLD_VERSION",
    "Holdout",
    "Obj",
    "PretrainingCorpus",
    "Scene",
    "ToyDatasetSpec",
    "boxes",
    "caption",
    "coco_detection",
    "default_toy_root",
    "load_pretraining_cache",
    "load_toy",
    "materialize",
    "materialize_suite",
    "pretraining_pairs",
    "qa",
    "render",
    "render_array",
    "resolve_toy_name",
    "sample_scene",
    "toy_dataset_names",
    "toy_scene",
    "write_detection_set",
    "write_pretraining_cache",
]
