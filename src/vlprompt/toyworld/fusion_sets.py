"""Toy sets for the fusion-encoder tasks, written in the real layouts so the real readers load them.

- **VQA** (VQA v2 layout, read by data/vqa.py): the world's question/answer pairs (:func:`.captions.qa`) about
  clean scenes, ten identical annotator answers each (the world is unambiguous). ``train2014`` trains,
  ``val2014`` is scored.
- **NLVR2-style pairs** (NLVR2 layout, read by data/nlvr2.py): two scenes and a statement about them
  (:data:`STATEMENT_KINDS`), half true; ``train`` / ``dev`` / ``test1``.
- **Retrieval** (Karpathy's split file, read by data/retrieval.py): scenes with five captions each, in the
  ``dataset_flickr30k.json`` layout; ``train`` / ``val`` / ``test``.

What the embedded ViLT never saw in pretraining, so that tuning has something to learn: questions and statements
(it is pretrained on captions only, by matching and masked words), pairs of images, and the colour x shape
combinations of the world's :data:`.world.HOLDOUT` (scenes here are drawn from the whole world, so about a fifth
of the combination-shape objects are combinations it never saw).

Every set is a pure function of ``(seed, sizes, image size)``; a folder records them in ``toyworld.json`` and is
rebuilt when they differ (written in a temporary folder, then renamed).
"""
from __future__ import annotations

import json
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .captions import NUMBER_WORDS, caption, plural, qa
from .suite import write_once
from .render import render_array
from .world import COLOURS, NO_HOLDOUT, WORLD_VERSION, Scene, sample_scene

FUSION_SETS_VERSION = 1
ANNOTATORS = 10  # VQA v2 collects ten answers per question
VQA_QUESTIONS_PER_IMAGE = 2
CAPTIONS_PER_IMAGE = 5  # as Flickr30K and COCO
# Scene kinds of NLVR2-style images: objects to count and compare (no single-object scenes: little to say).
PAIR_SCENE_KINDS = {"count": 0.4, "multi": 0.4, "pair": 0.2}
STATEMENT_SHAPES = ("circle", "square", "triangle", "star", "cross", "heart", "hexagon", "diamond")
STATEMENT_KINDS = ("both", "left", "right", "exactly_one", "total", "more")


@dataclass(frozen=True)
class FusionSetSizes:
    """Examples per split: VQA images (two questions each), NLVR2 statements, retrieval images (five captions)."""

    vqa: tuple[int, int] = (1500, 400)  # train2014, val2014 images
    nlvr2: tuple[int, int, int] = (3000, 500, 500)  # train, dev, test1 statements
    retrieval: tuple[int, int, int] = (1000, 100, 100)  # train, val, test images


def _rng(seed: int, what: str, split: str, i: int, part: int = 0) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(what.encode()), zlib.crc32(split.encode()), i, part])


def _save(scene: Scene, path: Path, size: int) -> None:
    image = Image.fromarray(render_array(scene, size, "clean"))
    if path.suffix == ".jpg":
        image.save(path, quality=95)  # the VQA layout names COCO's JPEG files
    else:
        image.save(path, compress_level=1)


# ------------------------------------------------------------------------------------------------------ VQA
def _vqa_split(folder: Path, split: str, n_images: int, seed: int, size: int, first_question_id: int) -> None:
    images = folder / split
    images.mkdir(parents=True)
    questions, annotations = [], []
    question_id = first_question_id
    for i in range(n_images):
        rng = _rng(seed, "vqa", split, i)
        scene = sample_scene(rng, holdout=NO_HOLDOUT)
        image_id = i + 1
        _save(scene, images / f"COCO_{split}_{image_id:012d}.jpg", size)
        for question, answer in qa(scene, rng, n=VQA_QUESTIONS_PER_IMAGE):
            questions.append({"image_id": image_id, "question": question, "question_id": question_id})
            annotations.append({
                "question_id": question_id, "image_id": image_id, "multiple_choice_answer": answer,
                "answers": [{"answer": answer, "answer_confidence": "yes", "answer_id": k + 1}
                            for k in range(ANNOTATORS)],
            })  # fmt: skip
            question_id += 1
    (folder / f"v2_OpenEnded_mscoco_{split}_questions.json").write_text(json.dumps({"questions": questions}))
    (folder / f"v2_mscoco_{split}_annotations.json").write_text(json.dumps({"annotations": annotations}))


def _write_vqa(folder: Path, sizes: FusionSetSizes, seed: int, size: int) -> None:
    n_train, n_val = sizes.vqa
    _vqa_split(folder, "train2014", n_train, seed, size, first_question_id=1)
    _vqa_split(folder, "val2014", n_val, seed, size, first_question_id=10 * (n_train + 1))


# ---------------------------------------------------------------------------------------------------- NLVR2
def _shapes_of(scene: Scene) -> list[str]:
    return [o.shape for o in scene.objects]


def statement_truth(kind: str, left: Scene, right: Scene, shape: str, colour: str, number: int) -> bool:
    """Whether a statement of ``kind`` (with its shape, colour and number) holds for the (left, right) pair."""
    in_left, in_right = shape in _shapes_of(left), shape in _shapes_of(right)
    if kind == "both":
        return in_left and in_right
    if kind == "left":
        return any(o.shape == shape and o.colour == colour for o in left.objects)
    if kind == "right":
        return any(o.shape == shape and o.colour == colour for o in right.objects)
    if kind == "exactly_one":
        return in_left != in_right
    if kind == "total":
        return _shapes_of(left).count(shape) + _shapes_of(right).count(shape) == number
    if kind == "more":
        return left.count > right.count
    raise ValueError(f"unknown statement kind {kind!r}")


def statement_text(kind: str, shape: str, colour: str, number: int) -> str:
    return {
        "both": f"both images contain a {shape}",
        "left": f"the left image contains a {colour} {shape}",
        "right": f"the right image contains a {colour} {shape}",
        "exactly_one": f"exactly one image contains a {shape}",
        "total": (f"there is one {shape} in total" if number == 1
                  else f"there are {NUMBER_WORDS[number]} {plural(shape)} in total"),
        "more": "the left image has more objects than the right image",
    }[kind]


def _statement_params(rng: np.random.Generator, kind: str, left: Scene, right: Scene, true_wanted: bool
                      ) -> tuple[str, str, int]:  # fmt: skip
    """Parameters drawn from the images when a true statement is wanted (else from the world): statements about
    what is there, not only about what is not."""
    objects = list(left.objects if kind != "right" else right.objects)
    if kind in ("both", "exactly_one", "total"):
        objects = list(left.objects) + list(right.objects)
    if true_wanted and objects:
        obj = objects[int(rng.integers(len(objects)))]
        shape, colour = obj.shape, obj.colour
    else:
        shape = STATEMENT_SHAPES[int(rng.integers(len(STATEMENT_SHAPES)))]
        colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
    number = _shapes_of(left).count(shape) + _shapes_of(right).count(shape)
    if not true_wanted or number == 0 or rng.random() < 0.3:
        number = int(rng.integers(1, 7))
    return shape, colour, min(number, len(NUMBER_WORDS) - 1)


def _pair_scene(rng: np.random.Generator) -> Scene:
    return sample_scene(rng, kind=PAIR_SCENE_KINDS, shape=STATEMENT_SHAPES + ("pentagon", "ring", "arrow"),
                        holdout=NO_HOLDOUT)  # fmt: skip


def nlvr2_example(seed: int, split: str, i: int) -> tuple[Scene, Scene, str, bool]:
    """(left scene, right scene, statement, label) of example ``i``; labels alternate so each split is balanced."""
    want = i % 2 == 0
    rng = _rng(seed, "nlvr2", split, i)
    kind = STATEMENT_KINDS[int(rng.integers(len(STATEMENT_KINDS)))]
    for _ in range(200):
        left, right = _pair_scene(rng), _pair_scene(rng)
        shape, colour, number = _statement_params(rng, kind, left, right, want)
        if statement_truth(kind, left, right, shape, colour, number) == want:
            return left, right, statement_text(kind, shape, colour, number), want
    raise RuntimeError(f"could not draw a {want} {kind!r} statement for example {i} of {split}")


def _write_nlvr2(folder: Path, sizes: FusionSetSizes, seed: int, size: int) -> None:
    for split, n in zip(("train", "dev", "test1"), sizes.nlvr2):
        (folder / split).mkdir(parents=True)
        lines = []
        for i in range(n):
            left, right, sentence, label = nlvr2_example(seed, split, i)
            pair = f"{split}-{i}-0"
            _save(left, folder / split / f"{pair}-img0.png", size)
            _save(right, folder / split / f"{pair}-img1.png", size)
            lines.append(json.dumps({"identifier": f"{pair}-0", "sentence": sentence, "label": str(label)}))
        (folder / f"{split}.json").write_text("\n".join(lines) + "\n")


# ------------------------------------------------------------------------------------------------ retrieval
def retrieval_item(seed: int, split: str, i: int) -> tuple[Scene, list[str]]:
    """(scene, its five captions) of image ``i`` of ``split`` in the retrieval set of ``seed``."""
    scene = sample_scene(_rng(seed, "retrieval", split, i), holdout=NO_HOLDOUT)
    return scene, [caption(scene, _rng(seed, "retrieval", split, i, part=k + 1)) for k in range(CAPTIONS_PER_IMAGE)]


def _write_retrieval(folder: Path, sizes: FusionSetSizes, seed: int, size: int) -> None:
    (folder / "images").mkdir(parents=True)
    items = []
    for split, n in zip(("train", "val", "test"), sizes.retrieval):
        for i in range(n):
            scene, captions = retrieval_item(seed, split, i)
            name = f"{split}_{i:05d}.png"
            _save(scene, folder / "images" / name, size)
            items.append({"filename": name, "split": split, "sentences": [{"raw": c} for c in captions]})
    (folder / "dataset_flickr30k.json").write_text(json.dumps({"images": items}))


# ------------------------------------------------------------------------------------------------- folders
FUSION_SETS: dict[str, Callable[[Path, FusionSetSizes, int, int], None]] = {
    "vqa": _write_vqa,
    "nlvr2": _write_nlvr2,
    "retrieval": _write_retrieval,
}


def _manifest(name: str, sizes: FusionSetSizes, seed: int, size: int) -> dict[str, Any]:
    return {"world_version": WORLD_VERSION, "fusion_sets_version": FUSION_SETS_VERSION, "name": name, "seed": seed,
            "image_size": size, "sizes": list(asdict(sizes)[name])}  # fmt: skip


def fusion_set_folder(name: str, root: Path, seed: int = 0) -> Path:
    return root / (f"toy_{name}" if seed == 0 else f"toy_{name}_seed{seed}")


def materialize_fusion_set(name: str, root: str | Path, seed: int = 0, image_size: int = 48,
                           sizes: FusionSetSizes | None = None) -> Path:  # fmt: skip
    """Write toy set ``name`` (vqa, nlvr2, retrieval) under ``root`` and return its folder; a complete folder
    with the same settings is reused."""
    if name not in FUSION_SETS:
        raise ValueError(f"unknown toy fusion set {name!r}; choose one of {sorted(FUSION_SETS)}")
    sizes = sizes or FusionSetSizes()
    root = Path(root).expanduser()
    target = fusion_set_folder(name, root, seed)
    manifest = _manifest(name, sizes, seed, image_size)
    return write_once(root, target, manifest, lambda tmp: FUSION_SETS[name](tmp, sizes, seed, image_size))


def fusion_texts(seed: int = 0, n: int = 2000) -> list[str]:
    """Questions and statements of the toy sets (their words join the toy ViLT's vocabulary)."""
    texts = []
    for i in range(n):
        rng = _rng(seed, "vocabulary", "all", i)
        texts += [q for q, _ in qa(sample_scene(rng, holdout=NO_HOLDOUT), rng, n=None)]
    for kind in STATEMENT_KINDS:
        for shape in STATEMENT_SHAPES:
            texts.append(statement_text(kind, shape, "red", 2))
    return texts


def fusion_set_fingerprint(name: str, seed: int = 0, image_size: int = 48) -> str:
    """A short digest of what decides a toy set's content (its manifest): results on an older version of a set are
    told apart from results on the current one."""
    manifest = _manifest(name, FusionSetSizes(), seed, image_size)
    return f"{zlib.crc32(json.dumps(manifest, sort_keys=True).encode()):08x}"
