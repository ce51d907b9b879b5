"""The bench's worker pool (vlprompt.protocols.workers) on its own: results come back in this process, a failed
job stops the handing out of jobs and raises its own error, a worker that dies is named, and no worker is left
behind. Stdlib functions stand in for training runs (a spawned worker must be able to import what it runs)."""

import math
import multiprocessing
import operator
import os
import signal
import time
from pathlib import Path

import pytest

from vlprompt.protocols.workers import RemoteTraceback, WorkerDied, WorkerError, run_in_workers

SPAWN = multiprocessing.get_context("spawn")


def _run(items, count=2):
    done = {}
    run_in_workers(count, SPAWN, time.sleep, (0,), _call, items, lambda item, value: done.__setitem__(item, value))
    return done


def _call(function, *args):
    return function(*args)


def test_every_job_comes_back_to_its_item():
    items = [(n, (math.sqrt, n)) for n in (1, 4, 9, 16, 25)]
    assert _run(items) == {1: 1.0, 4: 2.0, 9: 3.0, 16: 4.0, 25: 5.0}


def test_a_failed_job_raises_its_own_error_with_the_workers_traceback_and_starts_nothing_more():
    started = []
    items = [("ok", (math.sqrt, 4)), ("bad", (operator.truediv, 1, 0))] + [
        (f"later{n}", (math.sqrt, n)) for n in range(20)]
    with pytest.raises(ZeroDivisionError) as caught:
        run_in_workers(1, SPAWN, time.sleep, (0,), _call, items, lambda item, value: started.append(item))
    assert started == ["ok"]  # one worker: nothing after the failed job was handed out
    assert isinstance(caught.value.__cause__, RemoteTraceback)
    assert "ZeroDivisionError" in str(caught.value.__cause__)  # the worker's own traceback


def test_jobs_running_beside_a_failed_one_finish_and_are_reported_before_the_error():
    done = []
    items = [("slow", (time.sleep, 3)), ("bad", (operator.truediv, 1, 0))] + [
        (f"later{n}", (math.sqrt, n)) for n in range(5)]
    with pytest.raises(ZeroDivisionError):
        run_in_workers(2, SPAWN, time.sleep, (0,), _call, items, lambda item, value: done.append(item))
    assert done == ["slow"]


class NeedsTwo(Exception):
    """An error that pickles but cannot be rebuilt (its constructor wants two arguments, its args hold one)."""

    def __init__(self, first, second):
        super().__init__(f"{first} and {second}")


def _raise_needs_two():
    raise NeedsTwo("this", "that")


def test_an_error_that_cannot_cross_processes_arrives_with_its_type_and_message():
    with pytest.raises(WorkerError, match="NeedsTwo: this and that"):
        run_in_workers(1, SPAWN, time.sleep, (0,), _call, [("job", (_raise_needs_two,))], lambda item, value: None)


def test_a_worker_that_dies_is_named_with_the_job_it_held():
    items = [("crash", (os._exit, 3))]
    with pytest.raises(WorkerDied, match=r"exit code 3.*while running job crash.*rerun the same command"):
        run_in_workers(1, SPAWN, time.sleep, (0,), _call, items, lambda item, value: None,
                       describe=lambda item: f"job {item}")


def _fork_a_lingering_process_then_die(folder):
    """Stands for a run killed while its data-loader workers live on: they hold copies of the worker's pipe and
    sentinel, so neither signals the death until they end. This one ends when the test releases it (or after a
    minute), and says which."""
    folder = Path(folder)
    if os.fork() == 0:
        deadline = time.monotonic() + 60
        while not (folder / "release").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        (folder / "ended").write_text("released" if (folder / "release").exists() else "timed out")
        os._exit(0)
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_killed_worker_is_named_while_a_process_it_forked_still_holds_its_pipe(tmp_path):
    try:
        with pytest.raises(WorkerDied, match=r"killed by signal 9.*while running job one"):
            run_in_workers(1, SPAWN, time.sleep, (0,), _call, [("one", (_fork_a_lingering_process_then_die,
                                                                       str(tmp_path)))],
                           lambda item, value: None, describe=lambda item: f"job {item}")
    finally:
        (tmp_path / "release").touch()
    for _ in range(1200):
        if (tmp_path / "ended").exists():
            break
        time.sleep(0.05)
    # the death was read from the exit status while the forked process still lived, not from its end
    assert (tmp_path / "ended").read_text() == "released"


def test_a_worker_that_dies_before_taking_its_job_is_named_with_it():
    """An initializer that ends the process stands for a worker lost while it started (out of memory importing
    torch): the job handed to it is named, not a broken pipe."""
    with pytest.raises(WorkerDied, match=r"exit code 4.*while running job first"):
        run_in_workers(1, SPAWN, os._exit, (4,), _call, [("first", (math.sqrt, 4))], lambda item, value: None,
                       describe=lambda item: f"job {item}")


def test_an_interrupt_ends_busy_workers_at_once():
    """What Ctrl-C does in the bench process: the workers are ended, not waited for (each would sleep 600 s)."""
    processes = []
    real_start = SPAWN.Process

    def recording_process(*args, **kwargs):
        process = real_start(*args, **kwargs)
        processes.append(process)
        return process

    class Context:
        Pipe = staticmethod(SPAWN.Pipe)
        Process = staticmethod(recording_process)

    def interrupt(item, value):
        raise KeyboardInterrupt

    items = [("quick", (math.sqrt, 4)), ("slow", (time.sleep, 600)), ("queued", (time.sleep, 600))]
    began = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        run_in_workers(2, Context, time.sleep, (0,), _call, items, interrupt)
    assert time.monotonic() - began < 60
    assert len(processes) == 2 and not any(p.is_alive() for p in processes)


def test_a_signal_during_start_or_cleanup_waits_for_the_block_to_end():
    """A Ctrl-C that lands while a worker is being started or the workers ended must not cut that short (a worker
    started but untracked, or left alive): it is raised once the block is done."""
    import signal

    from vlprompt.protocols.workers import _signals_deferred

    steps = []
    # Python's own Ctrl-C handler, also where pytest was started with SIGINT ignored (a script's background job)
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            with _signals_deferred(signal.SIGINT, signal.SIGTERM):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.2)  # where the handler would have run
                steps.append("block ended")
        assert steps == ["block ended"]
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers put back
    finally:
        signal.signal(signal.SIGINT, inherited)
