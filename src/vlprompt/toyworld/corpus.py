"""The image-caption pretraining corpus (streamed or cached) and COCO-style detection sets.

Pair ``i`` of a corpus depends only on ``(seed, i)``: it can be rendered on the fly in any order, sharded over
data-loader workers, or cached once as a uint8 ``.npy`` array plus a captions JSON file.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .captions import caption
from .render import boxes, render_array
from .world import (
    HOLDOUT, PRETRAIN_DOMAINS, SHAPES, VARY_WEIGHTS, WORLD_VERSION, Holdout, Scene, attribute_values, sample_scene,
    vary_scene,
)  # fmt: skip

__all__ = [
    "PretrainingCorpus",
    "coco_detection",
    "load_pretraining_cache",
    "pretraining_pairs",
    "write_detection_set",
    "write_pretraining_cache",
]


@dataclass
class PretrainingCorpus:
    """``n`` random (image, caption) pairs from the world minus ``holdout``, with random access.

    ``corpus[i]`` -> (uint8 array of shape (size, size, 3), caption); ``corpus.scene(i)`` and ``corpus.domain(i)``
    give what was drawn. Domains are mixed by ``domains`` ({name: weight}); held-out domains are refused.

    ``group_size`` > 1 makes consecutive pairs ``g * group_size .. (g + 1) * group_size - 1`` a hard-negative group:
    one scene in one domain, with one attribute (shape, position, colour or fill, drawn by :data:`VARY_WEIGHTS`)
    set to a different value in each member. A contrastive batch made of whole groups can then only be solved by
    seeing that attribute, which is how a small ViT learns shapes and positions from a few hundred thousand pairs.
    """

    n: int
    seed: int = 0
    size: int = 48
    holdout: Holdout = HOLDOUT
    domains: Mapping[str, float] = field(default_factory=lambda: dict(PRETRAIN_DOMAINS))
    group_size: int = 1

    def __post_init__(self) -> None:
        if self.group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {self.group_size}")
        banned = [d for d, w in self.domains.items() if w > 0 and d in self.holdout.domains]
        if banned:
            raise ValueError(f"domains {banned} are held out ({self.holdout.domains}); give them weight 0")
        if not self.domains or sum(self.domains.values()) <= 0:
            raise ValueError("need at least one domain with a positive weight")
        keys = list(self.domains)
        w = np.asarray([self.domains[k] for k in keys], dtype=float)
        self._domain_keys, self._domain_p = keys, w / w.sum()

    def __len__(self) -> int:
        return self.n

    def _draw(self, i: int) -> tuple[Scene, str, np.random.Generator]:
        if not 0 <= i < self.n:
            raise IndexError(f"pair {i} out of range 0..{self.n - 1}")
        if self.group_size > 1:
            return self._draw_grouped(i)
        rng = np.random.default_rng([self.seed, i, 0x70726574])  # "pret"
        scene = sample_scene(rng, holdout=self.holdout)
        domain = self._domain_keys[int(rng.choice(len(self._domain_keys), p=self._domain_p))]
        return scene, domain, rng

    def _draw_grouped(self, i: int) -> tuple[Scene, str, np.random.Generator]:
        group, member = divmod(i, self.group_size)
        rng = np.random.default_rng([self.seed, group, self.group_size, 0x67727570])  # "grup"
        base = sample_scene(rng, holdout=self.holdout)
        domain = self._domain_keys[int(rng.choice(len(self._domain_keys), p=self._domain_p))]
        attributes = list(VARY_WEIGHTS)
        weights = np.asarray([VARY_WEIGHTS[a] for a in attributes])
        attribute = attributes[int(rng.choice(len(attributes), p=weights / weights.sum()))]
        if attribute == "position" and base.kind != "single":
            attribute = "shape"
        variants = [vary_scene(base, attribute, str(v)) for v in rng.permutation(attribute_values(attribute))]
        variants = [v for v in variants if self.holdout.allows_scene(v)]
        scene = variants[member % len(variants)]
        return scene, domain, np.random.default_rng([self.seed, i, 0x70726574])

    def scene(self, i: int) -> Scene:
        return self._draw(i)[0]

    def domain(self, i: int) -> str:
        return self._draw(i)[1]

    def caption(self, i: int, variant: int = 0) -> str:
        """Caption of pair ``i``; ``variant`` > 0 gives other phrasings of the same scene (e.g. one per epoch)."""
        scene, domain, rng = self._draw(i)
        if variant:
            rng = np.random.default_rng([self.seed, i, 0x63617074, variant])  # "capt"
        return caption(scene, rng, domain)

    def __getitem__(self, i: int) -> tuple[np.ndarray, str]:
        scene, domain, rng = self._draw(i)
        return render_array(scene, self.size, domain), caption(scene, rng, domain)

    def __iter__(self) -> Iterator[tuple[np.ndarray, str]]:
        for i in range(self.n):
            yield self[i]


def pretraining_pairs(
    n: int, seed: int = 0, size: int = 48, holdout: Holdout = HOLDOUT,
    domains: Mapping[str, float] | None = None, start: int = 0, pil: bool = True,
) -> Iterator[tuple[Image.Image | np.ndarray, str]]:  # fmt: skip
    """Stream pairs ``start .. n-1`` of the corpus ``(n, seed, size, holdout, domains)`` as (PIL image or uint8
    array, caption), rendering on the fly (nothing is stored)."""
    corpus = PretrainingCorpus(n, seed, size, holdout, dict(domains or PRETRAIN_DOMAINS))
    for i in range(start, n):
        arr, text = corpus[i]
        yield (Image.fromarray(arr, "RGB") if pil else arr), text


# ---------------------------------------------------------------------------------------------------- cache
def _holdout_meta(h: Holdout) -> dict[str, Any]:
    return {"pairs": sorted(map(list, h.pairs)), "domains": list(h.domains)}


def _render_chunk(args: tuple[str, dict[str, Any], int, int]) -> list[str]:
    path, meta, lo, hi = args
    corpus = PretrainingCorpus(meta["n"], meta["seed"], meta["size"], meta["_holdout"], meta["domains"],
                               meta.get("group_size", 1))
    arr = np.load(path, mmap_mode="r+")
    texts = []
    for i in range(lo, hi):
        arr[i], t = corpus[i]
        texts.append(t)
    arr.flush()
    del arr
    return texts


def write_pretraining_cache(
    folder: str | Path, n: int, seed: int = 0, size: int = 48, holdout: Holdout = HOLDOUT,
    domains: Mapping[str, float] | None = None, workers: int = 1, group_size: int = 1,
) -> Path:  # fmt: skip
    """Render the corpus once into ``folder/{images.npy, captions.json, meta.json}`` (images: uint8, shape
    (n, size, size, 3)). Reuses a complete cache with the same settings; writes atomically (temp folder +
    rename). ``workers`` > 1 renders chunks in parallel processes. Returns ``folder``."""
    folder = Path(folder).expanduser()
    domains = dict(domains or PRETRAIN_DOMAINS)
    PretrainingCorpus(n, seed, size, holdout, domains, group_size)  # validate before any work
    meta = {"world_version": WORLD_VERSION, "n": n, "seed": seed, "size": size, "domains": domains,
            "holdout": _holdout_meta(holdout)}  # fmt: skip
    if group_size > 1:  # only then, so caches written before grouping existed stay valid
        meta["group_size"] = group_size
    if _cache_matches(folder, meta):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        images = tmp / "images.npy"
        np.lib.format.open_memmap(images, mode="w+", dtype=np.uint8, shape=(n, size, size, 3)).flush()
        job = {**meta, "_holdout": holdout}
        step = max(1, min(2000, -(-n // max(workers, 1))))
        chunks = [(str(images), job, lo, min(lo + step, n)) for lo in range(0, n, step)]
        if workers > 1 and len(chunks) > 1:
            import multiprocessing as mp

            with mp.get_context("fork" if os.name == "posix" else "spawn").Pool(workers) as pool:
                parts = pool.map(_render_chunk, chunks)
        else:
            parts = [_render_chunk(c) for c in chunks]
        captions = [t for part in parts for t in part]
        (tmp / "captions.json").write_text(json.dumps(captions), encoding="utf-8")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")  # written last: complete
        _replace_dir(tmp, folder, lambda: _cache_matches(folder, meta))
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _cache_matches(folder: Path, meta: dict[str, Any]) -> bool:
    try:
        return bool(json.loads((folder / "meta.json").read_text(encoding="utf-8")) == meta)
    except (OSError, ValueError):
        return False


def _replace_dir(tmp: Path, target: Path, target_ok: Any) -> None:
    """Move the finished ``tmp`` folder to ``target``; an existing stale target is moved aside first. If another
    process finished the same target meanwhile (``target_ok()``), keep theirs."""
    for _ in range(3):
        try:
            os.rename(tmp, target)
            return
        except OSError:
            if target_ok():
                return
            if target.exists():
                stale = target.with_name(f".{target.name}.stale-{os.getpid()}")
                try:
                    os.rename(target, stale)
                except OSError:
                    continue
                shutil.rmtree(stale, ignore_errors=True)
    os.rename(tmp, target)


def load_pretraining_cache(folder: str | Path) -> tuple[np.ndarray, list[str]]:
    """(images memmap of shape (n, size, size, 3), captions) from :func:`write_pretraining_cache`."""
    folder = Path(folder).expanduser()
    if not (folder / "meta.json").is_file():
        raise FileNotFoundError(f"{folder} holds no complete pretraining cache (meta.json missing)")
    images = np.load(folder / "images.npy", mmap_mode="r")
    captions = json.loads((folder / "captions.json").read_text(encoding="utf-8"))
    if len(captions) != len(images):
        raise ValueError(f"{folder}: {len(images)} images but {len(captions)} captions; delete and rebuild it")
    return images, captions


# ------------------------------------------------------------------------------------------------ detection
def coco_detection(scenes: Sequence[Scene], file_names: Sequence[str], size: int) -> dict[str, Any]:
    """A COCO detection dict (images, annotations with [x, y, w, h] boxes, categories = the shapes, ids from 1)."""
    cat_id = {s: i + 1 for i, s in enumerate(SHAPES)}
    images, annotations = [], []
    for img_id, (scene, name) in enumerate(zip(scenes, file_names), 1):
        images.append({"id": img_id, "file_name": name, "width": size, "height": size})
        for b in boxes(scene, size):
            x, y, w, h = b["bbox"]  # type: ignore[misc]
            annotations.append({
                "id": len(annotations) + 1, "image_id": img_id, "category_id": cat_id[str(b["category"])],
                "bbox": [x, y, w, h], "area": round(w * h, 2), "iscrowd": 0,
                "attributes": {"colour": b["colour"], "fill": b["fill"], "size": b["size"]},
            })  # fmt: skip
    categories = [{"id": i, "name": s, "supercategory": "shape"} for s, i in cat_id.items()]
    return {"images": images, "annotations": annotations, "categories": categories}


def write_detection_set(
    folder: str | Path, n: int, seed: int = 0, size: int = 64, holdout: Holdout | None = None,
    kinds: Mapping[str, float] | None = None, domain: str = "clean", shapes: Sequence[str] | None = None,
) -> Path:  # fmt: skip
    """Write ``n`` multi-object scenes as ``folder/images/<i>.png`` + ``folder/annotations.json`` (COCO).

    ``shapes``: draw objects from these shapes only (None: all of them); the categories listed are still all
    fifteen shapes, so sets drawn from different shape pools share category ids."""
    folder = Path(folder).expanduser()
    (folder / "images").mkdir(parents=True, exist_ok=True)
    kinds = dict(kinds or {"multi": 0.6, "pair": 0.2, "count": 0.2})
    scenes, names = [], []
    for i in range(n):
        scene = sample_scene(np.random.default_rng([seed, i, 0x64657463]), kinds, holdout=holdout,  # "detc"
                             shape=tuple(shapes) if shapes else None)
        name = f"images/{i:05d}.png"
        Image.fromarray(render_array(scene, size, domain)).save(folder / name, compress_level=1)
        scenes.append(scene)
        names.append(name)
    (folder / "annotations.json").write_text(json.dumps(coco_detection(scenes, names, size)), encoding="utf-8")
    return folder
