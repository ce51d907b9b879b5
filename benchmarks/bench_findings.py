#!/usr/bin/env python
"""Check the field's known findings against a `vlprompt bench` output folder (its results.csv).

1. CoOp loses novel-class accuracy against zero-shot CLIP (CoCoOp paper: CoOp's novel accuracy falls below
   zero-shot on most datasets, while its base accuracy rises).
2. Multi-modal prompts (both towers: MaPLe, DPT, UPT, SDPT, APT on both towers) beat uni-modal ones (text only:
   CoOp, CoCoOp; image only: VPT) on the base-to-novel harmonic mean.

Usage::

    python benchmarks/bench_findings.py runs/toy_full_bench            # prints markdown
    python benchmarks/bench_findings.py runs/toy_full_bench --out docs/results/findings.md

Base and novel accuracies are means over the seeds present in results.csv, then over datasets; the HM is that of
the averaged base and novel accuracies (the papers' and the bench report's convention).
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from vlprompt.protocols.report import base2novel_cells
from vlprompt.protocols.runner import harmonic_mean, read_csv

UNI_MODAL = {"coop": "text", "cocoop": "text", "vpt_shallow": "image", "vpt_deep": "image"}
MULTI_MODAL = ("ivlp", "maple", "dpt", "upt", "sdpt", "apt")  # APT's default towers: both


def read_rows(folder: Path) -> list[dict]:
    path = folder / "results.csv"
    if not path.exists():
        raise SystemExit(f"{path} not found: pass the --output folder of a finished `vlprompt bench` run")
    return read_csv(path)


def base_novel(rows: list[dict]) -> dict[tuple[str, str], dict[str, float]]:
    """(method, dataset) -> base, novel (seed means) and hm, for methods that score novel classes."""
    return {(method, dataset): cell for (dataset, method), cell in base2novel_cells(rows).items() if "novel" in cell}


def findings(rows: list[dict]) -> str:
    table = base_novel(rows)
    if not table:
        return "No base-to-novel results in this folder.\n"
    methods = sorted({m for m, _ in table})
    datasets = sorted({d for _, d in table})
    seeds = sorted({len({r["seed"] for r in rows if (r["method"], r["train_dataset"]) == key and
                         r["protocol"] == "base2novel"}) for key in table})
    lines = [f"Base-to-novel over {len(datasets)} datasets, seeds per cell: {', '.join(map(str, seeds))}.", ""]

    def avg(method: str, key: str) -> float | None:
        if key == "hm":  # papers' convention: the HM of the dataset-averaged base and novel accuracies
            base, novel = avg(method, "base"), avg(method, "novel")
            return None if base is None or novel is None else harmonic_mean(base, novel)
        values = [table[(method, d)][key] for d in datasets if (method, d) in table]
        return statistics.fmean(values) if len(values) == len(datasets) else None

    lines += ["| method | modality | base | novel | HM |", "|---|---|---:|---:|---:|"]
    for m in methods:
        modality = UNI_MODAL.get(m, "both" if m in MULTI_MODAL else "none")
        vals = [avg(m, k) for k in ("base", "novel", "hm")]
        lines.append(f"| {m} | {modality} | " + " | ".join("-" if v is None else f"{v:.1f}" for v in vals) + " |")
    lines.append("")

    if "coop" in methods and "zeroshot" in methods:
        drops = [d for d in datasets if (("coop", d) in table and ("zeroshot", d) in table
                                         and table[("coop", d)]["novel"] < table[("zeroshot", d)]["novel"])]
        zs_novel, coop_novel = avg("zeroshot", "novel"), avg("coop", "novel")
        zs_base, coop_base = avg("zeroshot", "base"), avg("coop", "base")
        if None not in (zs_novel, coop_novel, zs_base, coop_base):
            verdict = "reproduces" if coop_novel < zs_novel else "does NOT reproduce"
            lines += [
                f"**1. CoOp vs zero-shot on novel classes: the finding {verdict}.** Novel accuracy: CoOp "
                f"{coop_novel:.1f} vs zero-shot {zs_novel:.1f} ({coop_novel - zs_novel:+.1f}); base: CoOp "
                f"{coop_base:.1f} vs {zs_base:.1f} ({coop_base - zs_base:+.1f}). CoOp is below zero-shot on novel "
                f"classes on {len(drops)} of {len(datasets)} datasets"
                + (f" ({', '.join(drops)})." if drops else "."),
                "",
            ]
    uni = [m for m in methods if m in UNI_MODAL and avg(m, "hm") is not None]
    multi = [m for m in methods if m in MULTI_MODAL and avg(m, "hm") is not None]
    if uni and multi:
        best_uni = max(uni, key=lambda m: avg(m, "hm"))
        best_multi = max(multi, key=lambda m: avg(m, "hm"))
        mean_uni = statistics.fmean(avg(m, "hm") for m in uni)
        mean_multi = statistics.fmean(avg(m, "hm") for m in multi)
        beaten = [m for m in multi if avg(m, "hm") > avg(best_uni, "hm")]
        best_wins, mean_wins = avg(best_multi, "hm") > avg(best_uni, "hm"), mean_multi > mean_uni
        verdict = ("reproduces" if best_wins and mean_wins else
                   "partly reproduces (the best multi-modal method wins, the multi-modal average does not)"
                   if best_wins else "does NOT reproduce")
        lines += [
            f"**2. Multi-modal vs uni-modal prompts on the harmonic mean: the finding {verdict}.** Best multi-modal: "
            f"{best_multi} {avg(best_multi, 'hm'):.1f}; best uni-modal: {best_uni} {avg(best_uni, 'hm'):.1f}. Mean "
            f"HM of the multi-modal methods {mean_multi:.1f} vs uni-modal {mean_uni:.1f}. Multi-modal methods above "
            f"the best uni-modal one: {', '.join(beaten) if beaten else 'none'}.",
            "",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", type=Path, help="the bench's --output folder")
    p.add_argument("--out", type=Path, help="also write the markdown here")
    args = p.parse_args(argv)
    text = findings(read_rows(args.folder))
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
