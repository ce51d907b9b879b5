"""Files shipped inside the package: the embedded default CLIP pretrained on the toy world."""
from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

EMBEDDED_MODELS = {"toyclip": Path(__file__).parent / "toyclip"}
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
            f"`vlprompt pretrain-toy --output {path}`."
        )
    return path


@lru_cache(maxsize=None)
def embedded_weights_digest(spec: str = "embedded") -> str:
    """First 16 hex digits of the SHA-256 of an embedded model's weights: tells results of two versions apart."""
    digest = hashlib.sha256((embedded_model_path(spec) / "model.safetensors").read_bytes()).hexdigest()
    return digest[:16]
