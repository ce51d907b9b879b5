"""Training recipes of the bench on the embedded default (toy suite + toy CLIP), one per method.

The papers' recipes (SGD, 2..200 epochs on ViT-B/16) are in configs/; these are sized for the small toy CLIP on
a 2-core CPU. Augmentation is off: random crops and flips would change the answer of the position and relation
datasets (left/right, top/bottom).
"""
from __future__ import annotations

from vlprompt.protocols.runner import Recipe

TOY_DEFAULT_TRAIN = {
    "epochs": 10, "batch_size": 32, "optimizer": "adamw", "weight_decay": 0.0, "warmup_epochs": 0,
    "augment": False, "eval_batch_size": 256,
}
# Epochs per shot count for every method (empty: TOY_DEFAULT_TRAIN's 10 epochs at every shot count). CoOp's paper
# schedule (200 epochs at 16 shots) gave 16-shot CoOp on the toy suite +0.3 points for 20x the time
# (docs/toyworld.md), and would put the full bench far over its time budget.
TOY_EPOCHS_BY_SHOTS: dict[int, int] = {}
TOY_RECIPES: dict[str, Recipe] = {
    "coop": Recipe(train={"lr": 0.005}),
    "cocoop": Recipe(train={"lr": 0.005}),
    "vpt_shallow": Recipe(train={"lr": 0.01}),
    "vpt_deep": Recipe(train={"lr": 0.01}),
    "ivlp": Recipe(train={"lr": 0.005}),
    "maple": Recipe(train={"lr": 0.005}),
    "upt": Recipe(train={"lr": 0.002}),
    "sdpt": Recipe(train={"lr": 0.01}, method_options={"init_scale": 0.1}),
    "dpt": Recipe(train={"lr": 0.002}),
    "apt": Recipe(train={"lr": 0.005}, method_options={"n_prompts": 16}),
    "deep_prompt": Recipe(train={"lr": 0.005}, method_options={"n_text": 16, "n_image": 16}),
}
