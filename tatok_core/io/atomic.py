"""Atomic file writes: a temporary file in the same folder, then a rename — readers and a killed writer
never leave or see half a file. Every file TaTok writes goes through :func:`atomic_file`.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path


def unique_temporary(path: Path) -> Path:
    """A hidden sibling name no other writer uses (pid + random)."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str], *, tmp: Path | None = None) -> Iterator[Path]:
    """Yields a temporary path to write; on success it is renamed over ``path``, on any error removed.

    ``tmp`` names the temporary file for callers that clean up after a killed writer by that name;
    by default it is :func:`unique_temporary`, so concurrent writers never share one.
    """
    path = Path(path)
    tmp = unique_temporary(path) if tmp is None else tmp
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: str | os.PathLike[str], data: bytes, *, tmp: Path | None = None) -> Path:
    """Write ``data`` to ``path`` durably (fsync before the rename) through :func:`atomic_file`."""
    path = Path(path)
    exclusive = tmp is None  # a unique name must be new; a caller's name may hold a killed writer's leftover
    with atomic_file(path, tmp=tmp) as staged:
        flags = os.O_WRONLY | os.O_CREAT | (os.O_EXCL if exclusive else os.O_TRUNC)
        fd = os.open(staged, flags, 0o666)  # the umask applies, as for open()
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str, *, encoding: str = "utf-8",
                      errors: str = "strict") -> Path:
    """Write ``text`` to ``path`` through :func:`atomic_write`."""
    return atomic_write(path, text.encode(encoding, errors))
