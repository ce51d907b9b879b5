"""The main job on the embedded default: zero-shot versus tuned prompts, with no download.

The embedded default is the small CLIP shipped in ``vlprompt/assets/toyclip`` (pretrained on the procedural toy
world by ``vlprompt pretrain-toy``) and the toy suite (``toy:<name>`` datasets, generated on first use). The demo
is a short few-shot bench (16 shots, one seed) over a few methods and datasets; every number it prints is computed
in the run. ``pretrain_tiny_clip`` (a seconds-long stand-in model on a generated EuroSAT-layout set) serves tests.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from vlprompt.backbones import load_backbone
from vlprompt.backbones.presets import save_random_clip
from vlprompt.data import ImageDataset, build_transform, load_dataset
from vlprompt.data.synthetic import make_synthetic_eurosat
from vlprompt.engine.api import transform_config
from vlprompt.engine.trainer import seed_everything

def pretrain_tiny_clip(out_dir: Path, work_dir: Path, steps: int = 100, seed: int = 0) -> Path:
    """Contrastively pretrain a tiny CLIP on bare class names of generated images, and save it as a model folder."""
    return pretrain_tiny_model(out_dir, work_dir, steps, seed, preset="tiny")


# SigLIP's published initialisation of its learned temperature and bias (t' = log 10, b = -10): transformers starts a
# random SigLIP at temperature 1 and bias 0, where its sigmoid loss barely separates classes.
SIGMOID_INIT = {"logit_scale": math.log(10.0), "logit_bias": -10.0}


def pretrain_tiny_model(out_dir: Path, work_dir: Path, steps: int = 100, seed: int = 0, preset: str = "tiny") -> Path:
    """Pretrain a tiny dual encoder (CLIP ``tiny`` or SigLIP ``siglip-tiny``) on bare class names of generated images
    with its family's own loss (softmax cross-entropy or sigmoid), and save it as a model folder."""
    seed_everything(seed)
    if preset.startswith("siglip"):
        from vlprompt.backbones.siglip_presets import save_random_siglip

        save_random_siglip(out_dir, preset, seed)
    else:
        save_random_clip(out_dir, preset, seed=seed)
    backbone = load_backbone(str(out_dir))
    pool_root = make_synthetic_eurosat(work_dir / "pretrain_pool", per_split=(40, 0, 0), seed=seed + 1)
    pool = load_dataset("eurosat", pool_root)
    dataset = ImageDataset(pool.train, build_transform(transform_config(backbone), train=False))
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    labels = torch.tensor([s.label for s in pool.train])
    model = backbone.model
    if backbone.info.scoring == "sigmoid":
        with torch.no_grad():
            model.logit_scale.fill_(SIGMOID_INIT["logit_scale"])
            model.logit_bias.fill_(SIGMOID_INIT["logit_bias"])
    model.requires_grad_(True)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(images), (32,), generator=generator)
        logits = backbone.score(backbone.encode_image(images[idx]), backbone.encode_texts(list(pool.classnames)))
        loss = backbone.loss(logits, labels[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    model.save_pretrained(out_dir)
    return out_dir


DEMO_METHODS = ["zeroshot", "linear_probe", "coop", "vpt_deep", "maple", "sdpt"]
DEMO_DATASETS = ["toy:shapes", "toy:colours", "toy:count", "toy:texture"]


def run_demo(output: Path, quick: bool = False, log=print) -> list[dict]:
    """Few-shot (16 shots, seed 1) zero-shot vs tuned prompts on the embedded default; prints the table."""
    from vlprompt.protocols.report import markdown_report
    from vlprompt.protocols.runner import BenchConfig, run_bench

    output = Path(output)
    if output.exists() and not output.is_dir():  # else a NotADirectoryError traceback when the data is written
        raise ValueError(f"--output {output} is a file, not a folder: give a folder for the demo")
    config = BenchConfig(  # the model's own recipe (the embedded model carries "toy"); run_bench prints it
        methods=DEMO_METHODS[:3] if quick else DEMO_METHODS,
        datasets=DEMO_DATASETS[:2] if quick else DEMO_DATASETS,
        protocols=["fewshot"], shots=[16], seeds=[1], model="embedded", data_root=str(output / "data"),
        output=str(output / "bench"), default_train={"epochs": 2} if quick else {},
    )
    rows = run_bench(config, log=log)
    log(markdown_report(rows, config.methods, title="vlprompt demo: embedded toy CLIP, 16-shot, seed 1"))
    return rows
