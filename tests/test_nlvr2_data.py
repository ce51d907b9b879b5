"""NLVR2 as released (vlprompt.data.nlvr2): JSON lines of statements about image pairs, the pair's files found in
the split folder (or train's numbered directories), and every bad input named with its line."""
from __future__ import annotations

import json
import re

import pytest
from PIL import Image

from vlprompt.data import DatasetError
from vlprompt.data.nlvr2 import load_nlvr2_split


def _write(root, split="dev", examples=None, directory=None, images=True):
    examples = examples if examples is not None else [
        {"identifier": f"{split}-850-0-0", "sentence": "There are two dogs.", "label": "True"},
        {"identifier": f"{split}-850-0-1", "sentence": "There is one dog.", "label": "False"},
        {"identifier": f"{split}-12-3-0", "sentence": "A bird flies.", "label": "True"},
    ]
    lines = []
    for example in examples:
        if directory is not None and isinstance(example, dict):
            example = {**example, "directory": directory}
        lines.append(example if isinstance(example, str) else json.dumps(example))
    (root / f"{split}.json").write_text("\n".join(lines) + "\n")
    if images:
        folder = root / split / str(directory) if directory is not None else root / split
        folder.mkdir(parents=True, exist_ok=True)
        for example in examples:
            if isinstance(example, dict) and "identifier" in example:
                pair = example["identifier"].rsplit("-", 1)[0]
                for suffix in ("-img0.png", "-img1.png"):
                    Image.new("RGB", (4, 4)).save(folder / f"{pair}{suffix}")
    return root


def test_statements_with_their_two_images_and_labels(tmp_path):
    examples = load_nlvr2_split(_write(tmp_path), "dev")
    assert [e.label for e in examples] == [True, False, True]
    first = examples[0]
    assert first.sentence == "There are two dogs." and [p.name for p in first.images] == ["dev-850-0-img0.png",
                                                                                          "dev-850-0-img1.png"]
    assert examples[1].images == first.images  # two statements about the same pair


def test_train_images_are_found_in_their_numbered_directory(tmp_path):
    examples = load_nlvr2_split(_write(tmp_path, split="train", directory=42), "train")
    assert all(p.parent.name == "42" and p.is_file() for e in examples for p in e.images)


@pytest.mark.parametrize("fault, message", [
    ("no_file", "dev.json does not exist"),
    ("bad_line", "line 2: not valid JSON"),
    ("no_label", "line 1: an example needs identifier, sentence and label"),
    ("bad_label", "line 1: label 'yes' is not \"True\" or \"False\""),
    ("empty", "holds no examples"),
    ("no_images", "6 image(s) of dev are missing"),
])
def test_every_bad_input_is_named(tmp_path, fault, message):
    if fault == "no_file":
        pass
    elif fault == "bad_line":
        _write(tmp_path, examples=[{"identifier": "dev-1-0-0", "sentence": "s", "label": "True"}, "{oops"])
    elif fault == "no_label":
        _write(tmp_path, examples=[{"identifier": "dev-1-0-0", "sentence": "s"}])
    elif fault == "bad_label":
        _write(tmp_path, examples=[{"identifier": "dev-1-0-0", "sentence": "s", "label": "yes"}])
    elif fault == "empty":
        (tmp_path / "dev.json").write_text("\n")
    else:
        _write(tmp_path, images=False)
    with pytest.raises(DatasetError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_nlvr2_split(tmp_path, "dev")


_GOOD = {"identifier": "dev-1-0-0", "sentence": "There are two dogs.", "label": "True"}


@pytest.mark.parametrize("lines, message", [
    ([dict(_GOOD, label=["True"])], "line 1: label ['True'] is not \"True\" or \"False\""),  # was a traceback
    ([dict(_GOOD, label=True)], "line 1: label true is a JSON boolean; NLVR2 writes the string \"True\""),
    ([dict(_GOOD, sentence=None)], "line 1: sentence None is not a statement"),  # was trained as "None"
    ([dict(_GOOD, identifier=5)], "line 1: identifier 5 is not text"),
    ([_GOOD, _GOOD], "line 2: identifier dev-1-0-0 occurs twice"),  # was scored twice
    ([[_GOOD, _GOOD]], "line 1: a JSON array; NLVR2 files hold one JSON object per line"),
])
def test_damaged_fields_are_named_not_converted(tmp_path, lines, message):
    (tmp_path / "dev.json").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    with pytest.raises(DatasetError, match=re.escape(message)):
        load_nlvr2_split(tmp_path, "dev")


def test_a_file_that_is_not_utf8_is_named(tmp_path):
    line = json.dumps(dict(_GOOD, sentence="caf\u00e9"), ensure_ascii=False)
    (tmp_path / "dev.json").write_bytes(line.encode("latin-1") + b"\n")
    with pytest.raises(DatasetError, match="dev.json is not UTF-8 text .*re-save it as UTF-8"):
        load_nlvr2_split(tmp_path, "dev")
