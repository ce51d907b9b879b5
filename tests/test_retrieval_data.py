"""Image-text retrieval data (vlprompt.data.retrieval): Karpathy's split files for Flickr30K and COCO, and recall at
k both ways computed against a by-hand count."""
from __future__ import annotations

import json
import re

import pytest
import torch
from PIL import Image

from vlprompt.data import DatasetError
from vlprompt.data.retrieval import load_retrieval_split, recall_at_k


def _write(root, name="dataset_flickr30k.json", coco=False, images=True):
    items = []
    for i, split in enumerate(["train", "train", "restval", "val", "test", "test"]):
        item = {"filename": f"{i}.jpg", "split": split, "sentences": [{"raw": f"caption {i} {j}"} for j in range(5)]}
        if coco:
            item["filepath"] = "val2014"
        items.append(item)
    root.mkdir(parents=True, exist_ok=True)
    (root / name).write_text(json.dumps({"images": items}))
    if images:
        folder = root / ("val2014" if coco else "images")
        folder.mkdir(parents=True, exist_ok=True)
        for item in items:
            Image.new("RGB", (4, 4)).save(folder / item["filename"])
    return root


def test_flickr_and_coco_splits_with_their_captions(tmp_path):
    flickr = _write(tmp_path / "f")
    train = load_retrieval_split(flickr, "train")
    assert [i.path.name for i in train] == ["0.jpg", "1.jpg", "2.jpg"]  # train takes restval too
    test = load_retrieval_split(flickr, "test")
    assert len(test) == 2 and test[0].captions[0] == "caption 4 0" and len(test[0].captions) == 5
    coco = _write(tmp_path / "c", name="dataset_coco.json", coco=True)
    assert load_retrieval_split(coco, "val")[0].path.parent.name == "val2014"


@pytest.mark.parametrize("fault, message", [
    ("no_file", "holds neither dataset_flickr30k.json nor dataset_coco.json"),
    ("not_karpathy", "is not a Karpathy split file"),
    ("bad_entry", "image entry 0 needs filename, split and sentences"),
    ("no_split", "has no dev images; its splits are"),
    ("no_images", "2 of 2 test images are missing"),
])
def test_every_bad_input_is_named(tmp_path, fault, message):
    split = "test"
    if fault == "not_karpathy":
        (tmp_path / "dataset_flickr30k.json").write_text(json.dumps({"annotations": []}))
    elif fault == "bad_entry":
        (tmp_path / "dataset_flickr30k.json").write_text(json.dumps({"images": [{"split": "test"}]}))
    elif fault == "no_split":
        _write(tmp_path)
        split = "dev"
    elif fault == "no_images":
        _write(tmp_path, images=False)
    with pytest.raises(DatasetError, match=message):
        load_retrieval_split(tmp_path, split)


def test_recall_at_k_both_ways_matches_a_count_by_hand():
    # 3 images, 2 captions each (caption c belongs to image c // 2)
    caption_image = torch.tensor([0, 0, 1, 1, 2, 2])
    scores = torch.tensor([[9.0, 1, 8, 2, 3, 4],    # image 0: its caption 0 ranks 1st
                           [7.0, 6, 1, 5, 4, 3],    # image 1: its captions (2, 3) rank 6th and 3rd
                           [1.0, 2, 3, 4, 5, 0]])   # image 2: caption 4 ranks 1st
    result = recall_at_k(scores, caption_image, ks=(1, 2, 3))
    assert result["i2t_r1"] == pytest.approx(100 * 2 / 3) and result["i2t_r3"] == 100.0
    # text -> image: for each caption, the rank of its own image in its column
    columns = scores.t()
    ranks = [int((columns[c] > columns[c, caption_image[c]]).sum()) for c in range(6)]
    for k in (1, 2, 3):
        assert result[f"t2i_r{k}"] == pytest.approx(100 * sum(r < k for r in ranks) / 6)
    with pytest.raises(ValueError, match="expected \\(6,\\)"):
        recall_at_k(scores, caption_image[:5])


def _entry(split="test", filename="0.jpg", raw="a red circle"):
    return {"filename": filename, "split": split, "sentences": [{"raw": raw}]}


@pytest.mark.parametrize("entries, message", [
    # a split typo dropped the image from every split without a word
    ([_entry(split="tset")], "image entry 0 (0.jpg) has the split 'tset'; Karpathy's splits are train, restval, val"),
    ([_entry(split=None)], "image entry 0 (0.jpg) has the split None"),
    ([_entry(raw=None)], "image entry 0 (0.jpg) has the caption None; each sentence needs its text as 'raw'"),
    ([_entry(raw=12)], "has the caption 12"),
    ([_entry(), _entry()], "image entry 1 lists 0.jpg again; each image has one entry with all its captions"),
    (["hello"], "image entry 0 is 'hello', not an object"),
])
def test_damaged_entries_are_named_not_dropped(tmp_path, entries, message):
    (tmp_path / "dataset_flickr30k.json").write_text(json.dumps({"images": entries}))
    with pytest.raises(DatasetError, match=re.escape(message)):
        load_retrieval_split(tmp_path, "test")
