"""The ``tatok`` command: a thin click + rich layer over the library.

User errors (:class:`tatok_core.contract.errors.TatokError`) and failed file operations (``OSError``: a
read-only or full disk, an output path under a regular file) become one red line and exit status 1;
click's own usage errors exit with 2. Set ``TATOK_DEBUG=1`` to see the traceback instead.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import click
from rich.markup import escape

from tatok_cli.console import err_console
from tatok_core.contract.errors import TatokError, os_error_message


class TatokGroup(click.Group):
    """Turns library errors into one-line messages."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (TatokError, OSError) as exc:
            if os.environ.get("TATOK_DEBUG"):
                raise
            message = os_error_message(exc) if isinstance(exc, OSError) else str(exc)
            err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
            sys.exit(1)


@click.group(cls=TatokGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="tatok")
def cli() -> None:
    """TaTok: adaptive discrete image tokenization with global tokens and Dynamic Token Filtering."""


# Each module of tatok_cli lists its click commands in COMMANDS.
COMMAND_MODULES = ("components", "training", "tokens", "compression", "generation", "demo")


def register_commands() -> None:
    import importlib

    for module_name in COMMAND_MODULES:
        for command in importlib.import_module(f"tatok_cli.{module_name}").COMMANDS:
            cli.add_command(command)


register_commands()

if __name__ == "__main__":  # python -m tatok_cli.main
    cli()
