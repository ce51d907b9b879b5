"""The VQA task (tasks/vqa.py) through the engine and the CLI, on a micro random ViLT and a tiny VQA v2 folder.

The folder holds solid-colour images whose question names the colour ("is the red one red?"), so the joint
representation carries the answer and a head on it can learn it: a check of the plumbing (data, batches, soft
targets, loss, VQA accuracy, run folder, eval), not of ViLT. Every method on fusion encoders trains on it.
"""
from __future__ import annotations

import json
import random

import pytest
from PIL import Image

import vlprompt
from vlprompt.backbones.vilt_presets import save_random_vilt
from vlprompt.cli import main
from vlprompt.engine.api import DataOptions, RunOptions, TrainConfig

COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 170, 60)}


def write_vqa_folder(root, per_split=(("train2014", 48), ("val2014", 24)), seed=0):
    rng = random.Random(seed)
    for split, n in per_split:
        (root / split).mkdir(parents=True, exist_ok=True)
        questions, annotations = [], []
        for i in range(n):
            name = rng.choice(sorted(COLOURS))
            Image.new("RGB", (64, 64), COLOURS[name]).save(root / split / f"COCO_{split}_{i:012d}.jpg")
            questions.append({"image_id": i, "question": f"is the {name} one {name}?", "question_id": i})
            annotations.append({"question_id": i, "image_id": i, "answers": [{"answer": name}] * 10})
        (root / f"v2_OpenEnded_mscoco_{split}_questions.json").write_text(json.dumps({"questions": questions}))
        (root / f"v2_mscoco_{split}_annotations.json").write_text(json.dumps({"annotations": annotations}))
    return root


@pytest.fixture(scope="module")
def vqa_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("vqa")
    return save_random_vilt(root / "vilt"), write_vqa_folder(root / "data")


def _options(vqa_setup, output, method, epochs, lr, **method_options):
    model, data = vqa_setup
    train = TrainConfig(epochs=epochs, batch_size=48, lr=lr, optimizer="adamw", warmup_epochs=0,
                        validate_every=max(epochs // 2, 1))  # fmt: skip
    return RunOptions(model=str(model), method=method, method_options=method_options,
                      data=DataOptions(dataset=f"vqa:{data}"), train=train, output=str(output))  # fmt: skip


def test_a_head_learns_the_answers_and_the_run_is_scored_with_vqa_accuracy(vqa_setup, tmp_path):
    final = vlprompt.train(_options(vqa_setup, tmp_path / "head", "fusion_head", epochs=120, lr=0.04),
                           progress=False, log=lambda _: None)  # fmt: skip
    assert final["vqa_accuracy"] == final["accuracy"] == 100.0 and final["n"] == 24
    run = json.loads((tmp_path / "head" / "run_config.json").read_text())
    assert run["task"] == "vqa" and run["num_answers"] == 3
    loaded = vlprompt.PromptMethod.from_pretrained(tmp_path / "head")
    assert sorted(loaded.classnames) == ["blue", "green", "red"]


@pytest.mark.parametrize("method, options", [("apt_native", {"n_prompts": 4}), ("deep_prompt_native", {"n_prompts": 4}),
                                             ("lora_native", {}), ("full_native", {})])
def test_the_prompt_methods_train_through_the_engine(vqa_setup, tmp_path, method, options):
    vlprompt.train(_options(vqa_setup, tmp_path / method, method, epochs=6, lr=0.01, **options), progress=False,
                   log=lambda _: None)  # fmt: skip
    history = [json.loads(line) for line in (tmp_path / method / "metrics.jsonl").read_text().splitlines()]
    losses = [h["train_loss"] for h in history if "train_loss" in h]
    assert len(losses) == 6 and losses[-1] < losses[0]


def test_the_cli_trains_evaluates_and_names_task_mismatches(vqa_setup, tmp_path, capsys):
    model, data = vqa_setup
    common = ["--model", str(model), "--quiet", "--epochs", "1"]
    assert main(["train", "--method", "apt_native", "--dataset", f"vqa:{data}", "--output", str(tmp_path / "run"),
                 "--set", "method.n_prompts=2", *common]) == 0  # fmt: skip
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "run"), "--dataset", f"vqa:{data}"]) == 0
    assert '"split": "test"' in capsys.readouterr().out
    assert main(["train", "--method", "coop", "--dataset", f"vqa:{data}", "--output", str(tmp_path / "x"),
                 *common]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a vqa dataset but 'coop' is a classification method" in err
    assert main(["train", "--method", "apt_native", "--dataset", "toy:shapes", "--output", str(tmp_path / "y"),
                 *common]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "is a classification dataset but 'apt_native' is a vqa method" in err and "vqa:<a folder" in err
    assert main(["train", "--method", "apt_native", "--dataset", f"vqa:{tmp_path / 'missing'}",
                 "--output", str(tmp_path / "z"), *common]) == 2  # fmt: skip
    assert "is not a folder; pass vqa:<a folder in the VQA v2 layout>" in capsys.readouterr().err


def test_a_resume_onto_answers_changed_in_place_is_refused(vqa_setup, tmp_path):
    """Swapping two answers keeps their count: the stored digest of the answer list tells the runs apart."""
    import shutil

    model, data = vqa_setup
    copy = shutil.copytree(data, tmp_path / "data")
    options = _options((model, copy), tmp_path / "run", "fusion_head", epochs=1, lr=0.01)
    vlprompt.train(options, progress=False, log=lambda _: None)
    path = copy / "v2_mscoco_train2014_annotations.json"
    path.write_text(path.read_text().replace('"red"', '"TMP"').replace('"blue"', '"red"').replace('"TMP"', '"blue"'))
    more = _options((model, copy), tmp_path / "run", "fusion_head", epochs=2, lr=0.01)
    with pytest.raises(vlprompt.TrainingError, match="answers_digest"):
        vlprompt.train(more, resume=True, progress=False, log=lambda _: None)


def test_a_vqa_folder_without_scored_questions_is_refused_before_training(vqa_setup, tmp_path):
    model, data = vqa_setup
    copy = write_vqa_folder(tmp_path / "data", per_split=(("train2014", 12),))
    options = _options((model, copy), tmp_path / "run", "fusion_head", epochs=1, lr=0.01)
    from vlprompt.data import DatasetError

    with pytest.raises(DatasetError, match="has no val2014 questions to score"):
        vlprompt.train(options, progress=False, log=lambda _: None)
    assert not (tmp_path / "run").exists()


def test_base_to_novel_subsampling_is_refused_on_vqa(vqa_setup, tmp_path):
    from vlprompt.data import DatasetError
    from vlprompt.engine.api import load_task_data

    _, data = vqa_setup
    with pytest.raises(DatasetError, match="--subsample .* VQA has none: leave --subsample out"):
        load_task_data("vqa", DataOptions(dataset=f"vqa:{data}", subsample="base"))
