"""Faults a new user meets with train / eval / predict / params and recipes: each gets one line naming the problem
and a fix, and nothing a run recorded is lost or rewritten to state what did not happen."""
from __future__ import annotations

import json
import os
import shutil

import pytest

from cli_helpers import refused as _refused, run_cli as _cli
from data_fixtures import make_imagefolder, write_image

TRAIN_FAST = ["--method", "coop", "--set", "method_options.n_ctx=2", "--batch-size", "4", "--optimizer", "adamw",
              "--lr", "0.01", "--quiet"]  # fmt: skip


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, tmp_path_factory):
    """A finished 2-epoch CoOp run on a relative imagefolder path, trained from its own working folder."""
    work = tmp_path_factory.mktemp("work")
    make_imagefolder(work / "shapes", per_class=(6, 2, 3), form="split")
    cwd = os.getcwd()
    os.chdir(work)
    try:
        code, out, err = _cli("train", "--model", tiny_model_dir, "--dataset", "imagefolder:shapes", "--epochs", "2",
                              "--output", "runs/base", *TRAIN_FAST)
    finally:
        os.chdir(cwd)
    assert code == 0, err
    return work / "runs" / "base", json.loads(out.splitlines()[-1])


# ------------------------------------------------------------------------------------------- config files
def test_config_faults_are_named_before_anything_runs(tmp_path):
    assert "is a folder; pass a YAML file" in _refused("train", "--config", tmp_path)
    listed = tmp_path / "list.yaml"
    listed.write_text("model: [a, b]\n")
    assert "model: in config file" in _refused("train", "--config", listed)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("data: toy:colours\n")
    # with a flag given too, the scalar section used to be replaced silently by the flag's mapping
    assert "data: in config file" in _refused("train", "--config", scalar, "--shots", "2")
    assert "must be a mapping" in _refused("train", "--set", "train=5")


def test_resume_and_overwrite_together_are_refused(tmp_path):
    assert "pass one of them" in _refused("train", "--resume", "--overwrite", "--output", tmp_path / "r")


def test_unknown_train_option_names_the_closest_one(tmp_path):
    err = _refused("train", "--set", "train.lrr=0.1", "--output", tmp_path / "r")
    assert "unknown train option(s) ['lrr'] (did you mean lr?)" in err and "the options are: epochs" in err


# ------------------------------------------------------------------------------------------- recipes
@pytest.mark.parametrize("content, suffix, message", [
    ("methods: {copo: {train: {lr: 0.1}}}\n", ".yaml", "names unknown method 'copo'"),
    ("train: {lr: abc}\n", ".yaml", "recipe bad ("),
    ("train: {lrr: 0.1}\n", ".yaml", "recipe bad (read from"),
    ("train: {lr: 0.1}\n", ".txt", "(a file not named .yaml or .yml is read as JSON)"),
    ("recipe: fieldd\n", ".yaml", "the recipe file"),
])
def test_a_bad_recipe_file_is_named_in_the_error(tmp_path, content, suffix, message):
    recipe = tmp_path / f"bad{suffix}"
    recipe.write_text(content)
    assert message in _refused("train", "--recipe", recipe, "--output", tmp_path / "r")
    assert not (tmp_path / "r").exists()


def test_a_recipe_folder_is_refused(tmp_path):
    assert "is a folder; pass a recipe file" in _refused("train", "--recipe", tmp_path, "--output", tmp_path / "r")


# ------------------------------------------------------------------------------------------- image folders
def test_image_folder_layout_faults(tiny_model_dir, tmp_path):
    one = make_imagefolder(tmp_path / "one", classes=("star",), per_class=5)
    assert "has one class ('star')" in _refused("train", "--model", tiny_model_dir, "--dataset", f"imagefolder:{one}",
                                                "--output", tmp_path / "r1", *TRAIN_FAST)  # fmt: skip
    misplaced = make_imagefolder(tmp_path / "misplaced", per_class=(4, 1, 2), form="split")
    shutil.rmtree(misplaced / "train" / "red_apple")
    (misplaced / "train" / "red_apple").write_text("not a folder")
    err = _refused("train", "--model", tiny_model_dir, "--dataset", f"imagefolder:{misplaced}", "--output",
                   tmp_path / "r2", *TRAIN_FAST)  # fmt: skip
    assert "train/red_apple is a file, not a class folder" in err


def test_base_to_novel_of_too_few_classes_names_the_cause(tiny_model_dir, tmp_path):
    from vlprompt.data import DatasetError, load_dataset, subsample_classes

    splits = load_dataset(f"imagefolder:{make_imagefolder(tmp_path / 'two', classes=('a', 'b'), per_class=5)}")
    base = subsample_classes(splits, "base")
    with pytest.raises(DatasetError, match="has 1 class\\(es\\): --subsample novel leaves none"):
        subsample_classes(base, "novel")


# ------------------------------------------------------------------------------------------- resume
def _train(tiny_model_dir, data, output, *extra):
    return _cli("train", "--model", tiny_model_dir, "--dataset", f"imagefolder:{data}", "--output", output,
                *TRAIN_FAST, *extra)  # fmt: skip


def test_resume_never_rewrites_the_record_of_epochs_it_did_not_train(tiny_model_dir, tmp_path):
    data = make_imagefolder(tmp_path / "d", per_class=(6, 2, 3), form="split")
    run = tmp_path / "run"
    assert _train(tiny_model_dir, data, run, "--epochs", "2")[0] == 0
    record = (run / "run_config.json").read_text()
    # a finished run resumed with other settings would train nothing: refused, the record kept as it was
    err = _refused("train", "--model", tiny_model_dir, "--dataset", f"imagefolder:{data}", "--output", run,
                   *TRAIN_FAST, "--epochs", "2", "--lr", "0.5", "--resume")  # fmt: skip
    assert "finished its 2 epochs" in err and "lr 0.01 -> 0.5" in err and "--epochs above 2" in err
    assert (run / "run_config.json").read_text() == record
    # fewer epochs than already trained: refused
    assert "already trained 2 epochs, more than --epochs 1" in _refused(
        "train", "--model", tiny_model_dir, "--dataset", f"imagefolder:{data}", "--output", run, *TRAIN_FAST,
        "--epochs", "1", "--resume")  # fmt: skip
    assert (run / "run_config.json").read_text() == record
    # continuing with more epochs and another learning rate: done, and recorded as a change after epoch 2
    code, _, err = _train(tiny_model_dir, data, run, "--epochs", "3", "--lr", "0.005", "--resume")
    assert code == 0, err
    stored = json.loads((run / "run_config.json").read_text())
    assert stored["train"]["lr"] == 0.005
    assert stored["resumes"] == [{"after_epoch": 2, "changed": {"epochs": [2, 3], "lr": [0.01, 0.005]}}]


def test_a_corrupt_resume_state_is_named_with_the_fix(tiny_model_dir, tmp_path):
    data = make_imagefolder(tmp_path / "d", per_class=(6, 2, 3), form="split")
    run = tmp_path / "run"
    assert _train(tiny_model_dir, data, run, "--epochs", "2")[0] == 0
    (run / "checkpoint-last" / "state.json").write_text("{broken")
    err = _refused("train", "--model", tiny_model_dir, "--dataset", f"imagefolder:{data}", "--output", run,
                   *TRAIN_FAST, "--epochs", "3", "--resume")  # fmt: skip
    assert "state.json is corrupt" in err and "--overwrite starts it over" in err


# ------------------------------------------------------------------------------------------- eval, predict
def test_eval_from_another_folder_reads_the_images_the_run_was_trained_on(finished_run, tmp_path, monkeypatch):
    run, result = finished_run
    recorded = json.loads((run / "run_config.json").read_text())
    assert recorded["data"]["dataset"].startswith("imagefolder:/")
    assert recorded["recipe"] == "field"  # the recipe the CLI resolved is the one the run records
    decoy = make_imagefolder(tmp_path / "shapes", per_class=(6, 2, 3), form="split")  # same relative name
    for image in decoy.rglob("*.png"):
        write_image(image, color=None, seed=hash(image.name) % 1000)
    monkeypatch.chdir(tmp_path)
    code, out, err = _cli("eval", run)
    assert code == 0, err
    assert json.loads(out)["accuracy"] == result["accuracy"]


def test_eval_refuses_options_it_cannot_use(finished_run, tmp_path):
    run, _ = finished_run
    assert "eval does not use --set method, train.lr" in _refused("eval", run, "--set", "method=vpt_deep",
                                                                   "--set", "train.lr=0.1")  # fmt: skip
    assert "eval does not use --set data.shots" in _refused("eval", run, "--set", "data.shots=2")
    assert "does not exist" in _refused("eval", tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    assert "is not a run folder" in _refused("eval", tmp_path / "empty")
    code, _, _ = _cli("eval", run, "--shots", "2")
    assert code == 2  # argparse: eval has no --shots


def test_a_training_config_can_be_reused_for_eval(finished_run, tmp_path):
    run, result = finished_run
    config = tmp_path / "train.yaml"
    config.write_text("method: coop\nrecipe: toy\ntrain: {lr: 0.01, precision: fp32}\ndata: {shots: 4, seed: 2}\n")
    code, out, err = _cli("eval", run, "--config", config)
    assert code == 0, err
    assert json.loads(out)["accuracy"] == result["accuracy"]


def test_predict_faults(finished_run, tmp_path):
    run, _ = finished_run
    image = write_image(tmp_path / "a.png")
    code, _, err = _cli("predict", run, image, "--k", "0")
    assert code == 2 and "--k: must be >= 1" in err
    assert "is a folder; pass image files" in _refused("predict", run, tmp_path)


def test_a_prompt_onto_another_architecture_names_the_model_as_the_user_does(tmp_path):
    code, _, err = _cli("train", "--method", "zeroshot", "--dataset", "toy:colours", "--output", tmp_path / "zs")
    assert code == 0, err
    err = _refused("eval", tmp_path / "zs", "--model", "random:tiny")
    assert "--model 'embedded'" in err and "toyclip" not in err


def test_params_options_need_the_methods_they_belong_to():
    assert "--set method.* needs --methods" in _refused("params", "--model", "random:tiny", "--set",
                                                        "method.n_ctx=4")  # fmt: skip
    assert "params reads method options only" in _refused("params", "--model", "random:tiny", "--methods", "coop",
                                                           "--set", "train.lr=0.1")  # fmt: skip
    assert _cli("params", "--model", "random:tiny", "--methods", "coop", "--set", "method.n_ctx=4")[0] == 0
    assert _cli("params", "--num-classes", "0")[0] == 2


def test_cli_warnings_read_as_one_line(tiny_model_dir, tmp_path, capfd):
    import subprocess
    import sys

    data = make_imagefolder(tmp_path / "d", per_class=(3, 1, 2), form="split")
    done = subprocess.run([sys.executable, "-m", "vlprompt.cli", "train", "--model", str(tiny_model_dir),
                           "--dataset", f"imagefolder:{data}", "--shots", "8", "--epochs", "1", "--output",
                           str(tmp_path / "r"), *TRAIN_FAST], capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if "fewer than 8 training images" in line]
    assert lines and lines[0].startswith("vlprompt train: warning: ")


def test_messages_found_by_the_fault_tour(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\nb: 3\n")
    assert "is not valid YAML (line 2, column 2:" in _refused("train", "--config", bad)  # one line, with where
    assert "not valid YAML: line 2, column 2:" in _refused("train", "--recipe", bad)
    assert "unknown data option(s) ['shot'] (did you mean shots?)" in _refused("train", "--set", "data.shot=2")
    assert "unknown pretraining option(s) ['stepz'] (did you mean steps?)" in _refused(
        "pretrain-toy", "--output", tmp_path / "m", "--set", "stepz=1")
    code, _, err = _cli("eval", tmp_path, "--shots", "2")
    assert code == 2 and err.splitlines()[-1] == "vlprompt eval: error: unrecognized arguments: --shots 2"
    half = tmp_path / "half"
    write_image(half / "test" / "a" / "0.png")
    assert "has test/ but no train/" in _refused("train", "--dataset", f"imagefolder:{half}", "--output",
                                                 tmp_path / "r")  # fmt: skip
