"""One method under variants of its recipe, each a small bench on the embedded model; prints one table.

    python benchmarks/recipe_sweep.py benchmarks/recipe_sweeps/coop_shapes.json --output /tmp/sweep

The JSON file names the method, datasets, shots and seeds, and the variants: each a change to the model's own
recipe (``train`` options and ``method_options``). Finished runs in --output are reused on a rerun.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def run_variant(plan: dict, name: str, change: dict, output: Path) -> dict[tuple[str, int], float]:
    from vlprompt.protocols.runner import BenchConfig, run_bench
    from vlprompt.recipes import Recipe

    method = plan["method"]
    config = BenchConfig(
        methods=[method], datasets=plan["datasets"], shots=plan["shots"], seeds=plan["seeds"],
        model=plan.get("model", "embedded"), output=str(output / name), workers=plan.get("workers", 1),
        recipes={method: Recipe(train=change.get("train", {}), method_options=change.get("method_options", {}))},
    )
    rows = run_bench(config, log=lambda _: None)
    return {(row["eval_dataset"], row["seed"]): row["accuracy"] for row in rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("plan", type=Path, help="the sweep's JSON file")
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args()
    plan = json.loads(args.plan.read_text())
    seeds = plan["seeds"]
    print(f"| variant | change | {' | '.join(f'{d} seed {s}' for d in plan['datasets'] for s in seeds)} | mean |")
    print("|---|---|" + "---:|" * (len(plan["datasets"]) * len(seeds) + 1))
    for name, change in plan["variants"].items():
        accuracy = run_variant(plan, name, change, args.output)
        values = [accuracy[(d, s)] for d in plan["datasets"] for s in seeds]
        cells = " | ".join(f"{v:.1f}" for v in values)
        print(f"| {name} | {change.get('note', '')} | {cells} | {sum(values) / len(values):.2f} |", flush=True)


if __name__ == "__main__":
    main()
