"""A job of several processes (torchrun, gloo on this CPU) trains like one process with the same global batch.

Each test launches ``tests/jobs/distributed_train.py`` under ``python -m torch.distributed.run`` with two CPU
processes and compares the run folder with a single-process run in this process: same prompt (float tolerance),
same per-epoch losses and metrics, the run folder written by the main process only. Training augmentation is on:
crops are seeded per image, so they do not depend on which process reads an image.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vlprompt.engine.api import train
from vlprompt.engine.checkpoint import RESUME_DIR
from vlprompt.fileio import exclusive_folder

JOB = Path(__file__).parent / "jobs" / "distributed_train.py"
# Two processes sum their slices' gradients in another order than one process sums its batch: float rounding only.
PROMPT_ATOL = 1e-5
LOSS_RTOL = 1e-5


def quiet(_: str) -> None:
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(options, tmp_path: Path, processes: int = 2, **job) -> tuple[subprocess.CompletedProcess, list[dict]]:
    """Run ``options`` as a torchrun job of ``processes`` CPU processes; returns the process and each rank's report."""
    out = tmp_path / f"reports_{Path(options.output).name}_{len(list(tmp_path.glob('reports_*')))}"
    out.mkdir()
    spec = {"options": {"model": options.model, "method": options.method, "method_options": options.method_options,
                        "data": asdict(options.data), "train": asdict(options.train), "output": options.output},
            "out": str(out), **job}  # fmt: skip
    job_file = out / "job.json"
    job_file.write_text(json.dumps(spec))
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(JOB), str(job_file)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    reports = [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]
    return proc, reports


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(run_dir: Path, reference: Path) -> None:
    ours, theirs = load_file(Path(run_dir) / "prompt.safetensors"), load_file(Path(reference) / "prompt.safetensors")
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], atol=PROMPT_ATOL, rtol=0, msg=name)
    for got, want in zip(metrics(run_dir), metrics(reference), strict=True):
        assert got.keys() == want.keys()
        for key, value in want.items():
            if key.endswith("time_s"):
                continue
            if key.endswith("loss") or key.startswith("loss_"):
                assert got[key] == pytest.approx(value, rel=LOSS_RTOL), key
            else:
                assert got[key] == value, key  # accuracies: counts summed over processes, exact
    assert json.loads((Path(run_dir) / "results.json").read_text()) == \
        json.loads((Path(reference) / "results.json").read_text())  # fmt: skip


CASES = {
    # batch 5 of 12 images: slices of 2 and 3, then 1 and 1
    "coop": dict(method="coop", method_options={"n_ctx": 2}, batch_size=5, augment=True),
    # batch 11 of 12 images: the second step's batch has one image, so one process's slice is empty
    "vpt_deep": dict(method="vpt_deep", method_options={"n_tokens": 2}, batch_size=11, augment=True),
    # no augmentation: CoOp trains on image features computed once, each process a block, then gathered
    "coop_cached_features": dict(method="coop", method_options={"n_ctx": 2}, batch_size=5, augment=False),
    # fitted on gathered features; the main process's fit is broadcast
    "linear_probe": dict(method="linear_probe", method_options={"c_values": [0.1, 10.0], "max_iter": 50},
                         batch_size=4, augment=False),
    # regularisers against the frozen model and a prompt aggregate updated after every epoch in every process
    "promptsrc": dict(method="promptsrc", method_options={"text_depth": 2, "image_depth": 2, "gpa_mean": 2.0},
                      batch_size=5, augment=True),
    # LoRA weights inside the backbone are the trained tensors (dropout 0: each process draws its own masks)
    "clip_lora": dict(method="clip_lora", method_options={"dropout": 0.0}, batch_size=5, augment=True),
    # fitted on gathered features, broadcast, then its keys trained by steps and alpha / beta searched again
    "tip_adapter_f": dict(method="tip_adapter_f", method_options={}, batch_size=5, augment=False),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_two_processes_end_with_the_prompt_and_metrics_of_one(case, tiny_model_dir, engine_data_root,
                                                              engine_run_options, tmp_path):  # fmt: skip
    spec = dict(CASES[case])
    make = lambda output: engine_run_options(tiny_model_dir, engine_data_root, output,  # noqa: E731
                                             method=spec["method"], method_options=spec["method_options"],
                                             batch_size=spec["batch_size"], augment=spec["augment"], epochs=2)
    single = tmp_path / "single"
    expected = train(make(single), progress=False, log=quiet)

    proc, reports = launch(make(tmp_path / "two"), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_run(tmp_path / "two", single)
    assert [r["result"] for r in reports] == [expected, expected]  # every process returns the final metrics
    main, other = reports
    assert main["written"] and not other["written"]  # the run folder is written by the main process only
    assert json.loads((tmp_path / "two" / "run_config.json").read_text())["processes"] == 2
    epochs_logged = proc.stdout.count("epoch 2/2 loss")
    assert epochs_logged == (0 if case == "linear_probe" else 1)  # one job, one voice


def test_a_job_on_a_run_folder_another_process_writes_is_refused_in_every_process(
        tiny_model_dir, engine_data_root, engine_run_options, tmp_path):  # fmt: skip
    run_dir = tmp_path / "busy"
    with exclusive_folder(run_dir):  # another job is writing this folder
        proc, reports = launch(engine_run_options(tiny_model_dir, engine_data_root, run_dir), tmp_path)
    assert proc.returncode != 0
    assert len(reports) == 2  # no process waits forever for the refused main one
    for report in reports:
        assert "is being written by vlprompt process" in report["error"] and "--output" in report["error"]
        assert not report["written"]
    assert sorted(p.name for p in run_dir.iterdir()) == [".vlprompt.lock"]


def test_a_run_of_two_processes_resumes_in_one_and_ends_as_if_never_interrupted(
        tiny_model_dir, engine_data_root, engine_run_options, tmp_path):  # fmt: skip
    make = lambda output: engine_run_options(tiny_model_dir, engine_data_root, output, epochs=3,  # noqa: E731
                                             batch_size=5, augment=True, warmup_epochs=1)
    uninterrupted = tmp_path / "uninterrupted"
    expected = train(make(uninterrupted), progress=False, log=quiet)

    interrupted = tmp_path / "interrupted"
    proc, _ = launch(make(interrupted), tmp_path, crash_after_epoch=1)
    assert proc.returncode != 0 and (interrupted / RESUME_DIR / "state.json").exists()
    assert train(make(interrupted), resume=True, progress=False, log=quiet) == expected  # now one process
    assert_same_run(interrupted, uninterrupted)
    assert json.loads((interrupted / "run_config.json").read_text())["processes"] == 1


# ------------------------------------------------------------------------------------------------ bench and options
def test_bench_workers_take_the_gpus_in_turn(monkeypatch):
    import multiprocessing

    from vlprompt.protocols import runner

    started = multiprocessing.get_context("spawn").Value("i", 0)
    seen = []
    for _ in range(3):
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
        runner._init_worker(1, 40, False, started, ["3", "5"])
        seen.append(os.environ["CUDA_VISIBLE_DEVICES"])
    assert seen == ["3", "5", "3"]


def test_a_bench_launched_on_several_processes_refuses_workers_too(monkeypatch, tmp_path):
    from vlprompt.protocols.runner import BenchConfig, run_bench

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="--workers 2 in a bench started with 2 processes"):
        run_bench(BenchConfig(methods=["coop"], datasets=["toy:shapes"], output=str(tmp_path / "bench"), workers=2),
                  log=quiet)
    assert not (tmp_path / "bench").exists()


def test_cuda_graphs_without_a_gpu_are_refused_with_the_fix(tmp_path):
    from vlprompt.engine.trainer import TrainConfig, Trainer, TrainingError

    with pytest.raises(TrainingError, match="needs a GPU.*train.compile=default"):
        Trainer(TrainConfig(compile="reduce-overhead"), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_detection_on_two_processes_ends_like_one(tmp_path):
    """The detector's loss is normalised by the batch's target boxes: each process weights its slice by its share
    of them (``DetectionTask.loss_weight``), with transformers' own cross-process box averaging kept out."""
    from vlprompt.backbones.grounding_dino_presets import save_random_grounding_dino
    from vlprompt.data.coco import write_toy_detection
    from vlprompt.engine.api import DataOptions, RunOptions, TrainConfig

    detector = save_random_grounding_dino(tmp_path / "gdino", "grounding-dino-micro")
    coco = write_toy_detection(tmp_path / "coco", 8, 4, 6, size=64, seed=0)  # one image size: the same padding

    def make(output):
        return RunOptions(model=str(detector), method="sdpt_native", method_options={},
                          data=DataOptions(dataset=f"coco:{coco}", shots=2),
                          train=TrainConfig(epochs=2, batch_size=3, optimizer="adamw", lr=0.01, warmup_epochs=0),
                          output=str(output))  # fmt: skip

    expected = train(make(tmp_path / "single"), progress=False, log=quiet)
    proc, reports = launch(make(tmp_path / "two"), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["result"] for r in reports] == [reports[0]["result"]] * 2
    ours, theirs = load_file(tmp_path / "two" / "prompt.safetensors"), load_file(tmp_path / "single" / "prompt.safetensors")
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], atol=1e-4, rtol=1e-4, msg=name)
    for got, want in zip(metrics(tmp_path / "two"), metrics(tmp_path / "single"), strict=True):
        if "train_loss" in want:
            assert got["train_loss"] == pytest.approx(want["train_loss"], rel=1e-4)
    assert reports[0]["result"]["mAP"] == pytest.approx(expected["mAP"], abs=0.5)


def test_an_error_in_one_process_stops_every_process_at_that_step(tiny_model_dir, engine_data_root,
                                                                   engine_run_options, tmp_path):  # fmt: skip
    import shutil

    data = tmp_path / "data"
    shutil.copytree(engine_data_root, data)
    split = json.loads((data / "eurosat" / "split_zhou_EuroSAT.json").read_text())
    corrupt = data / "eurosat" / "2750" / split["train"][0][0]
    corrupt.write_bytes(b"not an image")  # read by one process only: a batch of 12 is cut into two slices of 6
    proc, reports = launch(engine_run_options(tiny_model_dir, data, tmp_path / "run", batch_size=12, augment=True),
                           tmp_path)  # fmt: skip
    assert proc.returncode != 0
    errors = sorted(report["error"] for report in reports)
    assert len(errors) == 2, proc.stderr[-2000:]  # neither waited for the other
    assert any(corrupt.name in e and "corrupt" in e for e in errors)
    assert any("other process(es) of this job failed" in e and "epoch 1, step 1" in e for e in errors)


def test_the_cli_under_torchrun_trains_once_and_reports_once(tiny_model_dir, engine_data_root, tmp_path):
    """docs/scaling.md's command form: ``torchrun --nproc_per_node N -m vlprompt.cli train ...``."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "vlprompt.cli", "train", "--model", str(tiny_model_dir),
           "--method", "coop", "--dataset", "eurosat", "--data-root", str(engine_data_root), "--epochs", "1",
           "--batch-size", "4", "--output", str(tmp_path / "run"), "--quiet"]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert sum(line.startswith("training coop") for line in lines) == 1
    assert "(2 processes, global batch 4)" in proc.stdout
    reports = [json.loads(line) for line in lines if line.startswith("{")]
    assert len(reports) == 1 and reports[0]["output"] == str(tmp_path / "run")
    assert json.loads((tmp_path / "run" / "run_config.json").read_text())["processes"] == 2


def test_a_bench_under_torchrun_trains_each_run_with_every_process_and_writes_once(tiny_model_dir, engine_data_root,
                                                                                    tmp_path):  # fmt: skip
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    out = tmp_path / "bench"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "vlprompt.cli", "bench", "--methods", "coop", "--datasets",
           "eurosat", "--data-root", str(engine_data_root), "--model", str(tiny_model_dir), "--shots", "2",
           "--seeds", "1", "--output", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("# Bench results") == 1  # the report, printed by the main process only
    (run_config,) = list(out.rglob("run_config.json"))
    assert json.loads(run_config.read_text())["processes"] == 2
    assert len((out / "results.csv").read_text().splitlines()) == 2  # header + the one run's row


def test_crops_depend_on_neither_processes_nor_loader_workers(tiny_model_dir, engine_data_root, engine_run_options,
                                                             tmp_path):  # fmt: skip
    make = lambda output, workers: engine_run_options(tiny_model_dir, engine_data_root, output,  # noqa: E731
                                                      batch_size=5, augment=True, num_workers=workers)
    train(make(tmp_path / "single", 0), progress=False, log=quiet)
    proc, _ = launch(make(tmp_path / "two", 2), tmp_path)  # two processes, each with two loader workers
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_run(tmp_path / "two", tmp_path / "single")


def test_loader_workers_fork_only_in_a_single_process():
    from vlprompt.engine import distributed

    # one process: torch's default start method (fork); no workers: nothing to start
    assert distributed.loader_worker_context(2) is None
    assert distributed.loader_worker_context(0) is None
