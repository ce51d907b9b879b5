"""VQA v2 data as released (questions, annotations, images), its answer vocabulary, soft targets and the VQA accuracy.

Layout (``../shared/specs/datasets.md``, "Fusion-encoder tasks")::

    <root>/v2_OpenEnded_mscoco_<split>_questions.json   {"questions": [{"image_id", "question", "question_id"}]}
    <root>/v2_mscoco_<split>_annotations.json           {"annotations": [{"question_id", "image_id",
                                                          "answers": [10 x {"answer", ...}], ...}]}
    <root>/<split>/COCO_<split>_<image_id:012d>.jpg     (or <root>/<split>2014/...)

- **Answers** are normalised as the official evaluation does before they are compared (lower case, punctuation,
  number words to digits, articles, common contractions): :func:`normalize_answer`.
- **Vocabulary**: the normalised answers given at least ``min_count`` times in the training annotations (ViLT and
  METER keep those seen 9 times: 3,129 on VQA v2), most frequent first.
- **Soft targets**: an answer given by ``k`` of the 10 annotators scores ``min(1, k / 3)``.
- **VQA accuracy** of a predicted answer: the mean over the 10 leave-one-annotator-out subsets of
  ``min(1, matches in the subset / 3)``, as the official evaluation computes it.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from vlprompt.data.errors import DatasetError

# The official evaluation's answer normalisation: number words, articles, punctuation and contractions.
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}  # fmt: skip
ARTICLES = frozenset({"a", "an", "the"})
PUNCTUATION = ";/[]\"{}()=+\\_-><@`,?!"  # the official list (the apostrophe belongs to contractions)
CONTRACTIONS = {"arent": "aren't", "cant": "can't", "couldnt": "couldn't", "didnt": "didn't", "doesnt": "doesn't",
                "dont": "don't", "hadnt": "hadn't", "hasnt": "hasn't", "havent": "haven't", "hes": "he's",
                "isnt": "isn't", "its": "it's", "shouldnt": "shouldn't", "thats": "that's", "theres": "there's",
                "theyre": "they're", "wasnt": "wasn't", "werent": "weren't", "whats": "what's", "wont": "won't",
                "wouldnt": "wouldn't", "youre": "you're"}  # fmt: skip
# A period is dropped unless a digit follows ("3.5"); a comma between digits ("1,000") is dropped. The first
# pattern is the official one as written (its "(?!<=\d)" is a lookahead, not a lookbehind): kept for equal scores.
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_DIGIT_COMMA = re.compile(r"(\d)(,)(\d)")
ANNOTATORS = 10  # VQA v2 collects ten answers per question
SCORE_DENOMINATOR = 3  # an answer three annotators agree on counts as fully correct


def normalize_answer(answer: str) -> str:
    """An answer as the official VQA evaluation compares it."""
    text = answer.replace("\n", " ").replace("\t", " ").strip().lower()
    for mark in PUNCTUATION:
        if (mark + " " in text or " " + mark in text) or _DIGIT_COMMA.search(text):
            text = text.replace(mark, "")
        else:
            text = text.replace(mark, " ")
    text = _PERIOD.sub("", text)
    words = []
    for word in text.split():
        word = NUMBER_WORDS.get(word, word)
        if word in ARTICLES:
            continue
        words.append(CONTRACTIONS.get(word, word))
    return " ".join(words)


def soft_score(count: int) -> float:
    """The target score of an answer ``count`` annotators gave: ``min(1, count / 3)``."""
    return min(1.0, count / SCORE_DENOMINATOR)


def vqa_accuracy(predicted: str, answers: Sequence[str]) -> float:
    """VQA accuracy of one prediction against the annotators' answers (normalised here): the mean over the
    leave-one-out subsets of ``min(1, matches / 3)``."""
    guess = normalize_answer(predicted)
    given = [normalize_answer(a) for a in answers]
    if not given:
        raise ValueError("a VQA question needs its annotators' answers to be scored")
    scores = []
    for left_out in range(len(given)):
        matches = sum(1 for i, a in enumerate(given) if i != left_out and a == guess)
        scores.append(min(1.0, matches / SCORE_DENOMINATOR))
    return sum(scores) / len(scores)


@dataclass
class VQAExample:
    question_id: int
    image: Path
    question: str
    answers: list[str]  # the annotators' answers, normalised

    def targets(self, vocabulary: dict[str, int]) -> dict[int, float]:
        """Soft targets ``{answer index: score}`` over the vocabulary (answers outside it are dropped)."""
        counts = Counter(self.answers)
        return {vocabulary[a]: soft_score(k) for a, k in counts.items() if a in vocabulary}


@dataclass
class VQASplit:
    name: str
    examples: list[VQAExample] = field(default_factory=list)


def build_vocabulary(examples: Sequence[VQAExample], min_count: int = 9) -> dict[str, int]:
    """Answers given at least ``min_count`` times over ``examples`` (every annotator counts), most frequent first
    (ties in alphabetical order), as ``{answer: index}``."""
    counts = Counter(a for example in examples for a in example.answers)
    kept = sorted((a for a, k in counts.items() if k >= min_count), key=lambda a: (-counts[a], a))
    if not kept:
        raise DatasetError(f"no answer is given {min_count} times or more in the {len(examples)} training "
                           "questions' annotations, so there is no answer to learn: check that the annotations file "
                           "holds the annotators' answers, or add training questions")
    return {answer: i for i, answer in enumerate(kept)}


def _read_json(path: Path, key: str, hint: str) -> list[dict]:
    if not path.is_file():
        raise DatasetError(f"{path} does not exist: a VQA v2 folder holds {hint}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DatasetError(f"{path} is not valid JSON ({err}); re-download it") from None
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
        raise DatasetError(f"{path} has no {key!r} list: is it the VQA v2 {key} file?")
    return data[key]


def _whole_number(value: object, field_name: str, file_name: str) -> int:
    """An id as VQA writes it: a JSON integer (a float, boolean, string or null is a damaged file, not an id)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise DatasetError(f"{file_name}: {field_name} {value!r} is not an integer id; VQA v2 writes ids as integers")
    return value


def image_path(root: Path, split: str, image_id: int) -> Path:
    """``<root>/<split>/COCO_<split>_<id:012d>.jpg`` or under ``<split>2014/`` (how COCO's zips unpack)."""
    name = f"COCO_{split}_{int(image_id):012d}.jpg"
    for folder in (root / split, root / f"{split}2014", root / "images" / split):
        if (folder / name).is_file():
            return folder / name
    return root / split / name


def load_vqa_split(root: str | Path, split: str) -> VQASplit:
    """The questions of ``split`` with their annotators' answers (normalised) and image paths."""
    root = Path(root)
    questions = _read_json(root / f"v2_OpenEnded_mscoco_{split}_questions.json", "questions",
                           f"v2_OpenEnded_mscoco_{split}_questions.json")  # fmt: skip
    annotations = _read_json(root / f"v2_mscoco_{split}_annotations.json", "annotations",
                             f"v2_mscoco_{split}_annotations.json")  # fmt: skip
    annotations_file = f"v2_mscoco_{split}_annotations.json"
    questions_file = f"v2_OpenEnded_mscoco_{split}_questions.json"
    answers_of: dict[int, list[str]] = {}
    for annotation in annotations:
        try:
            qid, given = annotation["question_id"], annotation["answers"]
            answers = [a["answer"] for a in given]
        except (KeyError, TypeError):
            raise DatasetError(f"an annotation in {annotations_file} lacks question_id or answers[].answer: "
                               f"{str(annotation)[:120]}") from None
        qid = _whole_number(qid, "question_id", annotations_file)
        if qid in answers_of:
            raise DatasetError(f"question {qid} has two annotations in {annotations_file}; each question has one")
        if not answers or not all(isinstance(a, str) for a in answers):
            raise DatasetError(f"{annotations_file}: question {qid} has the answers {str(answers)[:80]}; each "
                               "question needs its annotators' answers as text (VQA v2 has ten)")
        answers_of[qid] = [normalize_answer(a) for a in answers]
    examples = []
    seen: set[int] = set()
    for q in questions:
        try:
            qid, image_id, text = q["question_id"], q["image_id"], q["question"]
        except (KeyError, TypeError):
            raise DatasetError(f"a question in {questions_file} lacks question_id, image_id or question: "
                               f"{str(q)[:120]}") from None
        qid = _whole_number(qid, "question_id", questions_file)
        image_id = _whole_number(image_id, "image_id", questions_file)
        if not isinstance(text, str) or not text.strip():
            raise DatasetError(f"{questions_file}: question {qid} has the text {text!r}; a question must be text")
        if qid in seen:
            raise DatasetError(f"question {qid} is listed twice in {questions_file}; question ids must be unique")
        seen.add(qid)
        if qid not in answers_of:
            raise DatasetError(f"question {qid} has no annotation in {annotations_file}: the two "
                               "files are of different splits or versions")
        examples.append(VQAExample(qid, image_path(root, split, image_id), text, answers_of[qid]))
    missing = [e.image for e in examples if not e.image.is_file()]
    if missing:
        raise DatasetError(f"{len(missing)} of {len(examples)} images of {split} are missing, e.g. {missing[0]}; "
                           f"put COCO's {split} images under {root / split}")
    return VQASplit(split, examples)
