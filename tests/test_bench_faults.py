"""User-facing faults of `vlprompt bench` found in review: each test reproduces one and checks the one-line error
(exit 2) or the corrected behaviour, and that no run folder or file is lost or left behind."""
from __future__ import annotations

import contextlib
import io
import shutil
from pathlib import Path

import pytest

from vlprompt.cli import main
from vlprompt.protocols.runner import BenchConfig


def _cli(*args) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def _one_line_error(code: int, err: str) -> str:
    assert code == 2 and "Traceback" not in err, err
    assert err.count("\n") == 1 and err.startswith("vlprompt "), err
    return err


@pytest.fixture(scope="module")
def finished_bench(tiny_model_dir, engine_data_root, tmp_path_factory):
    """A finished fp32 bench of zeroshot and coop (1 shot, 1 seed, 1 epoch): (its folder, the arguments that ran it).
    Tests copy the folder before changing it."""
    out_dir = tmp_path_factory.mktemp("faults") / "bench"
    args = ["bench", "--methods", "zeroshot", "coop", "--datasets", "eurosat", "--data-root", engine_data_root,
            "--model", tiny_model_dir, "--shots", "1", "--seeds", "1", "--set", "default_train.batch_size=4",
            "--set", "default_train.epochs=1", "--set", "recipes.coop.method_options.n_ctx=2"]
    code, _, err = _cli(*args, "--output", out_dir)
    assert code == 0, err
    return out_dir, args


def _copy(finished_bench, tmp_path) -> Path:
    return Path(shutil.copytree(finished_bench[0], tmp_path / "bench"))


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# b03 / b31 ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flags,message", [
    (["--methods", "zeroshot", "zeroshot", "--datasets", "toy:shapes", "--seeds", "1"],
     "methods lists 'zeroshot' more than once"),
    (["--methods", "coop", "CoOp", "--datasets", "toy:shapes", "--seeds", "1"],  # an alias is the same method
     "methods lists 'coop' more than once"),
    (["--methods", "zeroshot", "--datasets", "toy:shapes", "toy:shapes", "--seeds", "1"],
     "datasets lists 'toy:shapes' more than once"),
    (["--methods", "zeroshot", "--datasets", "toy:shapes", "--seeds", "1", "1"], "seeds lists 1 more than once"),
    (["--methods", "zeroshot", "--datasets", "toy:shapes", "--seeds", "1", "--shots", "4", "4"],
     "shots lists 4 more than once"),
])
def test_duplicate_list_values_are_refused_before_any_run(tmp_path, flags, message):
    out_dir = tmp_path / "bench"
    err = _one_line_error(*_cli("bench", *flags, "--output", out_dir)[::2])
    assert message in err and "give each of the" in err
    assert not out_dir.exists()


# b09 ----------------------------------------------------------------------------------------------------------
def test_crossdataset_with_a_single_dataset_is_refused(tmp_path):
    out_dir = tmp_path / "bench"
    code, _, err = _cli("bench", "--methods", "zeroshot", "--datasets", "toy:shapes", "--protocols", "crossdataset",
                        "--seeds", "1", "--output", out_dir)
    err = _one_line_error(code, err)
    assert "crossdataset needs a source and at least one target dataset: give two or more --datasets" in err
    assert not out_dir.exists()
    with pytest.raises(ValueError, match="crossdataset needs"):
        BenchConfig(methods=["coop"], datasets=["dtd"], protocols=["crossdataset"], cross_source="dtd")
    # a source named apart from the datasets: they are its targets
    BenchConfig(methods=["coop"], datasets=["dtd"], protocols=["crossdataset"], cross_source="eurosat")
    BenchConfig(methods=["coop"], datasets=["eurosat", "dtd"], protocols=["crossdataset"])


def test_cross_dataset_targets_added_later_are_evaluated_without_retraining(tiny_model_dir, engine_data_root,
                                                                              tmp_path):
    """tests/test_bench_recipes.py's test of the same name, starting from two datasets (one is refused now)."""
    from data_fixtures import make_split_json_dataset

    data_root = shutil.copytree(engine_data_root, tmp_path / "data")
    make_split_json_dataset(data_root, "dtd", classnames=("banded", "dotted"), per_split=(2, 1, 3), image_size=32)
    make_split_json_dataset(data_root, "oxford_pets", classnames=("abyssinian", "beagle"), per_split=(2, 1, 3),
                            image_size=32)
    out_dir = tmp_path / "bench"
    common = ["bench", "--methods", "coop", "--protocols", "crossdataset", "--data-root", data_root, "--model",
              tiny_model_dir, "--seeds", "1", "--output", out_dir, "--set", "default_train.batch_size=4",
              "--set", "default_train.epochs=1", "--set", "b2n_shots=1", "--set", "recipes.coop.method_options.n_ctx=2"]
    code, out, err = _cli(*common, "--datasets", "eurosat", "dtd")
    assert code == 0, err
    prompt = Path(out_dir, "runs", "crossdataset", "eurosat", "coop", "shots1_seed1", "prompt.safetensors")
    trained = prompt.read_bytes()

    code, out, err = _cli(*common, "--datasets", "eurosat", "dtd", "oxford_pets")
    assert code == 0, err
    assert "evaluated the finished run on 1 new target(s): oxford_pets[all]" in out
    assert prompt.read_bytes() == trained  # not retrained
    rows = Path(out_dir, "results.csv").read_text().splitlines()
    assert sum(",oxford_pets," in row for row in rows) == 1 and sum(",eurosat,eurosat," in row for row in rows) == 1

    code, out, err = _cli(*common, "--datasets", "eurosat", "dtd")  # fewer targets: the finished row stays
    assert code == 0, err
    assert sum(",oxford_pets," in row for row in Path(out_dir, "results.csv").read_text().splitlines()) == 1


# b11 / b09 ----------------------------------------------------------------------------------------------------
def test_protocols_other_than_fewshot_say_they_train_at_b2n_shots(tiny_model_dir, engine_data_root, tmp_path):
    common = ["bench", "--methods", "zeroshot", "--datasets", "eurosat", "--data-root", engine_data_root, "--model",
              tiny_model_dir, "--seeds", "1", "--shots", "4", "--set", "b2n_shots=1"]
    code, out, err = _cli(*common, "--protocols", "fewshot", "base2novel", "--output", tmp_path / "b2n")
    assert code == 0, err
    line = "base2novel train at b2n_shots=1 (change with --set b2n_shots=N); --shots applies to fewshot only"
    assert line in out.splitlines()
    assert "base2novel/eurosat/zeroshot/shots1_seed1" in out  # it did train at b2n_shots, not at --shots
    code, out, err = _cli(*common, "--protocols", "fewshot", "--output", tmp_path / "fewshot")
    assert code == 0, err
    assert "--shots applies to fewshot only" not in out  # nothing to say when only fewshot runs


# b21 / b13 / b14 / b30 ----------------------------------------------------------------------------------------
def test_a_bench_refused_for_changed_settings_leaves_the_folder_as_it_was(finished_bench, tmp_path):
    out_dir = _copy(finished_bench, tmp_path)
    before = _files(out_dir)
    code, _, err = _cli(*finished_bench[1], "--output", out_dir, "--set", "default_train.epochs=2")
    err = _one_line_error(code, err)
    assert "trained with other settings" in err and "train.epochs: 1 -> 2" in err
    assert _files(out_dir) == before  # bench_config.json still records the settings the runs were trained with


@pytest.mark.parametrize("extra", [["--datasets", "eurosat", "nosuchset"],
                                   ["--datasets", "eurosat", "--set", "recipes.coop.train.lrr=1"]])
def test_a_bench_that_fails_its_checks_leaves_nothing_in_a_new_folder(tiny_model_dir, engine_data_root, tmp_path,
                                                                      extra):
    empty, fresh = tmp_path / "empty", tmp_path / "fresh"
    empty.mkdir()
    for out_dir in (empty, fresh):
        code, _, err = _cli("bench", "--methods", "zeroshot", "coop", *extra, "--data-root", engine_data_root,
                            "--model", tiny_model_dir, "--shots", "1", "--seeds", "1", "--output", out_dir)
        _one_line_error(code, err)
    assert list(empty.iterdir()) == [] and not fresh.exists()


def test_a_bench_whose_first_run_fails_leaves_no_empty_results_table(tiny_model_dir, engine_data_root, tmp_path,
                                                                     monkeypatch):
    from vlprompt.protocols import runner

    def fail(*args, **kwargs):
        raise RuntimeError("training failed")

    monkeypatch.setattr(runner, "train", fail)
    config = BenchConfig(methods=["coop"], datasets=["eurosat"], shots=[1], seeds=[1], model=str(tiny_model_dir),
                         data_root=str(engine_data_root), output=str(tmp_path / "bench"))
    with pytest.raises(RuntimeError, match="training failed"):
        runner.run_bench(config, log=lambda _: None)
    assert not (tmp_path / "bench" / "results.csv").exists()
    assert (tmp_path / "bench" / "bench_config.json").is_file()  # checks passed: written before training started


# b19 / b07 ----------------------------------------------------------------------------------------------------
def test_report_only_on_a_bench_with_no_finished_run_is_refused(finished_bench, tmp_path):
    out_dir = _copy(finished_bench, tmp_path)
    header = (out_dir / "results.csv").read_text().splitlines()[0] + "\n"
    (out_dir / "results.csv").write_text(header)
    code, out, err = _cli("bench", "--report-only", "--output", out_dir)
    err = _one_line_error(code, err)
    assert f"results.csv in {out_dir} has no finished run: run the bench first" in err and out == ""

    (out_dir / "results.csv").unlink()
    code, out, err = _cli("bench", "--report-only", "--output", out_dir)
    err = _one_line_error(code, err)
    assert (f"{out_dir} has bench_config.json but no results.csv: the bench finished no run; run it without "
            "--report-only") in err and "Errno" not in err


# b08 ----------------------------------------------------------------------------------------------------------
def test_report_only_reports_the_asked_methods_and_names_those_without_runs(finished_bench, tmp_path):
    out_dir = _copy(finished_bench, tmp_path)
    code, out, err = _cli("bench", "--report-only", "--output", out_dir, "--methods", "coop", "maple")
    assert code == 0, err
    assert f"--report-only: results.csv in {out_dir} has no finished run of maple; the report leaves them out" in out
    report = (out_dir / "results.md").read_text()
    assert "| coop |" in report and "| zeroshot |" not in report and "maple" not in report
    assert "zeroshot" not in (out_dir / "summary.csv").read_text()

    code, _, err = _cli("bench", "--report-only", "--output", out_dir, "--methods", "maple")
    err = _one_line_error(code, err)
    assert "has no finished run of maple: run the bench with them first" in err

    code, out, err = _cli("bench", "--report-only", "--output", out_dir)  # no --methods: every method of the table
    assert code == 0, err
    assert "| coop |" in out and "| zeroshot |" in out


# b06 ----------------------------------------------------------------------------------------------------------
def test_report_only_in_another_precision_names_the_precisions_the_folder_holds(finished_bench, tmp_path):
    out_dir = _copy(finished_bench, tmp_path)
    code, _, err = _cli("bench", "--report-only", "--output", out_dir, "--precision", "bf16")
    err = _one_line_error(code, err)
    assert "holds no bf16 bench (bench_config_bf16.json) but fp32 (bench_config.json)" in err
    assert "drop --precision or change it" in err and "holds no bench" not in err


# b22 / d01 ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("command,what", [(["bench", "--methods", "zeroshot", "--datasets", "toy:shapes"], "bench"),
                                          (["demo", "--quick"], "demo")])
def test_an_output_that_is_a_file_is_refused(tmp_path, monkeypatch, command, what):
    monkeypatch.chdir(tmp_path)
    Path("afile.txt").write_text("keep me")
    code, _, err = _cli(*command, "--output", "afile.txt")
    err = _one_line_error(code, err)
    assert f"--output afile.txt is a file, not a folder: give a folder for the {what}" in err
    assert Path("afile.txt").read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["afile.txt"]


# b02 / b27 / b18 / b17 / b29 ----------------------------------------------------------------------------------
@pytest.mark.parametrize("setting,message", [
    ("epochs=1", "unknown bench key(s) ['epochs']; the keys are: b2n_shots, cross_source, "),
    ("recipes.coop.train.lrr=0.5", "unknown training option(s) ['recipes.coop.train.lrr']; the options are: epochs, "),
    ("recipes.copo.train.lr=0.5", "recipes: names unknown method 'copo'; available: "),
    ("default_train.lr=abc", "default_train.lr='abc'"),
    ("default_train.lrr=1", "unknown training option(s) ['default_train.lrr']"),
])
def test_config_key_errors_name_the_key_and_the_fix(tmp_path, setting, message):
    out_dir = tmp_path / "bench"
    code, _, err = _cli("bench", "--methods", "coop", "--datasets", "toy:shapes", "--shots", "1", "--seeds", "1",
                        "--output", out_dir, "--set", setting)
    err = _one_line_error(code, err)
    assert message in err and "unexpected keyword" not in err and "trainer.py" not in err
    if setting == "epochs=1":
        assert "engine options for every run go under default_train (e.g. --set default_train.epochs=1)" in err
    if "lrr" in setting:
        assert "warmup_epochs" in err  # the fields are listed, not pointed to
    assert not out_dir.exists()


def test_a_config_file_with_a_top_level_engine_option_names_it(tmp_path):
    config = tmp_path / "bench.yaml"
    config.write_text("methods: [coop]\ndatasets: [toy:shapes]\nepochs: 1\n")
    code, _, err = _cli("bench", "--config", config, "--output", tmp_path / "bench")
    err = _one_line_error(code, err)
    assert "unknown bench key(s) ['epochs']" in err and "default_train" in err
    assert not (tmp_path / "bench").exists()


# killed bench ------------------------------------------------------------------------------------------------
def _children(pid: int) -> set[int]:
    found = set()
    for status in Path("/proc").glob("[0-9]*/status"):
        with contextlib.suppress(OSError):
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line)
            if int(fields.get("PPid", "0").strip()) == pid:
                found.add(int(status.parent.name))
    return found


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads processes from /proc (Linux)")
@pytest.mark.parametrize("stop", ["SIGKILL", "SIGTERM", "SIGINT"])
def test_a_stopped_bench_ends_at_once_and_takes_its_workers_with_it(tiny_model_dir, engine_data_root, tmp_path, stop):
    """Workers of a killed bench (SIGKILL) end too, instead of training on into the run folders and holding their
    locks against the rerun that resumes them. Ctrl-C or `kill` (SIGINT, SIGTERM) used to leave the bench running:
    the process pool, on its way out, trained every queued run first; it now ends within seconds, in one line."""
    import os
    import signal
    import subprocess
    import sys
    import time

    args = [sys.executable, "-m", "vlprompt.cli", "bench", "--methods", "coop", "--datasets", "eurosat",
            "--data-root", engine_data_root, "--model", tiny_model_dir, "--shots", "1", "2", "--seeds", "1", "2",
            "--set", "default_train.batch_size=4", "--set", "default_train.epochs=100000", "--workers", "2",
            "--output", tmp_path / "bench"]  # fmt: skip
    # A command started in the background by a script (`pytest &`, as CI may run) inherits SIGINT ignored, and
    # Python then never raises KeyboardInterrupt: give the bench the default, as a terminal's foreground job has.
    bench = subprocess.Popen([str(a) for a in args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    workers: set[int] = set()
    try:
        deadline = time.monotonic() + 120
        while len(_children(bench.pid)) < 3 and time.monotonic() < deadline:  # 2 workers + a resource tracker
            time.sleep(0.5)
        workers = _children(bench.pid)
        assert len(workers) >= 3, "the bench did not start its workers"
        runs = tmp_path / "bench" / "runs"
        while len(list(runs.glob("*/*/*/*"))) < 2 and time.monotonic() < deadline:  # both workers train
            time.sleep(0.5)
        assert len(list(runs.glob("*/*/*/*"))) >= 2, "the workers did not start training"
        if stop == "SIGINT":  # as a terminal sends Ctrl-C: to the whole process group, the workers too
            os.killpg(bench.pid, signal.SIGINT)
        else:
            bench.send_signal(getattr(signal, stop))
        _, err = bench.communicate(timeout=60)  # each queued run would train 100000 epochs
        assert bench.returncode != 0
        assert "Traceback" not in err, err
        if stop == "SIGTERM":
            assert bench.returncode == 128 + signal.SIGTERM, err
        if stop == "SIGINT":
            assert bench.returncode == 130 and err.strip().splitlines()[-1] == (
                "vlprompt bench: interrupted; finished runs are kept and tabled: rerun the same command to continue")
        deadline = time.monotonic() + 30  # the resource tracker ends on its own once its pipe closes
        alive = workers
        while alive and time.monotonic() < deadline:
            time.sleep(0.5)
            alive = {pid for pid in alive if Path(f"/proc/{pid}").exists()
                     and "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()}  # fmt: skip
        assert not alive, f"workers {sorted(alive)} outlived the stopped bench"
    finally:
        if bench.poll() is None:
            bench.kill()
        for pid in workers | _children(bench.pid):  # never leave a worker behind, even when the test fails
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads processes from /proc (Linux)")
def test_a_worker_killed_mid_run_ends_the_bench_in_one_line_naming_the_run(tiny_model_dir, engine_data_root,
                                                                           tmp_path):
    """What the kernel's out-of-memory killer does to one worker: the bench lets the other worker's run finish,
    tables it, and ends with one line naming the lost run and how to resume (it used to be a traceback)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "bench"
    args = [sys.executable, "-m", "vlprompt.cli", "bench", "--methods", "coop", "--datasets", "eurosat",
            "--data-root", engine_data_root, "--model", tiny_model_dir, "--shots", "1", "2", "--seeds", "1",
            "--set", "default_train.batch_size=4", "--set", "default_train.epochs=40", "--workers", "2",
            "--output", out]  # fmt: skip
    bench = subprocess.Popen([str(a) for a in args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while len(list((out / "runs").glob("*/*/*/*"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        workers = [pid for pid in _children(bench.pid)
                   if "resource_tracker" not in Path(f"/proc/{pid}/cmdline").read_text()]
        assert len(workers) == 2, "the bench did not start its two workers"
        os.kill(workers[0], signal.SIGKILL)
        _, err = bench.communicate(timeout=180)
    finally:
        if bench.poll() is None:
            bench.kill()
    lines = err.strip().splitlines()
    assert bench.returncode == 2 and "Traceback" not in err, err
    assert lines[-1].startswith("vlprompt bench: error: a bench worker ended (killed by signal 9; out of memory?) "
                                "while running fewshot/eurosat/coop/shots"), err
    assert lines[-1].endswith("finished runs are kept: rerun the same command to resume"), err
    assert len(list((out / "runs").glob("*/*/*/*/result.json"))) == 1  # the other worker's run, finished
    assert len((out / "results.csv").read_text().splitlines()) == 2  # and tabled


# SIGTERM --------------------------------------------------------------------------------------------------------
def test_a_bench_stopped_with_sigterm_still_tables_its_finished_runs(tiny_model_dir, engine_data_root, tmp_path,
                                                                      monkeypatch):
    """`kill` (SIGTERM) used to end a bench without its `finally`: the runs that had finished were in their folders
    but not in results.csv, and --report-only refused the folder. It now unwinds like Ctrl-C."""
    import os
    import signal
    import time

    from vlprompt.protocols import runner

    calls = []

    def one_run_then_terminated(config, job):
        calls.append(job.key)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)  # the handler interrupts this at once
        row = {"protocol": job.protocol, "train_dataset": job.dataset, "eval_dataset": job.dataset, "subset": "all",
               "method": job.method, "shots": job.shots, "seed": job.seed, "accuracy": 50.0, "n": 10,
               "trainable_parameters": 0, "train_time_s": 0.1, "precision": job.precision}  # fmt: skip
        return [row], 0.1

    monkeypatch.setattr(runner, "_timed_job", one_run_then_terminated)
    previous = signal.getsignal(signal.SIGTERM)
    out_dir = tmp_path / "bench"
    with pytest.raises(SystemExit) as stopped:
        _cli("bench", "--methods", "zeroshot", "linear_probe", "--datasets", "eurosat", "--data-root",
             engine_data_root, "--model", tiny_model_dir, "--shots", "1", "--seeds", "1", "--output", out_dir)
    assert stopped.value.code == 128 + signal.SIGTERM and len(calls) == 2
    rows = runner.read_csv(out_dir / "results.csv")
    assert [(r["method"], r["accuracy"]) for r in rows] == [("zeroshot", 50.0)]
    assert signal.getsignal(signal.SIGTERM) is previous  # the bench's handler is gone once it returns
