"""Seeded K-shot sampling with an on-disk cache, so a (dataset, K, seed) triple always picks the same images.

Cache file: ``<cache_dir>/<dataset name>/shot_<K>-seed_<S>.json`` holding, for train and val, pairs
``[path relative to the dataset's common image folder, label]``. Relative keys keep the cache valid when the
data root is moved or mounted elsewhere; entries are resolved against the freshly loaded splits, so a cache
only ever returns samples that are still part of the dataset.
"""

from __future__ import annotations

import json
import os
import random
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vlprompt.fileio import temp_file_beside

from .datasets import DatasetSplits, Sample
from .errors import DatasetError

__all__ = ["MAX_VAL_SHOTS", "few_shot", "few_shot_cache_path"]

MAX_VAL_SHOTS = 4  # the protocol validates on min(K, 4) images per class
_CACHE_FORMAT = 1


def few_shot(
    splits: DatasetSplits, shots: int, seed: int, cache_dir: str | Path | None = None
) -> DatasetSplits:
    """K-shot train (`shots` per class) and min(K, 4)-per-class val, sampled with `seed`; test is unchanged.

    Val comes from the val split, or from train images not picked for training when the val split is empty.
    Classes with fewer than K images contribute all of them (with a warning). Sampling uses a private
    ``random.Random(seed)``, so it neither depends on nor disturbs the global RNG state.
    """
    if isinstance(shots, bool) or not isinstance(shots, int) or shots < 1:
        raise DatasetError(f"shots must be an integer >= 1, got {shots!r}; to train on all images, leave out --shots (data.shots).")
    picked: tuple[list[Sample], list[Sample]] | None = None
    path = few_shot_cache_path(cache_dir, splits.name, shots, seed) if cache_dir is not None else None
    if path is not None and path.exists():
        picked = _read_cache(path, splits, shots, seed)
    if picked is None:
        picked = _sample(splits, shots, seed)
        if path is not None:
            _write_cache(path, splits, shots, seed, *picked)
    train, val = picked
    _warn_short_classes(splits, shots)  # on every run, a cached split's too: the run uses fewer than asked
    return DatasetSplits(splits.name, list(splits.classnames), splits.template, train, val, list(splits.test))


def _warn_short_classes(splits: DatasetSplits, shots: int) -> None:
    n = len(splits.classnames)
    short = [(splits.classnames[c], len(g)) for c, g in enumerate(_by_class(splits.train, n)) if len(g) < shots]
    if short:
        examples = ", ".join(f"{name!r}: {k}" for name, k in short[:5])
        warnings.warn(
            f"{splits.name}: {len(short)} of {n} classes have fewer than {shots} training images ({examples}"
            f"{', ...' if len(short) > 5 else ''}); using all of their images (the run records the counts used).",
            stacklevel=3,
        )


def few_shot_cache_path(cache_dir: str | Path, name: str, shots: int, seed: int) -> Path:
    safe_name = name.replace("/", "_").replace("\\", "_").replace(":", "_")
    return Path(cache_dir).expanduser() / safe_name / f"shot_{shots}-seed_{seed}.json"


# -------------------------------------------------------------------------------------------- sampling
def _by_class(samples: Sequence[Sample], num_classes: int) -> list[list[Sample]]:
    groups: list[list[Sample]] = [[] for _ in range(num_classes)]
    for s in samples:
        groups[s.label].append(s)
    return groups


def _pick(rng: random.Random, items: list[Sample], k: int) -> list[Sample]:
    # Keep the dataset's listing order among the picked items: the result reads like the split file.
    idx = sorted(rng.sample(range(len(items)), min(k, len(items))))
    return [items[i] for i in idx]


def _without(items: list[Sample], taken: list[Sample]) -> list[Sample]:
    taken_set = set(taken)
    return [s for s in items if s not in taken_set]


def _sample(splits: DatasetSplits, shots: int, seed: int) -> tuple[list[Sample], list[Sample]]:
    rng = random.Random(seed)
    n = len(splits.classnames)
    train_groups = _by_class(splits.train, n)
    train_picks = [_pick(rng, g, shots) for g in train_groups]
    if splits.val:
        val_pools = _by_class(splits.val, n)
    else:  # no val split: validate on train images that were not picked, so train and val never overlap
        val_pools = [_without(g, p) for g, p in zip(train_groups, train_picks)]
    k_val = min(shots, MAX_VAL_SHOTS)
    val = [s for pool in val_pools for s in _pick(rng, pool, k_val)]
    return [s for p in train_picks for s in p], val


# ----------------------------------------------------------------------------------------------- cache
def _common_dir(paths: Sequence[str]) -> str:
    """Deepest folder containing every path. All strings sorting between the min and the max share their
    common prefix, so two comparisons suffice (os.path.commonpath on ImageNet's 1.2M paths is slow)."""
    if not paths:
        return ""
    prefix = os.path.commonprefix([min(paths), max(paths)])
    return prefix[: prefix.rfind(os.sep)]


class _Index:
    """Maps samples to cache keys (path relative to the common folder of the pool, '/'-separated) and back."""

    def __init__(self, pool: Sequence[Sample]) -> None:
        strs = [str(s.path) for s in pool]
        self.base = _common_dir(strs)
        self.by_key = {self.key_of(p): s for p, s in zip(strs, pool)}

    def key_of(self, path: str) -> str:
        return path[len(self.base) + 1 :].replace(os.sep, "/")


def _val_pool(splits: DatasetSplits) -> list[Sample]:
    return splits.val if splits.val else splits.train


def _write_cache(
    path: Path, splits: DatasetSplits, shots: int, seed: int, train: list[Sample], val: list[Sample]
) -> None:
    train_index, val_index = _Index(splits.train), _Index(_val_pool(splits))
    payload: dict[str, Any] = {
        "format": _CACHE_FORMAT,
        "dataset": splits.name,
        "shots": shots,
        "seed": seed,
        "classnames": splits.classnames,
        "pool_sizes": _pool_sizes(splits),
        # Informational only: where the images were when the cache was written.
        "train_base": train_index.base,
        "val_base": val_index.base,
        "train": [[train_index.key_of(str(s.path)), s.label] for s in train],
        "val": [[val_index.key_of(str(s.path)), s.label] for s in val],
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write to a temp file in the same folder, then os.replace: concurrent runs (seeds in parallel) and
        # interrupted runs never leave a half-written cache that a later run would read.
        fd, tmp = temp_file_beside(path, suffix=".tmp")
    except OSError as err:  # e.g. a read-only dataset mount: the split is seeded, the cache only pins it to disk
        warnings.warn(
            f"few-shot split cache not written ({err}); the sampled split is used without it. Set a writable "
            "cache folder with --set data.cache_dir=DIR (DataOptions.cache_dir).",
            stacklevel=2,
        )
        return
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(payload, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_cache(path: Path, splits: DatasetSplits, shots: int, seed: int) -> tuple[list[Sample], list[Sample]] | None:
    """The cached samples, or None (after a warning) when the cache no longer matches the dataset."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        problem = _cache_problem(data, splits, shots, seed)
        if problem is None:
            train = _resolve(data["train"], _Index(splits.train))
            val = _resolve(data["val"], _Index(_val_pool(splits)))
            return train, val
    except (OSError, ValueError, KeyError, TypeError) as e:
        problem = f"unreadable ({type(e).__name__}: {e})"
    except _StaleEntry as e:
        problem = str(e)
    warnings.warn(f"few-shot cache {path} is stale: {problem}; sampling again and overwriting it.", stacklevel=3)
    return None


def _cache_problem(data: Any, splits: DatasetSplits, shots: int, seed: int) -> str | None:
    if not isinstance(data, dict) or data.get("format") != _CACHE_FORMAT:
        return "unknown cache format"
    if data.get("shots") != shots or data.get("seed") != seed:
        return f"it was written for shots={data.get('shots')}, seed={data.get('seed')}"
    if data.get("classnames") != splits.classnames:
        return "the dataset's class list changed"
    if "pool_sizes" in data and data["pool_sizes"] != _pool_sizes(splits):
        # More images in a class that had fewer than K, or a changed pool: the seeded sample is another one now.
        return "the number of train / val images per class changed"
    return None


def _pool_sizes(splits: DatasetSplits) -> dict[str, list[int]]:
    n = len(splits.classnames)
    return {"train": [len(g) for g in _by_class(splits.train, n)],
            "val": [len(g) for g in _by_class(_val_pool(splits), n)]}


class _StaleEntry(Exception):
    pass


def _resolve(entries: list[list[Any]], index: _Index) -> list[Sample]:
    out: list[Sample] = []
    for key, label in entries:
        sample = index.by_key.get(key)
        if sample is None or sample.label != label:
            raise _StaleEntry(f"{key!r} (label {label}) is no longer part of the dataset")
        # The split loaders do not stat every image; the few cached ones are cheap to check.
        if not sample.path.exists():
            raise _StaleEntry(f"image {sample.path} no longer exists")
        out.append(sample)
    return out
