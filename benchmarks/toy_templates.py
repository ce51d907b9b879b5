"""Zero-shot on the ten main toy datasets with caption-like templates instead of the suite's field-style ones.

Same images, same class names; only the template differs, for the three datasets whose template is phrased unlike
the pretraining captions (fine_shapes: ``a photo of a {}, a type of shape.``, after FGVCAircraft; texture:
``{} texture.``, after DTD; position). It measures how much of CoOp's gain over zero-shot is the hand-written
template's distance from the captions: CoOp (random context initialisation, the toy recipe) never reads the template,
so its accuracy is the same under either (docs/toyworld.md, "How much of CoOp's gain is the template")::

    python benchmarks/toy_templates.py --output /tmp/templates [--model embedded]

Runs are sequential: the changed specs live in this process only. The datasets are written under ``OUTPUT/toy``,
apart from the suite's own folders.
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from toy_spec_bench import run_changed_specs  # noqa: E402

# The suite's template where it is already caption-like; the others in the captions' own phrasing
# (vlprompt/toyworld/captions.py: "a photo of " prefix, "a striped star", "at the top left").
CAPTION_LIKE_TEMPLATES: dict[str, str] = {
    "fine_shapes": "a photo of a {}.",
    "texture": "a photo of a {} object.",
    "position": "a shape at the {}.",
}
MAIN_DATASETS = ("shapes", "fine_shapes", "colours", "combo", "texture", "count", "relation", "position", "size",
                 "background")


def use_caption_like_templates() -> None:
    from vlprompt.toyworld import suite

    for name, template in CAPTION_LIKE_TEMPLATES.items():
        suite.SUITE[name] = dataclasses.replace(suite.SUITE[name], template=template)


def main(argv: list[str] | None = None) -> int:
    return run_changed_specs(argv, __doc__.splitlines()[0], use_caption_like_templates, ("zeroshot",), list(MAIN_DATASETS), "toy_templates.py")


if __name__ == "__main__":
    sys.exit(main())
