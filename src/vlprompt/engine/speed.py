"""Speed paths for the frozen towers, and the FLOP arithmetic to judge them.

- :func:`compile_towers`: regional ``torch.compile`` of the repeated transformer blocks of both towers (each encoder
  layer compiled in place with ``nn.Module.compile``). The adapters keep looping over the model's own layers, so
  everything a method does between layers (inserting and replacing prompt tokens, the causal mask, pooling) stays
  eager and unchanged; one compiled layer graph serves all layers of a tower. ``"reduce-overhead"`` adds CUDA
  graphs (CUDA only; ``"max-autotune"`` also records them on CUDA); call :func:`begin_step` before each training
  step.
- :func:`set_tf32`: TF32 matrix multiplies for fp32 runs on NVIDIA GPUs. Never switched on implicitly (it changes
  fp32 numerics: ~10-bit mantissa products); only an explicit option may call it.
- :func:`count_flops`: matmul / convolution / attention FLOPs of a callable (``torch.utils.flop_counter``), with
  the CPU attention kernel counted too (torch's table lacks it).
- :func:`device_peak`: the device's dense peak FLOP rate for a precision, with its source; ``None`` when unknown.

Nothing here changes what a model computes beyond floating-point reassociation (compiled kernels) and, when asked
for, TF32.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch
from torch import nn

CompileMode = Literal["default", "max-autotune", "reduce-overhead"]
COMPILE_MODES: tuple[str, ...] = ("default", "max-autotune", "reduce-overhead")
_COMPILED_ATTR = "_vlprompt_compile_mode"


# ---------------------------------------------------------------------------------------------- compile
def _backbone_of(model: Any) -> Any:
    """The backbone of a prompt method (or the backbone itself)."""
    return getattr(model, "backbone", model)


def tower_layers(backbone: Any, tower: str) -> list[nn.Module]:
    """The encoder layers (the repeated transformer blocks) of ``tower`` ("text" or "image") of a two-tower
    backbone (CLIP, SigLIP): the modules the adapter calls one by one."""
    from vlprompt.backbones.towers import TransformersTwoTowers

    if not isinstance(backbone, TransformersTwoTowers):
        family = getattr(backbone, "family", type(backbone).__name__)
        raise ValueError(f"compile_towers supports two-tower backbones (CLIP, SigLIP); the {family} backbone has no "
                         f"{tower} tower of repeated encoder layers")
    return list(backbone.encoder_layers(tower))


def compile_towers(method: Any, mode: str | None, towers: tuple[str, ...] = ("image", "text"),
                   dynamic: bool | None = False) -> int:
    """Compile every encoder layer of ``towers`` in place (regional compilation); returns the number of layers.

    ``mode``: None or "none" (nothing; returns 0), "default", "max-autotune" or "reduce-overhead" (CUDA graphs:
    CUDA only; call :func:`begin_step` before each training step). Prompt hooks keep working: the adapter still
    calls each layer and inserts or replaces prompt tokens between layers in eager code, and forward hooks on a
    layer's submodules (APT's attention blocks) are traced into the layer's graph (adding or removing them causes
    a recompilation). Compiling again with the same mode does nothing; with another mode it is refused.

    ``dynamic=False`` (default): static shapes. The layers of both towers share one Python forward, so torch's
    automatic dynamic shapes would otherwise turn the hidden width dynamic as soon as the text tower (512 wide on
    ViT-B/16) follows the image tower (768); static graphs per tower keep the fastest kernels and suit CUDA graphs.
    Each new shape (another batch size, text length or grad mode) is then its own graph, so dynamo's recompile
    limit is raised to at least 32 (``torch._dynamo.config.recompile_limit``).
    """
    if mode is None or mode == "none":
        return 0
    if mode not in COMPILE_MODES:
        raise ValueError(f"unknown compile mode {mode!r}; choose one of none, {', '.join(COMPILE_MODES)}")
    backbone = _backbone_of(method)
    device = next(backbone.model.parameters()).device
    if mode == "reduce-overhead" and device.type != "cuda":
        raise ValueError(f"compile mode 'reduce-overhead' records CUDA graphs and needs the model on a CUDA GPU (it is "
                         f"on {device.type}): use --compile default (or max-autotune), or move the model to a GPU first")
    done = getattr(backbone, _COMPILED_ATTR, None)
    if done is not None:
        if done != mode:
            raise ValueError(f"the towers are already compiled with mode {done!r}; build a fresh backbone for {mode!r}")
        return 0
    import torch._dynamo.config as dynamo_config

    if hasattr(dynamo_config, "recompile_limit"):
        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 32)
    count = 0
    for tower in towers:
        for layer in tower_layers(backbone, tower):
            layer.compile(mode=mode, dynamic=dynamic)
            count += 1
    setattr(backbone, _COMPILED_ATTR, mode)
    return count


def compiled_mode(method: Any) -> str | None:
    """The mode the towers were compiled with, or None."""
    return getattr(_backbone_of(method), _COMPILED_ATTR, None)


def uses_cuda_graphs(method: Any) -> bool:
    """Whether the compiled towers record CUDA graphs: torch.compile's "reduce-overhead" and "max-autotune" modes
    do on a CUDA device."""
    backbone = _backbone_of(method)
    mode = compiled_mode(backbone)
    return mode in ("reduce-overhead", "max-autotune") and next(backbone.model.parameters()).device.type == "cuda"


def begin_step(method: Any) -> None:
    """Mark the start of a training step for CUDA-graph trees: outputs of the previous step's graphs may then be
    overwritten. A no-op unless the towers record CUDA graphs (:func:`uses_cuda_graphs`)."""
    if uses_cuda_graphs(method):
        torch.compiler.cudagraph_mark_step_begin()


def set_tf32(enabled: bool) -> bool:
    """Allow (or forbid) TF32 for fp32 matrix multiplies and convolutions on NVIDIA GPUs; returns the previous
    matmul setting. Explicit only: TF32 rounds fp32 products to a 10-bit mantissa."""
    previous = bool(torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    return previous


# ---------------------------------------------------------------------------------------------- FLOPs
def _cpu_attention_formulas() -> dict[Any, Callable[..., int]]:
    """FLOP formulas for the CPU attention kernels (torch's FlopCounterMode counts the CUDA ones only): the same
    convention as torch's for the CUDA kernels (two matmuls forward, four backward; causal masks not discounted)."""
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten
    table: dict[Any, Callable[..., int]] = {}
    fwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    bwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if fwd is not None:
        table[fwd] = lambda q, k, v, *args, out_shape=None, **kwargs: fc.sdpa_flop_count(q, k, v)
    if bwd is not None:
        table[bwd] = lambda g, q, k, v, *args, out_shape=None, **kwargs: fc.sdpa_backward_flop_count(g, q, k, v)
    return table


def flop_counter() -> Any:
    """A ``FlopCounterMode`` (no printed table) that also counts CPU attention."""
    from torch.utils.flop_counter import FlopCounterMode

    return FlopCounterMode(display=False, custom_mapping=_cpu_attention_formulas())


def count_flops(fn: Callable[[], Any]) -> tuple[Any, int]:
    """``fn()``'s result and the FLOPs of the matrix multiplies, convolutions and attention it ran (forward and any
    backward run inside ``fn``), counted by torch's FlopCounterMode. Run it eagerly: compiled code is not counted."""
    with flop_counter() as counter:
        result = fn()
    return result, int(counter.get_total_flops())


# ---------------------------------------------------------------------------------------------- peaks
@dataclass(frozen=True)
class Peak:
    """A device's peak FLOP rate for one precision (None: unknown) and where the figure comes from."""

    flops_per_s: float | None
    source: str


# Dense (no structured sparsity) peak rates in TFLOP/s from NVIDIA's datasheets. bf16/fp16 and tf32: tensor cores;
# fp32: the CUDA cores (what plain fp32 matmuls get without TF32). Keys are matched against
# torch.cuda.get_device_name() in order, first match wins.
GPU_PEAKS_TFLOPS: list[tuple[str, str, dict[str, float]]] = [
    # (name pattern, datasheet, {precision: dense TFLOP/s})
    (r"H200.*NVL", "NVIDIA H200 NVL datasheet", {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    (r"H200", "NVIDIA H200 (SXM) datasheet", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    (r"H100.*NVL", "NVIDIA H100 NVL datasheet", {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    (r"H100.*PCIe", "NVIDIA H100 PCIe datasheet", {"bf16": 756.5, "fp16": 756.5, "tf32": 378.0, "fp32": 51.2}),
    (r"H100", "NVIDIA H100 SXM datasheet", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    (r"A100", "NVIDIA A100 datasheet", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    (r"L40S", "NVIDIA L40S datasheet", {"bf16": 362.05, "fp16": 362.05, "tf32": 183.0, "fp32": 91.6}),
    (r"\bL4\b", "NVIDIA L4 datasheet", {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3}),
    (r"A10\b", "NVIDIA A10 datasheet", {"bf16": 125.0, "fp16": 125.0, "tf32": 62.5, "fp32": 31.2}),
]
GPU_PEAK_NOTE = "vendor datasheet, dense (no sparsity); fp32 = CUDA cores (no TF32), bf16/fp16/tf32 = tensor cores"


def gpu_peak(name: str, precision: str) -> Peak:
    """The dense peak of the GPU called ``name`` (``torch.cuda.get_device_name()``) for ``precision``
    ("fp32", "tf32", "bf16", "fp16")."""
    for pattern, sheet, rates in GPU_PEAKS_TFLOPS:
        if re.search(pattern, name):
            rate = rates.get(precision)
            if rate is None:
                return Peak(None, f"{sheet}: no {precision} figure")
            return Peak(rate * 1e12, f"{sheet}: {rate:g} TFLOP/s {precision} ({GPU_PEAK_NOTE})")
    return Peak(None, f"unknown GPU {name!r}: no peak in vlprompt.engine.speed.GPU_PEAKS_TFLOPS")


def _cpuinfo() -> list[dict[str, str]]:
    try:
        text = open("/proc/cpuinfo", encoding="utf-8").read()
    except OSError:
        return []
    blocks = []
    for chunk in text.strip().split("\n\n"):
        entry = {}
        for line in chunk.splitlines():
            if ":" in line:
                key, value = line.split(":", 1)
                entry[key.strip()] = value.strip()
        blocks.append(entry)
    return blocks


def physical_cores() -> int | None:
    """Physical CPU cores from /proc/cpuinfo (distinct physical id / core id pairs); None off Linux."""
    blocks = _cpuinfo()
    if not blocks:
        return None
    pairs = {(b.get("physical id"), b.get("core id")) for b in blocks}
    return len(blocks) if (None, None) in pairs else len(pairs)


def cpu_flops_per_cycle(info: dict[str, str]) -> tuple[int | None, str]:
    """fp32 FLOPs per cycle per core from the CPU's vendor, family and flags (an assumption, stated)."""
    flags = set(info.get("flags", "").split())
    vendor = info.get("vendor_id", "")
    family = int(info.get("cpu family", "0") or 0)
    if vendor == "AuthenticAMD" and "avx512f" in flags and family == 25:
        # Zen 4 executes AVX-512 on 256-bit datapaths: 2 FMA pipes x 8 fp32 lanes x 2
        return 32, ("AMD Zen 4 (family 25 with AVX-512): 2 FMA pipes x 8 fp32 lanes (256-bit datapaths) x 2 = "
                    "32 FLOP/cycle")
    if vendor == "AuthenticAMD" and "avx512f" in flags:
        return 64, "AMD with AVX-512 (Zen 5 assumed): 2 FMA pipes x 16 fp32 lanes x 2 = 64 FLOP/cycle"
    if "avx512f" in flags:
        return 64, "AVX-512: 2 FMA units x 16 fp32 lanes x 2 = 64 FLOP/cycle (assumes two 512-bit FMA units)"
    if "avx2" in flags and "fma" in flags:
        return 32, "AVX2 + FMA: 2 FMA units x 8 fp32 lanes x 2 = 32 FLOP/cycle"
    return None, "no AVX2/FMA or AVX-512 flags: FLOPs per cycle unknown"


def cpu_peak(threads: int | None = None) -> Peak:
    """fp32 peak of the CPU cores a process uses: min(threads, physical cores) x clock x FLOPs/cycle. The clock is
    /proc/cpuinfo's "cpu MHz" (on a VM the host's nominal clock; turbo not counted); unknown clock or FLOPs/cycle
    gives ``flops_per_s=None``."""
    blocks = _cpuinfo()
    if not blocks:
        return Peak(None, "no /proc/cpuinfo: CPU peak unknown")
    first = blocks[0]
    cores = physical_cores() or len(blocks)
    visible = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else len(blocks)
    used = min(threads or torch.get_num_threads(), cores, visible)
    per_cycle, why = cpu_flops_per_cycle(first)
    mhz = [float(b["cpu MHz"]) for b in blocks if b.get("cpu MHz")]
    if not mhz:
        return Peak(None, f"{first.get('model name', 'CPU')}: clock unknown (no 'cpu MHz' in /proc/cpuinfo); {why}")
    ghz = max(mhz) / 1000
    if per_cycle is None:
        return Peak(None, f"{first.get('model name', 'CPU')} at {ghz:.2f} GHz: {why}")
    rate = used * ghz * 1e9 * per_cycle
    return Peak(rate, f"{used} core(s) used x {ghz:.2f} GHz ('cpu MHz' in /proc/cpuinfo, turbo not counted) x "
                      f"{per_cycle} fp32 FLOP/cycle ({why}) = {rate / 1e9:.0f} GFLOP/s fp32; an assumption, not a "
                      "vendor figure")


def device_peak(device: torch.device | str, precision: str, threads: int | None = None, tf32: bool = False) -> Peak:
    """Peak FLOP rate of ``device`` for a run in ``precision`` ("fp32", "bf16", "fp16"). On CUDA an fp32 run with
    TF32 allowed (``tf32``) is rated at the TF32 tensor-core peak. On CPU only fp32 has a peak here (bf16 on a CPU
    is emulated or uses extensions whose rate this module does not model)."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return gpu_peak(name, "tf32" if precision == "fp32" and tf32 else precision)
    if device.type == "cpu":
        if precision != "fp32":
            return Peak(None, f"CPU {precision} peak not modelled (only fp32)")
        return cpu_peak(threads)
    return Peak(None, f"no peak for device type {device.type!r}")
