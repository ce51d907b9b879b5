#!/usr/bin/env python
"""APT and deep prompts on the public ViLT-B/32 and BridgeTower-base architectures: trainable numbers and extra
forward FLOPs per pair.

APT's paper reports, on ViLT for VQA, APT (M=200 in all 12 blocks) with 1.92M trainable parameters and +0.91 GFLOPs,
and deep prompt tuning with 1.84M and +5.14 GFLOPs; on METER, APT (M=200 in its 24 attention outputs) with 3.83M and
+2.31 GFLOPs, and deep prompts with +13.05 GFLOPs. transformers has no METER; BridgeTower has its co-attention layout
(plus bridge layers), so its rows stand in for METER's. This script builds ``random:vilt-b32`` and
``random:bridgetower-base`` (the public architectures with random weights: FLOPs and counts do not depend on the
weights), one image-text pair of each model's default shapes (ViLT: a 384 x 384 image, 144 patches + the image class
token, 40 text positions; BridgeTower: a 288 x 288 image, 324 patches + the class token, 50 text positions), and
counts the FLOPs of one forward (``torch.utils.flop_counter.FlopCounterMode``: matrix multiplies and attention,
2 FLOPs per multiply-add) of:

- the frozen model;
- APT: the ``ApproximatedPrompts`` module (methods/apt.py) on every attach point of the ``attention_block`` site, M
  prompts per point (ViLT: each block's attention; BridgeTower: the self- and cross-attention of both streams in each
  of its 6 co-attention layers, 24 points);
- deep prompts (the ``joint_sequence`` site): ViLT, M tokens of the joint sequence at every block; BridgeTower, as
  the APT release's METER baseline places them, M tokens per stream at every co-attention layer, keys and values of
  the other stream's cross-attention only (2M tokens per layer).

The trainable counts are the prompt modules' own (the task head, poolers and token-type embeddings the release also
trains are task-side and not counted here).

Usage::

    python benchmarks/fusion_cost.py --out docs/benchmarks/fusion_cost.md     # about a minute on 2 CPU cores
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from vlprompt.backbones import load_backbone
from vlprompt.backbones.base import DeepPrompts
from vlprompt.methods.apt import APTConfig, ApproximatedPrompts


@dataclass
class Costs:
    """One model's frozen forward and, per M, the prompt modules' sizes and extra forward FLOPs."""

    sequence: int
    frozen: int
    rows: list[tuple[int, int, int, int, int]]  # (M, APT trainable, APT extra, deep trainable, deep extra)


# The release's ViLT deep-prompt baseline, read in DoubtedSteam/APT, against the joint_sequence site.
RELEASE_DEEP_PROMPT_NOTE = (
    "The release's ViLT baseline (`ViLT/vilt/modules/vision_transformer_deep_prompt.py`, DoubtedSteam/APT) "
    "appends M fresh tokens at each block, normalises them with the block's LayerNorm and keeps only their "
    'keys and values (their query rows are dropped before the attention and their outputs before the '
    "residual). The text and image tokens' outputs are the same here, since the `joint_sequence` site also "
    "normalises the prompts with the block's LayerNorm and replaces them before the next block (their outputs "
    "never reach a real token); what differs is the work: the site also computes the prompts' queries, "
    "attention outputs and feed-forward, which is thrown away. The release's placement would cost about the "
    'keys and values of M tokens per block plus the attention over M more keys.'
)


def forward_flops(backbone, batch, **sites) -> int:
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        backbone.encode(*batch, **sites)
    return counter.get_total_flops()


def measure(preset: str, prompts: list[int], deep_per_layer: int) -> Costs:
    """``deep_per_layer``: deep-prompt tokens per layer for one M (1 for ViLT's joint sequence; 2 for BridgeTower,
    M per stream)."""
    backbone = load_backbone(preset)
    tokens = backbone.tokenize(["what color is the large circle left of the star?"])
    mask = (torch.arange(tokens.input_ids.shape[1]) < tokens.lengths.unsqueeze(1)).long()
    pixels = torch.zeros(1, 3, backbone.image_size, backbone.image_size)
    batch = (tokens.input_ids, mask, pixels)
    sequence = backbone.encode(*batch)[0].shape[1]
    frozen = forward_flops(backbone, batch)
    points = len(backbone.attach_points())
    rows = []
    for m in prompts:
        apt = ApproximatedPrompts(points, backbone.width, APTConfig(n_prompts=m))
        apt_params = sum(p.numel() for p in apt.parameters())
        apt_extra = forward_flops(backbone, batch, block=apt) - frozen
        deep = [torch.zeros(deep_per_layer * m, backbone.width) for _ in range(backbone.num_layers)]
        deep_params = sum(t.numel() for t in deep)
        deep_extra = forward_flops(backbone, batch, prompts=DeepPrompts(deep)) - frozen
        rows.append((m, apt_params, apt_extra, deep_params, deep_extra))
    return Costs(sequence, frozen, rows)


TOY_METHODS = ("fusion_head", "apt_native", "deep_prompt_native", "lora_native", "full_native")


def method_costs(model: str) -> tuple[int, list[tuple[str, int, int]]]:
    """(the head-only forward's FLOPs, [(method, trainable parameters, extra forward FLOPs over the head-only
    forward)]) of every fusion method with its default options, as the toy results train them (a VQA head of two
    answers: the head's own FLOPs are the same for every method)."""
    from vlprompt.methods import get_prompt_model

    backbone = load_backbone(model)
    tokens = backbone.tokenize(["what colour is the star?"])
    mask = (torch.arange(tokens.input_ids.shape[1]) < tokens.lengths.unsqueeze(1)).long()
    pixels = torch.zeros(1, 3, backbone.image_size, backbone.image_size)
    counts = []
    for name in TOY_METHODS:
        method = get_prompt_model(load_backbone(model), name, ["yes", "no"], "{}").eval()
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            method(tokens.input_ids, mask, pixels)
        counts.append((name, method.num_trainable(), counter.get_total_flops()))
    head_only = counts[0][2]
    return head_only, [(name, params, flops - head_only) for name, params, flops in counts]


def table(costs: Costs, deep_header: str) -> list[str]:
    lines = [
        f"| M | APT trainable | APT extra GFLOPs | {deep_header} trainable | {deep_header} extra GFLOPs | "
        f"APT's extra / {deep_header}'s |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for m, ap, ae, dp, de in costs.rows:
        lines.append(f"| {m} | {ap:,} | +{ae / 1e9:.2f} | {dp:,} | +{de / 1e9:.2f} | {ae / de:.0%} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks/fusion_cost.md"))
    parser.add_argument("--prompts", type=int, nargs="+", default=[50, 200], help="M values to count")
    args = parser.parse_args()

    vilt = measure("random:vilt-b32", args.prompts, deep_per_layer=1)
    bridgetower = measure("random:bridgetower-base", args.prompts, deep_per_layer=2)

    lines = [
        "# APT and deep prompts on ViLT-B/32 and BridgeTower-base: trainable numbers and extra forward FLOPs",
        "",
        "Made by `python benchmarks/fusion_cost.py --out docs/benchmarks/fusion_cost.md` (see the script's docstring for "
        "what is counted). FLOPs of one forward of one image-text pair, counted by "
        "`torch.utils.flop_counter.FlopCounterMode` (2 per multiply-add; matrix multiplies and attention); "
        "architectures with random weights.",
        "",
        "## ViLT-B/32",
        "",
        f"`random:vilt-b32` (ViLT-B/32's config); {vilt.sequence} tokens in the joint sequence (40 text positions, 144 "
        "patches and the image class token of a 384 x 384 image); APT on the 12 blocks' attention outputs; deep "
        "prompts: M tokens of the joint sequence at every block.",
        "",
        f"Frozen ViLT-B/32 forward: **{vilt.frozen / 1e9:.2f} GFLOPs** per pair.",
        "",
        *table(vilt, "deep prompt"),
        "",
        "APT's paper (ViLT, VQA): APT 1.92M trainable, +0.91 GFLOPs; deep prompt 1.84M, +5.14 GFLOPs. The counts here "
        "are the prompt modules' only (12 x (M x 768 + 2 x 4 x 768 + 1) for APT; 12 x M x 768 for deep prompts), "
        "without the task head, pooler and token-type embeddings the release also trains. The trainable counts at "
        "M = 200 match the paper's (1.92M and 1.84M); the FLOPs do not. APT's extra here is the two products "
        "`X K~^T` and `S P` per block (4 T M C FLOPs); in multiply-adds it is half, closer to the paper's 0.91. The "
        "deep prompts here are VPT-style tokens of the joint sequence: they are queries too and pass through every "
        "block's feed-forward layer, which costs 38 GFLOPs at M = 200, far more than the paper's +5.14. "
        + RELEASE_DEEP_PROMPT_NOTE,
        "",
        "## BridgeTower-base (standing in for METER)",
        "",
        f"`random:bridgetower-base` (transformers' `BridgeTowerConfig` defaults: RoBERTa-base and CLIP ViT-B/16 "
        f"towers, 6 co-attention layers of width 768); {bridgetower.sequence} tokens in the final sequence (50 text "
        "positions; 324 patches and the image class token of a 288 x 288 image); APT on the 24 attention outputs "
        "(self- and cross-attention of both streams in each co-attention layer); deep prompts as the release's METER "
        "baseline (`METER/meter/modules/meter_module_prompt.py`): M tokens per stream at every co-attention layer, "
        "keys and values of the other stream's cross-attention only. M counts APT's prompts per attach point and deep "
        "prompts per stream.",
        "",
        f"Frozen BridgeTower-base forward: **{bridgetower.frozen / 1e9:.2f} GFLOPs** per pair.",
        "",
        *table(bridgetower, "deep prompt"),
        "",
        "APT's paper (METER, VQA): APT 3.83M trainable, +2.31 GFLOPs; deep prompt +13.05 GFLOPs. APT's count here, "
        "24 x (M x 768 + 2 x 4 x 768 + 1), is 3.83M at M = 200, the paper's; deep prompts are 6 x 2M x 768 (1.84M at "
        "M = 200 per stream, what the release's two 6 x 200 x 768 tensors hold). APT's extra is 4 T M C FLOPs per "
        "point (T: the stream's tokens) plus its low-rank keys; the deep prompts' extra is the keys and values of 2M "
        "tokens per layer and each stream's attention over M more keys. BridgeTower's bridge layers and 288-pixel "
        "images are not METER's, so the GFLOPs are of the same kind, not the paper's numbers.",
    ]
    head_only, toy = method_costs("embedded-vilt")
    lines += [
        "",
        "## The shipped toy ViLT (`embedded-vilt`), per method",
        "",
        "Each fusion method as `vlprompt bench --protocols full` trains it on the toy sets (default options: M = 50 "
        "APT prompts per block, 50 deep prompts, LoRA rank 4 on q and v), on one question-image pair of the toy "
        f"model's shapes (32 text positions, a 48 x 48 image in 16 patches); the head-only forward: "
        f"{head_only / 1e6:.2f} MFLOPs. Trainable parameters with a VQA head of 2 answers (the head grows with the "
        "answer vocabulary; `vlprompt params --model embedded-vilt --num-classes N` for another).",
        "",
        "| method | trainable | extra MFLOPs per pair over the head-only forward |",
        "|---|---:|---:|",
        *(f"| {name} | {params:,} | +{extra / 1e6:.2f} |" for name, params, extra in toy),
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
