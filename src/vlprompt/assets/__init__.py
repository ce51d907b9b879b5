"""Files shipped inside the package: the embedded default CLIP (``embedded``), the ViLT (``embedded-vilt``) and
the Grounding DINO (``embedded-detector``) pretrained on the toy world."""
from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

EMBEDDED_MODELS = {"toyclip": Path(__file__).parent / "toyclip", "vilt": Path(__file__).parent / "toyvilt",
                   "detector": Path(__file__).parent / "toydet"}  # fmt: skip
# How each embedded model is rebuilt (the message of a missing one names it).
REBUILD_COMMANDS = {"toyclip": "vlprompt pretrain-toy", "vilt": "vlprompt pretrain-toy-vilt",
                    "detector": "vlprompt pretrain-toy-detector"}  # fmt: skip
DEFAULT_EMBEDDED = "toyclip"


def embedded_model_path(spec: str = "embedded") -> Path:
    """Folder of an embedded model: ``embedded`` (the default) or ``embedded:<name>``."""
    name = spec.partition(":")[2] or DEFAULT_EMBEDDED
    if name not in EMBEDDED_MODELS:
        raise ValueError(f"unknown embedded model {name!r}; available: {sorted(EMBEDDED_MODELS)}")
    path = EMBEDDED_MODELS[name]
    if not (path / "config.json").exists():
        raise FileNotFoundError(
            f"the embedded model {name!r} is not in this installation ({path}). Rebuild it with "
            f"`{REBUILD_COMMANDS[name]} --output {path}`."
        )
    return path


@lru_cache(maxsize=None)
def embedded_weights_digest(spec: str = "embedded") -> str:
    """First 16 hex digits of the SHA-256 of an embedded model's weights: tells results of two versions apart."""
    digest = hashlib.sha256((embedded_model_path(spec) / "model.safetensors").read_bytes()).hexdigest()
    return digest[:16]


def model_name_for_users(name_or_path: str | None) -> str | None:
    """How a user names a model: ``embedded`` (or ``embedded:<name>``) for a shipped model's folder, which a
    checkpoint records by its resolved path, otherwise the name or path as recorded."""
    if not name_or_path:
        return name_or_path
    try:
        resolved = Path(name_or_path).expanduser().resolve()
    except (OSError, RuntimeError):
        return name_or_path
    for name, folder in EMBEDDED_MODELS.items():
        if resolved == folder.resolve():
            return "embedded" if name == DEFAULT_EMBEDDED else f"embedded:{name}"
    return name_or_path
