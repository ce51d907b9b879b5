#!/usr/bin/env python
"""Seconds per training step on the embedded toy CLIP, at a given torch thread count (bench-sizing microbenchmark).

CoCoOp on toy_combo (batch 32 x 100 classes through the text tower), MaPLe and VPT-deep on toy_shapes (batch 32).
Run it with 2 threads, then 1, then two 1-thread copies at once, to see whether parallel jobs or intra-op threads use
the cores better::

    python benchmarks/toy_step_threads.py 2
    python benchmarks/toy_step_threads.py 1
    python benchmarks/toy_step_threads.py 1 & python benchmarks/toy_step_threads.py 1; wait

Never run it next to another torch job: oversubscribed OpenMP threads slow both by an order of magnitude.
"""
from __future__ import annotations

import sys
import time

import torch


def step_seconds(threads: int) -> dict[str, float]:
    torch.set_num_threads(threads)
    from vlprompt.backbones import load_backbone
    from vlprompt.methods import get_prompt_model
    from vlprompt.toyworld.suite import SUITE

    backbone = load_backbone("embedded")
    seconds = {}
    for method, dataset in (("cocoop", "combo"), ("maple", "shapes"), ("vpt_deep", "shapes")):
        names = list(SUITE[dataset].classnames)
        model = get_prompt_model(backbone, method, names)
        pixels = torch.randn(32, 3, backbone.image_size, backbone.image_size)
        labels = torch.randint(0, len(names), (32,))
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

        def step() -> None:
            if method == "cocoop":  # its image tower is frozen and unprompted: features without gradients
                with torch.no_grad():
                    feats = backbone.encode_image(pixels)
                logits = model(image_feats=feats)
            else:
                logits = model(pixel_values=pixels)
            loss = torch.nn.functional.cross_entropy(logits, labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

        step()  # warm-up
        repeats = 2 if method == "cocoop" else 10
        start = time.perf_counter()
        for _ in range(repeats):
            step()
        seconds[method] = (time.perf_counter() - start) / repeats
    return seconds


if __name__ == "__main__":
    threads = int(sys.argv[1]) if len(sys.argv) > 1 else torch.get_num_threads()
    print(threads, {k: round(v, 3) for k, v in step_seconds(threads).items()}, flush=True)
