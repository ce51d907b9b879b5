"""Run folders: one writer at a time (the lock goes with a dead process), the user's file modes, clear faults."""
import contextlib
import os
import signal
import stat
import subprocess
import sys
import textwrap

import pytest

import vlprompt
from vlprompt.fileio import FolderBusyError, exclusive_folder


def test_a_second_writer_of_a_run_folder_is_refused_naming_the_holder(tmp_path):
    with exclusive_folder(tmp_path / "run"):
        with pytest.raises(FolderBusyError, match=rf"is being written by vlprompt process {os.getpid()}; wait"):
            with exclusive_folder(tmp_path / "run"):
                pass
    with exclusive_folder(tmp_path / "run"):  # released after the first writer
        pass


@contextlib.contextmanager
def _writer(folder, body: str, after: str = ""):
    """A Python process that runs ``body`` inside ``exclusive_folder(folder)`` (then ``after``), killed at the end."""
    script = textwrap.dedent(f"""
        import os, pathlib, sys, time
        from vlprompt.fileio import exclusive_folder
        with exclusive_folder(pathlib.Path({str(folder)!r})):
    """) + textwrap.indent(textwrap.dedent(body), "    ") + after
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        yield process
    finally:
        process.kill()
        process.wait()


def test_a_run_folder_locked_by_a_killed_process_is_free_again(tmp_path):
    with _writer(tmp_path / "run", 'print("locked", flush=True)\ntime.sleep(60)\n') as writer:
        assert writer.stdout.readline().strip() == "locked"
        with pytest.raises(FolderBusyError, match=rf"vlprompt process {writer.pid}"):
            with exclusive_folder(tmp_path / "run"):
                pass
    with exclusive_folder(tmp_path / "run"):
        pass


def test_a_killed_writer_frees_its_folder_while_a_process_it_forked_lives_on(tmp_path):
    """A data-loader worker forked by a run outlives a run killed for memory by a few seconds: its copy of the lock
    must not keep the folder busy for a rerun."""
    loader = None
    try:
        with _writer(tmp_path / "run", """
            if os.fork() == 0:
                print(os.getpid(), flush=True)  # after fork's hooks have run here: its copy of the lock is closed
                time.sleep(60)
                os._exit(0)
            time.sleep(60)
        """) as writer:
            loader = int(writer.stdout.readline())
        with exclusive_folder(tmp_path / "run"):
            pass
        os.kill(loader, 0)  # the forked process was still alive: its copy did not hold the lock
    finally:
        if loader is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(loader, signal.SIGKILL)


def test_a_forked_process_leaving_the_locked_block_leaves_the_lock_with_its_parent(tmp_path):
    with _writer(tmp_path / "run", """
        child = os.fork()
        if child == 0:  # the child unwinds the block as its parent would, with a file of its own open
            os.write(os.open(pathlib.Path({witness!r}), os.O_RDWR | os.O_CREAT), b"kept")
        else:
            os.waitpid(child, 0)
            print("child gone", flush=True)
            time.sleep(60)
    """.replace("{witness!r}", repr(str(tmp_path / "witness"))), after="os._exit(0)\n") as writer:
        assert writer.stdout.readline().strip() == "child gone"
        with pytest.raises(FolderBusyError, match=rf"vlprompt process {writer.pid}"):
            with exclusive_folder(tmp_path / "run"):
                pass
    # the file took the number of the child's closed copy of the lock: the block's exit did not touch it
    assert (tmp_path / "witness").read_text() == "kept"


def test_training_into_a_folder_another_run_writes_is_refused_and_loses_nothing(engine_run_options, tiny_model_dir,
                                                                              engine_data_root, tmp_path):  # fmt: skip
    options = engine_run_options(tiny_model_dir, engine_data_root, tmp_path / "run", epochs=1)
    with exclusive_folder(tmp_path / "run"):
        with pytest.raises(vlprompt.TrainingError, match="is being written by vlprompt process"):
            vlprompt.train(options, progress=False, log=lambda _: None)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".vlprompt.lock"]
    vlprompt.train(options, progress=False, log=lambda _: None)  # the same folder once it is free
    assert (tmp_path / "run" / "prompt.safetensors").exists()


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_run_files_get_the_users_file_mode(umask, mode, engine_run_options, tiny_model_dir, engine_data_root,
                                           tmp_path):  # fmt: skip
    previous = os.umask(umask)
    try:
        options = engine_run_options(tiny_model_dir, engine_data_root, tmp_path / "run", epochs=1)
        vlprompt.train(options, progress=False, log=lambda _: None)
    finally:
        os.umask(previous)
    for name in ("prompt.safetensors", "prompt_config.json", "metrics.jsonl", "results.json", "run_config.json"):
        assert stat.S_IMODE((tmp_path / "run" / name).stat().st_mode) == mode, name


def test_an_output_that_is_a_file_or_unwritable_is_named(engine_run_options, tiny_model_dir, engine_data_root,
                                                          tmp_path):  # fmt: skip
    (tmp_path / "a_file").write_text("mine")
    options = engine_run_options(tiny_model_dir, engine_data_root, tmp_path / "a_file", epochs=1)
    with pytest.raises(vlprompt.TrainingError, match=r"a_file is a file, not a folder: pass a folder path"):
        vlprompt.train(options, progress=False, log=lambda _: None)
    assert (tmp_path / "a_file").read_text() == "mine"


@pytest.mark.parametrize("errno_, cause", [(13, "Permission denied"), (28, "No space left on device")])
def test_a_run_folder_that_cannot_be_written_names_the_cause(errno_, cause, monkeypatch, engine_run_options,
                                                             tiny_model_dir, engine_data_root, tmp_path):  # fmt: skip
    from vlprompt.engine import trainer

    def refused(folder):  # what the OS answers for a read-only parent or a full disk (root may write anywhere)
        raise OSError(errno_, cause, str(folder))

    monkeypatch.setattr(trainer, "exclusive_folder", refused)
    options = engine_run_options(tiny_model_dir, engine_data_root, tmp_path / "run", epochs=1)
    with pytest.raises(vlprompt.TrainingError, match=rf"cannot write the run folder .*run: {cause}; choose a "
                                                     "writable --output"):  # fmt: skip
        vlprompt.train(options, progress=False, log=lambda _: None)


def test_shots_above_what_a_class_has_warn_on_every_run_and_the_run_records_the_counts_used(
        engine_run_options, tiny_model_dir, engine_data_root, tmp_path):  # fmt: skip
    import json

    from vlprompt.engine.api import DataOptions

    for run in ("first", "cached"):  # the second run reads the few-shot cache the first one wrote
        options = engine_run_options(tiny_model_dir, engine_data_root, tmp_path / run, epochs=1)
        options.data = DataOptions(dataset="eurosat", root=str(engine_data_root), shots=9,
                                   cache_dir=str(tmp_path / "cache"))  # fmt: skip
        with pytest.warns(UserWarning, match=r"3 of 3 classes have fewer than 9 training images .*'AnnualCrop': 4"):
            vlprompt.train(options, progress=False, log=lambda _: None)
        recorded = json.loads((tmp_path / run / "run_config.json").read_text())
        assert recorded["data"]["shots"] == 9 and recorded["train_images_per_class"] == {"min": 4, "max": 4}


def test_a_disk_that_fills_during_training_names_the_cause_and_the_run_resumes(
        monkeypatch, engine_run_options, tiny_model_dir, engine_data_root, tmp_path):  # fmt: skip
    import errno
    import json

    import torch

    saves = {"n": 0}
    real_save = torch.save

    def fills_on_the_second_epoch(obj, path, *args, **kwargs):
        saves["n"] += 1
        if saves["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", fills_on_the_second_epoch)
    options = engine_run_options(tiny_model_dir, engine_data_root, tmp_path / "run", epochs=3)
    with pytest.raises(vlprompt.TrainingError, match=r"No space left on device\. Every finished epoch .* kept in "
                                                     r".*checkpoint-last: free space .* --resume"):  # fmt: skip
        vlprompt.train(options, progress=False, log=lambda _: None)
    monkeypatch.setattr(torch, "save", real_save)
    logged: list[str] = []
    vlprompt.train(options, resume=True, progress=False, log=logged.append)
    assert "resuming" in logged[0] and "after epoch 1" in logged[0]  # the epoch saved before the disk filled
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if "epoch" in r][-1] == 3 and (tmp_path / "run" / "prompt.safetensors").exists()
