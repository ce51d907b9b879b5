"""The library on a CUDA GPU: every classification method trains, evaluates and reloads there; mixed precision;
detection; pretraining with ``device=cuda``.

Not part of the default suite (``tests/conftest.py`` hides CUDA from it, and ``pyproject.toml`` keeps this folder
out of its collection). On a machine with a GPU::

    VLPROMPT_TEST_DEVICE=cuda python -m pytest tests/gpu
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU and VLPROMPT_TEST_DEVICE=cuda (see this module's docstring)"
)

OPTIONS = {
    "zeroshot": {},
    "linear_probe": {"c_values": [0.1, 10.0], "max_iter": 50},
    "coop": {"n_ctx": 4},
    "vpt_shallow": {"n_tokens": 4},
    "vpt_deep": {"n_tokens": 4},
    "ivlp": {},
    "cocoop": {},
    "maple": {},
    "upt": {},
    "sdpt": {},
    "dpt": {},
    "apt": {"n_prompts": 8},
    "deep_prompt": {},
}


def quiet(_: str) -> None:
    pass


def test_every_classification_method_is_covered():
    from vlprompt.methods import METHODS, is_detection_method

    classification = {m for m in METHODS if not is_detection_method(m)}
    assert classification == set(OPTIONS), "add the new method to OPTIONS"


@pytest.mark.parametrize("method", sorted(OPTIONS))
def test_trains_on_the_gpu_and_its_prompt_gives_the_same_accuracy_on_the_cpu(
    method, tiny_model_dir, engine_data_root, engine_run_options, tmp_path
):
    from vlprompt.engine.api import DataOptions, evaluate_checkpoint, train

    run_dir = tmp_path / method
    result = train(engine_run_options(tiny_model_dir, engine_data_root, run_dir, method=method,
                                      method_options=OPTIONS[method], epochs=2), progress=False, log=quiet)
    assert 0.0 <= result["accuracy"] <= 100.0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train_loss"] for r in records if "train_loss" in r]
    assert torch.isfinite(torch.tensor(losses)).all(), losses
    for tensor in load_file(str(run_dir / "prompt.safetensors")).values():
        assert tensor.device.type == "cpu"  # a GPU-trained prompt loads anywhere

    data = DataOptions(dataset="eurosat", root=str(engine_data_root))
    on_gpu = evaluate_checkpoint(run_dir, data, "test")
    assert on_gpu["accuracy"] == pytest.approx(result["accuracy"], abs=1e-6)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_training_on_the_gpu(precision, tiny_model_dir, engine_data_root, engine_run_options,
                                             tmp_path):
    from vlprompt.engine.api import train

    for method in ("coop", "maple"):
        result = train(engine_run_options(tiny_model_dir, engine_data_root, tmp_path / method, method=method,
                                          method_options=OPTIONS[method], precision=precision),
                       progress=False, log=quiet)
        assert 0.0 <= result["accuracy"] <= 100.0


def test_toy_bench_runs_on_the_gpu_in_two_workers(tmp_path, monkeypatch, capsys):
    from vlprompt.cli import main

    monkeypatch.setenv("VLPROMPT_TOY_ROOT", str(tmp_path / "toy"))
    code = main(["bench", "--methods", "zeroshot", "coop", "maple", "--datasets", "toy:count", "--shots", "2",
                 "--seeds", "1", "--model", "embedded", "--recipe", "toy", "--workers", "2", "--output",
                 str(tmp_path / "bench")])
    assert code == 0, capsys.readouterr().err
    rows = (tmp_path / "bench" / "results.csv").read_text().splitlines()
    assert len(rows) == 1 + 3


def test_detection_trains_on_the_gpu(tmp_path, capsys):
    from vlprompt.backbones.grounding_dino_presets import save_random_grounding_dino
    from vlprompt.cli import main
    from vlprompt.data.coco import write_toy_detection

    detector = save_random_grounding_dino(tmp_path / "gdino", "grounding-dino-micro")
    coco = write_toy_detection(tmp_path / "coco", 8, 4, 6, size=64, seed=0)
    for method in ("sdpt_native", "det_coop"):
        code = main(["train", "--model", str(detector), "--method", method, "--dataset", f"coco:{coco}", "--shots",
                     "2", "--epochs", "1", "--batch-size", "4", "--optimizer", "adamw", "--lr", "0.01", "--output",
                     str(tmp_path / method), "--quiet", "--set", "train.warmup_epochs=0"])
        assert code == 0, capsys.readouterr().err


def test_pretraining_on_the_gpu_writes_a_cpu_loadable_model(tmp_path):
    from vlprompt.backbones import load_backbone
    from test_pretraining import TINY  # the CPU suite's tiny pretraining config (tests/ is on sys.path)
    from vlprompt.pretraining.clip_pretrain import PretrainConfig, pretrain

    out = pretrain(PretrainConfig(**TINY, device="cuda"), tmp_path / "model", tmp_path / "cache", log=quiet)
    backbone = load_backbone(str(out))
    assert next(backbone.model.parameters()).device.type == "cpu"
    assert torch.isfinite(backbone.encode_texts(["a red circle"])).all()

