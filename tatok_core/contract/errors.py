"""Exceptions meant to be read by people: each one says what was wrong and what to do.

The CLI turns every :class:`TatokError` into a one-line message and a non-zero exit code, so raising
one of these (never a bare ``ValueError``) is how library code reports a *user* error.
"""

from __future__ import annotations

import difflib
import errno
from collections.abc import Iterable


class TatokError(Exception):
    """Base class of every error a user can cause and fix."""


class UnknownComponentError(TatokError, KeyError):
    """A component name that no installed plugin registered."""

    def __init__(self, kind: str, name: str, known: Iterable[str]) -> None:
        known = sorted(known)
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.0)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        listing = ", ".join(known) if known else "none registered"
        super().__init__(f"unknown {kind} {name!r} (known: {listing}){hint}")
        self.kind, self.name, self.known = kind, name, known

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0])


class PluginError(TatokError):
    """A plugin package that fails to import or registers something invalid."""


class CompositionError(TatokError):
    """Two components that cannot work together (names both of them)."""


class SpecError(TatokError):
    """A pipeline spec or option that cannot be parsed or serialised."""


class FilterInputError(TatokError, ValueError):
    """Bad input to a token filter (NaN, inf, negative bits, tau out of range, bad bounds)."""


class ImageReadError(TatokError):
    """An image file that cannot be read (names the file)."""


class TokenFileError(TatokError):
    """A token file that is missing, truncated, tampered with or from another tokenizer."""


class GenerationError(TatokError):
    """Tokens a generator cannot model or produced, or a saved prior that cannot be loaded."""


class OutputBusyError(TatokError):
    """An output another process is writing at this moment (names the output and the holder)."""


def os_error_message(exc: OSError) -> str:
    """One line for a failed file operation: the file, what went wrong, and for a full disk what to do."""
    where = exc.filename if exc.filename is not None else "a file"
    if exc.filename2 is not None:
        where = f"{exc.filename} → {exc.filename2}"
    reason = exc.strerror or str(exc) or type(exc).__name__
    hint = " (disk full: free some space or choose another output)" if exc.errno == errno.ENOSPC else ""
    return f"{where}: {reason}{hint}"


class WeightsFileError(TatokError):
    """A weights file that is missing, empty, truncated, corrupt, or made for another architecture (names it)."""


class MissingExtraError(TatokError, ImportError):
    """An optional feature whose dependencies are not installed (names the ``tatok[extra]`` to install)."""
