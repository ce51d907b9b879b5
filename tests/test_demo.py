"""The README's main job runs on the embedded default (shipped toy CLIP + generated toy suite)."""
from vlprompt.backbones import load_backbone
from vlprompt.demo import DEMO_DATASETS, DEMO_METHODS, run_demo


def test_embedded_model_loads_through_from_pretrained():
    backbone = load_backbone("embedded")
    assert backbone.family == "clip"
    assert backbone.image_size == 48
    assert backbone.num_parameters() > 1_000_000


def test_quick_demo_runs_and_reports_every_method(tmp_path):
    lines: list[str] = []
    rows = run_demo(tmp_path, quick=True, log=lines.append)
    methods = {r["method"] for r in rows}
    datasets = {r["eval_dataset"] for r in rows}
    assert methods == set(DEMO_METHODS[:3])
    assert datasets == set(DEMO_DATASETS[:2])
    assert all(0.0 <= r["accuracy"] <= 100.0 and r["n"] > 0 for r in rows)
    report = lines[-1]
    assert "zeroshot" in report and "coop" in report
    # A second run reuses every finished run instead of training again.
    again: list[str] = []
    run_demo(tmp_path, quick=True, log=again.append)
    assert any("already finished" in line for line in again)
