"""Shared runner of the toy-suite experiments that change dataset specs in this process only
(toy_class_synonyms.py, toy_templates.py): parse ``--output`` / ``--model``, keep the changed datasets apart from the
suite's own folders, change the specs, and run the bench in-process (workers would not see the changed specs)."""
from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Sequence
from pathlib import Path


def run_changed_specs(argv: list[str] | None, description: str, change_specs: Callable[[], None],
                      methods: Sequence[str], datasets: Sequence[str], script: str) -> int:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--output", required=True, help="folder for the changed datasets and the bench")
    parser.add_argument("--model", default="embedded")
    args = parser.parse_args(argv)
    output = Path(args.output)
    os.environ["VLPROMPT_TOY_ROOT"] = str(output / "toy")
    change_specs()
    from vlprompt.cli import main as cli

    return cli(["bench", "--methods", *methods, "--datasets", *(f"toy:{n}" for n in datasets),
                "--shots", "16", "--seeds", "1", "--model", args.model, "--recipe", "toy",
                "--output", str(output / "bench"), "--command-line",
                f"python benchmarks/{script} --output {args.output} --model {args.model}"])
