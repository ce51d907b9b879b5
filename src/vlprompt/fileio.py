"""Files written the way users expect: atomically, with the user's own permissions, one writer per run folder."""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
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


@contextmanager
def exclusive_folder(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` while the block runs: a second process (or a second writer in this one)
    is refused at once, naming the holder. The operating system releases the lock when the process dies, so a
    crashed run never leaves the folder locked."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): runs are not protected against a concurrent writer
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    lock_path = folder / LOCK_FILE
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, user_file_mode())
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
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
