"""Shared fixtures for the vlprompt test suite.

Fixtures defined here (append new ones below this block):
- ``tiny_backbone``: a session-wide tiny random CLIP (frozen; tests must not modify its weights).
- ``tiny_model_dir``: a folder written by ``save_random_clip(..., "tiny")`` (same weights as ``tiny_backbone``).
- ``classnames``: four class names of different token lengths.
"""
from __future__ import annotations

import os
import tempfile

import pytest

# The suite is the CPU suite on every machine: exact-equality tests share session-wide models, and a run trained on
# a GPU would move them there. GPU checks live in tests/gpu (VLPROMPT_TEST_DEVICE=cuda python -m pytest tests/gpu).
if os.environ.get("VLPROMPT_TEST_DEVICE", "cpu") == "cpu":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
# Few-shot split caches of the tests' throw-away data roots go to a throw-away cache, not the user's (the toy
# datasets themselves stay in the shared toy cache: generating them is the slow part).
os.environ.setdefault("VLPROMPT_CACHE", tempfile.mkdtemp(prefix="vlprompt-test-cache-"))

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


# ---------------------------------------------------------------------------------------------------------------
# Engine / CLI fixtures (tests/test_engine.py, tests/test_cli.py). Session-scoped and read-only: tests that tamper
# with a run or a dataset copy it first.
ENGINE_CLASSES = ("AnnualCrop", "Forest", "Highway")
ENGINE_PER_SPLIT = (4, 2, 3)  # train / val / test images per class
ENGINE_IMAGE_SIZE = 32


@pytest.fixture(scope="session")
def engine_data_root(tmp_path_factory):
    """A data root holding a tiny 3-class EuroSAT-layout set (solid class colours: easily separable)."""
    from data_fixtures import make_split_json_dataset

    root = tmp_path_factory.mktemp("engine_data")
    make_split_json_dataset(
        root, "eurosat", classnames=ENGINE_CLASSES, per_split=ENGINE_PER_SPLIT, image_size=ENGINE_IMAGE_SIZE
    )
    return root


def _engine_run_options(model_dir, data_root, output, method="coop", method_options=None, **train):
    """RunOptions for a tiny, fast run on the engine dataset (keyword arguments go to TrainConfig)."""
    from vlprompt.engine.api import DataOptions, RunOptions, TrainConfig

    train = {"epochs": 2, "batch_size": 4, "warmup_epochs": 0, "lr": 0.01, "optimizer": "adamw", **train}
    return RunOptions(
        model=str(model_dir),
        method=method,
        method_options={"n_ctx": 2} if method_options is None and method == "coop" else dict(method_options or {}),
        data=DataOptions(dataset="eurosat", root=str(data_root)),
        train=TrainConfig(**train),
        output=str(output),
    )


@pytest.fixture(scope="session")
def engine_run_options():
    """``make(model_dir, data_root, output, method="coop", method_options=None, **train_config) -> RunOptions``."""
    return _engine_run_options


@pytest.fixture(scope="session")
def engine_coop_run(tiny_model_dir, engine_data_root, tmp_path_factory):
    """A finished CoOp run (2 epochs) on the engine dataset: (run folder, final test metrics returned by train)."""
    from vlprompt.engine.api import train

    run_dir = tmp_path_factory.mktemp("engine_runs") / "coop"
    result = train(_engine_run_options(tiny_model_dir, engine_data_root, run_dir), progress=False, log=lambda _: None)
    return run_dir, result


@pytest.fixture(scope="session")
def engine_other_arch_model_dir(tmp_path_factory):
    """A tiny CLIP folder whose image tower is wider (hidden_size 64 instead of 48) than ``random:tiny``'s."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from vlprompt.backbones.presets import PRESETS, clip_tokenizer

    cfg = PRESETS["tiny"]
    config = CLIPConfig(
        text_config=dict(cfg["text_config"], vocab_size=49408, max_position_embeddings=77),
        vision_config=dict(cfg["vision_config"], hidden_size=64, intermediate_size=128),
        projection_dim=cfg["projection_dim"],
    )
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("other_arch_clip")
    CLIPModel(config).eval().save_pretrained(out)
    clip_tokenizer().save_pretrained(out)
    size = cfg["vision_config"]["image_size"]
    CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(out)
    return out
