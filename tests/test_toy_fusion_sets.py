"""The toy VQA, NLVR2-style and retrieval sets: written in the real layouts, read by the real readers, balanced,
true to their scenes, reproducible and rebuilt when their settings change."""
from __future__ import annotations

import json

import pytest

from vlprompt.data.nlvr2 import load_nlvr2_split
from vlprompt.data.retrieval import load_retrieval_split
from vlprompt.data.vqa import build_vocabulary, load_vqa_split
from vlprompt.toyworld.fusion_sets import (
    CAPTIONS_PER_IMAGE,
    STATEMENT_KINDS,
    VQA_QUESTIONS_PER_IMAGE,
    FusionSetSizes,
    materialize_fusion_set,
    nlvr2_example,
    statement_truth,
)

SMALL = FusionSetSizes(vqa=(12, 5), nlvr2=(16, 6, 6), retrieval=(8, 3, 4))


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    folder = tmp_path_factory.mktemp("toy_fusion")
    for name in ("vqa", "nlvr2", "retrieval"):
        materialize_fusion_set(name, folder, sizes=SMALL)
    return folder


def test_vqa_set_reads_with_the_vqa_v2_reader(root):
    train = load_vqa_split(root / "toy_vqa", "train2014").examples
    val = load_vqa_split(root / "toy_vqa", "val2014").examples
    assert len(train) == 12 * VQA_QUESTIONS_PER_IMAGE and len(val) == 5 * VQA_QUESTIONS_PER_IMAGE
    assert all(len(e.answers) == 10 and len(set(e.answers)) == 1 for e in train)
    assert len({e.question_id for e in train + val}) == len(train) + len(val)  # ids unique across splits
    assert build_vocabulary(train, 1)


def test_nlvr2_set_is_balanced_and_reads_with_the_nlvr2_reader(root):
    for split, n in zip(("train", "dev", "test1"), SMALL.nlvr2):
        examples = load_nlvr2_split(root / "toy_nlvr2", split)
        assert len(examples) == n
        assert sum(e.label for e in examples) == n // 2
        assert all(e.images[0].is_file() and e.images[1].is_file() for e in examples)


def test_every_statement_is_labelled_by_its_scenes():
    seen_kinds = set()
    for i in range(120):
        left, right, sentence, label = nlvr2_example(0, "train", i)
        assert label == (i % 2 == 0)
        seen_kinds.add(sentence.split()[0])
        # the statement's truth recomputed from its words agrees with the label
        words = sentence.split()
        if words[:3] == ["both", "images", "contain"]:
            assert statement_truth("both", left, right, words[-1], "", 0) == label
        elif words[:2] == ["exactly", "one"]:
            assert statement_truth("exactly_one", left, right, words[-1], "", 0) == label
        elif words[:3] == ["the", "left", "image"] and words[3] == "contains":
            assert statement_truth("left", left, right, words[-1], words[-2], 0) == label
        elif words[:3] == ["the", "left", "image"]:
            assert statement_truth("more", left, right, "", "", 0) == label
    assert len(STATEMENT_KINDS) == 6 and {"both", "exactly", "the", "there"} <= seen_kinds


def test_retrieval_set_reads_with_the_karpathy_reader(root):
    test = load_retrieval_split(root / "toy_retrieval", "test")
    assert len(test) == 4 and all(len(i.captions) == CAPTIONS_PER_IMAGE for i in test)
    assert len(load_retrieval_split(root / "toy_retrieval", "train")) == 8


def test_a_set_is_reproducible_reused_and_rebuilt_when_its_settings_change(root, tmp_path):
    again = materialize_fusion_set("nlvr2", tmp_path, sizes=SMALL)
    assert (again / "train.json").read_text() == (root / "toy_nlvr2" / "train.json").read_text()
    stamp = (again / "toyworld.json").stat().st_mtime_ns
    assert materialize_fusion_set("nlvr2", tmp_path, sizes=SMALL) == again
    assert (again / "toyworld.json").stat().st_mtime_ns == stamp  # reused, not rewritten
    bigger = FusionSetSizes(vqa=SMALL.vqa, nlvr2=(18, 6, 6), retrieval=SMALL.retrieval)
    materialize_fusion_set("nlvr2", tmp_path, sizes=bigger)
    assert len(load_nlvr2_split(again, "train")) == 18
    assert json.loads((again / "toyworld.json").read_text())["sizes"] == [18, 6, 6]


def test_an_unknown_set_is_named():
    with pytest.raises(ValueError, match="unknown toy fusion set 'gqa'; choose one of"):
        materialize_fusion_set("gqa", "/tmp/never")
