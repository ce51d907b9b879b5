"""vlprompt.engine.speed: regional compilation keeps a training step's numbers, reduce-overhead is refused off CUDA,
FLOPs are counted as the architecture says, peaks are looked up honestly; benchmarks/step_time.py's smoke command."""
from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vlprompt.engine import speed

# Inductor scripts helpers with torch.jit on this torch version; the deprecation is torch's, not ours.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")

REPO = Path(__file__).resolve().parent.parent
STEP_TIME = REPO / "benchmarks" / "step_time.py"
CLASSES = ["cat", "dog", "bird"]


@pytest.fixture(scope="module")
def inductor():
    """Skip (with the reason) where torch.compile's inductor backend cannot build CPU kernels (e.g. no C compiler)."""
    try:
        fn = torch.compile(lambda x: torch.relu(x) * 2)
        fn(torch.randn(4))
    except Exception as err:  # noqa: BLE001 - any failure means no usable inductor here
        pytest.skip(f"torch.compile (inductor) unavailable on this machine: {type(err).__name__}: {err}")


def _step_loss_and_grads(method, step_module, optimizer, accelerator, batch):
    from vlprompt.engine.trainer import run_training_step

    params = list(method.prompt_parameters().values())
    out = run_training_step(step_module, optimizer, batch, accelerator, params)
    return float(out.loss.detach()), [p.grad.detach().clone() for p in params]


@pytest.mark.parametrize("name", ["coop", "vpt_deep", "maple"])
def test_compiled_towers_give_the_eager_step(name, inductor):
    """The trainer's step with compiled encoder layers has the eager step's loss and prompt gradients."""
    from vlprompt.backbones import load_backbone
    from vlprompt.engine.trainer import TrainConfig, make_accelerator, prepare_training
    from vlprompt.methods import get_prompt_model
    from vlprompt.tasks.batches import ClassificationBatch

    torch.manual_seed(0)
    accelerator = make_accelerator("fp32")
    method = get_prompt_model(load_backbone("random:tiny"), name, CLASSES)
    step_module, optimizer = prepare_training(method, TrainConfig(batch_size=4), accelerator)
    for group in optimizer.param_groups:  # the step leaves the prompts as they were: both passes see the same model
        group["lr"], group["weight_decay"] = 0.0, 0.0
    text_feats = None
    if "text" in method.cacheable_towers:
        with torch.no_grad():
            text_feats = method.text_features().detach()
    method.train()
    gen = torch.Generator().manual_seed(1)
    batch = ClassificationBatch(torch.tensor([0, 1, 2, 0]), pixel_values=torch.randn(4, 3, 32, 32, generator=gen),
                                text_feats=text_feats)
    eager_loss, eager_grads = _step_loss_and_grads(method, step_module, optimizer, accelerator, batch)

    layers = method.backbone.text_layers + method.backbone.vision_layers
    assert speed.compile_towers(method, "default") == layers
    assert speed.compiled_mode(method) == "default"
    assert speed.compile_towers(method, "default") == 0  # idempotent
    compiled_loss, compiled_grads = _step_loss_and_grads(method, step_module, optimizer, accelerator, batch)

    assert math.isclose(compiled_loss, eager_loss, rel_tol=1e-4)
    for eager, compiled in zip(eager_grads, compiled_grads):
        scale = float(eager.abs().max())
        assert scale > 0
        assert float((compiled - eager).abs().max()) <= 1e-4 * scale
    # the layers really run compiled code
    assert all(layer._compiled_call_impl is not None for layer in speed.tower_layers(method.backbone, "image"))


def test_reduce_overhead_is_refused_on_cpu_and_unknown_modes_named():
    from vlprompt.backbones import load_backbone

    backbone = load_backbone("random:tiny")
    with pytest.raises(ValueError, match=r"reduce-overhead.*CUDA.*--compile default") as info:
        speed.compile_towers(backbone, "reduce-overhead")
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="unknown compile mode 'fast'"):
        speed.compile_towers(backbone, "fast")
    assert speed.compile_towers(backbone, None) == 0 and speed.compile_towers(backbone, "none") == 0
    assert speed.compiled_mode(backbone) is None
    assert all(layer._compiled_call_impl is None for layer in speed.tower_layers(backbone, "text"))


def analytic_u_flops(config, batch: int, classes: int) -> int:
    """Matmul FLOPs of U on a CLIP image tower: forward, then the backward of activations only (frozen weights:
    one matmul per linear layer and the patch convolution for the input's gradient; attention: four matmuls)."""
    v = config.vision_config
    tokens = (v.image_size // v.patch_size) ** 2 + 1
    d, f, layers = v.hidden_size, v.intermediate_size, v.num_hidden_layers
    dense = (2 * (tokens - 1) * 3 * v.patch_size**2 * d  # patch embedding (a convolution)
             + layers * 2 * tokens * (4 * d * d + 2 * d * f)  # q, k, v, out projections and the MLP
             + 2 * d * config.projection_dim + 2 * config.projection_dim * classes)  # projection, logits
    attention = layers * 2 * (2 * tokens * tokens * d)  # Q K^T and P V
    return batch * (2 * dense + 3 * attention)


def _load_step_time():
    spec = importlib.util.spec_from_file_location("step_time", STEP_TIME)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_u_flops_match_the_architecture():
    from vlprompt.backbones import load_backbone

    record = _load_step_time().measure_u("random:tiny", "fp32", batch_size=4, num_classes=3, steps=1, warmup=0)
    expected = analytic_u_flops(load_backbone("random:tiny").model.config, 4, 3)
    # torch counts five matmuls for the attention backward (the flash kernels recompute the scores): ~2% more here
    assert abs(record["flops_per_step"] - expected) <= 0.10 * expected
    assert record["flops_per_image"] == record["flops_per_step"] / 4
    assert math.isclose(record["images_per_s"], 4 / record["step_s"])
    assert math.isclose(record["achieved_flops_per_s"], record["flops_per_step"] / record["step_s"])
    if record["peak_flops_per_s"] is None:  # e.g. a CPU whose clock /proc/cpuinfo does not give
        assert record["peak_fraction"] is None and record["peak_source"]
    else:
        assert math.isclose(record["peak_fraction"], record["achieved_flops_per_s"] / record["peak_flops_per_s"])


def test_cpu_attention_is_counted():
    q = torch.randn(2, 3, 5, 8, requires_grad=True)
    _, flops = speed.count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q).sum().backward())
    forward = 2 * (2 * 2 * 3 * 5 * 5 * 8)
    assert forward * 2 <= flops <= forward * 4  # forward plus a backward of 4-5 matmuls


def test_peaks_are_datasheet_figures_or_unknown():
    h200 = speed.gpu_peak("NVIDIA H200", "bf16")
    assert h200.flops_per_s == pytest.approx(989.4e12) and "dense" in h200.source and "datasheet" in h200.source
    assert speed.gpu_peak("NVIDIA H100 80GB HBM3", "fp32").flops_per_s == pytest.approx(66.9e12)
    assert speed.gpu_peak("NVIDIA A100-SXM4-80GB", "bf16").flops_per_s == pytest.approx(312e12)
    assert speed.gpu_peak("NVIDIA H100 PCIe", "bf16").flops_per_s == pytest.approx(756.5e12)
    unknown = speed.gpu_peak("Some Future GPU", "bf16")
    assert unknown.flops_per_s is None and "unknown GPU" in unknown.source
    assert speed.device_peak("cpu", "bf16").flops_per_s is None
    zen4 = {"vendor_id": "AuthenticAMD", "cpu family": "25", "flags": "avx2 fma avx512f"}
    assert speed.cpu_flops_per_cycle(zen4)[0] == 32
    assert speed.cpu_flops_per_cycle({"vendor_id": "GenuineIntel", "flags": "avx2 fma avx512f"})[0] == 64
    assert speed.cpu_flops_per_cycle({"vendor_id": "GenuineIntel", "flags": "sse2"})[0] is None


def test_step_time_smoke_command(tmp_path):
    """The quick smoke command of step_time.py's docstring, with --compile none: U and CoOp, fp32."""
    out = tmp_path / "step_time.md"
    cmd = [sys.executable, str(STEP_TIME), "--model", "random:tiny", "--method", "coop", "--precisions", "fp32",
           "--steps", "1", "--warmup", "0", "--coop-classes", "0", "--compile", "none", "--out", str(out)]
    doc = STEP_TIME.read_text()
    assert "--method coop --precisions fp32 --steps 1 --warmup 0" in doc and "--coop-classes 0 --compile none" in doc
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.with_suffix(".json").read_text())
    meta = result["_meta"]
    assert meta["compile"] == "none" and meta["flops_counted"] and "fp32" in meta["peaks"]
    assert meta["peaks"]["fp32"]["source"]
    coop = result["coop"]["records"]["fp32"]
    assert coop["flops_per_step"] > 0 and coop["images_per_s"] > 0 and coop["compile"] == "none"
    assert result["coop"]["fp32_over_U"] > 0 and result["_U"]["fp32"]["flops_per_image"] > 0
    table = out.read_text()
    assert "## Throughput and FLOPs" in table and "| coop | fp32 |" in table and "source:" in table


def test_step_time_refuses_reduce_overhead_without_cuda(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    proc = subprocess.run([sys.executable, str(STEP_TIME), "--model", "random:tiny", "--compile", "reduce-overhead",
                           "--out", str(tmp_path / "x.md")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "needs a CUDA GPU" in proc.stderr and "--compile default" in proc.stderr
    assert not (tmp_path / "x.md").exists()
