"""Option checks at parse time: a bad value is one line naming the option, before any work starts."""

from __future__ import annotations

from typing import Any

import click

from tatok_core.contract.errors import TatokError


def at_least(minimum: int) -> Any:
    """A click callback refusing an int option below ``minimum`` (``None``, an unset option, passes)."""

    def check(_: click.Context, param: click.Parameter, value: int | None) -> int | None:
        if value is not None and value < minimum:
            raise TatokError(f"{param.opts[0]} must be >= {minimum}, got {value}")
        return value

    return check
