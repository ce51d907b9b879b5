"""Summaries of bench results: markdown tables (mean +- std over seeds), a summary CSV, and PNG plots.

A detection bench's rows hold COCO box AP (``mAP``) where classification rows hold ``accuracy``: its tables and
plots say "COCO mAP@[.5:.95]", and the shot count "all" (the whole training split) follows the counts."""
from __future__ import annotations

import csv
import io
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from vlprompt.engine.checkpoint import atomic_write_bytes
from vlprompt.protocols.runner import (
    WHOLE_SPLIT, harmonic_mean, is_detection_rows, mean_std, score, shot_independent, shots_label, shots_order,
)  # fmt: skip

Row = dict[str, Any]


def _group(rows: list[Row], *keys: str) -> dict[tuple, list[Row]]:
    groups: dict[tuple, list[Row]] = defaultdict(list)
    for row in rows:
        groups[tuple(row[k] for k in keys)].append(row)
    return groups


def _fmt(mean: float, std: float, one_seed: bool = False) -> str:
    # One seed has no spread to report: "± 0.0" would read as a measured zero.
    return f"{mean:.1f}" if one_seed else f"{mean:.1f} ± {std:.1f}"


def _spread_words(one_seed: bool) -> str:
    return "one seed" if one_seed else "mean ± std over seeds"


def score_words(rows: list[Row]) -> str:
    """What the rows' scores are, as headings name them."""
    return "test COCO mAP@[.5:.95] (%)" if is_detection_rows(rows) else "test accuracy (%)"


def _shot_header(shots: int) -> str:
    return "all" if shots == WHOLE_SPLIT else f"{shots}-shot"


def _ordered(values, preferred: list[str] | None = None) -> list:
    values = list(dict.fromkeys(values))
    if preferred:
        return [v for v in preferred if v in values] + [v for v in values if v not in preferred]
    return values


def rows_of_methods(rows: list[Row], methods: list[str]) -> tuple[list[Row], list[str]]:
    """The rows of ``methods`` only, and those of ``methods`` that have none (a report of some methods must not
    show others, nor drop an asked one without a word)."""
    kept = [r for r in rows if r["method"] in methods]
    have = {r["method"] for r in kept}
    return kept, [m for m in methods if m not in have]


def fewshot_cells(rows: list[Row]) -> dict[tuple[str, str, int], tuple[float, float]]:
    """(dataset, method, shots) -> (mean, std) of test accuracy over seeds; shot-independent methods fill every K."""
    rows = [r for r in rows if r["protocol"] == "fewshot"]
    all_shots = sorted({r["shots"] for r in rows if not shot_independent(r["method"])}, key=shots_order)
    cells = {}
    for (dataset, method, shots), group in _group(rows, "eval_dataset", "method", "shots").items():
        stats = mean_std([score(r) for r in group])
        targets = all_shots or [shots] if shot_independent(method) else [shots]
        for k in targets:
            cells[(dataset, method, k)] = stats
    return cells


def fewshot_seed_means(rows: list[Row]) -> dict[tuple[str, int, int], float | None]:
    """(method, shots, seed) -> mean over the bench's datasets of that seed's score, or None where the seed lacks a
    dataset (an average over fewer datasets is not comparable); shot-independent methods fill every K."""
    fewshot = [r for r in rows if r["protocol"] == "fewshot"]
    all_shots = sorted({r["shots"] for r in fewshot if not shot_independent(r["method"])}, key=shots_order)
    datasets = {r["eval_dataset"] for r in fewshot}
    per_seed: dict[tuple[str, int, int], dict[str, float]] = defaultdict(dict)
    for r in fewshot:
        shots = all_shots if shot_independent(r["method"]) and all_shots else [r["shots"]]
        for k in shots:
            per_seed[(r["method"], k, r["seed"])][r["eval_dataset"]] = score(r)
    return {key: sum(v.values()) / len(v) if set(v) == datasets else None for key, v in per_seed.items()}


def fewshot_average(rows: list[Row]) -> dict[tuple[str, int], tuple[float, float]]:
    """(method, shots) -> mean over datasets of the per-seed accuracy (std over seeds of the dataset means); a
    (method, shots) with a seed that lacks a dataset has no cell (shown "-")."""
    by_method_shot: dict[tuple[str, int], list[float]] = defaultdict(list)
    incomplete: set[tuple[str, int]] = set()
    for (method, k, _seed), mean in fewshot_seed_means(rows).items():
        if mean is None:
            incomplete.add((method, k))
        else:
            by_method_shot[(method, k)].append(mean)
    return {key: mean_std(v) for key, v in by_method_shot.items() if key not in incomplete}


def base2novel_cells(rows: list[Row]) -> dict[tuple[str, str], dict[str, float]]:
    """(dataset, method) -> base, novel (means over seeds) and HM of those means, as papers report it."""
    rows = [r for r in rows if r["protocol"] == "base2novel"]
    out: dict[tuple[str, str], dict[str, float]] = {}
    for (dataset, method), group in _group(rows, "eval_dataset", "method").items():
        base = mean_std([score(r) for r in group if r["subset"] == "base"])
        novel_rows = [score(r) for r in group if r["subset"] == "novel"]
        if not novel_rows:  # a method tied to its training classes (linear probe): base accuracy only
            out[(dataset, method)] = {"base": base[0], "base_std": base[1]}
            continue
        novel = mean_std(novel_rows)
        out[(dataset, method)] = {
            "base": base[0], "base_std": base[1], "novel": novel[0], "novel_std": novel[1],
            "hm": harmonic_mean(base[0], novel[0]),
        }
    return out


def cost_cells(rows: list[Row]) -> dict[str, tuple[str, float]]:
    """method -> (trainable parameters: one count or the range over datasets, mean training time per run in s).

    A run evaluated on several targets (cross-dataset, domain) has one row per target but trained once."""
    out = {}
    for (method,), group in _group(rows, "method").items():
        runs = {(r["protocol"], r["train_dataset"], r["shots"], r["seed"]): r for r in group}.values()
        counts = sorted({int(r["trainable_parameters"]) for r in runs})
        shown = f"{counts[0]:,}" if len(counts) == 1 else f"{counts[0]:,} - {counts[-1]:,}"
        out[method] = (shown, sum(r["train_time_s"] for r in runs) / len(runs))
    return out


def markdown_report(rows: list[Row], methods: list[str] | None = None, title: str = "Bench results") -> str:
    methods = _ordered((r["method"] for r in rows), methods)
    one_seed = len({r["seed"] for r in rows}) == 1
    lines = [f"# {title}", ""]
    fewshot = [r for r in rows if r["protocol"] == "fewshot"]
    if fewshot:
        cells = fewshot_cells(rows)
        avg = fewshot_average(rows)
        shots = sorted({k for (_, _, k) in cells}, key=shots_order)
        lines += [f"## Few-shot: {score_words(fewshot)}, {_spread_words(one_seed)}, averaged over datasets", ""]
        if any(k == WHOLE_SPLIT for k in shots):
            lines += ["`all`: trained on the whole training split.", ""]
        lines += ["| method | " + " | ".join(_shot_header(k) for k in shots) + " |",
                  "|---|" + "---:|" * len(shots)]
        run_methods = {r["method"] for r in fewshot}
        for m in methods:
            if m in run_methods:  # "-": not every dataset has a result for every seed (an unfinished bench)
                lines.append(f"| {m} | " + " | ".join(_fmt(*avg[(m, k)], one_seed) if (m, k) in avg else "-" for k in shots)
                             + " |")
        lines.append("")
        datasets = _ordered(r["eval_dataset"] for r in fewshot)
        top = shots[-1]
        at = "with the whole training split (all)" if top == WHOLE_SPLIT else f"at {top} shots"
        lines += [f"### Per dataset {at}", "",
                  "| method | " + " | ".join(datasets) + " |", "|---|" + "---:|" * len(datasets)]
        for m in methods:
            if any((d, m, top) in cells for d in datasets):
                lines.append(f"| {m} | " + " | ".join(
                    _fmt(*cells[(d, m, top)], one_seed) if (d, m, top) in cells else "-" for d in datasets) + " |")
        lines.append("")
    b2n = base2novel_cells(rows)
    if b2n:
        datasets = _ordered(d for d, _ in b2n)
        lines += ["## Base-to-novel: test accuracy (%) on base and novel classes, harmonic mean", "",
                  "| method | base | novel | HM | " + " | ".join(f"{d} HM" for d in datasets) + " |",
                  "|---|---:|---:|---:|" + "---:|" * len(datasets)]
        for m in methods:
            per = [b2n[(d, m)] for d in datasets if (d, m) in b2n]
            if not per:
                continue
            if len(per) < len(datasets):  # averages over fewer datasets are not comparable
                lines.append(f"| {m} | - | - | - | " + " | ".join(
                    f"{b2n[(d, m)]['hm']:.1f}" if "hm" in b2n.get((d, m), {}) else "-" for d in datasets) + " |")
                continue
            base = sum(p["base"] for p in per) / len(per)
            if any("novel" not in p for p in per):  # cannot score novel classes
                lines.append(f"| {m} | {base:.1f} | - | - | " + " | ".join("-" for _ in datasets) + " |")
                continue
            novel = sum(p["novel"] for p in per) / len(per)
            lines.append(f"| {m} | {base:.1f} | {novel:.1f} | {harmonic_mean(base, novel):.1f} | " + " | ".join(
                f"{b2n[(d, m)]['hm']:.1f}" if (d, m) in b2n else "-" for d in datasets) + " |")
        lines.append("")
    for protocol, heading in (("crossdataset", "Cross-dataset"), ("domain", "Domain generalisation")):
        part = [r for r in rows if r["protocol"] == protocol]
        if not part:
            continue
        for source in _ordered(r["train_dataset"] for r in part):  # one table per source dataset
            of_source = [r for r in part if r["train_dataset"] == source]
            targets = _ordered(r["eval_dataset"] for r in of_source)
            lines += [f"## {heading}: trained on {source}, test accuracy (%) {_spread_words(one_seed)}", "",
                      "| method | " + " | ".join(targets) + " |", "|---|" + "---:|" * len(targets)]
            groups = _group(of_source, "method", "eval_dataset")
            for m in methods:
                if any((m, t) in groups for t in targets):
                    lines.append(f"| {m} | " + " | ".join(
                        _fmt(*mean_std([score(r) for r in groups[(m, t)]]), one_seed) if (m, t) in groups else "-"
                        for t in targets) + " |")
            lines.append("")
    full = [r for r in rows if r["protocol"] == "full"]
    if full:
        datasets = _ordered(r["eval_dataset"] for r in full)
        lines += [f"## Whole training split: test score {_spread_words(one_seed)}", "",
                  "The score is each task's headline: VQA accuracy (VQA), accuracy (NLVR2), the mean of image-to-text "
                  "and text-to-image R@1 (retrieval).", "",
                  "| method | " + " | ".join(datasets) + " |", "|---|" + "---:|" * len(datasets)]
        groups = _group(full, "method", "eval_dataset")
        for m in methods:
            if any((m, d) in groups for d in datasets):
                lines.append(f"| {m} | " + " | ".join(
                    _fmt(*mean_std([score(r) for r in groups[(m, d)]]), one_seed) if (m, d) in groups else "-"
                    for d in datasets) + " |")
        lines.append("")
    costs = cost_cells(rows)
    lines += ["## Cost", "", "| method | trainable parameters | mean training time per run (s) |", "|---|---:|---:|"]
    for m in methods:
        if m in costs:
            lines.append(f"| {m} | {costs[m][0]} | {costs[m][1]:.1f} |")
    lines.append("")
    return "\n".join(lines)


MATCH_KEYS = ("protocol", "train_dataset", "eval_dataset", "subset", "method", "shots", "seed")


def precision_comparison(rows: list[Row], reference: list[Row], precision: str, reference_precision: str = "fp32") -> str:
    """Markdown: accuracy of ``rows`` minus that of the same evaluations in ``reference`` (e.g. bf16 - fp32), per
    method: the mean difference and the largest one in absolute value, over the evaluations both hold."""
    ref = {tuple(r[k] for k in MATCH_KEYS): score(r) for r in reference}
    diffs: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for r in rows:
        key = tuple(r[k] for k in MATCH_KEYS)
        if key in ref:
            diffs[r["method"]].append((score(r), ref[key]))
    if not diffs:
        return ""
    lines = [
        f"## {precision} vs {reference_precision}: {score_words(rows)} difference on the same evaluations", "",
        f"| method | evaluations | mean {precision} | mean {reference_precision} | mean difference | "
        "largest difference |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    everything: list[tuple[float, float]] = []
    for method, pairs in diffs.items():
        everything += pairs
        lines.append(_comparison_row(method, pairs))
    lines += [_comparison_row("**all**", everything), ""]
    return "\n".join(lines)


def _comparison_row(label: str, pairs: list[tuple[float, float]]) -> str:
    n = len(pairs)
    ours, ref = sum(a for a, _ in pairs) / n, sum(b for _, b in pairs) / n
    largest = max((a - b for a, b in pairs), key=abs)
    return f"| {label} | {n} | {ours:.2f} | {ref:.2f} | {ours - ref:+.2f} | {largest:+.2f} |"


def summary_csv(rows: list[Row]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    name = "mAP" if is_detection_rows(rows) else "accuracy"
    writer.writerow(["protocol", "dataset", "method", "shots", "subset", f"mean_{name}", f"std_{name}", "seeds"])
    for (protocol, dataset, method, shots, subset), group in sorted(
        _group(rows, "protocol", "eval_dataset", "method", "shots", "subset").items()
    ):
        mean, std = mean_std([score(r) for r in group])
        writer.writerow([protocol, dataset, method, shots, subset, f"{mean:.3f}", f"{std:.3f}", len(group)])
    return buffer.getvalue()


def plot_fewshot(rows: list[Row], out_dir: Path, methods: list[str] | None = None, suffix: str = "") -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = fewshot_cells(rows)
    if not cells:
        return []
    avg = fewshot_average(rows)
    methods = _ordered((m for _, m, _ in cells), methods)
    datasets = _ordered(d for d, _, _ in cells)
    shots = sorted({k for _, _, k in cells}, key=shots_order)
    counted = [k for k in shots if k != WHOLE_SPLIT]
    # the whole training split sits one doubling after the largest count on the log axis, labelled "all"
    place = {k: k for k in counted}
    if WHOLE_SPLIT in shots:
        place[WHOLE_SPLIT] = 2 * max(counted) if counted else 1
    detection = is_detection_rows(rows)
    paths = []
    panels = [("average", {(m, k): v for (m, k), v in avg.items()})] + [
        (d, {(m, k): cells[(d, m, k)] for (dd, m, k) in cells if dd == d}) for d in datasets
    ]
    for name, values in panels:
        fig, ax = plt.subplots(figsize=(5, 3.6))
        for m in methods:
            ks = [k for k in shots if (m, k) in values]
            if not ks:
                continue
            means = [values[(m, k)][0] for k in ks]
            stds = [values[(m, k)][1] for k in ks]
            style = "--" if shot_independent(m) else "-"
            ax.errorbar([place[k] for k in ks], means, yerr=stds, label=m, linestyle=style, marker="o", markersize=3,
                        capsize=2)  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set_xticks([place[k] for k in shots], [shots_label(k) for k in shots])
        ax.set_xlabel("shots per category" if detection else "shots per class")
        ax.set_ylabel("COCO mAP@[.5:.95] (%)" if detection else "test accuracy (%)")
        ax.set_title(f"few-shot: {name}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
        fig.tight_layout()
        path = out_dir / f"fewshot_{re.sub(r'[^A-Za-z0-9._-]+', '_', name)}{suffix}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_base2novel(rows: list[Row], out_dir: Path, methods: list[str] | None = None, suffix: str = "") -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    b2n = {k: v for k, v in base2novel_cells(rows).items() if "novel" in v}  # bars need both
    if not b2n:
        return None
    methods = _ordered((m for _, m in b2n), methods)
    base, novel, hm = [], [], []
    for m in methods:
        per = [v for (d, mm), v in b2n.items() if mm == m]
        b = sum(p["base"] for p in per) / len(per)
        n = sum(p["novel"] for p in per) / len(per)
        base.append(b)
        novel.append(n)
        hm.append(harmonic_mean(b, n))
    fig, ax = plt.subplots(figsize=(max(5, 0.7 * len(methods)), 3.6))
    x = range(len(methods))
    width = 0.27
    ax.bar([i - width for i in x], base, width, label="base")
    ax.bar(list(x), novel, width, label="novel")
    ax.bar([i + width for i in x], hm, width, label="HM")
    ax.set_xticks(list(x), methods, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("base-to-novel (average over datasets)")
    ax.set_ylim(0, max(base + novel + hm) * 1.2)  # headroom so the legend never covers a bar
    ax.legend(fontsize=7, ncol=3, loc="upper center")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = out_dir / f"base2novel{suffix}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_full(rows: list[Row], out_dir: Path, methods: list[str] | None = None, suffix: str = "") -> Path | None:
    """Test score against trainable parameters (log scale), one panel per dataset of the full protocol."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    full = [r for r in rows if r["protocol"] == "full"]
    if not full:
        return None
    datasets = _ordered(r["eval_dataset"] for r in full)
    methods = _ordered((r["method"] for r in full), methods)
    fig, axes = plt.subplots(1, len(datasets), figsize=(4.2 * len(datasets), 3.6), squeeze=False)
    groups = _group(full, "method", "eval_dataset")
    for ax, dataset in zip(axes[0], datasets):
        for m in methods:
            group = groups.get((m, dataset))
            if not group:
                continue
            mean, std = mean_std([score(r) for r in group])
            params = max(1, int(group[0]["trainable_parameters"]))
            ax.errorbar([params], [mean], yerr=[std], fmt="o", capsize=3, label=m)
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters")
        ax.set_ylabel("test score")
        ax.set_title(dataset, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    path = out_dir / f"full{suffix}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(
    rows: list[Row],
    out_dir: str | Path,
    methods: list[str] | None = None,
    command: str = "",
    precision: str = "fp32",
    reference_rows: list[Row] | None = None,
) -> Path:
    """results.md, summary.csv and plots; for another precision than fp32 their names end in ``_<precision>``
    (``results_bf16.md``) and, given the fp32 rows of the same bench (``reference_rows``), the report ends with the
    accuracy difference to fp32."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    suffix = "" if precision == "fp32" else f"_{precision}"
    title = "Bench results" + ("" if precision == "fp32" else f" ({precision})")
    text = markdown_report(rows, methods, title=title)
    if command:
        text = text.replace("\n", f"\n\nCommand: `{command}`\n", 1)
    if reference_rows and precision != "fp32":
        comparison = precision_comparison(rows, reference_rows, precision)
        if comparison:
            text = text.rstrip("\n") + "\n\n" + comparison
    atomic_write_bytes(out / f"results{suffix}.md", text.encode())
    atomic_write_bytes(out / f"summary{suffix}.csv", summary_csv(rows).encode())
    plot_fewshot(rows, out, methods, suffix)
    plot_base2novel(rows, out, methods, suffix)
    plot_full(rows, out, methods, suffix)
    return out / f"results{suffix}.md"
