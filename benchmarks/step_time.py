#!/usr/bin/env python
"""Training-step time of every method relative to U, in fp32 and bf16, with peak memory; CoOp at 1,000 classes.

U is the unavoidable cost of a prompt method that changes the image tower: one forward of the frozen image tower
plus the backward of its activations (the input requires a gradient, so the backward runs through every layer;
no parameter gradient, no optimiser step), at the same batch size and precision. Each registered method's step is
the trainer's own step, ``vlprompt.engine.trainer.run_training_step``: the method's ``training_step`` under the
accelerator's autocast (text features computed once outside the step when the method leaves the text tower alone;
the text tower cut at the last end-of-text token, as the adapter always does), ``zero_grad``, ``backward``, the
optimiser step (engine defaults: SGD, lr 0.002, momentum 0.9, weight decay 5e-4), ``loss.item()`` and the accuracy
count. Training augmentation is on (the engine's default), so image features are never cached. Every (method,
precision) and every U runs in a fresh Python process, so peak memory (peak RSS; CUDA: max allocated) is its own.

Usage::

    python benchmarks/step_time.py                                   # random:vit-b-16, writes docs/benchmarks/
    python benchmarks/step_time.py --model random:tiny --steps 2 --warmup 0 --coop-classes 50 --coop-batch 4 \\
        --out /tmp/step_time.md                                      # smoke run (every method: minutes)
    python benchmarks/step_time.py --model random:tiny --method coop --precisions fp32 --steps 1 --warmup 0 \\
        --coop-classes 0 --compile none --out /tmp/step_time.md    # quick smoke run (U and CoOp; tests/test_speed.py)
    python benchmarks/step_time.py --batch-size 256 --precisions bf16 --method coop --method vpt_deep \\
        --method maple --coop-classes 0 --steps 10 --warmup 3 --compile default   # GPU: compiled towers

Every record also has images/s, the FLOPs of one eager pass counted by ``torch.utils.flop_counter.FlopCounterMode``
(matmul, convolution, attention; forward + backward), the achieved FLOP/s and its fraction of the device's peak for
the precision (``vlprompt.engine.speed.device_peak``: NVIDIA datasheet figures, dense; on a CPU fp32 from
/proc/cpuinfo and a stated FLOPs-per-cycle assumption; no fraction where the peak is unknown). ``--compile MODE``
compiles the towers' encoder layers (``vlprompt.engine.speed.compile_towers``); the warm-up steps, which compile,
are not timed with the steps but reported as ``warmup_s``.

Writes ``--out`` (markdown) and ``--json`` (default: ``--out`` with ``.json``): one key per method with
``fp32_over_U``, ``bf16_over_U`` (each precision's step over the same precision's U), ``peak_mb`` (fp32 process peak)
and the raw records; ``_U``, ``_coop_large`` and ``_meta`` hold U, the CoOp many-class run and the run's details.
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
import subprocess
import sys
import tempfile
import time
from itertools import product
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
DEFAULT_OUT = REPO_ROOT / "docs" / "benchmarks" / "step_time.md"
CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
PRECISIONS = ("fp32", "bf16")


def _helpers():
    """bench_methods.py's memory and CPU-use helpers (one implementation for both benchmarks)."""
    spec = importlib.util.spec_from_file_location("bench_methods", HERE / "bench_methods.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def class_names(n: int) -> list[str]:
    """CIFAR-10's names for up to 10 classes; beyond, distinct three-word names made of them (1000 = 10^3), so a
    many-class run has realistic multi-token names rather than "class 123"."""
    if n <= len(CIFAR10):
        return CIFAR10[:n]
    if n > len(CIFAR10) ** 3:
        raise ValueError(f"at most {len(CIFAR10) ** 3} classes")
    return [f"{a} {b} {c}" for a, b, c in product(CIFAR10, repeat=3)][:n]


# --------------------------------------------------------------------------------------------- measurement
class _Setup:
    """Backbone, accelerator and memory baseline of one measurement process."""

    def __init__(self, model: str, precision: str, threads: int | None, seed: int, reset_peak: bool,
                 tf32: bool = False) -> None:
        import torch

        from vlprompt.backbones import load_backbone
        from vlprompt.engine import speed
        from vlprompt.engine.trainer import make_accelerator

        self.h = _helpers()
        if threads is not None:
            torch.set_num_threads(threads)
        self.tf32 = tf32
        if tf32:
            speed.set_tf32(True)  # explicit option only: TF32 changes fp32 matmul numerics
        torch.manual_seed(seed)
        self.accelerator = make_accelerator(precision)
        self.device = self.accelerator.device
        self.cuda = self.device.type == "cuda"
        t0 = time.perf_counter()
        self.backbone = load_backbone(model).to(self.device)
        with torch.no_grad():  # weights loaded from a folder are mapped, not read: make them resident before the
            for tensor in [*self.backbone.model.parameters(), *self.backbone.model.buffers()]:  # baseline below,
                tensor.sum()  # or the first forward's page-ins would count as the method's extra memory
        self.build_s = time.perf_counter() - t0
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base_cuda = torch.cuda.memory_allocated()
        self.build_peak_kib = self.h.peak_rss_kib()
        self.rss_after_build = self.h.current_rss_kib()
        self.peak_was_reset = self.h.reset_peak_rss() if reset_peak else False
        self.counters, self.clock = self.h.cpu_counters(), time.perf_counter()
        self.generator = torch.Generator().manual_seed(seed)

    def sync(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()

    def batch(self, batch_size: int, num_classes: int):
        import torch

        size = self.backbone.image_size
        pixels = torch.randn(batch_size, 3, size, size, generator=self.generator)
        labels = torch.randint(num_classes, (batch_size,), generator=self.generator)
        return pixels.to(self.device), labels.to(self.device)

    def finish(self, record: dict[str, Any]) -> dict[str, Any]:
        import torch

        if self.cuda:
            record["memory_kind"] = "cuda_max_memory_allocated"
            record["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
            record["extra_peak_mb"] = (torch.cuda.max_memory_allocated() - self.base_cuda) / 2**20
        else:
            end_peak = self.h.peak_rss_kib()
            record["memory_kind"] = "peak_rss"
            record["peak_mb"] = max(end_peak, self.build_peak_kib if not self.peak_was_reset else 0) / 1024
            record["extra_peak_mb"] = max(0, end_peak - self.rss_after_build) / 1024
        record["rss_after_build_mb"] = self.rss_after_build / 1024
        record["peak_reset_after_build"] = self.peak_was_reset
        record["build_s"] = self.build_s
        record["measure_s"] = time.perf_counter() - self.clock
        record["other_cpu_use"] = self.h.other_cpu_use(self.counters, self.h.cpu_counters(), record["measure_s"])
        record["threads"] = torch.get_num_threads()
        record["device"] = str(self.device)
        record["tf32"] = self.tf32
        return record

    def throughput(self, record: dict[str, Any], flops_per_step: int | None) -> None:
        """Images per second of the median step, counted FLOPs, achieved FLOP/s and the fraction of the device's
        peak for the record's precision (None where the peak is unknown)."""
        from vlprompt.engine import speed

        peak = speed.device_peak(self.device, record["precision"], torch_threads(), tf32=self.tf32)
        record["peak_flops_per_s"] = peak.flops_per_s
        record["peak_source"] = peak.source
        record["images_per_s"] = record["batch_size"] / record["step_s"] if record.get("step_s") else None
        record["flops_per_step"] = flops_per_step
        record["flops_per_image"] = None if flops_per_step is None else flops_per_step / record["batch_size"]
        achieved = None if flops_per_step is None or not record.get("step_s") else flops_per_step / record["step_s"]
        record["achieved_flops_per_s"] = achieved
        record["peak_fraction"] = None if achieved is None or not peak.flops_per_s else achieved / peak.flops_per_s


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _time_calls(s: "_Setup", make, step, n: int) -> list[float]:
    """Seconds of ``n`` calls of ``step`` on fresh inputs from ``make`` (made outside the timing; device synced)."""
    times = []
    for _ in range(n):
        inputs = make()
        s.sync()
        t = time.perf_counter()
        step(inputs)
        s.sync()
        times.append(time.perf_counter() - t)
    return times


def _compile_warmup(s: "_Setup", make, step, warmup: int, compile_mode: str, record: dict[str, Any]) -> int:
    """Run the warm-up steps, not timed with the steps (at least 1 when compiled; 3 with modes that may record CUDA
    graphs: a warm-up run, the recording, one replay), and record their summed time (inputs made by ``make`` outside
    it) as the compile warm-up. Returns the warm-up count used."""
    if compile_mode != "none":
        warmup = max(warmup, 3 if compile_mode in ("reduce-overhead", "max-autotune") else 1)
    record["warmup_s"] = sum(_time_calls(s, make, step, warmup))
    record["compile"] = compile_mode
    record["warmup"] = warmup
    return warmup


def _summarise(record: dict[str, Any], times: list[float]) -> None:
    record["times_s"] = times
    record["step_s"] = statistics.median(times)
    record["step_min_s"] = min(times)


def measure_u(model: str, precision: str = "fp32", *, batch_size: int = 8, num_classes: int = 10, steps: int = 3,
              warmup: int = 1, threads: int | None = None, seed: int = 0, reset_peak: bool = False,
              compile: str = "none", tf32: bool = False, flops: bool = True) -> dict[str, Any]:
    """U: frozen image-tower forward + activation-only backward (input requires grad), under autocast.

    ``flops``: count one eager U pass's FLOPs first (untimed). ``compile``: a :func:`vlprompt.engine.speed.
    compile_towers` mode for the image tower; the warm-up steps (which compile) are timed apart as ``warmup_s``."""
    import torch
    import torch.nn.functional as F

    from vlprompt.engine import speed

    s = _Setup(model, precision, threads, seed, reset_peak, tf32)
    backbone, accelerator = s.backbone, s.accelerator
    with torch.no_grad(), accelerator.autocast():
        text = F.normalize(backbone.encode_texts([f"a photo of a {c}." for c in class_names(num_classes)]).float(), -1)

    def one_pass(inputs) -> None:
        pixels, labels = inputs
        pixels.requires_grad_(True)
        with accelerator.autocast():
            feats = F.normalize(backbone.encode_image(pixels).float(), dim=-1)
            loss = F.cross_entropy(backbone.logit_scale.float() * feats @ text.t(), labels)
        accelerator.backward(loss)
        loss.item()
        assert pixels.grad is not None  # the backward really ran through the whole tower

    record = {"kind": "U", "model": model, "precision": precision, "batch_size": batch_size,
              "num_classes": num_classes, "steps": steps, "warmup": warmup}
    def make():
        return s.batch(batch_size, num_classes)

    flops_per_step = speed.count_flops(lambda: one_pass(make()))[1] if flops else None  # eager, untimed
    speed.compile_towers(backbone, None if compile == "none" else compile, towers=("image",))
    _compile_warmup(s, make, one_pass, warmup, compile, record)
    times = _time_calls(s, make, one_pass, steps)
    _summarise(record, times)
    s.throughput(record, flops_per_step)
    return s.finish(record)


def measure_step(model: str, method_name: str, precision: str = "fp32", *, batch_size: int = 8,
                 num_classes: int = 10, steps: int = 3, warmup: int = 1, threads: int | None = None, seed: int = 0,
                 reset_peak: bool = False, compile: str = "none", tf32: bool = False,
                 flops: bool = True) -> dict[str, Any]:
    """One method's engine training step (see the module docstring), timed ``steps`` times after ``warmup``.

    ``flops``: count one eager step's FLOPs first (untimed; it is a real step). ``compile``: a
    :func:`vlprompt.engine.speed.compile_towers` mode for both towers; the warm-up steps (which compile) are timed
    apart as ``warmup_s``."""
    import torch

    from vlprompt.engine import speed
    from vlprompt.engine.trainer import TrainConfig, prepare_training
    from vlprompt.methods import canonical_method_name, get_prompt_model
    from vlprompt.tasks.batches import ClassificationBatch

    name = canonical_method_name(method_name)
    s = _Setup(model, precision, threads, seed, reset_peak, tf32)
    accelerator = s.accelerator
    names = class_names(num_classes)
    method = get_prompt_model(s.backbone, name, names).to(s.device)
    text_tokens = int(method.backbone.tokenize([f"{n}." for n in names]).lengths.max())
    record: dict[str, Any] = {
        "kind": None, "model": model, "method": name, "precision": precision, "batch_size": batch_size,
        "num_classes": num_classes, "steps": steps, "warmup": warmup, "trainable_params": method.num_trainable(),
        "method_config": method.config.to_dict(), "modifies_text": bool(method.modifies_text),
        "modifies_image": bool(method.modifies_image), "longest_class_tokens": text_tokens,
        "conditions_text_on_image": method.conditions_text_on_image,
    }
    if method.fits_features or method.num_trainable() == 0:
        record["kind"] = "feature_fit" if method.fits_features else "no_training"
        record["notes"] = ("closed-form fit on frozen features (no SGD step)" if method.fits_features
                           else "nothing to train (the engine only evaluates)")
        return s.finish(record)

    trainer_step = _helpers().trainer_step
    step_module, optimizer = prepare_training(method, TrainConfig(batch_size=batch_size), accelerator)
    params = list(method.prompt_parameters().values())
    text_feats = None  # the task's caching: class text features once when the text tower is untouched
    if "text" in method.cacheable_towers:
        with torch.no_grad(), accelerator.autocast():
            text_feats = method.text_features().detach()
    method.on_epoch_start(0)
    method.train()

    def make_batch(cached_images: bool):
        pixels, labels = s.batch(batch_size, num_classes)
        if cached_images:
            with torch.no_grad(), accelerator.autocast():
                return ClassificationBatch(labels, image_feats=method.backbone.encode_image(pixels).detach(),
                                           text_feats=text_feats)  # fmt: skip
        return ClassificationBatch(labels, pixel_values=pixels, text_feats=text_feats)

    def one_step(batch) -> None:
        speed.begin_step(method)  # CUDA-graph trees (reduce-overhead): a new step starts
        trainer_step(step_module, optimizer, batch, accelerator, params, name)

    def timed_steps(cached_images: bool, n_warmup: int) -> list[float]:
        """Trainer steps on fresh batches; ``cached_images``: from the frozen tower's features (--no-augment mode)."""
        times = []
        for i in range(n_warmup + steps):
            batch = make_batch(cached_images)
            s.sync()
            t = time.perf_counter()
            one_step(batch)
            s.sync()
            if i >= n_warmup:
                times.append(time.perf_counter() - t)
        return times

    flops_per_step = speed.count_flops(lambda: one_step(make_batch(False)))[1] if flops else None  # eager, untimed
    speed.compile_towers(method, None if compile == "none" else compile)
    _compile_warmup(s, lambda: make_batch(False), one_step, warmup, compile, record)
    times = timed_steps(cached_images=False, n_warmup=0)
    if not method.modifies_image:
        # The engine's other mode (--no-augment): image features of the frozen tower are computed once per image
        # and every step starts from them.
        cached_times = timed_steps(cached_images=True, n_warmup=record["warmup"])
        record["cached_image_step_s"] = statistics.median(cached_times)
        record["cached_image_times_s"] = cached_times
    record["kind"] = "sgd"
    record["notes"] = "text features cached" if text_feats is not None else (
        "text tower per image (batch x classes sequences)" if record["conditions_text_on_image"]
        else "text tower every step")
    _summarise(record, times)
    s.throughput(record, flops_per_step)
    return s.finish(record)


# --------------------------------------------------------------------------------------------- subprocesses
def run_isolated(spec: dict[str, Any], timeout: float | None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "record.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec), "--result", str(result)]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {**spec, "error": f"timed out after {timeout:.0f} s", "wall_s": time.perf_counter() - t0}
        wall = time.perf_counter() - t0
        if proc.returncode != 0 or not result.exists():
            tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-5:]
            return {**spec, "error": f"worker exited with {proc.returncode}: " + " | ".join(tail), "wall_s": wall}
        record = json.loads(result.read_text())
        record["wall_s"] = wall
        return record


def _worker(spec_json: str, result_path: str) -> int:
    spec = json.loads(spec_json)
    kind = spec.pop("what")
    record = measure_u(**spec, reset_peak=True) if kind == "U" else measure_step(**spec, reset_peak=True)
    Path(result_path).write_text(json.dumps(record))
    return 0


# --------------------------------------------------------------------------------------------- results
def summarise(u: dict[str, dict], steps: dict[str, dict[str, dict]], coop_large: dict[str, dict],
              meta: dict[str, Any]) -> dict[str, Any]:
    """The JSON: one key per method (ratios to U and peak memory), then ``_U``, ``_coop_large``, ``_meta``."""
    out: dict[str, Any] = {}
    for method, by_precision in steps.items():
        entry: dict[str, Any] = {}
        for precision, r in by_precision.items():
            ok = "error" not in r and r.get("kind") == "sgd" and "error" not in u.get(precision, {"error": 1})
            entry[f"{precision}_step_s"] = r.get("step_s")
            entry[f"{precision}_over_U"] = r["step_s"] / u[precision]["step_s"] if ok else None
            if ok and r.get("cached_image_step_s") is not None:
                entry[f"{precision}_cached_image_step_s"] = r["cached_image_step_s"]
                entry[f"{precision}_cached_image_over_U"] = r["cached_image_step_s"] / u[precision]["step_s"]
            entry[f"{precision}_peak_mb"] = r.get("peak_mb")
            entry[f"{precision}_extra_peak_mb"] = r.get("extra_peak_mb")
            entry[f"{precision}_images_per_s"] = r.get("images_per_s")
            entry[f"{precision}_flops_per_image"] = r.get("flops_per_image")
            entry[f"{precision}_peak_fraction"] = r.get("peak_fraction")
        first = next(iter(by_precision.values()))
        entry["peak_mb"] = by_precision.get("fp32", first).get("peak_mb")
        fp32, bf16 = by_precision.get("fp32", {}), by_precision.get("bf16", {})
        if fp32.get("step_s") and bf16.get("step_s"):
            entry["bf16_speedup"] = fp32["step_s"] / bf16["step_s"]
            if u.get("fp32", {}).get("step_s"):
                entry["bf16_over_U_fp32"] = bf16["step_s"] / u["fp32"]["step_s"]
        entry["kind"] = first.get("kind")
        entry["trainable_params"] = first.get("trainable_params")
        entry["notes"] = first.get("notes", first.get("error", ""))
        entry["records"] = by_precision
        out[method] = entry
    out["_U"] = u
    out["_coop_large"] = coop_large
    out["_meta"] = meta
    return out


def _t(s: float | None) -> str:
    if s is None:
        return "—"
    return f"{s * 1000:.1f} ms" if s < 1 else f"{s:.2f} s"


def _r(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}"


def _mb(x: float | None) -> str:
    return "—" if x is None else f"{x:,.0f}"


def _load(r: dict[str, Any]) -> str:
    use = r.get("other_cpu_use")
    return "—" if use is None else f"{use:.2f}"


def report_header(title: str, meta: dict[str, Any]) -> list[str]:
    """A report's first lines: its title, the command that produced it, its date and wall time."""
    kind = "need GPUs" if meta.get("device", "cpu") != "cpu" else "long"  # tests/test_doc_commands.py
    return [f"# {title}", "", "Produced by", "", f"<!-- commands: {kind} -->", "```bash", meta["command"], "```", "",
            f"- date: {meta['date']}; total wall time {meta['wall_s']:.0f} s"]


def render_markdown(result: dict[str, Any]) -> str:
    meta, u, large = result["_meta"], result["_U"], result["_coop_large"]
    precisions = meta["precisions"]
    cuda = meta["device"] == "cuda"
    mem = "CUDA max allocated" if cuda else "peak RSS"
    lines = [
        *report_header("Training-step time relative to U, fp32 and bf16", meta),
        f"- torch {meta['torch']}, transformers {meta['transformers']}, accelerate {meta['accelerate']}, "
        f"Python {meta['python']}",
        f"- CPU: {meta['cpu']} ({meta['cpu_count']} logical CPUs visible); device: {meta['device']}"
        + (f" ({meta['gpu']})" if meta.get("gpu") else "") + f"; torch threads {meta['threads']}",
        "- native bf16 on the CPU: " + (
            "unknown" if meta.get("cpu_bf16_flags") is None
            else ", ".join(meta["cpu_bf16_flags"]) or "**none** (no amx_bf16 / avx512_bf16: bf16 is emulated, "
            "slower than fp32)"),
        f"- model `{meta['model']}` (random weights: times and memory do not depend on weight values), batch "
        f"{meta['batch_size']}, {meta['num_classes']} classes (CIFAR-10's names), random pixels and labels; median of "
        f"{meta['steps']} timed steps after {meta['warmup']} warm-up step(s), each (method, precision) in a fresh "
        "process",
        "",
        "**U** = one forward of the frozen image tower + the backward of its activations (the input requires a "
        "gradient; no parameter gradients, no optimiser step), same batch and precision: the floor for any method "
        "that prompts the image tower. **Step** = what `engine/trainer.py` does per batch: forward under the "
        "accelerator's autocast (class text features computed once outside the step when the method leaves the "
        "text tower alone; text cut after the last end-of-text token), loss, backward, SGD step (engine defaults), "
        "`loss.item()`; training augmentation on, so image features are never cached (for methods that leave the image "
        "tower alone, the notes also give the step from cached image features, the engine's `--no-augment` mode). "
        "*x/U* = the method's median "
        "step over U of the same precision. *bf16 speed-up* = fp32 step / bf16 step. Memory: " + mem + " of the "
        "method's own process (the frozen model included); *extra* = above the process's memory right after the "
        "backbone was built. *other CPU use*: CPUs other processes kept busy during the measurement (0 = quiet; "
        "well above 0 inflates the times).",
        "",
        "| U | median (min) | " + mem + " (MiB) | other CPU use |",
        "|---|---:|---:|---:|",
    ]
    for p in precisions:
        r = u.get(p, {})
        if "error" in r:
            lines.append(f"| {p} | error: {r['error']} | | |")
        else:
            lines.append(f"| {p} | {_t(r['step_s'])} ({_t(r['step_min_s'])}) | {_mb(r['peak_mb'])} | {_load(r)} |")
    lines.append("")
    head = "| method | trainable |"
    rule = "|---|---:|"
    for p in precisions:
        head += f" {p} step: median (min) | {p} x/U | {p} peak / extra (MiB) |"
        rule += "---:|---:|---:|"
    if "fp32" in precisions and "bf16" in precisions:
        head += " bf16 speed-up |"
        rule += "---:|"
    head += " other CPU use | notes |"
    rule += "---:|---|"
    lines += [head, rule]
    for method, entry in result.items():
        if method.startswith("_"):
            continue
        row = f"| {method} | {_mb(entry.get('trainable_params'))} |"
        for p in precisions:
            r = entry["records"].get(p, {})
            if "error" in r:
                row += f" error | | |"
                continue
            if r.get("kind") != "sgd":
                row += " n/a | — | " + f"{_mb(r.get('peak_mb'))} / {_mb(r.get('extra_peak_mb'))} |"
                continue
            row += (f" {_t(r['step_s'])} ({_t(r['step_min_s'])}) | {_r(entry.get(f'{p}_over_U'))} | "
                    f"{_mb(r['peak_mb'])} / {_mb(r['extra_peak_mb'])} |")
        if "fp32" in precisions and "bf16" in precisions:
            row += f" {_r(entry.get('bf16_speedup'))} |"
        loads = "/".join(_load(entry["records"].get(p, {})) for p in precisions)
        notes = entry.get("notes", "")
        cached = [f"{p} {_t(entry[f'{p}_cached_image_step_s'])} = {_r(entry[f'{p}_cached_image_over_U'])} U"
                  for p in precisions if entry.get(f"{p}_cached_image_over_U") is not None]
        if cached:
            notes += "; with cached image features (`--no-augment`): " + ", ".join(cached)
        row += f" {loads} | {notes} |"
        lines.append(row)
    lines.append("")
    lines += render_throughput(result)
    if large:
        first = next(iter(large.values()))
        lines += [
            f"## CoOp with {meta['coop_classes']:,} classes, batch {meta['coop_batch']}",
            "",
            f"The text tower runs for every class with gradients each step: {meta['coop_classes']:,} sequences of "
            f"{first.get('longest_class_tokens', '?')} tokens before the 16 context tokens are inserted (distinct "
            "three-word names made of CIFAR-10's words). Median of "
            f"{first.get('steps', '?')} timed steps after {first.get('warmup', '?')} warm-up step(s).",
            "",
            "| precision | step: median (min) | peak / extra " + mem + " (MiB) | other CPU use |",
            "|---|---:|---:|---:|",
        ]
        for p, r in large.items():
            if "error" in r:
                lines.append(f"| {p} | error: {r['error']} | | |")
            else:
                lines.append(f"| {p} | {_t(r['step_s'])} ({_t(r['step_min_s'])}) | {_mb(r['peak_mb'])} / "
                             f"{_mb(r['extra_peak_mb'])} | {_load(r)} |")
        lines.append("")
    return "\n".join(lines)


def _flops(x: float | None) -> str:
    if x is None:
        return "—"
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if x >= scale:
            return f"{x / scale:.2f} {unit}"
    return f"{x:.0f} "


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def render_throughput(result: dict[str, Any]) -> list[str]:
    """The images/s and FLOP table (U and every SGD method, each precision), with the peaks and their sources."""
    meta, u = result["_meta"], result["_U"]
    records = [("U", p, r) for p, r in u.items()]
    records += [(m, p, r) for m, e in result.items() if not m.startswith("_") for p, r in e["records"].items()
                if r.get("kind") == "sgd" and "error" not in r]
    if not any(r.get("images_per_s") for _, _, r in records):
        return []
    mode = meta.get("compile", "none")
    lines = [
        "## Throughput and FLOPs",
        "",
        "*images/s* = batch / median step. *FLOPs / image*: the matrix multiplies, convolutions and attention of one "
        "eager pass (forward and backward, the optimiser not included), counted by "
        "`torch.utils.flop_counter.FlopCounterMode` (attention counted as full, causal masks not discounted; the CPU "
        "attention kernel counted with the same formula), divided by the batch. *achieved* = counted FLOPs per step "
        "/ median step time. *of peak* = achieved / the device's peak for the precision (— where no peak is known).",
        "",
        f"- compile: `{mode}`" + ("" if mode == "none" else
                                  " (regional: every encoder layer of the towers, `vlprompt.engine.speed.compile_towers`;"
                                  " the warm-up steps, which compile, are excluded from the step times and given "
                                  "below as *warm-up*)") + (f"; TF32 for fp32 matmuls: {'on' if meta.get('tf32') else 'off'}"),
    ]
    for p, peak in (meta.get("peaks") or {}).items():
        lines.append(f"- peak {p}: " + (_flops(peak["flops_per_s"]) + "FLOP/s" if peak.get("flops_per_s") else
                                        "unknown (no fraction given)") + f"; source: {peak['source']}")
    lines += [
        "",
        "| what | precision | images/s | FLOPs / image | achieved FLOP/s | of peak | warm-up |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for what, p, r in records:
        if "error" in r:
            lines.append(f"| {what} | {p} | error | | | | |")
            continue
        ips = r.get("images_per_s")
        warm = r.get("warmup_s")
        lines.append(f"| {what} | {p} | {'—' if ips is None else f'{ips:,.1f}'} | {_flops(r.get('flops_per_image'))}"
                     f"FLOP | {_flops(r.get('achieved_flops_per_s'))}FLOP/s | {_pct(r.get('peak_fraction'))} | "
                     f"{_t(warm)} ({r.get('warmup', '?')} steps) |")
    lines.append("")
    return lines


def cpu_bf16_flags() -> list[str] | None:
    """The CPU's native bf16 instruction sets (AMX, AVX512-BF16) from /proc/cpuinfo; without any, bf16 is emulated
    (slower than fp32). None off Linux."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return sorted(flags & {"amx_bf16", "amx_tile", "avx512_bf16"})
    except OSError:
        pass
    return None


def collect_meta(args, wall_s: float) -> dict[str, Any]:
    import accelerate
    import torch
    import transformers

    cuda = torch.cuda.is_available()
    return {
        "command": "python benchmarks/step_time.py" + ("" if not args.argv else " " + shlex.join(args.argv)),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__, "transformers": transformers.__version__, "accelerate": accelerate.__version__,
        "python": platform.python_version(), "cpu": _helpers().cpu_model_name(), "cpu_count": os.cpu_count(),
        "cpu_bf16_flags": cpu_bf16_flags(),
        "device": "cuda" if cuda else "cpu", "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "threads": args.threads, "model": args.model, "batch_size": args.batch_size, "num_classes": args.num_classes,
        "steps": args.steps, "warmup": args.warmup, "precisions": args.precisions,
        "coop_classes": args.coop_classes, "coop_batch": args.coop_batch, "wall_s": wall_s,
        "compile": args.compile, "tf32": args.tf32, "flops_counted": not args.no_flops,
        "flops_note": "FlopCounterMode: matmul, convolution, attention (fwd + bwd) of one eager pass per record",
        "peaks": device_peaks(args),
    }


def device_peaks(args) -> dict[str, dict[str, Any]]:
    """Peak FLOP rate and its source per measured precision, for the device the workers use."""
    import torch

    from vlprompt.engine import speed

    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = {}
    for p in dict.fromkeys([*args.precisions, *(args.coop_precisions or [])]):
        peak = speed.device_peak(device, p, args.threads, tf32=args.tf32)
        out[p] = {"flops_per_s": peak.flops_per_s, "source": peak.source}
    return out


# --------------------------------------------------------------------------------------------- CLI
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="random:vit-b-16")
    p.add_argument("--method", action="append", default=None, help="repeatable; default: every registered method")
    p.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=["fp32", "bf16", "fp16"])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--steps", type=int, default=3, help="timed steps per measurement (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in every measurement process")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--coop-classes", type=int, default=1000, help="classes of the CoOp many-class run (0: skip it)")
    p.add_argument("--coop-batch", type=int, default=32)
    p.add_argument("--coop-steps", type=int, default=1)
    p.add_argument("--coop-warmup", type=int, default=1)
    p.add_argument("--coop-precisions", nargs="+", default=None, help="default: --precisions")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--json", type=Path, default=None, help="default: --out with .json")
    p.add_argument("--timeout", type=float, default=900, help="seconds per measurement process")
    p.add_argument("--compile", default="none", choices=["none", "default", "max-autotune", "reduce-overhead"],
                   help="regional torch.compile of the towers' encoder layers (vlprompt.engine.speed.compile_towers); "
                        "reduce-overhead = CUDA graphs, CUDA only")
    p.add_argument("--tf32", action="store_true", help="allow TF32 for fp32 matmuls on CUDA (changes fp32 numerics)")
    p.add_argument("--no-flops", action="store_true", help="skip the FLOP count (one extra eager step per record)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return _worker(args.worker, args.result)
    import torch

    from vlprompt.backbones import RANDOM_PREFIX, CLIPBackbone
    from vlprompt.backbones.presets import PRESETS, save_random_clip
    from vlprompt.methods import METHODS, canonical_method_name

    if args.compile == "reduce-overhead" and not torch.cuda.is_available():
        print("step_time.py: --compile reduce-overhead records CUDA graphs and needs a CUDA GPU; on this machine use "
              "--compile default (or max-autotune)", file=sys.stderr)
        return 2

    methods = [canonical_method_name(m) for m in args.method] if args.method else [
        n for n, spec in METHODS.items() if spec.method_class.required_sites <= CLIPBackbone.info.sites
    ]
    start = time.perf_counter()
    worker_model, saved = args.model, None
    if args.model.startswith(RANDOM_PREFIX) and args.model[len(RANDOM_PREFIX):] in PRESETS:
        # Build the random weights once; every measurement process loads them (~0.5 s instead of ~5 s for ViT-B).
        saved = tempfile.TemporaryDirectory()
        save_random_clip(saved.name, args.model[len(RANDOM_PREFIX):], seed=0)  # = load_backbone(args.model)'s weights
        worker_model = saved.name
    common = dict(model=worker_model, batch_size=args.batch_size, num_classes=args.num_classes, steps=args.steps,
                  warmup=args.warmup, threads=args.threads, seed=args.seed, compile=args.compile, tf32=args.tf32,
                  flops=not args.no_flops)

    def run(label: str, spec: dict[str, Any]) -> dict[str, Any]:
        print(f"[step_time] {label} ...", file=sys.stderr, flush=True)
        r = run_isolated(spec, args.timeout)
        r["model"] = args.model
        if "error" in r:
            print(f"[step_time]   FAILED: {r['error']}", file=sys.stderr, flush=True)
        else:
            step = _t(r.get("step_s")) if r.get("step_s") is not None else r.get("kind")
            rate = ""
            if r.get("images_per_s"):
                rate = (f", {r['images_per_s']:,.1f} images/s, {_flops(r.get('flops_per_image'))}FLOP/image, "
                        f"{_flops(r.get('achieved_flops_per_s'))}FLOP/s = {_pct(r.get('peak_fraction'))} of peak, "
                        f"warm-up {_t(r.get('warmup_s'))}")
            print(f"[step_time]   {step}{rate}, peak {_mb(r.get('peak_mb'))} MiB, other CPU use {_load(r)} "
                  f"({r['wall_s']:.0f} s)", file=sys.stderr, flush=True)
        return r

    u = {p: run(f"U {p}", {"what": "U", "precision": p, **common}) for p in args.precisions}
    steps: dict[str, dict[str, dict]] = {}
    for name in methods:
        steps[name] = {p: run(f"{name} {p}", {"what": "step", "method_name": name, "precision": p, **common})
                       for p in args.precisions}
    coop_large = {}
    if args.coop_classes:
        large = dict(common, batch_size=args.coop_batch, num_classes=args.coop_classes, steps=args.coop_steps,
                     warmup=args.coop_warmup)
        for p in args.coop_precisions or args.precisions:
            coop_large[p] = run(f"coop {args.coop_classes} classes, batch {args.coop_batch}, {p}",
                                {"what": "step", "method_name": "coop", "precision": p, **large})
    if saved is not None:
        saved.cleanup()
    meta = collect_meta(args, time.perf_counter() - start)
    result = summarise(u, steps, coop_large, meta)
    out = args.out
    json_out = args.json or out.with_suffix(".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    json_out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_markdown(result) + "\n", encoding="utf-8")
    json_out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"[step_time] wrote {out} and {json_out} in {meta['wall_s']:.0f} s", file=sys.stderr)
    failed = [r for r in [*u.values(), *coop_large.values(), *(r for d in steps.values() for r in d.values())]
              if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
