#!/usr/bin/env python
"""Two costs the founding-methods issue asks for, beside the per-method table of bench_methods.py:

1. APT's extra compute against deep prompts with the same prompt count, **counted** (not timed) with
   ``torch.utils.flop_counter.FlopCounterMode`` over one forward of both towers (image batch + class texts), and
   one forward + backward; extra = method - zero-shot (the frozen model).
2. CoCoOp's peak memory, our chunked + checkpointed implementation against a naive one that runs all
   ``batch x classes`` text sequences at once (``chunk_size = batch``, no checkpointing), **measured** as peak RSS of
   a fresh subprocess per setting (minus the RSS after the backbone is built).

Usage::

    python benchmarks/bench_apt_cocoop.py --model random:vit-b-16 --out docs/benchmarks_apt_cocoop.md
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch


def _classnames(n: int) -> list[str]:
    return [f"class number {i}" for i in range(n)]


def count_flops(model: str, methods: dict[str, dict], batch: int, classes: int) -> dict[str, dict[str, float]]:
    from torch.utils.flop_counter import FlopCounterMode

    from vlprompt.backbones import load_backbone
    from vlprompt.methods import get_prompt_model

    backbone = load_backbone(model)
    pixels = torch.randn(batch, 3, backbone.image_size, backbone.image_size)
    labels = torch.arange(batch) % classes
    out = {}
    for name, options in methods.items():
        torch.manual_seed(0)
        method = get_prompt_model(backbone, name, _classnames(classes), config=dict(options))
        with FlopCounterMode(display=False) as fwd:
            with torch.no_grad():
                method(pixels)
        trainable = method.num_trainable() > 0
        with FlopCounterMode(display=False) as both:
            loss = method.loss(method(pixels), labels)
            if trainable:
                loss.backward()
        out[name] = {"forward_gflops": fwd.get_total_flops() / 1e9, "train_step_gflops": both.get_total_flops() / 1e9,
                     "trainable": method.num_trainable()}
    return out


def _worker(spec: dict) -> dict:
    """Runs in a fresh process: one CoCoOp training step; returns peak RSS above the post-build baseline."""
    from vlprompt.backbones import load_backbone
    from vlprompt.methods import get_prompt_model

    torch.set_num_threads(2)
    backbone = load_backbone(spec["model"])
    method = get_prompt_model(backbone, "cocoop", _classnames(spec["classes"]), config=spec["options"])
    pixels = torch.randn(spec["batch"], 3, backbone.image_size, backbone.image_size)
    labels = torch.arange(spec["batch"]) % spec["classes"]
    with torch.no_grad():
        feats = method.image_features(pixels)  # frozen tower: the engine caches it; not part of CoCoOp's cost
    _reset_peak()
    base_now = _current_rss_kib()
    saved = _SavedBytes()
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
        loss = method.loss(method(image_feats=feats), labels)
    loss.backward()
    peak = _peak_rss_kib()
    return {"extra_peak_mib": (peak - base_now) / 1024, "peak_mib": peak / 1024,
            "saved_for_backward_mib": saved.total / 2**20}


class _SavedBytes:
    """Bytes of the tensors autograd keeps from the forward for the backward (the part that grows with
    batch x classes); each storage counted once. Checkpointed chunks keep only their inputs."""

    def __init__(self) -> None:
        self.total = 0
        self._seen: set[int] = set()

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self._seen:
            self._seen.add(storage.data_ptr())
            self.total += storage.nbytes()
        return tensor

    def unpack(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor


def _current_rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _peak_rss_kib() -> int:
    """VmHWM (Linux), not ru_maxrss: a subprocess inherits its parent's peak in ru_maxrss, and clear_refs does not
    reset that part, so the worker would report the driver's peak as its own."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _reset_peak() -> None:
    # Linux: writing 5 to clear_refs resets this process's VmHWM to its current RSS.
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def measure_cocoop(model: str, batch: int, classes: int) -> dict[str, dict]:
    settings = {
        "naive (all batch x classes at once, no checkpointing)": {"chunk_size": batch, "checkpoint_chunks": False},
        "chunk 4, checkpointed": {"chunk_size": 4, "checkpoint_chunks": True},
        "vlprompt default (chunk 1, checkpointed)": {"chunk_size": 1, "checkpoint_chunks": True},
    }
    out = {}
    for label, options in settings.items():
        spec = {"model": model, "batch": batch, "classes": classes, "options": options}
        with tempfile.NamedTemporaryFile("r", suffix=".json") as fh:
            subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec), "--result", fh.name], check=True)
            out[label] = {**json.loads(Path(fh.name).read_text()), **options}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="random:vit-b-16")
    parser.add_argument("--prompts", type=int, default=50, help="M for APT and deep prompts")
    parser.add_argument("--flop-batch", type=int, default=8)
    parser.add_argument("--flop-classes", type=int, default=10)
    parser.add_argument("--cocoop-batch", type=int, default=8)
    parser.add_argument("--cocoop-classes", type=int, default=100)
    parser.add_argument("--out", default="docs/benchmarks_apt_cocoop.md")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        Path(args.result).write_text(json.dumps(_worker(json.loads(args.worker))))
        return
    m = args.prompts
    flops = count_flops(
        args.model,
        {"zeroshot": {}, "apt": {"n_prompts": m}, "deep_prompt": {"n_text": m, "n_image": m}},
        args.flop_batch, args.flop_classes,
    )
    memory = measure_cocoop(args.model, args.cocoop_batch, args.cocoop_classes)
    base = flops["zeroshot"]
    command = "python benchmarks/bench_apt_cocoop.py " + " ".join(sys.argv[1:])
    lines = [
        "# APT vs deep prompts (FLOPs), CoCoOp memory", "",
        f"Command: `{command}`  ", f"Date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC; torch {torch.__version__}; "
        f"model `{args.model}` (random weights: FLOPs and memory do not depend on weight values).", "",
        f"## APT vs deep prompts, M = {m} prompts per layer in both towers (counted)", "",
        f"FLOPs counted by `torch.utils.flop_counter.FlopCounterMode` (matrix multiplies, convolutions, attention) for "
        f"{args.flop_batch} images and {args.flop_classes} class texts; *extra* is the method minus the frozen "
        "model (zero-shot).", "",
        "| method | trainable | forward GFLOPs | extra forward GFLOPs | train step GFLOPs (fwd+bwd) | extra vs frozen forward |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name in ("zeroshot", "deep_prompt", "apt"):
        f = flops[name]
        step = f"{f['train_step_gflops']:.2f}" if f["trainable"] else "— (no training step)"
        lines.append(
            f"| {name} | {f['trainable']:,} | {f['forward_gflops']:.2f} | {f['forward_gflops'] - base['forward_gflops']:.2f} | "
            f"{step} | {100 * (f['forward_gflops'] / base['forward_gflops'] - 1):.1f}% |"
        )
    extra_apt = flops["apt"]["forward_gflops"] - base["forward_gflops"]
    extra_deep = flops["deep_prompt"]["forward_gflops"] - base["forward_gflops"]
    lines += ["", f"APT's extra forward compute is {100 * (1 - extra_apt / extra_deep):.1f}% lower than deep "
              f"prompts' at the same prompt count ({extra_apt:.2f} vs {extra_deep:.2f} GFLOPs).", "",
              f"## CoCoOp peak memory: {args.cocoop_batch} images x {args.cocoop_classes} classes (measured)", "",
              "One training step (forward over cached image features + backward), fresh process per row. *Saved for "
              "backward*: bytes of the tensors autograd keeps between forward and backward (counted with "
              "saved-tensor hooks; the part that grows with batch x classes). *Extra peak RSS*: the process's "
              "peak during the step minus its RSS before it (includes one-time library workspaces). During the backward a "
              "checkpointed chunk's activations are recomputed and held one chunk at a time (about the naive "
              "figure x chunk size / batch).", "",
              "| implementation | chunk size | checkpointing | saved for backward (MiB) | extra peak RSS (MiB) |",
              "|---|---:|---|---:|---:|"]
    for label, r in memory.items():
        lines.append(f"| {label} | {r['chunk_size']} | {r['checkpoint_chunks']} | {r['saved_for_backward_mib']:.1f} | "
                     f"{r['extra_peak_mib']:.0f} |")
    text = "\n".join(lines) + "\n"
    Path(args.out).write_text(text)
    Path(args.out).with_suffix(".json").write_text(json.dumps({"flops": flops, "cocoop_memory": memory}, indent=2))
    print(text)


if __name__ == "__main__":
    main()
