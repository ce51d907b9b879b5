"""benchmarks/bench_findings.py: the field's two base-to-novel findings, read from a bench's results.csv."""
from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_findings.py"


def _module():
    spec = importlib.util.spec_from_file_location("bench_findings", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write(folder: Path, accuracies: dict[tuple[str, str, str], list[float]]) -> None:
    fields = ["protocol", "train_dataset", "eval_dataset", "subset", "method", "shots", "seed", "accuracy", "n",
              "trainable_parameters", "train_time_s", "precision"]
    with (folder / "results.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        for (method, dataset, subset), values in accuracies.items():
            for seed, acc in enumerate(values, 1):
                w.writerow({"protocol": "base2novel", "train_dataset": dataset, "eval_dataset": dataset,
                            "subset": subset, "method": method, "shots": 16, "seed": seed, "accuracy": acc,
                            "n": 10, "trainable_parameters": 0, "train_time_s": 0.0, "precision": "fp32"})


def test_findings_reproduced_and_not(tmp_path):
    acc = {}
    for d in ("toy:a", "toy:b"):
        acc.update({("zeroshot", d, "base"): [60, 60], ("zeroshot", d, "novel"): [70, 70],
                    ("coop", d, "base"): [80, 82], ("coop", d, "novel"): [50, 52],
                    ("maple", d, "base"): [80, 80], ("maple", d, "novel"): [68, 68]})
    _write(tmp_path, acc)
    text = _module().findings(_module().read_rows(tmp_path))
    assert "CoOp vs zero-shot on novel classes: the finding reproduces" in text
    assert "Novel accuracy: CoOp 51.0 vs zero-shot 70.0 (-19.0)" in text and "on 2 of 2 datasets" in text
    assert "the finding reproduces.** Best multi-modal: maple 73.5; best uni-modal: coop 62.6" in text

    acc[("coop", "toy:a", "novel")] = acc[("coop", "toy:b", "novel")] = [90, 90]
    _write(tmp_path, acc)
    text = _module().findings(_module().read_rows(tmp_path))
    assert text.count("does NOT reproduce") == 2
    acc[("coop", "toy:a", "novel")] = acc[("coop", "toy:b", "novel")] = [50, 52]
    acc.update({("dpt", d, s): [10, 10] for d in ("toy:a", "toy:b") for s in ("base", "novel")})
    _write(tmp_path, acc)
    assert "partly reproduces" in _module().findings(_module().read_rows(tmp_path))


def test_missing_results_name_the_folder(tmp_path):
    with pytest.raises(SystemExit, match="results.csv not found"):
        _module().read_rows(tmp_path)
