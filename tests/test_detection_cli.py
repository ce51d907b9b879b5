"""``vlprompt train / eval / params / methods`` with detection methods on a toy COCO-format set."""
from __future__ import annotations

import json
import re

import pytest
from safetensors.torch import load_file

from vlprompt.backbones.grounding_dino_presets import save_random_grounding_dino
from vlprompt.cli import main
from vlprompt.data.coco import write_toy_detection

METHODS = ["sdpt_native", "det_coop", "det_lang_prompt", "det_fusion_prompt", "det_heads", "det_full", "det_lora"]


def cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def detector_dir(tmp_path_factory):
    return save_random_grounding_dino(tmp_path_factory.mktemp("gdino"), "grounding-dino-micro")


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory):
    return write_toy_detection(tmp_path_factory.mktemp("coco"), 8, 4, 6, size=64, seed=0)


def train_args(detector_dir, coco_root, method, output, *extra):
    return ["train", "--model", detector_dir, "--method", method, "--dataset", f"coco:{coco_root}", "--shots", 2,
            "--epochs", 2, "--batch-size", 4, "--optimizer", "adamw", "--lr", 0.01, "--output", output, "--quiet",
            "--set", "train.warmup_epochs=0", *extra]


@pytest.mark.parametrize("method", METHODS)
def test_train_then_eval_prints_coco_map(capsys, detector_dir, coco_root, tmp_path, method):
    run = tmp_path / method
    code, out, err = cli(capsys, *train_args(detector_dir, coco_root, method, run))
    assert code == 0, err
    trained = last_json(out)
    assert trained["split"] == "test" and trained["n"] == 6
    assert 0.0 <= trained["mAP"] <= 100.0 and 0.0 <= trained["AP50"] <= 100.0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records[:-1]] == [1, 2] and all("val_mAP" in r for r in records[:-1])
    config = json.loads((run / "prompt_config.json").read_text())
    assert config["task"] == "detection" and config["method"] == method
    assert config["backbone"]["family"] == "grounding-dino"
    saved = load_file(str(run / "prompt.safetensors"))
    assert sum(t.numel() for t in saved.values()) == config["trainable_parameters"] > 0

    code, out, err = cli(capsys, "eval", run, "--dataset", f"coco:{coco_root}")
    assert code == 0, err
    evaluated = last_json(out)
    assert set(evaluated) >= {"mAP", "AP50", "AP75", "n"}
    assert evaluated["mAP"] == pytest.approx(trained["mAP"]) and evaluated["AP50"] == pytest.approx(trained["AP50"])


def test_resume_ends_as_an_uninterrupted_run(capsys, detector_dir, coco_root, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    assert cli(capsys, *train_args(detector_dir, coco_root, "sdpt_native", full))[0] == 0
    args = train_args(detector_dir, coco_root, "sdpt_native", part)
    args[args.index("--epochs") + 1] = 1
    assert cli(capsys, *args)[0] == 0
    code, _, err = cli(capsys, *train_args(detector_dir, coco_root, "sdpt_native", part), "--resume")
    assert code == 0, err
    a, b = load_file(str(full / "prompt.safetensors")), load_file(str(part / "prompt.safetensors"))
    assert all((a[k] == b[k]).all() for k in a)


def test_category_subset_and_zero_shot(capsys, detector_dir, coco_root, tmp_path):
    run = tmp_path / "zs"
    code, out, err = cli(capsys, *train_args(detector_dir, coco_root, "det_zeroshot", run),
                         "--set", "data.categories=[circle, square, star]")
    assert code == 0, err
    assert json.loads((run / "prompt_config.json").read_text())["classnames"] == ["circle", "square", "star"]
    assert "mAP" in last_json(out)


def test_clear_errors(capsys, detector_dir, coco_root, tmp_path):
    run = tmp_path / "run"
    cases = [
        (train_args(detector_dir, coco_root, "coop", run), "is a classification method"),
        (train_args(detector_dir, coco_root, "sdpt_native", run, "--set", "data.categories=[zebra]"),
         "unknown category names ['zebra']"),
        (train_args(detector_dir, tmp_path / "nowhere", "sdpt_native", run), "does not exist"),
    ]
    for argv, message in cases:
        code, out, err = cli(capsys, *argv)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (argv, err)
    assert cli(capsys, *train_args(detector_dir, coco_root, "det_zeroshot", run))[0] == 0
    code, _, err = cli(capsys, "eval", run, "--dataset", "eurosat")
    assert code == 2 and "evaluate it on a detection dataset" in err


def test_params_on_the_public_tiny_architecture(capsys):
    code, out, err = cli(capsys, "params", "--model", "random:grounding-dino-tiny",
                         "--methods", "sdpt_native", "sdpt_native_released")
    assert code == 0, err
    assert "172,250,626 parameters" in out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()[2:]}
    # 6 fusion layers x K x E (E = 1024): default K = 16, released K = 700
    assert rows["sdpt_native"] == ["98,304", "0.0571%"]
    assert rows["sdpt_native_released"] == ["4,300,800", "2.4968%"]


def test_methods_matrix_has_the_detector_families(capsys):
    code, out, err = cli(capsys, "methods", "--model", "random:grounding-dino-micro")
    assert code == 0, err
    header = out.splitlines()[1].split()
    assert header[0] == "method" and {"clip", "grounding-dino", "mm-grounding-dino"} <= set(header)
    matrix = out.split("trainable parameters on", 1)[0]
    cells = {line.split()[0]: dict(zip(header[1:], line.split()[1:])) for line in matrix.splitlines()[2:] if line.strip()}
    families = ("clip", "grounding-dino", "mm-grounding-dino")
    assert [cells["sdpt_native"][f] for f in families] == ["no", "yes", "yes"]
    assert [cells["coop"][f] for f in families] == ["yes", "no", "no"]
    counts = out.split("trainable parameters on", 1)[1]
    assert re.search(r"^\s+sdpt_native\s+1,024\b", counts, re.M)  # 2 layers x 16 x 32
    assert re.search(r"^\s+coop\s+None\s+unsupported", counts, re.M)


def test_a_corrupt_image_is_named_with_the_fix(capsys, detector_dir, coco_root, tmp_path):
    import shutil

    broken = shutil.copytree(coco_root, tmp_path / "coco")
    images = [p for p in broken.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg")]
    assert images
    for image in images:
        image.write_bytes(image.read_bytes()[:40])  # truncated: PIL cannot decode it
    code, out, err = cli(capsys, *train_args(detector_dir, broken, "det_coop", tmp_path / "run"))
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "cannot read image" in err and "Traceback" not in err


def test_a_corrupt_test_image_met_after_training_keeps_the_training_for_a_resume(capsys, detector_dir, coco_root,
                                                                                  tmp_path):
    import shutil

    broken = shutil.copytree(coco_root, tmp_path / "coco")
    test_image = next(p for p in (broken / "test").rglob("*.png"))
    intact = test_image.read_bytes()
    test_image.write_bytes(intact[:40])  # the JSON gives its size, so only the final evaluation reads it
    args = train_args(detector_dir, broken, "det_coop", tmp_path / "run")
    code, _, err = cli(capsys, *args)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "cannot read image" in err and "The trained epochs are kept" in err and "rerun with --resume to" in err
    code, _, err = cli(capsys, *args, "--overwrite")
    assert code == 2 and "rerun with --resume (without --overwrite) to evaluate them" in err  # both are refused
    test_image.write_bytes(intact)
    code, out, err = cli(capsys, *args, "--resume")
    assert code == 0, err
    assert (tmp_path / "run" / "prompt.safetensors").is_file()


def test_a_bench_on_a_coco_set_without_its_training_images_stops_before_any_run(capsys, detector_dir, coco_root,
                                                                                 tmp_path):
    """Split image files are checked where a split is used; a bench uses every split, so it checks them up front."""
    import shutil

    broken = shutil.copytree(coco_root, tmp_path / "coco")
    shutil.rmtree(broken / "train" / "images")
    code, _, err = cli(capsys, "bench", "--model", detector_dir, "--methods", "det_zeroshot", "--datasets",
                       f"coco:{broken}", "--shots", "1", "--seeds", "1", "--output", tmp_path / "bench")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "image(s) listed in" in err and "are missing" in err
    assert not (tmp_path / "bench").exists()


def test_a_bench_run_that_fails_is_named_before_the_error_line(capsys, detector_dir, coco_root, tmp_path):
    import shutil

    broken = shutil.copytree(coco_root, tmp_path / "coco")
    test_image = next(p for p in (broken / "test").rglob("*.png"))
    test_image.write_bytes(test_image.read_bytes()[:40])  # its size is in the JSON: only the evaluation reads it
    code, out, err = cli(capsys, "bench", "--model", detector_dir, "--methods", "det_zeroshot", "--datasets",
                         f"coco:{broken}", "--shots", "1", "--seeds", "1", "--output", tmp_path / "bench")
    assert code == 2 and "cannot read image" in err
    assert re.search(r"^\[1/1\] fewshot/\S+/det_zeroshot/\S+: failed$", out, re.M), out
