#!/usr/bin/env python
"""Per-method cost of prompt tuning: training-step time, throughput, peak memory and trainable parameters.

Every registered method (``vlprompt.methods.METHODS``) is measured on each ``--model`` (``random:<preset>`` builds a
real architecture with random weights offline, so the numbers hold for the pretrained model of that architecture:
timings and memory do not depend on weight values). Each (model, method) pair runs in a fresh subprocess so its
peak memory is its own.

One training step is the trainer's own step, ``vlprompt.engine.trainer.run_training_step`` (the method's
``training_step`` under the accelerator's autocast: forward and loss; ``zero_grad``, ``backward``, SGD ``step``),
then ``loss.item()``.
The engine's caching is mirrored: a method that leaves the text tower alone gets class text features computed once,
outside the timed step (``text_feats=``); the image tower always gets pixels (training augmentation is on by
default), and for text-only methods the ``--no-augment`` path (cached image features) is timed as well.

Usage::

    python benchmarks/bench_methods.py --model random:vit-b-16 --model random:tiny
    python benchmarks/bench_methods.py --model random:tiny --method coop --method vpt_deep --steps 50

See benchmarks/README.md for what each column means.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "docs" / "benchmarks.md"
# CIFAR-10's names: realistic 1-3 token class names; "class N" beyond ten.
CLASSNAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
# (warmup, steps) when not given: big models step in seconds on a CPU, tiny ones in milliseconds.
AUTO_SCHEDULE = {"large": (1, 3), "small": (3, 30)}
LARGE_IMAGE_SIZE = 128


# --------------------------------------------------------------------------------------------- memory helpers
def current_rss_kib() -> int:
    """Resident set size now (KiB), from /proc/self/statm; falls back to ru_maxrss off Linux."""
    try:
        with open("/proc/self/statm") as fh:
            pages = int(fh.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") // 1024
    except (OSError, ValueError, IndexError):
        return peak_rss_kib()


def peak_rss_kib() -> int:
    """Peak resident set size of this process (KiB).

    Linux: ``VmHWM`` of /proc/self/status. Not ``ru_maxrss``: a process started by ``subprocess`` inherits its
    parent's peak there, and ``clear_refs`` does not reset that inherited part, so a worker would report the driver's
    peak as its own."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak // 1024 if sys.platform == "darwin" else peak  # macOS reports bytes


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux >= 4.0: ``echo 5 > /proc/self/clear_refs``).

    Without it the peak reached while *building* the backbone would count as the method's training peak.
    """
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def cpu_counters() -> tuple[int, int] | None:
    """(CPU jiffies busy on the whole machine, CPU jiffies used by this process) from /proc; None off Linux."""
    try:
        with open("/proc/stat") as fh:
            vals = [int(v) for v in fh.readline().split()[1:9]]
        with open("/proc/self/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        # user nice system idle iowait irq softirq steal; /proc/self/stat: utime, stime are fields 14, 15
        return sum(vals) - vals[3] - vals[4], int(fields[11]) + int(fields[12])
    except (OSError, ValueError, IndexError):
        return None


def other_cpu_use(before: tuple[int, int] | None, after: tuple[int, int] | None, seconds: float) -> float | None:
    """Average number of CPUs kept busy by *other* processes between two :func:`cpu_counters` snapshots."""
    if before is None or after is None or seconds <= 0:
        return None
    busy, own = after[0] - before[0], after[1] - before[1]
    return max(0.0, (busy - own) / os.sysconf("SC_CLK_TCK") / seconds)


def wait_for_quiet(threshold: float, max_wait: float, sample_s: float = 1.0) -> tuple[float, float | None]:
    """Wait (at most ``max_wait`` s) until other processes use fewer than ``threshold`` CPUs over ``sample_s``.

    Returns (seconds waited, other CPU use in the last sample).
    """
    start = time.perf_counter()
    while True:
        t0, c0 = time.perf_counter(), cpu_counters()
        time.sleep(sample_s)
        use = other_cpu_use(c0, cpu_counters(), time.perf_counter() - t0)
        waited = time.perf_counter() - start - sample_s  # the first sample is not waiting
        if use is None or use < threshold or waited >= max_wait:
            return max(0.0, waited), use


def _loadavg() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def class_names(n: int) -> list[str]:
    return [CLASSNAMES[i] if i < len(CLASSNAMES) else f"class {i}" for i in range(n)]


def auto_schedule(image_size: int) -> tuple[int, int]:
    return AUTO_SCHEDULE["large" if image_size >= LARGE_IMAGE_SIZE else "small"]


def preset_image_size(model: str) -> int | None:
    """Image size of a ``random:<preset>`` without building it (None for other specs)."""
    from vlprompt.backbones import RANDOM_PREFIX
    from vlprompt.backbones.presets import PRESETS

    if model.startswith(RANDOM_PREFIX):
        preset = PRESETS.get(model[len(RANDOM_PREFIX) :])
        if preset is not None:
            return int(preset["vision_config"]["image_size"])
    return None


# --------------------------------------------------------------------------------------------- measurement
def measure(
    model: str,
    method_name: str,
    *,
    steps: int | None = None,
    warmup: int | None = None,
    batch_size: int = 8,
    num_classes: int = 10,
    threads: int | None = None,
    seed: int = 0,
    reset_peak: bool = False,
) -> dict[str, Any]:
    """Measure one method on one model in this process and return a record (see benchmarks/README.md).

    ``steps`` / ``warmup`` of None pick :data:`AUTO_SCHEDULE` by image size. ``threads`` of None leaves torch's
    thread count alone. Memory figures are only the method's own when this runs in a fresh process
    (``reset_peak=True`` there); in a long-lived process they still have the right fields.
    """
    import torch

    from vlprompt.backbones import load_backbone
    from vlprompt.engine.trainer import make_accelerator
    from vlprompt.methods import METHODS, canonical_method_name, get_prompt_model

    name = canonical_method_name(method_name)
    if threads is not None:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    accelerator = make_accelerator("fp32")
    device = accelerator.device
    cuda = device.type == "cuda"

    t0 = time.perf_counter()
    backbone = load_backbone(model)
    build_s = time.perf_counter() - t0
    backbone.to(device)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated()
    build_peak_kib = peak_rss_kib()
    rss_after_build = current_rss_kib()
    peak_was_reset = reset_peak_rss() if reset_peak else False
    counters_start, clock_start = cpu_counters(), time.perf_counter()

    size = backbone.image_size
    if warmup is None or steps is None:
        auto_warmup, auto_steps = auto_schedule(size)
        warmup = auto_warmup if warmup is None else warmup
        steps = auto_steps if steps is None else steps
    if steps < 1 or warmup < 0:
        raise ValueError(f"need steps >= 1 and warmup >= 0 (got steps={steps}, warmup={warmup})")

    classnames = class_names(num_classes)
    method = get_prompt_model(backbone, name, classnames).to(device)
    backbone_params = backbone.num_parameters()
    trainable = method.num_trainable()
    generator = torch.Generator().manual_seed(seed)

    def batch() -> tuple[torch.Tensor, torch.Tensor]:
        pixels = torch.randn(batch_size, 3, size, size, generator=generator)
        labels = torch.randint(num_classes, (batch_size,), generator=generator)
        return pixels.to(device), labels.to(device)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    record: dict[str, Any] = {
        "model": model,
        "method": name,
        "summary": METHODS[name].summary,
        "method_config": method.config.to_dict(),
        # instance attributes: some methods (APT) decide per config which towers they change
        "modifies_text": bool(method.modifies_text),
        "modifies_image": bool(method.modifies_image),
        "conditions_text_on_image": method.conditions_text_on_image,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "batch_size": batch_size,
        "num_classes": num_classes,
        "image_size": size,
        "warmup": warmup,
        "steps": steps,
        "backbone_params": backbone_params,
        "trainable_params": trainable,
        "trainable_pct": 100.0 * trainable / backbone_params,
        "build_s": build_s,
        "kind": None,
        "step_s": None,
        "step_times_s": [],
        "images_per_s": None,
        "cached_image_step_s": None,
        "cached_image_images_per_s": None,
        "infer_s": None,
        "infer_images_per_s": None,
        "notes": "",
        "loadavg_1min_at_start": _loadavg(),
    }

    # ----------------------------------------------------------- inference (evaluate(): text features once)
    method.eval()
    with torch.no_grad(), accelerator.autocast():
        eval_text = None
        if not method.fits_features and not method.conditions_text_on_image:
            eval_text = method.text_features()
        infer_times = []
        for i in range(warmup + steps):
            pixels, _ = batch()
            sync()
            t = time.perf_counter()
            method(pixel_values=pixels, text_feats=eval_text).argmax(-1).cpu()
            sync()
            if i >= warmup:
                infer_times.append(time.perf_counter() - t)
    record["infer_times_s"] = infer_times
    record["infer_s"] = statistics.median(infer_times)
    record["infer_min_s"] = min(infer_times)
    record["infer_images_per_s"] = batch_size / record["infer_s"]

    if method.fits_features:
        _measure_feature_fit(method, record, batch, sync, warmup, steps, batch_size)
    elif trainable == 0:
        record["kind"] = "no_training"
        record["notes"] = "nothing to train (the engine only evaluates); inference timed"
    else:
        _measure_sgd(method, record, batch, sync, warmup, steps, accelerator)

    if cuda:
        record["memory_kind"] = "cuda_max_memory_allocated"
        record["extra_peak_mib"] = (torch.cuda.max_memory_allocated() - base_cuda) / 2**20
        record["total_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        record["memory_kind"] = "peak_rss"
        end_peak = peak_rss_kib()
        record["extra_peak_mib"] = max(0, end_peak - rss_after_build) / 1024
        record["total_peak_mib"] = max(end_peak, build_peak_kib) / 1024
    record["rss_after_build_mib"] = rss_after_build / 1024
    record["loadavg_1min_at_end"] = _loadavg()
    record["measure_s"] = time.perf_counter() - clock_start
    record["other_cpu_use"] = other_cpu_use(counters_start, cpu_counters(), record["measure_s"])
    record["peak_reset_after_build"] = peak_was_reset
    return record


def trainer_step(step_module, optimizer, batch, accelerator, params, method_name: str) -> None:
    """What the trainer does per batch (``run_training_step``), plus the loss read-out and accuracy count it logs."""
    from vlprompt.engine.trainer import NonFiniteLoss, run_training_step

    try:
        out = run_training_step(step_module, optimizer, batch, accelerator, params)
    except NonFiniteLoss as err:
        raise RuntimeError(f"non-finite loss {err} while benchmarking {method_name}") from None
    out.loss.item()
    if out.logits is not None:
        int((out.logits.argmax(-1) == batch.labels).sum())


def _measure_sgd(method, record, batch, sync, warmup: int, steps: int, accelerator) -> None:
    """Time the engine's training step; text-only methods also on cached image features (``--no-augment``)."""
    import torch

    from vlprompt.engine.trainer import TrainConfig, prepare_training
    from vlprompt.tasks.batches import ClassificationBatch

    cfg = TrainConfig(batch_size=record["batch_size"])  # engine defaults: SGD, lr 0.002, momentum 0.9, wd 5e-4
    step_module, optimizer = prepare_training(method, cfg, accelerator)
    params = list(method.prompt_parameters().values())
    core = method

    text_feats = None
    if "text" in core.cacheable_towers:
        with torch.no_grad(), accelerator.autocast():
            text_feats = core.text_features().detach()
    core.on_epoch_start(0)  # methods whose loss follows a schedule: the trainer calls it per epoch
    method.train()

    def step(inputs, labels, cached: bool) -> None:
        if cached:
            batch = ClassificationBatch(labels, image_feats=inputs, text_feats=text_feats)
        else:
            batch = ClassificationBatch(labels, pixel_values=inputs, text_feats=text_feats)
        trainer_step(step_module, optimizer, batch, accelerator, params, record["method"])

    def timed(make_inputs, cached: bool) -> list[float]:
        times = []
        for i in range(warmup + steps):
            inputs, labels = make_inputs()
            sync()
            t = time.perf_counter()
            step(inputs, labels, cached)
            sync()
            if i >= warmup:
                times.append(time.perf_counter() - t)
        return times

    times = timed(batch, cached=False)
    record["kind"] = "sgd"
    record["step_times_s"] = times
    record["step_s"] = statistics.median(times)
    record["step_min_s"] = min(times)
    record["images_per_s"] = record["batch_size"] / record["step_s"]
    if text_feats is not None:
        cached_text = "text features cached"
    elif core.conditions_text_on_image:
        cached_text = "text tower every step, per image (batch x classes sequences)"
    else:
        cached_text = "text tower every step"
    record["notes"] = f"pixels every step; {cached_text}"

    if not core.modifies_image:
        # --no-augment: the engine extracts image features once and trains on them (TensorDataset).
        def cached_batch():
            pixels, labels = batch()
            with torch.no_grad(), accelerator.autocast():
                return core.image_features(pixels).float(), labels

        cached_times = timed(cached_batch, cached=True)
        record["cached_image_step_times_s"] = cached_times
        record["cached_image_step_s"] = statistics.median(cached_times)
        record["cached_image_step_min_s"] = min(cached_times)
        record["cached_image_images_per_s"] = record["batch_size"] / record["cached_image_step_s"]
        record["notes"] += "; with --no-augment image features are cached (extra column)"


def _measure_feature_fit(method, record, batch, sync, warmup: int, steps: int, batch_size: int) -> None:
    """Linear probe: no SGD step. Time feature extraction per image plus the L-BFGS fit (C sweep + refit)."""
    import torch

    feats, labels, times = [], [], []
    with torch.no_grad():
        for i in range(warmup + steps):
            pixels, y = batch()
            sync()
            t = time.perf_counter()
            feats.append(method.image_features(pixels).float().cpu())
            sync()
            labels.append(y.cpu())
            if i >= warmup:
                times.append(time.perf_counter() - t)
    # Train on all batches but the last, validate on the last: the engine's sweep over c_values, then a refit.
    train_f, train_y = torch.cat(feats[:-1]), torch.cat(labels[:-1])
    val_f, val_y = feats[-1], labels[-1]
    if len(train_y) == 0:  # a single batch: no validation split, one solve (the engine's behaviour too)
        train_f, train_y, val_f, val_y = val_f, val_y, val_f[:0], val_y[:0]
    t = time.perf_counter()
    method.fit_features(train_f, train_y, val_f, val_y)
    fit_s = time.perf_counter() - t
    extract_per_image = statistics.median(times) / batch_size
    n_fit = len(train_y) + len(val_y)
    per_image = extract_per_image + fit_s / n_fit
    solves = (len(method.config.c_values) + 1) if len(val_y) else 1
    record.update(
        kind="feature_fit",
        extract_times_s=times,
        extract_s_per_image=extract_per_image,
        fit_s=fit_s,
        fit_train=len(train_y),
        fit_val=len(val_y),
        fit_solves=solves,
        feature_fit_s_per_image=per_image,
        images_per_s=1.0 / per_image,
        notes=(
            f"no SGD step (closed-form fit): features {1000 * extract_per_image:.1f} ms/img + L-BFGS fit "
            f"{fit_s:.2f} s on {len(train_y)}+{len(val_y)} train+val feats "
            f"({solves} L-BFGS solves: C sweep + refit)"
        ),
    )


# --------------------------------------------------------------------------------------------- subprocess driver
def run_isolated(spec: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
    """Run :func:`measure` in a fresh interpreter (re-invoking this script with the hidden ``--worker`` flag)."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "record.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec), "--result", str(result)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        wall = time.perf_counter() - t0
        if proc.returncode != 0 or not result.exists():
            tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-5:]
            return {
                "model": spec["model"],
                "method": spec["method_name"],
                "error": f"worker exited with {proc.returncode}: " + " | ".join(tail),
                "wall_s": wall,
            }
        record = json.loads(result.read_text())
        record["wall_s"] = wall
        return record


def _worker(spec_json: str, result_path: str) -> int:
    spec = json.loads(spec_json)
    record = measure(**spec, reset_peak=True)
    Path(result_path).write_text(json.dumps(record))
    return 0


# --------------------------------------------------------------------------------------------- report
def _fmt_int(n: int) -> str:
    return f"{n:,}"


def _fmt_pct(p: float) -> str:
    if p == 0:
        return "0"
    return f"{p:.4f}" if p < 0.01 else f"{p:.3f}" if p < 1 else f"{p:.2f}"


def _fmt_time(s: float | None) -> str:
    if s is None:
        return "—"
    return f"{s * 1000:.1f} ms" if s < 1 else f"{s:.2f} s"


def _fmt_load(r: dict[str, Any]) -> str:
    use = r.get("other_cpu_use")
    return "—" if use is None else f"{use:.2f}"


def _fmt_rate(r: float | None) -> str:
    if r is None:
        return "—"
    return f"{r:.1f}" if r < 100 else f"{r:,.0f}"


def render_markdown(meta: dict[str, Any], results: list[dict[str, Any]]) -> str:
    cuda = meta["device"] == "cuda"
    mem_kind = "CUDA `torch.cuda.max_memory_allocated`" if cuda else "peak RSS (`ru_maxrss`)"
    lines = [
        "# Method benchmarks",
        "",
        "Cost of one training step of every registered method, as the engine runs it. Produced by",
        "",
        "<!-- commands: long -->",  # tests/test_doc_commands.py
        "```bash",
        meta["command"],
        "```",
        "",
        f"- date: {meta['date']}",
        f"- torch {meta['torch']}, transformers {meta['transformers']}, accelerate {meta['accelerate']}, "
        f"Python {meta['python']}",
        f"- CPU: {meta['cpu']} ({meta['cpu_count']} logical CPUs visible); device: {meta['device']}"
        + (f" ({meta['gpu']})" if meta.get("gpu") else ""),
        f"- torch threads: {meta['threads']} (`--threads`); precision fp32; optimizer SGD (engine defaults: "
        "lr 0.002, momentum 0.9, weight decay 5e-4)",
        f"- batch size {meta['batch_size']}, {meta['num_classes']} classes, random pixel tensors of the model's "
        "image size, random labels",
        "- weights: **random** (`random:<preset>` builds the real architecture with random weights, offline). "
        "Timings and memory do not depend on weight values, so they hold for the pretrained model of the same "
        "architecture (the one exception: the linear probe's L-BFGS fit, whose iteration count depends on the "
        "features).",
        f"- memory: {mem_kind}. *extra peak* = peak of the process during the method's measurement minus the "
        "memory right after the backbone was built (each (model, method) runs in a fresh subprocess"
        + ("; the kernel's peak-RSS mark is reset after the build" if not cuda else "")
        + "); *total peak* = the process's peak.",
        f"- total wall time of this run: {meta['wall_s']:.0f} s"
        + (
            f", of which {meta['waited_s']:.0f} s waiting for other processes to leave the CPUs idle "
            f"(`--max-wait`)"
            if meta.get("waited_s")
            else ""
        ),
        "",
        "Step = forward through the method (text features computed once outside the step when the method does "
        "not modify the text tower, exactly as `engine/trainer.py` does), cross-entropy, backward, SGD step. "
        "Image-tower input is pixels every step (training augmentation on, the engine's default); for text-only "
        "methods the *cached image feats* column times the `--no-augment` path, where the engine extracts image "
        "features once and trains on them. *inference* is a no-grad forward with cached class text features "
        "(`evaluate()`). *other CPU use* is how many of the machine's "
        f"{meta['cpu_count']} CPUs other processes kept busy, on average, while the method was measured (from "
        "/proc/stat minus the measuring process's own CPU time): where it is well above 0 the times are inflated "
        "by contention, so compare rows measured at similar values (and the *min*). See `benchmarks/README.md` "
        "for every column.",
        "",
    ]
    by_model: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        by_model.setdefault(r["model"], []).append(r)
    for model, rows in by_model.items():
        ok = [r for r in rows if "error" not in r]
        lines.append(f"## `{model}`")
        lines.append("")
        if ok:
            r0 = ok[0]
            lines.append(
                f"Backbone: {_fmt_int(r0['backbone_params'])} parameters, image size {r0['image_size']}. "
                f"Median over {r0['steps']} timed steps after {r0['warmup']} warm-up step(s); "
                f"batch {r0['batch_size']}."
            )
            lines.append("")
        mem_col = "CUDA mem" if cuda else "RSS"
        lines.append(
            f"| method | trainable params | % of backbone | step time: median (min) | img/s | "
            f"step, cached image feats (`--no-augment`) | inference / batch: median (min) | extra peak {mem_col} (MiB) | "
            f"total peak {mem_col} (MiB) | other CPU use | notes |"
        )
        lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
        for r in rows:
            if "error" in r:
                lines.append(f"| {r['method']} | error | | | | | | | | | {r['error']} |")
                continue
            if r["kind"] == "sgd":
                step = f"{_fmt_time(r['step_s'])} (min {_fmt_time(r['step_min_s'])})"
                rate = _fmt_rate(r["images_per_s"])
            elif r["kind"] == "feature_fit":
                step = "n/a (closed-form fit)"
                rate = f"{_fmt_rate(r['images_per_s'])} (features + fit)"
            else:
                step, rate = "n/a (nothing to train)", "—"
            cached = (
                f"{_fmt_time(r['cached_image_step_s'])} (min {_fmt_time(r['cached_image_step_min_s'])}); "
                f"{_fmt_rate(r['cached_image_images_per_s'])} img/s"
                if r["cached_image_step_s"] is not None
                else "—"
            )
            infer = f"{_fmt_time(r['infer_s'])} (min {_fmt_time(r['infer_min_s'])})"
            lines.append(
                f"| {r['method']} | {_fmt_int(r['trainable_params'])} | {_fmt_pct(r['trainable_pct'])} | {step} | "
                f"{rate} | {cached} | {infer} | {r['extra_peak_mib']:.0f} | "
                f"{r['total_peak_mib']:.0f} | {_fmt_load(r)} | {r['notes']} |"
            )
        lines.append("")
    return "\n".join(lines)


def collect_meta(args, wall_s: float, loadavg_start: float | None, waited_s: float = 0.0) -> dict[str, Any]:
    import accelerate
    import torch
    import transformers

    cuda = torch.cuda.is_available()
    return {
        "command": "python benchmarks/bench_methods.py" + ("" if not args.argv else " " + shlex.join(args.argv)),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
        "python": platform.python_version(),
        "cpu": cpu_model_name(),
        "cpu_count": os.cpu_count(),
        "device": "cuda" if cuda else "cpu",
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "threads": args.threads,
        "batch_size": args.batch_size,
        "num_classes": args.num_classes,
        "weights": "random (real architecture, random weights; timings do not depend on weight values)",
        "memory_kind": "cuda_max_memory_allocated" if cuda else "peak_rss",
        "wall_s": wall_s,
        "loadavg": [loadavg_start, _loadavg()],
        "waited_s": waited_s,
    }


# --------------------------------------------------------------------------------------------- CLI
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--model", action="append", default=None,
                        help="model spec, repeatable (default: random:tiny); e.g. random:vit-b-16, a model folder")
    parser.add_argument("--method", action="append", default=None,
                        help="method name, repeatable (default: every method in vlprompt.methods.METHODS)")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"timed steps (default: {AUTO_SCHEDULE['large'][1]} for image size >= "
                             f"{LARGE_IMAGE_SIZE}, else {AUTO_SCHEDULE['small'][1]})")
    parser.add_argument("--warmup", type=int, default=None,
                        help=f"untimed warm-up steps (default: {AUTO_SCHEDULE['large'][0]} for image size >= "
                             f"{LARGE_IMAGE_SIZE}, else {AUTO_SCHEDULE['small'][0]})")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in each worker (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="markdown output (default docs/benchmarks.md)")
    parser.add_argument("--json", type=Path, default=None, help="raw numbers (default: --out with .json)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per (model, method) worker")
    parser.add_argument("--max-wait", type=float, default=30,
                        help="before each measurement wait up to this many seconds until other processes use fewer "
                             "than --quiet-below CPUs (0: don't wait; default 30)")
    parser.add_argument("--patience", type=float, default=180,
                        help="total seconds the whole run may spend waiting for idle CPUs and re-measuring contended "
                             "pairs; once spent, it measures straight through (default 180)")
    parser.add_argument("--retries", type=int, default=1,
                        help="re-measure a (model, method) whose measurement other processes contended (used more "
                             "than --quiet-below CPUs) up to this many times, keeping the fastest record (default 1)")
    parser.add_argument("--quiet-below", type=float, default=0.25,
                        help="CPUs other processes may use for the machine to count as idle (default 0.25)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def _primary_time(record: dict[str, Any]) -> float:
    """The number a record is judged by: step time, the linear probe's time per image, or inference time."""
    if record.get("kind") == "sgd":
        return record["step_s"]
    if record.get("kind") == "feature_fit":
        return record["feature_fit_s_per_image"]
    return record["infer_s"]


class Patience:
    """What the run may still spend on waiting for idle CPUs and re-measuring contended pairs (``--patience``)."""

    def __init__(self, seconds: float) -> None:
        self.left = max(0.0, seconds)

    def spend(self, seconds: float) -> None:
        self.left = max(0.0, self.left - seconds)


def _measure_with_retries(spec: dict[str, Any], args, patience: Patience) -> dict[str, Any]:
    """One (model, method) measurement in a fresh process; re-measured (up to ``--retries`` times, while
    ``--patience`` lasts) when other processes used more than ``--quiet-below`` CPUs during it; keeps the fastest."""
    best: dict[str, Any] | None = None
    total_wall = total_waited = 0.0
    attempts = 0
    while attempts <= max(0, args.retries):
        label = f"[bench] {spec['model']} {spec['method_name']}" + (f" (retry {attempts})" if attempts else "")
        print(f"{label} ...", file=sys.stderr, flush=True)
        max_wait = min(args.max_wait, patience.left)
        waited, use = wait_for_quiet(args.quiet_below, max_wait) if max_wait > 0 else (0.0, None)
        patience.spend(waited)
        if waited >= 0.5:
            note = "" if use is None else f" (other processes now use {use:.2f} CPUs)"
            print(f"[bench]   waited {waited:.0f} s for idle CPUs{note}", file=sys.stderr, flush=True)
        record = run_isolated(spec, timeout=args.timeout)
        if attempts:
            patience.spend(record["wall_s"])
        attempts += 1
        total_wall += record["wall_s"]
        total_waited += waited
        if "error" in record:
            print(f"[bench]   FAILED: {record['error']}", file=sys.stderr, flush=True)
            best = record
            break
        step = record["step_s"] if record["kind"] == "sgd" else None
        contention = record.get("other_cpu_use")
        print(
            f"[bench]   step {_fmt_time(step)}  infer {_fmt_time(record['infer_s'])}  "
            f"extra peak {record['extra_peak_mib']:.0f} MiB  other CPU use "
            f"{'?' if contention is None else f'{contention:.2f}'}  ({record['wall_s']:.1f} s wall)",
            file=sys.stderr, flush=True,
        )
        # Contention only ever slows a measurement down, so of several the fastest is the most accurate.
        if best is None or _primary_time(record) < _primary_time(best):
            best = record
        if contention is None or contention <= args.quiet_below:
            break
        if patience.left < record["wall_s"]:
            print("[bench]   contended, but --patience is used up: keeping it", file=sys.stderr, flush=True)
            break
    best.update(wall_s=total_wall, waited_s=total_waited, attempts=attempts)
    return best


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return _worker(args.worker, args.result)

    from vlprompt.methods import METHODS, canonical_method_name

    models = args.model or ["random:tiny"]
    methods = [canonical_method_name(m) for m in args.method] if args.method else list(METHODS)
    results = []
    start = time.perf_counter()
    loadavg_start = _loadavg()
    patience = Patience(args.patience)
    for model in models:
        for name in methods:
            spec = dict(
                model=model, method_name=name, steps=args.steps, warmup=args.warmup, batch_size=args.batch_size,
                num_classes=args.num_classes, threads=args.threads, seed=args.seed,
            )
            results.append(_measure_with_retries(spec, args, patience))
    wall = time.perf_counter() - start
    meta = collect_meta(args, wall, loadavg_start, sum(r.get("waited_s", 0.0) for r in results))
    out = args.out
    json_out = args.json or out.with_suffix(".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    json_out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_markdown(meta, results) + "\n", encoding="utf-8")
    json_out.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n", encoding="utf-8")
    print(f"[bench] wrote {out} and {json_out} in {wall:.0f} s", file=sys.stderr)
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
