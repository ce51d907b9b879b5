"""``vlprompt pretrain-toy`` end to end on a tiny config: a loadable CLIP folder, reproducible bit for bit, and
clear errors for a device this machine does not have."""
from __future__ import annotations

import json

import pytest
import torch

from vlprompt.backbones import load_backbone
from vlprompt.cli import main
from vlprompt.pretraining.clip_pretrain import PretrainConfig, pretrain

TINY = dict(n_pairs=64, image_size=24, patch_size=12, vision_width=32, vision_layers=1, vision_heads=2,
            text_width=32, text_layers=1, text_heads=2, embed_dim=16, batch_size=16, steps=3, warmup_steps=1,
            threads=1, vocab_captions=300)


def quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    work = tmp_path_factory.mktemp("pretrain")
    return pretrain(PretrainConfig(**TINY), work / "model", work / "cache", log=quiet), work


def test_pretraining_writes_a_clip_folder_that_loads_like_any_clip(pretrained):
    out, _ = pretrained
    backbone = load_backbone(str(out))
    assert backbone.model.config.vision_config.image_size == TINY["image_size"]
    features = backbone.encode_texts(["a red circle", "two blue squares"])
    assert features.shape == (2, TINY["embed_dim"]) and torch.isfinite(features).all()
    assert json.loads((out / "pretrain_config.json").read_text())["steps"] == TINY["steps"]
    assert not (out / "tokenizer_src").exists()


def test_pretraining_reproduces_its_weights_bit_for_bit(pretrained, tmp_path):
    out, work = pretrained
    again = pretrain(PretrainConfig(**TINY), tmp_path / "model", work / "cache", log=quiet)
    assert (again / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()


@pytest.mark.parametrize("device, message", [("cuda", "no CUDA GPU"), ("gpu0", "not a torch device")])
def test_a_device_this_machine_lacks_is_refused_before_any_work(device, message):
    # tests/conftest.py hides CUDA, so "cuda" is absent here even on a GPU machine
    with pytest.raises(ValueError, match=message):
        PretrainConfig(device=device)


def test_cli_names_the_bad_option(tmp_path, capsys):
    code = main(["pretrain-toy", "--output", str(tmp_path / "m"), "--set", "device=cuda"])
    assert code == 2
    assert "device" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("option, message", [
    ("patch_size=0", "patch_size must be >= 1"), ("steps=0", "steps must be >= 1"),
    ("steps=1e1", "steps must be an integer"), ("lr=abc", "lr must be a positive number"),
    ("vision_heads=3", "multiple of vision_heads 3"), ("batch_size=0", "batch_size must be >= 1"),
    ("n_pairs=10", "larger than the corpus"), ("group_size=8", "group_size 8 is larger than 5"),
    ("log_every=0", "log_every must be >= 1"), ("threads=0", "threads must be >= 1"),
])
def test_cli_refuses_bad_values_before_any_work(tmp_path, capsys, option, message):
    code = main(["pretrain-toy", "--output", str(tmp_path / "m"), "--cache-dir", str(tmp_path / "cache"),
                 "--set", option])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "cache").exists() and not (tmp_path / "m").exists()


def test_cli_refuses_a_file_as_output(tmp_path, capsys):
    (tmp_path / "m").write_text("not a folder")
    assert main(["pretrain-toy", "--output", str(tmp_path / "m")]) == 2
    assert "is a file" in capsys.readouterr().err
