"""Model and dataset names, parsed once into an explicit scheme and name.

A model is ``embedded[:<name>]``, ``random:<preset>``, a local folder or a hub id (``org/name`` or
``hf-hub:org/name``); a dataset is ``toy:<name>``, ``toydet:<name>``, ``coco:<path>``, ``imagefolder[:<path>]``, a
fusion-encoder task's folder (``vqa:<path>``, ``nlvr2:<path>``, ``retrieval:<path>``) or a dataset name such as
``eurosat``. Parsing is syntactic (plus, for models, whether a path exists on disk): which
presets, toy worlds or datasets exist is checked by the loaders, which know them.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from vlprompt.assets import DEFAULT_EMBEDDED, EMBEDDED_MODELS

__all__ = ["DatasetSpec", "ModelSpec", "SpecError"]

ModelScheme = Literal["embedded", "random", "local", "hub"]
DatasetScheme = Literal["toy", "toydet", "coco", "vqa", "nlvr2", "retrieval", "imagefolder", "named"]

MODEL_FORMS = (
    "embedded or embedded:<name> (the shipped toy CLIP), random:<preset> (random weights, e.g. random:tiny), "
    "a local folder (./path, /path or ~/path) or a Hugging Face hub id (org/name or hf-hub:org/name)"
)
DATASET_FORMS = (
    "toy:<name>, toydet:<name>, coco:<path>, vqa:<path>, nlvr2:<path>, retrieval:<path>, imagefolder:<path> (or "
    "imagefolder with --data-root the folder) or a dataset name such as eurosat"
)
# A hub repo id: letters, digits, '.', '_' and '-', optionally under an organisation.
_HUB_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_HUB_ID = re.compile(rf"{_HUB_NAME}/{_HUB_NAME}")
_HUB_ID_OR_NAME = re.compile(rf"(?:{_HUB_NAME}/)?{_HUB_NAME}")
_HUB_PREFIX = "hf-hub"


class SpecError(ValueError):
    """A model or dataset name that no scheme accepts; the message lists the forms that are."""


# ------------------------------------------------------------------------------------------------- models
@dataclass(frozen=True)
class ModelSpec:
    """Where a backbone comes from.

    ``name`` is, per scheme: the embedded model's name (embedded), the preset (random), the absolute resolved
    path (local) or the repo id (hub).
    """

    scheme: ModelScheme
    name: str

    @classmethod
    def parse(cls, text: str | Path) -> ModelSpec:
        if isinstance(text, Path):  # a Path is a path, whatever its text would look like
            return cls._local(str(text))
        raw = text.strip()
        if not raw:
            raise SpecError(f"empty model name; pass {MODEL_FORMS}")
        scheme, sep, rest = raw.partition(":")
        key, rest = scheme.lower(), rest.strip()
        if key == "embedded":
            # "embedded:" with nothing after it is the default too, as the asset loader reads it.
            return cls("embedded", rest or DEFAULT_EMBEDDED)
        if not sep and key.startswith("embedded-"):
            if key.removeprefix("embedded-") in EMBEDDED_MODELS:  # embedded-vilt: the same as embedded:vilt
                return cls("embedded", key.removeprefix("embedded-"))
        if sep and key == "random":
            if not rest:
                raise SpecError(f"{raw!r}: write random:<preset>, e.g. random:tiny or random:vit-b-16")
            return cls("random", rest)
        if sep and key == _HUB_PREFIX:
            return cls._hub(raw, rest)
        return cls._path_or_hub(raw)

    @classmethod
    def _hub(cls, raw: str, repo_id: str) -> ModelSpec:
        # The prefix says "hub" outright, so a legacy id without an organisation is allowed here.
        if not _HUB_ID_OR_NAME.fullmatch(repo_id):
            raise SpecError(f"{raw!r}: write hf-hub:<org>/<name> with a Hugging Face repo id, e.g. "
                            "hf-hub:openai/clip-vit-base-patch16")
        return cls("hub", repo_id)

    @classmethod
    def _path_or_hub(cls, raw: str) -> ModelSpec:
        # An existing path wins over a hub id of the same text: what is on disk is what the user pointed at.
        if raw.startswith(("/", ".", "~")) or raw.count("/") > 1 or _exists(Path(raw).expanduser()):
            return cls._local(raw)
        if _HUB_ID.fullmatch(raw):
            return cls("hub", raw)
        raise SpecError(f"model {raw!r} is neither an existing folder nor a hub id (org/name); pass {MODEL_FORMS}")

    @classmethod
    def _local(cls, raw: str) -> ModelSpec:
        if not raw.strip():
            raise SpecError(f"empty model path; pass {MODEL_FORMS}")
        # Absolute, so a run trained from "./clip" still finds its model from another directory.
        return cls("local", str(Path(raw).expanduser().resolve()))

    def __str__(self) -> str:
        if self.scheme == "embedded":
            return "embedded" if self.name == DEFAULT_EMBEDDED else f"embedded:{self.name}"
        if self.scheme == "random":
            return f"random:{self.name}"
        if self.scheme == "hub":
            return f"{_HUB_PREFIX}:{self.name}"
        return self.name

    @property
    def is_local(self) -> bool:
        return self.scheme == "local"

    @property
    def load_name(self) -> str:
        """What ``from_pretrained`` is given: the folder (local, embedded) or the repo id (hub).

        A random preset has no weights to load and raises :class:`SpecError`.
        """
        if self.scheme in ("local", "hub"):
            return self.name
        if self.scheme == "embedded":
            from vlprompt.assets import embedded_model_path

            try:
                return str(embedded_model_path(str(self)))
            except ValueError as err:  # an unknown embedded name; a missing installation stays FileNotFoundError
                raise SpecError(str(err)) from err
        raise SpecError(f"{self}: a random preset has no pretrained weights to load; build it from its preset")


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except (OSError, ValueError):  # a name too long for the filesystem, or with a NUL byte, is no path
        return False


# ------------------------------------------------------------------------------------------------ datasets
# Schemes whose name cannot be empty -> the form a message shows.
_NAMED_FORMS = {"toy": "toy:<name>", "toydet": "toydet:<name>", "coco": "coco:<path>", "vqa": "vqa:<path>",
                "nlvr2": "nlvr2:<path>", "retrieval": "retrieval:<path>"}
_DETECTION_SCHEMES = frozenset({"toydet", "coco"})
_FUSION_SCHEMES = frozenset({"vqa", "nlvr2", "retrieval"})  # each scheme is its task's name
# The toy world's sets of those tasks (toy:vqa, toy:nlvr2, toy:retrieval): each name is its task's name.
TOY_FUSION_SETS = frozenset({"vqa", "nlvr2", "retrieval"})
# Schemes whose name is a path, resolved against the data root when not found as written.
PATH_SCHEMES = frozenset({"imagefolder", "coco", *_FUSION_SCHEMES})


@dataclass(frozen=True)
class DatasetSpec:
    """Which dataset to load.

    ``name`` is, per scheme: the toy world's name (toy, toydet; ``toy:vqa``, ``toy:nlvr2`` and ``toy:retrieval`` are
    the toy sets of the fusion-encoder tasks), the path as written (coco, imagefolder; ""
    for an imagefolder means the data root itself) or the dataset name as typed (named). Paths stay as written
    because a relative one is resolved against the data root by the loader.
    """

    scheme: DatasetScheme
    name: str

    @classmethod
    def parse(cls, text: str) -> DatasetSpec:
        raw = str(text).strip()
        if not raw:
            raise SpecError(f"empty dataset name; pass {DATASET_FORMS}")
        scheme, sep, rest = raw.partition(":")
        key, name = scheme.strip().lower(), rest.strip()
        if key in _NAMED_FORMS:
            if not name:
                raise SpecError(f"{raw!r}: write {_NAMED_FORMS[key]}, e.g. {_example(key)}")
            return cls(key, name)  # type: ignore[arg-type]  # key is one of the literal schemes
        if key == "imagefolder":
            return cls("imagefolder", name)
        if sep:
            raise SpecError(f"unknown dataset scheme {scheme + ':'!r} in {raw!r}; pass {DATASET_FORMS}")
        return cls("named", raw)

    def __str__(self) -> str:
        if self.scheme == "named":
            return self.name
        if self.scheme == "imagefolder" and not self.name:
            return "imagefolder"
        return f"{self.scheme}:{self.name}"

    @property
    def task(self) -> Literal["classification", "detection", "vqa", "nlvr2", "retrieval"]:
        if self.scheme in _FUSION_SCHEMES:
            return self.scheme  # type: ignore[return-value]  # vqa, nlvr2 or retrieval
        if self.scheme == "toy" and self.name.lower() in TOY_FUSION_SETS:
            return self.name.lower()  # type: ignore[return-value]
        return "detection" if self.scheme in _DETECTION_SCHEMES else "classification"


def _example(scheme: str) -> str:
    return {"toy": "toy:shapes", "toydet": "toydet:shapes", "coco": "coco:data/coco", "vqa": "vqa:data/vqa_v2",
            "nlvr2": "nlvr2:data/nlvr2", "retrieval": "retrieval:data/flickr30k"}[scheme]
