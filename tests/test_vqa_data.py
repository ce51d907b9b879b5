"""VQA v2 data (vlprompt.data.vqa): answer normalisation, soft targets, the leave-one-out VQA accuracy, the answer
vocabulary, and reading the released JSON layout with every bad input named."""
from __future__ import annotations

import json

import pytest
from PIL import Image

from vlprompt.data import DatasetError
from vlprompt.data.vqa import build_vocabulary, load_vqa_split, normalize_answer, soft_score, vqa_accuracy


@pytest.mark.parametrize("raw, normal", [
    ("Two", "2"), ("the dog.", "dog"), ("Yes!", "yes"), ("3.5", "3.5"), ("1,000", "1000"), ("dont know", "don't know"),
    ("red, white", "red white"), ("  A  Cat\t", "cat"), ("none", "0"), ("ten", "10"),
])
def test_answers_are_normalised_as_the_official_evaluation_does(raw, normal):
    assert normalize_answer(raw) == normal


def test_soft_scores_are_a_third_per_annotator_up_to_one():
    assert [soft_score(k) for k in range(5)] == [0.0, 1 / 3, 2 / 3, 1.0, 1.0]


def test_vqa_accuracy_averages_the_ten_leave_one_out_subsets():
    assert vqa_accuracy("yes", ["yes"] * 10) == 1.0
    assert vqa_accuracy("no", ["yes"] * 10) == 0.0
    # 3 of 10 agree: leaving one of them out leaves 2 matches (2/3), leaving another out leaves 3 (1)
    assert vqa_accuracy("Yes.", ["yes"] * 3 + ["no"] * 7) == pytest.approx((3 * 2 / 3 + 7 * 1.0) / 10)
    assert vqa_accuracy("two", ["2"] * 2 + ["3"] * 8) == pytest.approx((2 * 1 / 3 + 8 * 2 / 3) / 10)
    with pytest.raises(ValueError, match="needs its annotators' answers"):
        vqa_accuracy("yes", [])


def _write_vqa(root, split="train", questions=None, annotations=None, images=True):
    questions = questions if questions is not None else [
        {"image_id": 1, "question": "What color is the circle?", "question_id": 10},
        {"image_id": 2, "question": "How many stars?", "question_id": 20},
    ]
    annotations = annotations if annotations is not None else [
        {"question_id": 10, "image_id": 1, "answers": [{"answer": "Red"}] * 7 + [{"answer": "orange"}] * 3},
        {"question_id": 20, "image_id": 2, "answers": [{"answer": "two"}] * 9 + [{"answer": "3"}]},
    ]
    (root / f"v2_OpenEnded_mscoco_{split}_questions.json").write_text(json.dumps({"questions": questions}))
    (root / f"v2_mscoco_{split}_annotations.json").write_text(json.dumps({"annotations": annotations}))
    if images:
        (root / f"{split}2014").mkdir(parents=True, exist_ok=True)
        for image_id in {q["image_id"] for q in questions}:
            Image.new("RGB", (8, 8)).save(root / f"{split}2014" / f"COCO_{split}_{image_id:012d}.jpg")
    return root


def test_the_released_layout_reads_into_examples_with_soft_targets(tmp_path):
    split = load_vqa_split(_write_vqa(tmp_path), "train")
    assert [e.question_id for e in split.examples] == [10, 20]
    assert split.examples[0].image.name == "COCO_train_000000000001.jpg" and split.examples[0].image.is_file()
    assert split.examples[1].answers == ["2"] * 9 + ["3"]
    vocabulary = build_vocabulary(split.examples, min_count=3)
    assert vocabulary == {"2": 0, "red": 1, "orange": 2}  # most frequent first
    assert split.examples[0].targets(vocabulary) == {1: 1.0, 2: 1.0}
    assert split.examples[1].targets(vocabulary) == {0: 1.0}  # "3" (once) is outside the vocabulary
    with pytest.raises(DatasetError, match="no answer is given 11 times or more"):
        build_vocabulary(split.examples, min_count=11)


@pytest.mark.parametrize("fault, message", [
    ("no_questions", "v2_OpenEnded_mscoco_train_questions.json does not exist"),
    ("bad_json", "is not valid JSON"),
    ("wrong_file", "has no 'annotations' list"),
    ("unanswered", "question 30 has no annotation"),
    ("no_answers", "lacks question_id or answers"),
    ("no_images", "2 of 2 images of train are missing"),
])
def test_every_bad_input_is_named(tmp_path, fault, message):
    if fault == "no_questions":
        _write_vqa(tmp_path)
        (tmp_path / "v2_OpenEnded_mscoco_train_questions.json").unlink()
    elif fault == "bad_json":
        _write_vqa(tmp_path)
        (tmp_path / "v2_mscoco_train_annotations.json").write_text("{not json")
    elif fault == "wrong_file":
        _write_vqa(tmp_path)
        (tmp_path / "v2_mscoco_train_annotations.json").write_text(json.dumps({"questions": []}))
    elif fault == "unanswered":
        _write_vqa(tmp_path, questions=[{"image_id": 1, "question": "?", "question_id": 30}])
    elif fault == "no_answers":
        _write_vqa(tmp_path, annotations=[{"question_id": 10}])
    else:
        _write_vqa(tmp_path, images=False)
    with pytest.raises(DatasetError, match=message):
        load_vqa_split(tmp_path, "train")


_GOOD_QUESTION = {"image_id": 1, "question": "What color is the circle?", "question_id": 10}
_GOOD_ANNOTATION = {"question_id": 10, "image_id": 1, "answers": [{"answer": "red"}] * 10}


@pytest.mark.parametrize("questions, annotations, message", [
    # ids as VQA writes them: integers (a float was truncated to another image, a boolean read as 1)
    ([dict(_GOOD_QUESTION, image_id=2.7)], None, "image_id 2.7 is not an integer id"),
    ([dict(_GOOD_QUESTION, image_id=None)], None, "image_id None is not an integer id"),
    ([dict(_GOOD_QUESTION, question_id="10")], None, "question_id '10' is not an integer id"),
    (None, [dict(_GOOD_ANNOTATION, question_id=True)], "question_id True is not an integer id"),
    # questions and answers as text (a number or null trained as the text "42" or "None")
    ([dict(_GOOD_QUESTION, question=None)], None, "question 10 has the text None; a question must be text"),
    ([dict(_GOOD_QUESTION, question=42)], None, "question 10 has the text 42"),
    (None, [dict(_GOOD_ANNOTATION, answers=[{"answer": 3}] * 10)], r"question 10 has the answers \[3, 3"),
    (None, [dict(_GOOD_ANNOTATION, answers=[])], r"question 10 has the answers \[\]"),
    # duplicates (the last annotation won; a repeated question was scored twice)
    (None, [_GOOD_ANNOTATION, _GOOD_ANNOTATION], "question 10 has two annotations"),
    ([_GOOD_QUESTION, _GOOD_QUESTION], [_GOOD_ANNOTATION], "question 10 is listed twice"),
])
def test_damaged_fields_are_named_not_converted(tmp_path, questions, annotations, message):
    _write_vqa(tmp_path, questions=questions or [_GOOD_QUESTION], annotations=annotations or [_GOOD_ANNOTATION],
               images=False)
    with pytest.raises(DatasetError, match=message):
        load_vqa_split(tmp_path, "train")
