"""Shared fixtures for the vlprompt test suite.

Fixtures defined here (append new ones below this block):
- ``tiny_backbone``: a session-wide tiny random CLIP (frozen; tests must not modify its weights).
- ``tiny_model_dir``: a folder written by ``save_random_clip(..., "tiny")`` (same weights as ``tiny_backbone``).
- ``classnames``: four class names of different token lengths.
"""
from __future__ import annotations

import pytest

from vlprompt.backbones import load_backbone
from vlprompt.backbones.presets import save_random_clip


@pytest.fixture(scope="session")
def tiny_backbone():
    return load_backbone("random:tiny")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return save_random_clip(tmp_path_factory.mktemp("tiny_clip"), "tiny")


@pytest.fixture
def classnames():
    return ["annual crop", "forest", "highway", "sea lake"]
