"""benchmarks/fusion_results.py: the toy fusion table reads every finished bench job, its per-seed spread, the
retrieval recalls of each run, and states the paper's three comparisons from the numbers it shows."""
from __future__ import annotations

import csv
import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "fusion_results.py"
FIELDS = ["protocol", "train_dataset", "eval_dataset", "subset", "method", "shots", "seed", "accuracy", "n",
          "trainable_parameters", "train_time_s", "precision"]  # fmt: skip


@pytest.fixture(scope="module")
def results_script():
    spec = importlib.util.spec_from_file_location("fusion_results", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


def _fake_bench(folder: Path, dataset: str, scores: dict[str, list[float]], recalls: bool = False) -> None:
    """A finished `bench --protocols full` folder as the runner writes it: results.csv, results.md and, per job,
    runs/full/<slug>/<method>/all_seed<s>/{result.json, results.json}."""
    rows = []
    for method, per_seed in scores.items():
        for seed, score in enumerate(per_seed, start=1):
            rows.append({"protocol": "full", "train_dataset": dataset, "eval_dataset": dataset, "subset": "all",
                         "method": method, "shots": 0, "seed": seed, "accuracy": score, "n": 100,
                         "trainable_parameters": 1000, "train_time_s": 10.0 * seed, "precision": "fp32"})  # fmt: skip
            run = folder / "runs" / "full" / dataset.replace(":", "_") / method / f"all_seed{seed}"
            run.mkdir(parents=True)
            (run / "result.json").write_text(json.dumps({"job": {"dataset": dataset, "method": method, "seed": seed}}))
            final = {"accuracy": score}
            if recalls:
                final |= {"i2t_r1": score + 1, "i2t_r5": 80.0, "i2t_r10": 90.0, "t2i_r1": score - 1,
                          "t2i_r5": 70.0, "t2i_r10": 85.0}  # fmt: skip
            (run / "results.json").write_text(json.dumps({"final_metrics": final}))
    with (folder / "results.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    (folder / "results.md").write_text(f"# Bench results\n\nCommand: `vlprompt bench --datasets {dataset}`\n")


def test_tables_spread_recalls_and_comparisons(results_script, tmp_path):
    methods = ["fusion_head", "apt_native", "deep_prompt_native", "lora_native", "full_native"]
    _fake_bench(tmp_path / "vqa", "toy:vqa", {m: [40.0 + i, 42.0 + i, 44.0 + i] for i, m in enumerate(methods)})
    _fake_bench(tmp_path / "ret", "toy:retrieval", {"apt_native": [50.0, 52.0], "deep_prompt_native": [45.0, 47.0]},
                recalls=True)  # fmt: skip
    out, plot = tmp_path / "results.md", tmp_path / "plot.png"
    assert results_script.main(["--bench", str(tmp_path / "vqa"), str(tmp_path / "ret"), "--out", str(out),
                                "--plot", str(plot)]) == 0  # fmt: skip
    text = out.read_text()
    assert "`vlprompt bench --datasets toy:vqa`" in text and "`vlprompt bench --datasets toy:retrieval`" in text
    assert "| apt_native | 43.0 ± 2.0 | 41.0, 43.0, 45.0 | 1,000 |" in text
    assert "APT − deep prompts: -1.0 points; APT − full fine-tuning: -3.0 points" in text
    assert "| apt_native | 52.0 ± 1.4 | 80.0 ± 0.0 | 90.0 ± 0.0 | 50.0 ± 1.4 |" in text  # i2t_r1: score + 1
    assert "APT − deep prompts: +5.0 points; APT's extra FLOPs" in text  # no full fine-tuning on retrieval
    assert text.index("## toy:vqa") < text.index("## toy:retrieval")
    assert plot.stat().st_size > 0


def test_missing_bench_folder_is_named(results_script, tmp_path):
    with pytest.raises(SystemExit, match="results.csv is missing: run the bench first"):
        results_script.main(["--bench", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o.md")])


def test_a_kept_copy_without_run_folders_remakes_the_same_table(results_script, tmp_path):
    """The run folders are too big to commit: results.csv, results.md and the run_metrics.csv the script keeps
    beside them are enough to remake the table, recalls included."""
    import shutil

    bench = tmp_path / "ret"
    _fake_bench(bench, "toy:retrieval", {"apt_native": [50.0, 52.0], "deep_prompt_native": [45.0, 47.0]},
                recalls=True)  # fmt: skip
    first, second = tmp_path / "first.md", tmp_path / "second.md"
    results_script.main(["--bench", str(bench), "--out", str(first), "--plot", str(tmp_path / "a.png")])
    assert (bench / "run_metrics.csv").is_file()
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("results.csv", "results.md", "run_metrics.csv"):
        shutil.copy(bench / name, copy / name)
    results_script.main(["--bench", str(copy), "--out", str(second), "--plot", str(tmp_path / "b.png")])
    body = lambda text: text.split("\n", 1)[1]  # noqa: E731 -- the first line names the folders read
    assert body(second.read_text()) == body(first.read_text())
    assert "| apt_native | 52.0 ± 1.4 |" in second.read_text()


def test_runs_whose_recalls_were_not_kept_show_dashes(results_script, tmp_path):
    _fake_bench(tmp_path / "kept", "toy:retrieval", {"apt_native": [50.0, 52.0]}, recalls=True)
    _fake_bench(tmp_path / "bare", "toy:retrieval", {"full_native": [40.0, 42.0]})  # no recalls in its runs
    out = tmp_path / "results.md"
    results_script.main(["--bench", str(tmp_path / "kept"), str(tmp_path / "bare"), "--out", str(out),
                         "--plot", str(tmp_path / "p.png")])  # fmt: skip
    text = out.read_text()
    assert "| full_native | – | – | – | – | – | – |" in text and "–: read from a bench copy" in text
    assert "| apt_native | 52.0 ± 1.4 |" in text
