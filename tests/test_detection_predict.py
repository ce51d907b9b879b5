"""``vlprompt predict`` on a detection run: boxes above a score threshold, printed and drawn into PNGs of the input
images' size; the Python API's structured detections; one-line errors; classification runs as before."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cli_helpers import refused, run_cli as cli
from data_fixtures import write_corrupt_image
from vlprompt.backbones.grounding_dino_presets import save_random_grounding_dino
from vlprompt.data.coco import write_toy_detection
from vlprompt.data.drawing import pixel_box
from vlprompt.engine import checkpoint as ckpt
from vlprompt.engine.api import predict, predict_detections


@pytest.fixture(scope="module")
def det_run(tmp_path_factory):
    """A finished 1-epoch sdpt_native run on the micro preset (random weights) and a toy COCO set."""
    work = tmp_path_factory.mktemp("det_predict")
    detector = save_random_grounding_dino(work / "gdino", "grounding-dino-micro")
    coco = write_toy_detection(work / "coco", 6, 2, 3, size=64, seed=0)
    run = work / "run"
    code, out, err = cli("train", "--model", detector, "--method", "sdpt_native", "--dataset", f"coco:{coco}",
                         "--shots", 1, "--epochs", 1, "--batch-size", 4, "--optimizer", "adamw", "--lr", 0.01,
                         "--output", run, "--quiet", "--set", "train.warmup_epochs=0")  # fmt: skip
    assert code == 0, err
    return run, coco


@pytest.fixture
def image(det_run, tmp_path) -> Path:
    """A toy scene stretched to 96 x 72 px (not square, not the detector's input size), in its own folder."""
    scene = sorted((det_run[1] / "test" / "images").glob("*.png"))[0]
    path = tmp_path / "inputs" / "scene.png"
    path.parent.mkdir()
    Image.open(scene).convert("RGB").resize((96, 72), Image.Resampling.BILINEAR).save(path)
    return path


def edge_pixels(image: Image.Image, box) -> np.ndarray:
    """The pixels of a box's left edge (its outline's column), in ``image``."""
    x0, y0, _, y1 = pixel_box(box, *image.size)
    return np.asarray(image.convert("RGB"))[y0 : y1 + 1, x0]


def test_predict_draws_the_boxes_it_prints(det_run, image, tmp_path):
    run, _ = det_run
    before = image.read_bytes()
    code, out, err = cli("predict", run, image, "--threshold", 0, "--max-boxes", 3, "--output", tmp_path / "drawn")
    assert code == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 4  # a line per box, then where the drawing went
    boxes = []
    for line in lines[:3]:
        where, rest = line.split(": ", 1)
        assert where == str(image.resolve())
        label_score, box = rest.split(" box ")
        label, score = label_score.rsplit(" ", 1)
        assert label in json.loads((run / "prompt_config.json").read_text())["classnames"]
        assert 0.0 <= float(score) <= 1.0
        boxes.append(json.loads(box))
    scores = [float(line.split(" box ")[0].rsplit(" ", 1)[1]) for line in lines[:3]]
    assert scores == sorted(scores, reverse=True)
    png = tmp_path / "drawn" / "scene.png"
    assert lines[3] == f"{image.resolve()}: 3 boxes drawn in {png}"
    assert image.read_bytes() == before  # the input is never touched
    with Image.open(png) as drawn, Image.open(image) as original:
        assert drawn.format == "PNG" and drawn.size == original.size == (96, 72)
        for box in boxes:
            assert 0 <= box[0] <= box[2] <= 96 and 0 <= box[1] <= box[3] <= 72
        # the best box is drawn last: its outline changed the pixels along its edge
        assert (edge_pixels(drawn, boxes[0]) != edge_pixels(original, boxes[0])).any()
        assert (np.asarray(drawn.convert("RGB")) != np.asarray(original.convert("RGB"))).any()


def test_drawn_images_go_under_the_run_folder_by_default(det_run, image, tmp_path):
    run = shutil.copytree(det_run[0], tmp_path / "run")
    code, out, err = cli("predict", run, image, image, "--max-boxes", 2, "--threshold", 0)
    assert code == 0, err
    first, second = run / "predictions" / "scene.png", run / "predictions" / "scene_2.png"  # repeated names
    assert out.strip().splitlines()[-1].endswith(f"in {second}") and first.is_file() and second.is_file()
    assert sorted(p.name for p in image.parent.iterdir()) == ["scene.png"]  # nothing beside the inputs
    err = refused("predict", run, image)
    assert f"{first} exists" in err and "--overwrite" in err
    code, _, err = cli("predict", run, image, "--overwrite", "--threshold", 1)  # nothing scores above 1
    assert code == 0, err
    with Image.open(first) as drawn, Image.open(image) as original:  # no box: the image as it was
        assert (np.asarray(drawn) == np.asarray(original.convert("RGB"))).all()


def test_the_api_returns_structured_detections(det_run, image):
    run, _ = det_run
    everything = predict(run, [image], threshold=0.0)[0]  # no output folder: nothing is written
    assert set(everything) == {"image", "width", "height", "detections", "best"}
    assert (everything["width"], everything["height"]) == (96, 72)
    config = json.loads((run / "prompt_config.json").read_text())
    method = ckpt.load_prompt(run, ckpt.recorded_backbone(run))
    detections = everything["detections"]
    assert len(detections) == method.backbone.model.config.num_queries  # threshold 0: one box per query
    assert detections[0] == everything["best"]
    scores = [d["score"] for d in detections]
    assert scores == sorted(scores, reverse=True)
    for d in detections:
        assert set(d) == {"label", "category_index", "score", "box"}
        assert d["label"] == config["classnames"][d["category_index"]]
    # the same detections from a prompt model in hand; a threshold keeps the boxes scoring at least that much
    cut = scores[2]
    kept = predict_detections(method, [image], threshold=cut)[0]
    assert kept["detections"] == [d for d in detections if d["score"] >= cut]
    assert predict_detections(method, [image], threshold=0.0, max_boxes=2)[0]["detections"] == detections[:2]


def test_boxes_are_in_the_pixels_a_viewer_shows(det_run, image, tmp_path):
    """A photo stored sideways with an EXIF orientation is predicted and drawn upright, at its upright size."""
    run, _ = det_run
    rotated = tmp_path / "phone.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: shown turned 90 degrees clockwise
    Image.open(image).convert("RGB").save(rotated, exif=exif)
    result = predict(run, [rotated], threshold=0.0, max_boxes=1, output=tmp_path / "drawn")[0]
    assert (result["width"], result["height"]) == (72, 96)
    with Image.open(result["output"]) as drawn:
        assert drawn.size == (72, 96)


def test_predict_faults_are_one_line_with_the_fix(det_run, image, tmp_path, engine_coop_run):
    run, coco = det_run
    assert f"image {tmp_path / 'missing.png'} does not exist" in refused("predict", run, tmp_path / "missing.png")
    assert "is a folder; pass image files" in refused("predict", run, coco / "test" / "images")
    err = refused("predict", run, image, write_corrupt_image(tmp_path / "broken.png"), "--output", tmp_path / "out")
    assert "cannot read image" in err and "broken.png" in err
    assert not (tmp_path / "out").exists()  # refused before anything was written
    assert "--threshold) must be a number from 0 to 1" in refused("predict", run, image, "--threshold", 2)
    assert "k (--k) applies to classification runs" in refused("predict", run, image, "--k", 3)
    assert "is an input image and would be overwritten" in refused("predict", run, image, "--output", image.parent)
    # a run whose training did not finish has no prompt yet
    unfinished = shutil.copytree(run, tmp_path / "unfinished")
    (unfinished / ckpt.CONFIG_FILE).unlink()
    (unfinished / ckpt.RESUME_DIR).mkdir(exist_ok=True)
    assert "training did not finish: resume it with --resume" in refused("predict", unfinished, image)
    assert "does not exist; pass a folder written by `vlprompt train`" in refused("predict", tmp_path / "no", image)
    # a classification run refuses the detection options, naming them
    coop_run = engine_coop_run[0]
    err = refused("predict", coop_run, image, "--threshold", 0.5, "--output", tmp_path / "x")
    assert "threshold, output (--threshold, --output) apply to detection runs" in err and "classification prompt" in err


def test_a_classification_run_predicts_top_labels_as_before(engine_coop_run, engine_data_root):
    from vlprompt.data import load_dataset

    run, _ = engine_coop_run
    images = [s.path for s in load_dataset("eurosat", engine_data_root).test[:2]]
    code, out, err = cli("predict", run, *images)  # --k left out: the top 5 (here all 3 classes)
    assert code == 0, err
    lines = out.strip().splitlines()
    assert [line.rsplit(": ", 1)[0] for line in lines] == [str(Path(p).resolve()) for p in images]
    assert all(len(line.rsplit(": ", 1)[1].split(", ")) == 3 for line in lines)
    assert predict(run, images, k=2)[0]["top"] == predict(run, images)[0]["top"][:2]
    assert not (run / "predictions").exists()


def test_the_clis_default_threshold_is_the_librarys():
    from vlprompt.cli import DEFAULT_THRESHOLD
    from vlprompt.tasks.detection import DEFAULT_SCORE_THRESHOLD

    assert DEFAULT_THRESHOLD == DEFAULT_SCORE_THRESHOLD
