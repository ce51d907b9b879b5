#!/usr/bin/env python
"""The fusion methods on the shipped toy ViLT: one table per toy task from finished `vlprompt bench --protocols
full` folders, with each method's extra forward FLOPs, and a plot of score against extra compute.

The benches (docs/fusion.md gives the commands) write ``results.csv`` (one row per method x dataset x seed) and a
run folder per job; this script adds what a bench table does not hold: the spread per seed, the six retrieval
recalls (read from each run's ``results.json``), the extra forward FLOPs of each method over the head-only forward
(``benchmarks/fusion_cost.py``'s count on ``embedded-vilt``), and the paper's three comparisons (APT against deep
prompts, against full fine-tuning, and APT's extra compute as a share of deep prompts').

Usage::

    python benchmarks/fusion_results.py --bench bench/fusion bench/fusion_retrieval \\
        --out docs/results/fusion/results.md --plot docs/results/fusion/score_vs_flops.png
"""
from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fusion_cost import TOY_METHODS, method_costs  # noqa: E402

RECALLS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")
# Forwards of the encoder per scored example: an NLVR2-style example runs one image-statement forward per image.
FORWARDS_PER_EXAMPLE = {"toy:nlvr2": 2}
SCORE_NAMES = {"toy:vqa": "VQA accuracy", "toy:nlvr2": "accuracy (test)",
               "toy:retrieval": "mean of i2t and t2i R@1 (test)"}  # fmt: skip


@dataclass
class Cell:
    """One method on one dataset: per-seed scores, trainable parameters, training times and extra metrics."""

    scores: dict[int, float] = field(default_factory=dict)
    params: set[int] = field(default_factory=set)
    times: list[float] = field(default_factory=list)
    recalls: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))


def read_bench(folder: Path, cells: dict[tuple[str, str], Cell]) -> list[str]:
    """Add ``folder``'s finished jobs to ``cells``; returns the bench's command as its report records it.

    The recalls come from each run's ``results.json`` under ``runs/``; they are also written to
    ``run_metrics.csv`` beside ``results.csv``, so that a kept copy of the two files (the run folders are too big
    to commit) is enough to remake the table. A folder without ``runs/`` is read from its ``run_metrics.csv``."""
    table = folder / "results.csv"
    if not table.is_file():
        raise SystemExit(f"{table} is missing: run the bench first (docs/fusion.md), or pass its --output folder")
    recalls = run_recalls(folder)
    for row in csv.DictReader(table.open()):
        dataset, method, seed = row["eval_dataset"], row["method"], int(row["seed"])
        cell = cells.setdefault((dataset, method), Cell())
        cell.scores[seed] = float(row["accuracy"])
        cell.params.add(int(row["trainable_parameters"]))
        cell.times.append(float(row["train_time_s"]))
        for name, value in recalls.get((dataset, method, seed), {}).items():
            cell.recalls[name].append(value)
    report = (folder / "results.md").read_text().splitlines() if (folder / "results.md").is_file() else []
    return [line.removeprefix("Command: ").strip("`") for line in report if line.startswith("Command: ")]


RunKey = tuple[str, str, int]


def run_recalls(folder: Path) -> dict[RunKey, dict[str, float]]:
    """The recalls of each (dataset, method, seed) run of a bench folder: from its run folders when they are there
    (and then kept in ``run_metrics.csv``), else from ``run_metrics.csv``, else none."""
    kept = folder / "run_metrics.csv"
    if not (folder / "runs").is_dir():
        if not kept.is_file():
            return {}
        return {(row["dataset"], row["method"], int(row["seed"])): {n: float(row[n]) for n in RECALLS if row.get(n)}
                for row in csv.DictReader(kept.open())}  # fmt: skip
    found: dict[RunKey, dict[str, float]] = {}
    for result in sorted(folder.glob("runs/full/*/*/all_seed*/result.json")):
        job = json.loads(result.read_text())["job"]
        final = json.loads((result.parent / "results.json").read_text())["final_metrics"]
        values = {name: float(final[name]) for name in RECALLS if name in final}
        if values:
            found[(job["dataset"], job["method"], int(job["seed"]))] = values
    if found:
        with kept.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["dataset", "method", "seed", *RECALLS])
            for (dataset, method, seed), values in sorted(found.items()):
                writer.writerow([dataset, method, seed, *(values.get(n, "") for n in RECALLS)])
    return found


def spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.fmean(values):.1f} ± {statistics.stdev(values):.1f}"


def task_table(dataset: str, cells: dict[tuple[str, str], Cell], extra: dict[str, int]) -> list[str]:
    forwards = FORWARDS_PER_EXAMPLE.get(dataset, 1)
    lines = [f"## {dataset}", "", f"Score: {SCORE_NAMES.get(dataset, 'the task headline')}, mean ± std over seeds.",
             "", "| method | score | per seed | trainable parameters | extra MFLOPs per example | training time (s) |",
             "|---|---:|---|---:|---:|---:|"]  # fmt: skip
    for method in TOY_METHODS:
        cell = cells.get((dataset, method))
        if cell is None:
            continue
        seeds = ", ".join(f"{cell.scores[s]:.1f}" for s in sorted(cell.scores))
        params = " / ".join(f"{p:,}" for p in sorted(cell.params))
        lines.append(f"| {method} | {spread(list(cell.scores.values()))} | {seeds} | {params} | "
                     f"+{forwards * extra[method] / 1e6:.2f} | {statistics.fmean(cell.times):.0f} |")  # fmt: skip
    if any(cells[(dataset, m)].recalls for m in TOY_METHODS if (dataset, m) in cells):
        lines += ["", "| method | " + " | ".join(RECALLS) + " |", "|---|" + "---:|" * len(RECALLS)]
        missing = False
        for method in TOY_METHODS:
            cell = cells.get((dataset, method))
            if cell is None:
                continue
            if cell.recalls:
                lines.append(f"| {method} | " + " | ".join(spread(cell.recalls[r]) for r in RECALLS) + " |")
            else:
                missing = True
                lines.append(f"| {method} | " + " | ".join("–" for _ in RECALLS) + " |")
        if missing:
            lines += ["", "–: read from a bench copy that kept no per-run recalls (no run folders, no run_metrics.csv)."]
    lines += ["", *comparisons(dataset, cells, extra), ""]
    return lines


def comparisons(dataset: str, cells: dict[tuple[str, str], Cell], extra: dict[str, int]) -> list[str]:
    """The paper's three claims, as differences of the means on this dataset."""
    mean = {m: statistics.fmean(cells[(dataset, m)].scores.values()) for m in TOY_METHODS if (dataset, m) in cells}
    if not {"apt_native", "deep_prompt_native"} <= set(mean):
        return []
    out = [f"APT − deep prompts: {mean['apt_native'] - mean['deep_prompt_native']:+.1f} points"]
    if "full_native" in mean:
        out.append(f"APT − full fine-tuning: {mean['apt_native'] - mean['full_native']:+.1f} points")
    out.append(f"APT's extra FLOPs / deep prompts': {extra['apt_native'] / extra['deep_prompt_native']:.0%}")
    return ["; ".join(out) + "."]


def plot(cells: dict[tuple[str, str], Cell], extra: dict[str, int], datasets: list[str], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(datasets), figsize=(4.2 * len(datasets), 3.6), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        forwards = FORWARDS_PER_EXAMPLE.get(dataset, 1)
        for method in TOY_METHODS:
            cell = cells.get((dataset, method))
            if cell is None:
                continue
            values = list(cell.scores.values())
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            ax.errorbar(forwards * extra[method] / 1e6, statistics.fmean(values), yerr=std, fmt="o", capsize=3,
                        label=method)  # fmt: skip
        ax.set_title(dataset)
        ax.set_xlabel("extra MFLOPs per example over head-only")
        ax.set_ylabel(SCORE_NAMES.get(dataset, "score"))
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bench", type=Path, nargs="+", required=True, help="finished bench --output folders")
    parser.add_argument("--out", type=Path, default=Path("docs/results/fusion/results.md"))
    parser.add_argument("--plot", type=Path, default=Path("docs/results/fusion/score_vs_flops.png"))
    parser.add_argument("--model", default="embedded-vilt")
    args = parser.parse_args(argv)

    cells: dict[tuple[str, str], Cell] = {}
    commands = [command for folder in args.bench for command in read_bench(folder, cells)]
    head_only, costs = method_costs(args.model)
    extra = {name: flops for name, _, flops in costs}
    datasets = sorted({d for d, _ in cells}, key=lambda d: list(SCORE_NAMES).index(d) if d in SCORE_NAMES else 99)
    lines = ["<!-- made by: python benchmarks/fusion_results.py --bench "
             + " ".join(str(f) for f in args.bench) + f" --out {args.out} --plot {args.plot} -->",
             f"# Fusion methods on the shipped toy ViLT ({args.model})", "", "Benches:", "",
             *(f"- `{c}`" for c in commands), "",
             f"Extra MFLOPs: forward FLOPs per example over the head-only forward ({head_only / 1e6:.2f} MFLOPs per "
             "image-text forward), counted as `benchmarks/fusion_cost.py` does; an NLVR2-style example is two "
             "forwards. Trainable parameters include the task head. Training time: mean wall seconds of one run's "
             "`train` call (loading, the epochs, validation and the run's own final scoring), 2 CPU cores, one "
             "run at a time.", ""]  # fmt: skip
    for dataset in datasets:
        lines += task_table(dataset, cells, extra)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    plot(cells, extra, datasets, args.plot)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
