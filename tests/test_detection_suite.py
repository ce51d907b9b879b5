"""The ODinW-style toy detection suite (``toydet:<shift>``, ``toydet:suite``) and detection in ``vlprompt bench``:
each set is deterministic, cached with a manifest, read by the coco reader and holds the shift it is named for; the
world's existing datasets are unchanged; a detection bench records COCO mAP, reports it as such and resumes."""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import io
import json

import pytest

from vlprompt.cli import main
from vlprompt.data.coco import load_detection_dataset
from vlprompt.protocols.report import markdown_report
from vlprompt.protocols.runner import DETECTION_SHOTS, WHOLE_SPLIT, BenchConfig
from vlprompt.toyworld import detection_sets as ds
from vlprompt.toyworld.world import HOLDOUT

SMALL = (6, 3, 4)  # train, val, test images: enough to check a set's content, fast to build


def _cli(*args) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def _annotations(folder, split="train") -> dict:
    return json.loads((folder / split / "annotations.json").read_text())


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Every suite set, written twice (two roots) at SMALL sizes: {name: (folder, other folder)}."""
    roots = [tmp_path_factory.mktemp("suite_a"), tmp_path_factory.mktemp("suite_b")]
    return {name: tuple(ds.materialize_detection_set(name, root, sizes=SMALL) for root in roots)
            for name in ds.DETECTION_SUITE}  # fmt: skip


def test_the_suite_has_six_sets_of_few_categories_each():
    assert list(ds.DETECTION_SUITE) == ["looks", "novel", "small", "clutter", "fine", "count"]
    assert ds.suite_dataset_names() == [f"toydet:{n}" for n in ds.DETECTION_SUITE]
    for spec in ds.DETECTION_SUITE.values():
        assert 3 <= len(spec.categories) <= 6 and spec.shift and spec.analogue


@pytest.mark.parametrize("name", list(ds.DETECTION_SUITE))
def test_each_set_is_deterministic_and_read_by_the_coco_reader(built, name):
    first, second = built[name]
    for split in ds.SPLITS:
        assert (first / split / "annotations.json").read_bytes() == (second / split / "annotations.json").read_bytes()
        images = sorted((first / split / "images").iterdir())
        assert [p.read_bytes() for p in images] == [(second / split / "images" / p.name).read_bytes() for p in images]
    assert json.loads((first / "toyworld.json").read_text())["sizes"] == list(SMALL)
    assert ds.detection_set_fingerprint(name) == ds.detection_set_fingerprint(name)
    assert ds.detection_set_fingerprint(name) != ds.detection_set_fingerprint(name, seed=1)
    splits = load_detection_dataset(f"coco:{first}")
    assert splits.categories == list(ds.DETECTION_SUITE[name].categories)
    assert [len(splits.split(s)) for s in ds.SPLITS] == list(SMALL)
    for image in splits.train + splits.val + splits.test:
        assert image.width == image.height == ds.IMAGE_SIZE and image.boxes
        for x, y, w, h in image.boxes:
            assert 0 <= x and 0 <= y and w > 0 and h > 0 and x + w <= 64.01 and y + h <= 64.01
    for annotation in _annotations(first)["annotations"]:  # no held-out colour x shape pair in any set
        assert HOLDOUT.allows(annotation["attributes"]["colour"], annotation["attributes"]["shape"])


def test_a_set_is_reused_when_complete_and_rebuilt_when_its_definition_changes(built, tmp_path, monkeypatch):
    folder = ds.materialize_detection_set("fine", tmp_path, sizes=SMALL)
    stamp = (folder / "toyworld.json").stat().st_mtime_ns
    assert ds.materialize_detection_set("fine", tmp_path, sizes=SMALL) == folder
    assert (folder / "toyworld.json").stat().st_mtime_ns == stamp
    spec = ds.DETECTION_SUITE["fine"]
    changed = dataclasses.replace(spec, params={**spec.params, "radius": (0.1, 0.12)})
    monkeypatch.setitem(ds.DETECTION_SUITE, "fine", changed)
    before = ds.detection_set_fingerprint("fine")
    ds.materialize_detection_set("fine", tmp_path, sizes=SMALL)
    assert json.loads((folder / "toyworld.json").read_text())["definition_crc"] != json.loads(
        (built["fine"][0] / "toyworld.json").read_text())["definition_crc"]  # fmt: skip
    monkeypatch.setitem(ds.DETECTION_SUITE, "fine", spec)
    assert ds.detection_set_fingerprint("fine") != before


def test_each_set_holds_its_shift(built):
    looks = _annotations(built["looks"][0])
    assert {image["look"] for image in looks["images"]} <= set(ds.HELD_OUT_LOOKS)
    novel = _annotations(built["novel"][0])
    assert [c["name"] for c in novel["categories"]] == ["octagon", "heart", "arrow"]
    for i in range(SMALL[0]):  # only held-out shapes in the images, labelled or not
        scene, look = ds.detection_scene("novel", "train", i)
        assert {o.shape for o in scene.objects} <= {"octagon", "heart", "arrow"} and look == "clean"
    small = _annotations(built["small"][0])
    assert max(max(a["bbox"][2], a["bbox"][3]) for a in small["annotations"]) <= 9.0
    count = _annotations(built["count"][0])
    per_image = [sum(a["image_id"] == image["id"] for a in count["annotations"]) for image in count["images"]]
    assert min(per_image) >= 6 and max(per_image) <= 12
    fine = _annotations(built["fine"][0])
    names = {c["id"]: c["name"] for c in fine["categories"]}
    assert set(names.values()) == {"striped circle", "dotted circle", "striped square", "dotted square"}
    for a in fine["annotations"]:
        assert names[a["category_id"]] == f"{a['attributes']['fill']} {a['attributes']['shape']}"
    clutter = _annotations(built["clutter"][0], "train")
    visible = [a["attributes"]["visible"] for a in clutter["annotations"]]
    assert min(visible) >= 0.5 and min(visible) < 1.0  # labelled objects are partly covered, never mostly
    drawn = sum(len(ds.detection_scene("clutter", "train", i)[0].objects) for i in range(SMALL[0]))
    assert drawn > len(clutter["annotations"])  # unlabelled distractors


def test_occluded_boxes_are_the_visible_parts():
    from vlprompt.toyworld.render import boxes, visible_boxes
    from vlprompt.toyworld.world import sample_crowd

    scene = sample_crowd([0], ["square", "square"], radius=(0.2, 0.2), fill="solid", background="white")
    first, second = scene.objects
    # the second square covers the first one's right side
    scene = dataclasses.replace(scene, objects=(dataclasses.replace(first, x=0.4, y=0.4, angle=0.0),
                                                dataclasses.replace(second, x=0.55, y=0.4, angle=0.0)))
    full, seen = boxes(scene, 64), visible_boxes(scene, 64)
    assert seen[1]["bbox"] == full[1]["bbox"] and seen[1]["visible"] == 1.0  # drawn last: nothing covers it
    assert seen[0]["visible"] < 1.0
    x, y, w, h = seen[0]["bbox"]
    fx, fy, fw, fh = full[0]["bbox"]
    assert fx <= x and fy <= y and x + w <= fx + fw + 1e-6 and y + h <= fy + fh + 1e-6 and w * h < fw * fh


def test_the_worlds_existing_sets_are_unchanged():
    """Fingerprints of every toy set and digests of the world's scenes and detection annotations, as they were
    before the suite's world options existed (sample_crowd, visible_boxes are additions)."""
    from vlprompt.toyworld.fusion_sets import fusion_set_fingerprint
    from vlprompt.toyworld.render import boxes
    from vlprompt.toyworld.suite import SUITE, toy_fingerprint
    from vlprompt.toyworld.world import sample_scene

    assert {n: toy_fingerprint(n) for n in SUITE} == {
        "shapes": "4c649b86", "fine_shapes": "b0116183", "colours": "2aacb534", "combo": "9954e1bf",
        "texture": "e2a2e587", "count": "742c03ad", "relation": "9b0bfa3f", "position": "08292e6a",
        "size": "3d3649e5", "background": "eb578372", "shapes_v2": "603514c3", "shapes_sketch": "4884ee19",
        "shapes_noisy": "296aad12", "shapes_lowcontrast": "b418363f", "shapes_rendition": "5e60a6c4",
    }  # fmt: skip
    assert [fusion_set_fingerprint(n) for n in ("vqa", "nlvr2", "retrieval")] == ["76e76298", "dbeeded2", "53e2126d"]
    digest = hashlib.sha256()
    for i in range(30):
        scene = sample_scene([5, i], holdout=HOLDOUT)
        digest.update(repr(scene).encode())
        digest.update(json.dumps(boxes(scene, 64)).encode())
    assert digest.hexdigest()[:16] == "9d28364e1aef3a0a"


def test_toydet_shapes_annotations_are_unchanged(tmp_path):
    from vlprompt.toyworld.corpus import write_detection_set

    folder = write_detection_set(tmp_path / "d", 6, seed=3, size=64)
    assert hashlib.sha256((folder / "annotations.json").read_bytes()).hexdigest()[:16] == "29d85c279b94e1c9"


# ------------------------------------------------------------------------------------------------ the bench
def test_toydet_suite_names_the_six_sets_and_detection_defaults_to_odinw_shots(tmp_path):
    config = BenchConfig(methods=["det_zeroshot"], datasets=["toydet:suite"], model="random:grounding-dino-micro",
                         output=str(tmp_path / "b"))  # fmt: skip
    assert config.datasets == ds.suite_dataset_names()
    assert config.shots == list(DETECTION_SHOTS) == [1, 3, 5, 10, "all"]
    assert BenchConfig(methods=["coop"], datasets=["toy:shapes"], output=str(tmp_path / "c")).shots == [1, 2, 4, 8, 16]


@pytest.mark.parametrize("methods, datasets, protocols, message", [
    (["coop"], ["toydet:looks"], ["fewshot"], "coop is not a detection method, so it cannot run on toydet:looks: "
                                              "bench detection datasets with detection methods"),
    (["det_coop"], ["toy:shapes"], ["fewshot"], "det_coop is a detection method but toy:shapes is a classification "
                                                "dataset"),
    (["det_coop"], ["toydet:looks", "toy:shapes"], ["fewshot"], "toy:shapes is a classification dataset and "
                                                                "toydet:looks a detection dataset"),
    (["det_coop"], ["toydet:suite"], ["base2novel"], "detection datasets run the few-shot protocol only"),
    (["det_coop"], ["toydet:suite", "toydet:fine"], ["fewshot"], "datasets lists 'toydet:fine' more than once"),
])  # fmt: skip
def test_the_bench_refuses_mixing_tasks_with_the_fix(tmp_path, methods, datasets, protocols, message):
    with pytest.raises(ValueError, match=message):
        BenchConfig(methods=methods, datasets=datasets, protocols=protocols, model="random:grounding-dino-micro",
                    output=str(tmp_path / "b"))  # fmt: skip


@pytest.mark.parametrize("args, message", [
    (["bench", "--methods", "det_zeroshot", "--datasets", "toydet:nope"], "unknown toy detection set 'nope'"),
    (["bench", "--methods", "coop", "--datasets", "toydet:fine"], "coop is not a detection method"),
    (["train", "--method", "det_coop", "--dataset", "toydet:suite"], "toydet:suite names the 6 sets"),
])  # fmt: skip
def test_bad_detection_inputs_fail_in_one_line(tmp_path, args, message):
    code, _, err = _cli(*args, "--model", "random:grounding-dino-micro", "--output", tmp_path / "out")
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_shots_take_integers_and_all():
    from vlprompt.cli import parse_command_line

    args = parse_command_line(["bench", "--methods", "det_coop", "--datasets", "toydet:suite", "--shots", "1", "ALL"])
    assert args.shots == [1, "all"]
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit):
        parse_command_line(["bench", "--methods", "det_coop", "--datasets", "toydet:suite", "--shots", "most"])
    assert "'most' is neither an integer nor 'all'" in err.getvalue()


def test_a_detection_bench_records_map_reports_it_and_resumes(tmp_path, monkeypatch):
    monkeypatch.setenv("VLPROMPT_TOY_ROOT", str(tmp_path / "toy"))
    monkeypatch.setitem(ds.DETECTION_SUITE, "fine", dataclasses.replace(ds.DETECTION_SUITE["fine"], sizes=(10, 3, 4)))
    out = tmp_path / "bench"
    args = ["bench", "--methods", "det_zeroshot", "det_coop", "--datasets", "toydet:fine", "--shots", "1", "all",
            "--seeds", "1", "--model", "random:grounding-dino-micro", "--set", "default_train.epochs=1",
            "--set", "default_train.batch_size=4", "--set", "default_train.optimizer=adamw",
            "--set", "recipes.det_coop.method_options.n_ctx=2", "--output", out]  # fmt: skip
    code, text, err = _cli(*args)
    assert code == 0, err
    with (out / "results.csv").open() as fh:
        reader = csv.DictReader(fh)
        header, rows = reader.fieldnames, list(reader)
    assert "mAP" in header and "AP50" in header and "accuracy" not in header
    assert sorted((r["method"], r["shots"]) for r in rows) == [("det_coop", "0"), ("det_coop", "1"),
                                                               ("det_zeroshot", "0")]  # fmt: skip
    assert all(0.0 <= float(r["mAP"]) <= 100.0 and r["n"] == "4" for r in rows)
    runs = out / "runs" / "fewshot" / "toydet_fine"
    assert (runs / "det_coop" / "all_seed1" / "result.json").is_file()
    assert (runs / "det_coop" / "shots1_seed1" / "result.json").is_file()
    assert (runs / "det_zeroshot" / "all_seed1" / "result.json").is_file()
    report = (out / "results.md").read_text()
    assert "## Few-shot: test COCO mAP@[.5:.95] (%), one seed, averaged over datasets" in report
    assert "| method | 1-shot | all |" in report and "accuracy" not in report
    assert "mean_mAP" in (out / "summary.csv").read_text()
    assert (out / "fewshot_average.png").stat().st_size > 1000
    stamp = (out / "results.csv").read_text()
    code, text, err = _cli(*args)  # a rerun trains nothing
    assert code == 0, err
    assert "3 of 3 runs were already finished" in text
    assert (out / "results.csv").read_text() == stamp
    (out / "results.md").unlink()
    code, text, err = _cli("bench", "--output", out, "--report-only")
    assert code == 0, err
    assert "COCO mAP@[.5:.95]" in (out / "results.md").read_text()
    code, _, err = _cli("bench", "--methods", "coop", "--datasets", "toy:shapes", "--output", out)
    assert code == 2 and "holds a detection bench (results.csv); give this classification bench its own --output" in err


def test_detection_reports_put_all_after_the_shot_counts():
    rows = [dict(protocol="fewshot", train_dataset=d, eval_dataset=d, subset="all", method=m, shots=k, seed=1,
                 mAP=float(k + i), AP50=0.0, AP75=0.0, n=4, trainable_parameters=0 if m == "det_zeroshot" else 8,
                 train_time_s=1.0, precision="fp32")
            for i, d in enumerate(("toydet:looks", "toydet:fine")) for m, ks in
            (("det_zeroshot", (WHOLE_SPLIT,)), ("det_coop", (10, WHOLE_SPLIT, 1))) for k in ks]  # fmt: skip
    report = markdown_report(rows)
    assert "| method | 1-shot | 10-shot | all |" in report
    assert "| det_coop | 1.5 | 10.5 | 0.5 |" in report and "| det_zeroshot | 0.5 | 0.5 | 0.5 |" in report
    assert "### Per dataset with the whole training split (all)" in report
