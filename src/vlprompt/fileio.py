"""Files written the way users expect: atomically, with the user's own permissions, one writer per run folder."""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Iterator

LOCK_FILE = ".vlprompt.lock"


class FolderBusyError(RuntimeError):
    """Another process is writing the same run folder."""


CACHE_ENV = "VLPROMPT_CACHE"


def cache_root() -> Path:
    """vlprompt's cache folder: ``$VLPROMPT_CACHE`` if set, else ``~/.cache/vlprompt``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path("~/.cache/vlprompt").expanduser()


def user_file_mode() -> int:
    """The mode a plain ``open()`` gives a new file here: 0o666 without the process umask (mkstemp makes 0o600)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0)  # no /proc: read the umask by setting it, then restore it at once
    os.umask(mask)
    return 0o666 & ~mask


def temp_file_beside(path: Path, suffix: str = "") -> tuple[int, str]:
    """An open temporary file in ``path``'s folder (for a write-then-rename), with the user's file mode."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    try:
        os.fchmod(fd, user_file_mode())
    except (AttributeError, OSError):  # no fchmod (Windows): the file keeps mkstemp's mode
        pass
    return fd, tmp


# The folder locks this process holds (file descriptors of exclusive_folder).
_held_lock_fds: set[int] = set()


def _close_inherited_locks() -> None:
    """Run in a forked child (a data-loader worker): close its copies of the parent's folder locks. A lock ends
    only when its last copy is closed, so a child's copy would keep the folder locked after the parent is killed
    (out of memory, kill -9) until the child noticed and exited; a rerun in that window was refused."""
    for fd in _held_lock_fds:
        with suppress(OSError):
            os.close(fd)
    _held_lock_fds.clear()


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_close_inherited_locks)


@contextmanager
def exclusive_folder(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` while the block runs: a second process (or a second writer in this one)
    is refused at once, naming the holder. The operating system releases the lock when the process dies, so a
    crashed run never leaves the folder locked (processes forked meanwhile do not hold it)."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): runs are not protected against a concurrent writer
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    lock_path = folder / LOCK_FILE
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, user_file_mode())
    owner = os.getpid()  # a forked child that unwinds this block must not unlock or close the parent's lock
    _held_lock_fds.add(fd)  # before the lock is taken: a thread may fork at any moment once it is
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
            raise FolderBusyError(
                f"{folder} is being written by {holder}; wait for that run to finish, or pass another --output."
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"vlprompt process {os.getpid()}".encode(), 0)
        try:
            yield
        finally:
            if os.getpid() == owner:
                os.ftruncate(fd, 0)
                fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        if os.getpid() == owner:
            _held_lock_fds.discard(fd)
            os.close(fd)
