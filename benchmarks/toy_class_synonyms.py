"""Zero-shot and 16-shot CoOp on toy datasets whose class names are swapped for the captions' less common synonyms.

Same images, same class order; only the words differ. It asks whether a class vocabulary that pretraining uses less
often leaves more for a learned prompt to add (docs/toyworld.md, "Towards +10 CoOp")::

    python benchmarks/toy_class_synonyms.py --output /tmp/synonyms [--model embedded]

Runs are sequential: the renamed specs live in this process only. The renamed datasets are written under
``OUTPUT/toy``, apart from the suite's own folders.
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from toy_spec_bench import run_changed_specs  # noqa: E402

# Each class name -> a synonym the captions use in 15-40% of its mentions (vlprompt/toyworld/captions.py).
SYNONYMS: dict[str, dict[str, str]] = {
    "shapes": {"circle": "disc", "cross": "plus sign", "star": "five-pointed star", "crescent": "crescent moon",
               "heart": "heart shape"},
    "texture": {"solid": "filled", "dotted": "polka-dot", "checkered": "checkerboard", "outlined": "hollow"},
    "size": {"small": "little", "medium": "medium-sized", "large": "big"},
}


def rename_classes() -> None:
    from vlprompt.toyworld import suite

    for name, synonyms in SYNONYMS.items():
        spec = suite.SUITE[name]
        suite.SUITE[name] = dataclasses.replace(spec, classnames=tuple(synonyms.get(c, c) for c in spec.classnames))


def main(argv: list[str] | None = None) -> int:
    return run_changed_specs(argv, __doc__.splitlines()[0], rename_classes, ("zeroshot", "coop"), list(SYNONYMS),
                             "toy_class_synonyms.py")


if __name__ == "__main__":
    sys.exit(main())
