"""Mixed precision (``train.precision`` / ``--precision``) on tiny CLIPs, on the CPU.

bf16 must really autocast the forward passes (training steps, cached features and evaluation), while the prompts,
their gradients and the optimiser state stay fp32; fp16 without a GPU fails before any loading with the fix;
``vlprompt train/eval/bench --precision`` work, and a bench's runs of different precisions never share a folder.
"""
from __future__ import annotations

import contextlib
import io
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import vlprompt.backbones
from vlprompt.backbones import load_backbone
from vlprompt.cli import main
from vlprompt.engine import TrainingError
from vlprompt.engine import api
from vlprompt.engine.api import DataOptions, evaluate_checkpoint, load_splits, train
from vlprompt.engine.trainer import TrainConfig, Trainer, make_accelerator, seed_everything
from vlprompt.methods import get_prompt_model
from vlprompt.tasks import ClassificationTask

NO_CUDA = not torch.cuda.is_available()
N_TEST = 9


def quiet(_: str) -> None:
    pass


def record_dtypes(backbone) -> dict[str, list[tuple[bool, torch.dtype]]]:
    """(gradients enabled, output dtype) of every call of each tower's first MLP layer (a matrix multiply)."""
    seen: dict[str, list[tuple[bool, torch.dtype]]] = {"text": [], "image": []}

    def hook(tower):
        def record(module, args, output):
            seen[tower].append((torch.is_grad_enabled(), output.dtype))

        return record

    backbone.model.text_model.encoder.layers[0].mlp.fc1.register_forward_hook(hook("text"))
    backbone.model.vision_model.encoder.layers[0].mlp.fc1.register_forward_hook(hook("image"))
    return seen


def patch_backbone_loading(monkeypatch, replacement) -> None:
    """Route every backbone load of the jobs through ``replacement``: ``train`` loads the model it is given
    (engine.api), ``evaluate_checkpoint`` the one a prompt records (engine.checkpoint.recorded_backbone, which loads
    through vlprompt.backbones.load_backbone)."""
    monkeypatch.setattr(api, "load_backbone", replacement)
    monkeypatch.setattr(vlprompt.backbones, "load_backbone", replacement)


def fit(model_dir, data_root, run_dir, method_name, precision, method_options=None, augment=True):
    """Train through the engine's Trainer (1 epoch); returns (method, backbone dtype record, final metrics)."""
    backbone = load_backbone(str(model_dir))
    seen = record_dtypes(backbone)
    splits = load_splits(DataOptions(dataset="eurosat", root=str(data_root)))
    seed_everything(1)
    method = get_prompt_model(backbone, method_name, splits.classnames, splits.template, method_options or {})
    for calls in seen.values():  # what the engine runs, not the method's construction (DPT's fp32 template ranking)
        calls.clear()
    config = TrainConfig(epochs=1, batch_size=4, warmup_epochs=0, optimizer="adamw", lr=0.01, precision=precision,
                         augment=augment)
    trainer = Trainer(config, run_dir, progress=False, log=quiet)
    return method, seen, trainer.fit(method, ClassificationTask(splits, backbone, augment))


def dtypes(calls, grad: bool) -> set[torch.dtype]:
    return {dtype for g, dtype in calls if g == grad}


@pytest.mark.parametrize(
    "method_name, options",
    [("maple", {}), ("cocoop", {}), ("dpt", {"n_ctx": 2, "n_visual": 2})],
    ids=["maple", "cocoop", "dpt"],
)
def test_bf16_autocasts_every_forward_and_keeps_prompts_and_optimiser_state_fp32(
    tiny_model_dir, engine_data_root, tmp_path, method_name, options
):
    method, seen, result = fit(tiny_model_dir, engine_data_root, tmp_path / "run", method_name, "bf16", options)
    assert result["n"] == N_TEST
    # training steps (gradients on) and evaluation (no gradients): the towers' matrix multiplies ran in bf16
    grad_towers = ("text", "image") if method_name != "cocoop" else ("text",)  # CoCoOp's image tower is frozen
    for tower in grad_towers:
        assert dtypes(seen[tower], grad=True) == {torch.bfloat16}, tower
    for tower in ("text", "image"):
        assert dtypes(seen[tower], grad=False) == {torch.bfloat16}, tower
    # ... while every parameter stays fp32, in memory and in the files
    for name, p in method.named_parameters():
        assert p.dtype == torch.float32, name
    saved = load_file(str(tmp_path / "run" / "prompt.safetensors"))
    assert saved and all(t.dtype == torch.float32 for t in saved.values())
    state = torch.load(tmp_path / "run" / "checkpoint-last" / "trainer_state.pt", weights_only=False)
    moments = [v for s in state["optimizer"]["state"].values() for k, v in s.items() if k != "step"]
    assert moments and all(t.dtype == torch.float32 for t in moments)
    # the method handed back is not left wrapped in autocast: outside the engine it runs in fp32 again
    seen["text"].clear()
    with torch.no_grad():
        method.train(False)
        method(pixel_values=torch.randn(2, 3, 32, 32))
    assert dtypes(seen["text"], grad=False) == {torch.float32}


def test_bf16_caches_features_under_autocast_and_fp32_stays_fp32(tiny_model_dir, engine_data_root, tmp_path):
    # CoOp with --no-augment: image features are extracted once (no gradients) and the text tower trains
    _, seen, _ = fit(tiny_model_dir, engine_data_root, tmp_path / "bf16", "coop", "bf16", {"n_ctx": 2}, augment=False)
    assert dtypes(seen["image"], grad=False) == {torch.bfloat16}
    assert dtypes(seen["image"], grad=True) == set()  # cached: the image tower never runs in a training step
    assert dtypes(seen["text"], grad=True) == {torch.bfloat16}
    # fp32 in the same process afterwards (accelerate's process-wide state is reset for it): no autocast anywhere
    _, seen, _ = fit(tiny_model_dir, engine_data_root, tmp_path / "fp32", "coop", "fp32", {"n_ctx": 2}, augment=False)
    for tower in ("text", "image"):
        assert {dtype for _, dtype in seen[tower]} == {torch.float32}, tower


def test_bf16_and_fp32_training_agree_closely(tiny_model_dir, engine_data_root, tmp_path):
    losses = {}
    for precision in ("fp32", "bf16"):
        fit(tiny_model_dir, engine_data_root, tmp_path / precision, "vpt_deep", precision, {"n_tokens": 2})
        records = [json.loads(line) for line in (tmp_path / precision / "metrics.jsonl").read_text().splitlines()]
        losses[precision] = records[0]["train_loss"]
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=0.05, abs=0.02)


def test_make_accelerator_switches_precision_within_one_process():
    x = torch.randn(4, 4)
    for precision, expected in [("bf16", torch.bfloat16), ("fp32", torch.float32), ("bf16", torch.bfloat16)]:
        accelerator = make_accelerator(precision)
        with accelerator.autocast():
            assert (x @ x).dtype == expected, precision


def test_evaluate_checkpoint_runs_in_the_requested_precision(engine_coop_run, engine_data_root, monkeypatch):
    run_dir, trained = engine_coop_run
    records = []

    def loading(spec):
        backbone = load_backbone(spec)
        records.append(record_dtypes(backbone))
        return backbone

    patch_backbone_loading(monkeypatch, loading)
    data = DataOptions(dataset="eurosat", root=str(engine_data_root))
    fp32 = evaluate_checkpoint(run_dir, data)
    bf16 = evaluate_checkpoint(run_dir, data, precision="bf16")
    assert len(records) == 2  # one backbone loaded per evaluation, and recorded here
    assert fp32["accuracy"] == trained["accuracy"] and fp32["n"] == bf16["n"] == N_TEST
    for tower in ("text", "image"):
        assert {d for _, d in records[0][tower]} == {torch.float32}
        assert {d for _, d in records[1][tower]} == {torch.bfloat16}


# ------------------------------------------------------------------------------------------------ fp16 on a CPU
@pytest.mark.skipif(not NO_CUDA, reason="fp16 runs where there is a GPU")
def test_fp16_without_a_gpu_fails_before_loading_anything(tiny_model_dir, engine_data_root, engine_run_options,
                                                          engine_coop_run, tmp_path, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("the backbone must not be loaded for a precision that cannot run")

    patch_backbone_loading(monkeypatch, no_loading)
    options = engine_run_options(tiny_model_dir, engine_data_root, tmp_path / "run", precision="fp16")
    with pytest.raises(TrainingError, match="fp16 mixed precision needs a GPU.*--precision bf16"):
        train(options, progress=False, log=quiet)
    assert not (tmp_path / "run").exists()
    with pytest.raises(TrainingError, match="needs a GPU"):
        evaluate_checkpoint(engine_coop_run[0], DataOptions(dataset="eurosat", root=str(engine_data_root)),
                            precision="fp16")


def cli(*argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


@pytest.mark.skipif(not NO_CUDA, reason="fp16 runs where there is a GPU")
@pytest.mark.parametrize("command", ["train", "eval", "bench"])
def test_cli_fp16_without_a_gpu_exits_2_with_one_line(command, tiny_model_dir, engine_data_root, engine_coop_run,
                                                      tmp_path, monkeypatch):
    monkeypatch.delenv("VLPROMPT_DEBUG", raising=False)
    data = ["--dataset", "eurosat", "--data-root", engine_data_root]
    argv = {
        "train": ["train", "--model", tiny_model_dir, *data, "--output", tmp_path / "run", "--quiet"],
        "eval": ["eval", engine_coop_run[0], *data],
        "bench": ["bench", "--methods", "coop", "--datasets", "eurosat", "--data-root", engine_data_root,
                  "--model", tiny_model_dir, "--shots", "1", "--seeds", "1", "--output", tmp_path / "bench"],
    }[command]
    code, out, err = cli(*argv, "--precision", "fp16")
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"vlprompt {command}: error: ")
    assert "fp16 mixed precision needs a GPU" in lines[0] and "--precision bf16" in lines[0]


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_train_and_eval_with_bf16(tiny_model_dir, engine_data_root, tmp_path):
    run_dir = tmp_path / "run"
    code, out, err = cli(
        "train", "--model", tiny_model_dir, "--method", "coop", "--dataset", "eurosat", "--data-root",
        engine_data_root, "--epochs", "1", "--batch-size", "4", "--output", run_dir, "--quiet", "--precision", "bf16",
        "--set", "method.n_ctx=2",
    )
    assert code == 0, err
    config = json.loads((run_dir / "run_config.json").read_text())
    assert config["train"]["precision"] == "bf16"
    trained = json.loads(out.strip().splitlines()[-1])
    code, out, err = cli("eval", run_dir, "--dataset", "eurosat", "--data-root", engine_data_root,
                         "--precision", "bf16")
    assert code == 0, err
    evaluated = json.loads(out.strip().splitlines()[-1])
    assert evaluated["n"] == trained["n"] == N_TEST
    assert evaluated["accuracy"] == trained["accuracy"]  # the same bf16 evaluation as at the end of training


def test_cli_bench_precisions_get_their_own_runs_and_files(tiny_model_dir, engine_data_root, tmp_path):
    data_root = shutil.copytree(engine_data_root, tmp_path / "data")  # few-shot splits get cached in the data root
    out_dir = tmp_path / "bench"
    common = [
        "bench", "--methods", "zeroshot", "coop", "--datasets", "eurosat", "--data-root", data_root, "--model",
        tiny_model_dir, "--shots", "1", "--seeds", "1", "--output", out_dir, "--set", "default_train.epochs=1",
        "--set", "default_train.batch_size=4", "--set", "recipes.coop.method_options.n_ctx=2",
    ]
    code, out, err = cli(*common)
    assert code == 0, err
    code, out, err = cli(*common, "--precision", "bf16")
    assert code == 0, err
    assert "already finished" not in out  # the fp32 runs were not taken for bf16 ones

    runs = out_dir / "runs" / "fewshot" / "eurosat" / "coop"
    assert sorted(p.name for p in runs.iterdir()) == ["shots1_seed1", "shots1_seed1_bf16"]
    for name, precision in (("shots1_seed1", "fp32"), ("shots1_seed1_bf16", "bf16")):
        assert json.loads((runs / name / "run_config.json").read_text())["train"]["precision"] == precision
        assert {r["precision"] for r in json.loads((runs / name / "result.json").read_text())["rows"]} == {precision}
    fp32_csv = (out_dir / "results.csv").read_text().splitlines()
    bf16_csv = (out_dir / "results_bf16.csv").read_text().splitlines()
    assert fp32_csv[0].endswith(",precision") and len(fp32_csv) == len(bf16_csv) == 3
    assert all(line.endswith(",fp32") for line in fp32_csv[1:]) and all(line.endswith(",bf16") for line in bf16_csv[1:])
    assert (out_dir / "results.md").exists()
    report = (out_dir / "results_bf16.md").read_text()
    assert report.startswith("# Bench results (bf16)")
    assert "## bf16 vs fp32" in report and "| coop | 1 |" in report and "| zeroshot | 1 |" in report

    code, out, err = cli(*common, "--precision", "bf16")  # resumable: finished bf16 runs are reused
    assert code == 0, err
    assert "2 of 2 runs were already finished" in out


def test_bench_refuses_a_precision_hidden_in_train_options():
    from vlprompt.protocols.runner import BenchConfig, Recipe

    with pytest.raises(ValueError, match="precision"):
        BenchConfig(methods=["coop"], datasets=["eurosat"], default_train={"precision": "bf16"})
    with pytest.raises(ValueError, match="precision"):
        BenchConfig(methods=["coop"], datasets=["eurosat"], recipes={"coop": Recipe(train={"precision": "bf16"})})
    with pytest.raises(ValueError, match=r"bench.precision='fp64' \(expected one of 'fp32', 'bf16', 'fp16'\)"):
        BenchConfig(methods=["coop"], datasets=["eurosat"], precision="fp64")
