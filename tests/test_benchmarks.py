"""benchmarks/bench_methods.py: the measurement returns complete, sane records (no timing thresholds)."""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_methods.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_methods", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def fp32_accelerator_state():
    """The benchmark builds an fp32 Accelerator like the engine; accelerate refuses that in a process whose
    (singleton) state was set up with another mixed precision by an earlier test, so start from a clean state then."""
    from accelerate.state import AcceleratorState

    state = AcceleratorState._shared_state
    if state.get("_mixed_precision") not in (None, "no"):
        AcceleratorState._reset_state(reset_partial_state=True)
    yield


def _finite_positive(x) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


def test_measure_records_have_sane_fields(bench, fp32_accelerator_state):
    from vlprompt.backbones import load_backbone
    from vlprompt.methods import get_prompt_model

    backbone = load_backbone("random:tiny")
    records = {
        name: bench.measure("random:tiny", name, steps=1, warmup=0, batch_size=4, num_classes=3)
        for name in ("coop", "vpt_deep")
    }
    for name, r in records.items():
        expected = get_prompt_model(backbone, name, bench.class_names(3)).num_trainable()
        assert r["model"] == "random:tiny" and r["method"] == name
        assert r["kind"] == "sgd"
        assert r["trainable_params"] == expected > 0
        assert r["backbone_params"] == backbone.num_parameters()
        assert 0 < r["trainable_pct"] < 100
        assert math.isclose(r["trainable_pct"], 100 * expected / backbone.num_parameters())
        assert r["steps"] == 1 and r["warmup"] == 0 and len(r["step_times_s"]) == 1
        assert r["batch_size"] == 4 and r["num_classes"] == 3 and r["image_size"] == backbone.image_size
        assert _finite_positive(r["step_s"]) and _finite_positive(r["infer_s"])
        assert math.isclose(r["images_per_s"], 4 / r["step_s"])
        assert r["memory_kind"] in ("peak_rss", "cuda_max_memory_allocated")
        assert r["extra_peak_mib"] >= 0 and r["total_peak_mib"] > 0
        assert r["total_peak_mib"] >= r["extra_peak_mib"]
        assert isinstance(r["notes"], str) and r["notes"]
        assert r["other_cpu_use"] is None or r["other_cpu_use"] >= 0

    # CoOp changes only the text tower: its --no-augment (cached image features) step is measured too;
    # VPT changes the image tower, so the class text features are cached and there is no such column.
    assert records["coop"]["modifies_text"] and not records["coop"]["modifies_image"]
    assert _finite_positive(records["coop"]["cached_image_step_s"])
    assert records["vpt_deep"]["cached_image_step_s"] is None
    assert "text features cached" in records["vpt_deep"]["notes"]

    meta = {
        "command": "python benchmarks/bench_methods.py --model random:tiny", "date": "today", "torch": "x",
        "transformers": "x", "accelerate": "x", "python": "x", "cpu": "cpu", "cpu_count": 2, "device": "cpu",
        "threads": 2, "batch_size": 4, "num_classes": 3, "wall_s": 1.0, "loadavg": None,
    }
    table = bench.render_markdown(meta, list(records.values()))
    assert "## `random:tiny`" in table
    assert "| coop |" in table and "| vpt_deep |" in table
