#!/usr/bin/env python
"""The detection bench on the toy detector, summarised: COCO mAP averaged over the suite per method and shot count,
against each method's trainable parameters, and SDPT's place against every baseline.

Reads the finished runs of a detection bench folder (``vlprompt bench --datasets toydet:suite ...``;
docs/detection.md gives the command) and writes a markdown summary and a plot of average mAP against trainable
parameters (log scale), one panel per shot count. What a bench's own ``results.md`` does not hold: the parameter
axis, and per shot count the difference between ``sdpt_native`` and each other method (mean over seeds of the suite
average, with the seeds' spread), said in words.

Usage::

    python benchmarks/detection_results.py --bench bench/toydet-suite --out docs/results/detection/summary.md \\
        --plot docs/results/detection/map_vs_params.png
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from vlprompt.protocols.report import fewshot_seed_means
from vlprompt.protocols.runner import mean_std, shot_independent, shots_label, shots_order

FLAGSHIP = "sdpt_native"


def finished_rows(bench: Path) -> list[dict]:
    """The few-shot rows of every finished run of a bench folder, read from the runs' result.json files: the
    runner writes results.csv when a bench ends, these as each run ends (so a bench still running, or stopped
    with kill -9, is read whole)."""
    rows = []
    for result in sorted(bench.glob("runs/fewshot/*/*/*/result.json")):
        for row in json.loads(result.read_text())["rows"]:
            rows.append({"precision": "fp32", **row})
    return rows


def bench_shots(rows: list[dict]) -> list[int]:
    """The shot counts of the bench's learning runs (of every run when nothing learns), "all" last."""
    learned = {r["shots"] for r in rows if not shot_independent(r["method"])}
    return sorted(learned or {r["shots"] for r in rows}, key=shots_order)


def trainable(rows: list[dict]) -> dict[str, int]:
    """method -> trainable parameters (the largest over datasets: prompt sizes do not depend on the categories
    here, weight methods never do)."""
    out: dict[str, int] = {}
    for r in rows:
        out[r["method"]] = max(out.get(r["method"], 0), int(r["trainable_parameters"]))
    return out


def per_seed_average(rows: list[dict]) -> dict[tuple[str, int, int], float]:
    """(method, shots, seed) -> mAP averaged over the datasets (only where every dataset of the bench has a row)."""
    return {key: mean for key, mean in fewshot_seed_means(rows).items() if mean is not None}


def complete_seed_average(rows: list[dict]) -> dict[tuple[str, int], tuple[float, float, int]]:
    """(method, shots) -> (mean, std, seeds) over the seeds that finished every dataset; a seed still running is
    left out rather than blanking the cell (the seed count says so)."""
    by_cell: dict[tuple[str, int], list[float]] = defaultdict(list)
    for (method, k, _seed), mean in per_seed_average(rows).items():
        by_cell[(method, k)].append(mean)
    return {key: (*mean_std(values), len(values)) for key, values in by_cell.items()}


def comparison_lines(rows: list[dict], methods: list[str], shots: list[int]) -> list[str]:
    """Per shot count: SDPT minus each method (mean over the seeds both have), and how many seeds SDPT is ahead."""
    averages = per_seed_average(rows)
    lines = [f"| {FLAGSHIP} minus | " + " | ".join(f"shots {shots_label(k)}" for k in shots) + " |",
             "|---|" + "---:|" * len(shots)]
    for other in methods:
        if other == FLAGSHIP:
            continue
        cells = []
        for k in shots:
            seeds = sorted({s for (m, kk, s) in averages if m == FLAGSHIP and kk == k}
                           & {s for (m, kk, s) in averages if m == other and kk == k})
            if not seeds:
                cells.append("-")
                continue
            diffs = [averages[(FLAGSHIP, k, s)] - averages[(other, k, s)] for s in seeds]
            ahead = sum(d > 0 for d in diffs)
            cells.append(f"{statistics.fmean(diffs):+.1f} ({ahead}/{len(seeds)})")
        lines.append(f"| {other} | " + " | ".join(cells) + " |")
    return lines


def model_parameters(name: str = "embedded:detector") -> int:
    """Parameters of the benched detector (each shared tensor counted once)."""
    from transformers import GroundingDinoForObjectDetection
    from transformers.utils import logging as hf_logging

    from vlprompt.assets import embedded_model_path

    hf_logging.disable_progress_bar()
    model = GroundingDinoForObjectDetection.from_pretrained(embedded_model_path(name))
    return sum(p.numel() for p in model.parameters())


RUN_LINE = re.compile(r"^\[\d+/\d+\] (\S+): .* \(([\d.]+)s\)$")


def logged_job_seconds(logs: list[Path]) -> dict[str, float]:
    """run key -> seconds of its last logged run (training and evaluation), from bench logs in the order given: a run
    trained again replaces its earlier line."""
    seconds: dict[str, float] = {}
    for log in logs:
        for line in log.read_text().splitlines():
            match = RUN_LINE.match(line.strip())
            if match:
                seconds[match.group(1)] = float(match.group(2))
    return seconds


def job_time_lines(job_seconds: dict[str, float], workers: int = 1) -> list[str]:
    if not job_seconds:
        return []
    hours = sum(job_seconds.values()) / 3600
    return ["", f"The bench logs time {len(job_seconds)} runs whole (training and evaluation): {hours:.1f} h in all, "
                f"about {hours / workers:.1f} h of wall clock with {workers} workers. Both sums count as logged the "
                "runs that shared the CPU with other work or were paused meanwhile; the table's median is not moved "
                "by them."]


def summary(rows: list[dict], model_size: int, job_seconds: dict[str, float] | None = None, workers: int = 1) -> str:
    """``workers``: the bench's --workers (its runs shared the wall clock this many at a time)."""
    job_seconds = job_seconds or {}
    methods = list(dict.fromkeys(r["method"] for r in rows))
    shots = bench_shots(rows)
    datasets = sorted({r["eval_dataset"] for r in rows})
    seeds = sorted({r["seed"] for r in rows})
    average = complete_seed_average(rows)
    params = trainable(rows)
    times = defaultdict(list)
    for r in rows:
        times[r["method"]].append(float(r["train_time_s"]))
    train_hours = sum(t for ts in times.values() for t in ts) / 3600
    lines = ["# Detection on the toy detector: mAP against trainable parameters", "",
             f"COCO mAP@[.5:.95] (%) on the test splits, averaged over {len(datasets)} datasets "
             f"({', '.join(datasets)}), mean ± std over seeds {', '.join(map(str, seeds))}; `embedded-detector` "
             f"({model_size:,} parameters). Written by `python benchmarks/detection_results.py` from the bench's "
             "finished runs (their result.json files); `-`: a cell with a seed or set not finished.", "",
             f"{len(rows)} runs; their training times (`train_time_s`: model and data loading and training, not "
             f"the test evaluation; each run in one of {workers} worker processes) add up to "
             f"{train_hours:.1f} h.", *job_time_lines(job_seconds, workers), "",
             "| method | trainable | % of model | " + " | ".join(f"shots {shots_label(k)}" for k in shots)
             + " | runs | train s/run (median) |", "|---|---:|---:|" + "---:|" * (len(shots) + 2)]
    for m in sorted(methods, key=lambda m: params[m]):
        cells = [("-" if (m, k) not in average else f"{average[(m, k)][0]:.1f} ± {average[(m, k)][1]:.1f}"
                  + ("" if average[(m, k)][2] == len(seeds) else f" ({average[(m, k)][2]} of {len(seeds)} seeds)"))
                 for k in shots]
        lines.append(f"| {m} | {params[m]:,} | {100 * params[m] / model_size:.3f}% | " + " | ".join(cells)
                     + f" | {len(times[m])} | {statistics.median(times[m]):.0f} |")
    if FLAGSHIP in methods:
        lines += ["", f"## {FLAGSHIP} against each method", "",
                  "Difference of the suite-average mAP (points), mean over seeds, and in brackets on how many "
                  "seeds SDPT is ahead:", "", *comparison_lines(rows, sorted(methods, key=lambda m: params[m]),
                                                                shots)]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    average = complete_seed_average(rows)
    params = trainable(rows)
    shots = bench_shots(rows)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    colours = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(sorted(methods, key=lambda m: params[m]))}
    fig, axes = plt.subplots(1, len(shots), figsize=(3.2 * len(shots) + 1.4, 3.4), sharey=True, squeeze=False)
    for ax, k in zip(axes[0], shots):
        for m in methods:
            if (m, k) not in average:
                continue
            x = max(params[m], 1)  # zero-shot trains nothing: drawn at 1 on the log axis
            mean, std, _ = average[(m, k)]
            ax.errorbar([x], [mean], yerr=[std], fmt="*" if m == FLAGSHIP else "o", markersize=11 if m == FLAGSHIP
                        else 6, label=m, capsize=2, color=colours[m])
        ax.set_xscale("log")
        ax.set_title(f"shots {shots_label(k)}")
        ax.set_xlabel("trainable parameters")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("COCO mAP@[.5:.95] (%), suite average")
    handles = {}
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    ordered = sorted(handles, key=lambda m: params[m])
    fig.legend([handles[m] for m in ordered], ordered, fontsize=7, loc="center right")
    fig.tight_layout(rect=(0, 0, 0.9, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bench", required=True, help="a detection bench folder (its runs/ with result.json files)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--plot")
    parser.add_argument("--logs", nargs="*", default=[], type=Path,
                        help="the bench's logs, oldest first: their per-run seconds give the bench's time")
    args = parser.parse_args(argv)
    rows = finished_rows(Path(args.bench))
    if not rows or "mAP" not in rows[0]:
        raise SystemExit(f"{args.bench} holds no finished detection runs (runs/fewshot/*/*/*/result.json)")
    workers = json.loads((Path(args.bench) / "bench_config.json").read_text())["workers"]
    text = summary(rows, model_parameters(), logged_job_seconds(args.logs), workers)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)
    if args.plot:
        plot(rows, Path(args.plot))
        print(f"written {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
