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


# ------------------------------------------------------------------------------------------ benchmarks/step_time.py
STEP_TIME = BENCH.parent / "step_time.py"


@pytest.fixture(scope="module")
def step_time():
    spec = importlib.util.spec_from_file_location("step_time", STEP_TIME)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_step_time_measures_u_and_engine_steps_in_both_precisions(step_time):
    small = dict(batch_size=4, num_classes=3, steps=1, warmup=0)
    u = {p: step_time.measure_u("random:tiny", p, **small) for p in ("fp32", "bf16")}
    steps = {
        name: {p: step_time.measure_step("random:tiny", name, p, **small) for p in ("fp32", "bf16")}
        for name in ("coop", "dpt", "linear_probe")
    }
    for p, r in u.items():
        assert r["kind"] == "U" and r["precision"] == p and _finite_positive(r["step_s"])
        assert r["peak_mb"] > 0 and r["extra_peak_mb"] >= 0 and len(r["times_s"]) == 1
    for name in ("coop", "dpt"):
        for p, r in steps[name].items():
            assert r["kind"] == "sgd" and r["method"] == name and r["precision"] == p
            assert _finite_positive(r["step_s"]) and r["trainable_params"] > 0 and r["peak_mb"] > 0
    assert steps["linear_probe"]["fp32"]["kind"] == "feature_fit" and "step_s" not in steps["linear_probe"]["fp32"]

    meta = {"command": "python benchmarks/step_time.py --model random:tiny", "date": "today", "torch": "x",
            "transformers": "x", "accelerate": "x", "python": "x", "cpu": "cpu", "cpu_count": 2, "device": "cpu",
            "gpu": None, "threads": 2, "model": "random:tiny", "batch_size": 4, "num_classes": 3, "steps": 1,
            "warmup": 0, "precisions": ["fp32", "bf16"], "coop_classes": 3, "coop_batch": 4, "wall_s": 1.0}
    result = step_time.summarise(u, steps, {"fp32": steps["coop"]["fp32"]}, meta)
    assert math.isclose(result["coop"]["fp32_over_U"], steps["coop"]["fp32"]["step_s"] / u["fp32"]["step_s"])
    assert math.isclose(result["dpt"]["bf16_over_U"], steps["dpt"]["bf16"]["step_s"] / u["bf16"]["step_s"])
    assert result["coop"]["peak_mb"] == steps["coop"]["fp32"]["peak_mb"]
    assert result["linear_probe"]["fp32_over_U"] is None
    table = step_time.render_markdown(result)
    assert meta["command"] in table and "| coop |" in table and "| dpt |" in table and "## CoOp with 3 classes" in table


def test_step_time_class_names_are_distinct_and_multi_word(step_time):
    names = step_time.class_names(1000)
    assert len(set(names)) == 1000 and step_time.class_names(10) == step_time.CIFAR10
    assert all(len(n.split()) == 3 for n in names)


TOY_TEMPLATES = Path(__file__).resolve().parent.parent / "benchmarks" / "toy_templates.py"


def test_toy_templates_swaps_only_its_datasets_templates(monkeypatch):
    """benchmarks/toy_templates.py changes the template of its three datasets, and nothing else of the suite."""
    from vlprompt.toyworld import suite

    spec = importlib.util.spec_from_file_location("toy_templates", TOY_TEMPLATES)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    original = dict(suite.SUITE)
    monkeypatch.setattr(suite, "SUITE", dict(original))
    module.use_caption_like_templates()
    assert set(module.MAIN_DATASETS) == set(suite.toy_dataset_names(include_variants=False))
    for name, spec_now in suite.SUITE.items():
        before = original[name]
        if name in module.CAPTION_LIKE_TEMPLATES:
            assert spec_now.template == module.CAPTION_LIKE_TEMPLATES[name] != before.template
            assert spec_now.template.count("{}") == 1
            assert spec_now.classnames == before.classnames and spec_now.class_kwargs == before.class_kwargs
        else:
            assert spec_now == before
