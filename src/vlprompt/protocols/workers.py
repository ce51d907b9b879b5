"""Worker processes for ``vlprompt bench --workers N``: each takes one job at a time over its own pipe.

A small pool of our own rather than ``concurrent.futures.ProcessPoolExecutor``: that pool, on its way out, trains
every queued job before it returns (so Ctrl-C and ``kill`` did not stop a bench), and it has no public way to end
its processes. Here a job goes to a worker only when the worker is idle, so nothing is queued, and stopping is
ending the processes: no feeder or manager threads that an interrupted exit could wait on.
"""

from __future__ import annotations

import pickle
import signal
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

# a worker asked to end (SIGTERM) gets this long before it is killed
_GRACE_S = 5.0


class RemoteTraceback(Exception):
    """The traceback of a job that failed in a worker, attached as the cause of the error raised here."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class WorkerDied(RuntimeError):
    """A worker process ended while it held a job (killed, out of memory, a crash in native code)."""


@dataclass
class _Worker:
    process: Any  # a multiprocessing Process of the pool's start context
    connection: Connection
    item: Any = None  # the job it holds, None when idle
    alive: bool = True


def _serve(connection: Connection, initializer: Callable[..., None], initargs: Sequence[Any]) -> None:
    """A worker's loop: run (function, args) messages until None or a closed pipe; send ("ok", value) or
    ("error", exception, traceback text) back for each."""
    # Ctrl-C in a terminal reaches the whole process group: the bench process decides what happens, and ends
    # its workers itself
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    initializer(*initargs)
    while True:
        try:
            message = connection.recv()
        except EOFError:  # the bench process is gone
            return
        if message is None:
            return
        function, args = message
        try:
            reply: tuple[Any, ...] = ("ok", function(*args))
        except Exception as err:
            reply = ("error", _sendable(err), traceback.format_exc())
        connection.send(reply)


def _sendable(err: Exception) -> Exception:
    """The exception itself when it survives a pickle round trip (its type and message reach the caller), else a
    RuntimeError carrying its type and message."""
    try:
        pickle.loads(pickle.dumps(err))
        return err
    except Exception:
        return RuntimeError(f"{type(err).__name__}: {err}")


def run_in_workers(count: int, context: Any, initializer: Callable[..., None], initargs: Sequence[Any],
                   function: Callable[..., Any], items: Iterable[tuple[Any, tuple[Any, ...]]],
                   finished: Callable[[Any, Any], None], describe: Callable[[Any], str] = str) -> None:
    """Run ``function(*args)`` for each ``(item, args)`` in ``count`` processes started from ``context``;
    ``finished(item, value)`` is called here, in this process, as each job ends.

    A job that raises stops the handing out of jobs; the jobs already running end normally (their work is not
    thrown away) and then the first error is raised here, its worker's traceback as its cause. Anything that
    unwinds this call otherwise (Ctrl-C, SIGTERM turned into SystemExit, an error in ``finished``) ends the
    workers at once, whatever they were running."""
    queue = list(items)
    queue.reverse()  # pop() from the end hands jobs out in the given order
    workers = [_start(context, initializer, initargs) for _ in range(min(count, len(queue)))]
    failure: BaseException | None = None
    try:
        for worker in workers:
            _hand_next(worker, queue, function)
        while any(worker.item is not None for worker in workers):
            busy = [worker for worker in workers if worker.item is not None]
            ready = set(wait([w.connection for w in busy] + [w.process.sentinel for w in busy]))
            for worker in busy:
                if worker.connection in ready:
                    item, worker.item = worker.item, None
                    try:
                        reply = worker.connection.recv()
                    except EOFError:  # died just after taking the job
                        failure = failure or _died(worker, item, describe)
                        continue
                    if reply[0] == "ok":
                        finished(item, reply[1])
                    else:
                        error = reply[1]
                        error.__cause__ = RemoteTraceback(reply[2])
                        failure = failure or error
                elif worker.process.sentinel in ready:
                    item, worker.item = worker.item, None
                    failure = failure or _died(worker, item, describe)
                if worker.item is None and worker.alive and failure is None:
                    _hand_next(worker, queue, function)
        if failure is not None:
            raise failure
    except BaseException:
        _end(workers, at_once=True)
        raise
    _end(workers, at_once=False)


def _start(context: Any, initializer: Callable[..., None], initargs: Sequence[Any]) -> _Worker:
    ours, theirs = context.Pipe()
    # not a daemon: a worker may start data-loader processes of its own (a daemon may not have children); it ends
    # with the bench all the same (the initializer's PR_SET_PDEATHSIG, or the EOF on its pipe)
    process = context.Process(target=_serve, args=(theirs, initializer, tuple(initargs)))
    process.start()
    theirs.close()  # the worker holds its end: a recv here then sees EOF when the worker dies
    return _Worker(process, ours)


def _hand_next(worker: _Worker, queue: list[tuple[Any, tuple[Any, ...]]], function: Callable[..., Any]) -> None:
    if queue:
        item, args = queue.pop()
        worker.item = item
        worker.connection.send((function, args))


def _died(worker: _Worker, item: Any, describe: Callable[[Any], str]) -> WorkerDied:
    worker.alive = False
    worker.process.join(_GRACE_S)
    code = worker.process.exitcode
    how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
    return WorkerDied(f"a bench worker ended ({how}; out of memory?) while running {describe(item)}; finished runs "
                      "are kept: rerun the same command to resume")


def _end(workers: list[_Worker], at_once: bool) -> None:
    """Idle workers are told to end; busy ones (``at_once``) are terminated, then killed if they linger."""
    for worker in workers:
        if at_once:
            worker.process.terminate()
        else:
            try:
                worker.connection.send(None)
            except (BrokenPipeError, OSError):
                pass
    for worker in workers:
        worker.process.join(_GRACE_S)
        if worker.process.is_alive():
            worker.process.kill()
            worker.process.join()
        worker.connection.close()
