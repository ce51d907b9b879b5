"""Bench recipes: epochs by shot count, and finished runs reused only when trained as the bench would train them."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from vlprompt.cli import main
from vlprompt.protocols.runner import BenchConfig, Job, Recipe, _run_options, job_epochs


def _config(**kw) -> BenchConfig:
    return BenchConfig(**{"methods": ["coop", "vpt_deep"], "datasets": ["eurosat"], "model": "random:tiny", **kw})


def test_epochs_by_shots_precedence():
    config = _config(default_train={"epochs": 3}, default_epochs_by_shots={16: 20, 1: 5})
    plain, own_epochs = Recipe(), Recipe(train={"epochs": 7})
    by_shots = Recipe(train={"epochs": 7}, epochs_by_shots={16: 40})
    assert job_epochs(config, plain, 16) == 20  # bench default by shots beats default_train
    assert job_epochs(config, plain, 4) == 3  # shot count not named: default_train
    assert job_epochs(config, own_epochs, 16) == 7  # a recipe's own epochs beat the bench defaults
    assert job_epochs(config, by_shots, 16) == 40 and job_epochs(config, by_shots, 1) == 7
    assert job_epochs(_config(), plain, 16) is None  # nothing set: the engine's default


def test_run_options_take_the_epochs_of_the_job_shots(tmp_path):
    config = _config(default_train={"epochs": 3, "lr": 0.01}, default_epochs_by_shots={"16": 12},
                     recipes={"vpt_deep": Recipe(epochs_by_shots={"2": 9})})
    for method, shots, epochs in (("coop", 16, 12), ("coop", 2, 3), ("vpt_deep", 2, 9), ("vpt_deep", 16, 12)):
        options = _run_options(config, Job("fewshot", "eurosat", method, shots, 1), tmp_path)
        assert (options.train.epochs, options.train.lr) == (epochs, 0.01)


@pytest.mark.parametrize("mapping", [{16: 0}, {0: 5}, {"x": 5}, {16: 2.5}, {16: None}])
def test_bad_epochs_by_shots_are_refused(mapping):
    with pytest.raises(ValueError, match="epochs_by_shots"):
        _config(default_epochs_by_shots=mapping)
    with pytest.raises(ValueError, match="epochs_by_shots"):
        Recipe(epochs_by_shots=mapping)


def _cli(*args) -> tuple[int, str, str]:
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def test_bench_reuses_a_finished_run_only_when_trained_with_the_same_settings(tiny_model_dir, engine_data_root,
                                                                              tmp_path):
    data_root = shutil.copytree(engine_data_root, tmp_path / "data")
    out_dir = tmp_path / "bench"
    common = [
        "bench", "--methods", "coop", "--datasets", "eurosat", "--data-root", data_root, "--model", tiny_model_dir,
        "--shots", "1", "--seeds", "1", "--output", out_dir, "--set", "default_train.batch_size=4",
        "--set", "recipes.coop.method_options.n_ctx=2",
    ]
    code, out, err = _cli(*common, "--set", "default_train.epochs=1")
    assert code == 0, err
    result = Path(out_dir, "runs", "fewshot", "eurosat", "coop", "shots1_seed1", "result.json")
    before = result.read_bytes()

    code, out, err = _cli(*common, "--set", "default_train.epochs=1", "--set", "default_train.eval_batch_size=7")
    assert code == 0, err
    assert "1 of 1 runs were already finished" in out  # evaluation batching cannot change a result

    code, out, err = _cli(*common, "--set", "default_train.epochs=1", "--set", "default_epochs_by_shots.1=2")
    assert code == 2
    assert "trained with other settings" in err and "train.epochs: 1 -> 2" in err and "--output" in err
    code, out, err = _cli(*common, "--set", "default_train.epochs=1", "--set", "recipes.coop.method_options.n_ctx=3")
    assert code == 2 and "method_options.n_ctx: 2 -> 3" in err
    assert result.read_bytes() == before  # the finished run was left as it was


@pytest.mark.parametrize("datasets,extra,message", [
    (["eurosat"], ["--set", "recipes.coop.train.lrr=0.01"], "unknown training option(s) ['recipes.coop.train.lrr']"),
    (["eurosat"], ["--set", "recipes.coop.method_options.n_ctxx=2"], "no option(s) ['n_ctxx']"),
    (["eurosat", "nosuchset"], [], "unknown dataset 'nosuchset'"),
])
def test_bench_typos_stop_it_before_the_first_run(tiny_model_dir, engine_data_root, tmp_path, datasets, extra,
                                                  message):
    out_dir = tmp_path / "bench"
    code, out, err = _cli("bench", "--methods", "zeroshot", "coop", "--datasets", *datasets, *extra, "--data-root",
                          engine_data_root, "--model", tiny_model_dir, "--shots", "1", "--seeds", "1", "--output",
                          out_dir)
    assert code == 2 and message in err, err
    assert "Traceback" not in err and not (out_dir / "runs").exists()


def test_bench_config_with_bad_epochs_by_shots_exits_2(tmp_path):
    code, out, err = _cli("bench", "--methods", "coop", "--datasets", "eurosat", "--output", tmp_path,
                          "--set", "default_epochs_by_shots.16=0")
    assert code == 2 and "epochs_by_shots" in err


def test_embedded_model_results_name_the_weights_they_came_from(tmp_path):
    from vlprompt.assets import embedded_weights_digest
    from vlprompt.protocols.runner import job_settings

    options = _run_options(_config(model="embedded"), Job("fewshot", "toy:shapes", "coop", 16, 1), tmp_path)
    model = job_settings(options)["model"]
    assert model == f"embedded@{embedded_weights_digest()}" and len(model) == len("embedded@") + 16


def test_toy_results_name_the_dataset_version_they_came_from(tmp_path, monkeypatch):
    """A toy dataset is regenerated when its spec changes (e.g. fewer classes); runs measured on the old version
    must not be reused for the new one."""
    import dataclasses

    from vlprompt.protocols.runner import job_settings
    from vlprompt.toyworld import suite

    job = Job("fewshot", "toy:texture", "coop", 1, 1, evals=(("toy:texture", "all"), ("eurosat", "all")))
    options = _run_options(_config(model="embedded"), job, tmp_path)
    data = job_settings(options, [d for d, _ in job.evals])["data"]
    assert set(data) == {"toy:texture"}  # real datasets carry no digest

    monkeypatch.setitem(suite.SUITE, "texture", dataclasses.replace(suite.SUITE["texture"], counts=(32, 8, 61)))
    changed = job_settings(options, [d for d, _ in job.evals])["data"]
    assert changed["toy:texture"] != data["toy:texture"]


def test_methods_tied_to_their_classes_are_evaluated_on_base_classes_only():
    from vlprompt.protocols.runner import plan_jobs

    config = BenchConfig(methods=["linear_probe", "coop"], datasets=["eurosat", "dtd"],
                         protocols=["base2novel", "crossdataset"], seeds=[1])
    evals = {(j.protocol, j.method, j.dataset): j.evals for j in plan_jobs(config)}
    assert evals[("base2novel", "linear_probe", "eurosat")] == (("eurosat", "base"),)
    assert evals[("base2novel", "coop", "eurosat")] == (("eurosat", "base"), ("eurosat", "novel"))
    assert evals[("crossdataset", "linear_probe", "eurosat")] == (("eurosat", "all"),)
    assert evals[("crossdataset", "coop", "eurosat")] == (("eurosat", "all"), ("dtd", "all"))
    csc = BenchConfig(methods=["coop"], datasets=["eurosat"], protocols=["base2novel"], seeds=[1],
                      recipes={"coop": Recipe(method_options={"class_specific": True})})
    assert [j.evals for j in plan_jobs(csc)] == [(("eurosat", "base"),)]


def test_base_to_novel_bench_with_a_linear_probe_reports_base_only(tiny_model_dir, engine_data_root, tmp_path):
    data_root = shutil.copytree(engine_data_root, tmp_path / "data")
    out_dir = tmp_path / "bench"
    code, out, err = _cli(
        "bench", "--methods", "linear_probe", "coop", "--datasets", "eurosat", "--protocols", "base2novel",
        "--data-root", data_root, "--model", tiny_model_dir, "--seeds", "1", "--output", out_dir,
        "--set", "default_train.batch_size=4", "--set", "default_train.epochs=1", "--set", "b2n_shots=1",
        "--set", "recipes.coop.method_options.n_ctx=2",
    )
    assert code == 0, err
    report = Path(out_dir, "results.md").read_text()
    probe_row = next(line for line in report.splitlines() if line.startswith("| linear_probe |"))
    assert probe_row.split("|")[3].strip() == "-" and probe_row.split("|")[4].strip() == "-"
    coop_row = next(line for line in report.splitlines() if line.startswith("| coop |"))
    assert "-" not in coop_row.split("|")[3]


def test_parallel_workers_give_the_sequential_results_in_plan_order(tiny_model_dir, engine_data_root, tmp_path,
                                                                  capfd):
    from vlprompt.protocols.runner import read_csv

    data_root = shutil.copytree(engine_data_root, tmp_path / "data")
    common = [
        "bench", "--methods", "zeroshot", "coop", "vpt_deep", "--datasets", "eurosat", "--data-root", data_root,
        "--model", tiny_model_dir, "--shots", "1", "2", "--seeds", "1", "--set", "default_train.batch_size=4",
        "--set", "default_train.epochs=1", "--set", "recipes.coop.method_options.n_ctx=2",
    ]
    code, _, err = _cli(*common, "--output", tmp_path / "seq")
    assert code == 0, err
    capfd.readouterr()
    code, out, err = _cli(*common, "--output", tmp_path / "par", "--workers", "2")
    assert code == 0, err
    worker_output = capfd.readouterr()  # the workers write to the process's file descriptors
    assert "Loading weights" not in worker_output.err + worker_output.out  # quiet as the CLI itself
    seq, par = read_csv(tmp_path / "seq" / "results.csv"), read_csv(tmp_path / "par" / "results.csv")
    key = ("method", "shots", "seed", "eval_dataset", "subset")
    assert [tuple(r[k] for k in key) for r in par] == [tuple(r[k] for k in key) for r in seq]
    for a, b in zip(seq, par):  # one thread per worker instead of two: the same up to float summation order
        assert a["accuracy"] == pytest.approx(b["accuracy"], abs=1e-6)
    code, out, err = _cli(*common, "--output", tmp_path / "par", "--workers", "2")
    assert code == 0 and "5 of 5 runs were already finished" in out


@pytest.mark.parametrize("workers", [0, -1])
def test_bench_refuses_a_worker_count_below_one(workers):
    with pytest.raises(ValueError, match=r"bench.workers=-?\d \(must be >= 1\)"):
        _config(workers=workers)


def test_domain_protocol_defaults_to_the_fields_targets_and_refuses_none():
    from vlprompt.protocols.runner import BenchConfig

    config = BenchConfig(methods=["zeroshot"], datasets=["toy:shapes", "imagenet"], protocols=["domain"])
    assert config.domain_targets == {
        "toy:shapes": ["toy:shapes_v2", "toy:shapes_sketch", "toy:shapes_noisy", "toy:shapes_lowcontrast",
                       "toy:shapes_rendition"],
        "imagenet": ["imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r"],
    }
    with pytest.raises(ValueError, match="domain protocol needs its targets"):
        BenchConfig(methods=["zeroshot"], datasets=["eurosat"], protocols=["domain"])


def test_report_records_the_command_that_ran_and_report_only_keeps_it(tiny_model_dir, engine_data_root, tmp_path):
    out_dir = tmp_path / "bench"
    args = ["bench", "--methods", "zeroshot", "--datasets", "eurosat", "--data-root", engine_data_root, "--model",
            tiny_model_dir, "--shots", "1", "--seeds", "1", "--output", out_dir]
    assert _cli(*args)[0] == 0
    first = next(x for x in Path(out_dir, "results.md").read_text().splitlines() if x.startswith("Command: "))
    assert first == "Command: `vlprompt " + " ".join(str(a) for a in args) + "`"
    assert _cli(*args, "--report-only")[0] == 0
    assert first in Path(out_dir, "results.md").read_text().splitlines()


def test_a_bench_rerun_with_fewer_methods_keeps_the_earlier_rows_in_results_and_report(tiny_model_dir,
                                                                                     engine_data_root, tmp_path):
    data_root = shutil.copytree(engine_data_root, tmp_path / "data")
    out_dir = tmp_path / "bench"
    common = ["bench", "--datasets", "eurosat", "--data-root", data_root, "--model", tiny_model_dir, "--shots", "1",
              "--seeds", "1", "--output", out_dir, "--set", "default_train.batch_size=4",
              "--set", "default_train.epochs=1"]
    code, _, err = _cli(*common, "--methods", "zeroshot", "coop")
    assert code == 0, err
    code, out, err = _cli(*common, "--methods", "zeroshot")
    assert code == 0, err
    methods = [line.split(",")[4] for line in (out_dir / "results.csv").read_text().splitlines()[1:]]
    assert sorted(methods) == ["coop", "zeroshot"]
    assert "| coop |" in (out_dir / "results.md").read_text()


def test_report_only_needs_only_the_bench_folder(tiny_model_dir, engine_data_root, tmp_path):
    out_dir = tmp_path / "bench"
    args = ["bench", "--methods", "zeroshot", "--datasets", "eurosat", "--data-root", engine_data_root, "--model",
            tiny_model_dir, "--shots", "1", "--seeds", "1", "--output", out_dir]
    assert _cli(*args)[0] == 0
    report = Path(out_dir, "results.md").read_text()
    code, _, err = _cli("bench", "--report-only", "--output", out_dir)
    assert code == 0, err
    assert Path(out_dir, "results.md").read_text() == report
    code, _, err = _cli("bench", "--report-only", "--output", tmp_path / "nothing_here")
    assert code != 0 and "holds no bench" in err and "--output" in err
