"""Worker processes for ``vlprompt bench --workers N``: each takes one job at a time over its own pipe.

A small pool of our own rather than ``concurrent.futures.ProcessPoolExecutor``: that pool, on its way out, trains
every queued job before it returns (so Ctrl-C and ``kill`` did not stop a bench), and it has no public way to end
its processes. Here a job goes to a worker only when the worker is idle, so nothing is queued, and stopping is
ending the processes: no feeder or manager threads that an interrupted exit could wait on.
"""

from __future__ import annotations

import contextlib
import pickle
import signal
import threading
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.reduction import ForkingPickler
from typing import Any

# a worker asked to end (SIGTERM) gets this long before it is killed
_GRACE_S = 5.0
# how often busy workers' exit statuses are read while none has replied
_POLL_S = 1.0


class RemoteTraceback(Exception):
    """The traceback of a job that failed in a worker, attached as the cause of the error raised here."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class WorkerError(RuntimeError):
    """What went wrong between a job and its worker rather than in the job: the command line shows it in one line."""


class WorkerDied(WorkerError):
    """A worker process ended while it held a job (killed, out of memory, a crash in native code)."""


@dataclass
class _Worker:
    process: Any  # a multiprocessing Process of the pool's start context
    connection: Connection
    item: Any = None  # the job it holds, None when idle
    alive: bool = True


@contextlib.contextmanager
def _signals_held(*signals: signal.Signals) -> Iterator[None]:
    """Hold ``signals`` back in this thread for the block; one that arrives meanwhile is delivered at its end."""
    if not hasattr(signal, "pthread_sigmask"):  # Windows
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, set(signals))
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


@contextlib.contextmanager
def _signals_deferred(*signals: signal.Signals) -> Iterator[None]:
    """Run the block to its end whatever of ``signals`` arrives: each one that does is raised again after it.
    (Holding a signal back in this thread is not enough: the process may take it on another thread, and Python
    then runs its handler here all the same.) Only the main thread may set handlers: elsewhere nothing is deferred."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {number: signal.signal(number, lambda received, _frame: caught.append(received)) for number in signals}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, signal.SIG_DFL if handler is None else handler)
        for number in dict.fromkeys(caught):
            signal.raise_signal(number)


def _serve(connection: Connection, initializer: Callable[..., None], initargs: Sequence[Any]) -> None:
    """A worker's loop: run (function, args) messages until None or a closed pipe; send ("ok", value) or
    ("error", exception, traceback text) back for each."""
    # Ctrl-C in a terminal reaches the whole process group: the bench process decides what happens and ends its
    # workers itself. The worker was started with SIGINT and SIGTERM held back (see _start): a Ctrl-C pressed while
    # it imported is dropped here rather than printing a traceback; a SIGTERM (the bench ended) takes effect here.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
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
            payload = ForkingPickler.dumps(reply)
        except Exception as err:
            reply = ("error", _sendable(err), traceback.format_exc())
            payload = ForkingPickler.dumps(reply)
        connection.send_bytes(payload)


def _sendable(err: Exception) -> Exception:
    """The exception itself when it survives a pickle round trip (its type and message reach the caller), else a
    WorkerError carrying its type and message."""
    try:
        pickle.loads(ForkingPickler.dumps(err))
        return err
    except Exception:
        return WorkerError(f"{type(err).__name__}: {err}")


def run_in_workers(count: int, context: Any, initializer: Callable[..., None], initargs: Sequence[Any],
                   function: Callable[..., Any], items: Iterable[tuple[Any, tuple[Any, ...]]],
                   finished: Callable[[Any, Any], None], describe: Callable[[Any], str] = str,
                   failed: Callable[[Any], None] = lambda item: None) -> None:
    """Run ``function(*args)`` for each ``(item, args)`` in ``count`` processes started from ``context``;
    ``finished(item, value)`` is called here, in this process, as each job ends (``failed(item)`` as one raises).

    A job that raises stops the handing out of jobs; the jobs already running end normally (their work is not
    thrown away) and then the first error is raised here, its worker's traceback as its cause. A worker that dies
    holding a job is a WorkerDied error, the same way. Anything that unwinds this call otherwise (Ctrl-C, SIGTERM
    turned into SystemExit, an error in ``finished``) ends the workers at once, whatever they were running."""
    if count < 1:
        raise ValueError(f"workers must be at least 1, got {count}")
    queue = list(items)
    queue.reverse()  # pop() from the end hands jobs out in the given order
    workers: list[_Worker] = []
    failure: BaseException | None = None

    def fail(error: BaseException) -> None:
        nonlocal failure
        if failure is None:
            failure = error

    try:
        for _ in range(min(count, len(queue))):
            _start(context, initializer, initargs, workers)
            if failure is None:
                _hand_next(workers[-1], queue, function, fail, describe)
        while any(worker.item is not None for worker in workers):
            busy = [worker for worker in workers if worker.item is not None]
            ready = set(wait([w.connection for w in busy] + [w.process.sentinel for w in busy], timeout=_POLL_S))
            for worker in busy:
                # A dead worker's pipe and sentinel stay open while data-loader processes it forked live on (they
                # look for a dead parent only every few seconds), so its exit status is asked for too.
                ended = worker.process.sentinel in ready or worker.process.exitcode is not None
                if worker.connection in ready or (ended and worker.connection.poll()):
                    item, worker.item = worker.item, None
                    try:
                        payload = worker.connection.recv_bytes()
                    except (EOFError, OSError):  # died holding the job, or in the middle of its reply
                        fail(_died(worker, item, describe))
                        continue
                    try:
                        status, *reply = ForkingPickler.loads(payload)
                    except Exception as err:  # a reply this process cannot unpickle
                        fail(WorkerError(f"the result of {describe(item)} could not be read back from its worker: "
                                          f"{type(err).__name__}: {err}"))
                        continue
                    if status == "ok":
                        finished(item, reply[0])
                    else:
                        error, remote = reply
                        error.__cause__ = RemoteTraceback(remote)
                        failed(item)
                        fail(error)
                    if ended:  # it replied, then ended: its queued share would be lost
                        fail(_died(worker, item, describe, "after it ran"))
                elif ended:
                    item, worker.item = worker.item, None
                    fail(_died(worker, item, describe))
                if worker.item is None and worker.alive and failure is None:
                    _hand_next(worker, queue, function, fail, describe)
        if failure is not None:
            raise failure
    except BaseException:
        _end(workers, at_once=True)
        raise
    _end(workers, at_once=False)


def _start(context: Any, initializer: Callable[..., None], initargs: Sequence[Any], workers: list[_Worker]) -> None:
    """Start a worker and add it to ``workers`` with no signal in between that could leave it untracked."""
    ours, theirs = context.Pipe()
    # not a daemon: a worker may start data-loader processes of its own (a daemon may not have children); it ends
    # with the bench all the same (the initializer's PR_SET_PDEATHSIG, or the EOF on its pipe)
    process = context.Process(target=_serve, args=(theirs, initializer, tuple(initargs)))
    # Deferred here, so that no worker is left started but untracked; held back in this thread, so that the child
    # (forked from it) starts with them held and keeps them so until _serve.
    with _signals_deferred(signal.SIGINT, signal.SIGTERM), _signals_held(signal.SIGINT, signal.SIGTERM):
        process.start()
        workers.append(_Worker(process, ours))
        theirs.close()  # the worker holds its end: a recv here then sees EOF when the worker dies


def _hand_next(worker: _Worker, queue: list[tuple[Any, tuple[Any, ...]]], function: Callable[..., Any],
               fail: Callable[[BaseException], None], describe: Callable[[Any], str]) -> None:
    if not queue:
        return
    item, args = queue.pop()
    worker.item = item
    try:
        worker.connection.send((function, args))
    except OSError:  # ended since its last reply (a full pipe buffer would block, not fail: jobs are small)
        worker.item = None
        fail(_died(worker, item, describe))


def _died(worker: _Worker, item: Any, describe: Callable[[Any], str], when: str = "while running") -> WorkerDied:
    worker.alive = False
    worker.process.join(_GRACE_S)
    code = worker.process.exitcode
    if code is not None and code < 0:
        how = f"killed by signal {-code}" + ("; out of memory?" if -code == signal.SIGKILL else "")
    else:
        how = f"exit code {code}"
    return WorkerDied(f"a bench worker ended ({how}) {when} {describe(item)}; finished runs are kept: rerun "
                      "the same command to resume")


def _end(workers: list[_Worker], at_once: bool) -> None:
    """Every worker ended and joined: told to end when idle, or (``at_once``) terminated whatever it runs, then
    killed if it lingers. A second Ctrl-C or SIGTERM meanwhile is deferred to the end, so that no worker is left
    behind."""
    with _signals_deferred(signal.SIGINT, signal.SIGTERM):
        try:
            for worker in workers:
                if at_once:
                    worker.process.terminate()
                else:
                    with contextlib.suppress(OSError):
                        worker.connection.send(None)
            for worker in workers:
                worker.process.join(_GRACE_S)
        finally:
            for worker in workers:
                if worker.process.is_alive():
                    worker.process.kill()
                worker.process.join()
                worker.connection.close()
