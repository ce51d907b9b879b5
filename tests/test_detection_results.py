"""benchmarks/detection_results.py: the detection bench's summary averages each seed over the suite, puts every
method against SDPT seed by seed, and times the bench from its logs (a run trained again counts once, its last)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from vlprompt.protocols.runner import WHOLE_SPLIT

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "detection_results.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("detection_results", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _row(method: str, dataset: str, shots: int, seed: int, mAP: float, params: int) -> dict:
    return {"protocol": "fewshot", "train_dataset": dataset, "eval_dataset": dataset, "subset": "all",
            "method": method, "shots": shots, "seed": seed, "mAP": mAP, "AP50": mAP, "AP75": mAP, "n": 10,
            "trainable_parameters": params, "train_time_s": 60.0, "precision": "fp32"}  # fmt: skip


def _rows() -> list[dict]:
    rows = []
    for seed in (1, 2):
        for dataset, offset in (("toydet:novel", 0.0), ("toydet:looks", 10.0)):
            rows.append(_row("det_zeroshot", dataset, WHOLE_SPLIT, seed, 20.0 + offset, 0))
            for shots in (1, WHOLE_SPLIT):
                rows.append(_row("sdpt_native", dataset, shots, seed, 30.0 + offset + seed, 2048))
                rows.append(_row("det_full", dataset, shots, seed, 32.0 + offset + (3 if seed == 1 else -3), 100))
    return rows


def test_summary_table_and_sdpt_against_each_method(script):
    text = script.summary(_rows(), 1000)
    assert "| sdpt_native | 2,048 | 204.800% | 36.5 ± 0.7 | 36.5 ± 0.7 | 8 | 60 |" in text  # seeds 35, 37 -> 36.5
    assert "| det_zeroshot | 0 | 0.000% | 25.0 ± 0.0 | 25.0 ± 0.0 | 4 | 60 |" in text  # shot-independent: every shot
    # SDPT minus full per seed: (36 - 40) and (37 - 34): mean -0.5, ahead on seed 2 only
    assert "| det_full | -0.5 (1/2) | -0.5 (1/2) |" in text
    assert "| det_zeroshot | +11.5 (2/2) | +11.5 (2/2) |" in text
    assert "20 runs; " in text and "add up to 0.3 h" in text  # 20 runs x 60 s


def test_a_seed_still_running_is_left_out_and_said(script):
    rows = [r for r in _rows() if not (r["method"] == "sdpt_native" and r["seed"] == 2
                                       and r["eval_dataset"] == "toydet:looks")]  # fmt: skip
    assert "| sdpt_native | 2,048 | 204.800% | 36.0 ± 0.0 (1 of 2 seeds) |" in script.summary(rows, 1000)


def test_rows_come_from_the_runs_result_files(script, tmp_path):
    """A bench stopped with kill -9 has no fresh results.csv: its finished runs are read from their folders."""
    import json

    for i, row in enumerate(_rows()[:3]):
        run = tmp_path / "runs" / "fewshot" / row["eval_dataset"].replace(":", "_") / row["method"] / f"run{i}"
        run.mkdir(parents=True)
        (run / "result.json").write_text(json.dumps({"job": {}, "settings": {}, "rows": [row]}))
    (tmp_path / "runs" / "fewshot" / "toydet_novel" / "sdpt_native" / "unfinished").mkdir(parents=True)
    assert sorted(r["mAP"] for r in script.finished_rows(tmp_path)) == sorted(r["mAP"] for r in _rows()[:3])


def test_bench_time_from_logs_counts_a_retrained_run_once(script, tmp_path):
    first, second = tmp_path / "first.log", tmp_path / "second.log"
    first.write_text("recipe: toy\n"
                     "[1/3] fewshot/toydet_novel/det_coop/shots1_seed1: toydet:novel[all] mAP 9.0 (100.0s)\n"
                     "[2/3] fewshot/toydet_novel/det_full/shots1_seed1: toydet:novel[all] mAP 30.1 (50.5s)\n")
    second.write_text("[1/3] fewshot/toydet_novel/det_coop/shots1_seed1: toydet:novel[all] mAP 9.5 (20.0s)\n"
                      "Command terminated by signal 9\n")
    seconds = script.logged_job_seconds([first, second])
    assert seconds == {"fewshot/toydet_novel/det_coop/shots1_seed1": 20.0,
                       "fewshot/toydet_novel/det_full/shots1_seed1": 50.5}
    assert script.job_time_lines(seconds)[1].startswith("The bench logs time 2 runs whole")
