#!/usr/bin/env python
"""Does the data path keep up with the training step? Images per second of loading + decoding + training
augmentation, against the images per second a training step consumes, ViT-B/16 at 224 px.

Data path: JPEG files on disk -> ``vlprompt.data.ImageDataset`` (PIL open + decode, RGB) -> the engine's training
transform ``TrainTransform`` (CoOp's RandomResizedCrop + flip, bicubic, to a normalised tensor; the ViT-B/16 CLIP
preprocessing: 224 px, OpenAI mean/std) -> a torch ``DataLoader`` (shuffled batches, ``num_workers`` 0, 1, 2, ...,
persistent workers, ``pin_memory`` when CUDA is available). No dataset ships with the project, so the images are
generated: ``--images`` JPEG files of ``--image-size`` (default 500x375, the typical size of the CoOp datasets'
photos: Caltech101, OxfordPets, ImageNet's median) with smooth random content plus noise, quality 90, in a
temporary folder. Each worker setting reads ``--epochs`` passes over them; the first pass is a warm-up (worker
start, file cache); the others are timed.

Training step: ``benchmarks/step_time.py``'s measurement (the engine's ``run_training_step``, fresh process, random
pixels) for ``--step-methods`` on ``random:vit-b-16`` at ``--step-batch``, fp32, on this machine.

Usage::

    python benchmarks/data_path.py                      # writes docs/benchmarks/data_path.md and .json
    python benchmarks/data_path.py --images 32 --epochs 2 --workers 0 1 --step-methods coop --step-model random:tiny \\
        --step-steps 1 --step-warmup 0 --out /tmp/data_path.md          # smoke run (seconds)
"""
from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
DEFAULT_OUT = REPO_ROOT / "docs" / "benchmarks" / "data_path.md"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------------------------- images
def write_jpegs(folder: Path, n: int, width: int, height: int, seed: int = 0, quality: int = 90) -> list[Path]:
    """``n`` JPEG files of ``width`` x ``height``: a smooth random colour field (a low-resolution random image
    upsampled bicubically) plus pixel noise, so they compress like photographs rather than like noise or flat
    colour."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        coarse = rng.integers(0, 256, size=(height // 25 + 1, width // 25 + 1, 3), dtype=np.uint8)
        smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC), dtype=np.int16)
        noisy = np.clip(smooth + rng.normal(0, 12, size=smooth.shape), 0, 255).astype(np.uint8)
        path = folder / f"img_{i:05d}.jpg"
        Image.fromarray(noisy).save(path, quality=quality)
        paths.append(path)
    return paths


# --------------------------------------------------------------------------------------------- data path
def measure_loader(paths: list[Path], workers: int, batch_size: int, epochs: int, size: int,
                   seed: int = 0) -> dict[str, Any]:  # fmt: skip
    """Images/s of the loader over ``epochs`` passes (the first is a warm-up and not timed)."""
    import torch
    from torch.utils.data import DataLoader

    from vlprompt.data import ImageTransformConfig, TrainTransform
    from vlprompt.data.datasets import ImageDataset, Sample
    from vlprompt.tasks.classification import OPENAI_MEAN, OPENAI_STD

    torch.manual_seed(seed)
    cfg = ImageTransformConfig(size=size, mean=OPENAI_MEAN, std=OPENAI_STD)
    samples = [Sample(path=p, label=i % 10, classname=str(i % 10)) for i, p in enumerate(paths)]
    dataset = ImageDataset(samples, TrainTransform(cfg))
    pin = torch.cuda.is_available()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                        persistent_workers=workers > 0, pin_memory=pin)  # fmt: skip
    t0 = time.perf_counter()
    epoch_s, first_batch_s = [], None
    shape = None
    for epoch in range(epochs):
        t = time.perf_counter()
        n = 0
        for pixels, _labels in loader:
            if first_batch_s is None:
                first_batch_s = time.perf_counter() - t0
            n += pixels.shape[0]
            shape = list(pixels.shape)
        epoch_s.append(time.perf_counter() - t)
        assert n == len(paths)
    timed = epoch_s[1:] or epoch_s
    rate = len(paths) * len(timed) / sum(timed)
    del loader
    return {"workers": workers, "pin_memory": pin, "batch_size": batch_size, "epochs": epochs,
            "epoch_s": epoch_s, "timed_epochs": len(timed), "images_per_s": rate, "first_batch_s": first_batch_s,
            "batch_shape": shape}


def measure_parts(paths: list[Path], size: int, threads: int, repeats: int = 1) -> dict[str, float]:
    """In this process with ``threads`` torch threads: decode only (open + RGB), and augmentation only (on decoded
    images), in images/s. (DataLoader workers run with 1 torch thread; the training process with many.)"""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    from vlprompt.data import ImageTransformConfig, TrainTransform
    from vlprompt.data.datasets import open_image
    from vlprompt.tasks.classification import OPENAI_MEAN, OPENAI_STD

    transform = TrainTransform(ImageTransformConfig(size=size, mean=OPENAI_MEAN, std=OPENAI_STD))
    t = time.perf_counter()
    images = [open_image(p) for _ in range(repeats) for p in paths]
    decode = len(images) / (time.perf_counter() - t)
    torch.manual_seed(0)
    t = time.perf_counter()
    for im in images:
        transform(im)
    augment = len(images) / (time.perf_counter() - t)
    torch.set_num_threads(before)
    return {"torch_threads": threads, "decode_images_per_s": decode, "augment_images_per_s": augment,
            "decode_plus_augment_images_per_s": 1 / (1 / decode + 1 / augment)}


def step_bound(model: str, size: int, threads: int) -> dict[str, Any]:
    """The most images/s a step could consume if it ran at the CPU's fp32 peak: counted FLOPs of U (frozen image
    tower forward + activation backward) and of the image forward alone, one image, against the peak."""
    import torch

    from vlprompt.backbones import load_backbone
    from vlprompt.engine import speed

    backbone = load_backbone(model)
    pixels = torch.randn(1, 3, size, size, requires_grad=True)
    _, u_flops = speed.count_flops(lambda: backbone.encode_image(pixels).sum().backward())
    with torch.no_grad():
        _, fwd_flops = speed.count_flops(lambda: backbone.encode_image(pixels))
    peak = speed.device_peak("cpu", "fp32", threads)
    out = {"u_flops_per_image": u_flops, "forward_flops_per_image": fwd_flops, "peak_flops_per_s": peak.flops_per_s,
           "peak_source": peak.source}
    if peak.flops_per_s:
        out["u_images_per_s_at_peak"] = peak.flops_per_s / u_flops
        out["forward_images_per_s_at_peak"] = peak.flops_per_s / fwd_flops
    return out


# --------------------------------------------------------------------------------------------- report
def render_markdown(result: dict[str, Any]) -> str:
    meta, loaders, parts, steps = result["_meta"], result["loader"], result["parts"], result["step"]
    need = max((s["images_per_s"] for s in steps.values() if s.get("images_per_s")), default=None)
    lines = [
        *_load("step_time").report_header("Data path vs training step (ViT-B/16, 224 px)", meta),
        f"- CPU: {meta['cpu']} ({meta['cpu_count']} logical CPUs visible, {meta['physical_cores']} physical cores); "
        f"CUDA: {meta['cuda'] or 'none'}",
        f"- torch {meta['torch']}, Pillow {meta['pillow']}, Python {meta['python']}",
        f"- images: {meta['images']} generated JPEG files of {meta['image_size']} px (smooth random colour field + "
        f"noise, quality 90, mean {meta['mean_file_kb']:.0f} KB), written to a temporary folder for this run "
        "(no dataset ships with the project)",
        f"- data path: `ImageDataset` (PIL open + decode to RGB) + `TrainTransform` (RandomResizedCrop "
        f"{meta['crop']} px bicubic + flip + normalise with OpenAI CLIP's mean/std) through a torch `DataLoader`, "
        f"batch {meta['loader_batch']}, shuffled, persistent workers, pin_memory "
        f"{'on' if meta['cuda'] else 'off (no CUDA)'}; {meta['epochs']} passes per setting, the first untimed",
        f"- training step: `benchmarks/step_time.py`'s measurement (the engine's `run_training_step`, random pixels, "
        f"fresh process), `{meta['step_model']}`, batch {meta['step_batch']}, fp32, {meta['step_threads']} torch "
        f"threads, median of {meta['step_steps']} step(s) after {meta['step_warmup']} warm-up",
        f"- other CPU use during the run (other processes; 0 = quiet): {meta['other_cpu_use']}",
        "",
        "## Data path",
        "",
        "| DataLoader workers | images/s | first batch after | " + (
            "vs fastest step consumption |" if need else "|"),
        "|---:|---:|---:|" + ("---:|" if need else ""),
    ]
    for r in loaders:
        row = f"| {r['workers']} | {r['images_per_s']:,.1f} | {r['first_batch_s']:.2f} s |"
        if need:
            row += f" {r['images_per_s'] / need:.1f}x |"
        lines.append(row)
    lines += [
        "",
        f"0 workers load in the main process with its {meta['step_threads']} torch threads (as in a training "
        "process); workers use 1 torch thread each. The parts, in this process:",
        "",
        "| torch threads | decode (open + RGB) | augmentation (crop, resize, flip, to tensor, normalise) | together |",
        "|---:|---:|---:|---:|",
    ]
    for part in parts:
        lines.append(f"| {part['torch_threads']} | {part['decode_images_per_s']:,.1f} images/s | "
                     f"{part['augment_images_per_s']:,.1f} images/s | {part['decode_plus_augment_images_per_s']:,.1f} "
                     "images/s |")
    lines += [
        "",
        "## Training step (what the data path has to feed)",
        "",
        "| method | step (median) | images/s consumed | notes |",
        "|---|---:|---:|---|",
    ]
    for name, s in steps.items():
        if "error" in s:
            lines.append(f"| {name} | error: {s['error']} | | |")
        else:
            lines.append(f"| {name} | {s['step_s']:.2f} s | {s['images_per_s']:,.2f} | {s.get('notes', '')} |")
    bound = result.get("bound")
    if bound and bound.get("u_images_per_s_at_peak"):
        lines += [
            "",
            f"Upper bound from arithmetic: one image costs {bound['u_flops_per_image'] / 1e9:.1f} GFLOP in U (frozen "
            f"image tower forward + activation backward: any method that prompts the image tower) and "
            f"{bound['forward_flops_per_image'] / 1e9:.1f} GFLOP in the image forward alone (CoOp without cached "
            f"features), counted by FlopCounterMode. At this CPU's fp32 peak ({bound['peak_source']}) a step could "
            f"consume at most {bound['u_images_per_s_at_peak']:.2f} images/s (U) or "
            f"{bound['forward_images_per_s_at_peak']:.2f} images/s (forward only), however quiet the machine.",
        ]
    if any(s.get("from") for s in steps.values()):
        lines += ["", "Training-step records taken from an earlier run of this script: "
                  + ", ".join(f"{n} ({s['from']})" for n, s in steps.items() if s.get("from")) + "."]
    lines += ["", "## Reading", "", result["reading"], ""]
    return "\n".join(lines)


def reading(result: dict[str, Any]) -> str:
    loaders, steps = result["loader"], result["step"]
    rates = [s["images_per_s"] for s in steps.values() if s.get("images_per_s")]
    if not rates:
        return "No training step was measured."
    need = max(rates)
    parts = []
    for r in sorted(loaders, key=lambda r: r["workers"]):
        ratio = r["images_per_s"] / need
        verdict = "keeps up" if ratio >= 1 else "does NOT keep up"
        parts.append(f"{r['workers']} worker(s): {r['images_per_s']:,.1f} images/s = {ratio:,.1f}x the step's need, "
                     f"{verdict}; loading then costs about {100 / ratio:.1f}% of the step's time on the same cores")
    bound = result.get("bound") or {}
    extra = ""
    if bound.get("forward_images_per_s_at_peak"):
        slowest = min(r["images_per_s"] for r in loaders)
        extra = (f" Even at 100% of the CPU's fp32 peak a step could take at most "
                 f"{bound['forward_images_per_s_at_peak']:.1f} images/s (image forward only) and the slowest loader "
                 f"setting supplies {slowest:,.1f}: the data path "
                 + ("keeps up on this CPU whatever the load." if slowest >= bound["forward_images_per_s_at_peak"]
                    else "could fall behind a step that ran near peak."))
    return (f"The fastest measured step consumes {need:,.2f} images/s. " + "; ".join(parts) + "." + extra + " On this machine "
            "loader workers and the step share the same cores, so workers move the loading work off the step's "
            "critical path but do not add CPU capacity.")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--image-size", default="500x375", help="WIDTHxHEIGHT of the generated JPEG files")
    p.add_argument("--crop", type=int, default=224, help="training crop (ViT-B/16: 224)")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--batch-size", type=int, default=32, help="loader batch")
    p.add_argument("--epochs", type=int, default=3, help="passes per worker setting; the first is not timed")
    p.add_argument("--step-model", default="random:vit-b-16")
    p.add_argument("--step-methods", nargs="*", default=["coop", "vpt_deep"])
    p.add_argument("--step-batch", type=int, default=32)
    p.add_argument("--step-steps", type=int, default=2)
    p.add_argument("--step-warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2, help="torch threads of the training-step process")
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--steps-from", type=Path, default=None,
                   help="take the training-step records from this earlier data_path JSON instead of measuring them")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)

    import PIL
    import torch

    helpers = _load("bench_methods")
    step_time = _load("step_time")
    width, height = (int(v) for v in args.image_size.lower().split("x"))
    start = time.perf_counter()
    counters = helpers.cpu_counters()
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        paths = write_jpegs(Path(tmp), args.images, width, height)
        print(f"[data_path] wrote {len(paths)} JPEG files in {time.perf_counter() - t:.1f} s", file=sys.stderr)
        mean_kb = statistics.mean(p.stat().st_size for p in paths) / 1024
        torch.set_num_threads(args.threads)  # the training process's setting; 0 workers load in it
        parts = [measure_parts(paths, args.crop, n) for n in dict.fromkeys([1, args.threads])]
        print(f"[data_path] parts: {parts}", file=sys.stderr, flush=True)
        loaders = []
        for w in args.workers:
            r = measure_loader(paths, w, args.batch_size, args.epochs, args.crop)
            print(f"[data_path] {w} worker(s): {r['images_per_s']:,.1f} images/s", file=sys.stderr, flush=True)
            loaders.append(r)

    steps: dict[str, dict[str, Any]] = {}
    saved = None
    model = args.step_model
    if args.step_methods and model.startswith("random:"):
        from vlprompt.backbones.presets import PRESETS, save_random_clip

        if model[len("random:"):] in PRESETS:
            saved = tempfile.TemporaryDirectory()
            save_random_clip(saved.name, model[len("random:"):], seed=0)
            model = saved.name
    earlier = json.loads(args.steps_from.read_text())["step"] if args.steps_from else {}
    for name in args.step_methods:
        if name in earlier:
            steps[name] = {**earlier[name], "from": str(args.steps_from)}
            print(f"[data_path] step {name}: from {args.steps_from}", file=sys.stderr)
            continue
        spec = {"what": "step", "method_name": name, "precision": "fp32", "model": model,
                "batch_size": args.step_batch, "num_classes": 10, "steps": args.step_steps,
                "warmup": args.step_warmup, "threads": args.threads, "seed": 0, "flops": False}
        print(f"[data_path] step {name} ...", file=sys.stderr, flush=True)
        r = step_time.run_isolated(spec, args.timeout)
        if "error" not in r:
            r["images_per_s"] = args.step_batch / r["step_s"]
            print(f"[data_path]   {r['step_s']:.2f} s = {r['images_per_s']:.2f} images/s", file=sys.stderr)
        else:
            print(f"[data_path]   FAILED: {r['error']}", file=sys.stderr)
        r["model"] = args.step_model
        steps[name] = r
    bound = None
    if args.step_model.startswith("random:") or saved is not None:
        bound = step_bound(model, args.crop, args.threads)
    if saved is not None:
        saved.cleanup()
    wall = time.perf_counter() - start
    from vlprompt.engine import speed

    physical = speed.physical_cores()
    other = helpers.other_cpu_use(counters, helpers.cpu_counters(), wall)
    meta = {
        "command": "python benchmarks/data_path.py" + ("" if not argv else " " + shlex.join(argv)),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": helpers.cpu_model_name(), "cpu_count": os.cpu_count(), "physical_cores": physical,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__, "pillow": PIL.__version__, "python": platform.python_version(),
        "images": args.images, "image_size": f"{width}x{height}", "mean_file_kb": mean_kb, "crop": args.crop,
        "loader_batch": args.batch_size, "epochs": args.epochs, "step_model": args.step_model,
        "step_batch": args.step_batch, "step_steps": args.step_steps, "step_warmup": args.step_warmup,
        "step_threads": args.threads, "wall_s": wall,
        "other_cpu_use": None if other is None else round(other, 2),
    }
    result: dict[str, Any] = {"loader": loaders, "parts": parts, "step": steps, "bound": bound, "_meta": meta}
    result["reading"] = reading(result)
    out = args.out
    json_out = args.json or out.with_suffix(".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_markdown(result) + "\n", encoding="utf-8")
    json_out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"[data_path] wrote {out} and {json_out} in {wall:.0f} s", file=sys.stderr)
    return 1 if any("error" in s for s in steps.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
