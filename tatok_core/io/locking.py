"""One writer per output: an exclusive, non-blocking lock, so two processes never silently overwrite each other.

The lock is an OS file lock (``flock``; ``msvcrt.locking`` on Windows) on a hidden sibling file
``.NAME.lock``. The OS drops it when the holder dies, so a killed writer never leaves a stale lock;
the file itself is removed on release (and a leftover one from a killed process is reused).
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path
from types import TracebackType

from tatok_core.contract.errors import OutputBusyError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]
    import msvcrt

_BUSY = {errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK}


def _try_lock(fd: int) -> bool:
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        else:  # pragma: no cover - Windows
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
    except OSError as exc:
        if exc.errno in _BUSY:
            return False
        raise
    return True


class OutputLock:
    """Exclusive lock on ``target`` (a file or folder that may not exist yet) for one writing process.

    ``acquire`` fails at once with :class:`OutputBusyError` naming the target and the holder's pid;
    it never waits, so a second writer learns about the first instead of racing it.
    """

    def __init__(self, target: str | os.PathLike[str], tag: str = "") -> None:
        self.target = Path(target)
        self.path = self.target.parent / f".{self.target.name}{tag}.lock"
        self._fd: int | None = None

    def acquire(self) -> OutputLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            if not _try_lock(fd):
                holder = ""
                with contextlib.suppress(OSError):
                    holder = os.read(fd, 32).decode(errors="replace").strip()
                os.close(fd)
                who = f" (pid {holder})" if holder else ""
                raise OutputBusyError(
                    f"{self.target}: another tatok process{who} is writing it; wait for it to finish or "
                    "choose another output"
                )
            try:  # the holder before us may have removed the file after we opened it: lock the live one
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):  # Windows cannot remove an open file: it is reused next time
            os.unlink(self.path)
        os.close(self._fd)  # closing drops the lock
        self._fd = None

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()
